"""The Core ML exporter on tiny random models: the package is in the stateful-LLM layout Hugging Face's
swift-transformers drives (checked with coremltools against that contract, and refused when a requirement is
missing), the program it converts computes what the reference model computes when fed exactly what
swift-transformers feeds, it carries the preset's quantized weights, and the ANE functions keep static shapes.
Prediction itself needs macOS (`-m macos`)."""

from __future__ import annotations

import copy
import shutil
import sys

import numpy as np
import pytest
import torch

from edgepack.errors import EdgepackError
from edgepack.exporters.coreml import (
    CAUSAL_MASK, DECODE, INPUT_IDS, KEY_CACHE, MAIN, POSITION, PREFILL, VALUE_CACHE, build_package, carried_weights,
    check_swift_transformers, coreml_module, export_program, quiet_coremltools,
)  # fmt: skip
from edgepack.model import build_model
from edgepack.quantize import apply_preset, get_preset
from edgepack.runtime import TorchDecoder
from edgepack.runtime.coreml_backend import swift_transformers_inputs, weights_from_mlpackage

from conftest import random_model, tiny_config

CONTEXT, PREFILL_LEN, VOCAB = 64, 8, 320
SPEC_FILE = "Data/com.apple.CoreML/model.mlmodel"


@pytest.fixture(scope="module")
def quantized():
    return apply_preset(random_model(tiny_config("qwen2"), max_context=CONTEXT), get_preset("int4"))


@pytest.fixture(scope="module")
def package(quantized, tmp_path_factory):
    quiet_coremltools()
    path = tmp_path_factory.mktemp("coreml") / "model.mlpackage"
    info = build_package(copy.deepcopy(quantized), path, CONTEXT, PREFILL_LEN)
    return path, info


def reference_of(quantized) -> TorchDecoder:
    """The project's model on the float values of the quantized weights: what the package must compute."""
    floats, _ = carried_weights(quantized)
    return TorchDecoder(build_model(quantized.config, floats, CONTEXT))


# --- the numbers: the converted program, driven as swift-transformers drives it ---------------------------


class SwiftTransformersDriver:
    """LanguageModelWithStatefulKVCache.predictNextTokenScores, line for line (swift-transformers@eec09bd,
    Sources/Models/LanguageModel.swift): `tokens` is every token so far; prefilling passes all of them, extending
    only the last; causalMask is always Float16 zeros [1, 1, 1, tokenCount + 1]; it reads logits row T - 1."""

    def __init__(self, model) -> None:
        self.model, self.prefilling, self.calls, self.outputs = model, True, [], []

    def next_token_scores(self, tokens: list[int]) -> np.ndarray:
        ids = tokens if self.prefilling else tokens[-1:]
        self.prefilling = False
        feed = {INPUT_IDS: np.array([ids], dtype=np.int32),
                CAUSAL_MASK: np.zeros((1, 1, 1, len(tokens) + 1), dtype=np.float16)}  # fmt: skip
        logits = self.model(feed)
        assert logits.ndim == 3 and logits.shape[:2] == (1, len(ids))
        self.calls.append(feed)
        self.outputs.append(logits[0])
        return logits[0, -1]


