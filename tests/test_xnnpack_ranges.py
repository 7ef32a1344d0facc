"""Two-range int8 activations on ExecuTorch (`exporters/xnnpack_ranges.py`, `-q int4 --activation-ranges 2`): the
program must still compute the model (the bias added once, the halves summed exactly) and come closer to the same
weights with unrounded activations than XNNPACK's one rounding per token does, both eagerly and lowered."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from edgepack.errors import UsageError
from edgepack.exporters.executorch import Metadata, XnnpackProgram, lower_to_pte
from edgepack.exporters.xnnpack_ranges import input_limits
from edgepack.quantize import apply_preset, decoded_for_scoring, get_preset
from edgepack.runtime import TorchDecoder
from edgepack.runtime.executorch_backend import ExecuTorchDecoder

from conftest import random_model, run_sequence, tiny_config
from test_executorch_forms import last_logits

CONTEXT, PREFILL = 64, 16
CALIBRATION = list(range(3, 300, 2))  # any tokens but the evaluated ones


def heavy_tailed(architecture: str) -> torch.nn.Module:
    """A tiny random int4 model whose norms give a few channels 12x the others, as real students' norms do:
    per-token int8 then spends its levels on those channels."""
    model = random_model(tiny_config(architecture), max_context=CONTEXT)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param[[3, 40]] *= 12.0
    return apply_preset(model, get_preset("int4"))


def float_activations(model: torch.nn.Module) -> torch.nn.Module:
    """The same quantized weights with unrounded inputs (the gate's lowering reference): what the rounding is
    measured against."""
    return decoded_for_scoring(copy.deepcopy(model))


def split_program(model: torch.nn.Module) -> XnnpackProgram:
    own = copy.deepcopy(model)
    return XnnpackProgram(own, input_limits(own, CALIBRATION))


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])  # qwen2: q/k/v biases, added once after the sum
def test_two_ranges_come_closer_to_unrounded_activations(architecture):
    model = heavy_tailed(architecture)
    tokens = torch.randint(0, 320, (7,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = last_logits(float_activations(model), tokens)
        one = last_logits(XnnpackProgram(copy.deepcopy(model)), tokens)
        two = last_logits(split_program(model), tokens)
    one_error, two_error = (one - exact).abs().mean(), (two - exact).abs().mean()
    assert two_error < 0.5 * one_error, (float(one_error), float(two_error))


def test_every_rounded_input_gets_a_limit_and_the_cache_is_left_empty():
    model = heavy_tailed("llama")
    limits = input_limits(model, CALIBRATION)
    layers = model.config.num_layers
    assert len(limits) == 4 * layers + 1  # q/k/v, o_proj, gate/up, down_proj per layer; the output layer
    assert all(limit > 0 for limit in limits.values())
    assert model.model.norm in limits
    assert all(not layer.self_attn.kv_cache.k.any() for layer in model.model.layers)


def test_an_fp32_model_has_no_rounded_input_to_split():
    model = random_model(tiny_config(), max_context=CONTEXT)
    assert input_limits(model, CALIBRATION) == {}


def test_the_lowered_two_range_program_runs_what_the_forms_compute(tmp_path):
    """Through ExecuTorch's runtime: the same as the eager two-range forms (XNNPACK's rounding vs torch's), and
    closer to unrounded activations than the one-range program."""
    model = heavy_tailed("qwen2")
    tokens = np.random.default_rng(0).integers(0, 320, size=16)
    meta = Metadata(bos_id=1, eos_ids=[2], max_context=CONTEXT, max_prefill=PREFILL, vocab_size=320)

    def lowered(name: str, calibration: list[int] | None) -> np.ndarray:
        path = tmp_path / f"{name}.pte"
        path.write_bytes(lower_to_pte(copy.deepcopy(model), meta, calibration_ids=calibration)[0])
        return run_sequence(ExecuTorchDecoder(path, CONTEXT, 320, PREFILL, last_logits_only=True), tokens)

    rows = [4, 11, *range(12, len(tokens))]  # the last position of each call
    exact = run_sequence(TorchDecoder(float_activations(model)), tokens)[rows]
    program = split_program(model)
    with torch.no_grad():  # the runtime's call pattern (`run_sequence`) on the eager forms: last rows only
        calls = [(0, 5), (5, 12), *((i, i + 1) for i in range(12, len(tokens)))]
        eager = np.concatenate([program(torch.tensor(tokens[a:b])[None], torch.tensor([a])).numpy()
                                for a, b in calls])
    one, two = lowered("one", None), lowered("two", CALIBRATION)
    assert np.abs(two - eager).max() < 0.05 * np.abs(eager).max()
    assert np.abs(two - exact).mean() < 0.5 * np.abs(one - exact).mean()


def test_activation_ranges_are_refused_where_they_mean_nothing():
    from edgepack.export import plan_export

    with pytest.raises(UsageError, match="int8 dynamic activations, not fp32"):
        get_preset("fp32").with_activation_ranges(2)
    with pytest.raises(UsageError, match="not to onnx/cpu"):
        plan_export(None, "host", "int4", backend="onnx/cpu", activation_ranges=2)
    with pytest.raises(UsageError, match="invalid"):
        get_preset("int4").with_activation_ranges(3)


def test_the_manifest_records_two_ranges_and_verify_reads_them_back():
    from edgepack.verify import _preset

    two = get_preset("int4").with_activation_ranges(2)
    assert "activation_ranges" not in get_preset("int4").to_dict()  # other manifests stay as they were
    assert two.to_dict()["activation_ranges"] == 2
    assert _preset({"quantization": two.to_dict()}) == two


def test_a_matrix_passes_two_ranges_to_the_cells_that_take_them(tmp_path):
    from edgepack.matrix import plan_matrix

    cells = plan_matrix(None, ["pixel-9", "host:onnx/cpu"], ["int4"], tmp_path, activation_ranges=2)
    by_name = {cell.name: cell for cell in cells}
    assert by_name["pixel-9-int4"].plan.preset.activation_ranges == 2
    assert by_name["pixel-9-int4"].plan.describe()["quantization"] == "int4 (2 activation ranges)"  # the plan says so
    assert "not to onnx/cpu" in by_name["host-int4"].error
