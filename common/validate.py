"""Front-door validation shared by both fronts, one message per mistake in each stack.

The fronts describe their arrays as (shape, dtype name, device) and call `check_call`; nothing here
imports torch or jax. Messages name the argument, the expected and the actual value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .params import param_shapes
from .spec import MLPSpec


@dataclass(frozen=True)
class ArrayInfo:
    shape: tuple[int, ...]
    dtype: str  # the framework's dtype as text: "bfloat16", "float32", "int64", ...
    device: str = ""  # "" where the framework has no per-array device to compare (jax under jit)


def _fmt(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def check_spec(spec: object) -> MLPSpec:
    if not isinstance(spec, MLPSpec):
        raise TypeError(f"spec: expected a fusedmlp.common.MLPSpec, got {type(spec).__name__}")
    return spec


def check_call(
    spec: MLPSpec,
    x: ArrayInfo,
    params: Mapping[str, ArrayInfo],
    residual: ArrayInfo | None = None,
) -> None:
    """Every check of `mlp(x, params, spec, residual=...)`; ValueError naming what is wrong."""
    if len(x.shape) < 1 or x.shape[-1] != spec.d_in:
        raise ValueError(f"x: expected shape [..., {spec.d_in}], got {_fmt(x.shape)}")
    if x.dtype != spec.dtype:
        raise ValueError(f"x: expected dtype {spec.dtype} (the spec's), got {x.dtype}")
    expected = param_shapes(spec)
    missing = [n for n in expected if n not in params]
    extra = sorted(n for n in params if n not in expected)
    if missing:
        raise ValueError(f"params: missing {missing}; the spec {spec} needs {list(expected)}")
    if extra:
        raise ValueError(f"params: unexpected {extra}; the spec {spec} needs {list(expected)}")
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
