"""Timing, with one set of definitions for both stacks (issue 20).

What every timed row carries (seconds per call; `Stats` = median, min, max, n, method):

- **device**: the sum of the durations of the GPU kernels that belong to one call, read from CUPTI
  through the framework's own profiler — `torch.profiler` (Kineto) for torch, a `jax.profiler`
  trace (the XSpace `.xplane.pb`, read with `jax.profiler.ProfileData`) for JAX. N warm calls are
  issued back to back, each right after the same L2 flush (`Flush`: a 256 MB read on the call's
  own stream, which leaves the L2 — 60 MB on an H200 — holding none of the call's data and no dirty
  line; see FLUSH_KINDS). Kernels are assigned to calls by their
  place in the stream: the flush kernels delimit the calls, every other kernel between two flushes
  belongs to the call in between, and the number and names of a call's kernels (K) must be the same
  for all N calls — checked, never assumed. Flush kernels are recognised by the kernel names a
  trace of the flush alone showed (and, in JAX traces, by the `hlo_module` XLA tags them with);
  memcpy and memset activity is excluded by name (counted in `excluded_kernels`). Idle gaps are
  never used. Launch gaps inside a call are not device time: `span` (first kernel start to last
  kernel end of each call) is reported beside it, and span − device shows them.
- **throughput**: the wall clock of n calls issued back to back and one wait at the end, per call
  (what a user's loop sees: max(host cost, device time)); 5 batches. Same code for both stacks,
  same input rotation as the device timing (cases.py).
- **host issue**: host time to issue one call without waiting (asynchronous dispatch).
- **host sync**: host time of one call and its wait (synchronised latency).
- On a CPU there is no device: `time` is the host sync clock, labelled so.

Cross-checks (functions at the end, applied by benchmark.py): a time below the case's roofline floor
by more than the ceilings' own spread (3 % memory-bound, 10 % compute-bound) makes the row an
`invalid measurement`; torch rows carry the same callable replayed from one CUDA graph
(`time_cudagraph`: do_bench_cudagraph's method, thread-local capture; `cudagraph`) and are flagged
where it differs from the device time by more than 5 %; every GPU row is flagged where device >
throughput × 1.05 (the device cannot work longer per call than a loop of calls takes).

One CUPTI client per process: on the H200 (2026-12-01, torch 2.11, jax 0.11.2) jax.profiler's GPU
tracer fails with "CUPTI call error" once torch.profiler has traced in the same process (the
planes then hold no /device:GPU), while torch.profiler reads JAX's kernels fine (CUPTI sees every
kernel of the process; it gave 101.1 µs for XLA's llama3-8b M=16 where a jitted loop gave 103).
So where torch is loaded with CUDA — the harness, which runs both stacks in one process — both
stacks' kernels are read through torch.profiler: one reader, one definition. jax.profiler reads
them in a JAX-only process. `FUSEDMLP_JAX_PROFILER=jax|torch` forces one; the row's method names
the reader either way.
"""

from __future__ import annotations

import collections
import functools
import glob
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

MIN_REPS = 20
MAX_REPS = 200
WARMUP_S = 0.05
# Timed repetitions aim at this much total time, within the repetition bounds above.
TARGET_S = 0.25
# The flush: larger than any L2 this project runs on (H200: 60 MB), swept once per timed call.
FLUSH_BYTES = 256 * 2**20
# How the flush touches its buffer. "read" (the default since 2026-12-02, commit after b92e5d2): row
# sums of the buffer, which leave the L2 holding clean lines only. "rmw" (read-modify-write, every
# run before): the L2 is left full of the flush's own dirty lines, up to 60 MB whose write-back
# the next call paid — harness work charged to the call. Measured on the H200 (b92e5d2, one
# process each): llama3-8b decode 96.4 → 88.4 µs (fused_decode), eager 102.6 → 96.1, XLA 97.9 →
# 91.5; the copy ceiling 4221 → 4341 GB/s, the read ceiling 3567 → 3971; nerf-64x5 (compute-bound)
# unchanged. $FUSEDMLP_FLUSH=rmw reproduces the old numbers.
FLUSH_ENV = "FUSEDMLP_FLUSH"
FLUSH_KINDS = ("read", "rmw")
FLUSH_ROW = 1024  # the read flush sums rows of this many 4-byte words
THROUGHPUT_BATCHES = 5
HOST_ISSUE_REPS = 30
# Cross-check tolerances (issue 20). The floor's slack is the ceilings' own spread on the H200:
# copy 4.24 TB/s within ~3 % run to run; cuBLAS reaches 811 TFLOP/s on shapes where the 8192³
# ceiling read 754, so compute-bound floors get 10 %.
FLOOR_SLACK = {"memory": 0.03, "compute": 0.10}
AGREEMENT = 0.05
COPY_NAME_PARTS = ("memcpy", "memset")
JAX_PROFILER_ENV = "FUSEDMLP_JAX_PROFILER"


