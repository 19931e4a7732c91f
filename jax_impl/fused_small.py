"""fused_small: the whole narrow MLP (every width <= 128) in one persistent Pallas-Triton kernel.

    h_0 = x;   h_{l+1} = round(act(h_l·W_l + b_l) [⊙ (h_l·V_l + c_l)])   (l < L-1)
    y = h_{L-1}·W_{L-1} + b_{L-1}

Neural fields, small policies and per-pixel MLPs run 16..128-wide MLPs over millions of rows; as
separate GEMMs they are bound by the traffic of their hidden activations. Here only x is read and y
written: each row tile's hidden goes through every layer in registers (one `dot` per layer, two for
a gated layer, both fed by the same register input). The floor is that traffic (nerf-64x5 fp16 over
2M rows: 537 MB, 127 us at 4.24 TB/s); the products (~110 us of wgmma there) must overlap it.

Persistent grid: min(row tiles, programs_per_sm · 132) programs; program p takes row tiles p, p + P,
p + 2P, ... (TILES_PER_PROGRAM of them, a static count; a tile past M is fully masked). Before its
row loop, a program loads every layer's zero-padded [WIDTH, WIDTH] weight tiles once (`hoist`:
they are loop invariants of the row loop, kept on chip) where they fit SMALL_HOIST_BYTES, or one
program's shared memory without spilling; else each tile reads them again. The x tiles are
software-pipelined over `num_stages` by the Triton compiler. Programs an SM by width
(`SMALL_FORWARD_TILES`, the same tiles as the twin's).

Params are read where they are: the kernel takes each layer's own weight and bias refs (no
repacking, no host work beyond one launch). twin-diff: where the weights are streamed, the
launcher also stacks the hidden layers zero-padded (`_stacked_hidden`, one small XLA fusion in the
same jitted call) so the layer loop can index them, as the twin selects a pointer. Gated layers
come in the packed layout (common/packing.py): `wv{i}` [d_in, 2·Np], gate lane c at packed
column 2·64·(c // 64) + c % 64, up lane at that + 64 — a gather of columns, loaded once per
program.

Widths are compile-time constants from the closed set 16/32/64/128: every layer is padded to one
WIDTH by masked loads (padded lanes of every hidden are act(0)·0 = 0 and contribute nothing). Refs
are whole arrays addressed with `pl.ds`, index arrays and masks, as the twin's pointers are: on the
GPU the Pallas-Triton lowering does not mask blocks that overhang an array, and in interpret mode a
masked `pl.ds` load pads instead of shifting the window.

Config: `SmallConfig` (common/tiling.py, read by both twins). Rounding points (common/reference.py):
fp32 accumulation; bias, activation and gate in fp32; the hidden rounded to the spec dtype before
the next layer's dot; y rounded once at the store.

On a Hopper GPU at padded width 64 or 128 (16-bit, default tiles) the launch runs this kernel's
Mosaic GPU sibling instead (`_takes_mosaic_sibling`, jax_impl/mosaic/fused_small.py): x and y
through TMA rings, the weights in shared memory (at 128 wide streamed through a ring its chains
share), several wgmma chains a block — where the torch twin loads x and stores y through tensor
descriptors, which Pallas-Triton does not have. Its values are within the tolerance policy of this
kernel's (the same bits at nerf-64x5 and 128x8 relu on the H200: 151.4 -> 137.7 µs, 644.1 ->
350.6 µs; a smooth activation may differ in last bits: it takes Mosaic GPU's approximate math);
under the interpreters this kernel runs.

Twin: torch_impl/fused_small.py (Triton, same names and sections).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from fusedmlp.common.config import TileConfig
from fusedmlp.common.packing import PACK_BLOCK, packed_width
from fusedmlp.common.registry import FALLBACK
from fusedmlp.common.spec import MLPSpec
from fusedmlp.common.tiling import (
    INTERPRET_NUM_SMS,
    NUM_SMS,
    SMALL_TMA_IO_WIDTHS,
    WHOLE_WIDTHS,
    SmallConfig,
    fused_small_programs,
    padded_width,
    small_config_for,
)
from fusedmlp.common.validate import check_packed_call

from .activations import apply_activation, round_to_dtype
from .backward import _gate_join
from .compat import interpret_mode, on_hopper, quiet_pallas_triton
from .front import ADAPTER, STACK
from .gated import _gate_split
from .tf32 import tf32_operand

if TYPE_CHECKING:
    from .mosaic.fused_small import MosaicSmallConfig

WIDTHS_SUPPORTED = WHOLE_WIDTHS  # the closed set of compile-time widths
MAX_LAYERS = 8


# ---- helpers shared by the whole-MLP kernels -----------------------------------------------------
def dot_precision(spec: MLPSpec) -> jax.lax.Precision:
    """The dot precision: HIGH is tf32 in the Pallas-Triton lowering, HIGHEST is ieee (DEFAULT would
    be tf32 for float32 operands)."""
    return jax.lax.Precision.HIGH if spec.fp32_precision == "tf32" else jax.lax.Precision.HIGHEST


# ---- forward kernel ------------------------------------------------------------------------------
def _layer_operands(
    w_ref, b_ref, d_in, d_out,
    WIDTH, GATED_LAYER, HAS_BIAS, PACK, layer=None,
):  # fmt: skip
    """One layer's zero-padded operands: the [WIDTH, WIDTH] weight tile (the gate's, for a gated
    layer), the up tile (gated; else the weight tile again), and the fp32 bias rows. `layer`: a
    (runtime) index into stacked refs [L, WIDTH, NC] / [L, NC] (`_select_layer`), else None."""
    lanes = jnp.arange(WIDTH)
    # a gated layer's gate lanes are packed columns 2·PACK·(c // PACK) + c % PACK, up lanes + PACK
    cols = (lanes // PACK) * (2 * PACK) + lanes % PACK if GATED_LAYER else lanes
    # twin-diff: rows and columns as index arrays (a gather) where the twin adds offsets; the
    # ref knows its row stride
    at = () if layer is None else (layer,)
    w_ok = (lanes[:, None] < d_in) & (lanes[None, :] < d_out)
    w = plgpu.load(w_ref.at[(*at, lanes[:, None], cols[None, :])], mask=w_ok, other=0.0)
    v = w
    b = jnp.zeros((WIDTH,), jnp.float32)
    c = b
    if HAS_BIAS:
        b = plgpu.load(b_ref.at[(*at, cols)], mask=lanes < d_out, other=0.0).astype(jnp.float32)
    if GATED_LAYER:
        v = plgpu.load(w_ref.at[(*at, lanes[:, None], cols[None, :] + PACK)], mask=w_ok, other=0.0)
        if HAS_BIAS:
            c = plgpu.load(b_ref.at[(*at, cols + PACK)], mask=lanes < d_out, other=0.0)
            c = c.astype(jnp.float32)
    return w, v, b, c


def _output_operands(w_refs, b_refs, WIDTHS, NUM_LAYERS, WIDTH, HAS_BIAS, PACK):
    """The output layer's weight tile and fp32 bias row (a plain layer: no up half)."""
    last = NUM_LAYERS - 1
    w, _, b, _ = _layer_operands(
        w_refs[last], b_refs[last], WIDTHS[last], WIDTHS[NUM_LAYERS],
        WIDTH, False, HAS_BIAS, PACK,
    )  # fmt: skip
    return w, b


