"""linear_act on Mosaic GPU: y = act(x·W + b) (+ residual), the epilogue fused after wgmma.

    y[m, n] = act(Σ_k x[m, k]·W[k, n] + b[n]) + r[m, n]      (fp32 epilogue, rounded once)

Grid: persistent, one CUDA block per SM walking the BLOCK_M × BLOCK_N output tiles in grouped,
snaking order; per tile a TMA → shared memory → wgmma pipeline over K, warp-specialised (one
memory warpgroup, two compute warpgroups that split the tile) or on one warpgroup
(`pipeline.persistent_matmul`, the module table in pipeline.py). The epilogue, per 64-row ×
`epi_n` slice of a compute warpgroup's fp32 accumulator, adds the bias, applies the activation,
adds the residual (loaded by TMA into the slice's output staging slot), casts, and stores the slice
by TMA from one of two staging slots. Ragged M, N, K: TMA zero-fills and clips, nothing is padded.
Nothing is saved for a backward pass (forward only). `linear_act_fwd` can read x as its transpose
stored [K, M] (`x_kmajor`) and w as its transpose stored [N, K] (`w_kmajor`) in place — the
backward's hᵀ·dZ and dZ·Wᵀ (`pipeline.Operands`; the cooperative kernels, not ping-pong).

Sibling, not twin: jax_impl/linear_act.py (Pallas-Triton) and torch_impl/linear_act.py (Triton)
export the same names; the dispatcher picks this module for impl "pallas_mosaic"; its Hopper
Triton counterpart is torch_impl/tma/linear_act.py. fp16/bf16 only, K and N multiples of 8
(TMA's 16-byte strides); other inputs raise NotImplementedError naming the fallback. Without a GPU
the kernel runs under the Mosaic GPU interpreter (`interpret=None` picks it).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ...common.config import TileConfig
from ...common.validate import check_layer
from ..activations import apply_activation, round_to_dtype
from ..compat import interpret_mode
from ..front import ADAPTER
from . import pipeline
from .pipeline import EPI_M, Operands, Tiles, persistent_matmul, row_vector

FAMILY = "linear_act"


# ==== forward kernel ==============================================================================
def _linear_act_fwd_kernel(
    *refs: Any,
    activation: str,
    has_bias: bool,
    has_residual: bool,
    tiles: Tiles,
    interpret: bool,
    operands: Operands = pipeline.AS_STORED,
) -> None:
    x_gmem, w_gmem, *rest = refs
    b_gmem = rest.pop(0) if has_bias else None
    r_gmem = rest.pop(0) if has_residual else None
    (o_gmem,) = rest
    dtype = o_gmem.dtype
    epi_n = tiles.epi_n

    def epilogue(acc: jax.Array, b_ref: Any, rows: slice, en: int, o_slot: Any) -> None:
        # 3. compute: y = act(acc + b) + r in fp32 on one 64 × epi_n slice, rounded once
        y = acc[rows, en * epi_n : (en + 1) * epi_n]
        if b_ref is not None:
            y = y + row_vector(b_ref.at[pl.ds(en * epi_n, epi_n)], EPI_M, interpret=interpret)
        y = apply_activation(y, activation, fast=pipeline.APPROX_MATH)
        if has_residual:  # the driver loaded the residual slice into o_slot
            y = y + o_slot[...].astype(jnp.float32)
        o_slot[...] = round_to_dtype(y, dtype, interpret)

    # 1. program -> tile, 2. load, 4. store: the shared persistent driver
    persistent_matmul(
        x_gmem, w_gmem, b_gmem, r_gmem, o_gmem, tiles=tiles, epilogue=epilogue, operands=operands
    )


# ==== launcher ====================================================================================
def linear_act_fwd(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None,
    residual: jax.Array | None,
    *,
    activation: str,
    config: TileConfig,
    fp32_precision: str = "ieee",
    interpret: bool | None = None,
    x_kmajor: bool = False,
    w_kmajor: bool = False,
) -> jax.Array:
    """act(x @ w + b) (+ residual) for 2-D x [M, K], w [K, N]; returns [M, N] in x.dtype.

    One kernel call on the operands as they are (TMA handles ragged edges; M ≥ 8 not a multiple
    of 8 is padded, `pipeline.padded_extents`); M = 0 returns an empty array without a launch.
    fp32_precision is taken for the twins' signature: 16-bit products are exact in the fp32
    accumulator. `x_kmajor`: x is given as its transpose [K, M] and read in place (hᵀ of a
    weight gradient); `w_kmajor`: w as its transpose [N, K] (Wᵀ of an input gradient) — the
    cooperative kernels only (`pipeline.Operands`).
    """
    del fp32_precision
    if interpret is None:
        interpret = interpret_mode()
    m, k = x.shape[::-1] if x_kmajor else x.shape
    n = w.shape[0] if w_kmajor else w.shape[1]
    if m == 0:
        return jnp.zeros((0, n), x.dtype)
    tiles = pipeline.plan_tiles(config, FAMILY)
    layout = Operands(x_kmajor=x_kmajor, w_kmajor=w_kmajor)
    layout.check(tiles, m)
    mp, np_, kp = pipeline.padded_extents(m, n, k, tiles, interpret)
    operands = [
        pipeline.pad_to(x, (kp, mp) if x_kmajor else (mp, kp)),
        pipeline.pad_to(w, (np_, kp) if w_kmajor else (kp, np_)),
    ]
    if b is not None:
        operands.append(pipeline.pad_to(b, (np_,)))
    if residual is not None:
        operands.append(pipeline.pad_to(residual, (mp, np_)))
    kernel = functools.partial(
        _linear_act_fwd_kernel,
        activation=activation,
        has_bias=b is not None,
        has_residual=residual is not None,
        tiles=tiles,
        interpret=interpret,
        operands=layout,
    )
    y = pipeline.launch(
        kernel, operands, (mp, np_), x.dtype, tiles, name="linear_act_fwd", interpret=interpret
    )
    return y if (mp, np_) == (m, n) else y[:m, :n]


# ==== public function =============================================================================
def linear_act(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None = None,
    *,
    activation: str = "identity",
    residual: jax.Array | None = None,
    config: TileConfig | None = None,
    fp32_precision: str = "ieee",
    interpret: bool | None = None,
) -> jax.Array:
    """act(x @ w + b) (+ residual) for x [..., K], w [K, N], b [N]; returns [..., N] in x.dtype.
    `interpret`: run under the Mosaic GPU interpreter (None: where there is no GPU)."""
    dtype, k, n = check_layer(
        ADAPTER,
        x,
        w,
        b,
        residual=residual,
        activation=activation,
        config=config,
        fp32_precision=fp32_precision,
    )
    interpret = interpret_mode() if interpret is None else interpret
    lead = x.shape[:-1]
    m = math.prod(lead)
    x2d = x.reshape(m, k)
    reason = pipeline.unsupported_reason(m, n, k, dtype)
    if reason is not None:
        raise NotImplementedError(reason)
    if config is None:
        config = pipeline.default_config(FAMILY, m, n, k, dtype, interpret=interpret)
    pipeline.check_config(config, dtype, num_weights=1, residual=residual is not None)
    r2d = residual.reshape(m, n) if residual is not None else None
    y = linear_act_fwd(
        x2d,
        w,
        b,
        r2d,
        activation=activation,
        config=config,
        fp32_precision=fp32_precision,
        interpret=interpret,
    )
    return y.reshape(*lead, n)
