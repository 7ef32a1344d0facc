"""The decoder-only transformer that every exporter lowers: Llama, Qwen2 and BitNet b1.58 in one export-friendly
definition.

Why our own and not transformers': exporters need a static-shape KV cache living in buffers, a single
`forward(tokens, input_pos)` signature and no Python branches on tensor values, and backends swap the
attention pieces (`kv_cache`, `sdpa`) for their own kernels. Parameter names follow Hugging Face's, so a
checkpoint's state dict loads as it is.

BitNet b1.58 as transformers 5 runs it (`modeling_bitnet.py`): Llama's layout plus two RMSNorms (`attn_sub_norm`
before o_proj, `ffn_sub_norm` before down_proj), a squared-ReLU gate, and o_proj biased like q/k/v. A checkpoint
with `quantization_config` bitnet runs every layer linear on int8 absmax per-token activations
(`int8_activations`); its ternary weights reach this module already multiplied by their scale (the intake does
that, sdk/intake/bitnet.py), so the weights here are plain float matrices.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgepack.errors import EdgepackError

# Hugging Face `architectures` / `model_type` values we understand, mapped to our family name.
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "BitNetForCausalLM": "bitnet"}
SUPPORTED_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "bitnet": "bitnet"}


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """transformers' "relu2" (a named function, not a lambda: a parked model is pickled with `torch.save`)."""
    return F.relu(x).square()


# The gated MLP's activation by config.json's `hidden_act` name. Llama and Qwen2 are always SiLU; BitNet b1.58 is
# squared ReLU (transformers' "relu2"); llama.cpp's `bitnet` GGUFs say so in `bitnet.hidden_activation`, SiLU if not.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"silu": F.silu, "relu2": relu_squared}
# config.json's name for each ModelConfig field that is spelled differently there.
HF_KEYS = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads"}
# Whole-number fields and their sane range. The upper ends lie far above any real model (Llama 3.1 405B: hidden
# 16384, 126 layers, 128 heads) and exist so that a typo or a hostile file is refused here, before the fit check
# prints nonsense or a module of 10**9 layers is built; they stay inside the bundle manifest schema's bounds.
WHOLE_RANGES = {
    "vocab_size": (1, 1 << 22),
    "hidden_size": (1, 1 << 17),
    "intermediate_size": (1, 1 << 20),
    "num_layers": (1, 1000),
    "num_heads": (1, 1024),
    "num_kv_heads": (1, 1024),
    "head_dim": (1, 1024),
    "max_position_embeddings": (1, 1 << 24),
}