def test_converted_program_driven_like_swift_transformers_matches_the_reference(quantized):
    """The decomposed torch.export program of `main` (what coremltools converts to the package's default
    function) writes its states and returns the reference model's logits: prefill of the whole prompt, then
    extend one token at a time, with exactly the shapes and values swift-transformers passes."""
    module, _ = coreml_module(copy.deepcopy(quantized), CONTEXT, MAIN)
    program = export_program(module, None).module()  # ranged: T and the mask's columns are symbolic

    def run(feed):
        with torch.no_grad():
            out = program(torch.from_numpy(feed[INPUT_IDS]), torch.from_numpy(feed[CAUSAL_MASK]))
        return out.float().numpy()

    driver, reference = SwiftTransformersDriver(run), reference_of(quantized)
    tokens = [int(t) for t in np.random.default_rng(0).integers(0, VOCAB, size=9)]
    ours, theirs = list(tokens), list(tokens)
    for step in range(20):
        scores = driver.next_token_scores(ours)
        want = reference.forward(np.array(theirs if step == 0 else theirs[-1:]), 0 if step == 0 else len(theirs) - 1)
        if step == 0:  # prefill: every prompt row, not only the one swift-transformers reads
            np.testing.assert_allclose(driver.outputs[0], want, atol=5e-3 * np.abs(want).max())
        np.testing.assert_allclose(scores, want[-1], atol=5e-3 * np.abs(want).max())
        ours.append(int(scores.argmax()))
        theirs.append(int(want[-1].argmax()))
    assert ours == theirs  # greedy: the same 20 tokens
    # What was fed is what swift-transformers feeds, and what the runtime backend feeds on a Mac.
    assert [c[INPUT_IDS].shape for c in driver.calls[:2]] == [(1, 9), (1, 1)]
    assert [c[CAUSAL_MASK].shape for c in driver.calls[:2]] == [(1, 1, 1, 10), (1, 1, 1, 11)]
    for call, start in zip(driver.calls, [0] + list(range(9, 28))):
        mine = swift_transformers_inputs(call[INPUT_IDS][0], start)
        assert all(np.array_equal(mine[k], call[k]) and mine[k].dtype == call[k].dtype for k in call)


def test_fixed_shape_functions_match_the_reference(quantized):
    """The ANE functions' forward (`prefill` padded chunks at `position`, then `decode`), eager torch."""
    module, _ = coreml_module(copy.deepcopy(quantized), CONTEXT, DECODE)
    tokens = np.random.default_rng(1).integers(0, VOCAB, size=20)

    def forward(ids, start, chunk):
        padded = np.concatenate([ids, np.zeros(chunk - ids.size, dtype=ids.dtype)])
        with torch.no_grad():
            out = module(torch.tensor(padded, dtype=torch.int32)[None], torch.tensor([start], dtype=torch.int32))
        return out[0, : ids.size].float().numpy()

    def sequence(fwd):
        out = [fwd(tokens[:5], 0, PREFILL_LEN), fwd(tokens[5:13], 5, PREFILL_LEN)]
        return np.concatenate(out + [fwd(tokens[i : i + 1], i, 1) for i in range(13, len(tokens))])

    reference = reference_of(quantized)
    expected = np.concatenate(
        [reference.forward(tokens[:5], 0), reference.forward(tokens[5:13], 5)]
        + [reference.forward(tokens[i : i + 1], i) for i in range(13, len(tokens))]
    )
    actual = sequence(forward)
    np.testing.assert_allclose(actual, expected, atol=5e-3 * np.abs(expected).max())


# --- the package -----------------------------------------------------------------------------------------


def test_package_has_the_swift_transformers_layout_and_ane_functions(package, quantized):
    import coremltools as ct

    path, info = package
    spec = ct.utils.load_spec(str(path))
    functions = {f.name: f for f in spec.description.functions}
    assert set(functions) == {MAIN, PREFILL, DECODE} and spec.description.defaultFunctionName == MAIN
    cfg, fp16 = quantized.config, ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16
    for fn in functions.values():  # one state layout for every function
        assert [s.name for s in fn.state] == [KEY_CACHE, VALUE_CACHE]
        for s in fn.state:
            array = s.type.stateType.arrayType
            assert list(array.shape) == [cfg.num_layers, 1, cfg.num_kv_heads, CONTEXT, cfg.head_dim]
            assert array.dataType == fp16
        assert fn.output[0].name == "logits" and fn.output[0].type.multiArrayType.dataType == fp16
    main = {i.name: i.type.multiArrayType for i in functions[MAIN].input}
    ranges = {k: [(r.lowerBound, r.upperBound) for r in v.shapeRange.sizeRanges] for k, v in main.items()}
    assert ranges == {INPUT_IDS: [(1, 1), (1, CONTEXT)], CAUSAL_MASK: [(1, 1)] * 3 + [(2, CONTEXT + 1)]}
    for name, length in ((PREFILL, PREFILL_LEN), (DECODE, 1)):
        inputs = {i.name: list(i.type.multiArrayType.shape) for i in functions[name].input}
        assert inputs == {INPUT_IDS: [1, length], POSITION: [1]}
        assert not functions[name].input[0].type.multiArrayType.HasField("shapeRange")  # static for the ANE
    metadata = dict(spec.description.metadata.userDefined)
    assert metadata["co.huggingface.exporters.task"] == "text-generation"
    assert metadata["co.huggingface.exporters.architecture"] == "Qwen2ForCausalLM"
    assert metadata["co.huggingface.exporters.precision"] == "float16"
    assert metadata["edgepack.context_length"] == str(CONTEXT)
    reports = info["ane_report"]
    for name in (PREFILL, DECODE):
        compute = {k: v for k, v in reports[name]["output_dtypes"].items() if k.startswith("fp")}
        assert set(compute) == {"fp16"}, compute  # fp16 compute: no fp32 tensor anywhere
        assert reports[name]["decoder_layers_on_ane"], reports[name]["off_ane"]
    # The ranged main runs on the GPU/CPU: the report says why, instead of claiming the ANE.
    assert not reports[MAIN]["decoder_layers_on_ane"]
    assert all("dynamic shape" in e["reasons"] for e in reports[MAIN]["off_ane"] if e["region"] == "decoder_layers")
    for report in reports.values():
        assert report["compressed_weights"] == 7 * cfg.num_layers + 1  # 7 linears a layer + the tied table


