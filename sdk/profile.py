"""`edgepack profile`: measure a bundle through its real backend, project it onto a target, check budgets.

Measured (on this host, or on a device with `--device`): load time, time to first token, prefill and decode
tok/s for each prompt length (median and min-max over `--runs` fresh processes), peak memory. Projected
(for a target other than `host`): the same figures through the roofline model of `profile_roofline.py`.
Each budget of the target is one pass/fail line; any failure makes the command exit 1.

Decode is timed exactly as `benchmarks/bench.py` times it, so the two agree: an untimed warm-up (prefill +
4 decode steps), then a timed prefill and `new_tokens - 1` greedy one-token steps, EOS ignored, with
EDGEPACK_THREADS threads; each run is a fresh interpreter whose peak RSS (VmHWM) is its own.

Report (report.json), schema "edgepack-profile/1":
    schema, created, device ("host" | "adb:SERIAL" | "qai-hub:NAME"), target
    bundle      {path, model, quantization, backend, delegate, size_mb, context_length, built_for}
    host        {cpu, cores, threads, calibration {memory_bandwidth_gbs, fp32_gflops, ... (peak and median)}}
    workload    {prompt_lengths, new_tokens, runs, warmup_decode_steps}
    measured    {kind: "measured", load_s: STAT, by_prompt_length {"128": {ttft_ms, prefill_tok_s,
                 decode_tok_s: STAT}}, peak_memory {peak_rss_mb, baseline_rss_mb, model_mb: STAT,
                 at_max_context_mb}}            STAT = {median, min, max, runs: [...]}
    projected   null for host, else {kind: "projected", method, target_memory_bandwidth_gbs,
                 target_compute_gflops, by_prompt_length {"128": {decode_tok_s, decode_bound_tok_s,
                 prefill_tok_s, ttft_ms, host_*_efficiency, ...}}, peak_memory_mb}
    fit         edgepack.fit's estimate for the bundle on the target
    budgets     [{name, budget, value, unit, kind ("measured" | "projected"), passed, note}]
    passed      all budgets passed;  chart: the PNG's file name
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgepack.errors import EdgepackError, UsageError

SCHEMA = "edgepack-profile/1"
WARMUP_DECODE_STEPS = 4  # as benchmarks/bench.py
# Real English for the prompts; repeated as needed and cut to the exact prompt length in tokens.
PASSAGE = (
    "Rivers shape the land they cross. Over thousands of years a river cuts a valley, drops sand and silt "
    "where it slows down, and builds wide plains that farmers have used since the first villages. Floods "
    "bring fresh soil but also destroy houses, so people have built dams, canals and levees to control the "
    "water. Those works changed how much sediment reaches the sea, and many deltas are now shrinking. "
    "Engineers today try to balance the needs of cities, farms, fish and boats, and they measure the flow "
    "of water every hour to plan for dry summers and wet winters alike. "
)


# --- one measured run, in a fresh interpreter --------------------------------------------------------------


def _status_mb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    if key == "VmHWM":  # macOS: ru_maxrss is in bytes (the child is a fresh exec, see notes on Linux)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return None


def _prompt(session: Any, length: int) -> list[int]:
    """Exactly `length` ids of a chat-rendered English prompt."""
    repeats = 1
    while True:
        _, ids = session.prompt_ids(PASSAGE * repeats)
        if len(ids) >= length:
            return ids[:length]
        repeats *= 2


def measure_once(bundle: str, prompt_lengths: list[int], new_tokens: int, threads: int) -> dict[str, Any]:
    """Load the bundle and time every prompt length once (call in a fresh process: peak RSS is per process)."""
    import numpy as np

    os.environ["EDGEPACK_THREADS"] = str(threads)
    import edgepack.runtime
    from edgepack.bundle import read_manifest

    backend = read_manifest(bundle, check_files=False)["backend"]["name"]
    if backend == "executorch":  # import the runtime first, so the baseline holds it and not the bundle
        from edgepack.runtime.executorch_backend import load_executorch_runtime

        load_executorch_runtime()
    baseline = _status_mb("VmRSS")
    start = time.perf_counter()
    session = edgepack.runtime.load(bundle)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    load_s = time.perf_counter() - start
    loaded = _status_mb("VmRSS")
    prefill, step = session.prefill, session.decode_step

    results: dict[str, Any] = {}
    for length in prompt_lengths:
        ids = _prompt(session, length)
        logits = prefill(ids)  # warm-up, untimed
        for pos in range(length, length + WARMUP_DECODE_STEPS):
            logits = step(int(np.argmax(logits)), pos)
        t0 = time.perf_counter()
        logits = prefill(ids)
        t1 = time.perf_counter()
        tokens = [int(np.argmax(logits))]
        first = time.perf_counter()
        for pos in range(length, length + new_tokens - 1):
            tokens.append(int(np.argmax(step(tokens[-1], pos))))
        t2 = time.perf_counter()
        results[str(length)] = {
            "ttft_ms": 1000 * (first - t0),
            "prefill_tok_s": length / (t1 - t0),
            "decode_tok_s": (new_tokens - 1) / (t2 - t1),
        }
    peak = _status_mb("VmHWM")
    return {
        "load_s": load_s,
        "by_prompt_length": results,
        "peak_rss_mb": peak,
        "baseline_rss_mb": baseline,
        "loaded_rss_mb": loaded,
        "model_mb": (peak - baseline) if peak is not None and baseline is not None else None,
    }


def _child_main() -> None:
    job = json.loads(sys.stdin.read())
    if job["kind"] == "calibrate":
        from edgepack.profile_roofline import calibrate

        result = calibrate(job["threads"])
    else:
        result = measure_once(job["bundle"], job["prompt_lengths"], job["new_tokens"], job["threads"])
    print(json.dumps(result))


def _spawn(job: dict[str, Any]) -> dict[str, Any]:
    threads = str(job["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads, "EDGEPACK_THREADS": threads}
    code = "from edgepack.profile import _child_main; _child_main()"
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(job), capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise EdgepackError(f"the profiling process failed (exit {proc.returncode}): {tail}",
                            "run `edgepack run BUNDLE hello` to check the bundle loads")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def stat(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and spread of every figure over the runs (any source with the measure_once shape)."""
    lengths = list(runs[0]["by_prompt_length"])
    memory = {k: stat([r[k] for r in runs]) for k in ("peak_rss_mb", "baseline_rss_mb", "model_mb")
              if all(r.get(k) is not None for r in runs)}
    return {
        "kind": "measured",
        "load_s": stat([r["load_s"] for r in runs]) if all(r.get("load_s") is not None for r in runs) else None,
        "by_prompt_length": {
            n: {k: stat([r["by_prompt_length"][n][k] for r in runs]) for k in runs[0]["by_prompt_length"][n]}
            for n in lengths
        },
        "peak_memory": memory,
    }


