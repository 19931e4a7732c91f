"""The PyTorch front: `mlp()` runs the fused MLP, `plan()` says which kernels would run and how.

    mlp(x, params, spec) -> validate (common/validate.py) -> plan (the registry's entry) -> launch

Twin: jax_impl/front.py (the same sections, checks and messages). Everything an implementation
needs is its entry in `fusedmlp.common.registry` (runner kind, launcher module, config and support
functions, params layout); this file reads that one table and holds no other.

Per call, only what cannot be reused is done: validation and the plan are computed once per call
signature (spec, impl, config, tune, and the shape/dtype/device of every array) and cached, so a
repeated call costs a dictionary lookup before its launches. Plain params (the contract's names)
are packed for our kernels (common/packing.py) once per set of tensors — keyed by each tensor's
identity and version counter, so an in-place update converts again — and the copy is dropped with
the tensors; the baselines read either layout as given (their registry layout is "any").

`auto`, on a GPU with a committed dispatch table (common/dispatch/<gpu>.json, derived by
`fusedmlp bench --derive-auto` from a benchmark run on that GPU), runs what was measured fastest
for the stack, dtype, shape class and M — a baseline where none of our kernels won, so `auto`
never loses to the unfused code — and the plan quotes the measurement. Elsewhere, in order:
  1. `fused_small` — every width ≤ 128: the whole narrow MLP in one kernel;
  2. `fused_decode` — a 2-layer MLP at decode batch sizes (M ≤ 64): one launch, the weights
     streamed once;
  3. `triton_tma` on Hopper, with each layer that misses TMA's 16-byte stride rule run by the
     portable kernel;
  4. `triton`, the portable kernels, everywhere else (and on the CPU, under Triton's interpreter).

Training (issue 24): where autograd would record the call, `mlp` goes through the registered
training op (custom_op.py) with the `saved=` policy; `training_forward` is its forward ("preact":
a saving forward — fused_small's own, the Mosaic GPU or Triton TMA kernels on Hopper as
`hopper_route` says, else backward.py's portable ones; "inputs": the asked impl, x kept),
`plan(..., saved=)` says which, with the bytes kept. Baselines train through torch autograd.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib
import math
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fusedmlp.common import KernelLaunch, MLPSpec, Plan, TileConfig, cost, dispatch
from fusedmlp.common.config import DEFAULT_SAVED
from fusedmlp.common.packing import is_packed
from fusedmlp.common.registry import (
    AUTO,
    FALLBACK,
    Implementation,
    check_impl,
    get_implementation,
    impl_names,
)
from fusedmlp.common.tiling import small_wgrad_on_chip
from fusedmlp.common.tuning import tables_state
from fusedmlp.common.validate import (
    Adapter,
    ArrayInfo,
    check_call_inputs,
    check_config,
    check_saved,
    check_spec,
)

from . import baselines
from .packing import pack_params
from .runtime import INTERPRET
from .tf32 import rounded_k_major, tf32_copy

STACK = "torch"


# ---- the stack's adapter for the check layer -----------------------------------------------------
def _describe(t: torch.Tensor) -> ArrayInfo:
    return ArrayInfo(tuple(t.shape), str(t.dtype).removeprefix("torch."), str(t.device))


ADAPTER = Adapter(STACK, "torch.Tensor", lambda a: isinstance(a, torch.Tensor), _describe)


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
def _launcher(impl: str, family: str, tune: bool = False) -> Callable[..., Any]:
    """The function a launch calls: `<family>_fwd` of a per-layer package's family module, a
    whole-MLP module's `<name>_fwd`, or a baseline's `module:function`."""
    entry = _entry(impl)
    if entry.runner == "baseline":
        module, _, name = entry.launcher.partition(":")
        return getattr(importlib.import_module(module), name)
    if entry.runner == "whole":
        return getattr(importlib.import_module(entry.module(STACK)), f"{impl}_fwd")
    fwd = getattr(importlib.import_module(f"{entry.module(STACK)}.{family}"), f"{family}_fwd")
    if tune:  # plan(tune=True) on a GPU: sweep once per shape, then read the cache
        fwd = importlib.import_module("fusedmlp.torch_impl.tuning").tuned(family, fwd)
    return fwd


# ---- where an implementation can run (device facts read once) ----------------------------------
@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _is_hopper() -> bool:
    return torch.cuda.is_available() and _capability(torch.cuda.current_device())[0] == 9


def unavailable_reason(impl: str, device: str = "cpu") -> str | None:
    """None if `impl` can run on `device` ("cpu" or "cuda") here, interpreted or not; else why."""
    check_impl(impl, STACK)
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    if impl == AUTO or _entry(impl).baseline:
        return None
    entry = _entry(impl)
    if entry.gpu_only and kind != "cuda":
        gpu = "a Hopper GPU" if entry.hopper else "a GPU"
        return f"{impl} runs GPU kernels only: it needs {gpu} (no interpreter)"
    if entry.hopper and kind == "cuda" and not _is_hopper():
        return f"{impl} needs a Hopper GPU (TMA, wgmma)"
    if kind == "cpu" and not INTERPRET:
        return (
            f"{impl} runs Triton kernels, which need CUDA tensors; set TRITON_INTERPRET=1 before "
            "importing fusedmlp to interpret them on the CPU"
        )
    if kind == "cuda" and INTERPRET:
        return "TRITON_INTERPRET=1 is set: Triton kernels take CPU tensors in this process"
    return None


def is_interpreted(impl: str, device: str = "cpu") -> bool:
    """True where `impl` runs its kernels under Triton's interpreter (not timed by the harness)."""
    if impl == AUTO:
        return False
    entry = _entry(impl)
    on_cpu = torch.device(device).type == "cpu"
    return not entry.baseline and not entry.gpu_only and INTERPRET and on_cpu


