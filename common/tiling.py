"""Heuristic TileConfigs per kernel family, read by both stacks so their twins tile alike.

The raw kernels are un-autotuned; launchers call `heuristic_config` unless a config is passed, and
the
GPU tuned wrappers search `search_space` (benchmarks tune, tests run the heuristic).
"""

from __future__ import annotations

from .config import TileConfig

FAMILIES: tuple[str, ...] = ("linear_act", "gated")

# Under an interpreter: one fixed config (Triton's autotuner cannot run more than one there). Blocks
# are small enough that the golden shapes (odd sizes of 13..97) span several tiles in every
# dimension,
# so masking and the grouped order are exercised, and large enough to keep interpretation fast.
INTERPRET_CONFIG = TileConfig(
    block_m=16, block_n=32, block_k=16, group_m=2, num_warps=4, num_stages=1
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
) -> TileConfig:
    """A good config without tuning. 16-bit tiles follow Triton's Hopper matmul tutorial; the gated
    family holds two fp32 accumulators, so its N tile is half the linear one at the same register
    cost. `persistent` (the triton_tma kernels): the flattened persistent loop keeps one more
    operand buffer and stages the output tile in shared memory, so 128×256×64 at 3 stages needs
    240 KiB (triton.compile for sm_90), over the H100's 227 KiB; 2 stages need 192 KiB.
    """
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    if interpret:
        return INTERPRET_CONFIG
    gated = family == "gated"
    if dtype == "float32":
        return TileConfig(128, 64 if gated else 128, 32, group_m=8, num_warps=8, num_stages=3)
    if m <= 64:
        # Decode-sized M: the weights dominate; narrow M tiles and long K tiles stream them.
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64
        return TileConfig(block_m, 64, 128, group_m=1, num_warps=4, num_stages=4)
    stages = 2 if persistent and not gated else 3
    return TileConfig(128, 128 if gated else 256, 64, group_m=8, num_warps=8, num_stages=stages)


def search_space(family: str, m: int, dtype: str) -> tuple[TileConfig, ...]:
    """The configs a GPU sweep tries for one family, M bucket and dtype (pruned by smem)."""
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    gated = family == "gated"
    if m <= 64:
        blocks_m = (16, 32, 64)
        tiles = [(bm, bn, bk) for bm in blocks_m for bn in (32, 64, 128) for bk in (64, 128, 256)]
        warps, stages = (4,), (3, 4, 5)
    elif dtype == "float32":  # 4-byte operands: half the K depth of the 16-bit tiles
        tiles = [(128, 128, 32), (128, 64, 32), (64, 128, 32), (64, 64, 64), (128, 128, 16)]
        warps, stages = (4, 8), (2, 3, 4)
    else:
        tiles = [(128, 128, 64), (128, 256, 64), (256, 128, 64), (128, 128, 128), (64, 256, 64)]
        warps, stages = (4, 8), (2, 3, 4)
    itemsize = 4 if dtype == "float32" else 2
    out = []
    for bm, bn, bk in tiles:
        for w in warps:
            for s in stages:
                operands = 2 if gated else 1
                # One more operand stage (the persistent loop's) and the output tile staged for
                # its store: conservative for both kernels; a config that still does not fit is
                # skipped by the sweep with its reason (torch_impl/tuning.py).
                smem = (s + 1) * itemsize * (bm * bk + operands * bk * bn) + itemsize * bm * bn
                if smem <= 227 * 1024:  # H100 shared memory per block
                    out.append(TileConfig(bm, bn, bk, group_m=8, num_warps=w, num_stages=s))
    return tuple(out)


def shape_bucket(m: int) -> str:
    """Tuning caches key M by power-of-two bucket: tiles chosen for one M serve its neighbours."""
    if m <= 0:
        return "0"
    return str(1 << (m - 1).bit_length())
