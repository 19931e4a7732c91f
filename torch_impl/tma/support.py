"""What the `triton_tma` kernels need from the host: the 16-byte rule, the persistent grid, scratch.

- `tma_unsupported_reason(m, n, k, dtype)`: a TMA descriptor needs every row stride (all but the
  last dimension's) to be a multiple of 16 bytes and a 16-byte aligned base. The launchers make
  every operand contiguous and 16-byte aligned, so the rule reduces to `K * itemsize % 16 == 0`
  (rows of x, and of a K-major w) and `N * itemsize % 16 == 0` (rows of w, the residual and the
  output; the packed gated operand's rows, 2·Np = a multiple of 128 elements, always meet it).
  The front records the reason in its plan and runs impl `triton` instead.
- `is_k_major(w)`: a [K, N] w that is the transposed view of a row-major [N, K] buffer, read by
  the linear_act kernel as it is (W_KMAJOR) instead of being copied.
- `num_programs(num_tiles, device, per_sm)`: the persistent grid, min(per_sm·#SMs, #tiles) programs
  on a GPU (`TileConfig.programs_per_sm`, 1 unless a config says 2 or more); under the interpreter
  per_sm times a handful, so that each program really walks several tiles.
- `launch_config(family, config, dtype, fp32_precision, residual)`: the config a launch runs and
  whether its tile loop is warp-specialised.
- `ensure_allocator()`: descriptors built inside a kernel (`tl.make_tensor_descriptor`) live in a
  global-memory scratch that Triton asks the host for at launch (128 bytes per descriptor and
  program); without an allocator the launch fails. The interpreter needs none.

Nothing that is fixed for a device or a config is read per launch (issue 23: a launch once
imported its allocator probe and read the device's capability and SM count on every call): the SM
count is read once per device, the launch config once per (family, config, dtype, precision,
residual), the allocator probe imported once; and since the launchers keep launch records
(torch_impl/launch.py; the keys hold the dtype and the device, which the configs, the 16-byte
rule of an M-major x and the grid depend on), a repeated launch calls none of these: the record
holds the config, the layouts, the grid and the constexprs. What remains per launch is one read of
Triton's allocator context variable — Triton keeps the allocator per context (thread), so a
thread that has none gets ours at its first launch — and the operands' own facts (a base's
16-byte alignment is the pointer's: checked every call).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton

from fusedmlp.common.config import TileConfig
from fusedmlp.common.dtypes import DTYPES
from fusedmlp.common.registry import FALLBACK
from fusedmlp.common.tiling import gated_config, warp_specialize_applies, with_residual_room

from .. import tuning  # noqa: F401  (registers the GPU for the committed tuned configs)
from ..front import STACK
from ..packing import is_k_major  # noqa: F401  (the kernels' layout test, re-exported)
from ..runtime import INTERPRET

TMA_ALIGN_BYTES = 16
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
# Under the interpreter: 3 programs. The test shapes have 6-20 tiles, so every program runs the
# persistent loop several times, and tile counts that 3 does not divide leave the programs uneven.
INTERPRET_PROGRAMS = 3


def tma_unsupported_reason(m: int, n: int, k: int, dtype: str) -> str | None:
    """None if TMA descriptors can address a [m, k] x [k, n] layer in `dtype`, else why not.

    `m` never matters (the rule is on row strides, and rows are K or N elements long); it is taken
    so that every implementation's check has the dispatcher's shape signature.
    """
    del m
    if dtype not in _ITEMSIZE:
        raise ValueError(f"dtype: expected one of {DTYPES}, got {dtype!r}")
    size = _ITEMSIZE[dtype]
    for what, width, name in (("K", k, "x"), ("N", n, "w and the output")):
        row_bytes = width * size
        if row_bytes % TMA_ALIGN_BYTES:
            return (
                f"TMA's 16-byte stride rule: rows of {name} are {what}={width} x {size} bytes "
                f"= {row_bytes} bytes, not a multiple of {TMA_ALIGN_BYTES}; "
                f"falls back to impl '{FALLBACK[STACK]}'"
            )
    return None


def as_tma_operand(t: torch.Tensor) -> torch.Tensor:
    """`t` contiguous with a 16-byte aligned base (a view at an odd offset is copied)."""
    t = t.contiguous()
    if t.data_ptr() % TMA_ALIGN_BYTES:
        t = t.clone()
    return t


@functools.cache
def _max_programs(device_type: str, index: int | None) -> int:
    """Programs a persistent grid may have on a device: its SM count (read once per device)."""
    if INTERPRET or device_type != "cuda":
        return INTERPRET_PROGRAMS
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs(num_tiles: int, device: torch.device, per_sm: int = 1) -> int:
    """Programs of the persistent grid: `per_sm` per SM (never more than there are tiles)."""
    index = device.index
    if index is None and device.type == "cuda" and not INTERPRET:  # a bare "cuda" device
        index = torch.cuda.current_device()
    return max(1, min(per_sm * _max_programs(device.type, index), num_tiles))


@functools.cache
def launch_config(
    family: str, config: TileConfig, dtype: torch.dtype, fp32_precision: str, residual: bool
) -> tuple[TileConfig, bool]:
    """The config a launch runs and whether its tile loop is warp-specialised, once per key:
    gated tiles are whole packed block pairs (`gated_config`); a linear_act with a residual gets
    room for it in shared memory (`with_residual_room`)."""
    if family == "gated":
        config = gated_config(config)
    elif residual:
        name = str(dtype).removeprefix("torch.")
        config = with_residual_room(config, name, fp32_precision=fp32_precision)
    return config, warp_specialize_applies(family, config)


def tf32_safe_warp_specialize(
    ws: bool, dtype: torch.dtype, fp32_precision: str, transposed_operand: bool
) -> bool:
    """`ws`, unless a float32 "tf32" operand is transposed through registers (a row-major W, an
    M-major x): warp-specialised that way, Triton 3.6's kernel computed wrong products on an
    H100 (rel_err 0.87 against float64 at llama-up and hf-up, bench/tf32_probe.py at 2d92464,
    bench/results/2026-12-07-h100-2d92464-tf32/; before the operands were rounded it did not
    compile at all), while the same config read K-major was right."""
    tf32 = dtype == torch.float32 and fp32_precision == "tf32"
    return ws and not (tf32 and transposed_operand)


def _torch_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    # Through torch's caching allocator: cheap per launch, and legal inside CUDA-graph capture.
    del alignment, stream  # torch's blocks are 256-byte aligned; the stream is torch's current one
    return torch.empty(size, dtype=torch.int8, device="cuda")


@functools.cache
def _allocator_probe() -> tuple[Any, type] | None:
    """Triton's current-allocator context variable and its null allocator's class, imported once
    (not public API: where the import breaks, `ensure_allocator` installs ours every launch)."""
    try:
        from triton.runtime._allocation import NullAllocator, _allocator
    except ImportError:  # pragma: no cover - depends on the triton version
        return None
    return _allocator, NullAllocator


def ensure_allocator() -> None:
    """Give Triton a scratch allocator for in-kernel descriptors, unless the user has set one."""
    if INTERPRET:
        return
    probe = _allocator_probe()
    if probe is not None and not isinstance(probe[0].get(), probe[1]):
        return
    triton.set_allocator(_torch_scratch)
