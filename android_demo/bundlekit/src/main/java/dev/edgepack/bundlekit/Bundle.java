package dev.edgepack.bundlekit;

import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParseException;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.io.InputStream;
import java.nio.ByteBuffer;
import java.nio.channels.Channels;
import java.nio.channels.FileChannel;
import java.nio.charset.CharacterCodingException;
import java.nio.charset.CodingErrorAction;
import java.nio.charset.StandardCharsets;
import java.nio.file.FileVisitResult;
import java.nio.file.Files;
import java.nio.file.LinkOption;
import java.nio.file.NoSuchFileException;
import java.nio.file.NotDirectoryException;
import java.nio.file.Path;
import java.nio.file.SimpleFileVisitor;
import java.nio.file.StandardOpenOption;
import java.nio.file.attribute.BasicFileAttributes;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.ArrayList;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.regex.Pattern;

/**
 * An edgepack bundle opened the way edgepack's own runtime opens it (sdk/bundle.py), trusting nothing: the
 * manifest's format name and version are checked; every listed file must be a plain relative path inside the
 * bundle, reached without a symbolic link, a regular file of the recorded size and sha256; every file the
 * manifest tells an app to open must be listed; the folder holds nothing unlisted (hidden entries such as
 * ".DS_Store" aside).
 */
public final class Bundle {
    public static final String FORMAT_NAME = "edgepack-bundle";
    public static final int FORMAT_VERSION = 1;
    public static final String MANIFEST = "manifest.json";
    static final long MAX_MANIFEST_BYTES = 16L << 20;
    private static final Pattern SHA256 = Pattern.compile("[0-9a-f]{64}");
    private static final String REEXPORT = Json.REEXPORT;
    private static final String PLAIN_FILES = "a bundle holds only plain files: re-export it";

    private final Path folder;
    private final JsonObject manifest;
    private final Map<String, Entry> files;
    private final TokenizerInfo tokenizer;

    private static final class Entry {
        final long size;
        final String sha256;

        Entry(long size, String sha256) {
            this.size = size;
            this.sha256 = sha256;
        }
    }

    private Bundle(Path folder, JsonObject manifest, Map<String, Entry> files, TokenizerInfo tokenizer) {
        this.folder = folder;
        this.manifest = manifest;
        this.files = files;
        this.tokenizer = tokenizer;
    }

    /** Open and verify a bundle, sha256 of every file included (do it once after a copy or download). */
    public static Bundle open(Path folder) throws BundleException {
        return open(folder, true);
    }

    /** Open a bundle; without {@code checkHashes} files are checked by size only (a bundle already verified). */
    public static Bundle open(Path folder, boolean checkHashes) throws BundleException {
        JsonObject manifest = readManifest(folder);
        Map<String, Entry> files = listedFiles(folder, manifest);
        TokenizerInfo tokenizer = TokenizerInfo.fromManifest(manifest);
        Bundle bundle = new Bundle(folder, manifest, files, tokenizer);
        bundle.checkNamedFilesListed();
        bundle.checkTree();
        for (Map.Entry<String, Entry> e : files.entrySet()) {
            BasicFileAttributes info = bundle.lstatInside(e.getKey());
            if (!info.isRegularFile()) {
                throw new BundleException("bundle file " + e.getKey() + " in " + folder + " is not a regular file", REEXPORT);
            }
            if (info.size() != e.getValue().size) {
                throw mismatch(e.getKey());
            }
        }
        if (checkHashes) {
            for (Map.Entry<String, Entry> e : files.entrySet()) {
                if (!sha256(folder.resolve(e.getKey()), e.getKey()).equals(e.getValue().sha256)) {
                    throw mismatch(e.getKey());
                }
            }
        }
        return bundle;
    }

    public Path folder() {
        return folder;
    }

    /** The whole manifest, for fields this class does not type. */
    public JsonObject manifest() {
        return manifest;
    }

    public TokenizerInfo tokenizer() {
        return tokenizer;
    }

    /** The chat format an app applies (a BundleException if the bundle's template cannot be expressed so). */
    public ChatFormat chatFormat() throws BundleException {
        return ChatFormat.fromJson(tokenizer.chatFormatJson());
    }

    /** "executorch", "onnx", "coreml" or "reference". */
    public String backendName() throws BundleException {
        return Json.string(backend(), "name", MANIFEST + " backend");
    }

