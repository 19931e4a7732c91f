"""Baseline of the JAX stack: plain jax.numpy in the spec dtype, run under `jax.jit` (`xla`).

Twin: torch_impl/baselines.py (`eager`, `compile`). The front jits it together with the rest of the
call, so this is exactly what XLA makes of the textbook MLP. It takes the params in either layout,
as the caller holds them (registry layout "any"): plain, or packed (`xla_packed`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fusedmlp.common import MLPSpec
from fusedmlp.common.packing import PACK_BLOCK, is_packed, packed_width

from .tf32 import emulated_tf32_matmul

_ACTIVATIONS = {
    "identity": lambda z: z,
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
}


def _precision(spec: MLPSpec) -> jax.lax.Precision:
    # float32: HIGHEST is IEEE fp32 products; DEFAULT lets XLA use tf32 on GPUs (as torch's "tf32").
    if spec.dtype == "float32" and spec.fp32_precision == "ieee":
        return jax.lax.Precision.HIGHEST
    return jax.lax.Precision.DEFAULT


def emulates_tf32(spec: MLPSpec) -> bool:
    """Whether the baseline's products round their operands to tf32 themselves: float32 "tf32"
    on the CPU backend, which has no tf32 products (XLA on a GPU rounds them under DEFAULT).
    Without this the CPU's "tf32" baseline would be exact float32, and the 2× rule would judge a
    correctly rounding kernel against an error it cannot have (common/dtypes.py).
    twin-diff: asks the default backend (a traced array has no device to ask); torch asks x."""
    tf32 = spec.dtype == "float32" and spec.fp32_precision == "tf32"
    return tf32 and jax.default_backend() == "cpu"


def _matmul(h: jax.Array, w: jax.Array, spec: MLPSpec) -> jax.Array:
    """h·w under the spec's precision, or of tf32-rounded operands (`emulates_tf32`)."""
    if emulates_tf32(spec):
        return emulated_tf32_matmul(h, w)
    return jnp.matmul(h, w, precision=_precision(spec))


def xla(
    x2d: jax.Array, params: dict[str, jax.Array], spec: MLPSpec, residual: jax.Array | None = None
) -> jax.Array:
    """y = MLP(x) with jnp.matmul and jax.nn activations, in the spec dtype. Packed params
    (common/packing.py) run `xla_packed`: the same ops, a gated layer's two products as one."""
    if is_packed(params):
        return xla_packed(x2d, params, spec, residual)
    h = x2d
    for layer in spec.layers():
        i = layer.index
        z = _matmul(h, params[f"w{i}"], spec)
        if layer.bias:
            z = z + params[f"b{i}"]
        out = _ACTIVATIONS[layer.activation](z)
        if layer.gated:
            g = _matmul(h, params[f"v{i}"], spec)
            if layer.bias:
                g = g + params[f"c{i}"]
            out = out * g
        h = out
    return h + residual if residual is not None else h


def xla_packed(
    x2d: jax.Array, params: dict[str, jax.Array], spec: MLPSpec, residual: jax.Array | None = None
) -> jax.Array:
    """`xla` on the packed layout: a gated layer is ONE product with [W|V] interleaved in blocks
    of PACK_BLOCK columns, split by a reshape (no copy of the weights in the plain layout). Same
    products, activations and roundings as `xla`.
    twin-diff: torch's `eager_packed` takes primitives instead of the spec (a compiled FusedMLP
    traces it, and Dynamo must not see a dataclass); jax.jit has no such limit."""
    h = x2d
    for layer in spec.layers():
        i = layer.index
        weight, bias = ("wv", "bc") if layer.gated else ("w", "b")
        z = _matmul(h, params[f"{weight}{i}"], spec)
        if layer.bias:
            z = z + params[f"{bias}{i}"]
        act = _ACTIVATIONS[layer.activation]
        if layer.gated:
            half = packed_width(layer.d_out) // 2
            blocks = z.reshape(z.shape[0], half // PACK_BLOCK, 2, PACK_BLOCK)
            h = (act(blocks[:, :, 0]) * blocks[:, :, 1]).reshape(z.shape[0], half)
            h = h[:, : layer.d_out]
        else:
            h = act(z)
    return h + residual if residual is not None else h
