"""Lower the decoder to LiteRT (the successor of TensorFlow Lite) for Android: a `.tflite` with `prefill_T` and
`decode` signatures and an external KV cache (`exporters/litert_program.py`), converted by litert-torch and
quantized by ai-edge-quantizer, plus a `.litertlm` (LiteRT-LM's bundle: the same model, the tokenizer, start/stop
tokens, the chat template) that Google's LiteRT-LM runtime loads as it is.

Presets (ai-edge-quantizer "dynamic" recipes: int weights, activations rounded to int8 per call by LiteRT's
kernels, as XNNPACK's qd8 kernels do for ExecuTorch):
  fp32  no quantization
  int8  every linear and the output layer int8 per output channel; embedding int8 per row
  int4  layer linears int4 per block of 32 (symmetric, fp16 scales), the student's GGUF Q4_0/Q4_1/Q4_K blocks
        carried exactly (`litert_carry.py`); output layer int8 per channel; embedding int8 per row (LiteRT's int4
        blocks would round it again: +0.7% perplexity on the default model for 14 MB)
The exporter rounds the weights itself first (`litert_rounding`, also the gate's same-weights model) on the grid the
quantizer uses (scale = absmax / 7 or / 127, symmetric), which the quantizer then finds again unchanged; carried
blocks are written over the quantizer's afterwards. A GGUF's 5- to 8-bit linears are rounded to int4 here (the
recipe has no per-matrix exception yet).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, Callable

from edgepack.errors import EdgepackError, UsageError
from edgepack.exporters import ExportRequest, register_exporter

PROGRAM_FILE = "model.tflite"
LITERTLM_FILE = "model.litertlm"
PRESETS = ("fp32", "int8", "int4")
TOOLCHAIN_PIN = "litert-torch==0.10.0 ai-edge-quantizer==0.10.0 litert-lm-builder==0.18.1 ai-edge-litert==2.3.0"
# --backend litert/<delegate>: cpu (XNNPACK; also what the GPU delegate loads), or an NPU compiled ahead of time
NPU_DELEGATES = {"tensor": "google-tensor", "qualcomm": "qualcomm", "mediatek": "mediatek"}
INT4_BLOCK = 32


def check_litert_export(target: Any, delegate: str | None, preset: Any) -> None:
    """Everything that can fail cheaply, before the model is loaded."""
    if preset.name not in PRESETS:
        raise UsageError(f"the LiteRT exporter has no {preset.name!r} preset", f"use --quant {' or '.join(PRESETS)}")
    if delegate in NPU_DELEGATES:
        from edgepack.exporters.litert_npu import check_npu

        check_npu(delegate, target)
    elif delegate not in (None, "cpu"):
        raise UsageError(f"unknown LiteRT delegate {delegate!r}",
                         f"use --backend litert, litert/cpu or litert/{' or litert/'.join(NPU_DELEGATES)}")
    missing = [m for m in ("litert_torch", "ai_edge_quantizer", "litert_lm_builder", "ai_edge_litert")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise EdgepackError(f"the LiteRT toolchain is not installed ({', '.join(missing)} missing)",
                            "pip install 'edgepack[litert]'")


def litert_rounding(preset: Any, blocks: Any) -> Callable[[str, Any], None]:
    """What the quantized program stores, as a `build_model` prepare step (see the module docstring): each
    weight replaced by its own symmetric rounding, or (int4) by the student's GGUF int4 blocks as `CarriedLinear`s;
    the output layer untied from the embedding table."""
    import torch
    from torch import nn

    from edgepack.blocks import Int4Blocks
    from edgepack.exporters.litert_carry import CarriedLinear

    linear_bits = {"int8": 8, "int4": 4}.get(preset.name)
    group = INT4_BLOCK if linear_bits == 4 else 0
    to_int8 = lambda w: litert_round_trip(w, 8, 0)  # noqa: E731

    def carry(piece: nn.Module, prefix: str) -> set[str]:
        carried = set()
        for name, module in list(piece.named_modules()):
            found = blocks.get(f"{prefix}.{name}.weight")
            if isinstance(module, nn.Linear) and isinstance(found, Int4Blocks) and found.codes.shape[1] % group == 0:
                parent, _, attr = name.rpartition(".")
                setattr(piece.get_submodule(parent), attr, CarriedLinear(module, found.with_positive_scales(), to_int8))
                carried.add(name)
        return carried

    def prepare(prefix: str, piece: nn.Module) -> None:
        if linear_bits is None:
            return
        with torch.no_grad():
            if prefix in ("model.embed_tokens", "lm_head"):  # int8 per row / output channel
                piece.weight = nn.Parameter(to_int8(piece.weight), requires_grad=False)
                return
            carried = carry(piece, prefix) if linear_bits == 4 else set()
            for name, module in piece.named_modules():
                if isinstance(module, nn.Linear) and not any(name.startswith(c) for c in carried):
                    module.weight.copy_(litert_round_trip(module.weight, linear_bits, group))

    return prepare


def litert_round_trip(weight: Any, bits: int, block: int) -> Any:
    """`weight` [rows, cols] rounded as ai-edge-quantizer's symmetric min/max recipe rounds it, back in float32:
    one scale per row (block 0) or per block of `block` inputs, scale = absmax / qmax, codes rounded half to
    even and clipped to [-2^(bits-1), qmax] (8 bits: narrow, [-127, 127])."""
    import torch

    qmax = 2 ** (bits - 1) - 1
    qmin = -qmax if bits >= 8 else -qmax - 1
    rows = weight.shape[0]
    groups = weight.detach().float().reshape(rows, -1, block or weight.shape[1])
    scale = groups.abs().amax(-1, keepdim=True).clamp(min=1e-9) / qmax
    return (torch.clamp(torch.round(groups / scale), qmin, qmax) * scale).reshape(weight.shape)


def quantize_program(program: bytes, preset: Any) -> bytes:
    """The float program with the preset's weights as int tensors (ai-edge-quantizer, dynamic recipes)."""
    from ai_edge_quantizer import qtyping, quantizer

    ops, granularity = qtyping.TFLOperationName, qtyping.QuantGranularity
    bits, group = {"int8": (8, granularity.CHANNELWISE), "int4": (4, granularity.BLOCKWISE_32)}[preset.name]
    engine = quantizer.Quantizer(program)
    engine.add_dynamic_config(regex=".*", operation_name=ops.FULLY_CONNECTED, num_bits=bits, granularity=group)
    # the output layer's op is named by its output tensor, `decode_logits_output` (it runs in decode only)
    engine.add_dynamic_config(regex="logits|lm_head", operation_name=ops.FULLY_CONNECTED, num_bits=8,
                              granularity=granularity.CHANNELWISE)
    engine.add_dynamic_config(regex="offsets", operation_name=ops.FULLY_CONNECTED, num_bits=8,
                              granularity=granularity.CHANNELWISE)
    engine.add_dynamic_config(regex=".*", operation_name=ops.EMBEDDING_LOOKUP, num_bits=8,
                              granularity=granularity.CHANNELWISE)
    return bytes(engine.quantize().quantized_model)


