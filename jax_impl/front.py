"""The JAX front: `mlp()` runs the fused MLP, `plan()` says which kernels would run and how.

    mlp(x, params, spec) -> validate (common/validate.py) -> plan (the registry's entry) -> launch

Twin: torch_impl/front.py (the same sections, checks and messages). Everything an implementation
needs is its entry in `fusedmlp.common.registry`; this file reads that one table and holds no
other. Validation and the plan are computed once per call signature (spec, impl, config and the
shape/dtype of every array) and cached with one jitted runner (spec and plan bound), so `mlp` is
also callable inside the caller's own `jax.jit`.

Params may come in the contract's names or packed (`fusedmlp.jax_impl.packing.pack_params`); plain
params are packed for our kernels inside the jitted runner, i.e. on every call of an eager caller
and once per trace of a jitted one — a copy of every gated weight each time it runs. Callers that
run `mlp` in a loop pack once, outside. The `xla` baseline reads either layout as given (its
registry layout is "any").

`auto`, on a GPU with a committed dispatch table (common/dispatch/<gpu>.json, derived by
`fusedmlp bench --derive-auto` from a benchmark run on that GPU), runs what was measured fastest
for the stack, dtype, shape class and M — a baseline where none of our kernels won, so `auto`
never loses to the unfused code — and the plan quotes the measurement. Elsewhere, in order:
  1. `fused_small` — every width ≤ 128: the whole narrow MLP in one kernel;
  2. `fused_decode` — a 2-layer MLP at decode batch sizes (M ≤ 64): one launch, the weights
     streamed once;
  3. `pallas_mosaic` on Hopper for 16-bit dtypes (Mosaic GPU is where Pallas on NVIDIA is going);
  4. `pallas_triton`, the line-for-line twin of the Triton kernels, everywhere else (and on the CPU,
     interpreted). The Pallas Triton backend is deprecated upstream from jax 0.11; its warning is
     filtered by the launchers, where the twin is used on purpose.

Training: `mlp` is differentiable (`jax.grad`, `value_and_grad`, under `jit` and `vmap`). Every
implementation but the `xla` baseline (which JAX differentiates itself) is wrapped in one
`jax.custom_vjp` whose backward is `backward.mlp_backward`, the portable Pallas-Triton kernels
(fused_small, and auto resolved to it: fused_small_backward.py's saving forward and whole-MLP
backward, as torch's training op chooses; `auto` and `pallas_mosaic` on a Hopper GPU:
mosaic/backward.py's saving forward and GEMMs, as torch's tma/backward.py — `_train_kernels`).
`saved=` picks what the differentiated forward keeps (common/config.py's SAVED_POLICIES):
"preact" (the default) runs the saving forward of those kernels (`backward.forward_saving`, or
mosaic/backward.py's on Hopper), whatever `impl` was asked for; "inputs" runs the asked `impl` and
keeps x only, the backward running the saving forward again. A call that is not differentiated
runs the asked `impl` exactly as before. `plan(..., saved=...)` reports the policy and its bytes.
The torch twin of this wiring is torch_impl/custom_op.py (`register_autograd`).
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from fusedmlp.common import KernelLaunch, MLPSpec, Plan, TileConfig, dispatch
from fusedmlp.common.config import DEFAULT_SAVED
from fusedmlp.common.cost import saved_bytes
from fusedmlp.common.packing import is_packed
from fusedmlp.common.registry import (
    AUTO,
    FALLBACK,
    Implementation,
    check_impl,
    get_implementation,
    impl_names,
)
from fusedmlp.common.tiling import padded_width, small_wgrad_on_chip
from fusedmlp.common.tuning import tables_state
from fusedmlp.common.validate import (
    Adapter,
    ArrayInfo,
    check_call_inputs,
    check_config,
    check_saved,
    check_spec,
)

from . import compat
from .packing import pack_params, unpack_params

STACK = "jax"


# ---- the stack's adapter for the check layer -----------------------------------------------------
def _describe(a: jax.Array) -> ArrayInfo:
    # twin-diff: no per-array device check; jax places arrays itself (and tracers have no device).
    return ArrayInfo(tuple(a.shape), np.dtype(a.dtype).name)


ADAPTER = Adapter(STACK, "jax.Array", lambda a: isinstance(a, jax.Array), _describe)


# ---- the registry's entries, imported once -------------------------------------------------------
@functools.cache
def _entry(impl: str) -> Implementation:
    return get_implementation(impl)


@functools.cache
def _function(impl: str, field: str) -> Callable[..., Any]:
    """The entry's `config` or `supports` function on this stack."""
    module, name = _entry(impl).function(field, STACK)  # type: ignore[misc]
    return getattr(importlib.import_module(module), name)


