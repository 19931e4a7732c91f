"""`pack_params` for torch tensors: the packed gated layout of common/packing.py, done once.

Gate and up weights (and biases) of every gated layer become one interleaved operand, `wv{i}`
[K, 2·Np] (`bc{i}` [2·Np]), so the gated kernels run ONE GEMM per layer. Call it once at load (the
FusedMLP module and `from_hf` do), never per call: it reads and writes every gated weight.

Twin: jax_impl/packing.py (the same function on jax arrays).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fusedmlp.common import MLPSpec, packing
from fusedmlp.common.packing import PACK_BLOCK, packed_width, unpack_gated, unpack_params

# unpack_gated and unpack_params reshape and slice only: common/packing.py's serve every stack.
__all__ = ["pack_gated", "pack_params", "unpack_gated", "unpack_params"]


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
    """Params in the contract's names -> the packed names (already packed params pass through):
    common/packing.py's walk over the layers with this stack's `pack_gated`."""
    return packing.pack_params(spec, params, pack_gated)
