"""The LiteRT exporter and backend: litert-torch's conversion of the project's model against the torch reference,
ai-edge-quantizer's int4 program against the same rounded weights in torch, the bundle through `edgepack run`'s
Session, and the `.litertlm` in Google's own LiteRT-LM runtime (litert-lm-api), whose greedy text must equal
`edgepack run --backend litert`'s. Tiny random students; the default model is in the slow tests at the end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("litert_torch", reason="the LiteRT toolchain is an extra: pip install -r .ci/litert.txt")
pytest.importorskip("ai_edge_litert")

from edgepack import runtime  # noqa: E402
from edgepack.errors import EdgepackError, UsageError  # noqa: E402
from edgepack.export import plan_export, run_export  # noqa: E402
from edgepack.exporters.litert import convert_program, litert_rounding, quantize_program  # noqa: E402
from edgepack.presets import get_preset  # noqa: E402
from edgepack.runtime.litert_backend import LiteRtDecoder  # noqa: E402

from conftest import random_model, tiny_config, write_student_folder  # noqa: E402

CONTEXT, PREFILL = 64, 8
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]


def decoder_for(program: bytes, tmp_path, vocab: int) -> LiteRtDecoder:
    path = tmp_path / "model.tflite"
    path.write_bytes(program)
    return LiteRtDecoder(path, CONTEXT, vocab, f"prefill_{PREFILL}", threads=1)


def litert_logits(decoder: LiteRtDecoder, tokens: np.ndarray, prompt: int) -> np.ndarray:
    """The runtime's call pattern: a prompt (prefill signature, padded, then decode), then one token a call."""
    rows = [decoder.forward(tokens[:prompt], 0)[0]]
    rows += [decoder.forward(tokens[i : i + 1], i)[0] for i in range(prompt, len(tokens))]
    return np.stack(rows)


def torch_logits(model, tokens: np.ndarray, prompt: int) -> np.ndarray:
    model.reset_cache()
    with torch.no_grad():
        out = model(torch.tensor(tokens)[None], torch.tensor([0]))[0].numpy()
    return out[prompt - 1 :]


def kl(reference: np.ndarray, candidate: np.ndarray) -> float:
    p = torch.log_softmax(torch.from_numpy(reference), -1)
    q = torch.log_softmax(torch.from_numpy(candidate), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_fp32_program_equals_the_torch_model_including_the_end_of_the_context(tmp_path):
    cfg = tiny_config()
    model = random_model(cfg, max_context=CONTEXT)
    decoder = decoder_for(convert_program(model, PREFILL, CONTEXT), tmp_path, cfg.vocab_size)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, CONTEXT)
    # a 13-token prompt is one padded prefill chunk and a second one, then decode; the last 4 tokens of the
    # context come one a call; a prompt reaching past CONTEXT - PREFILL falls back to decode for its tail
    got, want = litert_logits(decoder, tokens, 13), torch_logits(model, tokens, 13)
    assert np.abs(got - want).max() < 1e-4
    assert (got.argmax(-1) == want.argmax(-1)).all()
    tail = decoder.forward(tokens[: CONTEXT - 2], 0)[0]
    assert np.abs(tail - want[CONTEXT - 2 - 13]).max() < 1e-4


def test_int4_program_stores_int4_blocks_and_tracks_the_same_weights_in_torch(tmp_path):
    """The exporter's own rounding (the gate's same-weights model) is what ai-edge-quantizer stores: what remains
    is LiteRT's int8 dynamic activations."""
    cfg = tiny_config()
    model = random_model(cfg, max_context=CONTEXT)
    prepare = litert_rounding(get_preset("int4"), {})
    for prefix, piece in [("model.embed_tokens", model.model.embed_tokens),
                          *((f"model.layers.{i}", layer) for i, layer in enumerate(model.model.layers)),
                          ("lm_head", model.lm_head)]:
        prepare(prefix, piece)
    fp32 = convert_program(model, PREFILL, CONTEXT)
    int4 = quantize_program(fp32, get_preset("int4"))
    assert len(int4) < 0.35 * len(fp32)
    types = weight_types(int4)
    assert types.pop("decode_logits_output") == "INT8"  # the output layer: int8 per channel
    embedding = [name for name in types if "embed_tokens" in name]
    assert embedding and {types.pop(name) for name in embedding} == {"INT8"}  # the table: int8 per row
    assert set(types.values()) == {"INT4"}, types  # every layer linear
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, 48)
    got, want = litert_logits(decoder_for(int4, tmp_path, cfg.vocab_size), tokens, 9), torch_logits(model, tokens, 9)
    assert kl(want, got) < 0.01
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.75


