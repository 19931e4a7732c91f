"""fused_decode (both stacks) against the float64 reference: every activation x dtype x bias, M in
{1, 5, 64}, odd widths spanning several hidden slices and d_out chunks, golden 2-layer cases, a 3-D
input, bit-identical repeats of the in-launch reduction, unsupported specs.
"""

from __future__ import annotations

import numpy as np
import pytest

from fusedmlp.common import golden, reference
from fusedmlp.common.config import TileConfig
from fusedmlp.common.dtypes import DTYPES
from fusedmlp.common.params import init_params, make_input
from fusedmlp.common.spec import ACTIVATIONS, MLPSpec
from fusedmlp.common.tolerance import assert_close
from helpers import golden_names, to_numpy

# Interpreter config: BLOCK_H=32, BLOCK_K=16 -> hidden 75 is 3 slices, d_in 19 is 2 K chunks,
# d_out 33 is 3 d_out chunks, all ragged.
ODD_WIDTHS = (19, 75, 33)
# The golden files' odd widths and M (hidden 67: 3 slices; d_in 33: 3 K chunks; d_out 21: 2 chunks):
# fresh random inputs at the golden shapes let the golden tests reuse the jitted Pallas kernels,
# which halves this file's run time (Pallas interpret compiles dominate it).
GOLDEN_WIDTHS, GOLDEN_M = golden.ODD_WIDTHS, golden.ODD_M
PUBLIC_NAMES = ("supports", "fused_decode_fwd", "fused_decode", "fused_decode_config", "MAX_M",
                "FALLBACK")


class Stack:
    """One stack's fused_decode module and array conversion."""

    def __init__(self, name: str):
        self.name = name
        if name == "torch":
            import torch

            from fusedmlp.torch_impl import fused_decode as mod

            self.torch = torch
        else:
            import jax.numpy as jnp

            from fusedmlp.jax_impl import fused_decode as mod

            self.jnp = jnp
        self.mod = mod

    def array(self, a: np.ndarray):
        if self.name == "torch":
            if a.dtype.name == "bfloat16":
                t = self.torch.from_numpy(a.view(np.uint16).copy()).view(self.torch.bfloat16)
            else:
                t = self.torch.from_numpy(a.copy())
            return t.cuda() if self.torch.cuda.is_available() else t
        return self.jnp.asarray(a)

    def call(self, x: np.ndarray, params: dict[str, np.ndarray], spec: MLPSpec, **kw):
        return self.mod.fused_decode(self.array(x), {k: self.array(v) for k, v in params.items()},
                                     spec, **kw)

    def run(self, x: np.ndarray, params: dict[str, np.ndarray], spec: MLPSpec, **kw) -> np.ndarray:
        return to_numpy(self.call(x, params, spec, **kw))


@pytest.fixture(params=["torch", "jax"], scope="module")
def stack(request) -> Stack:
    return Stack(request.param)


def check(stack: Stack, spec: MLPSpec, lead, seed: int, **kw) -> None:
    params = init_params(spec, seed=seed)
    x = make_input(spec, lead, seed=seed + 1)
    out = stack.run(x, params, spec, **kw)
    assert_close(out, reference.forward(spec, x, params), spec, what=f"{stack.name} {spec}")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_dtype_bias(stack, activation, dtype, bias):
    seed = 7 * ACTIVATIONS.index(activation) + 3 * DTYPES.index(dtype) + bias
    check(stack, MLPSpec(GOLDEN_WIDTHS, activation, bias, dtype), GOLDEN_M, seed)


@pytest.mark.parametrize("m", [0, 1, 5, 17, 64])
def test_rows(stack, m):
    check(stack, MLPSpec(ODD_WIDTHS, "swiglu", True, "bfloat16"), m, seed=m)


@pytest.mark.parametrize(
    "widths, activation, dtype",
    [((64, 128, 32), "gelu", "float16"), ((16, 16, 16), "relu", "float32"),
     ((128, 96, 7), "geglu_tanh", "bfloat16")],
    ids=lambda v: "-".join(map(str, v)) if isinstance(v, tuple) else v,
)
def test_widths(stack, widths, activation, dtype):
    check(stack, MLPSpec(widths, activation, True, dtype), 3, seed=widths[1])


def test_3d_input(stack):
    check(stack, MLPSpec(ODD_WIDTHS, "silu", True, "float32"), (2, 3), seed=9)


