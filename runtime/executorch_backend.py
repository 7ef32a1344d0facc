"""ExecuTorch backend: runs the bundle's .pte through ExecuTorch's own C++ runtime (Python bindings).

The KV cache lives inside the program as mutable buffers, so each call passes only the new tokens and
their start position, exactly as ExecuTorch's Android/iOS LLM runners drive the same file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.errors import EdgepackError
from edgepack.runtime.backend import register_backend


def load_executorch_runtime() -> Any:
    """Import the runtime and register the kernels our programs use (llama:: custom ops, quantized ops)."""
    try:
        import torch  # noqa: F401  (the bindings resolve libtorch symbols)
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
        from executorch.kernels import quantized  # noqa: F401
        from executorch.runtime import Runtime
    except ImportError as e:
        raise EdgepackError(f"ExecuTorch runtime is not installed ({e})", "pip install executorch==1.5.1") from None
    return Runtime.get()


def set_threads(count: int) -> None:
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(count)


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
        self._runtime = load_executorch_runtime()
        threads = os.environ.get("EDGEPACK_THREADS")
        if threads:
            set_threads(int(threads))
        program = self._runtime.load_program(self.path)
        self._method = program.load_method("forward")  # XNNPACK packs its weights here, once

    def reset(self) -> None:
        """Nothing to clear: attention reads cache positions < start_pos + T only, and a new conversation
        rewrites them from position 0 before they are read."""

    def forward(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        torch = self._torch
        tokens_t = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64).reshape(1, -1))
        (logits,) = self._method.execute([tokens_t, torch.tensor([start_pos], dtype=torch.long)])
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
