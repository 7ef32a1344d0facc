"""The quality gate on a tiny random student with the default model's real tokenizer: a sound export passes
through its real backend, a deliberately broken one (wrong RoPE base, scrambled layer) is rejected and leaves
no bundle, and the figures land in the manifest. Teacher-forcing figures themselves are checked on logits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgepack import quantize, verify
from edgepack.bundle import read_manifest
from edgepack.errors import EdgepackError, UsageError
from edgepack.export import plan_export, run_export
from edgepack.quantize import PRESETS
from edgepack.verify import (
    Agreement,
    Thresholds,
    VerificationFailed,
    compare_logits,
    teacher_forcing,
    thresholds_for,
    verify_bundle,
)

from conftest import random_model, tiny_config, write_student_folder

CONTEXT = 256


@pytest.fixture(scope="module")
def student_folder(tmp_path_factory, default_student) -> Path:
    """A Hugging Face folder: a tiny random Llama over SmolLM2's vocabulary, tokenizer and chat template."""
    folder = tmp_path_factory.mktemp("verify") / "tiny-student"
    cfg = tiny_config(vocab_size=default_student.config.vocab_size, max_position_embeddings=1024)
    return write_student_folder(folder, default_student, cfg, random_model(cfg, max_context=CONTEXT))


def export(folder: Path, out: Path, backend: str = "executorch/xnnpack", quant: str = "fp32", **options):
    plan = plan_export(str(folder), "host", quant=quant, max_context=CONTEXT, output=out, backend=backend, **options)
    return run_export(plan)


# --- faults injected into the export pipeline: a buggy quantization step ---------------------------------


def wrong_rope_base(model):
    """RoPE frequencies for base 1e6 instead of the config's 1e4, baked into the exported program."""
    dim = model.config.head_dim
    model.inv_freq.copy_(1.0 / (1e6 ** (torch.arange(0, dim, 2).float() / dim)))
    return model


def scrambled_layer(model):
    """The last layer's MLP output rows shuffled, as a mis-ordered weight conversion would leave them."""
    weight = model.model.layers[-1].mlp.down_proj.weight
    with torch.no_grad():
        weight.copy_(weight[torch.randperm(weight.shape[0], generator=torch.Generator().manual_seed(0))])
    return model


@pytest.fixture
def broken_quantizer(monkeypatch, request):
    # The module the export lowers, built, then broken here (these tests export fp32: the gate's only
    # reference is then the fp32 model, which this does not touch).
    original = quantize.build_quantized
    monkeypatch.setattr(quantize, "build_quantized", lambda *a, **k: request.param(original(*a, **k)))
    return request.param


# --- through the real backend ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sound_bundle(student_folder, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("verify") / "sound"
    return out, export(student_folder, out)


def test_sound_export_passes_and_records_figures(sound_bundle, student_folder):
    path, manifest = sound_bundle
    section = manifest["verification"]
    assert section["status"] == "passed" and section["failures"] == []
    assert read_manifest(path)["verification"] == section  # recorded in the bundle, checksums still valid
    tf = section["teacher_forcing"]
    assert tf["tokens"] == verify.DEFAULT_EVAL_TOKENS
    assert tf["top1_agreement"] >= 0.99 and tf["mean_kl"] < 1e-4 and abs(tf["perplexity_ratio"] - 1) < 1e-3
    assert section["tokenizer"] == {"ids_match": True, "decode_match": True, "round_trip": True, "chat_template_match": True}
    greedy = section["greedy"]
    assert len(greedy["prompts"]) == len(verify.CHAT_PROMPTS)
    assert greedy["matched"] == greedy["compared"] > 0  # fp32: the same tokens
    assert section["reference"]["model"] == str(student_folder)
    assert section["backend"] == "executorch/xnnpack"


