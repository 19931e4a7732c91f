"""torch's training step through the Mosaic GPU kernels (torch_impl/cross/backward.py), on a CPU.

No interpreter runs as_torch_kernel, so the CPU proves what can be proven without a GPU:
- the route: which calls train here (front.hopper_route; custom_op asks the same function);
- the step launches exactly the kernels of JAX's Hopper step (jax_impl/mosaic/backward.py), in
  the same order, with the same operands' shapes, tiles and flags — recorded from both steps run
  on shapes only — so the GPU's bits are the JAX step's, which tests/test_mosaic_backward.py
  checks against the float64 reference under the Mosaic GPU interpreter;
- every function handed to as_torch_kernel lowers for CUDA to the one bare Mosaic GPU call that
  as_torch_kernel accepts (its own module check).
`pytest -m gpu` runs the step (`test_gpu_step_gives_the_jax_steps_bits`, below): gradients against
the float64 reference, and bit for bit against the JAX step's.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fusedmlp.common import MLPSpec, TileConfig, init_params, make_input
from fusedmlp.common.params import make_grad_output
from fusedmlp.common.tolerance import assert_grads_close
from fusedmlp.jax_impl.mosaic import backward as jax_step
from fusedmlp.jax_impl.mosaic import gated as gated_mod
from fusedmlp.jax_impl.mosaic import linear_act as linear_mod
from fusedmlp.jax_impl.packing import pack_params
from fusedmlp.torch_impl import front
from fusedmlp.torch_impl.cross import backward as cross
from helpers import direct_launch_plan, mosaic_gpu_call, to_numpy, to_torch

# (spec, M): Mosaic GPU's constraints met (M a multiple of 16, every width of 16)
CASES = [
    (MLPSpec((48, 80, 32), "swiglu", True, "bfloat16"), 32),  # the packed [z|g]: "dact_gated"
    (MLPSpec((64, 96, 80, 48), "gelu_tanh", True, "float16"), 48),  # stored z: "dact", 3 layers
    (MLPSpec((64, 96, 64), "relu", False, "bfloat16"), 64),  # relu' read off the output h
]
GROUPED = TileConfig(
    128, 128, 16, group_m=2, num_warps=4, num_stages=2, warp_specialize=True, epilogue_subtile=1
)


def _case_id(case: tuple[MLPSpec, int]) -> str:
    spec, m = case
    return f"{spec.activation}-{len(spec.widths)}-{spec.dtype}-m{m}"


@pytest.fixture
def on_hopper(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """This CPU as a Hopper GPU with a jax new enough for as_torch_kernel, to the route's rule."""
    from fusedmlp.torch_impl import runtime
    from fusedmlp.torch_impl.tma import backward as tma_backward

    monkeypatch.setattr(front, "_is_hopper", lambda: True)
    monkeypatch.setattr(runtime, "INTERPRET", False)
    monkeypatch.setattr(tma_backward, "INTERPRET", False)
    monkeypatch.setattr(cross, "as_torch_kernel", lambda: None)
    monkeypatch.setattr(cross, "unavailable_reason", lambda: None)  # jax runs on "the GPU"
    cross.clear_caches()  # the tests below change the JAX step's tile rules
    yield monkeypatch
    cross.clear_caches()


