import CoreML
import CryptoKit
import EdgepackBundleKit
import Foundation
import Tokenizers

/// Core ML bundles (`edgepack export --target iphone-16-pro`): one model.mlpackage, three functions over one set of
/// weights and one state layout (`keyCache` / `valueCache` fp16 [layers, 1, kv_heads, context, head_dim]), as
/// exporters/coreml.py writes it:
///
/// - `.swiftTransformers` (the default): the default function `main`, driven exactly as Hugging Face
///   swift-transformers' `LanguageModelWithStatefulKVCache` drives it (and as runtime/coreml_backend.py does):
///   `inputIds` int32 [1, T] (the whole prompt in one call, then one token a call) and `causalMask` fp16 zeros
///   [1, 1, 1, tokenCount + 1], tokenCount = every token so far including this call's; only the mask's shape is
///   read (the model derives the cache position from it). Logits [1, T, vocab]: the last row is the next token's.
///   `main` has a ranged T, so Core ML runs it on the GPU/CPU (the manifest's `backend.compute_units`).
/// - `.neuralEngine` (a setting): `prefill` (a fixed chunk, `backend.functions.prefill` tokens; a shorter chunk is
///   padded, the padded positions are rewritten before anything reads them) and `decode` (one token), static shapes
///   the Neural Engine compiles ahead, with inputs `inputIds` + `position` (int32 [1], cache position of the first
///   token), loaded with `MLModelConfiguration.functionName` and `.cpuAndNeuralEngine`.
///
/// One `makeState()` per conversation: every turn feeds the whole rendered conversation from position 0 (the
/// cache rows it writes replace the old ones, rows past it are masked), so the calls are swift-transformers' own.
/// The prompt is tokenized by swift-transformers' Tokenizers (the bundle's tokenizer.json and
/// tokenizer_config.json); generated ids are decoded by EdgepackBundleKit's `TokenPieces` + UTF-8 stream decoder.
/// Greedy decoding (the bundle's default, temperature 0).
///
/// Neural Engine mode shares one state between two functions loaded as two `MLModel`s; whether Core ML accepts a
/// state made by `decode` in `prefill` has not been verified on a device. If `prefill` refuses it, the engine says
/// so in its description and feeds the prompt through `decode` one token at a time instead.
final class CoreMLEngine: ChatEngine {
    enum Mode: String {
        case swiftTransformers  // `main`: inputIds + causalMask
        case neuralEngine  // `prefill` / `decode`: inputIds + position
    }

    static let main = "main", prefillName = "prefill", decodeName = "decode"
    static let inputIds = "inputIds", causalMask = "causalMask", position = "position", logits = "logits"
    static let stateNames: Set<String> = ["keyCache", "valueCache"]
    static let reexport = "re-export the bundle with the edgepack this app was written for (the swift-transformers layout)"

    private(set) var description: String
    private let bundle: EdgepackBundle
    private let mode: Mode
    /// `main`, or `decode` in Neural Engine mode (the function that makes the state).
    private let model: MLModel
    private var prefill: MLModel?
    private let prefillLength: Int
    private let tokenizer: any Tokenizer
    private let pieces: TokenPieces
    private let contextLength: Int
    private let cancel = CancelFlag()
    /// The KV cache of the current conversation (made on its first turn).
    private var state: MLState?

