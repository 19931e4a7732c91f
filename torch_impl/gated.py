"""gated: out = act(x·W + b) ⊙ (x·V + c), one Triton GEMM over the packed [W|V] operand.

Formula: with W and V packed once into `wv` [K, 2·Np] (common/packing.py: gate and up interleaved
in blocks of PACK_BLOCK = 64 columns, N padded to Np with zeros) and `bc` [2·Np] likewise,
acc = Σ_k x[m, k]·wv[k, p] in fp32 over a [BLOCK_M, 2·BLOCK_N] packed tile; acc += bc[p]; the tile
splits into its gate and up halves, out = act(gate) · up, cast once to the dtype at the store. One
dot per K step (X read once, one accumulator, one MMA group); only the gated hidden is written.

Grid: 1-D, one program per (BLOCK_M × BLOCK_N) OUTPUT tile (BLOCK_N ≥ 64: `tiling.gated_config`
reads a pinned block_n under 64 as 64), grouped by
GROUP_M tile rows for L2 reuse (`_grouped_tile`, shared with linear_act); output tile n reads packed
columns [2·n·BLOCK_N, 2·(n+1)·BLOCK_N), which hold BLOCK_N/64 whole (gate, up) block pairs. Each
program walks K in BLOCK_K steps.

The split (`_gate_split`) is a reshape to [BLOCK_M, pairs, 2, 64], a permute that puts the
gate/up axis last and `tl.split`: an outer-dimension split, which moves no data between threads.

Masks on every edge (rows past M, packed columns past 2·Np, the ragged K tail, output columns past
N), int64 offsets, any strides for x and wv; under TRITON_INTERPRET=1 16-bit tiles are upcast to
fp32 right after the load (never on a GPU) — as in linear_act.

Twin: jax_impl/gated.py (Pallas-Triton), line for line; differences carry `# twin-diff:`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedmlp.common.config import TileConfig
from fusedmlp.common.packing import PACK_BLOCK
from fusedmlp.common.tiling import cdiv, gated_config, heuristic_config
from fusedmlp.common.validate import check_packed_gated

from .activations import apply_activation, round_to_dtype
from .front import ADAPTER
from .launch import Launch, LaunchCache
from .linear_act import _grouped_tile, _input_precision
from .runtime import INTERPRET, check_kernel_device
from .tf32 import tf32_operand

# The packed layout's block (common/packing.py), a constexpr for the kernels.
_PACK = tl.constexpr(PACK_BLOCK)


# ==== forward kernel ==============================================================================
@triton.jit
def _gate_split(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PACK: tl.constexpr):
    """A packed [BLOCK_M, 2·BLOCK_N] tile -> its gate and up halves, [BLOCK_M, BLOCK_N] each."""
    acc = tl.reshape(acc, (BLOCK_M, BLOCK_N // PACK, 2, PACK))
    acc = tl.permute(acc, (0, 1, 3, 2))  # the gate/up axis last: tl.split takes it apart
    g, u = tl.split(acc)
    return tl.reshape(g, (BLOCK_M, BLOCK_N)), tl.reshape(u, (BLOCK_M, BLOCK_N))


@triton.jit
def _gated_fwd_kernel(
    x_ptr, wv_ptr, bc_ptr, o_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wvk, stride_wvn, stride_om, stride_on,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # The forward-only kernel: the tile below without the pre-activation store. Its signature is
    # the one jax_impl/cross calls by name; its sm_90 PTX is what it was before issue 24 (line
    # info aside: the tile is inlined).
    _gated_fwd_tile(
        x_ptr, wv_ptr, bc_ptr, o_ptr, None,
        M, N, K,
        stride_xm, stride_xk, stride_wvk, stride_wvn, stride_om, stride_on,
        ACTIVATION, HAS_BIAS, INPUT_PRECISION, INTERPRET,
        BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, False,
    )  # fmt: skip


@triton.jit
def _gated_saving_fwd(
    x_ptr, wv_ptr, bc_ptr, o_ptr, z_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wvk, stride_wvn, stride_om, stride_on,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # twin-diff: the training forward (backward.py) is a second kernel of the same tile, storing
    # the packed [z|g] as well (z_ptr: contiguous [M, 2·Np]); the Pallas twin adds an output.
    _gated_fwd_tile(
        x_ptr, wv_ptr, bc_ptr, o_ptr, z_ptr,
        M, N, K,
        stride_xm, stride_xk, stride_wvk, stride_wvn, stride_om, stride_on,
        ACTIVATION, HAS_BIAS, INPUT_PRECISION, INTERPRET,
        BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, True,
    )  # fmt: skip


@triton.jit
def _gated_fwd_tile(
    x_ptr, wv_ptr, bc_ptr, o_ptr, z_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wvk, stride_wvn, stride_om, stride_on,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    STORE_PREACT: tl.constexpr,
):  # fmt: skip
    # 1. program -> tile: an output tile of h, and the packed tile of wv twice as wide
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_p = pid_n * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_p = offs_p < 2 * tl.cdiv(N, _PACK) * _PACK  # the packed width, 2·Np
    # int64 offsets: with arbitrary strides any of row·stride, col·stride, k·stride may pass 2^31
    # (M·K ≥ 2^31 elements, or a transposed view); the address arithmetic is 64-bit anyway.
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    x_ptrs = x_ptr + rows[:, None] * stride_xm
    wv_ptrs = wv_ptr + offs_p.to(tl.int64)[None, :] * stride_wvn

    acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        # 2. load: one X tile, one packed tile; masked on M (or 2·Np) and the ragged K tail
        offs_k = k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        ks = offs_k.to(tl.int64)
        x = tl.load(
            x_ptrs + ks[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0
        )
        wv = tl.load(
            wv_ptrs + ks[:, None] * stride_wvk, mask=mask_k[:, None] & mask_p[None, :], other=0.0
        )
        if INTERPRET:  # interpreter only: its 16-bit arithmetic is wrong (TOOLCHAIN.md)
            x = x.to(tl.float32)
            wv = wv.to(tl.float32)
        # 3. compute: fp32 accumulate, gate and up in one product
        acc = tl.dot(
            tf32_operand(x, INPUT_PRECISION),
            tf32_operand(wv, INPUT_PRECISION),
            acc,
            input_precision=INPUT_PRECISION,
        )

    # 3. compute: the epilogue, all in fp32
    if HAS_BIAS:
        bc = tl.load(bc_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float32)
        acc = acc + bc[None, :]
    if STORE_PREACT:  # training (backward.py): the packed [z|g] tile, contiguous [M, 2·Np]
        width = 2 * tl.cdiv(N, _PACK) * _PACK
        z_ptrs = z_ptr + rows[:, None] * width + offs_p.to(tl.int64)[None, :]
        z_mask = mask_m[:, None] & mask_p[None, :]
        tl.store(z_ptrs, round_to_dtype(acc, z_ptr.dtype.element_ty, INTERPRET), mask=z_mask)
    g, u = _gate_split(acc, BLOCK_M, BLOCK_N, _PACK)
    acc = apply_activation(g, ACTIVATION) * u
    mask_mn = mask_m[:, None] & mask_n[None, :]

    # 4. store: one rounding to the output dtype
    o_ptrs = o_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(o_ptrs, round_to_dtype(acc, o_ptr.dtype.element_ty, INTERPRET), mask=mask_mn)


# ==== launcher ====================================================================================
def _gated_launch(
    x_shape, x_strides, wv_strides, n, has_bias, activation, config, fp32_precision, store_preact
) -> Launch:
    """`gated_fwd`'s launch for this key (`_LAUNCHES`); out is a fresh contiguous [M, n]."""
    M, K = x_shape
    config = gated_config(config)  # block_n: whole packed block pairs (at least 64)
    kernel = _gated_saving_fwd if store_preact else _gated_fwd_kernel
    return Launch(
        kernel, (cdiv(M, config.block_m) * cdiv(n, config.block_n),),
        (M, n, K, *x_strides, *wv_strides, n, 1),
        dict(
            ACTIVATION=activation, HAS_BIAS=has_bias,
            INPUT_PRECISION=_input_precision(fp32_precision), INTERPRET=INTERPRET,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            GROUP_M=config.group_m, num_warps=config.num_warps, num_stages=config.num_stages,
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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Launch on a 2-D x [M, K] (any strides), wv [K, packed_width(n)], bc [packed_width(n)] or
    None; returns h [M, n] in x.dtype. Trusts input; a block_n under 64 is read as 64.
    `store_preact` (training, backward.py): returns (h, zg) with zg = x·wv + bc, the packed
    [M, packed_width(n)] pre-activation (padded columns 0 for finite x); off, the forward-only
    kernel runs (`_gated_saving_fwd` is the storing one)."""
    M = x.shape[0]
    out = torch.empty((M, n), device=x.device, dtype=x.dtype)
    z = None
    if store_preact:
        z = torch.empty((M, wv.shape[1]), device=x.device, dtype=x.dtype)
    if M == 0 or n == 0:
        return out if z is None else (out, z)
    launch = _LAUNCHES.get((
        x.shape, x.stride(), wv.stride(), n, bc is not None, activation, config, fp32_precision,
        store_preact,
    ))  # fmt: skip
    if z is None:
        launch(x, wv, bc, out)
        return out
    launch(x, wv, bc, out, z)
    return out, z


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
    x [..., K], wv [K, packed_width(n)], bc [packed_width(n)] or None; returns [..., n]."""
    dtype, K, n = check_packed_gated(
        ADAPTER,
        x,
        wv,
        bc,
        n=n,
        activation=activation,
        config=config,
        fp32_precision=fp32_precision,
        impl="triton",
    )
    # twin-diff: the device check (TRITON_INTERPRET decides where the kernels run) and a
    # contiguous bc (2·Np elements: cheaper than one more stride argument) are torch's.
    check_kernel_device(x)
    bc = bc.contiguous() if bc is not None else None
    lead = list(x.shape[:-1])
    x2d = x.reshape(-1, K)  # a view where the strides allow; the kernel takes any strides
    M = x2d.shape[0]
    if config is None:
        config = heuristic_config("gated", M, n, K, dtype, interpret=INTERPRET)
    out = gated_fwd(
        x2d, wv, bc, n=n, activation=activation, config=config, fp32_precision=fp32_precision
    )
    return out.reshape(*lead, n)
