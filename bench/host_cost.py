"""Our own host cost per call in the torch path, measured on the CPU with Triton's launches stubbed.

    python -m fusedmlp.bench.host_cost [--json PATH] [--repeats 7] [--calls 200] [--only NAME]

On the H200 the small cases are host-bound: decode at M = 16 takes ~12 µs of device time, less
than the Python of the front and Triton's launch per call. This tool isolates OUR share of that
host time — the Python from the module / front / op call down to the point where a kernel is
launched — so that it can be measured, and guarded, on any CPU machine without a GPU.

The method (run in a fresh process; `main` sets it up before anything imports Triton):
  - TRITON_INTERPRET=0, so every `@triton.jit` kernel is a `JITFunction`;
  - `JITFunction.__getitem__` (the `kernel[grid]` of every launch) is replaced by a launcher that
    counts the launch and returns (a grid callable is called with the keyword arguments, as Triton
    does) — no argument binding, no specialisation key, no compiled-kernel lookup, no driver call;
  - `runtime.kernel_device_ok` accepts CPU tensors and `front.unavailable_reason` lets the
    non-GPU-only implementations run on the CPU, while every module's INTERPRET stays False: the
    configs, grids and constexprs are the GPU's (the heuristic rules, NUM_SMS = 132, no committed
    tuned configs: no GPU is registered), not the interpreter's;
  - tensors are CPU tensors; their contents are never read (the parameters are left
    uninitialised: nothing computes);
  - torch.compile's route for our kernels (torch_impl/graph_op.py: the launches as nodes of the
    graph) runs as on the H200 up to the driver: Triton's driver answers with an sm_90 target,
    Inductor compiles the kernels it emits for sm_90 (in this process), and the compiled
    kernels' launcher (`CompiledKernel.run`) and `JITFunction.run` are stubs that count too.

What a number here INCLUDES: FusedMLP.forward, the front (signature key, cached plan, params),
the custom op's dispatch where the call goes through it, autograd's Function machinery and the
engine's backward pass for training steps, torch.compile's guards and compiled wrapper (with
the graph route, Inductor's generated call and its kernels' Python launchers), our
launchers (configs, grids, strides, constexpr dicts) and the torch ops they call (torch.empty,
reshape) — on CPU tensors, whose allocation cost differs somewhat from the CUDA caching
allocator's. What it EXCLUDES: Triton's launch path (JITFunction.run: binding, specialisation,
cache lookup, the driver's cuLaunchKernel — ~15-40 µs per launch on the H200 host, measured
apart), and everything on the GPU. The Hopper (triton_tma) paths need a CUDA device behind the
front, so the tma cases call their launchers directly (`_tma_call`: no front, no capability check
on that path; the persistent grid is the CPU's `support.num_programs`, 3 programs, which changes
no host work).

Per case: µs per call (best of `--repeats` runs of `--calls` calls; the CPU is shared, so the
minimum is the least disturbed), launches per call (counted by the stub), and µs of ours per
launch. Cases: FusedMLP inference (no_grad) at decode and field sizes, training steps (forward +
backward, x requires grad), the registered op called directly, torch.compile(FusedMLP,
fullgraph=True) inference, the factorised MLP of issue 26 (FactorisedMLP, no_grad, and
lowrank_front.lowrank_mlp; every layer at the case's rank), and the Hopper launchers
(tma/linear_act.py, tma/gated.py, tma/backward.py's mlp_backward) at hf-blog-geglu M=8192.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LAUNCHES = [0]  # the stubs' counter
# Set to a list to record each stubbed launch as (kernel name, grid, its non-tensor arguments by
# name: scalars and constexprs) — tests/test_graph_op.py compares the routes with it.
RECORD: list[tuple[str, tuple[int, ...], dict[str, Any]]] | None = None


@dataclass(frozen=True)
class Case:
    name: str
    preset: str  # a preset name, or "image-fit" (bench/train.py's ImageConfig().spec)
    m: int
    impl: str
    # "no_grad", "train", "op", "front", "compile", "compile_op" (compiled, the graph route
    # off: the opaque op, as before graph_op.py), "lowrank", "lowrank_front", "tma_*"
    mode: str
    rank: int = 0  # lowrank modes: every layer's rank


CASES: tuple[Case, ...] = (
    Case("gpt2 M=1 triton", "gpt2-mlp", 1, "triton", "no_grad"),
    Case("gpt2 M=16 triton", "gpt2-mlp", 16, "triton", "no_grad"),
    Case("gpt2 M=16 fused_decode", "gpt2-mlp", 16, "fused_decode", "no_grad"),
    Case("llama3-8b M=16 triton", "llama3-8b", 16, "triton", "no_grad"),
    Case("nerf-64x5 M=4096 fused_small", "nerf-64x5", 4096, "fused_small", "no_grad"),
    Case("train hf-blog-geglu M=64 triton", "hf-blog-geglu", 64, "triton", "train"),
    Case("train image-fit M=4096 fused_small", "image-fit", 4096, "fused_small", "train"),
    Case("op gpt2 M=16 triton", "gpt2-mlp", 16, "triton", "op"),
    Case("front.forward gpt2 M=16 triton", "gpt2-mlp", 16, "triton", "front"),
    Case("compile gpt2 M=16 triton", "gpt2-mlp", 16, "triton", "compile"),
    Case("compile gpt2 M=16 triton (op)", "gpt2-mlp", 16, "triton", "compile_op"),
    Case("compile llama3-8b M=16 fused_decode", "llama3-8b", 16, "fused_decode", "compile"),
    Case("compile llama3-8b M=16 fused_decode (op)", "llama3-8b", 16, "fused_decode", "compile_op"),
    # issue 26: the factorised MLP (FactorisedMLP, no_grad), every layer at rank 64
    Case("lowrank llama3-8b-silu M=16 r=64", "llama3-8b-silu", 16, "auto", "lowrank", 64),
    Case("lowrank llama3-8b M=16 r=64 gated", "llama3-8b", 16, "auto", "lowrank", 64),
    Case("lowrank gpt2 M=1 r=64", "gpt2-mlp", 1, "auto", "lowrank", 64),
    Case("lowrank_mlp llama3-8b M=16 r=64 gated", "llama3-8b", 16, "auto", "lowrank_front", 64),
    # the Hopper launchers (torch_impl/tma/), called directly: `auto` runs them on the H200 at
    # large M, and the Hopper training backward (tma/backward.py) is all linear_act_fwd launches
    Case(
        "tma linear_act_fwd hf-blog-geglu M=8192", "hf-blog-geglu", 8192, "triton_tma", "tma_linear"
    ),
    Case("tma gated_fwd hf-blog-geglu M=8192", "hf-blog-geglu", 8192, "triton_tma", "tma_gated"),
    Case(
        "tma mlp_backward hf-blog-geglu M=8192", "hf-blog-geglu", 8192, "triton_tma", "tma_backward"
    ),
)


# ---- the stub ------------------------------------------------------------------------------------
def install_stub() -> None:
    """Set the process up as the module docstring says. Must run before triton is imported."""
    if "triton" in sys.modules or "fusedmlp.torch_impl" in sys.modules:
        raise RuntimeError(
            "host_cost: triton or fusedmlp.torch_impl is already imported; run this tool in a "
            "fresh process (python -m fusedmlp.bench.host_cost)"
        )
    os.environ["TRITON_INTERPRET"] = "0"
    from triton.runtime.jit import JITFunction

    def stub_getitem(self: Any, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            LAUNCHES[0] += 1
            if callable(grid):  # a grid lambda reads the launch's meta-parameters
                grid(kwargs)
            if RECORD is not None:
                _record(self.fn.__name__, grid, _bind(self, args, kwargs))

        return launch

    JITFunction.__getitem__ = stub_getitem  # type: ignore[method-assign]
    _stub_compiled_launches()

    from fusedmlp.torch_impl import front, runtime

    runtime.kernel_device_ok = lambda tensor: True
    unavailable = front.unavailable_reason

    def available_on_cpu(impl: str, device: str = "cpu") -> str | None:
        reason = unavailable(impl, device)
        if reason is not None and "TRITON_INTERPRET=1" in reason:
            return None  # the stub takes the launch: CPU tensors are fine
        return reason

    front.unavailable_reason = available_on_cpu


_OPTIONS = ("num_warps", "num_stages", "num_ctas", "launch_pdl")


def _bind(kernel: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """A launch's arguments by parameter name, launch options left out."""
    bound = dict(zip(kernel.arg_names, args, strict=False)) | kwargs  # kwargs: the rest
    return {k: v for k, v in bound.items() if k not in _OPTIONS}


