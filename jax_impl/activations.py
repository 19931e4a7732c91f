"""Activation helpers for the Pallas kernels' fp32 epilogues.

Twin: torch_impl/activations.py (the same expressions, so the two stacks can agree to the last bit).
The activation is a static Python string, so each kernel is traced with exactly one branch. Formulas
are
the float64 reference's (common/reference.py); tanh is written through exp so that both stacks and
both
interpreters evaluate the same expression, and relu is a select so that NaN propagates (a max would
return 0 for NaN on the GPU).
"""

import jax
import jax.numpy as jnp

SQRT_1_2 = 0.7071067811865476  # 1/√2, for erf-gelu
SQRT_2_OVER_PI = 0.7978845608028654  # √(2/π), for tanh-gelu
GELU_TANH_COEFF = 0.044715

ACTIVATION_KEYS = ("identity", "relu", "gelu", "gelu_tanh", "silu")


def tanh(x: jax.Array) -> jax.Array:
    # 1 - 2/(1 + e^{2x}): exact limits at ±inf, NaN propagates; absolute error ~1 ulp of 1.
    return 1.0 - 2.0 / (1.0 + jnp.exp(2.0 * x))


def apply_activation(x: jax.Array, activation: str) -> jax.Array:
    """act(x) for an fp32 tile; activation is one of ACTIVATION_KEYS."""
    if activation == "relu":
        x = jnp.where(x < 0.0, 0.0, x)
    elif activation == "gelu":
        x = 0.5 * x * (1.0 + jax.lax.erf(x * SQRT_1_2))
    elif activation == "gelu_tanh":
        x = 0.5 * x * (1.0 + tanh(SQRT_2_OVER_PI * (x + GELU_TANH_COEFF * x * x * x)))
    elif activation == "silu":
        x = x / (1.0 + jnp.exp(-x))
    return x
