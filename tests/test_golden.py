"""Golden files: regeneration is bit-identical, coverage, size."""

from __future__ import annotations

import numpy as np

from fusedmlp.common import ACTIVATIONS, DTYPES, golden, reference


def test_regeneration_is_bit_identical():
    assert golden.check() == []


def test_coverage_of_cases():
    cases = golden.load_all()
    combos = {(c.spec.activation, c.spec.dtype, c.spec.bias) for c in cases}
    for activation in ACTIVATIONS:
        for dtype in DTYPES:
            for bias in (True, False):
                assert (activation, dtype, bias) in combos
    assert any(c.spec.num_layers >= 3 for c in cases)
    assert any(c.x.ndim == 3 for c in cases)
    assert any(c.x.shape[0] == 1 and c.x.ndim == 2 for c in cases)
    assert any(np.isnan(c.y).any() for c in cases)
    for c in cases:
        assert all(w % 16 for w in c.spec.widths) or c.name.startswith("deep-swiglu")


def test_files_hold_what_the_reference_computes():
    for case in golden.load_all()[::7]:
        np.testing.assert_array_equal(case.y, reference.forward(case.spec, case.x, case.params))
        assert case.x.dtype.name == case.spec.dtype


def test_total_size_under_5mb():
    size = sum(p.stat().st_size for p in golden.GOLDEN_DIR.glob("*.npz"))
    assert size < 5_000_000
