"""Shared pieces of the Mosaic GPU siblings (linear_act, gated): tiles, persistent pipeline, store.

One kernel shape serves both families, in the manner of jax's own Hopper matmul
(`jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu`): a persistent grid of one CUDA block per SM
walks the output tiles (`plgpu.nd_loop`, in `plgpu.planar_snake` order), and each tile's K loop is
a TMA → shared memory → wgmma pipeline. With `warp_specialize` the block holds three warpgroups:
one memory warpgroup that only issues TMA copies (`plgpu.emit_pipeline_warp_specialized`, 40
registers a thread) and two compute warpgroups that split the tile, issue wgmma into their own fp32
accumulator and run the epilogue; the memory warpgroup is already loading the next tile's slabs
while they do. Without it one warpgroup does both (`plgpu.emit_pipeline`). The epilogue reads the
accumulator once and, per 64-row × `epi_n` epilogue tile, applies the family's fp32 "compute"
(bias, activation, gate, residual), stages the result in one of two shared-memory slots per
warpgroup and stores it by TMA, so the store of one tile overlaps the math of the next.

How TileConfig maps onto Mosaic GPU (the portable twins read the same fields as Triton tiles):

| field            | Mosaic GPU meaning                                                          |
| ---------------- | --------------------------------------------------------------------------- |
| block_m          | rows of a block's output tile: 64, 128 or 256                              |
| block_n          | OUTPUT columns of a block's tile; the operand tile is block_n wide           |
|                  | (linear_act) or 2·block_n wide (gated: [W|V] packed in 64-column blocks)     |
| block_k          | K slab per pipeline step (TMA box of X and of the weight); picks the swizzle |
| group_m          | `planar_snake` band width along M: Triton's grouped order, snaking back on   |
|                  | every other band so consecutive tiles share X or W slabs in L2              |
| num_stages       | pipeline slots = K steps in flight (`max_concurrent_steps`)                  |
| warp_specialize  | True: 1 memory + 2 compute warpgroups; the compute warpgroups split the tile |
|                  | along N when the operand tile is ≥ 256 wide, else along M (block_m ≥ 128).   |
|                  | False: one warpgroup issues the TMA copies and the wgmma                     |
| epilogue_subtile | column slices of a compute warpgroup's output tile per epilogue tile         |
|                  | (epi_n = warpgroup columns / epilogue_subtile; gated: a multiple of 64)     |
| programs_per_sm  | 1; or 2 with warp_specialize: ping-pong — each compute warpgroup owns a     |
|                  | whole block_m × block_n tile and the two take turns at the K loop, so one's  |
|                  | epilogue runs under the other's K loop (`pingpong_matmul`)                   |
| num_warps        | ignored: a Pallas thread is one warpgroup (4 warps)                          |

A compute warpgroup's accumulator is at most 128×128 fp32 (128 of a thread's registers; the
warp-specialised split leaves a compute thread 232). The packed gated operand is ONE wgmma of
2·block_n columns; the epilogue splits it into its 64-column (gate, up) blocks.

Training adds two descriptions to both kernels, cooperative and ping-pong (mosaic/backward.py):
`Operands` — X or W read as the transpose of what is stored (hᵀ·dZ, dZ·Wᵀ) — and `Outputs` — an
output twice as wide as the accumulator (the packed [dz|dg] of a gated act' step) or a second
output, the pre-activation, each with its own staging in shared memory. Their epilogues are
heavy (a saved [z|g] tile read, two tiles written per accumulator tile), which is what ping-pong
hides under the other warpgroup's K loop. `grouped_matmul` (the hand-rolled ping-pong loop,
also in a cooperative form) walks the tiles of several products that share K as one list: the
step's weight gradients in one launch.

Edges: no padding of tile-ragged problems. TMA zero-fills the parts of a box that lie past the
end of an array (reads; zero K columns add nothing) and clips them (writes), so M, N and K need
not be multiples of the tiles. What TMA into swizzled tiles does need, as Mosaic GPU describes the
copy (the array cut into whole swizzle atoms: "dimension 1 must have size smaller or a multiple of
its tiling"): K and N multiples of the swizzle width, at least 32 bytes (16 elements) since wgmma
takes no narrower swizzle — `unsupported_reason` refuses other widths (fallback pallas_triton);
every model width is a multiple of 64, which gets the 128-byte swizzle — and M a multiple of 8
(the atom's rows) or below 8: other M are padded by up to 7 rows (`padded_extents`, the one copy
left, for odd M only). The Mosaic GPU interpreter of jax 0.10 models neither the zero fill nor the
clipping (an out-of-bounds copy raises), so there — and only there — the launchers pad every
extent to whole tiles (`compat.mosaic_interpreter_models_tma_edges`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ...common.config import SWIZZLE_COLUMNS, TileConfig
from ...common.packing import PACK_BLOCK
from ...common.registry import FALLBACK
from ...common.tiling import measured_here_first, shape_bucket
from .. import compat
from ..front import STACK

IMPL = "pallas_mosaic"
FAMILIES = ("linear_act", "gated")
SUPPORTED_DTYPES = ("float16", "bfloat16")
WGMMA_M = 64  # rows of one wgmma instruction (one warpgroup)
WGMMA_MAX_N = 256
EPI_M = 64  # rows of one epilogue tile: one wgmma row block
MIN_SWIZZLE_BYTES = 32  # wgmma's narrowest operand swizzle; K and N rows are multiples of it
ROW_TILE = 8  # rows of a swizzle atom: M is cut into whole 8-row tiles by the TMA descriptors
SMEM_BYTES = 227 * 1024  # H100/H200 shared memory per block
# fp32 accumulator elements per compute warpgroup: 128×128 over 128 threads is 128 registers of a
# thread; more leaves no room for the epilogue (ptxas spills).
MAX_ACC_ELEMS = 128 * 128
# Mosaic GPU's approximate math (`CompilerParams.approx_math`) in every kernel of this module: exp
# as ex2.approx of x·log2(e) (what Triton's tl.exp is) and the epilogues' activations with their
# reciprocals as rsqrt.approx squared (`apply_activation(..., fast=True)`: ≤ 4e-7 of the exact
# formulas), instead of libdevice's expf and IEEE divisions per element. Measured on the H200
# (f346019, `fusedmlp bench`, device time): hf-blog-geglu at M = 8192 178.2 / 178.7 -> 173.5 µs,
# llama3-8b 4.161 / 4.258 -> 4.110 ms; parity passed. FUSEDMLP_MOSAIC_APPROX_MATH=0 switches it
# off (read at import).
APPROX_MATH: bool = os.environ.get("FUSEDMLP_MOSAIC_APPROX_MATH", "1") != "0"
MEMORY_REGISTERS = 40  # the memory warpgroup only issues TMA (jax's example uses 40 on H100)
COMPUTE_WARPGROUPS = 2  # with warp_specialize
# Under the interpreter the persistent grid has two blocks, so each walks several tiles.
INTERPRET_NUM_SMS = 2
DEFAULT_NUM_SMS = 132  # H200 / H100 SXM, when no GPU is visible (lowering for CUDA on a CPU)

# Under the interpreter: the smallest tiles that exercise the warp-specialised path — two compute
# warpgroups splitting 128 rows, a two-slot pipeline over 16-wide K slabs (three K steps at K=48),
# 64 output columns (one gate/up pair for gated). Legal on the GPU too.
INTERPRET_CONFIG = TileConfig(
    block_m=128, block_n=64, block_k=16, group_m=2, num_warps=4, num_stages=2, warp_specialize=True
)

TUNED_FILE = Path(__file__).with_name("tuned_h200.json")


# ==== support and configs =========================================================================
def unsupported_reason(m: int, n: int, k: int, dtype: str) -> str | None:
    """Why pallas_mosaic cannot take this problem (None: it can). Any M is taken.

    float32: wgmma reads 32-bit operands as tf32 only, and tf32 wgmma takes no transposed operand
    (GPU lowering: "Only f16 WGMMA supports transposes"), so W [K, N] would need a K-major copy.
    K and N: TMA boxes land in swizzled shared-memory tiles, and Mosaic GPU describes such a copy
    with the array cut into whole swizzle-wide column tiles (lowering: "dimension 1 must have size
    smaller or a multiple of its tiling"); wgmma's narrowest swizzle is 32 bytes ("Swizzle 16 is
    not supported"). So K and N must be multiples of 32 bytes (16 elements); padding them instead
    would copy the weights on every call.
    """
    del m
    if dtype not in SUPPORTED_DTYPES:
        return (
            f"{IMPL}: dtype {dtype} is not supported (wgmma takes fp16/bf16 here); "
            f"falls back to impl '{FALLBACK[STACK]}'"
        )
    itemsize = jnp.dtype(dtype).itemsize
    for name, size in (("K", k), ("N", n)):
        if size * itemsize % MIN_SWIZZLE_BYTES:
            return (
                f"{IMPL}: {name}={size} is not a multiple of {MIN_SWIZZLE_BYTES // itemsize} for "
                f"{dtype} (rows of {size * itemsize} bytes; the swizzled TMA tiles of Mosaic GPU "
                f"need multiples of {MIN_SWIZZLE_BYTES}); falls back to impl '{FALLBACK[STACK]}'"
            )
    return None


def _heuristic(family: str, m: int, n: int) -> TileConfig:
    # The shape of jax's example at its best on the H200 (740-753 TFLOP/s): a 128×256 operand tile
    # per block, split into two 128×128 warpgroup tiles, 64-wide K slabs (128-byte swizzle), 4
    # slots; a tiled epilogue so 4 slots still fit. Small M: 64 rows, the operand tile split
    # along N into 64×128 warpgroup tiles.
    # Narrow outputs (n <= 64, nerf-64x5's layers) take a 64-column tile split along M instead:
    # with the 256-wide tile one compute warpgroup's half lies wholly past N, and nerf-64x5
    # (2M rows, 64→64 layers) failed parity on the H200 with it (rel. error 1.0, 2026-12-01),
    # while 64-column tiles split along M pass there (tests/test_pallas_mosaic.py, -m gpu).
    block_m = 64 if m <= WGMMA_M else 128
    if n <= PACK_BLOCK:
        return _ws_tile(128, PACK_BLOCK, epilogue_subtile=1)
    if family == "gated":  # block_n = output columns: the packed operand tile is 256 wide
        return _ws_tile(block_m, 128, epilogue_subtile=1)
    if n <= 128:  # a 128-wide operand tile: the two compute warpgroups split 128 rows
        return _ws_tile(128, 128, epilogue_subtile=2)
    return _ws_tile(block_m, 256, epilogue_subtile=2)


def _ws_tile(block_m: int, block_n: int, *, epilogue_subtile: int) -> TileConfig:
    # Every heuristic tile: 64-wide K slabs (128-byte swizzle), 4 slots, warp-specialized.
    return TileConfig(
        block_m,
        block_n,
        64,
        group_m=8,
        num_warps=4,
        num_stages=4,
        warp_specialize=True,
        epilogue_subtile=epilogue_subtile,
    )


@functools.cache
def tuned_table() -> dict[str, list[dict[str, Any]]]:
    """The committed sweep's best configs ({family: [entry, ...]}; empty if none): measured on
    the H200, but for entries that name another GPU (`gpu`), taken on every Hopper GPU."""
    if not TUNED_FILE.exists():
        return {}
    data = json.loads(TUNED_FILE.read_text())
    return data.get("configs", {})


def tuned_config(family: str, m: int, n: int, k: int, dtype: str) -> TileConfig | None:
    """The tuned entry for (family, N, K) at M's bucket (else the nearest measured M), or None;
    this GPU's own measurements first (common.tiling.measured_here_first). Entries are measured in
    bfloat16; float16 takes the same tiles (the same wgmma and bytes)."""
    del dtype
    entries = [e for e in tuned_table().get(family, []) if (e["n"], e["k"]) == (n, k)]
    entries = measured_here_first(entries, compat.gpu_name())
    if not entries:
        return None
    bucket = int(shape_bucket(m))
    best = min(entries, key=lambda e: abs(math.log2(int(shape_bucket(e["m"])) / bucket)))
    return TileConfig.from_dict(best["config"])


def default_config(
    family: str, m: int, n: int, k: int, dtype: str, *, interpret: bool = False
) -> TileConfig:
    """The tiles without tuning: the committed sweep's entry for this shape if there is one
    (jax_impl/mosaic/tuned_h200.json, `tuned_table`), else the heuristic; INTERPRET_CONFIG under
    the interpreter.
    """
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    if interpret:
        return INTERPRET_CONFIG
    return tuned_config(family, m, n, k, dtype) or _heuristic(family, m, n)


@dataclasses.dataclass(frozen=True)
class Tiles:
    """The static geometry of one launch, derived from a TileConfig (see the module table)."""

    gated: bool
    block_m: int
    block_k: int
    op_n: int  # operand columns of a block's tile (gated: 2·block_n)
    out_n: int  # output columns of a block's tile
    warp_specialize: bool
    split_n: bool  # the compute warpgroups split the tile along N (else along M)
    wg_m: int  # rows of a compute warpgroup's tile
    wg_op_n: int  # operand columns of a compute warpgroup's tile
    epi_n: int  # output columns of one epilogue tile
    num_stages: int
    group_m: int
    # ping-pong (programs_per_sm=2 with warp_specialize): each compute warpgroup owns a whole
    # tile, and the two take turns at the K loop (`pingpong_matmul`)
    pingpong: bool = False

    @property
    def wgs(self) -> int:
        """Compute warpgroups per block."""
        return COMPUTE_WARPGROUPS if self.warp_specialize else 1

    @property
    def wg_out_n(self) -> int:
        return self.wg_op_n // 2 if self.gated else self.wg_op_n

    @property
    def epi_tiles(self) -> tuple[int, int]:
        """Epilogue tiles of a compute warpgroup: (along M, along N)."""
        return self.wg_m // EPI_M, self.wg_out_n // self.epi_n

    @property
    def out_slots(self) -> int:
        """Shared-memory slots of a compute warpgroup's output staging: 2 (double buffer) unless
        the warpgroup stores a single epilogue tile."""
        return min(2, math.prod(self.epi_tiles))

    def staging_slots(self, outputs: Outputs) -> int:
        """The staging slots `outputs` asks for (1 where its staging is wide, 3 or 4 to hold more
        of an act' step's residual tiles in flight), at most one an epilogue tile."""
        return min(outputs.slots, math.prod(self.epi_tiles))

    @property
    def preact_epi_n(self) -> int:
        """Columns of one epilogue tile of the stored pre-activation (`Outputs.preact`): the
        operand columns behind epi_n output columns (gated: the packed 2·epi_n)."""
        return self.epi_n * self.op_n // self.out_n

    def smem_bytes(self, itemsize: int, has_bias: bool, outputs: Outputs | None = None) -> int:
        """Shared memory of the kernel: pipeline slots, output staging (wider for `outputs`
        that scale the output or store the pre-activation too), bias rows (barriers add a few
        bytes)."""
        outputs = outputs or PLAIN_OUTPUT
        ring = self.num_stages * itemsize * (self.block_m + self.op_n) * self.block_k
        staged = self.epi_n * outputs.scale + (self.preact_epi_n if outputs.preact else 0)
        out = self.wgs * self.staging_slots(outputs) * EPI_M * staged * itemsize
        bias = self.wgs * self.wg_op_n * itemsize if has_bias else 0
        return ring + out + bias


def plan_tiles(config: TileConfig, family: str) -> Tiles:
    """The launch geometry of `config` for `family`; ValueError naming the field that cannot be."""
    gated = family == "gated"
    bm, bn = config.block_m, config.block_n
    op_n = 2 * bn if gated else bn
    if bm not in (64, 128, 256):
        raise ValueError(
            f"config.block_m: expected 64, 128 or 256 for {IMPL} (wgmma rows per "
            f"warpgroup are a multiple of {WGMMA_M}), got {bm}"
        )
    if gated and bn % PACK_BLOCK:
        raise ValueError(
            f"config.block_n: expected a multiple of {PACK_BLOCK} for gated (whole "
            f"gate/up blocks of the packed operand), got {bn}"
        )
    if bn < 64:
        raise ValueError(
            f"config.block_n: expected at least 64 for {IMPL} (a 128-byte swizzled "
            f"row of the output staging), got {bn}"
        )
    if config.block_k < 16:
        raise ValueError(f"config.block_k: expected at least 16 for {IMPL}, got {config.block_k}")
    pingpong = config.programs_per_sm == 2
    if config.programs_per_sm not in (1, 2) or (pingpong and not config.warp_specialize):
        raise ValueError(
            f"config.programs_per_sm: expected 1, or 2 with warp_specialize (ping-pong: each "
            f"compute warpgroup a tile of its own) for {IMPL}, got {config.programs_per_sm} "
            f"(warp_specialize={config.warp_specialize})"
        )
    if pingpong and config.num_stages < 2:
        # a K step's slot is released once the NEXT step's wgmma is issued (one in flight), and
        # that step's slab needs a free slot: with one slot the two would wait on each other
        raise ValueError(
            f"config.num_stages: ping-pong needs at least 2 pipeline slots, got {config.num_stages}"
        )
    if pingpong:
        split_n, wg_m, wg_op_n = False, bm, op_n
    elif config.warp_specialize:
        split_n = op_n >= 2 * 128
        if not split_n and bm < 2 * WGMMA_M:
            raise ValueError(
                f"config.block_m: expected at least {2 * WGMMA_M} with warp_specialize and an "
                f"operand tile {op_n} < 256 wide (the two compute warpgroups split the rows), "
                f"got {bm}"
            )
        wg_m, wg_op_n = (bm, op_n // 2) if split_n else (bm // 2, op_n)
    else:
        split_n, wg_m, wg_op_n = False, bm, op_n
    if wg_op_n % SWIZZLE_COLUMNS and wg_op_n & (wg_op_n - 1):
        # 192 is whole swizzle atoms; 320 split between two warpgroups is 160 each, which Mosaic
        # GPU cannot slice out of the swizzled operand tile (it lowers, then fails to compile)
        raise ValueError(
            f"config.block_n: a compute warpgroup's operand tile would be {wg_op_n} columns "
            f"(block_n={bn}, family {family}); expected a power of two or a multiple of "
            f"{SWIZZLE_COLUMNS} (whole swizzle atoms of the shared-memory tile)"
        )
    if wg_op_n > WGMMA_MAX_N:
        raise ValueError(
            f"config.block_n: a warpgroup's operand tile is {wg_op_n} columns, over "
            f"wgmma's {WGMMA_MAX_N} (block_n={bn}, family {family})"
        )
    if wg_m * wg_op_n > MAX_ACC_ELEMS:
        raise ValueError(
            f"config: a compute warpgroup's fp32 accumulator would be {wg_m} × {wg_op_n}, over "
            f"{MAX_ACC_ELEMS} elements (128 registers a thread); got block_m={bm}, block_n={bn}, "
            f"warp_specialize={config.warp_specialize}, family {family}"
        )
    wg_out_n = wg_op_n // 2 if gated else wg_op_n
    if wg_out_n % config.epilogue_subtile:
        raise ValueError(
            f"config.epilogue_subtile: {config.epilogue_subtile} does not divide a "
            f"warpgroup's {wg_out_n} output columns"
        )
    epi_n = wg_out_n // config.epilogue_subtile
    if gated and epi_n % PACK_BLOCK:
        raise ValueError(
            f"config.epilogue_subtile: gated epilogue tiles hold whole gate/up blocks, so a "
            f"warpgroup's {wg_out_n} output columns / {config.epilogue_subtile} = {epi_n} must "
            f"be a multiple of {PACK_BLOCK}"
        )
    if epi_n < 32:
        raise ValueError(
            f"config.epilogue_subtile: epilogue tiles of {epi_n} columns; expected "
            f"at least 32 (got {wg_out_n} / {config.epilogue_subtile})"
        )
    return Tiles(
        gated=gated,
        block_m=bm,
        block_k=config.block_k,
        op_n=op_n,
        out_n=bn,
        warp_specialize=config.warp_specialize,
        split_n=split_n,
        wg_m=wg_m,
        wg_op_n=wg_op_n,
        epi_n=epi_n,
        num_stages=config.num_stages,
        group_m=config.group_m,
        pingpong=pingpong,
    )


def plan_widths(config: TileConfig, widths: Sequence[int], family: str, dtype: str) -> list[Tiles]:
    """The tiles of a grouped launch's products (`grouped_matmul`), `widths` their block_n: each
    `config`'s but for its width, with `config`'s epilogue tiles (epi_n columns: one staging
    ring serves every product), so a product's warpgroup columns must be whole epilogue tiles —
    hf-blog's 128×256 (split along N, 2 × 64-column epilogue tiles a warpgroup) beside 128×192
    (split along M, 3 a warpgroup). ValueError naming what cannot be, or where a product's
    tiles do not fit in shared memory (`check_config`'s rule; the rings of different widths
    share theirs)."""
    base = check_config(config, dtype, num_weights=2 if family == "gated" else 1, residual=False)
    tiles = []
    for bn in widths:
        t = plan_tiles(dataclasses.replace(config, block_n=bn, epilogue_subtile=1), family)
        if t.wg_out_n % base.epi_n:
            raise ValueError(
                f"widths: block_n={bn} leaves a compute warpgroup {t.wg_out_n} output columns, "
                f"not whole epilogue tiles of {base.epi_n} (config.block_n={config.block_n}, "
                f"epilogue_subtile={config.epilogue_subtile})"
            )
        t = dataclasses.replace(t, epi_n=base.epi_n)
        need = t.smem_bytes(jnp.dtype(dtype).itemsize, has_bias=False)
        if need > SMEM_BYTES:
            raise ValueError(
                f"widths: block_n={bn} needs {need} bytes of shared memory, over {SMEM_BYTES} "
                f"(config {config})"
            )
        tiles.append(t)
    return tiles


def check_config(
    config: TileConfig,
    dtype: str,
    num_weights: int,
    residual: bool,
    outputs: Outputs | None = None,
) -> Tiles:
    """ValueError naming the field when a TileConfig cannot drive the Mosaic GPU kernel.
    num_weights: 1 for linear_act, 2 for gated (the packed [W|V] operand). The residual is
    staged in the output slots, so it costs no shared memory of its own; `outputs` (the
    backward's wide or second outputs) does."""
    del residual
    tiles = plan_tiles(config, "gated" if num_weights == 2 else "linear_act")
    (outputs or PLAIN_OUTPUT).check(tiles)
    need = tiles.smem_bytes(jnp.dtype(dtype).itemsize, has_bias=True, outputs=outputs)
    if need > SMEM_BYTES:
        raise ValueError(
            f"config: expected at most {SMEM_BYTES} bytes of shared memory, got {need} for "
            f"{config} (lower num_stages, raise epilogue_subtile or shrink the tiles)"
        )
    return tiles


# ==== launcher helpers ============================================================================
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(value: int, multiple: int) -> int:
    """At least one tile, even for 0 (torch_impl/cross pads to this)."""
    return max(1, cdiv(value, multiple)) * multiple


def pad_to(a: jax.Array, shape: Sequence[int]) -> jax.Array:
    """Zero-pad `a` at the end of each dimension up to `shape` (no copy when already there)."""
    widths = [(0, s - d) for s, d in zip(shape, a.shape, strict=True)]
    if all(hi == 0 for _, hi in widths):
        return a
    return jnp.pad(a, widths)


def padded_extents(m: int, n: int, k: int, tiles: Tiles, interpret: bool) -> tuple[int, int, int]:
    """(M, N, K) the launcher pads the operands to; the problem's own extents mean no copy.

    M ≥ 8 that is not a multiple of 8: the TMA descriptors of X, the output and the residual cut
    M into whole 8-row swizzle atoms, so those rows are padded (X read once more, the output
    sliced): the one copy left, for odd M only. The jax 0.10 interpreter raises on the
    out-of-bounds boxes that the GPU (and the 0.11 interpreter) zero-fill and clip, so there every
    extent is padded to whole tiles (`compat.mosaic_interpreter_models_tma_edges`).
    """
    if interpret and not compat.mosaic_interpreter_models_tma_edges():
        return (round_up(m, tiles.block_m), round_up(n, tiles.out_n), round_up(k, tiles.block_k))
    return (m if m <= ROW_TILE else round_up(m, ROW_TILE)), n, k


def interpret_param(interpret: bool) -> Any:
    """`plgpu.kernel(interpret=...)`: the Mosaic GPU interpreter's params, or None to compile."""
    if not interpret:
        return None
    return compat.mosaic_interpret_params()


def num_sms(interpret: bool) -> int:
    """Blocks of the persistent grid: one per SM of the GPU."""
    if interpret:
        return INTERPRET_NUM_SMS
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    count = getattr(gpus[0], "core_count", None) if gpus else None
    return int(count) if count else DEFAULT_NUM_SMS


def mma_transforms(cols: int, dtype: Any) -> tuple[Any, Any]:
    """Shared-memory transforms wgmma and TMA want for a tile `cols` wide: rows of 8 × swizzle."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(cols * itemsize * 8)  # largest of 128/64/32/16 bytes that divides
    return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


def launch(
    kernel: Callable[..., None],
    operands: Sequence[jax.Array],
    out_shape: tuple[int, int],
    dtype: Any,
    tiles: Tiles,
    *,
    name: str,
    interpret: bool,
    outputs: Outputs | None = None,
    preact_cols: int = 0,
    over_last: bool = False,
) -> Any:
    """One `plgpu.kernel` call: a persistent grid of min(SMs, tiles) blocks of 1 or 3 warpgroups.
    `out_shape` is the (first) output's; with `outputs.preact` the call returns (out, z), z
    [M, preact_cols].

    `over_last`: the output is written over the last operand (of its shape and dtype; the kernel
    gets no output ref and writes that operand's), which goes in as a jax Ref: plgpu.kernel
    aliases it in and out (`compat.mosaic_kernel_aliases_refs`), so XLA gives the output the
    operand's buffer where nothing reads the operand after this call, and copies it first where
    something does — the caller's array is never changed. The backward's act' step (its saved z
    read tile by tile, each tile's gradient stored where it was read)."""
    outputs = outputs or PLAIN_OUTPUT
    m, n = out_shape
    num_tiles = cdiv(m, tiles.block_m) * cdiv(cdiv(n, outputs.scale), tiles.out_n)
    out_type: Any = jax.ShapeDtypeStruct(out_shape, dtype)
    if outputs.preact:
        out_type = (out_type, jax.ShapeDtypeStruct((m, preact_cols), dtype))
    if over_last:
        last = operands[-1]
        if outputs.preact or (last.shape, last.dtype) != (tuple(out_shape), jnp.dtype(dtype)):
            raise ValueError(
                f"over_last: expected a last operand of the output's shape {tuple(out_shape)} and "
                f"dtype {jnp.dtype(dtype)} and one output, got {last.shape} {last.dtype}, "
                f"preact={outputs.preact}"
            )
        ref = jax.new_ref(last)
        _kernel_call(kernel, [*operands[:-1], ref], (), num_tiles, tiles, name=name,
                     interpret=interpret)  # fmt: skip
        return ref[...]
    return _kernel_call(
        kernel, operands, out_type, num_tiles, tiles, name=name, interpret=interpret
    )


def launch_grouped(
    kernel: Callable[..., None],
    operands: Sequence[jax.Array],
    out_shapes: Sequence[tuple[int, int]],
    dtype: Any,
    product_tiles: Sequence[Tiles],
    *,
    name: str,
    interpret: bool,
) -> tuple[jax.Array, ...]:
    """`launch` for a grouped kernel (`grouped_matmul`): one output per product (each on its
    tiles), the grid over all their tiles."""
    num_tiles = sum(
        cdiv(m, t.block_m) * cdiv(n, t.out_n)
        for (m, n), t in zip(out_shapes, product_tiles, strict=True)
    )
    out_type = tuple(jax.ShapeDtypeStruct(shape, dtype) for shape in out_shapes)
    return _kernel_call(
        kernel, operands, out_type, num_tiles, product_tiles[0], name=name, interpret=interpret
    )


def _kernel_call(
    kernel: Callable[..., None],
    operands: Sequence[jax.Array],
    out_type: Any,
    num_tiles: int,
    tiles: Tiles,
    *,
    name: str,
    interpret: bool,
) -> Any:
    threads = (
        dict(num_threads=COMPUTE_WARPGROUPS + 1, thread_name="wg") if tiles.warp_specialize else {}
    )
    return plgpu.kernel(
        kernel,
        out_type=out_type,
        grid=(max(1, min(num_sms(interpret), num_tiles)),),
        grid_names=("sm",),
        **threads,
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup, approx_math=APPROX_MATH
        ),
        interpret=interpret_param(interpret),
        kernel_name=name,
    )(*operands)


# ==== in-kernel pieces ============================================================================
def row_vector(ref: Any, rows: int, *, interpret: bool) -> jax.Array:
    """A [cols] vector in shared memory as an fp32 [rows, cols] tile in the accumulator's layout,
    to add to it (the bias of the epilogue).

    On the GPU the load must produce wgmma's column layout (`Layout.WGMMA.reduce(0)`), from which
    broadcasting over the rows is free. The jax 0.10 interpreter has no rule for plgpu.load's
    primitive nor for `layout_cast` and needs no layouts, so there the ref is read plainly.
    """
    if not interpret or compat.mosaic_interpreter_has_layouts():
        v = compat.mosaic_load(ref, layout=plgpu.Layout.WGMMA.reduce(0))
    else:
        v = ref[...]
    v = v.astype(jnp.float32)
    return lax.broadcast_in_dim(v, (rows, v.shape[0]), (1,))


def smem_transforms(
    t: Tiles,
    k: int,
    w_cols: int,
    n_out: int,
    dtype: Any,
    *,
    x_minor: int = 0,
    out_scale: int = 1,
    op_n: int = 0,
) -> tuple[Any, Any]:
    """The shared-memory transforms of the (X, W) slabs and of the output staging tiles.

    wgmma wants A and B with one swizzle, of at least 32 bytes; a TMA box into a swizzled tile
    needs the array's minor dimension to be a multiple of the swizzle's width (Mosaic GPU:
    "dimension 1 must have size smaller or a multiple of its tiling"). So the slabs' swizzle is
    the largest that divides the K slab, K, the weight tile and the weight's width: 128 bytes for
    every model width (multiples of 64), 32 at least (unsupported_reason); the staging tile's,
    the largest that divides its width and N. A transposed operand (`Operands`) adds its slab's
    and its array's minor extents: `x_minor` the X array's row length when X is read transposed
    (its slab is then block_m wide), and `w_cols` is W's row length either way. A staging tile
    is out_scale·epi_n wide (`Outputs.scale`). `op_n`: the weight tiles' width where a grouped
    launch's products differ in it (their gcd; 0: the tiles')."""
    minors = [t.block_k, k, op_n or t.op_n, w_cols]
    if x_minor:
        minors += [t.block_m, x_minor]
    slabs = mma_transforms(math.gcd(*minors), dtype)
    return slabs, mma_transforms(math.gcd(out_scale * t.epi_n, n_out), dtype)


@dataclasses.dataclass(frozen=True)
class Operands:
    """How the driver reads its two operands: X as [M, K] or, `x_kmajor`, as its transpose
    stored [K, M] (the weight gradient's hᵀ, read in place); W as [K, N] or, `w_kmajor`, as its
    transpose stored [N, K] (the input gradient's Wᵀ). A transposed slab is loaded by TMA as it
    lies and handed to wgmma as a transposed view (16-bit operands may be MN-major)."""

    x_kmajor: bool = False
    w_kmajor: bool = False

    def check(self, m: int) -> None:
        """ValueError where the driver cannot read these operands: a transposed X's rows (M, its
        minor extent) must be a multiple of 16 (wgmma's 32-byte swizzle, as K's and N's are:
        `unsupported_reason`)."""
        if self.x_kmajor and m % 16:
            raise ValueError(
                f"x_kmajor: M (x's row length, read transposed) must be a multiple of 16, got {m}"
            )

    def shapes(self, x_gmem: Any, w_gmem: Any) -> tuple[int, int, int]:
        """(M, K, W's row length) of the product."""
        m, k = x_gmem.shape[::-1] if self.x_kmajor else x_gmem.shape
        return m, k, w_gmem.shape[1]

    def specs(self, t: Tiles, transforms: Any) -> list[Any]:
        """The K pipeline's BlockSpecs of X's and W's slabs (a K step ki each)."""

        def spec(shape: tuple[int, int], index: Callable[[Any], tuple[Any, Any]]) -> Any:
            return plgpu.BlockSpec(shape, index, transforms=transforms, memory_space=plgpu.SMEM)

        x = (
            spec((t.block_k, t.block_m), lambda ki: (ki, 0))
            if self.x_kmajor
            else spec((t.block_m, t.block_k), lambda ki: (0, ki))
        )
        w = (
            spec((t.op_n, t.block_k), lambda ki: (0, ki))
            if self.w_kmajor
            else spec((t.block_k, t.op_n), lambda ki: (ki, 0))
        )
        return [x, w]

    def tile_refs(self, x_gmem: Any, w_gmem: Any, m_slice: Any, op_slice: Any) -> tuple[Any, Any]:
        """X's rows and W's columns of one output tile (every K)."""
        x = x_gmem.at[:, m_slice] if self.x_kmajor else x_gmem.at[m_slice, :]
        w = w_gmem.at[op_slice, :] if self.w_kmajor else w_gmem.at[:, op_slice]
        return x, w

    def slab_shapes(self, t: Tiles) -> tuple[tuple[int, int], tuple[int, int]]:
        """The shared-memory shapes of one K step's X and W slabs, as they lie in GMEM."""
        x = (t.block_k, t.block_m) if self.x_kmajor else (t.block_m, t.block_k)
        w = (t.op_n, t.block_k) if self.w_kmajor else (t.block_k, t.op_n)
        return x, w

    def slab_refs(
        self, x_gmem: Any, w_gmem: Any, m_slice: Any, op_slice: Any, k_slice: Any
    ) -> tuple[Any, Any]:
        """One K step's X and W slabs of an output tile, in GMEM (the ping-pong kernel's copies)."""
        x = x_gmem.at[k_slice, m_slice] if self.x_kmajor else x_gmem.at[m_slice, k_slice]
        w = w_gmem.at[op_slice, k_slice] if self.w_kmajor else w_gmem.at[k_slice, op_slice]
        return x, w

    def mma_views(self, x_smem: Any, w_smem: Any, rows: Any, cols: Any) -> tuple[Any, Any]:
        """A warpgroup's [rows, K slab] of X and [K slab, cols] of W, as wgmma takes them."""
        # ref.transpose: what plgpu.transpose_ref does in jax 0.10 and 0.11 (deprecated in 0.11)
        a = x_smem.at[:, rows].transpose((1, 0)) if self.x_kmajor else x_smem.at[rows]
        b = w_smem.at[cols, :].transpose((1, 0)) if self.w_kmajor else w_smem.at[:, cols]
        return a, b


# X [M, K] and W [K, N] as they are: the forward's operands (every family's default).
AS_STORED = Operands()


@dataclasses.dataclass(frozen=True)
class Outputs:
    """What the epilogue stores per accumulator tile, beyond one output tile of its columns:
    `scale` output columns per accumulator column (2: a gated layer's act' step writes the packed
    [dz|dg] from dh, the backward's "dact_gated"; the residual slot, which carries the saved
    packed z there, is as wide), and `preact`: a second output, the pre-activation (accumulator
    plus bias, in the operand's columns: packed for gated), which the saving forward keeps."""

    scale: int = 1
    preact: bool = False
    # staging slots per compute warpgroup: 2 lets one epilogue tile's TMA store overlap the next
    # tile's math; 1 halves the staging, leaving room for a deeper K pipeline when it is wide;
    # 3 or 4 (an act' step's) hold that many epilogue tiles' residuals in flight, requested
    # before the K loop (`prefetch_residual`) — the rest one slot's store later (`store_tile`)
    slots: int = 2

    def check(self, tiles: Tiles) -> None:
        """ValueError where the driver cannot store these outputs: a doubled output is built
        from whole 64-column gate/up blocks."""
        if self.slots not in STAGING_SLOTS:
            raise ValueError(
                f"outputs.slots: expected one of {STAGING_SLOTS} staging slots, got {self.slots}"
            )
        if self == PLAIN_OUTPUT:
            return
        if self.scale not in (1, 2) or (self.scale == 2 and (tiles.gated or self.preact)):
            raise ValueError(
                f"outputs: expected scale 1, or 2 for a linear_act product without a stored "
                f"pre-activation (the packed act' step), got {self} for family "
                f"{'gated' if tiles.gated else 'linear_act'}"
            )
        if self.scale == 2 and tiles.epi_n % PACK_BLOCK:
            raise ValueError(
                f"config.epilogue_subtile: a doubled (packed gate/up) output needs epilogue "
                f"tiles of whole {PACK_BLOCK}-column blocks, got {tiles.epi_n} columns"
            )


PLAIN_OUTPUT = Outputs()
STAGING_SLOTS = (1, 2, 3, 4)


# The family's "3. compute" for one epilogue tile: (acc, bias_ref or None, rows, en, o_slot,
# z_slot) -> None, writing the tile (cast to the output dtype) into the shared-memory slot o_slot
# and, where `Outputs.preact`, the pre-activation tile into z_slot (else None). With a residual
# (linear_act's, or the saved z of an act' step) o_slot already holds its tile when it is called.
EpilogueFn = Callable[[jax.Array, Any, slice, int, Any, Any], None]


def persistent_matmul(
    x_gmem: Any,
    w_gmem: Any,
    b_gmem: Any | None,
    r_gmem: Any | None,
    o_gmem: Any,
    *,
    tiles: Tiles,
    epilogue: EpilogueFn,
    operands: Operands = AS_STORED,
    outputs: Outputs = PLAIN_OUTPUT,
    z_gmem: Any | None = None,
) -> None:
    """The kernel body both families share: 1. program -> tile, 2. load, the K pipeline, the
    epilogue tiles (3. compute: `epilogue`), 4. store. Refs are whole arrays in GMEM; `operands`
    says whether X or W is read transposed, `outputs` whether the output is doubled or the
    pre-activation stored too (into z_gmem); ping-pong tiles run `pingpong_matmul`."""
    operands.check(operands.shapes(x_gmem, w_gmem)[0])
    outputs.check(tiles)
    if tiles.pingpong:
        pingpong_matmul(x_gmem, w_gmem, b_gmem, r_gmem, o_gmem, tiles=tiles, epilogue=epilogue,
                        operands=operands, outputs=outputs, z_gmem=z_gmem)  # fmt: skip
        return
    dtype = o_gmem.dtype
    t = tiles
    m, k, w_cols = operands.shapes(x_gmem, w_gmem)
    n_out = o_gmem.shape[1]
    n_acc = cdiv(n_out, outputs.scale)  # output columns the accumulator tiles cover
    m_iters, n_iters, k_iters = cdiv(m, t.block_m), cdiv(n_acc, t.out_n), cdiv(k, t.block_k)
    ws = t.warp_specialize
    slots = t.staging_slots(outputs)

    x_minor = m if operands.x_kmajor else 0
    transforms, out_transforms = smem_transforms(
        t, k, w_cols, n_out, dtype, x_minor=x_minor, out_scale=outputs.scale
    )
    in_specs = operands.specs(t, transforms)

    def warpgroup_slices(wg: Any) -> tuple[Any, Any]:
        """This compute warpgroup's rows of the X slab and columns of the weight slab."""
        if not ws:
            return slice(None), slice(None)
        if t.split_n:
            return slice(None), pl.ds(wg * t.wg_op_n, t.wg_op_n)
        return pl.ds(wg * t.wg_m, t.wg_m), slice(None)

    def mma_body(idxs: Any, x_smem: Any, w_smem: Any, acc_ref: Any) -> Any:
        del idxs
        wg = lax.axis_index("wg") if ws else 0
        rows, cols = warpgroup_slices(wg)
        plgpu.wgmma(acc_ref, *operands.mma_views(x_smem, w_smem, rows, cols))
        # Warp-specialised: the slot goes back to the memory warpgroup when this returns, so
        # the wgmma must be done reading it; the other compute warpgroup keeps the tensor core
        # busy meanwhile. One warpgroup: keep one wgmma in flight (the slot is released a step
        # later, delay_release=1).
        plgpu.wgmma_wait(0 if ws or t.num_stages == 1 else 1)
        return acc_ref

    def ws_pipeline(compute_context: Any) -> Any:
        return plgpu.emit_pipeline_warp_specialized(
            mma_body,
            grid=(k_iters,),
            memory_registers=MEMORY_REGISTERS,
            in_specs=in_specs,
            wg_axis="wg",
            num_compute_wgs=COMPUTE_WARPGROUPS,
            max_concurrent_steps=t.num_stages,
            compute_context=compute_context,
        )

    def plain_pipeline(acc_ref: Any) -> Any:
        delay = 0 if t.num_stages == 1 else 1
        specs = [dataclasses.replace(s, delay_release=delay) for s in in_specs]
        return plgpu.emit_pipeline(
            lambda idxs, x_smem, w_smem: mma_body(idxs, x_smem, w_smem, acc_ref),
            grid=(k_iters,),
            in_specs=specs,
            max_concurrent_steps=t.num_stages,
        )

    ignore = lambda *_, **__: None  # noqa: E731  (the allocations do not depend on the bodies)
    allocations = dict(
        pipeline_allocs=ws_pipeline(ignore).get_allocations(x_gmem, w_gmem) if ws else None,
        # Per compute warpgroup: `slots` output staging tiles (and pre-activation ones) and its
        # bias row.
        out_smem=plgpu.SMEM(
            (t.wgs, slots, EPI_M, t.epi_n * outputs.scale), dtype, transforms=out_transforms
        ),
        z_smem=(
            plgpu.SMEM(
                (t.wgs, slots, EPI_M, t.preact_epi_n),
                dtype,
                transforms=mma_transforms(math.gcd(t.preact_epi_n, z_gmem.shape[1]), dtype),
            )
            if outputs.preact
            else None
        ),
        b_smem=plgpu.SMEM((t.wgs, t.wg_op_n), dtype) if b_gmem is not None else None,
        b_bars=plgpu.Barrier(num_barriers=t.wgs) if b_gmem is not None else None,
        r_bars=plgpu.Barrier(num_barriers=t.wgs * slots) if r_gmem is not None else None,
    )

    def scope(
        pipeline_allocs: Any,
        out_smem: Any,
        z_smem: Any,
        b_smem: Any,
        b_bars: Any,
        r_bars: Any,
    ) -> None:
        @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
        def _tile_loop(info: Any) -> None:
            # 1. program -> tile: grouped, snaking order of the output tiles (group_m-row bands)
            (lin,) = info.index
            m_idx, n_idx = plgpu.planar_snake(lin, (m_iters, n_iters), 0, t.group_m)
            m_slice = pl.ds(m_idx * t.block_m, t.block_m)
            op_slice = pl.ds(n_idx * t.op_n, t.op_n)

            def compute_context(run_pipeline: Callable[[Any], Any]) -> None:
                wg = lax.axis_index("wg") if ws else 0
                row0 = m_idx * t.block_m + (wg * t.wg_m if ws and not t.split_n else 0)
                op0 = n_idx * t.op_n + (wg * t.wg_op_n if t.split_n else 0)
                col0 = n_idx * t.out_n + (wg * t.wg_out_n if t.split_n else 0)

                def acc_scope(acc_ref: Any) -> None:
                    prefetched = request_bias_and_residual(
                        b_gmem, r_gmem, wg, op0, row0, col0, b_smem, b_bars, out_smem, r_bars,
                        tiles=t, out_scale=outputs.scale, slots=slots,
                    )  # fmt: skip
                    run_pipeline(acc_ref)
                    acc = acc_ref[...]  # awaits every wgmma
                    bias = None
                    if b_gmem is not None:
                        plgpu.barrier_wait(b_bars.at[wg])
                        bias = b_smem.at[wg]
                    preact = (z_smem, z_gmem, op0) if outputs.preact else None
                    store_tile(acc, bias, row0, col0, wg, out_smem, r_gmem, r_bars, o_gmem,
                               tiles=t, epilogue=epilogue, out_scale=outputs.scale,
                               preact=preact, slots=slots, prefetched=prefetched)  # fmt: skip

                pl.run_scoped(acc_scope, plgpu.ACC((t.wg_m, t.wg_op_n), jnp.float32))

            x_tile, w_tile = operands.tile_refs(x_gmem, w_gmem, m_slice, op_slice)
            if ws:
                ws_pipeline(compute_context)(x_tile, w_tile, allocations=pipeline_allocs)
            else:
                compute_context(lambda acc_ref: plain_pipeline(acc_ref)(x_tile, w_tile))

        # The block may not exit while a TMA store still reads its shared memory.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    pl.run_scoped(scope, **allocations, collective_axes="wg" if ws else ())


def _epilogue_window(
    row0: Any, col0: Any, em: int, en: int, t: Tiles, out_scale: int
) -> tuple[Any, Any]:
    """The output rows and columns of epilogue tile (em, en) of a warpgroup's output tile."""
    gm = pl.ds(row0 + em * EPI_M, EPI_M)
    gn = pl.ds(out_scale * (col0 + en * t.epi_n), out_scale * t.epi_n)
    return gm, gn


def prefetch_residual(
    r_gmem: Any,
    row0: Any,
    col0: Any,
    wg: Any,
    out_smem: Any,
    r_bars: Any,
    *,
    tiles: Tiles,
    out_scale: int,
    slots: int,
) -> int:
    """Request the residual of a warpgroup's first epilogue tiles (one a staging slot) before its
    K loop, so they land under it; returns how many (store_tile's `prefetched`).

    Why: the epilogue used to load each tile's residual and wait for it at once — a DRAM round
    trip per epilogue tile with the tensor cores idle, and the act' steps' residual (the saved
    [z|g], as many bytes as the output) is the largest read of their epilogue: on an H100
    (b566817) hf-blog-geglu's gated act' step ran 132 µs against 65 for its bytes alone. The
    previous tile's stores must be done reading the slots first (they were issued last, at the
    end of its epilogue)."""
    em_tiles, en_tiles = tiles.epi_tiles
    count = min(slots, em_tiles * en_tiles)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    for s in range(count):
        gm, gn = _epilogue_window(row0, col0, s // en_tiles, s % en_tiles, tiles, out_scale)
        plgpu.copy_gmem_to_smem(r_gmem.at[gm, gn], out_smem.at[wg, s], r_bars.at[wg * slots + s])
    return count


def request_bias_and_residual(
    b_gmem: Any | None,
    r_gmem: Any | None,
    wg: Any,
    op0: Any,
    row0: Any,
    col0: Any,
    b_smem: Any,
    b_bars: Any,
    out_smem: Any,
    r_bars: Any,
    *,
    tiles: Tiles,
    out_scale: int,
    slots: int,
) -> int:
    """2. load, before a warpgroup's K loop: its bias row (from operand column op0) and its first
    residual tiles (`prefetch_residual`), landing while the K loop runs; returns how many residual
    tiles were requested (store_tile's `prefetched`). Both drivers' (persistent_matmul,
    grouped_matmul)."""
    if b_gmem is not None:
        plgpu.copy_gmem_to_smem(b_gmem.at[pl.ds(op0, tiles.wg_op_n)], b_smem.at[wg], b_bars.at[wg])
    if r_gmem is None:
        return 0
    return prefetch_residual(
        r_gmem, row0, col0, wg, out_smem, r_bars, tiles=tiles, out_scale=out_scale, slots=slots
    )


def store_tile(
    acc: jax.Array,
    bias: Any,
    row0: Any,
    col0: Any,
    wg: Any,
    out_smem: Any,
    r_gmem: Any,
    r_bars: Any,
    o_gmem: Any,
    *,
    tiles: Tiles,
    epilogue: EpilogueFn,
    out_scale: int = 1,
    preact: tuple[Any, Any, Any] | None = None,
    slots: int | None = None,
    prefetched: int = 0,
) -> None:
    """A compute warpgroup's epilogue tiles of one output tile (rows from row0, output columns
    from col0): per 64-row × epi_n tile, the residual (if any) into a staging slot, 3. compute
    (the family's `epilogue`, staged in the slot), 4. store by TMA; two slots or more, so one
    tile's store overlaps the next one's math. `out_scale` output (and residual) columns per
    accumulator column; `preact` (z_smem, z_gmem, op0: the warpgroup's first operand column):
    the pre-activation tile is staged and stored too, in the same bulk group as the output.
    `slots`: the staging slots per warpgroup (default `tiles.out_slots`); `prefetched`: how many
    leading epilogue tiles' residuals `prefetch_residual` already requested (awaited here, not
    loaded again).

    A residual past the prefetched ones goes into its slot as soon as the slot's previous store
    has read it — requested right after that store, `slots` epilogue tiles ahead of its use —
    not when its own tile comes up, so the act' step's saved [z|g] arrives from DRAM while the
    tiles between compute. Measured on hf-blog's act' step (H100, bench/dact_probe.py): nothing
    while the epilogue's arithmetic was the longer wait (130.6 → 130.3 µs), 3 % once it was cut
    away (99.7 → 96.5 with none); it is also what lets 3 or 4 slots keep residuals in flight."""
    t = tiles
    em_tiles, en_tiles = t.epi_tiles
    count = em_tiles * en_tiles
    slots = t.out_slots if slots is None else slots
    # The previous tile's stores must be done reading the staging slots.
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    for i in range(count):
        em, en = divmod(i, en_tiles)
        slot = i % slots
        o_slot = out_smem.at[wg, slot]
        gm, gn = _epilogue_window(row0, col0, em, en, t, out_scale)
        if r_gmem is None:
            # one bulk group per epilogue tile (its output and pre-activation stores together):
            # the slot's previous store (slots tiles back) must be done reading it
            plgpu.wait_smem_to_gmem(slots - 1, wait_read_only=True)
        else:
            bar = r_bars.at[wg * slots + slot]
            if i >= prefetched and i < slots:  # not requested before: only with prefetched=0
                plgpu.copy_gmem_to_smem(r_gmem.at[gm, gn], o_slot, bar)
            plgpu.barrier_wait(bar)
        z_slot = preact[0].at[wg, slot] if preact is not None else None
        # 3. compute (the family's fp32 epilogue, staged in o_slot and z_slot)
        epilogue(acc, bias, slice(em * EPI_M, (em + 1) * EPI_M), en, o_slot, z_slot)
        # 4. store
        plgpu.commit_smem()  # generic-proxy writes -> visible to TMA
        if preact is not None:
            _, z_gmem, op0 = preact
            zn = pl.ds(op0 + en * t.preact_epi_n, t.preact_epi_n)
            plgpu.copy_smem_to_gmem(z_slot, z_gmem.at[gm, zn], commit_group=False)
        plgpu.copy_smem_to_gmem(o_slot, o_gmem.at[gm, gn])
        ahead = i + slots  # the epilogue tile this slot serves next
        if r_gmem is not None and ahead < count:
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # this store has read the slot
            gm, gn = _epilogue_window(row0, col0, *divmod(ahead, en_tiles), t, out_scale)
            plgpu.copy_gmem_to_smem(r_gmem.at[gm, gn], o_slot, bar)


@dataclasses.dataclass(frozen=True)
class Product:
    """One product of a grouped launch (`grouped_matmul`): X, W and the output, GMEM refs, and
    the product's own tiles where they are narrower or wider than the launch's (None: the
    launch's; `check_widths` says what may differ)."""

    x: Any
    w: Any
    o: Any
    tiles: Tiles | None = None


# What every product of a grouped launch shares: the K loop (slab, ring depth), the X slab (rows),
# the compute warpgroups' roles and the staging tiles. Widths (block_n, so the operand tile, the
# warpgroups' split, the epilogue tiles' count) and the snaking band may differ.
SHARED_TILE_FIELDS = ("gated", "block_m", "block_k", "warp_specialize", "num_stages", "pingpong",
                      "epi_n")  # fmt: skip


def check_widths(tiles: Tiles, product_tiles: Sequence[Tiles]) -> None:
    """ValueError naming the fields where a product's tiles differ from the launch's in more
    than their width (SHARED_TILE_FIELDS)."""
    for g, pt in enumerate(product_tiles):
        differ = [f for f in SHARED_TILE_FIELDS if getattr(pt, f) != getattr(tiles, f)]
        if differ:
            raise ValueError(
                f"config: product {g}'s tiles may differ from the launch's only in width, got "
                + ", ".join(f"{f}={getattr(pt, f)} (launch: {getattr(tiles, f)})" for f in differ)
            )


def pingpong_matmul(
    x_gmem: Any,
    w_gmem: Any,
    b_gmem: Any | None,
    r_gmem: Any | None,
    o_gmem: Any,
    *,
    tiles: Tiles,
    epilogue: EpilogueFn,
    operands: Operands = AS_STORED,
    outputs: Outputs = PLAIN_OUTPUT,
    z_gmem: Any | None = None,
) -> None:
    """`persistent_matmul` with the compute warpgroups in ping-pong (`Tiles.pingpong`): the
    hand-rolled driver (`grouped_matmul`) on one product."""
    grouped_matmul([Product(x_gmem, w_gmem, o_gmem)], b_gmem, r_gmem, z_gmem, tiles=tiles,
                   epilogue=epilogue, operands=operands, outputs=outputs)  # fmt: skip


def weight_rings(
    shapes: Sequence[tuple[int, int]], dtype: Any, transforms: Any, *, num_stages: int,
    interpret: bool,
) -> Any:  # fmt: skip
    """The allocation of the weight slabs' rings, one a slab shape: one ring, or rings over the
    same shared memory (`plgpu.RefUnion`; the driver never has two in use at once). Under an
    interpreter that has no RefUnion (jax 0.10's) they are apart: it does not bound shared
    memory. The scope receives what `tuple(...)` turns into the rings, in `shapes`' order."""
    rings = [plgpu.SMEM((num_stages, *shape), dtype, transforms=transforms) for shape in shapes]
    if len(rings) == 1:
        return rings[0]
    if interpret and not compat.mosaic_interpreter_has_ref_union():
        return tuple(rings)
    return plgpu.RefUnion(*rings)


def grouped_matmul(
    products: Sequence[Product],
    b_gmem: Any | None = None,
    r_gmem: Any | None = None,
    z_gmem: Any | None = None,
    *,
    tiles: Tiles,
    epilogue: EpilogueFn,
    operands: Operands = AS_STORED,
    outputs: Outputs = PLAIN_OUTPUT,
    interpret: bool = False,
) -> None:
    """The hand-rolled warp-specialised driver: the output tiles of one or more products that
    share K (and `operands`, `epilogue`, the tiles but for their widths: `Product.tiles`), walked
    by one persistent grid as one list — product 0's tiles, then product 1's, ... —, the compute
    warpgroups in ping-pong (`Tiles.pingpong`) or cooperative (splitting each tile, as
    `persistent_matmul`'s). Bias, residual and a stored pre-activation (`outputs`) are taken
    with one product only. `interpret`: tells the allocation of several weight rings
    (`weight_rings`).

    Why ping-pong: with the two compute warpgroups splitting one tile, both run their epilogues
    at the same time and the tensor cores idle meanwhile — a large share of a tile's time where
    K is short (hf-blog-geglu's gated layer: 12 K steps a tile). Here block `sm` takes tiles
    sm, sm + G, ... (G blocks, the snaking order) and deals them to its compute warpgroups in
    turn: warpgroup w owns its local tiles w, w + 2, ..., a whole tile each (accumulator
    block_m × op_n). A `turn` barrier pair makes the compute warpgroups take turns at the K loop
    (warpgroup w waits on turn[w] before its K loop and arrives on turn[1 - w] once it has issued
    its last wgmma, before waiting for them, so the other's queue behind them and the tensor
    cores do not drain between tiles, as CUTLASS's ping-pong hands over), so one warpgroup's
    epilogue runs while the other's K loop keeps the tensor cores busy.

    Why groups: a weight gradient hᵀ·dZ has few output tiles and a long K (the batch), so its
    last wave runs part empty — hf-blog-geglu's at M = 8192: 72 tiles of 128×256 (0.55 of a wave
    on 132 SMs) and 144 (1.09 waves); H100, b566817: 80.8 and 134.8 µs, where the two launched
    as one list of 216 tiles fill two waves. The products of a group share K, so every tile of
    one width costs the same K loop.

    Why widths: 216 tiles on 132 SMs are 1.64 waves of work that run as 2. With the second
    product's tiles 3/4 as wide (128×192: 192 of them), the list is 72 tiles of 1 and 192 of
    3/4 — 264 = 2 × 132, each block a tile of 1 and one of 3/4 or two of 3/4: 1.75 waves.
    Products of one width share a branch of the compute warpgroups' code; each width has its own
    ring of weight slabs, the rings in one union of shared memory (`weight_rings`).

    The memory warpgroup streams the local tiles' (X, W) slabs in order through one ring of
    num_stages slots, so the next tile's slabs land while this one's K loop runs.
    Barriers: Mosaic GPU tracks a barrier's phase per waiter, so no waiter may skip a phase.
    Ping-pong: a slot is used by either warpgroup, so each slot has a `full` and a `free` barrier
    per warpgroup: the copies into a use of the slot arrive on its owner's `full` (which only
    the owner waits on, every phase in order), the owner's wgmma release arrives on its own
    `free`, and the memory warpgroup, before refilling the slot, waits on the `free` of the
    slot's previous owner (it waits on every phase of both, in order, the last ones after its
    loop). Cooperative: one `full` a slot, which both compute warpgroups wait on, and one `free`
    that takes an arrival from each. Where a tile's weight ring differs from the previous
    tile's, a slot of the new ring may lie over any slot of the old one, so the memory
    warpgroup first waits until every earlier use is released (the `free` phases it has not yet
    waited on: it counts them), then copies into the new ring — a pipeline's depth of K steps
    once a block, where its tiles change width.
    """
    if not tiles.warp_specialize:
        raise ValueError("grouped_matmul: expected warp_specialize tiles (a memory warpgroup)")
    if len(products) > 1 and (b_gmem is not None or r_gmem is not None or outputs.preact):
        raise ValueError(
            f"grouped_matmul: a bias, residual or stored pre-activation is taken with one "
            f"product only, got {len(products)} products"
        )
    t = tiles
    ptiles = [p.tiles or t for p in products]
    check_widths(t, ptiles)
    dtype = products[0].o.dtype
    shapes = [operands.shapes(p.x, p.w) for p in products]  # (M, K, W's row length) each
    k = shapes[0][1]
    if any(s[1] != k for s in shapes):
        raise ValueError(f"grouped_matmul: the products must share K, got {[s[1] for s in shapes]}")
    for s in shapes:
        operands.check(s[0])
    # per product: (tiles along M, tiles along N) and the index of its first tile in the list
    grids = [
        (cdiv(s[0], pt.block_m), cdiv(cdiv(p.o.shape[1], outputs.scale), pt.out_n))
        for s, p, pt in zip(shapes, products, ptiles, strict=True)
    ]
    firsts = [sum(gm * gn for gm, gn in grids[:g]) for g in range(len(grids))]
    num_tiles = sum(gm * gn for gm, gn in grids)
    k_iters = cdiv(k, t.block_k)
    S, WGS = t.num_stages, COMPUTE_WARPGROUPS
    # one swizzle for every product's slabs and staging: the gcds over their extents
    transforms, out_transforms = smem_transforms(
        t, k, math.gcd(*(s[2] for s in shapes)), math.gcd(*(p.o.shape[1] for p in products)),
        dtype, x_minor=math.gcd(*(s[0] for s in shapes)) if operands.x_kmajor else 0,
        out_scale=outputs.scale, op_n=math.gcd(*(pt.op_n for pt in ptiles)),
    )  # fmt: skip
    slots = [pt.staging_slots(outputs) for pt in ptiles]
    x_slab = operands.slab_shapes(t)[0]
    # the products' widths (as tiles): each its own branch of the compute code and weight ring
    width_tiles = list(dict.fromkeys(ptiles))
    width_of = [width_tiles.index(pt) for pt in ptiles]
    w_slabs = [operands.slab_shapes(pt)[1] for pt in width_tiles]
    # ping-pong: a `full` and a `free` barrier per slot and owner; cooperative: per slot, the
    # `free` taking both compute warpgroups' arrivals
    owners = WGS if t.pingpong else 1
    allocations = dict(
        x_smem=plgpu.SMEM((S, *x_slab), dtype, transforms=transforms),
        w_smem=weight_rings(w_slabs, dtype, transforms, num_stages=S, interpret=interpret),
        # [owner · S + slot]; full: the X and W copies of a use of the slot
        full=plgpu.Barrier(num_arrivals=2, num_barriers=owners * S),
        free=plgpu.Barrier(num_arrivals=WGS // owners, num_barriers=owners * S),
        turn=plgpu.Barrier(num_barriers=WGS) if t.pingpong else None,
        out_smem=plgpu.SMEM(
            (WGS, max(slots), EPI_M, t.epi_n * outputs.scale), dtype, transforms=out_transforms
        ),
        z_smem=(
            plgpu.SMEM(
                (WGS, slots[0], EPI_M, t.preact_epi_n),
                dtype,
                transforms=mma_transforms(math.gcd(t.preact_epi_n, z_gmem.shape[1]), dtype),
            )
            if outputs.preact
            else None
        ),
        b_smem=plgpu.SMEM((WGS, t.wg_op_n), dtype) if b_gmem is not None else None,
        b_bars=plgpu.Barrier(num_barriers=WGS) if b_gmem is not None else None,
        r_bars=plgpu.Barrier(num_barriers=WGS * slots[0]) if r_gmem is not None else None,
    )

    def scope(
        x_smem: Any,
        w_smem: Any,
        full: Any,
        free: Any,
        turn: Any,
        out_smem: Any,
        z_smem: Any,
        b_smem: Any,
        b_bars: Any,
        r_bars: Any,
    ) -> None:
        wg = lax.axis_index("wg")
        sm, blocks = lax.axis_index("sm"), lax.axis_size("sm")
        local_tiles = lax.div(num_tiles - sm + blocks - 1, blocks)  # >= 1: blocks <= tiles
        uses = local_tiles * k_iters  # slot uses of the block, in order: tile by tile, K steps
        w_rings = tuple(w_smem) if len(width_tiles) > 1 else (w_smem,)

        def tile_at(i: Any) -> tuple[Any, Any, Any]:
            # 1. program -> tile: the block's i-th tile of the list — (product, tile along M,
            # along N), each product's tiles in grouped snaking order (group_m bands)
            lin = sm + i * blocks
            if len(grids) == 1:
                return 0, *plgpu.planar_snake(lin, grids[0], 0, t.group_m)
            group, m_idx, n_idx = 0, 0, 0
            for g, (grid, first) in enumerate(zip(grids, firsts, strict=True)):
                # Every product's index is computed and one is selected, so each is clamped into
                # its own grid first: past a grid's end, planar_snake divides by its last band's
                # width, 0 where group_m divides the rows — undefined behaviour that LLVM may
                # read as "the index is in range" and fold the selection with (on the H200,
                # 536070e, a product came out wrong without the clamp; 08322bc, right with it).
                mine = (lin >= first) & (lin < first + math.prod(grid))
                local = jnp.clip(lin - first, 0, math.prod(grid) - 1)
                mg, ng = plgpu.planar_snake(local, grid, 0, ptiles[g].group_m)
                group = jnp.where(mine, g, group)
                m_idx, n_idx = jnp.where(mine, mg, m_idx), jnp.where(mine, ng, n_idx)
            return group, m_idx, n_idx

        def width_index(group: Any) -> Any:
            """The tile's width (index into `width_tiles`) from its product."""
            index = 0
            for g, wi in enumerate(width_of):
                index = jnp.where(group == g, wi, index)
            return index

        def for_product(group: Any, body: Callable[[int], None], among: Sequence[int]) -> None:
            """`body(g)` on the tile's product g of `among`: refs and tiles are static, so one
            branch a product."""
            if len(among) == 1:
                body(among[0])
                return
            for g in among:
                pl.when(group == g)(functools.partial(body, g))

        def owner(use: Any) -> Any:
            """The warpgroup whose barriers slot use `use` goes by (its tile's, in ping-pong)."""
            return lax.rem(lax.div(use, k_iters), 2) if t.pingpong else 0

        def barrier(bars: Any, use: Any) -> Any:
            return bars.at[owner(use) * S + lax.rem(use, S)]

        def wait_released(lo: Any, hi: Any) -> None:
            """Wait on the `free` of slot uses lo .. hi - 1, in order."""

            def wait(use: Any, carry: Any) -> Any:
                plgpu.barrier_wait(barrier(free, use))
                return carry

            lax.fori_loop(lo, hi, wait, 0)

        def memory_warpgroup() -> None:
            plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")

            # `waited`: the slot uses whose release this warpgroup has waited on (a prefix)
            def tile(i: Any, waited: Any) -> Any:
                group, m_idx, n_idx = tile_at(i)
                first_use = i * k_iters
                if len(width_tiles) > 1:  # a new ring: every earlier use released first
                    new_ring = (i > 0) & (
                        width_index(group) != width_index(tile_at(jnp.maximum(i - 1, 0))[0])
                    )
                    wait_released(jnp.where(new_ring, waited, first_use), first_use)
                    waited = jnp.where(new_ring, first_use, waited)

                def step(kk: Any, waited: Any) -> Any:
                    # 2. load: slab kk of the tile into the ring's next slot, once the slot's
                    # previous use (S uses before) is released
                    use = first_use + kk
                    slot = lax.rem(use, S)
                    pl.when(use - S >= waited)(lambda: plgpu.barrier_wait(barrier(free, use - S)))

                    def load(g: int) -> None:
                        p, pt = products[g], ptiles[g]
                        x_src, w_src = operands.slab_refs(
                            p.x, p.w, pl.ds(m_idx * t.block_m, t.block_m),
                            pl.ds(n_idx * pt.op_n, pt.op_n), pl.ds(kk * t.block_k, t.block_k),
                        )  # fmt: skip
                        w_dst = w_rings[width_of[g]].at[slot]
                        plgpu.copy_gmem_to_smem(x_src, x_smem.at[slot], barrier(full, use))
                        plgpu.copy_gmem_to_smem(w_src, w_dst, barrier(full, use))

                    for_product(group, load, range(len(products)))
                    return jnp.maximum(waited, use - S + 1)

                return lax.fori_loop(0, k_iters, step, waited)

            waited = lax.fori_loop(0, local_tiles, tile, jnp.int32(0))
            # the last releases, which no copy waited for: every arrival is awaited
            wait_released(waited, uses)

        def compute_warpgroup() -> None:
            plgpu.set_max_registers(compute_registers(MEMORY_REGISTERS, WGS), action="increase")
            if t.pingpong:  # warpgroup 0 goes first
                pl.when(wg == 1)(lambda: plgpu.barrier_arrive(turn.at[0]))

            def tile(j: Any, carry: Any) -> Any:
                i = 2 * j + wg if t.pingpong else j  # the block's i-th tile
                group, m_idx, n_idx = tile_at(i)

                def width_scope(w: int) -> None:
                    pt = width_tiles[w]
                    # this warpgroup's part of a tile: ping-pong, all of every other tile;
                    # cooperative, its half (along N where the operand tile is ≥ 256 wide, else
                    # along M) of each
                    rows, cols = slice(None), slice(None)
                    row_off = op_off = col_off = 0
                    if not pt.pingpong and pt.split_n:
                        cols = pl.ds(wg * pt.wg_op_n, pt.wg_op_n)
                        op_off, col_off = wg * pt.wg_op_n, wg * pt.wg_out_n
                    elif not pt.pingpong:
                        rows, row_off = pl.ds(wg * pt.wg_m, pt.wg_m), wg * pt.wg_m
                    row0 = m_idx * pt.block_m + row_off
                    op0, col0 = n_idx * pt.op_n + op_off, n_idx * pt.out_n + col_off
                    w_ring = w_rings[w]
                    among = [g for g, wi in enumerate(width_of) if wi == w]

                    def acc_scope(acc_ref: Any) -> None:
                        prefetched = request_bias_and_residual(
                            b_gmem, r_gmem, wg, op0, row0, col0, b_smem, b_bars, out_smem,
                            r_bars, tiles=pt, out_scale=outputs.scale, slots=slots[0],
                        )  # fmt: skip
                        if t.pingpong:
                            plgpu.barrier_wait(turn.at[wg])  # the other's K loop is done

                        def step(kk: Any, carry: Any) -> Any:
                            use = i * k_iters + kk
                            slot = lax.rem(use, S)
                            plgpu.barrier_wait(barrier(full, use))
                            a, b = operands.mma_views(x_smem.at[slot], w_ring.at[slot], rows, cols)
                            plgpu.wgmma(acc_ref, a, b)
                            # one wgmma in flight: the previous step's is done reading its slot
                            plgpu.wgmma_wait(1)
                            pl.when(kk > 0)(lambda: plgpu.barrier_arrive(barrier(free, use - 1)))
                            return carry

                        lax.fori_loop(0, k_iters, step, 0)
                        if t.pingpong:
                            # the other's K loop may start: its wgmma queue behind this one's
                            # last, which is still running — handing over after the wait below
                            # let the tensor cores drain at every tile
                            plgpu.barrier_arrive(turn.at[1 - wg])
                        plgpu.wgmma_wait(0)
                        plgpu.barrier_arrive(barrier(free, i * k_iters + k_iters - 1))
                        acc = acc_ref[...]
                        bias = None
                        if b_gmem is not None:
                            plgpu.barrier_wait(b_bars.at[wg])
                            bias = b_smem.at[wg]
                        preact = (z_smem, z_gmem, op0) if outputs.preact else None
                        for_product(group, lambda g: store_tile(
                            acc, bias, row0, col0, wg, out_smem, r_gmem, r_bars, products[g].o,
                            tiles=pt, epilogue=epilogue, out_scale=outputs.scale, preact=preact,
                            slots=slots[g], prefetched=prefetched,
                        ), among)  # fmt: skip

                    pl.run_scoped(acc_scope, plgpu.ACC((pt.wg_m, pt.wg_op_n), jnp.float32))

                if len(width_tiles) == 1:
                    width_scope(0)
                else:
                    w_index = width_index(group)
                    for w in range(len(width_tiles)):
                        pl.when(w_index == w)(functools.partial(width_scope, w))
                return carry

            my_tiles = lax.div(local_tiles - wg + 1, 2) if t.pingpong else local_tiles
            lax.fori_loop(0, my_tiles, tile, 0)
            if t.pingpong:
                # The other warpgroup's last arrival on turn[wg] (after its last K loop), which
                # no K loop of this one waited for (with L local tiles: warpgroup 0's when L is
                # even, 1's when L is odd): every phase of a barrier is observed by its waiter.
                pl.when(lax.rem(local_tiles + wg, 2) == 0)(lambda: plgpu.barrier_wait(turn.at[wg]))
            # The block may not exit while a TMA store still reads its shared memory.
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        lax.cond(wg == WGS, memory_warpgroup, compute_warpgroup)

    pl.run_scoped(scope, **allocations, collective_axes="wg")


def compute_registers(memory_registers: int, compute_warpgroups: int) -> int:
    """Registers a compute thread may hold beside the memory warpgroup's (the 64 K of an SM over
    the block's 128-thread warpgroups, at most 255, a multiple of 8), as jax's pipeline reckons."""
    return int(min(256, (512 - memory_registers) / compute_warpgroups) // 8 * 8)
