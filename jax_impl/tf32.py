"""tf32 products as the contract defines them: operands rounded to nearest tf32, then multiplied.

What fp32_precision="tf32" means, and why the kernels round for themselves, is written once in
common/dtypes.py (`round_to_tf32`, the NumPy definition every twin here matches bit for bit). Forms:

- `tf32_operand(t, PRECISION)`: inside a Pallas kernel, a dot operand rounded where PRECISION is
  the kernels' tf32 flag (`jax.lax.Precision.HIGH`; static: nothing is traced otherwise). Every
  dot of the Pallas-Triton kernels reads both operands through it, as its Triton twin does, so the
  interpreters compute the same tf32 products bit for bit (both interpreters' dots are exact).
- `round_to_tf32(t)`: a float32 array rounded (jax.numpy: in a kernel or in XLA alike).
- `emulated_tf32_matmul(a, b)`: on a backend without tf32 products (the CPU), the XLA baseline's
  product of rounded operands, with a custom_vjp whose backward products round theirs as well (as
  XLA's do on a GPU). `baselines.xla` uses it there.

Twin: torch_impl/tf32.py (the same names). twin-diff: no `tf32_copy` — the one-pass rounding in
memory serves torch's TMA kernels, which read their tf32 operands from shared memory as they lie;
JAX's float32 runs Pallas-Triton, whose operands pass through registers (pallas_mosaic takes
16-bit only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from fusedmlp.common.dtypes import (
    FP32_EXPONENT_MASK,
    TF32_DROPPED_BITS,
    TF32_HALF_UNIT,
    TF32_KEPT_MASK,
)

TF32 = lax.Precision.HIGH  # the kernels' dot flag for tf32 (linear_act._precision)


def round_to_tf32(t: jax.Array) -> jax.Array:
    """A float32 array rounded to the nearest tf32 values (common.dtypes' bits)."""
    bits = lax.bitcast_convert_type(t, jnp.uint32)
    lowest_kept = (bits >> TF32_DROPPED_BITS) & 1
    # uint32 addition wraps only on NaN bit patterns, kept below
    rounded = (bits + jnp.uint32(TF32_HALF_UNIT) + lowest_kept) & jnp.uint32(TF32_KEPT_MASK)
    special = (bits & jnp.uint32(FP32_EXPONENT_MASK)) == jnp.uint32(FP32_EXPONENT_MASK)
    return lax.bitcast_convert_type(jnp.where(special, bits, rounded), jnp.float32)


def tf32_operand(t: jax.Array, PRECISION: lax.Precision) -> jax.Array:
    """A dot operand as a tf32 product takes it: `t` rounded to nearest tf32 (float32 tiles under
    the tf32 flag), else `t` unchanged."""
    if PRECISION == TF32:
        return round_to_tf32(t)
    return t


# ---- the CPU baseline's tf32 products ------------------------------------------------------------
@jax.custom_vjp
def emulated_tf32_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b of 2-D float32 operands rounded to tf32, products and sums exact in float32."""
    return jnp.matmul(round_to_tf32(a), round_to_tf32(b), precision=lax.Precision.HIGHEST)


def _forward(a, b):
    return emulated_tf32_matmul(a, b), (a, b)


def _backward(saved, g):
    a, b = saved
    return emulated_tf32_matmul(g, b.T), emulated_tf32_matmul(a.T, g)


emulated_tf32_matmul.defvjp(_forward, _backward)
