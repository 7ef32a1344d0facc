"""Acceptance on the embedded default model (SmolLM2-135M-Instruct): real exports through ExecuTorch,
compared against transformers and against the fp32 reference. Slow: each export lowers 30 layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgepack import runtime
from edgepack.evaltext import default_text
from edgepack.intake import default_model_path
from edgepack.model import build_model
from edgepack.runtime import TorchDecoder
from edgepack.verify import teacher_forcing

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived",
]
NEW_TOKENS = 48
EVAL_TOKENS = 1024


@pytest.fixture(scope="module")
def reference(default_student, tmp_path_factory):
    """The fp32 reference: our model definition on the dequantized GGUF weights (proven equal to
    transformers in test_model_parity), behind the same Session API as a bundle."""
    folder = tmp_path_factory.mktemp("tokenizer")
    for name, data in default_student.tokenizer_files.items():
        (folder / name).write_bytes(data)
    tokenizer = runtime.BundleTokenizer.from_files(folder / "tokenizer.json", folder / "tokenizer_config.json")
    model = build_model(default_student.config, default_student.state_dict, max_context=2048)
    return runtime.Session(TorchDecoder(model, max_prefill_chunk=128), tokenizer)


def greedy(decoder, ids: list[int], steps: int) -> list[int]:
    logits = decoder.forward(np.array(ids), 0)[-1]
    out = []
    for i in range(steps):
        out.append(int(logits.argmax()))
        logits = decoder.forward(np.array(out[-1:]), len(ids) + i)[-1]
    return out


def transformers_greedy(ids: list[int], steps: int) -> list[int]:
    transformers = pytest.importorskip("transformers")
    path = default_model_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    hf.eval()
    with torch.no_grad():
        out = hf(torch.tensor([ids]), use_cache=True)
        tokens = []
        for _ in range(steps):
            tokens.append(int(out.logits[0, -1].argmax()))
            out = hf(torch.tensor([tokens[-1:]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


def test_default_fp32_bundle_greedy_equals_transformers(default_fp32_bundle):
    session = runtime.load(default_fp32_bundle)
    assert session.decoder.__class__.__name__ == "ExecuTorchDecoder"
    for prompt in PROMPTS:
        ids = session.tokenizer.encode(prompt)
        ours = greedy(session.decoder, ids, NEW_TOKENS)
        theirs = transformers_greedy(ids, NEW_TOKENS)
        assert ours == theirs, (prompt, session.tokenizer.decode(ours), session.tokenizer.decode(theirs))


def test_default_int4_bundle_is_small(default_int4_bundle):
    size = sum(p.stat().st_size for p in default_int4_bundle.iterdir())
    assert size <= 110e6, f"{size / 1e6:.1f} MB"


def test_default_int4_bundle_tracks_fp32_on_real_text(default_int4_bundle, reference):
    session = runtime.load(default_int4_bundle)
    ids = session.tokenizer.encode(default_text())[: EVAL_TOKENS + 1]
    assert len(ids) == EVAL_TOKENS + 1
    result = teacher_forcing(reference, session, ids)
    print(result.to_dict())
    assert result.top1_agreement >= 0.90
    assert result.perplexity_ratio <= 1.10


def test_default_int4_bundle_answers_coherently(default_int4_bundle):
    """Not "What is the capital of France?": there SmolLM2's fp32 model is at a near tie between "The" (-1.88) and
    "L" (-1.96), and any int8 rounding of activations (llama.cpp's Q8 included, checked) may start in French."""
    session = runtime.load(default_int4_bundle)
    answer = session.complete("Name the capital city of France.", max_new_tokens=32)
    assert "Paris" in answer.text
    assert answer.stats.decode_tokens_per_s > 0 and answer.stats.stop_reason == "eos"
