"""`fusedmlp bench --backward`: one training step (forward + backward) per provider, timed with the
forward bench's method, its peak memory measured, beside the frameworks' own autodiff.

One step, for every row: y = MLP(x) with x and every param requiring grad, then the gradients of
loss = Σ y·dy for a fixed seeded dy (`grad_parity.cotangent`, the same for every row), taken as
the vector-Jacobian product with dy — torch `y.backward(dy)` (`torch_step`), JAX one jitted
`jax.vjp(f, x, params)` applied to dy returning (y, dx, dparams) (`jax_step`). That is that
loss's gradient without the multiply and sum of the loss itself: the same work in both stacks
and for every row. Our rows train through the fronts with `saved=` (the training op and its
custom_vjp) on params packed once per input set (`pack_params`, as `FusedMLP` holds them; the
backward kernels read the packed layout); the baselines differentiate their plain ops on plain
params: `eager` (torch autograd), `compile` (torch.compile of the same: AOTAutograd's forward and
backward graphs), `xla` (jax.vjp of the plain jax.numpy function). Input sets are rotated and
each set's grads are dropped (`.grad = None`) before its step, so no step accumulates.

Parity gate, before any timing (a path that fails is flagged `FAIL parity — not timed`): at
M ≤ `grad_parity.MAX_M` every gradient is judged by `tolerance.compare_grads` against the float64
reference backward, with the stack's framework gradients as the 2× baseline (grad_parity.judge).
Above, the reference is out of reach on the host (dW sums over every row), so each path's
gradients must agree with its stack's framework gradients within twice `tolerance.grad_bounds`
(what two results that each pass must satisfy, the twins' rule), computed on the device; the
framework rows `eager` and `xla` are held to each other the same way where both stacks run, and
are the yardstick (`parity: "yardstick"`, timed) where only one does; where the framework's own
step failed there is nothing to hold our rows to, and they are flagged, not timed.

Timing: `timing.measure` of the step, as the forward bench times a call — on a GPU the device
time (the sum of the step's kernel durations, each step after the L2 flush, from torch.profiler
or jax.profiler), span, K, throughput, host issue and sync; on a CPU the host sync clock,
labelled so. Interpreted kernels (a CPU) are gated — one step through the interpreter proves the
step's wiring and its gradients — and listed `interpreted — not timed`. No CUDA-graph cross-check:
a step allocates its gradients and runs autograd's engine, which the forward bench's capture of
one call does not cover (`NO_CUDAGRAPH`); the device-vs-throughput flag still applies. Each
GPU row is judged against the backward floor of its own policy (`metrics.backward_floor`:
`common.cost.backward_floor`) exactly as the forward bench judges against its floor.

Memory, `peak_bytes`: what one step allocates at its peak above what is resident before it (x,
params, dy, every other buffer of the process), so the step's temporaries, its saved residuals,
y and the gradients. torch on a GPU: `torch.cuda.max_memory_allocated()` over one step minus
`memory_allocated()` before it (every set's grads dropped first); torch on a CPU: the running sum
of torch.profiler's allocation events over one step (the CPU allocator keeps no peak statistic).
JAX: the compiled step's `memory_analysis()`, temp + output − alias bytes: XLA gives an
executable one temp buffer the size of the peak its buffer assignment found live, and allocates
its outputs (y, dx, dparams) apart, its arguments being resident — the same accounting as
torch's peak above the resident inputs. It is XLA's plan, not an observation, which is why it is
used: JAX's allocator statistics cannot be reset between rows and, in a process that runs torch
too, would not tell one step's peak from the process's. Differences that remain: cuBLAS's
workspace is XLA temp, while torch allocates it once per handle (resident, not counted), and the
caching allocator rounds blocks to 512 bytes.

Per case: the floors of both policies, and per timed row its `floor_s`, TFLOP/s (the step's
FLOPs), GB/s (its fewest bytes), % of its floor, and `vs_best_baseline`: the best baseline time
of the same stack over the row's time (> 1: faster than the frameworks' best).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from fusedmlp.common import MLPSpec, tolerance
from fusedmlp.common.config import DEFAULT_SAVED, SAVED_POLICIES
from fusedmlp.common.packing import unpack_params

from . import ceilings as ceilings_mod
from . import grad_parity
from .benchmark import NOT_TIMED_FAILED, NOT_TIMED_INTERPRETED, TIMED, ceiling_keys, timed_verdict
from .cases import Case, to_numpy, torch_to_jax
from .metrics import Ceilings, backward_floor, backward_metrics
from .parity import BASELINE_OF, _failed, pair_row, row_header, strip
from .providers import FAULTS, Provider, front
from .timing import measure

NO_CUDAGRAPH = (
    "not attempted: a training step allocates its gradients and runs autograd's engine; the "
    "device time and the throughput cross-check stand"
)
YARDSTICK = "yardstick"
# The gate at M above grad_parity.MAX_M (a module attribute so that tests can lower it).
REFERENCE_MAX_M = grad_parity.MAX_M
Step = Callable[[int], Any]


# ---- one training step per stack ---------------------------------------------------------------
def _faulty(p: Provider) -> bool:
    # `--inject-fault IMPL` (providers.FAULTS): the output scaled by 1.01, so every gradient is.
    return p.name in FAULTS or p.impl in FAULTS


def torch_step(
    sets: list[tuple[Any, dict[str, Any]]],
    spec: MLPSpec,
    impl: str,
    dy: Any,
    *,
    saved: str = DEFAULT_SAVED,
    faulty: bool = False,
) -> tuple[Step, Callable[[], None]]:
    """(step, clear): `step(i)` runs one forward + backward of `front.mlp(impl=, saved=)` on input
    set i mod len(sets) with cotangent dy and returns its gradients {"x": dx, name: dparam} in
    the params' own names; `clear()` drops every set's gradients. The sets' tensors are wrapped as
    fresh leaves that require grad (the same storage)."""
    fr = front("torch")
    leaves = []
    for x, params in sets:
        lx = x.detach().requires_grad_()
        lp = {k: v.detach().requires_grad_() for k, v in params.items()}
        leaves.append((lx, lp, [lx, *lp.values()]))

    def clear() -> None:
        for _, _, tensors in leaves:
            for t in tensors:
                t.grad = None

    def step(i: int) -> dict[str, Any]:
        x, params, tensors = leaves[i % len(leaves)]
        for t in tensors:
            t.grad = None
        y = fr.mlp(x, params, spec, impl=impl, saved=saved)
        (y * 1.01 if faulty else y).backward(dy)
        return {"x": x.grad, **{k: v.grad for k, v in params.items()}}

    return step, clear


@functools.cache
def _jax_jitted_step(
    impl: str, spec: MLPSpec, saved: str, faulty: bool, generation: int = 0
) -> Callable[..., Any]:
    """The jitted step (x, params, dy) -> (y, dx, dparams), one per (impl, spec, saved, fault);
    `generation`: the dispatch table's, for `auto` (part of the cache key only)."""
    import jax

    del generation
    fr = front("jax")

    def forward(x: Any, params: Any) -> Any:
        y = fr.mlp(x, params, spec, impl=impl, saved=saved)
        return y * 1.01 if faulty else y

    def step(x: Any, params: Any, dy: Any) -> Any:
        y, vjp = jax.vjp(forward, x, params)
        dx, dparams = vjp(dy)
        return y, dx, dparams

    step.__name__ = f"fusedmlp_train_{impl}"  # the executable's name in profiler traces
    return jax.jit(step)


