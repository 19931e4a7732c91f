"""lowrank_linear_act: out = act((x·U)·V + b), a factorised layer in one or two Triton launches;
lowrank_gated_linear_act: act((x·Uw)·Vw + b) ⊙ ((x·Uv)·Vv + c), the gated (SwiGLU/GeGLU) form.

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
- M = 16 (decode), one pass (now replaced by two passes, below): one row block; one program
  per panel, G = NUM_SMS-ish panels of one tile each
  fill the GPU, and each program recomputes t = x·U (16·K·r MACs, nothing at decode) but reads all
  of U from L2: llama3-8b's layer (K = 4096, N = 14336, BLOCK_N = 128: G = 112), r = 256: U is
  2 MiB, 112 programs read 224 MiB of L2 for 9.4 MB of HBM weights (U + V) — the L2 reads, not
  HBM, set the time there (at ~10 TB/s of L2: ~22 us vs the 2.2 us HBM floor); r = 64: 56 MiB.
  Fewer, wider panels cut the L2 reads by G and leave SMs idle: the sweep's choice (bench/
  lowrank_probe.py measures G = 112).
- M = 8192: 64 row blocks of 128 (r = 256: since this change 128 rows with 64-wide tiles and
  32-deep K steps, 3 stages; before, 128 blocks of 64 rows: twice the L2 reads of V); G =
  NUM_SMS // row blocks panels (2 or 1) fill the SMs once, so t is computed G times: +22 % MACs
  (K / (K + N)) at G = 2; at G = 1 no recompute at all. Recomputing per N-tile (G = 112) would
  cost 112·M·K·r = 25× the useful MACs there — the reason the panel exists.
  Measured there (H200, commit 0ec778c, bench/lowrank_probe.py, device time, silu, bf16), r =
  64 / 128 / 256: this one pass 289.7 / 285.4 / 438.6 µs, eager 510.9 / 519.8 / 557.3, two
  GEMMs with t stored (Hopper TMA linear_act) 177.9 / 205.0 / 232.4 — so the fronts run plain
  factorised layers at large M as two GEMMs (common/lowrank_spec.py `layer_run`; past 64 rows
  the fused kernel only where x·U is split, `lowrank.fused_split_applies`). For a direct
  call at r ≤ 64 the heuristic now takes two passes with S = 1 (64-row blocks, panels of two
  128-wide tiles): 170.6 µs, the probe's best (common/lowrank.py `lowrank_config`).

Two passes (config.split_k = S > 0; the heuristic's choice at M ≤ 64, common/lowrank.py says
why): at decode one pass has a single row block, so its 112 programs each recompute t and read
all of U from L2 (112 copies of U) through a serial 64-step K loop. Instead launch 1
(`_lowrank_xu_partial_kernel`) splits K S ways: one program per (K split, row block, rank tile
of SPLIT_BLOCK_R columns) computes an fp32 partial of t over cdiv(K steps, S) steps and stores
it (workspace [S·MP, BLOCK_R] fp32, every element written: rows past M and columns past r are
zeros). Launch 2 is the panel kernel with part A replaced by the sum of the S partials of its
rows in the fixed order s = 0..S-1 — deterministic, no atomics — and then the same rounding of t
(so both paths meet the same reference) and the same part B. U is read once (spread over S·r/16
programs of 8 K steps at K = 4096, S = 8); each launch-2 program reads S·BLOCK_M·BLOCK_R·4 bytes
of partials from L2 (32-128 KiB at M = 16) instead of all of U (0.5-2 MiB). The sum is a runtime
loop, not tl.static_range: unrolled, the S loads were hoisted together and the gated kernel
spilled 10 KiB at r = 256 (sm_90 compile); as a loop it needs 60-159 registers, no spills.

Tried and measured slower (2026-12-04, both twins, commits 852f955 / 1d81765, reverted): the two
passes' work in ONE launch — a program per output tile requested its V tile first, claimed
launch 1's units of x·U from a counter (so no program waits on one that is not running), counted
each unit stored, waited until all were, then summed the partials as launch 2 does (the same
bits). H200, M = 16, llama3-8b's layer, device time: torch 8.8 / 10.9 / 12.0-15.6 µs against the
two passes' 8.1 / 9.9 / 10.8 (r = 64 / 128 / 256; S = 4 / 16 and 32-wide units no better); JAX
12.0-18.5 against 8.0 / 10.6 / 12.0 with the counters' memset counted. A kernel boundary costs
the device time little; the claims, the polling and the wait cost more than V's loads hidden
under x·U saved.

Gated (`gate` = (ug, vg, c)): part A accumulates t = x·U and tg = x·Ug from the same x tile (two
U tiles, one x tile a K step; two partial workspaces in two passes), both rounded once; part B
loads V's and Vg's tiles, acc = act(t·V + b) · (tg·Vg + c) in fp32, one rounding at the store.
The reference is `common.lowrank.gated_layer(..., round_intermediate=dtype)`.

Interpreter: under TRITON_INTERPRET=1 16-bit tiles are upcast to fp32 right after the load, and
the rounded t again after its rounding (the interpreter's bf16 arithmetic operates on raw bit
patterns); on a GPU both dots take 16-bit tiles natively.

Host cost: the launcher keeps a launch record per key of shapes, strides, concrete config and
flags (launch.py): at decode a layer's two launches cost the allocations and the calls only.

Twin: jax_impl/lowrank.py (Pallas-Triton), line for line; differences carry `# twin-diff:`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedmlp.common.lowrank import (
    LowRankConfig,
    block_r,
    check_lowrank_gated_layer,
    check_lowrank_layer,
    lowrank_config,
)
from fusedmlp.common.tiling import cdiv

from .activations import apply_activation, round_to_dtype
from .front import ADAPTER
from .launch import Launch, LaunchCache
from .linear_act import _grouped_tile, _input_precision
from .runtime import INTERPRET, check_kernel_device
from .tf32 import tf32_operand


# ==== part A: t = x·U over a range of K steps (both paths) ========================================
@triton.jit
def _xu(
    x_ptr, u_ptr, ug_ptr, rows, ranks, mask_m, mask_r, k_first, k_steps, K,
    stride_xm, stride_xk, stride_uk, stride_ur,
    GATED: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """fp32 Σ over K steps k_first..k_first+k_steps-1 of x[rows, k]·U[k, ranks], masked on M (or
    r) and on K's ragged tail (zeros outside). Gated: the same for Ug (U's strides), from the
    same x tile; returns (t, tg) (tg zeros when not gated: the compiler drops it)."""
    x_ptrs = x_ptr + rows[:, None] * stride_xm
    u_ptrs = u_ptr + ranks[None, :] * stride_ur
    ug_ptrs = ug_ptr + ranks[None, :] * stride_ur
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    tg = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(k_first, k_first + k_steps):
        # 2. load: masked on M (or r) and on the ragged K tail, zeros outside
        offs_k = k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        ks = offs_k.to(tl.int64)
        mask_kr = mask_k[:, None] & mask_r[None, :]
        x = tl.load(
            x_ptrs + ks[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0
        )
        u = tl.load(u_ptrs + ks[:, None] * stride_uk, mask=mask_kr, other=0.0)
        if INTERPRET:  # interpreter only: its 16-bit arithmetic is wrong (TOOLCHAIN.md)
            x = x.to(tl.float32)
            u = u.to(tl.float32)
        # 3. compute: fp32 accumulate
        t = tl.dot(
            tf32_operand(x, INPUT_PRECISION),
            tf32_operand(u, INPUT_PRECISION),
            t,
            input_precision=INPUT_PRECISION,
        )
        if GATED:  # one x tile feeds both products
            ug = tl.load(ug_ptrs + ks[:, None] * stride_uk, mask=mask_kr, other=0.0)
            if INTERPRET:
                ug = ug.to(tl.float32)
            tg = tl.dot(
                tf32_operand(x, INPUT_PRECISION),
                tf32_operand(ug, INPUT_PRECISION),
                tg,
                input_precision=INPUT_PRECISION,
            )
    return t, tg


# ==== two passes, launch 1: fp32 partials of t = x·U, K split S ways ==============================
@triton.jit
def _lowrank_xu_partial_kernel(
    x_ptr, u_ptr, ug_ptr, p_ptr, pg_ptr,
    M, K, R, MP, R_TILES, SPLIT_STEPS,
    stride_xm, stride_xk, stride_uk, stride_ur, stride_pm, stride_pr,
    GATED: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_BLOCK_R: tl.constexpr,
):  # fmt: skip
    # 1. program -> tile: (K split s, row block, rank tile), rank tiles fastest (they share x)
    pid = tl.program_id(0)
    m_tiles = MP // BLOCK_M
    pid_r = pid % R_TILES
    pid_m = (pid // R_TILES) % m_tiles
    s = pid // (R_TILES * m_tiles)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * SPLIT_BLOCK_R + tl.arange(0, SPLIT_BLOCK_R)
    rows = offs_m.to(tl.int64)
    ranks = offs_r.to(tl.int64)
    # 2. load / 3. compute: this split's SPLIT_STEPS K steps (past K: none, the partial is zeros)
    part, part_g = _xu(
        x_ptr, u_ptr, ug_ptr, rows, ranks, offs_m < M, offs_r < R, s * SPLIT_STEPS, SPLIT_STEPS,
        K, stride_xm, stride_xk, stride_uk, stride_ur,
        GATED, INPUT_PRECISION, INTERPRET, BLOCK_M, BLOCK_K, SPLIT_BLOCK_R,
    )  # fmt: skip
    # 4. store: fp32, unmasked (the workspace is [S·MP, RP], MP = M_TILES·BLOCK_M, RP =
    # BLOCK_R: rows past M and columns past R hold zeros, so launch 2 reads it without masks;
    # gated: Ug's partials in a second workspace of the same shape)
    p_offs = (s * MP + offs_m).to(tl.int64)[:, None] * stride_pm + ranks[None, :] * stride_pr
    tl.store(p_ptr + p_offs, part)
    if GATED:
        tl.store(pg_ptr + p_offs, part_g)


# ==== forward kernel ==============================================================================
@triton.jit
def _lowrank_linear_act_fwd_kernel(
    x_ptr, u_ptr, ug_ptr, p_ptr, pg_ptr, v_ptr, vg_ptr, b_ptr, c_ptr, o_ptr,
    M, N, K, R, MP,
    stride_xm, stride_xk, stride_uk, stride_ur, stride_pm, stride_pr,
    stride_vr, stride_vn, stride_om, stride_on,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    N_TILES: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
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
    # part A, one pass: t = x·U (gated: and tg = x·Ug) over all of K, the rank padded to BLOCK_R
    if SPLIT_K == 0:
        t, tg = _xu(
            x_ptr, u_ptr, ug_ptr, rows, ranks, mask_m, mask_r, 0, tl.cdiv(K, BLOCK_K), K,
            stride_xm, stride_xk, stride_uk, stride_ur,
            GATED, INPUT_PRECISION, INTERPRET, BLOCK_M, BLOCK_K, BLOCK_R,
        )  # fmt: skip
    else:
        # part A, two passes: t = the sum of launch 1's SPLIT_K fp32 partials in the fixed order
        # s = 0..SPLIT_K-1 (deterministic; no mask: launch 1 wrote every row < MP, column < RP)
        t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        tg = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        p_rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        for s in range(0, SPLIT_K):
            # 2. load: partial s of this row block, [BLOCK_M, BLOCK_R] fp32 (gated: and Ug's)
            p_offs = (s * MP + p_rows).to(tl.int64)[:, None] * stride_pm + ranks[
                None, :
            ] * stride_pr
            part = tl.load(p_ptr + p_offs)
            # 3. compute: fp32 sum
            t = t + part
            if GATED:
                part_g = tl.load(pg_ptr + p_offs)
                tg = tg + part_g
    # 3. compute: t (and tg) rounded once to the dtype, the second products' operands
    t = round_to_dtype(t, o_ptr.dtype.element_ty, INTERPRET)
    if INTERPRET:  # the rounded t feeds a dot: upcast again, as after a load
        t = t.to(tl.float32)
    if GATED:
        tg = round_to_dtype(tg, o_ptr.dtype.element_ty, INTERPRET)
        if INTERPRET:
            tg = tg.to(tl.float32)

    # part B: each tile of the panel, out = act(t·V + b) (gated: ⊙ (tg·Vg + c))
    for j in range(0, N_TILES):
        offs_n = (pid_p * N_TILES + j) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        cols = offs_n.to(tl.int64)
        # 2. load: V's [BLOCK_R, BLOCK_N] tile, rows past r and columns past N zero
        v_offs = ranks[:, None] * stride_vr + cols[None, :] * stride_vn
        mask_rn = mask_r[:, None] & mask_n[None, :]
        v = tl.load(v_ptr + v_offs, mask=mask_rn, other=0.0)
        if INTERPRET:
            v = v.to(tl.float32)
        # 3. compute: one dot over the padded rank, then the epilogue, all in fp32
        acc = tl.dot(
            tf32_operand(t, INPUT_PRECISION),
            tf32_operand(v, INPUT_PRECISION),
            input_precision=INPUT_PRECISION,
        )
        if HAS_BIAS:
            b = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc = acc + b[None, :]
        acc = apply_activation(acc, ACTIVATION)
        if GATED:
            # 2. load: Vg's tile (V's strides)
            vg = tl.load(vg_ptr + v_offs, mask=mask_rn, other=0.0)
            if INTERPRET:
                vg = vg.to(tl.float32)
            # 3. compute: the linear branch and the product, in fp32
            g = tl.dot(
                tf32_operand(tg, INPUT_PRECISION),
                tf32_operand(vg, INPUT_PRECISION),
                input_precision=INPUT_PRECISION,
            )
            if HAS_BIAS:
                c = tl.load(c_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                g = g + c[None, :]
            acc = acc * g
        # 4. store: one rounding to the output dtype
        mask_mn = mask_m[:, None] & mask_n[None, :]
        o_ptrs = o_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
        tl.store(o_ptrs, round_to_dtype(acc, o_ptr.dtype.element_ty, INTERPRET), mask=mask_mn)


# ==== launcher ====================================================================================
# Launch records (launch.py): everything but the tensors — the workspace shape, both grids, the
# sizes, strides, split steps and constexprs — is built once per key; a repeated call allocates
# and launches. ug, vg are read with u's and v's strides, b and c are contiguous: none is keyed.
# twin-diff: the JAX twin's jit keeps its trace per static arguments and shapes instead.
def _xu_partials_launch(
    x_shape, x_strides, u_strides, R, gated, config, fp32_precision
) -> tuple[Launch, tuple[int, int]]:
    """`lowrank_xu_partials`' launch for this key (`_PARTIALS`) and the workspace shape
    [S·MP, RP] (fresh, contiguous: strides (RP, 1))."""
    M, K = x_shape
    rp = block_r(R)
    sbr = min(config.split_block_r, rp)
    m_tiles = cdiv(M, config.block_m)
    mp = m_tiles * config.block_m
    splits = config.split_k
    # each split takes cdiv(K steps, S) steps of BLOCK_K; a split past K has none (zeros)
    split_steps = cdiv(cdiv(K, config.block_k), splits)
    r_tiles = rp // sbr
    launch = Launch(
        _lowrank_xu_partial_kernel, (splits * m_tiles * r_tiles,),
        (M, K, R, mp, r_tiles, split_steps, *x_strides, *u_strides, rp, 1),
        dict(
            GATED=gated, INPUT_PRECISION=_input_precision(fp32_precision), INTERPRET=INTERPRET,
            BLOCK_M=config.block_m, BLOCK_K=config.block_k, SPLIT_BLOCK_R=sbr, num_warps=4,
            num_stages=config.num_stages,
        ),
    )  # fmt: skip
    return launch, (splits * mp, rp)


_PARTIALS = LaunchCache(_xu_partials_launch)


def _lowrank_launch(
    x_shape,
    x_strides,
    u_strides,
    v_shape,
    v_strides,
    has_bias,
    gated,
    activation,
    config,
    fp32_precision,
) -> tuple[tuple[Launch, tuple[int, int]] | None, Launch]:
    """`lowrank_linear_act_fwd`'s launches for this key (`_LAUNCHES`): launch 1 and its workspace
    shape (None in one pass), launch 2; out is a fresh contiguous [M, N]."""
    M, K = x_shape
    R, N = v_shape
    mp = cdiv(M, config.block_m) * config.block_m
    partials = None
    p_strides = x_strides  # one pass: launch 2's partials pointers are x's (unused)
    if config.two_pass:
        partials = _xu_partials_launch(
            x_shape, x_strides, u_strides, R, gated, config, fp32_precision
        )
        p_strides = (partials[1][1], 1)  # the workspace: fresh, contiguous
    panel = config.block_n * config.n_tiles
    launch = Launch(
        _lowrank_linear_act_fwd_kernel, (cdiv(M, config.block_m) * cdiv(N, panel),),
        (M, N, K, R, mp, *x_strides, *u_strides, *p_strides, *v_strides, N, 1),
        dict(
            ACTIVATION=activation, HAS_BIAS=has_bias, GATED=gated,
            INPUT_PRECISION=_input_precision(fp32_precision), INTERPRET=INTERPRET,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            BLOCK_R=block_r(R), N_TILES=config.n_tiles, GROUP_M=config.group_m,
            SPLIT_K=config.split_k, num_warps=config.num_warps, num_stages=config.num_stages,
        ),
    )  # fmt: skip
    return partials, launch


_LAUNCHES = LaunchCache(_lowrank_launch)


def _run_partials(
    record: tuple[Launch, tuple[int, int]],
    x: torch.Tensor,
    u: torch.Tensor,
    ug: torch.Tensor,
    gated: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Allocate launch 1's workspaces (gated: two) and launch it."""
    launch, shape = record
    part = torch.empty(shape, device=x.device, dtype=torch.float32)
    part_g = torch.empty_like(part) if gated else part
    launch(x, u, ug, part, part_g)
    return part, part_g


