"""llama.cpp GGUF files: metadata -> ModelConfig, the vocabulary -> tokenizer files, and tensors read from the
memory-mapped file one at a time (dequantized to float32, or decoded as exact int4 blocks where the type has
them). The reader is bounds-checked and bounded, so a hostile file costs a small multiple of its size."""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np
import torch

from edgepack import blocks
from edgepack.blocks import CarriedBlocks
from edgepack.errors import EdgepackError
from edgepack.intake.common import (
    Student,
    TokenizerFiles,
    check_layout,
    check_vocab,
    config_from_hf,
    first_line,
    short,
    starts_with_magic,
    token_ids,
)
from edgepack.intake.weights import LazyWeights
from edgepack.model import SUPPORTED_ARCHITECTURES, ModelConfig, llama3_scaled_frequencies

# A quantization label ending a GGUF file name ("….Q4_1", "-q8_0", ".F16"), dropped from the model name.
_QUANT_SUFFIX = re.compile(r"[.\-_](?:I?Q\d\w*|B?F16|F32)$", re.IGNORECASE)


# blk.N.<gguf> -> model.layers.N.<hf>
_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_sub_norm": "self_attn.attn_sub_norm",  # bitnet
    "ffn_sub_norm": "mlp.ffn_sub_norm",  # bitnet
}
_GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GGUF_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "bitnet": "BitNetForCausalLM"}
_ROPE_FREQS = "rope_freqs.weight"  # Llama 3 scaling factors, folded into the config rather than the weights


