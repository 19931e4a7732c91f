"""What float32 GEMMs cost on Hopper: cuBLAS (IEEE and TF32) against our Triton kernels, with W
as the project stores it ([K, N], N contiguous) and K-major (an [N, K] buffer read as [K, N]).

Why: the release run (H200, 1845c27) had our float32 GEMMs at 83 % ("ieee") and 19-25 % ("tf32")
of cuBLAS, and `auto` on a GPU runs them where no dispatch point says otherwise. Compiling for
sm_90 on a CPU shows the "tf32" cause: wgmma reads 32-bit operands K-major only, so a W slab
that TMA lands N-major is loaded into registers and stored again transposed every K step, and
its wgmma is waited on at once (no MMA overlaps the next slab's copy); a K-major W is a free
shared-memory view and a pipelined wgmma. This probe times, per GEMM (bias + silu epilogue,
float32, device time as bench/timing.py defines it): cuBLAS under each precision (addmm + silu,
as eager runs it), the TMA and the portable linear_act under "tf32" with W N-major and K-major
over a few tiles (and the front's path: W K-major rounded to tf32 once, x rounded by one pass a
call, both read as they lie: `tf32_operands_exact`), and
under "ieee" at the heuristic's tile; each row with its error against float64. Since the tf32
kernels round their operands (torch_impl/tf32.py), operands they round in registers cost the
pipeline: the "rounded in memory" rows are the ones the front runs. One GPU call, ~60-120 s:

    python3 bench/tf32_probe.py OUT.json [--gemms llama-up,llama-down,hf-up,hf-down]
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

# name: (M, N, K)
GEMMS = {
    "llama-up": (2048, 14336, 4096),
    "llama-down": (2048, 4096, 14336),
    "hf-up": (8192, 3072, 768),
    "hf-down": (8192, 768, 3072),
}
CALLS = 20
# (block_m, block_n, block_k, warps, stages, epilogue_subtile, warp_specialize)
TF32_TILES = (
    (128, 128, 32, 8, 3, 1, False),
    (128, 128, 32, 8, 4, 1, False),
    (128, 128, 32, 4, 4, 1, True),
    (128, 256, 32, 8, 3, 2, False),
    (128, 256, 32, 8, 2, 2, False),
    (256, 128, 32, 8, 3, 2, False),
    (128, 64, 32, 4, 4, 1, False),
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = list(GEMMS)
    if "--gemms" in argv:
        i = argv.index("--gemms")
        names = argv[i + 1].split(",")
        argv = argv[:i] + argv[i + 2 :]
    out_path = argv[0] if argv else "tf32_probe.json"
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for name in names:
        rows += gemm_rows(name)
        _write(out_path, rows, start)  # after each GEMM: a call cut short keeps what it finished
    return 0


def gemm_rows(name: str) -> list[dict[str, Any]]:
    """Every variant of one GEMM of GEMMS, timed (or its error)."""
    import torch

    from fusedmlp.bench.timing import time_device
    from fusedmlp.common.config import TileConfig
    from fusedmlp.common.tiling import heuristic_config
    from fusedmlp.torch_impl import linear_act as portable
    from fusedmlp.torch_impl.tf32 import round_to_tf32, tf32_copy
    from fusedmlp.torch_impl.tma import linear_act as tma

    sync = torch.cuda.synchronize
    matmul = torch.backends.cuda.matmul
    m, n, k = GEMMS[name]
    torch.manual_seed(0)
    x = torch.randn(m, k, device="cuda")
    w_nk = torch.randn(n, k, device="cuda") * k**-0.5  # K-major storage
    w = w_nk.t().contiguous()  # [K, N], N contiguous: the project's layout
    b = 0.1 * torch.randn(n, device="cuda")
    ref = torch.nn.functional.silu(x.double() @ w.double() + b.double()).float()

    def cublas(precision: str) -> Any:
        def run() -> Any:
            previous = matmul.fp32_precision
            matmul.fp32_precision = precision
            try:
                return torch.nn.functional.silu(torch.addmm(b, x, w))
            finally:
                matmul.fp32_precision = previous

        return run

    w_rounded_kmajor = round_to_tf32(w_nk).t()

    def rounded_in_memory(cfg: Any, wt: Any) -> Any:
        # the front's path: x rounded by one pass per call (timed with the GEMM), W once
        return lambda: tma.linear_act_fwd(
            tf32_copy(x), wt, b, None, activation="silu", config=cfg, fp32_precision="tf32",
            tf32_operands_exact=True,
        )  # fmt: skip

    def ours(mod: Any, cfg: Any, wt: Any, precision: str) -> Any:
        return lambda: mod.linear_act(
            x, wt, b, activation="silu", config=cfg, fp32_precision=precision
        )

    cases: list[tuple[str, str, str, Any]] = [
        ("cublas", "addmm + silu", "ieee", cublas("ieee")),
        ("cublas", "addmm + silu", "tf32", cublas("tf32")),
    ]
    ieee_cfg = heuristic_config("linear_act", m, n, k, "float32", persistent=True)
    for kernel, mod in (("tma", tma), ("portable", portable)):
        cases.append((kernel, f"{ieee_cfg} w N-major", "ieee", ours(mod, ieee_cfg, w, "ieee")))
    rows: list[dict[str, Any]] = []
    for bm, bn, bk, warps, stages, sub, ws in TF32_TILES:
        try:
            cfg = TileConfig(bm, bn, bk, num_warps=warps, num_stages=stages,
                             epilogue_subtile=sub, warp_specialize=ws)  # fmt: skip
        except ValueError as e:
            rows.append({"gemm": name, "variant": f"{bm}x{bn}x{bk}", "error": str(e)})
            continue
        for layout, wt in (("N-major", w), ("K-major", w_nk.t())):
            for kernel, mod in (("tma", tma), ("portable", portable)):
                if kernel == "tma" or not ws:
                    cases.append((kernel, f"{cfg} w {layout}", "tf32", ours(mod, cfg, wt, "tf32")))
        # the front's path: x and W (K-major) rounded in memory, read as they lie
        cases.append(
            ("tma", f"{cfg} w K-major, x and w rounded in memory", "tf32",
             rounded_in_memory(cfg, w_rounded_kmajor))
        )  # fmt: skip
    for kernel, variant, precision, fn in cases:
        row: dict[str, Any] = {"gemm": name, "m": m, "n": n, "k": k, "kernel": kernel,
                               "variant": variant, "precision": precision}  # fmt: skip
        try:
            row["rel_err"] = float((fn() - ref).norm() / ref.norm())
            fn()
            sync()
            timing = time_device("torch", lambda i, fn=fn: fn(), CALLS, lambda _: sync())
            us = timing.device.median * 1e6
            row.update(us=round(us, 2), tflops=round(2 * m * n * k / us / 1e6, 1))
        except Exception as e:  # a config the compiler refuses (shared memory, say)
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _write(out_path: str, rows: list[dict[str, Any]], start: float) -> None:
    from fusedmlp.bench.env import environment

    result = {
        "probe": "tf32_probe", "gemms": GEMMS, "rows": rows,
        "seconds": round(time.perf_counter() - start, 1), "environment": environment(),
    }  # fmt: skip
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
