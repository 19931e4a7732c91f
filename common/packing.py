"""The packed gated layout: W and V of a gated layer as ONE `[K, 2·Np]` operand, packed once.

A gated hidden layer computes `act(x·W + b) ⊙ (x·V + c)`. Two GEMMs over the same X tile cost two
accumulators, two MMA groups to wait on and X read twice from shared memory; one GEMM over `[W|V]`
with a `[BLOCK_M, 2·BLOCK_N]` accumulator costs neither. For the epilogue to find the gate and the
up columns of one output tile inside its own accumulator, the two are interleaved in blocks of
`PACK_BLOCK` columns (quack and tokamax interleave the same way):

    packed[:, 2·j·P     : 2·j·P + P]   = W[:, j·P : (j+1)·P]     (gate, block j)
    packed[:, 2·j·P + P : 2·(j+1)·P]   = V[:, j·P : (j+1)·P]     (up,   block j)

with P = PACK_BLOCK and j = 0 … ceil(N/P) − 1. When P does not divide N the last block of each is
padded with zero columns, so `Np = ceil(N/P)·P` and the packed width is `2·Np` (always a multiple of
16 bytes, as TMA wants). Biases pack the same way: `bc[2·j·P : 2·j·P + P] = b[j·P : (j+1)·P]`, then
c's block. A kernel whose packed N tile is `2·P·s` wide (s = 1, 2, …) holds s whole (gate, up)
block pairs and writes the `P·s` hidden columns they make; the zero padding meets only output
columns ≥ N, which no kernel stores.

P is fixed at 64: a 128-wide packed tile (fp32, small M) holds one pair, a 256-wide one (16-bit
large M) holds two, and the epilogue splits its accumulator along an outer dimension, which moves
no data between threads. The layout is a storage choice only: the float64 reference and the golden
files keep W and V apart, and `unpack_gated` gives them back bit for bit.

Names in a packed params dict: `wv{i}` replaces `w{i}` and `v{i}`, `bc{i}` replaces `b{i}` and
`c{i}`, for every gated layer i; other layers keep their names. The walk over the layers
(`pack_params`, `unpack_params`) and `unpack_gated` (reshapes and slices only) are written once,
here, for any array type; each stack supplies only its `pack_gated` (torch_impl/packing.py,
jax_impl/packing.py), whose padding and concatenation are the framework's own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from .spec import MLPSpec

PACK_BLOCK = 64
# NumPy arrays here; torch tensors and jax arrays in the stacks' packing modules.
ArrayT = TypeVar("ArrayT", bound=Any)


def packed_width(n: int) -> int:
    """Columns of the packed operand for a gated layer of width n: 2·ceil(n/P)·P."""
    if n < 0:
        raise ValueError(f"n: expected a width >= 0, got {n}")
    return 2 * -(-n // PACK_BLOCK) * PACK_BLOCK


def packed_names(spec: MLPSpec) -> dict[str, tuple[int, ...]]:
    """Every packed param's name and shape, in canonical order (per layer: wv|w, then bc|b)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in spec.layers():
        i = layer.index
        if layer.gated:
            width = packed_width(layer.d_out)
            shapes[f"wv{i}"] = (layer.d_in, width)
            if layer.bias:
                shapes[f"bc{i}"] = (width,)
        else:
            shapes[f"w{i}"] = (layer.d_in, layer.d_out)
            if layer.bias:
                shapes[f"b{i}"] = (layer.d_out,)
    return shapes


def is_packed(params: Mapping[str, object]) -> bool:
    """True when `params` uses the packed names (any `wv{i}` key)."""
    return any(name.startswith("wv") for name in params)


def _pad_columns(a: np.ndarray, width: int) -> np.ndarray:
    pad = [(0, 0)] * (a.ndim - 1) + [(0, width - a.shape[-1])]
    return np.pad(a, pad)


def pack_gated(w: np.ndarray, v: np.ndarray) -> np.ndarray:
    """[..., N] gate and up (weights [K, N] or biases [N]) -> [..., 2·Np] interleaved by blocks."""
    if w.shape != v.shape:
        raise ValueError(f"v: expected the shape of w, {list(w.shape)}, got {list(v.shape)}")
    n = w.shape[-1]
    half = packed_width(n) // 2
    blocks = half // PACK_BLOCK
    lead = w.shape[:-1]
    w_b = _pad_columns(w, half).reshape(*lead, blocks, 1, PACK_BLOCK)
    v_b = _pad_columns(v, half).reshape(*lead, blocks, 1, PACK_BLOCK)
    return np.concatenate([w_b, v_b], axis=-2).reshape(*lead, 2 * half)


def unpack_gated(packed: ArrayT, n: int) -> tuple[ArrayT, ArrayT]:
    """The inverse of `pack_gated` for a layer of width n: (w, v), padding dropped. Reshapes and
    slices only, so it serves NumPy, torch and jax arrays alike."""
    width = packed_width(n)
    if packed.shape[-1] != width:
        raise ValueError(f"packed: expected {width} columns for width {n}, got {packed.shape[-1]}")
    lead = tuple(packed.shape[:-1])
    blocks = packed.reshape(*lead, width // (2 * PACK_BLOCK), 2, PACK_BLOCK)
    w = blocks[..., 0, :].reshape(*lead, width // 2)[..., :n]
    v = blocks[..., 1, :].reshape(*lead, width // 2)[..., :n]
    return w, v


def pack_params(
    spec: MLPSpec,
    params: Mapping[str, ArrayT],
    pack: Callable[[ArrayT, ArrayT], ArrayT] = pack_gated,
) -> dict[str, ArrayT]:
    """Params in the contract's names -> the packed names (see the module docstring); already
    packed params pass through. `pack`: the stack's `pack_gated` (NumPy's by default)."""
    if is_packed(params):
        return dict(params)
    out: dict[str, ArrayT] = {}
    for layer in spec.layers():
        i = layer.index
        if layer.gated:
            out[f"wv{i}"] = pack(params[f"w{i}"], params[f"v{i}"])
            if layer.bias:
                out[f"bc{i}"] = pack(params[f"b{i}"], params[f"c{i}"])
        else:
            out[f"w{i}"] = params[f"w{i}"]
            if layer.bias:
                out[f"b{i}"] = params[f"b{i}"]
    return out


def unpack_params(spec: MLPSpec, params: Mapping[str, ArrayT]) -> dict[str, ArrayT]:
    """Packed params -> the contract's names, in canonical order (per layer w, b, v, c); plain
    params pass through. What the baselines and the kernels that take w and v apart read."""
    if not is_packed(params):
        return dict(params)
    out: dict[str, ArrayT] = {}
    for layer in spec.layers():
        i = layer.index
        if layer.gated:
            w, v = unpack_gated(params[f"wv{i}"], layer.d_out)
            b, c = unpack_gated(params[f"bc{i}"], layer.d_out) if layer.bias else (None, None)
            named = {f"w{i}": w, f"b{i}": b, f"v{i}": v, f"c{i}": c}
            out |= {name: a for name, a in named.items() if a is not None}
        else:
            out[f"w{i}"] = params[f"w{i}"]
            if layer.bias:
                out[f"b{i}"] = params[f"b{i}"]
    return out