@functools.cache
def _launcher(impl: str, family: str) -> Callable[..., Any]:
    """The function a launch calls: `<family>_fwd` of a per-layer package's family module, a
    whole-MLP module's `<name>_fwd`, or a baseline's `module:function`."""
    entry = _entry(impl)
    if entry.runner == "baseline":
        module, _, name = entry.launcher.partition(":")
        return getattr(importlib.import_module(module), name)
    if entry.runner == "whole":
        return getattr(importlib.import_module(entry.module(STACK)), f"{impl}_fwd")
    return getattr(importlib.import_module(f"{entry.module(STACK)}.{family}"), f"{family}_fwd")


# ---- where an implementation can run (device facts read once) ----------------------------------
@functools.cache
def _is_hopper() -> bool:
    return compat.on_hopper()


def unavailable_reason(impl: str, device: str = "cpu") -> str | None:
    """None if `impl` can run on `device` ("cpu" or "cuda"/"gpu") here, interpreted or not."""
    check_impl(impl, STACK)
    on_gpu_device = device in ("cuda", "gpu")
    if on_gpu_device and not compat.on_gpu():
        return "no GPU visible to jax on this machine"
    if impl == AUTO or _entry(impl).baseline:
        return None
    entry = _entry(impl)
    if entry.gpu_only and not on_gpu_device:
        gpu = "a Hopper GPU" if entry.hopper else "a GPU"
        return f"{impl} runs GPU kernels only: it needs {gpu} (no interpreter)"
    if entry.hopper and on_gpu_device and not _is_hopper():
        return f"{impl} needs a Hopper GPU (TMA, wgmma)"
    return None


def is_interpreted(impl: str, device: str = "cpu") -> bool:
    """True where `impl` runs its kernels under a Pallas interpreter (not timed by the harness)."""
    if impl == AUTO:
        return False
    entry = _entry(impl)
    return not entry.baseline and not entry.gpu_only and device == "cpu"


def _interpret(entry: Implementation) -> bool:
    return compat.interpret_mode() and not entry.gpu_only


# ---- plan ----------------------------------------------------------------------------------------
@functools.cache
def _gpu_name() -> str:
    return jax.devices("gpu")[0].device_kind


def _can_take(impl: str, spec: MLPSpec, m: int, device: str) -> bool:
    """Whether `impl` runs here and takes this problem (what a measured choice must pass)."""
    entry = _entry(impl)
    if unavailable_reason(impl, device) is not None:
        return False
    if entry.runner == "whole":
        return _function(impl, "supports")(spec, m) is None
    if entry.runner == "per_layer" and entry.supports and entry.on_unsupported == "refuse":
        supports = _function(impl, "supports")
        return all(supports(m, lay.d_out, lay.d_in, spec.dtype) is None for lay in spec.layers())
    return True


def _table(device: str) -> dispatch.Table | None:
    """The committed dispatch table of this GPU (common/dispatch.py); None off a GPU or where none
    is committed."""
    if device not in ("cuda", "gpu") or not compat.on_gpu():
        return None
    return dispatch.load_table(_gpu_name())


