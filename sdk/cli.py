"""`edgepack` command line: a thin layer over `edgepack.export`, `edgepack.runtime` and the registries.

Heavy modules (torch, executorch) are imported only inside the command that needs them, so `edgepack
targets` and `--help` are instant. Every user-fixable problem is one line on stderr and an exit code:
2 for usage, 1 for failure; `EDGEPACK_DEBUG=1` shows tracebacks of unexpected errors.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict
from typing import Any, Callable

import click

from edgepack import __version__
from edgepack.errors import EdgepackError
from edgepack.output import Output


def _handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EdgepackError as e:
            click.echo(f"error: {e.one_line()}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except (click.ClickException, click.exceptions.Exit, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - the last line of defence against tracebacks
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
    from edgepack.quantize import PRESETS

    return list(PRESETS)


@main.command()
@click.option("--model", "-m", "source", help="HF checkpoint folder, .gguf file or hub id [default: SmolLM2-135M]")
@click.option("--target", "-t", default="host", show_default=True, help=f"device profile: {', '.join(_target_names())}")
@click.option("--quant", "-q", help=f"quantization preset: {', '.join(_preset_names())} [default: the target's]")
@click.option("--max-context", type=int, help="KV cache length in tokens [default: the target's]")
@click.option("--group-size", type=int, help="int4/int8 group size (0 = per channel) [default: the preset's]")
@click.option("--backend", help="override the target's preferred backend, e.g. executorch/xnnpack or reference")
@click.option("--output", "-o", type=click.Path(), help="bundle folder [default: bundles/MODEL-TARGET-QUANT]")
@click.option("--json", "as_json", is_flag=True, help="print the manifest as JSON instead of a summary")
@_handle_errors
def export(
    source: str | None,
    target: str,
    quant: str | None,
    max_context: int | None,
    group_size: int | None,
    backend: str | None,
    output: str | None,
    as_json: bool,
) -> None:
    """Build a bundle: load the student, quantize, lower for the target, write and checksum it."""
    from edgepack.export import plan_export, run_export

    out = Output(as_json)
    plan = plan_export(source, target, quant, max_context, output, backend, group_size)
    out.info("exporting " + ", ".join(f"{k}={v}" for k, v in plan.describe().items()))
    with out.quiet_native(), out.steps("export") as step:
        manifest = run_export(plan, step)
    size_mb = sum(f["size"] for f in manifest["files"].values()) / 1e6
    out.result(
        {"bundle": str(plan.output), "size_mb": round(size_mb, 1), "manifest": manifest},
        f"wrote {plan.output} ({size_mb:.1f} MB, {manifest['backend']['name']}, {plan.preset.name}) "
        f"in {manifest['export_seconds']:.0f} s",
    )


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

    out = Output(as_json)
    with out.quiet_native():
        session = runtime.load(bundle, backend=backend)
    options = {k: v for k, v in sampling.items() if v not in (None, ())}
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
    out.table(
        f"{bundle} (checksums ok)",
        [
            ("model", f"{manifest['model']['name']} ({manifest['model']['architecture']}, "
             f"{manifest['model']['parameters'] / 1e6:.0f}M params)"),
            ("quantization", manifest["quantization"]["name"]),
            ("backend", f"{manifest['backend']['name']} / {manifest['backend'].get('delegate') or '-'}"),
            ("target", manifest["target"]),
            ("context", str(manifest["context_length"])),
            ("stop ids", str(manifest["tokenizer"]["stop_ids"])),
            ("created", manifest["created"]),
            *[(f"file {n}", f"{f['size'] / 1e6:.1f} MB  sha256 {f['sha256'][:16]}…") for n, f in manifest["files"].items()],
            *[(f"built with {k}", v) for k, v in manifest["toolchain"].items()],
        ],
    )


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


if __name__ == "__main__":
    main()
