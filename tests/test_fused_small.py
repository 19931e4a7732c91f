"""fused_small (both stacks) against the float64 reference: every activation x dtype x bias, odd and
standard widths, depths 1..8, M in {0, 1, 37, 300}, a 3-D input, golden files, unsupported specs.

One test body per property, run on both stacks through the `stack` fixture (tokamax's shared test
base)."""

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

ODD_WIDTHS = (19, 45, 33, 7)
# Fresh random inputs at the golden files' odd shapes let the golden tests reuse the jitted Pallas
# kernels (Pallas interpret compiles dominate this file's run time).
GOLDEN_WIDTHS, GOLDEN_M = golden.ODD_WIDTHS, golden.ODD_M
PUBLIC_NAMES = ("supports", "fused_small_fwd", "fused_small", "fused_small_config", "pack_params",
                "INTERPRET_CONFIG", "WIDTHS_SUPPORTED", "MAX_LAYERS", "FALLBACK")


class Stack:
    """One stack's fused_small module and array conversion."""

    def __init__(self, name: str):
        self.name = name
        if name == "torch":
            import torch

            from fusedmlp.torch_impl import fused_small as mod

            self.torch = torch
        else:
            import jax.numpy as jnp

            from fusedmlp.jax_impl import fused_small as mod

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

    def run(self, x: np.ndarray, params: dict[str, np.ndarray], spec: MLPSpec, **kw) -> np.ndarray:
        out = self.mod.fused_small(self.array(x), {k: self.array(v) for k, v in params.items()},
                                   spec, **kw)
        return to_numpy(out)


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


@pytest.mark.parametrize(
    "widths, activation, dtype",
    [
        ((16, 16), "relu", "float32"),  # depth 1: a single linear layer
        (ODD_WIDTHS, "geglu", "float32"),
        ((32, 64, 16), "swiglu", "bfloat16"),
        ((16, 32, 64, 128), "gelu", "float16"),
        ((128, 64, 32, 16, 64, 128), "geglu_tanh", "float32"),
        ((24, 16, 32, 64, 128, 128, 64, 32, 9), "silu", "bfloat16"),  # depth 8
        ((128, 128, 128, 128, 128, 128, 128, 128, 128), "geglu", "float16"),  # depth 8, width 128
    ],
    ids=lambda v: "-".join(map(str, v)) if isinstance(v, tuple) else v,
)
def test_widths_and_depths(stack, widths, activation, dtype):
    check(stack, MLPSpec(widths, activation, True, dtype), 37, seed=len(widths))


@pytest.mark.parametrize("m", [0, 1, 37, 300])
def test_rows(stack, m):
    spec = MLPSpec(ODD_WIDTHS, "swiglu", True, "bfloat16")
    check(stack, spec, m, seed=m)


def test_3d_input(stack):
    check(stack, MLPSpec(ODD_WIDTHS, "gelu_tanh", False, "float16"), (3, 5), seed=11)


def test_pinned_config(stack):
    # 16-row blocks: 300 rows take 19 programs with a ragged last one
    config = TileConfig(block_m=16, block_n=16, block_k=16, group_m=1, num_warps=4, num_stages=1)
    check(stack, MLPSpec(ODD_WIDTHS, "geglu", True, "float32"), 300, seed=5, config=config)


@pytest.mark.parametrize("name", golden_names())
def test_golden(stack, name):
    case = golden.load(name)
    assert stack.mod.supports(case.spec) is None
    out = stack.run(case.x, case.params, case.spec)
    assert_close(out, case.y, case.spec, what=f"{stack.name} golden {name}")


def test_unsupported(stack):
    fallback = "'triton'" if stack.name == "torch" else "'pallas_triton'"
    wide = MLPSpec((32, 256, 16), "relu", True, "float32")
    reason = stack.mod.supports(wide)
    assert reason is not None and "got 256 at widths[1]" in reason and fallback in reason
    params = init_params(wide, seed=0)
    with pytest.raises(NotImplementedError, match=r"<= 128, got 256 at widths\[1\]"):
        stack.run(make_input(wide, 4, seed=1), params, wide)
    deep = MLPSpec((16,) * 10, "relu", False, "float32")  # 9 layers
    assert "at most 8 layers, got 9" in stack.mod.supports(deep)
    assert stack.mod.supports(MLPSpec(ODD_WIDTHS, "relu", True, "float32"), 10**7) is None


def test_validation(stack):
    spec = MLPSpec(ODD_WIDTHS, "swiglu", True, "float16")
    params = init_params(spec, seed=0)
    x = make_input(spec, 5, seed=1)
    with pytest.raises(ValueError, match=r"x: expected shape \[\.\.\., 19\], got \[5, 18\]"):
        stack.run(x[:, :18], params, spec)
    with pytest.raises(TypeError, match="x: expected dtype"):
        stack.run(x.astype(np.float32), params, spec)
    with pytest.raises(ValueError, match=r"params: missing \['c1'\]"):
        stack.run(x, {k: v for k, v in params.items() if k != "c1"}, spec)
    bad = dict(params, w1=params["w1"][:, :30])
    msg = r"params\['w1'\]: expected shape \(45, 33\), got \(45, 30\)"
    with pytest.raises(ValueError, match=msg):
        stack.run(x, bad, spec)


def test_twin_contract():
    from fusedmlp.jax_impl import fused_small as jax_mod
    from fusedmlp.torch_impl import fused_small as torch_mod

    for name in PUBLIC_NAMES:
        assert hasattr(torch_mod, name) and hasattr(jax_mod, name), name
    assert torch_mod.INTERPRET_CONFIG == jax_mod.INTERPRET_CONFIG
    for widths in ((16, 16), (19, 45, 33, 7), (128, 64, 128)):
        spec = MLPSpec(widths, "relu", True, "float16")
        for interpret in (True, False):
            assert (torch_mod.fused_small_config(spec, 1000, interpret=interpret)
                    == jax_mod.fused_small_config(spec, 1000, interpret=interpret))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [16, 64, 128])
def test_gpu_default_config(stack, width, dtype):
    spec = MLPSpec((width, width, width, width, 3), "swiglu", True, dtype)
    check(stack, spec, 100_003, seed=width)
