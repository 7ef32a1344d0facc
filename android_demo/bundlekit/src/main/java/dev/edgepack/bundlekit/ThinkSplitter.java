package dev.edgepack.bundlekit;

import java.util.ArrayList;
import java.util.List;

/**
 * Splits streamed text at the think tags into THINKING and ANSWER chunks; the tags are not shown. A tag may
 * arrive split over several tokens, so a tail that could begin a tag is held back. Whitespace right after a
 * tag is dropped (templates and models put newlines there as formatting). Mirrors runtime/session.py's
 * ThinkSplitter, Python's whitespace rules included.
 */
public final class ThinkSplitter {
    private final String start;
    private final String end;
    private boolean inside;
    private boolean afterTag;
    private String buf = "";

    /** {@code inside}: the prompt ended with the start tag (see {@link ChatFormat#endsInsideThink}). */
    public ThinkSplitter(String start, String end, boolean inside) {
        this.start = start;
        this.end = end;
        this.inside = inside;
        this.afterTag = inside;
    }

    public List<Chunk> feed(String text) {
        buf += text;
        List<Chunk> out = new ArrayList<>();
        while (!buf.isEmpty()) {
            if (afterTag) {
                buf = PyText.lstrip(buf);
                if (buf.isEmpty()) {
                    break;
                }
                afterTag = false;
            }
            String tag = inside ? end : start;
            int at = buf.indexOf(tag);
            if (at >= 0) {
                emit(out, buf.substring(0, at));
                buf = buf.substring(at + tag.length());
                inside = !inside;
                afterTag = true;
                continue;
            }
            int hold = PyText.overlap(buf, tag);
            emit(out, buf.substring(0, buf.length() - hold));
            buf = buf.substring(buf.length() - hold);
            break;
        }
        return out;
    }

    public List<Chunk> flush() {
        List<Chunk> out = new ArrayList<>();
        emit(out, buf);
        buf = "";
        return out;
    }

    private void emit(List<Chunk> out, String text) {
        if (!text.isEmpty()) {
            out.add(new Chunk(inside ? Chunk.Kind.THINKING : Chunk.Kind.ANSWER, text));
        }
    }
}
