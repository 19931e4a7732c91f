"""Hopper backward: backward.py's gradients with every GEMM on the persistent TMA kernel.

Per layer i, in reverse, from dZ_i (the gradient at the layer's pre-activation; gated: the packed
[dz|dg], common/packing.py), the same formulas as torch_impl/backward.py:

    dW_i = h_iᵀ·dZ_i        linear_act (identity) with x = h_iᵀ read M-major in place (X_KMAJOR);
                            every layer's in ONE grouped launch at the end where the committed
                            sweep measured that faster (`grouped_config`, linear_act.py's
                            `linear_grouped`: they all contract over the batch, and alone each
                            leaves its last wave part empty)
    db_i = Σ_m dZ_i         one fp32 column sum (torch.sum: deterministic), rounded once
    dZ_{i-1} = (dZ_i·W_iᵀ) ⊙ act'(z_{i-1})
                            linear_act with w = W_iᵀ read K-major in place (W_KMAJOR) and the
                            previous layer's act' step in its epilogue (EPILOGUE "dact" /
                            "dact_gated": backward.py's `_dact_epilogue`, applied to the fp32
                            accumulator and rounded once, as the portable dgrad does); after a
                            relu layer the epilogue reads its output h_i instead of a z
                            (backward.py's `_dact_from_output`: relu keeps no z)

Why this and not backward.py's kernels on Hopper: those are pointer kernels (mma through cp.async,
no TMA, no persistent grid), 70-85 % of cuBLAS on the H200: at llama3-8b M=8192 their dgrad and
wgrad took 10.9 ms against ~7.6 ms for four GEMMs at the TMA kernel's measured 98-102 % of
cuBLAS (docs/performance.md). The first version ran the act' step as a separate elementwise pass
(backward.dact_fwd, ~0.3 ms at llama3-8b, measured 13.79 ms a step in all); the epilogue form
removes that pass and dh's rounding before act'. The dact epilogue's tiles are capped at 128
output columns (the z tile it loads: common.tiling.cap_for_preact), as the portable dgrad's; where
the table says so it runs in column halves, two programs an SM (linear_act.py's launcher: on an
H100, hf-blog's gated act' step 174.9 → 151.7 µs).

Used by custom_op's backward on an sm_90 GPU when the asked impl is `triton_tma`, or `auto` or
`mosaic` where the Mosaic GPU step (cross/backward.py) does not take the call (front.hopper_route
asks that first), and every operand meets TMA's 16-byte rule (`unsupported_reason`); otherwise
backward.py's portable kernels run. The saving forward ("preact") is backward.py's
`forward_saving`, with `hopper=True` here (gated layers and those that keep no pre-activation —
identity, relu — on the TMA kernels). Runs under TRITON_INTERPRET=1 too
(tests/test_backward_torch.py, tests/test_relu_from_output.py).

Tiles: `step_config` — the committed sweep's entry for the GEMM's kind and shape
(tuned_hopper_backward.json beside this file, written by bench/sweep_tma_backward.py; kinds named
by common.tiling.step_gemm_kind, as the Mosaic GPU sibling's table), else the forward heuristic's
(backward.py `_heuristic`), for the saving forward's gated layers too.

The step's orchestration, `run_step`, is written once for both of torch's Hopper steps: it asks a
`StepKernels` for each GEMM — this module's `TMA_KERNELS`, or cross/backward.py's `MOSAIC_KERNELS`
(the Mosaic GPU GEMMs through as_torch_kernel, where `front.hopper_route` sends a call).

Sibling: jax_impl/mosaic/backward.py (the same step on Mosaic GPU kernels, the same table format,
the weight gradients grouped by the same rule). One difference: there the act' step's result takes
the saved z's buffer (a jax Ref the kernel writes over, which XLA aliases where z dies); here it is
a new tensor, since the saved z is an input of `fusedmlp::mlp_backward` (custom_op.py), declared
unmutated — writing over it would need `mutates_args`, under which functionalization copies a
mutated graph input back. torch frees z right after (`res[...] = None`), within eager's peak.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fusedmlp.common.config import TileConfig
from fusedmlp.common.packing import packed_names, packed_width
from fusedmlp.common.spec import MLPSpec
from fusedmlp.common.tiling import (
    GROUPED_KIND,
    GroupedTiles,
    measured_here_first,
    shape_bucket,
    step_gemm_kind,
)
from fusedmlp.common.tuning import triton_config
from fusedmlp.common.validate import check_saved

from .. import backward as portable
from ..runtime import INTERPRET
from .linear_act import linear_act_fwd, linear_grouped
from .support import tma_unsupported_reason


def unsupported_reason(spec: MLPSpec, m: int) -> str | None:
    """None if every GEMM of the backward meets TMA's 16-byte rule at M = m, else why not.

    The GEMMs per layer (K = d_in, Nc = d_out or the packed 2·Np): hᵀ·dZ reads rows of M (h
    M-major) and of Nc (dZ); dZ·Wᵀ reads rows of Nc (dZ) and of Nc (W K-major), writes rows of K.
    """
    for layer in spec.layers():
        width = packed_width(layer.d_out) if layer.gated else layer.d_out
        for what, (rows, n, k) in (
            ("weight gradient", (layer.d_in, width, m)),
            ("input gradient", (m, layer.d_in, width)),
        ):
            why = tma_unsupported_reason(rows, n, k, spec.dtype)
            if why is not None:
                return f"layer {layer.index} {what}: {why}"
    return None


TUNED_FILE = Path(__file__).with_name("tuned_hopper_backward.json")


@functools.cache
def tuned_table() -> dict[str, list[dict[str, Any]]]:
    """The committed sweep's best tiles ({kind: [entry, ...]}; empty if none), read once."""
    if not TUNED_FILE.exists():
        return {}
    return json.loads(TUNED_FILE.read_text()).get("configs", {})


