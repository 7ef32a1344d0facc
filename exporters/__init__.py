"""Exporters lower a quantized `CausalLM` into a bundle's model file(s): one module per backend.

Each module registers one function with `@register_exporter(NAME)`; adding a backend is adding a module
to this folder (every module here is imported when an exporter is first looked up). The function gets an `ExportRequest`, writes its files
through `request.writer` and returns the manifest's `backend` section.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from edgepack.bundle import BundleWriter
from edgepack.errors import EdgepackError
from edgepack.model import CausalLM
from edgepack.progress import SILENT, Steps

if TYPE_CHECKING:
    from collections.abc import Mapping

    from edgepack.blocks import CarriedBlocks, TernaryBlocks
    from edgepack.model import ModelConfig
    from edgepack.presets import QuantPreset
    from edgepack.targets import Target


@dataclass
class ExportRequest:
    model: CausalLM  # already quantized by the preset
    writer: BundleWriter
    delegate: str | None
    max_context: int
    max_prefill: int
    bos_id: int | None
    eos_ids: list[int]
    step: Steps = field(default=SILENT)  # progress: names the stage starting, counts its units
    # For exporters registered with quantizes=True: `model` is then unquantized and they apply `preset`
    # themselves (e.g. ONNX writes MatMulNBits from `gguf_blocks`, the student's GGUF blocks, directly).
    target: "Target | None" = None
    preset: "QuantPreset | None" = None
    gguf_blocks: "Mapping[str, CarriedBlocks]" = field(default_factory=dict)
    # BitNet b1.58 students: every layer linear's ternary codes and scales (`Student.ternary_blocks`), which the
    # `ternary` preset stores as they are.
    ternary_blocks: "Mapping[str, TernaryBlocks]" = field(default_factory=dict)
    model_name: str | None = None  # the Hub id when known, else the student's name (package metadata)


Exporter = Callable[[ExportRequest], dict[str, Any]]
# preflight(target, delegate, preset) raises EdgepackError before any model is loaded (missing runtime, bad SoC)
Preflight = Callable[["Target", "str | None", "QuantPreset"], None]
# extra_bundle_bytes(config, target, delegate): files beyond the model's weights (e.g. NPU context binaries),
# so the fit check before the export sees the bundle's real size
ExtraBytes = Callable[["ModelConfig", "Target", "str | None"], float]
# context_limit(target, delegate): the longest context the exporter can build for this target (e.g. the NPU's
# static graphs), or None; the plan caps its default context there and refuses a longer --max-context.
ContextLimit = Callable[["Target", "str | None"], "int | None"]
# same_weights(preset, blocks) -> prepare: for exporters registered with quantizes=True, the rounding they
# apply, as a `build_model` prepare step (`blocks`: the student's exact weights the preset builds from,
# `quantize.carried_blocks`: its ternary codes for the ternary preset, else its GGUF blocks), so the gate can run the project's torch model on the bundle's own
# quantized weights (lowering fidelity). Others get the preset's torchao quantizer, which is what they lower.
SameWeights = Callable[["QuantPreset", Any], Callable[[str, Any], None]]
# weight_bytes(config, preset) -> stored bytes by part (`fit.weight_bytes`' parts), or None: where the exporter
# stores a preset in its own layout (e.g. ONNX's 2-bit ternary codes), so the fit check counts what it writes.
WeightBytes = Callable[["ModelConfig", "QuantPreset"], "dict[str, float] | None"]
_WEIGHT_BYTES: dict[str, WeightBytes] = {}
_SAME_WEIGHTS: dict[str, SameWeights] = {}
_EXPORTERS: dict[str, Exporter] = {}
_CONTEXT_LIMIT: dict[str, ContextLimit] = {}
_PREFLIGHT: dict[str, Preflight] = {}
_EXTRA_BYTES: dict[str, ExtraBytes] = {}
_QUANTIZES: set[str] = set()
_ONE_TIED_TABLE: set[str] = set()
_ACTIVATION_RANGES: set[str] = set()


def register_exporter(
    name: str, *, quantizes: bool = False, preflight: Preflight | None = None, one_tied_table: bool = False,
    extra_bundle_bytes: ExtraBytes | None = None, context_limit: ContextLimit | None = None,
    same_weights: SameWeights | None = None, weight_bytes: WeightBytes | None = None,
    activation_ranges: bool = False,
) -> Callable[[Exporter], Exporter]:
    """`quantizes`: the exporter applies the preset itself (gets the fp32 model); `preflight`: cheap checks;
    `one_tied_table`: it stores a tied embedding and output layer as one table, so the output layer must
    stay equal to the embedding (no smoothing of the output layer); `extra_bundle_bytes`: see ExtraBytes; `context_limit`: see ContextLimit;
    `same_weights`: see SameWeights; `weight_bytes`: see WeightBytes; `activation_ranges`: it honours the preset's
    `activation_ranges` (it lowers to kernels that round int8 activations per token)."""

    def wrap(fn: Exporter) -> Exporter:
        if name in _EXPORTERS:
            raise ValueError(f"exporter {name!r} registered twice")
        _EXPORTERS[name] = fn
        if quantizes:
            _QUANTIZES.add(name)
        if one_tied_table:
            _ONE_TIED_TABLE.add(name)
        if activation_ranges:
            _ACTIVATION_RANGES.add(name)
        if preflight:
            _PREFLIGHT[name] = preflight
        if extra_bundle_bytes:
            _EXTRA_BYTES[name] = extra_bundle_bytes
        if context_limit:
            _CONTEXT_LIMIT[name] = context_limit
        if same_weights:
            _SAME_WEIGHTS[name] = same_weights
        if weight_bytes:
            _WEIGHT_BYTES[name] = weight_bytes
        return fn

    return wrap


def exporter_keeps_one_tied_table(name: str) -> bool:
    _import_builtin_exporters()
    return name in _ONE_TIED_TABLE


def takes_activation_ranges(name: str) -> bool:
    _import_builtin_exporters()
    return name in _ACTIVATION_RANGES


def exporter_quantizes(name: str) -> bool:
    _import_builtin_exporters()
    return name in _QUANTIZES


def same_weights_quantizer(name: str) -> SameWeights | None:
    _import_builtin_exporters()
    return _SAME_WEIGHTS.get(name)


def preflight(name: str, target: "Target", delegate: str | None, preset: "QuantPreset") -> None:
    _import_builtin_exporters()
    if name in _PREFLIGHT:
        _PREFLIGHT[name](target, delegate, preset)


def extra_bundle_bytes(name: str, config: "ModelConfig", target: "Target", delegate: str | None) -> float:
    _import_builtin_exporters()
    return _EXTRA_BYTES[name](config, target, delegate) if name in _EXTRA_BYTES else 0.0


def stored_weight_bytes(name: str, config: "ModelConfig", preset: "QuantPreset") -> "dict[str, float] | None":
    _import_builtin_exporters()
    return _WEIGHT_BYTES[name](config, preset) if name in _WEIGHT_BYTES else None


def context_limit(name: str, target: "Target", delegate: str | None) -> int | None:
    _import_builtin_exporters()
    return _CONTEXT_LIMIT[name](target, delegate) if name in _CONTEXT_LIMIT else None


def get_exporter(name: str) -> Exporter:
    _import_builtin_exporters()
    if name not in _EXPORTERS:
        raise EdgepackError(f"no exporter for backend {name!r}", f"known backends: {', '.join(sorted(_EXPORTERS))}")
    return _EXPORTERS[name]


def known_exporters() -> list[str]:
    _import_builtin_exporters()
    return sorted(_EXPORTERS)


def _import_builtin_exporters() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
