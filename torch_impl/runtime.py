"""Where Triton kernels run: the GPU, or Triton's CPU interpreter when there is none.

Triton reads TRITON_INTERPRET when a `@triton.jit` function is defined — its own `triton.language`
helpers included — so the variable must be set before triton is first imported. On a machine without
CUDA this module sets TRITON_INTERPRET=1 (the interpreter is then the only way the kernels can run),
and fusedmlp.torch_impl imports it before any kernel module. If triton was already imported by
someone else (transformers does) with the variable unset, the kernels could not run: that is an
ImportError that says how to fix it, not a failure deep inside the first kernel call.
"""

from __future__ import annotations

import os
import sys

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    if "triton.language" in sys.modules:
        raise ImportError(
            "fusedmlp.torch_impl: there is no CUDA GPU, so the Triton kernels must run under "
            "Triton's interpreter, but triton was imported before fusedmlp with TRITON_INTERPRET "
            "unset (by transformers, for example). Set TRITON_INTERPRET=1 in the environment, or "
            "import fusedmlp.torch_impl before the package that imports triton."
        )
    os.environ["TRITON_INTERPRET"] = "1"

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_device_ok(tensor: torch.Tensor) -> bool:
    """Triton kernels take CUDA tensors, or CPU tensors under the interpreter."""
    return tensor.device.type == "cuda" if not INTERPRET else tensor.device.type == "cpu"


def check_kernel_device(x: torch.Tensor) -> None:
    """ValueError unless the Triton kernels of this process can take `x` (the one device check
    that is the kernels' own, not the shared check layer's: it depends on TRITON_INTERPRET)."""
    if not kernel_device_ok(x):
        where = "a CPU tensor (TRITON_INTERPRET=1)" if INTERPRET else "a CUDA tensor"
        raise ValueError(f"x: the Triton kernels expected {where}, got device {x.device}")
