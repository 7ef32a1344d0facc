"""Two-range activations for XNNPACK's dynamic int8 linears.

XNNPACK's qd8 kernels round a linear's input to int8 once per token: one scale, set by the token's largest value,
for all of its channels. The norms' and the MLP's outputs carry a few values many times larger than the rest, so
most channels get a handful of levels: on the default model this rounding alone costs ~3 points of top-1 against
fp32 (NOTES.md, "Real students"), where llama.cpp and ONNX Runtime round per block of 32 inputs.

Here each rounded input is split at a calibrated magnitude `t` into two rows that are rounded apart:
`clamp(x, -t, t)` (the bulk, now rounded at a step of ~t/127) and `x - clamp(x, -t, t)` (the few values beyond
`t`, zero elsewhere, which int8's zero point keeps exact). The linear runs once over the 2T rows (the weights are
read once) and the two halves of its output are summed. The weights are untouched (carried GGUF blocks stay
exact); what changes is only how finely the activations are rounded. `t` is the 95th percentile of |x| at that
input over held-out calibration text, measured on the quantized model itself (smoothing included).

Opt-in (`-q int4 --activation-ranges 2`): every linear then computes two rows per token, which costs 20-30% of
decode and 30-40% of prefill on this CPU (NOTES.md, "Two-range int8 activations").
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

# Share of an input's values left in the bulk row: measured on the default model (eager, 1024 tokens vs fp32),
# 0.8 / 0.9 / 0.95 / 0.98 gave top-1 96.1 / 96.2 / 96.8 / 96.6% and KL 0.0044 / 0.0039 / 0.0039 / 0.0040.
BULK_QUANTILE = 0.95
CALIBRATION_TOKENS = 512

Limits = Mapping[nn.Module, float]


def input_limits(model: nn.Module, calibration_ids: list[int]) -> dict[nn.Module, float]:
    """`t` for every input XNNPACK rounds per token, keyed by the first module reading it (a layer's q_proj for its
    attention input, o_proj, gate_proj for the MLP input, down_proj; the final norm for the output layer's input).
    Leaves the model's KV cache as it found it (zeroed)."""
    from edgepack.model import CausalLM

    assert isinstance(model, CausalLM)
    seen: dict[nn.Module, float] = {}

    def record(module: nn.Module) -> Any:
        return lambda _m, args: seen.__setitem__(module, _quantile(args[0]))

    readers = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.int8_inputs is not None:  # BitNet: inputs already on an int8 grid (AnchoredQuantLinear)
            continue
        readers += [attn.q_proj, attn.o_proj, mlp.gate_proj, mlp.down_proj]
    hooks = [m.register_forward_pre_hook(record(m)) for m in readers if rounded_per_token(m)]
    ids = torch.tensor(calibration_ids[: min(CALIBRATION_TOKENS, model.max_context)], dtype=torch.long)[None]
    try:
        with torch.no_grad():
            hidden = model.hidden_states(ids, torch.zeros((1,), dtype=torch.long))
    finally:
        for hook in hooks:
            hook.remove()
        model.reset_cache()
    if rounded_per_token(model.lm_head):
        seen[model.model.norm] = _quantile(hidden)
    return seen


def rounded_per_token(linear: nn.Module) -> bool:
    """Whether the lowered linear rounds its input to int8 per token (dynamic activations; carried Q4_1 blocks)."""
    from edgepack.quantize import BlockOffsetLinear

    if isinstance(linear, BlockOffsetLinear):
        return True
    return getattr(getattr(linear, "weight", None), "activation_quantization", None) is not None


def _quantile(x: torch.Tensor) -> float:
    flat = x.detach().abs().float().flatten()
    rank = max(1, int(BULK_QUANTILE * flat.numel()))
    return float(flat.kthvalue(rank).values)


class TwoRanges(nn.Module):
    """x [T, K] -> [clamp(x, -t, t); x - clamp(x, -t, t)] [2T, K]. `t` is a tensor (the pieces of every layer share
    one graph and are rebound over their own tensors; a Python float would make each layer's graph distinct)."""

    def __init__(self, limit: float) -> None:
        super().__init__()
        self.register_buffer("high", torch.tensor([limit], dtype=torch.float32))
        self.register_buffer("low", torch.tensor([-limit], dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bulk = torch.minimum(torch.maximum(x, self.low), self.high)
        return torch.cat([bulk, x - bulk], dim=0)


class SummedHalves(nn.Module):
    """A linear over `TwoRanges` rows: [2T, K] -> [T, N], the two halves of its output summed (exactly: a [1, 2]
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


