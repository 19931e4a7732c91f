"""fused_decode: the whole 2-layer MLP for small M (1..64) in one Triton launch.

    h = round(act(x·W1 + b1) [⊙ (x·V1 + c1)])        [M, hidden]
    y = Σ_s h[:, S_s]·W2[S_s, :] + b2                 the sum over hidden slices S_s, in slice order

At decode batch sizes an MLP is a weight-streaming problem: every weight must be read once at full
bandwidth, and a launch per layer with the hidden's round trip through memory costs real time.

Grid: (cdiv(hidden, BLOCK_H),); program s owns the hidden slice S_s = [s·BLOCK_H, (s+1)·BLOCK_H). It
streams x·W1[:, S_s] (and x·V1[:, S_s]) over d_in in BLOCK_K chunks for all M rows (M padded to
BLOCK_M, a power of two >= 16 for tl.dot), applies bias, activation and gate, rounds the hidden
slice to the dtype (as a per-layer kernel's store would), multiplies it by W2[S_s, :] in
BLOCK_K-wide chunks of d_out and writes each fp32 partial into the workspace [num_slices, BLOCK_M,
d_out].

Reduction, deterministic and in the same launch: every d_out chunk n has an int32 ticket counter.
After writing its partial of chunk n a program takes a ticket (`tl.atomic_add`, acq_rel at GPU
scope: integer atomics are exact, so the counts do not depend on timing); the program that draws the
last ticket (num_slices - 1) knows every partial of chunk n is written, sums them in slice order 0,
1, ..., num_slices - 1 (so the bits never depend on which program came last), adds b2 and stores
y[:, chunk n]. Programs walk the d_out chunks starting at chunk (s mod num_chunks), so the
reductions spread over programs instead of all falling to the one that finishes last. There are no
float atomics and no second kernel: the counters are the only extra allocation (zeroed per call).
Memory ordering on the GPU: a CTA barrier, then the release of the ticket, makes every thread's
partial stores visible before the count; the reducer reads partials with volatile loads after its
acquire.

TileConfig mapping: `block_n` = BLOCK_H (the hidden slice per program), `block_k` = BLOCK_K (the
d_in chunk of the first product and the d_out chunk of the second), `block_m` = BLOCK_M (the padded
M, >= M), `num_warps`, `num_stages`.

Twin: jax_impl/fused_decode.py (Pallas-Triton, same names and sections).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedmlp.common.config import TileConfig
from fusedmlp.common.spec import MLPSpec

from .activations import apply_activation
from .fused_small import dot_precision, round_to_dtype, validate
from .runtime import INTERPRET

MAX_M = 64
FALLBACK = "triton"  # the per-layer kernels


# ---- forward kernel ------------------------------------------------------------------------------
@triton.jit
def _fused_decode_fwd_kernel(
    x_ptr, w1_ptr, v1_ptr, b1_ptr, c1_ptr, w2_ptr, b2_ptr, ws_ptr, count_ptr, y_ptr,
    M, D_IN, HIDDEN, D_OUT,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    # 1. program -> tile: every (padded) row, one slice of the hidden
    pid = tl.program_id(0)
    num_slices = tl.num_programs(0)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols_h = pid * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = cols_h < HIDDEN
    offs_k = tl.arange(0, BLOCK_K)
    dtype = y_ptr.dtype.element_ty

    # 2. load + 3. compute, first layer: stream W1[:, slice] (and V1) over d_in
    acc_z = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for k in range(0, D_IN, BLOCK_K):
        kk = k + offs_k
        k_ok = kk < D_IN
        x = tl.load(x_ptr + rows[:, None] * D_IN + kk[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w1_ptr + kk[:, None] * HIDDEN + cols_h[None, :],
                    mask=k_ok[:, None] & h_ok[None, :], other=0.0)
        if INTERPRET:
            x = x.to(tl.float32)  # interpreter bf16 arithmetic is broken: compute on fp32 tiles
            w = w.to(tl.float32)
        acc_z = tl.dot(x, w, acc_z, input_precision=DOT_PRECISION)
        if GATED:
            v = tl.load(v1_ptr + kk[:, None] * HIDDEN + cols_h[None, :],
                        mask=k_ok[:, None] & h_ok[None, :], other=0.0)
            if INTERPRET:
                v = v.to(tl.float32)
            acc_g = tl.dot(x, v, acc_g, input_precision=DOT_PRECISION)

    # 3. compute: the epilogue of the first layer; padded hidden lanes are act(0)·0 = 0
    z = acc_z
    if HAS_BIAS:
        z += tl.load(b1_ptr + cols_h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
    z = apply_activation(z, ACTIVATION)
    if GATED:
        g = acc_g
        if HAS_BIAS:
            g += tl.load(c1_ptr + cols_h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
        z = z * g
    h = round_to_dtype(z, dtype, INTERPRET)  # what a per-layer kernel's store would hold

    # 3. compute + 4. store, second layer: partial products per d_out chunk, then the reduction
    num_chunks = tl.cdiv(D_OUT, BLOCK_K)
    for j in range(0, num_chunks):
        n = (pid + j) % num_chunks  # rotated start: spreads the reductions over programs
        cols_n = n * BLOCK_K + offs_k
        n_ok = cols_n < D_OUT
        w2 = tl.load(w2_ptr + cols_h[:, None] * D_OUT + cols_n[None, :],
                     mask=h_ok[:, None] & n_ok[None, :], other=0.0)
        if INTERPRET:
            w2 = w2.to(tl.float32)
        part = tl.dot(h, w2, input_precision=DOT_PRECISION)
        ws_offs = rows[:, None] * D_OUT + cols_n[None, :]
        tl.store(ws_ptr + pid * BLOCK_M * D_OUT + ws_offs, part, mask=n_ok[None, :])
        # every thread's partial is stored before the ticket's release
        tl.debug_barrier()
        ticket = tl.atomic_add(count_ptr + n, 1, sem="acq_rel", scope="gpu")
        if ticket == num_slices - 1:
            # last of chunk n: sum the slices in fixed order, so the bits are the same every run
            acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for s in range(0, num_slices):
                acc += tl.load(ws_ptr + s * BLOCK_M * D_OUT + ws_offs, mask=n_ok[None, :],
                               other=0.0, volatile=True)
            if HAS_BIAS:
                acc += tl.load(b2_ptr + cols_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            y = round_to_dtype(acc, dtype, INTERPRET)
            tl.store(y_ptr + rows[:, None] * D_OUT + cols_n[None, :], y.to(dtype),
                     mask=row_ok[:, None] & n_ok[None, :])


# ---- launcher ------------------------------------------------------------------------------------
def supports(spec: MLPSpec, m: int | None = None) -> str | None:
    """None when fused_decode can run `spec` at M = m (None: any M it takes), else the reason."""
    fallback = f"falls back to the per-layer kernels (impl {FALLBACK!r})"
    if spec.num_layers != 2:
        return (f"fused_decode: exactly 2 layers (widths (d_in, hidden, d_out)), got "
                f"{spec.num_layers} (widths {spec.widths}); {fallback}")
    if m is not None and m > MAX_M:
        return f"fused_decode: M must be <= {MAX_M}, got {m}; {fallback}"
    return None


def block_m_for(m: int) -> int:
    """M padded to a power of two >= 16 (tl.dot's smallest tile)."""
    return max(16, triton.next_power_of_2(m))


def fused_decode_config(spec: MLPSpec, m: int, *, interpret: bool = INTERPRET) -> TileConfig:
    """The default config. GPU: 64-wide hidden slices give a 4096 x 14336 MLP 224 programs for 132
    SMs; 128-long K chunks stream W1 in 16 KiB (fp16) tiles. Tuned in the performance issue."""
    block_m = block_m_for(m)
    if interpret:
        return TileConfig(block_m=block_m, block_n=32, block_k=16, group_m=1, num_warps=4,
                          num_stages=1)
    # fp32 at 64 rows, gated: 3 stages need 288 KiB of shared memory, over the H100's 227 KiB
    # (triton.compile for sm_90 on a CPU); 2 stages need 192 KiB.
    stages = 2 if spec.dtype == "float32" and block_m >= 64 else 3
    return TileConfig(block_m=block_m, block_n=64, block_k=128, group_m=1, num_warps=4,
                      num_stages=stages)


def fused_decode_fwd(
    x2d: torch.Tensor,
    params: dict[str, torch.Tensor],
    spec: MLPSpec,
    *,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """Launch on a contiguous [M, d_in] input with 1 <= M <= 64; returns [M, d_out]. Trusts its
    inputs (config.block_m >= M)."""
    m = x2d.shape[0]
    d_in, hidden, d_out = spec.widths
    config = config or fused_decode_config(spec, m)
    num_slices = triton.cdiv(hidden, config.block_n)
    num_chunks = triton.cdiv(d_out, config.block_k)
    y = torch.empty(m, d_out, dtype=x2d.dtype, device=x2d.device)
    ws = torch.empty(num_slices, config.block_m, d_out, dtype=torch.float32, device=x2d.device)
    count = torch.zeros(num_chunks, dtype=torch.int32, device=x2d.device)
    w1, w2 = params["w0"], params["w1"]
    # absent params: any pointer will do, the constexpr flags keep the kernel from reading them
    v1 = params.get("v0", w1)
    b1 = params.get("b0", w1)
    c1 = params.get("c0", w1)
    b2 = params.get("b1", w2)
    _fused_decode_fwd_kernel[(num_slices,)](
        x2d, w1, v1, b1, c1, w2, b2, ws, count, y,
        m, d_in, hidden, d_out,
        ACTIVATION=spec.base_activation, GATED=spec.gated, HAS_BIAS=spec.bias,
        BLOCK_M=config.block_m, BLOCK_H=config.block_n, BLOCK_K=config.block_k,
        DOT_PRECISION=dot_precision(spec), INTERPRET=INTERPRET,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y


# ---- public function -----------------------------------------------------------------------------
def fused_decode(
    x: torch.Tensor,
    params: dict[str, torch.Tensor],
    spec: MLPSpec,
    *,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """y = MLP(x) for a 2-layer spec and x of shape [..., d_in] with at most 64 rows, in one launch;
    raises NotImplementedError (with the reason and the fallback) otherwise."""
    validate(x, params, spec)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, spec.d_in).contiguous()
    m = x2d.shape[0]
    reason = supports(spec, m)
    if reason is not None:
        raise NotImplementedError(reason)
    if config is not None:
        if not isinstance(config, TileConfig):
            raise TypeError(f"config: expected a TileConfig or None, got {type(config).__name__}")
        if config.block_m < m:
            raise ValueError(f"config: expected block_m >= M = {m}, got {config.block_m}")
    if m == 0:
        return x.new_empty(*lead, spec.d_out)
    params = {k: p.contiguous() for k, p in params.items()}
    return fused_decode_fwd(x2d, params, spec, config=config).reshape(*lead, spec.d_out)
