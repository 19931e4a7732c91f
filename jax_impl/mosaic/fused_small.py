"""fused_small on Mosaic GPU: the whole narrow MLP (every width <= 128) in one persistent kernel.

    h_0 = x;   h_{l+1} = round(act(h_l·W_l + b_l))   (l < L-1)
    y = round(h_{L-1}·W_{L-1} + b_{L-1})

Sibling of jax_impl/fused_small.py (Pallas-Triton; same names, semantics and rounding points:
fp32 accumulation, bias and activation in fp32, the hidden rounded to the spec dtype before the
next product, y rounded once). Why a sibling: there, each 64-row tile's chain of dependent
products (a wgmma, the activation, a conversion a layer) leaves the tensor cores idle between
links, and the x loads need registers and addresses (nerf-64x5, 2M rows fp16 on the H200: 152 µs
against a 127 µs floor; the torch twin with TMA loads and stores of x and y: 145 µs). Here:

- Chains: a block holds `warpgroups` compute warpgroups and an SM `blocks_per_sm` blocks; each
  warpgroup is one independent chain that walks its own row tiles (chain g of G takes tiles g,
  g + G, g + 2G, ...: a persistent grid), so the SM's warp schedulers interleave several chains'
  products and epilogues.
- Weights: every layer's [K, N] tile (zero-padded to the kernel's WIDTH where a layer is
  narrower) and bias row go to shared memory once per block, by TMA, before any row loop. At 128
  wide (32 KiB a layer: a deep MLP's do not fit beside the chains' slots) they stream instead
  through a ring of `weight_slots` [WIDTH, WIDTH] slots that the block's chains share in step:
  the k-th weight tile a chain reads is layer k % L in slot k % R; each chain arrives on the
  slot's "free" barrier once its wgmma has read it, and warpgroup 0 refills it with tile k + R
  when all have (every chain walks the same number of steps; a step past a chain's last tile
  recomputes that tile and stores nothing) (`RING_CONFIG`: 128x8 fp16 on the H200 350.6 µs
  against the Pallas-Triton kernel's 644.1).
- x: per chain a ring of `num_stages` shared-memory slots filled by TMA; a slot is refilled with
  the chain's tile `num_stages` ahead as soon as the first layer's wgmma has read it, so the
  loads stay in flight while the chain computes.
- Layers: one wgmma a layer into a fresh fp32 accumulator (`plgpu.ACC`), bias and activation in
  registers, the hidden rounded to the dtype and fed to the next wgmma: as wgmma's A operand in
  registers (`hidden_in_registers`, the GPU default, as FlashAttention-3 feeds P·V) or through a
  per-chain shared-memory tile (the only way the Mosaic GPU interpreter runs).
- y: rounded, staged in one of `out_slots` shared-memory slots per chain and stored by TMA, the
  store overlapping the chain's next tiles.

Edges: TMA zero-fills the rows of a box past M and clips its writes (GPU, and the jax 0.11
interpreter), so the last tile needs no mask; M >= 8 not a multiple of 8 is padded by up to 7
rows (the TMA descriptors cut M into 8-row swizzle atoms: `pipeline.padded_extents`). jax 0.10's
interpreter raises on out-of-bounds boxes, so there M is padded to whole tiles
(`compat.mosaic_interpreter_models_tma_edges`).

Widths: every layer is padded to WIDTH = 16, 32, 64 or 128 (`padded_width`; at 128 every width must
be 128, the ring's square slots); padded weight rows and columns and bias lanes are zeros, so padded
lanes of every hidden are act(0) = 0 (every plain activation) and contribute nothing to the next
product. x and y are read and written as they are (no copy), so d_in and d_out must be multiples of
16 (wgmma's 32-byte swizzle atoms); the one swizzle of every tile is the largest that divides d_in,
WIDTH and d_out (128 bytes for nerf-64x5). Hidden widths may be anything <= WIDTH (their weights are
padded on the host: one small XLA op per padded layer, none for nerf-64x5). Gated specs, float32,
widths over 128, 128-wide specs whose widths are not all 128 (the ring's slots are square) and more
than MAX_LAYERS layers are refused by `unsupported_reason` (fallback: jax_impl/fused_small.py)."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ...common.config import TileConfig
from ...common.spec import MLPSpec
from ...common.tiling import SmallConfig, padded_width
from ...common.validate import check_packed_call
from .. import compat
from ..activations import apply_activation, round_to_dtype
from ..compat import interpret_mode
from ..front import ADAPTER
from . import pipeline

IMPL = "pallas_mosaic"
FALLBACK_IMPL = "fused_small (Pallas-Triton, jax_impl/fused_small.py)"
WIDTHS_SUPPORTED = (16, 32, 64, 128)  # the closed set of compile-time widths (128: the ring)
MAX_LAYERS = 8
SUPPORTED_DTYPES = ("float16", "bfloat16")
MIN_IO_WIDTH = 16  # d_in, d_out: whole 32-byte swizzle atoms (wgmma's narrowest swizzle)
MIN_COPY_BYTES = 128  # a TMA copy moves a multiple of 128 bytes: bias rows are padded to it
SMEM_BYTES = pipeline.SMEM_BYTES  # an sm_90 block's most
SMEM_PER_SM = 228 * 1024
SMEM_BLOCK_RESERVED = 1024
MAX_THREADS = 1024  # a CUDA block's most: 8 warpgroups
SMEM_ALIGNMENT = 1024  # Mosaic GPU aligns every shared-memory allocation to 1 KiB
BARRIER_BYTES = 8


# ==== config ======================================================================================
@dataclasses.dataclass(frozen=True)
class MosaicSmallConfig:
    """The kernel's knobs (the module docstring has the design).

    block_m: rows of one chain's tile, 64 or 128 (one or two wgmma row blocks a product).
    num_stages: x slots per chain (TMA loads in flight: num_stages - 1 while one is computed).
    warpgroups: compute warpgroups per block, each an independent chain of row tiles.
    blocks_per_sm: blocks an SM (each with its own copy of the weights).
    out_slots: y staging slots per chain (TMA stores in flight).
    hidden_in_registers: the hidden goes to the next wgmma as its A operand in registers; False:
    through a per-chain shared-memory tile. The interpreter runs only False.
    auto_barriers: Pallas' warpgroup barriers around every shared-memory store and TMA issue
    (its default). False (`CompilerParams.unsafe_no_auto_barriers`): only the barriers the kernel
    needs (its stores are never read back by the same thread; the one place that needs one, a
    refilled x slot whose wgmma other warps may still read, gets `commit_smem`'s).
    weight_slots: 0 — every layer's weights stay in shared memory for the whole row loop; R >= 1 —
    they stream through a ring of R [WIDTH, WIDTH] slots that the block's chains share, in step
    (every layer a square WIDTH x WIDTH one: `ring_reason`)."""

    block_m: int = 64
    num_stages: int = 3
    warpgroups: int = 3
    blocks_per_sm: int = 1
    out_slots: int = 2
    hidden_in_registers: bool = True
    auto_barriers: bool = True
    weight_slots: int = 0

    def __post_init__(self) -> None:
        if self.block_m not in (64, 128):
            raise ValueError(f"block_m: expected 64 or 128, got {self.block_m!r}")
        for name in ("num_stages", "warpgroups", "blocks_per_sm", "out_slots"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        slots = self.weight_slots
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 0:
            raise ValueError(f"weight_slots: expected an int >= 0, got {slots!r}")
        if self.warpgroups * 128 > MAX_THREADS:
            raise ValueError(
                f"warpgroups: expected at most {MAX_THREADS // 128} (a block's {MAX_THREADS} "
                f"threads), got {self.warpgroups}"
            )
        for name in ("hidden_in_registers", "auto_barriers"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, got {getattr(self, name)!r}")

    def __str__(self) -> str:
        return (
            f"m{self.block_m} s{self.num_stages} wg{self.warpgroups} b{self.blocks_per_sm}/SM "
            f"o{self.out_slots}"
            + (" regA" if self.hidden_in_registers else " smemA")
            + ("" if self.auto_barriers else " nobar")
            + (f" ring{self.weight_slots}" if self.weight_slots else "")
        )


# Four 64-row chains in one block an SM (the weights in shared memory once), three x slots each,
# the hidden to the next wgmma in registers, Pallas' own barriers. H200, nerf-64x5 fp16 at 2M rows
# (results 2026-12-04-h200-0bbeb43-mosaic; the Pallas-Triton kernel 151.4 µs, every config the
# same bits as it): wg4 137.7 µs, wg4 s2 138.1, wg3 s2 138.8, 128-row chains (wg2) 141.9-142.1,
# two blocks an SM 142.0, wg3 143.9, wg2 147.8, three one-chain blocks 146.6; the hidden through
# shared memory 184-192; without auto barriers 141.0-156.4 (slower but at 4 slots).
DEFAULT_CONFIG = MosaicSmallConfig(warpgroups=4)
# Under the interpreter: two chains in one block of each of the 2 interpreted "SMs" and a single
# x slot, so that a chain of two tiles already refills its slot (M = 301 is 5 tiles: chains of 2,
# 1, 1 and 1), the hidden through shared memory (the interpreter reads wgmma operands from shared
# memory only). tests/test_mosaic_fused_small.py turns a two-slot ring in its race test.
INTERPRET_CONFIG = MosaicSmallConfig(
    block_m=64, num_stages=1, warpgroups=2, blocks_per_sm=1, out_slots=2, hidden_in_registers=False
)
# 128 wide: the weights of a deep 128-wide MLP (32 KiB a layer) do not fit beside the chains' x
# and y slots, so they stream through a ring of two slots that the block's chains share in step —
# where the Pallas-Triton kernel's 64-row programs each read every layer from L2 (128x8 fp16, 1M
# rows: 256 KiB a tile). Two 64-row chains, two x slots and two y slots each: ring 64 KiB, x
# 64 KiB, y 64 KiB = 192 KiB. H200 (results 2026-12-04-h200-5ec3c30 and -3665e08; 1M rows, every
# relu config the same bits as the Pallas-Triton kernel): 128x8 relu fp16 wg2 o2 350.6 µs (784
# TFLOP/s; Pallas-Triton 644.1), wg2 s3 o1 351.6, three chains 481.7-482.1 (predicted 450-520),
# three chains over three ring slots 430.1, 128-row chains 440.8, four chains at one x slot 1314.4;
# 4 layers gelu_tanh with biases bf16 488.1-495.3 for two or three chains (Pallas-Triton 854.7),
# three ring slots 507.1; two layers relu 136.8 (the weights resident instead: 138.3, so no
# second rule; Pallas-Triton 167.1).
RING_CONFIG = MosaicSmallConfig(warpgroups=2, num_stages=2, out_slots=2, weight_slots=2)
INTERPRET_RING_CONFIG = dataclasses.replace(INTERPRET_CONFIG, out_slots=1, weight_slots=2)


def default_config(spec: MLPSpec, m: int, *, interpret: bool = False) -> MosaicSmallConfig:
    """The tiles: DEFAULT_CONFIG (measured at nerf-64x5, the width it is taken at:
    jax_impl/fused_small._takes_mosaic_sibling), INTERPRET_CONFIG under the interpreter; at
    padded width 128 the weight ring's (RING_CONFIG, INTERPRET_RING_CONFIG)."""
    del m
    if padded_width(max(spec.widths)) == 128:
        return INTERPRET_RING_CONFIG if interpret else RING_CONFIG
    return INTERPRET_CONFIG if interpret else DEFAULT_CONFIG


def config_for(
    config: MosaicSmallConfig | SmallConfig | TileConfig | None,
    spec: MLPSpec,
    m: int,
    *,
    interpret: bool,
) -> MosaicSmallConfig:
    """What the launcher runs: the heuristic (None), a MosaicSmallConfig as is, or the portable
    kernel's SmallConfig / a pinned TileConfig read as block_m (64 or 128), num_stages and, for a
    SmallConfig, programs_per_sm as chains (warpgroups) per block."""
    if isinstance(config, MosaicSmallConfig):
        cfg = config
    elif config is None:
        cfg = default_config(spec, m, interpret=interpret)
    else:
        base = default_config(spec, m, interpret=interpret)
        chains = config.programs_per_sm if isinstance(config, SmallConfig) else base.warpgroups
        cfg = dataclasses.replace(
            base,
            block_m=min(128, max(64, config.block_m)),
            num_stages=config.num_stages,
            warpgroups=min(chains, MAX_THREADS // 128),
        )
    if interpret and cfg.hidden_in_registers:
        # the interpreter reads wgmma's A operand from shared memory only
        cfg = dataclasses.replace(cfg, hidden_in_registers=False)
    return cfg


# ==== geometry ====================================================================================
@dataclasses.dataclass(frozen=True)
class Geometry:
    """The static shapes of one launch: each layer's weight tile [K_l, N_l] (K_0 = d_in, N_{L-1}
    = d_out, WIDTH elsewhere), its bias row (padded to a whole TMA copy) and the config."""

    d_in: int
    d_out: int
    width: int
    num_layers: int
    has_bias: bool
    itemsize: int
    config: MosaicSmallConfig

    def weight_shape(self, layer: int) -> tuple[int, int]:
        k = self.d_in if layer == 0 else self.width
        n = self.d_out if layer == self.num_layers - 1 else self.width
        return k, n

    @property
    def bias_len(self) -> int:
        """Elements of every layer's bias row in shared memory: the widest N_l, at least a whole
        TMA copy (the rows are zero-padded to it on the host; only a 64-wide spec's are not)."""
        n = max(self.width, self.d_out)
        return max(n, MIN_COPY_BYTES // self.itemsize)

    @property
    def swizzle_cols(self) -> int:
        """Columns whose swizzle every wgmma operand shares (A and B must have one swizzle)."""
        return math.gcd(self.d_in, self.width, self.d_out)

    def smem_bytes(self) -> int:
        """Shared memory of one block as Mosaic GPU counts it (each allocation aligned to 1 KiB,
        8 bytes a barrier): weights, bias rows, and per chain its x ring, y staging and (hidden
        through shared memory) its hidden tile."""
        c = self.config
        if c.weight_slots:  # the ring: one allocation of its slots, a full and a free barrier each
            tiles = [c.weight_slots * self.width * self.width]
            weight_barriers = 2 * c.weight_slots
        else:
            tiles = [math.prod(self.weight_shape(i)) for i in range(self.num_layers)]
            weight_barriers = self.num_layers
        if self.has_bias:
            tiles.append(self.num_layers * self.bias_len)
        chains = c.warpgroups * c.block_m
        tiles += [chains * c.num_stages * self.d_in, chains * c.out_slots * self.d_out]
        if not c.hidden_in_registers:
            tiles.append(chains * self.width)
        barriers = (
            weight_barriers
            + (self.num_layers if self.has_bias else 0)
            + c.warpgroups * c.num_stages
        )
        return sum(_align(t * self.itemsize) for t in tiles) + BARRIER_BYTES * barriers


def _align(nbytes: int) -> int:
    return -(-nbytes // SMEM_ALIGNMENT) * SMEM_ALIGNMENT


def geometry(spec: MLPSpec, config: MosaicSmallConfig) -> Geometry:
    return Geometry(
        d_in=spec.d_in,
        d_out=spec.d_out,
        width=padded_width(max(spec.widths)),
        num_layers=spec.num_layers,
        has_bias=spec.bias,
        itemsize=jnp.dtype(spec.dtype).itemsize,
        config=config,
    )


def ring_reason(geo: Geometry) -> str | None:
    """None when every layer's weight tile is the ring's [WIDTH, WIDTH] slot (d_in = d_out =
    WIDTH: the ring holds one shape), else why the ring cannot stream them."""
    if geo.d_in == geo.width == geo.d_out:
        return None
    return (
        f"weight_slots: the ring streams square [WIDTH, WIDTH] = [{geo.width}, {geo.width}] "
        f"layers only, got d_in={geo.d_in}, d_out={geo.d_out}"
    )


def check_config(geo: Geometry) -> None:
    """ValueError naming the knob when a config's blocks do not fit an SM's shared memory, or its
    weight ring cannot take the spec's layers."""
    if geo.config.weight_slots and (reason := ring_reason(geo)) is not None:
        raise ValueError(reason)
    need = geo.smem_bytes()
    per_block = min(SMEM_BYTES, SMEM_PER_SM // geo.config.blocks_per_sm - SMEM_BLOCK_RESERVED)
    if need > per_block:
        raise ValueError(
            f"config: {geo.config} needs {need} bytes of shared memory a block, over the "
            f"{per_block} each of {geo.config.blocks_per_sm} block(s) an SM may have (lower "
            f"num_stages, out_slots, warpgroups or blocks_per_sm)"
        )


# ==== support =====================================================================================
def unsupported_reason(spec: MLPSpec, m: int | None = None) -> str | None:
    """None when this kernel can run `spec` (any number of rows), else the reason: the constraint,
    the value and the fallback."""
    del m
    fallback = f"falls back to {FALLBACK_IMPL}"
    if spec.dtype not in SUPPORTED_DTYPES:
        return (
            f"{IMPL} fused_small: dtype {spec.dtype} is not supported (wgmma takes fp16/bf16 "
            f"here); {fallback}"
        )
    if spec.gated:
        return (
            f"{IMPL} fused_small: gated activation {spec.activation!r} is not implemented yet "
            f"(plain activations only); {fallback}"
        )
    if spec.num_layers > MAX_LAYERS:
        return f"{IMPL} fused_small: at most {MAX_LAYERS} layers, got {spec.num_layers}; {fallback}"
    for i, width in enumerate(spec.widths):
        if width > WIDTHS_SUPPORTED[-1]:
            return (
                f"{IMPL} fused_small: every width must be <= {WIDTHS_SUPPORTED[-1]}, got {width} "
                f"at widths[{i}]; {fallback}"
            )
    for name, width in (("d_in", spec.d_in), ("d_out", spec.d_out)):
        if width % MIN_IO_WIDTH:
            return (
                f"{IMPL} fused_small: {name}={width} is not a multiple of {MIN_IO_WIDTH} (x and y "
                f"go by TMA into wgmma's 32-byte swizzle atoms, unpadded); {fallback}"
            )
    if padded_width(max(spec.widths)) == 128 and any(w != 128 for w in spec.widths):
        return (
            f"{IMPL} fused_small: at 128 wide every width must be 128 (the weights stream "
            f"through a ring of square slots), got widths {spec.widths}; {fallback}"
        )
    return None


supports = unsupported_reason  # the portable kernel's name for the same question


# ==== forward kernel ==============================================================================
def _product(a: Any, w_ref: Any, rows: int) -> jax.Array:
    """a·W as a fresh fp32 accumulator [rows, N]: one wgmma, awaited (a: a swizzled shared-memory
    tile, or a register tile in wgmma's layout)."""

    def body(acc_ref: Any) -> jax.Array:
        plgpu.wgmma(acc_ref, a, w_ref)
        return acc_ref[...]  # awaits the wgmma

    return pl.run_scoped(body, plgpu.ACC((rows, w_ref.shape[1]), jnp.float32))


def _epilogue(
    acc: jax.Array, b_ref: Any, n: int, activation: str, dtype: Any, interpret: bool
) -> jax.Array:
    """round(act(acc + b)): bias and activation in fp32, one rounding to the dtype."""
    z = acc
    if b_ref is not None:
        z = z + pipeline.row_vector(b_ref.at[pl.ds(0, n)], acc.shape[0], interpret=interpret)
    z = apply_activation(z, activation, fast=pipeline.APPROX_MATH)
    return round_to_dtype(z, dtype, interpret)


def _fused_small_fwd_kernel(
    x_gmem: Any,
    *refs: Any,
    geo: Geometry,
    activation: str,
    num_blocks: int,
    interpret: bool,
) -> None:
    L = geo.num_layers
    cfg = geo.config
    R = cfg.weight_slots  # 0: every layer resident; else the ring's slots
    w_gmems = refs[:L]
    b_gmems = refs[L : 2 * L] if geo.has_bias else (None,) * L
    y_gmem = refs[-1]
    dtype = y_gmem.dtype
    BM, S, WGS, OS = cfg.block_m, cfg.num_stages, cfg.warpgroups, cfg.out_slots
    m = x_gmem.shape[0]
    num_tiles = pipeline.cdiv(m, BM)
    chains = num_blocks * WGS
    # the ring: every chain walks the same number of steps (its last past the end recomputes a
    # real tile and stores nothing), so that each slot is released by all WGS chains every use
    steps = pipeline.cdiv(num_tiles, chains)
    uses = steps * L  # weight tiles a chain reads, the k-th is layer k % L in slot k % R
    transforms = pipeline.mma_transforms(geo.swizzle_cols, dtype)
    weight_bars = R if R else L  # biases' barriers follow the weights'

    allocations = dict(
        w_smem=(
            plgpu.SMEM((R, geo.width, geo.width), dtype, transforms=transforms)
            if R
            else tuple(
                plgpu.SMEM(geo.weight_shape(i), dtype, transforms=transforms) for i in range(L)
            )
        ),
        # one allocation for every bias row (each allocation takes a whole KiB)
        b_smem=plgpu.SMEM((L, geo.bias_len), dtype) if geo.has_bias else None,
        w_bars=plgpu.Barrier(num_barriers=weight_bars + (L if geo.has_bias else 0)),
        # the ring's slot k is free once every chain's wgmma has read it
        w_free=plgpu.Barrier(num_arrivals=WGS, num_barriers=R) if R else None,
        x_smem=plgpu.SMEM((WGS, S, BM, geo.d_in), dtype, transforms=transforms),
        x_bars=plgpu.Barrier(num_barriers=WGS * S),
        h_smem=(
            None
            if cfg.hidden_in_registers
            else plgpu.SMEM((WGS, BM, geo.width), dtype, transforms=transforms)
        ),
        y_smem=plgpu.SMEM(
            (WGS, OS, BM, geo.d_out), dtype, transforms=pipeline.mma_transforms(geo.d_out, dtype)
        ),
    )

    def scope(
        w_smem: Any,
        b_smem: Any,
        w_bars: Any,
        w_free: Any,
        x_smem: Any,
        x_bars: Any,
        h_smem: Any,
        y_smem: Any,
    ) -> None:
        # 1. program -> tile: chain g (warpgroup wg of block `sm`) takes tiles g, g + G, ...
        wg = lax.axis_index("wg") if WGS > 1 else 0
        g = lax.axis_index("sm") * WGS + wg
        mine = lax.div(num_tiles - g + chains - 1, chains)  # >= 0: g < chains

        walked = steps if R else mine  # the ring's chains walk in step

        def tile_of(i: Any) -> Any:
            # the chain's i-th tile (the ring's step past its last tile: the last tile again)
            return jnp.minimum(g + i * chains, num_tiles - 1) if R else g + i * chains

        def x_copy(i: Any, slot: Any) -> None:
            rows = pl.ds(tile_of(i) * BM, BM)
            plgpu.copy_gmem_to_smem(x_gmem.at[rows], x_smem.at[wg, slot], x_bars.at[wg * S + slot])

        def w_copy(k: Any, layer: int) -> None:
            """The ring's k-th weight tile into slot k % R: layer k % L, which every caller knows
            at trace time (k = i·L + a static offset), so each layer is its own operand and
            the launcher stacks nothing."""
            slot = lax.rem(k, R)
            plgpu.copy_gmem_to_smem(w_gmems[layer], w_smem.at[slot], w_bars.at[slot])

        def weights(i: Any, layer: int) -> Any:
            """Layer `layer`'s weight tile for step i (the ring: once it has landed)."""
            if not R:
                return w_smem[layer]
            slot = lax.rem(i * L + layer, R)
            plgpu.barrier_wait(w_bars.at[slot])
            return w_smem.at[slot]

        def release(i: Any, layer: int) -> None:
            """The ring: this chain's wgmma has read the slot; warpgroup 0 refills it, R tiles
            ahead, once every chain has (the chains stay within R layers of each other)."""
            if not R:
                return
            k = i * L + layer
            slot = lax.rem(k, R)
            plgpu.barrier_arrive(w_free.at[slot])

            @pl.when((wg == 0) & (k + R < uses))
            def _refill() -> None:
                plgpu.barrier_wait(w_free.at[slot])
                w_copy(k + R, (layer + R) % L)

        # 2. load: the weights (resident: all; the ring: its first R tiles) and biases once per
        # block (warpgroup 0 issues, every chain waits)
        @pl.when(wg == 0)
        def _issue_weights() -> None:
            for k in range(min(R, uses) if R else L):
                if R:
                    w_copy(k, k % L)
                else:
                    plgpu.copy_gmem_to_smem(w_gmems[k], w_smem[k], w_bars.at[k])
            if geo.has_bias:
                for i in range(L):
                    plgpu.copy_gmem_to_smem(b_gmems[i], b_smem.at[i], w_bars.at[weight_bars + i])

        # 2. load: the x ring's first tiles, in flight while the weights land
        for s in range(S):
            if R:
                if s < steps:
                    x_copy(s, s)
            else:
                pl.when(s < mine)(functools.partial(x_copy, s, s))
        for i in range(0 if R else L):
            plgpu.barrier_wait(w_bars.at[i])
        for i in range(L if geo.has_bias else 0):
            plgpu.barrier_wait(w_bars.at[weight_bars + i])

        def row_tile(i: Any, carry: Any) -> Any:
            slot = lax.rem(i, S)
            plgpu.barrier_wait(x_bars.at[wg * S + slot])
            # 3. compute: layer 0 reads the x slot; once its wgmma is done the slot takes the
            # chain's tile S ahead, in flight while the rest of this chain computes
            acc = _product(x_smem.at[wg, slot], weights(i, 0), BM)
            release(i, 0)
            if not cfg.auto_barriers:
                plgpu.commit_smem()  # every warp's wgmma wait passed before the slot is refilled
            pl.when(i + S < walked)(lambda: x_copy(i + S, slot))
            for layer in range(1, L):
                h = _epilogue(
                    acc, b_smem.at[layer - 1] if geo.has_bias else None,
                    geo.weight_shape(layer - 1)[1], activation, dtype, interpret,
                )  # fmt: skip
                if cfg.hidden_in_registers:
                    a = h
                else:
                    if not cfg.auto_barriers:
                        plgpu.commit_smem()  # every warp is done with the last wgmma's A tile
                    h_smem.at[wg][...] = h
                    plgpu.commit_smem()  # generic-proxy writes -> visible to wgmma
                    a = h_smem.at[wg]
                acc = _product(a, weights(i, layer), BM)
                release(i, layer)
            y = _epilogue(
                acc, b_smem.at[L - 1] if geo.has_bias else None, geo.d_out, "identity", dtype,
                interpret,
            )  # fmt: skip

            # 4. store: stage y in a free slot (the store OS tiles back is done reading it)
            def store() -> None:
                o_slot = y_smem.at[wg, lax.rem(i, OS)]
                plgpu.wait_smem_to_gmem(OS - 1, wait_read_only=True)
                o_slot[...] = y
                plgpu.commit_smem()  # generic-proxy writes -> visible to TMA
                plgpu.copy_smem_to_gmem(o_slot, y_gmem.at[pl.ds((g + i * chains) * BM, BM)])

            if R:
                pl.when(i < mine)(store)  # the ring's step past the chain's last tile
            else:
                store()
            return carry

        lax.fori_loop(0, walked, row_tile, 0)
        if R:  # the ring's last R releases, which no refill waited for (the interpreter checks)

            @pl.when(wg == 0)
            def _drain() -> None:
                for k in range(max(0, uses - R), uses):
                    plgpu.barrier_wait(w_free.at[k % R])

        # The block may not exit while a TMA store still reads its shared memory.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    pl.run_scoped(scope, **allocations, collective_axes="wg" if WGS > 1 else ())


# ==== launcher ====================================================================================
def layer_params(
    params: dict[str, jax.Array], geo: Geometry
) -> tuple[list[jax.Array], list[jax.Array]]:
    """Each layer's weight [K_l, N_l] and bias row [bias_len] zero-padded (no copy where a layer
    already has the shape: every nerf-64x5 weight; its absent biases are not read)."""
    weights, biases = [], []
    for i in range(geo.num_layers):
        weights.append(pipeline.pad_to(params[f"w{i}"], geo.weight_shape(i)))
        if geo.has_bias:
            biases.append(pipeline.pad_to(params[f"b{i}"], (geo.bias_len,)))
    return weights, biases


def padded_rows(m: int, block_m: int, interpret: bool) -> int:
    """Rows x is padded to: M itself where TMA's edges cover the last tile, else see the module
    docstring (8-row atoms on the GPU; whole tiles under jax 0.10's interpreter)."""
    if interpret and not compat.mosaic_interpreter_models_tma_edges():
        return pipeline.round_up(m, block_m)
    return m if m <= pipeline.ROW_TILE else pipeline.round_up(m, pipeline.ROW_TILE)


@functools.partial(jax.jit, static_argnames=("spec", "config", "interpret"))
def fused_small_fwd(
    x2d: jax.Array,
    params: dict[str, jax.Array],
    spec: MLPSpec,
    *,
    config: MosaicSmallConfig | SmallConfig | TileConfig | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Launch on an [M, d_in] input with M >= 1 and packed params; returns [M, d_out]. Trusts its
    inputs (a supported spec; ValueError for a config that does not fit)."""
    interpret = interpret_mode() if interpret is None else interpret
    m = x2d.shape[0]
    cfg = config_for(config, spec, m, interpret=interpret)
    geo = geometry(spec, cfg)
    check_config(geo)
    weights, biases = layer_params(params, geo)
    mp = padded_rows(m, cfg.block_m, interpret)
    x_p = pipeline.pad_to(x2d, (mp, spec.d_in))
    tiles = pipeline.cdiv(mp, cfg.block_m)
    sms = pipeline.num_sms(interpret)
    num_blocks = max(1, min(sms * cfg.blocks_per_sm, pipeline.cdiv(tiles, cfg.warpgroups)))
    kernel = functools.partial(
        _fused_small_fwd_kernel,
        geo=geo,
        activation=spec.base_activation,
        num_blocks=num_blocks,
        interpret=interpret,
    )
    threads = dict(num_threads=cfg.warpgroups, thread_name="wg") if cfg.warpgroups > 1 else {}
    y = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((mp, spec.d_out), x2d.dtype),
        grid=(num_blocks,),
        grid_names=("sm",),
        **threads,
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
            approx_math=pipeline.APPROX_MATH,
            unsafe_no_auto_barriers=not cfg.auto_barriers,
        ),
        interpret=pipeline.interpret_param(interpret),
        kernel_name="fused_small_mosaic_fwd",
    )(x_p, *weights, *biases)
    return y if mp == m else y[:m]


# ==== public function =============================================================================
def fused_small(
    x: jax.Array,
    params: dict[str, jax.Array],
    spec: MLPSpec,
    *,
    config: MosaicSmallConfig | SmallConfig | TileConfig | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """y = MLP(x) for x of shape [..., d_in] and packed params (`w{i}` [d_in, d_out], `b{i}`) in
    one Mosaic GPU kernel; raises NotImplementedError (with the reason and the fallback) for
    specs it cannot take. `interpret`: run under the Mosaic GPU interpreter (None: where there is
    no GPU)."""
    spec = check_packed_call(
        ADAPTER,
        spec,
        x,
        params,
        config,
        config_types=(MosaicSmallConfig, SmallConfig, TileConfig),
    )
    reason = unsupported_reason(spec)
    if reason is not None:
        raise NotImplementedError(reason)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, spec.d_in)
    if x2d.shape[0] == 0:
        return jnp.zeros((*lead, spec.d_out), x.dtype)
    y = fused_small_fwd(x2d, params, spec, config=config, interpret=interpret)
    return y.reshape(*lead, spec.d_out)
