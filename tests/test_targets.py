"""Target data: every device profile loads, has the four budgets and cites every figure it gives."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgepack.cli import main
from edgepack.targets import BUDGET_KEYS, all_targets, get_target

DEVICE_FIGURES = ("cpu_cores", "cpu_fp32_gflops", "memory_bandwidth_gbs", "app_memory_limit_gb")
# SoC ids onnxruntime-qnn accepts (../shared/notes/onnx-and-qnn.md) and the Hexagon arch of each.
QNN_SOCS = {"SC8480XP": 81, "SC8380XP": 73, "SM8750": 79, "SM8650": 75}


def test_every_target_has_budgets_and_cited_figures() -> None:
    targets = all_targets()
    assert {"host", "pixel-9", "iphone-15", "iphone-16-pro", "apple-m4", "snapdragon-x2", "snapdragon-x-elite",
            "snapdragon-8-elite", "snapdragon-8-gen3"} <= set(targets)
    for t in targets.values():
        assert all(t.budgets[k] > 0 for k in BUDGET_KEYS), t.name
        assert "budgets" in t.sources, f"{t.name}: budgets are choices; say so in [sources]"
        if t.hardware.get("measured"):
            continue
        for key in DEVICE_FIGURES:
            assert t.hardware.get(key, 0) > 0, f"{t.name} lacks {key}"
            assert key in t.sources or (key == "cpu_cores" and "soc" in t.sources), f"{t.name}: {key} uncited"
        assert t.soc and "soc" in t.sources and t.ram_gb
        # a budget the OS would kill the app for is no budget
        assert t.budgets["peak_memory_mb"] <= t.hardware["app_memory_limit_gb"] * 1000, t.name
        assert t.hardware["app_memory_limit_gb"] < t.ram_gb


def test_qnn_targets_name_a_soc_the_runtime_accepts() -> None:
    for t in all_targets().values():
        if any(b.startswith("onnx/qnn") for b in t.backends):
            onnx = t.options["onnx"]
            assert QNN_SOCS[onnx["soc_model"]] == onnx["htp_arch"], t.name
            assert t.backends == ("onnx/qnn", "onnx/cpu") and t.default_quant == "int4"


def test_apple_targets_prefer_core_ml_and_fall_back() -> None:
    for name in ("iphone-15", "iphone-16-pro", "apple-m4"):
        t = get_target(name)
        assert t.backends == ("coreml", "executorch/coreml", "executorch/xnnpack")
        assert t.backend_choice(["coreml", "executorch"]) == ("coreml", None)
        assert t.backend_choice(["executorch", "reference"]) == ("executorch", "coreml")


def test_targets_json_lists_budgets_and_sources() -> None:
    result = CliRunner().invoke(main, ["targets", "--json"])
    assert result.exit_code == 0, result.output
    listed = {t["name"]: t for t in json.loads(result.output)}
    assert set(listed) == set(all_targets())
    iphone = listed["iphone-15"]
    assert iphone["budgets"]["peak_memory_mb"] == 2048 and iphone["hardware"]["app_memory_limit_gb"] == 3.0
    assert "estimate" in iphone["sources"]["app_memory_limit_gb"]
    assert listed["snapdragon-x2"]["options"]["onnx"] == {"soc_model": "SC8480XP", "htp_arch": 81}


def test_unknown_target_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["export", "--target", "nokia-3310"])
    assert result.exit_code == 2 and "unknown target 'nokia-3310'" in result.output
