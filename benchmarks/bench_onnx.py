"""Benchmark an ONNX Runtime CPU bundle against onnxruntime-genai's own int4 build of the same model and
against llama.cpp, in one run (same prompt ids, greedy decode, each measurement in a fresh process).

    python benchmarks/bench_onnx.py BUNDLE [--genai-dir DIR] [--threads 2] [--rounds 3] [--new-tokens 128]

The genai model is built once (cached in --genai-dir) by onnxruntime-genai's builder (`-p int4 -e cpu`,
its defaults) from a Hugging Face folder written from the same GGUF the bundle came from. Needs
`pip install -e ".[bench]"` (llama-cpp-python, onnxruntime-genai). Measurement, prompt and report helpers
are benchmarks/bench.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (benchmarks/bench.py: run_edgepack, run_llama_cpp, _timed_run, build_prompt, ...)

ENGINES = ("edgepack", "genai", "llama.cpp")


def run_genai(model_dir: str, ids: list[int], new_tokens: int, threads: int) -> dict[str, Any]:
    """onnxruntime-genai's generator: append the prompt ids (prefill), then one token per step."""
    start = time.perf_counter()
    import onnxruntime_genai as og

    config = og.Config(model_dir)
    model = og.Model(config)
    load_s = time.perf_counter() - start
    state: dict[str, Any] = {}

    def prefill() -> np.ndarray:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + new_tokens + 16, do_sample=False)
        state["gen"] = og.Generator(model, params)
        state["gen"].append_tokens(np.asarray(ids, np.int32))
        return state["gen"].get_logits()[0, -1]

    def step(token: int, pos: int) -> np.ndarray:
        state["gen"].append_tokens(np.asarray([token], np.int32))
        return state["gen"].get_logits()[0, -1]

    return bench._timed_run(prefill, step, ids, new_tokens, load_s)


def build_genai(gguf: Path, out: Path, threads: int) -> Path:
    """GGUF -> HF folder (transformers) -> onnxruntime-genai builder int4 CPU; cached in `out`."""
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


def spawn(engine: str, job: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", engine, "--job", json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(job["threads"])})
    if proc.returncode != 0:
        raise SystemExit(f"{engine} child failed (exit {proc.returncode}):\n" + "\n".join(proc.stderr.splitlines()[-15:]))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", nargs="?", type=Path)
    p.add_argument("--gguf", type=Path)
    p.add_argument("--genai-dir", type=Path, default=Path("/tmp/edgepack-genai-int4"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--out", type=Path)
    p.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        job = json.loads(args.job)
        run = {"edgepack": lambda: bench.run_edgepack(job["bundle"], job["ids"], job["new_tokens"], job["threads"]),
               "genai": lambda: run_genai(job["genai"], job["ids"], job["new_tokens"], job["threads"]),
               "llama.cpp": lambda: bench.run_llama_cpp(job["gguf"], job["ids"], job["new_tokens"], job["threads"])}
        print(json.dumps(run[args.child]()))
        return 0
    if args.bundle is None:
        p.error("BUNDLE is required")
    bundle = args.bundle.resolve()
    gguf = (args.gguf or bench.default_gguf()).resolve()
    genai = build_genai(gguf, args.genai_dir.resolve(), args.threads)
    _, ids = bench.build_prompt(bundle, args.prompt_tokens)
    job = {"bundle": str(bundle), "gguf": str(gguf), "genai": str(genai), "ids": ids,
           "new_tokens": args.new_tokens, "threads": args.threads}
    runs: dict[str, list[dict[str, Any]]] = {e: [] for e in ENGINES}
    for r in range(args.rounds):
        for engine in ENGINES:  # alternate engines: the machine is shared and noisy
            result = spawn(engine, job)
            runs[engine].append(result)
            print(f"round {r + 1} {engine:9}: prefill {result['prefill_tok_s']:7.1f} tok/s, decode "
                  f"{result['decode_tok_s']:6.1f} tok/s, RSS {result['peak_rss_mb']:6.1f} MB, "
                  f"others {result['others_cores']:.2f} cores", file=sys.stderr)
    med = {e: {k: statistics.median(r[k] for r in runs[e]) for k in ("prefill_tok_s", "decode_tok_s", "peak_rss_mb")}
           for e in ENGINES}
    report = {
        "host": bench.host_facts(args.threads),
        "bundle": bench.bundle_facts(bundle),
        "workload": {"prompt_tokens": len(ids), "new_tokens": args.new_tokens, "rounds": args.rounds},
        "median": med,
        "ratio_vs_genai": {k: med["edgepack"][k] / med["genai"][k] for k in ("prefill_tok_s", "decode_tok_s")},
        "ratio_vs_llama_cpp": {k: med["edgepack"][k] / med["llama.cpp"][k] for k in ("prefill_tok_s", "decode_tok_s")},
        "greedy_common_prefix": {e: bench.common_prefix(runs["edgepack"][0]["tokens"], runs[e][0]["tokens"])
                                 for e in ("genai", "llama.cpp")},
        "runs": runs,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    for e in ENGINES:
        print(f"{e:9}  prefill {med[e]['prefill_tok_s']:7.1f} tok/s  decode {med[e]['decode_tok_s']:6.1f} tok/s  "
              f"peak RSS {med[e]['peak_rss_mb']:6.1f} MB")
    print("edgepack / genai:", {k: round(v, 2) for k, v in report["ratio_vs_genai"].items()})
    print("edgepack / llama.cpp:", {k: round(v, 2) for k, v in report["ratio_vs_llama_cpp"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