def jax_step(
    sets: list[tuple[Any, dict[str, Any]]],
    spec: MLPSpec,
    impl: str,
    dy: Any,
    *,
    saved: str = DEFAULT_SAVED,
    faulty: bool = False,
) -> tuple[Step, Any]:
    """(step, compiled): `step(i)` runs the compiled training step on input set i mod len(sets)
    and returns (y, grads) with grads {"x": dx, name: dparam}; `compiled` is the executable
    (lowered once on set 0, called directly: compiled once), for its memory analysis."""
    from fusedmlp.common import dispatch

    jitted = _jax_jitted_step(
        impl, spec, saved, faulty, dispatch.generation() if impl == "auto" else 0
    )
    x0, p0 = sets[0]
    compiled = jitted.lower(x0, p0, dy).compile()

    def step(i: int) -> tuple[Any, dict[str, Any]]:
        x, params = sets[i % len(sets)]
        y, dx, dparams = compiled(x, params, dy)
        return y, {"x": dx, **dparams}

    return step, compiled


# ---- peak memory ---------------------------------------------------------------------------------
def torch_peak_bytes(step: Step, clear: Callable[[], None], device: str) -> tuple[int, str]:
    """(bytes, method): one step's peak allocation above what was allocated before it."""
    import torch

    clear()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = step(0)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del out
        clear()
        return peak, "torch.cuda.max_memory_allocated over one step − memory_allocated before"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = step(0)
    del out
    clear()
    # Each event's own allocations (frees negative), in the order they happened: the running
    # sum's maximum is the step's peak above its start.
    events = sorted(
        (e for e in prof.events() if getattr(e, "self_cpu_memory_usage", 0)),
        key=lambda e: e.time_range.start,
    )
    running = peak = 0
    for e in events:
        running += e.self_cpu_memory_usage
        peak = max(peak, running)
    return peak, "torch.profiler CPU allocation events over one step, peak of the running sum"


