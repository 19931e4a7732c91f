"""linear_act on Mosaic GPU: y = act(x·W + b) (+ residual), the epilogue fused after wgmma.

    y[m, n] = act(Σ_k x[m, k]·W[k, n] + b[n]) + r[m, n]      (fp32 epilogue, rounded once)

Grid: persistent, one CUDA block per SM walking the BLOCK_M × BLOCK_N output tiles in grouped,
snaking order; per tile a TMA → shared memory → wgmma pipeline over K, warp-specialised (one
memory warpgroup, two compute warpgroups that split the tile) or on one warpgroup
(`pipeline.persistent_matmul`, the module table in pipeline.py). The epilogue, per 64-row ×
`epi_n` slice of a compute warpgroup's fp32 accumulator, adds the bias, applies the activation,
adds the residual (loaded by TMA into the slice's output staging slot), casts, and stores the slice
by TMA from one of two staging slots. Ragged M, N, K: TMA zero-fills and clips, nothing is padded.
`linear_act_fwd` also serves training (jax_impl/mosaic/backward.py): it reads x as its transpose
stored [K, M] (`x_kmajor`) and w as its transpose stored [N, K] (`w_kmajor`) in place — the
backward's hᵀ·dZ and dZ·Wᵀ (`pipeline.Operands`) —, fuses the previous layer's act' step into
its epilogue (`epilogue="dact"`/`"dact_gated"`) and stores the pre-activation for the backward
(`store_preact`), on the cooperative and the ping-pong kernels alike.

Sibling, not twin: jax_impl/linear_act.py (Pallas-Triton) and torch_impl/linear_act.py (Triton)
export the same names; the dispatcher picks this module for impl "pallas_mosaic"; its Hopper
Triton counterpart is torch_impl/tma/linear_act.py. fp16/bf16 only, K and N multiples of 8
(TMA's 16-byte strides); other inputs raise NotImplementedError naming the fallback. Without a GPU
the kernel runs under the Mosaic GPU interpreter (`interpret=None` picks it).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ...common.config import TileConfig
from ...common.packing import PACK_BLOCK, packed_width
from ...common.validate import check_layer
from .. import compat
from ..activations import (
    activation_and_grad,
    apply_activation,
    apply_activation_grad,
    round_to_dtype,
)
from ..compat import interpret_mode
from ..front import ADAPTER
from . import pipeline
from .pipeline import EPI_M, Operands, Outputs, Product, Tiles, persistent_matmul, row_vector

FAMILY = "linear_act"
P = PACK_BLOCK
EPILOGUES = ("none", "dact", "dact_gated")  # jax_impl/backward.py's, the input gradient's


# ==== forward kernel ==============================================================================
def _linear_act_fwd_kernel(
    *refs: Any,
    activation: str,
    has_bias: bool,
    has_residual: bool,
    tiles: Tiles,
    interpret: bool,
    operands: Operands = pipeline.AS_STORED,
    epilogue_kind: str = "none",
    dact_activation: str = "identity",
    outputs: Outputs = pipeline.PLAIN_OUTPUT,
    over_z: bool = False,
) -> None:
    store_preact = outputs.preact
    x_gmem, w_gmem, *rest = refs
    b_gmem = rest.pop(0) if has_bias else None
    r_gmem = rest.pop(0) if has_residual else None  # the residual, or the act' step's saved z
    if over_z:  # the output is z's buffer: each tile stored where its z was read
        rest.insert(0, r_gmem)
    o_gmem, z_gmem = rest if store_preact else (rest[0], None)
    dtype = o_gmem.dtype
    epi_n = tiles.epi_n

    def epilogue(
        acc: jax.Array, b_ref: Any, rows: slice, en: int, o_slot: Any, z_slot: Any
    ) -> None:
        # 3. compute, in fp32 on one 64 × epi_n slice of the accumulator, rounded once
        y = acc[rows, en * epi_n : (en + 1) * epi_n]
        if epilogue_kind == "dact":  # dout ⊙ act'(z), z (or relu's output) loaded into o_slot
            z = o_slot[...].astype(jnp.float32)
            d = apply_activation_grad(z, dact_activation, fast=pipeline.APPROX_MATH)
            o_slot[...] = round_to_dtype(y * d, dtype, interpret)
            return
        if epilogue_kind == "dact_gated":
            _dact_gated(y, o_slot)
            return
        # y = act(acc + b) + r (the pre-activation acc + b to z_slot where it is kept)
        if b_ref is not None:
            y = y + row_vector(b_ref.at[pl.ds(en * epi_n, epi_n)], EPI_M, interpret=interpret)
        if z_slot is not None:
            z_slot[...] = round_to_dtype(y, dtype, interpret)
        y = apply_activation(y, activation, fast=pipeline.APPROX_MATH)
        if has_residual:  # the driver loaded the residual slice into o_slot
            y = y + o_slot[...].astype(jnp.float32)
        o_slot[...] = round_to_dtype(y, dtype, interpret)

    def _dact_gated(dout: jax.Array, o_slot: Any) -> None:
        # the previous (gated) layer's act' step: per 64-column block j of dout, its packed pair
        # of the saved [z|g] (loaded into the doubled o_slot) -> dz = dout ⊙ g ⊙ act'(z),
        # dg = dout ⊙ act(z), written back over it: the packed [dz|dg] (jax_impl/backward.py's
        # `_dact_epilogue`). Padded columns: dout and the saved pair are exact zeros there.
        for j in range(epi_n // P):
            d = dout[:, j * P : (j + 1) * P]
            z_ref, g_ref = o_slot.at[:, pl.ds(2 * j * P, P)], o_slot.at[:, pl.ds(2 * j * P + P, P)]
            z, g = z_ref[...].astype(jnp.float32), g_ref[...].astype(jnp.float32)
            # act(z) and act'(z) from one tanh/sigmoid/erfc (`activation_and_grad`): the
            # epilogue's transcendental work is its largest cost after the bytes
            act, act_grad = activation_and_grad(z, dact_activation, fast=pipeline.APPROX_MATH)
            dz = d * g * act_grad
            dg = d * act
            z_ref[...] = round_to_dtype(dz, dtype, interpret)
            g_ref[...] = round_to_dtype(dg, dtype, interpret)

    # 1. program -> tile, 2. load, 4. store: the shared persistent driver
    persistent_matmul(
        x_gmem, w_gmem, b_gmem, r_gmem, o_gmem, tiles=tiles, epilogue=epilogue,
        operands=operands, outputs=outputs, z_gmem=z_gmem,
    )  # fmt: skip


# ==== launcher ====================================================================================
def linear_act_fwd(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None,
    residual: jax.Array | None,
    *,
    activation: str,
    config: TileConfig,
    fp32_precision: str = "ieee",
    interpret: bool | None = None,
    x_kmajor: bool = False,
    w_kmajor: bool = False,
    epilogue: str = "none",
    z: jax.Array | None = None,
    dact_activation: str = "identity",
    store_preact: bool = False,
    staging_slots: int = 2,
    overwrite_z: bool = False,
) -> Any:
    """act(x @ w + b) (+ residual) for 2-D x [M, K], w [K, N]; returns [M, N] in x.dtype.

    One kernel call on the operands as they are (TMA handles ragged edges; M ≥ 8 not a multiple
    of 8 is padded, `pipeline.padded_extents`); M = 0 returns an empty array without a launch.
    fp32_precision is taken for the twins' signature: 16-bit products are exact in the fp32
    accumulator. `x_kmajor`: x is given as its transpose [K, M] and read in place (hᵀ of a
    weight gradient); `w_kmajor`: w as its transpose [N, K] (Wᵀ of an input gradient)
    (`pipeline.Operands`).

    The backward's forms (no bias, activation or residual with an act' step): `epilogue`
    "dact" returns acc ⊙ act'(z) for the saved z [M, N] (for relu z is the layer's output h:
    relu' of h is relu' of z, NaN kept); "dact_gated" the packed [dz|dg]
    [M, packed_width(N)] from the saved packed [z|g] (`dact_activation` is act; jax_impl/
    backward.py's `_dact_epilogue`, applied to the fp32 accumulator and rounded once).
    `overwrite_z` (an act' epilogue): the result takes z's buffer, each tile stored where its z
    tile was read (`pipeline.launch`'s over_last; jax >= 0.11, else ignored): XLA aliases the two
    where nothing reads z after this call — the backward's saved z, 448 MiB at llama3-8b, dies
    here — and copies z first where something does, so z itself is never changed.
    `store_preact` (the saving forward): returns (y, z) with z = x @ w + b [M, N] as well.
    `staging_slots`: 1 halves the epilogue's shared memory where its staging is wide
    (`pipeline.Outputs.slots`; mosaic/backward.py's `fitted_config` chooses).
    """
    del fp32_precision
    if interpret is None:
        interpret = interpret_mode()
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue: expected one of {EPILOGUES}, got {epilogue!r}")
    dact = epilogue != "none"
    if overwrite_z and not dact:
        raise ValueError(
            f"overwrite_z: writes an act' epilogue's result over its z, expected epilogue "
            f"'dact' or 'dact_gated', got {epilogue!r}"
        )
    if dact and (z is None or b is not None or residual is not None or store_preact):
        raise ValueError(
            f"epilogue {epilogue!r}: expected the saved z and no bias, residual or stored "
            f"pre-activation, got z={'given' if z is not None else None}, "
            f"b={'given' if b is not None else None}, "
            f"residual={'given' if residual is not None else None}, store_preact={store_preact}"
        )
    m, k = x.shape[::-1] if x_kmajor else x.shape
    n = w.shape[0] if w_kmajor else w.shape[1]
    out_n = packed_width(n) if epilogue == "dact_gated" else n
    if m == 0:
        empty = jnp.zeros((0, out_n), x.dtype)
        return (empty, empty) if store_preact else empty
    tiles = pipeline.plan_tiles(config, FAMILY)
    layout = Operands(x_kmajor=x_kmajor, w_kmajor=w_kmajor)
    layout.check(m)
    outputs = Outputs(
        scale=2 if epilogue == "dact_gated" else 1, preact=store_preact, slots=staging_slots
    )
    outputs.check(tiles)
    mp, np_, kp = pipeline.padded_extents(m, n, k, tiles, interpret)
    # the doubled output's padded width: whole 2·64 packed blocks of np_ columns
    out_np = packed_width(np_) if epilogue == "dact_gated" else np_
    operands = [
        pipeline.pad_to(x, (kp, mp) if x_kmajor else (mp, kp)),
        pipeline.pad_to(w, (np_, kp) if w_kmajor else (kp, np_)),
    ]
    if b is not None:
        operands.append(pipeline.pad_to(b, (np_,)))
    if residual is not None or dact:
        operands.append(pipeline.pad_to(z if dact else residual, (mp, out_np)))
    over_z = dact and overwrite_z and compat.mosaic_kernel_aliases_refs()
    kernel = functools.partial(
        _linear_act_fwd_kernel,
        activation=activation,
        has_bias=b is not None,
        has_residual=residual is not None or dact,
        tiles=tiles,
        interpret=interpret,
        operands=layout,
        epilogue_kind=epilogue,
        dact_activation=dact_activation,
        outputs=outputs,
        over_z=over_z,
    )
    name = "linear_act_fwd" if epilogue == "none" else f"linear_act_{epilogue}"
    outs = pipeline.launch(
        kernel, operands, (mp, out_np), x.dtype, tiles, name=name, interpret=interpret,
        outputs=outputs, preact_cols=np_, over_last=over_z,
    )  # fmt: skip
    ys = outs if store_preact else (outs,)
    if (mp, out_np) != (m, out_n):
        ys = tuple(y[:m, : (out_n if i == 0 else n)] for i, y in enumerate(ys))
    return ys if store_preact else ys[0]


# ==== grouped products (the weight gradients of a training step) ==================================
def _linear_grouped_kernel(
    *refs: Any, product_tiles: Sequence[Tiles], interpret: bool, operands: Operands
) -> None:
    count = len(product_tiles)
    ins, outs = refs[: 2 * count], refs[2 * count :]
    products = [
        Product(ins[2 * g], ins[2 * g + 1], outs[g], tiles=product_tiles[g]) for g in range(count)
    ]
    dtype, epi_n = outs[0].dtype, product_tiles[0].epi_n  # one epi_n: pipeline.check_widths

    def epilogue(
        acc: jax.Array, b_ref: Any, rows: slice, en: int, o_slot: Any, z_slot: Any
    ) -> None:
        del b_ref, z_slot  # 3. compute: the fp32 product, rounded once
        o_slot[...] = round_to_dtype(acc[rows, en * epi_n : (en + 1) * epi_n], dtype, interpret)

    pipeline.grouped_matmul(
        products, tiles=product_tiles[0], epilogue=epilogue, operands=operands, interpret=interpret
    )


def linear_grouped(
    xs: Sequence[jax.Array],
    ws: Sequence[jax.Array],
    *,
    config: TileConfig,
    widths: Sequence[int] | None = None,
    interpret: bool | None = None,
    x_kmajor: bool = False,
    w_kmajor: bool = False,
) -> tuple[jax.Array, ...]:
    """The products xs[g] @ ws[g] (no bias or activation) in ONE persistent launch whose grid
    walks all their output tiles as one list (`pipeline.grouped_matmul`); returns them in xs'
    dtype. The products share K; `x_kmajor` / `w_kmajor` read every x / w transposed, as
    `linear_act_fwd` does — the training step's weight gradients hᵢᵀ·dZᵢ, which all contract
    over the batch (jax_impl/mosaic/backward.py's `mlp_backward`, `grouped_config`).

    Why: one of them alone leaves the last wave of the grid part empty (few output tiles, a
    long K); launched together their tiles fill the waves (`grouped_matmul`'s docstring).
    `widths`: each product's block_n (None: config's for all) — tiles of different widths fill
    the waves more evenly (`pipeline.plan_widths`). `config` must be warp-specialised
    (cooperative or ping-pong); ValueError otherwise, or when the products do not share K and
    dtype, or `widths` is not one a product or a width cannot be; NotImplementedError where
    `pipeline.unsupported_reason` refuses a product (float32; K or N not a multiple of 16)."""
    if interpret is None:
        interpret = interpret_mode()
    if not xs or len(xs) != len(ws):
        raise ValueError(
            f"xs, ws: expected as many (at least one) of each, got {len(xs)} and {len(ws)}"
        )
    widths = [config.block_n] * len(xs) if widths is None else list(widths)
    if len(widths) != len(xs):
        raise ValueError(f"widths: expected one a product ({len(xs)}), got {widths}")
    dims = [
        (*(x.shape[::-1] if x_kmajor else x.shape), w.shape[0] if w_kmajor else w.shape[1])
        for x, w in zip(xs, ws, strict=True)
    ]  # (M, K, N) of each product
    if len({k for _, k, _ in dims}) != 1 or len({a.dtype for a in (*xs, *ws)}) != 1:
        raise ValueError(
            f"xs, ws: expected one K and one dtype, got (M, K, N) {dims} and dtypes "
            f"{sorted({str(a.dtype) for a in (*xs, *ws)})}"
        )
    if not config.warp_specialize:
        raise ValueError(
            f"config.warp_specialize: the grouped kernel has a memory warpgroup, expected True, "
            f"got {config}"
        )
    for m, k, n in dims:  # float32, or rows the swizzled TMA tiles cannot cut: refused by name
        reason = pipeline.unsupported_reason(m, n, k, str(xs[0].dtype))
        if reason is not None:
            raise NotImplementedError(f"linear_grouped: {reason}")
    dtype = xs[0].dtype
    all_tiles = pipeline.plan_widths(config, widths, FAMILY, str(dtype))
    empty = {g for g, dim in enumerate(dims) if 0 in dim}  # no launch for an empty product
    layout = Operands(x_kmajor=x_kmajor, w_kmajor=w_kmajor)
    operands, padded, product_tiles = [], [], []
    for g, (m, k, n) in enumerate(dims):
        if g in empty:
            continue
        layout.check(m)
        mp, np_, kp = pipeline.padded_extents(m, n, k, all_tiles[g], interpret)
        operands += [
            pipeline.pad_to(xs[g], (kp, mp) if x_kmajor else (mp, kp)),
            pipeline.pad_to(ws[g], (np_, kp) if w_kmajor else (kp, np_)),
        ]
        padded.append((mp, np_))
        product_tiles.append(all_tiles[g])
    launched = iter(())
    if padded:
        kernel = functools.partial(
            _linear_grouped_kernel, product_tiles=product_tiles, interpret=interpret,
            operands=layout,
        )  # fmt: skip
        outs = pipeline.launch_grouped(
            kernel, operands, padded, dtype, product_tiles, name="linear_grouped",
            interpret=interpret,
        )  # fmt: skip
        launched = iter(outs)
    return tuple(
        jnp.zeros((m, n), dtype) if g in empty else next(launched)[:m, :n]
        for g, (m, _, n) in enumerate(dims)
    )


# ==== public function =============================================================================
def linear_act(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None = None,
    *,
    activation: str = "identity",
    residual: jax.Array | None = None,
    config: TileConfig | None = None,
    fp32_precision: str = "ieee",
    interpret: bool | None = None,
) -> jax.Array:
    """act(x @ w + b) (+ residual) for x [..., K], w [K, N], b [N]; returns [..., N] in x.dtype.
    `interpret`: run under the Mosaic GPU interpreter (None: where there is no GPU)."""
    dtype, k, n = check_layer(
        ADAPTER,
        x,
        w,
        b,
        residual=residual,
        activation=activation,
        config=config,
        fp32_precision=fp32_precision,
        impl="pallas_mosaic",
    )
    interpret = interpret_mode() if interpret is None else interpret
    lead = x.shape[:-1]
    m = math.prod(lead)
    x2d = x.reshape(m, k)
    reason = pipeline.unsupported_reason(m, n, k, dtype)
    if reason is not None:
        raise NotImplementedError(reason)
    if config is None:
        config = pipeline.default_config(FAMILY, m, n, k, dtype, interpret=interpret)
    pipeline.check_config(config, dtype, num_weights=1, residual=residual is not None)
    r2d = residual.reshape(m, n) if residual is not None else None
    y = linear_act_fwd(
        x2d,
        w,
        b,
        r2d,
        activation=activation,
        config=config,
        fp32_precision=fp32_precision,
        interpret=interpret,
    )
    return y.reshape(*lead, n)
