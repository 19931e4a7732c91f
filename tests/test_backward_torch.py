"""Training through the torch stack (issue 24): the backward kernels (torch_impl/backward.py), the
training op and its autograd binding (custom_op.py), FusedMLP's `loss.backward()`, against the
float64 reference backward under the gradient tolerance (common/tolerance.py: `grad_bounds`, at
the rounded forward) and the baseline rule against torch autograd of the eager baseline.

Interpreted kernels are slow on the 2-core CPU machines: shapes stay tiny (M ≤ 33, widths ≤ 80)
and the case matrix is pruned so that every activation, dtype, bias/no bias, plain and gated,
2 and 3 layers appear at least once. Outputs are poisoned (conftest.py), so an element a kernel
skips is NaN and fails the NaN check.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fusedmlp.common import (
    MLPSpec,
    TileConfig,
    cost,
    init_params,
    make_grad_output,
    make_input,
    reference,
)
from fusedmlp.common.config import DEFAULT_SAVED, SAVED_POLICIES
from fusedmlp.common.packing import (
    pack_gated,
    pack_params,
    packed_width,
    unpack_gated,
    unpack_params,
)
from fusedmlp.common.tolerance import FP32_PREACT_TOL, assert_grads_close, grad_bounds
from fusedmlp.torch_impl import FusedMLP, backward, custom_op, front, launch
from fusedmlp.torch_impl.baselines import eager
from fusedmlp.torch_impl.gated import gated
from fusedmlp.torch_impl.tma import backward as tma_backward
from helpers import dynamo_as_torch_2_11, rand, to_numpy, to_torch

# (widths, activation, bias, dtype, fp32_precision, M): every activation, dtype, bias or not,
# plain and gated, 2 and 3 layers; odd sizes, none a multiple of a block.
CASES = [
    ((19, 37, 23), "relu", True, "float32", "ieee", 21),
    ((19, 37, 23), "gelu", False, "float16", "ieee", 21),
    ((19, 37, 29, 23), "gelu_tanh", True, "bfloat16", "ieee", 21),
    ((19, 37, 23), "silu", True, "bfloat16", "ieee", 33),
    ((19, 23), "relu", True, "float16", "ieee", 13),  # one layer: identity only
    ((19, 37, 23), "silu", False, "float32", "tf32", 21),
    ((19, 70, 23), "swiglu", True, "bfloat16", "ieee", 21),
    ((19, 37, 41, 23), "geglu", False, "float16", "ieee", 21),
    ((19, 37, 23), "geglu_tanh", True, "float32", "ieee", 21),
]


def _case_id(case) -> str:
    widths, act, bias, dtype, precision, m = case
    tf32 = "-tf32" if precision == "tf32" else ""
    return f"{'x'.join(map(str, widths))}-{act}-{'b' if bias else 'nob'}-{dtype}{tf32}-M{m}"


def _spec(case) -> MLPSpec:
    widths, act, bias, dtype, precision, _ = case
    return MLPSpec(widths, act, bias, dtype, precision)


def _reference(spec, x, params, dy) -> dict[str, np.ndarray]:
    plain = {k: to_numpy(v) for k, v in params.items()}
    return reference.backward(spec, to_numpy(x), plain, to_numpy(dy), round_hidden=True)


def _eager_grads(spec, x, params, dy, residual=None) -> dict[str, np.ndarray]:
    """torch autograd through the eager baseline in the same dtype: the baseline rule's baseline."""
    xs = x.detach().clone().requires_grad_()
    ps = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    y = eager(xs.reshape(-1, spec.d_in), ps, spec).reshape(*x.shape[:-1], spec.d_out)
    y.backward(dy)
    return {"x": to_numpy(xs.grad), **{k: to_numpy(v.grad) for k, v in ps.items()}}


def _module_grads(module, x, dy, residual=None) -> dict[str, np.ndarray]:
    """loss.backward() through `module` (packed params): the gradients in the contract's names."""
    for p in module.parameters():
        p.grad = None
    xs = x.detach().clone().requires_grad_()
    y = module(xs, residual)
    (y.float() * dy.float()).sum().backward()
    packed = {k: to_numpy(v.grad) for k, v in module.packed_params().items()}
    return {"x": to_numpy(xs.grad), **unpack_params(module.spec, packed)}


# ---- gradients vs the float64 reference, and the baseline rule ----------------------------------
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_module_gradients_match_reference(case):
    spec = _spec(case)
    m = case[-1]
    module = FusedMLP(spec, impl="triton", seed=3)
    x = to_torch(make_input(spec, m, seed=4))
    dy = to_torch(make_grad_output(spec, m, seed=5))
    got = _module_grads(module, x, dy)
    params = module.params()
    for name, p in module.packed_params().items():
        assert p.grad.dtype == p.dtype and p.grad.shape == p.shape, name
    assert_grads_close(
        got,
        _reference(spec, x, params, dy),
        spec,
        baselines=_eager_grads(spec, x, params, dy),
        what=str(spec),
    )


@pytest.mark.parametrize("case", [CASES[2], CASES[6]], ids=_case_id)
def test_functional_plain_params_gradients(case):
    # custom_op.mlp with the contract's (plain) params: the packed gradient comes back unpacked.
    spec = _spec(case)
    m = case[-1]
    params = {k: to_torch(v).requires_grad_() for k, v in init_params(spec, 6).items()}
    x = to_torch(make_input(spec, m, seed=7)).requires_grad_()
    dy = to_torch(make_grad_output(spec, m, seed=8))
    y = custom_op.mlp(x, params, spec, impl="triton")
    y.backward(dy)
    got = {"x": to_numpy(x.grad), **{k: to_numpy(v.grad) for k, v in params.items()}}
    assert_grads_close(got, _reference(spec, x.detach(), params, dy), spec)


