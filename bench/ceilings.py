"""The two ceilings of the roofline, measured in the same run as the numbers they judge.

- matmul: a large square product through the framework's library (cuBLAS via torch on the GPU,
  8192³; 1024³ on a CPU), per dtype the run needs (float32 in IEEE and TF32 counted apart);
- copy: a device-to-device copy of a large buffer (1 GiB on the GPU, 64 MiB on a CPU), counting the
  bytes read plus the bytes written;
- read: a sum over the same buffer, counting the bytes read. Floors and "% roofline" use the copy
  rate; the floor check of every row (timing.judge_timing) uses the faster of copy and read, since
  a kernel that only streams its weights may read faster than a copy moves bytes.

Datasheet rates are leads only; measured ceilings are what "% of roofline" divides by and what the
floor check of every row uses (H200, 2026-12-01: bf16 754–811 TFLOP/s, copy 4.24 TB/s) — except
for arithmetic, where the check takes the physical peak (`physical_peak`: SMs × the architecture's
FLOPs a clock an SM × the highest SM clock), because a kernel that moves less data than a large
GEMM can run at a higher clock than cuBLAS's 8192³ product does (metrics.Ceilings.compute).
Timed with the kernels' own device method on a GPU (timing.time_device: torch.profiler, each call
after the L2 flush; the copy is a DtoD memcpy, so memcpy activity counts here), the host clock on a
CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from .metrics import Ceilings
from .timing import Stats, reps_for, time_device, time_host, warmup

GPU_MATMUL_N = 8192
CPU_MATMUL_N = 1024
GPU_COPY_BYTES = 2**30
CPU_COPY_BYTES = 64 * 2**20


# Dense FLOPs an SM does a clock, per matmul key, by compute capability: tensor cores for the
# 16-bit types and TF32, the FMA units (2 FLOPs each) for IEEE float32. Hopper SXM: 989.4 TFLOP/s
# dense fp16 = 132 SMs x 4096 x 1.83 GHz; A100: 312 = 108 x 2048 x 1.41 GHz. Architectures not
# listed get no peak: their floor check keeps the measured GEMM rate.
FLOPS_PER_SM_CLOCK = {
    (9, 0): {"bfloat16": 4096, "float16": 4096, "tf32": 2048, "float32": 256},
    (8, 0): {"bfloat16": 2048, "float16": 2048, "tf32": 1024, "float32": 128},
}


def physical_peak(
    capability: tuple[int, int], sm_count: int, max_clock_hz: float | None
) -> dict[str, float] | None:
    """Per matmul key the rate the arithmetic units cannot pass (FLOP/s) at `max_clock_hz`; None
    for an architecture FLOPS_PER_SM_CLOCK does not list or an unknown clock."""
    per_clock = FLOPS_PER_SM_CLOCK.get(tuple(capability))
    if per_clock is None or not max_clock_hz or sm_count <= 0:
        return None
    return {key: float(sm_count * rate * max_clock_hz) for key, rate in per_clock.items()}


def _device_peak() -> dict[str, float] | None:
    """physical_peak of the current CUDA device (the one `measure` times), its highest SM clock
    from torch's device properties (clock_rate, kHz: cudaDevAttrClockRate). Keyed by compute
    capability alone, it can only overstate a part with fewer units a clock (an upper bound, as
    the check needs)."""
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    clock_khz = getattr(props, "clock_rate", None)
    return physical_peak(
        (props.major, props.minor),
        props.multi_processor_count,
        clock_khz * 1e3 if clock_khz else None,
    )


def _device_l2_bytes() -> int:
    """The current CUDA device's L2 capacity (torch's `L2_cache_size`; 0 where torch has none)."""
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0) or 0)


@contextlib.contextmanager
def _fp32_precision(mode: str) -> Iterator[None]:
    import torch

    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        previous = matmul.fp32_precision
        matmul.fp32_precision = mode
        try:
            yield
        finally:
            matmul.fp32_precision = previous
    else:  # older torch
        previous = matmul.allow_tf32
        matmul.allow_tf32 = mode == "tf32"
        try:
            yield
        finally:
            matmul.allow_tf32 = previous


def measure(device: str, keys: tuple[str, ...], *, quick: bool = False) -> Ceilings:
    """Ceilings for `device` and the matmul formats in `keys` ("float32", "tf32", "bfloat16")."""
    import torch

    gpu = device == "cuda"
    n = GPU_MATMUL_N if gpu else CPU_MATMUL_N
    if quick:
        n //= 2
    reps = {"min_reps": 20, "max_reps": 50, "target_s": 0.1 if quick else 0.3}

    def wait(_: Any) -> None:
        if gpu:
            torch.cuda.synchronize()

    def timer(fn: Any) -> Stats:
        if not gpu:
            return time_host(fn, wait, **reps)
        calls = reps_for(warmup(fn, wait), **reps)
        return time_device("torch", fn, calls, wait, count_copies=True).device

    matmul: dict[str, float] = {}
    detail: dict[str, Any] = {"matmul_n": n}
    gen = torch.Generator(device=device).manual_seed(0)
    for key in sorted(set(keys)):
        dtype = {
            "float32": torch.float32,
            "tf32": torch.float32,
            "float16": torch.float16,
            "bfloat16": torch.bfloat16,
        }[key]
        # Random operands, never zeros: zeros run faster than real data on the H200 (METHOD.md).
        a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        out = torch.empty(n, n, device=device, dtype=dtype)
        mode = "tf32" if key == "tf32" else "ieee"
        ctx = _fp32_precision(mode) if gpu else contextlib.nullcontext()
        with ctx:
            stats = timer(lambda i, a=a, b=b, out=out: torch.matmul(a, b, out=out))
        matmul[key] = 2 * n**3 / stats.median
        detail[f"matmul_{key}"] = stats.to_dict()
        del a, b, out
    nbytes = (GPU_COPY_BYTES if gpu else CPU_COPY_BYTES) // (4 if quick else 1)
    src = torch.randn(nbytes // 4, device=device, generator=gen)
    dst = torch.empty_like(src)
    stats = timer(lambda i, src=src, dst=dst: dst.copy_(src))
    detail["copy"] = {**stats.to_dict(), "bytes_each_way": nbytes}
    # Reading alone can outrun a read+write copy: a kernel that streams weights may beat the copy
    # rate, so the floor check (not % roofline) allows the faster of the two.
    read = timer(lambda i, src=src: src.sum())
    detail["read"] = {**read.to_dict(), "bytes": nbytes}
    del src, dst
    if gpu:
        torch.cuda.empty_cache()
    peak = _device_peak() if gpu else None
    return Ceilings(
        matmul, 2 * nbytes / stats.median, device, detail, read=nbytes / read.median, peak=peak,
        l2_bytes=_device_l2_bytes() if gpu else 0,
    )  # fmt: skip
