"""FusedMLP: registered, deterministic parameters; every implementation that runs here matches the
float64 reference in all three dtypes; torch.compile(fullgraph=True) with the eager, aot_eager and
inductor backends and dynamic shapes; autocast (cpu bfloat16) from float32 parameters; clear errors;
empty batch; NaN propagation; a loud backward."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from fusedmlp.common import (
    MLPSpec,
    TileConfig,
    golden,
    init_params,
    make_input,
    param_shapes,
    reference,
)
from fusedmlp.common.packing import packed_names
from fusedmlp.common.tolerance import assert_close
from fusedmlp.torch_impl import FusedMLP
from fusedmlp.torch_impl.module import to_torch
from fusedmlp.torch_impl.packing import pack_params
from helpers import to_numpy

DTYPES = ("float32", "float16", "bfloat16")
# Odd widths under 128 and 2 layers: fused_small and fused_decode (M <= 64) can take them too.
SMALL = MLPSpec((33, 67, 21), "swiglu", True, "float32")
# 3 layers, a width over 128: the per-layer kernels only.
WIDE = MLPSpec((37, 131, 45, 19), "gelu_tanh", False, "float32")
IMPLS_SMALL = ("triton", "triton_tma", "fused_small", "fused_decode", "eager", "auto")
IMPLS_WIDE = ("triton", "triton_tma", "eager", "auto")


def _input(spec, lead, seed=1):
    return to_torch(make_input(spec, lead, seed=seed))


def _reference(module, x, residual=None):
    params = {k: to_numpy(v) for k, v in module.params().items()}
    y = reference.forward(module.spec, to_numpy(x), params)
    return y + to_numpy(residual) if residual is not None else y


# ---- parameters ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_parameters_registered_and_deterministic(dtype):
    spec = SMALL.replace(dtype=dtype)
    module = FusedMLP(spec, seed=3)
    names = [name for name, _ in module.named_parameters()]
    assert names == list(packed_names(spec)) == ["wv0", "bc0", "w1", "b1"]  # packed once
    expected = init_params(spec, seed=3)
    for param in module.packed_params().values():
        assert isinstance(param, torch.nn.Parameter) and param.dtype == getattr(torch, dtype)
    assert list(module.params()) == list(param_shapes(spec))
    for name, value in module.params().items():
        # bit for bit the arrays the JAX stack and the golden files get from init_params
        np.testing.assert_array_equal(to_numpy(value), expected[name].astype(np.float32))
    assert module.spec == spec
    assert "33→67→21 swiglu" in repr(module)


def test_dtype_argument_and_to_follow_the_parameters():
    module = FusedMLP(SMALL, dtype=torch.bfloat16, impl="triton")
    assert module.spec.dtype == "bfloat16" and module.wv0.dtype == torch.bfloat16
    module = FusedMLP(SMALL.replace(fp32_precision="tf32"), impl="triton").to(torch.float16)
    assert module.spec == SMALL.replace(dtype="float16")  # tf32 applies to float32 only
    x = _input(module.spec, 5, seed=2)
    with torch.no_grad():
        out = module(x)
    assert out.dtype == torch.float16
    assert_close(to_numpy(out), _reference(module, x), module.spec)


def test_load_params_and_from_params():
    params = {k: to_torch(v) for k, v in init_params(SMALL, seed=9).items()}
    module = FusedMLP.from_params(params, SMALL, impl="triton")
    for name, value in module.params().items():
        assert torch.equal(value, params[name])
    with pytest.raises(ValueError, match=r"params: missing \['c0'\]"):
        module.load_params({k: v for k, v in params.items() if k != "c0"})
    with pytest.raises(
        ValueError, match=r"params\['w1'\]: expected shape \[67, 21\], got \[21, 67\]"
    ):
        module.load_params({**params, "w1": params["w1"].T})


def test_packed_layout_load_and_state_dict():
    params = {k: to_torch(v) for k, v in init_params(SMALL, seed=5).items()}
    packed = pack_params(SMALL, params)
    a = FusedMLP.from_params(params, SMALL, impl="eager")  # plain names: packed once here
    b = FusedMLP.from_params(packed, SMALL, impl="eager")  # packed names: taken as they are
    for name, value in a.packed_params().items():
        assert torch.equal(value, packed[name]) and torch.equal(value, b.packed_params()[name])
    # A state dict in the contract's names (an older checkpoint) is packed on load.
    c = FusedMLP(SMALL, impl="eager", seed=None)
    c.load_state_dict(params)
    assert all(torch.equal(v, packed[k]) for k, v in c.packed_params().items())
    d = FusedMLP(SMALL, impl="eager", seed=None)
    d.load_state_dict(a.state_dict())
    assert all(torch.equal(v, packed[k]) for k, v in d.packed_params().items())
    with pytest.raises(RuntimeError, match="Missing key"):  # neither layout complete: torch says
        d.load_state_dict({k: v for k, v in params.items() if k != "v0"})
    x = _input(SMALL, 3, seed=1)
    with torch.no_grad():
        assert torch.equal(a(x), b(x)) and torch.equal(a(x), c(x))
    missing = r"params: missing \['bc0'\], unexpected \[\]; .*\(packed\)"
    with pytest.raises(ValueError, match=missing):
        a.load_params({k: v for k, v in packed.items() if k != "bc0"})


# ---- every implementation, every dtype -----------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS_SMALL)
def test_impls_small(impl, dtype):
    spec = SMALL.replace(dtype=dtype, bias=dtype != "float16")
    module = FusedMLP(spec, impl=impl, seed=len(impl))
    x = _input(spec, (2, 7), seed=len(dtype))
    with torch.no_grad():
        out = module(x)
    assert out.shape == (2, 7, spec.d_out) and out.dtype == x.dtype
    assert_close(to_numpy(out), _reference(module, x), spec, what=f"{impl} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS_WIDE)
def test_impls_wide(impl, dtype):
    spec = WIDE.replace(dtype=dtype)
    module = FusedMLP(spec, impl=impl, seed=2)
    x = _input(spec, 1, seed=5)  # M = 1
    with torch.no_grad():
        out = module(x)
    assert_close(to_numpy(out), _reference(module, x), spec, what=f"{impl} {dtype}")


GOLDEN = (
    "batch3d-silu-float32",
    "deep-gelu_tanh-float16",
    "deep-swiglu-bfloat16",
    "m1-swiglu-bfloat16",
    "nan-relu-float32",
    "geglu_tanh-bfloat16-nobias",
)


@pytest.mark.parametrize("name", GOLDEN)
def test_golden(name):
    case = golden.load(name)
    module = FusedMLP.from_params({k: to_torch(v) for k, v in case.params.items()}, case.spec)
    with torch.no_grad():
        out = module(to_torch(case.x))
    assert_close(to_numpy(out), case.y, case.spec, what=name)


@pytest.mark.parametrize("impl", ["triton", "fused_decode"])
def test_residual(impl):
    module = FusedMLP(SMALL.replace(activation="silu"), impl=impl, seed=4)
    x = _input(module.spec, 6, seed=6)
    residual = torch.randn(6, module.spec.d_out, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = module(x, residual)
    assert_close(to_numpy(out), _reference(module, x, residual), module.spec, what=impl)


def test_pinned_config():
    config = TileConfig(16, 16, 16, group_m=1, num_warps=4, num_stages=1)
    module = FusedMLP(WIDE, impl="triton", config=config)
    x = _input(WIDE, 19, seed=8)
    with torch.no_grad():
        out = module(x)
    assert "config=16x16x16" in repr(module)
    assert_close(to_numpy(out), _reference(module, x), WIDE)


# ---- torch.compile -------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_dynamic(backend):
    torch._dynamo.reset()
    module = FusedMLP(SMALL, impl="triton", seed=1)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(module, fullgraph=True, backend=counter, dynamic=True)
    with torch.no_grad():
        for lead in ((2, 3), (4, 9)):  # two batch shapes, one compiled graph (dynamic)
            x = _input(SMALL, lead, seed=lead[0])
            out = compiled(x)
            assert torch.equal(out, module(x))  # the same kernels, eager or compiled
            assert_close(to_numpy(out), _reference(module, x), SMALL, what=f"{backend} {lead}")
    assert counter.frame_count == 1  # no recompile for the second batch shape
    assert counter.op_count == 1  # one node: the whole MLP is torch.ops.fusedmlp.mlp


def test_compile_inductor():
    # The default backend. The op is opaque to Inductor, so its graph is one extern call: the first
    # compile took ~3 s on the 2-core CPU machine (2026-11-23), not the ~20 s of a generated kernel.
    torch._dynamo.reset()
    module = FusedMLP(WIDE, impl="triton", seed=5)
    start = time.perf_counter()
    compiled = torch.compile(module, fullgraph=True)
    x = _input(WIDE, 5, seed=3)
    with torch.no_grad():
        out = compiled(x)
    print(f"inductor first call (compile + run): {time.perf_counter() - start:.1f} s")
    assert torch.equal(out, module(x))
    assert_close(to_numpy(out), _reference(module, x), WIDE)


def test_compile_with_residual_and_autocast():
    torch._dynamo.reset()
    module = FusedMLP(SMALL, impl="fused_small", seed=6)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    x = _input(SMALL, 4, seed=7)
    residual = torch.randn(4, SMALL.d_out, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = compiled(x, residual)
        assert_close(to_numpy(out), _reference(module, x, residual), SMALL)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = compiled(x)
    assert low.dtype == torch.bfloat16
    spec16 = SMALL.replace(dtype="bfloat16")
    params16 = {k: to_numpy(v.to(torch.bfloat16)) for k, v in module.params().items()}
    ref = reference.forward(spec16, to_numpy(x.to(torch.bfloat16)), params16)
    assert_close(to_numpy(low), ref, spec16)


# ---- autocast ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "impl,spec", [("triton", WIDE), ("triton_tma", SMALL), ("fused_small", SMALL), ("eager", SMALL)]
)
def test_autocast_cpu_bfloat16(impl, spec):
    module = FusedMLP(spec, impl=impl, seed=7)  # float32 parameters
    x = _input(spec, (3, 5), seed=11)  # float32 input
    residual = torch.randn(3, 5, spec.d_out, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x, residual)
    assert out.dtype == torch.bfloat16 and module.w1.dtype == torch.float32
    # nn.Linear's rule: inputs and params rounded to bfloat16, the product in bfloat16.
    spec16 = spec.replace(dtype="bfloat16")
    params16 = {k: to_numpy(v.to(torch.bfloat16)) for k, v in module.params().items()}
    ref = reference.forward(spec16, to_numpy(x.to(torch.bfloat16)), params16)
    ref = ref + to_numpy(residual.to(torch.bfloat16))
    # baseline: what torch itself computes under the same autocast (F.linear casts the same way)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        base = _autocast_eager(module, x) + residual.to(torch.bfloat16)
    assert_close(to_numpy(out), ref, spec16, baseline=to_numpy(base), what=impl)


def _autocast_eager(module, x):
    spec, p = module.spec, module.params()
    act = {
        "silu": torch.nn.functional.silu,
        "gelu_tanh": lambda z: torch.nn.functional.gelu(z, approximate="tanh"),
    }
    h = x
    for layer in spec.layers():
        i = layer.index
        z = torch.nn.functional.linear(h, p[f"w{i}"].T, p.get(f"b{i}"))
        if layer.activation != "identity":
            z = act[layer.activation](z)
        if layer.gated:
            z = z * torch.nn.functional.linear(h, p[f"v{i}"].T, p.get(f"c{i}"))
        h = z
    return h


def test_outside_autocast_dtype_must_match():
    module = FusedMLP(SMALL, impl="triton")
    with pytest.raises(ValueError, match=r"x: expected dtype float32 .*got bfloat16"):
        module(_input(SMALL, 2).bfloat16())


# ---- edges ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["triton", "fused_small"])
def test_empty_batch(impl):
    module = FusedMLP(SMALL, impl=impl)
    x = _input(SMALL, (0, 3))
    with torch.no_grad():
        out = module(x)
    assert out.shape == (0, 3, SMALL.d_out) and out.dtype == torch.float32
    assert_close(to_numpy(out), _reference(module, x), SMALL)


@pytest.mark.parametrize("impl", ["triton", "triton_tma", "fused_small", "fused_decode"])
def test_nan_propagates(impl):
    module = FusedMLP(SMALL.replace(activation="geglu", dtype="bfloat16"), impl=impl)
    x = _input(module.spec, 5, seed=12)
    x[2, 7] = float("nan")
    with torch.no_grad():
        out = module(x)
    ref = _reference(module, x)
    assert np.isnan(ref[2]).all() and np.isfinite(np.delete(ref, 2, axis=0)).all()
    assert_close(to_numpy(out), ref, module.spec, what=impl)  # NaN exactly where the reference


def test_bad_inputs_name_the_argument():
    module = FusedMLP(SMALL, impl="triton")
    with pytest.raises(ValueError, match=r"x: expected shape \[\.\.\., 33\], got \[4, 34\]"):
        module(torch.zeros(4, 34))
    with pytest.raises(TypeError, match=r"x: expected a torch.Tensor, got ndarray"):
        module(np.zeros((4, 33), np.float32))
    with pytest.raises(ValueError, match=r"residual: expected shape \[4, 21\], got \[4, 20\]"):
        module(torch.zeros(4, 33), torch.zeros(4, 20))
    with pytest.raises(ValueError, match="impl: expected one of"):
        FusedMLP(SMALL, impl="cutlass")
    with pytest.raises(TypeError, match=r"config: expected a fusedmlp.common.TileConfig"):
        FusedMLP(SMALL, config={"block_m": 16})
    with pytest.raises(ValueError, match="dtype: expected one of"):
        FusedMLP(SMALL, dtype=torch.float64)
    module.double()  # parameters outside the contract: the front names the first one
    with pytest.raises(ValueError, match=r"params\['wv0'\]: expected dtype float32, got float64"):
        module(torch.zeros(4, 33))


def test_impl_constraint_is_not_implemented_error():
    module = FusedMLP(WIDE, impl="fused_small")  # a width over 128: fused_small cannot take it
    with pytest.raises(NotImplementedError, match="fused_small: every width must be <= 128"):
        module(_input(WIDE, 2))


def test_backward_lands_in_packed_params():
    # Training (issue 24; tests/test_backward_torch.py has the full matrix).
    module = FusedMLP(SMALL, impl="triton")
    x = _input(SMALL, 3, seed=4)
    out = module(x)  # grad mode: the training op
    assert out.requires_grad
    assert_close(to_numpy(out), _reference(module, x), SMALL)
    out.sum().backward()
    for name, p in module.packed_params().items():
        assert p.grad is not None and p.grad.shape == p.shape and p.grad.dtype == p.dtype, name
    with torch.inference_mode():
        assert_close(to_numpy(module(x)), _reference(module, x), SMALL)


# ---- GPU (`pytest -m gpu`; not run on the CPU machines) ------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["triton", "triton_tma", "fused_small", "fused_decode", "eager"])
def test_gpu_impls(impl, dtype):
    spec = SMALL.replace(dtype=dtype)
    module = FusedMLP(spec, impl=impl, device="cuda", seed=3)
    x = _input(spec, (4, 7), seed=2).cuda()
    with torch.no_grad():
        out = module(x)
    assert out.is_cuda and out.dtype == x.dtype
    assert_close(to_numpy(out), _reference(module, x), spec, what=f"gpu {impl} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_autocast_and_inductor(dtype):
    torch._dynamo.reset()
    module = FusedMLP(WIDE, device="cuda", seed=4)  # float32 parameters, impl auto
    compiled = torch.compile(module, fullgraph=True)
    x = _input(WIDE, (3, 11), seed=5).cuda()
    spec16 = WIDE.replace(dtype=str(dtype).removeprefix("torch."))
    params16 = {k: to_numpy(v.to(dtype)) for k, v in module.params().items()}
    ref = reference.forward(spec16, to_numpy(x.to(dtype)), params16)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        for fn in (module, compiled):
            out = fn(x)
            assert out.dtype == dtype
            assert_close(to_numpy(out), ref, spec16, what=f"gpu autocast {dtype}")
