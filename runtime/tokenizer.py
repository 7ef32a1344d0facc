"""Text <-> token ids for a bundle, with the `tokenizers` library and jinja2 only (no transformers at runtime).

Why not transformers: an app shipping a bundle should not need it, and its import alone costs seconds. The
chat template is rendered the way `transformers`' `apply_chat_template` does (same jinja environment,
same variables), so a prompt tokenizes to the ids the model was trained on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from edgepack.errors import EdgepackError, UsageError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
# Special-token names in tokenizer_config.json that HF passes to chat templates as variables.
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class BundleTokenizer:
    """A `tokenizers.Tokenizer` plus what the bundle says about BOS, stop tokens and the chat template."""

    def __init__(
        self,
        tokenizer: "Tokenizer",
        *,
        config: Mapping[str, Any] | None = None,
        chat_template: str | None = None,
        bos_id: int | None = None,
        add_bos: bool = False,
        eos_ids: Iterable[int] = (),
        stop_ids: Iterable[int] = (),
    ) -> None:
        self.tokenizer = tokenizer
        self.config = dict(config or {})
        self.chat_template = chat_template or _template_from_config(self.config)
        self.bos_id = bos_id
        self.add_bos = add_bos and bos_id is not None
        self.eos_ids = tuple(int(i) for i in eos_ids)
        self.stop_ids = tuple(int(i) for i in stop_ids)

    @classmethod
    def from_files(
        cls,
        tokenizer_file: Path,
        config_file: Path | None = None,
        chat_template_file: Path | None = None,
        **ids: Any,
    ) -> "BundleTokenizer":
        """Load tokenizer.json (+ tokenizer_config.json, chat template); `ids` are the keyword ids of __init__."""
        from tokenizers import Tokenizer

        tokenizer_file = Path(tokenizer_file)
        _require_file(tokenizer_file)
        config: dict[str, Any] = {}
        if config_file is not None and Path(config_file).is_file():
            config = _read_config(Path(config_file))
        template = None
        if chat_template_file is not None:
            _require_file(Path(chat_template_file))
            template = _read_text(Path(chat_template_file), "chat template")
        text = _read_text(tokenizer_file, "tokenizer")
        try:
            tokenizer = Tokenizer.from_str(text)
        except Exception as e:  # noqa: BLE001 - the Rust library raises plain Exceptions
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise EdgepackError(
                f"the tokenizer file {tokenizer_file} is not a Hugging Face tokenizer ({detail})",
                "re-export the bundle",
            ) from None
        return cls(tokenizer, config=config, chat_template=template, **ids)

    @classmethod
    def from_bundle(cls, bundle_dir: Path, manifest: Mapping[str, Any]) -> "BundleTokenizer":
        """Build from a bundle's `tokenizer` manifest section (file names are relative to the bundle)."""
        bundle_dir = Path(bundle_dir)
        info = manifest.get("tokenizer") or {}
        if not info.get("file"):
            raise EdgepackError("the bundle's manifest names no tokenizer file", "re-export the bundle")
        config_file = info.get("config_file")
        template_file = info.get("chat_template_file")
        from edgepack.bundle import bundle_file

        return cls.from_files(
            bundle_file(bundle_dir, manifest, info["file"]),
            bundle_file(bundle_dir, manifest, config_file) if config_file else None,
            bundle_file(bundle_dir, manifest, template_file) if template_file else None,
            bos_id=info.get("bos_id"),
            add_bos=bool(info.get("add_bos", False)),
            eos_ids=info.get("eos_ids") or (),
            stop_ids=info.get("stop_ids") or (),
        )

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def end_ids(self) -> frozenset[int]:
        """Every id that ends generation (EOS and the template's turn-end tokens)."""
        return frozenset(self.eos_ids) | frozenset(self.stop_ids)

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids; `add_special` prepends BOS when the bundle says the model expects it.

        The tokenizer's own post-processor is bypassed so that BOS is added exactly once, by the manifest's
        rule: a rendered chat template already carries its BOS as text, so pass add_special=False for it.
        """
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_special and self.add_bos and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special)

    def render_chat(self, messages: Iterable[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The conversation as the prompt text the model expects (its chat template, else a plain fallback).

        Messages are checked first (a mapping with a string role and string content each), so that the
        template only ever sees what `transformers` would pass it; the template runs in a bounded sandbox."""
        checked = check_messages(messages)
        if not self.chat_template:
            return _plain_prompt(checked, add_generation_prompt)
        from edgepack.runtime.chat_template import render

        variables = dict(
            messages=checked, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
            **self.special_tokens(),
        )
        return render(self.chat_template, variables, len(checked), sum(len(m["content"]) for m in checked))

    def special_tokens(self) -> dict[str, str]:
        """bos_token, eos_token, ... as strings, as HF passes them to chat templates."""
        extra = self.config.get("extra_special_tokens")
        keys = [*_SPECIAL_TOKEN_KEYS, *(extra if isinstance(extra, dict) else {})]
        found = {}
        for key in keys:
            value = self.config.get(key, extra.get(key) if isinstance(extra, dict) else None)
            if isinstance(value, dict):  # serialized AddedToken
                value = value.get("content")
            if isinstance(value, str):
                found[key] = value
        return found

    def detokenizer(self, skip_special: bool = True) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self, skip_special)


