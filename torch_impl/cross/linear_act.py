"""linear_act from PyTorch: jax_impl/mosaic/linear_act.py's Mosaic GPU kernel on torch tensors
(impl `mosaic`, Hopper GPU only).

    y[m, n] = act(Σ_k x[m, k]·W[k, n] + b[n]) + r[m, n]          (fp32 epilogue, one rounding)

Grid, tiles, pipeline: the Mosaic GPU sibling's, unchanged — one warpgroup per BLOCK_M × BLOCK_N
tile in grouped order, a `num_stages`-slot TMA ring feeding wgmma — from the same TileConfig
(`fusedmlp.jax_impl.mosaic.default_config`), so `mosaic` here and `pallas_mosaic` in the JAX front
run the same compiled kernel and can be compared bit for bit and timed against each other.

How the call is made (jax's `as_torch_kernel` compile, our launch: cross/launcher.py):
- A JAX function is lowered once per (function, input shapes/dtypes), and only a *single* Mosaic
  GPU call in it, with no other JAX op, can be launched from torch (as_torch_kernel refuses a pad
  or a slice: "Unsupported operation found in the kernel module"). Whatever the JAX launcher pads
  (M ≥ 8 that is not a multiple of 8, its `pipeline.padded_extents`), torch pads here
  (`padded_shapes`, `pad2d`) and slices after, so the JAX launcher is handed operands it need not
  pad and traces to the bare kernel call (checked on a CPU by lowering for CUDA). Where the
  launcher pads nothing, no copy is made in torch either.
- The launch reads `data_ptr()` and assumes dense row-major buffers: every operand is made
  contiguous.
- `launcher.DirectKernel` launches the compiled kernel on the *current* stream, under the
  tensors' device (entered per call only when it is not current: `_launch`), so a CUDA graph
  captures it (its first call of a shape, which compiles, must come before the capture). Where a
  module is more than the bare call, as_torch_kernel's own callable runs it instead, on the
  current device's *default* stream, fenced when a side stream is current, never captured.
- jax < 0.11.1 passes the buffers to the compiled launcher with the wrong calling convention
  (fixed upstream in jax-ml/jax PR #39640, in 0.11.1 and 0.11.2): older jax is refused.
- Host time per call: the public as_torch_kernel wrapper rebuilds a ShapeDtypeStruct per argument
  through jax.tree.map and looks the shapes up in its compile cache (797 µs against 128 µs for
  the same kernels from JAX at llama3-8b M=16 on the H200, with the per-call config checks and
  copies this file then had); its compiled callable still re-checks every argument and asks
  torch for the default stream through the device-availability checks (launcher.py says what
  that cost). Here the compiled kernel is cached per (variant, shapes, dtypes)
  (`compiled_kernel`) and the config checked once per variant: a repeated call is a dict lookup,
  the pads that are needed, the outputs' allocation and the launch.

Imports: jax (and the Mosaic GPU kernels) are imported lazily on the first call, the one documented
place where torch_impl reaches jax; a missing jax raises ImportError naming it.

Twin: jax_impl/cross/linear_act.py (the Triton kernel called from JAX), the other direction.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import os
from collections.abc import Callable
from typing import Any

import torch

from fusedmlp.common.config import TileConfig
from fusedmlp.common.registry import FALLBACK

from ..front import STACK
from . import launcher

FAMILY = "linear_act"
IMPL = "mosaic"
MIN_JAX = (0, 11, 1)  # as_torch_kernel's launch convention fixed here (jax-ml/jax PR #39640)
MOSAIC_PACKAGE = "fusedmlp.jax_impl.mosaic"


# ==== lazy imports ================================================================================
def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


@functools.cache
def as_torch_kernel() -> Callable[[Callable], Callable]:
    """`plgpu.as_torch_kernel`, from a jax new enough for it to pass the right pointers.

    In a torch process torch's allocator owns the GPU's memory, and as_torch_kernel's outputs are
    torch tensors: JAX's client, started here, must not reserve 75 % of the memory up front (its
    default). XLA_PYTHON_CLIENT_PREALLOCATE=false is set unless the caller set it; it takes effect
    where JAX's GPU client has not started yet."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        jax = importlib.import_module("jax")
        plgpu = importlib.import_module("jax.experimental.pallas.mosaic_gpu")
    except ImportError as err:
        raise ImportError(
            f"impl {IMPL!r} calls the Mosaic GPU kernels of {MOSAIC_PACKAGE}, which needs jax "
            f"(with the CUDA plugin and absl-py): {err}"
        ) from err
    if _version_tuple(jax.__version__) < MIN_JAX:
        raise ImportError(
            f"impl {IMPL!r}: jax {jax.__version__} is too old for as_torch_kernel (it passes the "
            f"buffers with the wrong calling convention before {'.'.join(map(str, MIN_JAX))}); "
            f"use jax >= {'.'.join(map(str, MIN_JAX))} or impl '{FALLBACK[STACK]}'"
        )
    return plgpu.as_torch_kernel


