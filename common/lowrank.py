"""Low-rank factorisation of an MLP's weights (NumPy, float64) and its float64 reference.

A layer's weight `W [K, N]` (`x @ W`) is replaced by `U [K, r] · Vt [r, N]`; the layer computes
`act((x·U)·Vt + b)`, with K·r + r·N parameters instead of K·N (fewer when r < K·N / (K + N)).

Two ways to choose U and Vt:

- **plain** truncated SVD, `W = A Σ Bᵀ`: keep the r largest singular values. By Eckart–Young this is
  the best rank-r approximation in the Frobenius (and spectral) norm: ‖W − U·Vt‖_F² = Σ_{i>r} σ_i².
  It treats every input direction alike.
- **activation-aware** (whitened) SVD: what matters is the layer's OUTPUT error on its real inputs,
  ‖X·W − X·U·Vt‖_F over calibration rows X [n, K]. With the input covariance C = XᵀX / n = S·Sᵀ,
  ‖XΔ‖_F² / n = tr(Δᵀ C Δ) = ‖SᵀΔ‖_F², so the best rank-r choice is the truncated SVD of SᵀW
  (= A Σ Bᵀ) mapped back: U = S⁻ᵀ A_r √Σ_r, Vt = √Σ_r B_rᵀ; the output error on the calibration
  inputs is then exactly Σ_{i>r} σ_i(SᵀW)² · n (the test checks it). Directions the inputs rarely
  visit are cut first. (The idea of SVD-LLM and ASVD; written here from the formula above.)

  Any S with S·Sᵀ = C serves; the code takes Sᵀ = Lᵀ from the Cholesky factorisation (`whitening`).
  Real inputs give a singular C (fewer calibration rows than K, a feature that is constant or a
  copy of another), on which Cholesky fails and S⁻¹ does not exist, so the covariance is
  regularised by a ridge, C + δ·I with δ = `damp` · tr(C) / K (the mean input variance times
  `damp`, default 1e-2): C + δI is positive definite and the condition number of S is at most
  √(1 + K·λ_max / (damp · tr C)). The ridge mixes a little of the plain objective in
  (‖XΔ‖² + n·δ‖Δ‖²), so directions the calibration never saw are not cut for free: they may carry
  signal on other inputs (the accuracy study, bench/compress.py, calibrates on one text and
  evaluates on another).

Both split √Σ evenly between the factors, so U and Vt have like magnitudes (a 16-bit format's
range is shared, neither factor carries all of ‖W‖).

Rank by count (`rank=r`, 1 ≤ r ≤ min(K, N)) or by kept energy (`energy=e` in (0, 1]: the smallest
r whose Σ_{i≤r} σ_i² reaches e·Σ σ_i², in the spectrum being truncated: W's, or SᵀW's when
whitened).

Params of a factorised MLP: `u{i}` [d_in, r_i] and `vt{i}` [r_i, d_out] in place of `w{i}`
(`vt`, the right factor, so as not to be read as a gated layer's `v{i}`); biases `b{i}` unchanged.
`ranks` records each layer's rank. A gated layer's up matrix V (`v{i}`) → `uv{i}` [d_in, r_i],
`vtv{i}` [r_i, d_out] at the same rank as its gate (`u{i}`, `vt{i}`), bias `c{i}` unchanged.

The reference, `forward` / `layer`: float64 on the arrays as stored. The kernels
(torch_impl/lowrank.py, jax_impl/lowrank.py) round the [M, r] intermediate t = x·U once to the
dtype before the second product (the tensor cores take 16-bit operands), so `round_intermediate=
dtype` puts the same rounding point in the reference: that is the kernels' parity target; without
it the reference is the exact factorised layer, which the kernels meet within the tolerance policy.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from . import reference
from .dtypes import round_to
from .spec import MLPSpec

DEFAULT_DAMP = 1e-2
METHODS = ("plain", "activation")


# ---- arguments -----------------------------------------------------------------------------------
def _check_rank_energy(rank: object, energy: object, k: int, n: int) -> None:
    """ValueError/TypeError naming `rank` or `energy`, the expected and the actual value."""
    if (rank is None) == (energy is None):
        raise ValueError(
            f"rank, energy: expected exactly one of them, got rank={rank!r}, energy={energy!r}"
        )
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
            raise TypeError(f"rank: expected an int, got {type(rank).__name__}")
        if not 1 <= rank <= min(k, n):
            raise ValueError(
                f"rank: expected an int in [1, {min(k, n)}] (min(K, N) of a [{k}, {n}] weight), "
                f"got {rank}"
            )
    else:
        if isinstance(energy, bool) or not isinstance(energy, numbers.Real):
            raise TypeError(f"energy: expected a float in (0, 1], got {type(energy).__name__}")
        if not 0.0 < float(energy) <= 1.0:
            raise ValueError(f"energy: expected a float in (0, 1], got {energy!r}")


def _check_weight(w: object, name: str = "w") -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2 or 0 in w.shape:
        raise ValueError(
            f"{name}: expected a non-empty 2-D [K, N] array, got shape {list(w.shape)}"
        )
    return w.astype(np.float64)


# ---- one weight ----------------------------------------------------------------------------------
def rank_for_energy(singular_values: np.ndarray, energy: float) -> int:
    """The smallest r with Σ_{i<r} σ_i² ≥ energy · Σ σ_i² (σ in descending order)."""
    s2 = np.asarray(singular_values, dtype=np.float64) ** 2
    total = s2.sum()
    if total == 0.0:
        return 1
    kept = np.cumsum(s2) / total
    # a relative slack of a few ulps: energy=1.0 must give r at most the numerical rank + trailing
    # zeros, and cumsum's rounding may leave the last value at 1 - 1e-16
    return int(min(np.searchsorted(kept, energy - 1e-12) + 1, len(s2)))


def _split(a: np.ndarray, s: np.ndarray, bt: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    root = np.sqrt(s[:r])
    return a[:, :r] * root[None, :], root[:, None] * bt[:r, :]


@dataclass(frozen=True)
class SVDParts:
    """A full factorisation `w = left · diag(s) · bt` to truncate at any rank (`truncate`): for the
    plain SVD `left` = A; whitened, `left` = T⁻¹A with T·w = A Σ Bᵀ. One SVD serves every rank
    of a sweep."""

    left: np.ndarray  # [K, q]
    s: np.ndarray  # [q], descending (whitened: the spectrum of T·w, `whitening`)
    bt: np.ndarray  # [q, N]

    def truncate(
        self, *, rank: int | None = None, energy: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(U [K, r], Vt [r, N]) at a rank, or at the smallest rank keeping `energy`."""
        k, n = self.left.shape[0], self.bt.shape[1]
        _check_rank_energy(rank, energy, k, n)
        r = rank if rank is not None else rank_for_energy(self.s, energy)
        return _split(self.left, self.s, self.bt, r)


