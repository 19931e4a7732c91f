"""fused_small: the whole narrow MLP (every width <= 128) in one persistent Triton kernel.

    h_0 = x;   h_{l+1} = round(act(h_l·W_l + b_l) [⊙ (h_l·V_l + c_l)])   (l < L-1)
    y = h_{L-1}·W_{L-1} + b_{L-1}

Neural fields, small policies and per-pixel MLPs run 16..128-wide MLPs over millions of rows; as
separate GEMMs they are bound by the traffic of their hidden activations. Here only x is read and y
written: each row tile's hidden goes through every layer in registers (one `tl.dot` per layer, two
for a gated layer, both fed by the same register input). The floor is that traffic: nerf-64x5 (64
wide, 5 layers, fp16) over 2,097,152 rows reads 268 MB and writes 268 MB, 127 us at the H200's 4.24
TB/s — while its 86 GFLOP of products need ~110 us of wgmma, so loads, stores and tensor-core work
must overlap.

Persistent grid: min(row tiles, programs_per_sm · 132) programs; program p takes row tiles p, p + P,
p + 2P, ... (TILES_PER_PROGRAM of them; a tile past M is fully masked). Before its row loop, a
program loads every layer's zero-padded [WIDTH, WIDTH] weight tiles once (`hoist`: they stay in
shared memory for all its tiles — 40 KiB for nerf-64x5 — where they fit SMALL_HOIST_BYTES, or one
program's shared memory without spilling; else each tile reads them again, from L2). The x tiles
are software-pipelined (`num_stages` - 1 tiles of BLOCK_M rows in flight through cp.async while one
is computed: 2 x 8 KiB at nerf-64x5's default 64 rows of 64 fp16), loaded and stored with 16-byte
accesses where the row stride allows it — or, at the padded widths of SMALL_TMA_IO_WIDTHS (64,
16-bit) where TMA's 16-byte rule holds, through tensor descriptors: one TMA copy a tile each way
(`_tma_io`; nerf-64x5 on the H200 151 -> 145 µs). Programs an SM by width (`SMALL_FORWARD_TILES`:
eight at 16 wide, six at 32, three at 64, as many as registers and shared memory hold; each
training kernel has its own tiles: `SMALL_KERNELS`).

Params are read where they are: the kernel takes a tuple of the layers' own weight pointers (and one
of biases) — Triton passes tuples of tensors as kernel arguments and indexes them in
`tl.static_range` — so a call does no repacking and no host work beyond one launch. Gated layers
come in the packed layout (common/packing.py): `wv{i}` [d_in, 2·Np] with gate and up interleaved in
64-column blocks, so hidden lane c of the gate is packed column 2·64·(c // 64) + c % 64 and the up
lane is that + 64; `bc{i}` likewise.

Widths are compile-time constants from the closed set 16/32/64/128 (tiny-cuda-nn's fully fused MLP):
every layer is padded to one WIDTH, the smallest member of the set >= max(widths), by masked loads:
padded rows/columns of W, V, b, c read as 0, so padded lanes of every hidden are act(0)·0 = 0 (relu,
gelu, gelu_tanh, silu all map 0 to 0) and contribute nothing to the next layer; x's padded lanes are
masked to 0 at the load and y's at the store.

Config: `SmallConfig` (common/tiling.py, read by both twins): block_m, num_warps, num_stages,
programs_per_sm, hoist; a pinned `TileConfig` maps onto it (`small_config_for`).

Rounding points (common/reference.py): fp32 accumulation; bias, activation and gate in fp32; the
hidden is rounded to the spec dtype before the next layer's dot (what a per-layer kernel's store
would do, so the two paths agree and tensor-core operands stay 16-bit); y rounded once at the store.

On a Hopper GPU at padded width 128 (every width 128, 16-bit, default tiles) and from 2^19 rows ×
layers, the launch runs the JAX twin's Mosaic GPU sibling on these tensors instead
(`_takes_mosaic_sibling`, torch_impl/cross/fused_small.py): its two warpgroup chains stream the
layers through one shared-memory ring, where this kernel's programs read every layer from L2 for
every tile (H200, 128x8 relu fp16, 1M rows: 672 -> 358.7 µs, the same bits). A CUDA graph records
its launch like this kernel's (torch_impl/cross/launcher.py).

Twin: jax_impl/fused_small.py (Pallas-Triton, same names and sections).
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from fusedmlp.common.config import TileConfig
from fusedmlp.common.packing import PACK_BLOCK, packed_names
from fusedmlp.common.registry import FALLBACK
from fusedmlp.common.spec import MLPSpec
from fusedmlp.common.tiling import (
    INTERPRET_NUM_SMS,
    NUM_SMS,
    SMALL_TMA_IO_WIDTHS,
    WHOLE_WIDTHS,
    SmallConfig,
    cdiv,
    fused_small_programs,
    padded_width,
    small_config_for,
)
from fusedmlp.common.validate import check_packed_call

from .activations import apply_activation, relu, round_to_dtype
from .backward import _gate_join
from .front import ADAPTER, STACK
from .gated import _gate_split
from .launch import Launch, LaunchCache, is_traced
from .runtime import INTERPRET, check_kernel_device
from .tf32 import tf32_operand
from .tma.support import TMA_ALIGN_BYTES, ensure_allocator

if TYPE_CHECKING:
    from fusedmlp.jax_impl.mosaic.fused_small import MosaicSmallConfig

WIDTHS_SUPPORTED = WHOLE_WIDTHS  # the closed set of compile-time widths
MAX_LAYERS = 8


# ---- helpers shared by the whole-MLP kernels -----------------------------------------------------
def dot_precision(spec: MLPSpec) -> str:
    """tl.dot's input_precision: 'tf32' only where the spec asks for it (float32 only)."""
    return "tf32" if spec.fp32_precision == "tf32" else "ieee"


