"""linear_act: out = act(x·W + b) (+ residual), one Pallas-Triton GEMM with the epilogue fused.

Formula: acc = Σ_k x[m, k]·W[k, n] in fp32; out = act(acc + b[n]) + residual[m, n], cast once to
the dtype at the store. The pre-activation never touches memory.

Grid: 1-D, one program per (BLOCK_M × BLOCK_N) output tile; `_grouped_tile` maps the program id to
(pid_m, pid_n) in groups of GROUP_M tile rows (Triton tutorial 03's grouped ordering: programs that
run together share W columns and X rows in L2). The BlockSpecs' index maps call the same function,
so each program's refs are its X row panel [BLOCK_M, K], W column panel [K, BLOCK_N] and output
tile; each program walks K in BLOCK_K steps with `pl.ds`.

Masks on every edge (no size needs to divide a block): the Triton lowering does not mask edge blocks
(a plain `o_ref[...] = v` would write past the array on a GPU), and Pallas' interpreter pads edge
blocks with NaN, so every load past K must be masked to zeros on both operands. Offsets are 64-bit
whenever the array passes 2^32 bytes (the lowering decides from the array's size).

Interpreter: the 16-bit upcast after the load is kept for symmetry with the Triton twin (Pallas'
interpreter computes bf16 correctly; the upcast makes both interpreters multiply the same fp32
tiles).

Twin: torch_impl/linear_act.py (Triton), line for line; differences carry `# twin-diff:`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from fusedmlp.common.config import TileConfig
from fusedmlp.common.tiling import heuristic_config
from fusedmlp.common.validate import check_layer

from . import compat
from .activations import apply_activation, round_to_dtype
from .front import ADAPTER
from .tf32 import tf32_operand


# ==== forward kernel ==============================================================================
def _grouped_tile(pid, M, N, BLOCK_M: int, BLOCK_N: int, GROUP_M: int):
    """Program id -> (pid_m, pid_n), walking GROUP_M tile rows column by column (L2 reuse)."""
    num_pid_m = pl.cdiv(M, BLOCK_M)
    num_pid_n = pl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = jnp.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


def _linear_act_fwd_kernel(
    x_ref, w_ref, b_ref, r_ref, o_ref, z_ref=None,
    *, M, N, K,
    ACTIVATION, PRECISION, INTERPRET,
    BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
):  # fmt: skip
    # twin-diff: strides and HAS_BIAS/HAS_RESIDUAL/STORE_PREACT are implied by the refs (absent
    # refs are None; z_ref, the pre-activation output, exists only when the launch asks for it).
    # 1. program -> tile
    pid_m, pid_n = _grouped_tile(pl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + jnp.arange(BLOCK_M)
    offs_n = pid_n * BLOCK_N + jnp.arange(BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # twin-diff: no pointers; the refs are already this tile's row / column panels (BlockSpecs).

    def body(k, acc):
        # 2. load: masked on M (or N) and on the ragged K tail, zeros outside
        offs_k = k * BLOCK_K + jnp.arange(BLOCK_K)
        mask_k = offs_k < K
        x = plgpu.load(
            x_ref.at[:, pl.ds(k * BLOCK_K, BLOCK_K)],
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        w = plgpu.load(
            w_ref.at[pl.ds(k * BLOCK_K, BLOCK_K), :],
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        if INTERPRET:  # interpreter only: keeps the twin's arithmetic (see module docstring)
            x = x.astype(jnp.float32)
            w = w.astype(jnp.float32)
        # 3. compute: fp32 accumulate
        return acc + jax.lax.dot(
            tf32_operand(x, PRECISION),
            tf32_operand(w, PRECISION),
            precision=PRECISION,
            preferred_element_type=jnp.float32,
        )

    acc = jnp.zeros((BLOCK_M, BLOCK_N), dtype=jnp.float32)
    acc = jax.lax.fori_loop(0, pl.cdiv(K, BLOCK_K), body, acc)

    # 3. compute: the epilogue, all in fp32
    if b_ref is not None:
        b = plgpu.load(b_ref, mask=mask_n, other=0.0).astype(jnp.float32)
        acc = acc + b[None, :]
    if z_ref is not None:  # STORE_PREACT: the training forward keeps z for the backward
        mask_z = mask_m[:, None] & mask_n[None, :]
        plgpu.store(z_ref, round_to_dtype(acc, z_ref.dtype, INTERPRET), mask=mask_z)
    acc = apply_activation(acc, ACTIVATION)
    mask_mn = mask_m[:, None] & mask_n[None, :]
    if r_ref is not None:
        r = plgpu.load(r_ref, mask=mask_mn, other=0.0).astype(jnp.float32)
        acc = acc + r

    # 4. store: one rounding to the output dtype
    plgpu.store(o_ref, round_to_dtype(acc, o_ref.dtype, INTERPRET), mask=mask_mn)


# ==== launcher ====================================================================================
def _precision(fp32_precision: str) -> jax.lax.Precision:
    """The dot's precision flag for the contract's fp32_precision ("ieee" or "tf32").

    The Triton lowering maps HIGHEST -> input_precision="ieee" and HIGH *and DEFAULT* -> "tf32", so
    "ieee" must be asked for explicitly; 16-bit operands ignore the flag, as tl.dot does.
    """
    return jax.lax.Precision.HIGH if fp32_precision == "tf32" else jax.lax.Precision.HIGHEST


def _specs(M: int, N: int, K: int, config: TileConfig):
    """BlockSpecs of the row panel of x, the column panel of w, b's slice, and an output tile."""
    tile = functools.partial(
        _grouped_tile,
        M=M,
        N=N,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        GROUP_M=config.group_m,
    )

    def x_map(pid):
        return tile(pid)[0], 0

    def w_map(pid):
        return 0, tile(pid)[1]

    def b_map(pid):
        return (tile(pid)[1],)

    x_spec = pl.BlockSpec((config.block_m, K), x_map)
    w_spec = pl.BlockSpec((K, config.block_n), w_map)
    b_spec = pl.BlockSpec((config.block_n,), b_map)
    o_spec = pl.BlockSpec((config.block_m, config.block_n), tile)
    return x_spec, w_spec, b_spec, o_spec


