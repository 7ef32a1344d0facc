"""Two-range activations for XNNPACK's dynamic int8 linears: an int8 input rounded twice, so it is nearly exact.

XNNPACK's qd8 kernels round a linear's input to int8 once per token: one scale, set by the token's largest value,
for all of its channels. The norms' and the MLP's outputs carry a few values many times larger than the rest, so
most channels get a handful of levels: on the default model this rounding alone costs ~3 points of top-1 against
fp32 (NOTES.md, "Real students"), where llama.cpp and ONNX Runtime round per block of 32 inputs.

`ResidualRows` hands the linear two rows per token instead of one:
- the input on its own symmetric int8 grid (step = the token's absmax / 127), with two anchor inputs (weight codes 0)
  that set XNNPACK's range to that grid, so XNNPACK's rounding of this row changes nothing (`AnchoredQuantLinear`
  does the same for BitNet's codes);
- what that grid lost (at most half a step), which XNNPACK rounds at 1/255 of its own range.
The linear runs once over the 2T rows (its weights are read once) and the two halves of its output are summed
(`SummedHalves`): the input reaches the weights with ~16 bits instead of 8. The weights are untouched (carried GGUF
blocks stay exact) apart from one zero block of 32 inputs per linear, for the anchors. No calibration.

Opt-in (`-q int4 --activation-ranges 2`; with `-q ternary` only the output layer's input, BitNet's layers take its
own int8 codes): every split linear then computes two rows per token (NOTES.md, "Two-range int8 activations":
measured cost and figures).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgepack.blocks import BLOCK

# 1.5 * 2^23: adding it to |y| < 2^22 leaves a float whose unit in the last place is 1 (round to integer, ties to
# even, as `torch.round`).
ROUNDING_MAGIC = 12582912.0
# The anchors' size in units of the input's absmax: half a code step beyond the largest code, each side, so the
# kernel's range is [-127.5, 127.5] steps and its scale exactly absmax / 127.
ANCHOR = 127.5 / 127


def rounded_per_token(linear: nn.Module) -> bool:
    """Whether the lowered linear rounds its input to int8 per token (dynamic activations; carried Q4_1 blocks)."""
    from edgepack.quantize import BlockOffsetLinear

    if isinstance(linear, BlockOffsetLinear):
        return True
    return getattr(getattr(linear, "weight", None), "activation_quantization", None) is not None


def anchors() -> torch.Tensor:
    """One block of anchor inputs in units of the absmax: +ANCHOR, -ANCHOR and zeros."""
    block = torch.zeros(BLOCK)
    block[0], block[1] = ANCHOR, -ANCHOR
    return block


class Int8Grid(nn.Module):
    """x [T, K] -> (x on its own symmetric int8 grid per token, step absmax / 127; the absmax [T, 1]), in ops XNNPACK
    lowers so that a layer stays one delegate: the absmax a max over a 4-D view's innermost dim (max pooling; it
    takes no `amax`), 127 / absmax a tensor division, and round-half-to-even an fp32 addition of ROUNDING_MAGIC (it
    takes no `round`), which is `torch.round` exactly for |y| < 2^22 (here |y| <= 127). BitNet's int8 activations
    (`executorch.XnnpackInt8Activations`) and the first of the residual rows."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("levels", torch.tensor(127.0), persistent=False)
        self.register_buffer("magic", torch.tensor(ROUNDING_MAGIC), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        width = x.shape[-1]
        x4 = x.view(-1, 1, 1, width)
        peak = x4.abs().max(dim=3, keepdim=True).values
        steps = self.levels / peak.clamp(min=1e-5)
        codes = ((x4 * steps + self.magic) - self.magic).clamp(-128, 127)
        return (codes / steps).view(-1, width), peak.view(-1, 1)


class ResidualRows(nn.Module):
    """x [T, K] -> [[grid, anchors]; [x - grid, 0]] [2T, K + 32] (`Int8Grid`'s grid)."""

    def __init__(self) -> None:
        super().__init__()
        self.grid = Int8Grid()
        self.register_buffer("anchors", anchors(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid, peak = self.grid(x)
        anchors = peak * self.anchors
        return torch.cat([torch.cat([grid, anchors], dim=-1), torch.cat([x - grid, anchors * 0.0], dim=-1)], dim=0)


class SummedHalves(nn.Module):
    """A linear over `ResidualRows` [2T, K + 32] -> [T, N], the two halves of its output summed (exactly: a [1, 2]
    ones matmul over the pairs, since XNNPACK takes no slice of a dynamic tensor), its bias added once."""

    def __init__(self, linear: nn.Module, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.linear, self.bias = linear, bias
        self.register_buffer("ones", torch.ones(1, 2), persistent=False)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        out = self.linear(rows)
        width = out.shape[-1]
        summed = F.linear(out.view(2, -1).permute(1, 0), self.ones).view(-1, width)
        return summed if self.bias is None else summed + self.bias


def padded_float_linear(linear: nn.Linear, extra: int = BLOCK) -> nn.Linear:
    """A float linear with `extra` zero inputs more (over `ResidualRows`: one block of 32, for the anchors)."""
    padded = nn.Linear(linear.in_features + extra, linear.out_features, bias=linear.bias is not None,
                       dtype=linear.weight.dtype)
    with torch.no_grad():
        padded.weight.zero_()
        padded.weight[:, : linear.in_features] = linear.weight
        if linear.bias is not None:
            padded.bias.copy_(linear.bias)
    return padded
