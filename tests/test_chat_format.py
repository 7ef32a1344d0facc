"""The chat format as data (manifest `tokenizer.chat_format`) rebuilds the Jinja rendering exactly, for the
default model's template and for Qwen2 ChatML, Llama-3 and DeepSeek-R1-Distill style templates; a template
that cannot be expressed as per-role prefix/suffix pieces is marked so."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgepack.chat_format import CHECK_CONVERSATIONS, apply_chat_format, derive_chat_format
from edgepack.runtime.tokenizer import BundleTokenizer

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
# Conversations beyond the ones the exporter checks itself: odd whitespace, an empty system message, unicode.
MORE_CONVERSATIONS = [
    [{"role": "system", "content": ""}, {"role": "user", "content": "  padded  "}],
    [{"role": "user", "content": "naïve café — 日本語?"}, {"role": "assistant", "content": "Oui."},
     {"role": "user", "content": "\nline one\nline two\n"}],
]


def renderer(template: str, bos: str, eos: str):
    return BundleTokenizer(None, config={"bos_token": bos, "eos_token": eos}, chat_template=template).render_chat


def templates(default_student) -> dict[str, tuple[str, str, str]]:
    return {
        "smollm2 (default model)": (default_student.chat_template, "<|im_start|>", "<|im_end|>"),
        "qwen2 chatml": ((TEMPLATES / "qwen2_chatml.jinja").read_text(), "", "<|im_end|>"),
        "llama3": ((TEMPLATES / "llama3.jinja").read_text(), "<|begin_of_text|>", "<|eot_id|>"),
        "r1 distill": ((TEMPLATES / "r1_distill.jinja").read_text(), "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    }


def test_chat_format_rebuilds_every_template(default_student):
    checked = 0
    for name, (template, bos, eos) in templates(default_student).items():
        render = renderer(template, bos, eos)
        fmt = derive_chat_format(render)
        assert fmt["expressible"], (name, fmt)
        for messages in [*CHECK_CONVERSATIONS, *MORE_CONVERSATIONS]:
            for generation in (True, False):
                assert apply_chat_format(fmt, messages, generation) == render(messages, generation), (name, messages)
                checked += 1
    assert checked == 4 * (len(CHECK_CONVERSATIONS) + len(MORE_CONVERSATIONS)) * 2  # templates x conversations x gen


def test_derived_pieces_are_the_templates_own(default_student):
    qwen = derive_chat_format(renderer((TEMPLATES / "qwen2_chatml.jinja").read_text(), "", "<|im_end|>"))
    assert qwen["default_system"] == "You are a helpful coding assistant."
    assert qwen["roles"]["user"] == {"prefix": "<|im_start|>user\n", "suffix": "<|im_end|>\n"}
    assert qwen["generation_prompt"] == "<|im_start|>assistant\n"
    llama = derive_chat_format(renderer((TEMPLATES / "llama3.jinja").read_text(), "<|begin_of_text|>", "x"))
    assert llama["start"] == "<|begin_of_text|>" and llama["default_system"] is None and llama["trim_content"]
    r1 = derive_chat_format(renderer((TEMPLATES / "r1_distill.jinja").read_text(), "<B>", "x"))
    assert r1["drop_thinking"] and r1["generation_prompt"] == "<｜Assistant｜><think>\n"


@pytest.mark.parametrize("template", [
    # the prefix depends on the turn's position
    "{% for m in messages %}[{{ loop.index }}:{{ m.role }}]{{ m.content }}{% endfor %}",
    # the content is rendered twice
    "{% for m in messages %}{{ m.content }}|{{ m.content }}{% endfor %}",
    # system messages are refused
    "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    "{{ m.content }}{% endfor %}",
])
def test_inexpressible_template_is_marked(template):
    fmt = derive_chat_format(renderer(template, "", ""))
    assert fmt["expressible"] is False and fmt["reason"]