    init(bundle: EdgepackBundle, mode: Mode = .swiftTransformers) async throws {
        self.bundle = bundle
        self.mode = mode
        contextLength = bundle.contextLength
        let functions = try Self.functions(bundle.backend, mode: mode)
        let compiled = try await Self.compiled(bundle)
        switch mode {
        case .swiftTransformers:
            let units = Self.computeUnits(bundle.backend["compute_units"] as? String)
            let main = try await Self.load(compiled, function: nil, units: units)  // no name: the default, as swift-transformers
            try Self.check(main, Self.main, inputs: [Self.inputIds, Self.causalMask])
            model = main
            prefillLength = 0
            description = "Core ML \(Self.main) (swift-transformers layout, \(bundle.backend["compute_units"] as? String ?? "CPU_AND_GPU"))"
        case .neuralEngine:
            let decode = try await Self.load(compiled, function: Self.decodeName, units: .cpuAndNeuralEngine)
            try Self.check(decode, Self.decodeName, inputs: [Self.inputIds, Self.position])
            let chunk = functions[Self.prefillName] ?? 1
            var loaded: MLModel?
            if chunk > 1 {
                loaded = try await Self.load(compiled, function: Self.prefillName, units: .cpuAndNeuralEngine)
                try Self.check(loaded!, Self.prefillName, inputs: [Self.inputIds, Self.position])
            }
            model = decode
            prefill = loaded
            prefillLength = chunk
            description = "Core ML Neural Engine (\(loaded == nil ? "" : "\(Self.prefillName) \(chunk) + ")\(Self.decodeName))"
        }
        tokenizer = try await AutoTokenizer.from(modelFolder: bundle.folder)
        pieces = try TokenPieces(tokenizerJSON: try bundle.file(bundle.tokenizer.file))
    }

    func newReply(startInsideThink: Bool) -> ReplyStream {
        ReplyStream(tokenizer: bundle.tokenizer, pieces: pieces, startInsideThink: startInsideThink)
    }

    func newConversation() { state = nil }

    func stop() { cancel.set(true) }

    func generate(prompt: String, maxNewTokens: Int, reply start: ReplyStream,
                  onChunks: @escaping ([Chunk]) -> Void) async throws -> ReplyStats {
        cancel.set(false)
        var reply = start
        let started = DispatchTime.now().uptimeNanoseconds
        let ids = tokenizer.encode(text: prompt, addSpecialTokens: false)  // the text carries BOS itself
        guard ids.count + 1 <= contextLength else {
            throw BundleError("the conversation is \(ids.count) tokens but the bundle's context is \(contextLength)",
                              fix: "start a new chat, or re-export with a larger --max-context")
        }
        var clock = Throughput(start: started, promptTokens: ids.count)
        let primed = try feedPrompt(ids)
        var fed = primed.fed
        let state = primed.state
        var tokenCount = ids.count  // tokens in the cache
        while !reply.isDone && !cancel.isSet {
            let token = Self.argmax(fed.logits, row: fed.row, limit: pieces.vocabSize)
            let before = reply.tokens
            let chunks = reply.push(token: token)
            if reply.tokens > before { clock.token(at: DispatchTime.now().uptimeNanoseconds) }
            if !chunks.isEmpty { onChunks(chunks) }
            if reply.isDone || reply.tokens >= maxNewTokens || tokenCount >= contextLength { break }
            fed = try feed([token], from: tokenCount, state: state)
            tokenCount += 1
        }
        let tail = reply.finish()
        if !tail.isEmpty { onChunks(tail) }
        return ReplyStats(promptTokens: ids.count, generatedTokens: reply.tokens,
                          prefillTokensPerS: clock.prefillTokensPerS, decodeTokensPerS: clock.decodeTokensPerS,
                          stopReason: ReplyStats.stopReason(reply, maxNewTokens: maxNewTokens, cancelled: cancel.isSet))
    }

    /// The whole prompt from position 0 into the conversation's state (made now on its first turn).
    private func feedPrompt(_ ids: [Int]) throws -> (fed: Fed, state: MLState) {
        let current = state ?? model.makeState()
        state = current
        do {
            return (try feed(ids, from: 0, state: current), current)
        } catch {
            guard mode == .neuralEngine, prefill != nil else { throw error }
            prefill = nil  // see the type's note: one state across two functions
            description += " (\(Self.prefillName) refused the shared state: prompt fed token by token)"
            let fresh = model.makeState()
            state = fresh
            return (try feed(ids, from: 0, state: fresh), fresh)
        }
    }

    /// The logits of the last call and the row of its last real token.
    struct Fed {
        let logits: MLMultiArray
        let row: Int
    }

