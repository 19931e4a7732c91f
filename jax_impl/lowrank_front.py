"""The factorised MLP's functional front: `lowrank_mlp()` runs it, `plan()` says how, `factorise()`
makes its params from a dense MLP's.

    y = lowrank_mlp(x, params, lspec)       lspec: common.lowrank_spec.LowRankSpec (spec + ranks)

Per layer, by its mode (common/lowrank_spec.py, the same for every M) and the M of the call
(`lowrank_spec.layer_run`, one rule for both fronts and `plan`): `lowrank` runs the fused
`lowrank_linear_act` (lowrank.py) at M ≤ 64 and where `lowrank.fused_split_applies` (r ≤ 64, K ≥
1024, M ≤ 1024: x·U split 4 ways; H200, M = 512: 24.7 vs XLA 26.3 µs), two GEMMs elsewhere (H200, M
= 8192, r = 64-256: Mosaic GPU 175-242 µs vs the fused twin 188-417 and XLA 233-282); `two_gemm` two
`linear_act` launches with t = x·U stored in the dtype (the fused kernel's rounding point: the same
reference); `dense` one `linear_act` on the layer's original weight. The two GEMMs run Mosaic GPU's
`linear_act` (mosaic/linear_act.py, the sibling of torch's TMA kernel) on a Hopper GPU where its K
and N rule holds, else the portable one (always when interpreted). A gated layer (SwiGLU / GeGLU):
`lowrank` runs `lowrank_gated_linear_act` at every M, `two_gemm` `linear_act(x, [U | Uv])` then the
dense `gated` kernel on [tw | tv] with the block-diagonal packed operand (the gated epilogue's
rounding order; common/lowrank_spec.py says why it is exact), `dense` the `gated` kernel on the
original packed W and V. Hidden layers are stored in the dtype between launches, so the parity
target is `lowrank_spec.reference(..., round_intermediate=True, round_hidden=True)`; the exact
float64 factorised MLP is met within the tolerance policy.

impl: "auto" and "pallas_triton" are the same here (the modes and M decide per layer). Inference
only: there is no factorised backward kernel.

Twin: torch_impl/lowrank_front.py (the same public names and checks).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np

from fusedmlp.common import MLPSpec, TileConfig
from fusedmlp.common import lowrank_spec as ls
from fusedmlp.common.lowrank import DEFAULT_DAMP, LowRankConfig
from fusedmlp.common.registry import AUTO
from fusedmlp.common.tiling import heuristic_config

from . import compat
from . import linear_act as portable_linear_act
from .front import _is_hopper
from .gated import gated
from .linear_act import linear_act
from .lowrank import lowrank_gated_linear_act, lowrank_linear_act
from .packing import pack_gated

STACK = "jax"
IMPLS = (AUTO, "pallas_triton")


# ---- checks --------------------------------------------------------------------------------------
def check_impl(impl: object) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS} for a factorised MLP, got {impl!r}")
    return impl  # type: ignore[return-value]


def check_lspec(lspec: object) -> ls.LowRankSpec:
    if not isinstance(lspec, ls.LowRankSpec):
        raise TypeError(
            f"lspec: expected a fusedmlp.common.lowrank_spec.LowRankSpec, got "
            f"{type(lspec).__name__}"
        )
    return lspec


def check_call(x: object, params: Mapping[str, object], lspec: ls.LowRankSpec) -> None:
    """Types, names, shapes and the dtype; the kernels' public functions check the rest."""
    # twin-diff: jax.Array for torch.Tensor (a tracer is a jax.Array too).
    if not isinstance(x, jax.Array):
        raise TypeError(f"x: expected a jax.Array, got {type(x).__name__}")
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a mapping of name -> array, got {type(params).__name__}")
    for name, value in params.items():
        if not isinstance(value, jax.Array):
            raise TypeError(f"params[{name!r}]: expected a jax.Array, got {type(value).__name__}")
    ls.check_params(lspec, params)
    if x.ndim < 1 or x.shape[-1] != lspec.spec.d_in:
        raise ValueError(f"x: expected shape [..., {lspec.spec.d_in}], got {list(x.shape)}")
    dtype = str(x.dtype)
    if dtype != lspec.dtype:
        raise ValueError(f"x: expected dtype {lspec.dtype} (the spec's), got {dtype}")


