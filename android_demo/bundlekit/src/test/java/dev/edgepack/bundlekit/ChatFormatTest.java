package dev.edgepack.bundlekit;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.gson.JsonObject;
import java.util.ArrayList;
import java.util.List;
import org.junit.jupiter.api.DynamicTest;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.TestFactory;

/** Messages -> the exact prompt text edgepack's runtime renders with the Jinja template. */
class ChatFormatTest {
    @Test
    void theBundlesChatFormatIsTheOneTheVectorsWereRenderedWith() throws Exception {
        JsonObject manifestFormat = Bundle.open(Vectors.bundle(), false).manifest()
                .getAsJsonObject("tokenizer").getAsJsonObject("chat_format");
        assertEquals(Vectors.all().getAsJsonObject("chat_formats").get("bundle"), manifestFormat);
    }

    @TestFactory
    List<DynamicTest> everyConversationRendersAsTheRuntimeRendersIt() throws Exception {
        ChatFormat bundleFormat = Bundle.open(Vectors.bundle(), false).chatFormat();
        JsonObject formats = Vectors.all().getAsJsonObject("chat_formats");
        List<DynamicTest> tests = new ArrayList<>();
        int i = 0;
        for (JsonObject c : Vectors.cases("chat")) {
            String name = c.get("format").getAsString();
            String title = name + " #" + i++;
            tests.add(DynamicTest.dynamicTest(title, () -> {
                if (c.has("error")) {
                    BundleException e = assertThrows(BundleException.class, () -> ChatFormat.fromJson(formats.get(name)));
                    assertTrue(e.getMessage().contains(c.get("error").getAsString()), e.getMessage());
                    return;
                }
                ChatFormat format = name.equals("bundle") ? bundleFormat : ChatFormat.fromJson(formats.get(name));
                String prompt = format.render(Vectors.messages(c), c.get("add_generation_prompt").getAsBoolean());
                assertEquals(c.get("prompt").getAsString(), prompt);
                assertEquals(c.get("inside_think").getAsBoolean(), ChatFormat.endsInsideThink(prompt, "<think>"));
            }));
        }
        return tests;
    }

    @Test
    void aBundleWithoutTemplateGetsThePlainPrompt() throws Exception {
        ChatFormat plain = ChatFormat.fromJson(null);
        assertEquals("Hi", plain.render(List.of(Message.user("Hi")), true));
        assertEquals("system: Be brief.\nuser: Hi\nassistant:",
                plain.render(List.of(Message.system("Be brief."), Message.user("Hi")), true));
        assertTrue(!plain.carriesBos());
    }

    @Test
    void anUnknownRoleIsRefused() throws Exception {
        ChatFormat format = Bundle.open(Vectors.bundle(), false).chatFormat();
        assertThrows(IllegalArgumentException.class, () -> format.render(List.of(new Message("tool", "x")), true));
        assertThrows(IllegalArgumentException.class, () -> format.render(List.of(), true));
    }
}
