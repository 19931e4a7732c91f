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
  of the X tile and the W (or packed W|V) tile;
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

import math

from .config import TileConfig
from .packing import PACK_BLOCK

FAMILIES: tuple[str, ...] = ("linear_act", "gated")

# The most shared memory one block may use on sm_90 (H100, H200): 227 KiB.
SMEM_LIMIT = 227 * 1024
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
    `mlp(..., config=TileConfig(16, 16, 16))`) is taken as PACK_BLOCK; block_n is a power of two,
    so any larger one is already a multiple of it."""
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
    """
    return (config.warp_specialize and family == "linear_act" and config.epilogue_subtile == 1
            and config.num_warps == 4 and config.block_m >= 64)


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


def with_residual_room(config: TileConfig, dtype: str, *, fp32_precision: str = "ieee"
                       ) -> TileConfig:
    """A persistent linear_act config that fits with a residual: the residual's slice is converted
    through shared memory beside the staged output slice, so a config chosen without it (the
    heuristic's 128×256×64 at 4 stages in two slices: 225 KB, 257 KB with the residual) gets more
    epilogue slices, then fewer stages, until it fits. Other configs come back unchanged."""
    while not fits("linear_act", config, dtype, persistent=True, fp32_precision=fp32_precision,
                   residual=True):
        sub = config.epilogue_subtile
        if sub < 4 and config.block_n // (2 * sub) >= 16:
            config = _with(config, epilogue_subtile=2 * sub)
        elif config.num_stages > 2:
            config = _with(config, num_stages=config.num_stages - 1)
        else:
            break
    return config


def fits(family: str, config: TileConfig, dtype: str, *, persistent: bool,
         fp32_precision: str = "ieee", residual: bool = False) -> bool:
    """Whether the kernel's shared memory stays within an sm_90 block's 227 KB (`smem_bytes`)."""
    return smem_bytes(family, config, dtype, persistent=persistent, fp32_precision=fp32_precision,
                      residual=residual) <= SMEM_LIMIT


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


def _large_m_16bit(family: str, m: int, n: int, persistent: bool, num_sms: int) -> TileConfig:
    gated = family == "gated"
    # (block_m, output block_n) candidates, best tile first; gated output tiles are half the
    # packed operand tile (one wgmma group 2·block_n wide).
    shapes = [(128, 128), (128, 64)] if gated else [(128, 256), (128, 128)]
    if m < 1024:
        shapes.append((64, 64) if gated else (64, 128))
    best = min(shapes, key=lambda s: _waves_cost(m, n, s[0], s[1], (2 if gated else 1) * s[1],
                                                 num_sms))
    bm, bn = best
    warps = 8 if bm >= 128 else 4
    if not persistent:
        return TileConfig(bm, bn, 64, group_m=8, num_warps=warps, num_stages=3)
    # Persistent: 4 stages with the epilogue in two slices (128×256×64 in 16-bit: 196 KB of
    # operand buffers + a 32 KB output slice = 225 KB), as Triton's best plain matmul on the H200
    # (804 TFLOP/s at 8192×14336×4096, cuBLAS 811).
    config = TileConfig(bm, bn, 64, group_m=8, num_warps=warps, num_stages=4, epilogue_subtile=2)
    return config


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
) -> TileConfig:
    """The config to launch with when none is given: `n` is the layer's OUTPUT width (for the
    gated family the packed operand is 2·Np wide), `persistent` selects the triton_tma kernels.

    On a GPU, a tuned config committed for it (common/tuned/, looked up by `impl` — default
    "triton_tma" if persistent else "triton" — family, M bucket, n, k, dtype and precision; the
    device is `device` or the one registered by the stack at import) comes first; otherwise these
    rules:
    - float32: 128×128×32 tiles (gated 128×64 output, the same 128-wide operand), 8 warps, 3
      stages; "ieee" products run on FMAs, "tf32" on wgmma;
    - decode-sized M (≤ 64): narrow M tiles and long K tiles stream the weights;
    - 16-bit: 128×256 (gated 128×128 over a 128×256 packed operand), or a narrower tile where the
      wider one leaves the last wave of the persistent grid mostly empty (`_waves_cost`), 8 warps;
      persistent: 4 stages and a 2-slice epilogue; portable: 3 stages.
    """
    _check_family(family)
    gated = family == "gated"
    if interpret:
        return INTERPRET_CONFIG_GATED if gated else INTERPRET_CONFIG
    from . import tuning  # tuning imports this module: resolve the cycle at call time

    device = device or tuning.registered_device()
    if device is not None:
        chosen = impl or ("triton_tma" if persistent else "triton")
        committed = tuning.committed_config(device, chosen, family, m, n, k, dtype,
                                            fp32_precision)
        if committed is not None:
            return committed
    if dtype == "float32":
        return TileConfig(128, 64 if gated else 128, 32, group_m=8, num_warps=8, num_stages=3)
    if m <= 64:
        # Decode-sized M: the weights dominate; narrow M tiles and long K tiles stream them.
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64
        return TileConfig(block_m, 64, 128, group_m=1, num_warps=4, num_stages=4)
    return _large_m_16bit(family, m, n, persistent, num_sms)


# ---- the tuning search space ---------------------------------------------------------------------
def search_space(family: str, m: int, dtype: str, *, persistent: bool = False,
                 fp32_precision: str = "ieee") -> tuple[TileConfig, ...]:
    """The configs a GPU sweep tries for one family, M bucket and dtype, pruned by `fits`.

    Persistent (triton_tma): each tile and stage count with the smallest epilogue slicing that
    fits and the next one, and for linear_act the warp-specialised form (4 warps, unsliced
    epilogue: what triton 3.6's Hopper pass takes, `warp_specialize_applies`).
    """
    _check_family(family)
    gated = family == "gated"
    if m <= 64:
        tiles = [(bm, bn, bk) for bm in (16, 32, 64) for bn in (64, 128) for bk in (64, 128, 256)]
        if not gated:
            tiles += [(bm, 32, bk) for bm in (16, 32, 64) for bk in (64, 128, 256)]
        warps, stages = (4,), (3, 4, 5)
    elif dtype == "float32":  # 4-byte operands: half the K depth of the 16-bit tiles
        tiles = ([(128, 64, 32), (64, 64, 64), (128, 64, 16), (64, 128, 32)] if gated else
                 [(128, 128, 32), (128, 64, 32), (64, 128, 32), (64, 64, 64), (128, 128, 16)])
        warps, stages = (4, 8), (2, 3, 4)
    else:  # output tiles; a gated tile reads a packed operand tile twice as wide
        tiles = ([(128, 128, 64), (128, 64, 64), (256, 64, 64), (64, 128, 64), (128, 64, 128)]
                 if gated else
                 [(128, 128, 64), (128, 256, 64), (256, 128, 64), (128, 128, 128), (64, 256, 64)])
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
                fitting = [sub for sub in subtiles
                           if fits(family, _with(base, epilogue_subtile=sub), dtype,
                                   persistent=True, fp32_precision=fp32_precision)]
                for sub in fitting[:2]:
                    add(_with(base, epilogue_subtile=sub))
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
