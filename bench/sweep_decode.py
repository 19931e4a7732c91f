"""Issue 22 on the H200 in one call: decode and narrow MLPs against their floors and baselines.

    python -m fusedmlp.bench.sweep_decode OUT.json [--budget-s 170] [--sections ...]
    python -m fusedmlp.bench.sweep_decode OUT.json --compile-only     (a CPU: sm_90 compile report)

What it measures, in priority order (each step is skipped, and says so, once the time budget is
spent, so the call always finishes and writes its JSON):

1. ceilings: a 1 GiB device copy (read + write, by an elementwise kernel: the floors' rate, as in
   the harness) and a 1 GiB read (torch.sum), timed like the kernels;
2. llama3-8b decode (4096 -> 14336 -> 4096 SwiGLU bf16), M in {1, 2, 4, 8, 16, 32, 64}: torch
   fused_decode, torch eager, JAX fused_decode, XLA;
3. nerf-64x5 fp16 at 2,097,152 rows: torch fused_small, eager; JAX fused_small, XLA;
4. torch fused_decode variants on llama3-8b at M in {1, 16, 64} (programmatic dependent launch,
   splits of the hidden, hidden blocks, stages, warps): what the default config should become;
5. gpt-mlp (4096 -> 16384 -> 4096 gelu_tanh, bias) and hf-blog-geglu (768 -> 3072 -> 768
   geglu_tanh) decode, M in {1, 16, 64}: the same four providers;
6. the narrow sweep subset: relu fp16, no bias, widths 16, 32, 64, 128 x depths 2, 4, 8 layers at
   M = 1,048,576: the same four providers;
7. torch.compile baselines for every case above (compiling is what costs the most time);
8. torch fused_small variants (rows, stages, programs per SM, hoisted vs streamed weights) on
   the cells `--small-cells` names (default: nerf-64x5 and the 128-wide depth-8 cell).

Timing. torch: `bench/timing.py time_cudagraph` (do_bench_cudagraph's method, thread-local capture:
median of 10 replays of a CUDA graph of back-to-back calls), the call rotating over copies of its
inputs so that the bytes one graph reads exceed the 60 MB L2 (decode: the weights, copied where one
set is smaller than ~120 MB; narrow: x). JAX: one jitted function runs the call once on each
rotating input set; it is dispatched R times without waiting (asynchronous dispatch, shorter than
the GPU work of one dispatch: ~30 us against >= 80 us) and timed by wall clock up to
`block_until_ready`, median of 5 runs, per call. Both are
device-bound times of the call, launch seams included.

Every row is checked against the float64 reference (common/reference.py; narrow cases on their
first and last 2048 rows) under the tolerance policy, and carries its error. Rows report the time,
the floor (the case's minimum bytes, weights + x + y, at the copy rate measured in this run) and
the percentage of it reached, and for decode the weight bytes' share of the copy ceiling. The
speedup column divides the best baseline of the row's stack (torch: eager or compile; JAX: XLA) by
the row's time. A compact table ends the output; the JSON has every row, the ceilings, what was
skipped and why, and the environment.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

# JAX shares the GPU with torch here: no preallocation of 75 % of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np

from fusedmlp.common import MLPSpec, cost, reference
from fusedmlp.common.dtypes import numpy_dtype
from fusedmlp.common.presets import get_preset
from fusedmlp.common.tiling import (
    SMEM_PER_SM,
    DecodeConfig,
    SmallConfig,
    fused_decode_config,
    fused_small_config,
    padded_width,
    small_hoist,
    small_smem_bytes,
)
from fusedmlp.common.tolerance import compare

DECODE_M = {
    "llama3-8b": (1, 2, 4, 8, 16, 32, 64),
    "gpt-mlp": (1, 16, 64),
    "hf-blog-geglu": (1, 16, 64),
}
DECODE_M_ALL = (1, 2, 4, 8, 16, 32, 64)
VARIANT_M = (1, 16, 64)
NERF_M = 2_097_152
NARROW_M = 1_048_576
NARROW_WIDTHS = (16, 32, 64, 128)
NARROW_DEPTHS = (2, 4, 8)
ROTATE_BYTES = 120e6  # inputs one graph (or one jitted loop) cycles through: twice the L2
CHECK_ROWS = 2048
SECTIONS = ("llama", "nerf", "variants", "decode", "narrow", "compile", "small-variants")
# --dry-run: the same code on a CPU, tiny shapes, kernels under their interpreters, wall-clock
# timing: a check of this script, not a measurement (tests/test_fused_decode.py runs it).
DRY = {"on": False}


def _device() -> str:
    return "cpu" if DRY["on"] else "cuda"


def _dry_spec(spec: MLPSpec) -> MLPSpec:
    """A small stand-in of a spec for --dry-run (same activation, bias, dtype and depth)."""
    widths = tuple(
        min(w, 48) if i in (0, len(spec.widths) - 1) else min(w, 80)
        for i, w in enumerate(spec.widths)
    )
    return spec.replace(widths=widths)


# ---- bookkeeping ---------------------------------------------------------------------------------
class Run:
    """Rows, skips and the time budget of one sweep."""

    def __init__(
        self,
        budget_s: float,
        sections: tuple[str, ...],
        small_cells: tuple[str, ...] = ("nerf", "128x8"),
        jax_variants: bool = False,
        variants: tuple[str, ...] = (),
        variant_m: tuple[int, ...] = VARIANT_M,
        variant_preset: str = "llama3-8b",
    ):
        self.start = time.monotonic()
        self.variant_m = variant_m  # the M values of the fused_decode variants
        self.variant_preset = variant_preset  # and their preset
        self.small_cells = small_cells  # the cells of the small-variants section
        self.jax_variants = jax_variants  # their configs through the JAX twin as well
        self.variants = variants  # only these variants of each cell (empty: all)
        self.deadline = self.start + budget_s
        self.sections = sections
        self.rows: list[dict[str, Any]] = []
        self.skipped: list[str] = []
        self.ceilings: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def allowed(self, what: str, section: str) -> bool:
        if section not in self.sections:
            return False
        if time.monotonic() > self.deadline:
            self.skipped.append(f"{what}: time budget spent ({self.elapsed():.0f} s)")
            return False
        return True

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        t = row.get("time_us")
        err = row.get("error")
        check = row.get("check", {})
        print(
            f"[{self.elapsed():6.1f} s] {row['case']:<30} {row['provider']:<18} "
            f"{row.get('variant', ''):<14} {row.get('config', ''):<40} "
            + (f"{t:9.1f} us {row['pct_floor']:5.1f}% floor" if t is not None else f"ERROR {err}")
            + (
                f"  {'ok' if check.get('passed') else 'FAIL'} rel {check.get('rel_fro', 0):.1e}"
                if check
                else ""
            ),
            flush=True,
        )


def case_name(spec: MLPSpec, m: int, preset: str | None = None) -> str:
    if preset:
        return f"{preset} M={m}"
    return f"{spec.widths[0]}x{spec.num_layers} {spec.activation} {spec.dtype} M={m}"


# ---- inputs --------------------------------------------------------------------------------------
def torch_params(spec: MLPSpec, seed: int) -> dict[str, Any]:
    """init_params' distribution (N(0, 1)/sqrt(fan_in), spec dtype), generated on the GPU."""
    import torch

    from fusedmlp.common.params import param_shapes

    gen = torch.Generator(device=_device()).manual_seed(seed)
    dtype = getattr(torch, spec.dtype)
    out = {}
    for name, shape in param_shapes(spec).items():
        fan_in = shape[0] if len(shape) == 2 else spec.widths[int(name[1:])]
        t = torch.randn(shape, generator=gen, device=_device(), dtype=torch.float32)
        out[name] = t.div_(math.sqrt(fan_in)).to(dtype)
    return out


