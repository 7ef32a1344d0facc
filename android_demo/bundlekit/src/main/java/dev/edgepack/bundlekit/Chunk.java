package dev.edgepack.bundlekit;

import java.util.Objects;

/** A piece of streamed reply text: reasoning (inside the think tags) or the answer. */
public final class Chunk {
    public enum Kind {
        ANSWER, THINKING;

        /** "answer" / "thinking", as edgepack's runtime names them. */
        public String label() {
            return name().toLowerCase(java.util.Locale.ROOT);
        }
    }

    public final Kind kind;
    public final String text;

    public Chunk(Kind kind, String text) {
        this.kind = Objects.requireNonNull(kind, "kind");
        this.text = Objects.requireNonNull(text, "text");
    }

    @Override
    public boolean equals(Object other) {
        if (!(other instanceof Chunk)) {
            return false;
        }
        Chunk c = (Chunk) other;
        return kind == c.kind && text.equals(c.text);
    }

    @Override
    public int hashCode() {
        return Objects.hash(kind, text);
    }

    @Override
    public String toString() {
        return kind.label() + ":" + text;
    }
}
