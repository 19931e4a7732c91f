"""gated: out = act(x·W + b) ⊙ (x·V + c), one Pallas-Triton GEMM over the packed [W|V] operand.

Formula: with W and V packed once into `wv` [K, 2·Np] (common/packing.py: gate and up interleaved
in blocks of PACK_BLOCK = 64 columns, N padded to Np with zeros) and `bc` [2·Np] likewise,
acc = Σ_k x[m, k]·wv[k, p] in fp32 over a [BLOCK_M, 2·BLOCK_N] packed tile; acc += bc[p]; the tile
splits into its gate and up halves, out = act(gate) · up, cast once to the dtype at the store. One
dot per K step (X read once, one accumulator, one MMA group); only the gated hidden is written.

Grid: 1-D, one program per (BLOCK_M × BLOCK_N) OUTPUT tile (BLOCK_N ≥ 64: `tiling.gated_config`
reads a pinned block_n under 64 as 64), grouped by
GROUP_M tile rows for L2 reuse (`_grouped_tile`, shared with linear_act, called by the kernel and by
the BlockSpecs' index maps); output tile n reads packed columns [2·n·BLOCK_N, 2·(n+1)·BLOCK_N),
which hold BLOCK_N/64 whole (gate, up) block pairs. Each program walks K in BLOCK_K steps with
`pl.ds`.

The split (`_gate_split`) is a reshape to [BLOCK_M, pairs, 2, 64], a transpose that puts the
gate/up axis last and `jax.lax.unstack` on it (lowered to Triton's reshape, trans and split: the
same ops as the twin's).

Masks on every edge (the Triton lowering does not mask edge blocks; the interpreter pads them with
NaN, so the ragged K tail and the packed columns past 2·Np are masked to zeros); 16-bit upcast only
when interpreting — as in linear_act.

Twin: torch_impl/gated.py (Triton), line for line; differences carry `# twin-diff:`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from fusedmlp.common.config import TileConfig
from fusedmlp.common.packing import PACK_BLOCK
from fusedmlp.common.tiling import gated_config, heuristic_config
from fusedmlp.common.validate import check_packed_gated

from . import compat
from .activations import apply_activation, round_to_dtype
from .front import ADAPTER
from .linear_act import _STATICS, _grouped_tile, _precision
from .tf32 import tf32_operand

# The packed layout's block (common/packing.py), a static for the kernels.
_PACK = PACK_BLOCK


# ==== forward kernel ==============================================================================
def _gate_split(acc, BLOCK_M: int, BLOCK_N: int, PACK: int):
    """A packed [BLOCK_M, 2·BLOCK_N] tile -> its gate and up halves, [BLOCK_M, BLOCK_N] each."""
    acc = acc.reshape(BLOCK_M, BLOCK_N // PACK, 2, PACK)
    acc = jnp.transpose(acc, (0, 1, 3, 2))  # the gate/up axis last: unstack takes it apart
    g, u = jax.lax.unstack(acc, axis=3)
    return g.reshape(BLOCK_M, BLOCK_N), u.reshape(BLOCK_M, BLOCK_N)


def _gated_fwd_kernel(
    x_ref, wv_ref, bc_ref, o_ref, z_ref=None,
    *, M, N, K,
    ACTIVATION, PRECISION, INTERPRET,
    BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
):  # fmt: skip
    # twin-diff: strides and HAS_BIAS/STORE_PREACT are implied by the refs (an absent bc_ref is
    # None; z_ref, the packed pre-activation [z|g] output, exists only when the launch asks).
    # 1. program -> tile: an output tile of h, and the packed tile of wv twice as wide
    pid_m, pid_n = _grouped_tile(pl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + jnp.arange(BLOCK_M)
    offs_n = pid_n * BLOCK_N + jnp.arange(BLOCK_N)
    offs_p = pid_n * 2 * BLOCK_N + jnp.arange(2 * BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_p = offs_p < 2 * pl.cdiv(N, _PACK) * _PACK  # the packed width, 2·Np
    # twin-diff: no pointers; the refs are already this tile's row / column panels (BlockSpecs).

    def body(k, acc):
        # 2. load: one X tile, one packed tile; masked on M (or 2·Np) and the ragged K tail
        offs_k = k * BLOCK_K + jnp.arange(BLOCK_K)
        mask_k = offs_k < K
        x = plgpu.load(
            x_ref.at[:, pl.ds(k * BLOCK_K, BLOCK_K)],
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        wv = plgpu.load(
            wv_ref.at[pl.ds(k * BLOCK_K, BLOCK_K), :],
            mask=mask_k[:, None] & mask_p[None, :],
            other=0.0,
        )
        if INTERPRET:  # interpreter only: keeps the twin's arithmetic (see linear_act)
            x = x.astype(jnp.float32)
            wv = wv.astype(jnp.float32)
        # 3. compute: fp32 accumulate, gate and up in one product
        return acc + jax.lax.dot(
            tf32_operand(x, PRECISION),
            tf32_operand(wv, PRECISION),
            precision=PRECISION,
            preferred_element_type=jnp.float32,
        )

    acc = jnp.zeros((BLOCK_M, 2 * BLOCK_N), dtype=jnp.float32)
    acc = jax.lax.fori_loop(0, pl.cdiv(K, BLOCK_K), body, acc)

    # 3. compute: the epilogue, all in fp32
    if bc_ref is not None:
        bc = plgpu.load(bc_ref, mask=mask_p, other=0.0).astype(jnp.float32)
        acc = acc + bc[None, :]
    if z_ref is not None:  # STORE_PREACT: the packed [z|g] tile, as the operand's columns
        mask_z = mask_m[:, None] & mask_p[None, :]
        plgpu.store(z_ref, round_to_dtype(acc, z_ref.dtype, INTERPRET), mask=mask_z)
    g, u = _gate_split(acc, BLOCK_M, BLOCK_N, _PACK)
    acc = apply_activation(g, ACTIVATION) * u
    mask_mn = mask_m[:, None] & mask_n[None, :]

    # 4. store: one rounding to the output dtype
    plgpu.store(o_ref, round_to_dtype(acc, o_ref.dtype, INTERPRET), mask=mask_mn)


# ==== launcher ====================================================================================
def _packed_specs(M: int, N: int, K: int, config: TileConfig):
    """BlockSpecs of x's row panel, wv's packed column panel, bc's slice and an output tile."""
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

    def wv_map(pid):
        return 0, tile(pid)[1]

    def bc_map(pid):
        return (tile(pid)[1],)

    x_spec = pl.BlockSpec((config.block_m, K), x_map)
    wv_spec = pl.BlockSpec((K, 2 * config.block_n), wv_map)
    bc_spec = pl.BlockSpec((2 * config.block_n,), bc_map)
    o_spec = pl.BlockSpec((config.block_m, config.block_n), tile)
    return x_spec, wv_spec, bc_spec, o_spec


