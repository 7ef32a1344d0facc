import SwiftUI
import UniformTypeIdentifiers

/// One screen: open a bundle, chat; the reply streams with its thinking shown apart from the answer, and each
/// turn ends with `edgepack run`'s figures (tokens, tok/s, stop reason).
struct ChatView: View {
    @StateObject private var model = ChatModel()
    @State private var prompt = ""
    @State private var picking = false

    var body: some View {
        NavigationStack {
            VStack(alignment: .leading, spacing: 8) {
                Text(model.status).font(.footnote).textSelection(.enabled)
                ScrollView {
                    VStack(alignment: .leading, spacing: 10) {
                        ForEach(model.turns) { turn in
                            (Text(turn.role + ": ").bold() + Text(verbatim: turn.text)).textSelection(.enabled)
                        }
                        if !model.thinking.isEmpty {
                            Text(model.thinking).italic().foregroundStyle(.secondary)
                        }
                        if !model.answer.isEmpty {
                            Text(model.answer)
                        }
                    }
                    .frame(maxWidth: .infinity, alignment: .leading)
                }
                Text(model.stats).font(.caption.monospaced())
                HStack {
                    TextField("Ask something", text: $prompt, axis: .vertical)
                        .textFieldStyle(.roundedBorder)
                        .lineLimit(1...4)
                    Button(model.generating ? "Stop" : "Send") {
                        if model.generating {
                            model.stop()
                        } else {
                            let text = prompt.trimmingCharacters(in: .whitespacesAndNewlines)
                            prompt = ""
                            Task { await model.send(text) }
                        }
                    }
                    .disabled(!model.ready)
                }
            }
            .padding()
            .navigationTitle("edgepack")
            .toolbar {
                ToolbarItem(placement: .primaryAction) {
                    Button("Open bundle…") { picking = true }.disabled(model.generating)
                }
                ToolbarItem(placement: .secondaryAction) {
                    Button("New chat") { model.newChat() }.disabled(model.generating)
                }
                ToolbarItem(placement: .secondaryAction) {
                    Toggle("Core ML on the Neural Engine (prefill/decode)", isOn: Binding(
                        get: { model.neuralEngine },
                        set: { on in Task { await model.setNeuralEngine(on) } }
                    ))
                    .disabled(model.generating)
                }
            }
            .fileImporter(isPresented: $picking, allowedContentTypes: [.folder]) { result in
                if case .success(let url) = result {
                    Task { await model.importFolder(url) }
                }
            }
            .task { await model.openFirstInDocuments() }
        }
    }
}
