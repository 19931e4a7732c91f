"""fused_small's training: a saving forward and a whole-MLP backward, 3 Triton launches a step with
every dW on chip (else 3-4, 2 + 2·C in C row chunks).

Formula (the float64 twin is `common.reference.backward`; backward.py has the per-layer form):
the output layer is plain identity (the spec's rule), so dZ_{L-1} = dy; for l = L-1 … 1
    dh = dZ_l·W_lᵀ (gated: dz·Wᵀ + dg·Vᵀ)                             fp32, in registers
    plain:  dZ_{l-1} = round(dh ⊙ act'(z_{l-1}))                       [M, N]
            (relu: act' read off the layer's output h_l, backward.py's `_dact_from_output`)
    gated:  dZ_{l-1} = round([dh ⊙ g ⊙ act'(z) | dh ⊙ act(z)])         packed [M, 2·Np]
and dx = round(dZ_0·W_0ᵀ); dW_l = h_lᵀ·dZ_l (gated: the packed dwv), db_l = Σ_m dZ_l.

Launches (a 5-layer MLP: 4 a step where the per-layer path launches 20, `launch_count`):
1. `_fused_small_saving_kernel` — the forward (fused_small.py's rows, `SAVE`): y, and per hidden
   layer h_{l+1} and z_l (gated: the packed [z|g]; none for an identity or relu activation: act'
   is 1, or relu's read off h_{l+1}), the layout and rounding of
   backward.forward_saving(saved="preact"), so either backward takes either forward's residuals.
2. `_fused_small_dgrad_kernel` (kernel A) — the persistent grid of the forward: a program loads
   every layer's transposed weight tiles once (`hoist`, else per row tile) and walks its row tiles
   through the layers in reverse; dh never leaves registers, act' is applied on the fp32
   accumulator (dh is not rounded first, as in backward.py's dgrad epilogue), dZ_l is rounded once
   to the compute dtype and stored (kernel B needs it), dx where asked.
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
64-wide relu most, not deep 16-wide plain MLPs, whose dZ traffic is small). Where TMA's 16-byte
rule holds (`_tma_loads`: every tensor it reads row by row), the kernel loads dy and the layer
inputs through tensor descriptors (TMA_LOADS): each tile load then has its own barrier, waited
just before its layer, where Triton's cp.async pipeline waited for all six at the top of the tile
(nerf-64x5 on the H200: 671 -> 601 µs, the on-chip kernel and its sum).

Row chunks (`common.tiling.backward_chunks`; kernels A and B): the dZs are M × Σ width × itemsize
(nerf-64x5 at M = 2,097,152: 1 GiB, the step's measured peak 2562 MiB against eager torch's 1792).
Where they pass SMALL_DZ_BUDGET (128 MiB) the rows go in C chunks on whole row tiles: per chunk
kernel A then kernel B (its S runs' fp32 partials into its rows of ONE workspace [Σ S, …] per
gradient), then one sum kernel over all the partials in the fixed order (chunk, run): deterministic,
the same rounding points, another order of additions than C = 1 (within the tolerance policy). Cost:
2 + 2·C launches a step (nerf at 2M rows: 18 for 4) and 16 MiB of partials (208 runs) for 2;
predicted peak there 2562 − 896 + 14 ≈ 1680 MiB. Below the budget C = 1: today's launches, bits.
Each chunk's dZs are dropped before the next chunk's are allocated (the caching allocator reuses
their blocks), and kernels A and B take row views of dy, the residuals and dx (no copy).

Rounding points: those of backward.py (dZ and dx in the compute dtype, dW and db in the param
dtype, fp32 accumulation everywhere). Against `backward.mlp_backward` the order of additions is
the same where the tiles are — a pinned config whose tiles span the padded width 64 (its packed
dgrad then steps over the gate block, then the up block: the two products dz·Wᵀ + dg·Vᵀ here) —
and so are the bits (tested, plain and gated); elsewhere equal within the tolerance policy.

Under TRITON_INTERPRET=1 16-bit tiles are upcast after each load, as everywhere.
Twin: jax_impl/fused_small_backward.py (Pallas-Triton, same names and sections).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import torch
import triton
import triton.language as tl

from fusedmlp.common.config import TileConfig
from fusedmlp.common.packing import packed_names, packed_width
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
from .fused_small import (
    _fused_small_rows,
    _int64_offsets,
    _layer_names,
    _packed_load,
    _packed_store,
    _small_statics,
    supports,
)
from .launch import Launch, LaunchCache
from .runtime import INTERPRET
from .tf32 import tf32_operand
from .tma.support import TMA_ALIGN_BYTES, ensure_allocator

WGRAD_ROWS = 64  # rows of a layer's dW per kernel-B program (its fp32 accumulator: 64 × WIDTH)


# ---- forward kernel: the saving forward ----------------------------------------------------------
@triton.jit
def _fused_small_saving_kernel(
    x_ptr, w_ptrs, b_ptrs, y_ptr, h_ptrs, z_ptrs,
    M, stride_xm, stride_ym, TILES_PER_PROGRAM,
    WIDTHS: tl.constexpr, W_COLS: tl.constexpr, NUM_LAYERS: tl.constexpr, WIDTH: tl.constexpr,
    BLOCK_M: tl.constexpr, ACTIVATION: tl.constexpr, GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr, PACK: tl.constexpr, HOIST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr, STORES_Z: tl.constexpr,
    INT64_ROWS: tl.constexpr,
):  # fmt: skip
    # twin-diff: a second kernel of the forward's rows (the inference kernel keeps its signature);
    # the Pallas twin passes SAVE to the same kernel function. INT64_ROWS: the launcher's choice
    # of offset width (fused_small._int64_offsets; Pallas decides per array).
    _fused_small_rows(
        x_ptr, w_ptrs, b_ptrs, y_ptr, h_ptrs, z_ptrs,
        M, stride_xm, stride_ym, TILES_PER_PROGRAM,
        WIDTHS, W_COLS, NUM_LAYERS, WIDTH, BLOCK_M, ACTIVATION, GATED, HAS_BIAS, PACK, HOIST,
        DOT_PRECISION, INTERPRET, True, STORES_Z, INT64_ROWS, False,
    )  # fmt: skip


# ---- backward kernel A: dZ of every layer (and dx), the layers in reverse per row tile -----------
@triton.jit
def _layer_operands_t(
    w_ptr, d_in, d_out, w_cols,
    WIDTH: tl.constexpr, GATED_LAYER: tl.constexpr, PACK: tl.constexpr,
):  # fmt: skip
    """One layer's zero-padded weight tiles transposed, [WIDTH (output lanes), WIDTH (input
    lanes)]: Wᵀ (the gate's, gated) and Vᵀ (gated; else Wᵀ again), read through the weight's row
    stride (no transpose materialised)."""
    lanes = tl.arange(0, WIDTH)
    # a gated layer's gate lanes are packed columns 2·PACK·(c // PACK) + c % PACK, up lanes + PACK
    cols = (lanes // PACK) * (2 * PACK) + lanes % PACK if GATED_LAYER else lanes
    offs = lanes[None, :] * w_cols + cols[:, None]
    ok = (lanes[None, :] < d_in) & (lanes[:, None] < d_out)
    wt = tl.load(w_ptr + offs, mask=ok, other=0.0)
    vt = wt
    if GATED_LAYER:
        vt = tl.load(w_ptr + offs + PACK, mask=ok, other=0.0)
    return wt, vt


@triton.jit
def _dact_step(
    acc, z_ptr, dz_ptr, rows, row_ok, z_tile,
    N: tl.constexpr, ACTIVATION: tl.constexpr, GATED_LAYER: tl.constexpr,
    DACT: tl.constexpr, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr, PACK: tl.constexpr,
    INTERPRET: tl.constexpr, STORE: tl.constexpr, Z_GIVEN: tl.constexpr,
):  # fmt: skip
    """dh (the fp32 accumulator [BLOCK_M, WIDTH]; lanes: the columns of the hidden layer of
    width N) -> that layer's dZ, rounded once to the compute dtype, stored where STORE ([M, N], or
    the packed [M, 2·Np]: backward.py's `_dact_epilogue` in registers) and returned as the next
    product's operands (dz, dg; dg = dz for a plain layer). Lanes past N are exact zeros. z_ptr:
    the saved z, or for relu the layer's output h (relu' of h is relu' of z, NaN kept); Z_GIVEN:
    that tile is z_tile already (plain layers; the on-chip dW path loaded it as a layer input)."""
    lanes = tl.arange(0, WIDTH)
    lane_ok = lanes[None, :] < N
    dtype = dz_ptr.dtype.element_ty
    if GATED_LAYER:
        NP: tl.constexpr = (N + PACK - 1) // PACK * PACK
        # 2. load: the saved packed [z|g] tile of this row tile
        z, g = _packed_load(z_ptr, rows, row_ok, 2 * NP, BLOCK_M, NP, WIDTH, PACK)
        z = z.to(tl.float32)
        g = g.to(tl.float32)
        # 3. compute: dz = dh ⊙ g ⊙ act'(z), dg = dh ⊙ act(z), in fp32
        dz = tl.where(lane_ok, acc * g * apply_activation_grad(z, ACTIVATION), 0.0)
        dg = tl.where(lane_ok, acc * apply_activation(z, ACTIVATION), 0.0)
        # 4. store: one rounding, the packed layout
        if STORE:
            _packed_store(dz_ptr, rows, row_ok, 2 * NP, dz, dg, BLOCK_M, NP, WIDTH, PACK, INTERPRET)
        dz = round_to_dtype(dz, dtype, INTERPRET)
        dg = round_to_dtype(dg, dtype, INTERPRET)
    else:
        offs = rows[:, None] * N + lanes[None, :]
        ok = row_ok[:, None] & lane_ok
        dz = acc
        if DACT:  # else an identity activation: act' = 1, nothing to read
            if Z_GIVEN:
                z = z_tile.to(tl.float32)
            else:
                z = tl.load(z_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            dz = acc * apply_activation_grad(z, ACTIVATION)
        dz = round_to_dtype(tl.where(lane_ok, dz, 0.0), dtype, INTERPRET)
        if STORE:
            tl.store(dz_ptr + offs, dz, mask=ok)
        dg = dz
    if INTERPRET:  # interpreter bf16 arithmetic is broken: compute on fp32 tiles
        dz = dz.to(tl.float32)
        dg = dg.to(tl.float32)
    return dz, dg


@triton.jit
def _wgrad_zeros(
    NUM_LAYERS: tl.constexpr, WIDTH: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr
):  # fmt: skip
    """The on-chip dW path's fp32 accumulators, per layer (dw, dv, db, dc) [WIDTH (input lanes),
    WIDTH (output lanes)] and [WIDTH]: dv and dc are only carried for a gated hidden layer, db and
    dc only with a bias (an unused entry is a 1-element placeholder the loop never touches)."""
    accs = ()
    for layer in tl.static_range(NUM_LAYERS):
        dw = tl.zeros((WIDTH, WIDTH), dtype=tl.float32)
        dv = tl.zeros((1, 1), dtype=tl.float32)
        db = tl.zeros((WIDTH,) if HAS_BIAS else (1,), dtype=tl.float32)
        dc = tl.zeros((1,), dtype=tl.float32)
        if GATED and layer != NUM_LAYERS - 1:
            dv = tl.zeros((WIDTH, WIDTH), dtype=tl.float32)
            dc = tl.zeros((WIDTH,) if HAS_BIAS else (1,), dtype=tl.float32)
        accs = accs + ((dw, dv, db, dc),)  # noqa: RUF005 (no starred tuples in Triton's frontend)
    return accs


@triton.jit
def _wgrad_accumulate(
    accs, ht, d, dg,
    GATED_LAYER: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One row tile's share of a layer's gradients added to its accumulators: dw += hᵀ·dz (gated:
    dv += hᵀ·dg), db += Σ_rows dz (dc += Σ_rows dg) — kernel B's product and sums, on chip. ht:
    the layer input's tile transposed, [WIDTH, BLOCK_M]."""
    dw, dv, db, dc = accs
    dw = tl.dot(
        tf32_operand(ht, DOT_PRECISION),
        tf32_operand(d, DOT_PRECISION),
        dw,
        input_precision=DOT_PRECISION,
    )
    if GATED_LAYER:
        dv = tl.dot(
            tf32_operand(ht, DOT_PRECISION),
            tf32_operand(dg, DOT_PRECISION),
            dv,
            input_precision=DOT_PRECISION,
        )
    if HAS_BIAS:
        db = db + tl.sum(d.to(tl.float32), axis=0)
        if GATED_LAYER:
            dc = dc + tl.sum(dg.to(tl.float32), axis=0)
    return dw, dv, db, dc


