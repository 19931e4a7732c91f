"""gated: out = act(x·W + b) ⊙ (x·V + c), one Pallas-Triton kernel, two accumulators (GLU layer).

Formula: acc_w = Σ_k x[m, k]·W[k, n], acc_v = Σ_k x[m, k]·V[k, n], both fp32;
out = act(acc_w + b[n]) · (acc_v + c[n]), cast once to the dtype at the store. Each X tile is loaded
once and feeds both products; only the gated hidden is written (neither branch touches memory).

Grid: 1-D, one program per (BLOCK_M × BLOCK_N) output tile, grouped by GROUP_M tile rows for L2
reuse (`_grouped_tile`, shared with linear_act, called by the kernel and by the BlockSpecs' index
maps); each program walks K in BLOCK_K steps with `pl.ds`. Two accumulators double the register
cost of a tile, which is why the heuristic gives this family half linear_act's BLOCK_N.

Masks on every edge (the Triton lowering does not mask edge blocks; the interpreter pads them with
NaN, so the ragged K tail is masked to zeros on x, w and v); 16-bit upcast only when interpreting —
as in linear_act.

Twin: torch_impl/gated.py (Triton), line for line; differences carry `# twin-diff:`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from fusedmlp.common.config import TileConfig
from fusedmlp.common.tiling import heuristic_config

from . import compat
from .activations import apply_activation
from .linear_act import (
    _STATICS,
    _cast_out,
    _check_options,
    _check_tensor,
    _dtype_name,
    _grouped_tile,
    _precision,
    _specs,
)


# ==== forward kernel ==============================================================================
def _gated_fwd_kernel(
    x_ref, w_ref, b_ref, v_ref, c_ref, o_ref,
    *, M, N, K,
    ACTIVATION, PRECISION, UPCAST,
    BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
):
    # twin-diff: strides and HAS_BIAS are implied by the refs (absent refs are None).
    # 1. program -> tile
    pid_m, pid_n = _grouped_tile(pl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + jnp.arange(BLOCK_M)
    offs_n = pid_n * BLOCK_N + jnp.arange(BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # twin-diff: no pointers; the refs are already this tile's row / column panels (BlockSpecs).

    def body(k, carry):
        acc_w, acc_v = carry
        # 2. load: one X tile for both products; masked on M (or N) and the ragged K tail
        offs_k = k * BLOCK_K + jnp.arange(BLOCK_K)
        mask_k = offs_k < K
        mask_kn = mask_k[:, None] & mask_n[None, :]
        x = plgpu.load(x_ref.at[:, pl.ds(k * BLOCK_K, BLOCK_K)],
                       mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = plgpu.load(w_ref.at[pl.ds(k * BLOCK_K, BLOCK_K), :], mask=mask_kn, other=0.0)
        v = plgpu.load(v_ref.at[pl.ds(k * BLOCK_K, BLOCK_K), :], mask=mask_kn, other=0.0)
        if UPCAST:  # interpreter only: keeps the twin's arithmetic (see linear_act)
            x = x.astype(jnp.float32)
            w = w.astype(jnp.float32)
            v = v.astype(jnp.float32)
        # 3. compute: fp32 accumulate, two products from one X tile
        acc_w = acc_w + jax.lax.dot(x, w, precision=PRECISION, preferred_element_type=jnp.float32)
        acc_v = acc_v + jax.lax.dot(x, v, precision=PRECISION, preferred_element_type=jnp.float32)
        return acc_w, acc_v

    acc_w = jnp.zeros((BLOCK_M, BLOCK_N), dtype=jnp.float32)
    acc_v = jnp.zeros((BLOCK_M, BLOCK_N), dtype=jnp.float32)
    acc_w, acc_v = jax.lax.fori_loop(0, pl.cdiv(K, BLOCK_K), body, (acc_w, acc_v))

    # 3. compute: the epilogue, all in fp32
    if b_ref is not None:
        b = plgpu.load(b_ref, mask=mask_n, other=0.0).astype(jnp.float32)
        c = plgpu.load(c_ref, mask=mask_n, other=0.0).astype(jnp.float32)
        acc_w = acc_w + b[None, :]
        acc_v = acc_v + c[None, :]
    acc = apply_activation(acc_w, ACTIVATION) * acc_v
    mask_mn = mask_m[:, None] & mask_n[None, :]

    # 4. store: one rounding to the output dtype
    plgpu.store(o_ref, _cast_out(acc, o_ref.dtype, UPCAST), mask=mask_mn)


# ==== launcher ====================================================================================
@functools.partial(jax.jit, static_argnames=_STATICS)
def _gated_fwd_jit(x, w, b, v, c, *, activation, config, fp32_precision, interpret):
    M, K = x.shape
    N = w.shape[1]
    if M == 0 or N == 0:
        return jnp.zeros((M, N), dtype=x.dtype)
    grid = (pl.cdiv(M, config.block_m) * pl.cdiv(N, config.block_n),)
    x_spec, w_spec, b_spec, o_spec = _specs(M, N, K, config)
    bias_spec = b_spec if b is not None else None
    kernel = functools.partial(
        _gated_fwd_kernel, M=M, N=N, K=K,
        ACTIVATION=activation, PRECISION=_precision(fp32_precision), UPCAST=interpret,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((M, N), x.dtype),
        grid=grid,
        in_specs=[x_spec, w_spec, bias_spec, w_spec, bias_spec],
        out_specs=o_spec,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                             num_stages=config.num_stages),
        interpret=interpret,
        name="gated_fwd",
    )(x, w, b, v, c)


def gated_fwd(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None,
    v: jax.Array,
    c: jax.Array | None,
    *,
    activation: str,
    config: TileConfig,
    fp32_precision: str = "ieee",
    interpret: bool | None = None,
) -> jax.Array:
    """Launch on a 2-D x [M, K], w and v [K, N], b and c [N] or both None; returns [M, N] in
    x.dtype. Trusts input."""
    if interpret is None:
        interpret = compat.interpret_mode()
    # twin-diff: jax.jit caches the traced and compiled pallas_call per shape and statics (an eager
    # pallas_call is traced and compiled again on every call: 0.75 s a call in interpret mode);
    # Triton caches compiled kernels itself. The filter covers the lowering done here; under a
    # caller's jax.jit the lowering (and the warning) comes later, at the caller's compile.
    with compat.quiet_pallas_triton():
        return _gated_fwd_jit(x, w, b, v, c, activation=activation, config=config,
                              fp32_precision=fp32_precision, interpret=interpret)


# ==== public function =============================================================================
def _check_gated_args(x, w, v, b, c, activation, config, fp32_precision):
    """Every check of the public function; returns dtype, K, N, b and c."""
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
    _check_options(activation, fp32_precision, dtype, config)
    # twin-diff: no device check (jax places the arrays) and no contiguous() (jax arrays are).
    return dtype, K, N, b, c


def gated(
    x: jax.Array,
    w: jax.Array,
    v: jax.Array,
    b: jax.Array | None = None,
    c: jax.Array | None = None,
    *,
    activation: str = "silu",
    config: TileConfig | None = None,
    fp32_precision: str = "ieee",
) -> jax.Array:
    """act(x @ w + b) * (x @ v + c): x [..., K], w and v [K, N], b and c [N] (both or neither)."""
    dtype, K, N, b, c = _check_gated_args(x, w, v, b, c, activation, config, fp32_precision)

    lead = list(x.shape[:-1])
    x2d = x.reshape(-1, K)
    M = x2d.shape[0]
    if config is None:
        config = heuristic_config("gated", M, N, K, dtype, interpret=compat.interpret_mode())
    out = gated_fwd(x2d, w, b, v, c, activation=activation, config=config,
                    fp32_precision=fp32_precision)
    return out.reshape(*lead, N)
