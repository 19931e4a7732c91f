"""TileConfig: one tiling for a kernel launch, read by both stacks.

A configuration tuned on one side can be pinned on the other and the two kernels compared bit for
bit. Field names follow Triton's tutorials (BLOCK_M/N/K, GROUP_M, num_warps, num_stages); the
Pallas twins read the same fields into BlockSpecs and `CompilerParams`, the Mosaic GPU siblings into
their tiles.

`block_n` is always the OUTPUT columns of one tile: for the gated family, whose packed `[W|V]`
operand interleaves gate and up in blocks of `common.packing.PACK_BLOCK` columns, the operand
tile is `2 * block_n` wide and `block_n` a multiple of PACK_BLOCK (any block_n ≥ 64 is; the gated
kernels read a smaller one — a config pinned for every layer of an MLP — as 64:
`tiling.gated_config`).

Tile sizes: block_m and block_k are powers of two ≥ 16 everywhere. block_n is a power of two ≥ 16
or a multiple of 64: the Triton and Pallas-Triton kernels take powers of two only (their tiles
are `tl.arange` ranges; `validate.check_config` refuses the others for them, naming the
implementations that take them), while Mosaic GPU's wgmma takes any width that is whole 64-column
swizzle atoms — 192 fills the waves of an N = 768 GEMM (hf-blog-geglu's down projection: 256
tiles of 128×192 on 132 SMs, 1.94 waves, where 128×256 leaves 1.45).

Hopper knobs, ignored where they mean nothing (the portable kernels, the interpreters):
- `warp_specialize`: producer/consumer warp roles in the main loop (Triton's
  `tl.range(..., warp_specialize=True)`; Mosaic GPU's warp-specialised pipeline). Triton 3.6 on
  Hopper can apply it only to some kernels and configs (`tiling.warp_specialize_applies`);
  elsewhere the Triton kernels ignore it;
- `epilogue_subtile`: the output tile is stored in this many column slices, so only a slice of it is
  staged in shared memory at a time (frees shared memory for pipeline stages).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# What the training forward keeps for the backward (issue 24), the same names and default in both
# stacks: "preact" saves every layer's input h_i and pre-activation z_i (gated: the packed [z|g]),
# "inputs" saves only x and recomputes the forward once in the backward (less memory, one extra
# forward's FLOPs). `cost.saved_bytes` gives the memory of each, `plan()` reports it.
SAVED_POLICIES = ("preact", "inputs")
DEFAULT_SAVED = "preact"


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# Mosaic GPU tiles: whole 128-byte swizzle atoms of 16-bit elements (a 64-column multiple)
SWIZZLE_COLUMNS = 64


def is_power_of_two_tile(config: TileConfig) -> bool:
    """Whether every tile dimension of `config` is a power of two, what Triton's kernels take
    (block_m and block_k always are; block_n may be a Mosaic GPU width)."""
    return _is_power_of_two(config.block_n)


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    warp_specialize: bool = False
    epilogue_subtile: int = 1
    # Persistent (triton_tma) kernels: programs of the grid per SM. 2 lets one program's epilogue
    # run while the other's loads and stores are in flight (short-K, store-bound GEMMs); the
    # portable kernels, one tile a program, have no use for it. Mosaic GPU runs one block per SM;
    # there 2 (with warp_specialize) is the same idea inside the block: ping-pong, each compute
    # warpgroup a tile of its own (jax_impl/mosaic/pipeline.py). fused_small's grid is its own
    # SmallConfig.programs_per_sm (default 2), not this field.
    programs_per_sm: int = 1

    def __post_init__(self) -> None:
        # tl.dot needs every tile dimension to be a power of two of at least 16; Mosaic GPU's
        # wgmma also takes a block_n of whole swizzle atoms (the module docstring)
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            also = f" or a multiple of {SWIZZLE_COLUMNS}" if name == "block_n" else ""
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name}: expected a power of two >= 16{also}, got {value!r}")
            wide = name == "block_n" and value > 0 and value % SWIZZLE_COLUMNS == 0
            if value < 16 or not (_is_power_of_two(value) or wide):
                raise ValueError(f"{name}: expected a power of two >= 16{also}, got {value}")
        if not isinstance(self.group_m, int) or self.group_m < 1:
            raise ValueError(f"group_m: expected a positive int, got {self.group_m!r}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps: expected one of (1, 2, 4, 8, 16), got {self.num_warps!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"num_stages: expected a positive int, got {self.num_stages!r}")
        if not isinstance(self.warp_specialize, bool):
            raise ValueError(f"warp_specialize: expected a bool, got {self.warp_specialize!r}")
        if self.epilogue_subtile not in (1, 2, 4) or isinstance(self.epilogue_subtile, bool):
            raise ValueError(
                f"epilogue_subtile: expected one of (1, 2, 4), got {self.epilogue_subtile!r}"
            )
        if self.programs_per_sm not in (1, 2, 3, 4) or isinstance(self.programs_per_sm, bool):
            raise ValueError(
                f"programs_per_sm: expected one of (1, 2, 3, 4), got {self.programs_per_sm!r}"
            )
        if self.block_n % self.epilogue_subtile or self.block_n // self.epilogue_subtile < 16:
            raise ValueError(
                f"epilogue_subtile: block_n={self.block_n} must split into {self.epilogue_subtile}"
                " slices of at least 16 columns"
            )

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TileConfig:
        return cls(**data)

    def __str__(self) -> str:
        extras = (
            ("" if not self.warp_specialize else " ws")
            + ("" if self.epilogue_subtile == 1 else f" sub{self.epilogue_subtile}")
            + ("" if self.programs_per_sm == 1 else f" p{self.programs_per_sm}")
        )
        return (
            f"{self.block_m}x{self.block_n}x{self.block_k} g{self.group_m} "
            f"w{self.num_warps} s{self.num_stages}{extras}"
        )
