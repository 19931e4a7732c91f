"""Does splitting the persistent grid's last wave in K (torch_impl/tma/linear_act.py
`_linear_act_split_tail_kernel`, common/tiling.py `last_wave_split`) win back its idle programs?
gpt-mlp's up projection at M = 8192 runs 32 waves for 31.03 tiles' worth; its down projection 8
for 7.76.

Per GEMM (bf16, M = 8192, the front's config for the shape; gpt-mlp's up projection with its
gelu_tanh and bias): `triton_tma`'s linear_act data-parallel only ("dp") and with its last
T mod P tiles split into S runs ("s2", "s4", ... forced), cuBLAS's plain x @ W beside them; then
the whole gpt-mlp through the front (impl triton_tma, `tma_linear.SPLIT_TAIL` off and as the
model says) beside `F.linear` eager and the front's `mosaic` (torch `auto`'s choice there). Every
contender timed in palindromic rounds after a warm one (bench/paired.py, device time, an L2 flush
before each call), so the ratios are taken inside a round; the bits against dp and the float64
reference's worst error over the last 2,048 rows (where the split tiles are) are recorded. One GPU
call:

    python3 bench/split_tail_probe.py OUT.json [--rounds 7] [--calls 40]
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
from fusedmlp.common.tiling import cdiv, heuristic_config, last_wave_split
from fusedmlp.common.tuning import committed_config
from fusedmlp.torch_impl import front
from fusedmlp.torch_impl.module import to_torch
from fusedmlp.torch_impl.tma import linear_act as tma_linear
from fusedmlp.torch_impl.tma.support import num_programs

M = 8192
GEMMS = (  # name, K, N, activation, bias, forced splits
    ("gpt.up", 4096, 16384, "gelu_tanh", True, (2, 3, 4, 8)),
    ("gpt.down", 16384, 4096, "identity", True, (3, 5, 9)),
    ("llama.down", 14336, 4096, "identity", False, (5,)),
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
    return {
        "time": {n: paired.spread(v) for n, v in samples.items()},
        "ratio": {  # dp, cuBLAS (eager), mosaic ÷ each triton_tma variant: above 1, the second wins
            f"{a}/{b}": paired.spread([x / y for x, y in zip(samples[a], samples[b], strict=True)])
            for a in ("dp", "cublas", "mosaic")
            if a in samples
            for b in samples
            if b not in (a, "cublas", "mosaic")
        },
    }


def gemm(name: str, k: int, n: int, act: str, bias: bool, splits: tuple[int, ...], rounds: int,
         calls: int) -> dict:  # fmt: skip
    gen = torch.Generator(device="cuda").manual_seed(7)
    x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = torch.randn(k, n, device="cuda", dtype=torch.bfloat16, generator=gen) / k**0.5
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen) if bias else None
    config = _front_config(k, n)
    tiles = cdiv(M, config.block_m) * cdiv(n, config.block_n)
    programs = num_programs(tiles, x.device, config.programs_per_sm)

    def ours(split_tail: bool | int):
        return lambda i: tma_linear.linear_act_fwd(
            x, w, b, None, activation=act, config=config, split_tail=split_tail
        )

    fns = {"dp": ours(False), **{f"s{s}": ours(s) for s in splits}, "cublas": lambda i: x @ w}
    # the split tiles are the last of the grouped order: the last 2048 rows hold them here
    rows = slice(M - 2048, M)
    ref = x[rows].double() @ w.double() + (b.double() if bias else 0.0)
    if act == "gelu_tanh":
        ref = torch.nn.functional.gelu(ref, approximate="tanh")
    outs = {name: fn(0) for name, fn in fns.items() if name != "cublas"}
    out = {
        "gemm": name,
        "mnk": [M, n, k],
        "config": str(config),
        "tiles": tiles,
        "programs": programs,
        "model": list(last_wave_split(tiles, programs, cdiv(k, config.block_k))),
        "bits_differ_from_dp": {n_: int((y != outs["dp"]).sum()) for n_, y in outs.items()},
        "max_err_last_2048_rows": {
            n_: float((y[rows].double() - ref).abs().max()) for n_, y in outs.items()
        },
    }
    out.update(_rounds(fns, rounds, calls))
    return out


def whole_mlp(rounds: int, calls: int) -> dict:
    spec = get_preset("gpt-mlp").spec
    x = to_torch(make_input(spec, M, seed=3), "cuda")
    params = {k: to_torch(v, "cuda") for k, v in init_params(spec, seed=4).items()}

    def tma(split_tail: bool):
        def call(i):
            tma_linear.SPLIT_TAIL = split_tail
            return front.mlp(x, params, spec, impl="triton_tma")

        return call

    def eager(i):  # the bench's eager baseline: F.linear (bias in cuBLAS's epilogue), gelu
        h = torch.nn.functional.gelu(
            torch.nn.functional.linear(x, params["w0"].t(), params["b0"]), approximate="tanh"
        )
        return torch.nn.functional.linear(h, params["w1"].t(), params["b1"])

    def mosaic(i):  # what torch `auto` runs at gpt-mlp M = 8192 on both cards' tables
        return front.mlp(x, params, spec, impl="mosaic")

    fns = {"dp": tma(False), "model": tma(True), "cublas": eager, "mosaic": mosaic}
    default = tma_linear.SPLIT_TAIL
    try:
        outs = {name: fn(0) for name, fn in fns.items()}
        out = {
            "case": "gpt-mlp M=8192 (front: impl triton_tma data-parallel and as the model says, "
            "impl mosaic; cublas = F.linear eager)"
        }
        out["bits_differ_from_dp"] = int((outs["model"] != outs["dp"]).sum())
        out.update(_rounds(fns, rounds, calls))
    finally:
        tma_linear.SPLIT_TAIL = default
    return out


def _line(label: str, row: dict) -> str:
    t, r = row["time"], row["ratio"]
    times = ", ".join(f"{n} {v['median'] * 1e3:.4f}" for n, v in t.items())
    gains = ", ".join(
        f"{n} {v['median']:.4f} ({v['min']:.4f}-{v['max']:.4f})" for n, v in r.items()
    )
    return f"{label}: ms {times}; ratios {gains}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--gemms", help="comma list of GEMM names (default: all)")
    parser.add_argument("--no-mlp", action="store_true", help="the GEMMs only")
    args = parser.parse_args()
    result: dict[str, Any] = {"environment": environment(), "gemms": [], "mlp": None}
    for name, k, n, act, bias, splits in GEMMS:
        if args.gemms and name not in args.gemms.split(","):
            continue
        row = gemm(name, k, n, act, bias, splits, args.rounds, args.calls)
        result["gemms"].append(row)
        print(_line(f"{name} {row['config']} model {row['model']}", row), flush=True)
        print(f"  bits {row['bits_differ_from_dp']} errs {row['max_err_last_2048_rows']}")
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    if not args.no_mlp:
        result["mlp"] = whole_mlp(args.rounds, args.calls)
        print(_line("gpt-mlp", result["mlp"]), flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
