"""linear_act, the Hopper way: out = act(x·W + b) (+ residual) through tensor descriptors (TMA).

Formula (as the portable kernel, torch_impl/linear_act.py): acc = Σ_k x[m, k]·W[k, n] in fp32;
out = act(acc + b[n]) + residual[m, n], cast once to the dtype at the store.

Grid: persistent, the shape of Triton's tutorial 09. min(#SMs, #tiles) programs; program p walks
tiles p, p + P, p + 2P, ... in the grouped order of the portable kernel (`_grouped_tile`, GROUP_M
tile rows column by column, so that programs running together share W columns and X rows in L2),
each tile's K in BLOCK_K steps. `tl.range(..., flatten=True)` lets the software pipeliner run
across the tile loop too, so the next tile's first loads overlap this tile's epilogue.
`TileConfig.warp_specialize` goes to `tl.range(..., warp_specialize=)` where triton 3.6's Hopper
pass can take it (common/tiling.py `warp_specialize_applies`: 4 warps, an unsliced epilogue, the
tile loop not flattened): a producer warpgroup issues the TMA loads and two consumer warpgroups
split the tile's rows (12 warps); elsewhere the flag is ignored, as under the interpreter.

Epilogue (`_store_tile`): bias and activation on the whole fp32 tile in registers, then the tile is
stored in `TileConfig.epilogue_subtile` column slices (1, 2 or 4) through a descriptor whose block
is one slice, so only a slice is staged in shared memory: 128×256 in 16-bit stages 64 KB whole,
16 KB in quarters — the difference between 2 and 4 pipeline stages in 227 KB (common/tiling.py's
`smem_bytes` has the count the compiler confirms). The slices come from reshape / permute /
`tl.split` of the accumulator (an outer-dimension split: no data moves between threads). The
residual is read per slice with a masked pointer load (no shared memory).

W layout: [K, N] row-major as everywhere, or K-major — a [K, N] view of an [N, K] row-major buffer
(`w_nk.t()`), detected from the strides: the descriptor is then [N, K] and the dot takes its
tile transposed (`W_KMAJOR`), the layout of cuBLAS's "TN" GEMM. Worth it only if measured
(bench/sweep_triton.py times both for the down projection); a caller who wants it keeps W2 so,
packed once at load, never transposed per call. The backward (tma/backward.py) uses it for
dX = dZ·Wᵀ (Wᵀ is the K-major view of W), and reads x M-major the same way (`X_KMAJOR`: an
[M, K] view of a [K, M] row-major buffer) for the weight gradient hᵀ·dZ, so that neither
operand is transposed in memory.

Addressing: x, W and the output through descriptors built in the kernel
(`tl.make_tensor_descriptor`): the launch then takes plain pointers, as the portable kernel does,
and the block shapes come straight from the config's constexprs; the cost is a global scratch of
128 bytes per descriptor and program, asked of the host at launch (`support.ensure_allocator`).
TMA zero-fills reads past the edges (the ragged K tail adds zeros to the dot) and clips writes,
so the kernel has no masks but the epilogue's: the bias (descriptors are 2-D to 5-D) and the
residual. With a residual, a config whose shared memory would pass 227 KB gets more epilogue
slices (common/tiling.py `with_residual_room`). Descriptors need 16-byte row strides:
`support.tma_unsupported_reason` says when the portable kernel must run.

Launcher: a launch record per key (torch_impl/launch.py `LaunchCache`: shapes, strides, dtype,
device, config, flags) holds the resolved config, the x / W layouts, the persistent grid and the
constexprs; a repeated call allocates the output, makes the operands TMA-ready (their alignment is
the pointer's, so per call) and launches. The descriptors are the kernel's, made from pointers:
nothing of a tensor's address is in a record.

The backward's act' epilogue (`EPILOGUE` "dact"/"dact_gated", tma/backward.py) loads the saved z
tile by pointer beside the accumulator, on the whole tile or, with `epilogue_subtile` ≥ 2, on its
two column halves (gated: each a whole packed block pair) so that fewer registers are live and two
programs can share an SM (`programs_per_sm`), one's epilogue under the other's K loop; or
warp-specialised on the whole tile, the packed z and g addressed column by column
(`_dact_by_columns`: no reshape, which triton 3.6's pass refuses): two consumer warpgroups
split the tile's rows, 168 registers a thread and no spill where the plain loop at 8 warps holds
255 and spills, and the producer warpgroup loads the next tile's slabs during the epilogue
(cooperative, not ping-pong: the tensor cores wait for it). Loading the z tile before the K
loop instead was measured slower (docs/performance.md, twenty-ninth session). `linear_grouped`
runs several products sharing K in one persistent launch (the step's weight gradients; the twin
of the Mosaic GPU `linear_grouped`).

Interpreter: 16-bit tiles are upcast to fp32 right after the load (its bf16 arithmetic is wrong).

Twin: none in JAX — the sibling is jax_impl/mosaic/ (TMA + wgmma); the portable twin is
torch_impl/linear_act.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from fusedmlp.common.config import TileConfig
from fusedmlp.common.packing import PACK_BLOCK, packed_width
from fusedmlp.common.tiling import (
    cap_for_preact,
    cdiv,
    gated_config,
    heuristic_config,
    last_wave_split,
    warp_specialize_applies,
)
from fusedmlp.common.validate import check_layer

from .. import linear_act as portable
from ..activations import (
    activation_and_grad,
    apply_activation,
    apply_activation_grad,
    round_to_dtype,
)
from ..backward import _dact_epilogue
from ..front import ADAPTER
from ..gated import _PACK
from ..launch import Launch, LaunchCache
from ..linear_act import _grouped_tile, _input_precision
from ..runtime import INTERPRET, check_kernel_device
from ..tf32 import tf32_operand
from .support import (
    TMA_ALIGN_BYTES,
    as_tma_operand,
    ensure_allocator,
    is_k_major,
    launch_config,
    num_programs,
    tf32_safe_warp_specialize,
    tma_unsupported_reason,
)


# ==== forward kernel ==============================================================================
@triton.jit
def _halves(acc, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):
    """[BLOCK_M, WIDTH] -> its left and right column halves (an outer split: no data movement)."""
    acc = tl.reshape(acc, (BLOCK_M, 2, WIDTH // 2))
    acc = tl.permute(acc, (0, 2, 1))
    return tl.split(acc)


@triton.jit
def _store_slice(
    o_desc, acc, r_ptr, off_m, off_n, M, N,
    HAS_RESIDUAL: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr,
):  # fmt: skip
    if HAS_RESIDUAL:
        # A masked pointer load per slice, not TMA: a descriptor load would stage the slice in
        # shared memory beside the pipeline's stages, for data read once.
        rows = (off_m + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = off_n + tl.arange(0, WIDTH)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        r = tl.load(r_ptr + rows[:, None] * N + cols[None, :], mask=mask, other=0.0)
        acc = acc + r.to(tl.float32)
    # one rounding to the output dtype; TMA clips the slice at M and N
    o_desc.store([off_m, off_n], round_to_dtype(acc, o_desc.dtype, INTERPRET))


@triton.jit
def _store_tile(
    o_desc, acc, r_ptr, off_m, off_n, M, N,
    HAS_RESIDUAL: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUBTILE: tl.constexpr,
):  # fmt: skip
    """Store an fp32 [BLOCK_M, BLOCK_N] tile in SUBTILE column slices (o_desc's block is one)."""
    if SUBTILE == 1:
        _store_slice(
            o_desc, acc, r_ptr, off_m, off_n, M, N, HAS_RESIDUAL, INTERPRET, BLOCK_M, BLOCK_N
        )
    elif SUBTILE == 2:
        a0, a1 = _halves(acc, BLOCK_M, BLOCK_N)
        _store_slice(
            o_desc, a0, r_ptr, off_m, off_n, M, N, HAS_RESIDUAL, INTERPRET, BLOCK_M, BLOCK_N // 2
        )
        _store_slice(
            o_desc,
            a1,
            r_ptr,
            off_m,
            off_n + BLOCK_N // 2,
            M,
            N,
            HAS_RESIDUAL,
            INTERPRET,
            BLOCK_M,
            BLOCK_N // 2,
        )
    else:
        a0, a1 = _halves(acc, BLOCK_M, BLOCK_N)
        a00, a01 = _halves(a0, BLOCK_M, BLOCK_N // 2)
        a10, a11 = _halves(a1, BLOCK_M, BLOCK_N // 2)
        Q: tl.constexpr = BLOCK_N // 4
        _store_slice(o_desc, a00, r_ptr, off_m, off_n, M, N, HAS_RESIDUAL, INTERPRET, BLOCK_M, Q)
        _store_slice(
            o_desc, a01, r_ptr, off_m, off_n + Q, M, N, HAS_RESIDUAL, INTERPRET, BLOCK_M, Q
        )
        _store_slice(
            o_desc, a10, r_ptr, off_m, off_n + 2 * Q, M, N, HAS_RESIDUAL, INTERPRET, BLOCK_M, Q
        )
        _store_slice(
            o_desc, a11, r_ptr, off_m, off_n + 3 * Q, M, N, HAS_RESIDUAL, INTERPRET, BLOCK_M, Q
        )


@triton.jit
def _dact_by_columns(
    dout, z_ptr, o_ptr, offs_m, offs_n, M, N, z_width,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """backward.py's `_dact_epilogue` on a whole tile, with no reshape: each output column n's z
    (gated: its packed z and g columns, (n // PACK)·2·PACK + n % PACK and PACK after it) is
    addressed directly, loaded and stored in dout's own shape. The same products in the same
    order, so the same bits; what it buys is a kernel triton 3.6's warp-specialisation pass
    takes (its data partitioner stops at the reshape / permute / split / join of the packed
    tile's `_gate_split`). dout: fp32 [BLOCK_M, BLOCK_N], output columns offs_n; padded gated
    columns (N ≤ n < Np) are stored as exact zeros, as the packed layout has them."""
    rows = offs_m.to(tl.int64)
    mask_m = offs_m < M
    if GATED:
        cols = ((offs_n // _PACK) * (2 * _PACK) + offs_n % _PACK).to(tl.int64)
        mask = mask_m[:, None] & (offs_n < tl.cdiv(N, _PACK) * _PACK)[None, :]
        z_ptrs = z_ptr + rows[:, None] * z_width + cols[None, :]
        z = tl.load(z_ptrs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(z_ptrs + _PACK, mask=mask, other=0.0).to(tl.float32)
        live = (offs_n < N)[None, :]
        act, act_grad = activation_and_grad(z, ACTIVATION)  # the Mosaic GPU sibling's pair
        dz = tl.where(live, dout * g * act_grad, 0.0)
        dg = tl.where(live, dout * act, 0.0)
        o_ptrs = o_ptr + rows[:, None] * z_width + cols[None, :]
        tl.store(o_ptrs, round_to_dtype(dz, o_ptr.dtype.element_ty, INTERPRET), mask=mask)
        tl.store(o_ptrs + _PACK, round_to_dtype(dg, o_ptr.dtype.element_ty, INTERPRET), mask=mask)
    else:
        cols = offs_n.to(tl.int64)
        mask = mask_m[:, None] & (offs_n < N)[None, :]
        z = tl.load(z_ptr + rows[:, None] * z_width + cols[None, :], mask=mask, other=0.0)
        out = dout * apply_activation_grad(z.to(tl.float32), ACTIVATION)
        o_ptrs = o_ptr + rows[:, None] * z_width + cols[None, :]
        tl.store(o_ptrs, round_to_dtype(out, o_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _operand_descriptors(
    x_ptr, w_ptr, M, N, K,
    X_KMAJOR: tl.constexpr, W_KMAJOR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """x's and w's descriptors, each as it lies: x [M, K] or, M-major, [K, M] (the backward's hᵀ
    read in place); w [K, N] or, K-major, [N, K]."""
    if X_KMAJOR:  # x is [K, M] in memory: the backward's hᵀ·dZ reads h as it is
        x_desc = tl.make_tensor_descriptor(
            x_ptr, shape=[K, M], strides=[M, 1], block_shape=[BLOCK_K, BLOCK_M]
        )
    else:
        x_desc = tl.make_tensor_descriptor(
            x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K]
        )
    if W_KMAJOR:  # w is [N, K] in memory
        w_desc = tl.make_tensor_descriptor(
            w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K]
        )
    else:
        w_desc = tl.make_tensor_descriptor(
            w_ptr, shape=[K, N], strides=[N, 1], block_shape=[BLOCK_K, BLOCK_N]
        )
    return x_desc, w_desc


@triton.jit
def _tile_product(
    x_desc, w_desc, off_m, off_n, k_first, k_tiles,
    X_KMAJOR: tl.constexpr, W_KMAJOR: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    OPERANDS_TF32_EXACT: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The fp32 [BLOCK_M, BLOCK_N] product tile at (off_m, off_n) over K steps k_first … k_tiles - 1
    (all of them but for a split run, `_linear_act_split_tail_kernel`). Under tf32 both
    operands are rounded in registers (tf32.py), unless OPERANDS_TF32_EXACT says they were
    rounded in memory (the front's rounded weights, inputs and hidden layers): wgmma then reads
    them straight from shared memory and stays in flight while the next slab lands. Rounded in
    registers, W serialises every wgmma (compiled for sm_90) and x through registers cost its
    products 31-44 % on an H100 (bench/results/2026-12-07-h100-2d92464-tf32/)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_first, k_tiles):
        # 2. load: TMA copies; rows past M, columns past N and the K tail read as zeros
        x = x_desc.load([k * BLOCK_K, off_m]).T if X_KMAJOR else x_desc.load([off_m, k * BLOCK_K])
        w = w_desc.load([off_n, k * BLOCK_K]).T if W_KMAJOR else w_desc.load([k * BLOCK_K, off_n])
        if INTERPRET:  # interpreter only: its 16-bit arithmetic is wrong (TOOLCHAIN.md)
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        # 3. compute: fp32 accumulate
        if not OPERANDS_TF32_EXACT:
            x = tf32_operand(x, INPUT_PRECISION)
            w = tf32_operand(w, INPUT_PRECISION)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _bias_act(
    acc, b_ptr, off_n, N,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_TF32: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The forward epilogue's arithmetic on an fp32 tile: + b, act, and under tf32 a hidden
    layer's rounding (no residual: it is stored as the next product reads it)."""
    if HAS_BIAS:
        offs_n = off_n + tl.arange(0, BLOCK_N)
        b = tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc = acc + b[None, :]
    acc = apply_activation(acc, ACTIVATION)
    if OUT_TF32:
        acc = tf32_operand(acc, "tf32")
    return acc


@triton.jit
def _linear_act_fwd_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, o_ptr, z_ptr,
    M, N, K, NUM_PROGRAMS, TILES,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SUBTILE: tl.constexpr, W_KMAJOR: tl.constexpr, X_KMAJOR: tl.constexpr,
    FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    EPILOGUE: tl.constexpr, DACT_ACTIVATION: tl.constexpr, OPERANDS_TF32_EXACT: tl.constexpr,
    OUT_TF32: tl.constexpr,
):  # fmt: skip
    # 1. program -> tile: descriptors once per program, then a strided walk over the tiles (TILES:
    # all of them, or the data-parallel ones before a split-tail launch takes the rest)
    x_desc, w_desc = _operand_descriptors(
        x_ptr, w_ptr, M, N, K, X_KMAJOR, W_KMAJOR, BLOCK_M, BLOCK_N, BLOCK_K
    )
    if EPILOGUE == "none":
        o_desc = tl.make_tensor_descriptor(
            o_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N // SUBTILE]
        )
    k_tiles = tl.cdiv(K, BLOCK_K)
    z_width = 2 * tl.cdiv(N, _PACK) * _PACK if EPILOGUE == "dact_gated" else N  # z's row stride
    # The epilogue recomputes its tile from a counter of its own (Triton tutorial 09): with the tile
    # loop flattened, a value used by both the next tile's loads and this tile's store would tie the
    # pipeliner's prologue to its epilogue.
    tile_out = tl.program_id(0) - NUM_PROGRAMS
    for tile in tl.range(
        tl.program_id(0), TILES, NUM_PROGRAMS, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE
    ):
        pid_m, pid_n = _grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N

        acc = _tile_product(
            x_desc, w_desc, off_m, off_n, 0, k_tiles, X_KMAJOR, W_KMAJOR, INPUT_PRECISION,
            OPERANDS_TF32_EXACT, INTERPRET, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip

        # 3. compute: the epilogue, all in fp32
        tile_out += NUM_PROGRAMS
        tile_m, tile_n = _grouped_tile(tile_out, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        out_m = tile_m * BLOCK_M
        out_n = tile_n * BLOCK_N
        acc = _bias_act(acc, b_ptr, out_n, N, ACTIVATION, HAS_BIAS, OUT_TF32, BLOCK_N)

        # 4. store: the residual added and the tile stored slice by slice
        if EPILOGUE == "none":
            _store_tile(
                o_desc, acc, r_ptr, out_m, out_n, M, N, HAS_RESIDUAL, INTERPRET,
                BLOCK_M, BLOCK_N, SUBTILE,
            )  # fmt: skip
        elif SUBTILE == 1 and WARP_SPECIALIZE:  # the backward's dgrad (tma/backward.py):
            # dh ⊙ act'(z) in fp32, rounded once; z_ptr: the saved z, or for relu the layer's
            # output (backward.py `_dact_from_output`); column by column, which the warp
            # specialisation pass takes (compiled for sm_90: 12 warps, 168 registers, no spill)
            _dact_by_columns(
                acc, z_ptr, o_ptr, out_m + tl.arange(0, BLOCK_M), out_n + tl.arange(0, BLOCK_N),
                M, N, z_width, DACT_ACTIVATION, EPILOGUE == "dact_gated", INTERPRET,
            )  # fmt: skip
        elif SUBTILE == 1:  # the same through the portable dgrad's epilogue, as the committed
            # table's plain-loop tiles were measured (their sm_90 code unchanged: by columns,
            # 128×128 at 8 warps spills 24 bytes instead of 12)
            _dact_epilogue(
                acc, z_ptr, o_ptr, tile_n, out_m + tl.arange(0, BLOCK_M),
                out_n + tl.arange(0, BLOCK_N), M, N, z_width, 1, z_width, 1,
                DACT_ACTIVATION, EPILOGUE == "dact_gated", INTERPRET, BLOCK_M, BLOCK_N,
            )  # fmt: skip
        else:  # the same in two column halves, each its own tile of half the width (gated: a
            # whole packed block pair, `_linear_act_launch`): half the saved tile live at a time
            HALF: tl.constexpr = BLOCK_N // 2
            a0, a1 = _halves(acc, BLOCK_M, BLOCK_N)
            _dact_epilogue(
                a0, z_ptr, o_ptr, 2 * tile_n, out_m + tl.arange(0, BLOCK_M),
                out_n + tl.arange(0, HALF), M, N, z_width, 1, z_width, 1,
                DACT_ACTIVATION, EPILOGUE == "dact_gated", INTERPRET, BLOCK_M, HALF,
            )  # fmt: skip
            _dact_epilogue(
                a1, z_ptr, o_ptr, 2 * tile_n + 1, out_m + tl.arange(0, BLOCK_M),
                out_n + HALF + tl.arange(0, HALF), M, N, z_width, 1, z_width, 1,
                DACT_ACTIVATION, EPILOGUE == "dact_gated", INTERPRET, BLOCK_M, HALF,
            )  # fmt: skip


@triton.jit
def _linear_act_split_tail_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, o_ptr, part_ptr, count_ptr,
    M, N, K, NUM_PROGRAMS, FIRST_TILE, TILES, SPLITS,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SUBTILE: tl.constexpr, W_KMAJOR: tl.constexpr, X_KMAJOR: tl.constexpr,
    OPERANDS_TF32_EXACT: tl.constexpr, OUT_TF32: tl.constexpr,
):  # fmt: skip
    """The last TILES tiles (from FIRST_TILE, in the grouped order), each split in K into SPLITS
    runs of equal K steps (common/tiling.py `last_wave_split`). Run u is chunk u // TILES of tile
    u % TILES, and the programs take runs program, program + NUM_PROGRAMS, ...: chunk by chunk, so
    a wave's programs read the same K slabs at the same time (shared in L2), as the data-parallel
    waves do. Each run writes its fp32 partial (part_ptr: [TILES, SPLITS, BLOCK_M, BLOCK_N]) and
    counts itself on its tile (count_ptr: zeros); the run that brings the count to SPLITS reads the
    partials back in chunk order, adds them and runs the epilogue. No waiting on another program
    (the interpreter runs programs one after another) and no float atomics: the same bits whichever
    run finishes last."""
    # 1. program -> its runs
    x_desc, w_desc = _operand_descriptors(
        x_ptr, w_ptr, M, N, K, X_KMAJOR, W_KMAJOR, BLOCK_M, BLOCK_N, BLOCK_K
    )
    HALF: tl.constexpr = BLOCK_N // 2
    half_desc = tl.make_tensor_descriptor(
        o_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, HALF]
    )
    k_tiles = tl.cdiv(K, BLOCK_K)
    offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    half_offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, HALF)[None, :]
    for run in range(tl.program_id(0), TILES * SPLITS, NUM_PROGRAMS):
        t = run % TILES
        chunk = run // TILES
        pid_m, pid_n = _grouped_tile(FIRST_TILE + t, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = _tile_product(
            x_desc, w_desc, off_m, off_n, chunk * k_tiles // SPLITS,
            (chunk + 1) * k_tiles // SPLITS, X_KMAJOR, W_KMAJOR, INPUT_PRECISION,
            OPERANDS_TF32_EXACT, INTERPRET, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        tile_part = part_ptr + t.to(tl.int64) * (SPLITS * BLOCK_M * BLOCK_N)
        tl.store(tile_part + chunk * (BLOCK_M * BLOCK_N) + offs, acc)
        # every thread's stores issued before the count says so (release at GPU scope)
        tl.debug_barrier()
        done = tl.atomic_add(count_ptr + t, 1, sem="acq_rel", scope="gpu")
        if done == SPLITS - 1:  # the tile's last run: add the partials, finish the tile
            tl.debug_barrier()
            # in column halves, read past L1 (the other runs' are other SMs' writes); the
            # accumulator is dead by now, so no second tile of registers is live
            for h in tl.static_range(2):
                part = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
                for c in range(SPLITS):
                    part += tl.load(
                        tile_part + c * (BLOCK_M * BLOCK_N) + h * HALF + half_offs,
                        cache_modifier=".cg",
                    )
                # 3. compute: the forward kernel's epilogue; 4. store
                part = _bias_act(
                    part, b_ptr, off_n + h * HALF, N, ACTIVATION, HAS_BIAS, OUT_TF32, HALF
                )
                _store_slice(
                    half_desc, part, r_ptr, off_m, off_n + h * HALF, M, N, HAS_RESIDUAL,
                    INTERPRET, BLOCK_M, HALF,
                )  # fmt: skip


# ==== launcher ====================================================================================
def _linear_act_launch(
    x_shape: torch.Size,
    x_strides: tuple[int, ...],
    w_shape: torch.Size,
    w_strides: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    has_bias: bool,
    has_residual: bool,
    activation: str,
    config: TileConfig,
    precision: str,
    epilogue: str,
    dact_activation: str,
    tf32_operands_exact: bool,
    tf32_output: bool,
    split_tail: bool | int = False,
) -> tuple[Launch | None, SplitTail | None, int, bool, bool]:
    """`linear_act_fwd`'s record for this key (`_LAUNCHES`): its launch (None when M or N is 0),
    the split-tail launch for its last tiles where `split_tail` asks (True: as `last_wave_split`
    says; an int: that many runs a tile, the probe's and the tests' choice),
    the output's width and whether x and w are read as they are, M-major and K-major.

    dtype is in the key: the residual's shared-memory room (`launch_config`) and the 16-byte rule
    of an M-major x depend on the element size. device too: the persistent grid is its SM count.
    """
    M, K = x_shape
    N = w_shape[1]
    width = packed_width(N) if epilogue == "dact_gated" else N
    if M == 0 or N == 0:
        return None, None, width, False, False
    # the layouts from the key's shapes and strides alone (a meta tensor holds no data)
    x_meta = torch.empty_strided(x_shape, x_strides, dtype=dtype, device="meta")
    w_meta = torch.empty_strided(w_shape, w_strides, dtype=dtype, device="meta")
    w_kmajor = is_k_major(w_meta)
    x_kmajor = is_k_major(x_meta) and (M * x_meta.element_size()) % TMA_ALIGN_BYTES == 0
    # a residual gets room in shared memory (more epilogue slices, then fewer stages)
    config, ws = launch_config("linear_act", config, dtype, precision, has_residual)
    if epilogue != "none":
        # A pointer epilogue that loads the saved z tile: the portable dgrad's tile cap (register
        # pressure), whole packed block pairs when gated; in column halves where the config says
        # 2 slices or more and a half is a whole pair (gated), else whole, warp-specialised where
        # the config asks and the pass takes it (`warp_specialize_applies`; the halves' split it
        # does not)
        config = cap_for_preact(config)
        if epilogue == "dact_gated":
            config = gated_config(config)
        pair = PACK_BLOCK if epilogue == "dact_gated" else 1
        halves = config.epilogue_subtile > 1 and (config.block_n // 2) % pair == 0
        config = dataclasses.replace(config, epilogue_subtile=2 if halves else 1)
        ws = warp_specialize_applies("linear_act", config)
    ws = tf32_safe_warp_specialize(ws, dtype, precision, x_kmajor or not w_kmajor)
    num_tiles = cdiv(M, config.block_m) * cdiv(N, config.block_n)
    programs = num_programs(num_tiles, device, config.programs_per_sm)
    flatten = not (INTERPRET or ws)
    k_tiles = cdiv(K, config.block_k)
    tail_tiles, splits = 0, 1
    if split_tail is not False and epilogue == "none" and config.programs_per_sm == 1:
        if split_tail is True and dtype != torch.float32 and not (x_kmajor or w_kmajor):
            # the model's split where it was measured: 16-bit operands read as they lie (the
            # forward); float32's K-major weights and the backward's transposed operands have
            # neither been timed nor tested through the split kernel
            tail_tiles, splits = last_wave_split(num_tiles, programs, k_tiles)
        elif num_tiles > programs and num_tiles % programs and 2 <= split_tail <= k_tiles:
            tail_tiles, splits = num_tiles % programs, split_tail
    shared = dict(
        ACTIVATION=activation, HAS_BIAS=has_bias, HAS_RESIDUAL=has_residual,
        INPUT_PRECISION=_input_precision(precision), INTERPRET=INTERPRET,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP_M=config.group_m, SUBTILE=config.epilogue_subtile, W_KMAJOR=w_kmajor,
        X_KMAJOR=x_kmajor, OPERANDS_TF32_EXACT=tf32_operands_exact, OUT_TF32=tf32_output,
        num_stages=config.num_stages,
    )  # fmt: skip
    launch = Launch(
        _linear_act_fwd_kernel, (programs,), (M, N, K, programs, num_tiles - tail_tiles),
        dict(
            shared, FLATTEN=flatten, WARP_SPECIALIZE=ws, EPILOGUE=epilogue,
            DACT_ACTIVATION=dact_activation, num_warps=config.num_warps,
        ),
    )  # fmt: skip
    tail = None
    if tail_tiles:
        # a plain K loop (no warp specialisation): a warp-specialised config's 4 warps would hold
        # a 128×256 fp32 accumulator at 256 registers a thread, so 8 warps there
        warps = max(config.num_warps, config.block_m * config.block_n // 4096)
        runners = min(programs, tail_tiles * splits)  # gpt-mlp's up projection: 12 runs
        tail = SplitTail(
            Launch(
                _linear_act_split_tail_kernel, (runners,),
                (M, N, K, runners, num_tiles - tail_tiles, tail_tiles, splits),
                dict(shared, num_warps=warps),
            ),
            tail_tiles,
            splits,
            (tail_tiles, splits, config.block_m, config.block_n),
        )  # fmt: skip
    return launch, tail, width, x_kmajor, w_kmajor


@dataclasses.dataclass(frozen=True)
class SplitTail:
    """A launch's split tail: its launch, its tiles (one counter each), the runs a tile and the
    partials' shape (fp32, one a run)."""

    launch: Launch
    tiles: int
    splits: int
    partials: tuple[int, int, int, int]


_LAUNCHES = LaunchCache(_linear_act_launch)
# The last wave split in K where `last_wave_split` says and a launch does not (`linear_act_fwd`'s
# `split_tail`). On an H100 (bench/results/2026-12-07-h100-ed8571f-split-tail/) gpt-mlp's up
# projection, the one GEMM measured where the model splits (4 tail tiles in 3 runs), ran 3 % faster
# (1.609 → 1.554 ms, faster in 6 of 7 paired rounds); where it declines (100-tile tails) no forced
# split won. 16-bit operands read as they lie only (`_linear_act_launch`); the probe
# (bench/split_tail_probe.py) sets it to time the front both ways.
SPLIT_TAIL = True


def linear_act_fwd(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    residual: torch.Tensor | None,
    *,
    activation: str,
    config: TileConfig,
    fp32_precision: str = "ieee",
    epilogue: str = "none",
    z: torch.Tensor | None = None,
    dact_activation: str = "identity",
    tf32_operands_exact: bool = False,
    tf32_output: bool = False,
    split_tail: bool | int | None = None,
) -> torch.Tensor:
    """Launch on a 2-D x [M, K], w [K, N] meeting the 16-byte rule; returns [M, N] in x.dtype.

    Trusts its input; makes operands contiguous and 16-byte aligned (copies only where not); a
    K-major w (`w_nk.t()`) is read as it is, and so is an M-major x (`x_km.t()`, the backward's
    transposed activations) where its rows (M elements) meet the 16-byte rule.

    `epilogue` (the backward's dgrad, tma/backward.py; `activation` identity, no bias or
    residual): "dact" returns acc ⊙ act'(z) for z [M, N] (for relu z is the layer's output h:
    relu' of h is relu' of z, NaN kept); "dact_gated" the packed [dz|dg]
    [M, packed_width(N)] from the packed z (backward.py's `_dact_epilogue`, `dact_activation`
    its act), each rounded once from fp32.

    float32 "tf32" (the front's path): `tf32_operands_exact` — the caller vouches that x and w
    hold tf32 values already (front: x and the hidden layers rounded in memory, the weights'
    K-major copies rounded once), so the kernel reads them as they lie rather than rounding them in
    registers (`_tile_product`; operands that are not tf32 values would be truncated by wgmma);
    `tf32_output` — the output is a hidden layer that a tf32 product reads next: stored rounded to
    tf32 (no residual), so that product can read it as it lies.

    `split_tail`: the last T mod P tiles split in K (a second launch, epilogue "none" only) where
    `common.tiling.last_wave_split` says (True: for 16-bit x and w read as they lie, where it was
    measured), into that many runs a tile (an int ≥ 2, any layout), or not (False); None:
    `SPLIT_TAIL` (on).
    """
    if tf32_output and residual is not None:
        raise ValueError(
            "tf32_output: a launch with a residual stores the MLP's output, which is not rounded "
            "to tf32 (the rounding would come before the residual's add); got both"
        )
    M = x.shape[0]
    launch, tail, width, x_kmajor, w_kmajor = _LAUNCHES.get((
        x.shape, x.stride(), w.shape, w.stride(), x.dtype, x.device, b is not None,
        residual is not None, activation, config, fp32_precision, epilogue, dact_activation,
        tf32_operands_exact and fp32_precision == "tf32", tf32_output and fp32_precision == "tf32",
        SPLIT_TAIL if split_tail is None else split_tail,
    ))  # fmt: skip
    out = torch.empty((M, width), device=x.device, dtype=x.dtype)
    if launch is None:  # M == 0 or N == 0
        return out
    # per call: the operands' own facts (a copy where a base is not 16-byte aligned)
    x = as_tma_operand(x.t()).t() if x_kmajor else as_tma_operand(x)
    w = as_tma_operand(w.t()).t() if w_kmajor else as_tma_operand(w)
    b = b.contiguous() if b is not None else None
    z = z.contiguous() if z is not None else None  # the epilogue's row stride is its width
    if residual is not None:
        residual = residual.contiguous()  # row stride N
    ensure_allocator()  # per call: Triton keeps the allocator per context (support.py)
    launch(x, w, b, residual, out, z)
    if tail is not None:
        partials = torch.empty(tail.partials, device=x.device, dtype=torch.float32)
        counts = torch.zeros(tail.tiles, device=x.device, dtype=torch.int32)
        tail.launch(x, w, b, residual, out, partials, counts)
    return out


# ==== grouped products (the weight gradients of a training step) ==================================
@triton.jit
def _product_tiles(
    x_ptr, w_ptr, o_ptr, M, N, K, first, NUM_PROGRAMS,
    INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SUBTILE: tl.constexpr, W_KMAJOR: tl.constexpr, X_KMAJOR: tl.constexpr,
    FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):  # fmt: skip
    """This program's tiles of one product x·w (no bias or activation): the forward kernel's tile
    loop, over the tiles t of the grouped list with t ≡ program (mod NUM_PROGRAMS), where this
    product's tiles are first, first + 1, ... Returns the product's tile count."""
    # 1. program -> tile: the product's descriptors, then its share of the shared walk
    x_desc, w_desc = _operand_descriptors(
        x_ptr, w_ptr, M, N, K, X_KMAJOR, W_KMAJOR, BLOCK_M, BLOCK_N, BLOCK_K
    )
    o_desc = tl.make_tensor_descriptor(
        o_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N // SUBTILE]
    )
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    # the program's first tile here: the least local t ≥ 0 with first + t ≡ program (operands
    # of % kept non-negative: its sign rule for negative ones differs between C and Python)
    start = (tl.program_id(0) + NUM_PROGRAMS - first % NUM_PROGRAMS) % NUM_PROGRAMS
    tile_out = start - NUM_PROGRAMS  # the epilogue's own counter, as the forward kernel's
    for tile in tl.range(
        start, num_tiles, NUM_PROGRAMS, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE
    ):
        pid_m, pid_n = _grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = _tile_product(
            x_desc, w_desc, off_m, off_n, 0, k_tiles, X_KMAJOR, W_KMAJOR, INPUT_PRECISION, False,
            INTERPRET, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        # 4. store: the fp32 product rounded once, slice by slice
        tile_out += NUM_PROGRAMS
        tile_m, tile_n = _grouped_tile(tile_out, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        _store_tile(
            o_desc, acc, o_ptr, tile_m * BLOCK_M, tile_n * BLOCK_N, M, N, False, INTERPRET,
            BLOCK_M, BLOCK_N, SUBTILE,
        )  # fmt: skip
    return num_tiles


@triton.jit
def _linear_grouped_kernel(
    x_ptrs, w_ptrs, o_ptrs, ms, ns, K, NUM_PROGRAMS,
    COUNT: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SUBTILE: tl.constexpr, W_KMAJOR: tl.constexpr, X_KMAJOR: tl.constexpr,
    FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):  # fmt: skip
    # The products' tiles as ONE list (product 0's, then product 1's, ...) walked by every program
    # with the persistent grid's stride: each product's loop continues the round where the one
    # before it stopped, so a product with few tiles fills the last wave of the one before it.
    first = 0
    for g in tl.static_range(COUNT):
        first += _product_tiles(
            x_ptrs[g], w_ptrs[g], o_ptrs[g], ms[g], ns[g], K, first, NUM_PROGRAMS,
            INPUT_PRECISION, INTERPRET, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SUBTILE,
            W_KMAJOR[g], X_KMAJOR[g], FLATTEN, WARP_SPECIALIZE,
        )  # fmt: skip


def _linear_grouped_launch(
    x_shapes: tuple[torch.Size, ...],
    x_strides: tuple[tuple[int, ...], ...],
    w_shapes: tuple[torch.Size, ...],
    w_strides: tuple[tuple[int, ...], ...],
    dtype: torch.dtype,
    device: torch.device,
    config: TileConfig,
    precision: str,
) -> tuple[Launch, tuple[bool, ...], tuple[bool, ...]]:
    """`linear_grouped`'s record for this key (`_GROUPED_LAUNCHES`; every product non-empty): its
    launch and, per product, whether x is read M-major and w K-major as they lie."""
    ms = tuple(s[0] for s in x_shapes)
    ns = tuple(s[1] for s in w_shapes)
    k = x_shapes[0][1]
    x_metas = [torch.empty_strided(s, st, dtype=dtype, device="meta")
               for s, st in zip(x_shapes, x_strides, strict=True)]  # fmt: skip
    w_metas = [torch.empty_strided(s, st, dtype=dtype, device="meta")
               for s, st in zip(w_shapes, w_strides, strict=True)]  # fmt: skip
    itemsize = x_metas[0].element_size()
    x_kmajor = tuple(is_k_major(x) and (x.shape[0] * itemsize) % TMA_ALIGN_BYTES == 0
                     for x in x_metas)  # fmt: skip
    w_kmajor = tuple(is_k_major(w) for w in w_metas)
    config, ws = launch_config("linear_act", config, dtype, precision, False)
    # Warp-specialised, each product's tile loop got shared-memory buffers of its own (compiled
    # for sm_90 on a CPU, triton 3.6: 128×256×64 at 3 stages asked 377 KB for two products, past
    # the 227 KB an SM has); plain loops share theirs. So: only for a single product.
    ws = ws and len(ms) == 1
    transposed = any(x_kmajor) or not all(w_kmajor)
    ws = tf32_safe_warp_specialize(ws, dtype, precision, transposed)
    num_tiles = sum(cdiv(m, config.block_m) * cdiv(n, config.block_n)
                    for m, n in zip(ms, ns, strict=True))  # fmt: skip
    programs = num_programs(num_tiles, device, config.programs_per_sm)
    launch = Launch(
        _linear_grouped_kernel, (programs,), (ms, ns, k, programs),
        dict(
            COUNT=len(ms), INPUT_PRECISION=_input_precision(precision), INTERPRET=INTERPRET,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            GROUP_M=config.group_m, SUBTILE=config.epilogue_subtile, W_KMAJOR=w_kmajor,
            X_KMAJOR=x_kmajor, FLATTEN=not (INTERPRET or ws), WARP_SPECIALIZE=ws,
            num_warps=config.num_warps, num_stages=config.num_stages,
        ),
    )  # fmt: skip
    return launch, x_kmajor, w_kmajor


_GROUPED_LAUNCHES = LaunchCache(_linear_grouped_launch)


def linear_grouped(
    xs: Sequence[torch.Tensor],
    ws: Sequence[torch.Tensor],
    *,
    config: TileConfig,
    fp32_precision: str = "ieee",
) -> tuple[torch.Tensor, ...]:
    """The products xs[g] @ ws[g] (2-D, no bias or activation) in ONE persistent launch whose
    grid walks all their output tiles as one list (`_linear_grouped_kernel`); returns them in
    xs' dtype. The products share K and dtype; each x may be an M-major view (`h.t()`) and each
    w a K-major one (`w_nk.t()`), read in place as `linear_act_fwd` reads them — the training
    step's weight gradients hᵢᵀ·dZᵢ, which all contract over the batch (tma/backward.py).

    Why: one of them alone leaves the last wave of the grid part empty (few output tiles, a long
    K); launched together their tiles fill the waves. Twin of jax_impl/mosaic/linear_act.py's
    `linear_grouped` (same name, same arguments but the layout flags, which are read here from
    the strides). Trusts its input to meet the 16-byte rule; ValueError when the products do not
    share K and dtype or there are none. Under the interpreter the products come out bit for
    bit as `linear_act_fwd`'s on the same config (tests/test_tma_grouped.py)."""
    if not xs or len(xs) != len(ws):
        raise ValueError(
            f"xs, ws: expected as many (at least one) of each, got {len(xs)} and {len(ws)}"
        )
    dims = [(x.shape[0], x.shape[1], w.shape[1]) for x, w in zip(xs, ws, strict=True)]
    ks = {x.shape[1] for x in xs} | {w.shape[0] for w in ws}
    dtypes = {a.dtype for a in (*xs, *ws)}
    if len(ks) != 1 or len(dtypes) != 1:
        raise ValueError(
            f"xs, ws: expected one K and one dtype, got x shapes {[tuple(x.shape) for x in xs]}, "
            f"w shapes {[tuple(w.shape) for w in ws]} and dtypes {sorted(map(str, dtypes))}"
        )
    outs = [torch.empty((m, n), device=xs[0].device, dtype=xs[0].dtype) for m, _, n in dims]
    live = [g for g, dim in enumerate(dims) if 0 not in dim]
    for g in set(range(len(dims))) - set(live):  # no tiles, or an empty contraction (zeros)
        outs[g].zero_()
    if not live:
        return tuple(outs)
    launch, x_kmajor, w_kmajor = _GROUPED_LAUNCHES.get((
        tuple(xs[g].shape for g in live), tuple(xs[g].stride() for g in live),
        tuple(ws[g].shape for g in live), tuple(ws[g].stride() for g in live),
        xs[0].dtype, xs[0].device, config, fp32_precision,
    ))  # fmt: skip
    # per call: the operands' own facts (a copy where a base is not 16-byte aligned)
    x_ops = tuple(as_tma_operand(xs[g].t()).t() if xk else as_tma_operand(xs[g])
                  for g, xk in zip(live, x_kmajor, strict=True))  # fmt: skip
    w_ops = tuple(as_tma_operand(ws[g].t()).t() if wk else as_tma_operand(ws[g])
                  for g, wk in zip(live, w_kmajor, strict=True))  # fmt: skip
    ensure_allocator()
    launch(x_ops, w_ops, tuple(outs[g] for g in live))
    return tuple(outs)


# ==== public function =============================================================================
def linear_act(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None = None,
    *,
    activation: str = "identity",
    residual: torch.Tensor | None = None,
    config: TileConfig | None = None,
    fp32_precision: str = "ieee",
) -> torch.Tensor:
    """act(x @ w + b) (+ residual) for x [..., K], w [K, N], b [N], residual [..., N].

    Where K or N breaks TMA's 16-byte stride rule, runs the portable `torch_impl.linear_act`.
    """
    dtype, K, N = check_layer(
        ADAPTER,
        x,
        w,
        b,
        residual=residual,
        activation=activation,
        config=config,
        fp32_precision=fp32_precision,
        impl="triton_tma",
    )
    check_kernel_device(x)
    lead = list(x.shape[:-1])

    x2d = x.reshape(-1, K)
    M = x2d.shape[0]
    if tma_unsupported_reason(M, N, K, dtype) is not None:
        return portable.linear_act(
            x,
            w,
            b,
            activation=activation,
            residual=residual,
            config=config,
            fp32_precision=fp32_precision,
        )
    r2d = residual.reshape(-1, N) if residual is not None else None
    if config is None:
        config = heuristic_config(
            "linear_act", M, N, K, dtype, interpret=INTERPRET, persistent=True,
            fp32_precision=fp32_precision,
        )  # fmt: skip
    out = linear_act_fwd(
        x2d, w, b, r2d, activation=activation, config=config, fp32_precision=fp32_precision
    )
    return out.reshape(*lead, N)