def _select_layer(w_stack_ref, b_stack_ref, layer, WIDTH, GATED, HAS_BIAS, PACK):
    """Hidden layer `layer` (a runtime index): its operands, from the hidden layers' weights and
    biases stacked and zero-padded ([L-1, WIDTH, NC], [L-1, NC]: `_stacked_hidden`)."""
    # twin-diff: a ref cannot be selected at run time, so the launcher stacks the hidden layers
    # (one small XLA fusion a call) and the layer is an index, as the twin's pointer select is:
    # one load a layer that Triton's pipeliner prefetches. A `lax.switch` between per-layer loads
    # lowered to a nest of scf.if, a load in each, which it could not (128x8 relu fp16, 1M rows:
    # 913 µs against the twin's 681 on the H200, thirteenth session).
    return _layer_operands(
        w_stack_ref, b_stack_ref, WIDTH, WIDTH, WIDTH, GATED, HAS_BIAS, PACK, layer=layer
    )


def _relu_f16x2(h: jax.Array) -> jax.Array:
    """relu of a float16 tile, two elements an instruction, NaN propagated (GPU only)."""
    (out,) = plgpu.elementwise_inline_asm(
        "max.NaN.f16x2 $0, $1, $2;",
        args=[h, jnp.zeros_like(h)],
        constraints="=r,r,r",
        pack=2,
        result_shape_dtypes=[jax.ShapeDtypeStruct(h.shape, h.dtype)],
    )
    return out


