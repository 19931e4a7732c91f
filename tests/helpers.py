"""Small helpers the test files share: stack-neutral arrays, golden-case selection."""

from __future__ import annotations

import numpy as np

from fusedmlp.common import golden


def to_numpy(a: object) -> np.ndarray:
    """A torch tensor or jax array as a NumPy array (bfloat16 upcast exactly to float32)."""
    mod = type(a).__module__
    if mod.startswith("torch"):
        t = a.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    arr = np.asarray(a)
    if arr.dtype.name == "bfloat16":
        arr = arr.astype(np.float32)
    return arr


GOLDEN_NAMES = golden.case_names()


def golden_names(*, gated: bool | None = None, dtypes: tuple[str, ...] | None = None) -> list[str]:
    """Golden case names, optionally filtered by gated-ness and dtype."""
    out = []
    for name in GOLDEN_NAMES:
        case = golden.load(name)
        if gated is not None and case.spec.gated != gated:
            continue
        if dtypes is not None and case.spec.dtype not in dtypes:
            continue
        out.append(name)
    return out


def to_torch(a: np.ndarray) -> object:
    """A NumPy array (ml_dtypes bfloat16 included) as a CPU torch tensor, bit for bit: the one
    NumPy -> torch conversion of the test suite (torch.from_numpy knows no bfloat16)."""
    import torch

    a = np.ascontiguousarray(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())
