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

from collections import ChainMap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgepack.blocks import BLOCK, CarriedBlocks, Int4Blocks, Int8Blocks, TernaryBlocks
from edgepack.errors import EdgepackError
from edgepack.presets import PRESETS, QuantPreset, get_preset  # noqa: F401  (the presets, as data)
from edgepack.progress import SILENT, Steps


# How far output-layer smoothing moves activation range into the weights (SmoothQuant's alpha). Measured on
# the default model (int4 preset, eager, 1024 tokens): top-1 91.2% without, 92.1% at 0.5, 90.3% at 0.7.
SMOOTHING_ALPHA = 0.5
CALIBRATION_CHUNK = 128
# The layers' smoothing: one factor per block of 32 inputs, (block max / median block max) ** alpha. Measured on
# the default model (fp32 GGUF weights, XNNPACK's per-token int8 on every layer linear, eager, 512 tokens):
# top-1 94.5% / KL 0.0109 without, 95.9% / 0.0064 at 0.5, 91.0% / 0.0163 at 1.0.
BLOCK_SMOOTHING_ALPHA = 0.5
SMOOTHED_INPUTS = {"attn": "self_attn.q_proj", "mlp": "mlp.gate_proj", "down": "mlp.down_proj"}

# The small offset matmuls of carried Q4_1 blocks (1/32 of the weights): int8 per output channel.
OFFSETS_RECIPE = "8da8w"


RECIPE_BITS = {"8da4w": torch.int4, "8da8w": torch.int8, "4w": torch.int4, "8w": torch.int8}
# HQQ's scale search runs on this many weights at a time (2 MB of fp32): its 20 passes stay in cache, and a block
# stops as soon as its own scales settle. Measured on Qwen2.5-Coder-0.5B's 151,936 x 896 table: 28.8 -> 1.1 s,
# the same codes and scales as torchao's call on the whole tensor.
HQQ_BLOCK_WEIGHTS = 1 << 19


