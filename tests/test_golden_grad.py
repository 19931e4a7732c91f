"""Golden gradients (issue 24): every implementation that trains, in both stacks, from the golden
inputs and upstream dy, against the float64 gradient files (common/golden's `grad_cases`).

Training calls of (stack, implementation, `saved` policy, case) — torch: `y.backward(dy)`
through FusedMLP (packed parameters: its `_EagerTrain` autograd, the training op's forward and
backward); JAX: `jax.vjp` of `jax_impl.mlp` on packed params (its custom_vjp) — and each gradient
(dx and every param) judged by `tolerance.assert_grads_close` against the file's float64 gradients
(`reference.backward(..., round_hidden=True)`, the linearisation point of the gradient bounds),
with the stack's own autograd (`eager`, `xla`) as the 2× rule's baseline; the packed gradients'
padded columns must be exact zeros, as the file's are. The call's y is judged against the case's
y by the forward bounds.

The calls, lean (each interprets a forward and a backward; JAX compiles per spec and policy), one
test per (stack, case) running that case's `_calls` (so that one pytest-xdist worker compiles a
JAX spec once; every failing call is reported):
- the portable path (`triton`, `pallas_triton`) with the default policy: every gradient case; the
  baselines (which ignore `saved`) every case without a NaN (their relu'(NaN) is 0);
- every other implementation that trains on this machine (the registry's, less `compile`: one
  inductor compile per spec, covered by tests/test_backward_torch.py and test_compile.py; the
  fused_small / fused_decode routes, `auto`, the Hopper ones under the interpreter) and the
  portable path with saved="inputs": the `ROUTING` cases, the policy alternating so that each
  implementation meets both and each case both. An implementation that cannot take a case says
  so with NotImplementedError naming itself (asserted, as tests/test_parity_golden.py does).
The twins' gradients of the same case (torch's portable path vs JAX's; in the JAX test, under the
interpreters only: on a GPU, `fusedmlp parity --backward` compares them) are compared on every
gradient case, at the heuristic's configs (one function for both stacks): bit for bit where the
twins share every operation (relu), and on the golden 16-bit cases, where each interpreter's own
float32 exp differs by ulps that the dtype's rounding happens to remove on these inputs (not a rule:
tests/test_fused_small_backward.py meets a bf16 swiglu case where 15 of 76,800 dZ elements keep the
difference; docs/cross_stack_cpu.md), else within twice the gradient bounds (bench/grad_parity.py's
rule).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import Any

import numpy as np
import pytest

from fusedmlp.bench.cases import to_numpy
from fusedmlp.bench.parity import difference
from fusedmlp.common import golden
from fusedmlp.common.config import DEFAULT_SAVED, SAVED_POLICIES
from fusedmlp.common.packing import pack_params, unpack_params
from fusedmlp.common.registry import FALLBACK, get_implementation, impl_names
from fusedmlp.common.tolerance import assert_close, assert_grads_close, grad_bounds
from helpers import load_case

# CI's JAX-only environment has no torch: the JAX half runs there, torch joins where installed.
HAS_TORCH = importlib.util.find_spec("torch") is not None
STACKS = ("torch", "jax") if HAS_TORCH else ("jax",)
BASELINE = {"torch": "eager", "jax": "xla"}
GRAD_NAMES = golden.grad_case_names()
# 2-layer cases (fused_decode takes them), one per dtype, plain and gated, M = 1 and a 3-D input.
# Three: each implementation meets both policies; each costs a JAX compile of the "inputs" path.
ROUTING = ("m1-swiglu-bfloat16", "geglu-float16-bias", "batch3d-silu-float32")


def _finite(names: list[str]) -> list[str]:
    return [name for name in names if not np.isnan(load_case(name).x).any()]


def _front(stack: str) -> Any:
    return importlib.import_module(f"fusedmlp.{stack}_impl")


def _has_gpu(stack: str) -> bool:
    if stack == "torch":
        import torch

        return torch.cuda.is_available()
    from fusedmlp.jax_impl import compat

    return compat.on_gpu()


def _device(stack: str) -> str:
    return ("cuda" if stack == "torch" else "gpu") if _has_gpu(stack) else "cpu"


def _trainers(stack: str) -> tuple[str, ...]:
    """The implementations of `stack` that train here, `auto` included (see the docstring)."""
    names = (*impl_names(stack), "auto")
    runs = [n for n in names if _front(stack).unavailable_reason(n, _device(stack)) is None]
    return tuple(n for n in runs if n != "compile")


def _calls(stack: str, name: str) -> list[tuple[str, str]]:
    """(impl, saved) of every training call on case `name` in `stack` (see the docstring)."""
    calls = [(FALLBACK[stack], DEFAULT_SAVED)]
    if name in _finite([name]):
        calls.append((BASELINE[stack], DEFAULT_SAVED))
    if name in ROUTING:
        j = ROUTING.index(name)
        for i, impl in enumerate(_trainers(stack)):
            if impl == BASELINE[stack]:  # torch/jax autodiff: no policy to vary
                continue
            # the portable path's default policy runs on every case (above)
            saved = "inputs" if impl == FALLBACK[stack] else SAVED_POLICIES[(i + j) % 2]
            calls.append((impl, saved))
    return calls


def _matrix() -> list[tuple[str, str, str, str]]:
    """(stack, impl, saved, case) of every training call judged here."""
    return [
        (stack, impl, saved, name)
        for stack in STACKS
        for name in GRAD_NAMES
        for impl, saved in _calls(stack, name)
    ]


# ---- one training call ---------------------------------------------------------------------------
@functools.cache
def _train(
    stack: str, impl: str, saved: str, name: str
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """y and the gradients ("x" and the packed params', NumPy in the spec dtype; bfloat16 as
    float32) of one training call on golden case `name`, once per process."""
    case, grad = load_case(name), golden.load_grad(name)
    if stack == "torch":
        from fusedmlp.torch_impl import FusedMLP
        from helpers import to_torch

        device = _device(stack)
        module = FusedMLP.from_params(case.params, case.spec, impl=impl, device=device)
        module.saved = saved
        x = to_torch(case.x, device).requires_grad_()
        y = module(x)
        y.backward(to_torch(grad.dy, device))
        grads = {"x": x.grad, **{k: p.grad for k, p in module.packed_params().items()}}
    else:
        import jax
        import jax.numpy as jnp

        from fusedmlp.jax_impl.packing import pack_params as pack_jax

        params = pack_jax(case.spec, {k: jnp.asarray(v) for k, v in case.params.items()})

        def call(x: Any, p: Any) -> Any:
            return _front(stack).mlp(x, p, case.spec, impl=impl, saved=saved)

        y, vjp = jax.vjp(call, jnp.asarray(case.x), params)
        dx, dparams = vjp(jnp.asarray(grad.dy))
        grads = {"x": dx, **dparams}
    return to_numpy(y), {k: to_numpy(v) for k, v in grads.items()}


def _contract(spec: Any, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Packed gradients in the contract's names, float64 (slices: bit for bit)."""
    params = {k: v.astype(np.float64) for k, v in grads.items() if k != "x"}
    return {"x": grads["x"].astype(np.float64), **unpack_params(spec, params)}


