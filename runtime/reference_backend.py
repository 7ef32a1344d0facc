"""The reference backend: the project's own torch `CausalLM`, run eagerly.

It is the exact-math baseline other backends are verified against, and the way to run any in-memory model
(`TorchDecoder(model)`) through the same `Session` as an exported bundle.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgepack.errors import EdgepackError
from edgepack.runtime.backend import register_backend

if TYPE_CHECKING:
    from edgepack.model import CausalLM


class TorchDecoder:
    """A `Decoder` over a `CausalLM` whose KV cache lives in the module's buffers. `score_chunk`: tokens a call when
    teacher-forced (`Session.score`; default the prefill chunk)."""

    def __init__(self, model: "CausalLM", max_prefill_chunk: int | None = None, score_chunk: int | None = None) -> None:
        import torch  # deferred: `import edgepack.runtime` stays light

        self._torch = torch
        self.model = model.eval()
        self.max_context = int(model.max_context)
        self.vocab_size = int(model.config.vocab_size)
        self.score_chunk = score_chunk
        if max_prefill_chunk:
            self.max_prefill_chunk = int(max_prefill_chunk)

    def forward(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        tokens = np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1)
        if start_pos < 0 or start_pos + tokens.size > self.max_context:
            raise ValueError(f"positions {start_pos}..{start_pos + tokens.size} exceed max_context {self.max_context}")
        torch = self._torch
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(tokens)[None], torch.tensor([start_pos], dtype=torch.long))
        return logits[0].float().numpy()

    def reset(self) -> None:
        self.model.reset_cache()


@register_backend("reference")
def open_reference(bundle_dir: Path, manifest: dict[str, Any]) -> TorchDecoder:
    """Rebuild the model from the bundle's safetensors state dict (Hugging Face parameter names), or from the
    weights read back out of a Core ML package (a host check of a bundle that needs macOS/iOS to run)."""
    from safetensors.torch import load_file

    from edgepack.bundle import bundle_file
    from edgepack.model import ModelConfig, build_model

    program = bundle_file(bundle_dir, manifest, manifest["backend"]["program"])
    config = ModelConfig(**manifest["model"]["config"])
    if program.suffix == ".mlpackage":
        import torch

        from edgepack.runtime.coreml_backend import weights_from_mlpackage

        # In the package's own compute precision (Core ML: fp16), which also halves the host check's memory.
        dtype = torch.float16 if manifest["backend"].get("compute_precision") == "float16" else torch.float32
        weights = weights_from_mlpackage(program, config, manifest["backend"], dtype)
        model = build_model(config, weights, max_context=int(manifest["context_length"]), dtype=dtype)
        del weights
        gc.collect()  # the loaded program is a web of cycles: free it now, before the gate builds its reference
        return TorchDecoder(model, max_prefill_chunk=manifest["backend"].get("max_prefill"))
    if program.suffix != ".safetensors":
        raise EdgepackError(
            f"the reference backend needs a safetensors state dict, but this bundle's program is {program.name}",
            "run it with its own backend, or export with --backend reference",
        )
    model = build_model(config, load_file(str(program)), max_context=int(manifest["context_length"]))
    return TorchDecoder(model, max_prefill_chunk=manifest["backend"].get("max_prefill"))
