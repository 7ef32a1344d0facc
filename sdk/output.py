"""How the CLI talks: results on stdout (human or `--json`), progress and notes on stderr.

Native libraries (XNNPACK's cpuinfo, torchao's optional CUDA kernels) print noise straight to file
descriptor 2; `quiet_native` parks that descriptor while they run, and our own progress keeps a private
duplicate of the real stderr so it still shows.
"""

from __future__ import annotations

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
        self._out = Console(highlight=False, soft_wrap=True)

    def info(self, message: str) -> None:
        self._err.print(f"[dim]{message}[/dim]", highlight=False)

    @contextmanager
    def quiet_native(self) -> Iterator[None]:
        if os.environ.get("EDGEPACK_DEBUG"):
            yield
            return
        sys.stderr.flush()
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
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
            sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
        elif summary:
            self._err.print(summary, highlight=False)

    def table(self, title: str, rows: list[tuple[str, str]]) -> None:
        table = Table(title=title, show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column()
        for key, value in rows:
            table.add_row(key, value)
        self._out.print(table)
