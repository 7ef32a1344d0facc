"""Profiling on real hardware: `--device adb:SERIAL` (ExecuTorch's llama runner on an Android phone) and
`--device qai-hub:NAME` (a Qualcomm AI Hub profile job). Both return the shape `profile.summarize_runs`
gives for the host, so the report, budgets and chart are the same.

adb: the bundle's .pte and tokenizer.json and ExecuTorch's `llama_main` (cross-compiled for arm64-v8a, see
ExecuTorch's examples/models/llama README; `--runner PATH`) are pushed to /data/local/tmp/edgepack/<bundle>,
then one `llama_main` per run and prompt length; its "PyTorchObserver {json}" line (written by
extension/llm/runner/stats.h) gives the timings, its "RSS after ...: N MiB" lines the memory.
qai-hub: the bundle's program is submitted with `qai_hub.submit_profile_job`; `download_profile()`'s
execution_summary (microseconds, bytes) gives time per forward call and peak memory.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable

from edgepack.errors import EdgepackError, UsageError

DEVICE_DIR = "/data/local/tmp/edgepack"
_OBSERVER = re.compile(r"PyTorchObserver\s+(\{.*\})")
_RSS = re.compile(r"RSS after [^:]*:\s*([0-9.]+)\s*MiB")


def parse_device(spec: str) -> tuple[str, str]:
    kind, _, name = spec.partition(":")
    if kind not in ("adb", "qai-hub") or not name:
        raise UsageError(f"--device {spec!r} is not understood", "use host, adb:SERIAL or qai-hub:DEVICE_NAME")
    return kind, name


def profile_on_device(
    spec: str, bundle: Path, manifest: dict[str, Any], lengths: list[int], runs: int, new_tokens: int,
    threads: int, runner: str | None, log: Callable[[str], None],
) -> dict[str, Any]:
    from edgepack.profile import summarize_runs

    kind, name = parse_device(spec)
    if kind == "adb":
        raw = run_adb(name, bundle, manifest, lengths, runs, new_tokens, threads, runner, log)
    else:
        raw = run_qai_hub(name, bundle, manifest, lengths, runs, log)
    return summarize_runs(raw)


# --- adb + ExecuTorch llama runner -------------------------------------------------------------------------


def parse_llama_runner(output: str) -> dict[str, Any]:
    """Figures of one `llama_main` run from its stdout/stderr (the PyTorchObserver line is required)."""
    found = _OBSERVER.findall(output)
    if not found:
        raise EdgepackError("the ExecuTorch runner printed no PyTorchObserver statistics line",
                            "check that llama_main ran to the end (its output is in the error log above)")
    s = json.loads(found[-1])
    unit = float(s.get("SCALING_FACTOR_UNITS_PER_SECOND", 1000))
    prompt, generated = int(s["prompt_tokens"]), int(s["generated_tokens"])
    prefill_s = (s["prompt_eval_end_ms"] - s["inference_start_ms"]) / unit
    decode_s = (s["inference_end_ms"] - s["prompt_eval_end_ms"]) / unit
    load_s = (s["model_load_end_ms"] - s["model_load_start_ms"]) / unit
    rss = [float(x) * 1.048576 for x in _RSS.findall(output)]  # MiB -> MB
    return {
        "prompt_tokens": prompt,
        "generated_tokens": generated,
        "load_s": load_s if s.get("model_load_start_ms") else None,  # 0 when the runner was preloaded
        "ttft_ms": 1000 * (s["first_token_ms"] - s["inference_start_ms"]) / unit,
        "prefill_tok_s": prompt / prefill_s if prefill_s > 0 else None,
        # stats.h's "Generated N tokens" rate: tokens after the first over the time after prompt evaluation
        "decode_tok_s": generated / decode_s if decode_s > 0 else None,
        "peak_rss_mb": max(rss) if rss else None,
    }


def llama_runner_command(serial: str, folder: str, prompt: str, seq_len: int, threads: int) -> list[str]:
    """The adb command that runs ExecuTorch's llama runner on the pushed bundle (greedy, with warm-up)."""
    remote = (
        f"cd {shlex.quote(folder)} && ./llama_main --model_path model.pte --tokenizer_path tokenizer.json "
        f"--prompt {shlex.quote(prompt)} --seq_len {seq_len} --temperature 0 --warmup --cpu_threads {threads}"
    )
    return ["adb", "-s", serial, "shell", remote]


