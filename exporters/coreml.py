"""Lower a quantized `CausalLM` to a Core ML ML program (`model.mlpackage`) in the stateful-LLM layout that
Hugging Face's swift-transformers (`LanguageModel.loadCompiled` -> `LanguageModelWithStatefulKVCache`) drives.

The contract, read from swift-transformers' Sources/Models/LanguageModel.swift (see SWIFT_TRANSFORMERS) and
checked on the written package by `check_swift_transformers` (its result is the manifest's
`backend.swift_transformers`):
- default function `main`: inputs `inputIds` int32 [1, T] with a *ranged* T (1..context; swift-transformers
  fatalErrors "Expecting ranged query sequence length." unless max - min > 1) and `causalMask` fp16
  [1, 1, 1, P + T + 1]; states `keyCache` / `valueCache` fp16 [layers, 1, kv_heads, context, head_dim] (one of
  each for all layers, as Apple's and Hugging Face's stateful exports have them); output `logits` [1, T, vocab];
  metadata `co.huggingface.exporters.{name,task,architecture,framework,precision}`.
- the cache position P of inputIds' first token is derived from the shapes swift-transformers passes (see
  `cache_position`); the causal mask itself is built inside the model (swift-transformers passes zeros).
- two more functions for the Neural Engine, `prefill` (a fixed chunk of tokens) and `decode` (1 token), with
  static shapes (the ANE compiles those ahead; a ranged function runs on the GPU/CPU) and inputs `inputIds` +
  `position` (int32 [1]), over the same weights and the same state layout. swift-transformers cannot pick a
  function; they are for apps that call Core ML themselves (`MLModelConfiguration.functionName`).

Why each choice:
- iOS 18 / macOS 15 ML program: the first with Core ML *state* (the KV cache stays inside the model between
  calls) and with block-wise int4 weights (`constexpr_blockwise_shift_scale`).
- torch.export frontend on a Core ML-specific forward (`CoreMLCausalLM`) that reuses the project's modules
  and weights: the ExecuTorch path's `index_copy_`/custom ops do not convert. The cache is written with a
  one-hot matmul (`cache * keep + onehot @ k`) instead of a dynamic slice, and attention reads the whole
  static cache under an additive mask: matmul, mul, add, softmax only, the same graph for every function.
- fp16 everywhere (the ANE computes in fp16); RMSNorm is rescaled by max|x| first so x^2 cannot overflow.
- Weights: the preset's quantization is carried, not redone. Each torchao int4/int8 weight becomes a Core ML
  block-wise (or per-channel) shift-scale constant with exactly its codes and scales, built with
  coremltools.optimize's own constexpr builder; re-quantizing already-quantized weights stacks a second
  rounding (see sdk/blocks.py). A tied embedding gathers from the output layer's int8 table: one copy, shared
  by the three functions (`save_multifunction` deduplicates them).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from edgepack.errors import EdgepackError
from edgepack.exporters import ExportRequest, register_exporter
from edgepack.exporters.coreml_ane import ane_report
from edgepack.model import (
    SUPPORTED_ARCHITECTURES, CausalLM, ModelConfig, Prepare, build_model, rope_frequencies, through,
)
from edgepack.progress import SILENT, Steps

PROGRAM_FILE = "model.mlpackage"
MAIN, PREFILL, DECODE = "main", "prefill", "decode"  # main: swift-transformers; prefill/decode: the ANE's
INPUT_IDS, CAUSAL_MASK, POSITION, LOGITS = "inputIds", "causalMask", "position", "logits"
KEY_CACHE, VALUE_CACHE = "keyCache", "valueCache"
MASK_VALUE = -30000.0  # additive mask: far below any fp16 score, far from fp16's -65504 overflow
DEPLOYMENT_TARGETS = ("iOS18", "macOS15")
IOS18_SPEC_VERSION = 9  # Core ML specification version of iOS 18 / macOS 15 (states)
# Where the contract was read: the class that drives a stateful model, at this commit (tag 1.3.3 + 4).
SWIFT_TRANSFORMERS = "huggingface/swift-transformers@eec09bdffb04 Sources/Models/LanguageModel.swift"
HF_TASK = "text-generation"
HF_METADATA = ("name", "task", "architecture", "framework", "precision")  # co.huggingface.exporters.<key>
HF_ARCHITECTURES = {family: name for name, family in SUPPORTED_ARCHITECTURES.items()}


def state_shape(cfg: ModelConfig, max_context: int) -> tuple[int, ...]:
    """keyCache / valueCache: [layers, batch 1, kv_heads, context, head_dim], one state each for all layers."""
    return (cfg.num_layers, 1, cfg.num_kv_heads, max_context, cfg.head_dim)


# ---------------------------------------------------------------------------------------------- weights


@dataclass
class Grid:
    """One quantized weight as Core ML stores it: w = scale * (codes - offset), one scale per block of inputs."""

    codes: np.ndarray  # int8 [rows, cols], int4 values in [-8, 7] when bits == 4
    scales: np.ndarray  # float32 [rows, cols // block]
    offsets: np.ndarray | None  # float32 [rows, cols // block], in code units; None = symmetric
    bits: int

    @property
    def block(self) -> int:
        return self.codes.shape[1] // self.scales.shape[1]

    def dequantize(self) -> np.ndarray:
        q = self.codes.astype(np.float32)
        if self.offsets is not None:
            q = q - np.repeat(self.offsets, self.block, axis=1)
        return q * np.repeat(self.scales, self.block, axis=1)

    def describe(self) -> str:
        kind = "per channel" if self.block == self.codes.shape[1] else f"per block of {self.block}"
        return f"int{self.bits} {kind}" + (" with offsets" if self.offsets is not None else "")


def _grid_of(t: torch.Tensor) -> Grid | None:
    """torchao's IntxUnpackedToInt8Tensor -> Grid (its exact codes and scales); None for a plain tensor."""
    if not (hasattr(t, "qdata") and hasattr(t, "scale") and hasattr(t, "block_size")):
        return None
    bits = {torch.int4: 4, torch.int8: 8}.get(getattr(t, "target_dtype", None))
    codes, scale = t.qdata.detach().to(torch.int8).numpy(), t.scale.detach().float().numpy()
    if bits is None or codes.ndim != 2 or tuple(t.block_size)[0] != 1:
        return None
    scales = scale.reshape(codes.shape[0], -1)
    zero = t.zero_point.detach().float().numpy().reshape(scales.shape) if t.zero_point is not None else None
    offsets = zero if zero is not None and np.any(zero) else None
    return Grid(codes.copy(), scales.astype(np.float32), offsets, bits)


