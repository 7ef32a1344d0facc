package dev.edgepack.bundlekit;

import java.util.ArrayList;
import java.util.Collections;
import java.util.List;

/**
 * One streamed reply, as edgepack's runtime streams it (runtime/session.py): token -> UTF-8-safe text -> stop
 * strings -> think split -> chunks for the screen. Feed it whatever the runtime gives:
 * <ul>
 *   <li>{@link #pushToken(int)}: token ids (onnxruntime-genai's Generator, Core ML). An end id (EOS or a
 *       turn-end id of the manifest) ends the reply and is never shown.</li>
 *   <li>{@link #pushText(String)}: text pieces (ExecuTorch's LlmModule callback, already whole characters).
 *       A piece that is an end token's text ({@code tokenizer.stop_texts}) ends the reply: the runner passes it
 *       to the callback before it stops.</li>
 * </ul>
 * When {@link #isDone()} turns true the app stops the runtime (a stop string was completed, or the end token
 * came); at the end of the stream call {@link #finish()} for what was held back.
 */
public final class ReplyStream {
    public enum StopReason { EOS, STOP_STRING }

    private final TokenizerInfo tokenizer;
    private final TokenPieces pieces;
    private final Utf8StreamDecoder utf8 = new Utf8StreamDecoder();
    private final StopStringMatcher matcher;
    private final ThinkSplitter splitter;
    private StopReason reason;
    private boolean done;
    private int tokens;

    /**
     * @param pieces the bundle's token bytes; needed for {@link #pushToken}, may be null for text-only runners
     * @param stopStrings the user's stop strings (may be empty)
     * @param startInsideThink the prompt ended with the think start tag ({@link ChatFormat#endsInsideThink})
     */
    public ReplyStream(TokenizerInfo tokenizer, TokenPieces pieces, List<String> stopStrings, boolean startInsideThink) {
        this.tokenizer = tokenizer;
        this.pieces = pieces;
        this.matcher = new StopStringMatcher(stopStrings);
        this.splitter = new ThinkSplitter(tokenizer.thinkStart(), tokenizer.thinkEnd(), startInsideThink);
    }

    public List<Chunk> pushToken(int id) {
        if (done) {
            return Collections.emptyList();
        }
        if (pieces == null) {
            throw new IllegalStateException("pushToken needs the bundle's TokenPieces");
        }
        if (tokenizer.isEndId(id)) {
            reason = StopReason.EOS;
            return end();
        }
        tokens++;
        return show(utf8.push(pieces.bytes(id)));
    }

    public List<Chunk> pushText(String piece) {
        if (done) {
            return Collections.emptyList();
        }
        if (tokenizer.stopTexts().contains(piece)) {
            reason = StopReason.EOS;
            return end();
        }
        tokens++;
        return show(piece);
    }

    /** The stream ended (token budget, context full, the runtime returned): what was held back. */
    public List<Chunk> finish() {
        return done ? Collections.<Chunk>emptyList() : end();
    }

    /** No more input is wanted: stop the runtime (the end token came or a stop string was completed). */
    public boolean isDone() {
        return done;
    }

    /** Why the reply ended; null while it runs, or when it ended by {@link #finish()} alone. */
    public StopReason stopReason() {
        return reason;
    }

    /** Tokens (or text pieces) shown so far; an end token is not counted. */
    public int tokens() {
        return tokens;
    }

    private List<Chunk> show(String text) {
        List<Chunk> out = new ArrayList<>(splitter.feed(matcher.feed(text)));
        if (matcher.stopped()) {
            reason = StopReason.STOP_STRING;
            done = true;
            out.addAll(splitter.flush());
        }
        return out;
    }

    private List<Chunk> end() {
        List<Chunk> out = new ArrayList<>();
        if (!matcher.stopped()) {
            String tail = matcher.feed(utf8.finish());
            if (matcher.stopped()) {
                reason = StopReason.STOP_STRING;
            }
            out.addAll(splitter.feed(tail + matcher.flush()));
        }
        out.addAll(splitter.flush());
        done = true;
        return out;
    }
}
