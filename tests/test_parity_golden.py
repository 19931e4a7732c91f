"""Golden parity: every implementation of both stacks, through the public fronts, on every case.

One test body over an (stack, impl) axis and a golden-case axis (tokamax's shared test base). Each
output is judged by the tolerance policy against the float64 reference, with the framework's own
same-dtype result (torch eager, jax.numpy under XLA) as the baseline for the 2x rule. Torch outputs
are poisoned (conftest); Pallas interpreters NaN-fill theirs. An implementation that cannot take a
case must say so with NotImplementedError naming itself — that is asserted, not skipped.
"""

from __future__ import annotations

import importlib.util

import jax.numpy as jnp
import numpy as np
import pytest

from fusedmlp import jax_impl
from fusedmlp.common import golden, impl_names
from fusedmlp.common.tolerance import assert_close
from helpers import GOLDEN_NAMES, to_numpy

# CI also runs this file in a JAX-only environment (Python 3.12, jax 0.11.2, numpy 2.5: the GPU
# image's JAX) to prove the JAX path on both version sets; torch joins wherever it is installed.
FRONTS = {"jax": jax_impl}
if importlib.util.find_spec("torch") is not None:
    import torch

    from fusedmlp import torch_impl

    FRONTS = {"torch": torch_impl, "jax": jax_impl}
BASELINE = {"torch": "eager", "jax": "xla"}
# torch.compile is exercised by test_front.py::test_baselines_compile on a few cases: one inductor
# compile per spec costs seconds on a CPU, and it computes what `eager` computes.
IMPLS = [(s, i) for s in FRONTS for i in impl_names(s) if i not in ("compile",)]


def torch_array(a: np.ndarray) -> torch.Tensor:
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def wrap(stack: str, case: golden.GoldenCase):
    conv = torch_array if stack == "torch" else jnp.asarray
    return conv(case.x), {k: conv(v) for k, v in case.params.items()}


def run(stack: str, impl: str, case: golden.GoldenCase):
    x, params = wrap(stack, case)
    return FRONTS[stack].mlp(x, params, case.spec, impl=impl)


@pytest.mark.parametrize("name", GOLDEN_NAMES)
@pytest.mark.parametrize("stack, impl", IMPLS, ids=[f"{s}-{i}" for s, i in IMPLS])
def test_golden_parity(stack, impl, name):
    case = golden.load(name)
    unavailable = FRONTS[stack].unavailable_reason(impl, "cpu")
    if unavailable is not None:
        # GPU-only cross-stack calls: on a CPU the front refuses them by name, before any launch.
        with pytest.raises(ValueError, match=impl):
            run(stack, impl, case)
        return
    try:
        FRONTS[stack].plan(case.spec, case.x.shape, impl=impl)
    except NotImplementedError as err:
        assert impl in str(err), f"NotImplementedError must name the implementation: {err}"
        with pytest.raises(NotImplementedError):
            run(stack, impl, case)
        return
    out = to_numpy(run(stack, impl, case))
    baseline = to_numpy(run(stack, BASELINE[stack], case)) if impl != BASELINE[stack] else None
    assert_close(out, case.y, case.spec, baseline=baseline, what=f"{stack}/{impl}/{name}")
