"""Fit check: will this model, at this quantization and context, fit the target before anything is built?

Estimated from the model's config alone (no weights read), so `edgepack export` can refuse in milliseconds
what would otherwise fail on the phone after minutes of lowering:

    memory at max context = weights (bytes per weight of the preset's recipes, scales included)
                          + KV cache (2 x layers x max_context x kv_heads x head_dim x activation bytes)
                          + activations (one prefill chunk: logits, MLP and attention intermediates)
                          + runtime overhead of the backend (code, threadpool, delegate caches)
    bundle                = weights as stored + tokenizer files

The memory figure is compared with the target's app memory limit (the OS kills the app above it) and its
`peak_memory_mb` budget; the bundle with `bundle_mb`. On failure the error says by how much and names the
largest preset / context that would fit. The byte counts follow what `sdk/quantize.py` builds and how
ExecuTorch/XNNPACK stores it (fp32 group scales; int8 per-channel output layer; untied embedding), unless the
exporter registers its own (`weight_bytes`: ONNX's 2-bit ternary codes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.errors import EdgepackError, UsageError
from edgepack.model import ModelConfig
from edgepack.presets import PRESETS, QuantPreset, check_carried
from edgepack.targets import Target

MB = 1e6
GB = 1e9
TOKENIZER_BYTES = 4 * MB  # tokenizer.json (minified) + config + template: 1.6-7 MB for 50k-150k vocabularies
PREFILL_CHUNK = 128  # tokens per prefill call, as sdk/export.py lowers programs
# Resident memory of the runtime itself, by backend: code, threadpool, allocator slack, delegate caches.
# Estimates from the runtimes' own reports (ExecuTorch's llama runner logs "RSS after loading model" ~ the
# weights + tens of MB on Android); the reference backend carries libtorch.
RUNTIME_OVERHEAD = {
    "executorch": 60 * MB,
    "onnx": 120 * MB,
    "coreml": 150 * MB,
    "reference": 400 * MB,
}
DEFAULT_OVERHEAD = 150 * MB
# Weight copies resident at once: ExecuTorch's XNNPACK packs weights into its own buffers while the program
# file stays memory-mapped (clean pages, evictable), so one copy counts; torch holds its state dict.
SCALE_BYTES = 4  # torchao scales are kept in the model dtype (float32) and serialized as such
# Recipes stored the same way whatever the preset's group size: (bits per weight, inputs per scale). "ternary" is
# sdk/quantize.py's torchao form (codes -1/0/1 in int4 blocks of 32); exporters that store it smaller (ONNX: 2 bits)
# say so through their `weight_bytes` (exporters/__init__.py).
FIXED_RECIPES = {"ternary": (4, 32)}


@dataclass(frozen=True)
class WideWeights:
    """What a GGUF student stores at 5 to 8 bits: the part of its layer-linear weights, and its table."""

    layer_share: float = 0.0
    embedding: bool = False


NARROW = WideWeights()


@dataclass(frozen=True)
class FitEstimate:
    """Bytes by part; `memory` is the peak at max context, `bundle` what ships."""

    weights: dict[str, float]
    kv_cache: float
    activations: float
    runtime: float
    bundle: float

    @property
    def weight_bytes(self) -> float:
        return sum(self.weights.values())

    @property
    def memory(self) -> float:
        return self.weight_bytes + self.kv_cache + self.activations + self.runtime

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights_mb": {k: round(v / MB, 1) for k, v in self.weights.items()},
            "weights_total_mb": round(self.weight_bytes / MB, 1),
            "kv_cache_mb": round(self.kv_cache / MB, 1),
            "activations_mb": round(self.activations / MB, 1),
            "runtime_mb": round(self.runtime / MB, 1),
            "memory_mb": round(self.memory / MB, 1),
            "bundle_mb": round(self.bundle / MB, 1),
        }


@dataclass(frozen=True)
class FitReport:
    target: str
    preset: str
    max_context: int
    backend: str
    estimate: FitEstimate
    memory_limit_mb: float | None  # the tighter of the app memory limit and the peak-memory budget
    memory_limit_name: str
    bundle_limit_mb: float | None
    proposals: list[str] = field(default_factory=list)

    @property
    def memory_over_mb(self) -> float:
        return 0.0 if self.memory_limit_mb is None else self.estimate.memory / MB - self.memory_limit_mb

    @property
    def bundle_over_mb(self) -> float:
        return 0.0 if self.bundle_limit_mb is None else self.estimate.bundle / MB - self.bundle_limit_mb

    @property
    def fits(self) -> bool:
        return self.memory_over_mb <= 0 and self.bundle_over_mb <= 0

    def summary(self) -> str:
        e = self.estimate
        limit = f"{self.memory_limit_mb:.0f} MB {self.memory_limit_name}" if self.memory_limit_mb else "no limit"
        blimit = f"{self.bundle_limit_mb:.0f} MB budget" if self.bundle_limit_mb else "no budget"
        return (
            f"fit check {self.target} {self.preset} ctx {self.max_context} ({self.backend}): memory "
            f"{e.memory / MB:.0f} MB = weights {e.weight_bytes / MB:.0f} + KV cache {e.kv_cache / MB:.0f} + "
            f"activations {e.activations / MB:.0f} + runtime {e.runtime / MB:.0f} (limit {limit}); "
            f"bundle {e.bundle / MB:.0f} MB ({blimit}): {'fits' if self.fits else 'does NOT fit'}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "quantization": self.preset,
            "max_context": self.max_context,
            "backend": self.backend,
            "estimate": self.estimate.to_dict(),
            "memory_limit_mb": self.memory_limit_mb,
            "memory_limit": self.memory_limit_name,
            "bundle_limit_mb": self.bundle_limit_mb,
            "fits": self.fits,
            "proposals": self.proposals,
        }

    def raise_if_not_fits(self) -> None:
        if self.fits:
            return
        e, over = self.estimate, []
        if self.memory_over_mb > 0:
            over.append(
                f"needs {e.memory / MB:.0f} MB of memory at context {self.max_context} (weights "
                f"{e.weight_bytes / MB:.0f} + KV cache {e.kv_cache / MB:.0f} + activations {e.activations / MB:.0f} "
                f"+ runtime {e.runtime / MB:.0f}), {self.memory_over_mb:.0f} MB over the "
                f"{self.memory_limit_mb:.0f} MB {self.memory_limit_name}"
            )
        if self.bundle_over_mb > 0:
            over.append(
                f"the bundle would be {e.bundle / MB:.0f} MB, {self.bundle_over_mb:.0f} MB over the "
                f"{self.bundle_limit_mb:.0f} MB bundle budget"
            )
        fix = "; or ".join(self.proposals) if self.proposals else "nothing edgepack offers fits: pick a smaller model"
        raise EdgepackError(f"{self.preset} does not fit {self.target}: " + " and ".join(over), fix)


# --- the estimate ----------------------------------------------------------------------------------------


def _recipe_bytes(recipe: str | None, group: int, in_features: int, dtype_bytes: int) -> float:
    """Bytes per weight, scales included, for one quantization recipe of sdk/quantize.py."""
    if recipe is None:
        return float(dtype_bytes)
    if recipe in FIXED_RECIPES:
        bits, per_scale = FIXED_RECIPES[recipe]
        return bits / 8 + SCALE_BYTES / per_scale
    bits = 4 if recipe in ("8da4w", "4w") or "int4" in recipe else 8  # older manifests spell recipes out
    per_scale = group if group and in_features % group == 0 else in_features  # 0 = one scale per row
    return bits / 8 + SCALE_BYTES / per_scale


def weight_bytes(cfg: ModelConfig, preset: QuantPreset, wide: WideWeights = NARROW) -> dict[str, float]:
    """Stored bytes of each part of the model under `preset` (a quantized preset unties the output layer).

    `wide`: what a GGUF stores at 5 to 8 bits (`gguf_wide_weights`), which the int4 recipe keeps at 8 bits
    (`quantize._wide_blocks`, `quantize._embedding_recipe`), per output channel as ExecuTorch stores them."""
    keeps_wide = preset.linear == "8da4w" and preset.group_size == CARRIED_BLOCK
    wide_share = wide.layer_share if keeps_wide else 0.0
    dtype_bytes = 2 if preset.dtype in ("float16", "bfloat16") else 4
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    linears = [(h, q), (h, kv), (h, kv), (q, h), (h, cfg.intermediate_size), (h, cfg.intermediate_size),
               (cfg.intermediate_size, h)]  # (in, out) of q, k, v, o, gate, up, down

    def anchors(recipe: str | None) -> int:
        """`--activation-ranges 2`: a linear whose input is rounded per token takes one zero block more."""
        return CARRIED_BLOCK if preset.activation_ranges > 1 and (recipe or "").startswith("8da") else 0

    per_layer = 0.0
    for n_in, n_out in linears:
        group = preset.group_size if preset.linear else 0
        usable = preset.linear if (not group or n_in % group == 0) else None  # quantize.py skips the rest
        per_weight = _recipe_bytes(usable, group, n_in, dtype_bytes)
        if wide_share:
            per_weight += wide_share * (_recipe_bytes("8da8w", 0, n_in, dtype_bytes) - per_weight)
        per_layer += (n_in + anchors(usable)) * n_out * per_weight
    small = small_per_layer(cfg)  # norms and biases stay in the model dtype
    embed = cfg.vocab_size * h
    table_recipe, table_group = preset.embedding, preset.embedding_group_size
    if preset.embedding == "4w" and wide.embedding:
        table_recipe, table_group = "8w", 0
    parts = {
        "layers": cfg.num_layers * (per_layer + small * dtype_bytes),
        "embedding": embed * _recipe_bytes(table_recipe, table_group, h, dtype_bytes),
        "final_norm": h * dtype_bytes,
    }
    if preset.quantized or not cfg.tie_word_embeddings:
        head_inputs = h + anchors(preset.lm_head)
        parts["lm_head"] = cfg.vocab_size * head_inputs * _recipe_bytes(preset.lm_head, 0, h, dtype_bytes)
    return parts


def layer_linear_weights(cfg: ModelConfig) -> int:
    """Weights of one decoder layer's linears (q, k, v, o, gate, up, down)."""
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return 2 * h * q + 2 * h * kv + 3 * h * cfg.intermediate_size


