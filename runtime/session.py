"""Generation above any backend: prompt -> ids -> chunked prefill -> sampled decode -> streamed text.

Everything a user sees about generation (sampling, stop handling, reasoning/answer split, speed stats)
lives here once, so every backend behaves the same and differs only in its `Decoder`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Mapping, Sequence

import numpy as np

from edgepack.errors import EdgepackError
from edgepack.runtime.backend import Decoder
from edgepack.runtime.tokenizer import BundleTokenizer

ChunkKind = Literal["answer", "thinking"]
StopReason = Literal["eos", "stop_string", "max_new_tokens", "context_full", "cancelled"]
Prompt = str | Sequence[Mapping[str, Any]]

DEFAULT_PREFILL_CHUNK = 128
DEFAULT_THINK_TAGS = ("<think>", "</think>")
_DEFAULT_GENERATION = {"max_new_tokens": 256, "temperature": 0.0, "top_p": 1.0, "top_k": 0}


@dataclass(frozen=True)
class Chunk:
    """A piece of streamed text; `kind` says whether it is reasoning (inside <think>) or the answer."""

    text: str
    kind: ChunkKind = "answer"


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    generated_tokens: int  # emitted tokens; a final EOS/stop token is not counted
    time_to_first_token_s: float  # from the generate() call to the first sampled token
    prefill_tokens_per_s: float
    decode_tokens_per_s: float  # one-token forward passes per second after the first token
    total_s: float
    stop_reason: StopReason


@dataclass(frozen=True)
class Result:
    text: str  # the answer, without reasoning
    thinking: str
    stats: GenerationStats
    token_ids: list[int] = field(repr=False)


@dataclass(frozen=True)
class Sampling:
    """temperature <= 0 is greedy; top_k <= 0 and top_p >= 1 switch those filters off."""

    temperature: float
    top_p: float
    top_k: int

    def pick(self, logits: np.ndarray, rng: np.random.Generator) -> int:
        if self.temperature <= 0:
            return int(np.argmax(logits))
        x = logits.astype(np.float64) / self.temperature
        if 0 < self.top_k < x.size:
            candidates = np.argpartition(-x, self.top_k - 1)[: self.top_k]
        else:
            candidates = np.arange(x.size)
        candidates = candidates[np.argsort(-x[candidates], kind="stable")]  # most likely first
        probs = np.exp(x[candidates] - x[candidates[0]])
        probs /= probs.sum()
        if self.top_p < 1.0:
            # Keep the smallest prefix whose mass reaches top_p (always at least the most likely token).
            keep = int(np.searchsorted(np.cumsum(probs), self.top_p)) + 1
            candidates, probs = candidates[:keep], probs[:keep]
        cdf = np.cumsum(probs)
        index = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
        return int(candidates[min(index, len(candidates) - 1)])


class StopStringMatcher:
    """Cuts a text stream before the first stop string, holding back text that may be the start of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self._pending = self._pending[: min(hits)], ""
            return out
        hold = max((_overlap(self._pending, s) for s in self.stops), default=0)
        out, self._pending = self._pending[: len(self._pending) - hold], self._pending[len(self._pending) - hold :]
        return out

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return "" if self.stopped else out


class ThinkSplitter:
    """Splits streamed text at <think>/</think> into "thinking" and "answer" chunks; tags are not emitted.

    A tag may arrive split over several tokens, so a tail that could begin a tag is held back. Whitespace
    right after a tag is dropped: templates and models put newlines there as formatting.
    """

    def __init__(self, start: str = DEFAULT_THINK_TAGS[0], end: str = DEFAULT_THINK_TAGS[1], inside: bool = False):
        self.start, self.end = start, end
        self.inside = inside
        self._buf = ""
        self._after_tag = inside

    def feed(self, text: str) -> list[Chunk]:
        self._buf += text
        out: list[Chunk] = []
        while self._buf:
            if self._after_tag:
                self._buf = self._buf.lstrip()
                if not self._buf:
                    break
                self._after_tag = False
            tag = self.end if self.inside else self.start
            at = self._buf.find(tag)
            if at >= 0:
                self._emit(out, self._buf[:at])
                self._buf = self._buf[at + len(tag) :]
                self.inside, self._after_tag = not self.inside, True
                continue
            hold = _overlap(self._buf, tag)
            self._emit(out, self._buf[: len(self._buf) - hold])
            self._buf = self._buf[len(self._buf) - hold :]
            break
        return out

    def flush(self) -> list[Chunk]:
        out: list[Chunk] = []
        self._emit(out, self._buf)
        self._buf = ""
        return out

    def _emit(self, out: list[Chunk], text: str) -> None:
        if text:
            out.append(Chunk(text, "thinking" if self.inside else "answer"))