# ==== the route ===================================================================================
def test_route_takes_the_mosaic_step_where_it_applies(on_hopper: pytest.MonkeyPatch) -> None:
    """`mosaic` asked, or `auto` whose forward runs a Hopper GEMM kernel (mosaic, triton_tma),
    trains on the Mosaic GPU GEMMs, also while a CUDA graph is prepared (the launches record:
    cross/launcher.py); triton_tma asked, and
    `auto` planning anything else, on the Triton ones; a pinned config on the portable kernels;
    an M Mosaic GPU cannot take (not a multiple of 16, or 0), or no usable jax, falls back to the
    Triton step; off the GPU nothing here runs."""
    spec, m = CASES[0]
    route = front.hopper_route
    assert route("mosaic", "mosaic", spec, m, "cuda", None) == "mosaic"
    assert route("auto", "mosaic", spec, m, "cuda", None) == "mosaic"
    assert route("auto", "triton_tma", spec, m, "cuda", None) == "mosaic"  # trained faster
    assert route("auto", "triton", spec, m, "cuda", None) == "tma"
    with front.graph_safe():  # a CUDA graph records the direct launch
        assert route("auto", "triton_tma", spec, m, "cuda", None) == "mosaic"
        assert route("mosaic", "mosaic", spec, m, "cuda", None) == "mosaic"
    assert route("triton_tma", "triton_tma", spec, m, "cuda", None) == "tma"
    assert route("mosaic", "mosaic", spec, m, "cuda", GROUPED) == ""
    assert route("mosaic", "mosaic", spec, 40, "cuda", None) == "tma"  # 40: Mosaic's rows
    assert route("mosaic", "mosaic", spec, m, "cpu", None) == ""
    assert route("mosaic", "mosaic", spec, 0, "cuda", None) == "tma"  # no kernel to call
    assert not cross.applies("triton", "triton", spec, m, "cuda")

    assert route("mosaic", "mosaic", spec.replace(dtype="float32"), m, "cuda", None) == "tma"
    on_hopper.setattr(cross, "unavailable_reason", lambda: "jax 0.10.2 is too old")
    assert route("mosaic", "mosaic", spec, m, "cuda", None) == "tma"
    assert route("auto", "triton_tma", spec, m, "cuda", None) == "tma"


def test_jax_is_asked_once_a_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether jax can run the Mosaic GPU kernels from torch is asked once: a failure (jax
    missing, too old, or without a GPU backend) is cached as a reason, not retried per step; and
    a call the route refuses anyway (float32, an M that is not a multiple of 16) does not ask."""
    from fusedmlp.torch_impl import runtime
    from fusedmlp.torch_impl.cross import linear_act as cross_linear

    tries: list[int] = []

    def too_old() -> None:
        tries.append(1)
        raise ImportError("jax 0.10.2 is too old for as_torch_kernel")

    monkeypatch.setattr(cross_linear, "as_torch_kernel", too_old)
    cross_linear.unavailable_reason.cache_clear()
    try:
        for _ in range(3):
            assert "too old" in cross_linear.unavailable_reason()
        assert tries == [1]
    finally:
        cross_linear.unavailable_reason.cache_clear()

    asked: list[int] = []
    monkeypatch.setattr(front, "_is_hopper", lambda: True)
    monkeypatch.setattr(runtime, "INTERPRET", False)
    monkeypatch.setattr(cross, "unavailable_reason", lambda: asked.append(1))
    spec, m = CASES[0]
    assert not cross.applies("mosaic", "mosaic", spec.replace(dtype="float32"), m, "cuda")
    assert not cross.applies("mosaic", "mosaic", spec, m + 8, "cuda")
    assert asked == []


def test_training_plan_names_the_route(on_hopper: pytest.MonkeyPatch) -> None:
    spec, m = CASES[0]
    from fusedmlp import torch_impl

    note = torch_impl.plan(spec, (m, spec.d_in), impl="mosaic", device="cuda", saved="preact")
    assert "torch_impl/cross/backward.py" in note.reason, note.reason
    note = torch_impl.plan(spec, (m, spec.d_in), impl="triton_tma", device="cuda", saved="preact")
    assert "torch_impl/tma/backward.py" in note.reason, note.reason


def test_operands_reach_the_kernel_dense_and_aligned(monkeypatch: pytest.MonkeyPatch) -> None:
    """as_torch_kernel reads data_ptr() as a dense row-major buffer, and TMA needs a 16-byte
    aligned base (the Mosaic GPU runtime aborts the process otherwise): a transposed view and a
    view 2 bytes into its storage are copied, an aligned dense tensor is passed as it is."""
    seen: list[torch.Tensor] = []
    monkeypatch.setattr(cross, "compiled_kernel", lambda key, make, operands: None)
    monkeypatch.setattr(cross, "_launch", lambda kernel, operands, device: seen.extend(operands))
    storage = torch.arange(1 + 32 * 48, dtype=torch.float32).to(torch.bfloat16)
    shifted = storage[1:].view(32, 48)
    assert shifted.data_ptr() % 16 != 0  # really misaligned: 2 bytes in
    transposed = torch.ones(80, 48, dtype=torch.bfloat16).t()
    aligned = torch.ones(48, 80, dtype=torch.bfloat16)
    cross._call(("test",), None, [shifted, transposed, aligned])
    assert all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in seen)
    assert torch.equal(seen[0], shifted) and torch.equal(seen[1], transposed)
    assert seen[2] is aligned


# ==== the same kernels as JAX's step ==============================================================
KERNELS = {
    "linear_act_fwd": (linear_mod, "linear_act_fwd"),
    "linear_grouped": (linear_mod, "linear_grouped"),
    "gated_fwd": (gated_mod, "gated_fwd"),
}


def _signature(value: Any) -> Any:
    """An argument as the kernel sees it: arrays by shape and dtype, sequences item by item."""
    if isinstance(value, (list, tuple)):
        return tuple(_signature(v) for v in value)
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return (tuple(value.shape), str(jnp.dtype(value.dtype)))
    return value


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Every Mosaic GPU launcher call in order: (name, every argument by name with the defaults
    filled in, but `interpret` and `overwrite_z`; overwrite_z apart: torch never writes over z)."""
    calls: list[tuple] = []
    for name, (module, attr) in KERNELS.items():
        real = getattr(module, attr)

        def recording(*args: Any, _real=real, _name=name, **kw: Any) -> Any:
            bound = inspect.signature(_real).bind(*args, **kw)
            bound.apply_defaults()
            named = dict(bound.arguments)
            overwrite = named.pop("overwrite_z", False)
            named.pop("interpret")
            calls.append((_name, _signature(tuple(named.items())), overwrite))
            return _real(*args, **kw)

        monkeypatch.setattr(module, attr, recording)
    return calls


