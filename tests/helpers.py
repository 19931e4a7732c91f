"""Helpers the test files share: stack-neutral arrays (the one NumPy -> torch conversion), golden
case selection, the golden test body (`GoldenParity`), and torch 2.11's Dynamo on any torch."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from fusedmlp.common import golden
from fusedmlp.common.registry import get_implementation, impl_names
from fusedmlp.common.tolerance import assert_close


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


@functools.cache
def load_case(name: str) -> golden.GoldenCase:
    """A golden case, read from its file once per process."""
    return golden.load(name)


def golden_names(*, gated: bool | None = None, dtypes: tuple[str, ...] | None = None) -> list[str]:
    """Golden case names, optionally filtered by gated-ness and dtype."""
    out = []
    for name in GOLDEN_NAMES:
        case = load_case(name)
        if gated is not None and case.spec.gated != gated:
            continue
        if dtypes is not None and case.spec.dtype not in dtypes:
            continue
        out.append(name)
    return out


def to_torch(a: np.ndarray) -> Any:
    """A NumPy array (ml_dtypes bfloat16 included) as a CPU torch tensor, bit for bit: the one
    NumPy -> torch conversion (fusedmlp.torch_impl.module.to_torch; torch.from_numpy knows no
    bfloat16). Imported lazily: the JAX-only CI job has no torch."""
    from fusedmlp.torch_impl.module import to_torch as convert

    return convert(a)


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
        return tx.output.register_attr_or_module(res, name, source=functions.ConstantSource(name))

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


# ---- the golden test body ------------------------------------------------------------------------
BASELINE = {"torch": "eager", "jax": "xla"}


def _has_gpu(stack: str) -> bool:
    if stack == "torch":
        import torch

        return torch.cuda.is_available()
    from fusedmlp.jax_impl import compat

    return compat.on_gpu()


@functools.cache
def _golden_output(stack: str, impl: str, name: str) -> np.ndarray:
    case = load_case(name)
    x, params = GoldenParity.wrap(stack, case)
    return to_numpy(GoldenParity.front(stack).mlp(x, params, case.spec, impl=impl))


class GoldenParity:
    """The golden test body (tokamax's shared test base): a subclass binds `stack` (and may narrow
    `impls`); pytest then collects `test_golden` once per (implementation, golden case). The
    framework's own result, the 2× rule's baseline, is computed once per (stack, case)."""

    stack: str = ""
    # None: every implementation of the stack but `compile` (one inductor compile per spec costs
    # seconds on a CPU and computes what `eager` computes: test_front.py covers it on a few cases)
    # and, without a GPU, the GPU-only ones (refused by name: test_parity_golden.py).
    impls: tuple[str, ...] | None = None

    @classmethod
    def implementations(cls) -> tuple[str, ...]:
        if cls.impls is not None:
            return cls.impls
        gpu = _has_gpu(cls.stack)
        return tuple(
            name for name in impl_names(cls.stack)
            if name != "compile" and (gpu or not get_implementation(name).gpu_only)
        )  # fmt: skip

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if metafunc.function.__name__ == "test_golden":
            impls = self.implementations()
            metafunc.parametrize("impl", impls, ids=[f"{self.stack}-{i}" for i in impls])
            metafunc.parametrize("name", GOLDEN_NAMES)

    @staticmethod
    def front(stack: str) -> Any:
        return importlib.import_module(f"fusedmlp.{stack}_impl")

    @staticmethod
    def wrap(stack: str, case: golden.GoldenCase) -> tuple[Any, dict[str, Any]]:
        if stack == "torch":
            device = "cuda" if _has_gpu("torch") else "cpu"
            conv = lambda a: to_torch(a).to(device)  # noqa: E731
        else:
            import jax.numpy as jnp

            conv = jnp.asarray
        return conv(case.x), {k: conv(v) for k, v in case.params.items()}

    def test_golden(self, impl: str, name: str) -> None:
        case = load_case(name)
        front = self.front(self.stack)
        device = ("cuda" if self.stack == "torch" else "gpu") if _has_gpu(self.stack) else "cpu"
        try:
            front.plan(case.spec, case.x.shape, impl=impl, device=device)
        except NotImplementedError as err:
            assert impl in str(err), f"NotImplementedError must name the implementation: {err}"
            x, params = self.wrap(self.stack, case)
            with pytest.raises(NotImplementedError):
                front.mlp(x, params, case.spec, impl=impl)
            return
        out = _golden_output(self.stack, impl, name)
        base = BASELINE[self.stack]
        baseline = _golden_output(self.stack, base, name) if impl != base else None
        assert_close(out, case.y, case.spec, baseline=baseline, what=f"{self.stack}/{impl}/{name}")
