"""The factorised MLP's functional front: `lowrank_mlp()` runs it, `plan()` says how, `factorise()`
makes its params from a dense MLP's.

    y = lowrank_mlp(x, params, lspec)       lspec: common.lowrank_spec.LowRankSpec (spec + ranks)

Per layer, by its mode (common/lowrank_spec.py, the same for every M) and the M of the call
(`lowrank_spec.layer_run`, one rule for both fronts and `plan`): `lowrank` runs the fused
`lowrank_linear_act` (lowrank.py) at M ≤ 64 and where `lowrank.fused_split_applies` (r ≤ 64, K ≥
1024, M ≤ 1024: x·U split 4 ways), two GEMMs elsewhere (H200, r = 64, M = 512: fused 22.9 vs two
GEMMs 26.5 µs; M = 8192, r = 64-256: two GEMMs 144-220 vs fused 166-428); `two_gemm` two
`linear_act` launches with t = x·U stored in the dtype (the fused kernel's rounding point: the same
reference); `dense` one `linear_act` on the layer's original weight. The two GEMMs run the Hopper
TMA `linear_act` (tma/linear_act.py) on a Hopper GPU where TMA's 16-byte rule holds, else the
portable one (always under TRITON_INTERPRET: CI's time stays as it was; the TMA kernel's own tests
interpret it). A gated layer (SwiGLU / GeGLU): `lowrank` runs `lowrank_gated_linear_act` at every M,
`two_gemm` `linear_act(x, [U | Uv])` then the dense `gated` kernel on [tw | tv] with the
block-diagonal packed operand (the gated epilogue's rounding order; common/lowrank_spec.py says why
it is exact), `dense` the `gated` kernel on the original packed W and V. Hidden layers are stored in
the dtype between launches, so the parity target is `lowrank_spec.reference(...,
round_intermediate=True, round_hidden=True)`; the exact float64 factorised MLP is met within the
tolerance policy.

Host cost: the checks, the modes and the configs run on the first call of a signature (the spec,
the config, and type, shape, dtype, device and contiguity of x and every param); a repeated call
goes to the launchers' records (`_forward`; ~95-120 -> ~25-30 us a decode call on the CPU with
the launches stubbed, bench/results/2026-12-01-cpu-host/README.md).

impl: "auto" and "triton" are the same here (the modes and M decide per layer; no measured
dispatch table for factorised layers yet). Inference only: there is no factorised backward kernel.

Twin: jax_impl/lowrank_front.py (the same public names and checks).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch

from fusedmlp.common import MLPSpec, TileConfig, lowrank
from fusedmlp.common import lowrank_spec as ls
from fusedmlp.common.lowrank import DEFAULT_DAMP, LowRankConfig, lowrank_config
from fusedmlp.common.registry import AUTO
from fusedmlp.common.tiling import heuristic_config

from . import linear_act as portable_linear_act
from .front import _is_hopper
from .gated import gated
from .linear_act import linear_act
from .lowrank import lowrank_gated_linear_act, lowrank_linear_act, lowrank_linear_act_fwd
from .module import to_torch
from .packing import pack_gated
from .runtime import INTERPRET
from .tma import linear_act as tma_linear_act
from .tma import tma_unsupported_reason

STACK = "torch"
IMPLS = (AUTO, "triton")


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
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not isinstance(params, Mapping):
        raise TypeError(
            f"params: expected a mapping of name -> tensor, got {type(params).__name__}"
        )
    for name, value in params.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"params[{name!r}]: expected a torch.Tensor, got {type(value).__name__}"
            )
    ls.check_params(lspec, params)
    if x.dim() < 1 or x.shape[-1] != lspec.spec.d_in:
        raise ValueError(f"x: expected shape [..., {lspec.spec.d_in}], got {list(x.shape)}")
    dtype = str(x.dtype).removeprefix("torch.")
    if dtype != lspec.dtype:
        raise ValueError(f"x: expected dtype {lspec.dtype} (the spec's), got {dtype}")


# ---- plan ----------------------------------------------------------------------------------------
def plan(
    lspec: ls.LowRankSpec,
    x_shape: Sequence[int],
    *,
    impl: str = AUTO,
    config: LowRankConfig | None = None,
) -> ls.LowRankPlan:
    """Per layer: rank, how it runs and why, params, FLOPs and bytes vs dense, the launches."""
    check_impl(impl)
    dtype = check_lspec(lspec).dtype

    def gemm(m: int, n: int, k: int) -> tuple[str, TileConfig]:
        return _gemm(m, n, k, dtype)[:2]

    return ls.plan(lspec, x_shape, config=config, interpret=INTERPRET, stack=STACK, gemm=gemm)


# ---- run -----------------------------------------------------------------------------------------
def _gemm(m: int, n: int, k: int, dtype: str) -> tuple[str, TileConfig, ModuleType]:
    """(name, config, module) of the linear_act that runs one launch of two GEMMs, [m, k]·[k, n]:
    the Hopper TMA kernel on a Hopper GPU where its 16-byte rule holds (H200, llama3-8b's layer,
    M = 8192, r = 64/128/256: 177.9/205.0/232.4 µs vs the portable kernel's 240.6/301.1/362.0,
    commit 0ec778c), else the portable one, and always under the interpreter."""
    if not INTERPRET and _is_hopper() and tma_unsupported_reason(m, n, k, dtype) is None:
        config = heuristic_config("linear_act", m, n, k, dtype, interpret=False, persistent=True)
        return "tma.linear_act", config, tma_linear_act
    config = heuristic_config("linear_act", m, n, k, dtype, interpret=INTERPRET)
    return "linear_act", config, portable_linear_act


def _two_gemms(
    h: torch.Tensor,
    u: torch.Tensor,
    vt: torch.Tensor,
    b: torch.Tensor | None,
    activation: str,
    precision: str,
) -> torch.Tensor:
    """act((h·U)·Vt + b) as two linear_act launches, t = h·U stored in the dtype (the fused
    kernel's rounding point), through the public (checking) functions."""
    m, k, (r, n) = math.prod(h.shape[:-1]), h.shape[-1], vt.shape
    dtype = str(h.dtype).removeprefix("torch.")
    _, c1, first = _gemm(m, r, k, dtype)
    t = first.linear_act(h, u, config=c1, fp32_precision=precision)
    _, c2, second = _gemm(m, n, r, dtype)
    return second.linear_act(t, vt, b, activation=activation, config=c2, fp32_precision=precision)


def run_layers(
    x: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    lspec: ls.LowRankSpec,
    config: LowRankConfig | None,
) -> torch.Tensor:
    """The launches, on validated input, through the layers' public (checking) functions."""
    precision = lspec.spec.fp32_precision
    h = x
    for lay in lspec.layers():
        h = _run_layer(h, params, lay, config, precision)
    return h


def _run_layer(
    h: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    lay: ls.LowRankLayer,
    config: LowRankConfig | None,
    precision: str,
) -> torch.Tensor:
    """One layer as it runs at h's M (`layer_run`), through the public functions (each checks its
    input)."""
    i, act = lay.layer.index, lay.layer.activation
    b = params.get(f"b{i}")
    if lay.layer.gated:
        return run_gated_layer(h, params, lay, config, precision)
    runs, _ = ls.layer_run(lay, math.prod(h.shape[:-1]))
    if runs == "lowrank":
        return lowrank_linear_act(
            h,
            params[f"u{i}"],
            params[f"vt{i}"],
            b,
            activation=act,
            config=config,
            fp32_precision=precision,
        )
    if runs == "two_gemm":
        return _two_gemms(h, params[f"u{i}"], params[f"vt{i}"], b, act, precision)
    return linear_act(h, params[f"w{i}"], b, activation=act, fp32_precision=precision)


def run_gated_layer(
    x: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    lay: ls.LowRankLayer,
    config: LowRankConfig | None,
    fp32_precision: str,
) -> torch.Tensor:
    """One gated layer, act(x·W + b) ⊙ (x·V + c), by its mode (common/lowrank_spec.py: a gated
    `lowrank` layer runs fused at every M)."""
    i, n, act = lay.layer.index, lay.layer.d_out, lay.layer.activation
    if lay.mode == "dense":
        wv, bc = params[f"wv{i}"], params.get(f"bc{i}")
        return gated(x, wv, bc, n=n, activation=act, fp32_precision=fp32_precision)
    u, vt, uv, vtv = (params[f"{a}{i}"] for a in ("u", "vt", "uv", "vtv"))
    b, c = params.get(f"b{i}"), params.get(f"c{i}")
    if lay.mode == "lowrank":
        return lowrank_gated_linear_act(
            x, u, vt, uv, vtv, b, c, activation=act, config=config, fp32_precision=fp32_precision
        )
    # two_gemm: [tw | tv] rounded once to the dtype, then the gated epilogue over the block-
    # diagonal packed operand (gate columns tw·Vt + tv·0, up columns tw·0 + tv·Vtv: exact zeros)
    m, k, dtype = math.prod(x.shape[:-1]), x.shape[-1], str(x.dtype).removeprefix("torch.")
    _, c1, first = _gemm(m, 2 * u.shape[1], k, dtype)
    t = first.linear_act(x, torch.cat([u, uv], dim=1), config=c1, fp32_precision=fp32_precision)
    zeros = torch.zeros_like(vt)
    wv = pack_gated(torch.cat([vt, zeros], dim=0), torch.cat([zeros, vtv], dim=0))
    bc = pack_gated(b, c) if b is not None else None
    return gated(t, wv, bc, n=n, activation=act, fp32_precision=fp32_precision)


def lowrank_mlp(
    x: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    lspec: ls.LowRankSpec,
    *,
    impl: str = AUTO,
    config: LowRankConfig | None = None,
) -> torch.Tensor:
    """y = the factorised MLP of `lspec` on x [..., d_in] -> [..., d_out], in the spec dtype.
    `config`: one LowRankConfig for every layer that runs the fused kernel at this M (None: the
    heuristic); a plain `lowrank` layer that runs two GEMMs at this M (`layer_run`) ignores it."""
    check_impl(impl)
    return _forward(x, params, lspec, config)


# ---- validate and plan, once per call signature --------------------------------------------------
# twin-diff: torch only. The JAX front is traced once per signature by jit; in eager torch each
# call paid the checks of the call and of every layer, param_shapes, layers() and the configs (the
# module docstring's numbers, bench/host_cost.py). The first call of a signature runs `run_layers`
# (every public function checks its real input, hiddens included); it then records, per fused layer,
# the launcher and its resolved config, so a repeated call goes to lowrank_linear_act_fwd directly
# (lowrank.py: launch records), and per plain layer that runs two GEMMs the two linear_act launchers
# (portable or TMA) and their configs. The key holds what any check or choice reads: the spec
# (widths, activation, dtype, precision, ranks), the config, MAX_RANK (the modes), TWO_PASS_MAX_M
# and the split rule's limits (the run choice), and type, shape, dtype, device and contiguity of x
# and of every param.
_FUSED, _TWO_GEMM, _PUBLIC = "fused", "two_gemm", "public"


@dataclass(frozen=True)
class _Prepared:
    lead: tuple[int, ...]
    m: int
    is_2d: bool  # x is [M, d_in] already: no reshapes
    # per layer: (_FUSED, names, bias names, launcher keywords), (_TWO_GEMM, names, bias names,
    # ((launcher, config) of each launch, activation)) or (_PUBLIC, layer, None, None)
    steps: tuple[tuple, ...]


_PREPARED: dict[tuple, _Prepared] = {}
_PREPARED_MAX = 4096  # distinct call signatures kept (a dynamic-shape server stays bounded)


def _signature(a: Any) -> tuple:
    return (type(a), a.shape, a.dtype, a.device, a.is_contiguous())


def _plan_steps(
    x: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    lspec: ls.LowRankSpec,
    config: LowRankConfig | None,
) -> _Prepared:
    """The steps of a validated call, each layer as it runs at this M (`layer_run`). A fused
    layer goes to the launcher with the config its public function would resolve, where every
    tensor that function makes contiguous already is (plain: b; gated: the factors and biases);
    so do a plain layer's two GEMMs (`_gemm`'s launchers and configs; b contiguous); any other
    layer (dense, a gated two_gemm, or a strided param) keeps its public function."""
    lead = tuple(x.shape[:-1])
    m = math.prod(lead)
    precision = lspec.spec.fp32_precision
    steps = []
    for lay in lspec.layers():
        i, k, n, r = lay.layer.index, lay.layer.d_in, lay.layer.d_out, lay.rank
        gated = lay.layer.gated
        factors = (f"u{i}", f"vt{i}", f"uv{i}", f"vtv{i}") if gated else (f"u{i}", f"vt{i}")
        biases = tuple(a for a in ((f"b{i}", f"c{i}") if gated else (f"b{i}",)) if a in params)
        made_contiguous = (*factors, *biases) if gated else biases
        runs, _ = ls.layer_run(lay, m)
        if runs == "lowrank" and all(params[a].is_contiguous() for a in made_contiguous):
            cfg = config
            if cfg is None:  # the layer function's heuristic, for the same (M, N, K, r)
                cfg = lowrank_config(m, n, k, r, lspec.dtype, interpret=INTERPRET, gated=gated)
            options = dict(activation=lay.layer.activation, config=cfg, fp32_precision=precision)
            steps.append((_FUSED, factors, biases, options))
        elif runs == "two_gemm" and not gated and all(params[a].is_contiguous() for a in biases):
            _, c1, first = _gemm(m, r, k, lspec.dtype)
            _, c2, second = _gemm(m, n, r, lspec.dtype)
            launches = ((first.linear_act_fwd, c1), (second.linear_act_fwd, c2))
            steps.append((_TWO_GEMM, factors, biases, (launches, lay.layer.activation)))
        else:
            steps.append((_PUBLIC, lay, None, None))
    return _Prepared(lead, m, len(lead) == 1, tuple(steps))


def _run_steps(
    x: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    lspec: ls.LowRankSpec,
    config: LowRankConfig | None,
    call: _Prepared,
) -> torch.Tensor:
    precision = lspec.spec.fp32_precision
    h = x if call.is_2d else x.reshape(call.m, lspec.spec.d_in)
    for kind, names, biases, options in call.steps:
        if kind is _PUBLIC:
            h = _run_layer(h, params, names, config, precision)
        elif kind is _TWO_GEMM:
            ((first, c1), (second, c2)), act = options
            b = params[biases[0]] if biases else None
            t = first(h, params[names[0]], None, None, activation="identity", config=c1,
                      fp32_precision=precision)  # fmt: skip
            h = second(t, params[names[1]], b, None, activation=act, config=c2,
                       fp32_precision=precision)  # fmt: skip
        elif len(names) == 2:
            b = params[biases[0]] if biases else None
            h = lowrank_linear_act_fwd(h, params[names[0]], params[names[1]], b, **options)
        else:
            b, c = (params[biases[0]], params[biases[1]]) if biases else (None, None)
            u, vt, uv, vtv = (params[n] for n in names)
            h = lowrank_linear_act_fwd(h, u, vt, b, gate=(uv, vtv, c), **options)
    return h if call.is_2d else h.reshape(*call.lead, lspec.spec.d_out)


def _forward(
    x: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    lspec: ls.LowRankSpec,
    config: LowRankConfig | None,
) -> torch.Tensor:
    """`lowrank_mlp` after the impl check (FactorisedMLP's eager call too): checked and planned
    on the first call of a signature, then the recorded steps."""
    try:
        key = (
            lspec, config, lowrank.MAX_RANK, lowrank.TWO_PASS_MAX_M, lowrank.FUSED_SPLIT_MAX_M,
            lowrank.FUSED_SPLIT_MIN_K, _signature(x), tuple(params),
            tuple(map(_signature, params.values())),
        )  # fmt: skip
        call = _PREPARED.get(key)
    except (AttributeError, TypeError):  # not tensors, or unhashable: the checks name the argument
        key, call = None, None
    if call is not None:
        return _run_steps(x, params, lspec, config, call)
    check_call(x, params, check_lspec(lspec))
    if config is not None and not isinstance(config, LowRankConfig):
        raise TypeError(
            f"config: expected a fusedmlp.common.lowrank.LowRankConfig or None, "
            f"got {type(config).__name__}"
        )
    y = run_layers(x, params, lspec, config)  # every layer's checks, on the real tensors
    if key is not None:
        if len(_PREPARED) >= _PREPARED_MAX:
            _PREPARED.clear()
        _PREPARED[key] = _plan_steps(x, params, lspec, config)
    return y


# ---- factorise -----------------------------------------------------------------------------------
def _numpy(name: str, value: object) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64).numpy()
    if isinstance(value, np.ndarray):
        return value
    raise TypeError(f"{name}: expected a torch.Tensor or np.ndarray, got {type(value).__name__}")


