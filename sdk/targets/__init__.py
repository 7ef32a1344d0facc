"""Device profiles: one TOML file per target in this folder; adding a device is adding a file.

A target names the backends it prefers (the first one edgepack has an exporter for wins), its default
quantization and context, the hardware figures a fit check and a latency projection need, the budgets a
bundle must meet on it, per-backend options (e.g. the QNN SoC id), and where each figure comes from.

File schema (TOML):
    name, description, os, soc, ram_gb, backends = ["backend/delegate", ...], default_quant, default_context
    [hardware]   cpu (text), cpu_cores, cpu_fp32_gflops (peak, all cores), memory (text),
                 memory_bandwidth_gbs (peak DRAM), app_memory_limit_gb (what one foreground app may use before
                 the OS kills it; the fit check's ceiling), app_memory_limit_entitled_gb (iOS, with the
                 increased-memory-limit entitlement; informative), accelerator (text), accelerator_tops (INT8);
                 host.toml has `measured = true` instead: `edgepack profile` measures this machine.
    [budgets]    bundle_mb, peak_memory_mb (at the max context), ttft_ms_128 (first token after a 128-token
                 prompt), decode_tok_s_min; all four required, numbers > 0
    [options.<backend>]  backend-specific settings, e.g. [options.onnx] soc_model = "SM8750", htp_arch = 79
    [sources]    figure name -> citation (where the number comes from; "estimate: how" where it is one);
                 every numeric [hardware] figure, soc and ram_gb needs an entry (cpu_cores and ram_gb may share
                 the soc entry; host.toml cites its whole [hardware] group as measured)
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from edgepack.errors import UsageError

BUDGET_KEYS = ("bundle_mb", "peak_memory_mb", "ttft_ms_128", "decode_tok_s_min")


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
    hardware: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    budgets: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    options: dict[str, dict[str, Any]] = field(default_factory=dict, hash=False, compare=False)
    sources: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    def backend_choice(self, available: list[str] | None = None) -> tuple[str, str | None]:
        """The most preferred backend that has an exporter (`available`: exporter names; None = any)."""
        for entry in self.backends:
            backend, _, delegate = entry.partition("/")
            if available is None or backend in available:
                return backend, delegate or None
        raise UsageError(
            f"target {self.name!r} needs one of the backends {', '.join(self.backends)}, none is installed",
            f"exporters available: {', '.join(available or [])}; pass --backend to choose one",
        )


@cache
def all_targets() -> dict[str, Target]:
    found: dict[str, Target] = {}
    for entry in sorted(resources.files(__name__).iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            data = tomllib.loads(entry.read_text(encoding="utf-8"))
            data["backends"] = tuple(data["backends"])
            target = Target(**data)
            _check(target, entry.name)
            if target.name in found or target.name != entry.name.removesuffix(".toml"):
                raise ValueError(f"target file {entry.name} must define a unique name equal to its file name")
            found[target.name] = target
    return found


def _check(target: Target, file: str) -> None:
    """A malformed target file is a bug in edgepack (they ship with it): fail loudly, naming the file."""
    budgets = target.budgets
    bad = [k for k in BUDGET_KEYS if not isinstance(budgets.get(k), (int, float)) or budgets[k] <= 0]
    if bad:
        raise ValueError(f"target file {file}: [budgets] needs positive numbers for {', '.join(bad)}")
    cited = set(target.sources) | ({"cpu_cores", "ram_gb"} if "soc" in target.sources else set())
    uncited = [
        k
        for k, v in [("soc", target.soc), ("ram_gb", target.ram_gb), *target.hardware.items()]
        if v is not None and not isinstance(v, (str, bool)) and k not in cited
    ]
    if uncited and "hardware" not in cited:
        raise ValueError(f"target file {file}: [sources] has no citation for {', '.join(uncited)}")


def get_target(name: str) -> Target:
    targets = all_targets()
    if name not in targets:
        raise UsageError(f"unknown target {name!r}", f"choose one of: {', '.join(targets)} (see `edgepack targets`)")
    return targets[name]
