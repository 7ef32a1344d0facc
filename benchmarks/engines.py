"""The engines `bench.py` compares, each driven the same way in its own child process: `prefill(ids)` starts a
fresh sequence and returns the last position's logits, `step(token, pos)` appends one token and returns its
logits. `measure` times them identically for every engine.

- edgepack: a bundle through `edgepack.runtime` (its own backend: ExecuTorch, ONNX Runtime, LiteRT ...);
- llama.cpp: the GGUF through llama-cpp-python (the anchor);
- genai: onnxruntime-genai's own int4 CPU build of the same GGUF (`build_genai` makes it once).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

WARMUP_DECODE_STEPS = 4


class Engine(Protocol):
    def prefill(self, ids: list[int]) -> np.ndarray: ...
    def step(self, token: int, pos: int) -> np.ndarray: ...


class EdgepackEngine:
    @staticmethod
    def import_runtime(bundle: str) -> None:
        """What the bundle's backend imports before it loads a model (for ExecuTorch: torch and its bindings)."""
        from edgepack.bundle import read_manifest

        backend = read_manifest(Path(bundle), check_files=False)["backend"]["name"]
        if backend == "executorch":
            from edgepack.runtime.executorch_backend import load_executorch_runtime

            load_executorch_runtime()
        importlib.import_module({"onnx": "onnxruntime", "litert": "ai_edge_litert"}.get(backend, "edgepack.runtime"))

    def __init__(self, bundle: str, threads: int, max_context: int) -> None:
        os.environ["EDGEPACK_THREADS"] = str(threads)  # ExecuTorch's threadpool size, read when the program loads
        import edgepack.runtime

        self.session = edgepack.runtime.load(bundle)
        if "torch" in sys.modules:  # the reference backend runs on torch's own pool
            sys.modules["torch"].set_num_threads(threads)

    def prefill(self, ids: list[int]) -> np.ndarray:
        return self.session.prefill(ids)

    def step(self, token: int, pos: int) -> np.ndarray:
        return self.session.decode_step(token, pos)


class LlamaCppEngine:
    @staticmethod
    def import_runtime(path: str) -> None:
        importlib.import_module("llama_cpp")

    def __init__(self, gguf: str, threads: int, max_context: int) -> None:
        import llama_cpp

        self._lib = llama_cpp
        # The same context as the bundles' KV cache, so its memory holds the same number of positions.
        self.llm = llama_cpp.Llama(model_path=gguf, n_ctx=max_context, n_threads=threads, n_threads_batch=threads,
                                   n_batch=512, logits_all=False, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def _last_logits(self) -> np.ndarray:
        # Llama.scores stays empty without logits_all=True (0.3.36); read the context's last row instead.
        ptr = self._lib.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return self._last_logits()

    def step(self, token: int, pos: int) -> np.ndarray:
        self.llm.eval([token])
        return self._last_logits()


class GenaiEngine:
    @staticmethod
    def import_runtime(path: str) -> None:
        importlib.import_module("onnxruntime_genai")

    def __init__(self, model_dir: str, threads: int, max_context: int) -> None:
        import onnxruntime_genai as og

        self._og = og
        self.model = og.Model(og.Config(model_dir))  # its thread count is in genai_config.json (build_genai)
        self.max_context = max_context
        self.generator: Any = None

    def prefill(self, ids: list[int]) -> np.ndarray:
        params = self._og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_context, do_sample=False)
        self.generator = self._og.Generator(self.model, params)
        self.generator.append_tokens(np.asarray(ids, np.int32))
        return self.generator.get_logits()[0, -1]

    def step(self, token: int, pos: int) -> np.ndarray:
        self.generator.append_tokens(np.asarray([token], np.int32))
        return self.generator.get_logits()[0, -1]


ENGINES: dict[str, Any] = {  # kind -> class: import_runtime(path), then (path, threads, max_context) -> Engine
    "edgepack": EdgepackEngine,
    "llama.cpp": LlamaCppEngine,
    "genai": GenaiEngine,
}