# ---- forward kernel ------------------------------------------------------------------------------
@triton.jit
def _layer_operands(
    w_ptr, b_ptr, d_in, d_out, w_cols,
    WIDTH: tl.constexpr, GATED_LAYER: tl.constexpr, HAS_BIAS: tl.constexpr, PACK: tl.constexpr,
):  # fmt: skip
    """One layer's zero-padded operands: the [WIDTH, WIDTH] weight tile (the gate's, for a gated
    layer), the up tile (gated; else the weight tile again), and the fp32 bias rows."""
    lanes = tl.arange(0, WIDTH)
    # a gated layer's gate lanes are packed columns 2·PACK·(c // PACK) + c % PACK, up lanes + PACK
    cols = (lanes // PACK) * (2 * PACK) + lanes % PACK if GATED_LAYER else lanes
    w_offs = lanes[:, None] * w_cols + cols[None, :]
    w_ok = (lanes[:, None] < d_in) & (lanes[None, :] < d_out)
    w = tl.load(w_ptr + w_offs, mask=w_ok, other=0.0)
    v = w
    b = tl.zeros((WIDTH,), dtype=tl.float32)
    c = b
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=lanes < d_out, other=0.0).to(tl.float32)
    if GATED_LAYER:
        v = tl.load(w_ptr + w_offs + PACK, mask=w_ok, other=0.0)
        if HAS_BIAS:
            c = tl.load(b_ptr + cols + PACK, mask=lanes < d_out, other=0.0).to(tl.float32)
    return w, v, b, c


@triton.jit
def _output_operands(
    w_ptrs, b_ptrs,
    WIDTHS: tl.constexpr, W_COLS: tl.constexpr, NUM_LAYERS: tl.constexpr, WIDTH: tl.constexpr,
    HAS_BIAS: tl.constexpr, PACK: tl.constexpr,
):  # fmt: skip
    """The output layer's weight tile and fp32 bias row (a plain layer: no up half)."""
    last: tl.constexpr = NUM_LAYERS - 1
    w, _, b, _ = _layer_operands(
        w_ptrs[last], b_ptrs[last], WIDTHS[last], WIDTHS[NUM_LAYERS], W_COLS[last],
        WIDTH, False, HAS_BIAS, PACK,
    )  # fmt: skip
    return w, b


@triton.jit
def _select_layer(
    w_ptrs, b_ptrs, layer, WIDTHS: tl.constexpr, W_COLS: tl.constexpr, NUM_HIDDEN: tl.constexpr
):
    """Hidden layer `layer` (a runtime index < NUM_HIDDEN): its weight and bias pointers, widths
    and weight row stride, picked from the constant tuples by a chain of selects."""
    # twin-diff: Pallas cannot select a ref at run time; it indexes the layers stacked
    w_ptr = w_ptrs[0]
    b_ptr = b_ptrs[0]
    d_in = WIDTHS[0] + 0 * layer
    d_out = WIDTHS[1] + 0 * layer
    w_cols = W_COLS[0] + 0 * layer
    for j in tl.static_range(1, NUM_HIDDEN):
        pick = layer == j
        w_ptr = tl.where(pick, w_ptrs[j], w_ptr)
        b_ptr = tl.where(pick, b_ptrs[j], b_ptr)
        d_in = tl.where(pick, WIDTHS[j], d_in)
        d_out = tl.where(pick, WIDTHS[j + 1], d_out)
        w_cols = tl.where(pick, W_COLS[j], w_cols)
    return w_ptr, b_ptr, d_in, d_out, w_cols


