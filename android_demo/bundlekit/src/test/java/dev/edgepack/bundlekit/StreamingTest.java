package dev.edgepack.bundlekit;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;

import com.google.gson.JsonObject;
import java.util.ArrayList;
import java.util.List;
import org.junit.jupiter.api.DynamicTest;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.TestFactory;

/** Token bytes -> complete characters, a character split across tokens held back until it is whole. */
class StreamingTest {
    @TestFactory
    List<DynamicTest> bytePiecesDecodeAsTheVectorsSay() throws Exception {
        TokenPieces vocab = TokenPieces.fromTokenizerJson(Vectors.bundle().resolve("tokenizer.json"));
        List<DynamicTest> tests = new ArrayList<>();
        for (JsonObject c : Vectors.cases("streaming")) {
            tests.add(DynamicTest.dynamicTest(c.get("name").getAsString(), () -> {
                List<String> hex = Vectors.strings(c, "pieces_hex");
                if (!c.get("ids").isJsonNull()) {
                    List<Integer> ids = Vectors.ints(c, "ids");
                    for (int i = 0; i < ids.size(); i++) {
                        assertArrayEquals(Vectors.hex(hex.get(i)), vocab.bytes(ids.get(i)), "token " + ids.get(i));
                    }
                }
                Utf8StreamDecoder decoder = new Utf8StreamDecoder();
                List<String> emitted = new ArrayList<>();
                for (String piece : hex) {
                    emitted.add(decoder.push(Vectors.hex(piece)));
                }
                emitted.add(decoder.finish());
                assertEquals(Vectors.strings(c, "emitted"), emitted);
                assertEquals(c.get("text").getAsString(), String.join("", emitted));
            }));
        }
        return tests;
    }

    @Test
    void theDecoderStartsCleanAfterFinish() {
        Utf8StreamDecoder decoder = new Utf8StreamDecoder();
        assertEquals("", decoder.push(new byte[] {(byte) 0xe6, (byte) 0x9d}));
        assertEquals("\ufffd", decoder.finish());
        assertEquals("é", decoder.push(new byte[] {(byte) 0xc3, (byte) 0xa9}));
    }

    @Test
    void anIdOutsideTheVocabularyIsRefused() throws Exception {
        TokenPieces vocab = TokenPieces.fromTokenizerJson(Vectors.bundle().resolve("tokenizer.json"));
        assertThrows(IllegalArgumentException.class, () -> vocab.bytes(vocab.vocabSize()));
    }
}
