"""The portable per-layer kernels of both stacks: `triton` (torch_impl), `pallas_triton` (jax_impl).

Random odd shapes through the public functions: M = 0 and 1, 3-D inputs, a residual,
non-contiguous x (torch), a NaN row, tf32, small explicit TileConfigs (several tiles in every
dimension; gated tiles whose packed operand tile runs past the padded width), every gated
activation × bias × dtype at an N that is no multiple of 64, the two stacks bit for bit on the gated
kernel and, for JAX, the kernels inside `jax.jit`. Only `tolerance.assert_close` decides.

The golden cases run through these kernels once, via the front, in tests/test_parity_golden.py;
their validation (the shared check layer, the same text in both stacks) is tests/test_validate.py.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from fusedmlp.common import MLPSpec, TileConfig, reference
from fusedmlp.common.dtypes import DTYPES
from fusedmlp.common.tolerance import assert_close
from helpers import layer_ref, layer_spec, rand, to_numpy, to_torch

# Small tiles: the odd sizes below span several tiles in every dimension (and a ragged K tail).
SMALL = TileConfig(block_m=16, block_n=16, block_k=16, group_m=2, num_warps=4, num_stages=1)
# The gated kernels' output tile is a whole number of 64-column packed blocks (128 packed columns;
# SMALL's block_n = 16 is read as 64); WIDE reads 256 packed columns per tile, so with N <= 64 half
# its operand tile is past 2·Np.
SMALL_GATED = TileConfig(block_m=16, block_n=64, block_k=16, group_m=2, num_warps=4, num_stages=1)
WIDE_GATED = TileConfig(block_m=16, block_n=128, block_k=32, group_m=1, num_warps=4, num_stages=1)


# ---- the two stacks behind one interface ---------------------------------------------------------
@dataclass(frozen=True)
class Stack:
    name: str
    linear_act: Callable
    gated: Callable
    asarray: Callable[[np.ndarray], object]
    pack: Callable  # the stack's pack_gated: [..., N] gate and up -> [..., 2·Np] packed

    def gated_unpacked(self, x, w, v, b=None, c=None, **kw):
        """gated from W, V, b, c kept apart, packed here (callers pack once: a test's shortcut)."""
        bc = self.pack(b, c) if b is not None else None
        return self.gated(x, self.pack(w, v), bc, n=w.shape[-1], **kw)


def _torch_stack() -> Stack:

    from fusedmlp.torch_impl.gated import gated
    from fusedmlp.torch_impl.linear_act import linear_act
    from fusedmlp.torch_impl.packing import pack_gated
    from fusedmlp.torch_impl.runtime import INTERPRET

    device = "cpu" if INTERPRET else "cuda"

    asarray = functools.partial(to_torch, device=device)
    return Stack("triton", linear_act, gated, asarray, pack_gated)


def _jax_stack() -> Stack:
    import jax.numpy as jnp

    from fusedmlp.jax_impl.gated import gated
    from fusedmlp.jax_impl.linear_act import linear_act
    from fusedmlp.jax_impl.packing import pack_gated

    return Stack("pallas_triton", linear_act, gated, jnp.asarray, pack_gated)


@functools.cache
def get_stack(name: str) -> Stack:
    return _torch_stack() if name == "triton" else _jax_stack()


STACKS = ("triton", "pallas_triton")


@pytest.fixture(params=STACKS)
def stack(request: pytest.FixtureRequest) -> Stack:
    return get_stack(request.param)


# ---- random odd shapes ---------------------------------------------------------------------------
ODD = [  # (lead shape, K, N, activation, bias)
    ((37,), 53, 45, "gelu_tanh", True),
    ((1,), 29, 70, "silu", False),
    ((2, 9), 17, 33, "relu", True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,K,N,activation,bias", ODD)
def test_linear_act_random(
    stack: Stack, dtype: str, lead: tuple[int, ...], K: int, N: int, activation: str, bias: bool
) -> None:
    rng = np.random.default_rng(zlib.crc32(repr((lead, K, N, dtype)).encode()))
    x = rand(rng, (*lead, K), dtype)
    w = rand(rng, (K, N), dtype, 1 / np.sqrt(K))
    b = rand(rng, (N,), dtype) if bias else None
    r = rand(rng, (*lead, N), dtype) if len(lead) == 2 else None  # the 3-D case adds a residual
    out = stack.linear_act(
        stack.asarray(x),
        stack.asarray(w),
        stack.asarray(b) if bias else None,
        activation=activation,
        residual=stack.asarray(r) if r is not None else None,
        config=SMALL,
    )
    assert tuple(out.shape) == (*lead, N)
    assert_close(
        to_numpy(out),
        layer_ref(x, w, b, activation, residual=r),
        layer_spec(dtype),
        what=f"{stack.name} linear_act {dtype}",
    )


GATED_BASE = ("silu", "gelu", "gelu_tanh")  # the branch activations of swiglu, geglu, geglu_tanh
GATED_ODD = {"silu": ((37,), 53, 70), "gelu": ((2, 9), 17, 45), "gelu_tanh": ((1,), 29, 33)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", GATED_BASE)
def test_gated_random(stack: Stack, dtype: str, activation: str, bias: bool) -> None:
    """The packed gated kernel at N = 70, 45, 33 (no multiple of 64: zero-padded packed blocks)."""
    lead, K, N = GATED_ODD[activation]
    rng = np.random.default_rng(zlib.crc32(repr((lead, K, N, dtype, bias, "gated")).encode()))
    x = rand(rng, (*lead, K), dtype)
    w = rand(rng, (K, N), dtype, 1 / np.sqrt(K))
    v = rand(rng, (K, N), dtype, 1 / np.sqrt(K))
    b, c = (rand(rng, (N,), dtype), rand(rng, (N,), dtype)) if bias else (None, None)
    arr = stack.asarray
    out = stack.gated_unpacked(
        arr(x),
        arr(w),
        arr(v),
        arr(b) if bias else None,
        arr(c) if bias else None,
        activation=activation,
        config=SMALL_GATED,
    )
    assert tuple(out.shape) == (*lead, N)
    assert_close(
        to_numpy(out),
        layer_ref(x, w, b, activation, v, c),
        layer_spec(dtype),
        what=f"{stack.name} gated {activation} {dtype}",
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gated_packed_tile_past_the_padded_width(stack: Stack, dtype: str) -> None:
    """block_n = 128: N = 45 pads to one block pair (128 packed columns), so half of the tile's
    256 packed columns lie past 2·Np (masked to zeros); N = 150 gives a ragged second tile."""
    for n, seed in ((45, 1), (150, 2)):
        rng = np.random.default_rng(seed)
        x = rand(rng, (21, 40), dtype)
        w, v = rand(rng, (40, n), dtype, 0.15), rand(rng, (40, n), dtype, 0.15)
        b, c = rand(rng, (n,), dtype), rand(rng, (n,), dtype)
        a = stack.asarray
        out = stack.gated_unpacked(
            a(x), a(w), a(v), a(b), a(c), activation="gelu_tanh", config=WIDE_GATED
        )
        assert_close(
            to_numpy(out),
            layer_ref(x, w, b, "gelu_tanh", v, c),
            layer_spec(dtype),
            what=f"{stack.name} gated block_n=128 N={n} {dtype}",
        )


def test_gated_reads_a_narrow_pinned_block_n_as_one_packed_pair(stack: Stack) -> None:
    """A config pinned for a whole MLP (`mlp(..., config=TileConfig(16, 16, 16))`) reaches the
    gated layers too: block_n = 16 is read as 64, the same launch bit for bit."""
    rng = np.random.default_rng(5)
    x, w, v = (
        rand(rng, (20, 24), "float16"),
        rand(rng, (24, 50), "float16", 0.2),
        rand(rng, (24, 50), "float16", 0.2),
    )
    a = stack.asarray
    got = stack.gated_unpacked(a(x), a(w), a(v), activation="gelu", config=SMALL)
    want = stack.gated_unpacked(a(x), a(w), a(v), activation="gelu", config=SMALL_GATED)
    np.testing.assert_array_equal(to_numpy(got), to_numpy(want))
    assert_close(to_numpy(got), layer_ref(x, w, None, "gelu", v), layer_spec("float16"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_twins_bitwise(dtype: str) -> None:
    """torch:triton and jax:pallas_triton on the same packed operands and pinned config, bit for bit
    under the interpreters: the packed product, the bias, the gate/up split and the product of the
    halves. With a select activation (relu) every operation rounds alike in both; the exp of
    silu/gelu is the one known difference between the interpreters (tests/test_cross_stack.py)."""
    rng = np.random.default_rng(99 + DTYPES.index(dtype))
    x = rand(rng, (19, 33), dtype)
    w, v = rand(rng, (33, 70), dtype, 0.2), rand(rng, (33, 70), dtype, 0.2)
    b, c = rand(rng, (70,), dtype), rand(rng, (70,), dtype)
    outs = []
    for st in (get_stack("triton"), get_stack("pallas_triton")):
        a = st.asarray
        outs.append(
            to_numpy(
                st.gated_unpacked(
                    a(x), a(w), a(v), a(b), a(c), activation="relu", config=SMALL_GATED
                )
            )
        )
    np.testing.assert_array_equal(outs[0], outs[1])
    assert_close(outs[0], layer_ref(x, w, b, "relu", v, c), layer_spec(dtype), what="gated twins")


@pytest.mark.parametrize("family", ["linear_act", "gated"])
def test_empty_batch(stack: Stack, family: str) -> None:
    x = stack.asarray(np.zeros((0, 3, 19), np.float32))
    w = stack.asarray(np.ones((19, 7), np.float32))
    out = (
        stack.linear_act(x, w, activation="relu")
        if family == "linear_act"
        else stack.gated_unpacked(x, w, w)
    )
    assert tuple(out.shape) == (0, 3, 7)
    assert_close(to_numpy(out), np.zeros((0, 3, 7)), layer_spec("float32"))


def test_nan_row_propagates(stack: Stack) -> None:
    rng = np.random.default_rng(7)
    x = rand(rng, (21, 35), "float32")
    x[5] = np.nan
    x[9, 3] = np.nan
    w = rand(rng, (35, 40), "float32", 0.2)
    v = rand(rng, (35, 40), "float32", 0.2)
    out = stack.linear_act(stack.asarray(x), stack.asarray(w), activation="relu", config=SMALL)
    ref = layer_ref(x, w, None, "relu")
    assert np.isnan(ref[5]).all() and np.isfinite(ref[0]).all()
    assert_close(to_numpy(out), ref, layer_spec("float32"), what=f"{stack.name} NaN rows")
    out = stack.gated_unpacked(
        stack.asarray(x), stack.asarray(w), stack.asarray(v), config=SMALL_GATED
    )
    assert_close(
        to_numpy(out),
        layer_ref(x, w, None, "silu", v),
        layer_spec("float32"),
        what=f"{stack.name} gated NaN rows",
    )


def test_tf32(stack: Stack) -> None:
    rng = np.random.default_rng(11)
    x, w, b = rand(rng, (19, 67), "float32"), rand(rng, (67, 21), "float32", 0.1), None
    out = stack.linear_act(
        stack.asarray(x),
        stack.asarray(w),
        b,
        activation="gelu",
        config=SMALL,
        fp32_precision="tf32",
    )
    assert_close(
        to_numpy(out),
        layer_ref(x, w, b, "gelu"),
        layer_spec("float32", "tf32"),
        what=f"{stack.name} tf32",
    )


def test_heuristic_config(stack: Stack) -> None:
    # config=None: the interpreter's heuristic config, through the public function.
    rng = np.random.default_rng(12)
    x, w = rand(rng, (3, 5, 33), "float16"), rand(rng, (33, 50), "float16", 0.2)
    out = stack.linear_act(stack.asarray(x), stack.asarray(w), activation="silu")
    assert_close(to_numpy(out), layer_ref(x, w, None, "silu"), layer_spec("float16"))


def test_non_contiguous_x_torch() -> None:
    import torch

    from fusedmlp.torch_impl.linear_act import linear_act

    st = get_stack("triton")
    rng = np.random.default_rng(13)
    base = rand(rng, (53, 2 * 37), "bfloat16")
    w, b = rand(rng, (53, 45), "bfloat16", 0.15), rand(rng, (45,), "bfloat16")
    x = st.asarray(base).t()[::2]  # [37, 53] with strides (2, 74)
    assert not x.is_contiguous()
    out = linear_act(x, st.asarray(w), st.asarray(b), activation="gelu", config=SMALL)
    ref = layer_ref(base.T[::2], w, b, "gelu")
    assert_close(to_numpy(out), ref, layer_spec("bfloat16"), what="non-contiguous x")
    # a 3-D x with a non-unit K stride (reshaped to 2-D as a view) and a column-major w
    base3 = rand(rng, (2, 37, 2 * 53), "bfloat16")
    x3 = st.asarray(base3)[..., ::2]
    assert x3.reshape(-1, 53).stride() == (106, 2)
    wt = st.asarray(np.ascontiguousarray(w.T)).t()
    assert wt.stride() == (1, 53)
    out3 = linear_act(x3, wt, activation="identity", config=SMALL)
    assert_close(
        to_numpy(out3),
        layer_ref(base3[..., ::2], w, None, "identity"),
        layer_spec("bfloat16"),
        what="non-contiguous 3-D x, column-major w",
    )
    assert torch.equal(out3[1], linear_act(x3[1].contiguous(), wt.contiguous(), config=SMALL))


def test_inside_jit() -> None:
    import jax

    st = get_stack("pallas_triton")
    rng = np.random.default_rng(14)
    x = rand(rng, (2, 7, 29), "bfloat16")
    w, v = rand(rng, (29, 36), "bfloat16", 0.2), rand(rng, (29, 36), "bfloat16", 0.2)
    w2, b2 = rand(rng, (36, 13), "bfloat16", 0.2), rand(rng, (13,), "bfloat16")

    @functools.partial(jax.jit, static_argnames=("activation", "config"))
    def two_layers(wv, x, w2, b2, *, activation, config):
        h = st.gated(x, wv, n=36, activation=activation, config=config)
        return st.linear_act(h, w2, b2, config=config)

    arr = st.asarray
    wv = st.pack(arr(w), arr(v))  # packed once, outside the jitted step
    out = two_layers(wv, arr(x), arr(w2), arr(b2), activation="gelu", config=SMALL_GATED)
    spec = MLPSpec((29, 36, 13), "geglu", True, "bfloat16")
    params = {
        "w0": w,
        "v0": v,
        "w1": w2,
        "b1": b2,
        "b0": np.zeros(36, w.dtype),
        "c0": np.zeros(36, w.dtype),
    }
    assert_close(to_numpy(out), reference.forward(spec, x, params), spec, what="jax.jit")
