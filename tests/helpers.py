"""Small helpers the test files share: stack-neutral arrays, golden-case selection."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

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


# ---- torch 2.11's Dynamo, on any torch (the compile guard) ---------------------------------------
@contextlib.contextmanager
def dynamo_as_torch_2_11(*, strict: bool = True) -> Iterator[None]:
    """Trace as torch 2.11's Dynamo does where it fails FusedMLP (the H200 image's torch; CI has
    2.13 and no 2.11 CPU wheel exists: PyPI's 2.11 needs the CUDA libraries to import).

    1. `assume_constant_result` arguments: 2.11 converts each non-tensor with
       `as_python_constant`, which raises "currently can't reconstruct arbitrary frozen dataclass
       instances" for a frozen dataclass (2.13 passes the object through). The 2.11 conversion is
       put in place of 2.13's.
    2. `strict`: no fusedmlp dataclass may enter the trace at all — FusedMLP.forward builds the
       op's arguments from precomputed strings, so a dataclass that starts to reach a traced call
       fails here before it fails on the GPU image. (The functional `custom_op.mlp(x, p, spec)`
       takes a spec by design: it passes only the spec's fields on, which point 1 checks.)
    """
    import torch._dynamo.variables.builder as builder
    import torch._dynamo.variables.functions as functions

    def convert_as_2_11(tx, fn, name, args, kwargs):
        def convert(x):
            if x.is_tensor():
                return x.get_real_value()
            return x.as_python_constant()  # torch 2.11: no pass-through of user objects

        res = fn(*[convert(a) for a in args], **{k: convert(v) for k, v in kwargs.items()})
        return tx.output.register_attr_or_module(
            res, name, source=functions.ConstantSource(name)
        )

    original = builder.is_frozen_dataclass

    def refuse_ours(value: object) -> bool:
        cls = value if isinstance(value, type) else type(value)
        if cls.__module__.startswith("fusedmlp.") and dataclasses.is_dataclass(cls):
            raise AssertionError(
                f"a fusedmlp dataclass ({cls.__name__}) entered a torch.compile trace: torch "
                "2.11's Dynamo cannot make constants of frozen dataclass instances"
            )
        return original(value)

    saved = functions.invoke_and_store_as_constant
    functions.invoke_and_store_as_constant = convert_as_2_11
    if strict:
        builder.is_frozen_dataclass = refuse_ours
    try:
        yield
    finally:
        functions.invoke_and_store_as_constant = saved
        builder.is_frozen_dataclass = original