def test_contract_check_passes_on_the_written_package(package):
    path, _ = package
    result = check_swift_transformers(path, VOCAB)
    assert result["status"] == "passed" and result["function"] == MAIN
    assert result["query_length"] == [1, CONTEXT] and result["state_shape"][3] == CONTEXT
    assert "swift-transformers@eec09bd" in result["contract"] and len(result["checked"]) == 8


def _rename(features, old: str, new: str) -> None:
    next(f for f in features if f.name == old).name = new


def _main(spec):
    return next(f for f in spec.description.functions if f.name == MAIN)


def _logits_rank_2(spec) -> None:
    block = spec.mlProgram.functions[MAIN].block_specializations[spec.mlProgram.functions[MAIN].opset]
    for op in block.operations:
        for out in op.outputs:
            if out.name == "logits":
                del out.type.tensorType.dimensions[0]
                out.type.tensorType.rank = 2


def _fixed_query_length(spec) -> None:
    size = _main(spec).input[0].type.multiArrayType.shapeRange.sizeRanges[1]
    size.lowerBound, size.upperBound = 1, 2


def _fp32_mask(spec) -> None:
    _main(spec).input[1].type.multiArrayType.dataType = 65568  # ArrayFeatureType.FLOAT32


def _short_mask(spec) -> None:
    _main(spec).input[1].type.multiArrayType.shapeRange.sizeRanges[3].upperBound = CONTEXT


MUTATIONS = {
    "renamed input": (lambda s: _rename(_main(s).input, INPUT_IDS, "input_ids"), "no input inputIds"),
    "fixed query length": (_fixed_query_length, "max - min > 1"),
    "fp32 causal mask": (_fp32_mask, "causalMask is not an fp16 multiarray"),
    "mask too short for the context": (_short_mask, f"causalMask does not accept [1, 1, 1, 2..{CONTEXT + 1}]"),
    "renamed state": (lambda s: _rename(_main(s).state, VALUE_CACHE, "v_cache"), "no state valueCache"),
    "logits of rank 2": (_logits_rank_2, "logits has rank 2, not 3"),
    "no model name": (lambda s: s.description.metadata.userDefined.pop("co.huggingface.exporters.name"),
                      "metadata lacks co.huggingface.exporters.{name}"),
    "an ANE function as default": (lambda s: setattr(s.description, "defaultFunctionName", DECODE),
                                   "inputs ['position'] are not fed by swift-transformers"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MUTATIONS))
def test_contract_check_refuses_a_package_missing_a_requirement(package, tmp_path, case):
    import coremltools as ct

    path, _ = package
    broken = tmp_path / "model.mlpackage"
    shutil.copytree(path, broken)
    spec = ct.utils.load_spec(str(path))
    mutate, message = MUTATIONS[case]
    mutate(spec)
    (broken / SPEC_FILE).write_bytes(spec.SerializeToString())
    with pytest.raises(EdgepackError, match="does not meet swift-transformers' contract") as raised:
        check_swift_transformers(broken, VOCAB)
    assert message in raised.value.problem and "report this bug" in raised.value.fix


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


