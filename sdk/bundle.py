"""The bundle: one folder with everything an app needs, described by a versioned, checksummed manifest.

Writing never loses data: the destination is checked before any work (an existing bundle is replaced only
with `force`, any other non-empty folder never), files go to a hidden `.NAME.partial-PID-*` folder beside
the destination, and the finished folder is swapped into place atomically (Linux `renameat2(RENAME_EXCHANGE)`;
elsewhere two renames, with the previous bundle parked as `.NAME.old-PID` and put back by the next export or
load if the process died in between). Partial folders of dead processes are removed by the next export.

Reading trusts nothing: the manifest is validated against its schema (`edgepack.manifest_schema`), every
file it lists or names must be a plain relative path inside the bundle, reached without a symbolic link, a
regular file (never a FIFO or device) of the recorded size and sha256, and every file the runtime opens must
be listed, so checking cannot be switched off by editing the manifest.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import stat
import sys
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Mapping

from edgepack import FORMAT_VERSION, __version__
from edgepack.errors import EdgepackError, UsageError
from edgepack.manifest_schema import FORMAT_NAME, unsafe_path_reason, validate_manifest

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20  # a real manifest is a few KB; refuse to read a huge one into memory
# Distributions whose exact versions a bundle records (the ones that shape the artifact).
TOOLCHAIN_PACKAGES = (
    "torch", "executorch", "torchao", "transformers", "tokenizers", "gguf", "numpy",
    "onnx", "onnxruntime", "onnxruntime-qnn", "coremltools",
)  # fmt: skip
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
# Our own hidden folders beside a bundle: `.NAME.partial-PID-XXXX` (staging) and `.NAME.old-PID` (a parked bundle).
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:partial-(?P<pid>\d+)-[A-Za-z0-9_]+|old-(?P<old_pid>\d+))$")


def sha256_of(path: Path) -> str:
    """sha256 of a regular file, opened without following a symbolic link (a FIFO or device is refused)."""
    fd = os.open(path, _OPEN_FLAGS)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        digest = hashlib.sha256()
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
        _normal_modes(self.dir)
        files = {}
        for p in sorted(self.dir.rglob("*")):
            name = p.relative_to(self.dir).as_posix()
            if name != MANIFEST and stat.S_ISREG(p.lstat().st_mode):
                files[name] = {"size": p.lstat().st_size, "sha256": sha256_of(p)}
        full = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **manifest,
            "files": files,
            "toolchain": toolchain_versions(),
        }
        try:  # a manifest the reader would refuse is a bug of the exporter: fail now, not at the first load
            validate_manifest(full, "the manifest being written")
            _check_named_files_listed(full, "the manifest being written")
        except EdgepackError as e:
            raise RuntimeError(f"edgepack produced an invalid bundle manifest: {e.problem}") from None
        self.write_json(MANIFEST, full)
        return full


def _normal_modes(folder: Path) -> None:
    """Give everything in the bundle the user's normal modes (some writers, e.g. safetensors, create 0600
    files): folders as the staging folder (0777 & ~umask), files the same without execute bits."""
    folder_mode = stat.S_IMODE(folder.stat().st_mode)
    for p in folder.rglob("*"):
        mode = p.lstat().st_mode
        if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
            os.chmod(p, folder_mode if stat.S_ISDIR(mode) else folder_mode & 0o666)


# --- writing: the destination checked up front, staging, the swap into place ------------------------------


def check_destination(destination: str | Path, force: bool = False) -> Path:
    """Refuse, in milliseconds and before any model is loaded, an output that would lose data or cannot be
    written. Returns the destination as an absolute path."""
    destination = Path(destination).resolve()
    restore_interrupted_swap(destination)
    try:
        if os.path.lexists(destination):
            if not destination.is_dir():
                raise UsageError(f"{destination} exists and is not a folder", "choose another -o")
            if is_bundle(destination):
                if not force:
                    raise UsageError(
                        f"{destination} already holds an edgepack bundle", "pass --force to replace it, or choose another -o"
                    )
            elif any(destination.iterdir()):
                raise UsageError(
                    f"{destination} is a folder that is not empty and not an edgepack bundle",
                    "choose another -o (edgepack replaces only its own bundles, with --force)",
                )
    except OSError as e:
        raise EdgepackError(f"cannot read {destination} ({e.strerror})", "choose another -o") from None
    _check_writable(destination)
    return destination


def is_bundle(folder: Path) -> bool:
    """Whether `folder` holds an edgepack manifest (its files are not checked: this is about replacing it)."""
    try:
        manifest = _read_json(folder / MANIFEST)
    except (EdgepackError, OSError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT_NAME


def _check_writable(destination: Path) -> None:
    """Try to create (and remove) a folder where the bundle will be staged: the only honest test of
    writability (read-only mounts, ACLs, /proc, root's override of mode bits)."""
    existing = destination.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise EdgepackError(f"cannot create {destination.parent}: {existing} is not a folder", "choose another -o")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{destination.name}.partial-{os.getpid()}-", dir=existing))
    except OSError as e:
        raise EdgepackError(
            f"cannot write to {existing} ({e.strerror})", "choose another -o, or make that folder writable"
        ) from None


@contextmanager
def write_bundle(destination: str | Path, force: bool = False) -> Iterator[BundleWriter]:
    """Yield a writer over a staging folder; move it to `destination` only if the block succeeds.

    An existing bundle at `destination` is replaced only with `force`; it survives any failure. Out of
    space while writing is one clear error naming the destination."""
    destination = check_destination(destination, force)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_leftovers(destination.parent)
        staging = _make_staging(destination)
    except OSError as e:
        raise _write_error(e, destination) from None
    try:
        yield BundleWriter(staging)
        if not (staging / MANIFEST).exists():
            raise RuntimeError("bundle closed without a manifest")
        _move_into_place(staging, destination)
        stale = destination.with_name(destination.name + FAILED_SUFFIX)
        if not stale.is_symlink() and is_bundle(stale):  # an earlier try's failed bundle: superseded
            shutil.rmtree(stale, ignore_errors=True)
    except BaseException as e:
        if getattr(e, "keep_staged", False) and (staging / MANIFEST).exists():
            _keep_failed(staging, destination, e)
            raise
        shutil.rmtree(staging, ignore_errors=True)
        if _out_of_space(e):
            raise _write_error(e, destination) from None
        raise


FAILED_SUFFIX = ".failed"


def _keep_failed(staging: Path, destination: Path, error: Any) -> None:
    """A finished bundle that failed its quality gate goes to DESTINATION.failed (replacing an earlier failed
    bundle there, never any other folder), so a retry or a decision to ship it anyway costs no new export."""
    kept = destination.with_name(destination.name + FAILED_SUFFIX)
    try:
        if kept.is_symlink() or (kept.exists() and not is_bundle(kept)):
            raise FileExistsError(kept)
        if kept.exists():
            shutil.rmtree(kept)
        _normal_modes(staging)
        os.rename(staging, kept)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        return
    if hasattr(error, "kept"):
        error.kept(kept)


def _make_staging(destination: Path) -> Path:
    """`.NAME.partial-PID-XXXX` beside the destination, with the user's normal folder mode (umask applied)."""
    while True:
        staging = destination.with_name(f".{destination.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.mkdir(staging, 0o777)
            return staging
        except FileExistsError:
            continue


def _out_of_space(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    # native writers (safetensors, protobuf) raise their own types with the OS message inside
    return not isinstance(e, EdgepackError) and any(
        text in str(e) for text in ("No space left on device", "Disk quota exceeded")
    )


def _write_error(e: OSError | BaseException, destination: Path) -> EdgepackError:
    if _out_of_space(e):  # the file being written when the OS names it (it may be a temp file elsewhere)
        where = getattr(e, "filename", None) or destination
        return EdgepackError(f"no space left on the device writing {where}", "free some space or choose another -o")
    return EdgepackError(f"cannot write {destination} ({getattr(e, 'strerror', None) or e})", "choose another -o")


def _move_into_place(staging: Path, destination: Path, exchange: bool = True) -> None:
    """Put the finished bundle at `destination`; a previous bundle there is swapped out atomically where the OS
    can (`exchange`), else parked as `.NAME.old-PID` until the new one is in place."""
    if not os.path.lexists(destination):
        os.rename(staging, destination)
        return
    if exchange and _exchange(staging, destination):
        shutil.rmtree(staging, ignore_errors=True)  # now the previous bundle; a kill here leaves a stale partial
        return
    old = destination.with_name(f".{destination.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)  # our own leftover of an earlier failed swap, if any
    try:
        os.rename(destination, old)
        os.rename(staging, destination)  # a kill just before this leaves `old`: restore_interrupted_swap
    except BaseException:  # an error or Ctrl-C between the two: the previous bundle goes back at once
        if os.path.lexists(old) and not os.path.lexists(destination):
            os.rename(old, destination)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux renameat2(RENAME_EXCHANGE); False where the OS or file system
    cannot (then the caller falls back to two renames)."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # glibc < 2.28, musl
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _leftovers(parent: Path, name: str | None = None) -> Iterator[tuple[Path, str, int, bool]]:
    """Our hidden folders in `parent` (of bundle `name`, or any): (path, bundle name, pid, is a parked bundle)."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        match = _LEFTOVER.match(entry.name)
        if not match or (name is not None and match["name"] != name) or not entry.is_dir(follow_symlinks=False):
            continue
        old = match["old_pid"] is not None
        yield Path(entry.path), match["name"], int(match["old_pid"] if old else match["pid"]), old


def _dead(pid: int) -> bool:
    import psutil

    return pid != os.getpid() and not psutil.pid_exists(pid)


def restore_interrupted_swap(destination: Path) -> bool:
    """A process killed between the two renames of a replace left the previous bundle parked as
    `.NAME.old-PID` and nothing at `destination`: put it back. True if a bundle was restored."""
    destination = Path(destination)
    if os.path.lexists(destination):
        return False
    parked = [p for p, _, pid, old in _leftovers(destination.parent, destination.name) if old and _dead(pid)]
    for candidate in sorted(parked, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            os.rename(candidate, destination)
            return True
        except OSError:
            continue
    return False


def remove_stale_leftovers(parent: Path) -> None:
    """Remove the partial folders of exports that were killed (their process is dead), and bundles parked
    by a replace that was killed after the new bundle was already in place."""
    for path, name, pid, old in _leftovers(parent):
        if not _dead(pid) or (old and not os.path.lexists(parent / name)):
            continue  # a live export's, or the only copy of a bundle (restore_interrupted_swap puts it back)
        if hasattr(os, "getuid") and path.lstat().st_uid != os.getuid():
            continue
        shutil.rmtree(path, ignore_errors=True)


# --- reading: schema, paths, files --------------------------------------------------------------------------


def read_manifest(bundle: str | Path, check_files: bool = True) -> dict[str, Any]:
    """Load and validate a bundle's manifest; every listed or named file must be a regular file inside the
    bundle of the recorded size; with `check_files`, its sha256 too."""
    bundle = Path(bundle)
    restore_interrupted_swap(bundle)
    if not bundle.exists():
        raise EdgepackError(f"bundle {bundle} does not exist", "pass the folder that `edgepack export` wrote")
    manifest_path = bundle / MANIFEST
    if not bundle.is_dir() or not os.path.lexists(manifest_path):
        raise EdgepackError(
            f"{bundle} is not an edgepack bundle (no {MANIFEST})", "pass the folder that `edgepack export` wrote"
        )
    manifest = _read_json(manifest_path)
    if isinstance(manifest, dict):
        if manifest.get("format") != FORMAT_NAME:
            raise EdgepackError(f"{manifest_path} is not an edgepack manifest", "re-export the bundle")
        version = manifest.get("format_version")
        if isinstance(version, int) and not isinstance(version, bool) and version != FORMAT_VERSION:
            raise EdgepackError(
                f"bundle format version {version} is not supported by this edgepack (reads {FORMAT_VERSION})",
                "re-export the bundle with this edgepack version",
            )
    validate_manifest(manifest, str(manifest_path))
    verify_files(bundle, manifest, check_hashes=check_files)
    return manifest


def _read_json(path: Path) -> Any:
    """A JSON file that must be a regular file of sane size, opened without following a symbolic link."""
    try:
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode) or not stat.S_ISREG(info.st_mode):
            kind = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a regular file"
            raise EdgepackError(f"{path} is {kind}", "re-export the bundle")
        if info.st_size > MAX_MANIFEST_BYTES:
            raise EdgepackError(f"{path} is {info.st_size} bytes, far more than any manifest", "re-export the bundle")
        fd = os.open(path, _OPEN_FLAGS)
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise EdgepackError(f"cannot read {path} ({e.strerror})", "re-export the bundle") from None
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, huge numbers, deep nesting
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise EdgepackError(f"{path} is not valid JSON ({reason})", "re-export the bundle") from None


def verify_files(bundle: Path, manifest: Mapping[str, Any], check_hashes: bool = True) -> None:
    """Every file the manifest lists is a regular file inside the bundle with the recorded size (and
    sha256); every file it names is listed; the bundle holds nothing unlisted, no link and no special file."""
    bundle = Path(bundle)
    files: Mapping[str, Mapping[str, Any]] = manifest["files"]
    _check_named_files_listed(manifest, str(bundle / MANIFEST))
    _check_tree(bundle, files)
    for name, expected in files.items():  # cheap checks of every file before reading any of them
        info = _lstat_inside(bundle, name)
        if not stat.S_ISREG(info.st_mode):
            raise EdgepackError(f"bundle file {name} in {bundle} is not a regular file", "re-export the bundle")
        if info.st_size != expected["size"]:
            raise _mismatch(name)
    if check_hashes:
        for name, expected in files.items():
            try:
                digest = sha256_of(bundle / name)
            except OSError as e:
                raise EdgepackError(f"cannot read bundle file {name} in {bundle} ({e.strerror})", "re-export the bundle") from None
            if digest != expected["sha256"]:
                raise _mismatch(name)


def _mismatch(name: str) -> EdgepackError:
    return EdgepackError(
        f"bundle file {name} does not match its checksum in {MANIFEST} (modified or truncated)", "re-export the bundle"
    )


def named_files(manifest: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(field, path) of every file or package folder the manifest tells the runtime to open."""
    tokenizer, backend = manifest.get("tokenizer") or {}, manifest.get("backend") or {}
    cpu, npu = backend.get("cpu") or {}, backend.get("npu") or {}
    named = [
        ("tokenizer.file", tokenizer.get("file")),
        ("tokenizer.config_file", tokenizer.get("config_file")),
        ("tokenizer.chat_template_file", tokenizer.get("chat_template_file")),
        ("backend.program", backend.get("program")),
        ("backend.cpu.program", cpu.get("program")),
        ("backend.genai_config", backend.get("genai_config")),  # onnxruntime-genai's config beside the CPU model
        ("backend.npu.prefill_program", npu.get("prefill_program")),
        ("backend.npu.decode_program", npu.get("decode_program")),
        *[(f"backend.npu.context_binaries[{i}]", b) for i, b in enumerate(npu.get("context_binaries") or [])],
    ]
    return [(field, name) for field, name in named if isinstance(name, str)]


def _listed_as(files: Mapping[str, Any], name: str) -> str | None:
    """"file" if `files` lists `name`, "folder" if it lists files under it (a package), else None."""
    if name in files:
        return "file"
    prefix = name + "/"
    return "folder" if any(key.startswith(prefix) for key in files) else None


def _check_named_files_listed(manifest: Mapping[str, Any], where: str) -> None:
    files = manifest.get("files") or {}
    for field, name in named_files(manifest):
        if _listed_as(files, name) is None:
            raise EdgepackError(
                f"{where}: {field} names {name!r}, which is not listed in its files (so it would not be checked)",
                "re-export the bundle",
            )


def _check_tree(bundle: Path, files: Mapping[str, Any]) -> None:
    """The bundle holds only folders and listed regular files; hidden entries (".DS_Store") are ignored
    unless listed, and listed ones are checked one by one."""

    def unreadable(e: OSError) -> None:
        raise EdgepackError(f"cannot read {ascii(e.filename)} ({e.strerror})", "check the bundle's permissions")

    for folder, dirs, names in os.walk(bundle, onerror=unreadable):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for entry in [*dirs, *names]:
            path = Path(folder, entry)
            name = path.relative_to(bundle).as_posix()
            if entry.startswith(".") or name == MANIFEST:
                continue
            shown = name if name.isprintable() else ascii(name)
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise EdgepackError(
                    f"{shown} in bundle {bundle} is a symbolic link", "a bundle holds only plain files: re-export it"
                )
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise EdgepackError(
                    f"{shown} in bundle {bundle} is a special file (FIFO, socket or device)",
                    "a bundle holds only plain files: re-export it",
                )
            if name not in files:
                raise EdgepackError(
                    f"bundle file {shown} in {bundle} is not listed in its {MANIFEST}", "remove it or re-export the bundle"
                )


def _lstat_inside(bundle: Path, name: str) -> os.stat_result:
    """lstat of `name` under `bundle`, refusing an unsafe name and a symbolic link on any part of the path."""
    reason = unsafe_path_reason(name)
    if reason:
        raise EdgepackError(f"bundle {bundle} names the file {name!r}, which {reason}", "re-export the bundle")
    current = bundle
    parts = name.split("/")
    for i, part in enumerate(parts):
        current = current / part
        try:
            info = os.lstat(current)
        except (FileNotFoundError, NotADirectoryError):
            raise EdgepackError(f"bundle file {name} is missing from {bundle}", "re-export the bundle") from None
        except OSError as e:
            raise EdgepackError(f"cannot read bundle file {name} in {bundle} ({e.strerror})", "re-export the bundle") from None
        if stat.S_ISLNK(info.st_mode):
            raise EdgepackError(
                f"bundle file {name} in {bundle} goes through a symbolic link ({'/'.join(parts[: i + 1])})",
                "a bundle holds only plain files: re-export it",
            )
        if i < len(parts) - 1 and not stat.S_ISDIR(info.st_mode):
            raise EdgepackError(f"bundle file {name} is missing from {bundle}", "re-export the bundle")
    return info


def bundle_file(bundle: str | Path, manifest: Mapping[str, Any], name: str) -> Path:
    """The path of a file (or package folder) the manifest names, checked: a plain relative path listed in
    `files`, inside the bundle, reached without a symbolic link, a regular file (a folder for a package).
    Runtime backends open manifest-named files only through this. (A manifest from `read_manifest` always
    has `files`; one built by hand without it, as in unit tests of a backend, is held to the path checks.)"""
    bundle = Path(bundle)
    reason = unsafe_path_reason(name)
    if reason:
        shown = repr(name) if not isinstance(name, str) or name.isprintable() else ascii(name)
        raise EdgepackError(f"the manifest of {bundle} names {shown}, which {reason}", "re-export the bundle")
    kind = _listed_as(manifest["files"] or {}, name) if "files" in manifest else None
    if kind is None and "files" in manifest:
        raise EdgepackError(
            f"the manifest of {bundle} names {name!r}, which is not listed in its files (so it would not be checked)",
            "re-export the bundle",
        )
    mode = _lstat_inside(bundle, name).st_mode
    if kind is None:
        kind = "folder" if stat.S_ISDIR(mode) else "file"
    if not (stat.S_ISREG(mode) if kind == "file" else stat.S_ISDIR(mode)):
        raise EdgepackError(f"bundle file {name} in {bundle} is not a regular {kind}", "re-export the bundle")
    return bundle / name
