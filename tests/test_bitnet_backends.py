"""BitNet b1.58 students through ExecuTorch (XNNPACK) and Core ML, on tiny random ternary BitNets made here
(tests/test_ternary.py's helpers): the lowered program against the project's torch model on the same weights with
BitNet's own int8 absmax activations, the codes the exporters store, and the delegate count."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgepack.exporters.executorch import AnchoredQuantLinear, Metadata, XnnpackProgram, lower_to_pte
from edgepack.export import plan_export, run_export
from edgepack.intake import Student, load_student
from edgepack.model import MLP, Attention, CausalLM
from edgepack.presets import get_preset
from edgepack.quantize import build_quantized, decoded_for_scoring
from edgepack.runtime import TorchDecoder
from edgepack.runtime.executorch_backend import ExecuTorchDecoder

from conftest import run_sequence
from test_executorch_export import last_rows
from test_progress import Recorder
from test_ternary import CONTEXT, agreement, ternary_folder, tokens

BACKEND = "executorch/xnnpack"


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: threads only add synchronisation on the shared dev machine; transformers' BitLinear helpers
    (used to write the checkpoints) run eagerly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch._dynamo.config.patch(disable=True):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def student_folder(tmp_path_factory) -> Path:
    """A packed ternary BitNet checkpoint: tied, o_proj biased, int8 activations, one scale per matrix."""
    with torch._dynamo.config.patch(disable=True):
        return ternary_folder(tmp_path_factory.mktemp("bitnet") / "b", seed=11, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def student(student_folder) -> Student:
    return load_student(str(student_folder))


def bitnet_activations(quantized: CausalLM) -> CausalLM:
    """The preset's model with each layer linear on the float value of its (exact ternary) weight: BitNet's own
    int8 absmax activations only, not torchao's second asymmetric rounding of them. What BitNet computes."""
    model = copy.deepcopy(quantized)
    for module in model.modules():
        if isinstance(module, (Attention, MLP)):
            for linear in module.modules():
                if isinstance(linear, nn.Linear) and hasattr(linear.weight, "dequantize"):
                    linear.weight = nn.Parameter(linear.weight.dequantize(), requires_grad=False)
    return model


def expected_rows(model: CausalLM, ids: np.ndarray) -> np.ndarray:
    return run_sequence(TorchDecoder(model), ids)[last_rows(len(ids))]


# --- ExecuTorch -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def executorch_bundle(student_folder, tmp_path_factory) -> tuple[Path, Recorder]:
    """`edgepack export -q ternary --backend executorch/xnnpack` (gate off: the tests compare)."""
    out = tmp_path_factory.mktemp("et") / "bundle"
    plan = plan_export(str(student_folder), "pixel-9", quant="ternary", backend=BACKEND, max_context=CONTEXT,
                       output=out, verify=False)
    progress = Recorder()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run_export(plan, progress)
    torch.set_num_threads(threads)
    return out, progress


def test_ternary_layers_lower_exactly(student, tmp_path) -> None:
    """The layers alone (float embedding and output layer): the program against BitNet on the same ternary weights.
    Measured: top-1 99.3%, KL 2.3e-4 (float order flips an int8 rounding boundary now and then). Without the anchors
    XNNPACK re-rounds every code (86% / 0.11); with the sub-norm before o_proj skipped, 12% / 5.4."""
    preset = dataclasses.replace(get_preset("ternary"), lm_head=None, embedding=None)
    quantized = build_quantized(student, preset, BACKEND, CONTEXT)
    meta = Metadata(bos_id=0, eos_ids=[1], max_context=CONTEXT, max_prefill=16, vocab_size=student.config.vocab_size)
    pte, _ = lower_to_pte(copy.deepcopy(quantized), meta)
    (tmp_path / "layers.pte").write_bytes(pte)
    decoder = ExecuTorchDecoder(tmp_path / "layers.pte", CONTEXT, student.config.vocab_size, 16, last_logits_only=True)
    ids = tokens(1)
    top1, kl = agreement(run_sequence(decoder, ids), expected_rows(bitnet_activations(quantized), ids))
    assert top1 >= 0.98 and kl < 0.003, (top1, kl)