# The RoPE frequencies live in the program only where the graph is lowered (ExecuTorch); a reference bundle
# stores weights, so the scrambled layer is the fault that survives there (and the faster export).
@pytest.mark.parametrize(
    "broken_quantizer, backend",
    [(wrong_rope_base, "executorch/xnnpack"), (scrambled_layer, "reference")],
    indirect=["broken_quantizer"],
)
def test_broken_export_is_rejected_and_kept_aside(broken_quantizer, backend, student_folder, tmp_path):
    out = tmp_path / "broken"
    with pytest.raises(VerificationFailed) as failed:
        export(student_folder, out, backend=backend)
    message = str(failed.value)
    assert "failed verification" in message and f"fp32 on {backend}" in message and "\n" not in message
    assert "top-1 agreement" in message or "mean KL" in message
    assert "the lowering is broken" in message and failed.value.report["broken"] is True  # fp32: any miss is
    assert failed.value.report["teacher_forcing"]["mean_kl"] > 1e-3
    # Nothing at the destination; the finished bundle beside it, marked failed, so no retry re-exports it.
    assert [p.name for p in tmp_path.iterdir()] == ["broken.failed"]
    assert f"kept for inspection at {tmp_path / 'broken.failed'}" in message
    assert read_manifest(tmp_path / "broken.failed")["verification"]["status"] == "failed"


def test_fidelity_catches_a_broken_lowering_of_quantized_weights(student_folder, tmp_path, monkeypatch):
    """int4: the bundle is also scored against the torch model running its own quantized weights. A lowering
    bug (RoPE's cos and sin swapped in the ONNX graph) fails that check and is called broken."""
    from edgepack.exporters import onnx_graph

    original = onnx_graph._gqa_positions
    monkeypatch.setattr(onnx_graph, "_gqa_positions", lambda *a: (lambda p: (p[1], p[0], *p[2:]))(original(*a)))
    with pytest.raises(VerificationFailed) as failed:
        export(student_folder, tmp_path / "swapped", backend="onnx/cpu", quant="int4")
    report = failed.value.report
    assert report["broken"] is True and any(f.startswith("fidelity ") for f in report["failures"])
    assert "the lowering is broken" in str(failed.value)
    assert report["fidelity"]["teacher_forcing"]["mean_kl"] > 0.02  # judged on the distributions


@pytest.fixture(scope="module")
def sharp_student_folder(tmp_path_factory, default_student) -> Path:
    """The tiny student with its final norm scaled x4: peaked next-token distributions, as a trained model has.
    A random model's are nearly flat, where even a broken lowering moves KL by only ~0.02."""
    folder = tmp_path_factory.mktemp("verify") / "sharp-student"
    cfg = tiny_config(vocab_size=default_student.config.vocab_size, max_position_embeddings=1024)
    model = random_model(cfg, max_context=CONTEXT)
    with torch.no_grad():
        model.model.norm.weight.mul_(4.0)
    return write_student_folder(folder, default_student, cfg, model)


def test_fidelity_catches_a_broken_executorch_lowering(sharp_student_folder, tmp_path, monkeypatch):
    """ExecuTorch int4: RoPE's cos and sin swapped in the program's own tables (the torch model's stay right)
    fail the same-weights check and are called broken (measured KL 0.30; a sound lowering 0.0009)."""
    from edgepack.exporters import executorch as lowering

    original = lowering.RopeTables.forward
    monkeypatch.setattr(lowering.RopeTables, "forward", lambda self, p: original(self, p)[::-1])
    with pytest.raises(VerificationFailed) as failed:
        export(sharp_student_folder, tmp_path / "swapped", quant="int4")
    report = failed.value.report
    assert report["broken"] is True and any(f.startswith("fidelity mean KL") for f in report["failures"])
    assert report["fidelity"]["teacher_forcing"]["mean_kl"] > 0.1


