"""Quantization presets on tiny models: what each transformation promises before any backend runs it."""

from __future__ import annotations

import copy

import numpy as np
import torch

from edgepack.quantize import (
    BlockOffsetLinear, apply_preset, decoded_for_scoring, get_preset, park_quantized, piece_quantizer,
    smooth_output_layer,
)
from edgepack.runtime import TorchDecoder

from conftest import random_model, tiny_config
from test_blocks import synthetic_blocks


def logits(model, tokens):
    return TorchDecoder(copy.deepcopy(model)).forward(tokens, 0)


def int4_over_q4_1(model):
    """A copy of `model` at the int4 preset over Q4_1 blocks made from its weights (carried blocks, torchao's
    tensors and the offset linears all in one model)."""
    return apply_preset(copy.deepcopy(model), get_preset("int4"), synthetic_blocks(model, "Q4_1"))


def test_output_layer_smoothing_keeps_the_float_math():
    model = random_model(tiny_config(), max_context=64)
    with torch.no_grad():  # one loud channel, as real final-norm outputs have
        model.model.norm.weight[3] = 25.0
    tokens = np.random.default_rng(0).integers(0, 320, size=24)
    before = logits(model, tokens)
    smoothed = copy.deepcopy(model)
    smooth_output_layer(smoothed, tokens.tolist())
    assert not torch.equal(smoothed.lm_head.weight, model.lm_head.weight)  # it moved something
    assert smoothed.lm_head.weight is not smoothed.model.embed_tokens.weight  # the table is untouched
    torch.testing.assert_close(smoothed.model.embed_tokens.weight, model.model.embed_tokens.weight)
    np.testing.assert_allclose(logits(smoothed, tokens), before, atol=1e-4, rtol=1e-4)


def test_smoothing_helps_int8_activations_on_an_outlier_channel():
    model = random_model(tiny_config(), max_context=64)
    with torch.no_grad():
        model.model.norm.weight[3] = 60.0
    tokens = np.random.default_rng(1).integers(0, 320, size=48)
    reference = logits(model, tokens)
    plain = logits(apply_preset(copy.deepcopy(model), get_preset("int8")), tokens)
    smoothed = logits(apply_preset(copy.deepcopy(model), get_preset("int8"), calibration_ids=tokens.tolist()), tokens)
    assert np.abs(smoothed - reference).mean() < np.abs(plain - reference).mean()


def test_streamed_smoothing_equals_the_built_models():
    """The calibration pass run one piece at a time (no float model built) gives the built model's scale."""
    from edgepack.quantize import output_absmax, smoothing_scale, streamed_smoothing

    cfg = tiny_config()
    model = random_model(cfg, max_context=64)
    ids = torch.randint(0, cfg.vocab_size, (48,), generator=torch.Generator().manual_seed(3)).tolist()
    built = smoothing_scale(output_absmax(model, ids), model.lm_head.weight)
    streamed = streamed_smoothing(cfg, model.state_dict(), ids, max_context=64).head
    torch.testing.assert_close(streamed, built, rtol=1e-4, atol=1e-6)


