"""The low-rank front (issue 26 item 3): LowRankSpec and its modes, plan rows, the factorised
goldens in both stacks, `FusedMLP.from_hf(rank= | energy= | calibration=)` against the float64
factorised reference, the JAX twin equal to torch, torch.compile, and bad input.

Interpreted kernels are slow: odd sizes of 21..73, M ≤ 19."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fusedmlp.common import MLPSpec, golden, init_params, lowrank, make_input, reference
from fusedmlp.common import lowrank_spec as ls
from fusedmlp.common.dtypes import DTYPES, cast
from fusedmlp.common.tolerance import assert_close
from fusedmlp.torch_impl import FactorisedMLP, FusedMLP
from fusedmlp.torch_impl import lowrank_front as torch_front
from fusedmlp.torch_impl.tma import linear_act as tma_linear
from helpers import dynamo_as_torch_2_11, to_numpy, to_torch

LOWRANK_GOLDEN = golden.lowrank_case_names()


def _jax():
    import jax.numpy as jnp

    from fusedmlp.jax_impl import lowrank_front

    return jnp, lowrank_front


def _run(stack: str, x: np.ndarray, params: dict, lspec: ls.LowRankSpec) -> np.ndarray:
    if stack == "torch":
        tp = {k: to_torch(v) for k, v in params.items()}
        return to_numpy(torch_front.lowrank_mlp(to_torch(x), tp, lspec))
    jnp, front = _jax()
    jp = {k: jnp.asarray(v) for k, v in params.items()}
    return to_numpy(front.lowrank_mlp(jnp.asarray(x), jp, lspec))


def _check(out: np.ndarray, x, params, lspec: ls.LowRankSpec, what: str) -> None:
    """The kernels' rounding points and the exact factorised MLP, both within the policy."""
    rounded = ls.reference(lspec, x, params, round_intermediate=True, round_hidden=True)
    assert_close(out, rounded, lspec.spec, what=f"{what} vs rounded reference")
    assert_close(out, ls.reference(lspec, x, params), lspec.spec, what=f"{what} vs exact")


# ==== the spec and its modes ======================================================================
def test_layer_mode_and_reasons() -> None:
    assert ls.layer_mode(33, 67, 9)[0] == "lowrank"
    mode, why = ls.layer_mode(67, 21, 21)  # r = min(K, N): never cheaper
    assert mode == "dense" and "r·(K+N) = 1,848 ≥ K·N = 1,407" in why
    mode, why = ls.layer_mode(600, 600, 257)
    assert mode == "two_gemm"
    assert why.startswith("rank 257 > 256: the intermediate does not fit on chip; two GEMMs")
    # llama3-8b's up projection: r = 256 fused; r = 3200 (r·(K+N) ≥ K·N) dense
    assert ls.layer_mode(4096, 14336, 256)[0] == "lowrank"
    assert ls.layer_mode(4096, 14336, 3200)[0] == "dense"
    assert ls.layer_mode(4096, 14336, 3000)[0] == "two_gemm"


def test_lowrank_spec_json_and_checks() -> None:
    spec = MLPSpec((33, 67, 21), "gelu", True, "bfloat16")
    lspec = ls.LowRankSpec(spec, (9, 21))
    assert lspec.modes == ("lowrank", "dense")
    assert ls.LowRankSpec.from_json(lspec.to_json()) == lspec
    assert MLPSpec.from_json(spec.to_json()) == spec and "ranks" not in spec.to_dict()
    assert list(ls.param_shapes(lspec)) == ["u0", "vt0", "b0", "w1", "b1"]
    assert lspec.param_count() == 33 * 9 + 9 * 67 + 67 + 67 * 21 + 21
    assert str(lspec).endswith("ranks [9, 21 (dense)]")
    with pytest.raises(ValueError, match=r"ranks: expected one rank per layer \(2\), got 3"):
        ls.LowRankSpec(spec, (1, 2, 3))
    with pytest.raises(ValueError, match=r"ranks\[1\]: expected an int in \[1, 21\] .* got 22"):
        ls.LowRankSpec(spec, (9, 22))
    with pytest.raises(ValueError, match=r"ranks\[0\]: expected an int in \[1, 33\] .* got 0"):
        ls.LowRankSpec(spec, (0, 5))
    with pytest.raises(TypeError, match=r"ranks\[0\]: expected an int, got float"):
        ls.LowRankSpec(spec, (2.0, 5))