def _as_float(t: torch.Tensor) -> torch.Tensor:
    return (t.dequantize() if hasattr(t, "qdata") else t).detach().float()


def _block_offset_grid(module: nn.Module) -> Grid:
    """`BlockOffsetLinear` (carried GGUF Q4_1 blocks): w = s*q + o  ->  s * (q - (-o/s))."""
    main = _grid_of(module.main.weight)
    assert main is not None and main.offsets is None
    o = (_as_float(module.offsets.weight) * module.block_scale).numpy()  # the student's offsets (`Smoothing`)
    s = main.scales
    zero = s == 0  # a constant block: represent o as o * (0 - (-1))
    codes = np.where(np.repeat(zero, main.block, axis=1), 0, main.codes).astype(np.int8)
    scales = np.where(zero, o, s).astype(np.float32)
    offsets = np.where(zero, -1.0, -o / np.where(zero, 1.0, s)).astype(np.float32)
    return Grid(codes, scales, offsets, 4)


def carried_weights(model: CausalLM) -> tuple[Mapping[str, torch.Tensor], dict[str, Grid]]:
    """Hugging Face-named float weights of the quantized model, and the quantization grid behind each.

    The float weights are dequantized when read (a lazy mapping), so building the Core ML forward from them
    holds one float copy of the model, not two (6.2 GB each for a 1.5B student).
    A tied embedding takes the output layer's grid (the preset untied them into two recipes; Core ML keeps
    one table that both the gather and the output matmul read)."""
    from edgepack.intake.weights import LazyWeights
    from edgepack.quantize import BlockOffsetLinear

    floats: dict[str, Callable[[], torch.Tensor]] = {}
    grids: dict[str, Grid] = {}
    for name, module in model.named_modules():
        if isinstance(module, BlockOffsetLinear):
            grids[f"{name}.weight"] = _block_offset_grid(module)
            if module.main.bias is not None:
                floats[f"{name}.bias"] = lambda t=module.main.bias: _as_float(t)
    for name, param in model.named_parameters():
        owner = name.rpartition(".")[0]
        if owner.endswith((".main", ".offsets", ".block_sum")) and f"{owner.rpartition('.')[0]}.weight" in grids:
            continue
        grid = _grid_of(param)
        if grid is not None:
            grids[name] = grid
        else:
            floats[name] = lambda t=param: _as_float(t)
    if model.config.tie_word_embeddings and "lm_head.weight" in grids:
        grids["model.embed_tokens.weight"] = grids.pop("lm_head.weight")
    elif model.config.tie_word_embeddings and "lm_head.weight" in floats:
        floats["model.embed_tokens.weight"] = floats.pop("lm_head.weight")
    for name, grid in grids.items():
        floats[name] = lambda g=grid: torch.from_numpy(g.dequantize())
    return LazyWeights(floats), grids


# ------------------------------------------------------------------------------------ Core ML forward


def cache_position(input_ids: torch.Tensor, causal_mask: torch.Tensor) -> Any:
    """Cache position of inputIds' first token, from the shapes swift-transformers passes.

    LanguageModelWithStatefulKVCache.predictNextTokenScores feeds `causalMask` = zeros [1, 1, 1, tokenCount + 1],
    tokenCount = every token so far including this call's: at prefill inputIds is the whole prompt [1, N] and
    the mask has N + 1 columns; then inputIds is the last token [1, 1] and the mask has N + k + 1. That is one
    column more than Apple's recipe (the Mistral 7B export takes [1, 1, T, P + T], P = columns - T); we follow
    what swift-transformers actually passes: P = columns - 1 - T. The mask's values (zeros) carry nothing; the
    causal mask is built in the model from P."""
    return causal_mask.shape[-1] - 1 - input_ids.shape[1]


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm that is safe in fp16: x * rsqrt(mean(x^2) + eps) == y * rsqrt(mean(y^2) + eps/c^2), y = x/c."""
    c = x.abs().amax(dim=-1, keepdim=True).clamp(min=1.0)
    y = x / c
    return norm.weight * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + norm.eps / (c * c)))


def _mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's MLP, BitNet's sub-norm before down_proj through `_rms_norm`: the squared-ReLU products reach
    thousands, whose squares overflow fp16 in a plain RMSNorm (the model's own normalizes in fp32, which the
    package's fp16 precision would undo)."""
    if mlp.ffn_sub_norm is None:
        return mlp(x)
    x = through(mlp.int8_inputs, x)
    hidden = _rms_norm(mlp.ffn_sub_norm, mlp.act(mlp.gate_proj(x)) * mlp.up_proj(x))
    return mlp.down_proj(through(mlp.int8_inputs, hidden))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


