"""The float64 reference against independent formulations:
torch.nn.functional and jax.numpy in float64
(forward and autodiff backward), plus the cost formulas."""

from __future__ import annotations

import numpy as np
import pytest

from fusedmlp.common import (
    ACTIVATIONS,
    MLPSpec,
    cost,
    init_params,
    make_grad_output,
    make_input,
    reference,
)
from fusedmlp.common.tolerance import REFERENCE_ATOL, REFERENCE_GRAD_RTOL, REFERENCE_RTOL

torch = pytest.importorskip("torch")  # the cpu extra installs it; CI always has it


def _torch_act(name, z):
    F = torch.nn.functional
    return {
        "relu": F.relu,
        "gelu": lambda t: F.gelu(t, approximate="none"),
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
        "silu": F.silu,
    }[name](z)


def _torch_forward(spec, x, params):
    h = x
    for layer in spec.layers():
        i = layer.index
        z = h @ params[f"w{i}"] + (params[f"b{i}"] if layer.bias else 0)
        out = z if layer.activation == "identity" else _torch_act(layer.activation, z)
        if layer.gated:
            out = out * (h @ params[f"v{i}"] + (params[f"c{i}"] if layer.bias else 0))
        h = out
    return h


def _case(activation, bias, lead=(7,), widths=(5, 11, 9, 3)):
    spec = MLPSpec(widths, activation, bias, "float32")
    return spec, init_params(spec, 3), make_input(spec, lead, 4), make_grad_output(spec, lead, 5)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_reference_matches_torch_float64(activation, bias):
    spec, params, x, dy = _case(activation, bias, lead=(2, 7))
    tp = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    tx = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    ty = _torch_forward(spec, tx, tp)
    (ty * torch.tensor(dy, dtype=torch.float64)).sum().backward()

    y = reference.forward(spec, x, params)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=REFERENCE_RTOL, atol=REFERENCE_ATOL)
    grads = reference.backward(spec, x, params, dy)
    assert set(grads) == {"x", *params}
    np.testing.assert_allclose(
        grads["x"], tx.grad.numpy(), rtol=REFERENCE_GRAD_RTOL, atol=REFERENCE_ATOL
    )
    for name, t in tp.items():
        np.testing.assert_allclose(
            grads[name], t.grad.numpy(), rtol=REFERENCE_GRAD_RTOL, atol=REFERENCE_ATOL, err_msg=name
        )


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_matches_jax_float64(activation):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    spec, params, x, dy = _case(activation, True)
    acts = {
        "relu": jax.nn.relu,
        "gelu": lambda z: jax.nn.gelu(z, approximate=False),
        "gelu_tanh": lambda z: jax.nn.gelu(z, approximate=True),
        "silu": jax.nn.silu,
    }

    def f(xv, p):
        h = xv
        for layer in spec.layers():
            i = layer.index
            z = h @ p[f"w{i}"] + p[f"b{i}"]
            out = z if layer.activation == "identity" else acts[layer.activation](z)
            if layer.gated:
                out = out * (h @ p[f"v{i}"] + p[f"c{i}"])
            h = out
        return h

    with jax.enable_x64(True):
        jp = {k: jnp.asarray(v, dtype=jnp.float64) for k, v in params.items()}
        jx = jnp.asarray(x, dtype=jnp.float64)
        y, vjp = jax.vjp(f, jx, jp)
        gx, gp = vjp(jnp.asarray(dy, dtype=jnp.float64))
        np.testing.assert_allclose(
            reference.forward(spec, x, params),
            np.asarray(y),
            rtol=REFERENCE_RTOL,
            atol=REFERENCE_ATOL,
        )
        grads = reference.backward(spec, x, params, dy)
        np.testing.assert_allclose(
            grads["x"], np.asarray(gx), rtol=REFERENCE_GRAD_RTOL, atol=REFERENCE_ATOL
        )
        for name in params:
            np.testing.assert_allclose(
                grads[name], np.asarray(gp[name]), rtol=REFERENCE_GRAD_RTOL, atol=REFERENCE_ATOL
            )


