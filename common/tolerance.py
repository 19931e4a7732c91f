"""The tolerance policy: the only place where numeric thresholds live.

Two measures of a kernel's output `out` against the float64 reference `ref`:

- rel_fro   = ‖out − ref‖_F / ‖ref‖_F, the error of the whole tensor;
- max_scaled = max |out − ref| / max |ref|, the worst element, scaled by the output's magnitude so
  that
  one bound serves every layer width and input scale.

Bounds are multiples of the unit roundoff u of the compute format (common.dtypes.UNIT_ROUNDOFF):

- A kernel must round the output once (≤ u relative) and, in per-layer kernels, every hidden layer
  once;
  a rounding error of the hidden propagates through the next product with random signs, so it adds
  about
  u/√3 RMS per layer to rel_fro. A 2–8 layer MLP therefore lands near 1–3 u; REL_FRO_UNITS = 8
  leaves
  room for fp32 accumulation over K up to 16384 (√K · 2^-24 ≈ 8e-6 ≪ 8 u for the 16-bit formats).
- One element can be unlucky: the output's own rounding is ≤ u·|y|, the propagated hidden error is
  ~u·|y| with a tail of a few sigma over millions of elements. MAX_SCALED_UNITS = 32 bounds it.
- float32: u = 2^-24 is far below the accumulation error √K·u of a K-long fp32 sum, so float32
  bounds
  are set by accumulation instead: FP32_REL_FRO = 2e-5 and FP32_MAX_SCALED = 2e-4 (√16384 · 2^-24 ·
  a
  few, and the float32 activation formulas' own few ulps).
- tf32 rounds operands to 11 significant bits: u = 2^-11, the same bounds as float16.

Where the caller passes the framework's own result in the same dtype (eager torch, jax.numpy) as a
`baseline`, the kernel must also be within 2× the baseline's error plus a floor of 1 u (quack's
rule):
a kernel may not be much worse than the framework whatever the absolute bounds allow.

NaN or ±Inf where the reference is finite fails, and so does a finite value where the reference is
NaN
(NaN must propagate); a report says where (index, got, expected) and how many.

Gradients (`grad_bounds`, `compare_grads`; issue 24) are judged per tensor (x and every param) with
the same two measures against `reference.backward(..., round_hidden=True)`: the float64 gradient of
the forward AS THE KERNELS STORE IT (hidden layers rounded to the dtype). The linearisation point
matters for relu only: its derivative jumps at 0, and against the unrounded forward a rounded hidden
flips the sign of a fraction ~u of the next pre-activations, each flip an O(1) error in its element
(rel_fro ~ √u, 0.06 in bfloat16: no multiple of u bounds that); torch autograd flips the same way.
At the rounded forward the flips left come from the kernel's own rounding of its hiddens: where
its fp32 sum of a pre-activation lies within ~2^-24 of a rounding midpoint of the dtype, its hidden
differs from the reference's by one unit in the last place, and that difference (~u) travels into
the later layers' pre-activations, so those within ~u of 0 can flip. In a few thousand rows that
is rare; at ~1e5 rows it is all but certain in float16 (nerf-64x5, 100,003 rows on the H200: one
element of one row, an O(1) error in that row of dx, max_scaled 87 u, in every implementation
alike). Tests at such row counts linearise at the kernel's own stored forward instead
(`reference.backward(..., hidden=...)`): no other bound changes.
Measured in float64 (256-wide 3-layer relu MLP, M=512): the two linearisation points differ by
8.2 u rel_fro in bfloat16 and 28 u in float16 (max_scaled up to 274 u) — the √u law — against
≤ 0.6 u for gelu and silu.
A backward rounds more often than a forward: per layer the saved pre-activation (and gate), the
activation-gradient product dZ and the propagated dh, each ≤ u, plus the forward's hidden; about
three times the forward's rounding points, √3 times its random-sign error, so the gradient bounds
are twice the forward's: GRAD_REL_FRO_UNITS = 16, GRAD_MAX_SCALED_UNITS = 64, and for float32
(accumulation over M as well as K in dW = hᵀ·dZ) FP32_GRAD_REL_FRO = 4e-5, FP32_GRAD_MAX_SCALED =
4e-4. The baseline rule (2× torch autograd / jax.grad of the plain baseline + 1 u) applies
unchanged. Measured (torch's Triton kernels under the interpreter, 2026-12-01, odd sizes of 19–70,
2–3 layers, every activation): 16-bit ≤ 0.9 u rel_fro and ≤ 1.5 u max_scaled; float32 ≤ 5.6 u
(3.3e-7) and ≤ 7.4 u.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .dtypes import UNIT_ROUNDOFF
from .spec import MLPSpec

REL_FRO_UNITS = 8.0
MAX_SCALED_UNITS = 32.0
FP32_REL_FRO = 2e-5
FP32_MAX_SCALED = 2e-4
BASELINE_FACTOR = 2.0
BASELINE_FLOOR_UNITS = 1.0
REPORT_LIMIT = 5
# Gradients: see the module docstring (twice the forward's bounds, at the rounded forward).
GRAD_REL_FRO_UNITS = 16.0
GRAD_MAX_SCALED_UNITS = 64.0
FP32_GRAD_REL_FRO = 4e-5
FP32_GRAD_MAX_SCALED = 4e-4

# The float64 reference against independent float64 formulations (torch, jax.numpy): two float64
# evaluations of the same small MLP differ by a few ulps of 2^-53 per operation, summed over K ≤ 100
# terms and a few layers: ~1e-14 relative. Gradients add a layer of products: ~1e-13. The bounds
# leave two orders of magnitude; a wrong formula is off by far more (tested by perturbation).
REFERENCE_RTOL = 1e-12
REFERENCE_GRAD_RTOL = 1e-10
REFERENCE_ATOL = 1e-12
# An activation derivative in float32 (jax_impl/torch_impl activations: exp, ÷ and the erfc fit,
# whose fractional error is < 1.2e-7) against reference.activation_grad at the same float32
# point: a handful of float32 roundings (2^-24 each) and the fit's error, relative to the value.
ACTIVATION_FP32_RTOL = 2e-6
# The same under approximate math (the Mosaic GPU kernels' `approx_math`: exp as ex2.approx,
# reciprocals as rsqrt.approx squared, ~2^-22 relative; their outputs are float16/bfloat16 only):
# absolute error at most this times (1 + |z|), since the cancellations of the formulas — 1 + tanh
# near -1, 1 − tanh², 1 − sigmoid — turn a reciprocal's relative error into an absolute one that
# the factors z and gelu's du(z) then scale. 2^-16 is 1/64 of float16's spacing at 1, so it never
# shows in a 16-bit output beyond that output's own rounding. On the CPU (exact rsqrt) the fast
# forms err by at most 8.6e-7·(1 + |z|) on [-30, 30] (gelu_tanh' 4.7e-6 at z = -4.6).
ACTIVATION_APPROX_ATOL = 2.0**-16
# float64 factorisations (common/lowrank.py: SVD, Cholesky/eigh whitening) on matrices <= 41
# wide: backward-stable to ~n·κ·2^-53 (about 1e-13 here); identities they satisfy (Eckart–Young,
# TᵀT = C + δI, U·Vt = W at full rank) are checked at FACTOR_RTOL / FACTOR_ATOL. The whitened
# tail identity holds for the ridged covariance; measured on the unridged one (ridge 1e-12 of
# the trace) it moves by up to the ridge times the whitening's condition: RIDGE_RTOL.
FACTOR_RTOL = 1e-10
FACTOR_ATOL = 1e-9
RIDGE_RTOL = 1e-6
# A float32 pre-activation the saving forward keeps (one fp32-accumulated dot over K <= 100
# terms, the bias added, one rounding) against its float64 value: within K·2^-24 ≈ 6e-6 of the
# terms' magnitude (x and W of order 1) by the usual dot-product bound, 1e-5 absolute/relative.
FP32_PREACT_TOL = 1e-5
# A float32 value that is one rounding of a float64 mean (the training image's block means)
# against that mean: 2^-24 ≈ 6e-8 relative; the bound leaves an order of magnitude.
FP32_ROUNDED_RTOL = 1e-6


@dataclass(frozen=True)
class Bounds:
    rel_fro: float
    max_scaled: float
    unit: float  # the unit roundoff the bounds derive from


def compute_format(spec: MLPSpec) -> str:
    """The format whose rounding dominates: the dtype, or tf32 for float32 with tf32 products."""
    if spec.dtype == "float32":
        return "tf32" if spec.fp32_precision == "tf32" else "float32"
    return spec.dtype


def bounds(spec: MLPSpec) -> Bounds:
    fmt = compute_format(spec)
    u = UNIT_ROUNDOFF[fmt]
    if fmt == "float32":
        return Bounds(FP32_REL_FRO, FP32_MAX_SCALED, u)
    return Bounds(REL_FRO_UNITS * u, MAX_SCALED_UNITS * u, u)


def grad_bounds(spec: MLPSpec) -> Bounds:
    """The bounds for every gradient of `spec`'s MLP (x and each param)."""
    fmt = compute_format(spec)
    u = UNIT_ROUNDOFF[fmt]
    if fmt == "float32":
        return Bounds(FP32_GRAD_REL_FRO, FP32_GRAD_MAX_SCALED, u)
    return Bounds(GRAD_REL_FRO_UNITS * u, GRAD_MAX_SCALED_UNITS * u, u)


