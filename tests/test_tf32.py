"""tf32 rounding, the same bits everywhere: common.dtypes.round_to_tf32 (the definition) against its
torch, Triton, jax.numpy and Pallas-Triton twins; the CPU baselines' emulated tf32 products,
forward and backward; and what the kernels read under "tf32" (a product of rounded operands).

Every value class is drawn: random magnitudes over the whole exponent range, random bit patterns
(NaNs with payloads in the dropped bits alone among them), exact ties (to even, both ways), the
largest values (rounding up to ±Inf), subnormals, ±0, ±Inf.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from fusedmlp.common import MLPSpec, reference
from fusedmlp.common.dtypes import round_to_tf32
from fusedmlp.common.params import init_params, make_input
from fusedmlp.common.tolerance import compare
from fusedmlp.torch_impl.tf32 import tf32_operand
from helpers import to_numpy, to_torch


@triton.jit
def _operand_kernel(x_ptr, o_ptr, n, PRECISION: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    t = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(o_ptr + offs, tf32_operand(t, PRECISION), mask=offs < n)


def _values() -> np.ndarray:
    rng = np.random.default_rng(4201)
    scaled = rng.standard_normal(4096) * np.exp2(rng.uniform(-140, 127, 4096))
    patterns = rng.integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32).view(np.float32)
    one = np.float32(1.0).view(np.uint32)
    ties = np.array([one + 0x1000, one + 0x3000, one + 0x2FFF, one + 0x1001], np.uint32)
    low_nan = np.array([0x7F800001, 0xFF801000, 0x7FC00000], np.uint32)
    special = np.array(
        [np.inf, -np.inf, 0.0, -0.0, 3.4028235e38, -3.4028235e38, 1e-45, -1e-40], np.float32
    )
    with np.errstate(over="ignore", invalid="ignore"):
        values = scaled.astype(np.float32)
    return np.concatenate([values, patterns, ties.view(np.float32), low_nan.view(np.float32),
                           special])  # fmt: skip


def _bits(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).view(np.uint32)


def test_definition_rounds_to_nearest_even():
    one = np.float32(1.0).view(np.uint32)
    got = _bits(round_to_tf32(np.array([one + 0x1000, one + 0x3000, one + 0x1001, one + 0x0FFF],
                                       np.uint32).view(np.float32)))  # fmt: skip
    # a tie goes to the even neighbour (down from an even, up from an odd), else to the nearest
    assert list(got - one) == [0x0000, 0x4000, 0x2000, 0x0000]
    big = round_to_tf32(np.array([3.4028235e38, np.nan, np.inf], np.float32))
    assert big[0] == np.inf and np.isnan(big[1]) and big[2] == np.inf
    nan_low = np.array([0x7F800001], np.uint32).view(np.float32)  # payload in dropped bits only
    assert _bits(round_to_tf32(nan_low))[0] == 0x7F800001  # still that NaN, not +Inf
    x = _values()
    finite = np.isfinite(x) & np.isfinite(round_to_tf32(x))
    rounded = round_to_tf32(x)
    assert not (_bits(rounded)[finite] & 0x1FFF).any()  # 10 explicit mantissa bits left
    assert (_bits(round_to_tf32(rounded)) == _bits(rounded)).all()  # idempotent


def test_torch_twin_matches_the_definition():
    from fusedmlp.torch_impl.tf32 import round_to_tf32 as torch_round

    x = _values()
    assert (_bits(torch_round(torch.from_numpy(x)).numpy()) == _bits(round_to_tf32(x))).all()
    with pytest.raises(TypeError, match="float32"):
        torch_round(torch.zeros(3, dtype=torch.float16))


def test_one_pass_copy_matches_the_definition():
    from fusedmlp.torch_impl.tf32 import tf32_copy

    x = torch.from_numpy(_values())
    assert (_bits(tf32_copy(x).numpy()) == _bits(round_to_tf32(x.numpy()))).all()
    strided = x[: 64 * 100].reshape(64, 100).t()  # a transposed view: rounded into a dense copy
    got = tf32_copy(strided)
    assert got.is_contiguous() and got.shape == strided.shape
    assert (_bits(got.numpy()) == _bits(round_to_tf32(strided.numpy()))).all()
    assert tf32_copy(torch.empty(0, 5)).shape == (0, 5)


def test_jax_twin_matches_the_definition():
    import jax.numpy as jnp

    from fusedmlp.jax_impl.tf32 import round_to_tf32 as jax_round

    x = _values()
    assert (_bits(jax_round(jnp.asarray(x))) == _bits(round_to_tf32(x))).all()


def test_triton_operand_matches_the_definition():
    x = _values()
    xt = torch.from_numpy(x)
    for precision, want in (("tf32", round_to_tf32(x)), ("ieee", x)):
        out = torch.full_like(xt, float("nan"))  # poisoned
        grid = (triton.cdiv(x.size, 1024),)
        _operand_kernel[grid](xt, out, x.size, PRECISION=precision, BLOCK=1024)
        assert (_bits(out.numpy()) == _bits(want)).all(), precision


def test_emulated_products_round_both_ways_in_both_stacks():
    """The CPU baselines' tf32 product: rounded operands, an exact float32 product, and the
    backward's two products of rounded operands — the same bits in torch and JAX as their own
    float32 matmul of the pre-rounded arrays."""
    import jax
    import jax.numpy as jnp

    from fusedmlp.jax_impl.tf32 import emulated_tf32_matmul as jax_matmul
    from fusedmlp.torch_impl.tf32 import emulated_tf32_matmul as torch_matmul

    rng = np.random.default_rng(4202)
    a, b, g = (rng.standard_normal(s).astype(np.float32) for s in ((23, 37), (37, 19), (23, 19)))
    ra, rb, rg = (torch.from_numpy(round_to_tf32(v)) for v in (a, b, g))
    at, bt = torch.from_numpy(a).requires_grad_(), torch.from_numpy(b).requires_grad_()
    y = torch_matmul(at, bt)
    y.backward(torch.from_numpy(g))
    assert torch.equal(y.detach(), ra @ rb)
    assert torch.equal(at.grad, rg @ rb.T) and torch.equal(bt.grad, ra.T @ rg)

    highest = jax.lax.Precision.HIGHEST
    jy, vjp = jax.vjp(jax_matmul, jnp.asarray(a), jnp.asarray(b))
    ja, jb = vjp(jnp.asarray(g))
    rja, rjb, rjg = (jnp.asarray(round_to_tf32(v)) for v in (a, b, g))
    assert (_bits(jy) == _bits(jnp.matmul(rja, rjb, precision=highest))).all()
    assert (_bits(ja) == _bits(jnp.matmul(rjg, rjb.T, precision=highest))).all()
    assert (_bits(jb) == _bits(jnp.matmul(rja.T, rjg, precision=highest))).all()


SPEC = MLPSpec((48, 96, 40), "swiglu", True, "float32", "tf32")


@pytest.mark.parametrize("stack", ["torch", "jax"])
def test_cpu_baseline_and_kernels_multiply_tf32_operands(stack):
    """On the CPU the baseline's "tf32" MLP and the portable kernel under the interpreter both
    multiply rounded operands: each output is the same bits when x and the weights are rounded
    beforehand (where the "ieee" baseline's exact products differ), and the kernel passes the
    tolerance policy with that baseline's error as the 2× rule's."""
    x, params = make_input(SPEC, 29, seed=4203), init_params(SPEC, seed=4204)
    rounded = {k: round_to_tf32(v) if v.ndim == 2 else v for k, v in params.items()}
    if stack == "torch":
        from fusedmlp.torch_impl import mlp

        def run(xx, pp, impl, spec=SPEC):
            pt = {k: to_torch(v) for k, v in pp.items()}
            return to_numpy(mlp(to_torch(xx), pt, spec, impl=impl))

        baseline, kernel = "eager", "triton"
    else:
        import jax.numpy as jnp

        from fusedmlp.jax_impl import mlp

        def run(xx, pp, impl, spec=SPEC):
            pj = {k: jnp.asarray(v) for k, v in pp.items()}
            return to_numpy(mlp(jnp.asarray(xx), pj, spec, impl=impl))

        baseline, kernel = "xla", "pallas_triton"
    for impl in (baseline, kernel):
        assert np.array_equal(run(x, params, impl), run(round_to_tf32(x), rounded, impl)), impl
    ieee = SPEC.replace(fp32_precision="ieee")
    assert not np.array_equal(
        run(x, params, baseline, ieee), run(round_to_tf32(x), rounded, baseline, ieee)
    )
    ref = reference.forward(SPEC, x, params)
    got = compare(run(x, params, kernel), ref, SPEC, baseline=run(x, params, baseline))
    assert got.passed, got.report()