def _measured_choice(spec: MLPSpec, m: int, device: str) -> tuple[str, str] | None:
    """The committed dispatch table's choice for this GPU (common/dispatch.py), if it has one."""
    table = _table(device)
    if table is None:
        return None
    # the nearest measured point's fastest implementation that can take this call
    found = table.lookup(STACK, spec, m, accept=lambda impl: _can_take(impl, spec, m, device))
    if found is None:
        return None
    return found.impl, f"auto: measured on {table.gpu}: {found.evidence}"


def training_choice(spec: MLPSpec, m: int, device: str) -> tuple[str, str] | None:
    """(baseline, evidence) where `auto` trains through a baseline (jax autodiff of its
    jax.numpy) because a training point of the dispatch table measured it faster than our
    training path within dispatch.TRAIN_REACH of this call; None where `auto` trains with our
    kernels. The forward of a call that is not differentiated keeps the forward's choice."""
    can_take = functools.partial(_can_take, spec=spec, m=m, device=device)
    return dispatch.training_baseline(_table(device), STACK, spec, m, can_take)


def _resolve_auto(spec: MLPSpec, m: int, device: str) -> tuple[str, str]:
    measured = _measured_choice(spec, m, device)
    if measured is not None:
        return measured
    for name in ("fused_small", "fused_decode"):
        if _function(name, "supports")(spec, m) is None:
            return name, f"auto: {_entry(name).description}"
    if spec.dtype == "float32" and device in ("cuda", "gpu"):
        return dispatch.FLOAT32_BASELINE[STACK], f"auto: {dispatch.FLOAT32_UNMEASURED}"
    if device in ("cuda", "gpu") and _is_hopper():
        supports = _function("pallas_mosaic", "supports")
        reasons = [supports(m, l.d_out, l.d_in, spec.dtype) for l in spec.layers()]
        if all(r is None for r in reasons):
            return "pallas_mosaic", "auto: Hopper GPU"
        return FALLBACK[STACK], f"auto: Hopper GPU, but {next(r for r in reasons if r)}"
    return FALLBACK[STACK], "auto: portable kernels"


def _layer_launch(spec, layer, impl, m, config, residual) -> KernelLaunch:
    entry = _entry(impl)
    family = "gated" if layer.gated else "linear_act"
    cfg = check_config(config, impl) or _function(impl, "config")(
        family, m, layer.d_out, layer.d_in, spec.dtype, interpret=_interpret(entry),
        **dict(entry.config_options),
    )  # fmt: skip
    # twin-diff: no `tune` (the torch front's GPU sweep of the Triton kernels has no JAX twin yet).
    return KernelLaunch(
        family, impl, m, layer.d_out, layer.d_in, layer.activation, cfg,
        residual=residual and layer.index == spec.num_layers - 1, layer=layer.index,
    )  # fmt: skip


