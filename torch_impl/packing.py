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
__all__ = ["is_k_major", "k_major", "pack_gated", "pack_params", "unpack_gated", "unpack_params"]


def is_k_major(w: torch.Tensor) -> bool:
    """True when a [K, N] `w` is the transposed view of a row-major [N, K] buffer (`w_nk.t()`).

    The Hopper TMA kernels then read it K-major, as it is, instead of copying it row-major.
    A [K, N] that is row-major as well (N == 1 or K == 1) counts as row-major.
    """
    k, n = w.shape
    return not w.is_contiguous() and w.stride() == (1, k) and n > 1


def k_major(w: torch.Tensor) -> torch.Tensor:
    """A [K, N] weight as the [K, N] view of a row-major [N, K] copy (itself if it is one): the
    layout float32 "tf32" products read without a pass through registers on Hopper (wgmma takes
    32-bit operands K-major only). Reads and writes the whole weight: once, not per call."""
    return w if is_k_major(w) else w.t().contiguous().t()


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
