"""One-call H200 probe of the JAX backward (issue 24): forward+backward of `jax_impl.mlp` under
`jax.vjp` against `jax.vjp` of the plain XLA function, at llama3-8b and hf-blog-geglu, M=8192, bf16.

Rows per case (each a jitted `x, params, dy -> (y, dx, dparams)`):
- `xla`: jax's own autodiff of the `xla` baseline (the target's reference: "JAX auto ≥ 1.05× XLA");
- `pallas_triton/preact`: the custom_vjp, the portable saving forward + the portable backward;
- `pallas_triton/inputs`: the forward without saving, the backward recomputing it first;
- `pallas_mosaic/inputs`: the Mosaic GPU forward, the portable recompute + backward;
- forward-only rows of `xla` and `pallas_triton` (the share of the backward in each).
Each row: median ms per call (jitted loop over 2 rotating (x, dy) sets; the weights, 352 MB for
llama3-8b, exceed the 60 MB L2 anyway), min, TFLOP/s (forward 2·M·Σ(K·N·products), fwd+bwd three
times that), XLA's compiled temp bytes (`memory_analysis()`, where the saved activations live),
compile seconds, and every gradient's relative Frobenius error against XLA's (bf16 both: ~1e-2 is
rounding, much more is a bug). Results are written after every row; a failing row records its
error and the probe goes on.

Usage on the GPU (repository root, fusedmlp installed editable):
    python3 bench/backward_probe_jax.py OUT.json [--budget-s 140] [--cases llama3-8b,hf-blog-geglu]
On a CPU, `--smoke` runs the same code on a tiny spec under the Pallas interpreters (nothing it
prints is a measurement).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

SAMPLES = 5
SAMPLE_S = 0.05  # each sample: enough calls to fill about this much time
SETS = 2


def _env() -> dict[str, Any]:
    import jax

    dev = jax.devices()[0]
    return {"jax": jax.__version__, "device": dev.device_kind, "platform": dev.platform}


def _flops(spec, m: int) -> int:
    from fusedmlp.common.cost import flops

    return flops(spec, m)


def _rel(a, b) -> float:
    import jax.numpy as jnp

    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    den = float(jnp.linalg.norm(b))
    return float(jnp.linalg.norm(a - b)) / den if den else float(jnp.linalg.norm(a))


def _time(fn, sets) -> tuple[float, float]:
    """(median, min) seconds per call of `fn(*set)` over rotating sets, host clock around the last
    result of a back-to-back run (the device is the bottleneck at these sizes)."""
    import jax

    jax.block_until_ready(fn(*sets[0]))  # warm
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*sets[1 % len(sets)]))
    one = max(time.perf_counter() - t0, 1e-6)
    reps = max(2, int(SAMPLE_S / one))
    samples = []
    for _ in range(SAMPLES):
        t0 = time.perf_counter()
        out = None
        for r in range(reps):
            out = fn(*sets[r % len(sets)])
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / reps)
    return statistics.median(samples), min(samples)


def _case_inputs(spec, m: int, seed: int):
    import jax
    import jax.numpy as jnp

    from fusedmlp.common import init_params

    params = {k: jnp.asarray(v) for k, v in init_params(spec, seed).items()}
    sets = []
    for s in range(SETS):
        kx, kd = jax.random.split(jax.random.key(seed + 10 + s))
        x = jax.random.normal(kx, (m, spec.d_in), jnp.float32).astype(spec.dtype)
        dy = jax.random.normal(kd, (m, spec.d_out), jnp.float32).astype(spec.dtype)
        sets.append((x, dy))
    return params, sets


def _train_fn(spec, impl: str, saved: str):
    import jax

    from fusedmlp import jax_impl

    def step(x, params, dy):
        y, vjp = jax.vjp(lambda x, p: jax_impl.mlp(x, p, spec, impl=impl, saved=saved), x, params)
        dx, dp = vjp(dy)
        return y, dx, dp

    return jax.jit(step)


def _fwd_fn(spec, impl: str):
    import jax

    from fusedmlp import jax_impl

    return jax.jit(lambda x, params, dy: jax_impl.mlp(x, params, spec, impl=impl))


def probe(cases: list[str], budget_s: float, out: Path, smoke: bool) -> dict[str, Any]:

    from fusedmlp import jax_impl
    from fusedmlp.common import MLPSpec
    from fusedmlp.common.presets import get_preset

    result: dict[str, Any] = {"env": _env(), "rows": [], "smoke": smoke}
    start = time.perf_counter()
    variants = [
        ("xla", "-", True),
        ("pallas_triton", "preact", True),
        ("pallas_triton", "inputs", True),
        ("pallas_mosaic", "inputs", True),
        ("xla", "-", False),
        ("pallas_triton", "-", False),
    ]
    for case in cases:
        if smoke:
            spec, m = MLPSpec((32, 64, 32), "swiglu", False, "bfloat16"), 40
        else:
            preset = get_preset(case)
            spec, m = preset.spec, 8192
        params, sets = _case_inputs(spec, m, 0)
        reference = None
        for impl, saved, train in variants:
            if time.perf_counter() - start > budget_s:
                result["rows"].append({"case": case, "impl": impl, "error": "budget exhausted"})
                continue
            row: dict[str, Any] = {"case": case, "impl": impl, "saved": saved, "train": train}
            policy = saved if saved != "-" else "preact"  # xla: autodiff, the policy is ignored
            try:
                row["plan"] = str(
                    jax_impl.plan(spec, (m, spec.d_in), impl=impl, saved=policy if train else None)
                )
                fn = _train_fn(spec, impl, policy) if train else _fwd_fn(spec, impl)
                args = [(x, params, dy) for x, dy in sets]
                t0 = time.perf_counter()
                compiled = fn.lower(*args[0]).compile()  # called directly: compiled once
                row["compile_s"] = round(time.perf_counter() - t0, 2)
                mem = compiled.memory_analysis()
                row["temp_bytes"] = getattr(mem, "temp_size_in_bytes", None) if mem else None
                outs = compiled(*args[0])
                if train and impl == "xla":
                    reference = outs
                if train and reference is not None and impl != "xla":
                    y, dx, dp = outs
                    ry, rdx, rdp = reference
                    row["rel_err_vs_xla"] = {"y": _rel(y, ry), "x": _rel(dx, rdx)} | {
                        k: _rel(dp[k], rdp[k]) for k in dp
                    }
                med, low = _time(compiled, args)
                flops = _flops(spec, m) * (3 if train else 1)
                row |= {"ms": med * 1e3, "min_ms": low * 1e3, "tflops": flops / med / 1e12}
            except Exception as e:  # a row that fails is recorded, the probe goes on
                row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                row["traceback"] = traceback.format_exc()[-2000:]
            result["rows"].append(row)
            out.write_text(json.dumps(result, indent=1, default=str))
    result["total_s"] = round(time.perf_counter() - start, 1)
    out.write_text(json.dumps(result, indent=1, default=str))
    return result


def table(result: dict[str, Any]) -> str:
    lines = [
        f"backward probe ({result['env']['device']}, jax {result['env']['jax']})"
        + (" SMOKE: not a measurement" if result.get("smoke") else ""),
        f"{'case':<14} {'impl':<14} {'saved':<7} {'pass':<8} {'ms':>8} {'min':>8} "
        f"{'TFLOP/s':>8} {'vs xla':>7} {'temp MB':>8} {'max rel err':>11}",
    ]
    base: dict[tuple[str, bool], float] = {}
    for r in result["rows"]:
        if r.get("impl") == "xla" and "ms" in r:
            base[(r["case"], r["train"])] = r["ms"]
    for r in result["rows"]:
        kind = "fwd+bwd" if r.get("train") else "fwd"
        if "error" in r:
            lines.append(f"{r['case']:<14} {r['impl']:<14} {r.get('saved', ''):<7} {kind:<8} "
                         f"ERROR {r['error'][:90]}")  # fmt: skip
            continue
        ref = base.get((r["case"], r["train"]))
        speed = f"{ref / r['ms']:.2f}x" if ref else "-"
        temp = r.get("temp_bytes")
        err = max(r["rel_err_vs_xla"].values()) if r.get("rel_err_vs_xla") else None
        lines.append(
            f"{r['case']:<14} {r['impl']:<14} {r['saved']:<7} {kind:<8} {r['ms']:>8.3f} "
            f"{r['min_ms']:>8.3f} {r['tflops']:>8.0f} {speed:>7} "
            f"{(temp / 2**20 if temp is not None else float('nan')):>8.0f} "
            f"{(f'{err:.2e}' if err is not None else '-'):>11}"
        )
    lines.append(f"total {result.get('total_s', '?')} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="JSON results path")
    parser.add_argument("--budget-s", type=float, default=140.0)
    parser.add_argument("--cases", default="llama3-8b,hf-blog-geglu")
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny spec, interpreted")
    args = parser.parse_args(argv)
    result = probe(args.cases.split(","), args.budget_s, args.out, args.smoke)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