    /** The backend's program file (model.pte, model.onnx, model.mlpackage), checked and listed. */
    public Path program() throws BundleException {
        return file(Json.string(backend(), "program", MANIFEST + " backend"));
    }

    public int contextLength() throws BundleException {
        long value = Json.longValue(manifest, "context_length", MANIFEST);
        if (value < 1 || value > 1 << 20) {
            throw new BundleException(MANIFEST + ": context_length " + value + " is out of range", REEXPORT);
        }
        return (int) value;
    }

    /** What an app links for this program's operators (ExecuTorch bundles; "cmake" or "ios"), else empty. */
    public List<String> kernelLibraries(String platform) throws BundleException {
        JsonObject libraries = Json.optionalObject(backend(), "kernel_libraries", MANIFEST + " backend");
        if (libraries == null) {
            return Collections.emptyList();
        }
        return Json.strings(libraries, platform, MANIFEST + " backend.kernel_libraries");
    }

    public GenerationDefaults generation() throws BundleException {
        return GenerationDefaults.fromManifest(manifest);
    }

    /** The path of a listed file (or package folder, e.g. a Core ML .mlpackage) the manifest names. */
    public Path file(String name) throws BundleException {
        if (!isListed(name)) {
            throw new BundleException("the manifest of " + folder + " names " + quoted(name)
                    + ", which is not listed in its files (so it would not be checked)", REEXPORT);
        }
        lstatInside(name);
        return folder.resolve(name);
    }

    private JsonObject backend() throws BundleException {
        return Json.object(manifest, "backend", MANIFEST);
    }

    // --- reading -------------------------------------------------------------------------------------------

    private static JsonObject readManifest(Path folder) throws BundleException {
        String pick = "pick the folder that `edgepack export` wrote";
        if (!Files.isDirectory(folder)) {
            throw new BundleException("bundle " + folder + " does not exist or is not a folder", pick);
        }
        Path path = folder.resolve(MANIFEST);
        BasicFileAttributes info;
        try {
            info = Files.readAttributes(path, BasicFileAttributes.class, LinkOption.NOFOLLOW_LINKS);
        } catch (NoSuchFileException e) {
            throw new BundleException(folder + " is not an edgepack bundle (no " + MANIFEST + ")", pick);
        } catch (IOException e) {
            throw new BundleException("cannot read " + path + " (" + e.getMessage() + ")", REEXPORT);
        }
        if (info.isSymbolicLink()) {
            throw new BundleException(path + " is a symbolic link", REEXPORT);
        }
        if (!info.isRegularFile()) {
            throw new BundleException(path + " is not a regular file", REEXPORT);
        }
        if (info.size() > MAX_MANIFEST_BYTES) {
            throw new BundleException(path + " is " + info.size() + " bytes, far more than any manifest", REEXPORT);
        }
        JsonElement parsed;
        try {
            byte[] data = Files.readAllBytes(path);
            String text = StandardCharsets.UTF_8.newDecoder()
                    .onMalformedInput(CodingErrorAction.REPORT)
                    .onUnmappableCharacter(CodingErrorAction.REPORT)
                    .decode(ByteBuffer.wrap(data))
                    .toString();
            parsed = JsonParser.parseString(text);
        } catch (CharacterCodingException e) {
            throw new BundleException(path + " is not UTF-8 text", REEXPORT);
        } catch (JsonParseException e) {
            throw new BundleException(path + " is not valid JSON (" + firstLine(e.getMessage()) + ")", REEXPORT);
        } catch (IOException e) {
            throw new BundleException("cannot read " + path + " (" + e.getMessage() + ")", REEXPORT);
        }
        if (!parsed.isJsonObject()) {
            throw new BundleException(path + " is not a JSON object", REEXPORT);
        }
        JsonObject manifest = parsed.getAsJsonObject();
        JsonElement format = manifest.get("format");
        if (format == null || !format.isJsonPrimitive() || !FORMAT_NAME.equals(format.getAsString())) {
            throw new BundleException(path + " is not an edgepack manifest (format is " + Json.describe(format) + ")",
                    REEXPORT);
        }
        Long version = Json.optionalLong(manifest, "format_version", MANIFEST);
        if (version == null) {
            throw new BundleException(MANIFEST + ": field format_version is missing", REEXPORT);
        }
        if (version != FORMAT_VERSION) {
            throw new BundleException("bundle format version " + version + " is not supported by this app (reads "
                    + FORMAT_VERSION + ")", "re-export the bundle with an edgepack that writes format version "
                    + FORMAT_VERSION + ", or update the app");
        }
        return manifest;
    }

