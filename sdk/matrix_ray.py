"""A matrix's cells as Ray tasks on an existing cluster (`edgepack export ... --ray ADDRESS|auto`).

Each cell is one task running `matrix.run_cell`, asking Ray for the memory its export is predicted to peak at
(`fit.export_peak_bytes`), so a node never takes more cells than it can hold. The work shared by cells (the
model built once, the fp32 reference's recorded answers) travels as bytes through Ray's object store. A task
writes its bundle straight into the output folder when its node sees that folder (shared storage: checked with
a marker file the driver writes there), else returns it as bytes and the driver writes it with the same bundle
writer. A task whose worker or node dies is retried once elsewhere; if that fails too, only its cell fails.
Every node needs the same edgepack installed with its Ray extra: `pip install edgepack[ray]`.
"""

from __future__ import annotations

import io
import secrets
import socket
import tarfile
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from edgepack.errors import EdgepackError
from edgepack.matrix import CellJob, CellResult, Report, run_cell

RETRIES = 1  # a cell whose worker or node dies runs once more, on any node that can hold it
GB = 1e9


def require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise EdgepackError("--ray needs Ray, which is not installed here", "pip install edgepack[ray]") from None
    return ray


def connect(address: str) -> None:
    """Join the cluster at `address` (`auto`: the one `ray start` runs on this machine) as its driver."""
    ray = require_ray()
    if ray.is_initialized():
        return
    _check_reachable(address)
    try:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR", configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EdgepackError(f"cannot reach a Ray cluster at {address} ({reason})",
                            "start one with `ray start --head` and pass its address, or --ray auto on a node") from None


def _check_reachable(address: str) -> None:
    """A HOST:PORT that nothing answers on fails in seconds (ray.init would keep retrying for minutes)."""
    host, _, port = address.rpartition(":")
    if not host or "://" in address or not port.isdigit():
        return  # `auto`, or a ray:// client address: ray.init's own checks
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise EdgepackError(f"cannot reach a Ray cluster at {address} ({e.strerror or e})",
                            "check the head node's address (`ray status` on it), or start one with `ray start --head`") from None


def run_on_ray(jobs: Sequence[CellJob], report: Report, in_place: bool = True) -> list[CellResult]:
    """`in_place=False`: every bundle comes back to the driver as bytes, even where the nodes share its storage."""
    ray = require_ray()
    results: list[CellResult] = []
    largest = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n["Alive"]), default=0)
    runnable = []
    for job in jobs:
        if job.memory_bytes > largest:
            results.append(CellResult(job.name, False, error=(
                f"its export needs about {job.memory_bytes / GB:.1f} GB of memory and the largest Ray node offers "
                f"{largest / GB:.1f} GB; add a bigger node or export it elsewhere")))
        else:
            runnable.append(job)
    board = _board(ray)
    shared = {path: ray.put(path.read_bytes()) for job in runnable for path in (job.build, job.reference) if path}
    markers = _markers(runnable) if in_place else {}
    task = ray.remote(_ray_cell)
    pending = {}
    for job in runnable:
        refs = {str(p): shared[p] for p in (job.build, job.reference) if p}
        options = {"memory": max(1, int(job.memory_bytes)), "num_cpus": 1, "max_retries": RETRIES,
                   "name": f"edgepack-{job.name}"}
        pending[task.options(**options).remote(job, refs, board, markers.get(job.plan.output.parent))] = job
        report(job.name, f"queued on Ray (asks {job.memory_bytes / GB:.1f} GB)")
    attempts: dict[str, int] = {}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            _drain(ray, board, report, attempts)
            for ref in done:
                job = pending.pop(ref)
                results.append(_collect(ray, ref, job, attempts))
        _drain(ray, board, report, attempts)
    finally:  # interrupted: the cells still queued or running are cancelled, not left on the cluster
        for ref in pending:
            ray.cancel(ref, force=True)
        for marker, _ in markers.values():
            Path(marker).unlink(missing_ok=True)
    for result in results:
        result.attempts = max(1, attempts.get(result.name, 1))
    return results


