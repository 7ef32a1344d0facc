"""The ternary preset on tiny random BitNet b1.58 students (made here, as tests/test_bitnet.py makes them): the
ONNX CPU bundle against edgepack's torch model on the same ternary weights, the codes read back out of the .onnx
file, the refusal of a student without ternary codes, and the fp32 BitNet graph against the torch model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import transformers
from onnx import numpy_helper

from edgepack.errors import UsageError
from edgepack.export import plan_export, run_export
from edgepack.exporters.onnx import onnx_rounding
from edgepack.exporters.onnx_graph import GraphSpec, build_decoder, ternary_codes
from edgepack.intake import Student, load_student
from edgepack.model import UnbuiltModel, build_model
from edgepack.presets import get_preset
from edgepack.runtime import TorchDecoder
from edgepack.runtime.onnxruntime_backend import OrtCpuDecoder

from conftest import run_sequence
from test_bitnet import LAYER_LINEARS, VOCAB, eager_transformers, save_folder, ternary_state, tiny_bitnet  # noqa: F401

CONTEXT = 160
AUTOBITLINEAR = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"}


def ternary_folder(folder: Path, seed: int, **overrides: object) -> Path:
    """A packed (AutoBitLinear) BitNet checkpoint: o_proj biased, int8 activations, one scale per matrix."""
    hf = tiny_bitnet(seed=seed, attention_bias=True, max_position_embeddings=2 * CONTEXT, **overrides)
    state, _ = ternary_state(hf, "autobitlinear")
    return save_folder(folder, hf, state, AUTOBITLINEAR)


@pytest.fixture(scope="module")
def ternary_bundle(tmp_path_factory) -> tuple[Student, Path]:
    """`edgepack export -q ternary --backend onnx/cpu` of a tied ternary BitNet (gate off: the tests compare)."""
    work = tmp_path_factory.mktemp("ternary")
    student_folder = ternary_folder(work / "bitnet", seed=11, tie_word_embeddings=True)
    plan = plan_export(str(student_folder), "snapdragon-x2", quant="ternary", backend="onnx/cpu",
                       max_context=CONTEXT, output=work / "bundle", verify=False)
    run_export(plan)
    return load_student(str(student_folder)), work / "bundle"


def tokens(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, VOCAB, size=150)


def agreement(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, mean KL(expected || actual)) over positions."""
    p, q = (torch.log_softmax(torch.from_numpy(x).double(), -1) for x in (expected, actual))
    return float((actual.argmax(-1) == expected.argmax(-1)).mean()), float((p.exp() * (p - q)).sum(-1).mean())


def same_weights_logits(student: Student, ids: np.ndarray) -> np.ndarray:
    """The torch model on the weights the ternary bundle stores (the gate's same-weights model)."""
    prepare = onnx_rounding(get_preset("ternary"), student.ternary_blocks)
    model = build_model(student.config, student.state_dict, CONTEXT, prepare=prepare)
    return run_sequence(TorchDecoder(model), ids)


def cpu_decoder(program: bytes | Path, student: Student) -> OrtCpuDecoder:
    c = student.config
    return OrtCpuDecoder(program, c.num_layers, c.num_kv_heads, c.head_dim, CONTEXT, c.vocab_size)


# (a) the bundle computes the torch model on the same ternary weights

def test_ternary_bundle_matches_the_torch_model_on_the_same_weights(ternary_bundle) -> None:
    """Measured: top-1 99.3%, KL 5.2e-4 (98-100%, KL 3e-4 to 1.3e-3 over 4 seeds). What differs is float order
    (ORT sums integer codes times the weights, then scales; torch multiplies the scaled values), which moves an
    int8 rounding boundary now and then."""
    student, bundle = ternary_bundle
    ids = tokens(1)
    actual = run_sequence(cpu_decoder(bundle / "model.onnx", student), ids)
    top1, kl = agreement(actual, same_weights_logits(student, ids))
    assert top1 >= 0.99 and kl < 0.003, (top1, kl)


