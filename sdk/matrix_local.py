"""A matrix's cells on this machine: one fresh process per cell, at most `jobs` at a time.

A process per cell, rather than a thread or a pool, because a cell's memory (a lowered program, the gate's
logits) is only given back when its process ends, and a cell that crashes (out of memory, a native abort)
takes only itself down: its result is then "the process died", the others go on.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_module
from typing import Any, Sequence

from edgepack.matrix import CellJob, CellResult, Report, run_cell


def run_local(jobs: Sequence[CellJob], parallel: int, report: Report) -> list[CellResult]:
    context = multiprocessing.get_context("spawn")  # no fork of a process that has loaded torch's threads
    messages: Any = context.Queue()
    waiting, running, results = list(jobs), {}, {}

    def take(message: tuple[str, str, Any]) -> None:
        kind, name, payload = message
        if kind == "progress":
            report(name, payload)
        else:
            results[name] = payload
            running.pop(name).join()

    try:
        while waiting or running:
            while waiting and len(running) < max(1, parallel):
                job = waiting.pop(0)
                process = context.Process(target=_cell_process, args=(job, messages), name=f"edgepack-{job.name}")
                process.start()
                running[job.name] = process
            try:
                take(messages.get(timeout=0.5))
                continue
            except queue_module.Empty:
                pass
            if not any(not p.is_alive() for p in running.values()):
                continue
            try:  # what an ended process sent may still be in the pipe: read it before calling the process dead
                while True:
                    take(messages.get(timeout=1.0))
            except queue_module.Empty:
                pass
            for name, process in list(running.items()):  # ended without a result: killed, out of memory, abort
                if not process.is_alive():
                    results[name] = CellResult(name, False, error=f"its process died (exit code {process.exitcode})")
                    running.pop(name).join()
    finally:  # interrupted (Ctrl-C, SIGTERM): the cells still running stop too; their staging folders go
        for process in running.values():  # with them (write_bundle removes a dead process's leftovers)
            process.terminate()
            process.join()
    return list(results.values())


def _cell_process(job: CellJob, messages: Any) -> None:
    """The body of a cell's process: native libraries' noise goes nowhere (stdout may be the driver's JSON)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    result = run_cell(job, lambda name, stage: messages.put(("progress", name, stage)))
    messages.put(("result", job.name, result))
