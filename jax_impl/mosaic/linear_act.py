"""linear_act on Mosaic GPU: y = act(x·W + b) (+ residual), the epilogue fused after wgmma.

    y[m, n] = act(Σ_k x[m, k]·W[k, n] + b[n]) + r[m, n]      (fp32 epilogue, rounded once)

Grid: 1-D, one program (CUDA block = one warpgroup) per BLOCK_M × BLOCK_N output tile, in Triton's
grouped order (`pipeline.program_tile`). Each program streams its row of X slabs and its column of
W slabs through a `num_stages`-slot shared-memory ring, filled by TMA and drained by wgmma into one
fp32 accumulator in registers (`pipeline.k_pipeline`). Bias and residual tiles are fetched by TMA
before the K loop so they land while it runs. The epilogue reads the accumulator once, adds the
bias, applies the activation, adds the residual, casts, and stores the tile through shared memory
with a TMA copy. Nothing is saved for a backward pass (forward only).

Sibling, not twin: jax_impl/linear_act.py (Pallas-Triton) and torch_impl/linear_act.py (Triton)
export the same names; the dispatcher picks this module for impl "pallas_mosaic". fp16/bf16 only;
float32 raises NotImplementedError naming the fallback. Without a GPU the kernel runs under the
Mosaic GPU interpreter (`interpret=None` picks it).
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
from ...common.spec import KERNEL_ACTIVATIONS
from ..activations import apply_activation
from ..compat import interpret_mode
from . import pipeline
from .pipeline import k_pipeline, program_tile, ring_allocations, row_vector, store_tile

FAMILY = "linear_act"


# ==== forward kernel ==============================================================================
def _linear_act_fwd_kernel(
    *refs: Any,
    activation: str,
    has_bias: bool,
    has_residual: bool,
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
    x_gmem, w_gmem, *rest = refs
    b_gmem = rest.pop(0) if has_bias else None
    r_gmem = rest.pop(0) if has_residual else None
    (o_gmem,) = rest
    dtype = o_gmem.dtype

    # 1. program -> tile
    pid_m, pid_n = program_tile(num_pid_m, num_pid_n, GROUP_M)
    m_slice = pl.ds(pid_m * BLOCK_M, BLOCK_M)
    n_slice = pl.ds(pid_n * BLOCK_N, BLOCK_N)

    def smem_scope(
        ring: dict[str, Any], o_smem: Any, b_smem: Any, r_smem: Any, epi_bars: Any
    ) -> None:
        # 2. load: epilogue operands first (they arrive during the K loop), then the K ring.
        if has_bias:
            plgpu.copy_gmem_to_smem(b_gmem.at[n_slice], b_smem, epi_bars.at[0])
        if has_residual:
            plgpu.copy_gmem_to_smem(r_gmem.at[m_slice, n_slice], r_smem, epi_bars.at[1])
        (acc,) = k_pipeline(
            x_gmem, (w_gmem,), ring, m_slice=m_slice, n_slice=n_slice, block_m=BLOCK_M,
            block_n=BLOCK_N, block_k=BLOCK_K, k_iters=k_iters, num_stages=NUM_STAGES,
        )

        # 3. compute: fp32 epilogue straight from the accumulator
        if has_bias:
            plgpu.barrier_wait(epi_bars.at[0])
            acc = acc + row_vector(b_smem, BLOCK_M, interpret=interpret)
        acc = apply_activation(acc, activation)
        if has_residual:
            plgpu.barrier_wait(epi_bars.at[1])
            acc = acc + r_smem[...].astype(jnp.float32)

        # 4. store
        store_tile(acc.astype(dtype), o_smem, o_gmem.at[m_slice, n_slice])

    out_transforms = pipeline.mma_transforms(BLOCK_N, dtype)
    pl.run_scoped(
        smem_scope,
        ring=ring_allocations(dtype, BLOCK_M, BLOCK_N, BLOCK_K, NUM_STAGES, num_weights=1),
        o_smem=plgpu.SMEM((BLOCK_M, BLOCK_N), dtype, transforms=out_transforms),
        b_smem=plgpu.SMEM((BLOCK_N,), dtype) if has_bias else None,
        r_smem=plgpu.SMEM((BLOCK_M, BLOCK_N), dtype, transforms=out_transforms)
        if has_residual else None,
        epi_bars=plgpu.Barrier(num_barriers=2),
    )


# ==== launcher ====================================================================================
def linear_act_fwd(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None,
    residual: jax.Array | None,
    *,
    activation: str,
    config: TileConfig,
    fp32_precision: str = "ieee",
    interpret: bool | None = None,
) -> jax.Array:
    """act(x @ w + b) (+ residual) for 2-D x [M, K], w [K, N]; returns [M, N] in x.dtype.

    Pads M, N, K to the tile multiples (TMA moves whole boxes; zero K padding adds nothing) and
    slices the result. M = 0 returns an empty array without a launch. fp32_precision is taken for
    the twins' signature: 16-bit products are exact in the fp32 accumulator.
    """
    del fp32_precision
    if interpret is None:
        interpret = interpret_mode()
    m, k = x.shape
    n = w.shape[1]
    if m == 0:
        return jnp.zeros((0, n), x.dtype)
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    mp, np_, kp = pipeline.round_up(m, bm), pipeline.round_up(n, bn), pipeline.round_up(k, bk)
    operands = [pipeline.pad_to(x, (mp, kp)), pipeline.pad_to(w, (kp, np_))]
    if b is not None:
        operands.append(pipeline.pad_to(b, (np_,)))
    if residual is not None:
        operands.append(pipeline.pad_to(residual, (mp, np_)))
    num_pid_m, num_pid_n = mp // bm, np_ // bn
    kernel = functools.partial(
        _linear_act_fwd_kernel,
        activation=activation,
        has_bias=b is not None,
        has_residual=residual is not None,
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
    y = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((mp, np_), x.dtype),
        grid=(num_pid_m * num_pid_n,),
        grid_names=("tile",),
        interpret=pipeline.interpret_param(interpret),
        kernel_name="linear_act_fwd",
    )(*operands)
    return y[:m, :n]


# ==== public function =============================================================================
def linear_act(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None = None,
    *,
    activation: str = "identity",
    residual: jax.Array | None = None,
    config: TileConfig | None = None,
    fp32_precision: str = "ieee",
) -> jax.Array:
    """act(x @ w + b) (+ residual) for x [..., K], w [K, N], b [N]; returns [..., N] in x.dtype."""
    pipeline.check_common(x, activation, KERNEL_ACTIVATIONS, config, fp32_precision)
    k = x.shape[-1]
    pipeline.check_array("w", w, None, x.dtype)
    n = w.shape[1]
    pipeline.check_array("w", w, (k, n), x.dtype)
    pipeline.check_array("b", b, (n,), x.dtype, optional=True)
    pipeline.check_array("residual", residual, (*x.shape[:-1], n), x.dtype,
                         optional=True)
    lead = x.shape[:-1]
    m = math.prod(lead)
    x2d = x.reshape(m, k)
    reason = pipeline.unsupported_reason(m, n, k, x.dtype.name)
    if reason is not None:
        raise NotImplementedError(reason)
    interpret = interpret_mode()
    if config is None:
        config = pipeline.default_config(FAMILY, m, n, k, x.dtype.name, interpret=interpret)
    pipeline.check_config(config, x.dtype.name, num_weights=1, residual=residual is not None)
    r2d = residual.reshape(m, n) if residual is not None else None
    y = linear_act_fwd(x2d, w, b, r2d, activation=activation, config=config,
                       fp32_precision=fp32_precision, interpret=interpret)
    return y.reshape(*lead, n)
