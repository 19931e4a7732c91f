"""Baselines of the PyTorch stack: plain torch ops in the spec dtype (`eager`) and `torch.compile`
of the same function (`compile`). Twin: jax_impl/baselines.py (`xla`).

These are what a user without this project writes; the harness times every kernel against them and
the tolerance policy's baseline rule (error ≤ 2 × the framework's own + a floor) is measured
against `eager`. They take the contract's plain params (`w{i}`, `v{i}`, ...): the front unpacks
packed ones for them, once.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from fusedmlp.common import MLPSpec

_ACTIVATIONS = {
    "identity": lambda z: z,
    "relu": F.relu,
    "gelu": functools.partial(F.gelu, approximate="none"),
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
}


def _matmul_precision(spec: MLPSpec) -> str:
    return "high" if spec.fp32_precision == "tf32" else "highest"


def eager(
    x2d: torch.Tensor,
    params: dict[str, torch.Tensor],
    spec: MLPSpec,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = MLP(x) with torch.addmm and torch.nn.functional activations, spec dtype."""
    h = x2d
    for layer in spec.layers():
        i = layer.index
        act = _ACTIVATIONS[layer.activation]
        b = params.get(f"b{i}")
        z = torch.addmm(b, h, params[f"w{i}"]) if b is not None else h @ params[f"w{i}"]
        out = act(z)
        if layer.gated:
            c = params.get(f"c{i}")
            g = torch.addmm(c, h, params[f"v{i}"]) if c is not None else h @ params[f"v{i}"]
            out = out * g
        h = out
    return h + residual if residual is not None else h


@contextlib.contextmanager
def fp32_matmul_precision(spec: MLPSpec) -> Iterator[None]:
    """cuBLAS float32 products in IEEE or TF32 as the spec says (the flag only matters on CUDA)."""
    if spec.dtype != "float32" or not torch.cuda.is_available():
        yield
        return
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = spec.fp32_precision
    try:
        yield
    finally:
        matmul.fp32_precision = previous


def run_eager(x2d, params, spec, residual=None):
    with fp32_matmul_precision(spec):
        return eager(x2d, params, spec, residual)


@functools.cache
def _compiled(spec: MLPSpec):
    # One compiled function per spec; dynamic=False keeps shapes static, as a deployed model's are.
    return torch.compile(functools.partial(eager, spec=spec), dynamic=False)


def run_compile(x2d, params, spec, residual=None):
    with fp32_matmul_precision(spec):
        return _compiled(spec)(x2d, params, residual=residual)
