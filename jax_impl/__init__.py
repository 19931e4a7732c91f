"""The JAX path: Pallas kernels (Pallas-Triton twins, Mosaic GPU siblings) and the JAX front.

from fusedmlp.jax_impl import mlp, plan
y = mlp(x, params, spec)            # impl="auto"; or "pallas_triton", "pallas_mosaic", ...
"""

from . import compat
from .front import is_interpreted, mlp, plan, unavailable_reason

compat.filter_pallas_triton_deprecation()

__all__ = ["is_interpreted", "mlp", "plan", "unavailable_reason"]

# ---- low-rank factorised MLPs (issue 26) ---------------------------------------------------------
from .lowrank_front import factorise, lowrank_mlp  # noqa: E402

__all__ += ["factorise", "lowrank_mlp"]