def torch_input(spec: MLPSpec, m: int, seed: int) -> Any:
    import torch

    gen = torch.Generator(device=_device()).manual_seed(seed)
    x = torch.randn(m, spec.d_in, generator=gen, device=_device())
    return x.to(getattr(torch, spec.dtype))


def to_host(t: Any, dtype: str) -> np.ndarray:
    """A torch tensor as a NumPy array of the spec dtype (bfloat16 through its bits)."""
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(numpy_dtype("bfloat16"))
    return t.numpy().astype(numpy_dtype(dtype), copy=False)


def as_float(a: Any) -> np.ndarray:
    """Any output (torch or jax) as float32 NumPy."""
    if type(a).__module__.startswith("torch"):
        return a.detach().float().cpu().numpy()
    return np.asarray(a).astype(np.float32)


def to_jax(t: Any) -> Any:
    import jax

    return jax.dlpack.from_dlpack(t)


def copies(n_bytes: int) -> int:
    """How many copies of an input set make one rotation exceed ROTATE_BYTES (at most 8)."""
    return int(min(8, max(1, math.ceil(ROTATE_BYTES / max(1, n_bytes)))))


# ---- timing --------------------------------------------------------------------------------------
def time_torch(fn: Callable[..., Any], args: list[tuple[Any, ...]], rep_ms: int = 20) -> float:
    """Median per-call time (us) of fn over a CUDA graph of back-to-back calls, rotating args
    (bench/timing.py `time_cudagraph`: a thread-local capture, which the JAX rows of the same
    process cannot invalidate)."""
    state = {"i": 0}

    def call() -> Any:
        a = args[state["i"] % len(args)]
        state["i"] += 1
        return fn(*a)

    if DRY["on"]:
        start = time.perf_counter()
        for _ in range(2):
            call()
        return 1e6 * (time.perf_counter() - start) / 2
    from fusedmlp.bench.timing import time_cudagraph

    return 1e6 * time_cudagraph(lambda i: call(), rep_ms=rep_ms).median


def time_jax(fn: Callable[..., Any], args: list[tuple[Any, ...]], calls: int) -> tuple[float, Any]:
    """Per-call time (us) of at least `calls` calls back to back: one jitted function runs fn once
    on each of the rotating argument sets (so each kernel is compiled once per set, not once per
    call), dispatched repeatedly without waiting (dispatch is asynchronous and shorter than the
    GPU work of one dispatch), then one block_until_ready; median of 5 runs. Returns the time and
    the output of the first argument set."""
    import jax

    looped = jax.jit(lambda all_args: [fn(*a) for a in all_args])
    outs = jax.block_until_ready(looped(args))  # compiles, warms up
    reps = max(1, math.ceil(calls / len(args)))
    times = []
    for _ in range(1 if DRY["on"] else 5):
        start = time.perf_counter()
        for _ in range(reps):
            last = looped(args)
        jax.block_until_ready(last)
        times.append((time.perf_counter() - start) / (reps * len(args)))
    return 1e6 * statistics.median(times), outs[0]


def measure(
    run: Run, case: Case, base: dict[str, Any], timer: Callable[[], tuple[float, Any]]
) -> None:
    """Time one provider, check its output, add the row (an error becomes the row's result)."""
    row = dict(base)
    try:
        t_us, out = timer()
        got = case.checked(out)
        row["time_us"] = t_us
        row["pct_floor"] = 100.0 * row["floor_us"] / t_us
        if row["pct_floor"] > 100.0:  # no time below the physical floor is a measurement
            row["invalid"] = "faster than its floor: the copy ceiling of this run was measured low"
        if row.get("weight_bytes"):
            row["weight_pct_copy"] = (
                100.0 * row["weight_bytes"] / (t_us * 1e-6) / (run.ceilings["copy_TBps"] * 1e12)
            )
        if case.ref is not None:
            c = compare(got, case.ref, case.spec)
            row["check"] = {
                "passed": bool(c.passed),
                "rel_fro": c.rel_fro,
                "max_scaled": c.max_scaled,
            }
    except Exception as exc:  # a variant that does not compile or run is a result too
        row["time_us"] = None
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        row["traceback"] = traceback.format_exc()[-2000:]
    run.add(row)