def test_gated_spec_names_counts_and_plan() -> None:
    """A gated layer: the up pair `uv`/`vtv` and `c` beside the gate's, twice a plain layer's
    params and FLOPs; dense keeps W and V packed; plan rows name the gated launches."""
    lspec = ls.LowRankSpec(MLPSpec((33, 67, 21), "swiglu", True, "bfloat16"), (9, 5))
    assert lspec.modes == ("lowrank", "lowrank")
    assert ls.LowRankSpec.from_json(lspec.to_json()) == lspec
    shapes = ls.param_shapes(lspec)
    assert list(shapes) == ["u0", "vt0", "uv0", "vtv0", "b0", "c0", "u1", "vt1", "b1"]
    assert shapes["uv0"] == (33, 9) and shapes["vtv0"] == (9, 67) and shapes["c0"] == (67,)
    assert lspec.param_count() == 2 * (9 * 100 + 67) + 5 * 88 + 21
    dense = ls.LowRankSpec(MLPSpec((33, 67, 21), "geglu", False, "float16"), (33, 5))
    assert dense.modes == ("dense", "lowrank")
    assert list(ls.param_shapes(dense)) == ["wv0", "u1", "vt1"]
    assert ls.param_shapes(dense)["wv0"] == (33, 256)  # packed: 67 → Np = 128, 2·Np columns
    assert dense.param_count() == 2 * 33 * 67 + 5 * 88  # padding is layout, not params
    p = torch_front.plan(lspec, (19, 33))
    first, last = p.layers
    assert first.gated and not last.gated and "33→67 gated" in str(first)
    assert first.params == 2 * (9 * 100 + 67) and first.dense_params == 2 * (33 * 67 + 67)
    assert first.flops == 2 * 2 * 19 * 9 * 100 and first.dense_flops == 2 * 2 * 19 * 33 * 67
    assert first.bytes == 2 * (first.params + 19 * 100)
    assert first.launches[0].startswith("lowrank_gated_linear_act(silu) 19x67x33 r=9")
    assert "| 0 | 33→67 gated | 9 | lowrank |" in p.table()
    pd = torch_front.plan(dense, (19, 33))
    assert pd.layers[0].launches[0].startswith("gated(gelu) 19x67x33 [")
    assert "dense, W kept" in pd.layers[0].reason
    assert _jax()[1].plan(lspec, (19, 33), interpret=True).layers == p.layers


def test_gated_two_gemm_plan(monkeypatch) -> None:
    monkeypatch.setattr(lowrank, "MAX_RANK", 8)
    lspec = ls.LowRankSpec(MLPSpec((33, 67, 21), "swiglu", True, "float32"), (9, 5))
    assert lspec.modes == ("two_gemm", "lowrank")
    row = torch_front.plan(lspec, (7, 33)).layers[0]
    assert row.launches[0].startswith("linear_act(identity) 7x18x33 [")  # [tw | tv]
    assert row.launches[1].startswith("gated(silu) 7x67x18 [")
    assert row.bytes == 4 * (row.params + 7 * 100 + 2 * 7 * 18)


def test_plan_rows() -> None:
    lspec = ls.LowRankSpec(MLPSpec((33, 67, 21), "gelu", True, "float16"), (9, 21))
    p = torch_front.plan(lspec, (19, 33))
    first, last = p.layers
    assert (first.rank, first.mode, last.mode) == (9, "lowrank", "dense")
    assert first.params == 9 * (33 + 67) + 67 and first.dense_params == 33 * 67 + 67
    assert first.flops == 2 * 19 * 9 * 100 and first.dense_flops == 2 * 19 * 33 * 67
    assert first.bytes == 2 * (first.params + 19 * 100)
    assert last.params == last.dense_params and last.flops == last.dense_flops
    assert first.launches[0].startswith("lowrank_linear_act(gelu) 19x67x33 r=9")
    assert last.launches[0].startswith("linear_act(identity) 19x21x67")
    text = p.describe()
    assert "torch lowrank" in text and "fused, t on chip" in text and "dense, W kept" in text
    assert p.table().count("\n") == 3 and p.params == lspec.param_count()
    jax_plan = _jax()[1].plan(lspec, (19, 33), interpret=True)
    assert jax_plan.layers == p.layers  # the same rows and configs (one heuristic)
    with pytest.raises(TypeError, match=r"lspec: expected a fusedmlp\.common\.lowrank_spec"):
        torch_front.plan(lspec.spec, (19, 33))
    with pytest.raises(ValueError, match=r"x: expected shape \[\.\.\., 33\], got \[19, 32\]"):
        torch_front.plan(lspec, (19, 32))


