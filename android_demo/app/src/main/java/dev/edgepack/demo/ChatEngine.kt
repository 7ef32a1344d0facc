package dev.edgepack.demo

import dev.edgepack.bundlekit.Bundle
import dev.edgepack.bundlekit.BundleException
import dev.edgepack.bundlekit.Chunk
import dev.edgepack.bundlekit.ReplyStream
import java.util.Locale

/** What one reply took, as `edgepack run` reports it. */
data class ReplyStats(
    val promptTokens: Int?,
    val generatedTokens: Int,
    val prefillTokensPerS: Double,
    val decodeTokensPerS: Double,
    val stopReason: String,
) {
    fun describe(): String {
        val prompt = promptTokens?.let { "prompt $it tok" } ?: "prompt ? tok"
        return String.format(
            Locale.ROOT, "%s · %d tok · prefill %s · decode %s · %s",
            prompt, generatedTokens, rate(prefillTokensPerS), rate(decodeTokensPerS), stopReason,
        )
    }

    private fun rate(value: Double) = if (value.isNaN()) "–" else String.format(Locale.ROOT, "%.1f tok/s", value)
}

/** A runtime that streams one reply to a prompt text (the chat format already applied). */
interface ChatEngine : AutoCloseable {
    /** What runs the bundle, for the status line. */
    val description: String

    /** A fresh reply stream for the next turn (the engine knows whether it hands out ids or text). */
    fun newReply(stopStrings: List<String>, startInsideThink: Boolean): ReplyStream

    /** Blocks until the reply ends; [onChunks] gets the text to show as it comes, on the calling thread. */
    fun generate(prompt: String, maxNewTokens: Int, reply: ReplyStream, onChunks: (List<Chunk>) -> Unit): ReplyStats

    /** Ends a running [generate] early (called from another thread). */
    fun stop()

    companion object {
        fun open(bundle: Bundle): ChatEngine = when (val backend = bundle.backendName()) {
            "executorch" -> ExecuTorchEngine(bundle)
            "onnx" -> GenAiEngine(bundle)
            else -> throw BundleException(
                "this app runs ExecuTorch (.pte) and ONNX bundles; this bundle's backend is $backend",
                "export one for an Android target, e.g. `edgepack export --target pixel-9`",
            )
        }

        /** How a reply ended, in `edgepack run`'s words. */
        fun stopReason(reply: ReplyStream, maxNewTokens: Int, cancelled: Boolean): String = when {
            reply.stopReason() == ReplyStream.StopReason.EOS -> "eos"
            reply.stopReason() == ReplyStream.StopReason.STOP_STRING -> "stop_string"
            cancelled -> "cancelled"
            reply.tokens() >= maxNewTokens -> "max_new_tokens"
            else -> "context_full"
        }
    }
}
