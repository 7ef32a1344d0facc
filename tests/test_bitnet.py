"""BitNet b1.58 through edgepack's intake and model, against transformers' own BitNet (the reference).

Tiny random models made here: a float checkpoint (plain linears, as transformers runs a BitNet without
`quantization_config`), the three ternary forms transformers loads (packed BitLinear, packed AutoBitLinear,
online AutoBitLinear), and a llama.cpp GGUF in TQ1_0 / TQ2_0 written with gguf-py. Random weights are far larger
than transformers' init, so a wrong norm, activation or scale moves the logits instead of vanishing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import BitNetConfig
from transformers.integrations.bitnet import pack_weights, unpack_weights

from edgepack.errors import EdgepackError
from edgepack.intake import Student, load_student
from edgepack.model import CausalLM, build_model

from conftest import gguf_name, gguf_writer

VOCAB = 300
# hidden and intermediate are multiples of 256, llama.cpp's ternary block; GQA with two query heads per KV head.
SMALL = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=1,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
GREEDY_TOKENS = 32


@pytest.fixture(autouse=True)
def eager_transformers() -> Iterator[None]:
    """transformers' BitLinear helpers are `torch.compile`d; eager is the same arithmetic without a compiler run.
    One thread: on these tiny tensors, threads only add synchronisation (on the shared 2-core dev machine one
    forward of the BitLinear reference took 0.87 s with two threads, 0.014 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch._dynamo.config.patch(disable=True):
        yield
    torch.set_num_threads(threads)


def tiny_bitnet(seed: int = 0, **overrides: object) -> transformers.PreTrainedModel:
    """A random float BitNet: norms near 1, biases and weights with std 0.5 / 0.3."""
    torch.manual_seed(seed)
    config = BitNetConfig(**{**SMALL, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.2 if name.endswith("norm.weight") else 0.5 if name.endswith("bias") else 0.3
            p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + scale * torch.randn(p.shape, generator=gen))
    return model


def write_tokenizer(folder: Path) -> None:
    """A word-level tokenizer of VOCAB tokens: <s> = 0 (BOS), </s> = 1 (EOS)."""
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    (folder / "tokenizer.json").write_text(tokenizer.to_str())
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def save_folder(folder: Path, model: transformers.PreTrainedModel, state: dict[str, torch.Tensor] | None = None,
                quantization: dict | None = None) -> Path:
    """save_pretrained's folder, or `state` written as the checkpoint with `quantization` in config.json."""
    model.save_pretrained(folder)
    if state is not None:
        for old in folder.glob("*.safetensors"):
            old.unlink()
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    if quantization is not None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}))
    write_tokenizer(folder)
    return folder


def prompt(seed: int = 1, length: int = 12) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def ours_of(student: Student) -> CausalLM:
    return build_model(student.config, student.state_dict, max_context=64)


def assert_logits_close(ours: torch.Tensor, theirs: torch.Tensor, rel: float, flips: int = 0) -> None:
    """fp32 agreement: max abs difference within `rel` of the logit scale at every position but at most `flips`.

    Why `flips`: with int8 activations, transformers' BitLinear divides the integer product by both scales where
    ours multiplies by pre-scaled weights; a value within float rounding of an int8 rounding boundary then takes
    the neighbouring code (measured: one position of 12 off by 0.8% of the logit scale, the rest within 1e-5).
    Such a position must still lie within one activation step (2% of the scale)."""
    scale = theirs.abs().max().item()
    per_position = (ours - theirs).abs().amax(dim=-1).flatten()
    off = per_position > rel * scale
    assert int(off.sum()) <= flips, f"max abs diffs {per_position.tolist()} over logit scale {scale:.3g}"
    assert per_position.max().item() <= (0.02 if flips else rel) * scale, f"max abs diff {per_position.max():.3g}"


