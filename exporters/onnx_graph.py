"""Write the decoder as an ONNX graph by hand (onnx.helper), from a `CausalLM`'s weights.

Why by hand and not torch.onnx.export: the graph is ~30 small ops per layer, we need exact control over
the int4 encoding (ONNX Runtime's `MatMulNBits`, GGUF blocks carried bit for bit) and over the two KV-cache
layouts (CPU: dynamic length, ORT's fused GroupQueryAttention appends to it; NPU: static shapes and plain
ops for QNN), and it builds in seconds instead of minutes. The math mirrors `edgepack.model` (RMSNorm,
RoPE rotate-half, GQA).

Activations are 2-D `[T, hidden]` inside (batch is always 1); the KV cache is `[1, kv_heads, S, head_dim]`.
Int4 linears: y = MatMulNBits(x, codes + 8, scales) [+ blocksum(x) @ offsets^T for asymmetric blocks]:
exact fp32 math for GGUF Q4_0/Q4_1/Q4_K blocks (w = scale * code + offset) on ORT's fast packed kernel. GGUF's
5- to 8-bit types (Q5_0, Q5_1, Q5_K, Q6_K, Q8_0) are carried the same way as 8-bit MatMulNBits blocks.

BitNet b1.58 (`architecture` "bitnet"): squared-ReLU gate, RMSNorms before o_proj and down_proj, o_proj bias, and
(`int8_activations`) each layer linear's input rounded to int8 per token by its absmax, written as the same float
ops as `edgepack.model.Int8Activations` (ReduceMax, Max, Div, Mul, Round, Clip, Div: bit for bit the torch
model's rounding). Its ternary codes ("ternary" weights) are 2-bit MatMulNBits: code + 2 against the default
zero point 2, the scale repeated per block of `TERNARY_BLOCK`: exactly the student's weights.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edgepack.blocks import BLOCK, CarriedBlocks, Int4Blocks, Int8Blocks, TernaryBlocks
from edgepack.errors import EdgepackError
from edgepack.progress import SILENT, Steps
from edgepack.runtime.onnxruntime_backend import LAST_ONLY_INPUT

OPSET = 23  # RMSNormalization (opset 23): one fused norm op, which QNN maps to its RmsNorm
MS_DOMAIN = "com.microsoft"
NPU_MASK_VALUE = -80.0  # additive mask on the NPU: exp(-80) is 0 to softmax, and 16-bit QDQ keeps its step small
# Ternary codes as 2-bit MatMulNBits, the smallest width ONNX Runtime 1.32 runs on CPU. Block 128: its int8-activation
# kernel (accuracy level 4) takes blocks up to 128; at 256, or at level 0, ORT 1.32 dequantizes the whole matrix
# every call (K 2560 x N 6912, one thread: 0.51 ms a token at 128 / level 4, 133 ms at 256 or level 0).
TERNARY_BITS, TERNARY_BLOCK = 2, 128


@dataclass(frozen=True)
class GraphSpec:
    """Which flavour to write. `static_seq` None: the CPU graph (dynamic T, cache grows by concat)."""

    weights: str  # "fp32", "int4" (int4 linears) or "ternary" (2-bit codes); both with int8 block-32 tables
    static_seq: int | None = None  # NPU: tokens per call (prefill chunk or 1 for decode)
    static_context: int | None = None  # NPU: attention span (past = context - seq)
    accuracy_level: int = 0  # MatMulNBits compute: 0 = fp32 (exact), 4 = int8 activations (faster)


def int4_blocks_from_float(w: torch.Tensor) -> Int4Blocks:
    """Round-to-nearest asymmetric int4 per block of 32 (min/max), for students without GGUF blocks."""
    rows, cols = w.shape
    blocks = w.float().reshape(rows, cols // BLOCK, BLOCK)
    lo, hi = blocks.amin(-1), blocks.amax(-1)
    scale = (hi - lo) / 15.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round((blocks - lo[..., None]) / safe[..., None]), 0, 15) - 8
    return Int4Blocks(codes.to(torch.int8).reshape(rows, cols), scale, lo + 8.0 * scale)


def int8_blocks(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per block of 32: (uint8 codes + 128 [rows, cols/32, 32], scales [rows, cols/32]).

    A GGUF Q8_0 table (w = d * q, |q| <= 127) comes back exactly: amax / 127 == d whenever a block uses code
    +-127, which llama.cpp's rounding guarantees."""
    rows, cols = w.shape
    blocks = w.float().reshape(rows, cols // BLOCK, BLOCK)
    scale = blocks.abs().amax(-1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round(blocks / safe[..., None]), -127, 127).to(torch.int16) + 128
    return codes.to(torch.uint8).numpy(), scale.numpy().astype(np.float32)


def ternary_block(parts: list[TernaryBlocks]) -> int:
    """MatMulNBits' block size for ternary matrices read together: the largest power of two up to `TERNARY_BLOCK`
    that divides every part's own block (a Hugging Face matrix's block is its whole row, llama.cpp's 256), so each
    stored block has one of the student's scales."""
    block = TERNARY_BLOCK
    while block >= 16 and any(p.block % block for p in parts):
        block //= 2
    if block < 16:
        raise EdgepackError(f"ternary blocks of {parts[0].block} inputs have no MatMulNBits block (16 to 128)",
                            "use -q int4 for this student")
    return block


def int8_round_trip(w: torch.Tensor) -> torch.Tensor:
    """`w` as the int4 graph stores an int8 table (`int8_blocks`), back in float32."""
    codes, scales = int8_blocks(w)
    return ((torch.from_numpy(codes).float() - 128.0) * torch.from_numpy(scales)[..., None]).reshape(w.shape)


class GraphBuilder:
    """Accumulates nodes and initializers; every helper returns the output name."""

    def __init__(self) -> None:
        # the student's GGUF (or ternary) matrices written as they are, by bits; "ternary_rerounded": ternary
        # matmuls whose int8 input ORT rounds again (not anchored)
        self.carried: Counter[Any] = Counter()
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._count = 0
        self._consts: dict[tuple, str] = {}

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, domain: str = "", outputs: int = 1,
           out_names: list[str] | None = None, **attrs: Any) -> Any:
        from onnx import helper

        outs = out_names or [self.name(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), domain=domain, **attrs))
        return outs[0] if outputs == 1 else outs

    def init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, values: Any, dtype: Any = np.int64) -> str:
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(self.name("const"), arr)
        return self._consts[key]