# ---- plan ----------------------------------------------------------------------------------------
def plan(
    lspec: ls.LowRankSpec,
    x_shape: Sequence[int],
    *,
    impl: str = AUTO,
    config: LowRankConfig | None = None,
    interpret: bool | None = None,
) -> ls.LowRankPlan:
    """Per layer: rank, how it runs and why, params, FLOPs and bytes vs dense, the launches."""
    check_impl(impl)
    interpret = compat.interpret_mode() if interpret is None else interpret
    dtype = check_lspec(lspec).dtype

    def gemm(m: int, n: int, k: int) -> tuple[str, TileConfig]:
        return _gemm(m, n, k, dtype, interpret)[:2]

    return ls.plan(lspec, x_shape, config=config, interpret=interpret, stack=STACK, gemm=gemm)


# ---- run -----------------------------------------------------------------------------------------
def _gemm(
    m: int, n: int, k: int, dtype: str, interpret: bool
) -> tuple[str, TileConfig, ModuleType]:
    """(name, config, module) of the linear_act that runs one launch of two GEMMs, [m, k]·[k, n]:
    Mosaic GPU's on a Hopper GPU where its rule holds (16-bit, K and N multiples of 16), else the
    portable one, and always when interpreted."""
    # twin-diff: the Hopper kernel is the Mosaic GPU sibling (torch: the TMA Triton kernel), its
    # package imported only here (a CPU run never needs it). H200 (4922964), M = 8192, r =
    # 64/128/256: 182/202/245 µs vs XLA's 240/251/282; at M = 512 it loses (32/37/57 vs 28/31/36).
    # With t·V's ping-pong tiles (tuned_h200.json, 1d81765): 115.8/133.3/163.3 µs vs XLA's
    # 233.9/246.4/283.8 at M = 8192.
    if not interpret and _is_hopper():
        from .mosaic import linear_act as mosaic_linear_act
        from .mosaic import pipeline

        if pipeline.unsupported_reason(m, n, k, dtype) is None:
            config = pipeline.default_config("linear_act", m, n, k, dtype)
            return "mosaic.linear_act", config, mosaic_linear_act
    config = heuristic_config("linear_act", m, n, k, dtype, interpret=interpret)
    return "linear_act", config, portable_linear_act


def _two_gemms(
    h: jax.Array,
    u: jax.Array,
    vt: jax.Array,
    b: jax.Array | None,
    activation: str,
    precision: str,
    interpret: bool,
) -> jax.Array:
    """act((h·U)·Vt + b) as two linear_act launches, t = h·U stored in the dtype (the fused
    kernel's rounding point), through the public (checking) functions."""
    m, k, (r, n) = math.prod(h.shape[:-1]), h.shape[-1], vt.shape
    dtype = str(h.dtype)
    _, c1, first = _gemm(m, r, k, dtype, interpret)
    t = first.linear_act(h, u, config=c1, fp32_precision=precision, interpret=interpret)
    _, c2, second = _gemm(m, n, r, dtype, interpret)
    return second.linear_act(
        t, vt, b, activation=activation, config=c2, fp32_precision=precision, interpret=interpret
    )


def run_layers(
    x: jax.Array,
    params: Mapping[str, jax.Array],
    lspec: ls.LowRankSpec,
    config: LowRankConfig | None,
    interpret: bool,
) -> jax.Array:
    """The launches, on validated input, each layer as it runs at x's M (`layer_run`)."""
    precision = lspec.spec.fp32_precision
    m = math.prod(x.shape[:-1])
    h = x
    for lay in lspec.layers():
        i, act = lay.layer.index, lay.layer.activation
        b = params.get(f"b{i}")
        runs, _ = ls.layer_run(lay, m)
        if lay.layer.gated:
            h = run_gated_layer(h, params, lay, config, precision, interpret)
        elif runs == "lowrank":
            h = lowrank_linear_act(
                h,
                params[f"u{i}"],
                params[f"vt{i}"],
                b,
                activation=act,
                config=config,
                fp32_precision=precision,
                interpret=interpret,
            )
        elif runs == "two_gemm":
            h = _two_gemms(h, params[f"u{i}"], params[f"vt{i}"], b, act, precision, interpret)
        else:
            h = linear_act(
                h, params[f"w{i}"], b, activation=act, fp32_precision=precision, interpret=interpret
            )
    return h


