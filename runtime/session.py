"""Generation above any backend: prompt -> ids -> chunked prefill -> sampled decode -> streamed text.

Everything a user sees about generation (sampling, stop handling, reasoning/answer split, speed stats)
lives here once, so every backend behaves the same and differs only in its `Decoder`.
"""

from __future__ import annotations

import math
import numbers
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

import numpy as np

from edgepack.errors import EdgepackError, UsageError
from edgepack.runtime.backend import Decoder
from edgepack.runtime.tokenizer import BundleTokenizer, check_text, kind_of

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

    One decoder holds one KV cache, so generations on a Session run one at a time, never mixed:

    - Threads: a reply holds the session from its first chunk until it ends or is closed; `generate`,
      `complete`, `score` and `prefill` from other threads wait for it. Close a reply you stop reading
      (`reply.close()`, `break` out of the loop, or `contextlib.closing`), or other threads keep waiting.
    - One thread, two live replies: starting a generation (or `score`/`prefill`) interrupts the older
      reply, whose next pull raises EdgepackError ("this reply was interrupted ..."); what it yielded
      before is correct.

    For replies in parallel, load the bundle once per thread. `last_stats` and `last_token_ids` belong to
    the most recently started generation; with threads, use `complete()`'s `Result` instead.
    """

    def __init__(self, decoder: Decoder, tokenizer: BundleTokenizer, manifest: Mapping[str, Any] | None = None):
        manifest = manifest or {}
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.manifest = manifest
        generation = manifest.get("generation")
        given = {k: v for k, v in (generation if isinstance(generation, Mapping) else {}).items() if v is not None}
        self.defaults = {**_DEFAULT_GENERATION, **given}
        think = (manifest.get("tokenizer") or {}).get("think") or {}
        self.think_tags = (think.get("start") or DEFAULT_THINK_TAGS[0], think.get("end") or DEFAULT_THINK_TAGS[1])
        limit = getattr(decoder, "max_prefill_chunk", None) or DEFAULT_PREFILL_CHUNK
        self.prefill_chunk = int(min(DEFAULT_PREFILL_CHUNK, limit))
        self.last_stats: GenerationStats | None = None
        self.last_token_ids: list[int] = []
        # Sampling never picks an id the tokenizer has no text for (e.g. the padding rows of Qwen2's vocab).
        # (A Session without a decoder only tokenizes; one without a tokenizer only scores.)
        model_vocab = getattr(decoder, "vocab_size", None)
        text_vocab = tokenizer.vocab_size if tokenizer is not None else None
        if model_vocab is not None and text_vocab is not None:
            check_vocab(text_vocab, int(model_vocab))
        self._sample_vocab = min(v for v in (text_vocab, model_vocab, 1 << 62) if v is not None)
        self._turns = threading.Condition(threading.RLock())  # reentrant: a reply closed by the GC releases
        self._owner: _Run | None = None  # the call that holds the decoder now
        self._latest: _Run | None = None  # the most recently started generation (owns last_stats)
        self._cache_owner: _Run | None = None  # whose tokens the decoder's KV cache holds
        self._decoder_lock = threading.Lock()  # held around every use of the decoder
        self._manual: _Run | None = None  # the last prefill(), which decode_step() continues

    @property
    def max_context(self) -> int:
        return int(self.decoder.max_context)

    def prompt_ids(self, prompt: Prompt, chat: bool = True) -> tuple[str, list[int]]:
        """The prompt as text and ids: messages (or a str with chat=True) through the chat template."""
        if isinstance(prompt, str):
            check_text(prompt, "the prompt")
            if not chat:
                return prompt, self.tokenizer.encode(prompt, add_special=True)
            messages: Any = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, (bytes, bytearray, Mapping)) or not isinstance(prompt, Iterable):
            hint = "wrap the message in a list" if isinstance(prompt, Mapping) else "pass text or a list of messages"
            raise UsageError(f"the prompt is {kind_of(prompt)}, not a string or a list of messages", hint)
        else:
            messages = prompt
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
        stop: Sequence[str] | str | None = None,
        chat: bool = True,
    ) -> Iterator[Chunk]:
        """Stream the reply as chunks. The options and the prompt are checked now (one UsageError or
        EdgepackError each); the work happens as chunks are pulled. `stop`: stop strings (or one string)."""
        options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                       stop=stop)  # fmt: skip
        return self._start(prompt, chat, options)[1]

    def complete(self, prompt: Prompt, chat: bool = True, **options: Any) -> Result:
        """`generate` run to the end, joined; options are generate's keyword arguments."""
        unknown = set(options) - set(_OPTION_CHECKS)
        if unknown:
            raise UsageError(f"unknown generation option {sorted(unknown)[0]!r}", f"use {', '.join(_OPTION_CHECKS)}")
        run, reply = self._start(prompt, chat, options)
        answer: list[str] = []
        thinking: list[str] = []
        for chunk in reply:
            (thinking if chunk.kind == "thinking" else answer).append(chunk.text)
        assert run.stats is not None
        return Result("".join(answer), "".join(thinking).strip(), run.stats, list(run.token_ids))

    def score(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Logits [N, vocab] for every position of `token_ids` (teacher forcing, fed in prefill chunks)."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.size > self.max_context:
            raise EdgepackError(
                f"{ids.size} tokens do not fit the bundle's context of {self.max_context}",
                "score a shorter sequence",
            )
        with self._holding(_Run()) as run, self._decoder_for(run, fresh=True):
            # A decoder that returns only the last position's logits is teacher-forced one token per call; one
            # that names a `score_chunk` (the gate's same-weights torch model) is fed in chunks of that size.
            step = 1 if getattr(self.decoder, "last_logits_only", False) else (
                getattr(self.decoder, "score_chunk", None) or self.prefill_chunk)
            rows = [self.decoder.forward(ids[i : i + step], i) for i in range(0, ids.size, step)]
        return np.concatenate(rows, axis=0) if rows else np.zeros((0, self.decoder.vocab_size), np.float32)

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Start over and feed the prompt as generation does; returns its last position's logits
        (benchmarks and `edgepack profile` time exactly this, then call `decode_step`)."""
        with self._holding(_Run()) as run, self._decoder_for(run, fresh=True):
            logits = self._feed(ids)
            self._manual = run
        return logits

    def decode_step(self, token: int, pos: int) -> np.ndarray:
        """One generated token at `pos` after `prefill`; returns its logits."""
        with self._holding(_Run()), self._decoder_lock:
            if self._manual is None or self._cache_owner is not self._manual:
                raise EdgepackError(
                    "decode_step() continues the last prefill(), but another call has used the session since",
                    "call prefill() again first",
                )
            return self.decoder.forward(np.array([token], np.int64), pos)[-1]

    # ---- one call at a time -----------------------------------------------------------------------------

    def _acquire(self, run: _Run) -> bool:
        """Make `run` the holder of the decoder: wait for another thread's holder, interrupt this thread's
        own older reply (it cannot be running while this thread is here). True if it had to wait."""
        me = threading.get_ident()
        waited = False
        with self._turns:
            while self._owner is not None:
                if self._owner.thread == me:
                    self._owner.interrupted = True
                    break
                waited = True
                self._turns.wait()
            run.thread, self._owner = me, run
        return waited

    def _release(self, run: _Run) -> None:
        with self._turns:
            if self._owner is run:
                self._owner = None
                self._turns.notify_all()

    @contextmanager
    def _holding(self, run: _Run) -> Iterator[_Run]:
        self._acquire(run)
        try:
            yield run
        finally:
            self._release(run)

    @contextmanager
    def _decoder_for(self, run: _Run, fresh: bool = False) -> Iterator[None]:
        """The decoder, for `run` alone: `fresh` resets the cache for it, otherwise the cache must still be
        the one `run` filled (a newer call may have taken the session since)."""
        with self._decoder_lock:
            if fresh:
                self.decoder.reset()
                self._cache_owner = run
            elif run.interrupted or self._cache_owner is not run:
                raise _interrupted()
            yield

    # ---- generation -------------------------------------------------------------------------------------

    def _start(self, prompt: Prompt, chat: bool, options: Mapping[str, Any]) -> tuple[_Run, Iterator[Chunk]]:
        """Check everything a user passed, then return the run and its (not yet started) stream."""
        started = time.perf_counter()
        check_generation_options(options)
        picked = {key: self._pick(options.get(key), key) for key in _DEFAULT_GENERATION}
        check_generation_options(picked, "the bundle's default ")
        text, ids = self.prompt_ids(prompt, chat)
        self._check_fits(ids)
        sampling = Sampling(float(picked["temperature"]), float(picked["top_p"]), int(picked["top_k"]))
        stop = options.get("stop")
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        inside_think = text.rstrip().endswith(self.think_tags[0])
        rng = np.random.default_rng(options.get("seed"))
        run = _Run()
        return run, self._stream(run, ids, int(picked["max_new_tokens"]), sampling, rng, stops, inside_think, started)

    def _pick(self, value: Any, key: str) -> Any:
        return self.defaults[key] if value is None else value

    def _check_fits(self, ids: list[int]) -> None:
        n = len(ids)
        if n == 0:
            raise EdgepackError("the prompt is empty", "pass some text")
        if n + 1 > self.max_context:
            raise EdgepackError(
                f"prompt is {n} tokens but the bundle's context is {self.max_context}",
                f"shorten the prompt or re-export with --max-context {_next_power_of_two(n + 1)} or more",
            )
        vocab = int(getattr(self.decoder, "vocab_size", 0) or 0)
        if vocab and max(ids) >= vocab:
            raise EdgepackError(
                f"the prompt holds token id {max(ids)}, beyond the model's vocabulary of {vocab}",
                "the bundle's tokenizer does not belong to its model: re-export the bundle",
            )

    def _feed(self, ids: list[int]) -> np.ndarray:
        """Feed the prompt in chunks; return the logits of its last position."""
        tokens = np.asarray(ids, dtype=np.int64)
        forward = getattr(self.decoder, "forward_last", self.decoder.forward)
        logits = None
        for i in range(0, tokens.size, self.prefill_chunk):
            logits = forward(tokens[i : i + self.prefill_chunk], i)
        assert logits is not None
        return logits[-1]

    def _stream(
        self,
        run: _Run,
        ids: list[int],
        budget: int,
        sampling: Sampling,
        rng: np.random.Generator,
        stops: Sequence[str],
        inside_think: bool,
        started: float,
    ) -> Iterator[Chunk]:
        if self._acquire(run):
            started = time.perf_counter()  # it waited for another thread: time it from when its turn came
        clock = _Clock(started, prompt_tokens=len(ids))
        generated = run.token_ids
        self._latest = run  # an older, abandoned stream must not overwrite this one's stats
        self.last_stats, self.last_token_ids = None, generated
        detok = self.tokenizer.detokenizer()
        matcher = StopStringMatcher(stops)
        splitter = ThinkSplitter(*self.think_tags, inside=inside_think)
        end_ids = self.tokenizer.end_ids
        reason: StopReason | None = None
        finished = False
        try:
            with self._decoder_for(run, fresh=True):
                logits = self._feed(ids)
            clock.prefill_done()
            pos = len(ids)
            while len(generated) < budget:
                token = sampling.pick(logits[: self._sample_vocab], rng)
                clock.token()
                if token in end_ids:
                    reason = "eos"
                    break
                generated.append(token)
                yield from _live(run, splitter.feed(matcher.feed(detok.push(token))))
                if matcher.stopped:
                    reason = "stop_string"
                    break
                if len(generated) >= budget:
                    break
                if pos >= self.max_context:
                    reason = "context_full"
                    break
                step_start = time.perf_counter()
                with self._decoder_for(run):
                    logits = self.decoder.forward(np.array([token], np.int64), pos)[-1]
                clock.decoded(time.perf_counter() - step_start)
                pos += 1
            if not matcher.stopped:
                tail = matcher.feed(detok.flush())
                reason = "stop_string" if matcher.stopped else reason
                yield from _live(run, splitter.feed(tail + matcher.flush()))
            yield from _live(run, splitter.flush())
            finished = True
        finally:
            # A consumer that stops pulling chunks (break, Ctrl-C) closes the generator: "cancelled".
            run.stats = clock.stats(len(generated), (reason or "max_new_tokens") if finished else "cancelled")
            if self._latest is run:
                self.last_stats = run.stats
            self._release(run)


@dataclass(eq=False)
class _Run:
    """One call on a Session: which thread holds it, whether a newer call interrupted it, what it produced."""

    thread: int = 0
    interrupted: bool = False
    stats: GenerationStats | None = None
    token_ids: list[int] = field(default_factory=list)


def _live(run: _Run, chunks: Iterable[Chunk]) -> Iterator[Chunk]:
    """Yield `chunks`; a reply interrupted while its consumer held a chunk raises on the next pull."""
    for chunk in chunks:
        yield chunk
        if run.interrupted:
            raise _interrupted()


def _interrupted() -> EdgepackError:
    return EdgepackError(
        "this reply was interrupted by a newer generate() on the same Session",
        "finish or close a reply before starting the next, or use one Session per thread",
    )


def check_vocab(tokenizer_vocab: int, model_vocab: int) -> None:
    """A tokenizer much smaller than the model's vocabulary cannot be the model's own (the model's ids
    would decode to nothing). Models pad their vocabulary a little (Qwen2: 271 ids, Phi-2: 905), so a
    gap under 1,024 ids or 1/64 of the vocabulary is allowed; sampling never picks those ids."""
    if model_vocab - tokenizer_vocab >= max(1024, model_vocab // 64):
        raise EdgepackError(
            f"the bundle's tokenizer has {tokenizer_vocab} tokens but its model's vocabulary has {model_vocab} "
            "(most of the model's output would have no text)",
            "the tokenizer does not belong to this model: re-export the bundle",
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# option -> (is it valid?, what it must be, how to fix it)
_OPTION_CHECKS: dict[str, tuple[Callable[[Any], bool], str, str]] = {
    "max_new_tokens": (
        lambda v: _is_int(v) and v >= 1, "a whole number of at least 1", "ask for 1 or more tokens, e.g. 64"
    ),
    "temperature": (
        lambda v: _is_real(v) and math.isfinite(v) and v >= 0,
        "a finite number >= 0",
        "use 0 for greedy decoding or a positive value such as 0.7",
    ),
    "top_p": (
        lambda v: _is_real(v) and 0 < v <= 1, "a number above 0 and at most 1", "use a value in (0, 1]; 1 is off"
    ),
    "top_k": (lambda v: _is_int(v) and v >= 0, "a whole number >= 0", "use 0 (off) or a positive whole number"),
    "seed": (lambda v: _is_int(v) and v >= 0, "a whole number >= 0", "use 0 or more, or no seed for a random one"),
    "stop": (
        lambda v: isinstance(v, str) or (isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v)),
        "a list of strings",
        'pass stop strings as a list, e.g. ["\\n\\n"]',
    ),
}


def check_generation_options(options: Mapping[str, Any], source: str = "") -> None:
    """One UsageError for the first bad generation option (None means "the default"); the CLI calls this
    before it loads a bundle. `source` prefixes the option's name, e.g. "the bundle's default "."""
    for key, value in options.items():
        if value is None or key not in _OPTION_CHECKS:
            continue
        valid, must_be, fix = _OPTION_CHECKS[key]
        if not valid(value):
            raise UsageError(f"{source}{key} must be {must_be}, not {_shown(value)}", fix)
    stop = options.get("stop")
    for text in [stop] if isinstance(stop, str) else stop or ():
        check_text(text, "a stop string")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


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
