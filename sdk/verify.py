"""The quality gate: how close a bundle is to its full-precision reference, measured through its real backend.

Both models read the same real text (sdk/evaltext.py) under teacher forcing; at every position we compare
their next-token distributions: top-1 agreement (does the bundle pick the reference's token?), mean
KL(reference || bundle), and each model's perplexity on the actual next tokens. These three are gated by
per-preset thresholds (sdk/thresholds.toml). Greedy continuations of a few chat prompts are compared token
by token too, but only reported: one flipped near-tie changes everything after it, so they are too harsh
for quantized models. The bundle's tokenizer and chat template are checked against the reference tokenizer
as `transformers` loads it from the student's own files.

The reference is the project's fp32 `CausalLM` built from the student the bundle names (or `--reference`),
run eagerly through the same `Session` API as the bundle.
"""

from __future__ import annotations

import gc
import tempfile
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from edgepack.bundle import FAILED_SUFFIX  # a bundle that failed the gate is kept at OUTPUT.failed
from edgepack.errors import EdgepackError, UsageError
from edgepack.progress import SILENT, Steps

if TYPE_CHECKING:
    from edgepack.intake import Student
    from edgepack.recorded_reference import RecordedReference
    from edgepack.runtime import Session

THRESHOLDS_FILE = Path(__file__).with_name("thresholds.toml")
DEFAULT_EVAL_TOKENS = 1024  # positions scored; enough for 3-digit top-1 precision, seconds on 2 cores
GREEDY_TOKENS = 32
CHAT_PROMPTS: tuple[tuple[dict[str, str], ...], ...] = (
    ({"role": "user", "content": "What is the capital of France?"},),
    ({"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."},),
    (
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Explain in two sentences why the sky is blue."},
    ),
)
# Tokenizer probe beside the evaluation text: accents, CJK, emoji, tabs and runs of spaces and newlines.
TOKENIZER_PROBE = "naïve café — Größe 東京 🙂 x\t=\t1;\n\n    indented  two  spaces\r\nend"


class Scorer(Protocol):
    def score(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray: ...


# --- teacher-forcing figures ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Agreement:
    tokens: int  # positions compared
    top1_agreement: float
    mean_kl: float
    perplexity_reference: float
    perplexity_candidate: float

    @property
    def perplexity_ratio(self) -> float:
        return self.perplexity_candidate / self.perplexity_reference

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "perplexity_ratio": self.perplexity_ratio}


@dataclass
class _Positions:
    """Per-position figures, gathered window by window, reduced to an `Agreement` at the end."""

    agree: list[np.ndarray] = field(default_factory=list)
    kl: list[np.ndarray] = field(default_factory=list)
    ref_nll: list[np.ndarray] = field(default_factory=list)
    cand_nll: list[np.ndarray] = field(default_factory=list)

    def add(self, reference: np.ndarray, candidate: np.ndarray, targets: np.ndarray, rows: int = 8) -> None:
        # Small row blocks keep each float64 log-softmax temporary (8 x 151,936: 10 MB) in malloc's reused heap;
        # at 128 rows each one was a fresh 155 MB mapping, page-faulted in and unmapped again (1.4x the time).
        for i in range(0, len(targets), rows):
            ref_lp, cand_lp = log_softmax(reference[i : i + rows]), log_softmax(candidate[i : i + rows])
            picked = np.arange(len(ref_lp)), targets[i : i + rows]
            self.agree.append(ref_lp.argmax(-1) == cand_lp.argmax(-1))
            self.kl.append((np.exp(ref_lp) * (ref_lp - cand_lp)).sum(axis=-1))
            self.ref_nll.append(-ref_lp[picked])
            self.cand_nll.append(-cand_lp[picked])

    def result(self) -> Agreement:
        agree = np.concatenate(self.agree)
        return Agreement(
            tokens=int(agree.size),
            top1_agreement=float(agree.mean()),
            mean_kl=float(np.concatenate(self.kl).mean()),
            perplexity_reference=float(np.exp(np.concatenate(self.ref_nll).mean())),
            perplexity_candidate=float(np.exp(np.concatenate(self.cand_nll).mean())),
        )


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def compare_logits(reference: np.ndarray, candidate: np.ndarray, token_ids: Sequence[int]) -> Agreement:
    """reference/candidate: [N, vocab] logits for positions 0..N-1 of `token_ids` (length N)."""
    positions = _Positions()
    positions.add(reference[:-1], candidate[:-1], np.asarray(token_ids)[1:])
    return positions.result()


