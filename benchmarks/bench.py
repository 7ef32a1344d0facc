"""Benchmark edgepack bundles against llama.cpp and onnxruntime-genai on the same model, side by side, in one run.

    python benchmarks/bench.py BUNDLE [BUNDLE ...] [--gguf PATH] [--genai DIR | --no-genai] [--threads 2]
                               [--rounds 3] [--positions 1,512,1500] [--chart FILE.png] [--json] [--out FILE]

Engines: each bundle through its own edgepack backend, llama.cpp (llama-cpp-python) on the GGUF the bundles were
exported from (the anchor), and onnxruntime-genai's own int4 CPU build of that GGUF (built once into --genai).
Every engine runs the identical token ids: a ~128-token chat prompt (the first bundle's template; the bundles
must share a tokenizer) and real text cut at each context position. Per engine: time to first token from a cold
start (process spawn, imports, load, prefill), prefill and decode tok/s after the chat prompt and at each context
position, peak RSS. Decode is also given as a share of the host's memory-bandwidth bound (bandwidth measured here
/ bytes read per token: the GGUF's weights plus an fp16 KV cache up to that position).

Every measurement runs in a fresh child process, so its peak RSS (VmHWM) is that engine alone; rounds interleave
engines (A B C A B C ...) because this kind of machine is shared and noisy; the report gives medians with the
min-max spread, never a single run.

Exit codes: 0 ok, 1 a child failed, 3 llama-cpp-python is missing (the bundles are still measured, but a CI check
must not pass silently without its anchor).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engines  # noqa: E402  (benchmarks/engines.py: the child side)

ANCHOR, GENAI = "llama.cpp", "genai int4"
BUSY_CORES = 0.25  # other processes' CPU use above which the report warns that its figures are unreliable
HEADLINE = {  # result key -> table label
    "ttft_s": "first token s (cold)",
    "load_s": "load s",
    "prefill_tok_s": "prefill tok/s (chat)",
    "decode_tok_s": "decode tok/s (chat)",
    "peak_rss_mb": "peak RSS MB (chat)",
    "peak_rss_long_mb": "peak RSS MB (all)",
    "runtime_rss_mb": "runtime alone MB",
}
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


# --- workload -----------------------------------------------------------------------------------------------


def build_prompt(bundle: Path, target_tokens: int) -> tuple[str, list[int]]:
    """INSTRUCTION plus the longest prefix of PASSAGE (in words) whose rendered chat prompt fits `target_tokens`."""
    session = _text_session(bundle)
    words = PASSAGE.split()
    best = session.prompt_ids(f"{INSTRUCTION}\n\n{words[0]}")
    for n in range(2, len(words) + 1):
        rendered = session.prompt_ids(f"{INSTRUCTION}\n\n{' '.join(words[:n])}")
        if len(rendered[1]) > target_tokens:
            break
        best = rendered
    return best


def long_context(bundle: Path, tokens: int) -> list[int]:
    """`tokens` ids of real prose (the reference manual the quality gate also reads), no chat template."""
    from edgepack.evaltext import default_text

    ids = _text_session(bundle).prompt_ids(default_text(), chat=False)[1]
    if len(ids) < tokens:
        raise SystemExit(f"the benchmark text has {len(ids)} tokens, fewer than the {tokens} asked for")
    return ids[:tokens]


def _text_session(bundle: Path) -> Any:
    from edgepack.bundle import read_manifest
    from edgepack.runtime import BundleTokenizer, Session

    manifest = read_manifest(bundle, check_files=False)
    # Rendering needs only the tokenizer and template, not the model: no decoder is loaded here.
    return Session(None, BundleTokenizer.from_bundle(bundle, manifest), manifest)  # type: ignore[arg-type]


def bandwidth_bound(gguf: Path, config: dict[str, Any], positions: list[int], bandwidth_gbs: float) -> dict[str, Any]:
    """The decode tok/s that reading these weights allows on this host: bandwidth / (the GGUF's weights read per
    token + an fp16 KV cache up to the position). The token table counts only where it is also the output layer
    (tied). An engine that rounds the weights again to fewer bytes (genai's int4 build) reads less than this."""
    import gguf as gguf_py

    tensors = {t.name: int(t.n_bytes) for t in gguf_py.GGUFReader(gguf).tensors}
    weights = sum(tensors.values())
    if "output.weight" in tensors:
        weights -= tensors.get("token_embd.weight", 0)  # one row of the table is gathered per token
    kv_per_position = 2 * config["num_layers"] * config["num_kv_heads"] * config["head_dim"] * 2
    return {
        "memory_bandwidth_gbs": bandwidth_gbs,
        "weights_read_mb": weights / 1e6,
        "kv_bytes_per_position": kv_per_position,
        "tok_s": {str(p): bandwidth_gbs * 1e9 / (weights + kv_per_position * p) for p in positions},
    }


# --- parent: interleaving, report --------------------------------------------------------------------------


def spawn(kind: str, job: dict[str, Any]) -> dict[str, Any]:
    """Run one engine in a fresh interpreter; its result is the last line of its stdout."""
    job = {**job, "spawned": time.time()}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--job", json.dumps(job)]
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise SystemExit(f"{kind} child failed (exit {proc.returncode}):\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def host_facts(threads: int) -> dict[str, Any]:
    from edgepack.profile import host_facts as profile_host_facts

    return {**profile_host_facts(threads), "load_avg_1m": os.getloadavg()[0]}


def bundle_facts(bundle: Path) -> dict[str, Any]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    backend = manifest["backend"]
    return {
        "path": str(bundle),
        "model": manifest["model"]["name"],
        "config": manifest["model"]["config"],
        "context_length": int(manifest["context_length"]),
        "quantization": manifest["quantization"]["name"],
        "backend": backend["name"] + (f"+{backend['delegate']}" if backend.get("delegate") else ""),
        "size_mb": sum(f["size"] for f in manifest["files"].values()) / 1e6,
        "program_mb": manifest["files"][backend["program"]]["size"] / 1e6,
    }


def engine_label(bundle: Path) -> str:
    """A bundle's column name: its backend and preset, e.g. "executorch+xnnpack int4"."""
    facts = bundle_facts(bundle)
    return f"{facts['backend']} {facts['quantization']}"


def stats(values: list[float]) -> dict[str, Any] | None:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values} if values else None


def summarize(runs: list[dict[str, Any]], positions: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {key: stats([r[key] for r in runs if r.get(key) is not None]) for key in HEADLINE}
    out["at"] = {
        str(p): {key: stats([r["at"][str(p)][key] for r in runs]) for key in ("prefill_tok_s", "decode_tok_s")}
        for p in positions
    }
    return out


def ratios(results: dict[str, Any], engine: str, other: str, positions: list[int]) -> dict[str, float | None]:
    """engine / other per figure, medians; above 1 is better for speed, below 1 for time and memory."""
    def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
        return a["median"] / b["median"] if a and b and b["median"] else None

    mine, theirs = results[engine], results[other]
    out = {key: ratio(mine[key], theirs[key]) for key in HEADLINE}
    for p in positions:
        for key in ("prefill_tok_s", "decode_tok_s"):
            out[f"{key}@{p}"] = ratio(mine["at"][str(p)][key], theirs["at"][str(p)][key])
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def table_rows(report: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(label, one cell per engine): medians [min-max], and for edgepack columns the ratios to the anchors."""
    results, bound, names = report["results"], report["bandwidth_bound"], list(report["results"])

    def cell(s: dict[str, Any] | None, digits: int) -> str:
        return "missing" if s is None else f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"

    def with_ratios(engine: str, key: str, text: str) -> str:
        for other, tag in ((ANCHOR, "L"), (GENAI, "G")):
            r = report["ratios"].get(engine, {}).get(other, {}).get(key)
            if r is not None:
                text += f" {r:.2f}x{tag}"
        return text

    rows = []
    for key, label in HEADLINE.items():
        digits = 2 if key.endswith("_s") and not key.endswith("tok_s") else 1
        rows.append((label, [with_ratios(e, key, cell(results[e][key], digits)) for e in names]))
    for p in report["workload"]["positions"]:
        for key, what in (("prefill_tok_s", "prefill"), ("decode_tok_s", "decode")):
            if key == "prefill_tok_s" and p < 64:
                continue  # a prompt of a few tokens times call overhead, not prefill
            label = f"{what} tok/s @{p}"
            rows.append((label, [with_ratios(e, f"{key}@{p}", cell(results[e]["at"][str(p)][key], 1)) for e in names]))
        cells = []
        for e in names:
            s = results[e]["at"][str(p)]["decode_tok_s"]
            cells.append("missing" if s is None else f"{100 * s['median'] / bound['tok_s'][str(p)]:.0f}%")
        rows.append((f"decode % of bound @{p}", cells))
    return rows


def print_report(report: dict[str, Any]) -> None:
    h, w, b = report["host"], report["workload"], report["bandwidth_bound"]
    print(f"host: {h['cpu']}, {h['cores']} cores, {h['threads']} threads used, load avg {h['load_avg_1m']:.2f}, "
          f"read bandwidth {b['memory_bandwidth_gbs']:.1f} GB/s")
    for label, f in report["bundles"].items():
        print(f"{label}: {f['model']} | {f['quantization']} | {f['size_mb']:.1f} MB | {f['path']}")
    if report.get("gguf"):
        g = report["gguf"]
        print(f"{ANCHOR}: llama-cpp-python {report['versions'].get('llama_cpp_python')} | {g['path']} ({g['size_mb']:.1f} MB)")
    if report.get("genai"):
        print(f"{GENAI}: onnxruntime-genai {report['versions'].get('onnxruntime_genai')} int4 CPU build | {report['genai']}")
    print(f"workload: {w['prompt_tokens']}-token chat prompt then {w['new_tokens']} greedy tokens; real text cut at "
          f"positions {w['positions']}, {w['decode_tokens']} tokens decoded after each; {w['rounds']} interleaved "
          f"rounds, medians [min-max]; xL = edgepack / llama.cpp, xG = edgepack / genai")
    print(f"bandwidth bound: {b['weights_read_mb']:.1f} MB of weights + {b['kv_bytes_per_position'] / 1024:.1f} KB "
          "of fp16 KV per position read per token: " + ", ".join(f"@{p} {v:.0f} tok/s" for p, v in b["tok_s"].items()))
    print()
    names, rows = list(report["results"]), table_rows(report)
    width = 2 + max(len(text) for text in names + [c for _, cells in rows for c in cells])
    print(f"{'':24}" + "".join(f"{n:>{width}}" for n in names))
    for label, cells in rows:
        print(f"{label:24}" + "".join(f"{c:>{width}}" for c in cells))
    if report["others_cores_median"] > BUSY_CORES:
        print(f"\nwarning: other processes used {report['others_cores_median']:.2f} cores (median) during the timed "
              "runs; these figures are unreliable (llama.cpp's spinning threadpool suffers most); rerun on a quiet host")
    for label, agree in report["greedy_agreement"].items():
        print(f"{label} and {ANCHOR}: greedy outputs agree on the first {agree} of {w['new_tokens']} tokens (round 1)")


def draw_chart(report: dict[str, Any], path: Path) -> None:
    """Decode and prefill tok/s against context position, one line per engine, and the bandwidth bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positions = report["workload"]["positions"]
    fig, (dec, pre) = plt.subplots(1, 2, figsize=(12, 4.6))
    for name, result in report["results"].items():
        for ax, key, ps in ((dec, "decode_tok_s", positions), (pre, "prefill_tok_s", [p for p in positions if p >= 64])):
            s = [result["at"][str(p)][key] for p in ps]
            med = [x["median"] for x in s]
            err = [[m - x["min"] for m, x in zip(med, s)], [x["max"] - m for m, x in zip(med, s)]]
            ax.errorbar(ps, med, yerr=err, marker="o", capsize=3, label=name)
    bound = report["bandwidth_bound"]
    dec.plot(positions, [bound["tok_s"][str(p)] for p in positions], "k--", lw=1,
             label=f"bandwidth bound ({bound['memory_bandwidth_gbs']:.0f} GB/s)")
    dec.set_title("decode tok/s at context position")
    pre.set_title("prefill tok/s of a prompt of that length")
    for ax in (dec, pre):
        ax.set_xlabel("context position (tokens)")
        ax.set_ylabel("tokens / s")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    h = report["host"]
    fig.suptitle(f"{next(iter(report['bundles'].values()))['model']}: {h['cpu']}, {h['threads']} threads "
                 f"(medians of {report['workload']['rounds']} interleaved rounds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", nargs="*", type=Path, help="bundle folders written by `edgepack export`")
    p.add_argument("--gguf", type=Path, help="GGUF for llama.cpp and genai (default: the embedded default model)")
    p.add_argument("--genai", type=Path, help="onnxruntime-genai int4 model folder, built there from the GGUF if "
                   "missing [default: ~/.cache/edgepack/genai-int4-GGUFNAME]")
    p.add_argument("--no-genai", action="store_true", help="leave onnxruntime-genai out")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=128, help="approximate rendered chat prompt length")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens after the chat prompt")
    p.add_argument("--positions", default="1,512,1500", help="context positions to prefill and decode at")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded at each position")
    p.add_argument("--chart", type=Path, help="write a PNG of tok/s against context position")
    p.add_argument("--json", action="store_true", help="print the figures as JSON instead of the table")
    p.add_argument("--out", type=Path, help="also write the figures as JSON to FILE")
    p.add_argument("--child", choices=list(engines.ENGINES), help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        print(json.dumps(engines.measure(args.child, json.loads(args.job))))
        return 0
    if not args.bundle:
        p.error("BUNDLE is required")

    started = time.perf_counter()
    log = sys.stderr
    bundles: dict[str, Path] = {}
    for path in args.bundle:
        label = engine_label(path.resolve())
        bundles[label if label not in bundles else f"{label} ({path.name})"] = path.resolve()
    facts = {label: bundle_facts(path) for label, path in bundles.items()}
    positions = sorted({int(x) for x in args.positions.split(",")})
    max_context = min(f["context_length"] for f in facts.values())
    if positions[-1] + args.decode_tokens + 1 > max_context:
        p.error(f"position {positions[-1]} + {args.decode_tokens} decoded tokens exceeds the bundles' context "
                f"({max_context}); lower --positions or export with a larger --max-context")
    first = next(iter(bundles.values()))
    _, chat_ids = build_prompt(first, args.prompt_tokens)
    job = {"chat_ids": chat_ids, "long_ids": long_context(first, positions[-1]), "positions": positions,
           "new_tokens": args.new_tokens, "decode_tokens": args.decode_tokens, "threads": args.threads,
           "max_context": max_context}

    from edgepack.intake import default_model_path

    gguf = (args.gguf or default_model_path()).resolve()
    kinds: dict[str, tuple[str, str]] = {label: ("edgepack", str(path)) for label, path in bundles.items()}
    has_llama = importlib.util.find_spec("llama_cpp") is not None
    if has_llama:
        kinds[ANCHOR] = ("llama.cpp", str(gguf))
    else:
        print("llama-cpp-python is not installed (pip install -e .[bench]); no anchor", file=log)
    genai_dir = None
    if not args.no_genai and importlib.util.find_spec("onnxruntime_genai") is not None:
        genai_dir = (args.genai or Path.home() / ".cache" / "edgepack" / f"genai-int4-{gguf.stem}").resolve()
        print(f"onnxruntime-genai model: {genai_dir}", file=log)
        kinds[GENAI] = ("genai", str(engines.build_genai(gguf, genai_dir, args.threads)))

    bandwidth = [host_bandwidth(args.threads)]
    runs: dict[str, list[dict[str, Any]]] = {e: [] for e in kinds}
    for r in range(args.rounds):
        for label, (kind, path) in kinds.items():  # alternate engines: the machine is shared and noisy
            result = spawn(kind, {**job, "path": path})
            runs[label].append(result)
            print(f"round {r + 1}/{args.rounds} {label:26}: first token {result['ttft_s']:.2f} s, prefill "
                  f"{result['prefill_tok_s']:6.1f}, decode " + ", ".join(
                      f"@{p} {result['at'][str(p)]['decode_tok_s']:.1f}" for p in positions)
                  + f" tok/s, RSS {result['peak_rss_mb']:.0f} MB, others {result['others_cores']:.2f} cores", file=log)
    bandwidth.append(host_bandwidth(args.threads))

    results = {e: summarize(runs[e], positions) for e in kinds}
    report: dict[str, Any] = {
        "host": host_facts(args.threads),
        "bundles": facts,
        "gguf": {"path": str(gguf), "size_mb": gguf.stat().st_size / 1e6},
        "genai": str(genai_dir) if genai_dir else None,
        "versions": {d: _version(d) for d in ("llama_cpp_python", "onnxruntime_genai", "onnxruntime", "executorch")},
        "workload": {"prompt_tokens": len(chat_ids), "new_tokens": args.new_tokens, "positions": positions,
                     "decode_tokens": args.decode_tokens, "rounds": args.rounds},
        "bandwidth_bound": bandwidth_bound(gguf, next(iter(facts.values()))["config"], positions, max(bandwidth)),
        "results": results,
        "ratios": {e: {o: ratios(results, e, o, positions) for o in (ANCHOR, GENAI) if o in results} for e in bundles},
        "greedy_agreement": {e: common_prefix(runs[e][0]["tokens"], runs[ANCHOR][0]["tokens"])
                             for e in kinds if e != ANCHOR} if has_llama else {},
        "others_cores_median": statistics.median(r["others_cores"] for e in kinds for r in runs[e]),
        "runs": runs,
    }
    report["wall_s"] = time.perf_counter() - started
    if args.chart:
        draw_chart(report, args.chart)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    if args.json:
        print(text)
    else:
        print_report(report)
        print(f"\n({report['wall_s']:.0f} s wall" + (f"; chart {args.chart}" if args.chart else "") + ")")
    return 0 if has_llama else 3


def host_bandwidth(threads: int) -> float:
    """Read bandwidth of this host with `threads` readers (GB/s), as `edgepack profile` measures it."""
    from edgepack.profile_roofline import calibrate

    return calibrate(threads)["memory_bandwidth_gbs"]


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
