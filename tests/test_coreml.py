"""The Core ML exporter on tiny random models: the package converts, loads back with coremltools, declares its
states and fp16 compute, carries exactly the preset's quantized weights, and its Core ML forward computes
what the reference model computes. Prediction itself needs macOS (`-m macos`)."""

from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import torch

from edgepack.errors import EdgepackError
from edgepack.exporters.coreml import DECODE, PREFILL, build_package, carried_weights, coreml_module, state_names
from edgepack.model import build_model
from edgepack.quantize import apply_preset, get_preset
from edgepack.runtime import TorchDecoder
from edgepack.runtime.coreml_backend import weights_from_mlpackage

from conftest import random_model, tiny_config

CONTEXT, PREFILL_LEN = 64, 8


@pytest.fixture(scope="module")
def quantized():
    return apply_preset(random_model(tiny_config("qwen2"), max_context=CONTEXT), get_preset("int4"))


@pytest.fixture(scope="module")
def package(quantized, tmp_path_factory):
    path = tmp_path_factory.mktemp("coreml") / "model.mlpackage"
    info = build_package(copy.deepcopy(quantized), path, CONTEXT, PREFILL_LEN)
    return path, info


def reference_of(quantized) -> TorchDecoder:
    """The project's model on the float values of the quantized weights: what the package must compute."""
    floats, _ = carried_weights(quantized)
    return TorchDecoder(build_model(quantized.config, floats, CONTEXT))


def sequence(tokens: np.ndarray, forward) -> np.ndarray:
    """A padded prefill chunk of 5, a full one of 8, then single-token decode: the runtime's call pattern."""
    out = [forward(tokens[:5], 0), forward(tokens[5:13], 5)]
    out += [forward(tokens[i : i + 1], i) for i in range(13, len(tokens))]
    return np.concatenate(out)


def test_coreml_forward_matches_reference_model(quantized):
    module, _ = coreml_module(copy.deepcopy(quantized), CONTEXT)
    tokens = np.random.default_rng(0).integers(0, 320, size=20)

    def forward(ids, start):
        with torch.no_grad():
            ids_t = torch.tensor(ids, dtype=torch.int32)[None]
            return module(ids_t, torch.tensor([start], dtype=torch.int32))[0].float().numpy()

    expected = sequence(tokens, reference_of(quantized).forward)
    actual = sequence(tokens, forward)
    np.testing.assert_allclose(actual, expected, atol=5e-3 * np.abs(expected).max())


def test_package_loads_back_with_states_and_fp16(package, quantized):
    import coremltools as ct

    path, info = package
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    functions = {f.name: f for f in spec.description.functions}
    assert set(functions) == {PREFILL, DECODE} and spec.description.defaultFunctionName == DECODE
    cfg = quantized.config
    for name, length in ((PREFILL, PREFILL_LEN), (DECODE, 1)):
        fn = functions[name]
        assert [s.name for s in fn.state] == state_names(cfg.num_layers)
        for s in fn.state:
            array = s.type.stateType.arrayType
            assert list(array.shape) == [1, cfg.num_kv_heads, CONTEXT, cfg.head_dim]
            assert array.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16
        assert list(fn.input[0].type.multiArrayType.shape) == [1, length]
        assert fn.output[0].type.multiArrayType.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16
    for report in info["ane_report"].values():
        compute = {k: v for k, v in report["output_dtypes"].items() if k.startswith("fp")}
        assert set(compute) == {"fp16"}, compute  # fp16 compute: no fp32 tensor anywhere
        assert report["decoder_layers_on_ane"], report["off_ane"]
        assert report["compressed_weights"] == 7 * cfg.num_layers + 1  # 7 linears a layer + the tied table


def test_weights_read_back_are_the_presets_quantized_weights(package, quantized):
    path, info = package
    floats, grids = carried_weights(quantized)
    back = weights_from_mlpackage(path, quantized.config)
    assert set(back) == set(floats)
    for name, value in floats.items():
        # Equal up to the fp16 storage of scales (and of unquantized weights): rel. 2^-11.
        np.testing.assert_allclose(back[name].numpy(), value.numpy(), rtol=1e-3, atol=1e-3 * value.abs().max().item())
    assert info["weights"] == {"int4 per block of 32": 14, "int8 per channel": 1}
    # Really int4: the codes are on the grid, not fp16 values that happen to be close.
    q = grids["model.layers.0.mlp.up_proj.weight"]
    assert q.bits == 4 and q.codes.min() >= -8 and q.codes.max() <= 7 and q.block == 32