def tuned_config(kind: str, m: int, n: int, k: int, dtype: str) -> TileConfig | None:
    """The committed sweep's tiles for this kind and (N, K) at M's bucket (else the nearest
    measured M), this GPU's own measurements first (common.tiling.measured_here_first), or None:
    none measured, float32 (the sweep times bfloat16, whose tiles float16 shares; float32's K step
    is half as wide), or under the interpreter (tiny tiles there)."""
    entries = [e for e in tuned_table().get(kind, []) if (e["n"], e["k"]) == (n, k)]
    if INTERPRET or dtype == "float32" or not entries:
        return None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    entries = measured_here_first(entries, gpu)
    bucket = int(shape_bucket(m))
    best = min(entries, key=lambda e: abs(math.log2(int(shape_bucket(e["m"])) / bucket)))
    return triton_config(best["config"])


def step_config(
    kind: str, family: str, m: int, n: int, k: int, dtype: str, precision: str
) -> TileConfig:
    """The tiles for one GEMM of the step (`kind`: common.tiling.step_gemm_kind): the table's
    (`tuned_config`), else backward.py's cached forward heuristic for the family and shape."""
    tuned = tuned_config(kind, m, n, k, dtype)
    if tuned is not None:
        return tuned
    cfg = portable._heuristic(family, m, n, k, dtype, precision, False, True)
    if kind.endswith("dact") or kind.endswith("dact_gated"):
        # the forward's epilogue slices, programs an SM and warp specialisation were measured
        # for its plain epilogue, not the act' step's (whose slices are halves, two per SM
        # untimed there, and whose warp-specialised form only the sweep's DACT_GRID times)
        cfg = dataclasses.replace(cfg, epilogue_subtile=1, programs_per_sm=1, warp_specialize=False)
    return cfg


def grouped_config(products: list[tuple[int, int]], k: int, dtype: str) -> TileConfig | None:
    """The tiles for the step's weight gradients hᵢᵀ·dZᵢ as ONE grouped launch
    (`linear_act.linear_grouped`), or None: launch them apart, each on its own tiles.

    `products`: each weight gradient's (M, N) — (d_in, the layer's width), in the order the
    backward reaches them (last layer first); `k`: their shared contraction, the batch rows.
    The committed sweep's entry (kind GROUPED_KIND) for these products at K's bucket (else the
    nearest measured K), taken only where it measured the grouped launch faster than the
    separate ones it replaces ("us" < "apart_us", both timed in one run); never for float32 or
    under the interpreter (as `tuned_config`; the tests pass tiles to `mlp_backward`'s
    `grouped`). jax_impl/mosaic/backward.py's `grouped_config`, the same rule."""
    entries = [e for e in tuned_table().get(GROUPED_KIND, []) if
               [tuple(p) for p in e["products"]] == [tuple(p) for p in products]]  # fmt: skip
    if INTERPRET or dtype == "float32" or not entries:
        return None
    bucket = int(shape_bucket(k))
    best = min(entries, key=lambda e: abs(math.log2(int(shape_bucket(e["k"])) / bucket)))
    return triton_config(best["config"]) if best["us"] < best["apart_us"] else None