def _on_shapes(made: list) -> Any:
    """A stand-in for `cross._call`: the traced function evaluated on shapes (no kernel runs),
    its results as torch tensors of those shapes; each (key, function, operands) kept in `made`."""

    def call(key: tuple, make: Any, operands: list[torch.Tensor]) -> Any:
        fn = make()
        structs = [
            jax.ShapeDtypeStruct(tuple(t.shape), str(t.dtype).removeprefix("torch."))
            for t in operands
        ]
        made.append((key, fn, structs))
        out = jax.eval_shape(lambda *a: fn(*a), *structs)  # a fresh trace: every call recorded
        as_torch = lambda s: torch.empty(s.shape, dtype=getattr(torch, jnp.dtype(s.dtype).name))  # noqa: E731
        return tuple(map(as_torch, out)) if isinstance(out, (tuple, list)) else as_torch(out)

    return call


def _steps(spec: MLPSpec, m: int, saved: str, monkeypatch: pytest.MonkeyPatch, recorded: list):
    """Both steps on shapes: (JAX step's calls, torch step's calls, torch's traced functions)."""
    params = pack_params(spec, init_params(spec, 0))
    x = make_input(spec, m, seed=1)
    dy = make_grad_output(spec, m, seed=2)
    dt = jnp.dtype(spec.dtype)
    S = jax.ShapeDtypeStruct

    shapes = {k: S(v.shape, dt) for k, v in params.items()}

    def saving(x, params):  # the training forward: for "inputs", none of this step's business
        return jax_step.forward_saving(x, params, spec, saved=saved, interpret=False)[1]

    def backward(dy, kept, params):
        return jax_step.mlp_backward(dy, kept, params, spec, saved=saved, interpret=False)

    kept = jax.eval_shape(saving, S(x.shape, dt), shapes)
    if saved == "inputs":
        recorded.clear()
    jax.eval_shape(backward, S(dy.shape, dt), kept, shapes)
    jax_calls = list(recorded)
    recorded.clear()
    made: list = []
    monkeypatch.setattr(cross, "_call", _on_shapes(made))
    tp = {k: to_torch(np.asarray(v)) for k, v in params.items()}
    tx, tdy = to_torch(np.asarray(x)), to_torch(np.asarray(dy))
    kept = cross.forward_saving(tx, tp, spec)[1] if saved == "preact" else (tx,)
    grads = cross.mlp_backward(tdy, list(kept), tp, spec, saved=saved)
    for name, g in grads.items():
        want = tx.shape if name == "x" else tp[name].shape
        assert tuple(g.shape) == tuple(want) and g.dtype == tp.get(name, tx).dtype, name
    return jax_calls, list(recorded), made