def test_weights_not_stored_under_their_own_names_are_read_back(quantized, tmp_path):
    """coremltools stores equal constants once and drops a multiplication by ones (a fresh model's norms): the
    package records both and every name reads back (seen on a random 1.5B: 'lacks weights ...layernorm')."""
    model = copy.deepcopy(quantized)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("input_layernorm.weight"):
                param.fill_(1.0)
            elif name.endswith("post_attention_layernorm.weight"):
                param.copy_(model.model.layers[0].post_attention_layernorm.weight)
    path = tmp_path / "model.mlpackage"
    info = build_package(model, path, CONTEXT, 1)
    names = [n for n, _ in model.named_parameters()]
    ones = sorted(n for n in names if n.endswith("input_layernorm.weight"))
    assert info["constant_weights"] == {n: 1.0 for n in ones}
    assert sorted(n for n in names if n.endswith("post_attention_layernorm.weight")) in info["equal_weights"]
    back = weights_from_mlpackage(path, model.config, info)
    floats, _ = carried_weights(model)
    for name in floats:
        np.testing.assert_allclose(back[name].numpy(), floats[name].numpy(), rtol=1e-3, atol=1e-3 * floats[name].abs().max().item())
    with pytest.raises(EdgepackError, match="lacks weights"):
        weights_from_mlpackage(path, model.config)  # without the manifest's records, names are missing


def test_linux_refuses_prediction_with_a_pointer_to_the_reference_backend(package, tmp_path):
    if sys.platform == "darwin":
        pytest.skip("Core ML predicts on macOS")
    from edgepack.runtime.backend import open_backend

    manifest = {"backend": {"name": "coreml", "program": "model.mlpackage", "functions": {MAIN: CONTEXT}}}
    with pytest.raises(EdgepackError, match=r"macOS or iOS.*--backend reference"):
        open_backend("coreml", tmp_path, manifest)


def test_reference_backend_runs_the_weights_of_a_coreml_bundle(package, quantized, tmp_path):
    from edgepack.runtime.backend import open_backend

    path, _ = package
    shutil.copytree(path, tmp_path / "model.mlpackage")
    manifest = {
        "backend": {"name": "coreml", "program": "model.mlpackage", "max_prefill": PREFILL_LEN},
        "model": {"config": quantized.config.to_dict()},
        "context_length": CONTEXT,
    }
    decoder = open_backend("reference", tmp_path, manifest)
    tokens = np.arange(12) * 7 % VOCAB
    expected = reference_of(quantized).forward(tokens, 0)
    np.testing.assert_allclose(decoder.forward(tokens, 0), expected, atol=2e-3 * np.abs(expected).max())


def test_export_writes_the_contract_check_into_the_manifest(tmp_path, default_student):
    """`edgepack export -t iphone-16-pro` on a tiny model over SmolLM2's vocabulary (fp16): the exporter runs
    the contract check and records it; the quality gate verifies the bundle through the weights read back."""
    from edgepack.bundle import read_manifest
    from edgepack.export import plan_export, run_export

    from conftest import write_student_folder

    cfg = tiny_config("llama", vocab_size=default_student.config.vocab_size, max_position_embeddings=1024)
    folder = write_student_folder(tmp_path / "student", default_student, cfg, random_model(cfg, max_context=128))
    out = tmp_path / "bundle"
    run_export(plan_export(str(folder), "iphone-16-pro", quant="fp16", max_context=128, output=out))
    backend = read_manifest(out)["backend"]
    assert backend["method"] == MAIN and backend["functions"] == {MAIN: 128, PREFILL: 128, DECODE: 1}
    assert backend["swift_transformers"]["status"] == "passed"
    assert backend["swift_transformers"]["query_length"] == [1, 128]
    assert backend["metadata"]["co.huggingface.exporters.name"]
    assert set(backend["inputs"]) == {INPUT_IDS, CAUSAL_MASK} and backend["states"]["names"] == [KEY_CACHE, VALUE_CACHE]
    assert read_manifest(out)["verification"]["status"] == "passed"


# --- macOS: Core ML itself ---------------------------------------------------------------------------------


