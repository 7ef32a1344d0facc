"""The chat template as data an app can apply without a Jinja engine, and a standard tokenizer_config.json.

Apps on ExecuTorch's runner, onnxruntime-genai or Core ML take a raw prompt string: they must format the
conversation themselves, and few of them embed Jinja. Nearly every chat template of the Llama and Qwen2
families is, underneath, "an optional default system message, then per message role-prefix + content +
role-suffix, then a generation prompt". `derive_chat_format` finds those pieces by rendering the template with
sentinel contents, then checks that the pieces rebuild the Jinja rendering of several conversations exactly
(with and without a system message, one and several turns). A template that cannot be expressed this way is
marked `expressible: false` with the reason, and apps must render the Jinja template for it.

What an app does with the manifest's `tokenizer.chat_format` (see `apply_chat_format`):

    text = start
    if default_system is not null and the first message is not a system message:
        prepend {"role": "system", "content": default_system}
    for each message:
        content = message content; if drop_thinking and role is assistant: content = content.split(think end)[-1]
        text += roles[role].prefix + (content.strip() if trim_content else content) + roles[role].suffix
    if a reply is wanted: text += generation_prompt
    ids = tokenize(text) with special tokens parsed and no BOS added (the text already carries it)
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

ROLES = ("system", "user", "assistant")
_SENTINELS = {"S": "\u2063S1\u2063", "U": "\u2063U1\u2063", "A": "\u2063A1\u2063", "V": "\u2063U2\u2063"}
Renderer = Callable[[Sequence[Mapping[str, Any]], bool], str]
# Conversations the derived format must rebuild exactly: with/without system message, single and multi-turn.
CHECK_CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one?"}],
    [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Bonjour !"}, {"role": "user", "content": "How are you?\nSay it twice."},
     {"role": "assistant", "content": "Ça va. Ça va."}, {"role": "user", "content": "Thanks"}],
    [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n5"},
     {"role": "user", "content": "and 2+4?"}],
]
THINK_END = "</think>"


def derive_chat_format(render: Renderer) -> dict[str, Any]:
    """`render(messages, add_generation_prompt)` is the model's Jinja template; returns the manifest section."""
    try:
        fmt = _derive(render)
    except (ValueError, KeyError) as e:
        return {"expressible": False, "reason": str(e)}
    except Exception as e:  # noqa: BLE001 - the template itself refused a probe conversation
        return {"expressible": False, "reason": f"the template refused a probe conversation ({e})"}
    checked = 0
    for messages in CHECK_CONVERSATIONS:
        for generation in (True, False):
            expected = render(messages, generation)
            if apply_chat_format(fmt, messages, generation) != expected:
                return {"expressible": False, "reason": f"prefix/suffix pieces do not rebuild {messages!r}"}
            checked += 1
    return {"expressible": True, **fmt, "checked_conversations": checked}