def _hidden_layer(
    h, w, v, b, c,
    ACTIVATION, GATED, HAS_BIAS, DOT_PRECISION, DTYPE, INTERPRET,
):  # fmt: skip
    """round(act(h·w + b) [⊙ (h·v + c)]): one hidden layer, from registers to registers; also
    its fp32 pre-activation z = h·w + b and up g = h·v + c (z again, plain), which only the saving
    forward stores (fused_small_backward.py): unused, they cost nothing."""
    if INTERPRET:
        w = w.astype(jnp.float32)  # the twin's arithmetic: fp32 tiles under its interpreter
        v = v.astype(jnp.float32)
    z = plgpu.dot(
        tf32_operand(h, DOT_PRECISION), tf32_operand(w, DOT_PRECISION), precision=DOT_PRECISION
    )
    if HAS_BIAS:
        z += b[None, :]
    g = z
    if ACTIVATION == "relu" and not GATED and DTYPE == jnp.float16 and not INTERPRET:  # noqa: SIM300
        # relu after the rounding: the same values (relu is exact and rounding monotone), on
        # packed float16 pairs (PTX max.NaN.f16x2) — the torch twin's order, nerf-64x5 187 ->
        # 149-154 µs there. twin-diff: float16 on the GPU only, through inline PTX — Pallas-
        # Triton's jnp.maximum drops NaN, and the select it would take instead measured slower
        # on the float16 tile than on the fp32 one (nerf-64x5 192.9 -> 220.3 µs, 5fe85e1); the
        # interpreter takes the path below, with the same values. The instruction needs sm_80+.
        h = _relu_f16x2(round_to_dtype(z, DTYPE, INTERPRET))
    else:
        out = apply_activation(z, ACTIVATION)
        if GATED:
            g = plgpu.dot(
                tf32_operand(h, DOT_PRECISION),
                tf32_operand(v, DOT_PRECISION),
                precision=DOT_PRECISION,
            )
            if HAS_BIAS:
                g += c[None, :]
            out = out * g
        # round the hidden as a per-layer kernel's store would, then feed the next dot
        h = round_to_dtype(out, DTYPE, INTERPRET)
    if INTERPRET:
        h = h.astype(jnp.float32)  # the twin's arithmetic: fp32 tiles under its interpreter
    return h, z, g


def _packed_store(
    ref, row0, row_ok, gate, up,
    ROWS, NP, WIDTH, PACK,
    INTERPRET,
):  # fmt: skip
    """Stores fp32 gate and up tiles [ROWS, WIDTH] (lane c = hidden column c) rounded to ref's
    dtype into rows [row0, row0 + ROWS) of a packed [., 2·NP] array (common/packing.py): gate
    lane c at column 2·PACK·(c // PACK) + c % PACK, up lane at that + PACK; every column of the
    packed width is written (lanes past the tiles' reach as exact zeros)."""
    # twin-diff: a row window `pl.ds(row0, ROWS)` where the twin takes row offsets and a stride.
    dtype = ref.dtype
    rows = pl.ds(row0, ROWS)
    if WIDTH >= PACK:  # whole block pairs: one contiguous packed tile
        cols = jnp.arange(2 * WIDTH)
        t = round_to_dtype(_gate_join(gate, up, ROWS, WIDTH, PACK), dtype, INTERPRET)
        ok = row_ok[:, None] & (cols[None, :] < 2 * NP)
        plgpu.store(ref.at[rows, pl.ds(0, 2 * WIDTH)], t, mask=ok)
    else:  # one block pair, partly filled: the two halves, then zeros past WIDTH
        lanes = jnp.arange(WIDTH)
        ok = row_ok[:, None] & (lanes[None, :] >= 0)
        plgpu.store(ref.at[rows, pl.ds(0, WIDTH)], round_to_dtype(gate, dtype, INTERPRET), mask=ok)
        plgpu.store(ref.at[rows, pl.ds(PACK, WIDTH)], round_to_dtype(up, dtype, INTERPRET), mask=ok)
        pad = jnp.arange(PACK)
        zeros = jnp.zeros((ROWS, PACK), dtype)
        ok = row_ok[:, None] & (pad[None, :] >= WIDTH)
        plgpu.store(ref.at[rows, pl.ds(0, PACK)], zeros, mask=ok)
        plgpu.store(ref.at[rows, pl.ds(PACK, PACK)], zeros, mask=ok)


