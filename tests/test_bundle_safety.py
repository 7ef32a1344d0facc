"""Bundles against hostile or clumsy input (issue 13): `export -o` never loses data, reading never leaves the
bundle, a manifest of the wrong shape is one clear line, and a fuzzer finds nothing but `EdgepackError`s."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from edgepack.bundle import (
    MANIFEST,
    TOOLCHAIN_PACKAGES,
    _exchange,
    _move_into_place,
    bundle_file,
    check_destination,
    read_manifest,
    toolchain_versions,
    write_bundle,
)
from edgepack.cli import main
from edgepack.errors import EdgepackError, UsageError

TINY_CONFIG = {
    "architecture": "llama", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2,
    "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True, "attention_bias": False, "max_position_embeddings": 512, "rope_scaling": None,
}  # fmt: skip
FILES = {
    "model.bin": b"weights",
    "tokenizer.json": b'{"vocab": [1, 2, 3]}',
    "tokenizer_config.json": b"{}",
    "chat_template.jinja": b"{{ messages }}",
}
TOKENIZER = {
    "file": "tokenizer.json", "config_file": "tokenizer_config.json", "chat_template_file": "chat_template.jinja",
    "bos_id": 1, "add_bos": False, "eos_ids": [2], "stop_ids": [2], "think": None,
}  # fmt: skip
BACKEND = {"name": "reference", "delegate": None, "program": "model.bin", "max_prefill": 64}


def make_bundle(path: Path, files: dict[str, bytes] = FILES, force: bool = False, **sections: Any) -> dict[str, Any]:
    """A bundle written by BundleWriter with hand-made files and every section the runtime reads."""
    with write_bundle(path, force=force) as writer:
        for name, data in files.items():
            writer.path(name).parent.mkdir(parents=True, exist_ok=True)
            writer.path(name).write_bytes(data)
        return writer.finish(copy.deepcopy({
            "model": {"name": "hand-made", "architecture": "llama", "parameters": 94528, "config": TINY_CONFIG},
            "quantization": {"name": "fp32"}, "backend": BACKEND, "target": "host", "context_length": 64,
            "tokenizer": TOKENIZER, "generation": {"max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0, "top_k": 0},
            **sections,
        }))  # fmt: skip


def snapdragon_bundle(path: Path) -> dict[str, Any]:
    """The shape of a snapdragon-x2 bundle (exporters/onnx.py + onnx_qnn.py), with stand-in file contents."""
    graphs = {"model.onnx": b"cpu", "npu_prefill_ctx.onnx": b"p", "npu_decode_ctx.onnx": b"d",
              "npu_prefill_ctx_qnn.bin": b"pb", "npu_decode_ctx_qnn.bin": b"db", "genai_config.json": b"{}"}  # fmt: skip
    npu = {
        "prefill_program": "npu_prefill_ctx.onnx", "decode_program": "npu_decode_ctx.onnx",
        "context_binaries": ["npu_prefill_ctx_qnn.bin", "npu_decode_ctx_qnn.bin"], "context": 64, "prefill_len": 32,
        "ep": "QNNExecutionProvider", "ep_options": {"backend_type": "htp", "soc_model": "SC8480XP", "htp_arch": "81"},
        "soc_id": 88, "qnn_sdk": "2.51.0", "onnxruntime_qnn": "2.7.0", "inv_freq": [1.0, 0.1], "first_position": "cpu",
    }  # fmt: skip
    backend = {"name": "onnx", "delegate": "qnn", "program": "npu_decode_ctx.onnx", "max_prefill": 64,
               "cpu": {"program": "model.onnx"}, "npu": npu, "fallback": "cpu", "genai_config": "genai_config.json"}  # fmt: skip
    verification = {"status": "passed", "preset": "int8"}
    return make_bundle(path, {**FILES, **graphs}, backend=backend, target="snapdragon-x2", verification=verification)


def rewrite(bundle: Path, manifest: Any) -> None:
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def one_line_error(call: Callable[[], Any], *words: str) -> str:
    """The EdgepackError `call` raises: one line, naming every word."""
    with pytest.raises(EdgepackError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message
    return message


def snapshot(folder: Path) -> dict[str, Any]:
    """Every entry under `folder` with its mode (and bytes for files), and the folder's own mode."""
    entries: dict[str, Any] = {".": stat.S_IMODE(folder.stat().st_mode)}
    for p in sorted(folder.rglob("*")):
        entries[p.relative_to(folder).as_posix()] = (stat.S_IMODE(p.stat().st_mode), p.is_file() and p.read_bytes())
    return entries


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def assert_cli_error(result: Result, *words: str) -> str:
    """Exit code != 0, exactly one line on stderr (`error: ...`), no traceback."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face folder: a tiny random Llama with a 320-token word-level tokenizer (exports in seconds)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    from conftest import random_model, tiny_config

    folder = tmp_path_factory.mktemp("tiny_hf")
    cfg = tiny_config(vocab_size=320)
    model = random_model(cfg, max_context=64)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight" and "cache" not in k}
    save_file(state, str(folder / "model.safetensors"))
    words = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(33, 127)] + [f"w{i}" for i in range(200)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<s>", "</s>"])
    (folder / "tokenizer.json").write_text(tokenizer.to_str())
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False}))
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    hf = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": True,
        "max_position_embeddings": 512, "bos_token_id": 1, "eos_token_id": 2,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(hf))
    return folder


def export_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["export", "-m", str(model), "--backend", "reference", "-q", "fp32", "--max-context", "64", "-o", str(out), *extra]


# --- 1. no data loss on `edgepack export -o DIR` ------------------------------------------------------------


def test_export_refuses_a_folder_that_is_not_a_bundle(tmp_path: Path) -> None:
    precious = tmp_path / "mine"
    (precious / "photos").mkdir(parents=True)
    (precious / "precious.txt").write_text("do not lose me")
    (precious / "photos" / "a.jpg").write_bytes(b"\xff\xd8 jpeg")
    precious.chmod(0o755)
    before = snapshot(precious)
    for extra in ((), ("--force",)):  # --force replaces bundles only, never other folders
        line = assert_cli_error(cli("export", "-o", str(precious), *extra), str(precious), "not an edgepack bundle")
        assert "choose another -o" in line
        assert snapshot(precious) == before
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]


def test_export_refuses_to_replace_a_bundle_without_force(tmp_path: Path) -> None:
    make_bundle(tmp_path / "b")
    before = snapshot(tmp_path / "b")
    assert_cli_error(cli("export", "-o", str(tmp_path / "b")), str(tmp_path / "b"), "already holds", "--force", "another -o")
    assert snapshot(tmp_path / "b") == before
    with pytest.raises(UsageError, match="--force"):
        with write_bundle(tmp_path / "b") as writer:  # the API refuses too
            writer.write_text("model.bin", "new")
    assert snapshot(tmp_path / "b") == before and [p.name for p in tmp_path.iterdir()] == ["b"]


def test_export_refuses_a_file_as_output(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep")
    assert_cli_error(cli("export", "-o", str(tmp_path / "notes.txt")), "notes.txt", "is not a folder")
    assert (tmp_path / "notes.txt").read_text() == "keep"


def test_export_with_force_replaces_a_bundle(tmp_path: Path, tiny_model: Path) -> None:
    out = tmp_path / "b"
    make_bundle(out)
    result = cli(*export_args(tiny_model, out, "--no-verify", "--force"))
    assert result.exit_code == 0, result.output
    assert read_manifest(out)["model"]["name"] == tiny_model.name
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no staging or parked folder left
    (tmp_path / "empty").mkdir()  # an empty folder is not data: written into without --force
    assert cli(*export_args(tiny_model, tmp_path / "empty", "--no-verify")).exit_code == 0
    assert read_manifest(tmp_path / "empty")["backend"]["name"] == "reference"


def test_unwritable_output_is_refused_by_the_plan(tmp_path: Path, tiny_model: Path) -> None:
    from edgepack.export import plan_export

    if sys.platform.startswith("linux"):  # /proc refuses new folders to everyone, root included
        one_line_error(lambda: plan_export(str(tiny_model), "host", "fp32", 64, "/proc/edgepack/b", "reference"),
                       "cannot write to /proc", "choose another -o")
        assert_cli_error(cli(*export_args(tiny_model, Path("/proc/edgepack/b"))), "cannot write to /proc")
    if os.geteuid() != 0:  # mode bits bind everyone but root
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        one_line_error(lambda: plan_export(str(tiny_model), "host", "fp32", 64, locked / "b", "reference"),
                       f"cannot write to {locked}")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_out_of_space_while_writing_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(EdgepackError) as err:
        with write_bundle(tmp_path / "b") as writer:
            writer.write_text("small.txt", "fits")
            os.symlink("/dev/full", writer.path("model.bin"))  # every write there fails with ENOSPC
            writer.write_text("model.bin", "does not fit")
    assert str(err.value) == f"no space left on the device writing {tmp_path / 'b'}; free some space or choose another -o"
    assert list(tmp_path.iterdir()) == []


def _can_mount_in_a_namespace() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _can_mount_in_a_namespace(), reason="needs user + mount namespaces (unshare -rm)")
def test_out_of_space_through_the_cli(tmp_path: Path, tiny_model: Path) -> None:
    """A real full disk: a 128 KB tmpfs in a private mount namespace; the weights (380 KB) do not fit."""
    disk = tmp_path / "disk"
    disk.mkdir()
    command = " ".join([f"mount -t tmpfs -o size=128k tmpfs {disk} &&", "exec", sys.executable, "-m", "edgepack.cli",
                        *export_args(tiny_model, disk / "b", "--no-verify")])
    env = {k: v for k, v in os.environ.items() if k != "EDGEPACK_DEBUG"}
    result = subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: no space left on the device writing {disk / 'b'}; free some space or choose another -o"]
    assert "Traceback" not in result.stderr


def _start_export(model: Path, out: Path) -> tuple[subprocess.Popen, Path]:
    """An export (with the quality gate: seconds with its staging folder complete) and that folder, once there."""
    env = {k: v for k, v in os.environ.items() if k != "EDGEPACK_DEBUG"}
    proc = subprocess.Popen([sys.executable, "-m", "edgepack.cli", *export_args(model, out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        staged = list(out.parent.glob(f".{out.name}.partial-{proc.pid}-*/{MANIFEST}"))
        if staged:
            return proc, staged[0].parent
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"the export never staged a bundle: {proc.communicate()[1]}")


def test_sigterm_exits_cleanly_and_removes_the_staging_folder(tmp_path: Path, tiny_model: Path) -> None:
    proc, staging = _start_export(tiny_model, tmp_path / "b")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted" and "Traceback" not in stderr
    assert not staging.exists() and list(tmp_path.iterdir()) == []


def test_a_sigterm_that_c_code_turned_into_another_error_still_exits_as_interrupted(monkeypatch, capsys) -> None:
    """SIGTERM raises KeyboardInterrupt in the handler; landing inside torch's C code it can come out as another
    error (seen here: "could not determine the shape of object type 'torch.storage.UntypedStorage'"). The CLI
    knows a signal arrived and exits as interrupted, not with an internal error."""
    from edgepack import cli as cli_module

    @cli_module._handle_errors
    def command() -> None:
        raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'")

    with pytest.raises(SystemExit) as exited:
        command()
    assert exited.value.code == 1  # without a signal: an internal error
    monkeypatch.setattr(cli_module, "_SIGNALLED", [signal.SIGTERM])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        command()
    assert exited.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"


def test_sigkill_leftovers_are_removed_by_the_next_export(tmp_path: Path, tiny_model: Path) -> None:
    proc, staging = _start_export(tiny_model, tmp_path / "b")
    proc.kill()
    proc.communicate(timeout=60)
    assert staging.is_dir() and f"partial-{proc.pid}-" in staging.name  # what a SIGKILL leaves: named by its PID
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        running = tmp_path / f".other.partial-{alive.pid}-abcd"  # an export still running: left alone
        running.mkdir()
        result = cli(*export_args(tiny_model, tmp_path / "c", "--no-verify"))
        assert result.exit_code == 0, result.output
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["c", running.name])
    finally:
        alive.kill()
        alive.wait()


def test_a_kill_between_the_two_renames_is_recovered(tmp_path: Path) -> None:
    """Where the swap takes two renames, a process killed between them leaves only `.NAME.old-PID`: the next
    load or export of that path puts the previous bundle back."""
    for recover in (read_manifest, lambda path: check_destination(path, force=True)):
        make_bundle(tmp_path / "b", force=True)
        before = snapshot(tmp_path / "b")
        os.rename(tmp_path / "b", tmp_path / f".b.old-{dead_pid()}")
        recover(tmp_path / "b")
        assert snapshot(tmp_path / "b") == before
        assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_a_parked_bundle_is_removed_once_its_replacement_is_in_place(tmp_path: Path) -> None:
    """Killed after the second rename: the new bundle is in place, the parked old one is stale."""
    make_bundle(tmp_path / "b")
    shutil.copytree(tmp_path / "b", tmp_path / f".b.old-{dead_pid()}")
    only_copy = tmp_path / f".c.old-{dead_pid()}"  # the only copy of bundle c: kept for its next load to restore
    shutil.copytree(tmp_path / "b", only_copy)
    make_bundle(tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["b", "d", only_copy.name])
    assert read_manifest(tmp_path / "c")["model"]["name"] == "hand-made" and not only_copy.exists()


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_replacing_a_bundle_leaves_only_the_new_one(tmp_path: Path, exchange: bool) -> None:
    make_bundle(tmp_path / "b")
    staging = tmp_path / ".b.partial-1-x"
    staging.mkdir()
    (staging / "new.txt").write_text("new")
    _move_into_place(staging, tmp_path / "b", exchange=exchange)
    assert [p.name for p in tmp_path.iterdir()] == ["b"] and (tmp_path / "b" / "new.txt").read_text() == "new"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux")
def test_renameat2_exchange_swaps_two_folders(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("b")
    assert _exchange(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a" / "x").read_text() == "b" and (tmp_path / "b" / "x").read_text() == "a"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_bundles_get_normal_modes(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        with write_bundle(tmp_path / "b") as writer:
            for name, data in FILES.items():
                writer.path(name).write_bytes(data)
            os.chmod(writer.path("model.bin"), 0o600)  # as safetensors writes its files
            (writer.path("pkg")).mkdir(mode=0o700)
            (writer.path("pkg") / "w.bin").write_bytes(b"w")
            writer.finish({"model": {"name": "m", "config": TINY_CONFIG}, "backend": BACKEND, "context_length": 64,
                           "tokenizer": TOKENIZER})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "b").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "b" / "pkg").stat().st_mode) == 0o777 & ~umask
    for name in ("model.bin", "tokenizer.json", "pkg/w.bin", MANIFEST):
        assert stat.S_IMODE((tmp_path / "b" / name).stat().st_mode) == 0o666 & ~umask, name


# --- 2. nothing read outside a bundle ----------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A secret next to the bundle, with the bytes of the bundle's own model file (so its hash would match)."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_bytes(FILES["model.bin"])
    return tmp_path / "outside" / "secret.txt"


@pytest.mark.parametrize("name", ["../outside/secret.txt", "/etc/passwd", "sub/../../outside/secret.txt",
                                  "./model.bin", "C:/Windows/win.ini", "a\\..\\b", "a//b", "line\nbreak"])
def test_files_entries_outside_the_bundle_are_refused_unread(tmp_path: Path, outside: Path, name: str) -> None:
    manifest = make_bundle(tmp_path / "b")
    manifest["files"][name] = {"size": 7, "sha256": hashlib.sha256(FILES["model.bin"]).hexdigest()}
    rewrite(tmp_path / "b", manifest)
    message = one_line_error(lambda: read_manifest(tmp_path / "b"), "files entry", "re-export")
    assert "checksum" not in message and "missing" not in message  # refused on the name, never looked up


def test_a_symlink_to_outside_is_refused(tmp_path: Path, outside: Path) -> None:
    make_bundle(tmp_path / "b")
    (tmp_path / "b" / "model.bin").unlink()
    (tmp_path / "b" / "model.bin").symlink_to(outside)  # same bytes: following it would pass the checksum
    one_line_error(lambda: read_manifest(tmp_path / "b"), "model.bin", "symbolic link")
    one_line_error(lambda: read_manifest(tmp_path / "b", check_files=False), "symbolic link")


def test_a_symlinked_folder_on_the_path_is_refused(tmp_path: Path, outside: Path) -> None:
    manifest = make_bundle(tmp_path / "b", {**FILES, "sub/x.bin": FILES["model.bin"]})
    shutil.rmtree(tmp_path / "b" / "sub")
    (tmp_path / "b" / "sub").symlink_to(outside.parent, target_is_directory=True)
    (outside.parent / "x.bin").write_bytes(FILES["model.bin"])
    assert "sub/x.bin" in manifest["files"]
    one_line_error(lambda: read_manifest(tmp_path / "b"), "sub", "symbolic link")
    hidden = tmp_path / "c"  # a link in a listed path is refused even under a hidden folder
    make_bundle(hidden, {**FILES, ".cache/x.bin": FILES["model.bin"]})
    shutil.rmtree(hidden / ".cache")
    (hidden / ".cache").symlink_to(outside.parent, target_is_directory=True)
    one_line_error(lambda: read_manifest(hidden), ".cache/x.bin", "symbolic link (.cache)")


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _socket(path: Path) -> None:
    cwd = os.getcwd()
    os.chdir(path.parent)  # a socket's path is limited to ~100 bytes: bind by its short relative name
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(path.name)
    finally:
        os.chdir(cwd)


def _device(path: Path) -> None:
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD")


@pytest.mark.parametrize("make", [_fifo, _socket, _device], ids=["fifo", "socket", "device"])
@pytest.mark.parametrize("listed", [True, False], ids=["listed", "unlisted"])
def test_special_files_are_refused_without_being_opened(tmp_path: Path, make: Callable, listed: bool) -> None:
    make_bundle(tmp_path / "b")
    target = tmp_path / "b" / ("model.bin" if listed else "extra")
    if listed:
        target.unlink()
    make(target)  # a FIFO opened for reading would block this test forever
    one_line_error(lambda: read_manifest(tmp_path / "b"), "special file")


NAMED_FIELDS = [
    ("tokenizer", "file"), ("tokenizer", "config_file"), ("tokenizer", "chat_template_file"), ("backend", "program"),
    ("backend.cpu", "program"), ("backend.npu", "prefill_program"), ("backend.npu", "decode_program"),
    ("backend.npu.context_binaries", 1), ("backend", "genai_config"),
]  # fmt: skip


def _section(manifest: dict[str, Any], dotted: str) -> dict[str, Any]:
    for key in dotted.split("."):
        manifest = manifest[key]
    return manifest


@pytest.mark.parametrize("section,key", NAMED_FIELDS)
def test_every_named_file_is_a_listed_relative_path(tmp_path: Path, section: str, key: str | int) -> None:
    bundle = tmp_path / "b"
    manifest = snapdragon_bundle(bundle)
    read_manifest(bundle)
    field = f"{section}[{key}]" if isinstance(key, int) else f"{section}.{key}"
    for bad in ("../outside.json", "/etc/passwd"):
        changed = copy.deepcopy(manifest)
        _section(changed, section)[key] = bad
        rewrite(bundle, changed)
        one_line_error(lambda: read_manifest(bundle), f"field {field}", repr(bad), "relative path", "re-export")
    (bundle / ".unlisted.json").write_text("{}")  # present, hidden (so allowed on disk), but never checked
    changed = copy.deepcopy(manifest)
    _section(changed, section)[key] = ".unlisted.json"
    rewrite(bundle, changed)
    one_line_error(lambda: read_manifest(bundle), field, "'.unlisted.json'", "not listed", "re-export")


def test_checking_cannot_be_switched_off_by_editing_the_manifest(tmp_path: Path) -> None:
    manifest = make_bundle(tmp_path / "b")
    (tmp_path / "b" / "model.bin").write_text("corrupt")  # same size, other bytes
    for change, words in [
        (lambda m: m.pop("files"), ("field files is missing",)),
        (lambda m: m.update(files={}), ("field files", "at least 1")),
        (lambda m: m["files"].pop("model.bin"), ("backend.program", "'model.bin'", "not listed")),
    ]:
        changed = copy.deepcopy(manifest)
        change(changed)
        rewrite(tmp_path / "b", changed)
        for check_files in (True, False):
            one_line_error(lambda: read_manifest(tmp_path / "b", check_files=check_files), *words, "re-export")


def test_unlisted_files_are_refused_hidden_ones_ignored(tmp_path: Path) -> None:
    make_bundle(tmp_path / "b")
    (tmp_path / "b" / ".DS_Store").write_bytes(b"finder")
    read_manifest(tmp_path / "b")
    (tmp_path / "b" / "model.onnx.data").write_bytes(b"weights a runtime would load beside its program")
    one_line_error(lambda: read_manifest(tmp_path / "b"), "model.onnx.data", "not listed", "remove it or re-export")


def test_package_folders_are_checked_file_by_file(tmp_path: Path) -> None:
    package = {"model.mlpackage/Manifest.json": b"{}", "model.mlpackage/Data/weights.bin": b"w"}
    backend = {"name": "coreml", "program": "model.mlpackage", "functions": {"decode": 1}, "host_check": "reference"}
    manifest = make_bundle(tmp_path / "b", {**FILES, **package}, backend=backend)
    assert bundle_file(tmp_path / "b", manifest, "model.mlpackage") == tmp_path / "b" / "model.mlpackage"
    read_manifest(tmp_path / "b")
    (tmp_path / "b" / "model.mlpackage" / "Data" / "extra.bin").write_bytes(b"x")
    one_line_error(lambda: read_manifest(tmp_path / "b"), "model.mlpackage/Data/extra.bin", "not listed")
    (tmp_path / "b" / "model.mlpackage" / "Data" / "extra.bin").unlink()
    (tmp_path / "b" / "model.mlpackage" / "Data" / "weights.bin").unlink()
    (tmp_path / "b" / "model.mlpackage" / "Data" / "weights.bin").symlink_to("/etc/hostname")
    one_line_error(lambda: read_manifest(tmp_path / "b"), "weights.bin", "symbolic link")


def test_bundle_file_gives_only_checked_paths_inside(tmp_path: Path, outside: Path) -> None:
    manifest = make_bundle(tmp_path / "b")
    assert bundle_file(tmp_path / "b", manifest, "model.bin") == tmp_path / "b" / "model.bin"
    one_line_error(lambda: bundle_file(tmp_path / "b", manifest, "notes.txt"), "'notes.txt'", "not listed")
    hostile = {**manifest, "files": {**manifest["files"], "../outside/secret.txt": {"size": 7, "sha256": "0" * 64}}}
    one_line_error(lambda: bundle_file(tmp_path / "b", hostile, "../outside/secret.txt"), "'../outside/secret.txt'")
    (tmp_path / "b" / "model.bin").unlink()
    (tmp_path / "b" / "model.bin").symlink_to(outside)
    one_line_error(lambda: bundle_file(tmp_path / "b", manifest, "model.bin"), "symbolic link")


def test_runtime_backends_and_tokenizer_open_files_through_the_check(tmp_path: Path, outside: Path) -> None:
    """Given a hostile manifest directly (not through `load`), the backends still refuse to leave the bundle."""
    from edgepack.runtime import BundleTokenizer
    from edgepack.runtime.backend import open_backend

    manifest = make_bundle(tmp_path / "b")
    hostile = copy.deepcopy(manifest)
    hostile["backend"]["program"] = "../outside/secret.txt"
    hostile["files"]["../outside/secret.txt"] = {"size": 7, "sha256": "0" * 64}
    for backend in ("reference", "executorch"):
        one_line_error(lambda: open_backend(backend, tmp_path / "b", hostile), "../outside/secret.txt")
    hostile["tokenizer"]["file"] = str(outside)
    one_line_error(lambda: BundleTokenizer.from_bundle(tmp_path / "b", hostile), str(outside), "absolute path")
    hostile["tokenizer"]["file"] = "tokenizer_copy.json"  # inside, but not listed: never opened unchecked
    shutil.copy(tmp_path / "b" / "tokenizer.json", tmp_path / "b" / "tokenizer_copy.json")
    one_line_error(lambda: BundleTokenizer.from_bundle(tmp_path / "b", hostile), "'tokenizer_copy.json'", "not listed")


# --- 3. the manifest's schema ------------------------------------------------------------------------------


def _drop(*keys: str) -> Callable[[dict], None]:
    def change(m: dict) -> None:
        for key in keys[:-1]:
            m = m[key]
        del m[keys[-1]]

    return change


def _set(value: Any, *keys: str) -> Callable[[dict], None]:
    def change(m: dict) -> None:
        for key in keys[:-1]:
            m = m[key]
        m[keys[-1]] = value

    return change


SCHEMA_CASES = [
    ("files not a mapping", _set([["model.bin", 7]], "files"), "field files: input should be a valid dictionary"),
    ("entry without size", _drop("files", "model.bin", "size"), "field files.model.bin.size is missing"),
    ("entry size a string", _set("7", "files", "model.bin", "size"), "field files.model.bin.size"),
    ("bad sha256", _set("abc", "files", "model.bin", "sha256"), "field files.model.bin.sha256"),
    ("format_version a string", _set("1", "format_version"), "field format_version: input should be 1 (got '1')"),
    ("context lots", _set("lots", "context_length"), "field context_length: input should be a valid integer (got 'lots')"),
    ("context 10**12", _set(10**12, "context_length"), "field context_length: input should be less than or equal to 131072"),
    ("context zero", _set(0, "context_length"), "field context_length"),
    ("context past the model", _set(1024, "context_length"), "context_length 1024 exceeds model.config.max_position_embeddings 512"),
    ("eos_ids strings", _set(["x"], "tokenizer", "eos_ids"), "field tokenizer.eos_ids[0]: input should be a valid integer (got 'x')"),
    ("eos_ids negative", _set([-1], "tokenizer", "eos_ids"), "field tokenizer.eos_ids[0]"),
    ("no backend name", _drop("backend", "name"), "field backend.name is missing"),
    ("no backend program", _drop("backend", "program"), "field backend.program is missing"),
    ("no backend", _drop("backend"), "field backend is missing"),
    ("backend a list", _set([], "backend"), "field backend: input should be a valid dictionary"),
    ("executorch without max_prefill", _set({"name": "executorch", "program": "model.bin"}, "backend"),
     "field backend.max_prefill is missing (the executorch backend needs it)"),
    ("onnx without cpu", _set({"name": "onnx", "program": "model.bin"}, "backend"), "field backend.cpu is missing"),
    ("no tokenizer file", _drop("tokenizer", "file"), "field tokenizer.file is missing"),
    ("no model config", _drop("model", "config"), "field model.config is missing"),
    ("hidden_size negative", _set(-64, "model", "config", "hidden_size"), "field model.config.hidden_size"),
    ("hidden_size a string", _set("64", "model", "config", "hidden_size"), "field model.config.hidden_size: input should be a valid integer"),
    ("num_heads zero", _set(0, "model", "config", "num_heads"), "field model.config.num_heads"),
    ("rope_theta NaN", _set(float("nan"), "model", "config", "rope_theta"), "field model.config.rope_theta: input should be a finite number"),
    ("bool for a flag given as 1", _set(1, "model", "config", "tie_word_embeddings"), "field model.config.tie_word_embeddings"),
    ("unknown config key", _set(1, "model", "config", "sliding_window"), "field model.config.sliding_window is not one this edgepack knows"),
    ("unknown architecture", _set("gpt2", "model", "config", "architecture"), "field model.config.architecture"),
    ("top_p above 1", _set({"top_p": 2.0}, "generation"), "field generation.top_p"),
]
CONFIG_FIELDS = [k for k in TINY_CONFIG if k != "rope_scaling"]


@pytest.mark.parametrize("change,expected", [(c, e) for _, c, e in SCHEMA_CASES], ids=[i for i, _, _ in SCHEMA_CASES])
def test_a_manifest_of_the_wrong_shape_is_one_clear_line(tmp_path: Path, change: Callable, expected: str) -> None:
    manifest = make_bundle(tmp_path / "b")
    change(manifest)
    rewrite(tmp_path / "b", manifest)
    message = one_line_error(lambda: read_manifest(tmp_path / "b"), expected, "re-export the bundle")
    assert message.startswith(f"{tmp_path / 'b' / MANIFEST}: "), message


@pytest.mark.parametrize("key", CONFIG_FIELDS)
def test_every_config_field_the_runtime_reads_is_required(tmp_path: Path, key: str) -> None:
    manifest = make_bundle(tmp_path / "b")
    del manifest["model"]["config"][key]
    rewrite(tmp_path / "b", manifest)
    one_line_error(lambda: read_manifest(tmp_path / "b"), f"field model.config.{key} is missing", "re-export")


@pytest.mark.parametrize("content,expected", [
    (b"[]", "is not a JSON object (it holds a list)"),
    (b"null", "is not a JSON object (it holds null)"),
    (b'"manifest"', "is not a JSON object (it holds a str)"),
    (b"{not json", "is not valid JSON"),
    (b"\xff\xfe{}", "is not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "is not valid JSON"),
    (b'{"format": "edgepack-bundle", "format_version": ' + b"9" * 5000 + b"}", "is not valid JSON"),
    (b'{"format": "other"}', "is not an edgepack manifest"),
    (b'{"format": "edgepack-bundle", "format_version": 2}', "bundle format version 2 is not supported"),
], ids=["list", "null", "string", "not json", "not utf-8", "deep nesting", "huge number", "other format", "newer"])  # fmt: skip
def test_a_manifest_that_is_not_an_object_is_one_clear_line(tmp_path: Path, content: bytes, expected: str) -> None:
    make_bundle(tmp_path / "b")
    (tmp_path / "b" / MANIFEST).write_bytes(content)
    one_line_error(lambda: read_manifest(tmp_path / "b"), expected, "re-export")


def test_the_manifest_file_itself_must_be_a_plain_small_file(tmp_path: Path) -> None:
    make_bundle(tmp_path / "b")
    real = tmp_path / "elsewhere.json"
    shutil.move(tmp_path / "b" / MANIFEST, real)
    (tmp_path / "b" / MANIFEST).symlink_to(real)
    one_line_error(lambda: read_manifest(tmp_path / "b"), MANIFEST, "is a symbolic link")
    (tmp_path / "b" / MANIFEST).unlink()
    os.mkfifo(tmp_path / "b" / MANIFEST)
    one_line_error(lambda: read_manifest(tmp_path / "b"), MANIFEST, "not a regular file")
    (tmp_path / "b" / MANIFEST).unlink()
    with (tmp_path / "b" / MANIFEST).open("wb") as f:
        f.truncate(17 << 20)  # sparse: no disk used
    one_line_error(lambda: read_manifest(tmp_path / "b"), "far more than any manifest")


def test_the_schema_knows_every_model_config_field() -> None:
    """The reference backend calls ModelConfig(**manifest["model"]["config"]): the two must name the same fields."""
    from edgepack.manifest_schema import ModelConfigSection
    from edgepack.model import ModelConfig

    assert set(ModelConfigSection.model_fields) == {f.name for f in dataclasses.fields(ModelConfig)}


def test_an_exporter_writing_a_bad_manifest_fails_at_once(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="invalid bundle manifest: .*field backend.program is missing"):
        with write_bundle(tmp_path / "b") as writer:
            writer.write_text("model.bin", "w")
            writer.write_text("tokenizer.json", "{}")
            writer.finish({"model": {"name": "m", "config": TINY_CONFIG}, "backend": {"name": "reference"},
                           "context_length": 64, "tokenizer": {"file": "tokenizer.json"}})
    assert list(tmp_path.iterdir()) == []


# --- 4. fuzzing the reader ---------------------------------------------------------------------------------

_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=12)
_NAMES = ["model.bin", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "sub/x.bin", ".hidden",
          "model.mlpackage/Data/w.bin", "../outside/secret.txt", "/etc/hostname", "link", "fifo", "dir", "", "a\x00b"]
_KINDS = ["file", "file", "dir", "symlink_out", "symlink_in", "fifo"]


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path in a nested manifest (where a fuzzed value can be put)."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, inner in value.items():
            out += _paths(inner, prefix + (key,))
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            out += _paths(inner, prefix + (i,))
    return out


def _build_tree(bundle: Path, outside: Path, tree: dict[str, tuple[str, bytes]]) -> None:
    for name, (kind, data) in tree.items():
        if not name or "\x00" in name or name.startswith("/") or ".." in name:
            continue
        path = bundle / name
        if os.path.lexists(path):
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            {"file": lambda: path.write_bytes(data), "dir": lambda: path.mkdir(),
             "symlink_out": lambda: path.symlink_to(outside), "symlink_in": lambda: path.symlink_to(bundle / "model.bin"),
             "fifo": lambda: os.mkfifo(path)}[kind]()  # fmt: skip
        except (FileExistsError, NotADirectoryError):
            pass  # a name used both as a file and as a folder: the first one wins


@st.composite
def _hostile_bundles(draw: st.DrawFn) -> tuple[Any, dict[str, tuple[str, bytes]]]:
    """A manifest (random JSON, or a valid one with one value replaced or removed) and a random file tree."""
    tree = {name: ("file", data) for name, data in FILES.items()}  # a loadable bundle, then random entries
    tree.update(draw(st.dictionaries(st.sampled_from(_NAMES), st.tuples(st.sampled_from(_KINDS), st.binary(max_size=16)),
                                     max_size=4)))
    files = {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, (_, data) in tree.items()}
    manifest: Any = copy.deepcopy({
        "format": "edgepack-bundle", "format_version": 1, "model": {"name": "m", "config": TINY_CONFIG},
        "backend": BACKEND, "context_length": 64, "tokenizer": TOKENIZER, "files": files,
    })  # fmt: skip
    how = draw(st.sampled_from(["random", "replace", "remove", "as is"]))
    if how == "random":
        manifest = draw(_json)
    elif how in ("replace", "remove"):
        path = draw(st.sampled_from(_paths(manifest)))
        parent = manifest
        for key in path[:-1]:
            parent = parent[key]
        if how == "replace":
            parent[path[-1]] = draw(_json)
        else:
            del parent[path[-1]]
    return manifest, tree


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(_hostile_bundles(), st.booleans())
def test_fuzzed_manifests_and_trees_give_only_edgepack_errors(case: tuple[Any, dict], raw_bytes: bool) -> None:
    manifest, tree = case
    with tempfile.TemporaryDirectory() as tmp:
        bundle, outside = Path(tmp) / "b", Path(tmp) / "secret.txt"
        bundle.mkdir()
        outside.write_bytes(b"secret")
        _build_tree(bundle, outside, tree)
        text = json.dumps(manifest, allow_nan=True)
        (bundle / MANIFEST).write_bytes(text.encode("utf-8", "surrogatepass")[:-1] if raw_bytes else text.encode("utf-8", "surrogatepass"))
        try:
            loaded = read_manifest(bundle)
        except EdgepackError as e:
            assert "\n" not in str(e)
            event("refused")
            return
        event("loaded")
        from edgepack.bundle import named_files

        for _, name in named_files(loaded):  # a manifest that loads names only checked files inside the bundle
            assert bundle_file(bundle, loaded, name).resolve().is_relative_to(bundle.resolve())


# --- 5. inspect --------------------------------------------------------------------------------------------


def test_inspect_shows_the_npu_build_and_the_verification(tmp_path: Path) -> None:
    snapdragon_bundle(tmp_path / "x2")
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "x2")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for expected in ("SC8480XP (id 88)", "v81", "2.51.0", "passed", "snapdragon-x2"):
        assert expected in result.stdout, result.stdout
    make_bundle(tmp_path / "plain")  # no npu, no verification: inspect still works
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "plain")], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "not recorded" in result.stdout and "NPU" not in result.stdout, result.output


def _outside_entry(bundle: Path, manifest: dict) -> str:
    manifest["files"]["../outside/secret.txt"] = manifest["files"]["model.bin"]
    rewrite(bundle, manifest)
    return "'../outside/secret.txt'"


def _symlinked_model(bundle: Path, manifest: dict) -> str:
    (bundle / "model.bin").unlink()
    (bundle / "model.bin").symlink_to("/etc/hostname")
    return "symbolic link"


def _fifo_model(bundle: Path, manifest: dict) -> str:
    (bundle / "model.bin").unlink()
    os.mkfifo(bundle / "model.bin")
    return "special file"


def _list_manifest(bundle: Path, manifest: dict) -> str:
    rewrite(bundle, [manifest])
    return "is not a JSON object (it holds a list)"


def _context_lots(bundle: Path, manifest: dict) -> str:
    rewrite(bundle, {**manifest, "context_length": "lots"})
    return "field context_length"


@pytest.mark.parametrize("damage", [_outside_entry, _symlinked_model, _fifo_model, _list_manifest, _context_lots])
@pytest.mark.parametrize("command", ["inspect", "run"])
def test_the_cli_answers_a_hostile_bundle_with_one_line(tmp_path: Path, damage: Callable, command: str) -> None:
    manifest = make_bundle(tmp_path / "b")
    word = damage(tmp_path / "b", manifest)
    args = [command, str(tmp_path / "b"), *(["hi"] if command == "run" else [])]
    assert_cli_error(cli(*args), word, "re-export")


def test_the_toolchain_records_the_onnx_and_coreml_stacks(tmp_path: Path) -> None:
    assert {"onnx", "onnxruntime", "onnxruntime-qnn", "coremltools"} <= set(TOOLCHAIN_PACKAGES)
    from importlib import metadata

    recorded = make_bundle(tmp_path / "b")["toolchain"]
    assert recorded == toolchain_versions()
    for name in ("onnx", "onnxruntime", "coremltools"):  # core dependencies: always installed
        assert recorded[name] == metadata.version(name)


class _FailedGate(Exception):
    keep_staged = True  # as verify.VerificationFailed: the finished bundle is kept beside the destination

    def kept(self, where: Path) -> None:
        self.where = where


def test_a_bundle_that_fails_its_gate_is_kept_beside_and_cleared_by_the_next_success(tmp_path: Path) -> None:
    out = tmp_path / "b"
    with pytest.raises(_FailedGate) as failed:
        with write_bundle(out) as writer:
            writer.path("model.bin").write_bytes(b"x")
            writer.write_json("manifest.json", {"format": "edgepack-bundle"})
            raise _FailedGate()
    assert failed.value.where == tmp_path / "b.failed" and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.failed"]  # no staging left
    make_bundle(out)  # the next try succeeds: the failed copy is superseded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
