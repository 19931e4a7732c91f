"""The registry is the one table: every entry resolves to importable launchers and functions on each
of its stacks, plans carry family and implementation as fields, a tuned plan says so."""

from __future__ import annotations

import importlib

import pytest

from fusedmlp.common import MLPSpec, TileConfig
from fusedmlp.common.registry import (
    FALLBACK,
    IMPLEMENTATIONS,
    LAYOUTS,
    RUNNERS,
    STACKS,
    check_impl,
    get_implementation,
    impl_names,
)

ENTRIES = [(impl, stack) for impl in IMPLEMENTATIONS for stack in impl.stacks]


@pytest.mark.parametrize("impl, stack", ENTRIES, ids=[f"{s}-{i.name}" for i, s in ENTRIES])
def test_entry_resolves(impl, stack):
    assert impl.runner in RUNNERS and impl.layout in LAYOUTS
    assert impl.on_unsupported in ("refuse", "fallback")
    if impl.runner == "baseline":
        module, _, name = impl.launcher.partition(":")
        assert callable(getattr(importlib.import_module(module), name))
        return
    module = importlib.import_module(impl.module(stack))
    if impl.runner == "whole":
        assert callable(getattr(module, f"{impl.name}_fwd"))
    else:
        # gated layers run on the packed operand (`gated_fwd(x2d, wv, bc, *, n, ...)`)
        assert impl.layout == "packed", impl.name
        for family in ("linear_act", "gated"):
            fam = importlib.import_module(f"{impl.module(stack)}.{family}")
            assert callable(getattr(fam, f"{family}_fwd")), (impl.name, family)
    for field in ("config", "supports"):
        where = impl.function(field, stack)
        if where is not None:
            assert callable(getattr(importlib.import_module(where[0]), where[1])), (impl, field)
    assert impl.config, f"{impl.name}: a kernel implementation names its config function"


def test_names_and_fallback():
    assert set(FALLBACK) == set(STACKS)
    for stack, name in FALLBACK.items():
        assert stack in get_implementation(name).stacks and not get_implementation(name).baseline
    assert impl_names("torch", baselines=False) == (
        "triton",
        "triton_tma",
        "fused_small",
        "fused_decode",
        "mosaic",
    )
    assert check_impl("auto", "jax") == "auto"
    with pytest.raises(ValueError, match="for the jax front, got 'eager'"):
        check_impl("eager", "jax")


def test_launch_fields_fallback_and_tune(monkeypatch):
    from fusedmlp.torch_impl import front

    odd = MLPSpec((33, 67, 21), "swiglu", True, "bfloat16")  # K=33: TMA's 16-byte rule fails
    p = front.plan(odd, (300, 33), impl="triton_tma")
    assert [(k.family, k.impl, k.layer) for k in p.launches] == [
        ("gated", "triton", 0),
        ("linear_act", "triton", 1),
    ]
    assert "layer 0: TMA's 16-byte stride rule" in p.reason
    aligned = MLPSpec((64, 128, 32), "gelu", False, "bfloat16")
    q = front.plan(aligned, (300, 64), impl="triton_tma")
    assert [k.kernel for k in q.launches] == ["tma.linear_act", "tma.linear_act"]
    monkeypatch.setattr(front, "INTERPRET", False)  # as on a GPU: tune=True is honoured
    t = front.plan(aligned, (300, 64), impl="triton", tune=True)
    assert all(k.tune and k.config is None for k in t.launches) and "[tuned]" in str(t)
    pinned = TileConfig(16, 16, 16)
    assert not any(
        k.tune
        for k in front.plan(aligned, (300, 64), impl="triton", tune=True, config=pinned).launches
    )
