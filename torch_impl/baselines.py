"""Baselines of the PyTorch stack: plain torch ops in the spec dtype (`eager`) and `torch.compile`
of the same function (`compile`). Twin: jax_impl/baselines.py (`xla`).

These are what a user without this project writes; the harness times every kernel against them and
the tolerance policy's baseline rule (error ≤ 2 × the framework's own + a floor) is measured
against `eager`. They take the params in either layout, as the caller holds them (registry layout
"any"): the contract's plain names (`w{i}`, `v{i}`, ...), or the packed ones of a FusedMLP, run
by `eager_packed` — no plain copy of a packed module's weights is ever made for them.

Two ways FusedMLP runs the "compile" baseline without paying torch.compile twice (issue 23):
`eager_packed`, the same ops on the packed params, which a compiled FusedMLP traces into the
caller's graph; and `run_compiled_graph`, the Inductor graph of `run_compile` called without
Dynamo's per-call guards, which an eager `auto` runs. Twin-diff: jax.jit traces `xla` into the
caller's computation by itself, so the JAX stack needs neither.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from fusedmlp.common import MLPSpec
from fusedmlp.common.packing import PACK_BLOCK, is_packed, packed_width

from .tf32 import emulated_tf32_matmul

_ACTIVATIONS = {
    "identity": lambda z: z,
    "relu": F.relu,
    "gelu": functools.partial(F.gelu, approximate="none"),
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
}


def _matmul_precision(spec: MLPSpec) -> str:
    return "high" if spec.fp32_precision == "tf32" else "highest"


def emulates_tf32(spec: MLPSpec, x: torch.Tensor) -> bool:
    """Whether the baseline's products round their operands to tf32 themselves: float32 "tf32"
    on the CPU, which has no tf32 products (cuBLAS on a GPU rounds them: the flag of
    `fp32_matmul_precision` asks it to). Without this the CPU's "tf32" baseline would be exact
    float32, and the 2× rule would judge a correctly rounding kernel against an error it cannot
    have (common/dtypes.py)."""
    return spec.dtype == "float32" and spec.fp32_precision == "tf32" and x.device.type == "cpu"


def _affine(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, tf32: bool) -> torch.Tensor:
    """h·w + b as torch.addmm computes it, or of tf32-rounded operands (`emulates_tf32`)."""
    if tf32:
        z = emulated_tf32_matmul(h, w)
        return z + b if b is not None else z
    return torch.addmm(b, h, w) if b is not None else h @ w


def eager(
    x2d: torch.Tensor,
    params: dict[str, torch.Tensor],
    spec: MLPSpec,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = MLP(x) with torch.addmm and torch.nn.functional activations, spec dtype. Packed params
    (common/packing.py) run `eager_packed`: the same ops, a gated layer's two products as one."""
    tf32 = emulates_tf32(spec, x2d)
    if is_packed(params):
        return eager_packed(x2d, params, packed_recipe(spec), residual, emulate_tf32=tf32)
    h = x2d
    for layer in spec.layers():
        i = layer.index
        act = _ACTIVATIONS[layer.activation]
        out = act(_affine(h, params[f"w{i}"], params.get(f"b{i}"), tf32))
        if layer.gated:
            out = out * _affine(h, params[f"v{i}"], params.get(f"c{i}"), tf32)
        h = out
    return h + residual if residual is not None else h


# ---- the same ops on FusedMLP's packed params, for a compiled FusedMLP -------------------------
# One entry per layer, primitives only (no MLPSpec: FusedMLP's traced forward must not carry a
# dataclass, see custom_op.py): (index, activation, gated, d_out, packed half-width Np).
LayerRecipe = tuple[int, str, bool, int, int]