def test_front_mlp_routes_training_and_baselines_use_autograd():
    spec = _spec(CASES[6])
    params = {k: to_torch(v).requires_grad_() for k, v in init_params(spec, 1).items()}
    x = to_torch(make_input(spec, 5, seed=2))
    y = front.mlp(x, params, spec, impl="triton")
    assert y.requires_grad
    dy = to_torch(make_grad_output(spec, 5, seed=3))
    y.backward(dy)
    kern = {k: to_numpy(v.grad) for k, v in params.items()}
    for v in params.values():
        v.grad = None
    front.mlp(x, params, spec, impl="eager").backward(dy)  # torch autograd of the baseline
    base = {k: to_numpy(v.grad) for k, v in params.items()}
    ref = _reference(spec, x, params, dy)
    ref.pop("x")
    assert_grads_close(kern, ref, spec, baselines=base)
    with torch.no_grad():  # no gradient to build: the inference path, the same forward
        assert torch.equal(front.mlp(x, params, spec, impl="triton"), y.detach())


def test_eager_training_skips_the_ops_dispatch_with_the_same_bits():
    # Eager grad mode runs the training op's forward and backward as one autograd.Function (no
    # torch.library dispatch: ~2 ms of host time a step on the H200); calling the registered op
    # directly, as a trace does, gives the same bits.
    spec = _spec(CASES[7])
    module = FusedMLP(spec, impl="triton", seed=12)
    x = to_torch(make_input(spec, 7, seed=13))
    dy = to_torch(make_grad_output(spec, 7, seed=14))
    xs = x.clone().requires_grad_()
    y = module(xs)
    assert type(y.grad_fn).__name__ == "_EagerTrainBackward"
    (y.float() * dy.float()).sum().backward()
    eager_grads = [xs.grad, *(p.grad for p in module.parameters())]
    params = list(module.parameters())
    for p in params:
        p.grad = None
    xo = x.clone().requires_grad_()
    spec_json = custom_op.spec_to_json(module.spec)
    y_op = custom_op.MLP_TRAIN_OP(xo, params, spec_json, "triton", None, None, DEFAULT_SAVED)[0]
    assert torch.equal(y_op, y)
    (y_op.float() * dy.float()).sum().backward()
    for got, want in zip([xo.grad, *(p.grad for p in params)], eager_grads, strict=True):
        assert torch.equal(got, want)


# ---- the Hopper backward (tma/backward.py), under the interpreter -------------------------------
HOPPER_CASES = [  # M a multiple of 8: the 16-byte rule on the M-major activations
    ((24, 72, 40), "swiglu", True, "bfloat16", "ieee", 40),
    ((16, 48, 32, 24), "gelu_tanh", True, "float32", "ieee", 24),
    ((24, 64, 16), "relu", False, "float16", "ieee", 16),
]


@pytest.mark.parametrize("case", HOPPER_CASES, ids=_case_id)
def test_hopper_backward_matches_reference(case):
    spec = _spec(case)
    m = case[-1]
    assert tma_backward.unsupported_reason(spec, m) is None
    plain = {k: to_torch(v) for k, v in init_params(spec, 30).items()}
    packed = {k: to_torch(v) for k, v in pack_params(spec, init_params(spec, 30)).items()}
    x = to_torch(make_input(spec, m, seed=31))
    dy = to_torch(make_grad_output(spec, m, seed=32))
    for saved in SAVED_POLICIES:
        _, kept = backward.forward_saving(x, packed, spec, saved=saved)
        grads = tma_backward.mlp_backward(dy, kept, packed, spec, saved=saved)
        got = {"x": to_numpy(grads.pop("x")), **unpack_params(spec, _numpy(grads))}
        want = _reference(spec, x, plain, dy)
        assert_grads_close(got, want, spec, baselines=_eager_grads(spec, x, plain, dy))
    # Through the training op's backward with the flag the forward sets on a Hopper GPU.
    spec_json = custom_op.spec_to_json(spec)
    listed = [packed[n] for n in custom_op.names_for(spec_json, True)]
    via_op = custom_op._mlp_backward_op(
        dy, x, list(kept[1:]), listed, spec_json, None, "inputs", True, "tma"
    )
    for got_t, name in zip(via_op[1:], custom_op.names_for(spec_json, True), strict=True):
        assert torch.equal(got_t, grads[name]), name


@pytest.mark.parametrize("module", ["portable", "hopper"])
def test_backward_frees_each_residual_after_its_last_use(module):
    # A residuals list is consumed (every entry None by the end), and the eager training path
    # hands its only references over: the memory of h_i and z_i goes during the backward.
    spec = _spec(HOPPER_CASES[0])
    packed = {k: to_torch(v) for k, v in pack_params(spec, init_params(spec, 33)).items()}
    x = to_torch(make_input(spec, 40, seed=34))
    dy = to_torch(make_grad_output(spec, 40, seed=35))
    _, kept = backward.forward_saving(x, packed, spec, saved="preact")
    run = tma_backward.mlp_backward if module == "hopper" else backward.mlp_backward
    as_tuple = run(dy, kept, packed, spec, saved="preact")
    residuals = list(kept)
    as_list = run(dy, residuals, packed, spec, saved="preact")
    assert all(r is None for r in residuals)
    for name in as_tuple:
        assert torch.equal(as_list[name], as_tuple[name]), name


