"""Baseline of the JAX stack: plain jax.numpy in the spec dtype, run under `jax.jit` (`xla`).

Twin: torch_impl/baselines.py (`eager`, `compile`). The front jits it together with the rest of the
call, so this is exactly what XLA makes of the textbook MLP.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fusedmlp.common import MLPSpec

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


def xla(
    x2d: jax.Array, params: dict[str, jax.Array], spec: MLPSpec, residual: jax.Array | None = None
) -> jax.Array:
    """y = MLP(x) with jnp.matmul and jax.nn activations, in the spec dtype."""
    precision = _precision(spec)
    h = x2d
    for layer in spec.layers():
        i = layer.index
        z = jnp.matmul(h, params[f"w{i}"], precision=precision)
        if layer.bias:
            z = z + params[f"b{i}"]
        out = _ACTIVATIONS[layer.activation](z)
        if layer.gated:
            g = jnp.matmul(h, params[f"v{i}"], precision=precision)
            if layer.bias:
                g = g + params[f"c{i}"]
            out = out * g
        h = out
    return h + residual if residual is not None else h
