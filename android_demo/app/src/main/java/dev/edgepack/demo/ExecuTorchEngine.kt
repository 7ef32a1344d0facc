package dev.edgepack.demo

import com.google.gson.JsonObject
import com.google.gson.JsonParser
import dev.edgepack.bundlekit.Bundle
import dev.edgepack.bundlekit.Chunk
import dev.edgepack.bundlekit.ReplyStream
import dev.edgepack.bundlekit.Throughput
import org.pytorch.executorch.extension.llm.LlmCallback
import org.pytorch.executorch.extension.llm.LlmModule

/**
 * .pte bundles through ExecuTorch's LlmModule (its C++ TextLLMRunner): the program's `forward` returns the last
 * position's logits, its metadata methods give the runner the EOS ids and lengths. The runner tokenizes the
 * prompt text with the bundle's tokenizer.json and passes each token's text to [LlmCallback.onResult] (whole
 * characters: its JNI layer holds back a partial UTF-8 sequence), the end token's text included, before it
 * stops: [ReplyStream.pushText] drops that text (manifest `tokenizer.stop_texts`).
 */
class ExecuTorchEngine(private val bundle: Bundle) : ChatEngine {
    private val defaults = bundle.generation()
    private val contextLength = bundle.contextLength()
    private val module = LlmModule(
        bundle.program().toString(),
        // A file: LlmModule checks it is one. Its tokenizer then guesses BOS/EOS from token names, which does
        // not matter here: EOS comes from the program's get_eos_ids and BOS from the chat format's text.
        bundle.file(bundle.tokenizer().file()).toString(),
        defaults.temperature.toFloat(),
    )
    @Volatile private var cancelled = false

    init {
        module.load()  // "Missing operator" here means the AAR lacks a kernel library the manifest names
    }

    override val description = "ExecuTorch LlmModule (XNNPACK), links " +
        bundle.kernelLibraries("cmake").joinToString(", ")

    override fun newReply(stopStrings: List<String>, startInsideThink: Boolean) =
        ReplyStream(bundle.tokenizer(), null, stopStrings, startInsideThink)

    override fun generate(
        prompt: String,
        maxNewTokens: Int,
        reply: ReplyStream,
        onChunks: (List<Chunk>) -> Unit,
    ): ReplyStats {
        cancelled = false
        module.resetContext()  // every turn sends the whole conversation, rendered by the chat format
        val clock = Throughput(System.nanoTime(), 0)
        var runnerStats: JsonObject? = null
        val callback = object : LlmCallback {
            override fun onResult(result: String) {
                val before = reply.tokens()
                val chunks = reply.pushText(result)
                if (reply.tokens() > before) clock.token(System.nanoTime())
                if (chunks.isNotEmpty()) onChunks(chunks)
                if (reply.isDone || reply.tokens() >= maxNewTokens) module.stop()
            }

            override fun onStats(stats: String) {
                runnerStats = runCatching { JsonParser.parseString(stats).asJsonObject }.getOrNull()
            }
        }
        // seqLen: the context (prompt + reply), capped by the program's get_max_context_len; numBos 0: the chat
        // format's text carries BOS itself when the model wants one; echo off: only the reply is streamed.
        module.generate(prompt, contextLength, callback, false, defaults.temperature.toFloat(), 0, 0)
        val tail = reply.finish()
        if (tail.isNotEmpty()) onChunks(tail)
        val promptTokens = runnerStats?.get("prompt_tokens")?.asInt
        return ReplyStats(
            promptTokens = promptTokens,
            generatedTokens = reply.tokens(),
            prefillTokensPerS = prefillRate(runnerStats, promptTokens),
            decodeTokensPerS = clock.decodeTokensPerS(),
            stopReason = ChatEngine.stopReason(reply, maxNewTokens, cancelled),
        )
    }

    /** Prompt tokens over the runner's prefill time (its stats: inference start to prompt evaluation end). */
    private fun prefillRate(stats: JsonObject?, promptTokens: Int?): Double {
        val start = stats?.get("inference_start_ms")?.asLong ?: return Double.NaN
        val end = stats.get("prompt_eval_end_ms")?.asLong ?: return Double.NaN
        return if (promptTokens == null || end <= start) Double.NaN else promptTokens * 1000.0 / (end - start)
    }

    override fun stop() {
        cancelled = true
        module.stop()
    }

    override fun close() = module.close()
}