@pytest.mark.parametrize("case", HOPPER_CASES, ids=_case_id)
def test_hopper_step_with_grouped_weight_gradients(monkeypatch, case):
    """The step with its weight gradients in one grouped launch at the end (tma/linear_act.py
    `linear_grouped`): every gradient bit for bit the step's with them apart on the same tiles,
    within the policy of the float64 reference; `mlp_backward` asks `grouped_config` for the
    products in the order it reaches them. The residuals list is still consumed."""
    spec = _spec(case)
    m = case[-1]
    tiles = TileConfig(16, 32, 16, group_m=2, num_warps=4, num_stages=2)
    step_config = tma_backward.step_config

    def pinned(kind, *args):  # the weight gradients apart on the grouped launch's tiles
        return tiles if kind == "linear_act.x_kmajor" else step_config(kind, *args)

    monkeypatch.setattr(tma_backward, "step_config", pinned)
    asked = []
    monkeypatch.setattr(
        tma_backward, "grouped_config", lambda products, k, dtype: asked.append((products, k))
    )
    plain = {k: to_torch(v) for k, v in init_params(spec, 60).items()}
    packed = {k: to_torch(v) for k, v in pack_params(spec, init_params(spec, 60)).items()}
    x = to_torch(make_input(spec, m, seed=61))
    dy = to_torch(make_grad_output(spec, m, seed=62))
    _, kept = backward.forward_saving(x, packed, spec, saved="preact")
    apart = tma_backward.mlp_backward(dy, kept, packed, spec, saved="preact")
    layers = spec.layers()[::-1]
    widths = [packed_width(la.d_out) if la.gated else la.d_out for la in layers]
    assert asked == [([(la.d_in, w) for la, w in zip(layers, widths, strict=True)], m)]
    residuals = list(kept)
    grouped = tma_backward.mlp_backward(dy, residuals, packed, spec, saved="preact", grouped=tiles)
    assert all(r is None for r in residuals)
    for name in apart:
        assert torch.equal(grouped[name], apart[name]), name
        assert grouped[name].dtype == apart[name].dtype, name
    got = {"x": to_numpy(grouped.pop("x")), **unpack_params(spec, _numpy(grouped))}
    want = _reference(spec, x, plain, dy)
    assert_grads_close(got, want, spec, baselines=_eager_grads(spec, x, plain, dy))


def test_eager_training_backward_twice_says_why():
    module = FusedMLP(_spec(CASES[6]), impl="triton", seed=36)
    x = to_torch(make_input(module.spec, 3, seed=37))
    y = module(x).sum()
    y.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="residuals are freed as the first backward reads"):
        y.backward()


