package dev.edgepack.bundlekit;

import java.util.Objects;

/** One chat message: role "system", "user" or "assistant", and its text. */
public final class Message {
    public final String role;
    public final String content;

    public Message(String role, String content) {
        this.role = Objects.requireNonNull(role, "role");
        this.content = Objects.requireNonNull(content, "content");
    }

    public static Message system(String content) {
        return new Message("system", content);
    }

    public static Message user(String content) {
        return new Message("user", content);
    }

    public static Message assistant(String content) {
        return new Message("assistant", content);
    }

    @Override
    public String toString() {
        return role + ": " + content;
    }
}
