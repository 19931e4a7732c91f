"""`pack_params` for torch tensors: the packed gated layout of common/packing.py, done once.

Gate and up weights (and biases) of every gated layer become one interleaved operand, `wv{i}`
[K, 2·Np] (`bc{i}` [2·Np]), so the gated kernels run ONE GEMM per layer. Call it once at load (the
FusedMLP module and `from_hf` do), never per call: it reads and writes every gated weight.

Twin: jax_impl/packing.py (the same function on jax arrays).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fusedmlp.common import MLPSpec
from fusedmlp.common.packing import PACK_BLOCK, is_packed, packed_width


def pack_gated(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[..., N] gate and up -> [..., 2·Np], interleaved in blocks of PACK_BLOCK columns."""
    if w.shape != v.shape:
        raise ValueError(f"v: expected the shape of w, {list(w.shape)}, got {list(v.shape)}")
    n = w.shape[-1]
    half = packed_width(n) // 2
    lead = tuple(w.shape[:-1])
    pad = half - n
    blocks = [
        torch.nn.functional.pad(t, (0, pad)).reshape(*lead, half // PACK_BLOCK, 1, PACK_BLOCK)
        for t in (w, v)
    ]
    return torch.cat(blocks, dim=-2).reshape(*lead, 2 * half).contiguous()


def pack_params(spec: MLPSpec, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Params in the contract's names -> the packed names (already packed params pass through)."""
    if is_packed(params):
        return dict(params)
    out: dict[str, torch.Tensor] = {}
    for layer in spec.layers():
        i = layer.index
        if layer.gated:
            out[f"wv{i}"] = pack_gated(params[f"w{i}"], params[f"v{i}"])
            if layer.bias:
                out[f"bc{i}"] = pack_gated(params[f"b{i}"], params[f"c{i}"])
        else:
            out[f"w{i}"] = params[f"w{i}"]
            if layer.bias:
                out[f"b{i}"] = params[f"b{i}"]
    return out


def unpack_gated(packed: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `pack_gated` for a layer of width n: (w, v), padding dropped (views)."""
    width = packed_width(n)
    if packed.shape[-1] != width:
        raise ValueError(f"packed: expected {width} columns for width {n}, got {packed.shape[-1]}")
    lead = tuple(packed.shape[:-1])
    blocks = packed.reshape(*lead, width // (2 * PACK_BLOCK), 2, PACK_BLOCK)
    w = blocks[..., 0, :].reshape(*lead, width // 2)[..., :n]
    v = blocks[..., 1, :].reshape(*lead, width // 2)[..., :n]
    return w, v


def unpack_params(spec: MLPSpec, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Packed params -> the contract's names (plain params pass through): what the baselines and
    the kernels that take w and v apart read."""
    if not is_packed(params):
        return dict(params)
    out: dict[str, torch.Tensor] = {}
    for layer in spec.layers():
        i = layer.index
        if layer.gated:  # canonical order: w, b, v, c
            w, v = unpack_gated(params[f"wv{i}"], layer.d_out)
            out[f"w{i}"] = w
            if layer.bias:
                out[f"b{i}"], out[f"c{i}"] = unpack_gated(params[f"bc{i}"], layer.d_out)
            out[f"v{i}"] = v
            if layer.bias:
                out[f"c{i}"] = out.pop(f"c{i}")
        else:
            out[f"w{i}"] = params[f"w{i}"]
            if layer.bias:
                out[f"b{i}"] = params[f"b{i}"]
    return out