def _gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    spec: MLPSpec,
    *,
    weight_gradient: bool,
    epilogue: str = "none",
    z: torch.Tensor | None = None,
    activation: str = "identity",
) -> torch.Tensor:
    """a·b on the TMA kernel: a weight gradient hᵀ·dZ (a = hᵀ, a view of h) or an input
    gradient dZ·Wᵀ (b = Wᵀ, a view of W), with the previous layer's act' step in the epilogue
    where `epilogue` says (linear_act_fwd)."""
    m, k = a.shape
    kind = step_gemm_kind(
        "linear_act", x_kmajor=weight_gradient, w_kmajor=not weight_gradient, epilogue=epilogue
    )
    cfg = step_config(kind, "linear_act", m, b.shape[1], k, spec.dtype, spec.fp32_precision)
    return linear_act_fwd(
        a, b, None, None, activation="identity", config=cfg, fp32_precision=spec.fp32_precision,
        epilogue=epilogue, z=z, dact_activation=activation,
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class StepKernels:
    """The kernels one Hopper training step runs, for `run_step` (the one orchestration of both
    Hopper steps: this module's Triton TMA GEMMs, `TMA_KERNELS`, and cross/backward.py's Mosaic
    GPU ones). Each takes the step's tensors as they lie (h [M, K], W [K, N]) and the spec."""

    saving_forward: Callable[..., tuple[torch.Tensor, tuple[torch.Tensor, ...]]]
    """(x2d, params, spec) -> (y, residuals of saved="preact"): the "inputs" policy's recompute"""
    grouped_tiles: Callable[[list[tuple[int, int]], int, MLPSpec], TileConfig | GroupedTiles | None]
    """(each weight gradient's (M, N), K, spec) -> tiles for one grouped launch (Mosaic GPU's
    with each product's width: common.tiling.GroupedTiles), or None"""
    weight_gradient: Callable[[torch.Tensor, torch.Tensor, MLPSpec], torch.Tensor]
    """(h, dZ, spec) -> hᵀ·dZ"""
    input_gradient: Callable[..., torch.Tensor]
    """(dZ, W, spec, epilogue=, z=, activation=) -> dZ·Wᵀ, the act' step in its epilogue"""
    grouped: Callable[..., Sequence[torch.Tensor]]
    """(hs, dZs, tiles, spec) -> every hᵢᵀ·dZᵢ from one launch"""


def run_step(
    dy2d: torch.Tensor,
    residuals: tuple[torch.Tensor, ...] | list[torch.Tensor | None],
    params: Mapping[str, torch.Tensor],
    spec: MLPSpec,
    kernels: StepKernels,
    *,
    saved: str,
    need_dx: bool = True,
    grouped: TileConfig | GroupedTiles | None = None,
) -> dict[str, torch.Tensor | None]:
    """backward.mlp_backward's result (same arguments, names and layouts) from `kernels`. Trusts
    input: the caller checked that they take this step.

    The weight gradients run apart, each after its dZ, or — where `kernels.grouped_tiles` has
    measured tiles for them, or `grouped` gives tiles — all together at the end, one grouped
    launch, which keeps every layer's h and dZ until then. A `residuals` list is consumed (each
    entry None after its last use), as backward.mlp_backward consumes it."""
    check_saved(saved)
    if saved == "inputs":
        _, residuals = kernels.saving_forward(residuals[0], params, spec)
    res = residuals if isinstance(residuals, list) else list(residuals)  # consumed, as there
    del residuals
    layers = spec.layers()
    m = dy2d.shape[0]
    if grouped is None and len(layers) > 1:
        widths = [packed_width(la.d_out) if la.gated else la.d_out for la in reversed(layers)]
        products = [(la.d_in, w) for la, w in zip(reversed(layers), widths, strict=True)]
        grouped = kernels.grouped_tiles(products, m, spec)
    pending: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (name, h, dZ) to group
    grads: dict[str, torch.Tensor | None] = {"x": None}
    top = layers[-1]
    if portable._stores_preact(top):  # no GEMM before it: backward.py's elementwise act' step
        cfg = portable._config(
            spec, "gated" if top.gated else "linear_act", m, top.d_out, top.d_in, None
        )
        top_z = res[-1]
        dz = portable.dact_fwd(dy2d, top_z, activation=top.activation, gated=top.gated, config=cfg)
        del top_z
    else:
        dz = dy2d
    res[-1] = None
    for layer in reversed(layers):
        i = layer.index
        wname, bname = (f"wv{i}", f"bc{i}") if layer.gated else (f"w{i}", f"b{i}")
        w = params[wname]
        if grouped is None:
            grads[wname] = kernels.weight_gradient(res[2 * i], dz, spec).to(w.dtype)
        else:
            pending.append((wname, res[2 * i], dz))
        prev = layers[i - 1] if i > 0 else None
        # h_i: read by this weight gradient and, after a relu layer, by its act' step below
        out = res[2 * i] if prev is not None and portable._dact_from_output(prev) else None
        res[2 * i] = None
        if layer.bias:
            grads[bname] = dz.sum(0, dtype=torch.float32).to(params[bname].dtype)
        if i == 0 and not need_dx:
            break
        # dh = dZ·Wᵀ, with the previous layer's act' step in the epilogue (dh is its dout)
        if prev is None or not (portable._stores_preact(prev) or out is not None):
            dz = kernels.input_gradient(dz, w, spec)
        else:
            epilogue = "dact_gated" if prev.gated else "dact"
            z = out if out is not None else res[2 * i - 1]
            dz = kernels.input_gradient(
                dz, w, spec, epilogue=epilogue, z=z, activation=prev.activation
            )
            res[2 * i - 1] = z = out = None  # z_{i-1} (or relu's h_i): read by this epilogue only
        if i == 0:
            grads["x"] = dz
    if pending:
        names, hs, dzs = zip(*pending, strict=True)
        pending.clear()
        dws = kernels.grouped(hs, dzs, grouped, spec)
        grads.update((n, dw.to(params[n].dtype)) for n, dw in zip(names, dws, strict=True))
    return {"x": grads["x"], **{k: grads[k] for k in packed_names(spec)}}


# ---- this module's kernels for `run_step` (module globals looked up per call: tests pin them) ---
def _saving_forward(
    x2d: torch.Tensor, params: Mapping[str, torch.Tensor], spec: MLPSpec
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    return portable.forward_saving(x2d, params, spec, saved="preact", hopper=True)


def _grouped_tiles(products: list[tuple[int, int]], m: int, spec: MLPSpec) -> TileConfig | None:
    return grouped_config(products, m, spec.dtype)


def _weight_gradient(h: torch.Tensor, dz: torch.Tensor, spec: MLPSpec) -> torch.Tensor:
    return _gemm(h.t(), dz, spec, weight_gradient=True)  # hᵀ: a view, read M-major in place


def _input_gradient(
    dz: torch.Tensor, w: torch.Tensor, spec: MLPSpec, **epilogue: Any
) -> torch.Tensor:
    return _gemm(dz, w.t(), spec, weight_gradient=False, **epilogue)  # Wᵀ: K-major in place


def _grouped(
    hs: Sequence[torch.Tensor], dzs: Sequence[torch.Tensor], config: TileConfig, spec: MLPSpec
) -> tuple[torch.Tensor, ...]:
    hts = [h.t() for h in hs]
    return linear_grouped(hts, dzs, config=config, fp32_precision=spec.fp32_precision)


TMA_KERNELS = StepKernels(
    _saving_forward, _grouped_tiles, _weight_gradient, _input_gradient, _grouped
)


def mlp_backward(
    dy2d: torch.Tensor,
    residuals: tuple[torch.Tensor, ...] | list[torch.Tensor | None],
    params: Mapping[str, torch.Tensor],
    spec: MLPSpec,
    *,
    saved: str,
    need_dx: bool = True,
    grouped: TileConfig | None = None,
) -> dict[str, torch.Tensor | None]:
    """backward.mlp_backward's result (same arguments, same names and layouts) from the TMA GEMMs
    (`run_step` on `TMA_KERNELS`). Trusts input: the caller checked `unsupported_reason(spec, M)`.
    `grouped`: tiles for the weight gradients' one grouped launch (else the committed table's
    `grouped_config`, else apart)."""
    return run_step(
        dy2d, residuals, params, spec, TMA_KERNELS, saved=saved, need_dx=need_dx, grouped=grouped
    )


# The asked impls whose training runs this backward on Hopper: `auto` and the Hopper kernels,
# named (triton_tma is not registered `hopper`: elsewhere it falls back to the portable kernels,
# and until 38cf758 an explicit triton_tma trained on backward.py's pointer kernels, measured
# 1.15-1.24× slower on an H100).
IMPLS = ("auto", "triton_tma", "mosaic")


def applies(impl: str, spec: MLPSpec, m: int, device: torch.device | str) -> bool:
    """Whether the training op's backward can run here (front.hopper_route asks it after the
    Mosaic GPU step's `applies`): a Hopper GPU (not the interpreter), an asked impl in IMPLS (an
    explicit portable impl keeps its own backward, so the two can be compared), and every
    operand meeting the 16-byte rule."""
    from ..front import _is_hopper

    if impl not in IMPLS or INTERPRET or torch.device(device).type != "cuda":
        return False
    if not _is_hopper():
        return False
    return unsupported_reason(spec, m) is None
