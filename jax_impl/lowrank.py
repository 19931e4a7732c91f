"""lowrank_linear_act: out = act((x·U)·V + b), a factorised layer in one Pallas-Triton kernel.

Formula: t = Σ_k x[m, k]·U[k, j] in fp32 over K; t is rounded ONCE to the dtype (the tensor cores
take 16-bit operands: the second product runs on them only if t is 16-bit; float32 keeps t as is);
acc = Σ_j t[m, j]·V[j, n] in fp32; out = act(acc + b[n]), cast once to the dtype at the store.
The [BLOCK_M, r] intermediate never touches memory. Parity target: the float64 reference with the
same rounding point (`common.lowrank.layer(..., round_intermediate=dtype)`).

The rank is padded to BLOCK_R = a power of two ≥ 16 inside the kernel: U's columns and V's rows
past r are masked to zeros (U's and V's blocks are BLOCK_R wide, an edge block past the array).

Grid: 1-D, one program per (BLOCK_M rows × a panel of N_TILES consecutive BLOCK_N-wide output
tiles); `_grouped_tile` (linear_act's) orders (row block, panel). The BlockSpecs' index maps call
the same function, so each program's refs are its x row panel [BLOCK_M, K], all of U [K, BLOCK_R],
its V panel [BLOCK_R, N_TILES·BLOCK_N], b's slice and its output panel. Part A computes t once
(K in BLOCK_K steps with `pl.ds`), part B walks the panel's tiles.

The cost model and the choice of tiles for M = 16 and M = 8192: torch_impl/lowrank.py's docstring
(one heuristic, `common.lowrank.lowrank_config`, for both twins).

Interpreter: the 16-bit upcasts after the loads and after t's rounding are kept for symmetry with
the Triton twin (Pallas' interpreter computes bf16 correctly; the upcasts make both interpreters
multiply the same fp32 tiles, so the twins agree bit for bit).

Twin: torch_impl/lowrank.py (Triton), line for line; differences carry `# twin-diff:`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from fusedmlp.common.lowrank import LowRankConfig, block_r, check_lowrank_layer, lowrank_config

from . import compat
from .activations import apply_activation, round_to_dtype
from .front import ADAPTER
from .linear_act import _grouped_tile, _precision


# ==== forward kernel ==============================================================================
def _lowrank_linear_act_fwd_kernel(
    x_ref, u_ref, v_ref, b_ref, o_ref,
    *, M, N, K, R,
    ACTIVATION, PRECISION, INTERPRET,
    BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R,
    N_TILES, GROUP_M,
):  # fmt: skip
    # twin-diff: strides and HAS_BIAS are implied by the refs (an absent b_ref is None).
    # 1. program -> tile: a row block and a panel of N_TILES output tiles
    PANEL_N = BLOCK_N * N_TILES
    pid_m, pid_p = _grouped_tile(pl.program_id(0), M, N, BLOCK_M, PANEL_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + jnp.arange(BLOCK_M)
    offs_r = jnp.arange(BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    # twin-diff: no pointers; the refs are already this program's panels (BlockSpecs).

    # part A: t = x·U over K, the rank padded to BLOCK_R by masking
    def body(k, t):
        # 2. load: masked on M (or r) and on the ragged K tail, zeros outside
        offs_k = k * BLOCK_K + jnp.arange(BLOCK_K)
        mask_k = offs_k < K
        x = plgpu.load(
            x_ref.at[:, pl.ds(k * BLOCK_K, BLOCK_K)],
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        u = plgpu.load(
            u_ref.at[pl.ds(k * BLOCK_K, BLOCK_K), :],
            mask=mask_k[:, None] & mask_r[None, :],
            other=0.0,
        )
        if INTERPRET:  # interpreter only: keeps the twin's arithmetic (see module docstring)
            x = x.astype(jnp.float32)
            u = u.astype(jnp.float32)
        # 3. compute: fp32 accumulate
        return t + jax.lax.dot(x, u, precision=PRECISION, preferred_element_type=jnp.float32)

    t = jnp.zeros((BLOCK_M, BLOCK_R), dtype=jnp.float32)
    t = jax.lax.fori_loop(0, pl.cdiv(K, BLOCK_K), body, t)
    # 3. compute: t rounded once to the dtype, the second product's operand
    t = round_to_dtype(t, o_ref.dtype, INTERPRET)
    if INTERPRET:  # the rounded t feeds a dot: upcast again, as after a load
        t = t.astype(jnp.float32)

    # part B: each tile of the panel, out = act(t·V + b)
    def tile(j, carry):
        offs_n = (pid_p * N_TILES + j) * BLOCK_N + jnp.arange(BLOCK_N)
        mask_n = offs_n < N
        # 2. load: V's [BLOCK_R, BLOCK_N] tile, rows past r and columns past N zero
        v = plgpu.load(
            v_ref.at[:, pl.ds(j * BLOCK_N, BLOCK_N)],
            mask=mask_r[:, None] & mask_n[None, :],
            other=0.0,
        )
        if INTERPRET:
            v = v.astype(jnp.float32)
        # 3. compute: one dot over the padded rank, then the epilogue, all in fp32
        acc = jax.lax.dot(t, v, precision=PRECISION, preferred_element_type=jnp.float32)
        if b_ref is not None:
            b = plgpu.load(b_ref.at[pl.ds(j * BLOCK_N, BLOCK_N)], mask=mask_n, other=0.0)
            acc = acc + b.astype(jnp.float32)[None, :]
        acc = apply_activation(acc, ACTIVATION)
        # 4. store: one rounding to the output dtype
        mask_mn = mask_m[:, None] & mask_n[None, :]
        plgpu.store(
            o_ref.at[:, pl.ds(j * BLOCK_N, BLOCK_N)],
            round_to_dtype(acc, o_ref.dtype, INTERPRET),
            mask=mask_mn,
        )
        return carry

    jax.lax.fori_loop(0, N_TILES, tile, 0)


# ==== launcher ====================================================================================
def _specs(M: int, N: int, K: int, R: int, config: LowRankConfig):
    """BlockSpecs of x's row panel, all of U, the V panel, b's slice and the output panel."""
    panel = config.block_n * config.n_tiles
    br = block_r(R)
    tile = functools.partial(
        _grouped_tile, M=M, N=N, BLOCK_M=config.block_m, BLOCK_N=panel, GROUP_M=config.group_m
    )

    def x_map(pid):
        return tile(pid)[0], 0

    def u_map(pid):
        return 0, 0

    def v_map(pid):
        return 0, tile(pid)[1]

    def b_map(pid):
        return (tile(pid)[1],)

    x_spec = pl.BlockSpec((config.block_m, K), x_map)
    u_spec = pl.BlockSpec((K, br), u_map)
    v_spec = pl.BlockSpec((br, panel), v_map)
    b_spec = pl.BlockSpec((panel,), b_map)
    o_spec = pl.BlockSpec((config.block_m, panel), tile)
    return x_spec, u_spec, v_spec, b_spec, o_spec


_STATICS = ("activation", "config", "fp32_precision", "interpret")


@functools.partial(jax.jit, static_argnames=_STATICS)
def _lowrank_linear_act_fwd_jit(x, u, v, b, *, activation, config, fp32_precision, interpret):
    M, K = x.shape
    R, N = v.shape
    if M == 0 or N == 0:
        return jnp.zeros((M, N), dtype=x.dtype)
    panel = config.block_n * config.n_tiles
    grid = (pl.cdiv(M, config.block_m) * pl.cdiv(N, panel),)
    x_spec, u_spec, v_spec, b_spec, o_spec = _specs(M, N, K, R, config)
    kernel = functools.partial(
        _lowrank_linear_act_fwd_kernel, M=M, N=N, K=K, R=R,
        ACTIVATION=activation, PRECISION=_precision(fp32_precision), INTERPRET=interpret,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        BLOCK_R=block_r(R), N_TILES=config.n_tiles, GROUP_M=config.group_m,
    )  # fmt: skip
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((M, N), x.dtype),
        grid=grid,
        in_specs=[x_spec, u_spec, v_spec, b_spec if b is not None else None],
        out_specs=o_spec,
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        name="lowrank_linear_act_fwd",
    )(x, u, v, b)


def lowrank_linear_act_fwd(
    x: jax.Array,
    u: jax.Array,
    v: jax.Array,
    b: jax.Array | None,
    *,
    activation: str,
    config: LowRankConfig,
    fp32_precision: str = "ieee",
    interpret: bool | None = None,
) -> jax.Array:
    """Launch on a 2-D x [M, K], u [K, r], v [r, N]; returns [M, N] in x.dtype. Trusts its input
    (1 ≤ r ≤ MAX_RANK)."""
    if interpret is None:
        interpret = compat.interpret_mode()
    # twin-diff: jax.jit caches the traced and compiled pallas_call per shape and statics; Triton
    # caches compiled kernels itself (linear_act.py says more).
    with compat.quiet_pallas_triton():
        return _lowrank_linear_act_fwd_jit(
            x,
            u,
            v,
            b,
            activation=activation,
            config=config,
            fp32_precision=fp32_precision,
            interpret=interpret,
        )


# ==== public function =============================================================================
def lowrank_linear_act(
    x: jax.Array,
    u: jax.Array,
    v: jax.Array,
    b: jax.Array | None = None,
    *,
    activation: str = "identity",
    config: LowRankConfig | None = None,
    fp32_precision: str = "ieee",
    interpret: bool | None = None,
) -> jax.Array:
    """act((x @ u) @ v + b) for x [..., K], u [K, r], v [r, N], b [N]; 1 ≤ r ≤ 256.
    `interpret`: run under Pallas' interpreter (None: where there is no GPU)."""
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
    # twin-diff: no device check (jax places the arrays) and no contiguous() (jax arrays are);
    # `interpret` is a call's choice here, a process's (TRITON_INTERPRET) in the Triton twin.
    interpret = compat.interpret_mode() if interpret is None else interpret
    lead = list(x.shape[:-1])
    x2d = x.reshape(-1, K)
    M = x2d.shape[0]
    if config is None:
        config = lowrank_config(M, N, K, R, dtype, interpret=interpret)
    out = lowrank_linear_act_fwd(
        x2d,
        u,
        v,
        b,
        activation=activation,
        config=config,
        fp32_precision=fp32_precision,
        interpret=interpret,
    )
    return out.reshape(*lead, N)
