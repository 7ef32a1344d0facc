"""The profile chart: tokens/s against prompt length (measured with min-max bars, projected dashed) and
memory against the target's budget and app limit. A PNG, drawn headless (matplotlib's Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def draw(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured, projected = report["measured"], report["projected"]
    lengths = sorted(measured["by_prompt_length"], key=int)
    xs = [int(n) for n in lengths]
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.4), gridspec_kw={"width_ratios": [3, 2]})
    b = report["bundle"]
    fig.suptitle(f"{b['model']} {b['quantization']} ({b['backend']}/{b['delegate'] or '-'}) - "
                 f"measured on {report['device']}, target {report['target']}", fontsize=11)

    for key, color, label in (("decode_tok_s", "tab:blue", "decode"), ("prefill_tok_s", "tab:orange", "prefill")):
        med = [measured["by_prompt_length"][n][key]["median"] for n in lengths]
        lo = [m - measured["by_prompt_length"][n][key]["min"] for m, n in zip(med, lengths)]
        hi = [measured["by_prompt_length"][n][key]["max"] - m for m, n in zip(med, lengths)]
        speed.errorbar(xs, med, yerr=[lo, hi], marker="o", color=color, capsize=4, label=f"{label}, measured")
        if projected:
            proj = [projected["by_prompt_length"][n].get(key) for n in lengths]
            if all(p is not None for p in proj):
                speed.plot(xs, proj, "s--", color=color, alpha=0.7, label=f"{label}, projected {report['target']}")
    floor = next((x["budget"] for x in report["budgets"] if x["name"] == "decode_tok_s_min"), None)
    if floor:
        speed.axhline(floor, color="tab:red", lw=1, ls=":", label=f"decode budget >= {floor} tok/s")
    speed.set_xscale("log", base=2)
    speed.set_xticks(xs, [str(x) for x in xs])
    speed.set_yscale("log")
    speed.set_xlabel("prompt length (tokens)")
    speed.set_ylabel("tokens / s (log)")
    speed.grid(True, which="both", alpha=0.3)
    speed.legend(fontsize=8)

    bars: list[tuple[str, float, str]] = []
    mem = measured.get("peak_memory") or {}
    if "peak_rss_mb" in mem:
        bars.append(("peak RSS", mem["peak_rss_mb"]["median"], "tab:blue"))
    if "model_mb" in mem:
        bars.append(("bundle's\nown", mem["model_mb"]["median"], "tab:cyan"))
    if mem.get("at_max_context_mb"):
        bars.append(("at max\ncontext", mem["at_max_context_mb"], "tab:purple"))
    budget = next((x for x in report["budgets"] if x["name"] == "peak_memory_mb"), None)
    if projected and budget and budget["value"] is not None:
        bars.append((f"projected\n{report['target']}", budget["value"], "tab:green"))
    fit = report.get("fit") or {}
    if fit.get("estimate"):
        bars.append(("fit\nestimate", fit["estimate"]["memory_mb"], "tab:gray"))
    names = [n for n, _, _ in bars]
    memory.bar(names, [v for _, v, _ in bars], color=[c for _, _, c in bars])
    for i, (_, v, _) in enumerate(bars):
        memory.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    if budget:
        memory.axhline(budget["budget"], color="tab:red", ls="--", lw=1.2, label=f"budget {budget['budget']} MB")
    if fit.get("memory_limit_mb") and (not budget or fit["memory_limit_mb"] != budget["budget"]):
        memory.axhline(fit["memory_limit_mb"], color="black", ls=":", lw=1, label=f"{fit['memory_limit']}")
    memory.set_ylabel("memory (MB)")
    memory.tick_params(axis="x", labelsize=7)
    memory.legend(fontsize=8)
    memory.set_title("memory vs budget", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