def small_per_layer(cfg: ModelConfig) -> int:
    """One layer's norm weights and biases (never quantized): BitNet adds two sub-norms and o_proj's bias."""
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    small = 2 * h + ((q + 2 * kv) if cfg.attention_bias else 0)
    if cfg.architecture == "bitnet":
        small += h + cfg.intermediate_size + (h if cfg.attention_bias else 0)
    return small


def kv_cache_bytes(cfg: ModelConfig, preset: QuantPreset, max_context: int) -> float:
    dtype_bytes = 2 if preset.dtype in ("float16", "bfloat16") else 4
    return 2.0 * cfg.num_layers * max_context * cfg.num_kv_heads * cfg.head_dim * dtype_bytes


def activation_bytes(cfg: ModelConfig, preset: QuantPreset, max_context: int, chunk: int = PREFILL_CHUNK) -> float:
    """One prefill chunk's live tensors: the logits of every position, the MLP's two intermediates and its
    product, q/k/v/attention output, and one layer's attention scores over the whole context."""
    t = min(chunk, max_context)
    dtype_bytes = 2 if preset.dtype in ("float16", "bfloat16") else 4
    logits = t * cfg.vocab_size * 4
    mlp = 3 * t * cfg.intermediate_size * dtype_bytes
    attn = 4 * t * cfg.num_heads * cfg.head_dim * dtype_bytes + cfg.num_heads * t * max_context * 4
    residual = 2 * t * cfg.hidden_size * 4
    return float(logits + mlp + attn + residual)