def plan(
    spec: MLPSpec,
    x_shape: tuple[int, ...],
    *,
    impl: str = AUTO,
    device: str = "cpu",
    config: TileConfig | None = None,
    residual: bool = False,
    saved: str | None = None,
) -> Plan:
    """Which kernels `mlp` would launch for an input of `x_shape`, with their configs.

    Raises NotImplementedError when an explicitly requested `impl` cannot take this spec (the
    message names the constraint, the value and the fallback); `auto` never does. `saved` (a
    training policy, common/config.py's SAVED_POLICIES): the plan of a TRAINING call — its reason
    names the policy, the bytes it keeps for the backward (`cost.saved_bytes`) and which kernels
    train (None: the inference plan only).
    """
    if saved is not None:
        m = math.prod(tuple(x_shape)[:-1])
        trained = training_choice(spec, m, device) if impl == AUTO and config is None else None
        if trained is not None:  # a training point: a baseline trains faster here
            base = plan(spec, x_shape, impl=trained[0], device=device, residual=residual)
            note = f"training: {trained[0]} differentiates through jax autodiff"
            return Plan(trained[0], impl, base.launches, f"{trained[1]}; {note}")
        the_plan = plan(
            spec, x_shape, impl=impl, device=device, config=config, residual=residual
        )  # fmt: skip
        return _training_plan(spec, the_plan, m, check_saved(saved), config)
    spec = check_spec(spec)
    check_impl(impl, STACK)
    check_config(config)
    m = math.prod(tuple(x_shape)[:-1])
    chosen, reason = (impl, "") if impl != AUTO else _resolve_auto(spec, m, device)
    entry = _entry(chosen)
    if entry.runner == "baseline":
        launch = KernelLaunch(chosen, chosen, m, spec.d_out, spec.d_in, spec.activation)
        return Plan(chosen, impl, (launch,), "; ".join(r for r in (reason, entry.description) if r))
    if entry.runner == "whole":
        unsupported = _function(chosen, "supports")(spec, m)
        if unsupported is not None:
            raise NotImplementedError(unsupported)
        cfg = check_config(config, chosen) or _function(chosen, "config")(
            spec, m, interpret=_interpret(entry)
        )
        if chosen == "fused_small" and _sibling_runs(spec, config, _interpret(entry)):
            from .mosaic import fused_small as sibling

            cfg = sibling.default_config(spec, m, interpret=_interpret(entry))
            weights = "a weight ring" if cfg.weight_slots else "weights resident"
            note = (
                "its Mosaic GPU sibling runs here (jax_impl/mosaic/fused_small.py: "
                f"{padded_width(max(spec.widths))} wide, {weights})"
            )
            reason = "; ".join(r for r in (reason, note) if r)
        launch = KernelLaunch(chosen, chosen, m, spec.d_out, spec.d_in, spec.activation, cfg)
        return Plan(chosen, impl, (launch,), reason)
    launches, fallbacks = [], []
    for layer in spec.layers():
        layer_impl = chosen
        if entry.supports:
            why = _function(chosen, "supports")(m, layer.d_out, layer.d_in, spec.dtype)
            if why is not None and entry.on_unsupported == "refuse":
                raise NotImplementedError(why)
            if why is not None:  # this layer runs the portable kernel; the plan says why
                layer_impl = FALLBACK[STACK]
                fallbacks.append(f"layer {layer.index}: {why}")
        launches.append(_layer_launch(spec, layer, layer_impl, m, config, residual))
    return Plan(chosen, impl, tuple(launches), "; ".join(r for r in (reason, *fallbacks) if r))


def _sibling_runs(spec: MLPSpec, config: TileConfig | None, interpret: bool) -> bool:
    # twin-diff: where the torch twin takes tensor descriptors inside the same kernel, this stack
    # runs a sibling kernel (fused_small._takes_mosaic_sibling); the plan names it and its tiles
    from . import fused_small

    return fused_small._takes_mosaic_sibling(spec, config, interpret)


def _whole_backward_kernels(spec: MLPSpec) -> str:
    # twin of torch_impl/front.py's: which of fused_small's backwards runs (the rule's choice)
    if small_wgrad_on_chip(spec):
        return "fused_small's kernel A with every dW on chip (no dZ in memory) and a sum kernel"
    return "fused_small's whole-MLP kernels A and B"


def _training_plan(
    spec: MLPSpec, the_plan: Plan, m: int, saved: str, config: TileConfig | None
) -> Plan:
    from . import fused_small_backward

    mib = saved_bytes(spec, m, saved) / 2**20
    whole = fused_small_backward.applies(the_plan.impl, spec)
    hopper = not whole and _train_kernels(the_plan.requested, the_plan.impl, spec, m) == "hopper"
    if not whole and not hopper and not _entry(the_plan.impl).baseline:
        check_config(config, FALLBACK[STACK], training=True)  # as the custom_vjp refuses it
    if _entry(the_plan.impl).baseline:
        note = f"training: {the_plan.impl} differentiates through jax autodiff"
    elif whole:
        note = (
            f"training: saved={saved!r} keeps {mib:.1f} MiB; the saving forward is one "
            f"fused_small kernel, the backward {_whole_backward_kernels(spec)} "
            "(jax_impl/fused_small_backward.py)"
        )
    elif hopper:
        note = (
            f"training: saved={saved!r} keeps {mib:.1f} MiB; the saving forward, weight and input "
            "gradients run on the Mosaic GPU kernels (jax_impl/mosaic/backward.py: hᵀ and Wᵀ "
            "read in place, the act' step in the input gradient's epilogue)"
        )
    elif saved == "preact":
        note = (
            f"training: saved='preact' keeps {mib:.1f} MiB (every layer's input and "
            "pre-activation, none for identity or relu layers); the saving forward runs the "
            "portable pallas_triton kernels; "
            "backward: portable dgrad/wgrad kernels (jax_impl/backward.py)"
        )
    else:
        note = (
            f"training: saved='inputs' keeps {mib:.1f} MiB (x); the backward recomputes the "
            "forward with the portable saving kernels, then the portable dgrad/wgrad kernels"
        )
    reason = "; ".join(r for r in (the_plan.reason, note) if r)
    return Plan(the_plan.impl, the_plan.requested, the_plan.launches, reason)


