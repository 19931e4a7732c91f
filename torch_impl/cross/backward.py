"""The Hopper training step from PyTorch: jax_impl/mosaic/backward.py's Mosaic GPU GEMMs on torch
tensors (impl `mosaic`, Hopper GPU only).

The same step as torch_impl/tma/backward.py — the saving forward storing each pre-activation
from its epilogue, then per layer in reverse dW_i = h_iᵀ·dZ_i, db_i = Σ_m dZ_i and
dZ_{i-1} = (dZ_i·W_iᵀ) ⊙ act'(z_{i-1}) with the act' step in the input gradient's epilogue, the
weight gradients in one grouped launch where the committed sweep measured that faster — with
every GEMM the Mosaic GPU kernel that JAX's step runs (tiles from jax_impl/mosaic/backward.py's
`fitted_config` and `grouped_config`, the JAX step's table), called from torch as the forward's
`mosaic` route is (cross/linear_act.py: one bare Mosaic GPU call per traced function, compiled
as as_torch_kernel compiles it, cached per shape, launched on the current stream). Residuals, names,
layouts and roundings are backward.py's, so `fusedmlp::mlp_backward` takes them as it takes the
Triton kernels'.

Why: per kernel the Mosaic GPU sibling runs the step's GEMMs faster than the Triton TMA ones —
its ping-pong puts one tile's epilogue (the act' step reads a saved [z|g] tile and writes two)
under the other warpgroup's K loop, which triton 3.6 cannot express (docs/performance.md,
twenty-ninth session: hf-blog-geglu at M = 8192 on the H200, torch / JAX µs, act' step 152 / 121,
weight gradients 178 / 162, layer 0 input gradient 113 / 100, saving forward 148 / 138, down
projection 60 / 52; the whole step 651 / 573).

Two differences from the JAX step, both torch's rules: the act' step's result is a new tensor
(the saved z is an input of the backward op, declared unmutated: tma/backward.py says why), and
torch reduces the bias gradients (`torch.sum` in fp32, deterministic). Only the top layer's act'
step, which has no GEMM before it, runs backward.py's elementwise Triton `dact_fwd` (every
preset's top layer is identity: none).

Where: `applies` — the asked impl is `mosaic`, or `auto` whose forward plan runs a Hopper GEMM
kernel (`mosaic` or `triton_tma`: trained, these GEMMs were faster at every size measured, see
AUTO_FORWARDS) — in a CUDA graph too, which records the launches (cross/launcher.py) — on a
Hopper GPU with jax >= 0.11.1, and every GEMM meets Mosaic GPU's constraints
(`jax_impl.mosaic.backward.unsupported_reason`: M a multiple of 16, so no launcher pads and each
traced function is the bare kernel call). Elsewhere tma/backward.py's Triton kernels train (an
explicit triton_tma always: the two can be compared).

No interpreter runs this route (the kernels need the GPU): the CPU tests lower every traced
function for CUDA and run as_torch_kernel's own module check and the direct launcher's plan on
it; `pytest -m gpu` checks the gradients against the float64 reference and, bit for bit, against
the JAX step's, eagerly and replayed from a CUDA graph.

Sibling: torch_impl/tma/backward.py (the Triton step, same structure and names); twin of the
kernels: jax_impl/mosaic/backward.py, whose functions this module calls for tiles and traces.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from fusedmlp.common.config import TileConfig
from fusedmlp.common.registry import AUTO
from fusedmlp.common.spec import MLPSpec
from fusedmlp.common.tiling import GroupedTiles

from .. import backward as portable
from .. import front, runtime
from ..tma.backward import StepKernels, run_step
from .linear_act import (
    IMPL,
    MOSAIC_PACKAGE,
    _launch,
    _usable,
    as_torch_kernel,
    compiled_kernel,
    unavailable_reason,
)

FAMILY = "backward"


@functools.cache
def _mosaic(name: str) -> Any:
    """jax_impl/mosaic's module `name` (backward, pipeline, gated, linear_act): imports jax, as
    new as as_torch_kernel needs (its launch convention), its client not preallocating."""
    as_torch_kernel()
    return importlib.import_module(f"{MOSAIC_PACKAGE}.{name}")


def _outputs(**kw: Any) -> Any:
    return _mosaic("pipeline").Outputs(**kw)


# The JAX step decides its tiles once, at trace time; a torch step runs eagerly, so the same
# decisions (pure Python: ~20 µs for a fitted config, ~6 µs for the step's rule) are cached per
# shape here instead of paid at every step.
@functools.lru_cache(maxsize=1024)
def _fitted(family: str, m: int, n: int, k: int, dtype: str, outputs: Any, **kw: Any) -> Any:
    """mosaic/backward.py's `fitted_config`: (tiles, outputs with their staging slots)."""
    return _mosaic("backward").fitted_config(family, m, n, k, dtype, outputs, interpret=False, **kw)


