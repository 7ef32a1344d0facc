"""Lower a quantized `CausalLM` to a Core ML ML program (`model.mlpackage`) shaped for the Apple Neural Engine.

Why each choice:
- iOS 18 / macOS 15 ML program: the first with Core ML *state* (the KV cache stays inside the model between
  calls) and with block-wise int4 weights (`constexpr_blockwise_shift_scale`).
- torch.export frontend on a Core ML-specific forward (`CoreMLCausalLM`) that reuses the project's modules
  and weights: the ExecuTorch path's `index_copy_`/custom ops do not convert, and the ANE wants static
  shapes. The cache is written with a one-hot matmul (`cache * keep + onehot @ k`) instead of a dynamic slice,
  and attention reads the whole static cache under an additive mask: matmul, mul, add, softmax only.
- Two functions in one multifunction package, `prefill` (a fixed chunk of tokens) and `decode` (1 token),
  sharing one copy of the weights and the same state layout: every shape static, as the ANE compiles them.
  (Enumerated input lengths in one function fail torch.export's symbolic shape guards on the GQA reshapes.)
- fp16 everywhere (the ANE computes in fp16); RMSNorm is rescaled by max|x| first so x^2 cannot overflow.
- Weights: the preset's quantization is carried, not redone. Each torchao int4/int8 weight becomes a Core ML
  block-wise (or per-channel) shift-scale constant with exactly its codes and scales, built with
  coremltools.optimize's own constexpr builder; re-quantizing already-quantized weights stacks a second
  rounding (see sdk/blocks.py). A tied embedding gathers from the output layer's int8 table: one copy.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from edgepack.errors import EdgepackError
from edgepack.exporters import ExportRequest, register_exporter
from edgepack.exporters.coreml_ane import ane_report
from edgepack.model import CausalLM, ModelConfig, build_model, rope_frequencies

PROGRAM_FILE = "model.mlpackage"
PREFILL, DECODE = "prefill", "decode"  # the package's two functions
INPUT_IDS, POSITION, LOGITS = "input_ids", "position", "logits"
MASK_VALUE = -30000.0  # additive mask: far below any fp16 score, far from fp16's -65504 overflow
DEPLOYMENT_TARGETS = ("iOS18", "macOS15")


def state_names(num_layers: int) -> list[str]:
    return [f"{kind}_cache_{i}" for i in range(num_layers) for kind in ("k", "v")]


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
    o = _as_float(module.offsets.weight).numpy()
    s = main.scales
    zero = s == 0  # a constant block: represent o as o * (0 - (-1))
    codes = np.where(np.repeat(zero, main.block, axis=1), 0, main.codes).astype(np.int8)
    scales = np.where(zero, o, s).astype(np.float32)
    offsets = np.where(zero, -1.0, -o / np.where(zero, 1.0, s)).astype(np.float32)
    return Grid(codes, scales, offsets, 4)


def carried_weights(model: CausalLM) -> tuple[dict[str, torch.Tensor], dict[str, Grid]]:
    """Hugging Face-named float weights of the quantized model, and the quantization grid behind each.

    A tied embedding takes the output layer's grid (the preset untied them into two recipes; Core ML keeps
    one table that both the gather and the output matmul read)."""
    from edgepack.quantize import BlockOffsetLinear

    floats: dict[str, torch.Tensor] = {}
    grids: dict[str, Grid] = {}
    for name, module in model.named_modules():
        if isinstance(module, BlockOffsetLinear):
            grids[f"{name}.weight"] = _block_offset_grid(module)
            if module.main.bias is not None:
                floats[f"{name}.bias"] = _as_float(module.main.bias)
    for name, param in model.named_parameters():
        owner = name.rpartition(".")[0]
        if owner.endswith((".main", ".offsets", ".block_sum")) and f"{owner.rpartition('.')[0]}.weight" in grids:
            continue
        grid = _grid_of(param)
        if grid is not None:
            grids[name] = grid
        else:
            floats[name] = _as_float(param)
    if model.config.tie_word_embeddings and "lm_head.weight" in grids:
        grids["model.embed_tokens.weight"] = grids.pop("lm_head.weight")
    elif model.config.tie_word_embeddings and "lm_head.weight" in floats:
        floats["model.embed_tokens.weight"] = floats.pop("lm_head.weight")
    for name, grid in grids.items():
        floats[name] = torch.from_numpy(grid.dequantize())
    return floats, grids


# ------------------------------------------------------------------------------------ Core ML forward


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm that is safe in fp16: x * rsqrt(mean(x^2) + eps) == y * rsqrt(mean(y^2) + eps/c^2), y = x/c."""
    c = x.abs().amax(dim=-1, keepdim=True).clamp(min=1.0)
    y = x / c
    return norm.weight * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + norm.eps / (c * c)))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class CoreMLCausalLM(nn.Module):
    """`forward(input_ids int32 [1, T], position int32 [1]) -> logits [1, T, vocab]`, KV cache in fp16 buffers
    (Core ML states) laid out [1, kv_heads, max_context, head_dim] per layer. Same math as `CausalLM`."""

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
        shape = (1, cfg.num_kv_heads, max_context, cfg.head_dim)
        for name in state_names(cfg.num_layers):
            self.register_buffer(name, torch.zeros(shape, dtype=torch.float16), persistent=False)

    def forward(self, input_ids: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        positions = position + torch.arange(seq, dtype=torch.int32)  # [T]
        cos, sin = self.cos_table[positions], self.sin_table[positions]  # [T, D]
        onehot = (self.key_positions[:, None] == positions[None, :]).to(torch.float16)  # [S, T]
        keep = 1.0 - onehot.sum(dim=-1, keepdim=True)  # [S, 1]
        visible = self.key_positions[None, :] <= positions[:, None]  # [T, S]
        mask = torch.where(visible, 0.0, MASK_VALUE).repeat(self.groups, 1)  # [G*T, S], rows g*T + t
        x = self.lm.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.lm.model.layers):
            x = self.decoder_layer(i, layer, x, cos, sin, onehot[None, None], keep, mask)
        return self.head(x)

    def decoder_layer(self, i: int, layer: nn.Module, x, cos, sin, onehot, keep, mask) -> torch.Tensor:
        cfg, seq = self.config, x.shape[1]
        attn = layer.self_attn
        h = _rms_norm(layer.input_layernorm, x)
        q = attn.q_proj(h).view(1, seq, cfg.num_heads, cfg.head_dim).transpose(1, 2)  # [1, H, T, D]
        k = attn.k_proj(h).view(1, seq, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(1, seq, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        q = _rotate(q, cos, sin) * (cfg.head_dim**-0.5)
        k = _rotate(k, cos, sin)
        caches = []
        for kind, new in (("k", k), ("v", v)):
            cache = getattr(self, f"{kind}_cache_{i}")
            updated = (cache * keep + torch.matmul(onehot, new.to(cache.dtype))).reshape(cache.shape)
            cache[:] = updated  # -> Core ML coreml_update_state
            caches.append(updated.to(q.dtype))
        k_all, v_all = caches
        # Grouped-query attention without copying K/V: the G query heads of one KV head become G*T rows.
        q = q.reshape(1, cfg.num_kv_heads, self.groups * seq, cfg.head_dim)
        scores = torch.matmul(q, k_all.transpose(2, 3)) + mask
        out = torch.matmul(torch.softmax(scores, dim=-1), v_all)  # [1, Hkv, G*T, D]
        out = out.reshape(1, cfg.num_heads, seq, cfg.head_dim).transpose(1, 2).reshape(1, seq, -1)
        x = x + attn.o_proj(out)
        return x + layer.mlp(_rms_norm(layer.post_attention_layernorm, x))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm.lm_head(_rms_norm(self.lm.model.norm, x))


def coreml_module(model: CausalLM, max_context: int) -> tuple[CoreMLCausalLM, dict[str, Grid]]:
    """The Core ML forward over float copies of the quantized model's weights, and their grids."""
    floats, grids = carried_weights(model)
    lm = build_model(model.config, floats, max_context=1)  # its own KV buffers are unused here
    return CoreMLCausalLM(lm, max_context).eval(), grids


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
        for op in list(function.operations):
            if op.op_type != "const":
                continue
            base = op.name.removesuffix("_to_fp16")
            if base not in by_const or by_const[base] in done:
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
            with function, mb.scope(*scopes):  # the new op keeps the weight's torch.export provenance
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


def convert(model: CausalLM, max_context: int, seq_len: int, deployment: str = "iOS18") -> tuple[Any, dict[str, str]]:
    """torch.export -> Core ML MIL program for `seq_len` input tokens (static), fp16, KV cache as states, the
    quantization grids carried. Static shapes: the ANE compiles them ahead; one program per input length."""
    import coremltools as ct

    if deployment not in DEPLOYMENT_TARGETS:
        raise EdgepackError(
            f"Core ML deployment target {deployment!r} is not supported",
            f"use one of {', '.join(DEPLOYMENT_TARGETS)} (states and int4 blocks need iOS 18 / macOS 15)",
        )
    module, grids = coreml_module(model, max_context)
    cfg = model.config
    example = (torch.zeros((1, seq_len), dtype=torch.int32), torch.zeros((1,), dtype=torch.int32))
    with torch.no_grad():
        exported = torch.export.export(module, example).run_decompositions({})
    state_shape = (1, cfg.num_kv_heads, max_context, cfg.head_dim)
    prog = ct.convert(
        exported,
        inputs=[
            ct.TensorType(name=INPUT_IDS, shape=(1, seq_len), dtype=np.int32),
            ct.TensorType(name=POSITION, shape=(1,), dtype=np.int32),
        ],
        outputs=[ct.TensorType(name=LOGITS, dtype=np.float16)],
        states=[
            ct.StateType(wrapped_type=ct.TensorType(shape=state_shape, dtype=np.float16), name=name)
            for name in state_names(cfg.num_layers)
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


def build_package(
    model: CausalLM, path: Path, max_context: int, prefill: int, deployment: str = "iOS18",
    step: Callable[[str], None] = lambda _msg: None,
) -> dict[str, Any]:
    """Write the multifunction .mlpackage (`prefill` for `prefill` tokens, `decode` for 1; one weight copy,
    the same states) and return what the manifest records about it."""
    import coremltools as ct

    functions = {DECODE: 1, PREFILL: prefill} if prefill > 1 else {DECODE: 1}
    reports, carried = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        desc = ct.utils.MultiFunctionDescriptor()
        for name, seq_len in functions.items():
            step(f"convert to Core ML: {name} ({seq_len} tokens)")
            prog, carried = convert(model, max_context, seq_len, deployment)
            reports[name] = ane_report(prog, seq_len)
            single = Path(tmp) / f"{name}.mlpackage"
            save_program(prog, single, deployment)
            del prog
            desc.add_function(str(single), src_function_name="main", target_function_name=name)
        desc.default_function_name = DECODE
        step("write mlpackage (weights shared by the functions)")
        ct.utils.save_multifunction(desc, str(path))
    kinds: dict[str, int] = {}
    for kind in carried.values():
        kinds[kind] = kinds.get(kind, 0) + 1
    return {
        "functions": functions,
        "weights": kinds,
        "ane_report": {name: report for name, report in reports.items()},
    }


def quiet_coremltools() -> None:
    for name in ("coremltools", "torch._export", "torch.export"):
        logging.getLogger(name).setLevel(logging.ERROR)


@register_exporter("coreml", one_tied_table=True)
def export_coreml(request: ExportRequest) -> dict[str, Any]:
    """Write model.mlpackage (a folder) into the bundle; the manifest records its functions, states,
    weight formats and the ANE report."""
    options = request.target.options.get("coreml", {}) if getattr(request, "target", None) else {}
    deployment = str(options.get("minimum_deployment_target", "iOS18"))
    if request.max_context % 64:
        raise EdgepackError(
            f"--max-context {request.max_context} is not a multiple of 64",
            "the KV-cache states' sequence axis is kept aligned to 64 for the Neural Engine; use e.g. 2048",
        )
    quiet_coremltools()
    info = build_package(
        request.model, request.writer.path(PROGRAM_FILE), request.max_context, request.max_prefill, deployment,
        request.step,
    )
    cfg = request.model.config
    return {
        "name": "coreml",
        "delegate": None,
        "program": PROGRAM_FILE,
        "host_check": "reference",  # Linux/Windows: the reference model on the weights read back from the package
        "compute_units": str(options.get("compute_units", "ALL")),
        "method": DECODE,
        "functions": info["functions"],
        "max_prefill": request.max_prefill,
        "inputs": {INPUT_IDS: "int32 [1, T]", POSITION: "int32 [1] (cache position of the first token)"},
        "outputs": {LOGITS: "fp16 [1, T, vocab]"},
        "states": {"names": state_names(cfg.num_layers), "shape": [1, cfg.num_kv_heads, request.max_context, cfg.head_dim], "dtype": "fp16"},
        "minimum_deployment_target": deployment,
        "compute_precision": "float16",
        "weights": info["weights"],
        "ane_report": info["ane_report"],
    }
