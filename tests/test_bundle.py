"""Bundle writing is atomic and reading refuses anything that is not exactly what was written."""

from __future__ import annotations

import json

import pytest

from edgepack.bundle import MANIFEST, read_manifest, write_bundle
from edgepack.errors import EdgepackError


TINY_CONFIG = {
    "architecture": "llama", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2,
    "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True, "attention_bias": False, "max_position_embeddings": 512,
}  # fmt: skip


def make_bundle(path, force=False):
    """A bundle as the reader sees one: every section the runtime reads, files written by hand."""
    with write_bundle(path, force=force) as writer:
        writer.write_text("model.bin", "weights")
        writer.write_json("tokenizer.json", {"vocab": [1, 2, 3]})
        return writer.finish({
            "model": {"name": "x", "config": TINY_CONFIG},
            "backend": {"name": "reference", "program": "model.bin"},
            "context_length": 64,
            "tokenizer": {"file": "tokenizer.json", "eos_ids": [2], "stop_ids": [2]},
        })  # fmt: skip


def test_manifest_lists_every_file_with_size_and_checksum(tmp_path):
    manifest = make_bundle(tmp_path / "b")
    assert set(manifest["files"]) == {"model.bin", "tokenizer.json"}
    assert manifest["files"]["model.bin"]["size"] == len("weights")
    assert len(manifest["files"]["model.bin"]["sha256"]) == 64
    assert manifest["format_version"] == 1 and "torch" in manifest["toolchain"] and manifest["created"]
    assert read_manifest(tmp_path / "b")["files"] == manifest["files"]


def test_failed_export_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError, match="lowering failed"):
        with write_bundle(tmp_path / "b") as writer:
            writer.write_text("model.bin", "half")
            raise RuntimeError("lowering failed")
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_the_previous_bundle(tmp_path):
    make_bundle(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        with write_bundle(tmp_path / "b", force=True) as writer:
            writer.write_text("model.bin", "new")
            raise KeyboardInterrupt
    assert (tmp_path / "b" / "model.bin").read_text() == "weights"
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


@pytest.mark.parametrize("damage", ["modify", "truncate", "delete"])
def test_tampered_file_is_refused(tmp_path, damage):
    make_bundle(tmp_path / "b")
    target = tmp_path / "b" / "model.bin"
    if damage == "modify":
        target.write_text("weightz")
    elif damage == "truncate":
        target.write_text("weig")
    else:
        target.unlink()
    with pytest.raises(EdgepackError, match="model.bin") as err:
        read_manifest(tmp_path / "b")
    assert "re-export" in str(err.value) and "\n" not in str(err.value)


def test_not_a_bundle_and_wrong_version(tmp_path):
    with pytest.raises(EdgepackError, match="does not exist"):
        read_manifest(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdgepackError, match="not an edgepack bundle"):
        read_manifest(tmp_path / "empty")
    make_bundle(tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / MANIFEST).read_text())
    manifest["format_version"] = 99
    (tmp_path / "b" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(EdgepackError, match="format version 99"):
        read_manifest(tmp_path / "b")
