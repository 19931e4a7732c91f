"""The fused MLP as one PyTorch operator, `torch.ops.fusedmlp.mlp`, so torch.compile sees one node.

    y = MLP(x; params, spec) (+ residual)        computed by `fusedmlp.torch_impl.front.mlp`

Why a custom op: Dynamo cannot trace into a Triton launch under the interpreter, and `triton_op`
+ `wrap_triton` runs the kernel on fake tensors there (TOOLCHAIN.md), so the forward is registered
with `torch.library.custom_op` and a fake (meta) implementation that gives the output's shape and
dtype without running anything. `torch.compile(model, fullgraph=True)` then keeps the whole MLP as
one opaque node: no graph break, with the eager, aot_eager and inductor backends, dynamic shapes
included, on the GPU and on the CPU under TRITON_INTERPRET=1.

Schema: `fusedmlp::mlp(Tensor x, Tensor[] params, str spec_json, str impl, str? config_json,
Tensor? residual) -> Tensor`. A custom op takes no MLPSpec or dict, so the spec and the TileConfig
travel as JSON strings (parsed once: functools.lru_cache) and the params as a list in
`fusedmlp.common.param_shapes(spec)` order; `mlp()` below takes the front's arguments and builds
these, and `FusedMLP` (module.py) calls the op. No defaults in the schema, on purpose: a traced
call drops trailing arguments left at their default, and the autograd binding then sees fewer
inputs than its backward returns gradients for (torch 2.13: "Expected the return from backward to
be of the same structure as the inputs").

Backward: the kernels are forward-only in this issue. The op registers an autograd formula whose
backward is a second op, `fusedmlp::mlp_backward`, that raises NotImplementedError when it runs. So
inference in grad mode works (eager and compiled: the backward graph traces, as fakes), and the
error comes where the gradient is actually needed, `loss.backward()`, as PyTorch does for its own
ops without a derivative; nothing is ever silently zero. Training support is the next issue.

Validation: `mlp()` checks types and param names before the op (ValueError/TypeError, the front's
messages); the op's fake runs the front's shape/dtype checks at trace time, so a compiled call
fails with the same message as an eager one; the real implementation is the front, which checks
everything again before any launch.

Twin: none (JAX needs no registration: `jax.jit` traces `jax_impl.front.mlp` directly).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping

import torch

from fusedmlp.common import MLPSpec, TileConfig, param_shapes
from fusedmlp.common.registry import AUTO, check_impl
from fusedmlp.common.validate import ArrayInfo, check_call, check_spec, check_types

from . import front

BACKWARD_MESSAGE = (
    "fusedmlp::mlp: backward is not implemented yet (the kernels are forward-only; training "
    "support is the next issue). Run inference under torch.no_grad() or torch.inference_mode(), "
    "or keep the original module for training."
)


# ---- spec and config as strings ------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def parse_spec(spec_json: str) -> MLPSpec:
    """MLPSpec from its JSON text (cached: the op parses the same string on every call)."""
    return MLPSpec.from_json(spec_json)


@functools.lru_cache(maxsize=256)
def parse_config(config_json: str | None) -> TileConfig | None:
    return None if config_json is None else TileConfig.from_dict(json.loads(config_json))


# assume_constant_result: Dynamo cannot trace json.dumps (a C encoder: a graph break), so under
# torch.compile these run once at trace time and their result is baked into the graph as a constant.
@torch.compiler.assume_constant_result
def spec_to_json(spec: MLPSpec) -> str:
    """The op's `spec_json` argument for `spec` (cached)."""
    return _spec_json(spec)


@functools.lru_cache(maxsize=256)
def _spec_json(spec: MLPSpec) -> str:
    # Compact, one line: the string is a constant in every traced or exported graph that prints it.
    return json.dumps(spec.to_dict(), separators=(",", ":"))


