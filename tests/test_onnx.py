"""The ONNX exporter on tiny random models, run by the real ONNX Runtime (CPU) and the real QNN HTP
backend of onnxruntime-qnn (the Hexagon simulator on x86), compared with the eager model."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgepack.blocks import Int4Blocks
from edgepack.errors import EdgepackError, UsageError
from edgepack.exporters.onnx_graph import GraphSpec, build_decoder, int4_blocks_from_float
from edgepack.runtime import TorchDecoder
from edgepack.runtime.onnxruntime_backend import OrtCpuDecoder, StaticGraphDecoder
from edgepack.targets import Target

from conftest import random_model, run_sequence, tiny_config

pytest.importorskip("onnxruntime")
CONTEXT = 64


def cpu_decoder(model, weights: str, blocks=None) -> OrtCpuDecoder:
    cfg = model.config
    proto = build_decoder(model, GraphSpec(weights), blocks)
    return OrtCpuDecoder(proto.SerializeToString(), cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, CONTEXT,
                         cfg.vocab_size)


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 320, size=20)


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_fp32_graph_matches_eager(tokens, architecture):
    model = random_model(tiny_config(architecture), max_context=CONTEXT)
    expected = run_sequence(TorchDecoder(copy.deepcopy(model)), tokens)
    decoder = cpu_decoder(model, "fp32")
    actual = run_sequence(decoder, tokens)
    np.testing.assert_allclose(actual, expected, atol=2e-5, rtol=1e-5)
    decoder.reset()  # a new conversation: same logits again from position 0
    np.testing.assert_allclose(decoder.forward(tokens[:3], 0), expected[:3], atol=2e-5)


def gguf_like_blocks(model, q4_0: bool) -> dict[str, Int4Blocks]:
    """Int4 blocks shaped like GGUF's (Q4_1: float offsets that are no multiple of the scale; Q4_0:
    signed scales, no offset), written into the model so its fp32 weights are their exact dequantization."""
    found = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                b = int4_blocks_from_float(module.weight)
                signs = torch.where(torch.rand_like(b.scales) < 0.3, -1.0, 1.0)
                b = Int4Blocks(b.codes, b.scales * signs, None) if q4_0 else Int4Blocks(b.codes, b.scales * 1.37,
                                                                                        b.offsets * 0.91 + 0.003)
                found[name + ".weight"] = b
                module.weight.copy_(b.dequantize())
    return found


@pytest.mark.parametrize("kind", ["Q4_1", "Q4_0"])
def test_int4_carries_gguf_blocks_exactly(tokens, kind):
    """MatMulNBits codes + scales (+ block-sum offsets) reproduce the dequantized weights: lossless.
    The embedding/output table is int8 per block of 32, exact for a table that already is (GGUF Q8_0)."""
    from edgepack.exporters.onnx_graph import int8_blocks

    model = random_model(tiny_config("qwen2"), max_context=CONTEXT)
    blocks = gguf_like_blocks(model, q4_0=kind == "Q4_0")
    with torch.no_grad():
        codes, scales = int8_blocks(model.model.embed_tokens.weight)
        table = (codes.astype(np.float32) - 128) * scales[..., None]
        model.model.embed_tokens.weight.copy_(torch.from_numpy(table.reshape(320, -1)))
    expected = run_sequence(TorchDecoder(copy.deepcopy(model)), tokens)
    actual = run_sequence(cpu_decoder(model, "int4", blocks), tokens)
    assert np.abs(actual - expected).max() < 1e-4


@pytest.mark.parametrize("qtype", ["Q5_0", "Q8_0"])
def test_gguf_blocks_above_4_bits_are_carried_exactly(tmp_path, tokens, qtype):
    """A GGUF written by gguf-py with 5- or 8-bit blocks: the int4 preset's graph holds them as 8-bit
    MatMulNBits blocks, and (fp32 activations) computes the torch model on those same weights within 1e-3."""
    import gguf
    import transformers

    from edgepack.exporters.onnx import onnx_rounding
    from edgepack.intake import load_student
    from edgepack.model import UnbuiltModel, build_model
    from edgepack.presets import get_preset
    from test_intake import SMALL, tiny_state_dict, write_gguf

    cfg = transformers.Qwen2Config(**SMALL, tie_word_embeddings=True)
    path = write_gguf(tmp_path / "tiny.gguf", "qwen2", cfg, tiny_state_dict(cfg), gguf.GGMLQuantizationType[qtype])
    student = load_student(str(path))
    assert {type(b).__name__ for b in student.gguf_blocks.values()} == {"Int8Blocks"}
    lazy = UnbuiltModel(student.config, student.state_dict, CONTEXT)
    proto = build_decoder(lazy, GraphSpec("int4", accuracy_level=0), student.gguf_blocks)
    bits = {a.i for n in proto.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    assert bits == {8}  # the layers' blocks, and the int8 table
    same = build_model(student.config, student.state_dict, CONTEXT,
                       prepare=onnx_rounding(get_preset("int4"), student.gguf_blocks))
    c = student.config
    decoder = OrtCpuDecoder(proto.SerializeToString(),
                            c.num_layers, c.num_kv_heads, c.head_dim, CONTEXT, c.vocab_size)
    ids = tokens % c.vocab_size
    np.testing.assert_allclose(run_sequence(decoder, ids), run_sequence(TorchDecoder(same), ids), atol=1e-3)


def test_int4_from_float_weights_is_round_to_nearest(tokens):
    """A student without GGUF blocks is rounded once, per block of 32 (asymmetric min/max): every weight
    within half a step, and the graph computes exactly the model with those rounded weights."""
    from edgepack.exporters.onnx_graph import int8_blocks

    model = random_model(tiny_config(), max_context=CONTEXT)
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in rounded.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                blocks = int4_blocks_from_float(module.weight)
                step = blocks.scales.repeat_interleave(32, dim=1)
                assert ((blocks.dequantize() - module.weight).abs() <= step / 2 + 1e-6).all()
                module.weight.copy_(blocks.dequantize())
        codes, scales = int8_blocks(rounded.model.embed_tokens.weight)
        table = (codes.astype(np.float32) - 128) * scales[..., None]
        rounded.model.embed_tokens.weight.copy_(torch.from_numpy(table.reshape(320, -1)))
    expected = run_sequence(TorchDecoder(rounded), tokens)
    actual = run_sequence(cpu_decoder(model, "int4"), tokens)
    assert np.abs(actual - expected).max() < 1e-4
    assert not np.allclose(actual, run_sequence(TorchDecoder(model), tokens), atol=1e-3)  # it is quantized


# --- the NPU flavour ----------------------------------------------------------------------------------------


def snapdragon(soc: str = "SC8480XP", arch: int = 81, **extra) -> Target:
    onnx_options = {"soc_model": soc, "htp_arch": arch, "npu_context": CONTEXT, "npu_prefill": 16, **extra}
    return Target("sd", "test", "windows", ("onnx/qnn", "onnx/cpu"), "int4", CONTEXT, options={"onnx": onnx_options})


@pytest.fixture(scope="module")
def npu_build(tmp_path_factory):
    """Static graphs of a tiny model, calibrated and QDQ-quantized as the exporter does it."""
    pytest.importorskip("onnxruntime_qnn")
    from edgepack.exporters import onnx_qnn

    model = random_model(tiny_config(), max_context=CONTEXT)
    work = tmp_path_factory.mktemp("npu")
    fp32 = onnx_qnn.write_static_graphs(model, work, CONTEXT, 16, lambda _: None)
    options = onnx_qnn.npu_options(snapdragon())
    feeds = {"prefill": [], "decode": []}
    ids = np.random.default_rng(1).integers(0, 320, size=48)
    decoder = static_decoder(model, fp32, record=lambda g, f: feeds[g].append({k: v.copy() for k, v in f.items()}))
    decoder.forward(ids[:32], 0)
    for i in range(32, 48):
        decoder.forward(ids[i : i + 1], i)
    for graph in ("prefill", "decode"):
        onnx_qnn.quantize_qdq(fp32[graph], work / f"{graph}_qdq.onnx", feeds[graph], options)
    return model, fp32, work, options


def static_decoder(model, paths: dict[str, Path], record=None, sessions=None) -> StaticGraphDecoder:
    """The exporter's own host loop (ORT sessions of the graphs in `paths`, or `sessions` as given)."""
    from edgepack.exporters import onnx_qnn

    sessions = sessions or onnx_qnn.cpu_sessions(paths)
    return onnx_qnn.static_decoder(sessions, model.config, CONTEXT, 16, record=record)


