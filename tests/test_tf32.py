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
from fusedmlp.common.tolerance import compare, compare_grads
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


# ---- every kernel multiplies tf32 operands: its result ignores the bits rounding drops ----------
# A kernel whose products are of operands rounded to tf32 gives the same bits on x and the
# weights as on their tf32 roundings (bias vectors are no product's operand); one that multiplied
# them exactly would not (the "ieee" check above shows the inputs differ where it matters).
GATED = MLPSpec((40, 72, 24), "swiglu", True, "float32", "tf32")  # 16-byte rows: TMA takes it
DEEP = MLPSpec((37, 53, 45, 19), "gelu", True, "float32", "tf32")
FORWARD_CASES = [
    ("torch", "triton", DEEP), ("torch", "triton_tma", GATED), ("torch", "fused_small", DEEP),
    ("torch", "fused_decode", GATED), ("jax", "pallas_triton", DEEP), ("jax", "fused_small", GATED),
    ("jax", "fused_decode", GATED),
]  # fmt: skip


def _rounded_weights(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: round_to_tf32(v) if v.ndim == 2 else v for k, v in params.items()}


def _front(stack: str):
    if stack == "torch":
        from fusedmlp.torch_impl import mlp

        def run(x, params, spec, impl):
            pt = {k: to_torch(v) for k, v in params.items()}
            return to_numpy(mlp(to_torch(x), pt, spec, impl=impl))

        return run
    import jax.numpy as jnp

    from fusedmlp.jax_impl import mlp

    def run(x, params, spec, impl):
        pj = {k: jnp.asarray(v) for k, v in params.items()}
        return to_numpy(mlp(jnp.asarray(x), pj, spec, impl=impl))

    return run


@pytest.mark.parametrize(
    "stack,impl,spec",
    FORWARD_CASES,
    ids=[f"{s}-{i}-{len(sp.widths)}" for s, i, sp in FORWARD_CASES],
)
def test_kernel_forward_multiplies_tf32_operands(stack, impl, spec):
    x, params = make_input(spec, 21, seed=4205), init_params(spec, seed=4206)
    run = _front(stack)
    got = run(x, params, spec, impl)
    assert np.array_equal(got, run(round_to_tf32(x), _rounded_weights(params), spec, impl))
    assert compare(got, reference.forward(spec, x, params), spec).passed


@pytest.mark.parametrize("stack", ["torch", "jax"])
def test_lowrank_kernels_multiply_tf32_operands(stack):
    from fusedmlp.common import lowrank_spec as ls

    lspec = ls.LowRankSpec(MLPSpec((33, 67, 21), "swiglu", True, "float32", "tf32"), (9, 5))
    rng = np.random.default_rng(4207)
    params = {
        name: (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
        for name, shape in ls.param_shapes(lspec).items()
    }
    x = make_input(lspec.spec, 21, seed=4208)
    if stack == "torch":
        from fusedmlp.torch_impl import lowrank_mlp

        def run(xx, pp):
            return to_numpy(
                lowrank_mlp(to_torch(xx), {k: to_torch(v) for k, v in pp.items()}, lspec)
            )
    else:
        import jax.numpy as jnp

        from fusedmlp.jax_impl import lowrank_mlp

        def run(xx, pp):
            pj = {k: jnp.asarray(v) for k, v in pp.items()}
            return to_numpy(lowrank_mlp(jnp.asarray(xx), pj, lspec))

    got = run(x, params)
    assert np.array_equal(got, run(round_to_tf32(x), _rounded_weights(params)))
    assert compare(got, ls.reference(lspec, x, params), lspec.spec).passed


def _torch_grads(x, params, spec, impl, dy):
    from fusedmlp.torch_impl import mlp

    xs = to_torch(x).requires_grad_()
    ps = {k: to_torch(v).requires_grad_() for k, v in params.items()}
    mlp(xs, ps, spec, impl=impl).backward(to_torch(dy))
    return {"x": to_numpy(xs.grad), **{k: to_numpy(v.grad) for k, v in ps.items()}}


def _jax_grads(x, params, spec, impl, dy):
    import jax
    import jax.numpy as jnp

    from fusedmlp.jax_impl import mlp

    def loss(xx, pp):
        return jnp.sum(mlp(xx, pp, spec, impl=impl) * jnp.asarray(dy))

    gx, gp = jax.grad(loss, argnums=(0, 1))(
        jnp.asarray(x), {k: jnp.asarray(v) for k, v in params.items()}
    )
    return {"x": to_numpy(gx), **{k: to_numpy(v) for k, v in gp.items()}}


BACKWARD_CASES = [("torch", "triton"), ("torch", "fused_small"), ("jax", "pallas_triton"),
                  ("jax", "fused_small")]  # fmt: skip


@pytest.mark.parametrize("stack,impl", BACKWARD_CASES, ids=[f"{s}-{i}" for s, i in BACKWARD_CASES])
def test_kernel_backward_multiplies_tf32_operands(stack, impl):
    """The backward's products (dX = dZ·Wᵀ, dW = hᵀ·dZ, and the forward it recomputes) round
    theirs too: every gradient is the same bits for x and the weights as for their roundings."""
    x, params = make_input(GATED, 21, seed=4209), init_params(GATED, seed=4210)
    dy = np.random.default_rng(4211).standard_normal((21, GATED.d_out)).astype(np.float32)
    grads = _torch_grads if stack == "torch" else _jax_grads
    got = grads(x, params, GATED, impl, dy)
    again = grads(round_to_tf32(x), _rounded_weights(params), GATED, impl, dy)
    assert got.keys() == again.keys()
    for name in got:
        assert np.array_equal(got[name], again[name]), name
    want = reference.backward(GATED, x, params, dy, round_hidden=True)
    verdicts = compare_grads(got, want, GATED)
    assert all(c.passed for c in verdicts.values()), {k: c.report() for k, c in verdicts.items()}
