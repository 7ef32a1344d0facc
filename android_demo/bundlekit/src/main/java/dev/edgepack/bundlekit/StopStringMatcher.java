package dev.edgepack.bundlekit;

import java.util.ArrayList;
import java.util.List;

/**
 * Cuts a text stream before the first stop string, holding back text that may be the start of one (a stop
 * string can arrive split over tokens). Mirrors runtime/session.py's StopStringMatcher.
 */
public final class StopStringMatcher {
    private final List<String> stops = new ArrayList<>();
    private String pending = "";
    private boolean stopped;

    public StopStringMatcher(List<String> stopStrings) {
        for (String s : stopStrings) {
            if (s != null && !s.isEmpty()) {
                stops.add(s);
            }
        }
    }

    /** Add text; returns what is now safe to show (never anything from the first stop string on). */
    public String feed(String text) {
        if (stopped) {
            return "";
        }
        pending += text;
        int first = -1;
        for (String s : stops) {
            int at = pending.indexOf(s);
            if (at >= 0 && (first < 0 || at < first)) {
                first = at;
            }
        }
        if (first >= 0) {
            stopped = true;
            String out = pending.substring(0, first);
            pending = "";
            return out;
        }
        int hold = 0;
        for (String s : stops) {
            hold = Math.max(hold, PyText.overlap(pending, s));
        }
        String out = pending.substring(0, pending.length() - hold);
        pending = pending.substring(pending.length() - hold);
        return out;
    }

    /** What is held back (the stream ended without completing a stop string). */
    public String flush() {
        String out = pending;
        pending = "";
        return stopped ? "" : out;
    }

    public boolean stopped() {
        return stopped;
    }
}
