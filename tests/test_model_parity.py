"""Our export-friendly `CausalLM` against transformers' own Llama/Qwen2: same logits, prefill and decode.

Random tiny models get weights far larger than transformers' init (std 0.02), so attention is peaked and a
wrong RoPE, head grouping or bias would move the logits instead of vanishing in a uniform average.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from transformers import LlamaConfig, Qwen2Config

from edgepack.intake import Student, default_model_path, load_student
from edgepack.model import ModelConfig, build_model

PROMPT = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"


def assert_logits_close(ours: torch.Tensor, theirs: torch.Tensor, rel: float = 1e-4) -> None:
    """fp32 agreement: max abs difference within `rel` of the logit scale."""
    scale = theirs.abs().max().item()
    diff = (ours - theirs).abs().max().item()
    assert diff <= rel * scale, f"max abs diff {diff:.3g} over logit scale {scale:.3g}"


def hf_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def our_logits(model: torch.nn.Module, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, torch.tensor([start]))


def assert_decode_matches(ours: torch.nn.Module, reference: torch.Tensor, tokens: torch.Tensor, prefill: int) -> None:
    """Prefill `prefill` tokens, then feed the rest one at a time; every step equals the full-sequence logits."""
    ours.reset_cache()
    assert_logits_close(our_logits(ours, tokens[:, :prefill]), reference[:, :prefill])
    for pos in range(prefill, tokens.shape[1]):
        step = our_logits(ours, tokens[:, pos : pos + 1], start=pos)
        assert_logits_close(step[0, -1], reference[0, pos])


def randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def tiny_hf(config: transformers.PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    randomize(model, seed)
    return model


SMALL = dict(
    vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
)
TINY_CONFIGS = {
    "qwen2-gqa-tied": Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0),
    "qwen2-mha-untied": Qwen2Config(**SMALL, num_key_value_heads=4, tie_word_embeddings=False, rope_theta=1e6),
    "llama-gqa": LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0),
    "llama-tied-headdim": LlamaConfig(**SMALL, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True),
    "llama3-rope-scaling": LlamaConfig(
        **SMALL, num_key_value_heads=2, rope_theta=10000.0,
        # original context 16 so that the scaled low frequencies matter within a 40-token test sequence
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    ),
}


def legacy_dict(config: transformers.PretrainedConfig) -> dict:
    """config.to_dict() as transformers 4 wrote it: rope scaling under `rope_scaling`."""
    d = config.to_dict()
    params = d.get("rope_parameters") or {}
    if params.get("rope_type", "default") != "default":
        d["rope_scaling"] = params
    return d


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_tiny_random_models_match_transformers(name: str) -> None:
    hf_config = TINY_CONFIGS[name]
    hf = tiny_hf(hf_config)
    cfg = ModelConfig.from_hf(legacy_dict(hf_config))
    assert cfg.attention_bias == (hf_config.model_type == "qwen2")
    assert cfg.tie_word_embeddings == hf_config.tie_word_embeddings
    assert (cfg.rope_scaling is not None) == (name == "llama3-rope-scaling")
    ours = build_model(cfg, hf.state_dict(), max_context=64)
    tokens = torch.randint(0, hf_config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    reference = hf_logits(hf, tokens)
    assert_logits_close(our_logits(ours, tokens), reference)
    assert_decode_matches(ours, reference, tokens, prefill=30)


def test_llama3_scaling_is_not_a_no_op() -> None:
    """Guards the test above: dropping the scaling must break parity, or the scaled case proves nothing."""
    hf_config = TINY_CONFIGS["llama3-rope-scaling"]
    hf = tiny_hf(hf_config)
    unscaled = {k: v for k, v in legacy_dict(hf_config).items() if k not in ("rope_scaling", "rope_parameters")}
    ours = build_model(ModelConfig.from_hf(unscaled), hf.state_dict(), max_context=64)
    tokens = torch.randint(0, hf_config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    with pytest.raises(AssertionError):
        assert_logits_close(our_logits(ours, tokens), hf_logits(hf, tokens))


def test_from_hf_reads_transformers5_rope_parameters() -> None:
    assert ModelConfig.from_hf(TINY_CONFIGS["llama3-rope-scaling"].to_dict()).rope_scaling is not None


def test_saved_folder_loads_back_equal(tmp_path: Path, default_student: Student) -> None:
    """A transformers-saved Qwen2 folder (sharded safetensors) comes back through intake weight for weight."""
    hf_config = Qwen2Config(**{**SMALL, "vocab_size": default_student.config.vocab_size},
                            num_key_value_heads=2, tie_word_embeddings=False)
    hf = tiny_hf(hf_config, seed=3)
    hf.save_pretrained(tmp_path, max_shard_size="1MB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tmp_path / name).write_bytes(default_student.tokenizer_files[name])

    student = load_student(str(tmp_path))
    assert student.name == tmp_path.name and student.source == str(tmp_path)
    assert student.config == ModelConfig.from_hf(hf_config.to_dict())
    assert student.gguf_tensor_types is None
    assert student.chat_template == default_student.chat_template
    assert (student.bos_id, student.eos_ids, student.add_bos) == (1, [2], False)
    assert {"generation_config.json", "tokenizer.json"} <= student.tokenizer_files.keys()
    expected = hf.state_dict()
    assert student.state_dict.keys() == expected.keys()
    for key, value in expected.items():
        assert student.state_dict[key].dtype == torch.float32
        assert torch.equal(student.state_dict[key], value), key
    tokens = torch.randint(0, hf_config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    ours = build_model(student.config, student.state_dict, max_context=16)
    assert_logits_close(our_logits(ours, tokens), hf_logits(hf, tokens))


def test_saved_llama3_folder_keeps_its_rope_scaling(tmp_path: Path, default_student: Student) -> None:
    """transformers 5 saves Llama 3 scaling as `rope_parameters` only; intake must not drop it."""
    hf_config = LlamaConfig.from_dict({**TINY_CONFIGS["llama3-rope-scaling"].to_dict(),
                                       "vocab_size": default_student.config.vocab_size})
    hf = tiny_hf(hf_config)
    hf.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes(default_student.tokenizer_files[name])
    student = load_student(str(tmp_path))
    assert student.config.rope_scaling == {**TINY_CONFIGS["llama3-rope-scaling"].rope_parameters, "rope_theta": 10000.0}
    tokens = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(4))
    ours = build_model(student.config, student.state_dict, max_context=64)
    assert_logits_close(our_logits(ours, tokens), hf_logits(hf, tokens))


# --- the default model against transformers' GGUF loader (slow: ~20 s to load on the HF side) ------------


@pytest.fixture(scope="module")
def hf_default() -> torch.nn.Module:
    path = default_model_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="module")
def prompt_tokens(default_student: Student) -> torch.Tensor:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(default_student.tokenizer_files["tokenizer.json"].decode())
    ids = tokenizer.encode(PROMPT).ids
    assert len(ids) >= 15
    return torch.tensor([ids])


@pytest.mark.slow
def test_default_model_weights_equal_transformers(default_student: Student, hf_default: torch.nn.Module) -> None:
    """Dequantization and the q/k un-permutation agree with transformers' own GGUF loader, tensor by tensor."""
    theirs = hf_default.state_dict()
    ours = default_student.state_dict
    assert ours.keys() == {k for k in theirs if k != "lm_head.weight"}  # tied: stored once
    for key, value in ours.items():
        assert torch.allclose(value, theirs[key], rtol=0, atol=1e-6), key


