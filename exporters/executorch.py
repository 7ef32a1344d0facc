"""Lower a (quantized) `CausalLM` to an ExecuTorch program (.pte) with the XNNPACK delegate.

Steps: (1) write the model as XNNPACK pieces (a layer's projections and MLP, the output layer) joined by
ExecuTorch's custom ops for the KV cache and attention (in-place cache update, SDPA that reads only the filled
prefix), (2) lower each piece to one XNNPACK delegate (int4/int8 kernels for the torchao patterns; a layer's graph
once, `xnnpack_pieces`), (3) torch.export the program around the delegates with a dynamic token count, (4) emit it
with the metadata methods ExecuTorch's own LLM runners read (BOS/EOS ids, max lengths, vocab size).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgepack.blocks import BLOCK
from edgepack.errors import EdgepackError
from edgepack.exporters import ExportRequest, register_exporter
from edgepack.exporters.xnnpack_pieces import PieceLowerer
from edgepack.exporters.xnnpack_reuse import reuse_lowered_layers
from edgepack.exporters.xnnpack_ranges import (Int8Grid, ResidualRows, SummedHalves, anchors, padded_float_linear,
                                                rounded_per_token)
from edgepack.model import Attention, CausalLM, KVCache, RMSNorm, relu_squared, through
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


# Why the program is written anew here rather than exported from `CausalLM` as it is: XNNPACK's partitioner splits a
# delegate at every op it refuses, and ExecuTorch re-traces every node with FakeTensors in each of its passes. Written
# as below (2-D activations [T, hidden], reshapes with one inferred dimension, no slices or squeezes of dynamic
# tensors, a 4-D mean, quantization ops with meta kernels), every piece between two attention ops is one delegate.
# The pieces are lowered one by one (`xnnpack_pieces`): a layer's graph once, the other layers over their own
# weights. The weights are the same tensors; the arithmetic is the same up to summation order.


class AttentionInputs(nn.Module):
    """A layer's attention inputs from its residual stream: norm, q/k/v projections, RoPE. RoPE's rotate-half is a
    [D, D] signed permutation matmul, since XNNPACK takes no slice of a dynamic tensor."""

    TOKEN_DIMS = (0, 0, 0)  # x [T, hidden], cos, sin [T, 1, D]

    def __init__(self, layer: nn.Module, ranges: int) -> None:
        super().__init__()
        attn = layer.self_attn
        rounded = attn.int8_inputs is not None
        self.norm = XnnpackRMSNorm(layer.input_layernorm)
        self.split = residual_rows(ranges, attn.q_proj, rounded)
        self.q_proj, self.k_proj, self.v_proj = (summed(xnnpack_linear(p, rounded), self.split)
                                                 for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        dtype = attn.kv_cache.k.dtype  # the model's float dtype
        self.register_buffer("rotate_half", rotate_half_matrix(attn.head_dim).to(dtype), persistent=False)
        self.int8_inputs = _optional(XnnpackInt8Activations, attn.int8_inputs)  # BitNet only

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        d = self.head_dim
        x = through(self.split, through(self.int8_inputs, self.norm(x)))
        q = self.q_proj(x).view(1, -1, self.num_heads, d)
        k = self.k_proj(x).view(1, -1, self.num_kv_heads, d)
        v = self.v_proj(x).view(1, -1, self.num_kv_heads, d)
        q = q * cos + F.linear(q, self.rotate_half) * sin
        k = k * cos + F.linear(k, self.rotate_half) * sin
        return q, k, v


class CachedAttention(nn.Module):
    """Attention over the cache with ExecuTorch's custom ops (`llama::update_cache` writes the cache in place,
    `llama::custom_sdpa` reads only the filled prefix and handles GQA); between the delegates, not in one."""

    def __init__(self, attn: Attention) -> None:
        super().__init__()
        self.kv_cache = CustomOpsKVCache(attn.kv_cache)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        k_all, v_all = self.kv_cache.update(start, k, v)
        dtype = q.dtype
        if dtype not in (torch.float32, torch.bfloat16):  # the kernel computes in fp32 or bf16
            q, k_all, v_all = q.float(), k_all.float(), v_all.float()
        return torch.ops.llama.custom_sdpa(q, k_all, v_all, start, None, 0.0, True).to(dtype)


class LayerOutput(nn.Module):
    """The rest of a layer after attention: o_proj and the residual, the MLP and its residual."""

    TOKEN_DIMS = (1, 0)  # attention output [1, T, heads, D], x [T, hidden]

    def __init__(self, layer: nn.Module, ranges: int) -> None:
        super().__init__()
        attn = layer.self_attn
        rounded = attn.int8_inputs is not None
        self.width = attn.num_heads * attn.head_dim
        self.split = residual_rows(ranges, attn.o_proj, rounded)
        self.o_proj = summed(xnnpack_linear(attn.o_proj, rounded), self.split)
        self.post_attention_layernorm = XnnpackRMSNorm(layer.post_attention_layernorm)
        self.mlp = XnnpackMLP(layer.mlp, ranges)
        # BitNet only (None for Llama/Qwen2, whose graph stays as it was): the sub-norm before o_proj and the int8
        # rounding of its input.
        self.attn_sub_norm = _optional(XnnpackRMSNorm, attn.attn_sub_norm)
        self.int8_inputs = _optional(XnnpackInt8Activations, attn.int8_inputs)

    def forward(self, attention: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = through(self.attn_sub_norm, attention.view(-1, self.width))
        x = x + self.o_proj(through(self.split, through(self.int8_inputs, out)))
        return x + self.mlp(self.post_attention_layernorm(x))


class LayerJoin(nn.Module):
    """One layer's output and the next layer's attention inputs: everything between two attention ops, one
    delegate (one XNNPACK call per layer instead of two)."""

    TOKEN_DIMS = (1, 0, 0, 0)

    def __init__(self, layer: nn.Module, following: nn.Module, ranges: int) -> None:
        super().__init__()
        self.output, self.inputs = LayerOutput(layer, ranges), AttentionInputs(following, ranges)

    def forward(self, attention: torch.Tensor, x: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.output(attention, x)
        return (x, *self.inputs(x, cos, sin))


class RopeTables(nn.Module):
    """cos, sin [T, 1, D] of the given positions, as `rope_tables` computes them; the frequencies repeated
    over both halves instead of the angles concatenated (the same products; XNNPACK takes no cat of one tensor
    with itself)."""

    TOKEN_DIMS = (0,)

    def __init__(self, inv_freq: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("inv_freq", torch.cat([inv_freq, inv_freq]), persistent=False)
        self.dtype = dtype

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.view(-1, 1) * self.inv_freq.view(1, -1)
        width = angles.shape[-1]
        return angles.cos().to(self.dtype).view(-1, 1, width), angles.sin().to(self.dtype).view(-1, 1, width)


class OutputHead(nn.Module):
    """The final norm and the output layer, over the last position only."""

    TOKEN_DIMS = (None,)  # x [1, hidden]

    def __init__(self, model: CausalLM, ranges: int) -> None:
        super().__init__()
        self.norm = XnnpackRMSNorm(model.model.norm)
        self.split = residual_rows(ranges, model.lm_head)
        self.lm_head = summed(xnnpack_linear(model.lm_head), self.split)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(through(self.split, self.norm(x)))


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
    """BitNet's `Int8Activations` (per-token absmax to int8 codes and back) as `Int8Grid` computes it in ops XNNPACK
    lowers: the same float operations as the model's, so the codes are the same."""

    def __init__(self, rounding: nn.Module) -> None:  # the model's `Int8Activations`: stateless, nothing to copy
        super().__init__()
        self.grid = Int8Grid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.grid(x.float())[0].to(x.dtype)


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

    def pad_block(self) -> None:
        """One more block of 32 inputs with weight codes 0 (the product is unchanged): room for anchor inputs."""
        rows = self.qdata.shape[0]
        if self.scale.dim() == 1:  # per channel: the padded row stays one group
            self.group = self.qdata.shape[1] + BLOCK
        else:  # one more block of 32; any positive scale (its codes are 0)
            self.scale = torch.cat([self.scale, torch.ones(rows, 1)], dim=1)
            self.zero_point = torch.cat([self.zero_point, torch.zeros(rows, 1, dtype=torch.int8)], dim=1)
        self.qdata = torch.cat([self.qdata, torch.zeros(rows, BLOCK, dtype=self.qdata.dtype)], dim=1)

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
        self._one_scale_per_row()
        self.pad_block()
        self.register_buffer("anchors", anchors(), persistent=False)

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


