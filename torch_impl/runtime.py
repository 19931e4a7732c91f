"""Where Triton kernels run: the GPU, or Triton's CPU interpreter when there is none.

Triton reads TRITON_INTERPRET when a `@triton.jit` function is defined, so this module must run
before
any kernel module is imported (fusedmlp.torch_impl imports it first). On a machine without CUDA it
sets
TRITON_INTERPRET=1: the interpreter is then the only way the kernels can run at all.
"""

from __future__ import annotations

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_device_ok(tensor: torch.Tensor) -> bool:
    """Triton kernels take CUDA tensors, or CPU tensors under the interpreter."""
    return tensor.device.type == "cuda" if not INTERPRET else tensor.device.type == "cpu"
