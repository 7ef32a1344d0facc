package dev.edgepack.bundlekit;

import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import java.util.ArrayList;
import java.util.Collections;
import java.util.HashMap;
import java.util.List;
import java.util.Map;

/**
 * The conversation as the prompt text the model was trained on, without a Jinja engine: the manifest's
 * {@code tokenizer.chat_format} (edgepack derived it from the chat template at export and checked it rebuilds
 * the template's rendering). The algorithm is sdk/chat_format.py's {@code apply_chat_format}:
 *
 * <pre>
 * text = start
 * if default_system is set and the first message is not a system message: prepend it as a system message
 * for each message: text += prefix[role] + content (trimmed if trim_content; for an assistant message with
 *                   drop_thinking, only what follows the last think end tag) + suffix[role]
 * if a reply is wanted: text += generation_prompt
 * </pre>
 *
 * The text already carries the BOS token when the model wants one: tokenize it with special tokens parsed and
 * nothing added. A bundle without a chat template (a base model) gets edgepack's plain fallback.
 */
public final class ChatFormat {
    private static final String THINK_END = "</think>";

    private final boolean plain;
    private final String start;
    private final String defaultSystem;
    private final Map<String, String[]> roles;
    private final String generationPrompt;
    private final boolean trimContent;
    private final boolean dropThinking;

    private ChatFormat(boolean plain, String start, String defaultSystem, Map<String, String[]> roles,
                       String generationPrompt, boolean trimContent, boolean dropThinking) {
        this.plain = plain;
        this.start = start;
        this.defaultSystem = defaultSystem;
        this.roles = roles;
        this.generationPrompt = generationPrompt;
        this.trimContent = trimContent;
        this.dropThinking = dropThinking;
    }

    /** From a manifest's {@code tokenizer.chat_format}; null means the bundle has no chat template. */
    public static ChatFormat fromJson(JsonElement section) throws BundleException {
        String where = Bundle.MANIFEST + " tokenizer.chat_format";
        if (section == null || section.isJsonNull()) {
            return new ChatFormat(true, "", null, Collections.<String, String[]>emptyMap(), "", false, false);
        }
        if (!section.isJsonObject()) {
            throw new BundleException(where + " is " + Json.describe(section) + ", not an object", Json.REEXPORT);
        }
        JsonObject fmt = section.getAsJsonObject();
        if (!Json.bool(fmt, "expressible", false, where)) {
            String reason = Json.optionalString(fmt, "reason", where);
            throw new BundleException("the bundle's chat template cannot be applied without a Jinja engine ("
                    + (reason == null ? "no reason given" : reason) + ")",
                    "use a runtime that renders chat_template.jinja, or re-export a model whose template is "
                            + "per-role prefix and suffix");
        }
        JsonObject rolesJson = Json.object(fmt, "roles", where);
        Map<String, String[]> roles = new HashMap<>();
        for (String role : new String[] {"system", "user", "assistant"}) {
            JsonObject r = Json.object(rolesJson, role, where + ".roles");
            roles.put(role, new String[] {Json.string(r, "prefix", where + ".roles." + role),
                                          Json.string(r, "suffix", where + ".roles." + role)});
        }
        return new ChatFormat(false, Json.string(fmt, "start", where), Json.optionalString(fmt, "default_system", where),
                roles, Json.string(fmt, "generation_prompt", where), Json.bool(fmt, "trim_content", false, where),
                Json.bool(fmt, "drop_thinking", false, where));
    }

    /** The prompt text; {@code addGenerationPrompt} for a reply to follow (always, in a chat app). */
    public String render(List<Message> messages, boolean addGenerationPrompt) {
        if (messages.isEmpty()) {
            throw new IllegalArgumentException("the conversation has no messages");
        }
        if (plain) {
            return plainPrompt(messages, addGenerationPrompt);
        }
        List<Message> all = new ArrayList<>(messages);
        if (defaultSystem != null && !all.get(0).role.equals("system")) {
            all.add(0, Message.system(defaultSystem));
        }
        StringBuilder text = new StringBuilder(start);
        for (Message message : all) {
            String[] pieces = roles.get(message.role);
            if (pieces == null) {
                throw new IllegalArgumentException("message role " + message.role
                        + " is not one the chat format knows (system, user, assistant)");
            }
            String content = message.content;
            if (dropThinking && message.role.equals("assistant")) {
                int at = content.lastIndexOf(THINK_END);
                content = at < 0 ? content : content.substring(at + THINK_END.length());
            }
            text.append(pieces[0]).append(trimContent ? PyText.strip(content) : content).append(pieces[1]);
        }
        if (addGenerationPrompt) {
            text.append(generationPrompt);
        }
        return text.toString();
    }

    /** Whether the rendered text carries the model's BOS itself (true for every chat template). A plain
     * prompt does not: add the tokenizer's BOS when the manifest's {@code add_bos} says so. */
    public boolean carriesBos() {
        return !plain;
    }

    /** Whether the model's reply starts inside a think block (a generation prompt that ends with the start
     * tag, as DeepSeek-R1's does): the think splitter then starts inside. */
    public static boolean endsInsideThink(String prompt, String thinkStart) {
        return PyText.rstrip(prompt).endsWith(thinkStart);
    }

    /** edgepack's fallback for a model without a chat template: one user message as it is, else a transcript. */
    private static String plainPrompt(List<Message> messages, boolean addGenerationPrompt) {
        if (messages.size() == 1 && messages.get(0).role.equals("user")) {
            return messages.get(0).content;
        }
        List<String> lines = new ArrayList<>();
        for (Message m : messages) {
            lines.add(m.role + ": " + m.content);
        }
        if (addGenerationPrompt) {
            lines.add("assistant:");
        }
        return String.join("\n", lines);
    }
}