def _overlap(text: str, pattern: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `pattern`."""
    for n in range(min(len(text), len(pattern) - 1), 0, -1):
        if pattern.startswith(text[-n:]):
            return n
    return 0


class Session:
    """Runs one bundle: `generate` streams chunks, `complete` returns the whole result, `score` teacher-forces.

    One conversation at a time: every call resets the decoder's cache and starts at position 0, so a
    generator must be finished (or dropped) before the next call on the same session.
    """

    def __init__(self, decoder: Decoder, tokenizer: BundleTokenizer, manifest: Mapping[str, Any] | None = None):
        manifest = manifest or {}
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.manifest = manifest
        given = {k: v for k, v in (manifest.get("generation") or {}).items() if v is not None}
        self.defaults = {**_DEFAULT_GENERATION, **given}
        think = (manifest.get("tokenizer") or {}).get("think") or {}
        self.think_tags = (think.get("start") or DEFAULT_THINK_TAGS[0], think.get("end") or DEFAULT_THINK_TAGS[1])
        limit = getattr(decoder, "max_prefill_chunk", None) or DEFAULT_PREFILL_CHUNK
        self.prefill_chunk = int(min(DEFAULT_PREFILL_CHUNK, limit))
        self.last_stats: GenerationStats | None = None
        self.last_token_ids: list[int] = []
        self._run: object | None = None

    @property
    def max_context(self) -> int:
        return int(self.decoder.max_context)

    def prompt_ids(self, prompt: Prompt, chat: bool = True) -> tuple[str, list[int]]:
        """The prompt as text and ids: messages (or a str with chat=True) through the chat template."""
        if isinstance(prompt, str) and not chat:
            return prompt, self.tokenizer.encode(prompt, add_special=True)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        text = self.tokenizer.render_chat(messages, add_generation_prompt=True)
        # A rendered template carries its own BOS text; the plain fallback is raw text and gets one added.
        return text, self.tokenizer.encode(text, add_special=not self.tokenizer.chat_template)

    def generate(
        self,
        prompt: Prompt,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        chat: bool = True,
    ) -> Iterator[Chunk]:
        """Stream the reply as chunks. The prompt is checked now; the work happens as chunks are pulled."""
        started = time.perf_counter()
        text, ids = self.prompt_ids(prompt, chat)
        self._check_fits(len(ids))
        sampling = Sampling(
            temperature=float(self._pick(temperature, "temperature")),
            top_p=float(self._pick(top_p, "top_p")),
            top_k=int(self._pick(top_k, "top_k")),
        )
        budget = int(self._pick(max_new_tokens, "max_new_tokens"))
        inside_think = text.rstrip().endswith(self.think_tags[0])
        return self._stream(ids, budget, sampling, np.random.default_rng(seed), stop or (), inside_think, started)

    def complete(self, prompt: Prompt, **options: Any) -> Result:
        """`generate` run to the end, joined; options are generate's keyword arguments."""
        answer: list[str] = []
        thinking: list[str] = []
        for chunk in self.generate(prompt, **options):
            (thinking if chunk.kind == "thinking" else answer).append(chunk.text)
        assert self.last_stats is not None
        return Result("".join(answer), "".join(thinking).strip(), self.last_stats, list(self.last_token_ids))

    def score(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Logits [N, vocab] for every position of `token_ids` (teacher forcing, fed in prefill chunks)."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.size > self.max_context:
            raise EdgepackError(
                f"{ids.size} tokens do not fit the bundle's context of {self.max_context}",
                "score a shorter sequence",
            )
        self.decoder.reset()
        step = self.prefill_chunk
        rows = [self.decoder.forward(ids[i : i + step], i) for i in range(0, ids.size, step)]
        return np.concatenate(rows, axis=0) if rows else np.zeros((0, self.decoder.vocab_size), np.float32)

    def _pick(self, value: Any, key: str) -> Any:
        return self.defaults[key] if value is None else value

    def _check_fits(self, n: int) -> None:
        if n == 0:
            raise EdgepackError("the prompt is empty", "pass some text")
        if n + 1 > self.max_context:
            raise EdgepackError(
                f"prompt is {n} tokens but the bundle's context is {self.max_context}",
                f"shorten the prompt or re-export with --max-context {_next_power_of_two(n + 1)} or more",
            )

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Start over and feed the prompt as generation does; returns its last position's logits
        (benchmarks and `edgepack profile` time exactly this)."""
        self.decoder.reset()
        return self._prefill(ids)

    def decode_step(self, token: int, pos: int) -> np.ndarray:
        """One generated token at `pos`; returns its logits."""
        return self.decoder.forward(np.array([token], np.int64), pos)[-1]

    def _prefill(self, ids: list[int]) -> np.ndarray:
        """Feed the prompt in chunks; return the logits of its last position."""
        tokens = np.asarray(ids, dtype=np.int64)
        logits = None
        for i in range(0, tokens.size, self.prefill_chunk):
            logits = self.decoder.forward(tokens[i : i + self.prefill_chunk], i)
        assert logits is not None
        return logits[-1]

    def _stream(
        self,
        ids: list[int],
        budget: int,
        sampling: Sampling,
        rng: np.random.Generator,
        stops: Sequence[str],
        inside_think: bool,
        started: float,
    ) -> Iterator[Chunk]:
        clock = _Clock(started, prompt_tokens=len(ids))
        generated: list[int] = []
        run = self._run = object()  # an abandoned older stream must not overwrite this one's stats
        self.last_stats, self.last_token_ids = None, generated
        detok = self.tokenizer.detokenizer()
        matcher = StopStringMatcher(stops)
        splitter = ThinkSplitter(*self.think_tags, inside=inside_think)
        end_ids = self.tokenizer.end_ids
        reason: StopReason | None = None
        finished = False
        try:
            logits = self.prefill(ids)
            clock.prefill_done()
            pos = len(ids)
            while len(generated) < budget:
                token = sampling.pick(logits, rng)
                clock.token()
                if token in end_ids:
                    reason = "eos"
                    break
                generated.append(token)
                yield from splitter.feed(matcher.feed(detok.push(token)))
                if matcher.stopped:
                    reason = "stop_string"
                    break
                if len(generated) >= budget:
                    break
                if pos >= self.max_context:
                    reason = "context_full"
                    break
                step_start = time.perf_counter()
                logits = self.decoder.forward(np.array([token], np.int64), pos)[-1]
                clock.decoded(time.perf_counter() - step_start)
                pos += 1
            if not matcher.stopped:
                tail = matcher.feed(detok.flush())
                reason = "stop_string" if matcher.stopped else reason
                yield from splitter.feed(tail + matcher.flush())
            yield from splitter.flush()
            finished = True
        finally:
            # A consumer that stops pulling chunks (break, Ctrl-C) closes the generator: "cancelled".
            if self._run is run:
                self.last_stats = clock.stats(len(generated), (reason or "max_new_tokens") if finished else "cancelled")


class _Clock:
    """Times the phases of one generation."""

    def __init__(self, started: float, prompt_tokens: int) -> None:
        self.started, self.prompt_tokens = started, prompt_tokens
        self.prefill_start = time.perf_counter()
        self.prefill_s = 0.0
        self.first_token_at: float | None = None
        self.decode_s = 0.0
        self.decode_steps = 0

    def prefill_done(self) -> None:
        self.prefill_s = time.perf_counter() - self.prefill_start

    def token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    def decoded(self, seconds: float) -> None:
        self.decode_s += seconds
        self.decode_steps += 1

    def stats(self, generated: int, reason: StopReason) -> GenerationStats:
        now = time.perf_counter()
        first = self.first_token_at if self.first_token_at is not None else now
        return GenerationStats(
            prompt_tokens=self.prompt_tokens,
            generated_tokens=generated,
            time_to_first_token_s=first - self.started,
            prefill_tokens_per_s=self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0,
            decode_tokens_per_s=self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0,
            total_s=now - self.started,
            stop_reason=reason,
        )


def _next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()
