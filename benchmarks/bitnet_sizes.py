"""A random-ternary BitNet b1.58 of microsoft/bitnet-b1.58-2B-4T's shape, and its `-q ternary` export's size and memory.

`write` builds the Hugging Face folder as that checkpoint publishes it (AutoBitLinear offline: each layer linear
packed four codes to a byte by transformers' `pack_weights`, a bf16 `weight_scale`; bf16 embedding and norms),
one safetensors shard per layer: the writer holds one layer's tensors at a time (~70 MB of codes for the 2B shape;
the bf16 embedding is filled in chunks), never the model in fp32. `export` runs `edgepack export -q ternary` in
a child process and reports the bundle's size, the fit check's estimate of it, and the child's peak RSS.

    python benchmarks/bitnet_sizes.py write FOLDER [--shape 2b|tiny]
    python benchmarks/bitnet_sizes.py export FOLDER OUT [--backend onnx/cpu] [--target snapdragon-8-elite] [--no-verify]

Random codes say nothing about quality (the gate's figures on them are meaningless); they measure size and memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from students import widened_tokenizer

# microsoft/bitnet-b1.58-2B-4T's config.json, weights aside.
BITNET_B158_2B: dict[str, Any] = {
    "architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "vocab_size": 128256, "hidden_size": 2560,
    "intermediate_size": 6912, "num_hidden_layers": 30, "num_attention_heads": 20, "num_key_value_heads": 5,
    "hidden_act": "relu2", "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "tie_word_embeddings": True, "attention_bias": False, "bos_token_id": 128000, "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
    "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"},
}  # fmt: skip
# The same layout small enough to export in seconds: checks that the script works.
TINY = {**BITNET_B158_2B, "vocab_size": 49152, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "bos_token_id": 1, "eos_token_id": 2}
SHAPES = {"2b": BITNET_B158_2B, "tiny": TINY}
LINEARS = {"self_attn.q_proj": ("q", "h"), "self_attn.k_proj": ("kv", "h"), "self_attn.v_proj": ("kv", "h"),
           "self_attn.o_proj": ("h", "q"), "mlp.gate_proj": ("i", "h"), "mlp.up_proj": ("i", "h"),
           "mlp.down_proj": ("h", "i")}  # (out, in) by dimension name


def write_bitnet(folder: Path, hf_config: dict[str, Any], seed: int = 0) -> Path:
    """The checkpoint folder: config.json, one shard per layer (+ one for embedding and final norm), the index,
    and the default model's tokenizer widened to the vocabulary."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shards = {"model-embed.safetensors": {
        "model.embed_tokens.weight": bf16_normal((hf_config["vocab_size"], hf_config["hidden_size"]), gen),
        "model.norm.weight": torch.ones(hf_config["hidden_size"], dtype=torch.bfloat16),
    }}
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    del shards
    for layer in range(hf_config["num_hidden_layers"]):
        name = f"model-layer-{layer:03d}.safetensors"
        tensors = layer_tensors(hf_config, layer, gen)
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
    write_tokenizer(folder, hf_config["vocab_size"])
    return folder