@functools.partial(jax.jit, static_argnames=("n", "store_preact", *_STATICS))
def _gated_fwd_jit(x, wv, bc, *, n, store_preact, activation, config, fp32_precision, interpret):
    M, K = x.shape
    N = n
    out_shape = jax.ShapeDtypeStruct((M, N), x.dtype)
    z_shape = jax.ShapeDtypeStruct((M, wv.shape[1]), x.dtype)  # packed [z|g], 2·Np wide
    if M == 0 or N == 0:
        out = jnp.zeros((M, N), dtype=x.dtype)
        return (out, jnp.zeros(z_shape.shape, x.dtype)) if store_preact else out
    grid = (pl.cdiv(M, config.block_m) * pl.cdiv(N, config.block_n),)
    x_spec, wv_spec, bc_spec, o_spec = _packed_specs(M, N, K, config)
    kernel = functools.partial(
        _gated_fwd_kernel, M=M, N=N, K=K,
        ACTIVATION=activation, PRECISION=_precision(fp32_precision), INTERPRET=interpret,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
    )  # fmt: skip
    z_spec = pl.BlockSpec((config.block_m, 2 * config.block_n), o_spec.index_map)
    return pl.pallas_call(
        kernel,
        out_shape=(out_shape, z_shape) if store_preact else out_shape,
        grid=grid,
        in_specs=[x_spec, wv_spec, bc_spec if bc is not None else None],
        out_specs=(o_spec, z_spec) if store_preact else o_spec,
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        name="gated_fwd",
    )(x, wv, bc)


def gated_fwd(
    x: jax.Array,
    wv: jax.Array,
    bc: jax.Array | None,
    *,
    n: int,
    activation: str,
    config: TileConfig,
    fp32_precision: str = "ieee",
    interpret: bool | None = None,
    store_preact: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Launch on a 2-D x [M, K], wv [K, packed_width(n)], bc [packed_width(n)] or None; returns
    h [M, n] in x.dtype. Trusts input; a block_n under 64 is read as 64. `store_preact` (the
    training forward): returns (h, zg) with zg = x·wv + bc, the packed [z|g] [M, 2·Np]."""
    if interpret is None:
        interpret = compat.interpret_mode()
    config = gated_config(config)  # block_n: whole packed block pairs (at least 64)
    # twin-diff: jax.jit caches the traced and compiled pallas_call per shape and statics (an eager
    # pallas_call is traced and compiled again on every call: 0.75 s a call in interpret mode);
    # Triton caches compiled kernels itself. The filter covers the lowering done here; under a
    # caller's jax.jit the lowering (and the warning) comes later, at the caller's compile.
    with compat.quiet_pallas_triton():
        return _gated_fwd_jit(
            x,
            wv,
            bc,
            n=n,
            store_preact=store_preact,
            activation=activation,
            config=config,
            fp32_precision=fp32_precision,
            interpret=interpret,
        )


# ==== public function =============================================================================
def gated(
    x: jax.Array,
    wv: jax.Array,
    bc: jax.Array | None = None,
    *,
    n: int,
    activation: str = "silu",
    config: TileConfig | None = None,
    fp32_precision: str = "ieee",
    interpret: bool | None = None,
) -> jax.Array:
    """act(x @ w + b) * (x @ v + c) from the packed operands (`jax_impl.packing.pack_gated`):
    x [..., K], wv [K, packed_width(n)], bc [packed_width(n)] or None; returns [..., n].
    `interpret`: run under Pallas' interpreter (None: where there is no GPU)."""
    dtype, K, n = check_packed_gated(
        ADAPTER,
        x,
        wv,
        bc,
        n=n,
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
    M = x2d.shape[0]
    if config is None:
        config = heuristic_config("gated", M, n, K, dtype, interpret=interpret)
    out = gated_fwd(
        x2d,
        wv,
        bc,
        n=n,
        activation=activation,
        config=config,
        fp32_precision=fp32_precision,
        interpret=interpret,
    )
    return out.reshape(*lead, n)
