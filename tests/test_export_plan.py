"""What `plan_export` decides before any weight is read."""

from __future__ import annotations

from edgepack.export import plan_export
from edgepack.targets import get_target

from conftest import random_model, tiny_config, write_student_folder


def test_target_context_is_capped_at_the_models_maximum(tmp_path, default_student):
    """A model trained on fewer positions than the target's default context exports at its own maximum;
    an explicit --max-context is kept as given (and checked against the model when it loads)."""
    cfg = tiny_config(vocab_size=default_student.config.vocab_size, max_position_embeddings=512)
    folder = write_student_folder(tmp_path / "student", default_student, cfg, random_model(cfg, max_context=64))
    assert get_target("host").default_context > 512
    plan = plan_export(str(folder), "host", quant="fp32", output=tmp_path / "out")
    assert plan.max_context == 512 and plan.describe()["max_context"] == "512 (the model's maximum)"
    explicit = plan_export(str(folder), "host", quant="fp32", max_context=256, output=tmp_path / "out")
    assert explicit.max_context == 256 and explicit.context_from == "--max-context"


def test_snapdragon_npu_bundle_has_one_context():
    """The NPU graphs are static: the bundle's context (manifest, inspect, CPU model) is theirs, not the
    target's 4096, and a longer --max-context is refused before any work."""
    import pytest

    from edgepack.errors import UsageError

    plan = plan_export(None, "snapdragon-x2", output="/tmp/edgepack-never-written")
    assert plan.backend == "onnx" and plan.delegate == "qnn"
    assert plan.max_context == 1024 and plan.context_from == "the onnx/qnn limit"
    with pytest.raises(UsageError, match="exceeds what onnx/qnn builds for snapdragon-x2 \\(1024\\)"):
        plan_export(None, "snapdragon-x2", max_context=4096, output="/tmp/edgepack-never-written")
    cpu = plan_export(None, "snapdragon-x2", backend="onnx/cpu", output="/tmp/edgepack-never-written")
    assert cpu.max_context == 4096  # the CPU flavour keeps the target's default
