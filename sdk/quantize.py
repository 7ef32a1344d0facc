"""Quantization presets: a name maps to a full recipe, as data; `apply_preset` runs it with torchao.

Why torchao: its tensor subclasses export to the dynamic-quantize / dequantize patterns that ExecuTorch's
XNNPACK partitioner turns into its int4/int8 kernels, so the recipe here is exactly what the device runs.

Recipe names (as ExecuTorch and torchao call them):
  "8da4w"  int4 weights, one scale per `group_size` inputs, int8 dynamic per-token activations
  "8da8w"  int8 weights, one scale per output channel, int8 dynamic per-token activations
  "4w"/"8w" weight-only int4/int8 (embeddings: a gather needs no activation quantization)
XNNPACK has no kernel for weight-only int8/int4 *linears* (it would silently unpack them to fp32), so
linears always use a dynamic-activation recipe here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from edgepack.blocks import BLOCK, Int4Blocks
from edgepack.presets import PRESETS, QuantPreset, get_preset  # noqa: F401  (the presets, as data)


# How far output-layer smoothing moves activation range into the weights (SmoothQuant's alpha). Measured on
# the default model (int4 preset, eager, 1024 tokens): top-1 91.2% without, 92.1% at 0.5, 90.3% at 0.7.
SMOOTHING_ALPHA = 0.5
CALIBRATION_CHUNK = 128

# The small offset matmuls of carried Q4_1 blocks (1/32 of the weights): int8 per output channel.
OFFSETS_RECIPE = "8da8w"


def _torchao_config(recipe: str, group_size: int) -> Any:
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig

    granularity = PerGroup(group_size) if group_size else PerAxis(0)
    bits = {"8da4w": torch.int4, "8da8w": torch.int8, "4w": torch.int4, "8w": torch.int8}[recipe]
    if recipe.startswith("8da"):
        return Int8DynamicActivationIntxWeightConfig(
            weight_dtype=bits, weight_granularity=granularity, intx_choose_qparams_algorithm="hqq_scale_only"
        )
    # fp32 scales: ExecuTorch's fused embedding_4bit kernel misreads fp16 ones (measured: logits off by 2x).
    return IntxWeightOnlyConfig(weight_dtype=bits, granularity=granularity, intx_choose_qparams_algorithm="hqq_scale_only")


def int4_weight(blocks: Int4Blocks) -> nn.Parameter:
    """The torchao 8da4w weight tensor built from existing codes and scales: no rounding happens here."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
        IntxUnpackedToInt8TensorActivationQuantization,
    )

    tensor = IntxUnpackedToInt8Tensor(
        qdata=blocks.codes.contiguous(),
        scale=blocks.scales.contiguous(),
        zero_point=torch.zeros(blocks.scales.shape, dtype=torch.int8),
        target_dtype=torch.int4,
        block_size=(1, BLOCK),
        dtype=torch.float32,
        activation_quantization=IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN,
    )
    return nn.Parameter(tensor, requires_grad=False)