def _interpret(entry: Implementation) -> bool:
    return INTERPRET and not entry.gpu_only


# ---- plan ----------------------------------------------------------------------------------------
@functools.cache
def _gpu_name() -> str:
    return torch.cuda.get_device_name(torch.cuda.current_device())


# True while a CUDA graph is prepared or captured (`graph_safe`): `auto` passes over what a graph
# cannot record (registry `capturable`). A context variable, so that other threads' calls plan as
# usual.
_GRAPH_SAFE: contextvars.ContextVar[bool] = contextvars.ContextVar("graph_safe", default=False)


# twin-diff: torch only — a jitted JAX step is one executable, nothing to capture.
@contextlib.contextmanager
def graph_safe() -> Iterator[None]:
    """Within this context `auto` chooses only implementations whose launches a CUDA graph can
    record (registry `capturable`: all of them today, torch's Mosaic GPU kernels included since
    their launch goes to the current stream, cross/launcher.py). Enter it for the eager warm-up
    steps as well as the capture (training.GraphedTrainStep does), so both run, and compile, the
    same kernels: a kernel compiled or loaded inside a capture cannot be recorded. (A capture is
    planned so without it, too.)"""
    token = _GRAPH_SAFE.set(True)
    try:
        yield
    finally:
        _GRAPH_SAFE.reset(token)


@functools.cache
def _has_cuda() -> bool:
    return torch.cuda.is_available()  # ~0.6 µs a call: asked once


def _graph_safe() -> bool:
    """Whether `auto` must choose what a CUDA graph can record: inside `graph_safe()`, or while
    this thread's stream is capturing."""
    return _GRAPH_SAFE.get() or (_has_cuda() and torch.cuda.is_current_stream_capturing())


def _can_take(impl: str, spec: MLPSpec, m: int, device: str) -> bool:
    """Whether `impl` runs here and takes this problem (what a measured choice must pass)."""
    entry = _entry(impl)
    if unavailable_reason(impl, device) is not None:
        return False
    if not entry.capturable and _graph_safe():
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
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
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
    """(baseline, evidence) where `auto` trains through a baseline's own ops (torch autograd)
    because a training point of the dispatch table measured it faster than our training path
    within dispatch.TRAIN_REACH of this call; None where `auto` trains with our kernels."""
    return _training_choice_of(spec, m, torch.device(device).type, dispatch.generation())


@functools.lru_cache(maxsize=1024)
def _training_choice_of(spec, m, device_type, generation) -> tuple[str, str] | None:
    # a training step asks every step: cached per (spec, M, device), and per installed table
    can_take = functools.partial(_can_take, spec=spec, m=m, device=device_type)
    return dispatch.training_baseline(_table(device_type), STACK, spec, m, can_take)


def _resolve_auto(spec: MLPSpec, m: int, device: str) -> tuple[str, str]:
    measured = _measured_choice(spec, m, device)
    if measured is not None:
        return measured
    for name in ("fused_small", "fused_decode"):
        if _function(name, "supports")(spec, m) is None:
            return name, f"auto: {_entry(name).description}"
    if spec.dtype == "float32" and torch.device(device).type == "cuda":
        return dispatch.FLOAT32_BASELINE[STACK], f"auto: {dispatch.FLOAT32_UNMEASURED}"
    if torch.device(device).type == "cuda" and _is_hopper():
        return "triton_tma", "auto: Hopper GPU"
    return FALLBACK[STACK], "auto: portable kernels"


