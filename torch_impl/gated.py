"""gated: out = act(x·W + b) ⊙ (x·V + c), one Triton kernel, two accumulators (GLU hidden layer).

Formula: acc_w = Σ_k x[m, k]·W[k, n], acc_v = Σ_k x[m, k]·V[k, n], both fp32;
out = act(acc_w + b[n]) · (acc_v + c[n]), cast once to the dtype at the store. Each X tile is loaded
once and feeds both products; only the gated hidden is written (neither branch touches memory).

Grid: 1-D, one program per (BLOCK_M × BLOCK_N) output tile, grouped by GROUP_M tile rows for L2
reuse (`_grouped_tile`, shared with linear_act); each program walks K in BLOCK_K steps. Two
accumulators double the register cost of a tile, which is why the heuristic gives this family half
linear_act's BLOCK_N.

Masks on every edge, int64 offsets, any strides for x, w and v; under TRITON_INTERPRET=1 16-bit
tiles are upcast to fp32 right after the load (never on a GPU) — as in linear_act.

Twin: jax_impl/gated.py (Pallas-Triton), line for line; differences carry `# twin-diff:`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedmlp.common.config import TileConfig
from fusedmlp.common.tiling import heuristic_config

from .activations import apply_activation
from .linear_act import (
    _cast_out,
    _check_devices,
    _check_options,
    _check_tensor,
    _dtype_name,
    _grouped_tile,
    _input_precision,
)
from .runtime import INTERPRET


# ==== forward kernel ==============================================================================
@triton.jit
def _gated_fwd_kernel(
    x_ptr, w_ptr, b_ptr, v_ptr, c_ptr, o_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_vk, stride_vn, stride_om, stride_on,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # 1. program -> tile
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # int64 offsets: with arbitrary strides any of row·stride, col·stride, k·stride may pass 2^31
    # (M·K ≥ 2^31 elements, or a transposed view); the address arithmetic is 64-bit anyway.
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    x_ptrs = x_ptr + rows[:, None] * stride_xm
    w_ptrs = w_ptr + cols[None, :] * stride_wn
    v_ptrs = v_ptr + cols[None, :] * stride_vn

    acc_w = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_v = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        # 2. load: one X tile for both products; masked on M (or N) and the ragged K tail
        offs_k = k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        ks = offs_k.to(tl.int64)
        mask_kn = mask_k[:, None] & mask_n[None, :]
        x = tl.load(x_ptrs + ks[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs + ks[:, None] * stride_wk, mask=mask_kn, other=0.0)
        v = tl.load(v_ptrs + ks[:, None] * stride_vk, mask=mask_kn, other=0.0)
        if UPCAST:  # interpreter only: its 16-bit arithmetic is wrong (TOOLCHAIN.md)
            x = x.to(tl.float32)
            w = w.to(tl.float32)
            v = v.to(tl.float32)
        # 3. compute: fp32 accumulate, two products from one X tile
        acc_w = tl.dot(x, w, acc_w, input_precision=INPUT_PRECISION)
        acc_v = tl.dot(x, v, acc_v, input_precision=INPUT_PRECISION)

    # 3. compute: the epilogue, all in fp32
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc_w = acc_w + b[None, :]
        acc_v = acc_v + c[None, :]
    acc = apply_activation(acc_w, ACTIVATION) * acc_v
    mask_mn = mask_m[:, None] & mask_n[None, :]

    # 4. store: one rounding to the output dtype
    o_ptrs = o_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(o_ptrs, _cast_out(acc, o_ptr.dtype.element_ty, UPCAST), mask=mask_mn)


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
    """Launch on a 2-D x [M, K] (any strides), w and v [K, N], b and c [N] or both None; returns
    [M, N] in x.dtype. Trusts input."""
    M, K = x.shape
    N = w.shape[1]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return out
    grid = (triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n),)
    _gated_fwd_kernel[grid](
        x, w, b, v, c, out,
        M, N, K,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        ACTIVATION=activation, HAS_BIAS=b is not None,
        INPUT_PRECISION=_input_precision(fp32_precision), UPCAST=INTERPRET,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP_M=config.group_m, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


# ==== public function =============================================================================
def _check_gated_args(x, w, v, b, c, activation, config, fp32_precision):
    """Every check of the public function (shared with torch_impl/tma/); returns dtype, K, N and
    b, c made contiguous (N elements: cheaper than more stride arguments)."""
    _check_tensor("x", x, shape=None, dtype=None)
    dtype = _dtype_name(x)
    K = x.shape[-1]
    _check_tensor("w", w, shape=None, dtype=dtype, ndim_min=2)
    N = w.shape[-1]
    _check_tensor("w", w, shape=[K, N], dtype=dtype)
    _check_tensor("v", v, shape=[K, N], dtype=dtype)
    if (b is None) != (c is None):
        given, missing = ("b", "c") if c is None else ("c", "b")
        raise ValueError(
            f"{missing}: expected an array because {given} is given (b and c are both None or "
            "both given), got None"
        )
    if b is not None:
        _check_tensor("b", b, shape=[N], dtype=dtype)
        _check_tensor("c", c, shape=[N], dtype=dtype)
        b, c = b.contiguous(), c.contiguous()
    _check_options(activation, fp32_precision, dtype, config)
    _check_devices(x, w=w, v=v, b=b, c=c)
    return dtype, K, N, b, c


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
    """act(x @ w + b) * (x @ v + c): x [..., K], w and v [K, N], b and c [N] (both or neither)."""
    dtype, K, N, b, c = _check_gated_args(x, w, v, b, c, activation, config, fp32_precision)

    lead = list(x.shape[:-1])
    x2d = x.reshape(-1, K)  # a view where the strides allow; the kernel takes any strides
    M = x2d.shape[0]
    if config is None:
        config = heuristic_config("gated", M, N, K, dtype, interpret=INTERPRET)
    out = gated_fwd(x2d, w, b, v, c, activation=activation, config=config,
                    fp32_precision=fp32_precision)
    return out.reshape(*lead, N)
