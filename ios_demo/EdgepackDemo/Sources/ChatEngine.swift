import EdgepackBundleKit
import Foundation

/// What one reply took, as `edgepack run` reports it.
struct ReplyStats {
    var promptTokens: Int?
    var generatedTokens: Int
    var prefillTokensPerS: Double
    var decodeTokensPerS: Double
    var stopReason: String

    var summary: String {
        func rate(_ v: Double) -> String { v.isNaN ? "–" : String(format: "%.1f tok/s", v) }
        return "prompt \(promptTokens.map(String.init) ?? "?") tok · \(generatedTokens) tok · prefill \(rate(prefillTokensPerS)) · decode \(rate(decodeTokensPerS)) · \(stopReason)"
    }

    static func stopReason(_ reply: ReplyStream, maxNewTokens: Int, cancelled: Bool) -> String {
        if let reason = reply.stopReason { return reason.rawValue }
        if cancelled { return "cancelled" }
        return reply.tokens >= maxNewTokens ? "max_new_tokens" : "context_full"
    }
}

/// A runtime that streams one reply to a prompt text (the chat format already applied).
protocol ChatEngine: AnyObject {
    var description: String { get }
    /// A reply stream for the next turn (the engine knows whether it hands out ids or text).
    func newReply(startInsideThink: Bool) -> ReplyStream
    /// Runs until the reply ends; `onChunks` gets the text to show, in order, on the engine's thread.
    func generate(prompt: String, maxNewTokens: Int, reply: ReplyStream,
                  onChunks: @escaping ([Chunk]) -> Void) async throws -> ReplyStats
    /// Ends a running `generate` early (from any thread).
    func stop()
    /// Forgets the conversation (a new chat); the next `generate` starts from an empty cache.
    func newConversation()
}

extension ChatEngine {
    func newConversation() {}
}

/// A flag set from the UI thread and read by the generation loop.
final class CancelFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false
    var isSet: Bool { lock.withLock { value } }
    func set(_ on: Bool) { lock.withLock { value = on } }
}

enum Engines {
    /// `neuralEngine`: Core ML bundles run their `prefill`/`decode` functions on the Neural Engine instead of
    /// `main` (swift-transformers' layout, GPU/CPU); other backends ignore it.
    static func open(_ bundle: EdgepackBundle, neuralEngine: Bool = false) async throws -> ChatEngine {
        switch bundle.backendName {
        case "coreml":
            return try await CoreMLEngine(bundle: bundle, mode: neuralEngine ? .neuralEngine : .swiftTransformers)
        case "executorch":
            #if canImport(ExecuTorchLLM)
            return try ExecuTorchEngine(bundle: bundle)
            #else
            throw BundleError("this build has no ExecuTorch runtime (a .pte bundle)",
                              fix: "link the executorch package (see ios_demo/README.md), or export with --target iphone-16-pro")
            #endif
        default:
            throw BundleError("this app runs Core ML and ExecuTorch bundles; this bundle's backend is \(bundle.backendName)",
                              fix: "export one for an iPhone, e.g. `edgepack export --target iphone-16-pro`")
        }
    }
}
