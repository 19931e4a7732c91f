"""Hopper backward on Mosaic GPU: backward.py's gradients with every GEMM on the persistent kernel.

Per layer i, in reverse, from dZ_i (the gradient at the layer's pre-activation; gated: the packed
[dz|dg], common/packing.py), the formulas of jax_impl/backward.py:

    dW_i = h_iᵀ·dZ_i        linear_act (identity) with x = h_iᵀ read M-major in place (x_kmajor);
                            every layer's in ONE grouped launch at the end where the committed
                            sweep measured that faster (`grouped_config`; they all contract over
                            the batch, and alone each leaves its last wave part empty)
    db_i = Σ_m dZ_i         one fp32 column sum (an XLA reduction, as torch.sum there), rounded once
    dZ_{i-1} = (dZ_i·W_iᵀ) ⊙ act'(z_{i-1})
                            linear_act with w = W_iᵀ read K-major in place (w_kmajor) and the
                            previous layer's act' step in its epilogue ("dact": the saved z tile
                            loaded by TMA into the output staging slot, as a residual is;
                            "dact_gated": the saved packed [z|g] pair loaded into a doubled slot
                            and overwritten by the packed [dz|dg] — `pipeline.Outputs`), applied
                            to the fp32 accumulator and rounded once, as the portable dgrad does;
                            after a relu layer the epilogue reads its output h_i instead of a z
                            (backward.py's `_dact_from_output`: relu keeps no z); the
                            result takes z's buffer where z dies here (`overwrite_z`: every
                            saved z, and relu's h_i unless a grouped launch still reads it), the
                            step's largest tensor (the packed [z|g]: 448 MiB at llama3-8b)

The saving forward ("preact") runs the Mosaic GPU forward kernels with `store_preact` where a layer
keeps its pre-activation: the epilogue stores it (gated: the packed [z|g]) beside the output, from
the same fp32 values, so the kept tensors are backward.py's (same names, layouts and roundings) and
the output is the inference kernel's, bit for bit; a layer that keeps none (identity, relu) runs the
inference forward's kernel and tiles as they are. Only the last layer's act' step, which has no GEMM
before it, runs backward.py's elementwise `dact_fwd` (every preset's last layer is identity: none).

Why this and not backward.py's kernels on Hopper: those are Pallas-Triton pointer kernels (no TMA,
no wgmma pipeline, no persistent grid), 70-85 % of cuBLAS on the H200: the JAX llama3-8b step at
M = 8192 took 15.43 ms on them against XLA's 13.10 (docs/performance.md, "Training"). The forward
kernels here run at 95-100 % of jax's own Mosaic GPU Hopper matmul.

Tiles of the backward's GEMMs and the pre-activation-storing forwards (`fitted_config`): the
committed sweep's best for the GEMM's kind and shape (tuned_hopper_backward.json, written by
bench/sweep_mosaic_backward.py: ping-pong where an epilogue that reads a saved [z|g] and writes two
tiles would otherwise stall the tensor cores, cooperative where a long K hides it), else the
forward's (`pipeline.default_config`) made cooperative and fitted to the shared memory the extra
staging needs (fewer pipeline slots down to 3, then one staging slot, then half-wide tiles where
half is whole 64-column blocks: not for a 192-wide tile). A pinned `config` is the portable
kernels'; these GEMMs keep their own tiles, as torch_impl/tma/backward.py's do.

Used by the JAX front's custom_vjp on a Hopper GPU when the asked impl is `auto` or `pallas_mosaic`
and every GEMM meets Mosaic GPU's constraints (`unsupported_reason`; M a multiple of 16, since M is
the weight gradients' contraction); otherwise backward.py's portable kernels run. Under the Mosaic
GPU interpreter of jax ≥ 0.11 it runs on the CPU (tests/test_mosaic_backward.py); jax 0.10's
interpreter cannot read an operand transposed (`compat.mosaic_interpreter_transposes`).

Sibling, not twin: torch_impl/tma/backward.py (Triton, tensor descriptors) has this structure and
these names; the Pallas-Triton twin of torch_impl/backward.py is jax_impl/backward.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from ...common import MLPSpec
from ...common.config import TileConfig
from ...common.packing import PACK_BLOCK, packed_names, packed_width
from ...common.registry import AUTO
from ...common.tiling import (
    GROUPED_KIND,
    GroupedTiles,
    measured_here_first,
    shape_bucket,
    step_gemm_kind,
)
from ...common.validate import check_saved
from .. import backward as portable
from .. import compat
from . import gated as mosaic_gated
from . import linear_act as mosaic_linear
from . import pipeline
from .pipeline import AS_STORED, PLAIN_OUTPUT, Operands, Outputs

IMPLS = (AUTO, pipeline.IMPL)  # the asked impls whose training runs this backward on Hopper
TUNED_FILE = Path(__file__).with_name("tuned_hopper_backward.json")


def unsupported_reason(spec: MLPSpec, m: int) -> str | None:
    """None if every GEMM of the training step (saving forward, weight and input gradients) can
    run on the Mosaic GPU kernels at M = m, else why not.

    Per layer (K = d_in, Nc = d_out or the packed 2·Np): the forward x·W [m, Nc, K]; hᵀ·dZ reads
    h transposed, so its rows (K) and its contraction (M) must be multiples of 16 — the swizzled
    TMA tiles' rule that `pipeline.unsupported_reason` applies to K and N; dZ·Wᵀ [m, K, Nc]."""
    for layer in spec.layers():
        width = packed_width(layer.d_out) if layer.gated else layer.d_out
        for what, (rows, n, k) in (
            ("forward", (m, layer.d_out, layer.d_in)),
            ("weight gradient", (layer.d_in, width, m)),
            ("input gradient", (m, layer.d_in, width)),
        ):
            why = pipeline.unsupported_reason(rows, n, k, spec.dtype)
            if why is not None:
                what_k = "M" if what == "weight gradient" else "K"
                return f"layer {layer.index} {what} (its contraction {what_k} = {k}): {why}"
    return None