@torch.no_grad()
def greedy_ours(model: CausalLM, tokens: torch.Tensor, steps: int) -> list[int]:
    """Prefill, then one token per call through the KV cache: the runtime's pattern."""
    model.reset_cache()
    logits, out = model(tokens, torch.tensor([0])), []
    for pos in range(tokens.shape[1], tokens.shape[1] + steps):
        out.append(int(logits[0, -1].argmax()))
        logits = model(torch.tensor([[out[-1]]]), torch.tensor([pos]))
    return out


@torch.no_grad()
def greedy_theirs(model: transformers.PreTrainedModel, tokens: torch.Tensor, steps: int) -> list[int]:
    """transformers' model re-run on the whole sequence each step (no cache to disagree about)."""
    seq = tokens
    for _ in range(steps):
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[0, tokens.shape[1]:].tolist()


def assert_matches(student: Student, reference: transformers.PreTrainedModel, rel: float, flips: int = 0) -> None:
    ours, tokens = ours_of(student), prompt()
    with torch.no_grad():
        assert_logits_close(ours(tokens, torch.tensor([0])), reference(tokens).logits, rel, flips)
    assert greedy_ours(ours, tokens, GREEDY_TOKENS) == greedy_theirs(reference, tokens, GREEDY_TOKENS)


# (a) float checkpoint: transformers runs plain linears, relu2, the two sub-norms.

@pytest.mark.parametrize("overrides", [
    dict(tie_word_embeddings=False),
    dict(num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True),
], ids=["gqa-untied", "mha-tied-biased"])
def test_float_checkpoint_matches_transformers(tmp_path: Path, overrides: dict) -> None:
    hf = tiny_bitnet(**overrides)
    student = load_student(str(save_folder(tmp_path / "bitnet", hf)))
    cfg = student.config
    assert (cfg.architecture, cfg.hidden_act, cfg.int8_activations) == ("bitnet", "relu2", False)
    assert cfg.num_parameters() == sum(p.numel() for p in hf.parameters())  # tied counted once, like ours
    assert student.ternary_blocks == {}
    assert_matches(student, hf, rel=1e-5)


# (b) ternary checkpoints in transformers' three forms.

def ternarize(weight: torch.Tensor) -> tuple[torch.Tensor, float]:
    """BitNet's absmean rounding (WeightQuant): codes in {-1, 0, 1} and the matrix's scale mean|w|."""
    scale = weight.abs().mean().clamp(min=1e-5)
    return (weight / scale).round().clamp(-1, 1).to(torch.int8), float(scale)


def ternary_state(model: transformers.PreTrainedModel, linear_class: str) -> tuple[dict, dict]:
    """The model's state dict with each layer linear packed by transformers' `pack_weights` and its
    `weight_scale` (BitLinear divides by it, AutoBitLinear multiplies), and the codes by weight name."""
    state, codes = dict(model.state_dict()), {}
    for layer in range(model.config.num_hidden_layers):
        for linear in LAYER_LINEARS:
            name = f"model.layers.{layer}.{linear}"
            codes[f"{name}.weight"], scale = ternarize(state[f"{name}.weight"])
            state[f"{name}.weight"] = pack_weights(codes[f"{name}.weight"].clone())
            stored = 1.0 / scale if linear_class == "bitlinear" else scale
            state[f"{name}.weight_scale"] = torch.tensor([stored], dtype=torch.float32)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return state, codes


@pytest.mark.parametrize("linear_class", ["bitlinear", "autobitlinear"])
def test_packed_checkpoint_loads_as_transformers_runs_it(tmp_path: Path, linear_class: str) -> None:
    hf = tiny_bitnet(seed=2, tie_word_embeddings=True, attention_bias=linear_class == "autobitlinear")
    state, codes = ternary_state(hf, linear_class)
    quantization = {"quant_method": "bitnet", "linear_class": linear_class, "quantization_mode": "offline"}
    folder = save_folder(tmp_path / "packed", hf, state, quantization)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    student = load_student(str(folder))
    assert student.config.int8_activations and not any(k.endswith("weight_scale") for k in student.state_dict)
    assert set(student.ternary_blocks.keys()) == set(codes)
    for name, expected in codes.items():
        unpacked = unpack_weights(state[name], dtype=torch.float32)  # transformers' own unpacking
        assert torch.equal(student.ternary_blocks[name].codes, expected), name
        assert torch.equal(unpacked, expected.float()), name
        scale = state[name.replace(".weight", ".weight_scale")]
        value = unpacked / scale if linear_class == "bitlinear" else unpacked * scale
        assert torch.equal(student.state_dict[name], value), name
        assert torch.equal(student.ternary_blocks[name].dequantize(), value), name
    assert_matches(student, reference, rel=1e-5, flips=1 if linear_class == "bitlinear" else 0)