    /// Feed `tokens` at cache positions start..<start + tokens.count.
    private func feed(_ tokens: [Int], from start: Int, state: MLState) throws -> Fed {
        switch mode {
        case .swiftTransformers:
            // LanguageModelWithStatefulKVCache.predictNextTokenScores: inputIds = the new tokens, causalMask zeros
            // [1, 1, 1, tokenCount + 1] with tokenCount = every token so far, the new ones included.
            let mask = try Self.zeros([1, 1, 1, start + tokens.count + 1], .float16)
            let logits = try predict(model, tokens, [Self.causalMask: mask], state: state)
            return Fed(logits: logits, row: tokens.count - 1)
        case .neuralEngine:
            var i = 0
            var last: Fed?
            while i < tokens.count {
                let left = tokens.count - i
                // A chunk only where all of it (padding included) lies inside the cache.
                guard left > 1, let prefill, start + i + prefillLength <= contextLength else {
                    last = Fed(logits: try predict(model, [tokens[i]], try Self.positionInput(start + i), state: state), row: 0)
                    i += 1
                    continue
                }
                let part = min(prefillLength, left)
                let padded = Array(tokens[i..<(i + part)]) + Array(repeating: 0, count: prefillLength - part)
                last = Fed(logits: try predict(prefill, padded, try Self.positionInput(start + i), state: state), row: part - 1)
                i += part
            }
            return last!
        }
    }

    /// One call of `function` with `inputIds` = tokens (int32 [1, T]) and the other inputs; returns its logits.
    private func predict(_ function: MLModel, _ tokens: [Int], _ others: [String: MLMultiArray],
                         state: MLState) throws -> MLMultiArray {
        let ids = try MLMultiArray(shape: [1, NSNumber(value: tokens.count)], dataType: .int32)
        ids.withUnsafeMutableBufferPointer(ofType: Int32.self) { buffer, strides in
            for (i, token) in tokens.enumerated() { buffer[i * strides[1].intValue] = Int32(token) }
        }
        var features: [String: Any] = [Self.inputIds: ids]
        for (name, value) in others { features[name] = value }
        let input = try MLDictionaryFeatureProvider(dictionary: features)
        let output = try function.prediction(from: input, using: state, options: MLPredictionOptions())
        guard let logits = output.featureValue(for: Self.logits)?.multiArrayValue else {
            throw BundleError("the Core ML model returned no \(Self.logits)", fix: Self.reexport)
        }
        return logits
    }

    private static func positionInput(_ value: Int) throws -> [String: MLMultiArray] {
        let array = try MLMultiArray(shape: [1], dataType: .int32)
        array[0] = NSNumber(value: value)
        return [Self.position: array]
    }

    /// A zero-filled array (MLMultiArray's own memory is not promised to be zeroed).
    private static func zeros(_ shape: [Int], _ type: MLMultiArrayDataType) throws -> MLMultiArray {
        let array = try MLMultiArray(shape: shape.map { NSNumber(value: $0) }, dataType: type)
        array.withUnsafeMutableBytes { bytes, _ in
            if let base = bytes.baseAddress { memset(base, 0, bytes.count) }
        }
        return array
    }

    /// Greedy pick over one row of logits [1, T, vocab], among ids the tokenizer has text for.
    static func argmax(_ logits: MLMultiArray, row: Int, limit: Int) -> Int {
        let vocab = min(logits.shape[2].intValue, limit)
        let base = row * logits.strides[1].intValue
        let step = logits.strides[2].intValue
        var best = 0
        var bestValue = -Float.infinity
        func consider(_ id: Int, _ value: Float) {
            if value > bestValue { best = id; bestValue = value }
        }
        switch logits.dataType {
        case .float32:
            logits.withUnsafeBufferPointer(ofType: Float.self) { p in
                for v in 0..<vocab { consider(v, p[base + v * step]) }
            }
        #if arch(arm64)
        case .float16:
            logits.withUnsafeBufferPointer(ofType: Float16.self) { p in
                for v in 0..<vocab { consider(v, Float(p[base + v * step])) }
            }
        #endif
        default:
            for v in 0..<vocab { consider(v, logits[base + v * step].floatValue) }
        }
        return best
    }

