"""What a front would run for a spec and an input shape: the kernels, their shapes and configs.

Both fronts' `plan()` return a `Plan`; the harness prints it beside every parity and benchmark row.
A launch names its kernel family and the implementation whose kernel runs as two fields (a
triton_tma plan whose layer falls back runs `impl="triton"` for that layer), so a runner reads them
and parses nothing. A launch whose config is to be tuned on its first call says so (`tune=True`,
`config=None`); otherwise `config` is the config that runs (None only for baselines): a TileConfig
per layer, a SmallConfig for fused_small, or its Mosaic GPU sibling's MosaicSmallConfig where the
sibling runs (a plan's record pins it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import TileConfig
from .registry import get_implementation


@dataclass(frozen=True)
class KernelLaunch:
    family: str  # "linear_act", "gated", "fused_small", "fused_decode", or a baseline's name
    impl: str  # the implementation whose kernel runs (registry name)
    m: int
    n: int
    k: int
    activation: str
    config: TileConfig | Any | None = None  # TileConfig, SmallConfig or a sibling's config
    residual: bool = False  # the residual is added in this launch's epilogue
    layer: int = 0  # the spec layer a per-layer launch computes (0 for whole-MLP launches)
    tune: bool = False  # True: the config is swept on the first call of this shape, then cached

    @property
    def kernel(self) -> str:
        """How plans print the kernel: "gated", "tma.gated", "mosaic.linear_act", "torch.eager"."""
        return get_implementation(self.impl).kernel_prefix + self.family

    def __str__(self) -> str:
        cfg = f" [{self.config}]" if self.config is not None else " [tuned]" if self.tune else ""
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