def test_online_checkpoint_is_ternarized_as_transformers_does(tmp_path: Path) -> None:
    hf = tiny_bitnet(seed=3, tie_word_embeddings=False)
    quantization = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}
    folder = save_folder(tmp_path / "online", hf, quantization=quantization)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    student = load_student(str(folder))
    name = "model.layers.1.mlp.down_proj.weight"
    expected, scale = ternarize(hf.state_dict()[name])
    blocks = student.ternary_blocks[name]
    assert torch.equal(blocks.codes, expected) and math.isclose(blocks.scales[0, 0].item(), scale, rel_tol=1e-6)
    assert_matches(student, reference, rel=1e-5)


# (c) llama.cpp GGUF, ternary types written and read with gguf-py.

def write_bitnet_gguf(path: Path, model: transformers.PreTrainedModel, qtype: gguf.GGMLQuantizationType,
                      hidden_activation: str | None) -> dict[str, np.ndarray]:
    """llama.cpp's layout for arch `bitnet` (tied output, rotate-half q/k rows as HF has them, linear rope
    scaling of 1.0 as its converter writes), layer linears ternarized and stored as `qtype`. Returns the bytes
    of each ternary tensor by HF name."""
    writer = gguf_writer(path, "bitnet", model.config)
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(1.0)
    if hidden_activation is not None:
        writer.add_string("bitnet.hidden_activation", hidden_activation)
    stored = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        if any(f".{linear}." in name for linear in LAYER_LINEARS):
            codes, scale = ternarize(tensor)
            stored[name] = gguf.quants.quantize((codes.float() * scale).numpy(), qtype)
            writer.add_tensor(gguf_name(name), stored[name], raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(name), np.ascontiguousarray(tensor.numpy()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.TQ1_0, gguf.GGMLQuantizationType.TQ2_0],
                         ids=["TQ1_0", "TQ2_0"])
def test_ternary_gguf_reads_exactly(tmp_path: Path, qtype: gguf.GGMLQuantizationType) -> None:
    hf = tiny_bitnet(seed=4, tie_word_embeddings=True)
    stored = write_bitnet_gguf(tmp_path / f"tiny-bitnet-{qtype.name}.gguf", hf, qtype, "relu2")
    student = load_student(str(tmp_path / f"tiny-bitnet-{qtype.name}.gguf"))
    assert (student.config.architecture, student.config.hidden_act) == ("bitnet", "relu2")
    assert student.config.rope_scaling is None and not student.config.int8_activations
    assert set(student.ternary_blocks.keys()) == set(stored) and student.gguf_blocks == {}

    # The reference: transformers' float BitNet holding exactly what gguf-py dequantizes.
    with torch.no_grad():
        for name, raw in stored.items():
            value = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
            blocks = student.ternary_blocks[name]
            expected_codes, _ = ternarize(hf.state_dict()[name])
            assert torch.equal(blocks.codes, expected_codes), name
            assert torch.equal(blocks.dequantize(), value) and torch.equal(student.state_dict[name], value), name
            hf.get_parameter(name).copy_(value)
    assert student.gguf_tensor_types["model.layers.0.self_attn.q_proj.weight"] == qtype.name
    assert_matches(student, hf, rel=1e-5)


def test_bitnet_gguf_without_activation_key_is_silu_as_in_llama_cpp(tmp_path: Path) -> None:
    path = tmp_path / "old-bitnet.gguf"
    write_bitnet_gguf(path, tiny_bitnet(seed=5, num_hidden_layers=1), gguf.GGMLQuantizationType.TQ2_0, None)
    assert load_student(str(path)).config.hidden_act == "silu"


