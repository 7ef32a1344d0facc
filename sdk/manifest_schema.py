"""The bundle manifest's schema (pydantic v2), checked once when a bundle is read or written.

Why a schema: the runtime backends index the manifest directly (`manifest["model"]["config"]["num_layers"]`),
so a manifest of the wrong shape must be refused at load with one line naming the field, never surface later
as a KeyError or TypeError deep inside a backend. Everything is strict (no "1" for 1, no 1 for true) and
bounded (no context of 10**12). Sections keep unknown keys (`extra="allow"`) so a manifest can record more
than the runtime reads; `model.config` does not, because it is passed to `ModelConfig(**config)` as is.
Every file name is a plain relative path inside the bundle; `edgepack.bundle` checks the files themselves.
"""

from __future__ import annotations

import math
import re
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal, Mapping

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError
from pydantic import model_validator
from pydantic_core import PydanticCustomError

from edgepack import FORMAT_VERSION
from edgepack.errors import EdgepackError

FORMAT_NAME = "edgepack-bundle"
MAX_CONTEXT = 131072  # the most `edgepack export --max-context` accepts
MAX_DIM = 1 << 20  # any hidden size, head count or layer count beyond this is nonsense, not a model
MAX_VOCAB = 1 << 24
MAX_PATH_CHARS = 1024


def unsafe_path_reason(name: Any) -> str | None:
    """Why `name` is not a plain relative path inside a bundle (None when it is one).

    Checked on the text alone, before the file system is touched: absolute paths, `..`, `.`, empty parts,
    backslashes and drive letters (Windows), control characters and names the file system cannot encode."""
    if not isinstance(name, str) or not name:
        return "is not a file name"
    if len(name) > MAX_PATH_CHARS:
        return "is too long"
    if not name.isprintable() or "\\" in name:
        return "holds a control character or a backslash"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "is an absolute path"
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "is not a plain relative path (empty, '.' or '..' part)"
    return None


def _relative_path(name: str) -> str:
    reason = unsafe_path_reason(name)
    if reason:
        raise PydanticCustomError("unsafe_path", "{reason}: a bundle names only plain relative paths inside it",
                                  {"reason": reason})
    return PurePosixPath(name).as_posix()