def build_decoder(model: Any, spec: GraphSpec, blocks: Mapping[str, CarriedBlocks] | None = None,
                  carried: Counter[int] | None = None, progress: Steps = SILENT) -> Any:
    """The ONNX ModelProto of `model` (an unquantized `CausalLM`, or an `UnbuiltModel`) in the flavour `spec`
    names. `carried`, if given, counts the layers' GGUF matrices written as they are, by bits (4 or 8);
    `progress` is advanced once per layer written."""
    from onnx import TensorProto, helper

    cfg = model.config
    state = model.state_dict()  # a lazy mapping for an `UnbuiltModel`: each tensor is read when used
    blocks = blocks or {}
    g = GraphBuilder()
    if carried is not None:
        g.carried = carried
    D, Hkv = cfg.head_dim, cfg.num_kv_heads
    static = spec.static_seq is not None
    seq_dim: Any = spec.static_seq if static else "seq"
    past_dim: Any = (spec.static_context - spec.static_seq) if static else "past"
    total_dim: Any = spec.static_context if static else "total"

    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT32 if static else TensorProto.INT64, [1, seq_dim])]
    if static:
        inputs += [
            helper.make_tensor_value_info("cos", TensorProto.FLOAT, [seq_dim, D]),
            helper.make_tensor_value_info("sin", TensorProto.FLOAT, [seq_dim, D]),
            helper.make_tensor_value_info("attention_mask", TensorProto.FLOAT, [seq_dim, total_dim]),
        ]
    else:  # 1 for every position attended to (cached + new): what onnxruntime-genai feeds its GQA models
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, total_dim]))
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}_{i}", TensorProto.FLOAT, [1, Hkv, past_dim, D]))

    ids = g.op("Reshape", ["input_ids", g.const([-1])], "ids")
    x = _embedding(g, state, cfg, spec, ids)
    if static:
        cos = g.op("Unsqueeze", ["cos", g.const([1])], "cos")  # [T, 1, D]
        sin = g.op("Unsqueeze", ["sin", g.const([1])], "sin")
        positions = (cos, sin, "attention_mask")
    else:
        positions = _gqa_positions(g, cfg, model.max_context)

    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, seq_dim, cfg.vocab_size])]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        h = _rms_norm(g, x, state[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        attn = _attention(g, h, state, blocks, spec, cfg, i, positions)
        x = g.op("Add", [x, attn], "resid")
        h = _rms_norm(g, x, state[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        x = g.op("Add", [x, _mlp(g, h, state, blocks, spec, cfg, p)], "resid")
        out_shape = [1, Hkv, spec.static_seq if static else "total", D]
        prefix = "new" if static else "present"
        for kind in ("key", "value"):
            outputs.append(helper.make_tensor_value_info(f"{prefix}_{kind}_{i}", TensorProto.FLOAT, out_shape))
        progress.advance()
    h = _rms_norm(g, x, state["model.norm.weight"], cfg.rms_norm_eps)
    if not static:
        h = _last_rows(g, h, inputs)
    logits = _lm_head(g, h, state, cfg, spec)
    g.op("Reshape", [logits, g.const([1, -1, cfg.vocab_size])], out_names=["logits"])

    graph = helper.make_graph(g.nodes, "decoder", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, producer_name="edgepack", ir_version=10)


def _last_rows(g: GraphBuilder, h: str, inputs: list[Any]) -> str:
    """The hidden states the output layer reads: every position, or only the last one when the optional
    input `last_token_logits` (int64 [1], default 0: an initializer backs it, so onnxruntime-genai, which does
    not feed it, gets every position) is 1. A prompt needs the last position's logits only: the output layer
    is the largest matmul, and a 128-token chunk's logits alone are 25 MB for a 49k vocabulary."""
    from onnx import TensorProto, helper

    inputs.append(helper.make_tensor_value_info(LAST_ONLY_INPUT, TensorProto.INT64, [1]))
    g.init(LAST_ONLY_INPUT, np.zeros(1, np.int64))
    start = g.op("Neg", [LAST_ONLY_INPUT], "rows_from")  # 0: all rows; -1: the last one
    return g.op("Slice", [h, start, g.const([np.iinfo(np.int64).max]), g.const([0])], "rows")


def _mlp(g: GraphBuilder, h: str, state: Mapping, blocks: Mapping, spec: GraphSpec, cfg: Any, p: str) -> str:
    """The gated MLP: SiLU (Llama, Qwen2) or squared ReLU (BitNet), BitNet's sub-norm and int8 inputs."""
    gate, up = _linear(g, _int8_inputs(g, h, cfg), state, blocks, spec, [p + "mlp.gate_proj", p + "mlp.up_proj"])
    if cfg.hidden_act == "relu2":
        relu = g.op("Relu", [gate], "relu")
        act = g.op("Mul", [relu, relu], "relu2")
    else:
        act = g.op("Mul", [g.op("Sigmoid", [gate]), gate], "silu")
    hidden = _sub_norm(g, g.op("Mul", [act, up]), state, p + "mlp.ffn_sub_norm.weight", cfg)
    return _linear(g, _int8_inputs(g, hidden, cfg), state, blocks, spec, [p + "mlp.down_proj"])[0]


def _sub_norm(g: GraphBuilder, x: str, state: Mapping, name: str, cfg: Any) -> str:
    """BitNet's RMSNorm before a block's last linear; the identity for Llama and Qwen2 (no such weight)."""
    return _rms_norm(g, x, state[name], cfg.rms_norm_eps) if cfg.architecture == "bitnet" else x


@dataclass(frozen=True)
class Int8Input:
    """A layer linear's input rounded as BitNet does: integer codes [T, K] (|code| <= 127) and the per-token
    factor s [T, 1]; the value the torch model multiplies is codes / s."""

    codes: str
    scale: str


def _int8_inputs(g: GraphBuilder, x: str, cfg: Any) -> "str | Int8Input":
    """BitNet's activation rounding (`edgepack.model.Int8Activations`) on [T, features], in the same fp32 ops and
    order: s = 127 / max(absmax per token, 1e-5); codes = clip(round(x * s), -128, 127). ONNX Round is
    half-to-even like torch.round, so the codes equal the torch model's. `x` itself for a float model."""
    if not cfg.int8_activations:
        return x
    absmax = g.op("ReduceMax", [g.op("Abs", [x], "abs"), g.const([-1])], "absmax", keepdims=1)
    scale = g.op("Div", [g.const(127.0, np.float32), g.op("Max", [absmax, g.const(1e-5, np.float32)], "amax")], "s")
    codes = g.op("Round", [g.op("Mul", [x, scale], "xs")], "round")
    codes = g.op("Clip", [codes, g.const(-128.0, np.float32), g.const(127.0, np.float32)], "codes")
    return Int8Input(codes, scale)


def _value(g: GraphBuilder, x: "str | Int8Input") -> str:
    """The float input a linear multiplies: codes / s for a rounded input (as the torch model computes it)."""
    return g.op("Div", [x.codes, x.scale], "x_int8") if isinstance(x, Int8Input) else x


def _embedding(g: GraphBuilder, state: Mapping, cfg: Any, spec: GraphSpec, ids: str) -> str:
    if spec.weights == "fp32":
        return g.op("Gather", [g.init("embed_tokens", state["model.embed_tokens.weight"].numpy()), ids], "embed")
    codes, scales = _int8_table(g, "embed_tokens", lambda: state["model.embed_tokens.weight"])
    rows = g.op("Cast", [g.op("Gather", [codes, ids], "emb_codes")], "emb_f", to=1)  # [T, H/32, 32]
    rows = g.op("Sub", [rows, g.const(128.0, np.float32)], "emb_c")
    row_scales = g.op("Unsqueeze", [g.op("Gather", [scales, ids], "emb_s"), g.const([-1])], "emb_s")
    return g.op("Reshape", [g.op("Mul", [rows, row_scales], "emb"), g.const([-1, cfg.hidden_size])], "embed")


def _int8_table(g: GraphBuilder, name: str, read: Callable[[], torch.Tensor]) -> tuple[str, str]:
    """The int8 block-32 table `name`, written once (`read` is called only the first time: a tied table is
    both the embedding and the output layer)."""
    key = ("int8", name)
    if key not in g._consts:
        codes, scales = int8_blocks(read())
        g._consts[key] = (g.init(f"{name}.codes", codes), g.init(f"{name}.scales", scales))  # type: ignore[assignment]
    return g._consts[key]  # type: ignore[return-value]


def _lm_head(g: GraphBuilder, h: str, state: Mapping, cfg: Any, spec: GraphSpec) -> str:
    tied = cfg.tie_word_embeddings or "lm_head.weight" not in state
    name = "model.embed_tokens.weight" if tied else "lm_head.weight"
    if spec.weights == "fp32":
        if tied and spec.static_seq is None:  # the gather table is the output layer too: Gemm reads it transposed
            return g.op("Gemm", [h, "embed_tokens"], "logits2d", transB=1)
        return g.op("MatMul", [h, g.init("lm_head.weight_t", state[name].t().contiguous().numpy())], "logits2d")
    codes, scales = _int8_table(g, "embed_tokens" if tied else "lm_head", lambda: state[name])
    return g.op(
        "MatMulNBits", [h, codes, scales], "logits2d", domain=MS_DOMAIN,
        K=cfg.hidden_size, N=cfg.vocab_size, bits=8, block_size=BLOCK, accuracy_level=spec.accuracy_level,
    )


def _rms_norm(g: GraphBuilder, x: str, weight: torch.Tensor, eps: float) -> str:
    # One fused op, not Pow -> ReduceMean -> Sqrt -> Div: QDQ would give the mean of squares its own 16-bit
    # range, and a token whose residual holds a 750 outlier squares it to ~5e5, so every ordinary token's
    # statistic rounds to 0 (the NPU build scored 3% top-1 that way, 84% with the fused op).
    return g.op("RMSNormalization", [x, g.init(g.name("norm_w"), weight.numpy())], "norm", axis=-1, epsilon=eps)


def _linear(g: GraphBuilder, x: "str | Int8Input", state: Mapping, blocks: dict, spec: GraphSpec,
            names: list[str]) -> list[str]:
    """One matmul for several linears that read the same input (q/k/v, gate/up), split afterwards."""
    tag = names[0].split(".")[-1] if len(names) == 1 else "_".join(n.split(".")[-1].split("_")[0] for n in names)
    base = f"{names[0].rsplit('.', 1)[0]}.{tag}"
    if spec.weights != "ternary":
        x = _value(g, x)
    if spec.weights == "fp32":
        weights = [state[n + ".weight"].float() for n in names]
        widths = [w.shape[0] for w in weights]
        y = g.op("MatMul", [x, g.init(base + ".weight_t", torch.cat(weights).t().contiguous().numpy())], tag)
    elif spec.weights == "ternary":
        ternary = [_ternary_of(blocks, n) for n in names]
        widths = [p.codes.shape[0] for p in ternary]
        y = _ternary_linear(g, x, ternary, base, spec)
    else:
        parts = [_blocks_of(g, n, state, blocks) for n in names]
        widths = [p.codes.shape[0] for p in parts]
        y = _blocks_linear(g, x, parts, base, spec)
    biases = [state.get(n + ".bias") for n in names]
    if any(b is not None for b in biases):
        y = g.op("Add", [y, g.init(base + ".bias", torch.cat(biases).numpy())], tag + "_b")
    if len(names) == 1:
        return [y]
    return g.op("Split", [y, g.const(widths)], tag, outputs=len(names), axis=-1)


def _ternary_of(blocks: Mapping, name: str) -> TernaryBlocks:
    found = blocks.get(name + ".weight")
    if not isinstance(found, TernaryBlocks):
        raise EdgepackError(f"{name}.weight has no ternary codes, which the ternary preset stores",
                            "export a BitNet b1.58 checkpoint whose every layer linear is ternary, or use -q int4")
    return found


def _ternary_linear(g: GraphBuilder, x: "str | Int8Input", parts: list[TernaryBlocks], base: str,
                    spec: GraphSpec) -> str:
    """One 2-bit MatMulNBits over the parts stacked by rows, the codes exact. With BitNet's int8 inputs and one
    scale per row (a Hugging Face checkpoint; a GGUF whose blocks share it) the matmul is exact too
    (`_anchored_linear`); otherwise ORT's level-4 kernel rounds the input again per block (counted in `carried`
    under "ternary_rerounded")."""
    g.carried[TERNARY_BITS] += len(parts)
    rows = _row_scales(parts) if isinstance(x, Int8Input) else None
    if rows is None:
        if spec.accuracy_level:
            g.carried["ternary_rerounded"] += len(parts)
        block = ternary_block(parts)
        codes = torch.cat([p.codes for p in parts]).numpy()
        scales = torch.cat([p.scales_per(block) for p in parts]).numpy().astype(np.float32)
        return _matmul_2bit(g, _value(g, x), codes, scales, block, base, spec)
    codes = anchored_codes(torch.cat([p.codes for p in parts]).numpy())
    blocks = codes.shape[1] // TERNARY_BLOCK
    scales = np.repeat(rows.numpy().astype(np.float32)[:, None], blocks, axis=1)
    y = _matmul_2bit(g, _anchored(g, x.codes, parts[0].codes.shape[1]), codes, scales, TERNARY_BLOCK, base, spec)
    return g.op("Div", [y, x.scale], "y_int8")


def _matmul_2bit(g: GraphBuilder, x: str, codes: np.ndarray, scales: np.ndarray, block: int, base: str,
                 spec: GraphSpec) -> str:
    """MatMulNBits over ternary codes [N, K]: byte j of a block holds elements 4j..4j+3 from the low bits up, each
    code + 2 against the 2-bit default zero point 2, so the stored weights are the codes times their scale."""
    rows, cols = codes.shape
    per_byte = 8 // TERNARY_BITS
    # -1 -> 1, 0 -> 2, 1 -> 3
    q = (codes + 2).astype(np.uint8).reshape(rows, cols // block, block // per_byte, per_byte)
    packed = q[..., 0] | (q[..., 1] << 2) | (q[..., 2] << 4) | (q[..., 3] << 6)
    return g.op(
        "MatMulNBits", [x, g.init(base + ".qweight", packed), g.init(base + ".scales", scales)], "q2",
        domain=MS_DOMAIN, K=cols, N=rows, bits=TERNARY_BITS, block_size=block, accuracy_level=spec.accuracy_level,
    )


# Why anchors: ORT's level-4 kernel quantizes its input to int8 per block by the block's own absmax (scale
# absmax / 127), which re-rounds BitNet's per-token codes unless the block's absmax is 127 (measured on a tiny
# random BitNet: top-1 88.8%, KL 0.075 against the torch model). Each block of 128 therefore holds 127 real inputs
# and one anchor input fixed at 127 whose weight code is 0: every block's absmax is 127, its scale 1, and the
# integer codes pass through unchanged (+0.8% codes and multiply-adds).
ANCHOR = 127.0
REAL_PER_BLOCK = TERNARY_BLOCK - 1


def anchored_codes(codes: np.ndarray) -> np.ndarray:
    """Ternary codes [N, K] laid out as `_anchored` lays out the input: 127 real columns and one zero per block of
    128 (the last block padded with zeros)."""
    rows, cols = codes.shape
    blocks = -(-cols // REAL_PER_BLOCK)
    padded = np.zeros((rows, blocks * REAL_PER_BLOCK), np.int8)
    padded[:, :cols] = codes
    anchors = np.zeros((rows, blocks, 1), np.int8)
    return np.concatenate([padded.reshape(rows, blocks, REAL_PER_BLOCK), anchors], axis=-1).reshape(rows, -1)


def _anchored(g: GraphBuilder, codes: str, cols: int) -> str:
    """The integer input [T, K] as blocks of 127 real values (zero-padded) plus the anchor 127."""
    blocks = -(-cols // REAL_PER_BLOCK)
    pad = blocks * REAL_PER_BLOCK - cols
    x = g.op("Pad", [codes, g.const([0, 0, 0, pad]), g.const(0.0, np.float32)], "xpad") if pad else codes
    x = g.op("Reshape", [x, g.const([-1, blocks, REAL_PER_BLOCK])], "xblk")
    x = g.op("Pad", [x, g.const([0, 0, 0, 0, 0, 1]), g.const(ANCHOR, np.float32)], "xanchor")
    return g.op("Reshape", [x, g.const([-1, blocks * TERNARY_BLOCK])], "xanch")


def _row_scales(parts: list[TernaryBlocks]) -> torch.Tensor | None:
    """One scale per row of the stacked parts [N], or None where a row's blocks holding a non-zero code have
    different scales (an all-zero block's scale multiplies nothing, so it may differ)."""
    found = []
    for p in parts:
        rows, cols = p.codes.shape
        used = p.codes.view(rows, cols // p.block, p.block).ne(0).any(-1)
        high = torch.where(used, p.scales, torch.full_like(p.scales, -torch.inf)).amax(1)
        low = torch.where(used, p.scales, torch.full_like(p.scales, torch.inf)).amin(1)
        if bool((used.any(1) & (high != low)).any()):
            return None
        found.append(torch.where(used.any(1), high, torch.zeros_like(high)))
    return torch.cat(found)


def ternary_codes(packed: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The codes [rows, cols] (int8, -1/0/1) back out of a packed 2-bit initializer [rows, blocks, bytes], anchors
    removed when the stored width is the anchored layout of `cols`: for checks."""
    shifts = np.arange(0, 8, TERNARY_BITS, dtype=np.uint8)
    q = ((packed[..., None] >> shifts) & 3).astype(np.int8) - 2
    stored = q.reshape(rows, -1)
    if stored.shape[1] == cols:
        return stored
    return stored.reshape(rows, -1, TERNARY_BLOCK)[..., :REAL_PER_BLOCK].reshape(rows, -1)[:, :cols]


def _blocks_of(g: GraphBuilder, name: str, state: Mapping, blocks: Mapping) -> CarriedBlocks:
    found = blocks.get(name + ".weight")
    if found is None:
        return int4_blocks_from_float(state[name + ".weight"])
    g.carried[4 if isinstance(found, Int4Blocks) else 8] += 1
    return found


def _blocks_linear(g: GraphBuilder, x: str, parts: list[CarriedBlocks], base: str, spec: GraphSpec) -> str:
    """One MatMulNBits over the parts stacked by rows: 4-bit when every part is (Int4Blocks), else 8-bit in the
    smallest block any part uses (Int8Blocks.of: int4 codes and blocks of 32 are exact in that form too)."""
    if all(isinstance(p, Int4Blocks) for p in parts):
        bits, block, shift = 4, BLOCK, 8
    else:
        block = min(p.block if isinstance(p, Int8Blocks) else BLOCK for p in parts)
        parts = [Int8Blocks.of(p, block) for p in parts]
        bits, shift = 8, 128
    codes = torch.cat([p.codes for p in parts]).numpy()
    scales = torch.cat([p.scales for p in parts]).numpy().astype(np.float32)
    rows, cols = codes.shape
    q = (codes.astype(np.int16) + shift).astype(np.uint8).reshape(rows, cols // block, block)
    if bits == 4:  # element 2j in the low nibble of byte j, 2j + 1 in the high one
        q = q.reshape(rows, cols // block, block // 2, 2)
        q = q[..., 0] | (q[..., 1] << 4)
    y = g.op(
        "MatMulNBits", [x, g.init(base + ".qweight", q), g.init(base + ".scales", scales)], f"q{bits}",
        domain=MS_DOMAIN, K=cols, N=rows, bits=bits, block_size=block, accuracy_level=spec.accuracy_level,
    )
    if all(p.offsets is None for p in parts):
        return y
    offsets = torch.cat([p.offsets if p.offsets is not None else torch.zeros_like(p.scales) for p in parts])
    # sum(x over block b) * offset[n, b]: the asymmetric part of every block, in one small fp32 matmul.
    sums = g.op("ReduceSum", [g.op("Reshape", [x, g.const([-1, cols // block, block])], "xb"), g.const([-1])],
                "xsum", keepdims=0)
    shift_out = g.op("MatMul", [sums, g.init(base + ".offsets_t", offsets.t().contiguous().numpy())], "shift")
    return g.op("Add", [y, shift_out], f"q{bits}o")


def _gqa_positions(g: GraphBuilder, cfg: Any, max_context: int) -> tuple[str, ...]:
    """CPU graph: what GroupQueryAttention needs to place T new tokens after the cached ones, derived from the
    `attention_mask` input as onnxruntime-genai's own models do: seqlens_k = attended positions - 1 and the
    total length. Not from the cache's shape, so the cache may be one max-length buffer shared by past and
    present (genai's `past_present_share_buffer`; edgepack's backend binds it the same way): no per-step
    copies. Rotary tables cos, sin [max_context, D/2]."""
    from onnx import TensorProto

    from edgepack.model import rope_frequencies

    angles = torch.arange(max_context, dtype=torch.float32)[:, None] * rope_frequencies(cfg)[None, :]
    tables = g.init("rope_cos", angles.cos().numpy()), g.init("rope_sin", angles.sin().numpy())
    attended = g.op("ReduceSum", ["attention_mask", g.const([1])], "attended", keepdims=0)  # [1]
    seqlens_k = g.op("Cast", [g.op("Sub", [attended, g.const([1])], "last")], "seqlens_k", to=TensorProto.INT32)
    total = g.op("Gather", [g.op("Shape", ["attention_mask"], "mask_shape"), g.const(1)], "total", axis=0)
    total = g.op("Cast", [total], "total_i", to=TensorProto.INT32)
    return tables[0], tables[1], seqlens_k, total


def _rope(g: GraphBuilder, x: str, cos: str, sin: str, head_dim: int) -> str:
    lo, hi = g.op("Split", [x, g.const([head_dim // 2, head_dim // 2])], "half", outputs=2, axis=-1)
    rotated = g.op("Concat", [g.op("Neg", [hi]), lo], "rot", axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotated, sin])], "roped")


def _attention(g: GraphBuilder, h: str, state: Mapping, blocks: dict, spec: GraphSpec, cfg: Any, i: int,
               positions: tuple[str, ...]) -> str:
    """`positions`: what _gqa_positions returns (CPU graph), or (cos, sin, mask) graph inputs (NPU graphs)."""
    p = f"model.layers.{i}.self_attn."
    q, k, v = _linear(g, _int8_inputs(g, h, cfg), state, blocks, spec, [p + "q_proj", p + "k_proj", p + "v_proj"])
    attend = _explicit_attention if spec.static_seq is not None else _fused_attention
    ctx = _sub_norm(g, attend(g, q, k, v, cfg, i, *positions), state, p + "attn_sub_norm.weight", cfg)
    return _linear(g, _int8_inputs(g, ctx, cfg), state, blocks, spec, [p + "o_proj"])[0]


def _fused_attention(g: GraphBuilder, q: str, k: str, v: str, cfg: Any, i: int, cos: str, sin: str,
                     seqlens_k: str, total: str) -> str:
    """CPU graph: ONNX Runtime's GroupQueryAttention (RoPE, cache append, causal GQA softmax in one kernel;
    what onnxruntime-genai's CPU models use). ~25 small ops per layer become one: decode is op-bound here."""
    batch = lambda t: g.op("Unsqueeze", [t, g.const([0])], "b")  # noqa: E731  [T, X] -> [1, T, X]
    out = g.op(
        "GroupQueryAttention", [batch(q), batch(k), batch(v), f"past_key_{i}", f"past_value_{i}", seqlens_k, total,
                                cos, sin],
        domain=MS_DOMAIN, outputs=3, out_names=[g.name("attn"), f"present_key_{i}", f"present_value_{i}"],
        num_heads=cfg.num_heads, kv_num_heads=cfg.num_kv_heads, do_rotary=1, rotary_interleaved=0,
        scale=float(1.0 / np.sqrt(cfg.head_dim)),
    )[0]
    return g.op("Reshape", [out, g.const([-1, cfg.num_heads * cfg.head_dim])], "ctx2")


def _explicit_attention(g: GraphBuilder, q: str, k: str, v: str, cfg: Any, i: int, cos: str, sin: str,
                        mask: str) -> str:
    """NPU graphs: plain ops QNN runs on the HTP; the cache is an input of fixed length, the new keys/values
    are outputs (the host writes them into its buffer)."""
    D, Hn, Hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    groups = Hn // Hkv
    q = _rope(g, g.op("Reshape", [q, g.const([-1, Hn, D])], "q3"), cos, sin, D)  # [T, Hn, D]
    k = _rope(g, g.op("Reshape", [k, g.const([-1, Hkv, D])], "k3"), cos, sin, D)
    v = g.op("Reshape", [v, g.const([-1, Hkv, D])], "v3")
    # [T, heads, D] -> [1, heads, T, D]
    k_new = g.op("Unsqueeze", [g.op("Transpose", [k], "kt", perm=[1, 0, 2]), g.const([0])], "k4")
    v_new = g.op("Unsqueeze", [g.op("Transpose", [v], "vt", perm=[1, 0, 2]), g.const([0])], "v4")
    g.op("Identity", [k_new], out_names=[f"new_key_{i}"])
    g.op("Identity", [v_new], out_names=[f"new_value_{i}"])
    k_all = g.op("Concat", [f"past_key_{i}", k_new], "k_all", axis=2)
    v_all = g.op("Concat", [f"past_value_{i}", v_new], "v_all", axis=2)
    # Queries grouped by their kv head: [T, Hn, D] -> [1, Hkv, G*T, D] (head h = kv * G + g, as repeat_interleave).
    qh = g.op("Transpose", [q], "qt", perm=[1, 0, 2])
    qh = g.op("Reshape", [qh, g.const([1, Hkv, -1, D])], "qg")
    qh = g.op("Mul", [qh, g.const(1.0 / np.sqrt(D), np.float32)], "qs")
    scores = g.op("MatMul", [qh, g.op("Transpose", [k_all], "kT", perm=[0, 1, 3, 2])], "scores")  # [1,Hkv,G*T,S]
    tiled = g.op("Tile", [mask, g.const([groups, 1])], "mask_g") if groups > 1 else mask  # [G*T, S]
    probs = g.op("Softmax", [g.op("Add", [scores, tiled], "masked")], "probs", axis=-1)
    ctx = g.op("MatMul", [probs, v_all], "ctx")  # [1, Hkv, G*T, D]
    ctx = g.op("Reshape", [ctx, g.const([Hn, -1, D])], "ctx3")  # [Hn, T, D]
    return g.op("Reshape", [g.op("Transpose", [ctx], "ctxt", perm=[1, 0, 2]), g.const([-1, Hn * D])], "ctx2")