@pytest.mark.slow
def test_default_model_logits_match_transformers(
    default_student: Student, hf_default: torch.nn.Module, prompt_tokens: torch.Tensor
) -> None:
    ours = build_model(default_student.config, default_student.state_dict, max_context=64)
    reference = hf_logits(hf_default, prompt_tokens)
    assert_logits_close(our_logits(ours, prompt_tokens), reference)
    # prefill 10 tokens, then 5 single-token steps (causal: the first 15 reference rows do not see the rest)
    assert_decode_matches(ours, reference[:, :15], prompt_tokens[:, :15], prefill=10)
    # the continuation is sensible, not just equal: the model answers "Rome"
    assert "Rome" in _decode(default_student, reference[0, -1].argmax().item())


@pytest.mark.slow
def test_default_model_unpermutation_is_load_bearing(
    default_student: Student, hf_default: torch.nn.Module, prompt_tokens: torch.Tensor
) -> None:
    """Re-applying llama.cpp's q/k row order breaks parity: the match above is not a coincidence."""
    cfg = default_student.config
    permuted = dict(default_student.state_dict)
    for key, w in permuted.items():
        if key.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_heads if "q_proj" in key else cfg.num_kv_heads
            permuted[key] = w.reshape(heads, 2, w.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(w.shape)
    wrong = build_model(cfg, permuted, max_context=64)
    with pytest.raises(AssertionError):
        assert_logits_close(our_logits(wrong, prompt_tokens), hf_logits(hf_default, prompt_tokens), rel=1e-2)


def _decode(student: Student, token: int) -> str:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(student.tokenizer_files["tokenizer.json"].decode()).decode([token])