def applies(impl: str, spec: MLPSpec, m: int) -> bool:
    """Whether a training call's custom_vjp runs this module: a Hopper GPU (not the
    interpreter), an asked impl of `auto` or `pallas_mosaic` (an explicit portable impl keeps
    its own backward, so the two can be compared), every GEMM supported."""
    if impl not in IMPLS or m == 0 or compat.interpret_mode() or not compat.on_hopper():
        return False
    return unsupported_reason(spec, m) is None


def gemm_kind(
    family: str, outputs: Outputs, operands: Operands = AS_STORED, epilogue: str = "none"
) -> str:
    """The tuned table's name for one of the step's GEMMs (common.tiling.step_gemm_kind, the
    torch twin's rule too)."""
    return step_gemm_kind(
        family, preact=outputs.preact, x_kmajor=operands.x_kmajor,
        w_kmajor=operands.w_kmajor, epilogue=epilogue,
    )  # fmt: skip


@functools.cache
def tuned_table() -> dict[str, list[dict[str, Any]]]:
    """The committed sweep's best configs ({kind: [entry, ...]}; empty if none). Entries name the
    GPU they were measured on: the Hopper parts share the SM count and tensor cores, so one table
    serves them (measured on an H100 at b566817 where no H200 was lent), a GPU's own entry first
    where a shape has one per GPU (`tuned_config`)."""
    if not TUNED_FILE.exists():
        return {}
    return json.loads(TUNED_FILE.read_text()).get("configs", {})


def tuned_config(
    kind: str, m: int, n: int, k: int, *, interpret: bool
) -> tuple[TileConfig, int] | None:
    """(tiles, staging slots) of the committed sweep's entry for this kind and (N, K) at M's
    bucket (else the nearest measured M), this GPU's own measurements first
    (common.tiling.measured_here_first), or None (and None under the interpreter, whose tiles are
    INTERPRET_CONFIG's). Measured in bfloat16; float16 takes the same tiles."""
    entries = [e for e in tuned_table().get(kind, []) if (e["n"], e["k"]) == (n, k)]
    entries = measured_here_first(entries, compat.gpu_name())
    if interpret or not entries:
        return None
    bucket = int(shape_bucket(m))
    best = min(entries, key=lambda e: abs(math.log2(int(shape_bucket(e["m"])) / bucket)))
    return TileConfig.from_dict(best["config"]), int(best["slots"])


