import CryptoKit
import Foundation

/// An edgepack bundle opened the way edgepack's own runtime opens it (sdk/bundle.py), trusting nothing: the
/// manifest's format name and version are checked; every listed file must be a plain relative path inside the
/// bundle, reached without a symbolic link, a regular file of the recorded size and sha256; every file the
/// manifest tells an app to open must be listed; the folder holds nothing unlisted (hidden entries aside).
public struct EdgepackBundle {
    public static let formatName = "edgepack-bundle"
    public static let formatVersion = 1
    public static let manifestName = "manifest.json"
    static let maxManifestBytes = 16 << 20

    public let folder: URL
    /// The whole manifest, for fields this type does not read.
    public let manifest: [String: Any]
    public let tokenizer: TokenizerInfo
    let files: [String: (size: Int, sha256: String)]

    /// Open and verify a bundle; `checkHashes` false checks sizes only (a bundle verified before).
    public static func open(_ folder: URL, checkHashes: Bool = true) throws -> EdgepackBundle {
        let manifest = try readManifest(folder)
        let files = try listedFiles(folder, manifest)
        let bundle = EdgepackBundle(folder: folder, manifest: manifest,
                                    tokenizer: try TokenizerInfo(manifest: manifest), files: files)
        try bundle.checkNamedFilesListed()
        try bundle.checkTree()
        for (name, entry) in files.sorted(by: { $0.key < $1.key }) {
            let info = try bundle.lstatInside(name)
            guard info.type == .typeRegular else {
                throw BundleError("bundle file \(name) in \(folder.path) is not a regular file", fix: BundleError.reexport)
            }
            guard info.size == entry.size else { throw mismatch(name) }
        }
        if checkHashes {
            for (name, entry) in files.sorted(by: { $0.key < $1.key }) {
                guard try sha256(folder.appendingPathComponent(name), name) == entry.sha256 else { throw mismatch(name) }
            }
        }
        return bundle
    }

    /// "executorch", "onnx", "coreml" or "reference".
    public var backendName: String { backend["name"] as? String ?? "" }

    /// The backend's program (model.pte, model.onnx, model.mlpackage), listed and checked.
    public func program() throws -> URL {
        guard let name = backend["program"] as? String else {
            throw BundleError("\(Self.manifestName): backend.program is missing", fix: BundleError.reexport)
        }
        return try file(name)
    }

    public var contextLength: Int { manifest["context_length"] as? Int ?? 0 }
    public var backend: [String: Any] { manifest["backend"] as? [String: Any] ?? [:] }
    public var generation: GenerationDefaults { GenerationDefaults(manifest["generation"] as? [String: Any] ?? [:]) }

    /// What an app links for this program's operators (ExecuTorch bundles; "ios" or "cmake"), else empty.
    public func kernelLibraries(_ platform: String) -> [String] {
        (backend["kernel_libraries"] as? [String: Any])?[platform] as? [String] ?? []
    }

    /// The chat format an app applies (an error if the bundle's template cannot be expressed so).
    public func chatFormat() throws -> ChatFormat { try ChatFormat(json: tokenizer.chatFormatJSON) }

    /// The URL of a listed file (or package folder, e.g. a Core ML .mlpackage) the manifest names.
    public func file(_ name: String) throws -> URL {
        guard isListed(name) else {
            throw BundleError("the manifest of \(folder.path) names '\(name)', which is not listed in its files (so it would not be checked)",
                              fix: BundleError.reexport)
        }
        _ = try lstatInside(name)
        return folder.appendingPathComponent(name)
    }

    // MARK: reading

