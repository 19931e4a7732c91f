"""What a front would run for a spec and an input shape: the kernels, their shapes and configs.

Both fronts' `plan()` return a `Plan`; the harness prints it beside every parity and benchmark row.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import TileConfig


@dataclass(frozen=True)
class KernelLaunch:
    kernel: str  # "linear_act", "gated", "fused_small", "fused_decode", or a baseline's op
    m: int
    n: int
    k: int
    activation: str
    config: TileConfig | None = None
    residual: bool = False

    def __str__(self) -> str:
        cfg = f" [{self.config}]" if self.config is not None else ""
        res = " +residual" if self.residual else ""
        return f"{self.kernel}({self.activation}{res}) {self.m}x{self.n}x{self.k}{cfg}"


@dataclass(frozen=True)
class Plan:
    impl: str  # the implementation that runs (never "auto")
    requested: str  # what the caller asked for
    launches: tuple[KernelLaunch, ...]
    reason: str = ""  # why `auto` chose `impl`, or why a fallback happened

    def describe(self) -> str:
        head = self.impl if self.requested == self.impl else f"{self.requested} -> {self.impl}"
        why = f" ({self.reason})" if self.reason else ""
        return f"{head}{why}: " + "; ".join(str(k) for k in self.launches)

    def kernels(self) -> str:
        """Short form for tables: kernel names joined with '+'."""
        return "+".join(k.kernel for k in self.launches) or "-"

    def __str__(self) -> str:
        return self.describe()
