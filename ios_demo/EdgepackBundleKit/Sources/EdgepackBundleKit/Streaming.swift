/// A piece of streamed reply text: reasoning (inside the think tags) or the answer.
public struct Chunk: Equatable {
    public enum Kind: String { case answer, thinking }
    public let kind: Kind
    public let text: String

    public init(_ kind: Kind, _ text: String) {
        self.kind = kind
        self.text = text
    }
}

/// Cuts a text stream before the first stop string, holding back text that may begin one (a stop string can
/// arrive split over tokens). Mirrors runtime/session.py's StopStringMatcher, on Unicode scalars as Python does.
public struct StopStringMatcher {
    let stops: [[Unicode.Scalar]]
    var pending: [Unicode.Scalar] = []
    public private(set) var stopped = false

    public init(_ stopStrings: [String]) {
        stops = stopStrings.filter { !$0.isEmpty }.map(PyText.scalars)
    }

    public mutating func feed(_ text: String) -> String {
        if stopped { return "" }
        pending += text.unicodeScalars
        if let first = stops.compactMap({ PyText.find(pending, $0) }).min() {
            stopped = true
            defer { pending = [] }
            return PyText.string(pending[..<first])
        }
        let hold = stops.map { PyText.overlap(pending, $0) }.max() ?? 0
        let out = PyText.string(pending[..<(pending.count - hold)])
        pending = Array(pending[(pending.count - hold)...])
        return out
    }

    public mutating func flush() -> String {
        defer { pending = [] }
        return stopped ? "" : PyText.string(pending)
    }
}

/// Splits streamed text at the think tags into thinking and answer chunks; the tags are not shown. A tag may
/// arrive split over tokens (a tail that could begin one is held back); whitespace right after a tag is dropped.
/// Mirrors runtime/session.py's ThinkSplitter, Python's whitespace rules included.
public struct ThinkSplitter {
    let start: [Unicode.Scalar]
    let end: [Unicode.Scalar]
    var inside: Bool
    var afterTag: Bool
    var buf: [Unicode.Scalar] = []

    public init(start: String, end: String, inside: Bool) {
        self.start = PyText.scalars(start)
        self.end = PyText.scalars(end)
        self.inside = inside
        self.afterTag = inside
    }

    public mutating func feed(_ text: String) -> [Chunk] {
        buf += text.unicodeScalars
        var out: [Chunk] = []
        while !buf.isEmpty {
            if afterTag {
                buf = PyText.lstrip(buf)
                if buf.isEmpty { break }
                afterTag = false
            }
            let tag = inside ? end : start
            if let at = PyText.find(buf, tag) {
                emit(&out, buf[..<at])
                buf = Array(buf[(at + tag.count)...])
                inside.toggle()
                afterTag = true
                continue
            }
            let hold = PyText.overlap(buf, tag)
            emit(&out, buf[..<(buf.count - hold)])
            buf = Array(buf[(buf.count - hold)...])
            break
        }
        return out
    }

    public mutating func flush() -> [Chunk] {
        var out: [Chunk] = []
        emit(&out, buf[...])
        buf = []
        return out
    }

    private func emit(_ out: inout [Chunk], _ scalars: ArraySlice<Unicode.Scalar>) {
        if !scalars.isEmpty { out.append(Chunk(inside ? .thinking : .answer, PyText.string(scalars))) }
    }
}

/// One streamed reply, as edgepack's runtime streams it: token -> UTF-8-safe text -> stop strings -> think
/// split. `push(token:)` for runtimes that hand out ids (Core ML; an end id ends the reply, never shown);
/// `push(text:)` for runners that hand out text (ExecuTorch's; a piece equal to an end token's text ends the
/// reply). When `isDone` turns true the app stops the runtime; at the end of the stream call `finish()`.
public struct ReplyStream {
    public enum StopReason: String { case eos, stopString = "stop_string" }

    let tokenizer: TokenizerInfo
    let pieces: TokenPieces?
    var utf8 = Utf8StreamDecoder()
    var matcher: StopStringMatcher
    var splitter: ThinkSplitter
    public private(set) var stopReason: StopReason?
    public private(set) var isDone = false
    /// Tokens (or text pieces) shown so far; an end token is not counted.
    public private(set) var tokens = 0

    public init(tokenizer: TokenizerInfo, pieces: TokenPieces?, stopStrings: [String] = [], startInsideThink: Bool) {
        self.tokenizer = tokenizer
        self.pieces = pieces
        matcher = StopStringMatcher(stopStrings)
        splitter = ThinkSplitter(start: tokenizer.thinkStart, end: tokenizer.thinkEnd, inside: startInsideThink)
    }

    public mutating func push(token id: Int) -> [Chunk] {
        if isDone { return [] }
        if tokenizer.isEndID(id) {
            stopReason = .eos
            return end()
        }
        guard let bytes = pieces?.bytes(id) else {
            preconditionFailure("push(token:) needs the bundle's TokenPieces and an id inside its vocabulary")
        }
        tokens += 1
        return show(utf8.push(bytes))
    }

    public mutating func push(text piece: String) -> [Chunk] {
        if isDone { return [] }
        if tokenizer.stopTexts.contains(piece) {
            stopReason = .eos
            return end()
        }
        tokens += 1
        return show(piece)
    }

    /// The stream ended (token budget, context full, the runtime returned): what was held back.
    public mutating func finish() -> [Chunk] { isDone ? [] : end() }

    private mutating func show(_ text: String) -> [Chunk] {
        var out = splitter.feed(matcher.feed(text))
        if matcher.stopped {
            stopReason = .stopString
            isDone = true
            out += splitter.flush()
        }
        return out
    }

    private mutating func end() -> [Chunk] {
        var out: [Chunk] = []
        if !matcher.stopped {
            let tail = matcher.feed(utf8.finish())
            if matcher.stopped { stopReason = .stopString }
            out += splitter.feed(tail + matcher.flush())
        }
        out += splitter.flush()
        isDone = true
        return out
    }
}

/// Tokens per second as `edgepack run` reports them (pass `DispatchTime.now().uptimeNanoseconds`).
public struct Throughput {
    let start: UInt64
    let promptTokens: Int
    var first: UInt64?
    var last: UInt64 = 0
    public private(set) var tokens = 0

    public init(start: UInt64, promptTokens: Int) {
        self.start = start
        self.promptTokens = promptTokens
    }

    public mutating func token(at nanos: UInt64) {
        if first == nil { first = nanos }
        last = nanos
        tokens += 1
    }

    public var prefillTokensPerS: Double {
        guard let first, first > start, promptTokens > 0 else { return .nan }
        return Double(promptTokens) / (Double(first - start) / 1e9)
    }

    public var decodeTokensPerS: Double {
        guard let first, tokens >= 2, last > first else { return .nan }
        return Double(tokens - 1) / (Double(last - first) / 1e9)
    }
}