def measure(kind: str, job: dict[str, Any]) -> dict[str, Any]:
    """One engine, cold start to the last position: time to first token from the process's spawn (imports,
    load, prefill of the chat prompt), warm prefill and greedy decode after the chat prompt, then prefill and
    decode at each context position of `job["positions"]` (a fresh sequence of real text each)."""
    threads, chat, new_tokens = job["threads"], job["chat_ids"], job["new_tokens"]
    started = time.perf_counter()
    ENGINES[kind].import_runtime(job["path"])
    runtime_rss = _vm_rss_mb()
    engine: Engine = ENGINES[kind](job["path"], threads, job["max_context"])
    load_s = time.perf_counter() - started
    logits = engine.prefill(chat)
    ttft_s = time.time() - job["spawned"]
    for pos in range(len(chat), len(chat) + WARMUP_DECODE_STEPS):  # first-call setup, page faults
        logits = engine.step(int(np.argmax(logits)), pos)

    cpu0 = _cpu_snapshot()
    t0 = time.perf_counter()
    logits = engine.prefill(chat)
    t1 = time.perf_counter()
    tokens = [int(np.argmax(logits))]
    for pos in range(len(chat), len(chat) + new_tokens - 1):  # the first new token came from prefill
        tokens.append(int(np.argmax(engine.step(tokens[-1], pos))))
    t2 = time.perf_counter()
    result: dict[str, Any] = {
        "load_s": load_s,
        "ttft_s": ttft_s,
        "prefill_tok_s": len(chat) / (t1 - t0),
        "decode_tok_s": (new_tokens - 1) / (t2 - t1),
        "peak_rss_mb": _vm_hwm_mb(),  # a chat turn, as `edgepack run` does
        "runtime_rss_mb": runtime_rss,  # Python and the engine's libraries, before any model is loaded
        "tokens": tokens,
        "at": {},
    }
    for position in job["positions"]:
        ids = job["long_ids"][: max(position, 1)]
        t0 = time.perf_counter()
        logits = engine.prefill(ids)
        t1 = time.perf_counter()
        token = int(np.argmax(logits))
        steps = job["decode_tokens"]
        for pos in range(len(ids), len(ids) + steps):
            token = int(np.argmax(engine.step(token, pos)))
        t2 = time.perf_counter()
        result["at"][str(position)] = {"prefill_tok_s": len(ids) / (t1 - t0), "decode_tok_s": steps / (t2 - t1)}
    cpu1 = _cpu_snapshot()
    result["peak_rss_long_mb"] = _vm_hwm_mb()
    result["others_cores"] = ((cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1])) / (cpu1[2] - cpu0[2])
    return result


def _cpu_snapshot() -> tuple[float, float, float]:
    """CPU seconds used so far by the whole machine and by this process, and when: the difference of their
    deltas is what other processes took while we were timed (a shared 2-core VM is rarely idle)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    machine = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    own = os.times()
    return machine, own.user + own.system, time.perf_counter()


def _vm_hwm_mb() -> float | None:
    """Peak resident set of this process (ru_maxrss would carry the parent's peak over across exec)."""
    return _status_mb("VmHWM:")


def _vm_rss_mb() -> float | None:
    return _status_mb("VmRSS:")


def _status_mb(key: str) -> float | None:
    # Not edgepack.profile's twin: the anchors' children (llama.cpp, genai) must not import edgepack, whose modules
    # would count in their "runtime alone" figure.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return None


def build_genai(gguf: Path, out: Path, threads: int) -> Path:
    """GGUF -> Hugging Face folder (transformers) -> onnxruntime-genai's builder, int4 CPU with its own
    defaults; cached in `out` (a few minutes the first time)."""
    if (out / "genai_config.json").is_file():
        return out
    import torch
    import transformers

    hf_dir = out.parent / (out.name + "-hf")
    if not (hf_dir / "config.json").is_file():
        loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        clean = transformers.AutoModelForCausalLM.from_config(loaded.config)  # GGUF-loaded models refuse to save
        clean.load_state_dict(loaded.state_dict())
        clean.save_pretrained(hf_dir)
        transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(hf_dir)
    config_file = hf_dir / "config.json"  # the GGUF loader leaves quantization_config "gguf", which genai refuses
    config_file.write_text(json.dumps({k: v for k, v in json.loads(config_file.read_text()).items()
                                       if k != "quantization_config"}, indent=2))
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
           "-p", "int4", "-e", "cpu", "-c", str(out.parent / (out.name + "-cache"))]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    config = json.loads((out / "genai_config.json").read_text())
    config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    (out / "genai_config.json").write_text(json.dumps(config, indent=2))
    return out
