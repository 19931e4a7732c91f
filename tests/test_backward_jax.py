"""The JAX backward (issue 24): jax_impl/backward.py's kernels and `jax_impl.mlp`'s custom_vjp.

Gradients of `sum(y ⊙ dy)` through the front (`jax.grad`, `value_and_grad`, under `jax.jit` and
`vmap`) against `reference.backward(..., round_hidden=True)` with the gradient tolerance
(`common.tolerance.assert_grads_close`) and the baseline rule against `jax.grad` of the `xla`
baseline in the same dtype: odd sizes, the three dtypes, bias and none, every activation, plain and
gated, 3 layers (gated hidden + plain last), M = 1, 3-D input, a residual, a NaN row; every JAX
implementation trains (through the portable backward; GPU-only ones are skipped as test_front does);
both `saved` policies give the same gradients bit for bit. The three kernels directly: the packed
gated epilogues write exact zeros in the padded columns (the interpreter NaN-fills outputs, so an
unwritten element fails), and the kernels lower for CUDA on this CPU (jax 0.10, as
test_gpu_lowering.py does for the forward kernels).

Interpreted kernels are slow: small shapes, cases pruned so that each axis is covered once, and
specs shared between tests so that the jitted kernels compile once per process.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusedmlp import jax_impl
from fusedmlp.common import (
    KERNEL_ACTIVATIONS,
    MLPSpec,
    TileConfig,
    impl_names,
    init_params,
    make_input,
    reference,
)
from fusedmlp.common.config import SAVED_POLICIES
from fusedmlp.common.cost import saved_bytes
from fusedmlp.common.packing import packed_width, unpack_gated
from fusedmlp.common.tiling import heuristic_config
from fusedmlp.common.tolerance import (
    ACTIVATION_APPROX_ATOL,
    ACTIVATION_FP32_RTOL,
    assert_grads_close,
)
from fusedmlp.jax_impl import backward
from fusedmlp.jax_impl.activations import (
    activation_and_grad,
    apply_activation,
    apply_activation_grad,
)
from fusedmlp.jax_impl.packing import pack_gated, pack_params
from helpers import lower_for_cuda, needs_jax_0_10_lowering, rand

F32 = jnp.float32


# ---- helpers -------------------------------------------------------------------------------------
def _f64(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a).astype(F32), dtype=np.float64)


def _inputs(spec: MLPSpec, lead: tuple[int, ...], seed: int):
    """x, params (NumPy, the contract's names) and dy in the spec dtype (NumPy float32 copy)."""
    params = init_params(spec, seed)
    x = make_input(spec, lead, seed + 1)
    rng = np.random.default_rng(seed + 2)
    dy = jnp.asarray(rng.standard_normal((*lead, spec.d_out)), F32).astype(spec.dtype)
    return x, params, dy


def _loss(spec: MLPSpec, dy, impl: str, saved: str, residual=None):
    def loss(x, params):
        y = jax_impl.mlp(x, params, spec, impl=impl, saved=saved, residual=residual)
        return jnp.sum(y.astype(F32) * dy.astype(F32)), y

    return loss


def _grads(spec, x, params, dy, *, impl="pallas_triton", saved="preact", jit=False, packed=False):
    """(y, {"x": dx, name: dparam}) from jax.value_and_grad through jax_impl.mlp."""
    jp = {k: jnp.asarray(v) for k, v in params.items()}
    if packed:
        jp = pack_params(spec, jp)
    fn = jax.value_and_grad(_loss(spec, dy, impl, saved), argnums=(0, 1), has_aux=True)
    if jit:
        fn = jax.jit(fn)
    (_, y), (dx, dp) = fn(jnp.asarray(x), jp)
    return y, {"x": dx, **dp}


def _reference(spec, x, params, dy):
    return reference.backward(spec, x, params, _f64(dy), round_hidden=True)


def _check(spec, x, params, dy, grads, *, what: str) -> None:
    """Gradients vs the float64 reference and the 2x rule against jax.grad of the xla baseline."""
    baseline = _grads(spec, x, params, dy, impl="xla")[1]
    assert_grads_close(
        {k: _f64(v) for k, v in grads.items()},
        _reference(spec, x, params, dy),
        spec,
        baselines={k: _f64(v) for k, v in baseline.items()},
        what=what,
    )


# ---- activation derivatives ----------------------------------------------------------------------
@pytest.mark.parametrize("activation", KERNEL_ACTIVATIONS)
def test_activation_grad_matches_the_reference(activation: str) -> None:
    z = np.concatenate([np.linspace(-12, 12, 241), [0.0, -0.0, 1e-30, 60.0, -60.0, np.nan]])
    got = np.asarray(apply_activation_grad(jnp.asarray(z, F32), activation), dtype=np.float64)
    want = reference.activation_grad(activation, z.astype(np.float32).astype(np.float64))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = ~np.isnan(want)
    np.testing.assert_allclose(
        got[finite], want[finite], rtol=ACTIVATION_FP32_RTOL, atol=ACTIVATION_FP32_RTOL
    )


@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast"])
@pytest.mark.parametrize("activation", KERNEL_ACTIVATIONS)
def test_activation_and_grad_is_both_from_one_transcendental(activation: str, fast: bool) -> None:
    """The Mosaic GPU act' step's pair: act(z) and act'(z) against the float64 reference on a
    dense grid, NaN kept — exact within the fp32 tolerance, with the approximate reciprocals
    within ACTIVATION_APPROX_ATOL·(1 + |z|) (gelu_tanh there in its sigmoid form); act(z) is
    `apply_activation`'s bits in both, act'(z) exact `apply_activation_grad`'s, so the portable
    twins lose nothing."""
    z = np.concatenate([np.linspace(-30, 30, 20001), [0.0, -0.0, 1e-30, 60.0, -60.0, np.nan]])
    zj = jnp.asarray(z, F32)
    act, grad = (np.asarray(v, np.float64) for v in activation_and_grad(zj, activation, fast))
    z64 = z.astype(np.float32).astype(np.float64)
    for got, want in (
        (act, reference.activation(activation, z64)),
        (grad, reference.activation_grad(activation, z64)),
    ):
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        finite = ~np.isnan(want)
        err = np.abs(got[finite] - want[finite])
        if fast:
            size = np.abs(np.nan_to_num(z64[finite]))  # identity' of NaN is 1
            assert np.all(err <= ACTIVATION_APPROX_ATOL * (1.0 + size))
        else:
            scale = ACTIVATION_FP32_RTOL * np.maximum(np.abs(want[finite]), 1.0)
            assert np.all(err <= scale), float(np.max(err / scale))
    # the forward's activation is the same expression, bit for bit (its tiles meet this one's)
    np.testing.assert_array_equal(act, np.asarray(apply_activation(zj, activation, fast)))
    if not fast:
        np.testing.assert_array_equal(grad, np.asarray(apply_activation_grad(zj, activation)))


# ---- gradients through the front vs the reference ------------------------------------------------
CASES = [  # (widths, activation, bias, dtype, lead): each axis once, odd sizes throughout
    ((19, 45, 23), "gelu", True, "float32", (21,)),
    ((19, 70, 23), "swiglu", True, "bfloat16", (3, 7)),  # 3-D input
    ((19, 45, 33, 13), "geglu_tanh", False, "float16", (21,)),  # 3 layers: gated, gated, plain
    ((19, 45, 33, 13), "relu", True, "bfloat16", (21,)),
    ((17, 33, 9), "silu", False, "float16", (1,)),  # M = 1
    ((19, 70, 23), "geglu", True, "float32", (21,)),
    ((13, 29, 7), "gelu_tanh", True, "bfloat16", (25,)),
]


def _case_id(case) -> str:
    widths, activation, bias, dtype, lead = case
    return f"{'x'.join(map(str, widths))}-{activation}-{'bias' if bias else 'nobias'}-{dtype}-" + (
        "x".join(map(str, lead))
    )


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_gradients_match_the_reference(case) -> None:
    widths, activation, bias, dtype, lead = case
    spec = MLPSpec(widths, activation, bias, dtype)
    x, params, dy = _inputs(spec, lead, zlib.crc32(_case_id(case).encode()) % 1000)
    jit = activation == "gelu_tanh"  # value_and_grad eagerly, and once under jax.jit
    y, grads = _grads(spec, x, params, dy, jit=jit)
    _check(spec, x, params, dy, grads, what=f"pallas_triton {spec}")
    for name, g in grads.items():  # in the caller's shapes and dtypes
        want = x if name == "x" else params[name]
        assert g.shape == want.shape and g.dtype == jnp.dtype(spec.dtype), (name, g.shape, g.dtype)
    if len(lead) == 2:  # the differentiated forward's value is the inference forward's, bit for
        # bit (the same kernels; once: it compiles the inference forward too)
        jp = {k: jnp.asarray(v) for k, v in params.items()}
        y_inference = jax_impl.mlp(jnp.asarray(x), jp, spec, impl="pallas_triton")
        np.testing.assert_array_equal(_f64(y), _f64(y_inference))


def test_packed_params_get_packed_gradients() -> None:
    """Params passed packed get their gradients packed (dwv, dbc), padded columns exactly 0, and
    equal bit for bit to the unpacked params' gradients."""
    spec = MLPSpec((19, 70, 23), "swiglu", True, "bfloat16")
    x, params, dy = _inputs(spec, (21,), 5)
    _, plain = _grads(spec, x, params, dy)
    _, packed = _grads(spec, x, params, dy, packed=True)
    assert set(packed) == {"x", "wv0", "bc0", "w1", "b1"}
    for name, n in (("wv0", 70), ("bc0", 70)):
        g = np.asarray(packed[name].astype(F32))
        w, v = unpack_gated(g, n)
        np.testing.assert_array_equal(w, _f64(plain["w0" if name == "wv0" else "b0"]))
        np.testing.assert_array_equal(v, _f64(plain["v0" if name == "wv0" else "c0"]))
        blocks = g.reshape(*g.shape[:-1], -1, 2, 64)  # (gate, up) block pairs; pad past n = 70
        assert not blocks[..., -1, :, n - 64 :].any(), f"{name}: padded columns not zero"
    np.testing.assert_array_equal(_f64(packed["x"]), _f64(plain["x"]))


# ---- every implementation trains, both policies, bit for bit -------------------------------------
TRAIN_SPEC = MLPSpec((32, 64, 32), "swiglu", True, "bfloat16")  # Mosaic GPU takes it (16-wide K, N)


@pytest.mark.parametrize("impl", [*impl_names("jax"), "auto"])
def test_every_implementation_trains(impl: str) -> None:
    """Every JAX implementation differentiates: the baseline through jax itself, the others
    through the custom_vjp and the portable backward, so the gradients of both `saved` policies
    are the same bits whatever implementation ran the forward."""
    if jax_impl.unavailable_reason(impl, "cpu") is not None:
        pytest.skip(jax_impl.unavailable_reason(impl, "cpu"))  # GPU-only: test_front's rule
    spec = TRAIN_SPEC
    x, params, dy = _inputs(spec, (24,), 11)
    _, preact = _grads(spec, x, params, dy, impl=impl, saved="preact")
    _check(spec, x, params, dy, preact, what=f"{impl} {spec}")
    if impl == "xla":
        return
    _, inputs = _grads(spec, x, params, dy, impl=impl, saved="inputs")
    _, portable = _grads(spec, x, params, dy)  # pallas_triton, "preact": cached after the first
    for name in preact:
        np.testing.assert_array_equal(_f64(preact[name]), _f64(inputs[name]), err_msg=name)
        np.testing.assert_array_equal(_f64(preact[name]), _f64(portable[name]), err_msg=name)


@pytest.mark.parametrize("saved", SAVED_POLICIES)
def test_plan_reports_the_policy_and_its_bytes(saved: str) -> None:
    spec = MLPSpec((19, 45, 33, 13), "geglu_tanh", False, "float16")
    the_plan = jax_impl.plan(spec, (3, 7, 19), impl="pallas_triton", saved=saved)
    mib = saved_bytes(spec, 21, saved) / 2**20
    assert f"training: saved={saved!r} keeps {mib:.1f} MiB" in the_plan.reason
    assert "saved=" not in jax_impl.plan(spec, (3, 7, 19), impl="pallas_triton").reason
    assert "jax autodiff" in jax_impl.plan(spec, (3, 7, 19), impl="xla", saved=saved).reason


@pytest.mark.parametrize("saved", ["foo", None, 1])
def test_bad_saved_is_refused_by_name(saved) -> None:
    spec = TRAIN_SPEC
    x, params, _ = _inputs(spec, (4,), 1)
    message = f"saved: expected one of {SAVED_POLICIES}, got {saved!r}"
    with pytest.raises(ValueError) as info:
        jax_impl.mlp(jnp.asarray(x), params, spec, impl="pallas_triton", saved=saved)
    assert str(info.value) == message
    if saved is not None:  # plan(saved=None): the inference plan
        with pytest.raises(ValueError, match="saved: expected one of"):
            jax_impl.plan(spec, (4, 32), saved=saved)


# ---- vmap, residual, NaN -------------------------------------------------------------------------
def test_vmap_over_a_leading_batch_axis() -> None:
    """vmap of mlp equals the 3-D call bit for bit; grad through vmap, and vmap of grad (one
    gradient per batch element), match the reference."""
    spec = MLPSpec((19, 70, 23), "swiglu", True, "bfloat16")
    x, params, dy = _inputs(spec, (3, 7), 21)
    jp = {k: jnp.asarray(v) for k, v in params.items()}
    xj = jnp.asarray(x)

    def one(xb, p):
        return jax_impl.mlp(xb, p, spec, impl="pallas_triton")

    y_vmap = jax.vmap(one, in_axes=(0, None))(xj, jp)
    np.testing.assert_array_equal(_f64(y_vmap), _f64(one(xj, jp)))

    def loss(xb, p):
        return jnp.sum(jax.vmap(one, in_axes=(0, None))(xb, p).astype(F32) * dy.astype(F32))

    dx, dp = jax.grad(loss, argnums=(0, 1))(xj, jp)  # eager: vmap of grad reuses its kernels
    _check(spec, x, params, dy, {"x": dx, **dp}, what="grad of vmap")

    def loss_one(xb, p, dyb):
        return jnp.sum(one(xb, p).astype(F32) * dyb.astype(F32))

    per_dx, per_dp = jax.vmap(jax.grad(loss_one, argnums=(0, 1)), in_axes=(0, None, 0))(xj, jp, dy)
    for b in range(3):
        ref = _reference(spec, x[b], params, dy[b])
        got = {"x": per_dx[b], **{k: v[b] for k, v in per_dp.items()}}
        assert_grads_close({k: _f64(v) for k, v in got.items()}, ref, spec, what=f"vmap[{b}]")


def test_residual_gradient_is_dy() -> None:
    spec = MLPSpec((19, 45, 23), "gelu", True, "float32")
    x, params, dy = _inputs(spec, (21,), 31)
    r = jnp.asarray(make_input(spec.replace(widths=(23, 23)), (21,), 32))
    jp = {k: jnp.asarray(v) for k, v in params.items()}

    def loss(x, p, r):
        y = jax_impl.mlp(x, p, spec, impl="pallas_triton", residual=r)
        return jnp.sum(y * dy)

    dx, dp, dr = jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(x), jp, r)
    np.testing.assert_array_equal(np.asarray(dr), np.asarray(dy))
    _check(spec, x, params, dy, {"x": dx, **dp}, what="with residual")


