"""Export time, peak memory, bundle size and the gate's figures for real students, per backend, in one run.

    python benchmarks/bench_export.py [--model default] [--model qwen=PATH.gguf] [--model r1-1.5b] \
        [--backend executorch,executorch-2r,onnx,coreml] [--work DIR] [--timeout 3600] [--json] [--out FILE]

Models: `default` (the embedded SmolLM2-135M-Instruct Q4_1 GGUF), `NAME=PATH` (a GGUF file or a Hugging Face
folder), or a shape from students.py (`r1-1.5b`: DeepSeek-R1-Distill-Qwen-1.5B's shape, random bf16 weights
generated under --work; random weights say nothing about quality, so its gate figures are not read).
Each export runs `edgepack export` in a child process: wall time is the child's, peak RSS its `ru_maxrss`
(load, quantize, lower, write and the quality gate together). The gate's figures come from the bundle's
manifest: top-1 / KL / perplexity ratio against the fp32 reference, and fidelity against the torch model on
the same quantized weights. With llama-cpp-python installed (`pip install -e .[bench]`), a GGUF model also
gets llama.cpp's own figures on the same text against the same fp32 reference (its Q8 activations included),
and with `--genai DIR` also onnxruntime-genai's own int4 build of the same GGUF (built under DIR).
Run it on a quiet machine (`uptime`): one export at a time, nothing else.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

BACKENDS = {  # backend -> (target, --backend, more export flags): where each backend is normally shipped
    "executorch": ("pixel-9", "executorch/xnnpack", []),
    "executorch-2r": ("pixel-9", "executorch/xnnpack", ["--activation-ranges", "2"]),  # ~16-bit activations
    "onnx": ("host", "onnx/cpu", []),
    "coreml": ("iphone-16-pro", "coreml", []),
}
SHAPES = {"r1-1.5b": "r1-distill-qwen-1.5b"}


def resolve_model(spec: str, work: Path) -> tuple[str, str | None]:
    """(label, source for --model; None = the default model)."""
    if spec == "default":
        return "SmolLM2-135M Q4_1 (default)", None
    if spec in SHAPES:
        from students import SHAPES as SHAPE_CONFIGS, write_random_student

        folder = work / spec
        if not (folder / "model.safetensors").exists():
            print(f"writing random {spec} student to {folder}", file=sys.stderr)
            write_random_student(folder, SHAPE_CONFIGS[SHAPES[spec]])
        return f"{spec} (random bf16)", str(folder)
    label, _, path = spec.partition("=")
    if not path:
        raise SystemExit(f"--model {spec!r}: use default, {', '.join(SHAPES)} or NAME=PATH")
    return label, str(Path(path).resolve())


def run_export(source: str | None, backend: str, out: Path, timeout: float) -> dict[str, Any]:
    target, flag, more = BACKENDS[backend]
    cmd = [sys.executable, "-m", "edgepack.cli", "export", "-t", target, "--backend", flag, "-q", "int4", *more,
           "-o", str(out), "--force", "--json"] + (["-m", source] if source else [])
    started = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        return {"status": f"timed out after {timeout:.0f} s", "wall_s": timeout}
    wall = time.perf_counter() - started
    peak_kb = _child_peak_kb(child.pid)
    row: dict[str, Any] = {"wall_s": round(wall, 1), "peak_rss_gb": round(peak_kb / 1e6, 2) if peak_kb else None}
    kept = out if (out / "manifest.json").exists() else out.with_name(out.name + ".failed")
    if not (kept / "manifest.json").exists():
        return {**row, "status": "error: " + (stderr.strip().splitlines() or ["no output"])[-1][:200]}
    manifest = json.loads((kept / "manifest.json").read_text())
    gate = manifest.get("verification") or {}
    tf, fid = gate.get("teacher_forcing") or {}, (gate.get("fidelity") or {}).get("teacher_forcing") or {}
    size = sum(f.stat().st_size for f in kept.rglob("*") if f.is_file())
    return {
        **row,
        "status": gate.get("status", "?") + (f" ({gate['reason']})" if gate.get("reason") else ""),
        "bundle_mb": round(size / 1e6, 1),
        "export_s": manifest.get("export_seconds"),
        "verify_s": gate.get("seconds"),
        "top1": tf.get("top1_agreement"),
        "kl": tf.get("mean_kl"),
        "ppl_ratio": tf.get("perplexity_ratio"),
        "fidelity_top1": fid.get("top1_agreement"),
        "fidelity_kl": fid.get("mean_kl"),
    }


def _child_peak_kb(pid: int) -> int | None:
    """The finished child's peak RSS: subprocess has reaped it, so read what the kernel kept for children."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return int(usage.ru_maxrss) or None  # the largest child so far: run one export per process of this script


