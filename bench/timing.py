"""Timing methods: device-side for both stacks on a GPU, host clocks on a CPU, medians with spread.

- torch on CUDA (`time_cuda_events`): `triton.testing.do_bench`'s method without its cache flush —
  warm-up calls first (compilation and autotuning stay out), then each repetition between two CUDA
  events on the current stream; the device time of every repetition is kept. The L2 is defeated by
  rotating input copies (cases.py) instead of a 256 MB flush kernel, whose own time would sit
  between the events' queue slots.
- JAX on CUDA (`time_jax_profiler`): JAX exposes no events on its streams, so each repetition's
  device time is read from a `jax.profiler` trace: the GPU plane's "XLA Modules" line has one event
  per executable run, from its first kernel's start to its last kernel's end. Where that line is
  missing, the module's kernel events on the stream lines are grouped by the execution XLA tags them
  with (scope_range_id), or else split into repetitions at the widest idle gaps (each repetition is
  waited for); each group's first start to last end is taken. This is the device
  span, like the events' span for torch but without the launch gap before the first kernel (a few µs
  at most; documented beside results).
- CPU (`time_host`): the device is the host: `time.perf_counter` around each synchronised call.

Every method returns `Stats` (median, min, max in seconds, repetition count, method name). Host-side
dispatch time per call (the enqueue cost, without waiting) is measured separately by `host_dispatch`
and reported as overhead, never mixed into the kernel time.
"""

from __future__ import annotations

import glob
import itertools
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

MIN_REPS = 20
MAX_REPS = 200
WARMUP_S = 0.05
# Timed repetitions aim at this much total time, within the repetition bounds above.
TARGET_S = 0.25


@dataclass(frozen=True)
class Stats:
    median: float
    min: float
    max: float
    n: int
    method: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, samples: list[float], method: str) -> Stats:
        return cls(statistics.median(samples), min(samples), max(samples), len(samples), method)


def _reps_for(per_call_s: float, min_reps: int, max_reps: int, target_s: float) -> int:
    if per_call_s <= 0:
        return max_reps
    return max(min_reps, min(max_reps, int(target_s / per_call_s)))


def _warmup(fn: Callable[[int], Any], wait: Callable[[Any], None], warmup_s: float) -> float:
    """Call until `warmup_s` has passed (at least 3 calls); returns the last call's host time."""
    start = time.perf_counter()
    calls, last = 0, 0.0
    while calls < 3 or time.perf_counter() - start < warmup_s:
        t0 = time.perf_counter()
        wait(fn(calls))
        last = time.perf_counter() - t0
        calls += 1
        if calls >= 1000:
            break
    return last


def time_host(
    fn: Callable[[int], Any],
    wait: Callable[[Any], None],
    *,
    min_reps: int = MIN_REPS,
    max_reps: int = MAX_REPS,
    warmup_s: float = WARMUP_S,
    target_s: float = TARGET_S,
) -> Stats:
    """Wall clock around each synchronised call (the method on a CPU)."""
    per_call = _warmup(fn, wait, warmup_s)
    samples = []
    for i in range(_reps_for(per_call, min_reps, max_reps, target_s)):
        t0 = time.perf_counter()
        wait(fn(i))
        samples.append(time.perf_counter() - t0)
    return Stats.of(samples, "host clock, synchronised")


def host_dispatch(fn: Callable[[int], Any], wait: Callable[[Any], None], reps: int = 50) -> Stats:
    """Host time to issue one call without waiting for it (asynchronous dispatch), per call."""
    samples, out = [], None
    for i in range(reps):
        t0 = time.perf_counter()
        out = fn(i)
        samples.append(time.perf_counter() - t0)
        if i % 10 == 9:  # keep the queue short so back-pressure does not enter the numbers
            wait(out)
    wait(out)
    return Stats.of(samples, "host clock, dispatch only")


def time_cuda_events(
    fn: Callable[[int], Any],
    *,
    min_reps: int = MIN_REPS,
    max_reps: int = MAX_REPS,
    warmup_s: float = WARMUP_S,
    target_s: float = TARGET_S,
) -> Stats:
    """Device time of each call between two CUDA events (torch's current stream)."""
    import torch

    def wait(_: Any) -> None:
        torch.cuda.synchronize()

    _warmup(fn, wait, warmup_s)
    # Estimate with events so that a long host dispatch does not inflate the repetition count.
    probe_s, probe = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    probe_s.record()
    for i in range(3):
        fn(i)
    probe.record()
    torch.cuda.synchronize()
    per_call = probe_s.elapsed_time(probe) / 3e3
    reps = _reps_for(per_call, min_reps, max_reps, target_s)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        fn(i)
        ends[i].record()
    torch.cuda.synchronize()
    samples = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends, strict=True)]
    return Stats.of(samples, "CUDA events")


_DERIVED_LINES = frozenset({"XLA Modules", "XLA Ops", "Steps", "Launch Stats", "Source code",
                            "Framework Name Scope", "XLA TraceMe", "Async XLA Ops"})


