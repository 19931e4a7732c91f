"""The parity matrix: every implementation against the float64 reference and the twins against each
other, on the same inputs.

For each case (spec, M) and provider: the front's plan (which kernels run), one call, the output
judged by `common.tolerance.compare` against the reference — with the stack's own framework result
(`eager` for torch, `xla` for JAX) as the `baseline` of the policy's 2x rule for the kernels. Then
each twin pair (`triton` ↔ `pallas_triton`, `fused_small` ↔ `fused_small`, `eager` ↔ `xla`, ...) is
compared with each other: their difference, scaled like the policy's measures by the reference, must
stay within twice the policy's bounds (which two outputs that each pass must satisfy, by the
triangle inequality) and is reported with whether the bits are identical.

Statuses: `pass`; `FAIL` (out of tolerance) and `error` (an exception) fail the run; `n/a` (the
implementation raised NotImplementedError for this spec, e.g. fused_small at widths > 128) and
`skipped` (cannot run on this device) do not.
"""

from __future__ import annotations

import time
import traceback
from typing import Any

import numpy as np

from fusedmlp.common import MLPSpec, tolerance

from .cases import Case
from .providers import TWINS, Provider, sync

FAILING = ("FAIL", "error")
BASELINE_OF = {"torch": "eager", "jax": "xla"}


def _short(exc: BaseException, limit: int = 160) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _failed(row: dict[str, Any], exc: Exception) -> dict[str, Any]:
    """`row` ended by an exception: "n/a" for a NotImplementedError, else "error" with its
    traceback (called inside the `except` block that caught it)."""
    if isinstance(exc, NotImplementedError):
        return {**row, "status": "n/a", "message": str(exc)}
    return {**row, "status": "error", "message": _short(exc), "traceback": traceback.format_exc()}


def row_header(p: Provider, case: Case) -> dict[str, Any]:
    """The fields every row of a provider starts with."""
    return {
        "provider": p.name,
        "stack": p.stack,
        "impl": p.impl,
        "baseline": p.baseline,
        "interpreted": p.interpreted(case.device, case),
    }


def run_provider(p: Provider, case: Case) -> dict[str, Any]:
    """Plan and run one provider once; the row without judgement (output kept under '_out')."""
    row = row_header(p, case)
    reason = p.enabled(case.device)
    if reason is not None:
        return {**row, "status": "skipped", "message": reason}
    try:
        plan = p.plan(case)
    except Exception as exc:
        return _failed(row, exc)
    row.update(plan=plan.describe(), kernels=plan.kernels(), chosen=plan.impl)
    row["_capturable"] = p.capturable(plan)
    t0 = time.perf_counter()
    try:
        fn = p.make(case)
        out = fn(0)
        sync(p.stack, out)
    except Exception as exc:
        return _failed(row, exc)
    row["seconds"] = time.perf_counter() - t0  # first call: includes compilation
    row["_out"] = case.select(out)
    row["_fn"] = fn
    return row


def judge(row: dict[str, Any], case: Case, baseline: np.ndarray | None) -> dict[str, Any]:
    """Add the tolerance policy's verdict to a row that has an output."""
    cmp = tolerance.compare(row["_out"], case.reference(), case.spec, baseline=baseline)
    row.update(
        status="pass" if cmp.passed else "FAIL",
        rel_fro=cmp.rel_fro,
        max_abs=cmp.max_abs,
        max_scaled=cmp.max_scaled,
        bound_rel_fro=cmp.bounds.rel_fro,
        bound_max_scaled=cmp.bounds.max_scaled,
        baseline_rel_fro=cmp.baseline_rel_fro,
        baseline_limit=cmp.baseline_limit,
    )
    if not cmp.passed:
        row["message"] = cmp.report()
    return row


