"""The one check layer (common/validate.py): both stacks' adapters give the same messages and the
same exception types — through the check functions themselves, and through every kernel's public
function, which call them (torch:triton, torch:triton_tma, jax:pallas_triton, jax:pallas_mosaic per
layer; fused_small and fused_decode of both stacks for the whole MLP). A mistake reads the same
whichever implementation the caller picked: TypeError for a wrong kind of object, ValueError for a
wrong shape, dtype, device or option, and the message names the argument, the expected and the
actual value (shapes as `[16, 8]`)."""

from __future__ import annotations

import re
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fusedmlp.common import MLPSpec, TileConfig, reference
from fusedmlp.common.packing import pack_params
from fusedmlp.common.params import init_params, make_input
from fusedmlp.common.tolerance import assert_close
from fusedmlp.common.validate import check_layer, check_packed_call, check_packed_gated, fmt_shape
from fusedmlp.jax_impl.front import ADAPTER as JAX
from fusedmlp.torch_impl.front import ADAPTER as TORCH
from helpers import to_torch

F32 = np.zeros((4, 6), np.float32)


def _calls(adapter, a):
    w = a(np.zeros((6, 5), np.float32))
    layer = dict(activation="identity", config=None, fp32_precision="ieee")
    return [
        (
            ValueError,
            "w: expected shape [6, 5], got [7, 5]",
            lambda: check_layer(adapter, a(F32), a(np.zeros((7, 5), np.float32)), **layer),
        ),
        (
            ValueError,
            "w: expected dtype float32, got float16",
            lambda: check_layer(adapter, a(F32), a(np.zeros((6, 5), np.float16)), **layer),
        ),
        (
            ValueError,
            "x: expected dtype one of",
            lambda: check_layer(adapter, a(F32.astype(np.int32)), w, **layer),
        ),
        (
            ValueError,
            "b: expected shape [5], got [4]",
            lambda: check_layer(adapter, a(F32), w, a(np.zeros(4, np.float32)), **layer),
        ),
        (
            ValueError,
            "residual: expected shape [4, 5], got [5, 4]",
            lambda: check_layer(
                adapter, a(F32), w, residual=a(np.zeros((5, 4), np.float32)), **layer
            ),
        ),
        (
            ValueError,
            "activation: expected one of",
            lambda: check_layer(adapter, a(F32), w, **{**layer, "activation": "swiglu"}),
        ),
        (
            ValueError,
            "fp32_precision: 'tf32' applies to dtype 'float32' only",
            lambda: check_layer(
                adapter,
                a(F32.astype(np.float16)),
                a(np.zeros((6, 5), np.float16)),
                **{**layer, "fp32_precision": "tf32"},
            ),
        ),
        (
            TypeError,
            "config: expected a fusedmlp.common.TileConfig or None, got dict",
            lambda: check_layer(adapter, a(F32), w, **{**layer, "config": {"block_m": 16}}),
        ),
        (
            TypeError,
            f"w: expected a {adapter.array_type}, got list",
            lambda: check_layer(adapter, a(F32), [[0.0]], **layer),
        ),
        (
            ValueError,
            "wv: expected shape [6, 128], got [6, 10]",
            lambda: check_packed_gated(
                adapter, a(F32), a(np.zeros((6, 10), np.float32)), n=5, **layer
            ),
        ),
        (
            ValueError,
            "bc: expected shape [128], got [10]",
            lambda: check_packed_gated(
                adapter,
                a(F32),
                a(np.zeros((6, 128), np.float32)),
                a(np.zeros(10, np.float32)),
                n=5,
                **layer,
            ),
        ),
        (
            ValueError,
            "n: expected a positive int",
            lambda: check_packed_gated(adapter, a(F32), w, n=0, **layer),
        ),
        (
            TypeError,
            "n: expected an int (the layer's output width), got str",
            lambda: check_packed_gated(adapter, a(F32), w, n="5", **layer),
        ),
    ]


