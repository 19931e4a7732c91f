"""Shared pieces of the Mosaic GPU siblings (linear_act, gated): tiles, TMA ring, epilogue.

A Pallas thread is one warpgroup (4 warps, 128 CUDA threads); each program (CUDA block) runs one
warpgroup that owns one BLOCK_M × BLOCK_N output tile. The K loop is a hand-written ring of
`num_stages` shared-memory slots filled by TMA (`copy_gmem_to_smem`, one barrier per slot and
operand) and drained by `wgmma` into fp32 accumulators held in registers (`plgpu.ACC`). The same
ring feeds one accumulator (linear_act: X·W) or two from one X slab (gated: X·W and X·V).

How TileConfig maps onto Mosaic GPU (the portable twins read the same fields as Triton tiles):

| field      | Mosaic GPU meaning                                                                 |
| ---------- | ---------------------------------------------------------------------------------- |
| block_m    | rows of the output tile = wgmma M: a multiple of 64 (one wgmma covers 64 rows)     |
| block_n    | columns of the output tile = wgmma N (≤ 256); TMA box of W, V, bias, out, residual |
| block_k    | K slab per ring slot: TMA box of X and W; with block_n it picks the swizzle        |
| group_m    | grouped program order over the 1-D grid: Triton's L2 trick, the same formula       |
| num_stages | ring slots = TMA copies in flight ahead of the tensor core (1: no overlap)         |
| num_warps  | ignored: one Pallas thread is one warpgroup (4 warps)                              |

Edges: TMA moves whole boxes, so the launchers pad M, N and K up to the tile multiples (K with
zeros, which add nothing to the products) and slice the result; aligned operands are not copied.
The Mosaic GPU interpreter (CPU) runs all of this except the layout-annotated bias load
(`row_vector`), the one place where the interpreted and compiled variants differ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ...common.config import TileConfig
from ...common.dtypes import FP32_PRECISIONS
from .. import compat

IMPL = "pallas_mosaic"
FALLBACK = "pallas_triton"
SUPPORTED_DTYPES = ("float16", "bfloat16")
WGMMA_M = 64  # rows of one wgmma instruction (one warpgroup)
WGMMA_MAX_N = 256
# Pallas' TMA lowering splits each copy's byte count over the 128 threads of the warpgroup, so every
# copy must move a multiple of 128 bytes (GPU lowering: "Only copies transferring a number of bytes
# divisible by the warpgroup size are supported"; the interpreter does not check it).
TMA_GRANULE = 128
SMEM_BYTES = 227 * 1024  # H100 shared memory per block
# fp32 accumulator registers per thread of the warpgroup: 128×128 fp32 over 128 threads is 128 of
# the 255 a thread has; more leaves no room for the epilogue (ptxas spills).
MAX_ACC_ELEMS = 128 * 128

# Under the interpreter: the smallest legal wgmma M (64) and the narrowest legal N (64: one TMA copy
# of the bias row is 128 bytes) and K tiles, so the golden shapes (odd widths 13..97) span several
# N tiles and K steps, with a two-slot ring so refills happen. Legal on the GPU too.
INTERPRET_CONFIG = TileConfig(block_m=64, block_n=64, block_k=16, group_m=2, num_warps=4,
                              num_stages=2)


# ==== support and configs =========================================================================
def unsupported_reason(m: int, n: int, k: int, dtype: str) -> str | None:
    """Why pallas_mosaic cannot take this problem (None: it can). Any M, N, K is taken (padding).

    float32: wgmma reads 32-bit operands as tf32 only, and tf32 wgmma takes no transposed operand
    (GPU lowering: "Only f16 WGMMA supports transposes"), so W [K, N] would need a K-major copy.
    """
    del m, n, k
    if dtype not in SUPPORTED_DTYPES:
        return (
            f"{IMPL}: dtype {dtype} is not supported (wgmma takes fp16/bf16 here); "
            f"falls back to impl '{FALLBACK}'"
        )
    return None


def default_config(
    family: str, m: int, n: int, k: int, dtype: str, *, interpret: bool = False
) -> TileConfig:
    """The Mosaic GPU tiles without tuning (benchmarks tune). One warpgroup per block: linear_act
    holds one 128×128 fp32 accumulator (128 registers a thread), gated two 64×128 ones (the same
    128); 4 ring slots of 64-wide K slabs (128-byte swizzle) fit in shared memory with the epilogue.
    """
    del n, k, dtype
    if interpret:
        return INTERPRET_CONFIG
    if family == "gated" or m <= WGMMA_M:
        return TileConfig(64, 128, 64, group_m=8, num_warps=4, num_stages=4)
    return TileConfig(128, 128, 64, group_m=8, num_warps=4, num_stages=4)


def smem_bytes(config: TileConfig, itemsize: int, num_weights: int, residual: bool) -> int:
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    ring = config.num_stages * itemsize * (bm * bk + num_weights * bk * bn)
    epilogue = itemsize * (bm * bn * (1 + residual) + num_weights * bn)
    return ring + epilogue


def check_config(config: TileConfig, dtype: str, num_weights: int, residual: bool) -> None:
    """ValueError naming the field when a TileConfig cannot drive the Mosaic GPU kernel."""
    itemsize = jnp.dtype(dtype).itemsize
    if config.block_m % WGMMA_M:
        raise ValueError(
            f"config.block_m: expected a multiple of {WGMMA_M} for {IMPL} (wgmma M per "
            f"warpgroup), got {config.block_m}"
        )
    if config.block_n > WGMMA_MAX_N:
        raise ValueError(
            f"config.block_n: expected at most {WGMMA_MAX_N} for {IMPL} (wgmma N), "
            f"got {config.block_n}"
        )
    if config.block_n * itemsize % TMA_GRANULE:
        raise ValueError(
            f"config.block_n: expected a multiple of {TMA_GRANULE // itemsize} for {dtype} on "
            f"{IMPL} (a TMA copy moves a multiple of {TMA_GRANULE} bytes; the bias row is one "
            f"BLOCK_N wide), got {config.block_n}"
        )
    acc = num_weights * config.block_m * config.block_n
    if acc > MAX_ACC_ELEMS:
        raise ValueError(
            f"config: expected {num_weights} × block_m × block_n ≤ {MAX_ACC_ELEMS} fp32 "
            f"accumulator elements for one warpgroup, got {num_weights} × {config.block_m} × "
            f"{config.block_n}"
        )
    need = smem_bytes(config, itemsize, num_weights, residual)
    if need > SMEM_BYTES:
        raise ValueError(
            f"config: expected at most {SMEM_BYTES} bytes of shared memory, got {need} for "
            f"{config} (lower num_stages or the tiles)"
        )


# ==== launcher helpers ============================================================================
def round_up(value: int, multiple: int) -> int:
    return max(1, math.ceil(value / multiple)) * multiple


def pad_to(a: jax.Array, shape: Sequence[int]) -> jax.Array:
    """Zero-pad `a` at the end of each dimension up to `shape` (no copy when already there)."""
    widths = [(0, s - d) for s, d in zip(shape, a.shape, strict=True)]
    if all(hi == 0 for _, hi in widths):
        return a
    return jnp.pad(a, widths)


def interpret_param(interpret: bool) -> Any:
    """`plgpu.kernel(interpret=...)`: the Mosaic GPU interpreter's params, or None to compile."""
    if not interpret:
        return None
    from ..compat import mosaic_interpret_params

    return mosaic_interpret_params()