def anchor_figures(source: str | None, tokens: int = 1024, threads: int = 2,
                   genai_dir: Path | None = None) -> list[dict[str, Any]]:
    """The engines users would otherwise pick, scored like a bundle on the same GGUF: teacher forcing on the
    gate's text against the fp32 reference (the GGUF dequantized). llama.cpp on the GGUF itself (its Q8
    activations included) and, with `genai_dir`, onnxruntime-genai's own int4 build of it (benchmarks/engines.py
    build_genai: re-rounded from the dequantized weights). Empty for a non-GGUF source."""
    import numpy as np

    from edgepack.evaltext import load_text
    from edgepack.intake import default_model_path, load_student
    from edgepack.model import build_model
    from edgepack.runtime import TorchDecoder
    from edgepack.verify import teacher_forcing

    path = Path(source) if source else default_model_path()
    if path.suffix.lower() != ".gguf":
        return []
    student = load_student(str(path))
    text, _ = load_text(None)
    from tokenizers import Tokenizer

    ids = Tokenizer.from_str(student.tokenizer_files["tokenizer.json"].decode()).encode(text).ids[: tokens + 1]
    reference = TorchDecoder(build_model(student.config, student.state_dict, max_context=len(ids) + 8))

    class TorchScorer:
        def score(self, part: Any) -> np.ndarray:
            reference.reset()
            return reference.forward(np.asarray(part), 0)

    rows = []
    for label, scorer in _anchor_scorers(path, len(ids) + 8, threads, genai_dir):
        a = teacher_forcing(TorchScorer(), scorer, ids)
        rows.append({"backend": label, "top1": a.top1_agreement, "kl": a.mean_kl, "ppl_ratio": a.perplexity_ratio})
    return rows


def _anchor_scorers(gguf: Path, context: int, threads: int, genai_dir: Path | None) -> Any:
    """(label, scorer with `score(ids) -> logits [N, vocab]`) for each anchor engine installed."""
    import numpy as np

    if importlib.util.find_spec("llama_cpp") is not None:
        import llama_cpp

        llm = llama_cpp.Llama(str(gguf), n_ctx=context, n_threads=threads, logits_all=True, verbose=False)

        class LlamaScorer:
            def score(self, part: Any) -> np.ndarray:
                llm.reset()
                llm.eval([int(i) for i in part])
                return np.asarray(llm.scores[: len(part)], dtype=np.float32)

        yield f"llama.cpp {llama_cpp.__version__} (same GGUF)", LlamaScorer()
    if genai_dir is not None and importlib.util.find_spec("onnxruntime_genai") is not None:
        import onnxruntime_genai as og

        from engines import GenaiEngine, build_genai

        engine = GenaiEngine(str(build_genai(gguf, genai_dir, threads)), threads, context)

        class GenaiScorer:
            def score(self, part: Any) -> np.ndarray:  # its generator returns the last position's logits only
                rows = [engine.prefill([int(part[0])])]
                rows += [engine.step(int(token), pos) for pos, token in enumerate(part[1:], start=1)]
                return np.stack(rows).astype(np.float32)

        yield f"onnxruntime-genai {og.__version__} int4 (its own build)", GenaiScorer()


def table(rows: list[dict[str, Any]]) -> str:
    cols = [("model", "model", "{}"), ("backend", "backend", "{}"), ("wall_s", "wall s", "{:.0f}"),
            ("peak_rss_gb", "peak GB", "{:.2f}"), ("bundle_mb", "bundle MB", "{:.0f}"), ("top1", "top-1", "{:.1%}"),
            ("kl", "KL", "{:.4f}"), ("ppl_ratio", "ppl x", "{:.3f}"), ("fidelity_top1", "fidelity", "{:.1%}"),
            ("status", "gate", "{}")]
    fmt = lambda v, f: "-" if v is None else f.format(v)  # noqa: E731
    body = [[fmt(r.get(k), f) for k, _, f in cols] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, (_, h, _) in enumerate(cols)]
    lines = ["  ".join(h.ljust(w) for (_, h, _), w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", help="default, r1-1.5b or NAME=PATH (repeatable)")
    p.add_argument("--backend", default="executorch,onnx,coreml", help=f"of {', '.join(BACKENDS)}")
    p.add_argument("--work", type=Path, default=Path("bench-export"))
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    p.add_argument("--genai", type=Path, help="also score onnxruntime-genai's own int4 build (made in this folder)")
    p.add_argument("--one", nargs=3, metavar=("SOURCE", "BACKEND", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:  # one export in its own process, so ru_maxrss is that export's alone
        source, backend, out = args.one
        print(json.dumps(run_export(None if source == "-" else source, backend, Path(out), args.timeout)))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    report = {"machine": os.uname().nodename, "cpus": os.cpu_count(), "load_before": os.getloadavg()[0], "rows": rows}

    def save(report: dict[str, Any]) -> None:
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))

    for spec in args.model or ["default"]:
        label, source = resolve_model(spec, args.work)
        for backend in args.backend.split(","):
            out = args.work / f"{spec.partition('=')[0]}-{backend}"
            print(f"{label} -> {backend} ...", file=sys.stderr, flush=True)
            done = subprocess.run([sys.executable, __file__, "--one", source or "-", backend, str(out),
                                   "--timeout", str(args.timeout)], capture_output=True, text=True)
            row = json.loads(done.stdout) if done.returncode == 0 and done.stdout.strip() else {"status": done.stderr[-200:]}
            _, flag, more = BACKENDS[backend]
            rows.append({"model": label, "backend": " ".join([flag, *more]), **row})
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
            save(report)  # row by row: a long run stopped midway keeps what it measured
        if spec not in SHAPES:
            genai = args.genai / f"genai-{spec.partition('=')[0]}" if args.genai else None
            rows += [{"model": label, **anchor, "status": "anchor"} for anchor in anchor_figures(source, genai_dir=genai)]
            save(report)
    print(json.dumps(report, indent=2) if args.json else table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
