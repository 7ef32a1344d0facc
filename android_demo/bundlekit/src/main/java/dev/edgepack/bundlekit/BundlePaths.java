package dev.edgepack.bundlekit;

import java.nio.charset.StandardCharsets;
import java.util.regex.Pattern;

/** The file names a bundle may list: plain relative paths inside it (edgepack's manifest_schema rules). */
final class BundlePaths {
    static final int MAX_PATH_CHARS = 1024;
    private static final Pattern DRIVE = Pattern.compile("^[A-Za-z]:.*", Pattern.DOTALL);

    private BundlePaths() {}

    /** Why {@code name} is not a plain relative path inside a bundle, or null when it is one. Judged on the
     * text alone, before the file system is touched. */
    static String unsafeReason(String name) {
        if (name == null || name.isEmpty()) {
            return "is not a file name";
        }
        if (name.length() > MAX_PATH_CHARS) {
            return "is too long";
        }
        if (!PyText.isPrintable(name) || name.indexOf('\\') >= 0) {
            return "holds a control character or a backslash";
        }
        if (!StandardCharsets.UTF_8.newEncoder().canEncode(name)) {
            return "is not valid UTF-8";
        }
        if (name.startsWith("/") || DRIVE.matcher(name).matches()) {
            return "is an absolute path";
        }
        for (String part : name.split("/", -1)) {
            if (part.isEmpty() || part.equals(".") || part.equals("..")) {
                return "is not a plain relative path (empty, '.' or '..' part)";
            }
        }
        return null;
    }
}
