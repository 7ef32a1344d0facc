"""Core ML backend: stateful prediction of the bundle's model.mlpackage through coremltools (macOS only).

It drives the package's default function `main` exactly as Hugging Face's swift-transformers
(`LanguageModelWithStatefulKVCache`) does, so that what passes here is what a Swift chat app runs: `inputIds`
int32 [1, T] (the whole prompt in one call, then one token a call) and `causalMask` fp16 zeros
[1, 1, 1, tokenCount + 1], tokenCount = every token so far; the model derives the cache position from those
shapes (edgepack/exporters/coreml.py, `cache_position`). One MLState holds the KV cache (`keyCache`/`valueCache`).

On Linux Core ML cannot predict; `weights_from_mlpackage` still reads the program's weights back
(dequantized from its int4/int8 constants), which is how the reference backend checks a Core ML bundle here.
"""

from __future__ import annotations

import sys
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import numpy as np

from edgepack.errors import EdgepackError
from edgepack.runtime.backend import register_backend

MAIN = "main"  # the default function: what swift-transformers loads (it names no function)
INPUT_IDS, CAUSAL_MASK, LOGITS = "inputIds", "causalMask", "logits"


def swift_transformers_inputs(tokens: np.ndarray, start_pos: int) -> dict[str, np.ndarray]:
    """What swift-transformers feeds for `tokens` written at cache position `start_pos`: inputIds int32 [1, T]
    and causalMask fp16 zeros [1, 1, 1, tokenCount + 1] with tokenCount = start_pos + T (prefill: start 0 and
    the whole prompt; extend: the last token at tokenCount - 1)."""
    ids = np.ascontiguousarray(tokens, dtype=np.int32).reshape(1, -1)
    return {INPUT_IDS: ids, CAUSAL_MASK: np.zeros((1, 1, 1, start_pos + ids.shape[1] + 1), dtype=np.float16)}


class CoreMLDecoder:
    """A `Decoder` over the package's `main` function and one MLState."""

    def __init__(self, path: Path, max_context: int, vocab_size: int, compute_units: str = "CPU_AND_GPU") -> None:
        import coremltools as ct

        self.max_context, self.vocab_size = max_context, vocab_size
        # No function named, as swift-transformers names none: the package's default function, `main`.
        self._model = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, compute_units))
        self._state = self._model.make_state()

    def reset(self) -> None:
        self._state = self._model.make_state()

    def forward(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        tokens = np.asarray(tokens).reshape(-1)
        if start_pos < 0 or start_pos + tokens.size > self.max_context:
            raise ValueError(f"positions {start_pos}..{start_pos + tokens.size} exceed max_context {self.max_context}")
        out = self._model.predict(swift_transformers_inputs(tokens, start_pos), state=self._state)
        return np.asarray(out[LOGITS], dtype=np.float32)[0]


def weights_from_mlpackage(
    path: Path, config: Any, backend: Mapping[str, Any] | None = None, dtype: Any = None
) -> Mapping[str, Any]:
    """The program's weights as a Hugging Face-named state dict in `dtype` (default float32; int4/int8 constants
    dequantized), each read when accessed: a model built from it piece by piece never holds a second copy (a
    1.5B student's fp32 weights are 7.1 GB).

    `backend`: the manifest's section, for the weights the package does not hold under their own names
    (exporters/coreml.py, `equal_weights`): `equal_weights` groups (an absent member takes the value found under
    another) and `constant_weights` (one value everywhere)."""
    import coremltools as ct
    import torch
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_to_pymil

    from edgepack.intake.weights import LazyWeights
    from edgepack.model import CausalLM

    dtype = dtype or torch.float32
    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    prog = milproto_to_pymil(
        model_spec=spec, specification_version=spec.specificationVersion, file_weights_dir=model.weights_dir
    )
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in CausalLM(config, 1).named_parameters()}
    wanted = {"p_lm_" + n.replace(".", "_"): n for n in shapes}
    if config.tie_word_embeddings:
        wanted["p_lm_lm_head_weight"] = "model.embed_tokens.weight"
    function = prog.functions.get(MAIN) or next(iter(prog.functions.values()))

    def read(op: Any) -> torch.Tensor:
        value = op.outputs[0].val if op.op_type == "const" else op.materialized_val_inference()
        value = value[0] if isinstance(value, tuple) else value
        return torch.from_numpy(np.array(value)).to(dtype)

    readers: dict[str, Any] = {}
    for op in function.operations:
        base = op.name.removesuffix("_quantized").removesuffix("_to_fp16")
        if (op.op_type == "const" or op.op_type.startswith("constexpr_")) and base in wanted:
            readers[wanted[base]] = lambda op=op: read(op)
    backend = backend or {}
    for name, value in backend.get("constant_weights", {}).items():
        if name not in readers and name in shapes:
            readers[name] = lambda shape=shapes[name], v=float(value): torch.full(shape, v, dtype=dtype)
    for group in backend.get("equal_weights", []):
        found = next((readers[name] for name in group if name in readers), None)
        for name in group:
            if found is not None and name not in readers:
                readers[name] = found
    missing = sorted(set(shapes) - set(readers) - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
    if missing:
        raise EdgepackError(f"{path.name} lacks weights {missing[:3]}", "re-export the bundle with this edgepack")
    return LazyWeights(readers)


@register_backend("coreml")
def open_coreml(bundle_dir: Path, manifest: dict[str, Any]) -> CoreMLDecoder:
    if sys.platform != "darwin":
        raise EdgepackError(
            "Core ML prediction needs macOS or iOS (this bundle's backend is coreml)",
            f"run it on a Mac or in the iOS demo; for a host check: edgepack run {bundle_dir} PROMPT --backend reference",
        )
    from edgepack.bundle import bundle_file

    backend = manifest["backend"]
    if MAIN not in backend["functions"]:
        raise EdgepackError(
            f"this Core ML bundle has no {MAIN!r} function (functions {sorted(backend['functions'])}): it predates "
            "the swift-transformers layout",
            "re-export it with this edgepack",
        )
    return CoreMLDecoder(
        bundle_file(bundle_dir, manifest, backend["program"]),
        max_context=int(manifest["context_length"]),
        vocab_size=int(manifest["model"]["config"]["vocab_size"]),
        compute_units=str(backend.get("compute_units", "CPU_AND_GPU")),
    )
