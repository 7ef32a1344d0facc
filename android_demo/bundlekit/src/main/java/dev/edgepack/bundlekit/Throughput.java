package dev.edgepack.bundlekit;

/**
 * Tokens per second as `edgepack run` reports them: prefill = prompt tokens over the time to the first token;
 * decode = tokens after the first over the time since the first. The app passes {@code System.nanoTime()};
 * tests pass fixed times.
 */
public final class Throughput {
    private final long startNanos;
    private final int promptTokens;
    private long firstTokenNanos = -1;
    private long lastTokenNanos = -1;
    private int tokens;

    public Throughput(long startNanos, int promptTokens) {
        this.startNanos = startNanos;
        this.promptTokens = promptTokens;
    }

    public void token(long nanos) {
        if (firstTokenNanos < 0) {
            firstTokenNanos = nanos;
        }
        lastTokenNanos = nanos;
        tokens++;
    }

    public int tokens() {
        return tokens;
    }

    /** Seconds from the start to the first token, or NaN before it. */
    public double timeToFirstTokenS() {
        return firstTokenNanos < 0 ? Double.NaN : (firstTokenNanos - startNanos) / 1e9;
    }

    /** Prompt tokens per second up to the first token; NaN when the prompt length is not known (0). */
    public double prefillTokensPerS() {
        double s = timeToFirstTokenS();
        return promptTokens <= 0 || !(s > 0) ? Double.NaN : promptTokens / s;
    }

    /** Generated tokens per second after the first; NaN until there are two. */
    public double decodeTokensPerS() {
        double s = (lastTokenNanos - firstTokenNanos) / 1e9;
        return tokens < 2 || !(s > 0) ? Double.NaN : (tokens - 1) / s;
    }
}
