"""The ExecuTorch exporter on tiny random models: the .pte run by ExecuTorch's runtime must compute what
the eager model computes, for prefill and for single-token decode on top of the in-program KV cache. The
program returns the last position's logits (as ExecuTorch's LLM runner expects); every position is scored
by teacher forcing one token per call (`Session.score`)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from edgepack.exporters.executorch import Metadata, lower_to_pte
from edgepack.quantize import apply_preset, get_preset
from edgepack.runtime import Session, TorchDecoder
from edgepack.runtime.executorch_backend import ExecuTorchDecoder

from conftest import random_model, run_sequence, tiny_config
from conftest import synthetic_table
from test_progress import Recorder

CONTEXT, PREFILL = 64, 16


def export(model, tmp_path, name: str, progress=None):
    meta = Metadata(bos_id=1, eos_ids=[2], max_context=CONTEXT, max_prefill=PREFILL, vocab_size=model.config.vocab_size)
    path = tmp_path / f"{name}.pte"
    pte, _operators = lower_to_pte(copy.deepcopy(model), meta, *([progress] if progress else []))
    path.write_bytes(pte)
    return ExecuTorchDecoder(path, CONTEXT, model.config.vocab_size, PREFILL, last_logits_only=True)


# The positions `run_sequence` gets logits for from a last-position program: the end of each prefill chunk
# (tokens 0-4 and 5-11), then every decoded token.
def last_rows(n: int) -> list[int]:
    return [4, 11, *range(12, n)]


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 320, size=20)


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_fp32_program_matches_eager(tmp_path, tokens, architecture):
    model = random_model(tiny_config(architecture), max_context=CONTEXT)
    expected = run_sequence(TorchDecoder(copy.deepcopy(model)), tokens)
    decoder = export(model, tmp_path, architecture)
    actual = run_sequence(decoder, tokens)
    assert actual.shape == (len(last_rows(len(tokens))), 320)
    np.testing.assert_allclose(actual, expected[last_rows(len(tokens))], atol=2e-4, rtol=1e-4)
    scored = Session(decoder, tokenizer=None).score(tokens)  # teacher forcing: every position
    np.testing.assert_allclose(scored, expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("table", ["float", "Q8_0"])
def test_int4_program_matches_eager_quantized_model(tmp_path, tokens, table):
    """Same torchao int4 recipe, eager vs XNNPACK kernels: differences are rounding only. A GGUF's Q8_0 table
    stays int8 (`embedding_byte`), a float one goes to int4 (`embedding_4bit`)."""
    model = random_model(tiny_config(), max_context=CONTEXT)
    model = apply_preset(model, get_preset("int4"), synthetic_table(model) if table == "Q8_0" else None)
    expected = run_sequence(TorchDecoder(copy.deepcopy(model)), tokens)
    progress = Recorder()
    actual = run_sequence(export(model, tmp_path, "int4", progress), tokens)
    expected = expected[last_rows(len(tokens))]
    # One XNNPACK delegate per layer (between ExecuTorch's cache and attention ops) plus the RoPE tables, the
    # first layer's projections and the output layer, each counted as it is lowered (a piece XNNPACK does not
    # take whole is refused: tests/test_xnnpack_pieces.py).
    (name, total, done), = [stage for stage in progress.stages if stage[1]]
    assert name == "lower to XNNPACK" and total == done == model.config.num_layers + 3
    assert np.abs(actual - expected).max() < 0.05 * np.abs(expected).max()
    assert (actual.argmax(-1) == expected.argmax(-1)).mean() >= 0.9


def test_int4_quantization_changes_the_weights_but_not_the_answer():
    """The preset really quantizes (logits move) yet stays close to fp32 (argmax mostly kept)."""
    fp32 = random_model(tiny_config(), max_context=CONTEXT)
    int4 = apply_preset(copy.deepcopy(fp32), get_preset("int4"))
    tokens = torch.arange(10)[None]
    with torch.no_grad():
        a, b = fp32(tokens, torch.tensor([0])), int4(tokens, torch.tensor([0]))
    assert not torch.allclose(a, b, atol=1e-4)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.95


def test_program_carries_runner_metadata(tmp_path):
    model = random_model(tiny_config(), max_context=CONTEXT)
    decoder = export(model, tmp_path, "meta")
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(decoder.path)
    names = set(program.method_names)
    assert {"forward", "get_bos_id", "get_eos_ids", "get_max_context_len", "get_vocab_size"} <= names
    assert program.load_method("get_max_context_len").execute([])[0] == CONTEXT
    assert program.load_method("get_vocab_size").execute([])[0] == 320
    logits = program.load_method("forward").execute([torch.arange(5)[None], torch.tensor([0])])[0]
    assert tuple(logits.shape) == (1, 320)  # the last position only: the runner's output buffer is one row
