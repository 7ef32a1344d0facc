"""Device profiles: one TOML file per target in this folder; adding a device is adding a file.

A target names the backends it prefers (first that can export wins), its default quantization and
context, and the budgets a bundle must meet on it.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from edgepack.errors import UsageError


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    os: str
    backends: tuple[str, ...]  # "backend" or "backend/delegate", most preferred first
    default_quant: str
    default_context: int
    soc: str | None = None
    ram_gb: float | None = None
    budgets: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    sources: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    def backend_choice(self) -> tuple[str, str | None]:
        backend, _, delegate = self.backends[0].partition("/")
        return backend, delegate or None


@cache
def all_targets() -> dict[str, Target]:
    found: dict[str, Target] = {}
    for entry in sorted(resources.files(__name__).iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            data = tomllib.loads(entry.read_text(encoding="utf-8"))
            data["backends"] = tuple(data["backends"])
            target = Target(**data)
            if target.name in found or target.name != entry.name.removesuffix(".toml"):
                raise ValueError(f"target file {entry.name} must define a unique name equal to its file name")
            found[target.name] = target
    return found


def get_target(name: str) -> Target:
    targets = all_targets()
    if name not in targets:
        raise UsageError(f"unknown target {name!r}", f"choose one of: {', '.join(targets)} (see `edgepack targets`)")
    return targets[name]
