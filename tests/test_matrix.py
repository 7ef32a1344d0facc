"""A release matrix (`edgepack export -t a,b -q x,y`, sdk/matrix.py): its bundles are the bundles serial single
exports write, the work its cells share is done once, a failed cell does not stop the others; on a real Ray
cluster (`ray.cluster_utils.Cluster`: a head and a worker node, each its own raylet and worker processes on
this machine) with a worker node killed while one of its cells runs.

The student is tiny and its weights lie on an int4 grid, so its int4 bundles pass the gate's floors and every
cell succeeds; the backend is ONNX (seconds per bundle), never ExecuTorch's minutes of lowering."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgepack.export import plan_export, run_export
from edgepack.errors import UsageError
from edgepack.matrix import plan_matrix, read_matrix_file, run_matrix

from conftest import random_model, tiny_config, write_student_folder

TARGETS, PRESETS = ["host", "pixel-9"], ["fp32", "int4"]
BACKEND = "onnx/cpu"
TIMING_FIELDS = ("created", "export_seconds")  # what differs between two exports of the same bundle


@pytest.fixture(scope="module")
def student_folder(tmp_path_factory, default_student):
    """A tiny Llama whose matrices hold 16 levels per row, both extremes in every block of 32: int4 (per 32 or 64)
    represents them exactly, so int4 bundles lose only to int8 activations and pass the gate. Its tokenizer is
    byte-level BPE without merges (259 tokens, SmolLM2's specials and chat template): the gate's vocabulary-wide
    comparisons take a tenth of the time they take over SmolLM2's 49,152 tokens."""
    cfg = tiny_config(vocab_size=320, max_position_embeddings=256)
    model = random_model(cfg, max_context=64)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                codes = torch.randint(0, 16, param.shape, generator=generator)
                codes[:, 0::32], codes[:, 1::32] = 0, 15
                param.copy_((codes - 8).float() * param.abs().amax(dim=1, keepdim=True) / 8)
    folder = write_student_folder(tmp_path_factory.mktemp("matrix") / "student", default_student, cfg, model)
    byte_level_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]).save(str(folder / "tokenizer.json"))
    return folder


