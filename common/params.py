"""Parameter naming and deterministic initialisation, shared by both stacks.

Params are a flat dict: `w{i}`, `b{i}` for layer i, and `v{i}`, `c{i}` for the linear branch of a
gated hidden layer. Weights are `[in, out]` (`x @ W`); converters to `nn.Linear`'s `[out, in]` live
in `torch_impl/`. The packed layout of gated layers (`wv{i}`, `bc{i}`) is common/packing.py's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .dtypes import cast
from .spec import MLPSpec


def param_shapes(spec: MLPSpec) -> dict[str, tuple[int, ...]]:
    """Every param's name and shape, in canonical order (w, b, v, c per layer)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in spec.layers():
        i = layer.index
        shapes[f"w{i}"] = (layer.d_in, layer.d_out)
        if layer.bias:
            shapes[f"b{i}"] = (layer.d_out,)
        if layer.gated:
            shapes[f"v{i}"] = (layer.d_in, layer.d_out)
            if layer.bias:
                shapes[f"c{i}"] = (layer.d_out,)
    return shapes


def init_params(spec: MLPSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic params in the spec's dtype: N(0, 1)/sqrt(fan_in), weights and biases."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(spec).items():
        fan_in = shape[0] if len(shape) == 2 else spec.widths[int(name[1:])]
        values = rng.standard_normal(shape) / np.sqrt(fan_in)
        params[name] = cast(values, spec.dtype)
    return params


def make_input(
    spec: MLPSpec, shape: int | Sequence[int], seed: int = 1, *, scale: float = 1.0
) -> np.ndarray:
    """Random N(0, scale²) input of shape `[*shape, d_in]` (int: `[M, d_in]`), spec dtype."""
    lead = (shape,) if isinstance(shape, int) else tuple(shape)
    rng = np.random.default_rng(seed)
    return cast(scale * rng.standard_normal((*lead, spec.d_in)), spec.dtype)


def make_grad_output(spec: MLPSpec, shape: int | Sequence[int], seed: int = 2) -> np.ndarray:
    """Random upstream gradient dy of shape `[*shape, d_out]` in the spec dtype."""
    lead = (shape,) if isinstance(shape, int) else tuple(shape)
    rng = np.random.default_rng(seed)
    return cast(rng.standard_normal((*lead, spec.d_out)), spec.dtype)
