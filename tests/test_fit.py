"""Fit check: estimates that match what the model really allocates, and the acceptance case (a 1.5B Qwen2
config on iphone-15: fp32 rejected with its numbers, int4 accepted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from edgepack.cli import main
from edgepack.errors import EdgepackError
from edgepack.fit import check_fit, gguf_wide_weights, kv_cache_bytes, peek_config, weight_bytes
from edgepack.model import ModelConfig, build_model
from edgepack.quantize import get_preset
from edgepack.targets import get_target
from tests.conftest import random_model, tiny_config

# DeepSeek-R1-Distill-Qwen-1.5B's config.json (the shape only; no weights are needed for the check).
QWEN_1_5B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960,
    "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
    "tie_word_embeddings": False, "max_position_embeddings": 131072, "rope_theta": 10000, "rms_norm_eps": 1e-6,
}


def qwen_1_5b() -> ModelConfig:
    return ModelConfig.from_hf(QWEN_1_5B)


def test_qwen_1_5b_fp32_does_not_fit_iphone_15_and_int4_does(capsys) -> None:
    target = get_target("iphone-15")
    fp32 = check_fit(qwen_1_5b(), get_preset("fp32"), target, 2048)
    int4 = check_fit(qwen_1_5b(), get_preset("int4"), target, 2048)
    print(fp32.summary(), int4.summary(), sep="\n")  # the numbers behind both, in the test log
    assert not fp32.fits and int4.fits
    assert 7.0e9 < fp32.estimate.weight_bytes < 7.2e9  # 1.78 B parameters x 4 bytes
    assert int4.estimate.memory < 2048e6 < fp32.estimate.memory
    with pytest.raises(EdgepackError) as err:
        fp32.raise_if_not_fits()
    message = str(err.value)
    assert "fp32 does not fit iphone-15" in message and "MB over the 2048 MB peak-memory budget" in message
    assert "--quant int4 fits" in message  # the proposal names what would fit


def test_export_refuses_before_reading_weights(tmp_path: Path) -> None:
    """A folder with only config.json: fp32 fails on the fit check; int4 passes it and only then fails on the
    missing weights, proving the check ran first and cost nothing."""
    (tmp_path / "config.json").write_text(json.dumps(QWEN_1_5B))
    runner = CliRunner()
    fp32 = runner.invoke(main, ["export", "-m", str(tmp_path), "-t", "iphone-15", "-q", "fp32", "-o", str(tmp_path / "o")])
    assert fp32.exit_code == 1 and "fp32 does not fit iphone-15: needs 7" in fp32.output
    int4 = runner.invoke(main, ["export", "-m", str(tmp_path), "-t", "iphone-15", "-q", "int4", "-o", str(tmp_path / "o")])
    assert "does not fit" not in int4.output and "has no *.safetensors weights" in int4.output
    assert not (tmp_path / "o").exists()


def test_shorter_context_is_proposed_when_it_is_what_fits() -> None:
    target = get_target("iphone-15")
    report = check_fit(qwen_1_5b(), get_preset("int4"), target, 32768)
    assert not report.fits and report.estimate.kv_cache > 1.8e9
    assert any(p.startswith("--max-context") for p in report.proposals)


@pytest.mark.parametrize("tied", [True, False])
def test_fp32_weights_and_kv_cache_match_the_built_model(tied: bool) -> None:
    cfg = tiny_config("qwen2", tie_word_embeddings=tied)
    model = random_model(cfg, max_context=96)
    params = {id(p): p for p in model.parameters()}  # a tied table counted once
    assert sum(weight_bytes(cfg, get_preset("fp32")).values()) == sum(p.numel() * 4 for p in params.values())
    caches = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if ".kv_cache." in n)
    assert kv_cache_bytes(cfg, get_preset("fp32"), 96) == caches


def test_npu_bundle_counts_its_context_binaries() -> None:
    """A Snapdragon NPU bundle carries two QNN context binaries besides the CPU model: a 1.5B student's is
    over a phone's 2 GB bundle budget, and the fit check says so before any export starts."""
    target = get_target("snapdragon-8-elite")
    cpu_only = check_fit(qwen_1_5b(), get_preset("int4"), target, 2048, "onnx/cpu")
    with_npu = check_fit(qwen_1_5b(), get_preset("int4"), target, 2048, "onnx/qnn")
    assert cpu_only.fits and cpu_only.estimate.bundle < 1.5e9
    assert with_npu.estimate.bundle > cpu_only.estimate.bundle + 2 * 1.78e9  # two graphs, 8-bit weights
    assert not with_npu.fits
    with pytest.raises(EdgepackError, match="bundle budget"):
        with_npu.raise_if_not_fits()


def test_int4_estimate_matches_the_quantized_tensors() -> None:
    """Bytes of the torchao tensors apply_preset builds: int4 codes count half a byte, scales in full."""
    from edgepack.quantize import apply_preset

    cfg = tiny_config()
    model = apply_preset(build_model(cfg, random_model(cfg).state_dict(), 64), get_preset("int4"))
    stored = _stored_bytes(model)
    estimate = sum(weight_bytes(cfg, get_preset("int4")).values())
    assert abs(estimate - stored) / stored < 0.02, (estimate, stored)


