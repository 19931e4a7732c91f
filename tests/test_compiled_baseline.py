"""A compiled FusedMLP whose plan is "compile" traces the baseline's ops (issue 23, host time).

Where `auto` resolves to "compile" at a call's M (the dispatch table measured torch.compile
fastest there), or it is pinned — in training, where a baseline trains fastest — torch.compile
(FusedMLP) traces `baselines.eager_packed` (the baseline's products and activations on the packed
params) into the caller's graph instead of the opaque op: Inductor fuses them as it fuses the
module the FusedMLP replaced, and the call pays no op dispatch, no front and no nested compiled
function. Where the plan runs our kernels or "eager" (ATen's kernels, measured faster than
Inductor's there), where M is symbolic (dynamic shapes), for float32 (its fp32_precision is a
runtime flag), under torch.export and for a call the front refuses, the op stays. Every traced
graph is checked for the op's absence or presence, every output against the float64 reference;
the route tests trace under torch 2.11's Dynamo rules (helpers.dynamo_as_torch_2_11: no fusedmlp
dataclass may enter the trace, and `torch.compiler.is_exporting()` is True under any trace). The
dispatch table is patched in: a CPU has none. An eager `auto` that resolves to "compile" runs the
Inductor graph without Dynamo (baselines.run_compiled_graph): the same bits, never reused across
autocast."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusedmlp.common import MLPSpec, dispatch, reference
from fusedmlp.common.dispatch import KERNELS
from fusedmlp.common.tolerance import assert_close, assert_grads_close
from fusedmlp.torch_impl import FusedMLP, baselines, front, graph_op
from fusedmlp.torch_impl.packing import unpack_params
from helpers import dynamo_as_torch_2_11, one_point_table, to_numpy

# Two gated layers (the packed [W|V] view, d_out 37 is not a multiple of PACK_BLOCK) and a plain
# last layer, with biases.
SPEC = MLPSpec((19, 37, 23, 11), "swiglu", True, "bfloat16")
LEAD = (2, 3)  # a 3-D input: M = 6


class GraphRecorder:
    """A torch.compile backend that keeps each traced graph's call targets, then runs it as
    aot_eager does (the ops as traced, no code generation: fast on the 2-core CPU)."""

    def __init__(self) -> None:
        self.targets: list[list[object]] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.targets.append([n.target for n in gm.graph.nodes if n.op == "call_function"])
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        def run(graph, _):
            return make_boxed_func(graph)

        return aot_autograd(fw_compiler=run, bw_compiler=run)(gm, example_inputs)

    def ours(self) -> list[str]:
        """The fusedmlp ops in every graph traced so far."""
        return [str(t) for graph in self.targets for t in graph if "fusedmlp" in str(t)]


def _inputs(spec: MLPSpec, lead=LEAD, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, spec.dtype)
    x = torch.randn(*lead, spec.d_in, generator=gen).to(dtype)
    residual = torch.randn(*lead, spec.d_out, generator=gen).to(dtype)
    return x, residual


def _reference(module: FusedMLP, x, residual=None) -> np.ndarray:
    params = {k: to_numpy(v) for k, v in module.params().items()}
    y = reference.forward(module.spec, to_numpy(x), params)
    return y + to_numpy(residual) if residual is not None else y


def _assert_grads_match_reference(module: FusedMLP, x: torch.Tensor, dy: torch.Tensor) -> None:
    """x.grad and the module's (packed) parameter gradients against the float64 backward."""
    packed = {name: p.grad for name, p in module.named_parameters()}
    grads = {"x": x.grad, **unpack_params(module.spec, packed)}
    assert all(g is not None for g in grads.values())
    params = {k: to_numpy(v) for k, v in module.params().items()}
    ref = reference.backward(module.spec, to_numpy(x.detach()), params, to_numpy(dy))
    assert_grads_close({k: to_numpy(v) for k, v in grads.items()}, ref, module.spec)


def _compiled(module: FusedMLP, recorder: GraphRecorder, **options):
    torch._dynamo.reset()
    return torch.compile(module, fullgraph=True, backend=recorder, **options)


