import Foundation

/// Each token id's bytes, read from the bundle's tokenizer.json, for a runtime that hands the app token ids
/// (a Core ML model): decode them with a `Utf8StreamDecoder`. Byte-level BPE (SmolLM2, Qwen2, Llama 3) stores
/// each byte as one printable character (GPT-2's table); a token with a character outside it is its own UTF-8,
/// as Hugging Face's ByteLevel decoder does; special tokens are empty (edgepack skips them when it streams).
public struct TokenPieces {
    let pieces: [[UInt8]]

    public init(tokenizerJSON url: URL) throws {
        let data = try Data(contentsOf: url)
        guard let json = try JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            throw BundleError("the tokenizer \(url.path) is not a JSON object", fix: BundleError.reexport)
        }
        try self.init(json: json, where: url.path)
    }

    init(json: [String: Any], where place: String) throws {
        var decoder = json["decoder"] as? [String: Any]
        if decoder?["type"] as? String == "Sequence", let inner = decoder?["decoders"] as? [[String: Any]], inner.count == 1 {
            decoder = inner[0]
        }
        let type = decoder?["type"] as? String ?? "none"
        guard type == "ByteLevel" else {
            throw BundleError("the tokenizer \(place) decodes with \(type), not byte-level BPE",
                              fix: "decode token ids with the runtime's own tokenizer for this model")
        }
        guard let vocab = (json["model"] as? [String: Any])?["vocab"] as? [String: Int] else {
            throw BundleError("the tokenizer \(place) has no BPE vocabulary", fix: BundleError.reexport)
        }
        var texts: [Int: String] = [:]
        for (text, id) in vocab { texts[id] = text }
        var special = Set<Int>()
        for added in json["added_tokens"] as? [[String: Any]] ?? [] {
            guard let id = added["id"] as? Int, let content = added["content"] as? String else { continue }
            texts[id] = content
            if added["special"] as? Bool == true { special.insert(id) }
        }
        let size = (texts.keys.max() ?? -1) + 1
        let table = Self.byteTable
        pieces = (0..<size).map { id in
            guard let text = texts[id], !special.contains(id) else { return [] }
            var bytes: [UInt8] = []
            for scalar in text.unicodeScalars {
                guard let b = table[scalar.value] else { return Array(text.utf8) }
                bytes.append(b)
            }
            return bytes
        }
    }

    public var vocabSize: Int { pieces.count }

    /// The bytes of token `id`; empty for a special token or an id without a token; nil outside the vocabulary.
    public func bytes(_ id: Int) -> [UInt8]? { pieces.indices.contains(id) ? pieces[id] : nil }

    /// GPT-2's table of the 256 bytes as printable characters, inverted (character -> byte).
    static let byteTable: [UInt32: UInt8] = {
        var table: [UInt32: UInt8] = [:]
        var extra: UInt32 = 0
        for b in 0...255 {
            let direct = (33...126).contains(b) || (0xA1...0xAC).contains(b) || (0xAE...0xFF).contains(b)
            table[direct ? UInt32(b) : 256 + extra] = UInt8(b)
            if !direct { extra += 1 }
        }
        return table
    }()
}
