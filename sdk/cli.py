"""`edgepack` command line: a thin layer over `edgepack.export`, `edgepack.runtime` and the registries.

Heavy modules (torch, executorch) are imported only inside the command that needs them, so `edgepack
targets` and `--help` are instant. Every user-fixable problem is one line on stderr and an exit code:
2 for usage, 1 for failure; `EDGEPACK_DEBUG=1` shows tracebacks of unexpected errors.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict
from typing import Any, Callable

import click

from edgepack import __version__
from edgepack.errors import EdgepackError
from edgepack.output import Output


# Set by the SIGTERM handler: an interrupt that C code turned into another error (e.g. torch building a tensor
# when the signal lands gives "could not determine the shape of object type ...") still exits as interrupted.
_SIGNALLED: list[int] = []


def _handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    import functools

    def interrupted() -> None:
        click.echo("interrupted", err=True)
        sys.exit(130)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            interrupted()
        except EdgepackError as e:
            if _SIGNALLED:
                interrupted()
            click.echo(f"error: {e.one_line()}", err=True)
            sys.exit(e.exit_code)
        except (click.ClickException, click.exceptions.Exit, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - the last line of defence against tracebacks
            if _SIGNALLED:
                interrupted()
            if os.environ.get("EDGEPACK_DEBUG"):
                raise
            click.echo(f"error: internal error {type(e).__name__}: {e} (rerun with EDGEPACK_DEBUG=1)", err=True)
            sys.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgepack")
def main() -> None:
    """Export small language models into app-ready on-device bundles, run and inspect them."""


def _target_names() -> list[str]:
    from edgepack.targets import all_targets

    return list(all_targets())


def _preset_names() -> list[str]:
    from edgepack.presets import PRESETS

    return list(PRESETS)


@main.command()
@click.option("--model", "-m", "source", help="HF checkpoint folder, .gguf file or hub id [default: SmolLM2-135M]")
@click.option("--target", "-t", default="host", show_default=True,
              help=f"device profile, or several: a,b[:BACKEND] (a release matrix): {', '.join(_target_names())}")
@click.option("--quant", "-q", help=f"quantization preset(s), e.g. int4,int8: {', '.join(_preset_names())} "
              "[default: the target's]")
@click.option("--max-context", type=int, help="KV cache length in tokens [default: the target's]")
@click.option("--group-size", type=int, help="int4/int8 group size (0 = per channel) [default: the preset's]")
@click.option("--backend", help="override the target's preferred backend, e.g. executorch/xnnpack or reference")
@click.option("--activation-ranges", type=click.IntRange(1, 2),
              help="executorch: each linear's int8 input in 2 rows, its own int8 grid and that grid's residual (~16 "
              "bits): default model top-1 94.2 -> 97.4%, KL 0.0115 -> 0.0016; decode ~2x slower [default: 1]")
@click.option("--output", "-o", type=click.Path(), help="bundle folder [default: bundles/MODEL-TARGET-QUANT]; "
              "a matrix: the folder of its bundles, OUT/TARGET-QUANT [default: bundles/MODEL]")
@click.option("--no-verify", is_flag=True, help="skip the quality gate against the fp32 reference (recorded)")
@click.option("--keep-failed", is_flag=True, help="keep a bundle that fails the gate, marked failed")
@click.option("--force", is_flag=True, help="replace an existing bundle at -o (never any other folder)")
@click.option("--matrix", "matrix_file", type=click.Path(), help="a TOML file of targets and presets to build")
@click.option("--jobs", "-j", type=click.IntRange(min=1), help="matrix cells built at once here [default: 1]")
@click.option("--ray", "ray_address", help="build the matrix's cells on a Ray cluster: its address, or auto")
@click.option("--json", "as_json", is_flag=True, help="print the manifest as JSON instead of a summary")
@_handle_errors
def export(
    source: str | None,
    target: str,
    quant: str | None,
    max_context: int | None,
    group_size: int | None,
    backend: str | None,
    activation_ranges: int | None,
    output: str | None,
    no_verify: bool,
    keep_failed: bool,
    force: bool,
    matrix_file: str | None,
    jobs: int | None,
    ray_address: str | None,
    as_json: bool,
) -> None:
    """Build a bundle: load the student, quantize, lower for the target, write, checksum and verify it.

    Several targets or presets (comma-separated, or --matrix FILE) build a release matrix: one bundle per
    target x preset, sharing the model load, quantization and the gate's fp32 reference, and a summary table."""
    from edgepack.export import plan_export, run_export
    from edgepack.verify import VerificationFailed

    if matrix_file or jobs or ray_address or "," in target or "," in (quant or ""):
        _export_matrix(source, target, quant, max_context, group_size, backend, output, not no_verify, keep_failed,
                       force, matrix_file, jobs or 1, ray_address, as_json, activation_ranges=activation_ranges)
        return
    _sigterm_as_interrupt()  # a killed export (SIGTERM) cleans up its staging folder like Ctrl-C does
    started = time.perf_counter()
    out = Output(as_json)
    plan = plan_export(source, target, quant, max_context, output, backend, group_size, not no_verify, keep_failed,
                       force=force, activation_ranges=activation_ranges)
    out.info("exporting " + ", ".join(f"{k}={v}" for k, v in plan.describe().items()))
    if plan.fit is not None:
        out.info(plan.fit.summary())
    try:
        with out.quiet_native(), out.steps("export") as step:
            manifest = run_export(plan, step)
    except VerificationFailed as failed:
        _show_verification(out, failed.report)
        raise
    if not as_json:
        _show_verification(out, manifest["verification"])
    size_mb = sum(f["size"] for f in manifest["files"].values()) / 1e6
    out.result(
        {"bundle": str(plan.output), "size_mb": round(size_mb, 1), "manifest": manifest},
        f"wrote {plan.output} ({size_mb:.1f} MB, {manifest['backend']['name']}, {plan.preset.name}) "
        f"in {time.perf_counter() - started:.0f} s"
        + (f" ({manifest['export_seconds']:.0f} s to build, the rest verifying)" if plan.verify else ""),
    )