def jax_peak_bytes(compiled: Any) -> tuple[int | None, str]:
    """(bytes, method): the compiled step's temp + output − alias bytes (module docstring)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None, "not measured: memory_analysis() gave nothing on this backend"
    peak = stats.temp_size_in_bytes + stats.output_size_in_bytes - (stats.alias_size_in_bytes or 0)
    return int(peak), "XLA memory_analysis of the compiled step: temp + output − alias"


# ---- the gate ------------------------------------------------------------------------------------
def plain_grads(spec: MLPSpec, grads: dict[str, Any]) -> dict[str, Any]:
    """Gradients in the contract's names (packed dwv/dbc split into dw, dv / db, dc)."""
    params = unpack_params(spec, {k: v for k, v in grads.items() if k != "x"})
    return {"x": grads["x"], **params}


def _as_torch(a: Any) -> Any:
    """A torch tensor, or a jax array as one (DLPack: the same memory)."""
    import torch

    if isinstance(a, torch.Tensor):
        return a
    try:
        return torch.from_dlpack(a)
    except Exception:  # a layout DLPack refuses on the CPU: the values are the same
        from fusedmlp.torch_impl.module import to_torch

        return to_torch(to_numpy(a))


def device_difference(a: Any, b: Any) -> tuple[float, float, float, bool, bool]:
    """`parity.difference(a, b, ref=b)` computed on the device in float32 (the gradients of a
    large case are too big to bring to the host per row): (rel_fro, max_abs, max_scaled,
    identical bits, NaNs in the same places)."""
    import torch

    ta, tb = _as_torch(a).float(), _as_torch(b).float()
    finite = torch.isfinite(tb)
    diff = torch.where(finite, ta - tb, torch.zeros((), device=ta.device))
    ref = torch.where(finite, tb, torch.zeros((), device=tb.device))
    ref_norm = float(torch.linalg.vector_norm(ref)) or 1.0
    ref_max = float(ref.abs().max()) if ref.numel() else 1.0
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    identical = bool(torch.equal(torch.nan_to_num(ta), torch.nan_to_num(tb)))
    same_nans = bool(torch.equal(torch.isnan(ta), torch.isnan(tb)))
    return (
        float(torch.linalg.vector_norm(diff)) / ref_norm,
        max_abs,
        max_abs / (ref_max or 1.0),
        identical and same_nans,
        same_nans,
    )


def agreement(grads: dict[str, Any], yardstick: dict[str, Any], spec: MLPSpec) -> dict[str, Any]:
    """Two sets of gradients (plain names) against each other, gradient by gradient, within twice
    `tolerance.grad_bounds`: the row fields of the gate above REFERENCE_MAX_M."""
    per = {key: device_difference(grads[key], yardstick[key]) for key in yardstick}
    measures = (
        max(d[0] for d in per.values()),
        max(d[1] for d in per.values()),
        max(d[2] for d in per.values()),
        all(d[3] for d in per.values()),
        all(d[4] for d in per.values()),
    )
    pair = pair_row({"provider": "a"}, {"provider": "b"}, measures, tolerance.grad_bounds(spec))
    worst = max(per, key=lambda k: per[k][0])
    out = {
        "status": "pass" if pair["status"] == "pass" else "FAIL",
        "rel_fro": pair["rel_fro"],
        "max_abs": pair["max_abs"],
        "max_scaled": pair["max_scaled"],
        "bound_rel_fro": pair["bound_rel_fro"],
        "bound_max_scaled": pair["bound_max_scaled"],
        "identical": pair["identical"],
        "worst": f"d{worst}",
        "grads": {f"d{k}": {"rel_fro": d[0], "max_scaled": d[2]} for k, d in per.items()},
    }
    if out["status"] == "FAIL":
        out["message"] = (
            f"d{worst}: rel_fro {per[worst][0]:.3e} vs the framework's gradients "
            f"(bound {pair['bound_rel_fro']:.3e}, 2x the gradient bounds)"
        )
    return out