def test_anchors_make_ort_int8_rounding_exact(tmp_path: Path) -> None:
    """Without the anchors, ORT's level-4 kernel rounds BitNet's codes again per block: measured top-1 88.8%,
    KL 0.075 on this model. With them, as the bundle writes it, the KL is 100x smaller."""
    student = load_student(str(ternary_folder(tmp_path / "b", seed=12, tie_word_embeddings=False)))
    lazy = UnbuiltModel(student.config, student.state_dict, CONTEXT)
    proto = build_decoder(lazy, GraphSpec("ternary", accuracy_level=4), student.ternary_blocks)
    ids = tokens(2)
    top1, kl = agreement(run_sequence(cpu_decoder(proto.SerializeToString(), student), ids),
                         same_weights_logits(student, ids))
    assert top1 >= 0.97 and kl < 0.003, (top1, kl)
    layers = [n for n in proto.graph.node if n.op_type == "MatMulNBits" and n.input[1].endswith(".qweight")]
    assert {(a.name, a.i) for n in layers for a in n.attribute if a.name in ("bits", "accuracy_level")} == {
        ("bits", 2), ("accuracy_level", 4)}


# (b) the stored codes are the student's, exactly

def test_stored_codes_and_scales_are_the_students(ternary_bundle) -> None:
    student, bundle = ternary_bundle
    model = onnx.load(str(bundle / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    nodes = {n.input[1]: n for n in model.graph.node if n.op_type == "MatMulNBits" and n.input[1] in inits}
    groups = {"self_attn.q_k_v": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
              "self_attn.o_proj": ["self_attn.o_proj"], "mlp.gate_up": ["mlp.gate_proj", "mlp.up_proj"],
              "mlp.down_proj": ["mlp.down_proj"]}
    checked = 0
    for layer in range(student.config.num_layers):
        for stored, names in groups.items():
            key = f"model.layers.{layer}.{stored}.qweight"
            attrs = {a.name: a.i for a in nodes[key].attribute}
            expected = [student.ternary_blocks[f"model.layers.{layer}.{n}.weight"] for n in names]
            rows, cols = sum(b.codes.shape[0] for b in expected), expected[0].codes.shape[1]
            codes = ternary_codes(numpy_helper.to_array(inits[key]), rows, cols)
            assert attrs["bits"] == 2 and attrs["N"] == rows
            assert np.array_equal(codes, torch.cat([b.codes for b in expected]).numpy()), key
            scales = numpy_helper.to_array(inits[key.replace("qweight", "scales")])
            per_row = torch.cat([b.scales.expand(-1, scales.shape[1]) for b in expected]).numpy()
            assert np.array_equal(scales, per_row), key  # one scale per matrix, repeated per block, unrounded
            checked += len(names)
    assert checked == len(LAYER_LINEARS) * student.config.num_layers


def test_manifest_names_the_carry(ternary_bundle) -> None:
    from edgepack.bundle import read_manifest

    cpu = read_manifest(ternary_bundle[1])["backend"]["cpu"]
    assert (cpu["weights"], cpu["ternary_bits"], cpu["ternary_rerounded"]) == ("ternary", 2, 0)
    assert cpu["ternary_carried"] == len(LAYER_LINEARS) * ternary_bundle[0].config.num_layers


# (c) a student without ternary codes is refused before anything is loaded or built

def test_preset_refuses_a_student_without_ternary_codes(tmp_path: Path) -> None:
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4))
    folder = save_folder(tmp_path / "llama", llama)
    with pytest.raises(UsageError) as caught:
        plan_export(str(folder), "snapdragon-x2", quant="ternary", backend="onnx/cpu", output=tmp_path / "out")
    message = str(caught.value)
    assert "\n" not in message and "needs a BitNet b1.58 checkpoint" in message and message.endswith("use -q int4")

    float_bitnet = save_folder(tmp_path / "float-bitnet", tiny_bitnet(seed=3))  # the architecture, no codes
    plan = plan_export(str(float_bitnet), "snapdragon-x2", quant="ternary", backend="onnx/cpu",
                       output=tmp_path / "out2", verify=False)
    with pytest.raises(UsageError, match="without ternary codes; use -q int4$"):
        run_export(plan)
    assert not (tmp_path / "out2").exists()


# (d) the fp32 preset exports BitNet too

