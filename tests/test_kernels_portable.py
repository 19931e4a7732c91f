"""The portable per-layer kernels of both stacks: `triton` (torch_impl), `pallas_triton` (jax_impl).

Every golden case runs through the per-layer kernels chained as the fronts chain them (`run_layers`:
gated for gated hidden layers, linear_act for plain hidden layers and for the identity last layer),
then random odd shapes: M = 0 and 1, 3-D inputs, a residual, non-contiguous x (torch), a NaN row,
tf32, small explicit TileConfigs (several tiles in every dimension), validation messages (the same
text in both stacks) and, for JAX, the kernels inside `jax.jit`. Only `tolerance.assert_close`
decides.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from fusedmlp.common import MLPSpec, TileConfig, golden, reference
from fusedmlp.common.dtypes import DTYPES, numpy_dtype
from fusedmlp.common.tolerance import assert_close
from helpers import to_numpy

# Small tiles: the odd sizes below span several tiles in every dimension (and a ragged K tail).
SMALL = TileConfig(block_m=16, block_n=16, block_k=16, group_m=2, num_warps=4, num_stages=1)


# ---- the two stacks behind one interface ---------------------------------------------------------
@dataclass(frozen=True)
class Stack:
    name: str
    linear_act: Callable
    gated: Callable
    asarray: Callable[[np.ndarray], object]


def _torch_stack() -> Stack:
    import torch

    from fusedmlp.torch_impl.gated import gated
    from fusedmlp.torch_impl.linear_act import linear_act
    from fusedmlp.torch_impl.runtime import INTERPRET

    device = "cpu" if INTERPRET else "cuda"

    def asarray(a: np.ndarray) -> torch.Tensor:
        if a.dtype == numpy_dtype("bfloat16"):  # NumPy has no bfloat16: move the raw bits
            return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16).to(device)
        return torch.from_numpy(a.copy()).to(device)

    return Stack("triton", linear_act, gated, asarray)


def _jax_stack() -> Stack:
    import jax.numpy as jnp

    from fusedmlp.jax_impl.gated import gated
    from fusedmlp.jax_impl.linear_act import linear_act

    return Stack("pallas_triton", linear_act, gated, jnp.asarray)


@functools.cache
def get_stack(name: str) -> Stack:
    return _torch_stack() if name == "triton" else _jax_stack()


STACKS = ("triton", "pallas_triton")


@pytest.fixture(params=STACKS)
def stack(request: pytest.FixtureRequest) -> Stack:
    return get_stack(request.param)


def run_layers(stack: Stack, spec: MLPSpec, x: object, params: dict[str, object],
               config: TileConfig | None = None) -> object:
    """The MLP as the fronts chain the per-layer kernels."""
    h = x
    for layer in spec.layers():
        i = layer.index
        b = params.get(f"b{i}")
        if layer.gated:
            h = stack.gated(h, params[f"w{i}"], params[f"v{i}"], b, params.get(f"c{i}"),
                            activation=layer.activation, config=config,
                            fp32_precision=spec.fp32_precision)
        else:
            h = stack.linear_act(h, params[f"w{i}"], b, activation=layer.activation,
                                 config=config, fp32_precision=spec.fp32_precision)
    return h


# ---- golden files --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", golden.case_names())
def test_golden(stack: Stack, name: str) -> None:
    case = golden.load(name)
    params = {k: stack.asarray(v) for k, v in case.params.items()}
    out = run_layers(stack, case.spec, stack.asarray(case.x), params)
    assert_close(to_numpy(out), case.y, case.spec, what=f"{stack.name} {name}")


# ---- random odd shapes ---------------------------------------------------------------------------
def _layer_ref(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, activation: str,
               v: np.ndarray | None = None, c: np.ndarray | None = None,
               residual: np.ndarray | None = None) -> np.ndarray:
    """One layer in float64, from the reference's activation formulas."""
    f64 = functools.partial(np.asarray, dtype=np.float64)
    z = f64(x) @ f64(w) + (f64(b) if b is not None else 0.0)
    out = reference.activation(activation, z)
    if v is not None:
        out = out * (f64(x) @ f64(v) + (f64(c) if c is not None else 0.0))
    if residual is not None:
        out = out + f64(residual)
    return out


def _rand(rng: np.random.Generator, shape: tuple[int, ...], dtype: str,
          scale: float = 1.0) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(numpy_dtype(dtype))


def _spec(dtype: str, fp32_precision: str = "ieee") -> MLPSpec:
    # Only the dtype and precision matter to the tolerance bounds.
    return MLPSpec((2, 2), "relu", True, dtype, fp32_precision)


