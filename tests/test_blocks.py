"""GGUF 4-bit blocks carried into the int4 recipe: decoding is exact, and the exported program computes
with exactly those weights (no second rounding)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from edgepack import blocks
from edgepack.quantize import BlockOffsetLinear, apply_preset, get_preset
from edgepack.runtime import Session, TorchDecoder

from conftest import random_model, run_sequence, tiny_config
from test_executorch_export import CONTEXT, export


def test_q4_k_decodes_to_exact_blocks_of_32():
    """Q4_K super-blocks (256 values, 6-bit sub-scales and mins) are int4 blocks of 32 with an offset, exactly:
    random super-blocks (any codes, scales and mins llama.cpp can store) decode to what gguf-py dequantizes."""
    rng = np.random.default_rng(3)
    rows, cols = 6, 512
    raw = rng.integers(0, 256, size=(rows, cols // 256, 144), dtype=np.uint8)
    for at in (0, 2):  # d and dmin: finite fp16 (random bytes could be NaN)
        raw[..., at : at + 2] = rng.uniform(-0.05, 0.05, size=(rows, cols // 256)).astype(np.float16)[..., None].view(np.uint8)
    raw = raw.reshape(rows, -1)
    decoded = blocks.decode(raw, "Q4_K", (rows, cols))
    assert decoded.codes.shape == (rows, cols) and decoded.scales.shape == (rows, cols // 32)
    assert int(decoded.codes.min()) >= -8 and int(decoded.codes.max()) <= 7
    expected = dequantize(raw, GGMLQuantizationType.Q4_K)
    np.testing.assert_allclose(decoded.dequantize().numpy(), expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    positive = decoded.with_positive_scales()  # negative d: rewritten exactly, as for Q4_0
    np.testing.assert_allclose(positive.dequantize().numpy(), expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert blocks.supports("Q4_K") and blocks.supports("Q6_K") and not blocks.supports("IQ4_XS")


@pytest.mark.parametrize("kind, size, halves", [("Q5_K", 176, (0, 2)), ("Q6_K", 210, (208,))])
def test_k_quants_above_4_bits_decode_to_exact_int8_blocks(kind, size, halves):
    """Random Q5_K / Q6_K super-blocks (any codes and sub-scales llama.cpp can store) decode into 8-bit codes
    whose dequantization is what gguf-py computes (to float32 rounding)."""
    rng = np.random.default_rng(5)
    rows, cols = 4, 512
    raw = rng.integers(0, 256, size=(rows, cols // 256, size), dtype=np.uint8)
    for at in halves:  # the fp16 super-block scales: finite
        raw[..., at : at + 2] = rng.uniform(-0.05, 0.05, size=(rows, cols // 256)).astype(np.float16)[..., None].view(np.uint8)
    raw = raw.reshape(rows, -1)
    decoded = blocks.decode(raw, kind, (rows, cols))
    assert isinstance(decoded, blocks.Int8Blocks) and decoded.block == (16 if kind == "Q6_K" else 32)
    expected = dequantize(raw, GGMLQuantizationType[kind])  # Q5_K's min folded into the offset: fp32 rounding
    np.testing.assert_allclose(decoded.dequantize().numpy(), expected, rtol=0, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("kind", ["Q8_0", "Q5_0", "Q5_1"])
def test_5_and_8_bit_types_decode_to_exact_int8_blocks(kind):
    weights = np.random.default_rng(2).normal(size=(8, 96)).astype(np.float32)
    raw = quantize(weights, GGMLQuantizationType[kind])
    decoded = blocks.decode(raw, kind, weights.shape)
    assert (decoded.offsets is not None) == (kind == "Q5_1")
    np.testing.assert_array_equal(decoded.dequantize().numpy(), dequantize(raw, GGMLQuantizationType[kind]))
    # The same weights in smaller blocks (how a fused q/k/v matmul holds a Q6_K part next to a Q5_0 one).
    np.testing.assert_array_equal(blocks.Int8Blocks.of(decoded, 16).dequantize().numpy(), decoded.dequantize().numpy())


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_decode_equals_gguf_dequantize(kind):
    weights = np.random.default_rng(1).normal(size=(8, 96)).astype(np.float32)
    qtype = GGMLQuantizationType[kind]
    raw = quantize(weights, qtype)
    decoded = blocks.decode(raw, kind, weights.shape)
    assert decoded.codes.dtype == torch.int8 and int(decoded.codes.min()) >= -8 and int(decoded.codes.max()) <= 7
    assert (decoded.offsets is None) == (kind == "Q4_0")
    np.testing.assert_array_equal(decoded.dequantize().numpy(), dequantize(raw, qtype))


def test_positive_scales_keep_the_weights_exactly():
    weights = np.random.default_rng(2).normal(size=(16, 128)).astype(np.float32)
    decoded = blocks.decode(quantize(weights, GGMLQuantizationType.Q4_0), "Q4_0", weights.shape)
    assert bool((decoded.scales < 0).any())  # GGUF Q4_0 scales are signed
    positive = decoded.with_positive_scales()
    assert bool((positive.scales >= 0).all())
    assert int(positive.codes.min()) >= -8 and int(positive.codes.max()) <= 7
    torch.testing.assert_close(positive.dequantize(), decoded.dequantize(), rtol=0, atol=1e-6)


def synthetic_blocks(model, kind: str) -> dict[str, blocks.Int4Blocks]:
    """Give every decoder linear GGUF-quantized weights, as a Q4 student has; returns its blocks."""
    qtype = GGMLQuantizationType[kind]
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            raw = quantize(module.weight.detach().numpy(), qtype)
            found[f"{name}.weight"] = blocks.decode(raw, kind, tuple(module.weight.shape))
            module.weight.data = found[f"{name}.weight"].dequantize()
    return found


def test_carried_blocks_are_used_as_they_are():
    model = random_model(tiny_config(), max_context=CONTEXT)
    found = synthetic_blocks(model, "Q4_1")
    quantized = apply_preset(copy.deepcopy(model), get_preset("int4"), found)
    layer = quantized.model.layers[0].mlp.up_proj
    assert isinstance(layer, BlockOffsetLinear)
    assert torch.equal(layer.main.weight.qdata, found["model.layers.0.mlp.up_proj.weight"].codes)
    # Without activation quantization the module computes exactly the student's weights.
    x = torch.randn(3, 64)
    expected = x @ found["model.layers.0.mlp.up_proj.weight"].dequantize().T
    exact = x @ layer.main.weight.dequantize().T + layer.block_sum(x.view(3, 2, 32)).squeeze(-1) @ layer.offsets.weight.dequantize().T
    torch.testing.assert_close(exact, expected, atol=2e-2 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_program_with_carried_blocks_matches_eager(tmp_path, kind):
    model = random_model(tiny_config(), max_context=CONTEXT)
    found = synthetic_blocks(model, kind)
    quantized = apply_preset(copy.deepcopy(model), get_preset("int4"), found)
    tokens = np.random.default_rng(0).integers(0, 320, size=20)
    expected = run_sequence(TorchDecoder(copy.deepcopy(quantized)), tokens)
    # Every position, teacher-forced one token per call (the program returns the last position's logits).
    actual = Session(export(quantized, tmp_path, kind), tokenizer=None).score(tokens)
    # XNNPACK's int8 activation rounding differs slightly from torchao's eager simulation.
    assert np.abs(actual - expected).max() < 0.05 * np.abs(expected).max()
    assert (actual.argmax(-1) == expected.argmax(-1)).mean() >= 0.9
    # And it stays close to the unquantized student whose weights the blocks are.
    reference = run_sequence(TorchDecoder(model), tokens)
    assert (actual.argmax(-1) == reference.argmax(-1)).mean() >= 0.85