def grouped_config(
    products: list[tuple[int, int]], k: int, *, interpret: bool
) -> GroupedTiles | None:
    """The tiles for the step's weight gradients hᵢᵀ·dZᵢ as ONE grouped launch
    (`mosaic_linear.linear_grouped`: a TileConfig and each product's width), or None: launch
    them apart, each on its own tiles.

    `products`: each weight gradient's (M, N) — (d_in, the layer's width), in the order the
    backward reaches them (last layer first); `k`: their shared contraction, the batch rows.
    The committed sweep's entry (kind GROUPED_KIND) for these products at K's bucket (else the
    nearest measured K), taken only where it measured the grouped launch faster than the
    separate ones it replaces ("us" < "apart_us", both timed in one run); never under the
    interpreter (the tests pass tiles to `mlp_backward`'s `grouped`)."""
    entries = [e for e in tuned_table().get(GROUPED_KIND, []) if
               [tuple(p) for p in e["products"]] == [tuple(p) for p in products]]  # fmt: skip
    entries = measured_here_first(entries, compat.gpu_name())
    if interpret or not entries:
        return None
    bucket = int(shape_bucket(k))
    best = min(entries, key=lambda e: abs(math.log2(int(shape_bucket(e["k"])) / bucket)))
    return GroupedTiles.from_entry(best) if best["us"] < best["apart_us"] else None


def fitted_config(
    family: str,
    m: int,
    n: int,
    k: int,
    dtype: str,
    outputs: Outputs = PLAIN_OUTPUT,
    *,
    interpret: bool,
    operands: Operands = AS_STORED,
    epilogue: str = "none",
) -> tuple[TileConfig, Outputs]:
    """The tiles for this GEMM of the step; returns them with `outputs` (its staging slots
    chosen). `operands` and `epilogue` name the GEMM's kind (`gemm_kind`).

    The committed sweep's entry for the kind and shape (`tuned_config`) if there is one and
    `pipeline.check_config` takes it; else the forward's tiles made cooperative and fitted to
    `outputs`' staging, tried in order, the first that `pipeline.check_config` takes (ValueError
    if none): the default
    config (`pipeline.default_config`) with one program an SM and two staging slots, at its
    pipeline slots and fewer down to 3; the same with one staging slot (a wide staging tile —
    the gated saving forward's packed z, the doubled act' output — costs a K slot less); the
    half-wide tile likewise, from one K slot more than the default; the default at 2 K slots.
    A deeper K pipeline is taken before a second staging slot: the epilogue's stores are a few
    per cent of a tile's time, a load one slot ahead of the wgmma leaves it waiting."""
    weights = 2 if family == "gated" else 1
    tuned = tuned_config(gemm_kind(family, outputs, operands, epilogue), m, n, k,
                         interpret=interpret)  # fmt: skip
    if tuned is not None:
        cfg, slots = tuned
        outs = dataclasses.replace(outputs, slots=slots)
        try:
            pipeline.check_config(cfg, dtype, weights, residual=False, outputs=outs)
            return cfg, outs
        except ValueError:
            pass  # a table entry this dtype's shared memory cannot hold: the fitted tiles
    base = pipeline.default_config(family, m, n, k, dtype, interpret=interpret)
    base = dataclasses.replace(base, programs_per_sm=1)
    staging = (2,) if outputs == PLAIN_OUTPUT else (2, 1)

    def deep_to_shallow(cfg: TileConfig, most: int) -> list[tuple[TileConfig, Outputs]]:
        return [
            (dataclasses.replace(cfg, num_stages=stages), dataclasses.replace(outputs, slots=slots))
            for slots in staging
            for stages in range(most, 2, -1)
        ]

    tries = deep_to_shallow(base, base.num_stages)
    half = base.block_n // 2
    if half >= PACK_BLOCK and half % PACK_BLOCK == 0:
        tries += deep_to_shallow(dataclasses.replace(base, block_n=half), base.num_stages + 1)
    tries.append((dataclasses.replace(base, num_stages=2), outputs))
    errors = []
    for cfg, outs in tries:
        try:
            pipeline.check_config(cfg, dtype, weights, residual=False, outputs=outs)
        except ValueError as err:
            errors.append(str(err))
            continue
        return cfg, outs
    raise ValueError(
        f"config: no cooperative Mosaic GPU tile fits {family} at (M, N, K) = {(m, n, k)} with "
        f"{outputs}: {errors[-1]}"
    )