# ---- ceilings ------------------------------------------------------------------------------------
def ceilings(run: Run) -> None:
    import torch

    n = 2**20 if DRY["on"] else 2**30
    src = torch.empty(n, dtype=torch.uint8, device=_device()).random_()
    dst = torch.empty_like(src)
    words, out = src.view(torch.float32), dst.view(torch.float32)
    # The copy as an SM kernel (an elementwise negation: 16-byte loads and stores), not `copy_`:
    # a same-dtype `copy_` is a cudaMemcpy, which a CUDA graph (time_torch's timing) records as a
    # memcpy node that the copy engines run at ~2.77 TB/s on the H200 (every sweep before
    # 2026-12-03 measured that, against the harness's 4.23 for the same copy outside a graph).
    # An idle H200 sits at ~345 MHz: half a second of copies first brings it to its clocks.
    warm_until = time.monotonic() + (0.0 if DRY["on"] else 0.5)
    while time.monotonic() < warm_until:
        for _ in range(20):
            torch.neg(words, out=out)
        torch.cuda.synchronize()
    t_copy = time_torch(lambda: torch.neg(words, out=out), [()], rep_ms=50)
    t_read = time_torch(lambda: words.sum(), [()], rep_ms=50)
    run.ceilings = {
        "copy_TBps": 2 * n / (t_copy * 1e-6) / 1e12,
        "read_TBps": n / (t_read * 1e-6) / 1e12,
    }
    print(
        f"copy {run.ceilings['copy_TBps']:.3f} TB/s (read + write), "
        f"read {run.ceilings['read_TBps']:.3f} TB/s",
        flush=True,
    )


# ---- one case, every provider --------------------------------------------------------------------
class SpecData:
    """One spec's inputs on the GPU, made once and shared by every M of it: params (plain and
    packed, in rotated copies), x of m_max rows (in copies; a case of m rows takes the first m),
    and the float64 reference of the first copy's checked rows."""

    def __init__(self, spec: MLPSpec, m_max: int, narrow: bool, seed: int = 0):

        from fusedmlp.torch_impl.packing import pack_params

        itemsize = numpy_dtype(spec.dtype).itemsize
        self.spec, self.m_max, self.narrow = spec, m_max, narrow
        plain = torch_params(spec, seed)
        n_params = 1 if narrow else copies(cost.param_bytes(spec))
        # decode: x is a few KiB, L2-resident in any real decode step: one copy
        n_x = copies(itemsize * m_max * spec.d_in) if narrow else 1
        self.plain = [plain] + [
            {k: v.clone() for k, v in plain.items()} for _ in range(n_params - 1)
        ]
        self.packed = [pack_params(spec, p) for p in self.plain]
        self.xs = [torch_input(spec, m_max, seed + 1 + i) for i in range(n_x)]
        # narrow: the first and last CHECK_ROWS rows are checked; decode: every row
        x0 = to_host(self.xs[0], spec.dtype)
        if narrow and m_max > 2 * CHECK_ROWS:
            x0 = np.concatenate([x0[:CHECK_ROWS], x0[-CHECK_ROWS:]])
        host = {k: to_host(v, spec.dtype) for k, v in plain.items()}
        self.ref = reference.forward(spec, x0, host)
        self.jax: dict[str, Any] | None = None

    def jax_arrays(self) -> dict[str, Any]:
        if self.jax is None:  # zero-copy views of the same buffers
            self.jax = {
                "xs": [to_jax(x) for x in self.xs],
                "plain": [{k: to_jax(v) for k, v in p.items()} for p in self.plain],
                "packed": [{k: to_jax(v) for k, v in p.items()} for p in self.packed],
            }
        return self.jax


_DATA: dict[tuple[MLPSpec, int, bool], SpecData] = {}


def spec_data(spec: MLPSpec, m_max: int, narrow: bool) -> SpecData:
    """Decode specs' data is kept for the whole run (< 1 GB each); a narrow cell's is not."""
    import torch

    key = (spec, m_max, narrow)
    if key not in _DATA:
        if narrow:
            for old in [k for k in _DATA if k[2]]:
                del _DATA[old]
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        _DATA[key] = SpecData(spec, m_max, narrow)
    return _DATA[key]