@functools.lru_cache(maxsize=1024)
def _default(family: str, m: int, n: int, k: int, dtype: str) -> TileConfig:
    """pipeline.default_config: the inference forward's tiles."""
    return _mosaic("pipeline").default_config(family, m, n, k, dtype)


@functools.lru_cache(maxsize=256)
def _grouped_tiles(products: tuple[tuple[int, int], ...], m: int) -> GroupedTiles | None:
    """mosaic/backward.py's `grouped_config`: the weight gradients' grouped tiles, or None."""
    return _mosaic("backward").grouped_config(list(products), m, interpret=False)


@functools.lru_cache(maxsize=256)
def _fits(spec: MLPSpec, m: int) -> bool:
    return unsupported_reason(spec, m) is None


def clear_caches() -> None:
    """Forget the cached tile decisions and modules (the tests, which change the JAX step's tile
    rules; jax_impl/mosaic/backward.py caches its tables apart)."""
    for cached in (_fitted, _default, _grouped_tiles, _fits, _mosaic):
        cached.cache_clear()


# ==== where it runs ===============================================================================
def unsupported_reason(spec: MLPSpec, m: int) -> str | None:
    """jax_impl/mosaic/backward.py's rule (imports jax): None where every GEMM of the step can
    run on Mosaic GPU at M = m."""
    return _mosaic("backward").unsupported_reason(spec, m)


# The forward plans whose training `auto` sends here: the Hopper GEMM kernels. Trained, the Mosaic
# GPU step was faster than the Triton one wherever both were measured, bf16, M = 8192 — H100,
# fbb09be (this route against the Triton step in one run): hf-blog-geglu 609.9 against 663.5 µs,
# llama3-8b 11.957 against 12.423 ms; H200, aafb917: the JAX step (these kernels) 573 against the
# Triton step's 651 µs, 12.71 against 13.00 ms — so `auto` trains here for a triton_tma forward
# too; an explicit triton_tma keeps its own step.
AUTO_FORWARDS = ("triton_tma", IMPL)


MOSAIC_DTYPES = ("float16", "bfloat16")  # wgmma's 16-bit inputs (pipeline.SUPPORTED_DTYPES)


def applies(impl: str, planned: str, spec: MLPSpec, m: int, device: torch.device | str) -> bool:
    """Whether a training call trains here: `impl` asked, `planned` the forward plan's choice.
    `mosaic` asked; or `auto` whose forward runs a Hopper GEMM kernel (`AUTO_FORWARDS`, also while
    a CUDA graph is prepared: the launches record, cross/launcher.py); on a Hopper GPU, with jax
    able to run there (`unavailable_reason`: asked once a process), M a positive multiple of 16
    and every GEMM within Mosaic GPU's rules. front.hopper_route asks this before
    tma/backward.py's `applies`, which such a call falls back to where this is False."""
    asked = impl == IMPL
    chosen = impl == AUTO and planned in AUTO_FORWARDS
    if not (asked or chosen):
        return False
    if runtime.INTERPRET or torch.device(device).type != "cuda" or not front._is_hopper():
        return False
    # the cheap refusals first: no jax import for a float32 spec or an M Mosaic GPU cannot take
    # (M = 0: no kernel to call, and as_torch_kernel needs one)
    if spec.dtype not in MOSAIC_DTYPES or m <= 0 or m % 16:
        return False
    return unavailable_reason() is None and _fits(spec, m)