def test_linux_refuses_prediction_with_a_pointer_to_the_reference_backend(package, tmp_path):
    if sys.platform == "darwin":
        pytest.skip("Core ML predicts on macOS")
    from edgepack.runtime.backend import open_backend

    manifest = {"backend": {"name": "coreml", "program": "model.mlpackage", "functions": {PREFILL: 8, DECODE: 1}}}
    with pytest.raises(EdgepackError, match=r"macOS or iOS.*--backend reference"):
        open_backend("coreml", tmp_path, manifest)


def test_reference_backend_runs_the_weights_of_a_coreml_bundle(package, quantized, tmp_path):
    import shutil

    from edgepack.runtime.backend import open_backend

    path, _ = package
    shutil.copytree(path, tmp_path / "model.mlpackage")
    manifest = {
        "backend": {"name": "coreml", "program": "model.mlpackage", "max_prefill": PREFILL_LEN},
        "model": {"config": quantized.config.to_dict()},
        "context_length": CONTEXT,
    }
    decoder = open_backend("reference", tmp_path, manifest)
    tokens = np.arange(12) * 7 % 320
    expected = reference_of(quantized).forward(tokens, 0)
    np.testing.assert_allclose(decoder.forward(tokens, 0), expected, atol=2e-3 * np.abs(expected).max())


@pytest.mark.macos
def test_stateful_prediction_greedy_matches_reference_backend(package, quantized):
    from edgepack.runtime.coreml_backend import CoreMLDecoder

    path, _ = package
    coreml = CoreMLDecoder(path, CONTEXT, 320, PREFILL_LEN, compute_units="CPU_ONLY")
    reference = reference_of(quantized)
    for decoder in (coreml, reference):
        decoder.reset()
    prompt = np.array([5, 17, 33, 2, 90, 41, 7], dtype=np.int64)
    generated = {}
    for key, decoder in (("coreml", coreml), ("reference", reference)):
        ids = list(prompt)
        logits = decoder.forward(prompt, 0)
        for _ in range(24):
            ids.append(int(logits[-1].argmax()))
            logits = decoder.forward(np.array(ids[-1:]), len(ids) - 1)
        generated[key] = ids
    assert generated["coreml"] == generated["reference"]


# --- the default model (slow): one export shared through tests/conftest.py's default_coreml_bundle --------


@pytest.mark.slow
def test_default_coreml_bundle_is_small_and_declares_its_program(default_coreml_bundle):
    import coremltools as ct

    from edgepack.bundle import read_manifest

    manifest = read_manifest(default_coreml_bundle)  # every file of the package checked against its sha256
    size = sum(p.stat().st_size for p in default_coreml_bundle.rglob("*") if p.is_file())
    assert size <= 110e6, f"{size / 1e6:.1f} MB"
    backend = manifest["backend"]
    assert backend["name"] == "coreml" and backend["compute_precision"] == "float16"
    spec = ct.models.MLModel(str(default_coreml_bundle / backend["program"]), skip_model_load=True).get_spec()
    assert {f.name for f in spec.description.functions} == {PREFILL, DECODE}
    assert all(len(f.state) == 2 * manifest["model"]["config"]["num_layers"] for f in spec.description.functions)
    for report in backend["ane_report"].values():
        assert report["decoder_layers_on_ane"], report["off_ane"]
        assert set(k for k in report["output_dtypes"] if k.startswith("fp")) == {"fp16"}


@pytest.mark.slow
def test_default_coreml_weights_track_fp32_on_real_text(default_coreml_bundle, default_student):
    """The weights read back out of the .mlpackage, run by the reference model, vs the fp32 reference."""
    from edgepack import runtime
    from edgepack.evaltext import default_text
    from edgepack.runtime.session import Session
    from edgepack.verify import teacher_forcing

    candidate = runtime.load(default_coreml_bundle, backend="reference")
    fp32 = build_model(default_student.config, default_student.state_dict, max_context=candidate.max_context)
    reference = Session(TorchDecoder(fp32, 128), candidate.tokenizer, candidate.manifest)
    ids = candidate.tokenizer.encode(default_text())[:1025]
    result = teacher_forcing(reference, candidate, ids)
    print(result.to_dict())
    assert result.tokens >= 1000
    assert result.top1_agreement >= 0.95