def _record(name: str, grid: Any, arguments: dict[str, Any]) -> None:
    """Appends (name, 3-D grid, the non-tensor arguments by name) to RECORD."""
    import torch

    grid = tuple(grid) + (1,) * (3 - len(grid))
    assert RECORD is not None
    scalars = {k: v for k, v in arguments.items() if not isinstance(v, torch.Tensor)}
    RECORD.append((name, grid, scalars))


class _Sm90Driver:
    """What torch.compile asks Triton's driver while it traces and compiles user kernels: the
    target (an H200's), a device and a stream. Nothing is ever launched through it."""

    def get_current_target(self) -> Any:
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


def _stub_compiled_launches() -> None:
    """torch.compile's route for our kernels (torch_impl/graph_op.py) on the CPU: its trace reads
    each kernel's TTIR for the tensors it writes (for the H200's target), Inductor compiles the
    kernels it emits for sm_90 (ptxas runs: a real compile), and their launches — from
    Inductor's generated wrapper (`CompiledKernel.run`), or from the graph node's eager
    implementation (`JITFunction.run`, the aot_eager backend) — are counted and returned from.
    The CPU tensors' device makes Inductor emit a CPU wrapper, whose launch calls are the GPU
    wrapper's but for the stream."""
    import torch._inductor.config
    import triton
    from torch._inductor.runtime import triton_heuristics
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime.jit import JITFunction

    torch._inductor.config.compile_threads = 1  # in this process: a worker has none of this
    sm90 = _Sm90Driver()
    triton.runtime.driver.set_active(sm90)
    triton_heuristics.GPUTarget = lambda *args: sm90.get_current_target()
    triton_heuristics.triton_helpers.set_driver_to_cpu = lambda: None

    def stub_run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        LAUNCHES[0] += 1
        if RECORD is not None:
            _record(self.fn.__name__, grid, _bind(self, args, kwargs))

    JITFunction.run = stub_run  # type: ignore[method-assign]

    def stub_handles(self: Any) -> None:
        if self._run is not None:
            return
        self.module, self.function = None, 0
        self.n_regs, self.n_spills, self.n_max_threads = 0, 0, 1024
        name, names = self.name, self.src.fn.arg_names
        # The compiled constants (constexprs, and ints specialised to 1) by name, as compiled.
        constants = {names[k[0]] if isinstance(k, tuple) else k: v for k, v in
                     self.src.constants.items()}  # fmt: skip

        def run(grid_x: int, grid_y: int, grid_z: int, *rest: Any) -> None:
            LAUNCHES[0] += 1
            if RECORD is not None:  # rest: stream, function, metadata, hooks (5), then the args
                args = dict(zip(names, rest[6:], strict=True))
                _record(name, (grid_x, grid_y, grid_z), args | constants)

        self._run = run

    CompiledKernel._init_handles = stub_handles  # type: ignore[method-assign]


