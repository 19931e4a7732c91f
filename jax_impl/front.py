"""The JAX front: `mlp()` runs the fused MLP, `plan()` says which kernels would run and how.

Twin: torch_impl/front.py (the same sections, checks and messages). The front validates once
(common/validate.py, shared with the torch front), flattens leading batch dims, asks `plan()` for an
implementation, and runs it under `jax.jit` with the spec and plan static, so `mlp` is callable
inside the caller's own `jax.jit` as well.

`auto` picks, in order:
  1. `fused_small` — every width ≤ 128: the whole narrow MLP in one kernel;
  2. `fused_decode` — a 2-layer MLP at decode batch sizes (M ≤ 64): one launch, weights streamed
     once;
  3. `pallas_mosaic` on Hopper for 16-bit dtypes (Mosaic GPU is where Pallas on NVIDIA is going);
  4. `pallas_triton`, the line-for-line twin of the Triton kernels, everywhere else (and on the CPU,
     interpreted). The Pallas Triton backend is deprecated upstream from jax 0.11; its warning is
     filtered by the launchers, where the twin is used on purpose.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable, Mapping
from types import ModuleType

import jax
import numpy as np

from fusedmlp.common import KernelLaunch, MLPSpec, Plan, TileConfig, heuristic_config
from fusedmlp.common.registry import AUTO, check_impl, get_implementation
from fusedmlp.common.validate import ArrayInfo, check_call, check_spec

from . import baselines, compat

STACK = "jax"
KERNEL_IMPLS = ("pallas_triton", "pallas_mosaic", "fused_small", "fused_decode", "jax_triton")
BASELINE_IMPLS = ("xla",)
# Per-layer implementations: the package whose `linear_act` and `gated` modules hold the launchers.
# `jax_triton` is the cross-stack route: torch_impl's Triton kernels on jax arrays (GPU only; the
# one place the JAX path imports the Triton kernel modules, lazily: that call is its purpose).
_LAYER_PACKAGES = {
    "pallas_triton": "fusedmlp.jax_impl",
    "pallas_mosaic": "fusedmlp.jax_impl.mosaic",
    "jax_triton": "fusedmlp.jax_impl.cross",
}
_KERNEL_PREFIX = {"pallas_triton": "", "pallas_mosaic": "mosaic.", "jax_triton": "triton."}
# Whole-MLP implementations: a module with `supports(spec, m)` and `<name>_fwd(x2d, params, spec)`.
_WHOLE_MODULES = {
    "fused_small": "fusedmlp.jax_impl.fused_small",
    "fused_decode": "fusedmlp.jax_impl.fused_decode",
}


def _module(path: str) -> ModuleType:
    return importlib.import_module(path)


# ---- where an implementation can run ------------------------------------------------------------
def _is_hopper() -> bool:
    if not compat.on_gpu():
        return False
    kind = jax.devices("gpu")[0].device_kind
    return any(name in kind for name in ("H100", "H200", "H800", "GH200"))


def unavailable_reason(impl: str, device: str = "cpu") -> str | None:
    """None if `impl` can run on `device` ("cpu" or "cuda"/"gpu") here, interpreted or not."""
    check_impl(impl, STACK)
    on_gpu_device = device in ("cuda", "gpu")
    if on_gpu_device and not compat.on_gpu():
        return "no GPU visible to jax on this machine"
    if impl == "pallas_mosaic" and on_gpu_device and not _is_hopper():
        return "pallas_mosaic needs a Hopper GPU (TMA, wgmma)"
    if impl != AUTO and get_implementation(impl).gpu_only and not on_gpu_device:
        return f"{impl} is a cross-stack call of GPU kernels: it needs a GPU (no interpreter)"
    return None


def is_interpreted(impl: str, device: str = "cpu") -> bool:
    """True where `impl` runs its kernels under a Pallas interpreter (not timed by the harness)."""
    gpu_only = impl in KERNEL_IMPLS and get_implementation(impl).gpu_only
    return impl in KERNEL_IMPLS and not gpu_only and device == "cpu"


# ---- plan ----------------------------------------------------------------------------------------
def _per_layer_launches(
    spec: MLPSpec, m: int, impl: str, config: TileConfig | None, residual: bool
) -> tuple[tuple[KernelLaunch, ...], str]:
    launches = []
    last = spec.num_layers - 1
    for layer in spec.layers():
        family = "gated" if layer.gated else "linear_act"
        if impl == "pallas_mosaic":
            mosaic = _module("fusedmlp.jax_impl.mosaic")
            reason = mosaic.unsupported_reason(m, layer.d_out, layer.d_in, spec.dtype)
            if reason is not None:
                raise NotImplementedError(reason)
            cfg = config or mosaic.default_config(
                family, m, layer.d_out, layer.d_in, spec.dtype, interpret=compat.interpret_mode()
            )
        else:
            cfg = config or heuristic_config(
                family, m, layer.d_out, layer.d_in, spec.dtype, interpret=compat.interpret_mode()
            )
        launches.append(
            KernelLaunch(
                _KERNEL_PREFIX[impl] + family,
                m,
                layer.d_out,
                layer.d_in,
                layer.activation,
                cfg,
                residual=residual and layer.index == last,
            )
        )
    return tuple(launches), ""


def _resolve_auto(spec: MLPSpec, m: int, device: str) -> tuple[str, str]:
    for name in ("fused_small", "fused_decode"):
        if _module(_WHOLE_MODULES[name]).supports(spec, m) is None:
            why = "every width <= 128" if name == "fused_small" else "2 layers at decode-sized M"
            return name, f"auto: {why}"
    if device in ("cuda", "gpu") and _is_hopper():
        mosaic = _module("fusedmlp.jax_impl.mosaic")
        layers = spec.layers()
        reasons = [mosaic.unsupported_reason(m, l.d_out, l.d_in, spec.dtype) for l in layers]
        if all(r is None for r in reasons):
            return "pallas_mosaic", "auto: Hopper GPU"
        return "pallas_triton", f"auto: Hopper GPU, but {next(r for r in reasons if r)}"
    return "pallas_triton", "auto: portable kernels"


def plan(
    spec: MLPSpec,
    x_shape: tuple[int, ...],
    *,
    impl: str = AUTO,
    device: str = "cpu",
    config: TileConfig | None = None,
    residual: bool = False,
) -> Plan:
    """Which kernels `mlp` would launch for an input of `x_shape`, with their configs.

    Raises NotImplementedError when an explicitly requested `impl` cannot take this spec (the
    message
    names the constraint, the value and the fallback); `auto` never does.
    """
    spec = check_spec(spec)
    check_impl(impl, STACK)
    m = math.prod(tuple(x_shape)[:-1])
    chosen, reason = (impl, "") if impl != AUTO else _resolve_auto(spec, m, device)
    if chosen in _WHOLE_MODULES:
        unsupported = _module(_WHOLE_MODULES[chosen]).supports(spec, m)
        if unsupported is not None:
            raise NotImplementedError(unsupported)
        launch = KernelLaunch(chosen, m, spec.d_out, spec.d_in, spec.activation, config)
        return Plan(chosen, impl, (launch,), reason)
    if chosen in _LAYER_PACKAGES:
        launches, fallback = _per_layer_launches(spec, m, chosen, config, residual)
        return Plan(chosen, impl, launches, "; ".join(r for r in (reason, fallback) if r))
    launch = KernelLaunch(f"jax.{chosen}", m, spec.d_out, spec.d_in, spec.activation)
    return Plan(chosen, impl, (launch,), get_implementation(chosen).description)


# ---- runners: 2-D input, validated params, a plan -> 2-D output ---------------------------------
def _run_per_layer(x2d, params, spec, the_plan, residual2d):
    h = x2d
    for layer, launch in zip(spec.layers(), the_plan.launches, strict=True):
        i = layer.index
        package = _LAYER_PACKAGES[the_plan.impl]
        precision = spec.fp32_precision
        if layer.gated:
            h = _module(f"{package}.gated").gated_fwd(
                h,
                params[f"w{i}"],
                params.get(f"b{i}"),
                params[f"v{i}"],
                params.get(f"c{i}"),
                activation=layer.activation,
                config=launch.config,
                fp32_precision=precision,
            )
        else:
            h = _module(f"{package}.linear_act").linear_act_fwd(
                h,
                params[f"w{i}"],
                params.get(f"b{i}"),
                residual2d if launch.residual else None,
                activation=layer.activation,
                config=launch.config,
                fp32_precision=precision,
            )
    return h


def _run_whole(x2d, params, spec, the_plan, residual2d):
    module = _module(_WHOLE_MODULES[the_plan.impl])
    # TODO(merge): packed once by the front (the whole-MLP kernels take the packed layout)
    params = _module("fusedmlp.jax_impl.packing").pack_params(spec, params)
    y = getattr(module, f"{the_plan.impl}_fwd")(
        x2d, params, spec, config=the_plan.launches[0].config
    )
    return y + residual2d if residual2d is not None else y


def _run_baseline(fn: Callable) -> Callable:
    return lambda x2d, params, spec, the_plan, residual2d: fn(x2d, params, spec, residual2d)


_RUNNERS: dict[str, Callable] = {
    "pallas_triton": _run_per_layer,
    "pallas_mosaic": _run_per_layer,
    "jax_triton": _run_per_layer,
    "fused_small": _run_whole,
    "fused_decode": _run_whole,
    "xla": _run_baseline(baselines.xla),
}


# twin-diff: torch runs eagerly; here the whole runner is one jitted computation (spec and plan are
# static), so the Pallas kernels and the glue between them compile together.
@functools.partial(jax.jit, static_argnames=("spec", "the_plan"))
def _run(x2d, params, residual2d, *, spec: MLPSpec, the_plan: Plan):
    return _RUNNERS[the_plan.impl](x2d, params, spec, the_plan, residual2d)


# ---- public function -----------------------------------------------------------------------------
def _dtype_name(a: jax.Array) -> str:
    return np.dtype(a.dtype).name


def _info(a: jax.Array) -> ArrayInfo:
    # twin-diff: no per-array device check; jax places arrays itself (and tracers have no device).
    return ArrayInfo(tuple(a.shape), _dtype_name(a))


def _is_array(a: object) -> bool:
    return isinstance(a, jax.Array)


def _check_types(x: object, params: object, config: object, residual: object) -> None:
    if not _is_array(x):
        raise TypeError(f"x: expected a jax.Array, got {type(x).__name__}")
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict of jax.Array, got {type(params).__name__}")
    for name, value in params.items():
        if not _is_array(value):
            raise TypeError(f"params[{name!r}]: expected a jax.Array, got {type(value).__name__}")
    if residual is not None and not _is_array(residual):
        raise TypeError(f"residual: expected a jax.Array or None, got {type(residual).__name__}")
    if config is not None and not isinstance(config, TileConfig):
        raise TypeError(
            f"config: expected a fusedmlp.common.TileConfig or None, got {type(config).__name__}"
        )


def mlp(
    x: jax.Array,
    params: Mapping[str, jax.Array],
    spec: MLPSpec,
    *,
    impl: str = AUTO,
    config: TileConfig | None = None,
    residual: jax.Array | None = None,
) -> jax.Array:
    """y = MLP(x) (+ residual) for x of shape [..., d_in]; returns [..., d_out] in the spec dtype.

    `impl` is one of `fusedmlp.common.impl_names("jax")` or "auto"; `config` pins one TileConfig for
    every kernel launch (None: the heuristic per layer). Callable inside `jax.jit` (spec static).
    """
    spec = check_spec(spec)
    check_impl(impl, STACK)
    _check_types(x, params, config, residual)
    check_call(
        spec,
        _info(x),
        {k: _info(v) for k, v in params.items()},
        _info(residual) if residual is not None else None,
    )
    device = "gpu" if compat.on_gpu() else "cpu"
    the_plan = plan(
        spec, tuple(x.shape), impl=impl, device=device, config=config, residual=residual is not None
    )
    reason = unavailable_reason(the_plan.impl, device)
    if reason is not None:
        raise ValueError(f"x: impl {the_plan.impl!r} cannot run on device {device}: {reason}")
    lead = tuple(x.shape[:-1])
    m = math.prod(lead)
    if m == 0:
        return jax.numpy.zeros((*lead, spec.d_out), x.dtype)
    x2d = x.reshape(m, spec.d_in)
    residual2d = residual.reshape(m, spec.d_out) if residual is not None else None
    y2d = _run(x2d, dict(params), residual2d, spec=spec, the_plan=the_plan)
    return y2d.reshape(*lead, spec.d_out)