def forward_saving(
    x2d: jax.Array,
    params: Mapping[str, jax.Array],
    spec: MLPSpec,
    *,
    saved: str,
    residual: jax.Array | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, tuple[jax.Array | None, ...]]:
    """backward.forward_saving's result (same arguments, residuals and layouts) from the Mosaic
    GPU forward kernels, the pre-activations stored by their epilogues (`store_preact`).
    Trusts input: the caller checked `unsupported_reason(spec, M)`."""
    check_saved(saved)
    interpret = compat.interpret_mode() if interpret is None else interpret
    layers = spec.layers()
    last = layers[-1].index
    h = x2d
    kept: list[jax.Array | None] = [x2d]
    for layer in layers:
        i, m = layer.index, h.shape[0]
        store = saved == "preact" and portable._stores_preact(layer)
        family = "gated" if layer.gated else "linear_act"
        if store:  # fitted to the pre-activation's staging (cooperative)
            cfg, kept_outputs = fitted_config(
                family, m, layer.d_out, layer.d_in, spec.dtype, Outputs(preact=True),
                interpret=interpret,
            )  # fmt: skip
            slots = kept_outputs.slots
        else:  # the inference forward's kernel and tiles (ping-pong included)
            cfg = pipeline.default_config(
                family, m, layer.d_out, layer.d_in, spec.dtype, interpret=interpret
            )
            slots = PLAIN_OUTPUT.slots
        if layer.gated:
            outs = mosaic_gated.gated_fwd(
                h, params[f"wv{i}"], params.get(f"bc{i}"), n=layer.d_out,
                activation=layer.activation, config=cfg, interpret=interpret, store_preact=store,
                staging_slots=slots,
            )  # fmt: skip
        else:
            outs = mosaic_linear.linear_act_fwd(
                h, params[f"w{i}"], params.get(f"b{i}"), residual if i == last else None,
                activation=layer.activation, config=cfg, interpret=interpret, store_preact=store,
                staging_slots=slots,
            )  # fmt: skip
        h, z = outs if store else (outs, None)
        if layer.gated and i == last and residual is not None:  # no preset has one; kept exact
            h = h + residual
        if saved == "preact":
            kept += [z, h] if i != last else [z]
    return h, tuple(kept) if saved == "preact" else (x2d,)


def _gemm(
    a: jax.Array,
    b: jax.Array,
    spec: MLPSpec,
    *,
    interpret: bool,
    x_kmajor: bool = False,
    w_kmajor: bool = False,
    epilogue: str = "none",
    z: jax.Array | None = None,
    activation: str = "identity",
    overwrite_z: bool = False,
) -> jax.Array:
    """a·b on the Mosaic GPU kernel, a [M, K] (or, x_kmajor, given as [K, M]) and b [K, N] (or,
    w_kmajor, given as [N, K]), with the previous layer's act' step in the epilogue where
    `epilogue` says (mosaic/linear_act.py's linear_act_fwd; `overwrite_z`: its result in z's
    buffer)."""
    m, k = a.shape[::-1] if x_kmajor else a.shape
    n = b.shape[0] if w_kmajor else b.shape[1]
    outputs = Outputs(scale=2 if epilogue == "dact_gated" else 1)
    cfg, outputs = fitted_config(
        "linear_act", m, n, k, spec.dtype, outputs, interpret=interpret,
        operands=Operands(x_kmajor=x_kmajor, w_kmajor=w_kmajor), epilogue=epilogue,
    )  # fmt: skip
    return mosaic_linear.linear_act_fwd(
        a, b, None, None, activation="identity", config=cfg, interpret=interpret,
        x_kmajor=x_kmajor, w_kmajor=w_kmajor, epilogue=epilogue, z=z, dact_activation=activation,
        staging_slots=outputs.slots, overwrite_z=overwrite_z,
    )  # fmt: skip


