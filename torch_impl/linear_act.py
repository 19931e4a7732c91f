"""linear_act: out = act(x·W + b) (+ residual), one Triton GEMM with the whole epilogue fused.

Formula: acc = Σ_k x[m, k]·W[k, n] in fp32; out = act(acc + b[n]) + residual[m, n], cast once to
the dtype at the store. The pre-activation never touches memory, except in the training forward
(`_linear_act_saving_fwd`, the same tile with STORE_PREACT; backward.py), which also stores
z = acc + b once in the dtype.

Grid: 1-D, one program per (BLOCK_M × BLOCK_N) output tile; `_grouped_tile` maps the program id to
(pid_m, pid_n) in groups of GROUP_M tile rows (Triton tutorial 03's grouped ordering: programs that
run together share W columns and X rows in L2). Each program walks K in BLOCK_K steps.

Masks on every edge (no size needs to divide a block); offsets are formed in int64, so
`index * stride` may pass 2^31; any strides (non-contiguous x, w, residual) go to the kernel.

Interpreter: under TRITON_INTERPRET=1 16-bit tiles are upcast to fp32 right after the load (the
interpreter's bf16 arithmetic operates on raw bit patterns); on a GPU the dot takes the 16-bit tiles
natively (an upcast there would take the tensor cores away).

Twin: jax_impl/linear_act.py (Pallas-Triton), line for line; differences carry `# twin-diff:`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedmlp.common.config import TileConfig
from fusedmlp.common.tiling import cdiv, heuristic_config
from fusedmlp.common.validate import check_layer

from . import tuning  # noqa: F401  (registers the GPU for the committed tuned configs)
from .activations import apply_activation, round_to_dtype
from .front import ADAPTER
from .launch import Launch, LaunchCache
from .runtime import INTERPRET, check_kernel_device
from .tf32 import tf32_operand


# ==== forward kernel ==============================================================================
@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (pid_m, pid_n), walking GROUP_M tile rows column by column (L2 reuse)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _linear_act_fwd_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, o_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_rm, stride_rn, stride_om, stride_on,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # The forward-only kernel: the tile below without the pre-activation store. Its signature is
    # the one jax_impl/cross calls by name; its sm_90 PTX is what it was before issue 24 (line
    # info aside: the tile is inlined).
    _linear_act_fwd_tile(
        x_ptr, w_ptr, b_ptr, r_ptr, o_ptr, None,
        M, N, K,
        stride_xm, stride_xk, stride_wk, stride_wn, stride_rm, stride_rn, stride_om, stride_on,
        ACTIVATION, HAS_BIAS, HAS_RESIDUAL, INPUT_PRECISION, INTERPRET,
        BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, False,
    )  # fmt: skip


@triton.jit
def _linear_act_saving_fwd(
    x_ptr, w_ptr, b_ptr, r_ptr, o_ptr, z_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_rm, stride_rn, stride_om, stride_on,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # twin-diff: the training forward (backward.py) is a second kernel of the same tile, storing
    # z = x·W + b as well (z_ptr: [M, N], out's strides); the Pallas twin adds an output instead.
    _linear_act_fwd_tile(
        x_ptr, w_ptr, b_ptr, r_ptr, o_ptr, z_ptr,
        M, N, K,
        stride_xm, stride_xk, stride_wk, stride_wn, stride_rm, stride_rn, stride_om, stride_on,
        ACTIVATION, HAS_BIAS, HAS_RESIDUAL, INPUT_PRECISION, INTERPRET,
        BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, True,
    )  # fmt: skip


@triton.jit
def _linear_act_fwd_tile(
    x_ptr, w_ptr, b_ptr, r_ptr, o_ptr, z_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_rm, stride_rn, stride_om, stride_on,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    STORE_PREACT: tl.constexpr,
):  # fmt: skip
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

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        # 2. load: masked on M (or N) and on the ragged K tail, zeros outside
        offs_k = k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        ks = offs_k.to(tl.int64)
        x = tl.load(
            x_ptrs + ks[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0
        )
        w = tl.load(
            w_ptrs + ks[:, None] * stride_wk, mask=mask_k[:, None] & mask_n[None, :], other=0.0
        )
        if INTERPRET:  # interpreter only: its 16-bit arithmetic is wrong (TOOLCHAIN.md)
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        # 3. compute: fp32 accumulate
        acc = tl.dot(
            tf32_operand(x, INPUT_PRECISION),
            tf32_operand(w, INPUT_PRECISION),
            acc,
            input_precision=INPUT_PRECISION,
        )

    # 3. compute: the epilogue, all in fp32
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc + b[None, :]
    if STORE_PREACT:  # training (backward.py): z = x·W + b, rounded once, laid out as out
        z_ptrs = z_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
        z_mask = mask_m[:, None] & mask_n[None, :]
        tl.store(z_ptrs, round_to_dtype(acc, z_ptr.dtype.element_ty, INTERPRET), mask=z_mask)
    acc = apply_activation(acc, ACTIVATION)
    mask_mn = mask_m[:, None] & mask_n[None, :]
    if HAS_RESIDUAL:
        r = tl.load(
            r_ptr + rows[:, None] * stride_rm + cols[None, :] * stride_rn, mask=mask_mn, other=0.0
        ).to(tl.float32)
        acc = acc + r

    # 4. store: one rounding to the output dtype
    o_ptrs = o_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(o_ptrs, round_to_dtype(acc, o_ptr.dtype.element_ty, INTERPRET), mask=mask_mn)


# ==== launcher ====================================================================================
def _input_precision(fp32_precision: str) -> str:
    """tl.dot's input_precision for the contract's fp32_precision ("ieee" or "tf32")."""
    return "tf32" if fp32_precision == "tf32" else "ieee"


def _linear_act_launch(
    x_shape,
    x_strides,
    w_shape,
    w_strides,
    r_strides,
    has_bias,
    activation,
    config,
    precision,
    preact,
) -> Launch:
    """`linear_act_fwd`'s launch for this key (`_LAUNCHES`); out is a fresh contiguous [M, N]."""
    M, K = x_shape
    N = w_shape[1]
    out_strides = (N, 1)
    # without a residual, out stands in for its pointer and strides (never read)
    r = r_strides if r_strides is not None else out_strides
    kernel = _linear_act_saving_fwd if preact else _linear_act_fwd_kernel
    return Launch(
        kernel, (cdiv(M, config.block_m) * cdiv(N, config.block_n),),
        (M, N, K, *x_strides, *w_strides, *r, *out_strides),
        dict(
            ACTIVATION=activation, HAS_BIAS=has_bias, HAS_RESIDUAL=r_strides is not None,
            INPUT_PRECISION=_input_precision(precision), INTERPRET=INTERPRET,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            GROUP_M=config.group_m, num_warps=config.num_warps, num_stages=config.num_stages,
        ),
    )  # fmt: skip