def test_two_range_estimate_counts_the_anchor_blocks() -> None:
    """`--activation-ranges 2`: each linear the program splits stores one zero block of 32 inputs more (codes and
    their block scale); the estimate grows by what the lowered forms grow by."""
    import copy

    from edgepack.exporters.executorch import DynamicQuantLinear, XnnpackProgram
    from edgepack.quantize import apply_preset

    def forms_bytes(program: torch.nn.Module) -> float:
        return sum(m.qdata.numel() * (0.5 if m.qmin == -8 else 1) + m.scale.numel() * 4
                   for m in program.modules() if isinstance(m, DynamicQuantLinear))

    cfg = tiny_config()
    one, two = get_preset("int4"), get_preset("int4").with_activation_ranges(2)
    model = apply_preset(build_model(cfg, random_model(cfg).state_dict(), 64), two)
    grown = forms_bytes(XnnpackProgram(copy.deepcopy(model), ranges=2)) - forms_bytes(XnnpackProgram(model))
    estimated = sum(weight_bytes(cfg, two).values()) - sum(weight_bytes(cfg, one).values())
    assert grown > 0 and abs(estimated - grown) / grown < 0.1, (estimated, grown)


def test_int4_estimate_counts_the_gguf_weights_kept_at_8_bits(tmp_path: Path) -> None:
    """A GGUF's 5- to 8-bit layer linears and table stay at 8 bits under int4 (Qwen2.5-Coder-0.5B's "Q4_K_M" is
    85% Q5_0 by weight: 528 MB on ExecuTorch against the 441 MB an all-int4 estimate gave): the header says so."""
    import gguf
    import transformers

    from edgepack.intake import load_student
    from edgepack.quantize import piece_quantizer
    from test_intake import SMALL, tiny_state_dict, write_gguf

    hf = transformers.Qwen2Config(**SMALL, tie_word_embeddings=False)
    path = write_gguf(tmp_path / "tiny.gguf", "qwen2", hf, tiny_state_dict(hf), gguf.GGMLQuantizationType.Q5_0)
    student = load_student(str(path))
    model = build_model(student.config, student.state_dict, 64,
                        prepare=piece_quantizer(get_preset("int4"), student.gguf_blocks))
    from edgepack.blocks import BLOCK
    from edgepack.fit import CARRIED_BLOCK

    assert CARRIED_BLOCK == BLOCK  # the fit check's copy of the carried block size
    wide = gguf_wide_weights(str(path))
    assert wide.layer_share == 1.0 and wide.embedding
    stored = _stored_bytes(model)
    estimate = sum(weight_bytes(student.config, get_preset("int4"), wide).values())
    all_int4 = sum(weight_bytes(student.config, get_preset("int4")).values())
    assert abs(estimate - stored) / stored < 0.02 < (stored - all_int4) / stored, (estimate, stored, all_int4)


def _stored_bytes(model: torch.nn.Module) -> float:
    """Bytes of a quantized model's tensors as stored: int4 codes half a byte, scales in full."""
    stored = 0.0
    for p in model.parameters():
        data = getattr(p, "qdata", None)
        if data is None:
            stored += p.numel() * p.element_size()
            continue
        bits = 4 if p.target_dtype == torch.int4 else 8
        stored += data.numel() * bits / 8 + p.scale.numel() * p.scale.element_size()
    return stored


def test_peek_config_reads_the_default_gguf_header(default_student) -> None:
    assert peek_config(None) == default_student.config


@pytest.mark.slow
def test_estimate_is_close_to_the_default_int4_program(default_int4_bundle: Path) -> None:
    manifest = json.loads((default_int4_bundle / "manifest.json").read_text())
    cfg = ModelConfig(**manifest["model"]["config"])
    program = manifest["files"][manifest["backend"]["program"]]["size"]
    estimate = sum(weight_bytes(cfg, get_preset("int4"), gguf_wide_weights(None)).values())  # its Q8_0 table
    assert abs(estimate - program) / program < 0.15, (estimate, program)


def test_an_export_this_machine_cannot_hold_is_refused_before_loading():
    """The export's own peak (the gate's fp32 reference and logits) against what the machine has: the 1.5B
    shape needs ~14 GB by the estimate (12.0 GB measured), so 8 GB available is refused with both figures."""
    from edgepack.fit import check_export_memory, export_peak_bytes

    cfg = ModelConfig.from_hf({**R1_DISTILL, "architectures": ["Qwen2ForCausalLM"]})
    assert 12e9 < export_peak_bytes(cfg) < 16e9
    with pytest.raises(EdgepackError, match=r"needs about 13\.\d GB of memory here .* 8\.0 GB is available"):
        check_export_memory(cfg, available=8e9)
    check_export_memory(cfg, available=24e9)  # this machine: fits


R1_DISTILL = dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                  num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, rope_theta=10000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=131072)
