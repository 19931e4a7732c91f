"""Epilogue helpers for the Triton kernels: the activations on fp32 tiles, and the output rounding.

Twin: jax_impl/activations.py (the same expressions, so the two stacks can agree to the last bit
where their exp agrees: under the interpreters; on a GPU Triton's tl.exp is ex2.approx while
Pallas-Triton calls libdevice's expf). The activation is a string constexpr, so each kernel is
compiled with exactly one branch. Formulas are the float64 reference's (common/reference.py), built
only from exp, +, ×, ÷ and selects, as those lower everywhere: erf has no Pallas-Triton lowering
rule (0.10 or 0.11) and no Mosaic GPU layout rule in jax 0.11, and the twins keep one formula. So
tanh goes through exp, erf-gelu through `erfc` below, and relu is the reference's max(z, 0) with NaN
propagated (`propagate_nan=ALL`: PTX `max.NaN`, one instruction an element on Hopper where the
select it replaced took two — the epilogue of a narrow MLP's layers was 79 % relu and rounding).

`round_to_dtype(x, DTYPE, INTERPRET)` is every kernel's one rounding of an fp32 tile to the output
(or hidden) dtype, in both stacks: a DTYPE tile, rounded to nearest even. Where the rounded value
feeds another dot under the interpreter, the caller upcasts it again, as after a load.
"""

import triton
import triton.language as tl

# constexpr: the Triton compiler refuses plain Python globals inside @triton.jit code (the
# interpreter accepts them, so only a GPU compile would catch this).
SQRT_1_2 = tl.constexpr(0.7071067811865476)  # 1/√2, for erf-gelu
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # √(2/π), for tanh-gelu
GELU_TANH_COEFF = tl.constexpr(0.044715)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1/√(2π), gelu's pdf

ACTIVATION_KEYS = ("identity", "relu", "gelu", "gelu_tanh", "silu")


@triton.jit
def tanh(x):
    # 1 - 2/(1 + e^{2x}): exact limits at ±inf, NaN propagates; absolute error ~1 ulp of 1.
    return 1.0 - 2.0 / (1.0 + tl.exp(2.0 * x))


@triton.jit
def erfc(x):
    # Chebyshev fit of erfc (Press et al., Numerical Recipes, 2nd ed., §6.2): fractional error
    # < 1.2e-7 for every x, so gelu's 1 + erf(x) = erfc(-x) stays accurate where it is tiny.
    z = tl.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    p = -0.82215223 + t * 0.17087277
    p = 1.48851587 + t * p
    p = -1.13520398 + t * p
    p = 0.27886807 + t * p
    p = -0.18628806 + t * p
    p = 0.09678418 + t * p
    p = 0.37409196 + t * p
    p = 1.00002368 + t * p
    r = t * tl.exp(-z * z - 1.26551223 + t * p)
    return tl.where(x >= 0.0, r, 2.0 - r)


@triton.jit
def relu(x):
    """max(x, 0) with NaN propagated, on an fp32 or a float16 tile (exact: a float16 tile's relu
    equals the rounding of its fp32 relu, fused_small.py relies on it; Triton computes a
    bfloat16 max in fp32, so it returns fp32 for one)."""
    return tl.maximum(x, tl.zeros_like(x), propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def apply_activation(x, ACTIVATION: tl.constexpr):
    """act(x) for an fp32 tile; ACTIVATION is one of ACTIVATION_KEYS."""
    if ACTIVATION == "relu":
        x = relu(x)
    elif ACTIVATION == "gelu":
        x = 0.5 * x * erfc(-x * SQRT_1_2)  # = x/2 · (1 + erf(x/√2))
    elif ACTIVATION == "gelu_tanh":
        x = 0.5 * x * (1.0 + tanh(SQRT_2_OVER_PI * (x + GELU_TANH_COEFF * x * x * x)))
    elif ACTIVATION == "silu":
        x = x / (1.0 + tl.exp(-x))
    return x


@triton.jit
def apply_activation_grad(x, ACTIVATION: tl.constexpr):
    """act'(x) for an fp32 tile (the backward, backward.py): reference.activation_grad's formulas
    from the same exp-built helpers; relu' of NaN is NaN there, and here."""
    if ACTIVATION == "relu":
        d = tl.where(x != x, x, tl.where(x > 0.0, 1.0, 0.0))
    elif ACTIVATION == "gelu":
        cdf = 0.5 * erfc(-x * SQRT_1_2)
        pdf = tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
        d = cdf + x * pdf
    elif ACTIVATION == "gelu_tanh":
        t = tanh(SQRT_2_OVER_PI * (x + GELU_TANH_COEFF * x * x * x))
        du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_COEFF * x * x)
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
    elif ACTIVATION == "silu":
        s = 1.0 / (1.0 + tl.exp(-x))
        d = s * (1.0 + x * (1.0 - s))
    else:  # identity
        d = tl.zeros_like(x) + 1.0
    return d


@triton.jit
def activation_and_grad(x, ACTIVATION: tl.constexpr):
    """(act(x), act'(x)) for an fp32 tile: a gated act' step needs both per element. The twin's
    fast forms (one transcendental, gelu_tanh as x·σ(2y)) serve the Mosaic GPU epilogues; here
    the reference's expressions, the bits of the two calls (`apply_activation`,
    `apply_activation_grad`), inlined into one kernel."""
    return apply_activation(x, ACTIVATION), apply_activation_grad(x, ACTIVATION)


@triton.jit
def round_to_dtype(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """An fp32 tile rounded to DTYPE (round to nearest even), as a DTYPE tile."""
    if INTERPRET and DTYPE == tl.bfloat16:  # noqa: SIM300 (DTYPE is the constexpr)
        # Interpreter only: its fp32 -> bf16 cast truncates (523 of 1000 randn values off by one
        # ulp) and its "rtne" mode loses the carry into the exponent, so round to nearest even on
        # the bits; NaN stays a quiet NaN.
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        out = (bits >> 16).to(tl.uint16)
        out = tl.where(x != x, 0x7FC0, out).to(tl.uint16)
        return out.to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)