# ==== the run choice by M (lowrank_spec.layer_run) ================================================
def test_run_choice_by_m(monkeypatch) -> None:
    """A plain `lowrank` layer runs fused at M ≤ TWO_PASS_MAX_M (64) and as two GEMMs above (its
    mode and params unchanged); a gated one fused at every M; plan says which and why, both
    stacks alike. On a Hopper GPU (faked) the two GEMMs name the Hopper kernels, and torch's
    run on the TMA kernel (interpreted)."""
    assert lowrank.TWO_PASS_MAX_M == 64
    lspec = ls.LowRankSpec(MLPSpec((33, 67, 21), "gelu", True, "float16"), (9, 21))
    at64, at65 = (torch_front.plan(lspec, shape) for shape in ((4, 16, 33), (5, 13, 33)))
    assert [r.runs for r in at64.layers] == ["lowrank", "dense"]
    assert [r.runs for r in at65.layers] == ["two_gemm", "dense"]
    assert [r.mode for r in at65.layers] == ["lowrank", "dense"] == list(lspec.modes)
    first = at65.layers[0]
    assert "fused, t on chip at M ≤ 64 (r ≤ 64 and K ≥ 1024: M ≤ 1024); M = 65: two GEMMs" in (
        first.reason
    )
    assert "H200, r = 64/128: M = 2048 48.7/57.4 µs" in first.reason
    assert "M = 64 ≤ 64 (decode)" in at64.layers[0].reason
    assert at64.layers[0].launches[0].startswith("lowrank_linear_act(gelu) 64x67x33 r=9")
    assert first.launches[0].startswith("linear_act(identity) 65x9x33 [")
    assert first.launches[1].startswith("linear_act(gelu) 65x67x9 [")
    assert first.params == at64.layers[0].params and first.flops == 2 * 65 * 9 * 100
    assert first.bytes == 2 * (first.params + 65 * 100 + 2 * 65 * 9)  # t's round trip
    assert "lowrank, runs two_gemm (" in str(first) and "| 0 | 33→67 | 9 | two_gemm |" in (
        at65.table()
    )
    assert ls.layer_run(lspec.layers()[0], 65) == ("two_gemm", first.reason)
    jax_front = _jax()[1]
    assert jax_front.plan(lspec, (5, 13, 33), interpret=True).layers == at65.layers
    gated = ls.LowRankSpec(MLPSpec((33, 67, 21), "swiglu", True, "float16"), (9, 5))
    rows = torch_front.plan(gated, (65, 33)).layers
    assert [r.runs for r in rows] == ["lowrank", "two_gemm"]
    assert "gated: fused at every M (two GEMMs would build [U | Uv]" in rows[0].reason
    # past decode, a long K (≥ 1024) and r ≤ 64: fused up to 1024 rows, x·U split four ways
    long_k = ls.LowRankSpec(MLPSpec((1024, 80, 32), "gelu", True, "bfloat16"), (64, 16))
    lay = long_k.layers()[0]
    for m, runs in ((65, "lowrank"), (1024, "lowrank"), (1025, "two_gemm")):
        assert ls.layer_run(lay, m)[0] == runs, m
        assert torch_front.plan(long_k, (m, 1024)).layers[0].runs == runs
    assert "K ≥ 1024 and M = 512 ≤ 1024: fused, x·U split 4 ways" in ls.layer_run(lay, 512)[1]
    assert lowrank.lowrank_config(512, 80, 1024, 64, "bfloat16").split_k == lowrank.FUSED_SPLIT
    wide_r = ls.LowRankSpec(MLPSpec((1024, 200, 32), "gelu", True, "bfloat16"), (65, 16))
    assert ls.layer_run(wide_r.layers()[0], 512)[0] == "two_gemm"  # block_r 128: two GEMMs
    # a Hopper GPU, faked for the choice only: the TMA / Mosaic GPU linear_act where their rules
    # hold (16-bit, K and N multiples of 16 here), the portable one elsewhere
    monkeypatch.setattr(torch_front, "_is_hopper", lambda: True)
    monkeypatch.setattr(torch_front, "INTERPRET", False)
    monkeypatch.setattr(jax_front, "_is_hopper", lambda: True)
    dt = "float16"
    aligned = ls.LowRankSpec(MLPSpec((48, 80, 32), "gelu", True, dt), (16, 16))
    hopper = {
        "torch": torch_front.plan(aligned, (65, 48)).layers[0].launches,
        "jax": jax_front.plan(aligned, (65, 48), interpret=False).layers[0].launches,
    }
    from fusedmlp.common.tiling import heuristic_config
    from fusedmlp.jax_impl.mosaic import pipeline

    configs = {  # each Hopper kernel's own default for the launch
        "torch": lambda m, n, k: heuristic_config("linear_act", m, n, k, dt, persistent=True),
        "jax": lambda m, n, k: pipeline.default_config("linear_act", m, n, k, dt),
    }
    for stack, name in (("torch", "tma.linear_act"), ("jax", "mosaic.linear_act")):
        c1, c2 = configs[stack](65, 16, 48), configs[stack](65, 80, 16)
        assert hopper[stack] == (
            f"{name}(identity) 65x16x48 [{c1}]",
            f"{name}(gelu) 65x80x16 [{c2}]",
        )
    # the TMA choice runs (its kernels interpreted: tma/support.py reads the interpreter flag of
    # its own): the checking call, then the recorded steps, meet the reference with the same bits
    monkeypatch.setattr(torch_front, "_PREPARED", {})  # records made here stay here
    fact = ls.cast_params(aligned, golden.lowrank_params(aligned, 23))
    x = make_input(aligned.spec, (5, 13), seed=24)
    outs = [_run("torch", x, fact, aligned) for _ in range(2)]
    (call,) = torch_front._PREPARED.values()
    assert [s[3][0][0][0] for s in call.steps] == [tma_linear.linear_act_fwd] * 2
    assert outs[0].tobytes() == outs[1].tobytes()
    _check(outs[0], x, fact, aligned, "torch two GEMMs on the TMA kernel")
    unaligned = (  # K = 33: no 16-byte rows
        torch_front.plan(lspec, (65, 33)).layers[0].launches[0],
        jax_front.plan(lspec, (65, 33), interpret=False).layers[0].launches[0],
    )
    assert all(launch.startswith("linear_act(identity) 65x9x33 [") for launch in unaligned)