def packed_recipe(spec: MLPSpec) -> tuple[LayerRecipe, ...]:
    """What `eager_packed` needs of `spec`, as primitives (built once, outside a trace)."""
    return tuple(
        (la.index, la.activation, la.gated, la.d_out, packed_width(la.d_out) // 2)
        for la in spec.layers()
    )


def eager_packed(
    x2d: torch.Tensor,
    params: dict[str, torch.Tensor],
    recipe: tuple[LayerRecipe, ...],
    residual: torch.Tensor | None = None,
    emulate_tf32: bool = False,
) -> torch.Tensor:
    """`eager` on the packed layout (common/packing.py): a gated layer is ONE product with
    [W|V] interleaved in blocks of PACK_BLOCK columns, split by a view. What a compiled FusedMLP
    traces where its plan is "compile" (module._traces_baseline): Inductor then fuses these ops
    into the caller's graph as it does the module the FusedMLP replaced, with no opaque op and
    no copy of the weights in the plain layout. Same products, same activations, same roundings
    as `eager` (each product rounded to the spec dtype, then the activation and the gate);
    `emulate_tf32` as `eager` decides it (`emulates_tf32`)."""
    h = x2d
    for i, activation, gated, n, half in recipe:
        act = _ACTIVATIONS[activation]
        weight, bias = ("wv", "bc") if gated else ("w", "b")
        z = _affine(h, params[f"{weight}{i}"], params.get(f"{bias}{i}"), emulate_tf32)
        if gated:
            blocks = z.view(z.shape[0], half // PACK_BLOCK, 2, PACK_BLOCK)
            h = (act(blocks[:, :, 0]) * blocks[:, :, 1]).reshape(z.shape[0], half)[:, :n]
        else:
            h = act(z)
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


# ---- the compiled baseline's graph without Dynamo, for `auto` -----------------------------------
# `auto` runs the "compile" baseline where the dispatch table measured it fastest. Called through
# torch.compile that costs Dynamo's guards and wrappers on every call: on the H200's host ~100 µs
# at llama-sized M = 512 (FusedMLP 215 µs of host time a call against 85 µs of kernels; the HF
# module 90). The front has already checked and keyed the call's signature, so `auto` runs the
# same Inductor graph directly: traced once per signature (make_fx: the ops `eager` runs) and
# compiled by Inductor (the kernels torch.compile generates for it). `impl="compile"` keeps
# torch.compile itself: the harness times that baseline as its users run it.
_GRAPHS: dict[tuple, Callable] = {}
_GRAPHS_MAX = 256  # compiled graphs kept (one per call signature)
_COMPILE_LOCK = threading.Lock()


def _layout(t: torch.Tensor) -> tuple:
    return (t.shape, t.stride(), t.dtype, t.device)


def run_compiled_graph(x2d, params, spec, residual=None):
    """`run_compile`'s Inductor graph called without Dynamo: inference only, outside autocast
    (the front calls `run_compile` where a gradient is to be built or autocast is on: make_fx
    records autocast's casts in the graph, and this cache is keyed on the tensors alone)."""
    names = tuple(params)
    tensors = (x2d, *params.values(), *(() if residual is None else (residual,)))
    key = (spec, names, residual is not None, tuple(map(_layout, tensors)))
    graph = _GRAPHS.get(key)
    with fp32_matmul_precision(spec):
        if graph is None:
            # One compile at a time (make_fx and Inductor keep process-global state; Dynamo has
            # its own lock for torch.compile), and a graph another thread made meanwhile is used.
            with _COMPILE_LOCK:
                graph = _GRAPHS.get(key)
                if graph is None:
                    graph = _compile_graph(spec, names, residual is not None, tensors)
                    if len(_GRAPHS) >= _GRAPHS_MAX:
                        _GRAPHS.clear()
                    _GRAPHS[key] = graph
        return graph(*tensors)


def _compile_graph(spec, names, has_residual, tensors) -> Callable:
    from torch.fx.experimental.proxy_tensor import make_fx

    def mlp(x2d, *rest):
        params = dict(zip(names, rest[: len(names)], strict=True))
        return eager(x2d, params, spec, rest[len(names)] if has_residual else None)

    with torch.no_grad():
        graph = make_fx(mlp, tracing_mode="fake")(*tensors)
        return torch._inductor.compile(graph, list(tensors))
