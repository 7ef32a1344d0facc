import Foundation

/// One chat message: role "system", "user" or "assistant", and its text.
public struct Message: Equatable {
    public let role: String
    public let content: String

    public init(role: String, content: String) {
        self.role = role
        self.content = content
    }
}

public enum ChatFormatError: Error, Equatable {
    case noMessages
    case unknownRole(String)
}

/// The conversation as the prompt text the model was trained on, without a Jinja engine: the manifest's
/// `tokenizer.chat_format` (derived from the chat template at export, checked to rebuild its rendering).
/// The algorithm is sdk/chat_format.py's `apply_chat_format`: start; a default system message when the first
/// message is not one; per message role prefix + content (trimmed if `trim_content`; for an assistant message
/// with `drop_thinking`, only what follows the last think end tag) + role suffix; the generation prompt.
/// The text carries BOS itself: tokenize it with special tokens parsed and nothing added.
public struct ChatFormat {
    let plain: Bool
    let start: String
    let defaultSystem: String?
    let roles: [String: (prefix: String, suffix: String)]
    let generationPrompt: String
    let trimContent: Bool
    let dropThinking: Bool

    /// From a manifest's `tokenizer.chat_format` (a JSON object, or nil/NSNull without a chat template).
    public init(json: Any?) throws {
        guard let fmt = json as? [String: Any] else {
            if json == nil || json is NSNull {
                (plain, start, defaultSystem, roles, generationPrompt, trimContent, dropThinking) =
                    (true, "", nil, [:], "", false, false)
                return
            }
            throw BundleError("manifest.json tokenizer.chat_format is not an object", fix: BundleError.reexport)
        }
        guard fmt["expressible"] as? Bool == true else {
            let reason = fmt["reason"] as? String ?? "no reason given"
            throw BundleError("the bundle's chat template cannot be applied without a Jinja engine (\(reason))",
                              fix: "use a runtime that renders chat_template.jinja, or re-export a model whose template is per-role prefix and suffix")
        }
        var roles: [String: (String, String)] = [:]
        for role in ["system", "user", "assistant"] {
            guard let r = (fmt["roles"] as? [String: Any])?[role] as? [String: Any],
                  let prefix = r["prefix"] as? String, let suffix = r["suffix"] as? String else {
                throw BundleError("manifest.json tokenizer.chat_format.roles.\(role) is missing", fix: BundleError.reexport)
            }
            roles[role] = (prefix, suffix)
        }
        guard let start = fmt["start"] as? String, let generation = fmt["generation_prompt"] as? String else {
            throw BundleError("manifest.json tokenizer.chat_format lacks start or generation_prompt", fix: BundleError.reexport)
        }
        plain = false
        self.start = start
        defaultSystem = fmt["default_system"] as? String
        self.roles = roles
        generationPrompt = generation
        trimContent = fmt["trim_content"] as? Bool ?? false
        dropThinking = fmt["drop_thinking"] as? Bool ?? false
    }

    public func render(_ messages: [Message], addGenerationPrompt: Bool = true) throws -> String {
        guard !messages.isEmpty else { throw ChatFormatError.noMessages }
        if plain { return Self.plainPrompt(messages, addGenerationPrompt) }
        var all = messages
        if let system = defaultSystem, all[0].role != "system" {
            all.insert(Message(role: "system", content: system), at: 0)
        }
        var text = start
        for message in all {
            guard let pieces = roles[message.role] else { throw ChatFormatError.unknownRole(message.role) }
            var content = message.content
            if dropThinking && message.role == "assistant", let end = content.range(of: "</think>", options: [.backwards, .literal]) {
                content = String(content[end.upperBound...])
            }
            text += pieces.prefix + (trimContent ? PyText.strip(content) : content) + pieces.suffix
        }
        return addGenerationPrompt ? text + generationPrompt : text
    }

    /// Whether the rendered text carries BOS itself (every chat template); a plain prompt does not.
    public var carriesBOS: Bool { !plain }

    /// Whether the reply starts inside a think block (the generation prompt ends with the start tag).
    public static func endsInsideThink(_ prompt: String, thinkStart: String) -> Bool {
        PyText.hasSuffix(PyText.rstrip(PyText.scalars(prompt)), PyText.scalars(thinkStart))
    }

    static func plainPrompt(_ messages: [Message], _ addGenerationPrompt: Bool) -> String {
        if messages.count == 1 && messages[0].role == "user" { return messages[0].content }
        var lines = messages.map { "\($0.role): \($0.content)" }
        if addGenerationPrompt { lines.append("assistant:") }
        return lines.joined(separator: "\n")
    }
}