def _packed_load(
    ref, row0, row_ok,
    ROWS, NP, WIDTH, PACK,
):  # fmt: skip
    """`_packed_store` undone: the gate and up tiles [ROWS, WIDTH] of a packed array, in its
    dtype (padded lanes read as 0)."""
    rows = pl.ds(row0, ROWS)
    if WIDTH >= PACK:
        cols = jnp.arange(2 * WIDTH)
        ok = row_ok[:, None] & (cols[None, :] < 2 * NP)
        t = plgpu.load(ref.at[rows, pl.ds(0, 2 * WIDTH)], mask=ok, other=0.0)
        gate, up = _gate_split(t, ROWS, WIDTH, PACK)
    else:
        lanes = jnp.arange(WIDTH)
        ok = row_ok[:, None] & (lanes[None, :] >= 0)
        gate = plgpu.load(ref.at[rows, pl.ds(0, WIDTH)], mask=ok, other=0.0)
        up = plgpu.load(ref.at[rows, pl.ds(PACK, WIDTH)], mask=ok, other=0.0)
    return gate, up


def _save_layer(
    h, z, g, h_ref, z_ref, row0, row_ok, d_out,
    BLOCK_M, WIDTH, GATED, STORES_Z,
    PACK, INTERPRET,
):  # fmt: skip
    """The saving forward's residuals of one hidden layer, as backward.forward_saving keeps them:
    its output h [M, d_out] and, where STORES_Z, its pre-activation z [M, d_out] (gated: the packed
    [z|g] [M, 2·Np]; none for identity or relu, whose act' needs no z)."""
    # row0: the tile's first row; h is already rounded (exact in h's dtype)
    lanes = jnp.arange(WIDTH)
    ok = row_ok[:, None] & (lanes[None, :] < d_out)
    rows = pl.ds(row0, BLOCK_M)
    plgpu.store(h_ref.at[rows, pl.ds(0, WIDTH)], h.astype(h_ref.dtype), mask=ok)
    if STORES_Z:
        if GATED:
            NP = (d_out + PACK - 1) // PACK * PACK
            _packed_store(z_ref, row0, row_ok, z, g, BLOCK_M, NP, WIDTH, PACK, INTERPRET)
        else:
            zr = round_to_dtype(z, z_ref.dtype, INTERPRET)
            plgpu.store(z_ref.at[rows, pl.ds(0, WIDTH)], zr, mask=ok)