def estimate(cfg: ModelConfig, preset: QuantPreset, max_context: int, backend: str = "executorch",
             target: Target | None = None, wide: WideWeights = NARROW) -> FitEstimate:
    """`backend` is "name" or "name/delegate"; with `target`, the exporter's own extra files count in the bundle;
    `wide` as in `weight_bytes`."""
    from edgepack.exporters import extra_bundle_bytes, stored_weight_bytes

    name, _, delegate = backend.partition("/")
    weights = stored_weight_bytes(name, cfg, preset) or weight_bytes(cfg, preset, wide)
    extra = extra_bundle_bytes(name, cfg, target, delegate or None) if target is not None else 0.0
    return FitEstimate(
        weights=weights,
        kv_cache=kv_cache_bytes(cfg, preset, max_context),
        activations=activation_bytes(cfg, preset, max_context),
        runtime=RUNTIME_OVERHEAD.get(name, DEFAULT_OVERHEAD),
        bundle=sum(weights.values()) + TOKENIZER_BYTES + extra,
    )


# --- against a target ---------------------------------------------------------------------------------------


def memory_limit(target: Target) -> tuple[float | None, str]:
    """The tighter of the app memory limit (the OS kills above it) and the peak-memory budget, in MB."""
    candidates: list[tuple[float, str]] = []
    app = target.hardware.get("app_memory_limit_gb")
    if app is None and target.hardware.get("measured"):
        app = _host_ram_gb()
    if app:
        candidates.append((float(app) * 1000, f"app memory limit of {target.name}"))
    budget = target.budgets.get("peak_memory_mb")
    if budget:
        candidates.append((float(budget), f"peak-memory budget of {target.name}"))
    if not candidates:
        return None, "no limit"
    return min(candidates)


