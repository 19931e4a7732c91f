"""backward: the MLP's gradients from three Pallas-Triton kernels, and the forward saving for them.

Formula (one layer i, in reverse; the float64 twin is `common.reference.backward`): forward
plain `z = h·W + b`, `out = act(z)`; gated `[z|g] = h·wv + bc` (packed, common/packing.py),
`out = act(z) ⊙ g`. Given dout = ∂L/∂out [M, N]:
- plain: dZ = dout ⊙ act'(z)                                   [M, N]
- gated: dz = dout ⊙ g ⊙ act'(z), dg = dout ⊙ act(z)           dZ = [dz|dg] packed [M, 2·Np]
- dW = hᵀ·dZ (the packed dwv directly: one GEMM), db = Σ_m dZ (the packed dbc)
- dh = dZ·Wᵀ (one GEMM over N or the packed 2·Np; the padded columns are 0 in both operands).
dh is the previous layer's dout, so the previous layer's act' step is fused into this GEMM's
epilogue (`_dgrad_kernel`, EPILOGUE "dact"/"dact_gated"): no separate elementwise pass, except for
the last layer (`_dact_kernel`), which has no GEMM before it — and which every preset skips (plain
identity: dZ = dy).

Kernels:
1. `_dgrad_kernel`: out = epilogue(a·wᵀ), a [M, Kc], w [Ko, Kc] the forward weight [K, N] as it
   is (each program's block is a row panel of it, contracted on its columns: no transpose
   materialised), fp32 accumulate.
2. `_wgrad_kernel`: dw = aᵀ·d, a = the layer input h [M, K] (a column panel, contracted on its
   rows), d = dZ [M, Nc]; program (t, s) reduces output tile t (K-block × Nc-block) over the s-th of
   S runs of M (whole block_k steps); with a bias the programs of the first K-block also sum the dZ
   tiles they load anyway -> db [Nc]. S = 1 (enough tiles to fill the GPU): dw and db stored
   directly (fp32 accumulate, one rounding). S > 1 (narrow layers, e.g. the image fit's 64×64
   gradient: one tile; `common.tiling.wgrad_splits`): fp32 partials [S, K, Nc] and [S, Nc], then
   `_wgrad_sum_kernel` adds each element's S partials in the fixed order s = 0, 1, … and rounds
   once. Deterministic either way: no atomics.
3. `_dact_kernel`: elementwise dZ = dy ⊙ act'(z) (or the gated form), the last layer only.
The act' step (`_dact_epilogue`) is one helper shared by kernels 1 and 3.

Grid: over output tiles, `_grouped_tile` order (linear_act's; wgrad: × S runs of M), also in the
BlockSpecs' index maps. Masks on every edge (the Triton lowering does not mask edge blocks; the
interpreter pads them with NaN); 16-bit tiles upcast after each load when interpreting; every store
rounds once (`round_to_dtype`): dZ and dh in the compute dtype, dW and db in the param dtype (the
same here: the spec's), as autodiff of the plain function on 16-bit arrays rounds.

Saved policy (`saved=`, common.config.SAVED_POLICIES): "preact" (default) — the training forward
(`forward_saving`) runs the portable `linear_act`/`gated` kernels with `store_preact` and keeps per
layer its input h_i and pre-activation z_i (gated: the packed [z|g]). A plain identity or relu layer
keeps no z: identity's act' = 1, and relu's is read off its output h_{i+1}, kept anyway as the next
layer's input (`_dact_from_output`: 1 where h > 0, NaN where h is NaN, 0 elsewhere, as torch's ReLU
backward reads its result; it differs from act'(z) only where 0 < z rounds to an output of 0, fp16
below ~3e-8). This is the portable forward whatever impl was asked for (a saving Hopper forward is
later work). "inputs" — the forward is the asked impl and saves x only; `mlp_backward` recomputes
the saving forward once (one extra forward's FLOPs, `cost.saved_bytes` less memory). fused_small
trains through its own saving forward and whole-MLP backward (fused_small_backward.py: the same
residuals, 3-4 launches a step); fused_decode (and pallas_mosaic, jax_triton) train through this
per-layer backward. The backward kernels are always these portable ones here; the autodiff binding
(`jax.custom_vjp`) is in front.py.

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
from fusedmlp.common.packing import packed_names, packed_width
from fusedmlp.common.tiling import (
    WGRAD_SUM_BLOCK,
    WGRAD_SUM_UNROLL,
    WGRAD_SUM_WARPS,
    cap_for_preact,
    gated_config,
    heuristic_config,
    wgrad_splits,
)
from fusedmlp.common.validate import check_saved

from . import compat
from .activations import apply_activation, apply_activation_grad, round_to_dtype
from .gated import _PACK, _gate_split, gated_fwd
from .linear_act import _grouped_tile, _precision, linear_act_fwd
from .tf32 import tf32_operand

EPILOGUES = ("none", "dact", "dact_gated")


# ==== the act' epilogue (kernels 1 and 3) =========================================================
def _gate_join(gate, up, BLOCK_M: int, BLOCK_N: int, PACK: int):
    """`_gate_split` undone: gate and up halves [BLOCK_M, BLOCK_N] -> the packed [BLOCK_M,
    2·BLOCK_N] tile (blocks of PACK columns, gate block then up block)."""
    gate = gate.reshape(BLOCK_M, BLOCK_N // PACK, PACK)
    up = up.reshape(BLOCK_M, BLOCK_N // PACK, PACK)
    t = jax.lax.stack([gate, up], axis=3)  # [BLOCK_M, pairs, PACK, 2] (Triton's join)
    t = jnp.transpose(t, (0, 1, 3, 2))  # [BLOCK_M, pairs, 2, PACK]: the packed order
    return t.reshape(BLOCK_M, 2 * BLOCK_N)


def _dact_epilogue(
    dout, z_ref, o_ref, pid_n, offs_m, offs_n, M, N,
    ACTIVATION, GATED, INTERPRET,
    BLOCK_M, BLOCK_N,
):  # fmt: skip
    """dout (fp32 [BLOCK_M, BLOCK_N], output columns offs_n of the layer) -> dZ stored: plain
    dout ⊙ act'(z) [M, N]; gated the packed [dz|dg] tile of those columns [M, 2·Np], padded
    columns (n ≥ N) exact zeros whatever the saved tile holds. For relu z_ref is the layer's
    OUTPUT h = relu(z) (`_dact_from_output`): relu' of h is relu' of z (same sign, NaN kept),
    and of the stored z bit for bit, both rounded from one fp32 value."""
    # twin-diff: no strides; z_ref and o_ref are this tile's blocks (BlockSpecs).
    mask_m = offs_m < M
    mask_n = offs_n < N
    if GATED:
        # 2. load: the saved packed [z|g] tile of these output columns (the forward's tile)
        offs_p = pid_n * 2 * BLOCK_N + jnp.arange(2 * BLOCK_N)
        mask_p = offs_p < 2 * pl.cdiv(N, _PACK) * _PACK  # the packed width, 2·Np
        mask_mp = mask_m[:, None] & mask_p[None, :]
        zg = plgpu.load(z_ref, mask=mask_mp, other=0.0).astype(jnp.float32)
        z, g = _gate_split(zg, BLOCK_M, BLOCK_N, _PACK)
        # 3. compute: dz = dout ⊙ g ⊙ act'(z), dg = dout ⊙ act(z), in fp32
        dz = dout * g * apply_activation_grad(z, ACTIVATION)
        dg = dout * apply_activation(z, ACTIVATION)
        dz = jnp.where(mask_n[None, :], dz, 0.0)
        dg = jnp.where(mask_n[None, :], dg, 0.0)
        out = _gate_join(dz, dg, BLOCK_M, BLOCK_N, _PACK)
        # 4. store: one rounding, the packed layout
        plgpu.store(o_ref, round_to_dtype(out, o_ref.dtype, INTERPRET), mask=mask_mp)
    else:
        mask_mn = mask_m[:, None] & mask_n[None, :]
        z = plgpu.load(z_ref, mask=mask_mn, other=0.0).astype(jnp.float32)
        out = dout * apply_activation_grad(z, ACTIVATION)
        plgpu.store(o_ref, round_to_dtype(out, o_ref.dtype, INTERPRET), mask=mask_mn)


# ==== kernel 1: dgrad, out = epilogue(a · wᵀ) =====================================================
def _dgrad_kernel(
    a_ref, w_ref, z_ref, o_ref,
    *, M, N, K,
    EPILOGUE, ACTIVATION, PRECISION, INTERPRET,
    BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
):  # fmt: skip
    # N: output columns (Ko: the previous layer's output width); K: the contraction (Kc).
    # twin-diff: the weight's row panel [BLOCK_N, K] is this program's block (BlockSpec) and the
    # dot contracts its columns, where the Triton twin reads the [BLOCK_K, BLOCK_N] tile of wᵀ
    # through the strides; z_ref is None for EPILOGUE "none".
    # 1. program -> tile
    pid_m, pid_n = _grouped_tile(pl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + jnp.arange(BLOCK_M)
    offs_n = pid_n * BLOCK_N + jnp.arange(BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N

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
        wt = jnp.transpose(w)  # [BLOCK_K, BLOCK_N]: the twin's tile of wᵀ
        if INTERPRET:  # twin-diff: XLA CPU folds the transpose into its dot and sums in another
            # order than NumPy's matmul (1739 of 2590 fp32 elements differed); kept apart, the
            # dot is the twin's [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] product bit for bit
            wt = jax.lax.optimization_barrier(wt)
        # 3. compute: fp32 accumulate
        return acc + jax.lax.dot(
            tf32_operand(a, PRECISION),
            tf32_operand(wt, PRECISION),
            precision=PRECISION,
            preferred_element_type=jnp.float32,
        )

    acc = jnp.zeros((BLOCK_M, BLOCK_N), dtype=jnp.float32)
    acc = jax.lax.fori_loop(0, pl.cdiv(K, BLOCK_K), body, acc)

    # 3. compute + 4. store: the epilogue
    if EPILOGUE == "none":
        mask_mn = mask_m[:, None] & mask_n[None, :]
        plgpu.store(o_ref, round_to_dtype(acc, o_ref.dtype, INTERPRET), mask=mask_mn)
    else:
        _dact_epilogue(
            acc, z_ref, o_ref, pid_n, offs_m, offs_n, M, N,
            ACTIVATION, EPILOGUE == "dact_gated", INTERPRET, BLOCK_M, BLOCK_N,
        )  # fmt: skip


# ==== kernel 2: wgrad, dw = aᵀ · d (+ db = Σ_m d), and the fixed-order sum of its splits =========
def _wgrad_kernel(
    a_ref, d_ref, dw_ref, db_ref,
    *, M, N, K, STEPS,
    PRECISION, INTERPRET,
    BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
):  # fmt: skip
    # The output dw is [K, N]: BLOCK_M rows of it (a block of K), BLOCK_N columns; the reduction
    # runs over M in BLOCK_K steps (the config's fields keep their tile meaning: out rows, out
    # columns, reduction step). Split over M (grid axis 1, S runs of STEPS steps): dw_ref / db_ref
    # are this program's blocks of the fp32 partials [S, K, N] / [S, N] and the store below is
    # exact; S = 1: of dw / db themselves ([1, K, N] / [1, N]) in the param dtype, one rounding.
    # twin-diff: HAS_DBIAS is implied by db_ref (None without a bias); a's column panel [M,
    # BLOCK_M] is this program's block and the dot contracts the rows of both tiles, where the
    # Triton twin reads the [BLOCK_M, BLOCK_K] tile of hᵀ through the strides; the split's block
    # is chosen by the BlockSpecs, where the twin offsets its pointers by stride_ws / stride_bs.
    # 1. program -> tile: output tile t, run s of the rows
    pid_k, pid_n = _grouped_tile(pl.program_id(0), K, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_s = pl.program_id(1)
    offs_k = pid_k * BLOCK_M + jnp.arange(BLOCK_M)
    offs_n = pid_n * BLOCK_N + jnp.arange(BLOCK_N)
    mask_k = offs_k < K
    mask_n = offs_n < N
    m_lo = pid_s * STEPS
    m_hi = jnp.minimum(m_lo + STEPS, pl.cdiv(M, BLOCK_K))

    def body(m, carry):
        acc, db = carry
        # 2. load: the h tile [BLOCK_K (m), BLOCK_M (k)] (hᵀ's, contracted on its rows below),
        # the dZ tile [BLOCK_K (m), BLOCK_N]
        offs_r = m * BLOCK_K + jnp.arange(BLOCK_K)
        mask_r = offs_r < M
        a = plgpu.load(
            a_ref.at[pl.ds(m * BLOCK_K, BLOCK_K), :],
            mask=mask_r[:, None] & mask_k[None, :],
            other=0.0,
        )
        d = plgpu.load(
            d_ref.at[pl.ds(m * BLOCK_K, BLOCK_K), :],
            mask=mask_r[:, None] & mask_n[None, :],
            other=0.0,
        )
        if INTERPRET:  # interpreter only: keeps the twin's arithmetic (see linear_act)
            a = a.astype(jnp.float32)
            d = d.astype(jnp.float32)
        # 3. compute: fp32 accumulate over the run; the bias gradient from the same dZ tiles
        acc = acc + jax.lax.dot_general(
            tf32_operand(a, PRECISION),
            tf32_operand(d, PRECISION),
            _CONTRACT_ROWS,
            precision=PRECISION,
            preferred_element_type=jnp.float32,
        )
        if db_ref is not None:
            db = jax.lax.cond(
                pid_k == 0, lambda: db + jnp.sum(d.astype(jnp.float32), axis=0), lambda: db
            )
        return acc, db

    acc = jnp.zeros((BLOCK_M, BLOCK_N), dtype=jnp.float32)
    db = jnp.zeros((BLOCK_N,), dtype=jnp.float32)
    acc, db = jax.lax.fori_loop(m_lo, m_hi, body, (acc, db))

    # 4. store: one rounding to the param dtype (S = 1), or the exact fp32 partial (S > 1)
    mask_kn = mask_k[:, None] & mask_n[None, :]
    plgpu.store(dw_ref, round_to_dtype(acc, dw_ref.dtype, INTERPRET), mask=mask_kn)
    if db_ref is not None:
        db_out = round_to_dtype(db, db_ref.dtype, INTERPRET)
        plgpu.store(db_ref, db_out, mask=mask_n & (pid_k == 0))


def _wgrad_sum_kernel(
    ws_ref, wsb_ref, dw_ref, db_ref,
    *, S, L, N,
    INTERPRET,
    BLOCK, UNROLL,
):  # fmt: skip
    # dw = round(Σ_s ws[s]) and db = round(Σ_s wsb[s]), the S partials of each element added in
    # the fixed order s = 0, 1, …, S−1 (deterministic: the same bits every run). ws [S, L] (L =
    # K·N, the partials' free reshape), dw [L], wsb [S, N], db [N], whole arrays. Programs
    # [0, cdiv(L, BLOCK)) sum BLOCK elements of dw, the rest (with a bias) BLOCK elements of db:
    # each program's other side is fully masked (offsets clamped in range).
    # twin-diff: HAS_DBIAS is implied by db_ref (None without a bias).
    # 1. program -> tile
    pid = pl.program_id(0)
    nb = pl.cdiv(L, BLOCK)
    is_w = pid < nb
    start_w = jnp.minimum(pid, nb - 1) * BLOCK
    start_b = jnp.maximum(pid - nb, 0) * BLOCK
    mask_w = is_w & (start_w + jnp.arange(BLOCK) < L)
    mask_b = (pid >= nb) & (start_b + jnp.arange(BLOCK) < N)

    def body(c, acc):
        for u in range(UNROLL):  # UNROLL independent loads in flight, adds in order
            s = c * UNROLL + u
            ok = s < S
            row = jnp.minimum(s, S - 1)
            # 2. load: partial s of this program's elements (fp32: no interpreter upcast)
            part = plgpu.load(ws_ref.at[row, pl.ds(start_w, BLOCK)], mask=mask_w & ok, other=0.0)
            if db_ref is not None:
                part_b = plgpu.load(
                    wsb_ref.at[row, pl.ds(start_b, BLOCK)], mask=mask_b & ok, other=0.0
                )
                part = jnp.where(is_w, part, part_b)
            # 3. compute: one add per partial, in the order s = 0, 1, …
            acc = jnp.where(ok, acc + part, acc)
        return acc

    acc = jnp.zeros((BLOCK,), dtype=jnp.float32)
    acc = jax.lax.fori_loop(0, pl.cdiv(S, UNROLL), body, acc)

    # 4. store: one rounding to the param dtype
    out = round_to_dtype(acc, dw_ref.dtype, INTERPRET)
    plgpu.store(dw_ref.at[pl.ds(start_w, BLOCK)], out, mask=mask_w)
    if db_ref is not None:
        plgpu.store(db_ref.at[pl.ds(start_b, BLOCK)], out, mask=mask_b)


# ==== kernel 3: dact, dZ = dy ⊙ act'(z) (the last layer) ==========================================
def _dact_kernel(
    dy_ref, z_ref, o_ref,
    *, M, N,
    ACTIVATION, GATED, INTERPRET,
    BLOCK_M, BLOCK_N, GROUP_M,
):  # fmt: skip
    # 1. program -> tile: BLOCK_N output columns of the layer (gated: a packed tile twice as wide)
    pid_m, pid_n = _grouped_tile(pl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + jnp.arange(BLOCK_M)
    offs_n = pid_n * BLOCK_N + jnp.arange(BLOCK_N)
    # 2. load
    mask_mn = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    dy = plgpu.load(dy_ref, mask=mask_mn, other=0.0).astype(jnp.float32)
    # 3. compute + 4. store
    _dact_epilogue(
        dy, z_ref, o_ref, pid_n, offs_m, offs_n, M, N,
        ACTIVATION, GATED, INTERPRET, BLOCK_M, BLOCK_N,
    )  # fmt: skip


# ==== launchers ===================================================================================
# dot_general dimension numbers: a·wᵀ (contract both tiles' columns), aᵀ·d (both tiles' rows).
_CONTRACT_COLUMNS = (((1,), (1,)), ((), ()))
_CONTRACT_ROWS = (((0,), (0,)), ((), ()))
_STATICS = ("activation", "config", "fp32_precision", "interpret")


def _tile_map(M: int, N: int, BLOCK_M: int, BLOCK_N: int, GROUP_M: int):
    return functools.partial(
        _grouped_tile, M=M, N=N, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, GROUP_M=GROUP_M
    )


def _compiler_params(config: TileConfig):
    return plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


@functools.partial(jax.jit, static_argnames=("epilogue", *_STATICS))
def _dgrad_jit(a, w, z, *, epilogue, activation, config, fp32_precision, interpret):
    M, Kc = a.shape
    Ko = w.shape[0]
    gated = epilogue == "dact_gated"
    width = packed_width(Ko) if gated else Ko
    if M == 0 or Ko == 0:
        return jnp.zeros((M, width), a.dtype)
    bm, bn = config.block_m, config.block_n
    tile = _tile_map(M, Ko, bm, bn, config.group_m)
    a_spec = pl.BlockSpec((bm, Kc), lambda pid: (tile(pid)[0], 0))
    w_spec = pl.BlockSpec((bn, Kc), lambda pid: (tile(pid)[1], 0))
    o_spec = pl.BlockSpec((bm, 2 * bn if gated else bn), tile)  # z's tile is the output's
    kernel = functools.partial(
        _dgrad_kernel, M=M, N=Ko, K=Kc,
        EPILOGUE=epilogue, ACTIVATION=activation, PRECISION=_precision(fp32_precision),
        INTERPRET=interpret,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=config.block_k, GROUP_M=config.group_m,
    )  # fmt: skip
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((M, width), a.dtype),
        grid=(pl.cdiv(M, bm) * pl.cdiv(Ko, bn),),
        in_specs=[a_spec, w_spec, o_spec if z is not None else None],
        out_specs=o_spec,
        compiler_params=_compiler_params(config),
        interpret=interpret,
        name=f"dgrad_{epilogue}",
    )(a, w, z)


def dgrad_fwd(
    a: jax.Array,
    w: jax.Array,
    z: jax.Array | None = None,
    *,
    epilogue: str = "none",
    activation: str = "identity",
    config: TileConfig,
    fp32_precision: str = "ieee",
    interpret: bool | None = None,
) -> jax.Array:
    """epilogue(a · wᵀ) for a [M, Kc] and the forward weight w [Ko, Kc]: "none" [M, Ko]; "dact"
    ⊙ act'(z), z [M, Ko] (relu: the layer's output instead); "dact_gated" (z the packed [M,
    packed_width(Ko)] of the gated layer whose output gradient this is) the packed [dz|dg] [M,
    packed_width(Ko)]. Trusts input; for "dact_gated" a block_n under 64 is read as 64."""
    if interpret is None:
        interpret = compat.interpret_mode()
    if epilogue == "dact_gated":
        config = gated_config(config)  # whole packed block pairs per tile
    # twin-diff: jax.jit caches the traced pallas_call per shape and statics (see linear_act).
    with compat.quiet_pallas_triton():
        return _dgrad_jit(
            a, w, z, epilogue=epilogue, activation=activation, config=config,
            fp32_precision=fp32_precision, interpret=interpret,
        )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("has_bias", "dtype", "splits", *_STATICS[1:]))
def _wgrad_jit(a, d, *, has_bias, dtype, splits, config, fp32_precision, interpret):
    M, K = a.shape
    Nc = d.shape[1]
    if M == 0 or K == 0 or Nc == 0:  # a sum over no rows
        return jnp.zeros((K, Nc), dtype), jnp.zeros((Nc,), dtype) if has_bias else None
    bm, bn = config.block_m, config.block_n
    tiles = pl.cdiv(K, bm) * pl.cdiv(Nc, bn)
    S, steps = wgrad_splits(tiles, M, config.block_k, splits=splits)
    tile = _tile_map(K, Nc, bm, bn, config.group_m)
    a_spec = pl.BlockSpec((M, bm), lambda pid, s: (0, tile(pid)[0]))
    d_spec = pl.BlockSpec((M, bn), lambda pid, s: (0, tile(pid)[1]))
    # S = 1: dw and db themselves (as [1, K, Nc] / [1, Nc]); S > 1: their fp32 partials
    out_dtype = dtype if S == 1 else jnp.float32
    dw_spec = pl.BlockSpec((pl.squeezed, bm, bn), lambda pid, s: (s, *tile(pid)))
    db_spec = pl.BlockSpec((pl.squeezed, bn), lambda pid, s: (s, tile(pid)[1]))
    kernel = functools.partial(
        _wgrad_kernel, M=M, N=Nc, K=K, STEPS=steps,
        PRECISION=_precision(fp32_precision), INTERPRET=interpret,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=config.block_k, GROUP_M=config.group_m,
    )  # fmt: skip
    dw_shape = jax.ShapeDtypeStruct((S, K, Nc), out_dtype)
    db_shape = jax.ShapeDtypeStruct((S, Nc), out_dtype)
    if not has_bias:
        kernel = functools.partial(kernel, db_ref=None)
    out = pl.pallas_call(
        kernel,
        out_shape=(dw_shape, db_shape) if has_bias else dw_shape,
        grid=(tiles, S),
        in_specs=[a_spec, d_spec],
        out_specs=(dw_spec, db_spec) if has_bias else dw_spec,
        compiler_params=_compiler_params(config),
        interpret=interpret,
        name="wgrad",
    )(a, d)
    ws, wsb = out if has_bias else (out, None)
    if S == 1:
        return ws.reshape(K, Nc), wsb.reshape(Nc) if has_bias else None
    L = K * Nc
    nb = pl.cdiv(L, WGRAD_SUM_BLOCK) + (pl.cdiv(Nc, WGRAD_SUM_BLOCK) if has_bias else 0)
    summed = functools.partial(
        _wgrad_sum_kernel, S=S, L=L, N=Nc, INTERPRET=interpret,
        BLOCK=WGRAD_SUM_BLOCK, UNROLL=min(WGRAD_SUM_UNROLL, S),
    )  # fmt: skip
    if not has_bias:  # twin-diff: Pallas passes the refs it has, inputs then outputs
        summed = functools.partial(_no_bias_refs, summed)
    dw_flat = jax.ShapeDtypeStruct((L,), dtype)
    out = pl.pallas_call(
        summed,
        out_shape=(dw_flat, jax.ShapeDtypeStruct((Nc,), dtype)) if has_bias else dw_flat,
        grid=(nb,),
        compiler_params=plgpu.CompilerParams(num_warps=WGRAD_SUM_WARPS, num_stages=1),
        interpret=interpret,
        name="wgrad_sum",
    )(ws.reshape(S, L), *((wsb,) if has_bias else ()))
    dw, db = out if has_bias else (out, None)
    return dw.reshape(K, Nc), db


def _no_bias_refs(kernel, ws_ref, dw_ref):
    return kernel(ws_ref, None, dw_ref, None)


def wgrad_fwd(
    a: jax.Array,
    d: jax.Array,
    *,
    has_bias: bool,
    config: TileConfig,
    fp32_precision: str = "ieee",
    dtype: jnp.dtype | None = None,
    splits: int | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """(aᵀ·d [K, Nc], Σ_m d [Nc] or None) for a [M, K], d [M, Nc], in `dtype` (the param dtype;
    default a's). config: block_m × block_n tiles of the output, block_k the M step. The rows
    are split in S runs where the output has too few tiles to fill the GPU
    (`common.tiling.wgrad_splits`; `splits` forces S): fp32 partials, then `_wgrad_sum_kernel`.
    Trusts input."""
    if interpret is None:
        interpret = compat.interpret_mode()
    dtype = jnp.dtype(dtype or a.dtype)
    # twin-diff: S is chosen here, outside the jitted launcher whose trace it keys (the shapes
    # are static), so that a change of the choice (WGRAD_MIN_STEPS, a test's) is never cached away.
    M, K = a.shape
    tiles = pl.cdiv(K, config.block_m) * pl.cdiv(d.shape[1], config.block_n)
    splits, _ = wgrad_splits(tiles, M, config.block_k, splits=splits)
    with compat.quiet_pallas_triton():
        return _wgrad_jit(
            a, d, has_bias=has_bias, dtype=dtype, splits=splits, config=config,
            fp32_precision=fp32_precision, interpret=interpret,
        )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("activation", "gated", "config", "interpret"))
def _dact_jit(dy, z, *, activation, gated, config, interpret):
    M, N = dy.shape
    width = packed_width(N) if gated else N
    if M == 0 or N == 0:
        return jnp.zeros((M, width), dy.dtype)
    bm, bn = config.block_m, config.block_n
    tile = _tile_map(M, N, bm, bn, config.group_m)
    dy_spec = pl.BlockSpec((bm, bn), tile)
    o_spec = pl.BlockSpec((bm, 2 * bn if gated else bn), tile)  # z's tile is the output's
    kernel = functools.partial(
        _dact_kernel, M=M, N=N,
        ACTIVATION=activation, GATED=gated, INTERPRET=interpret,
        BLOCK_M=bm, BLOCK_N=bn, GROUP_M=config.group_m,
    )  # fmt: skip
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((M, width), dy.dtype),
        grid=(pl.cdiv(M, bm) * pl.cdiv(N, bn),),
        in_specs=[dy_spec, o_spec],
        out_specs=o_spec,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps),
        interpret=interpret,
        name="dact",
    )(dy, z)


def dact_fwd(
    dy: jax.Array,
    z: jax.Array,
    *,
    activation: str,
    gated: bool,
    config: TileConfig,
    interpret: bool | None = None,
) -> jax.Array:
    """dy [M, N] ⊙ act'(z) (z [M, N]), or for `gated` the packed [dz|dg] [M, packed_width(N)]
    from the packed z [M, packed_width(N)]. Trusts input; gated: a block_n under 64 is read as
    64."""
    if interpret is None:
        interpret = compat.interpret_mode()
    if gated:
        config = gated_config(config)
    with compat.quiet_pallas_triton():
        return _dact_jit(
            dy, z, activation=activation, gated=gated, config=config, interpret=interpret
        )


# ==== orchestration ===============================================================================
def _config(
    spec: MLPSpec,
    family: str,
    m: int,
    n: int,
    k: int,
    config: TileConfig | None,
    preact: bool = False,
) -> TileConfig:
    """`config` if pinned, else the heuristic's; `preact`: the kernel also loads or stores a
    pre-activation tile (capped: common.tiling.PREACT_MAX_BLOCK_N)."""
    if config is not None:
        return config
    # narrow=False: tiling's read-bound x·U rule was measured on the forward only
    cfg = heuristic_config(
        family, m, n, k, spec.dtype, interpret=compat.interpret_mode(),
        fp32_precision=spec.fp32_precision, narrow=False,
    )  # fmt: skip
    return cap_for_preact(cfg) if preact else cfg


def _stores_preact(layer) -> bool:
    # A plain layer keeps z only where act' needs it (cost.saved_bytes): not for identity (act' =
    # 1) nor relu (act' from its output, `_dact_from_output`).
    return layer.gated or layer.activation not in ("identity", "relu")


def _dact_from_output(layer) -> bool:
    # relu's act' is read off its output h_{i+1} = relu(z_i), the next layer's input (kept
    # anyway): apply_activation_grad("relu") of h is 1 where h > 0, NaN where h is NaN, 0
    # elsewhere. A hidden layer only (the spec's last layer is identity: its output is y).
    return not layer.gated and layer.activation == "relu"


def forward_saving(
    x2d: jax.Array,
    params: Mapping[str, jax.Array],
    spec: MLPSpec,
    *,
    saved: str,
    config: TileConfig | None = None,
    residual: jax.Array | None = None,
) -> tuple[jax.Array, tuple[jax.Array | None, ...]]:
    """(y2d, residuals) for x2d [M, d_in] and params in the packed layout (`w{i}`, `b{i}`,
    `wv{i}`, `bc{i}`), with the portable kernels. residuals: "preact" (h_0, z_0, h_1, z_1, …) with
    h_0 = x2d, z_i [M, N_i] (plain), the packed [M, 2·Np_i] (gated) or None (plain identity or
    relu: act' needs no z); "inputs" (x2d,). `residual` [M, d_out] is added in the last layer's
    epilogue."""
    check_saved(saved)
    layers = spec.layers()
    last = layers[-1].index
    precision = spec.fp32_precision
    h = x2d
    kept: list[jax.Array | None] = [x2d]
    for layer in layers:
        i, m = layer.index, h.shape[0]
        store = saved == "preact" and _stores_preact(layer)
        if layer.gated:
            cfg = _config(spec, "gated", m, layer.d_out, layer.d_in, config)
            outs = gated_fwd(
                h, params[f"wv{i}"], params.get(f"bc{i}"), n=layer.d_out,
                activation=layer.activation, config=cfg, fp32_precision=precision,
                store_preact=store,
            )  # fmt: skip
        else:
            cfg = _config(spec, "linear_act", m, layer.d_out, layer.d_in, config, preact=store)
            outs = linear_act_fwd(
                h, params[f"w{i}"], params.get(f"b{i}"), residual if i == last else None,
                activation=layer.activation, config=cfg, fp32_precision=precision,
                store_preact=store,
            )  # fmt: skip
        # twin-diff: an unsaved z is None (a custom_vjp residual may be), not an [M, 0] tensor.
        h, z = outs if store else (outs, None)
        if layer.gated and i == last and residual is not None:  # no preset has one; kept exact
            h = h + residual
        if saved == "preact":
            kept += [z, h] if i != last else [z]
    return h, tuple(kept) if saved == "preact" else (x2d,)


def mlp_backward(
    dy2d: jax.Array,
    residuals: tuple[jax.Array | None, ...],
    params: Mapping[str, jax.Array],
    spec: MLPSpec,
    *,
    saved: str,
    config: TileConfig | None = None,
) -> dict[str, jax.Array]:
    """Gradients of sum(y ⊙ dy): "x" and every param in the packed layout (`packed_names(spec)`:
    `wv{i}`/`bc{i}` come back packed), from `forward_saving`'s residuals of the same `saved`
    policy ("inputs": the saving forward is recomputed here)."""
    # twin-diff: no need_dx (jax's custom_vjp always asks for every input's cotangent).
    check_saved(saved)
    if saved == "inputs":
        _, residuals = forward_saving(residuals[0], params, spec, saved="preact", config=config)
    layers = spec.layers()
    hs, zs = residuals[0::2], residuals[1::2]
    precision = spec.fp32_precision
    m = dy2d.shape[0]
    grads: dict[str, jax.Array] = {}
    # The last layer has no GEMM before it to fuse its act' step into: dact, unless identity.
    top = layers[-1]
    if _stores_preact(top):
        cfg = _config(spec, "gated" if top.gated else "linear_act", m, top.d_out, top.d_in, config)
        dz = dact_fwd(dy2d, zs[-1], activation=top.activation, gated=top.gated, config=cfg)
    else:
        dz = dy2d
    for layer in reversed(layers):
        i = layer.index
        wname, bname = (f"wv{i}", f"bc{i}") if layer.gated else (f"w{i}", f"b{i}")
        w = params[wname]
        width = w.shape[1]  # N, or the packed 2·Np
        cfg = _config(spec, "linear_act", layer.d_in, width, m, config)
        dw, db = wgrad_fwd(
            hs[i], dz, has_bias=layer.bias, config=cfg, fp32_precision=precision, dtype=w.dtype
        )
        prev = layers[i - 1] if i > 0 else None
        # h_i: read by this weight gradient and, after a relu layer, by its act' step below
        out = hs[i] if prev is not None and _dact_from_output(prev) else None
        grads[wname] = dw
        if layer.bias:
            grads[bname] = db
        # dh = dZ·Wᵀ, with the previous layer's act' step in the epilogue (dh is its dout)
        if prev is None or not (_stores_preact(prev) or _dact_from_output(prev)):
            epilogue, z, act = "none", None, "identity"
        else:
            epilogue = "dact_gated" if prev.gated else "dact"
            z, act = (out if out is not None else zs[i - 1]), prev.activation
        family = "gated" if epilogue == "dact_gated" else "linear_act"
        cfg = _config(spec, family, m, layer.d_in, width, config, preact=epilogue == "dact")
        dz = dgrad_fwd(
            dz, w, z, epilogue=epilogue, activation=act, config=cfg, fp32_precision=precision
        )
        if i == 0:
            grads["x"] = dz
    return {"x": grads["x"], **{k: grads[k] for k in packed_names(spec)}}
