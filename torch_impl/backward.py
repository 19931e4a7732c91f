"""backward: the MLP's gradients from three Triton kernels, and the forward that saves for them.

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
1. `_dgrad_kernel`: out = epilogue(a·wᵀ), a [M, Kc], w [Ko, Kc] read through its strides (the
   forward weight [K, N] as it is: no transpose materialised), fp32 accumulate.
2. `_wgrad_kernel`: dw = aᵀ·d, a = the layer input h [M, K] read transposed through strides, d = dZ
   [M, Nc]; program (t, s) reduces output tile t (K-block × Nc-block) over the s-th of S runs of M
   (whole block_k steps); with a bias the programs of the first K-block also sum the dZ tiles they
   load anyway -> db [Nc]. S = 1 (enough tiles to fill the GPU): dw and db stored directly (fp32
   accumulate, one rounding). S > 1 (narrow layers, e.g. the image fit's 64×64 gradient: one tile;
   `common.tiling.wgrad_splits`): fp32 partials [S, K, Nc] and [S, Nc], then `_wgrad_sum_kernel`
   adds each element's S partials in the fixed order s = 0, 1, … and rounds once. Deterministic
   either way: no atomics.
3. `_dact_kernel`: elementwise dZ = dy ⊙ act'(z) (or the gated form), the last layer only.
The act' step (`_dact_epilogue`) is one helper shared by kernels 1 and 3.

Grid: over output tiles, `_grouped_tile` order (linear_act's; wgrad: × S runs of M). Masks on every
edge, int64 offsets, any strides; under TRITON_INTERPRET=1 16-bit tiles are upcast after each load;
every store rounds once (`round_to_dtype`): dZ and dh in the compute dtype, dW and db in the param
dtype (the same here: the spec's), as torch autograd on 16-bit tensors rounds.

Saved policy (`saved=`, common.config.SAVED_POLICIES): "preact" (default) — the training forward
(`forward_saving`) runs the portable `linear_act`/`gated` kernels with STORE_PREACT and keeps per
layer its input h_i and pre-activation z_i (gated: the packed [z|g]). A plain identity or relu layer
keeps no z: identity's act' = 1, and relu's is read off its output h_{i+1}, kept anyway as the next
layer's input (`_dact_from_output`: 1 where h > 0, NaN where h is NaN, 0 elsewhere, as torch's ReLU
backward reads its result; it differs from act'(z) only where 0 < z rounds to an output of 0, fp16
below ~3e-8). This is the portable forward whatever impl was asked for, except on Hopper
(`hopper=True`, decided with tma/backward.py's `applies`), where gated layers and those that keep no
z run the persistent TMA kernels (the gated one with its own STORE_PREACT). "inputs" — the forward
is the asked impl and saves x only; `mlp_backward` recomputes the saving forward once (one extra
forward's FLOPs, `cost.saved_bytes` less memory). fused_small trains through its own saving forward
and whole-MLP backward (fused_small_backward.py: the same residuals, 3-4 launches a step);
fused_decode trains through this per-layer backward. On Hopper the backward's GEMMs run
tma/backward.py's sibling of `mlp_backward` instead of these kernels.

Twin: jax_impl/backward.py (Pallas-Triton), line for line; differences carry `# twin-diff:`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
import triton
import triton.language as tl

from fusedmlp.common.config import TileConfig
from fusedmlp.common.packing import packed_names, packed_width
from fusedmlp.common.spec import MLPSpec
from fusedmlp.common.tiling import (
    WGRAD_SUM_BLOCK,
    WGRAD_SUM_UNROLL,
    WGRAD_SUM_WARPS,
    cap_for_preact,
    cdiv,
    gated_config,
    heuristic_config,
    step_gemm_kind,
    wgrad_splits,
)
from fusedmlp.common.tuning import registered_device, tables_state
from fusedmlp.common.validate import check_saved

from .activations import apply_activation, apply_activation_grad, round_to_dtype
from .gated import _PACK, _gate_split, gated_fwd
from .launch import Launch, LaunchCache
from .linear_act import _grouped_tile, _input_precision, linear_act_fwd
from .runtime import INTERPRET
from .tf32 import tf32_operand

EPILOGUES = ("none", "dact", "dact_gated")


# ==== the act' epilogue (kernels 1 and 3) =========================================================
@triton.jit
def _gate_join(gate, up, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PACK: tl.constexpr):
    """`_gate_split` undone: gate and up halves [BLOCK_M, BLOCK_N] -> the packed [BLOCK_M,
    2·BLOCK_N] tile (blocks of PACK columns, gate block then up block)."""
    gate = tl.reshape(gate, (BLOCK_M, BLOCK_N // PACK, PACK))
    up = tl.reshape(up, (BLOCK_M, BLOCK_N // PACK, PACK))
    t = tl.join(gate, up)  # [BLOCK_M, pairs, PACK, 2]
    t = tl.permute(t, (0, 1, 3, 2))  # [BLOCK_M, pairs, 2, PACK]: the packed order
    return tl.reshape(t, (BLOCK_M, 2 * BLOCK_N))


@triton.jit
def _dact_epilogue(
    dout, z_ptr, o_ptr, pid_n, offs_m, offs_n, M, N,
    stride_zm, stride_zn, stride_om, stride_on,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dout (fp32 [BLOCK_M, BLOCK_N], output columns offs_n of the layer) -> dZ stored: plain
    dout ⊙ act'(z) [M, N]; gated the packed [dz|dg] tile of those columns [M, 2·Np], padded
    columns (n ≥ N) exact zeros whatever the saved tile holds. For relu z_ptr is the layer's
    OUTPUT h = relu(z) (`_dact_from_output`): relu' of h is relu' of z (same sign, NaN kept),
    and of the stored z bit for bit, both rounded from one fp32 value."""
    rows = offs_m.to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if GATED:
        # 2. load: the saved packed [z|g] tile of these output columns (the forward's tile)
        offs_p = pid_n * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)
        mask_p = offs_p < 2 * tl.cdiv(N, _PACK) * _PACK  # the packed width, 2·Np
        ps = offs_p.to(tl.int64)
        mask_mp = mask_m[:, None] & mask_p[None, :]
        zg = tl.load(
            z_ptr + rows[:, None] * stride_zm + ps[None, :] * stride_zn, mask=mask_mp, other=0.0
        ).to(tl.float32)
        z, g = _gate_split(zg, BLOCK_M, BLOCK_N, _PACK)
        # 3. compute: dz = dout ⊙ g ⊙ act'(z), dg = dout ⊙ act(z), in fp32
        dz = dout * g * apply_activation_grad(z, ACTIVATION)
        dg = dout * apply_activation(z, ACTIVATION)
        dz = tl.where(mask_n[None, :], dz, 0.0)
        dg = tl.where(mask_n[None, :], dg, 0.0)
        out = _gate_join(dz, dg, BLOCK_M, BLOCK_N, _PACK)
        # 4. store: one rounding, the packed layout
        o_ptrs = o_ptr + rows[:, None] * stride_om + ps[None, :] * stride_on
        tl.store(o_ptrs, round_to_dtype(out, o_ptr.dtype.element_ty, INTERPRET), mask=mask_mp)
    else:
        cols = offs_n.to(tl.int64)
        mask_mn = mask_m[:, None] & mask_n[None, :]
        z = tl.load(
            z_ptr + rows[:, None] * stride_zm + cols[None, :] * stride_zn, mask=mask_mn, other=0.0
        ).to(tl.float32)
        out = dout * apply_activation_grad(z, ACTIVATION)
        o_ptrs = o_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
        tl.store(o_ptrs, round_to_dtype(out, o_ptr.dtype.element_ty, INTERPRET), mask=mask_mn)


