"""Both fronts: the same validation messages, plans, auto dispatch and empty-batch behaviour."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fusedmlp import jax_impl, torch_impl
from fusedmlp.common import (
    MLPSpec,
    TileConfig,
    golden,
    impl_names,
    init_params,
    make_input,
    reference,
)
from fusedmlp.common.registry import get_implementation
from fusedmlp.common.tolerance import assert_close
from helpers import to_torch

SPEC = MLPSpec((33, 67, 21), "swiglu", True, "float32")


def _torch_inputs(spec, x, params):
    return to_torch(x), {k: to_torch(v) for k, v in params.items()}


def _jax_inputs(spec, x, params):
    return jnp.asarray(x), {k: jnp.asarray(v) for k, v in params.items()}


STACKS = {
    "torch": (torch_impl, _torch_inputs),
    "jax": (jax_impl, _jax_inputs),
}


def _error(stack, spec, x, params, **kwargs):
    front, wrap = STACKS[stack]
    tx, tp = wrap(spec, x, params)
    mutate = kwargs.pop("mutate", None)
    if mutate is not None:
        tx, tp = mutate(stack, tx, tp)
    with pytest.raises((ValueError, TypeError)) as info:
        front.mlp(
            tx, tp, spec, impl=kwargs.pop("impl", "eager" if stack == "torch" else "xla"), **kwargs
        )
    return type(info.value), str(info.value)


def _drop(name):
    def mutate(stack, x, p):
        return x, {k: v for k, v in p.items() if k != name}

    return mutate


def _transpose(name):
    def mutate(stack, x, p):
        return x, {**p, name: p[name].T}

    return mutate


def _cast(name, to):
    def mutate(stack, x, p):
        dt = getattr(torch, to) if stack == "torch" else getattr(jnp, to)
        if name == "x":
            return x.to(dt) if stack == "torch" else x.astype(dt), p
        return x, {**p, name: p[name].to(dt) if stack == "torch" else p[name].astype(dt)}

    return mutate


def _extra(stack, x, p):
    return x, {**p, "w9": p["w0"]}


def _wrong_width(stack, x, p):
    return x[:, :-1], p


def _not_array(stack, x, p):
    return x.tolist(), p


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (_drop("c0"), "params: missing ['c0']"),
        (_extra, "params: unexpected ['w9']"),
        (_transpose("w1"), "params['w1']: expected shape [67, 21], got [21, 67]"),
        (_cast("v0", "float16"), "params['v0']: expected dtype float32, got float16"),
        (_cast("x", "bfloat16"), "x: expected dtype float32 (the spec's), got bfloat16"),
        (_wrong_width, "x: expected shape [..., 33], got [5, 32]"),
        (_not_array, "x: expected a "),
    ],
)
def test_both_fronts_give_the_same_errors(mutate, expected):
    params = init_params(SPEC, 0)
    x = make_input(SPEC, 5, 1)
    results = {s: _error(s, SPEC, x, params, mutate=mutate) for s in STACKS}
    for stack, (_kind, message) in results.items():
        assert expected in message, f"{stack}: {message}"
    if expected != "x: expected a ":
        assert results["torch"] == results["jax"]


def _wide_refusal(impl: str, *, training: bool = False) -> str:
    whose = (
        f"{impl!r}, whose kernels train under a pinned config (their tiles"
        if training
        else f"{impl!r} (its tiles"
    )
    return (
        f"config.block_n: expected a power of two for {whose} are tl.arange ranges), got 192; "
        "only ('pallas_mosaic', 'mosaic') take a multiple of 64"
        + (", in their forward" if training else "")
    )


def test_a_mosaic_width_is_refused_where_triton_kernels_would_run(monkeypatch):
    """A pinned block_n of 192 (Mosaic GPU's whole swizzle atoms, common/config.py): both fronts
    refuse it with one message wherever a plan runs a Triton or Pallas-Triton kernel (the
    per-layer portable impls, `auto` where it plans them, fused_small and fused_decode) and
    wherever a training step would run the portable kernels on it (a plan with `saved=`, the
    training forward); pallas_mosaic's forward takes it (under the interpreter here)."""
    spec = MLPSpec((64, 256, 64), "gelu", True, "bfloat16")  # too wide for fused_small
    wide = TileConfig(64, 192, 32)
    params, x = init_params(spec, 0), make_input(spec, 130, 1)  # too many rows for fused_decode
    for stack, impl in (("torch", "triton"), ("jax", "pallas_triton"), ("torch", "fused_decode")):
        rows = 8 if impl == "fused_decode" else 130
        kind, message = _error(stack, spec, x[:rows], params, impl=impl, config=wide)
        assert (kind, message) == (ValueError, _wide_refusal(impl))
    narrow = MLPSpec((32, 64, 16), "relu", True, "float16")  # the whole-MLP kernels, both stacks
    n_params, n_x = init_params(narrow, 2), make_input(narrow, 8, 3)
    for impl in ("fused_small", "fused_decode"):
        for stack in STACKS:
            kind, message = _error(stack, narrow, n_x, n_params, impl=impl, config=wide)
            assert (kind, message) == (ValueError, _wide_refusal(impl))
    for stack, (front, _) in STACKS.items():  # `auto`: refused where it plans a Triton kernel
        planned = front.plan(spec, (130, 64)).launches[0].impl
        if not get_implementation(planned).power_of_two_tiles:
            continue
        assert _error(stack, spec, x, params, impl="auto", config=wide) == (
            ValueError,
            _wide_refusal(planned),
        )
    for front, impl, portable in (
        (torch_impl, "mosaic", "triton"),
        (jax_impl, "pallas_mosaic", "pallas_triton"),
    ):
        assert front.plan(spec, (130, 64), impl=impl, config=wide).impl == impl
        for saved in ("preact", "inputs"):  # a training plan: the portable step refuses it
            with pytest.raises(ValueError) as err:
                front.plan(spec, (130, 64), impl=impl, config=wide, saved=saved)
            assert str(err.value) == _wide_refusal(portable, training=True)
    jx, jp = _jax_inputs(spec, x, params)
    y = jax_impl.mlp(jx, jp, spec, impl="pallas_mosaic", config=wide)
    assert_close(y, reference.forward(spec, x, params), spec)
    with pytest.raises(ValueError) as err:  # the training step: the portable kernels' tiles
        jax.grad(lambda p: jax_impl.mlp(jx, p, spec, impl="pallas_mosaic", config=wide).sum())(jp)
    assert str(err.value) == _wide_refusal("pallas_triton", training=True)
    # torch's twin of the custom_vjp's forward rule; `mosaic` needs a GPU to run, not to refuse
    monkeypatch.setattr(torch_impl.front, "_check_available", lambda impl, device: None)
    tx, tp = _torch_inputs(spec, x, params)
    with pytest.raises(ValueError) as err:
        torch_impl.front.training_forward(
            tx, tp, spec, impl="mosaic", config=wide, residual=None, saved="preact"
        )
    assert str(err.value) == _wide_refusal("triton", training=True)


def test_bad_impl_config_spec_and_residual():
    params = init_params(SPEC, 0)
    x = make_input(SPEC, 5, 1)
    for stack in STACKS:
        assert "impl: expected one of" in _error(stack, SPEC, x, params, impl="cuda")[1]
        kind, msg = _error(stack, SPEC, x, params, config={"block_m": 16})
        assert kind is TypeError and msg.startswith("config: expected a fusedmlp.common.TileConfig")
        front, wrap = STACKS[stack]
        tx, tp = wrap(SPEC, x, params)
        bad_spec = r"spec: expected a fusedmlp\.common\.MLPSpec, got dict"
        with pytest.raises(TypeError, match=bad_spec):
            front.mlp(tx, tp, SPEC.to_dict())
        res = tx[:, :3]
        with pytest.raises(ValueError, match=r"residual: expected shape \[5, 21\], got \[5, 3\]"):
            front.mlp(tx, tp, SPEC, residual=res)
    with pytest.raises(ValueError, match="for the torch front, got 'xla'"):
        torch_impl.plan(SPEC, (5, 33), impl="xla")
    with pytest.raises(ValueError, match="for the jax front, got 'eager'"):
        jax_impl.plan(SPEC, (5, 33), impl="eager")


@pytest.mark.parametrize("stack", list(STACKS))
@pytest.mark.parametrize("lead", [(0,), (3, 0), (0, 4)])
def test_empty_batch_returns_empty_output(stack, lead):
    front, wrap = STACKS[stack]
    params = init_params(SPEC, 0)
    x = make_input(SPEC, lead, 1)
    tx, tp = wrap(SPEC, x, params)
    for impl in impl_names(stack):
        if front.unavailable_reason(impl, "cpu") is not None:
            continue  # GPU-only cross-stack calls: refused by name (test_availability_on_cpu)
        try:
            y = front.mlp(tx, tp, SPEC, impl=impl)
        except NotImplementedError:
            continue
        assert tuple(y.shape) == (*lead, SPEC.d_out)


@pytest.mark.parametrize("stack", list(STACKS))
def test_baselines_match_reference_with_residual_and_batch_dims(stack):
    front, wrap = STACKS[stack]
    spec = MLPSpec((13, 29, 7), "geglu_tanh", True, "float32")
    params = init_params(spec, 3)
    x = make_input(spec, (2, 3), 4)
    r = make_input(spec.replace(widths=(7, 7)), (2, 3), 5)
    tx, tp = wrap(spec, x, params)
    tr = torch.from_numpy(r) if stack == "torch" else jnp.asarray(r)
    impl = "eager" if stack == "torch" else "xla"
    y = front.mlp(tx, tp, spec, impl=impl, residual=tr)
    assert_close(np.asarray(y), reference.forward(spec, x, params) + r, spec)


def test_plan_per_layer_names_kernels_and_configs():
    spec = MLPSpec((300, 500, 200), "swiglu", True, "bfloat16")
    p = torch_impl.plan(spec, (4, 8, 300), impl="triton")
    assert p.impl == "triton" and [k.kernel for k in p.launches] == ["gated", "linear_act"]
    assert p.launches[0].m == 32 and (p.launches[0].n, p.launches[0].k) == (500, 300)
    assert p.launches[1].activation == "identity"
    assert all(isinstance(k.config, TileConfig) for k in p.launches)
    pinned = TileConfig(16, 16, 16)
    q = jax_impl.plan(spec, (32, 300), impl="pallas_triton", config=pinned, residual=True)
    assert [k.kernel for k in q.launches] == ["gated", "linear_act"]
    assert all(k.config == pinned for k in q.launches) and q.launches[-1].residual
    assert "gated(silu)" in q.describe()


def test_auto_dispatch_on_cpu():
    wide = MLPSpec((300, 500, 200), "swiglu", True, "bfloat16")
    assert torch_impl.plan(wide, (512, 300)).impl == "triton"
    assert jax_impl.plan(wide, (512, 300)).impl == "pallas_triton"
    assert torch_impl.plan(wide, (16, 300)).impl == "fused_decode"
    assert jax_impl.plan(wide, (16, 300)).impl == "fused_decode"
    narrow = MLPSpec((64,) * 6, "relu", False, "float16")
    assert torch_impl.plan(narrow, (1000, 64)).impl == "fused_small"
    assert jax_impl.plan(narrow, (1000, 64)).impl == "fused_small"
    deep_wide = MLPSpec((300, 500, 400, 200), "gelu", True, "float32")
    assert torch_impl.plan(deep_wide, (8, 300)).impl == "triton"
    # An explicit impl that cannot take the spec says so instead of silently falling back.
    with pytest.raises(NotImplementedError, match="fused_small"):
        torch_impl.plan(wide, (512, 300), impl="fused_small")
    with pytest.raises(NotImplementedError, match="fused_decode"):
        jax_impl.plan(deep_wide, (8, 300), impl="fused_decode")


def test_availability_on_cpu():
    for impl in impl_names("torch"):
        if impl != "mosaic":  # GPU-only cross-stack call
            assert torch_impl.unavailable_reason(impl, "cpu") is None
    assert "needs a Hopper GPU" in torch_impl.unavailable_reason("mosaic", "cpu")
    assert "needs a GPU" in jax_impl.unavailable_reason("jax_triton", "cpu")
    assert torch_impl.is_interpreted("triton", "cpu") and not torch_impl.is_interpreted("eager")
    assert not torch_impl.is_interpreted("mosaic") and not jax_impl.is_interpreted("jax_triton")
    assert torch_impl.unavailable_reason("triton", "cuda") == "no CUDA GPU on this machine"
    for impl in impl_names("jax"):
        if impl != "jax_triton":
            assert jax_impl.unavailable_reason(impl, "cpu") is None
    assert jax_impl.is_interpreted("pallas_mosaic") and not jax_impl.is_interpreted("xla")
    assert jax_impl.unavailable_reason("pallas_triton", "gpu").startswith("no GPU")


def test_jax_front_inside_jit_with_static_spec():
    spec = MLPSpec((13, 29, 7), "gelu", False, "float32")
    params = init_params(spec, 3)
    x = make_input(spec, 6, 4)
    jx, jp = _jax_inputs(spec, x, params)
    f = jax.jit(lambda a, p: jax_impl.mlp(a, p, spec, impl="xla"))
    assert_close(np.asarray(f(jx, jp)), reference.forward(spec, x, params), spec)


def test_cross_stack_impls_plan_per_layer_kernels():
    # Planning needs no GPU: the plans name the other stack's kernels with their configs.
    spec = MLPSpec((304, 512, 208), "geglu", False, "bfloat16")  # Mosaic: multiples of 16
    p = jax_impl.plan(spec, (64, 304), impl="jax_triton", device="gpu")
    assert [k.kernel for k in p.launches] == ["triton.gated", "triton.linear_act"]
    q = torch_impl.plan(spec, (64, 304), impl="mosaic", device="cuda")
    assert [k.kernel for k in q.launches] == ["mosaic.gated", "mosaic.linear_act"]
    assert all(k.config is not None and k.config.block_m % 64 == 0 for k in q.launches)
    # Widths Mosaic GPU cannot tile are refused by name, with the fallback (as pallas_mosaic).
    odd = MLPSpec((300, 500, 200), "geglu", False, "bfloat16")
    with pytest.raises(NotImplementedError, match=r"^mosaic: K=300 .* falls back to impl 'triton'"):
        torch_impl.plan(odd, (64, 300), impl="mosaic", device="cuda")


@pytest.mark.parametrize(
    "name", ["swiglu-bfloat16-bias", "gelu_tanh-float16-nobias", "batch3d-silu-float32"]
)
def test_baselines_compile(name):
    case = golden.load(name)
    x, params = _torch_inputs(case.spec, case.x, case.params)
    out = torch_impl.mlp(x, params, case.spec, impl="compile").float().numpy()
    assert_close(out, case.y, case.spec, what=f"compile/{name}")


def _strided_views(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """x [m, d] as views that are not contiguous: every other column of a wider tensor, a column
    window of a wider row, a permuted batch of 3-D input, and one row expanded to m rows."""
    m, d = x.shape
    wide = torch.zeros(m, 2 * d, dtype=x.dtype)
    wide[:, ::2] = x
    window = torch.zeros(m, d + 7, dtype=x.dtype)
    window[:, 3 : 3 + d] = x
    return {
        "column stride 2": wide[:, ::2],
        "row stride d + 7": window[:, 3 : 3 + d],
        "permuted 3-D": x.reshape(2, m // 2, d).transpose(0, 1).contiguous().transpose(0, 1),
        "expanded row": x[:1].expand(m, d),
    }


@pytest.mark.parametrize("impl", ["fused_small", "fused_decode", "auto", "triton"])
def test_strided_x_gives_the_contiguous_result(impl):
    # A view with strides is the tensor it shows: every implementation gives, bit for bit, what it
    # gives on a contiguous copy (the whole-MLP launchers once read a strided x as if dense).
    spec = MLPSpec((24, 40, 17), "relu", True, "float32")
    params = {k: to_torch(v) for k, v in init_params(spec, seed=1).items()}
    x = to_torch(make_input(spec, 6, seed=2))
    for name, view in _strided_views(x).items():
        assert not view.is_contiguous(), name
        want = torch_impl.mlp(view.contiguous(), params, spec, impl=impl)
        got = torch_impl.mlp(view, params, spec, impl=impl)
        assert torch.equal(got, want), f"{impl}, x {name}"
