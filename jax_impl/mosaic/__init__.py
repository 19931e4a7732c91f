"""Mosaic GPU siblings of the Pallas kernels (impl `pallas_mosaic`): TMA, wgmma, warpgroups.

`linear_act` and `gated` export the same names as jax_impl/linear_act.py and jax_impl/gated.py
(`linear_act_fwd`/`linear_act`, `gated_fwd`/`gated`), so the dispatcher swaps modules; inputs this
implementation cannot take (float32) raise NotImplementedError with `unsupported_reason`'s text.
"""

from .pipeline import INTERPRET_CONFIG, default_config, unsupported_reason

__all__ = ["INTERPRET_CONFIG", "default_config", "unsupported_reason"]
