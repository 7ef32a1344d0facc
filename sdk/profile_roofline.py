"""Roofline projection: what a bundle measured on this host would do on a target device.

Decode reads every weight once per token (plus the KV cache so far), so it is bound by memory bandwidth;
prefill pushes a chunk of tokens through each weight, so it is bound by compute. This host's own peak
bandwidth and matmul throughput are measured (`calibrate`), the bundle's measured speed divided by the
host's bound gives the efficiency the runtime reaches, and that efficiency times the target's bound is the
projection. Projections are labelled as such in every report; they assume the device runs the same
program with the same efficiency, which a real phone (thermal limits, big.LITTLE scheduling) may not.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from typing import Any

import numpy as np

from edgepack.fit import kv_cache_bytes, weight_bytes
from edgepack.model import ModelConfig
from edgepack.presets import QuantPreset
from edgepack.targets import Target

ACCELERATOR_DELEGATES = {"qnn", "coreml", "ane", "htp"}  # delegates that run on the NPU, not the CPU cores


def calibrate(threads: int, size_mb: int = 256, repeats: int = 5) -> dict[str, float]:
    """This host's read bandwidth (GB/s, `threads` readers over arrays far larger than any cache) and fp32
    matmul throughput (GFLOP/s with `threads` BLAS threads: set OPENBLAS_NUM_THREADS before numpy loads)."""
    n = size_mb * 2**20 // 8
    data = np.ones(n, dtype=np.float64)
    parts = np.array_split(data, threads)
    sink = [0.0] * threads

    def read(i: int) -> None:
        sink[i] = float(np.add.reduce(parts[i]))  # numpy releases the GIL inside the reduction

    bandwidth = []
    for _ in range(repeats):
        workers = [threading.Thread(target=read, args=(i,)) for i in range(threads)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        bandwidth.append(data.nbytes / (time.perf_counter() - t0) / 1e9)
    del data, parts
    a = np.random.default_rng(0).standard_normal((1024, 1024), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((1024, 1024), dtype=np.float32)
    a @ b  # warm up BLAS and its threads
    flops = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        flops.append(4 * 2 * 1024**3 / (time.perf_counter() - t0) / 1e9)
    return {
        "memory_bandwidth_gbs": max(bandwidth),  # peak: what the roofline's ceiling is
        "memory_bandwidth_gbs_median": statistics.median(bandwidth),
        "fp32_gflops": max(flops),
        "fp32_gflops_median": statistics.median(flops),
        "threads": threads,
    }


def decode_bytes_per_token(cfg: ModelConfig, preset: QuantPreset, position: int) -> float:
    """Bytes read to produce one token at `position`: every weight except the embedding table (one row is
    gathered), plus the KV cache written so far."""
    parts = weight_bytes(cfg, preset)
    read = sum(v for k, v in parts.items() if k != "embedding")
    if "lm_head" not in parts:  # a tied table is also the output layer: read in full
        read += parts["embedding"]
    return read + kv_cache_bytes(cfg, preset, position)


def flops_per_token(cfg: ModelConfig, position: int) -> float:
    """Multiply-adds x 2 of one token through the matmuls and attention over `position` earlier tokens."""
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    matmul = h * q + 2 * h * kv + q * h + 3 * h * cfg.intermediate_size
    attention = 2 * cfg.num_heads * cfg.head_dim * position
    return 2.0 * (cfg.num_layers * (matmul + attention) + cfg.vocab_size * h)


def target_compute_gflops(target: Target, delegate: str | None) -> tuple[float | None, str]:
    """The target's peak for the unit the bundle's delegate runs on: NPU TOPS or the CPU cores' GFLOP/s."""
    hw = target.hardware
    if delegate in ACCELERATOR_DELEGATES and hw.get("accelerator_tops"):
        return float(hw["accelerator_tops"]) * 1000, f"{hw.get('accelerator', 'accelerator')} {hw['accelerator_tops']} TOPS"
    if hw.get("cpu_fp32_gflops"):
        return float(hw["cpu_fp32_gflops"]), f"CPU {hw['cpu_fp32_gflops']} GFLOP/s (fp32 peak, all cores)"
    return None, "no compute figure"


def project(
    measured: dict[str, Any],
    host: dict[str, float],
    target: Target,
    cfg: ModelConfig,
    preset: QuantPreset,
    delegate: str | None,
    runtime_overhead_mb: float,
) -> dict[str, Any]:
    """Projected figures of `target` per prompt length, from the host's measured medians and calibration."""
    bandwidth = target.hardware.get("memory_bandwidth_gbs")
    compute, compute_what = target_compute_gflops(target, delegate)
    out: dict[str, Any] = {
        "kind": "projected",
        "method": "roofline: decode = efficiency x bandwidth / bytes per token; prefill = efficiency x compute / "
        "FLOPs per token; efficiency = host measured / host bound",
        "target_memory_bandwidth_gbs": bandwidth,
        "target_compute_gflops": compute,
        "target_compute": compute_what,
        "by_prompt_length": {},
    }
    for length, m in measured["by_prompt_length"].items():
        n = int(length)
        row: dict[str, Any] = {}
        decode = m["decode_tok_s"]["median"]
        bytes_tok = decode_bytes_per_token(cfg, preset, n)
        host_decode_bound = host["memory_bandwidth_gbs"] * 1e9 / bytes_tok
        row["decode_bytes_per_token_mb"] = round(bytes_tok / 1e6, 2)
        row["host_decode_bound_tok_s"] = host_decode_bound
        row["host_decode_efficiency"] = decode / host_decode_bound
        if bandwidth:
            bound = bandwidth * 1e9 / bytes_tok
            row["decode_bound_tok_s"] = bound
            row["decode_tok_s"] = row["host_decode_efficiency"] * bound
        prefill = m["prefill_tok_s"]["median"]
        flops = flops_per_token(cfg, n // 2)  # the average position of a prompt of n tokens
        host_prefill_bound = host["fp32_gflops"] * 1e9 / flops
        row["prefill_flops_per_token_g"] = round(flops / 1e9, 3)
        row["host_prefill_efficiency"] = prefill / host_prefill_bound
        if compute:
            bound = compute * 1e9 / flops
            row["prefill_bound_tok_s"] = bound
            row["prefill_tok_s"] = row["host_prefill_efficiency"] * bound
            row["ttft_ms"] = 1000 * n / row["prefill_tok_s"]
        out["by_prompt_length"][length] = row
    model_mb = measured["peak_memory"]["model_mb"]["median"]
    out["peak_memory_mb"] = model_mb + runtime_overhead_mb
    out["peak_memory_note"] = (
        f"measured memory of the bundle on this host ({model_mb:.0f} MB above the runtime's own baseline) + "
        f"{runtime_overhead_mb:.0f} MB runtime overhead on device (edgepack.fit estimate)"
    )
    return out


def host_threads() -> int:
    return int(os.environ.get("EDGEPACK_THREADS") or 2)
