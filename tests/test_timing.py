"""The timing method (bench/timing.py, issue 20), on the CPU with fake profiler traces.

What is proved, each with a case that must be rejected:
- kernels are assigned to calls by their place between the flushes, K per call learned from the
  trace and checked on every call (count and names) — never by idle gaps;
- flush kernels (by the names a trace of the flush alone showed, or XLA's hlo_module tag) and
  memcpy/memset activity are excluded from a call's device time; span = first start to last end;
- the whole device pipeline (learn the flush, trace N flushed calls, assign) on a fake device with a
  fake clock, through the same `time_device` the GPU uses;
- torch.profiler's FunctionEvents and jax.profiler's XSpace planes become kernels (user annotation
  spans and derived lines left out);
- throughput, host issue and host sync: what is called and waited for, per call;
- the floor check (3 % memory-bound, 10 % compute-bound) marks an invalid measurement, and the
  cross-checks flag a CUDA-graph or throughput disagreement beyond 5 %; benchmark rows get the
  verdict, never the metrics of an invalid measurement.
GPU (`-m gpu`): the real profilers on a matmul, against triton's do_bench.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from fusedmlp.bench import benchmark, ceilings, metrics, timing
from fusedmlp.bench.cases import Case
from fusedmlp.bench.metrics import Ceilings
from fusedmlp.bench.providers import Provider
from fusedmlp.bench.timing import Flush, Kernel, TimingError, device_timing, split_calls
from fusedmlp.common import MLPSpec, cost

FLUSH = "void at::native::vectorized_elementwise_kernel<bitwise_not_kernel_cuda>"


def _flush_names(k: Kernel) -> bool:
    return k.name == FLUSH


def _trace(
    calls: list[list[tuple[str, float]]],
    *,
    flush_ns: float = 100.0,
    gap_ns: float = 3.0,
    t0: float = 1000.0,
) -> list[Kernel]:
    """A stream: before each call a flush kernel, then the call's (name, duration) kernels, each
    `gap_ns` after the previous one ends."""
    out, t = [], t0
    for call in calls:
        out.append(Kernel(FLUSH, t, t + flush_ns, line="s7"))
        t += flush_ns + gap_ns
        for name, dur in call:
            out.append(Kernel(name, t, t + dur, line="s7"))
            t += dur + gap_ns
    return out


# ---- assignment by count -------------------------------------------------------------------------
def test_kernels_are_assigned_to_calls_between_flushes() -> None:
    events = _trace([[("gemm", 40), ("act", 5), ("gemm2", 30)]] * 3)
    # Any order in the list: the assignment sorts by start.
    groups, excluded = split_calls(reversed(events), 3, _flush_names)
    assert [[k.name for k in g] for g in groups] == [["gemm", "act", "gemm2"]] * 3
    assert excluded == {"flush": 3, "memcpy/memset": 0, "before the first flush": 0}
    t = device_timing(events, 3, _flush_names, "fake")
    assert t.kernels_per_call == 3 and t.kernel_names == ("gemm", "act", "gemm2")
    row = t.to_row()  # each kernel's median beside its name, in µs
    assert row["kernel_names"] == ["gemm", "act", "gemm2"]
    assert row["kernel_us"] == pytest.approx([0.04, 0.005, 0.03])
    # device = sum of the durations (75 ns); span = first start to last end (75 + 2 gaps of 3 ns).
    assert t.device.median == t.device.min == t.device.max == pytest.approx(75e-9)
    assert t.span.median == pytest.approx(81e-9)
    assert t.device.n == 3 and "sum of 3 kernel(s) per call" in t.device.method


def test_idle_gaps_do_not_split_calls() -> None:
    """The old splitter cut calls at the widest idle gaps. Here call 0 idles 50 µs between its two
    kernels (a slow host between launches) and call 1 follows its flush with no gap at all: the
    assignment is still by place between flushes, and the idle time is span, not device."""
    trace = [
        Kernel(FLUSH, 0, 100),
        Kernel("a", 103, 113),
        Kernel("b", 50_113, 50_123),
        Kernel(FLUSH, 50_123, 50_223),
        Kernel("a", 50_223, 50_233),
        Kernel("b", 50_233, 50_243),
    ]
    groups, _ = split_calls(trace, 2, _flush_names)
    assert [[k.start_ns for k in g] for g in groups] == [[103, 50_113], [50_223, 50_233]]
    t = device_timing(trace, 2, _flush_names, "fake")
    assert t.kernels_per_call == 2
    assert t.device.min == t.device.max == pytest.approx(20e-9)
    assert t.span.max == pytest.approx(50_020e-9) and t.span.min == pytest.approx(20e-9)


def test_kernels_on_two_streams_go_to_the_call_they_start_in() -> None:
    events = _trace([[("gemm", 40)], [("gemm", 40)]])
    side = [
        Kernel("reduce", k.start_ns + 5, k.start_ns + 25, line="s9")
        for k in events
        if k.name == "gemm"
    ]
    t = device_timing(events + side, 2, _flush_names, "fake")
    assert t.kernels_per_call == 2 and "on 2 streams" in t.device.method
    assert t.device.median == pytest.approx(60e-9)
    assert t.span.median == pytest.approx(40e-9)


def test_work_before_the_first_flush_belongs_to_no_call() -> None:
    """Kernels still running from before the timed calls (issued before the first flush) are
    counted apart, never in a call."""
    t = device_timing(
        [Kernel("stray", 0, 500), *_trace([[("gemm", 40)]] * 2)], 2, _flush_names, "fake"
    )
    assert t.device.max == pytest.approx(40e-9) and t.kernels_per_call == 1
    assert t.excluded == {"flush": 2, "memcpy/memset": 0, "before the first flush": 1}


def test_flush_and_copies_are_excluded_by_name_and_copies_can_count() -> None:
    calls = [[("gemm", 40), ("Memset (Device)", 2), ("Memcpy DtoD (Device -> Device)", 7)]] * 2
    events = _trace(calls)
    t = device_timing(events, 2, _flush_names, "fake")
    assert t.kernels_per_call == 1 and t.device.median == pytest.approx(40e-9)
    assert t.excluded == {"flush": 2, "memcpy/memset": 4, "before the first flush": 0}
    # The copy ceiling times a DtoD memcpy: there copies are the work.
    t = device_timing(events, 2, _flush_names, "fake", count_copies=True)
    assert t.kernels_per_call == 3 and t.device.median == pytest.approx(49e-9)
    # A copy recognised by its profiler record, whatever its name.
    tagged = [Kernel(k.name, k.start_ns, k.end_ns, copy=k.name == "gemm") for k in events]
    with pytest.raises(TimingError, match="no kernel between two flushes"):
        device_timing([k for k in tagged if "Mem" not in k.name], 2, _flush_names, "fake")


def test_flush_recognised_by_xla_module_tag() -> None:
    flush = Flush("jax", lambda: None, lambda: None)
    flush.names = {"jax": frozenset({"loop_not_fusion"})}
    is_flush = flush.predicate("jax")
    tagged = Kernel("wrapped_not", 0, 1, module="jit_fusedmlp_l2_flush")
    call = Kernel("loop_not_fusion", 0, 1, module="jit_fusedmlp_xla")  # same name, other module
    assert is_flush(tagged) and not is_flush(call)
    assert is_flush(Kernel("loop_not_fusion", 0, 1)) and not is_flush(Kernel("x", 0, 1))
    # Names are learned per profiler: another profiler's trace has not been learned.
    assert not flush.predicate("torch")(Kernel("loop_not_fusion", 0, 1))


@pytest.mark.parametrize(
    ("events", "calls", "message"),
    [
        # One flush too few for the calls made (a call the profiler lost).
        (_trace([[("gemm", 40)]] * 2), 3, "2 flushes in the trace for 3 calls"),
        # K not constant: one call launched an extra kernel.
        (
            _trace([[("gemm", 40)], [("gemm", 40), ("pad", 3)], [("gemm", 40)]]),
            3,
            r"kernels per call are not constant: \{1: 2, 2: 1\}",
        ),
        # Same count, other kernels: not the same call.
        (_trace([[("gemm", 40)], [("gemv", 40)]]), 2, "call 1 ran other kernels than call 0"),
        # Two flushes in a row: a call without any kernel.
        (_trace([[], [("gemm", 40)]]), 2, "1 flushes in the trace for 2 calls"),
    ],
)
def test_traces_that_cannot_be_assigned_are_rejected(
    events: list[Kernel], calls: int, message: str
) -> None:
    with pytest.raises(TimingError, match=message):
        split_calls(events, calls, _flush_names)


# ---- the device pipeline on a fake device --------------------------------------------------------
class FakeDevice:
    """A device with one stream and a fake clock (ns): launches queue kernels that run back to
    back after a launch gap; a tracer records them like a profiler would."""

    def __init__(self) -> None:
        self.clock = 0.0
        self.recording: list[Kernel] | None = None

    def launch(self, name: str, dur: float) -> None:
        start = self.clock + 2.0
        self.clock = start + dur
        if self.recording is not None:
            self.recording.append(Kernel(name, start, self.clock, line="stream 7"))

    def trace(self, body: Any, calls: int, finish: Any) -> list[Kernel]:
        self.recording = []
        last = None
        for _ in range(calls):
            last = body()
        finish(last)
        out, self.recording = self.recording, None
        return out


def test_time_device_on_a_fake_device(monkeypatch: pytest.MonkeyPatch) -> None:
    dev = FakeDevice()
    monkeypatch.setitem(timing.TRACERS, "fake", dev.trace)
    flush = Flush("fake", lambda: dev.launch("flush_kernel", 1000.0), lambda: None)
    waited = []

    def fn(i: int) -> int:
        dev.launch("gemm", 100.0 + i)  # input set i: a slightly longer kernel each call
        dev.launch("Memset (Device)", 1.0)
        dev.launch("epilogue", 10.0)
        return i

    t = timing.time_device("fake", fn, 5, waited.append, profiler="fake", flush=flush)
    assert flush.names == {"fake": frozenset({"flush_kernel"})}  # from a trace of the flush alone
    assert waited == [4]  # the last call's output, once
    assert t.kernels_per_call == 2 and t.kernel_names == ("gemm", "epilogue")
    assert t.excluded == {"flush": 5, "memcpy/memset": 5, "before the first flush": 0}
    # Calls 0..4 in order: gemm 100..104 ns + epilogue 10 ns; the span adds the memset's slot.
    assert t.device.median == pytest.approx(112e-9) and t.device.min == pytest.approx(110e-9)
    assert t.device.max == pytest.approx(114e-9)
    assert t.span.median == pytest.approx((112 + 1 + 2 + 2) * 1e-9)
    assert t.device.method.startswith("fake.profiler (CUPTI)")

    # A profiler that cannot see the stack's kernels fails loudly, at the flush.
    blind = Flush("fake", lambda: None, lambda: None)
    with pytest.raises(TimingError, match=r"fake\.profiler recorded no kernel for the fake L2"):
        timing.time_device("fake", fn, 5, waited.append, profiler="fake", flush=blind)


# ---- the profilers' records ------------------------------------------------------------------
def test_torch_function_events_become_kernels() -> None:
    pytest.importorskip("torch", reason="the jax-only CI job has no torch")
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    def ev(name: str, start: float, end: float, device: Any = DeviceType.CUDA, **kw: Any):
        return FunctionEvent(
            id=1, name=name, thread=0, start_us=start, end_us=end, device_type=device, **kw
        )

    events = [
        ev("aten::mm", 0.0, 9.0, DeviceType.CPU, activity_type="cpu_op"),
        ev("cudaLaunchKernel", 1.0, 2.0, DeviceType.CPU, activity_type="cuda_runtime"),
        ev("sm90_xmma_gemm", 3.5, 10.25, activity_type="kernel", device_resource_id=7),
        ev("Memcpy DtoD (Device -> Device)", 11.0, 12.0, activity_type="gpu_memcpy"),
        ev("## Call CompiledFxGraph ##", 3.0, 12.0, activity_type="gpu_user_annotation"),
        ev("my_region", 3.0, 12.0, is_user_annotation=True),
    ]
    kernels = timing.torch_kernels(events)
    assert [(k.name, k.start_ns, k.end_ns, k.copy) for k in kernels] == [
        ("sm90_xmma_gemm", 3500.0, 10250.0, False),
        ("Memcpy DtoD (Device -> Device)", 11000.0, 12000.0, True),
    ]
    assert kernels[0].line == "7"


def _plane(name: str, lines: dict[str, list[tuple[str, float, float, dict]]]) -> Any:
    return SimpleNamespace(
        name=name,
        stats=[],
        lines=[
            SimpleNamespace(
                name=ln,
                events=[
                    SimpleNamespace(name=n, start_ns=s, duration_ns=d, stats=list(st.items()))
                    for n, s, d, st in evs
                ],
            )
            for ln, evs in lines.items()
        ],
    )


def test_xspace_planes_become_kernels() -> None:
    gpu = _plane(
        "/device:GPU:0",
        {
            "XLA Modules": [("jit_fusedmlp_xla", 0.0, 100.0, {})],  # derived: not device activity
            "Stream #13(Kernel,Memset)": [
                ("loop_not_fusion", 0.0, 30.0, {"hlo_module": "jit_fusedmlp_l2_flush"}),
                ("Memset", 31.0, 1.0, {"memset_details": "kind:device num_bytes:64"}),
                (
                    "fusedmlp_gated",
                    33.0,
                    50.0,
                    {"hlo_module": "jit_fusedmlp_pallas_triton", "hlo_op": "custom-call.1"},
                ),
            ],
        },
    )
    host = _plane("/host:CPU", {"python": [("PjitFunction", 0.0, 5.0, {})]})
    kernels = timing.xspace_kernels([host, _plane("/device:GPU:1", {}), gpu])
    assert [(k.name, k.start_ns, k.end_ns, k.module, k.copy) for k in kernels] == [
        ("loop_not_fusion", 0.0, 30.0, "jit_fusedmlp_l2_flush", False),
        ("Memset", 31.0, 32.0, "", True),
        ("fusedmlp_gated", 33.0, 83.0, "jit_fusedmlp_pallas_triton", False),
    ]
    # A CUDA graph's own record beside its kernels' records is not counted twice; alone, it is
    # the device activity there is.
    graph = ("cudaGraphLaunch", 0.0, 90.0, {"cuda_graph_exec_id": 3})
    with_graph = _plane(
        "/device:GPU:0",
        {
            "Stream #13(Kernel,CudaGraph)": [
                graph,
                ("loop_not_fusion", 0.0, 30.0, {}),
                ("fusedmlp_gated", 33.0, 50.0, {}),
            ]
        },
    )
    assert [k.name for k in timing.xspace_kernels([with_graph])] == [
        "loop_not_fusion",
        "fusedmlp_gated",
    ]
    only = _plane("/device:GPU:0", {"Stream #13(CudaGraph)": [graph]})
    assert [(k.name, k.end_ns) for k in timing.xspace_kernels([only])] == [("cudaGraphLaunch", 90)]
    with pytest.raises(TimingError, match="no /device:GPU plane"):
        timing.xspace_kernels([host])
    with pytest.raises(TimingError, match="no device events on /device:GPU:0"):
        timing.xspace_kernels([_plane("/device:GPU:0", {"XLA Ops": [("x", 0.0, 1.0, {})]})])


def test_jax_trace_reads_a_real_xspace_and_says_when_there_is_no_gpu() -> None:
    """The real jax.profiler path on this jax (start_trace with our options, the .xplane.pb file,
    ProfileData): on a CPU the trace has host planes only, and the error names them."""
    import jax
    import jax.numpy as jnp

    if any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("a GPU is present: the GPU tests cover this path")
    f = jax.jit(lambda a: a * 2)
    a = jnp.ones(8)
    with pytest.raises(TimingError, match=r"no /device:GPU plane \(planes: \[.*/host:CPU"):
        timing.jax_trace(lambda: f(a), 3, jax.block_until_ready)


def test_jax_profiler_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    monkeypatch.delenv(timing.JAX_PROFILER_ENV, raising=False)
    # No torch with CUDA in the process: JAX's own profiler.
    cpu_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: False))
    monkeypatch.setitem(sys.modules, "torch", cpu_torch)
    assert timing.jax_profiler_choice() == "jax"
    monkeypatch.delitem(sys.modules, "torch")
    assert timing.jax_profiler_choice() == "jax"
    # torch loaded with CUDA: one CUPTI client for the process, torch.profiler reads both stacks.
    gpu_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: True))
    monkeypatch.setitem(sys.modules, "torch", gpu_torch)
    assert timing.jax_profiler_choice() == "torch"
    monkeypatch.setenv(timing.JAX_PROFILER_ENV, "jax")
    assert timing.jax_profiler_choice() == "jax"
    monkeypatch.setenv(timing.JAX_PROFILER_ENV, "torch")
    assert timing.jax_profiler_choice() == "torch"
    monkeypatch.setenv(timing.JAX_PROFILER_ENV, "nsys")
    with pytest.raises(ValueError, match="expected 'jax' or 'torch', got 'nsys'"):
        timing.jax_profiler_choice()


# ---- host clocks ---------------------------------------------------------------------------------
def test_throughput_issues_back_to_back_and_waits_once_per_batch() -> None:
    log: list[tuple[str, int]] = []
    stats = timing.throughput(
        lambda i: log.append(("call", i)) or i,
        lambda out: log.append(("wait", out)),
        calls=4,
        batches=3,
    )
    assert log == [
        ("call", 0),
        ("call", 1),
        ("call", 2),
        ("call", 3),
        ("wait", 3),
        ("call", 4),
        ("call", 5),
        ("call", 6),
        ("call", 7),
        ("wait", 7),
        ("call", 8),
        ("call", 9),
        ("call", 10),
        ("call", 11),
        ("wait", 11),
    ]
    assert stats.n == 3 and 0 < stats.min <= stats.median <= stats.max
    assert "4 back-to-back calls" in stats.method


def test_host_issue_waits_every_ten_calls_and_host_sync_every_call() -> None:
    waits: list[int] = []
    stats = timing.host_issue(lambda i: i, waits.append, reps=25)
    assert waits == [9, 19, 24] and stats.n == 25
    waits.clear()
    stats = timing.time_host(lambda i: i, waits.append, warmup_s=0.0, target_s=0.0)
    assert stats.n == 20 and len(waits) == 3 + 20  # warm-up calls, then one wait per timed call
    assert stats.method == "host clock, synchronised"


def test_measure_on_a_cpu_and_a_device_that_cannot_be_read(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = itertools.count()
    fn = lambda i: next(calls)  # noqa: E731
    row = timing.measure("torch", "cpu", fn, lambda _: None, warmup_s=0.0, target_s=0.0)
    assert row["time"] == row["host_sync"] and row["time"]["n"] == 20
    assert set(row) == {"time", "throughput", "host_issue", "host_sync"}

    def unreadable(*args: Any, **kwargs: Any) -> None:
        raise TimingError("the trace has no /device:GPU plane")

    monkeypatch.setattr(timing, "time_device", unreadable)
    row = timing.measure(
        "jax",
        "cuda",
        fn,
        lambda _: None,
        warmup_s=0.0,
        target_s=0.0,
        cudagraph="not captured: reason",
    )
    # No host clock stands in for the device: the row says why, the host measures are kept.
    assert "time" not in row and "no /device:GPU plane" in row["device_error"]
    assert row["throughput"]["median"] > 0 and row["cudagraph_note"] == "not captured: reason"


# ---- the checks ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("bound", "fraction", "invalid"),
    [
        ("memory", 0.975, False),
        ("memory", 0.965, True),
        ("compute", 0.91, False),
        ("compute", 0.89, True),
        ("memory", 1.5, False),
    ],
)
def test_floor_check(bound: str, fraction: float, invalid: bool) -> None:
    floor = 83e-6  # llama3-8b M=16: 352 MB of weights at 4.24 TB/s
    verdict = timing.floor_violation({"device median": floor * fraction}, floor, bound)
    assert (verdict is not None) == invalid
    if invalid:
        assert verdict.startswith("invalid measurement: device median")
        assert f"{bound}-bound floor 83.0 µs" in verdict


def test_floor_check_catches_a_minimum_below_the_floor() -> None:
    """The old JAX splitter gave a 42 µs minimum for a 83 µs floor: a median above the floor does
    not make such a row valid."""
    row = {"time": {"median": 110e-6, "min": 42e-6}, "throughput": {"median": 120e-6}}
    invalid, flags = timing.judge_timing(row, 83e-6, "memory")
    assert invalid is not None and "device min 42.0 µs" in invalid and "median" not in invalid
    assert flags == []


@pytest.mark.parametrize(
    ("graph", "throughput", "flags"),
    [
        (104e-6, 150e-6, []),
        (106e-6, 150e-6, ["cudagraph +6% vs device"]),
        (96e-6, 150e-6, []),
        (94e-6, 150e-6, ["cudagraph -6% vs device"]),
        (None, 96e-6, []),
        (None, 94e-6, ["device +6% over throughput"]),
    ],
)
def test_cross_check_flags(graph: float | None, throughput: float, flags: list[str]) -> None:
    row: dict[str, Any] = {
        "time": {"median": 100e-6, "min": 99e-6},
        "throughput": {"median": throughput},
    }
    if graph is not None:
        row["cudagraph"] = {"median": graph}
    invalid, got = timing.judge_timing(row, 50e-6, "compute")
    assert invalid is None and got == flags


# ---- benchmark rows get the verdict --------------------------------------------------------------
CEIL = Ceilings({"bfloat16": 800e12, "float16": 800e12}, 4.24e12, "cuda", {})
LLAMA = MLPSpec((4096, 14336, 4096), "swiglu", bias=False, dtype="bfloat16")


def _fake_measure(device_s: float, graph_s: float | None = None, throughput_s: float = 150e-6):
    def fake(stack: str, device: str, fn: Any, wait: Any, **kwargs: Any) -> dict[str, Any]:
        stats = {
            "median": device_s,
            "min": device_s * 0.99,
            "max": device_s * 1.01,
            "n": 20,
            "method": "fake",
        }
        row = {
            "time": stats,
            "span": stats,
            "kernels_per_call": 3,
            "throughput": {**stats, "median": throughput_s},
            "host_issue": stats,
            "host_sync": stats,
        }
        if graph_s is not None:
            row["cudagraph"] = {**stats, "median": graph_s}
        row["_cudagraph_arg"] = kwargs.get("cudagraph")
        return row

    return fake


def test_benchmark_rows_invalid_flagged_and_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    case = Case(LLAMA, 16, "cuda")  # no device buffers are made: only the floor is read
    eager = Provider("torch", "eager", True)
    # 352 MB at 4.24 TB/s: the floor is 83 µs and memory-bound.
    monkeypatch.setattr(benchmark, "measure", _fake_measure(50e-6, graph_s=50e-6))
    row = benchmark.time_row(eager, case, None, CEIL, {})
    assert row["status"] == "invalid measurement"
    assert "below the memory-bound floor" in row["message"]
    assert "tflops" not in row and "pct_roofline" not in row  # never a result
    assert row["floor_s"] == pytest.approx(83.6e-6, rel=0.01)

    monkeypatch.setattr(benchmark, "measure", _fake_measure(111e-6, graph_s=120e-6))
    row = benchmark.time_row(eager, case, None, CEIL, {})
    assert row["status"] == "timed" and row["flags"] == ["cudagraph +8% vs device"]
    assert row["pct_roofline"] == pytest.approx(100 * row["floor_s"] / 111e-6)
    assert row["_cudagraph_arg"] is True

    # torch:mosaic is captured (its launches record: torch_impl/cross/launcher.py); JAX rows get
    # no CUDA-graph request.
    row = benchmark.time_row(Provider("torch", "mosaic", False), case, None, CEIL, {})
    assert row["_cudagraph_arg"] is True
    row = benchmark.time_row(Provider("jax", "xla", True), case, None, CEIL, {})
    assert row["_cudagraph_arg"] is False
    # a torch plan a graph would not record as planned (fused_small's Mosaic GPU sibling): a
    # capture would time the Triton kernel instead, so none is made
    small = Provider("torch", "fused_small", False)
    row = benchmark.time_row(small, case, None, CEIL, {}, capturable=False)
    assert row["_cudagraph_arg"] == benchmark.NOT_CAPTURED
    assert benchmark.time_row(small, case, None, CEIL, {})["_cudagraph_arg"] is True


def test_floor_check_allows_the_faster_of_copy_and_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode kernel that streams llama3-8b's 352 MB of weights at 4.4 TB/s (80 µs) is faster
    than a copy moves bytes (4.24 TB/s: floor 83.6 µs) but not than reads go (4.6 TB/s): a result,
    held to the read rate; without a read ceiling it would be called impossible."""
    case = Case(LLAMA, 16, "cuda")
    monkeypatch.setattr(benchmark, "measure", _fake_measure(80e-6, throughput_s=90e-6))
    decode = Provider("torch", "fused_decode", False)
    with_read = Ceilings(CEIL.matmul, CEIL.copy, "cuda", {}, read=4.6e12)
    row = benchmark.time_row(decode, case, None, with_read, {})
    assert row["status"] == "timed" and row["pct_roofline"] == pytest.approx(104, abs=1)
    assert row["floor_check_s"] == pytest.approx(352e6 / 4.6e12, rel=0.01)
    assert benchmark.time_row(decode, case, None, CEIL, {})["status"] == "invalid measurement"


