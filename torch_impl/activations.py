"""Activation helpers for the Triton kernels' fp32 epilogues.

Twin: jax_impl/activations.py (the same expressions, so the two stacks can agree to the last bit).
The activation is a string constexpr, so each kernel is compiled with exactly one branch. Formulas
are
the float64 reference's (common/reference.py); tanh is written through exp so that both stacks and
both
interpreters evaluate the same expression, and relu is a select so that NaN propagates (a max would
return 0 for NaN on the GPU).
"""

import triton
import triton.language as tl

# constexpr: the Triton compiler refuses plain Python globals inside @triton.jit code (the
# interpreter accepts them, so only a GPU compile would catch this).
SQRT_1_2 = tl.constexpr(0.7071067811865476)  # 1/√2, for erf-gelu
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # √(2/π), for tanh-gelu
GELU_TANH_COEFF = tl.constexpr(0.044715)

ACTIVATION_KEYS = ("identity", "relu", "gelu", "gelu_tanh", "silu")


@triton.jit
def tanh(x):
    # 1 - 2/(1 + e^{2x}): exact limits at ±inf, NaN propagates; absolute error ~1 ulp of 1.
    return 1.0 - 2.0 / (1.0 + tl.exp(2.0 * x))


@triton.jit
def apply_activation(x, ACTIVATION: tl.constexpr):
    """act(x) for an fp32 tile; ACTIVATION is one of ACTIVATION_KEYS."""
    if ACTIVATION == "relu":
        x = tl.where(x < 0.0, 0.0, x)
    elif ACTIVATION == "gelu":
        x = 0.5 * x * (1.0 + tl.math.erf(x * SQRT_1_2))
    elif ACTIVATION == "gelu_tanh":
        x = 0.5 * x * (1.0 + tanh(SQRT_2_OVER_PI * (x + GELU_TANH_COEFF * x * x * x)))
    elif ACTIVATION == "silu":
        x = x / (1.0 + tl.exp(-x))
    return x
