"""Where one torch training step's time goes: host, device, and the CUDA runtime calls between.

    python bench/step_profile.py OUT.json [--preset hf-blog-geglu] [--m 8192] [--impl triton]
                                          [--steps 20]

A step is FusedMLP's forward and backward (x requires grad, grads reset to None), as
bench/backward_probe.py times it. Measured three ways, to tell a host-bound step from a serialised
one:
  - issue: host seconds to enqueue N steps back to back, no synchronisation inside;
  - wall: the same N steps, synchronised at the end only (≈ max(issue, device) when the host runs
    ahead of the GPU; ≈ issue + device when something in the step waits for the GPU);
  - device: the sum of the step's kernel durations (torch.profiler, CUDA activity).
Then cProfile's Python functions by own time over the N steps, and the CUDA runtime API calls of
one profiled step (name, count, host µs): a cudaStreamSynchronize, cudaMemcpy D→H, cudaFree or
cudaEventSynchronize there names the wait; the functions say where the host time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from typing import Any

import torch

from fusedmlp.common import get_preset
from fusedmlp.torch_impl import FusedMLP

CUPTI_OWN = ("Activity Buffer Request",)
SYNC_NAMES = ("Synchronize", "Memcpy", "cudaFree", "cudaMalloc", "cudaHostAlloc", "Query")


def _step(module: FusedMLP, x: torch.Tensor, dy: torch.Tensor) -> None:
    x.grad = None
    for p in module.parameters():
        p.grad = None
    module(x).backward(dy)


def profile(preset: str, m: int, impl: str, steps: int) -> dict[str, Any]:
    spec = get_preset(preset).spec
    dtype = getattr(torch, spec.dtype)
    module = FusedMLP(spec, impl=impl, device="cuda", seed=0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, spec.d_in, device="cuda", dtype=dtype, generator=gen).requires_grad_()
    dy = torch.randn(m, spec.d_out, device="cuda", dtype=dtype, generator=gen)
    for _ in range(3):  # compile, autotune, first allocations
        _step(module, x, dy)
    torch.cuda.synchronize()

    t0 = time.perf_counter()
    for _ in range(steps):
        _step(module, x, dy)
    issue = (time.perf_counter() - t0) / steps
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps

    python = cProfile.Profile()  # the Python functions the host time is spent in
    python.enable()
    for _ in range(steps):
        _step(module, x, dy)
    python.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(python, stream=text).sort_stats("tottime").print_stats(25)
    python_top = [line for line in text.getvalue().splitlines() if line.strip()][-26:]

    activity = torch.profiler.ProfilerActivity
    with torch.profiler.profile(activities=[activity.CPU, activity.CUDA]) as prof:
        for _ in range(3):
            _step(module, x, dy)
        torch.cuda.synchronize()
    events = prof.key_averages()
    # Kernels only: an autograd Function's range (_EagerTrain, _EagerTrainBackward) carries the
    # device time of the kernels launched inside it as well, and CUPTI's own "Activity Buffer
    # Request" is not the step's (summing every event counted each kernel twice: the H200 run at
    # 08f6c10 read 3,664 µs for nerf's 1,759 µs of kernels).
    on_device = [
        e
        for e in events
        if e.device_type == torch.autograd.DeviceType.CUDA and e.key not in CUPTI_OWN
    ]
    device_us = sum(e.self_device_time_total for e in on_device) / 3
    runtime = sorted(
        (
            (e.key, e.count // 3, e.self_cpu_time_total / 3)
            for e in events
            if e.key.startswith("cuda") or e.key.startswith("cu")
        ),
        key=lambda t: -t[2],
    )
    waits = [r for r in runtime if any(s in r[0] for s in SYNC_NAMES)]
    cpu_ops = sorted(
        ((e.key, e.count // 3, e.self_cpu_time_total / 3) for e in events),
        key=lambda t: -t[2],
    )[:25]
    kernels = sorted(
        ((e.key, e.count // 3, e.self_device_time_total / 3) for e in on_device),
        key=lambda t: -t[2],
    )[:15]
    return dict(
        preset=preset, m=m, impl=impl, steps=steps,
        issue_us=issue * 1e6, wall_us=wall * 1e6, device_us=device_us,
        runtime_calls=runtime[:20], waits=waits, cpu_ops=cpu_ops, kernels=kernels,
        python_top=python_top,
    )  # fmt: skip


def _table(r: dict[str, Any]) -> str:
    lines = [
        f"{r['preset']} M={r['m']} impl={r['impl']}: issue {r['issue_us']:.0f} µs/step, "
        f"wall {r['wall_us']:.0f} µs/step, device {r['device_us']:.0f} µs/step",
        "  waits (runtime calls that can block): "
        + (", ".join(f"{k} ×{c} {t:.0f} µs" for k, c, t in r["waits"]) or "none"),
        "  runtime calls: " + ", ".join(f"{k} ×{c} {t:.0f} µs" for k, c, t in r["runtime_calls"]),
        "  top host self time:",
        *(f"    {t:9.1f} µs ×{c:<4} {k[:90]}" for k, c, t in r["cpu_ops"]),
        "  kernels:",
        *(f"    {t:9.1f} µs ×{c:<4} {k[:90]}" for k, c, t in r["kernels"]),
        f"  Python by own time ({r['steps']} steps):",
        *(f"    {line[:150]}" for line in r["python_top"]),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="path of the JSON results")
    parser.add_argument("--preset", default="hf-blog-geglu")
    parser.add_argument("--m", type=int, default=8192)
    parser.add_argument("--impl", default="triton,auto", help="comma-separated")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    results = [profile(args.preset, args.m, impl, args.steps) for impl in args.impl.split(",")]
    for r in results:
        print(_table(r))
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