def test_both_stacks_same_types_and_messages():
    torch_calls = _calls(TORCH, lambda a: torch.from_numpy(np.array(a)))
    jax_calls = _calls(JAX, jnp.asarray)
    for (kind, expected, call_t), (_, _, call_j) in zip(torch_calls, jax_calls, strict=True):
        with pytest.raises(kind) as err_t:
            call_t()
        with pytest.raises(kind) as err_j:
            call_j()
        assert expected in str(err_t.value), (expected, str(err_t.value))
        if "expected a torch.Tensor" not in expected:
            assert str(err_t.value) == str(err_j.value)


def test_valid_layers_return_their_shape():
    w = np.zeros((6, 5), np.float32)
    shape = check_layer(
        TORCH,
        torch.zeros(2, 3, 6),
        torch.from_numpy(w),
        activation="silu",
        config=TileConfig(16, 16, 16),
        fp32_precision="tf32",
    )
    assert (shape.dtype, shape.k, shape.n) == ("float32", 6, 5)
    dtype, k, n = check_packed_gated(
        JAX,
        jnp.zeros((3, 6)),
        jnp.zeros((6, 128)),
        jnp.zeros(128),
        n=5,
        activation="silu",
        config=None,
        fp32_precision="ieee",
    )
    assert (dtype, k, n) == ("float32", 6, 5)
    assert fmt_shape((16, 8)) == "[16, 8]"


# ---- the kernels' per-layer public functions ---------------------------------------------------
def _per_layer(name: str) -> tuple[Callable, Callable, Callable]:
    """(linear_act, gated, NumPy -> array) of one implementation's public functions."""
    if name == "torch:triton":
        from fusedmlp.torch_impl.gated import gated
        from fusedmlp.torch_impl.linear_act import linear_act
    elif name == "torch:triton_tma":
        from fusedmlp.torch_impl.tma.gated import gated
        from fusedmlp.torch_impl.tma.linear_act import linear_act
    elif name == "jax:pallas_triton":
        from fusedmlp.jax_impl.gated import gated
        from fusedmlp.jax_impl.linear_act import linear_act
    else:
        from fusedmlp.jax_impl.mosaic.gated import gated
        from fusedmlp.jax_impl.mosaic.linear_act import linear_act
    return linear_act, gated, to_torch if name.startswith("torch") else jnp.asarray


PER_LAYER = ("torch:triton", "torch:triton_tma", "jax:pallas_triton", "jax:pallas_mosaic")


def _bad_layer_calls(name: str) -> list[tuple[str, Callable[[], object]]]:
    linear_act, gated, a = _per_layer(name)
    f32 = np.zeros((4, 6), np.float32)
    w = a(np.zeros((6, 5), np.float32))
    wv = a(np.zeros((6, 128), np.float32))  # packed: n = 5 pads to one 64-column block pair
    return [
        (
            "w: expected shape [6, 5], got [7, 5]",
            lambda: linear_act(a(f32), a(np.zeros((7, 5), np.float32))),
        ),
        (
            "w: expected dtype float32, got float16",
            lambda: linear_act(a(f32), a(np.zeros((6, 5), np.float16))),
        ),
        ("x: expected dtype one of", lambda: linear_act(a(f32.astype(np.int32)), w)),
        (
            "b: expected shape [5], got [4]",
            lambda: linear_act(a(f32), w, a(np.zeros(4, np.float32))),
        ),
        (
            "residual: expected shape [4, 5], got [5, 4]",
            lambda: linear_act(a(f32), w, residual=a(np.zeros((5, 4), np.float32))),
        ),
        ("activation: expected one of", lambda: linear_act(a(f32), w, activation="swiglu")),
        ("fp32_precision: expected one of", lambda: linear_act(a(f32), w, fp32_precision="x")),
        (
            "fp32_precision: 'tf32' applies to dtype 'float32' only",
            lambda: linear_act(
                a(f32.astype(np.float16)), a(np.zeros((6, 5), np.float16)), fp32_precision="tf32"
            ),
        ),
        (
            "config: expected a fusedmlp.common.TileConfig or None, got dict",
            lambda: linear_act(a(f32), w, config={"block_m": 16}),
        ),
        ("w: expected a ", lambda: linear_act(a(f32), None)),
        ("x: expected a ", lambda: linear_act([[0.0] * 6], w)),
        (
            "wv: expected shape [6, 128], got [6, 10]",
            lambda: gated(a(f32), a(np.zeros((6, 10), np.float32)), n=5),
        ),
        (
            "bc: expected shape [128], got [10]",
            lambda: gated(a(f32), wv, a(np.zeros(10, np.float32)), n=5),
        ),
        (
            "n: expected a positive int (the layer's output width), got -1",
            lambda: gated(a(f32), wv, n=-1),
        ),
        (
            "n: expected an int (the layer's output width), got float",
            lambda: gated(a(f32), wv, n=5.0),
        ),
        (
            "wv: expected dtype float32, got float16",
            lambda: gated(a(f32), a(np.zeros((6, 128), np.float16)), n=5),
        ),
        ("activation: expected one of", lambda: gated(a(f32), wv, n=5, activation="geglu")),
        ("wv: expected a ", lambda: gated(a(f32), None, n=5)),
    ]