def _export_matrix(source: str | None, target: str, quant: str | None, max_context: int | None,
                   group_size: int | None, backend: str | None, output: str | None, verify: bool, keep_failed: bool,
                   force: bool, matrix_file: str | None, jobs: int, ray_address: str | None, as_json: bool, *,
                   activation_ranges: int | None = None) -> None:
    """`edgepack export` over a matrix of targets x presets (sdk/matrix.py); exit 1 if any cell failed."""
    from edgepack.errors import UsageError
    from edgepack.matrix import SUMMARY_HEADER, plan_matrix, read_matrix_file, run_matrix, split_list, summary_rows

    targets, quants = split_list(target), split_list(quant)
    if matrix_file:
        given = click.get_current_context().get_parameter_source
        if quant or given("target") != click.core.ParameterSource.DEFAULT:
            raise UsageError("--matrix and --target/--quant both name the matrix", "pass one of them")
        targets, quants = read_matrix_file(matrix_file)
    if ray_address:
        from edgepack.matrix_ray import require_ray

        require_ray()
    _sigterm_as_interrupt()
    out = Output(as_json)
    cells = plan_matrix(source, targets, quants, output, backend, max_context, group_size, verify, keep_failed, force,
                        activation_ranges=activation_ranges)
    where = f"on the Ray cluster at {ray_address}" if ray_address else f"{jobs} at a time on this machine"
    out.info(f"exporting a matrix of {len(cells)} bundles ({where}): " + ", ".join(c.name for c in cells))
    with out.quiet_native():
        results = run_matrix(cells, jobs, ray_address, _cell_progress(out))
    failed = [r for r in results if not r.ok]
    if as_json:
        out.result({"cells": [r.to_dict() for r in results], "failed": len(failed)}, "")
    else:
        folder = next((c.plan.output.parent for c in cells if c.plan is not None), output)
        out.grid(f"release matrix in {folder}", SUMMARY_HEADER, summary_rows(results))
        for r in failed:
            out.result(None, f"{r.name}: {r.error}")
        out.result(None, f"{len(results) - len(failed)} of {len(results)} bundles built"
                   + (f"; {len(failed)} failed" if failed else ""))
    if failed:
        sys.exit(1)


def _cell_progress(out: Output) -> Callable[[str, str], None]:
    """One line per cell and stage, with the time since the matrix started (cells run in parallel)."""
    import time

    from rich.markup import escape

    started = time.monotonic()
    return lambda cell, stage: out.info(escape(f"{time.monotonic() - started:6.0f} s  {cell}: {stage}"))