# --- the whole profile ---------------------------------------------------------------------------------------


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--prompt-lengths {text!r} is not a list of numbers", "write e.g. 128,512") from None
    if not lengths or min(lengths) < 1:
        raise UsageError(f"--prompt-lengths {text!r} needs positive numbers", "write e.g. 128,512")
    return sorted(set(lengths))


def profile_bundle(
    bundle: str | Path,
    target_name: str | None = None,
    prompt_lengths: list[int] | None = None,
    runs: int = 3,
    new_tokens: int = 128,
    threads: int | None = None,
    device: str | None = None,
    runner: str | None = None,
    log: Any = lambda _msg: None,
) -> dict[str, Any]:
    """Everything the report holds; cheap checks first (bundle, target, lengths vs context, device tools)."""
    from edgepack.bundle import read_manifest
    from edgepack.fit import check_fit, RUNTIME_OVERHEAD, DEFAULT_OVERHEAD, kv_cache_bytes
    from edgepack.model import ModelConfig
    from edgepack.presets import QuantPreset
    from edgepack.profile_roofline import host_threads, project
    from edgepack.targets import get_target

    path = Path(bundle)
    manifest = read_manifest(path)
    target = get_target(target_name or manifest["target"])
    lengths = prompt_lengths or [128, 512]
    context = int(manifest["context_length"])
    longest = max(lengths) + new_tokens + WARMUP_DECODE_STEPS
    if longest > context:
        raise UsageError(
            f"prompt length {max(lengths)} + {new_tokens} new tokens do not fit the bundle's context of {context}",
            "use shorter --prompt-lengths or fewer --new-tokens",
        )
    if runs < 1 or new_tokens < 2:
        raise UsageError("--runs must be >= 1 and --new-tokens >= 2", "e.g. --runs 3 --new-tokens 128")
    threads = threads or host_threads()
    cfg = ModelConfig(**manifest["model"]["config"])
    preset = QuantPreset(**{k: v for k, v in manifest["quantization"].items() if k in QuantPreset.__dataclass_fields__})
    backend = manifest["backend"]
    files_mb = sum(f["size"] for f in manifest["files"].values()) / 1e6

    if device and device != "host":
        from edgepack.profile_device import profile_on_device

        measured = profile_on_device(device, path, manifest, lengths, runs, new_tokens, threads, runner, log)
        calibration = None
    else:
        log(f"calibrating this host ({threads} threads): memory bandwidth and matmul throughput")
        calibration = _spawn({"kind": "calibrate", "threads": threads})
        raw = []
        for i in range(runs):
            result = _spawn({"kind": "run", "bundle": str(path.resolve()), "prompt_lengths": lengths,
                             "new_tokens": new_tokens, "threads": threads})
            first = result["by_prompt_length"][str(lengths[0])]
            log(f"run {i + 1}/{runs}: load {result['load_s']:.2f} s, {lengths[0]}-token prompt: first token "
                f"{first['ttft_ms']:.0f} ms, prefill {first['prefill_tok_s']:.0f} tok/s, decode "
                f"{first['decode_tok_s']:.1f} tok/s; peak RSS {result['peak_rss_mb']:.0f} MB")
            raw.append(result)
        measured = summarize_runs(raw)
        mem = measured["peak_memory"]
        if "model_mb" in mem:
            # A KV cache the runtime initialises at load (ExecuTorch copies its buffers' initial state, torch
            # fills zeros) is already resident; otherwise add the positions the runs never reached.
            kv_mb = kv_cache_bytes(cfg, preset, context) / 1e6
            loaded_mb = statistics.median([r["loaded_rss_mb"] - r["baseline_rss_mb"] for r in raw])
            used = min(max(lengths) + new_tokens + WARMUP_DECODE_STEPS, context)
            untouched = 0.0 if loaded_mb >= kv_mb else kv_mb - kv_cache_bytes(cfg, preset, used) / 1e6
            mem["at_max_context_mb"] = mem["peak_rss_mb"]["median"] + untouched
            mem["at_max_context_note"] = (
                "measured peak; the KV cache was resident after load" if not untouched else
                f"measured peak + {untouched:.0f} MB of KV cache for positions not reached (estimate)")

    overhead_mb = RUNTIME_OVERHEAD.get(backend["name"], DEFAULT_OVERHEAD) / 1e6
    on_host = target.hardware.get("measured") or (device and device != "host")
    projected = None
    if not on_host and calibration is not None:
        projected = project(measured, calibration, target, cfg, preset, backend.get("delegate"), overhead_mb)
    fit = check_fit(cfg, preset, target, context, "/".join(filter(None, (backend["name"], backend.get("delegate")))),
                    propose=False)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device or "host",
        "target": target.name,
        "bundle": {
            "path": str(path),
            "model": manifest["model"]["name"],
            "quantization": manifest["quantization"]["name"],
            "backend": backend["name"],
            "delegate": backend.get("delegate"),
            "size_mb": round(files_mb, 2),
            "context_length": context,
            "built_for": manifest["target"],
        },
        "host": {**host_facts(threads), "calibration": calibration},
        "workload": {"prompt_lengths": lengths, "new_tokens": new_tokens, "runs": runs,
                     "warmup_decode_steps": WARMUP_DECODE_STEPS},
        "measured": measured,
        "projected": projected,
        "fit": fit.to_dict(),
    }
    report["budgets"] = check_budgets(report, target)
    report["passed"] = all(b["passed"] is not False for b in report["budgets"])
    return report


