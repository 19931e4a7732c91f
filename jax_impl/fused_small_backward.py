"""fused_small's training: a saving forward and a whole-MLP backward, 3 Pallas-Triton launches a
step with every dW on chip (else 3-4, 2 + 2·C in C row chunks).

Formula (the float64 twin is `common.reference.backward`; backward.py has the per-layer form):
the output layer is plain identity (the spec's rule), so dZ_{L-1} = dy; for l = L-1 … 1
    dh = dZ_l·W_lᵀ (gated: dz·Wᵀ + dg·Vᵀ)                             fp32, in registers
    plain:  dZ_{l-1} = round(dh ⊙ act'(z_{l-1}))                       [M, N]
            (relu: act' read off the layer's output h_l, backward.py's `_dact_from_output`)
    gated:  dZ_{l-1} = round([dh ⊙ g ⊙ act'(z) | dh ⊙ act(z)])         packed [M, 2·Np]
and dx = round(dZ_0·W_0ᵀ); dW_l = h_lᵀ·dZ_l (gated: the packed dwv), db_l = Σ_m dZ_l.

Launches (a 5-layer MLP: 4 a step where the per-layer path launches 20, `launch_count`):
1. `_fused_small_fwd_kernel` with SAVE (fused_small.py) — y, and per hidden layer h_{l+1} and z_l
   (gated: the packed [z|g]; none for an identity or relu activation: act' is 1, or relu's read
   off h_{l+1}), the layout and rounding of backward.forward_saving(saved="preact"), so either
   backward takes either forward's residuals.
2. `_fused_small_dgrad_kernel` (kernel A) — the persistent grid of the forward: a program loads
   every layer's transposed weight tiles once (`hoist`, else per row tile) and walks its row tiles
   through the layers in reverse; dh never leaves registers, act' is applied on the fp32
   accumulator (dh is not rounded first, as in backward.py's dgrad epilogue), dZ_l is rounded once
   to the compute dtype and stored (kernel B needs it), and dx.
3. `_fused_small_wgrad_kernel` (kernel B) — every layer's weight and bias gradients in ONE launch:
   grid (layers × K-tiles of BLOCK_R rows of dW, S runs of M); a program picks its layer in a
   compile-time-unrolled branch (its widths are constants there) and reduces hᵀ·dZ over its run of
   whole BLOCK_K-row steps, `_wgrad_kernel`'s loop (backward.py). S from
   `common.tiling.wgrad_splits` over all the layers' tiles: S = 1 stores dW, db in the param dtype;
4. S > 1: fp32 partials [S, K, Nc] / [S, Nc] per layer, then `_fused_small_wgrad_sum_kernel` adds
   each element's S partials in the fixed order s = 0, 1, … and rounds once (`_wgrad_sum_kernel`'s
   loop, over every layer's dw and db in one launch). Deterministic: no atomics.

dW inside kernel A (`DW_ON_CHIP`, where `common.tiling.small_wgrad_on_chip` holds; mlp_backward's
`on_chip` forces either way): each program also loads every layer's input tile (x, the saved h_l,
transposed as kernel B reads it) and adds hᵀ·dZ_l and Σ dZ_l to fp32 accumulators it carries
through its whole row loop (`_wgrad_zeros`, `_wgrad_accumulate`), stores them once as its partial
(`_store_wgrad`, row pid of [P, D_IN, NC] per layer), and the sum kernel adds the P partials in
program order and rounds once (deterministic, no atomics). No dZ leaves registers: 2 launches for
the backward, no chunks, the dZ bytes and kernel B gone. The price is registers: nerf-64x5's five
64×64 fp32 accumulators are 80 a thread at 8 warps, and ptxas counts grow with every layer well
past that. 128-row tiles (two warpgroups on two chains of products: nerf-64x5 on the H200 704 µs
against 1037 at 64 rows and 1479 for kernels A and B); the path is taken where it was measured to
win or tie against kernels A and B (`common.tiling.SMALL_WGRAD_ON_CHIP_LAYERS`: gated layers and
64-wide relu most, not deep 16-wide plain MLPs, whose dZ traffic is small).

Row chunks (`common.tiling.backward_chunks`; kernels A and B): the dZs are M × Σ width × itemsize
(nerf-64x5 at M = 2,097,152: 1 GiB, the step's measured peak 2562 MiB against eager torch's 1792).
Where they pass SMALL_DZ_BUDGET (128 MiB) the rows go in C chunks on whole row tiles: per chunk
kernel A then kernel B (its S runs' fp32 partials into its rows of ONE workspace [Σ S, …] per
gradient), then one sum kernel over all the partials in the fixed order (chunk, run): deterministic,
the same rounding points, another order of additions than C = 1 (within the tolerance policy). Cost:
2 + 2·C launches a step (nerf at 2M rows: 18 for 4) and 16 MiB of partials (208 runs) for 2;
predicted peak there 2562 − 896 + 14 ≈ 1680 MiB. Below the budget C = 1: today's launches, bits.
Kernels A and B read the whole arrays at the chunk's row offset (ROW0; a slice would be an XLA
copy); dx and the workspace pass from chunk to chunk through input_output_aliases, updated in place;
the whole loop is one jit, so XLA's buffer assignment reuses one chunk's dZ buffers for the next
(checked: nerf-64x5 at 2M rows with the kernels as opaque calls, every chunk's four dZs at the same
offsets, 128 MiB). ROW0 and the first run are compile-time constants: each chunk compiles its own
kernels A and B (C of each per shape, once; Triton's pointers need no such thing).

Rounding points: those of backward.py (dZ and dx in the compute dtype, dW and db in the param
dtype, fp32 accumulation everywhere). Against `backward.mlp_backward` the order of additions is
the same where the tiles are — a pinned config whose tiles span the padded width 64 (its packed
dgrad then steps over the gate block, then the up block: the two products dz·Wᵀ + dg·Vᵀ here) —
and so are the bits (tested on torch); elsewhere equal within the tolerance policy.

Refs are whole arrays addressed with `pl.ds` windows and masks (index arrays for the transposed
weight tiles), as fused_small.py's are. 16-bit tiles upcast after each load when interpreting.
Twin: torch_impl/fused_small_backward.py (Triton, same names and sections).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from fusedmlp.common.config import TileConfig
from fusedmlp.common.packing import PACK_BLOCK, packed_names, packed_width
from fusedmlp.common.spec import MLPSpec
from fusedmlp.common.tiling import (
    INTERPRET_NUM_SMS,
    NUM_SMS,
    WGRAD_SUM_BLOCK,
    WGRAD_SUM_UNROLL,
    WGRAD_SUM_WARPS,
    SmallConfig,
    backward_chunks,
    cdiv,
    fused_small_programs,
    padded_width,
    small_config_for,
    small_wgrad_on_chip,
    wgrad_splits,
)
from fusedmlp.common.validate import check_saved

from .activations import apply_activation, apply_activation_grad, round_to_dtype
from .compat import interpret_mode, quiet_pallas_triton
from .fused_small import (
    _fused_small_fwd_kernel,
    _packed_load,
    _packed_store,
    dot_precision,
    layer_params,
    supports,
)
from .tf32 import tf32_operand

WGRAD_ROWS = 64  # rows of a layer's dW per kernel-B program (its fp32 accumulator: 64 × WIDTH)


# ---- forward kernel: the saving forward ----------------------------------------------------------
# twin-diff: `_fused_small_fwd_kernel` with SAVE=True (fused_small.py), where the Triton twin has a
# second kernel `_fused_small_saving_kernel` of the same rows.


# ---- backward kernel A: dZ of every layer (and dx), the layers in reverse per row tile -----------
def _layer_operands_t(
    w_ref, d_in, d_out,
    WIDTH, GATED_LAYER, PACK,
):  # fmt: skip
    """One layer's zero-padded weight tiles transposed, [WIDTH (output lanes), WIDTH (input
    lanes)]: Wᵀ (the gate's, gated) and Vᵀ (gated; else Wᵀ again), gathered through index arrays
    (no transpose materialised)."""
    lanes = jnp.arange(WIDTH)
    # a gated layer's gate lanes are packed columns 2·PACK·(c // PACK) + c % PACK, up lanes + PACK
    cols = (lanes // PACK) * (2 * PACK) + lanes % PACK if GATED_LAYER else lanes
    # twin-diff: rows and columns as index arrays (a gather) where the twin adds offsets
    ok = (lanes[None, :] < d_in) & (lanes[:, None] < d_out)
    wt = plgpu.load(w_ref.at[lanes[None, :], cols[:, None]], mask=ok, other=0.0)
    vt = wt
    if GATED_LAYER:
        vt = plgpu.load(w_ref.at[lanes[None, :], cols[:, None] + PACK], mask=ok, other=0.0)
    return wt, vt


def _dact_step(
    acc, z_ref, dz_ref, row0, z_row0, row_ok, z_tile,
    N, ACTIVATION, GATED_LAYER,
    DACT, BLOCK_M, WIDTH, PACK,
    INTERPRET, STORE, Z_GIVEN,
):  # fmt: skip
    """dh (the fp32 accumulator [BLOCK_M, WIDTH]; lanes: the columns of the hidden layer of
    width N) -> that layer's dZ, rounded once to the compute dtype, stored where STORE ([M, N], or
    the packed [M, 2·Np]: backward.py's `_dact_epilogue` in registers) and returned as the next
    product's operands (dz, dg; dg = dz for a plain layer). Lanes past N are exact zeros. z_ref:
    the saved z, or for relu the layer's output h (relu' of h is relu' of z, NaN kept); Z_GIVEN:
    that tile is z_tile already (plain layers; the on-chip dW path loaded it as a layer input).
    twin-diff: z_row0, the tile's first row in z_ref (a chunk's tile reads the whole array's z at
    its row offset; the twin passes row views)."""
    lanes = jnp.arange(WIDTH)
    lane_ok = lanes[None, :] < N
    dtype = dz_ref.dtype
    if GATED_LAYER:
        NP = (N + PACK - 1) // PACK * PACK
        # 2. load: the saved packed [z|g] tile of this row tile
        z, g = _packed_load(z_ref, z_row0, row_ok, BLOCK_M, NP, WIDTH, PACK)
        z = z.astype(jnp.float32)
        g = g.astype(jnp.float32)
        # 3. compute: dz = dh ⊙ g ⊙ act'(z), dg = dh ⊙ act(z), in fp32
        dz = jnp.where(lane_ok, acc * g * apply_activation_grad(z, ACTIVATION), 0.0)
        dg = jnp.where(lane_ok, acc * apply_activation(z, ACTIVATION), 0.0)
        # 4. store: one rounding, the packed layout
        if STORE:
            _packed_store(dz_ref, row0, row_ok, dz, dg, BLOCK_M, NP, WIDTH, PACK, INTERPRET)
        dz = round_to_dtype(dz, dtype, INTERPRET)
        dg = round_to_dtype(dg, dtype, INTERPRET)
    else:
        window = (pl.ds(row0, BLOCK_M), pl.ds(0, WIDTH))
        ok = row_ok[:, None] & lane_ok
        dz = acc
        if DACT:  # else an identity activation: act' = 1, nothing to read
            if Z_GIVEN:
                z = z_tile.astype(jnp.float32)
            else:
                z_window = (pl.ds(z_row0, BLOCK_M), pl.ds(0, WIDTH))
                z = plgpu.load(z_ref.at[z_window], mask=ok, other=0.0).astype(jnp.float32)
            dz = acc * apply_activation_grad(z, ACTIVATION)
        dz = round_to_dtype(jnp.where(lane_ok, dz, 0.0), dtype, INTERPRET)
        if STORE:
            plgpu.store(dz_ref.at[window], dz, mask=ok)
        dg = dz
    if INTERPRET:  # the twin's arithmetic: fp32 tiles under its interpreter
        dz = dz.astype(jnp.float32)
        dg = dg.astype(jnp.float32)
    return dz, dg


def _wgrad_zeros(NUM_LAYERS, WIDTH, GATED, HAS_BIAS):
    """The on-chip dW path's fp32 accumulators, per layer (dw, dv, db, dc) [WIDTH (input lanes),
    WIDTH (output lanes)] and [WIDTH]: dv and dc are only carried for a gated hidden layer, db and
    dc only with a bias (an unused entry is a 1-element placeholder the loop never touches)."""
    accs = ()
    for layer in range(NUM_LAYERS):
        dw = jnp.zeros((WIDTH, WIDTH), dtype=jnp.float32)
        dv = jnp.zeros((1, 1), dtype=jnp.float32)
        db = jnp.zeros((WIDTH,) if HAS_BIAS else (1,), dtype=jnp.float32)
        dc = jnp.zeros((1,), dtype=jnp.float32)
        if GATED and layer != NUM_LAYERS - 1:
            dv = jnp.zeros((WIDTH, WIDTH), dtype=jnp.float32)
            dc = jnp.zeros((WIDTH,) if HAS_BIAS else (1,), dtype=jnp.float32)
        accs = accs + ((dw, dv, db, dc),)  # noqa: RUF005 (the twin's tuple, grown per layer)
    return accs


def _wgrad_accumulate(
    accs, ht, d, dg,
    GATED_LAYER, HAS_BIAS, DOT_PRECISION,
):  # fmt: skip
    """One row tile's share of a layer's gradients added to its accumulators: dw += hᵀ·dz (gated:
    dv += hᵀ·dg), db += Σ_rows dz (dc += Σ_rows dg) — kernel B's product and sums, on chip. ht:
    the layer input's tile transposed, [WIDTH, BLOCK_M]."""
    dw, dv, db, dc = accs
    dw = dw + plgpu.dot(
        tf32_operand(ht, DOT_PRECISION), tf32_operand(d, DOT_PRECISION), precision=DOT_PRECISION
    )
    if GATED_LAYER:
        dv = dv + plgpu.dot(
            tf32_operand(ht, DOT_PRECISION),
            tf32_operand(dg, DOT_PRECISION),
            precision=DOT_PRECISION,
        )
    if HAS_BIAS:
        db = db + jnp.sum(d.astype(jnp.float32), axis=0)
        if GATED_LAYER:
            dc = dc + jnp.sum(dg.astype(jnp.float32), axis=0)
    return dw, dv, db, dc


