"""The fp32 reference's side of the quality gate, computed once and replayed for many bundles.

Every bundle of a release matrix (sdk/matrix.py) is gated against the same fp32 model on the same text: its
logits under teacher forcing and its greedy replies do not depend on the bundle. The matrix records them once
(`record_reference`), writes them to one file, and each cell's gate replays them instead of building and
running the fp32 model again. Anything the recording lacks (another context length, another prefill chunk,
other windows) falls back to the real reference, so a replayed gate computes exactly what a fresh one does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from edgepack.progress import SILENT, Steps


@dataclass
class RecordedReference:
    """The reference's logits per scored window and its greedy token ids per prompt, for one context length
    and prefill chunk (what the reference session is built with)."""

    context_length: int
    max_prefill: int
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    replies: dict[str, list[int]] = field(default_factory=dict)

    def matches(self, manifest: Mapping[str, Any]) -> bool:
        prefill = manifest["backend"].get("max_prefill") or 128
        return int(manifest["context_length"]) == self.context_length and int(prefill) == self.max_prefill

    def replay(self, manifest: Mapping[str, Any], tokenizer: Any, real: Callable[[], Any]) -> Any:
        """A reference for the gate of the bundle `manifest` describes: the recording where it applies, the real
        session (`real()`, built only if asked) for anything else."""
        if not self.matches(manifest):
            return real()
        return _Replayed(self, tokenizer, real)

    def save(self, path: Path) -> Path:
        """One .npz file: the logits arrays and, as a JSON string, everything else."""
        meta = {"context_length": self.context_length, "max_prefill": self.max_prefill, "replies": self.replies}
        arrays = {f"score_{key}": value for key, value in self.scores.items()}
        with open(path, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
        return path

    @classmethod
    def load(cls, path: Path) -> "RecordedReference":
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
            scores = {name.removeprefix("score_"): data[name] for name in data.files if name.startswith("score_")}
        return cls(meta["context_length"], meta["max_prefill"], scores, meta["replies"])


def _ids_key(token_ids: Sequence[int] | np.ndarray) -> str:
    return hashlib.sha256(np.asarray(token_ids, dtype=np.int64).tobytes()).hexdigest()


def reply_key(messages: Sequence[Mapping[str, str]], options: Mapping[str, Any]) -> str:
    return json.dumps([list(messages), dict(sorted(options.items()))], sort_keys=True)


class _Recorder:
    """Wraps the real reference session and keeps every answer it gives (`score`, greedy `complete`)."""

    def __init__(self, session: Any, recording: RecordedReference) -> None:
        self.session, self.recording = session, recording
        self.tokenizer, self.max_context = session.tokenizer, session.max_context

    def score(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        key = _ids_key(token_ids)
        if key not in self.recording.scores:
            self.recording.scores[key] = np.asarray(self.session.score(token_ids))
        return self.recording.scores[key]

    def prompt_ids(self, messages: Any, chat: bool = True) -> tuple[str, list[int]]:
        return self.session.prompt_ids(messages, chat)

    def complete(self, messages: Sequence[Mapping[str, str]], **options: Any) -> Any:
        key = reply_key(messages, options)
        if key not in self.recording.replies:
            self.recording.replies[key] = list(self.session.complete(list(messages), **options).token_ids)
        return SimpleNamespace(token_ids=self.recording.replies[key])


class _Replayed:
    """What the gate asks of its reference, answered from the recording; the real session is built on the first
    question the recording cannot answer."""

    def __init__(self, recording: RecordedReference, tokenizer: Any, real: Callable[[], Any]) -> None:
        self.recording, self.tokenizer, self._real_factory = recording, tokenizer, real
        self.max_context = recording.context_length
        self._real: Any = None

    def _session(self) -> Any:
        if self._real is None:
            self._real = self._real_factory()
        return self._real

    def score(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        found = self.recording.scores.get(_ids_key(token_ids))
        return found if found is not None else self._session().score(token_ids)

    def complete(self, messages: Sequence[Mapping[str, str]], **options: Any) -> Any:
        found = self.recording.replies.get(reply_key(messages, options))
        if found is not None:
            return SimpleNamespace(token_ids=found)
        return self._session().complete(list(messages), **options)


def record_reference(student: Any, context_length: int, max_prefill: int, step: Steps = SILENT) -> RecordedReference:
    """Run the fp32 reference through what `verify.verify_bundle` asks of it for a bundle of `context_length`
    (default text and token count), recording every answer. The recorder stands in for the bundle too: its
    second answer to each question is the recorded one, so this costs one reference pass."""
    from edgepack.evaltext import load_text
    from edgepack.verify import CHAT_PROMPTS, DEFAULT_EVAL_TOKENS, _reference_session, compare_greedy, teacher_forcing

    manifest = {"context_length": context_length, "backend": {"max_prefill": max_prefill}}
    step(f"fp32 reference once for the gate (context {context_length})")
    recording = RecordedReference(context_length, max_prefill)
    recorder = _Recorder(_reference_session(student, manifest), recording)
    text, _ = load_text(None)
    ids = recorder.tokenizer.encode(text)[: DEFAULT_EVAL_TOKENS + 1]
    teacher_forcing(recorder, recorder, ids, window=recorder.max_context)
    for messages in CHAT_PROMPTS:
        compare_greedy(recorder, recorder, messages)
    return recording
