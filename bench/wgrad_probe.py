"""One-call H200 probe of the weight gradient's split over M (issue 25): `wgrad_fwd` alone (torch,
`triton.testing.do_bench` median, L2 cleared before each call), S = 1 against the split
`common.tiling.wgrad_splits` chooses and a few forced S around it, for the image fit's layers
(65,536 rows: 32×64, 64×64, 64×3, bias) and hf-blog-geglu's (8192 rows: the packed 768×6144 and
the 3072×768, no bias), bf16.

    python3 bench/wgrad_probe.py OUT.json [--rep-ms 40] [--no-jax] [--llama]

Each row: the layer, S (and the rows per split), median and min µs of the whole `wgrad_fwd` (the
split's two launches and its workspace included), the speed-up over S = 1, and the relative
Frobenius difference of dw (and db) from the float64 product (bf16 rounding: ~2e-3; the split
changes the fp32 summation order only). With JAX (default): the Pallas-Triton twin's dw at the
chosen S on the same inputs, its difference from the float64 product (not timed: a jitted call's
host cost is several times these kernels). `--llama`: llama3-8b's 14336×4096 (S = 1: a control,
~1 ms a call). do_bench's cache clearing runs on the GPU while the host enqueues the call, so
the split's extra launch is timed as the GPU sees it, not as host latency. Budget: ~60 s on an
H200 (most of it compiling). Prints a table, writes JSON to OUT.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

# (name, M, K, N, bias, forced S values besides 1 and the heuristic's)
CASES: tuple[tuple[str, int, int, int, bool, tuple[int, ...]], ...] = (
    ("image 32x64", 65536, 32, 64, True, ()),
    ("image 64x64", 65536, 64, 64, True, (16, 64, 256)),
    ("image 64x3", 65536, 64, 3, True, ()),
    ("hf-blog wv0 768x6144", 8192, 768, 6144, False, (2,)),
    ("hf-blog w1 3072x768", 8192, 3072, 768, False, (2, 4, 6)),
)
LLAMA = ("llama3-8b w1 14336x4096", 8192, 14336, 4096, False, ())


def _bench(call, args: argparse.Namespace) -> list[float]:
    """Times (ms) of `call`: do_bench's every rep on the GPU; one host-clocked call in a smoke."""
    import torch
    import triton.testing

    if not args.smoke:
        torch.cuda.synchronize()
        return triton.testing.do_bench(call, warmup=10, rep=args.rep_ms, return_mode="all")
    t0 = time.perf_counter()
    call()
    return [(time.perf_counter() - t0) * 1e3]


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def probe(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import triton

    from fusedmlp.common.tiling import heuristic_config, wgrad_splits
    from fusedmlp.torch_impl import backward

    cases = CASES + ((LLAMA,) if args.llama else ())
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:  # the same code on a CPU under the interpreters: tiny rows, nothing measured
        cases = tuple((c[0], 256, min(c[2], 48), min(c[3], 40), c[4], c[5][:1]) for c in cases)
    result: dict[str, Any] = {
        "device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "rows": [],
        "jax": [],
    }
    gen = torch.Generator(device=device).manual_seed(0)
    for name, m, k, n, bias, forced in cases:
        a = torch.randn(m, k, device=device, generator=gen).to(torch.bfloat16)
        d = torch.randn(m, n, device=device, generator=gen).to(torch.bfloat16)
        ref_w = a.double().T @ d.double()
        ref_b = d.double().sum(0)
        cfg = heuristic_config("linear_act", k, n, m, "bfloat16", interpret=args.smoke)
        tiles = triton.cdiv(k, cfg.block_m) * triton.cdiv(n, cfg.block_n)
        auto, _ = wgrad_splits(tiles, m, cfg.block_k)
        base = None
        for s in sorted({1, auto, *forced}):
            row: dict[str, Any] = {"case": name, "m": m, "k": k, "n": n, "config": str(cfg)}
            try:
                s_eff, per = wgrad_splits(tiles, m, cfg.block_k, splits=s)

                call = functools.partial(
                    backward.wgrad_fwd, a, d, has_bias=bias, config=cfg, splits=s
                )
                dw, db = call()
                times = sorted(_bench(call, args))
                med, lo = times[len(times) // 2], times[0]
                base = med if s == 1 else base
                row.update(
                    S=s_eff,
                    rows_per_split=per * cfg.block_k,
                    tiles=tiles,
                    chosen=s == auto,
                    us=med * 1e3,
                    min_us=lo * 1e3,
                    speedup=(base / med) if base else None,
                    rel_w=_rel(dw, ref_w),
                    rel_b=_rel(db, ref_b) if bias else None,
                )
            except Exception as err:  # a failing row is recorded, the probe goes on
                row["error"] = f"{type(err).__name__}: {err}"
                traceback.print_exc()
            result["rows"].append(row)
            _write(args.out, result)
        if not args.no_jax and name in ("image 64x64", "hf-blog w1 3072x768"):
            result["jax"].append(_jax_row(name, a, d, bias, cfg, ref_w, ref_b, args.smoke))
            _write(args.out, result)
        del a, d, ref_w, ref_b
        if not args.smoke:
            torch.cuda.empty_cache()
    return result


def _jax_row(name, a, d, bias, cfg, ref_w, ref_b, smoke: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"case": name}
    try:
        import jax
        import jax.numpy as jnp
        import torch

        from fusedmlp.jax_impl import backward as jb

        ja = jax.dlpack.from_dlpack(a)
        jd = jax.dlpack.from_dlpack(d)
        t0 = time.perf_counter()
        dw, db = jb.wgrad_fwd(ja, jd, has_bias=bias, config=cfg, interpret=smoke)
        jax.block_until_ready(dw)
        row["first_call_s"] = time.perf_counter() - t0
        dw_t = torch.from_dlpack(dw.astype(jnp.float32))
        row.update(jax=jax.__version__, rel_w=_rel(dw_t, ref_w))
        if bias:
            row["rel_b"] = _rel(torch.from_dlpack(db.astype(jnp.float32)), ref_b)
    except Exception as err:
        row["error"] = f"{type(err).__name__}: {err}"
        traceback.print_exc()
    return row


def _write(path: Path, result: dict[str, Any]) -> None:
    path.write_text(json.dumps(result, indent=1))


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{'case':<24} {'S':>4} {'rows/S':>7} {'µs':>9} {'min':>9} {'×S=1':>6} {'rel dw':>8}  note",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"{r['case']:<24} error: {r['error'][:60]}")
            continue
        sp = f"{r['speedup']:.2f}" if r["speedup"] else "-"
        note = "chosen" if r["chosen"] else ""
        lines.append(
            f"{r['case']:<24} {r['S']:>4} {r['rows_per_split']:>7} {r['us']:>9.1f} "
            f"{r['min_us']:>9.1f} {sp:>6} {r['rel_w']:>8.1e}  {note}"
        )
    for r in result["jax"]:
        what = r.get("error") or f"rel dw {r['rel_w']:.1e} (jax {r['jax']})"
        lines.append(f"jax {r['case']:<20} {what[:80]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--rep-ms", type=float, default=40.0)
    parser.add_argument("--no-jax", action="store_true")
    parser.add_argument("--llama", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="CPU, interpreters, tiny shapes")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch and JAX share the GPU
    result = probe(args)
    _write(args.out, result)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
