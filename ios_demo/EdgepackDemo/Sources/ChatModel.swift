import EdgepackBundleKit
import Foundation

struct Turn: Identifiable {
    let id = UUID()
    let role: String
    let text: String
}

/// The screen's state: the open bundle, the conversation, the reply streaming in.
@MainActor
final class ChatModel: ObservableObject {
    @Published var status = "No bundle. Open the folder `edgepack export` wrote (or copy it into the app's Documents)."
    @Published var turns: [Turn] = []
    @Published var thinking = ""
    @Published var answer = ""
    @Published var stats = ""
    @Published var generating = false
    @Published private(set) var ready = false
    /// Core ML: run `prefill`/`decode` on the Neural Engine instead of `main` (swift-transformers' layout).
    @Published private(set) var neuralEngine = UserDefaults.standard.bool(forKey: ChatModel.neuralEngineKey)
    nonisolated static let neuralEngineKey = "coreml.neuralEngine"

    private var bundle: EdgepackBundle?
    private var chatFormat: ChatFormat?
    private var engine: ChatEngine?
    private var history: [Message] = []

    /// Bundles copied into the app (Documents is shared with Finder and the Files app).
    private var documents: URL { FileManager.default.urls(for: .documentDirectory, in: .userDomainMask)[0] }

    /// The first bundle already in Documents, if any.
    func openFirstInDocuments() async {
        let folders = (try? FileManager.default.contentsOfDirectory(at: documents, includingPropertiesForKeys: nil)) ?? []
        if let first = folders.sorted(by: { $0.lastPathComponent < $1.lastPathComponent })
            .first(where: { FileManager.default.fileExists(atPath: $0.appendingPathComponent(EdgepackBundle.manifestName).path) }) {
            await open(first)
        }
    }

    /// A folder picked in the Files app: copied into Documents (the runtimes open files by path), then opened.
    func importFolder(_ picked: URL) async {
        status = "copying \(picked.lastPathComponent)…"
        let destination = documents.appendingPathComponent(picked.lastPathComponent)
        do {
            let access = picked.startAccessingSecurityScopedResource()
            defer { if access { picked.stopAccessingSecurityScopedResource() } }
            if picked.standardizedFileURL != destination.standardizedFileURL {
                try? FileManager.default.removeItem(at: destination)
                try FileManager.default.copyItem(at: picked, to: destination)
            }
        } catch {
            status = "error: cannot copy \(picked.lastPathComponent) (\(error.localizedDescription)); pick the folder again"
            return
        }
        await open(destination)
    }

    /// Verify the bundle (manifest, every file's size and sha256), read its chat format, open its runtime.
    func open(_ folder: URL) async {
        ready = false
        status = "checking \(folder.lastPathComponent)…"
        do {
            let opened = try await Task.detached { try EdgepackBundle.open(folder) }.value
            let format = try opened.chatFormat()  // refuses a template that cannot be applied without Jinja
            let runtime = try await Engines.open(opened, neuralEngine: neuralEngine)
            (bundle, chatFormat, engine) = (opened, format, runtime)
            newChat()
            status = Self.statusLine(opened, runtime)
            ready = true
        } catch {
            status = "error: \((error as? LocalizedError)?.errorDescription ?? String(describing: error))"
        }
    }

    /// The setting changed: the open bundle's runtime is opened again in the new mode (its files were verified).
    func setNeuralEngine(_ on: Bool) async {
        guard on != neuralEngine, !generating else { return }
        neuralEngine = on
        UserDefaults.standard.set(on, forKey: Self.neuralEngineKey)
        guard let bundle, bundle.backendName == "coreml" else { return }
        ready = false
        engine = nil  // the old models and state go before the new ones load
        status = "loading \(bundle.folder.lastPathComponent) \(on ? "for the Neural Engine" : "as swift-transformers does")…"
        do {
            let runtime = try await Engines.open(bundle, neuralEngine: on)
            engine = runtime
            newChat()
            status = Self.statusLine(bundle, runtime)
            ready = true
        } catch {
            status = "error: \((error as? LocalizedError)?.errorDescription ?? String(describing: error))"
        }
    }

    private static func statusLine(_ bundle: EdgepackBundle, _ runtime: ChatEngine) -> String {
        let model = (bundle.manifest["model"] as? [String: Any])?["name"] as? String ?? bundle.folder.lastPathComponent
        let files = (bundle.manifest["files"] as? [String: Any])?.count ?? 0
        return "\(model) · \(bundle.backendName) · context \(bundle.contextLength) · \(files) files verified · \(runtime.description)"
    }

    func newChat() {
        engine?.newConversation()
        history = []
        turns = []
        thinking = ""
        answer = ""
        stats = ""
    }

    func stop() { engine?.stop() }

    func send(_ text: String) async {
        guard let engine, let chatFormat, let bundle, !text.isEmpty, !generating else { return }
        generating = true
        defer { generating = false }
        turns.append(Turn(role: "You", text: text))
        (thinking, answer, stats) = ("", "", "")
        history.append(Message(role: "user", content: text))
        do {
            let prompt = try chatFormat.render(history)
            let reply = engine.newReply(startInsideThink: ChatFormat.endsInsideThink(prompt, thinkStart: bundle.tokenizer.thinkStart))
            let maxNew = bundle.generation.maxNewTokens
            let result = try await Task.detached {
                try await engine.generate(prompt: prompt, maxNewTokens: maxNew, reply: reply) { chunks in
                    DispatchQueue.main.async {  // FIFO: chunks are shown in the order they came
                        MainActor.assumeIsolated { self.show(chunks) }
                    }
                }
            }.value
            let shown = await Self.drained(answer: { self.answer })
            history.append(Message(role: "assistant", content: shown.trimmingCharacters(in: .whitespacesAndNewlines)))
            turns.append(Turn(role: "Assistant", text: shown.trimmingCharacters(in: .whitespacesAndNewlines)))
            answer = ""
            stats = result.summary
        } catch {
            history.removeLast()
            stats = "error: \((error as? LocalizedError)?.errorDescription ?? String(describing: error))"
        }
    }

    private func show(_ chunks: [Chunk]) {
        for chunk in chunks {
            if chunk.kind == .thinking { thinking += chunk.text } else { answer += chunk.text }
        }
    }

    /// The answer once every chunk queued on the main queue before now has been shown.
    private static func drained(answer: @escaping @MainActor () -> String) async -> String {
        await withCheckedContinuation { continuation in
            DispatchQueue.main.async { MainActor.assumeIsolated { continuation.resume(returning: answer()) } }
        }
    }
}
