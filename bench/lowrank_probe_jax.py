"""GPU probe (issue 26), the JAX side: jitted lowrank_linear_act vs XLA's silu(x @ U @ V + b).

    python bench/lowrank_probe_jax.py OUT.json [--budget-s S] [--smoke]

(bench/lowrank_probe.py runs it as a subprocess after its torch rows and merges OUT.json.)
llama3-8b's layer (K = 4096 -> N = 14336), bf16, silu, r = 64 / 128 / 256, M = 16, 512, 8192:
- `xla`: jax.jit(lambda x, u, v, b: silu(x @ u @ v + b)) — XLA's two GEMMs (and its fusions);
- `pallas`: jax.jit of jax_impl.lowrank.lowrank_linear_act with the heuristic config, the fused
  kernel (Pallas-Triton; what the front runs at M ≤ 64);
- `pallas:S=…`: the fused kernel at the other x·U split (4, or 1 where the heuristic takes 4);
- at M > 64, what the front runs there unless x·U is split (common/lowrank_spec.layer_run): two
  GEMMs, t stored in the dtype — `2gemm:mosaic` (Mosaic GPU linear_act: the front's choice on a
  Hopper GPU) and `2gemm:pallas` (the portable Pallas-Triton linear_act).
Parity: each against XLA in float32 with t = x·U rounded to bf16 (the kernel's rounding point),
relative Frobenius error < 1e-2, before timing.
Times, as bench/backward_probe_jax.py times JAX: `loop_us`, the wall clock of back-to-back calls
over 3 rotating input sets, one block_until_ready at the end (median of 5 samples; max(host
dispatch, device)); and `device_us`, the project's device timing (bench/timing.time_device:
kernel durations from a jax.profiler trace, each call after the 256 MiB L2 flush) — the number to
compare with the torch rows' do_bench — and `span_us` (first kernel start to last kernel end:
the launch gap between the two passes included). A device timing that fails leaves
`device_error`. `--smoke`: tiny shapes, interpreted where there is no GPU (checks the script).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

K, N = 4096, 14336
RANKS = (64, 128, 256)
MS = (16, 512, 8192)
SETS = 3
SAMPLES = 5
SAMPLE_S = 0.03


def _loop(fn, sets) -> float:
    """Median seconds per call of back-to-back calls over rotating sets (backward_probe_jax)."""
    import jax

    jax.block_until_ready(fn(*sets[0]))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*sets[1 % len(sets)]))
    one = max(time.perf_counter() - t0, 1e-6)
    reps = max(3, int(SAMPLE_S / one))
    samples = []
    for _ in range(SAMPLES):
        t0 = time.perf_counter()
        out = None
        for i in range(reps):
            out = fn(*sets[i % len(sets)])
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / reps)
    return statistics.median(samples)


def probe(budget_s: float, smoke: bool = False) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from fusedmlp.common.lowrank import lowrank_config
    from fusedmlp.jax_impl.lowrank import lowrank_linear_act

    global K, N, RANKS, MS
    if smoke:
        K, N, RANKS, MS = 40, 48, (17,), (16, 70)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    bf16 = jnp.bfloat16
    keys = jax.random.split(jax.random.key(0), 8)
    xs = [jax.random.normal(keys[i], (max(MS), K), jnp.float32).astype(bf16) for i in range(SETS)]
    b = (0.1 * jax.random.normal(keys[4], (N,), jnp.float32)).astype(bf16)
    hi = jax.lax.Precision.HIGHEST

    def xla(x, u, v, b):
        return jax.nn.silu(x @ u @ v + b)

    @jax.jit
    def reference(x, u, v, b):  # float32, t rounded to bf16 as the kernel rounds it
        t = jnp.dot(x.astype(jnp.float32), u.astype(jnp.float32), precision=hi).astype(bf16)
        z = jnp.dot(t.astype(jnp.float32), v.astype(jnp.float32), precision=hi)
        return jax.nn.silu(z + b.astype(jnp.float32))

    for r in RANKS:
        u = (jax.random.normal(keys[5], (K, r), jnp.float32) * K**-0.5).astype(bf16)
        v = (jax.random.normal(keys[6], (r, N), jnp.float32) * r**-0.5).astype(bf16)
        for m in MS:
            sets = [(x[:m], u, v, b) for x in xs]
            ref = reference(*sets[0])
            cfg = lowrank_config(m, N, K, r, "bfloat16")

            def fused(x, u, v, b, cfg=cfg):
                return lowrank_linear_act(x, u, v, b, activation="silu", config=cfg)

            variants = [("xla", xla, None), ("pallas", fused, cfg)]
            if 64 < m <= 4096 and cfg.two_pass:  # the x·U split the other side of the rule
                other = dataclasses.replace(cfg, split_k=4 if cfg.split_k != 4 else 1)

                def fused_other(x, u, v, b, cfg=other):
                    return lowrank_linear_act(x, u, v, b, activation="silu", config=cfg)

                variants.append((f"pallas:S={other.split_k}", fused_other, other))
            if m > 64:  # the front's two GEMMs (lowrank_spec.layer_run; r ≤ 64 to 1024: fused)
                from fusedmlp.jax_impl.linear_act import linear_act as portable

                def two_gemm(x, u, v, b, linear=portable):
                    return linear(linear(x, u), v, b, activation="silu")

                variants.append(("2gemm:pallas", two_gemm, None))
                if not smoke:  # Mosaic GPU: the front's choice on a Hopper GPU
                    from fusedmlp.jax_impl.mosaic.linear_act import linear_act as mosaic

                    variants.append(
                        ("2gemm:mosaic", functools.partial(two_gemm, linear=mosaic), None)
                    )
            for name, fn, config in variants:
                row: dict[str, Any] = dict(r=r, m=m, variant=name)
                if config is not None:
                    row["config"] = dict(config.__dict__)
                if time.perf_counter() - start > budget_s:
                    row["error"] = f"skipped: budget {budget_s:.0f} s spent"
                    rows.append(row)
                    continue
                try:
                    jitted = jax.jit(fn)
                    t0 = time.perf_counter()
                    out = jax.block_until_ready(jitted(*sets[0]))
                    row["compile_s"] = round(time.perf_counter() - t0, 2)
                    diff = out.astype(jnp.float32) - ref
                    err = float(jnp.linalg.norm(diff) / jnp.linalg.norm(ref))
                    row["rel_err"] = err
                    if not err < 1e-2:
                        row["error"] = f"parity: rel_err {err:.3e} >= 1e-2"
                        rows.append(row)
                        continue
                    row["loop_us"] = _loop(jitted, sets) * 1e6
                    try:
                        from fusedmlp.bench.timing import time_device

                        def call(i, jitted=jitted, sets=sets):
                            return jitted(*sets[i % SETS])

                        dev = time_device("jax", call, 30, jax.block_until_ready)
                        row["device_us"] = dev.device.median * 1e6
                        row["span_us"] = dev.span.median * 1e6
                        row["kernels_per_call"] = dev.to_row().get("kernels_per_call")
                    except Exception as exc:
                        row["device_error"] = f"{type(exc).__name__}: {exc}"[:300]
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                rows.append(row)
    return dict(
        probe="lowrank_probe_jax",
        shape=dict(K=K, N=N, dtype="bfloat16", activation="silu"),
        jax_version=jax.__version__,
        devices=[str(d) for d in jax.devices()],
        rows=rows,
        seconds=round(time.perf_counter() - start, 1),
    )


def table(doc: dict[str, Any]) -> str:
    """Compact text table of a probe() result (pallas vs xla per (r, M))."""
    if "rows" not in doc:
        return f"\nlowrank probe (jax): {doc.get('error', 'no rows')}"
    lines = [
        f"\nlowrank probe (jax {doc.get('jax_version')}): {doc.get('seconds')} s",
        f"{'r':>4} {'M':>5} {'variant':<12} {'device_us':>9} {'span_us':>8} {'loop_us':>8} "
        f"{'vs xla':>7}  note",
    ]
    cases = sorted({(g["r"], g["m"]) for g in doc["rows"]})
    for r, m in cases:
        group = {g["variant"]: g for g in doc["rows"] if g["r"] == r and g["m"] == m}
        base = group.get("xla", {})
        for name, g in group.items():
            dev, span, loop = g.get("device_us"), g.get("span_us"), g.get("loop_us")
            # span: the gap between the two passes counts against the fused kernel
            ref = base.get("span_us") or base.get("loop_us")
            mine = span or loop
            speed = f"{ref / mine:7.2f}" if ref and mine else f"{'-':>7}"
            note = g.get("error") or g.get("device_error") or ""
            lines.append(
                f"{r:>4} {m:>5} {name:<12} "
                + (f"{dev:9.1f}" if dev else f"{'-':>9}")
                + (f" {span:8.1f}" if span else f" {'-':>8}")
                + (f" {loop:8.1f}" if loop else f" {'-':>8}")
                + f" {speed}  {note[:100]}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="JSON results path")
    parser.add_argument("--budget-s", type=float, default=90.0)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU: interpreted)")
    parser.add_argument("--m", help="rows, comma-separated")
    parser.add_argument("--ranks", help="ranks, comma-separated")
    args = parser.parse_args(argv)
    global MS, RANKS
    if args.m:
        MS = tuple(int(v) for v in args.m.split(","))
    if args.ranks:
        RANKS = tuple(int(v) for v in args.ranks.split(","))
    doc = probe(args.budget_s, args.smoke)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
