import CoreML
import CryptoKit
import EdgepackBundleKit
import Foundation
import Tokenizers

/// Core ML bundles (`edgepack export --target iphone-16-pro`): one multifunction model.mlpackage with `prefill`
/// (a fixed chunk of tokens) and `decode` (one token), inputs `input_ids` int32 [1, T] and `position` int32 [1]
/// (cache position of the first token), output `logits` fp16 [1, T, vocab], the KV cache in Core ML state
/// (`k_cache_i` / `v_cache_i`), as exporters/coreml.py writes it and runtime/coreml_backend.py drives it: a
/// chunk shorter than the prefill length is padded (padded positions are rewritten before anything reads them).
///
/// The prompt is tokenized by swift-transformers' Tokenizers (the bundle's tokenizer.json and
/// tokenizer_config.json); generated ids are decoded by EdgepackBundleKit's `TokenPieces` + UTF-8 stream
/// decoder. Greedy decoding (the bundle's default, temperature 0).
///
/// One state serves both functions, as edgepack's Python backend assumes; whether Core ML accepts a state made
/// by one function in the other has not been verified on a device. If the `prefill` call refuses it, the engine
/// says so in its description and feeds the prompt through `decode` one token at a time instead.
final class CoreMLEngine: ChatEngine {
    private(set) var description: String
    private let bundle: EdgepackBundle
    private let decode: MLModel
    private var prefill: MLModel?
    private let prefillLength: Int
    private let tokenizer: any Tokenizer
    private let pieces: TokenPieces
    private let contextLength: Int
    private let cancel = CancelFlag()

    init(bundle: EdgepackBundle) async throws {
        let inputs = Set((bundle.backend["inputs"] as? [String: Any] ?? [:]).keys)
        guard inputs == ["input_ids", "position"] else {
            throw BundleError("this app drives Core ML bundles whose inputs are input_ids and position; this one's are \(inputs.sorted())",
                              fix: "update the app, or re-export the bundle with the edgepack version this app was written for")
        }
        self.bundle = bundle
        contextLength = bundle.contextLength
        let functions = bundle.backend["functions"] as? [String: Int] ?? ["decode": 1]
        prefillLength = functions["prefill"] ?? 1
        let compiled = try await Self.compiled(bundle)
        let units = Self.computeUnits(bundle.backend["compute_units"] as? String)
        decode = try await Self.load(compiled, function: "decode", units: units)
        prefill = prefillLength > 1 ? try await Self.load(compiled, function: "prefill", units: units) : nil
        tokenizer = try await AutoTokenizer.from(modelFolder: bundle.folder)
        pieces = try TokenPieces(tokenizerJSON: try bundle.file(bundle.tokenizer.file))
        description = "Core ML (\(bundle.backend["compute_units"] as? String ?? "ALL")), prefill \(prefillLength) + decode"
    }

    func newReply(startInsideThink: Bool) -> ReplyStream {
        ReplyStream(tokenizer: bundle.tokenizer, pieces: pieces, startInsideThink: startInsideThink)
    }

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
        var state = decode.makeState()
        var fed: (logits: MLMultiArray, row: Int)
        do {
            fed = try feed(ids, from: 0, state: state)
        } catch {
            guard prefill != nil else { throw error }
            prefill = nil  // see the type's note: one state across two functions
            description += " (prefill function refused the shared state: prompt fed token by token)"
            state = decode.makeState()
            fed = try feed(ids, from: 0, state: state)
        }
        var position = ids.count
        while !reply.isDone && !cancel.isSet {
            let token = Self.argmax(fed.logits, row: fed.row, limit: pieces.vocabSize)
            let before = reply.tokens
            let chunks = reply.push(token: token)
            if reply.tokens > before { clock.token(at: DispatchTime.now().uptimeNanoseconds) }
            if !chunks.isEmpty { onChunks(chunks) }
            if reply.isDone || reply.tokens >= maxNewTokens || position >= contextLength { break }
            fed = try feed([token], from: position, state: state)
            position += 1
        }
        let tail = reply.finish()
        if !tail.isEmpty { onChunks(tail) }
        return ReplyStats(promptTokens: ids.count, generatedTokens: reply.tokens,
                          prefillTokensPerS: clock.prefillTokensPerS, decodeTokensPerS: clock.decodeTokensPerS,
                          stopReason: ReplyStats.stopReason(reply, maxNewTokens: maxNewTokens, cancelled: cancel.isSet))
    }

    /// Feed tokens at positions start...; returns the logits and the row of the last real token.
    private func feed(_ tokens: [Int], from start: Int, state: MLState) throws -> (logits: MLMultiArray, row: Int) {
        var i = 0
        var last: (MLMultiArray, Int)?
        while i < tokens.count {
            let left = tokens.count - i
            guard left > 1, let prefill else {
                last = (try predict(decode, [tokens[i]], position: start + i, state: state), 0)
                i += 1
                continue
            }
            let part = min(prefillLength, left)
            let padded = Array(tokens[i..<(i + part)]) + Array(repeating: 0, count: prefillLength - part)
            last = (try predict(prefill, padded, position: start + i, state: state), part - 1)
            i += part
        }
        return last!
    }

    private func predict(_ model: MLModel, _ tokens: [Int], position: Int, state: MLState) throws -> MLMultiArray {
        let ids = try MLMultiArray(shape: [1, NSNumber(value: tokens.count)], dataType: .int32)
        ids.withUnsafeMutableBufferPointer(ofType: Int32.self) { buffer, _ in
            for (i, token) in tokens.enumerated() { buffer[i] = Int32(token) }
        }
        let pos = try MLMultiArray(shape: [1], dataType: .int32)
        pos[0] = NSNumber(value: position)
        let input = try MLDictionaryFeatureProvider(dictionary: ["input_ids": ids, "position": pos])
        let output = try model.prediction(from: input, using: state, options: MLPredictionOptions())
        guard let logits = output.featureValue(for: "logits")?.multiArrayValue else {
            throw BundleError("the Core ML model returned no logits", fix: BundleError.reexport)
        }
        return logits
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

    private static func load(_ compiled: URL, function: String, units: MLComputeUnits) async throws -> MLModel {
        let config = MLModelConfiguration()
        config.functionName = function
        config.computeUnits = units
        return try await MLModel.load(contentsOf: compiled, configuration: config)
    }

    private static func computeUnits(_ name: String?) -> MLComputeUnits {
        switch name {
        case "CPU_ONLY": return .cpuOnly
        case "CPU_AND_GPU": return .cpuAndGPU
        case "CPU_AND_NE": return .cpuAndNeuralEngine
        default: return .all
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
