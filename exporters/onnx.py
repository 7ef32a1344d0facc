"""Lower the decoder to ONNX for ONNX Runtime: delegate "cpu" (one dynamic-shape model) or "qnn" (the
Snapdragon Hexagon NPU bundle: EPContext models for the target's SoC, plus the CPU model as fallback).

The CPU model takes `input_ids [1, T]`, `attention_mask [1, P + T]` (ones; P = tokens already cached) and
the KV cache of every layer (`past_key_i [1, kv_heads, S, head_dim]`), and returns `logits [1, T, vocab]` and
`present_key_i`. GroupQueryAttention reads the cached length from the mask, so the cache can be one
max-length buffer bound as both past and present (onnxruntime-genai's `past_present_share_buffer`, and what
edgepack's backend does): the bundle is an onnxruntime-genai model folder (`genai_config.json`). Presets:
fp32, and int4 as ONNX Runtime's block-32 `MatMulNBits` (GGUF Q4_0/Q4_1/Q4_K blocks carried exactly, and a GGUF's
5- to 8-bit tensors, Q5_0/Q5_1/Q5_K/Q6_K/Q8_0, as exact 8-bit MatMulNBits blocks: a "Q4_K_M" file keeps its mix;
embedding and output layer int8 per block of 32, one shared table when tied). The graph itself is written by `onnx_graph.py`.

The ternary preset (BitNet b1.58) stores the student's codes as 2-bit MatMulNBits (exact; `onnx_graph.py`) and rounds
each layer linear's input to int8 per token as the model does, in plain ONNX ops. MatMulNBits runs at level 4 (its
int8 kernel; level 0 dequantizes the 2-bit matrix on every call in ORT 1.32, ~260x slower), fed the integer codes
in anchored blocks so that its own int8 rounding changes nothing (`onnx_graph._anchored`): the matmul is exact. A
student whose rows mix scales (a GGUF with differing TQ block scales), or without int8 activations (GGUF BitNets),
is rounded again per block by ORT, as the int4 model is (counted in the manifest: `ternary_rerounded`).

The int4 model computes at MatMulNBits accuracy level 4 (activations rounded to int8 per block, as
llama.cpp's Q4 x Q8 dot products and onnxruntime-genai's CPU builds do): the fp32 path (level 0) is exact
but has no fast single-row kernel, and the 8-bit 49152-row output layer alone took 238 of 314 ms per
decoded token (SmolLM2-135M, 2 threads); level 4 decodes in 13 ms.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from edgepack.errors import EdgepackError, UsageError
from edgepack.exporters import ExportRequest, register_exporter

CPU_PROGRAM = "model.onnx"
GENAI_TYPES = {"bitnet": "llama"}  # our architecture -> onnxruntime-genai model type, where they differ
GENAI_CONFIG = "genai_config.json"  # makes the bundle an onnxruntime-genai model folder
PRESET_WEIGHTS = {"fp32": "fp32", "int4": "int4", "ternary": "ternary"}  # edgepack preset -> onnx_graph weights flavour
INT8_ACTIVATIONS = 4  # MatMulNBits accuracy_level of the int4 and ternary CPU models (see above)
NPU_PRESETS = ("fp32", "int4")  # the NPU graphs are 8-bit QDQ whatever the preset; no BitNet layers there
ORT_PIN = "onnx==1.23.2 onnxruntime==1.32.0"


def require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise EdgepackError(f"the ONNX toolchain is not installed ({e})", f"pip install {ORT_PIN}") from None


def check_onnx_export(target: Any, delegate: str | None, preset: Any) -> None:
    """Everything that can fail cheaply, before the model is loaded."""
    if preset.name not in PRESET_WEIGHTS:
        raise UsageError(
            f"the ONNX exporter has no {preset.name!r} preset", f"use --quant {' or '.join(PRESET_WEIGHTS)}"
        )
    if delegate not in (None, "cpu", "qnn"):
        raise UsageError(f"unknown ONNX delegate {delegate!r}", "use --backend onnx/cpu or onnx/qnn")
    if delegate == "qnn" and preset.name not in NPU_PRESETS:
        raise UsageError(f"the {preset.name} preset has no ONNX NPU build", "use --backend onnx/cpu")
    require_onnx()
    if delegate == "qnn":
        from edgepack.exporters.onnx_qnn import npu_options

        npu_options(target)  # onnxruntime-qnn present, SoC and HTP arch known and consistent


# Size of one QNN HTP context binary per stored weight byte: 196.3 MB for SmolLM2-135M's 162.8 M weights
# (untied output layer) at 8 bits, compiled by QNN 2.51.
CONTEXT_BINARY_OVERHEAD = 1.21


def npu_bundle_bytes(config: Any, target: Any, delegate: str | None) -> float:
    """The NPU flavour adds two context binaries (prefill and decode graph), each with every weight."""
    if delegate != "qnn":
        return 0.0
    from edgepack.exporters.onnx_qnn import target_options

    bits = int(target_options(target)["npu_weight_bits"])
    stored = config.num_parameters() + (config.vocab_size * config.hidden_size if config.tie_word_embeddings else 0)
    return 2 * stored * bits / 8 * CONTEXT_BINARY_OVERHEAD


def npu_context(target: Any, delegate: str | None) -> int | None:
    """NPU bundles have one context: the static graphs' (the CPU model gets the same, so that the manifest,
    `inspect` and every backend of the bundle agree on it)."""
    if delegate != "qnn":
        return None
    from edgepack.exporters.onnx_qnn import target_options

    return int(target_options(target)["npu_context"])


def onnx_rounding(preset: Any, blocks: Any) -> Any:
    """What the quantized CPU model stores, as a `build_model` prepare step: the embedding and the output layer
    as int8 blocks of 32; each linear as its int4 blocks of 32 (int4: the student's GGUF blocks where it has
    them, else `int4_blocks_from_float`) or as the student's ternary codes times their scales (ternary: `blocks`
    are its `ternary_blocks`, nothing rounded); norms and biases in fp32. The gate runs this model against the
    bundle: what remains is ONNX Runtime's int8 activations (accuracy level 4) and the lowering itself."""
    import torch
    from torch import nn

    from edgepack.exporters.onnx_graph import int4_blocks_from_float, int8_round_trip

    weights = PRESET_WEIGHTS.get(preset.name)

    def stored(key: str, module: nn.Linear) -> torch.Tensor:
        if weights == "ternary":
            return blocks[key].dequantize()  # the codes the graph stores; equal to the student's float weights
        return (blocks[key] if key in blocks else int4_blocks_from_float(module.weight)).dequantize()

    def prepare(prefix: str, piece: nn.Module) -> None:
        if weights not in ("int4", "ternary"):
            return
        with torch.no_grad():
            if prefix in ("model.embed_tokens", "lm_head"):
                piece.weight = nn.Parameter(int8_round_trip(piece.weight.detach()), requires_grad=False)
                return
            for name, module in piece.named_modules():
                if isinstance(module, nn.Linear):
                    module.weight.copy_(stored(f"{prefix}.{name}.weight", module))

    return prepare


