"""fused_small from PyTorch: jax_impl/mosaic/fused_small.py's Mosaic GPU kernel on torch tensors
(Hopper GPU only) — where torch's fused_small takes its Mosaic GPU sibling
(torch_impl/fused_small._takes_mosaic_sibling: 128 wide, every width 128).

    h_0 = x;   h_{l+1} = round(act(h_l·W_l + b_l));   y = h_{L-1}·W_{L-1} + b_{L-1}

Why a JAX kernel in the torch stack: a 128-wide layer is 32 KiB of weights, so a deep 128-wide MLP
does not fit one SM's shared memory beside its row tiles. The Triton kernel's 64-row programs read
every layer from L2 for every tile (256 KiB a tile at 8 layers; 128-row programs over 8 warps
measured slower), while the Mosaic GPU sibling's block holds two 64-row warpgroup chains that take
their tiles in step and read each layer from one TMA-refilled ring of two slots they share (H200,
128x8 relu fp16, 1M rows: 350.6 µs, 784 TFLOP/s, where the Triton kernel takes 672). Triton 3.6
gives no hold on shared memory across a loop of dots; Mosaic GPU does. So torch runs the same
compiled kernel as JAX's front, and the two stacks give the same bits.

How the call is made: as torch_impl/cross/linear_act.py (its docstring: one bare Mosaic GPU call
per traced function, dense operands, the launch on the current stream, the compiled kernel
cached per shape, jax >= 0.11.1 imported lazily). What the JAX launcher would pad
— x's rows to whole 8-row TMA atoms (`padded_rows`), weights and bias rows to the kernel's
geometry (`layer_params`: nothing at 128 wide) — is padded here, so the function handed to
as_torch_kernel traces to the bare kernel call (checked on a CPU by lowering for CUDA).

In a CUDA graph: the launch goes to the current stream (cross/launcher.py), so a capture records
it, once the call's shape has been compiled by an eager call before the capture (a compile
inside one is refused by name). (While its launch went through as_torch_kernel to the default
stream, torch's front planned the Triton kernel in a graph instead.)

Twin: none — the JAX front calls jax_impl/mosaic/fused_small.py directly.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import torch

from fusedmlp.common.spec import MLPSpec

from .linear_act import (
    MOSAIC_PACKAGE,
    MosaicLaunch,
    compiled_kernel,
    mosaic_module,
    pad1d,
    pad2d,
    run,
)
from .linear_act import (  # re-exported: torch_impl/fused_small.py asks it here, the tests pin it
    unavailable_reason as unavailable_reason,
)

FAMILY = "fused_small"


# ==== where this route can run ====================================================================
def sibling_config(spec: MLPSpec, m: int) -> Any:
    """The sibling's default tiles for this spec (jax_impl.mosaic.fused_small.default_config):
    what the front's plan records as the launch's config, which pins this route."""
    return mosaic_module(FAMILY).default_config(spec, m)


def is_sibling_config(config: object) -> bool:
    """Whether `config` is the Mosaic GPU sibling's (a MosaicSmallConfig): a plan's pin of this
    route. Asked without importing jax where it was never imported."""
    module = sys.modules.get(f"{MOSAIC_PACKAGE}.{FAMILY}")
    return module is not None and isinstance(config, module.MosaicSmallConfig)


# ==== launch plan (pure) ==========================================================================
@functools.lru_cache(maxsize=1024)
def launch_plan(m: int, spec: MLPSpec, config: Any) -> tuple[MosaicLaunch, tuple, int]:
    """(the padded extents, each layer's weight shape, the bias rows' length) of one launch: x's
    rows as the JAX launcher pads them (`padded_rows`) and the kernel's geometry. Checks the
    config once per shape (ValueError where its blocks do not fit shared memory)."""
    sibling = mosaic_module(FAMILY)
    geo = sibling.geometry(spec, config)
    sibling.check_config(geo)
    mp = sibling.padded_rows(m, config.block_m, False)
    plan = MosaicLaunch(m, spec.d_out, spec.d_in, mp, spec.d_out, spec.d_in, ())
    weights = tuple(geo.weight_shape(i) for i in range(spec.num_layers))
    return plan, weights, geo.bias_len if spec.bias else 0


def operands(
    x2d: torch.Tensor, params: dict[str, torch.Tensor], spec: MLPSpec, config: Any
) -> tuple[list[torch.Tensor], MosaicLaunch]:
    """x, every layer's weight, then every bias row (with biases), dense and padded where the JAX
    launcher would pad them (no copy where they already have the shape), and the plan."""
    plan, weight_shapes, bias_len = launch_plan(x2d.shape[0], spec, config)
    ops = [pad2d(x2d, plan.mp, spec.d_in)]
    ops += [pad2d(params[f"w{i}"], *shape) for i, shape in enumerate(weight_shapes)]
    if bias_len:
        ops += [pad1d(params[f"b{i}"], bias_len) for i in range(spec.num_layers)]
    return ops, plan


# ==== launcher ====================================================================================
@functools.cache
def mosaic_function(spec: MLPSpec, config: Any) -> Callable[..., Any]:
    """The JAX function handed to as_torch_kernel for one spec and config: the sibling's launcher
    on operands it need not pad, so it traces to the bare Mosaic GPU call."""
    sibling = mosaic_module(FAMILY)
    layers = spec.num_layers

    def fn(x: Any, *rest: Any) -> Any:
        params = {f"w{i}": w for i, w in enumerate(rest[:layers])}
        params |= {f"b{i}": b for i, b in enumerate(rest[layers:])}
        return sibling.fused_small_fwd(x, params, spec, config=config, interpret=False)

    fn.__name__ = f"fused_small_fwd_{spec.base_activation}"
    return fn


def prepared(
    x2d: torch.Tensor, params: dict[str, torch.Tensor], spec: MLPSpec, config: Any
) -> tuple[Callable[..., torch.Tensor], list[torch.Tensor], MosaicLaunch]:
    """(the compiled kernel, its operands, the plan) of one call: compiled on the first call of
    these shapes (a Mosaic GPU kernel is compiled per shape, so per padded M), then looked up."""
    ops, plan = operands(x2d, params, spec, config)

    def make() -> Callable[..., Any]:
        return mosaic_function(spec, config)

    return compiled_kernel((FAMILY, spec, config), make, ops), ops, plan


def fused_small_fwd(
    x2d: torch.Tensor, params: dict[str, torch.Tensor], spec: MLPSpec, *, config: Any
) -> torch.Tensor:
    """y = MLP(x) for a 2-D x [M, d_in] (M >= 1) and the plain params `w{i}`, `b{i}` of a spec the
    sibling takes, at the sibling's `config` (a MosaicSmallConfig), on a Hopper GPU; returns
    [M, d_out]. Trusts its inputs, as torch_impl.fused_small.fused_small_fwd does."""
    kernel, ops, plan = prepared(x2d, params, spec, config)
    return run(kernel, ops, plan)
