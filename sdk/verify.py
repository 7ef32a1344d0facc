"""How close an artifact is to its full-precision reference, measured on real text under teacher forcing.

Both models read the same token sequence; at every position we compare their next-token distributions:
top-1 agreement (does the artifact pick the reference's token?), mean KL(reference || artifact), and
each model's perplexity on the actual next tokens. Greedy-matching whole continuations is too harsh for
quantized models (one flipped near-tie changes everything after it); these per-position figures are not.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol, Sequence

import numpy as np


class Scorer(Protocol):
    def score(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray: ...


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


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def compare_logits(reference: np.ndarray, candidate: np.ndarray, token_ids: Sequence[int]) -> Agreement:
    """reference/candidate: [N, vocab] logits for positions 0..N-1 of `token_ids` (length N)."""
    ids = np.asarray(token_ids)
    ref_lp, cand_lp = log_softmax(reference[:-1]), log_softmax(candidate[:-1])
    targets = ids[1:]
    rows = np.arange(len(targets))
    kl = (np.exp(ref_lp) * (ref_lp - cand_lp)).sum(axis=-1)
    return Agreement(
        tokens=len(targets),
        top1_agreement=float((ref_lp.argmax(-1) == cand_lp.argmax(-1)).mean()),
        mean_kl=float(kl.mean()),
        perplexity_reference=float(np.exp(-ref_lp[rows, targets].mean())),
        perplexity_candidate=float(np.exp(-cand_lp[rows, targets].mean())),
    )


def teacher_forcing(reference: Scorer, candidate: Scorer, token_ids: Sequence[int]) -> Agreement:
    return compare_logits(reference.score(token_ids), candidate.score(token_ids), token_ids)
