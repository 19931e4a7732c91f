"""Is the factorised layer's t·V GEMM store-bound or epilogue-bound? (bench/store_probe.py found
silu adding ~50 µs to every tile variant at M = 8192, N = 14336, K = r: as long as two MUFU
operations per element take on 132 SMs — exp and the reciprocal — so the epilogue's arithmetic
looks serial with the stores.)

A probe kernel with our TMA linear_act's structure (persistent grid, in-kernel descriptors, the
grouped tile order, `_store_tile`'s sliced TMA stores), varied where the question is:

- epilogue: identity; silu as the library computes it (x / (1 + exp(-x)): ex2 + a division);
  silu with the reciprocal from a bit-trick guess and three Newton steps (one MUFU op an element);
  silu as 0.5·x·(1 + tanh.approx(x/2)) (one MUFU op, ~2^-11 relative error in tanh);
- programs per SM: 1 (ours) or 2 (one program's epilogue overlaps the other's loads and stores).

bf16, M = 8192, N = 14336, r = 64 / 128; device time as the harness defines it. One GPU call:

    python3 bench/epilogue_probe.py OUT.json
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch
import triton
import triton.language as tl

from fusedmlp.torch_impl.linear_act import _grouped_tile
from fusedmlp.torch_impl.tma.linear_act import _store_tile

M, N = 8192, 14336
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _silu_newton(x):
    # sigmoid = 1 / d, d = 1 + e^-x in [1, inf]: a bit-trick first guess (~4 bits), three Newton
    # steps r·(2 − d·r) (≤ 4e-6 relative for x > -60 in NumPy); d past 2^125 gives 0 (the guess
    # is garbage there).
    d = 1.0 + tl.exp2(-x * LOG2E)
    r = (0x7EF311C3 - d.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)
    r = r * (2.0 - d * r)
    r = r * (2.0 - d * r)
    r = r * (2.0 - d * r)
    return x * tl.where(d > 4.0e37, 0.0, r)


@triton.jit
def _silu_tanh(x):
    t = tl.inline_asm_elementwise(
        "tanh.approx.f32 $0, $1;", "=r,r", [0.5 * x], dtype=tl.float32, is_pure=True, pack=1
    )
    return 0.5 * x * (1.0 + t)


@triton.jit
def _probe_kernel(
    x_ptr, w_ptr, b_ptr, o_ptr, M, N, K, NUM_PROGRAMS,
    EPI: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SUBTILE: tl.constexpr,
):  # fmt: skip
    x_desc = tl.make_tensor_descriptor(
        x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K]
    )
    w_desc = tl.make_tensor_descriptor(
        w_ptr, shape=[K, N], strides=[N, 1], block_shape=[BLOCK_K, BLOCK_N]
    )
    o_desc = tl.make_tensor_descriptor(
        o_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N // SUBTILE]
    )
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    tile_out = tl.program_id(0) - NUM_PROGRAMS
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = _grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_tiles):
            x = x_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
            w = w_desc.load([k * BLOCK_K, pid_n * BLOCK_N])
            acc = tl.dot(x, w, acc)
        tile_out += NUM_PROGRAMS
        tile_m, tile_n = _grouped_tile(tile_out, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = acc + tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        if EPI == "silu":
            acc = acc / (1.0 + tl.exp(-acc))
        elif EPI == "silu_newton":
            acc = _silu_newton(acc)
        elif EPI == "silu_tanh":
            acc = _silu_tanh(acc)
        _store_tile(
            o_desc, acc, o_ptr, tile_m * BLOCK_M, tile_n * BLOCK_N, M, N, False, False,
            BLOCK_M, BLOCK_N, SUBTILE,
        )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out_path = argv[0] if argv else "epilogue_probe.json"
    from fusedmlp.bench.env import environment
    from fusedmlp.bench.timing import time_device
    from fusedmlp.torch_impl.tma.support import ensure_allocator

    ensure_allocator()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    # (block_m, block_n, warps, stages, subtile): 1 program/SM fits all; 2/SM fit the small ones
    tiles = ((128, 256, 8, 2, 1), (128, 128, 4, 2, 2), (64, 256, 4, 2, 2))
    for r in (64, 128):
        torch.manual_seed(0)
        t = torch.randn(M, r, device="cuda", dtype=torch.bfloat16)
        v = (torch.randn(r, N, device="cuda") * r**-0.5).to(torch.bfloat16)
        b = (0.1 * torch.randn(N, device="cuda")).to(torch.bfloat16)
        z = t.float() @ v.float() + b.float()
        ref = {"identity": z, "silu": torch.nn.functional.silu(z)}
        for bm, bn, warps, stages, sub in tiles:
            for per_sm in (1, 2):
                for epi in ("identity", "silu", "silu_newton", "silu_tanh"):
                    n_tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
                    programs = min(n_tiles, per_sm * sms)
                    out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)

                    def fn(i: int, out=out, programs=programs, epi=epi, cfg=(bm, bn, warps,
                           stages, sub), t=t, v=v, b=b, r=r) -> Any:  # fmt: skip
                        _probe_kernel[(programs,)](
                            t, v, b, out, M, N, r, programs, EPI=epi, BLOCK_M=cfg[0],
                            BLOCK_N=cfg[1], BLOCK_K=64, GROUP_M=8, SUBTILE=cfg[4],
                            num_warps=cfg[2], num_stages=cfg[3],
                        )  # fmt: skip
                        return out

                    row: dict[str, Any] = dict(
                        r=r, tile=f"{bm}x{bn} w{warps} s{stages} sub{sub}", per_sm=per_sm, epi=epi
                    )
                    try:
                        fn(0)
                        torch.cuda.synchronize()
                        want = ref["identity" if epi == "identity" else "silu"]
                        row["rel_err"] = float((out.float() - want).norm() / want.norm())
                        row["max_abs_err"] = float((out.float() - want).abs().max())
                        timing = time_device("torch", fn, 30, lambda _: torch.cuda.synchronize())
                        us = timing.device.median * 1e6
                        row.update(us=round(us, 2), store_tbps=round(M * N * 2 / us / 1e6, 3))
                    except Exception as e:  # a config the compiler refuses
                        row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        with open(out_path, "w") as f:
            json.dump(
                {"probe": "epilogue_probe", "rows": rows, "environment": environment(),
                 "seconds": round(time.perf_counter() - start, 1)}, f, indent=1,
            )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
