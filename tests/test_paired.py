"""`fusedmlp bench --paired`: auto against its stack's baselines in interleaved rounds
(bench/paired.py), the ratio taken inside each round."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fusedmlp.bench import paired
from fusedmlp.bench.benchmark import pair_rows
from fusedmlp.bench.cli import main
from fusedmlp.bench.providers import Provider
from fusedmlp.bench.report import bench_tables, paired_table
from fusedmlp.common import MLPSpec
from helpers import CLI_TINY_SPEC, one_point_table


def test_rounds_are_palindromes_with_a_rotating_start_after_a_warm_one():
    order: list[str] = []

    def sampler(name: str):
        return lambda: order.append(name) or float(len(order))

    samples = paired.interleave({n: sampler(n) for n in "abc"}, rounds=4, warm_rounds=0)
    assert "".join(order) == "abccba" + "bcaacb" + "cabbac" + "abccba"
    # each round's value is the mean of the contender's two samples there (their positions here)
    assert samples["a"] == [(1 + 6) / 2, (9 + 10) / 2, (14 + 17) / 2, (19 + 24) / 2]
    order.clear()
    samples = paired.interleave({n: sampler(n) for n in "abc"}, rounds=2)  # the default warm round
    assert paired.WARM_ROUNDS == 1 and "".join(order) == "abccba" * 2 + "bcaacb"
    assert samples["a"] == [(7 + 12) / 2, (15 + 16) / 2]  # the warm round's samples are not kept
    with pytest.raises(ValueError, match="rounds: expected >= 1, got 0"):
        paired.interleave({"a": lambda: 1.0}, rounds=0)


def test_drift_between_rounds_and_a_linear_one_inside_cancel_in_the_ratio():
    """Each sample runs 10 % slower than the one before (a clock drifting through the run): rows
    timed one after another would carry it, yet inside each palindromic round every contender's
    two samples sit symmetrically, so the ratios are exactly 1.25 and 1.5."""
    clock = iter(range(1000))
    base_time = {"ours": 10.0, "eager": 12.5, "compile": 15.0}

    def sampler(name: str):
        return lambda: base_time[name] * (1 + 0.1 * next(clock))

    samples = paired.interleave({n: sampler(n) for n in base_time}, rounds=3)
    assert samples["ours"][2] > 1.5 * samples["ours"][0]  # the drift itself, rounds apart
    ratio = paired.ratios(samples, "ours", ["eager", "compile"])
    assert ratio["eager"]["per_round"] == pytest.approx([1.25] * 3)
    assert ratio["compile"]["per_round"] == pytest.approx([1.5] * 3)
    assert ratio[paired.BEST]["per_round"] == pytest.approx([1.25] * 3)  # the fastest baseline
    assert ratio["eager"]["ci95"] == pytest.approx([1.25, 1.25])
    with pytest.raises(ValueError, match="baselines: expected at least one"):
        paired.ratios(samples, "ours", [])
    # one baseline: no separate "best"
    assert set(paired.ratios(samples, "ours", ["eager"])) == {"eager"}


def test_pair_rows_times_auto_and_each_baseline_per_stack_on_the_cpu():
    """Real samplers on the CPU's host clock, each contender a different amount of work: the
    ratios come out in the work's order (a mix-up of the callables would read ~1), every round
    records every contender, and a stack without a timed baseline says why it has no pair."""
    a = np.ones((160, 160), np.float32)

    def work(reps: int):
        return lambda i: [a @ a for _ in range(reps)][-1]

    timed = {
        Provider("torch", "auto", False): ("triton", work(1)),
        Provider("torch", "eager", True): ("eager", work(16)),
        Provider("torch", "compile", True): ("compile", work(6)),
        Provider("jax", "auto", False): ("xla", work(1)),  # no JAX baseline timed: no pair
    }
    said: list[str] = []
    pair, jax = pair_rows("cpu", timed, rounds=3, calls=7, on_pair=said.append)
    assert said == ["torch: paired rounds (1 + 3 of 3 contenders × 2 × 7 calls)"]  # the bar's text
    assert jax == {"stack": "jax", "skipped": jax["skipped"]} and "a baseline" in jax["skipped"]
    assert pair["stack"] == "torch" and pair["ours"] == "torch:auto" and pair["chosen"] == "triton"
    assert pair["baselines"] == ["torch:eager", "torch:compile"]
    assert pair["method"] == "host clock, synchronised"
    assert (pair["rounds"], pair["calls"], pair["warm_rounds"]) == (3, 7, paired.WARM_ROUNDS)
    times = pair["time"]
    assert all(len(times[n]["per_round"]) == 3 for n in times)
    for name in pair["baselines"]:
        theirs, ours = times[name]["per_round"], times["torch:auto"]["per_round"]
        per_round = [t / o for t, o in zip(theirs, ours, strict=True)]
        assert pair["ratio"][name]["per_round"] == pytest.approx(per_round)
    ratio = {name: r["median"] for name, r in pair["ratio"].items()}
    assert ratio["torch:eager"] > ratio["torch:compile"] > 2  # 16 and 6 products against 1
    assert ratio[paired.BEST] == ratio["torch:compile"]  # compile is every round's fastest
    assert times[paired.BEST]["per_round"] == times["torch:compile"]["per_round"]

    # the report's table: one line per baseline and "best" (its own time), a skipped stack's why
    case = {"preset": "cpu-small", "m": 64, "paired": [pair, jax, {"stack": "x", "error": "boom"}]}
    table = paired_table([case])
    assert [r[2] for r in table.rows] == ["torch:eager", "torch:compile", "best", "-", "-"]
    assert table.rows[0][1] == "torch:auto → triton" and table.rows[0][-1] == "3 × 7"
    assert table.rows[2][4] == table.rows[1][4]  # best's time: the rounds' fastest, compile here
    assert table.rows[3][-1].startswith("skipped: no timed row") and table.rows[4][-1] == "boom"
    assert len(table.rows[-1]) == len(table.headers) == len(table.rows[0])
    assert paired_table([{"preset": "x", "m": 1}]) is None


def test_each_contender_is_called_twice_a_round_after_the_warm_round():
    calls: dict[str, int] = {"ours": 0, "base": 0}

    def counting(name: str):
        def fn(i: int) -> None:
            calls[name] += 1

        return fn

    result = paired.pair_stack(
        "torch", "cpu", ("ours", "x", counting("ours")), {"base": counting("base")},
        lambda out: None, rounds=3, calls=4,
    )  # fmt: skip
    # each sample: 3 untimed calls (timing.warmup's least) and 4 timed ones, two samples a round
    samples = (3 + paired.WARM_ROUNDS) * 2
    assert calls == {"ours": samples * (3 + 4), "base": samples * (3 + 4)}
    assert set(result["ratio"]) == {"base"} and paired.BEST not in result["time"]


def test_a_failed_pairing_says_why_and_keeps_the_rows():
    def broken(i):
        raise RuntimeError("no device")

    timed = {
        Provider("jax", "auto", False): ("pallas_triton", broken),
        Provider("jax", "xla", True): ("xla", lambda i: np.zeros(1)),
    }
    assert pair_rows("cpu", timed, rounds=2) == [
        {"stack": "jax", "error": "RuntimeError: no device"}
    ]


def test_cli_refuses_a_bad_paired_argument(capsys):
    for argv, why in [
        (["bench", "--paired", "0"], "expected a positive int, got 0"),
        (["bench", "--paired", "x"], "expected a positive int, got 'x'"),
        (["bench", "--backward", "--paired", "3"], "--paired: not with --backward"),
        (["bench", "--paired-calls", "50"], "--paired-calls: only with --paired"),
        (["bench", "--paired", "3", "--paired-calls", "0"], "expected a positive int, got 0"),
        (["bench", "--paired", "3", "--derive-auto"], "--paired: not with --derive-auto"),
    ]:
        with pytest.raises(SystemExit) as err:
            main(argv)
        assert err.value.code == 2
        assert why in capsys.readouterr().err


def test_bench_without_paired_has_no_table():
    bench = {
        "ceilings": {"matmul": {}, "copy": 1e12},
        "cases": [],
    }
    assert [t.title for t in bench_tables(bench)] == ["Ceilings (measured in this run)"]


def test_bench_pairs_auto_end_to_end_where_auto_is_timed(
    spec_file: Path, tmp_path: Path, torch_table, no_cli_faults
):
    """On a CPU `auto` is timed only where it runs a baseline: a table sends it to eager here, so
    `bench --paired 2` pairs torch's auto (→ eager) with eager and compile; JAX's auto (an
    interpreted kernel, not timed) is left unpaired, and says so."""
    m = 9
    torch_table(one_point_table(MLPSpec(**CLI_TINY_SPEC), ("eager", "triton"), m))
    out = tmp_path / "bench.json"
    argv = ["bench", "--device", "cpu", "--quick", "--spec", str(spec_file), "--m", str(m)]
    paired_args = ["--paired", "2", "--paired-calls", "5"]
    assert main([*argv, "--impl", "baselines,auto", *paired_args, "--json", str(out)]) == 0
    [case] = json.loads(out.read_text())["bench"]["cases"]
    pair, jax = case["paired"]
    assert jax["stack"] == "jax" and "no timed row of auto" in jax["skipped"]
    assert (pair["stack"], pair["ours"], pair["chosen"]) == ("torch", "torch:auto", "eager")
    assert pair["baselines"] == ["torch:eager", "torch:compile"]
    assert (pair["rounds"], pair["calls"]) == (2, 5)
    # auto → eager and eager are one function: their ratio is of the order of 1 (a host clock on a
    # shared 2-core machine, 5 calls a sample: loose bounds); the workloads' order is the CPU test's
    assert 0.2 < pair["ratio"]["torch:eager"]["median"] < 5.0
    assert case["rows"] and all("_fn" not in r for r in case["rows"])


@pytest.mark.parametrize(
    "n, ranks",
    [
        (5, (1, 5)),
        (8, (1, 8)),
        (9, (2, 8)),
        (11, (2, 10)),
        (15, (4, 12)),
        (21, (6, 16)),
        (30, (10, 21)),
    ],
)
def test_the_medians_interval_takes_the_binomial_ranks(n, ranks):
    """The ranks of the distribution-free 95 % interval of a median (the textbook table: the 6th
    and 16th of 21 values; the whole range up to 8 values)."""
    values = [float(v) for v in range(n, 0, -1)]
    assert paired.median_interval(values) == tuple(map(float, ranks))


def test_paired_calls_default_to_about_a_rows_length(monkeypatch):
    """`--paired N` alone runs DEFAULT_CALLS (80) calls a sample; `--paired-calls` overrides."""
    from fusedmlp.bench import benchmark

    seen: list[tuple[int, int]] = []

    def fake_run_bench(items, providers, device, **kwargs):
        seen.append((kwargs["paired_rounds"], kwargs["paired_calls"]))
        assert callable(kwargs["on_pair"])  # the progress bar names the pairing phase
        return {"ceilings": {"matmul": {}, "copy": 1e12}, "cases": []}

    monkeypatch.setattr(benchmark, "run_bench", fake_run_bench)
    assert main(["bench", "--device", "cpu", "--paired", "3"]) == 0
    assert main(["bench", "--device", "cpu", "--paired", "3", "--paired-calls", "9"]) == 0
    assert main(["bench", "--device", "cpu"]) == 0
    assert seen == [(3, paired.DEFAULT_CALLS), (3, 9), (0, paired.DEFAULT_CALLS)]
    assert paired.DEFAULT_CALLS == 80


@pytest.mark.gpu
def test_pairing_on_the_gpu_reads_device_time_and_orders_the_work():
    """The GPU sampler (timing.time_device: CUPTI, an L2 flush before every call): a matmul 8
    times against once reads a ratio well above 1, and the method names the profiler."""
    import torch

    a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)

    def work(reps: int):
        def fn(i: int):
            out = a
            for _ in range(reps):
                out = a @ a
            return out

        return fn

    timed = {
        Provider("torch", "auto", False): ("triton", work(1)),
        Provider("torch", "eager", True): ("eager", work(8)),
    }
    for fn in (work(1), work(8)):  # warm, as the rows leave them
        fn(0)
    torch.cuda.synchronize()
    [pair] = pair_rows("cuda", timed, rounds=3, calls=10)
    assert "CUPTI" in pair["method"] and "flush" in pair["method"], pair["method"]
    assert 4 < pair["ratio"]["torch:eager"]["median"] < 12, pair["ratio"]