def test_split_route_past_decode_both_fronts(monkeypatch) -> None:
    """The fused kernel past 64 rows with x·U split (`lowrank.fused_split_applies`: K ≥ 1024 on
    the GPU, lowered to 32 here so that the interpreter reaches it at small sizes): at M = 65 both
    layers run it with the two-pass config, both fronts meet both references within the policy,
    the twins give the same bits, torch's recorded steps repeat the checking call's bits."""
    monkeypatch.setattr(lowrank, "FUSED_SPLIT_MIN_K", 32)
    monkeypatch.setattr(torch_front, "_PREPARED", {})
    lowrank.lowrank_config.cache_clear()  # cached under the real constant
    try:
        spec = MLPSpec((33, 67, 21), "relu", True, "bfloat16")
        lspec, fact = ls.factorise(spec, init_params(spec, seed=21), rank=(9, 5))
        params = ls.cast_params(lspec, fact)
        x = make_input(spec, (5, 13), seed=22)
        rows = torch_front.plan(lspec, x.shape).layers
        assert [r.runs for r in rows] == ["lowrank", "lowrank"]
        assert "fused, x·U split 4 ways" in rows[0].reason
        config = lowrank.lowrank_config(65, 67, 33, 9, "bfloat16", interpret=True)
        assert config == lowrank.INTERPRET_TWO_PASS_CONFIG
        outs = {stack: _run(stack, x, params, lspec) for stack in ("torch", "jax")}
        for stack, out in outs.items():
            _check(out, x, params, lspec, f"{stack} split M=65")
        assert outs["torch"].tobytes() == outs["jax"].tobytes()
        (call,) = torch_front._PREPARED.values()
        assert [s[0] for s in call.steps] == ["fused"] * 2
        assert _run("torch", x, params, lspec).tobytes() == outs["torch"].tobytes()  # recorded
    finally:
        monkeypatch.undo()
        lowrank.lowrank_config.cache_clear()


def test_each_side_of_the_threshold() -> None:
    """M = 63 (fused) and M = 65 (two GEMMs), bfloat16: both fronts meet both references within
    the policy, the twins with the same bits (relu: a select, rounded alike in both
    interpreters); FactorisedMLP's recorded steps (two GEMM launches a layer at 65) repeat the
    checking path's bits."""
    dtype = "bfloat16"
    spec = MLPSpec((33, 67, 21), "relu", True, dtype)
    lspec, fact = ls.factorise(spec, init_params(spec, seed=21), rank=(9, 5))
    params = ls.cast_params(lspec, fact)
    module = FactorisedMLP.from_params({k: to_torch(v) for k, v in params.items()}, lspec)
    for lead in ((7, 9), (5, 13)):
        x = make_input(spec, lead, seed=22)
        torch_front._PREPARED.clear()  # torch's first call of the signature: the checking path
        outs = {stack: _run(stack, x, params, lspec) for stack in ("torch", "jax")}
        for stack, out in outs.items():
            _check(out, x, params, lspec, f"{stack} {dtype} M={np.prod(lead)}")
        assert outs["torch"].tobytes() == outs["jax"].tobytes(), lead
        xt = to_torch(x)
        kinds = [s[0] for s in torch_front._plan_steps(xt, module.params(), lspec, None).steps]
        assert kinds == (["two_gemm"] * 2 if lead == (5, 13) else ["fused"] * 2)
        with torch.no_grad():
            first, again = module(xt), module(xt)  # the steps recorded by the checking call
        assert torch.equal(first, again)
        assert to_numpy(first).tobytes() == outs["torch"].tobytes()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_two_gemms_other_dtypes(dtype: str) -> None:
    """The two-GEMM run past 64 rows in the dtypes the threshold test leaves (M = 65, odd sizes):
    both fronts within the policy of both references, the twins with the same bits, torch's
    recorded steps repeating its checking call's."""
    spec = MLPSpec((33, 67, 21), "relu", True, dtype)
    lspec, fact = ls.factorise(spec, init_params(spec, seed=23), rank=(9, 5))
    params = ls.cast_params(lspec, fact)
    x = make_input(spec, (5, 13), seed=24)
    assert [row.runs for row in torch_front.plan(lspec, x.shape).layers] == ["two_gemm"] * 2
    torch_front._PREPARED.clear()
    outs = {stack: _run(stack, x, params, lspec) for stack in ("torch", "jax")}
    for stack, out in outs.items():
        _check(out, x, params, lspec, f"{stack} {dtype} M=65")
    assert outs["torch"].tobytes() == outs["jax"].tobytes()
    again = _run("torch", x, params, lspec)  # the recorded steps
    assert again.tobytes() == outs["torch"].tobytes()


@pytest.mark.gpu
@pytest.mark.parametrize("m", [16, 65, 512, 1100])
def test_gpu_both_fronts_each_side_of_the_threshold(m: int) -> None:
    """On the GPU: the fused kernel at M = 16; at 65 and 512 two GEMMs for the first layer (K =
    256) and the fused kernel with x·U split four ways for the second (K = 1024, r = 32); at 1100
    two GEMMs for both — on a Hopper GPU the TMA linear_act (torch) and Mosaic GPU's (JAX), K and
    N multiples of 16 so their rules hold — each front within the policy of both references,
    torch's recorded steps (FactorisedMLP) repeating its checking call's bits."""
    spec = MLPSpec((256, 1024, 128), "silu", True, "bfloat16")
    lspec, fact = ls.factorise(spec, init_params(spec, seed=31), rank=(64, 32))
    params = ls.cast_params(lspec, fact)
    x = make_input(spec, (m,), seed=32)
    runs = [row.runs for row in torch_front.plan(lspec, x.shape).layers]
    expected = {16: ["lowrank"] * 2, 65: ["two_gemm", "lowrank"], 512: ["two_gemm", "lowrank"]}
    assert runs == expected.get(m, ["two_gemm"] * 2), runs
    tp = {k: to_torch(v).cuda() for k, v in params.items()}
    module = FactorisedMLP.from_params(tp, lspec)
    torch_front._PREPARED.clear()
    with torch.no_grad():
        first, again = module(to_torch(x).cuda()), module(to_torch(x).cuda())
    assert torch.equal(first, again)
    _check(to_numpy(first.cpu()), x, params, lspec, f"torch cuda M={m}")
    jnp, front = _jax()
    out = front.lowrank_mlp(jnp.asarray(x), {k: jnp.asarray(v) for k, v in params.items()}, lspec)
    _check(to_numpy(out), x, params, lspec, f"jax gpu M={m}")