def _sigterm_as_interrupt() -> None:
    """Turn SIGTERM into KeyboardInterrupt, so `finally`/`except` blocks run (the staging folder is removed)
    and the command exits like on Ctrl-C; a second SIGTERM during that cleanup is ignored."""
    import signal
    import threading

    def interrupt(signum: int, _frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _SIGNALLED.append(signum)
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():  # signals can only be handled there
        previous = signal.signal(signal.SIGTERM, interrupt)
        click.get_current_context().call_on_close(lambda: signal.signal(signal.SIGTERM, previous))


@main.command()
@click.argument("bundle", type=click.Path())
@click.argument("prompt")
@click.option("--max-new-tokens", "-n", type=int, help="[default: the bundle's]")
@click.option("--temperature", type=float, help="0 = greedy [default: the bundle's]")
@click.option("--top-p", type=float)
@click.option("--top-k", type=int)
@click.option("--seed", type=int)
@click.option("--stop", multiple=True, help="stop string (repeatable)")
@click.option("--raw", is_flag=True, help="send the prompt as is, without the chat template")
@click.option("--backend", help="run through another backend than the bundle's (e.g. reference)")
@click.option("--json", "as_json", is_flag=True, help="print text, reasoning and stats as JSON at the end")
@_handle_errors
def run(bundle: str, prompt: str, raw: bool, backend: str | None, as_json: bool, **sampling: Any) -> None:
    """Stream a reply to PROMPT from BUNDLE through its real backend."""
    from edgepack import runtime
    from edgepack.runtime.session import check_generation_options
    from edgepack.runtime.tokenizer import check_text

    options = {k: list(v) if isinstance(v, tuple) else v for k, v in sampling.items() if v not in (None, ())}
    check_generation_options(options)  # bad options and prompts fail before the bundle loads
    check_text(prompt, "the prompt")
    out = Output(as_json)
    with out.quiet_native():
        session = runtime.load(bundle, backend=backend)
    text, thinking = [], []
    with out.quiet_native():
        for chunk in session.generate(prompt, chat=not raw, **options):
            (thinking if chunk.kind == "thinking" else text).append(chunk.text)
            out.stream(chunk.text, dim=chunk.kind == "thinking")
    stats = session.last_stats
    out.end_stream()
    out.result(
        {"text": "".join(text), "thinking": "".join(thinking), "stats": asdict(stats)},
        f"[{stats.prompt_tokens} prompt tokens, {stats.generated_tokens} generated; "
        f"first token {stats.time_to_first_token_s * 1000:.0f} ms, prefill {stats.prefill_tokens_per_s:.0f} tok/s, "
        f"decode {stats.decode_tokens_per_s:.1f} tok/s; stop: {stats.stop_reason}]",
    )


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="print the whole manifest")
@_handle_errors
def inspect(bundle: str, as_json: bool) -> None:
    """Show a bundle's manifest and check every file against its checksum."""
    from edgepack.bundle import read_manifest

    manifest = read_manifest(bundle)
    out = Output(as_json)
    if as_json:
        out.result(manifest, "")
        return
    model, backend = manifest["model"], manifest["backend"]
    npu, verification = backend.get("npu") or {}, manifest.get("verification") or {}
    ep = npu.get("ep_options") or {}
    rows = [
        ("model", f"{model['name']} ({model.get('architecture') or model['config']['architecture']}, "
         f"{(model.get('parameters') or 0) / 1e6:.0f}M params)"),
        ("quantization", (manifest.get("quantization") or {}).get("name", "-")),
        ("backend", f"{backend['name']} / {backend.get('delegate') or '-'}"),
        ("target", manifest.get("target") or "-"),
        ("context", str(manifest["context_length"])),
    ]
    if npu:  # a Snapdragon bundle: which chip its NPU graphs were compiled for, and with what
        rows += [("NPU SoC", f"{ep.get('soc_model', '-')} (id {npu.get('soc_id', '-')})"),
                 ("NPU HTP arch", f"v{ep['htp_arch']}" if ep.get("htp_arch") else "-"),
                 ("NPU QNN SDK", str(npu.get("qnn_sdk") or "-")),
                 ("NPU context", str(npu["context"]))]
    rows += [
        ("verification", verification.get("status", "not recorded")
         + (f" ({verification['reason']})" if verification.get("reason") else "")),
        ("stop ids", str(manifest["tokenizer"].get("stop_ids", []))),
        ("created", manifest.get("created") or "-"),
        *[(f"file {n}", f"{f['size'] / 1e6:.1f} MB  sha256 {f['sha256'][:16]}…") for n, f in manifest["files"].items()],
        *[(f"built with {k}", v) for k, v in (manifest.get("toolchain") or {}).items()],
    ]
    out.table(f"{bundle} (checksums ok)", rows)


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("--reference", "-r", help="the fp32 model to compare with [default: the one the bundle was exported from]")
@click.option("--text", type=click.Path(), help="UTF-8 text to evaluate on [default: prose of CPython's reference manual]")
@click.option("--tokens", type=int, default=1024, show_default=True, help="positions scored under teacher forcing")
@click.option("--backend", help="score through another backend of the bundle, e.g. onnx/qnn (the NPU graphs)")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@_handle_errors
def verify(bundle: str, reference: str | None, text: str | None, tokens: int, backend: str | None,
           as_json: bool) -> None:
    """Measure BUNDLE against its fp32 reference on real text; exit 1 if it misses its preset's thresholds."""
    from edgepack.heap import keep_freed_memory
    from edgepack.verify import VerificationFailed, verify_bundle

    keep_freed_memory()
    out = Output(as_json)
    with out.quiet_native(), out.steps("verify") as step:
        report = verify_bundle(bundle, reference=reference, text_file=text, eval_tokens=tokens, step=step,
                               backend_override=backend).to_dict()
    _show_verification(out, report)
    if report["status"] == "failed":
        raise VerificationFailed(report, fix="do not ship it: re-export, or compare with the right --reference")


