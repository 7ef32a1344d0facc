"""The bundle: one folder with everything an app needs, described by a versioned, checksummed manifest.

Writing is atomic: files go to a hidden temp folder beside the destination and the folder is renamed into
place only when the manifest is complete, so a failed or interrupted export leaves no half bundle behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from edgepack import FORMAT_VERSION, __version__
from edgepack.errors import EdgepackError

MANIFEST = "manifest.json"
FORMAT_NAME = "edgepack-bundle"
# Distributions whose exact versions a bundle records (the ones that shape the artifact).
TOOLCHAIN_PACKAGES = ("torch", "executorch", "torchao", "transformers", "tokenizers", "gguf", "numpy")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def toolchain_versions() -> dict[str, str]:
    versions = {"edgepack": __version__, "python": platform.python_version()}
    for name in TOOLCHAIN_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


class BundleWriter:
    """Collects files in a temp folder; `commit` writes the manifest with sizes and checksums."""

    def __init__(self, staging: Path) -> None:
        self.dir = staging

    def path(self, name: str) -> Path:
        return self.dir / name

    def write_text(self, name: str, text: str) -> Path:
        target = self.path(name)
        target.write_text(text, encoding="utf-8")
        return target

    def write_json(self, name: str, data: Any) -> Path:
        return self.write_text(name, json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    def finish(self, manifest: dict[str, Any]) -> dict[str, Any]:
        # Package folders (a Core ML .mlpackage) are listed file by file, by path relative to the bundle.
        files = {
            p.relative_to(self.dir).as_posix(): {"size": p.stat().st_size, "sha256": sha256_of(p)}
            for p in sorted(self.dir.rglob("*"))
            if p.is_file() and p.name != MANIFEST
        }
        full = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **manifest,
            "files": files,
            "toolchain": toolchain_versions(),
        }
        self.write_json(MANIFEST, full)
        return full


@contextmanager
def write_bundle(destination: Path, overwrite: bool = True) -> Iterator[BundleWriter]:
    """Yield a writer over a temp folder; move it to `destination` only if the block succeeds."""
    destination = destination.resolve()
    destination.parent.mkdir(parents=True, exist_ok=True)
    if destination.exists() and not overwrite:
        raise EdgepackError(f"{destination} already exists", "choose another -o or remove it")
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    try:
        writer = BundleWriter(staging)
        yield writer
        if not (staging / MANIFEST).exists():
            raise RuntimeError("bundle closed without a manifest")
        _move_into_place(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _move_into_place(staging: Path, destination: Path) -> None:
    if destination.exists():
        old = destination.with_name(f".{destination.name}.old-{os.getpid()}")
        os.replace(destination, old)
        os.replace(staging, destination)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, destination)


def read_manifest(bundle: Path, check_files: bool = True) -> dict[str, Any]:
    """Load and validate a bundle's manifest; with `check_files`, every file's size and sha256 too."""
    bundle = Path(bundle)
    if not bundle.exists():
        raise EdgepackError(f"bundle {bundle} does not exist", "pass the folder that `edgepack export` wrote")
    manifest_path = bundle / MANIFEST
    if not manifest_path.is_file():
        raise EdgepackError(
            f"{bundle} is not an edgepack bundle (no {MANIFEST})", "pass the folder that `edgepack export` wrote"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgepackError(f"{manifest_path} is not valid JSON ({e})", "re-export the bundle") from None
    if manifest.get("format") != FORMAT_NAME:
        raise EdgepackError(f"{manifest_path} is not an edgepack manifest", "re-export the bundle")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise EdgepackError(
            f"bundle format version {version} is not supported by this edgepack (reads {FORMAT_VERSION})",
            "re-export the bundle with this edgepack version",
        )
    if check_files:
        verify_files(bundle, manifest)
    return manifest


def verify_files(bundle: Path, manifest: dict[str, Any]) -> None:
    for name, expected in manifest.get("files", {}).items():
        path = bundle / name
        if not path.is_file():
            raise EdgepackError(f"bundle file {name} is missing from {bundle}", "re-export the bundle")
        if path.stat().st_size != expected["size"] or sha256_of(path) != expected["sha256"]:
            raise EdgepackError(
                f"bundle file {name} does not match its checksum in {MANIFEST} (modified or truncated)",
                "re-export the bundle",
            )