class TimingError(RuntimeError):
    """A trace that cannot be turned into per-call device times; the message says why."""


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
    def of(cls, samples: Sequence[float], method: str) -> Stats:
        if not samples:
            raise TimingError(f"{method}: no samples")
        return cls(statistics.median(samples), min(samples), max(samples), len(samples), method)


# ---- kernels and their assignment to calls (pure: tests feed fake traces) ------------------------
@dataclass(frozen=True)
class Kernel:
    """One device activity of a trace: a kernel, or a memcpy/memset (`copy`)."""

    name: str
    start_ns: float
    end_ns: float
    line: str = ""  # the stream (torch: device_resource_id; JAX: the XPlane line)
    module: str = ""  # JAX: the hlo_module stat XLA tags its kernels with; "" where absent
    copy: bool = False

    @property
    def duration_ns(self) -> float:
        return self.end_ns - self.start_ns


# A tracer runs body() `calls` times under a profiler, then finish(last output), and returns the
# device activity it recorded (torch_trace, jax_trace).
Tracer = Callable[[Callable[[], Any], int, Callable[[Any], None]], list[Kernel]]


def is_copy_name(name: str) -> bool:
    low = name.lower()
    return any(part in low for part in COPY_NAME_PARTS)


@dataclass(frozen=True)
class DeviceTiming:
    device: Stats  # sum of the kernel durations of each call
    span: Stats  # first kernel start to last kernel end of each call
    kernels_per_call: int
    kernel_names: tuple[str, ...]  # one call's kernels, in stream order
    excluded: dict[str, int] = field(default_factory=dict)  # flush, memcpy/memset: counts
    # median duration (s) of each of a call's kernels, in stream order (probes print them)
    kernel_times: tuple[float, ...] = ()

    def to_row(self) -> dict[str, Any]:
        return {
            "time": self.device.to_dict(),
            "span": self.span.to_dict(),
            "kernels_per_call": self.kernels_per_call,
            "kernel_names": list(self.kernel_names),
            # each kernel's median µs, beside its name: where a call's time goes (a training
            # step's saving forward, weight and input gradients, sums), read off the results file
            "kernel_us": [round(t * 1e6, 3) for t in self.kernel_times],
            "excluded_kernels": dict(self.excluded),
        }


