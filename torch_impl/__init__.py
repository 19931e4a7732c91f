"""The PyTorch path: Triton kernels and the PyTorch front.

from fusedmlp.torch_impl import mlp, plan
y = mlp(x, params, spec)            # impl="auto"; or "triton", "triton_tma", "fused_small", ...
"""

from . import runtime  # noqa: F401  (first: sets TRITON_INTERPRET on a machine without CUDA)
from .front import is_interpreted, mlp, plan, unavailable_reason

__all__ = ["is_interpreted", "mlp", "plan", "unavailable_reason"]
