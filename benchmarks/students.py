"""Students with the shapes people bring, random weights, written as Hugging Face checkpoint folders.

Random weights are fine for what they measure here (export time, peak memory, bundle size, lowering
parity); they say nothing about quantization quality, which needs the real models (see bench_export.py).
The tokenizer is the embedded default model's, its vocabulary widened to the shape's with tokens no text
produces (`widened_tokenizer`): text tokenizes as before, and every id the model can output decodes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

# DeepSeek-R1-Distill-Qwen-1.5B's config.json, weights aside.
R1_DISTILL_QWEN_1_5B: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936,
    "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
    "num_key_value_heads": 2, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "max_position_embeddings": 131072, "torch_dtype": "bfloat16",
}  # fmt: skip
SHAPES = {"r1-distill-qwen-1.5b": R1_DISTILL_QWEN_1_5B}


def write_random_student(folder: Path, hf_config: dict[str, Any], seed: int = 0) -> Path:
    """config.json, one bf16 model.safetensors (N(0, 0.02) weights, unit norms, as a fresh init) and the
    default model's tokenizer. Built tensor by tensor in bf16: the writer holds the file's size, no more."""
    from safetensors.torch import save_file

    from edgepack.intake import load_student
    from edgepack.model import CausalLM, ModelConfig

    folder.mkdir(parents=True, exist_ok=True)
    config = ModelConfig.from_hf(hf_config)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in CausalLM(config, max_context=1).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            state[name] = (torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02).to(torch.bfloat16)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    del state
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
    default = load_student(None)
    (folder / "tokenizer.json").write_text(widened_tokenizer(default.tokenizer_files["tokenizer.json"], config.vocab_size))
    (folder / "tokenizer_config.json").write_bytes(default.tokenizer_files["tokenizer_config.json"])
    if default.chat_template:
        (folder / "chat_template.jinja").write_text(default.chat_template)
    return folder


def widened_tokenizer(tokenizer_json: bytes, vocab_size: int) -> str:
    """tokenizer.json with BPE vocabulary entries `<|unused_N|>` up to `vocab_size` ids: no merge builds them,
    so no text maps to them, but each id decodes (the runtime refuses a tokenizer far smaller than the model)."""
    spec = json.loads(tokenizer_json)
    vocab = spec["model"]["vocab"]
    taken = set(vocab.values()) | {t["id"] for t in spec.get("added_tokens", [])}
    for i in range(vocab_size):
        if i not in taken:
            vocab[f"<|unused_{i}|>"] = i
    return json.dumps(spec, ensure_ascii=False)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    print(write_random_student(args.folder, SHAPES[args.shape]))