    static func readManifest(_ folder: URL) throws -> [String: Any] {
        let pick = "pick the folder that `edgepack export` wrote"
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: folder.path, isDirectory: &isDir), isDir.boolValue else {
            throw BundleError("bundle \(folder.path) does not exist or is not a folder", fix: pick)
        }
        let path = folder.appendingPathComponent(manifestName).path
        guard let info = try? FileManager.default.attributesOfItem(atPath: path) else {
            throw BundleError("\(folder.path) is not an edgepack bundle (no \(manifestName))", fix: pick)
        }
        if info[.type] as? FileAttributeType == .typeSymbolicLink {
            throw BundleError("\(path) is a symbolic link", fix: BundleError.reexport)
        }
        guard info[.type] as? FileAttributeType == .typeRegular else {
            throw BundleError("\(path) is not a regular file", fix: BundleError.reexport)
        }
        if (info[.size] as? Int ?? 0) > maxManifestBytes {
            throw BundleError("\(path) is far larger than any manifest", fix: BundleError.reexport)
        }
        let data = try Data(contentsOf: URL(fileURLWithPath: path))
        guard String(data: data, encoding: .utf8) != nil else {
            throw BundleError("\(path) is not UTF-8 text", fix: BundleError.reexport)
        }
        let parsed: Any
        do {
            parsed = try JSONSerialization.jsonObject(with: data)
        } catch {
            throw BundleError("\(path) is not valid JSON (\(error.localizedDescription))", fix: BundleError.reexport)
        }
        guard let manifest = parsed as? [String: Any] else {
            throw BundleError("\(path) is not a JSON object", fix: BundleError.reexport)
        }
        guard manifest["format"] as? String == formatName else {
            throw BundleError("\(path) is not an edgepack manifest", fix: BundleError.reexport)
        }
        guard let version = wholeNumber(manifest["format_version"]) else {
            throw BundleError("\(manifestName): field format_version is missing", fix: BundleError.reexport)
        }
        guard version == formatVersion else {
            throw BundleError("bundle format version \(version) is not supported by this app (reads \(formatVersion))",
                              fix: "re-export the bundle with an edgepack that writes format version \(formatVersion), or update the app")
        }
        return manifest
    }

    static func wholeNumber(_ value: Any?) -> Int? {
        guard let number = value as? NSNumber, CFGetTypeID(number) != CFBooleanGetTypeID() else { return nil }
        let double = number.doubleValue
        return double == double.rounded() && abs(double) < 1e15 ? Int(double) : nil
    }

    static func listedFiles(_ folder: URL, _ manifest: [String: Any]) throws -> [String: (size: Int, sha256: String)] {
        guard let listed = manifest["files"] as? [String: Any] else {
            throw BundleError("\(manifestName): field files is not an object", fix: BundleError.reexport)
        }
        var files: [String: (size: Int, sha256: String)] = [:]
        for (name, value) in listed {
            if let reason = BundlePaths.unsafeReason(name) {
                throw BundleError("bundle \(folder.path) names the file '\(name)', which \(reason): a bundle names only plain relative paths inside it",
                                  fix: BundleError.reexport)
            }
            guard let entry = value as? [String: Any], let size = wholeNumber(entry["size"]), size >= 0,
                  let sha = entry["sha256"] as? String, sha.count == 64,
                  sha.allSatisfy({ "0123456789abcdef".contains($0) }) else {
                throw BundleError("\(manifestName) files.\(name) has no valid size and sha256", fix: BundleError.reexport)
            }
            files[name] = (size, sha)
        }
        return files
    }

    /// Every file or package folder the manifest tells an app to open (edgepack's `named_files`).
    func namedFiles() -> [(field: String, name: String)] {
        var named: [(String, String)] = []
        let tok = manifest["tokenizer"] as? [String: Any] ?? [:]
        for key in ["file", "config_file", "chat_template_file"] {
            if let name = tok[key] as? String { named.append(("tokenizer.\(key)", name)) }
        }
        for key in ["program", "genai_config"] {
            if let name = backend[key] as? String { named.append(("backend.\(key)", name)) }
        }
        if let name = (backend["cpu"] as? [String: Any])?["program"] as? String { named.append(("backend.cpu.program", name)) }
        if let npu = backend["npu"] as? [String: Any] {
            for key in ["prefill_program", "decode_program"] {
                if let name = npu[key] as? String { named.append(("backend.npu.\(key)", name)) }
            }
            for (i, name) in (npu["context_binaries"] as? [String] ?? []).enumerated() {
                named.append(("backend.npu.context_binaries[\(i)]", name))
            }
        }
        return named
    }

    func checkNamedFilesListed() throws {
        for (field, name) in namedFiles() where !isListed(name) {
            throw BundleError("\(Self.manifestName): \(field) names '\(name)', which is not listed in its files (so it would not be checked)",
                              fix: BundleError.reexport)
        }
    }

    func isListed(_ name: String) -> Bool {
        files[name] != nil || files.keys.contains { $0.hasPrefix(name + "/") }
    }

    /// Only folders and listed regular files; no link, no FIFO or device; hidden entries are skipped.
    func checkTree() throws {
        let keys: [URLResourceKey] = [.isSymbolicLinkKey, .isRegularFileKey, .isDirectoryKey]
        guard let walk = FileManager.default.enumerator(at: folder, includingPropertiesForKeys: keys,
                                                        options: [.skipsHiddenFiles]) else {
            throw BundleError("cannot read \(folder.path)", fix: "check the bundle's permissions")
        }
        let root = folder.standardizedFileURL.pathComponents
        for case let url as URL in walk {
            let name = url.standardizedFileURL.pathComponents.dropFirst(root.count).joined(separator: "/")
            if name == Self.manifestName { continue }
            let values = try url.resourceValues(forKeys: Set(keys))
            if values.isSymbolicLink == true {
                throw BundleError("\(name) in bundle \(folder.path) is a symbolic link",
                                  fix: "a bundle holds only plain files: re-export it")
            }
            if values.isDirectory == true { continue }
            if values.isRegularFile != true {
                throw BundleError("\(name) in bundle \(folder.path) is a special file (FIFO, socket or device)",
                                  fix: "a bundle holds only plain files: re-export it")
            }
            if files[name] == nil {
                throw BundleError("bundle file \(name) in \(folder.path) is not listed in its \(Self.manifestName)",
                                  fix: "remove it or re-export the bundle")
            }
        }
    }

    /// Attributes of `name` under the bundle, refusing a symbolic link on any part of its path.
    func lstatInside(_ name: String) throws -> (type: FileAttributeType, size: Int) {
        if let reason = BundlePaths.unsafeReason(name) {
            throw BundleError("bundle \(folder.path) names the file '\(name)', which \(reason)", fix: BundleError.reexport)
        }
        let parts = name.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
        var current = folder
        var result: (FileAttributeType, Int) = (.typeUnknown, 0)
        for (i, part) in parts.enumerated() {
            current = current.appendingPathComponent(part)
            guard let info = try? FileManager.default.attributesOfItem(atPath: current.path) else {
                throw BundleError("bundle file \(name) is missing from \(folder.path)", fix: BundleError.reexport)
            }
            let type = info[.type] as? FileAttributeType ?? .typeUnknown
            if type == .typeSymbolicLink {
                throw BundleError("bundle file \(name) in \(folder.path) goes through a symbolic link (\(parts[...i].joined(separator: "/")))",
                                  fix: "a bundle holds only plain files: re-export it")
            }
            if i < parts.count - 1 && type != .typeDirectory {
                throw BundleError("bundle file \(name) is missing from \(folder.path)", fix: BundleError.reexport)
            }
            result = (type, info[.size] as? Int ?? -1)
        }
        return result
    }

    static func sha256(_ url: URL, _ name: String) throws -> String {
        let fd = Darwin.open(url.path, O_RDONLY | O_NOFOLLOW)
        guard fd >= 0 else {
            throw BundleError("cannot read bundle file \(name) (\(String(cString: strerror(errno))))", fix: BundleError.reexport)
        }
        let handle = FileHandle(fileDescriptor: fd, closeOnDealloc: true)
        var hasher = SHA256()
        while let block = try handle.read(upToCount: 1 << 20), !block.isEmpty {
            hasher.update(data: block)
        }
        return hasher.finalize().map { String(format: "%02x", $0) }.joined()
    }

    static func mismatch(_ name: String) -> BundleError {
        BundleError("bundle file \(name) does not match its checksum in \(manifestName) (modified or truncated)",
                    fix: BundleError.reexport)
    }
}

