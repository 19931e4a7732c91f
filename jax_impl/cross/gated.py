"""gated from JAX: torch_impl/gated.py's Triton kernel on jax arrays (impl `jax_triton`, GPU only).

    h[m, n] = act(Σ_k x[m, k]·W[k, n] + b[n]) · (Σ_k x[m, k]·V[k, n] + c[n])   (fp32, one rounding)

with W|V and b|c packed (`wv` [K, 2·Np], `bc` [2·Np], common/packing.py), as the native kernel
takes them. Grid, tiles, masks, constexprs: the native launcher's
(`fusedmlp.torch_impl.gated.gated_fwd`), one program per BLOCK_M × BLOCK_N tile of h in grouped
order, from the same TileConfig. The call goes through `jax_triton.triton_call` with M, N, K and
the strides as compile-time constants and the native kernel called directly (the adapter
`_gated_fwd_jt` is the route for a kernel whose pointers are not first), exactly as linear_act:
see its docstring for the why (the 5.9× of runtime shapes), the placeholder pointers and the
lazy imports (`fusedmlp.torch_impl`, hence torch, is imported on the first call).

Twin: torch_impl/cross/gated.py (the Mosaic GPU kernel called from torch), the other direction.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from fusedmlp.common.config import TileConfig
from fusedmlp.common.packing import packed_width
from fusedmlp.common.tiling import gated_config

from .linear_act import TritonLaunch, call, import_native, kernel_for_jax_triton, tile_launch

FAMILY = "gated"
NATIVE_MODULE = "fusedmlp.torch_impl.gated"
NATIVE_KERNEL = "_gated_fwd_kernel"

# Bound on the first call (`native_kernel`), before Triton compiles the adapter that calls it.
_gated_fwd_kernel: Any = None


# ==== forward kernel ==============================================================================
@triton.jit
def _gated_fwd_jt(
    x_ptr, wv_ptr, bc_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wvk, stride_wvn, stride_om, stride_on,
    o_ptr,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # jax_triton's argument order (outputs last) -> the native kernel's, by name; inlined by Triton.
    _gated_fwd_kernel(
        x_ptr=x_ptr, wv_ptr=wv_ptr, bc_ptr=bc_ptr, o_ptr=o_ptr,
        M=M, N=N, K=K,
        stride_xm=stride_xm, stride_xk=stride_xk, stride_wvk=stride_wvk, stride_wvn=stride_wvn,
        stride_om=stride_om, stride_on=stride_on,
        ACTIVATION=ACTIVATION, HAS_BIAS=HAS_BIAS, INPUT_PRECISION=INPUT_PRECISION,
        INTERPRET=INTERPRET,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M,
    )  # fmt: skip


def native_kernel(*, require_compiled: bool = True) -> Any:
    """torch_impl's `_gated_fwd_kernel`, bound for the adapter on the first call."""
    global _gated_fwd_kernel
    if _gated_fwd_kernel is None:
        _gated_fwd_kernel = import_native(
            NATIVE_MODULE, NATIVE_KERNEL, require_compiled=require_compiled
        )
    return _gated_fwd_kernel


# ==== launch plan (pure) ==========================================================================
def launch_plan(
    m: int,
    n: int,
    k: int,
    *,
    activation: str,
    has_bias: bool,
    config: TileConfig,
    fp32_precision: str = "ieee",
    interpret: bool = False,
) -> TritonLaunch:
    """The native launcher's launch of `_gated_fwd_kernel` for dense row-major operands
    (x [m, k], wv [k, packed_width(n)], bc [packed_width(n)], h [m, n]).

    has_bias covers the packed bc (HAS_BIAS, as the native launcher); without it the pointer is
    the placeholder "x", never loaded.
    """
    width = packed_width(n)
    config = gated_config(config)  # as the native launcher: block_n at least one packed pair
    return tile_launch(
        m,
        n,
        k,
        config,
        arrays={"x_ptr": "x", "wv_ptr": "wv", "bc_ptr": "bc" if has_bias else "x"},
        strides=dict(
            stride_xm=k, stride_xk=1, stride_wvk=width, stride_wvn=1, stride_om=n, stride_on=1
        ),
        flags=dict(ACTIVATION=activation, HAS_BIAS=has_bias),
        fp32_precision=fp32_precision,
        interpret=interpret,
    )


# ==== launcher ====================================================================================
def gated_fwd(
    x: jax.Array,
    wv: jax.Array,
    bc: jax.Array | None,
    *,
    n: int,
    activation: str,
    config: TileConfig,
    fp32_precision: str = "ieee",
) -> jax.Array:
    """act(x @ w + b) * (x @ v + c) for 2-D x [M, K] and the packed wv [K, packed_width(n)], bc
    [packed_width(n)] or None; returns [M, n] in x.dtype. The native Triton kernel through
    jax_triton (GPU only); trusts input."""
    m, k = x.shape
    if m == 0 or n == 0:
        return jnp.zeros((m, n), x.dtype)
    plan = launch_plan(
        m,
        n,
        k,
        activation=activation,
        has_bias=bc is not None,
        config=config,
        fp32_precision=fp32_precision,
    )
    kernel = kernel_for_jax_triton(native_kernel(), _gated_fwd_jt, ("o_ptr",), plan.scalars)
    operands = {"x": x, "wv": wv, "bc": bc}
    return call(plan, kernel, operands, jax.ShapeDtypeStruct((m, n), x.dtype), name="gated_fwd")
