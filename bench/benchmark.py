"""Side-by-side benchmarks: every provider on each (preset, M), with the ceilings of the same run.

Per case: inputs built once and rotated (cases.py); the baselines run first so their outputs serve
as the policy's baseline; every provider (each stack's `auto` included, labelled with the
implementation it chose) is then parity-checked on the case (row subset for large M) and only a
passing one is timed with timing.measure: device time from the framework's profiler, span,
throughput, host issue and host sync, and for torch rows the CUDA-graph cross-check. On a GPU each
timed row is judged (timing.judge_timing): below the roofline floor of its own path by more than the
ceilings' spread -> `invalid measurement` (its numbers stay in the JSON for diagnosis, but no
metric is derived and no table or plot shows it as a result); cross-check disagreements are flags.
Interpreted kernels on a CPU are listed as "interpreted — not timed": an interpreter's speed says
nothing about the kernel. Metrics (metrics.py) are TFLOP/s, GB/s (of the fewest bytes the path must
move) and % of the roofline floor.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from typing import Any

from fusedmlp.common import MLPSpec

from . import ceilings as ceilings_mod
from . import paired
from .cases import Case
from .metrics import Ceilings, all_metrics, floor, matmul_key
from .parity import BASELINE_OF, judge, run_provider, strip
from .providers import AUTO, Provider, sync
from .timing import judge_timing, measure

NOT_TIMED_INTERPRETED = "interpreted — not timed"
NOT_TIMED_FAILED = "FAIL parity — not timed"
TIMED = "timed"
INVALID = "invalid measurement"
# A torch plan whose launches a graph would not record (front.graph_capturable; not attempted: a
# failed capture can leave a stream in an error state). None today: every torch implementation's
# launches record (torch's Mosaic GPU kernels since their direct launch,
# torch_impl/cross/launcher.py).
NOT_CAPTURED = (
    "not captured: the plan runs an implementation whose launches a CUDA graph cannot record "
    "(registry capturable)"
)


def bench_case(
    case: Case,
    providers: list[Provider],
    ceil: Ceilings,
    *,
    timing: dict[str, Any] | None = None,
    on_row: Any = None,
    on_pair: Any = None,
    paired_rounds: int = 0,
    paired_calls: int = paired.DEFAULT_CALLS,
) -> dict[str, Any]:
    """Every provider's row on one case; with `paired_rounds`, `auto` and its stack's baselines
    timed again in interleaved rounds of `paired_calls` calls a sample (bench/paired.py) under
    the result's "paired" (`on_pair` hears which stack is being paired)."""
    timing = timing or {}
    spec, m = case.spec, case.m
    base_out: dict[str, Any] = {}
    done: dict[str, dict[str, Any]] = {}
    timed_fns: dict[Provider, tuple[str, Any]] = {}  # the timed rows' callables, for the pairing
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
                row = {
                    "provider": p.name,
                    "stack": p.stack,
                    "impl": p.impl,
                    "baseline": p.baseline,
                    "status": "skipped",
                    "message": reason,
                }
            elif p.interpreted(case.device, case):
                row = {
                    "provider": p.name,
                    "stack": p.stack,
                    "impl": p.impl,
                    "baseline": p.baseline,
                    "interpreted": True,
                    "status": NOT_TIMED_INTERPRETED,
                }
                try:
                    plan = p.plan(case)
                    row.update(plan=plan.describe(), kernels=plan.kernels(), chosen=plan.impl)
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
                row.update(
                    time_row(
                        p,
                        case,
                        row["_fn"],
                        ceil,
                        timing,
                        chosen=row.get("chosen", p.impl),
                        capturable=row.get("_capturable", True),
                    )
                )
                if paired_rounds and row["status"] == TIMED:
                    timed_fns[p] = (row.get("chosen", p.impl), row["_fn"])
        strip(row)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    per_layer = floor(spec, m, "triton", ceil)
    whole = floor(spec, m, "fused_small", ceil)
    pairs = (
        pair_rows(case.device, timed_fns, paired_rounds, calls=paired_calls, on_pair=on_pair)
        if paired_rounds
        else []
    )
    return {
        "spec": spec.to_dict(),
        "spec_text": str(spec),
        "m": m,
        "device": case.device,
        "input_sets": len(case.torch_sets()) if case._torch_sets is not None else 1,
        "floor": {
            "per_layer_s": per_layer.seconds,
            "whole_s": whole.seconds,
            "bound": per_layer.bound,
            "flops": per_layer.flops,
            "bytes_per_layer": per_layer.bytes,
            "bytes_whole": whole.bytes,
        },
        "rows": rows,
        **({"paired": pairs} if paired_rounds else {}),
    }