# ---- pinned baselines ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_pinned_compile_is_traced_into_the_graph(dtype):
    spec = SPEC.replace(dtype=dtype)
    impl = "compile"
    module = FusedMLP(spec, impl=impl, seed=1)
    x, residual = _inputs(spec, seed=2)
    recorder = GraphRecorder()
    with dynamo_as_torch_2_11(), torch.no_grad():
        out = _compiled(module, recorder)(x, residual)
    assert recorder.targets and not recorder.ours()  # the baseline's ops, no opaque op
    assert any("addmm" in str(t) for t in recorder.targets[0])
    assert out.shape == (*LEAD, spec.d_out) and out.dtype == getattr(torch, dtype)
    assert_close(to_numpy(out), _reference(module, x, residual), spec, what=f"{impl} {dtype}")
    # the traced ops are eager_packed's, as they run eagerly: the same bits
    with torch.no_grad():
        m = x.shape[0] * x.shape[1]
        want = baselines.eager_packed(
            x.reshape(m, spec.d_in), module.packed_params(), baselines.packed_recipe(spec),
            residual.reshape(m, spec.d_out),
        )  # fmt: skip
    assert torch.equal(out.reshape(m, spec.d_out), want)


def test_eager_packed_is_the_eager_baseline_on_packed_params():
    # float32, a padded width (37) and one of whole PACK_BLOCKs (64): within the tolerance
    # policy's baseline rule of `eager` itself
    for spec in (
        SPEC.replace(dtype="float32"),
        MLPSpec((16, 64, 64, 8), "geglu", False, "float32"),
    ):
        module = FusedMLP(spec, impl="eager", seed=3)
        x, _ = _inputs(spec, lead=(7,), seed=4)
        with torch.no_grad():
            got = baselines.eager_packed(x, module.packed_params(), baselines.packed_recipe(spec))
            want = baselines.eager(x, module.params(), spec)
        assert_close(to_numpy(got), _reference(module, x), spec, baseline=to_numpy(want))


# ---- auto: the measured choice at this M ---------------------------------------------------------
def test_auto_traces_the_baseline_where_the_table_measured_it_faster(torch_table):
    module = FusedMLP(SPEC, impl="auto", seed=5)
    x, residual = _inputs(SPEC, seed=6)
    m = x.shape[0] * x.shape[1]
    torch_table(one_point_table(SPEC, ("compile", "triton"), m))
    assert front.plan(SPEC, (m, SPEC.d_in), impl="auto").impl == "compile"
    recorder = GraphRecorder()
    with dynamo_as_torch_2_11(), torch.no_grad():
        compiled = _compiled(module, recorder)
        out = compiled(x, residual)
        assert not recorder.ours()
        assert_close(to_numpy(out), _reference(module, x, residual), SPEC, what="auto->compile")
        # a table installed after the trace (a new generation) retraces: the op, where our kernels
        # were measured faster — the same compiled module, no reset
        torch_table(one_point_table(SPEC, ("triton", "compile"), m))
        dispatch._GENERATION[0] += 1
        out = compiled(x, residual)
    assert recorder.ours() == ["fusedmlp.mlp.default"]
    assert_close(to_numpy(out), _reference(module, x, residual), SPEC, what="auto->kernels")


def test_auto_trains_through_the_traced_baseline(torch_table):
    # a training point that ranks eager first: the compiled training graph differentiates the
    # baseline's ops (no training op), gradients in the params' packed layout
    module = FusedMLP(SPEC, impl="auto", seed=7)
    x, _ = _inputs(SPEC, seed=8)
    x.requires_grad_()
    m = x.shape[0] * x.shape[1]
    torch_table(one_point_table(SPEC, ("eager", KERNELS), m, phase="train"))
    recorder = GraphRecorder()
    with dynamo_as_torch_2_11():
        out = _compiled(module, recorder)(x)
    assert recorder.targets and not recorder.ours()
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.dtype)
    out.backward(dy)
    _assert_grads_match_reference(module, x, dy)