def run_gated_layer(
    x: jax.Array,
    params: Mapping[str, jax.Array],
    lay: ls.LowRankLayer,
    config: LowRankConfig | None,
    fp32_precision: str,
    interpret: bool,
) -> jax.Array:
    """One gated layer, act(x·W + b) ⊙ (x·V + c), by its mode (common/lowrank_spec.py: a gated
    `lowrank` layer runs fused at every M)."""
    i, n, act = lay.layer.index, lay.layer.d_out, lay.layer.activation
    if lay.mode == "dense":
        wv, bc = params[f"wv{i}"], params.get(f"bc{i}")
        return gated(
            x, wv, bc, n=n, activation=act, fp32_precision=fp32_precision, interpret=interpret
        )
    u, vt, uv, vtv = (params[f"{a}{i}"] for a in ("u", "vt", "uv", "vtv"))
    b, c = params.get(f"b{i}"), params.get(f"c{i}")
    if lay.mode == "lowrank":
        return lowrank_gated_linear_act(
            x,
            u,
            vt,
            uv,
            vtv,
            b,
            c,
            activation=act,
            config=config,
            fp32_precision=fp32_precision,
            interpret=interpret,
        )
    # two_gemm: [tw | tv] rounded once to the dtype, then the gated epilogue over the block-
    # diagonal packed operand (gate columns tw·Vt + tv·0, up columns tw·0 + tv·Vtv: exact zeros)
    m, k, dtype = math.prod(x.shape[:-1]), x.shape[-1], str(x.dtype)
    _, c1, first = _gemm(m, 2 * u.shape[1], k, dtype, interpret)
    uuv = jnp.concatenate([u, uv], axis=1)
    t = first.linear_act(x, uuv, config=c1, fp32_precision=fp32_precision, interpret=interpret)
    zeros = jnp.zeros_like(vt)
    wv = pack_gated(jnp.concatenate([vt, zeros], axis=0), jnp.concatenate([zeros, vtv], axis=0))
    bc = pack_gated(b, c) if b is not None else None
    return gated(t, wv, bc, n=n, activation=act, fp32_precision=fp32_precision, interpret=interpret)


def lowrank_mlp(
    x: jax.Array,
    params: Mapping[str, jax.Array],
    lspec: ls.LowRankSpec,
    *,
    impl: str = AUTO,
    config: LowRankConfig | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """y = the factorised MLP of `lspec` on x [..., d_in] -> [..., d_out], in the spec dtype.
    `config`: one LowRankConfig for every layer that runs the fused kernel at this M (None: the
    heuristic); a plain `lowrank` layer that runs two GEMMs at this M (`layer_run`) ignores it.
    `interpret`: Pallas' interpreter (None: where there is no GPU)."""
    check_impl(impl)
    check_call(x, params, check_lspec(lspec))
    if config is not None and not isinstance(config, LowRankConfig):
        raise TypeError(
            f"config: expected a fusedmlp.common.lowrank.LowRankConfig or None, "
            f"got {type(config).__name__}"
        )
    # twin-diff: `interpret` is a call's choice here, a process's (TRITON_INTERPRET) in torch.
    interpret = compat.interpret_mode() if interpret is None else interpret
    return run_layers(x, params, lspec, config, interpret)


# ---- factorise -----------------------------------------------------------------------------------
def _numpy(name: str, value: object) -> np.ndarray:
    if isinstance(value, (jax.Array, np.ndarray)):
        return np.asarray(value, dtype=np.float64)
    raise TypeError(f"{name}: expected a jax.Array or np.ndarray, got {type(value).__name__}")


def factorise(
    params: Mapping[str, jax.Array | np.ndarray],
    spec: MLPSpec,
    *,
    rank: int | Sequence[int] | None = None,
    energy: float | Sequence[float] | None = None,
    calibration: jax.Array | np.ndarray | None = None,
    damp: float = DEFAULT_DAMP,
) -> tuple[ls.LowRankSpec, dict[str, jax.Array]]:
    """(LowRankSpec, params as arrays in spec.dtype) of the dense MLP (`params` `w{i}`, `b{i}`).

    `rank` / `energy` (exactly one; one value or one per layer); `calibration` (the MLP's real
    inputs [..., d_in]) selects the activation-aware SVD. The factorisation runs in float64 on
    the host (common/lowrank.py); the factors are then rounded once to the dtype."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a mapping of name -> array, got {type(params).__name__}")
    arrays = {k: _numpy(f"params[{k!r}]", v) for k, v in params.items()}
    calib = None if calibration is None else _numpy("calibration", calibration)
    lspec, fact = ls.factorise(spec, arrays, rank=rank, energy=energy, calibration=calib, damp=damp)
    # twin-diff: no device argument (jax places the arrays).
    out = {k: jnp.asarray(v) for k, v in ls.cast_params(lspec, fact).items()}
    return lspec, out