def split_calls(
    kernels: Iterable[Kernel],
    calls: int,
    is_flush: Callable[[Kernel], bool],
    *,
    count_copies: bool = False,
) -> tuple[list[list[Kernel]], dict[str, int]]:
    """The kernels of each of `calls` calls, each call issued right after a flush.

    In start order, a run of flush kernels opens a call; every kernel up to the next flush belongs
    to it. Raises TimingError unless there are exactly `calls` flushes and every call has the same
    kernels (count and names): K is learned from the trace and checked on every call, never
    inferred from idle gaps. memcpy/memset activity is excluded unless `count_copies` (the copy
    ceiling is one); so is work that ran before the first flush (issued before the timed calls: no
    call can own it), counted as "before the first flush".
    """
    groups: list[list[Kernel]] = []
    excluded = {"flush": 0, "memcpy/memset": 0, "before the first flush": 0}
    in_flush = False
    for k in sorted(kernels, key=lambda k: (k.start_ns, k.end_ns)):
        if is_flush(k):
            excluded["flush"] += 1
            if not in_flush:
                groups.append([])
            in_flush = True
            continue
        in_flush = False
        if not count_copies and (k.copy or is_copy_name(k.name)):
            excluded["memcpy/memset"] += 1
            continue
        if not groups:
            excluded["before the first flush"] += 1
            continue
        groups[-1].append(k)
    if len(groups) != calls:
        raise TimingError(
            f"{len(groups)} flushes in the trace for {calls} calls "
            f"({excluded['flush']} flush kernels)"
        )
    counts = collections.Counter(len(g) for g in groups)
    if len(counts) != 1:
        raise TimingError(
            f"kernels per call are not constant: {dict(sorted(counts.items()))} "
            "(calls -> count); cannot assign kernels to calls"
        )
    if not groups[0]:
        raise TimingError("a call launched no kernel between two flushes")
    first = sorted(k.name for k in groups[0])
    for i, g in enumerate(groups[1:], 1):
        names = sorted(k.name for k in g)
        if names != first:
            diff = sorted(set(names) ^ set(first))[:3]
            raise TimingError(
                f"call {i} ran other kernels than call 0 (e.g. {diff}); "
                "cannot assign kernels to calls"
            )
    return groups, excluded


def device_timing(
    kernels: Iterable[Kernel],
    calls: int,
    is_flush: Callable[[Kernel], bool],
    method: str,
    *,
    count_copies: bool = False,
) -> DeviceTiming:
    """Per-call device time (sum of kernel durations) and span from one trace of `calls` calls."""
    groups, excluded = split_calls(kernels, calls, is_flush, count_copies=count_copies)
    device = [sum(k.duration_ns for k in g) / 1e9 for g in groups]
    span = [(max(k.end_ns for k in g) - min(k.start_ns for k in g)) / 1e9 for g in groups]
    lines = len({k.line for g in groups for k in g})
    k = len(groups[0])
    how = f"{method}: sum of {k} kernel(s) per call" + (f" on {lines} streams" if lines > 1 else "")

    # each of call 0's kernels matched in every call by (name, occurrence of that name): start
    # order alone could pair different kernels where several streams interleave
    def keyed(g: list[Kernel]) -> dict[tuple[str, int], float]:
        seen: collections.Counter[str] = collections.Counter()
        out = {}
        for x in sorted(g, key=lambda x: (x.start_ns, x.end_ns)):
            out[(x.name, seen[x.name])] = x.duration_ns
            seen[x.name] += 1
        return out

    per_call = [keyed(g) for g in groups]
    kernel_times = tuple(
        statistics.median(call[key] for call in per_call) / 1e9 for key in per_call[0]
    )
    return DeviceTiming(
        Stats.of(device, how),
        Stats.of(span, f"{method}: first start to last end"),
        k,
        tuple(x.name for x in groups[0]),
        excluded,
        kernel_times,
    )