# ---- where the op stays --------------------------------------------------------------------------
def test_the_op_stays_for_our_kernels_eager_dynamic_shapes_and_float32():
    cases = [
        (FusedMLP(SPEC, impl="triton", seed=1), {}),  # our kernels
        # "eager": ATen's kernels, which `auto` picks where they beat Inductor's
        (FusedMLP(SPEC, impl="eager", seed=1), {}),
        (FusedMLP(SPEC, impl="compile", seed=1), {"dynamic": True}),  # M symbolic
        (FusedMLP(SPEC.replace(dtype="float32"), impl="compile", seed=1), {}),  # fp32 precision
    ]
    for module, options in cases:
        x, _ = _inputs(module.spec, seed=3)
        recorder = GraphRecorder()
        # "compile" through the op runs a nested torch.compile of `eager`, whose partial carries
        # the spec: a trace of its own, not strict (2.11 refuses dataclasses only as arguments of
        # assume_constant_result functions, which point 1 still checks)
        with dynamo_as_torch_2_11(strict=module.impl != "compile"), torch.no_grad():
            out = _compiled(module, recorder, **options)(x)
        assert recorder.ours() == ["fusedmlp.mlp.default"], (module.impl, options)
        assert_close(to_numpy(out), _reference(module, x), module.spec)


def test_compiled_training_with_our_kernels_keeps_the_training_op():
    # our kernels in training: the training op (its `saved` policy), never the inference op —
    # on torch 2.11 an is_exporting() check sent compiled training to the inference op
    module = FusedMLP(SPEC, impl="triton", seed=14, saved="preact")
    x, _ = _inputs(SPEC, seed=15)
    x.requires_grad_()
    recorder = GraphRecorder()
    with dynamo_as_torch_2_11():
        out = _compiled(module, recorder)(x)
    assert "fusedmlp.mlp_train.default" in recorder.ours()
    assert "fusedmlp.mlp.default" not in recorder.ours()
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(16)).to(out.dtype)
    out.backward(dy)
    _assert_grads_match_reference(module, x, dy)


def test_export_keeps_the_op():
    # torch.export records the one inference op whatever the plan (a program that runs anywhere)
    module = FusedMLP(SPEC, impl="compile", seed=1)
    x, _ = _inputs(SPEC, seed=5)
    exported = torch.export.export(module, (x,))
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.fusedmlp.mlp.default]


def test_bad_input_keeps_the_fronts_message():
    # A malformed call is never traced as a baseline: the op's fake raises the front's ValueError
    # at trace time (Dynamo wraps it in its TorchRuntimeError; the front's message is kept).
    module = FusedMLP(SPEC, impl="compile", seed=1)
    x, residual = _inputs(SPEC, seed=4)
    cases = [
        ((x.float(),), "x: expected dtype bfloat16"),
        ((x[..., :-1],), "x: expected"),
        ((x, residual[..., :-1]), "residual: expected"),
        ((x[0, 0, 0],), "x: expected"),  # 0-D
    ]
    for args, message in cases:
        with torch.no_grad(), pytest.raises(Exception, match=message):
            _compiled(module, GraphRecorder())(*args)