def test_layer_smoothing_keeps_carried_blocks_exact_and_the_float_math():
    """Block-wise factors (one per 32 inputs) fold into the norms and up's rows: a Q4_1 student's carried codes
    stay as they are (only scales and offsets move), and the smoothed float model computes the same logits."""
    from edgepack.model import model_pieces
    from edgepack.quantize import Smoothing, smooth_layer

    model = random_model(tiny_config(), max_context=64)
    found = synthetic_blocks(model, "Q4_1")
    tokens = np.random.default_rng(2).integers(0, 320, size=24)
    before = logits(model, tokens)
    generator = torch.Generator().manual_seed(4)
    factor = lambda n: torch.rand(n // 32, generator=generator) * 4 + 0.25  # noqa: E731
    cfg = model.config
    smoothing = Smoothing(layers={prefix: {"attn": factor(cfg.hidden_size), "mlp": factor(cfg.hidden_size),
                                           "down": factor(cfg.intermediate_size)}
                                  for prefix, _ in model_pieces(model) if prefix.startswith("model.layers.")})
    smoothed = copy.deepcopy(model)
    with torch.no_grad():
        for prefix, piece in model_pieces(smoothed):
            if prefix in smoothing.layers:
                carried, _ = smooth_layer(piece, prefix, smoothing.layers[prefix], found)
                for key, blocks in carried.items():
                    assert torch.equal(blocks.codes, found[key].codes)  # nothing rounded again
                    torch.testing.assert_close(blocks.dequantize(), smoothed.get_parameter(key), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits(smoothed, tokens), before, atol=1e-4, rtol=1e-4)
    up = smoothed.model.layers[0].mlp.up_proj.weight
    assert not torch.allclose(up, model.model.layers[0].mlp.up_proj.weight)  # it moved something


def test_layer_smoothing_helps_per_token_int8_on_an_outlier_block():
    """A loud block of channels in a norm's output (as real models have) costs every other channel of the token
    its int8 levels; the calibrated factors give them back. Carried Q4_0 blocks and float table and output layer:
    what differs from the float model is the layers' activation rounding."""
    import dataclasses

    model = random_model(tiny_config(), max_context=64)
    found = synthetic_blocks(model, "Q4_0")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:32] *= 40.0
            layer.post_attention_layernorm.weight[32:] *= 40.0
    tokens = np.random.default_rng(1).integers(0, 320, size=48)
    reference = logits(model, tokens)
    layers_only = dataclasses.replace(get_preset("int4"), embedding=None, lm_head=None)
    plain = logits(apply_preset(copy.deepcopy(model), layers_only, found), tokens)
    smoothed = logits(apply_preset(copy.deepcopy(model), layers_only, found, tokens.tolist()), tokens)
    assert np.abs(smoothed - reference).mean() < 0.85 * np.abs(plain - reference).mean()


