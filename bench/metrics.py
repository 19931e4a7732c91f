"""Metrics as functions of (spec, M, impl, seconds, ceilings), defined once, tritonbench style.

FLOPs and bytes come from `common.cost`; whole-MLP implementations (fused_small, fused_decode) are
charged the bytes of one kernel (x, params, y), per-layer ones the hidden round trips too, so "% of
roofline" says how far each path is from the floor of its own way of running the MLP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fusedmlp.common import MLPSpec, cost

WHOLE_IMPLS = ("fused_small", "fused_decode")


@dataclass(frozen=True)
class Ceilings:
    """Measured in the same run: matmul rate per dtype (FLOP/s), device-to-device copy (B/s, read
    plus written) and, where measured, read-only bandwidth (B/s). `peak`: per dtype the arithmetic
    units' physical rate at the GPU's highest SM clock (ceilings.physical_peak), where the
    architecture is known — not a measurement, a bound no kernel passes."""

    matmul: dict[str, float]
    copy: float
    device: str
    detail: dict[str, Any]
    read: float | None = None
    peak: dict[str, float] | None = None
    # the GPU's L2 capacity (bytes, from the device's properties; 0 where unknown): writes it can
    # hold past a call's end need not reach DRAM within the call (cost.floor's l2_write_back)
    l2_bytes: int = 0

    @property
    def memory(self) -> float:
        """The fastest memory rate measured: what no kernel can beat (the floor check's rate)."""
        return max(self.copy, self.read or 0.0)

    def compute(self, key: str, *, check: bool = False) -> float:
        """The matmul rate of floors and "% roofline" (the large GEMM measured); with `check`, the
        rate of the floor check: the physical peak where known. A large GEMM draws the most power
        and runs below the top clock, so a kernel with less memory traffic can beat its rate — a
        narrow MLP whose weights stay on chip did on the H200 (128x8 fp16: 784 TFLOP/s against
        cuBLAS's 8192³ fp16 701-764 in the same runs) — and only the peak says such a time is
        impossible."""
        measured = self.matmul[key]
        if check and self.peak and key in self.peak:
            return max(measured, self.peak[key])
        return measured

    def to_dict(self) -> dict[str, Any]:
        return {
            "matmul": self.matmul,
            "copy": self.copy,
            "read": self.read,
            "peak": self.peak,
            "l2_bytes": self.l2_bytes,
            "device": self.device,
            "detail": self.detail,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Ceilings:
        return cls(
            dict(data["matmul"]),
            float(data["copy"]),
            data["device"],
            data.get("detail", {}),
            data.get("read"),
            dict(data["peak"]) if data.get("peak") else None,
            int(data.get("l2_bytes") or 0),
        )


def matmul_key(spec: MLPSpec) -> str:
    return "tf32" if spec.dtype == "float32" and spec.fp32_precision == "tf32" else spec.dtype


def floor(
    spec: MLPSpec, m: int, impl: str, ceilings: Ceilings, *, check: bool = False
) -> cost.Floor:
    """The roofline floor of `impl`'s way of running the MLP at the copy rate and the measured
    matmul rate; with `check`, at the fastest memory rate measured and the physical peak where
    known, less the writes the L2 can hold past the call (the floor below which a time is an
    invalid measurement)."""
    return cost.floor(
        spec,
        m,
        flops_per_s=ceilings.compute(matmul_key(spec), check=check),
        bytes_per_s=ceilings.memory if check else ceilings.copy,
        whole=impl in WHOLE_IMPLS,
        l2_write_back=ceilings.l2_bytes if check else 0,
    )


def tflops(spec: MLPSpec, m: int, seconds: float) -> float:
    return cost.flops(spec, m) / seconds / 1e12


def gbps(spec: MLPSpec, m: int, impl: str, seconds: float) -> float:
    return cost.min_bytes(spec, m, whole=impl in WHOLE_IMPLS) / seconds / 1e9


def pct_roofline(spec: MLPSpec, m: int, impl: str, seconds: float, ceilings: Ceilings) -> float:
    """Floor time over measured time, in percent (100 = at the roofline)."""
    return 100.0 * floor(spec, m, impl, ceilings).seconds / seconds


METRICS = {
    "tflops": lambda spec, m, impl, s, c: tflops(spec, m, s),
    "gbps": lambda spec, m, impl, s, c: gbps(spec, m, impl, s),
    "pct_roofline": pct_roofline,
}


def all_metrics(
    spec: MLPSpec, m: int, impl: str, seconds: float, ceilings: Ceilings
) -> dict[str, float]:
    return {name: fn(spec, m, impl, seconds, ceilings) for name, fn in METRICS.items()}


def backward_floor(
    spec: MLPSpec, m: int, saved: str, ceilings: Ceilings, *, check: bool = False
) -> cost.Floor:
    """The roofline floor of one training step under policy `saved` (`cost.backward_floor`), at
    the copy rate; with `check`, at the fastest memory rate measured and the peak (as `floor`)."""
    return cost.backward_floor(
        spec,
        m,
        flops_per_s=ceilings.compute(matmul_key(spec), check=check),
        bytes_per_s=ceilings.memory if check else ceilings.copy,
        saved=saved,
    )


def backward_metrics(
    spec: MLPSpec, m: int, saved: str, seconds: float, ceilings: Ceilings
) -> dict[str, float]:
    """TFLOP/s, GB/s (of the step's fewest bytes) and % of the step's floor."""
    return {
        "tflops": cost.backward_flops(spec, m, saved) / seconds / 1e12,
        "gbps": cost.backward_bytes(spec, m, saved) / seconds / 1e9,
        "pct_roofline": 100.0 * backward_floor(spec, m, saved, ceilings).seconds / seconds,
    }
