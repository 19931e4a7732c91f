"""gated, the Hopper way: out = act(x·W + b) ⊙ (x·V + c) through tensor descriptors (TMA).

Formula (as the portable kernel, torch_impl/gated.py): acc_w = Σ_k x[m, k]·W[k, n] and
acc_v = Σ_k x[m, k]·V[k, n], both fp32; out = act(acc_w + b[n]) · (acc_v + c[n]), cast once to the
dtype at the store. Each X tile is copied into shared memory once and feeds both products; only the
gated hidden is written.

Grid: persistent, as tma/linear_act.py: min(#SMs, #tiles) programs, each walking tiles
p, p + P, ... in the portable kernel's grouped order (`_grouped_tile`), K in BLOCK_K steps;
`flatten=True` lets the pipeliner overlap the next tile's loads with this tile's epilogue.

Addressing: x, W, V and the output through in-kernel descriptors (why in-kernel: see
tma/linear_act.py); reads past the edges give zeros, writes are clipped, only the 1-D biases are
masked. Interpreter: 16-bit tiles are upcast to fp32 after the load.

Twin: none in JAX — the sibling is jax_impl/mosaic/; portable twin torch_impl/gated.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedmlp.common.config import TileConfig
from fusedmlp.common.tiling import heuristic_config

from .. import gated as portable
from ..activations import apply_activation
from ..gated import _check_gated_args
from ..linear_act import (
    _cast_out,
    _grouped_tile,
    _input_precision,
)
from ..runtime import INTERPRET
from .support import (
    as_tma_operand,
    ensure_allocator,
    num_programs,
    tma_unsupported_reason,
    warp_specialize_default,
)


# ==== forward kernel ==============================================================================
@triton.jit
def _gated_fwd_kernel(
    x_ptr, w_ptr, b_ptr, v_ptr, c_ptr, o_ptr,
    M, N, K, NUM_PROGRAMS,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    # 1. program -> tile: descriptors once per program, then a strided walk over the tiles
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1],
                                       block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[K, N], strides=[N, 1],
                                       block_shape=[BLOCK_K, BLOCK_N])
    v_desc = tl.make_tensor_descriptor(v_ptr, shape=[K, N], strides=[N, 1],
                                       block_shape=[BLOCK_K, BLOCK_N])
    o_desc = tl.make_tensor_descriptor(o_ptr, shape=[M, N], strides=[N, 1],
                                       block_shape=[BLOCK_M, BLOCK_N])
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    # The epilogue recomputes its tile from a counter of its own (Triton tutorial 09): with the tile
    # loop flattened, a value used by both the next tile's loads and this tile's store would tie the
    # pipeliner's prologue to its epilogue.
    tile_out = tl.program_id(0) - NUM_PROGRAMS
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS,
                         flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N

        acc_w = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_v = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_tiles):
            # 2. load: one X tile for both products; past the edges TMA reads zeros
            x = x_desc.load([off_m, k * BLOCK_K])
            w = w_desc.load([k * BLOCK_K, off_n])
            v = v_desc.load([k * BLOCK_K, off_n])
            if UPCAST:  # interpreter only: its 16-bit arithmetic is wrong (TOOLCHAIN.md)
                x = x.to(tl.float32)
                w = w.to(tl.float32)
                v = v.to(tl.float32)
            # 3. compute: fp32 accumulate, two products from one X tile
            acc_w = tl.dot(x, w, acc_w, input_precision=INPUT_PRECISION)
            acc_v = tl.dot(x, v, acc_v, input_precision=INPUT_PRECISION)

        # 3. compute: the epilogue, all in fp32
        tile_out += NUM_PROGRAMS
        tile_m, tile_n = _grouped_tile(tile_out, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        out_m = tile_m * BLOCK_M
        out_n = tile_n * BLOCK_N
        if HAS_BIAS:
            offs_n = out_n + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            b = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            c = tl.load(c_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc_w = acc_w + b[None, :]
            acc_v = acc_v + c[None, :]
        acc = apply_activation(acc_w, ACTIVATION) * acc_v

        # 4. store: one rounding to the output dtype; TMA clips the tile at M and N
        o_desc.store([out_m, out_n], _cast_out(acc, o_ptr.dtype.element_ty, UPCAST))


# ==== launcher ====================================================================================
def gated_fwd(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    v: torch.Tensor,
    c: torch.Tensor | None,
    *,
    activation: str,
    config: TileConfig,
    fp32_precision: str = "ieee",
) -> torch.Tensor:
    """Launch on a 2-D x [M, K], w and v [K, N] meeting the 16-byte rule, b and c [N] or both None;
    returns [M, N] in x.dtype. Trusts its input; makes operands contiguous and 16-byte aligned."""
    M, K = x.shape
    N = w.shape[1]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return out
    x, w, v = as_tma_operand(x), as_tma_operand(w), as_tma_operand(v)
    if b is not None:
        b, c = b.contiguous(), c.contiguous()
    num_tiles = triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n)
    programs = num_programs(num_tiles, x.device)
    ensure_allocator()
    _gated_fwd_kernel[(programs,)](
        x, w, b, v, c, out,
        M, N, K, programs,
        ACTIVATION=activation, HAS_BIAS=b is not None,
        INPUT_PRECISION=_input_precision(fp32_precision), UPCAST=INTERPRET,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP_M=config.group_m, FLATTEN=not INTERPRET,
        WARP_SPECIALIZE=warp_specialize_default(x.device),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


# ==== public function =============================================================================
def gated(
    x: torch.Tensor,
    w: torch.Tensor,
    v: torch.Tensor,
    b: torch.Tensor | None = None,
    c: torch.Tensor | None = None,
    *,
    activation: str = "silu",
    config: TileConfig | None = None,
    fp32_precision: str = "ieee",
) -> torch.Tensor:
    """act(x @ w + b) * (x @ v + c) for x [..., K], w and v [K, N], b and c [N] (both or neither).

    Where K or N breaks TMA's 16-byte stride rule, runs the portable `torch_impl.gated`.
    """
    dtype, K, N, b, c = _check_gated_args(x, w, v, b, c, activation, config, fp32_precision)

    lead = list(x.shape[:-1])
    x2d = x.reshape(-1, K)
    M = x2d.shape[0]
    if tma_unsupported_reason(M, N, K, dtype) is not None:
        return portable.gated(x, w, v, b, c, activation=activation, config=config,
                              fp32_precision=fp32_precision)
    if config is None:
        config = heuristic_config("gated", M, N, K, dtype, interpret=INTERPRET,
                                  persistent=True)
    out = gated_fwd(x2d, w, b, v, c, activation=activation, config=config,
                    fp32_precision=fp32_precision)
    return out.reshape(*lead, N)