def _outcome(call: Callable[[], object]) -> tuple[type, str]:
    try:
        call()
    except Exception as err:
        # the array type is the one thing a message may name differently per stack
        text = re.sub(r"torch\.Tensor|jax\.Array", "<array>", str(err))
        return type(err), text
    raise AssertionError("no exception")


def test_kernel_public_functions_share_the_check_layer():
    """Every per-layer implementation's public function raises the same type with the same
    message for each mistake, the shared check layer's."""
    outcomes = {name: [_outcome(call) for _, call in _bad_layer_calls(name)] for name in PER_LAYER}
    expected = [text for text, _ in _bad_layer_calls(PER_LAYER[0])]
    reference_outcomes = outcomes[PER_LAYER[0]]
    for i, want in enumerate(expected):
        kind, text = reference_outcomes[i]
        assert want in text, (want, text)
        assert kind in (TypeError, ValueError), (want, kind)
        for name in PER_LAYER[1:]:
            assert outcomes[name][i] == (kind, text), (name, want, outcomes[name][i], text)


# a Mosaic GPU width: whole 64-column swizzle atoms, not a power of two (common/config.py)
WIDE = TileConfig(64, 192, 32)


@pytest.mark.parametrize("name", PER_LAYER)
def test_a_mosaic_width_is_refused_by_the_triton_kernels_only(name):
    """block_n = 192 is a TileConfig (Mosaic GPU's wgmma takes it), but the Triton and
    Pallas-Triton kernels' tiles are tl.arange ranges: their public functions refuse it before
    any kernel, with one message naming the field, the implementation and who takes it."""
    linear_act, gated, a = _per_layer(name)
    x, w = a(np.zeros((4, 6), np.float16)), a(np.zeros((6, 5), np.float16))
    wv = a(np.zeros((6, 128), np.float16))
    impl = name.split(":")[1]
    if impl == "pallas_mosaic":  # K = 16: rows of 32 bytes, Mosaic GPU's narrowest TMA tiles
        spec = MLPSpec((16, 64), "relu", False, "float16")  # one layer: no activation
        params, xin = init_params(spec, 5), make_input(spec, 4, 6)
        out = linear_act(a(xin), a(params["w0"]), config=WIDE)
        assert_close(out, reference.forward(spec, xin, params), spec)
        return
    want = (
        f"config.block_n: expected a power of two for {impl!r} (its tiles are tl.arange ranges), "
        "got 192; only ('pallas_mosaic', 'mosaic') take a multiple of 64"
    )
    for call in (lambda: linear_act(x, w, config=WIDE), lambda: gated(x, wv, n=5, config=WIDE)):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == want


def test_torch_kernels_check_devices():
    """The device checks of the torch kernels: the arrays' devices agree (the shared layer), and
    the kernels take the device of this process' Triton (their own check: TRITON_INTERPRET)."""
    from fusedmlp.torch_impl.linear_act import linear_act
    from fusedmlp.torch_impl.runtime import INTERPRET

    x, w = torch.zeros(4, 6), torch.zeros(6, 5)
    with pytest.raises(ValueError, match="w: expected device cpu, got meta"):
        linear_act(x, w.to("meta"))
    where = r"a CPU tensor \(TRITON_INTERPRET=1\)" if INTERPRET else "a CUDA tensor"
    with pytest.raises(ValueError, match=f"x: the Triton kernels expected {where}, got device"):
        linear_act(x.to("meta"), w.to("meta"))