# ---- params in the layout the kernels take -------------------------------------------------------
def _layouts(the_plan: Plan) -> frozenset[str]:
    """The params layouts the launches read: "packed" (our kernels), "any" (the baseline)."""
    return frozenset(_entry(k.impl).layout for k in the_plan.launches)


def _with_layouts(spec: MLPSpec, params: Mapping[str, jax.Array], layouts: frozenset[str]):
    """`params` with every name the launches read (traced: a copy per run, see the docstring)."""
    if "packed" in layouts and not is_packed(params):
        return {**params, **pack_params(spec, params)}
    return dict(params)


# ---- runners: 2-D input, params in the kernels' layout, a plan -> 2-D output --------------------
def _run_per_layer(x2d, params, spec, the_plan, residual2d):
    h = x2d
    precision = spec.fp32_precision
    for launch in the_plan.launches:
        i = launch.layer
        fwd = _launcher(launch.impl, launch.family)
        if launch.family == "gated":  # one GEMM over the packed operand (common/packing.py)
            h = fwd(
                h, params[f"wv{i}"], params.get(f"bc{i}"), n=launch.n,
                activation=launch.activation, config=launch.config, fp32_precision=precision,
            )  # fmt: skip
        else:
            h = fwd(
                h, params[f"w{i}"], params.get(f"b{i}"), residual2d if launch.residual else None,
                activation=launch.activation, config=launch.config, fp32_precision=precision,
            )  # fmt: skip
    return h


def _run_whole(x2d, params, spec, the_plan, residual2d):
    launch = the_plan.launches[0]
    y = _launcher(launch.impl, launch.family)(x2d, params, spec, config=launch.config)
    return y + residual2d if residual2d is not None else y


def _run_baseline(x2d, params, spec, the_plan, residual2d):
    launch = the_plan.launches[0]
    return _launcher(launch.impl, launch.family)(x2d, params, spec, residual2d)


_RUNNER_OF_KIND = {"per_layer": _run_per_layer, "whole": _run_whole, "baseline": _run_baseline}
_RUNNERS: dict[str, Callable] = {
    name: _RUNNER_OF_KIND[_entry(name).runner] for name in impl_names(STACK)
}


# ---- validate and plan, once per call signature --------------------------------------------------
@dataclass(frozen=True)
class _Prepared:
    plan: Plan
    lead: tuple[int, ...]
    m: int
    run: Callable[..., jax.Array]  # jitted (x2d, params, residual2d) -> y2d, spec and plan bound
    train: Callable[..., jax.Array]  # `run` with the custom_vjp of the portable backward


_PREPARED: dict[tuple, _Prepared] = {}
_PREPARED_MAX = 4096  # distinct call signatures kept (a dynamic-shape server stays bounded)


def _signature(a: Any) -> tuple:
    return (type(a), a.shape, a.dtype)


