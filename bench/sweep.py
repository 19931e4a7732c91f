"""The narrow-MLP sweep (issue 14): fused_small against the best baseline of each stack.

Grid: widths 16, 32, 64, 128 × depths 2, 4, 6, 8 layers (all hidden widths equal), relu, no bias,
float16 on the GPU over M = 2^20 rows — the NeRF / neural-field regime. Each cell is a benchmark
case (benchmark.bench_case: parity-checked, then timed, inputs rotated beyond L2); its result is the
speedup of each stack's `fused_small` over that stack's fastest baseline (torch: eager or compile;
JAX: xla), and the cell's floor is the whole-MLP roofline floor (x read once, y written once,
weights once).

Times are the bench's (device time on a GPU, each call after an L2 flush; timing.py); a row that
is an invalid measurement counts as untimed.

`--short` (the CPU mode): widths 16, 32 × depths 2, 3, float32, M = 512, and torch.compile left out
unless asked for (its first compile costs tens of seconds per cell on two CPU cores). On a CPU
fused_small runs interpreted, so cells show the baselines' times and floors and speedup "n/a".
"""

from __future__ import annotations

from typing import Any

from fusedmlp.common import MLPSpec

from . import ceilings as ceilings_mod
from .benchmark import bench_case
from .cases import Case
from .metrics import Ceilings, floor
from .providers import Provider, select
from .report import is_result

WIDTHS = (16, 32, 64, 128)
DEPTHS = (2, 4, 6, 8)
GPU_M = 2**20
SHORT_WIDTHS = (16, 32)
SHORT_DEPTHS = (2, 3)
SHORT_M = 512
DEFAULT_IMPLS = "fused_small,eager,compile,xla"
SHORT_IMPLS = "fused_small,eager,xla"


def sweep_spec(width: int, depth: int, dtype: str, activation: str = "relu") -> MLPSpec:
    return MLPSpec((width,) * (depth + 1), activation, bias=False, dtype=dtype)


def speedups(rows: list[dict[str, Any]]) -> tuple[dict[str, float | None], dict[str, float]]:
    """Each stack's best-baseline / fused_small speedup, from rows whose time is a result (timed
    and not an invalid measurement); and those times by provider."""
    times = {r["provider"]: r["time"]["median"] for r in rows if is_result(r)}
    out: dict[str, float | None] = {}
    for stack in ("torch", "jax"):
        fused = times.get(f"{stack}:fused_small")
        base = [
            t
            for r in rows
            if r.get("baseline")
            and r["stack"] == stack
            and (t := times.get(r["provider"])) is not None
        ]
        out[stack] = min(base) / fused if fused and base else None
    return out, times


def run_sweep(
    device: str,
    *,
    short: bool = False,
    widths: tuple[int, ...] | None = None,
    depths: tuple[int, ...] | None = None,
    m: int | None = None,
    impls: str | None = None,
    activation: str = "relu",
    timing: dict[str, Any] | None = None,
    ceil: Ceilings | None = None,
    on_cell: Any = None,
    checkpoint: Any = None,
) -> dict[str, Any]:
    widths = widths or (SHORT_WIDTHS if short else WIDTHS)
    depths = depths or (SHORT_DEPTHS if short else DEPTHS)
    m = m or (SHORT_M if short else GPU_M)
    dtype = "float16" if device == "cuda" else "float32"
    providers: list[Provider] = select(impls or (SHORT_IMPLS if short else DEFAULT_IMPLS))
    ceil = ceil or ceilings_mod.measure(device, (dtype,), quick=short)
    cells = []
    for depth in depths:
        for width in widths:
            spec = sweep_spec(width, depth, dtype, activation)
            case = Case(spec, m, device)
            result = bench_case(case, providers, ceil, timing=timing)
            case.release()
            sp, times = speedups(result["rows"])
            untimed: dict[str, list[str]] = {}
            for r in result["rows"]:
                if r["impl"] == "fused_small" and r["status"] != "timed":
                    untimed.setdefault(r["status"].split(" (")[0], []).append(r["stack"])
            notes = [f"fused_small {s} ({', '.join(st)})" for s, st in untimed.items()]
            cell = {
                "width": width,
                "depth": depth,
                "floor_s": floor(spec, m, "fused_small", ceil).seconds,
                "times": times,
                "speedup": sp,
                "note": "; ".join(notes),
                "rows": result["rows"],
            }
            cells.append(cell)
            if on_cell is not None:
                on_cell(cell)
            if checkpoint is not None:
                checkpoint(
                    _result(
                        device,
                        dtype,
                        activation,
                        m,
                        widths,
                        depths,
                        providers,
                        ceil,
                        cells,
                        partial=True,
                    )
                )
    return _result(device, dtype, activation, m, widths, depths, providers, ceil, cells)


def _result(
    device: str,
    dtype: str,
    activation: str,
    m: int,
    widths: tuple[int, ...],
    depths: tuple[int, ...],
    providers: list[Provider],
    ceil: Ceilings,
    cells: list[dict[str, Any]],
    *,
    partial: bool = False,
) -> dict[str, Any]:
    return {
        "device": device,
        "dtype": dtype,
        "activation": activation,
        "m": m,
        "widths": list(widths),
        "depths": list(depths),
        "providers": [p.name for p in providers],
        "ceilings": ceil.to_dict(),
        "cells": cells,
        **({"partial": True} if partial else {}),
    }