def test_gguf_int4_blocks_are_carried_exactly_with_their_offsets(tmp_path):
    """Q4_1-like blocks (codes using all of [-8, 7], fp16 scales, offsets): the program stores the student's own codes
    and scales, so the LiteRT program tracks the same weights in torch far closer than the quantizer's re-rounding."""
    from edgepack.blocks import Int4Blocks
    from edgepack.exporters.litert_carry import carried_blocks_of, write_carried_blocks
    from edgepack.model import model_pieces

    cfg = tiny_config(tie_word_embeddings=False)
    model = random_model(cfg, max_context=CONTEXT)
    generator = torch.Generator().manual_seed(0)
    blocks = {}
    for name, weight in model.named_parameters():
        if name.startswith("model.layers") and weight.dim() == 2:
            rows, cols = weight.shape
            blocks[name] = Int4Blocks(torch.randint(-8, 8, (rows, cols), generator=generator, dtype=torch.int8),
                                      (torch.rand(rows, cols // 32, generator=generator) * 0.02 + 0.005).half().float(),
                                      (torch.rand(rows, cols // 32, generator=generator) - 0.5) * 0.05)
    prepare = litert_rounding(get_preset("int4"), blocks)
    for prefix, piece in model_pieces(model):
        prepare(prefix, piece)
    rounded = quantize_program(convert_program(model, PREFILL, CONTEXT), get_preset("int4"))
    carried, count = write_carried_blocks(rounded, carried_blocks_of(model))
    assert count == 7 * cfg.num_layers
    down = blocks["model.layers.1.mlp.down_proj.weight"]
    assert any(np.array_equal(codes, down.codes.float().numpy()) for codes in int4_matrices(carried, down.codes.shape))
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, 40)
    want = torch_logits(model, tokens, 9)
    got = {name: litert_logits(decoder_for(program, tmp_path, cfg.vocab_size), tokens, 9)
           for name, program in (("rounded", rounded), ("carried", carried))}
    assert kl(want, got["carried"]) < 1e-3 < kl(want, got["rounded"])


def int4_matrices(program: bytes, shape) -> list[np.ndarray]:
    from ai_edge_litert import schema_py_generated as schema

    from edgepack.exporters.litert_carry import unpack_int4

    model = schema.ModelT.InitFromPackedBuf(program, 0)
    return [unpack_int4(np.asarray(model.buffers[t.buffer].data, np.uint8), tuple(shape))
            for g in model.subgraphs for t in g.tensors
            if t.type == schema.TensorType.INT4 and tuple(int(n) for n in t.shape) == tuple(shape)]


def weight_types(program: bytes) -> dict[str, str]:
    """Output tensor name -> weight tensor type of every FULLY_CONNECTED / EMBEDDING_LOOKUP op in the program."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(program, 0)
    ops = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    found = {}
    for graph in model.subgraphs:
        for op in graph.operators:
            code = model.operatorCodes[op.opcodeIndex]
            if ops[max(code.builtinCode, code.deprecatedBuiltinCode)] in ("FULLY_CONNECTED", "EMBEDDING_LOOKUP"):
                found[graph.tensors[op.outputs[0]].name.decode()] = types[graph.tensors[op.inputs[1]].type]
    return found


@pytest.fixture(scope="module")
def student_folder(tmp_path_factory, default_student):
    cfg = tiny_config(vocab_size=default_student.config.vocab_size, max_position_embeddings=1024,
                      tie_word_embeddings=False)
    return write_student_folder(tmp_path_factory.mktemp("litert") / "student", default_student, cfg,
                                random_model(cfg, max_context=256))


@pytest.fixture(scope="module")
def fp32_bundle(student_folder, tmp_path_factory):
    """A tiny fp32 export through the whole pipeline, quality gate included."""
    out = tmp_path_factory.mktemp("litert") / "fp32"
    run_export(plan_export(str(student_folder), "host", quant="fp32", max_context=256, output=out, backend="litert"))
    return out


def test_export_passes_the_gate_and_streams_through_a_session(fp32_bundle):
    import json

    manifest = json.loads((fp32_bundle / "manifest.json").read_text())
    assert manifest["backend"]["name"] == "litert" and manifest["verification"]["status"] == "passed"
    assert manifest["verification"]["teacher_forcing"]["top1_agreement"] >= 0.99
    assert (fp32_bundle / "model.litertlm").stat().st_size > (fp32_bundle / "model.tflite").stat().st_size
    session = runtime.load(fp32_bundle)
    chunks = list(session.generate(PROMPTS[0], max_new_tokens=12, temperature=0))
    assert "".join(c.text for c in chunks) == session.complete(PROMPTS[0], max_new_tokens=12, temperature=0).text
    assert session.last_stats is not None and session.last_stats.prompt_tokens > PREFILL


def litert_lm_greedy(bundle, session, prompt: str, tokens: int, cache_dir) -> str:
    """LiteRT-LM's own greedy reply to the prompt as edgepack renders it. LiteRT-LM puts the start token in front
    of what it is given (runtime/core/pipeline.cc), so the rendered text goes in without it."""
    import litert_lm

    text, ids = session.prompt_ids(prompt)
    bos = session.manifest["tokenizer"]["bos_id"]
    if bos is not None and ids[0] == bos:
        bos_text = session.tokenizer.decode([bos], skip_special=False)
        assert text.startswith(bos_text)
        text = text[len(bos_text):]
    engine = litert_lm.Engine(str(bundle / "model.litertlm"), cache_dir=str(cache_dir))
    reply = engine.create_session(apply_prompt_template=False, max_output_tokens=tokens,
                                  sampler_config=litert_lm.SamplerConfig(top_k=1, temperature=0.0))
    reply.run_prefill([text])
    return reply.run_decode().texts[0]


def assert_litert_lm_equals_edgepack_run(bundle, cache_dir, prompts=PROMPTS, tokens: int = 32) -> None:
    pytest.importorskip("litert_lm")
    session = runtime.load(bundle, backend="litert")
    for prompt in prompts:
        ours = session.complete(prompt, max_new_tokens=tokens, temperature=0).text
        assert litert_lm_greedy(bundle, session, prompt, tokens, cache_dir) == ours, prompt


def test_litert_lm_loads_the_litertlm_and_answers_as_edgepack_run(fp32_bundle, tmp_path):
    assert_litert_lm_equals_edgepack_run(fp32_bundle, tmp_path)


def test_unsupported_preset_and_npu_without_its_sdk_are_refused_before_loading(student_folder, tmp_path):
    with pytest.raises(UsageError, match="no 'fp16' preset"):
        plan_export(str(student_folder), "pixel-9", quant="fp16", output=tmp_path / "a", backend="litert")
    with pytest.raises(EdgepackError, match="ai-edge-litert-sdk-google-tensor"):
        plan_export(str(student_folder), "pixel-9", output=tmp_path / "b", backend="litert/tensor")
    with pytest.raises(UsageError, match="unknown LiteRT delegate"):
        plan_export(str(student_folder), "pixel-9", output=tmp_path / "c", backend="litert/gpu2")


# --- the default model (slow) ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_litert_bundle(tmp_path_factory):
    """The default model for pixel-9 through LiteRT (int4): one export for the slow tests below."""
    out = tmp_path_factory.mktemp("default") / "litert"
    run_export(plan_export(None, "pixel-9", backend="litert", output=out))
    return out


@pytest.mark.slow
def test_default_int4_bundle_answers_paris(default_litert_bundle):
    session = runtime.load(default_litert_bundle)
    assert "Paris" in session.complete("Name the capital city of France.", max_new_tokens=32, temperature=0).text


@pytest.mark.slow
def test_litert_lm_equals_edgepack_run_on_the_default_model(default_litert_bundle, tmp_path):
    assert_litert_lm_equals_edgepack_run(default_litert_bundle, tmp_path)
