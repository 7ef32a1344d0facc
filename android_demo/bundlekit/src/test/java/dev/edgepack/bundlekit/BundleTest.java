package dev.edgepack.bundlekit;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.gson.JsonObject;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.MessageDigest;
import java.util.ArrayList;
import java.util.List;
import java.util.Locale;
import org.junit.jupiter.api.DynamicTest;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.TestFactory;

/** The bundle the Python exporter wrote opens; every hostile copy of it is refused for the right reason. */
class BundleTest {
    @Test
    void theExportedBundleOpensWithItsChecksums() throws Exception {
        Bundle bundle = Bundle.open(Vectors.bundle());
        assertEquals("onnx", bundle.backendName());
        assertEquals(Vectors.bundle().resolve("model.onnx"), bundle.program());
        assertTrue(Files.size(bundle.program()) > 0);
        assertEquals(256, bundle.contextLength());
        assertTrue(bundle.tokenizer().isEndId(2), "<|im_end|> ends a reply");
        assertEquals(List.of("<|im_end|>"), bundle.tokenizer().stopTexts());
        assertEquals(0.0, bundle.generation().temperature);
        assertTrue(bundle.chatFormat().carriesBos());
        assertEquals(Vectors.bundle().resolve("genai_config.json"), bundle.file("genai_config.json"));
    }

    @TestFactory
    List<DynamicTest> everyHostileCopyIsRefused() {
        List<DynamicTest> tests = new ArrayList<>();
        for (JsonObject c : Vectors.cases("refused")) {
            Path folder = Vectors.folder().resolve(c.get("folder").getAsString());
            String reason = c.get("reason").getAsString();
            tests.add(DynamicTest.dynamicTest(c.get("name").getAsString(), () -> {
                BundleException e = assertThrows(BundleException.class, () -> Bundle.open(folder));
                assertTrue(e.getMessage().contains(reason), e.getMessage() + " should say " + reason);
            }));
        }
        return tests;
    }

    @Test
    void aNameTheManifestDoesNotListIsRefused() throws Exception {
        Bundle bundle = Bundle.open(Vectors.bundle(), false);
        BundleException e = assertThrows(BundleException.class, () -> bundle.file("weights.bin"));
        assertTrue(e.getMessage().contains("not listed"), e.getMessage());
    }

    @Test
    void theVocabularyDecodesToTheTokenizersBytesIdById() throws Exception {
        TokenPieces pieces = TokenPieces.fromTokenizerJson(Vectors.bundle().resolve("tokenizer.json"));
        assertEquals(Vectors.all().get("vocab_size").getAsInt(), pieces.vocabSize());
        MessageDigest digest = MessageDigest.getInstance("SHA-256");
        for (int id = 0; id < pieces.vocabSize(); id++) {
            byte[] piece = pieces.bytes(id);
            digest.update(new byte[] {(byte) (piece.length >>> 24), (byte) (piece.length >>> 16),
                                      (byte) (piece.length >>> 8), (byte) piece.length});
            digest.update(piece);
        }
        StringBuilder hex = new StringBuilder();
        for (byte b : digest.digest()) {
            hex.append(String.format(Locale.ROOT, "%02x", b));
        }
        assertEquals(Vectors.all().get("vocab_digest").getAsString(), hex.toString());
    }

    @Test
    void unsafeNamesAreJudgedAsEdgepackJudgesThem() {
        assertEquals(null, BundlePaths.unsafeReason("model.mlpackage/Data/weights.bin"));
        assertEquals("is an absolute path", BundlePaths.unsafeReason("/etc/passwd"));
        assertEquals("is an absolute path", BundlePaths.unsafeReason("C:model.pte"));
        assertTrue(BundlePaths.unsafeReason("a/../b").contains("plain relative path"));
        assertTrue(BundlePaths.unsafeReason("a//b").contains("plain relative path"));
        assertTrue(BundlePaths.unsafeReason("a\\b").contains("backslash"));
        assertTrue(BundlePaths.unsafeReason("a\nb").contains("control character"));
    }
}
