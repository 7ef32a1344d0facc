#if canImport(ExecuTorchLLM)
import EdgepackBundleKit
import ExecuTorchLLM
import Foundation

/// .pte bundles through ExecuTorch's TextRunner (its C++ TextLLMRunner, the runner edgepack's tests drive from
/// Python): it tokenizes the prompt text with the bundle's tokenizer.json and passes each token's text to the
/// callback, the end token's text included, before it stops: `ReplyStream.push(text:)` drops it
/// (manifest `tokenizer.stop_texts`). Link the kernel libraries the manifest names
/// (`backend.kernel_libraries.ios`, e.g. backend_xnnpack, kernels_llm, kernels_quantized) with -all_load.
///
/// Known limit of this runner on iOS (ExecuTorchLLMTextRunner.mm): each token becomes an NSString on its own,
/// so a character whose UTF-8 bytes span two tokens (common in CJK text and emoji) does not convert and is
/// lost. The Core ML path decodes bytes itself and has no such loss.
final class ExecuTorchEngine: ChatEngine {
    let description: String
    private let bundle: EdgepackBundle
    private let runner: TextRunner
    private let cancel = CancelFlag()

    init(bundle: EdgepackBundle) throws {
        self.bundle = bundle
        runner = TextRunner(modelPath: try bundle.program().path,
                            tokenizerPath: try bundle.file(bundle.tokenizer.file).path)
        try runner.load()  // "Missing operator" here: a kernel library the manifest names is not linked
        description = "ExecuTorch TextRunner, links " + bundle.kernelLibraries("ios").joined(separator: ", ")
    }

    func newReply(startInsideThink: Bool) -> ReplyStream {
        ReplyStream(tokenizer: bundle.tokenizer, pieces: nil, startInsideThink: startInsideThink)
    }

    func stop() {
        cancel.set(true)
        runner.stop()
    }

    func generate(prompt: String, maxNewTokens: Int, reply start: ReplyStream,
                  onChunks: @escaping ([Chunk]) -> Void) async throws -> ReplyStats {
        cancel.set(false)
        runner.reset()  // every turn sends the whole conversation, rendered by the chat format
        var reply = start
        var clock = Throughput(start: DispatchTime.now().uptimeNanoseconds, promptTokens: 0)
        let temperature = bundle.generation.temperature
        let config = Config {
            $0.sequenceLength = bundle.contextLength  // prompt + reply, capped by the program's max context
            $0.temperature = temperature
            $0.echoEnabled = false
            $0.bosCount = 0  // the chat format's text carries BOS itself
            $0.eosCount = 0
        }
        try runner.generate(prompt, config) { [runner] token in
            let before = reply.tokens
            let chunks = reply.push(text: token)
            if reply.tokens > before { clock.token(at: DispatchTime.now().uptimeNanoseconds) }
            if !chunks.isEmpty { onChunks(chunks) }
            if reply.isDone || reply.tokens >= maxNewTokens { runner.stop() }
        }
        let tail = reply.finish()
        if !tail.isEmpty { onChunks(tail) }
        return ReplyStats(promptTokens: nil, generatedTokens: reply.tokens, prefillTokensPerS: .nan,
                          decodeTokensPerS: clock.decodeTokensPerS,
                          stopReason: ReplyStats.stopReason(reply, maxNewTokens: maxNewTokens, cancelled: cancel.isSet))
    }
}
#endif