@functools.cache
def unavailable_reason() -> str | None:
    """None when this process can run the Mosaic GPU kernels from torch (jax >= 0.11.1 with its
    CUDA backend), else why not: a route that `auto` takes by itself (fused_small's sibling, the
    training step of cross/backward.py) then keeps its Triton kernels. Asked once (it imports jax
    and starts its GPU client, without the memory pool: `as_torch_kernel`); a failure is cached
    too, so a process without jax does not retry the import at every call."""
    try:
        as_torch_kernel()
        jax = importlib.import_module("jax")
        backend = jax.default_backend()
    except Exception as err:  # whatever stops jax here, the Triton kernels run instead
        return f"{MOSAIC_PACKAGE}'s kernels cannot run from torch here: {err}"
    if backend != "gpu":
        return f"jax has no GPU backend here (its default backend is {backend!r})"
    return None


def mosaic_module(family: str) -> Any:
    """jax_impl's Mosaic GPU module of `family` (imports jax)."""
    return importlib.import_module(f"{MOSAIC_PACKAGE}.{family}")


# ==== what this route can take ====================================================================
def unsupported_reason(m: int, n: int, k: int, dtype: str) -> str | None:
    """The Mosaic GPU kernels' rule (jax_impl.mosaic.pipeline.unsupported_reason) under this
    route's name and fallback: the registry's `supports` for impl `mosaic` (imports jax)."""
    pipeline = importlib.import_module(f"{MOSAIC_PACKAGE}.pipeline")
    why = pipeline.unsupported_reason(m, n, k, dtype)
    if why is None:
        return None
    # The kernels' own reason (dtype; K and N in multiples of 16), under this route's name.
    theirs, ours = f"'{FALLBACK['jax']}'", f"'{FALLBACK[STACK]}'"
    return why.replace(pipeline.IMPL, IMPL).replace(theirs, ours)


