"""Side-by-side benchmarks: every provider on each (preset, M), with the ceilings of the same run.

Per case: inputs built once and rotated (cases.py); the baselines run first so their outputs serve
as the policy's baseline; every provider is then parity-checked on the case (row subset for large M)
and only a passing one is timed (timing.py: CUDA events for torch, the profiler for JAX, host clock
on a CPU), with its host dispatch time beside it as overhead. Interpreted kernels on a CPU are
listed as "interpreted — not timed": an interpreter's speed says nothing about the kernel. Metrics
(metrics.py) are TFLOP/s, GB/s (of the fewest bytes the path must move) and % of the roofline floor.
"""

from __future__ import annotations

import traceback
from typing import Any

from fusedmlp.common import MLPSpec

from . import ceilings as ceilings_mod
from .cases import Case
from .metrics import Ceilings, all_metrics, floor, matmul_key
from .parity import BASELINE_OF, judge, run_provider, strip
from .providers import Provider, sync
from .timing import host_dispatch, time_device

NOT_TIMED_INTERPRETED = "interpreted — not timed"
NOT_TIMED_FAILED = "FAIL parity — not timed"


def bench_case(
    case: Case,
    providers: list[Provider],
    ceil: Ceilings,
    *,
    timing: dict[str, Any] | None = None,
    on_row: Any = None,
) -> dict[str, Any]:
    timing = timing or {}
    spec, m = case.spec, case.m
    base_out: dict[str, Any] = {}
    done: dict[str, dict[str, Any]] = {}
    for stack, impl in BASELINE_OF.items():
        base = Provider(stack, impl, True)
        if base in providers and base.enabled(case.device) is None:
            row = run_provider(base, case)
            done[base.name] = row
            base_out[stack] = row.get("_out")
    rows = []
    for p in providers:
        row = done.get(p.name)
        if row is None:
            reason = p.enabled(case.device)
            if reason is not None:
                row = {"provider": p.name, "stack": p.stack, "impl": p.impl,
                       "baseline": p.baseline, "status": "skipped", "message": reason}
            elif p.interpreted(case.device):
                row = {"provider": p.name, "stack": p.stack, "impl": p.impl,
                       "baseline": p.baseline, "interpreted": True,
                       "status": NOT_TIMED_INTERPRETED}
                try:
                    plan = p.plan(case)
                    row.update(plan=plan.describe(), kernels=plan.kernels())
                except NotImplementedError as exc:
                    row.update(status="n/a", message=str(exc))
                except Exception as exc:
                    row.update(status="error", message=f"{type(exc).__name__}: {exc}")
            else:
                row = run_provider(p, case)
        if "_out" in row:
            judge(row, case, None if p.baseline else base_out.get(p.stack))
            row["parity"] = row.pop("status")
            if row["parity"] != "pass":
                row["status"] = NOT_TIMED_FAILED
            else:
                row.update(_time(p, case, row["_fn"], ceil, timing))
        strip(row)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    per_layer = floor(spec, m, "triton", ceil)
    whole = floor(spec, m, "fused_small", ceil)
    return {
        "spec": spec.to_dict(),
        "spec_text": str(spec),
        "m": m,
        "device": case.device,
        "input_sets": len(case.torch_sets()) if case._torch_sets is not None else 1,
        "floor": {"per_layer_s": per_layer.seconds, "whole_s": whole.seconds,
                  "bound": per_layer.bound, "flops": per_layer.flops,
                  "bytes_per_layer": per_layer.bytes, "bytes_whole": whole.bytes},
        "rows": rows,
    }


def _time(p: Provider, case: Case, fn: Any, ceil: Ceilings, timing: dict[str, Any]
          ) -> dict[str, Any]:
    try:
        stats, note = time_device(p.stack, case.device, fn, **timing)
        dispatch = host_dispatch(fn, lambda out: sync(p.stack, out), reps=30)
    except Exception as exc:
        return {"status": "error", "message": f"timing failed: {type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()}
    out = {
        "status": "timed",
        "time": stats.to_dict(),
        "host_dispatch_s": dispatch.median,
        **all_metrics(case.spec, case.m, p.impl, stats.median, ceil),
    }
    if note:
        out["note"] = note
    return out


def ceiling_keys(specs: list[MLPSpec]) -> tuple[str, ...]:
    return tuple(sorted({matmul_key(s) for s in specs}))


def run_bench(
    items: list[tuple[str, MLPSpec, int]],
    providers: list[Provider],
    device: str,
    *,
    quick: bool = False,
    timing: dict[str, Any] | None = None,
    on_row: Any = None,
    on_case: Any = None,
    checkpoint: Any = None,
) -> dict[str, Any]:
    """`items` are (preset name or label, spec, M). Ceilings first, then every case; `checkpoint`
    gets the results so far after each case (the runner saves them, so a time limit keeps them)."""
    ceil = ceilings_mod.measure(device, ceiling_keys([s for _, s, _ in items]), quick=quick)
    cases = []
    for label, spec, m in items:
        if on_case is not None:
            on_case(label, spec, m)
        case = Case(spec, m, device)
        result = bench_case(case, providers, ceil, timing=timing, on_row=on_row)
        result["preset"] = label
        cases.append(result)
        case.release()
        if checkpoint is not None:
            checkpoint({"ceilings": ceil.to_dict(), "cases": cases, "partial": True})
    return {"ceilings": ceil.to_dict(), "cases": cases}