def _fused_small_dgrad_kernel(
    dy_ref, *refs,
    M, TILES_PER_PROGRAM,
    WIDTHS, NUM_LAYERS, WIDTH,
    BLOCK_M, ACTIVATION, GATED,
    DACT, PACK, HOIST,
    DOT_PRECISION, INTERPRET, ROW0=0,
    DW_ON_CHIP=False, HAS_BIAS=False, RELU_FROM_OUTPUT=False,
):  # fmt: skip
    # twin-diff: refs arrive flat: the weights, the act' operands (DACT: the kept zs, or for relu
    # the outputs h_1 …), then either (kernels A and B) — a chunk past the first: the dx being
    # assembled, aliased to the dx output, never read — the outputs dZ_0 … dZ_{L-2} and dx
    # (always: jax's custom_vjp asks for every input's cotangent, no NEED_DX); or (DW_ON_CHIP)
    # the layer inputs h_0 = x, h_1 … (each read whole, its strides known), then the outputs dx,
    # every layer's dW partials [P·D_IN, NC] and, with a bias, db partials [P, NC].
    # A chunk (mlp_backward): rows ROW0 … ROW0 + M - 1 of dy, the zs and dx (whole arrays, read
    # and written at that offset, where the twin passes row views); its dZs are [M, …].
    # DW_ON_CHIP: no dZ leaves the program — each layer's dW (and db) is accumulated over the
    # program's row tiles in fp32 registers from its input and stored once as the program's
    # partial, rows pid·D_IN … of its dW partials (row pid of db's); the sum kernel adds the P
    # partials in order. RELU_FROM_OUTPUT: the act' operand of layer l - 1 is that same h_l tile.
    L = NUM_LAYERS
    w_refs = refs[:L]
    z_refs = refs[L : 2 * L - 1] if DACT else ()
    if DW_ON_CHIP:
        h_refs = refs[L + len(z_refs) : L + len(z_refs) + L]
        outs = refs[L + len(z_refs) + L :]
        dx_ref, dw_refs = outs[0], outs[1 : 1 + L]
        db_refs = outs[1 + L :] if HAS_BIAS else dw_refs
        dz_refs = (dy_ref,) * (L - 1)  # no dZ is stored; the stand-ins give its dtype
    else:
        dz_refs = refs[len(refs) - L : len(refs) - 1]
        dx_ref = refs[-1]
    z_refs = z_refs or dz_refs
    # 1. program -> tile: a persistent program takes row tiles pid, pid + P, pid + 2P, ...
    pid = pl.program_id(0)
    num_programs = pl.num_programs(0)
    lanes = jnp.arange(WIDTH)
    last = NUM_LAYERS - 1

    # 2. load: HOIST — every layer's transposed weight tiles once per program
    tiles = ()
    if HOIST:
        for layer in range(NUM_LAYERS):
            operands = _layer_operands_t(
                w_refs[layer],
                WIDTHS[layer],
                WIDTHS[layer + 1],
                WIDTH,
                GATED and layer != last,
                PACK,
            )
            tiles = tiles + (operands,)  # noqa: RUF005 (the twin's tuple, grown per layer)
    accs = ()
    if DW_ON_CHIP:
        accs = _wgrad_zeros(NUM_LAYERS, WIDTH, GATED, HAS_BIAS)

    def row_tile(i, accs):
        start = (pid + i * num_programs) * BLOCK_M
        rows = start + jnp.arange(BLOCK_M)
        row_ok = rows < M
        # 2. load: dy, the output layer's dZ (an identity layer: act' = 1)
        d = plgpu.load(
            dy_ref.at[pl.ds(ROW0 + start, BLOCK_M), pl.ds(0, WIDTH)],
            mask=row_ok[:, None] & (lanes[None, :] < WIDTHS[NUM_LAYERS]),
            other=0.0,
        )
        if INTERPRET:
            d = d.astype(jnp.float32)  # the twin's arithmetic: fp32 tiles under its interpreter
        dg = d

        # 3. compute: the layers in reverse, dh in registers, act' on its fp32 accumulator
        for layer in range(last, -1, -1):
            h = d  # a stand-in: the layer input is only loaded for the on-chip dW
            if DW_ON_CHIP:
                # 2. load: the layer's input h_l (x for layer 0) transposed, [WIDTH, BLOCK_M],
                # zero past its width (kernel B's hᵀ tile: the same product, the same bits)
                # twin-diff: gathered through index arrays where the twin adds offsets; and
                # always so, where the twin loads dy and the layer inputs through tensor
                # descriptors when TMA's 16-byte rule holds (TMA_LOADS: Pallas-Triton has none)
                ht = plgpu.load(
                    h_refs[layer].at[rows[None, :], lanes[:, None]],
                    mask=(lanes[:, None] < WIDTHS[layer]) & row_ok[None, :],
                    other=0.0,
                )
                if INTERPRET:
                    ht = ht.astype(jnp.float32)
                # 3. compute: this row tile's dW_l = h_lᵀ·dZ_l (and db_l) into the accumulators
                layer_accs = _wgrad_accumulate(
                    accs[layer], ht, d, dg, GATED and layer != last, HAS_BIAS, DOT_PRECISION
                )
                accs = accs[:layer] + (layer_accs,) + accs[layer + 1 :]  # noqa: RUF005 (as above)
                h = ht.T  # relu's act' operand of layer - 1 (RELU_FROM_OUTPUT)
            if HOIST:
                wt, vt = tiles[layer]
            else:
                wt, vt = _layer_operands_t(
                    w_refs[layer], WIDTHS[layer], WIDTHS[layer + 1], WIDTH,
                    GATED and layer != last, PACK,
                )  # fmt: skip
            if INTERPRET:
                wt = wt.astype(jnp.float32)
                vt = vt.astype(jnp.float32)
            acc = plgpu.dot(
                tf32_operand(d, DOT_PRECISION),
                tf32_operand(wt, DOT_PRECISION),
                precision=DOT_PRECISION,
            )
            if GATED and layer != last:
                acc = acc + plgpu.dot(
                    tf32_operand(dg, DOT_PRECISION),
                    tf32_operand(vt, DOT_PRECISION),
                    precision=DOT_PRECISION,
                )
            if layer > 0:
                # 4. store (inside, unless on chip): dZ of hidden layer - 1
                d, dg = _dact_step(
                    acc, z_refs[layer - 1], dz_refs[layer - 1], start, ROW0 + start, row_ok, h,
                    WIDTHS[layer],
                    ACTIVATION, GATED, DACT, BLOCK_M, WIDTH, PACK, INTERPRET, not DW_ON_CHIP,
                    DW_ON_CHIP and RELU_FROM_OUTPUT,
                )  # fmt: skip
            else:
                # 4. store: dx, rounded once
                plgpu.store(
                    dx_ref.at[pl.ds(ROW0 + start, BLOCK_M), pl.ds(0, WIDTH)],
                    round_to_dtype(acc, dx_ref.dtype, INTERPRET),
                    mask=row_ok[:, None] & (lanes[None, :] < WIDTHS[0]),
                )
        return accs

    accs = jax.lax.fori_loop(0, TILES_PER_PROGRAM, row_tile, accs)

    if DW_ON_CHIP:
        # 4. store: the program's exact fp32 partial of every layer's gradients, row pid
        first = jnp.ones((1,), dtype=jnp.bool_)
        for layer in range(NUM_LAYERS):
            dw, dv, db, dc = accs[layer]
            _store_wgrad(
                dw_refs[layer], db_refs[layer], pid, 0, lanes < WIDTHS[layer], first,
                dw, dv, db, dc, WIDTHS[layer], WIDTHS[layer + 1], GATED and layer != last,
                HAS_BIAS, WIDTH, WIDTH, PACK, INTERPRET,
            )  # fmt: skip


