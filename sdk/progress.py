"""Progress of long work: the pipeline says which stage runs and, for stages made of counted units (layers,
delegates), when each unit is done; the CLI shows it (`output.Output.steps`): a bar with an ETA on a terminal,
one plain line per stage in a log."""

from __future__ import annotations


class Steps:
    """`steps(name)` starts a stage; `steps(name, total=N)` a stage of N units, each finished by `advance()`.
    This base shows nothing (library calls, tests)."""

    def __call__(self, name: str, total: int | None = None) -> None:
        pass

    def advance(self, units: int = 1) -> None:
        pass


SILENT = Steps()
