"""Exporters lower a quantized `CausalLM` into a bundle's model file(s): one module per backend.

Each module registers one function with `@register_exporter(NAME)`; adding a backend is adding a module
to this folder (every module here is imported when an exporter is first looked up). The function gets an `ExportRequest`, writes its files
through `request.writer` and returns the manifest's `backend` section.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

from edgepack.bundle import BundleWriter
from edgepack.errors import EdgepackError
from edgepack.model import CausalLM


@dataclass
class ExportRequest:
    model: CausalLM  # already quantized by the preset
    writer: BundleWriter
    delegate: str | None
    max_context: int
    max_prefill: int
    bos_id: int | None
    eos_ids: list[int]
    step: Callable[[str], None] = field(default=lambda _msg: None)  # progress: names the stage starting


Exporter = Callable[[ExportRequest], dict[str, Any]]
_EXPORTERS: dict[str, Exporter] = {}


def register_exporter(name: str) -> Callable[[Exporter], Exporter]:
    def wrap(fn: Exporter) -> Exporter:
        if name in _EXPORTERS:
            raise ValueError(f"exporter {name!r} registered twice")
        _EXPORTERS[name] = fn
        return fn

    return wrap


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
