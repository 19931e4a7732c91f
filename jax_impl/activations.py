"""Epilogue helpers for the Pallas kernels: the activations on fp32 tiles, and the output rounding.

Twin: torch_impl/activations.py (the same expressions, so the two stacks can agree to the last bit
where their exp agrees: under the interpreters; on a GPU Triton's tl.exp is ex2.approx while
Pallas-Triton calls libdevice's expf). The activation is a static Python string, so each kernel is
traced with exactly one branch. Formulas are the float64 reference's (common/reference.py), built
only from exp, +, ×, ÷ and selects, as those lower everywhere: erf has no Pallas-Triton lowering
rule (0.10 or 0.11) and no Mosaic GPU layout rule in jax 0.11 — both found by lowering for CUDA on a
CPU. So tanh goes through exp, erf-gelu through `erfc` below, and relu is the reference's max(z, 0)
with NaN propagated: a select here (`relu`), as Pallas-Triton's max drops NaN.

`fast=True` (the Mosaic GPU kernels, with `approx_math`: jax_impl/mosaic/pipeline.py) computes
the same formulas with every reciprocal of a denominator ≥ 1 as rsqrt(d)², i.e. `rsqrt.approx.f32`
(≤ 2^-22.9 relative) and a product, instead of an IEEE division — whose ~10-instruction sequence
(a Newton step and a slow-path branch) Mosaic GPU emits for `/` — and exp as `ex2.approx` of
x·log2(e), which is what Triton's `tl.exp` does; gelu_tanh there takes its sigmoid form
x·σ(2y) (one ex2.approx with log2(e) folded into its constants, one rsqrt.approx: 16 operations
an element for act and act' together where the tanh form takes 25), and `activation_and_grad`
gives act and act' from one transcendental. Pallas-Triton and the Triton twins keep `/` and the
reference's expressions.

`round_to_dtype(x, DTYPE, INTERPRET)` is every kernel's one rounding of an fp32 tile to the output
(or hidden) dtype, in both stacks: a DTYPE tile, rounded to nearest even. Where the rounded value
feeds another dot under the interpreter, the caller upcasts it again, as after a load.
"""

import jax
import jax.numpy as jnp
from jax import lax

SQRT_1_2 = 0.7071067811865476  # 1/√2, for erf-gelu
SQRT_2_OVER_PI = 0.7978845608028654  # √(2/π), for tanh-gelu
GELU_TANH_COEFF = 0.044715
_INV_SQRT_2PI = 0.3989422804014327  # 1/√(2π), gelu's normal density
# fast gelu_tanh as x·σ(2y), y = √(2/π)·(x + 0.044715·x³): 1 + tanh(y) = 2σ(2y), so
# x/2·(1 + tanh(y)) = x·σ(2y), and σ(2y) = 1/(1 + 2^(x·(A0 + A1·x²))) with log2(e) folded into the
# constants; its derivative is σ·(1 + x·(1 − σ)·(B0 + B1·x²)), B0 + B1·x² = 2·dy/dx.
_LOG2E = 1.4426950408889634
_GELU_TANH_A0 = -2.0 * SQRT_2_OVER_PI * _LOG2E
_GELU_TANH_A1 = _GELU_TANH_A0 * GELU_TANH_COEFF
_GELU_TANH_B0 = 2.0 * SQRT_2_OVER_PI
_GELU_TANH_B1 = 6.0 * SQRT_2_OVER_PI * GELU_TANH_COEFF

ACTIVATION_KEYS = ("identity", "relu", "gelu", "gelu_tanh", "silu")


def _reciprocal(d: jax.Array, fast: bool = False) -> jax.Array:
    """1/d for d ≥ 1 (every denominator below: 1 + e^y, 1 + z/2), or NaN. fast: rsqrt(d)², one
    MUFU op and a product (d = inf gives 0, NaN stays NaN), not an IEEE division."""
    if fast:
        r = lax.rsqrt(d)
        return r * r
    return 1.0 / d


def tanh(x: jax.Array, fast: bool = False) -> jax.Array:
    # 1 - 2/(1 + e^{2x}): exact limits at ±inf, NaN propagates; absolute error ~1 ulp of 1.
    d = 1.0 + jnp.exp(2.0 * x)
    return 1.0 - (2.0 * _reciprocal(d, fast) if fast else 2.0 / d)


def _gelu_tanh_sigmoid(x: jax.Array) -> jax.Array:
    """σ(2y) of fast gelu_tanh (the constants' comment): one ex2.approx and one rsqrt.approx,
    NaN kept; 2^(...) = inf past x ≈ -11 gives σ = 0, as it should."""
    return _reciprocal(1.0 + jnp.exp2(x * (_GELU_TANH_A0 + _GELU_TANH_A1 * x * x)), fast=True)


