package dev.edgepack.bundlekit;

import com.google.gson.JsonObject;

/** The manifest's {@code generation} section: what `edgepack run` uses when the user sets nothing. */
public final class GenerationDefaults {
    public final int maxNewTokens;
    public final double temperature;
    public final double topP;
    public final int topK;

    public GenerationDefaults(int maxNewTokens, double temperature, double topP, int topK) {
        this.maxNewTokens = maxNewTokens;
        this.temperature = temperature;
        this.topP = topP;
        this.topK = topK;
    }

    static GenerationDefaults fromManifest(JsonObject manifest) throws BundleException {
        String where = Bundle.MANIFEST + " generation";
        JsonObject g = Json.optionalObject(manifest, "generation", Bundle.MANIFEST);
        if (g == null) {
            g = new JsonObject();
        }
        Long maxNew = Json.optionalLong(g, "max_new_tokens", where);
        Double temperature = Json.optionalDouble(g, "temperature", where);
        Double topP = Json.optionalDouble(g, "top_p", where);
        Long topK = Json.optionalLong(g, "top_k", where);
        GenerationDefaults d = new GenerationDefaults(
                maxNew == null ? 256 : (int) Math.min(maxNew, Integer.MAX_VALUE),
                temperature == null ? 0.0 : temperature,
                topP == null ? 1.0 : topP,
                topK == null ? 0 : (int) Math.min(topK, Integer.MAX_VALUE));
        if (d.maxNewTokens < 1 || !(d.temperature >= 0) || !(d.topP > 0 && d.topP <= 1) || d.topK < 0) {
            throw new BundleException(where + " holds an out-of-range default", Json.REEXPORT);
        }
        return d;
    }
}