    private static Map<String, Entry> listedFiles(Path folder, JsonObject manifest) throws BundleException {
        JsonObject listed = Json.object(manifest, "files", MANIFEST);
        Map<String, Entry> files = new LinkedHashMap<>();
        for (Map.Entry<String, JsonElement> e : listed.entrySet()) {
            String name = e.getKey();
            String reason = BundlePaths.unsafeReason(name);
            if (reason != null) {
                throw new BundleException("bundle " + folder + " names the file " + quoted(name) + ", which " + reason
                        + ": a bundle names only plain relative paths inside it", REEXPORT);
            }
            String where = MANIFEST + " files." + name;
            if (!e.getValue().isJsonObject()) {
                throw new BundleException(where + " is " + Json.describe(e.getValue()) + ", not an object", REEXPORT);
            }
            JsonObject entry = e.getValue().getAsJsonObject();
            long size = Json.longValue(entry, "size", where);
            String sha = Json.string(entry, "sha256", where);
            if (size < 0 || !SHA256.matcher(sha).matches()) {
                throw new BundleException(where + " has no valid size and sha256", REEXPORT);
            }
            files.put(name, new Entry(size, sha));
        }
        return files;
    }

    /** Every file or package folder the manifest tells an app to open (edgepack's `named_files`). */
    List<String[]> namedFiles() throws BundleException {
        List<String[]> named = new ArrayList<>();
        JsonObject tok = Json.optionalObject(manifest, "tokenizer", MANIFEST);
        if (tok != null) {
            for (String key : new String[] {"file", "config_file", "chat_template_file"}) {
                addNamed(named, "tokenizer." + key, Json.optionalString(tok, key, MANIFEST + " tokenizer"));
            }
        }
        JsonObject backend = Json.optionalObject(manifest, "backend", MANIFEST);
        if (backend != null) {
            addNamed(named, "backend.program", Json.optionalString(backend, "program", MANIFEST + " backend"));
            addNamed(named, "backend.genai_config", Json.optionalString(backend, "genai_config", MANIFEST + " backend"));
            JsonObject cpu = Json.optionalObject(backend, "cpu", MANIFEST + " backend");
            if (cpu != null) {
                addNamed(named, "backend.cpu.program", Json.optionalString(cpu, "program", MANIFEST + " backend.cpu"));
            }
            JsonObject npu = Json.optionalObject(backend, "npu", MANIFEST + " backend");
            if (npu != null) {
                for (String key : new String[] {"prefill_program", "decode_program"}) {
                    addNamed(named, "backend.npu." + key, Json.optionalString(npu, key, MANIFEST + " backend.npu"));
                }
                List<String> binaries = Json.strings(npu, "context_binaries", MANIFEST + " backend.npu");
                for (int i = 0; i < binaries.size(); i++) {
                    addNamed(named, "backend.npu.context_binaries[" + i + "]", binaries.get(i));
                }
            }
        }
        return named;
    }

    private static void addNamed(List<String[]> named, String field, String name) {
        if (name != null) {
            named.add(new String[] {field, name});
        }
    }

    private void checkNamedFilesListed() throws BundleException {
        for (String[] named : namedFiles()) {
            if (!isListed(named[1])) {
                throw new BundleException(MANIFEST + ": " + named[0] + " names " + quoted(named[1])
                        + ", which is not listed in its files (so it would not be checked)", REEXPORT);
            }
        }
    }

    private boolean isListed(String name) {
        if (name == null) {
            return false;
        }
        if (files.containsKey(name)) {
            return true;
        }
        String prefix = name + "/";
        for (String key : files.keySet()) {
            if (key.startsWith(prefix)) {
                return true;
            }
        }
        return false;
    }

