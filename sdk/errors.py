"""One error type for everything the user can fix: the CLI prints it as a single line, never a traceback."""

from __future__ import annotations


class EdgepackError(Exception):
    """A problem with the user's input or environment, with the fix spelled out.

    `exit_code` follows the CLI contract: 2 for bad usage (unknown target, bad option), 1 for a failure
    of the work itself (corrupt file, checksum mismatch, prompt too long).
    """

    def __init__(self, problem: str, fix: str | None = None, exit_code: int = 1) -> None:
        self.problem = problem
        self.fix = fix
        self.exit_code = exit_code
        super().__init__(self.one_line())

    def one_line(self) -> str:
        return f"{self.problem}; {self.fix}" if self.fix else self.problem


class UsageError(EdgepackError):
    """Bad input to a command (exit code 2)."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        super().__init__(problem, fix, exit_code=2)
