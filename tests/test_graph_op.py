"""Our kernels launched from a compiled graph: `fusedmlp::mlp_launches` (issue 23, host time).

torch_impl/graph_op.py registers the front with `torch.library.triton_op`, so that a compiled
FusedMLP whose plan runs `fused_decode` or the portable kernels records each launch as a node of
the caller's graph and Inductor launches the kernels itself. Under Triton's interpreter no trace
can record an interpreted kernel, so the route is off there (every compiled call keeps
`fusedmlp::mlp`); what runs here in-process is the op's eager call against the registered op.

The route itself is checked in a fresh process with real Triton functions and no GPU
(bench/host_cost.py's stubs): the trace reads each kernel's TTIR for the H200's target, Inductor
compiles the kernels it emits for sm_90 (ptxas runs), and the launches — from the eager module,
from the traced graph run as aot_eager runs it, and from Inductor's generated wrapper — are
recorded and compared: the same kernels, grids, scalars and constexprs (programmatic dependent
launch aside: off in a graph), none of the front's Python on a repeated compiled call, and no
tensor but the launch's outputs marked as written (anything else would be copied each call).
The traces run under torch 2.11's Dynamo rules (helpers.dynamo_as_torch_2_11).
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from fusedmlp.common import MLPSpec, init_params, make_grad_output, make_input
from fusedmlp.torch_impl import FusedMLP, custom_op, graph_op
from fusedmlp.torch_impl.runtime import INTERPRET
from helpers import run_script, to_torch

# (name, spec, impl, x's leading shape, residual): fused_decode (auto at M <= 64, gated, bias,
# split-K reduction), the portable per-layer kernels (a gated layer, a residual in the last
# layer's epilogue, 3-D x), float32.
ROUTED = [
    ("decode", MLPSpec((256, 320, 192), "swiglu", True, "bfloat16"), "auto", (5,), False),
    ("per_layer", MLPSpec((96, 160, 72, 48), "geglu", True, "float16"), "triton", (3, 7), True),
    ("float32", MLPSpec((64, 200, 40), "gelu_tanh", False, "float32"), "triton", (9,), False),
]


def _call_args(spec: MLPSpec, impl: str, lead: tuple[int, ...], residual: bool, seed: int = 0):
    params = {k: to_torch(v) for k, v in init_params(spec, seed=seed).items()}
    x = to_torch(make_input(spec, lead, seed=seed + 1))
    r = to_torch(make_grad_output(spec, lead, seed=seed + 2)) if residual else None
    listed = [params[n] for n in custom_op.names_for(custom_op.spec_to_json(spec), False)]
    return x, listed, custom_op.spec_to_json(spec), impl, None, r


@pytest.mark.parametrize("name, spec, impl, lead, residual", ROUTED, ids=[c[0] for c in ROUTED])
def test_eager_call_is_the_registered_op(name, spec, impl, lead, residual):
    """Called eagerly, `fusedmlp::mlp_launches` is `fusedmlp::mlp`: the same front, bit for bit
    (plain params, packed on first use, a residual, 3-D x)."""
    args = _call_args(spec, impl, lead, residual)
    y = graph_op.MLP_LAUNCHES_OP(*args)
    expected = custom_op.MLP_OP(*args)
    assert y.shape == (*lead, spec.d_out) and y.dtype == expected.dtype
    assert torch.equal(y, expected)


@pytest.mark.skipif(not INTERPRET, reason="the interpreter's rule (TRITON_INTERPRET=1)")
def test_no_route_under_the_interpreter():
    """Under TRITON_INTERPRET=1 a trace cannot record a launch: every compiled call keeps the
    registered op (test_custom_op.py and test_compile.py trace it)."""
    assert INTERPRET
    spec = ROUTED[0][1]
    args = (custom_op.spec_to_json(spec), "auto", None, (5, 256), torch.bfloat16, None, None)
    assert not graph_op.launches_in_graph(*args, "cpu", 0)


_ROUTE = textwrap.dedent(
    """
    import dataclasses, json, sys
    sys.path.insert(1, "tests")
    from fusedmlp.bench import host_cost
    host_cost.install_stub()  # real Triton functions, stubbed launches, an sm_90 target
    import torch
    from torch._dynamo.backends.common import aot_autograd
    from functorch.compile import make_boxed_func
    from fusedmlp.common import MLPSpec
    from fusedmlp.common.tiling import fused_decode_config
    from fusedmlp.torch_impl import FusedMLP, custom_op, front, graph_op
    from fusedmlp.torch_impl import fused_decode as fd
    from helpers import dynamo_as_torch_2_11

    fronts = [0]
    real_forward = front.forward
    def counted(*a, **k):
        fronts[0] += 1
        return real_forward(*a, **k)
    front.forward = counted

    class Graphs:  # keeps each traced graph's nodes, runs it as aot_eager does
        def __init__(self):
            self.nodes = []
        def __call__(self, gm, inputs):
            def keep(graph, _):
                self.nodes.append([(str(n.target), {k: v for k, v in n.kwargs.items()
                                    if k == "tensors_to_clone"}
                                    | {k: repr(v) for k, v in n.kwargs.get("kwargs", {}).items()
                                       if k == "USE_PDL"})
                                   for n in graph.graph.nodes if n.op == "call_function"])
                return make_boxed_func(graph)
            return aot_autograd(fw_compiler=keep)(gm, inputs)

    def record(call):
        host_cost.RECORD = []
        call()
        out, host_cost.RECORD = host_cost.RECORD, None
        return [[n, list(g), {k: repr(v) for k, v in a.items()}] for n, g, a in out]

    def make(widths, act, bias, dtype, impl, lead, residual, mode):
        spec = MLPSpec(tuple(widths), act, bias, dtype)
        module = FusedMLP(spec, impl=impl).requires_grad_(mode == "train")
        dtype = getattr(torch, spec.dtype)
        x = torch.empty((*lead, spec.d_in), dtype=dtype, requires_grad=mode == "train")
        r = torch.empty((*lead, spec.d_out), dtype=dtype) if residual else None
        if mode.startswith("functional"):  # custom_op.mlp, the functional front of the op
            params = module.packed_params() if mode == "functional" else module.params()
            return lambda: custom_op.mlp(x, params, spec, impl=impl, residual=r)
        return lambda: module(x, r)

    result = {}
    for name, *fields in json.loads(sys.argv[1]):
        mode = fields[-1]
        call = make(*fields)
        case = {"eager": record(call) if mode != "train" else []}
        backends = ("aot_eager", "inductor") if mode in ("module", "functional") else ("aot_eager",)
        graph_op.ENABLED = mode != "off"  # FUSEDMLP_GRAPH_LAUNCHES=0 sets it so at import
        for backend in backends:
            torch._dynamo.reset()
            graphs = Graphs() if backend == "aot_eager" else "inductor"
            with dynamo_as_torch_2_11(strict=not mode.startswith("functional")):
                compiled = torch.compile(call, backend=graphs, fullgraph=True,
                                         dynamic=True if mode == "dynamic" else None)
                compiled()  # traced and compiled here
            fronts[0] = 0
            case[backend] = record(compiled)
            case[backend + "_fronts"] = fronts[0]
            if backend == "aot_eager":
                case["nodes"] = graphs.nodes
        result[name] = case
    graph_op.ENABLED = True

    # A, torch.compiler.reset(), B, A: each trace registers its kernels with torch afresh
    cases = {c[0]: c[1:] for c in json.loads(sys.argv[1])}
    torch._dynamo.reset()
    nodes = []
    for name in ("decode", "reset", "per_layer", "decode"):
        if name == "reset":
            torch.compiler.reset()
            continue
        graphs = Graphs()  # dynamic=False: another shape of the same frame stays static
        torch.compile(make(*cases[name]), backend=graphs, fullgraph=True, dynamic=False)()
        nodes.append(graphs.nodes[0])
    result["reset"] = {"nodes": nodes}

    # a pinned programmatic-dependent-launch config, from a launcher inside a triton_op
    spec = MLPSpec((256, 320, 192), "swiglu", True, "bfloat16")
    cfg = dataclasses.replace(fused_decode_config(spec, 5), pdl=True)
    names = ("wv0", "w1", "bc0", "b1")
    packed = FusedMLP(spec).requires_grad_(False).packed_params()
    @torch.library.triton_op("test::decode_pdl", mutates_args=())
    def decode_pdl(x: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
        return fd.fused_decode_fwd(x, dict(zip(names, params)), spec, config=cfg)
    x = torch.empty(5, 256, dtype=torch.bfloat16)
    listed = [packed[n] for n in names]
    call = lambda: decode_pdl(x, listed)
    graphs = Graphs()
    compiled = torch.compile(call, backend=graphs, fullgraph=True)
    compiled()
    result["pdl"] = {"eager": record(call), "aot_eager": record(compiled),
                     "nodes": graphs.nodes}
    print("RESULT" + json.dumps(result))
    """
)

# name, widths, activation, bias, dtype, impl, lead, residual, mode: "module" (FusedMLP),
# "functional" (custom_op.mlp on packed params), "functional_plain" (plain params: they would be
# packed in the graph, every call), "dynamic" (dynamic shapes), "off" (the route switched off:
# FUSEDMLP_GRAPH_LAUNCHES=0), "train" (x requires grad)
_CASES = [
    [name, list(spec.widths), spec.activation, spec.bias, spec.dtype, impl, list(lead), res, mode]
    for name, spec, impl, lead, res, mode in [
        *((*case, "module") for case in ROUTED),
        ("functional", ROUTED[0][1], "fused_decode", (2,), True, "functional"),
        ("functional_plain", ROUTED[0][1], "fused_decode", (2,), False, "functional_plain"),
        ("fused_small", MLPSpec((32, 64, 16), "relu", True, "float16"), "fused_small", (40,),
         False, "module"),
        ("dynamic", ROUTED[1][1], "triton", (3, 7), True, "dynamic"),
        ("off", ROUTED[0][1], "auto", (5,), False, "off"),
        ("train", ROUTED[0][1], "auto", (5,), False, "train"),
    ]
]  # fmt: skip
_ROUTED_NAMES = [c[0] for c in ROUTED] + ["functional"]
WRAPPER = "triton_kernel_wrapper_functional"
# what a routed graph holds besides the launches: output buffers, views, a residual added after
# a whole-MLP launch, the launches' results
BESIDES = {
    "aten.empty.memory_format",
    "aten.view.default",
    "aten.add.Tensor",
    "<built-in function getitem>",
}


@pytest.fixture(scope="module")
def routes():
    import json

    return run_script(_ROUTE, json.dumps(_CASES), timeout=900)


@pytest.mark.parametrize("name", _ROUTED_NAMES)
def test_compiled_call_launches_from_the_graph(routes, name):
    case = routes[name]
    eager = case["eager"]
    assert eager, name
    (nodes,) = case["nodes"]
    targets = [t for t, _ in nodes]
    # one graph node per launch; no opaque op, no copy or repacking of the params
    assert targets.count(WRAPPER) == len(eager), targets
    assert set(targets) <= BESIDES | {WRAPPER}, targets
    # only a launch's outputs are written: nothing else is copied per call
    outputs = {"h_ptr", "o_ptr", "out_ptr", "y_ptr"}
    for target, kwargs in nodes:
        if target == WRAPPER:
            assert set(kwargs["tensors_to_clone"]) <= outputs, kwargs
    for backend in ("aot_eager", "inductor"):
        assert case[backend + "_fronts"] == 0, backend  # the front ran at trace time only
        launched = case[backend]
        assert [(n, g) for n, g, _ in launched] == [(n, g) for n, g, _ in eager], backend
        for (kernel, _, args), (_, _, expected) in zip(launched, eager, strict=True):
            assert args == expected, (backend, kernel)


@pytest.mark.parametrize("name", ["functional_plain", "dynamic", "off"])
def test_calls_that_keep_the_op(routes, name):
    """Plain gated params (packed inside the graph: a copy of the gated weights every call), a
    symbolic M (the launch records are keyed on sizes) and the route switched off keep
    fusedmlp::mlp."""
    (nodes,) = routes[name]["nodes"]
    targets = [t for t, _ in nodes]
    assert "fusedmlp.mlp.default" in targets, targets
    assert WRAPPER not in targets, targets
    assert routes[name]["aot_eager"] == routes[name]["eager"]  # the same launches, through the op


def test_retrace_after_reset(routes):
    """torch.compiler.reset() empties torch's kernel table: a later trace registers its kernels
    again (a wrapper kept from an earlier trace named a stale index and failed)."""
    for nodes in routes["reset"]["nodes"]:
        assert WRAPPER in [t for t, _ in nodes]


def test_no_programmatic_dependent_launch_in_a_graph(routes):
    """A config that pins pdl=True launches with PDL eagerly; its graph nodes run without it
    (Inductor would take `launch_pdl` for a kernel argument): USE_PDL is off in every node."""
    case = routes["pdl"]
    assert [a["USE_PDL"] for _, _, a in case["eager"]] == ["True"] * 3
    (nodes,) = case["nodes"]
    flags = [kwargs["USE_PDL"] for target, kwargs in nodes if target == WRAPPER]
    assert flags == ["False"] * 3, nodes
    assert [(n, g) for n, g, _ in case["aot_eager"]] == [(n, g) for n, g, _ in case["eager"]]


def test_fused_small_keeps_the_op(routes):
    """fused_small's tuple arguments are not graph nodes' arguments: the op runs, as before."""
    (nodes,) = routes["fused_small"]["nodes"]
    targets = [t for t, _ in nodes]
    assert any("fusedmlp.mlp.default" in t for t in targets), targets
    assert not any("triton_kernel_wrapper" in t for t in targets), targets


def test_training_keeps_the_training_op(routes):
    """A compiled call that builds a gradient records fusedmlp::mlp_train (its backward is
    registered; the graph launches have none)."""
    (nodes,) = routes["train"]["nodes"]
    targets = [t for t, _ in nodes]
    assert any("fusedmlp.mlp_train" in t for t in targets), targets
    assert not any("triton_kernel_wrapper" in t for t in targets), targets


# The H200: the same kernels from Inductor's wrapper, bit for bit. Llama-shaped decode (auto ->
# fused_decode at M <= 64 on the committed table or the heuristic), the portable kernels with a
# residual, and autocast over float32 params.
LLAMA_SMALL = MLPSpec((2048, 8192, 2048), "swiglu", False, "bfloat16")
GPU_CASES = [
    ("decode M=1", LLAMA_SMALL, "fused_decode", (1,)),
    ("decode M=16", LLAMA_SMALL, "fused_decode", (16,)),
    ("per_layer", MLPSpec((768, 3072, 768), "gelu_tanh", True, "float16"), "triton", (4, 9)),
]
KERNELS = {
    "fused_decode": ("_fused_decode_up_kernel", "_fused_decode_down_kernel"),
    "triton": ("_linear_act_fwd_kernel",),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name, spec, impl, lead", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_gpu_compiled_launches_are_the_eager_kernels(name, spec, impl, lead):
    from torch._inductor.utils import run_and_get_code

    module = FusedMLP(spec, impl=impl, device="cuda", seed=3)
    x = to_torch(make_input(spec, lead, seed=4)).cuda()
    r = to_torch(make_grad_output(spec, lead, seed=5)).cuda() if impl == "triton" else None
    torch._dynamo.reset()
    with torch.no_grad():
        eager = module(x, r)
        compiled = torch.compile(module, fullgraph=True)
        out, codes = run_and_get_code(compiled, x, r)
        again = compiled(x, r)
    code = "\n".join(codes)
    assert "fusedmlp.mlp" not in code, "the opaque op ran: the route did not take the call"
    assert all(kernel in code for kernel in KERNELS[impl]), code[-2000:]
    assert torch.equal(out, eager) and torch.equal(again, eager), name


@pytest.mark.gpu
def test_gpu_compiled_autocast_routes():
    """Autocast over float32 params: the casts are graph ops, the kernels the float16 ones."""
    spec = MLPSpec((1024, 4096, 1024), "swiglu", True, "float32")
    module = FusedMLP(spec, device="cuda", seed=6)
    x = to_torch(make_input(spec, (8,), seed=7)).cuda()
    torch._dynamo.reset()
    from torch._inductor.utils import run_and_get_code

    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        eager = module(x)
        out, codes = run_and_get_code(torch.compile(module, fullgraph=True), x)
    assert "fusedmlp.mlp" not in "\n".join(codes)
    assert out.dtype == torch.float16
    assert torch.equal(out, eager)