# ---- the L2 flush, on each stack's own stream ---------------------------------------------
class Flush:
    """Sweeps FLUSH_BYTES through the L2 before each timed call, in the call's stream order.

    `kind` "read" (default): torch sums the rows of an int32 buffer in int32 (one reduction kernel
    on the current stream); JAX runs `jax_read_flush`, a Pallas-Triton row sum named FLUSH_KERNEL,
    jitted as `jit_fusedmlp_l2_flush` (one kernel on JAX's compute stream; a torch-side flush would
    run on another stream and not order with JAX's calls). The
    call then finds the L2 cold and clean: its own data absent, and no dirty line of anyone's to
    write back (the previous call's outputs were written back during the flush, outside any call).
    "rmw": torch `bitwise_not_` of the buffer, JAX a donated `~buf` (~125 µs on an H200), which
    leave the flush's own dirty lines for the next call to write back. `learn` traces the flush
    alone once per process and keeps its kernel names, which is how the flush is told apart from
    a call's kernels (with XLA's hlo_module tag, where the kernels carry one). `Flush.for_stack`
    builds the real ones; tests build fakes from two callables.
    """

    MODULE = "fusedmlp_l2_flush"

    def __init__(
        self, stack: str, run: Callable[[], Any], wait: Callable[[], Any], kind: str = "read"
    ) -> None:
        self.stack, self.kind = stack, kind
        self.names: dict[str, frozenset[str]] = {}  # per profiler: the flush's kernel names
        self._run, self._wait = run, wait

    @classmethod
    def for_stack(cls, stack: str, kind: str | None = None) -> Flush:
        kind = kind or flush_kind()
        if kind not in FLUSH_KINDS:
            raise ValueError(f"kind: expected one of {FLUSH_KINDS}, got {kind!r}")
        if stack == "torch":
            import torch

            buf = torch.zeros(FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
            if kind == "read":
                # Row sums kept in int32: one reduction kernel whose 256 KiB of output are the only
                # lines it dirties (a full sum adds a semaphore memset and a second pass; an int64
                # sum first casts the whole buffer: a second kernel writing 512 MiB).
                rows = buf.view(-1, FLUSH_ROW)
                run = functools.partial(torch.sum, rows, dim=1, dtype=torch.int32)
                return cls(stack, run, torch.cuda.synchronize, kind)
            return cls(stack, buf.bitwise_not_, torch.cuda.synchronize, kind)
        import jax
        import jax.numpy as jnp

        state = [jnp.zeros(FLUSH_BYTES // 4, jnp.uint32)]
        if kind == "read":

            def fusedmlp_l2_flush(buf: Any) -> Any:  # jit_<this name>: XLA's module tag (MODULE)
                return jax_read_flush(buf)

            read = jax.jit(fusedmlp_l2_flush)
            last: list[Any] = [None]

            def run() -> None:
                last[0] = read(state[0])

            return cls(stack, run, lambda: last[0] is None or last[0].block_until_ready(), kind)

        def fusedmlp_l2_flush(buf: Any) -> Any:
            return ~buf

        step = jax.jit(fusedmlp_l2_flush, donate_argnums=0)

        def run() -> None:
            state[0] = step(state[0])  # donated: the same memory, rewritten in place

        return cls(stack, run, lambda: state[0].block_until_ready(), kind)

    def __call__(self) -> None:
        self._run()

    def wait(self) -> None:
        self._wait()

    def predicate(self, profiler: str) -> Callable[[Kernel], bool]:
        """Is a kernel of a `profiler` trace the flush? (`learn` first.)"""
        names = self.names.get(profiler, frozenset())

        def is_flush(k: Kernel) -> bool:
            if k.module:  # XLA's own tag names the executable
                return self.MODULE in k.module
            return k.name in names

        return is_flush

    def learn(self, profiler: str, trace: Tracer) -> None:
        """Trace the flush alone (once per profiler) and keep the names of its kernels."""
        if profiler in self.names:
            return
        self()
        self.wait()  # compiled and warm
        kernels = trace(self.__call__, 1, lambda _: self.wait())
        names = {k.name for k in kernels if not (k.copy or is_copy_name(k.name))}
        if not names:
            raise TimingError(
                f"{profiler}.profiler recorded no kernel for the {self.stack} L2 "
                "flush: it cannot see this stack's kernels"
            )
        self.names[profiler] = frozenset(names)


def flush_kind() -> str:
    """$FUSEDMLP_FLUSH, checked (default "read")."""
    kind = os.environ.get(FLUSH_ENV, "read")
    if kind not in FLUSH_KINDS:
        raise ValueError(f"{FLUSH_ENV}: expected one of {FLUSH_KINDS}, got {kind!r}")
    return kind


@functools.cache
def _flush_for(stack: str, kind: str) -> Flush:
    return Flush.for_stack(stack, kind)


def flush_for(stack: str) -> Flush:
    return _flush_for(stack, flush_kind())


# The JAX read flush is a Pallas-Triton kernel of its own name: XLA's row sum compiles to
# `input_reduce_fusion`, the name of XLA's reductions in the timed calls too, and torch.profiler
# (the harness's reader of JAX kernels) carries no hlo_module tag to tell them apart — at 84f2c0e
# it cost the XLA row of gpt2-mlp M=1 ("400 flushes in the trace for 200 calls").
FLUSH_KERNEL = "fusedmlp_l2_flush"
FLUSH_BLOCK_ROWS = 16  # rows of FLUSH_ROW words a program sums (64 KiB)


def jax_read_flush(buf: Any, *, interpret: bool = False, pallas: bool | None = None) -> Any:
    """Row sums of `buf` (a multiple of FLUSH_ROW · FLUSH_BLOCK_ROWS uint32 words) by one
    Pallas-Triton kernel named FLUSH_KERNEL: every word read, one uint32 per row written.
    `pallas` None: the kernel where JAX's backend is a GPU (or interpreted), else XLA's row sum."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    from fusedmlp.jax_impl.compat import quiet_pallas_triton

    rows = buf.reshape(-1, FLUSH_ROW)
    if pallas is None:
        pallas = interpret or jax.default_backend() == "gpu"
    if not pallas:  # no GPU (a CPU run of a probe): kernel names matter in GPU traces only
        return jnp.sum(rows, axis=1)

    def kernel(x_ref: Any, o_ref: Any) -> None:
        o_ref[...] = jnp.sum(x_ref[...], axis=1)

    with quiet_pallas_triton():
        return pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((rows.shape[0],), rows.dtype),
            grid=(rows.shape[0] // FLUSH_BLOCK_ROWS,),
            in_specs=[pl.BlockSpec((FLUSH_BLOCK_ROWS, FLUSH_ROW), lambda i: (i, 0))],
            out_specs=pl.BlockSpec((FLUSH_BLOCK_ROWS,), lambda i: (i,)),
            compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
            interpret=interpret,
            name=FLUSH_KERNEL,
        )(rows)


# ---- torch.profiler ----------------------------------------------------------------------------
# Kineto activity types that are not work of their own on the device: GPU-side spans of
# record_function ranges (torch.compile's regions make them) and synchronisation records.
_TORCH_NOT_KERNELS = ("gpu_user_annotation", "cuda_sync", "user_annotation")


def torch_kernels(events: Iterable[Any]) -> list[Kernel]:
    """Device activities from torch.profiler's FunctionEvents (`prof.events()`)."""
    from torch.autograd import DeviceType

    out = []
    for e in events:
        if e.device_type != DeviceType.CUDA or getattr(e, "is_user_annotation", False):
            continue
        kind = getattr(e, "activity_type", None) or ""
        if kind in _TORCH_NOT_KERNELS:
            continue
        copy = kind in ("gpu_memcpy", "gpu_memset") or is_copy_name(e.name)
        out.append(
            Kernel(
                e.name,
                e.time_range.start * 1e3,
                e.time_range.end * 1e3,
                line=str(getattr(e, "device_resource_id", "") or ""),
                copy=copy,
            )
        )
    return out


def torch_trace(body: Callable[[], Any], calls: int, finish: Callable[[Any], None]) -> list[Kernel]:
    """Run `body` `calls` times under torch.profiler (CPU + CUDA activity), then `finish(last
    output)` (the wait); the device activity."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        last = None
        for _ in range(calls):
            last = body()
        finish(last)
        torch.cuda.synchronize()  # every stream of the device, JAX's included
    kernels = torch_kernels(prof.events())
    if not kernels:
        raise TimingError(
            "torch.profiler recorded no CUDA activity (is CUPTI held by another "
            "profiler in this process?)"
        )
    return kernels


# ---- jax.profiler --------------------------------------------------------------------------------
def _jax_options() -> Any:
    from jax.profiler import ProfileOptions

    options = ProfileOptions()
    options.python_tracer_level = 0  # Python calls would only slow the issuing down
    options.enable_hlo_proto = False
    return options


# Lines the profiler derives from annotations (not CUPTI activity), in case a file carries them.
_DERIVED_LINES = frozenset(
    {
        "XLA Modules",
        "XLA Ops",
        "Steps",
        "Launch Stats",
        "Source code",
        "Framework Name Scope",
        "XLA TraceMe",
        "Async XLA Ops",
        "CUPTI overhead",
        "TensorFlow Name Scope",
        "TensorFlow Ops",
    }
)


def xspace_kernels(planes: Iterable[Any]) -> list[Kernel]:
    """Device activities of the first GPU plane of a jax.profiler XSpace (`ProfileData.planes`):
    the raw CUPTI events on the "Stream #N(...)" lines, with XLA's hlo_module tag."""
    planes = list(planes)
    gpu = sorted((p for p in planes if p.name.startswith("/device:GPU:")), key=lambda p: p.name)
    if not gpu:
        raise TimingError(
            "the jax.profiler trace has no /device:GPU plane (planes: "
            f"{[p.name for p in planes]}): the GPU tracer did not run"
        )
    plane = gpu[0]
    lines = list(plane.lines)
    streams = [ln for ln in lines if ln.name.startswith("Stream")] or [
        ln for ln in lines if ln.name not in _DERIVED_LINES
    ]
    out, graphs = [], []
    for line in streams:
        for e in line.events:
            stats = {str(k): v for k, v in e.stats}
            copy = "memcpy_details" in stats or "memset_details" in stats or is_copy_name(e.name)
            start = float(e.start_ns)
            k = Kernel(
                e.name,
                start,
                start + float(e.duration_ns),
                line=line.name,
                module=str(stats.get("hlo_module", "") or ""),
                copy=copy,
            )
            # A whole CUDA graph's span (XLA command buffers, where CUPTI traces graphs as one
            # record) would count its kernels twice beside their own records.
            (graphs if "cuda_graph_exec_id" in stats else out).append(k)
    out = out or graphs  # graph spans only where the graphs' kernels were not recorded one by one
    if not out:
        raise TimingError(f"no device events on {plane.name} (lines: {[ln.name for ln in lines]})")
    return out


def jax_trace(body: Callable[[], Any], calls: int, finish: Callable[[Any], None]) -> list[Kernel]:
    """Run `body` `calls` times under a jax.profiler trace, then `finish(last output)` (the wait);
    the GPU plane's device activity."""
    import jax
    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory(prefix="fusedmlp-trace-") as tmp:
        jax.profiler.start_trace(tmp, profiler_options=_jax_options())
        try:
            last = None
            for _ in range(calls):
                last = body()
            finish(last)
        finally:
            jax.profiler.stop_trace()
        files = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
        if not files:
            raise TimingError("jax.profiler wrote no .xplane.pb file")
        return xspace_kernels(ProfileData.from_file(files[0]).planes)


def jax_profiler_choice() -> str:
    """The reader of JAX's kernels: $FUSEDMLP_JAX_PROFILER, else torch.profiler where torch is
    loaded with CUDA (one CUPTI client per process, module docstring), else jax.profiler."""
    choice = os.environ.get(JAX_PROFILER_ENV)
    if choice is None:
        torch = sys.modules.get("torch")
        return "torch" if torch is not None and torch.cuda.is_available() else "jax"
    if choice not in ("jax", "torch"):
        raise ValueError(f"{JAX_PROFILER_ENV}: expected 'jax' or 'torch', got {choice!r}")
    return choice


# ---- device time of one callable ----------------------------------------------------------------
TRACERS: dict[str, Tracer] = {"torch": torch_trace, "jax": jax_trace}


def time_device(
    stack: str,
    fn: Callable[[int], Any],
    calls: int,
    wait: Callable[[Any], None],
    *,
    count_copies: bool = False,
    profiler: str | None = None,
    flush: Flush | None = None,
) -> DeviceTiming:
    """Device time per call of `fn(i)` on a GPU, i = 0..calls-1, each call after the L2 flush.
    `fn` must be warm: a compile or autotuning inside the trace would add kernels to one call.

    `profiler`: a key of TRACERS (default: the stack's own; for JAX, $FUSEDMLP_JAX_PROFILER);
    `flush`: the stack's (tests pass fakes of both)."""
    profiler = profiler or (stack if stack == "torch" else jax_profiler_choice())
    trace = TRACERS[profiler]
    method = f"{profiler}.profiler (CUPTI)"
    if profiler != stack:
        method += f" on {stack}'s kernels"
    flush = flush or flush_for(stack)
    method += f", {flush.kind} flush"
    flush.learn(profiler, trace)
    counter = itertools.count()

    def body() -> Any:
        flush()
        return fn(next(counter))

    def finish(last: Any) -> None:
        wait(last)
        flush.wait()

    kernels = trace(body, calls, finish)
    return device_timing(
        kernels, calls, flush.predicate(profiler), method, count_copies=count_copies
    )


# ---- host clocks ---------------------------------------------------------------------------------
def reps_for(
    per_call_s: float,
    min_reps: int = MIN_REPS,
    max_reps: int = MAX_REPS,
    target_s: float = TARGET_S,
) -> int:
    if per_call_s <= 0:
        return max_reps
    return max(min_reps, min(max_reps, int(target_s / per_call_s)))


def warmup(
    fn: Callable[[int], Any], wait: Callable[[Any], None], warmup_s: float = WARMUP_S
) -> float:
    """Call until `warmup_s` has passed (at least 3 calls); returns the last call's sync time."""
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
    """Host sync: the wall clock around each call and its wait (synchronised latency)."""
    per_call = warmup(fn, wait, warmup_s)
    samples = []
    for i in range(reps_for(per_call, min_reps, max_reps, target_s)):
        t0 = time.perf_counter()
        wait(fn(i))
        samples.append(time.perf_counter() - t0)
    return Stats.of(samples, "host clock, synchronised")


def host_issue(
    fn: Callable[[int], Any], wait: Callable[[Any], None], reps: int = HOST_ISSUE_REPS
) -> Stats:
    """Host time to issue one call without waiting for it (asynchronous dispatch), per call."""
    samples, out = [], None
    for i in range(reps):
        t0 = time.perf_counter()
        out = fn(i)
        samples.append(time.perf_counter() - t0)
        if i % 10 == 9:  # keep the queue short so back-pressure does not enter the numbers
            wait(out)
    wait(out)
    return Stats.of(samples, "host clock, issue only")


def throughput(
    fn: Callable[[int], Any],
    wait: Callable[[Any], None],
    calls: int,
    batches: int = THROUGHPUT_BATCHES,
) -> Stats:
    """Per call: the wall clock of `calls` calls issued back to back, then one wait."""
    samples, i = [], 0
    for _ in range(batches):
        out = None
        t0 = time.perf_counter()
        for _ in range(calls):
            out = fn(i)
            i += 1
        wait(out)
        samples.append((time.perf_counter() - t0) / calls)
    return Stats.of(
        samples, f"wall clock of {calls} back-to-back calls + one wait, {batches} batches"
    )


def time_cudagraph(fn: Callable[[int], Any], rep_ms: float = 20.0, replays: int = 10) -> Stats:
    """The calls replayed from one CUDA graph, input sets rotated inside it (the captured calls
    cycle through them as the timed calls do): `replays` replays of ~`rep_ms` each, their time per
    call as samples (the method of `triton.testing.do_bench_cudagraph`, written out here for one
    difference). The capture is `thread_local`: under the default ("global") mode a CUDA call that
    another thread makes meanwhile — XLA's own threads, in a process that runs JAX rows too —
    invalidates the capture and leaves both stacks' streams in an error state (seen on the H200:
    cuBLAS "operation failed due to a previous error during capture", then JAX's "Callback registry
    is closed" on the next row)."""
    import torch

    counter = itertools.count()
    with torch.cuda.stream(torch.cuda.Stream()):
        fn(next(counter))  # warm on the capture stream
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            fn(next(counter))
        end.record()
        torch.cuda.synchronize()
        estimate_ms = start.elapsed_time(end) / 5
        per_graph = max(1, int(rep_ms / estimate_ms)) if estimate_ms > 0 else 1000
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            for _ in range(per_graph):
                fn(next(counter))
        torch.cuda.synchronize()
        samples = []
        for _ in range(replays):
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / per_graph)
    return Stats.of(samples, f"CUDA graph of {per_graph} calls, {replays} replays")


# ---- one timed row: every measure with the same definitions --------------------------------------
def measure(
    stack: str,
    device: str,
    fn: Callable[[int], Any],
    wait: Callable[[Any], None],
    *,
    cudagraph: bool | str = False,
    count_copies: bool = False,
    min_reps: int = MIN_REPS,
    max_reps: int = MAX_REPS,
    warmup_s: float = WARMUP_S,
    target_s: float = TARGET_S,
) -> dict[str, Any]:
    """The timing fields of a row: `time` (device on a GPU, host sync on a CPU), `span`,
    `kernels_per_call`, `throughput`, `host_issue`, `host_sync`, and on request the CUDA-graph
    cross-check (`cudagraph`, or `cudagraph_note` saying why not; a str argument is that reason).
    A device time that cannot be read leaves `device_error` and no `time`; the rest is measured."""
    per_call = warmup(fn, wait, warmup_s)
    reps = reps_for(per_call, min_reps, max_reps, target_s)
    row: dict[str, Any] = {}
    sync = time_host(
        fn, wait, min_reps=min_reps, max_reps=max_reps, warmup_s=0.0, target_s=target_s
    )
    if device == "cuda":
        try:
            row.update(time_device(stack, fn, reps, wait, count_copies=count_copies).to_row())
        except Exception as exc:  # the row says why; no host clock stands in for the device
            row["device_error"] = f"{type(exc).__name__}: {exc}"
    else:
        row["time"] = sync.to_dict()
    batch = max(10, reps // THROUGHPUT_BATCHES)
    row["throughput"] = throughput(fn, wait, batch).to_dict()
    row["host_issue"] = host_issue(fn, wait).to_dict()
    row["host_sync"] = sync.to_dict()
    if isinstance(cudagraph, str):
        row["cudagraph_note"] = cudagraph
    elif cudagraph:
        try:
            row["cudagraph"] = time_cudagraph(fn).to_dict()
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            row["cudagraph_note"] = (
                f"cannot be captured in a CUDA graph: {type(exc).__name__}: {first}"
            )
    return row


# ---- cross-checks (pure) -------------------------------------------------------------------------
def floor_violation(times: dict[str, float | None], floor_s: float, bound: str) -> str | None:
    """The invalid-measurement verdict: which of `times` lie below the floor by more than the
    ceilings' spread (FLOOR_SLACK[bound]); None when none does."""
    slack = FLOOR_SLACK[bound]
    limit = floor_s * (1 - slack)
    below = [f"{name} {t * 1e6:.1f} µs" for name, t in times.items() if t is not None and t < limit]
    if not below:
        return None
    return (
        f"invalid measurement: {', '.join(below)} below the {bound}-bound floor "
        f"{floor_s * 1e6:.1f} µs by more than {slack:.0%}"
    )


def disagreement(a: float, b: float) -> float:
    """b / a − 1 (positive: b is slower)."""
    return b / a - 1


def timing_flags(row: dict[str, Any]) -> list[str]:
    """Cross-check flags of a GPU row: CUDA graph vs device (torch), device vs throughput (all)."""
    flags = []
    t = row.get("time")
    if not t:
        return flags
    dev = t["median"]
    graph = row.get("cudagraph")
    if graph and abs(disagreement(dev, graph["median"])) > AGREEMENT:
        flags.append(f"cudagraph {disagreement(dev, graph['median']):+.0%} vs device")
    thr = row.get("throughput")
    if thr and dev > thr["median"] * (1 + AGREEMENT):
        flags.append(f"device {disagreement(thr['median'], dev):+.0%} over throughput")
    return flags


def judge_timing(row: dict[str, Any], floor_s: float, bound: str) -> tuple[str | None, list[str]]:
    """(invalid-measurement message or None, flags) for a GPU row measured by `measure`."""
    times = {}
    if row.get("time"):
        times["device median"] = row["time"]["median"]
        times["device min"] = row["time"]["min"]
    if row.get("throughput"):
        times["throughput"] = row["throughput"]["median"]
    if row.get("cudagraph"):
        times["cudagraph"] = row["cudagraph"]["median"]
    return floor_violation(times, floor_s, bound), timing_flags(row)