# ==== kernel 1: dgrad, out = epilogue(a · wᵀ) =====================================================
@triton.jit
def _dgrad_kernel(
    a_ptr, w_ptr, z_ptr, o_ptr,
    M, N, K,
    stride_am, stride_ak, stride_wk, stride_wn, stride_zm, stride_zn, stride_om, stride_on,
    EPILOGUE: tl.constexpr, ACTIVATION: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # N: output columns (Ko: the previous layer's output width); K: the contraction (Kc). The
    # weight tile [BLOCK_K, BLOCK_N] of wᵀ is read through the forward weight's strides.
    # 1. program -> tile
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    a_ptrs = a_ptr + rows[:, None] * stride_am
    w_ptrs = w_ptr + cols[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        # 2. load: masked on M (or N) and on the ragged K tail, zeros outside
        offs_k = k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        ks = offs_k.to(tl.int64)
        a = tl.load(
            a_ptrs + ks[None, :] * stride_ak, mask=mask_m[:, None] & mask_k[None, :], other=0.0
        )
        w = tl.load(
            w_ptrs + ks[:, None] * stride_wk, mask=mask_k[:, None] & mask_n[None, :], other=0.0
        )
        if INTERPRET:  # interpreter only: its 16-bit arithmetic is wrong (TOOLCHAIN.md)
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        # 3. compute: fp32 accumulate
        acc = tl.dot(
            tf32_operand(a, INPUT_PRECISION),
            tf32_operand(w, INPUT_PRECISION),
            acc,
            input_precision=INPUT_PRECISION,
        )

    # 3. compute + 4. store: the epilogue
    if EPILOGUE == "none":
        mask_mn = mask_m[:, None] & mask_n[None, :]
        o_ptrs = o_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
        tl.store(o_ptrs, round_to_dtype(acc, o_ptr.dtype.element_ty, INTERPRET), mask=mask_mn)
    else:
        _dact_epilogue(
            acc, z_ptr, o_ptr, pid_n, offs_m, offs_n, M, N,
            stride_zm, stride_zn, stride_om, stride_on,
            ACTIVATION, EPILOGUE == "dact_gated", INTERPRET, BLOCK_M, BLOCK_N,
        )  # fmt: skip


# ==== kernel 2: wgrad, dw = aᵀ · d (+ db = Σ_m d), and the fixed-order sum of its splits =========
@triton.jit
def _wgrad_kernel(
    a_ptr, d_ptr, dw_ptr, db_ptr,
    M, N, K, STEPS,
    stride_am, stride_ak, stride_dm, stride_dn, stride_ws, stride_wk, stride_wn, stride_bs,
    HAS_DBIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # The output dw is [K, N]: BLOCK_M rows of it (a block of K), BLOCK_N columns; the reduction
    # runs over M in BLOCK_K steps (the config's fields keep their tile meaning: out rows, out
    # columns, reduction step). Split over M (grid axis 1, S runs of STEPS steps): dw_ptr / db_ptr
    # are the fp32 partials [S, K, N] / [S, N] (stride_ws / stride_bs apart) and the store below
    # is exact; S = 1: dw / db themselves (strides 0) in the param dtype, one rounding.
    # 1. program -> tile: output tile t, run s of the rows
    pid_k, pid_n = _grouped_tile(tl.program_id(0), K, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_s = tl.program_id(1)
    offs_k = pid_k * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < K
    mask_n = offs_n < N
    ks = offs_k.to(tl.int64)
    cols = offs_n.to(tl.int64)
    split = pid_s.to(tl.int64)
    a_ptrs = a_ptr + ks[:, None] * stride_ak
    d_ptrs = d_ptr + cols[None, :] * stride_dn
    m_lo = pid_s * STEPS
    m_hi = tl.minimum(m_lo + STEPS, tl.cdiv(M, BLOCK_K))

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m in range(m_lo, m_hi):
        # 2. load: hᵀ tile [BLOCK_M (k), BLOCK_K (m)] and dZ tile [BLOCK_K (m), BLOCK_N]
        offs_r = m * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_r = offs_r < M
        rs = offs_r.to(tl.int64)
        a = tl.load(
            a_ptrs + rs[None, :] * stride_am, mask=mask_k[:, None] & mask_r[None, :], other=0.0
        )
        d = tl.load(
            d_ptrs + rs[:, None] * stride_dm, mask=mask_r[:, None] & mask_n[None, :], other=0.0
        )
        if INTERPRET:  # interpreter only: its 16-bit arithmetic is wrong (TOOLCHAIN.md)
            a = a.to(tl.float32)
            d = d.to(tl.float32)
        # 3. compute: fp32 accumulate over the run; the bias gradient from the same dZ tiles
        acc = tl.dot(
            tf32_operand(a, INPUT_PRECISION),
            tf32_operand(d, INPUT_PRECISION),
            acc,
            input_precision=INPUT_PRECISION,
        )
        if HAS_DBIAS:  # noqa: SIM102 (a constexpr, then a runtime test: two ifs in Triton)
            if pid_k == 0:
                db = db + tl.sum(d.to(tl.float32), axis=0)

    # 4. store: one rounding to the param dtype (S = 1), or the exact fp32 partial (S > 1)
    mask_kn = mask_k[:, None] & mask_n[None, :]
    dw_ptrs = dw_ptr + split * stride_ws + ks[:, None] * stride_wk + cols[None, :] * stride_wn
    tl.store(dw_ptrs, round_to_dtype(acc, dw_ptr.dtype.element_ty, INTERPRET), mask=mask_kn)
    if HAS_DBIAS:
        db_out = round_to_dtype(db, db_ptr.dtype.element_ty, INTERPRET)
        tl.store(db_ptr + split * stride_bs + cols, db_out, mask=mask_n & (pid_k == 0))


@triton.jit
def _wgrad_sum_kernel(
    ws_ptr, wsb_ptr, dw_ptr, db_ptr,
    S, L, N,
    HAS_DBIAS: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK: tl.constexpr, UNROLL: tl.constexpr,
):  # fmt: skip
    # dw = round(Σ_s ws[s]) and db = round(Σ_s wsb[s]), the S partials of each element added in
    # the fixed order s = 0, 1, …, S−1 (deterministic: the same bits every run). ws [S, L] (L =
    # K·N) and dw [L] are contiguous (the launcher's own buffers), wsb [S, N], db [N]. Programs
    # [0, cdiv(L, BLOCK)) sum BLOCK elements of dw, the rest (HAS_DBIAS) BLOCK elements of db: each
    # program's other side is fully masked (offsets clamped in range).
    # 1. program -> tile
    pid = tl.program_id(0)
    nb = tl.cdiv(L, BLOCK)
    is_w = pid < nb
    offs_w = tl.minimum(pid, nb - 1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    offs_b = tl.maximum(pid - nb, 0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask_w = is_w & (offs_w < L)
    mask_b = (pid >= nb) & (offs_b < N)

    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(0, tl.cdiv(S, UNROLL)):
        for u in tl.static_range(UNROLL):  # UNROLL independent loads in flight, adds in order
            s = c * UNROLL + u
            ok = s < S
            row = tl.minimum(s, S - 1).to(tl.int64)
            # 2. load: partial s of this program's elements (fp32: no interpreter upcast)
            part = tl.load(ws_ptr + row * L + offs_w, mask=mask_w & ok, other=0.0)
            if HAS_DBIAS:
                part_b = tl.load(wsb_ptr + row * N + offs_b, mask=mask_b & ok, other=0.0)
                part = tl.where(is_w, part, part_b)
            # 3. compute: one add per partial, in the order s = 0, 1, …
            acc = tl.where(ok, acc + part, acc)

    # 4. store: one rounding to the param dtype
    out = round_to_dtype(acc, dw_ptr.dtype.element_ty, INTERPRET)
    tl.store(dw_ptr + offs_w, out, mask=mask_w)
    if HAS_DBIAS:
        tl.store(db_ptr + offs_b, out, mask=mask_b)


# ==== kernel 3: dact, dZ = dy ⊙ act'(z) (the last layer) ==========================================
@triton.jit
def _dact_kernel(
    dy_ptr, z_ptr, o_ptr,
    M, N,
    stride_dm, stride_dn, stride_zm, stride_zn, stride_om, stride_on,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # 1. program -> tile: BLOCK_N output columns of the layer (gated: a packed tile twice as wide)
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    # 2. load
    mask_mn = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    dy = tl.load(
        dy_ptr + rows[:, None] * stride_dm + cols[None, :] * stride_dn, mask=mask_mn, other=0.0
    ).to(tl.float32)
    # 3. compute + 4. store
    _dact_epilogue(
        dy, z_ptr, o_ptr, pid_n, offs_m, offs_n, M, N,
        stride_zm, stride_zn, stride_om, stride_on,
        ACTIVATION, GATED, INTERPRET, BLOCK_M, BLOCK_N,
    )  # fmt: skip


# ==== launchers ===================================================================================
def _dgrad_launch(
    a_shape,
    a_strides,
    w_shape,
    w_strides,
    z_strides,
    epilogue,
    activation,
    config,
    fp32_precision,
) -> Launch:
    """`dgrad_fwd`'s launch for this key (`_DGRAD`); out is a fresh contiguous [M, width]."""
    M, Kc = a_shape
    Ko = w_shape[0]
    width = packed_width(Ko) if epilogue == "dact_gated" else Ko
    if epilogue == "dact_gated":
        config = gated_config(config)  # whole packed block pairs per tile
    out_strides = (width, 1)
    zz = z_strides if z_strides is not None else out_strides  # a placeholder, never read
    return Launch(
        _dgrad_kernel, (cdiv(M, config.block_m) * cdiv(Ko, config.block_n),),
        (M, Ko, Kc, *a_strides, w_strides[1], w_strides[0], *zz, *out_strides),
        dict(
            EPILOGUE=epilogue, ACTIVATION=activation,
            INPUT_PRECISION=_input_precision(fp32_precision), INTERPRET=INTERPRET,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            GROUP_M=config.group_m, num_warps=config.num_warps, num_stages=config.num_stages,
        ),
    )  # fmt: skip


_DGRAD = LaunchCache(_dgrad_launch)


def dgrad_fwd(
    a: torch.Tensor,
    w: torch.Tensor,
    z: torch.Tensor | None = None,
    *,
    epilogue: str = "none",
    activation: str = "identity",
    config: TileConfig,
    fp32_precision: str = "ieee",
) -> torch.Tensor:
    """epilogue(a · wᵀ) for a [M, Kc] and the forward weight w [Ko, Kc] (any strides): "none"
    [M, Ko]; "dact" ⊙ act'(z), z [M, Ko] (relu: the layer's output instead); "dact_gated" (z
    the packed [M, packed_width(Ko)] of the gated layer whose output gradient this is) the packed
    [dz|dg] [M, packed_width(Ko)]. Trusts input; for "dact_gated" a block_n under 64 is read as
    64."""
    M = a.shape[0]
    Ko = w.shape[0]
    width = packed_width(Ko) if epilogue == "dact_gated" else Ko
    out = torch.empty((M, width), device=a.device, dtype=a.dtype)
    if M == 0 or Ko == 0:
        return out
    launch = _DGRAD.get((
        a.shape, a.stride(), w.shape, w.stride(), z.stride() if z is not None else None,
        epilogue, activation, config, fp32_precision,
    ))  # fmt: skip
    launch(a, w, z, out)
    return out


class _WgradLaunches:
    """`wgrad_fwd`'s plan for one key: S, the fp32 workspaces' shapes (S > 1) and its launches."""

    __slots__ = ("splits", "wgrad", "wgrad_sum", "ws_shape", "wsb_shape")

    def __init__(
        self, a_shape, a_strides, d_strides, n_cols, has_bias, config, precision, splits
    ) -> None:
        M, K = a_shape
        Nc = n_cols
        tiles = cdiv(K, config.block_m) * cdiv(Nc, config.block_n)
        S, steps = wgrad_splits(tiles, M, config.block_k, splits=splits)
        self.splits = S
        self.ws_shape, self.wsb_shape = (S, K, Nc), (S, Nc)
        # S = 1, the single-kernel path: dw [K, Nc] and db written directly (no split strides)
        ws_strides = (0, Nc, 1) if S == 1 else (K * Nc, Nc, 1)
        self.wgrad = Launch(
            _wgrad_kernel, (tiles, S),
            (M, Nc, K, steps, *a_strides, *d_strides, *ws_strides, 0 if S == 1 else Nc),
            dict(
                HAS_DBIAS=has_bias, INPUT_PRECISION=_input_precision(precision),
                INTERPRET=INTERPRET, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                BLOCK_K=config.block_k, GROUP_M=config.group_m, num_warps=config.num_warps,
                num_stages=config.num_stages,
            ),
        )  # fmt: skip
        L = K * Nc
        grid = (cdiv(L, WGRAD_SUM_BLOCK) + (cdiv(Nc, WGRAD_SUM_BLOCK) if has_bias else 0),)
        self.wgrad_sum = Launch(
            _wgrad_sum_kernel, grid, (S, L, Nc),
            dict(
                HAS_DBIAS=has_bias, INTERPRET=INTERPRET, BLOCK=WGRAD_SUM_BLOCK,
                UNROLL=min(WGRAD_SUM_UNROLL, S), num_warps=WGRAD_SUM_WARPS,
            ),
        )  # fmt: skip


_WGRAD = LaunchCache(_WgradLaunches)


def wgrad_fwd(
    a: torch.Tensor,
    d: torch.Tensor,
    *,
    has_bias: bool,
    config: TileConfig,
    fp32_precision: str = "ieee",
    dtype: torch.dtype | None = None,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(aᵀ·d [K, Nc], Σ_m d [Nc] or None) for a [M, K], d [M, Nc] (any strides), in `dtype` (the
    param dtype; default a's). config: block_m × block_n tiles of the output, block_k the M step.
    The rows are split in S runs where the output has too few tiles to fill the GPU
    (`common.tiling.wgrad_splits`; `splits` forces S): fp32 partials, then `_wgrad_sum_kernel`.
    Trusts input."""
    M, K = a.shape
    Nc = d.shape[1]
    dtype = dtype or a.dtype
    if M == 0:  # a sum over no rows
        dw = torch.zeros((K, Nc), device=a.device, dtype=dtype)
        return dw, torch.zeros((Nc,), device=a.device, dtype=dtype) if has_bias else None
    dw = torch.empty((K, Nc), device=a.device, dtype=dtype)
    db = torch.empty((Nc,), device=a.device, dtype=dtype) if has_bias else None
    if K == 0 or Nc == 0:
        return dw, db
    plan = _WGRAD.get(
        (a.shape, a.stride(), d.stride(), Nc, has_bias, config, fp32_precision, splits)
    )
    if plan.splits == 1:  # the single-kernel path: dw and db written directly
        plan.wgrad(a, d, dw, db)
        return dw, db
    ws = torch.empty(plan.ws_shape, device=a.device, dtype=torch.float32)
    wsb = torch.empty(plan.wsb_shape, device=a.device, dtype=torch.float32) if has_bias else None
    plan.wgrad(a, d, ws, wsb)
    plan.wgrad_sum(ws, wsb if has_bias else ws, dw, db if has_bias else dw)
    return dw, db


def _dact_launch(dy_shape, dy_strides, z_strides, activation, gated, config) -> Launch:
    """`dact_fwd`'s launch for this key (`_DACT`); out is a fresh contiguous [M, width]."""
    M, N = dy_shape
    width = packed_width(N) if gated else N
    if gated:
        config = gated_config(config)
    return Launch(
        _dact_kernel, (cdiv(M, config.block_m) * cdiv(N, config.block_n),),
        (M, N, *dy_strides, *z_strides, width, 1),
        dict(
            ACTIVATION=activation, GATED=gated, INTERPRET=INTERPRET,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, GROUP_M=config.group_m,
            num_warps=config.num_warps,
        ),
    )  # fmt: skip


_DACT = LaunchCache(_dact_launch)


def dact_fwd(
    dy: torch.Tensor,
    z: torch.Tensor,
    *,
    activation: str,
    gated: bool,
    config: TileConfig,
) -> torch.Tensor:
    """dy [M, N] ⊙ act'(z) (z [M, N]), or for `gated` the packed [dz|dg] [M, packed_width(N)]
    from the packed z [M, packed_width(N)]. Trusts input; gated: a block_n under 64 is read as
    64."""
    M, N = dy.shape
    width = packed_width(N) if gated else N
    out = torch.empty((M, width), device=dy.device, dtype=dy.dtype)
    if M == 0 or N == 0:
        return out
    launch = _DACT.get((dy.shape, dy.stride(), z.stride(), activation, gated, config))
    launch(dy, z, out)
    return out


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
    return _heuristic(family, m, n, k, spec.dtype, spec.fp32_precision, preact, False)


def _heuristic(
    family: str, m: int, n: int, k: int, dtype: str, precision: str, preact: bool, persistent: bool
) -> TileConfig:
    # A training step asks for every layer's config in the forward and the backward, every step:
    # cached. heuristic_config is a function of its arguments, of this process's INTERPRET and
    # of the GPU registered with common.tuning and the state of its committed tables: in the key.
    key = (family, m, n, k, dtype, precision, preact, persistent, registered_device())
    return _heuristic_of(*key, tables_state())


@functools.lru_cache(maxsize=1024)
def _heuristic_of(
    family, m, n, k, dtype, precision, preact, persistent, device, tables
) -> TileConfig:
    # narrow=False: tiling's read-bound x·U rule was measured on the forward only
    cfg = heuristic_config(
        family, m, n, k, dtype, interpret=INTERPRET, persistent=persistent,
        fp32_precision=precision, device=device, narrow=False,
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
    x2d: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    spec: MLPSpec,
    *,
    saved: str,
    config: TileConfig | None = None,
    residual: torch.Tensor | None = None,
    hopper: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """(y2d, residuals) for x2d [M, d_in] and params in the packed layout (`w{i}`, `b{i}`, `wv{i}`,
    `bc{i}`), with the portable kernels. residuals: "preact" (h_0, z_0, h_1, z_1, …) with h_0 = x2d,
    z_i [M, N_i] (plain), the packed [M, 2·Np_i] (gated) or [M, 0] (plain identity or relu: act'
    needs no z); "inputs" (x2d,). `residual` [M, d_out] is added in the last layer's epilogue.
    `hopper` (the caller checked tma/backward.py's `applies`): gated layers and layers that keep no
    pre-activation run the persistent TMA kernels instead (the gated one stores its packed
    pre-activation as the portable one does); a plain layer that keeps one stays portable."""
    check_saved(saved)
    if hopper:
        from .tma import backward as tma_backward  # tma imports this module
        from .tma import gated as tma_gated
        from .tma import linear_act as tma_linear
    layers = spec.layers()
    last = layers[-1].index
    precision = spec.fp32_precision
    h = x2d
    kept: list[torch.Tensor] = [x2d]
    for layer in layers:
        i, m = layer.index, h.shape[0]
        store = saved == "preact" and _stores_preact(layer)
        if hopper and (layer.gated or not store):
            family = "gated" if layer.gated else "linear_act"
            # the committed sweep's tiles for the GEMM (a gated one storing [z|g]), else the
            # forward heuristic's (tma/backward.py `step_config`)
            cfg = tma_backward.step_config(
                step_gemm_kind(family, preact=store), family, m, layer.d_out, layer.d_in,
                spec.dtype, precision,
            )  # fmt: skip
            if layer.gated:
                outs = tma_gated.gated_fwd(
                    h, params[f"wv{i}"], params.get(f"bc{i}"), n=layer.d_out,
                    activation=layer.activation, config=cfg, fp32_precision=precision,
                    store_preact=store,
                )  # fmt: skip
            else:
                outs = tma_linear.linear_act_fwd(
                    h, params[f"w{i}"], params.get(f"b{i}"), residual if i == last else None,
                    activation=layer.activation, config=cfg, fp32_precision=precision,
                )  # fmt: skip
        elif layer.gated:
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
        h, z = outs if store else (outs, h.new_empty((m, 0)))
        if layer.gated and i == last and residual is not None:  # no preset has one; kept exact
            h = h + residual
        if saved == "preact":
            kept += [z, h] if i != last else [z]
    return h, tuple(kept) if saved == "preact" else (x2d,)


def mlp_backward(
    dy2d: torch.Tensor,
    residuals: tuple[torch.Tensor, ...],
    params: Mapping[str, torch.Tensor],
    spec: MLPSpec,
    *,
    saved: str,
    config: TileConfig | None = None,
    need_dx: bool = True,
) -> dict[str, torch.Tensor | None]:
    """Gradients of sum(y ⊙ dy): "x" (None unless `need_dx`) and every param in the packed
    layout (`packed_names(spec)`: `wv{i}`/`bc{i}` come back packed), from `forward_saving`'s
    residuals of the same `saved` policy ("inputs": the saving forward is recomputed here).
    A `residuals` LIST is consumed: each entry is set to None once its last kernel has read it,
    so a caller that hands over its only references frees them during the backward."""
    check_saved(saved)
    if saved == "inputs":
        _, residuals = forward_saving(residuals[0], params, spec, saved="preact", config=config)
    # twin-diff: torch frees memory as references go; XLA plans buffer lifetimes itself.
    res = residuals if isinstance(residuals, list) else list(residuals)  # h_0, z_0, h_1, z_1, …
    del residuals
    layers = spec.layers()
    precision = spec.fp32_precision
    m = dy2d.shape[0]
    grads: dict[str, torch.Tensor | None] = {"x": None}
    # The last layer has no GEMM before it to fuse its act' step into: dact, unless identity.
    top = layers[-1]
    if _stores_preact(top):
        cfg = _config(spec, "gated" if top.gated else "linear_act", m, top.d_out, top.d_in, config)
        dz = dact_fwd(dy2d, res[-1], activation=top.activation, gated=top.gated, config=cfg)
    else:
        dz = dy2d
    res[-1] = None
    for layer in reversed(layers):
        i = layer.index
        wname, bname = (f"wv{i}", f"bc{i}") if layer.gated else (f"w{i}", f"b{i}")
        w = params[wname]
        width = w.shape[1]  # N, or the packed 2·Np
        cfg = _config(spec, "linear_act", layer.d_in, width, m, config)
        dw, db = wgrad_fwd(
            res[2 * i], dz, has_bias=layer.bias, config=cfg, fp32_precision=precision,
            dtype=w.dtype,
        )  # fmt: skip
        prev = layers[i - 1] if i > 0 else None
        # h_i: read by this weight gradient and, after a relu layer, by its act' step below
        out = res[2 * i] if prev is not None and _dact_from_output(prev) else None
        res[2 * i] = None
        grads[wname] = dw
        if layer.bias:
            grads[bname] = db
        if i == 0 and not need_dx:
            break
        # dh = dZ·Wᵀ, with the previous layer's act' step in the epilogue (dh is its dout)
        if prev is None or not (_stores_preact(prev) or _dact_from_output(prev)):
            epilogue, z, act = "none", None, "identity"
        else:
            epilogue = "dact_gated" if prev.gated else "dact"
            z, act = (out if out is not None else res[2 * i - 1]), prev.activation
        family = "gated" if epilogue == "dact_gated" else "linear_act"
        cfg = _config(spec, family, m, layer.d_in, width, config, preact=epilogue == "dact")
        dz = dgrad_fwd(
            dz, w, z, epilogue=epilogue, activation=act, config=cfg, fp32_precision=precision
        )
        if i > 0:
            res[2 * i - 1] = z = out = None  # z_{i-1} (or relu's h_i): read by this epilogue only
        if i == 0:
            grads["x"] = dz
    return {"x": grads["x"], **{k: grads[k] for k in packed_names(spec)}}