# ---- the whole-MLP public functions --------------------------------------------------------------
def _whole(name: str) -> tuple[Callable, Callable]:
    stack, kernel = name.split(":")
    if stack == "torch":
        from fusedmlp.torch_impl import fused_decode, fused_small
    else:
        from fusedmlp.jax_impl import fused_decode, fused_small
    fn = fused_small.fused_small if kernel == "fused_small" else fused_decode.fused_decode
    return fn, to_torch if stack == "torch" else jnp.asarray


WHOLE = ("torch:fused_small", "jax:fused_small", "torch:fused_decode", "jax:fused_decode")
SPEC = MLPSpec((19, 45, 7), "swiglu", True, "float16")


def _bad_whole_calls(name: str) -> list[tuple[str, Callable[[], object]]]:
    fn, a = _whole(name)
    params = init_params(SPEC, seed=0)
    x = make_input(SPEC, 5, seed=1)
    packed = {k: a(v) for k, v in pack_params(SPEC, params).items()}
    plain = {k: a(v) for k, v in params.items()}
    return [
        ("x: expected shape [..., 19], got [5, 18]", lambda: fn(a(x[:, :18]), packed, SPEC)),
        (
            "x: expected dtype float16 (the spec's), got float32",
            lambda: fn(a(x.astype(np.float32)), packed, SPEC),
        ),
        (
            "params: missing ['bc0']",
            lambda: fn(a(x), {k: v for k, v in packed.items() if k != "bc0"}, SPEC),
        ),
        ("params: unexpected ['b9']", lambda: fn(a(x), dict(packed, b9=packed["b1"]), SPEC)),
        (
            "params['w1']: expected shape [45, 7], got [45, 5]",
            lambda: fn(a(x), dict(packed, w1=packed["w1"][:, :5]), SPEC),
        ),
        (
            "params['b1']: expected dtype float16, got float32",
            lambda: fn(a(x), dict(packed, b1=a(np.zeros(7, np.float32))), SPEC),
        ),
        ("params: missing ['wv0', 'bc0']", lambda: fn(a(x), plain, SPEC)),
        ("spec: expected a fusedmlp.common.MLPSpec, got dict", lambda: fn(a(x), packed, {})),
        ("params: expected a dict of ", lambda: fn(a(x), [1], SPEC)),
        ("config: expected a TileConfig, ", lambda: fn(a(x), packed, SPEC, config={})),
    ]


@pytest.mark.parametrize("kernel", ["fused_small", "fused_decode"])
def test_whole_mlp_public_functions_share_the_check_layer(kernel):
    torch_out = [_outcome(c) for _, c in _bad_whole_calls(f"torch:{kernel}")]
    jax_out = [_outcome(c) for _, c in _bad_whole_calls(f"jax:{kernel}")]
    for (want, _), (kind_t, text_t), (kind_j, text_j) in zip(
        _bad_whole_calls(f"torch:{kernel}"), torch_out, jax_out, strict=True
    ):
        assert want in text_t, (want, text_t)
        assert kind_t is kind_j and kind_t in (TypeError, ValueError), (want, kind_t, kind_j)
        assert text_t == text_j.replace("jax_impl", "torch_impl"), (text_t, text_j)
    # plain params: the message says how to pack, naming the stack's own function
    assert "pack once with fusedmlp.torch_impl.packing.pack_params(spec, params)" in torch_out[6][1]


def test_check_packed_call_directly():
    spec = check_packed_call(
        JAX,
        SPEC,
        jnp.zeros((2, 19), jnp.float16),
        {k: jnp.asarray(v) for k, v in pack_params(SPEC, init_params(SPEC, seed=0)).items()},
    )
    assert spec is SPEC