class XnnpackBlockOffsetLinear(nn.Module):
    """`BlockOffsetLinear` (carried GGUF Q4_1 blocks) with block means from a 4-D mean instead of block sums
    from a reshape-matmul-squeeze; the offsets are scaled by 32 to match (exact: a power of two). The offsets are
    int8 (`quantize.OFFSETS_RECIPE`), or float with `--activation-ranges 2` (their means then need no rounding)."""

    def __init__(self, linear: BlockOffsetLinear) -> None:
        super().__init__()
        self.main = xnnpack_linear(linear.main)
        if rounded_per_token(linear.offsets):
            self.offsets = DynamicQuantLinear(linear.offsets)
            self.offsets.scale.mul_(BLOCK)  # its own copy of the scales
        else:
            self.offsets = nn.Linear(linear.offsets.in_features, linear.offsets.out_features, bias=False)
            self.offsets.weight = nn.Parameter(linear.offsets.weight.detach() * BLOCK, requires_grad=False)
        self.blocks = linear.in_features // BLOCK
        smoothed = not bool((linear.block_scale == 1).all())
        self.block_scale = linear.block_scale.clone() if smoothed else None  # no multiply where there is none

    def pad_block(self) -> None:
        """For `ResidualRows`: one more block of 32 inputs that adds nothing (`DynamicQuantLinear.pad_block`); its
        mean meets a zero offset column."""
        self.main.pad_block()
        if isinstance(self.offsets, DynamicQuantLinear):  # int8 per channel: the padded row stays one group
            self.offsets.qdata = torch.cat([self.offsets.qdata, torch.zeros_like(self.offsets.qdata[:, :1])], dim=1)
            self.offsets.group = self.offsets.qdata.shape[1]
        else:
            self.offsets = padded_float_linear(self.offsets, 1)
        self.blocks += 1
        if self.block_scale is not None:
            self.block_scale = torch.cat([self.block_scale, torch.ones_like(self.block_scale[:1])])

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


