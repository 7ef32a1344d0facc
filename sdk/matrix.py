"""A release matrix: every bundle of targets x presets from one command, sharing what the bundles share.

    plan_matrix()      one ExportPlan per cell (target x preset), all checked before anything is loaded
    prepare_shared()   in this process, once: the student loaded, each model built for two or more cells of the
                       same recipe (`export.build_key`), the fp32 reference's answers for the gate
                       (recorded_reference.py); written to files the cells read back
    run_cells()        each cell's lowering + gate in its own process, at most `jobs` at a time, or as Ray
                       tasks on a cluster (matrix_ray.py); a failed cell is reported, the others go on

Bundles go to OUT/<target>-<preset>, each written by the single export's own bundle writer.
"""

from __future__ import annotations

import time
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from edgepack.errors import EdgepackError, UsageError
from edgepack.progress import SILENT, Steps

Report = Callable[[str, str], None]  # (cell, what it does now): progress of every cell


@dataclass(frozen=True)
class Cell:
    """One bundle of the matrix: its plan, or why it could not be planned."""

    name: str
    plan: Any = None  # export.ExportPlan
    error: str | None = None


@dataclass(frozen=True)
class CellJob:
    """What a cell's process needs: its plan and the files of the work shared with other cells."""

    name: str
    plan: Any
    build: Path | None = None  # export.shared_build's file
    reference: Path | None = None  # recorded_reference.RecordedReference's file
    memory_bytes: float = 0.0  # fit.export_peak_bytes: what the cell's process may take (a Ray request)


@dataclass
class CellResult:
    name: str
    ok: bool
    bundle: str | None = None
    size_mb: float | None = None
    seconds: float = 0.0
    verification: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    where: str | None = None  # the Ray node that built it
    attempts: int = 1

    def gate(self) -> str:
        """The gate's figures in one cell of the summary table."""
        v = self.verification
        if v.get("status") in (None, "skipped", "not_run"):
            return v.get("status", "-").replace("_", " ")
        tf = v["teacher_forcing"]
        text = f"top-1 {tf['top1_agreement']:.1%}, KL {tf['mean_kl']:.4f}, ppl x{tf['perplexity_ratio']:.3f}"
        if v.get("fidelity"):
            text += f"; fidelity KL {v['fidelity']['teacher_forcing']['mean_kl']:.4f}"
        return f"{v['status']}: {text}"

    def to_dict(self) -> dict[str, Any]:
        return {"cell": self.name, "ok": self.ok, "bundle": self.bundle, "size_mb": self.size_mb,
                "seconds": round(self.seconds, 1), "verification": self.verification, "error": self.error,
                "where": self.where, "attempts": self.attempts}


# --- planning ---------------------------------------------------------------------------------------------------


