"""`fusedmlp parity --backward`: every implementation's gradients against the float64 reference
backward, and the twins' gradients against each other, on the same inputs.

For each case (spec, M) and provider: one training call — torch: `loss.backward()` through the
front (`torch_impl.mlp` runs the training op: the portable saving forward and the backward
kernels), JAX: `jax.vjp` of `jax_impl.mlp` (its custom_vjp) — with the same cotangent dy for every
provider. Each gradient (dx and every param, in the contract's plain names) is judged by
`common.tolerance.compare_grads` against `reference.backward(round_hidden=True)` (the forward as
the kernels store it: the linearisation point the gradient bounds are set at), with the stack's
framework gradients (`eager`'s torch autograd, `xla`'s jax.vjp) as the baseline of the 2× rule.
A row's numbers are its worst gradient's; `grads` lists every one. Twin pairs are compared
gradient by gradient within twice the gradient bounds, and said whether bit-identical.

The reference backward needs the whole batch (dW sums over every row), so unlike the forward's
parity there is no row subset: cases are capped at `MAX_M` rows (float64 on the host), and larger
M is reported `n/a`.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from fusedmlp.common import reference, tolerance
from fusedmlp.common.dtypes import cast

from .cases import Case, to_numpy
from .parity import BASELINE_OF, _failed, difference, pair_row, row_header, run_parity, strip
from .providers import FAULTS, TWINS, Provider, front, sync

MAX_M = 4096  # rows of the float64 reference backward (M·widths² float64 FLOPs on the host)


def cotangent(case: Case) -> np.ndarray:
    """dy [M, d_out] in the spec dtype, seeded (the same for every provider of the case)."""
    rng = np.random.default_rng(case.seed + 3)
    return cast(rng.standard_normal((case.m, case.spec.d_out)), case.spec.dtype)


def grad_reference(case: Case) -> dict[str, np.ndarray]:
    return reference.backward(
        case.spec, case.x, case.params, cotangent(case).astype(np.float64), round_hidden=True
    )


def _faulty(p: Provider) -> bool:
    # `--inject-fault IMPL` (providers.FAULTS): the output scaled by 1.01, so every gradient is.
    return p.name in FAULTS or p.impl in FAULTS


def _torch_grads(p: Provider, case: Case) -> dict[str, Any]:
    import torch

    from fusedmlp.torch_impl.module import to_torch

    x0, params0 = case.torch_sets()[0]
    x = x0.detach().clone().requires_grad_()
    params = {k: v.detach().clone().requires_grad_() for k, v in params0.items()}
    dy = to_torch(cotangent(case), case.device)
    y = front("torch").mlp(x, params, case.spec, impl=p.impl)
    (y * 1.01 if _faulty(p) else y).backward(dy)
    grads = {"x": x.grad, **{k: v.grad for k, v in params.items()}}
    if case.device == "cuda":
        torch.cuda.synchronize()
    return grads


def _jax_grads(p: Provider, case: Case) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    x, params = case.jax_sets()[0]
    spec, impl, scale = case.spec, p.impl, 1.01 if _faulty(p) else 1.0

    def call(x: Any, prm: Any) -> Any:
        return front("jax").mlp(x, prm, spec, impl=impl) * scale

    _, vjp = jax.vjp(call, x, params)
    dx, dparams = vjp(jnp.asarray(cotangent(case)))
    grads = {"x": dx, **dparams}
    sync("jax", dx)
    return grads


def run_provider(p: Provider, case: Case) -> dict[str, Any]:
    """One provider's gradients (kept under '_grads', NumPy), not yet judged."""
    row = row_header(p, case)
    reason = p.enabled(case.device)
    if reason is not None:
        return {**row, "status": "skipped", "message": reason}
    if case.m > MAX_M:
        return {**row, "status": "n/a", "message": f"M={case.m} > {MAX_M}: reference too slow"}
    try:
        plan = front(p.stack).plan(
            case.spec, (case.m, case.spec.d_in), impl=p.impl, device=case.device
        )
        row.update(plan=plan.describe(), kernels=plan.kernels(), chosen=plan.impl)
        t0 = time.perf_counter()
        grads = _torch_grads(p, case) if p.stack == "torch" else _jax_grads(p, case)
    except Exception as exc:
        return _failed(row, exc)
    row["seconds"] = time.perf_counter() - t0  # first call: includes compilation
    row["_grads"] = {k: to_numpy(v) for k, v in grads.items()}
    return row


