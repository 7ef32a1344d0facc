"""Two-range int8 activations on ExecuTorch (`exporters/xnnpack_ranges.py`, `-q int4 --activation-ranges 2`): each
input XNNPACK rounds per token reaches its linear as its own int8 grid (which XNNPACK must keep as it is) and the
grid's residual. The program must still compute the model (bias added once, halves summed exactly, carried Q4_1
offsets) and come far closer to the same weights on unrounded activations than one rounding per token does, both
eagerly and lowered through ExecuTorch's runtime."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from edgepack.errors import UsageError
from edgepack.exporters.executorch import Metadata, XnnpackProgram, lower_to_pte
from edgepack.exporters.xnnpack_ranges import ANCHOR, ResidualRows
from edgepack.quantize import apply_preset, decoded_for_scoring, get_preset
from edgepack.runtime import TorchDecoder
from edgepack.runtime.executorch_backend import ExecuTorchDecoder

from conftest import random_model, run_sequence, tiny_config
from test_blocks import synthetic_blocks
from test_executorch_forms import last_logits

CONTEXT, PREFILL = 64, 16


def heavy_tailed(architecture: str, carried: str | None = None, ranges: int = 1) -> torch.nn.Module:
    """A tiny random int4 model whose norms give a few channels 12x the others, as real students' norms do:
    per-token int8 then spends its levels on those channels. `carried`: GGUF blocks it takes (Q4_1: offsets, which
    the two-range preset keeps in float)."""
    model = random_model(tiny_config(architecture), max_context=CONTEXT)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param[[3, 40]] *= 12.0
    blocks = synthetic_blocks(model, carried) if carried else None
    return apply_preset(model, get_preset("int4").with_activation_ranges(ranges), blocks)


def float_activations(model: torch.nn.Module) -> torch.nn.Module:
    """The same quantized weights with unrounded inputs (the gate's lowering reference): what the rounding is
    measured against."""
    return decoded_for_scoring(copy.deepcopy(model))


def test_the_first_row_is_on_its_own_int8_grid_and_the_rows_sum_back_to_the_input():
    x = torch.randn(5, 64) * torch.linspace(0.1, 9.0, 64)
    rows = ResidualRows()(x)
    grid, residual = rows[:5, :64], rows[5:, :64]
    peak = x.abs().amax(dim=1, keepdim=True)
    codes = grid * 127 / peak
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.round().abs().max() == 127  # int8 codes
    assert (residual.abs() <= peak / 254 * 1.0001).all()  # at most half a step
    torch.testing.assert_close(grid + residual, x, atol=1e-6, rtol=0)
    # The anchors: the first row's range is +-127.5 steps (so XNNPACK's scale is the grid's), the second has none.
    assert torch.allclose(rows[:5, 64:].amax(dim=1), peak[:, 0] * ANCHOR)
    assert torch.allclose(rows[:5, 64:].amin(dim=1), -peak[:, 0] * ANCHOR)
    assert not rows[5:, 64:].any()


def test_every_rounded_input_is_split_and_nothing_else():
    model = heavy_tailed("llama")
    splits = [m for m in XnnpackProgram(copy.deepcopy(model), ranges=2).modules() if isinstance(m, ResidualRows)]
    assert len(splits) == 4 * model.config.num_layers + 1  # q/k/v, o_proj, gate/up, down_proj; the output layer
    fp32 = random_model(tiny_config(), max_context=CONTEXT)
    assert not [m for m in XnnpackProgram(fp32, ranges=2).modules() if isinstance(m, ResidualRows)]


@pytest.mark.parametrize("architecture,carried", [("llama", None), ("qwen2", None), ("llama", "Q4_1")])
def test_two_ranges_come_close_to_unrounded_activations(architecture, carried):
    """qwen2: q/k/v biases, added once after the sum; Q4_1: the carried blocks' offsets read block means, split too."""
    model, model_two = heavy_tailed(architecture, carried), heavy_tailed(architecture, carried, ranges=2)
    tokens = torch.randint(0, 320, (7,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        one = last_logits(XnnpackProgram(copy.deepcopy(model)), tokens)
        one_error = (one - last_logits(float_activations(model), tokens)).abs().mean()
        two = last_logits(XnnpackProgram(copy.deepcopy(model_two), ranges=2), tokens)
        two_error = (two - last_logits(float_activations(model_two), tokens)).abs().mean()
    assert two_error < 0.05 * one_error, (float(one_error), float(two_error))


def test_the_lowered_two_range_program_runs_what_the_forms_compute(tmp_path):
    """Through ExecuTorch's runtime: the same as the eager forms (XNNPACK's own rounding of the grid row changes
    nothing), and far closer to unrounded activations than the one-range program."""
    model = heavy_tailed("qwen2", ranges=2)
    tokens = np.random.default_rng(0).integers(0, 320, size=16)
    meta = Metadata(bos_id=1, eos_ids=[2], max_context=CONTEXT, max_prefill=PREFILL, vocab_size=320)

    def lowered(ranges: int) -> np.ndarray:
        path = tmp_path / f"{ranges}.pte"
        path.write_bytes(lower_to_pte(copy.deepcopy(model), meta, ranges=ranges)[0])
        return run_sequence(ExecuTorchDecoder(path, CONTEXT, 320, PREFILL, last_logits_only=True), tokens)

    rows = [4, 11, *range(12, len(tokens))]  # the last position of each call
    exact = run_sequence(TorchDecoder(float_activations(model)), tokens)[rows]
    program = XnnpackProgram(copy.deepcopy(model), ranges=2)
    with torch.no_grad():  # the runtime's call pattern (`run_sequence`) on the eager forms: last rows only
        calls = [(0, 5), (5, 12), *((i, i + 1) for i in range(12, len(tokens)))]
        eager = np.concatenate([program(torch.tensor(tokens[a:b])[None], torch.tensor([a])).numpy()
                                for a, b in calls])
    one, two = lowered(1), lowered(2)
    assert np.abs(two - eager).max() < 0.01 * np.abs(eager).max()
    # Measured 0.19: what is left is not rounding but XNNPACK's bf16 copy of the block scales (NOTES.md).
    assert np.abs(two - exact).mean() < 0.3 * np.abs(one - exact).mean(), (
        float(np.abs(two - exact).mean()), float(np.abs(one - exact).mean()))


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
