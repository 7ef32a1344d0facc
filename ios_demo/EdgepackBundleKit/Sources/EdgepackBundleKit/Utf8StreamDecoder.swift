/// Byte pieces in (one token's bytes each), complete characters out. A byte-level BPE token can hold part of a
/// multi-byte character (東 = e6 9d b1 may arrive as " e6", "9d", "b1"): a trailing sequence that is a valid
/// start of a character is held back until it completes. Invalid bytes become U+FFFD (the standard library's
/// decoder, maximal-subpart replacement); `finish()` turns a character the stream ended in into U+FFFD.
public struct Utf8StreamDecoder {
    private var pending: [UInt8] = []

    public init() {}

    public mutating func push(_ piece: [UInt8]) -> String {
        pending += piece
        let keep = Self.incompleteTail(pending)
        let ready = Array(pending[..<(pending.count - keep)])
        pending = Array(pending[(pending.count - keep)...])
        return String(decoding: ready, as: UTF8.self)
    }

    public mutating func finish() -> String {
        defer { pending = [] }
        return String(decoding: pending, as: UTF8.self)
    }

    /// Length of the trailing bytes that begin a character without completing it (0 if none).
    static func incompleteTail(_ bytes: [UInt8]) -> Int {
        let n = bytes.count
        for back in 1...min(3, max(n, 1)) where n >= back {
            let lead = bytes[n - back]
            let need: Int
            switch lead {
            case 0xC2...0xDF: need = 2
            case 0xE0...0xEF: need = 3
            case 0xF0...0xF4: need = 4
            case 0x80...0xBF: continue  // a continuation byte: look further back for the lead
            default: return 0
            }
            guard back < need else { return 0 }  // the sequence is complete (or malformed): decode it
            let rest = bytes[(n - back + 1)...]
            guard rest.allSatisfy({ (0x80...0xBF).contains($0) }) else { return 0 }
            if let second = rest.first {
                let valid: ClosedRange<UInt8>
                switch lead {
                case 0xE0: valid = 0xA0...0xBF
                case 0xED: valid = 0x80...0x9F
                case 0xF0: valid = 0x90...0xBF
                case 0xF4: valid = 0x80...0x8F
                default: valid = 0x80...0xBF
                }
                guard valid.contains(second) else { return 0 }
            }
            return back
        }
        return 0
    }
}