def judge(
    row: dict[str, Any],
    ref: dict[str, np.ndarray],
    case: Case,
    baseline: dict[str, np.ndarray] | None,
) -> None:
    """The policy's verdict per gradient; the row's measures are its worst gradient's."""
    results = tolerance.compare_grads(row["_grads"], ref, case.spec, baselines=baseline)
    worst = max(results.items(), key=lambda kv: kv[1].rel_fro / kv[1].bounds.rel_fro)
    cmp = worst[1]
    row.update(
        status="pass" if all(c.passed for c in results.values()) else "FAIL",
        rel_fro=cmp.rel_fro,
        max_abs=cmp.max_abs,
        max_scaled=max(c.max_scaled for c in results.values()),
        bound_rel_fro=cmp.bounds.rel_fro,
        bound_max_scaled=cmp.bounds.max_scaled,
        baseline_rel_fro=cmp.baseline_rel_fro,
        baseline_limit=cmp.baseline_limit,
        worst=f"d{worst[0]}",
        grads={
            f"d{k}": {"passed": c.passed, "rel_fro": c.rel_fro, "max_scaled": c.max_scaled}
            for k, c in results.items()
        },
    )
    bad = [f"d{k}: {c.report()}" for k, c in results.items() if not c.passed]
    if bad:
        row["message"] = "; ".join(bad)


def cross(
    a: dict[str, Any], b: dict[str, Any], ref: dict[str, np.ndarray], case: Case
) -> dict[str, Any]:
    """Two providers' gradients compared with each other, gradient by gradient: the worst one's
    measures against twice the gradient bounds."""
    diffs = [difference(a["_grads"][key], b["_grads"][key], r) for key, r in ref.items()]
    measures = (
        max(d[0] for d in diffs),
        max(d[1] for d in diffs),
        max(d[2] for d in diffs),
        all(d[3] for d in diffs),
        all(d[4] for d in diffs),
    )
    return pair_row(a, b, measures, tolerance.grad_bounds(case.spec))


def parity_case(case: Case, providers: list[Provider], *, on_row: Any = None) -> dict[str, Any]:
    """Every provider's gradients on one case, judged, plus the twins' cross-checks."""
    by_name: dict[str, dict[str, Any]] = {}
    baselines: dict[str, dict[str, np.ndarray] | None] = {}
    for stack, impl in BASELINE_OF.items():
        if any(p.stack == stack for p in providers):
            base = Provider(stack, impl, True)
            row = run_provider(base, case)
            baselines[stack] = row.get("_grads")
            if base in providers:
                by_name[base.name] = row
    ref = grad_reference(case) if case.m <= MAX_M else {}
    rows = []
    for p in providers:
        row = by_name.get(p.name) or run_provider(p, case)
        if "_grads" in row:
            judge(row, ref, case, None if p.baseline else baselines.get(p.stack))
        by_name[p.name] = row
        rows.append(row)
        if on_row is not None:
            on_row(row)
    pairs = [
        cross(a, b, ref, case)
        for ti, ji in TWINS
        if (a := by_name.get(f"torch:{ti}")) is not None
        and (b := by_name.get(f"jax:{ji}")) is not None
        and "_grads" in a
        and "_grads" in b
    ]
    for row in rows:
        row.pop("_grads", None)
        strip(row)
    return {
        "spec": case.spec.to_dict(),
        "spec_text": str(case.spec),
        "m": case.m,
        "device": case.device,
        "backward": True,
        "rows_checked": case.m,
        "row_subset": False,
        "rows": rows,
        "cross": pairs,
    }


def run_grad_parity(
    items: list[tuple[Any, int]],
    providers: list[Provider],
    device: str,
    *,
    on_row: Any = None,
    checkpoint: Any = None,
) -> dict[str, Any]:
    """`parity.run_parity` with the gradients' `parity_case`."""
    return run_parity(
        items, providers, device, on_row=on_row, checkpoint=checkpoint, case_fn=parity_case
    )
