"""The PyTorch path: Triton kernels and the PyTorch front."""

from . import runtime  # noqa: F401  (must run before any @triton.jit: sets the interpreter on CPU)
