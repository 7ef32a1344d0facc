package dev.edgepack.demo

import ai.onnxruntime.genai.Generator
import ai.onnxruntime.genai.GeneratorParams
import ai.onnxruntime.genai.Model
import ai.onnxruntime.genai.Tokenizer
import dev.edgepack.bundlekit.Bundle
import dev.edgepack.bundlekit.BundleException
import dev.edgepack.bundlekit.Chunk
import dev.edgepack.bundlekit.ReplyStream
import dev.edgepack.bundlekit.Throughput
import dev.edgepack.bundlekit.TokenPieces

/**
 * ONNX bundles through onnxruntime-genai: the bundle folder is a genai model folder (genai_config.json names
 * model.onnx, its inputs and the shared past/present KV buffer). genai's tokenizer encodes the prompt text
 * (edgepack's tests check it gives edgepack's ids); the Generator hands back token ids, which the app turns into
 * text itself with the bundle's vocabulary ([TokenPieces]) and a UTF-8-safe decoder: the same code its tests run
 * against edgepack's runtime. An end id of the manifest ends the reply (genai also stops on its config's EOS).
 * Snapdragon NPU bundles run here on their CPU model (genai_config.json names it: see exporters/onnx.py).
 */
class GenAiEngine(private val bundle: Bundle) : ChatEngine {
    private val defaults = bundle.generation()
    private val contextLength = bundle.contextLength()
    private val model = Model(bundle.folder().toString())
    private val tokenizer = Tokenizer(model)
    private val pieces = TokenPieces.fromTokenizerJson(bundle.file(bundle.tokenizer().file()))
    @Volatile private var cancelled = false

    override val description = "onnxruntime-genai (CPU)"

    override fun newReply(stopStrings: List<String>, startInsideThink: Boolean) =
        ReplyStream(bundle.tokenizer(), pieces, stopStrings, startInsideThink)

    override fun generate(
        prompt: String,
        maxNewTokens: Int,
        reply: ReplyStream,
        onChunks: (List<Chunk>) -> Unit,
    ): ReplyStats {
        cancelled = false
        val started = System.nanoTime()
        val ids = tokenizer.encode(prompt).use { it.getSequence(0) }
        if (ids.size + 1 > contextLength) {
            throw BundleException(
                "the conversation is ${ids.size} tokens but the bundle's context is $contextLength",
                "start a new chat, or re-export with a larger --max-context",
            )
        }
        val clock = Throughput(started, ids.size)
        GeneratorParams(model).use { params ->
            params.setSearchOption("max_length", minOf(contextLength, ids.size + maxNewTokens).toDouble())
            val sample = defaults.temperature > 0
            params.setSearchOption("do_sample", sample)
            if (sample) {
                params.setSearchOption("temperature", defaults.temperature)
                params.setSearchOption("top_p", defaults.topP)
                if (defaults.topK > 0) params.setSearchOption("top_k", defaults.topK.toDouble())
            }
            Generator(model, params).use { generator ->
                generator.appendTokens(ids)
                while (!generator.isDone && !reply.isDone && !cancelled) {
                    generator.generateNextToken()
                    val before = reply.tokens()
                    val chunks = reply.pushToken(generator.getLastTokenInSequence(0))
                    if (reply.tokens() > before) clock.token(System.nanoTime())
                    if (chunks.isNotEmpty()) onChunks(chunks)
                }
            }
        }
        val tail = reply.finish()
        if (tail.isNotEmpty()) onChunks(tail)
        return ReplyStats(
            promptTokens = ids.size,
            generatedTokens = reply.tokens(),
            prefillTokensPerS = clock.prefillTokensPerS(),
            decodeTokensPerS = clock.decodeTokensPerS(),
            stopReason = ChatEngine.stopReason(reply, maxNewTokens, cancelled),
        )
    }

    override fun stop() {
        cancelled = true
    }

    override fun close() {
        tokenizer.close()
        model.close()
    }
}