def svd_parts(
    w: np.ndarray,
    cov: np.ndarray | None = None,
    *,
    damp: float = DEFAULT_DAMP,
    whiten: np.ndarray | None = None,
) -> SVDParts:
    """The full SVD of w [K, N] (cov None), or of T·w for inputs of covariance cov [K, K].
    `whiten`: T itself (`whitening(cov, damp)`, computed once for several weights that share an
    input, as a gated layer's W and V do), in place of `cov`."""
    w = _check_weight(w)
    k = w.shape[0]
    if cov is None and whiten is None:
        a, s, bt = np.linalg.svd(w, full_matrices=False)
        return SVDParts(a, s, bt)
    if whiten is not None:
        t = np.asarray(whiten, dtype=np.float64)
        if t.shape != (k, k):
            raise ValueError(f"whiten: expected shape [{k}, {k}], got {list(t.shape)}")
    else:
        if np.shape(cov) != (k, k):
            raise ValueError(f"cov: expected shape [{k}, {k}], got {list(np.shape(cov))}")
        t = whitening(cov, damp)
    a, s, bt = np.linalg.svd(t @ w, full_matrices=False)
    # T⁻¹·A by a solve (one LU), not an explicit inverse (3× the work at K = 1536)
    return SVDParts(np.linalg.solve(t, a), s, bt)