def pair_rows(
    device: str,
    timed: dict[Provider, tuple[str, Any]],
    rounds: int,
    *,
    calls: int = paired.DEFAULT_CALLS,
    on_pair: Any = None,
) -> list[dict[str, Any]]:
    """Per stack with a timed row: paired.pair_stack over its `auto` and timed baselines, or an
    entry saying why not ("skipped": `auto` or every baseline untimed; "error": the pairing
    raised). The rows stand either way. `on_pair(text)` is told each stack's pairing as it starts
    (a minute or more at M = 8192: the progress bar says so)."""
    out: list[dict[str, Any]] = []
    for stack in dict.fromkeys(p.stack for p in timed):
        ours = [p for p in timed if p.stack == stack and p.impl == AUTO]
        bases = {p.name: timed[p][1] for p in timed if p.stack == stack and p.baseline}
        if not ours or not bases:
            missing = "auto" if not ours else "a baseline"
            why = f"no timed row of {missing} in this stack (not asked for, or not timed)"
            out.append({"stack": stack, "skipped": why})
            continue
        auto = ours[0]
        if on_pair is not None:
            on_pair(
                f"{stack}: paired rounds ({paired.WARM_ROUNDS} + {rounds} of "
                f"{len(bases) + 1} contenders × 2 × {calls} calls)"
            )
        try:
            out.append(
                paired.pair_stack(
                    stack,
                    device,
                    (auto.name, timed[auto][0], timed[auto][1]),
                    bases,
                    lambda o, s=stack: sync(s, o),
                    rounds=rounds,
                    calls=calls,
                )
            )
        except Exception as exc:
            out.append({"stack": stack, "error": f"{type(exc).__name__}: {exc}"})
    return out


def cudagraph_request(p: Provider, device: str, capturable: bool = True) -> bool | str:
    """timing.measure's `cudagraph` argument: True for torch rows on a GPU, or why not
    (`capturable`: the provider's plan is recorded as planned, Provider.capturable)."""
    if p.stack != "torch" or device != "cuda":
        return False
    return True if capturable else NOT_CAPTURED


def time_row(
    p: Provider,
    case: Case,
    fn: Any,
    ceil: Ceilings,
    timing: dict[str, Any],
    *,
    chosen: str | None = None,
    capturable: bool = True,
) -> dict[str, Any]:
    """The timing fields and verdict of one row (`chosen`: the impl that runs, for `auto`;
    `capturable`: whether a CUDA graph records its plan as planned)."""
    chosen = chosen or p.impl
    return timed_verdict(
        lambda: measure(
            p.stack,
            case.device,
            fn,
            lambda o: sync(p.stack, o),
            cudagraph=cudagraph_request(p, case.device, capturable),
            **timing,
        ),
        case.device,
        lambda check: floor(case.spec, case.m, chosen, ceil, check=check),
        lambda seconds: all_metrics(case.spec, case.m, chosen, seconds, ceil),
    )


def timed_verdict(
    run: Callable[[], dict[str, Any]],
    device: str,
    floor_of: Callable[[bool], Any],
    metrics_of: Callable[[float], dict[str, Any]],
) -> dict[str, Any]:
    """A row's timing fields and verdict, for the forward bench and the backward one alike: `run()`
    measures (timing.measure), `floor_of(check)` is the row's floor (`check=True`: the one the
    judgement uses), `metrics_of(median_s)` the throughput fields of a timed row."""
    try:
        out = run()
    except Exception as exc:
        return {
            "status": "error",
            "message": f"timing failed: {type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }
    if "device_error" in out:
        return {**out, "status": "error", "message": f"device time: {out['device_error']}"}
    out["floor_s"] = floor_of(False).seconds
    if device == "cuda":
        # Judged at the fastest memory rate measured (copy or read-only) and the arithmetic units'
        # physical peak (Ceilings.compute), so that a kernel that streams its weights faster than
        # a copy moves bytes, or computes faster than the large GEMM measured, is not called
        # impossible.
        check = floor_of(True)
        out["floor_check_s"] = check.seconds
        invalid, flags = judge_timing(out, check.seconds, check.bound)
        if flags:
            out["flags"] = flags
        if invalid:
            return {**out, "status": INVALID, "message": invalid}
    return {**out, "status": TIMED, **metrics_of(out["time"]["median"])}


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
    on_pair: Any = None,
    on_case: Any = None,
    checkpoint: Any = None,
    ceilings: Ceilings | None = None,
    paired_rounds: int = 0,
    paired_calls: int = paired.DEFAULT_CALLS,
) -> dict[str, Any]:
    """`items` are (preset name or label, spec, M). Ceilings first, then every case; `checkpoint`
    gets the results so far after each case (the runner saves them, so a time limit keeps them)."""
    ceil = ceilings or ceilings_mod.measure(
        device, ceiling_keys([s for _, s, _ in items]), quick=quick
    )
    cases = []
    for label, spec, m in items:
        if on_case is not None:
            on_case(label, spec, m)
        start = time.perf_counter()
        case = Case(spec, m, device)
        result = bench_case(
            case,
            providers,
            ceil,
            timing=timing,
            on_row=on_row,
            on_pair=on_pair,
            paired_rounds=paired_rounds,
            paired_calls=paired_calls,
        )
        result["preset"] = label
        result["wall_s"] = round(time.perf_counter() - start, 1)  # the runner's budget (log.txt)
        cases.append(result)
        case.release()
        if checkpoint is not None:
            checkpoint({"ceilings": ceil.to_dict(), "cases": cases, "partial": True})
    return {"ceilings": ceil.to_dict(), "cases": cases}