def _to_numpy_grads(grads: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: to_numpy(v) for k, v in grads.items()}


# ---- one case ------------------------------------------------------------------------------------
class _Inputs:
    """The case's training inputs, built once: dy (torch, and jax through DLPack) and the input
    sets, plain and packed, in each stack (jax views the torch buffers: the same bytes)."""

    def __init__(self, case: Case) -> None:
        from fusedmlp.torch_impl.module import to_torch

        self.case = case
        self.dy_numpy = grad_parity.cotangent(case)
        self.dy = to_torch(self.dy_numpy, case.device)
        self._jax_dy: Any = None
        self._packed: list[tuple[Any, dict[str, Any]]] | None = None
        self._jax_packed: list[tuple[Any, dict[str, Any]]] | None = None

    def torch_sets(self, packed: bool) -> list[tuple[Any, dict[str, Any]]]:
        if not packed:
            return self.case.torch_sets()
        if self._packed is None:
            from fusedmlp.torch_impl.packing import pack_params

            spec = self.case.spec
            self._packed = [(x, pack_params(spec, p)) for x, p in self.case.torch_sets()]
        return self._packed

    def jax_sets(self, packed: bool) -> list[tuple[Any, dict[str, Any]]]:
        if not packed:
            return self.case.jax_sets()
        if self._jax_packed is None:
            self._jax_packed = [
                (torch_to_jax(x), {k: torch_to_jax(v) for k, v in p.items()})
                for x, p in self.torch_sets(True)
            ]
        return self._jax_packed

    def jax_dy(self) -> Any:
        if self._jax_dy is None:
            self._jax_dy = torch_to_jax(self.dy)
        return self._jax_dy