def test_reference_nan_propagates_and_rounding_points():
    spec, params, x, _ = _case("relu", True)
    x = x.copy()
    x[2, 1] = np.nan
    y = reference.forward(spec, x, params)
    assert np.isnan(y[2]).all() and np.isfinite(np.delete(y, 2, axis=0)).all()
    spec16 = spec.replace(dtype="bfloat16")
    p16 = init_params(spec16, 3)
    x16 = make_input(spec16, 7, 4)
    y_exact = reference.forward(spec16, x16, p16)
    y_round = reference.forward(spec16, x16, p16, round_hidden=True)
    assert not np.array_equal(y_exact, y_round)
    # Rounded output is representable in bfloat16.
    np.testing.assert_array_equal(y_round, y_round.astype(x16.dtype).astype(np.float64))


def test_reference_rejects_bad_shapes():
    spec, params, x, dy = _case("relu", True)
    with pytest.raises(ValueError, match=r"x: expected shape \[..., 5\], got \[7, 6\]"):
        reference.forward(spec, np.zeros((7, 6)), params)
    bad = dict(params)
    del bad["b1"]
    with pytest.raises(ValueError, match=r"missing \['b1'\]"):
        reference.forward(spec, x, bad)
    with pytest.raises(ValueError, match="dy: expected shape"):
        reference.backward(spec, x, params, dy[:, :2])


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_reference_backward_at_given_hidden(activation):
    # `hidden=` linearises at a kernel's stored forward: given the reference's own rounded
    # hiddens it is the round_hidden gradient bit for bit; the next layer reads the given values
    # (one element moved: only that row of the next layer's dW moves).
    spec = MLPSpec((6, 9, 9, 4), activation, True, "float16")
    params, x = init_params(spec, 3), make_input(spec, 11, 4)
    dy = make_grad_output(spec, 11, 5)
    x2d, p = reference._as_float64(spec, x, params)
    hidden = [h for h, _, _ in reference._layers_forward(spec, x2d, p, True)[1:-1]]
    want = reference.backward(spec, x, params, dy, round_hidden=True)
    got = reference.backward(spec, x, params, dy, hidden=hidden)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    with pytest.raises(ValueError, match="hidden: expected 2 hidden layers' outputs, got 1"):
        reference.backward(spec, x, params, dy, hidden=hidden[:1])
    moved = [h.copy() for h in hidden]
    row, col = np.argwhere(moved[1] != 0)[0]
    moved[1][row, col] *= 2.0
    key = "w2"
    dw = reference.backward(spec, x, params, dy, hidden=moved)[key]
    assert not np.array_equal(dw[col], want[key][col])
    np.testing.assert_array_equal(np.delete(dw, col, 0), np.delete(want[key], col, 0))


def test_cost_formulas_match_hand_counts():
    llama = MLPSpec.preset("llama3-8b")
    assert cost.flops(llama, 8192) == 2 * 8192 * 4096 * 14336 * 3
    assert cost.param_bytes(llama) == 3 * 4096 * 14336 * 2
    nerf = MLPSpec.preset("nerf-64x5")
    m = 2_097_152
    assert cost.min_bytes(nerf, m, whole=True) == 2 * m * 128 + cost.param_bytes(nerf)
    assert cost.min_bytes(nerf, m) == cost.min_bytes(nerf, m, whole=True) + 2 * 2 * m * 64 * 4
    f = cost.floor(llama, 8192, flops_per_s=788e12, bytes_per_s=3.02e12)
    assert f.bound == "compute" and abs(f.seconds - 3.66e-3) < 0.01e-3
    f16 = cost.floor(llama, 16, flops_per_s=788e12, bytes_per_s=3.02e12, whole=True)
    assert f16.bound == "memory" and abs(f16.seconds - 117e-6) < 1e-6
