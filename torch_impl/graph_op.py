"""Our kernels launched from the caller's compiled graph: `torch.ops.fusedmlp.mlp_launches`.

Where a compiled FusedMLP (or `mlp_op`) runs our kernels, the registered op `fusedmlp::mlp`
(custom_op.py) is one opaque node: every call of the compiled graph goes through the op's Python
dispatch, the front (its cached plan) and Triton's launch path, kernel by kernel — on the H200
host, 215–465 µs of host time a call where the HF module it replaces costs 129–230 compiled
(the eighth to tenth sessions' `fusedmlp models`, M = 1 and 16: `fused_decode`). This op is the
same function registered with `torch.library.triton_op`: torch.compile traces its body once, on
fake tensors, and each launch becomes a `triton_kernel_wrapper` node of the graph (launch.py's
records launch through `wrap_triton` there), so Inductor compiles the same kernels with the same
grids, scalars and constexprs and launches them from its own generated wrapper — no op dispatch,
no front and no Triton launch path per call. The plan, the checks and the launch records are
computed at trace time only.

Where it runs (`launches_in_graph`, decided at trace time from primitives): an inference call of
static M under torch.compile, not export (which keeps `fusedmlp::mlp`, serialisable), whose plan
launches only kernels a trace can record — `fused_decode` and the portable per-layer kernels
(`triton`). Not the Hopper kernels (`triton_tma`: host-side TMA descriptors), not `fused_small`
(its weights and biases are tuples of tensors, which the launch nodes do not take), not the
baselines (traced as ops by module.py) nor the cross-stack ones; and never under Triton's
interpreter: `wrap_triton` cannot record an interpreted kernel (it would run it on fake tensors),
so on the CPU every compiled call keeps `fusedmlp::mlp`. A training call takes the training op
(custom_op.py), whose backward this op has not.

Static shapes only: the launch records and the plan are keyed on sizes. A symbolic M keeps
`fusedmlp::mlp` — also under torch.compile's default automatic dynamic shapes, which make M
symbolic once the same frame has seen a second M (a decode loop after its prefill; two
FusedMLPs of different sizes compiled in one process share `FusedMLP.forward`'s frame). A caller
that wants the route at every M compiles with `dynamic=False` (one graph per M, as
`fusedmlp models` does) or marks x static (`torch._dynamo.mark_static`).

Eager calls of this op run the same front with real tensors (the launches run directly).
FUSEDMLP_GRAPH_LAUNCHES=0 in the environment (read at import) turns the route off: every compiled
call then keeps `fusedmlp::mlp`, as before this module existed.

Twin: none (jax.jit traces jax_impl.front.mlp's pallas_calls into the caller's XLA program).
"""

from __future__ import annotations

import math
import os

import torch
from torch.fx.experimental.symbolic_shapes import has_static_value
from torch.library import triton_op

from fusedmlp.common import dispatch
from fusedmlp.common.registry import AUTO

from . import front
from .custom_op import exporting, op_forward, parse_config, parse_spec
from .runtime import INTERPRET

# The route, unless switched off (see the module docstring).
ENABLED: bool = os.environ.get("FUSEDMLP_GRAPH_LAUNCHES", "1") != "0"
# Implementations whose launches a trace records as graph nodes (see the module docstring).
GRAPH_IMPLS: frozenset[str] = frozenset({"fused_decode", "triton"})


@triton_op("fusedmlp::mlp_launches", mutates_args=())
def _mlp_launches(
    x: torch.Tensor,
    params: list[torch.Tensor],
    spec_json: str,
    impl: str,
    config_json: str | None,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    """`front.forward` on the op's arguments (fusedmlp::mlp's schema and body)."""
    return op_forward(x, params, spec_json, impl, config_json, residual)


MLP_LAUNCHES_OP = torch.ops.fusedmlp.mlp_launches.default


@torch.compiler.assume_constant_result
def launches_in_graph(
    spec_json: str,
    impl: str,
    config_json: str | None,
    x_shape: tuple[int, ...],
    x_dtype: torch.dtype,
    residual_shape: tuple[int, ...] | None,
    residual_dtype: torch.dtype | None,
    device: str,
    generation: int,
) -> bool:
    """Whether a compiled inference call of this signature runs `fusedmlp::mlp_launches`: a
    well-formed call (anything else keeps `fusedmlp::mlp`, whose fake raises the front's message
    at trace time) whose plan launches only kernels of GRAPH_IMPLS. Evaluated once, when
    torch.compile traces the call (primitives only: see custom_op.py); the graph guards on the
    shapes and on the dispatch table's generation, as module._traces_baseline's decision does."""
    del generation  # a guard, not an input: front.plan reads the installed table itself
    if INTERPRET or (impl != AUTO and impl not in GRAPH_IMPLS):
        return False
    spec = parse_spec(spec_json)
    lead = x_shape[:-1]
    if x_shape[-1:] != (spec.d_in,) or str(x_dtype).removeprefix("torch.") != spec.dtype:
        return False
    if residual_shape is not None and (
        residual_shape != (*lead, spec.d_out) or residual_dtype != x_dtype
    ):
        return False
    try:
        chosen = front.plan(
            spec, (math.prod(lead), spec.d_in), impl=impl, device=device,
            config=parse_config(config_json), residual=residual_shape is not None,
        )  # fmt: skip
    except (NotImplementedError, ValueError):  # the op's own call raises the message
        return False
    return all(
        launch.impl in GRAPH_IMPLS and front.unavailable_reason(launch.impl, device) is None
        for launch in chosen.launches
    )


def takes_call(
    x: torch.Tensor,
    spec_json: str,
    impl: str,
    config_json: str | None,
    residual: torch.Tensor | None,
) -> bool:
    """Under torch.compile: whether this inference call runs `fusedmlp::mlp_launches` rather
    than `fusedmlp::mlp` (`launches_in_graph`). Static shapes only: a symbolic size (dynamic
    shapes) keeps the op, whose launch records are keyed on concrete sizes."""
    if not ENABLED or INTERPRET or exporting() or x.ndim == 0:
        return False
    # has_static_value, not isinstance: Dynamo folds isinstance(a SymInt, int) to True.
    if not all(has_static_value(d) for d in x.shape):
        return False
    residual_shape = residual_dtype = None
    if residual is not None:
        if not all(has_static_value(d) for d in residual.shape) or residual.device != x.device:
            return False
        residual_shape, residual_dtype = tuple(residual.shape), residual.dtype
    generation = dispatch.generation()  # read here: Dynamo guards on it
    return launches_in_graph(
        spec_json, impl, config_json, tuple(x.shape), x.dtype, residual_shape, residual_dtype,
        x.device.type, generation,
    )  # fmt: skip
