"""fused_decode: the whole 2-layer MLP for small M (1..64) in one Pallas-Triton launch.

    h = round(act(x·W1 + b1) [⊙ (x·V1 + c1)])        [M, hidden]
    y = Σ_s h[:, S_s]·W2[S_s, :] + b2                 the sum over hidden slices S_s, in slice order

At decode batch sizes an MLP is a weight-streaming problem: every weight must be read once at full
bandwidth, and a launch per layer with the hidden's round trip through memory costs real time.

Grid: (cdiv(hidden, BLOCK_H),); program s owns the hidden slice S_s = [s·BLOCK_H, (s+1)·BLOCK_H). It
streams x·W1[:, S_s] (and x·V1[:, S_s]) over d_in in BLOCK_K chunks for all M rows (M padded to
BLOCK_M, a power of two >= 16 for the dot), applies bias, activation and gate, rounds the hidden
slice to the dtype (as a per-layer kernel's store would), multiplies it by W2[S_s, :] in
BLOCK_K-wide chunks of d_out and writes each fp32 partial into the workspace [num_slices, BLOCK_M,
d_out].

Reduction, deterministic and in the same launch: every d_out chunk n has an int32 ticket counter.
After writing its partial of chunk n a program takes a ticket (`plgpu.atomic_add`, acq_rel at GPU
scope: integer atomics are exact, so the counts do not depend on timing); the program that draws the
last ticket (num_slices - 1) knows every partial of chunk n is written, sums them in slice order 0,
1, ..., num_slices - 1 (so the bits never depend on which program came last), adds b2 and stores
y[:, chunk n]. Programs walk the d_out chunks starting at chunk (s mod num_chunks), so the
reductions spread over programs instead of all falling to the one that finishes last. There are no
float atomics and no second kernel: the counters (an input aliased to an output, zeroed per call)
are the only extra input. In interpret mode this works because the interpreter runs the grid in
order, carrying every output buffer (workspace and counters) from one program to the next: the last
program of each chunk sees all partials, as on the GPU. Memory ordering on the GPU: a CTA barrier,
then the release of the ticket, makes every thread's partial stores visible before the count; the
reducer reads partials with volatile loads after its acquire.

TileConfig mapping: `block_n` = BLOCK_H (the hidden slice per program), `block_k` = BLOCK_K (the
d_in chunk of the first product and the d_out chunk of the second), `block_m` = BLOCK_M (the padded
M, >= M), `num_warps`, `num_stages`. Refs are whole arrays addressed with `pl.ds` and masks, as the
twin's pointers are.

Twin: torch_impl/fused_decode.py (Triton, same names and sections).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from fusedmlp.common.config import TileConfig
from fusedmlp.common.spec import MLPSpec

from .activations import apply_activation
from .compat import interpret_mode, quiet_pallas_triton
from .fused_small import dot_precision, round_to_dtype, validate

MAX_M = 64
FALLBACK = "pallas_triton"  # the per-layer kernels


# ---- forward kernel ------------------------------------------------------------------------------
def _fused_decode_fwd_kernel(
    x_ref, w1_ref, v1_ref, b1_ref, c1_ref, w2_ref, b2_ref, count_in_ref,
    y_ref, ws_ref, count_ref,
    *, M, D_IN, HIDDEN, D_OUT,
    ACTIVATION, GATED, HAS_BIAS, BLOCK_M, BLOCK_H, BLOCK_K, DOT_PRECISION, INTERPRET,
):
    del count_in_ref  # aliased to count_ref
    # 1. program -> tile: every (padded) row, one slice of the hidden
    pid = pl.program_id(0)
    num_slices = pl.num_programs(0)
    rows = jnp.arange(BLOCK_M)
    row_ok = rows < M
    cols_h = pid * BLOCK_H + jnp.arange(BLOCK_H)
    h_ok = cols_h < HIDDEN
    offs_k = jnp.arange(BLOCK_K)
    dtype = y_ref.dtype

    # 2. load + 3. compute, first layer: stream W1[:, slice] (and V1) over d_in
    # twin-diff: no fp32 upcast when interpreting; the Pallas interpreter's bf16 is right
    def k_step(i, carry):
        acc_z, acc_g = carry
        k = i * BLOCK_K
        kk = k + offs_k
        k_ok = kk < D_IN
        x = plgpu.load(x_ref.at[pl.ds(0, BLOCK_M), pl.ds(k, BLOCK_K)],
                       mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = plgpu.load(w1_ref.at[pl.ds(k, BLOCK_K), pl.ds(pid * BLOCK_H, BLOCK_H)],
                       mask=k_ok[:, None] & h_ok[None, :], other=0.0)
        acc_z += plgpu.dot(x, w, precision=DOT_PRECISION)
        if GATED:
            v = plgpu.load(v1_ref.at[pl.ds(k, BLOCK_K), pl.ds(pid * BLOCK_H, BLOCK_H)],
                           mask=k_ok[:, None] & h_ok[None, :], other=0.0)
            acc_g += plgpu.dot(x, v, precision=DOT_PRECISION)
        return acc_z, acc_g

    acc_z = jnp.zeros((BLOCK_M, BLOCK_H), jnp.float32)
    acc_g = jnp.zeros((BLOCK_M, BLOCK_H), jnp.float32)
    acc_z, acc_g = jax.lax.fori_loop(0, pl.cdiv(D_IN, BLOCK_K), k_step, (acc_z, acc_g))

    # 3. compute: the epilogue of the first layer; padded hidden lanes are act(0)·0 = 0
    z = acc_z
    if HAS_BIAS:
        z += plgpu.load(b1_ref.at[pl.ds(pid * BLOCK_H, BLOCK_H)], mask=h_ok,
                        other=0.0).astype(jnp.float32)[None, :]
    z = apply_activation(z, ACTIVATION)
    if GATED:
        g = acc_g
        if HAS_BIAS:
            g += plgpu.load(c1_ref.at[pl.ds(pid * BLOCK_H, BLOCK_H)], mask=h_ok,
                            other=0.0).astype(jnp.float32)[None, :]
        z = z * g
    h = round_to_dtype(z, dtype)  # what a per-layer kernel's store would hold

    # 3. compute + 4. store, second layer: partial products per d_out chunk, then the reduction
    num_chunks = pl.cdiv(D_OUT, BLOCK_K)

    def n_step(j, carry):
        n = jax.lax.rem(pid + j, num_chunks)  # rotated start: spreads the reductions over programs
        cols_n = n * BLOCK_K + offs_k
        n_ok = cols_n < D_OUT
        w2 = plgpu.load(w2_ref.at[pl.ds(pid * BLOCK_H, BLOCK_H), pl.ds(n * BLOCK_K, BLOCK_K)],
                        mask=h_ok[:, None] & n_ok[None, :], other=0.0)
        part = plgpu.dot(h, w2, precision=DOT_PRECISION)
        plgpu.store(ws_ref.at[pid, :, pl.ds(n * BLOCK_K, BLOCK_K)], part, mask=n_ok[None, :])
        if not INTERPRET:
            # every thread's partial is stored before the ticket's release
            # twin-diff: debug_barrier has no interpreter rule; the interpreter runs programs whole
            plgpu.debug_barrier()
        ticket = plgpu.atomic_add(count_ref, n, jnp.int32(1))

        @pl.when(ticket == num_slices - 1)
        def _reduce():
            # last of chunk n: sum the slices in fixed order, so the bits are the same every run
            def s_step(s, acc):
                return acc + plgpu.load(ws_ref.at[s, :, pl.ds(n * BLOCK_K, BLOCK_K)],
                                        mask=n_ok[None, :], other=0.0, volatile=True)

            acc = jax.lax.fori_loop(0, num_slices, s_step,
                                    jnp.zeros((BLOCK_M, BLOCK_K), jnp.float32))
            if HAS_BIAS:
                acc += plgpu.load(b2_ref.at[pl.ds(n * BLOCK_K, BLOCK_K)], mask=n_ok,
                                  other=0.0).astype(jnp.float32)[None, :]
            y = round_to_dtype(acc, dtype)
            plgpu.store(y_ref.at[pl.ds(0, BLOCK_M), pl.ds(n * BLOCK_K, BLOCK_K)], y.astype(dtype),
                        mask=row_ok[:, None] & n_ok[None, :])

        return carry

    jax.lax.fori_loop(0, num_chunks, n_step, 0)


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
    """M padded to a power of two >= 16 (the dot's smallest tile)."""
    return max(16, pl.next_power_of_2(m))


def fused_decode_config(spec: MLPSpec, m: int, *, interpret: bool | None = None) -> TileConfig:
    """The default config. GPU: 64-wide hidden slices give a 4096 x 14336 MLP 224 programs for 132
    SMs; 128-long K chunks stream W1 in 16 KiB (fp16) tiles. Tuned in the performance issue."""
    block_m = block_m_for(m)
    if interpret if interpret is not None else interpret_mode():
        return TileConfig(block_m=block_m, block_n=32, block_k=16, group_m=1, num_warps=4,
                          num_stages=1)
    # fp32 at 64 rows, gated: 3 stages need 288 KiB of shared memory, over the H100's 227 KiB
    # (triton.compile for sm_90 on a CPU); 2 stages need 192 KiB.
    stages = 2 if spec.dtype == "float32" and block_m >= 64 else 3
    return TileConfig(block_m=block_m, block_n=64, block_k=128, group_m=1, num_warps=4,
                      num_stages=stages)


@functools.partial(jax.jit, static_argnames=("spec", "config", "interpret"))
def fused_decode_fwd(
    x2d: jax.Array,
    params: dict[str, jax.Array],
    spec: MLPSpec,
    *,
    config: TileConfig | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Launch on an [M, d_in] input with 1 <= M <= 64; returns [M, d_out]. Trusts its inputs
    (config.block_m >= M). Jitted as fused_small_fwd is, so a call is traced once per shape."""
    interpret = interpret_mode() if interpret is None else interpret
    m = x2d.shape[0]
    d_in, hidden, d_out = spec.widths
    config = config or fused_decode_config(spec, m, interpret=interpret)
    num_slices = pl.cdiv(hidden, config.block_n)
    num_chunks = pl.cdiv(d_out, config.block_k)
    count = jnp.zeros((num_chunks,), jnp.int32)
    w1, w2 = params["w0"], params["w1"]
    # absent params: any array will do, the static flags keep the kernel from reading them
    v1 = params.get("v0", w1)
    b1 = params.get("b0", w1)
    c1 = params.get("c0", w1)
    b2 = params.get("b1", w2)
    kernel = functools.partial(
        _fused_decode_fwd_kernel, M=m, D_IN=d_in, HIDDEN=hidden, D_OUT=d_out,
        ACTIVATION=spec.base_activation, GATED=spec.gated, HAS_BIAS=spec.bias,
        BLOCK_M=config.block_m, BLOCK_H=config.block_n, BLOCK_K=config.block_k,
        DOT_PRECISION=dot_precision(spec), INTERPRET=interpret,
    )
    with quiet_pallas_triton():
        y, _, _ = pl.pallas_call(
            kernel,
            out_shape=(
                jax.ShapeDtypeStruct((m, d_out), x2d.dtype),
                jax.ShapeDtypeStruct((num_slices, config.block_m, d_out), jnp.float32),
                jax.ShapeDtypeStruct((num_chunks,), jnp.int32),
            ),
            grid=(num_slices,),
            input_output_aliases={7: 2},  # the zeroed counters are updated in place
            compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                                 num_stages=config.num_stages),
            interpret=interpret,
            name="fused_decode_fwd",
        )(x2d, w1, v1, b1, c1, w2, b2, count)
    return y


# ---- public function -----------------------------------------------------------------------------
def fused_decode(
    x: jax.Array,
    params: dict[str, jax.Array],
    spec: MLPSpec,
    *,
    config: TileConfig | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """y = MLP(x) for a 2-layer spec and x of shape [..., d_in] with at most 64 rows, in one launch;
    raises NotImplementedError (with the reason and the fallback) otherwise."""
    validate(x, params, spec)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, spec.d_in)
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
        return jnp.zeros((*lead, spec.d_out), x.dtype)
    y = fused_decode_fwd(x2d, params, spec, config=config, interpret=interpret)
    return y.reshape(*lead, spec.d_out)