# ---- every trainer against the golden gradients --------------------------------------------------
def _check_call(stack: str, impl: str, saved: str, name: str) -> None:
    """One training call judged: y by the forward bounds, every gradient by the gradient bounds
    and the 2x rule, the padded columns exactly zero; or a NotImplementedError naming `impl`."""
    case, grad = load_case(name), golden.load_grad(name)
    try:
        _front(stack).plan(case.spec, case.x.shape, impl=impl, device=_device(stack), saved=saved)
    except NotImplementedError as err:
        assert impl in str(err), f"NotImplementedError must name the implementation: {err}"
        with pytest.raises(NotImplementedError):
            _train(stack, impl, saved, name)
        return
    y, got = _train(stack, impl, saved, name)
    assert_close(y, case.y, case.spec, what="y")
    baseline = None
    if impl != BASELINE[stack]:
        baseline = _contract(case.spec, _train(stack, BASELINE[stack], DEFAULT_SAVED, name)[1])
    assert set(got) == set(grad.grads), (sorted(got), sorted(grad.grads))
    for key, g in got.items():
        assert g.shape == grad.grads[key].shape, (key, g.shape)
    assert_grads_close(
        _contract(case.spec, got), grad.contract_grads(), case.spec, baselines=baseline
    )
    # The padded columns of a packed gradient are exact zeros (what pack_params writes there).
    packed = {k: v.astype(np.float64) for k, v in got.items() if k != "x"}
    for key, again in pack_params(case.spec, unpack_params(case.spec, packed)).items():
        np.testing.assert_array_equal(packed[key], again, err_msg=f"d{key}: padding")


