package dev.edgepack.bundlekit;

/**
 * A problem with a bundle the user can fix, with the fix spelled out: the app shows {@link #getMessage()},
 * one line "problem; fix", as edgepack's CLI does.
 */
public final class BundleException extends Exception {
    private static final long serialVersionUID = 1L;
    private final String problem;
    private final String fix;

    public BundleException(String problem, String fix) {
        super(problem + "; " + fix);
        this.problem = problem;
        this.fix = fix;
    }

    public String problem() {
        return problem;
    }

    public String fix() {
        return fix;
    }
}