class ConfigError(EdgepackError):
    """A config value no model can have. Keeps the field (ModelConfig's name) so that intake can name the key
    the user actually wrote (config.json's or the GGUF's) and say where it is."""

    def __init__(self, field: str, value: Any, reason: str, other: tuple[str, Any] | None = None) -> None:
        self.field, self.value, self.reason, self.other = field, value, reason, other
        super().__init__(f"the model config has {self.describe()}", "use the config the checkpoint came with")

    def describe(self, names: dict[str, str] | None = None) -> str:
        """`KEY = VALUE, REASON [OTHER = VALUE]`, each field under its name in `names` when it has one."""
        name = (names or {}).get
        text = f"{name(self.field, self.field)} = {_shown(self.value)}, {self.reason}"
        if self.other:
            text += f" {name(self.other[0], self.other[0])} = {_shown(self.other[1])}"
        return text


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a student model: everything needed to build the module and size its budgets.

    Validated on construction (`__post_init__`), whatever built it (config.json, a GGUF header, a bundle
    manifest): every later step (fit check, module, exporters) may trust the numbers.
    """

    architecture: str  # "llama", "qwen2" or "bitnet"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool  # Qwen2 has biases on q/k/v
    max_position_embeddings: int
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    hidden_act: str = "silu"  # a key of ACTIVATIONS
    # Each layer linear reads its input rounded to int8 per token (absmax), as transformers' BitLinear /
    # AutoBitLinear do for a `quantization_config` bitnet checkpoint. The output layer never does.
    int8_activations: bool = False

    def __post_init__(self) -> None:
        _validate(self)
        object.__setattr__(self, "rope_theta", float(self.rope_theta))
        object.__setattr__(self, "rms_norm_eps", float(self.rms_norm_eps))

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Read a Hugging Face config.json; anything outside Llama/Qwen2/BitNet is a clear error, a missing key a
        KeyError (the caller knows the file). Values pass through unconverted so `__post_init__` judges them."""
        family = _family_of(cfg)
        # transformers 5 writes rope scaling (and theta) as `rope_parameters`; older configs as `rope_scaling`.
        scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or None
        if scaling is not None and not isinstance(scaling, dict):
            raise ConfigError("rope_scaling", scaling, "not a JSON object")
        kind = scaling.get("rope_type", scaling.get("type")) if scaling else None
        if scaling and kind not in ("llama3", "default"):
            raise EdgepackError(
                f"unsupported rope_scaling {_shown(scaling, 120)}",
                "edgepack supports plain RoPE and Llama 3 scaling",
            )
        parameters = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        kv_heads, head_dim = cfg.get("num_key_value_heads"), cfg.get("head_dim")
        # What transformers assumes for a key the file leaves out: BitNetConfig's own defaults differ from Llama's.
        theta, eps = (500000.0, 1e-5) if family == "bitnet" else (10000.0, 1e-6)
        return cls(
            architecture=family,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=heads if kv_heads is None else kv_heads,
            head_dim=_quotient(hidden, heads) if head_dim is None else head_dim,
            rope_theta=cfg.get("rope_theta", parameters.get("rope_theta", theta)),
            rms_norm_eps=cfg.get("rms_norm_eps", eps),
            tie_word_embeddings=_flag(cfg.get("tie_word_embeddings")),
            attention_bias=family == "qwen2" or _flag(cfg.get("attention_bias")),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rope_scaling=scaling if kind == "llama3" else None,
            hidden_act=cfg.get("hidden_act", "relu2") if family == "bitnet" else "silu",
            int8_activations=_bitnet_quantized(cfg),
        )

    def to_dict(self) -> dict[str, Any]:
        """As data, the BitNet-only fields left out at their defaults: Llama/Qwen2 manifests stay as they were."""
        data = asdict(self)
        for name in ("hidden_act", "int8_activations"):
            if data[name] == ModelConfig.__dataclass_fields__[name].default:
                del data[name]
        return data

    def num_parameters(self) -> int:
        """Parameter count as the checkpoint stores it (a tied embedding counted once)."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        q = self.num_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.attention_bias else 0)
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        if self.architecture == "bitnet":  # the sub-norms, and o_proj's bias
            per_layer += h + self.intermediate_size + (h if self.attention_bias else 0)
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else embed
        return self.num_layers * per_layer + embed + head + h


def _validate(cfg: ModelConfig) -> None:
    """Every check on a config in one place: types, ranges, and the relations the module relies on."""
    if cfg.architecture not in SUPPORTED_MODEL_TYPES.values():
        raise ConfigError("architecture", cfg.architecture, f"not one of {', '.join(SUPPORTED_MODEL_TYPES)}")
    for name, (low, high) in WHOLE_RANGES.items():
        value = getattr(cfg, name)
        if not _is_whole(value) or value < low:
            raise ConfigError(name, value, "not a positive whole number")
        if value > high:
            raise ConfigError(name, value, f"more than any model edgepack can export has (at most {high})")
    if cfg.hidden_size % cfg.num_heads:
        raise ConfigError("num_heads", cfg.num_heads, "which does not divide", ("hidden_size", cfg.hidden_size))
    if cfg.num_heads % cfg.num_kv_heads:
        raise ConfigError("num_kv_heads", cfg.num_kv_heads, "which does not divide", ("num_heads", cfg.num_heads))
    if cfg.head_dim % 2:
        raise ConfigError("head_dim", cfg.head_dim, "not even (RoPE rotates pairs of channels)")
    _check_positive("rope_theta", cfg.rope_theta)
    _check_positive("rms_norm_eps", cfg.rms_norm_eps, below=1.0)
    if not isinstance(cfg.hidden_act, str) or cfg.hidden_act not in ACTIVATIONS:
        raise ConfigError("hidden_act", cfg.hidden_act, f"not one of {', '.join(ACTIVATIONS)}")
    if cfg.architecture != "bitnet" and cfg.hidden_act != "silu":
        raise ConfigError("hidden_act", cfg.hidden_act, f"where {cfg.architecture} is always 'silu'")
    for name in ("tie_word_embeddings", "attention_bias", "int8_activations"):
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(name, getattr(cfg, name), "not true or false")
    if cfg.rope_scaling is not None:
        _check_llama3_scaling(cfg.rope_scaling)


def _check_llama3_scaling(scaling: Any) -> None:
    """The parameters `llama3_scaled_frequencies` divides by; ModelConfig holds no other kind of scaling."""
    if not isinstance(scaling, dict) or scaling.get("rope_type", scaling.get("type")) != "llama3":
        raise ConfigError("rope_scaling", scaling, "not Llama 3 scaling")
    for key in ("factor", "original_max_position_embeddings"):
        _check_positive(f"rope_scaling.{key}", scaling.get(key))
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    _check_positive("rope_scaling.low_freq_factor", low)
    _check_positive("rope_scaling.high_freq_factor", high)
    if high <= low:
        raise ConfigError("rope_scaling.high_freq_factor", high, "not above", ("rope_scaling.low_freq_factor", low))


def _check_positive(name: str, value: Any, below: float = math.inf) -> None:
    number = float(value) if isinstance(value, float) or _is_whole(value) and abs(value) < 1 << 1000 else math.nan
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(name, value, "not a finite positive number")
    if value >= below:
        raise ConfigError(name, value, f"not below {below:g}")


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _quotient(hidden: Any, heads: Any) -> Any:
    """hidden // heads when both are usable; otherwise a placeholder that validation reports after them."""
    return hidden // heads if _is_whole(hidden) and _is_whole(heads) and heads > 0 else 0