def apply_chat_format(fmt: Mapping[str, Any], messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> str:
    """The prompt text from the data form (what an app without Jinja does; see the module docstring)."""
    messages = list(messages)
    if fmt.get("default_system") is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": fmt["default_system"]}, *messages]
    parts = [fmt["start"]]
    for message in messages:
        role = fmt["roles"][message["role"]]
        content = str(message["content"])
        if fmt.get("drop_thinking") and message["role"] == "assistant":
            content = content.split(THINK_END)[-1]
        parts += [role["prefix"], content.strip() if fmt.get("trim_content") else content, role["suffix"]]
    if add_generation_prompt:
        parts.append(fmt["generation_prompt"])
    return "".join(parts)


def _derive(render: Renderer) -> dict[str, Any]:
    S, U, A, V = (_SENTINELS[k] for k in "SUAV")
    full = render(_conversation("system", S, "user", U, "assistant", A, "user", V), True)
    seg = _split(full, [S, U, A, V])  # 5 segments around the 4 sentinels
    user_suffix = _split(render(_conversation("system", S, "user", U, "assistant", A, "user", V), False),
                         [S, U, A, V])[4]
    if not seg[4].startswith(user_suffix):
        raise ValueError("the generation prompt does not follow the last user turn")
    assistant_suffix = _split(render(_conversation("user", U, "assistant", A), False), [U, A])[2]
    generation_prompt = seg[4][len(user_suffix):]
    assistant_prefix = _strip_prefix(seg[2], user_suffix, "user suffix before the assistant turn")
    user_prefix = _strip_prefix(seg[3], assistant_suffix, "assistant suffix before the next user turn")
    system_suffix = _strip_suffix(seg[1], user_prefix, "user prefix after the system turn")
    head = _split(render(_conversation("user", U), False), [U])[0]  # start [+ default system block] + user prefix
    head = _strip_suffix(head, user_prefix, "user prefix of a conversation without a system message")
    if seg[0].startswith(head):  # no default system message: head is the start
        start, system_prefix, default_system = head, seg[0][len(head):], None
    elif head.startswith(seg[0]) and head.endswith(system_suffix):  # a default system message is inserted
        start, system_prefix = "", seg[0]
        default_system = head[len(seg[0]) : len(head) - len(system_suffix)]
    else:
        raise ValueError("the start of a conversation without a system message is not a default system turn")
    trimmed = render([{"role": "user", "content": f"  {U}  "}], False) == render(_conversation("user", U), False)
    # Reasoning templates (DeepSeek-R1) keep only what follows </think> of earlier replies.
    thought = render(_conversation("user", U, "assistant", f"{S}{THINK_END}{A}"), False)
    drop_thinking = S not in thought and A in thought
    return {
        "start": start,
        "default_system": default_system,
        "roles": {
            "system": {"prefix": system_prefix, "suffix": system_suffix},
            "user": {"prefix": user_prefix, "suffix": user_suffix},
            "assistant": {"prefix": assistant_prefix, "suffix": assistant_suffix},
        },
        "generation_prompt": generation_prompt,
        "trim_content": trimmed,
        "drop_thinking": drop_thinking,
    }


def _conversation(*pairs: str) -> list[dict[str, str]]:
    return [{"role": pairs[i], "content": pairs[i + 1]} for i in range(0, len(pairs), 2)]


def _split(text: str, sentinels: list[str]) -> list[str]:
    """The text around each sentinel, which must appear once each, in order."""
    out, rest = [], text
    for sentinel in sentinels:
        if rest.count(sentinel) != 1:
            raise ValueError("message contents are not rendered once each, as given")
        before, rest = rest.split(sentinel)
        out.append(before)
    return [*out, rest]


def _strip_prefix(text: str, prefix: str, what: str) -> str:
    if not text.startswith(prefix):
        raise ValueError(f"the {what} differs between turns")
    return text[len(prefix):]


def _strip_suffix(text: str, suffix: str, what: str) -> str:
    if not text.endswith(suffix):
        raise ValueError(f"the {what} differs between turns")
    return text[: len(text) - len(suffix)]


# --- tokenizer_config.json as every consumer reads it -------------------------------------------------------

# Keys copied from the source's tokenizer_config.json when present; everything else (loader state such as
# `is_local`, `local_files_only`, transformers-5-only `backend`) is dropped.
_STANDARD_KEYS = ("added_tokens_decoder", "additional_special_tokens", "clean_up_tokenization_spaces",
                  "errors", "legacy", "padding_side", "split_special_tokens", "spaces_between_special_tokens")
# Class names that only one transformers release knows are replaced by the family's standard fast tokenizer.
_UNPORTABLE_CLASSES = {None, "", "TokenizersBackend"}
_FAMILY_CLASS = {"qwen2": "Qwen2TokenizerFast", "llama": "PreTrainedTokenizerFast"}


def standard_tokenizer_config(source: Mapping[str, Any], *, architecture: str, chat_template: str | None,
                              token_text: Callable[[int], str], bos_id: int | None, eos_ids: Sequence[int],
                              add_bos: bool, context_length: int) -> dict[str, Any]:
    """tokenizer_config.json that transformers, swift-transformers, onnxruntime-genai and ExecuTorch's HF
    tokenizer all read: a class name they know, the chat template inline, special tokens as plain strings.

    ExecuTorch's tokenizer (given the bundle folder) requires `bos_token` and `eos_token` to be strings naming
    special tokens, or it fails to load; a model without BOS (Qwen2) gets its end token there, with
    `add_bos_token: false` so nothing adds it to a prompt."""
    config = {k: source[k] for k in _STANDARD_KEYS if k in source}
    cls = source.get("tokenizer_class")
    config["tokenizer_class"] = _FAMILY_CLASS.get(architecture, "PreTrainedTokenizerFast") \
        if cls in _UNPORTABLE_CLASSES else cls
    eos = token_text(eos_ids[0])
    config["bos_token"] = token_text(bos_id) if bos_id is not None else eos
    config["eos_token"] = eos
    for key in ("pad_token", "unk_token"):
        value = source.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            config[key] = value
    config.setdefault("pad_token", eos)
    config["add_bos_token"] = bool(add_bos)
    config["add_eos_token"] = False
    config["model_max_length"] = context_length
    if chat_template:
        config["chat_template"] = chat_template
    return config