def svd_factor(
    w: np.ndarray, *, rank: int | None = None, energy: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Plain truncated SVD of w [K, N]: (U [K, r], Vt [r, N]) in float64, U·Vt the best rank-r
    approximation of w in the Frobenius norm."""
    w = _check_weight(w)
    _check_rank_energy(rank, energy, *w.shape)
    return svd_parts(w).truncate(rank=rank, energy=energy)


def input_covariance(x: np.ndarray) -> np.ndarray:
    """C = XᵀX / n of calibration rows x [..., K] in float64 (second moment, not centred: the
    layer sees x itself, mean included, and the output error ‖XΔ‖ is what is minimised)."""
    x2d = np.asarray(x, dtype=np.float64).reshape(-1, np.shape(x)[-1])
    if x2d.shape[0] == 0:
        raise ValueError(f"calibration: expected at least one row, got shape {list(np.shape(x))}")
    return x2d.T @ x2d / x2d.shape[0]


def whitening(cov: np.ndarray, damp: float = DEFAULT_DAMP) -> np.ndarray:
    """T with TᵀT = cov + δ·I, δ = damp · tr(cov) / K, so ‖X·Δ‖_F² / n ≈ ‖T·Δ‖_F².

    T = Lᵀ from the Cholesky factorisation (cov + δI = L·Lᵀ): ~10× cheaper than an eigen-
    decomposition (1536²: 0.05 s vs 0.5 s unloaded). Should rounding still defeat Cholesky (a
    tiny `damp` on a nearly singular cov), the symmetric square root from `eigh` is used, with
    the eigenvalues that rounding left negative clipped to zero before the lift."""
    cov = np.asarray(cov, dtype=np.float64)
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"cov: expected a square [K, K] array, got shape {list(cov.shape)}")
    if not damp > 0.0:
        raise ValueError(f"damp: expected a float > 0, got {damp!r}")
    k = cov.shape[0]
    sym = 0.5 * (cov + cov.T)
    delta = damp * max(float(np.trace(sym)) / k, np.finfo(np.float64).tiny)
    try:
        return np.linalg.cholesky(sym + delta * np.eye(k)).T
    except np.linalg.LinAlgError:
        lam, q = np.linalg.eigh(sym)
        return (q * np.sqrt(np.maximum(lam, 0.0) + delta)) @ q.T


def whitened_svd_factor(
    w: np.ndarray,
    cov: np.ndarray,
    *,
    rank: int | None = None,
    energy: float | None = None,
    damp: float = DEFAULT_DAMP,
) -> tuple[np.ndarray, np.ndarray]:
    """Activation-aware truncated SVD of w [K, N] for inputs of covariance cov [K, K]:
    (U [K, r], Vt [r, N]) minimising ‖X·(w − U·Vt)‖_F for the (regularised) covariance."""
    w = _check_weight(w)
    _check_rank_energy(rank, energy, *w.shape)
    return svd_parts(w, cov, damp=damp).truncate(rank=rank, energy=energy)


# ---- a whole MLP ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Factorised:
    """A factorised MLP: params `u{i}`, `vt{i}`, `b{i}` (float64) and each layer's rank."""

    spec: MLPSpec
    params: dict[str, np.ndarray]
    ranks: tuple[int, ...]
    method: str

    def param_count(self) -> int:
        return int(sum(a.size for a in self.params.values()))


def dense_param_count(spec: MLPSpec) -> int:
    return sum(l.d_in * l.d_out + (l.d_out if l.bias else 0) for l in spec.layers())


def _per_layer(value: object, spec: MLPSpec, name: str) -> list:
    if value is None or not isinstance(value, (list, tuple)):
        return [value] * spec.num_layers
    if len(value) != spec.num_layers:
        raise ValueError(
            f"{name}: expected one value per layer ({spec.num_layers}), got {len(value)}"
        )
    return list(value)


def factorise_mlp(
    spec: MLPSpec,
    params: Mapping[str, np.ndarray],
    *,
    rank: int | tuple[int, ...] | None = None,
    energy: float | tuple[float, ...] | None = None,
    calibration: np.ndarray | None = None,
    damp: float = DEFAULT_DAMP,
) -> Factorised:
    """Factorise every layer of an MLP: `rank` or `energy`, one value or one per layer. With
    `calibration` (inputs x [..., d_in]) each layer is factorised activation-aware on its own
    inputs, measured by running the UNCOMPRESSED float64 reference on the calibration rows (each
    layer is fitted to the inputs the original model gives it, so the layers are independent and
    can be compressed at different ranks without refitting); without it, plain SVD.

    A gated layer (act(x·W + b) ⊙ (x·V + c)): W → `u{i}`, `vt{i}` and V → `uv{i}`, `vtv{i}`, both
    at the layer's one rank (the kernels take one r); W and V read the same input, so one
    whitening T serves both. By energy, the rank is the larger of the two matrices' energy ranks
    (both keep at least `energy`)."""
    if not isinstance(spec, MLPSpec):
        raise TypeError(f"spec: expected a fusedmlp.common.MLPSpec, got {type(spec).__name__}")
    ranks_in = _per_layer(rank, spec, "rank")
    energies = _per_layer(energy, spec, "energy")
    inputs: list[np.ndarray] = []
    if calibration is not None:
        h = np.asarray(calibration, dtype=np.float64)
        if h.ndim < 1 or h.shape[-1] != spec.d_in:
            raise ValueError(
                f"calibration: expected shape [..., {spec.d_in}], got {list(np.shape(h))}"
            )
        h = h.reshape(-1, spec.d_in)
        for layer in spec.layers():
            i = layer.index
            inputs.append(h)
            z = h @ np.asarray(params[f"w{i}"], dtype=np.float64)
            if layer.bias:
                z = z + np.asarray(params[f"b{i}"], dtype=np.float64)
            out_h = reference.activation(layer.activation, z)
            if layer.gated:
                g = h @ np.asarray(params[f"v{i}"], dtype=np.float64)
                if layer.bias:
                    g = g + np.asarray(params[f"c{i}"], dtype=np.float64)
                out_h = out_h * g
            h = out_h
    out: dict[str, np.ndarray] = {}
    ranks = []
    for layer in spec.layers():
        i = layer.index
        # (weight, left name, right name): the gate (or only) matrix, then a gated layer's up
        mats = [("w", "u", "vt")] + ([("v", "uv", "vtv")] if layer.gated else [])
        _check_rank_energy(ranks_in[i], energies[i], layer.d_in, layer.d_out)
        whiten = None
        if calibration is not None:
            whiten = whitening(input_covariance(inputs[i]), damp)
        parts = [svd_parts(params[f"{w}{i}"], whiten=whiten) for w, _, _ in mats]
        r = ranks_in[i]
        if r is None:
            r = max(rank_for_energy(p.s, energies[i]) for p in parts)
        for (_, left, right), p in zip(mats, parts, strict=True):
            out[f"{left}{i}"], out[f"{right}{i}"] = p.truncate(rank=r)
        if layer.bias:
            out[f"b{i}"] = np.asarray(params[f"b{i}"], dtype=np.float64)
            if layer.gated:
                out[f"c{i}"] = np.asarray(params[f"c{i}"], dtype=np.float64)
        ranks.append(int(r))
    method = "plain" if calibration is None else "activation"
    return Factorised(spec, out, tuple(ranks), method)


def factorised_shapes(spec: MLPSpec, ranks: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a factorised MLP's params, in layer order: u, vt, [uv, vtv,] b, [c]."""
    shapes: dict[str, tuple[int, ...]] = {}
    for layer, r in zip(spec.layers(), ranks, strict=True):
        i = layer.index
        shapes[f"u{i}"] = (layer.d_in, r)
        shapes[f"vt{i}"] = (r, layer.d_out)
        if layer.gated:
            shapes[f"uv{i}"] = (layer.d_in, r)
            shapes[f"vtv{i}"] = (r, layer.d_out)
        if layer.bias:
            shapes[f"b{i}"] = (layer.d_out,)
            if layer.gated:
                shapes[f"c{i}"] = (layer.d_out,)
    return shapes


# ---- the float64 reference -----------------------------------------------------------------------
def layer(
    x: np.ndarray,
    u: np.ndarray,
    vt: np.ndarray,
    b: np.ndarray | None,
    activation: str,
    *,
    round_intermediate: str | None = None,
) -> np.ndarray:
    """act((x·U)·Vt + b) in float64 on the arrays as stored; `round_intermediate` (a dtype name)
    rounds t = x·U to that dtype before the second product, the kernels' rounding point."""
    f64 = np.float64
    t = reference.matmul(np.asarray(x, dtype=f64), np.asarray(u, dtype=f64))
    if round_intermediate is not None:
        t = round_to(t, round_intermediate).astype(f64)
    z = reference.matmul(t, np.asarray(vt, dtype=f64))
    if b is not None:
        z = z + np.asarray(b, dtype=f64)
    return reference.activation(activation, z)


def forward(
    fact: Factorised,
    x: np.ndarray,
    *,
    round_intermediate: str | None = None,
    round_hidden: bool = False,
) -> np.ndarray:
    """y of the factorised MLP in float64, shape [..., d_out]; `round_hidden` rounds each hidden
    layer and y to the spec's dtype (as per-layer kernels store them)."""
    spec = fact.spec
    if np.ndim(x) < 1 or np.shape(x)[-1] != spec.d_in:
        raise ValueError(f"x: expected shape [..., {spec.d_in}], got {list(np.shape(x))}")
    h = np.asarray(x, dtype=np.float64).reshape(-1, spec.d_in)
    p = fact.params
    for lay in spec.layers():
        i = lay.index
        b = p[f"b{i}"] if lay.bias else None
        if lay.gated:
            c = p[f"c{i}"] if lay.bias else None
            h = gated_layer(
                h,
                p[f"u{i}"],
                p[f"vt{i}"],
                p[f"uv{i}"],
                p[f"vtv{i}"],
                b,
                c,
                lay.activation,
                round_intermediate=round_intermediate,
            )
        else:
            h = layer(
                h, p[f"u{i}"], p[f"vt{i}"], b, lay.activation, round_intermediate=round_intermediate
            )
        if round_hidden:
            h = round_to(h, spec.dtype).astype(np.float64)
    return h.reshape(*np.shape(x)[:-1], spec.d_out)


def gated_layer(
    x: np.ndarray,
    uw: np.ndarray,
    vw: np.ndarray,
    uv: np.ndarray,
    vv: np.ndarray,
    b: np.ndarray | None,
    c: np.ndarray | None,
    activation: str,
    *,
    round_intermediate: str | None = None,
) -> np.ndarray:
    """A gated factorised layer, act((x·Uw)·Vw + b) ⊙ ((x·Uv)·Vv + c), in float64 on the arrays as
    stored (`activation` the gate's elementwise function: silu for SwiGLU, gelu for GeGLU).
    `round_intermediate` rounds both rank-r intermediates, tw = x·Uw and tv = x·Uv, to that dtype
    before their second products: the kernels' rounding points (as `layer`)."""
    gate = layer(x, uw, vw, b, activation, round_intermediate=round_intermediate)
    up = layer(x, uv, vv, c, "identity", round_intermediate=round_intermediate)
    return gate * up


# ---- the fused kernels' contract (torch_impl/lowrank.py, jax_impl/lowrank.py) --------------------
# The widest intermediate the kernels keep on chip: t [BLOCK_M, BLOCK_R] in fp32 registers while it
# is accumulated, then in the dtype as the second product's operand. Past it, two GEMMs.
MAX_RANK = 256
NUM_SMS = 132  # H100 SXM / H200


def block_r(r: int) -> int:
    """The rank padded to a power of two ≥ 16 (tl.dot's smallest K; masked inside the kernel)."""
    return max(16, 1 << (int(r) - 1).bit_length())


@dataclass(frozen=True)
class LowRankConfig:
    """Tiles of the fused low-rank kernels, read by both twins.

    One pass (`split_k` = 0): a program owns BLOCK_M rows and `n_tiles` consecutive BLOCK_N-wide
    output tiles (a panel of n_tiles·BLOCK_N columns): it computes t = x·U once (K walked in
    BLOCK_K steps) and reuses it for every tile of its panel.

    Two passes (`split_k` = S ≥ 1): launch 1 computes fp32 partials of t = x·U, one per
    (row block, `split_block_r`-wide rank tile, K split of cdiv(cdiv(K, BLOCK_K), S) steps);
    launch 2 is the panel kernel with part A replaced by the sum of the S partials in the fixed
    order s = 0..S-1 (deterministic, no atomics), rounded once to the dtype (the same rounding
    point), then part B as in one pass. The rank's block is not a field: it follows from r
    (`block_r`)."""

    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    n_tiles: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 0
    split_block_r: int = 16

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k", "split_block_r"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 16:
                raise ValueError(f"{name}: expected a power of two >= 16, got {value!r}")
            if value & (value - 1):
                raise ValueError(f"{name}: expected a power of two >= 16, got {value}")
        for name in ("n_tiles", "group_m", "num_warps", "num_stages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        value = self.split_k
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SPLIT_K:
            raise ValueError(
                f"split_k: expected an int in [0, {MAX_SPLIT_K}] (0: one pass), got {value!r}"
            )

    @property
    def two_pass(self) -> bool:
        return self.split_k > 0


# The two-pass path's K splits: the second launch sums S partials (unrolled loads), so S is small.
MAX_SPLIT_K = 16

# Under an interpreter: small tiles, 2 tiles per program, so that odd test shapes span several
# programs in M and N, a panel's second tile, and the panel's ragged end.
INTERPRET_LOWRANK_CONFIG = LowRankConfig(
    block_m=16, block_n=32, block_k=16, n_tiles=2, group_m=2, num_warps=4, num_stages=1
)
# The two-pass path under an interpreter: 3 K splits of 16-wide steps (a test's K = 53 gives
# splits of 2, 2 and 0 steps: the empty split's partial is zeros) and 32-wide rank tiles (r = 64:
# two of them). Not 16: XLA's CPU dot sums a [16, 16]·[16, 16] product in another order than
# NumPy's (149 of 256 fp32 elements differ, measured), and the twins must agree bit for bit;
# from 32 columns on they agree.
INTERPRET_TWO_PASS_CONFIG = LowRankConfig(
    block_m=16, block_n=32, block_k=16, n_tiles=2, group_m=2, num_warps=4, num_stages=1,
    split_k=3, split_block_r=32,
)  # fmt: skip

# The two-pass path below this many rows (decode). Why M ≤ 64, llama3-8b's layer (K = 4096,
# N = 14336), BLOCK_N = 128, bf16: one pass there has a single row block, so its grid is 112
# programs over N, and each recomputes t and reads all of U from L2 — 112 copies of U, 56-224 MiB
# of L2 reads for r = 64-256, through a serial K loop of 64 steps per program (the measured 43 /
# 115 / 136 us at M = 16 vs a 0.7-2.4 us HBM floor). Two passes read U once (0.5-2 MiB, spread
# over S·r/16 programs of 8 K steps each) plus the partials, S·BLOCK_M·BLOCK_R·4 bytes per
# launch-2 program: at M = 16, S = 8: 32-128 KiB a program, 3.5-14 MiB in all — 16x less L2
# traffic than one pass, for one more launch (~2-3 us). At M = 128 one pass still has one or two
# row blocks, but the partials grow with BLOCK_M (S·128·256·4 = 1 MiB a program at S = 8, r =
# 256), as many bytes as one pass's copies of U. Past 64 rows `lowrank_config` takes one pass but
# at r ≤ 64 (two passes with S = 1, measured best there), and a factorised MLP's plain layers run
# two GEMMs instead (common/lowrank_spec.py `layer_run` has the measurements).
TWO_PASS_MAX_M = 64
# Past decode, the fused kernel with x·U split FUSED_SPLIT ways runs up to this many rows at
# r ≤ 64 (block_r ≤ 64): at M = 512 a row block's serial walk over K = 4096 was the slow half of
# both routes (x·U 20.6 µs of the two TMA GEMMs' 34.6, 24.6 of the fused S = 1 kernel's 37.9), and
# S = 4 puts four times the programs on it: fused 22.9 µs (H200, 86f9df2, bench/lowrank_probe.py,
# llama3-8b's layer, bf16; eager 39.9, S = 8 23.7). With x·U's narrow tiles (tiling.NARROW_CONFIGS,
# eaf3706) the two TMA GEMMs take 26.5 / 34.2 / 48.7 µs at M = 512 / 1024 / 2048 against the
# fused S = 4 kernel's 22.9 / 32.1 / 52.3: the limit sits at 1024. At r = 128 the two GEMMs stay
# ahead (30.8 vs 38.7 µs at 512: the S·BLOCK_M·BLOCK_R partials double): the rule stops at 64.
# The split pays for a long walk over K only: below FUSED_SPLIT_MIN_K (four splits of 4 steps of
# 64) the two GEMMs' x·U is short whatever M is, and the rule has not been measured there.
FUSED_SPLIT_MAX_M = 1024
FUSED_SPLIT_MIN_K = 1024
FUSED_SPLIT = 4


def fused_split_applies(m: int, k: int, r: int) -> bool:
    """Past decode, a plain layer runs fused with x·U split FUSED_SPLIT ways (see there)."""
    return TWO_PASS_MAX_M < m <= FUSED_SPLIT_MAX_M and k >= FUSED_SPLIT_MIN_K and block_r(r) <= 64


# K per split: 8 steps of 64 (a short serial chain: the decode kernel is latency-bound, not
# bandwidth-bound; 64 steps a program measured 43 us at r = 64 for 0.6 MB of weights).
SPLIT_K_SPAN = 512


# Cached: a decode step calls it once per layer, and building a validated config costs ~10 us
# of host time (41 us on the loaded CI machine) — a quarter of the two-pass path's GPU time.
@functools.lru_cache(maxsize=1024)
def lowrank_config(
    m: int, n: int, k: int, r: int, dtype: str, *, interpret: bool = False, gated: bool = False
) -> LowRankConfig:
    """The heuristic tiling (the cost model is in torch_impl/lowrank.py's docstring).

    M ≤ TWO_PASS_MAX_M (decode): two passes. BLOCK_M = M rounded up to 16..64; S = cdiv(K,
    SPLIT_K_SPAN) K splits, capped so that S·BLOCK_M ≤ 128 (the partials each launch-2 program
    sums: S·BLOCK_M·BLOCK_R·4 bytes ≤ 128 KiB at r = 256); 16-wide rank tiles in launch 1 (the
    most programs: 32 / 64 / 128 at r = 64 / 128 / 256, S = 8); launch 2: one 128-wide output
    tile a program (112 at N = 14336), one dot of K = BLOCK_R each.

    Larger M (the fronts run plain layers there as two GEMMs but where `fused_split_applies`,
    lowrank_spec.layer_run), plain, r ≤ 64 (block_r ≤ 64): two passes with S = FUSED_SPLIT where
    `fused_split_applies` (the fronts run it there), else S = 1, 64-row blocks,
    panels of two 128-wide tiles, 4 warps, 16-wide rank tiles — the H200 probe's best at
    llama3-8b's layer, M = 8192, bf16 (commit 0ec778c, bench/lowrank_probe.py, device time):
    170.6 µs vs 289.7 for the one pass below. Launch 1 computes t once per row block (no
    recompute per panel); launch 2 runs a GEMM of K = r over every (row block, panel): many small
    programs keep the output's stores (M·N·2 bytes, the floor) in flight. At r = 128 / 256 the
    probe's best variants were within 1–2 % of the one pass (283.0 vs 285.4, 432.1 vs 438.6 µs),
    so the one pass stays there.

    Larger M, otherwise: one pass. Rows: BLOCK_M = M rounded up to 16..128. Columns: enough
    N-panels that the grid fills the SMs once, G = max(1, NUM_SMS // m_tiles) panels of n_tiles =
    cdiv(n_tiles_total, G) tiles: at M = 8192 two panels per row block (t computed twice per row
    block). r = 256: 64-wide output tiles and 32-deep K steps (3 stages fit; see below).

    Gated (two intermediates, two V tiles a step): two passes as above with S·BLOCK_M ≤ 64 (the
    partials are twice as wide); one pass at BLOCK_M = 64 (two fp32 [BLOCK_M, BLOCK_R] tiles in
    registers) and, for r ≥ 128, BLOCK_N = 64 (V's and Vg's tiles fit in shared memory, no
    spills; sm_90 compile checked in tests/test_lowrank.py)."""
    del dtype
    if interpret:
        two = m <= TWO_PASS_MAX_M or (not gated and fused_split_applies(m, k, r))
        return INTERPRET_TWO_PASS_CONFIG if two else INTERPRET_LOWRANK_CONFIG
    bn = 128
    if m <= TWO_PASS_MAX_M:
        bm = 16
        while bm < m:
            bm *= 2
        splits = max(1, min(-(-k // SPLIT_K_SPAN), (64 if gated else 128) // bm, MAX_SPLIT_K))
        return LowRankConfig(
            block_m=bm,
            block_n=bn,
            block_k=64,
            n_tiles=1,
            group_m=8,
            num_warps=8 if block_r(r) >= 256 else 4,
            num_stages=3,
            split_k=splits,
            split_block_r=16,
        )
    if not gated and block_r(r) <= 64:
        return LowRankConfig(
            block_m=64,
            block_n=128,
            block_k=64,
            n_tiles=2,
            group_m=8,
            num_warps=4,
            num_stages=3,
            split_k=FUSED_SPLIT if fused_split_applies(m, k, r) else 1,
            split_block_r=16,
        )
    wide = block_r(r) >= 256
    bm = 16
    while bm < min(m, 64 if gated else 128):
        bm *= 2
    bk = 64
    stages = 3
    if gated and block_r(r) >= 128:
        # two V tiles a stage; 64 wide: r = 128 at 3 stages 122,880 B, 238 registers (128 wide
        # spills 148 B); r = 256 at 2 stages 204,800 B, 192 registers (sm_90 compile, no spills)
        bn, stages = 64, (2 if wide else 3)
    elif wide:
        # r = 256: 128-row blocks (half the L2 reads of V of 64-row blocks: M/BLOCK_M·r·N·2 =
        # 470 MB at M = 8192, and half of U's at G = 2), 64-wide V tiles and 32-deep K steps so
        # that 3 stages fit: 114,688 B of shared memory, 194 registers, no spills (sm_90 compile).
        # The previous choice (64 rows, 128-wide tiles, 2 stages: 180,224 B; 3 stages need
        # 245,760 B) measured 568 us (0.96x eager); bench/lowrank_probe.py times both.
        bn, bk = 64, 32
    m_tiles = -(-m // bm)
    n_total = -(-n // bn)
    groups = max(1, min(n_total, NUM_SMS // m_tiles))
    n_tiles = -(-n_total // groups)
    warps = 8 if bm >= 128 or wide else 4
    return LowRankConfig(
        block_m=bm,
        block_n=bn,
        block_k=bk,
        n_tiles=n_tiles,
        group_m=8,
        num_warps=warps,
        num_stages=stages,
    )


def check_lowrank_gated_layer(
    adapter: object,
    x: object,
    uw: object,
    vw: object,
    uv: object,
    vv: object,
    b: object,
    c: object,
    *,
    activation: str,
    config: object,
    fp32_precision: str,
) -> tuple[str, int, int, int]:
    """Every check of `lowrank_gated_linear_act(x, uw, vw, uv, vv, b, c, ...)`: the gate branch
    (uw [K, r], vw [r, N], b [N]) and the linear branch (uv, vv, c) each as check_lowrank_layer
    checks a layer, the same rank r in both, b and c both given or both None. Returns
    (dtype, K, r, N)."""
    from .validate import _check_devices, check_array

    dtype, k, r, n = check_lowrank_layer(
        adapter, x, uw, vw, b, activation=activation, config=config, fp32_precision=fp32_precision
    )
    infos = {
        "uv": check_array(adapter, "uv", uv, shape=[k, r], dtype=dtype),
        "vv": check_array(adapter, "vv", vv, shape=[r, n], dtype=dtype),
    }
    if (b is None) != (c is None):
        raise ValueError(
            "b, c: expected both biases or neither, got "
            f"b={'None' if b is None else 'an array'}, c={'None' if c is None else 'an array'}"
        )
    if c is not None:
        infos["c"] = check_array(adapter, "c", c, shape=[n], dtype=dtype)
    _check_devices(check_array(adapter, "x", x, shape=None, dtype=None), infos)
    return dtype, k, r, n


def check_lowrank_layer(
    adapter: object,
    x: object,
    u: object,
    v: object,
    b: object,
    *,
    activation: str,
    config: object,
    fp32_precision: str,
) -> tuple[str, int, int, int]:
    """Every check of `lowrank_linear_act(x, u, v, b, ...)`: x [..., K], u [K, r], v [r, N], b [N],
    all in x's dtype on x's device, 1 ≤ r ≤ MAX_RANK. Returns (dtype, K, r, N)."""
    from .validate import _check_devices, check_array, check_options

    xi = check_array(adapter, "x", x, shape=None, dtype=None)
    dtype, k = xi.dtype, xi.shape[-1]
    r = check_array(adapter, "u", u, shape=None, dtype=dtype, ndim_min=2).shape[-1]
    infos = {"u": check_array(adapter, "u", u, shape=[k, r], dtype=dtype)}
    n = check_array(adapter, "v", v, shape=None, dtype=dtype, ndim_min=2).shape[-1]
    infos["v"] = check_array(adapter, "v", v, shape=[r, n], dtype=dtype)
    if b is not None:
        infos["b"] = check_array(adapter, "b", b, shape=[n], dtype=dtype)
    check_options(activation, fp32_precision, dtype, None)
    if config is not None and not isinstance(config, LowRankConfig):
        raise TypeError(
            f"config: expected a fusedmlp.common.lowrank.LowRankConfig or None, "
            f"got {type(config).__name__}"
        )
    _check_devices(xi, infos)
    if r == 0:
        raise ValueError(f"u: expected a rank r >= 1 (shape [{k}, r]), got shape [{k}, 0]")
    if r > MAX_RANK:
        raise NotImplementedError(
            f"u: rank {r} > {MAX_RANK}, the widest intermediate the fused kernel keeps on chip; "
            "fallback: two GEMMs (linear_act(linear_act(x, u), v, b))"
        )
    return dtype, k, r, n
