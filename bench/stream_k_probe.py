"""Does the stream-K tail (torch_impl/tma/linear_act.py `_linear_act_stream_k_kernel`) win back
the persistent grid's idle last wave? (common/tiling.py `stream_k_tiles` predicts −3 % on each of
gpt-mlp's projections at M = 8192: 31.03 and 7.76 waves of 128×256 tiles on 132 SMs.)

Per GEMM (bf16, M = 8192, the front's config for the shape, gpt-mlp's up projection with its
gelu_tanh and bias): `triton_tma`'s linear_act with the tail as stream-K ("sk") and data-parallel
only ("dp"), cuBLAS's plain x @ W beside them; then the whole gpt-mlp through the front
(impl triton_tma, `tma_linear.STREAM_K` on and off) beside torch eager. Every contender timed in
palindromic rounds after a warm one (bench/paired.py, device time, an L2 flush before each call),
so the ratios are taken inside a round; the bits of sk against dp and the float64 reference's
worst error in each are recorded. One GPU call:

    python3 bench/stream_k_probe.py OUT.json [--rounds 7] [--calls 40]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from fusedmlp.bench import paired
from fusedmlp.bench.env import environment
from fusedmlp.common import get_preset, init_params, make_input
from fusedmlp.common.tiling import cdiv, heuristic_config, stream_k_tiles
from fusedmlp.common.tuning import committed_config
from fusedmlp.torch_impl import front
from fusedmlp.torch_impl.module import to_torch
from fusedmlp.torch_impl.tma import linear_act as tma_linear
from fusedmlp.torch_impl.tma.support import num_programs

M = 8192
GEMMS = (  # name, K, N, activation, bias
    ("gpt.up", 4096, 16384, "gelu_tanh", True),
    ("gpt.down", 16384, 4096, "identity", True),
    ("llama.down", 14336, 4096, "identity", False),
)


def _wait(out: Any) -> None:
    torch.cuda.synchronize()


def _front_config(k: int, n: int) -> Any:
    """The committed tuned config for this card where there is one, else the heuristic's."""
    device = torch.cuda.get_device_name()
    tuned = committed_config(device, "triton_tma", "linear_act", M, n, k, "bfloat16")
    return tuned or heuristic_config("linear_act", M, n, k, "bfloat16", persistent=True)


def _rounds(fns: dict[str, Any], rounds: int, calls: int) -> dict[str, Any]:
    samplers = {name: paired.sampler("torch", "cuda", fn, _wait, calls) for name, fn in fns.items()}
    samples = paired.interleave(samplers, rounds)
    names = list(fns)
    return {
        "time": {n: paired._spread(samples[n]) for n in names},
        "ratio": {
            f"{a}/{b}": paired._spread([x / y for x, y in zip(samples[a], samples[b], strict=True)])
            for a, b in (("dp", "sk"), ("cublas", "sk"), ("cublas", "dp"))
            if a in samples and b in samples
        },
    }


def gemm(name: str, k: int, n: int, act: str, bias: bool, rounds: int, calls: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(7)
    x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = torch.randn(k, n, device="cuda", dtype=torch.bfloat16, generator=gen) / k**0.5
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen) if bias else None
    config = _front_config(k, n)
    tiles = cdiv(M, config.block_m) * cdiv(n, config.block_n)
    programs = num_programs(tiles, x.device, config.programs_per_sm)
    sk_tiles = stream_k_tiles(tiles, programs, cdiv(k, config.block_k))

    def ours(stream_k: bool):
        return lambda i: tma_linear.linear_act_fwd(
            x, w, b, None, activation=act, config=config, stream_k=stream_k
        )

    fns = {"sk": ours(True), "dp": ours(False), "cublas": lambda i: x @ w}
    sk, dp = fns["sk"](0), fns["dp"](0)
    # stream-K's tiles are the last of the grouped order: the last 2048 rows hold them all here
    rows = slice(M - 2048, M)
    ref = x[rows].double() @ w.double() + (b.double() if bias else 0.0)
    if act == "gelu_tanh":
        ref = torch.nn.functional.gelu(ref, approximate="tanh")
    out = {
        "gemm": name,
        "mnk": [M, n, k],
        "config": str(config),
        "tiles": tiles,
        "programs": programs,
        "stream_k_tiles": sk_tiles,
        "bits_differ": int((sk != dp).sum()),
        "max_err_last_2048_rows": {
            "sk": float((sk[rows].double() - ref).abs().max()),
            "dp": float((dp[rows].double() - ref).abs().max()),
        },
        "max_diff_sk_dp": float((sk.double() - dp.double()).abs().max()),
    }
    out.update(_rounds(fns, rounds, calls))
    return out


def whole_mlp(rounds: int, calls: int) -> dict:
    spec = get_preset("gpt-mlp").spec
    x = to_torch(make_input(spec, M, seed=3), "cuda")
    params = {k: to_torch(v, "cuda") for k, v in init_params(spec, seed=4).items()}

    def tma(stream_k: bool):
        def call(i):
            tma_linear.STREAM_K = stream_k
            return front.mlp(x, params, spec, impl="triton_tma")

        return call

    def eager(i):
        h = torch.nn.functional.gelu(x @ params["w0"] + params["b0"], approximate="tanh")
        return h @ params["w1"] + params["b1"]

    fns = {"sk": tma(True), "dp": tma(False), "cublas": eager}
    sk, dp = fns["sk"](0), fns["dp"](0)
    tma_linear.STREAM_K = True
    out = {"case": "gpt-mlp M=8192 (front, impl triton_tma; cublas = torch eager)"}
    out["bits_differ"] = int((sk != dp).sum())
    out.update(_rounds(fns, rounds, calls))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=40)
    args = parser.parse_args()
    result: dict[str, Any] = {"environment": environment(), "gemms": [], "mlp": None}
    for name, k, n, act, bias in GEMMS:
        row = gemm(name, k, n, act, bias, args.rounds, args.calls)
        result["gemms"].append(row)
        t, r = row["time"], row["ratio"]
        print(
            f"{name}: {row['config']} tiles {row['tiles']} programs {row['programs']} "
            f"sk tiles {row['stream_k_tiles']}: sk {t['sk']['median'] * 1e3:.4f} ms, "
            f"dp {t['dp']['median'] * 1e3:.4f}, cublas {t['cublas']['median'] * 1e3:.4f}; "
            f"dp/sk {r['dp/sk']['median']:.4f} ({r['dp/sk']['min']:.4f}-{r['dp/sk']['max']:.4f}), "
            f"bits differ {row['bits_differ']}, errs {row['max_err_last_2048_rows']}",
            flush=True,
        )
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    result["mlp"] = whole_mlp(args.rounds, args.calls)
    t, r = result["mlp"]["time"], result["mlp"]["ratio"]
    print(
        f"gpt-mlp: sk {t['sk']['median'] * 1e3:.4f} ms, dp {t['dp']['median'] * 1e3:.4f}, eager "
        f"{t['cublas']['median'] * 1e3:.4f}; dp/sk {r['dp/sk']['median']:.4f}, eager/sk "
        f"{r['cublas/sk']['median']:.4f} ({r['cublas/sk']['min']:.4f}-{r['cublas/sk']['max']:.4f})",
        flush=True,
    )
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