# ==== goldens =====================================================================================
@pytest.mark.parametrize("name", LOWRANK_GOLDEN)
@pytest.mark.parametrize("stack", ["torch", "jax"])
def test_golden_lowrank(stack: str, name: str) -> None:
    case = golden.load_lowrank(name)
    out = _run(stack, case.x, case.params, case.lspec)
    assert out.shape == case.y.shape
    assert_close(out, case.y_rounded, case.spec, what=f"{stack}/{name} vs y_rounded")
    assert_close(out, case.y, case.spec, what=f"{stack}/{name} vs y")


def test_golden_lowrank_files() -> None:
    """Each dtype; a layer that runs dense; the files hold what the reference computes."""
    cases = [golden.load_lowrank(n) for n in LOWRANK_GOLDEN]
    assert {c.spec.dtype for c in cases} == set(DTYPES)
    assert any("dense" in c.lspec.modes for c in cases)
    assert any(c.spec.gated and c.lspec.modes[0] == "lowrank" for c in cases)
    assert set(LOWRANK_GOLDEN).isdisjoint(golden.case_names())  # dense goldens' lists unchanged
    for case in cases:
        with reference.reproducible():  # the mode the golden files are computed in
            y = ls.reference(case.lspec, case.x, case.params)
        np.testing.assert_array_equal(case.y, y)
        assert case.x.dtype.name == case.spec.dtype


def test_golden_twins_bitwise() -> None:
    """relu and identity: the twins agree bit for bit under the interpreters."""
    case = golden.load_lowrank("lowrank-dense1-relu-float16-nobias")
    out_t, out_j = (_run(s, case.x, case.params, case.lspec) for s in ("torch", "jax"))
    assert out_t.tobytes() == out_j.tobytes()


# ==== factorise in both stacks ====================================================================
def test_factorise_twins_and_two_gemm(monkeypatch) -> None:
    """torch's and JAX's factorise give the same bits; the two-GEMM mode (rank past the on-chip
    limit, lowered to 8 here so that small sizes reach it) runs in both stacks."""
    jnp, jax_front = _jax()
    spec = MLPSpec((33, 67, 21), "silu", True, "float32")
    params = init_params(spec, seed=5)
    lt, pt = torch_front.factorise({k: to_torch(v) for k, v in params.items()}, spec, rank=12)
    lj, pj = jax_front.factorise({k: jnp.asarray(v) for k, v in params.items()}, spec, rank=12)
    assert lt == lj and lt.ranks == (12, 12) and list(pt) == list(pj)
    for k in pt:
        np.testing.assert_array_equal(to_numpy(pt[k]), np.asarray(pj[k]))
    monkeypatch.setattr(lowrank, "MAX_RANK", 8)
    assert lt.modes == ("two_gemm", "two_gemm")
    x = make_input(spec, 7, seed=6)
    arrays = {k: to_numpy(v) for k, v in pt.items()}
    for stack in ("torch", "jax"):
        _check(_run(stack, x, arrays, lt), x, arrays, lt, f"{stack} two_gemm")


