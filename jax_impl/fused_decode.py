"""fused_decode: the whole 2-layer MLP for small M (1..64), weights streamed once at full bandwidth.

    h = round(act(x·W + b) [⊙ (x·V + c)])                  [M, hidden]    launch 1 (up)
    p_s = h[:, K_s]·W2[K_s, :]                              [M, d_out]     launch 2 (down), s < S
    y = round(p_0 + p_1 + ... + p_{S-1} + b2)               [M, d_out]     launch 3 (reduce), S > 1

At decode batch sizes an MLP is a weight-streaming problem: llama3-8b's MLP (4096 -> 14336 -> 4096
SwiGLU, bf16) reads 352 MB of weights for 16 rows of x; at the H200's measured copy rate of 4.24
TB/s that is 83 us, the floor. Everything else (x, h, y, partials) is under 3 % of those bytes, and
the matrix work is small, so the time is set by how close the weight stream comes to the bandwidth
of HBM — and by the seams between the launches.

Launch 1, grid (cdiv(hidden, BLOCK_H),): program j owns hidden columns [j·BLOCK_H, (j+1)·BLOCK_H)
and streams the first layer's weights over d_in in BLOCK_K rows. Gated layers come PACKED
(common/packing.py: `wv0` [d_in, 2·Np], gate and up interleaved in 64-column blocks): BLOCK_H
divides 64, so each program reads one contiguous gate run and the up run right after it, runs one
dot on each with the same x tile, adds `bc0`, applies act(gate)·up in fp32, rounds to the dtype and
stores its slice of h (only the M real rows).

Launch 2, grid (cdiv(d_out, BLOCK_N), S): program (n, s) owns output columns [n·BLOCK_N,
(n+1)·BLOCK_N) and the s-th of S equal runs of the hidden (K_ITERS chunks of BLOCK_K2). S = 1: it
adds b2 and stores y itself. S > 1: it stores its fp32 partial p_s, and launch 3 sums the S
partials of each output tile in the fixed order s = 0, 1, ..., adds b2, rounds once and stores y.

Row blocks: every program holds all M rows (block_m = M padded) unless a pinned config asks for a
smaller block_m; then each launch's grid has cdiv(M, block_m) row blocks as its fastest index, so
the programs that stream one weight tile run side by side and the tile should come from HBM once
(bench/decode_rows_probe.py asks whether two 32-row blocks beat one 64-row block at M = 64).

Deterministic by construction: no atomics, every sum in a fixed order. No memset, no repack: h and
the partials are outputs of the launch that writes them, fully overwritten where read. The three
`pallas_call`s are one jitted computation: XLA enqueues them back to back (no host in between);
time it as a jitted call (bench/sweep_decode.py loops it over rotating inputs).

Refs are whole arrays addressed with `pl.ds` and masks, as the twin's pointers are: on the GPU the
Pallas-Triton lowering does not mask blocks that overhang an array, and in interpret mode a masked
`pl.ds` load pads instead of shifting the window. The bandwidth reasoning and the predicted times
are the twin's (torch_impl/fused_decode.py); `DecodeConfig` (common/tiling.py) is read by both.

Twin: torch_impl/fused_decode.py (Triton, same names, sections and launches).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from fusedmlp.common.config import TileConfig
from fusedmlp.common.packing import PACK_BLOCK
from fusedmlp.common.registry import FALLBACK
from fusedmlp.common.spec import MLPSpec
from fusedmlp.common.tiling import (
    DecodeConfig,
    decode_config_for,
    decode_splits,
)
from fusedmlp.common.validate import check_packed_call

from .activations import apply_activation, round_to_dtype
from .compat import interpret_mode, quiet_pallas_triton
from .front import ADAPTER, STACK
from .fused_small import dot_precision
from .tf32 import tf32_operand

MAX_M = 64
# Launch 3's tile: 16 rows x 32 output columns a program (llama3-8b: 128 programs at M <= 16, 512
# at M = 64). Its rows and columns are independent of launches 1-2's blocks (each sum is the same
# fixed order, s = 0, 1, ...: the same bits). H200 (bench/decode_launch_probe.py at 30bbe30):
# with the whole padded M a program, 64 programs summed 8 partials of [64, 64] in 4.6 µs torch /
# 7.2 µs JAX at M = 64 (8.4 MB from L2 at 1.2-1.8 TB/s) against 1.1-1.4 µs at M <= 16.
# twin-diff: 32 columns here, 64 in torch — at da89ed7 (results 2026-12-04-h200-da89ed7), this
# launch with 32 / 64 / 128 columns: hf-blog-geglu M = 1 1.68 / 2.86 / 3.57 µs, M = 16 1.84 /
# 3.46 / 6.91, llama3-8b M = 2 / 16 / 64 1.09 / 1.28 / 1.31, 1.25 / 1.44 / 1.78, 2.46 / 2.82 /
# 4.03; the Triton twin's best was 64 (hf-blog 1.47 against 2.14 at 32): Pallas-Triton's code for
# the wider masked tile is the slower one (not examined).
REDUCE_BLOCK_M = 16
REDUCE_BLOCK_N = 32


# ---- forward kernels -----------------------------------------------------------------------------
def _k_slab(a_ref, w_ref, row0, row_ok, k, k_ok, col0, col_ok, INTERPRET):
    """One K step's operands: the activation tile (x or h: the rows × K run k) and the weight tile
    (K run k × the columns from col0; read once per call: evict first)."""
    # twin-diff: ref windows of the masks' sizes where the twin adds row and column offsets
    block_m, block_k, block_n = row_ok.shape[0], k_ok.shape[0], col_ok.shape[0]
    a = plgpu.load(
        a_ref.at[pl.ds(row0, block_m), pl.ds(k, block_k)],
        mask=row_ok[:, None] & k_ok[None, :],
        other=0.0,
    )
    w = plgpu.load(
        w_ref.at[pl.ds(k, block_k), pl.ds(col0, block_n)],
        mask=k_ok[:, None] & col_ok[None, :],
        other=0.0,
        eviction_policy="evict_first",
    )
    if INTERPRET:
        a = a.astype(jnp.float32)  # the twin's arithmetic: fp32 tiles under its interpreter
        w = w.astype(jnp.float32)
    return a, w


def _fused_decode_up_kernel(
    x_ref, w_ref, b_ref, h_ref,
    *, M, D_IN, HIDDEN,
    ACTIVATION, GATED, HAS_BIAS, PACK, BLOCK_M, M_BLOCKS, BLOCK_H, BLOCK_K, DOT_PRECISION,
    INTERPRET,
):  # fmt: skip
    # 1. program -> tile: row block pid_m (row blocks fastest: the programs that stream the same
    # weight tile run side by side, so the tile comes from HBM once), hidden columns
    # [pid·BLOCK_H, (pid+1)·BLOCK_H)
    pid = pl.program_id(0) // M_BLOCKS  # M_BLOCKS = cdiv(M, BLOCK_M): a constant, 1 by default
    row0 = (pl.program_id(0) % M_BLOCKS) * BLOCK_M
    rows = row0 + jnp.arange(BLOCK_M)
    row_ok = rows < M
    cols_h = pid * BLOCK_H + jnp.arange(BLOCK_H)
    h_ok = cols_h < HIDDEN
    if GATED:
        # packed: hidden column c is operand column 2·PACK·(c // PACK) + c % PACK (gate) and that
        # + PACK (up); BLOCK_H divides PACK, so this tile's gate and up runs are contiguous
        per_pack = PACK // BLOCK_H
        col0 = (pid // per_pack) * (2 * PACK) + (pid % per_pack) * BLOCK_H
    else:
        col0 = pid * BLOCK_H
    offs_k = jnp.arange(BLOCK_K)
    dtype = h_ref.dtype
    # twin-diff: no programmatic dependent launch in Pallas (the launches are enqueued by XLA)

    # 2. load + 3. compute: stream the weights over d_in; x is the same small tile for every program
    def k_step(i, carry):
        acc_z, acc_g = carry
        k = i * BLOCK_K
        kk = k + offs_k
        k_ok = kk < D_IN
        x, w = _k_slab(x_ref, w_ref, row0, row_ok, k, k_ok, col0, h_ok, INTERPRET)
        acc_z = acc_z + plgpu.dot(
            tf32_operand(x, DOT_PRECISION), tf32_operand(w, DOT_PRECISION), precision=DOT_PRECISION
        )
        if GATED:
            v = plgpu.load(
                w_ref.at[pl.ds(k, BLOCK_K), pl.ds(col0 + PACK, BLOCK_H)],
                mask=k_ok[:, None] & h_ok[None, :],
                other=0.0,
                eviction_policy="evict_first",
            )
            if INTERPRET:
                v = v.astype(jnp.float32)
            acc_g = acc_g + plgpu.dot(
                tf32_operand(x, DOT_PRECISION),
                tf32_operand(v, DOT_PRECISION),
                precision=DOT_PRECISION,
            )
        return acc_z, acc_g

    acc_z = jnp.zeros((BLOCK_M, BLOCK_H), jnp.float32)
    acc_g = jnp.zeros((BLOCK_M, BLOCK_H), jnp.float32)
    acc_z, acc_g = jax.lax.fori_loop(0, pl.cdiv(D_IN, BLOCK_K), k_step, (acc_z, acc_g))

    # 3. compute: bias, activation, gate in fp32; padded hidden lanes are never stored
    z = acc_z
    if HAS_BIAS:
        z += plgpu.load(b_ref.at[pl.ds(col0, BLOCK_H)], mask=h_ok, other=0.0).astype(jnp.float32)[
            None, :
        ]
    z = apply_activation(z, ACTIVATION)
    if GATED:
        g = acc_g
        if HAS_BIAS:
            g += plgpu.load(b_ref.at[pl.ds(col0 + PACK, BLOCK_H)], mask=h_ok, other=0.0).astype(
                jnp.float32
            )[None, :]
        z = z * g
    h = round_to_dtype(z, dtype, INTERPRET)  # what a per-layer kernel's store would hold

    # 4. store: the M real rows of this hidden slice
    plgpu.store(
        h_ref.at[pl.ds(row0, BLOCK_M), pl.ds(pid * BLOCK_H, BLOCK_H)],
        h,
        mask=row_ok[:, None] & h_ok[None, :],
    )


def _fused_decode_down_kernel(
    h_ref, w_ref, b_ref, out_ref,
    *, M, HIDDEN, D_OUT,
    HAS_BIAS, BLOCK_M, M_BLOCKS, BLOCK_N, BLOCK_K, K_ITERS, SPLIT_K, DOT_PRECISION, INTERPRET,
):  # fmt: skip
    # 1. program -> tile: row block (fastest, as in launch 1), output columns of tile n, run s
    pid_n = pl.program_id(0) // M_BLOCKS
    pid_s = pl.program_id(1)
    row0 = (pl.program_id(0) % M_BLOCKS) * BLOCK_M
    rows = row0 + jnp.arange(BLOCK_M)
    row_ok = rows < M
    cols_n = pid_n * BLOCK_N + jnp.arange(BLOCK_N)
    n_ok = cols_n < D_OUT
    k_lo = pid_s * (K_ITERS * BLOCK_K)
    offs_k = jnp.arange(BLOCK_K)
    dtype = w_ref.dtype

    # 2. load + 3. compute: stream W2[run s, tile n]; h comes from L2
    def k_step(i, acc):
        k = k_lo + i * BLOCK_K
        kk = k + offs_k
        k_ok = kk < HIDDEN
        h, w = _k_slab(h_ref, w_ref, row0, row_ok, k, k_ok, pid_n * BLOCK_N, n_ok, INTERPRET)
        return acc + plgpu.dot(
            tf32_operand(h, DOT_PRECISION), tf32_operand(w, DOT_PRECISION), precision=DOT_PRECISION
        )

    acc = jax.lax.fori_loop(0, K_ITERS, k_step, jnp.zeros((BLOCK_M, BLOCK_N), jnp.float32))

    # 4. store: y itself (one run), or this run's fp32 partial for launch 3
    mask = row_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        # 3. compute: the bias and the one rounding of y
        if HAS_BIAS:
            acc += plgpu.load(
                b_ref.at[pl.ds(pid_n * BLOCK_N, BLOCK_N)], mask=n_ok, other=0.0
            ).astype(jnp.float32)[None, :]
        y = round_to_dtype(acc, dtype, INTERPRET)
        plgpu.store(out_ref.at[pl.ds(row0, BLOCK_M), pl.ds(pid_n * BLOCK_N, BLOCK_N)], y, mask=mask)
    else:
        plgpu.store(
            out_ref.at[pid_s, pl.ds(row0, BLOCK_M), pl.ds(pid_n * BLOCK_N, BLOCK_N)], acc, mask=mask
        )


def _fused_decode_reduce_kernel(
    ws_ref, b_ref, y_ref,
    *, M, D_OUT,
    HAS_BIAS, BLOCK_M, M_BLOCKS, BLOCK_N, SPLIT_K, INTERPRET,
):  # fmt: skip
    # twin-diff: no USE_PDL (see launch 1)
    # 1. program -> tile: row block (fastest, as in launch 1), output columns of tile n
    pid = pl.program_id(0) // M_BLOCKS
    row0 = (pl.program_id(0) % M_BLOCKS) * BLOCK_M
    rows = row0 + jnp.arange(BLOCK_M)
    cols_n = pid * BLOCK_N + jnp.arange(BLOCK_N)
    n_ok = cols_n < D_OUT
    mask = (rows < M)[:, None] & n_ok[None, :]
    dtype = y_ref.dtype

    # 2. load + 3. compute: the partials in the fixed order s = 0, 1, ...: the same bits every run
    acc = jnp.zeros((BLOCK_M, BLOCK_N), jnp.float32)
    for s in range(SPLIT_K):
        # twin-diff: a static index into a ref must be an array scalar in the interpreter
        partial = ws_ref.at[jnp.int32(s), pl.ds(row0, BLOCK_M), pl.ds(pid * BLOCK_N, BLOCK_N)]
        acc += plgpu.load(partial, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += plgpu.load(b_ref.at[pl.ds(pid * BLOCK_N, BLOCK_N)], mask=n_ok, other=0.0).astype(
            jnp.float32
        )[None, :]
    y = round_to_dtype(acc, dtype, INTERPRET)

    # 4. store
    plgpu.store(y_ref.at[pl.ds(row0, BLOCK_M), pl.ds(pid * BLOCK_N, BLOCK_N)], y, mask=mask)


# ---- launcher ------------------------------------------------------------------------------------
def supports(spec: MLPSpec, m: int | None = None) -> str | None:
    """None when fused_decode can run `spec` at M = m (None: any M it takes), else the reason."""
    fallback = f"falls back to the per-layer kernels (impl {FALLBACK[STACK]!r})"
    if spec.num_layers != 2:
        return (
            f"fused_decode: exactly 2 layers (widths (d_in, hidden, d_out)), got "
            f"{spec.num_layers} (widths {spec.widths}); {fallback}"
        )
    if m is not None and m > MAX_M:
        return f"fused_decode: M must be <= {MAX_M}, got {m}; {fallback}"
    return None


@functools.partial(jax.jit, static_argnames=("spec", "config", "interpret"))
def fused_decode_fwd(
    x2d: jax.Array,
    params: dict[str, jax.Array],
    spec: MLPSpec,
    *,
    config: TileConfig | DecodeConfig | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Launch on an [M, d_in] input with 1 <= M <= 64 and PACKED params (`wv0`/`bc0` for a gated
    first layer, common/packing.py); returns [M, d_out]. Trusts its inputs (checked by
    `fused_decode`). Jitted: the three launches are traced once per shape, enqueued together."""
    interpret = interpret_mode() if interpret is None else interpret
    m = x2d.shape[0]
    d_in, hidden, d_out = spec.widths
    cfg = decode_config_for(config, spec, m, interpret=interpret)
    w1 = params["wv0"] if spec.gated else params["w0"]
    w2 = params["w1"]
    # absent biases: any array will do, HAS_BIAS keeps the kernels from reading them
    b1 = params.get("bc0" if spec.gated else "b0", w1)
    b2 = params.get("b1", w2)
    splits, k_iters = decode_splits(hidden, cfg.block_k2, cfg.split_k)
    m_blocks = pl.cdiv(m, cfg.block_m)  # 1 unless a config pins block_m < M
    compiler = plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    precision = dot_precision(spec)
    up = functools.partial(
        _fused_decode_up_kernel, M=m, D_IN=d_in, HIDDEN=hidden,
        ACTIVATION=spec.base_activation, GATED=spec.gated, HAS_BIAS=spec.bias, PACK=PACK_BLOCK,
        BLOCK_M=cfg.block_m, M_BLOCKS=m_blocks, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k,
        DOT_PRECISION=precision, INTERPRET=interpret,
    )  # fmt: skip
    down = functools.partial(
        _fused_decode_down_kernel, M=m, HIDDEN=hidden, D_OUT=d_out,
        HAS_BIAS=spec.bias, BLOCK_M=cfg.block_m, M_BLOCKS=m_blocks, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k2,
        K_ITERS=k_iters, SPLIT_K=splits, DOT_PRECISION=precision, INTERPRET=interpret,
    )  # fmt: skip
    with quiet_pallas_triton():
        h = pl.pallas_call(
            up,
            out_shape=jax.ShapeDtypeStruct((m, hidden), x2d.dtype),
            grid=(pl.cdiv(hidden, cfg.block_h) * m_blocks,),
            compiler_params=compiler,
            interpret=interpret,
            name="fused_decode_up",
        )(x2d, w1, b1)
        out_shape = (m, d_out) if splits == 1 else (splits, m, d_out)
        out = pl.pallas_call(
            down,
            out_shape=jax.ShapeDtypeStruct(out_shape, x2d.dtype if splits == 1 else jnp.float32),
            grid=(pl.cdiv(d_out, cfg.block_n) * m_blocks, splits),
            compiler_params=compiler,
            interpret=interpret,
            name="fused_decode_down",
        )(h, w2, b2)
        if splits == 1:
            return out
        reduce_blocks = pl.cdiv(m, REDUCE_BLOCK_M)
        reduce = functools.partial(
            _fused_decode_reduce_kernel, M=m, D_OUT=d_out,
            HAS_BIAS=spec.bias, BLOCK_M=REDUCE_BLOCK_M, M_BLOCKS=reduce_blocks,
            BLOCK_N=REDUCE_BLOCK_N,
            SPLIT_K=splits,
            INTERPRET=interpret,
        )  # fmt: skip
        return pl.pallas_call(
            reduce,
            out_shape=jax.ShapeDtypeStruct((m, d_out), x2d.dtype),
            grid=(pl.cdiv(d_out, REDUCE_BLOCK_N) * reduce_blocks,),
            compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
            interpret=interpret,
            name="fused_decode_reduce",
        )(out, b2)


# ---- public function -----------------------------------------------------------------------------
def fused_decode(
    x: jax.Array,
    params: dict[str, jax.Array],
    spec: MLPSpec,
    *,
    config: TileConfig | DecodeConfig | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """y = MLP(x) for a 2-layer spec, x of shape [..., d_in] with at most 64 rows and packed params
    (`fusedmlp.jax_impl.packing.pack_params`, once, outside any jitted step); raises
    NotImplementedError (with the reason and the fallback) for what it cannot take."""
    spec = check_packed_call(
        ADAPTER, spec, x, params, config, config_types=(TileConfig, DecodeConfig)
    )
    # twin-diff: no device check (jax places the arrays)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, spec.d_in)
    m = x2d.shape[0]
    reason = supports(spec, m)
    if reason is not None:
        raise NotImplementedError(reason)
    if config is not None:
        decode_config_for(config, spec, max(m, 1))  # ValueError for what the kernels cannot run
    if m == 0:
        return jnp.zeros((*lead, spec.d_out), x.dtype)
    y = fused_decode_fwd(x2d, params, spec, config=config, interpret=interpret)
    return y.reshape(*lead, spec.d_out)