def factorise(
    params: Mapping[str, torch.Tensor | np.ndarray],
    spec: MLPSpec,
    *,
    rank: int | Sequence[int] | None = None,
    energy: float | Sequence[float] | None = None,
    calibration: torch.Tensor | np.ndarray | None = None,
    damp: float = DEFAULT_DAMP,
    device: torch.device | str | None = None,
) -> tuple[ls.LowRankSpec, dict[str, torch.Tensor]]:
    """(LowRankSpec, params as tensors in spec.dtype) of the dense MLP (`params` `w{i}`, `b{i}`).

    `rank` / `energy` (exactly one; one value or one per layer); `calibration` (the MLP's real
    inputs [..., d_in]) selects the activation-aware SVD. The factorisation runs in float64 on
    the CPU (common/lowrank.py); the factors are then rounded once to the dtype, on `device`
    (None: the first param's)."""
    if not isinstance(params, Mapping):
        raise TypeError(
            f"params: expected a mapping of name -> tensor, got {type(params).__name__}"
        )
    arrays = {k: _numpy(f"params[{k!r}]", v) for k, v in params.items()}
    calib = None if calibration is None else _numpy("calibration", calibration)
    lspec, fact = ls.factorise(spec, arrays, rank=rank, energy=energy, calibration=calib, damp=damp)
    if device is None:
        first = next(iter(params.values()), None)
        device = first.device if isinstance(first, torch.Tensor) else None
    out = {k: to_torch(v, device) for k, v in ls.cast_params(lspec, fact).items()}
    return lspec, out