def load_gguf(path: Path, source: str | None = None) -> Student:
    """A llama.cpp GGUF file: metadata -> ModelConfig, tensors dequantized to float32 under HF names."""
    source = source or str(path)
    reader = open_gguf(path)
    meta = Metadata(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    config = gguf_config(meta, tensors, path)
    hf_names = {name: _hf_name(name, path) for name in tensors if name != _ROPE_FREQS}
    check_layout(config, {hf: _torch_shape(tensors[name]) for name, hf in hf_names.items()}, source)
    vocab = meta.count("tokenizer.ggml.tokens")
    if not vocab:
        raise EdgepackError(f"GGUF file {path} carries no tokenizer", "pass a GGUF converted with its tokenizer")
    check_vocab(vocab, config, source)

    tokenizer = gguf_tokenizer(path, meta)  # its metadata checked before any weight is dequantized
    for name in hf_names:
        _check_type(tensors[name], path)  # every tensor readable, before the export spends any time
    state_dict = LazyWeights({hf: (lambda t=tensors[name], hf=hf: _gguf_weight(t, hf, config, path))
                              for name, hf in hf_names.items()})
    return Student.of(
        _QUANT_SUFFIX.sub("", path.stem) or path.stem, source, config, state_dict, tokenizer,
        gguf_tensor_types={hf: tensors[name].tensor_type.name for name, hf in hf_names.items()},
        gguf_blocks=LazyWeights({
            hf: (lambda t=tensors[name], hf=hf: _gguf_blocks(t, hf, config))
            for name, hf in hf_names.items()
            if blocks.supports(tensors[name].tensor_type.name) and len(_torch_shape(tensors[name])) == 2
        }),
        ternary_blocks=LazyWeights({
            hf: (lambda t=tensors[name]: blocks.decode_ternary(t.data, t.tensor_type.name, _torch_shape(t)))
            for name, hf in hf_names.items()
            if tensors[name].tensor_type.name in blocks.TERNARY_TYPES and len(_torch_shape(tensors[name])) == 2
        }),
    )


# What a GGUF's metadata may hold, checked while it is read. Real files have ~40 keys and 4 + 12 tensors per
# layer at most (ModelConfig allows 1000 layers); their largest arrays are the vocabulary's (Llama 3:
# 128,256 tokens and 280,147 merges). The array limits matter beyond our own reader: transformers' tokenizer
# conversion re-reads the file with the stock GGUFReader, one numpy view (~300 bytes) per element.
MAX_GGUF_KEYS = 1 << 12
MAX_GGUF_TENSORS = 1 << 14
MAX_TOKENIZER_ARRAY = 1 << 19
MAX_OTHER_ARRAY = 1 << 16
TOKENIZER_ARRAYS = {  # the vocabulary's parallel arrays and the element type llama.cpp writes and reads
    "tokenizer.ggml.tokens": gguf.GGUFValueType.STRING,
    "tokenizer.ggml.scores": gguf.GGUFValueType.FLOAT32,
    "tokenizer.ggml.token_type": gguf.GGUFValueType.INT32,
    "tokenizer.ggml.merges": gguf.GGUFValueType.STRING,
}
GGUF_FIX = "convert the model again with llama.cpp's convert_hf_to_gguf.py"


class _Truncated(Exception):
    def __init__(self, needed: int, size: int) -> None:
        super().__init__(f"it needs {needed} bytes but the file has {size}")


class _Refused(Exception):
    """Metadata no model file has (too many keys, tensors or items); the message completes "GGUF file X ..."."""


class _Reader(gguf.GGUFReader):
    """`gguf.GGUFReader`, bounds-checked, bounded, and fast on large metadata arrays.

    Why bounds: the stock reader slices past the end of the file without complaint, so a truncated file
    surfaces as an unrelated reshape or index error. Why arrays in bulk: the stock reader builds numpy views
    per array element (~700 bytes and ~35 µs each), so a 1 MB file holding one array of 1M uint8 costs
    ~750 MB and ~35 s to parse (measured). Here an array is one view of its bytes (a string array is walked once to
    find its end, without an object per string), and the counts of keys, tensors and array items are capped
    (MAX_GGUF_*), so what a file costs to read is a small multiple of its size. An array's `ReaderField`
    holds all its elements in one part: read fields through `Metadata`, not `ReaderField.contents()`.
    Overrides private methods (`_get`, `_build_fields`, `_build_tensor_info`) of gguf 0.19.0, the version
    pyproject.toml pins.
    """

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
        plain = self._plain()
        end = offset + np.dtype(dtype).itemsize * int(count)
        if end > plain.size:
            raise _Truncated(end, plain.size)
        arr = plain[offset:end].view(dtype)
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    def _plain(self) -> np.ndarray:
        """The mapping as a plain ndarray: memmap's per-slice bookkeeping would cost half the parse."""
        plain = self.__dict__.get("_plain_view")
        if plain is None:
            plain = self.__dict__["_plain_view"] = self.data.view(np.ndarray)
        return plain

    def _build_fields(self, offs: int, count: int) -> int:
        if count > MAX_GGUF_KEYS:
            raise _Refused(
                f"declares {count} metadata keys; a model file has a few dozen (at most {MAX_GGUF_KEYS})"
            )
        for _ in range(int(count)):
            start = offs
            key_len, key_data = self._get_str(offs)
            key = key_data.tobytes().decode("utf-8")
            offs += 8 + int(key_len[0])
            raw_type = self._get(offs, np.uint32)
            offs += 4
            if int(raw_type[0]) == gguf.GGUFValueType.ARRAY:
                size, parts, data, types = self._array_parts(key, offs)
            else:
                size, parts, data, types = self._get_field_parts(offs, raw_type[0])
            field = gguf.ReaderField(start, key, [key_len, key_data, raw_type, *parts], [3 + i for i in data], types)
            self._push_field(field, skip_sum=True)
            offs += size
        return offs

    def _array_parts(self, key: str, offs: int) -> tuple[int, list[np.ndarray], list[int], list[Any]]:
        """An array field as [item type, length, all items in one view]; its size and type checked first."""
        item_type, length = self._get(offs, np.uint32), self._get(offs + 4, np.uint64)
        sub, count = gguf.GGUFValueType(int(item_type[0])), int(length[0])
        _check_array(key, sub, count)
        start = offs + 12
        if sub == gguf.GGUFValueType.STRING:
            values = self._get(start, np.uint8, self._strings_end(start, count) - start)
        else:
            values = self._get(start, self.gguf_scalar_to_np[sub], count)
        return 12 + int(values.nbytes), [item_type, length, values], [2], [gguf.GGUFValueType.ARRAY, sub]

    def _strings_end(self, start: int, count: int) -> int:
        """Where `count` length-prefixed strings starting at `start` end; no object is made per string."""
        view, order = memoryview(self._plain()), _int_order(self.byte_order)
        end, size = start, self._plain().size
        for _ in range(count):
            if end + 8 > size:
                raise _Truncated(end + 8, size)
            end += 8 + int.from_bytes(view[end : end + 8], order)
        if end > size:
            raise _Truncated(end, size)
        return end

    def _build_tensor_info(self, offs: int, count: int) -> tuple[int, list[Any]]:
        if count > MAX_GGUF_TENSORS:
            raise _Refused(
                f"declares {count} tensors; a Llama or Qwen2 model of 1000 layers has 12,004 "
                f"(at most {MAX_GGUF_TENSORS})"
            )
        return super()._build_tensor_info(offs, count)


def _check_array(key: str, sub: gguf.GGUFValueType, count: int) -> None:
    if sub == gguf.GGUFValueType.ARRAY:
        raise _Refused(f"holds an array of arrays under {key}, which no model file has")
    expected = TOKENIZER_ARRAYS.get(key)
    if expected is not None and sub != expected:
        raise _Refused(f"stores {key} as an array of {sub.name}, where llama.cpp writes {expected.name}")
    limit = MAX_OTHER_ARRAY if expected is None else MAX_TOKENIZER_ARRAY
    if count > limit:
        raise _Refused(f"holds an array of {count} items under {key}; edgepack reads at most {limit} there")


def _int_order(byte_order: str) -> Literal["little", "big"]:
    """The file's byte order for int.from_bytes: the host's ('I') or the other one ('S', swapped)."""
    host = sys.byteorder
    return host if byte_order == "I" else ("big" if host == "little" else "little")


def _strings(blob: np.ndarray, count: int, order: Literal["little", "big"]) -> list[str]:
    """The `count` length-prefixed UTF-8 strings in `blob` (a string array's single part)."""
    data, out, offs = blob.tobytes(), [], 0
    for _ in range(count):
        length = int.from_bytes(data[offs : offs + 8], order)
        out.append(data[offs + 8 : offs + 8 + length].decode("utf-8"))
        offs += 8 + length
    return out


def open_gguf(path: Path) -> gguf.GGUFReader:
    """Parse header, metadata and tensor table (every extent checked against the file size, every count capped)."""
    if not starts_with_magic(path):
        raise EdgepackError(f"{path} is not a GGUF file (bad magic bytes)", "pass a .gguf file written by llama.cpp")
    try:
        return _Reader(path)
    except _Truncated as exc:
        raise EdgepackError(f"GGUF file {path} is truncated ({exc})", "download it again") from None
    except _Refused as exc:
        raise EdgepackError(f"GGUF file {path} {exc}", GGUF_FIX) from None
    except ValueError as exc:
        unknown = _UNKNOWN_TYPE.fullmatch(str(exc))
        if unknown:  # a type newer (or other) than gguf-py knows, e.g. bitnet.cpp's I2_S
            raise EdgepackError(
                f"GGUF file {path} stores a tensor as ggml type {unknown.group(1)}, which gguf-py "
                f"{_gguf_version()} does not know (bitnet.cpp's I2_S files are such)",
                "convert the checkpoint with llama.cpp's convert_hf_to_gguf.py (--outtype f16, q8_0, tq1_0 or tq2_0)",
            ) from None
        raise EdgepackError(f"GGUF file {path} is corrupt ({first_line(exc)})", "download it again") from None
    except (KeyError, IndexError, TypeError, OverflowError, OSError) as exc:
        raise EdgepackError(f"GGUF file {path} is corrupt ({first_line(exc)})", "download it again") from None


_UNKNOWN_TYPE = re.compile(r"(?:np\.uint32\()?(\d+)\)? is not a valid GGMLQuantizationType")


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "(unknown version)"


class Metadata:
    """GGUF metadata by key, each value checked for the type the caller needs. Arrays are counted with `count`
    and never decoded unless asked for: a vocabulary would cost seconds."""

    def __init__(self, reader: gguf.GGUFReader, path: Path) -> None:
        self.fields, self.path = reader.fields, path
        self.order = _int_order(reader.byte_order)

    def get(self, key: str, default: Any = None) -> Any:
        fld = self.fields.get(key)
        if fld is None:
            return default
        try:
            if fld.types[:1] == [gguf.GGUFValueType.ARRAY]:  # one part holds every item (see _Reader)
                if fld.types[1] == gguf.GGUFValueType.STRING:
                    return _strings(fld.parts[-1], self.count(key), self.order)
                return fld.parts[-1].tolist()
            return fld.contents()
        except (ValueError, IndexError) as exc:
            raise EdgepackError(
                f"GGUF file {self.path} has an unreadable {key} ({first_line(exc)})", "download it again"
            ) from None

    def count(self, key: str) -> int:
        """How many items the array `key` holds (0 when absent or not an array)."""
        fld = self.fields.get(key)
        return int(fld.parts[-2][0]) if fld is not None and fld.types[:1] == [gguf.GGUFValueType.ARRAY] else 0

    def integer(self, key: str, default: int | None = None) -> int:
        """A required (when no default) whole-model integer; per-layer arrays are refused, not misread."""
        value = self.maybe_integer(key)
        if value is None:
            if default is None:
                raise EdgepackError(f"GGUF file {self.path} lacks the metadata key {key}", GGUF_FIX)
            return default
        return value

    def maybe_integer(self, key: str) -> int | None:
        """An optional whole number (None when absent)."""
        value = self.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise EdgepackError(
                f"GGUF file {self.path} has {key} = {short(value)}, not one whole number"
                + (" (per-layer values?)" if isinstance(value, list) else ""),
                "edgepack supports models whose layers all have the same shape"
                if isinstance(value, list) else GGUF_FIX,
            )
        return value

    def number(self, key: str, default: float) -> float:
        """An optional real number (int or float metadata)."""
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EdgepackError(f"GGUF file {self.path} has {key} = {short(value)}, not a number", GGUF_FIX)
        return value

    def text(self, key: str) -> str | None:
        """An optional string."""
        value = self.get(key)
        if value is not None and not isinstance(value, str):
            raise EdgepackError(f"GGUF file {self.path} has {key} = {short(value)}, not a string", GGUF_FIX)
        return value

    def flag(self, key: str) -> bool | None:
        """An optional boolean."""
        value = self.get(key)
        if value is not None and not isinstance(value, bool):
            raise EdgepackError(f"GGUF file {self.path} has {key} = {short(value)}, not true or false", GGUF_FIX)
        return value


def _gguf_key_names(arch: str) -> dict[str, str]:
    """ModelConfig field -> the GGUF metadata it came from, so a bad value is named as the file spells it."""
    return {
        "vocab_size": "token_embd.weight rows",
        "hidden_size": f"{arch}.embedding_length",
        "intermediate_size": f"{arch}.feed_forward_length",
        "num_layers": f"{arch}.block_count",
        "num_heads": f"{arch}.attention.head_count",
        "num_kv_heads": f"{arch}.attention.head_count_kv",
        "head_dim": f"{arch}.attention.key_length",
        "rope_theta": f"{arch}.rope.freq_base",
        "rms_norm_eps": f"{arch}.attention.layer_norm_rms_epsilon",
        "max_position_embeddings": f"{arch}.context_length",
        "hidden_act": f"{arch}.hidden_activation",
    }


def gguf_config(meta: Metadata, tensors: dict[str, Any], path: Path) -> ModelConfig:
    """The config.json a GGUF implies, through ModelConfig.from_hf so one check rejects unsupported models."""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise EdgepackError(f"GGUF file {path} does not name its architecture", GGUF_FIX)
    hf: dict[str, Any] = {"model_type": arch, "architectures": [_GGUF_ARCHITECTURES.get(arch, arch)]}
    if arch not in _GGUF_ARCHITECTURES:
        return ModelConfig.from_hf(hf)  # raises the unsupported-architecture error, naming what is supported
    if "token_embd.weight" not in tensors:
        raise EdgepackError(f"GGUF file {path} has no token_embd.weight tensor", "pass a complete model file")
    embedding = _torch_shape(tensors["token_embd.weight"])
    if len(embedding) != 2:
        raise EdgepackError(
            f"GGUF file {path} has a token_embd.weight of shape {embedding}, not [vocab, hidden]", GGUF_FIX
        )
    heads = meta.integer(f"{arch}.attention.head_count")
    hf.update(
        vocab_size=embedding[0],
        hidden_size=meta.integer(f"{arch}.embedding_length"),
        intermediate_size=meta.integer(f"{arch}.feed_forward_length"),
        num_hidden_layers=meta.integer(f"{arch}.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=meta.integer(f"{arch}.attention.head_count_kv", heads),
        head_dim=meta.maybe_integer(f"{arch}.attention.key_length"),  # None: hidden / heads
        rope_theta=meta.number(f"{arch}.rope.freq_base", 10000.0),
        rms_norm_eps=meta.number(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        max_position_embeddings=meta.integer(f"{arch}.context_length", 2048),
    )
    if arch == "bitnet":  # llama.cpp reads the activation from here and falls back to SiLU (older bitnet files)
        hf["hidden_act"] = meta.text(f"{arch}.hidden_activation") or "silu"
    where, names = f"GGUF file {path}", _gguf_key_names(arch)
    config = config_from_hf(hf, where, names, GGUF_FIX)  # validated before anything is computed from it
    if meta.integer(f"{arch}.rope.dimension_count", config.head_dim) != config.head_dim:
        raise EdgepackError(
            f"GGUF file {path} rotates only part of each attention head (partial RoPE)",
            f"edgepack supports {', '.join(SUPPORTED_ARCHITECTURES)} with full RoPE",
        )
    scaling = _gguf_rope_scaling(meta, tensors.get(_ROPE_FREQS), arch, config.head_dim, config.rope_theta, path)
    return config_from_hf({**hf, "rope_scaling": scaling}, where, names, GGUF_FIX) if scaling else config


def _gguf_rope_scaling(
    meta: Metadata, rope_freqs: Any, arch: str, head_dim: int, theta: float, path: Path
) -> dict[str, Any] | None:
    """Recover Llama 3 rope scaling from the per-frequency factors llama.cpp stores as `rope_freqs`.

    convert_hf_to_gguf writes the factors, not the parameters. The factors' maximum is `factor`; the other
    parameters are taken at the values every Llama 3.x uses (1, 4, 8192) and then verified against the
    stored factors, so an unusual file is refused rather than silently mis-rotated.
    """
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind == "linear" and meta.get(f"{arch}.rope.scaling.factor") == 1.0:
        kind = None  # no scaling at all: llama.cpp's BitNet converter writes exactly this
    if kind not in (None, "none"):  # linear, yarn...: ModelConfig.from_hf refuses them with its own message
        return {"rope_type": kind, "factor": meta.get(f"{arch}.rope.scaling.factor")}
    if rope_freqs is None:
        return None
    factors = _dequantize(rope_freqs, path).astype(np.float64).reshape(-1)
    if np.allclose(factors, 1.0):
        return None
    scaling = {
        "rope_type": "llama3",
        "factor": float(factors.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": meta.integer(f"{arch}.rope.scaling.original_context_length", 8192),
    }
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    expected = (inv_freq / llama3_scaled_frequencies(inv_freq, scaling)).numpy()
    if expected.shape != factors.shape or not np.allclose(expected, factors, rtol=1e-3):
        raise EdgepackError(
            f"GGUF file {path} has rope frequency factors that are not Llama 3 scaling",
            "pass the model's Hugging Face folder instead",
        )
    return scaling


def _hf_name(gguf_name: str, path: Path) -> str:
    match = _GGUF_LAYER.fullmatch(gguf_name)
    if match and match.group(2) in _GGUF_LAYER_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_GGUF_LAYER_NAMES[part]}.{kind}"
    base, _, kind = gguf_name.rpartition(".")
    if base in _GGUF_TOP_NAMES and kind == "weight":
        return f"{_GGUF_TOP_NAMES[base]}.weight"
    raise EdgepackError(
        f"GGUF file {path} has a tensor {gguf_name} that a Llama/Qwen2/BitNet model does not have",
        "pass an unmodified llama, qwen2 or bitnet GGUF",
    )


def _gguf_weight(tensor: Any, hf_name: str, config: ModelConfig, path: Path) -> torch.Tensor:
    weight = torch.from_numpy(_dequantize(tensor, path))
    if config.architecture == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
        weight = _unpermute(weight, config.num_heads if ".q_proj." in hf_name else config.num_kv_heads)
    return weight


def _gguf_blocks(tensor: Any, hf_name: str, config: ModelConfig) -> CarriedBlocks:
    found = blocks.decode(tensor.data, tensor.tensor_type.name, _torch_shape(tensor))
    if config.architecture == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
        heads = config.num_heads if ".q_proj." in hf_name else config.num_kv_heads
        found = found.map_rows(lambda t: _unpermute(t, heads))
    return found


# What gguf-py dequantizes (its numpy kernels), besides the plain float types.
_PLAIN_TYPES = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}


def _check_type(tensor: Any, path: Path) -> None:
    kind = tensor.tensor_type
    if kind not in _PLAIN_TYPES and kind not in gguf.quants._type_traits:
        raise _unreadable(tensor, path)


def _unreadable(tensor: Any, path: Path) -> EdgepackError:
    return EdgepackError(
        f"GGUF file {path} stores {tensor.name} as {tensor.tensor_type.name}, which edgepack cannot dequantize",
        "use a file quantized as F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, a K-quant, TQ1_0 or TQ2_0",
    )


def _dequantize(tensor: Any, path: Path) -> np.ndarray:
    """float32 in torch order, in a fresh writable array (F32 tensors come back as read-only file views)."""
    try:
        if tensor.tensor_type in _PLAIN_TYPES:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        else:
            values = _dequantize_blocks(tensor.data, gguf.quants._type_traits[tensor.tensor_type])
    except NotImplementedError:
        raise _unreadable(tensor, path) from None
    values = values.reshape(_torch_shape(tensor))
    if values.dtype != np.float32 or not values.flags.writeable:
        values = values.astype(np.float32)
    return values


def _dequantize_blocks(data: np.ndarray, kind: Any, chunk_bytes: int = 1 << 20) -> np.ndarray:
    """gguf-py's numpy kernel for one block type, over ~1 MB of rows a call into one preallocated array.
    `gguf.quants.dequantize` calls it on 16 rows at a time and concatenates: 2.7x slower over Qwen2.5-Coder-0.5B
    (4.5 vs 1.7 s), and a GGUF student's weights are read two or three times per export (smoothing, build, gate)."""
    rows = data.reshape(-1, data.shape[-1])
    out = np.empty((rows.shape[0], rows.shape[1] // kind.type_size * kind.block_size), np.float32)
    step = max(1, chunk_bytes // rows.shape[1])
    for i in range(0, rows.shape[0], step):
        out[i : i + step] = kind.dequantize_rows(rows[i : i + step])
    return out


def _torch_shape(tensor: Any) -> tuple[int, ...]:
    """GGUF lists dimensions fastest-moving first; torch the other way round."""
    return tuple(int(d) for d in reversed(tensor.shape))


def _unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf's llama q/k row order (interleaved RoPE pairs) back to HF's rotate-half order.

    The converter does `w.reshape(heads, 2, rows // heads // 2, *rest).swapaxes(1, 2)`; this is its inverse.
    """
    rows, rest = weight.shape[0], weight.shape[1:]
    return weight.reshape(heads, rows // heads // 2, 2, *rest).transpose(1, 2).reshape(weight.shape).contiguous()


def gguf_tokenizer(path: Path, meta: Metadata) -> TokenizerFiles:
    """The vocabulary's metadata checked (parallel arrays, special ids inside it), then converted."""
    vocab = meta.count("tokenizer.ggml.tokens")
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        if key in meta.fields and meta.count(key) != vocab:
            raise EdgepackError(f"GGUF file {path} has {meta.count(key)} {key} for {vocab} tokens", GGUF_FIX)
    add_bos = meta.flag("tokenizer.ggml.add_bos_token")
    if add_bos is None:  # llama.cpp's default: sentencepiece vocabularies start with BOS, BPE ones do not
        add_bos = meta.text("tokenizer.ggml.model") == "llama"
    where = f"GGUF file {path}"
    bos_ids = token_ids(where, vocab, ("tokenizer.ggml.bos_token_id", meta.get("tokenizer.ggml.bos_token_id")))
    eos_ids = token_ids(where, vocab, *((f"tokenizer.ggml.{k}_token_id", meta.get(f"tokenizer.ggml.{k}_token_id"))
                                         for k in ("eos", "eot", "eom")))
    chat_template = meta.text("tokenizer.chat_template")
    return TokenizerFiles(
        files=gguf_tokenizer_files(path),
        chat_template=chat_template,
        bos_id=bos_ids[0] if bos_ids else None,
        add_bos=add_bos,
        eos_ids=eos_ids,
    )


def gguf_tokenizer_files(path: Path) -> dict[str, bytes]:
    """tokenizer.json and friends, converted by transformers from the vocabulary inside the GGUF.

    `TokenizersBackend` rather than `AutoTokenizer`: the same files, but AutoTokenizer also rebuilds the
    model config by re-parsing the whole file with the slow reader (~8 s against ~0.5 s here).
    """
    from transformers import TokenizersBackend

    with tempfile.TemporaryDirectory(prefix="edgepack-tokenizer-") as tmp:
        try:
            tokenizer = TokenizersBackend.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
            tokenizer.save_pretrained(tmp)
        except (ValueError, KeyError, IndexError, TypeError, NotImplementedError, OSError) as exc:
            raise EdgepackError(
                f"cannot convert the tokenizer inside {path} ({first_line(exc)})",
                "pass the model's Hugging Face folder instead",
            ) from None
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}

