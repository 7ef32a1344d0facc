import Foundation

/// The manifest's `tokenizer` section: which ids end a reply, the end tokens' texts (ExecuTorch's LLM runner
/// passes the end token's text to the token callback before it stops: an app drops it), the think tags and the
/// chat format.
public struct TokenizerInfo {
    public let file: String
    public let bosID: Int?
    public let addBOS: Bool
    public let endIDs: Set<Int>
    public let stopTexts: [String]
    public let thinkStart: String
    public let thinkEnd: String
    let chatFormatJSON: Any?

    public init(file: String = "tokenizer.json", bosID: Int? = nil, addBOS: Bool = false, endIDs: Set<Int>,
                stopTexts: [String], thinkStart: String = "<think>", thinkEnd: String = "</think>") {
        self.file = file
        self.bosID = bosID
        self.addBOS = addBOS
        self.endIDs = endIDs
        self.stopTexts = stopTexts
        self.thinkStart = thinkStart
        self.thinkEnd = thinkEnd
        self.chatFormatJSON = nil
    }

    init(manifest: [String: Any]) throws {
        guard let tok = manifest["tokenizer"] as? [String: Any], let file = tok["file"] as? String else {
            throw BundleError("\(EdgepackBundle.manifestName): the tokenizer section or its file is missing",
                              fix: BundleError.reexport)
        }
        let ids = { (key: String) in (tok[key] as? [Any] ?? []).compactMap { EdgepackBundle.wholeNumber($0) } }
        let end = Set(ids("eos_ids") + ids("stop_ids"))
        guard !end.isEmpty else {
            throw BundleError("\(EdgepackBundle.manifestName) tokenizer lists no end-of-reply ids (eos_ids, stop_ids)",
                              fix: BundleError.reexport)
        }
        let think = tok["think"] as? [String: Any]
        self.file = file
        bosID = EdgepackBundle.wholeNumber(tok["bos_id"])
        addBOS = tok["add_bos"] as? Bool ?? false
        endIDs = end
        stopTexts = tok["stop_texts"] as? [String] ?? []
        thinkStart = (think?["start"] as? String).flatMap { $0.isEmpty ? nil : $0 } ?? "<think>"
        thinkEnd = (think?["end"] as? String).flatMap { $0.isEmpty ? nil : $0 } ?? "</think>"
        chatFormatJSON = tok["chat_format"]
    }

    public func isEndID(_ id: Int) -> Bool { endIDs.contains(id) }
}