def test_gguf_type_that_gguf_py_does_not_know(tmp_path: Path) -> None:
    """bitnet.cpp's I2_S files carry a ggml type id gguf-py has no name for: one line naming the id and the fix."""
    path = tmp_path / "i2s.gguf"
    write_bitnet_gguf(path, tiny_bitnet(seed=5, num_hidden_layers=1), gguf.GGMLQuantizationType.TQ2_0, "relu2")
    data = bytearray(path.read_bytes())
    name = b"blk.0.attn_q.weight"
    at = data.index(name) + len(name) + 4 + 2 * 8  # n_dims (u32), two dims (u64), then the type (u32)
    assert int.from_bytes(data[at : at + 4], "little") == gguf.GGMLQuantizationType.TQ2_0
    data[at : at + 4] = (36).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    err = error_of(path)
    assert "ggml type 36" in str(err) and "convert_hf_to_gguf.py" in str(err)


# (d) hostile or malformed BitNet checkpoints: one line each, never a traceback.

def error_of(source: Path) -> EdgepackError:
    with pytest.raises(EdgepackError) as caught:
        student = load_student(str(source))
        for name in student.state_dict.keys():  # lazily read values fail when read
            student.state_dict[name]
    assert "\n" not in str(caught.value)
    return caught.value


def edited_config(folder: Path, **changes: object) -> Path:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


@pytest.fixture(scope="module")
def packed_parts() -> tuple[transformers.PreTrainedModel, dict]:
    hf = tiny_bitnet(seed=6, num_hidden_layers=1, tie_word_embeddings=True)
    return hf, ternary_state(hf, "bitlinear")[0]


BITLINEAR = {"quant_method": "bitnet", "linear_class": "bitlinear"}


@pytest.mark.parametrize(("changes", "problem"), [
    (dict(hidden_act="gelu"), "hidden_act = 'gelu' (a string), not one of silu, relu2"),
    (dict(num_attention_heads="4"), "num_attention_heads = '4' (a string), not a positive whole number"),
    (dict(quantization_config={**BITLINEAR, "linear_class": "int2"}), "linear_class = 'int2'"),
    (dict(quantization_config={**BITLINEAR, "quantization_mode": 7}), "quantization_mode = 7"),
    (dict(quantization_config={**BITLINEAR, "use_rms_norm": True}), "use_rms_norm"),
    (dict(quantization_config={**BITLINEAR, "modules_to_not_convert": ["model.layers.0"]}), "modules_to_not_convert"),
])
def test_malformed_config(tmp_path: Path, packed_parts: tuple, changes: dict, problem: str) -> None:
    hf, state = packed_parts
    folder = edited_config(save_folder(tmp_path / "m", hf, state, BITLINEAR), **changes)
    assert problem in str(error_of(folder))


def test_hostile_packed_weights(tmp_path: Path, packed_parts: tuple) -> None:
    hf, state = packed_parts
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    cases = {
        "code3": ({**state, q_proj: state[q_proj] | 3}, "holds the 2-bit code 3"),
        "no-scale": ({k: v for k, v in state.items() if k != q_proj.replace("weight", "weight_scale")},
                     "has no model.layers.0.self_attn.q_proj.weight_scale"),
        "zero-scale": ({**state, q_proj.replace("weight", "weight_scale"): torch.zeros(1)}, "not a finite non-zero"),
        "wide-scale": ({**state, q_proj.replace("weight", "weight_scale"): torch.ones(4)}, "one scale per matrix"),
        "short": ({**state, q_proj: state[q_proj][:-1]}, "q_proj.weight has shape (252, 256)"),
        "float": ({**state, q_proj: state[q_proj].float()}, "not packed uint8"),
    }
    for case, (broken, problem) in cases.items():
        assert problem in str(error_of(save_folder(tmp_path / case, hf, broken, BITLINEAR))), case
