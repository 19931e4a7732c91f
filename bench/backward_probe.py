"""Forward+backward probe of the torch stack on one GPU (issue 24): a thin front of `fusedmlp bench
--backward` (bench/bench_backward.py, whose timing, parity gate, floor and memory it uses) over
both `saved=` policies, plus the kernel table of one step of each of our rows.

    python bench/backward_probe.py OUT.json [--presets llama3-8b,hf-blog-geglu] [--m 8192]
                                            [--no-compile] [--device cpu]

Rows: torch:triton (the portable kernels), torch:auto (on Hopper the TMA backward), the eager
baseline (torch autograd through `baselines.eager`) and torch.compile of it; one step = forward
and the gradients of Σ y·dy (x requires grad, grads dropped before each step). OUT.json is a
fusedmlp results file (`fusedmlp report OUT.json` renders it) with `kernels` added: per case and
policy, each of our rows' kernels over one step (ms per step, launches), by torch.profiler.
`--device cpu`: a smoke run under Triton's interpreter (the kernel rows are gated, not timed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fusedmlp.bench import bench_backward, cli, providers
from fusedmlp.bench import report as rep
from fusedmlp.bench.cases import Case
from fusedmlp.common import get_preset
from fusedmlp.common.config import SAVED_POLICIES
from fusedmlp.common.presets import DEFAULT_CPU_PRESET

KERNEL_ROWS = ("triton", "auto")
STEPS = 3


def kernel_table(step: Any, device: str, steps: int = STEPS) -> list[tuple[str, float, int]]:
    """The ten costliest kernels (CPU ops on a CPU) of `step` over `steps` calls: (name, ms per
    step, launches per step)."""
    import torch

    activity = torch.profiler.ProfilerActivity
    gpu = device == "cuda"
    with torch.profiler.profile(activities=[activity.CUDA if gpu else activity.CPU]) as prof:
        for i in range(steps):
            step(i)
        if gpu:
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = e.device_time_total if gpu else e.self_cpu_time_total
        if us > 0:
            rows.append((e.key, us / steps / 1e3, e.count // steps))
    return sorted(rows, key=lambda r: -r[1])[:10]


def _kernels(items: list, device: str) -> list[dict[str, Any]]:
    out = []
    for label, spec, m in items:
        case = Case(spec, m, device)
        inputs = bench_backward._Inputs(case)
        for saved in SAVED_POLICIES:
            for impl in KERNEL_ROWS:
                step, clear = bench_backward.torch_step(
                    inputs.torch_sets(packed=True), spec, impl, inputs.dy, saved=saved
                )
                step(0)  # compiled and warm
                table = kernel_table(step, device)
                clear()
                out.append(dict(preset=label, m=m, saved=saved, impl=impl, kernels_ms=table))
        case.release()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="path of the JSON results")
    parser.add_argument("--presets", help="default llama3-8b,hf-blog-geglu (a CPU: cpu-small)")
    parser.add_argument("--m", type=int, help="default 8192 (a CPU: 8)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--device", default=None, help="cpu: a smoke run (interpreter)")
    args = parser.parse_args(argv)
    device = cli.resolve_device(args.device)
    impls = "torch:triton,torch:auto,torch:eager" + ("" if args.no_compile else ",torch:compile")
    names = args.presets or (DEFAULT_CPU_PRESET if device == "cpu" else "llama3-8b,hf-blog-geglu")
    m = args.m or (8 if device == "cpu" else 8192)
    items = [(name, get_preset(name).spec, m) for name in names.split(",")]
    result = bench_backward.run_policies(
        items, providers.select(impls), device, quick=device == "cpu"
    )
    results = cli._results("bench_backward", result)
    results["kernels"] = _kernels(items, device)
    rep.write_json(results, args.out)
    console = cli._console()
    rep.print_tables(console, rep.bench_backward_tables(result))
    for entry in results["kernels"]:
        console.print(
            f"{entry['preset']} M={entry['m']} torch:{entry['impl']} saved={entry['saved']}: "
            "kernels (ms per step, launches)"
        )
        for key, ms, count in entry["kernels_ms"]:
            console.print(f"  {ms:8.3f} x{count:<3d} {key[:90]}")
    return 1 if any(cli._failed(r) for c in result["cases"] for r in c["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