def _wait(stack: str) -> Callable[[Any], None]:
    if stack == "jax":
        import jax

        return jax.block_until_ready
    import torch

    def wait(_: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    return wait


def run_step(p: Provider, case: Case, inputs: _Inputs, saved: str) -> dict[str, Any]:
    """Plan, build and run one provider's step once: the row without judgement, its plain-named
    gradients under '_grads' (on the device), its step under '_fn', its memory probe '_mem'."""
    row = row_header(p, case)
    reason = p.enabled(case.device)
    if reason is not None:
        return {**row, "status": "skipped", "message": reason}
    policy = None if p.baseline else saved
    try:
        plan = front(p.stack).plan(
            case.spec, (case.m, case.spec.d_in), impl=p.impl, device=case.device, saved=policy
        )
    except Exception as exc:
        return _failed(row, exc)
    row.update(plan=plan.describe(), kernels=plan.kernels(), chosen=plan.impl)
    if not p.baseline:
        row["saved"] = saved
    packed = not p.baseline  # our kernels read the packed layout; the baselines the plain one
    t0 = time.perf_counter()
    try:
        if p.stack == "torch":
            sets = inputs.torch_sets(packed)
            step, clear = torch_step(
                sets, case.spec, p.impl, inputs.dy, saved=saved, faulty=_faulty(p)
            )
            grads = step(0)
            _wait("torch")(None)
            row["_fn"] = step
            row["_mem"] = lambda: torch_peak_bytes(step, clear, case.device)
            row["_clear"] = clear
        else:
            sets = inputs.jax_sets(packed)
            jstep, compiled = jax_step(
                sets, case.spec, p.impl, inputs.jax_dy(), saved=saved, faulty=_faulty(p)
            )
            out = jstep(0)
            _wait("jax")(out)
            grads = out[1]
            row["_fn"] = jstep
            row["_mem"] = lambda: jax_peak_bytes(compiled)
    except Exception as exc:
        return _failed(row, exc)
    row["first_call_s"] = time.perf_counter() - t0  # includes compilation
    row["_grads"] = plain_grads(case.spec, grads)
    return row


def _gate(
    row: dict[str, Any],
    case: Case,
    ref: dict[str, np.ndarray] | None,
    yardstick: dict[str, Any] | None,
    p: Provider,
) -> None:
    """The row's gradient verdict into row['parity'] (grad_parity.judge at small M, agreement
    with the framework's gradients above; module docstring)."""
    if ref is not None:
        row["_grads"] = _to_numpy_grads(row["_grads"])
        base = None if p.baseline else yardstick
        grad_parity.judge(row, ref, case, _to_numpy_grads(base) if base is not None else None)
        row["parity"] = row.pop("status")
        row["parity_method"] = "float64 reference backward (tolerance.compare_grads)"
        return
    if yardstick is None:
        if p.baseline:  # the framework's own autodiff, with nothing to hold it to
            row["parity"] = YARDSTICK
            row["parity_method"] = (
                f"none: M={case.m} > {REFERENCE_MAX_M} (no float64 reference) and no other "
                "framework's gradients to compare with; the framework's own autodiff"
            )
        else:  # no yardstick (the framework's step failed): ours cannot be gated, so not timed
            row["parity"] = "FAIL"
            row["parity_method"] = (
                f"not gated: M={case.m} > {REFERENCE_MAX_M} (no float64 reference) and the "
                "framework's own step gave no gradients to compare with"
            )
        return
    verdict = agreement(row["_grads"], yardstick, case.spec)
    row.update({k: v for k, v in verdict.items() if k != "status"})
    row["parity"] = verdict["status"]
    row["parity_method"] = (
        f"M={case.m} > {REFERENCE_MAX_M}: agreement with the framework's gradients within "
        "2x the gradient bounds"
    )


def time_step(
    p: Provider,
    case: Case,
    fn: Step,
    ceil: Ceilings,
    timing: dict[str, Any],
    saved: str,
) -> dict[str, Any]:
    """The timing fields and verdict of one step (benchmark.time_row with the backward floor)."""
    return timed_verdict(
        lambda: measure(
            p.stack,
            case.device,
            fn,
            _wait(p.stack),
            cudagraph=NO_CUDAGRAPH if p.stack == "torch" and case.device == "cuda" else False,
            **timing,
        ),
        case.device,
        lambda check: backward_floor(case.spec, case.m, saved, ceil, check=check),
        lambda seconds: backward_metrics(case.spec, case.m, saved, seconds, ceil),
    )


def _memory(row: dict[str, Any]) -> None:
    try:
        peak, method = row["_mem"]()
    except Exception as exc:
        peak, method = None, f"not measured: {type(exc).__name__}: {exc}"
    row["peak_bytes"] = peak
    row["memory_method"] = method


def _release(row: dict[str, Any]) -> None:
    clear = row.pop("_clear", None)
    if clear is not None:
        clear()
    for key in ("_grads", "_mem", "_fn"):
        row.pop(key, None)
    strip(row)


def bench_backward_case(
    case: Case,
    providers: list[Provider],
    ceil: Ceilings,
    *,
    saved: str = DEFAULT_SAVED,
    timing: dict[str, Any] | None = None,
    on_row: Any = None,
) -> dict[str, Any]:
    """Every provider's training step on one case: gated, timed, its memory measured."""
    timing = timing or {}
    inputs = _Inputs(case)
    small = case.m <= REFERENCE_MAX_M
    ref = grad_parity.grad_reference(case) if small else None
    # The frameworks' gradients first: the 2x baseline (small M) or the yardstick (large M).
    done: dict[str, dict[str, Any]] = {}
    yard: dict[str, Any] = {}
    for stack, impl in BASELINE_OF.items():
        if any(p.stack == stack for p in providers):
            base = Provider(stack, impl, True)
            if base.enabled(case.device) is None:
                row = run_step(base, case, inputs, saved)
                done[base.name] = row
                if "_grads" in row:
                    yard[stack] = row["_grads"]
    rows = []
    for p in providers:
        row = done.get(p.name)
        if row is None:
            row = run_step(p, case, inputs, saved)
        if "_grads" in row:
            if p.baseline and p.impl == BASELINE_OF[p.stack] and not small:
                other = [s for s in yard if s != p.stack]
                _gate(row, case, ref, yard[other[0]] if other else None, p)
            else:
                _gate(row, case, ref, yard.get(p.stack), p)
            policy = "preact" if p.baseline else saved
            if row["parity"] not in ("pass", YARDSTICK):
                row["status"] = NOT_TIMED_FAILED
            elif p.interpreted(case.device, case):
                row["status"] = NOT_TIMED_INTERPRETED
                row["peak_bytes"] = None
                row["memory_method"] = "not measured: interpreted"
            else:
                row.update(time_step(p, case, row["_fn"], ceil, timing, policy))
                _memory(row)
        if p.name not in done:  # the baselines' gradients serve every row: released at the end
            _release(row)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    for row in done.values():
        _release(row)
    _compare_to_baselines(rows)
    floors = {s: backward_floor(case.spec, case.m, s, ceil) for s in SAVED_POLICIES}
    return {
        "spec": case.spec.to_dict(),
        "spec_text": str(case.spec),
        "m": case.m,
        "device": case.device,
        "saved": saved,
        "input_sets": len(case.torch_sets()) if case._torch_sets is not None else 1,
        "gate": "float64 reference" if small else "agreement with the framework's gradients",
        "floor": {
            **{f"{s}_s": f.seconds for s, f in floors.items()},
            "bound": floors[saved].bound,
            **{f"flops_{s}": f.flops for s, f in floors.items()},
            **{f"bytes_{s}": f.bytes for s, f in floors.items()},
        },
        "rows": rows,
    }


def _compare_to_baselines(rows: list[dict[str, Any]]) -> None:
    """`vs_best_baseline` on every timed row: the stack's best baseline time over the row's."""
    best: dict[str, float] = {}
    for r in rows:
        if r.get("baseline") and r.get("status") == TIMED:
            t = r["time"]["median"]
            best[r["stack"]] = min(best.get(r["stack"], t), t)
    for r in rows:
        if r.get("status") == TIMED and r["stack"] in best:
            r["vs_best_baseline"] = best[r["stack"]] / r["time"]["median"]


def run_bench_backward(
    items: list[tuple[str, MLPSpec, int]],
    providers: list[Provider],
    device: str,
    *,
    saved: str = DEFAULT_SAVED,
    quick: bool = False,
    timing: dict[str, Any] | None = None,
    on_row: Any = None,
    checkpoint: Any = None,
    ceilings: Ceilings | None = None,
) -> dict[str, Any]:
    """`benchmark.run_bench` for training steps: ceilings first, then every case; `checkpoint`
    gets the results so far after each case."""
    if saved not in SAVED_POLICIES:
        raise ValueError(f"saved: expected one of {SAVED_POLICIES}, got {saved!r}")
    ceil = ceilings or ceilings_mod.measure(
        device, ceiling_keys([s for _, s, _ in items]), quick=quick
    )
    cases = []
    for label, spec, m in items:
        start = time.perf_counter()
        case = Case(spec, m, device)
        result = bench_backward_case(
            case, providers, ceil, saved=saved, timing=timing, on_row=on_row
        )
        result["preset"] = label
        result["wall_s"] = round(time.perf_counter() - start, 1)
        cases.append(result)
        case.release()
        if checkpoint is not None:
            partial = {"ceilings": ceil.to_dict(), "saved": saved, "cases": cases}
            checkpoint({**partial, "partial": True})
    return {"ceilings": ceil.to_dict(), "saved": saved, "cases": cases}


def run_policies(
    items: list[tuple[str, MLPSpec, int]],
    providers: list[Provider],
    device: str,
    policies: tuple[str, ...] = SAVED_POLICIES,
    **kwargs: Any,
) -> dict[str, Any]:
    """`run_bench_backward` once per `saved=` policy under one set of ceilings, the cases of all
    in one result (each case names its policy); the probes' entry point."""
    quick = kwargs.pop("quick", False)
    ceil = kwargs.pop("ceilings", None) or ceilings_mod.measure(
        device, ceiling_keys([s for _, s, _ in items]), quick=quick
    )
    cases: list[dict[str, Any]] = []
    for saved in policies:
        result = run_bench_backward(items, providers, device, saved=saved, ceilings=ceil, **kwargs)
        cases += result["cases"]
    return {"ceilings": ceil.to_dict(), "saved": ",".join(policies), "cases": cases}
