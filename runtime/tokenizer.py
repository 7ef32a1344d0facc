"""Text <-> token ids for a bundle, with the `tokenizers` library and jinja2 only (no transformers at runtime).

Why not transformers: an app shipping a bundle should not need it, and its import alone costs seconds. The
chat template is rendered the way `transformers`' `apply_chat_template` does (same jinja environment,
same variables), so a prompt tokenizes to the ids the model was trained on.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from edgepack.errors import EdgepackError

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
            config = json.loads(Path(config_file).read_text(encoding="utf-8"))
        template = None
        if chat_template_file is not None:
            _require_file(Path(chat_template_file))
            template = Path(chat_template_file).read_text(encoding="utf-8")
        return cls(Tokenizer.from_file(str(tokenizer_file)), config=config, chat_template=template, **ids)

    @classmethod
    def from_bundle(cls, bundle_dir: Path, manifest: Mapping[str, Any]) -> "BundleTokenizer":
        """Build from a bundle's `tokenizer` manifest section (file names are relative to the bundle)."""
        bundle_dir = Path(bundle_dir)
        info = manifest.get("tokenizer") or {}
        if not info.get("file"):
            raise EdgepackError("the bundle's manifest names no tokenizer file", "re-export the bundle")
        config_file = info.get("config_file")
        template_file = info.get("chat_template_file")
        return cls.from_files(
            bundle_dir / info["file"],
            bundle_dir / config_file if config_file else None,
            bundle_dir / template_file if template_file else None,
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

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The conversation as the prompt text the model expects (its chat template, else a plain fallback)."""
        if not self.chat_template:
            return _plain_prompt(messages, add_generation_prompt)
        import jinja2

        try:
            return compile_chat_template(self.chat_template).render(
                messages=[dict(m) for m in messages],
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens(),
            )
        except jinja2.TemplateError as e:
            raise EdgepackError(
                f"the bundle's chat template rejected the conversation ({e})",
                "check the message roles and their order (e.g. system first, user and assistant alternating)",
            ) from None

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


@lru_cache(maxsize=8)
def compile_chat_template(template: str) -> Any:
    """A jinja2 template in the environment `transformers` renders chat templates in.

    Sandboxed because templates come from model repositories (untrusted); trim/lstrip blocks and the
    `raise_exception`, `strftime_now` globals and `tojson` filter are what templates on the Hub rely on.
    """
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; render the body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        # Jinja's own tojson escapes HTML characters, which would change the prompt.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise EdgepackError(f"the bundle's chat template does not parse ({e})", "re-export the bundle") from None


def _template_from_config(config: Mapping[str, Any]) -> str | None:
    """tokenizer_config.json's `chat_template`: a string, or a list of named templates (use "default")."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def _plain_prompt(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> str:
    """No chat template (a base model): one user message is the prompt as it is, else a role-labelled transcript."""
    if len(messages) == 1 and messages[0].get("role") == "user":
        return str(messages[0].get("content", ""))
    lines = [f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages]
    if add_generation_prompt:
        lines.append("assistant:")
    return "\n".join(lines)


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise EdgepackError(f"tokenizer file {path} is missing", "re-export the bundle")