# ---- backward kernel B: every layer's dW and db in one launch, and the sum of its splits --------
def _wgrad_layer(
    h_ref, d_ref, dw_ref, db_ref, pid_k, pid_s,
    M, STEPS, H_ROW0, D_ROW0, SPLIT0,
    D_IN, D_OUT, NC, GATED_LAYER,
    HAS_BIAS, WIDTH, BLOCK_K, BLOCK_R,
    PACK, DOT_PRECISION, INTERPRET,
):  # fmt: skip
    """Rows [pid_k·BLOCK_R, +BLOCK_R) of one layer's dW [D_IN, NC] (NC: D_OUT, or the packed
    2·Np) reduced over run pid_s of the rows (STEPS steps of BLOCK_K), with db from the K-tile 0
    programs. dw_ref / db_ref: the gradient itself (one run) or the fp32 partials [S·D_IN, NC] /
    [S, NC] (run pid_s's rows: the store below is exact).
    twin-diff: a chunk's rows start at H_ROW0 of h_ref and D_ROW0 of d_ref (whole arrays: x, the
    hs, dy; a chunk's own dZ: 0), and its runs are pid_s ≥ the chunk's first (where the twin
    passes views of its rows and of its workspace rows)."""
    # 1. program -> tile
    k0 = pid_k * BLOCK_R
    offs_k = k0 + jnp.arange(BLOCK_R)
    mask_k = offs_k < D_IN
    lanes = jnp.arange(WIDTH)
    lane_ok = lanes < D_OUT
    m_lo = pid_s * STEPS
    m_hi = jnp.minimum(m_lo + STEPS, pl.cdiv(M, BLOCK_K))
    m_hi = jnp.where(pid_k * BLOCK_R < D_IN, m_hi, m_lo)  # a tile past D_IN: nothing to reduce
    NP = (D_OUT + PACK - 1) // PACK * PACK

    def body(m, carry):
        acc, acc_v, db, dc = carry
        # 2. load: hᵀ tile [BLOCK_R (k), BLOCK_K (m)] and the dZ tile(s) [BLOCK_K (m), WIDTH]
        r0 = m * BLOCK_K
        offs_r = r0 + jnp.arange(BLOCK_K)
        mask_r = offs_r < M
        # twin-diff: hᵀ gathered through index arrays where the twin adds offsets (a dot_general
        # over h's rows, as backward.py's wgrad does, sums in another order than NumPy's matmul
        # under the interpreters: 9 of 6144 bf16 elements of a 24x256 gradient differed)
        a = plgpu.load(
            h_ref.at[H_ROW0 + offs_r[None, :], offs_k[:, None]],
            mask=mask_k[:, None] & mask_r[None, :],
            other=0.0,
        )
        if GATED_LAYER:
            d, dg = _packed_load(d_ref, D_ROW0 + r0, mask_r, BLOCK_K, NP, WIDTH, PACK)
        else:
            d = plgpu.load(
                d_ref.at[pl.ds(D_ROW0 + r0, BLOCK_K), pl.ds(0, WIDTH)],
                mask=mask_r[:, None] & lane_ok[None, :],
                other=0.0,
            )
            dg = d
        if INTERPRET:  # interpreter only: keeps the twin's arithmetic (see linear_act)
            a = a.astype(jnp.float32)
            d = d.astype(jnp.float32)
            dg = dg.astype(jnp.float32)
        # 3. compute: fp32 accumulate over the run; the bias gradient from the same dZ tiles
        acc = acc + plgpu.dot(
            tf32_operand(a, DOT_PRECISION), tf32_operand(d, DOT_PRECISION), precision=DOT_PRECISION
        )
        if GATED_LAYER:
            acc_v = acc_v + plgpu.dot(
                tf32_operand(a, DOT_PRECISION),
                tf32_operand(dg, DOT_PRECISION),
                precision=DOT_PRECISION,
            )
        if HAS_BIAS:
            db = jax.lax.cond(
                pid_k == 0, lambda: db + jnp.sum(d.astype(jnp.float32), axis=0), lambda: db
            )
            if GATED_LAYER:
                dc = jax.lax.cond(
                    pid_k == 0, lambda: dc + jnp.sum(dg.astype(jnp.float32), axis=0), lambda: dc
                )
        return acc, acc_v, db, dc

    acc = jnp.zeros((BLOCK_R, WIDTH), dtype=jnp.float32)
    db = jnp.zeros((WIDTH,), dtype=jnp.float32)
    acc, acc_v, db, dc = jax.lax.fori_loop(m_lo, m_hi, body, (acc, acc, db, db))

    # 4. store: one rounding to the param dtype (one run), or the exact fp32 partial
    first = (jnp.arange(1) + pid_k) == 0  # the db row: K-tile 0 only
    _store_wgrad(
        dw_ref, db_ref, SPLIT0 + pid_s, k0, mask_k, first, acc, acc_v, db, dc,
        D_IN, D_OUT, GATED_LAYER, HAS_BIAS, WIDTH, BLOCK_R, PACK, INTERPRET,
    )  # fmt: skip