# ==== launch plan (pure) ==========================================================================
def round_up(value: int, multiple: int) -> int:
    """The Mosaic launcher's rounding (pipeline.round_up): at least one tile, even for 0."""
    return max(1, -(-value // multiple)) * multiple


@dataclasses.dataclass(frozen=True)
class MosaicLaunch:
    """Tile-aligned extents of one Mosaic GPU launch: operands are padded to them in torch."""

    m: int
    n: int
    k: int
    mp: int
    np_: int
    kp: int
    grid: tuple[int, ...]


@functools.cache
def padded_shapes(m: int, n: int, k: int, config: TileConfig, family: str = FAMILY) -> MosaicLaunch:
    """The extents the JAX launcher pads M, N, K to (`pipeline.padded_extents`: TMA zero-fills
    and clips, so only M >= 8 that is not a multiple of 8 is padded) and its persistent grid. The
    CPU tests check both against that launcher."""
    pipeline = importlib.import_module(f"{MOSAIC_PACKAGE}.pipeline")
    tiles = pipeline.plan_tiles(config, family)
    mp, np_, kp = pipeline.padded_extents(m, n, k, tiles, False)
    num_tiles = -(-mp // tiles.block_m) * -(-np_ // tiles.out_n)
    grid = (max(1, min(pipeline.num_sms(False), num_tiles)),)  # the persistent grid
    return MosaicLaunch(m, n, k, mp, np_, kp, grid)


# ==== launcher helpers ============================================================================
# TMA's global addresses are 16-byte aligned: the Mosaic GPU runtime aborts the process (no Python
# error) where cuTensorMapEncodeTiled refuses a base address, so a view at an odd offset is copied.
TMA_BASE_ALIGN = 16


def _usable(t: torch.Tensor) -> bool:
    return t.is_contiguous() and t.data_ptr() % TMA_BASE_ALIGN == 0


def pad2d(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """`t` zero-padded at the end to [rows, cols], dense row-major at a 16-byte aligned address
    (as_torch_kernel reads data_ptr(), TMA needs the alignment); no copy when `t` is already that.
    Zero K padding adds nothing to the products."""
    if tuple(t.shape) == (rows, cols) and _usable(t):
        return t
    out = t.new_zeros((rows, cols))
    out[: t.shape[0], : t.shape[1]] = t
    return out


def pad1d(t: torch.Tensor, size: int) -> torch.Tensor:
    """`pad2d` for a vector (bias rows)."""
    if t.shape[0] == size and _usable(t):
        return t
    out = t.new_zeros((size,))
    out[: t.shape[0]] = t
    return out


@functools.cache
def _supported_dtypes() -> tuple[tuple[str, ...], tuple[torch.dtype, ...]]:
    names = importlib.import_module(f"{MOSAIC_PACKAGE}.pipeline").SUPPORTED_DTYPES
    return names, tuple(getattr(torch, name) for name in names)


def check_operand(x: torch.Tensor) -> None:
    """What the launcher still checks per call, for callers that skip the front: NotImplementedError
    for a dtype the Mosaic GPU kernels cannot take, ValueError for a tensor off the GPU (a tuple
    membership and a device type: no import, no string)."""
    names, dtypes = _supported_dtypes()
    if x.dtype not in dtypes:
        dtype = str(x.dtype).removeprefix("torch.")
        raise NotImplementedError(
            f"x: impl {IMPL!r} takes dtypes {names} (wgmma's 16-bit inputs), got {dtype}; "
            f"fallback: impl '{FALLBACK[STACK]}'"
        )
    if x.device.type != "cuda":
        raise ValueError(f"x: impl {IMPL!r} expected a CUDA tensor, got device {x.device}")


def check_launchable(x: torch.Tensor, config: TileConfig, num_weights: int, residual: bool) -> None:
    """ValueError for a TileConfig the Mosaic GPU kernels cannot run: checked once per compiled
    variant, not per call."""
    dtype = str(x.dtype).removeprefix("torch.")
    pipeline = importlib.import_module(f"{MOSAIC_PACKAGE}.pipeline")
    pipeline.check_config(config, dtype, num_weights=num_weights, residual=residual)


_COMPILED: dict[tuple, Callable[..., torch.Tensor]] = {}
# Compiled callables kept (each holds a loaded module; a Mosaic GPU kernel is compiled per shape,
# so a workload of many distinct M stays bounded: past this the cache starts afresh).
_COMPILED_MAX = 256
# Launch through launcher.DirectKernel where the module allows (False: as_torch_kernel's own
# callable always; the host-time probe compares the two in one process).
DIRECT_LAUNCH = True


def _compile(fn: Callable[..., Any], operands: list[torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The compiled torch callable of `fn` for these operands' shapes and dtypes: a
    `launcher.DirectKernel` (launched on the current stream, `_launch`) where the lowered module is
    the bare kernel call, which is what every traced function of this route lowers to; else the
    per-shape compile inside as_torch_kernel (jax._src.pallas.mosaic_gpu.torch._compile_fn, jax
    0.11.1 and 0.11.2), or the public wrapper where that is gone (it then re-derives the shapes
    per call). Both of those launch on the default stream."""
    wrapper = as_torch_kernel()(fn)  # also the jax version check
    jax = importlib.import_module("jax")
    structs = tuple(
        jax.ShapeDtypeStruct(tuple(t.shape), str(t.dtype).removeprefix("torch.")) for t in operands
    )
    if DIRECT_LAUNCH:
        direct = launcher.compile_direct(fn, structs)
        if direct is not None:
            return direct
    try:
        compile_fn = importlib.import_module("jax._src.pallas.mosaic_gpu.torch")._compile_fn
    except (ImportError, AttributeError):
        return wrapper
    return compile_fn(fn, structs)


def compiled_kernel(
    key: tuple, make_fn: Callable[[], Callable[..., Any]], operands: list[torch.Tensor]
) -> Callable[..., torch.Tensor]:
    """The compiled callable of the variant `key` (family, activation, flags, config) for these
    operands' shapes, dtypes and device: compiled on first use, then a dict lookup. The module is
    loaded into the operands' device's context (the current one while it compiles), where `_launch`
    runs it. A first call inside a CUDA graph capture is refused: a compile cannot be recorded."""
    device = operands[0].device
    full = (key, device, tuple((tuple(t.shape), t.dtype) for t in operands))
    kernel = _COMPILED.get(full)
    if kernel is None:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"impl {IMPL!r}: a CUDA graph capture reached a Mosaic GPU kernel not yet compiled "
                f"for these operands ({', '.join(str(tuple(t.shape)) for t in operands)}); "
                "compiling and loading it cannot be recorded: run the same call once before the "
                "capture (warm-up steps, as training.GraphedTrainStep takes)"
            )
        if len(_COMPILED) >= _COMPILED_MAX:
            _COMPILED.clear()
        on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with on_device:
            kernel = _COMPILED[full] = _compile(make_fn(), operands)
    return kernel


@functools.cache
def _default_stream_handle(index: int) -> int:
    return torch.cuda.default_stream(index).cuda_stream


def _current_stream_handle(index: int) -> int:
    """The raw handle of the device's current stream: torch's own accessor (what Triton's
    launcher calls), without building a Stream object; the public one where it is gone."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw(index) if raw is not None else torch.cuda.current_stream(index).cuda_stream


def _launch(kernel: Callable, operands: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The kernel on `operands`, under `device` (entered only when it is not current). A
    `launcher.DirectKernel` launches on the current stream, so a CUDA graph capture records it;
    as_torch_kernel's callable on the default stream, fenced against the current stream only when
    that is a side stream, so callers on side streams see the usual semantics either way — a
    capture cannot record that one (refused, naming what can be captured)."""
    if device.type != "cuda":  # the CPU tests drive `run` with a stand-in kernel
        return kernel(*operands)
    index = torch.cuda.current_device()
    if device.index is not None and device.index != index:
        with torch.cuda.device(device):
            return _launch(kernel, operands, device)
    # by index: torch.cuda.current_stream() without one looks the device up again through the
    # availability checks every launch (an eager hf-blog training step's five launches: 13-55 µs
    # of host time on an H100, bench/results/2026-12-06-h100-8e0353e call 7)
    current = _current_stream_handle(index)
    on_default = current == _default_stream_handle(index)
    if isinstance(kernel, launcher.DirectKernel):
        # a CUDA graph records it like any launch on the capturing stream: the kernel's TMA
        # descriptors travel by value among its parameters (built on the host at each launch)
        return kernel(*operands, stream=current)
    # (the default stream never captures: CUDA records side streams only)
    if not on_default and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "a CUDA graph cannot record as_torch_kernel's own launch (it goes to the default "
            "stream), which this jax's Mosaic GPU module needed (launcher.plan_of refused it); "
            "capture impl 'auto' under torch_impl.graph_safe(), or a Triton impl"
        )
    if on_default:  # as_torch_kernel's stream: no fence needed
        return kernel(*operands)
    default, side = torch.cuda.default_stream(index), torch.cuda.current_stream(index)
    default.wait_stream(side)
    y = kernel(*operands)
    side.wait_stream(default)
    return y


def run(kernel: Callable, operands: list[torch.Tensor], plan: MosaicLaunch) -> torch.Tensor:
    """Launch a compiled kernel on operands at the plan's extents; the [M, N] result (contiguous:
    sliced only where the launcher padded)."""
    y = _launch(kernel, operands, operands[0].device)
    if (plan.mp, plan.np_) == (plan.m, plan.n):
        return y
    return y[: plan.m, : plan.n].contiguous()


# ==== launcher ====================================================================================
@functools.cache
def mosaic_function(
    activation: str, has_bias: bool, has_residual: bool, config: TileConfig
) -> Callable[..., Any]:
    """The JAX function handed to as_torch_kernel for one static variant: the JAX launcher on
    tile-aligned operands, so its pad and slice are no-ops and it traces to the bare Mosaic GPU
    call (the CPU tests lower it for CUDA and run as_torch_kernel's own module check on it)."""
    mosaic = mosaic_module(FAMILY)

    def fn(x: Any, w: Any, *rest: Any) -> Any:
        rest = list(rest)
        b = rest.pop(0) if has_bias else None
        r = rest.pop(0) if has_residual else None
        return mosaic.linear_act_fwd(
            x, w, b, r, activation=activation, config=config, interpret=False
        )

    fn.__name__ = f"linear_act_fwd_{activation}"
    return fn


def linear_act_fwd(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    residual: torch.Tensor | None,
    *,
    activation: str,
    config: TileConfig,
    fp32_precision: str = "ieee",
) -> torch.Tensor:
    """act(x @ w + b) (+ residual) for 2-D x [M, K], w [K, N] on a Hopper GPU; returns [M, N].

    fp32_precision is accepted for the siblings' signature (fp16/bf16 products are exact in fp32).
    """
    del fp32_precision
    m, k = x.shape
    n = w.shape[1]
    if m == 0:
        return x.new_empty((0, n))
    check_operand(x)
    plan = padded_shapes(m, n, k, config)
    operands = [pad2d(x, plan.mp, plan.kp), pad2d(w, plan.kp, plan.np_)]
    if b is not None:
        operands.append(pad1d(b, plan.np_))
    if residual is not None:
        operands.append(pad2d(residual, plan.mp, plan.np_))
    has_bias, has_residual = b is not None, residual is not None

    def make() -> Callable[..., Any]:
        check_launchable(x, config, num_weights=1, residual=has_residual)
        return mosaic_function(activation, has_bias, has_residual, config)

    kernel = compiled_kernel((FAMILY, activation, has_bias, has_residual, config), make, operands)
    return run(kernel, operands, plan)
