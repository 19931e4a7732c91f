"""Triton Hopper kernels (impl `triton_tma`): tensor descriptors, persistent grouped grid.

Modules `linear_act` and `gated` export the same names as the portable kernels in `torch_impl/`
(`_linear_act_fwd_kernel`, `linear_act_fwd`, `linear_act`; `_gated_fwd_kernel`, `gated_fwd`,
`gated`), so the dispatcher swaps packages. `tma_unsupported_reason(m, n, k, dtype)` says when a
layer breaks TMA's 16-byte stride rule and must run impl `triton`; the public functions fall back
by themselves.
"""

from .support import tma_unsupported_reason

__all__ = ["tma_unsupported_reason"]
