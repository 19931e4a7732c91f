"""Tiles for the per-layer kernels: a shared-memory model, heuristics, the tuning search space.

Read by both stacks so their twins tile alike. The raw kernels are un-autotuned: launchers use the
config they are given, the fronts ask `heuristic_config` (which prefers a tuned config committed for
the GPU, common/tuning.py), and `torch_impl/tuning.py` sweeps `search_space` when asked to tune.

`smem_bytes` counts what Triton 3.6 allocates for the kernels of this project on sm_90, checked
against the compiler's own count (`triton.compile(..., target=GPUTarget("cuda", 90, 32))`,
`metadata.shared`; tests/test_smem_model.py) — the old count assumed one extra pipeline stage for
the persistent kernels and pruned exactly the configs that win (gated 128×(2·128)×64 at 4 stages,
linear 128×256×64 at 3–4 stages). What the compiler does, measured:

- wgmma path (16-bit operands, or float32 with tf32 products; block_m ≥ 64): `num_stages` buffers
  of the X tile and the W (or packed W|V) tile; the pointer kernels under tf32 one X buffer fewer
  (their operands are rounded in registers, X then feeds wgmma from there; W's rounded copy takes
  the buffer W leaves), the TMA kernels on the front's path none (operands rounded in memory);
- mma.sync / FMA paths (block_m < 64, or float32 "ieee", which Triton computes with FMAs):
  `num_stages - 1` buffers (the last stage is in registers), and in the persistent kernels a
  layout-conversion scratch wherever the accumulator is split (gated, or a sliced epilogue);
- persistent TMA kernels (`persistent=True`): the output slice staged for its TMA store,
  block_m × block_n / epilogue_subtile elements, plus, with a residual, a pointer-loaded tile of the
  slice's size converted through shared memory to the accumulator's layout; portable kernels store
  straight from registers;
- the bias row's layout conversion (block_n elements once a warp holds more than 32 columns) and
  the pipeline's mbarriers: under 600 bytes.

The model never undercounts and overcounts the wgmma path by at most 1 KB (what the test checks on
18 configs; 354 were compared while writing it, every verdict agreeing), so `fits` is the
compiler's own verdict against the 227 KB an sm_90 block may use.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .config import TileConfig
from .packing import PACK_BLOCK, packed_width

FAMILIES: tuple[str, ...] = ("linear_act", "gated")

# The most shared memory one block may use on sm_90 (H100, H200): 227 KiB, of an SM's 228 (each
# resident block also takes 1 KiB of the SM's for itself).
SMEM_LIMIT = 227 * 1024
SMEM_PER_SM = 228 * 1024
REGISTERS_PER_SM = 64 * 1024  # 32-bit registers an SM (sm_90)
MAX_REGISTERS = 255  # a thread's most; past it ptxas spills
SMEM_BLOCK_RESERVED = 1024
# Streaming multiprocessors of an H100 SXM / H200: the persistent grid and the wave count below.
NUM_SMS = 132

# Under an interpreter: one fixed config per family (Triton's autotuner cannot run more than one
# there). Blocks are small enough that the golden shapes (odd sizes of 13..97) span several tiles in
# every dimension, so masking and the grouped order are exercised, and large enough to keep
# interpretation fast. The gated family's output tile is one packed block pair (64 columns of h,
# 128 of the packed operand).
INTERPRET_CONFIG = TileConfig(
    block_m=16, block_n=32, block_k=16, group_m=2, num_warps=4, num_stages=1
)
INTERPRET_CONFIG_GATED = TileConfig(
    block_m=16, block_n=PACK_BLOCK, block_k=16, group_m=2, num_warps=4, num_stages=1
)

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")


def _itemsize(dtype: str) -> int:
    try:
        return _ITEMSIZE[dtype]
    except KeyError:
        raise ValueError(f"dtype: expected one of {tuple(_ITEMSIZE)}, got {dtype!r}") from None


def operand_width(family: str, config: TileConfig) -> int:
    """Columns of the W tile a program reads: block_n, or 2·block_n for the packed gated operand."""
    return 2 * config.block_n if family == "gated" else config.block_n


def gated_config(config: TileConfig) -> TileConfig:
    """The gated kernels' reading of a config: an output tile is a whole number of packed block
    pairs, so a block_n under PACK_BLOCK (a pinned config shared with the linear layers, e.g.
    `mlp(..., config=TileConfig(16, 16, 16))`) is taken as PACK_BLOCK; any larger block_n is
    already a multiple of it (a power of two, or a Mosaic GPU width of whole 64-column atoms)."""
    if config.block_n >= PACK_BLOCK:
        return config
    return _with(config, block_n=PACK_BLOCK)


def uses_wgmma(config: TileConfig, dtype: str, fp32_precision: str = "ieee") -> bool:
    """Whether Triton compiles the dot to Hopper's wgmma (seen in the PTX): a warpgroup's 64 rows at
    least, and 16-bit operands or tf32 products (float32 "ieee" runs on FMAs)."""
    return config.block_m >= 64 and (dtype != "float32" or fp32_precision == "tf32")


def warp_specialize_applies(family: str, config: TileConfig) -> bool:
    """Whether triton 3.6's Hopper warp-specialisation pass can take a persistent kernel.

    Compiled for sm_90 on a CPU: the pass rewrites the tile loop only with num_warps=4 (it then adds
    a producer warpgroup for the TMA loads and splits the tile's rows over two consumer
    warpgroups: 12 warps in all), only when the loop is not flattened, and its data partitioner
    stops at reshape, permute and split ("unsupported op type"), which the subtiled epilogue and
    the gated split are made of. So: linear_act with epilogue_subtile=1 and num_warps=4; elsewhere
    the kernels ignore the flag (the loop is flattened as usual).

    And at most 4 K stages: warp-specialised at 5 stages (128×128×64, 4 warps) the kernel
    compiled, ran and returned NaN on an H100 for every GEMM it was given (triton 3.6,
    bench/results/2026-12-05-h100-38cf758/sweep.log), where 4 stages gave the right bits.

    And one program an SM: a 12-warp program is 384 threads, so two share an SM's 64 K registers
    only at ≤ 85 registers a thread; the warp-specialised tiles compiled for sm_90 on a CPU hold
    168 (the forward's 128×128 and 128×256, the act' step's 128×128), so a second program would
    only wait for the first — the grid twice as long, nothing overlapped.
    """
    return (
        config.warp_specialize
        and family == "linear_act"
        and config.epilogue_subtile == 1
        and config.num_warps == 4
        and config.block_m >= 64
        and config.num_stages <= 4
        and config.programs_per_sm == 1
    )


def smem_bytes(
    family: str,
    config: TileConfig,
    dtype: str,
    *,
    persistent: bool,
    fp32_precision: str = "ieee",
    residual: bool = False,
) -> int:
    """Shared memory (bytes) Triton 3.6 allocates for one block of the kernel on sm_90.

    `persistent`: the triton_tma kernels (TMA descriptors, staged epilogue); else the portable
    pointer kernels (and their Pallas-Triton twins, whose lowering is the same Triton). See the
    module docstring for what is counted and how it was checked.
    """
    _check_family(family)
    size = _itemsize(dtype)
    if family == "gated":
        config = gated_config(config)
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    op_n = operand_width(family, config)
    stage = (bm * bk + bk * op_n) * size
    wgmma = uses_wgmma(config, dtype, fp32_precision)
    buffers = config.num_stages if wgmma else max(1, config.num_stages - 1)
    total = buffers * stage
    if wgmma and dtype == "float32" and not persistent:
        # tf32 on the pointer kernels: both operands rounded in registers (torch_impl/tf32.py), so
        # A feeds wgmma from registers and the pipeline keeps one A buffer fewer, while B, rounded,
        # is stored back once (the buffer it leaves is taken by that copy; compiled for sm_90).
        # The TMA kernels on the front's path read operands rounded in memory: the full count (a
        # launcher call that leaves the rounding to them needs less: the model is an upper bound)
        total -= bm * bk * size
    if persistent:
        slice_bytes = bm * (bn // config.epilogue_subtile) * size
        total += slice_bytes
        if residual and not warp_specialize_applies(family, config):
            total += slice_bytes
        if not wgmma and (family == "gated" or config.epilogue_subtile > 1):
            # Off the wgmma layout, splitting the accumulator converts it through shared memory:
            # 2 KB per warp in float32, 1 KB in 16-bit (measured at most 2056 bytes for 4 warps).
            total += 512 * config.num_warps * size
    # The bias row, broadcast into the accumulator's layout through shared memory once a warp
    # holds more than 32 of its columns (seen: 512 bytes at 128×256 with 8 warps, none at 128×128),
    # and the pipeline's mbarriers (8 bytes a stage, and a few more).
    bias = op_n * size if op_n >= 32 * config.num_warps else 0
    barriers = 8 * config.num_stages + 64
    if persistent and warp_specialize_applies(family, config):
        barriers += 16 * config.num_stages + 128  # the producer/consumer barrier pairs
    return total + bias + barriers


def with_residual_room(
    config: TileConfig, dtype: str, *, fp32_precision: str = "ieee"
) -> TileConfig:
    """A persistent linear_act config that fits with a residual: the residual's slice is converted
    through shared memory beside the staged output slice, so a config chosen without it (the
    heuristic's 128×256×64 at 4 stages in two slices: 225 KB, 257 KB with the residual) gets more
    epilogue slices, then fewer stages, until it fits. Other configs come back unchanged."""
    while not fits(
        "linear_act", config, dtype, persistent=True, fp32_precision=fp32_precision, residual=True
    ):
        sub = config.epilogue_subtile
        if sub < 4 and config.block_n // (2 * sub) >= 16:
            config = _with(config, epilogue_subtile=2 * sub)
        elif config.num_stages > 2:
            config = _with(config, num_stages=config.num_stages - 1)
        else:
            break
    return config


def fits(
    family: str,
    config: TileConfig,
    dtype: str,
    *,
    persistent: bool,
    fp32_precision: str = "ieee",
    residual: bool = False,
) -> bool:
    """Whether the kernel's shared memory stays within an sm_90 block's 227 KB (`smem_bytes`), and,
    for `programs_per_sm` > 1, whether that many blocks fit on one SM together (else the second
    waits for the first: one program per SM in effect)."""
    per_sm = config.programs_per_sm
    limit = min(SMEM_LIMIT, SMEM_PER_SM // per_sm - SMEM_BLOCK_RESERVED)
    return (
        smem_bytes(
            family,
            config,
            dtype,
            persistent=persistent,
            fp32_precision=fp32_precision,
            residual=residual,
        )
        <= limit
    )


# ---- heuristics ----------------------------------------------------------------------------------
# Relative throughput of one tile shape on an H200 when nothing else limits it (a guess from the
# probes in ../shared/probes/dsl_ceiling.py: 128×256 is what cuBLAS and the best Triton matmul use;
# a 128×128 tile does the same MMAs with twice the shared-memory traffic per FLOP). Used only to
# trade tile size against wave quantisation below; the committed tuned configs override it.
_TILE_RATE = {(128, 256): 1.0, (128, 128): 0.9, (64, 128): 0.7, (64, 64): 0.55}


def _waves_cost(m: int, n_out: int, bm: int, bn: int, op_n: int, num_sms: int) -> float:
    """Estimated time of a persistent launch, in units of one 128×256 tile's work: whole waves of
    tiles (a partial last wave costs a full one) times the work of one tile over its rate."""
    tiles = math.ceil(m / bm) * math.ceil(n_out / bn)
    waves = math.ceil(tiles / num_sms)
    return waves * bm * op_n / (_TILE_RATE[(bm, op_n)] * 128 * 256)


# The persistent grid's last wave. With T tiles on P programs a persistent launch runs ceil(T / P)
# waves: gpt-mlp's up projection at M = 8192 (4096 tiles of 128×256 on 132 SMs, 31.03 waves) runs
# 32 with four programs alone in the last; its down projection (1024 tiles, 7.76 waves) runs 8.
# The last T mod P tiles can instead be split in K: each into S equal runs of K steps, the runs
# taken chunk by chunk (all tiles' first runs, then their second ...) by the programs in turn, so
# the tail takes ceil((T mod P)·S / P) / S tile-times instead of one; each run writes a fp32
# partial and the tile's last run to finish adds the S in order (no waiting, no float atomics).
# Taking the runs chunk by chunk keeps the programs at the same K steps at the same time, as the
# data-parallel waves are, so x's and W's slabs are shared in L2. A first form (stream-K: the last
# full and partial waves as one long run of K steps a program, each program at its own K offset)
# ran its K steps at a third to a half of the data-parallel speed on an H100 — about what reading
# every operand slab from HBM once per tile takes (gpt-mlp's down projection: 232 tiles × 12 MB) —
# bench/results/2026-12-07-h100-53c8ff4-stream-k/. The cost model below, in tile-times: a wave of
# runs 1 / S, a run's partial (written, then read back by the last run) `SPLIT_TAIL_RUN_STEPS` K
# steps; a split only where it saves `SPLIT_TAIL_MIN_GAIN`, and into one wave of runs at most
# (T mod P · S ≤ P: at most P fp32 partials, 17 MB of 128×256 at 132 SMs, well inside the L2).
# Measured on an H100 (bench/results/2026-12-07-h100-ed8571f-split-tail/): gpt-mlp's up
# projection (4 tail tiles in 3 runs, one wave) 3 % faster; every forced split of a 100-tile tail
# (several waves of runs; 300-900 partials, 39-118 MB) level or slower, llama3-8b's down
# projection 5.7 % slower at S = 5 — the partials outgrowing the 50 MiB L2 the likely reason.
SPLIT_TAIL_MIN_STEPS = 8  # K steps a run needs (a pipeline of 4 stages fills in 4)
SPLIT_TAIL_MAX_SPLITS = 16
SPLIT_TAIL_RUN_STEPS = 8  # a 128×256 fp32 partial out and back: 256 KB, about 8 K steps' slabs
SPLIT_TAIL_MIN_GAIN = 0.1


def last_wave_split(num_tiles: int, programs: int, k_tiles: int) -> tuple[int, int]:
    """(tiles, splits): how many of a persistent launch's last tiles to split in K and into how many
    runs each, or (0, 1) for data-parallel only (see the comment above)."""
    full, rest = divmod(num_tiles, programs)
    if full == 0 or rest == 0:
        return 0, 1
    best, best_time = 1, 1.0  # unsplit, the tail is one wave
    most = min(SPLIT_TAIL_MAX_SPLITS, k_tiles // SPLIT_TAIL_MIN_STEPS, programs // rest)
    for splits in range(2, most + 1):
        time = 1 / splits + SPLIT_TAIL_RUN_STEPS * splits / k_tiles  # one wave of runs
        if time < best_time:
            best, best_time = splits, time
    if best == 1 or 1.0 - best_time < SPLIT_TAIL_MIN_GAIN:
        return 0, 1
    return rest, best


# A persistent linear_act with a short K (a factorised layer's t·V: K = r ≤ 256, 1–4 K steps) is
# bound by its stores and its epilogue's arithmetic, not its MMAs: silu costs two MUFU operations
# an element (ex2 and the reciprocal), ~50 µs at 8192 × 14336 on an H200 — as long as the stores.
# With one program per SM they run one after the other; with two, one program's epilogue runs
# while the other's loads and stores are in flight. bench/epilogue_probe.py (H200, d63908d, bf16,
# M = 8192, N = 14336, silu, device µs): r = 64: 128×256 w8 at 1/SM (the rule below) 143.7, 64×256
# w4 s2 at 2/SM 118.5 (identity 104.5 → 73.2, cuBLAS's plain t @ V 73.1); r = 128: 187.3 → 141.7.
# (A reciprocal by Newton steps instead of the MUFU was slower — the FMA pipe is busy too — and
# tanh.approx's 2^-11 error is too coarse to ship.) In the low-rank front's two GEMMs (84f2c0e,
# bench/lowrank_probe.py): t·V 141.0 → 121.0 µs at r = 64, 160.7 → 145.6 at r = 128, but 191.8 →
# 197.0 at r = 256 (4 K steps: the MMAs and the 2-stage ring matter again), so K ≤ 128 only.
SHORT_K = 128
# Measured at N = 14336 only; a narrow output (a 64-wide layer) would leave most of a 256-wide tile
# idle, so the rule wants several such tiles per row.
SHORT_K_MIN_N = 1024
SHORT_K_CONFIG = TileConfig(
    64, 256, 64, group_m=8, num_warps=4, num_stages=2, epilogue_subtile=2, programs_per_sm=2
)


# A narrow output over a long K (a factorised layer's x·U: N = r ≤ 256, K = d_in) is a read-bound
# GEMM (M·K·2 bytes of x; the output is r columns) whose speed is the bytes each SM keeps in
# flight through its serial K loop. bench/store_probe.py --narrow (H200, bf16, M = 8192, K = 4096,
# device µs; cuBLAS 18.9 / 19.7 / 23.8 at r = 64 / 128 / 256; 86f9df2 and eaf3706): the large-M
# rule's 64×128×64 at 4 stages 35.1 / 27.5 / 44.0; 64×64×128 at 6 stages (r ≤ 64: no idle half
# tile, 192 KB of loads in flight) 21.9; 64×128×128 at 4 stages 22.9 (r = 128; 36.0 at r = 256);
# 128×128×64 at 4 stages, 8 warps 30.8 at r = 256 (x read by two column tiles instead of four).
NARROW_N = 256
NARROW_MIN_K = 1024
NARROW_CONFIGS = (  # (widest output, config), narrowest first
    (64, TileConfig(64, 64, 128, group_m=8, num_warps=4, num_stages=6, epilogue_subtile=2)),
    (128, TileConfig(64, 128, 128, group_m=8, num_warps=4, num_stages=4, epilogue_subtile=2)),
    (256, TileConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=4, epilogue_subtile=2)),
)


def narrow_config(n: int) -> TileConfig:
    """The read-bound config for an output N ≤ NARROW_N wide (see there)."""
    return next(config for widest, config in NARROW_CONFIGS if n <= widest)


def _tiles(m: int, n: int, config: TileConfig) -> int:
    return _cdiv(m, config.block_m) * _cdiv(n, config.block_n)


def _large_m_16bit(family: str, m: int, n: int, persistent: bool, num_sms: int) -> TileConfig:
    gated = family == "gated"
    # (block_m, output block_n) candidates, best tile first; gated output tiles are half the
    # packed operand tile (one wgmma group 2·block_n wide).
    shapes = [(128, 128), (128, 64)] if gated else [(128, 256), (128, 128)]
    # 64-row tiles at small M, and wherever 128-row tiles leave SMs without a tile (a narrow
    # output, N ≤ 128, has 64 tiles of 128 rows at M = 8192; the forward's x·U takes
    # NARROW_CONFIGS before this, the backward's narrow GEMMs come here)
    if m < 1024 or math.ceil(m / 128) * math.ceil(n / 128) < num_sms:
        shapes.append((64, 64) if gated else (64, 128))
    best = min(
        shapes, key=lambda s: _waves_cost(m, n, s[0], s[1], (2 if gated else 1) * s[1], num_sms)
    )
    bm, bn = best
    warps = 8 if bm >= 128 else 4
    if not persistent:
        return TileConfig(bm, bn, 64, group_m=8, num_warps=warps, num_stages=3)
    # Persistent: 4 stages with the epilogue in two slices (128×256×64 in 16-bit: 196 KB of
    # operand buffers + a 32 KB output slice = 225 KB), as Triton's best plain matmul on the H200
    # (804 TFLOP/s at 8192×14336×4096, cuBLAS 811).
    config = TileConfig(bm, bn, 64, group_m=8, num_warps=warps, num_stages=4, epilogue_subtile=2)
    return config


# A kernel that loads a saved pre-activation tile beside its accumulator (the backward's "dact"
# epilogue, the plain saving forward) needs more registers than the forward: at the 16-bit
# heuristic's 128×256 tile (8 warps) the "dact" dgrad takes 255 registers and spills 92–108 B per
# thread for gelu/silu/relu, the saving linear_act (gelu) 128 B (ptxas -v, sm_90a, triton 3.6,
# 2026-12-01); at 128×128, 136–197 registers and no spill. Heuristic configs of those kernels are
# capped there; a pinned config is taken as given.
PREACT_MAX_BLOCK_N = 128


def cap_for_preact(config: TileConfig) -> TileConfig:
    """A heuristic config for a kernel that also loads or stores a pre-activation tile."""
    if config.block_n <= PREACT_MAX_BLOCK_N:
        return config
    return dataclasses.replace(config, block_n=PREACT_MAX_BLOCK_N)


# float32 "tf32" on the TMA kernels: 128×256×32 (gated 128×128 over the 256-wide packed operand),
# 8 warps, 3 stages, 2 epilogue slices — the fastest of 7 tiles per GEMM on an H100 at llama-up
# (2048×14336×4096) and hf-up (8192×3072×768), both when the kernels truncated their operands
# (bench/results/2026-12-07-h100-2bc8c63/: 611.7 and 132.4 µs against cuBLAS's 751.4 and 195.1)
# and with W rounded in memory and x in registers (2026-12-07-h100-2d92464-tf32/: 878.8, 174.0);
# 214 KB of shared memory (compiled for sm_90).
TF32_TMA_CONFIG = TileConfig(128, 256, 32, group_m=8, num_warps=8, num_stages=3, epilogue_subtile=2)
TF32_TMA_CONFIG_GATED = TileConfig(
    128, 128, 32, group_m=8, num_warps=8, num_stages=3, epilogue_subtile=2
)


def heuristic_config(
    family: str,
    m: int,
    n: int,
    k: int,
    dtype: str,
    *,
    interpret: bool = False,
    persistent: bool = False,
    fp32_precision: str = "ieee",
    impl: str | None = None,
    device: str | None = None,
    num_sms: int = NUM_SMS,
    narrow: bool = True,
) -> TileConfig:
    """The config to launch with when none is given: `n` is the layer's OUTPUT width (for the
    gated family the packed operand is 2·Np wide), `persistent` selects the triton_tma kernels.

    On a GPU, a tuned config committed for it (common/tuned/, looked up by `impl` — default
    "triton_tma" if persistent else "triton" — family, M bucket, n, k, dtype and precision; the
    device is `device` or the one registered by the stack at import) comes first; otherwise these
    rules:
    - float32: 128×128×32 tiles (gated 128×64 output, the same 128-wide operand), 8 warps, 3
      stages; "ieee" products run on FMAs, "tf32" on wgmma; the TMA kernels under "tf32" past
      decode sizes TF32_TMA_CONFIG (see there);
    - decode-sized M (≤ 64): narrow M tiles and long K tiles stream the weights;
    - 16-bit: 128×256 (gated 128×128 over a 128×256 packed operand), or a narrower tile where the
      wider one leaves the last wave of the persistent grid mostly empty (`_waves_cost`), 8 warps;
      persistent: 4 stages and a 2-slice epilogue; portable: 3 stages;
    - persistent linear_act with K ≤ SHORT_K and N ≥ SHORT_K_MIN_N (a factorised layer's t·V):
      SHORT_K_CONFIG, two programs per SM (see there);
    - persistent linear_act with N ≤ NARROW_N and K ≥ NARROW_MIN_K (a factorised layer's x·U):
      tiles as narrow as the output, deep K steps, every stage that fits (see there) — unless
      `narrow` is False: the Hopper backward's GEMMs (dgrad, wgrad: transposed operands, "dact"
      epilogues) ask without it, as the rule was measured on the forward's row-major x·U only.
    """
    _check_family(family)
    gated = family == "gated"
    if interpret:
        return INTERPRET_CONFIG_GATED if gated else INTERPRET_CONFIG
    from . import tuning  # tuning imports this module: resolve the cycle at call time

    device = device or tuning.registered_device()
    if device is not None:
        chosen = impl or ("triton_tma" if persistent else "triton")
        committed = tuning.committed_config(device, chosen, family, m, n, k, dtype, fp32_precision)
        if committed is not None:
            return committed
    if dtype == "float32":
        if persistent and fp32_precision == "tf32" and m > 64:
            return TF32_TMA_CONFIG_GATED if gated else TF32_TMA_CONFIG
        return TileConfig(128, 64 if gated else 128, 32, group_m=8, num_warps=8, num_stages=3)
    if m <= 64:
        # Decode-sized M: the weights dominate; narrow M tiles and long K tiles stream them.
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64
        return TileConfig(block_m, 64, 128, group_m=1, num_warps=4, num_stages=4)
    if (
        persistent
        and not gated
        and k <= SHORT_K
        and n >= SHORT_K_MIN_N
        and _tiles(m, n, SHORT_K_CONFIG) >= 2 * num_sms
    ):
        return SHORT_K_CONFIG
    if narrow and persistent and not gated and n <= NARROW_N and k >= NARROW_MIN_K:
        return narrow_config(n)
    return _large_m_16bit(family, m, n, persistent, num_sms)


# ---- the weight gradient's split over M (issue 25) -----------------------------------------------
# `_wgrad_kernel` (backward.py, both stacks) computes dw = hᵀ·dZ [K, N] with one program per
# block_m × block_n output tile, each reducing over the M rows in block_k steps. Narrow layers have
# too few tiles to fill the GPU: the image fit's 64×64 layers (65,536 rows, 16-bit heuristic tile
# 64×64×128) are ONE tile, so one SM of 132 reads the 16 MB of h and dZ alone (~350 µs a layer, the
# JAX step's 2.3 ms against XLA's 0.55). So the rows are split: program (t, s) reduces the s-th run
# of whole block_k steps into an fp32 partial [S, K, N] (db: [S, N]), and `_wgrad_sum_kernel` adds
# the S partials of each element in the fixed order s = 0, 1, …, S−1 and rounds once: no atomics,
# the same bits every run (for a given S; another S sums in another order).
#
# S comes from the tile count, the rows and the SM count (a constant, not the device's: the
# interpreters and the GPU choose alike, so the twins stay bitwise equal): the S ≤ WGRAD_WAVES
# waves' worth of programs, and ≤ steps // WGRAD_MIN_STEPS (a split shorter than a few steps is
# all pipeline ramp and partial store), that minimises whole waves per unit of work, ⌈tiles·S /
# SMs⌉ / S (the smallest S on ties); the steps are then dealt evenly (`wgrad_splits`). What it
# chooses (H200, 132 SMs, bf16 heuristic tiles):
# - image fit, 64×64 (and 32×64, 64×3) at M = 65,536: 1 tile, 512 steps of 128 rows: S = 128
#   (the 4-step floor binds), 128 programs of 512 rows on 128 SMs, 2 MiB of fp32 partials;
# - hf-blog-geglu at M = 8192: the packed 768×6144 gradient is 288 tiles of 128×128 (2.2 waves,
#   more than 2 waves' worth: S = 1); the 3072×768 one is 72 tiles of 128×256 on 128 steps of 64:
#   S = 3 (216 programs, 2 waves of a third of the work: 0.67 of S = 1's single wave; S = 2 also
#   needs 2 waves, S = 4 three), 28 MiB of partials;
# - llama3-8b at M = 8192: 3584 and 1792 tiles: S = 1 (the single-kernel path, no workspace).
# From 89 tiles up S = 1: two runs of 89–132 tiles need two waves of half the work (no gain), and
# past 132 a split could only fill part of a last wave while costing the partials' traffic (S·K·N·4
# bytes written and read back).
WGRAD_WAVES = 2
WGRAD_MIN_STEPS = 4
# `_wgrad_sum_kernel`: BLOCK partials' elements per program (2 per thread at 4 warps), UNROLL
# partials loaded at once. The sum is a chain of dependent adds per element, so a program's time
# is ~S / UNROLL load latencies (L2, ~0.3–0.5 µs each): UNROLL = 16 puts 16 independent loads in
# flight (image fit: S = 128 is 8 rounds, ~3 µs; 17 programs of 256 elements for the 4096 + 64 of
# dw and db); large gradients are bandwidth-bound instead (hf-blog's 3072×768 at S = 3: 9,216
# programs, 28 MiB read, ~8–10 µs).
WGRAD_SUM_BLOCK = 256
WGRAD_SUM_UNROLL = 16
WGRAD_SUM_WARPS = 4


def wgrad_splits(
    tiles: int,
    m: int,
    block_k: int,
    *,
    num_sms: int = NUM_SMS,
    splits: int | None = None,
) -> tuple[int, int]:
    """(S, block_k steps per split) for a weight gradient of `tiles` output tiles over `m` rows:
    the choice explained above, or `splits` forced (tests: S > 1 at interpreter sizes). The steps
    are dealt evenly and no split is empty: S·per ≥ steps > (S − 1)·per."""
    steps = max(1, _cdiv(m, block_k))
    if splits is None:
        limit = max(1, min(steps // WGRAD_MIN_STEPS, WGRAD_WAVES * num_sms // max(1, tiles)))
        splits = min(range(1, limit + 1), key=lambda s: (_cdiv(tiles * s, num_sms) / s, s))
    per = _cdiv(steps, max(1, min(splits, steps)))
    return _cdiv(steps, per), per


# ---- the tuning search space ---------------------------------------------------------------------
def search_space(
    family: str, m: int, dtype: str, *, persistent: bool = False, fp32_precision: str = "ieee"
) -> tuple[TileConfig, ...]:
    """The configs a GPU sweep tries for one family, M bucket and dtype, pruned by `fits`.

    Persistent (triton_tma): each tile and stage count with the smallest epilogue slicing that
    fits and the next one, and for linear_act the warp-specialised form (4 warps, unsliced
    epilogue: what triton 3.6's Hopper pass takes, `warp_specialize_applies`) and, in 16 bits,
    two programs per SM where two blocks fit on one SM.
    """
    _check_family(family)
    gated = family == "gated"
    if m <= 64:
        tiles = [(bm, bn, bk) for bm in (16, 32, 64) for bn in (64, 128) for bk in (64, 128, 256)]
        if not gated:
            tiles += [(bm, 32, bk) for bm in (16, 32, 64) for bk in (64, 128, 256)]
        warps, stages = (4,), (3, 4, 5)
    elif dtype == "float32":  # 4-byte operands: half the K depth of the 16-bit tiles
        tiles = (
            [(128, 64, 32), (64, 64, 64), (128, 64, 16), (64, 128, 32)]
            if gated
            else [(128, 128, 32), (128, 64, 32), (64, 128, 32), (64, 64, 64), (128, 128, 16)]
        )
        warps, stages = (4, 8), (2, 3, 4)
    else:  # output tiles; a gated tile reads a packed operand tile twice as wide
        tiles = (
            [(128, 128, 64), (128, 64, 64), (256, 64, 64), (64, 128, 64), (128, 64, 128)]
            if gated
            else [(128, 128, 64), (128, 256, 64), (256, 128, 64), (128, 128, 128), (64, 256, 64)]
        )
        warps, stages = (4, 8), (2, 3, 4)
    out: list[TileConfig] = []

    def add(config: TileConfig) -> bool:
        ok = fits(family, config, dtype, persistent=persistent, fp32_precision=fp32_precision)
        if ok and config not in out:
            out.append(config)
        return ok

    for bm, bn, bk in tiles:
        for w in warps:
            for s in stages:
                base = TileConfig(bm, bn, bk, group_m=8, num_warps=w, num_stages=s)
                if not persistent:
                    add(base)
                    continue
                subtiles = [sub for sub in (1, 2, 4) if bn // sub >= 16]
                fitting = [
                    sub
                    for sub in subtiles
                    if fits(
                        family,
                        _with(base, epilogue_subtile=sub),
                        dtype,
                        persistent=True,
                        fp32_precision=fp32_precision,
                    )
                ]
                for sub in fitting[:2]:
                    add(_with(base, epilogue_subtile=sub))
                    if not gated and dtype != "float32":
                        # two programs per SM where both fit (SHORT_K_CONFIG's kind: short-K,
                        # store-bound GEMMs); `add` prunes the ones that do not
                        add(_with(base, epilogue_subtile=sub, programs_per_sm=2))
                if not gated and w == 4 and bm >= 128:
                    add(_with(base, warp_specialize=True))
    return tuple(out)


def _with(config: TileConfig, **changes: object) -> TileConfig:
    return TileConfig.from_dict({**config.to_dict(), **changes})


def shape_bucket(m: int) -> str:
    """Tuning caches key M by power-of-two bucket: tiles chosen for one M serve its neighbours."""
    if m <= 0:
        return "0"
    return str(1 << (m - 1).bit_length())


def measured_here_first(entries: list[dict[str, Any]], gpu: str | None) -> list[dict[str, Any]]:
    """The tile-table entries measured on `gpu` (their "gpu" field) where there are any, else all
    of them: one table serves every Hopper part (one SM, one tensor core), and where two parts
    rank a shape's tiles differently each keeps its own measurement (the training step's saving
    forward at hf-blog: the H200 and the H100 prefer different tiles by 4-5 %). Both stacks'
    committed tables read this way (jax_impl/mosaic, torch_impl/tma)."""
    mine = [e for e in entries if gpu is not None and e.get("gpu") == gpu]
    return mine or entries


def step_gemm_kind(
    family: str,
    *,
    preact: bool = False,
    x_kmajor: bool = False,
    w_kmajor: bool = False,
    epilogue: str = "none",
) -> str:
    """The name of one GEMM of a training step in both stacks' tuned backward tables
    (jax_impl/mosaic/ and torch_impl/tma/ tuned_hopper_backward.json): the family and what it
    adds — "gated.preact" (the saving forward), "linear_act.x_kmajor" (a weight gradient),
    "linear_act.w_kmajor.dact_gated" (an input gradient with a gated act' step), ..."""
    parts = [family]
    parts += ["preact"] if preact else []
    parts += ["x_kmajor"] if x_kmajor else []
    parts += ["w_kmajor"] if w_kmajor else []
    parts += [epilogue] if epilogue != "none" else []
    return ".".join(parts)


# The tables' name for a step's weight gradients hᵢᵀ·dZᵢ run as ONE grouped launch (both stacks'
# `linear_grouped`); its entries name the products ([M, N] each) and their shared K.
GROUPED_KIND = step_gemm_kind("linear_act", x_kmajor=True) + ".grouped"


@dataclasses.dataclass(frozen=True)
class GroupedTiles:
    """The tiles of a grouped launch: one TileConfig, and each product's block_n where they differ
    (`widths`, None: config.block_n for all) — a table entry's "config" and "widths". Mosaic GPU's
    `linear_grouped` takes widths; Triton's runs one width: its block shapes are powers of two
    (`tl.arange`), so the 3/4-wide tile that evens hf-blog's waves (192 beside 256) has no Triton
    form, and widths of 1/2 do not beat one width there (`grouped_makespan`)."""

    config: TileConfig
    widths: tuple[int, ...] | None = None

    @classmethod
    def of(cls, tiles: TileConfig | GroupedTiles) -> GroupedTiles:
        """`tiles` as a GroupedTiles (a TileConfig: every product on it)."""
        return tiles if isinstance(tiles, GroupedTiles) else cls(tiles)

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> GroupedTiles:
        widths = entry.get("widths")
        return cls(TileConfig.from_dict(entry["config"]), tuple(widths) if widths else None)


def grouped_makespan(
    products: list[tuple[int, int]],
    block_m: int,
    widths: list[int],
    *,
    unit: int = 256,
    sms: int = 132,
) -> float:
    """The busiest block's work in a grouped launch, in tiles of `block_m` × `unit`: the
    products' tiles (each product's `block_m` × widths[g], all of one K) as one list, block b of
    min(sms, tiles) taking items b, b + blocks, ... (the static order of
    jax_impl/mosaic/pipeline.grouped_matmul), a tile's K loop costing its area. hf-blog-geglu's
    weight gradients [(3072, 768), (768, 6144)] at 128 rows: 2.0 on widths 256, 256 (216 tiles,
    1.64 tiles of work a block), 1.75 on 256, 192."""
    costs = [
        width / unit
        for (m, n), width in zip(products, widths, strict=True)
        for _ in range(-(-m // block_m) * -(-n // width))
    ]
    blocks = max(1, min(sms, len(costs)))
    return max(sum(costs[b::blocks]) for b in range(blocks))


# ==== whole-MLP kernels: fused_decode and fused_small (issue 22) ==================================
# One section, read by both twins (torch_impl/ and jax_impl/ fused_decode.py, fused_small.py), so
# the two stacks tile alike by construction. Nothing here knows the GPU it runs on: NUM_SMS is the
# H100/H200 SXM count the heuristics aim at (a launcher may pass another). The section keeps its
# imports with it, so that it merges apart from the per-layer heuristics above.

from dataclasses import dataclass  # noqa: E402

from .packing import PACK_BLOCK  # noqa: E402
from .spec import MLPSpec  # noqa: E402

NUM_SMS = 132
WHOLE_WIDTHS = (16, 32, 64, 128)  # fused_small's closed set of compile-time widths


def _pow2(name: str, value: object, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or value & (value - 1):
        raise ValueError(f"{name}: expected a power of two >= {low}, got {value!r}")


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ on the host. The launchers use this, not `triton.cdiv`: in Triton 3.6 that is a
    constexpr_function whose host call unwraps its arguments, ~2 µs a call on the 2-core CPU
    machine against 0.03 µs — a dozen of them a training step (bench/step_profile.py)."""
    return -(-a // b)


_cdiv = cdiv


@dataclass(frozen=True)
class DecodeConfig:
    """The tiles of fused_decode's launches (torch_impl/fused_decode.py has the design).

    Launch 1 (up): program j owns hidden columns [j·block_h, (j+1)·block_h) and streams the first
    layer's weights over d_in in block_k rows. Launch 2 (down): program (n, s) owns output columns
    [n·block_n, (n+1)·block_n) and the s-th of `split_k` equal runs of the hidden, in block_k2
    rows. With split_k > 1, launch 3 sums the split_k fp32 partials in order s = 0, 1, ….
    `block_m` is M padded to a power of two >= 16 (tl.dot's smallest tile); a pinned block_m below
    M makes cdiv(M, block_m) row blocks, the fastest index of each launch's grid (the programs that
    stream one weight tile run side by side: the tile comes from HBM once). `pdl` (torch on Hopper
    only): launches 2 and 3 use programmatic dependent launch, so each is scheduled while the one
    before it drains (Pallas has no such launch attribute; ignored there and by the interpreter).
    """

    block_m: int = 16
    block_h: int = 64
    block_k: int = 128
    block_n: int = 128
    block_k2: int = 128
    split_k: int = 8
    num_warps: int = 4
    num_stages: int = 3
    pdl: bool = False

    def __post_init__(self) -> None:
        for name in ("block_m", "block_h", "block_k", "block_n", "block_k2"):
            _pow2(name, getattr(self, name), 16)
        if isinstance(self.split_k, bool) or not isinstance(self.split_k, int) or self.split_k < 1:
            raise ValueError(f"split_k: expected an int >= 1, got {self.split_k!r}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps: expected one of (1, 2, 4, 8, 16), got {self.num_warps!r}")
        if (
            isinstance(self.num_stages, bool)
            or not isinstance(self.num_stages, int)
            or self.num_stages < 1
        ):
            raise ValueError(f"num_stages: expected an int >= 1, got {self.num_stages!r}")
        if not isinstance(self.pdl, bool):
            raise ValueError(f"pdl: expected a bool, got {self.pdl!r}")

    @classmethod
    def from_tile(cls, tile: TileConfig, split_k: int) -> DecodeConfig:
        """A pinned TileConfig (`mlp(..., config=...)`): block_m as is, block_n as both launches'
        column tile (block_h and block_n), block_k as both K chunks, warps and stages as is."""
        return cls(
            tile.block_m,
            tile.block_n,
            tile.block_k,
            tile.block_n,
            tile.block_k,
            split_k,
            tile.num_warps,
            tile.num_stages,
        )

    def __str__(self) -> str:
        return (
            f"m{self.block_m} up {self.block_h}x{self.block_k} down {self.block_n}x"
            f"{self.block_k2} split{self.split_k} w{self.num_warps} s{self.num_stages}"
            + (" pdl" if self.pdl else "")
        )


@dataclass(frozen=True)
class SmallConfig:
    """The tiles of fused_small (torch_impl/fused_small.py has the design): `block_m` rows per
    tile, a persistent grid of min(tiles, num_sms·programs_per_sm) programs that stride over the
    row tiles, `num_stages` x tiles in flight per program (the software pipeline), and `hoist`:
    the weights stay in shared memory for the whole row loop (where they fit) instead of being
    read from L2 again for every tile."""

    block_m: int = 128
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: int = 2
    hoist: bool = True  # every layer's weights loaded once per program, before its row loop

    def __post_init__(self) -> None:
        _pow2("block_m", self.block_m, 16)
        if not isinstance(self.hoist, bool):
            raise ValueError(f"hoist: expected a bool, got {self.hoist!r}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps: expected one of (1, 2, 4, 8, 16), got {self.num_warps!r}")
        for name in ("num_stages", "programs_per_sm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")

    def __str__(self) -> str:
        return (
            f"m{self.block_m} w{self.num_warps} s{self.num_stages} "
            f"p{self.programs_per_sm}/SM" + (" hoist" if self.hoist else "")
        )


# Under the interpreters (about 4 ms per program iteration): tiles small enough that the tests' odd
# widths span several of them in every dimension — hidden 75 is 3 up programs crossing a packed
# block, d_out 33 is 2 down tiles (the second ragged), a 2-way split of the hidden — and few
# iterations in all. No 16-wide dot output: XLA CPU (Pallas' interpreter) multiplies [16, 16] x
# [16, 16] fp32 tiles in another order than NumPy (the Triton interpreter), 32 wide in the same
# one, and the twins are compared bit for bit.
DECODE_INTERPRET_CONFIG = DecodeConfig(
    block_m=16,
    block_h=32,
    block_k=16,
    block_n=32,
    block_k2=16,
    split_k=2,
    num_warps=4,
    num_stages=1,
)
# 32-row tiles over 3 persistent programs: M = 300 is 10 tiles, 4 + 3 + 3 per program, the last
# one ragged (and program 1 and 2's fourth tile past M, fully masked), so the persistent loop and
# its tail run in every test.
SMALL_INTERPRET_CONFIG = SmallConfig(block_m=32, num_warps=4, num_stages=1, programs_per_sm=1)
INTERPRET_NUM_SMS = 3
# fused_small keeps every layer's weights in shared memory for the whole row loop up to this many
# bytes (two programs per SM: these, plus num_stages x tiles each, within 228 KiB).
SMALL_HOIST_BYTES = 64 * 1024


# fused_decode's prefetch a program (16-bit): launch 1's stages - 1 buffers of x and weight rows
# at most this many bytes (two programs an SM). Measured on the H200 (2026-12-04, results
# f5a51b4 and 0c720ab; µs): the best stage counts kept 36-54 KiB in flight — llama3-8b M = 1 / 16
# 4 stages (3 x 18 KiB) 86.4 / 88.8 against 89.6 / 91.5 at 5; M = 32 3 (2 x 20) 90.3-91.6
# against 92.0-93.3 at 4; M = 64 3 (2 x 24) 94.2-95.1 against 97.3-98.2 at 4 and 123 at 2;
# gpt-mlp M = 64 4 (3 x 16) 79.3 against 83.0 at 3 and 81.2 at 5; M = 32 5 (4 x 12) 74.5 (4:
# 74.0, 3: 78.7). More in flight than that lost in every case.
DECODE_IN_FLIGHT_BYTES = 54 * 1024


def decode_block_m(m: int) -> int:
    """M padded to a power of two >= 16 (tl.dot's smallest tile)."""
    return max(16, _next_pow2(m))


def decode_splits(hidden: int, block_k2: int, split_k: int) -> tuple[int, int]:
    """(splits, chunks per split) for launch 2: the hidden's block_k2 chunks dealt into at most
    split_k equal runs, none empty (so every partial is a real sum)."""
    chunks = _cdiv(hidden, block_k2)
    per_split = _cdiv(chunks, max(1, min(split_k, chunks)))
    return _cdiv(chunks, per_split), per_split


def decode_smem_bytes(config: DecodeConfig, gated: bool, itemsize: int) -> tuple[int, int]:
    """Shared memory of launches 1 and 2 (bytes), as triton.compile for sm_90 reports it: the
    pipelined x/h and weight tiles in num_stages buffers where the dot is a wgmma (block_m >= 64
    with 4 warps: it reads both operands from shared memory), num_stages - 1 where it is an
    mma.sync (block_m < 64: the tile being multiplied sits in registers). Tiles in flight while
    one is multiplied: buffers - 1."""
    buffers = max(1, config.num_stages - (config.block_m < 64))
    up = config.block_m * config.block_k + (2 if gated else 1) * config.block_k * config.block_h
    down = config.block_m * config.block_k2 + config.block_k2 * config.block_n
    return buffers * up * itemsize, buffers * down * itemsize


def fused_decode_config(
    spec: MLPSpec, m: int, *, interpret: bool = False, num_sms: int = NUM_SMS
) -> DecodeConfig:
    """The default tiles for a (d_in, hidden, d_out) MLP at M = m rows.

    The reasoning (H200: 132 SMs, 4.24 TB/s copy rate; predictions, measured by
    bench/sweep_decode.py): covering HBM latency at full bandwidth needs ~40-64 KiB of loads in
    flight per SM, so each launch should have about two programs per SM, each with num_stages - 1
    weight tiles of 16-32 KiB in flight (cp.async pipelining of the tl.dot operands), and every
    weight row fragment should be >= 256 B (8 full L2 sectors): a 64-wide packed block is 128 B of
    gate plus the adjacent 128 B of up. Launch 1 takes the widest hidden block that still gives
    num_sms programs (llama3-8b: 64 -> 224 programs); launch 2 takes 256-byte columns (128 16-bit)
    and splits the hidden until there are ~2 programs per SM past M = 16 after a gated first layer,
    ~1 up to it and after a plain one (llama3-8b: 32 column tiles x 8 = 256 programs, x 4 = 128; the
    fp32 partials are 8·M·d_out·4 B <= 8 MiB, L2-resident). Stages: as many (<= 6) as keep two
    programs' buffers within an SM's shared memory and, 16-bit, launch 1's prefetch within
    DECODE_IN_FLIGHT_BYTES (llama3-8b bf16, 64-row K steps: M <= 16 4 stages, three 18 KiB tiles of
    x and weights in flight per program; M = 32 and 64 3).
    """
    block_m = decode_block_m(m)
    if interpret:
        return DecodeConfig(**{**DECODE_INTERPRET_CONFIG.__dict__, "block_m": block_m})
    _, hidden, d_out = spec.widths
    gated = spec.gated
    itemsize = 4 if spec.dtype == "float32" else 2
    # 256 B rows: 128 16-bit or 64 fp32 columns; fragments of at least 64 B otherwise
    wide, narrow = (128, 32) if itemsize == 2 else (64, 16)
    choices = [b for b in (128, 64, 32, 16) if narrow <= b <= wide]
    if gated:  # a hidden block must sit inside one packed (gate, up) pair
        choices = [b for b in choices if PACK_BLOCK % b == 0]
    block_h = next((b for b in choices if _cdiv(hidden, b) >= num_sms), choices[-1])
    # 64-row K steps, 16-bit. Measured on the H200 (llama3-8b bf16): 86.3 / 88.8 µs at M = 1 /
    # 16 against 90.3 / 92.3 µs with 128 (bench/results/2026-12-01-h200-tuning); at M = 32 / 64
    # 90.2 / 94.2 against 94.0 / 103.9 (2026-12-04-h200-1f0f4a2: the x tile is a third of a
    # 128-row step's buffer there, so 128-row steps left one weight tile in flight a program).
    # float32 took 64 (256-byte rows of x) already.
    block_k = 64
    block_n, block_k2 = wide, block_k
    tiles = _cdiv(d_out, block_n)
    chunks = _cdiv(hidden, block_k2)
    # launch 2's programs an SM: one up to M = 16, and past it one after a plain first layer, two
    # after a gated one. H200 (µs, split 4 against 8 at llama3-8b's and gpt-mlp's 32 column
    # tiles): results c74afde, llama3-8b M = 1 / 16 86.1 / 87.5 against 86.7 / 88.5, gpt-mlp
    # 67.6 / 69.6 against 69.0 / 71.8; results 2ceb77a (the reduce in 16-row tiles, two calls
    # each within 0.3 µs), M = 32 / 64: llama3-8b lost (93.6 / 94.6 against 88.5 / 92.2), gpt-mlp
    # won (70.2 / 72.7 against 73.8 / 76.9). Why the gated MLP's launch 2 wants more programs was
    # not measured (its W2 is the same [hidden, 4096] stream, 3584 against 4096 rows a program at
    # split 4); the rule is the measurement (gpt2-mlp at M = 32 / 64 now splits 22 ways, was 24:
    # not measured).
    per_sm = 1 if m <= 16 or not gated else 2
    split_k = max(1, min(round(per_sm * num_sms / tiles), chunks // 2))
    config = DecodeConfig(block_m, block_h, block_k, block_n, block_k2, split_k, 4, 2)
    budget = SMEM_PER_SM // 2 - 2048  # two programs per SM
    for stages in (6, 5, 4, 3, 2) if itemsize == 2 else (5, 4, 3, 2):
        config = DecodeConfig(block_m, block_h, block_k, block_n, block_k2, split_k, 4, stages)
        up_stage = decode_smem_bytes(dataclasses.replace(config, num_stages=1), gated, itemsize)[0]
        in_flight = (stages - 1) * up_stage  # launch 1's prefetched stages
        if itemsize == 2 and stages > 2 and in_flight > DECODE_IN_FLIGHT_BYTES:
            continue
        if max(decode_smem_bytes(config, gated, itemsize)) <= budget:
            break
    return config


# fused_small's forward kernel, 16-bit with its weights on chip: (rows a tile, programs an SM) by
# padded width, best first; the first whose programs all fit an SM at once (shared memory and
# registers: `small_resident`) is the default. A tile's chain of dependent MMAs (a dot, the
# activation and a conversion a layer) leaves the tensor cores idle unless other programs' tiles
# fill the gaps, and the narrower the MLP the shorter each link: so more, smaller programs an SM,
# as many as fit. Measured on the H200 (bench/sweep_decode.py small-variants, relu fp16, 1M rows
# unless named; torch µs):
# - 16 wide (2026-12-03-h200-1a8c754): depth 2 23.8 -> 18.0, depth 8 28.5 -> 20.0 (two 128-row
#   programs -> eight; 6: 18.4 / 20.7, 4: 19.4 / 22.4)
# - 32 wide (same run): six 64-row programs 36.0 / 41.9 at depth 2 / 8 against 39.1 / 50.5 for
#   two 128-row ones (four 64-row ones: 36.7 / 47.4)
# - 64 wide: nerf-64x5 (2M rows, 2026-12-02-h200-0ec778c) three 64-row programs 203.7 against
#   207.5 for 128 rows over 8 warps and 224.3 for two 64-row programs, which still beat one
#   128-row program where neither three nor two 128-row ones fit (depth 8: 131.3 against 158.1,
#   JAX 142.8 against 183.5, 2026-12-03-h200-1a8c754)
SMALL_FORWARD_TILES: dict[int, tuple[tuple[int, int], ...]] = {
    16: ((128, 8), (128, 6), (128, 4), (128, 2)),
    32: ((64, 6), (64, 4), (128, 2), (64, 2)),
    64: ((64, 3), (128, 2), (64, 2)),
}


# Padded widths where fused_small's inference kernel loads x and stores y through tensor
# descriptors (16-bit, where TMA's 16-byte rule holds: torch_impl/fused_small.py `_tma_io`; the
# Pallas twin has no TMA). H200, torch (results 2026-12-04-h200-cd880c0-tmaio): nerf-64x5 (64 wide)
# 150.5-151.2 -> 144.7-145.1 µs; 32 wide, 8 layers 41.1 -> 41.5-41.7 and 16 wide, 3 layers 16.1 ->
# 26.4 (slower: one TMA copy of a 1-4 KiB tile, waited on an mbarrier, costs more there than the
# 16-byte cp.async it replaces).
SMALL_TMA_IO_WIDTHS = (64,)


def padded_width(width: int) -> int:
    """fused_small's compile-time width: the smallest of 16/32/64/128 that holds `width`."""
    return next(w for w in WHOLE_WIDTHS if w >= width)


# The whole-MLP kernels a fused_small tile choice is for: the forward (inference) kernel, the saving
# forward of a training step, kernel A (dgrad: every layer's dZ, walking back) and kernel B (wgrad:
# every layer's dW and db; its rows per step are block_m).
SMALL_KERNELS = ("forward", "saving", "dgrad", "dgrad_wgrad", "wgrad")


def fused_small_config(
    spec: MLPSpec, m: int, *, interpret: bool = False, kernel: str = "forward"
) -> SmallConfig:
    """The default tiles for a narrow MLP (every width <= 128) over m rows, for `kernel` (one of
    SMALL_KERNELS; the forward kernel by default, what `plan()` shows; "saving" and "wgrad" share
    the tiles their runs measured).

    The reasoning (predictions, measured by bench/sweep_decode.py): the floor is reading x and
    writing y once (nerf-64x5 fp16, 2M rows: 537 MB, 127 us at 4.24 TB/s), and the matrix work is
    not far below it (86 GFLOP: ~110 us of wgmma), so each SM needs loads in flight and tensor-core
    work to overlap them: a persistent grid of 2 programs per SM where shared memory allows (1
    otherwise), each pipelining num_stages - 1 x tiles of block_m rows (16-bit, width <= 64: 128
    rows, 16 KiB at width 64, so ~32 KiB in flight per program) while it computes one. Width 128
    halves the rows to keep the fp32 accumulators (and the gate's) in registers. float32 "ieee"
    products are FMA loops that the compiler unrolls over the whole width, with their operands in
    registers: few rows, more warps and no pipeline keep code size and ptxas time bounded (sm_90
    compile of a depth-8 width-128 geglu: ~3 s at 16 rows and 8 warps, 56 s at 32 rows and 4).
    Measured since: the forward kernel at 16-64 wide wants more, smaller programs an SM than two
    (SMALL_FORWARD_TILES, each default resident by `small_resident`), and weights too large to
    hoist for two programs are best hoisted by one where they fit without spilling.
    """
    del m
    if kernel not in SMALL_KERNELS:
        raise ValueError(f"kernel: expected one of {SMALL_KERNELS}, got {kernel!r}")
    hoist = small_hoist(spec)
    if interpret:  # float32 "ieee" takes the unhoisted path there too, so the tests run both
        return SmallConfig(**{**SMALL_INTERPRET_CONFIG.__dict__, "hoist": hoist})
    width = padded_width(max(spec.widths))
    if spec.dtype == "float32":
        block_m, warps, stages = {128: (16, 8, 1), 64: (32, 4, 1)}.get(width, (64, 4, 1))
    else:
        block_m, warps, stages = (64 if width == 128 else 128), 4, 3
    narrow_16bit = width == 64 and spec.dtype != "float32" and hoist
    if kernel == "forward" and hoist and spec.dtype != "float32" and width in SMALL_FORWARD_TILES:
        for rows, programs in SMALL_FORWARD_TILES[width]:
            tiles = SmallConfig(rows, 4, 3, programs, hoist)
            if small_resident(spec, tiles):
                return tiles
    if kernel == "forward" and not hoist and spec.dtype != "float32":
        # Weights past SMALL_HOIST_BYTES that still fit one program's shared memory: held on chip
        # for the whole row loop, one program an SM, rather than streamed from L2 for every tile
        # by two. H200 (results 2026-12-03-h200-2369d39): relu fp16 width 128 depth 4 (128 KiB
        # of weights), 1M rows, 431.4 -> 282.4 µs (torch) and 510.6 -> 281.1 (JAX). It also keeps
        # the pipeliner off a lone streamed layer: with one hidden layer too wide to hoist (a
        # gated 128-wide one, 96 KiB) the streamed layer loop runs once and Triton stages its
        # weight loads with the row loop — sm_90 compile of (64, 128, 64) swiglu float16 at 64
        # rows, 3 stages: 352,256 B, past the 227 KiB a program may have; hoisted: 155,648 B,
        # with 132 B of spill at 255 registers (the gate's two 64 x 128 fp32 accumulators).
        hoisted = SmallConfig(block_m, warps, stages, 1, True)
        if small_resident(spec, hoisted):
            return hoisted
        # streamed, a lone hidden layer would not launch (above): its spill is the lesser evil
        if spec.num_layers == 2 and small_smem_bytes(spec, hoisted) + 1024 <= SMEM_PER_SM:
            return hoisted
    if kernel == "dgrad_wgrad" and spec.dtype != "float32":
        hoist_kinds = SMALL_WGRAD_ON_CHIP_HOIST.get(width, ())
        return dataclasses.replace(
            SMALL_WGRAD_ON_CHIP_CONFIG, hoist=small_wgrad_kind(spec) in hoist_kinds
        )
    if kernel in ("saving", "dgrad") and not hoist:
        # The saving forward and kernel A unroll their layer loops (each layer's residual pointer
        # is chosen at compile time), so the pipeliner buffers every unhoisted layer's weight
        # tiles num_stages - 1 times over: sm_90 compile of 128 wide relu fp16 at 3 stages, 8
        # layers, 843,776 B of shared memory for the saving forward (3 layers 352,256) and
        # 1,032,192 B for kernel A (3 layers 376,832), none of which launches on the H200.
        # One stage: 49,152 B at any depth.
        stages = 1
    if kernel == "dgrad" and narrow_16bit:
        # kernel A walks every layer back per row tile (a dot and act' a layer, every dZ stored):
        # half the rows a tile halves each program's registers and doubles the tiles in flight.
        # H200, the image fit's JAX step (bench/jax_step_probe.py --small-configs, results
        # 2026-12-02-h200-a536a6c): kernel A 23.4 µs at 64 rows and 2 stages against 31.6 at
        # 128 rows and 3; kernel B, whose rows per step are block_m, went 38.1 -> 69.4 µs at 64
        # rows, so it keeps 128.
        return SmallConfig(64, 4, 2, 2, hoist)
    config = SmallConfig(block_m, warps, stages, 2, hoist)
    if small_smem_bytes(spec, config) > SMEM_PER_SM // 2 - 2048:
        config = SmallConfig(block_m, warps, stages, 1, hoist)
    return config


def small_smem_bytes(spec: MLPSpec, config: SmallConfig) -> int:
    """fused_small's shared memory per program, as triton.compile for sm_90 reports it (measured
    on the default configs of the narrow sweep; exact for 16-bit, an upper bound for tf32): the x
    tiles' num_stages buffers and the weights — every layer's tiles and a conversion buffer of the
    hidden (hoisted), or the pipeline's num_stages - 1 buffers of one hidden layer's tiles, plus
    the last layer's tile where hidden layers are gated (streamed). float32 products stage one
    layer's operand tiles (a tile per product) in shared memory."""
    width = padded_width(max(spec.widths))
    itemsize = 4 if spec.dtype == "float32" else 2
    tile = width * width * itemsize
    rows = config.num_stages * config.block_m * width * itemsize
    per_layer = 2 if spec.gated else 1
    if spec.dtype == "float32":
        return rows + per_layer * tile
    if config.hoist:
        return rows + small_weight_bytes(spec) + config.block_m * width
    return rows + max(1, config.num_stages - 1) * per_layer * tile + (tile if spec.gated else 0)


def small_registers(spec: MLPSpec, config: SmallConfig) -> int:
    """An estimate of the forward kernel's registers a thread where its weights are hoisted
    (16-bit), fitted to triton 3.6's sm_90 compiles of widths 16-128 at depths 2-8
    (tests/test_fused_small.py compiles such a grid and checks by ptxas' own count that every
    default's programs are resident at once and do not spill): a base, the fp32 accumulators'
    share of a tile (a gated layer has two), and for each hidden layer past the first what its
    hoisted operands keep in registers, in units of width/4: a bias row 1, a gated layer's up
    half 1, a plain layer's non-relu activation 1/2 (ptxas: relu without bias 50-52 at every
    depth; swiglu with biases 62 / 94 / 138 at depths 2 / 4 / 8 16 wide, 72 / 126 / 225 32
    wide). 128 wide (one program an SM, its weights hoisted past SMALL_HOIST_BYTES) the input tile
    and each layer's hoisted fragments add more: relu without bias 147 / 170 at depths 2 / 4, with
    bias 255 and a 4 B spill at depth 4. Within a few registers of ptxas either side: the test is
    what guarantees the defaults."""
    width = padded_width(max(spec.widths))
    accumulators = (2 if spec.gated else 1) * config.block_m * width // (32 * config.num_warps)
    nonlinear = spec.base_activation not in ("relu", "identity") and not spec.gated
    half_units = 2 * ((2 if spec.gated else 1) * spec.bias + spec.gated) + nonlinear
    wide = 32 + 12 * (spec.num_layers - 1) if width == 128 else 0
    return 48 + accumulators + wide + (spec.num_layers - 1) * (width // 8) * half_units


def small_resident(spec: MLPSpec, config: SmallConfig) -> bool:
    """Whether all of a config's programs an SM fit it at once, in shared memory and (by
    small_registers) in registers, none spilling: a program that waited for another to finish
    would add its whole row loop to the kernel's time, and a spill puts local memory traffic on
    every tile's chain of layers."""
    smem = config.programs_per_sm * (small_smem_bytes(spec, config) + 2048)
    registers = small_registers(spec, config)
    threads = config.programs_per_sm * config.num_warps * 32
    return (
        smem <= SMEM_PER_SM
        and registers <= MAX_REGISTERS
        and threads * registers <= REGISTERS_PER_SM
    )


def small_weight_bytes(spec: MLPSpec) -> int:
    """Bytes of fused_small's on-chip weight tiles: a [WIDTH, WIDTH] tile per product."""
    width = padded_width(max(spec.widths))
    itemsize = 4 if spec.dtype == "float32" else 2
    products = sum(2 if layer.gated else 1 for layer in spec.layers())
    return products * width * width * itemsize


def small_hoist(spec: MLPSpec) -> bool:
    """Keep the weights on chip for the whole row loop: where tensor cores read them from shared
    memory (16-bit, or tf32) and they fit SMALL_HOIST_BYTES. float32 "ieee" products are FMA loops
    that hold their operands in registers: hoisting would pin every layer's tile there."""
    tensor_cores = spec.dtype != "float32" or spec.fp32_precision == "tf32"
    return tensor_cores and small_weight_bytes(spec) <= SMALL_HOIST_BYTES


def fused_small_programs(m: int, config: SmallConfig, num_sms: int = NUM_SMS) -> int:
    """The persistent grid: one program per row tile, at most programs_per_sm per SM."""
    return max(1, min(_cdiv(m, config.block_m), num_sms * config.programs_per_sm))


def decode_config_for(
    config: TileConfig | DecodeConfig | None, spec: MLPSpec, m: int, *, interpret: bool = False
) -> DecodeConfig:
    """What a fused_decode launcher runs: the heuristic (None), a pinned DecodeConfig as is, or a
    pinned TileConfig mapped by DecodeConfig.from_tile (split_k from the heuristic; a gated
    spec's hidden block capped at one packed block). A pinned config the kernels cannot run
    raises ValueError here, so that no caller path (the public function, a front) can run it."""
    if config is None:
        return fused_decode_config(spec, m, interpret=interpret)
    if isinstance(config, DecodeConfig):
        decode = config
    else:
        decode = DecodeConfig.from_tile(config, fused_decode_config(spec, m).split_k)
        if spec.gated and decode.block_h > PACK_BLOCK:
            decode = DecodeConfig(**{**decode.__dict__, "block_h": PACK_BLOCK})
    if spec.gated and PACK_BLOCK % decode.block_h:
        raise ValueError(
            f"config: a gated spec's block_h must divide the packed block "
            f"{PACK_BLOCK}, got {decode.block_h}"
        )
    return decode


def small_config_for(
    config: TileConfig | SmallConfig | None,
    spec: MLPSpec,
    m: int,
    *,
    interpret: bool = False,
    kernel: str = "forward",
) -> SmallConfig:
    """What a fused_small launcher runs: the heuristic for `kernel` (None; SMALL_KERNELS), a
    SmallConfig as is, or a pinned TileConfig (block_m, num_warps, num_stages; hoisting as the
    heuristic would)."""
    if isinstance(config, SmallConfig):
        return config
    if config is None:
        return fused_small_config(spec, m, interpret=interpret, kernel=kernel)
    # a pinned TileConfig: block_m, num_warps, num_stages as is (the tile's N and K are the width)
    return SmallConfig(config.block_m, config.num_warps, config.num_stages, hoist=small_hoist(spec))


# fused_small's backward with every layer's dW on chip (kernel A's DW_ON_CHIP, both twins): a
# program holds each layer's fp32 dW (and db) for its whole row loop, so no dZ goes to memory and
# kernel B, its dZ reads and the row chunks go; its partials (one a program, [P, D_IN, NC]) are
# summed in order by the sum kernel. One program an SM of 8 warps, 128 rows, 2 stages, weights read
# from L2 every tile (held for the row loop where SMALL_WGRAD_ON_CHIP_HOIST says): two warpgroups
# each walk their own 64-row chain of products and hide each other's wgmma waits. H200 (results
# 2026-12-03-h200-30f1f9f, -b40326f, -f86947b): nerf-64x5 at 2M rows 704 µs torch / 764 JAX against
# 1037 / 1142 at 64 rows (8 warps splitting the columns, every product waited for in turn) and 1479
# / 1429 for kernels A and B; 64 rows lost in every spec measured, 1 stage too (1340 µs). ptxas
# spills there (nerf fp16 92 B a thread) and the 64-wide gelu_tanh 3-layer case still won at 240 B:
# the path is taken where it was measured to win or tie against kernels A and B at 1M rows in torch
# (the primary stack; JAX within 10 % of it but for 32-wide gelu_tanh at 5 layers, +18 %),
# SMALL_WGRAD_ON_CHIP_LAYERS[padded width][kind] layers at most, kind "relu" (relu or identity, no
# bias: no act' operand to read, no db), "plain" (any other plain MLP: gelu_tanh with bias measured)
# or "gated" (swiglu with bias measured):
#   gated 16 wide, 5 layers −35 %; 32 wide, 3 layers −32 % (5 layers won at 3584ddd but spill:
#     below); 64 wide spills 328 B at 2: off
#   relu 64 wide, 5 layers −52 % (nerf); 32 wide 3 and 5 layers −3 / +1 %, 8 layers +11 % (JAX
#     at 3584ddd, 8 layers: −12 %: 8); 16 wide, 8 layers +22 %: off (kernel B's dZ traffic is
#     small at 16 wide, and the on-chip chain of 16 products a tile is what costs)
#   plain 64 wide, 2 / 3 layers +0.3 / −4 %; 32 wide, 5 layers −0.5 % (JAX +18 %; +9 % at
#     3584ddd): 3; 16 wide, 8 layers +15 %: off
# This table is the pointer loads' (the JAX twin's, and torch's where TMA's rule fails);
# SMALL_WGRAD_ON_CHIP_LAYERS_TMA below is the descriptor loads'. Ties go on chip: no dZ in memory
# is a smaller peak and 2 launches instead of 3-4. tests/test_fused_small_backward.py compiles
# each table's deepest case of every entry for sm_90, with its loads, and checks it is resident
# with at most SMALL_WGRAD_MAX_SPILL bytes of spill a thread.
SMALL_WGRAD_ON_CHIP_CONFIG = SmallConfig(
    block_m=128, num_warps=8, num_stages=2, programs_per_sm=1, hoist=False
)
SMALL_WGRAD_ON_CHIP_LAYERS = {
    16: {"relu": 0, "plain": 0, "gated": 5},
    32: {"relu": 8, "plain": 3, "gated": 3},
    64: {"relu": 5, "plain": 3, "gated": 0},
}
# The same with the tiles loaded through tensor descriptors (the torch twin where TMA's 16-byte
# rule holds: fused_small_backward._tma_loads; Pallas-Triton has none): the inputs of later layers
# land while the first compute, so the kernel wins at more specs. Measured on the H200 with the
# descriptor loads (torch) and JAX's pointer loads, 1M rows fp16, against kernels A and B (results
# 2026-12-04-h200-3584ddd-onchip; µs, on chip / A and B):
#   relu 32 wide, 8 layers: torch 462 / 586 (−21 %), JAX 513 / 580 (−12 %): 8 in both tables
#     (8 B of spill)
#   gated 64 wide, 2 layers: torch 465 / 559 (−17 %; no spill), JAX 646 / 541 (+19 %; 328 B):
#     2 here only; 3 layers does not launch (294,968 B of shared memory)
#   plain 32 wide, 5 layers: torch 620 / 618 (a tie: on chip; 88 B), JAX 634 / 580 (+9 %): 5 here
#   won but past SMALL_WGRAD_MAX_SPILL, so not taken: gated 32 wide, 5 layers, torch 1283 / 1521
#     (−16 %), JAX 1247 / 1492 (−16 %) with 832-1544 B of spill (fp16 measured, bf16 not); gated
#     16 wide, 8 layers, torch 1715 / 1757 (−2 %) with 604 B
#   still off: 16 wide relu, 8 layers, 320 / 297 (+8 %); plain 647 / 538 (+20 %); plain 64 wide,
#     5 layers, does not launch (344,152 B)
SMALL_WGRAD_ON_CHIP_LAYERS_TMA = {
    16: {"relu": 0, "plain": 0, "gated": 5},
    32: {"relu": 8, "plain": 5, "gated": 3},
    64: {"relu": 5, "plain": 3, "gated": 2},
}
SMALL_WGRAD_MAX_SPILL = 256  # bytes a thread: 240 at 64-wide gelu_tanh, 3 layers (measured win)
# Kinds whose weights the on-chip kernel holds for its whole row loop (`hoist`) rather than reading
# them from L2 every tile, by padded width: where it was measured. nerf-64x5 (results
# 2026-12-03-h200-115f800-hoist): 706 -> 661 µs torch, 760 -> 689 JAX, with 192 B of spill (fp16;
# bf16 208) against 92.
SMALL_WGRAD_ON_CHIP_HOIST = {64: ("relu",)}


def small_wgrad_kind(spec: MLPSpec) -> str:
    """The column of SMALL_WGRAD_ON_CHIP_LAYERS a spec reads: "gated", "relu" (relu or identity
    without bias) or "plain"."""
    if spec.gated:
        return "gated"
    if spec.base_activation in ("relu", "identity") and not spec.bias:
        return "relu"
    return "plain"


def small_wgrad_on_chip(spec: MLPSpec, *, descriptor_loads: bool = False) -> bool:
    """Whether fused_small's backward accumulates every layer's dW on chip: 16-bit, padded width
    <= 64, at most SMALL_WGRAD_ON_CHIP_LAYERS layers for its kind (SMALL_WGRAD_ON_CHIP_LAYERS_TMA
    where its tiles load through tensor descriptors: `descriptor_loads`); else kernels A and B
    with dZ in memory. float32 products are FMA loops holding their operands in registers
    (fused_small_config): no room for the accumulators."""
    table = SMALL_WGRAD_ON_CHIP_LAYERS_TMA if descriptor_loads else SMALL_WGRAD_ON_CHIP_LAYERS
    width = padded_width(max(spec.widths))
    if spec.dtype == "float32" or width not in table:
        return False
    return spec.num_layers <= table[width][small_wgrad_kind(spec)]


# fused_small's backward in row chunks (fused_small_backward.py, both twins). Kernel A stores
# every hidden layer's dZ [M, width] for kernel B, so at large M the dZs dominate a step's memory:
# nerf-64x5 at 2M rows holds 4 x 2M x 64 x 2 B = 1 GiB of them (the step's measured peak 2562 MiB,
# eager torch's 1792). Above SMALL_DZ_BUDGET bytes the rows go through kernels A and B in C chunks,
# only one chunk's dZs alive at a time. 128 MiB: nerf at 2M rows runs 8 chunks of 262,144 rows (each
# still 2,048 row tiles of 128, ~8 waves of kernel A's persistent grid) and drops 1024 - 128 = 896
# MiB of dZ; the image fit (65,536 rows, 4 x 64 wide fp16: 32 MiB of dZ) keeps C = 1, today's
# launches and bits. Smaller budgets buy little more (the residuals h, kept by the forward, are of
# the same size) for 2 more launches a chunk.
SMALL_DZ_BUDGET = 128 * 1024 * 1024


def backward_chunks(
    spec: MLPSpec, m: int, row_tile: int, *, budget: int | None = None
) -> tuple[int, int]:
    """(C, rows per chunk) for fused_small's backward over m rows: C = 1 (rows = m) where every
    hidden layer's dZ (packed [M, 2·Np] gated) fits `budget` bytes (None: SMALL_DZ_BUDGET, read
    at call time), else chunks of the most whole `row_tile`s whose dZs fit (at least one tile),
    the last chunk ragged. `row_tile`: a multiple of every backward kernel's row tile, so each
    chunk's tiles are whole except the last chunk's."""
    budget = SMALL_DZ_BUDGET if budget is None else budget
    hidden = spec.layers()[:-1]
    row_bytes = _ITEMSIZE[spec.dtype] * sum(
        packed_width(layer.d_out) if layer.gated else layer.d_out for layer in hidden
    )
    if m * row_bytes <= budget:
        return 1, m
    rows = max(row_tile, budget // row_bytes // row_tile * row_tile)
    return _cdiv(m, rows), rows
