"""`auto` in training, decided by the dispatch table's training points (common/dispatch.py).

A training point that ranks a baseline before our kernels (`bench --backward` measured it faster)
makes `auto` differentiate through that baseline's own ops — torch autograd, jax autodiff — while
a call that builds no gradient keeps the forward's choice; beyond dispatch.TRAIN_REACH of every
training point, or with a pinned config, `auto` trains with our kernels as before. The table is
patched in (a CPU has none): the fronts' `_table` is what both lookups read.
"""

from __future__ import annotations

import numpy as np
import pytest

from fusedmlp.common import MLPSpec, init_params
from fusedmlp.common.dispatch import KERNELS, Point, Table, shape_class, weight_bytes
from helpers import to_torch

SPEC = MLPSpec((24, 40, 24), "swiglu", bias=False, dtype="float32")
M = 37
DTYPES = ("float32", "bfloat16", "float16")


def train_table(stack: str, winner: str, m: int = M, spec: MLPSpec = SPEC) -> Table:
    ranking = ((winner, 1.0), (KERNELS, 1.25)) if winner != KERNELS else ((KERNELS, 1.0),)
    point = Point(
        stack, spec.dtype, shape_class(spec), m, weight_bytes(spec), ranking,
        f"test: {winner} first", phase="train",
    )  # fmt: skip
    return Table("Test GPU", "", (point,), train_source="test table")


def _torch_grads(module, x, dy):
    x = x.clone().requires_grad_()
    for p in module.parameters():
        p.grad = None
    y = module(x)
    y.backward(dy)
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_auto_trains_through_the_measured_baseline(torch_table, dtype) -> None:
    import torch

    from fusedmlp.torch_impl import FusedMLP, mlp, plan

    spec = SPEC.replace(dtype=dtype)
    torch_table(train_table("torch", "eager", spec=spec))
    params = init_params(spec, 3)
    auto = FusedMLP(spec, impl="auto", seed=None).load_params(params)
    eager = FusedMLP(spec, impl="eager", seed=None).load_params(params)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(M, spec.d_in, generator=gen).to(getattr(torch, dtype))
    dy = torch.randn(M, spec.d_out, generator=gen).to(getattr(torch, dtype))
    got, want = _torch_grads(auto, x, dy), _torch_grads(eager, x, dy)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for name in want[2]:
        assert torch.equal(got[2][name], want[2][name]), name
    the_plan = plan(spec, (M, spec.d_in), impl="auto", saved="preact")
    assert the_plan.impl == "eager" and the_plan.requested == "auto"
    assert "auto trains through eager" in the_plan.reason and "torch autograd" in the_plan.reason

    # the functional front takes the same route (custom_op.mlp)
    def functional(impl: str):
        named = {k: to_torch(v).requires_grad_() for k, v in params.items()}
        y = mlp(x, named, spec, impl=impl)
        y.backward(dy)
        return y.detach(), {k: t.grad for k, t in named.items()}

    (y_auto, g_auto), (y_eager, g_eager) = functional("auto"), functional("eager")
    assert torch.equal(y_auto, want[0]) and torch.equal(y_auto, y_eager)
    for name in g_eager:
        assert torch.equal(g_auto[name], g_eager[name]), name
    # no gradient built: the forward's choice (our kernels here), not the baseline
    with torch.no_grad():
        assert plan(spec, (M, spec.d_in), impl="auto").impl != "eager"


def test_torch_auto_keeps_its_kernels_beyond_reach_or_pinned(torch_table) -> None:
    from fusedmlp.common import TileConfig
    from fusedmlp.torch_impl import plan

    torch_table(train_table("torch", "eager", m=M * 4))  # two octaves of M away: out of reach
    assert plan(SPEC, (M, SPEC.d_in), impl="auto", saved="preact").impl != "eager"
    torch_table(train_table("torch", "eager"))
    pinned = TileConfig(16, 32, 16, group_m=1, num_stages=1)
    assert plan(SPEC, (M, SPEC.d_in), impl="auto", config=pinned, saved="preact").impl != "eager"
    torch_table(train_table("torch", KERNELS))  # our path measured first: nothing changes
    assert plan(SPEC, (M, SPEC.d_in), impl="auto", saved="preact").impl != "eager"


@pytest.fixture
def jax_table(monkeypatch):
    from fusedmlp.jax_impl import front

    def use(table: Table | None) -> None:
        monkeypatch.setattr(front, "_table", lambda device: table)
        front._PREPARED.clear()

    yield use
    front._PREPARED.clear()


@pytest.mark.parametrize("dtype", DTYPES)
def test_jax_auto_trains_through_the_measured_baseline(jax_table, dtype) -> None:
    import jax
    import jax.numpy as jnp

    from fusedmlp.jax_impl import mlp, plan
    from fusedmlp.jax_impl.packing import pack_params

    spec = SPEC.replace(dtype=dtype)
    jax_table(train_table("jax", "xla", spec=spec))
    params = {k: jnp.asarray(v) for k, v in init_params(spec, 3).items()}
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((M, spec.d_in)).astype(np.float32)).astype(dtype)
    dy = jnp.asarray(rng.standard_normal((M, spec.d_out)).astype(np.float32)).astype(dtype)

    def grads(impl: str):
        y, vjp = jax.vjp(lambda x_, p: mlp(x_, p, spec, impl=impl), x, params)
        return y, *vjp(dy)

    (y_auto, dx_auto, dp_auto), (y_xla, dx_xla, dp_xla) = grads("auto"), grads("xla")
    assert np.array_equal(np.asarray(dx_auto), np.asarray(dx_xla))
    for name in dp_xla:
        assert np.array_equal(np.asarray(dp_auto[name]), np.asarray(dp_xla[name])), name
    # differentiated: the baseline's forward; not differentiated: the forward's choice
    assert np.array_equal(np.asarray(y_auto), np.asarray(y_xla))
    forward_choice = plan(spec, (M, spec.d_in), impl="auto").impl
    assert forward_choice != "xla"
    kernels = mlp(x, params, spec, impl=forward_choice)
    assert np.array_equal(np.asarray(mlp(x, params, spec)), np.asarray(kernels))
    the_plan = plan(spec, (M, spec.d_in), impl="auto", saved="preact")
    assert the_plan.impl == "xla" and "auto trains through xla" in the_plan.reason
    # packed params (what FusedMLP and the harness hold): differentiated on w and v apart
    # (front._on_plain_params), the gradients packed back — the plain gradients' bits, packed
    packed = pack_params(spec, params)
    _, vjp = jax.vjp(lambda x_, p: mlp(x_, p, spec), x, packed)
    dx_packed, dp_packed = vjp(dy)
    assert np.array_equal(np.asarray(dx_packed), np.asarray(dx_xla))
    want = pack_params(spec, dp_xla)
    assert set(dp_packed) == set(want)
    for name, value in want.items():
        assert np.array_equal(np.asarray(dp_packed[name]), np.asarray(value)), name
    jax_table(train_table("jax", "xla", m=M * 4, spec=spec))
    assert plan(spec, (M, spec.d_in), impl="auto", saved="preact").impl != "xla"
