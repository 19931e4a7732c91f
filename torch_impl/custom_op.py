"""The fused MLP as one PyTorch operator, `torch.ops.fusedmlp.mlp`, so torch.compile sees one node.

    y = MLP(x; params, spec) (+ residual)        computed by `fusedmlp.torch_impl.front.mlp`

Why a custom op: Dynamo cannot trace into a Triton launch under the interpreter, and `triton_op`
+ `wrap_triton` runs the kernel on fake tensors there (TOOLCHAIN.md), so the forward is registered
with `torch.library.custom_op` and a fake (meta) implementation that gives the output's shape and
dtype without running anything. `torch.compile(model, fullgraph=True)` then keeps the whole MLP as
one opaque node: no graph break, with the eager, aot_eager and inductor backends, dynamic shapes
included, on the GPU and on the CPU under TRITON_INTERPRET=1. On a GPU, an inference call whose
plan launches only kernels a trace can record runs `fusedmlp::mlp_launches` instead (graph_op.py:
the same front registered with `triton_op`, each launch a node of the caller's graph); `mlp()`
below and FusedMLP choose it at trace time.

Schema: `fusedmlp::mlp(Tensor x, Tensor[] params, str spec_json, str impl, str? config_json,
Tensor? residual) -> Tensor`. A custom op takes no MLPSpec or dict, so the spec and the TileConfig
travel as JSON strings (parsed once: functools.lru_cache) and the params as a list in the order of
`fusedmlp.common.param_shapes(spec)` — or of `packing.packed_names(spec)` for packed params (the
count tells them apart: a gated layer is two tensors fewer packed). `FusedMLP` (module.py) holds
these strings ready-made (built when the module is built or changed); `mlp()` below builds them
from the front's arguments. No defaults in the schema, on purpose: a traced call drops trailing
arguments left at their default, and the autograd binding then sees fewer inputs than its
backward returns gradients for (torch 2.13: "Expected the return from backward to be of the same
structure as the inputs").

Compiling on every supported torch: no dataclass instance is ever an argument of a function that
Dynamo must turn into a constant. torch 2.11's Dynamo converts the arguments of an
`assume_constant_result` function with `as_python_constant`, which cannot reconstruct a frozen
dataclass ("currently can't reconstruct arbitrary frozen dataclass instances"; torch 2.13 passes
the object through). So `mlp()` hands those functions the spec's and the config's fields
(ints, strings, bools), and FusedMLP's forward touches no dataclass at all.

Training (issue 24): a second op, `fusedmlp::mlp_train(x, params, spec_json, impl, config_json,
residual, saved) -> (y, Tensor[] kept)`, runs the saving forward (`front.training_forward`; policy
`saved`, common.config.SAVED_POLICIES) and returns what the backward needs besides x and the params
(x is an input: an output may not alias it); its `register_autograd` backward calls
`fusedmlp::mlp_backward(dy, x, kept, params, spec_json, config_json, saved, need_dx, hopper,
whole=False) -> Tensor[]` ([dx, d params in the list's order and layout]; backward.py's kernels,
or with `whole` — decided at the forward: impl fused_small, or auto resolved to it, on a spec it
takes — fused_small_backward.py's whole-MLP backward, or with `hopper` "tma" — an sm_90 GPU, impl
auto or a Hopper one, no pinned config, the 16-byte rule met — tma/backward.py's persistent TMA
GEMMs, or with `hopper` "mosaic" — impl mosaic, or auto planning a Hopper GEMM kernel, where
Mosaic GPU takes every GEMM — cross/backward.py's Mosaic GPU GEMMs; front.hopper_route decides for
both ops).
Both have fakes, so torch.compile(fullgraph=True) traces forward and backward as two opaque
nodes. `mlp()` and FusedMLP call the training op where a gradient is to be built (`train_call`:
in eager mode the same forward and backward as one torch.autograd.Function, without the ops'
dispatch), the inference op elsewhere; the inference op differentiates too, as the "inputs"
policy (it kept only x and the params).

Validation: `mlp()` checks types and param names before the op (ValueError/TypeError, the front's
messages); the op's fake runs the front's checks at trace time, so a compiled call fails with the
same message as an eager one; the real implementation is the front, whose checks run once per
call signature (cached with the plan).

Twin: none (JAX needs no registration: `jax.jit` traces `jax_impl.front.mlp` directly).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping

import torch

from fusedmlp.common import MLPSpec, TileConfig, dispatch, param_shapes
from fusedmlp.common.config import DEFAULT_SAVED
from fusedmlp.common.packing import is_packed, packed_names, packed_width
from fusedmlp.common.registry import AUTO, check_impl, get_implementation
from fusedmlp.common.validate import check_call_inputs, check_saved, check_spec, check_types

from . import backward, front, fused_small_backward
from .cross import backward as cross_backward
from .packing import unpack_params
from .tma import backward as tma_backward


# ---- spec and config as strings ------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def parse_spec(spec_json: str) -> MLPSpec:
    """MLPSpec from its JSON text (cached: the op parses the same string on every call)."""
    return MLPSpec.from_json(spec_json)


@functools.lru_cache(maxsize=256)
def parse_config(config_json: str | None) -> TileConfig | None:
    return None if config_json is None else TileConfig.from_dict(json.loads(config_json))


CONFIG_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TileConfig))


# assume_constant_result: Dynamo cannot trace json.dumps (a C encoder: a graph break), so under
# torch.compile these run once at trace time and their result is a constant of the graph. Their
# arguments are primitives, never a dataclass (see "Compiling on every supported torch").
@torch.compiler.assume_constant_result
def _spec_json(
    widths: tuple[int, ...], activation: str, bias: bool, dtype: str, fp32_precision: str
) -> str:
    return _spec_json_of(tuple(widths), activation, bias, dtype, fp32_precision)


@functools.lru_cache(maxsize=256)
def _spec_json_of(*fields: object) -> str:
    # Compact, one line: the string is a constant in every traced or exported graph that prints it.
    return json.dumps(MLPSpec(*fields).to_dict(), separators=(",", ":"))  # type: ignore[arg-type]


@torch.compiler.assume_constant_result
def _config_json(values: tuple[object, ...]) -> str:
    return _config_json_of(tuple(values))


@functools.lru_cache(maxsize=256)
def _config_json_of(values: tuple[object, ...]) -> str:
    return json.dumps(dict(zip(CONFIG_FIELDS, values, strict=True)), separators=(",", ":"))


@torch.compiler.assume_constant_result
def _param_names(spec_json: str, packed: bool) -> tuple[str, ...]:
    return names_for(spec_json, packed)


def spec_to_json(spec: MLPSpec) -> str:
    """The op's `spec_json` argument for `spec`."""
    return _spec_json(spec.widths, spec.activation, spec.bias, spec.dtype, spec.fp32_precision)


