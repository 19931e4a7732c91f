"""GPU probe: torch's fused_small at 128 wide through its Mosaic GPU sibling (JAX's kernel on torch
tensors, torch_impl/cross/fused_small.py) against its own Triton kernel, over M — where the
sibling's host cost per call outweighs its faster kernel.

    python3 bench/sibling_route_probe.py OUT.json [--cases w128x8,w128x2] [--m 16384,...]
        [--smoke]

Per (case, M, route), with the harness's definitions (bench/timing.measure, L2 flushed before each
device-timed call): device µs, throughput µs (calls back to back), host issue µs (the harness's:
calls issued ten at a time, so a launch that waits for the GPU shows here), and the idle issue:
one call's host time with the GPU idle (synchronised before it), the pure host cost. For the
sibling the idle issue is split into torch's side (padding, the compiled-kernel lookup:
`operands` + `compiled_kernel`) and the kernel call (`linear_act._launch`: since cd416db the
direct launch of cross/launcher.py — the outputs' allocation, the pointers and the Mosaic GPU
launch on the current stream; as_torch_kernel's callable where a module is not plannable). Routes:
`sibling` (the plan's MosaicSmallConfig) and `triton` (the plan's SmallConfig). Bits
of the two compared. `--smoke`: the Triton route only, interpreted on a CPU, nothing timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from fusedmlp.common import MLPSpec, init_params, make_input
from fusedmlp.common.tiling import fused_small_config

CASES = {
    "w128x8": MLPSpec((128,) * 9, "relu", False, "float16"),
    "w128x2": MLPSpec((128,) * 3, "relu", False, "float16"),
    "w128gelu": MLPSpec((128,) * 5, "gelu_tanh", True, "bfloat16"),
}
DEFAULT_M = (4096, 16384, 65536, 262144, 1048576)
IDLE_REPS = 30


def _idle_issue(fn: Any, sync: Any, reps: int = IDLE_REPS) -> float:
    """Median host time of one call issued with the GPU idle (µs)."""
    samples = []
    for i in range(reps):
        sync()
        t0 = time.perf_counter()
        fn(i)
        samples.append(time.perf_counter() - t0)
    sync()
    return statistics.median(samples) * 1e6


def _route_row(name, spec, m, params, xs, route, cfg, smoke, sync) -> tuple[dict, Any]:
    """One route's row at one M, and its output."""
    from fusedmlp.bench import timing
    from fusedmlp.torch_impl import fused_small as tfs

    def fn(i: int) -> Any:
        return tfs.fused_small_fwd(xs[i % 2], params, spec, config=cfg)

    out = fn(0)
    sync()
    row: dict[str, Any] = {"case": name, "m": m, "route": route, "config": str(cfg)}
    if not smoke:
        measured = timing.measure("torch", "cuda", fn, lambda o: sync())
        for key in ("time", "throughput", "host_issue"):
            row[f"{key}_us"] = measured[key]["median"] * 1e6
    row["idle_issue_us"] = _idle_issue(fn, sync, 3 if smoke else IDLE_REPS)
    if route == "sibling":
        from fusedmlp.torch_impl.cross import fused_small as cfs
        from fusedmlp.torch_impl.cross import linear_act as cla

        kernel, ops, _ = cfs.prepared(xs[0], params, spec, cfg)  # compiled by the first call

        def torch_side(i: int) -> Any:
            return cfs.prepared(xs[i % 2], params, spec, cfg)

        row["idle_torch_side_us"] = _idle_issue(torch_side, sync)
        row["idle_kernel_call_us"] = _idle_issue(
            lambda i: cla._launch(kernel, ops, ops[0].device), sync
        )
    return row, out


def run(cases: list[str], ms: list[int], smoke: bool) -> list[dict[str, Any]]:
    import torch

    device = "cpu" if smoke else "cuda"
    sync = torch.cuda.synchronize if not smoke else (lambda: None)
    rows = []
    for name in cases:
        spec = CASES[name]
        params = {k: torch.from_numpy(v).to(device) for k, v in init_params(spec, 3).items()}
        for m in ms:
            xs = [torch.from_numpy(make_input(spec, m, seed=s)).to(device) for s in range(2)]
            routes: dict[str, Any] = {"triton": fused_small_config(spec, m, interpret=smoke)}
            if not smoke:
                from fusedmlp.torch_impl.cross import fused_small as cfs

                routes["sibling"] = cfs.sibling_config(spec, m)
            outs = {}
            for route, cfg in routes.items():
                row, outs[route] = _route_row(name, spec, m, params, xs, route, cfg, smoke, sync)
                rows.append(row)
                print(json.dumps(row), flush=True)
            if len(outs) == 2:
                a, b = (outs[r].view(torch.int16) for r in ("triton", "sibling"))
                print(f"{name} M={m}: same bits {bool(torch.equal(a, b))}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--cases", default="w128x8,w128x2")
    parser.add_argument("--m", default=",".join(map(str, DEFAULT_M)))
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    ms = [int(v) for v in args.m.split(",")]
    rows = run(args.cases.split(","), [min(m, 130) for m in ms] if args.smoke else ms, args.smoke)
    args.out.write_text(json.dumps({"rows": rows}, indent=1))
    for r in rows:
        cols = [f"{k} {v:.1f}" for k, v in r.items() if k.endswith("_us")]
        print(f"{r['case']:9} M={r['m']:>8} {r['route']:8} " + "  ".join(cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