ODD = [  # (lead shape, K, N, activation, bias)
    ((37,), 53, 45, "gelu_tanh", True),
    ((1,), 29, 70, "silu", False),
    ((2, 9), 17, 33, "relu", True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,K,N,activation,bias", ODD)
def test_linear_act_random(stack: Stack, dtype: str, lead: tuple[int, ...], K: int, N: int,
                           activation: str, bias: bool) -> None:
    rng = np.random.default_rng(zlib.crc32(repr((lead, K, N, dtype)).encode()))
    x = _rand(rng, (*lead, K), dtype)
    w = _rand(rng, (K, N), dtype, 1 / np.sqrt(K))
    b = _rand(rng, (N,), dtype) if bias else None
    r = _rand(rng, (*lead, N), dtype) if len(lead) == 2 else None  # the 3-D case adds a residual
    out = stack.linear_act(stack.asarray(x), stack.asarray(w),
                           stack.asarray(b) if bias else None, activation=activation,
                           residual=stack.asarray(r) if r is not None else None, config=SMALL)
    assert tuple(out.shape) == (*lead, N)
    assert_close(to_numpy(out), _layer_ref(x, w, b, activation, residual=r), _spec(dtype),
                 what=f"{stack.name} linear_act {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,K,N,activation,bias", [
    ((37,), 53, 45, "silu", True),
    ((1,), 29, 70, "gelu", False),
    ((2, 9), 17, 33, "gelu_tanh", True),
])
def test_gated_random(stack: Stack, dtype: str, lead: tuple[int, ...], K: int, N: int,
                      activation: str, bias: bool) -> None:
    rng = np.random.default_rng(zlib.crc32(repr((lead, K, N, dtype, "gated")).encode()))
    x = _rand(rng, (*lead, K), dtype)
    w = _rand(rng, (K, N), dtype, 1 / np.sqrt(K))
    v = _rand(rng, (K, N), dtype, 1 / np.sqrt(K))
    b, c = (_rand(rng, (N,), dtype), _rand(rng, (N,), dtype)) if bias else (None, None)
    arr = stack.asarray
    out = stack.gated(arr(x), arr(w), arr(v), arr(b) if bias else None,
                      arr(c) if bias else None, activation=activation, config=SMALL)
    assert tuple(out.shape) == (*lead, N)
    assert_close(to_numpy(out), _layer_ref(x, w, b, activation, v, c), _spec(dtype),
                 what=f"{stack.name} gated {dtype}")


@pytest.mark.parametrize("family", ["linear_act", "gated"])
def test_empty_batch(stack: Stack, family: str) -> None:
    x = stack.asarray(np.zeros((0, 3, 19), np.float32))
    w = stack.asarray(np.ones((19, 7), np.float32))
    out = (stack.linear_act(x, w, activation="relu") if family == "linear_act"
           else stack.gated(x, w, w))
    assert tuple(out.shape) == (0, 3, 7)
    assert_close(to_numpy(out), np.zeros((0, 3, 7)), _spec("float32"))


def test_nan_row_propagates(stack: Stack) -> None:
    rng = np.random.default_rng(7)
    x = _rand(rng, (21, 35), "float32")
    x[5] = np.nan
    x[9, 3] = np.nan
    w = _rand(rng, (35, 40), "float32", 0.2)
    v = _rand(rng, (35, 40), "float32", 0.2)
    out = stack.linear_act(stack.asarray(x), stack.asarray(w), activation="relu", config=SMALL)
    ref = _layer_ref(x, w, None, "relu")
    assert np.isnan(ref[5]).all() and np.isfinite(ref[0]).all()
    assert_close(to_numpy(out), ref, _spec("float32"), what=f"{stack.name} NaN rows")
    out = stack.gated(stack.asarray(x), stack.asarray(w), stack.asarray(v), config=SMALL)
    assert_close(to_numpy(out), _layer_ref(x, w, None, "silu", v), _spec("float32"),
                 what=f"{stack.name} gated NaN rows")


def test_tf32(stack: Stack) -> None:
    rng = np.random.default_rng(11)
    x, w, b = _rand(rng, (19, 67), "float32"), _rand(rng, (67, 21), "float32", 0.1), None
    out = stack.linear_act(stack.asarray(x), stack.asarray(w), b, activation="gelu",
                           config=SMALL, fp32_precision="tf32")
    assert_close(to_numpy(out), _layer_ref(x, w, b, "gelu"), _spec("float32", "tf32"),
                 what=f"{stack.name} tf32")


def test_heuristic_config(stack: Stack) -> None:
    # config=None: the interpreter's heuristic config, through the public function.
    rng = np.random.default_rng(12)
    x, w = _rand(rng, (3, 5, 33), "float16"), _rand(rng, (33, 50), "float16", 0.2)
    out = stack.linear_act(stack.asarray(x), stack.asarray(w), activation="silu")
    assert_close(to_numpy(out), _layer_ref(x, w, None, "silu"), _spec("float16"))


def test_non_contiguous_x_torch() -> None:
    import torch

    from fusedmlp.torch_impl.linear_act import linear_act

    st = get_stack("triton")
    rng = np.random.default_rng(13)
    base = _rand(rng, (53, 2 * 37), "bfloat16")
    w, b = _rand(rng, (53, 45), "bfloat16", 0.15), _rand(rng, (45,), "bfloat16")
    x = st.asarray(base).t()[::2]  # [37, 53] with strides (2, 74)
    assert not x.is_contiguous()
    out = linear_act(x, st.asarray(w), st.asarray(b), activation="gelu", config=SMALL)
    ref = _layer_ref(base.T[::2], w, b, "gelu")
    assert_close(to_numpy(out), ref, _spec("bfloat16"), what="non-contiguous x")
    # a 3-D x with a non-unit K stride (reshaped to 2-D as a view) and a column-major w
    base3 = _rand(rng, (2, 37, 2 * 53), "bfloat16")
    x3 = st.asarray(base3)[..., ::2]
    assert x3.reshape(-1, 53).stride() == (106, 2)
    wt = st.asarray(np.ascontiguousarray(w.T)).t()
    assert wt.stride() == (1, 53)
    out3 = linear_act(x3, wt, activation="identity", config=SMALL)
    assert_close(to_numpy(out3), _layer_ref(base3[..., ::2], w, None, "identity"),
                 _spec("bfloat16"), what="non-contiguous 3-D x, column-major w")
    assert torch.equal(out3[1], linear_act(x3[1].contiguous(), wt.contiguous(), config=SMALL))


def test_inside_jit() -> None:
    import jax

    st = get_stack("pallas_triton")
    rng = np.random.default_rng(14)
    x = _rand(rng, (2, 7, 29), "bfloat16")
    w, v = _rand(rng, (29, 36), "bfloat16", 0.2), _rand(rng, (29, 36), "bfloat16", 0.2)
    w2, b2 = _rand(rng, (36, 13), "bfloat16", 0.2), _rand(rng, (13,), "bfloat16")

    @functools.partial(jax.jit, static_argnames=("activation", "config"))
    def two_layers(x, w, v, w2, b2, *, activation, config):
        h = st.gated(x, w, v, activation=activation, config=config)
        return st.linear_act(h, w2, b2, config=config)

    arr = st.asarray
    out = two_layers(arr(x), arr(w), arr(v), arr(w2), arr(b2), activation="gelu", config=SMALL)
    spec = MLPSpec((29, 36, 13), "geglu", True, "bfloat16")
    params = {"w0": w, "v0": v, "w1": w2, "b1": b2,
              "b0": np.zeros(36, w.dtype), "c0": np.zeros(36, w.dtype)}
    assert_close(to_numpy(out), reference.forward(spec, x, params), spec, what="jax.jit")


# ---- validation: the same messages in both stacks ------------------------------------------------
def _bad_calls(st: Stack) -> list[tuple[str, Callable[[], object]]]:
    a = st.asarray
    f32 = np.zeros((4, 6), np.float32)
    w = a(np.zeros((6, 5), np.float32))
    return [
        ("w: expected shape [6, 5]",
         lambda: st.linear_act(a(f32), a(np.zeros((7, 5), np.float32)))),
        ("w: expected dtype float32, got float16",
         lambda: st.linear_act(a(f32), a(np.zeros((6, 5), np.float16)))),
        ("x: expected dtype one of", lambda: st.linear_act(a(f32.astype(np.int32)), w)),
        ("b: expected shape [5], got [4]",
         lambda: st.linear_act(a(f32), w, a(np.zeros(4, np.float32)))),
        ("residual: expected shape [4, 5], got [5, 4]",
         lambda: st.linear_act(a(f32), w, residual=a(np.zeros((5, 4), np.float32)))),
        ("activation: expected one of", lambda: st.linear_act(a(f32), w, activation="swiglu")),
        ("fp32_precision: expected one of", lambda: st.linear_act(a(f32), w, fp32_precision="x")),
        ("fp32_precision: 'tf32' applies to dtype 'float32' only",
         lambda: st.linear_act(a(f32.astype(np.float16)), a(np.zeros((6, 5), np.float16)),
                               fp32_precision="tf32")),
        ("config: expected a TileConfig or None, got dict",
         lambda: st.linear_act(a(f32), w, config={"block_m": 16})),
        ("v: expected shape [6, 5], got [6, 4]",
         lambda: st.gated(a(f32), w, a(np.zeros((6, 4), np.float32)))),
        ("c: expected an array because b is given",
         lambda: st.gated(a(f32), w, w, a(np.zeros(5, np.float32)))),
        ("activation: expected one of", lambda: st.gated(a(f32), w, w, activation="geglu")),
    ]


def test_validation_messages_match() -> None:
    torch_calls, jax_calls = _bad_calls(get_stack("triton")), _bad_calls(get_stack("pallas_triton"))
    for (expected, call_t), (_, call_j) in zip(torch_calls, jax_calls, strict=True):
        with pytest.raises((ValueError, TypeError)) as err_t:
            call_t()
        with pytest.raises((ValueError, TypeError)) as err_j:
            call_j()
        assert expected in str(err_t.value), (expected, str(err_t.value))
        assert type(err_t.value) is type(err_j.value)
        assert str(err_t.value) == str(err_j.value)