RelPath = Annotated[StrictStr, AfterValidator(_relative_path)]
Positive = Annotated[StrictInt, Field(gt=0, le=MAX_DIM)]
Count = Annotated[StrictInt, Field(ge=0)]
TokenId = Annotated[StrictInt, Field(ge=0, le=MAX_VOCAB)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Context = Annotated[StrictInt, Field(ge=1, le=MAX_CONTEXT)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class FileEntry(_Section):
    size: Count
    sha256: Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$")]


class ModelConfigSection(BaseModel):
    """`edgepack.model.ModelConfig` as data: the reference backend builds one from it with `**`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    architecture: Literal["llama", "qwen2", "bitnet"]
    vocab_size: Annotated[StrictInt, Field(gt=0, le=MAX_VOCAB)]
    hidden_size: Positive
    intermediate_size: Positive
    num_layers: Positive
    num_heads: Positive
    num_kv_heads: Positive
    head_dim: Positive
    rope_theta: PositiveFloat
    rms_norm_eps: PositiveFloat
    tie_word_embeddings: StrictBool
    attention_bias: StrictBool
    max_position_embeddings: Annotated[StrictInt, Field(gt=0)]
    rope_scaling: dict[StrictStr, Any] | None = None
    hidden_act: Literal["silu", "relu2"] = "silu"  # BitNet b1.58: relu2 (left out of a Llama/Qwen2 manifest)
    int8_activations: StrictBool = False  # BitNet b1.58's int8 absmax activations


class ModelSection(_Section):
    name: StrictStr
    config: ModelConfigSection
    architecture: StrictStr | None = None
    parameters: Count | None = None
    source: StrictStr | None = None


class CpuSection(_Section):
    program: RelPath


class NpuSection(_Section):
    prefill_program: RelPath
    decode_program: RelPath
    context_binaries: list[RelPath] = []
    ep_options: dict[StrictStr, StrictStr]
    context: Context
    prefill_len: Context
    inv_freq: list[Annotated[float, Field(allow_inf_nan=False)]]
    first_position: StrictStr | None = None
    qnn_sdk: StrictStr | None = None


class BackendSection(_Section):
    name: Annotated[StrictStr, Field(min_length=1)]
    program: RelPath
    delegate: StrictStr | None = None
    max_prefill: Context | None = None
    host_check: StrictStr | None = None
    compute_units: StrictStr | None = None
    functions: dict[StrictStr, Context] | None = None
    cpu: CpuSection | None = None
    npu: NpuSection | None = None
    genai_config: RelPath | None = None
    equal_weights: list[list[StrictStr]] | None = None  # Core ML: names whose equal values are stored once
    constant_weights: dict[StrictStr, Annotated[float, Field(allow_inf_nan=False)]] | None = None  # Core ML

    @model_validator(mode="after")
    def _what_each_backend_reads(self) -> "BackendSection":
        needed = {"executorch": "max_prefill", "onnx": "cpu", "coreml": "functions"}.get(self.name)
        if needed and getattr(self, needed) is None:
            raise PydanticCustomError("backend_field", "field backend.{field} is missing (the {backend} backend needs it)",
                                      {"backend": self.name, "field": needed})
        return self


class ThinkTags(_Section):
    start: StrictStr
    end: StrictStr


class TokenizerSection(_Section):
    file: RelPath
    config_file: RelPath | None = None
    chat_template_file: RelPath | None = None
    bos_id: TokenId | None = None
    add_bos: StrictBool = False
    eos_ids: list[TokenId] = []
    stop_ids: list[TokenId] = []
    think: ThinkTags | None = None


class GenerationSection(_Section):
    max_new_tokens: Annotated[StrictInt, Field(gt=0)] | None = None
    temperature: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Count | None = None


class QuantizationSection(_Section):
    name: StrictStr


class VerificationSection(_Section):
    status: StrictStr


class Manifest(_Section):
    format: Literal["edgepack-bundle"]
    format_version: Literal[FORMAT_VERSION]  # type: ignore[valid-type]
    created: StrictStr | None = None
    model: ModelSection
    backend: BackendSection
    context_length: Context
    tokenizer: TokenizerSection
    files: Annotated[dict[RelPath, FileEntry], Field(min_length=1)]
    generation: GenerationSection | None = None
    quantization: QuantizationSection | None = None
    target: StrictStr | None = None
    toolchain: dict[StrictStr, StrictStr] | None = None
    verification: VerificationSection | None = None
    export_seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None

    @model_validator(mode="after")
    def _context_fits_the_model(self) -> "Manifest":
        trained = self.model.config.max_position_embeddings
        if self.context_length > trained:
            raise PydanticCustomError(
                "context", "context_length {context} exceeds model.config.max_position_embeddings {trained}",
                {"context": self.context_length, "trained": trained},
            )
        return self


def validate_manifest(manifest: Any, where: str) -> None:
    """Refuse a manifest that is not what this edgepack writes; `where` names it in the message."""
    if not isinstance(manifest, Mapping):
        raise EdgepackError(f"{where} is not a JSON object (it holds {_kind(manifest)})", "re-export the bundle")
    try:
        Manifest.model_validate(manifest)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise EdgepackError(f"{where}: {_describe(errors[0])}{more}", "re-export the bundle") from None
    except RecursionError:
        raise EdgepackError(f"{where} is nested too deeply", "re-export the bundle") from None


def _describe(error: Mapping[str, Any]) -> str:
    """One pydantic error as `field a.b.c: what is wrong (got X)`, on one line."""
    loc = list(error["loc"])
    message = re.sub(r" or instance of \w+$", "", error["msg"])
    if not loc or error["type"] == "backend_field":  # a check across fields: the message names them
        return message
    if "[key]" in loc:  # a mapping's key, e.g. a bad name in `files`: loc is (..., key, "[key]")
        *section, key = loc[: loc.index("[key]")]
        return f"{'.'.join(map(str, section)) or 'the manifest'} entry {_short(key)} {message}"
    field = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")
    if error["type"] == "unsafe_path":
        return f"field {field} {_short(error.get('input'))} {message}"
    if error["type"] == "missing":
        return f"field {field} is missing"
    if error["type"] == "extra_forbidden":
        return f"field {field} is not one this edgepack knows"
    return f"field {field}: {message[:1].lower()}{message[1:]} (got {_short(error.get('input'))})"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    if isinstance(value, float) and math.isnan(value):
        text = "NaN"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _kind(value: Any) -> str:
    return "null" if value is None else f"a {type(value).__name__}"