def test_ternary_bundle_matches_bitnet_on_the_same_weights(student, executorch_bundle) -> None:
    """The whole bundle: the int8 output layer's input is rounded per token by XNNPACK, not in the reference (the
    same weights on unrounded inputs), as for Llama's int4 bundles. Measured: top-1 92.1%, KL 0.0047 on this model,
    whose random weights make logits far larger than a trained model's (91.4% / 0.041 while the program's table
    scales were fp16 and the reference's fp32; with two ranges the whole program is lossless, the test below)."""
    from edgepack.bundle import read_manifest
    from edgepack.runtime.executorch_backend import open_executorch

    bundle, _ = executorch_bundle
    ids = tokens(1)
    actual = run_sequence(open_executorch(bundle, read_manifest(bundle)), ids)
    reference = decoded_for_scoring(bitnet_activations(build_quantized(student, get_preset("ternary"), BACKEND,
                                                                       CONTEXT)))
    top1, kl = agreement(actual, expected_rows(reference, ids))
    assert top1 >= 0.9 and kl < 0.01, (top1, kl)


def test_two_ranges_make_the_whole_ternary_program_lossless(student, tmp_path) -> None:
    """`-q ternary --activation-ranges 2`: the output layer's input reaches XNNPACK as residual rows (the layers'
    inputs are BitNet's codes, passed exactly by the anchors): the whole program against BitNet on the same
    weights, its output layer on unrounded inputs. Measured: 100% / KL 1.8e-4; one range 92.1% / 0.0047 (above)."""
    from edgepack.exporters.xnnpack_ranges import ResidualRows

    preset = get_preset("ternary").with_activation_ranges(2)
    quantized = build_quantized(student, preset, BACKEND, CONTEXT)
    program = XnnpackProgram(copy.deepcopy(quantized), ranges=2)
    assert len([m for m in program.modules() if isinstance(m, ResidualRows)]) == 1  # the output layer's input only
    meta = Metadata(bos_id=0, eos_ids=[1], max_context=CONTEXT, max_prefill=16, vocab_size=student.config.vocab_size)
    (tmp_path / "two.pte").write_bytes(lower_to_pte(copy.deepcopy(quantized), meta, ranges=2)[0])
    decoder = ExecuTorchDecoder(tmp_path / "two.pte", CONTEXT, student.config.vocab_size, 16, last_logits_only=True)
    ids = tokens(1)
    reference = decoded_for_scoring(bitnet_activations(quantized))
    top1, kl = agreement(run_sequence(decoder, ids), expected_rows(reference, ids))
    assert top1 >= 0.99 and kl < 0.003, (top1, kl)


def test_each_bitnet_layer_is_one_delegate(student, executorch_bundle) -> None:
    """As for Llama's int4 programs: one XNNPACK delegate per layer (between ExecuTorch's cache and attention ops)
    plus the RoPE tables, the first layer's projections and the output layer. BitNet's rounding (max pooling, a
    division, the add/subtract rounding), sub-norms, squared ReLU and anchors all lower inside the delegates."""
    _, progress = executorch_bundle
    (name, total, done), = [stage for stage in progress.stages if stage[0] == "lower to XNNPACK"]
    assert total == done == student.config.num_layers + 3


def test_lowered_linears_hold_the_ternary_codes_and_fp32_scales(student) -> None:
    """What `lower_to_pte` hands XNNPACK: each layer linear's int4 codes are the student's ternary codes (plus the
    anchors' block of zeros), with one fp32 scale per row (XNNPACK keeps channel scales in fp32; block scales it
    would round to bf16)."""
    program = XnnpackProgram(build_quantized(student, get_preset("ternary"), BACKEND, CONTEXT))
    checked = 0
    for layer in range(student.config.num_layers):
        inputs, output = program.layer_parts(layer)
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            part, attribute = (output, "o_proj") if name.endswith("o_proj") else (
                (output.mlp, name[4:]) if name.startswith("mlp") else (inputs, name[10:]))
            linear = getattr(part, attribute)
            blocks = student.ternary_blocks[f"model.layers.{layer}.{name}.weight"]
            width = blocks.codes.shape[1]
            assert isinstance(linear, AnchoredQuantLinear) and linear.scale.dim() == 1
            assert torch.equal(linear.qdata[:, :width], blocks.codes) and not linear.qdata[:, width:].any()
            assert torch.equal(linear.scale, blocks.scales_per(32)[:, 0])
            checked += 1
    assert checked == 7 * student.config.num_layers