# ---- eager mode: auto's "compile" without Dynamo -------------------------------------------------
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_auto_runs_the_compiled_graph_without_dynamo(torch_table, monkeypatch, dtype):
    # auto resolved to "compile" runs baselines.run_compiled_graph: the Inductor graph of
    # torch.compile(eager), traced and compiled once per call signature, called without Dynamo's
    # guards — the same bits as torch.compile's; a pinned impl="compile" keeps torch.compile
    # (float32: test_the_compiled_graph_is_not_reused_across_autocast)
    spec = SPEC.replace(dtype=dtype)
    module = FusedMLP(spec, impl="auto", seed=10)
    x, residual = _inputs(spec, seed=11)
    m = x.shape[0] * x.shape[1]
    torch_table(one_point_table(spec, ("compile", "triton"), m))
    monkeypatch.setattr(baselines, "_GRAPHS", {})  # this test's graphs go with it
    with torch.no_grad():
        want = FusedMLP(spec, impl="compile", seed=10)(x, residual)  # torch.compile
        real = baselines._compiled
        monkeypatch.setattr(baselines, "_compiled", lambda spec: pytest.fail("torch.compile ran"))
        got = [module(x, residual) for _ in range(3)]
    assert len(baselines._GRAPHS) == 1  # one graph for the three calls of one signature
    for out in got:
        assert torch.equal(out, want)
    assert_close(to_numpy(got[0]), _reference(module, x, residual), spec)
    # the front's forward asked to build a gradient: torch.compile's autograd (the graph above is
    # inference only)
    monkeypatch.setattr(baselines, "_compiled", real)
    xg = x.clone().requires_grad_()
    out = front.forward(xg, module.packed_params(), spec, impl="auto", residual=residual)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(12)).to(out.dtype)
    out.backward(dy)
    assert len(baselines._GRAPHS) == 1
    _assert_grads_match_reference(module, xg, dy)


def test_the_compiled_graph_is_not_reused_across_autocast(torch_table, monkeypatch):
    # make_fx records autocast's casts: a call under autocast runs torch.compile (which guards on
    # it), so the graph cached without autocast never answers an autocast call, nor the reverse
    spec = SPEC.replace(dtype="float32")
    params = FusedMLP(spec, impl="eager", seed=12).params()
    x, _ = _inputs(spec, seed=13)
    torch_table(one_point_table(spec, ("compile", "triton"), x.shape[0] * x.shape[1]))
    monkeypatch.setattr(baselines, "_GRAPHS", {})
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = front.mlp(x, params, spec, impl="auto")
        full = front.mlp(x, params, spec, impl="auto")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low_again = front.mlp(x, params, spec, impl="auto")
    assert low.dtype == low_again.dtype == torch.bfloat16 and full.dtype == torch.float32
    assert len(baselines._GRAPHS) == 1
    assert_close(to_numpy(full), reference.forward(spec, to_numpy(x), _params_np(params)), spec)


def _params_np(params):
    return {k: to_numpy(v) for k, v in params.items()}


# ---- GPU (`pytest -m gpu`: the route on the GPU image's torch, 2.11) -----------------------------
@pytest.mark.gpu
def test_gpu_compiled_routes(monkeypatch):
    # "compile" traced (no op in the graph), "eager" the op, our Triton kernels their launches
    # in the graph (graph_op.py; the op with FUSEDMLP_GRAPH_LAUNCHES=0), training with our
    # kernels the training op, export the op — on the real torch of the image, not an emulation
    spec = SPEC
    x, residual = (t.cuda() for t in _inputs(spec, seed=16))
    routes = {}
    for impl, launches in (("compile", True), ("eager", True), ("triton", True), ("triton", False)):
        monkeypatch.setattr(graph_op, "ENABLED", launches)
        module = FusedMLP(spec, impl=impl, device="cuda", seed=17)
        recorder = GraphRecorder()
        with torch.no_grad():
            out = _compiled(module, recorder)(x, residual)
        routes[impl if launches else f"{impl}, launches off"] = recorder.ours()
        assert_close(to_numpy(out), _reference(module, x, residual), spec, what=impl)
    monkeypatch.setattr(graph_op, "ENABLED", True)
    assert routes == {
        "compile": [],
        "eager": ["fusedmlp.mlp.default"],
        "triton": ["fusedmlp.mlp_launches.default"],
        "triton, launches off": ["fusedmlp.mlp.default"],
    }
    module = FusedMLP(spec, impl="triton", device="cuda", seed=17)
    recorder = GraphRecorder()
    xg = x.clone().requires_grad_()
    out = _compiled(module, recorder)(xg)
    assert "fusedmlp.mlp_train.default" in recorder.ours()
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(18)).to(out)
    out.backward(dy)
    _assert_grads_match_reference(module, xg, dy)
    exported = torch.export.export(FusedMLP(spec, impl="compile", device="cuda", seed=17), (x,))
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.fusedmlp.mlp.default]
