"""LiteRT backend: runs the bundle's .tflite with ai-edge-litert's `CompiledModel` (LiteRT 2's runtime, XNNPACK on
CPU), driving its `prefill_T` and `decode` signatures the way LiteRT-LM's executor does.

The KV cache is the model's input and output: one LiteRT `TensorBuffer` per layer tensor, bound as both (as
LiteRT-LM binds it), so a step copies no cache. A prompt is fed as LiteRT-LM feeds it: every
token but the last through the fixed-length prefill signature (a short chunk padded; the padding's keys and
values land past the last real position, where the next real tokens overwrite them before any query can see
them), then the last token through `decode`, whose logits are the prompt's next-token distribution.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.errors import EdgepackError
from edgepack.runtime.backend import register_backend

LITERT_PIN = "ai-edge-litert==2.3.0"


def load_compiled_model(path: Path, threads: int | None) -> Any:
    try:
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator
        from ai_edge_litert.options import CpuOptions, Options
    except ImportError as e:
        raise EdgepackError(f"the LiteRT runtime is not installed ({e})", f"pip install {LITERT_PIN}") from None
    options = Options(hardware_accelerators=HardwareAccelerator.CPU,
                      cpu_options=CpuOptions(num_threads=threads or os.cpu_count() or 1))
    return CompiledModel.from_file(str(path), options=options)


def buffer_shape(buffer: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in buffer.get_tensor_details()["shape"])


class LiteRtDecoder:
    """A `Decoder` over the program's signatures; `forward` returns the last position's logits [1, vocab]
    (`last_logits_only`: the prefill signature has no logits output, as in LiteRT-LM's models)."""

    last_logits_only = True
    label = "litert/cpu"

    def __init__(self, program_path: Path, max_context: int, vocab_size: int, prefill_signature: str,
                 threads: int | None = None) -> None:
        threads = threads or int(os.environ.get("EDGEPACK_THREADS", "0") or 0) or None
        self.model = load_compiled_model(program_path, threads)
        self.max_context, self.vocab_size = max_context, vocab_size
        signatures = self.model.get_signature_list()
        if prefill_signature not in signatures or "decode" not in signatures:
            raise EdgepackError(f"the LiteRT program has signatures {sorted(signatures)}, not "
                                f"{prefill_signature!r} and 'decode'", "re-export the bundle with this edgepack")
        self.prefill_signature = prefill_signature
        self.prefill_length = int(prefill_signature.rsplit("_", 1)[1])
        self.max_prefill_chunk = self.prefill_length + 1  # a chunk's last token goes through decode
        names = self.model.get_input_tensor_details("decode")
        # One buffer per cache tensor, bound as both input and output of either signature (same shapes).
        self._cache = {name: self.model.create_input_buffer_by_name("decode", name)
                       for name in names if name.startswith("kv_cache_")}
        for buffer in self._cache.values():
            buffer.write(np.zeros(buffer_shape(buffer), np.float32))
        self._io = {signature: {name: self.model.create_input_buffer_by_name(signature, name)
                                for name in ("tokens", "input_pos")}
                    for signature in (prefill_signature, "decode")}
        self._logits = self.model.create_output_buffer_by_name("decode", "logits")

    def reset(self) -> None:
        """Nothing to clear: a query reads cache positions up to its own only, all written before it runs."""

    def _run(self, signature: str, tokens: np.ndarray, start: int) -> None:
        length = 1 if signature == "decode" else self.prefill_length
        ids = np.zeros((1, length), np.int32)
        ids[0, : tokens.size] = tokens
        io = self._io[signature]
        io["tokens"].write(ids)
        io["input_pos"].write(np.arange(start, start + length, dtype=np.int32))
        outputs = dict(self._cache)
        if signature == "decode":
            outputs["logits"] = self._logits
        self.model.run_by_name(signature, {**io, **self._cache}, outputs)

    def forward(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if tokens.size == 0 or start_pos < 0 or start_pos + tokens.size > self.max_context:
            raise EdgepackError(f"{tokens.size} tokens at position {start_pos} do not fit the context of "
                                f"{self.max_context}", "start a new conversation")
        pos, head = start_pos, tokens[:-1]
        while pos - start_pos < head.size:
            chunk = head[pos - start_pos: pos - start_pos + self.prefill_length]
            if pos + self.prefill_length <= self.max_context:  # the padded chunk fits the cache
                self._run(self.prefill_signature, chunk, pos)
                pos += chunk.size
            else:  # near the end of the context: a padded write would be clamped, so one token at a time
                self._run("decode", chunk[:1], pos)
                pos += 1
        self._run("decode", tokens[-1:], pos)
        return self._logits.read(self.vocab_size, np.float32).reshape(1, self.vocab_size)


@register_backend("litert")
def open_litert(bundle_dir: Path, manifest: dict[str, Any]) -> LiteRtDecoder:
    from edgepack.bundle import bundle_file

    backend = manifest["backend"]
    return LiteRtDecoder(
        bundle_file(bundle_dir, manifest, backend["program"]),
        max_context=int(manifest["context_length"]),
        vocab_size=int(manifest["model"]["config"]["vocab_size"]),
        prefill_signature=str(backend["prefill_signature"]),
    )
