"""Where the factorised layer's second GEMM (t·V: K = r ≤ 256, a large output) loses its time.

The low-rank issue's roofline target fails on one kernel: act(t·V + b) at M = 8192, N = 14336
(llama3-8b's up projection), K = r, which writes 235 MB and reads ~2 MB — a store-bound GEMM.
Our TMA linear_act took 141–192 µs there (1.2–1.7 TB/s), cuBLAS's plain t @ V 71–114 µs. This
probe times, at r = 64 / 128 / 256, bf16, device time as the harness defines it
(bench/timing.py): cuBLAS's t @ V; our TMA (persistent) and portable (one tile a program)
linear_act over a grid of tiles, each with the activation (silu) and without (identity), so the
epilogue's arithmetic and the store path are told apart. One GPU call, ~60 s:

    python3 bench/store_probe.py OUT.json

`--narrow` times the layer's first GEMM instead, x·U at M = 8192, K = 4096, N = r (a read-bound
GEMM: 67 MB of x): cuBLAS, and TMA linear_act tiles deeper in K or in stages than the heuristic's
64×128×64 at 4 stages (35.0 / 26.9 / 31.4 µs at 84f2c0e, 1.9–2.5 TB/s: one serial K loop of 64
steps a program, ~96 KB in flight per SM).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

M, N = 8192, 14336
RANKS = (64, 128, 256)
CALLS = 30


def variants() -> list[tuple[str, str, dict[str, Any]]]:
    """(kernel, name, TileConfig fields)."""
    out = []
    for bm, bn, warps, stages, sub, ws in (
        (128, 256, 8, 2, 1, False),
        (128, 256, 8, 3, 4, False),
        (128, 256, 8, 4, 4, False),
        (128, 128, 4, 3, 1, False),
        (128, 128, 4, 3, 1, True),
        (128, 128, 8, 3, 2, False),
        (128, 128, 4, 4, 2, False),
        (64, 256, 4, 3, 2, False),
        (256, 128, 8, 3, 2, False),
    ):
        cfg = dict(
            block_m=bm, block_n=bn, block_k=64, num_warps=warps, num_stages=stages,
            epilogue_subtile=sub, warp_specialize=ws,
        )  # fmt: skip
        out.append(("tma", f"{bm}x{bn} w{warps} s{stages} sub{sub}{' ws' if ws else ''}", cfg))
    for bm, bn, warps, stages in ((128, 128, 4, 3), (128, 256, 8, 3), (64, 128, 4, 3)):
        cfg = dict(block_m=bm, block_n=bn, block_k=64, num_warps=warps, num_stages=stages)
        out.append(("portable", f"{bm}x{bn} w{warps} s{stages}", cfg))
    return out


# x·U variants (--narrow): (block_m, block_n, block_k, warps, stages, programs per SM)
NARROW = (
    (64, 128, 64, 4, 4, 1),  # the heuristic at 84f2c0e (tiling.NARROW_CONFIGS since eaf3706)
    (64, 128, 64, 4, 8, 1),
    (64, 128, 128, 4, 4, 1),
    (64, 64, 64, 4, 8, 1),
    (64, 64, 128, 4, 6, 1),
    (128, 64, 64, 4, 6, 1),
    (64, 64, 64, 4, 4, 2),
    (64, 256, 64, 8, 4, 1),  # r = 256: the whole rank in one tile (x read once, not twice)
    (128, 128, 64, 8, 4, 1),
)
K_IN = 4096


def narrow_main(out_path: str) -> int:
    import torch

    from fusedmlp.bench.timing import time_device
    from fusedmlp.common.config import TileConfig
    from fusedmlp.torch_impl.tma import linear_act as tma

    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    sync = torch.cuda.synchronize
    for r in RANKS:
        torch.manual_seed(0)
        x = torch.randn(M, K_IN, device="cuda", dtype=torch.bfloat16)
        u = (torch.randn(K_IN, r, device="cuda") * K_IN**-0.5).to(torch.bfloat16)
        ref = x.float() @ u.float()
        cases: list[tuple[str, Any]] = [("cublas x @ u", lambda x=x, u=u: x @ u)]
        for bm, bn, bk, warps, stages, per_sm in NARROW:
            cfg = TileConfig(
                bm, bn, bk, num_warps=warps, num_stages=stages, epilogue_subtile=2,
                programs_per_sm=per_sm,
            )  # fmt: skip
            cases.append((f"tma {cfg}", lambda x=x, u=u, cfg=cfg: tma.linear_act(x, u, config=cfg)))
        for name, fn in cases:
            row: dict[str, Any] = {"r": r, "variant": name}
            try:
                row["rel_err"] = float((fn().float() - ref).norm() / ref.norm())
                fn()
                sync()
                timing = time_device("torch", lambda i, fn=fn: fn(), CALLS, lambda _: sync())
                us = timing.device.median * 1e6
                row.update(us=round(us, 2), read_tbps=round(M * K_IN * 2 / us / 1e6, 3))
            except Exception as e:  # a config the compiler refuses (shared memory, say)
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
        _write(out_path, rows, start)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--narrow" in argv:
        argv = [a for a in argv if a != "--narrow"]
        return narrow_main(argv[0] if argv else "store_probe_narrow.json")
    out_path = argv[0] if argv else "store_probe.json"
    import torch

    from fusedmlp.bench.timing import time_device
    from fusedmlp.common.config import TileConfig
    from fusedmlp.torch_impl import linear_act as portable
    from fusedmlp.torch_impl.tma import linear_act as tma

    start = time.perf_counter()
    sync = torch.cuda.synchronize
    rows: list[dict[str, Any]] = []
    out_bytes = M * N * 2

    def device_us(fn) -> float:
        fn()
        sync()
        return time_device("torch", lambda i: fn(), CALLS, lambda _: sync()).device.median * 1e6

    for r in RANKS:
        torch.manual_seed(0)
        t = torch.randn(M, r, device="cuda", dtype=torch.bfloat16)
        v = (torch.randn(r, N, device="cuda") * r**-0.5).to(torch.bfloat16)
        b = (0.1 * torch.randn(N, device="cuda")).to(torch.bfloat16)
        ref = torch.nn.functional.silu(t.float() @ v.float() + b.float())
        cases: list[tuple[str, str, str, Any]] = [
            ("cublas", "t @ v", "identity", lambda t=t, v=v: t @ v),
            ("cublas", "addmm + silu (eager)", "silu",
             lambda t=t, v=v, b=b: torch.nn.functional.silu(torch.addmm(b, t, v))),
        ]  # fmt: skip
        for kernel, name, fields in variants():
            mod = tma if kernel == "tma" else portable
            try:
                cfg = TileConfig(**fields)
            except ValueError as e:
                rows.append({"r": r, "kernel": kernel, "variant": name, "error": str(e)})
                continue
            for act in ("silu", "identity"):
                cases.append((kernel, name, act, lambda mod=mod, cfg=cfg, act=act, t=t, v=v, b=b:
                              mod.linear_act(t, v, b, activation=act, config=cfg)))  # fmt: skip
        for kernel, name, act, fn in cases:
            row: dict[str, Any] = {"r": r, "kernel": kernel, "variant": name, "activation": act}
            try:
                if act == "silu":
                    err = (fn().float() - ref).norm() / ref.norm()
                    row["rel_err"] = float(err)
                us = device_us(fn)
                row.update(us=round(us, 2), store_tbps=round(out_bytes / us / 1e6, 3))
            except Exception as e:  # a config the compiler refuses (shared memory, say)
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
        _write(out_path, rows, start)  # after each rank: a call cut short keeps what it finished
    return 0


def _write(out_path: str, rows: list[dict[str, Any]], start: float) -> None:
    from fusedmlp.bench.env import environment

    result = {
        "probe": "store_probe", "shape": {"M": M, "N": N, "ranks": RANKS},
        "rows": rows, "seconds": round(time.perf_counter() - start, 1),
        "environment": environment(),
    }  # fmt: skip
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
