"""What every source format shares: the `Student` they all produce and the checks that keep bad input to one
readable line (names and shapes against the module, token ids inside the vocabulary, JSON that is an object).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgepack.blocks import CarriedBlocks, TernaryBlocks
from edgepack.errors import EdgepackError
from edgepack.model import HF_KEYS, CausalLM, ConfigError, ModelConfig

GGUF_MAGIC = b"GGUF"
HF_CONFIG_FIX = "restore the config.json the checkpoint came with"


@dataclass(eq=False)
class Student:
    """A model ready for export, however it arrived."""

    name: str  # e.g. "SmolLM2-135M-Instruct"
    source: str  # the path or Hub id it came from
    config: ModelConfig
    # Hugging Face names -> float32 tensors, each read from the source file when accessed (intake/weights.py)
    state_dict: Mapping[str, torch.Tensor] = field(repr=False)
    tokenizer_files: dict[str, bytes] = field(repr=False)  # tokenizer.json, tokenizer_config.json, ...
    chat_template: str | None = field(repr=False)
    bos_id: int | None
    add_bos: bool  # whether prompts start with BOS
    eos_ids: list[int]  # every id that ends generation
    # GGUF sources only: HF tensor name -> GGUF type name ("Q4_1"), so an exporter can reuse the blocks.
    # Mind that the file stores llama q/k rows permuted (see `_unpermute`); `state_dict` has HF's order.
    gguf_tensor_types: dict[str, str] | None = field(default=None, repr=False)
    # GGUF matrices decoded exactly (sdk/blocks.py): Q4_0/Q4_1/Q4_K as Int4Blocks, Q5_0/Q5_1/Q5_K/Q6_K/Q8_0 as
    # Int8Blocks (rows in HF order), for exporters that can keep them; read when accessed, like `state_dict`.
    gguf_blocks: Mapping[str, CarriedBlocks] = field(default_factory=dict, repr=False)
    # BitNet b1.58 layer linears as exact ternary codes and scales (sdk/blocks.py), for a ternary preset: from a
    # Hugging Face checkpoint's packed weights or a GGUF's TQ1_0/TQ2_0 tensors; `state_dict` holds their product.
    ternary_blocks: Mapping[str, TernaryBlocks] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, name: str, source: str, config: ModelConfig, state_dict: Mapping[str, torch.Tensor],
           tokenizer: "TokenizerFiles", **gguf: Any) -> "Student":
        """A Student from what every loader has: weights and the tokenizer half (plus GGUF-only fields)."""
        return cls(name=name, source=source, config=config, state_dict=state_dict, tokenizer_files=tokenizer.files,
                   chat_template=tokenizer.chat_template, bos_id=tokenizer.bos_id, add_bos=tokenizer.add_bos,
                   eos_ids=tokenizer.eos_ids, **gguf)


@dataclass
class TokenizerFiles:
    """The tokenizer half of a Student."""

    files: dict[str, bytes]
    chat_template: str | None
    bos_id: int | None
    add_bos: bool
    eos_ids: list[int]



def config_from_hf(
    hf_config: dict[str, Any], where: str, names: dict[str, str] | None = None, fix: str = HF_CONFIG_FIX
) -> ModelConfig:
    """ModelConfig.from_hf with its errors placed: `where` the config came from, each key as it is spelled
    there (`names`: ModelConfig field -> key; config.json's own names by default)."""
    try:
        return ModelConfig.from_hf(hf_config)
    except KeyError as missing:
        raise EdgepackError(f"{where} lacks {missing}", "pass the config.json the checkpoint came with") from None
    except ConfigError as bad:
        raise EdgepackError(f"{where} has {bad.describe({**HF_KEYS, **(names or {})})}", fix) from None



def check_layout(config: ModelConfig, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Names and shapes against the module we will build, so a mismatch is found here and said plainly."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in CausalLM(config, max_context=1).state_dict().items()}
    if config.tie_word_embeddings:  # a stored copy of the shared matrix is allowed, not required
        expected.pop("lm_head.weight")
        shapes = {k: v for k, v in shapes.items() if k != "lm_head.weight"}
    missing = sorted(expected.keys() - shapes.keys())
    unexpected = sorted(shapes.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & shapes.keys() if tuple(shapes[k]) != expected[k])
    if missing:
        detail = f"missing {missing[:2]}"
    elif unexpected:
        detail = f"unexpected {unexpected[:2]}"
    elif wrong:
        detail = f"{wrong[0]} has shape {tuple(shapes[wrong[0]])}, the config says {expected[wrong[0]]}"
    else:
        return
    raise EdgepackError(
        f"the weights in {source} do not match its {config.architecture} config ({detail})",
        "pass an unmodified Llama, Qwen2 or BitNet checkpoint",
    )


def check_vocab(tokenizer_size: int, config: ModelConfig, source: str) -> None:
    """A tokenizer larger than the embedding would index past it at the first rare token."""
    if tokenizer_size > config.vocab_size:
        raise EdgepackError(
            f"the tokenizer in {source} has {tokenizer_size} tokens but the model embeds only {config.vocab_size}",
            "pass the tokenizer files that came with these weights",
        )


def token_ids(where: str, vocab: int, *candidates: tuple[str, Any]) -> list[int]:
    """Flatten (key, int / list / None) pairs into distinct ids, first seen first; each must name a token
    (0 <= id < vocab), or generation would index past the embedding or never stop."""
    ids: list[int] = []
    for key, candidate in candidates:
        for value in candidate if isinstance(candidate, list) else [candidate]:
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
                raise EdgepackError(
                    f"{where}: {key} = {short(value)} is not a token id (0 to {vocab - 1})",
                    "pass the tokenizer files that came with these weights",
                )
            if value not in ids:
                ids.append(value)
    return ids


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:  # a hostile nesting depth; json raises it rather than a ValueError
        raise EdgepackError(f"{path} is not valid JSON (nested too deeply)", "restore the original file") from None
    except (ValueError, OSError) as exc:
        raise EdgepackError(f"{path} is not valid JSON ({first_line(exc)})", "restore the original file") from None
    if not isinstance(value, dict):
        kind = {list: "an array", str: "a string", type(None): "null", bool: "a boolean"}.get(type(value), "a number")
        raise EdgepackError(f"{path} holds {kind}, not a JSON object", "restore the original file")
    return value


def starts_with_magic(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(4) == GGUF_MAGIC
    except OSError as exc:
        raise EdgepackError(f"cannot read {path} ({first_line(exc)})", "check the path and its permissions") from None


def short(value: Any, limit: int = 40) -> str:
    """A value from a file as a message shows it: repr, on one line, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_line(exc: BaseException) -> str:
    """An exception's message squeezed onto one line, for embedding in an EdgepackError."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