def _torch_inputs(spec: MLPSpec, m: int) -> tuple[torch.Tensor, dict, torch.Tensor]:
    packed = pack_params(spec, init_params(spec, 0))
    params = {k: to_torch(np.asarray(v)) for k, v in packed.items()}
    x = to_torch(np.asarray(make_input(spec, m, seed=1)))
    return x, params, to_torch(np.asarray(make_grad_output(spec, m, seed=2)))


@pytest.mark.parametrize("grouped", [False, True], ids=["apart", "grouped"])
@pytest.mark.parametrize("saved", ["preact", "inputs"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_step_launches_the_jax_steps_kernels(
    case, saved: str, grouped: bool, on_hopper: pytest.MonkeyPatch, recorded: list
) -> None:
    """The torch route's saving forward and backward launch the JAX step's kernels one for one:
    same launcher, operand shapes and dtypes, tiles, epilogue and flags, in the same order (the
    weight gradients apart, or — where the table groups them, pinned here — in one launch), and
    never with overwrite_z (torch's saved z is an unmutated input of the backward op)."""
    spec, m = case
    if grouped:
        on_hopper.setattr(jax_step, "grouped_config", lambda products, k, *, interpret: GROUPED)
    jax_calls, torch_calls, _ = _steps(spec, m, saved, on_hopper, recorded)
    assert len(jax_calls) >= 2 * len(spec.layers())  # the recording works: forwards and GEMMs
    assert [c[:2] for c in torch_calls] == [c[:2] for c in jax_calls]
    assert not any(c[2] for c in torch_calls)
    names = [c[0] for c in torch_calls]
    assert ("linear_grouped" in names) == grouped


@pytest.mark.parametrize("case", CASES[:2], ids=_case_id)
def test_traced_functions_are_one_kernel_call(
    case, on_hopper: pytest.MonkeyPatch, recorded: list
) -> None:
    """Every function the step hands to as_torch_kernel (saving forwards, plain forwards, input
    gradients with their act' epilogue, weight gradients, the grouped launch) lowers for CUDA to
    the one bare Mosaic GPU call that as_torch_kernel's own module check accepts: the torch side
    leaves no launcher anything to pad."""
    spec, m = case
    on_hopper.setattr(jax_step, "grouped_config", lambda products, k, *, interpret: GROUPED)
    _, _, made = _steps(spec, m, "preact", on_hopper, recorded)
    kinds = {key[0] for key, _, _ in made}
    assert kinds == {"saving", "plain", "gemm", "grouped"}, kinds
    seen = set()
    for key, fn, structs in made:
        if key in seen:
            continue
        seen.add(key)
        call = mosaic_gpu_call(fn, structs)
        assert len(list(call.operands)) == len(structs), key
        # and torch's direct launcher plans it: each operand a function argument, every result
        plan = direct_launch_plan(fn, structs)
        assert plan is not None and sorted(plan.operand_order) == list(range(len(structs))), key
        assert [o.shape for o in plan.outputs] == [tuple(r.type.shape) for r in call.results]
        assert all(o.alias is None for o in plan.outputs), key  # no output overwrites an input
        assert sorted(plan.returned) == list(range(len(plan.outputs))) and plan.module_asm, key
        for i, operand in zip(plan.operand_order, call.operands, strict=True):
            assert tuple(structs[i].shape) == tuple(operand.type.shape), key


def test_tiles_are_the_jax_steps_decided_once_per_shape(on_hopper: pytest.MonkeyPatch) -> None:
    """The grouped launch's tiles come from the JAX step's rule and table (asked with the
    products in the order the backward reaches them, K = the batch rows), and every tile decision
    once per shape: a second step asks nothing (an eager step would pay ~20 µs of host time per
    fitted config)."""
    asked = []
    fitted = []

    def grouped_config(products, k, *, interpret):
        asked.append((products, k, interpret))
        return None

    def fitted_config(*args, _real=jax_step.fitted_config, **kw):
        fitted.append(args)
        return _real(*args, **kw)

    on_hopper.setattr(jax_step, "grouped_config", grouped_config)
    on_hopper.setattr(jax_step, "fitted_config", fitted_config)
    made: list = []
    on_hopper.setattr(cross, "_call", _on_shapes(made))
    spec, m = CASES[1]
    x, params, dy = _torch_inputs(spec, m)
    for step in range(2):
        kept = cross.forward_saving(x, params, spec)[1]
        cross.mlp_backward(dy, list(kept), params, spec, saved="preact")
        if step == 0:
            first = len(fitted)
    layers = spec.layers()[::-1]
    assert asked == [([(la.d_in, la.d_out) for la in layers], m, False)]
    assert first > 0 and len(fitted) == first


def test_residuals_are_consumed(on_hopper: pytest.MonkeyPatch, recorded: list) -> None:
    """As tma/backward.py: each residual None after its last use, so the caller's list frees it
    (torch's peak at or under eager's rests on this)."""
    spec, m = CASES[1]
    made: list = []
    on_hopper.setattr(cross, "_call", _on_shapes(made))
    params = {
        k: to_torch(np.asarray(v)) for k, v in pack_params(spec, init_params(spec, 0)).items()
    }
    x = to_torch(np.asarray(make_input(spec, m, seed=1)))
    dy = to_torch(np.asarray(make_grad_output(spec, m, seed=2)))
    kept = list(cross.forward_saving(x, params, spec)[1])
    assert len(kept) == 2 * len(spec.layers())
    cross.mlp_backward(dy, kept, params, spec, saved="preact")
    assert all(r is None for r in kept)


# ==== on the GPU ==================================================================================
GPU_CASES = [
    (MLPSpec((512, 1024, 384), "swiglu", True, "bfloat16"), 1024),  # "dact_gated", 2 layers
    (MLPSpec((384, 1024, 512, 256), "gelu_tanh", True, "float16"), 512),  # "dact", 3 layers
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
def test_gpu_step_gives_the_jax_steps_bits(case) -> None:
    """loss.backward() through FusedMLP(impl="mosaic") trains on this route (its plan says so):
    every gradient but the biases' bit for bit the JAX step's on the same inputs (the same
    kernels; the bias sums are each framework's reduction), and all within the policy of the
    float64 reference, eager autograd the baseline."""
    from test_backward_torch import _eager_grads, _module_grads, _reference

    from fusedmlp.common.packing import unpack_params
    from fusedmlp.torch_impl import FusedMLP

    spec, m = case
    module = FusedMLP(spec, impl="mosaic", device="cuda", seed=60)
    reason = front.plan(spec, (m, spec.d_in), impl="mosaic", device="cuda", saved="preact").reason
    assert "torch_impl/cross/backward.py" in reason, reason
    xn, dyn = make_input(spec, m, seed=61), make_grad_output(spec, m, seed=62)
    x, dy = to_torch(xn), to_torch(dyn)
    got = _module_grads(module, x.cuda(), dy.cuda())
    params = {k: v.detach().cpu() for k, v in module.params().items()}

    plain = {k: to_numpy(v) for k, v in params.items()}
    # to_numpy widens bfloat16 to float32 exactly: back to the spec's dtype, as the module holds
    packed = {k: jnp.asarray(v).astype(spec.dtype) for k, v in pack_params(spec, plain).items()}
    jx, jdy = jnp.asarray(xn), jnp.asarray(dyn)
    _, kept = jax_step.forward_saving(jx, packed, spec, saved="preact", interpret=False)
    jgrads = jax_step.mlp_backward(jdy, kept, packed, spec, saved="preact", interpret=False)
    want = {"x": to_numpy(jgrads.pop("x"))}  # widened as _module_grads widens torch's
    want |= unpack_params(spec, {k: to_numpy(v) for k, v in jgrads.items()})
    for name, g in got.items():
        if name.startswith(("b", "c")):  # bias gradients: torch.sum beside XLA's reduction
            continue
        assert np.asarray(g).tobytes() == want[name].tobytes(), name

    base = _eager_grads(spec, x.cuda(), {k: v.cuda() for k, v in params.items()}, dy.cuda())
    assert_grads_close(got, _reference(spec, x, params, dy), spec, baselines=base, what=str(spec))


@pytest.mark.gpu
def test_gpu_step_replayed_from_a_cuda_graph_gives_the_eager_bits() -> None:
    """A training step through FusedMLP(impl="mosaic") — its saving forward and every backward
    GEMM on the Mosaic GPU kernels, launched on the current stream (cross/launcher.py) — captured
    in a CUDA graph after eager warm-up and replayed on new inputs copied into the captured ones:
    every gradient bit for bit an eager step's on those inputs."""
    import torch

    from fusedmlp.torch_impl import FusedMLP

    spec, m = GPU_CASES[0]
    module = FusedMLP(spec, impl="mosaic", device="cuda", seed=63)
    x = to_torch(make_input(spec, m, seed=64)).cuda().requires_grad_()
    dy = to_torch(make_grad_output(spec, m, seed=65)).cuda()
    tensors = [x, *module.parameters()]

    def step() -> None:
        for t in tensors:
            t.grad = None
        (module(x).float() * dy.float()).sum().backward()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compiles and loads every kernel outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    for t in tensors:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    # thread_local: JAX's threads in this process make no unsafe call the capture would refuse
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        (module(x).float() * dy.float()).sum().backward()
    graphed = [t.grad for t in tensors]
    with torch.no_grad():  # new inputs in the captured buffers
        x.copy_(to_torch(make_input(spec, m, seed=66)))
        dy.copy_(to_torch(make_grad_output(spec, m, seed=67)))
    for g in graphed:
        g.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    replayed = [g.clone() for g in graphed]
    step()
    torch.cuda.synchronize()
    for t, got in zip(tensors, replayed, strict=True):
        assert torch.equal(got.view(torch.uint8), t.grad.view(torch.uint8)), tuple(t.shape)


def test_backward_op_runs_the_step_its_route_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backward op's route comes from the forward; a compiled graph fixes it at trace time,
    before any CUDA graph capture. A "mosaic" route runs the Mosaic GPU step, inside a capture
    (`graph_safe`) too (its launches record); "tma" the Triton step; any other route string is
    refused."""
    from fusedmlp.torch_impl import custom_op
    from fusedmlp.torch_impl.tma import backward as tma_backward

    spec, m = CASES[0]
    x, params, dy = _torch_inputs(spec, m)
    spec_json = custom_op.spec_to_json(spec)
    names = custom_op.names_for(spec_json, True)
    ran: list[str] = []

    def stand_in(step: str):
        def run(dy2d, residuals, params, spec, *, saved, need_dx):
            ran.append(step)
            grads = {"x": torch.zeros_like(x)} | {n: torch.zeros_like(params[n]) for n in names}
            return grads

        return run

    monkeypatch.setattr(cross, "mlp_backward", stand_in("mosaic"))
    monkeypatch.setattr(tma_backward, "mlp_backward", stand_in("tma"))
    kept = [torch.empty(s) for s in custom_op._preact_shapes(spec, m)]

    def backward(route: str) -> None:
        listed = [params[n] for n in names]
        custom_op._mlp_backward_op(dy, x, kept, listed, spec_json, None, "preact", True, route)

    backward("mosaic")
    backward("tma")
    with front.graph_safe():
        backward("mosaic")
    assert ran == ["mosaic", "tma", "mosaic"]
    with pytest.raises(ValueError, match="hopper: expected"):
        backward("tmaa")