def push_commands(serial: str, bundle: Path, manifest: dict[str, Any], runner: Path) -> tuple[str, list[list[str]]]:
    folder = f"{DEVICE_DIR}/{bundle.resolve().name}"
    from edgepack.bundle import bundle_file

    program = bundle_file(bundle, manifest, manifest["backend"]["program"])
    cmds = [["adb", "-s", serial, "shell", f"mkdir -p {shlex.quote(folder)}"],
            ["adb", "-s", serial, "push", str(program), f"{folder}/model.pte"],
            ["adb", "-s", serial, "push", str(bundle_file(bundle, manifest, "tokenizer.json")), f"{folder}/tokenizer.json"],
            ["adb", "-s", serial, "push", str(runner), f"{folder}/llama_main"],
            ["adb", "-s", serial, "shell", f"chmod +x {shlex.quote(folder)}/llama_main"]]
    return folder, cmds


def check_adb(serial: str) -> None:
    if shutil.which("adb") is None:
        raise EdgepackError("adb is not installed or not on PATH",
                            "install Android SDK platform-tools (developer.android.com/tools/releases/platform-tools)")
    state = subprocess.run(["adb", "-s", serial, "get-state"], capture_output=True, text=True)
    if state.returncode != 0 or state.stdout.strip() != "device":
        listed = subprocess.run(["adb", "devices"], capture_output=True, text=True).stdout.strip().splitlines()[1:]
        raise EdgepackError(
            f"Android device {serial} is not connected ({(state.stderr or state.stdout).strip() or 'not listed'})",
            f"connect it with USB debugging on; `adb devices` lists: {', '.join(listed) or 'nothing'}",
        )


def run_adb(serial: str, bundle: Path, manifest: dict[str, Any], lengths: list[int], runs: int, new_tokens: int,
            threads: int, runner: str | None, log: Callable[[str], None]) -> list[dict[str, Any]]:
    if manifest["backend"]["name"] != "executorch":
        raise UsageError(f"--device adb runs ExecuTorch bundles; this one is {manifest['backend']['name']}",
                         "export with --target pixel-9 (or another ExecuTorch target)")
    runner = runner or os.environ.get("EDGEPACK_LLAMA_RUNNER")
    if not runner or not Path(runner).is_file():
        raise EdgepackError("ExecuTorch's llama runner for Android (llama_main) was not found",
                            "build it for arm64-v8a (ExecuTorch examples/models/llama) and pass --runner PATH "
                            "or set EDGEPACK_LLAMA_RUNNER")
    check_adb(serial)
    folder, pushes = push_commands(serial, bundle, manifest, Path(runner))
    for cmd in pushes:
        _run(cmd)
    from edgepack.runtime import BundleTokenizer, Session

    session = Session(None, BundleTokenizer.from_bundle(bundle, manifest), manifest)  # type: ignore[arg-type]
    from edgepack.profile import _prompt

    out = []
    for r in range(runs):
        result: dict[str, Any] = {"by_prompt_length": {}, "load_s": None, "peak_rss_mb": None}
        for n in lengths:
            text = session.tokenizer.decode(_prompt(session, n))
            figures = parse_llama_runner(_run(llama_runner_command(serial, folder, text, n + new_tokens, threads)))
            result["by_prompt_length"][str(n)] = {k: figures[k] for k in ("ttft_ms", "prefill_tok_s", "decode_tok_s")}
            result["load_s"] = result["load_s"] or figures["load_s"]
            result["peak_rss_mb"] = max(filter(None, [result["peak_rss_mb"], figures["peak_rss_mb"]]), default=None)
            log(f"run {r + 1}/{runs} on {serial}, {n}-token prompt: decode {figures['decode_tok_s']:.1f} tok/s")
        out.append(result)
    return out


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise EdgepackError(f"`{' '.join(cmd[:5])} ...` failed: {proc.stderr.strip()[-300:]}",
                            "check the device's connection and free space")
    return proc.stdout + proc.stderr


