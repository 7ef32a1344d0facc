"""`edgepack profile`: a real (tiny) bundle measured through its real backend, its report, budgets and
chart; the device paths' command construction and the parsers of real runner / AI Hub output."""

from __future__ import annotations

import json
import shlex
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepack.cli import main
from edgepack.errors import EdgepackError, UsageError
from edgepack.profile import check_budgets, profile_bundle, write_report
from edgepack.profile_device import (
    llama_runner_command,
    parse_device,
    parse_llama_runner,
    parse_qai_hub_profile,
    push_commands,
    run_adb,
    run_qai_hub,
)
from edgepack.targets import Target, get_target
from tests.conftest import tiny_folder_with_default_tokenizer

DATA = Path(__file__).parent / "data"
LENGTHS = [16, 48]


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with SmolLM2's real tokenizer, exported by `edgepack export` (reference backend)."""
    from edgepack.export import plan_export, run_export

    folder = tiny_folder_with_default_tokenizer(tmp_path_factory.mktemp("tiny_hf"))
    out = tmp_path_factory.mktemp("tiny_bundle") / "bundle"
    run_export(plan_export(str(folder), "host", "fp32", 256, out, backend="reference", verify=False))
    return out


@pytest.fixture(scope="module")
def host_report(tiny_bundle: Path) -> dict:
    return profile_bundle(tiny_bundle, "host", LENGTHS, runs=2, new_tokens=8)