@triton.jit
def _fused_small_dgrad_kernel(
    dy_ptr, w_ptrs, z_ptrs, dz_ptrs, dx_ptr, h_ptrs, dw_ptrs, db_ptrs,
    M, stride_dym, stride_dyn, stride_xm, TILES_PER_PROGRAM,
    WIDTHS: tl.constexpr, W_COLS: tl.constexpr, NUM_LAYERS: tl.constexpr, WIDTH: tl.constexpr,
    BLOCK_M: tl.constexpr, ACTIVATION: tl.constexpr, GATED: tl.constexpr,
    DACT: tl.constexpr, NEED_DX: tl.constexpr, PACK: tl.constexpr, HOIST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr, INT64_ROWS: tl.constexpr,
    DW_ON_CHIP: tl.constexpr, HAS_BIAS: tl.constexpr, RELU_FROM_OUTPUT: tl.constexpr,
    TMA_LOADS: tl.constexpr,
):  # fmt: skip
    # z_ptrs[l] / dz_ptrs[l]: hidden layer l's act' operand (its saved pre-activation, or for relu
    # its output h_{l+1}; DACT false: identity, none) and its dZ (l < L-1).
    # DW_ON_CHIP: no dZ leaves the program — each layer's dW (and db) is accumulated over the
    # program's row tiles in fp32 registers from its input h_ptrs[l] (x with stride_xm, then the
    # saved h_l) and stored once as the program's partial, row `pid` of dw_ptrs[l] [P, D_IN, NC]
    # and db_ptrs[l] [P, NC]; the sum kernel adds the P partials in order. RELU_FROM_OUTPUT: the
    # act' operand of layer l - 1 is that same h_l tile, loaded once for both.
    # TMA_LOADS (DW_ON_CHIP, where `_tma_loads` finds TMA's 16-byte rule met): dy and the layer
    # inputs come in through tensor descriptors (rows past M and lanes past a width zero-filled by
    # the copy, as the masked loads read them). Why: Triton 3.6 pipelines this loop's pointer
    # loads (cp.async) by issuing every load of tile i+1 at the end of tile i and waiting for all
    # of them at the top of tile i+1 — ncu on the H200 put 19 % of the warps' stall samples at
    # that barrier (nerf-64x5). Its TMA loads each get their own mbarrier, waited just before
    # their layer: the inputs of later layers land while the first layers compute. No per-thread
    # addresses or masks either: 253 registers, no spill (cp.async: 255 and 32-192 B). H200:
    # nerf-64x5 671 -> 601 µs, 32-wide relu 5 layers 386 -> 300 (results 2026-12-04-h200-0cff3e4).
    # twin-diff: Pallas-Triton has no tensor descriptors; the JAX twin keeps its pointer loads.
    # INT64_ROWS: int64 row offsets, only where the launcher finds that rows · stride can pass
    # 2^31 (fused_small._int64_offsets). Always int64, this kernel took 255 registers, spilt 120
    # bytes a thread and ran 2,206 instructions a row tile at nerf-64x5; int32: 228, no spill,
    # 1,981 (triton 3.6 for sm_90a, ptxas -v and cuobjdump; the Pallas twin's TTIR through the
    # same compiler: 186 and 1,801, the rest from M and strides it knows at compile time).
    # twin-diff: the Pallas lowering widens offsets itself for arrays over 2^32 bytes.
    # 1. program -> tile: a persistent program takes row tiles pid, pid + P, pid + 2P, ...
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    lanes = tl.arange(0, WIDTH)
    last: tl.constexpr = NUM_LAYERS - 1

    # 2. load: HOIST — every layer's transposed weight tiles once per program
    tiles = ()
    if HOIST:
        for layer in tl.static_range(NUM_LAYERS):
            operands = _layer_operands_t(
                w_ptrs[layer],
                WIDTHS[layer],
                WIDTHS[layer + 1],
                W_COLS[layer],
                WIDTH,
                GATED and layer != last,
                PACK,
            )
            tiles = tiles + (operands,)  # noqa: RUF005 (no starred tuples in Triton's frontend)
    accs = ()
    if DW_ON_CHIP:
        accs = _wgrad_zeros(NUM_LAYERS, WIDTH, GATED, HAS_BIAS)

    for i in range(0, TILES_PER_PROGRAM):
        rows = (pid + i * num_programs) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        rs = rows.to(tl.int64) if INT64_ROWS else rows
        row0 = (pid + i * num_programs) * BLOCK_M
        # 2. load: dy, the output layer's dZ (an identity layer: act' = 1)
        if TMA_LOADS:
            dy_desc = tl.make_tensor_descriptor(
                dy_ptr, shape=[M, WIDTHS[NUM_LAYERS]], strides=[stride_dym, 1],
                block_shape=[BLOCK_M, WIDTH],
            )  # fmt: skip
            d = dy_desc.load([row0, 0])
        else:
            d = tl.load(
                dy_ptr + rs[:, None] * stride_dym + lanes[None, :] * stride_dyn,
                mask=row_ok[:, None] & (lanes[None, :] < WIDTHS[NUM_LAYERS]),
                other=0.0,
            )
        if INTERPRET:
            d = d.to(tl.float32)  # interpreter bf16 arithmetic is broken: compute on fp32 tiles
        dg = d

        # 3. compute: the layers in reverse, dh in registers, act' on its fp32 accumulator
        for layer in tl.static_range(last, -1, -1):
            h = d  # a stand-in: the layer input is only loaded for the on-chip dW
            if DW_ON_CHIP:
                # 2. load: the layer's input h_l (x for layer 0) transposed, [WIDTH, BLOCK_M],
                # zero past its width (kernel B's hᵀ tile: the same product, the same bits)
                stride_h = stride_xm if layer == 0 else WIDTHS[layer]
                if TMA_LOADS:
                    h_desc = tl.make_tensor_descriptor(
                        h_ptrs[layer], shape=[M, WIDTHS[layer]], strides=[stride_h, 1],
                        block_shape=[BLOCK_M, WIDTH],
                    )  # fmt: skip
                    ht = tl.trans(h_desc.load([row0, 0]))
                else:
                    ht = tl.load(
                        h_ptrs[layer] + rs[None, :] * stride_h + lanes[:, None],
                        mask=(lanes[:, None] < WIDTHS[layer]) & row_ok[None, :],
                        other=0.0,
                    )
                if INTERPRET:
                    ht = ht.to(tl.float32)
                # 3. compute: this row tile's dW_l = h_lᵀ·dZ_l (and db_l) into the accumulators
                layer_accs = _wgrad_accumulate(
                    accs[layer], ht, d, dg, GATED and layer != last, HAS_BIAS, DOT_PRECISION
                )
                accs = accs[:layer] + (layer_accs,) + accs[layer + 1 :]  # noqa: RUF005 (as above)
                h = tl.trans(ht)  # relu's act' operand of layer - 1 (RELU_FROM_OUTPUT)
            if HOIST:
                wt, vt = tiles[layer]
            else:
                wt, vt = _layer_operands_t(
                    w_ptrs[layer], WIDTHS[layer], WIDTHS[layer + 1], W_COLS[layer], WIDTH,
                    GATED and layer != last, PACK,
                )  # fmt: skip
            if INTERPRET:
                wt = wt.to(tl.float32)
                vt = vt.to(tl.float32)
            acc = tl.dot(
                tf32_operand(d, DOT_PRECISION),
                tf32_operand(wt, DOT_PRECISION),
                input_precision=DOT_PRECISION,
            )
            if GATED and layer != last:
                acc = tl.dot(
                    tf32_operand(dg, DOT_PRECISION),
                    tf32_operand(vt, DOT_PRECISION),
                    acc,
                    input_precision=DOT_PRECISION,
                )
            if layer > 0:
                # 4. store (inside, unless on chip): dZ of hidden layer - 1
                d, dg = _dact_step(
                    acc, z_ptrs[layer - 1], dz_ptrs[layer - 1], rs, row_ok, h, WIDTHS[layer],
                    ACTIVATION, GATED, DACT, BLOCK_M, WIDTH, PACK, INTERPRET, not DW_ON_CHIP,
                    DW_ON_CHIP and RELU_FROM_OUTPUT,
                )  # fmt: skip
            elif NEED_DX:
                # 4. store: dx, rounded once
                tl.store(
                    dx_ptr + rs[:, None] * WIDTHS[0] + lanes[None, :],
                    round_to_dtype(acc, dx_ptr.dtype.element_ty, INTERPRET),
                    mask=row_ok[:, None] & (lanes[None, :] < WIDTHS[0]),
                )

    if DW_ON_CHIP:
        # 4. store: the program's exact fp32 partial of every layer's gradients, row pid
        first = tl.full((1,), 1, tl.int1)
        for layer in tl.static_range(NUM_LAYERS):
            dw, dv, db, dc = accs[layer]
            _store_wgrad(
                dw_ptrs[layer], db_ptrs[layer], pid.to(tl.int64), lanes, lanes < WIDTHS[layer],
                first, dw, dv, db, dc, WIDTHS[layer], WIDTHS[layer + 1], W_COLS[layer],
                GATED and layer != last, HAS_BIAS, WIDTH, WIDTH, PACK, INTERPRET,
            )  # fmt: skip


