"""The forms the ExecuTorch exporter rewrites the model into so that XNNPACK lowers each layer as one delegate
(`XnnpackProgram`): run eagerly, they must compute what the model computes. Fast: nothing is lowered here;
`test_executorch_export.py` runs the lowered programs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from edgepack.exporters.executorch import XnnpackProgram, rotate_half_matrix
from edgepack.model import apply_rope
from edgepack.quantize import apply_preset, get_preset

from conftest import random_model, tiny_config
from conftest import synthetic_table
from test_blocks import synthetic_blocks

CONTEXT = 64


def test_rotate_half_matrix_is_the_slicing_rotation():
    x = torch.randn(3, 2, 8)
    half = torch.cat([-x[..., 4:], x[..., :4]], dim=-1)
    assert torch.equal(x @ rotate_half_matrix(8).T, half)
    ones, zeros = torch.ones(3, 8), torch.zeros(3, 8)  # cos = 1, sin = 0 leaves x; cos = 0, sin = 1 rotates it
    assert torch.equal(apply_rope(x[None], zeros, ones)[0], half)


def last_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Prefill, then two single-token steps on the cache: the last position's logits of each call."""
    last = (lambda logits: logits) if isinstance(model, XnnpackProgram) else (lambda logits: logits[:, -1])
    rows = [last(model(tokens[None, :5], torch.tensor([0])))]
    for pos in (5, 6):
        rows.append(last(model(tokens[None, pos : pos + 1], torch.tensor([pos]))))
    return torch.cat(rows)


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_program_forms_compute_the_model_in_fp32(architecture):
    model = random_model(tiny_config(architecture), max_context=CONTEXT)
    tokens = torch.randint(0, 320, (7,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = last_logits(copy.deepcopy(model), tokens)
        actual = last_logits(XnnpackProgram(copy.deepcopy(model)), tokens)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_program_forms_keep_carried_q4_1_blocks():
    """Block offsets as a mean times 32 and torchao's linears as quantized_decomposed ops: the same int8
    activation codes and int4 weights, so only the per-token zero point's rounding may differ."""
    model = random_model(tiny_config(), max_context=CONTEXT)
    quantized = apply_preset(copy.deepcopy(model), get_preset("int4"), synthetic_blocks(model, "Q4_1"))
    tokens = torch.randint(0, 320, (7,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = last_logits(copy.deepcopy(quantized), tokens)
        actual = last_logits(XnnpackProgram(copy.deepcopy(quantized)), tokens)
    assert (actual - expected).abs().max() < 0.02 * expected.abs().max()


def test_an_all_zero_weight_group_keeps_its_zeros_with_a_scale_xnnpack_takes():
    """XNNPACK refuses a zero scale (found on Qwen2.5-Coder-0.5B): such a group gets codes 0 and a tiny scale."""
    from edgepack.exporters.executorch import DynamicQuantLinear

    model = apply_preset(random_model(tiny_config(), max_context=CONTEXT), get_preset("int4"))
    linear = model.model.layers[0].mlp.up_proj
    linear.weight.scale[3, 1] = 0.0
    converted = DynamicQuantLinear(linear)
    assert (converted.scale > 0).all()
    assert not converted.qdata[3, 32:64].any() and torch.equal(converted.qdata[4], linear.weight.qdata[4])
    x = torch.randn(5, linear.in_features)
    kept = converted.qdata.float() * converted.scale.repeat_interleave(32, 1)
    torch.testing.assert_close(F.linear(x, kept), F.linear(x, linear.weight.dequantize()))


def test_a_gguf_table_at_8_bits_is_gathered_by_the_int8_kernel_form():
    """int4 keeps a GGUF's Q8_0 table at int8 per row; the program gathers it with `embedding_byte` (fp16 scales),
    which must read back the quantized table, and the model is tied so the output layer is untouched by it."""
    from edgepack.exporters.executorch import PackedEmbedding

    model = random_model(tiny_config(), max_context=CONTEXT)
    found = synthetic_table(model)
    quantized = apply_preset(copy.deepcopy(model), get_preset("int4"), found)
    table = quantized.model.embed_tokens.weight
    assert table.target_dtype == torch.int8
    packed = PackedEmbedding.from_torchao(quantized.model.embed_tokens)
    assert packed is not None and packed.bits == 8
    tokens = torch.arange(0, 320, 7)
    expected = table.dequantize()[tokens]
    torch.testing.assert_close(packed(tokens), expected, atol=1e-3 * expected.abs().max().item(), rtol=0)
    exact = found["model.embed_tokens.weight"].dequantize()[tokens]
    assert (packed(tokens) - exact).abs().max() < 0.01 * exact.abs().max()  # the student's own table, near enough