def test_factorise_gated_twins_modes_and_reference(monkeypatch) -> None:
    """A SwiGLU MLP: torch's and JAX's factorise give the same bits (activation-aware: one
    whitening for W and V); by energy the layer's rank keeps the energy in both; full rank
    reproduces the dense reference; the dense (packed W, V) and two-GEMM gated modes run in
    both stacks within the policy of both references."""
    from fusedmlp.common.packing import pack_gated

    jnp, jax_front = _jax()
    spec = MLPSpec((33, 67, 21), "swiglu", True, "float32")
    params = init_params(spec, seed=5)
    calib = make_input(spec, 40, seed=7)
    tp = {k: to_torch(v) for k, v in params.items()}
    lt, pt = torch_front.factorise(tp, spec, rank=(12, 6), calibration=to_torch(calib))
    lj, pj = jax_front.factorise(
        {k: jnp.asarray(v) for k, v in params.items()}, spec, rank=(12, 6), calibration=calib
    )
    assert lt == lj and lt.ranks == (12, 6) and list(pt) == list(pj) == list(ls.param_shapes(lt))
    for k in pt:
        np.testing.assert_array_equal(to_numpy(pt[k]), np.asarray(pj[k]), err_msg=k)
    plain = torch_front.factorise(tp, spec, rank=(12, 6))[1]
    assert not torch.equal(plain["uv0"], pt["uv0"])  # activation-aware changes both factors
    # energy: the larger of W's and V's energy ranks
    le = ls.factorise(spec, params, energy=0.7)[0]
    s_w, s_v = (np.linalg.svd(params[n].astype(np.float64), compute_uv=False) for n in ("w0", "v0"))
    r_w, r_v = (lowrank.rank_for_energy(sv, 0.7) for sv in (s_w, s_v))
    assert le.ranks[0] == max(r_w, r_v)
    # full rank: dense, the original W and V packed, the dense reference
    lf, pf = ls.factorise(spec, params, rank=(33, 21))
    assert lf.modes == ("dense", "dense") and list(pf) == ["wv0", "bc0", "w1", "b1"]
    np.testing.assert_array_equal(pf["wv0"], pack_gated(params["w0"], params["v0"]))
    x = make_input(spec, 7, seed=6)
    np.testing.assert_array_equal(ls.reference(lf, x, pf), reference.forward(spec, x, params))
    # each mode of a gated layer in both stacks: dense; two GEMMs (on-chip limit lowered to 8)
    cases = [ls.factorise(spec, params, rank=(33, 6))]
    monkeypatch.setattr(lowrank, "MAX_RANK", 8)
    cases.append((lt, {k: to_numpy(v) for k, v in pt.items()}))
    assert [c[0].modes for c in cases] == [("dense", "lowrank"), ("two_gemm", "lowrank")]
    for lspec, arrays in cases:
        arrays = ls.cast_params(lspec, arrays)
        for stack in ("torch", "jax"):
            _check(_run(stack, x, arrays, lspec), x, arrays, lspec, f"{stack} {lspec.modes}")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gated_twins_bitwise_every_mode(monkeypatch, dtype: str) -> None:
    """The twins give the same bits on every gated mode (fused, two GEMMs, dense) where every
    operation rounds alike: a relu gate ("reglu", registered for this test only). silu's and
    gelu's exp differ between the interpreters (tests/test_lowrank.py::test_twins_bitwise says
    the same of the kernels), so the SwiGLU/GeGLU runs are held to the policy instead."""
    from fusedmlp.common import spec as spec_module

    monkeypatch.setitem(spec_module.GATED_ACTIVATIONS, "reglu", "relu")
    monkeypatch.setattr(spec_module, "ACTIVATIONS", (*spec_module.ACTIVATIONS, "reglu"))
    spec = MLPSpec((33, 67, 21), "reglu", True, dtype)
    params = init_params(spec, seed=11)
    x = make_input(spec, (3, 5), seed=12)
    lspecs = []
    for ranks in ((9, 5), (33, 5), (12, 5)):
        lspecs.append(ls.factorise(spec, params, rank=ranks))
    monkeypatch.setattr(lowrank, "MAX_RANK", 10)
    assert [c[0].modes[0] for c in lspecs] == ["lowrank", "dense", "two_gemm"]
    for lspec, fact in lspecs:
        arrays = ls.cast_params(lspec, fact)
        out_t, out_j = (_run(stack, x, arrays, lspec) for stack in ("torch", "jax"))
        assert out_t.tobytes() == out_j.tobytes(), lspec.modes
        _check(out_t, x, arrays, lspec, f"reglu {lspec.modes}")


# ==== from_hf =====================================================================================
def _gpt2(dtype: str):
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    config = transformers.GPT2Config(n_embd=45, n_head=5, activation_function="gelu_new")
    module = GPT2MLP(73, config)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[0] ** 0.5)
    return module.eval().to(getattr(torch, dtype))


def _factorised_reference(module, rank=None, energy=None, calibration=None):
    """The float64 factorisation of the module's own (dtype) weights, rounded to the dtype."""
    dense = FusedMLP.from_hf(module)
    spec = dense.spec
    params = {k: to_numpy(v).astype(np.float64) for k, v in dense.params().items()}
    calib = None if calibration is None else to_numpy(calibration).astype(np.float64)
    lspec, fact = ls.factorise(spec, params, rank=rank, energy=energy, calibration=calib)
    return lspec, ls.cast_params(lspec, fact)


@pytest.mark.parametrize(
    "dtype, kwargs",
    [
        ("float32", dict(rank=(11, 7))),
        ("float16", dict(energy=0.6)),
        ("bfloat16", dict(rank=13, calibration=True)),
    ],
    ids=["rank-float32", "energy-float16", "calibration-bfloat16"],
)
def test_from_hf(dtype: str, kwargs: dict) -> None:
    module = _gpt2(dtype)
    if kwargs.get("calibration"):
        gen = torch.Generator().manual_seed(8)
        kwargs["calibration"] = (torch.randn(40, 45, generator=gen) * 2).to(module.c_fc.weight)
    fm = FusedMLP.from_hf(module, **kwargs)
    assert isinstance(fm, FactorisedMLP)
    lspec, want = _factorised_reference(module, **kwargs)
    assert fm.lspec == lspec and fm.ranks == lspec.ranks
    for name, value in fm.params().items():
        assert value.dtype == getattr(torch, dtype) and not value.requires_grad
        np.testing.assert_array_equal(to_numpy(value), want[name].astype(np.float32), err_msg=name)
    x = _x(dtype)
    out = fm(x)  # grad mode on: the parameters need no gradient
    assert out.shape == (2, 5, 45) and out.dtype == x.dtype
    _check(to_numpy(out), to_numpy(x), {k: to_numpy(v) for k, v in fm.params().items()}, lspec,
           f"from_hf {kwargs}")  # fmt: skip
    if "calibration" in kwargs:  # activation-aware: differs from plain at the same rank
        plain = FusedMLP.from_hf(module, rank=13)
        assert not torch.equal(plain.params()["u0"], fm.params()["u0"])


