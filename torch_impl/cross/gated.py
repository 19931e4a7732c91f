"""gated from PyTorch: jax_impl/mosaic/gated.py's Mosaic GPU kernel on torch tensors (impl `mosaic`,
Hopper GPU only).

    h[m, n] = act(Σ_k x[m, k]·W[k, n] + b[n]) · (Σ_k x[m, k]·V[k, n] + c[n])   (fp32, one rounding)

Grid, tiles, pipeline: the Mosaic GPU sibling's (one X tile feeds both wgmma accumulators), from the
same TileConfig. Called through the per-shape compile of `as_torch_kernel` on operands padded in
torch only where the JAX launcher would pad them, exactly as linear_act (see its docstring: one
bare Mosaic GPU call per traced function, dense operands, the default-stream launch, the cached
compiled callable, jax >= 0.11.1, lazy jax import).

As in the JAX launcher, one bias alone gets zeros for the other branch (one kernel variant).

Twin: jax_impl/cross/gated.py (the Triton kernel called from JAX), the other direction.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from fusedmlp.common.config import TileConfig

from .linear_act import (
    check_launchable,
    check_operand,
    compiled_kernel,
    mosaic_module,
    pad1d,
    pad2d,
    padded_shapes,
    run,
)

FAMILY = "gated"


# ==== launcher ====================================================================================
@functools.cache
def mosaic_function(activation: str, has_bias: bool, config: TileConfig) -> Callable[..., Any]:
    """The JAX function handed to as_torch_kernel: the JAX launcher on tile-aligned operands."""
    mosaic = mosaic_module(FAMILY)

    def fn(x: Any, w: Any, v: Any, *rest: Any) -> Any:
        b, c = rest if has_bias else (None, None)
        return mosaic.gated_fwd(
            x, w, b, v, c, activation=activation, config=config, interpret=False
        )

    fn.__name__ = f"gated_fwd_{activation}"
    return fn


def gated_fwd(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    v: torch.Tensor,
    c: torch.Tensor | None,
    *,
    activation: str,
    config: TileConfig,
    fp32_precision: str = "ieee",
) -> torch.Tensor:
    """act(x @ w + b) * (x @ v + c) for 2-D x [M, K], w and v [K, N] on a Hopper GPU; returns
    [M, N]. fp32_precision is accepted for the siblings' signature (16-bit products are exact)."""
    del fp32_precision
    m, k = x.shape
    n = w.shape[1]
    if m == 0:
        return x.new_empty((0, n))
    check_operand(x)
    plan = padded_shapes(m, n, k, config, FAMILY)
    operands = [
        pad2d(x, plan.mp, plan.kp), pad2d(w, plan.kp, plan.np_), pad2d(v, plan.kp, plan.np_)
    ]
    has_bias = b is not None or c is not None
    if has_bias:
        b = b if b is not None else x.new_zeros((n,))
        c = c if c is not None else x.new_zeros((n,))
        operands += [pad1d(b, plan.np_), pad1d(c, plan.np_)]

    def make() -> Callable[..., Any]:
        check_launchable(x, config, num_weights=2, residual=False)
        return mosaic_function(activation, has_bias, config)

    kernel = compiled_kernel((FAMILY, activation, has_bias, config), make, operands)
    return run(kernel, operands, plan)