@dataclass
class Attend:
    """What every layer of one call attends with, and the caches it wrote (for the one state write at the end)."""

    cos: torch.Tensor  # [T, D]
    sin: torch.Tensor
    onehot: torch.Tensor  # [1, 1, S, T]: 1 where key position s is written by input token t
    keep: torch.Tensor  # [S, 1]: 0 at the positions written
    mask: torch.Tensor  # [G*T, S] additive causal mask, rows g*T + t
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


class CoreMLCausalLM(nn.Module):
    """The math of `CausalLM` for Core ML: KV cache in two fp16 buffers (Core ML states `keyCache`/`valueCache`,
    `state_shape`), logits [1, T, vocab]. Subclasses say where a call's T tokens sit in the cache. Their
    `forward` calls `decoder_layer` and `head` itself: torch.export records only that frame of the stack, which
    is how the ANE report tells layers from head (exporters/coreml_ane.py)."""

    def __init__(self, lm: CausalLM, max_context: int) -> None:
        super().__init__()
        cfg = lm.config
        self.lm, self.config, self.max_context = lm, cfg, max_context
        self.groups = cfg.num_heads // cfg.num_kv_heads
        angles = torch.arange(max_context, dtype=torch.float32)[:, None] * rope_frequencies(cfg)[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos_table", angles.cos(), persistent=False)
        self.register_buffer("sin_table", angles.sin(), persistent=False)
        self.register_buffer("key_positions", torch.arange(max_context, dtype=torch.int32), persistent=False)
        for name in (KEY_CACHE, VALUE_CACHE):
            self.register_buffer(name, torch.zeros(state_shape(cfg, max_context), dtype=torch.float16), persistent=False)

    def prepare(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, Attend]:
        """input_ids int32 [1, T] at cache positions `positions` int32 [T] -> embeddings and the attention setup."""
        onehot = (self.key_positions[:, None] == positions[None, :]).to(torch.float16)  # [S, T]
        visible = self.key_positions[None, :] <= positions[:, None]  # [T, S]
        attend = Attend(
            cos=self.cos_table[positions],
            sin=self.sin_table[positions],
            onehot=onehot[None, None],
            keep=1.0 - onehot.sum(dim=-1, keepdim=True),
            mask=torch.where(visible, 0.0, MASK_VALUE).repeat(self.groups, 1),
            keys=[],
            values=[],
        )
        return self.lm.model.embed_tokens(input_ids), attend

    def decoder_layer(self, i: int, layer: nn.Module, x: torch.Tensor, attend: Attend) -> torch.Tensor:
        cfg, seq = self.config, x.shape[1]
        attn = layer.self_attn
        # BitNet's int8 rounding (`Int8Activations`; none for Llama/Qwen2) converts to abs, reduce_max, round, clip
        # and runs in fp16: codes up to 127 are exact there, so only float order differs from fp32.
        h = through(attn.int8_inputs, _rms_norm(layer.input_layernorm, x))
        q = attn.q_proj(h).view(1, seq, cfg.num_heads, cfg.head_dim).transpose(1, 2)  # [1, H, T, D]
        k = attn.k_proj(h).view(1, seq, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(1, seq, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        q = _rotate(q, attend.cos, attend.sin) * (cfg.head_dim**-0.5)
        k = _rotate(k, attend.cos, attend.sin)
        for state, new, written in ((self.keyCache, k, attend.keys), (self.valueCache, v, attend.values)):
            written.append(state[i] * attend.keep + torch.matmul(attend.onehot, new.to(state.dtype)))  # [1, Hkv, S, D]
        k_all, v_all = attend.keys[-1].to(q.dtype), attend.values[-1].to(q.dtype)
        # Grouped-query attention without copying K/V: the G query heads of one KV head become G*T rows.
        q = q.reshape(1, cfg.num_kv_heads, self.groups * seq, cfg.head_dim)
        scores = torch.matmul(q, k_all.transpose(2, 3)) + attend.mask
        out = torch.matmul(torch.softmax(scores, dim=-1), v_all)  # [1, Hkv, G*T, D]
        # unflatten, not reshape: torch.export cannot prove the reshape's stride guard for a symbolic T.
        out = out.unflatten(2, (self.groups, seq)).permute(0, 3, 1, 2, 4)  # [1, T, Hkv, G, D]
        out = out.reshape(1, seq, cfg.num_heads * cfg.head_dim)
        if attn.attn_sub_norm is not None:  # BitNet: its sub-norm and int8 rounding before o_proj
            out = _rms_norm(attn.attn_sub_norm, out)
        x = x + attn.o_proj(through(attn.int8_inputs, out))
        return x + _mlp(layer.mlp, _rms_norm(layer.post_attention_layernorm, x))

    def write_states(self, attend: Attend) -> None:
        """One write per state (-> Core ML coreml_update_state), every layer's cache at once."""
        self.keyCache[:] = torch.stack(attend.keys)
        self.valueCache[:] = torch.stack(attend.values)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm.lm_head(_rms_norm(self.lm.model.norm, x))


class SwiftTransformersLM(CoreMLCausalLM):
    """Function `main`: `forward(inputIds int32 [1, T], causalMask fp16 [1, 1, 1, P + T + 1])`, as
    swift-transformers calls it (argument names are the Core ML input names)."""

    def forward(self, inputIds: torch.Tensor, causalMask: torch.Tensor) -> torch.Tensor:  # noqa: N803
        positions = torch.arange(inputIds.shape[1], dtype=torch.int32) + cache_position(inputIds, causalMask)
        x, attend = self.prepare(inputIds, positions)
        for i, layer in enumerate(self.lm.model.layers):
            x = self.decoder_layer(i, layer, x, attend)
        self.write_states(attend)
        return self.head(x)


class FixedShapeLM(CoreMLCausalLM):
    """Functions `prefill`/`decode` (static T, for the Neural Engine): `forward(inputIds int32 [1, T],
    position int32 [1])`, position = cache position of the first token."""

    def forward(self, inputIds: torch.Tensor, position: torch.Tensor) -> torch.Tensor:  # noqa: N803
        x, attend = self.prepare(inputIds, position + torch.arange(inputIds.shape[1], dtype=torch.int32))
        for i, layer in enumerate(self.lm.model.layers):
            x = self.decoder_layer(i, layer, x, attend)
        self.write_states(attend)
        return self.head(x)


def coreml_module(
    model: CausalLM, max_context: int, function: str = MAIN, placeholders: bool = False
) -> tuple[CoreMLCausalLM, dict[str, Grid]]:
    """The Core ML forward of `function` over float copies of the quantized model's weights, and their grids.

    `placeholders`: each weight that has a grid is a constant-valued stand-in instead (`placeholder_weights`),
    for conversion, where `carry_grids` replaces it: a float copy of a 1.5B student is 7.1 GB per function."""
    from edgepack.intake.weights import LazyWeights

    floats, grids = carried_weights(model)
    prepare = None
    if placeholders:  # nothing is dequantized: the piece reads zeros, then takes its stand-ins
        zeros = {name: lambda g=grid: torch.zeros((1, 1)).expand(g.codes.shape) for name, grid in grids.items()}
        floats = LazyWeights({name: zeros.get(name, lambda n=name, read=floats: read[n]) for name in floats})
        prepare = placeholder_weights(grids, model.config.tie_word_embeddings)
    lm = build_model(model.config, floats, max_context=1, prepare=prepare)  # its own KV buffers are unused here
    cls = SwiftTransformersLM if function == MAIN else FixedShapeLM
    return cls(lm, max_context).eval(), grids


def placeholder_weights(grids: Mapping[str, Grid], tied: bool) -> Prepare:
    """`build_model`'s prepare step that swaps each gridded weight of a piece for a stand-in of its shape that
    holds no memory (one value, zero strides), right after the piece is read. Each stand-in has its own value
    (1, 2, ...: exact in fp16), so coremltools' constant deduplication cannot merge two of them. A tied output
    layer takes the table's stand-in: one constant, as in the model."""
    values = {name: float(i + 1) for i, name in enumerate(grids)}
    made: dict[str, nn.Parameter] = {}

    def prepare(prefix: str, piece: nn.Module) -> None:
        for name, param in list(piece.named_parameters()):
            full = "model.embed_tokens.weight" if tied and prefix == "lm_head" else f"{prefix}.{name}"
            if full not in values:
                continue
            if full not in made:
                stand_in = torch.full((1,) * param.dim(), values[full], dtype=param.dtype).expand(param.shape)
                made[full] = nn.Parameter(stand_in, requires_grad=False)
            owner, _, attr = name.rpartition(".")
            setattr(piece.get_submodule(owner) if owner else piece, attr, made[full])

    return prepare


def export_program(module: CoreMLCausalLM, seq_len: int | None) -> torch.export.ExportedProgram:
    """torch.export of a Core ML forward, decomposed: what coremltools converts (and what the tests run).
    `seq_len` None: `main`, query length 1..context and mask columns 2..context + 1; else that many tokens."""
    ctx = module.max_context
    if seq_len is None:
        example = (torch.zeros((1, 3), dtype=torch.int32), torch.zeros((1, 1, 1, 4), dtype=torch.float16))
        dims = {
            "inputIds": {1: torch.export.Dim("query_length", min=1, max=ctx)},
            "causalMask": {3: torch.export.Dim("mask_columns", min=2, max=ctx + 1)},
        }
    else:
        example = (torch.zeros((1, seq_len), dtype=torch.int32), torch.zeros((1,), dtype=torch.int32))
        dims = None
    with torch.no_grad():
        return torch.export.export(module, example, dynamic_shapes=dims).run_decompositions({})


# ----------------------------------------------------------------------------------------- conversion


def _const_name(param: str) -> str:
    return "p_lm_" + param.replace(".", "_")


def carry_grids(prog: Any, grids: dict[str, Grid]) -> dict[str, str]:
    """Replace each weight constant that has a grid by a Core ML constexpr with exactly those codes/scales.

    Uses coremltools.optimize's own constexpr builder (`linear_quantize_weights._create_constexpr_var`), so
    the op is what `ct.optimize.coreml.linear_quantize_weights` would emit, minus its re-rounding."""
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.scope import ScopeInfo
    from coremltools.optimize import _utils as optimize_utils
    from coremltools.optimize.coreml._quantization_passes import linear_quantize_weights

    by_const = {_const_name(name): name for name in grids}
    if "model.embed_tokens.weight" in grids:  # tied: torch.export may name the shared table either way
        by_const.setdefault(_const_name("lm_head.weight"), "model.embed_tokens.weight")
    done: dict[str, str] = {}
    for function in prog.functions.values():
        # One block context for all replacements: leaving it re-checks the whole block (O(ops) each time).
        with function:
            for op in list(function.operations):
                base = op.name.removesuffix("_to_fp16")
                if op.op_type != "const" or base not in by_const or by_const[base] in done:
                    continue
                name = by_const[base]
                grid = grids[name]
                if tuple(op.outputs[0].shape) != grid.codes.shape:
                    raise EdgepackError(f"Core ML weight {op.name} has shape {op.outputs[0].shape}", "report this bug")
                dtype = types.nptype_from_builtin(types.int4 if grid.bits == 4 else types.int8)
                params = optimize_utils.QuantParams(
                    data=grid.codes.astype(dtype),
                    scale=grid.scales.astype(np.float16),
                    offset=None if grid.offsets is None else grid.offsets.astype(np.float16),
                    nbits=np.uint8(grid.bits),
                )
                scopes = [ScopeInfo(source=src, data=data) for src, data in op.scopes.items() if "EXIR" in str(src) and data]
                with mb.scope(*scopes):  # the new op keeps the weight's torch.export provenance
                    new = linear_quantize_weights._create_constexpr_var(op, params)
                    op.enclosing_block.replace_uses_of_var_after_op(
                        anchor_op=op, old_var=op.outputs[0], new_var=new, no_check_var_types=True
                    )
                    op.enclosing_block.remove_ops([op])
                done[name] = grid.describe()
    missing = sorted(set(grids) - set(done))
    if missing:
        raise EdgepackError(f"quantized weights {missing[:3]} not found in the Core ML program", "report this bug")
    return done


def _coreml_inputs(seq_len: int | None, max_context: int) -> list[Any]:
    import coremltools as ct

    if seq_len is None:  # main: the ranges swift-transformers needs (see cache_position for the mask)
        return [
            ct.TensorType(name=INPUT_IDS, shape=(1, ct.RangeDim(1, max_context, default=1)), dtype=np.int32),
            ct.TensorType(
                name=CAUSAL_MASK, shape=(1, 1, 1, ct.RangeDim(2, max_context + 1, default=2)), dtype=np.float16
            ),
        ]
    return [
        ct.TensorType(name=INPUT_IDS, shape=(1, seq_len), dtype=np.int32),
        ct.TensorType(name=POSITION, shape=(1,), dtype=np.int32),
    ]


def convert(
    model: CausalLM, max_context: int, seq_len: int | None, deployment: str = "iOS18"
) -> tuple[Any, dict[str, str]]:
    """torch.export -> Core ML MIL program, fp16, KV cache as states, the quantization grids carried.
    `seq_len` None: the ranged `main` function (swift-transformers); else a static one of that many tokens."""
    import coremltools as ct

    if deployment not in DEPLOYMENT_TARGETS:
        raise EdgepackError(
            f"Core ML deployment target {deployment!r} is not supported",
            f"use one of {', '.join(DEPLOYMENT_TARGETS)} (states and int4 blocks need iOS 18 / macOS 15)",
        )
    module, grids = coreml_module(model, max_context, MAIN if seq_len is None else DECODE, placeholders=True)
    exported = export_program(module, seq_len)
    shape = state_shape(model.config, max_context)
    prog = ct.convert(
        exported,
        inputs=_coreml_inputs(seq_len, max_context),
        outputs=[ct.TensorType(name=LOGITS, dtype=np.float16)],
        states=[
            ct.StateType(wrapped_type=ct.TensorType(shape=shape, dtype=np.float16), name=name)
            for name in (KEY_CACHE, VALUE_CACHE)
        ],
        minimum_deployment_target=getattr(ct.target, deployment),
        compute_precision=ct.precision.FLOAT16,
        convert_to="milinternal",
    )
    return prog, carry_grids(prog, grids)


def save_program(prog: Any, path: Path, deployment: str) -> None:
    """MIL program -> .mlpackage on disk (no compilation: works on Linux)."""
    import coremltools as ct

    mlmodel = ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=getattr(ct.target, deployment),
        compute_precision=ct.precision.FLOAT16,
        pass_pipeline=ct.PassPipeline.EMPTY,
        skip_model_load=True,
    )
    mlmodel.save(str(path))


def package_functions(max_context: int, prefill: int) -> dict[str, int]:
    """Function -> the most tokens one call takes. `main` is the default (what swift-transformers loads)."""
    functions = {MAIN: max_context, PREFILL: prefill, DECODE: 1}
    if prefill <= 1:
        del functions[PREFILL]
    return functions


def package_metadata(name: str, cfg: ModelConfig, max_context: int) -> dict[str, str]:
    """The user-defined metadata: Hugging Face's exporter keys (swift-transformers reads `name` as the model's
    name, and as the Hub repo to fetch a tokenizer from when the app passes none), then edgepack's own."""
    from edgepack import __version__

    hf = {"name": name, "task": HF_TASK, "architecture": HF_ARCHITECTURES[cfg.architecture],
          "framework": "pytorch", "precision": "float16"}  # fmt: skip
    return {f"co.huggingface.exporters.{k}": v for k, v in hf.items()} | {
        "edgepack.version": __version__,
        "edgepack.context_length": str(max_context),
        "edgepack.cache_position": "causalMask.shape[-1] - 1 - inputIds.shape[1] (swift-transformers' mask)",
        "edgepack.functions": f"{MAIN}: swift-transformers (default); {PREFILL}, {DECODE}: Neural Engine "
        f"({INPUT_IDS} + {POSITION})",
    }


def _write_with_metadata(source: Path, path: Path, metadata: dict[str, str], description: str) -> None:
    """Copy the package to `path` with its description and user-defined metadata set (save_multifunction
    writes none)."""
    import coremltools as ct

    mlmodel = ct.models.MLModel(str(source), skip_model_load=True)
    mlmodel.short_description = description
    mlmodel.user_defined_metadata.update(metadata)
    mlmodel.save(str(path))


def equal_weights(model: CausalLM) -> tuple[list[list[str]], dict[str, float]]:
    """What the package does not store under each weight's own name: (groups of weights, by Hugging Face name,
    with equal values as the package stores them; unquantized weights that hold one value everywhere).

    coremltools merges equal constants into one (`const_deduplication`, which `save_multifunction` runs inside
    every function) under the first name, and drops a multiplication by ones or an addition of zeros
    (`noop_elimination`): the norms of a fresh or random model are all ones. The manifest records both so the
    weights can be read back by name (`weights_from_mlpackage`)."""
    import hashlib

    floats, grids = carried_weights(model)
    groups: dict[bytes, list[str]] = {}
    constants: dict[str, float] = {}
    for name in floats:
        digest = hashlib.sha256()
        if name in grids:
            grid = grids[name]
            for part in (grid.codes, grid.scales.astype(np.float16), grid.offsets):
                digest.update(b"-" if part is None else np.ascontiguousarray(part).tobytes())
        else:
            value = floats[name].to(torch.float16)
            if bool((value == value.flatten()[0]).all()):
                constants[name] = float(value.flatten()[0])
                continue
            digest.update(value.numpy().tobytes())
        groups.setdefault(digest.digest(), []).append(name)
    return [names for names in groups.values() if len(names) > 1], constants


def build_package(
    model: CausalLM, path: Path, max_context: int, prefill: int, deployment: str = "iOS18",
    step: Steps = SILENT, metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write the .mlpackage (`main` ranged, the default; `prefill`/`decode` static; one weight copy, the same
    state layout) and return what the manifest records about it."""
    import coremltools as ct

    functions = package_functions(max_context, prefill)
    reports, carried = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        desc = ct.utils.MultiFunctionDescriptor()
        for name, tokens in functions.items():
            seq_len = None if name == MAIN else tokens
            step(f"convert to Core ML: {name} ({f'1..{tokens}' if seq_len is None else tokens} tokens)")
            prog, carried = convert(model, max_context, seq_len, deployment)
            reports[name] = ane_report(prog, f"1..{tokens}" if seq_len is None else tokens)
            single = Path(tmp) / f"{name}.mlpackage"
            save_program(prog, single, deployment)
            del prog
            desc.add_function(str(single), src_function_name="main", target_function_name=name)
        desc.default_function_name = MAIN
        step("write mlpackage (weights shared by the functions)")
        merged = Path(tmp) / "merged.mlpackage"
        ct.utils.save_multifunction(desc, str(merged))
        meta = metadata or package_metadata(HF_ARCHITECTURES[model.config.architecture], model.config, max_context)
        _write_with_metadata(merged, path, meta, f"{meta['co.huggingface.exporters.name']}: stateful causal LM "
                             f"for swift-transformers (default function {MAIN})")
    kinds: dict[str, int] = {}
    for kind in carried.values():
        kinds[kind] = kinds.get(kind, 0) + 1
    groups, constants = equal_weights(model)
    return {"functions": functions, "weights": kinds, "ane_report": reports, "metadata": meta,
            "equal_weights": groups, "constant_weights": constants}


# ------------------------------------------------------------------------------ swift-transformers contract

# What check_swift_transformers verifies, each tied to what LanguageModelWithStatefulKVCache does.
CONTRACT_CHECKS = (
    "specification version >= 9 (iOS 18 / macOS 15; Core ML state)",
    "the default function (Core ML loads it: swift-transformers names none) is the one checked",
    "inputs are only those swift-transformers feeds (inputIds, causalMask, optional attentionMask)",
    "inputIds: int32 [1, T], T a range (not enumerated) with max - min > 1 (init fatalErrors otherwise) "
    "that accepts 1 token (extend mode)",
    "causalMask: fp16, accepts [1, 1, 1, 2..context + 1] (zeros [1, 1, 1, tokenCount + 1] at every call)",
    "states keyCache and valueCache both present (kvCacheAvailability), fp16, equal shapes "
    "[layers, 1, kv_heads, context, head_dim], context >= inputIds' largest T",
    "output logits: multiarray of rank 3 [1, T, vocab] (read from the ML program; it reads row T - 1)",
    "metadata co.huggingface.exporters.{name, task = text-generation, architecture, framework, precision}",
)


def _default_function(spec: Any) -> tuple[str, Any]:
    """(name, description) of the function Core ML loads when the app names none, as swift-transformers does."""
    description = spec.description
    if not description.functions:
        return "main", description
    for function in description.functions:
        if function.name == description.defaultFunctionName:
            return function.name, function
    return description.defaultFunctionName, None


def _accepted_sizes(array: Any) -> list[tuple[int, int | None]] | None:
    """Each dimension's accepted sizes (lowest, highest; None = unbounded); None for enumerated shapes."""
    kind = array.WhichOneof("ShapeFlexibility")
    if kind == "enumeratedShapes":
        return None
    if kind == "shapeRange":
        return [(r.lowerBound, None if r.upperBound < 0 else r.upperBound) for r in array.shapeRange.sizeRanges]
    return [(int(d), int(d)) for d in array.shape]


def _covers(accepted: tuple[int, int | None], low: int, high: int) -> bool:
    return accepted[0] <= low and (accepted[1] is None or accepted[1] >= high)


def _program_output_dims(spec: Any, function: str, name: str) -> list[int | None] | None:
    """The dimensions of a function's output as the ML program types it (None = unknown size); the
    description of an ML program's output carries no shape."""
    if function not in spec.mlProgram.functions:
        return None
    program_function = spec.mlProgram.functions[function]
    block = program_function.block_specializations[program_function.opset]
    for op in block.operations:
        for out in op.outputs:
            if out.name == name and out.type.WhichOneof("type") == "tensorType":
                dims = out.type.tensorType.dimensions
                return [d.constant.size if d.WhichOneof("dimension") == "constant" else None for d in dims]
    return None


def _multiarray(feature: Any, dtype: int) -> Any | None:
    kind = feature.type.WhichOneof("Type")
    array = feature.type.multiArrayType if kind == "multiArrayType" else None
    return array if array is not None and array.dataType == dtype else None


def _check_states(states: dict[str, Any], problems: list[str]) -> list[int] | None:
    from coremltools.proto import FeatureTypes_pb2 as ft

    shapes = {}
    for name in (KEY_CACHE, VALUE_CACHE):
        if name not in states:
            problems.append(f"no state {name}")
            continue
        array = states[name].type.stateType.arrayType
        if array.dataType != ft.ArrayFeatureType.FLOAT16:
            problems.append(f"state {name} is not fp16")
        shapes[name] = [int(d) for d in array.shape]
    if len(shapes) < 2:
        return None
    key, value = shapes[KEY_CACHE], shapes[VALUE_CACHE]
    if key != value:
        problems.append(f"states keyCache {key} and valueCache {value} differ in shape")
    elif len(key) != 5 or key[1] != 1:
        problems.append(f"states are {key}, not [layers, 1, kv_heads, context, head_dim]")
    else:
        return key
    return None


def _check_input_ids(feature: Any, problems: list[str]) -> tuple[int, int | None] | None:
    from coremltools.proto import FeatureTypes_pb2 as ft

    array = _multiarray(feature, ft.ArrayFeatureType.INT32)
    if array is None:
        problems.append("inputIds is not an int32 multiarray")
        return None
    sizes = _accepted_sizes(array)
    if sizes is None or len(sizes) != 2:
        problems.append("inputIds is not [1, T] with a ranged T (enumerated shapes or another rank)")
        return None
    (batch, (low, high)) = sizes[0], sizes[1]
    if not _covers(batch, 1, 1):
        problems.append("inputIds does not take batch 1")
    if high is None or high - low <= 1:
        problems.append(f"inputIds' length {low}..{high or 'unbounded'} is not a bounded range with max - min > 1 "
                        "(swift-transformers: \"Expecting ranged query sequence length.\")")
    if low > 1:
        problems.append(f"inputIds does not accept 1 token (its range starts at {low}; extend mode passes [1, 1])")
    return low, high


def _check_mask(feature: Any, most_tokens: int | None, problems: list[str]) -> None:
    from coremltools.proto import FeatureTypes_pb2 as ft

    array = _multiarray(feature, ft.ArrayFeatureType.FLOAT16)
    if array is None:
        problems.append("causalMask is not an fp16 multiarray (swift-transformers passes Float16)")
        return
    sizes = _accepted_sizes(array)
    columns = (2, (most_tokens or 2) + 1)
    need = [(1, 1), (1, 1), (1, 1), columns]
    if sizes is None or len(sizes) != 4 or not all(_covers(a, *n) for a, n in zip(sizes, need)):
        problems.append(f"causalMask does not accept [1, 1, 1, {columns[0]}..{columns[1]}] (swift-transformers "
                        "passes zeros [1, 1, 1, tokenCount + 1])")


def swift_transformers_problems(spec: Any, vocab_size: int | None = None) -> tuple[list[str], dict[str, Any]]:
    """What in a Core ML spec swift-transformers' LanguageModelWithStatefulKVCache could not drive (one phrase
    each; empty when nothing), and the figures read: function, query length range, state shape."""
    problems: list[str] = []
    if spec.specificationVersion < IOS18_SPEC_VERSION:
        problems.append(f"specification version {spec.specificationVersion} < {IOS18_SPEC_VERSION} (iOS 18, states)")
    function, description = _default_function(spec)
    if description is None:
        return problems + [f"the default function {function!r} is not in the package"], {"function": function}
    inputs = {f.name: f for f in description.input}
    states = {f.name: f for f in description.state}
    outputs = {f.name: f for f in description.output}
    extra = sorted(set(inputs) - {INPUT_IDS, CAUSAL_MASK, "attentionMask"})
    if extra:
        problems.append(f"inputs {extra} are not fed by swift-transformers (it feeds {INPUT_IDS}, {CAUSAL_MASK})")
    state = _check_states(states, problems)
    query = _check_input_ids(inputs[INPUT_IDS], problems) if INPUT_IDS in inputs else None
    if INPUT_IDS not in inputs:
        problems.append(f"no input {INPUT_IDS}")
    context = state[3] if state else None
    if query and context and query[1] is not None and query[1] > context:
        problems.append(f"inputIds takes up to {query[1]} tokens, the cache holds {context}")
    if CAUSAL_MASK in inputs:
        _check_mask(inputs[CAUSAL_MASK], context or (query[1] if query else None), problems)
    else:
        problems.append(f"no input {CAUSAL_MASK}")
    if LOGITS not in outputs or outputs[LOGITS].type.WhichOneof("Type") != "multiArrayType":
        problems.append(f"no multiarray output {LOGITS}")
    else:
        dims = _program_output_dims(spec, function, LOGITS)
        if dims is None or len(dims) != 3:
            problems.append(f"logits has rank {None if dims is None else len(dims)}, not 3 ([1, T, vocab])")
        elif vocab_size is not None and dims[2] not in (None, vocab_size):
            problems.append(f"logits' last dimension is {dims[2]}, not the vocabulary's {vocab_size}")
    metadata = dict(spec.description.metadata.userDefined)
    missing = [key for key in HF_METADATA if not metadata.get(f"co.huggingface.exporters.{key}")]
    if missing:
        problems.append(f"metadata lacks co.huggingface.exporters.{{{', '.join(missing)}}}")
    elif metadata["co.huggingface.exporters.task"] != HF_TASK:
        problems.append(f"metadata task is {metadata['co.huggingface.exporters.task']!r}, not {HF_TASK!r}")
    return problems, {"function": function, "query_length": list(query) if query else None, "state_shape": state}


def check_swift_transformers(path: Path, vocab_size: int | None = None) -> dict[str, Any]:
    """Load the written package's spec with coremltools (no Core ML runtime needed: Linux) and check every
    requirement swift-transformers has (CONTRACT_CHECKS); the result is the manifest's
    `backend.swift_transformers`. A package that misses one is an exporter bug: refused, never written."""
    import coremltools as ct

    problems, figures = swift_transformers_problems(ct.utils.load_spec(str(path)), vocab_size)
    if problems:
        raise EdgepackError(
            f"{path.name} does not meet swift-transformers' contract: {'; '.join(problems)}",
            "report this bug (the Core ML exporter wrote a package swift-transformers cannot drive)",
        )
    return {"status": "passed", "contract": SWIFT_TRANSFORMERS, "class": "LanguageModelWithStatefulKVCache",
            **figures, "checked": list(CONTRACT_CHECKS)}  # fmt: skip


def quiet_coremltools() -> None:
    for name in ("coremltools", "torch._export", "torch.export"):
        logging.getLogger(name).setLevel(logging.ERROR)


@register_exporter("coreml", one_tied_table=True)
def export_coreml(request: ExportRequest) -> dict[str, Any]:
    """Write model.mlpackage (a folder) into the bundle, check it against swift-transformers' contract; the
    manifest records its functions, inputs, states, weight formats, metadata, the check and the ANE report."""
    options = request.target.options.get("coreml", {}) if getattr(request, "target", None) else {}
    deployment = str(options.get("minimum_deployment_target", "iOS18"))
    if request.max_context % 64:
        raise EdgepackError(
            f"--max-context {request.max_context} is not a multiple of 64",
            "the KV-cache states' sequence axis is kept aligned to 64 for the Neural Engine; use e.g. 2048",
        )
    quiet_coremltools()
    cfg, ctx = request.model.config, request.max_context
    # The Hub id (or name) of the student when the request carries it; the architecture's name otherwise.
    name = request.model_name or HF_ARCHITECTURES[cfg.architecture]
    path = request.writer.path(PROGRAM_FILE)
    info = build_package(
        request.model, path, ctx, request.max_prefill, deployment, request.step, package_metadata(name, cfg, ctx)
    )
    request.step("check the package against swift-transformers' contract")
    contract = check_swift_transformers(path, cfg.vocab_size)
    return {
        "name": "coreml",
        "delegate": None,
        "program": PROGRAM_FILE,
        "host_check": "reference",  # Linux/Windows: the reference model on the weights read back from the package
        # swift-transformers' default (LanguageModel.loadCompiled); a ranged function does not run on the ANE
        "compute_units": str(options.get("compute_units", "CPU_AND_GPU")),
        "method": MAIN,
        "functions": info["functions"],
        "max_prefill": request.max_prefill,  # the host check's chunk; `main` takes up to functions.main at once
        "inputs": {
            INPUT_IDS: f"int32 [1, T], T = 1..{ctx}",
            CAUSAL_MASK: "fp16 [1, 1, 1, P + T + 1], as swift-transformers passes it (zeros): only its shape is "
            "read, P = columns - 1 - T is the cache position of the first token",
        },
        "outputs": {LOGITS: "fp16 [1, T, vocab]"},
        "states": {"names": [KEY_CACHE, VALUE_CACHE], "shape": list(state_shape(cfg, ctx)), "dtype": "fp16"},
        "ane_functions": {
            "functions": [f for f in info["functions"] if f != MAIN],
            "inputs": {INPUT_IDS: "int32 [1, T], T fixed per function", POSITION: "int32 [1] (cache position of "
                       "the first token)"},
            "states": "the same as main's",
        },
        "swift_transformers": contract,
        "metadata": info["metadata"],
        "minimum_deployment_target": deployment,
        "compute_precision": "float16",
        "weights": info["weights"],
        "equal_weights": info["equal_weights"],  # stored once under the first name (see `equal_weights`)
        "constant_weights": info["constant_weights"],  # one value everywhere: may be no constant at all
        "ane_report": info["ane_report"],
    }