def _layer_launch(spec, layer, impl, m, config, residual, tune) -> KernelLaunch:
    entry = _entry(impl)
    family = "gated" if layer.gated else "linear_act"
    tuned = tune and config is None and entry.tunable and not _interpret(entry)
    if tuned or config is not None:
        cfg = check_config(config, impl)
    else:
        options = dict(entry.config_options)
        if options.get("persistent") and spec.fp32_precision == "tf32":
            options["fp32_precision"] = "tf32"  # the TMA kernels' tf32 tile (TF32_TMA_CONFIG)
        cfg = _function(impl, "config")(
            family, m, layer.d_out, layer.d_in, spec.dtype, interpret=_interpret(entry), **options
        )
    return KernelLaunch(
        family, impl, m, layer.d_out, layer.d_in, layer.activation, cfg,
        residual=residual and layer.index == spec.num_layers - 1, layer=layer.index, tune=tuned,
    )  # fmt: skip


def plan(
    spec: MLPSpec,
    x_shape: tuple[int, ...] | torch.Size,
    *,
    impl: str = AUTO,
    device: str = "cpu",
    config: TileConfig | None = None,
    residual: bool = False,
    tune: bool = False,
    saved: str | None = None,
) -> Plan:
    """Which kernels `mlp` would launch for an input of `x_shape`, with their configs.

    `saved` (a policy of common.config.SAVED_POLICIES): the plan of a TRAINING call — its reason
    names the policy, the bytes it keeps for the backward (`cost.saved_bytes`) and, for "preact",
    which kernels the saving forward and the backward run (`hopper_route` on Hopper).
    Raises NotImplementedError when an explicitly requested `impl` cannot take this spec (the
    message names the constraint, the value and the fallback); `auto` never does.
    """
    spec = check_spec(spec)
    check_impl(impl, STACK)
    check_config(config)
    if saved is not None:
        m = math.prod(tuple(x_shape)[:-1])
        trained = training_choice(spec, m, device) if impl == AUTO and config is None else None
        if trained is not None:  # a training point: a baseline trains faster here
            base = plan(spec, x_shape, impl=trained[0], device=device, residual=residual)
            note = f"training: {trained[0]} differentiates through torch autograd"
            return Plan(trained[0], impl, base.launches, f"{trained[1]}; {note}")
        the_plan = plan(
            spec, x_shape, impl=impl, device=device, config=config, residual=residual, tune=tune
        )
        return _training_plan(spec, the_plan, m, check_saved(saved), device, config)
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
        if chosen == "fused_small" and config is None and _sibling_runs(spec, device, m):
            from .cross import fused_small as sibling

            cfg = sibling.sibling_config(spec, m)
            reason = "; ".join(r for r in (reason, _SIBLING_NOTE) if r)
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
        launches.append(_layer_launch(spec, layer, layer_impl, m, config, residual, tune))
    notes = (reason, *fallbacks, _KMAJOR_NOTE if _reads_k_major(spec, launches) else "")
    return Plan(chosen, impl, tuple(launches), "; ".join(r for r in notes if r))


# What a plan's reason says where fused_small runs its Mosaic GPU sibling (one clause: no "; ").
_SIBLING_NOTE = (
    "its Mosaic GPU sibling runs here on these tensors (torch_impl/cross/fused_small.py -> "
    "jax_impl/mosaic/fused_small.py: 128 wide, a weight ring, M x layers >= 2^19)"
)


def _sibling_runs(spec: MLPSpec, device: str, m: int) -> bool:
    # where the JAX twin's front names its own Mosaic GPU sibling, this one names the same kernel
    # run on torch tensors (fused_small._sibling_applies); the plan records its tiles
    from . import fused_small

    return fused_small._sibling_applies(spec, device, m)


def graph_capturable(the_plan: Plan) -> bool:
    """Whether a CUDA graph records `the_plan`'s launches as planned: no implementation a graph
    cannot record (registry `capturable`; fused_small's Mosaic GPU sibling records as its Triton
    kernel does, cross/launcher.py)."""
    return all(_entry(launch.impl).capturable for launch in the_plan.launches)


def _whole_backward_kernels(spec: MLPSpec) -> str:
    # which of fused_small's backwards runs (fused_small_backward.mlp_backward: the rule's choice
    # for inputs its tensor descriptors can load, the usual case)
    if small_wgrad_on_chip(spec, descriptor_loads=True):
        return "fused_small's kernel A with every dW on chip (no dZ in memory) and a sum kernel"
    return "fused_small's whole-MLP kernels A and B"


