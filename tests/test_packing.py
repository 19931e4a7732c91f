"""The packed gated layout (common/packing.py): index rules, round trip, odd widths."""

from __future__ import annotations

import numpy as np
import pytest

from fusedmlp.common import MLPSpec, init_params, make_input
from fusedmlp.common.packing import (
    PACK_BLOCK,
    is_packed,
    pack_gated,
    pack_params,
    packed_names,
    packed_width,
    unpack_gated,
)
from helpers import one_point_table, to_numpy


@pytest.mark.parametrize("n", [1, 13, 63, 64, 65, 97, 128, 200])
def test_pack_round_trip_and_block_rule(n):
    rng = np.random.default_rng(n)
    w, v = rng.standard_normal((5, n)), rng.standard_normal((5, n))
    packed = pack_gated(w, v)
    assert packed.shape == (5, packed_width(n))
    assert packed_width(n) % (2 * PACK_BLOCK) == 0
    for j in range(-(-n // PACK_BLOCK)):
        cols = slice(j * PACK_BLOCK, min((j + 1) * PACK_BLOCK, n))
        width = cols.stop - cols.start
        gate = packed[:, 2 * j * PACK_BLOCK : 2 * j * PACK_BLOCK + width]
        up = packed[:, (2 * j + 1) * PACK_BLOCK : (2 * j + 1) * PACK_BLOCK + width]
        np.testing.assert_array_equal(gate, w[:, cols])
        np.testing.assert_array_equal(up, v[:, cols])
    # Padding is zero, so it adds nothing to any product.
    live = np.zeros(packed.shape[1], bool)
    for j in range(-(-n // PACK_BLOCK)):
        width = min(PACK_BLOCK, n - j * PACK_BLOCK)
        live[2 * j * PACK_BLOCK : 2 * j * PACK_BLOCK + width] = True
        live[(2 * j + 1) * PACK_BLOCK : (2 * j + 1) * PACK_BLOCK + width] = True
    assert not packed[:, ~live].any()
    w2, v2 = unpack_gated(packed, n)
    np.testing.assert_array_equal(w2, w)
    np.testing.assert_array_equal(v2, v)


def test_pack_params_names_and_shapes():
    spec = MLPSpec((24, 97, 33, 7), "swiglu", bias=True, dtype="bfloat16")
    params = init_params(spec, seed=3)
    packed = pack_params(spec, params)
    assert is_packed(packed) and not is_packed(params)
    assert {k: v.shape for k, v in packed.items()} == packed_names(spec)
    assert packed["wv0"].dtype == params["w0"].dtype
    np.testing.assert_array_equal(packed["w2"], params["w2"])  # the output layer is plain


def test_pack_rejects_mismatched_and_bad_widths():
    with pytest.raises(ValueError, match="v: expected the shape of w"):
        pack_gated(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="packed: expected 128 columns"):
        unpack_gated(np.zeros((3, 64)), 10)
    with pytest.raises(ValueError, match="n: expected"):
        packed_width(-1)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_stack_pack_params_match_numpy_bitwise(dtype):
    import jax.numpy as jnp
    import torch

    from fusedmlp.jax_impl.packing import pack_params as jax_pack
    from fusedmlp.torch_impl.packing import pack_params as torch_pack
    from helpers import to_torch

    spec = MLPSpec((19, 70, 11), "geglu", bias=True, dtype=dtype)
    params = init_params(spec, seed=5)
    want = pack_params(spec, params)
    got_torch = torch_pack(spec, {k: to_torch(v) for k, v in params.items()})
    got_jax = jax_pack(spec, {k: jnp.asarray(v) for k, v in params.items()})
    for name, ref in want.items():
        t = got_torch[name]
        bits = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        ref_bits = ref.view(np.int16) if dtype == "bfloat16" else ref
        np.testing.assert_array_equal(bits.numpy(), ref_bits)
        np.testing.assert_array_equal(np.asarray(got_jax[name]).view(ref.dtype), ref)
    assert torch_pack(spec, got_torch).keys() == got_torch.keys()  # packing twice is a no-op


# ---- packed params through the fronts, the custom op and FusedMLP -------------------------------
GATED = MLPSpec((19, 70, 11), "swiglu", bias=True, dtype="bfloat16")


def _stack_inputs(stack, spec, m=5):
    import jax.numpy as jnp

    from helpers import to_torch

    conv = to_torch if stack == "torch" else jnp.asarray
    params = {k: conv(v) for k, v in init_params(spec, seed=7).items()}
    packed = {k: conv(v) for k, v in pack_params(spec, init_params(spec, seed=7)).items()}
    return conv(make_input(spec, m, seed=8)), params, packed


@pytest.mark.parametrize(
    "stack, impl",
    [
        ("torch", "eager"),
        ("torch", "triton"),
        ("torch", "fused_decode"),
        ("jax", "xla"),
        ("jax", "pallas_triton"),
    ],
)
def test_fronts_take_packed_params(stack, impl):
    from fusedmlp import jax_impl, torch_impl

    front = torch_impl if stack == "torch" else jax_impl
    x, params, packed = _stack_inputs(stack, GATED)
    plain_out = np.asarray(to_numpy(front.mlp(x, params, GATED, impl=impl)))
    packed_out = np.asarray(to_numpy(front.mlp(x, packed, GATED, impl=impl)))
    np.testing.assert_array_equal(packed_out, plain_out)


@pytest.mark.parametrize(
    "impl, dtype",
    [("eager", "float32"), ("eager", "float16"), ("eager", "bfloat16"), ("auto", "bfloat16")],
)
def test_a_baseline_reads_a_packed_module_as_it_is(impl, dtype, torch_table, monkeypatch):
    """A baseline's registry layout is "any": a FusedMLP's packed params reach it as they are —
    no plain copy is made or cached (it would double a gated layer's weights in memory for as
    long as the module lives) — in inference and in training, where the gradient lands in the
    packed `wv` directly. "auto" is sent to the "compile" baseline by a measured table (its
    Inductor graph, traced on the packed params)."""
    import torch

    from fusedmlp.common import reference
    from fusedmlp.common.tolerance import assert_close, assert_grads_close
    from fusedmlp.torch_impl import FusedMLP, front
    from fusedmlp.torch_impl.packing import unpack_params

    derived = []
    real_derive = front._derive
    monkeypatch.setattr(front, "_derive", lambda *a: derived.append(1) or real_derive(*a))
    monkeypatch.setattr(front, "_PREPARED", {})
    spec = GATED.replace(dtype=dtype)
    x, params, packed = _stack_inputs("torch", spec, m=9)
    if impl == "auto":
        torch_table(one_point_table(spec, ("compile", "triton"), 9))
    module = FusedMLP.from_params(packed, spec, impl=impl)
    entries = len(front._CONVERTED)
    assert front.plan(spec, (9, spec.d_in), impl=impl).impl in ("eager", "compile")
    params64 = {k: to_numpy(v) for k, v in params.items()}
    with torch.no_grad():
        y = module(x)
    assert_close(to_numpy(y), reference.forward(spec, to_numpy(x), params64), spec)
    xg = x.clone().requires_grad_()
    out = module(xg)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(out.dtype)
    out.backward(dy)
    grads = {
        "x": xg.grad,
        **unpack_params(spec, {k: p.grad for k, p in module.named_parameters()}),
    }
    want = reference.backward(spec, to_numpy(x), params64, to_numpy(dy))
    assert_grads_close({k: to_numpy(v) for k, v in grads.items()}, want, spec)
    assert not derived and len(front._CONVERTED) == entries


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_xla_reads_packed_params_as_they_are(dtype, monkeypatch):
    """The JAX baseline on packed params (`xla_packed`: one product over [W|V], nothing unpacked
    in the jitted runner), 3-D x and a residual: the float64 reference's output and gradients."""
    import jax
    import jax.numpy as jnp

    from fusedmlp import jax_impl
    from fusedmlp.common import reference
    from fusedmlp.common.tolerance import assert_close, assert_grads_close
    from fusedmlp.jax_impl import front as jfront
    from fusedmlp.jax_impl.packing import unpack_params

    monkeypatch.setattr(jfront, "_PREPARED", {})
    monkeypatch.setattr(jfront, "unpack_params", lambda *a: pytest.fail("unpacked"))
    spec = GATED.replace(dtype=dtype)
    x2, params, packed = _stack_inputs("jax", spec, m=6)
    x = x2.reshape(2, 3, spec.d_in)
    residual = jnp.ones((2, 3, spec.d_out), x.dtype)
    x64 = np.asarray(to_numpy(x2), np.float64)
    params64 = {k: np.asarray(to_numpy(v), np.float64) for k, v in params.items()}
    y = jax_impl.mlp(x, packed, spec, impl="xla", residual=residual)
    want = reference.forward(spec, x64, params64) + 1.0
    assert_close(to_numpy(y).reshape(6, spec.d_out), want, spec)
    dy = jnp.asarray(np.random.default_rng(5).standard_normal((2, 3, spec.d_out)), x.dtype)

    def loss(x, p):
        return jnp.sum(jax_impl.mlp(x, p, spec, impl="xla").astype(jnp.float32) * dy)

    dx, dp = jax.grad(loss, argnums=(0, 1))(x, packed)
    got = {"x": dx.reshape(6, spec.d_in), **unpack_params(spec, dp)}
    dy64 = np.asarray(to_numpy(dy), np.float64).reshape(6, spec.d_out)
    ref = reference.backward(spec, x64, params64, dy64)
    assert_grads_close({k: to_numpy(v) for k, v in got.items()}, ref, spec)


def test_custom_op_and_module_take_packed_params():
    import torch

    from fusedmlp.torch_impl import FusedMLP, custom_op

    x, params, packed = _stack_inputs("torch", GATED)
    want = custom_op.mlp(x, params, GATED, impl="triton")
    assert torch.equal(custom_op.mlp(x, packed, GATED, impl="triton"), want)
    module = FusedMLP.from_params(packed, GATED, impl="triton")
    with torch.no_grad():
        assert torch.equal(module(x), want)
    for name, value in module.params().items():  # the contract's names, bit for bit
        assert torch.equal(value, params[name])


@pytest.mark.parametrize("stack", ["torch", "jax"])
def test_packed_shapes_are_checked_alike(stack):
    from fusedmlp import jax_impl, torch_impl

    front = torch_impl if stack == "torch" else jax_impl
    x, _, packed = _stack_inputs(stack, GATED)
    bad = {**packed, "wv0": packed["wv0"][:, :64]}
    msg = r"params\['wv0'\]: expected shape \[19, 256\], got \[19, 64\]"
    with pytest.raises(ValueError, match=msg):
        front.mlp(x, bad, GATED, impl="eager" if stack == "torch" else "xla")
    mixed = {**packed, "v0": packed["wv0"]}
    with pytest.raises(ValueError, match=r"params: unexpected \['v0'\]; .* needs \(packed\)"):
        front.mlp(x, mixed, GATED, impl="eager" if stack == "torch" else "xla")


@pytest.mark.parametrize("stack", ["torch", "jax"])
def test_stack_unpack_params_round_trip(stack):
    from fusedmlp.jax_impl import packing as jpacking
    from fusedmlp.torch_impl import packing as tpacking

    mod = tpacking if stack == "torch" else jpacking
    _, params, packed = _stack_inputs(stack, GATED)
    unpacked = mod.unpack_params(GATED, packed)
    assert list(unpacked) == list(params)
    for name, value in unpacked.items():
        np.testing.assert_array_equal(to_numpy(value), to_numpy(params[name]))
    assert mod.unpack_params(GATED, params).keys() == params.keys()  # plain passes through


@pytest.mark.parametrize("stack", ["torch", "jax"])
def test_front_feeds_a_packed_entry(stack, monkeypatch):
    """The portable entries declare layout="packed": plain params are packed — once per set of
    tensors in torch — and the gated launcher gets (x, wv, bc, n=...)."""
    import importlib

    from fusedmlp.common.registry import get_implementation

    front = importlib.import_module(f"fusedmlp.{stack}_impl.front")
    impl = "triton" if stack == "torch" else "pallas_triton"
    assert get_implementation(impl).layout == "packed"
    real_launcher = front._launcher
    seen = []

    def launcher(name, family, *rest):
        fwd = real_launcher(name, family, *rest)
        if family != "gated":
            return fwd

        def spy(x, wv, bc, *, n, activation, config, fp32_precision):
            seen.append((tuple(wv.shape), n))
            return fwd(
                x, wv, bc, n=n, activation=activation, config=config, fp32_precision=fp32_precision
            )

        return spy

    monkeypatch.setattr(front, "_launcher", launcher)
    monkeypatch.setattr(front, "_PREPARED", {})
    derived = []
    if stack == "torch":
        real_derive = front._derive
        monkeypatch.setattr(front, "_derive", lambda *a: derived.append(1) or real_derive(*a))
    x, params, packed = _stack_inputs(stack, GATED)
    want = to_numpy(front.mlp(x, packed, GATED, impl=impl))  # packed in, packed taken: no copy
    for _ in range(3):
        np.testing.assert_array_equal(to_numpy(front.mlp(x, params, GATED, impl=impl)), want)
    assert seen and all(s == ((19, 256), 70) for s in seen)
    if stack == "torch":
        assert len(derived) == 1  # the plain tensors were packed once, then read from the cache