def teacher_forcing(
    reference: Scorer, candidate: Scorer, token_ids: Sequence[int], window: int | None = None
) -> Agreement:
    """Score `token_ids` with both; a sequence longer than `window` (the bundle's context) is scored in
    windows that overlap by one token, each from position 0, so every token but the first is predicted once."""
    ids = np.asarray(token_ids, dtype=np.int64)
    window = max(2, min(window or ids.size, ids.size))
    positions = _Positions()
    for part in _windows(ids, window):
        positions.add(reference.score(part)[:-1], candidate.score(part)[:-1], part[1:])
    return positions.result()


def _windows(ids: np.ndarray, window: int) -> list[np.ndarray]:
    return [ids[start : start + window] for start in range(0, ids.size - 1, window - 1)
            if ids[start : start + window].size >= 2]


class _Remembered:
    """A bundle's answers, kept: its logits for the evaluation text (scored once, read by both the fp32 and the
    same-weights comparison; a last-position program such as ExecuTorch's is scored one token per call) and its
    greedy replies. Asked everything first, it lets the gate close the bundle's runtime before the fp32 model is
    built: the two are never in memory together. Logits are held as float32: 1024 x 151,936 are 0.6 GB."""

    def __init__(self, session: "Session") -> None:
        from edgepack.runtime import Session

        self.session: "Session | None" = session
        self.tokenizer, self.max_context = session.tokenizer, session.max_context
        self.prompt_ids = Session(None, session.tokenizer, session.manifest).prompt_ids  # no runtime needed
        self.seen: dict[bytes, np.ndarray] = {}
        self.replies: dict[str, Any] = {}

    def score(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        key = np.asarray(token_ids, dtype=np.int64).tobytes()
        if key not in self.seen:
            self.seen[key] = np.asarray(self._open().score(token_ids), dtype=np.float32)
        return self.seen[key]

    def complete(self, messages: list[Mapping[str, str]], **options: Any) -> Any:
        from edgepack.recorded_reference import reply_key

        key = reply_key(messages, options)
        if key not in self.replies:
            self.replies[key] = self._open().complete(messages, **options)
        return self.replies[key]

    def close(self) -> None:
        """Drop the runtime; the answers stay."""
        self.session = None
        gc.collect()

    def _open(self) -> "Session":
        if self.session is None:
            raise RuntimeError("the bundle's runtime was closed before this answer was asked for")
        return self.session


# --- thresholds (data: sdk/thresholds.toml) -------------------------------------------------------------


@dataclass(frozen=True)
class Thresholds:
    min_top1: float
    max_kl: float
    max_ppl_ratio: float

    @classmethod
    def from_table(cls, entry: Mapping[str, Any]) -> "Thresholds":
        return cls(**{k: float(entry[k]) for k in ("min_top1", "max_kl", "max_ppl_ratio")})

    def failures(self, a: Agreement) -> list[str]:
        found = []
        if not a.top1_agreement >= self.min_top1:
            found.append(f"top-1 agreement {a.top1_agreement:.1%} < {self.min_top1:.1%}")
        if not a.mean_kl <= self.max_kl:
            found.append(f"mean KL {a.mean_kl:.4g} > {self.max_kl:g}")
        if not a.perplexity_ratio <= self.max_ppl_ratio:
            found.append(f"perplexity ratio {a.perplexity_ratio:.3f} > {self.max_ppl_ratio:g}")
        return found


def load_thresholds(path: Path = THRESHOLDS_FILE) -> dict[str, Any]:
    with path.open("rb") as f:
        return tomllib.load(f)


def thresholds_for(
    preset: str, backend: str, delegate: str | None = None, table: Mapping[str, Any] | None = None
) -> Thresholds:
    """The preset's thresholds, overridden by its `backends."name/delegate"` (or `"name"`) table if any."""
    table = load_thresholds() if table is None else table
    if preset not in table:
        raise EdgepackError(
            f"no quality thresholds for quantization preset {preset!r}",
            f"add a [{preset}] table to {THRESHOLDS_FILE.name}",
        )
    entry = dict(table[preset])
    overrides = entry.pop("backends", {})
    for key in (backend, f"{backend}/{delegate}" if delegate else None):
        if key and key in overrides:
            entry.update(overrides[key])
    return Thresholds.from_table(entry)


def fidelity_thresholds(backend: str, delegate: str | None = None,
                        table: Mapping[str, Any] | None = None) -> Thresholds | None:
    """How close a bundle must be to the project's torch model running its own quantized weights, on this
    backend (`[fidelity."name/delegate"]`); None where no figure was measured (then fidelity is reported only)."""
    table = (load_thresholds() if table is None else table).get("fidelity", {})
    entry = table.get(f"{backend}/{delegate}" if delegate else backend) or table.get(backend)
    return Thresholds.from_table(entry) if entry else None


# --- the report ------------------------------------------------------------------------------------------


@dataclass
class Report:
    """Everything one verification measured; `to_dict` is the manifest's `verification` section."""

    preset: str
    backend: str
    reference: str
    text: dict[str, Any]
    thresholds: Thresholds
    agreement: Agreement
    greedy: list[dict[str, Any]]
    tokenizer: dict[str, Any]
    failures: list[str]  # every failed check: fidelity (the lowering), the preset's floor, the tokenizer
    seconds: float = 0.0
    # The bundle against the torch model running the same quantized weights (None for unquantized presets).
    fidelity: Agreement | None = None
    fidelity_thresholds: Thresholds | None = None
    broken: bool = False  # a fidelity failure: the lowering, not the quantization, lost the accuracy

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        compared = sum(g.get("compared", 0) for g in self.greedy)
        return {
            "status": "passed" if self.passed else "failed",
            "preset": self.preset,
            "backend": self.backend,
            "reference": {"model": self.reference, "precision": "fp32", "runtime": "edgepack reference (torch)"},
            "text": self.text,
            "teacher_forcing": self.agreement.to_dict(),
            "thresholds": asdict(self.thresholds),
            "greedy": {
                "matched": sum(g.get("matched", 0) for g in self.greedy),
                "compared": compared,
                "prompts": self.greedy,
            },
            "tokenizer": self.tokenizer,
            "fidelity": None if self.fidelity is None else {
                "reference": "the same quantized weights in edgepack's torch model",
                "teacher_forcing": self.fidelity.to_dict(),
                "thresholds": asdict(self.fidelity_thresholds) if self.fidelity_thresholds else None,
            },
            "broken": self.broken,
            "failures": self.failures,
            "seconds": round(self.seconds, 1),
        }

    def summary(self) -> str:
        a = self.agreement
        return (
            f"top-1 {a.top1_agreement:.1%}, mean KL {a.mean_kl:.4f}, "
            f"perplexity {a.perplexity_candidate:.2f} vs {a.perplexity_reference:.2f} (x{a.perplexity_ratio:.3f})"
        )


class VerificationFailed(EdgepackError):
    """The bundle is not close enough to its reference; carries the report so the CLI can show the figures.

    Two different failures, said differently: a *broken lowering* (the bundle disagrees with the torch model
    running its own quantized weights) and *quantization loss* beyond the preset's floor (the bundle computes
    what its weights say; the weights lose too much on this model). `kept_at` is set where the staged bundle
    was kept (bundle.write_bundle), so a retry need not export again."""

    keep_staged = True  # write_bundle keeps the finished, failed bundle beside the destination

    def __init__(self, report: Mapping[str, Any], kept: Path | None = None, fix: str | None = None) -> None:
        self.report = dict(report)
        self.kept_at = kept
        self._fix = fix
        broken = bool(report.get("broken"))
        if not broken:
            what = f"{report['preset']} quantization loses more on this model than the preset's floor allows"
        elif report.get("fidelity"):
            what = "the lowering is broken: the bundle disagrees with edgepack's torch model on the same quantized weights"
        else:
            what = "the lowering is broken: an unquantized bundle should compute what its fp32 reference computes"
        problem = f"the bundle failed verification ({report['preset']} on {report['backend']}; {what}): " + "; ".join(report["failures"])
        super().__init__(problem, self._advice())

    def _advice(self) -> str:
        if self._fix:
            return self._fix
        where = self.kept_at
        if self.report.get("broken"):
            kept = f"kept for inspection at {where}" if where else "no bundle was written (--keep-failed keeps it)"
            return f"report it with the bundle's manifest: {kept}"
        if where and where.name.endswith(FAILED_SUFFIX):
            keep = (f"it is kept at {where}, marked failed: `edgepack verify {where}` re-measures it and "
                    f"`mv {where} {where.with_name(where.name.removesuffix(FAILED_SUFFIX))}` ships it as it is, "
                    "without exporting again")
        elif where:
            keep = f"it was kept at {where} and marked failed in its manifest"
        else:
            keep = "--keep-failed keeps the bundle"
        return f"try -q int8 or a smaller --group-size for more accuracy; {keep}"

    def kept(self, where: Path) -> None:
        """Say where the staged bundle went (called by write_bundle)."""
        self.kept_at = where
        self.fix = self._advice()
        self.args = (self.one_line(),)


class BackendUnavailable(EdgepackError):
    """The bundle's backend cannot run on this machine (e.g. a missing runtime package): nothing to measure."""


def gate_export(
    writer: Any,
    manifest: dict[str, Any],
    student: "Student",
    enabled: bool = True,
    keep_failed: bool = False,
    step: Steps = SILENT,
    same_weights: Callable[[], Any] | None = None,
    reference: "RecordedReference | None" = None,
) -> dict[str, Any]:
    """The export's last step, on the staged bundle before it is moved into place: verify it and record the
    result in its manifest. A failure raises unless `keep_failed` (the bundle then goes to OUTPUT.failed)."""
    from edgepack.bundle import MANIFEST

    if enabled:
        try:  # its stages are named by verify_bundle: the bundle, then the fp32 reference, then the same weights
            section = verify_bundle(writer.dir, student=student, step=step, same_weights=same_weights,
                                    reference_answers=reference).to_dict()
        except BackendUnavailable as e:  # recorded, not hidden: `edgepack verify` it where it runs
            section = {"status": "not_run", "reason": e.one_line()}
    else:
        section = {"status": "skipped", "reason": "--no-verify"}
    manifest = {**manifest, "verification": section}
    writer.write_json(MANIFEST, manifest)  # the checksum list covers the other files, not the manifest
    if section["status"] == "failed" and not keep_failed:
        raise VerificationFailed(section)  # the finished bundle is kept at OUTPUT.failed (bundle.write_bundle)
    return manifest


def table_rows(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """A `verification` section as (label, value) rows for the CLI's table."""
    if report.get("status") in ("skipped", "not_run"):
        return [("verification", f"{report['status'].replace('_', ' ')}: {report.get('reason', '')}")]
    tf, th, greedy, tok = report["teacher_forcing"], report["thresholds"], report["greedy"], report["tokenizer"]
    ok = lambda good: "✓" if good else "✗"  # noqa: E731
    rows = [
        ("status", f"{report['status'].upper()}: {report['preset']} on {report['backend']} vs fp32 reference"),
        ("top-1 agreement", f"{tf['top1_agreement']:.1%}  (min {th['min_top1']:.1%}) "
         f"{ok(tf['top1_agreement'] >= th['min_top1'])}"),
        ("mean KL", f"{tf['mean_kl']:.4f}  (max {th['max_kl']:g}) {ok(tf['mean_kl'] <= th['max_kl'])}"),
        ("perplexity", f"{tf['perplexity_candidate']:.3f} vs {tf['perplexity_reference']:.3f}, ratio "
         f"{tf['perplexity_ratio']:.3f}  (max {th['max_ppl_ratio']:g}) {ok(tf['perplexity_ratio'] <= th['max_ppl_ratio'])}"),
    ]
    fid = report.get("fidelity")
    if fid:
        f, fth = fid["teacher_forcing"], fid["thresholds"]
        top1_min = f"min {fth['min_top1']:.1%}, " if fth and fth["min_top1"] > 0 else ""
        limit = (f"  ({top1_min}KL max {fth['max_kl']:g}) "
                 f"{ok(not any(x.startswith('fidelity ') for x in report['failures']))}" if fth else
                 "  (reported: no measured threshold for this backend)")
        rows.append(("fidelity", f"top-1 {f['top1_agreement']:.1%}, KL {f['mean_kl']:.4f} vs the same quantized "
                     f"weights in torch{limit}"))
    rows += [
        ("greedy", f"{greedy['matched']}/{greedy['compared']} tokens match the reference "
         f"({len(greedy['prompts'])} chat prompts; informative)"),
        ("tokenizer", "  ".join(f"{k.replace('_', ' ')} {ok(v)}" for k, v in tok.items() if isinstance(v, bool))),
        ("text", f"{report['text']['tokens']} tokens of {report['text']['source']}"),
        ("reference", report["reference"]["model"]),
        ("time", f"{report['seconds']:.0f} s"),
    ]
    rows += [("failure", f) for f in report["failures"]]
    return rows


# --- the verification itself -----------------------------------------------------------------------------


def verify_bundle(
    bundle: str | Path,
    reference: str | None = None,
    text_file: str | Path | None = None,
    eval_tokens: int = DEFAULT_EVAL_TOKENS,
    student: "Student | None" = None,
    step: Steps = SILENT,
    backend_override: str | None = None,
    same_weights: Callable[[], Any] | None = None,
    reference_answers: "RecordedReference | None" = None,
) -> Report:
    """Measure `bundle` against the fp32 reference; `student` (already loaded, e.g. by the export) saves a reload.
    `backend_override` scores another runtime backend of the bundle (e.g. "onnx/qnn": the NPU graphs);
    `same_weights` loads the export's own quantized model (`quantize.park_quantized`); `reference_answers`
    replays the fp32 reference's logits and replies recorded once for many bundles (a release matrix)."""
    from edgepack import runtime
    from edgepack.bundle import read_manifest
    from edgepack.evaltext import fingerprint, load_text

    started = time.perf_counter()
    if eval_tokens < 16:
        raise UsageError(f"--tokens {eval_tokens} is too few", "score at least 16 tokens (default 1024)")
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    preset, backend = manifest["quantization"]["name"], manifest["backend"]["name"]
    delegate = manifest["backend"].get("delegate")
    thresholds_for(preset, backend, delegate)  # an unknown preset fails here, before the reference is loaded
    text, text_source = load_text(text_file)
    if student is None:
        step("load reference model")
        student = _load_reference_student(reference, manifest)
    _check_same_model(student, manifest)

    step("verify: open bundle")
    try:
        session = runtime.load(bundle, backend=backend_override)
    except EdgepackError as e:  # an environment problem (OS, runtime package); a broken program raises others
        # A bundle whose runtime needs another OS (Core ML) names a host check: its weights read back out of
        # the program, run by the reference model.
        if backend_override or not manifest["backend"].get("host_check"):
            raise BackendUnavailable(
                f"cannot run the {backend} backend here to verify the bundle ({e.problem})",
                "run `edgepack verify BUNDLE` where it runs",
            ) from None
        step(f"open bundle through its host check ({manifest['backend']['host_check']})")
        session = runtime.load(bundle, backend=manifest["backend"]["host_check"])
    # What actually ran, e.g. an NPU bundle's CPU model on a host where the NPU would only be simulated.
    ran = getattr(session.decoder, "label", None) or backend + (f"/{delegate}" if delegate else "")
    thresholds = thresholds_for(preset, *ran.split("/", 1))
    reference_tokenizer = _reference_tokenizer(student)
    hf_tokenizer = _hf_tokenizer(student)

    step("check tokenizer")
    tokenizer = check_tokenizer(session.tokenizer, hf_tokenizer, student.chat_template, text)
    ids = np.asarray(reference_tokenizer.encode(text)[: eval_tokens + 1], dtype=np.int64)
    if len(ids) < eval_tokens + 1:
        raise EdgepackError(
            f"the evaluation text has {len(ids)} tokens, fewer than the {eval_tokens} to score",
            "pass a longer --text or fewer --tokens",
        )

    # The bundle first, all of it (scores and replies kept), then its runtime closed: the fp32 model that follows
    # is never in memory beside it (a 1.5B Core ML export's gate held a 3.1 GB fp16 host check beside 6.2 GB).
    reference_context = int(manifest["context_length"])  # what `_reference_session` builds (and a recording has)
    window = min(session.max_context, reference_context)
    step(f"teacher forcing: the bundle ({eval_tokens} tokens)")
    answers = _Remembered(session)
    for part in _windows(ids, window):
        answers.score(part)
    step("greedy continuations: the bundle")
    for messages in CHAT_PROMPTS:
        options = greedy_options(answers, messages, reference_context)
        if options:
            answers.complete(list(messages), **options)
    session = None
    answers.close()

    step(f"teacher forcing: the fp32 reference ({eval_tokens} tokens)")
    if reference_answers is not None:
        ref = reference_answers.replay(manifest, reference_tokenizer, lambda: _reference_session(student, manifest))
    else:
        ref = _reference_session(student, manifest)
    agreement = teacher_forcing(ref, answers, ids, window=window)
    step("greedy continuations: the fp32 reference")
    greedy = [compare_greedy(ref, answers, messages) for messages in CHAT_PROMPTS]
    del ref  # the fp32 model: never in memory together with the quantized one
    gc.collect()

    fidelity, fidelity_limits, fidelity_failures = None, None, []
    quantization = _preset(manifest)
    unquantized = not quantization.quantized  # its reference is fp32: no same-weights model to compare with
    if not unquantized:
        step(f"fidelity: the same quantized weights in edgepack's torch model ({eval_tokens} tokens)")
        same = _same_weights_session(student, manifest, quantization, same_weights)
        fidelity = teacher_forcing(same, answers, ids, window=window)
        same = None
        fidelity_limits = fidelity_thresholds(*ran.split("/", 1))
        fidelity_failures = [f"fidelity {f}" for f in fidelity_limits.failures(fidelity)] if fidelity_limits else []

    floor_failures = thresholds.failures(agreement)
    failures = fidelity_failures + floor_failures
    failures += [f"tokenizer: {k.replace('_', ' ')} differs from the reference" for k, v in tokenizer.items() if v is False]
    return Report(
        preset=preset,
        backend=ran,
        reference=student.source,
        text={"source": text_source, "sha256": fingerprint(text), "tokens": agreement.tokens},
        thresholds=thresholds,
        agreement=agreement,
        greedy=greedy,
        tokenizer=tokenizer,
        failures=failures,
        seconds=time.perf_counter() - started,
        fidelity=fidelity,
        fidelity_thresholds=fidelity_limits,
        # unquantized: the bundle should compute the reference's math, so any miss is the lowering's
        broken=bool(fidelity_failures) or (unquantized and bool(floor_failures)),
    )


def greedy_options(candidate: Any, messages: Sequence[Mapping[str, str]], reference_context: int) -> dict[str, Any] | None:
    """The generation options of the greedy comparison for one chat prompt; None where it does not fit."""
    _, ids = candidate.prompt_ids(messages)
    new_tokens = min(GREEDY_TOKENS, candidate.max_context - len(ids) - 1, reference_context - len(ids) - 1)
    return {"max_new_tokens": new_tokens, "temperature": 0.0, "top_p": 1.0, "top_k": 0} if new_tokens >= 1 else None


def compare_greedy(reference: "Session", candidate: Any, messages: Sequence[Mapping[str, str]]) -> dict[str, Any]:
    """Greedy replies of both to one chat prompt; `matched` counts the tokens before the first difference."""
    prompt = messages[-1]["content"]
    options = greedy_options(candidate, messages, reference.max_context)
    if options is None:
        return {"prompt": prompt, "skipped": "prompt does not fit the context"}
    theirs = reference.complete(list(messages), **options).token_ids
    ours = candidate.complete(list(messages), **options).token_ids
    matched = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
    compared = max(len(theirs), len(ours))
    return {"prompt": prompt, "matched": matched, "compared": compared, "text": candidate.tokenizer.decode(ours)}


def check_tokenizer(bundle_tok: Any, hf_tok: Any, chat_template: str | None, text: str) -> dict[str, bool | None]:
    """The bundle's runtime tokenizer (tokenizers + jinja) against `transformers` on the student's own files."""
    sample = text[:4000] + "\n" + TOKENIZER_PROBE
    ours = bundle_tok.encode(sample, add_special=False)
    theirs = list(hf_tok(sample, add_special_tokens=False)["input_ids"])
    decoded = bundle_tok.decode(ours, skip_special=False)
    result: dict[str, bool | None] = {
        "ids_match": ours == theirs,
        "decode_match": decoded == hf_tok.decode(theirs, skip_special_tokens=False),
        "round_trip": decoded == sample,
        "chat_template_match": None,  # no template: the plain-prompt fallback, nothing to compare
    }
    if chat_template:
        same = True
        for messages in CHAT_PROMPTS:
            rendered = bundle_tok.render_chat(list(messages), add_generation_prompt=True)
            expected = hf_tok.apply_chat_template(
                [dict(m) for m in messages], tokenize=False, add_generation_prompt=True, chat_template=chat_template
            )
            same = same and rendered == expected
            same = same and bundle_tok.encode(rendered, add_special=False) == list(
                hf_tok(expected, add_special_tokens=False)["input_ids"]
            )
        result["chat_template_match"] = same
    return result


def _load_reference_student(reference: str | None, manifest: Mapping[str, Any]) -> "Student":
    """The student the bundle was exported from (manifest `model.source`), unless `--reference` names one."""
    from edgepack.intake import default_model_path, load_student

    source = reference or manifest["model"].get("source")
    if not source:
        raise UsageError("the bundle's manifest names no source model", "pass the fp32 model with --reference")
    if reference is None and not Path(source).exists() and not _looks_like_hub_id(source):
        try:  # the default model exported on another machine: the same GGUF installed here
            default = default_model_path()
        except EdgepackError:
            default = None
        if default is None or Path(source).name != default.name:
            raise EdgepackError(
                f"the bundle's source model {source} is not on this machine", "pass it with --reference MODEL"
            )
        source = str(default)
    return load_student(source)


def _looks_like_hub_id(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/", "~"))


def _check_same_model(student: "Student", manifest: Mapping[str, Any]) -> None:
    """A reference of another shape cannot be compared (e.g. --reference pointing at a different model)."""
    expected = manifest["model"]["config"]
    found = student.config.to_dict()
    differing = [k for k in ("architecture", "vocab_size", "hidden_size", "num_layers") if found[k] != expected[k]]
    if differing:
        raise UsageError(
            f"the reference model {student.source} is not the bundle's model ({differing[0]}: "
            f"{found[differing[0]]} vs {expected[differing[0]]})",
            "pass the fp32 checkpoint the bundle was exported from with --reference",
        )


def _same_weights_session(student: "Student", manifest: Mapping[str, Any], preset: Any,
                          load: Callable[[], Any] | None = None) -> "Session":
    """The project's torch model on the bundle's own quantized weights (as the export built them: `load` reads
    the export's own, else they are built again by `preset`)."""
    from edgepack.quantize import build_quantized, decoded_for_scoring

    if load is not None:
        model = load()
    else:
        model = build_quantized(student, preset, manifest["backend"]["name"], int(manifest["context_length"]))
    # Scored 512 tokens a call: torchao decodes every int weight once per call (a 0.5B student's 1024-token score
    # 20 -> 12 s). The fp32 reference keeps the prefill chunk: it gains less (10.5 -> 7.4 s) and is the gate's
    # heaviest moment, where 512 rows of a 151,936-token vocabulary would add ~0.3 GB of logits.
    return _reference_session(student, manifest, decoded_for_scoring(model), score_chunk=512)


def _preset(manifest: Mapping[str, Any]) -> Any:
    """The bundle's quantization preset, as its manifest records it."""
    from edgepack.presets import get_preset

    quant = manifest["quantization"]
    preset = get_preset(quant["name"]).with_group_size(quant.get("group_size"))
    return preset.with_activation_ranges(quant.get("activation_ranges"))


def _reference_session(student: "Student", manifest: Mapping[str, Any], model: Any = None,
                       score_chunk: int | None = None) -> "Session":
    """A Session over `model` (default: the student's fp32 model) with the student's own tokenizer."""
    from edgepack.model import build_model
    from edgepack.runtime import Session, TorchDecoder

    tokenizer = _reference_tokenizer(student)
    if model is None:
        model = build_model(student.config, student.state_dict, max_context=int(manifest["context_length"]))
    prefill = manifest["backend"].get("max_prefill") or 128
    return Session(TorchDecoder(model, max_prefill_chunk=prefill, score_chunk=score_chunk), tokenizer,
                   {"tokenizer": manifest.get("tokenizer")})


def _reference_tokenizer(student: "Student") -> Any:
    """The student's own tokenizer and chat template, as the reference session runs them."""
    from edgepack.runtime import BundleTokenizer

    with tempfile.TemporaryDirectory(prefix="edgepack-reference-") as tmp:
        folder = Path(tmp)
        for name, data in student.tokenizer_files.items():
            (folder / name).write_bytes(data)
        tokenizer = BundleTokenizer.from_files(
            folder / "tokenizer.json",
            folder / "tokenizer_config.json" if (folder / "tokenizer_config.json").exists() else None,
            bos_id=student.bos_id,
            add_bos=student.add_bos,
            eos_ids=student.eos_ids,
            stop_ids=student.eos_ids,
        )
    tokenizer.chat_template = student.chat_template or tokenizer.chat_template
    return tokenizer


def _hf_tokenizer(student: "Student") -> Any:
    """`transformers`' own tokenizer over the student's files: the independent side of the tokenizer check."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="edgepack-hf-tokenizer-") as tmp:
        for name, data in student.tokenizer_files.items():
            (Path(tmp) / name).write_bytes(data)
        return AutoTokenizer.from_pretrained(tmp, local_files_only=True)
