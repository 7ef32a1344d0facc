package dev.edgepack.demo

import android.os.Bundle as SavedState
import android.os.Handler
import android.os.Looper
import android.view.View
import android.widget.Button
import android.widget.EditText
import android.widget.ScrollView
import android.widget.TextView
import androidx.activity.result.contract.ActivityResultContracts
import androidx.appcompat.app.AppCompatActivity
import dev.edgepack.bundlekit.Bundle
import dev.edgepack.bundlekit.ChatFormat
import dev.edgepack.bundlekit.Chunk
import dev.edgepack.bundlekit.GenerationDefaults
import dev.edgepack.bundlekit.Message
import java.io.File
import java.util.concurrent.Executors

/**
 * One screen: open a bundle (picked folder, copied into app storage, or a path on the device), verify it, chat.
 * The conversation is rendered with the bundle's chat format on every turn; the reply streams with its thinking
 * shown apart from the answer, and the turn ends with `edgepack run`'s figures (tokens, tok/s, stop reason).
 */
class MainActivity : AppCompatActivity() {
    private val worker = Executors.newSingleThreadExecutor()  // bundle checks and generation, one at a time
    private val main = Handler(Looper.getMainLooper())
    private lateinit var store: BundleStore
    private lateinit var views: Views

    // Touched on the worker thread only, except `engine.stop()`.
    @Volatile private var engine: ChatEngine? = null
    private var bundle: Bundle? = null
    private var chatFormat: ChatFormat? = null
    private var defaults: GenerationDefaults? = null
    private val history = mutableListOf<Message>()
    @Volatile private var generating = false

    private class Views(activity: AppCompatActivity) {
        val pickFolder: Button = activity.findViewById(R.id.pickFolder)
        val newChat: Button = activity.findViewById(R.id.newChat)
        val bundlePath: EditText = activity.findViewById(R.id.bundlePath)
        val loadPath: Button = activity.findViewById(R.id.loadPath)
        val status: TextView = activity.findViewById(R.id.status)
        val scroll: ScrollView = activity.findViewById(R.id.scroll)
        val transcript: TextView = activity.findViewById(R.id.transcript)
        val thinking: TextView = activity.findViewById(R.id.thinking)
        val answer: TextView = activity.findViewById(R.id.answer)
        val stats: TextView = activity.findViewById(R.id.stats)
        val prompt: EditText = activity.findViewById(R.id.prompt)
        val send: Button = activity.findViewById(R.id.send)
    }

    private val pickFolder = registerForActivityResult(ActivityResultContracts.OpenDocumentTree()) { uri ->
        if (uri != null) {
            runOnWorker("copying the bundle into app storage…") { open(store.import(uri)) }
        }
    }

    override fun onCreate(savedInstanceState: SavedState?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_main)
        store = BundleStore(this)
        views = Views(this)
        views.bundlePath.setText(store.bundles().firstOrNull()?.path ?: store.pushedRoot?.path.orEmpty())
        views.pickFolder.setOnClickListener { pickFolder.launch(null) }
        views.loadPath.setOnClickListener {
            val path = File(views.bundlePath.text.toString().trim())
            runOnWorker("checking $path…") { open(path) }
        }
        views.newChat.setOnClickListener { if (!generating) clearChat() }
        views.send.setOnClickListener { if (generating) engine?.stop() else send() }
    }

    /** Verify the bundle (manifest, every file's size and sha256), read its chat format, open its runtime. */
    private fun open(folder: File) {
        engine?.close()
        engine = null
        val opened = Bundle.open(folder.toPath())
        val format = opened.chatFormat()  // refuses a template that cannot be applied without Jinja
        val runtime = ChatEngine.open(opened)
        bundle = opened
        chatFormat = format
        defaults = opened.generation()
        engine = runtime
        history.clear()
        val model = opened.manifest().getAsJsonObject("model")?.get("name")?.asString ?: folder.name
        val files = opened.manifest().getAsJsonObject("files").size()
        main.post {
            views.status.text = "$model · ${opened.backendName()} · context ${opened.contextLength()} · " +
                "$files files verified · ${runtime.description}"
            views.transcript.text = ""
            views.thinking.text = ""
            views.thinking.visibility = View.GONE
            views.answer.text = ""
            views.send.isEnabled = true
        }
    }

    private fun send() {
        val text = views.prompt.text.toString().trim()
        val runtime = engine
        val format = chatFormat
        val tokenizer = bundle?.tokenizer()
        if (text.isEmpty() || runtime == null || format == null || tokenizer == null) return
        views.prompt.setText("")
        views.transcript.append(if (views.transcript.text.isEmpty()) "You: $text" else "\n\nYou: $text")
        views.thinking.text = ""
        views.thinking.visibility = View.GONE
        views.answer.text = ""
        views.stats.text = ""
        setGenerating(true)
        worker.execute {
            try {
                history.add(Message.user(text))
                val prompt = format.render(history, true)
                val reply = runtime.newReply(emptyList(), ChatFormat.endsInsideThink(prompt, tokenizer.thinkStart()))
                val answer = StringBuilder()
                val stats = runtime.generate(prompt, defaults!!.maxNewTokens, reply) { chunks ->
                    for (chunk in chunks) if (chunk.kind == Chunk.Kind.ANSWER) answer.append(chunk.text)
                    main.post { show(chunks) }
                }
                history.add(Message.assistant(answer.toString().trim()))
                main.post {
                    views.transcript.append("\n\nAssistant: ${answer.toString().trim()}")
                    views.answer.text = ""
                    views.stats.text = stats.describe()
                }
            } catch (e: Exception) {
                history.removeLastOrNull()
                main.post { views.stats.text = "error: ${e.message}" }
            } finally {
                main.post { setGenerating(false) }
            }
        }
    }

    private fun show(chunks: List<Chunk>) {
        for (chunk in chunks) {
            if (chunk.kind == Chunk.Kind.THINKING) {
                views.thinking.visibility = View.VISIBLE
                views.thinking.append(chunk.text)
            } else {
                views.answer.append(chunk.text)
            }
        }
        views.scroll.post { views.scroll.fullScroll(View.FOCUS_DOWN) }
    }

    private fun clearChat() {
        worker.execute { history.clear() }
        views.transcript.text = ""
        views.thinking.text = ""
        views.thinking.visibility = View.GONE
        views.answer.text = ""
        views.stats.text = ""
    }

    private fun setGenerating(on: Boolean) {
        generating = on
        views.send.setText(if (on) R.string.stop else R.string.send)
        views.pickFolder.isEnabled = !on
        views.loadPath.isEnabled = !on
        views.newChat.isEnabled = !on
    }

    /** Run a bundle step off the UI thread; its error (one line: problem; fix) goes to the status line. */
    private fun runOnWorker(message: String, work: () -> Unit) {
        views.status.text = message
        views.send.isEnabled = false
        worker.execute {
            try {
                work()
            } catch (e: Exception) {
                main.post { views.status.text = "error: ${e.message}" }
            }
        }
    }

    override fun onDestroy() {
        engine?.stop()
        worker.execute { engine?.close() }
        worker.shutdown()
        super.onDestroy()
    }
}