def _show_verification(out: Output, report: dict[str, Any]) -> None:
    from edgepack.verify import table_rows

    if out.as_json:
        out.result(report, "")
    else:
        out.table("verification", table_rows(report))


@main.command()
@click.option("--json", "as_json", is_flag=True)
@_handle_errors
def targets(as_json: bool) -> None:
    """List the device profiles a bundle can be exported for."""
    from edgepack.targets import all_targets

    out = Output(as_json)
    found = all_targets()
    if as_json:
        out.result([t.to_dict() for t in found.values()], "")
        return
    out.table(
        "targets",
        [(t.name, f"{t.description}; backends {', '.join(t.backends)}; default {t.default_quant}")
         for t in found.values()],
    )


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("--target", "-t", help="device profile to project onto and check budgets of [default: the bundle's]")
@click.option("--prompt-lengths", default="128,512", show_default=True, help="prompt lengths in tokens")
@click.option("--runs", type=int, default=3, show_default=True, help="fresh processes per figure (median, min-max)")
@click.option("--new-tokens", type=int, default=128, show_default=True, help="greedy tokens decoded per run")
@click.option("--device", default="host", show_default=True, help="host, adb:SERIAL or qai-hub:DEVICE_NAME")
@click.option("--runner", type=click.Path(), help="adb: ExecuTorch's llama_main built for Android")
@click.option("--out", "out_dir", type=click.Path(), help="report.json + chart.png [default: profiles/BUNDLE-TARGET]")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@_handle_errors
def profile(bundle: str, target: str | None, prompt_lengths: str, runs: int, new_tokens: int, device: str,
            runner: str | None, out_dir: str | None, as_json: bool) -> None:
    """Measure BUNDLE through its real backend, project it onto a target, check the target's budgets.

    Exit code 1 when a budget fails. Threads: EDGEPACK_THREADS (default 2)."""
    from pathlib import Path

    from edgepack.profile import budget_lines, parse_lengths, profile_bundle, write_report

    out = Output(as_json)
    if device != "host":
        from edgepack.profile_device import parse_device

        parse_device(device)
    report = profile_bundle(bundle, target, parse_lengths(prompt_lengths), runs, new_tokens, device=device,
                            runner=runner, log=out.info)
    folder = Path(out_dir or Path("profiles") / f"{Path(bundle).resolve().name}-{report['target']}")
    path = write_report(report, folder)
    if as_json:
        out.result(report, "")
    else:
        m = report["measured"]
        rows = [("device", f"{report['device']} ({report['host']['cpu']}, {report['host']['threads']} threads)")]
        if m.get("load_s"):
            rows.append(("load (measured)", f"{m['load_s']['median']:.2f} s [{m['load_s']['min']:.2f}-{m['load_s']['max']:.2f}]"))
        for n, row in m["by_prompt_length"].items():
            rows.append((f"{n} tokens (measured)", "  ".join(
                f"{k} {v['median']:.1f} [{v['min']:.1f}-{v['max']:.1f}]" for k, v in row.items())))
        if "peak_rss_mb" in m["peak_memory"]:
            pm = m["peak_memory"]
            rows.append(("peak memory (measured)", f"{pm['peak_rss_mb']['median']:.0f} MB RSS, bundle's own "
                         f"{pm.get('model_mb', {}).get('median', float('nan')):.0f} MB"))
        if report["projected"]:
            for n, row in report["projected"]["by_prompt_length"].items():
                rows.append((f"{n} tokens (projected {report['target']})", "  ".join(
                    f"{k} {row[k]:.1f}" for k in ("ttft_ms", "prefill_tok_s", "decode_tok_s") if k in row)))
        out.table(f"profile of {bundle} for {report['target']}", rows)
        for line in budget_lines(report):
            click.echo(line)
        click.echo(f"report: {path}  chart: {path.parent / report['chart']}")
    if not report["passed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
