"""How the CLI talks: results on stdout (human or `--json`), progress and notes on stderr.

Native libraries print noise straight to the file descriptors: XNNPACK's cpuinfo and torchao's optional
CUDA kernels to 2, the QNN library (` # LIBNATIVE: ...`) to 1, which would break `--json`. `quiet_native`
parks both descriptors while they run; our own output keeps private duplicates of the real stdout and
stderr, so streamed text, the JSON result and progress still show.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.progress import TimeRemainingColumn
from rich.table import Table

from edgepack.progress import Steps


class Output:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self._err = Console(file=os.fdopen(os.dup(2), "w", closefd=True), stderr=True)
        self._stdout = _private_stdout()
        self._out = Console(file=self._stdout, highlight=False, soft_wrap=True)

    def info(self, message: str) -> None:
        self._err.print(f"[dim]{message}[/dim]", highlight=False)

    @contextmanager
    def quiet_native(self) -> Iterator[None]:
        if os.environ.get("EDGEPACK_DEBUG"):
            yield
            return
        _flush_all()
        saved = {fd: os.dup(fd) for fd in (1, 2)}
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in saved:
            os.dup2(devnull, fd)
        try:
            yield
        finally:
            _flush_all()  # what native code left in C stdio buffers goes to /dev/null too, not out later
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            os.close(devnull)

    @contextmanager
    def steps(self, title: str) -> Iterator[Steps]:
        """Each stage live while it runs (a bar with ETA when it counts units), then printed with its duration."""
        reporter = _LiveSteps(self._err, title) if self._err.is_terminal else _LoggedSteps(self._err, title)
        with reporter:
            yield reporter

    def stream(self, text: str, dim: bool = False) -> None:
        if self.as_json:
            return
        self._out.print(text, end="", style="dim italic" if dim else None, markup=False)
        self._out.file.flush()

    def end_stream(self) -> None:
        if not self.as_json:
            self._out.print()

    def result(self, data: Any, summary: str) -> None:
        if self.as_json:
            self._stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
            self._stdout.flush()
        elif summary:
            self._err.print(summary, highlight=False)

    def table(self, title: str, rows: list[tuple[str, str]]) -> None:
        table = Table(title=title, show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column()
        for key, value in rows:
            table.add_row(key, value)
        self._out.print(table)

    def grid(self, title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
        """A table with a header row (one row per item, e.g. a matrix's bundles)."""
        table = Table(title=title, title_justify="left")
        for name in header:
            table.add_column(name, overflow="fold")
        for row in rows:
            table.add_row(*row)
        self._out.print(table)


def _private_stdout() -> Any:
    """A duplicate of file descriptor 1 that `quiet_native` leaves alone, or sys.stdout itself where it is not
    descriptor 1 (a test's captured stream, which parking descriptor 1 does not touch)."""
    try:
        if sys.stdout.fileno() != 1:
            return sys.stdout
        sys.stdout.flush()
        return os.fdopen(os.dup(1), "w", encoding=sys.stdout.encoding, errors=sys.stdout.errors, closefd=True)
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return sys.stdout


def _flush_all() -> None:
    """Flush Python's and C's stdio buffers, so each write lands where its descriptor points right now."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):  # no C library to reach (e.g. Windows): nothing buffered there
        pass


class _StageClock(Steps):
    """Times stages and prints each finished one; subclasses show the running one."""

    def __init__(self, console: Console, title: str) -> None:
        self.console, self.title = console, title
        self.name: str | None = None
        self.started = time.perf_counter()

    def __call__(self, name: str, total: int | None = None) -> None:
        self._close()
        self.name, self.started = name, time.perf_counter()

    def __enter__(self) -> "_StageClock":
        return self

    def __exit__(self, kind: Any, *_: Any) -> None:
        self._close(ok=kind is None)

    def _close(self, ok: bool = True) -> None:
        if self.name:
            mark = "[green]✓[/green]" if ok else "[red]✗[/red]"
            self.console.print(f"  {mark} {self.name} ({time.perf_counter() - self.started:.1f} s)", highlight=False)
        self.name = None


class _LiveSteps(_StageClock):
    """On a terminal: a spinner per stage; a bar, count, elapsed time and ETA for a stage of counted units."""

    def __init__(self, console: Console, title: str) -> None:
        super().__init__(console, title)
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                                 transient=True)
        self.task: Any = None

    def __call__(self, name: str, total: int | None = None) -> None:
        super().__call__(name, total)
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(f"{self.title}: {name}", total=total)

    def advance(self, units: int = 1) -> None:
        if self.task is not None:
            self.progress.advance(self.task, units)

    def __enter__(self) -> "_LiveSteps":
        self.progress.start()
        return self

    def __exit__(self, kind: Any, *rest: Any) -> None:
        self.progress.stop()
        super().__exit__(kind, *rest)


class _LoggedSteps(_StageClock):
    """Not a terminal (a pipe, a CI log): one line when a stage starts, one when it ends, written at once."""

    def __call__(self, name: str, total: int | None = None) -> None:
        super().__call__(name, total)
        units = f" ({total} units)" if total else ""
        self.console.print(f"  … {self.title}: {name}{units}", highlight=False)
        self.console.file.flush()