def mma_transforms(cols: int, dtype: Any) -> tuple[Any, Any]:
    """Shared-memory transforms wgmma and TMA want for a tile `cols` wide: rows of 8 × swizzle."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(cols * itemsize * 8)  # largest of 128/64/32/16 bytes that divides
    return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


# ==== in-kernel pieces ============================================================================
def program_tile(num_pid_m: int, num_pid_n: int, group_m: int) -> tuple[jax.Array, jax.Array]:
    """(pid_m, pid_n) of this program on a 1-D grid, in Triton's grouped order: group_m rows of
    tiles are visited column by column so that W tiles stay in L2 while X tiles are reused."""
    pid = lax.axis_index("tile")
    # lax.div/rem/min rather than // % jnp.minimum: non-negative scalars, and jnp's floor division
    # expands into sign fix-ups that are pointless here.
    num_pid_in_group = group_m * num_pid_n
    group_id = lax.div(pid, num_pid_in_group)
    first_pid_m = group_id * group_m
    group_size_m = lax.min(num_pid_m - first_pid_m, group_m)
    pid_m = first_pid_m + lax.rem(lax.rem(pid, num_pid_in_group), group_size_m)
    pid_n = lax.div(lax.rem(pid, num_pid_in_group), group_size_m)
    return pid_m, pid_n


def ring_allocations(
    dtype: Any, block_m: int, block_n: int, block_k: int, num_stages: int, num_weights: int
) -> dict[str, Any]:
    """run_scoped types of the K ring: X slots, one set of weight slots and barriers per weight."""
    # wgmma wants A and B with the same swizzle, K a multiple of the swizzle's width and the B tile
    # tiled by it: take the swizzle of the narrower of BLOCK_K and BLOCK_N (powers of two, so it
    # divides both). The interpreter does not check this; the GPU lowering raises.
    transforms = mma_transforms(min(block_k, block_n), dtype)
    return dict(
        x_smem=plgpu.SMEM((num_stages, block_m, block_k), dtype, transforms=transforms),
        w_smems=[plgpu.SMEM((num_stages, block_k, block_n), dtype, transforms=transforms)]
        * num_weights,
        # One barrier per slot and operand: each TMA copy arrives on its own barrier with its byte
        # count, so a slot is ready when every operand's barrier has flipped.
        x_bars=plgpu.Barrier(num_barriers=num_stages),
        w_bars=[plgpu.Barrier(num_barriers=num_stages)] * num_weights,
    )


def k_pipeline(
    x_gmem: Any,
    w_gmems: Sequence[Any],
    ring: dict[str, Any],
    *,
    m_slice: Any,
    n_slice: Any,
    block_m: int,
    block_n: int,
    block_k: int,
    k_iters: int,
    num_stages: int,
) -> tuple[jax.Array, ...]:
    """Σ_k X[m, k]·W_j[k, n] for each weight j, in fp32, through a `num_stages`-slot TMA ring.

    Step ki waits for slot ki % S, issues one wgmma per weight on it (one X slab feeds all), then
    waits until at most one wgmma group is in flight: every step up to ki - 1 has finished reading
    its slot, so the slot of step ki - 1 is refilled with step ki - 1 + S while the tensor core
    works on step ki. With S = 1 there is nothing to overlap: wait for all, refill with ki + 1.
    """
    x_smem, w_smems = ring["x_smem"], ring["w_smems"]
    x_bars, w_bars = ring["x_bars"], ring["w_bars"]
    in_flight = min(1, num_stages - 1)

    def fetch(ki: Any, slot: Any) -> None:
        k_slice = pl.ds(ki * block_k, block_k)
        plgpu.copy_gmem_to_smem(x_gmem.at[m_slice, k_slice], x_smem.at[slot], x_bars.at[slot])
        for w_gmem, w_smem, w_bar in zip(w_gmems, w_smems, w_bars, strict=True):
            plgpu.copy_gmem_to_smem(w_gmem.at[k_slice, n_slice], w_smem.at[slot], w_bar.at[slot])

    for slot in range(min(num_stages, k_iters)):  # prologue: fill the ring
        fetch(slot, slot)

    def acc_scope(*acc_refs: Any) -> tuple[jax.Array, ...]:
        def step(ki: jax.Array, carry: None) -> None:
            slot = lax.rem(ki, num_stages)
            plgpu.barrier_wait(x_bars.at[slot])
            for w_bar in w_bars:
                plgpu.barrier_wait(w_bar.at[slot])
            for acc_ref, w_smem in zip(acc_refs, w_smems, strict=True):
                plgpu.wgmma(acc_ref, x_smem.at[slot], w_smem.at[slot])
            plgpu.wgmma_wait(in_flight)
            done = ki - in_flight  # the newest step whose wgmmas have finished
            refill = done + num_stages

            @pl.when(jnp.logical_and(done >= 0, refill < k_iters))
            def _refill() -> None:
                fetch(refill, lax.rem(done, num_stages))

            return carry

        lax.fori_loop(0, k_iters, step, None)
        # Reading an accumulator awaits every outstanding wgmma.
        return tuple(acc_ref[...] for acc_ref in acc_refs)

    acc_types = [plgpu.ACC((block_m, block_n), jnp.float32)] * len(w_gmems)
    # The accumulators get their own run_scoped nested in the shared-memory one: mixing register
    # and shared-memory allocations in one run_scoped is refused by the interpreter.
    return pl.run_scoped(acc_scope, *acc_types)


def row_vector(ref: Any, rows: int, *, interpret: bool) -> jax.Array:
    """A [BLOCK_N] vector from shared memory as an fp32 [rows, BLOCK_N] tile in the accumulator's
    layout, to add to it (bias of the epilogue).

    On the GPU the load must produce wgmma's column layout (`Layout.WGMMA.reduce(0)`), from which
    broadcasting over the rows is free; a plain `ref[...]` gives a strided layout that cannot be
    added to the accumulator. The interpreter has no rule for plgpu.load's primitive nor for
    `layout_cast` (CPU: "MLIR translation rule for primitive 'layout_cast' not found") and needs no
    layouts, so the interpreted variant reads the ref plainly.
    """
    # The compiled variant is checked by lowering for CUDA on the CPU and run by `pytest -m gpu`.
    layout = plgpu.Layout.WGMMA.reduce(0)
    v = ref[...] if interpret else compat.mosaic_load(ref, layout=layout)
    v = v.astype(jnp.float32)
    return lax.broadcast_in_dim(v, (rows, v.shape[0]), (1,))


def store_tile(out: jax.Array, o_smem: Any, o_gmem_tile: Any) -> None:
    """Registers -> shared memory -> TMA store of one output tile."""
    o_smem[...] = out
    plgpu.commit_smem()  # make the generic-proxy smem writes visible to the TMA unit
    plgpu.copy_smem_to_gmem(o_smem, o_gmem_tile)
    plgpu.wait_smem_to_gmem(0)  # the block may not exit while its TMA store still reads smem


# ==== validation (public functions) ===============================================================
def check_array(
    name: str, a: Any, shape: tuple[int, ...] | None, dtype: Any, *, optional: bool = False
) -> None:
    """TypeError/ValueError naming `name` unless `a` is an array of `shape` and `dtype` (or None,
    where optional). shape None checks only that `a` is 2-D (its width is read from it next)."""
    if a is None:
        if optional:
            return
        want = "a 2-D jax.Array" if shape is None else f"a jax.Array of shape {tuple(shape)}"
        raise TypeError(f"{name}: expected {want}, got None")
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise TypeError(f"{name}: expected a jax.Array, got {type(a).__name__}")
    if shape is None:
        if a.ndim != 2:
            raise ValueError(f"{name}: expected a 2-D array, got shape {tuple(a.shape)}")
    elif tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(a.shape)}")
    if a.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {jnp.dtype(dtype).name} (the dtype of x), "
                         f"got {jnp.dtype(a.dtype).name}")


def check_common(
    x: Any, activation: str, activations: Sequence[str], config: Any, fp32_precision: str
) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"x: expected a jax.Array, got {type(x).__name__}")
    if x.ndim < 1:
        raise ValueError(f"x: expected at least 1 dimension [..., K], got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x: expected a floating dtype (float16, bfloat16, float32), got {x.dtype}")
    if activation not in activations:
        raise ValueError(f"activation: expected one of {tuple(activations)}, got {activation!r}")
    if config is not None and not isinstance(config, TileConfig):
        raise TypeError(f"config: expected a TileConfig or None, got {type(config).__name__}")
    if fp32_precision not in FP32_PRECISIONS:
        raise ValueError(
            f"fp32_precision: expected one of {FP32_PRECISIONS}, got {fp32_precision!r}"
        )