class Case:
    """A spec at M rows: the first M rows of its SpecData's inputs, the floor."""

    def __init__(self, spec: MLPSpec, m: int, name: str, *, narrow: bool):
        self.spec, self.m, self.name, self.narrow = spec, m, name, narrow
        self.data = spec_data(spec, m if narrow else max(DECODE_M_ALL), narrow)
        self.weight_bytes = cost.param_bytes(spec)
        self.floor_bytes = cost.min_bytes(spec, m, whole=True)
        self.n = max(len(self.data.plain), len(self.data.xs))
        self.ref = self.data.ref if narrow else self.data.ref[:m]

    def torch_args(self, packed: bool) -> list[tuple[Any, ...]]:
        params = self.data.packed if packed else self.data.plain
        xs = [x[: self.m] for x in self.data.xs]
        return [(xs[i % len(xs)], params[i % len(params)]) for i in range(self.n)]

    def jax_args(self, packed: bool) -> list[tuple[Any, ...]]:
        arrays = self.data.jax_arrays()
        params = arrays["packed" if packed else "plain"]
        xs = [x[: self.m] for x in arrays["xs"]]
        return [(xs[i % len(xs)], params[i % len(params)]) for i in range(self.n)]

    def checked(self, out: Any) -> np.ndarray:
        """The rows of an output that the reference covers, as float32 NumPy."""
        if self.narrow and self.m > 2 * CHECK_ROWS:
            return np.concatenate([as_float(out[:CHECK_ROWS]), as_float(out[-CHECK_ROWS:])])
        return as_float(out)

    def base(
        self, run: Run, stack: str, provider: str, variant: str = "", config: object = None
    ) -> dict[str, Any]:
        floor_us = self.floor_bytes / (run.ceilings["copy_TBps"] * 1e12) * 1e6
        return {
            "case": self.name,
            "spec": self.spec.to_dict(),
            "m": self.m,
            "stack": stack,
            "provider": f"{stack}:{provider}",
            "variant": variant,
            "config": str(config) if config is not None else "",
            "floor_us": floor_us,
            "floor_bytes": self.floor_bytes,
            "weight_bytes": None if self.narrow else self.weight_bytes,
        }


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_providers(run: Run, case: Case, section: str, *, only_compile: bool) -> None:
    """The kernel of each stack at its default config, eager, XLA; or torch.compile alone."""
    from fusedmlp.jax_impl import baselines as jbase
    from fusedmlp.torch_impl import baselines as tbase

    spec, m = case.spec, case.m
    kernel = "fused_small" if case.narrow else "fused_decode"
    if case.narrow:
        from fusedmlp.jax_impl import fused_small as jmod
        from fusedmlp.torch_impl import fused_small as tmod

        cfg = fused_small_config(spec, m, interpret=DRY["on"], kernel="forward")
    else:
        from fusedmlp.jax_impl import fused_decode as jmod
        from fusedmlp.torch_impl import fused_decode as tmod

        cfg = fused_decode_config(spec, m, interpret=DRY["on"])
    t_fwd = getattr(tmod, f"{kernel}_fwd")
    j_fwd = getattr(jmod, f"{kernel}_fwd")
    calls = 30 if not case.narrow else 10

    def torch_timer(fn, packed):
        def timer():
            args = case.torch_args(packed)
            out = fn(*args[0])
            sync()
            return time_torch(fn, args), out

        return timer

    def jax_timer(fn, packed):
        return lambda: time_jax(fn, case.jax_args(packed), calls)

    interpret = DRY["on"]
    jobs = [
        ("torch", kernel, "default", torch_timer(lambda x, p: t_fwd(x, p, spec, config=cfg), True)),
        ("torch", "eager", "", torch_timer(lambda x, p: tbase.run_eager(x, p, spec), False)),
        (
            "jax",
            kernel,
            "default",
            jax_timer(lambda x, p: j_fwd(x, p, spec, config=cfg, interpret=interpret), True),
        ),
        ("jax", "xla", "", jax_timer(lambda x, p: jbase.xla(x, p, spec), False)),
    ]
    if only_compile:
        jobs = [
            ("torch", "compile", "", torch_timer(lambda x, p: tbase.run_compile(x, p, spec), False))
        ]
    for stack, provider, variant, timer in jobs:
        if run.allowed(f"{case.name} {stack}:{provider}", section):
            measure(
                run, case, case.base(run, stack, provider, variant, cfg if variant else None), timer
            )


def run_variants(run: Run, case: Case, section: str, variants: list[tuple[str, Any]]) -> None:
    """Each variant's config through our torch kernel, and through its JAX twin too where
    --jax-variants asks for it (narrow cases)."""
    spec = case.spec
    if case.narrow:
        from fusedmlp.jax_impl.fused_small import fused_small_fwd as jax_fwd
        from fusedmlp.torch_impl.fused_small import fused_small_fwd as fwd
    else:
        from fusedmlp.torch_impl.fused_decode import fused_decode_fwd as fwd
    kernel = "fused_small" if case.narrow else "fused_decode"
    with_jax = run.jax_variants and case.narrow
    for name, cfg in variants:
        if not run.allowed(f"{case.name} variant {name}", section):
            continue

        def timer(cfg=cfg):
            args = case.torch_args(True)
            out = fwd(*args[0], spec, config=cfg)
            sync()
            return time_torch(lambda x, p: fwd(x, p, spec, config=cfg), args), out

        measure(run, case, case.base(run, "torch", kernel, name, cfg), timer)
        if with_jax and run.allowed(f"{case.name} jax variant {name}", section):

            def jax_fn(x, p, cfg=cfg):
                return jax_fwd(x, p, spec, config=cfg, interpret=DRY["on"])

            measure(
                run,
                case,
                case.base(run, "jax", kernel, name, cfg),
                lambda fn=jax_fn: time_jax(fn, case.jax_args(True), 10),
            )


def decode_variants(spec: MLPSpec, m: int) -> list[tuple[str, DecodeConfig]]:
    d = fused_decode_config(spec, m, interpret=DRY["on"])
    out = [
        ("default", d),
        ("pdl", replace(d, pdl=True)),
        ("split1 n32", replace(d, split_k=1, block_n=32)),
        ("split1 n32 pdl", replace(d, split_k=1, block_n=32, pdl=True)),
        ("split4", replace(d, split_k=4)),
        ("split16", replace(d, split_k=16)),
        ("h32", replace(d, block_h=32)),
        ("stages+1", replace(d, num_stages=d.num_stages + 1)),
        ("stages-1", replace(d, num_stages=max(1, d.num_stages - 1))),
        ("warps8", replace(d, num_warps=8)),
    ]
    if d.block_m >= 32:
        # M >= 32 (default: 64-row K steps, 3 stages since 2026-12-04): the 128-row steps it
        # replaced (the x tile a third of each stage's buffer: one weight tile in flight a
        # program), steps of 32 rows, and more stages where a stage is small (a plain first
        # layer's 64-column block is 8 KiB a step: gpt-mlp)
        out += [
            ("k128 s2", replace(d, block_k=128, block_k2=128, num_stages=2)),
            ("k32 s5", replace(d, block_k=32, block_k2=32, num_stages=5)),
            ("s5", replace(d, num_stages=5)),
            ("s6", replace(d, num_stages=6)),
        ]
        if not spec.gated:  # 128 hidden columns a program (a gated block sits in one pair)
            out += [
                ("h128 s3", replace(d, block_h=128)),
                ("h128 s5", replace(d, block_h=128, num_stages=5)),
            ]
    return out