def _fused_small_fwd_kernel(
    x_ref, *refs,
    M, TILES_PER_PROGRAM,
    WIDTHS, NUM_LAYERS, WIDTH, BLOCK_M, ACTIVATION, GATED, HAS_BIAS, PACK, HOIST,
    DOT_PRECISION, INTERPRET, SAVE=False, STORES_Z=False, STACKED=False,
):  # fmt: skip
    # twin-diff: the layers' refs arrive flat (weights, biases, with STACKED the hidden layers'
    # stacked weights and biases (`_stacked_hidden`: the streamed loop's operands), y, then with
    # SAVE the hidden outputs h_1 … h_{L-1} and, STORES_Z (not identity or relu), the
    # pre-activations z_0 …); Triton takes tuples. SAVE (the training forward,
    # fused_small_backward.py) is a flag of this kernel, where the Triton twin's inference kernel
    # keeps its signature and a second kernel shares its rows.
    w_refs, b_refs = refs[:NUM_LAYERS], refs[NUM_LAYERS : 2 * NUM_LAYERS]
    rest = refs[2 * NUM_LAYERS :]
    if STACKED:
        (w_stack_ref, b_stack_ref), rest = rest[:2], rest[2:]
    y_ref, h_refs = rest[0], rest[1:NUM_LAYERS]
    z_refs = rest[NUM_LAYERS:] if STORES_Z else h_refs
    # 1. program -> tile: a persistent program takes row tiles pid, pid + P, pid + 2P, ...
    pid = pl.program_id(0)
    num_programs = pl.num_programs(0)
    lanes = jnp.arange(WIDTH)
    last = NUM_LAYERS - 1
    dtype = y_ref.dtype

    # 2. load: HOIST — every layer's weights once per program, on chip for all its row tiles
    hidden = ()
    if HOIST:
        for layer in range(last):
            operands = _layer_operands(
                w_refs[layer],
                b_refs[layer],
                WIDTHS[layer],
                WIDTHS[layer + 1],
                WIDTH,
                GATED,
                HAS_BIAS,
                PACK,
            )
            hidden = hidden + (operands,)  # noqa: RUF005 (the twin's tuple, grown per layer)
        w_out, b_out = _output_operands(w_refs, b_refs, WIDTHS, NUM_LAYERS, WIDTH, HAS_BIAS, PACK)

    def row_tile(i, carry):
        start = (pid + i * num_programs) * BLOCK_M
        rows = start + jnp.arange(BLOCK_M)
        row_ok = rows < M
        # 2. load: the x tile (pipelined: the next tiles' loads are in flight during this one)
        h = plgpu.load(
            x_ref.at[pl.ds(start, BLOCK_M), pl.ds(0, WIDTH)],
            mask=row_ok[:, None] & (lanes[None, :] < WIDTHS[0]),
            other=0.0,
        )
        if INTERPRET:
            h = h.astype(jnp.float32)  # the twin's arithmetic: fp32 tiles under its interpreter

        # 3. compute: every layer from registers; the hidden never leaves the program
        if HOIST or SAVE:
            for layer in range(last):
                if HOIST:
                    w, v, b, c = hidden[layer]
                else:
                    w, v, b, c = _layer_operands(
                        w_refs[layer], b_refs[layer], WIDTHS[layer], WIDTHS[layer + 1],
                        WIDTH, GATED, HAS_BIAS, PACK,
                    )  # fmt: skip
                h, z, g = _hidden_layer(
                    h, w, v, b, c, ACTIVATION, GATED, HAS_BIAS, DOT_PRECISION, dtype, INTERPRET
                )
                if SAVE:
                    _save_layer(
                        h, z, g, h_refs[layer], z_refs[layer], start, row_ok,
                        WIDTHS[layer + 1], BLOCK_M, WIDTH, GATED, STORES_Z, PACK, INTERPRET,
                    )  # fmt: skip
            if HOIST:
                w_last, b_last = w_out, b_out
            else:
                w_last, b_last = _output_operands(
                    w_refs, b_refs, WIDTHS, NUM_LAYERS, WIDTH, HAS_BIAS, PACK
                )
        else:
            # weights streamed from L2 per tile, through a runtime loop: the code (and compile
            # time) of one hidden layer whatever the depth
            def layer_step(layer, h):
                w, v, b, c = _select_layer(
                    w_stack_ref, b_stack_ref, layer, WIDTH, GATED, HAS_BIAS, PACK
                )
                return _hidden_layer(
                    h, w, v, b, c, ACTIVATION, GATED, HAS_BIAS, DOT_PRECISION, dtype, INTERPRET
                )[0]

            h = jax.lax.fori_loop(0, last, layer_step, h) if last else h
            w_last, b_last = _output_operands(
                w_refs, b_refs, WIDTHS, NUM_LAYERS, WIDTH, HAS_BIAS, PACK
            )
        if INTERPRET:
            w_last = w_last.astype(jnp.float32)
        z = plgpu.dot(
            tf32_operand(h, DOT_PRECISION),
            tf32_operand(w_last, DOT_PRECISION),
            precision=DOT_PRECISION,
        )
        if HAS_BIAS:
            z += b_last[None, :]

        # 4. store: only y leaves the program (and, SAVE, the residuals above)
        y = round_to_dtype(z, dtype, INTERPRET)
        plgpu.store(
            y_ref.at[pl.ds(start, BLOCK_M), pl.ds(0, WIDTH)],
            y,
            mask=row_ok[:, None] & (lanes[None, :] < WIDTHS[NUM_LAYERS]),
        )
        return carry

    jax.lax.fori_loop(0, TILES_PER_PROGRAM, row_tile, 0)


