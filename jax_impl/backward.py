"""backward: the per-layer MLP's gradients, three Pallas-Triton kernels and their orchestration.

Formula, one layer i in reverse order (common/reference.py:backward is the float64 twin). Forward:
plain `z = h·W + b`, `out = act(z)`; gated `[z|g] = h·wv + bc` (packed, common/packing.py),
`out = act(z) ⊙ g`. Given `dout` [M, N], the gradient of the layer's output:
- plain `dZ = dout ⊙ act'(z)`; gated `dz = dout ⊙ g ⊙ act'(z)`, `dg = dout ⊙ act(z)`, stored as
  `dZ` [M, 2·Np] PACKED like the forward's `[z|g]`, its padded columns (n ≥ N) exact zeros;
- `dW = hᵀ·dZ` ([K, N], or the packed `dwv` [K, 2·Np] in one GEMM) and `db = Σ_m dZ`;
- `dh = dZ·Wᵀ` (one GEMM over N or 2·Np; the padded columns are zero in both operands).
`dh` is the previous layer's `dout`, so the previous layer's `act'` step is fused into this GEMM's
epilogue (`_dgrad_kernel`, EPILOGUE "dact" / "dact_gated"): no elementwise pass between layers.
Only the last layer has no GEMM to fuse into (`_dact_kernel`); it is skipped when that layer is
plain with activation "identity" (every preset): dZ = dy.

Kernels (fp32 accumulate; dZ and dh stored in the compute dtype, dW and db in the param dtype, one
rounding each):
- `_dgrad_kernel`: out = epilogue(a·wᵀ), a [M, Kc], w [Ko, Kc] = the forward weight as stored (a
  row panel of it per program, contracted on its columns: no transpose is materialised). Grid 1-D
  over output tiles (`_grouped_tile`); gated epilogue tiles are 2·BLOCK_N packed columns wide.
- `_wgrad_kernel`: dw = aᵀ·dZ, a = the layer input h [M, K]; grid over (K-blocks × Nc-blocks),
  each program reduces over ALL of M in BLOCK_M steps (deterministic: no atomics, no split-M).
  With a bias the programs of the first K-block also sum the dZ tiles they load: db.
- `_dact_kernel`: the last layer's dZ = dy ⊙ act'(z) (or the gated pair), elementwise.

What is saved (`saved=`, common/config.py's SAVED_POLICIES): "preact" (the default) keeps, per
layer, its input h (h_0 = x; the hidden outputs the forward writes anyway) and its pre-activation
z (gated: the packed [z|g]); "inputs" keeps x only and the backward first runs the saving forward
again (one more forward; less memory). The saving forward is always these portable kernels (a
Hopper saving forward is later work), and so is the backward, whatever `impl` ran the forward:
the Mosaic GPU and jax_triton implementations train through them; fused_small and fused_decode
train through the per-layer backward (a whole-MLP backward is later work).

Masks on every edge, 16-bit upcast after each load when interpreting, `round_to_dtype` at every
store — as in linear_act and gated.

Twin: torch_impl/backward.py (Triton), line for line; differences carry `# twin-diff:`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from fusedmlp.common import MLPSpec
from fusedmlp.common.config import TileConfig
from fusedmlp.common.packing import PACK_BLOCK, packed_width
from fusedmlp.common.tiling import gated_config, heuristic_config

from . import compat
from .activations import apply_activation, apply_activation_grad, round_to_dtype
from .gated import _gate_split, gated_fwd
from .linear_act import _grouped_tile, _precision, linear_act_fwd

# The packed layout's block (common/packing.py), a static for the kernels.
_PACK = PACK_BLOCK
EPILOGUES = ("none", "dact", "dact_gated")


# ==== backward kernels ============================================================================
def _gate_join(dz, dg, BLOCK_M: int, BLOCK_N: int, PACK: int):
    """The inverse of `_gate_split`: gate and up halves [BLOCK_M, BLOCK_N] -> one packed
    [BLOCK_M, 2·BLOCK_N] tile (a stack on a new last axis and a transpose: Triton's join)."""
    dz = dz.reshape(BLOCK_M, BLOCK_N // PACK, PACK)
    dg = dg.reshape(BLOCK_M, BLOCK_N // PACK, PACK)
    both = jax.lax.stack([dz, dg], axis=3)  # [BLOCK_M, pairs, PACK, 2]
    both = jnp.transpose(both, (0, 1, 3, 2))  # [BLOCK_M, pairs, 2, PACK]: gate block, up block
    return both.reshape(BLOCK_M, 2 * BLOCK_N)


def _dact_epilogue(dout, zg, mask_n, EPILOGUE: str, ACTIVATION: str, BLOCK_M: int, BLOCK_N: int):
    """The activation's derivative on an fp32 tile of dout [BLOCK_M, BLOCK_N] (kernels 1 and 3).

    "dact": dout ⊙ act'(z), z [BLOCK_M, BLOCK_N]; "dact_gated": zg is the packed [z|g] tile
    [BLOCK_M, 2·BLOCK_N] and the result the packed [dz|dg] tile, its padded columns (n ≥ N) exact
    zeros whatever a NaN row carries there.
    """
    if EPILOGUE == "dact":
        return dout * apply_activation_grad(zg, ACTIVATION)
    z, g = _gate_split(zg, BLOCK_M, BLOCK_N, _PACK)
    dz = dout * g * apply_activation_grad(z, ACTIVATION)
    dg = dout * apply_activation(z, ACTIVATION)
    dz = jnp.where(mask_n[None, :], dz, 0.0)
    dg = jnp.where(mask_n[None, :], dg, 0.0)
    return _gate_join(dz, dg, BLOCK_M, BLOCK_N, _PACK)


def _packed_mask(pid_n, N, BLOCK_N: int):
    """The packed columns of output tile pid_n and the mask of those inside 2·Np."""
    offs_p = pid_n * 2 * BLOCK_N + jnp.arange(2 * BLOCK_N)
    return offs_p < 2 * pl.cdiv(N, _PACK) * _PACK


def _dgrad_kernel(
    a_ref, w_ref, z_ref, o_ref,
    *, M, N, K,
    EPILOGUE, ACTIVATION, PRECISION, INTERPRET,
    BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
):  # fmt: skip
    # out = epilogue(a·wᵀ): a [M, K], w [N, K] (the forward weight [d_in, Kc] as stored), K the
    # contraction (the layer's N or 2·Np), N the layer's d_in = the previous layer's output width.
    # twin-diff: strides are implied by the refs; z_ref is None for EPILOGUE "none".
    # 1. program -> tile
    pid_m, pid_n = _grouped_tile(pl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + jnp.arange(BLOCK_M)
    offs_n = pid_n * BLOCK_N + jnp.arange(BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # twin-diff: no pointers; the refs are already this tile's row panels (BlockSpecs).

    def body(k, acc):
        # 2. load: masked on M (or N) and on the ragged K tail, zeros outside
        offs_k = k * BLOCK_K + jnp.arange(BLOCK_K)
        mask_k = offs_k < K
        a = plgpu.load(
            a_ref.at[:, pl.ds(k * BLOCK_K, BLOCK_K)],
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        w = plgpu.load(
            w_ref.at[:, pl.ds(k * BLOCK_K, BLOCK_K)],
            mask=mask_n[:, None] & mask_k[None, :],
            other=0.0,
        )
        if INTERPRET:  # interpreter only: keeps the twin's arithmetic (see linear_act)
            a = a.astype(jnp.float32)
            w = w.astype(jnp.float32)
        # 3. compute: fp32 accumulate of a·wᵀ (the dot contracts w's columns)
        return acc + jax.lax.dot_general(
            a, w, (((1,), (1,)), ((), ())), precision=PRECISION,
            preferred_element_type=jnp.float32,
        )  # fmt: skip

    acc = jnp.zeros((BLOCK_M, BLOCK_N), dtype=jnp.float32)
    acc = jax.lax.fori_loop(0, pl.cdiv(K, BLOCK_K), body, acc)

    # 3. compute: the epilogue, all in fp32 (the previous layer's activation derivative)
    mask_out = mask_m[:, None] & mask_n[None, :]
    if EPILOGUE == "dact":
        z = plgpu.load(z_ref, mask=mask_out, other=0.0).astype(jnp.float32)
        acc = _dact_epilogue(acc, z, mask_n, EPILOGUE, ACTIVATION, BLOCK_M, BLOCK_N)
    elif EPILOGUE == "dact_gated":
        mask_out = mask_m[:, None] & _packed_mask(pid_n, N, BLOCK_N)[None, :]
        zg = plgpu.load(z_ref, mask=mask_out, other=0.0).astype(jnp.float32)
        acc = _dact_epilogue(acc, zg, mask_n, EPILOGUE, ACTIVATION, BLOCK_M, BLOCK_N)

    # 4. store: one rounding to the compute dtype
    plgpu.store(o_ref, round_to_dtype(acc, o_ref.dtype, INTERPRET), mask=mask_out)


def _wgrad_kernel(
    a_ref, dz_ref, dw_ref, db_ref,
    *, M, N, K,
    PRECISION, INTERPRET,
    BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
):  # fmt: skip
    # dw [K, N] = aᵀ·dz over all M, a [M, K] (the layer input), dz [M, N]; db [N] = Σ_m dz.
    # twin-diff: strides and HAS_DBIAS are implied by the refs (db_ref is None without a bias).
    # 1. program -> tile: a [BLOCK_K, BLOCK_N] tile of dw, M walked in BLOCK_M steps
    pid_k, pid_n = _grouped_tile(pl.program_id(0), K, N, BLOCK_K, BLOCK_N, GROUP_M)
    offs_k = pid_k * BLOCK_K + jnp.arange(BLOCK_K)
    offs_n = pid_n * BLOCK_N + jnp.arange(BLOCK_N)
    mask_k = offs_k < K
    mask_n = offs_n < N
    # twin-diff: no pointers; the refs are already this tile's column panels (BlockSpecs).

    def body(m, carry):
        acc, db = carry
        # 2. load: masked on K (or N) and on the ragged M tail, zeros outside
        offs_m = m * BLOCK_M + jnp.arange(BLOCK_M)
        mask_m = offs_m < M
        a = plgpu.load(
            a_ref.at[pl.ds(m * BLOCK_M, BLOCK_M), :],
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        dz = plgpu.load(
            dz_ref.at[pl.ds(m * BLOCK_M, BLOCK_M), :],
            mask=mask_m[:, None] & mask_n[None, :],
            other=0.0,
        )
        if INTERPRET:  # interpreter only: keeps the twin's arithmetic (see linear_act)
            a = a.astype(jnp.float32)
            dz = dz.astype(jnp.float32)
        # 3. compute: fp32 accumulate of aᵀ·dz (the dot contracts the rows of both)
        acc = acc + jax.lax.dot_general(
            a, dz, (((0,), (0,)), ((), ())), precision=PRECISION,
            preferred_element_type=jnp.float32,
        )  # fmt: skip
        if db_ref is not None:
            db = db + jnp.sum(dz.astype(jnp.float32), axis=0)
        return acc, db

    acc = jnp.zeros((BLOCK_K, BLOCK_N), dtype=jnp.float32)
    db = jnp.zeros((BLOCK_N,), dtype=jnp.float32)
    acc, db = jax.lax.fori_loop(0, pl.cdiv(M, BLOCK_M), body, (acc, db))

    # 4. store: one rounding to the param dtype; db by the first K-block's programs only
    mask_kn = mask_k[:, None] & mask_n[None, :]
    plgpu.store(dw_ref, round_to_dtype(acc, dw_ref.dtype, INTERPRET), mask=mask_kn)
    if db_ref is not None:
        plgpu.store(db_ref, round_to_dtype(db, db_ref.dtype, INTERPRET), mask=mask_n & (pid_k == 0))


def _dact_kernel(
    dy_ref, z_ref, o_ref,
    *, M, N,
    EPILOGUE, ACTIVATION, INTERPRET,
    BLOCK_M, BLOCK_N, GROUP_M,
):  # fmt: skip
    # The last layer's dZ: dy [M, N] ⊙ act'(z) ("dact"), or the packed pair ("dact_gated").
    # twin-diff: strides are implied by the refs.
    # 1. program -> tile
    pid_m, pid_n = _grouped_tile(pl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + jnp.arange(BLOCK_M)
    offs_n = pid_n * BLOCK_N + jnp.arange(BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_mn = mask_m[:, None] & mask_n[None, :]
    mask_out = mask_mn
    if EPILOGUE == "dact_gated":
        mask_out = mask_m[:, None] & _packed_mask(pid_n, N, BLOCK_N)[None, :]

    # 2. load
    dy = plgpu.load(dy_ref, mask=mask_mn, other=0.0).astype(jnp.float32)
    zg = plgpu.load(z_ref, mask=mask_out, other=0.0).astype(jnp.float32)

    # 3. compute: in fp32
    out = _dact_epilogue(dy, zg, mask_n, EPILOGUE, ACTIVATION, BLOCK_M, BLOCK_N)

    # 4. store: one rounding to the compute dtype
    plgpu.store(o_ref, round_to_dtype(out, o_ref.dtype, INTERPRET), mask=mask_out)


# ==== launchers ===================================================================================
def _tile_map(M: int, N: int, config: TileConfig, BLOCK_M: int, BLOCK_N: int):
    return functools.partial(
        _grouped_tile, M=M, N=N, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, GROUP_M=config.group_m
    )


def _params(config: TileConfig):
    return plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


_STATICS = ("activation", "config", "fp32_precision", "interpret")


@functools.partial(jax.jit, static_argnames=("epilogue", *_STATICS))
def _dgrad_jit(a, w, z, *, epilogue, activation, config, fp32_precision, interpret):
    M, K = a.shape
    N = w.shape[0]
    gated = epilogue == "dact_gated"
    width = packed_width(N) if gated else N
    out_shape = jax.ShapeDtypeStruct((M, width), a.dtype)
    if M == 0 or N == 0:
        return jnp.zeros(out_shape.shape, a.dtype)
    bm, bn = config.block_m, config.block_n
    tile = _tile_map(M, N, config, bm, bn)
    a_spec = pl.BlockSpec((bm, K), lambda pid: (tile(pid)[0], 0))
    w_spec = pl.BlockSpec((bn, K), lambda pid: (tile(pid)[1], 0))
    o_spec = pl.BlockSpec((bm, 2 * bn if gated else bn), tile)
    kernel = functools.partial(
        _dgrad_kernel, M=M, N=N, K=K,
        EPILOGUE=epilogue, ACTIVATION=activation, PRECISION=_precision(fp32_precision),
        INTERPRET=interpret,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=config.block_k, GROUP_M=config.group_m,
    )  # fmt: skip
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(pl.cdiv(M, bm) * pl.cdiv(N, bn),),
        in_specs=[a_spec, w_spec, o_spec if z is not None else None],
        out_specs=o_spec,
        compiler_params=_params(config),
        interpret=interpret,
        name=f"dgrad_{epilogue}",
    )(a, w, z)


def dgrad_fwd(
    a: jax.Array,
    w: jax.Array,
    z: jax.Array | None,
    *,
    epilogue: str,
    activation: str,
    config: TileConfig,
    fp32_precision: str = "ieee",
    interpret: bool | None = None,
) -> jax.Array:
    """epilogue(a·wᵀ) for a [M, Kc] (dZ), w [Ko, Kc] (the forward weight or packed wv as stored),
    z: the previous layer's saved pre-activation ([M, Ko]; "dact_gated": packed [M, 2·Np]) or None
    ("none"). Returns [M, Ko] ("dact_gated": the packed [M, 2·Np]) in a.dtype. Trusts input."""
    if interpret is None:
        interpret = compat.interpret_mode()
    if epilogue == "dact_gated":
        config = gated_config(config)  # whole packed block pairs per tile
    with compat.quiet_pallas_triton():
        return _dgrad_jit(
            a, w, z, epilogue=epilogue, activation=activation, config=config,
            fp32_precision=fp32_precision, interpret=interpret,
        )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("out_dtype", "has_bias", *_STATICS[1:]))
def _wgrad_jit(a, dz, *, out_dtype, has_bias, config, fp32_precision, interpret):
    M, K = a.shape
    N = dz.shape[1]
    dw_shape = jax.ShapeDtypeStruct((K, N), out_dtype)
    db_shape = jax.ShapeDtypeStruct((N,), out_dtype)
    if M == 0:
        zeros = jnp.zeros(dw_shape.shape, out_dtype), jnp.zeros(db_shape.shape, out_dtype)
        return zeros if has_bias else zeros[0]
    # The GEMM dw [K, N] = aᵀ·dz: the config's block_m tiles K, block_k steps over M.
    bk, bn, bm = config.block_m, config.block_n, config.block_k
    tile = _tile_map(K, N, config, bk, bn)
    a_spec = pl.BlockSpec((M, bk), lambda pid: (0, tile(pid)[0]))
    dz_spec = pl.BlockSpec((M, bn), lambda pid: (0, tile(pid)[1]))
    dw_spec = pl.BlockSpec((bk, bn), tile)
    db_spec = pl.BlockSpec((bn,), lambda pid: (tile(pid)[1],))
    kernel = functools.partial(
        _wgrad_kernel, M=M, N=N, K=K,
        PRECISION=_precision(fp32_precision), INTERPRET=interpret,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=config.group_m,
    )  # fmt: skip
    if not has_bias:
        kernel = functools.partial(kernel, db_ref=None)
    return pl.pallas_call(
        kernel,
        out_shape=(dw_shape, db_shape) if has_bias else dw_shape,
        grid=(pl.cdiv(K, bk) * pl.cdiv(N, bn),),
        in_specs=[a_spec, dz_spec],
        out_specs=(dw_spec, db_spec) if has_bias else dw_spec,
        compiler_params=_params(config),
        interpret=interpret,
        name="wgrad",
    )(a, dz)


def wgrad_fwd(
    a: jax.Array,
    dz: jax.Array,
    *,
    has_bias: bool,
    out_dtype: jnp.dtype,
    config: TileConfig,
    fp32_precision: str = "ieee",
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """(dw, db) = (aᵀ·dz, Σ_m dz) for a [M, K] (the layer input), dz [M, Nc]; db None without a
    bias; both in out_dtype (the param dtype). Config: block_m tiles K, block_k steps over M."""
    if interpret is None:
        interpret = compat.interpret_mode()
    with compat.quiet_pallas_triton():
        out = _wgrad_jit(
            a, dz, out_dtype=jnp.dtype(out_dtype), has_bias=has_bias, config=config,
            fp32_precision=fp32_precision, interpret=interpret,
        )  # fmt: skip
    return out if has_bias else (out, None)


@functools.partial(jax.jit, static_argnames=("epilogue", "activation", "config", "interpret"))
def _dact_jit(dy, z, *, epilogue, activation, config, interpret):
    M, N = dy.shape
    gated = epilogue == "dact_gated"
    out_shape = jax.ShapeDtypeStruct((M, z.shape[1]), dy.dtype)
    if M == 0 or N == 0:
        return jnp.zeros(out_shape.shape, dy.dtype)
    bm, bn = config.block_m, config.block_n
    tile = _tile_map(M, N, config, bm, bn)
    dy_spec = pl.BlockSpec((bm, bn), tile)
    o_spec = pl.BlockSpec((bm, 2 * bn if gated else bn), tile)
    kernel = functools.partial(
        _dact_kernel, M=M, N=N,
        EPILOGUE=epilogue, ACTIVATION=activation, INTERPRET=interpret,
        BLOCK_M=bm, BLOCK_N=bn, GROUP_M=config.group_m,
    )  # fmt: skip
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(pl.cdiv(M, bm) * pl.cdiv(N, bn),),
        in_specs=[dy_spec, o_spec],
        out_specs=o_spec,
        compiler_params=_params(config),
        interpret=interpret,
        name=f"dact_{epilogue}",
    )(dy, z)


def dact_fwd(
    dy: jax.Array,
    z: jax.Array,
    *,
    epilogue: str,
    activation: str,
    config: TileConfig,
    interpret: bool | None = None,
) -> jax.Array:
    """The last layer's dZ from dy [M, N] and its saved z ([M, N]; "dact_gated": the packed
    [z|g] [M, 2·Np], giving the packed [dz|dg]), in dy.dtype. Trusts input."""
    if interpret is None:
        interpret = compat.interpret_mode()
    if epilogue == "dact_gated":
        config = gated_config(config)
    with compat.quiet_pallas_triton():
        return _dact_jit(dy, z, epilogue=epilogue, activation=activation, config=config,
                         interpret=interpret)  # fmt: skip


# ==== orchestration ===============================================================================
def _config(
    config: TileConfig | None, family: str, m: int, n: int, k: int, spec: MLPSpec
) -> TileConfig:
    """A pinned config for every launch, or the forward's heuristic for this GEMM's shape."""
    if config is not None:
        return config
    interpret = compat.interpret_mode()
    return heuristic_config(family, m, n, k, spec.dtype, interpret=interpret)


def _reads_preact(layer) -> bool:
    """Whether the backward reads this layer's pre-activation (act' = 1 for a plain identity)."""
    return layer.gated or layer.activation != "identity"


def forward_saving(
    x2d: jax.Array,
    params: Mapping[str, jax.Array],
    spec: MLPSpec,
    *,
    saved: str,
    config: TileConfig | None = None,
    residual: jax.Array | None = None,
) -> tuple[jax.Array, tuple[jax.Array | None, ...]]:
    """The training forward on the portable kernels: (y2d, residuals for `mlp_backward`).

    params in the kernels' (packed) layout. "preact": residuals (h_0, z_0, h_1, z_1, …), z_i the
    layer's pre-activation (gated: the packed [z|g]), None where the backward does not read it (a
    plain "identity" layer: act' = 1; every preset's last layer, common/cost.py:saved_bytes).
    "inputs": (x2d,) only. `residual` is added in the last layer's epilogue, as the inference
    forward does.
    """
    store = saved == "preact"
    h, saved_arrays = x2d, []
    m = x2d.shape[0]
    for layer in spec.layers():
        i = layer.index
        last = i == spec.num_layers - 1
        keep_z = store and _reads_preact(layer)
        kw = dict(activation=layer.activation, fp32_precision=spec.fp32_precision)
        if layer.gated:
            cfg = _config(config, "gated", m, layer.d_out, layer.d_in, spec)
            out = gated_fwd(
                h, params[f"wv{i}"], params.get(f"bc{i}"), n=layer.d_out, config=cfg,
                store_preact=keep_z, **kw,
            )  # fmt: skip
        else:
            cfg = _config(config, "linear_act", m, layer.d_out, layer.d_in, spec)
            r = residual if last else None
            out = linear_act_fwd(
                h, params[f"w{i}"], params.get(f"b{i}"), r, config=cfg, store_preact=keep_z, **kw
            )
        h_next, z = out if keep_z else (out, None)
        if store:
            saved_arrays += [h, z]
        h = h_next
    return h, tuple(saved_arrays) if store else (x2d,)


def mlp_backward(
    dy2d: jax.Array,
    residuals: tuple[jax.Array | None, ...],
    params: Mapping[str, jax.Array],
    spec: MLPSpec,
    *,
    saved: str,
    config: TileConfig | None = None,
) -> dict[str, jax.Array]:
    """Gradients of sum(y ⊙ dy): key "x" and the params' kernel-layout names (gated layers'
    `wv{i}`/`bc{i}` come back packed, their padded columns zero). `residuals` from
    `forward_saving` with the same `saved`; "inputs" runs the saving forward again first."""
    if saved == "inputs":
        residuals = forward_saving(residuals[0], params, spec, saved="preact", config=config)[1]
    layers = spec.layers()
    m = dy2d.shape[0]
    grads: dict[str, jax.Array] = {}
    # The last layer's dZ: its own kernel, or dy itself for a plain identity layer.
    last = layers[-1]
    z_last = residuals[2 * last.index + 1]
    if _reads_preact(last):
        family = "gated" if last.gated else "linear_act"
        cfg = _config(config, family, m, last.d_out, last.d_out, spec)
        dz = dact_fwd(
            dy2d, z_last, epilogue="dact_gated" if last.gated else "dact",
            activation=last.activation, config=cfg,
        )  # fmt: skip
    else:
        dz = dy2d
    for layer in reversed(layers):
        i = layer.index
        h_in = residuals[2 * i]
        w = params[f"wv{i}"] if layer.gated else params[f"w{i}"]
        b_name = f"bc{i}" if layer.gated else f"b{i}"
        has_bias = b_name in params
        nc = dz.shape[1]
        cfg = _config(config, "linear_act", layer.d_in, nc, m, spec)
        dw, db = wgrad_fwd(
            h_in, dz, has_bias=has_bias, out_dtype=w.dtype, config=cfg,
            fp32_precision=spec.fp32_precision,
        )  # fmt: skip
        grads[f"wv{i}" if layer.gated else f"w{i}"] = dw
        if has_bias:
            grads[b_name] = db
        # dh, with the previous layer's act' fused in ("none": dx, or a plain identity layer)
        epilogue, activation, z_prev, family = "none", "identity", None, "linear_act"
        if i > 0 and _reads_preact(layers[i - 1]):
            prev = layers[i - 1]
            epilogue = "dact_gated" if prev.gated else "dact"
            activation, z_prev = prev.activation, residuals[2 * (i - 1) + 1]
            family = "gated" if prev.gated else "linear_act"
        cfg = _config(config, family, m, layer.d_in, nc, spec)
        dz = dgrad_fwd(
            dz, w, z_prev, epilogue=epilogue, activation=activation, config=cfg,
            fp32_precision=spec.fp32_precision,
        )  # fmt: skip
    grads["x"] = dz
    return grads
