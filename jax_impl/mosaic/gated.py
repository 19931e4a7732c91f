"""gated on Mosaic GPU: h = act(x·W + b) ⊙ (x·V + c), both products fed by one X slab.

    h[m, n] = act(Σ_k x[m, k]·W[k, n] + b[n]) · (Σ_k x[m, k]·V[k, n] + c[n])   (fp32, rounded once)

Grid: 1-D, one program (CUDA block = one warpgroup) per BLOCK_M × BLOCK_N tile of h, in Triton's
grouped order. Each ring slot holds one X slab and the matching W and V slabs (three TMA copies,
three barriers); two wgmmas read the same X slab into two fp32 accumulators, so X is read once for
both products. Only the gated hidden leaves the chip: the epilogue adds the biases, applies the
activation to the W branch, multiplies by the V branch, casts, and stores through shared memory by
TMA. Nothing is saved for a backward pass (forward only).

Sibling, not twin: jax_impl/gated.py (Pallas-Triton) and torch_impl/gated.py (Triton) export the
same names; the dispatcher picks this module for impl "pallas_mosaic". fp16/bf16 only; float32
raises NotImplementedError naming the fallback. Without a GPU it runs under the Mosaic GPU
interpreter.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ...common.config import TileConfig
from ...common.spec import PLAIN_ACTIVATIONS
from ..activations import apply_activation
from ..compat import interpret_mode
from . import pipeline
from .pipeline import k_pipeline, program_tile, ring_allocations, row_vector, store_tile

FAMILY = "gated"
# The W branch's activation; "identity" gives the bilinear GLU variant.
GATED_KERNEL_ACTIVATIONS = ("identity", *PLAIN_ACTIVATIONS)


# ==== forward kernel ==============================================================================
def _gated_fwd_kernel(
    *refs: Any,
    activation: str,
    has_bias: bool,
    num_pid_m: int,
    num_pid_n: int,
    k_iters: int,
    BLOCK_M: int,
    BLOCK_N: int,
    BLOCK_K: int,
    GROUP_M: int,
    NUM_STAGES: int,
    interpret: bool,
) -> None:
    if has_bias:
        x_gmem, w_gmem, v_gmem, b_gmem, c_gmem, o_gmem = refs
    else:
        x_gmem, w_gmem, v_gmem, o_gmem = refs
    dtype = o_gmem.dtype

    # 1. program -> tile
    pid_m, pid_n = program_tile(num_pid_m, num_pid_n, GROUP_M)
    m_slice = pl.ds(pid_m * BLOCK_M, BLOCK_M)
    n_slice = pl.ds(pid_n * BLOCK_N, BLOCK_N)

    def smem_scope(
        ring: dict[str, Any], o_smem: Any, b_smem: Any, c_smem: Any, epi_bars: Any
    ) -> None:
        # 2. load: bias tiles first (they land during the K loop), then the ring with two weights.
        if has_bias:
            plgpu.copy_gmem_to_smem(b_gmem.at[n_slice], b_smem, epi_bars.at[0])
            plgpu.copy_gmem_to_smem(c_gmem.at[n_slice], c_smem, epi_bars.at[1])
        acc_w, acc_v = k_pipeline(
            x_gmem, (w_gmem, v_gmem), ring, m_slice=m_slice, n_slice=n_slice, block_m=BLOCK_M,
            block_n=BLOCK_N, block_k=BLOCK_K, k_iters=k_iters, num_stages=NUM_STAGES,
        )

        # 3. compute: fp32 epilogue straight from the two accumulators
        if has_bias:
            plgpu.barrier_wait(epi_bars.at[0])
            plgpu.barrier_wait(epi_bars.at[1])
            acc_w = acc_w + row_vector(b_smem, BLOCK_M, interpret=interpret)
            acc_v = acc_v + row_vector(c_smem, BLOCK_M, interpret=interpret)
        h = apply_activation(acc_w, activation) * acc_v

        # 4. store
        store_tile(h.astype(dtype), o_smem, o_gmem.at[m_slice, n_slice])

    pl.run_scoped(
        smem_scope,
        ring=ring_allocations(dtype, BLOCK_M, BLOCK_N, BLOCK_K, NUM_STAGES, num_weights=2),
        o_smem=plgpu.SMEM((BLOCK_M, BLOCK_N), dtype,
                          transforms=pipeline.mma_transforms(BLOCK_N, dtype)),
        b_smem=plgpu.SMEM((BLOCK_N,), dtype) if has_bias else None,
        c_smem=plgpu.SMEM((BLOCK_N,), dtype) if has_bias else None,
        epi_bars=plgpu.Barrier(num_barriers=2),
    )


# ==== launcher ====================================================================================
def gated_fwd(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None,
    v: jax.Array,
    c: jax.Array | None,
    *,
    activation: str,
    config: TileConfig,
    fp32_precision: str = "ieee",
    interpret: bool | None = None,
) -> jax.Array:
    """act(x @ w + b) * (x @ v + c) for 2-D x [M, K], w and v [K, N]; returns [M, N] in x.dtype.

    b and c are both given or both None. Pads M, N, K to the tile multiples and slices the result.
    """
    del fp32_precision
    if interpret is None:
        interpret = interpret_mode()
    m, k = x.shape
    n = w.shape[1]
    if m == 0:
        return jnp.zeros((0, n), x.dtype)
    has_bias = b is not None or c is not None
    if has_bias:  # one bias alone: the other branch gets zeros, so the kernel keeps one variant
        b = b if b is not None else jnp.zeros((n,), x.dtype)
        c = c if c is not None else jnp.zeros((n,), x.dtype)
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    mp, np_, kp = pipeline.round_up(m, bm), pipeline.round_up(n, bn), pipeline.round_up(k, bk)
    operands = [pipeline.pad_to(x, (mp, kp)), pipeline.pad_to(w, (kp, np_)),
                pipeline.pad_to(v, (kp, np_))]
    if has_bias:
        operands += [pipeline.pad_to(b, (np_,)), pipeline.pad_to(c, (np_,))]
    num_pid_m, num_pid_n = mp // bm, np_ // bn
    kernel = functools.partial(
        _gated_fwd_kernel,
        activation=activation,
        has_bias=has_bias,
        num_pid_m=num_pid_m,
        num_pid_n=num_pid_n,
        k_iters=kp // bk,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        GROUP_M=config.group_m,
        NUM_STAGES=config.num_stages,
        interpret=interpret,
    )
    h = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((mp, np_), x.dtype),
        grid=(num_pid_m * num_pid_n,),
        grid_names=("tile",),
        interpret=pipeline.interpret_param(interpret),
        kernel_name="gated_fwd",
    )(*operands)
    return h[:m, :n]


# ==== public function =============================================================================
def gated(
    x: jax.Array,
    w: jax.Array,
    v: jax.Array,
    b: jax.Array | None = None,
    c: jax.Array | None = None,
    *,
    activation: str = "silu",
    config: TileConfig | None = None,
    fp32_precision: str = "ieee",
) -> jax.Array:
    """act(x @ w + b) * (x @ v + c) for x [..., K], w, v [K, N], b, c [N]; returns [..., N]."""
    pipeline.check_common(x, activation, GATED_KERNEL_ACTIVATIONS, config, fp32_precision)
    k = x.shape[-1]
    pipeline.check_array("w", w, None, x.dtype)
    n = w.shape[1]
    pipeline.check_array("w", w, (k, n), x.dtype)
    pipeline.check_array("v", v, (k, n), x.dtype)
    pipeline.check_array("b", b, (n,), x.dtype, optional=True)
    pipeline.check_array("c", c, (n,), x.dtype, optional=True)
    lead = x.shape[:-1]
    m = math.prod(lead)
    x2d = x.reshape(m, k)
    reason = pipeline.unsupported_reason(m, n, k, x.dtype.name)
    if reason is not None:
        raise NotImplementedError(reason)
    interpret = interpret_mode()
    if config is None:
        config = pipeline.default_config(FAMILY, m, n, k, x.dtype.name, interpret=interpret)
    pipeline.check_config(config, x.dtype.name, num_weights=2, residual=False)
    h = gated_fwd(x2d, w, b, v, c, activation=activation, config=config,
                  fp32_precision=fp32_precision, interpret=interpret)
    return h.reshape(*lead, n)