def erfc(x: jax.Array, fast: bool = False) -> jax.Array:
    # Chebyshev fit of erfc (Press et al., Numerical Recipes, 2nd ed., §6.2): fractional error
    # < 1.2e-7 for every x, so gelu's 1 + erf(x) = erfc(-x) stays accurate where it is tiny.
    z = jnp.abs(x)
    t = _reciprocal(1.0 + 0.5 * z, fast)
    p = -0.82215223 + t * 0.17087277
    p = 1.48851587 + t * p
    p = -1.13520398 + t * p
    p = 0.27886807 + t * p
    p = -0.18628806 + t * p
    p = 0.09678418 + t * p
    p = 0.37409196 + t * p
    p = 1.00002368 + t * p
    r = t * jnp.exp(-z * z - 1.26551223 + t * p)
    return jnp.where(x >= 0.0, r, 2.0 - r)


def relu(x: jax.Array) -> jax.Array:
    """max(x, 0) with NaN propagated, on an fp32 tile (exact: the rounding of the relu is the relu
    of the rounding, which fused_small's float16 path uses, there through inline PTX).
    twin-diff: a select, not `jnp.maximum`: Pallas-Triton lowers lax.max to `arith.maxnumf`
    (PTX `max`, which returns the number when the other operand is NaN) where Triton's
    `propagate_nan=ALL` gives `max.NaN`. `x <= 0` (not `x < 0`) makes -0.0 give +0.0 as the
    max does, so the twins agree to the bit."""
    return jnp.where(x <= 0.0, 0.0, x)


def apply_activation(x: jax.Array, activation: str, fast: bool = False) -> jax.Array:
    """act(x) for an fp32 tile; activation is one of ACTIVATION_KEYS; fast: the reciprocals as
    rsqrt(d)² (the module docstring)."""
    if activation == "relu":
        x = relu(x)
    elif activation == "gelu":
        x = 0.5 * x * erfc(-x * SQRT_1_2, fast)  # = x/2 · (1 + erf(x/√2))
    elif activation == "gelu_tanh" and fast:
        x = x * _gelu_tanh_sigmoid(x)
    elif activation == "gelu_tanh":
        x = 0.5 * x * (1.0 + tanh(SQRT_2_OVER_PI * (x + GELU_TANH_COEFF * x * x * x), fast))
    elif activation == "silu":
        x = x / (1.0 + jnp.exp(-x)) if not fast else x * _reciprocal(1.0 + jnp.exp(-x), fast)
    return x


def apply_activation_grad(x: jax.Array, activation: str, fast: bool = False) -> jax.Array:
    """act'(x) for an fp32 tile (the backward, backward.py): reference.activation_grad's formulas
    from the same exp-built helpers; relu' of NaN is NaN there, and here. fast: the reciprocals
    as rsqrt(d)² (the module docstring)."""
    return activation_and_grad(x, activation, fast)[1]


def activation_and_grad(
    x: jax.Array, activation: str, fast: bool = False
) -> tuple[jax.Array, jax.Array]:
    """(act(x), act'(x)) for an fp32 tile, the two sharing their transcendental part — one tanh
    for gelu_tanh, one sigmoid for silu, one erfc for gelu — each the expression
    `apply_activation` / `apply_activation_grad` write. A gated act' step needs both per element
    (dz = dout·u·act'(z), du = dout·act(z)); computed apart they cost twice the exp and division
    work, which an epilogue that is issue-bound pays in full (the Mosaic GPU act' step)."""
    if activation == "relu":
        return relu(x), jnp.where(x != x, x, jnp.where(x > 0.0, 1.0, 0.0))
    if activation == "gelu":
        e = erfc(-x * SQRT_1_2, fast)  # 1 + erf(x/√2)
        pdf = jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI
        return 0.5 * x * e, 0.5 * e + x * pdf
    if activation == "gelu_tanh" and fast:  # 16 operations an element, the tanh form 25
        s = _gelu_tanh_sigmoid(x)
        return x * s, s * (1.0 + x * (1.0 - s) * (_GELU_TANH_B0 + _GELU_TANH_B1 * x * x))
    if activation == "gelu_tanh":
        t = tanh(SQRT_2_OVER_PI * (x + GELU_TANH_COEFF * x * x * x), fast)
        du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_COEFF * x * x)
        return 0.5 * x * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
    if activation == "silu":
        d = 1.0 + jnp.exp(-x)
        s = _reciprocal(d, fast)
        return (x * s if fast else x / d), s * (1.0 + x * (1.0 - s))
    return x, jnp.zeros_like(x) + 1.0  # identity


def round_to_dtype(x: jax.Array, DTYPE: jnp.dtype, INTERPRET: bool) -> jax.Array:
    """An fp32 tile rounded to DTYPE (round to nearest even), as a DTYPE tile."""
    # twin-diff: the Triton interpreter needs a hand-written bf16 rounding; Pallas' interpreter
    # rounds to nearest even itself, and so do both GPU backends.
    del INTERPRET
    return x.astype(DTYPE)
