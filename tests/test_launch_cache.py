"""Launch records (torch_impl/launch.py): a repeated call plans, validates and configures nothing.

The first call of a signature builds each launch's record (config, grid, scalars, constexprs);
a repeated call — inference, a training step, fused_small's forward and backward — must only
allocate and launch: these tests count the planning functions and the record builds on the
repeat (zero), check that the kernels' outputs are bitwise those of a call whose records were
just built (under TRITON_INTERPRET=1 the kernels really run), and that what changes a launch — a
pinned config, the dispatch table generation, a stride — makes a new record or plan. The same for
the factorised MLP (issue 26): lowrank_front's per-signature steps and lowrank.py's records — a
changed rank, config, stride or MAX_RANK (the modes) plans or builds anew.
"""

from __future__ import annotations

import collections
import functools

import pytest
import torch

from fusedmlp.common import MLPSpec, TileConfig, dispatch, make_grad_output, make_input, validate
from fusedmlp.torch_impl import FusedMLP, backward, front, fused_small, fused_small_backward, launch
from helpers import to_torch

GATED = MLPSpec((19, 37, 11), "swiglu", True, "float32")  # gated + plain layer, odd widths
SMALL = MLPSpec((13, 24, 24, 5), "gelu", True, "float32")  # fused_small (3 layers)


def _builds() -> int:
    return sum(cache.builds for cache in launch._CACHES)


@pytest.fixture
def counts(monkeypatch):
    """Calls of the plan, the checks and the config functions a repeated call must not make."""
    seen: collections.Counter[str] = collections.Counter()

    def counting(module, name):
        real = getattr(module, name)

        @functools.wraps(real)
        def wrapper(*args, **kwargs):
            seen[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counting(front, "plan")
    counting(validate, "check_call")
    counting(backward, "heuristic_config")
    counting(backward, "wgrad_splits")
    counting(fused_small, "small_config_for")
    counting(fused_small_backward, "small_config_for")
    counting(fused_small_backward, "wgrad_splits")
    front._PREPARED.clear()
    launch.clear_all()
    backward._heuristic_of.cache_clear()
    return seen


def _step(module, x, dy):
    x.grad = None
    for p in module.parameters():
        p.grad = None
    y = module(x)
    y.backward(dy)
    return y.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()}


def _assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    elif isinstance(a, tuple):
        for u, v in zip(a, b, strict=True):
            _assert_same(u, v)
    else:
        assert torch.equal(a, b)


@pytest.mark.parametrize(("spec", "impl"), [(GATED, "triton"), (SMALL, "fused_small")])
def test_repeated_inference_and_training_do_no_planning(counts, spec, impl):
    module = FusedMLP(spec, impl=impl, seed=5)
    x = to_torch(make_input(spec, 7, seed=6)).requires_grad_()
    dy = to_torch(make_grad_output(spec, 7, seed=7))
    with torch.no_grad():
        first = module(x)
    step = _step(module, x, dy)  # the training forward and backward: their records built here
    planned, built = dict(counts), _builds()
    assert built > 0 and planned["plan"] >= 1
    with torch.no_grad():
        again = module(x)
    step_again = _step(module, x, dy)
    assert dict(counts) == planned, "a repeated call planned, checked or configured again"
    assert _builds() == built, "a repeated call built a launch record"
    assert torch.equal(again, first)
    _assert_same(step_again, step)
    # Bitwise the same with every record rebuilt (a fresh process's first call).
    launch.clear_all()
    with torch.no_grad():
        assert torch.equal(module(x), first)
    _assert_same(_step(module, x, dy), step)
    assert _builds() > built


def test_what_changes_a_launch_makes_a_new_record(counts, monkeypatch):
    module = FusedMLP(GATED, impl="triton", seed=8)
    x = to_torch(make_input(GATED, 9, seed=9))
    with torch.no_grad():
        want = module(x)
        built = _builds()
        # a stride: the same shape and values, a strided view (x's columns inside a wider row)
        wide = torch.zeros(9, GATED.d_in + 4)
        wide[:, : GATED.d_in] = x
        assert torch.equal(module(wide[:, : GATED.d_in]), want)
        assert _builds() > built
        # a pinned config: new records, the kernels' own tiles (fp32: the same sums per element)
        built = _builds()
        module.config = TileConfig(16, 16, 16, num_warps=2, num_stages=1)
        pinned = module(x)
        assert _builds() > built
        torch.testing.assert_close(pinned, want)  # other tiles may sum K in another order
        module.config = None
        assert torch.equal(module(x), want)
        # the dispatch table generation (a table installed): `auto` plans again
        module.impl = "auto"
        module(x)
        plans = counts["plan"]
        module(x)
        assert counts["plan"] == plans
        generation = dispatch.generation() + 1  # as dispatch.install(table) would leave it
        monkeypatch.setattr(dispatch, "generation", lambda: generation)
        module(x)
        assert counts["plan"] == plans + 1