def _hf_gated(kind: str, dtype: str):
    """A tiny LlamaMLP (SwiGLU; `llama_bias`: mlp_bias) or GemmaMLP (GeGLU, tanh), random weights:
    hidden 42 (3 heads of 14, as tests/test_convert.py), intermediate 73."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.gemma.modeling_gemma import GemmaMLP
    from transformers.models.llama.modeling_llama import LlamaMLP

    tiny = dict(hidden_size=42, intermediate_size=73, num_attention_heads=3, num_key_value_heads=3)
    if kind == "gemma":
        module = GemmaMLP(transformers.GemmaConfig(**tiny, head_dim=14))
    else:
        module = LlamaMLP(transformers.LlamaConfig(**tiny, mlp_bias=kind == "llama_bias"))
    gen = torch.Generator().manual_seed(17)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return module.eval().to(getattr(torch, dtype))


@pytest.mark.parametrize(
    "kind, dtype, kwargs",
    [
        ("llama", "float32", dict(rank=(11, 7))),
        ("llama_bias", "float16", dict(energy=0.6)),
        ("gemma", "bfloat16", dict(rank=13, calibration=True)),
    ],
    ids=["llama-rank-float32", "llama_bias-energy-float16", "gemma-calibration-bfloat16"],
)
def test_from_hf_gated(kind: str, dtype: str, kwargs: dict) -> None:
    """Llama's and Gemma's gated blocks: the factors are the float64 factorisation of the block's
    own weights rounded once; the output meets both factorised references, and so does the JAX
    twin on the same params (bit for bit only with a select gate: test_gated_twins_bitwise_...)."""
    jnp, jax_front = _jax()
    module = _hf_gated(kind, dtype)
    if kwargs.get("calibration"):
        gen = torch.Generator().manual_seed(18)
        kwargs["calibration"] = (torch.randn(40, 42, generator=gen) * 2).to(module.up_proj.weight)
    fm = FusedMLP.from_hf(module, **kwargs)
    assert isinstance(fm, FactorisedMLP) and fm.spec.gated
    lspec, want = _factorised_reference(module, **kwargs)
    assert fm.lspec == lspec and lspec.modes == ("lowrank", "lowrank")
    assert list(fm.params()) == ["u0", "vt0", "uv0", "vtv0"] + ["b0", "c0"] * (
        kind == "llama_bias"
    ) + ["u1", "vt1"] + ["b1"] * (kind == "llama_bias")
    for name, value in fm.params().items():
        assert value.dtype == getattr(torch, dtype) and not value.requires_grad
        np.testing.assert_array_equal(to_numpy(value), want[name].astype(np.float32), err_msg=name)
    x = torch.randn(2, 5, 42, generator=torch.Generator().manual_seed(9)).to(getattr(torch, dtype))
    out = fm(x)
    assert out.shape == (2, 5, 42) and out.dtype == x.dtype
    arrays = {k: to_numpy(v) for k, v in fm.params().items()}
    _check(to_numpy(out), to_numpy(x), arrays, lspec, f"from_hf {kind} {dtype}")
    out_j = jax_front.lowrank_mlp(  # to_numpy gives bfloat16 as float32: cast back
        jnp.asarray(cast(to_numpy(x), dtype)),
        {k: jnp.asarray(cast(v, dtype)) for k, v in arrays.items()},
        lspec,
    )
    _check(np.asarray(out_j), to_numpy(x), arrays, lspec, f"jax {kind} {dtype}")
    if "calibration" in kwargs:  # activation-aware: differs from plain at the same rank
        plain = FusedMLP.from_hf(module, rank=13)
        assert not torch.equal(plain.params()["uv0"], fm.params()["uv0"])


def test_from_hf_gated_bad_input() -> None:
    llama = _hf_gated("llama", "float32")
    with pytest.raises(ValueError, match=r"rank: expected an int in \[1, 42\] .* got 0"):
        FusedMLP.from_hf(llama, rank=0)
    with pytest.raises(ValueError, match=r"rank\[1\]: expected an int in \[1, 42\] .* got 50"):
        FusedMLP.from_hf(llama, rank=(5, 50))
    with pytest.raises(ValueError, match=r"energy: expected a float in \(0, 1\], got 0"):
        FusedMLP.from_hf(llama, energy=0)
    with pytest.raises(
        ValueError, match=r"calibration: expected shape \[\.\.\., 42\] .*got \[3, 41"
    ):
        FusedMLP.from_hf(llama, rank=4, calibration=torch.zeros(3, 41))
    spec = MLPSpec((42, 73, 42), "swiglu", False, "float32")
    params = init_params(spec, seed=1)
    with pytest.raises(ValueError, match=r"params: missing \['v0'\]"):
        ls.factorise(spec, {k: v for k, v in params.items() if k != "v0"}, rank=4)
    lspec, fact = ls.factorise(spec, params, rank=4)
    tp = {k: to_torch(v) for k, v in ls.cast_params(lspec, fact).items()}
    x = torch.zeros(3, 42)
    with pytest.raises(ValueError, match=r"params: missing \['uv0'\], unexpected \[\]"):
        torch_front.lowrank_mlp(x, {k: v for k, v in tp.items() if k != "uv0"}, lspec)
    bad = {**tp, "vtv0": tp["vtv0"][:, :72]}
    with pytest.raises(
        ValueError, match=r"params\['vtv0'\]: expected shape \[4, 73\], got \[4, 72\]"
    ):
        torch_front.lowrank_mlp(x, bad, lspec)


def _x(dtype: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(9)
    return torch.randn(2, 5, 45, generator=gen).to(getattr(torch, dtype))


def test_from_hf_bad_input() -> None:
    module = _gpt2("float32")
    with pytest.raises(ValueError, match=r"rank: expected an int in \[1, 45\] .* got 0"):
        FusedMLP.from_hf(module, rank=0)
    with pytest.raises(ValueError, match=r"rank: expected an int in \[1, 45\] .* got 46"):
        FusedMLP.from_hf(module, rank=46)
    with pytest.raises(ValueError, match=r"rank\[1\]: expected an int in \[1, 45\] .* got 50"):
        FusedMLP.from_hf(module, rank=(5, 50))
    with pytest.raises(TypeError, match="rank: expected an int, got float"):
        FusedMLP.from_hf(module, rank=4.5)
    with pytest.raises(ValueError, match="rank, energy: expected exactly one of them"):
        FusedMLP.from_hf(module, rank=4, energy=0.5)
    with pytest.raises(ValueError, match="rank, energy: expected exactly one of them"):
        FusedMLP.from_hf(module, calibration=torch.zeros(3, 45))
    with pytest.raises(ValueError, match=r"energy: expected a float in \(0, 1\], got 1.5"):
        FusedMLP.from_hf(module, energy=1.5)
    with pytest.raises(
        ValueError, match=r"calibration: expected shape \[\.\.\., 45\] .*got \[3, 44"
    ):
        FusedMLP.from_hf(module, rank=4, calibration=torch.zeros(3, 44))
    with pytest.raises(TypeError, match=r"calibration: expected a torch\.Tensor or np\.ndarray"):
        FusedMLP.from_hf(module, rank=4, calibration=[[0.0] * 45])
    with pytest.raises(ValueError, match=r"impl: expected one of \('auto', 'triton'\)"):
        FusedMLP.from_hf(module, rank=4, impl="triton_tma")


def test_factorised_module_refuses_gradients_and_bad_x() -> None:
    module = _gpt2("float32")
    fm = FusedMLP.from_hf(module, rank=5)
    x = _x("float32").requires_grad_()
    with pytest.raises(NotImplementedError, match="inference only"):
        fm(x)
    with torch.no_grad():
        assert fm(x).shape == (2, 5, 45)
        with pytest.raises(ValueError, match=r"x: expected dtype float32 .*got float16"):
            fm(x.detach().half())
        with pytest.raises(ValueError, match=r"x: expected shape \[\.\.\., 45\], got \[2, 44\]"):
            fm(torch.zeros(2, 44))


# ==== torch.compile and autocast ==================================================================
@pytest.mark.parametrize(
    "autocast, activation",
    [(False, "silu"), (True, "silu"), (False, "swiglu")],
    ids=["inference", "autocast", "gated"],
)
def test_factorised_fullgraph_as_torch_2_11(autocast: bool, activation: str) -> None:
    """One node under torch 2.11's Dynamo; gated: a fused gated layer, then a dense last one."""
    torch._dynamo.reset()
    lspec = ls.LowRankSpec(MLPSpec((19, 37, 11), activation, True, "float32"), (6, 11))
    params = {k: to_torch(v) for k, v in golden.lowrank_params(lspec, 3).items()}
    fm = FactorisedMLP.from_params(params, lspec)
    x = to_torch(make_input(lspec.spec, 6, seed=4))
    with dynamo_as_torch_2_11():
        compiled = torch.compile(fm, fullgraph=True, backend="aot_eager")
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = compiled(x)
            eager = fm(x)
    assert torch.equal(out, eager)
    run = lspec.with_dtype("bfloat16") if autocast else lspec
    assert out.dtype == getattr(torch, run.dtype)
    arrays = {k: cast(to_numpy(v), run.dtype) for k, v in params.items()}
    _check(to_numpy(out), cast(to_numpy(x), run.dtype), arrays, run, f"compiled {run.dtype}")