def _training_plan(
    spec: MLPSpec, the_plan: Plan, m: int, saved: str, device: str, config: TileConfig | None
) -> Plan:
    from . import fused_small_backward
    from .cross.fused_small import is_sibling_config

    mib = cost.saved_bytes(spec, m, saved) / 2**20
    whole = fused_small_backward.applies(the_plan.impl, spec)
    requested = the_plan.requested
    route = "" if whole else hopper_route(requested, the_plan.impl, spec, m, device, config)
    if not whole and not route and not _entry(the_plan.impl).baseline:
        check_config(config, FALLBACK[STACK], training=True)  # as training_forward refuses it
    kernels = {
        "mosaic": "the Mosaic GPU GEMMs on torch tensors (JAX's Hopper step through "
        "as_torch_kernel), each act' step in an input gradient's epilogue, on the measured tiles "
        "of jax_impl/mosaic/tuned_hopper_backward.json (torch_impl/cross/backward.py)",
        "tma": "the persistent TMA GEMMs, each act' step in an input gradient's epilogue, on the "
        "measured tiles of tma/tuned_hopper_backward.json (torch_impl/tma/backward.py)",
    }.get(route, "portable dgrad/wgrad kernels (torch_impl/backward.py)")
    saving = {
        "mosaic": "Mosaic GPU kernels (every layer, each pre-activation stored by its epilogue)",
        "tma": "persistent TMA kernels (gated, identity and relu layers)",
    }.get(route, "portable triton kernels")
    if whole:
        kernels = f"{_whole_backward_kernels(spec)} (torch_impl/fused_small_backward.py)"
        saving = "fused_small kernel (one launch)"
    launches, reason = the_plan.launches, the_plan.reason
    if whole and saved == "preact" and is_sibling_config(launches[0].config):
        # the saving forward is fused_small's own Triton kernel (fused_small_backward.py), not
        # the inference sibling the plan names: show what trains
        cfg = _function("fused_small", "config")(spec, m, interpret=False)
        launches = (dataclasses.replace(launches[0], config=cfg),)
        reason = "; ".join(r for r in reason.split("; ") if r != _SIBLING_NOTE)
    if _entry(the_plan.impl).baseline and the_plan.requested != AUTO:
        note = f"training: {the_plan.impl} differentiates through torch autograd"
    elif saved == "preact":
        note = (
            f"training: saved='preact' keeps {mib:.1f} MiB (every layer's input and "
            "pre-activation, none for identity or relu layers); the saving forward runs the "
            f"{saving}; backward: {kernels}"
        )
    else:
        note = (
            f"training: saved='inputs' keeps {mib:.1f} MiB (x); the backward recomputes the "
            f"forward with the saving kernels ({saving}), then {kernels}"
        )
    reason = "; ".join(r for r in (reason, note) if r)
    return Plan(the_plan.impl, the_plan.requested, launches, reason)


# ---- params in the layout the kernels take (converted once per set of tensors) -------------------
# The launches' extra layout where float32 products are "tf32" on the Hopper TMA kernels: every
# weight K-major (tf32.rounded_k_major). wgmma takes 32-bit operands K-major only, so a row-major W
# slab costs those kernels a transposing pass through registers every K step, its wgmma waited
# on at once (seen compiling for sm_90; bench/tf32_probe.py measures it); a K-major one is a free
# view of shared memory. 16-bit operands are read either way, so nothing else converts.
# twin-diff: torch only — JAX's float32 runs pallas_triton (pallas_mosaic takes 16-bit only), and
# a JAX array has no strides to hold a K-major view in (docs/porting.md, Part 2 §8).
KMAJOR = "kmajor"
_KMAJOR_TF32_IMPLS = frozenset({"triton_tma"})


# What the plan's reason says where it does (one clause: no "; ").
_KMAJOR_NOTE = (
    "float32 tf32: the weights are read K-major, from a copy made once per set of params "
    "(32-bit wgmma takes K-major operands only) and rounded to tf32, as x and the hidden layers "
    "are, in memory"
)


def _layouts(the_plan: Plan, spec: MLPSpec) -> frozenset[str]:
    """The params layouts the launches read: "packed" (our kernels), "any" (a baseline), or both
    (a per-layer plan never mixes them today; the rule below would hold if one did); with KMAJOR
    where float32 "tf32" launches read their weights K-major."""
    layouts = frozenset(_entry(k.impl).layout for k in the_plan.launches)
    return layouts | {KMAJOR} if _reads_k_major(spec, the_plan.launches) else layouts


def _reads_k_major(spec: MLPSpec, launches) -> bool:
    return spec.fp32_precision == "tf32" and any(k.impl in _KMAJOR_TF32_IMPLS for k in launches)