@pytest.mark.parametrize("spec", [CASES[2][:4], CASES[3][:4]], ids=["gated", "relu"])
def test_nan_propagates(spec) -> None:
    """A NaN in one row of x: NaN wherever the reference has it (dx's row, every dW/db element
    that sums over that row), finite everywhere else."""
    spec = MLPSpec(*spec)
    x, params, dy = _inputs(spec, (21,), 41)
    x[5, 3] = np.nan
    _, grads = _grads(spec, x, params, dy)
    ref = _reference(spec, x, params, dy)
    assert np.isnan(ref["x"][5]).all() and np.isfinite(np.delete(ref["x"], 5, axis=0)).all()
    assert_grads_close({k: _f64(v) for k, v in grads.items()}, ref, spec, what="NaN row")


# ---- the kernels directly ------------------------------------------------------------------------
SMALL = TileConfig(block_m=16, block_n=32, block_k=16, group_m=2, num_warps=4, num_stages=1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gated_epilogues_write_packed_zeros_past_n(dtype: str) -> None:
    """dgrad "dact_gated" and dact "dact_gated" at N = 45 (one block pair, 19 padded columns per
    half): the packed [dz|dg] against float64, padded columns exactly 0 even in a NaN row."""
    rng = np.random.default_rng(7)
    m, k, n = 21, 37, 45
    width = packed_width(n)
    a, w = rand(rng, (m, k), dtype), rand(rng, (n, k), dtype, 0.2)
    z, g = rand(rng, (m, n), dtype), rand(rng, (m, n), dtype)
    zg = pack_gated(jnp.asarray(z), jnp.asarray(g))  # the saved [z|g], packed as the forward's
    a[4, 0] = np.nan
    dout = _f64(a) @ _f64(w).T
    cdf = reference.activation("gelu", _f64(z))
    want_dz = dout * _f64(g) * reference.activation_grad("gelu", _f64(z))
    want_dg = dout * cdf
    got = backward.dgrad_fwd(
        jnp.asarray(a), jnp.asarray(w), zg, epilogue="dact_gated", activation="gelu", config=SMALL
    )
    dy = rand(rng, (m, n), dtype)
    got_dact = backward.dact_fwd(jnp.asarray(dy), zg, activation="gelu", gated=True, config=SMALL)
    want_dact = _f64(dy) * _f64(g) * reference.activation_grad("gelu", _f64(z)), _f64(dy) * cdf
    for out, (dz, dg) in ((got, (want_dz, want_dg)), (got_dact, want_dact)):
        assert out.shape == (m, width)
        blocks = _f64(out).reshape(m, -1, 2, 64)
        assert (blocks[:, -1, :, n - 64 :] == 0).all(), "padded columns not exactly zero"
        got_dz, got_dg = unpack_gated(_f64(out), n)
        spec = MLPSpec((2, 2), "relu", True, dtype)
        assert_grads_close({"dz": got_dz, "dg": got_dg}, {"dz": dz, "dg": dg}, spec)


@pytest.mark.parametrize("bias", [True, False])
def test_wgrad_reduces_over_every_row(bias: bool) -> None:
    """dw = aᵀ·dz over M = 37 (three BLOCK_M steps, a ragged tail), K = 29, N = 70 (several tiles,
    ragged), db only from the first K-block's programs: every element written once."""
    rng = np.random.default_rng(8)
    a, dz = rand(rng, (37, 29), "float16"), rand(rng, (37, 70), "float16")
    dw, db = backward.wgrad_fwd(jnp.asarray(a), jnp.asarray(dz), has_bias=bias, config=SMALL)
    got = {"w": _f64(dw)} | ({"b": _f64(db)} if bias else {})
    want = {"w": _f64(a).T @ _f64(dz)} | ({"b": _f64(dz).sum(axis=0)} if bias else {})
    assert dw.dtype == jnp.float16 and (db is None or db.dtype == jnp.float16)
    assert_grads_close(got, want, MLPSpec((2, 2), "relu", True, "float16"))


# ---- the weight gradient split over M (issue 25) ------------------------------------------------
# M = 37 rows are 3 steps of 16 (a ragged tail), K = 29 and N = 70 are 2 × 3 ragged tiles of SMALL:
# S = 2 deals the steps 2 + 1, S = 3 one each; under the interpreter the heuristic keeps S = 1.
@pytest.mark.parametrize(
    ("dtype", "bias", "splits"),
    [("float32", False, 2), ("float16", True, 3), ("bfloat16", True, 2), ("bfloat16", False, 3)],
)
@pytest.mark.jax_matrix
def test_wgrad_split_against_float64(dtype: str, bias: bool, splits: int) -> None:
    rng = np.random.default_rng(9)
    a, dz = rand(rng, (37, 29), dtype), rand(rng, (37, 70), dtype)
    run = functools.partial(
        backward.wgrad_fwd, jnp.asarray(a), jnp.asarray(dz), has_bias=bias, config=SMALL,
        splits=splits,
    )  # fmt: skip
    dw, db = run()
    got = {"w": _f64(dw)} | ({"b": _f64(db)} if bias else {})
    want = {"w": _f64(a).T @ _f64(dz)} | ({"b": _f64(dz).sum(axis=0)} if bias else {})
    assert dw.dtype == jnp.dtype(dtype) and (db is None or db.dtype == jnp.dtype(dtype))
    assert_grads_close(got, want, MLPSpec((2, 2), "relu", True, dtype))
    # deterministic: the same bits on a second run (jax.jit's cache off: traced again)
    with jax.disable_jit():
        dw2, db2 = run()
    np.testing.assert_array_equal(_f64(dw2), _f64(dw))
    if bias:
        np.testing.assert_array_equal(_f64(db2), _f64(db))


def test_wgrad_split_propagates_nan() -> None:
    """One NaN in dz (row 5, column 7): dw's column 7 and db[7] are NaN, every other element
    finite, through the partials of the split holding row 5 and the fixed-order sum."""
    rng = np.random.default_rng(10)
    a, dz = rand(rng, (37, 29), "bfloat16"), rand(rng, (37, 70), "bfloat16")
    dz[5, 7] = np.nan
    dw, db = backward.wgrad_fwd(
        jnp.asarray(a), jnp.asarray(dz), has_bias=True, config=SMALL, splits=3
    )
    got = {"w": _f64(dw), "b": _f64(db)}
    want = {"w": _f64(a).T @ _f64(dz), "b": _f64(dz).sum(axis=0)}
    assert_grads_close(got, want, MLPSpec((2, 2), "relu", True, "bfloat16"))
    assert np.isnan(got["w"][:, 7]).all() and np.isnan(got["b"][7])
    assert np.isfinite(np.delete(got["w"], 7, axis=1)).all()
    assert np.isfinite(np.delete(got["b"], 7)).all()


# ---- the kernels lower for CUDA (no GPU needed) --------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_backward_kernels_lower_for_cuda(dtype: str) -> None:
    needs_jax_0_10_lowering()
    S, dt = jax.ShapeDtypeStruct, jnp.dtype(dtype)
    m, k, n = 300, 200, 136  # ragged against every block, large enough for the GPU default tiles
    width = packed_width(n)
    cfg = heuristic_config("linear_act", m, n, k, dtype)
    cfg_gated = heuristic_config("gated", m, n, k, dtype)
    precision = "tf32" if dtype == "float32" else "ieee"
    for activation in KERNEL_ACTIVATIONS:
        kw = dict(activation=activation, fp32_precision=precision, interpret=False)
        dgrad = functools.partial(backward.dgrad_fwd, **kw)
        lower_for_cuda(functools.partial(dgrad, epilogue="dact", config=cfg),
                       S((m, k), dt), S((n, k), dt), S((m, n), dt))  # fmt: skip
        lower_for_cuda(functools.partial(dgrad, epilogue="dact_gated", config=cfg_gated),
                       S((m, k), dt), S((n, k), dt), S((m, width), dt))  # fmt: skip
        del kw["fp32_precision"]
        dact = functools.partial(backward.dact_fwd, **kw)
        lower_for_cuda(functools.partial(dact, gated=False, config=cfg),
                       S((m, n), dt), S((m, n), dt))  # fmt: skip
        lower_for_cuda(functools.partial(dact, gated=True, config=cfg_gated),
                       S((m, n), dt), S((m, width), dt))  # fmt: skip
    none = functools.partial(
        backward.dgrad_fwd, z=None, epilogue="none", activation="identity", config=cfg,
        fp32_precision=precision, interpret=False,
    )  # fmt: skip
    assert "triton" in lower_for_cuda(none, S((m, k), dt), S((n, k), dt)).lower()
    for bias in (True, False):
        wgrad = functools.partial(
            backward.wgrad_fwd, has_bias=bias, dtype=dt, fp32_precision=precision,
            config=heuristic_config("linear_act", k, n, m, dtype), interpret=False,
        )  # fmt: skip
        lower_for_cuda(wgrad, S((m, k), dt), S((m, n), dt))
        # the split over M (S > 1: the partials and the fixed-order sum, a second pallas_call)
        text = lower_for_cuda(functools.partial(wgrad, splits=3), S((m, k), dt), S((m, n), dt))
        assert "wgrad_sum" in text
    # The saving forward kernels (STORE_PREACT).
    from fusedmlp.jax_impl import gated, linear_act

    lower_for_cuda(
        functools.partial(linear_act.linear_act_fwd, activation="gelu", config=cfg,
                          fp32_precision=precision, interpret=False, store_preact=True),
        S((m, k), dt), S((k, n), dt), S((n,), dt), None,
    )  # fmt: skip
    lower_for_cuda(
        functools.partial(gated.gated_fwd, n=n, activation="silu", config=cfg_gated,
                          fp32_precision=precision, interpret=False, store_preact=True),
        S((m, k), dt), S((k, width), dt), S((width,), dt),
    )  # fmt: skip


# ---- the twins, bit for bit (where both stacks are installed and merged) -------------------------
@pytest.mark.parametrize(
    "spec",
    [
        MLPSpec((19, 70, 33, 13), "swiglu", True, "bfloat16"),
        MLPSpec((19, 45, 33, 13), "relu", True, "float16"),
    ],
    ids=["swiglu-bf16", "relu-fp16"],
)
def test_backward_twins_bitwise(spec: MLPSpec) -> None:
    """torch_impl/backward.py and jax_impl/backward.py on the same packed params, input, dy and
    pinned config: the saving forward and every gradient bit for bit under the interpreters (the
    exp of silu is the interpreters' one known difference; bfloat16 rounds it away at these
    seeds, and relu has none)."""
    pytest.importorskip("torch", reason="the jax-only CI job has no torch")
    from fusedmlp.bench.cases import to_numpy
    from fusedmlp.common.packing import pack_params as pack_numpy
    from fusedmlp.torch_impl import backward as torch_backward
    from fusedmlp.torch_impl.runtime import INTERPRET
    from helpers import to_torch

    if not INTERPRET:
        pytest.skip("twins are compared under the interpreters")
    packed = pack_numpy(spec, init_params(spec, 3))
    x = make_input(spec, 21, 4)
    dy = rand(np.random.default_rng(5), (21, spec.d_out), spec.dtype)
    y_j, kept_j = backward.forward_saving(
        jnp.asarray(x), {k: jnp.asarray(v) for k, v in packed.items()}, spec, saved="preact",
        config=SMALL,
    )  # fmt: skip
    g_j = backward.mlp_backward(
        jnp.asarray(dy), kept_j, {k: jnp.asarray(v) for k, v in packed.items()}, spec,
        saved="preact", config=SMALL,
    )  # fmt: skip
    tp = {k: to_torch(v) for k, v in packed.items()}
    y_t, kept_t = torch_backward.forward_saving(to_torch(x), tp, spec, saved="preact", config=SMALL)
    g_t = torch_backward.mlp_backward(to_torch(dy), kept_t, tp, spec, saved="preact", config=SMALL)
    np.testing.assert_array_equal(to_numpy(y_j), to_numpy(y_t))
    for name in g_j:
        np.testing.assert_array_equal(to_numpy(g_j[name]), to_numpy(g_t[name]), err_msg=name)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_wgrad_split_twins_bitwise(dtype: str) -> None:
    """torch_impl and jax_impl `wgrad_fwd` with S = 1, 2, 3 on the same inputs: the same bits
    under the interpreters (the partials and their fixed-order sum included), bias and none."""
    pytest.importorskip("torch", reason="the jax-only CI job has no torch")
    from fusedmlp.bench.cases import to_numpy
    from fusedmlp.torch_impl import backward as torch_backward
    from fusedmlp.torch_impl.runtime import INTERPRET
    from helpers import to_torch

    if not INTERPRET:
        pytest.skip("twins are compared under the interpreters")
    rng = np.random.default_rng(11)
    a, dz = rand(rng, (37, 29), dtype), rand(rng, (37, 70), dtype)
    for splits, bias in ((1, True), (2, False), (3, True)):
        j = backward.wgrad_fwd(
            jnp.asarray(a), jnp.asarray(dz), has_bias=bias, config=SMALL, splits=splits
        )
        t = torch_backward.wgrad_fwd(
            to_torch(a), to_torch(dz), has_bias=bias, config=SMALL, splits=splits
        )
        for name, x, y in zip(("w", "b"), j, t, strict=True):
            if x is None:
                assert y is None
                continue
            np.testing.assert_array_equal(to_numpy(x), to_numpy(y), err_msg=f"S={splits} d{name}")


def test_backward_twins_bitwise_split(monkeypatch) -> None:
    """The whole backward of both stacks with the heuristic's split forced on (one step per
    split at least: M = 21 is 2 steps, so every weight gradient runs S = 2): bit for bit."""
    pytest.importorskip("torch", reason="the jax-only CI job has no torch")
    from fusedmlp.common import tiling

    monkeypatch.setattr(tiling, "WGRAD_MIN_STEPS", 1)
    assert tiling.wgrad_splits(6, 21, SMALL.block_k) == (2, 1)
    test_backward_twins_bitwise(MLPSpec((19, 45, 33, 13), "relu", True, "float16"))