_LAUNCHES = LaunchCache(_linear_act_launch)


def linear_act_fwd(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    residual: torch.Tensor | None,
    *,
    activation: str,
    config: TileConfig,
    fp32_precision: str = "ieee",
    store_preact: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Launch on a 2-D x [M, K] (any strides), w [K, N]; returns [M, N] in x.dtype. Trusts input.
    `store_preact` (training, backward.py): returns (out, z) with z = x·W + b [M, N] as well;
    off, the forward-only kernel runs (`_linear_act_saving_fwd` is the storing one)."""
    M = x.shape[0]
    N = w.shape[1]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    z = torch.empty((M, N), device=x.device, dtype=x.dtype) if store_preact else None
    if M == 0 or N == 0:
        return out if z is None else (out, z)
    launch = _LAUNCHES.get((
        x.shape, x.stride(), w.shape, w.stride(),
        residual.stride() if residual is not None else None, b is not None, activation, config,
        fp32_precision, store_preact,
    ))  # fmt: skip
    if z is None:
        launch(x, w, b, residual, out)
        return out
    launch(x, w, b, residual, out, z)
    return out, z


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
    """act(x @ w + b) (+ residual) for x [..., K], w [K, N], b [N], residual [..., N]."""
    dtype, K, N = check_layer(
        ADAPTER,
        x,
        w,
        b,
        residual=residual,
        activation=activation,
        config=config,
        fp32_precision=fp32_precision,
        impl="triton",
    )
    # twin-diff: the device check (TRITON_INTERPRET decides where the kernels run) and a
    # contiguous b (N elements: cheaper than one more stride argument) are torch's.
    check_kernel_device(x)
    b = b.contiguous() if b is not None else None
    lead = list(x.shape[:-1])
    x2d = x.reshape(-1, K)  # a view where the strides allow; the kernel takes any strides
    r2d = residual.reshape(-1, N) if residual is not None else None
    M = x2d.shape[0]
    if config is None:
        config = heuristic_config("linear_act", M, N, K, dtype, interpret=INTERPRET)
    out = linear_act_fwd(
        x2d, w, b, r2d, activation=activation, config=config, fp32_precision=fp32_precision
    )
    return out.reshape(*lead, N)
