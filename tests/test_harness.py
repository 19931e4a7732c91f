"""The harness and the `fusedmlp` CLI, run in-process on the CPU (tiny specs from --spec files).

What is proved: parity of cpu-small passes through both stacks; a deliberately broken kernel makes
`fusedmlp parity` exit 1 naming the failing row (the front's dispatch patched, and the hidden
--inject-fault hook); bench times the CPU baselines (median/min/max over >= 20 repetitions, with
throughput and host issue beside), lists interpreted kernels as not timed, never times a path that
fails parity, and has a row for each stack's `auto` naming its choice; overhead records host times
and first-call costs; report turns saved JSON into Markdown and PNG; every JSON carries the
environment block. GPU-only checks (DLPack zero-copy, a small bench with the profilers) are marked
`gpu`. The timing method itself is tested in test_timing.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusedmlp.bench import cli, providers, report
from fusedmlp.bench.timing import Stats, time_host
from fusedmlp.common import MLPSpec, param_shapes

# Odd widths and M (multiples of no block size) keep the interpreted kernels honest and fast.
from helpers import CLI_TINY_SPEC

TINY = MLPSpec(**CLI_TINY_SPEC)
TINY_M = "7"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("no_cli_faults")


def _cli(command: str, *paths: Path, **flags: object) -> int:
    """`fusedmlp` in-process: the words of `command`, the `paths`, then each flag as `--name value`
    (underscores as dashes); --device cpu unless a flag says otherwise (None: no --device)."""
    args = [*command.split(), *map(str, paths)]
    for name, value in {"device": "cpu", **flags}.items():
        if value is not None:
            args += [f"--{name.replace('_', '-')}", str(value)]
    return cli.main(args)


def _load(path: Path) -> dict:
    data = json.loads(path.read_text())
    assert data["kind"] == "fusedmlp-results"
    env = data["environment"]
    assert env["versions"]["python"] and env["versions"]["numpy"]
    assert env["versions"]["torch"] and env["versions"]["jax"]
    assert "commit" in env["git"] and "dirty" in env["git"]
    assert env["cpu"]
    return data


def _rows(data: dict, section: str = "parity") -> dict[str, dict]:
    (case,) = data[section]["cases"]
    return {r["provider"]: r for r in case["rows"]}


# ---- parity ------------------------------------------------------------------------------------
def test_main_job_parity_of_cpu_small_passes_both_stacks(tmp_path: Path) -> None:
    out = tmp_path / "parity.json"
    assert cli.main(["--json", str(out)]) == 0  # `fusedmlp` with no command, on a CPU
    data = _load(out)
    assert data["environment"]["cpu_threads"] == {"torch": 1, **data["environment"]["cpu_threads"]}
    # cpu-small in its float32 and again in bfloat16, so pallas_mosaic (16-bit wgmma) runs too.
    small = MLPSpec.preset("cpu-small")
    assert [c["spec_text"] for c in data["parity"]["cases"]] == [
        str(small),
        str(small.replace(dtype="bfloat16")),
    ]
    assert data["parity"]["passed"] and not data["parity"]["failures"]
    bf16 = {r["provider"]: r for r in data["parity"]["cases"][1]["rows"]}
    assert bf16["jax:pallas_mosaic"]["status"] == "pass", bf16["jax:pallas_mosaic"]
    data["parity"]["cases"] = data["parity"]["cases"][:1]
    rows = _rows(data)
    statuses = {name: r["status"] for name, r in rows.items()}
    assert set(statuses.values()) <= {"pass", "n/a", "skipped"}, statuses
    # Both stacks' kernels and baselines really ran and were judged by the tolerance policy.
    for name in ("torch:triton", "torch:eager", "torch:compile", "jax:pallas_triton", "jax:xla"):
        row = rows[name]
        assert row["status"] == "pass", (name, row)
        assert 0 <= row["rel_fro"] <= row["bound_rel_fro"]
    assert rows["torch:triton"]["interpreted"] and not rows["torch:eager"]["interpreted"]
    assert rows["torch:triton"]["kernels"] == "gated+linear_act"
    pairs = {x["pair"]: x for x in data["parity"]["cases"][0]["cross"]}
    assert pairs["torch:eager vs jax:xla"]["status"] == "pass"
    assert (
        pairs["torch:triton vs jax:pallas_triton"]["rel_fro"]
        <= (pairs["torch:triton vs jax:pallas_triton"]["bound_rel_fro"])
    )


def test_parity_fails_loudly_on_a_broken_kernel(
    spec_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fusedmlp.torch_impl import front

    good = front._RUNNERS["triton"]

    def broken(*args, **kwargs):
        y = good(*args, **kwargs).clone()
        y[3, 5] += 0.5  # one wrong element is enough
        return y

    monkeypatch.setitem(front._RUNNERS, "triton", broken)
    out = tmp_path / "parity.json"
    code = _cli("parity", spec=spec_file, m=TINY_M, impl="triton,eager", json=out)
    assert code == 1
    text = capsys.readouterr().out
    assert "parity: FAIL" in text and "FAILED:" in text and "torch:triton FAIL" in text
    assert "at (3, 5)" in text  # the report says where
    rows = _rows(_load(out))
    assert rows["torch:triton"]["status"] == "FAIL" and rows["torch:eager"]["status"] == "pass"
    assert not json.loads(out.read_text())["parity"]["passed"]


def test_parity_inject_fault_hook(spec_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = _cli("parity", spec=spec_file, m=TINY_M, impl="jax", inject_fault="jax:pallas_triton")
    assert code == 1
    assert "jax:pallas_triton FAIL" in capsys.readouterr().out


def test_parity_backward_judges_every_gradient_and_twins(spec_file: Path, tmp_path: Path) -> None:
    """`parity --backward`: each provider's dx and param gradients against the float64 reference
    backward, the twins bit for bit in bfloat16 (same kernels, same order of arithmetic)."""
    out = tmp_path / "grads.json"
    args = dict(spec=spec_file, m=TINY_M, impl="triton,pallas_triton,eager,xla", json=out)
    assert _cli("parity --backward", dtype="bfloat16", **args) == 0
    (case,) = _load(out)["parity"]["cases"]
    assert case["backward"] and not case["row_subset"]
    rows = {r["provider"]: r for r in case["rows"]}
    names = {"dx", *(f"d{k}" for k in param_shapes(TINY))}
    for row in rows.values():
        assert row["status"] == "pass", row
        assert set(row["grads"]) == names and all(g["passed"] for g in row["grads"].values())
    twins = {x["pair"]: x for x in case["cross"]}
    assert twins["torch:triton vs jax:pallas_triton"]["identical"]


def test_parity_backward_catches_a_wrong_gradient(
    spec_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # One part in a hundred on every gradient: far outside float32's gradient bounds.
    code = _cli(
        "parity --backward", spec=spec_file, m=TINY_M, impl="torch:triton,torch:eager",
        dtype="float32", inject_fault="torch:triton",
    )  # fmt: skip
    assert code == 1
    text = capsys.readouterr().out
    assert "torch:triton FAIL" in text and "Gradient parity" in text


def test_parity_dtype_override_and_bad_impl(spec_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    code = _cli(
        "parity",
        spec=spec_file,
        m="1",
        dtype="bfloat16,float16",
        impl="eager,xla",
        json=out,
        device=None,
    )
    assert code == 0
    cases = _load(out)["parity"]["cases"]
    assert [c["spec"]["dtype"] for c in cases] == ["bfloat16", "float16"]
    assert all(r["status"] == "pass" for c in cases for r in c["rows"])
    with pytest.raises(SystemExit, match="unknown implementation 'nope'"):
        cli.main(["parity", "--spec", str(spec_file), "--impl", "nope"])


def test_fp32_precision_runs_each_float32_case_once_per_precision(spec_file: Path) -> None:
    args = cli.build_parser().parse_args(
        ["parity", "--spec", str(spec_file), "--m", "1,3", "--dtype", "bfloat16,float32",
         "--fp32-precision", "ieee,tf32"]
    )  # fmt: skip
    items = cli.resolve_items(args, "cpu")
    got = [(s.dtype, s.fp32_precision, m) for _, s, m in items]
    assert got == [
        ("bfloat16", "ieee", 1), ("bfloat16", "ieee", 3),
        ("float32", "ieee", 1), ("float32", "ieee", 3),
        ("float32", "tf32", 1), ("float32", "tf32", 3),
    ]  # fmt: skip
    args.fp32_precision = ("fast",)
    with pytest.raises(SystemExit, match="fp32_precision: expected one of"):
        cli.resolve_items(args, "cpu")


# ---- bench -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench_json(spec_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    code = _cli(
        "bench --quick", spec=spec_file, m="33", impl="triton,fused_small,eager,jax", json=out
    )
    assert code == 0
    return out


def test_bench_times_baselines_and_lists_interpreted(bench_json: Path) -> None:
    data = _load(bench_json)
    ceilings = data["bench"]["ceilings"]
    assert ceilings["copy"] > 0 and ceilings["read"] > 0 and ceilings["matmul"]["float32"] > 0
    rows = _rows(data, "bench")
    for name in ("torch:eager", "jax:xla"):
        row = rows[name]
        t = row["time"]
        assert row["status"] == "timed" and row["parity"] == "pass"
        assert t["n"] >= 20 and 0 < t["min"] <= t["median"] <= t["max"]
        assert t == row["host_sync"] and t["method"] == "host clock, synchronised"  # no device
        assert row["tflops"] > 0 and row["gbps"] > 0 and row["pct_roofline"] > 0
        assert row["host_issue"]["median"] > 0 and row["host_issue"]["n"] == 30
        assert row["throughput"]["median"] > 0 and row["throughput"]["n"] == 5
        assert "span" not in row and "cudagraph" not in row  # device-only measures: not invented
    for name in ("torch:triton", "jax:pallas_triton", "torch:fused_small", "jax:fused_small"):
        assert rows[name]["status"] == "interpreted — not timed", rows[name]
        assert "time" not in rows[name]
    # `auto` (what users call) is a row, naming what it chose: fused_small for this narrow MLP.
    assert rows["jax:auto"]["chosen"] == "fused_small"
    assert rows["jax:auto"]["status"] == "interpreted — not timed"
    case = data["bench"]["cases"][0]
    assert case["floor"]["whole_s"] <= case["floor"]["per_layer_s"]


def test_bench_never_times_a_failing_path(spec_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    code = _cli(
        "bench --quick",
        spec=spec_file,
        m=TINY_M,
        impl="eager,xla",
        inject_fault="jax:xla",
        json=out,
    )
    assert code == 1
    rows = _rows(_load(out), "bench")
    assert rows["jax:xla"]["status"] == "FAIL parity — not timed"
    assert "time" not in rows["jax:xla"] and rows["jax:xla"]["rel_fro"] > 1e-3
    assert rows["torch:eager"]["status"] == "timed"


def test_timing_stats_have_spread_and_at_least_20_reps() -> None:
    calls = []
    stats = time_host(lambda i: calls.append(i), lambda _: None, warmup_s=0.0, target_s=0.0)
    assert isinstance(stats, Stats) and stats.n >= 20
    assert stats.min <= stats.median <= stats.max
    assert len(calls) >= 23  # >= 3 warm-up calls before the timed ones


# ---- overhead, sweep, report --------------------------------------------------------------------
@pytest.fixture(scope="module")
def overhead_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("overhead") / "overhead.json"
    assert _cli("overhead --quick", impl="baselines,triton", json=out) == 0
    return out


def test_overhead_records_host_and_first_call(overhead_json: Path) -> None:
    data = _load(overhead_json)
    rows = {r["provider"]: r for r in data["overhead"]["rows"]}
    for name in ("torch:eager", "torch:compile", "jax:xla"):
        r = rows[name]
        assert r["status"] == "measured", r
        assert r["first_call_s"] > 0 and r["host_async_s"] > 0 and r["host_sync_s"] > 0
        assert "device_s" not in r  # no device on a CPU: not invented
    # Compilation is the first call's cost: far above a compiled call's.
    assert rows["torch:compile"]["first_call_s"] > 10 * rows["torch:compile"]["host_sync_s"]
    assert rows["jax:xla"]["first_call_s"] > 10 * rows["jax:xla"]["host_sync_s"]
    assert rows["torch:triton"]["status"] == "interpreted — not measured"
    # The same-kernel-from-both-frameworks decomposition needs a GPU; on a CPU it says so.
    decomposition = data["overhead"]["decomposition"]
    assert decomposition["rows"] == [] and "needs a GPU" in decomposition["reason"]
    assert "not measured: the decomposition needs a GPU" in report.to_markdown(data)


def test_sweep_short_mode(tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    assert _cli("sweep --short --quick", widths="16,32", depths="2", m="40", json=out) == 0
    sweep = _load(out)["sweep"]
    assert [(c["width"], c["depth"]) for c in sweep["cells"]] == [(16, 2), (32, 2)]
    for cell in sweep["cells"]:
        assert cell["floor_s"] > 0
        assert cell["times"]["torch:eager"] > 0 and cell["times"]["jax:xla"] > 0
        # fused_small runs interpreted here: no speedup is claimed.
        assert cell["speedup"] == {"torch": None, "jax": None}


def test_report_writes_markdown_and_png(
    bench_json: Path, overhead_json: Path, tmp_path: Path
) -> None:
    md = tmp_path / "new" / "r.md"  # folders that do not exist yet are made
    merged = tmp_path / "all.json"
    assert (
        _cli(
            "report",
            bench_json,
            overhead_json,
            markdown=md,
            plot_dir=tmp_path,
            json=merged,
            device=None,
        )
        == 0
    )
    text = md.read_text()
    assert "| provider | kernels | host sync | min … max | n | span | K | throughput |" in text
    assert "torch:eager" in text and "| jax:auto → fused_small |" in text
    assert "Overhead:" in text and "Machine: CPU" in text
    for name in ("bench.png", "overhead.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
        with Image.open(tmp_path / name) as image:  # a palette PNG (report.save_chart)
            assert image.mode == "P"
    data = _load(merged)
    assert "bench" in data and "overhead" in data
    with pytest.raises(SystemExit, match="expected a fusedmlp results file"):
        bad = tmp_path / "bad.json"
        bad.write_text("{}")
        cli.main(["report", str(bad)])


def test_provider_selection() -> None:
    names = [p.name for p in providers.select("fused_small,torch:eager")]
    assert names == ["torch:fused_small", "jax:fused_small", "torch:eager"]
    assert all(p.baseline for p in providers.select("baselines"))
    assert {p.stack for p in providers.select("jax")} == {"jax"}


def test_the_same_kernels_timed_twice_are_named_as_the_runs_noise() -> None:
    def row(stack: str, impl: str, seconds: float, chosen: str | None = None) -> dict:
        return {
            "provider": f"{stack}:{impl}", "impl": impl, "chosen": chosen or impl, "stack": stack,
            "status": "timed", "time": {"median": seconds},
        }  # fmt: skip

    case = {
        "rows": [
            row("torch", "triton_tma", 3.240e-3),
            row("torch", "eager", 3.242e-3),
            row("torch", "auto", 3.245e-3, chosen="triton_tma"),
            row("jax", "xla", 3.294e-3),
            row("jax", "auto", 3.241e-3, chosen="xla"),
            row("jax", "auto_untimed", 1.0, chosen="pallas_mosaic"),  # its twin was not timed
            {**row("torch", "mosaic", 1.0), "status": "failed"},
        ]
    }
    assert report.same_code_rows(case) == [
        "torch:auto → triton_tma 3.245 ms / torch:triton_tma 3.240 ms: +0.2 %",
        "jax:auto → xla 3.241 ms / jax:xla 3.294 ms: -1.6 %",
    ]
    case["rows"] = case["rows"][:2]  # no `auto` timed: nothing to say
    assert report.same_code_rows(case) == []


# ---- GPU only ------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_inputs_are_shared_through_dlpack() -> None:
    from fusedmlp.bench.cases import Case

    case = Case(TINY.replace(dtype="bfloat16"), 4096, "cuda")
    (tx, tp), *_ = case.torch_sets()
    jx, jp = case.jax_sets()[0]
    assert jx.unsafe_buffer_pointer() == tx.data_ptr()
    assert jp["w0"].unsafe_buffer_pointer() == tp["w0"].data_ptr()
    np.testing.assert_array_equal(np.asarray(jx.astype("float32")), tx.float().cpu().numpy())


@pytest.mark.gpu
def test_gpu_bench_rows_carry_every_measure(tmp_path: Path) -> None:
    """A small GPU bench through the CLI: device time from each stack's profiler, one definition
    (kernels per call, span, throughput, host issue/sync), the CUDA-graph cross-check on torch
    rows, every row judged against the floor of the same run."""
    spec = tmp_path / "mid.json"
    MLPSpec((1024, 4096, 1024), "gelu", bias=True, dtype="bfloat16").to_json(spec)
    out = tmp_path / "bench.json"
    code = _cli("bench", spec=spec, m="4096", impl="eager,xla,auto", json=out, device=None)
    rows = _rows(_load(out), "bench")
    assert code == 0, {n: (r["status"], r.get("message")) for n, r in rows.items()}
    for name in ("torch:eager", "jax:xla", "torch:auto", "jax:auto"):
        row = rows[name]
        assert row["status"] == "timed", row
        # One CUPTI reader per process: torch.profiler reads both stacks where torch has CUDA
        # (bench/timing.py's docstring: jax.profiler cannot trace after torch.profiler has).
        assert row["time"]["method"].startswith("torch.profiler (CUPTI)"), row["time"]
        assert row["kernels_per_call"] >= 1 and row["excluded_kernels"]["flush"] >= row["time"]["n"]
        # Summed kernel time within the call's span: a sum can pass the span only where two
        # kernels of one call overlap (XLA may run small fusions side by side): 145.28 against
        # a 144.96 µs span, 0.2 %, on the H200 at 874ab79. More than 1 % is a mis-assignment.
        assert row["time"]["median"] <= row["span"]["median"] * 1.01
    assert rows["torch:eager"]["cudagraph"]["median"] > 0
    # auto takes the committed dispatch table's choice at the nearest measured size
    # (common/dispatch.py), a baseline where none of ours won there (eager at this 1024→4096
    # M=4096 case on the H200, 117.2 against 117.0 µs): what plan() says
    from fusedmlp.torch_impl import plan

    chosen = plan(MLPSpec.from_json(spec.read_text()), (4096, 1024), impl="auto", device="cuda")
    assert rows["torch:auto"]["chosen"] == chosen.impl, chosen.reason
    # The same cuBLAS-class MLP either way: device times within a factor of 3 of each other.
    t, j = rows["torch:eager"]["time"]["median"], rows["jax:xla"]["time"]["median"]
    assert t / 3 < j < 3 * t