def _gpu_spans(xspace_path: str, reps: int, module_hint: str) -> tuple[list[float], str]:
    """Per-repetition device seconds from a jax.profiler XSpace file."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(xspace_path)
    gpu_planes = [p for p in data.planes if p.name.startswith("/device:GPU")]
    if not gpu_planes:
        raise RuntimeError("the trace has no /device:GPU plane")
    plane = gpu_planes[0]
    lines = {line.name: list(line.events) for line in plane.lines}
    modules = [e for e in lines.get("XLA Modules", []) if module_hint in e.name]
    # Each grouping below is trusted only if it yields exactly one group per repetition.
    if len(modules) == reps:
        return [e.duration_ns / 1e9 for e in modules], "jax.profiler: XLA Modules line"
    # Raw CUPTI activity sits on per-stream lines ("Stream #N(...)"); where the lines are named
    # otherwise, take every line but the ones the profiler derives from annotations.
    streams = [name for name in lines if name.startswith("Stream")] or [
        name for name in lines if name not in _DERIVED_LINES
    ]
    events = [e for name in streams for e in lines[name]
              if "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    stats = [dict(e.stats) for e in events]
    # XLA tags each kernel with its module (hlo_module) and the execution it belongs to
    # (scope_range_id): group by execution where the tags are there.
    ours = [(e, s) for e, s in zip(events, stats, strict=True)
            if module_hint in str(s.get("hlo_module", ""))]
    runs: dict[object, list[tuple[float, float]]] = {}
    for e, s in ours:
        if "scope_range_id" in s:
            runs.setdefault(s["scope_range_id"], []).append((e.start_ns, e.duration_ns))
    if len(runs) == reps:
        spans = sorted(
            (min(a for a, _ in ev), max(a + d for a, d in ev)) for ev in runs.values()
        )
        return [(end - start) / 1e9 for start, end in spans], (
            "jax.profiler: kernels grouped by execution (scope_range_id)")
    kernels = [(e.start_ns, e.duration_ns) for e, _ in ours] or [
        (e.start_ns, e.duration_ns) for e in events]
    spans = split_spans(kernels, reps)
    return spans, f"jax.profiler: {len(kernels)} kernel events split into calls at idle gaps"


def split_spans(events: list[tuple[float, float]], reps: int) -> list[float]:
    """Seconds per repetition from (start_ns, duration_ns) kernel events of `reps` calls.

    Each repetition is waited for before the next is issued, so the device idles between calls:
    the reps − 1 widest gaps between consecutive kernels separate the calls, whatever the number of
    kernels per call. A repetition's time is its first kernel's start to its last kernel's end.
    """
    if len(events) < reps:
        raise RuntimeError(f"{len(events)} kernel events for {reps} repetitions")
    events = sorted(events)
    ends = [s + d for s, d in events]
    reach = list(itertools.accumulate(ends, max))  # latest end so far (streams may overlap)
    gaps = sorted(range(1, len(events)), key=lambda i: events[i][0] - reach[i - 1], reverse=True)
    bounds = [0, *sorted(gaps[: reps - 1]), len(events)]
    return [(max(ends[a:b]) - events[a][0]) / 1e9 for a, b in itertools.pairwise(bounds)]


def time_jax_profiler(
    fn: Callable[[int], Any],
    *,
    module_hint: str = "fusedmlp",
    min_reps: int = MIN_REPS,
    max_reps: int = MAX_REPS,
    warmup_s: float = WARMUP_S,
    target_s: float = TARGET_S,
) -> Stats:
    """Device time of each call of a jitted JAX function, read from a profiler trace."""
    import jax

    def wait(out: Any) -> None:
        out.block_until_ready()

    per_call = _warmup(fn, wait, warmup_s)
    reps = _reps_for(per_call, min_reps, max_reps, target_s)
    with tempfile.TemporaryDirectory(prefix="fusedmlp-trace-") as tmp:
        with jax.profiler.trace(tmp):
            for i in range(reps):
                # One repetition at a time keeps the executables' spans apart on the timeline.
                wait(fn(i))
        files = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
        if not files:
            raise RuntimeError("jax.profiler wrote no .xplane.pb file")
        samples, how = _gpu_spans(files[0], reps, module_hint)
    return Stats.of(samples, how)


def time_device(
    stack: str, device: str, fn: Callable[[int], Any], **kwargs: Any
) -> tuple[Stats, str | None]:
    """The right method for a stack and device; returns (stats, note on any fallback)."""
    from .providers import sync

    if device != "cuda":
        return time_host(fn, lambda out: sync(stack, out), **kwargs), None
    if stack == "torch":
        return time_cuda_events(fn, **kwargs), None
    try:
        return time_jax_profiler(fn, **kwargs), None
    except Exception as exc:  # fall back, and say so in the result
        note = f"profiler timing failed ({type(exc).__name__}: {exc}); host clock used"
        return time_host(fn, lambda out: sync(stack, out), **kwargs), note
