"""Framework overhead, measured: what each path costs around its kernels on a tiny problem.

On a problem this small (64→128→64, M=8) the kernels take microseconds, so the host side shows.
Every path is measured by timing.measure, with the definitions of the bench:

- first call: the first call of a fresh callable, synchronised — Dynamo trace + Inductor compile for
  `compile`, trace + lowering + XLA compile for `jax.jit`, Triton JIT (with a fresh TRITON_CACHE_DIR
  when the runner sets one) and Pallas lowering for the kernels;
- host issue: the time to issue one call without waiting (what a training loop pays when the device
  keeps up);
- host sync: issue + wait, median over >= 20 calls;
- throughput: per call, N calls back to back and one wait (max of host cost and device time);
- device (GPU only): the sum of the call's kernel durations from the framework's profiler, with the
  kernels per call (K) and the span; host sync − device is the host cost the device cannot hide
  when every call is waited for.

On a CPU only real costs are measured: the baselines' dispatch and compile costs and, where it is
registered, the custom op wrapper `torch.ops.fusedmlp.mlp` around the eager path; interpreted
kernels are listed, not measured. The custom op's schema is read from `torch.ops.fusedmlp.mlp` at
run time.
"""

from __future__ import annotations

import time
import traceback
from typing import Any

from fusedmlp.common import MLPSpec

from .cases import Case
from .providers import Provider, front, sync
from .timing import measure

FIRST_CALL = {
    "eager": "first eager dispatch",
    "compile": "Dynamo trace + Inductor compile",
    "xla": "jax.jit trace + XLA compile",
    "triton": "Triton JIT compile",
    "triton_tma": "Triton JIT compile",
    "fused_small": "JIT compile of the kernel",
    "fused_decode": "JIT compile of the kernel",
    "pallas_triton": "trace + Pallas lowering + Triton compile",
    "pallas_mosaic": "trace + Pallas lowering + Mosaic GPU compile",
    "custom_op": "custom op dispatch (first use)",
    "mosaic": "JAX trace + Mosaic GPU compile, called from torch",
    "jax_triton": "jax.jit trace + Triton compile through jax_triton",
}


def tiny_spec(device: str) -> MLPSpec:
    return MLPSpec(
        (64, 128, 64), "gelu_tanh", bias=True, dtype="bfloat16" if device == "cuda" else "float32"
    )


def custom_op_thunk(case: Case) -> tuple[Any, str] | str:
    """A thunk calling `torch.ops.fusedmlp.mlp` and the impl it runs, or why there is none.

    The arguments are built from the op's schema: the input tensor, the params as a list in
    canonical order (or one by name), the spec as JSON text, `impl` ("eager" on a CPU, where the
    kernels would run interpreted, so that the wrapper's own cost shows), optional tensors None.
    """
    import torch

    from fusedmlp.common import param_shapes

    try:
        front("torch")
    except Exception as exc:
        return f"torch front does not import: {exc}"
    ns = getattr(torch.ops, "fusedmlp", None)
    packet = getattr(ns, "mlp", None) if ns is not None else None
    if packet is None:
        return "torch.ops.fusedmlp.mlp is not registered in this build"
    schema = packet.default._schema
    impl = "eager" if case.device == "cpu" else "auto"
    sets = case.torch_sets()
    order = list(param_shapes(case.spec))

    def build(x: Any, params: dict[str, Any]) -> list[Any] | None:
        args: list[Any] = []
        for arg in schema.arguments:
            kind, name = str(arg.type), arg.name
            if name in params:
                args.append(params[name])
            elif kind == "Tensor" and name in ("x", "input", "inp"):
                args.append(x)
            elif kind.startswith("List[Tensor") or kind == "Tensor[]":
                args.append([params[k] for k in order])
            elif kind == "str" and "spec" in name:
                args.append(case.spec.to_json())
            elif kind == "str" and "impl" in name:
                args.append(impl)
            elif kind.startswith("Optional") or arg.has_default_value():
                args.append(arg.default_value if arg.has_default_value() else None)
            else:
                return None
        return args

    if build(*sets[0]) is None:
        return f"custom op schema not understood by the harness: {schema}"
    built = [build(x, p) for x, p in sets]
    return (lambda i: packet(*built[i % len(built)])), impl