# ==== traced functions (each one bare Mosaic GPU call) ============================================
@functools.cache
def _forward_function(
    gated: bool, activation: str, n: int, has_bias: bool, has_residual: bool,
    config: TileConfig, slots: int, store_preact: bool,
) -> Callable[..., Any]:  # fmt: skip
    """One layer's forward: with `store_preact` the saving forward ((y, its pre-activation) from
    one launch), else the inference forward's kernel (a layer that keeps no pre-activation)."""
    gated_mod, linear_mod = _mosaic("gated"), _mosaic("linear_act")

    def fn(x: Any, w: Any, *rest: Any) -> Any:
        rest = list(rest)
        b = rest.pop(0) if has_bias else None
        r = rest.pop(0) if has_residual else None
        if gated:
            return gated_mod.gated_fwd(
                x, w, b, n=n, activation=activation, config=config, interpret=False,
                store_preact=store_preact, staging_slots=slots,
            )  # fmt: skip
        return linear_mod.linear_act_fwd(
            x, w, b, r, activation=activation, config=config, interpret=False,
            store_preact=store_preact, staging_slots=slots,
        )  # fmt: skip

    what = "saving" if store_preact else "fwd"
    fn.__name__ = f"{'gated' if gated else 'linear_act'}_{what}_{activation}"
    return fn


@functools.cache
def _gemm_function(
    x_kmajor: bool, w_kmajor: bool, epilogue: str, activation: str, config: TileConfig,
    slots: int,
) -> Callable[..., Any]:  # fmt: skip
    """One GEMM of the backward: a weight gradient hᵀ·dZ (x_kmajor: h read in place) or an
    input gradient dZ·Wᵀ (w_kmajor: W read in place), with an act' step where `epilogue` says."""
    linear_mod = _mosaic("linear_act")

    def fn(a: Any, b: Any, *rest: Any) -> Any:
        z = rest[0] if rest else None
        return linear_mod.linear_act_fwd(
            a, b, None, None, activation="identity", config=config, interpret=False,
            x_kmajor=x_kmajor, w_kmajor=w_kmajor, epilogue=epilogue, z=z,
            dact_activation=activation, staging_slots=slots,
        )  # fmt: skip

    fn.__name__ = f"gemm_{epilogue}_{activation}"
    return fn


@functools.cache
def _grouped_function(count: int, tiles: GroupedTiles) -> Callable[..., Any]:
    """Every layer's weight gradient hᵢᵀ·dZᵢ in one grouped launch."""
    linear_mod = _mosaic("linear_act")

    def fn(*operands: Any) -> Any:
        hs, dzs = operands[:count], operands[count:]
        return linear_mod.linear_grouped(
            hs, dzs, config=tiles.config, widths=tiles.widths, interpret=False, x_kmajor=True
        )

    fn.__name__ = f"grouped_{count}"
    return fn


def _call(key: tuple, make: Callable[[], Callable[..., Any]], operands: list[torch.Tensor]) -> Any:
    """The compiled kernel of `key` launched on `operands` — each dense at a 16-byte aligned
    address (as_torch_kernel reads data_ptr(); the Mosaic GPU runtime aborts the process where TMA
    refuses a base address), copied where not. `applies` leaves no launcher anything to pad, so
    the result is the kernel's as it is."""
    operands = [
        t if _usable(t) else t.clone(memory_format=torch.contiguous_format) for t in operands
    ]
    kernel = compiled_kernel((FAMILY, *key), make, operands)
    return _launch(kernel, operands, operands[0].device)