def _store_wgrad(
    dw_ref, db_ref, split, k0, mask_k, first, acc, acc_v, db, dc,
    D_IN, D_OUT, GATED_LAYER,
    HAS_BIAS, WIDTH, BLOCK_R, PACK,
    INTERPRET,
):  # fmt: skip
    """Rows k0 … k0 + BLOCK_R - 1 (`mask_k`) of one layer's dW [D_IN, NC] (acc; gated: the packed
    pair acc | acc_v) and, where `first`, its db (db | dc), rounded to the refs' dtype, into run
    `split` of [S·D_IN, NC] / [S, NC] (S = 1: the gradients themselves; fp32 partials: exact).
    twin-diff: the run's rows of the [S·D_IN, NC] / [S, NC] arrays, where the twin offsets its
    pointers by the run; no NC (the refs know their shape)."""
    lanes = jnp.arange(WIDTH)
    lane_ok = lanes < D_OUT
    NP = (D_OUT + PACK - 1) // PACK * PACK
    row0 = split * D_IN + k0
    if GATED_LAYER:
        _packed_store(dw_ref, row0, mask_k, acc, acc_v, BLOCK_R, NP, WIDTH, PACK, INTERPRET)
        if HAS_BIAS:
            db2 = db.reshape(1, WIDTH)
            dc2 = dc.reshape(1, WIDTH)
            _packed_store(db_ref, split, first, db2, dc2, 1, NP, WIDTH, PACK, INTERPRET)
    else:
        plgpu.store(
            dw_ref.at[pl.ds(row0, BLOCK_R), pl.ds(0, WIDTH)],
            round_to_dtype(acc, dw_ref.dtype, INTERPRET),
            mask=mask_k[:, None] & lane_ok[None, :],
        )
        if HAS_BIAS:
            db_out = round_to_dtype(db, db_ref.dtype, INTERPRET).reshape(1, WIDTH)
            plgpu.store(
                db_ref.at[pl.ds(split, 1), pl.ds(0, WIDTH)],
                db_out,
                mask=first[:, None] & lane_ok[None, :],
            )


