"""Shared fixtures. Tiny random models keep the default suite fast; the default model is loaded once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgepack.model import CausalLM, ModelConfig


def tiny_config(architecture: str = "llama", vocab_size: int = 320, **overrides) -> ModelConfig:
    fields = dict(
        architecture=architecture,
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        attention_bias=architecture == "qwen2",
        max_position_embeddings=512,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def random_model(cfg: ModelConfig, max_context: int = 128, seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(cfg, max_context)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                param.uniform_(0.8, 1.2)
            else:
                param.normal_(0.0, 0.08)
    model.reset_cache()
    return model.eval()


def tiny_folder_with_default_tokenizer(folder: Path) -> Path:
    """A Hugging Face folder of a tiny random Llama (256 positions) with SmolLM2's real tokenizer: text in and
    out is real, so a bundle of it runs anything the default model's tokenizer runs, in milliseconds."""
    from safetensors.torch import save_file

    from edgepack import intake
    from edgepack.intake import gguf_file

    gguf = intake.default_model_path()
    reader = gguf_file.open_gguf(gguf)
    tokenizer = gguf_file.gguf_tokenizer(gguf, gguf_file.Metadata(reader, gguf))
    cfg = tiny_config(vocab_size=49152)
    model = random_model(cfg, max_context=256)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight" and "kv_cache" not in k}
    save_file(state, str(folder / "model.safetensors"))
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
          "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
          "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
          "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rope_theta": cfg.rope_theta,
          "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": True, "max_position_embeddings": 512,
          "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_ids[0]}
    (folder / "config.json").write_text(json.dumps(hf))
    for name, data in tokenizer.files.items():
        (folder / name).write_bytes(data)
    return folder


def tiny_onnx_bundle(work: Path) -> Path:
    """`work/bundle`: that tiny model exported by `edgepack export` to ONNX Runtime CPU, int4, unverified."""
    from edgepack.export import plan_export, run_export

    (work / "hf").mkdir()
    bundle = work / "bundle"
    run_export(plan_export(str(tiny_folder_with_default_tokenizer(work / "hf")), "host", "int4", 256, bundle,
                           backend="onnx/cpu", verify=False))
    return bundle


def run_sequence(decoder, tokens: np.ndarray) -> np.ndarray:
    """Prefill 12 tokens in two chunks, then decode the rest one by one: the runtime's call pattern."""
    out = [decoder.forward(tokens[:5], 0), decoder.forward(tokens[5:12], 5)]
    out += [decoder.forward(tokens[i : i + 1], i) for i in range(12, len(tokens))]
    return np.concatenate(out)


def write_student_folder(folder, student, cfg: ModelConfig, model: CausalLM):
    """A Hugging Face checkpoint folder: `model`'s weights with `student`'s tokenizer and chat template."""
    import json

    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    skip = "lm_head.weight" if cfg.tie_word_embeddings else None
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != skip}
    save_file(state, str(folder / "model.safetensors"))
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[cfg.architecture]
    hf = {
        "architectures": [arch], "model_type": cfg.architecture, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(hf))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes(student.tokenizer_files[name])
    (folder / "chat_template.jinja").write_text(student.chat_template)
    return folder


@pytest.fixture(scope="session")
def default_student():
    """The embedded default model (SmolLM2-135M-Instruct), read from its GGUF once per session."""
    from edgepack.intake import load_student

    return load_student(None)


# The default model exported once per test session and shared by every slow test that needs a bundle:
# each int4 export lowers 30 layers (minutes on 2 cores), so no test module should export its own copy.


@pytest.fixture(scope="session")
def default_int4_bundle(tmp_path_factory):
    """The README's main job: the default model for pixel-9 (int4, ExecuTorch + XNNPACK)."""
    from edgepack.export import plan_export, run_export

    out = tmp_path_factory.mktemp("default") / "int4"
    run_export(plan_export(None, "pixel-9", output=out))
    return out


@pytest.fixture(scope="session")
def default_fp32_bundle(tmp_path_factory):
    """The default model at fp32 for the host, context 512 (ExecuTorch + XNNPACK)."""
    from edgepack.export import plan_export, run_export

    out = tmp_path_factory.mktemp("default") / "fp32"
    run_export(plan_export(None, "host", quant="fp32", max_context=512, output=out))
    return out


@pytest.fixture(scope="session")
def default_coreml_bundle(tmp_path_factory):
    """The default model for iphone-16-pro: int4 Core ML package (independent of the ExecuTorch fixtures)."""
    from edgepack.export import plan_export, run_export

    out = tmp_path_factory.mktemp("default") / "coreml"
    run_export(plan_export(None, "iphone-16-pro", output=out))
    return out


GGUF_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def add_gguf_tokenizer(writer, vocab_size: int) -> None:
    """A GPT-2 byte-level BPE vocabulary in a GGUF being written: 3 specials (bos 1, eos 2), the 256 byte
    characters, two merges ("Ġt", "he"), then filler tokens up to `vocab_size`."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = GGUF_SPECIALS + list(bytes_to_unicode().values()) + ["Ġt", "he"]
    tokens += [f"<extra_{i}>" for i in range(vocab_size - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * 3 + [1] * (len(tokens) - 3))
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


# Hugging Face -> GGUF tensor names (llama.cpp's convert_hf_to_gguf), for the GGUFs the tests write.
GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.attn_sub_norm": "attn_sub_norm", "mlp.ffn_sub_norm": "ffn_sub_norm",  # BitNet b1.58
}  # fmt: skip
GGUF_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                  "lm_head.weight": "output.weight"}


def gguf_name(hf_name: str) -> str:
    if hf_name in GGUF_TOP_NAMES:
        return GGUF_TOP_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{GGUF_LAYER_NAMES[module]}.{kind}"


def gguf_writer(path, arch: str, cfg):
    """A GGUF writer for a transformers config: the shape, RoPE and norm keys llama.cpp's converter writes, and
    a byte-level BPE vocabulary of `cfg.vocab_size` tokens (`add_gguf_tokenizer`). Tensors are the caller's."""
    import gguf

    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    add_gguf_tokenizer(writer, cfg.vocab_size)
    return writer


def synthetic_table(model, kind: str = "Q8_0") -> dict:
    """Give the embedding table GGUF-quantized weights (SmolLM2's is Q8_0, Qwen2.5-Coder's Q5_0); its blocks."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from edgepack import blocks

    table = model.model.embed_tokens.weight
    raw = quantize(table.detach().numpy(), GGMLQuantizationType[kind])
    found = {"model.embed_tokens.weight": blocks.decode(raw, kind, tuple(table.shape))}
    table.data = found["model.embed_tokens.weight"].dequantize()
    return found