def convert_program(model: Any, max_prefill: int, max_context: int) -> bytes:
    """litert-torch conversion of the two signatures LiteRT-LM drives: `prefill_{max_prefill}` (KV cache only) and
    `decode` (one token, logits), both over a [1, max_context, kv_heads, head_dim] cache per layer tensor."""
    import torch
    from litert_torch._convert.interface import Converter

    from edgepack.exporters.litert_program import LiteRtProgram, empty_cache

    converter = Converter()
    for name, length, logits in ((f"prefill_{max_prefill}", max_prefill, False), ("decode", 1, True)):
        sample = dict(tokens=torch.zeros((1, length), dtype=torch.int32),
                      input_pos=torch.arange(length, dtype=torch.int32), kv_cache=empty_cache(model, max_context))
        converter.add_signature(name, LiteRtProgram(model, logits=logits).eval(), sample_kwargs=sample)
    with torch.no_grad():
        return bytes(converter.convert().model_content())


@register_exporter("litert", quantizes=True, preflight=check_litert_export, same_weights=litert_rounding)
def export_litert(request: ExportRequest) -> dict[str, Any]:
    """Write model.tflite and model.litertlm; returns the manifest's backend section."""
    from edgepack.exporters.litert_carry import carried_blocks_of, write_carried_blocks
    from edgepack.model import build_model

    logging.getLogger("litert_torch").setLevel(logging.ERROR)
    preset = request.preset
    assert preset is not None
    if request.delegate in NPU_DELEGATES:  # preflight refused it already unless a compiler is present
        from edgepack.exporters.litert_npu import check_npu

        check_npu(request.delegate, request.target)
    cfg = request.model.config
    request.step("build model", total=cfg.num_layers + 3)
    rounding = litert_rounding(preset, request.gguf_blocks) if preset.quantized else None
    model = build_model(cfg, request.model.state_dict(), request.max_context, prepare=rounding,
                        on_piece=request.step.advance)
    request.step("litert-torch convert (prefill and decode signatures)")
    program = convert_program(model, request.max_prefill, request.max_context)
    carried = carried_blocks_of(model)
    del model
    carried_count = 0
    if preset.quantized:
        request.step(f"ai-edge-quantizer ({preset.name})")
        program = quantize_program(program, preset)
        if carried:
            request.step("write the GGUF int4 blocks over the quantizer's")
            program, carried_count = write_carried_blocks(program, carried)
            if carried_count != len(carried):
                raise EdgepackError(f"only {carried_count} of {len(carried)} GGUF int4 matrices were found in the "
                                    "LiteRT program", "report this: the quantizer's layout has changed")
    Path(request.writer.path(PROGRAM_FILE)).write_bytes(program)
    request.step("write .litertlm")
    write_litertlm(request, program)
    return {
        "name": "litert",
        "delegate": request.delegate or "cpu",
        "program": PROGRAM_FILE,
        "litertlm": LITERTLM_FILE,
        "prefill_signature": f"prefill_{request.max_prefill}",
        "decode_signature": "decode",
        "logits": "last",  # decode returns the one token's logits; prefill returns only the cache
        "max_prefill": request.max_prefill,
        "weights": preset.name,
        "int4_block": INT4_BLOCK if preset.name == "int4" else None,
        "gguf_blocks_carried": carried_count,  # int4 matrices stored with the student's own codes and scales
        "inputs": "tokens[1,T] int32, input_pos[T] int32, kv_cache_k_i/kv_cache_v_i[1,S,kv_heads,head_dim] f32",
        "outputs": "kv_cache_k_i/kv_cache_v_i (the input cache with T positions written); decode also logits[1,1,vocab]",
        "versions": toolchain_versions(),
    }


