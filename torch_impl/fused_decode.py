"""fused_decode: the whole 2-layer MLP for small M (1..64), weights streamed once at full bandwidth.

    h = round(act(x·W + b) [⊙ (x·V + c)])                  [M, hidden]    launch 1 (up)
    p_s = h[:, K_s]·W2[K_s, :]                              [M, d_out]     launch 2 (down), s < S
    y = round(p_0 + p_1 + ... + p_{S-1} + b2)               [M, d_out]     launch 3 (reduce), S > 1

At decode batch sizes an MLP is a weight-streaming problem: llama3-8b's MLP (4096 -> 14336 -> 4096
SwiGLU, bf16) reads 352 MB of weights for 16 rows of x; at the H200's measured copy rate of 4.24
TB/s that is 83 us, the floor. Everything else (x, h, y, partials) is under 3 % of those bytes, and
the matrix work is small (M·352M multiply-adds: ~11 us of tensor-core time at M = 64), so the time
is set by how close the weight stream comes to the bandwidth of HBM — and by the seams between the
launches (a few us each).

Launch 1, grid (cdiv(hidden, BLOCK_H),): program j owns hidden columns [j·BLOCK_H, (j+1)·BLOCK_H)
and streams the first layer's weights over d_in in BLOCK_K rows. Gated layers come PACKED
(common/packing.py: `wv0` [d_in, 2·Np], gate and up interleaved in 64-column blocks): BLOCK_H
divides 64, so each program reads one contiguous gate run and the up run right after it (64-wide
blocks: 128 + 128 B = 256 contiguous bytes per weight row, 8 full L2 sectors), runs one dot on each
with the same x tile, adds `bc0`, applies act(gate)·up in fp32, rounds to the dtype (as a per-layer
kernel's store would) and stores its slice of h — only the M real rows: h is M·hidden·2 B (1.8 MB at
M = 64), written once and read back from L2 by launch 2.

Launch 2, grid (cdiv(d_out, BLOCK_N), S): program (n, s) owns output columns [n·BLOCK_N,
(n+1)·BLOCK_N) (128 16-bit columns: 256-byte rows of W2) and the s-th of S equal runs of the hidden
(K_ITERS chunks of BLOCK_K2), so W2 is streamed by ~2 programs per SM past M = 16 after a gated
first layer (S = 8 at llama3-8b), ~1 up to it and after a plain one (S = 4, measured faster there),
although d_out has only 32 such column tiles. S = 1: it adds b2 and stores y itself. S > 1: it
stores its fp32 partial p_s (S·M·d_out·4 B: 8 MiB at llama3-8b, M = 64 — L2-resident), and launch 3
sums the S partials of each output tile in the fixed order s = 0, 1, ..., adds b2, rounds once and
stores y.

Row blocks: every program holds all M rows (block_m = M padded) unless a pinned config asks for a
smaller block_m; then each launch's grid has cdiv(M, block_m) row blocks as its fastest index, so
the programs that stream one weight tile run side by side and the tile should come from HBM once
(bench/decode_rows_probe.py asks whether two 32-row blocks beat one 64-row block at M = 64).

Deterministic by construction: no atomics, every sum in a fixed order, so repeated runs give the
same bits (a given config's bits; another split S sums in another order). No memset, no repack: h
and the partials are fresh `torch.empty` buffers, fully overwritten where read.

Bandwidth (the H200, 132 SMs, predictions for bench/sweep_decode.py to measure): HBM latency under
load is ~1 us, so 4.2 TB/s needs ~4 MB in flight, ~32-64 KiB per SM. Each program pipelines its
weight tiles through shared memory with 16-byte cp.async, 64 weight rows a K step (llama3-8b
bf16: at M <= 16, 4 stages, 3 buffers of 18 KiB of x and weight rows in flight while the tile in
registers is multiplied: `common.tiling.DECODE_IN_FLIGHT_BYTES`), two programs fit per SM, so
~108 KiB are in flight per SM in both launches.
The weight loads ask for evict-first (so that x, h and the partials stay in L2), but Triton 3.6
drops the hint on cp.async (plain `cp.async.cg` in the PTX). llama3-8b (M = 1 to 16): launch 1
streams 235 MB (55.5 us at 4.24 TB/s), launch 2 117 MB (27.7 us), each with a ~1-2 us ramp and
tail, launch 3 and the seams 2-4 us: predicted 87-93 us, against the 83 us floor. The tiniest M
run the same padded tl.dot (16 rows, mma.sync) as M = 16: at decode sizes the tensor cores idle
either way, and a dot keeps the weight tiles on the cp.async pipeline (an FMA GEMV would load them
to registers, without it). M = 32 and 64 take 3 stages of 64-row steps (M = 64: wgmma, 3
buffers of 24 KiB): the x tile is a third of each buffer there, and 128-row steps in 2 buffers
left one weight tile in flight a program (H200: 103.9 -> 94.2 µs at M = 64; 4 stages lost).

Seams: launches 2 and 3 read what the launch before wrote, so they are three launches in one stream.
A host never waits between them (they are enqueued back to back; the harness times them in one CUDA
graph, `do_bench_cudagraph`), but each seam costs the GPU a launch latency plus the previous
launch's tail. With `pdl=True` (Hopper) launches 2 and 3 use programmatic dependent launch: launch 1
(and 2) tell the GPU at their start that the next grid may be scheduled, so its programs are
resident and waiting (`griddepcontrol.wait`) when the previous grid's last write lands.
One cooperative launch instead (the three launches' tiles as phases of one resident grid, grid
barriers between them: commit a4aeca4, the same bits) measured slower on the H200 at every case
(bench/results/2026-12-04-h200-a4aeca4): llama3-8b M = 1 84.5 -> 88.5 µs, hf-blog-geglu 9.7 ->
11.6 — a barrier costs what a seam does, the second phase's loads still start after it, and the
harness's device time (the sum of kernel durations) never counted the seams' idle gaps.

Config: `DecodeConfig` (common/tiling.py, read by both twins): block_m (M padded to a power of two
>= 16), block_h and block_k (launch 1), block_n, block_k2 and split_k (launch 2), num_warps,
num_stages, pdl; a pinned `TileConfig` maps onto it (`decode_config_for`).

Twin: jax_impl/fused_decode.py (Pallas-Triton, same names, sections and launches).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from fusedmlp.common.config import TileConfig
from fusedmlp.common.packing import PACK_BLOCK, packed_names
from fusedmlp.common.registry import FALLBACK
from fusedmlp.common.spec import MLPSpec
from fusedmlp.common.tiling import (
    DecodeConfig,
    cdiv,
    decode_config_for,
    decode_splits,
)
from fusedmlp.common.validate import check_packed_call

from .activations import apply_activation, round_to_dtype
from .front import ADAPTER, STACK
from .fused_small import dot_precision
from .launch import Launch, LaunchCache
from .runtime import INTERPRET, check_kernel_device
from .tf32 import tf32_operand

MAX_M = 64
# Launch 3's tile: 16 rows x 64 output columns a program (llama3-8b: 64 programs at M <= 16, 256
# at M = 64). Its rows are independent of launches 1-2's row blocks (each sum is the same fixed
# order, s = 0, 1, ...: the same bits). H200 (bench/decode_launch_probe.py at 30bbe30): with the
# whole padded M a program, 64 programs summed 8 partials of [64, 64] in 4.6 µs torch / 7.2 µs
# JAX at M = 64 (8.4 MB from L2 at 1.2-1.8 TB/s) against 1.1-1.4 µs at M <= 16.
# twin-diff: 64 columns here, 32 in the JAX twin (measured per stack: its comment has the table).
REDUCE_BLOCK_M = 16
REDUCE_BLOCK_N = 64


# ---- forward kernels -----------------------------------------------------------------------------
@triton.jit
def _k_slab(
    a_ptr, w_ptr, rows, row_ok, kk, k_ok, cols, col_ok,
    A_COLS, W_COLS, INTERPRET: tl.constexpr,
):  # fmt: skip
    """One K step's operands: the activation tile (x or h: `rows` × `kk`, rows of A_COLS) and the
    weight tile (`kk` × `cols`, rows of W_COLS; read once per call: evict first)."""
    a = tl.load(
        a_ptr + rows[:, None] * A_COLS + kk[None, :],
        mask=row_ok[:, None] & k_ok[None, :],
        other=0.0,
    )
    w = tl.load(
        w_ptr + kk[:, None] * W_COLS + cols[None, :],
        mask=k_ok[:, None] & col_ok[None, :],
        other=0.0,
        eviction_policy="evict_first",
    )
    if INTERPRET:
        a = a.to(tl.float32)  # interpreter bf16 arithmetic is broken: compute on fp32 tiles
        w = w.to(tl.float32)
    return a, w


@triton.jit
def _fused_decode_up_kernel(
    x_ptr, w_ptr, b_ptr, h_ptr,
    M, D_IN, HIDDEN, W_COLS,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, PACK: tl.constexpr,
    BLOCK_M: tl.constexpr, M_BLOCKS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    # 1. program -> tile: row block pid_m (row blocks fastest: the programs that stream the same
    # weight tile run side by side, so the tile comes from HBM once), hidden columns
    # [pid·BLOCK_H, (pid+1)·BLOCK_H)
    pid = tl.program_id(0) // M_BLOCKS  # M_BLOCKS = cdiv(M, BLOCK_M): a constant, 1 by default
    rows = (tl.program_id(0) % M_BLOCKS) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols_h = pid * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = cols_h < HIDDEN
    if GATED:
        # packed: hidden column c is operand column 2·PACK·(c // PACK) + c % PACK (gate) and that
        # + PACK (up); BLOCK_H divides PACK, so this tile's gate and up runs are contiguous
        per_pack = PACK // BLOCK_H
        col0 = (pid // per_pack) * (2 * PACK) + (pid % per_pack) * BLOCK_H
    else:
        col0 = pid * BLOCK_H
    cols_w = col0 + tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    dtype = h_ptr.dtype.element_ty
    if USE_PDL:
        gdc_launch_dependents()  # launch 2 may be scheduled now; it waits for our h itself

    # 2. load + 3. compute: stream the weights over d_in; x is the same small tile for every program
    acc_z = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for k in range(0, D_IN, BLOCK_K):
        kk = k + offs_k
        k_ok = kk < D_IN
        x, w = _k_slab(x_ptr, w_ptr, rows, row_ok, kk, k_ok, cols_w, h_ok, D_IN, W_COLS, INTERPRET)
        acc_z = tl.dot(
            tf32_operand(x, DOT_PRECISION),
            tf32_operand(w, DOT_PRECISION),
            acc_z,
            input_precision=DOT_PRECISION,
        )
        if GATED:
            v = tl.load(
                w_ptr + kk[:, None] * W_COLS + (cols_w + PACK)[None, :],
                mask=k_ok[:, None] & h_ok[None, :],
                other=0.0,
                eviction_policy="evict_first",
            )
            if INTERPRET:
                v = v.to(tl.float32)
            acc_g = tl.dot(
                tf32_operand(x, DOT_PRECISION),
                tf32_operand(v, DOT_PRECISION),
                acc_g,
                input_precision=DOT_PRECISION,
            )

    # 3. compute: bias, activation, gate in fp32; padded hidden lanes are never stored
    z = acc_z
    if HAS_BIAS:
        z += tl.load(b_ptr + cols_w, mask=h_ok, other=0.0).to(tl.float32)[None, :]
    z = apply_activation(z, ACTIVATION)
    if GATED:
        g = acc_g
        if HAS_BIAS:
            g += tl.load(b_ptr + cols_w + PACK, mask=h_ok, other=0.0).to(tl.float32)[None, :]
        z = z * g
    h = round_to_dtype(z, dtype, INTERPRET)  # what a per-layer kernel's store would hold

    # 4. store: the M real rows of this hidden slice
    tl.store(
        h_ptr + rows[:, None] * HIDDEN + cols_h[None, :], h, mask=row_ok[:, None] & h_ok[None, :]
    )


@triton.jit
def _fused_decode_down_kernel(
    h_ptr, w_ptr, b_ptr, out_ptr,
    M, HIDDEN, D_OUT,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, M_BLOCKS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, K_ITERS: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    # 1. program -> tile: row block (fastest, as in launch 1), output columns of tile n, run s
    pid_n = tl.program_id(0) // M_BLOCKS
    pid_s = tl.program_id(1)
    rows = (tl.program_id(0) % M_BLOCKS) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cols_n < D_OUT
    k_lo = pid_s * (K_ITERS * BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)
    dtype = w_ptr.dtype.element_ty
    if USE_PDL:
        gdc_launch_dependents()  # launch 3 may be scheduled now
        gdc_wait()  # h: launch 1's writes are complete and visible

    # 2. load + 3. compute: stream W2[run s, tile n]; h comes from L2
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, K_ITERS):
        kk = k_lo + i * BLOCK_K + offs_k
        k_ok = kk < HIDDEN
        h, w = _k_slab(h_ptr, w_ptr, rows, row_ok, kk, k_ok, cols_n, n_ok, HIDDEN, D_OUT, INTERPRET)
        acc = tl.dot(
            tf32_operand(h, DOT_PRECISION),
            tf32_operand(w, DOT_PRECISION),
            acc,
            input_precision=DOT_PRECISION,
        )

    # 4. store: y itself (one run), or this run's fp32 partial for launch 3
    mask = row_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        # 3. compute: the bias and the one rounding of y
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y = round_to_dtype(acc, dtype, INTERPRET)
        tl.store(out_ptr + rows[:, None] * D_OUT + cols_n[None, :], y, mask=mask)
    else:
        tl.store(out_ptr + (pid_s * M + rows[:, None]) * D_OUT + cols_n[None, :], acc, mask=mask)


@triton.jit
def _fused_decode_reduce_kernel(
    ws_ptr, b_ptr, y_ptr,
    M, D_OUT,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, M_BLOCKS: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr, USE_PDL: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    # 1. program -> tile: row block (fastest, as in launch 1), output columns of tile n
    pid = tl.program_id(0) // M_BLOCKS
    rows = (tl.program_id(0) % M_BLOCKS) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cols_n < D_OUT
    mask = (rows < M)[:, None] & n_ok[None, :]
    offs = rows[:, None] * D_OUT + cols_n[None, :]
    dtype = y_ptr.dtype.element_ty
    if USE_PDL:
        gdc_wait()  # the partials: launch 2's writes are complete and visible

    # 2. load + 3. compute: the partials in the fixed order s = 0, 1, ...: the same bits every run
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * M * D_OUT + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = round_to_dtype(acc, dtype, INTERPRET)

    # 4. store
    tl.store(y_ptr + offs, y, mask=mask)


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


class _DecodeLaunches:
    """`fused_decode_fwd`'s record for one key: the params' names, the buffers' shapes and the
    two or three launches (up, down, and the split-K reduction where splits > 1)."""

    __slots__ = ("down", "names", "out_shape", "reduce", "splits", "up")

    def __init__(self, m: int, spec: MLPSpec, config) -> None:
        d_in, hidden, d_out = spec.widths
        cfg = decode_config_for(config, spec, m, interpret=INTERPRET)
        w1_name = "wv0" if spec.gated else "w0"
        # absent biases: any pointer will do, HAS_BIAS keeps the kernels from reading them
        b1_name = ("bc0" if spec.gated else "b0") if spec.bias else w1_name
        self.names = (w1_name, "w1", b1_name, "b1" if spec.bias else "w1")
        w1_cols = packed_names(spec)[w1_name][1]
        splits, k_iters = decode_splits(hidden, cfg.block_k2, cfg.split_k)
        m_blocks = cdiv(m, cfg.block_m)  # 1 unless a config pins block_m < M
        self.splits = splits
        self.out_shape = (splits, m, d_out)
        pdl = cfg.pdl and not INTERPRET
        launch = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        dependent = {**launch, "launch_pdl": True} if pdl else launch
        precision = dot_precision(spec)
        self.up = Launch(
            _fused_decode_up_kernel, (cdiv(hidden, cfg.block_h) * m_blocks,),
            (m, d_in, hidden, w1_cols),
            dict(
                ACTIVATION=spec.base_activation, GATED=spec.gated, HAS_BIAS=spec.bias,
                PACK=PACK_BLOCK, BLOCK_M=cfg.block_m, M_BLOCKS=m_blocks, BLOCK_H=cfg.block_h,
                BLOCK_K=cfg.block_k,
                DOT_PRECISION=precision, USE_PDL=pdl, INTERPRET=INTERPRET, **launch,
            ),
        )  # fmt: skip
        self.down = Launch(
            _fused_decode_down_kernel, (cdiv(d_out, cfg.block_n) * m_blocks, splits),
            (m, hidden, d_out),
            dict(
                HAS_BIAS=spec.bias, BLOCK_M=cfg.block_m, M_BLOCKS=m_blocks, BLOCK_N=cfg.block_n,
                BLOCK_K=cfg.block_k2, K_ITERS=k_iters, SPLIT_K=splits, DOT_PRECISION=precision,
                USE_PDL=pdl, INTERPRET=INTERPRET, **dependent,
            ),
        )  # fmt: skip
        reduce_blocks = cdiv(m, REDUCE_BLOCK_M)
        self.reduce = Launch(
            _fused_decode_reduce_kernel, (cdiv(d_out, REDUCE_BLOCK_N) * reduce_blocks,),
            (m, d_out),
            dict(
                HAS_BIAS=spec.bias, BLOCK_M=REDUCE_BLOCK_M, M_BLOCKS=reduce_blocks,
                BLOCK_N=REDUCE_BLOCK_N, SPLIT_K=splits,
                USE_PDL=pdl, INTERPRET=INTERPRET, **{**dependent, "num_warps": 4, "num_stages": 1},
            ),
        )  # fmt: skip


_LAUNCHES = LaunchCache(_DecodeLaunches)


def fused_decode_fwd(
    x2d: torch.Tensor,
    params: dict[str, torch.Tensor],
    spec: MLPSpec,
    *,
    config: TileConfig | DecodeConfig | None = None,
) -> torch.Tensor:
    """Launch on a contiguous [M, d_in] input with 1 <= M <= 64 and PACKED params (`wv0`/`bc0` for
    a gated first layer, common/packing.py); returns [M, d_out]. Trusts its inputs; a pinned
    config it cannot run raises ValueError (`decode_config_for`)."""
    m = x2d.shape[0]
    plan = _LAUNCHES.get((m, spec, config))
    w1, w2, b1, b2 = (params[name] for name in plan.names)
    dtype, device = x2d.dtype, x2d.device
    h = torch.empty(m, spec.widths[1], dtype=dtype, device=device)
    y = torch.empty(m, spec.d_out, dtype=dtype, device=device)
    out = y if plan.splits == 1 else torch.empty(plan.out_shape, dtype=torch.float32, device=device)
    plan.up(x2d, w1, b1, h)
    plan.down(h, w2, b2, out)
    if plan.splits > 1:
        plan.reduce(out, b2, y)
    return y


# ---- public function -----------------------------------------------------------------------------
def fused_decode(
    x: torch.Tensor,
    params: dict[str, torch.Tensor],
    spec: MLPSpec,
    *,
    config: TileConfig | DecodeConfig | None = None,
) -> torch.Tensor:
    """y = MLP(x) for a 2-layer spec, x of shape [..., d_in] with at most 64 rows and packed params
    (`fusedmlp.torch_impl.packing.pack_params`, once); raises NotImplementedError (with the reason
    and the fallback) for what it cannot take."""
    spec = check_packed_call(
        ADAPTER, spec, x, params, config, config_types=(TileConfig, DecodeConfig)
    )
    check_kernel_device(x)  # twin-diff: TRITON_INTERPRET decides where the kernels run
    lead = x.shape[:-1]
    x2d = x.reshape(-1, spec.d_in).contiguous()
    m = x2d.shape[0]
    reason = supports(spec, m)
    if reason is not None:
        raise NotImplementedError(reason)
    if config is not None:
        decode_config_for(config, spec, max(m, 1))  # ValueError for what the kernels cannot run
    if m == 0:
        return x.new_empty(*lead, spec.d_out)
    params = {k: p.contiguous() for k, p in params.items()}
    return fused_decode_fwd(x2d, params, spec, config=config).reshape(*lead, spec.d_out)
