"""Bundles open unchanged in the runtimes apps embed, through those runtimes' own Python bindings:
onnxruntime-genai (ONNX bundles, with its shared past/present buffer), ExecuTorch's C++ LLM runner
(`TextLLMRunner`, .pte bundles) and transformers (tokenizer_config.json). Tiny random students over the default
model's real tokenizer; the default model itself is in the slow tests at the end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgepack import runtime
from edgepack.export import plan_export, run_export

from conftest import random_model, tiny_config, write_student_folder

CONTEXT = 256
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]


def export(folder, out, backend: str, quant: str = "fp32"):
    run_export(plan_export(str(folder), "host", quant=quant, max_context=CONTEXT, output=out, backend=backend,
                           verify=False))
    return out


@pytest.fixture(scope="module")
def student_folder(tmp_path_factory, default_student):
    """A tiny Llama over SmolLM2's vocabulary whose untied output layer can only pick tokens that decode to
    printable ASCII on their own (ExecuTorch's Python runner binding hands each token's bytes to a `str`
    callback, which a partial UTF-8 character breaks), plus an end-of-turn row that wins within ~10 steps:
    each reply ends on EOS, as real ones do."""
    from tokenizers import Tokenizer

    cfg = tiny_config(vocab_size=default_student.config.vocab_size, max_position_embeddings=1024,
                      tie_word_embeddings=False)
    model = random_model(cfg, max_context=CONTEXT)
    tok = Tokenizer.from_str(default_student.tokenizer_files["tokenizer.json"].decode())
    texts = [tok.decode([i], skip_special_tokens=False) for i in range(cfg.vocab_size)]
    ascii_ok = torch.tensor([bool(t) and t.isascii() and t.isprintable() and "<|" not in t for t in texts])
    eos = default_student.eos_ids[0]
    with torch.no_grad():
        head = model.lm_head.weight
        head[~ascii_ok] = 0.0
        head[eos] = 3.0 * head[ascii_ok].mean(0) / head[ascii_ok].mean(0).norm() * head[ascii_ok].norm(dim=1).mean()
    return write_student_folder(tmp_path_factory.mktemp("apps") / "student", default_student, cfg, model)


# --- onnxruntime-genai ---------------------------------------------------------------------------------------


def genai_greedy(bundle, ids: list[int], new_tokens: int) -> list[int]:
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(bundle))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens([ids])
    out: list[int] = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_onnxruntime_genai_runs_the_bundle_on_its_shared_buffer(student_folder, tmp_path, quant):
    bundle = export(student_folder, tmp_path / quant, "onnx/cpu", quant)
    config = json.loads((bundle / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is True
    assert_genai_equals_edgepack_run(bundle)


def assert_genai_equals_edgepack_run(bundle, new_tokens: int = 48) -> None:
    """Greedy token ids of onnxruntime-genai and of `edgepack run` (the runtime API) on each prompt."""
    session = runtime.load(bundle)
    eos = set(session.tokenizer.end_ids)
    for prompt in PROMPTS:
        ours = session.complete(prompt, max_new_tokens=new_tokens)
        _, ids = session.prompt_ids(prompt)
        theirs = genai_greedy(bundle, ids, new_tokens)
        if theirs and theirs[-1] in eos:  # genai returns the EOS it stopped on; edgepack does not emit it
            theirs = theirs[:-1]
        assert theirs == ours.token_ids, prompt


def test_genai_tokenizer_and_chat_template_match_the_bundle(student_folder, tmp_path):
    og = pytest.importorskip("onnxruntime_genai")
    bundle = export(student_folder, tmp_path / "b", "onnx/cpu")
    session = runtime.load(bundle)
    text, ids = session.prompt_ids(PROMPTS[0])
    tokenizer = og.Tokenizer(og.Model(str(bundle)))
    assert list(tokenizer.encode(text)) == ids


def test_ort_backend_writes_the_cache_in_place(student_folder, tmp_path):
    """One max-length buffer per layer, bound as past and present: GroupQueryAttention appends in place."""
    bundle = export(student_folder, tmp_path / "b", "onnx/cpu")
    decoder = runtime.load(bundle).decoder
    buffer = decoder.cache["past_key_0"]
    assert buffer.shape[2] == CONTEXT
    decoder.forward(np.arange(5), 0)
    decoder.forward(np.arange(1), 5)
    filled = np.abs(buffer).sum(axis=(0, 1, 3))
    assert (filled[:6] > 0).all() and (filled[6:] == 0).all()


# --- ExecuTorch's LLM runner ---------------------------------------------------------------------------------


def runner_stream(bundle, prompt_text: str, new_tokens: int) -> list[str]:
    llm = pytest.importorskip("executorch.extension.llm.runner")
    pieces: list[str] = []
    runner = llm.TextLLMRunner(str(bundle / "model.pte"), str(bundle))  # the folder: tokenizer_config.json too
    runner.generate(prompt_text, llm.GenerationConfig(echo=False, max_new_tokens=new_tokens, temperature=0.0),
                    pieces.append, None)
    return pieces


def test_text_llm_runner_streams_what_edgepack_run_streams(student_folder, tmp_path):
    bundle = export(student_folder, tmp_path / "et", "executorch/xnnpack")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["backend"]["logits"] == "last"
    assert "custom_ops" in manifest["backend"]["kernel_libraries"]["cmake"]
    session = runtime.load(bundle)
    stop_texts = manifest["tokenizer"]["stop_texts"]
    reasons = []
    for prompt in PROMPTS:
        ours = session.complete(prompt, max_new_tokens=32)
        reasons.append(ours.stats.stop_reason)
        text, _ = session.prompt_ids(prompt)
        pieces = runner_stream(bundle, text, 32)
        # The runner hands the end token's text to the callback before it stops; apps drop `stop_texts`.
        assert (pieces[-1] in stop_texts) == (ours.stats.stop_reason == "eos"), prompt
        streamed = "".join(p for p in pieces if p not in stop_texts)
        assert streamed == ours.text, prompt
        assert not any(s in streamed for s in stop_texts)
    assert "eos" in reasons  # the student's EOS row wins in some reply: the end-token path was exercised


# --- tokenizer_config.json as other libraries read it ----------------------------------------------------------


def test_tokenizer_config_is_standard_and_transformers_renders_the_same_prompt(student_folder, tmp_path):
    transformers = pytest.importorskip("transformers")
    bundle = export(student_folder, tmp_path / "b", "onnx/cpu")
    config = json.loads((bundle / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not {"is_local", "local_files_only", "backend"} & set(config)
    assert isinstance(config["bos_token"], str) and isinstance(config["eos_token"], str)
    hf = transformers.AutoTokenizer.from_pretrained(str(bundle))
    session = runtime.load(bundle)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[1]}]
    text, ids = session.prompt_ids(messages)
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
    assert hf(text, add_special_tokens=False)["input_ids"] == ids
    chat_format = json.loads((bundle / "manifest.json").read_text())["tokenizer"]["chat_format"]
    assert chat_format["expressible"] is True


# --- the default model (slow) ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_onnx_bundles(tmp_path_factory):
    out = tmp_path_factory.mktemp("default-onnx")
    return {q: export_default(out / q, q) for q in ("fp32", "int4")}


def export_default(out, quant):
    run_export(plan_export(None, "host", quant=quant, max_context=1024, output=out, backend="onnx/cpu",
                           verify=False))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_genai_equals_edgepack_run_on_the_default_model(default_onnx_bundles, quant):
    assert_genai_equals_edgepack_run(default_onnx_bundles[quant])


def assert_runner_equals_edgepack_run(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    session = runtime.load(bundle)
    stop_texts = manifest["tokenizer"]["stop_texts"]
    for prompt in ["Name the capital city of France.", "What is 2 + 2?"]:
        ours = session.complete(prompt, max_new_tokens=48)
        text, _ = session.prompt_ids(prompt)
        pieces = runner_stream(bundle, text, 48)
        streamed = "".join(p for p in pieces if p not in stop_texts)
        assert streamed == ours.text, prompt


@pytest.mark.slow
def test_text_llm_runner_on_the_default_int4_bundle(default_int4_bundle):
    assert_runner_equals_edgepack_run(default_int4_bundle)


@pytest.mark.slow
def test_text_llm_runner_on_a_two_range_int4_bundle(tmp_path):
    """`--activation-ranges 2`: the residual rows live inside the XNNPACK delegates, so the program calls the same
    operators and ExecuTorch's own runner opens it unchanged (measured: the same text for both prompts)."""
    run_export(plan_export(None, "pixel-9", output=tmp_path / "two", activation_ranges=2))
    assert_runner_equals_edgepack_run(tmp_path / "two")
