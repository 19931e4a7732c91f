"""Golden parity: every golden case through every implementation of both stacks, once.

The one golden test body of the suite (tokamax's shared test base, `helpers.GoldenParity`): one
test per (stack, implementation, case) through the public front, judged by the tolerance policy
against the float64 reference, with the framework's own same-dtype result (torch eager, jax.numpy
under XLA) as the 2× rule's baseline — computed once per case and stack, not once per test.
Torch outputs are poisoned (conftest); Pallas interpreters NaN-fill theirs. An implementation that
cannot take a case must say so with NotImplementedError naming itself (asserted, not skipped).
GPU-only implementations are refused by name on a CPU: one test each, not one per case.

Per-kernel test files keep what is specific to their kernel (configs, odd shapes); validation is
tests/test_validate.py's. No other file loops over the golden cases: tests/golden_coverage.py
counts the (case × implementation × dtype) triples exercised here.
"""

from __future__ import annotations

import importlib.util

import pytest

from fusedmlp.common import golden
from helpers import GOLDEN_NAMES, GoldenParity

# CI also runs this file in a JAX-only environment (Python 3.12, jax 0.11.2, numpy 2.5: the GPU
# image's JAX) to prove the JAX path on both version sets; torch joins wherever it is installed.
HAS_TORCH = importlib.util.find_spec("torch") is not None


class TestJax(GoldenParity):
    stack = "jax"


if HAS_TORCH:

    class TestTorch(GoldenParity):
        stack = "torch"


@pytest.mark.parametrize("stack, impl", [("torch", "mosaic"), ("jax", "jax_triton")])
def test_gpu_only_impls_are_refused_on_cpu(stack, impl):
    if stack == "torch" and not HAS_TORCH:
        pytest.skip("torch is not installed in this environment")
    front = GoldenParity.front(stack)
    if front.unavailable_reason(impl, "gpu" if stack == "jax" else "cuda") is None:
        pytest.skip("a GPU is present: the implementation runs (tests/test_cross_stack_gpu.py)")
    case = golden.load(GOLDEN_NAMES[0])
    x, params = GoldenParity.wrap(stack, case)
    with pytest.raises(ValueError, match=f"impl '{impl}' cannot run on device"):
        front.mlp(x, params, case.spec, impl=impl)
