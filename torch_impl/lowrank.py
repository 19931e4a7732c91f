"""lowrank_linear_act: out = act((x·U)·V + b), a factorised layer in one Triton kernel.

Formula: t = Σ_k x[m, k]·U[k, j] in fp32 over K; t is rounded ONCE to the dtype (the tensor cores
take 16-bit operands: the second product runs on them only if t is 16-bit; float32 keeps t as is);
acc = Σ_j t[m, j]·V[j, n] in fp32; out = act(acc + b[n]), cast once to the dtype at the store.
The [BLOCK_M, r] intermediate never touches memory. The parity target is the float64 reference
with the same rounding point (`common.lowrank.layer(..., round_intermediate=dtype)`); the exact
factorised layer is met within the tolerance policy (t's rounding is one more u·|t| per element,
propagated through V like a per-layer kernel's hidden).

The rank is padded to BLOCK_R = a power of two ≥ 16 inside the kernel (the smallest K of tl.dot):
U's columns and V's rows past r load as zeros, so t's padding is zero and adds nothing.

Grid: 1-D, one program per (BLOCK_M rows × a panel of N_TILES consecutive BLOCK_N-wide output
tiles); `_grouped_tile` (linear_act's) orders (row block, panel) in groups of GROUP_M row blocks.
A program computes t for its rows once (part A: K in BLOCK_K steps), then walks its panel
(part B: per tile one dot of K = BLOCK_R, the epilogue, the store).

Cost model (MACs and bytes, M rows, K in, N out, rank r, G = cdiv(N, N_TILES·BLOCK_N) panels):
- useful MACs: M·r·(K + N); part A is repeated once per panel: M·K·r·G in all, so the overhead
  is (G − 1)·M·K·r, a fraction (G − 1)·K / (K + N) of the useful work;
- bytes from HBM (at best): x (M·K), U (K·r), V (r·N), b, out (M·N); each program also reads
  all of U (K·r) and its panel of V from L2: cdiv(M, BLOCK_M)·G·K·r + cdiv(M, BLOCK_M)·r·N.
The choice follows the M:
- M = 16 (decode): one row block; one program per panel, G = NUM_SMS-ish panels of one tile each
  fill the GPU, and each program recomputes t = x·U (16·K·r MACs, nothing at decode) but reads all
  of U from L2: llama3-8b's layer (K = 4096, N = 14336, BLOCK_N = 128: G = 112), r = 256: U is
  2 MiB, 112 programs read 224 MiB of L2 for 9.4 MB of HBM weights (U + V) — the L2 reads, not
  HBM, set the time there (at ~10 TB/s of L2: ~22 us vs the 2.2 us HBM floor); r = 64: 56 MiB.
  Fewer, wider panels cut the L2 reads by G and leave SMs idle: the sweep's choice (bench/
  lowrank_probe.py measures G = 112).
- M = 8192: 64 (r ≤ 128, BLOCK_M = 128) or 128 (r = 256, BLOCK_M = 64) row blocks; G =
  NUM_SMS // row blocks panels (2 or 1) fill the SMs once, so t is computed G times: +22 % MACs
  (K / (K + N)) at G = 2; at G = 1 no recompute at all. Recomputing per N-tile (G = 112) would
  cost 112·M·K·r = 25× the useful MACs there — the reason the panel exists.

Interpreter: under TRITON_INTERPRET=1 16-bit tiles are upcast to fp32 right after the load, and
the rounded t again after its rounding (the interpreter's bf16 arithmetic operates on raw bit
patterns); on a GPU both dots take 16-bit tiles natively.

Twin: jax_impl/lowrank.py (Pallas-Triton), line for line; differences carry `# twin-diff:`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedmlp.common.lowrank import LowRankConfig, block_r, check_lowrank_layer, lowrank_config

from .activations import apply_activation, round_to_dtype
from .front import ADAPTER
from .linear_act import _grouped_tile, _input_precision
from .runtime import INTERPRET, check_kernel_device


# ==== forward kernel ==============================================================================
@triton.jit
def _lowrank_linear_act_fwd_kernel(
    x_ptr, u_ptr, v_ptr, b_ptr, o_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_uk, stride_ur, stride_vr, stride_vn, stride_om, stride_on,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    N_TILES: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # 1. program -> tile: a row block and a panel of N_TILES output tiles
    PANEL_N: tl.constexpr = BLOCK_N * N_TILES
    pid_m, pid_p = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, PANEL_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    # int64 offsets, as in linear_act: any index · stride may pass 2^31
    rows = offs_m.to(tl.int64)
    ranks = offs_r.to(tl.int64)
    x_ptrs = x_ptr + rows[:, None] * stride_xm
    u_ptrs = u_ptr + ranks[None, :] * stride_ur

    # part A: t = x·U over K, the rank padded to BLOCK_R by masking
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        # 2. load: masked on M (or r) and on the ragged K tail, zeros outside
        offs_k = k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        ks = offs_k.to(tl.int64)
        x = tl.load(
            x_ptrs + ks[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0
        )
        u = tl.load(
            u_ptrs + ks[:, None] * stride_uk, mask=mask_k[:, None] & mask_r[None, :], other=0.0
        )
        if INTERPRET:  # interpreter only: its 16-bit arithmetic is wrong (TOOLCHAIN.md)
            x = x.to(tl.float32)
            u = u.to(tl.float32)
        # 3. compute: fp32 accumulate
        t = tl.dot(x, u, t, input_precision=INPUT_PRECISION)
    # 3. compute: t rounded once to the dtype, the second product's operand
    t = round_to_dtype(t, o_ptr.dtype.element_ty, INTERPRET)
    if INTERPRET:  # the rounded t feeds a dot: upcast again, as after a load
        t = t.to(tl.float32)

    # part B: each tile of the panel, out = act(t·V + b)
    for j in range(0, N_TILES):
        offs_n = (pid_p * N_TILES + j) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        cols = offs_n.to(tl.int64)
        # 2. load: V's [BLOCK_R, BLOCK_N] tile, rows past r and columns past N zero
        v = tl.load(
            v_ptr + ranks[:, None] * stride_vr + cols[None, :] * stride_vn,
            mask=mask_r[:, None] & mask_n[None, :],
            other=0.0,
        )
        if INTERPRET:
            v = v.to(tl.float32)
        # 3. compute: one dot over the padded rank, then the epilogue, all in fp32
        acc = tl.dot(t, v, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            b = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc = acc + b[None, :]
        acc = apply_activation(acc, ACTIVATION)
        # 4. store: one rounding to the output dtype
        mask_mn = mask_m[:, None] & mask_n[None, :]
        o_ptrs = o_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
        tl.store(o_ptrs, round_to_dtype(acc, o_ptr.dtype.element_ty, INTERPRET), mask=mask_mn)


# ==== launcher ====================================================================================
def lowrank_linear_act_fwd(
    x: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    b: torch.Tensor | None,
    *,
    activation: str,
    config: LowRankConfig,
    fp32_precision: str = "ieee",
) -> torch.Tensor:
    """Launch on a 2-D x [M, K] (any strides), u [K, r], v [r, N]; returns [M, N] in x.dtype.
    Trusts its input (1 ≤ r ≤ MAX_RANK)."""
    M, K = x.shape
    R, N = v.shape
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return out
    panel = config.block_n * config.n_tiles
    grid = (triton.cdiv(M, config.block_m) * triton.cdiv(N, panel),)
    _lowrank_linear_act_fwd_kernel[grid](
        x, u, v, b, out,
        M, N, K, R,
        x.stride(0), x.stride(1), u.stride(0), u.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        ACTIVATION=activation, HAS_BIAS=b is not None,
        INPUT_PRECISION=_input_precision(fp32_precision), INTERPRET=INTERPRET,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        BLOCK_R=block_r(R), N_TILES=config.n_tiles, GROUP_M=config.group_m,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out


# ==== public function =============================================================================
def lowrank_linear_act(
    x: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    b: torch.Tensor | None = None,
    *,
    activation: str = "identity",
    config: LowRankConfig | None = None,
    fp32_precision: str = "ieee",
) -> torch.Tensor:
    """act((x @ u) @ v + b) for x [..., K], u [K, r], v [r, N], b [N]; 1 ≤ r ≤ 256."""
    dtype, K, R, N = check_lowrank_layer(
        ADAPTER,
        x,
        u,
        v,
        b,
        activation=activation,
        config=config,
        fp32_precision=fp32_precision,
    )
    # twin-diff: the device check (TRITON_INTERPRET decides where the kernels run) and a
    # contiguous b (N elements: cheaper than one more stride argument) are torch's.
    check_kernel_device(x)
    b = b.contiguous() if b is not None else None
    lead = list(x.shape[:-1])
    x2d = x.reshape(-1, K)  # a view where the strides allow; the kernel takes any strides
    M = x2d.shape[0]
    if config is None:
        config = lowrank_config(M, N, K, R, dtype, interpret=INTERPRET)
    out = lowrank_linear_act_fwd(
        x2d, u, v, b, activation=activation, config=config, fp32_precision=fp32_precision
    )
    return out.reshape(*lead, N)