def _intx_weight(codes: torch.Tensor, scales: torch.Tensor, bits: torch.dtype, group: int,
                 per_token_activations: bool, dtype: torch.dtype = torch.float32) -> nn.Parameter:
    """torchao's weight tensor over existing codes (int8 storage) and one scale per `group` inputs of a row: the
    form its 8da*/weight-only recipes produce and ExecuTorch's XNNPACK partitioner lowers."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
        IntxUnpackedToInt8TensorActivationQuantization,
    )

    tensor = IntxUnpackedToInt8Tensor(
        qdata=codes.to(torch.int8).contiguous(),
        scale=scales.to(dtype).contiguous(),
        zero_point=torch.zeros(scales.shape, dtype=torch.int8),
        target_dtype=bits,
        block_size=(1, group),
        dtype=dtype,
        activation_quantization=(IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN
                                 if per_token_activations else None),
    )
    return nn.Parameter(tensor, requires_grad=False)


def int4_weight(blocks: Int4Blocks) -> nn.Parameter:
    """The torchao 8da4w weight tensor built from existing codes and scales: no rounding happens here."""
    return _intx_weight(blocks.codes, blocks.scales, torch.int4, BLOCK, per_token_activations=True)


def hqq_weight(weight: torch.Tensor, bits: torch.dtype, group: int, per_token_activations: bool) -> nn.Parameter:
    """`weight` rounded by torchao's HQQ scale-only search (symmetric, one scale per `group` inputs of a row),
    `HQQ_BLOCK_WEIGHTS` at a time: each row's scales depend on that row alone. Scales in the weight's dtype: fp32
    for every quantized preset (ExecuTorch's fused embedding_4bit kernel misreads fp16 ones: logits off by 2x)."""
    from torchao.quantization.quant_primitives import (
        _DTYPE_TO_QVALUE_BOUNDS,
        _choose_qparams_and_quantize_scale_only_hqq,
    )

    qmin, qmax = _DTYPE_TO_QVALUE_BOUNDS[bits]
    dtype, weight = weight.dtype, weight.detach().float()
    rows = max(1, HQQ_BLOCK_WEIGHTS // weight.shape[1])
    parts = [_choose_qparams_and_quantize_scale_only_hqq(weight[i : i + rows], [1, group], qmin, qmax)
             for i in range(0, weight.shape[0], rows)]
    codes, scales = torch.cat([c for c, _ in parts]), torch.cat([s for _, s in parts])
    return _intx_weight(codes, scales, bits, group, per_token_activations, dtype)


def quantize_modules(piece: nn.Module, recipe: str, group: int, pick: Callable[[nn.Module, str], bool]) -> None:
    """Apply `recipe` (group 0: one scale per row) to the linears and tables of `piece` that `pick(module, name)`
    chooses (names relative to `piece`, "" for itself), by HQQ (`hqq_weight`). At 8 bits absmax scales were tried
    too: better on the default model, worse on Qwen2.5-Coder-0.5B's XNNPACK bundle (NOTES.md, issue #11)."""
    for name, module in list(piece.named_modules()):
        if isinstance(module, (nn.Linear, nn.Embedding)) and pick(module, name):
            module.weight = hqq_weight(module.weight, RECIPE_BITS[recipe], group or module.weight.shape[1],
                                       per_token_activations=recipe.startswith("8da"))


class BlockOffsetLinear(nn.Module):
    """y = x W^T + S(x) M^T (+ bias), where W holds symmetric int4 blocks, S(x) sums each block of 32 inputs
    and M holds one offset per (output, block): exact math for asymmetric blocks (GGUF Q4_1) on kernels
    that only take symmetric int4. The offset matmul is 1/32 the size of the main one."""

    def __init__(self, linear: nn.Linear, blocks: Int4Blocks, block_scale: torch.Tensor | None = None) -> None:
        super().__init__()
        assert blocks.offsets is not None
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.main = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        self.main.weight = int4_weight(blocks)
        self.main.bias = linear.bias
        self.block_sum = nn.Linear(BLOCK, 1, bias=False)
        nn.init.ones_(self.block_sum.weight)
        # A smoothed input (`Smoothing`: block b divided by s_b) keeps M as the student's: S(x) * s, M / s. M's
        # int8 rounding is per output row, so a column times s_b would cost the other columns their levels.
        scale = torch.ones(self.in_features // BLOCK) if block_scale is None else block_scale.float()
        self.register_buffer("block_scale", scale, persistent=False)
        self.offsets = nn.Linear(self.in_features // BLOCK, self.out_features, bias=False, device="meta")
        self.offsets.weight = nn.Parameter(blocks.offsets / scale, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sums = self.block_sum(x.reshape(*x.shape[:-1], self.in_features // BLOCK, BLOCK)).squeeze(-1)
        return self.main(x) + self.offsets(sums * self.block_scale)


def output_absmax(model: nn.Module, calibration_ids: list[int]) -> torch.Tensor:
    """Per-channel max |x| of what the output layer reads, over real text, from a built float model."""
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
    return torch.stack(seen).amax(0)


def smoothing_scale(x_max: torch.Tensor, head_weight: torch.Tensor, alpha: float = SMOOTHING_ALPHA) -> torch.Tensor:
    """SmoothQuant's per-channel factor s_j: the output layer's input channel j is divided by s_j (folded into
    the final norm) and its weight column j multiplied by s_j."""
    w_max = head_weight.detach().float().abs().amax(0).clamp(min=1e-5)
    return (x_max.clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-2)


def smooth_output_layer(model: nn.Module, calibration_ids: list[int], alpha: float = SMOOTHING_ALPHA) -> None:
    """Move the output layer's activation outliers into its weights before int8 activation quantization.

    The final norm's output has a few channels ~20x larger than the rest (55 vs 3 on SmolLM2), so a
    per-token int8 scale wastes most of its levels on them. Dividing channel j by s_j and multiplying
    weight column j by s_j leaves the float math unchanged; the division is folded into the final norm's
    weight (kept in float), so it costs nothing at run time (SmoothQuant, Xiao et al. 2023).
    Calibrate on text other than the evaluation text.
    """
    scale = smoothing_scale(output_absmax(model, calibration_ids), model.lm_head.weight, alpha)
    head = model.lm_head
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)  # untie from the table
    with torch.no_grad():
        model.model.norm.weight.div_(scale)
        head.weight.mul_(scale)


@dataclass(frozen=True)
class Smoothing:
    """Factors that move activation outliers into weights where activations are rounded per token (XNNPACK's
    int8): the float math is unchanged, only the rounding improves.

    `head`: per channel of the output layer's input (it is re-rounded anyway). `layers`: per layer prefix, one
    factor per block of 32 inputs for the attention input ("attn": input_layernorm -> q/k/v), the MLP input
    ("mlp": post_attention_layernorm -> gate/up) and the down projection's input ("down": up's rows -> down).
    Per block, not per channel, so a GGUF's carried blocks stay exact: a block of 32 columns times one factor is
    the same codes under a scaled scale and offset."""

    head: torch.Tensor | None = None
    layers: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def block_smoothing(x_max: torch.Tensor, alpha: float = BLOCK_SMOOTHING_ALPHA) -> torch.Tensor:
    """One factor per block of 32 channels of `x_max` (max |x| per channel over calibration text)."""
    blocks = x_max.float().view(-1, BLOCK).amax(1).clamp(min=1e-5)
    return (blocks / blocks.median()).pow(alpha).clamp(1e-2, 1e2)


def streamed_smoothing(config: Any, state_dict: Mapping[str, torch.Tensor], calibration_ids: list[int],
                       max_context: int, head: bool = True, layers: bool = True) -> Smoothing:
    """`Smoothing` of a model that is not built: one calibration pass, one piece in memory at a time."""
    from edgepack.model import stream_hidden_states

    ids = torch.tensor(calibration_ids[:max_context], dtype=torch.long)
    seen: dict[str, torch.Tensor] = {}

    def watch(prefix: str, piece: nn.Module) -> None:
        if not (layers and prefix.startswith("model.layers.")):
            return
        for kind, name in SMOOTHED_INPUTS.items():
            module = piece.get_submodule(name)
            if module.in_features % BLOCK == 0:
                module.register_forward_pre_hook(
                    lambda _m, inputs, key=f"{prefix}/{kind}": seen.__setitem__(
                        key, inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(0)))

    hidden = stream_hidden_states(config, state_dict, ids, watch)
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, x_max in seen.items():
        prefix, kind = key.split("/")
        by_layer.setdefault(prefix, {})[kind] = block_smoothing(x_max)
    head_scale = None
    if head:
        x_max = hidden.abs().reshape(-1, config.hidden_size).amax(0)
        tied = config.tie_word_embeddings or "lm_head.weight" not in state_dict
        head_scale = smoothing_scale(x_max, state_dict["model.embed_tokens.weight" if tied else "lm_head.weight"])
    return Smoothing(head_scale, by_layer)


def smooth_layer(piece: nn.Module, prefix: str, factors: Mapping[str, torch.Tensor],
                 blocks: Mapping[str, CarriedBlocks]) -> tuple[dict[str, CarriedBlocks], dict[str, torch.Tensor]]:
    """Apply a layer's `Smoothing` factors to its float weights; returns its carried int4 blocks, smoothed the
    same way (scales and offsets of each block of columns times its factor; up's rows divided), and the factor
    of each smoothed weight's column blocks (`BlockOffsetLinear` keeps its offsets unscaled with it)."""
    columns = {"attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
               "mlp": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}
    norms = {"attn": "input_layernorm", "mlp": "post_attention_layernorm"}
    smoothed: dict[str, CarriedBlocks] = {}
    column_factors: dict[str, torch.Tensor] = {}

    def carried(name: str) -> Int4Blocks | None:
        key = f"{prefix}.{name}.weight"
        found = smoothed.get(key, blocks.get(key))
        return found if isinstance(found, Int4Blocks) else None

    with torch.no_grad():
        for kind, factor in factors.items():
            if any(isinstance(blocks.get(f"{prefix}.{name}.weight"), Int8Blocks) for name in columns[kind]):
                continue  # rounded again per channel (`_wide_blocks`): measured worse (Qwen2.5-Coder: 97.3% -> 96.5%)
            per_input = factor.repeat_interleave(BLOCK)
            if kind in norms:
                piece.get_submodule(norms[kind]).weight.div_(per_input)
            else:  # the down projection's input is up's output (times the gate): up's rows carry the division
                piece.get_submodule("mlp.up_proj").weight.div_(per_input[:, None])
                if (up := carried("mlp.up_proj")) is not None:
                    smoothed[f"{prefix}.mlp.up_proj.weight"] = up.scaled(rows=1 / per_input)
            for name in columns[kind]:
                piece.get_submodule(name).weight.mul_(per_input)
                column_factors[f"{prefix}.{name}.weight"] = factor
                if (found := carried(name)) is not None:
                    smoothed[f"{prefix}.{name}.weight"] = found.scaled(column_blocks=factor)
    return smoothed, column_factors


def apply_preset(
    model: nn.Module,
    preset: QuantPreset,
    blocks: Mapping[str, CarriedBlocks] | None = None,
    calibration_ids: list[int] | None = None,
) -> nn.Module:
    """Quantize a built model in place by the preset's recipe for each part (see `piece_quantizer`).

    `calibration_ids`: tokens of real text; with them the inputs that get dynamic int8 activations are smoothed
    first (see `Smoothing`)."""
    from edgepack.model import model_pieces

    model = model.to(preset.torch_dtype)
    if not preset.quantized:
        return model
    smoothing = None
    if calibration_ids:
        smoothing = streamed_smoothing(model.config, model.state_dict(), calibration_ids, model.max_context,
                                       **_smoothed_parts(preset, model.config, tied_table=False))
    prepare = piece_quantizer(preset, blocks, smoothing)
    for prefix, piece in model_pieces(model):
        prepare(prefix, piece)
    return model


def piece_quantizer(
    preset: QuantPreset, blocks: Mapping[str, CarriedBlocks] | None = None, smoothing: Smoothing | None = None
) -> Callable[[str, nn.Module], None]:
    """The preset as `build_model`'s `prepare` step: each piece is quantized as soon as it is read.

    `blocks`: int4 blocks the student already has (GGUF Q4_0/Q4_1/Q4_K), by weight name; an int4 linear with
    group size 32 takes them as they are instead of rounding its float weights again. `smoothing`: factors
    folded into the norms (and up's rows) before rounding (`Smoothing`). A tied output layer is untied
    first: table and output layer follow different recipes, so they become two tensors on device."""
    blocks = blocks or {}
    group = preset.group_size
    smoothing = smoothing or Smoothing()
    output_scale = smoothing.head

    def prepare(prefix: str, piece: nn.Module) -> None:
        with torch.no_grad():
            if prefix == "model.norm" and output_scale is not None:
                piece.weight.div_(output_scale)
            elif prefix == "lm_head":
                piece.weight = nn.Parameter(piece.weight.detach().clone(), requires_grad=False)
                if output_scale is not None:
                    piece.weight.mul_(output_scale)
                if preset.lm_head:
                    quantize_modules(piece, preset.lm_head, 0, lambda m, _fqn: m is piece)
            elif prefix == "model.embed_tokens":
                recipe, table_group = _embedding_recipe(preset, blocks)
                if recipe:
                    quantize_modules(piece, recipe, table_group, lambda m, _fqn: m is piece)
                    with torch.no_grad():  # as the backends store them (ExecuTorch's embedding kernels, Core ML)
                        piece.weight.scale.copy_(piece.weight.scale.half().float())
            elif preset.linear == "ternary":
                _carry_ternary(piece, prefix, blocks)
            elif preset.linear:
                carrying = preset.linear == "8da4w" and group == BLOCK
                # This piece's blocks, decoded once (a lazy mapping decodes on every read).
                layer_blocks: Mapping[str, CarriedBlocks] = {
                    key: blocks[key] for key in blocks if key.startswith(prefix + ".")} if carrying else {}
                column_factors: dict[str, torch.Tensor] = {}
                if prefix in smoothing.layers:
                    smoothed, column_factors = smooth_layer(piece, prefix, smoothing.layers[prefix], layer_blocks)
                    layer_blocks = ChainMap(smoothed, dict(layer_blocks))
                carried = _carry_blocks(piece, prefix, layer_blocks, column_factors) if carrying else set()
                wide = _wide_blocks(piece, prefix, layer_blocks) if carrying else set()
                fits = lambda m, fqn: (  # noqa: E731
                    isinstance(m, nn.Linear)
                    and fqn not in carried | wide
                    and not _inside(fqn, carried)
                    and (not group or m.in_features % group == 0)
                )
                quantize_modules(piece, "8da8w", 0, lambda m, fqn: fqn in wide)
                quantize_modules(piece, preset.linear, group, fits)
                if preset.activation_ranges == 1:  # with 2, the offsets stay float: exact, no input rounding
                    is_offsets = lambda m, fqn: isinstance(m, nn.Linear) and fqn.endswith(".offsets")  # noqa: E731
                    quantize_modules(piece, OFFSETS_RECIPE, 0, is_offsets)

    return prepare


def _embedding_recipe(preset: QuantPreset, blocks: Mapping[str, CarriedBlocks]) -> tuple[str | None, int]:
    """The table's recipe and group size: a GGUF table stored at 5 to 8 bits (SmolLM2's Q8_0, Qwen2.5-Coder's
    Q5_0) stays at 8 bits per row where the preset would take it to 4, as `_wide_blocks` does for linears.
    Measured on the default model (eager int4, 512 tokens): KL 0.024 with the int4 table, 0.012 with a float one."""
    if preset.embedding == "4w" and isinstance(blocks.get("model.embed_tokens.weight"), Int8Blocks):
        return "8w", 0
    return preset.embedding, preset.embedding_group_size


def _carry_blocks(piece: nn.Module, prefix: str, blocks: Mapping[str, CarriedBlocks],
                  column_factors: Mapping[str, torch.Tensor]) -> set[str]:
    """Swap in the student's own int4 blocks where it has them; returns the (piece-relative) names swapped.
    `column_factors`: the smoothing of each weight's column blocks (`smooth_layer`)."""
    carried: set[str] = set()
    for name, module in list(piece.named_modules()):
        key = f"{prefix}.{name}.weight"
        if not isinstance(module, nn.Linear) or key not in blocks:
            continue
        found = blocks[key]
        if not isinstance(found, Int4Blocks):  # 5- to 8-bit GGUF types: kept at 8 bits (`_wide_blocks`)
            continue
        found = found.with_positive_scales()
        if found.offsets is None:
            module.weight = int4_weight(found)
        else:
            parent_name, _, attr = name.rpartition(".")
            setattr(piece.get_submodule(parent_name), attr, BlockOffsetLinear(module, found, column_factors.get(key)))
        carried.add(name)
    return carried


def _carry_ternary(piece: nn.Module, prefix: str, blocks: Mapping[str, Any]) -> None:
    """Every linear of a layer as the student's ternary codes in int4 blocks of 32 (codes -1/0/1, each scale
    repeated per block): the same weights, no rounding. A linear without codes cannot be carried."""
    for name, module in list(piece.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        found = blocks.get(f"{prefix}.{name}.weight")
        if not isinstance(found, TernaryBlocks) or found.block % BLOCK:
            raise EdgepackError(f"{prefix}.{name}.weight has no ternary codes in blocks of {BLOCK}",
                                "export a BitNet b1.58 checkpoint whose every layer linear is ternary, or use -q int4")
        module.weight = int4_weight(Int4Blocks(found.codes, found.scales_per(BLOCK), None))


def carried_blocks(student: Any, preset: QuantPreset) -> Mapping[str, Any]:
    """The student's exact weights `preset` builds from: its ternary codes for a preset that carries them, else
    its GGUF blocks (which the int4 recipe keeps where it can)."""
    return student.ternary_blocks if preset.carries == "ternary" else student.gguf_blocks


def _wide_blocks(piece: nn.Module, prefix: str, blocks: Mapping[str, CarriedBlocks]) -> set[str]:
    """The (piece-relative) linears the student stores at 5 to 8 bits (GGUF Q5_0/Q5_1/Q5_K/Q6_K/Q8_0): the int4
    recipe keeps them at 8 bits per output channel rather than rounding them to 4 (llama.cpp's Q4_K_M keeps 5-
    and 6-bit tensors where they matter most; on Qwen2.5-Coder-0.5B, whose 896-wide rows take no K-quant, that is
    most of its linears: rounded to int4 they cost 12 points of top-1)."""
    return {name for name, module in piece.named_modules()
            if isinstance(module, nn.Linear) and isinstance(blocks.get(f"{prefix}.{name}.weight"), Int8Blocks)}


def _inside(fqn: str, parents: set[str]) -> bool:
    return any(fqn.startswith(p + ".") for p in parents)


def build_quantized(student: Any, preset: QuantPreset, backend: str, max_context: int,
                    progress: Steps = SILENT) -> nn.Module:
    """The student's module with the preset applied as exporter `backend` lowers it, quantized piece by piece as
    it is read (`build_model`'s `prepare`): a 1.5B int4 export never holds the 6.2 GB float32 model. Exporters
    that quantize themselves (registered `quantizes=True`) give their own rounding (`same_weights`). `progress`
    is advanced per piece built (`model.piece_count`)."""
    from edgepack.exporters import exporter_keeps_one_tied_table, exporter_quantizes, same_weights_quantizer
    from edgepack.model import build_model

    config = student.config
    own_rounding = exporter_quantizes(backend)
    prepare = None
    if preset.quantized and own_rounding:
        rounding = same_weights_quantizer(backend)
        prepare = rounding(preset, carried_blocks(student, preset)) if rounding else None
    elif preset.quantized:
        tied_table = config.tie_word_embeddings and exporter_keeps_one_tied_table(backend)
        parts = _smoothed_parts(preset, config, tied_table)
        smoothing = None
        if any(parts.values()):
            smoothing = streamed_smoothing(config, student.state_dict, calibration_ids(student), max_context, **parts)
        prepare = piece_quantizer(preset, carried_blocks(student, preset), smoothing)
    dtype = torch.float32 if own_rounding else preset.torch_dtype
    return build_model(config, student.state_dict, max_context, dtype=dtype, prepare=prepare,
                       on_piece=progress.advance)


def _smoothed_parts(preset: QuantPreset, config: Any, tied_table: bool) -> dict[str, bool]:
    """Which parts get `Smoothing`: those whose recipe rounds activations per token (8da*), unless `activation_ranges`
    2 makes that rounding nearly exact. The layers only where their weights are grouped by 32, whose rounding a
    block's factor leaves as it is (a per-channel int8 weight would trade weight error for activation error:
    measured worse on a random model); not an output layer kept equal to the table, nor BitNet's layers (their
    sub-norms renormalize what the factors would scale)."""
    if preset.activation_ranges > 1:  # nothing left to balance (measured: NOTES.md, "Two-range int8 activations")
        return {"head": False, "layers": False}
    return {"head": not tied_table and (preset.lm_head or "").startswith("8da"),
            "layers": preset.linear == "8da4w" and preset.group_size == BLOCK and config.architecture != "bitnet"}


def park_quantized(model: nn.Module, folder: Path) -> Callable[[], nn.Module]:
    """Write a quantized model to `folder`; returns its loader (memory-mapped). The export's gate compares the
    bundle with the project's torch model on the same quantized weights: read back, they need not be quantized
    again (HQQ over a 1.5B student: 5 minutes) nor held in memory beside the fp32 reference meanwhile."""
    for module in model.modules():
        module.__dict__.pop("extra_repr", None)  # torchao's repr helpers do not pickle; the weights do
    path = folder / "quantized-model.pt"
    torch.save(model, path)
    return lambda: torch.load(path, weights_only=False, mmap=True)  # our own file, written just now


def decoded_for_scoring(model: nn.Module) -> nn.Module:
    """The quantized model as the lowering's reference, in place: the same weights on unrounded inputs, and its int
    embedding table decoded to float once.

    Activations: each runtime rounds a linear's input its own way (XNNPACK to int8 per token, in one or two ranges;
    ONNX Runtime per block of 32; Core ML not at all, fp16), and torchao's eager per-token rounding matches none
    of them (on XNNPACK it moved the default model as much as the rounding itself: KL 0.0121). So the reference
    keeps the weights and leaves the inputs exact; what remains is the runtime's own arithmetic and any lowering
    bug. BitNet's own int8 activations are the model's, not torchao's, and stay.
    Table: torchao decodes the whole table on every call (the gate's 1024-token score of the default model: 9
    calls over 49152 x 576). Linears stay torchao's, decoded a weight at a time per call: decoding them all once
    was 2x faster again but held the whole model in float through the gate (6.2 GB at 1.5B: Core ML's export then
    peaked at 18.0 GB, over 16)."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    for module in model.modules():
        if isinstance(module, nn.Embedding) and isinstance(module.weight, IntxUnpackedToInt8Tensor):
            module.weight = nn.Parameter(module.weight.dequantize(), requires_grad=False)
    for param in model.parameters():
        if isinstance(param, IntxUnpackedToInt8Tensor):
            param.activation_quantization = None
    return model


def calibration_ids(student: Any, tokens: int = 1024) -> list[int]:
    """Token ids of held-out real text (never the evaluation text) for the quantizer's calibration."""
    from tokenizers import Tokenizer

    from edgepack.evaltext import calibration_text

    tokenizer = Tokenizer.from_str(student.tokenizer_files["tokenizer.json"].decode("utf-8"))
    return tokenizer.encode(calibration_text(), add_special_tokens=False).ids[:tokens]