def test_pinned_config(stack):
    # 16-wide slices and 32-long chunks: 5 slices, 2 d_out chunks; M=20 in a 32-row block
    config = TileConfig(block_m=32, block_n=16, block_k=32, group_m=1, num_warps=4, num_stages=1)
    check(stack, MLPSpec(ODD_WIDTHS, "geglu", True, "float16"), 20, seed=4, config=config)


def test_deterministic(stack):
    """The reduction sums slices in a fixed order: three runs give the same bits."""
    spec = MLPSpec(ODD_WIDTHS, "swiglu", True, "float32")
    params = init_params(spec, seed=21)
    x = make_input(spec, 7, seed=22)
    outs = [to_numpy(stack.call(x, params, spec)).tobytes() for _ in range(3)]
    assert outs[0] == outs[1] == outs[2]
    assert_close(np.frombuffer(outs[0], np.float32).reshape(7, spec.d_out),
                 reference.forward(spec, x, params), spec)


@pytest.mark.parametrize(
    "name", [n for n in golden_names() if golden.load(n).spec.num_layers == 2]
)
def test_golden(stack, name):
    case = golden.load(name)
    m = int(np.prod(case.x.shape[:-1]))
    assert stack.mod.supports(case.spec, m) is None
    out = stack.run(case.x, case.params, case.spec)
    assert_close(out, case.y, case.spec, what=f"{stack.name} golden {name}")


def test_unsupported(stack):
    fallback = "'triton'" if stack.name == "torch" else "'pallas_triton'"
    spec = MLPSpec(ODD_WIDTHS, "relu", True, "float32")
    params = init_params(spec, seed=0)
    assert stack.mod.supports(spec, 64) is None
    with pytest.raises(NotImplementedError, match="M must be <= 64, got 65") as err:
        stack.run(make_input(spec, 65, seed=1), params, spec)
    assert fallback in str(err.value)
    deep = MLPSpec((16, 32, 32, 16), "relu", True, "float32")
    with pytest.raises(NotImplementedError, match=r"exactly 2 layers .* got 3"):
        stack.run(make_input(deep, 2, seed=1), init_params(deep, seed=0), deep)
    small = TileConfig(block_m=16, block_n=32, block_k=16)
    with pytest.raises(ValueError, match="config: expected block_m >= M = 17, got 16"):
        stack.run(make_input(spec, 17, seed=1), params, spec, config=small)


def test_validation(stack):
    spec = MLPSpec(ODD_WIDTHS, "geglu", False, "bfloat16")
    params = init_params(spec, seed=0)
    x = make_input(spec, 3, seed=1)
    with pytest.raises(TypeError, match=r"params\['v0'\]: expected dtype"):
        stack.run(x, dict(params, v0=params["v0"].astype(np.float32)), spec)
    with pytest.raises(ValueError, match=r"params: missing \[\], unexpected \['b0'\]"):
        stack.run(x, dict(params, b0=np.zeros(75, params["w0"].dtype)), spec)


def test_twin_contract():
    from fusedmlp.jax_impl import fused_decode as jax_mod
    from fusedmlp.torch_impl import fused_decode as torch_mod

    for name in PUBLIC_NAMES:
        assert hasattr(torch_mod, name) and hasattr(jax_mod, name), name
    spec = MLPSpec(ODD_WIDTHS, "relu", True, "float16")
    for m in (1, 17, 64):
        for interpret in (True, False):
            assert (torch_mod.fused_decode_config(spec, m, interpret=interpret)
                    == jax_mod.fused_decode_config(spec, m, interpret=interpret))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 16, 64])
def test_gpu_default_config(stack, m, dtype):
    spec = MLPSpec((1024, 2816, 1000), "swiglu", True, dtype)
    check(stack, spec, m, seed=m)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_deterministic(stack, dtype):
    """On the GPU programs finish in a different order each run; the bits must not change."""
    spec = MLPSpec((2048, 5632, 2048), "swiglu", True, dtype)
    params = init_params(spec, seed=31)
    x = make_input(spec, 64, seed=32)
    outs = [to_numpy(stack.call(x, params, spec)).tobytes() for _ in range(3)]
    assert outs[0] == outs[1] == outs[2]
    out = np.frombuffer(outs[0], np.float32).reshape(64, spec.d_out)
    assert_close(out, reference.forward(spec, x, params), spec)