class IncrementalDetokenizer:
    """Text for a growing list of ids, emitted only once it is stable.

    Decoding token by token breaks in two ways: a byte-level BPE token can hold part of a multi-byte UTF-8
    character (it decodes to U+FFFD until the rest arrives), and SentencePiece-style decoders drop a leading
    space at the start of a decode. So each step decodes a small window that starts a few tokens back
    (`prefix`) and emits only what the window adds beyond the prefix, holding back while it ends in U+FFFD.
    """

    def __init__(self, tokenizer: BundleTokenizer, skip_special: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special
        self.ids: list[int] = []
        self._prefix_offset = 0  # window start: tokens already emitted, kept as decoding context
        self._read_offset = 0  # tokens before this have been emitted as text

    def push(self, token_id: int) -> str:
        """Add one id; return the newly stable text (possibly empty)."""
        self.ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back (e.g. a character the stream ended in the middle of)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix = self._tok.decode(self.ids[self._prefix_offset : self._read_offset], self._skip)
        window = self._tok.decode(self.ids[self._prefix_offset :], self._skip)
        if len(window) <= len(prefix) or (window.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        return window[len(prefix) :]


def _template_from_config(config: Mapping[str, Any]) -> str | None:
    """tokenizer_config.json's `chat_template`: a string, or a list of named templates (use "default")."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t["template"] for t in template
                 if isinstance(t, dict) and isinstance(t.get("template"), str)}  # fmt: skip
        return named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def _plain_prompt(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> str:
    """No chat template (a base model): one user message is the prompt as it is, else a role-labelled transcript."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    if add_generation_prompt:
        lines.append("assistant:")
    return "\n".join(lines)


_MESSAGE_FIX = 'pass messages like {"role": "user", "content": "Hello"}'


def check_messages(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The conversation as plain dicts, or a UsageError naming the first bad message and what is wrong."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Iterable):
        raise UsageError(f"the conversation is {kind_of(messages)}, not a list of messages", _MESSAGE_FIX)
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise UsageError(f"message {i} is {kind_of(message)}, not a mapping with a role and content", _MESSAGE_FIX)
        for key in ("role", "content"):
            value = message.get(key)
            if value is None:
                raise UsageError(f"message {i} has no {key}", _MESSAGE_FIX)
            if not isinstance(value, str):
                raise UsageError(f"message {i}'s {key} is {kind_of(value)}, not a string", _MESSAGE_FIX)
            check_text(value, f"message {i}'s {key}")
        if not message["role"]:
            raise UsageError(f"message {i}'s role is empty", 'use a role such as "system", "user" or "assistant"')
        checked.append(dict(message))
    if not checked:
        raise UsageError("the conversation has no messages", _MESSAGE_FIX)
    return checked


def check_text(text: str, what: str) -> None:
    """Refuse text that cannot be encoded: a lone surrogate, e.g. an invalid UTF-8 byte from the command line
    (Python decodes argv with surrogateescape), would make the tokenizer fail."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        origin = f", the invalid UTF-8 byte 0x{code - 0xDC00:02X}" if 0xDC80 <= code <= 0xDCFF else ""
        raise UsageError(
            f"{what} is not valid text: character {e.start} is a lone surrogate (U+{code:04X}{origin})",
            "pass UTF-8 text",
        ) from None


def kind_of(value: Any) -> str:
    """'a list', 'an int', 'None': how an error names what was passed instead."""
    if value is None:
        return "None"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise EdgepackError(f"tokenizer file {path} is missing", "re-export the bundle")


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        problem, fix = f"the {what} file {path} is not UTF-8 text (byte {e.start})", "re-export the bundle"
    except OSError as e:
        problem, fix = f"cannot read the {what} file {path} ({e.strerror})", "check the bundle's permissions"
    raise EdgepackError(problem, fix)


def _read_config(path: Path) -> dict[str, Any]:
    """tokenizer_config.json: a JSON object, or one clear error."""
    text = _read_text(path, "tokenizer config")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise EdgepackError(f"the tokenizer config {path} is not valid JSON ({e})", "re-export the bundle") from None
    if not isinstance(config, dict):
        raise EdgepackError(
            f"the tokenizer config {path} holds {kind_of(config)}, not a JSON object", "re-export the bundle"
        )
    return config