def difference(x: Any, y: Any, ref: np.ndarray) -> tuple[float, float, float, bool, bool]:
    """x − y in the policy's measures, scaled by `ref`: (rel_fro, max_abs, max_scaled, identical
    bits, NaNs in the same places)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    finite = np.isfinite(ref)
    diff = np.where(finite, x - y, 0.0)
    ref_norm = float(np.linalg.norm(np.where(finite, ref, 0.0))) or 1.0
    ref_max = float(np.max(np.abs(ref[finite]))) if finite.any() else 1.0
    rel = float(np.linalg.norm(diff)) / ref_norm
    max_abs = float(np.max(np.abs(diff))) if diff.size else 0.0
    identical = bool(np.array_equal(x, y, equal_nan=True))
    same_nans = bool(np.array_equal(np.isnan(x), np.isnan(y)))
    return rel, max_abs, max_abs / (ref_max or 1.0), identical, same_nans


def pair_row(
    a: dict[str, Any],
    b: dict[str, Any],
    measures: tuple[float, float, float, bool, bool],
    bounds: tolerance.Bounds,
) -> dict[str, Any]:
    """A twin pair's row: within twice the policy's bounds (what two outputs that each pass must
    satisfy, by the triangle inequality), NaNs in the same places."""
    rel, max_abs, scaled, identical, same_nans = measures
    ok = bool(np.isfinite(rel)) and rel <= 2 * bounds.rel_fro and scaled <= 2 * bounds.max_scaled
    return {
        "pair": f"{a['provider']} vs {b['provider']}",
        "rel_fro": rel,
        "max_abs": max_abs,
        "max_scaled": scaled,
        "bound_rel_fro": 2 * bounds.rel_fro,
        "bound_max_scaled": 2 * bounds.max_scaled,
        "identical": identical,
        "status": "pass" if ok and same_nans else "FAIL",
    }


def cross(a: dict[str, Any], b: dict[str, Any], case: Case) -> dict[str, Any]:
    """Two outputs of the same inputs compared with each other, in the policy's own measures."""
    measures = difference(a["_out"], b["_out"], case.reference())
    return pair_row(a, b, measures, tolerance.bounds(case.spec))


def parity_case(case: Case, providers: list[Provider], *, on_row: Any = None) -> dict[str, Any]:
    """Every provider on one case, judged, plus the twin cross-checks."""
    by_name: dict[str, dict[str, Any]] = {}
    baselines: dict[str, np.ndarray | None] = {}
    for stack, impl in BASELINE_OF.items():
        if any(p.stack == stack for p in providers):
            base = Provider(stack, impl, True)
            row = run_provider(base, case)
            baselines[stack] = row.get("_out")
            if base in providers:
                by_name[base.name] = row
    rows = []
    for p in providers:
        row = by_name.get(p.name) or run_provider(p, case)
        if "_out" in row:
            judge(row, case, None if p.baseline else baselines.get(p.stack))
        by_name[p.name] = row
        rows.append(row)
        if on_row is not None:
            on_row(row)
    pairs = []
    for ti, ji in TWINS:
        a, b = by_name.get(f"torch:{ti}"), by_name.get(f"jax:{ji}")
        if a is not None and b is not None and "_out" in a and "_out" in b:
            pairs.append(cross(a, b, case))
    for row in rows:
        strip(row)
    return {
        "spec": case.spec.to_dict(),
        "spec_text": str(case.spec),
        "m": case.m,
        "device": case.device,
        "rows_checked": len(case.rows),
        "row_subset": case.subset,
        "rows": rows,
        "cross": pairs,
    }


def strip(row: dict[str, Any]) -> dict[str, Any]:
    """Drop the in-memory fields (output, thunk, capture flag) before a row is stored."""
    row.pop("_out", None)
    row.pop("_fn", None)
    row.pop("_capturable", None)
    return row


def summarize(cases: list[dict[str, Any]]) -> dict[str, Any]:
    failures = [
        f"{c['spec_text']} M={c['m']}: {r['provider']} {r['status']}"
        for c in cases
        for r in c["rows"]
        if r["status"] in FAILING
    ] + [
        f"{c['spec_text']} M={c['m']}: {x['pair']} FAIL"
        for c in cases
        for x in c["cross"]
        if x["status"] == "FAIL"
    ]
    counts: dict[str, int] = {}
    for c in cases:
        for r in c["rows"]:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
    return {"passed": not failures, "failures": failures, "counts": counts}


def run_parity(
    items: list[tuple[MLPSpec, int]],
    providers: list[Provider],
    device: str,
    *,
    on_row: Any = None,
    checkpoint: Any = None,
    case_fn: Any = None,
) -> dict[str, Any]:
    """Every case in turn; `checkpoint` gets the results so far after each case. `case_fn`: what
    one case runs (default `parity_case`; grad_parity's for the gradients)."""
    case_fn = case_fn or parity_case
    cases = []
    for spec, m in items:
        case = Case(spec, m, device, rotate=False)
        cases.append(case_fn(case, providers, on_row=on_row))
        case.release()
        if checkpoint is not None:
            checkpoint({"cases": cases, **summarize(cases), "partial": True})
    return {"cases": cases, **summarize(cases)}