def onnx_weight_bytes(config: Any, preset: Any) -> dict[str, float] | None:
    """Stored bytes by part of the ternary CPU model (`fit.weight_bytes`' parts), as `_ternary_linear` and
    `_int8_table` write them: 2-bit codes with one fp32 scale per block of 128 (anchored: 127 inputs a block),
    one int8 table per block of 32 for the embedding (shared with a tied output layer), norms and biases in
    fp32. Other presets: None (the fit check's generic estimate, which follows ExecuTorch's layout)."""
    from edgepack.exporters.onnx_graph import BLOCK, REAL_PER_BLOCK, TERNARY_BITS, TERNARY_BLOCK
    from edgepack.fit import small_per_layer

    if PRESET_WEIGHTS.get(preset.name) != "ternary":
        return None
    table = config.vocab_size * config.hidden_size * (1 + 4 / BLOCK)
    h, q, kv = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    stored_cols = lambda k: -(-k // REAL_PER_BLOCK) * TERNARY_BLOCK  # noqa: E731  (anchored layout)
    weights = (q + 2 * kv + 2 * config.intermediate_size) * stored_cols(h) + h * stored_cols(q) \
        + h * stored_cols(config.intermediate_size)
    codes = weights * (TERNARY_BITS / 8 + 4 / TERNARY_BLOCK)
    parts = {
        "layers": config.num_layers * (codes + 4 * small_per_layer(config)),
        "embedding": table,
        "final_norm": 4.0 * config.hidden_size,
    }
    if not config.tie_word_embeddings:
        parts["lm_head"] = table
    return parts


@register_exporter("onnx", quantizes=True, preflight=check_onnx_export, extra_bundle_bytes=npu_bundle_bytes,
                   context_limit=npu_context, same_weights=onnx_rounding, weight_bytes=onnx_weight_bytes)
def export_onnx(request: ExportRequest) -> dict[str, Any]:
    """Write the CPU model (and for delegate "qnn" the NPU context models); returns the backend section."""
    import onnxruntime

    preset_name = request.preset.name if request.preset else "fp32"
    npu = None
    if request.delegate == "qnn":
        from edgepack.exporters.onnx_qnn import check_npu_budget, export_npu, npu_options

        if request.model.config.architecture == "bitnet":
            raise UsageError("the ONNX NPU build has no BitNet layers (sub-norms, int8 activations)",
                             "use --backend onnx/cpu")
        options = npu_options(request.target)
        check_npu_budget(request.model.config, options, request.target)  # before any long work
    cpu = write_cpu_model(request, PRESET_WEIGHTS[preset_name])
    request.writer.write_json(GENAI_CONFIG, genai_config(request))
    if request.delegate == "qnn":
        npu = export_npu(request, options)
    section: dict[str, Any] = {
        "name": "onnx",
        "delegate": request.delegate or "cpu",
        "program": npu["decode_program"] if npu else CPU_PROGRAM,
        "max_prefill": request.max_prefill,
        "onnxruntime": onnxruntime.__version__,
        "cpu": cpu,
        "genai_config": GENAI_CONFIG,
    }
    if npu:
        section["npu"] = npu
        section["fallback"] = "cpu"
    return section


def write_cpu_model(request: ExportRequest, weights: str) -> dict[str, Any]:
    from edgepack.exporters.onnx_graph import GraphSpec, build_decoder

    request.step(f"write ONNX graph ({weights}), by layer", total=request.model.config.num_layers)
    blocks = {"int4": request.gguf_blocks, "ternary": request.ternary_blocks}.get(weights, {})
    level = INT8_ACTIVATIONS if weights in ("int4", "ternary") else 0
    carried: Counter[int] = Counter()
    proto = build_decoder(request.model, GraphSpec(weights, accuracy_level=level), blocks, carried, request.step)
    save_model(proto, request.writer.path(CPU_PROGRAM))
    return {
        "program": CPU_PROGRAM,
        "weights": weights,
        "int4_block": 32 if weights == "int4" else None,
        **(ternary_section(carried) if weights == "ternary" else {}),
        "accuracy_level": level,
        # GGUF blocks kept exactly: 4-bit types as int4 MatMulNBits, 5- to 8-bit ones (Q5_0, Q6_K, Q8_0...) as 8-bit
        "gguf_blocks_carried": carried[4] + carried[8],
        "gguf_blocks_carried_8bit": carried[8],
        "inputs": "input_ids[1,T] int64, attention_mask[1,P+T] int64 (ones), past_key_i/past_value_i"
                  "[1,kv_heads,S,head_dim] (S = P, or one max-length buffer shared with present_*)",
        "outputs": "logits[1,T,vocab], present_key_i/present_value_i[1,kv_heads,max(S,P+T),head_dim]",
    }


def ternary_section(carried: Counter[int]) -> dict[str, Any]:
    """How the ternary codes are stored, for the manifest: bits, the largest MatMulNBits block, matrices carried."""
    from edgepack.exporters.onnx_graph import TERNARY_BITS, TERNARY_BLOCK

    return {"ternary_bits": TERNARY_BITS, "ternary_block": TERNARY_BLOCK, "ternary_carried": carried[TERNARY_BITS],
            "ternary_rerounded": carried["ternary_rerounded"]}


def genai_config(request: ExportRequest) -> dict[str, Any]:
    """onnxruntime-genai's model-folder config (the contract of its `src/config.cpp`, as its own builder writes
    it for GroupQueryAttention models): the CPU model with the shared past/present buffer (genai's fast path).

    NPU bundles: genai gets the CPU model too. Their NPU graphs take RoPE tables and an additive mask from the
    host and compute position 0 on the CPU model (see runtime/onnxruntime_backend.py): a host loop that
    genai's QNN pipeline does not have, so naming the QNN EP here would not run them."""
    cfg = request.model.config
    eos = list(request.eos_ids)
    return {
        "model": {
            # "llama" / "qwen2": genai's decoder-only LLM types; a BitNet graph has the same inputs and outputs
            # (genai runs the graph as written), so it is typed as Llama.
            "type": GENAI_TYPES.get(cfg.architecture, cfg.architecture),
            "bos_token_id": request.bos_id if request.bos_id is not None else eos[0],
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": eos[0],
            "context_length": request.max_context,
            "vocab_size": cfg.vocab_size,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": CPU_PROGRAM,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "num_attention_heads": cfg.num_heads,
                "num_hidden_layers": cfg.num_layers,
                "num_key_value_heads": cfg.num_kv_heads,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_%d", "past_value_names": "past_value_%d"},
                "outputs": {"logits": "logits", "present_key_names": "present_key_%d",
                            "present_value_names": "present_value_%d"},
            },
        },
        "search": {
            "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": request.max_context,
            "min_length": 0, "past_present_share_buffer": True, "early_stopping": True, "length_penalty": 1.0,
            "repetition_penalty": 1.0, "diversity_penalty": 0.0, "no_repeat_ngram_size": 0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def save_model(proto: Any, path: Path) -> None:
    """The graph in `path`, the weights in `<name>.data` beside it (ONNX external data, as onnxruntime-genai's own
    models are written). ONNX Runtime then keeps no in-memory copy of the protobuf's weights next to its own
    tensors: resident after loading, Qwen2.5-Coder-0.5B int4 (702 MB) 980 -> 678 MB, SmolLM2-135M 211 -> 186 MB.
    It also lifts protobuf's 2 GB limit on a single file."""
    import onnx

    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=Path(path).name + ".data", size_threshold=1024)