def _jitted_runner(spec: MLPSpec, the_plan: Plan) -> Callable[..., jax.Array]:
    # twin-diff: torch runs eagerly; here the whole runner is one jitted computation (spec and plan
    # bound), so the Pallas kernels and the glue between them compile together.
    runner, layouts = _RUNNERS[the_plan.impl], _layouts(the_plan)

    def run(x2d, params, residual2d):
        return runner(x2d, _with_layouts(spec, params, layouts), spec, the_plan, residual2d)

    run.__name__ = f"fusedmlp_{the_plan.impl}"
    return jax.jit(run)


# ---- autodiff binding: jax.custom_vjp over the runner, the backward kernels ---------------------
# Which kernels train (`_trainable`): the portable per-layer ones (backward.py), fused_small's
# whole-MLP ones (fused_small_backward.py) or the Mosaic GPU GEMMs on Hopper (mosaic/backward.py).
TRAIN_KERNELS = ("portable", "whole", "hopper")


@functools.cache
def _saving_forward(
    spec: MLPSpec, config: TileConfig | None, kernels: str = "portable"
) -> Callable[..., Any]:
    """The jitted "preact" training forward (x2d, packed params, residual2d) -> (y2d, kept), one
    per (spec, config, kernels): every implementation's custom_vjp shares its compilation.
    Every `kernels` keeps the same residuals (backward.py's layout)."""
    from . import backward, fused_small_backward

    def forward(x2d, params, residual2d):
        if kernels == "whole":
            y2d, kept = fused_small_backward.forward_saving(x2d, params, spec, config=config)
            return (y2d + residual2d if residual2d is not None else y2d), kept
        if kernels == "hopper":
            from .mosaic import backward as hopper

            return hopper.forward_saving(x2d, params, spec, saved="preact", residual=residual2d)
        return backward.forward_saving(
            x2d, params, spec, saved="preact", config=config, residual=residual2d
        )

    return jax.jit(forward)


@functools.cache
def _backward_pass(
    spec: MLPSpec,
    saved: str,
    config: TileConfig | None,
    kernels: str = "portable",
    overwrite_z: bool = False,
) -> Callable[..., Any]:
    """The jitted backward (dy2d, kept, packed params) -> gradients, per (spec, saved, config,
    kernels); `overwrite_z`: the Hopper act' steps write over their saved z (mosaic/backward.py's
    `mlp_backward`)."""
    from . import backward, fused_small_backward

    def backward_pass(dy2d, kept, params):
        if kernels == "hopper":
            from .mosaic import backward as hopper

            return hopper.mlp_backward(
                dy2d, kept, params, spec, saved=saved, overwrite_z=overwrite_z
            )
        run = fused_small_backward.mlp_backward if kernels == "whole" else backward.mlp_backward
        return run(dy2d, kept, params, spec, saved=saved, config=config)

    return jax.jit(backward_pass)


def _train_kernels(impl: str, resolved: str, spec: MLPSpec, m: int) -> str:
    """Which of TRAIN_KERNELS a training call of the asked `impl` (resolved to `resolved`) runs:
    fused_small's own where it takes the spec, the Mosaic GPU GEMMs on Hopper where the asked
    impl is `auto` or `pallas_mosaic` and every GEMM fits them (mosaic/backward.py's `applies`;
    an explicit portable impl keeps its backward, so the two can be compared), else portable."""
    from . import fused_small_backward

    if fused_small_backward.applies(resolved, spec):
        return "whole"
    if compat.on_hopper():
        from .mosaic import backward as hopper

        if hopper.applies(impl, spec, m):
            return "hopper"
    return "portable"