def test_static_graphs_match_eager(npu_build, tokens):
    """Prefill chunks (padded, masked) and decode steps through the host loop equal the eager model."""
    model, fp32, _, _ = npu_build
    long = np.random.default_rng(2).integers(0, 320, size=40)
    expected = TorchDecoder(copy.deepcopy(model)).forward(long, 0)
    decoder = static_decoder(model, fp32)
    actual = np.concatenate([decoder.forward(long[:37], 0), decoder.forward(long[37:], 37)])
    np.testing.assert_allclose(actual, expected, atol=2e-5, rtol=1e-5)


def test_npu_context_model_runs_on_htp_simulator(npu_build, tmp_path):
    """Compiled for the X2 Elite (SoC id read back from the binary), then run with CPU fallback disabled:
    every node is on the HTP. Its predictions track the fp32 model."""
    from edgepack.exporters import onnx_qnn
    from edgepack.runtime.onnxruntime_backend import qnn_session

    model, _, work, options = npu_build
    ctx = {}
    for graph in ("prefill", "decode"):
        binary = onnx_qnn.compile_context(work / f"{graph}_qdq.onnx", tmp_path / f"npu_{graph}_ctx.onnx", options)
        assert onnx_qnn.soc_id_of(tmp_path / binary) == 88
        ctx[graph] = qnn_session(tmp_path / f"npu_{graph}_ctx.onnx", onnx_qnn.ep_options(options))
    ids = np.random.default_rng(3).integers(0, 320, size=40)
    expected = TorchDecoder(copy.deepcopy(model)).forward(ids, 0)
    decoder = static_decoder(model, {}, sessions=ctx)
    actual = np.concatenate([decoder.forward(ids[:34], 0)] + [decoder.forward(ids[i : i + 1], i) for i in range(34, 40)])
    assert (actual.argmax(-1) == expected.argmax(-1)).mean() >= 0.9
    assert np.corrcoef(actual.ravel(), expected.ravel())[0, 1] > 0.99  # 16-bit activations, 8-bit weights


