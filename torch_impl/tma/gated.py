"""gated, the Hopper way: out = act(x·W + b) ⊙ (x·V + c) as ONE GEMM over the packed [W|V] operand.

Formula (as the portable kernel, torch_impl/gated.py): `wv` [K, 2·Np] holds W and V interleaved in
blocks of PACK_BLOCK = 64 columns (common/packing.py), `bc` [2·Np] the biases likewise;
acc = Σ_k x[m, k]·wv[k, p] in fp32 over a [BLOCK_M, 2·BLOCK_N] packed tile, acc += bc[p], the
tile splits into gate and up (`_gate_split`, shared with the portable kernel: an outer-dimension
split, no data movement), out = act(gate) · up, cast once at the store. One X tile and one packed
tile per K step feed ONE wgmma group with a 2·BLOCK_N wide accumulator (128×256 for the 16-bit
large-M config): the X tile is read from shared memory once, there is one MMA group to wait on,
and the TMA copies are as large as linear_act's. Only h [M, N] is written — and, for training
(STORE_PREACT), the packed pre-activation tile, in slices as h is.

Grid: persistent, as tma/linear_act.py: min(programs_per_sm·#SMs, #tiles) programs (the heuristic
gives gated layers 1 per SM), each walking output tiles
p, p + P, ... in the portable kernel's grouped order (`_grouped_tile` over h's [M, N]), K in
BLOCK_K steps; `flatten=True` lets the pipeliner overlap the next tile's loads with this tile's
epilogue. `TileConfig.warp_specialize` is ignored: triton 3.6's Hopper warp-specialisation pass
cannot partition the reshape / permute / split of the gate split (common/tiling.py
`warp_specialize_applies`, found by compiling for sm_90).

Epilogue: bc added to the packed tile, the split, act(g)·u in fp32, then h stored in
`TileConfig.epilogue_subtile` column slices through a descriptor whose block is one slice
(tma/linear_act.py `_store_tile`), so that only a slice is staged in shared memory.

Addressing: x, wv and h through in-kernel descriptors (why in-kernel: see tma/linear_act.py);
reads past the edges give zeros (rows past M, the K tail), writes are clipped at M and N (the
packed padding columns, zeros, meet only output columns ≥ N); only the 1-D bias is masked.
Layout of wv: [K, 2·Np] row-major as everywhere, or K-major — the [K, 2·Np] view of a row-major
[2·Np, K] buffer (`WV_KMAJOR`), read as it is: 16-bit wgmma reads either from shared memory, but
float32's ("tf32") reads a K-major operand only, and a row-major slab costs a transposing pass
through registers every K step with its wgmma waited on at once (found by compiling for sm_90;
bench/tf32_probe.py measures it).
Launcher: a launch record per key, as tma/linear_act.py's (shapes, dtype, device, config, flags,
wv's layout; no strides: the operands are made contiguous in their layout).
Interpreter: 16-bit tiles are upcast to fp32 after the load.

Twin: none in JAX — the sibling is jax_impl/mosaic/gated.py (same signatures); portable twin
torch_impl/gated.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedmlp.common.config import TileConfig
from fusedmlp.common.tiling import cdiv, heuristic_config
from fusedmlp.common.validate import check_packed_gated

from .. import gated as portable
from ..activations import apply_activation
from ..front import ADAPTER
from ..gated import _PACK, _gate_split
from ..launch import Launch, LaunchCache
from ..linear_act import _grouped_tile, _input_precision
from ..runtime import INTERPRET, check_kernel_device
from ..tf32 import tf32_operand
from .linear_act import _store_tile
from .support import (
    as_tma_operand,
    ensure_allocator,
    is_k_major,
    launch_config,
    num_programs,
    tma_unsupported_reason,
)


# ==== forward kernel ==============================================================================
@triton.jit
def _gated_fwd_kernel(
    x_ptr, wv_ptr, bc_ptr, o_ptr, z_ptr,
    M, N, K, NUM_PROGRAMS,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SUBTILE: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    STORE_PREACT: tl.constexpr, Z_SUBTILE: tl.constexpr, WV_KMAJOR: tl.constexpr,
    OPERANDS_TF32_EXACT: tl.constexpr, OUT_TF32: tl.constexpr,
):  # fmt: skip
    # 1. program -> tile: descriptors once per program, then a strided walk over the output tiles
    n_packed = 2 * tl.cdiv(N, _PACK) * _PACK  # 2·Np
    x_desc = tl.make_tensor_descriptor(
        x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K]
    )
    if WV_KMAJOR:  # wv is [2·Np, K] in memory (`wv_pk.t()`): a free transpose in shared memory
        wv_desc = tl.make_tensor_descriptor(
            wv_ptr, shape=[n_packed, K], strides=[K, 1], block_shape=[2 * BLOCK_N, BLOCK_K]
        )
    else:
        wv_desc = tl.make_tensor_descriptor(
            wv_ptr, shape=[K, n_packed], strides=[n_packed, 1], block_shape=[BLOCK_K, 2 * BLOCK_N]
        )
    o_desc = tl.make_tensor_descriptor(
        o_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N // SUBTILE]
    )
    if STORE_PREACT:  # training: the packed [z|g] pre-activation, [M, 2·Np]
        z_desc = tl.make_tensor_descriptor(
            z_ptr, shape=[M, n_packed], strides=[n_packed, 1],
            block_shape=[BLOCK_M, 2 * BLOCK_N // Z_SUBTILE],
        )  # fmt: skip
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    # The epilogue recomputes its tile from a counter of its own (Triton tutorial 09): with the tile
    # loop flattened, a value used by both the next tile's loads and this tile's store would tie the
    # pipeliner's prologue to its epilogue.
    tile_out = tl.program_id(0) - NUM_PROGRAMS
    for tile in tl.range(
        tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE
    ):
        pid_m, pid_n = _grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_p = pid_n * 2 * BLOCK_N

        acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
        for k in range(k_tiles):
            # 2. load: one X tile, one packed tile; past the edges TMA reads zeros
            x = x_desc.load([off_m, k * BLOCK_K])
            if WV_KMAJOR:
                wv = wv_desc.load([off_p, k * BLOCK_K]).T
            else:
                wv = wv_desc.load([k * BLOCK_K, off_p])
            if INTERPRET:  # interpreter only: its 16-bit arithmetic is wrong (TOOLCHAIN.md)
                x = x.to(tl.float32)
                wv = wv.to(tl.float32)
            # 3. compute: fp32 accumulate, gate and up in one product; tf32 operands rounded in
            # registers unless rounded in memory (linear_act's `_tile_product` says why)
            if not OPERANDS_TF32_EXACT:
                x = tf32_operand(x, INPUT_PRECISION)
                wv = tf32_operand(wv, INPUT_PRECISION)
            acc = tl.dot(x, wv, acc, input_precision=INPUT_PRECISION)

        # 3. compute: the epilogue, all in fp32
        tile_out += NUM_PROGRAMS
        tile_m, tile_n = _grouped_tile(tile_out, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        out_m = tile_m * BLOCK_M
        out_n = tile_n * BLOCK_N
        if HAS_BIAS:
            offs_p = tile_n * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)
            bc = tl.load(bc_ptr + offs_p, mask=offs_p < n_packed, other=0.0).to(tl.float32)
            acc = acc + bc[None, :]
        if STORE_PREACT:  # rounded once, as the portable saving kernel stores it
            _store_tile(
                z_desc, acc, o_ptr, out_m, tile_n * 2 * BLOCK_N, M, n_packed, False, INTERPRET,
                BLOCK_M, 2 * BLOCK_N, Z_SUBTILE,
            )  # fmt: skip
        g, u = _gate_split(acc, BLOCK_M, BLOCK_N, _PACK)
        h = apply_activation(g, ACTIVATION) * u
        if OUT_TF32:  # under tf32, h as the next product reads it (linear_act's `tf32_output`)
            h = tf32_operand(h, "tf32")

        # 4. store: slice by slice, one rounding each; TMA clips at M and N
        _store_tile(
            o_desc, h, o_ptr, out_m, out_n, M, N, False, INTERPRET, BLOCK_M, BLOCK_N, SUBTILE
        )


# ==== launcher ====================================================================================
def _gated_launch(
    x_shape: torch.Size,
    wv_shape: torch.Size,
    dtype: torch.dtype,
    device: torch.device,
    has_bias: bool,
    n: int,
    activation: str,
    config: TileConfig,
    precision: str,
    store_preact: bool,
    wv_kmajor: bool,
    tf32_operands_exact: bool,
    tf32_output: bool,
) -> Launch | None:
    """`gated_fwd`'s launch for this key (`_LAUNCHES`), None when M or n is 0. No strides in the
    key: the operands are made contiguous, and the kernel's strides follow from the shapes. dtype
    is (`launch_config`'s key has it), and the device: the persistent grid is its SM count."""
    M, K = x_shape
    if M == 0 or n == 0:
        return None
    # block_n: whole packed block pairs (at least 64)
    config, ws = launch_config("gated", config, dtype, precision, False)
    num_tiles = cdiv(M, config.block_m) * cdiv(n, config.block_n)
    programs = num_programs(num_tiles, device, config.programs_per_sm)
    return Launch(
        _gated_fwd_kernel, (programs,), (M, n, K, programs),
        dict(
            ACTIVATION=activation, HAS_BIAS=has_bias,
            INPUT_PRECISION=_input_precision(precision), INTERPRET=INTERPRET,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            GROUP_M=config.group_m, SUBTILE=config.epilogue_subtile,
            FLATTEN=not (INTERPRET or ws), WARP_SPECIALIZE=ws,
            STORE_PREACT=store_preact, Z_SUBTILE=min(4, 2 * config.epilogue_subtile),
            WV_KMAJOR=wv_kmajor, OPERANDS_TF32_EXACT=tf32_operands_exact, OUT_TF32=tf32_output,
            num_warps=config.num_warps, num_stages=config.num_stages,
        ),
    )  # fmt: skip


_LAUNCHES = LaunchCache(_gated_launch)


def gated_fwd(
    x: torch.Tensor,
    wv: torch.Tensor,
    bc: torch.Tensor | None,
    *,
    n: int,
    activation: str,
    config: TileConfig,
    fp32_precision: str = "ieee",
    store_preact: bool = False,
    tf32_operands_exact: bool = False,
    tf32_output: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Launch on a 2-D x [M, K], wv [K, packed_width(n)], bc [packed_width(n)] or None, meeting the
    16-byte rule; returns h [M, n] in x.dtype. Trusts its input (a block_n under 64 is read as
    64); makes operands contiguous and 16-byte aligned; a K-major wv (`wv_pk.t()`, a [2·Np, K]
    buffer) is read as it is. `store_preact` (training, the Hopper
    path of backward.forward_saving): returns (h, zg), zg = x·wv + bc, the packed [M, 2·Np]
    pre-activation rounded once to x.dtype, as the portable saving kernel stores it.
    `tf32_operands_exact`, `tf32_output`: as linear_act_fwd's (x and wv hold tf32 values; h is
    stored rounded to tf32 for the product that reads it next)."""
    M = x.shape[0]
    wv_kmajor = is_k_major(wv)
    launch = _LAUNCHES.get((
        x.shape, wv.shape, x.dtype, x.device, bc is not None, n, activation, config,
        fp32_precision, store_preact, wv_kmajor, tf32_operands_exact and fp32_precision == "tf32",
        tf32_output and fp32_precision == "tf32",
    ))  # fmt: skip
    out = torch.empty((M, n), device=x.device, dtype=x.dtype)
    z = torch.empty((M, wv.shape[1]), device=x.device, dtype=x.dtype) if store_preact else None
    if launch is None:  # M == 0 or n == 0
        return (out, z) if store_preact else out
    # per call: the operands' own facts (a copy where not contiguous or not 16-byte aligned)
    x = as_tma_operand(x)
    wv = as_tma_operand(wv.t()).t() if wv_kmajor else as_tma_operand(wv)
    bc = bc.contiguous() if bc is not None else None
    ensure_allocator()  # per call: Triton keeps the allocator per context (support.py)
    launch(x, wv, bc, out, z)
    return (out, z) if store_preact else out


# ==== public function =============================================================================
def gated(
    x: torch.Tensor,
    wv: torch.Tensor,
    bc: torch.Tensor | None = None,
    *,
    n: int,
    activation: str = "silu",
    config: TileConfig | None = None,
    fp32_precision: str = "ieee",
) -> torch.Tensor:
    """act(x @ w + b) * (x @ v + c) from the packed operands (`torch_impl.packing.pack_gated`):
    x [..., K], wv [K, packed_width(n)], bc [packed_width(n)] or None; returns [..., n].

    Where K or n breaks TMA's 16-byte stride rule, runs the portable `torch_impl.gated`.
    """
    dtype, K, n = check_packed_gated(
        ADAPTER,
        x,
        wv,
        bc,
        n=n,
        activation=activation,
        config=config,
        fp32_precision=fp32_precision,
        impl="triton_tma",
    )
    check_kernel_device(x)

    lead = list(x.shape[:-1])
    x2d = x.reshape(-1, K)
    M = x2d.shape[0]
    if tma_unsupported_reason(M, n, K, dtype) is not None:
        return portable.gated(
            x, wv, bc, n=n, activation=activation, config=config, fp32_precision=fp32_precision
        )
    if config is None:
        config = heuristic_config(
            "gated", M, n, K, dtype, interpret=INTERPRET, persistent=True,
            fp32_precision=fp32_precision,
        )  # fmt: skip
    out = gated_fwd(
        x2d, wv, bc, n=n, activation=activation, config=config, fp32_precision=fp32_precision
    )
    return out.reshape(*lead, n)