def toolchain_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("litert-torch", "ai-edge-quantizer", "ai-edge-litert",
                                             "litert-lm-builder")}


def write_litertlm(request: ExportRequest, program: bytes) -> None:
    """LiteRT-LM's bundle: LlmMetadata (start/stop tokens, the chat template as Jinja, the context), the bundle's
    tokenizer.json (LiteRT-LM's HF tokenizer) and the program as its prefill/decode model."""
    import litert_lm_builder as builder
    from litert_lm_builder.runtime.proto import llm_metadata_pb2, llm_model_type_pb2

    writer = request.writer
    metadata = llm_metadata_pb2.LlmMetadata()
    if request.bos_id is not None:
        metadata.start_token.token_ids.ids.append(request.bos_id)
    for eos in request.eos_ids:
        metadata.stop_tokens.add().token_ids.ids.append(eos)
    metadata.max_num_tokens = request.max_context
    metadata.llm_model_type.CopyFrom(llm_model_type_pb2.LlmModelType(generic_model=llm_model_type_pb2.GenericModel()))
    template = writer.path("chat_template.jinja")
    if template.exists():
        metadata.jinja_prompt_template = template.read_text(encoding="utf-8")
    parts = writer.path("litertlm-parts")
    parts.mkdir()
    try:
        (parts / "llm_metadata.pb").write_bytes(metadata.SerializeToString())
        (parts / PROGRAM_FILE).write_bytes(program)
        file = builder.LitertLmFileBuilder()
        file.add_system_metadata(builder.Metadata(key="Authors", value="edgepack", dtype=builder.DType.STRING))
        file.add_llm_metadata(str(parts / "llm_metadata.pb"))
        file.add_hf_tokenizer(str(writer.path("tokenizer.json")))
        file.add_tflite_model(str(parts / PROGRAM_FILE), builder.TfLiteModelType.PREFILL_DECODE)
        with open(writer.path(LITERTLM_FILE), "wb") as out:
            file.build(out)
    finally:
        for item in parts.iterdir():
            item.unlink()
        parts.rmdir()
