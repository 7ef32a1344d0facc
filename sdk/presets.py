"""Quantization presets as data: a name maps to a full recipe (what `edgepack.quantize` applies with torchao).

Kept free of torch so that the CLI can list presets and plan an export without importing it (~2.5 s).
Recipe names are explained in `edgepack.quantize`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from edgepack.errors import UsageError


@dataclass(frozen=True)
class QuantPreset:
    name: str
    description: str
    dtype: str = "float32"  # activations and unquantized weights
    linear: str | None = None  # recipe for the decoder layers' linears
    lm_head: str | None = None  # recipe for the output layer (the most sensitive matrix)
    embedding: str | None = None  # recipe for the token embedding table
    group_size: int = 0  # linears: 0 = one scale per output channel, else per block of this many inputs
    embedding_group_size: int = 0
    # Exact weights of the student this preset stores as they are, never rounded: "ternary" = BitNet b1.58's
    # codes and scales (`Student.ternary_blocks`). A student without them cannot take the preset.
    carries: str | None = None
    # Where a backend rounds each linear's input to int8 once per token (XNNPACK's dynamic int8 linears), 2 hands it
    # the input's own int8 grid and that grid's residual as two rows (`exporters/xnnpack_ranges.py`): ~16-bit
    # activations, the same weights' figures, twice the linear work.
    activation_ranges: int = 1

    def with_group_size(self, group_size: int | None) -> "QuantPreset":
        if group_size is None:
            return self
        if self.carries and group_size != self.group_size:  # a manifest's own 0 passes
            raise UsageError(f"--group-size does not apply to the {self.name} preset",
                             f"leave --group-size out: it keeps the student's own {self.carries} blocks")
        if group_size < 0 or (group_size and group_size % 2):
            raise UsageError(f"--group-size {group_size} is invalid", "use 0 (per channel) or an even number like 32")
        return replace(self, group_size=group_size)

    def with_activation_ranges(self, ranges: int | None) -> "QuantPreset":
        if ranges is None or ranges == self.activation_ranges:
            return self
        if ranges not in (1, 2):
            raise UsageError(f"--activation-ranges {ranges} is invalid", "use 1 or 2")
        if not self.rounds_activations:
            takers = [p.name for p in PRESETS.values() if p.rounds_activations]
            raise UsageError(f"--activation-ranges applies to presets with int8 dynamic activations, not {self.name}",
                             f"use -q {' or -q '.join(takers)}")
        return replace(self, activation_ranges=ranges)

    def to_dict(self) -> dict[str, Any]:
        """As data; `carries` and `activation_ranges` only where set, so other manifests stay as they were."""
        data = asdict(self)
        if data["carries"] is None:
            del data["carries"]
        if data["activation_ranges"] == 1:
            del data["activation_ranges"]
        return data

    @property
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)

    @property
    def rounds_activations(self) -> bool:
        """Whether some linear's input is rounded to int8 at run time (the ternary preset: its output layer's)."""
        return self.linear in DYNAMIC_ACTIVATIONS or self.lm_head in DYNAMIC_ACTIVATIONS

    @property
    def quantized(self) -> bool:
        return bool(self.linear or self.lm_head or self.embedding)


# Linear recipes whose activations are rounded to int8 at run time (`edgepack.quantize`).
DYNAMIC_ACTIVATIONS = ("8da4w", "8da8w")

PRESETS: dict[str, QuantPreset] = {
    p.name: p
    for p in (
        QuantPreset("fp32", "full precision: the reference, bit-for-bit checks"),
        QuantPreset("fp16", "half-precision weights and activations", dtype="float16"),
        QuantPreset(
            "int8",
            "int8 weights per channel with int8 dynamic activations; int8 embedding",
            linear="8da8w",
            lm_head="8da8w",
            embedding="8w",
        ),
        QuantPreset(
            "int4",
            "int4 weights per block of 32 with int8 dynamic activations (GGUF Q4_0/Q4_1/Q4_K blocks carried over "
            "exactly); int8 output layer; int4 embedding per 64",
            linear="8da4w",
            lm_head="8da8w",
            embedding="4w",
            group_size=32,
            embedding_group_size=64,
        ),
        QuantPreset(
            "ternary",
            "BitNet b1.58's ternary codes and scales carried exactly (no rounding) with its int8 per-token "
            "activations; embedding and output layer as int4 does them",
            linear="ternary",
            lm_head="8da8w",
            embedding="4w",
            embedding_group_size=64,
            carries="ternary",
        ),
    )
}


# What each kind of carried weights is, for the refusal of a student that lacks them.
CARRIED_SOURCES = {"ternary": "a BitNet b1.58 checkpoint (ternary weights: Hugging Face packed, or GGUF TQ1_0/TQ2_0)"}


def check_carried(preset: QuantPreset, architecture: str, has_blocks: bool | None = None) -> None:
    """Refuse a student that lacks the exact weights `preset` carries: from the config alone (`architecture`,
    at plan time, before anything is loaded), then with `has_blocks` once the student is open (a float BitNet
    checkpoint has the architecture but no ternary codes). Nothing would be left to carry; rounding the float
    weights instead would silently be another preset."""
    if not preset.carries:
        return
    wrong_family = preset.carries == "ternary" and architecture != "bitnet"
    if wrong_family or has_blocks is False:
        found = (f"a {architecture} model" if wrong_family
                 else f"a {architecture} checkpoint without {preset.carries} codes")
        raise UsageError(f"the {preset.name} preset needs {CARRIED_SOURCES[preset.carries]}, and this is {found}",
                         "use -q int4")


def get_preset(name: str) -> QuantPreset:
    if name not in PRESETS:
        raise UsageError(f"unknown quantization preset {name!r}", f"choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]
