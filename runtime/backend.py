"""What a runtime backend is: a stateful decoder that turns token ids into next-token logits.

Every backend (reference torch, ExecuTorch, and later ONNX Runtime, Core ML) implements this one small
interface; tokenization, sampling, stop handling and streaming live above it in `session.py`, the same
for all of them.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from edgepack.errors import EdgepackError


class Decoder(Protocol):
    """A model with a KV cache: `forward` appends tokens at `start_pos` and returns their logits."""

    max_context: int
    vocab_size: int

    def forward(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        """tokens: int64 [T]; returns float32 logits [T, vocab] for each of the T positions, or [1, vocab] for
        the last one where the decoder has `last_logits_only = True` (what generation needs)."""
        ...

    def reset(self) -> None:
        """Forget the cache (a new conversation starts at position 0)."""
        ...

    # Optional: `forward_last(tokens, start_pos) -> [1, vocab]`, the same step computing the output layer for the
    # last position only (what a prompt needs); `Session` uses it where a decoder has it.


# backend name (as written in a bundle manifest) -> factory(bundle_dir, manifest) -> Decoder
BackendFactory = Callable[[Path, dict], Decoder]
_BACKENDS: dict[str, BackendFactory] = {}


def register_backend(name: str) -> Callable[[BackendFactory], BackendFactory]:
    """Decorator: one registration point; a duplicate name is a programming error."""

    def wrap(factory: BackendFactory) -> BackendFactory:
        if name in _BACKENDS:
            raise ValueError(f"runtime backend {name!r} registered twice")
        _BACKENDS[name] = factory
        return factory

    return wrap


def open_backend(name: str, bundle_dir: Path, manifest: dict) -> Decoder:
    _import_builtin_backends()
    if name not in _BACKENDS:
        raise EdgepackError(
            f"unknown runtime backend {name!r}",
            f"known backends: {', '.join(sorted(_BACKENDS))}",
        )
    return _BACKENDS[name](bundle_dir, manifest)


def known_backends() -> list[str]:
    _import_builtin_backends()
    return sorted(_BACKENDS)


def _import_builtin_backends() -> None:
    """Import every `*_backend.py` module of this package: adding a backend is adding such a file.

    The modules themselves import their heavy runtime (torch, ExecuTorch, ...) only when a bundle opens."""
    import edgepack.runtime as package

    for module in pkgutil.iter_modules(package.__path__):
        if module.name.endswith("_backend"):
            importlib.import_module(f"{package.__name__}.{module.name}")
