"""Lower a (quantized) `CausalLM` to an ExecuTorch program (.pte) with the XNNPACK delegate.

Steps: (1) swap the KV cache and attention for ExecuTorch's custom ops (in-place cache update, SDPA that
reads only the filled prefix), (2) torch.export with a dynamic token count, (3) lower the linears to
XNNPACK (int4/int8 kernels for the torchao patterns), (4) emit the program with the metadata methods
ExecuTorch's own LLM runners read (BOS/EOS ids, max lengths, vocab size).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from edgepack.errors import EdgepackError
from edgepack.exporters import ExportRequest, register_exporter
from edgepack.model import SDPA, CausalLM, KVCache

PROGRAM_FILE = "model.pte"


class CustomOpsKVCache(nn.Module):
    """Same cache layout as `KVCache` ([1, S, Hkv, D]), written in place by `llama::update_cache`."""

    def __init__(self, cache: KVCache) -> None:
        super().__init__()
        self.register_buffer("k", cache.k.clone(), persistent=False)
        self.register_buffer("v", cache.v.clone(), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        torch.ops.llama.update_cache(k, self.k, start)
        torch.ops.llama.update_cache(v, self.v, start)
        return self.k, self.v


class CustomOpsSDPA(nn.Module):
    """`llama::custom_sdpa`: causal attention over cache positions < start + T, GQA handled in the kernel."""

    def __init__(self, sdpa: SDPA) -> None:
        super().__init__()
        self.width = sdpa.num_heads * sdpa.head_dim

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        dtype = q.dtype
        if dtype not in (torch.float32, torch.bfloat16):  # the kernel computes in fp32 or bf16
            q, k, v = q.float(), k.float(), v.float()
        out = torch.ops.llama.custom_sdpa(q, k, v, start, None, 0.0, True)
        return out.to(dtype).reshape(1, q.shape[1], self.width)


def use_executorch_attention(model: CausalLM) -> CausalLM:
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (registers llama:: ops)

    for layer in model.model.layers:
        attn = layer.self_attn
        attn.kv_cache = CustomOpsKVCache(attn.kv_cache)
        attn.sdpa = CustomOpsSDPA(attn.sdpa)
    return model


class PackedInt4Embedding(nn.Module):
    """An int4 embedding table in the layout of ExecuTorch's `embedding_4bit` kernel: two codes per byte,
    fp16 scales, no zero points (the preset's codes are symmetric).

    torchao's own lowering of the same table stores fp32 scales plus an all-zero int8 zero-point tensor
    (2.2 MB more on the default model); fp16 scales through the op's `.dtype` variant read back correctly.
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401  (registers the op)

        unsigned = (codes.to(torch.int16) + 8).to(torch.uint8)
        self.register_buffer("packed", unsigned[:, 0::2] * 16 + unsigned[:, 1::2])
        self.register_buffer("scales", scales.to(torch.float16).contiguous())

    @classmethod
    def from_torchao(cls, embedding: nn.Embedding) -> "PackedInt4Embedding | None":
        weight = embedding.weight
        zero = getattr(weight, "zero_point", None)
        if getattr(weight, "target_dtype", None) != torch.int4 or (zero is not None and bool(zero.any())):
            return None
        return cls(weight.qdata, weight.scale.reshape(weight.qdata.shape[0], -1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized_decomposed.embedding_4bit.dtype(
            self.packed, self.scales, None, -8, 7, tokens, dtype=torch.float32
        )


def pack_int4_embedding(model: CausalLM) -> CausalLM:
    packed = PackedInt4Embedding.from_torchao(model.model.embed_tokens)
    if packed is not None:
        model.model.embed_tokens = packed
    return model


class LastPositionLogits(nn.Module):
    """`forward(tokens [1, T], input_pos [1]) -> logits [1, vocab]` of the last position only, as ExecuTorch's
    own LLM export writes it (`generate_full_logits=False`): the output layer runs over one row per call
    instead of T (a 37-token prompt needed 37 x 49,152 logits for the one the sampler reads), and the
    program's output buffer is vocab floats, not T x vocab. Verification scores every position by feeding
    the program one token at a time (`Session.score`)."""

    def __init__(self, model: CausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.hidden_states(tokens, input_pos)[:, -1, :])


@dataclass
class Metadata:
    bos_id: int | None
    eos_ids: list[int]
    max_context: int
    max_prefill: int
    vocab_size: int

    def constant_methods(self) -> dict[str, Any]:
        # Names as ExecuTorch's LLM runner (extension/llm/runner) reads them.
        return {
            "get_bos_id": self.bos_id if self.bos_id is not None else -1,
            "get_eos_ids": self.eos_ids,
            "get_max_seq_len": self.max_prefill,
            "get_max_context_len": self.max_context,
            "get_vocab_size": self.vocab_size,
            "use_kv_cache": True,
            "enable_dynamic_shape": True,
        }


def lower_to_pte(model: CausalLM, meta: Metadata,
                 step: Callable[[str], None] = lambda _: None) -> tuple[bytes, list[str]]:
    """Export, lower to XNNPACK and serialize; returns the .pte bytes and the operators it calls."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    model = LastPositionLogits(pack_int4_embedding(use_executorch_attention(model)))
    tokens = torch.zeros((1, 2), dtype=torch.long)
    input_pos = torch.zeros((1,), dtype=torch.long)
    seq = torch.export.Dim("seq", min=1, max=meta.max_prefill)
    step("torch.export")
    with torch.no_grad():
        exported = torch.export.export(model, (tokens, input_pos), dynamic_shapes=({1: seq}, None), strict=True)
        exported = exported.run_decompositions({})
    step("lower to XNNPACK")
    edge = to_edge_transform_and_lower(
        exported,
        partitioner=[XnnpackPartitioner()],
        compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True),
        constant_methods=meta.constant_methods(),
    )
    step("emit program")
    program = edge.to_executorch(
        ExecutorchBackendConfig(
            extract_delegate_segments=True,
            do_quant_fusion_and_const_prop=True,
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
        )
    )
    return program.buffer, program_operators(program)


# Operator namespace -> the ExecuTorch kernel library that registers it: CMake target / iOS framework.
KERNEL_LIBRARIES = {
    "llama": ("custom_ops", "kernels_llm"),  # EXECUTORCH_BUILD_KERNELS_LLM
    "quantized_decomposed": ("quantized_ops_lib", "kernels_quantized"),  # EXECUTORCH_BUILD_KERNELS_QUANTIZED
    "aten": ("optimized_native_cpu_ops_lib", "kernels_optimized"),
}


def kernel_libraries(operators: list[str]) -> dict[str, Any]:
    """What an app links for a program besides the runtime and XNNPACK (`xnnpack_backend` / `backend_xnnpack`),
    read from the operators the emitted program calls outside its delegate: a process without their kernels
    fails at method load with "Missing operator". Android's prebuilt `executorch.aar` (LlmModule) has them all."""
    namespaces = sorted({op.split("::")[0] for op in operators if "::" in op})
    return {
        "operators": sorted(operators),
        "cmake": ["xnnpack_backend", *(KERNEL_LIBRARIES[n][0] for n in namespaces if n in KERNEL_LIBRARIES)],
        "ios": ["backend_xnnpack", *(KERNEL_LIBRARIES[n][1] for n in namespaces if n in KERNEL_LIBRARIES)],
    }


def program_operators(program: Any) -> list[str]:
    """`namespace::name[.overload]` of every operator the program's execution plans call."""
    found = set()
    for plan in program.executorch_program.execution_plan:
        for op in plan.operators:
            found.add(op.name + (f".{op.overload}" if op.overload and op.overload != "default" else ""))
    return sorted(found)


def _check_delegate(target: Any, delegate: str | None, preset: Any) -> None:
    """Only XNNPACK lowers our program. Measured with executorch 1.5.1 + coremltools 9.0 (issue #4): the Core ML
    partitioner rejects it: fp32 -> "Placeholder val must be a tensor ... got torch.SymInt" (the dynamic
    token count / cache position reach the delegate as symbolic ints); int4 -> KeyError torch.int8 (the
    torchao dynamic-activation tensors)."""
    if delegate == "coreml":
        raise EdgepackError(
            "ExecuTorch's Core ML delegate cannot lower edgepack's LLM program with executorch 1.5.1 / coremltools 9.0 "
            "(symbolic token count and int8 torchao tensors are rejected)",
            "use --backend coreml (a native Core ML package) or --backend executorch/xnnpack",
        )
    if delegate not in (None, "xnnpack"):
        raise EdgepackError(f"unknown ExecuTorch delegate {delegate!r}", "use executorch/xnnpack")


@register_exporter("executorch", preflight=_check_delegate)
def export_executorch(request: ExportRequest) -> dict[str, Any]:
    """Write model.pte into the bundle; returns the manifest's `backend` section."""
    logging.getLogger("executorch").setLevel(logging.ERROR)
    meta = Metadata(
        bos_id=request.bos_id,
        eos_ids=request.eos_ids,
        max_context=request.max_context,
        max_prefill=request.max_prefill,
        vocab_size=request.model.config.vocab_size,
    )
    pte, operators = lower_to_pte(request.model, meta, request.step)
    Path(request.writer.path(PROGRAM_FILE)).write_bytes(pte)
    return {
        "name": "executorch",
        "delegate": request.delegate,
        "program": PROGRAM_FILE,
        "method": "forward",
        "logits": "last",  # forward returns [1, vocab] for the last input position
        "max_prefill": request.max_prefill,
        # What an app links besides the ExecuTorch runtime and XNNPACK for this program's operators (a process
        # without them fails at method load with "Missing operator"): see `kernel_libraries`.
        "kernel_libraries": kernel_libraries(operators),
    }