@pytest.mark.parametrize("case", HOPPER_CASES, ids=_case_id)
def test_hopper_saving_forward_keeps_what_the_portable_one_keeps(case):
    # forward_saving(hopper=True): gated and identity layers on the persistent TMA kernels (the
    # gated one storing its packed pre-activation); same y and residuals, bit for bit here.
    spec = _spec(case)
    packed = {k: to_torch(v) for k, v in pack_params(spec, init_params(spec, 38)).items()}
    x = to_torch(make_input(spec, case[-1], seed=39))
    y, kept = backward.forward_saving(x, packed, spec, saved="preact")
    y_h, kept_h = backward.forward_saving(x, packed, spec, saved="preact", hopper=True)
    assert torch.equal(y_h, y)
    assert len(kept_h) == len(kept)
    for got, want in zip(kept_h, kept, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("form", ["whole", "halves", "by_columns"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_tma_dgrad_epilogue_equals_the_portable_dgrad(gated, form, dtype):
    # The TMA kernel's "dact"/"dact_gated" epilogue is backward.py's `_dact_epilogue` on its fp32
    # accumulator, on the whole tile or on its column halves (epilogue_subtile 2; gated: tiles of
    # two packed block pairs), or on the whole tile column by column (`_dact_by_columns`, the
    # warp-specialised launch's: 64×128, 4 warps; rows past M=24 masked, gated: two pairs): the
    # same bits as the portable dgrad kernel here, in every dtype.
    import dataclasses

    from fusedmlp.common.tiling import INTERPRET_CONFIG
    from fusedmlp.torch_impl.tma import linear_act as tma_linear
    from fusedmlp.torch_impl.tma.linear_act import linear_act_fwd

    widths, activation = HOPPER_CASES[0][:2] if gated else HOPPER_CASES[1][:2]
    spec = MLPSpec(widths, activation, True, dtype)
    packed = {k: to_torch(v) for k, v in pack_params(spec, init_params(spec, 40)).items()}
    x = to_torch(make_input(spec, 24, seed=41))
    _, kept = backward.forward_saving(x, packed, spec, saved="preact")
    w = packed["w1"]
    dz = to_torch(make_input(MLPSpec((w.shape[1], 8), "relu", True, spec.dtype), 24, seed=42))
    epilogue = "dact_gated" if gated else "dact"
    act = spec.layers()[0].activation
    # (the same rows a tile: numpy's fp32 matmul may round a 64-row block's sums otherwise)
    rows = dataclasses.replace(INTERPRET_CONFIG, block_m=64 if form == "by_columns" else 16)
    want = backward.dgrad_fwd(dz, w, kept[1], epilogue=epilogue, activation=act, config=rows)
    tiles = INTERPRET_CONFIG
    if form == "halves":
        tiles = dataclasses.replace(tiles, block_n=128 if gated else 32, epilogue_subtile=2)
    if form == "by_columns":
        tiles = dataclasses.replace(
            tiles, block_m=64, block_n=128 if gated else 32, num_stages=2, warp_specialize=True
        )
    got = linear_act_fwd(
        dz, w.t(), None, None, activation="identity", config=tiles,
        epilogue=epilogue, z=kept[1], dact_activation=act,
    )  # fmt: skip
    assert got.shape == want.shape and torch.equal(got, want)
    launch = tma_linear._linear_act_launch(
        dz.shape, dz.stride(), w.t().shape, w.t().stride(), dz.dtype, dz.device, False, False,
        "identity", tiles, spec.fp32_precision, epilogue, act, False, False,
    )[0]  # fmt: skip
    assert launch.meta["WARP_SPECIALIZE"] == (form == "by_columns")


def test_hopper_backward_refuses_what_tma_cannot_address():
    spec = _spec(HOPPER_CASES[0])
    why = tma_backward.unsupported_reason(spec, 21)  # rows of 21 bf16 = 42 bytes
    assert why is not None and "layer" in why and "16-byte" in why
    assert not tma_backward.applies("auto", spec, 40, "cpu")  # a CPU: backward.py's kernels


def test_hopper_backward_runs_for_auto_and_the_hopper_impls(monkeypatch):
    """On a Hopper GPU (faked here) `auto`, `triton_tma` and `mosaic` train through
    tma/backward.py; an explicit portable impl keeps backward.py's kernels (the two compared)."""
    from fusedmlp.torch_impl import front

    spec = _spec(HOPPER_CASES[0])
    monkeypatch.setattr(tma_backward, "INTERPRET", False)
    monkeypatch.setattr(front, "_is_hopper", lambda: True)
    for impl in ("auto", "triton_tma", "mosaic"):
        assert tma_backward.applies(impl, spec, 64, "cuda"), impl
    for impl in ("triton", "fused_small", "fused_decode"):
        assert not tma_backward.applies(impl, spec, 64, "cuda"), impl
    assert not tma_backward.applies("triton_tma", spec, 21, "cuda")  # 42-byte rows


def _numpy(grads):
    return {k: to_numpy(v) for k, v in grads.items()}


# ---- the saved policies ------------------------------------------------------------------------
@pytest.mark.parametrize("case", [CASES[3], CASES[7]], ids=_case_id)
def test_saved_policies_give_identical_gradients(case):
    spec = _spec(case)
    m = case[-1]
    x = to_torch(make_input(spec, m, seed=9))
    dy = to_torch(make_grad_output(spec, m, seed=10))
    grads = {}
    for saved in SAVED_POLICIES:
        module = FusedMLP(spec, impl="triton", seed=11, saved=saved)
        grads[saved] = _module_grads(module, x, dy)
    for name in grads["preact"]:
        np.testing.assert_array_equal(grads["preact"][name], grads["inputs"][name], err_msg=name)


def test_saved_bytes_and_plan():
    spec = MLPSpec((4096, 14336, 4096), "swiglu", False, "bfloat16")
    m = 8192
    assert cost.saved_bytes(spec, m, "inputs") == 2 * m * 4096
    # layer 0: x + the packed [z|g]; layer 1: h (identity: its z is not kept)
    assert cost.saved_bytes(spec, m, "preact") == 2 * m * (4096 + 2 * 14336 + 14336)
    text = front.plan(spec, (m, 4096), impl="triton", saved="preact").describe()
    assert "saved='preact' keeps 736.0 MiB" in text and "portable" in text
    assert "saved='inputs' keeps 64.0 MiB" in front.plan(spec, (m, 4096), saved="inputs").reason
    assert DEFAULT_SAVED == "preact" and FusedMLP(spec, seed=None, device="meta").saved == "preact"


def test_forward_saving_residuals_and_preact_outputs():
    # The kept tensors: per layer its input and pre-activation; the packed [z|g] of a gated layer
    # is the float64 pre-activation rounded once, padded columns exact zeros.
    spec = MLPSpec((19, 70, 23), "swiglu", True, "float32")
    params = {k: to_torch(v) for k, v in init_params(spec, 2).items()}
    packed = {k: to_torch(v) for k, v in pack_params(spec, init_params(spec, 2)).items()}
    x = to_torch(make_input(spec, 9, seed=3))
    y, kept = backward.forward_saving(x, packed, spec, saved="preact")
    assert [tuple(t.shape) for t in kept] == [(9, 19), (9, packed_width(70)), (9, 70), (9, 0)]
    assert kept[0] is x
    assert torch.equal(y, front.mlp(x, params, spec, impl="triton"))
    h1 = gated(x, packed["wv0"], packed["bc0"], n=70, activation="silu")
    assert torch.equal(kept[2], h1)  # the hidden the forward-only kernel writes, bit for bit
    zg = to_numpy(kept[1])
    ref = to_numpy(x).astype(np.float64) @ to_numpy(packed["wv0"]) + to_numpy(packed["bc0"])
    np.testing.assert_allclose(zg, ref, rtol=FP32_PREACT_TOL, atol=FP32_PREACT_TOL)
    assert (zg[:, _padded(70)] == 0).all()
    _, inputs_kept = backward.forward_saving(x, packed, spec, saved="inputs")
    assert len(inputs_kept) == 1 and inputs_kept[0] is x


# ---- shapes: 3-D input, M = 1, residual; NaN propagation -----------------------------------------
def test_3d_input_and_residual():
    spec = _spec(CASES[6])
    module = FusedMLP(spec, impl="triton", seed=12)
    x = to_torch(make_input(spec, (2, 3, 5), seed=13))
    dy = to_torch(make_grad_output(spec, (2, 3, 5), seed=14))
    residual = to_torch(make_grad_output(spec, (2, 3, 5), seed=15)).requires_grad_()
    got = _module_grads(module, x, dy, residual)
    assert torch.equal(residual.grad.float(), dy.float())  # d(y + r)/dr = dy, exactly
    assert got["x"].shape == (2, 3, 5, 19)
    assert_grads_close(got, _reference(spec, x, module.params(), dy), spec)


@pytest.mark.parametrize("case", [CASES[1], CASES[6]], ids=_case_id)
def test_single_row(case):
    spec = _spec(case)
    module = FusedMLP(spec, impl="triton", seed=16)
    x = to_torch(make_input(spec, 1, seed=17))
    dy = to_torch(make_grad_output(spec, 1, seed=18))
    got = _module_grads(module, x, dy)
    assert_grads_close(got, _reference(spec, x, module.params(), dy), spec)


@pytest.mark.parametrize("case", [CASES[0], CASES[6]], ids=_case_id)
def test_nan_propagates(case):
    # A NaN in one row of x: NaN wherever the reference has it (that row of dx, all of dW0, ...),
    # finite where the reference is (the other rows of dx); relu' of NaN is NaN.
    spec = _spec(case)
    module = FusedMLP(spec, impl="triton", seed=19)
    x = to_torch(make_input(spec, 7, seed=20))
    x[3, 5] = float("nan")
    dy = to_torch(make_grad_output(spec, 7, seed=21))
    got = _module_grads(module, x, dy)
    ref = _reference(spec, x, module.params(), dy)
    assert np.isnan(ref["x"][3]).all() and np.isfinite(np.delete(ref["x"], 3, axis=0)).all()
    assert_grads_close(got, ref, spec)


# ---- torch.compile(fullgraph=True), autocast ----------------------------------------------------
CONFIG = TileConfig(16, 16, 16, group_m=1, num_warps=4, num_stages=1)


@pytest.mark.parametrize("saved", SAVED_POLICIES)
def test_compiled_training_as_torch_2_11(saved):
    torch._dynamo.reset()
    spec = _spec(CASES[6])
    module = FusedMLP(spec, impl="triton", config=CONFIG, seed=22, saved=saved)
    x = to_torch(make_input(spec, 6, seed=23))
    dy = to_torch(make_grad_output(spec, 6, seed=24))
    eager_grads = _module_grads(module, x, dy)
    with dynamo_as_torch_2_11():
        compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
        compiled_grads = _module_grads(compiled, x, dy)
        with torch.no_grad():  # inference through the same compiled module
            assert torch.equal(compiled(x), module(x))
    for name in eager_grads:
        np.testing.assert_array_equal(compiled_grads[name], eager_grads[name], err_msg=name)


def test_compiled_functional_training():
    torch._dynamo.reset()
    spec = _spec(CASES[2])
    params = {k: to_torch(v).requires_grad_() for k, v in init_params(spec, 25).items()}
    x = to_torch(make_input(spec, 5, seed=26)).requires_grad_()
    dy = to_torch(make_grad_output(spec, 5, seed=27))
    with dynamo_as_torch_2_11(strict=False):
        fn = torch.compile(
            lambda a, p: custom_op.mlp(a, p, spec, impl="triton", saved="inputs"),
            fullgraph=True,
            backend="aot_eager",
        )
        fn(x, params).backward(dy)
    got = {"x": to_numpy(x.grad), **{k: to_numpy(v.grad) for k, v in params.items()}}
    assert_grads_close(got, _reference(spec, x.detach(), params, dy), spec)


def test_autocast_gradients_reach_float32_params():
    spec = _spec(CASES[6]).replace(dtype="float32")
    module = FusedMLP(spec, impl="triton", seed=28)
    x = to_torch(make_input(spec, 7, seed=29))
    dy = to_torch(make_grad_output(spec.replace(dtype="bfloat16"), 7, seed=30))
    xs = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(xs)
    assert y.dtype == torch.bfloat16
    y.backward(dy)
    for name, p in module.packed_params().items():
        assert p.grad.dtype == torch.float32, name
    low = spec.replace(dtype="bfloat16")
    params16 = {k: v.detach().to(torch.bfloat16) for k, v in module.params().items()}
    packed = {k: to_numpy(v.grad) for k, v in module.packed_params().items()}
    got = {"x": to_numpy(xs.grad), **unpack_params(spec, packed)}
    # The cast's gradient is exact (bf16 -> fp32): the kernels' bf16 gradients, widened.
    assert_grads_close(got, _reference(low, x.to(torch.bfloat16), params16, dy), low)


# ---- the three kernels directly -----------------------------------------------------------------
def _f64(t) -> np.ndarray:
    return to_numpy(t).astype(np.float64)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dgrad_kernel_epilogues(dtype):
    rng = np.random.default_rng(31)
    m, kc, ko = 21, 37, 70
    a, w = to_torch(rand(rng, (m, kc), dtype)), to_torch(rand(rng, (ko, kc), dtype))
    z = to_torch(rand(rng, (m, ko), dtype))
    spec = MLPSpec((2, 2), "relu", True, dtype)
    acc = _f64(a) @ _f64(w).T
    out = backward.dgrad_fwd(a, w, epilogue="none", config=CONFIG)
    assert_grads_close({"x": to_numpy(out)}, {"x": acc}, spec)
    out = backward.dgrad_fwd(a, w, z, epilogue="dact", activation="gelu", config=CONFIG)
    want = acc * reference.activation_grad("gelu", _f64(z))
    assert_grads_close({"x": to_numpy(out)}, {"x": want}, spec)
    # gated: the output is the packed [dz|dg] of the gated layer's ko output columns
    zg = to_torch(rand(rng, (m, packed_width(ko)), dtype))
    zz, gg = (_f64(t) for t in _unpack(zg, ko))
    dz = acc * gg * reference.activation_grad("silu", zz)
    dg = acc * reference.activation("silu", zz)
    # block_n 16 is read as 64 (one gate/up pair per tile); 128 holds two pairs (the GPU's tile)
    for config in (CONFIG, TileConfig(16, 128, 16, group_m=1, num_stages=1)):
        out = backward.dgrad_fwd(a, w, zg, epilogue="dact_gated", activation="silu", config=config)
        out = to_numpy(out)
        got_z, got_g = _unpack(out, ko)
        assert_grads_close({"z": got_z, "g": got_g}, {"z": dz, "g": dg}, spec, what=str(config))
        assert (out[:, _padded(ko)] == 0).all()


def _unpack(packed, n):
    return unpack_gated(
        np.asarray(to_numpy(packed) if isinstance(packed, torch.Tensor) else packed), n
    )


def _padded(n: int) -> np.ndarray:
    """The packed columns of a width-n gated layer that are padding (common/packing.py)."""
    ones = np.ones((n,))
    return np.flatnonzero(pack_gated(ones, ones) == 0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_wgrad_kernel_with_bias(dtype):
    rng = np.random.default_rng(32)
    m, k, nc = 33, 19, 45
    h, d = to_torch(rand(rng, (m, k), dtype)), to_torch(rand(rng, (m, nc), dtype))
    dw, db = backward.wgrad_fwd(h.t().contiguous().t(), d, has_bias=True, config=CONFIG)
    spec = MLPSpec((2, 2), "relu", True, dtype)
    assert dw.dtype == h.dtype and db.dtype == h.dtype
    want = {"w": _f64(h).T @ _f64(d), "b": _f64(d).sum(axis=0)}
    assert_grads_close({"w": to_numpy(dw), "b": to_numpy(db)}, want, spec)
    dw2, db2 = backward.wgrad_fwd(h, d, has_bias=False, config=CONFIG)
    assert db2 is None and torch.equal(dw2, dw)  # deterministic, strides only


# ---- the weight gradient split over M (issue 25) ------------------------------------------------
# M = 37 rows are 3 steps of 16 (a ragged tail), K = 29 and N = 45 are 2 × 3 ragged tiles of 16:
# S = 2 deals the steps 2 + 1, S = 3 one each; under the interpreter the heuristic would keep S = 1.
SPLIT_M, SPLIT_K, SPLIT_N = 37, 29, 45


@pytest.mark.parametrize(
    ("dtype", "bias", "splits"),
    [("float32", True, 3), ("float16", False, 2), ("bfloat16", True, 2), ("bfloat16", False, 3)],
)
def test_wgrad_split_against_float64(dtype, bias, splits):
    rng = np.random.default_rng(34)
    h = to_torch(rand(rng, (SPLIT_M, SPLIT_K), dtype))
    d = to_torch(rand(rng, (SPLIT_M, SPLIT_N), dtype))
    dw, db = backward.wgrad_fwd(
        h.t().contiguous().t(), d, has_bias=bias, config=CONFIG, splits=splits
    )
    spec = MLPSpec((2, 2), "relu", True, dtype)
    assert dw.dtype == h.dtype and (db is None or db.dtype == h.dtype)
    got = {"w": to_numpy(dw)} | ({"b": to_numpy(db)} if bias else {})
    want = {"w": _f64(h).T @ _f64(d)} | ({"b": _f64(d).sum(axis=0)} if bias else {})
    assert_grads_close(got, want, spec)
    # deterministic: the same bits on a second run (fresh, poisoned buffers)
    dw2, db2 = backward.wgrad_fwd(h, d, has_bias=bias, config=CONFIG, splits=splits)
    assert torch.equal(dw2, dw) and (db is None or torch.equal(db2, db))


def test_wgrad_split_propagates_nan():
    # one NaN in d (row 5, column 7): dw's column 7 and db[7] are NaN, every other element finite,
    # through the partials of the split that holds row 5 and the fixed-order sum.
    rng = np.random.default_rng(35)
    h = rand(rng, (SPLIT_M, SPLIT_K), "bfloat16")
    d = rand(rng, (SPLIT_M, SPLIT_N), "bfloat16")
    d[5, 7] = np.nan
    dw, db = backward.wgrad_fwd(to_torch(h), to_torch(d), has_bias=True, config=CONFIG, splits=3)
    want = {"w": _f64(h).T @ _f64(d), "b": _f64(d).sum(axis=0)}
    got = {"w": to_numpy(dw), "b": to_numpy(db)}
    assert_grads_close(got, want, MLPSpec((2, 2), "relu", True, "bfloat16"))
    assert np.isnan(got["w"][:, 7]).all() and np.isnan(got["b"][7])
    assert np.isfinite(np.delete(got["w"], 7, axis=1)).all()
    assert np.isfinite(np.delete(got["b"], 7)).all()


def test_wgrad_splits_choice():
    from fusedmlp.common.tiling import wgrad_splits

    # the cases common/tiling.py explains (H200, 132 SMs, the bf16 heuristic's tiles)
    assert wgrad_splits(1, 65536, 128) == (128, 4)  # image fit, 64×64: one tile
    assert wgrad_splits(288, 8192, 64) == (1, 128)  # hf-blog's packed 768×6144
    assert wgrad_splits(72, 8192, 64) == (3, 43)  # hf-blog's 3072×768
    assert wgrad_splits(1792, 8192, 64) == (1, 128)  # llama3-8b
    assert wgrad_splits(6, 37, 16) == (1, 3)  # interpreter sizes: S = 1 unless forced
    for tiles in (1, 5, 72, 100, 500):
        for m, splits in ((1, None), (33, None), (65536, None), (37, 2), (37, 3), (37, 7)):
            n, per = wgrad_splits(tiles, m, 16, splits=splits)
            steps = max(1, -(-m // 16))
            assert n * per >= steps > (n - 1) * per, (tiles, m, splits)  # no empty split
            assert n <= steps and (splits is None or n <= splits)


def test_split_training_step(monkeypatch, request):
    # The whole backward with the split chosen by the heuristic: one step per split at most, so
    # every weight gradient of this MLP (M = 33: 3 steps; 6 tiles each) runs S = 3.
    from fusedmlp.common import tiling

    chosen: list[int] = []

    def spy(*args, **kwargs):
        out = tiling.wgrad_splits(*args, **kwargs)
        chosen.append(out[0])
        return out

    monkeypatch.setattr(tiling, "WGRAD_MIN_STEPS", 1)
    monkeypatch.setattr(backward, "wgrad_splits", spy)
    # launch records are built from WGRAD_MIN_STEPS: none from before, none kept after
    launch.clear_all()
    request.addfinalizer(launch.clear_all)
    spec = _spec(CASES[3])  # silu, bias, bf16, M = 33
    module = FusedMLP(spec, impl="triton", config=CONFIG, seed=46)
    x = to_torch(make_input(spec, 33, seed=47))
    dy = to_torch(make_grad_output(spec, 33, seed=48))
    got = _module_grads(module, x, dy)
    assert chosen == [3, 3], chosen
    assert_grads_close(got, _reference(spec, x, module.params(), dy), spec)


_COMPILE_WGRAD = r"""
import json, os, re, subprocess, sys, tempfile
os.environ["TRITON_INTERPRET"] = "0"  # real Triton functions: compile for sm_90, launch nothing
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fusedmlp.common import tiling
from fusedmlp.torch_impl import backward as bw

PTXAS = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "ptxas")

def compile_one(fn, types, const, warps, stages):
    sig, attrs = {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr or p.name in const:
            sig[p.name] = "constexpr"
        else:
            sig[p.name] = types.get(p.name, "i32")
            attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn, sig, constexprs=const, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(k.asm["ptx"])
        log = subprocess.run([PTXAS, "-arch=sm_90a", "-v", path, "-o", path + ".o"],
                             capture_output=True, text=True)
    info = log.stdout + log.stderr
    return dict(shared=k.metadata.shared, ok=not log.returncode,
                spills=[int(v) for v in re.findall(r"(\d+) bytes spill stores", info)],
                wgmma="wgmma.mma_async" in k.asm["ptx"])

out = []
for K, N, M in json.loads(sys.argv[1]):
    cfg = tiling.heuristic_config("linear_act", K, N, M, "bfloat16")
    tiles = triton.cdiv(K, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    S, _ = tiling.wgrad_splits(tiles, M, cfg.block_k)
    for bias in (True, False):
        wt = "*fp32" if S > 1 else "*bf16"
        types = dict(a_ptr="*bf16", d_ptr="*bf16", dw_ptr=wt, db_ptr=wt)
        row = compile_one(bw._wgrad_kernel, types,
                          dict(HAS_DBIAS=bias, INPUT_PRECISION="ieee", INTERPRET=False,
                               BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                               GROUP_M=cfg.group_m, stride_ak=1, stride_dn=1, stride_wn=1),
                          cfg.num_warps, cfg.num_stages)
        out.append(dict(K=K, N=N, S=S, kernel="wgrad", block_m=cfg.block_m, bias=bias, **row))
        if S > 1:
            row = compile_one(bw._wgrad_sum_kernel,
                              dict(ws_ptr="*fp32", wsb_ptr="*fp32", dw_ptr="*bf16", db_ptr="*bf16"),
                              dict(HAS_DBIAS=bias, INTERPRET=False, BLOCK=tiling.WGRAD_SUM_BLOCK,
                                   UNROLL=min(tiling.WGRAD_SUM_UNROLL, S)),
                              tiling.WGRAD_SUM_WARPS, 1)
            out.append(dict(K=K, N=N, S=S, kernel="sum", block_m=0, bias=bias, **row))
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_wgrad_compiles_for_sm90_without_spills():
    """The heuristic's bf16 configs and splits for the image fit's 64×64 and 32×64 gradients (M =
    65,536: S = 128) and hf-blog's 3072×768 (M = 8192: S = 3), both kernels, bias and none:
    within 227 KiB of shared memory, no spills (ptxas -v), wgmma where the tile has 64 rows."""
    from helpers import run_script

    cases = [(64, 64, 65536), (32, 64, 65536), (3072, 768, 8192)]
    got = run_script(_COMPILE_WGRAD, json.dumps(cases), timeout=600)
    assert [row["S"] for row in got if row["kernel"] == "wgrad"] == [128, 128, 128, 128, 3, 3]
    for row in got:
        assert row["ok"] and row["spills"] == [0], row
        assert row["shared"] <= 227 * 1024, row
        assert row["wgmma"] == (row["block_m"] >= 64), row


def test_dact_kernel_plain_and_gated():
    rng = np.random.default_rng(33)
    m, n = 13, 70
    spec = MLPSpec((2, 2), "relu", True, "bfloat16")
    dy, z = to_torch(rand(rng, (m, n), "bfloat16")), to_torch(rand(rng, (m, n), "bfloat16"))
    out = backward.dact_fwd(dy, z, activation="gelu_tanh", gated=False, config=CONFIG)
    want = _f64(dy) * reference.activation_grad("gelu_tanh", _f64(z))
    assert_grads_close({"z": to_numpy(out)}, {"z": want}, spec)
    zg = to_torch(rand(rng, (m, packed_width(n)), "bfloat16"))
    zg[:, _padded(n)] = float("nan")  # padded columns: written as exact zeros whatever was saved
    out = to_numpy(backward.dact_fwd(dy, zg, activation="relu", gated=True, config=CONFIG))
    zz, gg = (_f64(t) for t in _unpack(zg, n))
    got_z, got_g = _unpack(out, n)
    want = {"z": _f64(dy) * gg * reference.activation_grad("relu", zz)}
    want["g"] = _f64(dy) * reference.activation("relu", zz)
    assert_grads_close({"z": got_z, "g": got_g}, want, spec)
    assert (out[:, _padded(n)] == 0).all()


# ---- the tolerance and bad input ----------------------------------------------------------------
def test_grad_bounds_are_twice_the_forward():
    from fusedmlp.common.tolerance import bounds

    for dtype in ("float32", "float16", "bfloat16"):
        spec = MLPSpec((2, 2), "relu", True, dtype)
        assert grad_bounds(spec).rel_fro == 2 * bounds(spec).rel_fro


def test_bad_saved_policy():
    spec = _spec(CASES[6])
    message = "saved: expected one of ('preact', 'inputs'), got 'foo'"
    with pytest.raises(ValueError) as err:
        FusedMLP(spec, seed=None, device="meta", saved="foo")
    assert str(err.value) == message
    params = {k: to_torch(v) for k, v in init_params(spec, 0).items()}
    x = to_torch(make_input(spec, 2))
    for call in (front.mlp, custom_op.mlp):
        with pytest.raises(ValueError) as err:
            call(x, params, spec, impl="triton", saved="foo")
        assert str(err.value) == message


def test_baseline_module_trains_repeatedly():
    # FusedMLP(impl="eager") holds packed params; the baseline reads them unpacked: in training the
    # unpacking is part of the graph, each call (a cached copy would hold a freed graph).
    spec = _spec(CASES[6])
    module = FusedMLP(spec, impl="eager", seed=40)
    x = to_torch(make_input(spec, 5, seed=41))
    dy = to_torch(make_grad_output(spec, 5, seed=42))
    first = _module_grads(module, x, dy)
    second = _module_grads(module, x, dy)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    ref = _reference(spec, x, module.params(), dy)
    assert_grads_close(first, ref, spec)


def test_wide_pinned_tiles():
    # A tile of two gate/up pairs (block_n 128, as the GPU heuristic's) through the whole training
    # step: the saving forward, the packed dgrad epilogue, the wgrad over the packed width.
    spec = MLPSpec((19, 150, 23), "geglu", True, "bfloat16")
    config = TileConfig(32, 128, 32, group_m=2, num_warps=4, num_stages=1)
    module = FusedMLP(spec, impl="triton", config=config, seed=43)
    x = to_torch(make_input(spec, 29, seed=44))
    dy = to_torch(make_grad_output(spec, 29, seed=45))
    got = _module_grads(module, x, dy)
    assert_grads_close(got, _reference(spec, x, module.params(), dy), spec)


def test_params_only_skips_dx():
    # x without requires_grad: the first layer's dgrad is skipped; the param gradients are the same
    spec = _spec(CASES[7])
    module = FusedMLP(spec, impl="triton", seed=46)
    x = to_torch(make_input(spec, 9, seed=47))
    dy = to_torch(make_grad_output(spec, 9, seed=48))
    with_x = _module_grads(module, x, dy)
    for p in module.parameters():
        p.grad = None
    module(x).backward(dy)
    assert not x.requires_grad and x.grad is None
    packed = {k: to_numpy(v.grad) for k, v in module.packed_params().items()}
    got = unpack_params(spec, packed)
    for name in got:
        np.testing.assert_array_equal(got[name], with_x[name], err_msg=name)


# ---- GPU (`pytest -m gpu`; skipped on the CPU machines) -----------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize(
    "widths,activation", [((512, 1000, 384), "swiglu"), ((384, 1000, 300, 256), "gelu")]
)
def test_gpu_training_heuristic_tiles(widths, activation, dtype):
    # The GPU heuristic's tiles (16-bit: 128x256, gated 128x128 over 256 packed columns, the
    # 128-column dact cap) on odd sizes, vs the float64 reference on the host and eager autograd.
    spec = MLPSpec(widths, activation, True, dtype)
    module = FusedMLP(spec, impl="triton", device="cuda", seed=49)
    x = to_torch(make_input(spec, 1001, seed=50))
    dy = to_torch(make_grad_output(spec, 1001, seed=51))
    got = _module_grads(module, x.cuda(), dy.cuda())
    params = {k: v.detach().cpu() for k, v in module.params().items()}
    base = _eager_grads(spec, x.cuda(), {k: v.cuda() for k, v in params.items()}, dy.cuda())
    assert_grads_close(got, _reference(spec, x, params, dy), spec, baselines=base, what=str(spec))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "widths,activation", [((512, 1000, 384), "swiglu"), ((384, 1000, 296, 256), "gelu")]
)
def test_gpu_hopper_backward(widths, activation, dtype):
    # `auto` on the H200 trains through tma/backward.py (the persistent TMA GEMMs): its gradients
    # against the float64 reference and eager autograd, at the GPU heuristic's tiles; M = 1000 is
    # a multiple of 8 (the 16-byte rule on the M-major activations), the widths are not of a tile.
    spec = MLPSpec(widths, activation, True, dtype)
    module = FusedMLP(spec, device="cuda", seed=52)
    x = to_torch(make_input(spec, 1000, seed=53))
    dy = to_torch(make_grad_output(spec, 1000, seed=54))
    xs = x.cuda().requires_grad_()
    assert module(xs).grad_fn._forward_cls.__name__ == "_EagerTrain"
    assert (
        "tma/backward.py"
        in front.plan(spec, (1000, widths[0]), device="cuda", saved="preact").reason
    )
    got = _module_grads(module, x.cuda(), dy.cuda())
    params = {k: v.detach().cpu() for k, v in module.params().items()}
    base = _eager_grads(spec, x.cuda(), {k: v.cuda() for k, v in params.items()}, dy.cuda())
    assert_grads_close(got, _reference(spec, x, params, dy), spec, baselines=base, what=str(spec))


@pytest.mark.gpu
@pytest.mark.parametrize("gated", [False, True], ids=["dact", "dact_gated"])
def test_gpu_tma_act_step_in_every_form(gated):
    # The Hopper act' step (tma/linear_act.py) in each form the sweep may table — whole on a plain
    # tile loop, in column halves two programs an SM, whole and warp-specialised column by column
    # (`_dact_by_columns`, 128×128 and 128×64) — against the float64 act' step at an odd N (gated:
    # padded packed columns, NaN-poisoned in the saved z, stored as zeros), M = 1000.
    import dataclasses

    from fusedmlp.common.tiling import INTERPRET_CONFIG
    from fusedmlp.torch_impl.tma import linear_act as tma_linear
    from fusedmlp.torch_impl.tma.linear_act import linear_act_fwd

    rng = np.random.default_rng(55)
    m, n, nc = 1000, 1000, 768
    spec = MLPSpec((2, 2), "relu", True, "bfloat16")
    dz = to_torch(rand(rng, (m, nc), "bfloat16")).cuda()
    w = (to_torch(rand(rng, (n, nc), "bfloat16")) * nc**-0.5).to(torch.bfloat16).cuda()
    z = to_torch(rand(rng, (m, packed_width(n) if gated else n), "bfloat16"))
    if gated:
        z[:, _padded(n)] = float("nan")
    z = z.cuda()
    dh = _f64(dz.cpu()) @ _f64(w.cpu()).T
    if gated:
        zz, gg = (_f64(t) for t in _unpack(z.cpu(), n))
        want = {"z": dh * gg * reference.activation_grad("gelu_tanh", zz)}
        want["g"] = dh * reference.activation("gelu_tanh", zz)
    else:
        want = {"z": dh * reference.activation_grad("gelu_tanh", _f64(z.cpu()))}
    base = dataclasses.replace(INTERPRET_CONFIG, block_k=64, group_m=8)
    forms = {
        "whole": dataclasses.replace(base, block_m=128, block_n=128, num_warps=8, num_stages=4),
        "halves": dataclasses.replace(
            base, block_m=64, block_n=128, num_stages=4, epilogue_subtile=2, programs_per_sm=2
        ),
        "ws 128x128": dataclasses.replace(
            base, block_m=128, block_n=128, num_stages=4, warp_specialize=True
        ),
        "ws 128x64": dataclasses.replace(
            base, block_m=128, block_n=64, num_stages=4, warp_specialize=True
        ),
    }
    epilogue = "dact_gated" if gated else "dact"
    for form, tiles in forms.items():
        out = linear_act_fwd(
            dz, w.t(), None, None, activation="identity", config=tiles,
            epilogue=epilogue, z=z, dact_activation="gelu_tanh",
        ).cpu()  # fmt: skip
        launch = tma_linear._linear_act_launch(
            dz.shape, dz.stride(), w.t().shape, w.t().stride(), dz.dtype, dz.device, False,
            False, "identity", tiles, "ieee", epilogue, "gelu_tanh", False, False,
        )[0]  # fmt: skip
        assert launch.meta["WARP_SPECIALIZE"] == form.startswith("ws"), form
        if gated:
            got_z, got_g = _unpack(to_numpy(out), n)
            assert_grads_close({"z": got_z, "g": got_g}, want, spec, what=form)
            assert (to_numpy(out)[:, _padded(n)] == 0).all(), form
        else:
            assert_grads_close({"z": to_numpy(out)}, want, spec, what=form)