# ---- launcher ------------------------------------------------------------------------------------
def supports(spec: MLPSpec, m: int | None = None) -> str | None:
    """None when fused_small can run `spec`, else the reason: constraint, value and fallback."""
    del m  # any number of rows
    fallback = f"falls back to the per-layer kernels (impl {FALLBACK[STACK]!r})"
    for i, width in enumerate(spec.widths):
        if width > WIDTHS_SUPPORTED[-1]:
            return (
                f"fused_small: every width must be <= {WIDTHS_SUPPORTED[-1]}, got {width} at "
                f"widths[{i}]; {fallback}"
            )
    if spec.num_layers > MAX_LAYERS:
        return (
            f"fused_small: at most {MAX_LAYERS} layers, got {spec.num_layers} "
            f"(widths {spec.widths}); {fallback}"
        )
    return None


def layer_params(
    params: dict[str, jax.Array], spec: MLPSpec
) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """The packed params as the kernel takes them: per layer its weight (`wv{i}` for a gated
    layer, else `w{i}`) and its bias (`bc{i}`/`b{i}`; the weight again where there is none)."""
    weights, biases = [], []
    for layer in spec.layers():
        i = layer.index
        w = params[f"wv{i}" if layer.gated else f"w{i}"]
        weights.append(w)
        biases.append(params.get(f"bc{i}" if layer.gated else f"b{i}", w))
    return tuple(weights), tuple(biases)


def _stacked_hidden(
    weights: tuple[jax.Array, ...], biases: tuple[jax.Array, ...], spec: MLPSpec, width: int
) -> tuple[jax.Array, jax.Array]:
    """The hidden layers' weights and biases zero-padded to one shape and stacked, [L-1, WIDTH,
    NC] and [L-1, NC] (NC: WIDTH, or the packed width of WIDTH for gated layers), for the
    streamed layer loop (`_select_layer`): the padding reads as the masked loads' zeros, so the
    products and bits are those of per-layer loads."""
    nc = packed_width(width) if spec.gated else width
    hidden = range(spec.num_layers - 1)
    w = jnp.stack(
        [jnp.pad(weights[i], ((0, width - weights[i].shape[0]), (0, nc - weights[i].shape[1])))
         for i in hidden]
    )  # fmt: skip
    b = w[:, 0]  # a stand-in where there is no bias (HAS_BIAS keeps the kernel from reading it)
    if spec.bias:
        b = jnp.stack([jnp.pad(biases[i], (0, nc - biases[i].shape[0])) for i in hidden])
    return w, b


