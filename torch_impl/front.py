"""The PyTorch front: `mlp()` runs the fused MLP, `plan()` says which kernels would run and how.

Twin: jax_impl/front.py (the same sections, checks and messages). Layers: the front validates once
(common/validate.py, shared with the JAX front), flattens leading batch dims, asks `plan()` for an
implementation, and hands 2-D arrays to a runner; launchers and kernels trust what they get.

Dispatch is a registry (`_RUNNERS`), not `if impl ==` branches. `auto` picks, in order:
  1. `fused_small` — every width ≤ 128: the whole narrow MLP in one kernel;
  2. `fused_decode` — a 2-layer MLP at decode batch sizes (M ≤ 64): one launch, weights streamed
     once;
  3. `triton_tma` on Hopper where every layer meets TMA's 16-byte stride rule;
  4. `triton`, the portable kernels, everywhere else (and on the CPU, under Triton's interpreter).
The order of 1–3 is a default until the GPU measurements of the performance issue decide it.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from types import ModuleType

import torch

from fusedmlp.common import KernelLaunch, MLPSpec, Plan, TileConfig, heuristic_config
from fusedmlp.common.registry import AUTO, check_impl, get_implementation
from fusedmlp.common.validate import ArrayInfo, check_call, check_spec

from . import baselines
from .runtime import INTERPRET

STACK = "torch"
KERNEL_IMPLS = ("triton", "triton_tma", "fused_small", "fused_decode", "mosaic")
BASELINE_IMPLS = ("eager", "compile")
# Per-layer implementations: the package whose `linear_act` and `gated` modules hold the launchers.
# `mosaic` is the cross-stack route: jax_impl's Mosaic GPU kernels on torch tensors (GPU only; the
# one place the torch path imports jax, lazily: calling a kernel across stacks is its purpose).
_LAYER_PACKAGES = {
    "triton": "fusedmlp.torch_impl",
    "triton_tma": "fusedmlp.torch_impl.tma",
    "mosaic": "fusedmlp.torch_impl.cross",
}
_KERNEL_PREFIX = {"triton": "", "triton_tma": "tma.", "mosaic": "mosaic."}
# Whole-MLP implementations: a module with `supports(spec, m)` and `<name>_fwd(x2d, params, spec)`.
_WHOLE_MODULES = {
    "fused_small": "fusedmlp.torch_impl.fused_small",
    "fused_decode": "fusedmlp.torch_impl.fused_decode",
}


def _module(path: str) -> ModuleType:
    return importlib.import_module(path)


# ---- where an implementation can run ------------------------------------------------------------
def _is_hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def unavailable_reason(impl: str, device: str = "cpu") -> str | None:
    """None if `impl` can run on `device` ("cpu" or "cuda") here, interpreted or not; else why."""
    check_impl(impl, STACK)
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    if impl in BASELINE_IMPLS or impl == AUTO:
        return None
    if get_implementation(impl).gpu_only and (kind != "cuda" or not _is_hopper()):
        return f"{impl} calls Hopper kernels across stacks: it needs a Hopper GPU (no interpreter)"
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
    gpu_only = impl in KERNEL_IMPLS and get_implementation(impl).gpu_only
    on_cpu = torch.device(device).type == "cpu"
    return impl in KERNEL_IMPLS and not gpu_only and INTERPRET and on_cpu


# ---- plan ----------------------------------------------------------------------------------------
def _per_layer_launches(
    spec: MLPSpec, m: int, impl: str, config: TileConfig | None, residual: bool, tune: bool
) -> tuple[tuple[KernelLaunch, ...], str]:
    launches, fallbacks = [], []
    last = spec.num_layers - 1
    for layer in spec.layers():
        family = "gated" if layer.gated else "linear_act"
        prefix = _KERNEL_PREFIX[impl]
        if impl == "triton_tma":
            reason = _module("fusedmlp.torch_impl.tma").tma_unsupported_reason(
                m, layer.d_out, layer.d_in, spec.dtype
            )
            if reason is not None:
                prefix = ""
                fallbacks.append(f"layer {layer.index}: {reason}")
        if impl == "mosaic":
            cfg = config or _module("fusedmlp.jax_impl.mosaic").default_config(
                family, m, layer.d_out, layer.d_in, spec.dtype, interpret=False
            )
        elif tune and config is None and not INTERPRET:
            cfg = None  # tuned on the first call for this shape (torch_impl/tuning.py), then cached
        else:
            cfg = config or heuristic_config(
                family, m, layer.d_out, layer.d_in, spec.dtype, interpret=INTERPRET,
                persistent=prefix == "tma.",
            )
        launches.append(
            KernelLaunch(
                prefix + family,
                m,
                layer.d_out,
                layer.d_in,
                layer.activation,
                cfg,
                residual=residual and layer.index == last,
            )
        )
    return tuple(launches), "; ".join(fallbacks)


def _resolve_auto(spec: MLPSpec, m: int, device: str) -> tuple[str, str]:
    for name in ("fused_small", "fused_decode"):
        if _module(_WHOLE_MODULES[name]).supports(spec, m) is None:
            why = "every width <= 128" if name == "fused_small" else "2 layers at decode-sized M"
            return name, f"auto: {why}"
    if torch.device(device).type == "cuda" and _is_hopper():
        return "triton_tma", "auto: Hopper GPU"
    return "triton", "auto: portable kernels"


def plan(
    spec: MLPSpec,
    x_shape: tuple[int, ...] | torch.Size,
    *,
    impl: str = AUTO,
    device: str = "cpu",
    config: TileConfig | None = None,
    residual: bool = False,
    tune: bool = False,
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
        launches, fallback = _per_layer_launches(spec, m, chosen, config, residual, tune)
        return Plan(chosen, impl, launches, "; ".join(r for r in (reason, fallback) if r))
    launch = KernelLaunch(f"torch.{chosen}", m, spec.d_out, spec.d_in, spec.activation)
    return Plan(chosen, impl, (launch,), get_implementation(chosen).description)


# ---- runners: 2-D input, validated params, a plan -> 2-D output ---------------------------------
def _run_per_layer(x2d, params, spec, the_plan, residual2d):
    h = x2d
    for layer, launch in zip(spec.layers(), the_plan.launches, strict=True):
        i = layer.index
        # A triton_tma layer that cannot meet TMA's stride rule runs the portable kernel (see plan).
        package = _LAYER_PACKAGES[the_plan.impl if "." in launch.kernel else "triton"]
        precision = spec.fp32_precision
        family = "gated" if layer.gated else "linear_act"
        launcher = getattr(_module(f"{package}.{family}"), f"{family}_fwd")
        if launch.config is None:  # plan(tune=True) on a GPU: sweep once per shape, then cached
            launcher = _module("fusedmlp.torch_impl.tuning").tuned(family, launcher)
        if layer.gated:
            h = launcher(
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
            h = launcher(
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
    packed = _module("fusedmlp.torch_impl.packing").pack_params(spec, params)
    params = {k: v.contiguous() for k, v in packed.items()}
    y = getattr(module, f"{the_plan.impl}_fwd")(
        x2d, params, spec, config=the_plan.launches[0].config
    )
    return y + residual2d if residual2d is not None else y


def _run_baseline(fn: Callable) -> Callable:
    return lambda x2d, params, spec, the_plan, residual2d: fn(x2d, params, spec, residual2d)


_RUNNERS: dict[str, Callable] = {
    "triton": _run_per_layer,
    "triton_tma": _run_per_layer,
    "mosaic": _run_per_layer,
    "fused_small": _run_whole,
    "fused_decode": _run_whole,
    "eager": _run_baseline(baselines.run_eager),
    "compile": _run_baseline(baselines.run_compile),
}


# ---- public function -----------------------------------------------------------------------------
def _info(t: torch.Tensor) -> ArrayInfo:
    return ArrayInfo(tuple(t.shape), str(t.dtype).removeprefix("torch."), str(t.device))


def _check_types(x: object, params: object, config: object, residual: object) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict of torch.Tensor, got {type(params).__name__}")
    for name, value in params.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"params[{name!r}]: expected a torch.Tensor, got {type(value).__name__}"
            )
    if residual is not None and not isinstance(residual, torch.Tensor):
        raise TypeError(f"residual: expected a torch.Tensor or None, got {type(residual).__name__}")
    if config is not None and not isinstance(config, TileConfig):
        raise TypeError(
            f"config: expected a fusedmlp.common.TileConfig or None, got {type(config).__name__}"
        )


def mlp(
    x: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    spec: MLPSpec,
    *,
    impl: str = AUTO,
    config: TileConfig | None = None,
    residual: torch.Tensor | None = None,
    tune: bool = False,
) -> torch.Tensor:
    """y = MLP(x) (+ residual) for x of shape [..., d_in]; returns [..., d_out] in the spec dtype.

    `impl` is one of `fusedmlp.common.impl_names("torch")` or "auto"; `config` pins one TileConfig
    for
    every kernel launch (None: the heuristic per layer). `tune=True` on a GPU sweeps the configs of
    `common.tiling.search_space` once per shape and caches the winner (torch_impl/tuning.py).
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
    the_plan = plan(
        spec,
        tuple(x.shape),
        impl=impl,
        device=x.device.type,
        config=config,
        residual=residual is not None,
        tune=tune,
    )
    reason = unavailable_reason(the_plan.impl, x.device.type)
    if reason is not None:
        raise ValueError(f"x: impl {the_plan.impl!r} cannot run on device {x.device}: {reason}")
    lead = tuple(x.shape[:-1])
    m = math.prod(lead)
    if m == 0:
        return x.new_empty((*lead, spec.d_out))
    x2d = x.reshape(m, spec.d_in)
    residual2d = residual.reshape(m, spec.d_out) if residual is not None else None
    # Launchers index biases with unit stride (N elements: cheaper than more stride arguments).
    flat = {k: v.contiguous() if v.ndim == 1 else v for k, v in params.items()}
    y2d = _RUNNERS[the_plan.impl](x2d, flat, spec, the_plan, residual2d)
    return y2d.reshape(*lead, spec.d_out)