def residual_rows(ranges: int, reader: nn.Module, bitnet_codes: bool = False) -> ResidualRows | None:
    """The two rows (`xnnpack_ranges`) of the input `reader` reads, with `--activation-ranges 2` where XNNPACK
    rounds that input per token; never BitNet's int8 codes, which `AnchoredQuantLinear` passes exactly."""
    return ResidualRows() if ranges == 2 and not bitnet_codes and rounded_per_token(reader) else None


def summed(form: nn.Module, split: ResidualRows | None) -> nn.Module:
    """`form` over a split input: its inputs padded for the anchors, its output halves summed, its bias (taken off
    the form) added once."""
    if split is None:
        return form
    if isinstance(form, nn.Linear):
        form = padded_float_linear(form)
    else:
        form.pad_block()
    inner = form.main if isinstance(form, XnnpackBlockOffsetLinear) else form
    bias, inner.bias = inner.bias, None
    return SummedHalves(form, bias)


class XnnpackMLP(nn.Module):
    """The gated MLP; for BitNet also its squared-ReLU gate, the sub-norm before down_proj and the int8 rounding of
    the projections' inputs (absent for Llama/Qwen2: their graph is unchanged)."""

    def __init__(self, mlp: nn.Module, ranges: int) -> None:
        super().__init__()
        rounded = mlp.int8_inputs is not None
        self.split = residual_rows(ranges, mlp.gate_proj, rounded)
        self.down_split = residual_rows(ranges, mlp.down_proj, rounded)
        self.gate_proj = summed(xnnpack_linear(mlp.gate_proj, rounded), self.split)
        self.up_proj = summed(xnnpack_linear(mlp.up_proj, rounded), self.split)
        self.down_proj = summed(xnnpack_linear(mlp.down_proj, rounded), self.down_split)
        self.act = XNNPACK_ACTIVATIONS[mlp.act]
        self.ffn_sub_norm = _optional(XnnpackRMSNorm, mlp.ffn_sub_norm)
        self.int8_inputs = _optional(XnnpackInt8Activations, mlp.int8_inputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = through(self.split, through(self.int8_inputs, x))
        hidden = through(self.ffn_sub_norm, self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(through(self.down_split, through(self.int8_inputs, hidden)))


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
    (2.2 MB more on the default model); fp16 scales through the ops' `.dtype` variants read back correctly. The
    quantizer gives the table fp16 scales already (`quantize.piece_quantizer`), so the stored table is the
    reference's exactly (on a tiny random BitNet, fp32 scales rounded here cost 10 points of top-1).
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
    scores every position by feeding the program one token at a time (`Session.score`).

    Its XNNPACK pieces (`PIECES`) are plain modules here (the program runs eagerly as the model does) until
    `lower_pieces` replaces each by its delegate."""

    PIECES = ("rope", "first", "joins", "last", "head")

    def __init__(self, model: CausalLM, ranges: int = 1) -> None:
        super().__init__()
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (registers llama:: ops)

        layers = model.model.layers
        self.max_context = model.max_context
        self.embed_tokens = PackedEmbedding.from_torchao(model.model.embed_tokens) or model.model.embed_tokens
        self.rope = RopeTables(model.inv_freq, model.rope_dtype())
        self.first = AttentionInputs(layers[0], ranges)
        self.attention = nn.ModuleList(CachedAttention(layer.self_attn) for layer in layers)
        self.joins = nn.ModuleList(LayerJoin(layer, following, ranges) for layer, following in zip(layers, layers[1:]))
        self.last = LayerOutput(layers[-1], ranges)
        self.head = OutputHead(model, ranges)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        seq = tokens.shape[1]
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + seq <= self.max_context)
        cos, sin = self.rope(torch.arange(seq, dtype=torch.float32) + start)
        x = self.embed_tokens(tokens.view(-1))
        q, k, v = self.first(x, cos, sin)
        for index, attention in enumerate(self.attention):
            out = attention(q, k, v, start)
            if index < len(self.joins):
                x, q, k, v = self.joins[index](out, x, cos, sin)
            else:
                x = self.last(out, x)
        return self.head(x[-1:])

    def layer_parts(self, index: int) -> tuple[AttentionInputs, LayerOutput]:
        """Layer `index`'s attention inputs and output, wherever the pieces hold them."""
        inputs = self.first if index == 0 else self.joins[index - 1].inputs
        return inputs, (self.joins[index].output if index < len(self.joins) else self.last)

    def lower_pieces(self, lower: Callable[..., nn.Module]) -> None:
        """Replace every piece by `lower(piece, inputs, token_dims)`; the inputs are the ones an eager call on three
        tokens gives it (the caches it wrote are cleared after)."""
        pieces = [getattr(self, name) for name in self.PIECES]
        pieces = [p for group in pieces for p in (group if isinstance(group, nn.ModuleList) else [group])]
        inputs: dict[nn.Module, tuple[torch.Tensor, ...]] = {}
        hooks = [p.register_forward_pre_hook(lambda module, args: inputs.setdefault(module, args)) for p in pieces]
        with torch.no_grad():
            self(torch.zeros((1, 3), dtype=torch.long), torch.zeros((1,), dtype=torch.long))
        for hook in hooks:
            hook.remove()
        for attention in self.attention:
            attention.kv_cache.k.zero_()
            attention.kv_cache.v.zero_()
        for name in self.PIECES:
            group = getattr(self, name)
            if isinstance(group, nn.ModuleList):
                setattr(self, name, nn.ModuleList(lower(p, inputs[p], p.TOKEN_DIMS) for p in group))
            else:
                setattr(self, name, lower(group, inputs[group], group.TOKEN_DIMS))


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


def lower_to_pte(model: CausalLM, meta: Metadata, step: Steps = SILENT, ranges: int = 1) -> tuple[bytes, list[str]]:
    """Lower each XNNPACK piece, export the program around their delegates and serialize; returns the .pte
    bytes and the operators it calls. `ranges` 2: each input XNNPACK rounds to int8 per token reaches its linear
    as two rows, its grid and the grid's residual (`xnnpack_ranges`)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    class Partitioner(XnnpackPartitioner):
        def ops_to_not_decompose(self, program: Any) -> Any:
            # Without the per-node check ExecuTorch keeps these ops through one decomposition pass instead of three
            # (its EDGE_DO_NOT_DECOMP path); every linear here lowers to XNNPACK, so none needs the check.
            ops, _check = super().ops_to_not_decompose(program)
            return ops, None

    program = XnnpackProgram(model, ranges)
    config = EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True)
    pieces = PieceLowerer(meta.max_prefill, Partitioner, config, on_piece=step.advance)
    step("lower to XNNPACK", total=len(program.attention) + 3)  # rope, first, the joins, last, head
    with reuse_lowered_layers():  # a rebound piece's XNNPACK graph is the first one's, replayed
        program.lower_pieces(pieces)
    step("export the program around its delegates")
    seq = torch.export.Dim("seq", min=1, max=meta.max_prefill)
    tokens, input_pos = torch.zeros((1, 2), dtype=torch.long), torch.zeros((1,), dtype=torch.long)
    with torch.no_grad():
        exported = torch.export.export(program, (tokens, input_pos), dynamic_shapes=({1: seq}, None), strict=False)
    edge = to_edge(exported, compile_config=config, constant_methods=meta.constant_methods())
    step("emit program")
    emitted = edge.to_executorch(
        ExecutorchBackendConfig(
            extract_delegate_segments=True,
            do_quant_fusion_and_const_prop=True,
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
        )
    )
    return emitted.buffer, program_operators(emitted)


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
    if preset.dtype != "float32":
        # Each piece must be one XNNPACK delegate (`xnnpack_pieces`), and XNNPACK takes no dtype cast: an fp16
        # program's norms (computed in fp32) and RoPE tables would leave casts between delegates in every layer.
        raise EdgepackError(f"ExecuTorch programs compute in fp32 activations; the {preset.name} preset has "
                            f"{preset.dtype} activations",
                            "use --quant int4, int8 or fp32 for executorch (fp16 is for --backend coreml or onnx)")


@register_exporter("executorch", preflight=_check_delegate, activation_ranges=True)
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
    ranges = request.preset.activation_ranges if request.preset else 1
    pte, operators = lower_to_pte(request.model, meta, request.step, ranges)
    Path(request.writer.path(PROGRAM_FILE)).write_bytes(pte)
    return {
        "name": "executorch",
        "delegate": request.delegate,
        "program": PROGRAM_FILE,
        "method": "forward",
        "logits": "last",  # forward returns [1, vocab] for the last input position
        "max_prefill": request.max_prefill,
        # int8 activation ranges per linear input (`xnnpack_ranges`): 2 doubles the rows each linear computes
        **({"activation_ranges": ranges} if ranges > 1 else {}),
        # What an app links besides the ExecuTorch runtime and XNNPACK for this program's operators (a process
        # without them fails at method load with "Missing operator"): see `kernel_libraries`.
        "kernel_libraries": kernel_libraries(operators),
    }
