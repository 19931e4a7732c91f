"""A factorised MLP's description: each layer's rank, how each layer runs, its cost and reference.

`LowRankSpec(spec, ranks)` wraps an `MLPSpec` (left unchanged: its JSON, the dense fronts and every
dense test see no new field) with one rank per layer. From (K, N, r) alone each layer gets a mode
(`layer_mode`), the same for every batch size, so the params a module holds never change with M:

- `lowrank`: r ≤ MAX_RANK (256) and r·(K + N) < K·N: the fused kernel `lowrank_linear_act`,
  t = x·U kept on chip (plain: at M ≤ 64, two GEMMs above: `layer_run`, below); fewer FLOPs
  (2M·r·(K+N) vs 2M·K·N) and fewer weight bytes (the same inequality), the activations' bytes
  unchanged;
- `two_gemm`: r > MAX_RANK and r·(K + N) < K·N: the [BLOCK_M, r] intermediate does not fit on
  chip, so two `linear_act` launches (each front's Hopper kernel where it applies) with t
  written to memory and read back (2·M·r more bytes);
  the factors are kept (the memory the compression saved), the plan shows the dense cost beside;
- `dense`: r·(K + N) ≥ K·N (r = min(K, N) always is): factorising saves neither FLOPs nor
  bytes, so the layer keeps its ORIGINAL weight `w{i}` (exact, and no bigger) and runs the dense
  fused `linear_act`.

Params of a factorised MLP (`param_shapes`): per layer `u{i}` [K, r] and `vt{i}` [r, N], or `w{i}`
[K, N] for a dense layer; `b{i}` [N] where the spec has biases.

Gated layers (SwiGLU / GeGLU: act(x·W + b) ⊙ (x·V + c), every layer but the last of a gated spec):
W and V have the same shape and are factorised at the layer's one rank, so the mode rule above
holds for both at once (their FLOPs, bytes and params are twice one matrix's). Names: the gate W
→ `u{i}`, `vt{i}` as a plain layer's, the up V → `uv{i}` [K, r], `vtv{i}` [r, N] (the `v` suffix
marks the contract's `v{i}`, as `c{i}` does its bias), biases `b{i}`, `c{i}`. By mode:

- `lowrank`: the fused `lowrank_gated_linear_act` (one x tile a K step feeds both U's; both
  intermediates rounded once to the dtype; act(tw·Vt + b) ⊙ (tv·Vtv + c) rounded once);
- `two_gemm`: two launches that keep the gated epilogue's rounding order: `linear_act(x, [U | Uv])`
  gives [tw | tv] [M, 2r] rounded to the dtype (the fused kernel's rounding point), then the
  dense `gated` kernel on it with the block-diagonal packed operand pack([Vt; 0], [0; Vtv]) [2r,
  2·Np] and bc = pack(b, c): its gate columns sum tw·Vt (+ tv·0, exact zeros) and its up columns
  tv·Vtv, the one rounding after act(gate) ⊙ up, as the fused kernel. The concatenation and the
  block-diagonal operand are built per call (the factors stay as stored: the memory the
  compression saved; the zero half doubles the second launch's MACs — a fallback past r = 256);
- `dense`: the ORIGINAL W and V, held packed as FusedMLP holds them, `wv{i}` [K, 2·Np] and
  `bc{i}` [2·Np] (common/packing.py), and the dense `gated` kernel; param counts are W's and V's
  (the padding is layout, not parameters).

How a `lowrank` layer RUNS depends on M as well (`layer_run(layer, m)`, the one rule both fronts
and `plan` read; the params stay M-independent): at M ≤ lowrank.TWO_PASS_MAX_M (64, decode) the
fused kernel, and where `lowrank.fused_split_applies` (r ≤ 64, K ≥ 1024, M ≤ 1024) the fused
kernel with x·U split four ways (r = 64, M = 512 / 1024: 22.9 / 32.1 µs vs the two TMA GEMMs'
26.5 / 34.2; eaf3706);
elsewhere two GEMMs as `two_gemm` runs them (t = x·U stored in the dtype: the fused
kernel's rounding point, so the same parity target) on the stack's Hopper GEMM. Measured on the
H200 (commit 84f2c0e, bench/lowrank_probe.py, device time, read flush), llama3-8b's layer 4096 →
14336, silu, bf16, r = 64 / 128 / 256: M = 16, fused 8.2 / 10.1 / 11.1 µs vs eager 14.4 / 15.0 /
16.1; M = 512, torch's two TMA GEMMs 34.7 / 37.3 / 40.8 vs the fused kernel 38.8 / 49.5 / 86.0; M =
8192, two TMA GEMMs 156 / 173 / 229 vs fused 163 / 275 / 428 (eager 506 / 514 / 554); JAX's two
Mosaic GEMMs (4922964, rmw flush) 182 / 202 / 245 vs its fused twin 194 / 297 / 428. One rule for
both stacks wins everywhere measured in torch (JAX at M = 512–1024 and r = 128 loses to XLA: see
docs/lowrank.md). A gated `lowrank` layer keeps the fused kernel at every M: its two-GEMM path
builds the concatenated U's and the block-diagonal packed operand per call (fused at M = 8192:
519 / 800 / 1,083 µs vs eager 1,060 / 1,078 / 1,152).

`factorise` turns a dense MLP's params into them (common/lowrank.py's plain or activation-aware
SVD per layer); `reference` is the float64 forward with the kernels' rounding points optional;
`plan` gives per layer the rank, the mode, what runs at this M and why, the parameter counts,
FLOPs and bytes, and the launches with their configs (both stacks' `plan` return it).
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import lowrank
from . import reference as dense_reference
from .dtypes import cast, numpy_dtype, round_to
from .packing import is_packed, pack_gated, packed_width, unpack_gated, unpack_params
from .spec import Layer, MLPSpec
from .tiling import heuristic_config

MODES = ("lowrank", "two_gemm", "dense")


# ---- one layer: its mode and cost ----------------------------------------------------------------
def layer_mode(k: int, n: int, r: int) -> tuple[str, str]:
    """(mode, why) for a [K, N] weight at rank r (see the module docstring)."""
    fact, dense = r * (k + n), k * n
    if fact >= dense:
        return "dense", (
            f"rank {r}: r·(K+N) = {fact:,} ≥ K·N = {dense:,}: no fewer FLOPs or weight bytes than "
            "the dense layer; dense, W kept"
        )
    if r > lowrank.MAX_RANK:
        return "two_gemm", (
            f"rank {r} > {lowrank.MAX_RANK}: the intermediate does not fit on chip; two GEMMs "
            f"(t = x·U through memory), r·(K+N) = {fact:,} < K·N = {dense:,}"
        )
    return "lowrank", (
        f"rank {r} ≤ {lowrank.MAX_RANK} and r·(K+N) = {fact:,} < K·N = {dense:,}: fused, t on chip"
    )


# ---- how a layer runs at M rows (the measured numbers: the module docstring) ---------------------
def layer_run(lay: LowRankLayer, m: int) -> tuple[str, str]:
    """(how, why): how the layer runs at M rows (one of MODES; "lowrank" is the fused kernel) and
    why. Only a plain `lowrank` layer's choice depends on M: fused at M ≤ TWO_PASS_MAX_M (and at
    r ≤ 64 up to FUSED_SPLIT_MAX_M, x·U split), two GEMMs above; every other layer runs its mode."""
    if lay.mode != "lowrank":
        return lay.mode, lay.reason
    limit = lowrank.TWO_PASS_MAX_M
    if lay.layer.gated:
        return "lowrank", (
            f"{lay.reason}; gated: fused at every M (two GEMMs would build [U | Uv] and the "
            "block-diagonal packed operand per call); H200, M = 8192, r = 64/128/256: fused "
            "519/800/1,083 µs vs eager 1,060/1,078/1,152"
        )
    if m <= limit:
        return "lowrank", (
            f"{lay.reason}; M = {m} ≤ {limit} (decode): H200, M = 16, r = 64/128/256: fused "
            "8.2/10.1/11.1 µs vs eager 14.4/15.0/16.1"
        )
    split_limit, split_k = lowrank.FUSED_SPLIT_MAX_M, lowrank.FUSED_SPLIT_MIN_K
    if lowrank.fused_split_applies(m, lay.layer.d_in, lay.rank):
        return "lowrank", (
            f"{lay.reason}; r ≤ 64, K ≥ {split_k} and M = {m} ≤ {split_limit}: fused, x·U split "
            f"{lowrank.FUSED_SPLIT} ways; H200, K = 4096, r = 64, M = 512 / 1024: 22.9 / 32.1 µs "
            "vs two GEMMs 26.5 / 34.2, eager 39.5 / 70.2"
        )
    return "two_gemm", (
        f"{lay.reason} at M ≤ {limit} (r ≤ 64 and K ≥ {split_k}: M ≤ {split_limit}); M = {m}: "
        "two GEMMs instead "
        "(t = x·U stored in the dtype, the fused kernel's rounding point); H200, r = 64/128: M = "
        "2048 48.7/57.4 µs (Hopper TMA linear_act) vs fused 52.3/92.9, M = 512 r = 128 30.8 vs "
        "38.7; M = 8192, r = 64/128/256, 157/183/221 vs 163/275/426"
    )


def layer_params(k: int, n: int, r: int, mode: str, bias: bool, gated: bool = False) -> int:
    """Weights and biases; a gated layer has two of each (W and V, b and c)."""
    weights = k * n if mode == "dense" else r * (k + n)
    return (2 if gated else 1) * (weights + (n if bias else 0))


def layer_flops(m: int, k: int, n: int, r: int, mode: str, gated: bool = False) -> int:
    """The useful FLOPs (a gated two_gemm's second launch also multiplies its operand's zeros)."""
    return (2 if gated else 1) * 2 * m * (k * n if mode == "dense" else r * (k + n))


def layer_bytes(
    m: int, k: int, n: int, r: int, mode: str, bias: bool, itemsize: int, gated: bool = False
) -> int:
    """The fewest bytes the layer moves: its params, x read and out written once; two_gemm adds
    t's round trip (M·r written, read back; a gated layer's [tw | tv] is M·2r)."""
    moved = layer_params(k, n, r, mode, bias, gated) + m * (k + n)
    if mode == "two_gemm":
        moved += 2 * m * r * (2 if gated else 1)
    return itemsize * moved


@dataclass(frozen=True)
class LowRankLayer:
    layer: Layer
    rank: int
    mode: str
    reason: str


# ---- the spec ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LowRankSpec:
    """An MLPSpec and each layer's rank (1 ≤ r ≤ min(K, N)); the modes follow (`layers()`)."""

    spec: MLPSpec
    ranks: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.spec, MLPSpec):
            raise TypeError(
                f"spec: expected a fusedmlp.common.MLPSpec, got {type(self.spec).__name__}"
            )
        ranks = self.ranks
        if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence):
            raise TypeError(f"ranks: expected a sequence of ints, got {type(ranks).__name__}")
        ranks = tuple(ranks)
        if len(ranks) != self.spec.num_layers:
            raise ValueError(
                f"ranks: expected one rank per layer ({self.spec.num_layers}), got {len(ranks)}"
            )
        for layer, r in zip(self.spec.layers(), ranks, strict=True):
            check_rank(r, layer.d_in, layer.d_out, f"ranks[{layer.index}]")
        object.__setattr__(self, "ranks", tuple(int(r) for r in ranks))

    def layers(self) -> tuple[LowRankLayer, ...]:
        return tuple(
            LowRankLayer(layer, r, *layer_mode(layer.d_in, layer.d_out, r))
            for layer, r in zip(self.spec.layers(), self.ranks, strict=True)
        )

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(lay.mode for lay in self.layers())

    @property
    def dtype(self) -> str:
        return self.spec.dtype

    def with_dtype(self, dtype: str) -> LowRankSpec:
        if dtype == self.spec.dtype:
            return self
        precision = self.spec.fp32_precision if dtype == "float32" else "ieee"
        return LowRankSpec(self.spec.replace(dtype=dtype, fp32_precision=precision), self.ranks)

    def param_count(self) -> int:
        return sum(
            layer_params(
                lay.layer.d_in, lay.layer.d_out, lay.rank, lay.mode, lay.layer.bias, lay.layer.gated
            )
            for lay in self.layers()
        )

    # ---- JSON: the spec's own fields and `ranks` -------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {**self.spec.to_dict(), "ranks": list(self.ranks)}

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LowRankSpec:
        if not isinstance(data, dict):
            raise ValueError(f"spec: expected a JSON object, got {type(data).__name__}")
        if "ranks" not in data:
            raise ValueError("spec: missing fields ['ranks']")
        rest = {k: v for k, v in data.items() if k != "ranks"}
        return cls(MLPSpec.from_dict(rest), tuple(data["ranks"]))

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike[str]) -> LowRankSpec:
        text = str(text_or_path)
        if isinstance(text_or_path, os.PathLike) or not text.lstrip().startswith("{"):
            with open(text_or_path) as f:
                text = f.read()
        return cls.from_dict(json.loads(text))

    def __str__(self) -> str:
        ranks = ", ".join(
            f"{lay.rank}" + ("" if lay.mode == "lowrank" else f" ({lay.mode})")
            for lay in self.layers()
        )
        return f"{self.spec}, ranks [{ranks}]"


