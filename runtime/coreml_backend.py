"""Core ML backend: stateful prediction of the bundle's model.mlpackage through coremltools (macOS only).

The package has two functions over one KV-cache state: `prefill` (a fixed chunk of tokens) and `decode`
(one token). A chunk shorter than the prefill length is padded: the padded positions are written past the
real tokens and rewritten before anything reads them (attention sees positions <= its own only).

On Linux Core ML cannot predict; `weights_from_mlpackage` still reads the program's weights back
(dequantized from its int4/int8 constants), which is how the reference backend checks a Core ML bundle here.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.errors import EdgepackError
from edgepack.runtime.backend import register_backend

PREFILL, DECODE = "prefill", "decode"


class CoreMLDecoder:
    """A `Decoder` over the package's `prefill`/`decode` functions sharing one MLState."""

    def __init__(self, path: Path, max_context: int, vocab_size: int, prefill: int, compute_units: str = "ALL") -> None:
        import coremltools as ct

        units = getattr(ct.ComputeUnit, compute_units)
        self.max_context, self.vocab_size, self.max_prefill_chunk = max_context, vocab_size, prefill
        self._decode = ct.models.MLModel(str(path), compute_units=units, function_name=DECODE)
        self._prefill = ct.models.MLModel(str(path), compute_units=units, function_name=PREFILL) if prefill > 1 else None
        self._state = self._decode.make_state()

    def reset(self) -> None:
        self._state = self._decode.make_state()

    def _call(self, model: Any, tokens: np.ndarray, start: int) -> np.ndarray:
        out = model.predict(
            {"input_ids": tokens.astype(np.int32)[None], "position": np.array([start], dtype=np.int32)}, state=self._state
        )
        return np.asarray(out["logits"], dtype=np.float32)[0]

    def forward(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        tokens = np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1)
        if start_pos < 0 or start_pos + tokens.size > self.max_context:
            raise ValueError(f"positions {start_pos}..{start_pos + tokens.size} exceed max_context {self.max_context}")
        rows, i, chunk = [], 0, self.max_prefill_chunk
        while i < tokens.size:
            left = tokens.size - i
            if left == 1 or self._prefill is None:
                rows.append(self._call(self._decode, tokens[i : i + 1], start_pos + i))
                i += 1
                continue
            part = tokens[i : i + min(chunk, left)]
            padded = np.concatenate([part, np.zeros(chunk - part.size, dtype=np.int64)])
            rows.append(self._call(self._prefill, padded, start_pos + i)[: part.size])
            i += part.size
        return np.concatenate(rows, axis=0)


def weights_from_mlpackage(path: Path, config: Any) -> dict[str, Any]:
    """The program's weights as a Hugging Face-named fp32 state dict (int4/int8 constants dequantized)."""
    import coremltools as ct
    import torch
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_to_pymil

    from edgepack.model import CausalLM

    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    prog = milproto_to_pymil(
        model_spec=spec, specification_version=spec.specificationVersion, file_weights_dir=model.weights_dir
    )
    with torch.device("meta"):
        names = [name for name, _ in CausalLM(config, 1).named_parameters()]
    wanted = {"p_lm_" + n.replace(".", "_"): n for n in names}
    if config.tie_word_embeddings:
        wanted["p_lm_lm_head_weight"] = "model.embed_tokens.weight"
    function = prog.functions.get(DECODE) or next(iter(prog.functions.values()))
    state: dict[str, torch.Tensor] = {}
    for op in function.operations:
        if op.op_type != "const" and not op.op_type.startswith("constexpr_"):
            continue
        base = op.name.removesuffix("_quantized").removesuffix("_to_fp16")
        if base not in wanted:
            continue
        value = op.outputs[0].val if op.op_type == "const" else op.materialized_val_inference()
        value = value[0] if isinstance(value, tuple) else value
        state[wanted[base]] = torch.from_numpy(np.asarray(value, dtype=np.float32).copy())
    missing = sorted(set(names) - set(state) - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
    if missing:
        raise EdgepackError(f"{path.name} lacks weights {missing[:3]}", "re-export the bundle with this edgepack")
    return state


@register_backend("coreml")
def open_coreml(bundle_dir: Path, manifest: dict[str, Any]) -> CoreMLDecoder:
    if sys.platform != "darwin":
        raise EdgepackError(
            "Core ML prediction needs macOS or iOS (this bundle's backend is coreml)",
            f"run it on a Mac or in the iOS demo; for a host check: edgepack run {bundle_dir} PROMPT --backend reference",
        )
    backend = manifest["backend"]
    return CoreMLDecoder(
        Path(bundle_dir) / backend["program"],
        max_context=int(manifest["context_length"]),
        vocab_size=int(manifest["model"]["config"]["vocab_size"]),
        prefill=int(backend["functions"].get(PREFILL, 1)),
        compute_units=str(backend.get("compute_units", "ALL")),
    )