_STATICS = ("activation", "config", "fp32_precision", "interpret")


@functools.partial(jax.jit, static_argnames=("store_preact", *_STATICS))
def _linear_act_fwd_jit(
    x, w, b, residual, *, store_preact, activation, config, fp32_precision, interpret
):
    M, K = x.shape
    N = w.shape[1]
    out_shape = jax.ShapeDtypeStruct((M, N), x.dtype)
    if M == 0 or N == 0:
        out = jnp.zeros((M, N), dtype=x.dtype)
        return (out, out) if store_preact else out
    grid = (pl.cdiv(M, config.block_m) * pl.cdiv(N, config.block_n),)
    x_spec, w_spec, b_spec, o_spec = _specs(M, N, K, config)
    kernel = functools.partial(
        _linear_act_fwd_kernel, M=M, N=N, K=K,
        ACTIVATION=activation, PRECISION=_precision(fp32_precision), INTERPRET=interpret,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
    )  # fmt: skip
    return pl.pallas_call(
        kernel,
        # store_preact: a second output, z [M, N] (the pre-activation), tiled like the output
        out_shape=(out_shape, out_shape) if store_preact else out_shape,
        grid=grid,
        in_specs=[
            x_spec,
            w_spec,
            b_spec if b is not None else None,
            o_spec if residual is not None else None,
        ],
        out_specs=(o_spec, o_spec) if store_preact else o_spec,
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        name="linear_act_fwd",
    )(x, w, b, residual)


def linear_act_fwd(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None,
    residual: jax.Array | None,
    *,
    activation: str,
    config: TileConfig,
    fp32_precision: str = "ieee",
    interpret: bool | None = None,
    store_preact: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Launch on a 2-D x [M, K], w [K, N]; returns [M, N] in x.dtype. Trusts input.
    `store_preact` (the training forward): returns (out, z) with z = x·w + b [M, N] in x.dtype."""
    if interpret is None:
        interpret = compat.interpret_mode()
    # twin-diff: jax.jit caches the traced and compiled pallas_call per shape and statics (an eager
    # pallas_call is traced and compiled again on every call: 0.75 s a call in interpret mode);
    # Triton caches compiled kernels itself. The filter covers the lowering done here; under a
    # caller's jax.jit the lowering (and the warning) comes later, at the caller's compile.
    with compat.quiet_pallas_triton():
        return _linear_act_fwd_jit(
            x,
            w,
            b,
            residual,
            store_preact=store_preact,
            activation=activation,
            config=config,
            fp32_precision=fp32_precision,
            interpret=interpret,
        )


# ==== public function =============================================================================
def linear_act(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None = None,
    *,
    activation: str = "identity",
    residual: jax.Array | None = None,
    config: TileConfig | None = None,
    fp32_precision: str = "ieee",
    interpret: bool | None = None,
) -> jax.Array:
    """act(x @ w + b) (+ residual) for x [..., K], w [K, N], b [N], residual [..., N].
    `interpret`: run under Pallas' interpreter (None: where there is no GPU)."""
    dtype, K, N = check_layer(
        ADAPTER,
        x,
        w,
        b,
        residual=residual,
        activation=activation,
        config=config,
        fp32_precision=fp32_precision,
        impl="pallas_triton",
    )
    # twin-diff: no device check (jax places the arrays) and no contiguous() (jax arrays are);
    # `interpret` is a call's choice here, a process's (TRITON_INTERPRET) in the Triton twin.
    interpret = compat.interpret_mode() if interpret is None else interpret
    lead = list(x.shape[:-1])
    x2d = x.reshape(-1, K)
    r2d = residual.reshape(-1, N) if residual is not None else None
    M = x2d.shape[0]
    if config is None:
        config = heuristic_config("linear_act", M, N, K, dtype, interpret=interpret)
    out = linear_act_fwd(
        x2d,
        w,
        b,
        r2d,
        activation=activation,
        config=config,
        fp32_precision=fp32_precision,
        interpret=interpret,
    )
    return out.reshape(*lead, N)