def split_list(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def read_matrix_file(path: str | Path) -> tuple[list[str], list[str]]:
    """A TOML matrix: `targets = ["pixel-9", "host:onnx/cpu"]` and optionally `quant = ["int4", "int8"]`."""
    file = Path(path)
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the matrix file {file} ({e})", "pass a UTF-8 TOML file to --matrix") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"the matrix file {file} is not valid TOML ({e})", "fix its syntax") from None
    unknown = sorted(set(data) - {"targets", "quant"})
    targets, quants = data.get("targets"), data.get("quant", [])
    if unknown or not _strings(targets) or not targets or not _strings(quants):
        raise UsageError(f"the matrix file {file} must hold `targets` (a list of names) and optionally `quant`"
                         + (f"; unknown keys: {', '.join(unknown)}" if unknown else ""),
                         'e.g. targets = ["pixel-9", "host:onnx/cpu"] and quant = ["int4", "int8"]')
    return targets, quants


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def plan_matrix(source: str | None, targets: Sequence[str], quants: Sequence[str], output: str | Path | None,
                backend: str | None = None, max_context: int | None = None, group_size: int | None = None,
                verify: bool = True, keep_failed: bool = False, force: bool = False, *,
                activation_ranges: int | None = None) -> list[Cell]:
    """One cell per target x preset (`TARGET[:BACKEND]`; no preset: the target's default). Unknown names are a
    usage error for the whole matrix; a cell that cannot be planned (its output taken, it does not fit its
    device, a backend the target lacks) is a failed cell, the others go on."""
    from edgepack.export import _slug, plan_export
    from edgepack.presets import get_preset
    from edgepack.targets import get_target

    if not targets:
        raise UsageError("the matrix names no target", "pass --target a,b or --matrix FILE")
    folder = Path(output) if output else Path("bundles") / _slug(source)
    cells, seen = [], set()
    for spec in targets:
        target_name, _, own_backend = spec.partition(":")
        target = get_target(target_name)
        for quant in quants or [target.default_quant]:
            get_preset(quant)
            name = f"{target.name}-{quant}"
            if name in seen:
                raise UsageError(f"the matrix names the bundle {name} twice", "list each target and preset once")
            seen.add(name)
            try:
                plan = plan_export(source, target.name, quant, max_context, folder / name, own_backend or backend,
                                   group_size, verify, keep_failed, force=force,
                                   activation_ranges=activation_ranges)
                cells.append(Cell(name, plan))
            except EdgepackError as e:
                cells.append(Cell(name, error=e.one_line()))
    return cells


# --- the work shared by cells, done once here ----------------------------------------------------------------


def prepare_shared(cells: Sequence[Cell], folder: Path, step: Steps = SILENT) -> tuple[list[CellJob], list[CellResult]]:
    """Load the student once, build each model two or more cells lower, record the fp32 reference's answers for
    every context two or more gates use; write them under `folder`. Returns the jobs to run and the cells that
    already failed (planning, or a check that needs the loaded student)."""
    from edgepack.exporters import exporter_quantizes
    from edgepack.export import build_key, check_loaded, shared_build
    from edgepack.fit import export_peak_bytes
    from edgepack.intake import load_student
    from edgepack.recorded_reference import record_reference

    failed = [CellResult(c.name, False, error=c.error) for c in cells if c.plan is None]
    planned = [c for c in cells if c.plan is not None]
    if not planned:
        return [], failed
    step("load model")
    student = load_student(planned[0].plan.source)
    jobs: list[CellJob] = []
    for cell in planned:
        try:
            plan = check_loaded(cell.plan, student)
        except EdgepackError as e:
            failed.append(CellResult(cell.name, False, error=e.one_line()))
            continue
        jobs.append(CellJob(cell.name, plan, memory_bytes=export_peak_bytes(student.config)))

    def worth_sharing(job: CellJob) -> bool:  # a model built for the exporter, or for the gate's same weights
        own = exporter_quantizes(job.plan.backend)
        return not own or (job.plan.preset.quantized and job.plan.verify)

    builds = _groups([j for j in jobs if worth_sharing(j)], lambda j: build_key(j.plan))
    for number, group in enumerate(builds):
        jobs, failed = _share(jobs, failed, group, "build", lambda: shared_build(
            group[0].plan, student, folder / f"build-{number}", step))
    references = _groups([j for j in jobs if j.plan.verify], _reference_key)
    for group in references:
        context, prefill = _reference_key(group[0])
        jobs, failed = _share(jobs, failed, group, "reference", lambda: record_reference(
            student, context, prefill, step).save(folder / f"reference-{context}-{prefill}.npz"))
    return jobs, failed


def _reference_key(job: CellJob) -> tuple[int, int]:
    """The fp32 reference session a cell's gate builds: its context and prefill chunk (export's)."""
    from edgepack.export import DEFAULT_PREFILL_CHUNK

    return job.plan.max_context, min(DEFAULT_PREFILL_CHUNK, job.plan.max_context)


def _groups(jobs: Sequence[CellJob], key: Callable[[CellJob], Any]) -> list[list[CellJob]]:
    """Jobs with equal keys, for the keys two or more jobs share."""
    groups: dict[Any, list[CellJob]] = {}
    for job in jobs:
        groups.setdefault(key(job), []).append(job)
    return [group for group in groups.values() if len(group) > 1]


def _share(jobs: list[CellJob], failed: list[CellResult], group: Sequence[CellJob], field_name: str,
           work: Callable[[], Path]) -> tuple[list[CellJob], list[CellResult]]:
    """Run one piece of shared work and hand its file to the group's jobs; if it fails, the group's cells fail
    with its message and the other cells go on."""
    names = {j.name for j in group}
    try:
        path = work()
    except EdgepackError as e:
        what = "building the model" if field_name == "build" else "recording the fp32 reference"
        failed = failed + [CellResult(n, False, error=f"{what} for it failed: {e.one_line()}") for n in sorted(names)]
        return [j for j in jobs if j.name not in names], failed
    return [replace(j, **{field_name: path}) if j.name in names else j for j in jobs], failed


# --- one cell ---------------------------------------------------------------------------------------------------


class CellSteps(Steps):
    """A cell's stages as progress reports (`report(cell, stage)`)."""

    def __init__(self, name: str, report: Report) -> None:
        self.name, self.report = name, report

    def __call__(self, stage: str, total: int | None = None) -> None:
        self.report(self.name, stage)


def run_cell(job: CellJob, report: Report) -> CellResult:
    """Lower and gate one cell with `export.run_export`, reading the shared work back; never raises for what a
    user can fix or a cell's own failure: the result carries the one-line error."""
    from edgepack.export import read_shared_build, run_export
    from edgepack.intake import load_student
    from edgepack.recorded_reference import RecordedReference

    started = time.perf_counter()
    try:
        report(job.name, "load model")
        student = load_student(job.plan.source)
        built = read_shared_build(job.plan, student, job.build) if job.build else None
        reference = RecordedReference.load(job.reference) if job.reference else None
        manifest = run_export(job.plan, CellSteps(job.name, report), student=student, built=built,
                              reference=reference)
    except EdgepackError as e:  # a gate failure keeps its bundle (OUT.failed) and carries its figures
        kept = getattr(e, "kept_at", None)
        return CellResult(job.name, False, str(kept) if kept else None, seconds=time.perf_counter() - started,
                          error=e.one_line(), verification=dict(getattr(e, "report", None) or {}))
    except Exception as e:  # noqa: BLE001 - one cell's bug must not stop the others; its message is kept
        return CellResult(job.name, False, seconds=time.perf_counter() - started,
                          error=f"internal error {type(e).__name__}: {e}")
    size = sum(f["size"] for f in manifest["files"].values()) / 1e6
    return CellResult(job.name, True, str(job.plan.output), round(size, 1), time.perf_counter() - started,
                      manifest["verification"])


# --- all cells ---------------------------------------------------------------------------------------------------


def run_matrix(cells: Sequence[Cell], jobs: int = 1, ray_address: str | None = None, report: Report = lambda c, s: None,
               scratch: Path | None = None, ray_in_place: bool = True) -> list[CellResult]:
    """Every cell of the matrix; results in the cells' order. `ray_address`: run the cells on that Ray cluster
    (`auto`: the one `ray start` set up here), else `jobs` local processes at a time. `ray_in_place=False`: Ray
    cells return their bundles as bytes even where they could write them in place."""
    import tempfile

    if ray_address:
        from edgepack.matrix_ray import connect

        connect(ray_address)  # a missing Ray or an unreachable cluster fails before any model is loaded
    with tempfile.TemporaryDirectory(prefix="edgepack-matrix-", dir=scratch) as tmp:
        runnable, results = prepare_shared(cells, Path(tmp), CellSteps("shared", report))
        if ray_address:
            from edgepack.matrix_ray import run_on_ray

            results += run_on_ray(runnable, report, ray_in_place)
        else:
            from edgepack.matrix_local import run_local

            results += run_local(runnable, jobs, report)
    order = {c.name: i for i, c in enumerate(cells)}
    return sorted(results, key=lambda r: order[r.name])


def summary_rows(results: Sequence[CellResult]) -> list[tuple[str, ...]]:
    """The summary table: bundle, size, gate figures, time (where and how often a Ray cell ran)."""
    rows = []
    for r in results:
        where = f" on {r.where}" if r.where else ""
        tries = f", {r.attempts} attempts" if r.attempts > 1 else ""
        rows.append((r.name, "ok" if r.ok else "FAILED", f"{r.size_mb:.1f} MB" if r.size_mb else "-",
                     r.gate() if r.verification else "-", f"{r.seconds:.0f} s{where}{tries}"))
    return rows


SUMMARY_HEADER = ("bundle", "status", "size", "gate", "time")
