"""Golden files: regeneration is bit-identical, coverage, size; the gradient files' contents."""

from __future__ import annotations

import numpy as np

from fusedmlp.common import ACTIVATIONS, DTYPES, golden, reference
from fusedmlp.common.packing import pack_params, packed_names, unpack_params
from fusedmlp.common.tiling import WHOLE_WIDTHS


def test_regeneration_is_bit_identical():
    assert golden.check() == []


def test_reproducible_mode_is_cpu_independent():
    """The golden files regenerate where NumPy's SIMD loops differ: emulated here with every
    AVX / AVX2 / FMA / AVX-512 dispatch target of NumPy switched off (read at import: a fresh
    process; the names of NumPy < 2.4 and of 2.4's X86_V3 / X86_V4). The BLAS is not called in
    the mode; glibc's exp and tanh take their FMA versions on every CPU with FMA (see
    reference.py)."""
    import os
    import subprocess
    import sys

    targets = "AVX2 FMA3 AVX F16C AVX512F AVX512_SKX X86_V3 X86_V4"
    env = dict(os.environ, NPY_DISABLE_CPU_FEATURES=targets)
    proc = subprocess.run(
        [sys.executable, "-m", "fusedmlp.common.golden", "--check"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


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
        with reference.reproducible():  # the mode the files are computed in
            y = reference.forward(case.spec, case.x, case.params)
        np.testing.assert_array_equal(case.y, y)
        assert case.x.dtype.name == case.spec.dtype
        # the default mode (the BLAS) agrees to float64 rounding, not bit for bit
        np.testing.assert_allclose(
            reference.forward(case.spec, case.x, case.params), y, rtol=1e-12, atol=1e-12
        )


def test_total_size_under_5mb():
    size = sum(p.stat().st_size for p in golden.GOLDEN_DIR.glob("*.npz"))
    assert size < 5_000_000


# ---- gradient files (the manifest's grad_cases) --------------------------------------------------
def test_grad_files_hold_the_rounded_forward_gradients():
    """Each gradient file: the dense case's dy, and `reference.backward(round_hidden=True)` in
    the packed names (padded columns exact zeros), bit for bit; its manifest entry says so."""
    manifest = golden.load_manifest()
    for name in golden.grad_case_names():
        case, grad, entry = golden.load(name), golden.load_grad(name), manifest["grad_cases"][name]
        assert entry["case"] == name and entry["case_file"] == manifest["cases"][name]["file"]
        assert grad.spec == case.spec and entry["linearisation"] == "round_hidden"
        assert grad.dy.dtype == case.dy.dtype and grad.dy.tobytes() == case.dy.tobytes()
        assert entry["dy_shape"] == list(grad.dy.shape) and entry["dy_dtype"] == case.spec.dtype
        assert list(grad.grads) == ["x", *packed_names(case.spec)]
        assert entry["grad_shapes"] == {k: list(v.shape) for k, v in grad.grads.items()}
        assert all(v.dtype == np.float64 for v in grad.grads.values())
        with reference.reproducible():
            want = reference.backward(case.spec, case.x, case.params, case.dy, round_hidden=True)
        got = grad.contract_grads()
        assert list(got) == list(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name}: d{key}")
        if case.spec.dtype != "float32":  # not the dense file's gradients at the exact forward
            assert any(not np.array_equal(case.grads[k], want[k]) for k in want), name
        params = {k: v for k, v in grad.grads.items() if k != "x"}
        for key, again in pack_params(case.spec, unpack_params(case.spec, params)).items():
            np.testing.assert_array_equal(params[key], again, err_msg=f"{name}: {key} padding")


def test_coverage_of_grad_cases():
    """The gradient cases span the training matrix: plain and gated (swiglu and geglu), 2 and 3+
    layers, each dtype, bias and none, 3-D, M = 1, NaN, relu; fused_small takes each."""
    names = golden.grad_case_names()
    assert set(names) <= set(golden.case_names())
    cases = [golden.load(n) for n in names]
    specs = [c.spec for c in cases]
    assert {s.dtype for s in specs} == set(DTYPES)
    assert {s.bias for s in specs} == {True, False}
    assert {"swiglu", "geglu", "relu"} <= {s.activation for s in specs}
    assert any(not s.gated and s.num_layers == 2 for s in specs)
    assert any(s.gated and s.num_layers >= 3 for s in specs)
    assert any(not s.gated and s.num_layers >= 3 for s in specs)
    assert any(c.x.ndim == 3 for c in cases)
    assert any(c.x.shape[0] == 1 and c.x.ndim == 2 for c in cases)
    assert any(np.isnan(c.x).any() for c in cases)
    assert all(max(s.widths) <= WHOLE_WIDTHS[-1] for s in specs)
