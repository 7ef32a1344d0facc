import CryptoKit
import EdgepackBundleKit
import XCTest

/// The golden vectors edgepack's `python -m pytest tests/test_demo_vectors.py` writes to build/app-vectors
/// (or $EDGEPACK_VECTORS): the same cases android_demo/bundlekit's JUnit tests run. Missing vectors fail.
final class VectorTests: XCTestCase {
    static let folder: URL = {
        if let given = ProcessInfo.processInfo.environment["EDGEPACK_VECTORS"], !given.isEmpty {
            return URL(fileURLWithPath: given)
        }
        // .../ios_demo/EdgepackBundleKit/Tests/EdgepackBundleKitTests/VectorTests.swift: the repository root is 5 up.
        var url = URL(fileURLWithPath: #filePath)
        for _ in 0..<5 { url.deleteLastPathComponent() }
        return url.appendingPathComponent("build/app-vectors")
    }()

    static func vectors() throws -> [String: Any] {
        let file = folder.appendingPathComponent("vectors.json")
        guard FileManager.default.fileExists(atPath: file.path) else {
            throw BundleError("no golden vectors at \(file.path)",
                              fix: "run `python -m pytest tests/test_demo_vectors.py` from the repository root first")
        }
        let json = try JSONSerialization.jsonObject(with: Data(contentsOf: file)) as! [String: Any]
        XCTAssertEqual(json["format"] as? Int, 1)
        return json
    }

    static func cases(_ key: String) throws -> [[String: Any]] {
        let cases = try vectors()[key] as? [[String: Any]] ?? []
        if cases.isEmpty { throw BundleError("vectors.json has no \(key) cases", fix: "regenerate the vectors") }
        return cases
    }

    static var bundleURL: URL { get throws { folder.appendingPathComponent(try vectors()["bundle"] as! String) } }

    static func chunks(_ value: Any?) -> [Chunk] {
        (value as? [[String]] ?? []).map { Chunk(Chunk.Kind(rawValue: $0[0])!, $0[1]) }
    }

    static func runs(_ chunks: [Chunk]) -> [Chunk] {
        var out: [Chunk] = []
        for c in chunks {
            if let last = out.last, last.kind == c.kind {
                out[out.count - 1] = Chunk(c.kind, last.text + c.text)
            } else {
                out.append(c)
            }
        }
        return out
    }

    static func joined(_ chunks: [Chunk], _ kind: Chunk.Kind) -> String {
        chunks.filter { $0.kind == kind }.map(\.text).joined()
    }

    static func hex(_ text: String) -> [UInt8] {
        stride(from: 0, to: text.count, by: 2).map { i in
            let start = text.index(text.startIndex, offsetBy: i)
            return UInt8(text[start..<text.index(start, offsetBy: 2)], radix: 16)!
        }
    }

    func testTheExportedBundleOpensWithItsChecksums() throws {
        let bundle = try EdgepackBundle.open(Self.bundleURL)
        XCTAssertEqual(bundle.backendName, "onnx")
        XCTAssertEqual(bundle.contextLength, 256)
        XCTAssertTrue(bundle.tokenizer.isEndID(2))
        XCTAssertEqual(bundle.tokenizer.stopTexts, ["<|im_end|>"])
        XCTAssertEqual(try bundle.program().lastPathComponent, "model.onnx")
    }

    func testEveryHostileCopyIsRefused() throws {
        for c in try Self.cases("refused") {
            let folder = Self.folder.appendingPathComponent(c["folder"] as! String)
            let reason = c["reason"] as! String
            XCTAssertThrowsError(try EdgepackBundle.open(folder), c["name"] as! String) { error in
                XCTAssertTrue((error as? BundleError)?.message.contains(reason) == true, "\(error) should say \(reason)")
            }
        }
    }

    func testTheVocabularyDecodesToTheTokenizersBytesIdById() throws {
        let vocab = try TokenPieces(tokenizerJSON: Self.bundleURL.appendingPathComponent("tokenizer.json"))
        let vectors = try Self.vectors()
        XCTAssertEqual(vocab.vocabSize, vectors["vocab_size"] as? Int)
        var hasher = SHA256()
        for id in 0..<vocab.vocabSize {
            let piece = vocab.bytes(id)!
            let n = UInt32(piece.count).bigEndian
            withUnsafeBytes(of: n) { hasher.update(bufferPointer: $0) }
            hasher.update(data: Data(piece))
        }
        XCTAssertEqual(hasher.finalize().map { String(format: "%02x", $0) }.joined(), vectors["vocab_digest"] as? String)
    }

    func testEveryConversationRendersAsTheRuntimeRendersIt() throws {
        let bundleFormat = try EdgepackBundle.open(Self.bundleURL, checkHashes: false).chatFormat()
        let formats = try Self.vectors()["chat_formats"] as! [String: Any]
        for c in try Self.cases("chat") {
            let name = c["format"] as! String
            if let error = c["error"] as? String {
                XCTAssertThrowsError(try ChatFormat(json: formats[name])) { e in
                    XCTAssertTrue((e as? BundleError)?.message.contains(error) == true, "\(e)")
                }
                continue
            }
            let format = name == "bundle" ? bundleFormat : try ChatFormat(json: formats[name])
            let messages = (c["messages"] as! [[String: String]]).map { Message(role: $0["role"]!, content: $0["content"]!) }
            let prompt = try format.render(messages, addGenerationPrompt: c["add_generation_prompt"] as! Bool)
            XCTAssertEqual(prompt, c["prompt"] as? String, name)
            XCTAssertEqual(ChatFormat.endsInsideThink(prompt, thinkStart: "<think>"), c["inside_think"] as? Bool, name)
        }
    }

    func testBytePiecesDecodeAsTheVectorsSay() throws {
        let vocab = try TokenPieces(tokenizerJSON: Self.bundleURL.appendingPathComponent("tokenizer.json"))
        for c in try Self.cases("streaming") {
            let hex = c["pieces_hex"] as! [String]
            if let ids = c["ids"] as? [Int] {
                for (id, piece) in zip(ids, hex) { XCTAssertEqual(vocab.bytes(id), Self.hex(piece), "token \(id)") }
            }
            var decoder = Utf8StreamDecoder()
            var emitted = hex.map { decoder.push(Self.hex($0)) }
            emitted.append(decoder.finish())
            XCTAssertEqual(emitted, c["emitted"] as? [String], c["name"] as! String)
            XCTAssertEqual(emitted.joined(), c["text"] as? String)
        }
    }

    func testThinkTextIsShownApartFromTheAnswer() throws {
        for c in try Self.cases("think") {
            let tags = c["tags"] as! [String]
            var splitter = ThinkSplitter(start: tags[0], end: tags[1], inside: c["inside"] as! Bool)
            var chunks = (c["feeds"] as! [String]).flatMap { splitter.feed($0) }
            chunks += splitter.flush()
            XCTAssertEqual(chunks, Self.chunks(c["chunks"]), c["name"] as! String)
        }
    }

    func testRunnerTextStopsOnEndTextsAndStopStrings() throws {
        for c in try Self.cases("stop") {
            let info = TokenizerInfo(endIDs: [2], stopTexts: c["stop_texts"] as! [String])
            var reply = ReplyStream(tokenizer: info, pieces: nil, stopStrings: c["stop_strings"] as! [String],
                                    startInsideThink: false)
            var chunks: [Chunk] = []
            for piece in c["pieces"] as! [String] where !reply.isDone { chunks += reply.push(text: piece) }
            chunks += reply.finish()
            XCTAssertEqual(Self.joined(chunks, .answer), c["text"] as? String, c["name"] as! String)
            XCTAssertEqual(reply.stopReason?.rawValue, c["stop_reason"] as? String, c["name"] as! String)
        }
    }

    func testGeneratedIdsStreamAsTheRuntimeStreamedThem() throws {
        let bundle = try EdgepackBundle.open(Self.bundleURL, checkHashes: false)
        let vocab = try TokenPieces(tokenizerJSON: try bundle.file(bundle.tokenizer.file))
        for c in try Self.cases("replies") {
            var reply = ReplyStream(tokenizer: bundle.tokenizer, pieces: vocab, stopStrings: c["stop_strings"] as! [String],
                                    startInsideThink: c["inside_think"] as! Bool)
            var chunks: [Chunk] = []
            for id in c["ids"] as! [Int] where !reply.isDone { chunks += reply.push(token: id) }
            chunks += reply.finish()
            XCTAssertEqual(Self.runs(chunks), Self.chunks(c["chunks"]), c["name"] as! String)
            XCTAssertEqual(reply.stopReason?.rawValue, c["stop_reason"] as? String, c["name"] as! String)
        }
    }
}