def config_to_json(config: TileConfig | None) -> str | None:
    """The op's `config_json` argument for `config` (None stays None)."""
    if config is None:
        return None
    return _config_json(tuple(getattr(config, name) for name in CONFIG_FIELDS))


@functools.lru_cache(maxsize=256)
def names_for(spec_json: str, packed: bool) -> tuple[str, ...]:
    """Param names in the op's list order: `param_shapes(spec)` (w, b, v, c per layer), or
    `packed_names(spec)` (wv|w, bc|b per layer) for packed params."""
    spec = parse_spec(spec_json)
    return tuple(packed_names(spec) if packed else param_shapes(spec))


@functools.lru_cache(maxsize=256)
def _names_of_list(spec_json: str, count: int) -> tuple[str, ...]:
    # A gated layer is two tensors fewer packed than plain, so the count says which list this is.
    packed = names_for(spec_json, True)
    plain = names_for(spec_json, False)
    names = packed if count == len(packed) and packed != plain else plain
    if count != len(names):
        raise ValueError(
            f"params: expected {len(plain)} tensors in the order {list(plain)} (or "
            f"{len(packed)} packed: {list(packed)}) for the spec {parse_spec(spec_json)}, "
            f"got {count}"
        )
    return names


def named_params(spec_json: str, params: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The op's params list as the dict the front takes (names from `_names_of_list`)."""
    return dict(zip(_names_of_list(spec_json, len(params)), params, strict=True))


def exporting() -> bool:
    """Whether torch.export is tracing. Not `torch.compiler.is_exporting()`: torch 2.11's Dynamo
    folds that call to True under every torch.compile trace (a table of tracing-state functions;
    2.13 reads the flag), which sent compiled calls down export's route on the GPU image. The
    flag it reads is read here directly, in eager code and under Dynamo alike."""
    return getattr(torch.compiler, "_is_exporting_flag", False)


# ---- the operator --------------------------------------------------------------------------------
@torch.library.custom_op("fusedmlp::mlp", mutates_args=())
def _mlp_op(
    x: torch.Tensor,
    params: list[torch.Tensor],
    spec_json: str,
    impl: str,
    config_json: str | None,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    """The registered forward (graph_op.py's op runs the same)."""
    return op_forward(x, params, spec_json, impl, config_json, residual)


def op_forward(x, params, spec_json, impl, config_json, residual) -> torch.Tensor:
    """`front.forward` with the op's arguments unpacked: the spec, the named params, the config.
    (Gradients are the registered autograd's business, never the front's, inside an op.)"""
    return front.forward(
        x,
        named_params(spec_json, params),
        parse_spec(spec_json),
        impl=impl,
        config=parse_config(config_json),
        residual=residual,
    )


@_mlp_op.register_fake
def _mlp_fake(x, params, spec_json, impl, config_json, residual):
    # The front's checks on the fake tensors' metadata: a compiled call fails at trace time with
    # the same message as an eager call. Output: [..., d_out] in the spec dtype, on x's device.
    spec = parse_spec(spec_json)
    check_impl(impl, front.STACK)
    check_call_inputs(front.ADAPTER, spec, x, named_params(spec_json, params), None, residual)
    return x.new_empty((*x.shape[:-1], spec.d_out))


# The public handle (what FusedMLP and mlp() call): the op as the dispatcher holds it.
MLP_OP = torch.ops.fusedmlp.mlp.default


# ---- training: the saving forward, the backward op, the autograd bindings ------------------------
def _preact_shapes(spec: MLPSpec, m) -> list[tuple]:
    """Shapes of the training op's residuals for "preact" (backward.forward_saving's without x):
    z_0, h_1, z_1, …, z_L; a plain identity or relu layer's z is [M, 0] (not stored: act' is 1,
    or relu's read off its output h, backward._stores_preact)."""
    shapes: list[tuple] = []
    for layer in spec.layers():
        if layer.gated:
            width = packed_width(layer.d_out)
        else:
            width = 0 if layer.activation in ("identity", "relu") else layer.d_out
        shapes.append((m, width))
        if layer.index != spec.num_layers - 1:
            shapes.append((m, layer.d_out))
    return shapes


@torch.library.custom_op("fusedmlp::mlp_train", mutates_args=())
def _mlp_train_op(
    x: torch.Tensor,
    params: list[torch.Tensor],
    spec_json: str,
    impl: str,
    config_json: str | None,
    residual: torch.Tensor | None,
    saved: str,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The training forward: (y, what the backward needs besides x and params) for `saved`."""
    return _train_forward(x, params, spec_json, impl, config_json, residual, saved)


def _train_forward(x, params, spec_json, impl, config_json, residual, saved):
    return front.training_forward(
        x,
        named_params(spec_json, params),
        parse_spec(spec_json),
        impl=impl,
        config=parse_config(config_json),
        residual=residual,
        saved=saved,
    )


@_mlp_train_op.register_fake
def _mlp_train_fake(x, params, spec_json, impl, config_json, residual, saved):
    spec = parse_spec(spec_json)
    check_impl(impl, front.STACK)
    check_saved(saved)
    check_call_inputs(front.ADAPTER, spec, x, named_params(spec_json, params), None, residual)
    m = 1
    for d in x.shape[:-1]:
        m = m * d
    kept = [x.new_empty(s) for s in _preact_shapes(spec, m)] if saved == "preact" else []
    return x.new_empty((*x.shape[:-1], spec.d_out)), kept


@torch.library.custom_op("fusedmlp::mlp_backward", mutates_args=())
def _mlp_backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    kept: list[torch.Tensor],
    params: list[torch.Tensor],
    spec_json: str,
    config_json: str | None,
    saved: str,
    need_dx: bool,
    hopper: str,
    whole: bool = False,
) -> list[torch.Tensor]:
    """[dx (an empty [0] tensor unless need_dx), d params in the list order and layout of
    `params`] from backward.mlp_backward, the Hopper step `hopper` names ("tma":
    tma/backward.py's, "mosaic": cross/backward.py's), or fused_small_backward.py's whole-MLP
    backward where `whole`."""
    kept = list(kept)  # the backward consumes its list: never the op's own argument
    return _backward_impl(
        grad_y, x, kept, params, spec_json, config_json, saved, need_dx, hopper, whole
    )


def _backward_impl(
    grad_y, x, kept, params, spec_json, config_json, saved, need_dx, hopper, whole=False
):
    """`kept` (a list) is consumed: x is put in front of it and the backward sets each entry to
    None after its last use, so the caller's list frees them too."""
    spec = parse_spec(spec_json)
    named = named_params(spec_json, params)
    m = x.numel() // spec.d_in if spec.d_in else 0
    kept.insert(0, x.reshape(m, spec.d_in))  # the residuals h_0, z_0, h_1, …
    args = (grad_y.reshape(m, spec.d_out), kept, front.kernel_params(spec, named), spec)
    if whole:  # decided at the forward (`_whole_backward`): fused_small's two-kernel backward
        grads = fused_small_backward.mlp_backward(
            *args, saved=saved, config=parse_config(config_json), need_dx=need_dx
        )
    elif hopper == "mosaic":
        # decided at the forward (`_hopper_backward`): the Mosaic GPU GEMMs (a CUDA graph records
        # their launches: cross/launcher.py)
        grads = cross_backward.mlp_backward(*args, saved=saved, need_dx=need_dx)
    elif hopper == "tma":  # decided alike: the persistent Triton TMA GEMMs
        grads = tma_backward.mlp_backward(*args, saved=saved, need_dx=need_dx)
    elif hopper:
        raise ValueError(f"hopper: expected '', 'tma' or 'mosaic', got {hopper!r}")
    else:
        grads = backward.mlp_backward(
            *args, saved=saved, config=parse_config(config_json), need_dx=need_dx
        )
    dx = grads.pop("x")
    if not is_packed(named) and spec.gated:  # the caller's params are plain: unpack W|V, b|c
        packed = set(grads)
        # Copies: an op's outputs may not alias one another (the slices of one packed gradient).
        grads = {k: v if k in packed else v.clone() for k, v in unpack_params(spec, grads).items()}
    dx = dx.reshape(x.shape) if dx is not None else x.new_empty((0,))
    return [dx, *(grads[n] for n in named)]


@_mlp_backward_op.register_fake
def _mlp_backward_fake(
    grad_y, x, kept, params, spec_json, config_json, saved, need_dx, hopper, whole=False
):
    dx = torch.empty_like(x) if need_dx else x.new_empty((0,))
    return [dx, *(torch.empty_like(p) for p in params)]


@functools.lru_cache(maxsize=256)
def _planned_of(
    impl: str, spec_json: str, m: int, device: str, config_json: str | None, gen, graph_safe=False
) -> str:
    # cached per call signature, dispatch table generation and graph safety (front.graph_safe
    # changes what auto may choose, and the forward's plan is keyed on it too): setup_context
    # runs every step
    spec = parse_spec(spec_json)
    chosen = front.plan(
        spec, (m, spec.d_in), impl=impl, device=device, config=parse_config(config_json)
    )
    return chosen.impl


def _planned(impl: str, spec_json: str, x: torch.Tensor, config_json: str | None) -> str:
    """The impl this call's forward plan runs: `impl` itself, or what `auto` resolves to."""
    if impl != AUTO:
        return impl
    spec = parse_spec(spec_json)
    m = x.numel() // spec.d_in if spec.d_in else 0
    if not isinstance(m, int):  # a symbolic size (torch.export, dynamic shapes): not cached
        return _planned_of.__wrapped__(impl, spec_json, m, x.device.type, config_json, 0)
    graph_safe = front._graph_safe()
    return _planned_of(
        impl, spec_json, m, x.device.type, config_json, dispatch.generation(), graph_safe
    )


def _whole_backward(impl: str, spec_json: str, x: torch.Tensor, config_json: str | None) -> bool:
    """Whether this call trains through fused_small_backward.py (impl fused_small, or auto
    resolved to it, on a spec it takes): front.training_forward decides alike. It comes before
    the Hopper backward."""
    return fused_small_backward.applies(
        _planned(impl, spec_json, x, config_json), parse_spec(spec_json)
    )


def _hopper_backward(impl: str, spec_json: str, x: torch.Tensor, config_json: str | None) -> str:
    """Which Hopper step this call's backward runs (front.hopper_route: "mosaic", "tma" or ""
    for the portable kernels; a pinned config keeps the portable kernels it was written for)."""
    spec = parse_spec(spec_json)
    m = x.numel() // spec.d_in if spec.d_in else 0
    planned = _planned(impl, spec_json, x, config_json)
    return front.hopper_route(impl, planned, spec, m, x.device, parse_config(config_json))


def _train_setup_context(ctx, inputs, output):
    x, params, spec_json, impl, config_json, residual, saved = inputs
    ctx.whole = _whole_backward(impl, spec_json, x, config_json)
    ctx.hopper = "" if ctx.whole else _hopper_backward(impl, spec_json, x, config_json)
    # The kept tensors are outputs nobody differentiates: no zero-filled gradients for them
    # (measured on the H200: three fills, 46 µs at hf-blog and 209 µs at llama3-8b a step).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, *params, *output[1])
    ctx.n_params = len(params)
    ctx.strings = (spec_json, config_json, saved)
    ctx.has_residual = residual is not None


def _train_backward(ctx, grad_y, _grad_kept):
    x, *rest = ctx.saved_tensors
    params, kept = rest[: ctx.n_params], rest[ctx.n_params :]
    spec_json, config_json, saved = ctx.strings
    need_dx = ctx.needs_input_grad[0]
    grads = _mlp_backward_op(
        grad_y, x, list(kept), list(params), spec_json, config_json, saved, need_dx, ctx.hopper,
        ctx.whole,
    )  # fmt: skip
    # d(y + residual)/d(residual) is the identity: exact, so it needs no kernel.
    grad_residual = grad_y if ctx.has_residual else None
    dx = grads[0] if need_dx else None
    return dx, list(grads[1:]), None, None, None, grad_residual, None


_mlp_train_op.register_autograd(_train_backward, setup_context=_train_setup_context)

MLP_TRAIN_OP = torch.ops.fusedmlp.mlp_train.default


# Eager training without the registered ops' dispatch. Where no compiler traces the call, the same
# forward and backward run as one torch.autograd.Function: the ops' Python dispatch and
# torch.library's autograd wrapper cost ~2 ms of host time per step on the H200 (torch 2.11,
# hf-blog-geglu: 2.9 ms to issue a step whose kernels take 0.93 ms; bench/step_profile.py), more
# than the whole step's kernels at small sizes. Same functions, same results; the ops stay what a
# trace records (torch.compile, torch.export), where the dispatch is paid once at trace time.
class _EagerTrain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec_json, impl, config_json, residual, saved, *params):
        y, kept = _train_forward(x, list(params), spec_json, impl, config_json, residual, saved)
        ctx.save_for_backward(x, *params)
        # The kept tensors (made here, neither inputs nor outputs) ride on ctx, not in
        # save_for_backward, so that the backward can drop each one after its last use: with
        # saved tensors every residual lives until the backward returns (llama3-8b "preact"
        # peaked at 1.66× eager's memory).
        ctx.kept = kept
        ctx.n_params = len(params)
        ctx.strings = (spec_json, config_json, saved)
        ctx.has_residual = residual is not None
        ctx.whole = _whole_backward(impl, spec_json, x, config_json)
        ctx.hopper = "" if ctx.whole else _hopper_backward(impl, spec_json, x, config_json)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, *params = ctx.saved_tensors
        if ctx.kept is None:
            raise RuntimeError(
                "FusedMLP's training backward ran twice on one graph (retain_graph=True): its "
                "residuals are freed as the first backward reads them; run the forward again"
            )
        kept, ctx.kept = ctx.kept, None  # handed over: mlp_backward frees each after its last use
        spec_json, config_json, saved = ctx.strings
        need_dx = ctx.needs_input_grad[0]
        grads = _backward_impl(
            grad_y, x, kept, params, spec_json, config_json, saved, need_dx, ctx.hopper, ctx.whole
        )
        grad_residual = grad_y if ctx.has_residual else None
        dx = grads[0] if need_dx else None
        return dx, None, None, None, grad_residual, None, *grads[1:]


def train_call(
    x: torch.Tensor,
    params: list[torch.Tensor],
    spec_json: str,
    impl: str,
    config_json: str | None,
    residual: torch.Tensor | None,
    saved: str,
) -> torch.Tensor:
    """y of the training op: `fusedmlp::mlp_train` under a trace, `_EagerTrain` in eager mode."""
    if torch.compiler.is_compiling():
        return MLP_TRAIN_OP(x, params, spec_json, impl, config_json, residual, saved)[0]
    return _EagerTrain.apply(x, spec_json, impl, config_json, residual, saved, *params)


# The inference op differentiates too (a caller of torch.ops.fusedmlp.mlp in grad mode): it kept
# only x and the params, so its backward is the "inputs" policy's (the forward recomputed).
def _setup_context(ctx, inputs, output):
    x, params = inputs[0], inputs[1]
    ctx.save_for_backward(x, *params)
    ctx.strings = (inputs[2], inputs[4])
    ctx.has_residual = inputs[5] is not None
    ctx.whole = _whole_backward(inputs[3], inputs[2], x, inputs[4])
    ctx.hopper = "" if ctx.whole else _hopper_backward(inputs[3], inputs[2], x, inputs[4])


def _backward(ctx, grad_y):
    x, *params = ctx.saved_tensors
    spec_json, config_json = ctx.strings
    need_dx = ctx.needs_input_grad[0]
    grads = _mlp_backward_op(
        grad_y, x, [], list(params), spec_json, config_json, "inputs", need_dx, ctx.hopper,
        ctx.whole,
    )  # fmt: skip
    grad_residual = grad_y if ctx.has_residual else None
    return grads[0] if need_dx else None, list(grads[1:]), None, None, None, grad_residual


_mlp_op.register_autograd(_backward, setup_context=_setup_context)


# ---- public function -----------------------------------------------------------------------------
def mlp(
    x: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    spec: MLPSpec,
    *,
    impl: str = AUTO,
    config: TileConfig | None = None,
    residual: torch.Tensor | None = None,
    saved: str = DEFAULT_SAVED,
) -> torch.Tensor:
    """`fusedmlp.torch_impl.mlp` through the registered op: the same arguments (params plain or
    packed), the same result, one node under torch.compile. Computes in the spec dtype (autocast
    is FusedMLP's business). Where a gradient is to be built it calls the training op
    (`fusedmlp::mlp_train`, policy `saved`); a baseline impl differentiates through torch
    autograd (the front's eager call, not one op)."""
    spec = check_spec(spec)
    check_impl(impl, front.STACK)
    check_saved(saved)
    check_types(front.ADAPTER, x, params, config, residual)
    spec_json = spec_to_json(spec)
    names = _param_names(spec_json, is_packed(params))
    if len(params) != len(names) or any(n not in params for n in names):
        # The front's message (common/validate.py), before the names are lost in a list.
        check_call_inputs(front.ADAPTER, spec, x, params)
    listed = [params[n] for n in names]
    config_json = config_to_json(config)
    if front.needs_grad(x, params, residual):
        baseline = impl if impl != AUTO and get_implementation(impl).baseline else None
        if impl == AUTO and config is None and not torch.compiler.is_compiling():
            trained = front.training_choice(spec, math.prod(x.shape[:-1]), x.device.type)
            baseline = trained[0] if trained is not None else None
        if baseline is not None:  # torch autograd through the baseline's ops
            return front.forward(x, params, spec, impl=baseline, config=config, residual=residual)
        return train_call(x, listed, spec_json, impl, config_json, residual, saved)
    # Under torch.compile, our launches as graph nodes (graph_op.py) where the params are in the
    # kernels' layout already: plain gated params would be packed inside the traced body, i.e.
    # copied on every call of the graph (the op packs them once per set of tensors).
    if torch.compiler.is_compiling() and not front.converts_params(spec, params):
        from . import graph_op  # graph_op imports this module

        if graph_op.takes_call(x, spec_json, impl, config_json, residual):
            return graph_op.MLP_LAUNCHES_OP(x, listed, spec_json, impl, config_json, residual)
    return MLP_OP(x, listed, spec_json, impl, config_json, residual)
