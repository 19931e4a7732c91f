"""The one check layer: every input check of both stacks and its message live here.

Each stack supplies an `Adapter` that turns its arrays into the shared description (`ArrayInfo`:
shape, dtype name, device) and says what counts as an array; nothing here imports torch or jax.
The fronts call `check_call_inputs` once per call signature (the result is cached with the plan,
so a repeated call checks nothing again); the kernels' public functions call `check_layer`,
`check_packed_gated` (per layer) or `check_packed_call` (whole MLP) with their stack's adapter
(`torch_impl.front.ADAPTER`, `jax_impl.front.ADAPTER`), so both stacks raise the same exception
with the same message for the same mistake.

One exception type per kind of mistake, in both stacks:
- TypeError: the argument is not the kind of object expected (not an array, not a mapping, not an
  MLPSpec or TileConfig);
- ValueError: the right kind with a wrong value (shape, dtype, device, a name, an option);
- NotImplementedError (raised by the fronts and the kernels' public functions from the registry's
  `supports` functions): valid input that the requested implementation cannot take; the message
  names the constraint, the value and the fallback.
Messages name the argument, the expected and the actual value; shapes print as `[16, 8]`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from .config import SAVED_POLICIES, TileConfig, is_power_of_two_tile
from .dtypes import DTYPES, FP32_PRECISIONS
from .packing import is_packed, packed_names, packed_width
from .params import param_shapes
from .registry import IMPLEMENTATIONS, get_implementation
from .spec import KERNEL_ACTIVATIONS, MLPSpec


@dataclass(frozen=True)
class ArrayInfo:
    shape: tuple[int, ...]
    dtype: str  # the framework's dtype as text: "bfloat16", "float32", "int64", ...
    device: str = ""  # "" where the framework has no per-array device to compare (jax under jit)


@dataclass(frozen=True)
class Adapter:
    """What a stack tells the check layer about its arrays."""

    stack: str  # "torch" or "jax"
    array_type: str  # how messages name an array: "torch.Tensor", "jax.Array"
    is_array: Callable[[object], bool]
    describe: Callable[[Any], ArrayInfo]


def fmt_shape(shape: Sequence[int]) -> str:
    """A shape as every message prints it: `[16, 8]` (never a tuple's `(16, 8)`)."""
    return "[" + ", ".join(str(d) for d in shape) + "]"


_fmt = fmt_shape


# ---- arguments that are not arrays ---------------------------------------------------------------
def check_spec(spec: object) -> MLPSpec:
    if not isinstance(spec, MLPSpec):
        raise TypeError(f"spec: expected a fusedmlp.common.MLPSpec, got {type(spec).__name__}")
    return spec


def check_config(
    config: object, impl: str | None = None, *, training: bool = False
) -> TileConfig | None:
    """`config` if it is a TileConfig or None (TypeError otherwise); with `impl`, also that its
    tiles are ones `impl`'s kernels take: a block_n that is not a power of two (a Mosaic GPU
    width such as 192) is a ValueError for the Triton and Pallas-Triton kernels. `training`: the
    check is for the portable kernels a training step runs under a pinned config (the message
    says so, since the caller may have asked for a Mosaic GPU implementation)."""
    if config is not None and not isinstance(config, TileConfig):
        raise TypeError(
            f"config: expected a fusedmlp.common.TileConfig or None, got {type(config).__name__}"
        )
    if (
        impl is not None
        and config is not None
        and not is_power_of_two_tile(config)
        and get_implementation(impl).power_of_two_tiles
    ):
        takers = tuple(e.name for e in IMPLEMENTATIONS if not e.power_of_two_tiles)
        whose = (
            f"{impl!r}, whose kernels train under a pinned config (their tiles"
            if training
            else f"{impl!r} (its tiles"
        )
        raise ValueError(
            f"config.block_n: expected a power of two for {whose} are tl.arange ranges), got "
            f"{config.block_n}; only {takers} take a multiple of 64"
            + (", in their forward" if training else "")
        )
    return config


def check_types(
    adapter: Adapter, x: object, params: object, config: object, residual: object
) -> None:
    """TypeError naming the first argument that is not the kind of object expected."""
    kind = adapter.array_type
    if not adapter.is_array(x):
        raise TypeError(f"x: expected a {kind}, got {type(x).__name__}")
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict of {kind}, got {type(params).__name__}")
    for name, value in params.items():
        if not adapter.is_array(value):
            raise TypeError(f"params[{name!r}]: expected a {kind}, got {type(value).__name__}")
    if residual is not None and not adapter.is_array(residual):
        raise TypeError(f"residual: expected a {kind} or None, got {type(residual).__name__}")
    check_config(config)


def check_saved(saved: object) -> str:
    """The training policy `saved=` (config.SAVED_POLICIES); ValueError naming it otherwise (the
    same message in both stacks)."""
    if not isinstance(saved, str) or saved not in SAVED_POLICIES:
        raise ValueError(f"saved: expected one of {SAVED_POLICIES}, got {saved!r}")
    return saved


# ---- a whole-MLP call ----------------------------------------------------------------------------
def expected_params(spec: MLPSpec, params: Mapping[str, object]) -> dict[str, tuple[int, ...]]:
    """The names and shapes `params` must have: the packed ones (common/packing.py) when it uses
    the packed names (any `wv{i}`), else the contract's."""
    return packed_names(spec) if is_packed(params) else param_shapes(spec)


def check_call(
    spec: MLPSpec,
    x: ArrayInfo,
    params: Mapping[str, ArrayInfo],
    residual: ArrayInfo | None = None,
    *,
    packed_only: bool = False,
    pack_hint: str = "",
) -> None:
    """Every value check of `mlp(x, params, spec, residual=...)`; ValueError naming what is wrong.
    `params` may use the contract's names or the packed ones (`pack_params`); with `packed_only`
    (the whole-MLP kernels) only the packed ones, and a message for missing names ends with
    `pack_hint` (how to pack)."""
    if len(x.shape) < 1 or x.shape[-1] != spec.d_in:
        raise ValueError(f"x: expected shape [..., {spec.d_in}], got {_fmt(x.shape)}")
    if x.dtype != spec.dtype:
        raise ValueError(f"x: expected dtype {spec.dtype} (the spec's), got {x.dtype}")
    as_packed = packed_only or is_packed(params)
    expected = packed_names(spec) if packed_only else expected_params(spec, params)
    missing = [n for n in expected if n not in params]
    extra = sorted(n for n in params if n not in expected)
    packed = " (packed)" if as_packed else ""
    if missing:
        hint = f"; pack once with {pack_hint}" if pack_hint and not is_packed(params) else ""
        raise ValueError(
            f"params: missing {missing}; the spec {spec} needs{packed} {list(expected)}{hint}"
        )
    if extra:
        raise ValueError(
            f"params: unexpected {extra}; the spec {spec} needs{packed} {list(expected)}"
        )
    for name, shape in expected.items():
        info = params[name]
        if info.shape != shape:
            raise ValueError(
                f"params[{name!r}]: expected shape {_fmt(shape)}, got {_fmt(info.shape)}"
            )
        if info.dtype != spec.dtype:
            raise ValueError(f"params[{name!r}]: expected dtype {spec.dtype}, got {info.dtype}")
        if x.device and info.device and info.device != x.device:
            raise ValueError(
                f"params[{name!r}]: expected device {x.device} (the device of x), got {info.device}"
            )
    if residual is not None:
        want = (*x.shape[:-1], spec.d_out)
        if residual.shape != want:
            raise ValueError(f"residual: expected shape {_fmt(want)}, got {_fmt(residual.shape)}")
        if residual.dtype != spec.dtype:
            raise ValueError(f"residual: expected dtype {spec.dtype}, got {residual.dtype}")
        if x.device and residual.device and residual.device != x.device:
            raise ValueError(
                f"residual: expected device {x.device} (the device of x), got {residual.device}"
            )


def check_call_inputs(
    adapter: Adapter,
    spec: object,
    x: object,
    params: object,
    config: object = None,
    residual: object = None,
) -> MLPSpec:
    """Every check of a front's `mlp()` in order: spec, types, then values. Returns the spec."""
    spec = check_spec(spec)
    check_types(adapter, x, params, config, residual)
    describe = adapter.describe
    check_call(
        spec,
        describe(x),
        {k: describe(v) for k, v in params.items()},  # type: ignore[union-attr]
        describe(residual) if residual is not None else None,
    )
    return spec


def check_packed_call(
    adapter: Adapter,
    spec: object,
    x: object,
    params: object,
    config: object = None,
    *,
    config_types: tuple[type, ...] = (TileConfig,),
) -> MLPSpec:
    """Every check of a whole-MLP public function, `fused_small(x, params, spec, config=...)` or
    `fused_decode(...)`: those of a front's `mlp()`, with params in the packed layout only (the
    whole-MLP kernels read `wv{i}`/`bc{i}` of gated layers, packed once, never per call) and
    `config` one of `config_types` or None. Returns the spec."""
    spec = check_spec(spec)
    check_types(adapter, x, params, None, None)
    if config is not None and not isinstance(config, config_types):
        names = ", ".join(t.__name__ for t in config_types)
        raise TypeError(f"config: expected a {names} or None, got {type(config).__name__}")
    describe = adapter.describe
    check_call(
        spec,
        describe(x),
        {k: describe(v) for k, v in params.items()},  # type: ignore[union-attr]
        packed_only=True,
        pack_hint=f"fusedmlp.{adapter.stack}_impl.packing.pack_params(spec, params)",
    )
    return spec


# ---- one layer (the kernels' per-layer public functions) -----------------------------------------
class LayerShape(NamedTuple):
    """What a per-layer check returns: the dtype of x, its K and the layer's output width N."""

    dtype: str
    k: int
    n: int


def check_array(
    adapter: Adapter,
    name: str,
    a: object,
    *,
    shape: Sequence[int] | None,
    dtype: str | None,
    ndim_min: int = 1,
) -> ArrayInfo:
    """TypeError unless `a` is an array; ValueError unless it has `shape` (None: at least
    `ndim_min` dims) and `dtype` (None: one of the contract's DTYPES)."""
    if not adapter.is_array(a):
        raise TypeError(f"{name}: expected a {adapter.array_type}, got {type(a).__name__}")
    info = adapter.describe(a)
    if dtype is None:
        if info.dtype not in DTYPES:
            raise ValueError(f"{name}: expected dtype one of {DTYPES}, got {info.dtype}")
    elif info.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {dtype}, got {info.dtype}")
    if shape is None:
        if len(info.shape) < ndim_min:
            raise ValueError(
                f"{name}: expected at least {ndim_min} dim(s), got shape {_fmt(info.shape)}"
            )
    elif tuple(info.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {_fmt(shape)}, got {_fmt(info.shape)}")
    return info


def check_options(
    activation: str,
    fp32_precision: str,
    dtype: str,
    config: object,
    activations: Sequence[str] = KERNEL_ACTIVATIONS,
    impl: str | None = None,
) -> None:
    if activation not in activations:
        raise ValueError(f"activation: expected one of {tuple(activations)}, got {activation!r}")
    if fp32_precision not in FP32_PRECISIONS:
        raise ValueError(
            f"fp32_precision: expected one of {FP32_PRECISIONS}, got {fp32_precision!r}"
        )
    if fp32_precision == "tf32" and dtype != "float32":
        raise ValueError(
            f"fp32_precision: 'tf32' applies to dtype 'float32' only, got dtype {dtype!r}"
        )
    check_config(config, impl)


def check_layer(
    adapter: Adapter,
    x: object,
    w: object,
    b: object = None,
    *,
    residual: object = None,
    activation: str,
    config: object,
    fp32_precision: str,
    activations: Sequence[str] = KERNEL_ACTIVATIONS,
    impl: str | None = None,
) -> LayerShape:
    """Every check of a per-layer public function, `linear_act(x, w, b, residual=...)`:
    x [..., K], w [K, N], b [N], residual [..., N], all in x's dtype, on x's device. Returns
    (dtype, K, N)."""
    xi = check_array(adapter, "x", x, shape=None, dtype=None)
    dtype, k = xi.dtype, xi.shape[-1]
    n = check_array(adapter, "w", w, shape=None, dtype=dtype, ndim_min=2).shape[-1]
    infos = {"w": check_array(adapter, "w", w, shape=[k, n], dtype=dtype)}
    if b is not None:
        infos["b"] = check_array(adapter, "b", b, shape=[n], dtype=dtype)
    if residual is not None:
        infos["residual"] = check_array(
            adapter, "residual", residual, shape=[*xi.shape[:-1], n], dtype=dtype
        )
    check_options(activation, fp32_precision, dtype, config, activations, impl)
    _check_devices(xi, infos)
    return LayerShape(dtype, k, n)


def _check_devices(x: ArrayInfo, others: Mapping[str, ArrayInfo]) -> None:
    for name, info in others.items():
        if x.device and info.device and info.device != x.device:
            raise ValueError(f"{name}: expected device {x.device}, got {info.device}")


def check_packed_gated(
    adapter: Adapter,
    x: object,
    wv: object,
    bc: object = None,
    *,
    n: int,
    activation: str,
    config: object,
    fp32_precision: str,
    activations: Sequence[str] = KERNEL_ACTIVATIONS,
    impl: str | None = None,
) -> LayerShape:
    """Every check of a packed gated public function, `gated(x, wv, bc=None, *, n, ...)`:
    x [..., K], wv [K, packed_width(n)] and bc [packed_width(n)] (common/packing.py) in x's dtype,
    on x's device. Returns (dtype, K, n)."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n: expected an int (the layer's output width), got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n: expected a positive int (the layer's output width), got {n!r}")
    xi = check_array(adapter, "x", x, shape=None, dtype=None)
    dtype, k, width = xi.dtype, xi.shape[-1], packed_width(n)
    infos = {"wv": check_array(adapter, "wv", wv, shape=[k, width], dtype=dtype)}
    if bc is not None:
        infos["bc"] = check_array(adapter, "bc", bc, shape=[width], dtype=dtype)
    check_options(activation, fp32_precision, dtype, config, activations, impl)
    _check_devices(xi, infos)
    return LayerShape(dtype, k, n)