@functools.partial(jax.jit, static_argnames=("spec", "config", "interpret"))
def fused_small_fwd(
    x2d: jax.Array,
    params: dict[str, jax.Array],
    spec: MLPSpec,
    *,
    config: TileConfig | SmallConfig | MosaicSmallConfig | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Launch on an [M, d_in] input with M >= 1 and PACKED params (common/packing.py); returns
    [M, d_out]. Trusts its inputs. Where `_takes_mosaic_sibling` holds, the Mosaic GPU sibling runs
    instead (within the tolerance policy; the same bits at nerf-64x5), at `config` where that is
    the sibling's own (a plan's launch records it). twin-diff: the torch twin calls this
    stack's sibling (launched from torch_impl/cross) at 128 wide only, from 2^19 rows x layers.

    Jitted (spec, config and interpret static): an eager `pallas_call` is traced and lowered again
    on every call (0.35-1.2 s a call interpreted here), a jitted one once per shape."""
    interpret = interpret_mode() if interpret is None else interpret
    if _takes_mosaic_sibling(spec, config, interpret):
        from .mosaic import fused_small as sibling

        return sibling.fused_small_fwd(x2d, params, spec, config=config, interpret=interpret)
    m = x2d.shape[0]
    cfg = small_config_for(config, spec, m, interpret=interpret, kernel="forward")
    weights, biases = layer_params(params, spec)
    width = padded_width(max(spec.widths))
    # the streamed layer loop reads the hidden layers stacked (twin-diff: see _select_layer)
    stacked = not cfg.hoist and spec.num_layers > 1
    stacks = _stacked_hidden(weights, biases, spec, width) if stacked else ()
    programs = fused_small_programs(m, cfg, INTERPRET_NUM_SMS if interpret else NUM_SMS)
    kernel = functools.partial(
        _fused_small_fwd_kernel, M=m, TILES_PER_PROGRAM=pl.cdiv(pl.cdiv(m, cfg.block_m), programs),
        WIDTHS=spec.widths, NUM_LAYERS=spec.num_layers, WIDTH=width,
        BLOCK_M=cfg.block_m, ACTIVATION=spec.base_activation, GATED=spec.gated,
        HAS_BIAS=spec.bias, PACK=PACK_BLOCK, HOIST=cfg.hoist, DOT_PRECISION=dot_precision(spec),
        INTERPRET=interpret, STACKED=stacked,
    )  # fmt: skip
    with quiet_pallas_triton():
        return pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((m, spec.d_out), x2d.dtype),
            grid=(programs,),
            compiler_params=plgpu.CompilerParams(
                num_warps=cfg.num_warps, num_stages=cfg.num_stages
            ),
            interpret=interpret,
            name="fused_small_fwd",
        )(x2d, *weights, *biases, *stacks)


# Padded widths where the Mosaic GPU sibling runs by default (`_takes_mosaic_sibling`).
_MOSAIC_SIBLING_WIDTHS: tuple[int, ...] = (*SMALL_TMA_IO_WIDTHS, 128)


def _takes_mosaic_sibling(spec: MLPSpec, config: object, interpret: bool) -> bool:
    """Whether a launch takes the Mosaic GPU sibling (jax_impl/mosaic/fused_small.py): on a Hopper
    GPU, at the default tiles (config None), 16-bit, at padded width 64 (common.tiling.
    SMALL_TMA_IO_WIDTHS, where the torch twin takes tensor descriptors for x and y) or 128 (every
    width 128: the weights through the sibling's ring), a spec the sibling takes and its default
    tiles fit. twin-diff: Pallas-Triton has no tensor descriptors or shared weight
    ring; the sibling's TMA rings of x and y, its weights in shared memory and its warpgroup
    chains are JAX's way to what the torch twin's `_tma_io` does at 64 wide. H200: nerf-64x5, 2M
    rows, 151.4 -> 137.7 µs, the same bits (results 2026-12-04-h200-0bbeb43-mosaic); 128x8 relu
    fp16, 1M rows, 644.1 -> 350.6 µs, the same bits (2026-12-04-h200-5ec3c30); at 32 wide (8
    layers, 1M rows) it lost (45.6 against 42.0), so not there. A pinned MosaicSmallConfig (what
    `plan()` records as the launch's tiles where the sibling runs) pins the sibling, on the GPU or
    under its interpreter."""
    from .mosaic import fused_small as sibling

    if isinstance(config, sibling.MosaicSmallConfig):
        return True
    if interpret or config is not None or spec.dtype == "float32":
        return False
    if padded_width(max(spec.widths)) not in _MOSAIC_SIBLING_WIDTHS or not on_hopper():
        return False
    if sibling.unsupported_reason(spec) is not None:
        return False
    try:  # the default tiles fit shared memory (else the sibling's launcher would raise)
        sibling.check_config(sibling.geometry(spec, sibling.default_config(spec, 0)))
    except ValueError:
        return False
    return True


# ---- public function -----------------------------------------------------------------------------
def fused_small(
    x: jax.Array,
    params: dict[str, jax.Array],
    spec: MLPSpec,
    *,
    config: TileConfig | SmallConfig | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """y = MLP(x) for x of shape [..., d_in] and packed params
    (`fusedmlp.jax_impl.packing.pack_params`, once) in one kernel; raises NotImplementedError
    (with the reason and the fallback) for specs fused_small cannot take."""
    spec = check_packed_call(
        ADAPTER, spec, x, params, config, config_types=(TileConfig, SmallConfig)
    )
    # twin-diff: no device check (jax places the arrays)
    reason = supports(spec)
    if reason is not None:
        raise NotImplementedError(reason)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, spec.d_in)
    if x2d.shape[0] == 0:
        return jnp.zeros((*lead, spec.d_out), x.dtype)
    y = fused_small_fwd(x2d, params, spec, config=config, interpret=interpret)
    return y.reshape(*lead, spec.d_out)