def _weight_names(spec: MLPSpec) -> list[str]:
    """The packed params' weight names, one a layer (`wv{i}` gated, `w{i}` otherwise)."""
    return [f"wv{layer.index}" if layer.gated else f"w{layer.index}" for layer in spec.layers()]


def _derive(spec: MLPSpec, params: Mapping[str, torch.Tensor], layouts: frozenset[str]):
    """The tensors our kernels read that `params` lacks: the packed names of plain params,
    contiguous copies of strided biases and, with KMAJOR, K-major copies of the weights rounded to
    tf32 (`tf32.rounded_k_major`). Never a tensor of `params` itself, so a cache of these keeps no
    caller's tensor alive. A baseline ("any") reads the params as they come."""
    if "packed" not in layouts:
        return {}
    out = {} if is_packed(params) else pack_params(spec, params)
    # Launchers index biases with unit stride (N elements: cheaper than more stride arguments).
    out |= {k: v.contiguous() for k, v in params.items() if v.ndim == 1 and not v.is_contiguous()}
    if KMAJOR in layouts:
        merged = {**params, **out}
        # rounded to tf32 there, once per set of params, every wgmma stays in flight; rounded slab
        # by slab in registers they are serialised (tests/test_triton_tma.py compiles both)
        out |= {name: rounded_k_major(merged[name]) for name in _weight_names(spec)}
    return {k: v for k, v in out.items() if params.get(k) is not v}


def converts_params(spec: MLPSpec, params: Mapping[str, torch.Tensor]) -> bool:
    """Whether our kernels may read `params` through a conversion (packing, a contiguous copy
    of a strided bias, K-major copies of float32 "tf32" weights) rather than as they are: the
    compiled route then keeps the op, which converts once per set of tensors."""
    tf32 = spec.fp32_precision == "tf32"  # K-major where the TMA kernels run: any plan, to be safe
    return _needs_conversion(spec, params, frozenset({"packed", KMAJOR} if tf32 else {"packed"}))


def _needs_conversion(spec: MLPSpec, params: Mapping[str, torch.Tensor], layouts) -> bool:
    if "packed" not in layouts:
        return False
    if KMAJOR in layouts:  # tf32's K-major weights are rounded copies, whatever the layout given
        return True
    return (spec.gated and not is_packed(params)) or any(
        v.ndim == 1 and not v.is_contiguous() for v in params.values()
    )


class _Converted:
    """Derived params (`_derive`) per set of source tensors, keyed by the identity and version
    counter of each, dropped when any source tensor is freed. They are copies: memory paid once."""

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[tuple[int, ...], dict[str, torch.Tensor]]] = {}

    def get(self, spec, params, layouts) -> dict[str, torch.Tensor]:
        tensors = tuple(params.values())
        if any(t.is_inference() for t in tensors):  # no version counter: convert every call
            return _derive(spec, params, layouts)
        key = (spec, layouts, tuple(params), tuple(map(id, tensors)))
        versions = tuple(t._version for t in tensors)
        hit = self._entries.get(key)
        if hit is not None and hit[0] == versions:
            return hit[1]
        out = _derive(spec, params, layouts)
        if hit is None:  # first sight of these tensors: forget them with the first one freed
            for t in tensors:
                weakref.finalize(t, self._entries.pop, key, None)
        self._entries[key] = (versions, out)
        return out

    def __len__(self) -> int:
        return len(self._entries)


_CONVERTED = _Converted()


# ---- runners: 2-D input, params in the kernels' layout, a plan -> 2-D output --------------------
def _run_per_layer(x2d, params, spec, the_plan, residual2d):
    h = x2d
    for fwd, w, b, residual, options, round_input in _layer_steps(the_plan, spec.fp32_precision):
        if round_input:  # a tf32 TMA launch reads its input as it lies: rounded here, once
            h = tf32_copy(h)
        if residual is None:  # gated: one GEMM over the packed operand (common/packing.py)
            h = fwd(h, params[w], params.get(b), **options)
        else:
            h = fwd(h, params[w], params.get(b), residual2d if residual else None, **options)
    return h


# Each plan's launches as the per-layer runner calls them — (launcher, weight and bias names,
# residual flag or None for a gated layer, keyword arguments, whether the input is rounded to
# tf32 first) — built once per plan object rather than per call (~1.5 µs a launch: the launcher
# lookup, the names, the keywords). Keyed by the plan's identity: an entry holds its plan, so no
# other object can take that id while it lives.
_STEPS: dict[tuple[int, str], tuple[Plan, tuple]] = {}