class BlockOffsetLinear(nn.Module):
    """y = x W^T + S(x) M^T (+ bias), where W holds symmetric int4 blocks, S(x) sums each block of 32 inputs
    and M holds one offset per (output, block): exact math for asymmetric blocks (GGUF Q4_1) on kernels
    that only take symmetric int4. The offset matmul is 1/32 the size of the main one."""

    def __init__(self, linear: nn.Linear, blocks: Int4Blocks) -> None:
        super().__init__()
        assert blocks.offsets is not None
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.main = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        self.main.weight = int4_weight(blocks)
        self.main.bias = linear.bias
        self.block_sum = nn.Linear(BLOCK, 1, bias=False)
        nn.init.ones_(self.block_sum.weight)
        self.offsets = nn.Linear(self.in_features // BLOCK, self.out_features, bias=False, device="meta")
        self.offsets.weight = nn.Parameter(blocks.offsets.clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sums = self.block_sum(x.reshape(*x.shape[:-1], self.in_features // BLOCK, BLOCK)).squeeze(-1)
        return self.main(x) + self.offsets(sums)


def smooth_output_layer(model: nn.Module, calibration_ids: list[int], alpha: float = SMOOTHING_ALPHA) -> None:
    """Move the output layer's activation outliers into its weights before int8 activation quantization.

    The final norm's output has a few channels ~20x larger than the rest (55 vs 3 on SmolLM2), so a
    per-token int8 scale wastes most of its levels on them. Dividing channel j by s_j and multiplying
    weight column j by s_j leaves the float math unchanged; the division is folded into the final norm's
    weight (kept in float), so it costs nothing at run time (SmoothQuant, Xiao et al. 2023).
    Calibrate on text other than the evaluation text.
    """
    seen: list[torch.Tensor] = []
    hook = model.lm_head.register_forward_hook(
        lambda _m, inputs, _out: seen.append(inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(0))
    )
    try:
        with torch.no_grad():
            ids = torch.tensor(calibration_ids[: model.max_context], dtype=torch.long)
            for start in range(0, len(ids), CALIBRATION_CHUNK):
                model(ids[None, start : start + CALIBRATION_CHUNK], torch.tensor([start]))
    finally:
        hook.remove()
        model.reset_cache()
    x_max = torch.stack(seen).amax(0).clamp(min=1e-5)
    head = model.lm_head
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)  # untie from the table
    w_max = head.weight.abs().amax(0).clamp(min=1e-5)
    scale = (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-2)
    with torch.no_grad():
        model.model.norm.weight.div_(scale)
        head.weight.mul_(scale)


def apply_preset(
    model: nn.Module,
    preset: QuantPreset,
    blocks: dict[str, Int4Blocks] | None = None,
    calibration_ids: list[int] | None = None,
) -> nn.Module:
    """Quantize in place by the preset's recipe for each part.

    `calibration_ids`: tokens of real text; with them an output layer that gets dynamic int8 activations
    is smoothed first (see `smooth_output_layer`).

    `blocks`: int4 blocks the student already has (GGUF Q4_0/Q4_1), by weight name; an int4 linear with
    group size 32 takes them as they are instead of rounding its float weights again. A tied embedding is
    untied first: table and output layer follow different recipes, so they become two tensors on device.
    """
    from torchao.quantization.quant_api import quantize_

    model = model.to(preset.torch_dtype)
    if not preset.quantized:
        return model
    blocks = blocks or {}
    head = model.lm_head
    head.weight = nn.Parameter(head.weight.detach().clone())
    if calibration_ids and (preset.lm_head or "").startswith("8da"):
        smooth_output_layer(model, calibration_ids)
    group = preset.group_size
    with torch.no_grad():
        if preset.linear:
            carried = _carry_blocks(model, blocks) if preset.linear == "8da4w" and group == BLOCK else set()
            fits = lambda m, fqn: (  # noqa: E731
                isinstance(m, nn.Linear)
                and fqn != "lm_head"
                and fqn not in carried
                and not _inside(fqn, carried)
                and (not group or m.in_features % group == 0)
            )
            quantize_(model, _torchao_config(preset.linear, group), filter_fn=fits)
            is_offsets = lambda m, fqn: isinstance(m, nn.Linear) and fqn.endswith(".offsets")  # noqa: E731
            quantize_(model, _torchao_config(OFFSETS_RECIPE, 0), filter_fn=is_offsets)
        if preset.lm_head:
            quantize_(model, _torchao_config(preset.lm_head, 0), filter_fn=lambda m, fqn: fqn == "lm_head")
        if preset.embedding:
            is_embedding = lambda m, _fqn: isinstance(m, nn.Embedding)  # noqa: E731
            quantize_(model, _torchao_config(preset.embedding, preset.embedding_group_size), filter_fn=is_embedding)
    return model


def _carry_blocks(model: nn.Module, blocks: dict[str, Int4Blocks]) -> set[str]:
    """Swap in the student's own int4 blocks where it has them; returns the module names swapped."""
    carried: set[str] = set()
    for name, module in list(model.named_modules()):
        found = blocks.get(f"{name}.weight")
        if not isinstance(module, nn.Linear) or found is None or name == "lm_head":
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        found = found.with_positive_scales()
        if found.offsets is None:
            module.weight = int4_weight(found)
        else:
            setattr(parent, attr, BlockOffsetLinear(module, found))
        carried.add(name)
    return carried


def _inside(fqn: str, parents: set[str]) -> bool:
    return any(fqn.startswith(p + ".") for p in parents)
