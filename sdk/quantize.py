"""Quantization presets: a name maps to a full recipe, as data; `apply_preset` runs it with torchao.

Why torchao: its tensor subclasses export to the dynamic-quantize / dequantize patterns that ExecuTorch's
XNNPACK partitioner turns into its int4/int8 kernels, so the recipe here is exactly what the device runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from edgepack.errors import UsageError


@dataclass(frozen=True)
class QuantPreset:
    name: str
    description: str
    dtype: str = "float32"  # activations and unquantized weights
    linear: str | None = None  # None | "int8-weight" | "int4-weight-int8-dynamic-act"
    embedding: str | None = None  # None | "int8-weight" | "int4-weight"
    group_size: int = 0  # 0: one scale per output channel; else scales per block of this many inputs

    def with_group_size(self, group_size: int | None) -> "QuantPreset":
        if group_size is None:
            return self
        if group_size < 0 or (group_size and group_size % 2):
            raise UsageError(f"--group-size {group_size} is invalid", "use 0 (per channel) or an even number like 32")
        return replace(self, group_size=group_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


PRESETS: dict[str, QuantPreset] = {
    p.name: p
    for p in (
        QuantPreset("fp32", "full precision: the reference, bit-for-bit checks"),
        QuantPreset("fp16", "half-precision weights and activations", dtype="float16"),
        QuantPreset(
            "int8",
            "int8 weight-only, per channel; fp32 activations",
            linear="int8-weight",
            embedding="int8-weight",
        ),
        QuantPreset(
            "int4",
            "int4 groupwise weights with int8 dynamic activations (XNNPACK 8da4w); int4 embedding",
            linear="int4-weight-int8-dynamic-act",
            embedding="int4-weight",
            group_size=32,
        ),
    )
}


def get_preset(name: str) -> QuantPreset:
    if name not in PRESETS:
        raise UsageError(f"unknown quantization preset {name!r}", f"choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def _torchao_config(kind: str, group_size: int) -> Any:
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig

    granularity = PerGroup(group_size) if group_size else PerAxis(0)
    if kind == "int8-weight":
        return IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=granularity)
    if kind == "int4-weight":
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=granularity)
    if kind == "int4-weight-int8-dynamic-act":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=granularity)
    raise ValueError(f"unknown quantization kind {kind!r}")


def apply_preset(model: nn.Module, preset: QuantPreset) -> nn.Module:
    """Quantize in place: linears (lm_head included) and the embedding, each by the preset's recipe.

    A tied embedding is untied first: the embedding table and the output layer are quantized by different
    recipes (gather vs matmul kernels), so they become two tensors on the device.
    """
    from torchao.quantization.quant_api import quantize_

    model = model.to(preset.torch_dtype)
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None and (preset.linear or preset.embedding):
        lm_head.weight = nn.Parameter(lm_head.weight.detach().clone())
    group = preset.group_size
    with torch.no_grad():
        if preset.linear:
            fits = lambda m, _fqn: isinstance(m, nn.Linear) and (not group or m.in_features % group == 0)  # noqa: E731
            quantize_(model, _torchao_config(preset.linear, group), filter_fn=fits)
        if preset.embedding:
            is_embedding = lambda m, _fqn: isinstance(m, nn.Embedding)  # noqa: E731
            quantize_(model, _torchao_config(preset.embedding, group), filter_fn=is_embedding)
    return model