# --- Core ML ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ternary_model(student) -> CausalLM:
    return build_quantized(student, get_preset("ternary"), "coreml", CONTEXT)


def test_coreml_program_matches_bitnet(ternary_model) -> None:
    """The converted torch program of `main` (what coremltools converts), fed as swift-transformers feeds it (zeros
    mask of P + T + 1 columns; prefill, then one token per call), against the project's model on the float values of
    the carried weights. Measured: top-1 92.5%, KL 0.018: the fp16 KV cache moves attention outputs by fp16 steps,
    and BitNet's int8 rounding turns some of those into whole code steps. With the sub-norm skipped: 12.5% / 4.8."""
    from edgepack.exporters.coreml import MAIN, carried_weights, coreml_module, export_program
    from edgepack.model import build_model

    module, _ = coreml_module(copy.deepcopy(ternary_model), CONTEXT, MAIN)
    program = export_program(module, None).module()
    floats, _ = carried_weights(ternary_model)
    reference = TorchDecoder(build_model(ternary_model.config, floats, CONTEXT))
    ids = tokens(4)[:40]
    rows, expected = [], []
    for start, stop in [(0, 12), *((i, i + 1) for i in range(12, len(ids)))]:
        chunk = torch.from_numpy(ids[start:stop].astype(np.int32))[None]
        mask = torch.zeros((1, 1, 1, stop + 1), dtype=torch.float16)
        with torch.no_grad():
            rows.append(program(chunk, mask)[0].float().numpy())
        expected.append(reference.forward(ids[start:stop], start))
    top1, kl = agreement(np.concatenate(rows), np.concatenate(expected))
    assert top1 >= 0.88 and kl < 0.05, (top1, kl)


def test_coreml_package_reads_back_the_ternary_weights(student, ternary_model, tmp_path) -> None:
    """The package's int4 blocks hold the ternary codes exactly; their scale is the student's rounded to fp16 (the
    program's dtype: Core ML's block scales share it), so the weights read back are codes x fp16(scale)."""
    from edgepack.exporters.coreml import convert, quiet_coremltools, save_program
    from edgepack.runtime.coreml_backend import weights_from_mlpackage

    quiet_coremltools()
    prog, carried = convert(copy.deepcopy(ternary_model), CONTEXT, None)
    path = tmp_path / "model.mlpackage"
    save_program(prog, path, "iOS18")
    weights = weights_from_mlpackage(path, student.config)
    for name, blocks in student.ternary_blocks.items():
        assert carried[name] == "int4 per block of 32", name
        scale = blocks.scales_per(32).to(torch.float16).float().repeat_interleave(32, dim=1)
        assert torch.equal(weights[name], blocks.codes.float() * scale), name
        assert torch.equal(torch.sign(weights[name]), blocks.codes.float().sign()), name


def test_coreml_normalizes_every_bitnet_norm_safely_in_fp16(ternary_model) -> None:
    """Core ML computes the package in fp16, where a plain RMSNorm of BitNet's MLP products (thousands) overflows
    on the sum of squares. Every norm of the converted program, the two sub-norms included, divides by its
    max |x| first (`coreml._rms_norm`): one amax per norm (with the ffn sub-norm's plain RMSNorm: one fewer a layer)."""
    from edgepack.exporters.coreml import MAIN, _rms_norm, coreml_module, export_program

    norm = copy.deepcopy(ternary_model.model.layers[0].mlp.ffn_sub_norm).half()
    width = norm.weight.numel()
    x = torch.full((1, 4, width), 3000.0, dtype=torch.float16)
    plain = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))
    assert not plain.any()  # the sum of squares overflows to inf: every output 0 instead of 1
    torch.testing.assert_close(_rms_norm(norm, x).float(), norm.weight.float().expand(1, 4, width), rtol=1e-2, atol=1e-2)
    module, _ = coreml_module(copy.deepcopy(ternary_model), CONTEXT, MAIN)
    graph = export_program(module, None).graph
    amax = [n for n in graph.nodes if n.op == "call_function" and "amax" in str(n.target)]
    layers = ternary_model.config.num_layers
    assert len(amax) == (4 * layers + 1) + 4 * layers  # norms, then BitNet's int8 roundings (absmax per token)
