package dev.edgepack.bundlekit;

import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.ArrayList;
import java.util.List;

/**
 * The golden vectors tests/test_demo_vectors.py writes (build/app-vectors/vectors.json and the bundles beside
 * it). Their folder comes from -Dedgepack.vectors or $EDGEPACK_VECTORS. Missing vectors fail the tests: they
 * are never skipped.
 */
final class Vectors {
    private static JsonObject cached;

    private Vectors() {}

    static Path folder() {
        String given = System.getProperty("edgepack.vectors", System.getenv("EDGEPACK_VECTORS"));
        if (given == null || given.isEmpty()) {
            throw new IllegalStateException("no vectors folder given: pass -Dedgepack.vectors=DIR (android_demo/bundlekit/test.sh does)");
        }
        return Paths.get(given).toAbsolutePath().normalize();
    }

    static synchronized JsonObject all() {
        if (cached == null) {
            Path file = folder().resolve("vectors.json");
            if (!Files.isRegularFile(file)) {
                throw new IllegalStateException("no golden vectors at " + file
                        + ": run `python -m pytest tests/test_demo_vectors.py` from the repository root first");
            }
            try {
                cached = JsonParser.parseString(new String(Files.readAllBytes(file), StandardCharsets.UTF_8)).getAsJsonObject();
            } catch (IOException e) {
                throw new IllegalStateException("cannot read " + file, e);
            }
            if (cached.get("format").getAsInt() != 1) {
                throw new IllegalStateException(file + " is vectors format " + cached.get("format") + "; these tests read 1");
            }
        }
        return cached;
    }

    static List<JsonObject> cases(String key) {
        JsonArray array = all().getAsJsonArray(key);
        List<JsonObject> out = new ArrayList<>();
        for (JsonElement e : array) {
            out.add(e.getAsJsonObject());
        }
        if (out.isEmpty()) {
            throw new IllegalStateException("vectors.json has no " + key + " cases");
        }
        return out;
    }

    static Path bundle() {
        return folder().resolve(all().get("bundle").getAsString());
    }

    static List<String> strings(JsonObject o, String key) {
        List<String> out = new ArrayList<>();
        for (JsonElement e : o.getAsJsonArray(key)) {
            out.add(e.getAsString());
        }
        return out;
    }

    static List<Integer> ints(JsonObject o, String key) {
        List<Integer> out = new ArrayList<>();
        for (JsonElement e : o.getAsJsonArray(key)) {
            out.add(e.getAsInt());
        }
        return out;
    }

    static List<Chunk> chunks(JsonObject o, String key) {
        List<Chunk> out = new ArrayList<>();
        for (JsonElement e : o.getAsJsonArray(key)) {
            JsonArray pair = e.getAsJsonArray();
            out.add(new Chunk(Chunk.Kind.valueOf(pair.get(0).getAsString().toUpperCase(java.util.Locale.ROOT)),
                    pair.get(1).getAsString()));
        }
        return out;
    }

    static List<Message> messages(JsonObject o) {
        List<Message> out = new ArrayList<>();
        for (JsonElement e : o.getAsJsonArray("messages")) {
            JsonObject m = e.getAsJsonObject();
            out.add(new Message(m.get("role").getAsString(), m.get("content").getAsString()));
        }
        return out;
    }

    static byte[] hex(String text) {
        byte[] out = new byte[text.length() / 2];
        for (int i = 0; i < out.length; i++) {
            out[i] = (byte) Integer.parseInt(text.substring(2 * i, 2 * i + 2), 16);
        }
        return out;
    }

    static String joined(List<Chunk> chunks, Chunk.Kind kind) {
        StringBuilder out = new StringBuilder();
        for (Chunk c : chunks) {
            if (c.kind == kind) {
                out.append(c.text);
            }
        }
        return out.toString();
    }
}
