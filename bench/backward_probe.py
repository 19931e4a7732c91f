"""Forward+backward probe on one GPU (issue 24): FusedMLP training (impl "auto": on Hopper the
TMA backward; impl "triton": the portable kernels, both saved policies) vs the eager
baseline (torch autograd through `baselines.eager`, the plain ops a user writes) and torch.compile
of the same function, at llama3-8b and hf-blog-geglu, M=8192 by default.

    python bench/backward_probe.py OUT.json [--presets llama3-8b,hf-blog-geglu] [--m 8192]
                                            [--no-compile] [--rep-ms 100]

One step = forward, then backward of y with a fixed dy (x requires grad: an MLP block inside a
network needs dx), grads reset to None first (no accumulation kernels). Times are
`triton.testing.do_bench` medians (CUDA events, L2 cleared before each call); "fwd" is the
forward alone under no_grad. Peak memory: the step's peak allocation above what was allocated
before it (params, x, dy). The kernels' gradients are checked against the eager baseline's
(relative Frobenius difference per tensor; both are bf16 computations of the same thing, expect
~1e-2 or below) and the two saved policies against each other (bitwise). A torch.profiler table of
one triton step's kernels ends each case. Prints a compact table, writes JSON to OUT.json.
Budget: well under 3 minutes on an H200 (most of it compiling: Triton's kernels once, inductor's
forward+backward per preset).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from typing import Any

import torch
import triton.testing

from fusedmlp.common import cost, get_preset
from fusedmlp.common.packing import unpack_params
from fusedmlp.torch_impl import FusedMLP, front
from fusedmlp.torch_impl.baselines import eager

DEVICE = "cuda"  # --device cpu: a smoke run under Triton's interpreter (host clock, no memory)


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _bench(fn, rep_ms: float) -> float:
    if DEVICE == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _allocated() -> int:
    return torch.cuda.memory_allocated() if DEVICE == "cuda" else 0


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _probe(name: str, m: int, args: argparse.Namespace) -> dict[str, Any]:
    spec = get_preset(name).spec
    dtype = getattr(torch, spec.dtype)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    module = FusedMLP(spec, impl="triton", device=DEVICE, seed=0)
    auto = FusedMLP(spec, device=DEVICE, seed=0)  # on Hopper: the TMA backward (tma/backward.py)
    plain = {k: v.detach().clone().requires_grad_() for k, v in module.params().items()}
    x = torch.randn(m, spec.d_in, device=DEVICE, dtype=dtype, generator=gen).requires_grad_()
    dy = torch.randn(m, spec.d_out, device=DEVICE, dtype=dtype, generator=gen)
    compiled = torch.compile(functools.partial(eager, spec=spec))

    def with_saved(saved: str):
        def fwd():
            module.saved = saved
            return module(x)

        return fwd, list(module.parameters())

    variants: dict[str, tuple[Any, list[torch.Tensor]]] = {
        "auto preact": (lambda: auto(x), list(auto.parameters())),
        "triton preact": with_saved("preact"),
        "triton inputs": with_saved("inputs"),
        "eager": (lambda: eager(x, plain, spec), list(plain.values())),
    }
    if not args.no_compile:
        variants["compile"] = (lambda: compiled(x, plain), list(plain.values()))

    rows, grads = [], {}
    flops = 3 * cost.flops(spec, m)  # forward + dgrad + wgrad
    for label, (fwd, params) in variants.items():

        def step(fwd=fwd, params=params):
            x.grad = None
            for p in params:
                p.grad = None
            fwd().backward(dy)

        t0 = time.perf_counter()
        step()  # compiles (Triton JIT, inductor)
        _sync()
        first_s = time.perf_counter() - t0
        grads[label] = [x.grad.clone(), *(p.grad.clone() for p in params)]
        peak = 0
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = _allocated()
            step()
            _sync()
            peak = torch.cuda.max_memory_allocated() - before
        ms = _bench(step, args.rep_ms)
        fwd_ms = None
        if label != "compile":  # a no_grad call would compile inductor's inference graph too
            with torch.no_grad():
                fwd_ms = _bench(fwd, args.rep_ms)
        rows.append(
            dict(
                impl=label, fwd_bwd_ms=ms, fwd_ms=fwd_ms, tflops=flops / ms / 1e9,
                peak_mib=peak / 2**20, first_call_s=first_s,
            )
        )  # fmt: skip

    # gradient checks: triton (packed, unpacked here) vs eager; the two policies bitwise
    names = list(plain)
    packed_names = [n for n, _ in module.named_parameters()]

    def as_plain(gs):
        named = dict(zip(packed_names, gs[1:], strict=True))
        return [gs[0], *(unpack_params(spec, named)[n] for n in names)]

    tri, base = as_plain(grads["triton preact"]), grads["eager"]
    diffs = {n: _rel(a, b) for n, a, b in zip(["x", *names], tri, base, strict=True)}
    hop = as_plain(grads["auto preact"])
    auto_diffs = {n: _rel(a, b) for n, a, b in zip(["x", *names], hop, base, strict=True)}
    same = all(
        torch.equal(a, b)
        for a, b in zip(grads["triton preact"], grads["triton inputs"], strict=True)
    )
    best = min(r["fwd_bwd_ms"] for r in rows if r["impl"] in ("eager", "compile"))
    for r in rows:
        r["speedup_vs_best_baseline"] = best / r["fwd_bwd_ms"]

    # where a step's time goes: the portable kernels and auto's (on Hopper: the TMA backward)
    def step_kernels(label: str) -> list[tuple[str, float, int]]:
        fwd, params = variants[label]
        activity = torch.profiler.ProfilerActivity
        on = activity.CUDA if DEVICE == "cuda" else activity.CPU
        with torch.profiler.profile(activities=[on]) as prof:
            for _ in range(3):
                x.grad = None
                for p in params:
                    p.grad = None
                fwd().backward(dy)
            _sync()
        return sorted(
            (
                (e.key, _time_us(e) / 3 / 1e3, e.count // 3)
                for e in prof.key_averages()
                if _time_us(e) > 0
            ),
            key=lambda t: -t[1],
        )[:10]

    kernels = step_kernels("triton preact")
    auto_kernels = step_kernels("auto preact")
    plan = front.plan(spec, (m, spec.d_in), impl="triton", saved="preact").describe()
    return dict(
        preset=name, m=m, spec=str(spec), rows=rows, grad_rel_diff_vs_eager=diffs,
        auto_grad_rel_diff_vs_eager=auto_diffs,
        auto_plan=front.plan(spec, (m, spec.d_in), device=DEVICE, saved="preact").describe(),
        policies_bitwise_equal=same, kernels_ms=kernels, auto_kernels_ms=auto_kernels, plan=plan,
        saved_mib={s: cost.saved_bytes(spec, m, s) / 2**20 for s in ("preact", "inputs")},
    )  # fmt: skip


def _time_us(event: Any) -> float:
    return event.device_time_total if DEVICE == "cuda" else event.self_cpu_time_total


def main(argv: list[str] | None = None) -> int:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="path of the JSON results")
    parser.add_argument("--presets", default="llama3-8b,hf-blog-geglu")
    parser.add_argument("--m", type=int, default=8192)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--rep-ms", type=float, default=100.0)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run (interpreter)")
    args = parser.parse_args(argv)
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("backward_probe: needs a CUDA GPU", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke)"
    results = dict(gpu=gpu, torch=torch.__version__, cases=[])
    for name in args.presets.split(","):
        results["cases"].append(_probe(name, args.m, args))
        with open(args.out, "w") as f:  # after each case: a timeout keeps what was measured
            json.dump(results, f, indent=1)
    results["total_s"] = time.perf_counter() - t0
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)

    print(f"\n{results['gpu']}, torch {results['torch']}, {results['total_s']:.0f} s")
    for case in results["cases"]:
        print(f"\n{case['preset']} M={case['m']} ({case['spec']})")
        print(f"  saved MiB: {case['saved_mib']}; policies bitwise equal: "
              f"{case['policies_bitwise_equal']}")  # fmt: skip
        worst = max(case["grad_rel_diff_vs_eager"].items(), key=lambda kv: kv[1])
        print(f"  grad rel diff vs eager: worst {worst[0]} {worst[1]:.2e}")
        worst = max(case["auto_grad_rel_diff_vs_eager"].items(), key=lambda kv: kv[1])
        print(
            f"  auto: worst grad rel diff vs eager {worst[0]} {worst[1]:.2e}; {case['auto_plan']}"
        )
        print(f"  {'impl':14s} {'fwd+bwd ms':>10s} {'fwd ms':>8s} {'TFLOP/s':>8s} "
              f"{'vs best':>8s} {'peak MiB':>9s} {'1st s':>6s}")  # fmt: skip
        for r in case["rows"]:
            fwd = f"{r['fwd_ms']:8.3f}" if r["fwd_ms"] is not None else f"{'-':>8s}"
            print(
                f"  {r['impl']:14s} {r['fwd_bwd_ms']:10.3f} {fwd} {r['tflops']:8.1f} "
                f"{r['speedup_vs_best_baseline']:7.2f}x {r['peak_mib']:9.0f} "
                f"{r['first_call_s']:6.1f}"
            )
        for label, key_ in (("triton", "kernels_ms"), ("auto", "auto_kernels_ms")):
            print(f"  {label} preact step, kernels (ms per step, launches):")
            for key, ms, count in case[key_]:
                print(f"    {ms:8.3f} x{count:<3d} {key[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
