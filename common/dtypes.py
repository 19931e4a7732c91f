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