def layer_tensors(hf_config: dict[str, Any], layer: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One layer as the checkpoint stores it: packed codes (uint8 [out / 4, in]) and a bf16 scale per linear,
    unit norms (two sub-norms included)."""
    from transformers.integrations.bitnet import pack_weights

    h, heads, kv_heads = hf_config["hidden_size"], hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
    dims = {"h": h, "q": h, "kv": h // heads * kv_heads, "i": hf_config["intermediate_size"]}
    prefix = f"model.layers.{layer}"
    tensors: dict[str, torch.Tensor] = {}
    for linear, (out, inp) in LINEARS.items():
        codes = torch.randint(-1, 2, (dims[out], dims[inp]), generator=gen, dtype=torch.int8)
        tensors[f"{prefix}.{linear}.weight"] = pack_weights(codes)
        # about 1 / sqrt(in): keeps random activations in range (transformers' BitNet stores mean|w| here)
        tensors[f"{prefix}.{linear}.weight_scale"] = torch.tensor([dims[inp] ** -0.5], dtype=torch.bfloat16)
    for norm, width in (("input_layernorm", h), ("post_attention_layernorm", h), ("self_attn.attn_sub_norm", h),
                        ("mlp.ffn_sub_norm", dims["i"])):
        tensors[f"{prefix}.{norm}.weight"] = torch.ones(width, dtype=torch.bfloat16)
    return tensors


def bf16_normal(shape: tuple[int, int], gen: torch.Generator, std: float = 0.02, rows: int = 8192) -> torch.Tensor:
    """N(0, std) in bf16, drawn `rows` rows at a time: the fp32 draw of a 128k-row table would be 1.3 GB."""
    out = torch.empty(shape, dtype=torch.bfloat16)
    for start in range(0, shape[0], rows):
        stop = min(start + rows, shape[0])
        out[start:stop] = torch.randn((stop - start, shape[1]), generator=gen) * std
    return out


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """The embedded default model's tokenizer, widened to `vocab_size` (students.widened_tokenizer)."""
    from edgepack.intake import load_student

    default = load_student(None)
    (folder / "tokenizer.json").write_text(widened_tokenizer(default.tokenizer_files["tokenizer.json"], vocab_size))
    (folder / "tokenizer_config.json").write_bytes(default.tokenizer_files["tokenizer_config.json"])
    if default.chat_template:
        (folder / "chat_template.jinja").write_text(default.chat_template)


def export(folder: Path, out: Path, backend: str, target: str, verify: bool, timeout: float) -> dict[str, Any]:
    """`edgepack export -q ternary` in a child process (so that its peak RSS is its own), and what it wrote."""
    cmd = [sys.executable, "-m", "edgepack.cli", "export", "-m", str(folder), "-t", target, "--backend", backend,
           "-q", "ternary", "-o", str(out), "--force", "--json"] + ([] if verify else ["--no-verify"])
    started = time.perf_counter()
    child = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    row: dict[str, Any] = {"backend": backend, "wall_s": round(time.perf_counter() - started, 1),
                           "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6, 2)}
    if child.returncode:
        return {**row, "status": "error: " + (child.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    files = {f.name: f.stat().st_size for f in out.rglob("*") if f.is_file()}
    manifest = json.loads((out / "manifest.json").read_text())
    return {**row, "status": (manifest.get("verification") or {}).get("status"),
            "bundle_mb": round(sum(files.values()) / 1e6, 1), "largest_files_mb": top_files(files),
            "estimate_mb": round(estimated_bundle(folder, target, backend) / 1e6, 1),
            "cpu": manifest["backend"].get("cpu")}


def top_files(files: dict[str, int], count: int = 3) -> dict[str, float]:
    return {k: round(v / 1e6, 1) for k, v in sorted(files.items(), key=lambda kv: -kv[1])[:count]}


def estimated_bundle(folder: Path, target: str, backend: str) -> float:
    """The fit check's bundle estimate for this folder (config only), as the export's plan computes it."""
    from edgepack.fit import estimate, peek_config
    from edgepack.presets import get_preset
    from edgepack.targets import get_target

    config = peek_config(str(folder))
    tgt = get_target(target)
    return estimate(config, get_preset("ternary"), tgt.default_context, backend, tgt).bundle


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    write = verbs.add_parser("write", help="write the random-ternary checkpoint folder")
    write.add_argument("folder", type=Path)
    write.add_argument("--shape", choices=sorted(SHAPES), default="2b")
    run = verbs.add_parser("export", help="export it with -q ternary and report sizes and peak RSS")
    run.add_argument("folder", type=Path)
    run.add_argument("out", type=Path)
    run.add_argument("--backend", default="onnx/cpu")
    run.add_argument("--target", default="snapdragon-8-elite")
    run.add_argument("--no-verify", action="store_true", help="skip the gate (its fp32 reference: ~10 GB at 2B)")
    run.add_argument("--timeout", type=float, default=7200.0)
    args = parser.parse_args()
    if args.verb == "write":
        started = time.perf_counter()
        write_bitnet(args.folder, SHAPES[args.shape])
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print(json.dumps({"folder": str(args.folder), "seconds": round(time.perf_counter() - started, 1),
                          "peak_rss_gb": round(peak, 2)}))
        return 0
    print(json.dumps(export(args.folder, args.out, args.backend, args.target, not args.no_verify, args.timeout),
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