def _fused_small_wgrad_kernel(
    *refs,
    M, STEPS,
    WIDTHS, W_COLS, NUM_LAYERS, WIDTH,
    GATED, HAS_BIAS, K_TILES,
    BLOCK_K, BLOCK_R, PACK,
    DOT_PRECISION, INTERPRET, ROW0=0, SPLIT0=0,
):  # fmt: skip
    # h_refs[l]: layer l's input (x, then the saved h_l); d_refs[l]: its dZ (kernel A's, dy for
    # the output layer). Layer l's widths are constants only inside its branch below.
    # twin-diff: refs arrive flat (h, d, then — a chunk past the first — the workspace being
    # filled, aliased to the outputs and never read, then the outputs dw, and db with a bias);
    # no strides. A chunk: rows ROW0 … of x, the hs and dy; its runs' partials at SPLIT0 ….
    L = NUM_LAYERS
    h_refs, d_refs = refs[:L], refs[L : 2 * L]
    outs = refs[len(refs) - (2 * L if HAS_BIAS else L) :]
    dw_refs = outs[:L]
    db_refs = outs[L:] if HAS_BIAS else dw_refs
    # 1. program -> tile: (layer, K-tile) on axis 0, the run of M on axis 1
    pid = pl.program_id(0)
    layer_id = pid // K_TILES
    pid_k = pid % K_TILES
    pid_s = pl.program_id(1)
    last = NUM_LAYERS - 1
    for layer in range(NUM_LAYERS):
        # twin-diff: pl.when where the Triton twin has a runtime `if`
        pl.when(layer_id == layer)(
            functools.partial(
                _wgrad_layer,
                h_refs[layer],
                d_refs[layer],
                dw_refs[layer],
                db_refs[layer],
                pid_k,
                pid_s,
                M,
                STEPS,
                ROW0,
                ROW0 if layer == last else 0,
                SPLIT0,
                WIDTHS[layer],
                WIDTHS[layer + 1],
                W_COLS[layer],
                GATED and layer != last,
                HAS_BIAS,
                WIDTH,
                BLOCK_K,
                BLOCK_R,
                PACK,
                DOT_PRECISION,
                INTERPRET,
            )
        )


def _sum_partials(
    ws_ref, out_ref, block, S, L,
    BLOCK, UNROLL, INTERPRET,
):  # fmt: skip
    """out[block's BLOCK elements] = round(Σ_s ws[s]) for ws [S, L], the partials added in the
    fixed order s = 0, 1, …, S−1 (backward.py's `_wgrad_sum_kernel` loop)."""
    start = block * BLOCK
    mask = start + jnp.arange(BLOCK) < L

    def body(c, acc):
        for u in range(UNROLL):  # UNROLL independent loads in flight, adds in order
            s = c * UNROLL + u
            ok = s < S
            row = jnp.minimum(s, S - 1)
            # 2. load: partial s of this program's elements (fp32: no interpreter upcast)
            part = plgpu.load(ws_ref.at[row, pl.ds(start, BLOCK)], mask=mask & ok, other=0.0)
            # 3. compute: one add per partial, in the order s = 0, 1, …
            acc = jnp.where(ok, acc + part, acc)
        return acc

    acc = jnp.zeros((BLOCK,), dtype=jnp.float32)
    acc = jax.lax.fori_loop(0, pl.cdiv(S, UNROLL), body, acc)
    # 4. store: one rounding to the param dtype
    out = round_to_dtype(acc, out_ref.dtype, INTERPRET)
    plgpu.store(out_ref.at[pl.ds(start, BLOCK)], out, mask=mask)


def _fused_small_wgrad_sum_kernel(
    *refs,
    S,
    SIZES, STARTS, TARGETS,
    BLOCK, UNROLL, INTERPRET,
):  # fmt: skip
    # Targets: every layer's dw (then db, with a bias), SIZES[t] elements; programs
    # [STARTS[t], STARTS[t + 1]) sum target t's blocks.
    # twin-diff: refs arrive flat (the partials [S, SIZES[t]], then the outputs).
    ws_refs, out_refs = refs[:TARGETS], refs[TARGETS:]
    # 1. program -> tile
    pid = pl.program_id(0)
    for t in range(TARGETS):
        pl.when((pid >= STARTS[t]) & (pid < STARTS[t + 1]))(
            functools.partial(
                _sum_partials,
                ws_refs[t],
                out_refs[t],
                pid - STARTS[t],
                S,
                SIZES[t],
                BLOCK,
                UNROLL,
                INTERPRET,
            )
        )


# ---- launchers -----------------------------------------------------------------------------------
def applies(impl: str, spec: MLPSpec) -> bool:
    """Whether a training call of (resolved) implementation `impl` runs this module's forward and
    backward: fused_small, on a spec it takes. Everything else trains per layer (backward.py)."""
    return impl == "fused_small" and supports(spec) is None


def _stores_z(spec: MLPSpec) -> bool:
    # backward._stores_preact for the hidden layers (all alike): plain identity and relu keep no z.
    return spec.gated or spec.base_activation not in ("identity", "relu")


def _dact_from_output(spec: MLPSpec) -> bool:
    # backward._dact_from_output for the hidden layers: relu's act' is read off h_{l+1}.
    return not spec.gated and spec.base_activation == "relu"


def _small_statics(spec: MLPSpec, weights: tuple[jax.Array, ...], interpret: bool) -> dict:
    # twin-diff: no W_COLS for the kernels that read weights through refs (they know their shape)
    return dict(
        WIDTHS=spec.widths, NUM_LAYERS=spec.num_layers, WIDTH=padded_width(max(spec.widths)),
        GATED=spec.gated, PACK=PACK_BLOCK, DOT_PRECISION=dot_precision(spec), INTERPRET=interpret,
    )  # fmt: skip


def _grid(m: int, cfg: SmallConfig, interpret: bool) -> tuple[int, int]:
    programs = fused_small_programs(m, cfg, INTERPRET_NUM_SMS if interpret else NUM_SMS)
    return programs, cdiv(cdiv(m, cfg.block_m), programs)


def _compiler_params(cfg: SmallConfig):
    return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


