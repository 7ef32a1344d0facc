/// The few Python string rules the bundle format leans on, on Unicode scalars (Python indexes code points;
/// Swift's `String` compares grapheme clusters under canonical equivalence, which Python does not).
enum PyText {
    /// Python's `str.isspace` for one scalar: the White_Space property plus U+001C...U+001F (bidi B/S).
    static func isSpace(_ s: Unicode.Scalar) -> Bool {
        s.properties.isWhitespace || (0x1C...0x1F).contains(s.value)
    }

    static func lstrip(_ s: [Unicode.Scalar]) -> [Unicode.Scalar] {
        Array(s.drop(while: isSpace))
    }

    static func rstrip(_ s: [Unicode.Scalar]) -> [Unicode.Scalar] {
        var end = s.count
        while end > 0 && isSpace(s[end - 1]) { end -= 1 }
        return Array(s[..<end])
    }

    static func strip(_ text: String) -> String { string(lstrip(rstrip(scalars(text)))) }

    /// Python's `str.isprintable`.
    static func isPrintable(_ text: String) -> Bool {
        text.unicodeScalars.allSatisfy { s in
            if s == " " { return true }
            switch s.properties.generalCategory {
            case .control, .format, .surrogate, .privateUse, .unassigned, .lineSeparator, .paragraphSeparator,
                 .spaceSeparator:
                return false
            default:
                return true
            }
        }
    }

    static func scalars(_ text: String) -> [Unicode.Scalar] { Array(text.unicodeScalars) }

    static func string(_ scalars: some Sequence<Unicode.Scalar>) -> String {
        var view = String.UnicodeScalarView()
        view.append(contentsOf: scalars)
        return String(view)
    }

    /// Index of the first occurrence of `pattern` in `text` (scalar by scalar), or nil.
    static func find(_ text: [Unicode.Scalar], _ pattern: [Unicode.Scalar]) -> Int? {
        guard !pattern.isEmpty, pattern.count <= text.count else { return pattern.isEmpty ? 0 : nil }
        for i in 0...(text.count - pattern.count) where text[i] == pattern[0] {
            if Array(text[i..<(i + pattern.count)]) == pattern { return i }
        }
        return nil
    }

    /// Length of the longest suffix of `text` that is a proper prefix of `pattern`.
    static func overlap(_ text: [Unicode.Scalar], _ pattern: [Unicode.Scalar]) -> Int {
        var n = min(text.count, pattern.count - 1)
        while n > 0 {
            if Array(text[(text.count - n)...]) == Array(pattern[..<n]) { return n }
            n -= 1
        }
        return 0
    }

    static func hasSuffix(_ text: [Unicode.Scalar], _ suffix: [Unicode.Scalar]) -> Bool {
        suffix.count <= text.count && Array(text[(text.count - suffix.count)...]) == suffix
    }
}
