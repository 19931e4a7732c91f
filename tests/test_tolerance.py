"""The tolerance policy itself: passes the reference, fails perturbed/NaN, says where."""

from __future__ import annotations

import numpy as np
import pytest

from fusedmlp.common import DTYPES, MLPSpec, golden, tolerance
from fusedmlp.common.dtypes import UNIT_ROUNDOFF, numpy_dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_passes_the_reference_and_its_rounded_form(dtype):
    case = golden.load(f"gelu-{dtype}-bias")
    assert tolerance.compare(case.y, case.y, case.spec).passed
    # What a correct kernel must at least do: round hidden layers and output to the dtype.
    assert tolerance.compare(case.y_rounded, case.y, case.spec).passed
    stored = case.y.astype(numpy_dtype(dtype))
    assert tolerance.compare(stored, case.y, case.spec).passed


@pytest.mark.parametrize("dtype", DTYPES)
def test_fails_a_perturbed_output(dtype):
    case = golden.load(f"silu-{dtype}-nobias")
    bad = case.y.copy()
    bad[3, 5] += 0.5 * np.abs(case.y).max()
    result = tolerance.compare(bad, case.y, case.spec)
    assert not result.passed
    assert result.mismatches == 1
    assert result.examples[0][0] == (3, 5)
    assert "at (3, 5)" in result.report()
    # A small uniform scaling error, well above the dtype's rounding, fails too.
    scaled = case.y * (1 + 64 * tolerance.bounds(case.spec).unit + 1e-4)
    assert not tolerance.compare(scaled, case.y, case.spec).passed


def test_fails_nan_and_inf_where_reference_is_finite():
    case = golden.load("relu-float32-bias")
    out = case.y.copy()
    out[0, 0] = np.nan
    out[1, 2] = np.inf
    result = tolerance.compare(out, case.y, case.spec)
    assert not result.passed
    assert "2 NaN/Inf where the reference is finite" in result.report()
    assert [e[0] for e in result.examples] == [(0, 0), (1, 2)]


def test_nan_must_propagate():
    case = golden.load("nan-relu-float32")
    assert np.isnan(case.y).any()
    assert tolerance.compare(case.y, case.y, case.spec).passed
    lost = np.nan_to_num(case.y, nan=0.0)
    result = tolerance.compare(lost, case.y, case.spec)
    assert not result.passed and "where the reference is NaN" in result.report()


def test_shape_mismatch_fails():
    case = golden.load("relu-float32-bias")
    result = tolerance.compare(case.y[:-1], case.y, case.spec)
    assert not result.passed and "shape" in result.report()


def test_baseline_rule_two_times_plus_floor():
    spec = MLPSpec((4, 4), "relu", True, "bfloat16")
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((64, 64))
    u = UNIT_ROUNDOFF["bfloat16"]
    noise = rng.standard_normal(ref.shape)
    baseline = ref + 0.5 * u * noise * np.abs(ref)
    good = ref + 1.0 * u * noise * np.abs(ref)
    worse = ref + 4.0 * u * noise * np.abs(ref)
    assert tolerance.compare(good, ref, spec, baseline=baseline).passed
    assert tolerance.compare(worse, ref, spec).passed  # within the absolute bound ...
    result = tolerance.compare(worse, ref, spec, baseline=baseline)
    assert not result.passed  # ... but more than 2x the framework's own error
    assert "x baseline" in result.report()


def test_bounds_scale_with_the_format():
    b32 = tolerance.bounds(MLPSpec((4, 4), "relu", True, "float32"))
    btf = tolerance.bounds(MLPSpec((4, 4), "relu", True, "float32", "tf32"))
    b16 = tolerance.bounds(MLPSpec((4, 4), "relu", True, "float16"))
    bbf = tolerance.bounds(MLPSpec((4, 4), "relu", True, "bfloat16"))
    assert b32.rel_fro < btf.rel_fro == b16.rel_fro < bbf.rel_fro
    assert tolerance.assert_close(np.ones(3), np.ones(3), MLPSpec((4, 4), "relu", True, "float16"))
    with pytest.raises(AssertionError, match="where: FAIL"):
        tolerance.assert_close(
            np.zeros(3), np.ones(3), MLPSpec((4, 4), "relu", True, "float16"), what="where"
        )
