"""gated on Mosaic GPU: h = act(x·W + b) ⊙ (x·V + c) as ONE GEMM over the packed [W|V] operand.

    h[m, n] = act(Σ_k x[m, k]·W[k, n] + b[n]) · (Σ_k x[m, k]·V[k, n] + c[n])   (fp32, rounded once)

Operands: `wv` [K, 2·Np] and `bc` [2·Np], W and V (b and c) interleaved in blocks of PACK_BLOCK =
64 columns (common/packing.py; packed once, by the front or `pack_params`). A block's operand tile
is 2·BLOCK_N packed columns — BLOCK_N/64 whole (gate, up) pairs — read by ONE wgmma per K step into
one fp32 accumulator per compute warpgroup, so X is read once from shared memory and there is one
wgmma group to wait on, not two. Grid and pipeline: `pipeline.persistent_matmul` (persistent,
grouped snaking tile order, warp-specialised TMA pipeline; the module table in pipeline.py). The
epilogue splits each 64-row slice of the accumulator into its 64-column gate and up blocks (an
outer split: no data moves between threads), adds their biases, computes act(g)·u in fp32, casts,
and stores only the hidden h [M, n] by TMA through shared memory (the saving forward's
`store_preact` stores the packed pre-activation too). Ragged M, n, K need no padding:
TMA zero-fills reads past the arrays (the packed zero columns meet only outputs ≥ n) and clips the
stores.

Sibling, not twin: jax_impl/gated.py (Pallas-Triton) and torch_impl/gated.py (Triton) export the
same names; torch_impl/tma/gated.py is the Hopper Triton counterpart with this signature. fp16/bf16
only, K and n multiples of 8 (TMA's 16-byte strides); other inputs raise NotImplementedError naming
the fallback. Without a GPU it runs under the Mosaic GPU interpreter.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ...common.config import TileConfig
from ...common.packing import PACK_BLOCK
from ...common.validate import check_packed_gated
from .. import compat
from ..activations import apply_activation, round_to_dtype
from ..compat import interpret_mode
from ..front import ADAPTER
from . import pipeline
from .pipeline import EPI_M, Outputs, Tiles, persistent_matmul, row_vector

FAMILY = "gated"
P = PACK_BLOCK


# ==== forward kernel ==============================================================================
def _gated_fwd_kernel(
    *refs: Any,
    activation: str,
    has_bias: bool,
    tiles: Tiles,
    interpret: bool,
    outputs: Outputs = pipeline.PLAIN_OUTPUT,
) -> None:
    store_preact = outputs.preact
    x_gmem, wv_gmem, *rest = refs
    bc_gmem = rest.pop(0) if has_bias else None
    o_gmem, z_gmem = rest if store_preact else (rest[0], None)
    dtype = o_gmem.dtype
    pairs = tiles.epi_n // P  # (gate, up) block pairs per epilogue slice

    def epilogue(
        acc: jax.Array, bc_ref: Any, rows: slice, en: int, o_slot: Any, z_slot: Any
    ) -> None:
        # 3. compute: per pair j of the slice, h = act(g + b) · (u + c) in fp32, rounded once
        # (the packed pre-activation pair [g + b | u + c] to z_slot where it is kept)
        for p in range(pairs):
            j = en * pairs + p  # pair index in this warpgroup's accumulator
            gate, up = (
                acc[rows, 2 * j * P : 2 * j * P + P],
                acc[rows, 2 * j * P + P : 2 * (j + 1) * P],
            )
            if bc_ref is not None:
                gate = gate + row_vector(bc_ref.at[pl.ds(2 * j * P, P)], EPI_M, interpret=interpret)
                up = up + row_vector(bc_ref.at[pl.ds(2 * j * P + P, P)], EPI_M, interpret=interpret)
            if z_slot is not None:
                z_slot.at[:, pl.ds(2 * p * P, P)][...] = round_to_dtype(gate, dtype, interpret)
                z_slot.at[:, pl.ds(2 * p * P + P, P)][...] = round_to_dtype(up, dtype, interpret)
            h = apply_activation(gate, activation, fast=pipeline.APPROX_MATH) * up
            dst = o_slot if pairs == 1 else o_slot.at[:, pl.ds(p * P, P)]
            dst[...] = round_to_dtype(h, dtype, interpret)

    # 1. program -> tile, 2. load, 4. store: the shared persistent driver
    persistent_matmul(
        x_gmem, wv_gmem, bc_gmem, None, o_gmem, tiles=tiles, epilogue=epilogue,
        outputs=outputs, z_gmem=z_gmem,
    )  # fmt: skip


# ==== launcher ====================================================================================
def gated_fwd(
    x: jax.Array,
    wv: jax.Array,
    bc: jax.Array | None,
    *,
    n: int,
    activation: str,
    config: TileConfig,
    fp32_precision: str = "ieee",
    interpret: bool | None = None,
    store_preact: bool = False,
    staging_slots: int = 2,
) -> Any:
    """act(x @ w + b) * (x @ v + c) for 2-D x [M, K] and the packed wv [K, 2·Np], bc [2·Np] (or
    None) of a layer of width n; returns h [M, n] in x.dtype.

    One kernel call on the operands as they are (M ≥ 8 not a multiple of 8 is padded,
    `pipeline.padded_extents`); M = 0 returns an empty array without a launch.
    fp32_precision is taken for the twins' signature (16-bit products are exact in fp32).
    `store_preact` (the saving forward): returns (h, zg) with zg the
    packed pre-activation [M, 2·Np] = x @ wv + bc, as jax_impl/gated.py stores it.
    `staging_slots`: 1 halves the epilogue's shared memory (`pipeline.Outputs.slots`).
    """
    del fp32_precision
    if interpret is None:
        interpret = interpret_mode()
    m, k = x.shape
    if m == 0:
        empty = jnp.zeros((0, n), x.dtype)
        return (empty, jnp.zeros((0, wv.shape[1]), x.dtype)) if store_preact else empty
    tiles = pipeline.plan_tiles(config, FAMILY)
    outputs = Outputs(preact=store_preact, slots=staging_slots)
    outputs.check(tiles)
    if (
        interpret
        and store_preact
        and bc is not None
        and tiles.warp_specialize
        and not compat.mosaic_interpreter_stores_gated_preact()
    ):
        raise NotImplementedError(
            f"store_preact: jax {jax.__version__}'s Mosaic GPU interpreter hangs on the "
            "warp-specialised gated kernel storing its pre-activation with a bias "
            "(compat.mosaic_interpreter_stores_gated_preact); interpret with jax >= 0.11, run "
            "on the GPU, or use a config with warp_specialize=False"
        )
    mp, np_, kp = pipeline.padded_extents(m, n, k, tiles, interpret)
    width = max(wv.shape[1], 2 * np_)  # > 2·Np only under the jax 0.10 interpreter
    operands = [pipeline.pad_to(x, (mp, kp)), pipeline.pad_to(wv, (kp, width))]
    if bc is not None:
        operands.append(pipeline.pad_to(bc, (width,)))
    kernel = functools.partial(
        _gated_fwd_kernel,
        activation=activation,
        has_bias=bc is not None,
        tiles=tiles,
        interpret=interpret,
        outputs=outputs,
    )
    outs = pipeline.launch(
        kernel, operands, (mp, np_), x.dtype, tiles, name="gated_fwd", interpret=interpret,
        outputs=outputs, preact_cols=width,
    )  # fmt: skip
    if not store_preact:
        return outs if (mp, np_) == (m, n) else outs[:m, :n]
    h, zg = outs
    return h[:m, :n], zg[:m, : wv.shape[1]]


# ==== public function =============================================================================
def gated(
    x: jax.Array,
    wv: jax.Array,
    bc: jax.Array | None = None,
    *,
    n: int,
    activation: str = "silu",
    config: TileConfig | None = None,
    fp32_precision: str = "ieee",
    interpret: bool | None = None,
) -> jax.Array:
    """act(x @ w + b) * (x @ v + c) for x [..., K] and the packed wv [K, 2·Np], bc [2·Np] of a
    gated layer of width n (`jax_impl.packing.pack_gated`); returns [..., n] in x.dtype.
    `interpret`: run under the Mosaic GPU interpreter (None: where there is no GPU). The W
    branch's activation may be "identity" (the bilinear GLU variant)."""
    dtype, k, n = check_packed_gated(
        ADAPTER,
        x,
        wv,
        bc,
        n=n,
        activation=activation,
        config=config,
        fp32_precision=fp32_precision,
        impl="pallas_mosaic",
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
    pipeline.check_config(config, dtype, num_weights=2, residual=False)
    h = gated_fwd(
        x2d,
        wv,
        bc,
        n=n,
        activation=activation,
        config=config,
        fp32_precision=fp32_precision,
        interpret=interpret,
    )
    return h.reshape(*lead, n)