def test_profile_measures_and_reports(host_report: dict, tmp_path: Path) -> None:
    report = host_report
    m = report["measured"]
    assert report["schema"] == "edgepack-profile/1" and report["projected"] is None
    for n in map(str, LENGTHS):
        for key in ("ttft_ms", "prefill_tok_s", "decode_tok_s"):
            s = m["by_prompt_length"][n][key]
            assert len(s["runs"]) == 2 and s["min"] <= s["median"] <= s["max"] and s["min"] > 0
    mem = m["peak_memory"]
    assert mem["peak_rss_mb"]["median"] > mem["baseline_rss_mb"]["median"] > 0
    assert mem["at_max_context_mb"] >= mem["peak_rss_mb"]["median"]
    cal = report["host"]["calibration"]
    assert cal["memory_bandwidth_gbs"] > 0.5 and cal["fp32_gflops"] > 1
    assert [b["name"] for b in report["budgets"]] == ["bundle_mb", "peak_memory_mb", "ttft_ms_128", "decode_tok_s_min"]
    assert report["budgets"][2]["passed"] is None  # no 128-token prompt in this run: reported, not failed
    path = write_report(report, tmp_path / "out")
    assert json.loads(path.read_text())["budgets"] == report["budgets"]
    png = (tmp_path / "out" / "chart.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24])[0] > 600


def test_projection_scales_with_the_target_bandwidth(host_report: dict, tiny_bundle: Path) -> None:
    from edgepack.model import ModelConfig
    from edgepack.profile_roofline import project
    from edgepack.quantize import get_preset

    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    host = host_report["host"]["calibration"]
    proj = project(host_report["measured"], host, get_target("pixel-9"), ModelConfig(**manifest["model"]["config"]),
                   get_preset("fp32"), None, 60)
    for n in map(str, LENGTHS):
        row, measured = proj["by_prompt_length"][n], host_report["measured"]["by_prompt_length"][n]
        # efficiency x bound = the measured speed scaled by the ratio of the two machines' peaks
        assert row["decode_tok_s"] == pytest.approx(measured["decode_tok_s"]["median"] * 68 / host["memory_bandwidth_gbs"])
        assert row["prefill_tok_s"] == pytest.approx(measured["prefill_tok_s"]["median"] * 285 / host["fp32_gflops"])
        assert row["decode_tok_s"] < row["decode_bound_tok_s"] or row["host_decode_efficiency"] > 1
    assert proj["peak_memory_mb"] == pytest.approx(host_report["measured"]["peak_memory"]["model_mb"]["median"] + 60)


def test_failed_budget_fails_the_report(host_report: dict) -> None:
    strict = Target("strict", "", "linux", ("reference",), "fp32", 256,
                    budgets={"bundle_mb": 1, "peak_memory_mb": 1, "ttft_ms_128": 1, "decode_tok_s_min": 1e9})
    lines = {b["name"]: b["passed"] for b in check_budgets(host_report, strict)}
    assert lines == {"bundle_mb": False, "peak_memory_mb": False, "ttft_ms_128": None, "decode_tok_s_min": False}


def test_cli_profile_prints_budget_lines(tiny_bundle: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["profile", str(tiny_bundle), "--prompt-lengths", "16", "--runs", "1",
                                       "--new-tokens", "4", "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert "PASS bundle_mb" in result.output and "n/a  ttft_ms_128" in result.output
    assert (tmp_path / "p" / "report.json").is_file() and (tmp_path / "p" / "chart.png").is_file()


def test_bad_input_fails_before_any_run(tiny_bundle: Path) -> None:
    with pytest.raises(UsageError, match="do not fit the bundle's context of 256"):
        profile_bundle(tiny_bundle, "host", [200], runs=1, new_tokens=128)
    result = CliRunner().invoke(main, ["profile", str(tiny_bundle), "--prompt-lengths", "a,b"])
    assert result.exit_code == 2 and "is not a list of numbers" in result.output
    result = CliRunner().invoke(main, ["profile", str(tiny_bundle), "--device", "usb"])
    assert result.exit_code == 2 and "adb:SERIAL or qai-hub:DEVICE_NAME" in result.output


# --- real hardware: what can be checked without it -----------------------------------------------------------


@pytest.mark.parametrize(
    "sample, expected",
    [  # the runner's own printed rates (stats.h) for the same run: ours must agree with them
        ("executorch_llama_main_galaxy_s24.txt",
         {"prompt_tokens": 14, "generated_tokens": 54, "load_s": 2.277, "ttft_ms": 164.0,
          "prefill_tok_s": 85.365854, "decode_tok_s": 52.682927, "peak_rss_mb": None}),
        ("executorch_llama_main_android_xnnpack.txt",
         {"prompt_tokens": 5, "generated_tokens": 114, "load_s": 3.926, "ttft_ms": 102.0,
          "prefill_tok_s": 49.019608, "decode_tok_s": 39.296794, "peak_rss_mb": 1223.152344 * 1.048576}),
    ],
)
def test_parse_real_llama_runner_output(sample: str, expected: dict) -> None:
    got = parse_llama_runner((DATA / sample).read_text())
    for key, value in expected.items():
        assert got[key] == (None if value is None else pytest.approx(value, rel=1e-6)), key


def test_runner_output_without_statistics_is_an_error() -> None:
    with pytest.raises(EdgepackError, match="no PyTorchObserver"):
        parse_llama_runner("Segmentation fault\n")


def test_parse_real_qai_hub_profile() -> None:
    got = parse_qai_hub_profile(json.loads((DATA / "qai_hub_profile.json").read_text()))
    assert got["call_ms"] == pytest.approx(3.652) and got["tok_s"] == pytest.approx(1000 / 3.652)
    assert got["peak_memory_mb"] == pytest.approx(166.711296) and got["load_s"] == pytest.approx(1.374293)
    assert got["inference_times_ms"] == [10.003, 4.205] and got["compute_units"] == {"CPU": 1, "NPU": 1}


def test_adb_commands(tiny_bundle: Path) -> None:
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    folder, pushes = push_commands("R58M123", tiny_bundle, manifest, Path("/opt/llama_main"))
    assert folder == "/data/local/tmp/edgepack/bundle"
    assert ["adb", "-s", "R58M123", "push", "/opt/llama_main", f"{folder}/llama_main"] in pushes
    prompt = "It's \"quoted\" $HOME; rm -rf /"
    cmd = llama_runner_command("R58M123", folder, prompt, 256, 4)
    assert cmd[:4] == ["adb", "-s", "R58M123", "shell"]
    remote = shlex.split(cmd[4])  # what the device's shell sees: the prompt stays one argument, unexpanded
    assert remote[remote.index("--prompt") + 1] == prompt
    assert remote[remote.index("--seq_len") + 1] == "256" and "--warmup" in remote


def test_missing_adb_runner_and_device_are_clear_errors(tiny_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    with pytest.raises(UsageError, match="runs ExecuTorch bundles"):
        run_adb("X", tiny_bundle, manifest, [16], 1, 4, 2, None, print)
    manifest["backend"]["name"] = "executorch"
    monkeypatch.delenv("EDGEPACK_LLAMA_RUNNER", raising=False)
    with pytest.raises(EdgepackError, match="llama_main\\) was not found"):
        run_adb("X", tiny_bundle, manifest, [16], 1, 4, 2, None, print)
    runner = tmp_path / "llama_main"
    runner.write_bytes(b"\x7fELF")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no adb on this PATH
    with pytest.raises(EdgepackError, match="adb is not installed"):
        run_adb("X", tiny_bundle, manifest, [16], 1, 4, 2, str(runner), print)


def test_qai_hub_needs_an_onnx_bundle_and_credentials(tiny_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    with pytest.raises(UsageError, match="profiles ONNX / QNN bundles"):
        run_qai_hub("Samsung Galaxy S24", tiny_bundle, manifest, [16], 1, print)
    manifest["backend"]["name"] = "onnx"
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(tmp_path / "absent.ini"))
    with pytest.raises(EdgepackError, match="qai-hub is not installed|credentials are not configured"):
        run_qai_hub("Samsung Galaxy S24", tiny_bundle, manifest, [16], 1, print)


def test_device_spec_parsing() -> None:
    assert parse_device("adb:R58M123") == ("adb", "R58M123")
    assert parse_device("qai-hub:Samsung Galaxy S24 (Family)") == ("qai-hub", "Samsung Galaxy S24 (Family)")
    with pytest.raises(UsageError):
        parse_device("adb:")
