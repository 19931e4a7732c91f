"""torch.ops.fusedmlp.mlp: the registered op agrees with the front bit for bit, passes opcheck
(schema, fake tensors, AOT dispatch with dynamic shapes), compiles with fullgraph=True, validates
like the front, and differentiates (the training op; tests/test_backward_torch.py for the rest)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusedmlp.common import MLPSpec, init_params, make_input, param_shapes, reference
from fusedmlp.common.tolerance import assert_close, assert_grads_close
from fusedmlp.torch_impl import FusedMLP, custom_op, front
from helpers import to_numpy, to_torch

# widths <= 128 and 2 layers: every kernel impl can take it (fused_small, fused_decode at M <= 64).
SPEC = MLPSpec((33, 67, 21), "swiglu", True, "float32")
KERNEL_IMPLS = ("triton", "triton_tma", "fused_small", "fused_decode")


def _inputs(spec, lead, seed=1):
    x = to_torch(make_input(spec, lead, seed=seed))
    params = {k: to_torch(v) for k, v in init_params(spec, seed=seed + 10).items()}
    return x, params


def _reference(spec, x, params, residual=None):
    y = reference.forward(spec, to_numpy(x), {k: to_numpy(v) for k, v in params.items()})
    return y + to_numpy(residual) if residual is not None else y


@pytest.mark.parametrize("impl", [*KERNEL_IMPLS, "eager"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_op_matches_front_and_reference(impl, dtype):
    spec = SPEC.replace(dtype=dtype)
    x, params = _inputs(spec, (2, 3), seed=len(impl) + len(dtype))
    out = custom_op.mlp(x, params, spec, impl=impl)
    assert torch.equal(out, front.mlp(x, params, spec, impl=impl))
    assert out.shape == (2, 3, spec.d_out) and out.dtype == x.dtype
    assert_close(to_numpy(out), _reference(spec, x, params), spec, what=f"{impl} {dtype}")


@pytest.mark.parametrize("impl", ["triton", "fused_small"])
def test_op_residual(impl):
    spec = SPEC.replace(activation="gelu", bias=False)
    x, params = _inputs(spec, 5, seed=3)
    residual = to_torch(make_input(spec.replace(widths=(21, 21)), 5, seed=4))
    out = custom_op.mlp(x, params, spec, impl=impl, residual=residual)
    assert_close(to_numpy(out), _reference(spec, x, params, residual), spec, what=impl)


def test_opcheck():
    # Schema, fake-tensor and AOT-dispatch checks (static and dynamic shapes) on the real op; the
    # inputs require no grad (the backward raises by design, tested below).
    x, params = _inputs(SPEC, 4)
    residual = torch.randn(4, SPEC.d_out)
    for args in (
        (x, list(params.values()), custom_op.spec_to_json(SPEC), "triton", None, None),
        (x, list(params.values()), custom_op.spec_to_json(SPEC), "eager", None, residual),
    ):
        torch.library.opcheck(torch.ops.fusedmlp.mlp.default, args)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_functional(backend):
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda x, p: custom_op.mlp(x, p, SPEC, impl="triton"),
        fullgraph=True,
        backend=backend,
        dynamic=True,
    )
    for m in (3, 11):
        x, params = _inputs(SPEC, m, seed=m)
        out = compiled(x, params)
        assert torch.equal(out, front.mlp(x, params, SPEC, impl="triton"))
        assert_close(to_numpy(out), _reference(SPEC, x, params), SPEC, what=f"{backend} M={m}")


def test_config_travels_as_json():
    from fusedmlp.common import TileConfig

    config = TileConfig(16, 16, 16, group_m=1, num_warps=4, num_stages=1)
    x, params = _inputs(SPEC, 7, seed=5)
    out = custom_op.mlp(x, params, SPEC, impl="triton", config=config)
    assert custom_op.parse_config(custom_op.config_to_json(config)) == config
    assert torch.equal(out, front.mlp(x, params, SPEC, impl="triton", config=config))
    assert_close(to_numpy(out), _reference(SPEC, x, params), SPEC)


def test_empty_batch():
    x, params = _inputs(SPEC, 0)
    out = custom_op.mlp(x, params, SPEC, impl="triton")
    assert out.shape == (0, SPEC.d_out) and out.dtype == torch.float32
    assert_close(to_numpy(out), _reference(SPEC, x, params), SPEC)


def test_errors_name_the_argument():
    x, params = _inputs(SPEC, 3)
    with pytest.raises(ValueError, match=r"params: missing \['b1'\]"):
        custom_op.mlp(x, {k: v for k, v in params.items() if k != "b1"}, SPEC)
    with pytest.raises(ValueError, match=r"params: unexpected \['w7'\]"):
        custom_op.mlp(x, {**params, "w7": params["w0"]}, SPEC)
    with pytest.raises(ValueError, match=r"x: expected shape \[\.\.\., 33\], got \[3, 32\]"):
        custom_op.mlp(x[:, :-1], params, SPEC)
    with pytest.raises(ValueError, match=r"x: expected dtype float32 .*got bfloat16"):
        custom_op.mlp(x.bfloat16(), params, SPEC)
    with pytest.raises(TypeError, match=r"spec: expected a fusedmlp.common.MLPSpec, got dict"):
        custom_op.mlp(x, params, SPEC.to_dict())
    with pytest.raises(ValueError, match="impl: expected one of"):
        custom_op.mlp(x, params, SPEC, impl="cuda")
    names = list(param_shapes(SPEC))
    with pytest.raises(ValueError, match=f"params: expected {len(names)} tensors in the order"):
        torch.ops.fusedmlp.mlp(x, list(params.values())[:-1], SPEC.to_json(), "eager", None, None)


def test_compiled_call_validates_at_trace_time():
    # The fake implementation runs the front's checks: the compiled call names the argument too.
    torch._dynamo.reset()
    x, params = _inputs(SPEC, 3)
    compiled = torch.compile(
        lambda x, p: custom_op.mlp(x, p, SPEC, impl="eager"), fullgraph=True, backend="aot_eager"
    )
    with pytest.raises(Exception, match=r"params\['w1'\]: expected shape \[67, 21\], got"):
        compiled(x, {**params, "w1": params["w1"][:, :-1]})


@pytest.mark.parametrize("backend", [None, "aot_eager"])
def test_backward_through_both_ops(backend):
    # Training (issue 24; tests/test_backward_torch.py has the full matrix): custom_op.mlp in grad
    # mode calls the training op; the inference op called directly differentiates too, as the
    # saved="inputs" policy. Same kernels, so the same gradients bit for bit, eager or compiled.
    torch._dynamo.reset()
    x, params = _inputs(SPEC, 3)
    spec_json = custom_op.spec_to_json(SPEC)

    def training(a, p):
        return custom_op.mlp(a, p, SPEC, impl="triton", saved="inputs")

    def inference_op(a, p):
        return custom_op.MLP_OP(
            a, [p[n] for n in param_shapes(SPEC)], spec_json, "triton", None, None
        )

    grads = []
    for fn in (training, inference_op):
        if backend is not None:
            fn = torch.compile(fn, fullgraph=True, backend=backend)
        xs = x.clone().requires_grad_()
        ps = {k: v.clone().requires_grad_() for k, v in params.items()}
        out = fn(xs, ps)
        assert_close(to_numpy(out), _reference(SPEC, x, params), SPEC)
        out.sum().backward()
        grads.append([xs.grad, *(ps[n].grad for n in param_shapes(SPEC))])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)
    dy = np.ones((3, SPEC.d_out))
    ref = reference.backward(SPEC, to_numpy(x), {k: to_numpy(v) for k, v in params.items()}, dy)
    got = dict(zip(["x", *param_shapes(SPEC)], map(to_numpy, grads[0]), strict=True))
    assert_grads_close(got, ref, SPEC)


def test_torch_export_keeps_one_op():
    module = FusedMLP(SPEC, impl="triton", seed=2)
    x, _ = _inputs(SPEC, 3, seed=8)
    batch = torch.export.Dim("batch")
    exported = torch.export.export(module, (x,), dynamic_shapes={"x": {0: batch}})
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.fusedmlp.mlp.default]
    x5, _ = _inputs(SPEC, 5, seed=9)
    with torch.no_grad():
        out = exported.module()(x5)
    assert torch.equal(out, module(x5))
    assert_close(to_numpy(out), _reference(SPEC, x5, module.params()), SPEC)