def _trainable(
    spec: MLPSpec,
    run: Callable[..., jax.Array],
    *,
    saved: str,
    config: TileConfig | None,
    names: tuple[str, ...],
    has_residual: bool,
    kernels: str = "portable",
) -> Callable[..., jax.Array]:
    """`run` (x2d, params, residual2d) -> y2d, differentiable through `backward.mlp_backward`,
    or, as `kernels` says (`_train_kernels`), fused_small_backward.py's saving forward and
    whole-MLP backward, or mosaic/backward.py's Hopper GEMMs.

    `names`: the caller's param names (packed or not: gradients come back in those names, the
    packed dwv/dbc as they are, or unpacked to dw/dv, db/dc); d(y + r)/dr = dy. Spec, policy,
    config, names and whether there is a residual are bound (the call signature fixes them), so
    the custom_vjp has array arguments only.
    """
    # twin-diff: torch registers its autograd on the custom op (torch_impl/custom_op.py).
    packed = is_packed(dict.fromkeys(names))

    @jax.custom_vjp
    def core(x2d, params, residual2d):
        return run(x2d, params, residual2d)

    def core_fwd(x2d, params, residual2d):
        if kernels == "portable":  # the portable kernels train, on a pinned config's tiles
            check_config(config, FALLBACK[STACK], training=True)
        kernel_params = pack_params(spec, params)  # the packed names only (a copy when plain)
        if saved == "preact":
            y2d, kept = _saving_forward(spec, config, kernels)(x2d, kernel_params, residual2d)
        else:  # "inputs": the asked implementation's forward; x is all the backward needs
            y2d, kept = run(x2d, params, residual2d), (x2d,)
        return y2d, (kept, kernel_params)

    def core_bwd(res, dy2d):
        kept, kernel_params = res
        # The act' steps write over the saved z only where this backward is traced into an
        # enclosing computation (a jitted step: the saved tensors die in it). Called eagerly,
        # they are arguments of the backward's own jit, which XLA would copy before overwriting
        # (a pass of 448 MiB at llama3-8b) where a new output costs nothing extra.
        traced = any(isinstance(a, jax.core.Tracer) for a in kept)
        backward_pass = _backward_pass(spec, saved, config, kernels, kernels == "hopper" and traced)
        grads = backward_pass(dy2d, kept, kernel_params)
        dx = grads.pop("x")
        if not packed:
            grads = unpack_params(spec, grads)
        return dx, {name: grads[name] for name in names}, dy2d if has_residual else None

    core.defvjp(core_fwd, core_bwd)
    return core


def _differentiated_by(
    run: Callable[..., jax.Array], baseline: Callable[..., jax.Array]
) -> Callable[..., jax.Array]:
    """`run` where no gradient is taken; where one is, the baseline's forward and jax's own
    derivative of it (a training point of the dispatch table measured that faster: `auto`'s
    training choice). twin-diff: torch decides per call, before its training op
    (custom_op.mlp, module.FusedMLP); here the custom_vjp's forward rule is the differentiated
    call."""

    @jax.custom_vjp
    def core(x2d, params, residual2d):
        return run(x2d, params, residual2d)

    def core_fwd(x2d, params, residual2d):
        return jax.vjp(baseline, x2d, params, residual2d)

    def core_bwd(vjp, dy2d):
        return vjp(dy2d)

    core.defvjp(core_fwd, core_bwd)
    return core