def _twins_share_every_operation(spec: Any) -> bool:
    """Bit-identical twins under the interpreters on the golden cases: relu (no transcendental), or
    a 16-bit dtype (the interpreters' float32 exp differ by ulps that the dtype's rounding removes
    on these inputs; not on every input, see the module docstring)."""
    return spec.activation == "relu" or spec.dtype != "float32"


def _check_twins(name: str) -> None:
    """torch's and JAX's portable gradients of case `name`, compared with each other."""
    case, grad = load_case(name), golden.load_grad(name)
    y_t, g_t = _train("torch", FALLBACK["torch"], DEFAULT_SAVED, name)
    y_j, g_j = _train("jax", FALLBACK["jax"], DEFAULT_SAVED, name)
    bounds = grad_bounds(case.spec)
    bitwise = _twins_share_every_operation(case.spec)
    if bitwise:
        np.testing.assert_array_equal(y_t, y_j, err_msg="y")
    for key, ref in grad.grads.items():
        rel, _, scaled, identical, same_nans = difference(g_t[key], g_j[key], ref)
        if bitwise:
            assert identical, f"d{key} differs in {np.sum(g_t[key] != g_j[key])} elements"
        assert same_nans, f"d{key}: NaNs in different places"
        assert rel <= 2 * bounds.rel_fro and scaled <= 2 * bounds.max_scaled, (key, rel, scaled)


@pytest.mark.parametrize("name", GRAD_NAMES)
@pytest.mark.parametrize("stack", STACKS)
def test_golden_grad(stack: str, name: str) -> None:
    """Every training call of `_calls(stack, name)`, each judged (all failures reported); the
    JAX test also compares the twins (torch's calls are the cheap ones to repeat where pytest-xdist
    ran the torch test in another process)."""
    failures = []
    for impl, saved in _calls(stack, name):
        try:
            _check_call(stack, impl, saved, name)
        except AssertionError as err:
            failures.append(f"{stack}/{impl}/saved={saved}/{name}: {err}")
    if stack == "jax" and HAS_TORCH and not (_has_gpu("torch") or _has_gpu("jax")):
        try:
            _check_twins(name)
        except AssertionError as err:
            failures.append(f"twins torch/{FALLBACK['torch']} vs jax/{FALLBACK['jax']}: {err}")
    assert not failures, "\n".join(failures)


def test_matrix_covers_every_trainer() -> None:
    """Each implementation that trains here meets both policies (the baselines: their autodiff),
    and the portable path and the baselines every gradient case."""
    rows = _matrix()
    for stack in STACKS:
        for impl in _trainers(stack):
            policies = {saved for s, i, saved, _ in rows if (s, i) == (stack, impl)}
            baseline = impl != "auto" and get_implementation(impl).baseline
            want = {DEFAULT_SAVED} if baseline else set(SAVED_POLICIES)
            assert policies == want, (stack, impl, policies)
        for impl, want in ((FALLBACK[stack], GRAD_NAMES), (BASELINE[stack], _finite(GRAD_NAMES))):
            names = {n for s, i, saved, n in rows if (s, i, saved) == (stack, impl, DEFAULT_SAVED)}
            assert names == set(want), (stack, impl)
    assert set(ROUTING) <= set(GRAD_NAMES)