def _layer_steps(the_plan: Plan, precision: str) -> tuple:
    key = (id(the_plan), precision)
    hit = _STEPS.get(key)
    if hit is not None and hit[0] is the_plan:
        return hit[1]
    steps = []
    input_rounded = False  # x, as the caller gave it
    last = len(the_plan.launches) - 1
    for j, launch in enumerate(the_plan.launches):
        i = launch.layer
        fwd = _launcher(launch.impl, launch.family, launch.tune)
        options = dict(activation=launch.activation, config=launch.config, fp32_precision=precision)
        # float32 "tf32" on the TMA kernels: their operands in memory as tf32 values, read as they
        # lie (wgmma straight from shared memory): the weights from _derive's rounded copies, x
        # rounded by the runner, a hidden layer rounded at its store by the TMA launch that makes
        # it (`tf32_output`) or else by the runner. The pointer kernels round in registers.
        tma_tf32 = precision == "tf32" and launch.impl in _KMAJOR_TF32_IMPLS
        round_input = tma_tf32 and not input_rounded
        if tma_tf32:
            options |= dict(tf32_operands_exact=True, tf32_output=j < last)
        input_rounded = tma_tf32 and j < last
        if launch.family == "gated":
            steps.append((fwd, f"wv{i}", f"bc{i}", None, {"n": launch.n, **options}, round_input))
        else:
            steps.append((fwd, f"w{i}", f"b{i}", launch.residual, options, round_input))
    if len(_STEPS) >= _PREPARED_MAX:
        _STEPS.clear()
    _STEPS[key] = (the_plan, tuple(steps))
    return _STEPS[key][1]


def _run_whole(x2d, params, spec, the_plan, residual2d):
    launch = the_plan.launches[0]
    if not x2d.is_contiguous():
        # The whole-MLP launchers take a contiguous x (fused_decode) or one with unit column
        # stride (fused_small), as their public functions make it: a strided view (a column
        # slice, an expanded or permuted batch) is copied once here, never read as if dense.
        x2d = x2d.contiguous()
    y = _launcher(launch.impl, launch.family)(x2d, params, spec, config=launch.config)
    return y + residual2d if residual2d is not None else y


def _run_baseline(x2d, params, spec, the_plan, residual2d):
    launch = the_plan.launches[0]
    # twin-diff: auto's "compile" runs its Inductor graph without Dynamo's per-call guards
    # (baselines.run_compiled_graph), unless a gradient is to be built or autocast is on: then
    # torch.compile, which guards on both. (jax.jit has no such cost to avoid.)
    direct = launch.impl == "compile" and the_plan.requested == AUTO
    direct = direct and not torch.is_autocast_enabled(x2d.device.type)
    if direct and not needs_grad(x2d, params, residual2d):
        return baselines.run_compiled_graph(x2d, params, spec, residual2d)
    return _launcher(launch.impl, launch.family)(x2d, params, spec, residual2d)


_RUNNER_OF_KIND = {"per_layer": _run_per_layer, "whole": _run_whole, "baseline": _run_baseline}
# One runner per implementation, looked up at call time (the harness' tests patch one).
_RUNNERS: dict[str, Callable] = {
    name: _RUNNER_OF_KIND[_entry(name).runner] for name in impl_names(STACK)
}


# ---- validate and plan, once per call signature --------------------------------------------------
@dataclass(frozen=True)
class _Prepared:
    plan: Plan
    lead: tuple[int, ...]
    m: int
    layouts: frozenset[str]  # the params layouts the launches read
    convert: bool  # the params must be converted (layout, or a strided bias) before the launches
    is_2d: bool  # x is [M, d_in] already (and a residual [M, d_out])


# What a plan chooses differently while a CUDA graph is prepared or captured (`graph_safe`): auto
# (registry `capturable`).
_GRAPH_SENSITIVE = frozenset({AUTO})
_PREPARED: dict[tuple, _Prepared] = {}
_PREPARED_MAX = 4096  # distinct call signatures kept (a dynamic-shape server stays bounded)


def _signature(a: Any) -> tuple:
    return (type(a), a.shape, a.dtype, a.device, a.is_contiguous())


def _check_available(impl: str, device: torch.device) -> None:
    reason = unavailable_reason(impl, device.type)
    if reason is not None:
        raise ValueError(f"x: impl {impl!r} cannot run on device {device}: {reason}")