def test_floor_check_leaves_out_the_writes_the_l2_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A write-back L2 may still hold a call's output when the call ends (the next flush writes it
    back): the H100 (c48a920) ran a 16-wide narrow MLP at 1M rows — 33.5 MB read, 33.5 MB written
    — in 19.6 µs, 3.42 TB/s, over HBM3's peak. The check counts the writes past the L2's capacity
    only (its 50 MB here: none of y), so the row is timed, its "% roofline" still over every byte;
    a time under the reads alone stays invalid, and an output larger than the L2 keeps its excess;
    the floor itself (and the copy rate's %) is unchanged."""
    spec = MLPSpec((16, 16, 16), "relu", bias=False, dtype="float16")
    case = Case(spec, 1 << 20, "cuda")
    small = Provider("torch", "fused_small", False)
    h100 = Ceilings({"float16": 700e12}, 3.11e12, "cuda", {}, read=2.93e12)
    with_l2 = dataclasses.replace(h100, l2_bytes=50 * 2**20)
    monkeypatch.setattr(benchmark, "measure", _fake_measure(19.6e-6, throughput_s=44.9e-6))
    assert benchmark.time_row(small, case, None, h100, {})["status"] == "invalid measurement"
    row = benchmark.time_row(small, case, None, with_l2, {})
    everything, writes = 2 * 2 * (1 << 20) * 16 + 2 * 2 * 16 * 16, 2 * (1 << 20) * 16
    assert row["status"] == "timed"
    assert row["floor_s"] == pytest.approx(everything / 3.11e12, rel=1e-6)
    assert row["floor_check_s"] == pytest.approx((everything - writes) / 3.11e12, rel=1e-6)
    assert row["pct_roofline"] == pytest.approx(100 * everything / 3.11e12 / 19.6e-6, rel=1e-6)
    monkeypatch.setattr(benchmark, "measure", _fake_measure(9e-6, throughput_s=44.9e-6))
    assert benchmark.time_row(small, case, None, with_l2, {})["status"] == "invalid measurement"
    wide = MLPSpec((64, 64, 64), "relu", bias=False, dtype="float16")  # y: 134 MB > the L2
    check = metrics.floor(wide, 1 << 20, "fused_small", with_l2, check=True)
    assert check.bytes == cost.min_bytes(wide, 1 << 20, whole=True) - 50 * 2**20
    assert metrics.floor(wide, 1 << 20, "fused_small", with_l2).bytes == cost.min_bytes(
        wide, 1 << 20, whole=True
    )
    assert Ceilings.from_dict(with_l2.to_dict()) == with_l2
    assert Ceilings.from_dict({**h100.to_dict(), "l2_bytes": None}) == h100  # older results


def test_floor_check_takes_the_physical_peak_for_arithmetic(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A narrow MLP whose weights stay on chip can beat the large GEMM's measured rate (the H200:
    8 layers 128 wide fp16 at 1M rows, 275 GFLOP in 350.6 µs = 784 TFLOP/s, cuBLAS's 8192³ fp16
    708 TFLOP/s): a result above 100 % of the measured roofline, held to the physical peak; an
    architecture with no known peak keeps the measured rate's check."""
    spec = MLPSpec((128,) * 9, "relu", bias=False, dtype="float16")
    case = Case(spec, 1 << 20, "cuda")
    monkeypatch.setattr(benchmark, "measure", _fake_measure(340e-6, throughput_s=345e-6))
    small = Provider("jax", "fused_small", False)
    measured = Ceilings({"float16": 708e12}, 4.24e12, "cuda", {})
    peak = ceilings.physical_peak((9, 0), 132, 1.98e9)
    assert peak is not None and peak["float16"] == pytest.approx(1.0704e15, rel=1e-3)
    with_peak = dataclasses.replace(measured, peak=peak)
    assert benchmark.time_row(small, case, None, measured, {})["status"] == "invalid measurement"
    row = benchmark.time_row(small, case, None, with_peak, {})
    assert row["status"] == "timed" and row["pct_roofline"] == pytest.approx(114, abs=1)
    assert row["floor_check_s"] == pytest.approx(275e9 / 1.0704e15, rel=0.01)
    # far below even the peak's floor: still an invalid measurement
    monkeypatch.setattr(benchmark, "measure", _fake_measure(200e-6, throughput_s=205e-6))
    assert benchmark.time_row(small, case, None, with_peak, {})["status"] == "invalid measurement"
    assert Ceilings.from_dict(with_peak.to_dict()) == with_peak
    assert ceilings.physical_peak((7, 5), 40, 1.5e9) is None  # not in the table
    assert ceilings.physical_peak((9, 0), 132, None) is None  # no clock known


def test_auto_rows_are_floored_as_the_implementation_chosen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """nerf-64x5 at 2M rows: the whole-MLP floor (x and y once: 0.5 GB, 127 µs) is far below the
    per-layer one (hidden layers written and read too: 2.7 GB, 633 µs). 300 µs is a result for
    `auto` choosing fused_small, an invalid measurement for `auto` choosing per-layer kernels."""
    case = Case(MLPSpec((64,) * 6, "relu", bias=False, dtype="float16"), 2_097_152, "cuda")
    monkeypatch.setattr(benchmark, "measure", _fake_measure(300e-6, throughput_s=310e-6))
    auto = Provider("torch", "auto", False)
    whole = benchmark.time_row(auto, case, None, CEIL, {}, chosen="fused_small")
    layer = benchmark.time_row(auto, case, None, CEIL, {}, chosen="triton")
    assert whole["floor_s"] == pytest.approx(127e-6, rel=0.01)
    assert layer["floor_s"] == pytest.approx(633e-6, rel=0.01)
    assert whole["status"] == "timed" and whole["pct_roofline"] == pytest.approx(42, abs=1)
    assert layer["status"] == "invalid measurement"


def test_auto_provider_names_its_choice() -> None:
    pytest.importorskip("torch", reason="the jax-only CI job has no torch")
    spec = MLPSpec((13, 24, 11), "swiglu", bias=True, dtype="float32")
    case = Case(spec, 7, "cpu")
    auto = Provider("torch", "auto", False)
    assert auto.chosen(case) == auto.plan(case).impl == "fused_small"
    assert auto.chosen() == "auto" and Provider("torch", "eager", True).chosen(case) == "eager"
    assert auto.interpreted("cpu", case)  # the fused_small kernel runs under the interpreter


# ---- GPU: the real profilers ---------------------------------------------------------------------
def _cuda_matmul(n: int = 4096):
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return a, b


@pytest.mark.gpu
def test_gpu_torch_and_jax_profilers_time_the_same_matmul() -> None:
    """One cuBLAS-sized matmul through both stacks on the same buffers (DLPack), each stack read by
    its own profiler, torch before and after JAX (two CUPTI clients in one process): the flush
    excluded, device times near triton's do_bench and near each other."""
    import jax
    import torch
    from triton.testing import do_bench

    a, b = _cuda_matmul()
    ja, jb = jax.dlpack.from_dlpack(a), jax.dlpack.from_dlpack(b)
    jmm = jax.jit(lambda x, y: x @ y)
    jmm(ja, jb).block_until_ready()  # compiled (and autotuned) before any trace
    wait_t = lambda _: torch.cuda.synchronize()  # noqa: E731
    reference = do_bench(lambda: a @ b, return_mode="median") * 1e-3
    first = timing.time_device("torch", lambda i: a @ b, 30, wait_t)
    jt = timing.time_device("jax", lambda i: jmm(ja, jb), 30, lambda o: o.block_until_ready())
    again = timing.time_device("torch", lambda i: a @ b, 30, wait_t)
    for t in (first, again):
        assert t.kernels_per_call >= 1 and t.excluded["flush"] >= 30
        assert 0.7 * reference < t.device.median < 1.3 * reference, (t, reference)
        assert t.device.median <= t.span.median * 1.001
    assert jt.kernels_per_call >= 1 and jt.excluded["flush"] >= 30
    assert 0.5 * reference < jt.device.median < 2 * reference, (jt, reference)


@pytest.mark.gpu
def test_gpu_cudagraph_cross_check_agrees_on_a_stream_kernel() -> None:
    """On a memory-bound kernel (512 MB read and written, far past the L2) the two clocks agree.
    (On back-to-back 0.2 ms matmuls the graph replay ran 8-11 % slower than the same kernels
    timed one per flush on the H200, 2026-12-01 — a sustained-load effect the bench flags rather
    than hides; docs/benchmarking.md. A same-dtype `copy_` is a memcpy, not a kernel: excluded by
    name from device time, so it cannot serve here.)"""
    import torch

    src = torch.empty(64 * 2**20, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    row = timing.measure(
        "torch",
        "cuda",
        lambda i: torch.mul(src, 2.0, out=dst),
        lambda _: torch.cuda.synchronize(),
        cudagraph=True,
        target_s=0.05,
    )
    invalid, flags = timing.judge_timing(row, 1e-9, "memory")
    assert invalid is None and row["kernels_per_call"] >= 1
    assert abs(row["cudagraph"]["median"] / row["time"]["median"] - 1) < 0.10, row
    assert row["throughput"]["median"] > 0.9 * row["time"]["median"], (row, flags)


def test_flush_kind_defaults_to_read_and_refuses_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    """The read flush leaves no dirty line for the timed call (docs/benchmarking.md);
    $FUSEDMLP_FLUSH picks the old read-modify-write, and anything else is refused by name."""
    monkeypatch.delenv(timing.FLUSH_ENV, raising=False)
    assert timing.flush_kind() == "read"
    monkeypatch.setenv(timing.FLUSH_ENV, "rmw")
    assert timing.flush_kind() == "rmw"
    monkeypatch.setenv(timing.FLUSH_ENV, "write")
    with pytest.raises(ValueError, match=r"FUSEDMLP_FLUSH.*'write'"):
        timing.flush_kind()


def test_jax_read_flush_sums_every_row():
    """The JAX read flush (a Pallas-Triton kernel of its own name) reads every word: its row sums,
    under the interpreter, are NumPy's."""
    import jax.numpy as jnp

    words = timing.FLUSH_ROW * timing.FLUSH_BLOCK_ROWS * 3
    buf = jnp.arange(words, dtype=jnp.uint32) * jnp.uint32(2654435761)  # wraps: bits mix
    got = np.asarray(timing.jax_read_flush(buf, interpret=True))
    want = np.asarray(buf).reshape(-1, timing.FLUSH_ROW).sum(axis=1, dtype=np.uint32)
    np.testing.assert_array_equal(got, want)


def test_jax_read_flush_lowers_for_cuda_under_its_own_name():
    """Its kernel name is FLUSH_KERNEL, not an XLA fusion's (`input_reduce_fusion` is also the name
    of the timed calls' own reductions, which torch.profiler cannot tell apart)."""
    import jax

    from helpers import lower_for_cuda, needs_jax_0_10_lowering

    needs_jax_0_10_lowering()
    words = timing.FLUSH_ROW * timing.FLUSH_BLOCK_ROWS * 4
    flush = functools.partial(timing.jax_read_flush, pallas=True)  # lowered on a CPU machine
    text = lower_for_cuda(flush, jax.ShapeDtypeStruct((words,), np.uint32))
    assert timing.FLUSH_KERNEL in text and "triton" in text.lower()


def test_flush_for_stack_refuses_an_unknown_kind():
    with pytest.raises(ValueError, match=r"kind: expected one of \('read', 'rmw'\), got 'bogus'"):
        Flush.for_stack("jax", "bogus")
