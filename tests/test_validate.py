"""The one check layer (common/validate.py): both stacks' adapters give the same messages and the
same exception types, for the fronts and for the per-layer public functions (the seam the kernel
files call in phase 2 of issue 27, replacing their private `_check_*`)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fusedmlp.common import TileConfig
from fusedmlp.common.validate import check_layer, check_packed_gated, fmt_shape
from fusedmlp.jax_impl.front import ADAPTER as JAX
from fusedmlp.torch_impl.front import ADAPTER as TORCH

F32 = np.zeros((4, 6), np.float32)


def _calls(adapter, a):
    w = a(np.zeros((6, 5), np.float32))
    layer = dict(activation="identity", config=None, fp32_precision="ieee")
    return [
        (ValueError, "w: expected shape [6, 5], got [7, 5]",
         lambda: check_layer(adapter, a(F32), a(np.zeros((7, 5), np.float32)), **layer)),
        (ValueError, "w: expected dtype float32, got float16",
         lambda: check_layer(adapter, a(F32), a(np.zeros((6, 5), np.float16)), **layer)),
        (ValueError, "x: expected dtype one of",
         lambda: check_layer(adapter, a(F32.astype(np.int32)), w, **layer)),
        (ValueError, "b: expected shape [5], got [4]",
         lambda: check_layer(adapter, a(F32), w, a(np.zeros(4, np.float32)), **layer)),
        (ValueError, "residual: expected shape [4, 5], got [5, 4]",
         lambda: check_layer(adapter, a(F32), w, residual=a(np.zeros((5, 4), np.float32)),
                             **layer)),
        (ValueError, "activation: expected one of",
         lambda: check_layer(adapter, a(F32), w, **{**layer, "activation": "swiglu"})),
        (ValueError, "fp32_precision: 'tf32' applies to dtype 'float32' only",
         lambda: check_layer(adapter, a(F32.astype(np.float16)),
                             a(np.zeros((6, 5), np.float16)),
                             **{**layer, "fp32_precision": "tf32"})),
        (TypeError, "config: expected a fusedmlp.common.TileConfig or None, got dict",
         lambda: check_layer(adapter, a(F32), w, **{**layer, "config": {"block_m": 16}})),
        (ValueError, "v: expected shape [6, 5], got [6, 4]",
         lambda: check_layer(adapter, a(F32), w, v=a(np.zeros((6, 4), np.float32)), gated=True,
                             **layer)),
        (ValueError, "c: expected an array because b is given",
         lambda: check_layer(adapter, a(F32), w, a(np.zeros(5, np.float32)), v=w, gated=True,
                             **layer)),
        (TypeError, f"w: expected a {adapter.array_type}, got list",
         lambda: check_layer(adapter, a(F32), [[0.0]], **layer)),
        (ValueError, "wv: expected shape [6, 128], got [6, 10]",
         lambda: check_packed_gated(adapter, a(F32), a(np.zeros((6, 10), np.float32)), n=5,
                                    **layer)),
        (ValueError, "n: expected a positive int",
         lambda: check_packed_gated(adapter, a(F32), w, n=0, **layer)),
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
    shape = check_layer(TORCH, torch.zeros(2, 3, 6), torch.from_numpy(w), activation="silu",
                        config=TileConfig(16, 16, 16), fp32_precision="tf32")
    assert (shape.dtype, shape.k, shape.n) == ("float32", 6, 5)
    packed = check_packed_gated(JAX, jnp.zeros((3, 6)), jnp.zeros((6, 128)), jnp.zeros(128), n=5,
                                activation="silu", config=None, fp32_precision="ieee")
    assert (packed.k, packed.n) == (6, 5)
    assert fmt_shape((16, 8)) == "[16, 8]"