def _host_ram_gb() -> float | None:
    try:
        import psutil

        return psutil.virtual_memory().total / GB
    except ImportError:  # psutil is a dependency; a broken install only loses this ceiling
        return None


def check_fit(
    cfg: ModelConfig,
    preset: QuantPreset,
    target: Target,
    max_context: int,
    backend: str = "executorch",
    propose: bool = True,
    wide: WideWeights = NARROW,
) -> FitReport:
    """The estimate against the target's limits, with what would fit when it does not (`wide`: see
    `weight_bytes`)."""
    mem_limit, mem_name = memory_limit(target)
    bundle_limit = target.budgets.get("bundle_mb")
    report = FitReport(
        target=target.name,
        preset=preset.name,
        max_context=max_context,
        backend=backend,
        estimate=estimate(cfg, preset, max_context, backend, target, wide),
        memory_limit_mb=mem_limit,
        memory_limit_name=mem_name,
        bundle_limit_mb=float(bundle_limit) if bundle_limit else None,
    )
    if report.fits or not propose:
        return report
    proposals = _proposals(cfg, preset, target, max_context, backend, wide)
    return FitReport(**{**report.__dict__, "proposals": proposals})


def _proposals(cfg: ModelConfig, preset: QuantPreset, target: Target, max_context: int, backend: str,
               wide: WideWeights) -> list[str]:
    out: list[str] = []
    own = estimate(cfg, preset, max_context, backend, target, wide)
    for name, other in PRESETS.items():  # smaller presets at the same context, largest first
        if not _can_take(other, cfg):
            continue
        candidate = check_fit(cfg, other, target, max_context, backend, propose=False, wide=wide)
        if name != preset.name and candidate.estimate.memory < own.memory and candidate.fits:
            out.append(f"--quant {name} fits ({candidate.estimate.memory / MB:.0f} MB of memory, "
                       f"bundle {candidate.estimate.bundle / MB:.0f} MB)")
            break
    context = max_context // 2
    while context >= 256:  # the same preset with a shorter context (only the KV cache and scores shrink)
        candidate = check_fit(cfg, preset, target, context, backend, propose=False, wide=wide)
        if candidate.fits:
            out.append(f"--max-context {context} fits ({candidate.estimate.memory / MB:.0f} MB)")
            break
        context //= 2
    return out


def _can_take(preset: QuantPreset, cfg: ModelConfig) -> bool:
    """Whether a student of this config could be exported with `preset` (ternary: BitNet b1.58 only)."""
    try:
        check_carried(preset, cfg.architecture)
    except UsageError:
        return False
    return True


# --- the export's own memory, on this machine -----------------------------------------------------------------