def test_twin_contract() -> None:
    import test_twins as tw

    names = [
        tw.public(tw.defined_names(d / "lowrank_front.py")) for d in (tw.TORCH_DIR, tw.JAX_DIR)
    ]
    assert names[0] == names[1], names[0] ^ names[1]
    assert {"factorise", "lowrank_mlp", "plan"} <= names[0]
    assert json.loads(ls.LowRankSpec(MLPSpec((4, 4), "relu", True, "float32"), (4,)).to_json())


def test_docs_usage_snippets_run(capsys) -> None:
    """docs/lowrank.md's Usage snippets run as written (torch, then JAX)."""
    import re

    pytest.importorskip("transformers")
    text = (Path(__file__).resolve().parents[1] / "docs" / "lowrank.md").read_text()
    usage = text.split("## Usage", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", usage, flags=re.S)
    assert len(blocks) == 2
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/lowrank.md usage {i}", "exec"), {})
    out = capsys.readouterr().out
    assert "torch lowrank" in out and "fused, t on chip" in out and "| 1 | 96→40 | 8 |" in out


def test_jax_lowrank_mlp_under_jit() -> None:
    """A LowRankSpec is hashable: a static argument of jax.jit; jitted and eager calls agree."""
    import jax

    jnp, front = _jax()
    case = golden.load_lowrank("lowrank-gelu-float32")
    x, params = jnp.asarray(case.x), {k: jnp.asarray(v) for k, v in case.params.items()}
    jitted = jax.jit(front.lowrank_mlp, static_argnames=("lspec",))(x, params, lspec=case.lspec)
    assert (
        np.asarray(jitted).tobytes()
        == np.asarray(front.lowrank_mlp(x, params, case.lspec)).tobytes()
    )
