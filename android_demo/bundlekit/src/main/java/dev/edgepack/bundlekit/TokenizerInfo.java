package dev.edgepack.bundlekit;

import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import java.util.Collections;
import java.util.LinkedHashSet;
import java.util.List;
import java.util.Set;

/**
 * The manifest's {@code tokenizer} section: which ids end a reply, the end tokens' texts (ExecuTorch's LLM
 * runner passes the end token's text to the token callback before it stops: an app drops it), the think tags,
 * and the chat format.
 */
public final class TokenizerInfo {
    public static final String DEFAULT_THINK_START = "<think>";
    public static final String DEFAULT_THINK_END = "</think>";

    private final String file;
    private final Integer bosId;
    private final boolean addBos;
    private final Set<Integer> endIds;
    private final List<String> stopTexts;
    private final String thinkStart;
    private final String thinkEnd;
    private final JsonElement chatFormat;

    public TokenizerInfo(String file, Integer bosId, boolean addBos, Set<Integer> endIds, List<String> stopTexts,
                         String thinkStart, String thinkEnd, JsonElement chatFormat) {
        this.file = file;
        this.bosId = bosId;
        this.addBos = addBos;
        this.endIds = Collections.unmodifiableSet(new LinkedHashSet<>(endIds));
        this.stopTexts = Collections.unmodifiableList(stopTexts);
        this.thinkStart = thinkStart;
        this.thinkEnd = thinkEnd;
        this.chatFormat = chatFormat;
    }

    static TokenizerInfo fromManifest(JsonObject manifest) throws BundleException {
        String where = Bundle.MANIFEST + " tokenizer";
        JsonObject tok = Json.object(manifest, "tokenizer", Bundle.MANIFEST);
        Long bos = Json.optionalLong(tok, "bos_id", where);
        Set<Integer> end = new LinkedHashSet<>(Json.ints(tok, "eos_ids", where));
        end.addAll(Json.ints(tok, "stop_ids", where));
        if (end.isEmpty()) {
            throw new BundleException(where + " lists no end-of-reply ids (eos_ids, stop_ids)", Json.REEXPORT);
        }
        JsonObject think = Json.optionalObject(tok, "think", where);
        String start = think == null ? null : Json.optionalString(think, "start", where + ".think");
        String stop = think == null ? null : Json.optionalString(think, "end", where + ".think");
        return new TokenizerInfo(
                Json.string(tok, "file", where),
                bos == null ? null : bos.intValue(),
                Json.bool(tok, "add_bos", false, where),
                end,
                Json.strings(tok, "stop_texts", where),
                start == null || start.isEmpty() ? DEFAULT_THINK_START : start,
                stop == null || stop.isEmpty() ? DEFAULT_THINK_END : stop,
                tok.get("chat_format"));
    }

    /** tokenizer.json's name inside the bundle. */
    public String file() {
        return file;
    }

    public Integer bosId() {
        return bosId;
    }

    public boolean addBos() {
        return addBos;
    }

    /** EOS and the template's turn-end ids: any of them ends a reply and is never shown. */
    public Set<Integer> endIds() {
        return endIds;
    }

    public boolean isEndId(int id) {
        return endIds.contains(id);
    }

    /** The end tokens' texts, as a runner that streams text (ExecuTorch's) passes them before it stops. */
    public List<String> stopTexts() {
        return stopTexts;
    }

    public String thinkStart() {
        return thinkStart;
    }

    public String thinkEnd() {
        return thinkEnd;
    }

    JsonElement chatFormatJson() {
        return chatFormat;
    }
}
