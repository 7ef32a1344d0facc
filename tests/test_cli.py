"""The command line as a user meets it: real subprocesses, exit codes, one-line errors, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def edgepack(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("EDGEPACK_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "edgepack.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )


def assert_clean_error(result: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0], errors[0]


def test_targets_json_lists_every_target():
    result = edgepack("targets", "--json")
    assert result.returncode == 0, result.stderr
    names = {t["name"] for t in json.loads(result.stdout)}
    assert {"host", "pixel-9"} <= names


def test_unknown_target_is_a_usage_error(tmp_path):
    assert_clean_error(edgepack("export", "--target", "nokia-3310", "-o", str(tmp_path / "b")), 2, "nokia-3310", "host")
    assert not (tmp_path / "b").exists()


def test_unknown_preset_is_a_usage_error():
    assert_clean_error(edgepack("export", "--quant", "int3"), 2, "int3", "int4")


def test_activation_ranges_on_a_backend_that_rounds_its_own_way_is_a_usage_error(tmp_path):
    out = str(tmp_path / "b")
    result = edgepack("export", "-t", "host", "--backend", "onnx/cpu", "--activation-ranges", "2", "-o", out)
    assert_clean_error(result, 2, "--activation-ranges", "onnx/cpu", "executorch")
    assert not (tmp_path / "b").exists()


def test_missing_model_path(tmp_path):
    assert_clean_error(edgepack("export", "--model", str(tmp_path / "nope.gguf"), "-o", str(tmp_path / "b")), 2, "nope")
    assert not (tmp_path / "b").exists()


def test_truncated_gguf(tmp_path, default_student):
    from edgepack.intake import default_model_path

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(default_model_path().read_bytes()[: 3 * 1024 * 1024])
    result = edgepack("export", "--model", str(broken), "-o", str(tmp_path / "b"))
    assert_clean_error(result, 1, "broken.gguf")
    assert not (tmp_path / "b").exists() and [p.name for p in tmp_path.iterdir()] == ["broken.gguf"]


def test_folder_without_tokenizer(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert_clean_error(edgepack("export", "--model", str(tmp_path / "ckpt")), 1, "tokenizer")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    (tmp_path / "ckpt" / "tokenizer.json").write_text("{}")
    assert_clean_error(edgepack("export", "--model", str(tmp_path / "ckpt")), 1, "GPT2LMHeadModel", "LlamaForCausalLM")


def test_not_a_bundle(tmp_path):
    assert_clean_error(edgepack("run", str(tmp_path), "hi"), 1, "manifest.json")


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory) -> Path:
    """The default model as a reference bundle with a 48-token context (fast to write, quick to refuse)."""
    out = tmp_path_factory.mktemp("cli") / "ref"
    result = edgepack("export", "--backend", "reference", "--quant", "fp16", "--max-context", "48", "-o", str(out), "--json")
    assert result.returncode == 0, result.stderr
    manifest = json.loads(result.stdout)["manifest"]
    assert manifest["context_length"] == 48 and manifest["backend"]["name"] == "reference"
    return out


def test_prompt_longer_than_context(small_bundle):
    long_prompt = "Tell me everything about the history of Paris and France. " * 10
    assert_clean_error(edgepack("run", str(small_bundle), long_prompt), 1, "context", "--max-context")


def test_inspect_and_tampered_bundle(small_bundle, tmp_path):
    result = edgepack("inspect", str(small_bundle), "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["quantization"]["name"] == "fp16"
    template = small_bundle / "chat_template.jinja"
    original = template.read_text()
    try:
        template.write_text(original + " ")
        assert_clean_error(edgepack("run", str(small_bundle), "hi"), 1, "chat_template.jinja", "checksum")
        assert_clean_error(edgepack("inspect", str(small_bundle)), 1, "checksum")
    finally:
        template.write_text(original)