def _on_plain_params(spec: MLPSpec, baseline: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """`baseline` differentiated on w and v apart: packed params are unpacked inside the step
    and their gradients packed back by autodiff. On the packed layout XLA builds each gated
    layer's packed dZ as a sum of padded halves (measured on the H200 at 243dbf1, a training
    step: hf-blog-geglu 661.0 µs packed, 590.5 unpacked in the step, 587.2 on plain params;
    llama3-8b 13.35 / 13.22 / 12.96 ms; bench/packed_baseline_probe.py). twin-diff: torch
    differentiates its packed baseline (baselines.eager_packed) as it is: unpacked before its
    compiled baseline it measured slower (ff5c872: hf-blog 632 µs against compile's 589, llama3-8b
    13.63 against 12.85 ms; the copies and their gradients ran as eager kernels around the
    compiled step), packed 0.95-0.99× compile (bench/results/2026-12-04-h200-19150d8)."""

    def run(x2d, params, residual2d):
        return baseline(x2d, unpack_params(spec, params), residual2d)

    return run


def _check_available(impl: str, device: str) -> None:
    reason = unavailable_reason(impl, device)
    if reason is not None:
        raise ValueError(f"x: impl {impl!r} cannot run on device {device}: {reason}")


def _validate_and_plan(x, params, spec, impl, config, residual, saved) -> _Prepared:
    check_impl(impl, STACK)
    check_saved(saved)
    spec = check_call_inputs(ADAPTER, spec, x, params, config, residual)
    device = "gpu" if compat.on_gpu() else "cpu"
    _check_available(impl, device)  # where it cannot run at all comes before what it cannot take
    the_plan = plan(
        spec, tuple(x.shape), impl=impl, device=device, config=config,
        residual=residual is not None,
    )  # fmt: skip
    _check_available(the_plan.impl, device)
    lead = tuple(x.shape[:-1])
    run = _jitted_runner(spec, the_plan)
    train = run  # the baselines: jax differentiates their plain jax.numpy itself
    trained = None
    if impl == AUTO and config is None and not _entry(the_plan.impl).baseline:
        trained = training_choice(spec, math.prod(x.shape[:-1]), device)
    if trained is not None:  # a training point: the baseline's autodiff where a gradient is taken
        base_plan = plan(spec, tuple(x.shape), impl=trained[0], device=device)
        train = _differentiated_by(run, _on_plain_params(spec, _jitted_runner(spec, base_plan)))
    elif not _entry(the_plan.impl).baseline:
        train = _trainable(
            spec, run, saved=saved, config=config, names=tuple(params),
            has_residual=residual is not None,
            kernels=_train_kernels(impl, the_plan.impl, spec, math.prod(lead)),
        )  # fmt: skip
    return _Prepared(the_plan, lead, math.prod(lead), run, train)


def prepare(
    x, params, spec, impl=AUTO, config=None, residual=None, saved=DEFAULT_SAVED
) -> _Prepared:
    """The validated plan of this call, from the cache when the signature was seen before."""
    try:
        key = (
            spec, impl, dispatch.generation() if impl == AUTO else 0, tables_state(), config,
            _signature(x),
            tuple((k, *_signature(v)) for k, v in params.items()),
            None if residual is None else _signature(residual), saved,
        )  # fmt: skip
        hit = _PREPARED.get(key)
    except (AttributeError, TypeError):  # not arrays, or unhashable: the checks name the argument
        key, hit = None, None
    if hit is not None:
        return hit
    prepared = _validate_and_plan(x, params, spec, impl, config, residual, saved)
    if key is not None:
        if len(_PREPARED) >= _PREPARED_MAX:
            _PREPARED.clear()
        _PREPARED[key] = prepared
    return prepared


# ---- public function -----------------------------------------------------------------------------
def mlp(
    x: jax.Array,
    params: Mapping[str, jax.Array],
    spec: MLPSpec,
    *,
    impl: str = AUTO,
    config: TileConfig | None = None,
    residual: jax.Array | None = None,
    saved: str = DEFAULT_SAVED,
) -> jax.Array:
    """y = MLP(x) (+ residual) for x of shape [..., d_in]; returns [..., d_out] in the spec dtype.

    `params`: the contract's names or the packed ones (`fusedmlp.jax_impl.packing.pack_params`).
    `impl` is one of `fusedmlp.common.impl_names("jax")` or "auto"; `config` pins one TileConfig for
    every kernel launch (None: the heuristic per layer). Callable inside `jax.jit` (spec static).
    Differentiable (grad, value_and_grad, under jit and vmap): `saved` ("preact" or "inputs") is
    what the forward keeps for the backward (see the module docstring); gradients come back in the
    params' own names and dtypes.
    """
    call = prepare(x, params, spec, impl, config, residual, saved)
    if call.m == 0:
        return jax.numpy.zeros((*call.lead, spec.d_out), x.dtype)
    x2d = x.reshape(call.m, spec.d_in)
    residual2d = residual.reshape(call.m, spec.d_out) if residual is not None else None
    y2d = call.train(x2d, dict(params), residual2d)
    return y2d.reshape(*call.lead, spec.d_out)
