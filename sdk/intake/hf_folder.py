"""Hugging Face checkpoint folders: config.json, safetensors weights (memory-mapped, read tensor by tensor),
tokenizer.json and tokenizer_config.json."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from edgepack.errors import EdgepackError
from edgepack.intake.bitnet import bitnet_form
from edgepack.intake.common import (
    Student,
    TokenizerFiles,
    check_layout,
    check_vocab,
    config_from_hf,
    first_line,
    read_json,
    token_ids,
)
from edgepack.intake.weights import LazyWeights
from edgepack.model import ModelConfig

FOLDER_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")


def load_folder(folder: Path, source: str | None = None, name: str | None = None) -> Student:
    """A Hugging Face checkpoint folder: config.json, safetensors weights, tokenizer.json."""
    source = source or str(folder)
    if not (folder / "config.json").is_file():
        raise EdgepackError(
            f"folder {folder} has no config.json",
            "pass a Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json) or a .gguf file",
        )
    hf_config = read_json(folder / "config.json")
    where = f"config.json in {folder}"
    config = config_from_hf(hf_config, where)
    bitnet = bitnet_form(hf_config, where)  # None unless the linears are stored as BitNet's ternary forms
    weight_files = _safetensors_files(folder)
    shapes, dtypes = _safetensors_headers(weight_files)
    check_layout(config, bitnet.logical_shapes(shapes, dtypes) if bitnet else shapes, source)
    tokenizer = _folder_tokenizer(folder, hf_config, config, source)
    state_dict = _lazy_safetensors(weight_files, skip={"lm_head.weight"} if config.tie_word_embeddings else set())
    if bitnet is None:
        return Student.of(name or folder.resolve().name, source, config, state_dict, tokenizer)
    state_dict, ternary = bitnet.weights(state_dict, dtypes)
    return Student.of(name or folder.resolve().name, source, config, state_dict, tokenizer, ternary_blocks=ternary)




def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = [folder / shard for shard in sorted(set((read_json(index).get("weight_map") or {}).values()))]
        absent = [f.name for f in files if not f.is_file()]
        if not files or absent:
            raise EdgepackError(
                f"{index} names shards that are not in the folder ({', '.join(absent[:3]) or 'none listed'})",
                "download every model-*.safetensors shard next to the index",
            )
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        raise EdgepackError(
            f"folder {folder} holds only PyTorch .bin weights, and edgepack reads safetensors only "
            "(loading .bin files runs pickle)",
            f"convert once with AutoModelForCausalLM.from_pretrained('{folder}').save_pretrained(OUT_DIR), "
            "which writes model.safetensors, and copy the tokenizer files to OUT_DIR",
        )
    raise EdgepackError(f"folder {folder} has no *.safetensors weights", "pass a complete checkpoint folder")


def _safetensors_headers(files: list[Path]) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Names, shapes and dtypes ("F32", "U8"...) from the headers alone, so a mismatched checkpoint is rejected
    before it is read."""
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    for reader in _open_safetensors(files):
        for key in reader.keys():
            if not _ignored(key):
                found = reader.get_slice(key)
                shapes[key], dtypes[key] = tuple(found.get_shape()), found.get_dtype()
    return shapes, dtypes


def _lazy_safetensors(files: list[Path], skip: set[str]) -> LazyWeights[torch.Tensor]:
    """Every tensor by name, read (and widened to float32) from its memory-mapped file when accessed.
    `skip`: names not to expose (a tied checkpoint may store the shared matrix a second time)."""
    where: dict[str, Path] = {}
    for file, reader in zip(files, _open_safetensors(files)):
        where.update({key: file for key in reader.keys() if not _ignored(key) and key not in skip})
    return LazyWeights({key: (lambda key=key, file=file: _read_tensor(file, key)) for key, file in where.items()})


def _read_tensor(file: Path, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as reader:
        tensor = reader.get_tensor(key)
    return tensor.float() if tensor.is_floating_point() else tensor


def _open_safetensors(files: list[Path]) -> Iterator[Any]:
    """Each file's reader in turn; a damaged header is an EdgepackError naming the file."""
    from safetensors import SafetensorError, safe_open

    for file in files:
        try:
            reader = safe_open(str(file), framework="pt")
        except (SafetensorError, OSError) as exc:
            raise EdgepackError(f"cannot read {file} ({first_line(exc)})", "re-download the checkpoint") from None
        with reader:
            yield reader


def _ignored(name: str) -> bool:
    """Buffers older transformers versions saved that hold no weights (recomputed from the config)."""
    return name.endswith("rotary_emb.inv_freq")


def _folder_tokenizer(folder: Path, hf_config: dict[str, Any], config: ModelConfig, source: str) -> TokenizerFiles:
    for required in ("tokenizer.json", "tokenizer_config.json"):
        if not (folder / required).is_file():
            raise EdgepackError(
                f"folder {folder} has no {required}",
                "save the tokenizer next to the weights: "
                f"AutoTokenizer.from_pretrained(...).save_pretrained('{folder}')",
            )
    files = {name: (folder / name).read_bytes() for name in FOLDER_TOKENIZER_FILES if (folder / name).is_file()}
    tok_config = read_json(folder / "tokenizer_config.json")
    gen_config = read_json(folder / "generation_config.json") if "generation_config.json" in files else {}
    tokenizer = _fast_tokenizer(files["tokenizer.json"], folder)
    check_vocab(tokenizer.get_vocab_size(with_added_tokens=True), config, source)

    where = f"the tokenizer files in {folder}"
    bos_id = _token_id(tokenizer, tok_config.get("bos_token"))
    if bos_id is None:
        bos = gen_config.get("bos_token_id", hf_config.get("bos_token_id"))
        bos_id = next(iter(token_ids(where, config.vocab_size, ("bos_token_id", bos))), None)
    add_bos = tok_config.get("add_bos_token")
    if add_bos is None:  # no flag: believe what the tokenizer itself does
        add_bos = bos_id is not None and tokenizer.encode("a").ids[:1] == [bos_id]
    eos_ids = token_ids(
        where,
        config.vocab_size,
        ("eos_token_id", gen_config.get("eos_token_id")),
        ("eos_token_id", hf_config.get("eos_token_id")),
        ("eos_token", _token_id(tokenizer, tok_config.get("eos_token"))),
    )
    return TokenizerFiles(files, _folder_chat_template(files, tok_config), bos_id, bool(add_bos), eos_ids)


def _fast_tokenizer(tokenizer_json: bytes, folder: Path) -> Any:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(tokenizer_json.decode("utf-8"))
    except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
        raise EdgepackError(
            f"{folder / 'tokenizer.json'} is not a valid fast-tokenizer file ({first_line(exc)})",
            "re-save it with AutoTokenizer.save_pretrained",
        ) from None


def _token_id(tokenizer: Any, token: str | dict[str, Any] | None) -> int | None:
    """tokenizer_config.json spells special tokens as strings or as serialized AddedToken dicts."""
    content = token.get("content") if isinstance(token, dict) else token
    return tokenizer.token_to_id(content) if isinstance(content, str) and content else None


def _folder_chat_template(files: dict[str, bytes], tok_config: dict[str, Any]) -> str | None:
    """chat_template.jinja wins over tokenizer_config.json, as in transformers; named templates pick 'default'."""
    if "chat_template.jinja" in files:
        return files["chat_template.jinja"].decode("utf-8")
    template = tok_config.get("chat_template")
    if isinstance(template, list):
        return {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
    return template