def check_budgets(report: dict[str, Any], target: Any) -> list[dict[str, Any]]:
    """One line per budget: the figure it is compared with, measured where the bundle ran on the target
    itself, projected otherwise; a figure that could not be had is `passed: None` (reported, not failed)."""
    budgets = target.budgets
    source = report["projected"] or report["measured"]
    kind = source["kind"]
    first = str(min(int(n) for n in report["measured"]["by_prompt_length"]))
    lines: list[dict[str, Any]] = []

    def line(name: str, value: float | None, unit: str, at_most: bool, kind: str, note: str = "") -> None:
        limit = budgets.get(name)
        if limit is None:
            return
        passed = None if value is None else (value <= limit if at_most else value >= limit)
        lines.append({"name": name, "budget": limit, "value": value, "unit": unit, "kind": kind,
                      "passed": passed, "note": note})

    line("bundle_mb", report["bundle"]["size_mb"], "MB", True, "measured", "sum of the bundle's files")
    mem = report["measured"]["peak_memory"]
    if report["projected"]:
        line("peak_memory_mb", report["projected"]["peak_memory_mb"]
             + (mem.get("at_max_context_mb", 0) - mem["peak_rss_mb"]["median"] if "peak_rss_mb" in mem else 0),
             "MB", True, "projected", "at the max context: " + report["projected"]["peak_memory_note"])
    else:
        value = mem.get("at_max_context_mb") or (mem["peak_rss_mb"]["median"] if "peak_rss_mb" in mem else None)
        line("peak_memory_mb", value, "MB", True, "measured",
             "peak RSS of the whole process (interpreter included) + KV cache of unreached positions")
    row = source["by_prompt_length"].get("128") or {}
    ttft = row.get("ttft_ms")
    line("ttft_ms_128", _median(ttft), "ms", True, kind,
         "" if "128" in source["by_prompt_length"] else "not measured: add 128 to --prompt-lengths")
    decode = (source["by_prompt_length"].get(first) or {}).get("decode_tok_s")
    line("decode_tok_s_min", _median(decode), "tok/s", False, kind, f"after a {first}-token prompt")
    return lines


def _median(value: Any) -> float | None:
    if value is None:
        return None
    return float(value["median"]) if isinstance(value, dict) else float(value)


def host_facts(threads: int) -> dict[str, Any]:
    """CPU model, core count and the threads used (what a figure measured on this host needs beside it)."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads}


def write_report(report: dict[str, Any], out_dir: str | Path) -> Path:
    """report.json and chart.png into `out_dir` (created); returns the report's path."""
    from edgepack.profile_chart import draw

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chart = out / "chart.png"
    draw(report, chart)
    report["chart"] = chart.name
    path = out / "report.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def budget_lines(report: dict[str, Any]) -> list[str]:
    out = []
    for b in report["budgets"]:
        mark = {True: "PASS", False: "FAIL", None: "n/a "}[b["passed"]]
        value = "missing" if b["value"] is None else f"{b['value']:.1f}"
        op = ">=" if b["name"] == "decode_tok_s_min" else "<="
        out.append(f"{mark} {b['name']:17} {value:>9} {b['unit']:5} {op} {b['budget']} ({b['kind']}) {b['note']}")
    return out