@functools.partial(jax.jit, static_argnames=("spec", "config", "interpret"))
def forward_saving(
    x2d: jax.Array,
    params: Mapping[str, jax.Array],
    spec: MLPSpec,
    *,
    config: TileConfig | SmallConfig | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, tuple[jax.Array | None, ...]]:
    """(y2d, residuals) for x2d [M, d_in] and PACKED params: backward.forward_saving(
    saved="preact")'s residuals (h_0 = x2d, z_0, h_1, …, z_{L-1}; an unkept z is None) from one
    fused_small launch. Trusts its inputs."""
    interpret = interpret_mode() if interpret is None else interpret
    m = x2d.shape[0]
    cfg = small_config_for(config, spec, m, interpret=interpret, kernel="saving")
    weights, biases = layer_params(params, spec)
    stores = _stores_z(spec)
    hidden = spec.layers()[:-1]
    shapes = [jax.ShapeDtypeStruct((m, spec.d_out), x2d.dtype)]
    shapes += [jax.ShapeDtypeStruct((m, lay.d_out), x2d.dtype) for lay in hidden]
    if stores:
        shapes += [
            jax.ShapeDtypeStruct(
                (m, packed_width(lay.d_out) if lay.gated else lay.d_out), x2d.dtype
            )
            for lay in hidden
        ]
    if m == 0:
        outs = [jnp.zeros(s.shape, s.dtype) for s in shapes]
    else:
        programs, tiles = _grid(m, cfg, interpret)
        kernel = functools.partial(
            _fused_small_fwd_kernel, M=m, TILES_PER_PROGRAM=tiles, BLOCK_M=cfg.block_m,
            ACTIVATION=spec.base_activation, HAS_BIAS=spec.bias, HOIST=cfg.hoist, SAVE=True,
            STORES_Z=stores, **_small_statics(spec, weights, interpret),
        )  # fmt: skip
        with quiet_pallas_triton():
            outs = pl.pallas_call(
                kernel,
                out_shape=tuple(shapes),
                grid=(programs,),
                compiler_params=_compiler_params(cfg),
                interpret=interpret,
                name="fused_small_saving_fwd",
            )(x2d, *weights, *biases)
    y, hs = outs[0], outs[1 : len(hidden) + 1]
    zs = outs[len(hidden) + 1 :] if stores else (None,) * len(hidden)
    kept: list[jax.Array | None] = [x2d]
    for h, z in zip(hs, zs, strict=True):
        kept += [z, h]
    kept.append(None)  # the output layer: identity, no z
    return y, tuple(kept)


@functools.partial(jax.jit, static_argnames=("spec", "config", "rows", "interpret"))
def dgrad_fwd(
    dy2d: jax.Array,
    residuals: tuple[jax.Array | None, ...],
    params: Mapping[str, jax.Array],
    spec: MLPSpec,
    *,
    config: TileConfig | SmallConfig | None = None,
    rows: tuple[int, int] | None = None,
    dx: jax.Array | None = None,
    interpret: bool | None = None,
) -> tuple[list[jax.Array], jax.Array]:
    """Kernel A: (dZ_l of every hidden layer l — [M, N_l], packed [M, 2·Np_l] gated — and dx
    [M, d_in]) from dy2d [M, d_out] and the "preact" residuals. M >= 1.
    `rows` (r0, r1): rows r0 … r1-1 of dy2d and the residuals only (a chunk: its dZs are
    [r1 - r0, …]), their dx written into those rows of `dx` [M, d_in] (None: a new one)."""
    # twin-diff: always dx (no need_dx). A chunk reads the whole arrays at row offset r0 (a
    # slice would be an XLA copy) and writes its rows of dx in place: the dx argument is aliased
    # to the dx output (input_output_aliases; under jit, where nothing else holds the previous
    # chunk's dx, XLA updates the one buffer in place), so dx is neither zero-filled nor
    # assembled from per-chunk pieces (dynamic_update_slice: a copy of each chunk's rows).
    interpret = interpret_mode() if interpret is None else interpret
    full = dy2d.shape[0]
    r0, r1 = (0, full) if rows is None else rows
    m = r1 - r0
    cfg = small_config_for(config, spec, m, interpret=interpret, kernel="dgrad")
    weights, _ = layer_params(params, spec)
    # the hidden layers' act' operands: z_0, …, z_{L-2}, or for relu their outputs h_1, …, h_{L-1}
    zs = residuals[2::2] if _dact_from_output(spec) else residuals[1:-1:2]
    dact = _stores_z(spec) or _dact_from_output(spec)
    shapes = [
        jax.ShapeDtypeStruct((m, packed_width(lay.d_out) if lay.gated else lay.d_out), dy2d.dtype)
        for lay in spec.layers()[:-1]
    ]
    shapes.append(jax.ShapeDtypeStruct((full, spec.d_in), dy2d.dtype))
    programs, tiles = _grid(m, cfg, interpret)
    kernel = functools.partial(
        _fused_small_dgrad_kernel, M=m, TILES_PER_PROGRAM=tiles, BLOCK_M=cfg.block_m,
        ACTIVATION=spec.base_activation, DACT=dact, HOIST=cfg.hoist, ROW0=r0,
        **_small_statics(spec, weights, interpret),
    )  # fmt: skip
    inputs = (dy2d, *weights, *(zs if dact else ()), *(() if dx is None else (dx,)))
    with quiet_pallas_triton():
        outs = pl.pallas_call(
            kernel,
            out_shape=tuple(shapes),
            grid=(programs,),
            input_output_aliases={} if dx is None else {len(inputs) - 1: len(shapes) - 1},
            compiler_params=_compiler_params(cfg),
            interpret=interpret,
            name="fused_small_dgrad",
        )(*inputs)
    return list(outs[:-1]), outs[-1]


