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
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.table import Table


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
    def steps(self, title: str) -> Iterator[Callable[[str], None]]:
        """A live spinner naming the running step; each finished step is printed with its duration."""
        current: dict[str, Any] = {"name": None, "t": time.perf_counter()}
        with self._err.status(f"{title}…") as status:

            def step(name: str) -> None:
                self._close_step(current)
                current.update(name=name, t=time.perf_counter())
                status.update(f"{title}: {name}…")

            try:
                yield step
            except BaseException:
                self._close_step(current, ok=False)
                raise
            self._close_step(current)

    def _close_step(self, current: dict[str, Any], ok: bool = True) -> None:
        if current["name"]:
            mark = "[green]✓[/green]" if ok else "[red]✗[/red]"
            self._err.print(f"  {mark} {current['name']} ({time.perf_counter() - current['t']:.1f} s)")

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