@dataclass
class Comparison:
    passed: bool
    rel_fro: float
    max_abs: float
    max_scaled: float
    bounds: Bounds
    baseline_rel_fro: float | None = None
    baseline_limit: float | None = None
    mismatches: int = 0
    failures: list[str] = field(default_factory=list)
    examples: list[tuple[tuple[int, ...], float, float]] = field(default_factory=list)

    def report(self) -> str:
        lines = [
            f"{'PASS' if self.passed else 'FAIL'}: rel_fro={self.rel_fro:.3e} "
            f"(bound {self.bounds.rel_fro:.3e}), max_scaled={self.max_scaled:.3e} "
            f"(bound {self.bounds.max_scaled:.3e}), max_abs={self.max_abs:.3e}"
        ]
        if self.baseline_rel_fro is not None:
            lines.append(
                f"  baseline rel_fro={self.baseline_rel_fro:.3e} -> limit {self.baseline_limit:.3e}"
            )
        lines += [f"  {reason}" for reason in self.failures]
        if self.mismatches:
            lines.append(
                f"  {self.mismatches} element(s) out of bounds; first {len(self.examples)}:"
            )
            lines += [f"    at {idx}: got {g!r}, expected {e!r}" for idx, g, e in self.examples]
        return "\n".join(lines)

    def __bool__(self) -> bool:
        return self.passed