    // MARK: loading

    /// The manifest's `backend.functions`, refusing a bundle whose layout this mode cannot drive (an older
    /// export with `input_ids` and per-layer states, or one without the Neural Engine functions).
    private static func functions(_ backend: [String: Any], mode: Mode) throws -> [String: Int] {
        let functions = backend["functions"] as? [String: Int] ?? [:]
        let names = functions.keys.sorted()
        switch mode {
        case .swiftTransformers:
            let inputs = Set((backend["inputs"] as? [String: Any] ?? [:]).keys)
            guard functions[main] != nil, inputs == [inputIds, causalMask] else {
                throw BundleError("this Core ML bundle has no '\(main)' function taking \(inputIds) and \(causalMask) (functions \(names), inputs \(inputs.sorted())): it predates the swift-transformers layout",
                                  fix: reexport)
            }
        case .neuralEngine:
            let ane = backend["ane_functions"] as? [String: Any] ?? [:]
            let inputs = Set((ane["inputs"] as? [String: Any] ?? [:]).keys)
            guard functions[decodeName] == 1, inputs == [inputIds, position] else {
                throw BundleError("this Core ML bundle has no '\(decodeName)' function taking \(inputIds) and \(position) (functions \(names)), so it cannot run on the Neural Engine this way",
                                  fix: "turn off the Neural Engine setting, or \(reexport)")
            }
        }
        return functions
    }

    /// The loaded function has the inputs, states and output the manifest promised.
    private static func check(_ model: MLModel, _ function: String, inputs: Set<String>) throws {
        let description = model.modelDescription
        let found = Set(description.inputDescriptionsByName.keys)
        let states = Set(description.stateDescriptionsByName.keys)
        guard found == inputs, stateNames.isSubset(of: states), description.outputDescriptionsByName[logits] != nil else {
            throw BundleError("the package's function '\(function)' takes \(found.sorted()) with states \(states.sorted()); this app drives \(inputs.sorted()) with states \(stateNames.sorted()) and output \(logits)",
                              fix: reexport)
        }
    }

    /// `function` nil: the package's default function (`main`), as swift-transformers loads it.
    private static func load(_ compiled: URL, function: String?, units: MLComputeUnits) async throws -> MLModel {
        let config = MLModelConfiguration()
        if let function { config.functionName = function }
        config.computeUnits = units
        return try await MLModel.load(contentsOf: compiled, configuration: config)
    }

    /// The manifest's `backend.compute_units` for `main`; swift-transformers' default (`.cpuAndGPU`) otherwise.
    private static func computeUnits(_ name: String?) -> MLComputeUnits {
        switch name {
        case "CPU_ONLY": return .cpuOnly
        case "CPU_AND_NE": return .cpuAndNeuralEngine
        case "ALL": return .all
        default: return .cpuAndGPU
        }
    }

    /// The package compiled once per bundle (keyed by its manifest), kept in Caches.
    private static func compiled(_ bundle: EdgepackBundle) async throws -> URL {
        let manifest = try Data(contentsOf: bundle.folder.appendingPathComponent(EdgepackBundle.manifestName))
        let key = SHA256.hash(data: manifest).prefix(8).map { String(format: "%02x", $0) }.joined()
        let caches = try FileManager.default.url(for: .cachesDirectory, in: .userDomainMask, appropriateFor: nil, create: true)
        let target = caches.appendingPathComponent("edgepack-\(key).mlmodelc")
        if FileManager.default.fileExists(atPath: target.path) { return target }
        let built = try await MLModel.compileModel(at: try bundle.program())
        try? FileManager.default.removeItem(at: target)
        try FileManager.default.moveItem(at: built, to: target)
        return target
    }
}
