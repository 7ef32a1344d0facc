"""benchmarks/bench.py end to end on a tiny ONNX bundle (real tokenizer, real ONNX Runtime): every engine in
child processes, figures at each context position, the bandwidth bound from the GGUF, JSON and the chart.
Figures are checked for shape and sense, never for speed."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_onnx_bundle

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
POSITIONS = [1, 64, 200]


@pytest.fixture(scope="module")
def bench_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, int]:
    work = tmp_path_factory.mktemp("bench")
    bundle = tiny_onnx_bundle(work)
    out, chart = work / "bench.json", work / "bench.png"
    proc = subprocess.run(
        [sys.executable, str(BENCH), str(bundle), "--rounds", "2", "--prompt-tokens", "40", "--new-tokens", "8",
         "--positions", ",".join(map(str, POSITIONS)), "--decode-tokens", "4", "--no-genai", "--out", str(out),
         "--chart", str(chart)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode in (0, 3), proc.stderr[-2000:]  # 3: llama-cpp-python missing, the bundle is measured
    return json.loads(out.read_text()), chart, proc.returncode


def test_bench_measures_every_position_in_interleaved_fresh_processes(bench_report: tuple[dict, Path, int]) -> None:
    report, chart, code = bench_report
    (label,) = report["bundles"]
    result = report["results"][label]
    assert report["workload"]["positions"] == POSITIONS and report["workload"]["rounds"] == 2
    for p in map(str, POSITIONS):
        s = result["at"][p]["decode_tok_s"]
        assert len(s["runs"]) == 2 and 0 < s["min"] <= s["median"] <= s["max"]
    assert result["ttft_s"]["median"] >= result["load_s"]["median"] > 0  # cold start includes the load
    assert result["peak_rss_long_mb"]["median"] >= result["peak_rss_mb"]["median"] > result["runtime_rss_mb"]["median"]
    assert all(len(r["tokens"]) == 8 for r in report["runs"][label])
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if code == 0:  # llama.cpp ran: the bundle has ratios against it
        assert report["ratios"][label]["llama.cpp"]["decode_tok_s@1"] > 0


def test_bench_bandwidth_bound_counts_the_weights_read_per_token(bench_report: tuple[dict, Path, int]) -> None:
    """SmolLM2's GGUF ties its table to the output layer, so the whole file's tensors are read per token; the
    bound falls as the fp16 KV cache grows."""
    import gguf

    from edgepack.intake import default_model_path

    report, _, _ = bench_report
    bound = report["bandwidth_bound"]
    tensors = sum(int(t.n_bytes) for t in gguf.GGUFReader(default_model_path()).tensors)
    assert bound["weights_read_mb"] == pytest.approx(tensors / 1e6)
    cfg = next(iter(report["bundles"].values()))["config"]
    assert bound["kv_bytes_per_position"] == 2 * cfg["num_layers"] * cfg["num_kv_heads"] * cfg["head_dim"] * 2
    speeds = [bound["tok_s"][str(p)] for p in POSITIONS]
    assert speeds == sorted(speeds, reverse=True) and speeds[0] == pytest.approx(
        bound["memory_bandwidth_gbs"] * 1e9 / (tensors + bound["kv_bytes_per_position"]))


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is not None, reason="llama-cpp-python is installed")
def test_bench_without_its_anchor_exits_3(bench_report: tuple[dict, Path, int]) -> None:
    assert bench_report[2] == 3
