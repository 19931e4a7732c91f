"""gated from PyTorch: jax_impl/mosaic/gated.py's Mosaic GPU kernel on torch tensors (impl `mosaic`,
Hopper GPU only).

    h[m, n] = act(Σ_k x[m, k]·W[k, n] + b[n]) · (Σ_k x[m, k]·V[k, n] + c[n])   (fp32, one rounding)

Grid, tiles, pipeline: the Mosaic GPU sibling's (one wgmma over the packed [W|V] operand, the
epilogue splits gate and up), from the same TileConfig. Called through the per-shape compile of
`as_torch_kernel` on operands padded in torch only where the JAX launcher would pad them, exactly
as linear_act (see its docstring: one bare Mosaic GPU call per traced function, dense operands,
the default-stream launch, the cached compiled callable, jax >= 0.11.1, lazy jax import).

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
def mosaic_function(
    activation: str, has_bias: bool, n: int, config: TileConfig
) -> Callable[..., Any]:
    """The JAX function handed to as_torch_kernel: the JAX launcher on operands it need not pad."""
    mosaic = mosaic_module(FAMILY)

    def fn(x: Any, wv: Any, *rest: Any) -> Any:
        bc = rest[0] if has_bias else None
        return mosaic.gated_fwd(
            x, wv, bc, n=n, activation=activation, config=config, interpret=False
        )

    fn.__name__ = f"gated_fwd_{activation}"
    return fn


def gated_fwd(
    x: torch.Tensor,
    wv: torch.Tensor,
    bc: torch.Tensor | None,
    *,
    n: int,
    activation: str,
    config: TileConfig,
    fp32_precision: str = "ieee",
) -> torch.Tensor:
    """act(x @ w + b) * (x @ v + c) for 2-D x [M, K] and the packed wv [K, 2·Np], bc [2·Np] (or
    None, common/packing.py) of a layer of width n, on a Hopper GPU; returns [M, n].
    fp32_precision is accepted for the siblings' signature (16-bit products are exact)."""
    del fp32_precision
    m, k = x.shape
    if m == 0:
        return x.new_empty((0, n))
    check_operand(x)
    plan = padded_shapes(m, n, k, config, FAMILY)
    width = max(wv.shape[1], 2 * plan.np_)  # > the packed width only where whole tiles are padded
    operands = [pad2d(x, plan.mp, plan.kp), pad2d(wv, plan.kp, width)]
    if bc is not None:
        operands.append(pad1d(bc, width))

    def make() -> Callable[..., Any]:
        check_launchable(x, config, num_weights=2, residual=False)
        return mosaic_function(activation, bc is not None, n, config)

    kernel = compiled_kernel((FAMILY, activation, bc is not None, n, config), make, operands)
    return run(kernel, operands, plan)