def _bitnet_quantized(cfg: dict[str, Any]) -> bool:
    """Whether transformers would swap the layer linears for BitNet's (int8 activations): `quantization_config`
    with quant_method "bitnet". The form of the stored weights is the intake's business (intake/bitnet.py)."""
    quantization = cfg.get("quantization_config")
    return isinstance(quantization, dict) and quantization.get("quant_method") == "bitnet"


def _flag(value: Any) -> Any:
    """An absent (null) boolean is false, as in transformers; anything else passes on to validation."""
    return False if value is None else value


def _shown(value: Any, limit: int = 40, say_string: bool = True) -> str:
    """A value as the message shows it: repr, one line, short; strings are said to be strings."""
    text = repr(value)
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{text} (a string)" if say_string and isinstance(value, str) else text


def _family_of(cfg: Any) -> str:
    if not isinstance(cfg, dict):
        raise EdgepackError(f"the model config is {type(cfg).__name__}, not a JSON object", "restore config.json")
    architectures = cfg.get("architectures")
    if isinstance(architectures, str):
        architectures = [architectures]
    if not isinstance(architectures, list):
        architectures = []
    for arch in architectures:
        if isinstance(arch, str) and arch in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[arch]
    model_type = cfg.get("model_type")
    if isinstance(model_type, str) and model_type in SUPPORTED_MODEL_TYPES:
        return SUPPORTED_MODEL_TYPES[model_type]
    found = (architectures or [model_type])[0]
    if found is None:
        raise EdgepackError(
            "the model config names no architecture (no architectures or model_type)",
            f"pass a checkpoint of a supported architecture: {', '.join(SUPPORTED_ARCHITECTURES)}",
        )
    raise EdgepackError(
        f"unsupported architecture {_shown(found, 80, say_string=False)}",
        f"edgepack supports {', '.join(SUPPORTED_ARCHITECTURES)}",
    )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the model dtype: fp16 overflows on the sum of squares.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class KVCache(nn.Module):
    """Static-shape cache in buffers, layout [batch=1, max_context, kv_heads, head_dim].

    `update` writes the new keys/values at `start` and returns the filled prefix, so attention reads only
    the positions that exist, not the whole max context.
    """

    def __init__(self, max_context: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        shape = (1, max_context, kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        length = k.shape[1]
        self.k[:, start : start + length] = k
        self.v[:, start : start + length] = v
        return self.k[:, : start + length], self.v[:, : start + length]


class SDPA(nn.Module):
    """Causal attention of T new queries over the cached prefix, grouped-query heads expanded here."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        # q: [1, T, H, D]; k, v: [1, L, Hkv, D] with L = start + T.
        seq, length = q.shape[1], k.shape[1]
        groups = self.num_heads // self.num_kv_heads
        q = q.transpose(1, 2)
        k = k.transpose(1, 2).repeat_interleave(groups, dim=1)
        v = v.transpose(1, 2).repeat_interleave(groups, dim=1)
        query_pos = torch.arange(seq, device=q.device) + start
        key_pos = torch.arange(length, device=q.device)
        mask = key_pos[None, :] <= query_pos[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(1, seq, self.num_heads * self.head_dim)


class Int8Activations(nn.Module):
    """BitNet b1.58's activation rounding: each token's vector to int8 by its absmax, back in the input dtype.

    The same float operations as transformers' `ActQuant` (round in fp32, scale clamped at 1e-5), so the codes
    match theirs; no branch on values, so it exports. Stateless: one instance serves every linear of a block."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        scale = 127 / xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
        return ((xf * scale).round().clamp(-128, 127) / scale).to(x.dtype)


def _int8_inputs(cfg: ModelConfig) -> Int8Activations | None:
    """The rounding a block's linears read their inputs through; None (no module at all) for a float model."""
    return Int8Activations() if cfg.int8_activations else None


def _sub_norm(cfg: ModelConfig, dim: int) -> RMSNorm | None:
    """BitNet's extra norm before a block's last linear; None for Llama and Qwen2 (their module tree unchanged)."""
    return RMSNorm(dim, cfg.rms_norm_eps) if cfg.architecture == "bitnet" else None


def through(module: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` where the model has that piece (BitNet's sub-norms and int8 rounding), else x unchanged: no op
    is added, so Llama and Qwen2 trace as before. The exporters' forwards use it the same way."""
    return x if module is None else module(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, max_context: int, dtype: torch.dtype) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        # transformers' BitNet biases o_proj with q/k/v; Qwen2 never does (and our Llama follows it).
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=cfg.attention_bias and cfg.architecture == "bitnet")
        self.kv_cache = KVCache(max_context, cfg.num_kv_heads, d, dtype)
        self.sdpa = SDPA(cfg.num_heads, cfg.num_kv_heads, d)
        self.attn_sub_norm = _sub_norm(cfg, h)
        self.int8_inputs = _int8_inputs(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int) -> torch.Tensor:
        seq = x.shape[1]
        x = through(self.int8_inputs, x)
        q = self.q_proj(x).view(1, seq, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(1, seq, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(1, seq, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_all, v_all = self.kv_cache.update(start, k, v)
        out = through(self.attn_sub_norm, self.sdpa(q, k_all, v_all, start))
        return self.o_proj(through(self.int8_inputs, out))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.ffn_sub_norm = _sub_norm(cfg, cfg.intermediate_size)
        self.int8_inputs = _int8_inputs(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = through(self.int8_inputs, x)
        hidden = through(self.ffn_sub_norm, self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(through(self.int8_inputs, hidden))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, max_context: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, max_context, dtype)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Named `model` inside `CausalLM` so Hugging Face parameter names map one to one."""

    def __init__(self, cfg: ModelConfig, max_context: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, max_context, dtype) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """`forward(tokens [1, T], input_pos [1]) -> logits [1, T, vocab]`, appending T tokens to the KV cache.

    Logits come for every input position: the runtime keeps the last row, verification uses all of them
    (teacher forcing through the exported program itself).
    """

    def __init__(self, cfg: ModelConfig, max_context: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config, self.max_context = cfg, max_context
        self.model = Backbone(cfg, max_context, dtype)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden_states(tokens, input_pos))

    def hidden_states(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """The final-norm outputs [1, T, hidden] (what the output layer reads), appending T tokens to the cache."""
        seq = tokens.shape[1]
        start = input_pos[0].item()
        torch._check_is_size(start)
        torch._check(start + seq <= self.max_context)
        cos, sin = self.rope(seq, start)
        x = self.model.embed_tokens(tokens)
        for layer in self.model.layers:
            x = layer(x, cos, sin, start)
        return self.model.norm(x)

    def rope(self, seq: int, start: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_tables(self.inv_freq, seq, start, self.rope_dtype())

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # `.to(float16)` must not round the RoPE frequencies: positions in the thousands would drift.
        super()._apply(fn, recurse)
        self.inv_freq = rope_frequencies(self.config).to(self.inv_freq.device)
        return self

    def rope_dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def reset_cache(self) -> None:
        for module in self.modules():
            if isinstance(module, KVCache):
                module.k.zero_()
                module.v.zero_()


@torch.no_grad()
def stream_hidden_states(cfg: ModelConfig, state_dict: Mapping[str, torch.Tensor], ids: torch.Tensor,
                         watch: Prepare | None = None) -> torch.Tensor:
    """The float model's final-norm outputs [1, T, hidden] for `ids` [T], one piece in memory at a time: each
    piece is read, run over all T tokens and dropped. Statistics of a model that is never built whole
    (calibration of a 1.5B student without its 6.2 GB float32 copy); `watch(prefix, piece)` is called on each
    piece before it runs (e.g. to hook what its linears read)."""
    with torch.device("meta"):
        model = CausalLM(cfg, max_context=len(ids))
    model.inv_freq = rope_frequencies(cfg)
    cos, sin = model.rope(len(ids), 0)
    x = ids[None, :]
    for prefix, piece in model_pieces(model):
        if prefix == "lm_head":
            break
        _read_piece(piece, state_dict, prefix)
        if watch is not None:
            watch(prefix, piece)
        x = piece(x, cos, sin, 0) if isinstance(piece, DecoderLayer) else piece(x)
        piece.to_empty(device="meta")
    return x


def rope_tables(inv_freq: torch.Tensor, seq: int, start: Any, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, head_dim] of positions start..start+T-1, computed per call in fp32 as transformers does
    (32 floats instead of two tables)."""
    angles = (torch.arange(seq, dtype=torch.float32) + start)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] (fp32), Llama 3 scaling applied when the config has it."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if cfg.rope_scaling:
        inv_freq = llama3_scaled_frequencies(inv_freq, cfg.rope_scaling)
    return inv_freq.float()


def llama3_scaled_frequencies(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.x frequency scaling: long wavelengths slowed by `factor`, a smooth ramp in between."""
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [1, T, heads, D]; cos/sin: [T, D] broadcast over heads.
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


@dataclass
class UnbuiltModel:
    """A model's config and its lazily read weights, for exporters that write their own graph from the weights
    (ONNX) instead of running the module: `state_dict()` as on a `CausalLM`, and no module is ever built."""

    config: ModelConfig
    weights: Mapping[str, torch.Tensor]
    max_context: int

    def state_dict(self) -> Mapping[str, torch.Tensor]:
        return self.weights


def _read_piece(piece: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str) -> None:
    """Give a meta-device piece real memory and its tensors `prefix.*` from `state_dict`, strictly. Its KV cache
    (not in the state dict) is zeroed: `to_empty` leaves whatever the allocator had."""
    piece.to_empty(device="cpu")
    piece.load_state_dict({n: state_dict[f"{prefix}.{n}"] for n in piece.state_dict().keys()}, strict=True)
    for module in piece.modules():
        if isinstance(module, KVCache):
            module.k.zero_()
            module.v.zero_()


# prepare(name, piece): called on each piece of a model being built, right after its weights are read (e.g. to
# quantize it), so a model built from a lazy state dict never holds more than one piece in float32.
Prepare = Callable[[str, nn.Module], None]


def piece_count(cfg: ModelConfig) -> int:
    """How many pieces `model_pieces` gives: embedding, each layer, final norm, output layer."""
    return cfg.num_layers + 3


def model_pieces(model: "CausalLM") -> list[tuple[str, nn.Module]]:
    """The units a model is built and quantized in, by Hugging Face prefix, in forward order."""
    layers = [(f"model.layers.{i}", layer) for i, layer in enumerate(model.model.layers)]
    return [("model.embed_tokens", model.model.embed_tokens), *layers, ("model.norm", model.model.norm),
            ("lm_head", model.lm_head)]


def build_model(
    cfg: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    max_context: int,
    dtype: torch.dtype = torch.float32,
    prepare: Prepare | None = None,
    on_piece: Callable[[], None] | None = None,
) -> CausalLM:
    """Build the module from a Hugging Face-named state dict, strictly (every name, no other).

    Piece by piece (`model_pieces`): each piece's tensors are read, cast to `dtype` and handed to `prepare`
    before the next piece is read. With the intake's lazy state dict and a quantizing `prepare`, the float
    model is never whole in memory: a 1.5B student in float32 would be 6.2 GB. `on_piece` is called after
    each (`piece_count` calls: progress)."""
    with torch.device("meta"):
        model = CausalLM(cfg, max_context, dtype)
    expected = set(model.state_dict().keys()) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    given = {k for k in state_dict.keys() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings:
        given.discard("lm_head.weight")
    if expected != given:
        missing, unexpected = sorted(expected - given), sorted(given - expected)
        raise EdgepackError(
            f"checkpoint does not match the {cfg.architecture} layout "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})",
            "pass an unmodified Llama, Qwen2 or BitNet checkpoint",
        )
    model.inv_freq = rope_frequencies(cfg)
    for prefix, piece in model_pieces(model):
        tied_head = prefix == "lm_head" and cfg.tie_word_embeddings
        if tied_head and prepare is None:
            model.lm_head.weight = model.model.embed_tokens.weight  # one table
        else:  # a tied output layer that `prepare` may quantize is read as a table of its own
            _read_piece(piece, state_dict, "model.embed_tokens" if tied_head else prefix)
            piece.to(dtype)
        if prepare is not None:
            prepare(prefix, piece)
        if on_piece is not None:
            on_piece()
    return model.eval()