def test_a_sound_executorch_int4_lowering_passes_fidelity(sharp_student_folder, tmp_path):
    export(sharp_student_folder, tmp_path / "int4", quant="int4", verify=False)
    report = verify_bundle(tmp_path / "int4", eval_tokens=256)
    assert report.fidelity_thresholds is not None and report.fidelity is not None
    assert report.fidelity.mean_kl < report.fidelity_thresholds.max_kl / 10  # measured 0.0009
    assert not report.broken and not any(f.startswith("fidelity") for f in report.failures)


def test_a_sound_int4_lowering_has_high_fidelity(student_folder, tmp_path):
    export(student_folder, tmp_path / "int4", backend="onnx/cpu", quant="int4", verify=False)
    report = verify_bundle(tmp_path / "int4", eval_tokens=128)
    assert report.fidelity is not None and report.fidelity_thresholds is not None
    assert report.fidelity.top1_agreement >= report.fidelity_thresholds.min_top1
    assert not report.broken and not any(f.startswith("fidelity") for f in report.failures)


def test_quantization_loss_is_not_called_broken(tmp_path):
    """What a real student at int4 can give (Qwen2.5-Coder-0.5B: 88% top-1 where the default model gives 97%)
    is said as quantization loss with what to try, and the kept bundle is offered as it is."""
    report = {"preset": "int4", "backend": "onnx/cpu", "broken": False,
              "failures": ["top-1 agreement 80.0% < 85.0%"]}
    failed = VerificationFailed(report)
    failed.kept(tmp_path / "qwen.failed")
    message = str(failed)
    assert "broken" not in message and "int4 quantization loses more on this model" in message
    assert "-q int8" in message and f"mv {tmp_path / 'qwen.failed'} {tmp_path / 'qwen'}" in message


@pytest.mark.parametrize("broken_quantizer", [scrambled_layer], indirect=True)
def test_keep_failed_keeps_the_bundle_marked_failed(broken_quantizer, student_folder, tmp_path):
    out = tmp_path / "kept"
    with pytest.raises(VerificationFailed, match=f"kept for inspection at {out}$"):
        export(student_folder, out, backend="reference", keep_failed=True)
    assert read_manifest(out)["verification"]["status"] == "failed"


@pytest.mark.parametrize("broken_quantizer", [scrambled_layer], indirect=True)
def test_no_verify_skips_the_gate_and_says_so(broken_quantizer, student_folder, tmp_path):
    manifest = export(student_folder, tmp_path / "unchecked", backend="reference", verify=False)
    assert manifest["verification"] == {"status": "skipped", "reason": "--no-verify"}
    # ... and `edgepack verify` finds the fault afterwards.
    report = verify_bundle(tmp_path / "unchecked", eval_tokens=64)
    assert not report.passed and report.failures


def test_verify_command_json_and_text(sound_bundle, tmp_path):
    path, manifest = sound_bundle
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"Sentence number {i} says something about the weather." for i in range(200)))
    result = subprocess.run(
        [sys.executable, "-m", "edgepack.cli", "verify", str(path), "--text", str(text), "--tokens", "64", "--json"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["status"] == "passed" and report["text"]["source"] == str(text) and report["text"]["tokens"] == 64
    assert report["teacher_forcing"]["top1_agreement"] >= 0.99


def test_wrong_reference_is_refused_before_scoring(sound_bundle, tmp_path, default_student):
    from edgepack.intake import default_model_path

    with pytest.raises(UsageError, match="not the bundle's model"):
        verify_bundle(sound_bundle[0], reference=str(default_model_path()))


def test_missing_text_file_is_a_clear_error(sound_bundle, tmp_path):
    with pytest.raises(EdgepackError, match="does not exist"):
        verify_bundle(sound_bundle[0], text_file=tmp_path / "nope.txt")


# --- figures and thresholds --------------------------------------------------------------------------------


def test_compare_logits_figures():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 20)).astype(np.float32)
    ids = rng.integers(0, 20, size=50)
    same = compare_logits(logits, logits, ids)
    assert same.top1_agreement == 1.0 and abs(same.mean_kl) < 1e-12 and same.perplexity_ratio == pytest.approx(1.0)
    flipped = compare_logits(logits, -logits, ids)
    assert flipped.top1_agreement == 0.0 and flipped.mean_kl > 1.0 and flipped.perplexity_ratio > 1.0
    assert flipped.tokens == 49