GATE_TOKENS = 1024  # positions the quality gate scores (sdk/verify.py DEFAULT_EVAL_TOKENS)
GATE_LOGIT_COPIES = 5  # vocabulary-wide buffers of the gate at once, fitted to the measurements below
EXPORT_BASE = 0.5 * GB  # Python, torch, tokenizers, a runtime


def export_peak_bytes(cfg: ModelConfig) -> float:
    """Peak resident memory of `edgepack export` itself (not of the device): weights stream in piece by piece,
    so the peak is the quality gate's, i.e. one float32 copy of the model (its reference) plus the logits it
    compares (reference and bundle, [tokens, vocab] each, and their log-softmax blocks).

    Empirical (ONNX int4, issue #11, this 2-core machine): SmolLM2-135M 2.36 GB, Qwen2.5-Coder-0.5B 7.7 GB,
    R1-Distill-Qwen-1.5B's shape 12.0 GB measured; this formula gives 3.0, 8.7 and 13.8 GB (it errs high)."""
    logits = 2 * GATE_TOKENS * cfg.vocab_size * 4
    return 4 * cfg.num_parameters() + GATE_LOGIT_COPIES * logits + EXPORT_BASE


def check_export_memory(cfg: ModelConfig, available: float | None = None) -> None:
    """Refuse, before loading, an export this machine cannot hold (`available`: bytes, default MemAvailable)."""
    if available is None:
        try:
            import psutil

            available = float(psutil.virtual_memory().available)
        except ImportError:
            return
    need = export_peak_bytes(cfg)
    if need > available:
        raise EdgepackError(
            f"exporting this {cfg.num_parameters() / 1e9:.2f}B-parameter model needs about {need / GB:.1f} GB of "
            f"memory here (its quality gate holds the fp32 reference), and {available / GB:.1f} GB is available",
            "close other programs or export on a machine with more memory",
        )


# --- a model's config without reading its weights -------------------------------------------------------------


def peek_config(source: str | None) -> ModelConfig | None:
    """The config of what `--model` names, from config.json or a GGUF header; None for a Hub id not yet
    downloaded (the check then runs after download, before the model is built)."""
    from edgepack import intake
    from edgepack.intake import common, gguf_file

    if source is None:
        path = intake.default_model_path()
    else:
        path = Path(source).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            return None  # load_student gives the precise error
        return common.config_from_hf(common.read_json(config_file), f"config.json in {path}")
    if path.is_file() and (path.suffix.lower() == ".gguf" or common.starts_with_magic(path)):
        reader = gguf_file.open_gguf(path)
        tensors = {t.name: t for t in reader.tensors}
        return gguf_file.gguf_config(gguf_file.Metadata(reader, path), tensors, path)
    return None


CARRIED_BLOCK = 32  # sdk/blocks.py BLOCK (not imported: torch, which `edgepack targets` does without)
LAYER_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def gguf_wide_weights(source: str | None) -> WideWeights:
    """What a GGUF stores at 5 to 8 bits (Q5_0 ... Q8_0), from its header; nothing for other sources. A "Q4_K_M"
    file can be mostly 5-bit (Qwen2.5-Coder-0.5B: 85% of its layer weights, and its table)."""
    from edgepack import intake
    from edgepack.blocks import INT8_TYPES
    from edgepack.intake import common, gguf_file

    path = intake.default_model_path() if source is None else Path(source).expanduser()
    if not (path.is_file() and (path.suffix.lower() == ".gguf" or common.starts_with_magic(path))):
        return NARROW
    wide = total = 0
    table = False
    for tensor in gguf_file.open_gguf(path).tensors:
        parts = tensor.name.split(".")
        is_wide = tensor.tensor_type.name in INT8_TYPES
        if tensor.name == "token_embd.weight":
            table = is_wide
        elif parts[0] == "blk" and parts[-1] == "weight" and parts[-2] in LAYER_LINEARS:
            total += int(tensor.n_elements)
            wide += int(tensor.n_elements) if is_wide else 0
    return WideWeights(wide / total if total else 0.0, table)
