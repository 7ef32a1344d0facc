"""ExecuTorch backend: runs the bundle's .pte through ExecuTorch's own C++ runtime (Python bindings).

The KV cache lives inside the program as mutable buffers, so each call passes only the new tokens and
their start position, exactly as ExecuTorch's Android/iOS LLM runners drive the same file.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.errors import EdgepackError
from edgepack.runtime.backend import register_backend


def load_executorch_runtime() -> Any:
    """ExecuTorch's compiled bindings with the kernel libraries our programs use (llama:: custom ops, quantized
    ops) registered. Only the compiled modules: `executorch.runtime` and the custom ops' Python wrapper import
    ExecuTorch's whole exporter (exir, torch._inductor): +134 MB resident and ~4 s before the first token."""
    try:
        import torch  # the bindings resolve libtorch symbols
        from executorch.extension.pybindings import _C

        importlib.import_module("executorch.kernels.quantized")  # it loads the quantized ops' kernel library
    except ImportError as e:
        raise EdgepackError(f"ExecuTorch runtime is not installed ({e})", "pip install executorch==1.5.1") from None
    if not hasattr(torch.ops.llama, "custom_sdpa"):  # not yet loaded (an export in this process loads it too)
        torch.ops.load_library(_kernel_library("executorch.extension.llm.custom_ops", "custom_ops_aot_lib"))
    return _C


def _kernel_library(package: str, stem: str) -> Path:
    spec = importlib.util.find_spec(package)
    found = [p for d in (spec.submodule_search_locations if spec else []) for p in Path(d).glob(f"lib{stem}.*")]
    if not found:
        raise EdgepackError(f"ExecuTorch's kernel library lib{stem} is missing from {package}",
                            "pip install --force-reinstall executorch==1.5.1")
    return found[0]


def set_threads(count: int) -> None:
    load_executorch_runtime()._unsafe_reset_threadpool(count)


class ExecuTorchDecoder:
    """A `Decoder` over a .pte's `forward(tokens [1, T], input_pos [1])`: logits [1, vocab] of the last position
    (`last_logits_only`, bundles since the ExecuTorch runner work) or [1, T, vocab] (earlier bundles)."""

    def __init__(self, program_path: Path, max_context: int, vocab_size: int, max_prefill_chunk: int,
                 last_logits_only: bool = False) -> None:
        import torch

        self._torch = torch
        self.last_logits_only = last_logits_only
        self.path = program_path
        self.max_context, self.vocab_size, self.max_prefill_chunk = max_context, vocab_size, max_prefill_chunk
        bindings = load_executorch_runtime()
        threads = os.environ.get("EDGEPACK_THREADS")
        if threads:
            set_threads(int(threads))
        # InternalConsistency: the flatbuffer is checked before use (a bundle's checksums say nothing of its author)
        self._program = bindings._load_program(str(self.path),
                                               program_verification=bindings.Verification.InternalConsistency)
        self._method = self._program.load_method("forward")  # XNNPACK packs its weights here, once

    def reset(self) -> None:
        """Nothing to clear: attention reads cache positions < start_pos + T only, and a new conversation
        rewrites them from position 0 before they are read."""

    def forward(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        torch = self._torch
        tokens_t = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64).reshape(1, -1))
        (logits,) = self._method.call([tokens_t, torch.tensor([start_pos], dtype=torch.long)])
        return logits.float().numpy().reshape(-1, self.vocab_size)


@register_backend("executorch")
def open_executorch(bundle_dir: Path, manifest: dict[str, Any]) -> ExecuTorchDecoder:
    from edgepack.bundle import bundle_file

    backend = manifest["backend"]
    return ExecuTorchDecoder(
        bundle_file(bundle_dir, manifest, backend["program"]),
        max_context=int(manifest["context_length"]),
        vocab_size=int(manifest["model"]["config"]["vocab_size"]),
        max_prefill_chunk=int(backend["max_prefill"]),
        last_logits_only=backend.get("logits") == "last",
    )