def check_rank(r: object, k: int, n: int, name: str = "rank") -> None:
    if isinstance(r, bool) or not isinstance(r, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(r).__name__}")
    if not 1 <= r <= min(k, n):
        raise ValueError(
            f"{name}: expected an int in [1, {min(k, n)}] (min(K, N) of a [{k}, {n}] weight), "
            f"got {r}"
        )


def param_shapes(lspec: LowRankSpec) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a factorised MLP's params, in layer order: u, vt | w, then b; a gated
    layer u, vt, uv, vtv, then b, c | wv, then bc (dense: packed, common/packing.py)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for lay in lspec.layers():
        i, k, n, r = lay.layer.index, lay.layer.d_in, lay.layer.d_out, lay.rank
        gated, bias = lay.layer.gated, lay.layer.bias
        if lay.mode == "dense" and gated:
            shapes[f"wv{i}"] = (k, packed_width(n))
            if bias:
                shapes[f"bc{i}"] = (packed_width(n),)
            continue
        if lay.mode == "dense":
            shapes[f"w{i}"] = (k, n)
        else:
            shapes[f"u{i}"] = (k, r)
            shapes[f"vt{i}"] = (r, n)
            if gated:
                shapes[f"uv{i}"] = (k, r)
                shapes[f"vtv{i}"] = (r, n)
        if bias:
            shapes[f"b{i}"] = (n,)
            if gated:
                shapes[f"c{i}"] = (n,)
    return shapes


