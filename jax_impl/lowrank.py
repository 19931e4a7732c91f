"""lowrank_linear_act: out = act((x·U)·V + b), a factorised layer in one or two Pallas-Triton
launches; lowrank_gated_linear_act: act((x·Uw)·Vw + b) ⊙ ((x·Uv)·Vv + c), the gated form.

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

Two passes (config.split_k = S > 0): launch 1 (`_lowrank_xu_partial_kernel`, its own
pallas_call) writes the fp32 partials of t, one [BLOCK_M, SPLIT_BLOCK_R] block per (K split, row
block, rank tile), placed by its output BlockSpec; launch 2 is the panel kernel with part A
replaced by the fixed-order sum of the S partials (the workspace is one whole-array block; each
program slices its rows with `pl.ds`). Gated: t and tg from the same x tile, two workspaces.

The cost model, the two-pass path and the choice of tiles for M = 16 and M = 8192:
torch_impl/lowrank.py's docstring (one heuristic, `common.lowrank.lowrank_config`, for both
twins). Measured on the H200 (commit 0ec778c, device time, llama3-8b's layer, bf16, silu,
r = 64 / 128 / 256): M = 8192 (one pass) 269 / 296 / 427 µs vs XLA's 239 / 254 / 287, M = 16
8.8 / 11.9 / 13.4 vs 9.7 / 10.7 / 12.1 — the front runs plain layers at large M as two GEMMs
(common/lowrank_spec.py `layer_run`; past 64 rows the fused kernel only where x·U is split).

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

from fusedmlp.common.lowrank import (
    LowRankConfig,
    block_r,
    check_lowrank_gated_layer,
    check_lowrank_layer,
    lowrank_config,
)

from . import compat
from .activations import apply_activation, round_to_dtype
from .front import ADAPTER
from .linear_act import _grouped_tile, _precision
from .tf32 import tf32_operand


# ==== part A: t = x·U over a range of K steps (both paths) ========================================
def _xu(
    x_ref, u_ref, ug_ref, mask_m, mask_r, k_first, k_steps, K,
    GATED, PRECISION, INTERPRET,
    BLOCK_M, BLOCK_K, BLOCK_R,
):  # fmt: skip
    """fp32 Σ over K steps k_first..k_first+k_steps-1 of x[rows, k]·U[k, ranks], masked on M (or
    r) and on K's ragged tail (zeros outside). Gated: the same for Ug, from the same x tile;
    returns (t, tg) (tg zeros when not gated)."""
    # twin-diff: the refs are this program's row panel of x and rank columns of U (BlockSpecs).

    def body(k, carry):
        t, tg = carry
        # 2. load: masked on M (or r) and on the ragged K tail, zeros outside
        offs_k = k * BLOCK_K + jnp.arange(BLOCK_K)
        mask_k = offs_k < K
        mask_kr = mask_k[:, None] & mask_r[None, :]
        x = plgpu.load(
            x_ref.at[:, pl.ds(k * BLOCK_K, BLOCK_K)],
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        u = plgpu.load(u_ref.at[pl.ds(k * BLOCK_K, BLOCK_K), :], mask=mask_kr, other=0.0)
        if INTERPRET:  # interpreter only: keeps the twin's arithmetic (see module docstring)
            x = x.astype(jnp.float32)
            u = u.astype(jnp.float32)
        # 3. compute: fp32 accumulate
        t = t + jax.lax.dot(
            tf32_operand(x, PRECISION),
            tf32_operand(u, PRECISION),
            precision=PRECISION,
            preferred_element_type=jnp.float32,
        )
        if GATED:  # one x tile feeds both products
            ug = plgpu.load(ug_ref.at[pl.ds(k * BLOCK_K, BLOCK_K), :], mask=mask_kr, other=0.0)
            if INTERPRET:
                ug = ug.astype(jnp.float32)
            tg = tg + jax.lax.dot(
                tf32_operand(x, PRECISION),
                tf32_operand(ug, PRECISION),
                precision=PRECISION,
                preferred_element_type=jnp.float32,
            )
        return t, tg

    t = jnp.zeros((BLOCK_M, BLOCK_R), dtype=jnp.float32)
    # twin-diff: tg is carried only when gated (Triton drops the unused zeros itself).
    tg = jnp.zeros((BLOCK_M, BLOCK_R), dtype=jnp.float32) if GATED else None
    return jax.lax.fori_loop(k_first, k_first + k_steps, body, (t, tg))


# ==== two passes, launch 1: fp32 partials of t = x·U, K split S ways ==============================
def _lowrank_xu_partial_kernel(
    x_ref, u_ref, ug_ref, p_ref, pg_ref,
    *, M, K, R, MP, R_TILES, SPLIT_STEPS,
    GATED, PRECISION, INTERPRET,
    BLOCK_M, BLOCK_K, SPLIT_BLOCK_R,
):  # fmt: skip
    # 1. program -> tile: (K split s, row block, rank tile), rank tiles fastest (they share x)
    pid = pl.program_id(0)
    m_tiles = MP // BLOCK_M
    pid_r = pid % R_TILES
    pid_m = (pid // R_TILES) % m_tiles
    s = pid // (R_TILES * m_tiles)
    offs_m = pid_m * BLOCK_M + jnp.arange(BLOCK_M)
    offs_r = pid_r * SPLIT_BLOCK_R + jnp.arange(SPLIT_BLOCK_R)
    # 2. load / 3. compute: this split's SPLIT_STEPS K steps (past K: none, the partial is zeros)
    part, part_g = _xu(
        x_ref, u_ref, ug_ref, offs_m < M, offs_r < R, s * SPLIT_STEPS, SPLIT_STEPS, K,
        GATED, PRECISION, INTERPRET, BLOCK_M, BLOCK_K, SPLIT_BLOCK_R,
    )  # fmt: skip
    # 4. store: fp32, unmasked (the workspace is [S·MP, RP], MP = M_TILES·BLOCK_M, RP =
    # BLOCK_R: rows past M and columns past R hold zeros, so launch 2 reads it without masks;
    # gated: Ug's partials in a second workspace of the same shape)
    # twin-diff: the output BlockSpecs place the [BLOCK_M, SPLIT_BLOCK_R] tile at
    # (s·m_tiles + pid_m, pid_r).
    p_ref[...] = part
    if GATED:
        pg_ref[...] = part_g


# ==== forward kernel ==============================================================================
def _lowrank_linear_act_fwd_kernel(
    x_ref, u_ref, ug_ref, p_ref, pg_ref, v_ref, vg_ref, b_ref, c_ref, o_ref,
    *, M, N, K, R, MP,
    ACTIVATION, GATED, PRECISION, INTERPRET,
    BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R,
    N_TILES, GROUP_M, SPLIT_K,
):  # fmt: skip
    # twin-diff: strides and HAS_BIAS are implied by the refs (an absent b_ref is None; one pass
    # has no p_ref, two passes no x_ref and u_ref; not gated: no ug_ref, vg_ref, c_ref).
    # 1. program -> tile: a row block and a panel of N_TILES output tiles
    PANEL_N = BLOCK_N * N_TILES
    pid_m, pid_p = _grouped_tile(pl.program_id(0), M, N, BLOCK_M, PANEL_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + jnp.arange(BLOCK_M)
    offs_r = jnp.arange(BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    # twin-diff: no pointers; the refs are already this program's panels (BlockSpecs).
    # part A, one pass: t = x·U (gated: and tg = x·Ug) over all of K, the rank padded to BLOCK_R
    if SPLIT_K == 0:
        t, tg = _xu(
            x_ref, u_ref, ug_ref, mask_m, mask_r, 0, pl.cdiv(K, BLOCK_K), K,
            GATED, PRECISION, INTERPRET, BLOCK_M, BLOCK_K, BLOCK_R,
        )  # fmt: skip
    else:
        # part A, two passes: t = the sum of launch 1's SPLIT_K fp32 partials in the fixed order
        # s = 0..SPLIT_K-1 (deterministic; no mask: launch 1 wrote every row < MP, column < RP)
        def add(s, carry):
            t, tg = carry
            # 2. load: partial s of this row block, [BLOCK_M, BLOCK_R] fp32 (gated: and Ug's)
            rows = pl.ds(s * MP + pid_m * BLOCK_M, BLOCK_M)
            part = p_ref[rows, :]
            # 3. compute: fp32 sum
            t = t + part
            if GATED:
                part_g = pg_ref[rows, :]
                tg = tg + part_g
            return t, tg

        t = jnp.zeros((BLOCK_M, BLOCK_R), dtype=jnp.float32)
        tg = jnp.zeros((BLOCK_M, BLOCK_R), dtype=jnp.float32) if GATED else None
        t, tg = jax.lax.fori_loop(0, SPLIT_K, add, (t, tg))
    # 3. compute: t (and tg) rounded once to the dtype, the second products' operands
    t = round_to_dtype(t, o_ref.dtype, INTERPRET)
    if INTERPRET:  # the rounded t feeds a dot: upcast again, as after a load
        t = t.astype(jnp.float32)
    if GATED:
        tg = round_to_dtype(tg, o_ref.dtype, INTERPRET)
        if INTERPRET:
            tg = tg.astype(jnp.float32)

    # part B: each tile of the panel, out = act(t·V + b) (gated: ⊙ (tg·Vg + c))
    def tile(j, carry):
        offs_n = (pid_p * N_TILES + j) * BLOCK_N + jnp.arange(BLOCK_N)
        mask_n = offs_n < N
        # 2. load: V's [BLOCK_R, BLOCK_N] tile, rows past r and columns past N zero
        cols = pl.ds(j * BLOCK_N, BLOCK_N)
        mask_rn = mask_r[:, None] & mask_n[None, :]
        v = plgpu.load(v_ref.at[:, cols], mask=mask_rn, other=0.0)
        if INTERPRET:
            v = v.astype(jnp.float32)
        # 3. compute: one dot over the padded rank, then the epilogue, all in fp32
        acc = jax.lax.dot(
            tf32_operand(t, PRECISION),
            tf32_operand(v, PRECISION),
            precision=PRECISION,
            preferred_element_type=jnp.float32,
        )
        if b_ref is not None:
            b = plgpu.load(b_ref.at[cols], mask=mask_n, other=0.0)
            acc = acc + b.astype(jnp.float32)[None, :]
        acc = apply_activation(acc, ACTIVATION)
        if GATED:
            # 2. load: Vg's tile (V's strides)
            vg = plgpu.load(vg_ref.at[:, cols], mask=mask_rn, other=0.0)
            if INTERPRET:
                vg = vg.astype(jnp.float32)
            # 3. compute: the linear branch and the product, in fp32
            g = jax.lax.dot(
                tf32_operand(tg, PRECISION),
                tf32_operand(vg, PRECISION),
                precision=PRECISION,
                preferred_element_type=jnp.float32,
            )
            if c_ref is not None:
                c = plgpu.load(c_ref.at[cols], mask=mask_n, other=0.0)
                g = g + c.astype(jnp.float32)[None, :]
            acc = acc * g
        # 4. store: one rounding to the output dtype
        mask_mn = mask_m[:, None] & mask_n[None, :]
        plgpu.store(o_ref.at[:, cols], round_to_dtype(acc, o_ref.dtype, INTERPRET), mask=mask_mn)
        return carry

    jax.lax.fori_loop(0, N_TILES, tile, 0)


# ==== launcher ====================================================================================
def _specs(M: int, N: int, K: int, R: int, config: LowRankConfig):
    """BlockSpecs of x's row panel, all of U, the partials (all of them), the V panel, b's slice
    and the output panel."""
    panel = config.block_n * config.n_tiles
    br = block_r(R)
    mp = pl.cdiv(M, config.block_m) * config.block_m
    tile = functools.partial(
        _grouped_tile, M=M, N=N, BLOCK_M=config.block_m, BLOCK_N=panel, GROUP_M=config.group_m
    )

    def x_map(pid):
        return tile(pid)[0], 0

    def whole(pid):
        return 0, 0

    def v_map(pid):
        return 0, tile(pid)[1]

    def b_map(pid):
        return (tile(pid)[1],)

    x_spec = pl.BlockSpec((config.block_m, K), x_map)
    u_spec = pl.BlockSpec((K, br), whole)
    p_spec = pl.BlockSpec((max(config.split_k, 1) * mp, br), whole)
    v_spec = pl.BlockSpec((br, panel), v_map)
    b_spec = pl.BlockSpec((panel,), b_map)
    o_spec = pl.BlockSpec((config.block_m, panel), tile)
    return x_spec, u_spec, p_spec, v_spec, b_spec, o_spec


_STATICS = ("activation", "config", "fp32_precision", "interpret")


def _xu_partials(x, u, ug, *, config, fp32_precision, interpret):
    """Launch 1 of the two-pass path (traced inside the jitted forward): see
    lowrank_xu_partials."""
    M, K = x.shape
    R = u.shape[1]
    br = block_r(R)
    sbr = min(config.split_block_r, br)
    m_tiles = pl.cdiv(M, config.block_m)
    mp = m_tiles * config.block_m
    splits = config.split_k
    split_steps = pl.cdiv(pl.cdiv(K, config.block_k), splits)
    r_tiles = br // sbr

    def unpack(pid):  # the kernel's program -> tile, for the BlockSpecs
        return (pid // (r_tiles * m_tiles), (pid // r_tiles) % m_tiles, pid % r_tiles)

    def x_map(pid):
        return unpack(pid)[1], 0

    def u_map(pid):
        return 0, unpack(pid)[2]

    def p_map(pid):
        s, pid_m, pid_r = unpack(pid)
        return s * m_tiles + pid_m, pid_r

    gated = ug is not None
    kernel = functools.partial(
        _lowrank_xu_partial_kernel, M=M, K=K, R=R, MP=mp, R_TILES=r_tiles,
        SPLIT_STEPS=split_steps, GATED=gated, PRECISION=_precision(fp32_precision),
        INTERPRET=interpret, BLOCK_M=config.block_m, BLOCK_K=config.block_k, SPLIT_BLOCK_R=sbr,
    )  # fmt: skip
    u_spec = pl.BlockSpec((K, sbr), u_map)
    p_spec = pl.BlockSpec((config.block_m, sbr), p_map)
    p_shape = jax.ShapeDtypeStruct((splits * mp, br), jnp.float32)
    # twin-diff: not gated, one output and no pg_ref (Triton passes the first workspace again).
    if not gated:

        def one(x_ref, u_ref, p_ref):
            kernel(x_ref, u_ref, None, p_ref, None)

        call, out_shape, out_specs, args = one, p_shape, p_spec, (x, u)
    else:
        call, out_shape, out_specs, args = kernel, (p_shape, p_shape), (p_spec, p_spec), (x, u, ug)
    out = pl.pallas_call(
        call,
        out_shape=out_shape,
        grid=(splits * m_tiles * r_tiles,),
        in_specs=[pl.BlockSpec((config.block_m, K), x_map), u_spec] + ([u_spec] if gated else []),
        out_specs=out_specs,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=config.num_stages),
        interpret=interpret,
        name="lowrank_xu_partials",
    )(*args)
    return out if gated else (out, out)


@functools.partial(jax.jit, static_argnames=_STATICS[1:])
def _lowrank_xu_partials_jit(x, u, ug, *, config, fp32_precision, interpret):
    return _xu_partials(x, u, ug, config=config, fp32_precision=fp32_precision, interpret=interpret)


@functools.partial(jax.jit, static_argnames=_STATICS)
def _lowrank_linear_act_fwd_jit(x, u, v, b, gate, *, activation, config, fp32_precision, interpret):
    M, K = x.shape
    R, N = v.shape
    if M == 0 or N == 0:
        return jnp.zeros((M, N), dtype=x.dtype)
    ug, vg, c = gate if gate is not None else (None, None, None)
    mp = pl.cdiv(M, config.block_m) * config.block_m
    # twin-diff: one pass passes no partials, two passes no x, U and Ug; not gated no Ug, Vg, c
    # (None refs, no operands).
    part = part_g = None
    if config.two_pass:
        part, part_g = _xu_partials(
            x, u, ug, config=config, fp32_precision=fp32_precision, interpret=interpret
        )
        if gate is None:
            part_g = None
        x = u = ug = None
    panel = config.block_n * config.n_tiles
    grid = (pl.cdiv(M, config.block_m) * pl.cdiv(N, panel),)
    x_spec, u_spec, p_spec, v_spec, b_spec, o_spec = _specs(M, N, K, R, config)
    kernel = functools.partial(
        _lowrank_linear_act_fwd_kernel, M=M, N=N, K=K, R=R, MP=mp,
        ACTIVATION=activation, GATED=gate is not None, PRECISION=_precision(fp32_precision),
        INTERPRET=interpret,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        BLOCK_R=block_r(R), N_TILES=config.n_tiles, GROUP_M=config.group_m,
        SPLIT_K=config.split_k,
    )  # fmt: skip
    operands = (x, u, ug, part, part_g, v, vg, b, c)
    specs = (x_spec, u_spec, u_spec, p_spec, p_spec, v_spec, v_spec, b_spec, b_spec)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((M, N), v.dtype),
        grid=grid,
        in_specs=[sp if a is not None else None for a, sp in zip(operands, specs, strict=True)],
        out_specs=o_spec,
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        name="lowrank_linear_act_fwd",
    )(*operands)


def lowrank_linear_act_fwd(
    x: jax.Array,
    u: jax.Array,
    v: jax.Array,
    b: jax.Array | None,
    *,
    activation: str,
    config: LowRankConfig,
    fp32_precision: str = "ieee",
    gate: tuple[jax.Array, jax.Array, jax.Array | None] | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Launch on a 2-D x [M, K], u [K, r], v [r, N]; returns [M, N] in x.dtype. One kernel
    (config.split_k = 0) or two (the fp32 partials of x·U, then the panel kernel). `gate` =
    (ug, vg, c): the gated layer act(x·u·v + b) ⊙ (x·ug·vg + c). Trusts its input
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
            gate,
            activation=activation,
            config=config,
            fp32_precision=fp32_precision,
            interpret=interpret,
        )


def lowrank_xu_partials(
    x: jax.Array,
    u: jax.Array,
    *,
    config: LowRankConfig,
    fp32_precision: str = "ieee",
    ug: jax.Array | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Launch 1 of the two-pass path: fp32 partials of x [M, K] · u [K, r], K split
    config.split_k ways: [S·MP, RP] (MP = M rounded up to BLOCK_M, RP = block_r(r); partial s in
    rows [s·MP, (s+1)·MP); rows past M and columns past r zeros), and with `ug` the same of x·ug
    (else the first again). Trusts its input."""
    if interpret is None:
        interpret = compat.interpret_mode()
    with compat.quiet_pallas_triton():
        return _lowrank_xu_partials_jit(
            x, u, ug, config=config, fp32_precision=fp32_precision, interpret=interpret
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


def lowrank_gated_linear_act(
    x: jax.Array,
    uw: jax.Array,
    vw: jax.Array,
    uv: jax.Array,
    vv: jax.Array,
    b: jax.Array | None = None,
    c: jax.Array | None = None,
    *,
    activation: str = "silu",
    config: LowRankConfig | None = None,
    fp32_precision: str = "ieee",
    interpret: bool | None = None,
) -> jax.Array:
    """act((x @ uw) @ vw + b) ⊙ ((x @ uv) @ vv + c) for x [..., K], uw and uv [K, r], vw and vv
    [r, N], b and c [N] (both or neither); `activation` is the gate's function (silu: SwiGLU,
    gelu: GeGLU); 1 ≤ r ≤ 256. Both rank-r intermediates come from the same x tiles.
    `interpret`: run under Pallas' interpreter (None: where there is no GPU)."""
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
    # twin-diff: no device check and no contiguous() (jax arrays are); `interpret` is a call's
    # choice here, a process's (TRITON_INTERPRET) in the Triton twin.
    interpret = compat.interpret_mode() if interpret is None else interpret
    lead = list(x.shape[:-1])
    x2d = x.reshape(-1, K)
    M = x2d.shape[0]
    if config is None:
        config = lowrank_config(M, N, K, R, dtype, interpret=interpret, gated=True)
    out = lowrank_linear_act_fwd(
        x2d,
        uw,
        vw,
        b,
        activation=activation,
        config=config,
        fp32_precision=fp32_precision,
        gate=(uv, vv, c),
        interpret=interpret,
    )
    return out.reshape(*lead, N)
