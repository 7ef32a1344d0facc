package dev.edgepack.bundlekit;

/**
 * The few Python string rules the bundle format leans on ({@code str.isspace}, {@code str.strip},
 * {@code str.isprintable}), so that text is trimmed and names are judged exactly as edgepack does.
 * Java's own {@code String.strip} uses a different whitespace set (it keeps U+00A0 and U+0085).
 */
final class PyText {
    private PyText() {}

    /** Python's {@code str.isspace} for one code point: bidi class WS, B or S, or category Zs. */
    static boolean isSpace(int cp) {
        return Character.isWhitespace(cp) || Character.isSpaceChar(cp) || cp == 0x85;
    }

    static String lstrip(String s) {
        int i = 0;
        while (i < s.length()) {
            int cp = s.codePointAt(i);
            if (!isSpace(cp)) {
                break;
            }
            i += Character.charCount(cp);
        }
        return s.substring(i);
    }

    static String rstrip(String s) {
        int end = s.length();
        while (end > 0) {
            int cp = s.codePointBefore(end);
            if (!isSpace(cp)) {
                break;
            }
            end -= Character.charCount(cp);
        }
        return s.substring(0, end);
    }

    static String strip(String s) {
        return lstrip(rstrip(s));
    }

    /** Python's {@code str.isprintable}: no control, format, surrogate, private-use, unassigned or
     * separator character other than the plain space. */
    static boolean isPrintable(String s) {
        for (int i = 0; i < s.length(); ) {
            int cp = s.codePointAt(i);
            i += Character.charCount(cp);
            if (cp == ' ') {
                continue;
            }
            switch (Character.getType(cp)) {
                case Character.CONTROL:
                case Character.FORMAT:
                case Character.SURROGATE:
                case Character.PRIVATE_USE:
                case Character.UNASSIGNED:
                case Character.LINE_SEPARATOR:
                case Character.PARAGRAPH_SEPARATOR:
                case Character.SPACE_SEPARATOR:
                    return false;
                default:
                    break;
            }
        }
        return true;
    }

    /** Length of the longest suffix of {@code text} that is a proper prefix of {@code pattern}. */
    static int overlap(String text, String pattern) {
        for (int n = Math.min(text.length(), pattern.length() - 1); n > 0; n--) {
            if (pattern.startsWith(text.substring(text.length() - n))) {
                return n;
            }
        }
        return 0;
    }
}
