"""BitNet b1.58 weights as transformers stores them (`quantization_config` quant_method "bitnet"), turned into the
float matrices our module multiplies by, plus the exact ternary codes for a later ternary preset.

transformers 5.23 (integrations/bitnet.py) swaps every layer linear (not lm_head) for one of three forms, all
reading int8 per-token activations (`ModelConfig.int8_activations`):
- linear_class "bitlinear" (the default): `weight` uint8 [out / 4, in], four ternary rows per byte, and a
  `weight_scale` [1]; it computes x·tᵀ / weight_scale, the bias added after.
- "autobitlinear", mode "offline" (microsoft/bitnet-b1.58-2B-4T): the same packed weight (or a float one) and
  `weight_scale`; it computes (x·Wᵀ + b) · weight_scale, the bias scaled too.
- "autobitlinear", mode "online" (training checkpoints): a float latent weight, made ternary by its mean |w| at
  every call (WeightQuant); no `weight_scale`.
Packing (`pack_weights`): stored = t + 1 in {0, 1, 2}; unpacked row i * R + r is bits 2i..2i+1 of packed row r.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from edgepack.blocks import TernaryBlocks
from edgepack.errors import EdgepackError
from edgepack.intake.common import HF_CONFIG_FIX, short
from edgepack.intake.weights import LazyWeights

VALUES_PER_BYTE = 4
# The linears transformers converts: every layer projection. lm_head stays float (its default skip list).
LAYER_LINEAR = re.compile(r"model\.layers\.\d+\.(?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)")
SCALE = ".weight_scale"
REPACK_FIX = "save the model again with transformers (BitNetQuantConfig defaults) or pass its float checkpoint"


@dataclass(frozen=True)
class BitNetForm:
    """How a checkpoint stores its layer linears (see the module docstring)."""

    linear_class: str  # "bitlinear" or "autobitlinear"
    online: bool  # autobitlinear's "online" mode: float latent weights, ternarized when read
    where: str  # "config.json in FOLDER", for messages

    @property
    def divides(self) -> bool:
        """BitLinear divides by weight_scale; AutoBitLinear multiplies by it."""
        return self.linear_class == "bitlinear"

    def logical_shapes(self, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str]) -> dict[str, tuple[int, ...]]:
        """Stored names and shapes -> the module's: packed weights four times as many rows, scales dropped (each
        checked to belong to a weight and to be one number), so `check_layout` judges the real layout."""
        out: dict[str, tuple[int, ...]] = {}
        for name, shape in shapes.items():
            if name.endswith(SCALE):
                self._check_scale(name, shape, shapes)
            elif _is_layer_weight(name) and dtypes.get(name) == "U8":
                out[name] = (shape[0] * VALUES_PER_BYTE, *shape[1:]) if len(shape) == 2 else shape
            else:
                out[name] = shape
                if _is_layer_weight(name) and self.divides:
                    raise EdgepackError(
                        f"{self.where} says linear_class bitlinear, but {name} is stored as {dtypes.get(name)}, "
                        "not packed uint8", REPACK_FIX)
            if _is_layer_weight(name) and not self.online and name.removesuffix(".weight") + SCALE not in shapes:
                raise EdgepackError(f"the checkpoint has no {name.removesuffix('.weight') + SCALE} for {name}",
                                    REPACK_FIX)
        return out

    def _check_scale(self, name: str, shape: tuple[int, ...], shapes: dict[str, tuple[int, ...]]) -> None:
        weight = name.removesuffix(SCALE) + ".weight"
        if not LAYER_LINEAR.fullmatch(name.removesuffix(SCALE)) or weight not in shapes:
            raise EdgepackError(f"the checkpoint has {name}, which scales no BitNet layer linear", REPACK_FIX)
        if math.prod(shape) != 1:
            raise EdgepackError(f"{name} has shape {shape}; transformers' BitNet holds one scale per matrix",
                                REPACK_FIX)

    def weights(self, raw: Mapping[str, torch.Tensor], dtypes: dict[str, str]
                ) -> tuple[LazyWeights[torch.Tensor], LazyWeights[TernaryBlocks]]:
        """(state dict, ternary blocks), both read when accessed: each layer linear's weight as the float matrix
        the layer multiplies by (codes × scale; the bias scaled as AutoBitLinear scales it), every other tensor
        as stored. Ternary blocks exist for packed weights and for online ones (ternarized here). `dtypes`: the
        stored dtypes by name (safetensors' header), so nothing is read before it is asked for."""
        names = [n for n in raw.keys() if not n.endswith(SCALE)]
        ternary: dict[str, Callable[[], TernaryBlocks]] = {}
        floats: dict[str, Callable[[], torch.Tensor]] = {}
        for name in names:
            if _is_layer_weight(name) and (self.online or dtypes.get(name) == "U8"):
                ternary[name] = lambda name=name: self._ternary(raw, name)
                floats[name] = lambda name=name: self._ternary(raw, name).dequantize()
            elif _is_layer_weight(name) or (name.endswith(".bias") and LAYER_LINEAR.fullmatch(name[:-5])):
                floats[name] = lambda name=name: self._scaled(raw, name)
            else:
                floats[name] = lambda name=name: raw[name]
        return LazyWeights(floats), LazyWeights(ternary)

    def _ternary(self, raw: Mapping[str, torch.Tensor], name: str) -> TernaryBlocks:
        stored = raw[name]
        if self.online:  # WeightQuant: codes round(w / mean|w|), the matrix codes / scale, all in float32
            inverse = 1.0 / stored.float().abs().mean().clamp(min=1e-5)
            codes = (stored.float() * inverse).round().clamp(-1, 1)
            return TernaryBlocks.per_matrix(codes, float(1.0 / inverse))
        codes = unpack_ternary(stored, name)
        scale = self._scale(raw, name)
        inverse = float(1.0 / torch.tensor(scale, dtype=torch.float32))  # 1 / weight_scale in float32
        return TernaryBlocks.per_matrix(codes, inverse if self.divides else scale)

    def _scaled(self, raw: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
        """A float layer weight or a layer bias: AutoBitLinear offline multiplies both by the scale."""
        if self.online or self.divides:
            return raw[name]
        weight = name.removesuffix(".bias") + ".weight" if name.endswith(".bias") else name
        return raw[name] * self._scale(raw, weight)

    def _scale(self, raw: Mapping[str, torch.Tensor], weight: str) -> float:
        name = weight.removesuffix(".weight") + SCALE
        value = float(raw[name].float().reshape(-1)[0])
        if not math.isfinite(value) or value == 0:
            raise EdgepackError(f"the checkpoint has {name} = {short(value)}, not a finite non-zero scale",
                                "re-download the checkpoint")
        return value


def bitnet_form(hf_config: dict[str, Any], where: str) -> BitNetForm | None:
    """The form a config's `quantization_config` declares; None when it is no bitnet quantization. Options that
    change the computation beyond what our module does are refused here, before any weight is read."""
    quantization = hf_config.get("quantization_config")
    if not isinstance(quantization, dict) or quantization.get("quant_method") != "bitnet":
        return None
    linear_class = quantization.get("linear_class", "bitlinear")
    mode = quantization.get("quantization_mode", "offline")
    if linear_class not in ("bitlinear", "autobitlinear"):
        raise EdgepackError(f"{where} has quantization_config.linear_class = {short(linear_class)}, "
                            "not bitlinear or autobitlinear", HF_CONFIG_FIX)
    if mode not in ("offline", "online"):
        raise EdgepackError(f"{where} has quantization_config.quantization_mode = {short(mode)}, "
                            "not offline or online", HF_CONFIG_FIX)
    if quantization.get("use_rms_norm"):
        raise EdgepackError(f"{where} asks for quantization_config.use_rms_norm (an RMSNorm inside each BitNet "
                            "linear), which edgepack does not build",
                            "pass a checkpoint saved without use_rms_norm (microsoft/bitnet-b1.58-2B-4T has none)")
    skipped = quantization.get("modules_to_not_convert")
    if skipped is not None and skipped != ["lm_head"]:
        raise EdgepackError(f"{where} has quantization_config.modules_to_not_convert = {short(skipped)}; edgepack "
                            "supports BitNet checkpoints whose layer linears are all ternary and lm_head float",
                            "leave modules_to_not_convert out (or set it to [\"lm_head\"])")
    return BitNetForm(linear_class, linear_class == "autobitlinear" and mode == "online", where)


def unpack_ternary(packed: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """transformers' `unpack_weights` as int8 codes [4R, C]; a stored 3 (no ternary value) is refused."""
    if packed.dtype != torch.uint8 or packed.ndim != 2:
        raise EdgepackError(f"{name} is {packed.dtype} {tuple(packed.shape)}, not a packed uint8 matrix", REPACK_FIX)
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8).view(VALUES_PER_BYTE, 1, 1)
    stored = (packed.unsqueeze(0) >> shifts) & 3  # [4, R, C]: chunk i holds rows i*R .. i*R + R - 1
    if bool((stored == 3).any()):
        raise EdgepackError(f"{name} holds the 2-bit code 3, which is no ternary value", "re-download the checkpoint")
    return (stored.to(torch.int8) - 1).reshape(-1, packed.shape[1])


def _is_layer_weight(name: str) -> bool:
    return name.endswith(".weight") and LAYER_LINEAR.fullmatch(name[: -len(".weight")]) is not None