def measure_row(
    name: str,
    stack: str,
    impl: str,
    make: Any,
    device: str,
    timing: dict[str, Any],
    *,
    chosen: str | None = None,
) -> dict[str, Any]:
    """One path: first call, then timing.measure (device on a GPU, throughput, host issue/sync).
    Flat fields in seconds for the table: first_call_s, host_async_s (issue), host_sync_s,
    throughput_s, device_s, span_s, kernels_per_call, overhead_s (host sync − device)."""
    chosen = chosen or impl
    row: dict[str, Any] = {
        "provider": name if chosen == impl else f"{name} → {chosen}",
        "stack": stack,
        "impl": impl,
        "chosen": chosen,
        "what": FIRST_CALL.get(chosen, ""),
    }

    def wait(out: Any) -> None:
        sync(stack, out)

    try:
        t0 = time.perf_counter()
        fn = make()
        wait(fn(0))
        row["first_call_s"] = time.perf_counter() - t0
        m = measure(stack, device, fn, wait, **timing)
        row["timing"] = m
        row["host_async_s"] = m["host_issue"]["median"]
        row["host_sync_s"] = m["host_sync"]["median"]
        row["throughput_s"] = m["throughput"]["median"]
        if device == "cuda":
            if "device_error" in m:
                raise RuntimeError(f"device time: {m['device_error']}")
            row["device_s"] = m["time"]["median"]
            row["span_s"] = m["span"]["median"]
            row["kernels_per_call"] = m["kernels_per_call"]
            row["device_method"] = m["time"]["method"]
            row["overhead_s"] = row["host_sync_s"] - row["device_s"]
        row["status"] = "measured"
    except NotImplementedError as exc:
        row.update(status="n/a", message=str(exc))
    except Exception as exc:
        row.update(
            status="error", message=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()
        )
    return row


def run_overhead(
    providers: list[Provider],
    device: str,
    *,
    m: int = 8,
    timing: dict[str, Any] | None = None,
    on_row: Any = None,
) -> dict[str, Any]:
    timing = timing or {}
    spec = tiny_spec(device)
    case = Case(spec, m, device, rotate=False)
    rows = []
    for p in providers:
        reason = p.enabled(device)
        if reason is not None:
            row = {"provider": p.name, "status": "skipped", "message": reason}
        elif p.interpreted(device, case):
            chosen = p.chosen(case)
            row = {
                "provider": p.name if chosen == p.impl else f"{p.name} → {chosen}",
                "impl": p.impl,
                "chosen": chosen,
                "status": "interpreted — not measured",
                "what": FIRST_CALL.get(chosen, ""),
            }
        else:
            row = measure_row(
                p.name,
                p.stack,
                p.impl,
                lambda p=p: p.make(case),
                device,
                timing,
                chosen=p.chosen(case),
            )
        rows.append(row)
        if on_row is not None:
            on_row(row)
    op = custom_op_thunk(case)
    if isinstance(op, str):
        row = {"provider": "torch.ops.fusedmlp.mlp", "status": "skipped", "message": op}
    else:
        thunk, impl = op
        row = measure_row(
            f"torch.ops.fusedmlp.mlp ({impl})", "torch", "custom_op", lambda: thunk, device, timing
        )
    rows.append(row)
    if on_row is not None:
        on_row(row)
    return {
        "spec": spec.to_dict(),
        "spec_text": str(spec),
        "m": m,
        "device": device,
        "note": "first call = a fresh callable's first synchronised call in this process; "
        "host issue = time to issue one call; host sync = one call and its wait; "
        "throughput = N calls back to back + one wait, per call; device = the call's "
        "kernel durations from the framework's profiler (K kernels per call); "
        "sync − device = host cost not hidden",
        "rows": rows,
    }
