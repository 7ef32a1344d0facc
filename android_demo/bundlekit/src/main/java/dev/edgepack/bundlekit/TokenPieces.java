package dev.edgepack.bundlekit;

import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParseException;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.io.Reader;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.HashMap;
import java.util.HashSet;
import java.util.Map;
import java.util.Set;

/**
 * Each token id's bytes, read from the bundle's tokenizer.json, for a runtime that hands an app token ids
 * (onnxruntime-genai's Generator, a Core ML model): the app decodes them with a {@link Utf8StreamDecoder}.
 *
 * Byte-level BPE tokenizers (SmolLM2, Qwen2, Llama 3, DeepSeek-R1-Distill) store each byte as one printable
 * character (GPT-2's byte-to-unicode table); decoding maps the characters back to bytes. A token holding a
 * character outside that table is its own UTF-8 (as Hugging Face tokenizers' ByteLevel decoder does); special
 * tokens are empty, as edgepack's runtime skips them when it streams a reply. Other decoders (SentencePiece
 * with byte fallback) are refused: decode them with the runtime's own tokenizer stream.
 */
public final class TokenPieces {
    private static final byte[] EMPTY = new byte[0];
    private final byte[][] pieces;

    private TokenPieces(byte[][] pieces) {
        this.pieces = pieces;
    }

    public static TokenPieces fromTokenizerJson(Path file) throws BundleException {
        JsonElement parsed;
        try (Reader reader = Files.newBufferedReader(file, StandardCharsets.UTF_8)) {
            parsed = JsonParser.parseReader(reader);
        } catch (IOException | JsonParseException e) {
            throw new BundleException("cannot read the tokenizer " + file + " (" + e.getMessage() + ")", Json.REEXPORT);
        }
        if (!parsed.isJsonObject()) {
            throw new BundleException("the tokenizer " + file + " is not a JSON object", Json.REEXPORT);
        }
        return fromJson(parsed.getAsJsonObject(), file.toString());
    }

    static TokenPieces fromJson(JsonObject tokenizer, String where) throws BundleException {
        checkByteLevel(tokenizer, where);
        Map<Integer, String> texts = new HashMap<>();
        for (Map.Entry<String, JsonElement> e : Json.object(Json.object(tokenizer, "model", where), "vocab", where).entrySet()) {
            texts.put(e.getValue().getAsInt(), e.getKey());
        }
        Set<Integer> special = new HashSet<>();
        JsonElement added = tokenizer.get("added_tokens");
        if (added != null && added.isJsonArray()) {
            for (JsonElement item : (JsonArray) added) {
                JsonObject token = item.getAsJsonObject();
                int id = token.get("id").getAsInt();
                texts.put(id, token.get("content").getAsString());
                if (Json.bool(token, "special", false, where)) {
                    special.add(id);
                }
            }
        }
        int size = 0;
        for (int id : texts.keySet()) {
            if (id < 0) {
                throw new BundleException("the tokenizer " + where + " has a negative token id", Json.REEXPORT);
            }
            size = Math.max(size, id + 1);
        }
        Map<Integer, Integer> table = ByteTable.INVERSE;
        byte[][] pieces = new byte[size][];
        for (int id = 0; id < size; id++) {
            String text = texts.get(id);
            pieces[id] = text == null || special.contains(id) ? EMPTY : bytesOf(text, table);
        }
        return new TokenPieces(pieces);
    }

    private static void checkByteLevel(JsonObject tokenizer, String where) throws BundleException {
        JsonElement decoder = tokenizer.get("decoder");
        String type = decoder != null && decoder.isJsonObject() && decoder.getAsJsonObject().has("type")
                ? decoder.getAsJsonObject().get("type").getAsString() : "none";
        if (type.equals("Sequence")) {
            JsonArray inner = decoder.getAsJsonObject().getAsJsonArray("decoders");
            if (inner != null && inner.size() == 1 && inner.get(0).isJsonObject()) {
                type = inner.get(0).getAsJsonObject().get("type").getAsString();
            }
        }
        if (!type.equals("ByteLevel")) {
            throw new BundleException("the tokenizer " + where + " decodes with " + type + ", not byte-level BPE",
                    "decode token ids with the runtime's own tokenizer stream for this model");
        }
    }

    private static byte[] bytesOf(String text, Map<Integer, Integer> table) {
        byte[] out = new byte[text.length()];
        int n = 0;
        for (int i = 0; i < text.length(); ) {
            int cp = text.codePointAt(i);
            Integer b = table.get(cp);
            if (b == null) {
                return text.getBytes(StandardCharsets.UTF_8);
            }
            out[n++] = (byte) (int) b;
            i += Character.charCount(cp);
        }
        return java.util.Arrays.copyOf(out, n);
    }

    /** The bytes of token {@code id}; empty for a special token or an id without a token. */
    public byte[] bytes(int id) {
        if (id < 0 || id >= pieces.length) {
            throw new IllegalArgumentException("token id " + id + " is outside the vocabulary of " + pieces.length);
        }
        return pieces[id].clone();
    }

    public int vocabSize() {
        return pieces.length;
    }

    /** GPT-2's table of the 256 bytes as printable characters, inverted. */
    static final class ByteTable {
        static final Map<Integer, Integer> INVERSE = build();

        private ByteTable() {}

        private static Map<Integer, Integer> build() {
            Map<Integer, Integer> inverse = new HashMap<>();
            boolean[] direct = new boolean[256];
            for (int b = 0; b < 256; b++) {
                direct[b] = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
            }
            int extra = 0;
            for (int b = 0; b < 256; b++) {
                inverse.put(direct[b] ? b : 256 + extra++, b);
            }
            return inverse;
        }
    }
}