/// The file names a bundle may list: plain relative paths inside it (edgepack's manifest_schema rules).
enum BundlePaths {
    static func unsafeReason(_ name: String) -> String? {
        if name.isEmpty { return "is not a file name" }
        if name.unicodeScalars.count > 1024 { return "is too long" }
        if !PyText.isPrintable(name) || name.contains("\\") { return "holds a control character or a backslash" }
        let scalars = Array(name.unicodeScalars)
        if name.hasPrefix("/") || (scalars.count >= 2 && scalars[1] == ":" && scalars[0].isASCII
                                   && scalars[0].properties.isAlphabetic) {
            return "is an absolute path"
        }
        for part in name.split(separator: "/", omittingEmptySubsequences: false) where part.isEmpty || part == "." || part == ".." {
            return "is not a plain relative path (empty, '.' or '..' part)"
        }
        return nil
    }
}

/// The manifest's `generation` section: what `edgepack run` uses when the user sets nothing.
public struct GenerationDefaults {
    public let maxNewTokens: Int
    public let temperature: Double
    public let topP: Double
    public let topK: Int

    init(_ g: [String: Any]) {
        maxNewTokens = EdgepackBundle.wholeNumber(g["max_new_tokens"]) ?? 256
        temperature = (g["temperature"] as? NSNumber)?.doubleValue ?? 0
        topP = (g["top_p"] as? NSNumber)?.doubleValue ?? 1
        topK = EdgepackBundle.wholeNumber(g["top_k"]) ?? 0
    }
}