def _errors(out: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    finite = np.isfinite(ref)
    diff = np.where(finite, out - ref, 0.0)
    ref_f = np.where(finite, ref, 0.0)
    ref_norm = float(np.linalg.norm(ref_f))
    ref_max = float(np.max(np.abs(ref_f))) if ref_f.size else 0.0
    diff_norm = float(np.linalg.norm(diff))
    max_abs = float(np.max(np.abs(diff))) if diff.size else 0.0
    # An all-zero reference: fall back to absolute error (relative error is undefined there).
    rel_fro = diff_norm / ref_norm if ref_norm > 0 else diff_norm
    max_scaled = max_abs / ref_max if ref_max > 0 else max_abs
    return rel_fro, max_abs, max_scaled


def compare(
    out: object, ref: np.ndarray, spec: MLPSpec, *, baseline: object | None = None
) -> Comparison:
    """Judge `out` (any array-like; converted to float64) against the float64 reference `ref`."""
    return _compare(out, ref, bounds(spec), baseline)


def compare_grads(
    grads: Mapping[str, object],
    ref: Mapping[str, np.ndarray],
    spec: MLPSpec,
    *,
    baselines: Mapping[str, object] | None = None,
) -> dict[str, Comparison]:
    """Judge every gradient in `ref` (keys "x" and the params', `reference.backward`) against
    `grads[key]` with `grad_bounds(spec)`, and against `baselines[key]` where given. A key missing
    from `grads` fails with a shape failure."""
    b = grad_bounds(spec)
    out: dict[str, Comparison] = {}
    for key, r in ref.items():
        if key not in grads:
            out[key] = Comparison(False, np.inf, np.inf, np.inf, b, failures=["missing gradient"])
            continue
        base = None if baselines is None else baselines.get(key)
        out[key] = _compare(grads[key], r, b, base)
    return out


def assert_grads_close(
    grads: Mapping[str, object],
    ref: Mapping[str, np.ndarray],
    spec: MLPSpec,
    *,
    baselines: Mapping[str, object] | None = None,
    what: str = "",
) -> dict[str, Comparison]:
    """`compare_grads`, raising AssertionError with every failing gradient's report (for tests)."""
    results = compare_grads(grads, ref, spec, baselines=baselines)
    bad = [f"d{key}: {c.report()}" for key, c in results.items() if not c.passed]
    if bad:
        raise AssertionError((f"{what}:\n" if what else "") + "\n".join(bad))
    return results


def _compare(out: object, ref: np.ndarray, b: Bounds, baseline: object | None) -> Comparison:
    out64 = np.asarray(out, dtype=np.float64)
    ref64 = np.asarray(ref, dtype=np.float64)
    if out64.shape != ref64.shape:
        return Comparison(
            False,
            np.inf,
            np.inf,
            np.inf,
            b,
            failures=[f"shape: expected {list(ref64.shape)}, got {list(out64.shape)}"],
        )
    failures: list[str] = []
    ref_nan, out_nan = np.isnan(ref64), np.isnan(out64)
    ref_finite = np.isfinite(ref64)
    bad_nonfinite = ref_finite & ~np.isfinite(out64)  # NaN/Inf where the reference is finite
    lost_nan = ref_nan & ~out_nan  # NaN in the reference that did not propagate
    inf_mismatch = np.isinf(ref64) & (out64 != ref64)
    if bad_nonfinite.any():
        failures.append(f"{int(bad_nonfinite.sum())} NaN/Inf where the reference is finite")
    if lost_nan.any():
        failures.append(f"{int(lost_nan.sum())} finite value(s) where the reference is NaN")
    if inf_mismatch.any():
        failures.append(f"{int(inf_mismatch.sum())} value(s) where the reference is ±Inf")
    # Norms over the elements both sides agree are finite; non-finite mismatches are counted above.
    comparable = ref_finite & np.isfinite(out64)
    rel_fro, max_abs, max_scaled = _errors(
        np.where(comparable, out64, 0.0), np.where(comparable, ref64, np.nan)
    )
    if rel_fro > b.rel_fro:
        failures.append(f"rel_fro {rel_fro:.3e} > bound {b.rel_fro:.3e}")
    if max_scaled > b.max_scaled:
        failures.append(f"max_scaled {max_scaled:.3e} > bound {b.max_scaled:.3e}")

    baseline_rel = baseline_limit = None
    if baseline is not None:
        base64 = np.asarray(baseline, dtype=np.float64)
        if base64.shape == ref64.shape:
            keep = comparable & np.isfinite(base64)
            baseline_rel = _errors(np.where(keep, base64, 0.0), np.where(keep, ref64, np.nan))[0]
            baseline_limit = BASELINE_FACTOR * baseline_rel + BASELINE_FLOOR_UNITS * b.unit
            if rel_fro > baseline_limit:
                failures.append(
                    f"rel_fro {rel_fro:.3e} > {BASELINE_FACTOR:g} x baseline {baseline_rel:.3e} "
                    f"+ {BASELINE_FLOOR_UNITS:g} u = {baseline_limit:.3e}"
                )

    # Where: elements whose error exceeds the max bound, plus every non-finite mismatch.
    ref_max = float(np.max(np.abs(ref64[ref_finite]))) if ref_finite.any() else 0.0
    elem_limit = b.max_scaled * (ref_max if ref_max > 0 else 1.0)
    with np.errstate(invalid="ignore"):
        too_far = comparable & (np.abs(out64 - ref64) > elem_limit)
    bad = too_far | bad_nonfinite | lost_nan | inf_mismatch
    where = np.argwhere(bad)[:REPORT_LIMIT]
    examples = [
        (tuple(int(i) for i in idx), float(out64[tuple(idx)]), float(ref64[tuple(idx)]))
        for idx in where
    ]
    return Comparison(
        passed=not failures,
        rel_fro=rel_fro,
        max_abs=max_abs,
        max_scaled=max_scaled,
        bounds=b,
        baseline_rel_fro=baseline_rel,
        baseline_limit=baseline_limit,
        mismatches=int(bad.sum()),
        failures=failures,
        examples=examples,
    )


def assert_close(
    out: object, ref: np.ndarray, spec: MLPSpec, *, baseline: object | None = None, what: str = ""
) -> Comparison:
    """`compare`, raising AssertionError with the full report on failure (for tests)."""
    result = compare(out, ref, spec, baseline=baseline)
    if not result.passed:
        raise AssertionError(f"{what}: {result.report()}" if what else result.report())
    return result