    /** Only folders and listed regular files; no link, no FIFO or device; hidden entries are skipped. */
    private void checkTree() throws BundleException {
        final BundleException[] found = {null};
        try {
            Files.walkFileTree(folder, new SimpleFileVisitor<Path>() {
                @Override
                public FileVisitResult preVisitDirectory(Path dir, BasicFileAttributes attrs) {
                    boolean hidden = !dir.equals(folder) && dir.getFileName().toString().startsWith(".");
                    return hidden ? FileVisitResult.SKIP_SUBTREE : FileVisitResult.CONTINUE;
                }

                @Override
                public FileVisitResult visitFile(Path file, BasicFileAttributes attrs) {
                    String name = folder.relativize(file).toString().replace(file.getFileSystem().getSeparator(), "/");
                    if (file.getFileName().toString().startsWith(".") || name.equals(MANIFEST)) {
                        return FileVisitResult.CONTINUE;
                    }
                    if (attrs.isSymbolicLink()) {
                        found[0] = new BundleException(name + " in bundle " + folder + " is a symbolic link", PLAIN_FILES);
                    } else if (!attrs.isRegularFile()) {
                        found[0] = new BundleException(name + " in bundle " + folder
                                + " is a special file (FIFO, socket or device)", PLAIN_FILES);
                    } else if (!files.containsKey(name)) {
                        found[0] = new BundleException("bundle file " + name + " in " + folder + " is not listed in its "
                                + MANIFEST, "remove it or re-export the bundle");
                    }
                    return found[0] == null ? FileVisitResult.CONTINUE : FileVisitResult.TERMINATE;
                }

                @Override
                public FileVisitResult visitFileFailed(Path file, IOException e) {
                    found[0] = new BundleException("cannot read " + file + " (" + e.getMessage() + ")",
                            "check the bundle's permissions");
                    return FileVisitResult.TERMINATE;
                }
            });
        } catch (IOException e) {
            throw new BundleException("cannot read " + folder + " (" + e.getMessage() + ")", "check the bundle's permissions");
        }
        if (found[0] != null) {
            throw found[0];
        }
    }

    /** Attributes of {@code name} under the bundle, refusing a symbolic link on any part of its path. */
    private BasicFileAttributes lstatInside(String name) throws BundleException {
        String reason = BundlePaths.unsafeReason(name);
        if (reason != null) {
            throw new BundleException("bundle " + folder + " names the file " + quoted(name) + ", which " + reason, REEXPORT);
        }
        String[] parts = name.split("/");
        Path current = folder;
        BasicFileAttributes info = null;
        for (int i = 0; i < parts.length; i++) {
            current = current.resolve(parts[i]);
            try {
                info = Files.readAttributes(current, BasicFileAttributes.class, LinkOption.NOFOLLOW_LINKS);
            } catch (NoSuchFileException | NotDirectoryException e) {
                throw new BundleException("bundle file " + name + " is missing from " + folder, REEXPORT);
            } catch (IOException e) {
                throw new BundleException("cannot read bundle file " + name + " in " + folder + " (" + e.getMessage() + ")",
                        REEXPORT);
            }
            if (info.isSymbolicLink()) {
                throw new BundleException("bundle file " + name + " in " + folder + " goes through a symbolic link ("
                        + String.join("/", java.util.Arrays.copyOf(parts, i + 1)) + ")", PLAIN_FILES);
            }
            if (i < parts.length - 1 && !info.isDirectory()) {
                throw new BundleException("bundle file " + name + " is missing from " + folder, REEXPORT);
            }
        }
        return info;
    }

    private static String sha256(Path path, String name) throws BundleException {
        MessageDigest digest;
        try {
            digest = MessageDigest.getInstance("SHA-256");
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException("every Java platform has SHA-256", e);
        }
        try (FileChannel channel = FileChannel.open(path, StandardOpenOption.READ, LinkOption.NOFOLLOW_LINKS);
             InputStream in = Channels.newInputStream(channel)) {
            byte[] block = new byte[1 << 20];
            for (int n = in.read(block); n >= 0; n = in.read(block)) {
                digest.update(block, 0, n);
            }
        } catch (IOException e) {
            throw new BundleException("cannot read bundle file " + name + " (" + e.getMessage() + ")", REEXPORT);
        }
        StringBuilder hex = new StringBuilder();
        for (byte b : digest.digest()) {
            hex.append(String.format(Locale.ROOT, "%02x", b));
        }
        return hex.toString();
    }

    private static BundleException mismatch(String name) {
        return new BundleException("bundle file " + name + " does not match its checksum in " + MANIFEST
                + " (modified or truncated)", REEXPORT);
    }

    private static String quoted(String name) {
        return "'" + name + "'";
    }

    private static String firstLine(String message) {
        if (message == null) {
            return "unreadable";
        }
        int newline = message.indexOf('\n');
        return newline < 0 ? message : message.substring(0, newline);
    }
}