# ---- the cases -----------------------------------------------------------------------------------
def _spec(preset: str):
    if preset == "image-fit":
        from fusedmlp.bench.train import ImageConfig

        return ImageConfig().spec
    from fusedmlp.common import get_preset

    if preset == "llama3-8b-silu":  # llama3-8b's widths, plain (the probe's silu layer)
        return get_preset("llama3-8b").spec.replace(activation="silu")
    return get_preset(preset).spec


def _lowrank_call(case: Case) -> Callable[[], Any]:
    """A FactorisedMLP call (mode "lowrank") or lowrank_front.lowrank_mlp ("lowrank_front")."""
    import torch

    from fusedmlp.common.lowrank_spec import LowRankSpec
    from fusedmlp.torch_impl import lowrank_front
    from fusedmlp.torch_impl.lowrank_module import FactorisedMLP

    spec = _spec(case.preset)
    lspec = LowRankSpec(spec, (case.rank,) * spec.num_layers)
    module = FactorisedMLP(lspec)  # uninitialised: nothing reads them
    x = torch.empty(case.m, spec.d_in, dtype=getattr(torch, spec.dtype))
    if case.mode == "lowrank_front":
        named = module.params()
        return lambda: lowrank_front.lowrank_mlp(x, named, lspec, impl=case.impl)
    return lambda: module(x)