def test_parked_quantized_model_reads_back_the_same_weights(tmp_path):
    """The export parks its quantized model for the gate (`park_quantized`): read back memory-mapped, it computes
    exactly what it computed, carried Q4_1 blocks and torchao tensors included, so the gate need not quantize
    the student a second time."""
    model = random_model(tiny_config(), max_context=32)
    quantized = int4_over_q4_1(model)
    tokens = torch.randint(0, 320, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = quantized(tokens, torch.tensor([0]))
        quantized.reset_cache()
        loaded = park_quantized(quantized, tmp_path)()
        actual = loaded(tokens, torch.tensor([0]))
    assert isinstance(loaded.model.layers[0].mlp.up_proj, BlockOffsetLinear)
    assert torch.equal(actual, expected)


def test_hqq_by_row_blocks_equals_torchaos_hqq_on_the_whole_tensor(monkeypatch):
    """Weights are rounded by torchao's HQQ one block of rows at a time (`hqq_weight`, 10-27x faster on big tables):
    the same codes and scales as torchao's own config over the whole tensor, for linears and tables, 4 and 8 bits."""
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import (
        Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_,
    )

    import edgepack.quantize as quantize

    monkeypatch.setattr(quantize, "HQQ_BLOCK_WEIGHTS", 64 * 96)  # several blocks of rows in a small matrix
    torch.manual_seed(0)
    for module, recipe, group, bits in (
        (torch.nn.Linear(96, 200), "8da4w", 32, torch.int4),
        (torch.nn.Embedding(300, 128), "4w", 64, torch.int4),
        (torch.nn.Linear(96, 200), "8da8w", 0, torch.int8),
        (torch.nn.Embedding(300, 128), "8w", 0, torch.int8),
    ):
        granularity = PerGroup(group) if group else PerAxis(0)
        if recipe.startswith("8da"):
            config = Int8DynamicActivationIntxWeightConfig(
                weight_dtype=bits, weight_granularity=granularity, intx_choose_qparams_algorithm="hqq_scale_only")
        else:
            config = IntxWeightOnlyConfig(
                weight_dtype=bits, granularity=granularity, intx_choose_qparams_algorithm="hqq_scale_only")
        theirs, ours = copy.deepcopy(module), copy.deepcopy(module)
        quantize_(theirs, config, filter_fn=lambda m, _fqn: True)
        quantize.quantize_modules(ours, recipe, group, lambda m, _fqn: True)
        assert torch.equal(ours.weight.qdata, theirs.weight.qdata)
        assert torch.equal(ours.weight.scale, theirs.weight.scale)
        assert ours.weight.activation_quantization == theirs.weight.activation_quantization
        assert torch.equal(ours.weight.dequantize(), theirs.weight.dequantize())


def test_decoded_for_scoring_is_the_same_weights_on_unrounded_inputs():
    """The lowering's reference (`decoded_for_scoring`): torchao's own weights, bit for bit, with every linear's
    per-token input rounding off (each runtime rounds its own way) and the int table decoded once."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    model = random_model(tiny_config(), max_context=32)
    quantized = int4_over_q4_1(model)
    tokens = torch.randint(0, 320, (1, 9), generator=torch.Generator().manual_seed(1)).numpy()
    rounded = logits(quantized, tokens)
    unrounded = copy.deepcopy(quantized)
    for param in unrounded.parameters():
        if isinstance(param, IntxUnpackedToInt8Tensor):
            param.activation_quantization = None
    expected = logits(unrounded, tokens)
    assert not np.allclose(expected, rounded, atol=1e-4)  # the rounding was there to turn off
    assert isinstance(quantized.model.embed_tokens.weight, IntxUnpackedToInt8Tensor)
    decoded = decoded_for_scoring(quantized)
    assert not isinstance(decoded.model.embed_tokens.weight, IntxUnpackedToInt8Tensor)
    assert isinstance(decoded.model.layers[0].self_attn.q_proj.main.weight, IntxUnpackedToInt8Tensor)
    assert np.array_equal(logits(decoded, tokens), expected)


def test_int4_keeps_5_to_8_bit_gguf_linears_at_8_bits(tmp_path):
    """A GGUF's Q5_0 linears (most of Qwen2.5-Coder-0.5B's Q4_K_M: its 896-wide rows take no K-quant) are kept
    at int8 per output channel by the int4 recipe, not rounded to int4: closer to the student's own weights."""
    import gguf
    import transformers

    from edgepack.intake import load_student
    from edgepack.model import build_model
    from test_intake import SMALL, tiny_state_dict, write_gguf

    cfg = transformers.Qwen2Config(**SMALL, tie_word_embeddings=True)
    path = write_gguf(tmp_path / "tiny.gguf", "qwen2", cfg, tiny_state_dict(cfg), gguf.GGMLQuantizationType.Q5_0)
    student = load_student(str(path))
    model = build_model(student.config, student.state_dict, 64,
                        prepare=piece_quantizer(get_preset("int4"), student.gguf_blocks))
    for name, block in student.gguf_blocks.items():
        if not name.startswith("model.layers."):
            continue
        weight = model.get_parameter(name)
        assert weight.target_dtype == torch.int8 and weight.qdata.shape[1] == weight.block_size[1]  # per channel
        exact = block.dequantize()
        int8_error = (weight.dequantize() - exact).abs().max()
        assert int8_error < 0.25 * (exact.abs().amax(1) / 15).min()  # well inside a Q5_0 step, let alone int4's


def test_layer_smoothing_skips_inputs_of_linears_rounded_again_per_channel():
    """A GGUF's Q5_0 linears are rounded again to int8 per channel (`_wide_blocks`), where a block's factor would
    trade weight error for activation error (Qwen2.5-Coder-0.5B: 97.3% -> 96.5%): their inputs stay as they are."""
    from edgepack.model import model_pieces
    from edgepack.quantize import smooth_layer
    from test_blocks import synthetic_blocks

    model = random_model(tiny_config(), max_context=64)
    wide = synthetic_blocks(model, "Q5_0")
    assert all(type(b).__name__ == "Int8Blocks" for b in wide.values())
    prefix, layer = model_pieces(model)[1]
    norm = layer.input_layernorm.weight.detach().clone()
    factors = {kind: torch.full((n // 32,), 2.0) for kind, n in (("attn", 64), ("mlp", 64), ("down", 128))}
    carried, column_factors = smooth_layer(layer, prefix, factors, wide)
    assert not carried and not column_factors
    assert torch.equal(layer.input_layernorm.weight, norm)
