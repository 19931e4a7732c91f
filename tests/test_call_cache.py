"""Per-call work (issue 23 item 2): the checks and the plan run once per call signature, params are
converted once per set of tensors, and the custom op and FusedMLP add no planning of their own.

Each test counts calls of the functions that must not run again on a repeated call, so the
regression (re-validating and re-planning on every call: ~300 µs a call on the H200) cannot
return unnoticed.
"""

from __future__ import annotations

import collections
import functools

import jax.numpy as jnp
import pytest
import torch

from fusedmlp import jax_impl, torch_impl
from fusedmlp.common import MLPSpec, init_params, make_input, validate
from fusedmlp.torch_impl import FusedMLP
from fusedmlp.torch_impl import front as tfront
from fusedmlp.torch_impl.packing import pack_params
from helpers import to_torch

SPEC = MLPSpec((19, 37, 11), "swiglu", True, "float32")


@pytest.fixture
def counts(monkeypatch):
    """Counts of front.plan, the value checks and the params conversion, per stack."""
    seen: collections.Counter[str] = collections.Counter()

    def counting(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            seen[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    from fusedmlp.jax_impl import front as jfront

    monkeypatch.setattr(validate, "check_call", counting("check_call", validate.check_call))
    monkeypatch.setattr(tfront, "plan", counting("torch.plan", tfront.plan))
    monkeypatch.setattr(tfront, "_derive", counting("torch.derive", tfront._derive))
    monkeypatch.setattr(jfront, "plan", counting("jax.plan", jfront.plan))
    monkeypatch.setattr(jfront, "_with_layouts", counting("jax.convert", jfront._with_layouts))
    tfront._PREPARED.clear()
    jfront._PREPARED.clear()
    return seen


def _torch_inputs(spec, m, seed=0):
    params = {k: to_torch(v) for k, v in init_params(spec, seed).items()}
    return to_torch(make_input(spec, m, seed + 1)), params


@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_torch_front_checks_and_plans_once_per_signature(counts, impl):
    x, params = _torch_inputs(SPEC, 5)
    first = torch_impl.mlp(x, params, SPEC, impl=impl)
    for _ in range(4):
        assert torch.equal(torch_impl.mlp(x, params, SPEC, impl=impl), first)
    assert counts["torch.plan"] == 1 and counts["check_call"] == 1
    x7, _ = _torch_inputs(SPEC, 7)  # a new shape: one more check and plan, then cached again
    torch_impl.mlp(x7, params, SPEC, impl=impl)
    torch_impl.mlp(x7, params, SPEC, impl=impl)
    assert counts["torch.plan"] == 2 and counts["check_call"] == 2
    # Plain params: the eager baseline reads them as they are; the Triton kernels take the packed
    # layout, converted once for this set of tensors (not per call, not per shape).
    assert counts["torch.derive"] == (0 if impl == "eager" else 1)


def test_torch_bad_call_after_good_one_still_raises(counts):
    x, params = _torch_inputs(SPEC, 5)
    torch_impl.mlp(x, params, SPEC, impl="eager")
    with pytest.raises(ValueError, match=r"params\['w1'\]: expected shape \[37, 11\]"):
        torch_impl.mlp(x, {**params, "w1": params["w1"][:, :-1]}, SPEC, impl="eager")
    with pytest.raises(TypeError, match=r"x: expected a torch\.Tensor, got ndarray"):
        torch_impl.mlp(x.numpy(), params, SPEC, impl="eager")
    with pytest.raises(TypeError, match=r"spec: expected a fusedmlp\.common\.MLPSpec, got dict"):
        torch_impl.mlp(x, params, SPEC.to_dict(), impl="eager")


def test_plain_params_are_packed_once_per_set_of_tensors(counts):
    x, params = _torch_inputs(SPEC, 5)
    want = torch_impl.mlp(x, pack_params(SPEC, params), SPEC, impl="triton")
    for _ in range(3):  # the kernels take the packed layout: packed on the first call only
        assert torch.equal(torch_impl.mlp(x, params, SPEC, impl="triton"), want)
    assert counts["torch.derive"] == 1
    with torch.no_grad():
        params["v0"].mul_(2.0)  # an in-place update bumps the version counter: converted again
    changed = torch_impl.mlp(x, params, SPEC, impl="triton")
    assert counts["torch.derive"] == 2 and not torch.equal(changed, want)
    entries = len(tfront._CONVERTED)
    del params, changed
    assert len(tfront._CONVERTED) == entries - 1  # freed with its tensors


def test_fused_mlp_and_custom_op_plan_once(counts):
    module = FusedMLP(SPEC, impl="triton", seed=3)
    x, _ = _torch_inputs(SPEC, 4)
    with torch.no_grad():
        first = module(x)
        for _ in range(3):
            assert torch.equal(module(x), first)
    assert counts["torch.plan"] == 1 and counts["check_call"] == 1


def test_jax_front_checks_plans_and_traces_once(counts):
    params = {k: jnp.asarray(v) for k, v in init_params(SPEC, 0).items()}
    x = jnp.asarray(make_input(SPEC, 5, 1))
    first = jax_impl.mlp(x, params, SPEC, impl="xla")
    for _ in range(3):
        assert (jax_impl.mlp(x, params, SPEC, impl="xla") == first).all()
    assert counts["jax.plan"] == 1 and counts["check_call"] == 1
    assert counts["jax.convert"] == 1  # traced once: the jitted runner is reused


def test_fused_mlp_skips_the_op_only_where_nothing_needs_it(monkeypatch):
    from fusedmlp.torch_impl import module as module_py

    calls = []

    def counting(name, real):
        def op(*args):
            calls.append(name)
            return real(*args)

        return op

    monkeypatch.setattr(module_py, "MLP_OP", counting("mlp", module_py.MLP_OP))
    monkeypatch.setattr(module_py, "train_call", counting("train", module_py.train_call))
    fused = FusedMLP(SPEC, impl="triton", seed=4)
    x, _ = _torch_inputs(SPEC, 3)
    with torch.no_grad():
        direct = fused(x)  # eager, no gradient: the front directly
    assert calls == []
    via_op = fused(x)  # grad mode with trainable params: the training op (it saves for backward)
    assert calls == ["train"] and via_op.requires_grad and torch.equal(via_op.detach(), direct)
    fused.requires_grad_(False)
    fused(x)  # frozen params, grad mode: nothing to differentiate, the front directly
    assert calls == ["train"]