def previous_small_config(spec: MLPSpec) -> SmallConfig:
    """fused_small's forward default before 2026-12-03 for a 16-bit spec: 128-row tiles (64 at
    128 wide), 3 stages, two programs an SM where shared memory holds them (64-wide ones: three of
    64 rows first), weights hoisted only within SMALL_HOIST_BYTES (one hidden layer excepted)."""
    hoist = small_hoist(spec)
    width = padded_width(max(spec.widths))
    three = SmallConfig(64, 4, 3, 3, hoist)
    if width == 64 and hoist and 3 * (small_smem_bytes(spec, three) + 2048) <= SMEM_PER_SM:
        return three
    if not hoist and spec.num_layers == 2:
        return fused_small_config(spec, NARROW_M)  # unchanged: hoisted by one program
    two = SmallConfig(64 if width == 128 else 128, 4, 3, 2, hoist)
    fits = 2 * (small_smem_bytes(spec, two) + 2048) <= SMEM_PER_SM
    return two if fits else replace(two, programs_per_sm=1)


def small_variants(spec: MLPSpec, m: int) -> list[tuple[str, SmallConfig]]:
    d = fused_small_config(spec, m, interpret=DRY["on"], kernel="forward")
    if max(spec.widths) <= 32:
        # 16/32 wide: a tile's chain of dependent MMAs is short work on tiny tiles, so an SM idles
        # on the chain's latency unless many tiles are in flight: more programs an SM (their x
        # tiles are 4-8 KiB), or more rows a tile
        return [
            ("default", d),
            ("previous", previous_small_config(spec)),
            ("3/SM", replace(d, programs_per_sm=3)),
            ("4/SM", replace(d, programs_per_sm=4)),
            ("6/SM", replace(d, programs_per_sm=6)),
            ("8/SM", replace(d, programs_per_sm=8)),
            ("rows/2 4/SM", replace(d, block_m=max(16, d.block_m // 2), programs_per_sm=4)),
            ("rows/2 8/SM", replace(d, block_m=max(16, d.block_m // 2), programs_per_sm=8)),
            ("rows*2 2/SM", replace(d, block_m=2 * d.block_m)),
            ("rows*2 w8 2/SM", replace(d, block_m=2 * d.block_m, num_warps=8)),
            ("rows*2 4/SM", replace(d, block_m=2 * d.block_m, programs_per_sm=4)),
            ("s2 4/SM", replace(d, num_stages=2, programs_per_sm=4)),
            ("s4 4/SM", replace(d, num_stages=4, programs_per_sm=4)),
        ]
    out = [
        ("default", d),
        ("previous", previous_small_config(spec)),
        ("1/SM", replace(d, programs_per_sm=1)),
        ("3/SM", replace(d, programs_per_sm=3)),
        ("rows/2", replace(d, block_m=max(16, d.block_m // 2))),
        ("stages+1", replace(d, num_stages=d.num_stages + 1)),
        ("stages-1", replace(d, num_stages=max(1, d.num_stages - 1))),
        ("warps8", replace(d, num_warps=8)),
        ("hoist" if not d.hoist else "streamed", replace(d, hoist=not d.hoist)),
        # more row tiles in flight per SM (issue 22: each tile's five dependent MMAs leave the
        # tensor cores idle between layers unless another program's tile fills the gaps):
        # 64-row tiles fit three programs an SM (68 KiB each at nerf-64x5), 8 warps split a
        # 128- or 256-row tile over two warpgroups
        ("rows/2 3/SM", replace(d, block_m=max(16, d.block_m // 2), programs_per_sm=3)),
        (
            "rows/2 s2 3/SM",
            replace(d, block_m=max(16, d.block_m // 2), num_stages=2, programs_per_sm=3),
        ),
        ("warps8 s2", replace(d, num_warps=8, num_stages=2)),
        ("rows*2 w8 1/SM", replace(d, block_m=2 * d.block_m, num_warps=8, programs_per_sm=1)),
        # past three 64-row programs an SM (nerf-64x5's default since the tenth session): more,
        # smaller tiles in flight (their MMA chains interleave across programs), or two 128-row
        # tiles over two warpgroups each
        ("rows/2 4/SM", replace(d, block_m=max(16, d.block_m // 2), programs_per_sm=4)),
        (
            "rows/2 s2 6/SM",
            replace(d, block_m=max(16, d.block_m // 2), num_stages=2, programs_per_sm=6),
        ),
        ("rows*2 w8 2/SM", replace(d, block_m=2 * d.block_m, num_warps=8, programs_per_sm=2)),
        ("s2 4/SM", replace(d, num_stages=2, programs_per_sm=4)),
        ("rows/2 2/SM", replace(d, block_m=max(16, d.block_m // 2), programs_per_sm=2)),
        (
            "rows/2 s2 2/SM",
            replace(d, block_m=max(16, d.block_m // 2), num_stages=2, programs_per_sm=2),
        ),
    ]
    if max(spec.widths) > 64:
        # 128 wide, streamed weights: fewer x buffers left room for more programs, 2 stages won
        # at depth 8 in the twelfth session's call (679.9 against ~832 µs)
        out += [
            ("s2 3/SM", replace(d, num_stages=2, programs_per_sm=3)),
            ("s2 1/SM", replace(d, num_stages=2, programs_per_sm=1)),
            ("s1", replace(d, num_stages=1)),
            ("s2 warps8", replace(d, num_stages=2, num_warps=8)),
            ("s2 rows*2 w8", replace(d, num_stages=2, block_m=2 * d.block_m, num_warps=8)),
        ]
    return out


# ---- the sweep -----------------------------------------------------------------------------------
def narrow_cell(name: str) -> MLPSpec:
    """A narrow cell by name: "WxD" (relu, float16, no bias: the narrow sweep's) or
    "WxD:ACTIVATION:bias|nobias:DTYPE" (e.g. "32x8:swiglu:bias:float16"); ValueError otherwise."""
    shape, *rest = name.split(":")
    width, _, depth = shape.partition("x")
    if not (width.isdigit() and depth.isdigit()) or len(rest) not in (0, 3):
        raise ValueError(f"cell: expected WxD or WxD:ACTIVATION:bias|nobias:DTYPE, got {name!r}")
    activation, bias, dtype = rest or ("relu", "nobias", "float16")
    if bias not in ("bias", "nobias"):
        raise ValueError(f"cell {name!r}: expected bias or nobias, got {bias!r}")
    w = 16 if DRY["on"] else int(width)
    return MLPSpec((w,) * (int(depth) + 1), activation, bias == "bias", dtype)


def shapes() -> dict[str, Any]:
    """The sweep's cases: the presets and the narrow cells (tiny stand-ins under --dry-run)."""
    dry = DRY["on"]
    spec = (lambda s: _dry_spec(s)) if dry else (lambda s: s)
    narrow_m = 300 if dry else NARROW_M
    cells = [(width, depth) for depth in NARROW_DEPTHS for width in NARROW_WIDTHS]
    if dry:
        cells = [(16, 2), (32, 3)]
    return {
        "llama": (spec(get_preset("llama3-8b").spec), (1, 5) if dry else DECODE_M["llama3-8b"]),
        "nerf": (spec(get_preset("nerf-64x5").spec), 300 if dry else NERF_M),
        "variant_m": (5,) if dry else VARIANT_M,
        "decode": [
            (p, spec(get_preset(p).spec), (3,) if dry else DECODE_M[p])
            for p in ("gpt-mlp", "hf-blog-geglu")
        ],
        "narrow": [(MLPSpec((w,) * (d + 1), "relu", False, "float16"), narrow_m) for w, d in cells],
    }


def sweep(run: Run) -> None:
    import torch

    ceilings(run)
    plan = shapes()
    llama, llama_m = plan["llama"]
    nerf, nerf_m = plan["nerf"]

    def providers(spec, m, name, narrow, section, only_compile=False):
        run_providers(run, Case(spec, m, name, narrow=narrow), section, only_compile=only_compile)

    # 2. llama3-8b decode, every M: the headline
    for m in llama_m:
        if run.allowed(f"llama3-8b M={m}", "llama"):
            providers(llama, m, case_name(llama, m, "llama3-8b"), False, "llama")
    # 3. nerf-64x5
    if run.allowed("nerf-64x5", "nerf"):
        providers(nerf, nerf_m, case_name(nerf, nerf_m, "nerf-64x5"), True, "nerf")
    # 4. fused_decode variants on llama3-8b
    preset = run.variant_preset
    target = get_preset(preset).spec
    target = _dry_spec(target) if DRY["on"] else target
    for m in plan["variant_m"] if DRY["on"] else run.variant_m:
        if run.allowed(f"{preset} M={m} variants", "variants"):
            case = Case(target, m, case_name(target, m, preset), narrow=False)
            variants = decode_variants(target, m)
            if run.variants:
                variants = [(n, c) for n, c in variants if n in run.variants]
            run_variants(run, case, "variants", variants)
    # 5. gpt-mlp and hf-blog-geglu decode
    for preset, spec, ms in plan["decode"]:
        for m in ms:
            if run.allowed(f"{preset} M={m}", "decode"):
                providers(spec, m, case_name(spec, m, preset), False, "decode")
    # 6. the narrow sweep
    for spec, m in plan["narrow"]:
        if run.allowed(case_name(spec, m), "narrow"):
            providers(spec, m, case_name(spec, m), True, "narrow")
    # 7. torch.compile baselines, the same cases in the same order
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    compile_cases = [(llama, m, "llama3-8b", False) for m in llama_m]
    compile_cases.append((nerf, nerf_m, "nerf-64x5", True))
    for preset, spec, ms in plan["decode"]:
        compile_cases += [(spec, m, preset, False) for m in ms]
    compile_cases += [(spec, m, None, True) for spec, m in plan["narrow"]]
    for spec, m, preset, narrow in compile_cases:
        name = case_name(spec, m, preset)
        if run.allowed(f"{name} torch:compile", "compile"):
            providers(spec, m, name, narrow, "compile", only_compile=True)
    # 8. fused_small variants on the chosen cells
    for cell in run.small_cells:
        if cell == "nerf":
            spec, m, preset = nerf, nerf_m, "nerf-64x5"
        else:
            spec, m, preset = narrow_cell(cell), 300 if DRY["on"] else NARROW_M, None
        name = case_name(spec, m, preset)
        if run.allowed(f"{name} variants", "small-variants"):
            case = Case(spec, m, name, narrow=True)
            variants = small_variants(spec, m)
            if run.variants:
                variants = [(n, c) for n, c in variants if n in run.variants]
            run_variants(run, case, "small-variants", variants)


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """speedup = best baseline of the row's stack (torch: eager/compile; JAX: xla) / row time."""
    best: dict[tuple[str, str], float] = {}
    for r in rows:
        if r.get("time_us") and r["provider"] in ("torch:eager", "torch:compile", "jax:xla"):
            key = (r["case"], r["stack"])
            best[key] = min(best.get(key, math.inf), r["time_us"])
    for r in rows:
        b = best.get((r["case"], r["stack"]))
        r["speedup_vs_best_baseline"] = b / r["time_us"] if b and r.get("time_us") else None


def table(run: Run) -> str:
    lines = [
        f"copy {run.ceilings.get('copy_TBps', float('nan')):.3f} TB/s, read "
        f"{run.ceilings.get('read_TBps', float('nan')):.3f} TB/s; floors at the copy rate",
        f"{'case':<30} {'provider':<18} {'variant':<14} {'us':>9} {'%floor':>7} "
        f"{'%copy(w)':>8} {'vs base':>7} {'check':>5}",
    ]
    for r in run.rows:
        t = r.get("time_us")
        sp = r.get("speedup_vs_best_baseline")
        wc = r.get("weight_pct_copy")
        chk = r.get("check", {})
        lines.append(
            f"{r['case']:<30} {r['provider']:<18} {r.get('variant', '')[:14]:<14} "
            + (f"{t:9.1f} {r['pct_floor']:6.1f}% " if t else f"{'error':>9} {'':>7} ")
            + (f"{wc:7.1f}% " if wc else f"{'':>8} ")
            + (f"{sp:6.2f}x " if sp else f"{'':>7} ")
            + (f"{'ok' if chk.get('passed') else 'FAIL':>5}" if chk else f"{'':>5}")
            + ("  INVALID: below its floor" if r.get("invalid") else "")
        )
    if run.skipped:
        lines.append(
            f"skipped ({len(run.skipped)}): "
            + "; ".join(run.skipped[:8])
            + (" ..." if len(run.skipped) > 8 else "")
        )
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    try:
        from fusedmlp.bench.env import environment as env

        return env()
    except Exception as exc:  # the record is a convenience; the numbers do not depend on it
        return {"error": f"{type(exc).__name__}: {exc}"}


# ---- compile-only (a CPU) ------------------------------------------------------------------------
def compile_report() -> list[dict[str, Any]]:
    """Compile the default configs of the sweep's torch kernels for sm_90 on this machine (no GPU
    needed): seconds (cold cache), shared memory, registers and spills (ptxas -v)."""
    import re
    import subprocess
    import tempfile

    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fusedmlp.common.packing import PACK_BLOCK, packed_names
    from fusedmlp.common.tiling import SMALL_TMA_IO_WIDTHS, decode_splits, padded_width
    from fusedmlp.torch_impl import fused_decode as fd
    from fusedmlp.torch_impl import fused_small as fs

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    dt = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}

    def build(fn, types, constexprs, warps, stages):
        sig, attrs = {}, {}
        for i, p in enumerate(fn.params):
            if p.is_constexpr:
                sig[p.name] = "constexpr"
                continue
            sig[p.name] = types[p.name]
            if isinstance(types[p.name], tuple):
                for j in range(len(types[p.name])):
                    attrs[(i, j)] = [["tt.divisibility", 16]]
            elif types[p.name].startswith("*") or p.name in (
                "D_IN",
                "HIDDEN",
                "W_COLS",
                "D_OUT",
                "stride_xm",
                "stride_ym",
            ):
                attrs[(i,)] = [["tt.divisibility", 16]]
        start = time.perf_counter()
        k = triton.compile(
            ASTSource(fn, sig, constexprs=constexprs, attrs=attrs),
            target=GPUTarget("cuda", 90, 32),
            options=dict(num_warps=warps, num_stages=stages),
        )
        seconds = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.ptx")
            with open(path, "w") as f:
                f.write(k.asm["ptx"])
            info = subprocess.run(
                [ptxas, "-arch=sm_90a", "-v", path, "-o", path + ".o"],
                capture_output=True,
                text=True,
            ).stderr
        regs = re.search(r"Used (\d+) registers", info)
        spill = re.search(r"(\d+) bytes spill stores", info)
        ptx = k.asm["ptx"]
        return {
            "seconds": round(seconds, 2),
            "shared": k.metadata.shared,
            "regs": int(regs.group(1)) if regs else None,
            "spill": int(spill.group(1)) if spill else None,
            "wgmma": "wgmma.mma_async" in ptx,
            "cp_async": "cp.async" in ptx,
        }

    out = []
    for preset in ("llama3-8b", "gpt-mlp", "hf-blog-geglu"):
        spec = get_preset(preset).spec
        d = dt[spec.dtype]
        for m in DECODE_M[preset]:
            cfg = fused_decode_config(spec, m)
            splits, k_iters = decode_splits(spec.widths[1], cfg.block_k2, cfg.split_k)
            w_cols = packed_names(spec)["wv0" if spec.gated else "w0"][1]
            del w_cols
            up = build(
                fd._fused_decode_up_kernel,
                dict(
                    x_ptr=d,
                    w_ptr=d,
                    b_ptr=d,
                    h_ptr=d,
                    M="i32",
                    D_IN="i32",
                    HIDDEN="i32",
                    W_COLS="i32",
                ),
                dict(
                    ACTIVATION=spec.base_activation,
                    GATED=spec.gated,
                    HAS_BIAS=spec.bias,
                    PACK=PACK_BLOCK,
                    BLOCK_M=cfg.block_m,
                    M_BLOCKS=1,
                    BLOCK_H=cfg.block_h,
                    BLOCK_K=cfg.block_k,
                    DOT_PRECISION="ieee",
                    USE_PDL=cfg.pdl,
                    INTERPRET=False,
                ),
                cfg.num_warps,
                cfg.num_stages,
            )
            down = build(
                fd._fused_decode_down_kernel,
                dict(
                    h_ptr=d,
                    w_ptr=d,
                    b_ptr=d,
                    out_ptr="*fp32" if splits > 1 else d,
                    M="i32",
                    HIDDEN="i32",
                    D_OUT="i32",
                ),
                dict(
                    HAS_BIAS=spec.bias,
                    BLOCK_M=cfg.block_m,
                    M_BLOCKS=1,
                    BLOCK_N=cfg.block_n,
                    BLOCK_K=cfg.block_k2,
                    K_ITERS=k_iters,
                    SPLIT_K=splits,
                    DOT_PRECISION="ieee",
                    USE_PDL=cfg.pdl,
                    INTERPRET=False,
                ),
                cfg.num_warps,
                cfg.num_stages,
            )
            for launch, info in (("up", up), ("down", down)):
                out.append(
                    {
                        "case": f"{preset} M={m}",
                        "kernel": f"fused_decode {launch}",
                        "config": str(cfg),
                        **info,
                    }
                )
                print(out[-1], flush=True)
    narrow = [(get_preset("nerf-64x5").spec, "nerf-64x5")]
    narrow += [
        (MLPSpec((w,) * (dep + 1), "relu", False, "float16"), None)
        for dep in NARROW_DEPTHS
        for w in NARROW_WIDTHS
    ]
    for spec, preset in narrow:
        cfg = fused_small_config(spec, NARROW_M, kernel="forward")
        shapes = packed_names(spec)
        w_cols = tuple(
            shapes[("wv" if lay.gated else "w") + str(lay.index)][1] for lay in spec.layers()
        )
        d = dt[spec.dtype]
        info = build(
            fs._fused_small_fwd_kernel,
            dict(
                x_ptr=d,
                w_ptrs=(d,) * spec.num_layers,
                b_ptrs=(d,) * spec.num_layers,
                y_ptr=d,
                M="i32",
                stride_xm="i32",
                stride_ym="i32",
                TILES_PER_PROGRAM="i32",
            ),
            dict(
                WIDTHS=spec.widths,
                W_COLS=w_cols,
                NUM_LAYERS=spec.num_layers,
                WIDTH=padded_width(max(spec.widths)),
                BLOCK_M=cfg.block_m,
                ACTIVATION=spec.base_activation,
                GATED=spec.gated,
                HAS_BIAS=spec.bias,
                PACK=PACK_BLOCK,
                HOIST=cfg.hoist,
                DOT_PRECISION="ieee",
                INTERPRET=False,
                INT64_ROWS=False,
                # the GPU path for aligned tensors (fused_small._tma_io)
                TMA_IO=padded_width(max(spec.widths)) in SMALL_TMA_IO_WIDTHS,
            ),
            cfg.num_warps,
            cfg.num_stages,
        )
        out.append(
            {
                "case": case_name(spec, NARROW_M, preset),
                "kernel": "fused_small",
                "config": str(cfg),
                **info,
            }
        )
        print(out[-1], flush=True)
    return out


# ---- main ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="path of the JSON results")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=170.0,
        help="stop starting new measurements after this many seconds",
    )
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    parser.add_argument(
        "--small-cells",
        default="nerf,128x8",
        help="comma list of the cells the small-variants section runs: nerf, WxD (relu float16, "
        "no bias) or WxD:ACTIVATION:bias|nobias:DTYPE",
    )
    parser.add_argument(
        "--variants",
        default="",
        help="variants and small-variants: only the variants of this comma list (default: all)",
    )
    parser.add_argument(
        "--variant-m",
        default=",".join(map(str, VARIANT_M)),
        help="the variants section's llama3-8b decode M values (comma list)",
    )
    parser.add_argument(
        "--variant-preset",
        default="llama3-8b",
        help="the variants section's preset (a two-layer MLP: llama3-8b, gpt-mlp, hf-blog-geglu)",
    )
    parser.add_argument(
        "--jax-variants",
        action="store_true",
        help="small-variants: time every config through the JAX twin too",
    )
    parser.add_argument(
        "--compile-only",
        action="store_true",
        help="compile the default configs for sm_90 here (no GPU needed)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="a CPU check of this script: tiny shapes, interpreters, no timing",
    )
    args = parser.parse_args(argv)
    if args.compile_only:
        result = {"compile": compile_report()}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        return 0
    DRY["on"] = args.dry_run
    import torch

    import fusedmlp.torch_impl  # noqa: F401  (before triton: sets TRITON_INTERPRET without a GPU)

    if not torch.cuda.is_available() and not args.dry_run:
        print(
            "sweep_decode: needs a CUDA GPU (--compile-only and --dry-run run on a CPU)",
            file=sys.stderr,
        )
        return 2
    sections = tuple(s for s in args.sections.split(",") if s)
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; known {SECTIONS}")
    small_cells = tuple(c for c in args.small_cells.split(",") if c)
    for cell in small_cells:
        if cell != "nerf":
            try:
                narrow_cell(cell)
            except ValueError as exc:
                parser.error(f"--small-cells: {exc}")
    variants = tuple(v for v in args.variants.split(",") if v)
    try:
        variant_m = tuple(int(m) for m in args.variant_m.split(",") if m)
    except ValueError:
        parser.error(f"--variant-m: expected a comma list of ints, got {args.variant_m!r}")
    if args.variant_preset not in DECODE_M:
        parser.error(f"--variant-preset: expected one of {sorted(DECODE_M)}")
    run = Run(
        args.budget_s, sections, small_cells, args.jax_variants, variants, variant_m,
        args.variant_preset,
    )  # fmt: skip
    try:
        sweep(run)
    finally:
        add_speedups(run.rows)
        result = {
            "env": environment(),
            "ceilings": run.ceilings,
            "rows": run.rows,
            "skipped": run.skipped,
            "seconds": run.elapsed(),
            "dry_run": args.dry_run,
            "decode_defaults": {
                f"llama3-8b M={m}": asdict(fused_decode_config(get_preset("llama3-8b").spec, m))
                for m in DECODE_M["llama3-8b"]
            },
        }
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(table(run), flush=True)
        print(f"wrote {args.out} ({run.elapsed():.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