# ---- factorising a dense MLP ---------------------------------------------------------------------
def _per_layer_checked(value: object, name: str, spec: MLPSpec) -> list:
    """One value per layer (a scalar for all, or a sequence); a sequence's entries are named
    `name[i]` in errors."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    values = lowrank._per_layer(value, spec, name)
    return values


def factorise(
    spec: MLPSpec,
    params: Mapping[str, np.ndarray],
    *,
    rank: int | Sequence[int] | None = None,
    energy: float | Sequence[float] | None = None,
    calibration: np.ndarray | None = None,
    damp: float = lowrank.DEFAULT_DAMP,
) -> tuple[LowRankSpec, dict[str, np.ndarray]]:
    """(LowRankSpec, float64 params) of the dense MLP (`spec`, `params` as `w{i}`, `b{i}`, and a
    gated layer's `v{i}`, `c{i}`; packed `wv{i}`, `bc{i}` are unpacked first).

    `rank` or `energy` (exactly one): one value for every layer or one per layer. `calibration`:
    the MLP's real inputs [..., d_in] → activation-aware (whitened) SVD, each layer on the inputs
    the uncompressed MLP gives it; without it, plain SVD. A layer whose rank brings no saving
    (`layer_mode` "dense") keeps its original weight (a gated layer's W and V, packed)."""
    if not isinstance(spec, MLPSpec):
        raise TypeError(f"spec: expected a fusedmlp.common.MLPSpec, got {type(spec).__name__}")
    if (rank is None) == (energy is None):
        raise ValueError(
            f"rank, energy: expected exactly one of them, got rank={rank!r}, energy={energy!r}"
        )
    ranks_in = _per_layer_checked(rank, "rank", spec)
    energies = _per_layer_checked(energy, "energy", spec)
    many = isinstance(rank if rank is not None else energy, (list, tuple, np.ndarray))
    for layer in spec.layers():
        i = layer.index
        name = ("rank" if rank is not None else "energy") + (f"[{i}]" if many else "")
        try:
            lowrank._check_rank_energy(ranks_in[i], energies[i], layer.d_in, layer.d_out)
        except (TypeError, ValueError) as err:
            msg = str(err).split(": ", 1)[1]
            raise type(err)(f"{name}: {msg}") from None
    if calibration is not None:
        shape = np.shape(calibration)
        if (
            len(shape) < 1
            or shape[-1] != spec.d_in
            or not np.issubdtype(np.asarray(calibration).dtype, np.number)
        ):
            raise ValueError(
                f"calibration: expected a numeric array of shape [..., {spec.d_in}] (the MLP's "
                f"inputs), got shape {list(shape)}"
            )
    if is_packed(params):
        params = unpack_params(spec, params)
    needed = [
        f"{w}{lay.index}" for lay in spec.layers() for w in (("w", "v") if lay.gated else ("w",))
    ]
    missing = [name for name in needed if name not in params]
    if missing:
        raise ValueError(f"params: missing {missing}")
    fact = lowrank.factorise_mlp(
        spec,
        params,
        rank=tuple(ranks_in) if rank is not None else None,
        energy=tuple(energies) if energy is not None else None,
        calibration=calibration,
        damp=damp,
    )
    lspec = LowRankSpec(spec, fact.ranks)
    out: dict[str, np.ndarray] = {}
    f64 = np.float64
    for lay in lspec.layers():
        i, gated, bias = lay.layer.index, lay.layer.gated, lay.layer.bias
        if lay.mode == "dense" and gated:
            w, v = (np.asarray(params[f"{a}{i}"], dtype=f64) for a in ("w", "v"))
            out[f"wv{i}"] = pack_gated(w, v)
            if bias:
                out[f"bc{i}"] = pack_gated(fact.params[f"b{i}"], fact.params[f"c{i}"])
            continue
        if lay.mode == "dense":
            out[f"w{i}"] = np.asarray(params[f"w{i}"], dtype=f64)
        else:
            names = ("u", "vt", "uv", "vtv") if gated else ("u", "vt")
            out.update({f"{a}{i}": fact.params[f"{a}{i}"] for a in names})
        if bias:
            out[f"b{i}"] = fact.params[f"b{i}"]
            if gated:
                out[f"c{i}"] = fact.params[f"c{i}"]
    return lspec, out


def cast_params(lspec: LowRankSpec, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The params in the spec's dtype (common.dtypes.cast: bfloat16 through float32)."""
    return {k: cast(params[k], lspec.dtype) for k in param_shapes(lspec)}


def check_params(lspec: LowRankSpec, params: Mapping[str, Any]) -> None:
    """ValueError naming what is missing, unexpected or of the wrong shape."""
    expected = param_shapes(lspec)
    missing = [n for n in expected if n not in params]
    extra = sorted(n for n in params if n not in expected)
    if missing or extra:
        raise ValueError(
            f"params: missing {missing}, unexpected {extra}; the spec {lspec} needs "
            f"{list(expected)}"
        )
    for name, shape in expected.items():
        got = tuple(np.shape(params[name]))
        if got != shape:
            raise ValueError(f"params[{name!r}]: expected shape {list(shape)}, got {list(got)}")


# ---- the float64 reference -----------------------------------------------------------------------
def reference(
    lspec: LowRankSpec,
    x: np.ndarray,
    params: Mapping[str, np.ndarray],
    *,
    round_intermediate: bool = False,
    round_hidden: bool = False,
) -> np.ndarray:
    """y in float64, [..., d_out], on the params as stored. `round_intermediate`: t = x·U rounded
    to the dtype (the fused kernel's rounding point, and two_gemm's store of t); `round_hidden`:
    each hidden layer and y rounded to the dtype (per-layer kernels store them)."""
    spec = lspec.spec
    if np.ndim(x) < 1 or np.shape(x)[-1] != spec.d_in:
        raise ValueError(f"x: expected shape [..., {spec.d_in}], got {list(np.shape(x))}")
    check_params(lspec, params)
    f64 = np.float64
    h = np.asarray(x, dtype=f64).reshape(-1, spec.d_in)
    rounding = spec.dtype if round_intermediate else None
    for lay in lspec.layers():
        i, act = lay.layer.index, lay.layer.activation
        b = params[f"b{i}"] if lay.layer.bias and f"b{i}" in params else None  # gated dense: bc
        if lay.layer.gated:
            h = _gated_reference(lay, h, params, rounding)
        elif lay.mode == "dense":
            z = dense_reference.matmul(h, np.asarray(params[f"w{i}"], dtype=f64))
            if b is not None:
                z = z + np.asarray(b, dtype=f64)
            h = dense_reference.activation(act, z)
        else:
            h = lowrank.layer(
                h, params[f"u{i}"], params[f"vt{i}"], b, act, round_intermediate=rounding
            )
        if round_hidden:
            h = round_to(h, spec.dtype)
    return h.reshape(*np.shape(x)[:-1], spec.d_out)


def _gated_reference(
    lay: LowRankLayer, h: np.ndarray, params: Mapping[str, np.ndarray], rounding: str | None
) -> np.ndarray:
    """A gated layer in float64: factorised (`lowrank.gated_layer`, t's rounding optional), or the
    original W and V unpacked from `wv{i}`, `bc{i}` (dense: no intermediate to round)."""
    i, n, act, f64 = lay.layer.index, lay.layer.d_out, lay.layer.activation, np.float64
    if lay.mode != "dense":
        b, c = (params[f"{a}{i}"] if lay.layer.bias else None for a in ("b", "c"))
        names = ("u", "vt", "uv", "vtv")
        factors = (params[f"{a}{i}"] for a in names)
        return lowrank.gated_layer(h, *factors, b, c, act, round_intermediate=rounding)
    w, v = unpack_gated(np.asarray(params[f"wv{i}"], dtype=f64), n)
    z, g = dense_reference.matmul(h, w), dense_reference.matmul(h, v)
    if lay.layer.bias:
        b, c = unpack_gated(np.asarray(params[f"bc{i}"], dtype=f64), n)
        z, g = z + b, g + c
    return dense_reference.activation(act, z) * g


# ---- plan ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerPlan:
    """One layer of a factorised MLP's plan: how it runs, why, and what it costs at this M.
    `mode` decides the params (M-independent), `runs` what runs at this M (`layer_run`), `reason`
    why; params, FLOPs and bytes are those of what runs."""

    index: int
    k: int
    n: int
    rank: int
    mode: str
    runs: str
    reason: str
    activation: str
    params: int
    dense_params: int
    flops: int
    dense_flops: int
    bytes: int
    dense_bytes: int
    launches: tuple[str, ...]  # "lowrank_linear_act(gelu) 19x67x33 r=9 [config]", ...
    gated: bool = False

    def __str__(self) -> str:
        runs = self.runs if self.runs == self.mode else f"{self.mode}, runs {self.runs}"
        return (
            f"layer {self.index} {self.k}→{self.n}{' gated' if self.gated else ''} rank "
            f"{self.rank}: {runs} ({self.reason}); "
            f"params {self.params:,} (dense {self.dense_params:,}), FLOPs {self.flops:,} (dense "
            f"{self.dense_flops:,}), bytes {self.bytes:,} (dense {self.dense_bytes:,}); "
            + "; ".join(self.launches)
        )


@dataclass(frozen=True)
class LowRankPlan:
    lspec: LowRankSpec
    m: int
    layers: tuple[LayerPlan, ...]
    stack: str

    @property
    def params(self) -> int:
        return sum(r.params for r in self.layers)

    @property
    def flops(self) -> int:
        return sum(r.flops for r in self.layers)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.layers)

    def describe(self) -> str:
        stack = f"{self.stack} " if self.stack else ""
        head = (
            f"{stack}lowrank {self.lspec}, M={self.m}: params {self.params:,} "
            f"(dense {sum(r.dense_params for r in self.layers):,})"
        )
        return "\n".join([head, *(f"  {r}" for r in self.layers)])

    def table(self) -> str:
        """Markdown: one row per layer."""
        rows = [
            "| layer | K→N | rank | runs | params (dense) | GFLOP (dense) | MB (dense) | why |",
            "| ---: | --- | ---: | --- | ---: | ---: | ---: | --- |",
        ]
        for r in self.layers:
            gated = " gated" if r.gated else ""
            rows.append(
                f"| {r.index} | {r.k}→{r.n}{gated} | {r.rank} | {r.runs} | {r.params:,} "
                f"({r.dense_params:,}) | {r.flops / 1e9:.3g} ({r.dense_flops / 1e9:.3g}) | "
                f"{r.bytes / 1e6:.3g} ({r.dense_bytes / 1e6:.3g}) | {r.reason} |"
            )
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.describe()


# (name, config) of the linear_act kernel a two-GEMM launch of [m, k]·[k, n] runs in a stack:
# `gemm(m, n, k)`; each front passes its own (torch: the Hopper TMA kernel where it applies).
GemmChoice = Callable[[int, int, int], tuple[str, Any]]


def _launches(
    m: int,
    k: int,
    n: int,
    r: int,
    runs: str,
    act: str,
    gated: bool,
    dtype: str,
    config: lowrank.LowRankConfig | None,
    interpret: bool,
    gemm: GemmChoice,
) -> tuple[str, ...]:
    """The launches of one layer and their configs (the stacks' run paths make these calls)."""
    if runs == "lowrank":
        cfg = (
            config
            if config is not None
            else lowrank.lowrank_config(m, n, k, r, dtype, interpret=interpret, gated=gated)
        )
        name = "lowrank_gated_linear_act" if gated else "lowrank_linear_act"
        return (f"{name}({act}) {m}x{n}x{k} r={r} [{cfg}]",)
    if runs == "two_gemm":
        t = 2 * r if gated else r  # a gated layer's [tw | tv]
        name1, c1 = gemm(m, t, k)
        if gated:
            name2, c2 = "gated", heuristic_config("gated", m, n, t, dtype, interpret=interpret)
        else:
            name2, c2 = gemm(m, n, t)
        return (f"{name1}(identity) {m}x{t}x{k} [{c1}]", f"{name2}({act}) {m}x{n}x{t} [{c2}]")
    family = "gated" if gated else "linear_act"
    cfg = heuristic_config(family, m, n, k, dtype, interpret=interpret)
    return (f"{family}({act}) {m}x{n}x{k} [{cfg}]",)


def plan(
    lspec: LowRankSpec,
    x_shape: Sequence[int],
    *,
    config: lowrank.LowRankConfig | None = None,
    interpret: bool = False,
    stack: str = "",
    gemm: GemmChoice | None = None,
) -> LowRankPlan:
    """Per layer: rank, mode, what runs at this M and why (`layer_run`), params, FLOPs and bytes
    (and the dense layer's), launches. `gemm`: the stack's two-GEMM kernel choice (None: the
    portable linear_act at its heuristic config)."""
    if not isinstance(lspec, LowRankSpec):
        raise TypeError(
            f"lspec: expected a fusedmlp.common.lowrank_spec.LowRankSpec, got "
            f"{type(lspec).__name__}"
        )
    shape = tuple(int(d) for d in x_shape)
    if len(shape) < 1 or shape[-1] != lspec.spec.d_in:
        raise ValueError(f"x: expected shape [..., {lspec.spec.d_in}], got {list(shape)}")
    m = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    itemsize = numpy_dtype(lspec.dtype).itemsize
    dtype = lspec.dtype
    if gemm is None:

        def gemm(m: int, n: int, k: int) -> tuple[str, Any]:
            return "linear_act", heuristic_config("linear_act", m, n, k, dtype, interpret=interpret)

    rows = []
    for lay in lspec.layers():
        k, n, r, mode, bias = lay.layer.d_in, lay.layer.d_out, lay.rank, lay.mode, lay.layer.bias
        act, gated = lay.layer.activation, lay.layer.gated
        runs, why = layer_run(lay, m)
        launches = _launches(m, k, n, r, runs, act, gated, dtype, config, interpret, gemm)
        rows.append(
            LayerPlan(
                index=lay.layer.index,
                k=k,
                n=n,
                rank=r,
                mode=mode,
                runs=runs,
                reason=why,
                activation=act,
                params=layer_params(k, n, r, mode, bias, gated),
                dense_params=layer_params(k, n, r, "dense", bias, gated),
                flops=layer_flops(m, k, n, r, runs, gated),
                dense_flops=layer_flops(m, k, n, r, "dense", gated),
                bytes=layer_bytes(m, k, n, r, runs, bias, itemsize, gated),
                dense_bytes=layer_bytes(m, k, n, r, "dense", bias, itemsize, gated),
                launches=launches,
                gated=gated,
            )
        )
    return LowRankPlan(lspec, m, tuple(rows), stack)