def test_launch_cache_is_bounded():
    built = []
    cache = launch.LaunchCache(lambda k: built.append(k) or k * 2, maxsize=2)
    try:
        assert [cache.get((k,)) for k in (1, 2, 1, 3, 4)] == [2, 4, 2, 6, 8]
        assert built == [1, 2, 3, 4] and len(cache) <= 2 and cache.builds == 4
    finally:
        launch._CACHES.remove(cache)


# ---- the factorised MLP (issue 26): lowrank_front's per-signature steps, lowrank.py's records ---
LOWRANK = MLPSpec((19, 37, 11), "silu", True, "float32")  # two fused factorised layers
LOWRANK_GATED = MLPSpec((19, 37, 11), "swiglu", True, "float32")  # gated fused, then plain fused


@pytest.fixture
def lowrank_counts(monkeypatch):
    """Calls of the checks, modes and configs a repeated factorised call must not make."""
    from fusedmlp.common import lowrank_spec
    from fusedmlp.torch_impl import lowrank, lowrank_front

    seen: collections.Counter[str] = collections.Counter()

    def counting(owner, name):
        real = getattr(owner, name)

        @functools.wraps(real)
        def wrapper(*args, **kwargs):
            seen[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    counting(lowrank_front, "check_call")
    counting(lowrank_front, "lowrank_config")
    counting(lowrank, "lowrank_config")
    counting(lowrank, "check_lowrank_layer")
    counting(lowrank, "check_lowrank_gated_layer")
    counting(lowrank_spec, "check_params")
    counting(lowrank_spec.LowRankSpec, "layers")
    lowrank_front._PREPARED.clear()
    launch.clear_all()
    return seen


def _factorised(spec, ranks, seed):
    from fusedmlp.common import golden
    from fusedmlp.common.lowrank_spec import LowRankSpec
    from fusedmlp.torch_impl import FactorisedMLP

    lspec = LowRankSpec(spec, ranks)
    params = {k: to_torch(v) for k, v in golden.lowrank_params(lspec, seed).items()}
    return FactorisedMLP.from_params(params, lspec)


@pytest.mark.parametrize(
    ("spec", "lead"), [(LOWRANK, (7,)), (LOWRANK_GATED, (2, 3))], ids=["plain", "gated-3d"]
)
def test_repeated_lowrank_call_does_no_planning(lowrank_counts, spec, lead):
    """M ≤ 64: both layers two-pass (4 launches). The first call runs the checking public
    functions; the repeat runs the recorded steps and records: bitwise the same."""
    from fusedmlp.torch_impl import lowrank_front

    module = _factorised(spec, (6, 5), seed=3)
    assert module.lspec.modes == ("lowrank", "lowrank")
    x = to_torch(make_input(spec, lead, seed=4))
    base = _builds()
    with torch.no_grad():
        first = module(x)
        checked, built = dict(lowrank_counts), _builds()
        # the two layers' records (plain: one per layer; gated: the gated one and the plain one)
        assert checked["check_call"] == 1 and checked["lowrank_config"] >= 1
        assert built - base == 2
        again = module(x)
        function = lowrank_front.lowrank_mlp(x, module.params(), module.lspec)
        assert dict(lowrank_counts) == checked, "a repeated call checked, planned or configured"
        assert _builds() == built, "a repeated call built a launch record"
        assert torch.equal(again, first) and torch.equal(function, first)
        # every record rebuilt (a fresh process's first call, past the prepared steps)
        launch.clear_all()
        assert torch.equal(module(x), first)
        assert _builds() - built == built - base
        assert dict(lowrank_counts) == checked


def test_what_changes_a_lowrank_launch_makes_a_new_record(lowrank_counts, monkeypatch):
    from fusedmlp.common import lowrank
    from fusedmlp.common.lowrank import LowRankConfig
    from fusedmlp.torch_impl import lowrank_front

    module = _factorised(LOWRANK_GATED, (6, 5), seed=5)
    x = to_torch(make_input(LOWRANK_GATED, 9, seed=6))
    with torch.no_grad():
        want = module(x)
        module(x)
        checks, built = lowrank_counts["check_call"], _builds()
        # a stride: the same values in a strided view -> new records (and a new signature)
        wide = torch.zeros(9, LOWRANK_GATED.d_in + 4)
        wide[:, : LOWRANK_GATED.d_in] = x
        assert torch.equal(module(wide[:, : LOWRANK_GATED.d_in]), want)
        assert _builds() > built and lowrank_counts["check_call"] == checks + 1
        # a pinned config (one pass here): new records; other tiles may sum K in another order
        built = _builds()
        module.config = LowRankConfig(16, 16, 16, n_tiles=3, group_m=1, num_stages=1)
        torch.testing.assert_close(module(x), want)
        assert _builds() > built
        module.config = None
        built = _builds()
        assert torch.equal(module(x), want) and _builds() == built
        # a changed rank: another spec, its own steps and records, bitwise its checking path
        other = _factorised(LOWRANK_GATED, (7, 5), seed=5)
        built = _builds()
        y = other(x)
        assert _builds() > built
        built = _builds()
        assert torch.equal(other(x), y) and _builds() == built
        assert torch.equal(lowrank_front.run_layers(x, other.params(), other.lspec, None), y)
        # MAX_RANK (the modes): rank 7 > 6 runs layer 0 as two GEMMs, planned anew; the repeat
        # keeps that layer's public functions
        monkeypatch.setattr(lowrank, "MAX_RANK", 6)
        assert other.lspec.modes == ("two_gemm", "lowrank")
        checks = lowrank_counts["check_call"]
        y = other(x)
        assert torch.equal(other(x), y) and lowrank_counts["check_call"] == checks + 1


# ---- the Hopper launchers (torch_impl/tma/), under the interpreter -------------------------------
HOPPER = MLPSpec((24, 72, 40), "swiglu", True, "float32")  # rows of 24, 72, 40 x 4 bytes: TMA's


def test_repeated_tma_launches_build_no_record_and_give_the_same_bits():
    """tma/backward.py's step — the Hopper saving forward (gated_fwd storing its pre-activation,
    linear_act_fwd) and mlp_backward (linear_act_fwd with the dact epilogues, an M-major x and a
    K-major w): the repeat builds no record, and a rebuild gives the same bits."""
    from fusedmlp.common import init_params
    from fusedmlp.common.packing import pack_params
    from fusedmlp.torch_impl.tma import backward as tma_backward
    from fusedmlp.torch_impl.tma import gated as tma_gated
    from fusedmlp.torch_impl.tma import linear_act as tma_linear

    m = 16  # rows of M-major activations: 16 x 4 bytes
    assert tma_backward.unsupported_reason(HOPPER, m) is None
    packed = {k: to_torch(v) for k, v in pack_params(HOPPER, init_params(HOPPER, 40)).items()}
    x = to_torch(make_input(HOPPER, m, seed=41))
    dy = to_torch(make_grad_output(HOPPER, m, seed=42))

    def step():
        y, kept = backward.forward_saving(x, packed, HOPPER, saved="preact", hopper=True)
        return y, kept, tma_backward.mlp_backward(dy, kept, packed, HOPPER, saved="preact")

    launch.clear_all()
    base = _builds()
    first = step()
    built = _builds()
    assert len(tma_gated._LAUNCHES) == 1 and len(tma_linear._LAUNCHES) >= 3
    again = step()
    assert _builds() == built, "a repeated TMA launch built a launch record"
    _assert_same(again, first)
    # every record rebuilt (a fresh process's first call): the same records, the same bits
    launch.clear_all()
    _assert_same(step(), first)
    assert _builds() - built == built - base


def test_what_changes_a_tma_launch_makes_a_new_record():
    from fusedmlp.common.packing import packed_width
    from fusedmlp.common.tiling import INTERPRET_CONFIG, INTERPRET_CONFIG_GATED
    from fusedmlp.torch_impl.tma import gated as tma_gated
    from fusedmlp.torch_impl.tma import linear_act as tma_linear

    gen = torch.Generator().manual_seed(43)
    x = torch.randn(13, 24, generator=gen)  # rows of 24 and 40 meet the 16-byte rule in bf16 too
    w = torch.randn(24, 40, generator=gen)
    wv = torch.randn(24, packed_width(40), generator=gen)
    cfg, cfg_gated = INTERPRET_CONFIG, INTERPRET_CONFIG_GATED
    for run, cache in (
        (lambda x, c: tma_linear.linear_act_fwd(x, w, None, None, activation="gelu", config=c),
         tma_linear._LAUNCHES),
        (lambda x, c: tma_gated.gated_fwd(x, wv, None, n=40, activation="silu", config=c),
         tma_gated._LAUNCHES),
    ):  # fmt: skip
        config = cfg_gated if cache is tma_gated._LAUNCHES else cfg
        want = run(x, config)
        built = cache.builds
        assert torch.equal(run(x, config), want) and cache.builds == built
        # a stride: the same values in a strided view (copied for TMA: the same kernel)
        wide = torch.zeros(13, 28)
        wide[:, :24] = x
        assert torch.equal(run(wide[:, :24], config), want)
        assert cache.builds == built + (cache is tma_linear._LAUNCHES)  # gated: no strides read
        # a config: a new record; other tiles may sum K in another order
        built = cache.builds
        other = TileConfig(16, 32 if cache is tma_linear._LAUNCHES else 64, 16, num_stages=1)
        torch.testing.assert_close(run(x, other), want)
        assert cache.builds == built + 1
        # a dtype: a new record
        built = cache.builds
        assert run(x.to(torch.bfloat16), config).dtype == torch.bfloat16
        assert cache.builds == built + 1