def _board(ray: Any) -> Any:
    """An actor on the driver's own node that collects the cells' progress (it must outlive any worker node)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(_Board).options(scheduling_strategy=here).remote()


class _Board:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def add(self, cell: str, stage: str) -> None:
        self.events.append((cell, stage))

    def drain(self) -> list[tuple[str, str]]:
        events, self.events = self.events, []
        return events


def _drain(ray: Any, board: Any, report: Report, attempts: dict[str, int]) -> None:
    for cell, stage in ray.get(board.drain.remote()):
        if stage.startswith("started on "):
            attempts[cell] = attempts.get(cell, 0) + 1
        report(cell, stage)


def _markers(jobs: Sequence[CellJob]) -> dict[Path, tuple[str, str]]:
    """A marker file with a random token in each output folder: a task that reads the token there shares this
    machine's storage and writes its bundle in place."""
    markers = {}
    for folder in {job.plan.output.parent for job in jobs}:
        folder.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(16)
        marker = folder / f".edgepack-matrix-{token[:8]}"
        marker.write_text(token)
        markers[folder] = (str(marker), token)
    return markers


def _sees(marker: tuple[str, str] | None) -> bool:
    if marker is None:
        return False
    try:
        return Path(marker[0]).read_text() == marker[1]
    except OSError:
        return False


def _ray_cell(job: CellJob, shared: dict[str, Any], board: Any,
              marker: tuple[str, str] | None) -> tuple[CellResult, bytes | None, str]:
    """The task: the shared files written locally, the cell run, its bundle returned as bytes (a .tar) unless
    it was written in place. Returns (result, bundle bytes or None, "" or ".failed" for a gate-failed bundle)."""
    import ray

    from edgepack.bundle import FAILED_SUFFIX

    where = f"{socket.gethostname()} ({ray.get_runtime_context().get_node_id()[:8]})"

    def report(cell: str, stage: str) -> None:
        board.add.remote(cell, stage)

    report(job.name, f"started on {where}")
    with tempfile.TemporaryDirectory(prefix="edgepack-ray-cell-") as tmp:
        local = {}
        for path, ref in shared.items():
            local[path] = Path(tmp) / Path(path).name
            local[path].write_bytes(ray.get(ref))
        job = replace(job, build=local.get(str(job.build)), reference=local.get(str(job.reference)))
        in_place = _sees(marker)
        if not in_place:
            job = replace(job, plan=replace(job.plan, output=Path(tmp) / "out" / job.name, force=False))
        result = run_cell(job, report)
        result.where = where
        if in_place:
            return result, None, ""
        for suffix in ("", FAILED_SUFFIX):
            folder = job.plan.output.with_name(job.name + suffix)
            if folder.is_dir():
                buffer = io.BytesIO()
                with tarfile.open(fileobj=buffer, mode="w") as tar:
                    tar.add(folder, arcname=".")
                return result, buffer.getvalue(), suffix
        return result, None, ""


def _collect(ray: Any, ref: Any, job: CellJob, attempts: dict[str, int]) -> CellResult:
    """A finished task's result, its bundle written here if it came back as bytes; a task that died is its
    cell's failure, with the reason in one line."""
    try:
        result, payload, suffix = ray.get(ref)
    except ray.exceptions.RayError as e:
        tries = max(1, attempts.get(job.name, 1))
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return CellResult(job.name, False, error=f"its Ray worker died after {tries} attempt(s) "
                          f"({type(e).__name__}: {reason}); rerun the matrix to build it")
    if payload is not None:
        from edgepack.bundle import write_bundle

        destination = job.plan.output.with_name(job.plan.output.name + suffix)
        try:
            with write_bundle(destination, force=job.plan.force or bool(suffix)) as writer:
                with tarfile.open(fileobj=io.BytesIO(payload)) as tar:
                    tar.extractall(writer.dir, filter="data")
        except EdgepackError as e:
            return replace(result, ok=False, error=f"writing the bundle returned by Ray failed: {e.one_line()}")
    if result.bundle is not None:
        result.bundle = str(job.plan.output)
    return result
