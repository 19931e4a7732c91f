"""tf32 products as the contract defines them: operands rounded to nearest tf32, then multiplied.

What fp32_precision="tf32" means, and why the kernels round for themselves, is written once in
common/dtypes.py (`round_to_tf32`, the NumPy definition every twin here matches bit for bit). In
short: Hopper's wgmma truncates a float32 operand to tf32, cuBLAS rounds it first, and a truncating
kernel measured 4.5× cuBLAS's error (docs/performance.md, forty-first session). Three forms:

- `tf32_operand(t, INPUT_PRECISION)`: inside a Triton kernel, a dot operand rounded where
  INPUT_PRECISION is "tf32" (a constexpr: nothing is emitted for "ieee" or 16-bit tiles). Every
  `tl.dot` of the pointer kernels reads both operands through it, and so do the TMA kernels'
  unless told their operands are rounded in memory already (`tf32_operands_exact`: in registers
  an operand wgmma would read from shared memory costs the pipeline, 31-44 % on an H100); the
  tensor cores' truncation of a rounded operand is exact. Under the interpreter (whose tl.dot
  ignores input_precision and multiplies exactly) the kernels thus compute true tf32 products.
- `round_to_tf32(t)` (torch ops) and `tf32_copy(t)` (one Triton pass): a float32 tensor rounded
  in memory — the baseline below, the front's rounded weight copies, and the TMA kernels' inputs,
  which those kernels then read as they lie (`tf32_operands_exact`).
- `emulated_tf32_matmul(a, b)`: on a device without tf32 products (the CPU), the eager baseline's
  product of rounded operands, an autograd.Function whose backward products round theirs as well
  (as cuBLAS's do on a GPU): the 2× baseline rule then compares a tf32 kernel with tf32
  products, not with exact float32 ones (baselines.eager uses it there).

Twin: jax_impl/tf32.py (the same bits; its baseline product is a custom_vjp).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedmlp.common.dtypes import (
    FP32_EXPONENT_MASK,
    TF32_DROPPED_BITS,
    TF32_HALF_UNIT,
    TF32_KEPT_MASK,
)

# constexpr: @triton.jit code may not read plain Python globals (only the interpreter accepts it)
_DROPPED = tl.constexpr(TF32_DROPPED_BITS)
_HALF_UNIT = tl.constexpr(TF32_HALF_UNIT)
_KEPT = tl.constexpr(TF32_KEPT_MASK)
_EXPONENT = tl.constexpr(FP32_EXPONENT_MASK)


@triton.jit
def tf32_operand(t, INPUT_PRECISION: tl.constexpr):
    """A dot operand as a tf32 product takes it: `t` rounded to nearest tf32 (float32 tiles under
    "tf32"), else `t` unchanged."""
    if INPUT_PRECISION == "tf32":
        bits = t.to(tl.uint32, bitcast=True)
        rounded = (bits + _HALF_UNIT + ((bits >> _DROPPED) & 1)) & _KEPT
        special = (bits & _EXPONENT) == _EXPONENT  # ±Inf and NaN keep their bits
        return tl.where(special, bits, rounded).to(tl.float32, bitcast=True)
    else:
        return t


_COPY_BLOCK = 1024


@triton.jit
def _tf32_copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(dst_ptr + offs, tf32_operand(tl.load(src_ptr + offs, mask=mask), "tf32"), mask=mask)


def tf32_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of float32 `t` rounded to tf32, in one pass (one Triton kernel: a read
    and a write, where `round_to_tf32`'s torch ops take six): the TMA kernels' inputs that no
    kernel rounded at its store (the front's x). Same bits as `round_to_tf32`."""
    src = t.contiguous()
    out = torch.empty_like(src)
    if src.numel():
        grid = (triton.cdiv(src.numel(), _COPY_BLOCK),)
        _tf32_copy_kernel[grid](src, out, src.numel(), BLOCK=_COPY_BLOCK)
    return out


def round_to_tf32(t: torch.Tensor) -> torch.Tensor:
    """A float32 tensor rounded to the nearest tf32 values (a new tensor; common.dtypes' bits)."""
    if t.dtype != torch.float32:
        raise TypeError(f"t: round_to_tf32 expected a float32 tensor, got {t.dtype}")
    bits = t.contiguous().view(torch.int32)
    # int32 addition wraps (as uint32's does) only on NaN bit patterns, kept below
    lowest_kept = (bits >> TF32_DROPPED_BITS) & 1
    rounded = (bits + TF32_HALF_UNIT + lowest_kept) & _as_int32(TF32_KEPT_MASK)
    exponent = _as_int32(FP32_EXPONENT_MASK)
    special = (bits & exponent) == exponent
    return torch.where(special, bits, rounded).view(torch.float32).view_as(t)


class _RoundedKMajor(torch.autograd.Function):
    @staticmethod
    def forward(w: torch.Tensor) -> torch.Tensor:
        return round_to_tf32(w.t()).t()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def rounded_k_major(w: torch.Tensor) -> torch.Tensor:
    """A [K, N] w as a K-major copy (a [K, N] view of a row-major [N, K] buffer) rounded to tf32:
    what the TMA kernels' wgmma reads straight from shared memory. Differentiable straight
    through (the copy's gradient is w's), with ±Inf kept (no w + (copy - w) arithmetic)."""
    return _RoundedKMajor.apply(w)


def _as_int32(mask: int) -> int:
    """A 32-bit mask as the int32 that has its bits (torch has no uint32 arithmetic on the CPU)."""
    return mask - (1 << 32) if mask >= 1 << 31 else mask


# ---- the CPU baseline's tf32 products ------------------------------------------------------------
class _EmulatedTf32Matmul(torch.autograd.Function):
    @staticmethod
    def forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return round_to_tf32(a) @ round_to_tf32(b)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        return emulated_tf32_matmul(grad, b.T), emulated_tf32_matmul(a.T, grad)


def emulated_tf32_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of 2-D float32 operands rounded to tf32, products and sums exact in float32; its
    backward products round theirs as well (as cuBLAS's do on a GPU)."""
    return _EmulatedTf32Matmul.apply(a, b)