# ---- backward kernel B: every layer's dW and db in one launch, and the sum of its splits --------
@triton.jit
def _wgrad_layer(
    h_ptr, d_ptr, dw_ptr, db_ptr, pid_k, pid_s,
    M, STEPS, stride_hm, stride_dm, stride_dn,
    D_IN: tl.constexpr, D_OUT: tl.constexpr, NC: tl.constexpr, GATED_LAYER: tl.constexpr,
    HAS_BIAS: tl.constexpr, WIDTH: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    PACK: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Rows [pid_k·BLOCK_R, +BLOCK_R) of one layer's dW [D_IN, NC] (NC: D_OUT, or the packed
    2·Np) reduced over run pid_s of the rows (STEPS steps of BLOCK_K), with db from the K-tile 0
    programs. dw_ptr / db_ptr: the gradient itself (one run) or the fp32 partials [S, D_IN, NC] /
    [S, NC] (run pid_s's slice: the store below is exact)."""
    # 1. program -> tile
    offs_k = pid_k * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_k = offs_k < D_IN
    ks = offs_k.to(tl.int64)
    lanes = tl.arange(0, WIDTH)
    lane_ok = lanes < D_OUT
    split = pid_s.to(tl.int64)
    m_lo = pid_s * STEPS
    m_hi = tl.minimum(m_lo + STEPS, tl.cdiv(M, BLOCK_K))
    m_hi = tl.where(pid_k * BLOCK_R < D_IN, m_hi, m_lo)  # a tile past D_IN: nothing to reduce
    NP: tl.constexpr = (D_OUT + PACK - 1) // PACK * PACK

    acc = tl.zeros((BLOCK_R, WIDTH), dtype=tl.float32)
    acc_v = tl.zeros((BLOCK_R, WIDTH), dtype=tl.float32)
    db = tl.zeros((WIDTH,), dtype=tl.float32)
    dc = tl.zeros((WIDTH,), dtype=tl.float32)
    for m in range(m_lo, m_hi):
        # 2. load: hᵀ tile [BLOCK_R (k), BLOCK_K (m)] and the dZ tile(s) [BLOCK_K (m), WIDTH]
        offs_r = m * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_r = offs_r < M
        rs = offs_r.to(tl.int64)
        a = tl.load(
            h_ptr + rs[None, :] * stride_hm + ks[:, None],
            mask=mask_k[:, None] & mask_r[None, :],
            other=0.0,
        )
        if GATED_LAYER:
            d, dg = _packed_load(d_ptr, rs, mask_r, stride_dm, BLOCK_K, NP, WIDTH, PACK)
        else:
            d = tl.load(
                d_ptr + rs[:, None] * stride_dm + lanes[None, :] * stride_dn,
                mask=mask_r[:, None] & lane_ok[None, :],
                other=0.0,
            )
            dg = d
        if INTERPRET:  # interpreter only: its 16-bit arithmetic is wrong (TOOLCHAIN.md)
            a = a.to(tl.float32)
            d = d.to(tl.float32)
            dg = dg.to(tl.float32)
        # 3. compute: fp32 accumulate over the run; the bias gradient from the same dZ tiles
        acc = tl.dot(
            tf32_operand(a, DOT_PRECISION),
            tf32_operand(d, DOT_PRECISION),
            acc,
            input_precision=DOT_PRECISION,
        )
        if GATED_LAYER:
            acc_v = tl.dot(
                tf32_operand(a, DOT_PRECISION),
                tf32_operand(dg, DOT_PRECISION),
                acc_v,
                input_precision=DOT_PRECISION,
            )
        if HAS_BIAS:  # noqa: SIM102 (a constexpr, then a runtime test: two ifs in Triton)
            if pid_k == 0:
                db = db + tl.sum(d.to(tl.float32), axis=0)
                if GATED_LAYER:
                    dc = dc + tl.sum(dg.to(tl.float32), axis=0)

    # 4. store: one rounding to the param dtype (one run), or the exact fp32 partial
    first = (tl.arange(0, 1) + pid_k) == 0  # the db row: K-tile 0 only
    _store_wgrad(
        dw_ptr, db_ptr, split, ks, mask_k, first, acc, acc_v, db, dc,
        D_IN, D_OUT, NC, GATED_LAYER, HAS_BIAS, WIDTH, BLOCK_R, PACK, INTERPRET,
    )  # fmt: skip


@triton.jit
def _store_wgrad(
    dw_ptr, db_ptr, split, ks, mask_k, first, acc, acc_v, db, dc,
    D_IN: tl.constexpr, D_OUT: tl.constexpr, NC: tl.constexpr, GATED_LAYER: tl.constexpr,
    HAS_BIAS: tl.constexpr, WIDTH: tl.constexpr, BLOCK_R: tl.constexpr, PACK: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    """Rows `ks` of one layer's dW [D_IN, NC] (acc; gated: the packed pair acc | acc_v) and, where
    `first`, its db (db | dc), rounded to the pointers' dtype, into run `split` of [S, D_IN, NC] /
    [S, NC] (S = 1: the gradients themselves; fp32 partials: exact)."""
    lanes = tl.arange(0, WIDTH)
    lane_ok = lanes < D_OUT
    NP: tl.constexpr = (D_OUT + PACK - 1) // PACK * PACK
    dw_ptr = dw_ptr + split * (D_IN * NC)
    db_ptr = db_ptr + split * NC
    if GATED_LAYER:
        _packed_store(dw_ptr, ks, mask_k, NC, acc, acc_v, BLOCK_R, NP, WIDTH, PACK, INTERPRET)
        if HAS_BIAS:
            db2 = tl.reshape(db, (1, WIDTH))
            dc2 = tl.reshape(dc, (1, WIDTH))
            zero = tl.zeros((1,), dtype=tl.int64)
            _packed_store(db_ptr, zero, first, 0, db2, dc2, 1, NP, WIDTH, PACK, INTERPRET)
    else:
        tl.store(
            dw_ptr + ks[:, None] * NC + lanes[None, :],
            round_to_dtype(acc, dw_ptr.dtype.element_ty, INTERPRET),
            mask=mask_k[:, None] & lane_ok[None, :],
        )
        if HAS_BIAS:
            db_out = round_to_dtype(db, db_ptr.dtype.element_ty, INTERPRET)
            tl.store(db_ptr + lanes, db_out, mask=lane_ok & first)


@triton.jit
def _fused_small_wgrad_kernel(
    h_ptrs, d_ptrs, dw_ptrs, db_ptrs,
    M, STEPS, stride_xm, stride_dym, stride_dyn,
    WIDTHS: tl.constexpr, W_COLS: tl.constexpr, NUM_LAYERS: tl.constexpr, WIDTH: tl.constexpr,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, K_TILES: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PACK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    # h_ptrs[l]: layer l's input (x, then the saved h_l); d_ptrs[l]: its dZ (kernel A's, dy for
    # the output layer). Layer l's widths are constants only inside its branch below.
    # 1. program -> tile: (layer, K-tile) on axis 0, the run of M on axis 1
    pid = tl.program_id(0)
    layer_id = pid // K_TILES
    pid_k = pid % K_TILES
    pid_s = tl.program_id(1)
    last: tl.constexpr = NUM_LAYERS - 1
    for layer in tl.static_range(NUM_LAYERS):
        if layer_id == layer:
            # twin-diff: the Pallas twin branches with pl.when
            _wgrad_layer(
                h_ptrs[layer], d_ptrs[layer], dw_ptrs[layer], db_ptrs[layer], pid_k, pid_s,
                M, STEPS,
                stride_xm if layer == 0 else WIDTHS[layer],
                stride_dym if layer == last else W_COLS[layer],
                stride_dyn if layer == last else 1,
                WIDTHS[layer], WIDTHS[layer + 1], W_COLS[layer], GATED and layer != last,
                HAS_BIAS, WIDTH, BLOCK_K, BLOCK_R, PACK, DOT_PRECISION, INTERPRET,
            )  # fmt: skip


@triton.jit
def _sum_partials(
    ws_ptr, out_ptr, block, S, L,
    BLOCK: tl.constexpr, UNROLL: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """out[block's BLOCK elements] = round(Σ_s ws[s]) for ws [S, L] contiguous, the partials added
    in the fixed order s = 0, 1, …, S−1 (backward.py's `_wgrad_sum_kernel` loop)."""
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(0, tl.cdiv(S, UNROLL)):
        for u in tl.static_range(UNROLL):  # UNROLL independent loads in flight, adds in order
            s = c * UNROLL + u
            ok = s < S
            row = tl.minimum(s, S - 1).to(tl.int64)
            # 2. load: partial s of this program's elements (fp32: no interpreter upcast)
            part = tl.load(ws_ptr + row * L + offs, mask=mask & ok, other=0.0)
            # 3. compute: one add per partial, in the order s = 0, 1, …
            acc = tl.where(ok, acc + part, acc)
    # 4. store: one rounding to the param dtype
    tl.store(out_ptr + offs, round_to_dtype(acc, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _fused_small_wgrad_sum_kernel(
    ws_ptrs, out_ptrs, S,
    SIZES: tl.constexpr, STARTS: tl.constexpr, TARGETS: tl.constexpr,
    BLOCK: tl.constexpr, UNROLL: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    # Targets: every layer's dw (then db, with a bias), SIZES[t] elements; programs
    # [STARTS[t], STARTS[t + 1]) sum target t's blocks.
    # 1. program -> tile
    pid = tl.program_id(0)
    for t in tl.static_range(TARGETS):
        if (pid >= STARTS[t]) & (pid < STARTS[t + 1]):
            _sum_partials(
                ws_ptrs[t], out_ptrs[t], pid - STARTS[t], S, SIZES[t], BLOCK, UNROLL, INTERPRET
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


def _layer_params(params: Mapping[str, torch.Tensor], names: tuple[tuple[str, ...], ...]):
    # fused_small.layer_params from its names, contiguous (a no-op for the packed params a module
    # holds); absent biases: the weights stand in (HAS_BIAS keeps the kernels from reading them)
    weights = tuple(params[n].contiguous() for n in names[0])
    return weights, tuple(params[n].contiguous() for n in names[1]) if names[1] else weights


def _grid(m: int, cfg: SmallConfig) -> tuple[int, int]:
    programs = fused_small_programs(m, cfg, INTERPRET_NUM_SMS if INTERPRET else NUM_SMS)
    return programs, cdiv(cdiv(m, cfg.block_m), programs)


def _saving_launch(x_shape, x_strides, spec, config):
    """`forward_saving`'s record for this key: (launch, names, shapes of the hidden layers' h and
    z — an unkept z is [M, 0])."""
    m = x_shape[0]
    cfg = small_config_for(config, spec, m, interpret=INTERPRET, kernel="saving")
    stores = _stores_z(spec)
    h_shapes, z_shapes = [], []
    for layer in spec.layers()[:-1]:
        h_shapes.append((m, layer.d_out))
        width = (packed_width(layer.d_out) if layer.gated else layer.d_out) if stores else 0
        z_shapes.append((m, width))
    programs, tiles = _grid(m, cfg)
    # x, y, then every h and z ([M, 0] when not kept), each (row stride, column stride)
    strides = [(x_strides[0], 1), (spec.d_out, 1)]
    strides += [(shape[1], 1) for shape in (*h_shapes, *z_shapes)]
    width = padded_width(max(spec.widths))
    launch = Launch(
        _fused_small_saving_kernel, (programs,), (m, x_strides[0], spec.d_out, tiles),
        dict(
            BLOCK_M=cfg.block_m, ACTIVATION=spec.base_activation, HAS_BIAS=spec.bias,
            HOIST=cfg.hoist, STORES_Z=stores, **_small_statics(spec),
            INT64_ROWS=_int64_offsets(programs * tiles * cfg.block_m, strides, width),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        ),
    )  # fmt: skip
    return launch, _layer_names(spec), tuple(h_shapes), tuple(z_shapes)


_SAVING = LaunchCache(_saving_launch)


def forward_saving(
    x2d: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    spec: MLPSpec,
    *,
    config: TileConfig | SmallConfig | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """(y2d, residuals) for x2d [M, d_in] (unit column stride) and PACKED params, each contiguous:
    backward.forward_saving(saved="preact")'s residuals (h_0 = x2d, z_0, h_1, …, z_{L-1}; an
    unkept z is [M, 0]) from one fused_small launch. Trusts its inputs."""
    m = x2d.shape[0]
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    launch, names, h_shapes, z_shapes = _SAVING.get((x2d.shape, x2d.stride(), spec, config))
    weights, biases = _layer_params(params, names)
    dtype, device = x2d.dtype, x2d.device
    y = torch.empty(m, spec.d_out, dtype=dtype, device=device)
    hs = [torch.empty(shape, dtype=dtype, device=device) for shape in h_shapes]
    zs = [torch.empty(shape, dtype=dtype, device=device) for shape in z_shapes]
    kept: list[torch.Tensor] = [x2d]
    for h, z in zip(hs, zs, strict=True):
        kept += [z, h]
    kept.append(x2d.new_empty((m, 0)))  # the output layer: identity, no z
    if m == 0:
        return y, tuple(kept)
    # a 1-layer MLP has no residuals: y stands in (never stored to) where a tuple needs an entry
    stores = _stores_z(spec)
    launch(x2d, weights, biases, y, tuple(hs) or (y,), tuple(zs if stores else hs) or (y,))
    return y, tuple(kept)


def _dgrad_launch(dy_shape, dy_strides, spec, config, need_dx, x_stride=None, tma_loads=False):
    """`dgrad_fwd`'s record for this key: (launch, names, the dZs' shapes). `x_stride`: x's row
    stride where each layer's dW is accumulated on chip (`dgrad_wgrad_fwd`: no dZ shapes), else
    None; `tma_loads`: there, its tile loads through tensor descriptors (`_tma_loads`)."""
    m = dy_shape[0]
    on_chip = x_stride is not None
    cfg = small_config_for(
        config, spec, m, interpret=INTERPRET, kernel="dgrad_wgrad" if on_chip else "dgrad"
    )
    dz_shapes = tuple(
        (m, packed_width(lay.d_out) if lay.gated else lay.d_out) for lay in spec.layers()[:-1]
    )
    programs, tiles = _grid(m, cfg)
    # dy (any strides), dx, every dZ and the act' operands (z, packed, or h: at most as wide)
    strides = [tuple(dy_strides), (spec.d_in, 1)] + [(shape[1], 1) for shape in dz_shapes]
    if on_chip:
        strides.append((x_stride, 1))
    width = padded_width(max(spec.widths))
    launch = Launch(
        _fused_small_dgrad_kernel, (programs,), (m, *dy_strides, x_stride or 0, tiles),
        dict(
            BLOCK_M=cfg.block_m, ACTIVATION=spec.base_activation,
            DACT=_stores_z(spec) or _dact_from_output(spec), NEED_DX=need_dx, HOIST=cfg.hoist,
            INT64_ROWS=_int64_offsets(programs * tiles * cfg.block_m, strides, width),
            DW_ON_CHIP=on_chip, HAS_BIAS=spec.bias, RELU_FROM_OUTPUT=_dact_from_output(spec),
            TMA_LOADS=tma_loads,
            **_small_statics(spec), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        ),
    )  # fmt: skip
    return launch, _layer_names(spec), () if on_chip else dz_shapes


_DGRAD = LaunchCache(_dgrad_launch)


def _tma_loads(dy2d: torch.Tensor, inputs: list[torch.Tensor]) -> bool:
    """Whether the on-chip kernel's tile loads can go through tensor descriptors: dy and every
    layer input (x, the saved h_l) with unit column stride, base address and row stride in whole
    16-byte units. Per call: the base addresses are not in the launch key."""
    return all(
        t.stride(1) == 1
        and t.data_ptr() % TMA_ALIGN_BYTES == 0
        and (t.stride(0) * t.element_size()) % TMA_ALIGN_BYTES == 0
        for t in (dy2d, *inputs)
    )


def _act_operands(spec: MLPSpec, residuals) -> list:
    """The hidden layers' act' operands among the "preact" residuals (h_0, z_0, h_1, …): z_0, …,
    z_{L-2}, or for relu their outputs h_1, …, h_{L-1}."""
    return residuals[2::2] if _dact_from_output(spec) else residuals[1:-1:2]


def dgrad_fwd(
    dy2d: torch.Tensor,
    residuals: list[torch.Tensor | None],
    params: Mapping[str, torch.Tensor],
    spec: MLPSpec,
    *,
    config: TileConfig | SmallConfig | None = None,
    need_dx: bool = True,
    rows: tuple[int, int] | None = None,
    dx: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Kernel A: (dZ_l of every hidden layer l — [M, N_l], packed [M, 2·Np_l] gated — and dx
    [M, d_in] or None) from dy2d [M, d_out] (any strides) and the "preact" residuals. M >= 1.
    `rows` (r0, r1): rows r0 … r1-1 of dy2d and the residuals only (a chunk: its dZs are
    [r1 - r0, …]), their dx written into those rows of `dx` [M, d_in] (None: a new one)."""
    full = dy2d.shape[0]
    r0, r1 = (0, full) if rows is None else rows
    if need_dx and dx is None:
        dx = torch.empty(full, spec.d_in, dtype=dy2d.dtype, device=dy2d.device)
    if rows is not None:  # twin-diff: row views (no copy) where the Pallas twin offsets by r0
        dy2d, residuals = dy2d[r0:r1], [r[r0:r1] for r in residuals]
    launch, names, dz_shapes = _DGRAD.get((dy2d.shape, dy2d.stride(), spec, config, need_dx))
    weights, _ = _layer_params(params, names)
    dtype, device = dy2d.dtype, dy2d.device
    dzs = [torch.empty(shape, dtype=dtype, device=device) for shape in dz_shapes]
    zs = _act_operands(spec, residuals)
    dact = _stores_z(spec) or _dact_from_output(spec)
    stand_in = (dy2d,) * spec.num_layers  # the on-chip path's operands, never read here
    launch(
        dy2d, weights, tuple(zs if dact else dzs) or (dy2d,), tuple(dzs) or (dy2d,),
        (dx if rows is None else dx[r0:r1]) if need_dx else dy2d, stand_in, stand_in, stand_in,
    )  # fmt: skip
    return dzs, dx


def dgrad_wgrad_fwd(
    dy2d: torch.Tensor,
    residuals: list[torch.Tensor | None],
    params: Mapping[str, torch.Tensor],
    spec: MLPSpec,
    *,
    config: TileConfig | SmallConfig | None = None,
    need_dx: bool = True,
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """Kernel A with every layer's dW on chip (`common.tiling.small_wgrad_on_chip` says where),
    then the sum of its programs' partials: (dx [M, d_in] or None, every packed param's gradient
    in the params' dtype) from dy2d [M, d_out] (any strides) and the "preact" residuals (h_0 = x
    with unit column stride). No dZ is stored: two launches, no row chunks. M >= 1."""
    x, inputs = residuals[0], residuals[0::2]  # the layers' inputs: x, h_1, …, h_{L-1}
    tma_loads = _tma_loads(dy2d, inputs)
    key = (dy2d.shape, dy2d.stride(), spec, config, need_dx, x.stride(0), tma_loads)
    launch, names, _ = _DGRAD.get(key)
    weights, _ = _layer_params(params, names)
    dtype, device = dy2d.dtype, dy2d.device
    dx = torch.empty(dy2d.shape[0], spec.d_in, dtype=dtype, device=device) if need_dx else None
    shapes = packed_names(spec)  # per layer: weight, then bias (the sum kernel's targets)
    programs = launch.grid[0]
    parts = [torch.empty((programs, *shape), dtype=torch.float32, device=device)
             for shape in shapes.values()]  # fmt: skip
    dws = tuple(parts[0 :: 2 if spec.bias else 1])
    dbs = tuple(parts[1::2]) if spec.bias else dws
    zs = _act_operands(spec, residuals)
    dact = _stores_z(spec) or _dact_from_output(spec)
    stand_in = (dy2d,) * max(1, spec.num_layers - 1)  # no dZ is stored
    act_operands = (tuple(zs) if dact else ()) or stand_in
    if tma_loads:
        ensure_allocator()  # per call: the descriptors' scratch (Triton keeps it per context)
    launch(
        dy2d, weights, act_operands, stand_in, dy2d if dx is None else dx, tuple(inputs), dws, dbs
    )  # fmt: skip
    first = params[next(iter(shapes))]
    outs = [torch.empty(shape, dtype=first.dtype, device=device) for shape in shapes.values()]
    _WGRAD_SUM.get((tuple(shapes.values()), programs))(tuple(parts), tuple(outs))
    return dx, dict(zip(shapes, outs, strict=True))


class _WgradLaunches:
    """`wgrad_fwd`'s record for one key: S, the gradients' and (S > 1) fp32 partials' shapes,
    kernel B's launch and (S > 1) the sum's."""

    __slots__ = ("names", "part_shapes", "shapes", "splits", "wgrad", "wgrad_sum")

    def __init__(self, x_shape, x_strides, dy_strides, spec, config, splits) -> None:
        m = x_shape[0]
        cfg = small_config_for(config, spec, m, interpret=INTERPRET, kernel="wgrad")
        width = padded_width(max(spec.widths))
        block_r = min(width, WGRAD_ROWS)
        k_tiles = cdiv(width, block_r)
        S, steps = wgrad_splits(spec.num_layers * k_tiles, m, cfg.block_m, splits=splits)
        self.splits = S
        # the gradients in `outs` order (per layer: weight, then bias), with their names
        packed = packed_names(spec)
        w_names, b_names = _layer_names(spec)
        names, shapes = [], []
        for i, name in enumerate(w_names):
            names.append(name)
            shapes.append(packed[name])
            if spec.bias:
                names.append(b_names[i])
                shapes.append(packed[b_names[i]])
        self.names, self.shapes = tuple(names), tuple(shapes)
        self.part_shapes = tuple((S, *shape) for shape in shapes)
        self.wgrad = Launch(
            _fused_small_wgrad_kernel, (spec.num_layers * k_tiles, S),
            (m, steps, x_strides[0], *dy_strides),
            dict(
                HAS_BIAS=spec.bias, K_TILES=k_tiles, BLOCK_K=cfg.block_m, BLOCK_R=block_r,
                **_small_statics(spec), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            ),
        )  # fmt: skip
        self.wgrad_sum = _WGRAD_SUM.get((self.shapes, S))


def _wgrad_sum_launch(shapes, S):
    """The sum kernel's launch for S partials of gradients of these shapes."""
    sizes = tuple(math.prod(shape) for shape in shapes)
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + cdiv(size, WGRAD_SUM_BLOCK))
    return Launch(
        _fused_small_wgrad_sum_kernel, (starts[-1],), (S,),
        dict(
            SIZES=sizes, STARTS=tuple(starts), TARGETS=len(shapes), BLOCK=WGRAD_SUM_BLOCK,
            UNROLL=min(WGRAD_SUM_UNROLL, S), INTERPRET=INTERPRET, num_warps=WGRAD_SUM_WARPS,
        ),
    )  # fmt: skip


_WGRAD = LaunchCache(_WgradLaunches)
_WGRAD_SUM = LaunchCache(_wgrad_sum_launch)


def wgrad_fwd(
    hs: list[torch.Tensor],
    ds: list[torch.Tensor],
    params: Mapping[str, torch.Tensor],
    spec: MLPSpec,
    *,
    config: TileConfig | SmallConfig | None = None,
    splits: int | None = None,
    rows: tuple[int, int] | None = None,
    runs: tuple[int, int] | None = None,
    workspace: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Kernel B (+ the sum of its splits): every layer's weight gradient (`w{i}`, or the packed
    `wv{i}`) and, with a bias, its bias gradient (`b{i}`/`bc{i}`), in the params' dtype, from
    the layer inputs hs[l] [M, d_in_l] (hs[0] = x: unit column stride) and the dZs ds[l] (the
    last: dy, any strides). S from `wgrad_splits` over every layer's tiles; `splits` forces it.
    A chunk (mlp_backward): `rows` (r0, r1) of hs and dy only (ds[:-1] are that chunk's dZs),
    and `runs` (s0, total): its S runs' fp32 partials go to runs s0 … s0 + S - 1 of a workspace
    of `total` runs per gradient — `workspace` (the previous chunk's), or None: a new one — which
    is returned ({name: its partials [total, …]}) in place of the gradients, summed later."""
    if rows is not None:  # twin-diff: row views (no copy) where the Pallas twin offsets by r0
        hs = [h[rows[0] : rows[1]] for h in hs]
        ds = [*ds[:-1], ds[-1][rows[0] : rows[1]]]
    x, dy = hs[0], ds[-1]
    plan = _WGRAD.get((x.shape, x.stride(), dy.stride(), spec, config, splits))
    S = plan.splits
    if runs is not None:  # a chunk's runs: fp32 partials into their workspace rows
        s0, total = runs
        if workspace is None:
            device = x.device
            workspace = {
                name: torch.empty((total, *shape), dtype=torch.float32, device=device)
                for name, shape in zip(plan.names, plan.shapes, strict=True)
            }
        into = [workspace[name][s0 : s0 + S] for name in plan.names]
        grads = workspace
    else:
        first = params[plan.names[0]]
        dtype, device = first.dtype, first.device
        outs = [torch.empty(shape, dtype=dtype, device=device) for shape in plan.shapes]
        grads = dict(zip(plan.names, outs, strict=True))
        if x.shape[0] == 0:  # a sum over no rows
            return {k: v.zero_() for k, v in grads.items()}
        if S == 1:  # the gradients directly
            into = outs
        else:
            into = [
                torch.empty(shape, dtype=torch.float32, device=device) for shape in plan.part_shapes
            ]
    dws = tuple(into[0 :: 2 if spec.bias else 1])
    dbs = tuple(into[1::2]) if spec.bias else dws
    plan.wgrad(tuple(hs), tuple(ds), dws, dbs)
    if S > 1 and runs is None:
        plan.wgrad_sum(tuple(into), tuple(outs))
    return grads


# ---- orchestration -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1024)  # a step's host path: once per key (budget None: the
# SMALL_DZ_BUDGET of the first call)
def _chunk_spans(
    spec: MLPSpec, m: int, config: TileConfig | SmallConfig | None, dz_budget: int | None
) -> tuple[tuple[int, int], ...]:
    """The backward's row chunks (r0, r1) by `common.tiling.backward_chunks`: ((0, m),) (C = 1)
    unless the dZs pass the budget; else boundaries on whole tiles of kernel A and kernel B."""
    tile = math.lcm(
        small_config_for(config, spec, m, interpret=INTERPRET, kernel="dgrad").block_m,
        small_config_for(config, spec, m, interpret=INTERPRET, kernel="wgrad").block_m,
    )
    chunks, rows = backward_chunks(spec, m, tile, budget=dz_budget)
    if chunks == 1:
        return ((0, m),)
    return tuple((r0, min(r0 + rows, m)) for r0 in range(0, m, rows))


def _chunk_splits(spec: MLPSpec, m: int, config: TileConfig | SmallConfig | None) -> int:
    """Kernel B's S over m rows (`_WgradLaunches`' choice)."""
    cfg = small_config_for(config, spec, m, interpret=INTERPRET, kernel="wgrad")
    width = padded_width(max(spec.widths))
    tiles = spec.num_layers * cdiv(width, min(width, WGRAD_ROWS))
    return wgrad_splits(tiles, m, cfg.block_m)[0]


def _chunked_backward(
    dy2d: torch.Tensor,
    res: list[torch.Tensor | None],
    params: Mapping[str, torch.Tensor],
    spec: MLPSpec,
    spans: tuple[tuple[int, int], ...],
    config: TileConfig | SmallConfig | None,
    need_dx: bool,
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """(dx, grads) over C > 1 row chunks: per chunk kernel A (its dZs, its rows of the one dx)
    then kernel B (its S runs' fp32 partials into its rows of one workspace [Σ S, …] per
    gradient), that chunk's dZs dropped before the next chunk's; then ONE sum kernel adds each
    element's partials in the fixed order (chunk, run) and rounds once. No atomics."""
    splits = [_chunk_splits(spec, r1 - r0, config) for r0, r1 in spans]
    total = sum(splits)
    dx, workspace, s0 = None, None, 0
    for (r0, r1), S in zip(spans, splits, strict=True):
        dzs, dx = dgrad_fwd(
            dy2d, res, params, spec, config=config, need_dx=need_dx, rows=(r0, r1), dx=dx
        )
        workspace = wgrad_fwd(
            res[0::2], [*dzs, dy2d], params, spec, config=config, rows=(r0, r1),
            runs=(s0, total), workspace=workspace,
        )  # fmt: skip
        del dzs  # the caching allocator hands this chunk's dZ blocks to the next chunk
        s0 += S
    res[:] = [None] * len(res)
    # twin-diff: the Pallas twin's `_wgrad_grads` (its sum launch built per call)
    shapes = packed_names(spec)  # per layer: weight, then bias (`_WgradLaunches`' order)
    first = params[next(iter(shapes))]
    outs = [torch.empty(shape, dtype=first.dtype, device=first.device) for shape in shapes.values()]
    into = tuple(workspace[name] for name in shapes)
    _WGRAD_SUM.get((tuple(shapes.values()), total))(into, tuple(outs))
    return dx, dict(zip(shapes, outs, strict=True))


def mlp_backward(
    dy2d: torch.Tensor,
    residuals: tuple[torch.Tensor, ...] | list[torch.Tensor | None],
    params: Mapping[str, torch.Tensor],
    spec: MLPSpec,
    *,
    saved: str,
    config: TileConfig | SmallConfig | None = None,
    need_dx: bool = True,
    dz_budget: int | None = None,
    on_chip: bool | None = None,
) -> dict[str, torch.Tensor | None]:
    """backward.mlp_backward's result (same arguments, names, layouts and list consumption) from
    kernel A with every dW on chip and the sum of its partials where `on_chip` (None:
    common.tiling.small_wgrad_on_chip), else kernels A and B: "x" (None unless `need_dx`) and
    every packed param's gradient; "inputs" recomputes this module's saving forward first. Params
    packed and contiguous. Kernels A and B take the rows in C > 1 chunks where the dZs pass
    `dz_budget` bytes (None: common.tiling.SMALL_DZ_BUDGET)."""
    check_saved(saved)
    if saved == "inputs":
        _, residuals = forward_saving(residuals[0], params, spec, config=config)
    # twin-diff: torch frees memory as references go; XLA plans buffer lifetimes itself.
    res = residuals if isinstance(residuals, list) else list(residuals)  # h_0, z_0, h_1, z_1, …
    del residuals
    if res[0].stride(-1) != 1:  # kernels A (on chip) and B read x with unit column stride
        res[0] = res[0].contiguous()
    m = dy2d.shape[0]
    if on_chip is None:  # the table of the loads the on-chip kernel would take here
        on_chip = small_wgrad_on_chip(spec, descriptor_loads=_tma_loads(dy2d, res[0::2]))
    if m > 0 and on_chip:
        dx, grads = dgrad_wgrad_fwd(dy2d, res, params, spec, config=config, need_dx=need_dx)
        res[:] = [None] * len(res)
        return {"x": dx, **grads}
    spans = _chunk_spans(spec, m, config, dz_budget)
    if len(spans) > 1:
        dx, grads = _chunked_backward(dy2d, res, params, spec, spans, config, need_dx)
        return {"x": dx, **grads}
    if m == 0:
        dzs: list[torch.Tensor] = []
        dx = dy2d.new_empty((0, spec.d_in)) if need_dx else None
    else:
        dzs, dx = dgrad_fwd(dy2d, res, params, spec, config=config, need_dx=need_dx)
    hs = res[0::2]
    res[1::2] = [None] * len(res[1::2])  # the zs: read by kernel A only
    grads = wgrad_fwd(hs, [*dzs, dy2d], params, spec, config=config)
    del hs, dzs
    res[0::2] = [None] * len(res[0::2])
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
    with the dWs on chip (`mlp_backward`'s `on_chip`; None: its rule for inputs TMA can load, the
    usual case); else 3, or 4 where the weight gradients are split over M, and in C > 1 row
    chunks 2 + 2·C (kernels A and B a chunk, one sum)."""
    if on_chip is None:
        on_chip = small_wgrad_on_chip(spec, descriptor_loads=True)
    if m > 0 and on_chip:
        return 3
    chunks = len(_chunk_spans(spec, m, config, dz_budget))
    if chunks > 1:
        return 2 + 2 * chunks
    return 3 + (_chunk_splits(spec, m, config) > 1)