def _tma_call(case: Case) -> Callable[[], Any]:
    """A call of a Hopper launcher (torch_impl/tma/) on CPU tensors, past every capability check:
    "tma_linear" the last layer's linear_act_fwd, "tma_gated" the first layer's gated_fwd (the
    training forward's: storing the pre-activation), "tma_backward" tma/backward.py's
    mlp_backward from the Hopper saving forward's residuals (made once, not timed)."""
    import torch

    from fusedmlp.common.packing import packed_width
    from fusedmlp.torch_impl import FusedMLP, backward
    from fusedmlp.torch_impl.tma import backward as tma_backward
    from fusedmlp.torch_impl.tma import gated as tma_gated
    from fusedmlp.torch_impl.tma import linear_act as tma_linear

    spec = _spec(case.preset)
    dtype = getattr(torch, spec.dtype)
    layers = spec.layers()
    precision = spec.fp32_precision
    if case.mode == "tma_backward":
        params = FusedMLP(spec, impl="triton", seed=None).requires_grad_(False).packed_params()
        x = torch.empty(case.m, spec.d_in, dtype=dtype)
        dy = torch.empty(case.m, spec.d_out, dtype=dtype)
        _, res = backward.forward_saving(x, params, spec, saved="preact", hopper=True)
        return lambda: tma_backward.mlp_backward(dy, res, params, spec, saved="preact")
    family = "gated" if case.mode == "tma_gated" else "linear_act"
    layer = next(la for la in layers if la.gated == (family == "gated"))
    cfg = backward._heuristic(
        family, case.m, layer.d_out, layer.d_in, spec.dtype, precision, False, True
    )
    x = torch.empty(case.m, layer.d_in, dtype=dtype)
    if family == "gated":
        wv = torch.empty(layer.d_in, packed_width(layer.d_out), dtype=dtype)
        return lambda: tma_gated.gated_fwd(
            x, wv, None, n=layer.d_out, activation=layer.activation, config=cfg,
            fp32_precision=precision, store_preact=True,
        )  # fmt: skip
    w = torch.empty(layer.d_in, layer.d_out, dtype=dtype)
    return lambda: tma_linear.linear_act_fwd(
        x, w, None, None, activation=layer.activation, config=cfg, fp32_precision=precision
    )


