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
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgepack.blocks import BLOCK
from edgepack.errors import EdgepackError
from edgepack.exporters import ExportRequest, register_exporter
from edgepack.exporters.xnnpack_reuse import reuse_lowered_layers
from edgepack.model import Attention, CausalLM, KVCache, RMSNorm, relu_squared, rope_tables, through
from edgepack.progress import SILENT, Steps
from edgepack.quantize import BlockOffsetLinear

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


# Why the program is written anew here rather than exported from `CausalLM` as it is: ExecuTorch's XNNPACK
# lowering runs ~30 graph passes, each re-tracing every node with FakeTensors under the symbolic token count, and
# every op XNNPACK's partitioner refuses splits a layer's delegate. Written as below (2-D activations [T, hidden],
# reshapes with one inferred dimension, no slices or squeezes of dynamic tensors, a 4-D mean, quantization ops
# with meta kernels), each layer is one delegate between ExecuTorch's cache and attention ops, and the default
# model lowers ~3x faster (NOTES.md, "Why the lowering is slow"). The weights are the same tensors; the arithmetic
# is the same up to summation order.


class XnnpackAttention(nn.Module):
    """`Attention` on [T, hidden] activations with ExecuTorch's custom ops (`llama::update_cache` writes the
    cache in place, `llama::custom_sdpa` reads only the filled prefix and handles GQA); RoPE's rotate-half is
    a [D, D] signed permutation matmul, since XNNPACK takes no slice of a dynamic tensor."""

    def __init__(self, attn: Attention) -> None:
        super().__init__()
        rounded = attn.int8_inputs is not None
        self.q_proj, self.k_proj, self.v_proj = (xnnpack_linear(p, rounded) for p in (attn.q_proj, attn.k_proj,
                                                                                     attn.v_proj))
        self.o_proj = xnnpack_linear(attn.o_proj, rounded)
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.kv_cache = CustomOpsKVCache(attn.kv_cache)
        dtype = attn.kv_cache.k.dtype  # the model's float dtype
        self.register_buffer("rotate_half", rotate_half_matrix(attn.head_dim).to(dtype), persistent=False)
        # BitNet only (None for Llama/Qwen2, whose graph stays as it was): the sub-norm before o_proj and the int8
        # rounding of the projections' inputs.
        self.attn_sub_norm = _optional(XnnpackRMSNorm, attn.attn_sub_norm)
        self.int8_inputs = _optional(XnnpackInt8Activations, attn.int8_inputs)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int) -> torch.Tensor:
        d = self.head_dim
        x = through(self.int8_inputs, x)
        q = self.q_proj(x).view(1, -1, self.num_heads, d)
        k = self.k_proj(x).view(1, -1, self.num_kv_heads, d)
        v = self.v_proj(x).view(1, -1, self.num_kv_heads, d)
        q = q * cos + F.linear(q, self.rotate_half) * sin
        k = k * cos + F.linear(k, self.rotate_half) * sin
        k_all, v_all = self.kv_cache.update(start, k, v)
        dtype = q.dtype
        if dtype not in (torch.float32, torch.bfloat16):  # the kernel computes in fp32 or bf16
            q, k_all, v_all = q.float(), k_all.float(), v_all.float()
        out = torch.ops.llama.custom_sdpa(q, k_all, v_all, start, None, 0.0, True)
        out = through(self.attn_sub_norm, out.to(dtype).view(-1, self.num_heads * d))
        return self.o_proj(through(self.int8_inputs, out))


