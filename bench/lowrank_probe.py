"""GPU probe (issue 26): the fused low-rank layer against the unfused one, one H200 call.

    python bench/lowrank_probe.py OUT.json [--quick] [--no-jax] [--budget-s S] [--smoke]

llama3-8b-shaped layer (K = 4096 -> N = 14336), bf16, silu, ranks r = 64, 128, 256, M = 16, 512
and 8192. Torch rows (this process), per (r, M):
- `eager`: silu(x @ U @ V + b) in eager torch (two cuBLAS GEMMs, the bias add, the activation);
- `dense`: silu(x @ W + b), W = U·V materialised (what the factorisation replaces), for context;
- M ≤ 64 (decode, where the front runs the fused kernel): `two-pass`, torch_impl.lowrank.
  lowrank_linear_act with the heuristic's config (launch 1: fp32 partials of x·U, K split S ways;
  launch 2: the fixed-order sum, t rounded once, t·V + b, silu); `one-pass`, the previous
  heuristic (one program per output tile, t recomputed by each, all of U re-read);
- M > 64: `2gemm:triton_tma` and `2gemm:triton`, what the front runs there unless x·U is split
  (common/lowrank_spec.layer_run): t = linear_act(x, U) stored in the dtype, then linear_act(t, V,
  b, silu) — the Hopper TMA kernels and the portable ones; `fused`, the fused kernel's heuristic for
  a direct call (r ≤ 64: two passes since 2026-12-02; S = 4 where `fused_split_applies`, the front's
  choice there) and, at r ≤ 64, `one-pass`, its previous choice; `fused:S=…` the other splits;
- without --quick: at M = 16 two passes with S = 4 / 16 and 2 tiles a program; at M > 64, r = 256
  the fused kernel's earlier configs; and the gated layer (SwiGLU: silu(x·Uw·Vw + b) ⊙ (x·Uv·Vv +
  c)) fused vs eager.
Every variant is checked against a float64 reference with the kernel's rounding point (t = x·U
rounded to bf16) before it is timed; a failing one is reported, not timed.

Times: `us`, the device time as the harness defines it (bench/timing.time_device: the sum of a
call's kernel durations read from CUPTI through torch.profiler, each of 30 calls after the 256 MiB
L2 flush; median) — until 2026-12-02 do_bench, whose host clock at M = 16 timed the launches' issue,
not the kernels; `loop_us`, the wall clock of back-to-back calls without a flush (what an eager
decode loop sees: max(host cost, device time)). Roofline: the layer's own FLOPs 2·M·r·(K + N) and
bytes 2·(M·K + K·r + r·N + N + M·N) (gated: twice the factors' and bias terms and FLOPs) against the
ceilings measured at the start of this run (bench/ceilings.py: cuBLAS bf16 8192³ halved and a 256
MiB copy, --quick sizes: ~3 s); `floor` = max(FLOPs / matmul, bytes / copy), `%roof` = floor / us.

JAX rows (bench/lowrank_probe_jax.py, run as a subprocess after the torch rows, so that its
allocator and profiler are its own): jitted jax_impl.lowrank.lowrank_linear_act (heuristic
config) vs XLA's silu(x @ U @ V + b), same shapes; written into OUT.json under "jax".

Predictions (written before the run; the previous run, commit 6d6ff60, measured the one-pass
kernel: M = 8192: 290 / 287 / 568 us at r = 64 / 128 / 256, eager 501 / 510 / 547 us; M = 16:
43 / 115 / 136 us, eager 58 / 59 / 54 us):
- M = 16, two passes: launch 1 has S·r/16 = 32 / 64 / 128 programs of 8 K steps (U read once:
  0.5-2 MiB), launch 2 112 programs each summing 8 partials (32-128 KiB from L2) and streaming
  one V tile: ~6-12 us in all (two launches, two short latency chains) vs one pass's 43-136 us;
  fused/eager ~4-8x at every rank (eager ~55 us). The floor is 0.7-2.4 us: % roofline ~10-30 %
  (the 70 % target is not reachable with two dependent launches at this size: each costs ~2-3 us
  of launch and DRAM latency). loop_us: host-bound, ~25-40 us fused (two Triton launches and
  the Python front) vs ~30-40 us eager.
- M = 8192, one pass: r = 64 / 128 as before (~290 us, 1.7-1.8x); r = 256 at the new heuristic
  (128 rows, 64-wide tiles, 32-deep K, 3 stages: half the L2 reads of V of 64-row blocks):
  ~330-420 us (1.3-1.65x) vs the old config's ~570 us; % roofline 20-30 %. Two passes at M =
  8192 (S = 1): about the one-pass time ± 15 % (t's fp32 round trip, 8-16 MB, vs the recompute).
- JAX: Pallas-Triton twin at M = 16 ~10-20 us device, XLA ~20-40 us; M = 8192 within 10 % of
  the torch kernel; XLA ~400-500 us.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PEAK_FLOPS = 800e12  # fallbacks only, where the ceilings cannot be measured
PEAK_BYTES = 4.24e12
K, N = 4096, 14336
RANKS = (64, 128, 256)
MS = (16, 512, 8192)
LOOP_CALLS = 50
DEVICE_CALLS = 30
# Past this share of --budget-s, only the essential rows are still timed (the JAX subprocess gets
# what is left): the whole call stays inside the lead's 3 minutes.
TORCH_SHARE = 0.6
ESSENTIAL = ("eager", "two-pass", "fused", "2gemm:triton_tma")


def configs(m: int, r: int, quick: bool, gated: bool = False) -> list[tuple[str, Any]]:
    """(name, LowRankConfig) of the fused variants timed at (M, r)."""
    from fusedmlp.common.lowrank import LowRankConfig, lowrank_config
    from fusedmlp.common.tiling import NUM_SMS

    base = lowrank_config(m, N, K, r, "bfloat16", gated=gated)
    rep = dataclasses.replace
    if gated:
        return [("gated:fused", base)]
    out: list[tuple[str, Any]] = []
    if m <= 64:  # decode: the fused kernel's two passes
        out.append(("two-pass", base))
        stages = 2 if r >= 256 else 3
        # the previous heuristic: one program per output tile, t recomputed by each
        out.append(("one-pass", rep(base, split_k=0, num_stages=stages)))
        if not quick:
            out.append(("two-pass:S=4", rep(base, split_k=4)))
            out.append(("two-pass:S=16", rep(base, split_k=16)))
            out.append(("two-pass:2tiles", rep(base, n_tiles=2)))
    else:  # the fused kernel where the front runs two GEMMs (the 2gemm rows)
        out.append(("fused", base))
        if m <= 4096:
            # x·U is the slow half of both routes at M = 512 (20.6 µs of the two TMA GEMMs'
            # 34.7, 25.3 of the fused 38.8 at 84f2c0e: 8 row blocks walk K = 4096 serially):
            # split K as the decode path does, at the cost of launch 2 summing S partials
            two = base if base.two_pass else LowRankConfig(64, 128, 64, 2, 8, 4 if r <= 128 else 8)
            for splits in (4, 8):
                if two.split_k != splits:  # the heuristic's own S is the `fused` row
                    out.append((f"fused:S={splits}", rep(two, split_k=splits)))
        if base.two_pass:  # r <= 64: the one pass the heuristic ran until 2026-12-02
            m_tiles, n_total = -(-m // 128), -(-N // 128)
            panels = max(1, min(n_total, NUM_SMS // m_tiles))  # that heuristic's G
            out.append(("one-pass", LowRankConfig(128, 128, 64, -(-n_total // panels), 8, 8, 3)))
        if not quick:
            n_total = -(-N // 128)
            if r >= 256:
                out.append(
                    (
                        "one-pass:bm64-bn128-s2(old)",
                        LowRankConfig(64, 128, 64, n_total, 8, 8, 2),
                    )
                )
                out.append(
                    (
                        "one-pass:bm64-bn64-bk32-s3",
                        LowRankConfig(64, 64, 32, 2 * n_total, 8, 8, 3),
                    )
                )
                out.append(
                    (
                        "one-pass:bm128-bn128-s2",
                        LowRankConfig(128, 128, 64, -(-n_total // 2), 8, 8, 2),
                    )
                )
    return out


def measure_ceilings() -> tuple[dict[str, Any], float, float]:
    """(ceilings dict, bf16 matmul FLOP/s, copy B/s) measured now; the fixed peaks on failure."""
    try:
        from fusedmlp.bench.ceilings import measure

        c = measure("cuda", ("bfloat16",), quick=True)
        return c.to_dict(), c.matmul["bfloat16"], c.copy
    except Exception as exc:  # the table says which ceilings divided
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}, PEAK_FLOPS, PEAK_BYTES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="where to write the results")
    parser.add_argument("--quick", action="store_true", help="heuristic configs and eager only")
    parser.add_argument("--no-jax", action="store_true", help="torch rows only")
    parser.add_argument("--budget-s", type=float, default=170.0, help="whole-call budget")
    parser.add_argument(
        "--smoke", action="store_true", help="CPU check of the script: tiny shapes, interpreted"
    )
    parser.add_argument("--m", help="rows, comma-separated (default 16,512,8192)")
    parser.add_argument("--ranks", help="ranks, comma-separated (default 64,128,256)")
    args = parser.parse_args(argv)
    global K, N, RANKS, MS
    if args.m:
        MS = tuple(int(v) for v in args.m.split(","))
    if args.ranks:
        RANKS = tuple(int(v) for v in args.ranks.split(","))
    if args.smoke:  # before fusedmlp.torch_impl is imported: the interpreter decides at import
        os.environ["TRITON_INTERPRET"] = "1"
        K, N, RANKS, MS = 40, 300, (17,), (16, 70)

    import torch

    from fusedmlp.bench.env import environment
    from fusedmlp.bench.timing import time_device
    from fusedmlp.torch_impl.lowrank import lowrank_gated_linear_act, lowrank_linear_act

    if not torch.cuda.is_available() and not args.smoke:
        print("lowrank_probe: needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = "cpu" if args.smoke else "cuda"
    sync = torch.cuda.synchronize if dev == "cuda" else lambda: None
    torch.manual_seed(0)
    start = time.perf_counter()
    if args.smoke:
        ceilings, peak_flops, peak_bytes = {"error": "smoke: not measured"}, PEAK_FLOPS, PEAK_BYTES
    else:
        ceilings, peak_flops, peak_bytes = measure_ceilings()
    x_full = torch.randn(max(MS), K, device=dev, dtype=torch.bfloat16)
    b = (0.1 * torch.randn(N, device=dev)).to(torch.bfloat16)
    c = (0.1 * torch.randn(N, device=dev)).to(torch.bfloat16)
    rows: list[dict[str, Any]] = []
    act = torch.nn.functional.silu

    def ms(fn) -> float:
        if args.smoke:  # no device: one host-clock call
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        # device time as the harness defines it (bench/timing.py: the call's kernel durations
        # from CUPTI, each call after the L2 flush); do_bench's host clock at M = 16 measured
        # the launches' issue time, not the kernels
        fn()
        sync()
        timing = time_device("torch", lambda i: fn(), DEVICE_CALLS, lambda _: sync())
        names, times = timing.kernel_names, timing.kernel_times
        kernels[:] = [(name[:40], t * 1e6) for name, t in zip(names, times, strict=True)]
        return timing.device.median * 1e3

    kernels: list[tuple[str, float]] = []  # the last device timing's kernels (name, µs)

    def loop_us(fn) -> float:
        calls = 2 if args.smoke else LOOP_CALLS
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        return (time.perf_counter() - t0) / calls * 1e6

    def rounded_t(x, u):
        return (x.double() @ u.double()).to(torch.bfloat16).double()

    for r in RANKS:
        u = (torch.randn(K, r, device=dev) * K**-0.5).to(torch.bfloat16)
        v = (torch.randn(r, N, device=dev) * r**-0.5).to(torch.bfloat16)
        ug = (torch.randn(K, r, device=dev) * K**-0.5).to(torch.bfloat16)
        vg = (torch.randn(r, N, device=dev) * r**-0.5).to(torch.bfloat16)
        w = (u.float() @ v.float()).to(torch.bfloat16)
        for m in MS:
            x = x_full[:m]
            ref = act(rounded_t(x, u) @ v.double() + b.double())
            variants: list[tuple[str, Any, Any, Any]] = [
                ("eager", None, lambda x=x, u=u, v=v: act(x @ u @ v + b), ref),
                ("dense", None, lambda x=x, w=w: act(x @ w + b), None),
            ]
            if not args.smoke and m > 64:
                # what `auto` falls back to where t is better kept in memory: two GEMMs of our
                # own kernels, t = round(x·U) stored (M·r·2 bytes), then act(t·V + b) fused
                from fusedmlp.torch_impl import linear_act as pl
                from fusedmlp.torch_impl.tma import linear_act as tl_

                for name, mod in (("2gemm:triton", pl), ("2gemm:triton_tma", tl_)):
                    fn = lambda x=x, u=u, v=v, mod=mod: mod.linear_act(  # noqa: E731
                        mod.linear_act(x, u), v, b, activation="silu"
                    )
                    variants.append((name, None, fn, ref))
            for name, cfg in configs(m, r, args.quick):
                fn = lambda x=x, u=u, v=v, cfg=cfg: lowrank_linear_act(  # noqa: E731
                    x, u, v, b, activation="silu", config=cfg
                )
                variants.append((name, cfg, fn, ref))
            if not args.quick:
                gref = ref * (rounded_t(x, ug) @ vg.double() + c.double())
                variants.append(
                    (
                        "gated:eager",
                        None,
                        lambda x=x, u=u, v=v, ug=ug, vg=vg: act(x @ u @ v + b) * (x @ ug @ vg + c),
                        gref,
                    )
                )
                for name, cfg in configs(m, r, args.quick, gated=True):
                    fn = lambda x=x, u=u, v=v, ug=ug, vg=vg, cfg=cfg: lowrank_gated_linear_act(  # noqa: E731
                        x, u, v, ug, vg, b, c, activation="silu", config=cfg
                    )
                    variants.append((name, cfg, fn, gref))
            for name, cfg, fn, want in variants:
                gated = name.startswith("gated")
                mult = 2 if gated else 1
                flops = mult * 2.0 * m * r * (K + N)
                nbytes = 2.0 * (m * K + mult * (K * r + r * N + N) + m * N)
                floor_us = max(flops / peak_flops, nbytes / peak_bytes) * 1e6
                row: dict[str, Any] = dict(
                    r=r, m=m, variant=name, floor_us=floor_us, flops=flops, bytes=nbytes
                )
                if cfg is not None:
                    row["config"] = dataclasses.asdict(cfg)
                spent = time.perf_counter() - start
                if name not in ESSENTIAL and spent > TORCH_SHARE * args.budget_s:
                    row["error"] = f"skipped: {spent:.0f} s spent of the torch rows' budget"
                    rows.append(row)
                    continue
                try:
                    out = fn().double()
                    if want is not None:  # dense is W = U·V rounded: another function
                        err = float((out - want).norm() / want.norm())
                        row["rel_err"] = err
                        if not err < 1e-2:
                            row["error"] = f"parity: rel_err {err:.3e} >= 1e-2"
                            rows.append(row)
                            continue
                    row["us"] = ms(fn) * 1e3
                    row["kernels"] = list(kernels)
                    row["loop_us"] = loop_us(fn)
                    row["tflops"] = flops / row["us"] / 1e6
                    row["tbps"] = nbytes / row["us"] / 1e6
                    row["of_roofline"] = floor_us / row["us"]
                except Exception as exc:  # reported in the table, the other rows still run
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                rows.append(row)
                sync()
    torch_seconds = time.perf_counter() - start
    del x_full
    if dev == "cuda":
        torch.cuda.empty_cache()

    jax_doc: dict[str, Any] | None = None
    if not args.no_jax:
        jax_json = str(Path(args.json).with_suffix("")) + "_jax.json"
        left = max(20.0, args.budget_s - (time.perf_counter() - start))
        cmd = [sys.executable, str(Path(__file__).with_name("lowrank_probe_jax.py")), jax_json,
               "--budget-s", f"{left - 10:.0f}"] + (["--smoke"] if args.smoke else [])  # fmt: skip
        if not args.smoke:
            cmd += ["--m", ",".join(map(str, MS)), "--ranks", ",".join(map(str, RANKS))]
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
        try:
            proc = subprocess.run(cmd, env=env, timeout=left, capture_output=True, text=True)
            if proc.returncode == 0 and Path(jax_json).exists():
                jax_doc = json.loads(Path(jax_json).read_text())
            else:
                jax_doc = {"error": f"rc {proc.returncode}: {proc.stderr[-1500:]}"}
        except subprocess.TimeoutExpired:
            jax_doc = {"error": f"timed out after {left:.0f} s"}
    seconds = time.perf_counter() - start

    print(
        f"\nlowrank probe: K={K} N={N} bf16 silu; torch {torch_seconds:.0f} s, all {seconds:.0f} s"
    )
    print(f"ceilings: matmul {peak_flops / 1e12:.0f} TFLOP/s, copy {peak_bytes / 1e12:.2f} TB/s"
          + (" (FALLBACK: " + ceilings["error"] + ")" if "error" in ceilings else ""))  # fmt: skip
    print(f"{'r':>4} {'M':>5} {'variant':<28} {'us':>8} {'loop_us':>8} {'floor':>6} "
          f"{'%roof':>5} {'vs eager':>8}  note")  # fmt: skip
    for r in RANKS:
        for m in MS:
            group = [row for row in rows if row["r"] == r and row["m"] == m]
            eager = {g["variant"]: g.get("us") for g in group if g["variant"].endswith("eager")}
            for g in group:
                us = g.get("us")
                base = eager.get("gated:eager" if g["variant"].startswith("gated") else "eager")
                speed = f"{base / us:8.2f}" if us and base else f"{'-':>8}"
                print(
                    f"{r:>4} {m:>5} {g['variant']:<28} "
                    + (f"{us:8.1f} {g['loop_us']:8.1f}" if us else f"{'-':>8} {'-':>8}")
                    + f" {g['floor_us']:6.1f} "
                    + (f"{100 * g['of_roofline']:4.0f}%" if us else f"{'-':>5}")
                    + f" {speed}  {g.get('error', '')}"
                )
                if len(g.get("kernels", ())) > 1:  # where a variant's time goes
                    print(" " * 11 + "  ".join(f"{n[:24]} {t:.1f}" for n, t in g["kernels"]))
    if jax_doc is not None:
        from fusedmlp.bench.lowrank_probe_jax import table

        print(table(jax_doc))
    doc = dict(
        probe="lowrank_probe",
        shape=dict(K=K, N=N, dtype="bfloat16", activation="silu"),
        ceilings=ceilings,
        peaks_used=dict(flops=peak_flops, bytes_per_s=peak_bytes),
        rows=rows,
        jax=jax_doc,
        torch_seconds=torch_seconds,
        seconds=seconds,
        environment=environment(),
    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    sys.exit(main())