def make_call(case: Case) -> Callable[[], Any]:
    """A zero-argument function doing one call (or one training step) of `case`."""
    import torch

    from fusedmlp.torch_impl import FusedMLP, front

    if case.mode in ("lowrank", "lowrank_front"):
        return _lowrank_call(case)
    if case.mode.startswith("tma_"):
        return _tma_call(case)
    spec = _spec(case.preset)
    dtype = getattr(torch, spec.dtype)
    module = FusedMLP(spec, impl=case.impl, seed=None)  # uninitialised: nothing reads them
    x = torch.empty(case.m, spec.d_in, dtype=dtype)
    if case.mode == "train":
        x.requires_grad_()
        dy = torch.empty(case.m, spec.d_out, dtype=dtype)
        params = list(module.parameters())

        def step() -> None:
            x.grad = None
            for p in params:
                p.grad = None
            module(x).backward(dy)

        return step
    module.requires_grad_(False)
    if case.mode == "op":
        listed = [module._parameters[n] for n in module._names]
        args = (x, listed, module._spec_json_default, case.impl, module._config_json, None)
        op = torch.ops.fusedmlp.mlp.default
        return lambda: op(*args)
    if case.mode == "front":
        named = module.packed_params()
        return lambda: front.forward(x, named, spec, impl=case.impl)
    if case.mode in ("compile", "compile_op"):
        compiled = torch.compile(module, fullgraph=True)
        return lambda: compiled(x)
    return lambda: module(x)


def measure(case: Case, repeats: int, calls: int) -> dict[str, Any]:
    from fusedmlp.torch_impl import graph_op

    takes_call = graph_op.takes_call
    if case.mode == "compile_op":  # read at trace time, and guarded on: off for the whole case
        graph_op.takes_call = lambda *args: False
    try:
        return _measure(case, repeats, calls)
    finally:
        graph_op.takes_call = takes_call


def _measure(case: Case, repeats: int, calls: int) -> dict[str, Any]:
    import torch

    call = make_call(case)
    with torch.no_grad() if case.mode != "train" else torch.enable_grad():
        for _ in range(20):  # first calls: plans, caches, compilation
            call()
        LAUNCHES[0] = 0
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(calls):
                call()
            runs.append((time.perf_counter() - t0) / calls * 1e6)
    launches = LAUNCHES[0] / (repeats * calls)
    best = min(runs)
    return {
        **case.__dict__,
        "us_per_call": round(best, 2),
        "us_per_call_median": round(sorted(runs)[len(runs) // 2], 2),
        "launches_per_call": launches,
        "us_per_launch": round(best / launches, 2) if launches else None,
    }


def profile(case: Case, calls: int, top: int) -> None:
    """cProfile's `top` functions by own time over `calls` calls of `case` (to stderr)."""
    import cProfile
    import pstats

    import torch

    call = make_call(case)
    with torch.no_grad() if case.mode != "train" else torch.enable_grad():
        for _ in range(20):
            call()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            call()
        profiler.disable()
    pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(top)


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| case | µs/call (best) | median | launches | µs/launch |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        per = f"{r['us_per_launch']:.1f}" if r["us_per_launch"] is not None else "-"
        lines.append(
            f"| {r['name']} | {r['us_per_call']:.1f} | {r['us_per_call_median']:.1f} | "
            f"{r['launches_per_call']:g} | {per} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per case (best kept)")
    parser.add_argument("--calls", type=int, default=200, help="calls per timed run")
    parser.add_argument("--only", action="append", help="run the cases whose name contains this")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N",
        help="after timing, print cProfile's N functions by own time for each case",
    )  # fmt: skip
    args = parser.parse_args(argv)
    install_stub()
    from fusedmlp.bench.env import environment

    cases = [c for c in CASES if not args.only or any(s in c.name for s in args.only)]
    rows = []
    for case in cases:
        calls = args.calls if not case.mode.startswith("compile") else max(args.calls // 2, 1)
        rows.append(measure(case, args.repeats, calls))
        print(f"{case.name}: {rows[-1]['us_per_call']:.1f} µs/call", file=sys.stderr, flush=True)
        if args.profile:
            profile(case, args.calls, args.profile)
    print(table(rows))
    if args.json:
        result = {
            "method": "stubbed Triton launches on the CPU (bench/host_cost.py docstring)",
            "environment": environment(),
            "repeats": args.repeats,
            "calls": args.calls,
            "cases": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