def mlp_backward(
    dy2d: jax.Array,
    residuals: tuple[jax.Array | None, ...],
    params: Mapping[str, jax.Array],
    spec: MLPSpec,
    *,
    saved: str,
    interpret: bool | None = None,
    grouped: TileConfig | GroupedTiles | None = None,
    overwrite_z: bool = True,
) -> dict[str, jax.Array]:
    """backward.mlp_backward's result (same arguments, names and layouts: `wv{i}`/`bc{i}` come
    back packed) from the Mosaic GPU GEMMs. Trusts input: the caller checked
    `unsupported_reason(spec, M)`. `overwrite_z`: each act' step's result takes its saved z's
    buffer where z dies there (False: new buffers, for a caller whose residuals are arguments of
    this computation, which XLA would copy first).

    The weight gradients run apart, each after its dZ, or — where `grouped_config` has measured
    tiles for them, or `grouped` gives tiles — all together at the end, one grouped launch
    (`mosaic_linear.linear_grouped`), which keeps every layer's dZ until then."""
    check_saved(saved)
    interpret = compat.interpret_mode() if interpret is None else interpret
    if saved == "inputs":
        _, residuals = forward_saving(
            residuals[0], params, spec, saved="preact", interpret=interpret
        )
    layers = spec.layers()
    hs, zs = residuals[0::2], residuals[1::2]
    m = dy2d.shape[0]
    if grouped is None and len(layers) > 1:
        widths = [packed_width(la.d_out) if la.gated else la.d_out for la in reversed(layers)]
        products = [(la.d_in, w) for la, w in zip(reversed(layers), widths, strict=True)]
        grouped = grouped_config(products, m, interpret=interpret)
    pending: list[tuple[str, jax.Array, jax.Array]] = []  # (name, h, dZ) for the grouped launch
    grads: dict[str, jax.Array] = {}
    top = layers[-1]
    if portable._stores_preact(top):  # no GEMM before it: backward.py's elementwise act' step
        cfg = portable._config(
            spec, "gated" if top.gated else "linear_act", m, top.d_out, top.d_in, None
        )
        dz = portable.dact_fwd(dy2d, zs[-1], activation=top.activation, gated=top.gated, config=cfg)
    else:
        dz = dy2d
    for layer in reversed(layers):
        i = layer.index
        wname, bname = (f"wv{i}", f"bc{i}") if layer.gated else (f"w{i}", f"b{i}")
        w = params[wname]
        if grouped is None:
            grads[wname] = _gemm(hs[i], dz, spec, interpret=interpret, x_kmajor=True)
        else:
            pending.append((wname, hs[i], dz))
        if layer.bias:
            grads[bname] = jnp.sum(dz, axis=0, dtype=jnp.float32).astype(params[bname].dtype)
        prev = layers[i - 1] if i > 0 else None
        # dh = dZ·Wᵀ, with the previous layer's act' step in the epilogue (dh is its dout); after
        # a relu layer the act' step reads this layer's input h_i, relu's output. Its result
        # takes z's buffer where z dies here (the saved z_{i-1}: the step's largest tensor, at
        # llama3-8b 448 MiB of a 1584 MiB peak): not relu's h_i while a grouped launch still
        # needs it for the weight gradient
        if prev is None or not (portable._stores_preact(prev) or portable._dact_from_output(prev)):
            dz = _gemm(dz, w, spec, interpret=interpret, w_kmajor=True)
        else:
            from_output = portable._dact_from_output(prev)
            dz = _gemm(
                dz, w, spec, interpret=interpret, w_kmajor=True,
                epilogue="dact_gated" if prev.gated else "dact",
                z=hs[i] if from_output else zs[i - 1], activation=prev.activation,
                overwrite_z=overwrite_z and not (from_output and grouped is not None),
            )  # fmt: skip
        if i == 0:
            grads["x"] = dz
    if pending:
        names, lhs, rhs = zip(*pending, strict=True)
        tiles = GroupedTiles.of(grouped)
        dws = mosaic_linear.linear_grouped(
            lhs, rhs, config=tiles.config, widths=tiles.widths, interpret=interpret, x_kmajor=True
        )
        grads.update(zip(names, dws, strict=True))
    names = packed_names(spec)
    return {"x": grads["x"], **{k: grads[k].astype(params[k].dtype) for k in names}}
