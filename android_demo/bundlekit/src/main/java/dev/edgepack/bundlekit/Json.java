package dev.edgepack.bundlekit;

import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonPrimitive;
import java.math.BigDecimal;
import java.util.ArrayList;
import java.util.List;

/** Typed reads of manifest fields (Gson trees), each a {@link BundleException} naming the field when wrong. */
final class Json {
    static final String REEXPORT = "re-export the bundle";

    private Json() {}

    static JsonObject object(JsonObject parent, String key, String where) throws BundleException {
        JsonElement value = parent.get(key);
        if (value == null || !value.isJsonObject()) {
            throw new BundleException(where + ": field " + key + " is " + describe(value) + ", not an object", REEXPORT);
        }
        return value.getAsJsonObject();
    }

    /** The object at {@code key}, or null when absent or JSON null. */
    static JsonObject optionalObject(JsonObject parent, String key, String where) throws BundleException {
        JsonElement value = parent.get(key);
        return value == null || value.isJsonNull() ? null : object(parent, key, where);
    }

    static String string(JsonObject parent, String key, String where) throws BundleException {
        JsonElement value = parent.get(key);
        if (value == null || !value.isJsonPrimitive() || !value.getAsJsonPrimitive().isString()) {
            throw new BundleException(where + ": field " + key + " is " + describe(value) + ", not a string", REEXPORT);
        }
        return value.getAsString();
    }

    static String optionalString(JsonObject parent, String key, String where) throws BundleException {
        JsonElement value = parent.get(key);
        return value == null || value.isJsonNull() ? null : string(parent, key, where);
    }

    static boolean bool(JsonObject parent, String key, boolean otherwise, String where) throws BundleException {
        JsonElement value = parent.get(key);
        if (value == null || value.isJsonNull()) {
            return otherwise;
        }
        if (!value.isJsonPrimitive() || !value.getAsJsonPrimitive().isBoolean()) {
            throw new BundleException(where + ": field " + key + " is " + describe(value) + ", not true or false", REEXPORT);
        }
        return value.getAsBoolean();
    }

    /** A whole number (no fraction, no string), or null when absent or JSON null. */
    static Long optionalLong(JsonObject parent, String key, String where) throws BundleException {
        JsonElement value = parent.get(key);
        if (value == null || value.isJsonNull()) {
            return null;
        }
        Long whole = wholeNumber(value);
        if (whole == null) {
            throw new BundleException(where + ": field " + key + " is " + describe(value) + ", not a whole number", REEXPORT);
        }
        return whole;
    }

    static long longValue(JsonObject parent, String key, String where) throws BundleException {
        Long value = optionalLong(parent, key, where);
        if (value == null) {
            throw new BundleException(where + ": field " + key + " is missing", REEXPORT);
        }
        return value;
    }

    static Double optionalDouble(JsonObject parent, String key, String where) throws BundleException {
        JsonElement value = parent.get(key);
        if (value == null || value.isJsonNull()) {
            return null;
        }
        if (!value.isJsonPrimitive() || !value.getAsJsonPrimitive().isNumber()) {
            throw new BundleException(where + ": field " + key + " is " + describe(value) + ", not a number", REEXPORT);
        }
        return value.getAsDouble();
    }

    static List<Integer> ints(JsonObject parent, String key, String where) throws BundleException {
        List<Integer> out = new ArrayList<>();
        for (JsonElement item : array(parent, key, where)) {
            Long whole = wholeNumber(item);
            if (whole == null || whole < 0 || whole > Integer.MAX_VALUE) {
                throw new BundleException(where + ": field " + key + " holds " + describe(item) + ", not a token id", REEXPORT);
            }
            out.add(whole.intValue());
        }
        return out;
    }

    static List<String> strings(JsonObject parent, String key, String where) throws BundleException {
        List<String> out = new ArrayList<>();
        for (JsonElement item : array(parent, key, where)) {
            if (!item.isJsonPrimitive() || !item.getAsJsonPrimitive().isString()) {
                throw new BundleException(where + ": field " + key + " holds " + describe(item) + ", not a string", REEXPORT);
            }
            out.add(item.getAsString());
        }
        return out;
    }

    private static JsonArray array(JsonObject parent, String key, String where) throws BundleException {
        JsonElement value = parent.get(key);
        if (value == null || value.isJsonNull()) {
            return new JsonArray();
        }
        if (!value.isJsonArray()) {
            throw new BundleException(where + ": field " + key + " is " + describe(value) + ", not a list", REEXPORT);
        }
        return value.getAsJsonArray();
    }

    private static Long wholeNumber(JsonElement value) {
        if (!value.isJsonPrimitive() || !value.getAsJsonPrimitive().isNumber()) {
            return null;
        }
        try {
            return new BigDecimal(value.getAsString()).longValueExact();
        } catch (ArithmeticException | NumberFormatException e) {
            return null;
        }
    }

    static String describe(JsonElement value) {
        if (value == null) {
            return "missing";
        }
        if (value.isJsonNull()) {
            return "null";
        }
        if (value.isJsonObject()) {
            return "an object";
        }
        if (value.isJsonArray()) {
            return "a list";
        }
        JsonPrimitive p = value.getAsJsonPrimitive();
        String text = p.toString();
        return text.length() > 40 ? text.substring(0, 37) + "..." : text;
    }
}