class _Fixed:
    """A scorer that looks up fixed per-position logits, so windowing can be checked against one pass."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = table

    def score(self, ids):
        return self.table[np.asarray(ids)]


def test_windowed_teacher_forcing_predicts_every_token_once():
    rng = np.random.default_rng(1)
    ref, cand = _Fixed(rng.normal(size=(30, 30))), _Fixed(rng.normal(size=(30, 30)))
    ids = rng.permutation(30)[:25]
    whole = teacher_forcing(ref, cand, ids)
    windowed = teacher_forcing(ref, cand, ids, window=7)
    assert windowed.tokens == whole.tokens == 24
    assert windowed.mean_kl == pytest.approx(whole.mean_kl) and windowed.top1_agreement == whole.top1_agreement


def test_every_preset_has_thresholds_and_they_tighten_with_precision():
    found = {name: thresholds_for(name, "executorch", "xnnpack") for name in PRESETS}
    order = ["fp32", "fp16", "int8", "int4"]
    for looser, tighter in zip(order[1:], order):
        assert found[tighter].min_top1 >= found[looser].min_top1
        assert found[tighter].max_kl <= found[looser].max_kl
    with pytest.raises(EdgepackError, match="thresholds.toml"):
        thresholds_for("int3", "executorch")


def test_thresholds_name_what_failed():
    bad = Agreement(tokens=10, top1_agreement=0.5, mean_kl=2.0, perplexity_reference=10.0, perplexity_candidate=30.0)
    failures = Thresholds(min_top1=0.9, max_kl=0.1, max_ppl_ratio=1.1).failures(bad)
    assert failures == ["top-1 agreement 50.0% < 90.0%", "mean KL 2 > 0.1", "perplexity ratio 3.000 > 1.1"]


def test_default_text_is_long_real_prose(default_student):
    from tokenizers import Tokenizer

    from edgepack.evaltext import default_text

    text = default_text()
    tokens = Tokenizer.from_str(default_student.tokenizer_files["tokenizer.json"].decode()).encode(text).ids
    assert len(tokens) >= 4000 and ">>>" not in text and "::=" not in text
    assert text == default_text()  # deterministic: figures from two machines compare


def test_backend_override_loosens_one_backend_only():
    import tomllib

    table = tomllib.loads(
        '[int4]\nmin_top1 = 0.85\nmax_kl = 0.2\nmax_ppl_ratio = 1.1\n'
        '[int4.backends."executorch/qnn"]\nmin_top1 = 0.8\n'
    )
    assert thresholds_for("int4", "executorch", "qnn", table) == Thresholds(0.8, 0.2, 1.1)
    assert thresholds_for("int4", "executorch", "xnnpack", table) == Thresholds(0.85, 0.2, 1.1)


def test_backend_that_cannot_run_here_is_named(sound_bundle, tmp_path):
    import shutil

    from edgepack.verify import BackendUnavailable

    copy = Path(shutil.copytree(sound_bundle[0], tmp_path / "elsewhere"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["backend"]["name"] = "npu-of-the-future"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BackendUnavailable, match="npu-of-the-future backend here"):
        verify_bundle(copy, eval_tokens=32)


def test_verify_scores_the_backend_asked_for(student_folder, tmp_path):
    """`edgepack verify --backend` scores another runtime of the bundle; one it lacks is one clear error."""
    out = tmp_path / "onnx"
    export(student_folder, out, backend="onnx/cpu", verify=False)
    report = verify_bundle(out, eval_tokens=64, backend_override="onnx/cpu")
    assert report.backend == "onnx/cpu" and report.passed
    with pytest.raises(EdgepackError, match="has no NPU models"):
        verify_bundle(out, eval_tokens=64, backend_override="onnx/qnn")