# ==== the step ====================================================================================
def forward_saving(
    x2d: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    spec: MLPSpec,
    *,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """backward.forward_saving's result for saved="preact" (same residuals and layouts: h_0 = x2d,
    z_0, h_1, …; [M, 0] where a layer keeps no z) from the Mosaic GPU forward kernels, each
    layer's pre-activation stored by its epilogue. Trusts input: the caller checked `applies`."""
    pipeline = _mosaic("pipeline")
    layers = spec.layers()
    last = layers[-1].index
    h = x2d
    kept: list[torch.Tensor] = [x2d]
    for layer in layers:
        i, m = layer.index, h.shape[0]
        store = portable._stores_preact(layer)
        family = "gated" if layer.gated else "linear_act"
        w = params[f"wv{i}"] if layer.gated else params[f"w{i}"]
        b = params.get(f"bc{i}") if layer.gated else params.get(f"b{i}")
        r = residual if (i == last and not layer.gated) else None
        operands = [h, w] + [t for t in (b, r) if t is not None]
        flags = (layer.gated, layer.activation, layer.d_out, b is not None, r is not None)
        if store:
            cfg, outputs = _fitted(
                family, m, layer.d_out, layer.d_in, spec.dtype, _outputs(preact=True)
            )
            h, z = _call(
                ("saving", *flags, cfg, outputs.slots),
                lambda f=flags, c=cfg, s=outputs.slots: _forward_function(*f, c, s, True),
                operands,
            )
        else:
            cfg = _default(family, m, layer.d_out, layer.d_in, spec.dtype)
            slots = pipeline.PLAIN_OUTPUT.slots
            h = _call(
                ("plain", *flags, cfg, slots),
                lambda f=flags, c=cfg, s=slots: _forward_function(*f, c, s, False),
                operands,
            )
            z = h.new_empty((m, 0))
        if layer.gated and i == last and residual is not None:  # no preset has one; kept exact
            h = h + residual
        kept += [z, h] if i != last else [z]
    return h, tuple(kept)


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
    """a·b on the Mosaic GPU kernel: a weight gradient hᵀ·dZ (`a` is h [M, K], read M-major) or
    an input gradient dZ·Wᵀ (`b` is W [K, N], read K-major), with the previous layer's act' step
    in the epilogue where `epilogue` says (mosaic/backward.py's `_gemm`, on torch tensors)."""
    pipeline = _mosaic("pipeline")
    m, k = a.shape[::-1] if weight_gradient else a.shape
    n = b.shape[1] if weight_gradient else b.shape[0]
    outputs = _outputs(scale=2 if epilogue == "dact_gated" else 1)
    operands_layout = pipeline.Operands(x_kmajor=weight_gradient, w_kmajor=not weight_gradient)
    cfg, outputs = _fitted(
        "linear_act", m, n, k, spec.dtype, outputs, operands=operands_layout, epilogue=epilogue
    )
    flags = (weight_gradient, not weight_gradient, epilogue, activation, cfg, outputs.slots)
    operands = [a, b] + ([z] if z is not None else [])
    return _call(("gemm", *flags), lambda: _gemm_function(*flags), operands)


def _grouped(
    hs: Sequence[torch.Tensor],
    dzs: Sequence[torch.Tensor],
    tiles: TileConfig | GroupedTiles,
    spec: MLPSpec,
) -> tuple[torch.Tensor, ...]:
    """Every hᵢᵀ·dZᵢ from one grouped launch (h read M-major in place)."""
    count, tiles = len(hs), GroupedTiles.of(tiles)
    out = _call(("grouped", count, tiles), lambda: _grouped_function(count, tiles), [*hs, *dzs])
    return tuple(out)


# ---- this module's kernels for tma/backward.py's `run_step` (module globals looked up per call) --
def _saving_forward(
    x2d: torch.Tensor, params: Mapping[str, torch.Tensor], spec: MLPSpec
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    return forward_saving(x2d, params, spec)


def _step_grouped_tiles(
    products: list[tuple[int, int]], m: int, spec: MLPSpec
) -> GroupedTiles | None:
    return _grouped_tiles(tuple(products), m)


def _weight_gradient(h: torch.Tensor, dz: torch.Tensor, spec: MLPSpec) -> torch.Tensor:
    return _gemm(h, dz, spec, weight_gradient=True)


def _input_gradient(
    dz: torch.Tensor, w: torch.Tensor, spec: MLPSpec, **epilogue: Any
) -> torch.Tensor:
    return _gemm(dz, w, spec, weight_gradient=False, **epilogue)


MOSAIC_KERNELS = StepKernels(
    _saving_forward, _step_grouped_tiles, _weight_gradient, _input_gradient, _grouped
)


def mlp_backward(
    dy2d: torch.Tensor,
    residuals: list[torch.Tensor | None],
    params: Mapping[str, torch.Tensor],
    spec: MLPSpec,
    *,
    saved: str,
    need_dx: bool = True,
) -> dict[str, torch.Tensor | None]:
    """backward.mlp_backward's result (same arguments, names and layouts) from the Mosaic GPU
    GEMMs: tma/backward.py's `run_step` (the Triton step's orchestration) on `MOSAIC_KERNELS`.
    `residuals` (a list) is consumed: each entry None after its last use. Trusts input: the caller
    checked `applies`."""
    return run_step(dy2d, residuals, params, spec, MOSAIC_KERNELS, saved=saved, need_dx=need_dx)