def _validate_and_plan(x, params, spec, impl, config, residual, tune) -> _Prepared:
    check_impl(impl, STACK)
    spec = check_call_inputs(ADAPTER, spec, x, params, config, residual)
    _check_available(impl, x.device)  # where it cannot run at all comes before what it cannot take
    the_plan = plan(
        spec, tuple(x.shape), impl=impl, device=x.device.type, config=config,
        residual=residual is not None, tune=tune,
    )  # fmt: skip
    _check_available(the_plan.impl, x.device)
    lead = tuple(x.shape[:-1])
    layouts = _layouts(the_plan, spec)
    convert = _needs_conversion(spec, params, layouts)
    return _Prepared(the_plan, lead, math.prod(lead), layouts, convert, len(lead) == 1)


def prepare(x, params, spec, impl=AUTO, config=None, residual=None, tune=False) -> _Prepared:
    """The validated plan of this call, from the cache when the signature was seen before."""
    try:
        key = (
            spec, impl, dispatch.generation() if impl == AUTO else 0, tables_state(), config, tune,
            impl in _GRAPH_SENSITIVE and _graph_safe(),
            _signature(x),
            tuple(params), tuple(map(_signature, params.values())),
            None if residual is None else _signature(residual),
        )  # fmt: skip
        hit = _PREPARED.get(key)
    except (AttributeError, TypeError):  # not tensors, or unhashable: the checks name the argument
        key, hit = None, None
    if hit is not None:
        return hit
    prepared = _validate_and_plan(x, params, spec, impl, config, residual, tune)
    if key is not None:
        if len(_PREPARED) >= _PREPARED_MAX:
            _PREPARED.clear()
        _PREPARED[key] = prepared
    return prepared


# ---- public function -----------------------------------------------------------------------------
def mlp(
    x: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    spec: MLPSpec,
    *,
    impl: str = AUTO,
    config: TileConfig | None = None,
    residual: torch.Tensor | None = None,
    tune: bool = False,
    saved: str = DEFAULT_SAVED,
) -> torch.Tensor:
    """y = MLP(x) (+ residual) for x of shape [..., d_in]; returns [..., d_out] in the spec dtype.

    `params`: the contract's names (`w{i}`, `b{i}`, `v{i}`, `c{i}`) or the packed ones from
    `fusedmlp.torch_impl.packing.pack_params` (either is converted once, then cached, to what the
    kernels take). `impl` is one of `fusedmlp.common.impl_names("torch")` or "auto"; `config` pins
    one TileConfig for every kernel launch (None: the heuristic per layer). `tune=True` on a GPU
    sweeps the configs of `common.tiling.search_space` once per shape and caches the winner.

    Training: where a gradient is to be built (grad mode, and x, a param or the residual requires
    grad) the call goes through the registered training op (custom_op.py: its backward runs
    backward.py's kernels) with the `saved` policy ("preact" or "inputs", common.config);
    baselines ("eager", "compile") differentiate through torch autograd as they are.
    """
    check_saved(saved)
    if needs_grad(x, params, residual) and (impl == AUTO or not _entry(impl).baseline):
        from . import custom_op  # custom_op imports this module

        return custom_op.mlp(
            x, params, spec, impl=impl, config=config, residual=residual, saved=saved
        )
    return forward(x, params, spec, impl=impl, config=config, residual=residual, tune=tune)


def needs_grad(x: object, params: object, residual: object = None) -> bool:
    """Whether autograd would record this call: grad mode, and a tensor that requires grad."""
    if not torch.is_grad_enabled():
        return False
    tensors = [x, residual, *(params.values() if isinstance(params, Mapping) else ())]
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def forward(
    x: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    spec: MLPSpec,
    *,
    impl: str = AUTO,
    config: TileConfig | None = None,
    residual: torch.Tensor | None = None,
    tune: bool = False,
) -> torch.Tensor:
    """`mlp` without the training route: the kernels' output, no autograd record (the registered
    ops' implementations call this)."""
    call = prepare(x, params, spec, impl, config, residual, tune)
    if call.m == 0:
        return x.new_empty((*call.lead, spec.d_out))
    if call.is_2d:  # no reshapes (a view of the same strides each, ~1 µs)
        x2d, residual2d = x, residual
    else:
        x2d = x.reshape(call.m, spec.d_in)
        residual2d = residual.reshape(call.m, spec.d_out) if residual is not None else None
    flat = params
    if call.convert:
        # A call that builds a gradient through the packing (our kernels reached through
        # `forward` with grad on: the packing is differentiable) converts afresh — a cached copy
        # would hold the graph of the call that made it.
        grad = needs_grad(x, params, residual)
        derived = _derive(spec, params, call.layouts) if grad else None
        flat = {**params, **(derived or _CONVERTED.get(spec, params, call.layouts))}
    y2d = _RUNNERS[call.plan.impl](x2d, flat, spec, call.plan, residual2d)
    return y2d if call.is_2d else y2d.reshape(*call.lead, spec.d_out)