# --- Qualcomm AI Hub ------------------------------------------------------------------------------------------


def parse_qai_hub_profile(profile: dict[str, Any], tokens_per_call: int = 1) -> dict[str, Any]:
    """Figures of one AI Hub profile (`ProfileJob.download_profile()`): times in microseconds, memory in bytes.
    One inference is one forward call of `tokens_per_call` tokens."""
    s = profile.get("execution_summary") or {}
    if not s.get("estimated_inference_time"):
        raise EdgepackError("the AI Hub profile has no execution_summary.estimated_inference_time",
                            "open the job's page on workbench.aihub.qualcomm.com to see why it failed")
    call_s = s["estimated_inference_time"] / 1e6
    units: dict[str, int] = {}
    for layer in profile.get("execution_detail") or []:
        units[layer.get("compute_unit", "?")] = units.get(layer.get("compute_unit", "?"), 0) + 1
    return {
        "call_ms": call_s * 1000,
        "tok_s": tokens_per_call / call_s,
        "load_s": (s.get("first_load_time") or 0) / 1e6 or None,
        "peak_memory_mb": max(s.get("estimated_inference_peak_memory") or 0, s.get("first_load_peak_memory") or 0) / 1e6,
        "inference_times_ms": [t / 1000 for t in s.get("all_inference_times") or []],
        "compute_units": units,
    }


def qai_hub_client() -> Any:
    try:
        import qai_hub
    except ImportError:
        raise EdgepackError("qai-hub is not installed", "pip install qai-hub, then qai-hub configure --api_token TOKEN") from None
    config = Path(os.environ.get("QAIHUB_CLIENT_INI", Path.home() / ".qai_hub" / "client.ini"))
    if not config.is_file():
        raise EdgepackError("Qualcomm AI Hub credentials are not configured",
                            "run `qai-hub configure --api_token TOKEN` (token from workbench.aihub.qualcomm.com)")
    return qai_hub


def run_qai_hub(name: str, bundle: Path, manifest: dict[str, Any], lengths: list[int], runs: int,
                log: Callable[[str], None]) -> list[dict[str, Any]]:
    backend = manifest["backend"]
    if backend["name"] != "onnx":
        raise UsageError(f"--device qai-hub profiles ONNX / QNN bundles; this one is {backend['name']}",
                         "export with --target snapdragon-8-elite (or another onnx/qnn target)")
    hub = qai_hub_client()
    device = hub.Device(name)
    from edgepack.bundle import bundle_file

    program = bundle_file(bundle, manifest, backend["program"])
    job = hub.submit_profile_job(model=str(program), device=device, name=f"edgepack {bundle.name}",
                                 options=f"--max_profiler_iterations {max(runs, 1) * 10}")
    log(f"submitted AI Hub profile job {job.job_id} on {name}; waiting")
    figures = parse_qai_hub_profile(job.download_profile(), int(backend.get("max_prefill", 1)))
    per_call = figures["inference_times_ms"] or [figures["call_ms"]]
    return [{
        "load_s": figures["load_s"],
        "peak_rss_mb": figures["peak_memory_mb"],
        "by_prompt_length": {str(n): {"ttft_ms": ms * -(-n // int(backend.get("max_prefill", 1))),
                                      "prefill_tok_s": figures["tok_s"], "decode_tok_s": 1000 / ms}
                             for n in lengths},
    } for ms in per_call[: max(runs, 1)]]
