package dev.edgepack.bundlekit;

import java.nio.ByteBuffer;
import java.nio.CharBuffer;
import java.nio.charset.CharsetDecoder;
import java.nio.charset.CoderResult;
import java.nio.charset.CodingErrorAction;
import java.nio.charset.StandardCharsets;

/**
 * Byte pieces in (one token's bytes each), complete characters out. A byte-level BPE token can hold part of a
 * multi-byte character (東 = e6 9d b1 arrives as " e6", "9d", "b1"): those bytes are held back until the
 * character is complete. Invalid bytes become U+FFFD; {@link #finish()} turns a character the stream ended in
 * the middle of into U+FFFD. The JDK's UTF-8 decoder does the work: given input that is not the end, it leaves
 * an incomplete trailing sequence unread.
 */
public final class Utf8StreamDecoder {
    private final CharsetDecoder decoder = StandardCharsets.UTF_8.newDecoder()
            .onMalformedInput(CodingErrorAction.REPLACE)
            .onUnmappableCharacter(CodingErrorAction.REPLACE);
    private ByteBuffer pending = ByteBuffer.allocate(0);

    /** Add one piece; returns the characters it completes (possibly ""). */
    public String push(byte[] piece) {
        return decode(piece, false);
    }

    /** Whatever is still held back, as U+FFFD (the stream ended inside a character), and reset. */
    public String finish() {
        String out = decode(new byte[0], true);
        decoder.reset();
        pending = ByteBuffer.allocate(0);
        return out;
    }

    private String decode(byte[] piece, boolean end) {
        ByteBuffer in = ByteBuffer.allocate(pending.remaining() + piece.length);
        in.put(pending).put(piece).flip();
        CharBuffer out = CharBuffer.allocate(in.remaining() + 4);
        CoderResult result = decoder.decode(in, out, end);
        if (result.isOverflow()) {
            throw new IllegalStateException("a UTF-8 piece decodes to more characters than bytes");
        }
        if (end) {
            decoder.flush(out);
        }
        pending = in.slice();
        out.flip();
        return out.toString();
    }
}
