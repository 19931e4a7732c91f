"""The PyTorch path: Triton kernels and the PyTorch front.

from fusedmlp.torch_impl import mlp, plan
y = mlp(x, params, spec)            # impl="auto"; or "triton", "triton_tma", "fused_small", ...
"""

from . import runtime  # noqa: F401  (first: sets TRITON_INTERPRET on a machine without CUDA)
from .front import graph_capturable, graph_safe, is_interpreted, mlp, plan, unavailable_reason

__all__ = ["graph_capturable", "graph_safe", "is_interpreted", "mlp", "plan", "unavailable_reason"]

# ---- the user-facing layer: the module, the registered op, the converters -----------------------
from . import custom_op  # registers torch.ops.fusedmlp.mlp
from .convert import from_hf, from_linears, linear_to_param, param_to_linear, to_linears
from .custom_op import mlp as mlp_op
from .module import FusedMLP

__all__ += [
    "FusedMLP",
    "custom_op",
    "from_hf",
    "from_linears",
    "linear_to_param",
    "mlp_op",
    "param_to_linear",
    "to_linears",
]

# ---- low-rank factorised MLPs (issue 26) ---------------------------------------------------------
from .lowrank_front import factorise, lowrank_mlp  # noqa: E402
from .lowrank_module import FactorisedMLP  # noqa: E402

__all__ += ["FactorisedMLP", "factorise", "lowrank_mlp"]
