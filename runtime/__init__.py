"""Run a bundle: `edgepack.runtime.load(path)` gives a `Session` that streams generated text.

Importing this package is cheap (numpy, tokenizers, jinja2 on first use); each backend imports its heavy
runtime (torch, ExecuTorch) only when a bundle is opened with it.
"""

from __future__ import annotations

from pathlib import Path

from edgepack.runtime.reference_backend import TorchDecoder  # torch is imported only when one is built
from edgepack.runtime.session import Chunk, GenerationStats, Result, Session, check_vocab
from edgepack.runtime.tokenizer import BundleTokenizer, IncrementalDetokenizer

__all__ = [
    "BundleTokenizer",
    "Chunk",
    "GenerationStats",
    "IncrementalDetokenizer",
    "Result",
    "Session",
    "TorchDecoder",
    "load",
]


def load(bundle_path: str | Path, backend: str | None = None) -> Session:
    """Open a bundle (manifest and checksums validated) with its own backend, or `backend` if given.

    The tokenizer is read and checked against the model's vocabulary before the (slow) backend opens.
    A Session runs one generation at a time (see `Session`); load once per thread for parallel replies."""
    from edgepack.bundle import read_manifest
    from edgepack.runtime.backend import open_backend

    path = Path(bundle_path)
    manifest = read_manifest(path)
    tokenizer = BundleTokenizer.from_bundle(path, manifest)
    config = (manifest.get("model") or {}).get("config")
    model_vocab = config.get("vocab_size") if isinstance(config, dict) else None
    if isinstance(model_vocab, int):
        check_vocab(tokenizer.vocab_size, model_vocab)
    decoder = open_backend(backend or manifest["backend"]["name"], path, manifest)
    return Session(decoder, tokenizer, manifest)