def lowrank_linear_act_fwd(
    x: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    b: torch.Tensor | None,
    *,
    activation: str,
    config: LowRankConfig,
    fp32_precision: str = "ieee",
    gate: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Launch on a 2-D x [M, K] (any strides), u [K, r], v [r, N]; returns [M, N] in x.dtype.
    One kernel (config.split_k = 0) or two (the fp32 partials of x·U, then the panel kernel).
    `gate` = (ug, vg, c): the gated layer act(x·u·v + b) ⊙ (x·ug·vg + c), ug and vg with u's
    and v's strides. Trusts its input (1 ≤ r ≤ MAX_RANK)."""
    M = x.shape[0]
    N = v.shape[1]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return out
    gated = gate is not None
    partials, launch = _LAUNCHES.get((
        x.shape, x.stride(), u.stride(), v.shape, v.stride(), b is not None, gated, activation,
        config, fp32_precision,
    ))  # fmt: skip
    ug, vg, c = gate if gated else (u, v, None)
    part = part_g = x  # one pass: launch 2's partials pointers are unused (any tensor serves)
    if partials is not None:
        part, part_g = _run_partials(partials, x, u, ug, gated)
    launch(x, u, ug, part, part_g, v, vg, b, c, out)
    return out


def lowrank_xu_partials(
    x: torch.Tensor,
    u: torch.Tensor,
    *,
    config: LowRankConfig,
    fp32_precision: str = "ieee",
    ug: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch 1 of the two-pass path: fp32 partials of x [M, K] · u [K, r], K split
    config.split_k ways: [S·MP, RP] (MP = M rounded up to BLOCK_M, RP = block_r(r); partial s in
    rows [s·MP, (s+1)·MP); rows past M and columns past r zeros), and with `ug` (u's strides) the
    same of x·ug (else the first again). Trusts its input."""
    gated = ug is not None
    record = _PARTIALS.get(
        (x.shape, x.stride(), u.stride(), u.shape[1], gated, config, fp32_precision)
    )
    return _run_partials(record, x, u, ug if gated else u, gated)


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


def lowrank_gated_linear_act(
    x: torch.Tensor,
    uw: torch.Tensor,
    vw: torch.Tensor,
    uv: torch.Tensor,
    vv: torch.Tensor,
    b: torch.Tensor | None = None,
    c: torch.Tensor | None = None,
    *,
    activation: str = "silu",
    config: LowRankConfig | None = None,
    fp32_precision: str = "ieee",
) -> torch.Tensor:
    """act((x @ uw) @ vw + b) ⊙ ((x @ uv) @ vv + c) for x [..., K], uw and uv [K, r], vw and vv
    [r, N], b and c [N] (both or neither); `activation` is the gate's function (silu: SwiGLU,
    gelu: GeGLU); 1 ≤ r ≤ 256. Both rank-r intermediates come from the same x tiles."""
    dtype, K, R, N = check_lowrank_gated_layer(
        ADAPTER,
        x,
        uw,
        vw,
        uv,
        vv,
        b,
        c,
        activation=activation,
        config=config,
        fp32_precision=fp32_precision,
    )
    # twin-diff: the device check, contiguous biases, and contiguous factors (the kernels read
    # uv and vv with uw's and vw's strides; a no-op for weights as stored) are torch's.
    check_kernel_device(x)
    uw, uv, vw, vv = (a.contiguous() for a in (uw, uv, vw, vv))
    b = b.contiguous() if b is not None else None
    c = c.contiguous() if c is not None else None
    lead = list(x.shape[:-1])
    x2d = x.reshape(-1, K)
    M = x2d.shape[0]
    if config is None:
        config = lowrank_config(M, N, K, R, dtype, interpret=INTERPRET, gated=True)
    out = lowrank_linear_act_fwd(
        x2d,
        uw,
        vw,
        b,
        activation=activation,
        config=config,
        fp32_precision=fp32_precision,
        gate=(uv, vv, c),
    )
    return out.reshape(*lead, N)