@torch.compiler.assume_constant_result
def config_to_json(config: TileConfig | None) -> str | None:
    """The op's `config_json` argument for `config` (None stays None)."""
    return None if config is None else json.dumps(config.to_dict(), separators=(",", ":"))


@torch.compiler.assume_constant_result
def param_names(spec: MLPSpec) -> tuple[str, ...]:
    """Param names in the op's list order: `param_shapes(spec)` order (w, b, v, c per layer)."""
    return _param_names(spec)


@functools.lru_cache(maxsize=256)
def _param_names(spec: MLPSpec) -> tuple[str, ...]:
    return tuple(param_shapes(spec))


# ---- the operator --------------------------------------------------------------------------------
def _info(t: torch.Tensor) -> ArrayInfo:
    return ArrayInfo(tuple(t.shape), str(t.dtype).removeprefix("torch."), str(t.device))


def _named(spec: MLPSpec, params: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    names = _param_names(spec)
    if len(params) != len(names):
        raise ValueError(
            f"params: expected {len(names)} tensors in the order {list(names)} for the spec "
            f"{spec}, got {len(params)}"
        )
    return dict(zip(names, params, strict=True))


@torch.library.custom_op("fusedmlp::mlp", mutates_args=())
def _mlp_op(
    x: torch.Tensor,
    params: list[torch.Tensor],
    spec_json: str,
    impl: str,
    config_json: str | None,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    """The registered forward: `front.mlp` with the spec, params and config unpacked."""
    spec = parse_spec(spec_json)
    return front.mlp(
        x,
        _named(spec, params),
        spec,
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
    named = _named(spec, params)
    check_call(
        spec,
        _info(x),
        {k: _info(v) for k, v in named.items()},
        _info(residual) if residual is not None else None,
    )
    return x.new_empty((*x.shape[:-1], spec.d_out))


# The public handle (what FusedMLP and mlp() call): the op as the dispatcher holds it.
MLP_OP = torch.ops.fusedmlp.mlp.default


# ---- autodiff binding: forward-only, a loud backward ---------------------------------------------
@torch.library.custom_op("fusedmlp::mlp_backward", mutates_args=())
def _mlp_backward_op(
    grad_y: torch.Tensor, x: torch.Tensor, params: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Stands where the backward kernels will go; raises when the engine runs it."""
    raise NotImplementedError(BACKWARD_MESSAGE)


@_mlp_backward_op.register_fake
def _mlp_backward_fake(grad_y, x, params):
    # Gradients' shapes, so that AOTAutograd can trace the joint graph in grad mode; the op is kept
    # in the backward graph because its outputs are the gradients the engine asks for.
    return [torch.empty_like(x), *(torch.empty_like(p) for p in params)]


def _setup_context(ctx, inputs, output):
    x, params = inputs[0], inputs[1]
    ctx.save_for_backward(x, *params)
    ctx.has_residual = inputs[5] is not None


def _backward(ctx, grad_y):
    x, *params = ctx.saved_tensors
    grads = _mlp_backward_op(grad_y, x, list(params))
    # d(y + residual)/d(residual) is the identity: exact, so it needs no kernel.
    grad_residual = grad_y if ctx.has_residual else None
    return grads[0], list(grads[1:]), None, None, None, grad_residual


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
) -> torch.Tensor:
    """`fusedmlp.torch_impl.mlp` through the registered op: the same arguments, the same result,
    one node under torch.compile. Computes in the spec dtype (autocast is FusedMLP's business)."""
    spec = check_spec(spec)
    check_impl(impl, front.STACK)
    check_types(front.ADAPTER, x, params, config, residual)
    names = param_names(spec)
    missing = [n for n in names if n not in params]
    extra = sorted(n for n in params if n not in names)
    if missing or extra:
        # The front's message (common/validate.py), before the names are lost in a list.
        check_call(spec, _info(x), {k: _info(v) for k, v in params.items()})
    return MLP_OP(
        x,
        [params[n] for n in names],
        spec_to_json(spec),
        impl,
        config_to_json(config),
        residual,
    )
