"""The three storage dtypes of the contract, by name, with their NumPy types and rounding units.

Nothing here imports torch or jax: each stack maps these names to its own dtype objects.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
FP32_PRECISIONS: tuple[str, ...] = ("ieee", "tf32")

_NUMPY = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}

# Unit roundoff u = 2^-(p) for round-to-nearest with p significand bits (incl. the implicit one):
# the largest relative error of rounding one real number to the format. tf32 keeps fp32's exponent
# and 10 explicit mantissa bits, so it rounds like float16 (p = 11).
UNIT_ROUNDOFF = {
    "float32": 2.0**-24,
    "tf32": 2.0**-11,
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
}


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype for a contract dtype name (bfloat16 through ml_dtypes)."""
    try:
        return _NUMPY[name]
    except KeyError:
        raise ValueError(f"dtype: expected one of {DTYPES}, got {name!r}") from None


def dtype_name(dtype: object) -> str:
    """The contract name of a NumPy, torch or jax dtype (by its string form), or ValueError."""
    text = str(dtype).removeprefix("torch.")
    if text in _NUMPY:
        return text
    raise ValueError(f"dtype: expected one of {DTYPES}, got {dtype}")


def cast(array: np.ndarray, name: str) -> np.ndarray:
    """`array` in the named dtype; to bfloat16 always through float32, as a kernel's fp32 value
    is rounded at its store, and so that the bits do not depend on the ml_dtypes version.

    ml_dtypes 0.7 rounds float64 -> bfloat16 directly; 0.6 and older (the GPU image has 0.6.0)
    went through float32, which double-rounds values just below a bfloat16 midpoint (golden case
    silu-bfloat16-bias: 0.13232421764849517 -> 0.1328125 through float32, 0.1318359375 directly).
    The golden files were drawn the float32 way; naming that step keeps them reproducible bit for
    bit on every version. float16 and float32 are NumPy's own casts, which round directly."""
    array = np.asarray(array)
    if name == "bfloat16":
        return array.astype(np.float32).astype(numpy_dtype(name))
    return array.astype(numpy_dtype(name))


def round_to(array: np.ndarray, name: str) -> np.ndarray:
    """Round `array` to the named dtype as float64 (a reference rounding point)."""
    return cast(array, name).astype(np.float64)


# ---- tf32: what fp32_precision="tf32" means ----------------------------------------------------
# A "tf32" product multiplies float32 operands rounded to tf32 — fp32's sign and 8-bit exponent,
# 10 explicit mantissa bits — to nearest (ties to even), exactly, and sums in float32. The GPU's
# tensor cores take the rounded operands but do not round them: Hopper's wgmma reads a float32
# operand as tf32 by dropping its 13 low mantissa bits (truncation, an error biased towards zero:
# measured 4.5× cuBLAS's error on an H100, docs/performance.md, forty-first session). cuBLAS and
# XLA round before the product; our kernels round every operand of a tf32 product themselves
# (torch_impl/tf32.py, jax_impl/tf32.py), and on the CPU, where no framework has tf32 products,
# the baselines round theirs too, so the tolerance policy's baseline rule compares like with like.
# Every twin of `round_to_tf32` computes these bits: add half a tf32 unit minus one plus the lowest
# kept bit (ties to even), then clear the 13 dropped bits; ±Inf and NaN keep theirs (a NaN's
# payload may lie in the dropped bits alone), and a value beyond tf32's largest rounds to ±Inf.
TF32_DROPPED_BITS = 13
TF32_HALF_UNIT = (1 << (TF32_DROPPED_BITS - 1)) - 1  # 0x0FFF: half the dropped range, minus one
TF32_KEPT_MASK = 0xFFFFFFFF ^ ((1 << TF32_DROPPED_BITS) - 1)  # 0xFFFFE000
FP32_EXPONENT_MASK = 0x7F800000


def round_to_tf32(array: np.ndarray) -> np.ndarray:
    """float32 `array` rounded to the nearest tf32 value (ties to even), as float32."""
    values = np.ascontiguousarray(array, dtype=np.float32)
    bits = values.view(np.uint32)
    lowest_kept = (bits >> np.uint32(TF32_DROPPED_BITS)) & np.uint32(1)
    # uint32 addition wraps only for NaN bit patterns, which the where() below keeps as they are
    rounded = (bits + np.uint32(TF32_HALF_UNIT) + lowest_kept) & np.uint32(TF32_KEPT_MASK)
    special = (bits & np.uint32(FP32_EXPONENT_MASK)) == np.uint32(FP32_EXPONENT_MASK)
    return np.where(special, bits, rounded).view(np.float32)