@pytest.mark.parametrize("soc", ["SC8480XP", "SC8380XP", "SM8750", "SM8650"])
def test_context_binary_carries_the_target_soc(npu_build, tmp_path, soc):
    from edgepack.exporters import onnx_qnn

    _, _, work, _ = npu_build
    options = onnx_qnn.npu_options(snapdragon(soc, onnx_qnn.SOCS[soc][1]))
    binary = onnx_qnn.compile_context(work / "decode_qdq.onnx", tmp_path / "ctx.onnx", options)
    assert onnx_qnn.soc_id_of(tmp_path / binary) == onnx_qnn.SOCS[soc][0]


def test_snapdragon_targets_name_known_socs():
    from edgepack.exporters.onnx_qnn import npu_options
    from edgepack.targets import get_target

    pytest.importorskip("onnxruntime_qnn")
    for name, soc in [("snapdragon-x2", "SC8480XP"), ("snapdragon-x-elite", "SC8380XP"),
                      ("snapdragon-8-elite", "SM8750"), ("snapdragon-8-gen3", "SM8650")]:
        assert npu_options(get_target(name))["soc_model"] == soc


# --- errors, before any long work ---------------------------------------------------------------------------


def test_bad_soc_name_is_a_usage_error():
    from edgepack.exporters.onnx import check_onnx_export
    from edgepack.quantize import get_preset

    with pytest.raises(UsageError, match="unknown Snapdragon soc_model 'X2E'"):
        check_onnx_export(snapdragon("X2E"), "qnn", get_preset("int4"))
    with pytest.raises(UsageError, match="htp_arch 79 does not match SC8480XP"):
        check_onnx_export(snapdragon("SC8480XP", 79), "qnn", get_preset("int4"))


def test_missing_onnxruntime_qnn_is_named(monkeypatch):
    from edgepack.exporters.onnx import check_onnx_export
    from edgepack.quantize import get_preset

    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)  # what `import` sees when it is not installed
    with pytest.raises(EdgepackError, match="onnxruntime-qnn is not installed.*pip install onnxruntime-qnn"):
        check_onnx_export(snapdragon(), "qnn", get_preset("int4"))
    check_onnx_export(snapdragon(), "cpu", get_preset("int4"))  # the CPU flavour does not need it


def test_unsupported_preset_is_a_usage_error():
    from edgepack.exporters.onnx import check_onnx_export
    from edgepack.quantize import get_preset

    with pytest.raises(UsageError, match="no 'int8' preset"):
        check_onnx_export(snapdragon(), "cpu", get_preset("int8"))


def test_model_over_the_npu_budget_is_refused():
    from edgepack.exporters.onnx_qnn import check_npu_budget, npu_options

    cfg = tiny_config()  # ~45k parameters: 0.045 MB at 8 bits
    check_npu_budget(cfg, npu_options(snapdragon(npu_max_weights_mb=1)), snapdragon())
    with pytest.raises(EdgepackError, match="more than target 'sd' allows"):
        check_npu_budget(cfg, npu_options(snapdragon(npu_max_weights_mb=0.01)), snapdragon())


def test_model_without_attention_mask_is_refused_clearly():
    """A CPU model from before the shared KV-cache layout (past length read from the cache's shape) is named as
    such, not failed on inside ONNX Runtime."""
    from onnx import helper

    model = random_model(tiny_config(), max_context=CONTEXT)
    proto = build_decoder(model, GraphSpec("fp32"))
    graph = proto.graph
    kept = [i for i in graph.input if i.name != "attention_mask"]
    del graph.input[:]
    graph.input.extend(kept)
    graph.node.insert(0, helper.make_node("Constant", [], ["attention_mask"], value=helper.make_tensor(
        "m", 7, [1, 1], [1])))
    cfg = model.config
    with pytest.raises(EdgepackError, match="predates the shared KV-cache layout"):
        OrtCpuDecoder(proto.SerializeToString(), cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, CONTEXT, cfg.vocab_size)