@pytest.mark.macos
def test_stateful_prediction_greedy_matches_reference_backend(package, quantized):
    """The package's default function through Core ML, fed what swift-transformers feeds (CoreMLDecoder)."""
    from edgepack.runtime.coreml_backend import CoreMLDecoder

    path, _ = package
    coreml = CoreMLDecoder(path, CONTEXT, VOCAB, compute_units="CPU_ONLY")
    reference = reference_of(quantized)
    prompt = np.array([5, 17, 33, 2, 90, 41, 7], dtype=np.int64)
    generated = {}
    for key, decoder in (("coreml", coreml), ("reference", reference)):
        decoder.reset()
        ids = list(prompt)
        logits = decoder.forward(prompt, 0)
        for _ in range(24):
            ids.append(int(logits[-1].argmax()))
            logits = decoder.forward(np.array(ids[-1:]), len(ids) - 1)
        generated[key] = ids
    assert generated["coreml"] == generated["reference"]


@pytest.mark.macos
def test_ane_decode_function_agrees_with_main(package):
    """`decode` (static, inputIds + position, its own state) gives main's logits token by token."""
    import coremltools as ct

    path, _ = package
    main = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.CPU_ONLY)
    decode = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.CPU_ONLY, function_name=DECODE)
    main_state, decode_state = main.make_state(), decode.make_state()
    for i, token in enumerate([5, 17, 33, 2, 90]):
        ours = decode.predict({INPUT_IDS: np.array([[token]], dtype=np.int32), POSITION: np.array([i], dtype=np.int32)},
                              state=decode_state)["logits"]
        theirs = main.predict(swift_transformers_inputs(np.array([token]), i), state=main_state)["logits"]
        np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(theirs, np.float32), atol=2e-2)


# --- the default model (slow): one export shared through tests/conftest.py's default_coreml_bundle --------


@pytest.mark.slow
def test_default_coreml_bundle_meets_the_swift_transformers_contract(default_coreml_bundle):
    import coremltools as ct

    from edgepack.bundle import read_manifest

    manifest = read_manifest(default_coreml_bundle)  # every file of the package checked against its sha256
    size = sum(p.stat().st_size for p in default_coreml_bundle.rglob("*") if p.is_file())
    assert size <= 110e6, f"{size / 1e6:.1f} MB"
    backend, cfg = manifest["backend"], manifest["model"]["config"]
    assert backend["name"] == "coreml" and backend["compute_precision"] == "float16"
    program = default_coreml_bundle / backend["program"]
    result = check_swift_transformers(program, cfg["vocab_size"])  # again, on the bundle as written
    print(result)
    assert result["status"] == backend["swift_transformers"]["status"] == "passed"
    assert result["query_length"] == [1, manifest["context_length"]]
    assert result["state_shape"] == [cfg["num_layers"], 1, cfg["num_kv_heads"], manifest["context_length"],
                                     cfg["head_dim"]]  # fmt: skip
    spec = ct.models.MLModel(str(program), skip_model_load=True).get_spec()
    assert {f.name for f in spec.description.functions} == {MAIN, PREFILL, DECODE}
    for name in (PREFILL, DECODE):
        report = backend["ane_report"][name]
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


def test_a_smoothed_q4_1_linear_keeps_the_students_weights_in_its_grid():
    """A carried Q4_1 linear whose input is smoothed (`quantize.Smoothing`) keeps its offsets unscaled next to a
    per-block input scale; the Core ML grid folds both back: the smoothed weights, exactly."""
    from edgepack.blocks import decode
    from edgepack.exporters.coreml import _block_offset_grid
    from edgepack.quantize import BlockOffsetLinear
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)).numpy()
    blocks = decode(quantize(weight, GGMLQuantizationType.Q4_1), "Q4_1", (8, 64)).with_positive_scales()
    factor = torch.tensor([3.0, 0.5])
    smoothed = blocks.scaled(column_blocks=factor)
    linear = BlockOffsetLinear(torch.nn.Linear(64, 8, bias=False), smoothed, factor)
    grid = _block_offset_grid(linear)
    np.testing.assert_allclose(grid.dequantize(), smoothed.dequantize().numpy(), rtol=1e-5, atol=1e-5)
