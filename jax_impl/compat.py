"""One place for what differs between jax 0.10.2 (CPU machines) and 0.11.2 (the GPU image).

- Pallas interpret mode: on a machine without a GPU every Pallas kernel runs interpreted.
- The Mosaic GPU interpreter: `jax._src.pallas.mosaic_gpu.interpret.params.InterpretGPUParams` in
  0.10.2, public as `plgpu.InterpretGPUParams` in 0.11.2.
- The Mosaic GPU interpreter of 0.11 models TMA's edges (zero fill of reads past the end of an
  array, clipped writes) and runs `plgpu.load`/`layout_cast`; 0.10.2's raises on both.
- The Pallas Triton backend warns on every lowering from 0.11 on; `quiet_pallas_triton` filters
  exactly that warning where the twin is used on purpose.
- Both versions' Mosaic GPU interpreter can deadlock XLA's CPU thread pool on a small machine:
  `widen_cpu_pool` (run on import) sizes it first.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator
from typing import Any

import jax

PALLAS_TRITON_DEPRECATION = r"The Pallas Triton backend is deprecated"
# Threads of XLA's CPU pool the Mosaic GPU interpreter may hold blocked at once, twice over: one
# running the kernel's grid loop (waiting in a callback for the simulated warpgroups) and one per
# warpgroup but the last to arrive, waiting at a barrier (3 warpgroups a block here: a memory and
# two compute warpgroups, or fused_small's three chains).
CPU_POOL_THREADS = 8


def widen_cpu_pool() -> None:
    """Size XLA's CPU thread pool for the Mosaic GPU interpreter before any backend starts.

    The interpreter (jax 0.10 and 0.11) runs each simulated warpgroup as its own XLA computation
    from a Python thread pool, and their barrier waits block in host callbacks; when the CPU
    client offloads those computations to its pool, a pool the size of the machine's cores (2
    on CI) can have every thread blocked — the grid loop's in its callback, a warpgroup's at a
    barrier — while the warpgroup that would release them waits for a thread: a deadlock (seen
    once in 20-30 runs of tests/test_mosaic_fused_small.py on 2 cores; every time on one core,
    py-spy showing exactly that). The pool's size comes from PJRT_NPROC when the CPU client is
    made (XLA's `DefaultThreadPoolSize`), so this sets it, unless the user did, where the
    cores are fewer than CPU_POOL_THREADS; it has no effect once a backend has started
    (tests/test_mosaic_fused_small.py checks that importing the package sets it before any)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if (cores or 1) < CPU_POOL_THREADS:
        os.environ.setdefault("PJRT_NPROC", str(CPU_POOL_THREADS))


widen_cpu_pool()


@functools.cache
def on_gpu() -> bool:
    return any(d.platform == "gpu" for d in jax.devices())


@functools.cache
def on_hopper() -> bool:
    """True where jax's first GPU is a Hopper part (sm_90: TMA, wgmma; what Mosaic GPU targets)."""
    if not on_gpu():
        return False
    kind = jax.devices("gpu")[0].device_kind
    return any(name in kind for name in ("H100", "H200", "H800", "GH200"))


@functools.cache
def gpu_name() -> str | None:
    """jax's first GPU's name ('NVIDIA H100 80GB HBM3'), None without one: what the committed
    tile tables' entries name as the GPU they were measured on."""
    return jax.devices("gpu")[0].device_kind if on_gpu() else None


def interpret_mode() -> bool:
    """True where Pallas kernels must run interpreted (no GPU)."""
    return not on_gpu()


def mosaic_interpret_params() -> Any:
    """An `InterpretGPUParams()` for `plgpu.kernel(..., interpret=...)`, from either jax version."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    cls = getattr(plgpu, "InterpretGPUParams", None)
    if cls is None:  # jax 0.10.x: still private
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as cls
    return cls()


def jax_version() -> tuple[int, int]:
    major, minor = jax.__version__.split(".")[:2]
    return int(major), int(minor)


def mosaic_interpreter_models_tma_edges() -> bool:
    """True where the Mosaic GPU interpreter zero-fills TMA reads past an array's end and clips
    writes, as the GPU does (jax >= 0.11); jax 0.10.2 raises "Out-of-bounds read"."""
    return jax_version() >= (0, 11)


def mosaic_interpreter_transposes() -> bool:
    """True where the Mosaic GPU interpreter runs wgmma on transposed ref views (`ref.transpose`,
    jax >= 0.11); jax 0.10.2 fails on the view ("'TransposeTransform' object has no attribute
    'indices'") and its interpreter threads then hang. Lowering for CUDA works on both."""
    return jax_version() >= (0, 11)


def mosaic_kernel_aliases_refs() -> bool:
    """True where `plgpu.kernel` takes a jax Ref operand and aliases it in and out of the kernel
    (jax >= 0.11: the custom call's output_operand_aliases, on the GPU and in the interpreter);
    jax 0.10.2's custom_vmap wrapper refuses the ref's write effect ("JaxprInputEffect ... does
    not have a corresponding jaxpr input")."""
    return jax_version() >= (0, 11)


def mosaic_interpreter_stores_gated_preact() -> bool:
    """True where the Mosaic GPU interpreter runs the warp-specialised gated kernel that stores its
    pre-activation with a bias (jax >= 0.11). Under jax 0.10.2's its threads wait on a barrier
    forever — with nothing written to the pre-activation's staging nor stored from it, so the
    extra output and its staging allocation alone trigger it; without a bias, or on one
    warpgroup, or for linear_act, it runs. Not explained further; the GPU lowering and jax
    0.11.2's interpreter (the same kernel, bitwise against the inference kernel) are fine."""
    return jax_version() >= (0, 11)


def mosaic_interpreter_has_layouts() -> bool:
    """True where the Mosaic GPU interpreter runs `plgpu.load` and `layout_cast` (jax >= 0.11)."""
    return jax_version() >= (0, 11)


def mosaic_interpreter_has_ref_union() -> bool:
    """True where the Mosaic GPU interpreter allocates a `plgpu.RefUnion` (jax >= 0.11: one
    buffer a member; jax 0.10's has no rule for it)."""
    return jax_version() >= (0, 11)


def filter_pallas_triton_deprecation() -> None:
    """Silence exactly the Pallas-Triton deprecation warning, for the whole process.

    jax >= 0.11 warns when a Pallas-Triton kernel is lowered, and lowering happens wherever the
    outermost `jax.jit` compiles — often the caller's own jit, outside any context manager of ours.
    The twin is used on purpose (it is the line-for-line port of the Triton kernels), so
    `fusedmlp.jax_impl` installs this filter on import; every other warning is untouched.
    """
    warnings.filterwarnings("ignore", message=PALLAS_TRITON_DEPRECATION)


@contextlib.contextmanager
def quiet_pallas_triton() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PALLAS_TRITON_DEPRECATION)
        yield


def mosaic_load(ref: Any, *, layout: Any) -> Any:
    """`plgpu.load` of a whole ref with a register layout, in either jax version.

    jax 0.10.2 requires the index argument (`plgpu.load(ref, (), layout=...)`); jax 0.11 deprecates
    passing it ("index the reference via ref.at[idx]") on its way to an error.
    """
    import inspect

    from jax.experimental.pallas import mosaic_gpu as plgpu

    idx = inspect.signature(plgpu.load).parameters["idx"]
    if idx.default is inspect.Parameter.empty:  # jax 0.10.x
        return plgpu.load(ref, (), layout=layout)
    return plgpu.load(ref, layout=layout)