def byte_level_tokenizer(specials: list[str]):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {token: i for i, token in enumerate(specials + list(bytes_to_unicode().values()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tokenizer


@pytest.fixture(scope="module")
def serial_bundles(tmp_path_factory, student_folder) -> dict[str, Path]:
    """The same four bundles, each by its own single export, as a user would run them one after another."""
    out = tmp_path_factory.mktemp("serial")
    bundles = {}
    for target in TARGETS:
        for preset in PRESETS:
            bundles[f"{target}-{preset}"] = out / f"{target}-{preset}"
            run_export(plan_export(str(student_folder), target, preset, output=bundles[f"{target}-{preset}"],
                                   backend=BACKEND))
    return bundles


def comparable(bundle: Path) -> tuple[dict[str, str], dict]:
    """Every file's checksum, and the manifest without its timestamps and timings."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    files = {name: entry["sha256"] for name, entry in manifest["files"].items()}
    for name in TIMING_FIELDS:
        manifest.pop(name)
    manifest["verification"].pop("seconds")
    return files, manifest


def assert_same_bundles(results, serial_bundles: dict[str, Path]) -> None:
    assert [r.name for r in results] == list(serial_bundles)
    for result in results:
        assert result.ok, f"{result.name}: {result.error}"
        files, manifest = comparable(Path(result.bundle))
        serial_files, serial_manifest = comparable(serial_bundles[result.name])
        assert files == serial_files, result.name
        assert manifest == serial_manifest, result.name
        assert manifest["verification"]["status"] == "passed"


def matrix_cells(student_folder: Path, out: Path):
    return plan_matrix(str(student_folder), TARGETS, PRESETS, out, backend=BACKEND)


def test_local_matrix_equals_serial_exports_and_shares_work(student_folder, serial_bundles, tmp_path):
    """The int4 column, two processes at a time: the int4 model is built once for both cells' gates (same recipe
    and context) and the fp32 reference runs once for both."""
    events = []
    cells = plan_matrix(str(student_folder), TARGETS, ["int4"], tmp_path / "out", backend=BACKEND)
    results = run_matrix(cells, jobs=2, report=lambda cell, stage: events.append((cell, stage)))
    assert_same_bundles(results, {name: path for name, path in serial_bundles.items() if name.endswith("-int4")})
    shared = [stage for cell, stage in events if cell == "shared"]
    assert sum(s.startswith("quantize (int4) once") for s in shared) == 1, shared
    assert sum(s.startswith("fp32 reference once") for s in shared) == 1, shared
    assert not any("load reference model" in stage for _, stage in events)  # no cell built its own reference
    assert {cell for cell, stage in events if stage == "write manifest"} == {"host-int4", "pixel-9-int4"}


def test_a_shared_model_is_lowered_from_its_file(student_folder, tmp_path):
    """An exporter that lowers the built model itself (here `reference` at fp16) gets it read back from the file
    the driver wrote once: the bundles still equal single exports."""
    events = []
    cells = plan_matrix(str(student_folder), TARGETS, ["fp16"], tmp_path / "out", backend="reference")
    results = run_matrix(cells, report=lambda cell, stage: events.append((cell, stage)))
    serial = {}
    for target in TARGETS:
        serial[f"{target}-fp16"] = tmp_path / "serial" / target
        run_export(plan_export(str(student_folder), target, "fp16", output=serial[f"{target}-fp16"],
                               backend="reference"))
    assert_same_bundles(results, serial)
    assert [stage for cell, stage in events if cell == "shared"].count("build model once") == 1
    assert not any(stage == "build model" for _, stage in events)  # no cell built its own


def test_failed_cell_does_not_stop_the_others(student_folder, tmp_path):
    """A cell whose output is taken fails with its one-line error at planning; the CLI runs the rest, prints the
    table, and exits 1. The JSON lists every cell."""
    taken = tmp_path / "out" / "host-fp32"
    taken.mkdir(parents=True)
    (taken / "notes.txt").write_text("not a bundle")
    result = subprocess.run(
        [sys.executable, "-m", "edgepack.cli", "export", "-m", str(student_folder), "-t", "host", "-q", "fp32,int4",
         "--backend", BACKEND, "-o", str(tmp_path / "out"), "--no-verify", "--json"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    cells = {c["cell"]: c for c in json.loads(result.stdout)["cells"]}
    assert cells["host-fp32"]["ok"] is False and "not empty and not an edgepack bundle" in cells["host-fp32"]["error"]
    assert cells["host-int4"]["ok"] is True and (tmp_path / "out" / "host-int4" / "manifest.json").is_file()
    assert (taken / "notes.txt").read_text() == "not a bundle"
    assert "Traceback" not in result.stderr


def test_matrix_file_and_its_mistakes(tmp_path):
    """`--matrix FILE` names the same matrix as -t/-q; a bad file or both ways at once is one line, exit 2."""
    good = tmp_path / "release.toml"
    good.write_text('targets = ["pixel-9", "host:onnx/cpu"]\nquant = ["int4"]\n')
    assert read_matrix_file(good) == (["pixel-9", "host:onnx/cpu"], ["int4"])
    cells = plan_matrix(None, *read_matrix_file(good), tmp_path / "out")
    assert [(c.name, c.plan.backend_label) for c in cells] == [("pixel-9-int4", "executorch/xnnpack"),
                                                                ("host-int4", "onnx/cpu")]
    assert cells[1].plan.output == tmp_path / "out" / "host-int4"
    bad = tmp_path / "bad.toml"
    for text, expected in [('targets = "pixel-9"', "must hold `targets`"), ("targets = [", "not valid TOML"),
                           ('targets = ["host"]\nquants = ["int4"]', "unknown keys: quants")]:
        bad.write_text(text)
        with pytest.raises(UsageError, match=expected):
            read_matrix_file(bad)
    for args, expected in [(["--matrix", str(good), "-t", "host"], "--matrix and --target/--quant both"),
                           (["-t", "host,nowhere"], "unknown target 'nowhere'"),
                           (["-t", "host,host", "-q", "fp32"], "names the bundle host-fp32 twice")]:
        result = subprocess.run([sys.executable, "-m", "edgepack.cli", "export", *args, "-o", str(tmp_path / "x")],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_ray_without_ray_installed_is_one_line(student_folder, tmp_path):
    """`--ray` where Ray cannot be imported: one line naming the fix, before anything is loaded."""
    code = ("import sys; sys.modules['ray'] = None; from edgepack.cli import main; "
            "sys.argv = ['edgepack', 'export', '-t', 'host,pixel-9', '--ray', 'auto']; main()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: --ray needs Ray, which is not installed here; pip install edgepack[ray]"


def test_unreachable_ray_cluster_is_one_line(tmp_path):
    """An address nothing answers on fails in seconds with one line (ray.init alone retries for minutes)."""
    pytest.importorskip("ray")
    result = subprocess.run([sys.executable, "-m", "edgepack.cli", "export", "-t", "host,pixel-9", "--ray",
                             "127.0.0.1:1", "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: cannot reach a Ray cluster at 127.0.0.1:1 (Connection refused)" in result.stderr


@pytest.fixture
def ray_cluster():
    """A head node and one worker node on loopback, one CPU each: two cells at a time, one per node."""
    cluster_utils = pytest.importorskip("ray.cluster_utils")
    import ray

    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.parametrize("in_place", [True, False], ids=["written-in-place", "returned-as-bytes"])
def test_ray_matrix_equals_serial_exports_and_survives_a_killed_worker(student_folder, serial_bundles, tmp_path,
                                                                      ray_cluster, in_place):
    """The four cells as Ray tasks; the worker node is killed (its raylet and workers, not gracefully) as soon as
    one of its cells reports a stage after starting: that cell is retried on the head node, every bundle still
    equals its serial export, and the killed cell's result says it took two attempts. Bundles are written by the
    tasks into the shared output folder, or returned as bytes and written by the driver."""
    cluster, worker = ray_cluster
    on_worker, killed, events = set(), [], []

    def report(cell: str, stage: str) -> None:
        events.append((cell, stage))
        if stage.startswith("started on ") and worker.node_id[:8] in stage:
            on_worker.add(cell)
        elif cell in on_worker and not killed:
            killed.append(cell)
            cluster.remove_node(worker, allow_graceful=False)

    out = tmp_path / "out"
    results = run_matrix(matrix_cells(student_folder, out), ray_address=cluster.address, report=report,
                         ray_in_place=in_place)
    assert killed, f"no cell ran on the worker node: {events}"
    assert sorted(p.name for p in out.iterdir()) == sorted(serial_bundles)  # no staging or marker left behind
    assert_same_bundles(results, serial_bundles)
    by_name = {r.name: r for r in results}
    assert by_name[killed[0]].attempts == 2 and worker.node_id[:8] not in by_name[killed[0]].where
    assert sum(r.attempts for r in results) == len(results) + 1  # only the killed cell ran twice
