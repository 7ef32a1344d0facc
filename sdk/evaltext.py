"""Real English text for measuring a bundle against its reference (teacher forcing, perplexity).

The default comes from a package every install already has: CPython's own reference manual as shipped
in `pydoc_data.topics` (Python Software Foundation License; human-written English prose about the
language). Only prose paragraphs are kept: no grammar rules, code samples or headings. Nothing here is
model output, so agreement and perplexity on it say how the artifact treats real text.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from edgepack.errors import EdgepackError

DEFAULT_SOURCE = "CPython reference manual (pydoc_data.topics, PSF License)"


def default_text(min_chars: int = 60_000) -> str:
    """Prose paragraphs of the reference manual, topics in sorted order, until `min_chars`."""
    return "\n\n".join(_prose_paragraphs(0, min_chars))


def calibration_text(min_chars: int = 30_000) -> str:
    """Paragraphs that come after the evaluation text and do not repeat any of it (the manual repeats some
    paragraphs under several topics): quantizers calibrate on these, never on the text they are judged on."""
    held_out = set(_prose_paragraphs(0, 60_000))
    fresh = [p for p in _prose_paragraphs(60_000, 10 * min_chars) if p not in held_out]
    out: list[str] = []
    for paragraph in fresh:
        out.append(paragraph)
        if sum(map(len, out)) >= min_chars:
            break
    return "\n\n".join(out)


def _prose_paragraphs(skip_chars: int, min_chars: int) -> list[str]:
    from pydoc_data.topics import topics

    paragraphs: list[str] = []
    seen = total = 0
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name]):
            if not _is_prose(block):
                continue
            paragraph = " ".join(line.strip() for line in block.splitlines())
            if seen < skip_chars:
                seen += len(paragraph)
                continue
            paragraphs.append(paragraph)
            total += len(paragraph)
            if total >= min_chars:
                return paragraphs
    return paragraphs


def _is_prose(block: str) -> bool:
    lines = block.splitlines()
    if not lines or any(line.startswith((" ", "\t")) for line in lines):
        return False  # indented: code, grammar or a nested list
    if any(set(line.strip()) <= set("*=-^") for line in lines):
        return False  # a heading underline
    return len(block) > 200 and "::=" not in block and ">>>" not in block and block.rstrip().endswith(".")


def load_text(path: str | Path | None) -> tuple[str, str]:
    """(text, description): a user file if given, else the default text."""
    if path is None:
        return default_text(), DEFAULT_SOURCE
    file = Path(path)
    if not file.is_file():
        raise EdgepackError(f"evaluation text {file} does not exist", "pass a UTF-8 text file with --text")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EdgepackError(f"evaluation text {file} is not UTF-8", "convert it to UTF-8") from None
    if len(text.split()) < 200:
        raise EdgepackError(f"evaluation text {file} is too short ({len(text.split())} words)", "use 1,000+ words")
    return text, str(file)


def fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