@triton.jit
def _hidden_layer(
    h, w, v, b, c,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DTYPE: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """round(act(h·w + b) [⊙ (h·v + c)]): one hidden layer, from registers to registers; also
    its fp32 pre-activation z = h·w + b and up g = h·v + c (z again, plain), which only the saving
    forward stores (fused_small_backward.py): unused, they cost nothing."""
    if INTERPRET:
        w = w.to(tl.float32)  # interpreter bf16 arithmetic is broken: compute on fp32 tiles
        v = v.to(tl.float32)
    z = tl.dot(
        tf32_operand(h, DOT_PRECISION),
        tf32_operand(w, DOT_PRECISION),
        input_precision=DOT_PRECISION,
    )
    if HAS_BIAS:
        z += b[None, :]
    g = z
    if ACTIVATION == "relu" and not GATED and DTYPE != tl.bfloat16:  # noqa: SIM300
        # relu after the rounding: the same values (relu is exact and rounding monotone), on
        # packed float16 pairs (PTX max.NaN.f16x2) — 2 instructions a pair of elements instead
        # of 5 on the layer's critical path (a tile's layers are one dependent chain of dot,
        # wait, epilogue: nerf-64x5 187 -> 149-154 µs on the H200). Not bfloat16: Triton computes
        # its max in fp32. twin-diff: the Pallas twin takes this order for float16 on the GPU
        # only (inline max.NaN.f16x2: its jnp.maximum drops NaN); for float32 and under its
        # interpreter it keeps relu before the rounding (the same values).
        h = relu(round_to_dtype(z, DTYPE, INTERPRET))
    else:
        out = apply_activation(z, ACTIVATION)
        if GATED:
            g = tl.dot(
                tf32_operand(h, DOT_PRECISION),
                tf32_operand(v, DOT_PRECISION),
                input_precision=DOT_PRECISION,
            )
            if HAS_BIAS:
                g += c[None, :]
            out = out * g
        # round the hidden as a per-layer kernel's store would, then feed the next dot
        h = round_to_dtype(out, DTYPE, INTERPRET)
    if INTERPRET:
        h = h.to(tl.float32)  # interpreter bf16 arithmetic is broken: compute on fp32 tiles
    return h, z, g


@triton.jit
def _packed_store(
    ptr, row_offs, row_ok, stride_r, gate, up,
    ROWS: tl.constexpr, NP: tl.constexpr, WIDTH: tl.constexpr, PACK: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    """Stores fp32 gate and up tiles [ROWS, WIDTH] (lane c = hidden column c) rounded to ptr's
    dtype into rows `row_offs` of a row-major packed [., 2·NP] array (common/packing.py): gate
    lane c at column 2·PACK·(c // PACK) + c % PACK, up lane at that + PACK; every column of the
    packed width is written (lanes past the tiles' reach as exact zeros)."""
    dtype = ptr.dtype.element_ty
    if WIDTH >= PACK:  # whole block pairs: one contiguous packed tile
        cols = tl.arange(0, 2 * WIDTH)
        t = round_to_dtype(_gate_join(gate, up, ROWS, WIDTH, PACK), dtype, INTERPRET)
        ok = row_ok[:, None] & (cols[None, :] < 2 * NP)
        tl.store(ptr + row_offs[:, None] * stride_r + cols[None, :], t, mask=ok)
    else:  # one block pair, partly filled: the two halves, then zeros past WIDTH
        lanes = tl.arange(0, WIDTH)
        base = ptr + row_offs[:, None] * stride_r
        tl.store(
            base + lanes[None, :], round_to_dtype(gate, dtype, INTERPRET), mask=row_ok[:, None]
        )
        tl.store(
            base + PACK + lanes[None, :], round_to_dtype(up, dtype, INTERPRET), mask=row_ok[:, None]
        )
        pad = tl.arange(0, PACK)
        zeros = tl.zeros((ROWS, PACK), dtype=dtype)
        ok = row_ok[:, None] & (pad[None, :] >= WIDTH)
        tl.store(base + pad[None, :], zeros, mask=ok)
        tl.store(base + PACK + pad[None, :], zeros, mask=ok)


@triton.jit
def _packed_load(
    ptr, row_offs, row_ok, stride_r,
    ROWS: tl.constexpr, NP: tl.constexpr, WIDTH: tl.constexpr, PACK: tl.constexpr,
):  # fmt: skip
    """`_packed_store` undone: the gate and up tiles [ROWS, WIDTH] of a packed array, in its
    dtype (padded lanes read as 0)."""
    if WIDTH >= PACK:
        cols = tl.arange(0, 2 * WIDTH)
        ok = row_ok[:, None] & (cols[None, :] < 2 * NP)
        t = tl.load(ptr + row_offs[:, None] * stride_r + cols[None, :], mask=ok, other=0.0)
        gate, up = _gate_split(t, ROWS, WIDTH, PACK)
    else:
        lanes = tl.arange(0, WIDTH)
        base = ptr + row_offs[:, None] * stride_r + lanes[None, :]
        gate = tl.load(base, mask=row_ok[:, None], other=0.0)
        up = tl.load(base + PACK, mask=row_ok[:, None], other=0.0)
    return gate, up


@triton.jit
def _save_layer(
    h, z, g, h_ptr, z_ptr, rows, row_ok, d_out: tl.constexpr,
    BLOCK_M: tl.constexpr, WIDTH: tl.constexpr, GATED: tl.constexpr, STORES_Z: tl.constexpr,
    PACK: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """The saving forward's residuals of one hidden layer, as backward.forward_saving keeps them:
    its output h [M, d_out] and, where STORES_Z, its pre-activation z [M, d_out] (gated: the packed
    [z|g] [M, 2·Np]; none for identity or relu, whose act' needs no z)."""
    # rows: row indices (int64 where the offsets need it); h is already rounded (exact in h's dtype)
    lanes = tl.arange(0, WIDTH)
    ok = row_ok[:, None] & (lanes[None, :] < d_out)
    row_offs = rows[:, None]
    tl.store(h_ptr + row_offs * d_out + lanes[None, :], h.to(h_ptr.dtype.element_ty), mask=ok)
    if STORES_Z:
        if GATED:
            NP: tl.constexpr = (d_out + PACK - 1) // PACK * PACK
            _packed_store(z_ptr, rows, row_ok, 2 * NP, z, g, BLOCK_M, NP, WIDTH, PACK, INTERPRET)
        else:
            zr = round_to_dtype(z, z_ptr.dtype.element_ty, INTERPRET)
            tl.store(z_ptr + row_offs * d_out + lanes[None, :], zr, mask=ok)


@triton.jit
def _fused_small_fwd_kernel(
    x_ptr, w_ptrs, b_ptrs, y_ptr,
    M, stride_xm, stride_ym, TILES_PER_PROGRAM,
    WIDTHS: tl.constexpr, W_COLS: tl.constexpr, NUM_LAYERS: tl.constexpr, WIDTH: tl.constexpr,
    BLOCK_M: tl.constexpr, ACTIVATION: tl.constexpr, GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr, PACK: tl.constexpr, HOIST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr, INT64_ROWS: tl.constexpr,
    TMA_IO: tl.constexpr,
):  # fmt: skip
    # The inference kernel: the rows below without the residual stores (its signature is what
    # the sm_90 compile tests and bench/sweep_decode.py build). INT64_ROWS: the launcher's
    # choice of offset width (`_int64_offsets`; twin-diff: Pallas decides per array). TMA_IO: x
    # in and y out through tensor descriptors (`_tma_io` says where; twin-diff: Pallas-Triton
    # has none).
    _fused_small_rows(
        x_ptr, w_ptrs, b_ptrs, y_ptr, None, None,
        M, stride_xm, stride_ym, TILES_PER_PROGRAM,
        WIDTHS, W_COLS, NUM_LAYERS, WIDTH, BLOCK_M, ACTIVATION, GATED, HAS_BIAS, PACK, HOIST,
        DOT_PRECISION, INTERPRET, False, False, INT64_ROWS, TMA_IO,
    )  # fmt: skip


@triton.jit
def _fused_small_rows(
    x_ptr, w_ptrs, b_ptrs, y_ptr, h_ptrs, z_ptrs,
    M, stride_xm, stride_ym, TILES_PER_PROGRAM,
    WIDTHS: tl.constexpr, W_COLS: tl.constexpr, NUM_LAYERS: tl.constexpr, WIDTH: tl.constexpr,
    BLOCK_M: tl.constexpr, ACTIVATION: tl.constexpr, GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr, PACK: tl.constexpr, HOIST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    SAVE: tl.constexpr, STORES_Z: tl.constexpr, INT64_ROWS: tl.constexpr,
    TMA_IO: tl.constexpr,
):  # fmt: skip
    # SAVE (the training forward, fused_small_backward.py): every hidden layer's output h_{l+1}
    # (h_ptrs[l]) and, where STORES_Z (not identity or relu), its pre-activation (z_ptrs[l]) are
    # stored as well; the layers then run in the static loop (a residual's pointer is chosen at
    # compile time). INT64_ROWS: row offsets in int64 (`_int64_offsets`; the inference kernel
    # always, its signature kept). TMA_IO: x loaded and y stored through tensor descriptors (rows
    # past M and lanes past a width: zero-filled by the load, clipped by the store, as the masks
    # do); the saving forward keeps pointers (its five stores a tile measured no faster so).
    # 1. program -> tile: a persistent program takes row tiles pid, pid + P, pid + 2P, ...
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    lanes = tl.arange(0, WIDTH)
    last: tl.constexpr = NUM_LAYERS - 1
    dtype = y_ptr.dtype.element_ty

    # 2. load: HOIST — every layer's weights once per program, on chip for all its row tiles
    hidden = ()
    if HOIST:
        for layer in tl.static_range(last):
            operands = _layer_operands(
                w_ptrs[layer],
                b_ptrs[layer],
                WIDTHS[layer],
                WIDTHS[layer + 1],
                W_COLS[layer],
                WIDTH,
                GATED,
                HAS_BIAS,
                PACK,
            )
            hidden = hidden + (operands,)  # noqa: RUF005 (no starred tuples in Triton's frontend)
        w_out, b_out = _output_operands(
            w_ptrs, b_ptrs, WIDTHS, W_COLS, NUM_LAYERS, WIDTH, HAS_BIAS, PACK
        )

    for i in range(0, TILES_PER_PROGRAM):
        rows = (pid + i * num_programs) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        # int64 row offsets only where rows · stride can pass 2^31 (from 2^31 / 128 ≈ 16.8M rows
        # at width 128): 64-bit address arithmetic on every tile costs registers and issue slots
        # (the saving forward at nerf-64x5, triton 3.6 for sm_90a: 232 registers and 1,422
        # instructions a row tile in int64, 212 and 1,314 in int32).
        # twin-diff: the Pallas lowering widens offsets itself for arrays over 2^32 bytes.
        rs = rows.to(tl.int64) if INT64_ROWS else rows
        row_offs = rs[:, None]
        row0 = (pid + i * num_programs) * BLOCK_M
        # 2. load: the x tile (pipelined: the next tiles' loads are in flight during this one)
        if TMA_IO:  # one TMA copy a tile, no per-thread addresses
            x_desc = tl.make_tensor_descriptor(
                x_ptr, shape=[M, WIDTHS[0]], strides=[stride_xm, 1], block_shape=[BLOCK_M, WIDTH]
            )
            h = x_desc.load([row0, 0])
        else:
            h = tl.load(
                x_ptr + row_offs * stride_xm + lanes[None, :],
                mask=row_ok[:, None] & (lanes[None, :] < WIDTHS[0]),
                other=0.0,
            )
        if INTERPRET:
            h = h.to(tl.float32)  # interpreter bf16 arithmetic is broken: compute on fp32 tiles

        # 3. compute: every layer from registers; the hidden never leaves the program
        if HOIST or SAVE:
            for layer in tl.static_range(last):
                if HOIST:
                    w, v, b, c = hidden[layer]
                else:
                    w, v, b, c = _layer_operands(
                        w_ptrs[layer], b_ptrs[layer], WIDTHS[layer], WIDTHS[layer + 1],
                        W_COLS[layer], WIDTH, GATED, HAS_BIAS, PACK,
                    )  # fmt: skip
                h, z, g = _hidden_layer(
                    h, w, v, b, c, ACTIVATION, GATED, HAS_BIAS, DOT_PRECISION, dtype, INTERPRET
                )
                if SAVE:
                    _save_layer(
                        h, z, g, h_ptrs[layer], z_ptrs[layer], rs, row_ok,
                        WIDTHS[layer + 1], BLOCK_M, WIDTH, GATED, STORES_Z, PACK, INTERPRET,
                    )  # fmt: skip
            if not HOIST:
                w_out, b_out = _output_operands(
                    w_ptrs, b_ptrs, WIDTHS, W_COLS, NUM_LAYERS, WIDTH, HAS_BIAS, PACK
                )
        else:
            # weights streamed from L2 per tile, through a runtime loop: the code (and compile
            # time) of one hidden layer whatever the depth
            for layer in range(0, last):
                w_ptr, b_ptr, d_in, d_out, w_cols = _select_layer(
                    w_ptrs, b_ptrs, layer, WIDTHS, W_COLS, last
                )
                w, v, b, c = _layer_operands(
                    w_ptr, b_ptr, d_in, d_out, w_cols, WIDTH, GATED, HAS_BIAS, PACK
                )
                h, _, _ = _hidden_layer(
                    h, w, v, b, c, ACTIVATION, GATED, HAS_BIAS, DOT_PRECISION, dtype, INTERPRET
                )
            w_out, b_out = _output_operands(
                w_ptrs, b_ptrs, WIDTHS, W_COLS, NUM_LAYERS, WIDTH, HAS_BIAS, PACK
            )
        if INTERPRET:
            w_out = w_out.to(tl.float32)
        z = tl.dot(
            tf32_operand(h, DOT_PRECISION),
            tf32_operand(w_out, DOT_PRECISION),
            input_precision=DOT_PRECISION,
        )
        if HAS_BIAS:
            z += b_out[None, :]

        # 4. store: only y leaves the program (and, SAVE, the residuals above)
        y = round_to_dtype(z, dtype, INTERPRET)
        if TMA_IO:
            y_desc = tl.make_tensor_descriptor(
                y_ptr, shape=[M, WIDTHS[NUM_LAYERS]], strides=[stride_ym, 1],
                block_shape=[BLOCK_M, WIDTH],
            )  # fmt: skip
            y_desc.store([row0, 0], y)
        else:
            tl.store(
                y_ptr + row_offs * stride_ym + lanes[None, :],
                y,
                mask=row_ok[:, None] & (lanes[None, :] < WIDTHS[NUM_LAYERS]),
            )


# ---- launcher ------------------------------------------------------------------------------------
def supports(spec: MLPSpec, m: int | None = None) -> str | None:
    """None when fused_small can run `spec`, else the reason: constraint, value and fallback."""
    del m  # any number of rows
    fallback = f"falls back to the per-layer kernels (impl {FALLBACK[STACK]!r})"
    for i, width in enumerate(spec.widths):
        if width > WIDTHS_SUPPORTED[-1]:
            return (
                f"fused_small: every width must be <= {WIDTHS_SUPPORTED[-1]}, got {width} at "
                f"widths[{i}]; {fallback}"
            )
    if spec.num_layers > MAX_LAYERS:
        return (
            f"fused_small: at most {MAX_LAYERS} layers, got {spec.num_layers} "
            f"(widths {spec.widths}); {fallback}"
        )
    return None


def layer_params(
    params: dict[str, torch.Tensor], spec: MLPSpec
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """The packed params as the kernel takes them: per layer its weight (`wv{i}` for a gated
    layer, else `w{i}`) and its bias (`bc{i}`/`b{i}`; the weight again where there is none)."""
    weights, biases = [], []
    for layer in spec.layers():
        i = layer.index
        w = params[f"wv{i}" if layer.gated else f"w{i}"]
        weights.append(w)
        biases.append(params.get(f"bc{i}" if layer.gated else f"b{i}", w))
    return tuple(weights), tuple(biases)


def _layer_names(spec: MLPSpec) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`layer_params`' names: per layer its weight's and its bias' (empty without biases)."""
    weights = tuple(f"wv{lay.index}" if lay.gated else f"w{lay.index}" for lay in spec.layers())
    biases = tuple(f"bc{lay.index}" if lay.gated else f"b{lay.index}" for lay in spec.layers())
    return weights, biases if spec.bias else ()


def _small_statics(spec: MLPSpec) -> dict:
    """The constexprs every whole-MLP kernel takes from the spec (here and fused_small_backward)."""
    shapes = packed_names(spec)
    return dict(
        WIDTHS=spec.widths, W_COLS=tuple(shapes[w][1] for w in _layer_names(spec)[0]),
        NUM_LAYERS=spec.num_layers, WIDTH=padded_width(max(spec.widths)), GATED=spec.gated,
        PACK=PACK_BLOCK, DOT_PRECISION=dot_precision(spec), INTERPRET=INTERPRET,
    )  # fmt: skip


def _int64_offsets(rows: int, strides: list[tuple[int, int]], width: int) -> bool:
    """Whether a whole-MLP kernel needs int64 element offsets: `rows` row indices a grid can form
    (masked tiles past M included: programs × tiles per program × block_m) times an array's
    (row, column) strides, over at most 2·width columns (a packed gated tile), can pass
    2^31 - 1. Else int32 offsets, as the Pallas lowering chooses per array (up to 2^32 bytes)."""
    return max(rows * row + 2 * width * col for row, col in strides) >= 2**31


def _fused_small_launch(x_shape, x_strides, spec, config, tma_io):
    """`fused_small_fwd`'s launch for this key (`_LAUNCHES`), with `_layer_names(spec)`; y is a
    fresh contiguous [M, d_out]; `tma_io`: x and y through tensor descriptors (`_tma_io`)."""
    m = x_shape[0]
    cfg = small_config_for(config, spec, m, interpret=INTERPRET, kernel="forward")
    programs = fused_small_programs(m, cfg, INTERPRET_NUM_SMS if INTERPRET else NUM_SMS)
    tiles = cdiv(cdiv(m, cfg.block_m), programs)
    width = padded_width(max(spec.widths))
    strides = [tuple(x_strides), (spec.d_out, 1)]
    launch = Launch(
        _fused_small_fwd_kernel, (programs,),
        (m, x_strides[0], spec.d_out, tiles),
        dict(
            BLOCK_M=cfg.block_m, ACTIVATION=spec.base_activation, HAS_BIAS=spec.bias,
            HOIST=cfg.hoist, **_small_statics(spec), num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            INT64_ROWS=_int64_offsets(programs * tiles * cfg.block_m, strides, width),
            TMA_IO=tma_io,
        ),
    )  # fmt: skip
    return launch, *_layer_names(spec)


_LAUNCHES = LaunchCache(_fused_small_launch)


def _tma_io(spec: MLPSpec, x2d: torch.Tensor) -> bool:
    """Whether the inference kernel takes x and writes y through tensor descriptors: where it was
    measured to pay (`common.tiling.SMALL_TMA_IO_WIDTHS`, 16-bit) and TMA's 16-byte rule holds
    for x (base address, row stride) and y (a fresh [M, d_out]: its row). Never inside a trace
    (graph_op.py): a fake tensor has no address, and a descriptor's scratch comes from Triton's
    allocator, which the caller's compiled graph does not set."""
    if padded_width(max(spec.widths)) not in SMALL_TMA_IO_WIDTHS or spec.dtype == "float32":
        return False
    item = x2d.element_size()
    return (
        not is_traced(x2d)
        and x2d.data_ptr() % TMA_ALIGN_BYTES == 0
        and (x2d.stride(0) * item) % TMA_ALIGN_BYTES == 0
        and (spec.d_out * item) % TMA_ALIGN_BYTES == 0
    )


def fused_small_fwd(
    x2d: torch.Tensor,
    params: dict[str, torch.Tensor],
    spec: MLPSpec,
    *,
    config: TileConfig | SmallConfig | MosaicSmallConfig | None = None,
) -> torch.Tensor:
    """Launch on an [M, d_in] input (unit column stride) with M >= 1 and PACKED params
    (common/packing.py), each contiguous; returns [M, d_out]. Trusts its inputs. Where
    `_takes_mosaic_sibling` holds, the Mosaic GPU sibling runs instead, on these tensors
    (torch_impl/cross/fused_small.py; the same bits as this kernel at 128x8 relu), at `config`
    where that is the sibling's own (what the front's plan records)."""
    if _takes_mosaic_sibling(spec, config, x2d):
        from .cross import fused_small as sibling

        cfg = config if config is not None else sibling.sibling_config(spec, x2d.shape[0])
        return sibling.fused_small_fwd(x2d, params, spec, config=cfg)
    tma_io = _tma_io(spec, x2d)
    launch, w_names, b_names = _LAUNCHES.get((x2d.shape, x2d.stride(), spec, config, tma_io))
    if tma_io:
        ensure_allocator()  # per call: the descriptors' scratch (Triton keeps it per context)
    weights = tuple(params[n] for n in w_names)
    # absent biases: the weights stand in (HAS_BIAS keeps the kernel from reading them)
    biases = tuple(params[n] for n in b_names) if b_names else weights
    y = torch.empty(x2d.shape[0], spec.d_out, dtype=x2d.dtype, device=x2d.device)
    launch(x2d, weights, biases, y)
    return y


# Padded widths where the Mosaic GPU sibling runs by default (`_takes_mosaic_sibling`): 128 only.
# At 64 wide this kernel's tensor-descriptor I/O (`_tma_io`) is within 5 % of the sibling
# (nerf-64x5: 145.1 against 138.0 µs in the runner at 79d2a66) and stays Triton. twin-diff: the
# JAX twin takes its sibling at 64 and 128 (jax_impl/fused_small._MOSAIC_SIBLING_WIDTHS).
_MOSAIC_SIBLING_WIDTHS: tuple[int, ...] = (128,)
# The fewest rows × layers a call must have for the sibling. Its kernel is faster (relu fp16:
# 44-64 ps a row-layer on the H200 against this kernel's 65-84) and, launched directly
# (torch_impl/cross/launcher.py), a call costs 25-66 µs of host time, about this kernel's whole
# call (32-77 µs on the same H100 host). Back to back (bench/sibling_route_probe.py, results
# 2026-12-06-h100-a81c745 and -be556b9) it won at every point measured from 2^13 to 2^21
# row-layers but one, 128x2 at 128K rows (2^18), lost in all three runs (49.6-59.5 against
# 34.0-41.9 µs a call; not explained: the points beside it, 96K and 160K rows, win). 2^19 is the
# smallest bound above which every measured point wins (128x8 from 64K rows: 62.3 against 67.4 µs
# a call, at 128K 55.1 against 91.8; 128x2 from 256K rows: 53.7 against 59.3); it also keeps
# small varied M on the kernel that compiles once (a Mosaic GPU kernel compiles per M, ~1-2 s
# each). Through as_torch_kernel's callable a call cost 80-235 µs and the bound was 2^21 (results
# 2026-12-04-h200-d726257). twin-diff: JAX calls its sibling from its own program, at every M.
_SIBLING_MIN_ROW_LAYERS = 1 << 19
# FUSEDMLP_TORCH_SIBLING=0 in the environment (read at import) keeps torch's fused_small on its
# Triton kernel everywhere: no jax in the process.
_SIBLING_ENABLED: bool = os.environ.get("FUSEDMLP_TORCH_SIBLING", "1") != "0"


def _sibling_applies(spec: MLPSpec, device: torch.device | str, m: int) -> bool:
    """Whether a default-tile launch of `m` rows on `device` takes the Mosaic GPU sibling from
    torch (torch_impl/cross/fused_small.py): on a Hopper GPU, not interpreted, 16-bit, at a padded
    width of _MOSAIC_SIBLING_WIDTHS, with m × layers >= _SIBLING_MIN_ROW_LAYERS and m a whole
    number of TMA row atoms (else x would be copied to pad it: not measured), a spec the sibling
    takes and its default tiles fit, jax usable from torch (>= 0.11.1 with its CUDA backend) and
    the route not switched off (FUSEDMLP_TORCH_SIBLING=0) — in a CUDA graph too, which records
    the sibling's launch (torch_impl/cross/launcher.py). Else this kernel runs. H200, 128x8 relu
    fp16, 1M rows: 672 µs here, 358.7 µs the sibling, the same bits (results
    2026-12-04-h200-af6e94c)."""
    device = torch.device(device)
    if not _SIBLING_ENABLED or INTERPRET or device.type != "cuda" or spec.dtype == "float32":
        return False
    if padded_width(max(spec.widths)) not in _MOSAIC_SIBLING_WIDTHS:
        return False
    if m * spec.num_layers < _SIBLING_MIN_ROW_LAYERS or not torch.cuda.is_available():
        return False
    # the device the plan is for: x's (the sibling is compiled and launched there), else current
    index = device.index if device.index is not None else torch.cuda.current_device()
    if not _sibling_takes(spec, index):
        return False
    from .cross import fused_small as sibling

    plan = sibling.launch_plan(m, spec, sibling.sibling_config(spec, m))[0]
    return plan.mp == m


@functools.cache
def _sibling_takes(spec: MLPSpec, device_index: int) -> bool:
    # _sibling_applies' facts that do not change in a process: asked once per spec and device
    if torch.cuda.get_device_capability(device_index)[0] != 9:
        return False
    from .cross import fused_small as sibling

    if sibling.unavailable_reason() is not None:
        return False
    mosaic = sibling.mosaic_module("fused_small")
    if mosaic.unsupported_reason(spec) is not None:
        return False
    try:  # the default tiles fit shared memory (else the sibling's launcher would raise)
        mosaic.check_config(mosaic.geometry(spec, mosaic.default_config(spec, 0)))
    except ValueError:
        return False
    return True


def _takes_mosaic_sibling(spec: MLPSpec, config: object, x2d: torch.Tensor) -> bool:
    """Whether this launch runs the sibling: its own config pins it (a plan's record); other
    pinned tiles pin this kernel; the default tiles take it where `_sibling_applies` and x is a
    real tensor (a trace's fake tensor has no address: a pinned sibling raises there)."""
    if config is not None:
        if isinstance(config, (TileConfig, SmallConfig)):
            return False
        from .cross import fused_small as sibling

        if not sibling.is_sibling_config(config):
            return False
        if is_traced(x2d):
            raise RuntimeError(
                "fused_small: its Mosaic GPU sibling (pinned by a MosaicSmallConfig) cannot run "
                "inside a trace (as_torch_kernel reads the tensors' addresses); pin a SmallConfig "
                "for the Triton kernel"
            )
        return True
    return not is_traced(x2d) and _sibling_applies(spec, x2d.device, x2d.shape[0])


# ---- public function -----------------------------------------------------------------------------
def fused_small(
    x: torch.Tensor,
    params: dict[str, torch.Tensor],
    spec: MLPSpec,
    *,
    config: TileConfig | SmallConfig | None = None,
) -> torch.Tensor:
    """y = MLP(x) for x of shape [..., d_in] and packed params
    (`fusedmlp.torch_impl.packing.pack_params`, once) in one kernel; raises NotImplementedError
    (with the reason and the fallback) for specs fused_small cannot take."""
    spec = check_packed_call(
        ADAPTER, spec, x, params, config, config_types=(TileConfig, SmallConfig)
    )
    check_kernel_device(x)  # twin-diff: TRITON_INTERPRET decides where the kernels run
    reason = supports(spec)
    if reason is not None:
        raise NotImplementedError(reason)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, spec.d_in)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    if x2d.shape[0] == 0:
        return x.new_empty(*lead, spec.d_out)
    params = {k: p.contiguous() for k, p in params.items()}
    return fused_small_fwd(x2d, params, spec, config=config).reshape(*lead, spec.d_out)