@pytest.mark.parametrize("quantized", [False, True], ids=["float-checkpoint", "int8-activations"])
def test_fp32_bitnet_graph_matches_the_torch_model(tmp_path: Path, quantized: bool) -> None:
    """A float checkpoint: the same math (1e-4). With int8 activations the graph rounds as the torch model does,
    and float order flips a rounding boundary now and then (measured: top-1 98.8%, KL 1.4e-5)."""
    if quantized:
        student = load_student(str(ternary_folder(tmp_path / "q", seed=11, tie_word_embeddings=True)))
    else:
        hf = tiny_bitnet(seed=13, attention_bias=True, max_position_embeddings=2 * CONTEXT)
        student = load_student(str(save_folder(tmp_path / "f", hf)))
    assert student.config.int8_activations == quantized
    proto = build_decoder(UnbuiltModel(student.config, student.state_dict, CONTEXT), GraphSpec("fp32"))
    ids = tokens(3)
    actual = run_sequence(cpu_decoder(proto.SerializeToString(), student), ids)
    expected = run_sequence(TorchDecoder(build_model(student.config, student.state_dict, CONTEXT)), ids)
    if not quantized:
        np.testing.assert_allclose(actual, expected, atol=1e-4 * np.abs(expected).max())
    else:
        top1, kl = agreement(actual, expected)
        assert top1 >= 0.97 and kl < 1e-3, (top1, kl)


# the fit check counts what the ONNX exporter writes

B158_2B = dict(architecture="bitnet", vocab_size=128256, hidden_size=2560, intermediate_size=6912, num_layers=30,
               num_heads=20, num_kv_heads=5, head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5,
               tie_word_embeddings=True, attention_bias=False, max_position_embeddings=4096, hidden_act="relu2",
               int8_activations=True)


def test_fit_estimate_is_the_written_size(ternary_bundle) -> None:
    """The tiny bundle's model.onnx and its weights file against the estimate (the rest: RoPE tables and graph)."""
    from edgepack.fit import estimate

    student, bundle = ternary_bundle
    weights = estimate(student.config, get_preset("ternary"), CONTEXT, "onnx/cpu").weight_bytes
    c = student.config
    rope = 2 * CONTEXT * c.head_dim // 2 * 4
    written = sum((bundle / name).stat().st_size for name in ("model.onnx", "model.onnx.data"))
    assert 0 < written - rope - weights < 20_000  # measured 13.7 kB of graph


def test_fit_knows_2_bit_ternary_weights() -> None:
    """microsoft/bitnet-b1.58-2B-4T's shape: 2.08B layer weights at 2 bits plus an fp32 scale per block of 128
    (127 inputs and the anchor: a row of 2560 is stored as 21 blocks) are 612 MB; the tied int8 table 369 MB.
    Other backends count torchao's int4 form."""
    from edgepack.fit import estimate
    from edgepack.model import ModelConfig

    cfg = ModelConfig(**B158_2B)
    onnx_parts = estimate(cfg, get_preset("ternary"), 4096, "onnx/cpu").weights
    assert round(onnx_parts["layers"] / 1e6) == 612 and "lm_head" not in onnx_parts
    generic = estimate(cfg, get_preset("ternary"), 4096, "executorch/xnnpack").weights
    assert generic["layers"] > 2 * onnx_parts["layers"]  # int4 blocks of 32 (4 + 1 bits a weight) vs 2.25


def test_torchao_form_carries_the_codes(tmp_path: Path) -> None:
    """The preset through sdk/quantize.py (what torchao exporters lower): int4 blocks of 32 holding the codes,
    each scale repeated, so the weights equal the student's exactly."""
    from edgepack.quantize import piece_quantizer

    student = load_student(str(ternary_folder(tmp_path / "b", seed=14, tie_word_embeddings=False)))
    model = build_model(student.config, student.state_dict, CONTEXT,
                        prepare=piece_quantizer(get_preset("ternary"), student.ternary_blocks))
    name = "model.layers.1.mlp.down_proj.weight"
    weight = model.get_parameter(name)
    assert torch.equal(weight.qdata, student.ternary_blocks[name].codes)
    assert torch.equal(weight.dequantize(), student.state_dict[name])


def test_onnxruntime_genai_runs_the_ternary_bundle(ternary_bundle) -> None:
    """The 2-bit MatMulNBits graph opens, unchanged, in onnxruntime-genai (what ONNX apps embed), and its greedy
    tokens are `edgepack run`'s."""
    from test_app_runtimes import assert_genai_equals_edgepack_run

    _, bundle = ternary_bundle
    assert_genai_equals_edgepack_run(bundle, new_tokens=24)