_PACKED = frozenset({"packed"})


def training_forward(
    x: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    spec: MLPSpec,
    *,
    impl: str,
    config: TileConfig | None,
    residual: torch.Tensor | None,
    saved: str,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The training op's forward (custom_op.py): (y, residuals without x) under policy `saved`.
    "preact": backward.forward_saving (the portable saving kernels; on Hopper, as `hopper_route`
    says, the Triton TMA or the Mosaic GPU ones), or for fused_small its own
    saving forward (fused_small_backward.py, the same residuals); "inputs": the asked impl
    (`forward`), nothing saved but x (which the op keeps as its input)."""
    check_saved(saved)
    backward, fused_small_backward, _, cross_backward = _training_modules()
    call = prepare(x, params, spec, impl, config, residual)
    whole = fused_small_backward.applies(call.plan.impl, spec)
    route = "" if whole else hopper_route(impl, call.plan.impl, spec, call.m, x.device, config)
    if not whole and not route:  # the portable kernels train, on a pinned config's tiles
        check_config(config, FALLBACK[STACK], training=True)
    if saved == "inputs":
        return forward(x, params, spec, impl=impl, config=config, residual=residual), []
    x2d = x.reshape(call.m, spec.d_in)
    residual2d = residual.reshape(call.m, spec.d_out) if residual is not None else None
    # fused_small trains through its own saving forward and whole-MLP backward
    # (fused_small_backward.py; custom_op._whole_backward decides alike). Else, on Hopper (as the
    # backward decides: custom_op._hopper_backward), the saving forward's gated, identity and relu
    # layers run the persistent TMA kernels, or every layer the Mosaic GPU ones (`hopper_route`).
    if whole:
        y2d, kept = fused_small_backward.forward_saving(
            x2d, kernel_params(spec, params), spec, config=config
        )
        y2d = y2d + residual2d if residual2d is not None else y2d
        return y2d.reshape(*call.lead, spec.d_out), list(kept[1:])
    if route == "mosaic":
        y2d, kept = cross_backward.forward_saving(
            x2d, kernel_params(spec, params), spec, residual=residual2d
        )
    else:
        y2d, kept = backward.forward_saving(
            x2d, kernel_params(spec, params), spec, saved="preact", config=config,
            residual=residual2d, hopper=route == "tma",
        )  # fmt: skip
    return y2d.reshape(*call.lead, spec.d_out), list(kept[1:])


def hopper_route(
    impl: str,
    planned: str,
    spec: MLPSpec,
    m: int | torch.SymInt,
    device: torch.device | str,
    config: TileConfig | None,
) -> str:
    """Which step trains a call of the asked `impl` whose forward plan runs `planned`: "mosaic"
    (the Mosaic GPU GEMMs on torch tensors, cross/backward.py: `mosaic` asked, or `auto` planning
    a Hopper GEMM kernel — measured faster than the Triton step, cross/backward.py
    `AUTO_FORWARDS`), "tma" (the Triton TMA GEMMs, tma/backward.py:
    `auto` and the Hopper impls elsewhere on Hopper, triton_tma asked) or "" (backward.py's
    portable kernels; also wherever a config is pinned). The saving forward (`training_forward`)
    and the backward (custom_op) ask alike — in eager mode at the same call; under torch.compile
    the backward's route is fixed at trace time, where a symbolic M (dynamic shapes) keeps the
    Triton step while the compiled forward, called with a concrete M, may take the Mosaic GPU
    kernels: both steps read and write the same residuals in the same layouts, so the mix is
    correct, only not the JAX step's bits."""
    if config is not None:
        return ""
    _, _, tma_backward, cross_backward = _training_modules()
    # a SymInt M (dynamic shapes under a trace) cannot key the route's caches: the Triton step
    if isinstance(m, int) and cross_backward.applies(impl, planned, spec, m, device):
        return "mosaic"
    return "tma" if tma_backward.applies(impl, spec, m, device) else ""


@functools.cache
def _training_modules():
    # imported at the first training call (they import this module), then held: an import
    # statement in the function body cost ~1 µs each per step
    from . import backward, fused_small_backward
    from .cross import backward as cross_backward
    from .tma import backward as tma_backward

    return backward, fused_small_backward, tma_backward, cross_backward


def kernel_params(spec: MLPSpec, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`params` with the packed names the backward kernels read (converted once, cached)."""
    if not _needs_conversion(spec, params, _PACKED):
        return dict(params)
    return {**params, **_CONVERTED.get(spec, params, _PACKED)}
