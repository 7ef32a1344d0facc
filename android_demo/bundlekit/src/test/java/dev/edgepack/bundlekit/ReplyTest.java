package dev.edgepack.bundlekit;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import java.util.ArrayList;
import java.util.List;
import java.util.Set;
import org.junit.jupiter.api.DynamicTest;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.TestFactory;

/** Think splitting, stop handling and whole replies, as edgepack's runtime streams them. */
class ReplyTest {
    @TestFactory
    List<DynamicTest> thinkTextIsShownApartFromTheAnswer() {
        List<DynamicTest> tests = new ArrayList<>();
        for (JsonObject c : Vectors.cases("think")) {
            tests.add(DynamicTest.dynamicTest(c.get("name").getAsString(), () -> {
                List<String> tags = Vectors.strings(c, "tags");
                ThinkSplitter splitter = new ThinkSplitter(tags.get(0), tags.get(1), c.get("inside").getAsBoolean());
                List<Chunk> chunks = new ArrayList<>();
                for (String feed : Vectors.strings(c, "feeds")) {
                    chunks.addAll(splitter.feed(feed));
                }
                chunks.addAll(splitter.flush());
                assertEquals(Vectors.chunks(c, "chunks"), chunks);
            }));
        }
        return tests;
    }

    @TestFactory
    List<DynamicTest> runnerTextStopsOnEndTextsAndStopStrings() {
        List<DynamicTest> tests = new ArrayList<>();
        for (JsonObject c : Vectors.cases("stop")) {
            tests.add(DynamicTest.dynamicTest(c.get("name").getAsString(), () -> {
                TokenizerInfo info = new TokenizerInfo("tokenizer.json", null, false, Set.of(2),
                        Vectors.strings(c, "stop_texts"), "<think>", "</think>", null);
                ReplyStream reply = new ReplyStream(info, null, Vectors.strings(c, "stop_strings"), false);
                List<Chunk> chunks = new ArrayList<>();
                for (String piece : Vectors.strings(c, "pieces")) {
                    chunks.addAll(reply.pushText(piece));
                    if (reply.isDone()) {
                        break;
                    }
                }
                chunks.addAll(reply.finish());
                assertEquals(c.get("text").getAsString(), Vectors.joined(chunks, Chunk.Kind.ANSWER));
                assertEquals(reason(c), reply.stopReason());
            }));
        }
        return tests;
    }

    @TestFactory
    List<DynamicTest> generatedIdsStreamAsTheRuntimeStreamedThem() throws Exception {
        Bundle bundle = Bundle.open(Vectors.bundle(), false);
        TokenPieces vocab = TokenPieces.fromTokenizerJson(bundle.file(bundle.tokenizer().file()));
        List<DynamicTest> tests = new ArrayList<>();
        for (JsonObject c : Vectors.cases("replies")) {
            tests.add(DynamicTest.dynamicTest(c.get("name").getAsString(), () -> {
                ReplyStream reply = new ReplyStream(bundle.tokenizer(), vocab, Vectors.strings(c, "stop_strings"),
                        c.get("inside_think").getAsBoolean());
                List<Chunk> chunks = new ArrayList<>();
                for (int id : Vectors.ints(c, "ids")) {
                    chunks.addAll(reply.pushToken(id));
                    if (reply.isDone()) {
                        break;
                    }
                }
                chunks.addAll(reply.finish());
                assertEquals(Vectors.chunks(c, "chunks"), runs(chunks));
                assertEquals(reason(c), reply.stopReason());
                if (c.has("runtime")) {
                    assertEquals(c.getAsJsonObject("runtime").get("text").getAsString(),
                            Vectors.joined(chunks, Chunk.Kind.ANSWER));
                }
            }));
        }
        return tests;
    }

    @Test
    void nothingIsShownAfterTheEnd() throws Exception {
        Bundle bundle = Bundle.open(Vectors.bundle(), false);
        ReplyStream reply = new ReplyStream(bundle.tokenizer(), null, List.of(), false);
        assertEquals(List.of(new Chunk(Chunk.Kind.ANSWER, "Hi")), reply.pushText("Hi"));
        assertTrue(reply.pushText("<|im_end|>").isEmpty());
        assertTrue(reply.isDone());
        assertTrue(reply.pushText("more").isEmpty());
        assertEquals(1, reply.tokens());
    }

    @Test
    void throughputIsCountedAsEdgepackRunCountsIt() {
        Throughput t = new Throughput(0L, 40);
        t.token(500_000_000L);  // first token after 0.5 s: 80 prompt tok/s
        for (int i = 1; i <= 10; i++) {
            t.token(500_000_000L + i * 100_000_000L);  // then one every 0.1 s
        }
        assertEquals(80.0, t.prefillTokensPerS(), 1e-9);
        assertEquals(10.0, t.decodeTokensPerS(), 1e-9);
        assertEquals(11, t.tokens());
    }

    /** Adjacent chunks of one kind joined (the vectors' replies are runs: where text breaks between chunks
     * depends on how long a decoder holds a partial character back). */
    private static List<Chunk> runs(List<Chunk> chunks) {
        List<Chunk> out = new ArrayList<>();
        for (Chunk c : chunks) {
            Chunk last = out.isEmpty() ? null : out.get(out.size() - 1);
            if (last != null && last.kind == c.kind) {
                out.set(out.size() - 1, new Chunk(c.kind, last.text + c.text));
            } else {
                out.add(c);
            }
        }
        return out;
    }

    private static ReplyStream.StopReason reason(JsonObject c) {
        JsonElement r = c.get("stop_reason");
        return r == null || r.isJsonNull() ? null : ReplyStream.StopReason.valueOf(r.getAsString().toUpperCase(java.util.Locale.ROOT));
    }
}