def rotate_half_matrix(dim: int) -> torch.Tensor:
    """R with x @ R^T = cat(-x[half:], x[:half]) (what `apply_rope` computes by slicing), exact in fp32."""
    half = torch.arange(dim // 2)
    rotate = torch.zeros(dim, dim)
    rotate[half, half + dim // 2] = -1.0
    rotate[half + dim // 2, half] = 1.0
    return rotate


class XnnpackRMSNorm(nn.Module):
    """`RMSNorm` with its mean over a 4-D view's two innermost dims: the only mean XNNPACK takes."""

    def __init__(self, norm: RMSNorm) -> None:
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        x4 = x.float().view(-1, 1, 1, width)
        x4 = x4 * torch.rsqrt(x4.pow(2).mean((2, 3), keepdim=True) + self.eps)
        return self.weight * x4.view(-1, width).to(x.dtype)


class XnnpackInt8Activations(nn.Module):
    """BitNet's `Int8Activations` (per-token absmax to int8 codes and back) in ops XNNPACK lowers, so a layer stays
    one delegate: the max over a 4-D view's innermost dim (XNNPACK's max pooling; it takes no `amax`/`round`), 127
    as a constant tensor divided by it, and round-half-to-even as (y + 1.5 * 2^23) - 1.5 * 2^23, which fp32
    addition rounds to the nearest integer, ties to even, exactly as `torch.round` does for |y| < 2^22 (here
    |y| <= 127). Same float operations as the model's otherwise, so the codes are the same."""

    def __init__(self, rounding: nn.Module) -> None:  # the model's `Int8Activations`: stateless, nothing to copy
        super().__init__()
        self.register_buffer("levels", torch.tensor(127.0), persistent=False)
        self.register_buffer("magic", torch.tensor(ROUNDING_MAGIC), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        x4 = x.float().view(-1, 1, 1, width)
        absmax = x4.abs().max(dim=3, keepdim=True).values
        scale = self.levels / absmax.clamp(min=1e-5)
        codes = ((x4 * scale + self.magic) - self.magic).clamp(-128, 127)
        return (codes / scale).view(-1, width).to(x.dtype)


# 1.5 * 2^23: adding it to |y| < 2^22 leaves a float whose unit in the last place is 1 (round to integer).
ROUNDING_MAGIC = 12582912.0


def _optional(form: type[nn.Module], module: nn.Module | None) -> nn.Module | None:
    """The XNNPACK form of a module the model may not have (BitNet's pieces): None stays None, adding no op."""
    return None if module is None else form(module)


class DynamicQuantLinear(nn.Module):
    """A torchao dynamic-activation linear (int8 per-token activations, int4/int8 weights in groups or per
    channel) written with the `quantized_decomposed` ops: the pattern XNNPACK lowers to its qd8 kernels, with
    the same values. torchao's own ops are Python decompositions that each graph pass re-runs for every linear;
    these have meta kernels."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight
        self.qmin, self.qmax = {torch.int4: (-8, 7), torch.int8: (-128, 127)}[weight.target_dtype]
        self.group = weight.block_size[1]
        # Per channel: one scale per row as a vector (XNNPACK reads quantization parameters from constants only).
        rows = (weight.qdata.shape[0],) if self.group >= weight.qdata.shape[1] else (weight.qdata.shape[0], -1)
        qdata, scale = weight.qdata, weight.scale.reshape(rows).float().clone()  # its own scales: may be rescaled
        empty = scale == 0  # an all-zero group: XNNPACK refuses a zero scale, so codes 0 and any scale (exact)
        if empty.any():
            width = qdata.shape[1] // (scale.shape[1] if scale.dim() == 2 else 1)
            mask = empty.repeat_interleave(width, dim=1) if scale.dim() == 2 else empty[:, None]
            qdata = qdata.masked_fill(mask, 0)
            scale[empty] = torch.finfo(torch.float32).tiny
        self.register_buffer("qdata", qdata)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", weight.zero_point.reshape(rows).to(torch.int8))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.quantized_decomposed
        scale, zero = ops.choose_qparams_per_token_asymmetric(x, torch.int8)
        x = ops.dequantize_per_token(ops.quantize_per_token(x, scale, zero, -128, 127, torch.int8),
                                     scale, zero, -128, 127, torch.int8, x.dtype)
        if self.group < self.qdata.shape[1]:
            weight = ops.dequantize_per_channel_group(self.qdata, self.scale, self.zero_point, self.qmin, self.qmax,
                                                      torch.int8, self.group, x.dtype)
        else:
            weight = ops.dequantize_per_channel(self.qdata, self.scale, self.zero_point, 0, self.qmin, self.qmax,
                                                torch.int8, out_dtype=x.dtype)
        return F.linear(x, weight, self.bias)


class AnchoredQuantLinear(DynamicQuantLinear):
    """A dynamic-activation linear whose input is already on BitNet's symmetric int8 grid (codes k * absmax / 127,
    |k| <= 127): XNNPACK's qd8 kernel would round it again, per token but asymmetrically (scale = (max - min) / 255
    with its own zero-point nudging), a second rounding that moves most codes (tiny random BitNet: top-1 86%, KL
    0.11 against BitNet's own activations). Two anchor inputs +-127.5/127 * absmax (with 30 zeros: one more block
    of 32, weight codes 0, so the product is unchanged) make that range [-127.5, 127.5] code steps: the kernel's
    scale is then BitNet's absmax / 127, its zero point rounds to 0 or -1, and every code passes unchanged.
    The ONNX exporter anchors MatMulNBits' per-block rounding the same way (NOTES.md, "Ternary")."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        rows = self.qdata.shape[0]
        self._one_scale_per_row()
        if self.scale.dim() == 1:  # per channel: the padded row stays one group
            self.group = self.qdata.shape[1] + BLOCK
        else:  # one more block of 32; any positive scale (its codes are 0)
            self.scale = torch.cat([self.scale, torch.ones(rows, 1)], dim=1)
            self.zero_point = torch.cat([self.zero_point, torch.zeros(rows, 1, dtype=torch.int8)], dim=1)
        self.qdata = torch.cat([self.qdata, torch.zeros(rows, BLOCK, dtype=self.qdata.dtype)], dim=1)
        anchors = torch.zeros(BLOCK)
        anchors[0], anchors[1] = ANCHOR, -ANCHOR
        self.register_buffer("anchors", anchors, persistent=False)

    def _one_scale_per_row(self) -> None:
        """Blocks that share their row's scale (BitNet's one scale per matrix, repeated per block of 32 by the
        preset) as one channel: XNNPACK stores block scales in bf16 (8 bits of mantissa: a ternary scale moves by up
        to 0.2%) but channel scales in fp32, so only per channel are the weights the student's exactly."""
        if self.scale.dim() == 2 and bool((self.scale == self.scale[:, :1]).all()) and not self.zero_point.any():
            self.scale, self.zero_point = self.scale[:, 0].contiguous(), self.zero_point[:, 0].contiguous()
            self.group = self.qdata.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        peak = x.view(-1, 1, 1, width).abs().max(dim=3, keepdim=True).values.view(-1, 1)
        return super().forward(torch.cat([x, peak * self.anchors.to(x.dtype)], dim=-1))


# The anchors' size in units of the input's absmax: half a code step beyond the largest code, each side.
ANCHOR = 127.5 / 127


class XnnpackBlockOffsetLinear(nn.Module):
    """`BlockOffsetLinear` (carried GGUF Q4_1 blocks) with block means from a 4-D mean instead of block sums
    from a reshape-matmul-squeeze; the offsets are scaled by 32 to match (exact: a power of two)."""

    def __init__(self, linear: BlockOffsetLinear) -> None:
        super().__init__()
        self.main = xnnpack_linear(linear.main)
        self.offsets = DynamicQuantLinear(linear.offsets)  # always int8 (`quantize.OFFSETS_RECIPE`)
        self.offsets.scale.mul_(BLOCK)  # its own copy of the scales
        self.blocks = linear.in_features // BLOCK
        smoothed = not bool((linear.block_scale == 1).all())
        self.block_scale = linear.block_scale.clone() if smoothed else None  # no multiply where there is none

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        means = x.view(-1, self.blocks, 1, BLOCK).mean((2, 3), keepdim=True).view(-1, self.blocks)
        if self.block_scale is not None:
            means = means * self.block_scale
        return self.main(x) + self.offsets(means)


def xnnpack_linear(linear: nn.Module, int8_input: bool = False) -> nn.Module:
    """The form of a (quantized) linear that lowers cheaply; float linears stay as they are. `int8_input`: its
    input is BitNet-rounded already (`AnchoredQuantLinear` keeps those codes)."""
    if isinstance(linear, BlockOffsetLinear):
        return XnnpackBlockOffsetLinear(linear)
    weight = getattr(linear, "weight", None)
    if getattr(weight, "activation_quantization", None) is not None:
        return AnchoredQuantLinear(linear) if int8_input else DynamicQuantLinear(linear)
    return linear


class XnnpackMLP(nn.Module):
    """The gated MLP; for BitNet also its squared-ReLU gate, the sub-norm before down_proj and the int8 rounding of
    the projections' inputs (absent for Llama/Qwen2: their graph is unchanged)."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        rounded = mlp.int8_inputs is not None
        self.gate_proj, self.up_proj = xnnpack_linear(mlp.gate_proj, rounded), xnnpack_linear(mlp.up_proj, rounded)
        self.down_proj = xnnpack_linear(mlp.down_proj, rounded)
        self.act = XNNPACK_ACTIVATIONS[mlp.act]
        self.ffn_sub_norm = _optional(XnnpackRMSNorm, mlp.ffn_sub_norm)
        self.int8_inputs = _optional(XnnpackInt8Activations, mlp.int8_inputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = through(self.int8_inputs, x)
        hidden = through(self.ffn_sub_norm, self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(through(self.int8_inputs, hidden))


def relu_times_relu(x: torch.Tensor) -> torch.Tensor:
    """Squared ReLU as a product: `square` exports as `pow`, which XNNPACK's partitioner may refuse; relu * relu
    is exact and lowers."""
    r = F.relu(x)
    return r * r


# The model's activation function -> the form the program computes it in.
XNNPACK_ACTIVATIONS = {F.silu: F.silu, relu_squared: relu_times_relu}


class PackedEmbedding(nn.Module):
    """An int4 or int8 embedding table in the layout of ExecuTorch's `embedding_4bit` / `embedding_byte`
    kernels: int4 two codes per byte; fp16 scales, no zero points (the preset's codes are symmetric).

    torchao's own lowering of the same table stores fp32 scales plus an all-zero int8 zero-point tensor
    (2.2 MB more on the default model); fp16 scales through the ops' `.dtype` variants read back correctly.
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bits: int) -> None:
        super().__init__()
        import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401  (registers the ops)

        self.bits = bits
        if bits == 4:
            unsigned = (codes.to(torch.int16) + 8).to(torch.uint8)
            codes = unsigned[:, 0::2] * 16 + unsigned[:, 1::2]
        self.register_buffer("packed", codes.contiguous())
        self.register_buffer("scales", scales.to(torch.float16).contiguous())

    @classmethod
    def from_torchao(cls, embedding: nn.Embedding) -> "PackedEmbedding | None":
        weight = embedding.weight
        zero = getattr(weight, "zero_point", None)
        bits = {torch.int4: 4, torch.int8: 8}.get(getattr(weight, "target_dtype", None))
        if bits is None or (zero is not None and bool(zero.any())):
            return None
        return cls(weight.qdata, weight.scale.reshape(weight.qdata.shape[0], -1), bits)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.quantized_decomposed
        op, low, high = (ops.embedding_4bit, -8, 7) if self.bits == 4 else (ops.embedding_byte, -128, 127)
        return op.dtype(self.packed, self.scales, None, low, high, tokens, dtype=torch.float32)


class XnnpackProgram(nn.Module):
    """The program's `forward(tokens [1, T], input_pos [1]) -> logits [1, vocab]`: the last position's only,
    as ExecuTorch's own LLM export writes it (`generate_full_logits=False`): the output layer runs over one
    row per call instead of T, and the program's output buffer is vocab floats, not T x vocab. Verification
    scores every position by feeding the program one token at a time (`Session.score`)."""

    def __init__(self, model: CausalLM) -> None:
        super().__init__()
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (registers llama:: ops)

        backbone = model.model
        self.max_context, self.rope_dtype = model.max_context, model.rope_dtype()
        self.register_buffer("inv_freq", model.inv_freq, persistent=False)
        self.embed_tokens = PackedEmbedding.from_torchao(backbone.embed_tokens) or backbone.embed_tokens
        self.layers = nn.ModuleList(XnnpackDecoderLayer(layer) for layer in backbone.layers)
        self.norm = XnnpackRMSNorm(backbone.norm)
        self.lm_head = xnnpack_linear(model.lm_head)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        seq = tokens.shape[1]
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + seq <= self.max_context)
        cos, sin = rope_tables(self.inv_freq, seq, start, self.rope_dtype)
        cos, sin = cos.view(-1, 1, cos.shape[-1]), sin.view(-1, 1, sin.shape[-1])
        x = self.embed_tokens(tokens.view(-1))
        for layer in self.layers:
            x = layer(x, cos, sin, start)
        return self.lm_head(self.norm(x[-1:]))


class XnnpackDecoderLayer(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.self_attn = XnnpackAttention(layer.self_attn)
        self.mlp = XnnpackMLP(layer.mlp)
        self.input_layernorm = XnnpackRMSNorm(layer.input_layernorm)
        self.post_attention_layernorm = XnnpackRMSNorm(layer.post_attention_layernorm)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start)
        return x + self.mlp(self.post_attention_layernorm(x))


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
                 step: Steps = SILENT) -> tuple[bytes, list[str]]:
    """Export, lower to XNNPACK and serialize; returns the .pte bytes and the operators it calls."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    model = XnnpackProgram(model)
    tokens = torch.zeros((1, 2), dtype=torch.long)
    input_pos = torch.zeros((1,), dtype=torch.long)
    seq = torch.export.Dim("seq", min=1, max=meta.max_prefill)
    step("torch.export")
    with torch.no_grad():  # non-strict: Python tracing, 2x faster than TorchDynamo here and the same graph
        # (No run_decompositions here: ExecuTorch's lowering starts with the same one.)
        exported = torch.export.export(model, (tokens, input_pos), dynamic_shapes=({1: seq}, None), strict=False)
    for node in exported.graph.nodes:
        # Provenance records: every later pass deep-copies a node's whole chain of them (16% of the lowering).
        node.meta.pop("from_node", None)
    step("lower to XNNPACK: edge dialect and partitioning")

    class CountingPartitioner(XnnpackPartitioner):  # names the delegate count once it is known
        def ops_to_not_decompose(self, program: Any) -> Any:
            # Without the per-node check ExecuTorch keeps these ops through one decomposition pass instead of three
            # (its EDGE_DO_NOT_DECOMP path); every linear here lowers to XNNPACK, so none needs the check.
            ops, _check = super().ops_to_not_decompose(program)
            return ops, None

        def partition(self, program: Any) -> Any:
            result = super().partition(program)
            step("lower to XNNPACK: compile delegates", total=len(result.partition_tags))
            return result

    with reuse_lowered_layers(on_delegate=step.advance):  # each distinct layer graph lowered once
        edge = to_edge_transform_and_lower(
            exported,
            partitioner=[CountingPartitioner()],
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
