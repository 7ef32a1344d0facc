"""ONNX Runtime backends: the CPU model (`onnx/cpu`) and the Hexagon NPU context models through the QNN
execution provider on its HTP backend (`onnx/qnn`; on x86 Linux that is Qualcomm's HTP simulator).

Both keep the KV cache on the host, because the models take it as explicit inputs/outputs:
- CPU: one max-length buffer per layer, bound as both `past_*` and `present_*` (GroupQueryAttention appends in
  place; the graph reads the attended length from `attention_mask`, as onnxruntime-genai's models do).
- NPU: static shapes. Each graph reads `past [1, kv, C - T, D]` plus T new tokens and returns only the new
  keys/values; the host owns a [1, kv, C, D] buffer per layer, writes them at their positions and passes
  RoPE cos/sin and an additive mask (padding and empty cache slots masked) as inputs.
  Position 0 goes through the CPU model: it is the attention sink, whose residual reaches ~24000 in
  SmolLM2 (under ~900 at every later position; "massive activations" are common to Llama/Qwen models),
  and 16-bit per-tensor ranges wide enough for it round every other token's activations away (192 tokens
  of prose: 84% top-1 with position 0 on the NPU, 90% without).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgepack.errors import EdgepackError
from edgepack.runtime.backend import register_backend

LAST_ONLY_INPUT = "last_token_logits"  # CPU graphs: int64 [1], 1 = the output layer on the last position only
NPU_MASK_VALUE = -80.0  # same constant the exporter calibrated with (exporters/onnx_graph.py)


def session_options(threads: int | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    threads = threads or int(os.environ.get("EDGEPACK_THREADS", "0") or 0)
    if threads:
        so.intra_op_num_threads = threads
    return so


class OrtCpuDecoder:
    """A `Decoder` over the CPU model with one max-length KV buffer per layer, bound (IOBinding) as both the
    `past_*` input and the `present_*` output: GroupQueryAttention writes the new keys/values in place, as in
    onnxruntime-genai's `past_present_share_buffer` mode. No cache is copied per step (the old concat layout
    copied the whole cache in and out each step); what still grows with context is attention over the fp32 cache
    (default int4 model, 2 threads: 12.7 ms a step at position 1, 25.2 ms at 1,500)."""

    label = "onnx/cpu"  # what verification reports as the backend that ran

    def __init__(self, program: Path | bytes, num_layers: int, kv_heads: int, head_dim: int, max_context: int,
                 vocab_size: int, max_prefill_chunk: int = 128, threads: int | None = None) -> None:
        import onnxruntime as ort

        source = program if isinstance(program, bytes) else str(program)
        self._ort = ort
        try:
            self.session = ort.InferenceSession(source, session_options(threads), providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT's own message names the problem: a weights file outside the bundle, a bad graph
            where = "the model" if isinstance(program, bytes) else Path(program).name
            raise EdgepackError(f"ONNX Runtime cannot load {where}: {str(e).splitlines()[0]}",
                                "re-export the bundle with edgepack; do not edit its files") from None
        if "attention_mask" not in {i.name for i in self.session.get_inputs()}:
            raise EdgepackError("this ONNX bundle's model predates the shared KV-cache layout (no attention_mask input)",
                                "re-export the bundle with this edgepack")
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.max_context, self.vocab_size, self.max_prefill_chunk = max_context, vocab_size, max_prefill_chunk
        shape = (1, kv_heads, max_context, head_dim)
        # name -> numpy buffer; the OrtValues below share its memory (host-side reads see what GQA wrote).
        self.cache = {f"past_{kind}_{i}": np.zeros(shape, np.float32)
                      for i in range(num_layers) for kind in ("key", "value")}
        self.binding = self.session.io_binding()
        for name, buffer in self.cache.items():
            value = ort.OrtValue.ortvalue_from_numpy(buffer)
            self.binding.bind_ortvalue_input(name, value)
            self.binding.bind_ortvalue_output(name.replace("past_", "present_"), value)
        self.cached = 0  # positions held in the buffers
        # The optional last_token_logits input (an initializer gives its default, so only get_overridable_initializers
        # lists it); bundles before it compute every row. It binds only as an OrtValue (bind_cpu_input misses it).
        self._last_only: dict[bool, Any] = {}
        if LAST_ONLY_INPUT in {i.name for i in self.session.get_overridable_initializers()}:
            self._last_only = {flag: ort.OrtValue.ortvalue_from_numpy(np.full(1, int(flag), np.int64))
                               for flag in (False, True)}
            self.forward_last = self._forward_last

    def reset(self) -> None:
        self.cached = 0  # GQA reads only the first `attention_mask` positions: no need to clear the buffers

    def _forward_last(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        """`forward` with the output layer on the last position only: logits [1, vocab]."""
        return self.forward(tokens, start_pos, last_only=True)

    def forward(self, tokens: np.ndarray, start_pos: int, last_only: bool = False) -> np.ndarray:
        tokens = np.ascontiguousarray(tokens, dtype=np.int64).reshape(1, -1)
        if start_pos > self.cached or start_pos + tokens.shape[1] > self.max_context:
            raise ValueError(f"start_pos {start_pos} with {tokens.shape[1]} tokens: cache holds {self.cached}, "
                             f"max_context {self.max_context}")
        total = start_pos + tokens.shape[1]
        self.binding.bind_cpu_input("input_ids", tokens)
        self.binding.bind_cpu_input("attention_mask", np.ones((1, total), np.int64))
        if self._last_only:
            self.binding.bind_ortvalue_input(LAST_ONLY_INPUT, self._last_only[last_only])
        logits = np.empty((1, 1 if last_only else tokens.shape[1], self.vocab_size), np.float32)
        self.binding.bind_ortvalue_output("logits", self._ort.OrtValue.ortvalue_from_numpy(logits))
        self.session.run_with_iobinding(self.binding)
        self.cached = total
        return logits[0]


class StaticGraphDecoder:
    """A `Decoder` over the NPU's two static graphs (prefill: T = chunk tokens, decode: T = 1).

    `run(graph, feeds)` executes one graph ("prefill" or "decode"); `record`, if set, sees every feed
    (the exporter calibrates the quantization on exactly what this host loop passes). `first`, if set,
    computes position 0 instead (see the module docstring): an `OrtCpuDecoder`."""

    label = "onnx/qnn"

    def __init__(self, run: Callable[[str, dict], list[np.ndarray]], num_layers: int, kv_heads: int,
                 head_dim: int, context: int, prefill_len: int, vocab_size: int, inv_freq: np.ndarray,
                 record: Callable[[str, dict], None] | None = None, first: OrtCpuDecoder | None = None) -> None:
        self._run, self.record, self.first = run, record, first
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.max_context, self.prefill_len, self.vocab_size = context, prefill_len, vocab_size
        self.max_prefill_chunk = prefill_len
        self.inv_freq = np.asarray(inv_freq, np.float32)
        self.reset()

    def reset(self) -> None:
        shape = (1, self.kv_heads, self.max_context, self.head_dim)
        self.keys = [np.zeros(shape, np.float32) for _ in range(self.num_layers)]
        self.values = [np.zeros(shape, np.float32) for _ in range(self.num_layers)]

    def forward(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if start_pos + tokens.size > self.max_context:
            raise ValueError(f"positions up to {start_pos + tokens.size} exceed the NPU context {self.max_context}")
        rows, pos, i = [], start_pos, 0
        if start_pos == 0 and self.first is not None and tokens.size:
            rows.append(self._first_position(int(tokens[0])))
            pos, i = 1, 1
        while i < tokens.size:
            left = tokens.size - i
            use_prefill = left > 1 and pos <= self.max_context - self.prefill_len
            width = self.prefill_len if use_prefill else 1
            count = min(width, left)
            rows.append(self._step("prefill" if use_prefill else "decode", tokens[i : i + count], pos, width))
            pos, i = pos + count, i + count
        return np.concatenate(rows, axis=0)

    def _first_position(self, token: int) -> np.ndarray:
        assert self.first is not None
        self.first.reset()
        logits = self.first.forward(np.array([token]), 0)
        for layer in range(self.num_layers):
            self.keys[layer][:, :, :1] = self.first.cache[f"past_key_{layer}"][:, :, :1]
            self.values[layer][:, :, :1] = self.first.cache[f"past_value_{layer}"][:, :, :1]
        return logits

    def _step(self, graph: str, chunk: np.ndarray, pos: int, width: int) -> np.ndarray:
        count, past = chunk.size, self.max_context - width
        ids = np.zeros((1, width), np.int32)
        ids[0, :count] = chunk
        angles = (np.arange(width, dtype=np.float32) + pos)[:, None] * self.inv_freq[None, :]
        angles = np.concatenate([angles, angles], axis=-1)
        mask = np.full((width, self.max_context), NPU_MASK_VALUE, np.float32)
        mask[:, :pos] = 0.0  # cached positions (slots >= pos of the past window are empty)
        mask[:, past:] = np.where(np.tril(np.ones((width, width), bool)), 0.0, NPU_MASK_VALUE)
        feeds: dict[str, np.ndarray] = {"input_ids": ids, "cos": np.cos(angles), "sin": np.sin(angles),
                                        "attention_mask": mask}
        for layer in range(self.num_layers):
            feeds[f"past_key_{layer}"] = self.keys[layer][:, :, :past]
            feeds[f"past_value_{layer}"] = self.values[layer][:, :, :past]
        if self.record:
            self.record(graph, feeds)
        outs = self._run(graph, feeds)
        for layer in range(self.num_layers):
            self.keys[layer][:, :, pos : pos + count] = outs[1 + 2 * layer][:, :, :count]
            self.values[layer][:, :, pos : pos + count] = outs[2 + 2 * layer][:, :, :count]
        return outs[0][0, :count].astype(np.float32)


def register_qnn() -> list[Any]:
    """Register onnxruntime-qnn's plugin EP (once) and return its devices (naming it in `providers` does
    nothing: it silently runs on CPU)."""
    import onnxruntime as ort

    try:
        import onnxruntime_qnn as oq
    except ImportError:
        raise EdgepackError("onnxruntime-qnn is not installed", "pip install onnxruntime-qnn==2.7.0") from None
    if not any(d.ep_name == oq.get_ep_name() for d in ort.get_ep_devices()):
        ort.register_execution_provider_library(oq.get_ep_name(), oq.get_library_path())
    return [d for d in ort.get_ep_devices() if d.ep_name == oq.get_ep_name()]


def qnn_session(model: Path, ep_options: dict[str, str], extra_config: dict[str, str] | None = None) -> Any:
    """A session with every node on the QNN EP: CPU fallback disabled, so a node HTP cannot run fails loudly."""
    import onnxruntime as ort

    devices = register_qnn()
    so = session_options()
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    for key, value in (extra_config or {}).items():
        so.add_session_config_entry(key, value)
    so.add_provider_for_devices(devices, {k: str(v) for k, v in ep_options.items()})
    return ort.InferenceSession(str(model), so)


def open_npu(bundle_dir: Path, manifest: dict[str, Any]) -> StaticGraphDecoder:
    npu, cfg = manifest["backend"]["npu"], manifest["model"]["config"]
    from edgepack.bundle import bundle_file

    sessions = {g: qnn_session(bundle_file(bundle_dir, manifest, npu[f"{g}_program"]), npu["ep_options"])
                for g in ("prefill", "decode")}
    first = open_cpu(bundle_dir, manifest) if npu.get("first_position") == "cpu" else None
    return StaticGraphDecoder(
        lambda graph, feeds: sessions[graph].run(None, feeds), cfg["num_layers"], cfg["num_kv_heads"],
        cfg["head_dim"], int(npu["context"]), int(npu["prefill_len"]), cfg["vocab_size"], np.array(npu["inv_freq"]),
        first=first,
    )


def open_cpu(bundle_dir: Path, manifest: dict[str, Any]) -> OrtCpuDecoder:
    from edgepack.bundle import bundle_file

    backend, cfg = manifest["backend"], manifest["model"]["config"]
    return OrtCpuDecoder(
        bundle_file(bundle_dir, manifest, backend["cpu"]["program"]), cfg["num_layers"], cfg["num_kv_heads"], cfg["head_dim"],
        int(manifest["context_length"]), cfg["vocab_size"], int(backend.get("max_prefill") or 128),
    )


def _require_onnx_bundle(manifest: dict[str, Any]) -> None:
    if manifest["backend"]["name"] != "onnx":
        raise EdgepackError(
            f"this bundle was built for {manifest['backend']['name']!r}, not ONNX Runtime",
            "run it with its own backend (leave --backend out)",
        )


def npu_is_simulated() -> bool:
    """onnxruntime-qnn on an x86 host runs Qualcomm's HTP simulator (~20 s a token for a 135M model): right
    for proving a build (`--backend onnx/qnn`), wrong as the default for `run`, `profile` or `verify`."""
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


@register_backend("onnx")
def open_onnx(bundle_dir: Path, manifest: dict[str, Any]) -> Any:
    """The bundle's own choice: the NPU models on a Snapdragon (QNN EP), else the CPU model, which is also
    what an x86 host gets (there the NPU is only simulated: ask for it with --backend onnx/qnn)."""
    _require_onnx_bundle(manifest)
    if "npu" in manifest["backend"] and not npu_is_simulated():
        return open_npu(bundle_dir, manifest)
    return open_cpu(bundle_dir, manifest)


@register_backend("onnx/cpu")
def open_onnx_cpu(bundle_dir: Path, manifest: dict[str, Any]) -> OrtCpuDecoder:
    _require_onnx_bundle(manifest)
    return open_cpu(bundle_dir, manifest)


@register_backend("onnx/qnn")
def open_onnx_qnn(bundle_dir: Path, manifest: dict[str, Any]) -> StaticGraphDecoder:
    _require_onnx_bundle(manifest)
    if "npu" not in manifest["backend"]:
        raise EdgepackError("this bundle has no NPU models", "export it for a Snapdragon target (--backend onnx/qnn)")
    return open_npu(bundle_dir, manifest)