@functools.partial(jax.jit, static_argnames=("spec", "config", "interpret"))
def dgrad_wgrad_fwd(
    dy2d: jax.Array,
    residuals: tuple[jax.Array | None, ...],
    params: Mapping[str, jax.Array],
    spec: MLPSpec,
    *,
    config: TileConfig | SmallConfig | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Kernel A with every layer's dW on chip (`common.tiling.small_wgrad_on_chip` says where),
    then the sum of its programs' partials: (dx [M, d_in], every packed param's gradient in the
    params' dtype) from dy2d [M, d_out] and the "preact" residuals. No dZ is stored: two
    launches, no row chunks. M >= 1."""
    interpret = interpret_mode() if interpret is None else interpret
    m = dy2d.shape[0]
    cfg = small_config_for(config, spec, m, interpret=interpret, kernel="dgrad_wgrad")
    weights, _ = layer_params(params, spec)
    zs = residuals[2::2] if _dact_from_output(spec) else residuals[1:-1:2]
    dact = _stores_z(spec) or _dact_from_output(spec)
    hs = residuals[0::2]
    programs, tiles = _grid(m, cfg, interpret)
    names = _grad_names(spec)
    # dx, then every layer's fp32 dW partials [P·D_IN, NC], then (bias) its db partials [P, NC]
    shapes = [jax.ShapeDtypeStruct((m, spec.d_in), dy2d.dtype)]
    shapes += [
        jax.ShapeDtypeStruct((programs * lay.d_in, w.shape[1]), jnp.float32)
        for lay, w in zip(spec.layers(), weights, strict=True)
    ]
    if spec.bias:
        shapes += [jax.ShapeDtypeStruct((programs, w.shape[1]), jnp.float32) for w in weights]
    kernel = functools.partial(
        _fused_small_dgrad_kernel, M=m, TILES_PER_PROGRAM=tiles, BLOCK_M=cfg.block_m,
        ACTIVATION=spec.base_activation, DACT=dact, HOIST=cfg.hoist, DW_ON_CHIP=True,
        HAS_BIAS=spec.bias, RELU_FROM_OUTPUT=_dact_from_output(spec),
        **_small_statics(spec, weights, interpret),
    )  # fmt: skip
    with quiet_pallas_triton():
        dx, *parts = pl.pallas_call(
            kernel,
            out_shape=tuple(shapes),
            grid=(programs,),
            compiler_params=_compiler_params(cfg),
            interpret=interpret,
            name="fused_small_dgrad_wgrad",
        )(dy2d, *weights, *(zs if dact else ()), *hs)
    targets = [w for w, _ in names] + ([b for _, b in names] if spec.bias else [])
    outs = dict(zip(targets, parts, strict=True))
    return dx, _wgrad_grads(outs, names, weights, spec, interpret, sum_one=True)


@functools.partial(
    jax.jit, static_argnames=("spec", "config", "splits", "rows", "runs", "interpret")
)
def wgrad_fwd(
    hs: list[jax.Array],
    ds: list[jax.Array],
    params: Mapping[str, jax.Array],
    spec: MLPSpec,
    *,
    config: TileConfig | SmallConfig | None = None,
    splits: int | None = None,
    rows: tuple[int, int] | None = None,
    runs: tuple[int, int] | None = None,
    workspace: dict[str, jax.Array] | None = None,
    interpret: bool | None = None,
) -> dict[str, jax.Array]:
    """Kernel B (+ the sum of its splits): every layer's weight gradient (`w{i}`, or the packed
    `wv{i}`) and, with a bias, its bias gradient (`b{i}`/`bc{i}`), in the params' dtype, from
    the layer inputs hs[l] [M, d_in_l] and the dZs ds[l] (the last: dy). S from `wgrad_splits`
    over every layer's tiles; `splits` forces it.
    A chunk (mlp_backward): `rows` (r0, r1) of hs and dy only (ds[:-1] are that chunk's dZs),
    and `runs` (s0, total): its S runs' fp32 partials go to runs s0 … s0 + S - 1 of a workspace
    of `total` runs per gradient — `workspace` (the previous chunk's), or None: a new one — which
    is returned ({name: its partials}) in place of the gradients, for `_wgrad_grads`."""
    interpret = interpret_mode() if interpret is None else interpret
    full = hs[0].shape[0]
    r0, r1 = (0, full) if rows is None else rows
    m = r1 - r0
    cfg = small_config_for(config, spec, m, interpret=interpret, kernel="wgrad")
    weights, _ = layer_params(params, spec)
    width = padded_width(max(spec.widths))
    block_r = min(width, WGRAD_ROWS)
    k_tiles = cdiv(width, block_r)
    S, steps = wgrad_splits(spec.num_layers * k_tiles, m, cfg.block_m, splits=splits)
    s0, total = (0, S) if runs is None else runs
    names, dw_shapes, db_shapes = _grad_names(spec), [], []
    for layer, w in zip(spec.layers(), weights, strict=True):
        nc = w.shape[1]
        # S = 1: the gradients directly (as [K, Nc] / [1, Nc]); else their fp32 partials
        dtype = w.dtype if total == 1 and runs is None else jnp.float32
        dw_shapes.append(jax.ShapeDtypeStruct((total * layer.d_in, nc), dtype))
        db_shapes.append(jax.ShapeDtypeStruct((total, nc), dtype))
    if m == 0:  # a sum over no rows
        grads = {}
        for (wname, bname), layer, w in zip(names, spec.layers(), weights, strict=True):
            grads[wname] = jnp.zeros((layer.d_in, w.shape[1]), w.dtype)
            if spec.bias:
                grads[bname] = jnp.zeros((w.shape[1],), w.dtype)
        return grads
    kernel = functools.partial(
        _fused_small_wgrad_kernel, M=m, STEPS=steps, W_COLS=tuple(w.shape[1] for w in weights),
        HAS_BIAS=spec.bias, K_TILES=k_tiles, BLOCK_K=cfg.block_m, BLOCK_R=block_r,
        ROW0=r0, SPLIT0=s0, **_small_statics(spec, weights, interpret),
    )  # fmt: skip
    shapes = dw_shapes + (db_shapes if spec.bias else [])
    # the workspace's arrays in the outputs' order (every dw, then every db), aliased to them
    targets = [w for w, _ in names] + ([b for _, b in names] if spec.bias else [])
    held = [] if workspace is None else [workspace[n] for n in targets]
    inputs = (*hs, *ds, *held)
    aliases = {len(hs) + len(ds) + t: t for t in range(len(held))}
    with quiet_pallas_triton():
        outs = pl.pallas_call(
            kernel,
            out_shape=tuple(shapes),
            grid=(spec.num_layers * k_tiles, S),
            input_output_aliases=aliases,
            compiler_params=_compiler_params(cfg),
            interpret=interpret,
            name="fused_small_wgrad",
        )(*inputs)
    if runs is not None:  # a chunk's partials: the workspace, as kernel B stores it
        return dict(zip(targets, outs, strict=True))
    return _wgrad_grads(dict(zip(targets, outs, strict=True)), names, weights, spec, interpret)


def _grad_names(spec: MLPSpec) -> list[tuple[str, str]]:
    # every layer's (weight, bias) gradient names: the packed `wv{i}`, `bc{i}` where gated
    return [
        (f"wv{lay.index}", f"bc{lay.index}") if lay.gated else (f"w{lay.index}", f"b{lay.index}")
        for lay in spec.layers()
    ]


def _wgrad_grads(
    outs: dict[str, jax.Array],
    names: list[tuple[str, str]],
    weights: tuple[jax.Array, ...],
    spec: MLPSpec,
    interpret: bool,
    *,
    sum_one: bool = False,
) -> dict[str, jax.Array]:
    """The gradients from kernel B's outputs (`outs`: by name, [S·K, Nc] and [S, Nc]): as they
    are (S = 1), or their S fp32 partials summed by the sum kernel (`sum_one`: even one, the
    fp32 partial of a single program of the on-chip path, rounded there)."""
    # the targets of the sum, in the twin's order: dw_0 (db_0), dw_1 (db_1), …
    parts = []
    for (wname, bname), layer in zip(names, spec.layers(), strict=True):
        S = outs[wname].shape[0] // layer.d_in
        parts.append(outs[wname].reshape(S, -1))
        if spec.bias:
            parts.append(outs[bname])
    if S > 1 or sum_one:
        parts = _wgrad_sum(parts, [w.dtype for w in weights], spec, interpret)
    grads, t = {}, 0
    for (wname, bname), layer, w in zip(names, spec.layers(), weights, strict=True):
        grads[wname] = parts[t].reshape(layer.d_in, w.shape[1])
        t += 1
        if spec.bias:
            grads[bname] = parts[t].reshape(w.shape[1])
            t += 1
    return grads


def _wgrad_sum(
    parts: list[jax.Array], dtypes: list, spec: MLPSpec, interpret: bool
) -> list[jax.Array]:
    """The sum kernel: each target's S partials parts[t] [S, size] added in the fixed order
    s = 0, 1, … and rounded once to its layer's dtype (dtypes: one a layer)."""
    S = parts[0].shape[0]
    sizes = tuple(p.shape[1] for p in parts)
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + cdiv(size, WGRAD_SUM_BLOCK))
    summed = functools.partial(
        _fused_small_wgrad_sum_kernel, S=S,
        SIZES=sizes, STARTS=tuple(starts), TARGETS=len(parts), BLOCK=WGRAD_SUM_BLOCK,
        UNROLL=min(WGRAD_SUM_UNROLL, S), INTERPRET=interpret,
    )  # fmt: skip
    out_dtypes = [dt for dt in dtypes for _ in range(2 if spec.bias else 1)]
    with quiet_pallas_triton():
        return pl.pallas_call(
            summed,
            out_shape=tuple(
                jax.ShapeDtypeStruct((size,), dt)
                for size, dt in zip(sizes, out_dtypes, strict=True)
            ),
            grid=(starts[-1],),
            compiler_params=plgpu.CompilerParams(num_warps=WGRAD_SUM_WARPS, num_stages=1),
            interpret=interpret,
            name="fused_small_wgrad_sum",
        )(*parts)


# ---- orchestration -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1024)  # a step's host path: once per key (budget None: the
# SMALL_DZ_BUDGET of the first call)
def _chunk_spans(
    spec: MLPSpec, m: int, config: TileConfig | SmallConfig | None, dz_budget: int | None
) -> tuple[tuple[int, int], ...]:
    """The backward's row chunks (r0, r1) by `common.tiling.backward_chunks`: ((0, m),) (C = 1)
    unless the dZs pass the budget; else boundaries on whole tiles of kernel A and kernel B."""
    interpret = interpret_mode()
    tile = math.lcm(
        small_config_for(config, spec, m, interpret=interpret, kernel="dgrad").block_m,
        small_config_for(config, spec, m, interpret=interpret, kernel="wgrad").block_m,
    )
    chunks, rows = backward_chunks(spec, m, tile, budget=dz_budget)
    if chunks == 1:
        return ((0, m),)
    return tuple((r0, min(r0 + rows, m)) for r0 in range(0, m, rows))


def _chunk_splits(spec: MLPSpec, m: int, config: TileConfig | SmallConfig | None) -> int:
    """Kernel B's S over m rows (`wgrad_fwd`'s choice)."""
    cfg = small_config_for(config, spec, m, interpret=interpret_mode(), kernel="wgrad")
    width = padded_width(max(spec.widths))
    tiles = spec.num_layers * cdiv(width, min(width, WGRAD_ROWS))
    return wgrad_splits(tiles, m, cfg.block_m)[0]


@functools.partial(jax.jit, static_argnames=("spec", "spans", "config"))
def _chunked_backward(
    dy2d: jax.Array,
    residuals: tuple[jax.Array | None, ...],
    params: Mapping[str, jax.Array],
    spec: MLPSpec,
    spans: tuple[tuple[int, int], ...],
    config: TileConfig | SmallConfig | None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(dx, grads) over C > 1 row chunks: per chunk kernel A (its dZs, its rows of the one dx)
    then kernel B (its S runs' fp32 partials into its rows of one workspace [Σ S, …] per
    gradient), then ONE sum kernel adds each element's partials in the fixed order (chunk, run)
    and rounds once. No atomics."""
    # twin-diff: one jit, so that XLA sees every chunk: a chunk's dZs are dead once its kernel B
    # ran and their buffers are reused by the next chunk's (buffer assignment; the twin drops
    # references), and dx and the workspace, aliased from chunk to chunk, are updated in place.
    splits = [_chunk_splits(spec, r1 - r0, config) for r0, r1 in spans]
    total = sum(splits)
    hs = list(residuals[0::2])
    dx, workspace, s0 = None, None, 0
    for (r0, r1), S in zip(spans, splits, strict=True):
        dzs, dx = dgrad_fwd(dy2d, residuals, params, spec, config=config, rows=(r0, r1), dx=dx)
        workspace = wgrad_fwd(
            hs, [*dzs, dy2d], params, spec, config=config, rows=(r0, r1),
            runs=(s0, total), workspace=workspace,
        )  # fmt: skip
        # the next chunk's kernel A takes dx only after this chunk's kernel B: nothing else
        # orders them (kernel A depends on the previous kernel A only, through dx), and a
        # scheduler free to run two chunks' kernels A first would hold both chunks' dZs
        dx, workspace = jax.lax.optimization_barrier((dx, workspace))
        s0 += S
    weights, _ = layer_params(params, spec)
    return dx, _wgrad_grads(workspace, _grad_names(spec), weights, spec, interpret_mode())


def mlp_backward(
    dy2d: jax.Array,
    residuals: tuple[jax.Array | None, ...],
    params: Mapping[str, jax.Array],
    spec: MLPSpec,
    *,
    saved: str,
    config: TileConfig | SmallConfig | None = None,
    dz_budget: int | None = None,
    on_chip: bool | None = None,
) -> dict[str, jax.Array]:
    """backward.mlp_backward's result (same arguments, names and layouts) from kernel A with
    every dW on chip and the sum of its partials where `on_chip` (None:
    common.tiling.small_wgrad_on_chip), else kernels A and B: "x" and every packed param's
    gradient; "inputs" recomputes this module's saving forward first. Kernels A and B take the
    rows in C > 1 chunks where the dZs pass `dz_budget` bytes (None:
    common.tiling.SMALL_DZ_BUDGET)."""
    # twin-diff: no need_dx (jax's custom_vjp always asks for every input's cotangent).
    check_saved(saved)
    if saved == "inputs":
        _, residuals = forward_saving(residuals[0], params, spec, config=config)
    m = dy2d.shape[0]
    if m > 0 and (small_wgrad_on_chip(spec) if on_chip is None else on_chip):
        dx, grads = dgrad_wgrad_fwd(dy2d, tuple(residuals), params, spec, config=config)
        return {"x": dx, **grads}
    spans = _chunk_spans(spec, m, config, dz_budget)
    if len(spans) > 1:
        dx, grads = _chunked_backward(dy2d, tuple(residuals), params, spec, spans, config)
        return {"x": dx, **grads}
    if m == 0:
        dzs: list[jax.Array] = []
        dx = jnp.zeros((0, spec.d_in), dy2d.dtype)
    else:
        dzs, dx = dgrad_fwd(dy2d, tuple(residuals), params, spec, config=config)
    hs = list(residuals[0::2])
    grads = wgrad_fwd(hs, [*dzs, dy2d], params, spec, config=config)
    return {"x": dx, **{k: grads[k] for k in packed_names(spec)}}


def launch_count(
    spec: MLPSpec,
    m: int,
    config: TileConfig | SmallConfig | None = None,
    *,
    dz_budget: int | None = None,
    on_chip: bool | None = None,
) -> int:
    """Kernel launches of one training step (saving forward + backward, dx included) here: 3
    with the dWs on chip (`mlp_backward`'s `on_chip`); else 3, or 4 where the weight gradients are
    split over M, and in C > 1 row chunks 2 + 2·C (kernels A and B a chunk, one sum)."""
    if m > 0 and (small_wgrad_on_chip(spec) if on_chip is None else on_chip):
        return 3
    chunks = len(_chunk_spans(spec, m, config, dz_budget))
    if chunks > 1:
        return 2 + 2 * chunks
    return 3 + (_chunk_splits(spec, m, config) > 1)
