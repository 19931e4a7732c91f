"""The measured dispatch table (common/dispatch.py): derivation, ranges, minimax, lookup."""

from __future__ import annotations

import json
import math
import re

import pytest

from fusedmlp.common import MLPSpec
from fusedmlp.common.dispatch import (
    KERNELS,
    SIZE_MERGE,
    TRAIN_REACH,
    Measurement,
    Point,
    Table,
    derive,
    generation,
    gpu_slug,
    load_table,
    measurements_from_bench,
    measurements_from_bench_backward,
    newest_cases,
    shape_class,
    training_baseline,
    training_points_off,
    weight_bytes,
    with_phase,
)

LLAMA = MLPSpec((4096, 14336, 4096), "swiglu", bias=False, dtype="bfloat16")
BLOG = MLPSpec((768, 3072, 768), "geglu_tanh", bias=False, dtype="bfloat16")
NERF = MLPSpec((64,) * 6, "relu", bias=False, dtype="float16")
GPT2 = MLPSpec((768, 3072, 768), "gelu_tanh", bias=True, dtype="bfloat16")
GPT_MLP = MLPSpec((4096, 16384, 4096), "gelu_tanh", bias=True, dtype="bfloat16")
GEMMA = MLPSpec((2048, 16384, 2048), "geglu_tanh", bias=False, dtype="bfloat16")


def rows(spec, m, label, **times_us):
    return [
        Measurement("torch", impl, impl in ("eager", "compile"), spec, m, t * 1e-6, label)
        for impl, t in times_us.items()
    ]


def bench_row(stack: str, impl: str, status: str = "timed", **measured) -> dict:
    """One row of a saved bench case, as the CLI writes it (the baselines flagged)."""
    baseline = impl in ("eager", "compile", "xla")
    return {"stack": stack, "impl": impl, "baseline": baseline, "status": status, **measured}


def bench_case(spec: MLPSpec, m: int, *case_rows: dict, preset: str = "llama3-8b") -> dict:
    return {"preset": preset, "m": m, "spec": spec.to_dict(), "rows": list(case_rows)}


def test_shape_class():
    assert shape_class(LLAMA) == "mlp2-gated"
    assert shape_class(NERF) == "narrow"
    assert shape_class(MLPSpec((256, 512, 512, 256), "relu", bias=True, dtype="float32")) == "deep"
    assert gpu_slug("NVIDIA H200") == "nvidia-h200"
    assert gpu_slug(" NVIDIA H100 80GB HBM3 ") == "nvidia-h100-80gb-hbm3"


def test_derive_picks_fastest_and_splits_m_at_geometric_midpoints():
    data = rows(LLAMA, 16, "llama3-8b", fused_decode=85, triton=230, eager=111) + rows(
        LLAMA, 8192, "llama3-8b", fused_decode=9e9, triton_tma=3600, eager=3950
    )
    table = derive(data, gpu="NVIDIA H200", source="test")
    size = weight_bytes(LLAMA)
    assert [(p.m, p.weight_bytes, p.impl) for p in table.points] == [
        (16, size, "fused_decode"),
        (8192, size, "triton_tma"),
    ]
    assert table.points[0].ranking == (("fused_decode", 1.0), ("eager", 1.3059), ("triton", 2.7059))
    assert "fused_decode 85.0 µs vs eager 111.0 µs" in table.points[0].evidence
    # one size: the M axis splits at the geometric midpoint, floor(sqrt(16 * 8192)) = 362
    assert table.lookup("torch", LLAMA, 1).impl == "fused_decode"
    assert table.lookup("torch", LLAMA, 362).impl == "fused_decode"
    assert table.lookup("torch", LLAMA, 363).impl == "triton_tma"
    assert table.lookup("torch", LLAMA, 10**6).impl == "triton_tma"
    assert table.lookup("jax", LLAMA, 16) is None  # the other stack was not measured
    assert table.lookup("torch", LLAMA.replace(dtype="float16"), 16) is None
    assert table.lookup("torch", GPT_MLP, 16) is None  # another class


def test_derive_is_minimax_over_presets_of_one_point():
    # Two gated presets within SIZE_MERGE of each other at one M are one point: triton_tma wins
    # llama by a little and loses the Gemma-sized case by a lot, so eager is the safe pick.
    assert weight_bytes(LLAMA) < SIZE_MERGE * weight_bytes(GEMMA)
    data = rows(LLAMA, 8192, "llama3-8b", triton_tma=3800, eager=3950) + rows(
        GEMMA, 8192, "gemma", triton_tma=4000, eager=2400
    )
    (point,) = derive(data, gpu="g", source="s").points
    assert point.impl == "eager"
    assert "gemma" in point.evidence and "llama3-8b" in point.evidence
    geo = math.sqrt(weight_bytes(LLAMA) * weight_bytes(GEMMA))
    assert point.weight_bytes == pytest.approx(geo, abs=1)


def test_derive_chooses_per_size_within_a_class():
    """GPT-2's MLP (9.4 MB) and gpt-mlp (268 MB) are both `mlp2`: each size gets its own points,
    so the big GEMM's winner no longer decides for the small one (issue 23)."""
    assert shape_class(GPT2) == shape_class(GPT_MLP) == "mlp2"
    data = (
        rows(GPT2, 1, "gpt2-mlp", fused_decode=10, mosaic=29, compile=12.8)
        + rows(GPT2, 16, "gpt2-mlp", fused_decode=11, mosaic=29, compile=13.5)
        + rows(GPT2, 512, "gpt2-mlp", triton_tma=30, mosaic=34, compile=19)
        + rows(GPT2, 4096, "gpt2-mlp", triton_tma=70, mosaic=84, compile=74)
        + rows(GPT_MLP, 8192, "gpt-mlp", triton_tma=3400, mosaic=3366, eager=3409, compile=3500)
    )
    table = derive(data, gpu="g", source="s")
    assert [(p.m, p.impl) for p in table.points] == [
        (1, "fused_decode"),
        (16, "fused_decode"),
        (512, "compile"),
        (4096, "triton_tma"),
        (8192, "mosaic"),
    ]
    pick = {m: table.lookup("torch", GPT2, m).impl for m in (1, 16, 90, 91, 512, 4096, 8192)}
    assert pick == {
        1: "fused_decode",
        16: "fused_decode",
        90: "fused_decode",  # sqrt(16 * 512) = 90.5
        91: "compile",
        512: "compile",
        4096: "triton_tma",
        8192: "triton_tma",  # GPT-2's own 4096 point, not gpt-mlp's 8192 one
    }
    assert table.lookup("torch", GPT_MLP, 8192).impl == "mosaic"
    assert table.lookup("torch", GPT_MLP, 4096).impl == "mosaic"


def test_float32_points_are_per_precision():
    # TF32 products are another race than IEEE ones (cuBLAS's TF32 GEMMs ran 6x its IEEE
    # ones): each precision gets points of its own, and a call finds its own precision's only.
    ieee, tf32 = (
        LLAMA.replace(dtype="float32"),
        LLAMA.replace(dtype="float32", fp32_precision="tf32"),
    )
    data = rows(ieee, 2048, "llama3-8b", triton_tma=9300, eager=11300) + rows(
        tf32, 2048, "llama3-8b", triton_tma=6100, eager=1500
    )
    table = derive(data, gpu="G", source="s")
    assert [(p.fp32_precision, p.impl) for p in table.points] == [
        ("ieee", "triton_tma"), ("tf32", "eager")
    ]  # fmt: skip
    assert table.lookup("torch", ieee, 2048).impl == "triton_tma"
    assert table.lookup("torch", tf32, 4096).impl == "eager"
    assert ", float32 products tf32:" in table.lookup("torch", tf32, 2048).evidence
    assert ", float32 products ieee (this call" in table.lookup("torch", ieee, 4096).evidence
    assert table.lookup("torch", LLAMA, 2048) is None  # bfloat16: not measured
    again = Table.from_json(table.to_json())
    assert again == table
    assert json.loads(table.to_json())["points"][1]["fp32_precision"] == "tf32"
    assert "fp32_precision" not in json.loads(table.to_json())["points"][0]  # IEEE: as before
    only_ieee = Table("G", "s", table.points[:1])
    assert only_ieee.lookup("torch", tf32, 2048) is None  # the static order decides, not IEEE's


def test_lookup_is_nearest_in_m_and_size_and_says_which_point():
    data = (
        rows(GPT2, 16, "gpt2-mlp", fused_decode=11, compile=13.5)
        + rows(GPT2, 4096, "gpt2-mlp", triton_tma=70, compile=74)
        + rows(GPT_MLP, 16, "gpt-mlp", fused_decode=80, compile=70)
        + rows(GPT_MLP, 8192, "gpt-mlp", mosaic=3366, eager=3409)
    )
    table = derive(data, gpu="g", source="s")
    exact = table.lookup("torch", GPT2, 16)
    assert exact.impl == "fused_decode"
    assert exact.evidence.startswith("measured at M=16, 9.4 MB of weights: gpt2-mlp:")
    assert exact.point.m == 16 and exact.point.weight_bytes == weight_bytes(GPT2)
    # a size between the two: 2048→8192 (67 MB) is nearer gpt-mlp (268 MB) in log2 than GPT-2
    mid = MLPSpec((2048, 8192, 2048), "gelu_tanh", bias=True, dtype="bfloat16")
    near = table.lookup("torch", mid, 16)
    assert near.impl == "compile" and near.point.weight_bytes == weight_bytes(GPT_MLP)
    assert near.evidence.startswith(
        "nearest measured point M=16, 268.5 MB of weights (this call: M=16, 67.1 MB):"
    )
    # outside every measured size and M: the nearest point still answers, and says so
    tiny = MLPSpec((256, 512, 256), "gelu_tanh", bias=True, dtype="bfloat16")
    assert table.lookup("torch", tiny, 1).point.m == 16
    assert table.lookup("torch", tiny, 1).impl == "fused_decode"
    huge = MLPSpec((8192, 32768, 8192), "gelu_tanh", bias=True, dtype="bfloat16")
    assert table.lookup("torch", huge, 65536).impl == "mosaic"
    assert "nearest measured point M=8192" in table.lookup("torch", huge, 65536).evidence
    # in (M, size) both count: GPT-2's size at M=2048 is nearer its own 4096 point than 16's
    assert table.lookup("torch", GPT2, 2048).point.m == 4096


def test_lookup_ties_go_to_the_smaller_m():
    data = rows(GPT2, 16, "a", fused_decode=1, compile=2) + rows(GPT2, 256, "a", compile=1)
    table = derive(data, gpu="g", source="s")
    assert table.lookup("torch", GPT2, 64).impl == "fused_decode"  # log2: 2 from both
    assert table.lookup("torch", GPT2, 65).impl == "compile"


def test_lookup_accept_takes_the_next_of_the_ranking():
    data = rows(GPT2, 16, "gpt2-mlp", fused_decode=10, compile=12, mosaic=29)
    table = derive(data, gpu="g", source="s")
    got = table.lookup("torch", GPT2, 90, accept=lambda impl: impl != "fused_decode")
    assert got.impl == "compile"
    assert "fused_decode cannot take this call, so compile" in got.evidence
    assert "1.200x the best" in got.evidence
    assert table.lookup("torch", GPT2, 16, accept=lambda impl: False) is None


FORMAT1 = """{
 "gpu": "NVIDIA H200",
 "source": "fusedmlp bench at commit 6d6ff60f5c",
 "entries": [
  {"stack": "torch", "dtype": "bfloat16", "shape_class": "mlp2-gated", "m_min": 1, "m_max": 32,
   "impl": "fused_decode", "evidence": "M=16: llama3-8b: fused_decode 97.7 \\u00b5s"},
  {"stack": "torch", "dtype": "bfloat16", "shape_class": "mlp2-gated", "m_min": 33,
   "m_max": 4611686018427387903, "impl": "mosaic", "evidence": "M=8192: llama3-8b: mosaic"}
 ]
}
"""


def test_format1_table_still_loads_and_looks_up_by_m_only(tmp_path):
    table = Table.from_json(FORMAT1)
    assert table.points == () and len(table.legacy) == 2
    for spec in (LLAMA, BLOG):  # any size: format 1 knew none
        got = table.lookup("torch", spec, 16)
        assert got.impl == "fused_decode" and "format-1 table" in got.evidence
        assert table.lookup("torch", spec, 33).impl == "mosaic"
    assert table.lookup("torch", LLAMA, 16, accept=lambda impl: False) is None
    assert table.lookup("jax", LLAMA, 16) is None
    assert Table.from_json(table.to_json()) == table
    (tmp_path / "nvidia-h200.json").write_text(FORMAT1)
    assert load_table("NVIDIA H200", tmp_path) == table
    with pytest.raises(ValueError, match="format must be 1 or 2, got 3"):
        Table.from_json('{"format": 3, "gpu": "g", "points": []}')


def _committed_tables() -> list[str]:
    from fusedmlp.common.dispatch import TABLE_DIR

    return sorted(path.name for path in TABLE_DIR.glob("*.json"))


def test_a_table_is_committed_for_each_gpu_measured():
    """The H200 (the issues' card) and the H100 (where the later sessions measured)."""
    assert _committed_tables() == ["nvidia-h100-80gb-hbm3.json", "nvidia-h200.json"]


@pytest.mark.parametrize("name", _committed_tables())
def test_committed_table_is_format_2(name: str):
    """Each committed table loads as measured points, each naming known names, for the GPU its
    file is named after, forward and training points both."""
    from fusedmlp.common.dispatch import FORMAT, TABLE_DIR, gpu_slug
    from fusedmlp.common.registry import impl_names

    path = TABLE_DIR / name
    assert json.loads(path.read_text())["format"] == FORMAT
    table = Table.from_json(path.read_text())
    assert f"{gpu_slug(table.gpu)}.json" == name
    assert table.points and not table.legacy
    for point in table.points:
        assert point.stack in ("torch", "jax")
        assert point.shape_class.removesuffix("-gated") in ("narrow", "mlp2", "deep")
        assert point.weight_bytes > 0 and point.m >= 1
        ours = (KERNELS,) if point.phase == "train" else ()
        assert {impl for impl, _ in point.ranking} <= {*impl_names(point.stack), *ours}
    assert {p.phase for p in table.points} == {"forward", "train"} and table.train_source


@pytest.mark.parametrize("name", _committed_tables())
def test_committed_table_is_what_derive_makes_of_its_results(name: str):
    """The committed table is `derive` of the committed results it names (source: '... at commit
    <hash>', results in bench/results/*-<hash[:7]>/), so no hand edit hides in it."""
    from pathlib import Path

    from fusedmlp.common.dispatch import TABLE_DIR

    table = Table.from_json((TABLE_DIR / name).read_text())
    root = Path(__file__).resolve().parents[1] / "bench" / "results"
    # the forward points: `fusedmlp bench` results of the commit(s) in `source` (several: oldest
    # first, a later run's case replacing an earlier one's — `fusedmlp derive-auto OLD NEW`)
    sections = []
    for commit in re.split(r",\s*", table.source.split(" at commit", 1)[1].split(" ", 1)[1]):
        # every results file of that run with a bench section, in name order
        found = [json.loads(f.read_text()) for f in sorted(root.glob(f"*-{commit[:7]}/*.json"))]
        found = [f["bench"] for f in found if isinstance(f, dict) and "bench" in f]
        assert found, f"no bench results in bench/results/*-{commit[:7]}/ for {table.source!r}"
        sections.extend(found)
    bench = {"cases": newest_cases(sections)}
    again = derive(measurements_from_bench(bench), gpu=table.gpu, source=table.source)
    assert again.points == tuple(p for p in table.points if p.phase == "forward")
    # the training points: `bench --backward` results of the commit(s) in `train_source`, the same
    # way (a later run's case replacing an earlier one's)
    sections = []
    for commit in re.split(r",\s*", table.train_source.split(" at commit", 1)[1].split(" ", 1)[1]):
        files = sorted(root.glob(f"*-{commit[:7]}/**/bench_backward*.json"))
        assert files, f"no bench/results/*-{commit[:7]}/**/bench_backward*.json"
        sections.extend(json.loads(f.read_text())["bench_backward"] for f in files)
    rows = measurements_from_bench_backward({"cases": newest_cases(sections)})
    trained = derive(rows, gpu=table.gpu, source=table.train_source, phase="train")
    assert set(trained.points) == {p for p in table.points if p.phase == "train"}


def test_newest_cases_replace_older_ones_of_the_same_spec_and_m():
    """A partial rerun updates the points it measured; the older run keeps the rest."""
    old = {
        "cases": [
            {"spec": {"a": 1}, "m": 16, "run": "old"},
            {"spec": {"a": 2}, "m": 8, "run": "old"},
        ]
    }
    new = {
        "cases": [
            {"spec": {"a": 1}, "m": 16, "run": "new"},
            {"spec": {"a": 1}, "m": 64, "run": "new"},
        ]
    }
    got = [(c["spec"]["a"], c["m"], c["run"]) for c in newest_cases([old, new])]
    assert got == [(2, 8, "old"), (1, 16, "new"), (1, 64, "new")]


def test_table_json_round_trip_and_missing_file(tmp_path):
    table = derive(rows(NERF, 2_097_152, "nerf", fused_small=140, eager=1680), gpu="G", source="x")
    again = Table.from_json(table.to_json())
    assert again == table
    assert '["fused_small", 1.0]' in table.to_json()  # one line per ranked implementation
    (tmp_path / "nvidia-h200.json").write_text(table.to_json())
    assert load_table("NVIDIA H200", tmp_path) == table
    assert load_table("Some Other GPU", tmp_path) is None


def test_measurements_from_bench_keeps_timed_rows_only():
    bench = {
        "cases": [
            bench_case(
                LLAMA,
                16,
                bench_row("torch", "eager", time={"median": 111e-6}),
                bench_row("torch", "auto", time={"median": 90e-6}),
                bench_row("torch", "triton", "invalid measurement", time={"median": 1e-6}),
                bench_row("jax", "xla", device_s=97e-6),
            )
        ]
    }
    got = measurements_from_bench(bench)
    assert [(m.stack, m.impl, m.seconds) for m in got] == [
        ("torch", "eager", pytest.approx(111e-6)),
        ("jax", "xla", pytest.approx(97e-6)),
    ]


def _on_a_test_gpu(monkeypatch, table: Table) -> None:
    """Both fronts as on a GPU named "Test GPU" whose committed dispatch table is `table`."""
    import torch

    from fusedmlp.common import dispatch
    from fusedmlp.jax_impl import front as jfront
    from fusedmlp.torch_impl import front as tfront

    monkeypatch.setattr(dispatch, "load_table", lambda name: table if name == table.gpu else None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tfront, "_gpu_name", lambda: table.gpu)
    monkeypatch.setattr(jfront, "_gpu_name", lambda: table.gpu)
    monkeypatch.setattr(jfront.compat, "on_gpu", lambda: True)


def test_fronts_take_the_measured_choice(monkeypatch, tmp_path):
    """With a table for "this GPU", both fronts' `auto` run its choice and quote the evidence;
    a choice that cannot take the problem (fused_small on wide layers) is passed over."""
    from fusedmlp.common import dispatch
    from fusedmlp.jax_impl import front as jfront
    from fusedmlp.torch_impl import front as tfront

    spec = MLPSpec((96, 256, 96), "swiglu", bias=True, dtype="float32")
    data = [
        Measurement("torch", "eager", True, spec, 64, 50e-6, "cpu-small"),
        Measurement("torch", "triton", False, spec, 64, 90e-6, "cpu-small"),
        Measurement("jax", "xla", True, spec, 64, 40e-6, "cpu-small"),
        Measurement("jax", "pallas_triton", False, spec, 64, 80e-6, "cpu-small"),
    ]
    _on_a_test_gpu(monkeypatch, derive(data, gpu="Test GPU", source="test"))

    tplan = tfront.plan(spec, (64, 96), device="cuda")
    assert tplan.impl == "eager"
    assert "measured on Test GPU: measured at M=64, 297.3 kB of weights" in tplan.reason
    assert "eager 50.0 µs" in tplan.reason
    jplan = jfront.plan(spec, (64, 96), device="gpu")
    assert jplan.impl == "xla" and "measured on Test GPU" in jplan.reason
    # another M: the plan names the measured point it used, and the call's own (M, size)
    near = tfront.plan(spec, (200, 96), device="cuda")
    assert near.impl == "eager"
    assert (
        "nearest measured point M=64, 297.3 kB of weights, float32 products ieee (this call: M=200"
        in near.reason
    )

    # A measured choice that cannot take the problem (fused_small on wide layers) gives way to
    # the next of the point's ranking; with none left, the static order applies.
    size = weight_bytes(spec)
    ranked = (("fused_small", 1.0), ("eager", 1.3))
    point = Point("torch", "float32", "mlp2-gated", 64, size, ranked, "made up")
    monkeypatch.setattr(dispatch, "load_table", lambda name: Table("Test GPU", "t", (point,)))
    monkeypatch.setattr(tfront, "_is_hopper", lambda: False)
    again = tfront.plan(spec, (64, 96), device="cuda")
    assert again.impl == "eager" and "fused_small cannot take this call" in again.reason
    alone = Point("torch", "float32", "mlp2-gated", 64, size, ranked[:1], "made up")
    monkeypatch.setattr(dispatch, "load_table", lambda name: Table("Test GPU", "t", (alone,)))
    assert tfront.plan(spec, (64, 96), device="cuda").impl != "fused_small"


def test_float32_without_its_point_runs_the_baseline_on_a_gpu(monkeypatch):
    """float32 on a GPU whose table has no float32 point of the call's precision: both fronts'
    `auto` run their stack's baseline and say why (our float32 GEMMs' one measurement lost to
    cuBLAS); a float32 point decides as any other; 16-bit calls and CPUs keep the static order."""
    from fusedmlp.common import dispatch
    from fusedmlp.jax_impl import front as jfront
    from fusedmlp.torch_impl import front as tfront

    ieee = MLPSpec((96, 256, 96), "swiglu", bias=True, dtype="float32")
    tf32 = ieee.replace(fp32_precision="tf32")
    data = [  # (a baseline first: this CPU's tests interpret the kernels, which a GPU call refuses)
        Measurement("torch", "compile", True, ieee, 256, 40e-6, "cpu-small"),
        Measurement("torch", "eager", True, ieee, 256, 50e-6, "cpu-small"),
    ]
    _on_a_test_gpu(monkeypatch, derive(data, gpu="Test GPU", source="test"))
    monkeypatch.setattr(tfront, "_is_hopper", lambda: True)

    assert tfront.plan(ieee, (256, 96), device="cuda").impl == "compile"  # its point
    plan = tfront.plan(tf32, (256, 96), device="cuda")
    assert plan.impl == "eager" and dispatch.FLOAT32_UNMEASURED in plan.reason
    jplan = jfront.plan(tf32, (256, 96), device="gpu")
    assert jplan.impl == "xla" and dispatch.FLOAT32_UNMEASURED in jplan.reason
    monkeypatch.setattr(tfront, "unavailable_reason", lambda impl, device="cpu": None)
    bf16 = ieee.replace(dtype="bfloat16")
    assert tfront.plan(bf16, (256, 96), device="cuda").impl == "triton_tma"  # no rule for 16-bit
    assert tfront.plan(tf32, (256, 96), device="cpu").impl not in ("eager", "compile")


def test_cli_derive_auto_from_saved_results(tmp_path):
    import json

    from fusedmlp.bench.cli import main

    results = {
        "kind": "fusedmlp-results",
        "version": 1,
        "environment": {"gpus": [{"name": "NVIDIA H200"}], "git": {"commit": "abc1234def"}},
        "bench": {
            "cases": [
                bench_case(
                    LLAMA,
                    16,
                    bench_row("torch", "eager", time={"median": 111e-6}),
                    bench_row("torch", "fused_decode", time={"median": 88e-6}),
                )
            ]
        },
    }
    src = tmp_path / "results.json"
    src.write_text(json.dumps(results))
    out = tmp_path / "nvidia-h200.json"
    assert main(["derive-auto", str(src), "--out", str(out)]) == 0
    table = Table.from_json(out.read_text())
    assert table.gpu == "NVIDIA H200" and "abc1234def" in table.source
    assert table.lookup("torch", LLAMA, 16).impl == "fused_decode"


def test_bench_derive_auto_writes_the_table_and_retimes_auto(monkeypatch, tmp_path):
    """The whole `fusedmlp bench --derive-auto` flow on a CPU, the environment made to name a GPU:
    the table comes from the timed rows (baselines here), is installed, and the auto rows run
    again under it (the dispatch generation moves, so cached auto plans are not reused)."""
    import json

    from fusedmlp.bench import cli
    from fusedmlp.common import dispatch

    real_env = cli._results

    def with_gpu(section, payload):
        out = real_env(section, payload)
        out["environment"] = {**out["environment"], "gpus": [{"name": "Test GPU"}]}
        return out

    monkeypatch.setattr(cli, "_results", with_gpu)
    before = dispatch.generation()
    table_path = tmp_path / "test-gpu.json"
    json_path = tmp_path / "bench.json"
    args = ["bench", "--device", "cpu", "--preset", "cpu-small", "--impl", "eager,xla,auto"]
    code = cli.main([*args, "--quick", "--derive-auto", str(table_path), "--json", str(json_path)])
    assert code == 0
    table = Table.from_json(table_path.read_text())
    spec = MLPSpec.preset("cpu-small")
    assert table.gpu == "Test GPU"
    assert table.lookup("torch", spec, 64).impl == "eager"
    assert table.lookup("jax", spec, 64).impl == "xla"
    assert dispatch.generation() == before + 1
    saved = json.loads(json_path.read_text())["bench"]
    assert saved["auto_table"]["path"] == str(table_path)
    assert {r["provider"] for r in saved["cases"][0]["rows"]} >= {"torch:auto", "jax:auto"}


# ---- training points (bench --backward) ----------------------------------------------------------
def _backward_case(spec, m, preset, **times_ms):
    rows_ = [
        {"stack": stack, "impl": impl, "baseline": impl in ("eager", "compile", "xla"),
         "status": "timed", "time": {"median": t * 1e-3}}
        for key, t in times_ms.items()
        for stack, impl in [key.split("_", 1)]
    ]  # fmt: skip
    return {"preset": preset, "m": m, "spec": spec.to_dict(), "rows": rows_}


def test_training_points_decide_near_their_measurement_only():
    """`bench --backward` rows become training points (our path as KERNELS against the
    baselines); a stack without a timed `auto` row gives none; lookups of phase "train" take a
    point only within TRAIN_REACH, and forward lookups never see training points."""
    section = {
        "cases": [
            _backward_case(BLOG, 8192, "hf-blog-geglu", torch_auto=0.722, torch_compile=0.588,
                           torch_eager=0.677, jax_xla=0.582, jax_pallas_triton=0.831),
            _backward_case(NERF, 2_097_152, "nerf-64x5", torch_auto=1.76, torch_eager=3.30),
        ]
    }  # fmt: skip
    rows_ = measurements_from_bench_backward(section)
    assert {(r.stack, r.impl) for r in rows_} == {
        ("torch", KERNELS),
        ("torch", "compile"),
        ("torch", "eager"),
    }  # fmt: skip  (jax timed no auto row at hf-blog: no jax point)
    trained = derive(rows_, gpu="G", source="backward at commit abc", phase="train")
    assert {p.phase for p in trained.points} == {"train"}
    assert trained.train_source == "backward at commit abc" and trained.source == ""
    blog = trained.lookup("torch", BLOG, 8192, phase="train")
    assert blog.impl == "compile" and "compile 588.0 µs vs kernels 722.0 µs" in blog.evidence
    assert trained.lookup("torch", NERF, 2_097_152, phase="train").impl == KERNELS
    # within one octave in (log2 M, log2 bytes): taken; beyond: not (no extrapolation)
    assert trained.lookup("torch", BLOG, 8192 // 2, phase="train").impl == "compile"
    lm = MLPSpec((1024, 4096, 1024), "swiglu", bias=False, dtype="bfloat16")  # the byte LM's FFN
    assert blog.point.distance(4096, weight_bytes(lm)) > TRAIN_REACH
    assert trained.lookup("torch", lm, 4096, phase="train") is None
    assert trained.lookup("torch", BLOG, 8192) is None  # the forward phase has no points here
    # one file holds both phases: each derivation replaces its own phase's points
    forward = derive(rows(BLOG, 8192, "hf-blog-geglu", triton_tma=180, eager=220), gpu="G",
                     source="bench at commit def")  # fmt: skip
    both = with_phase(forward, trained, "train")
    assert both.source == "bench at commit def" and both.train_source == trained.train_source
    assert both.lookup("torch", BLOG, 8192).impl == "triton_tma"
    assert both.lookup("torch", BLOG, 8192, phase="train").impl == "compile"
    again = Table.from_json(both.to_json())
    assert again == both and '"phase": "train"' in both.to_json()
    refreshed = with_phase(
        both, derive(rows(BLOG, 8192, "b", eager=1), gpu="G", source="s2"), "forward"
    )
    assert refreshed.train_source == both.train_source
    assert refreshed.lookup("torch", BLOG, 8192).impl == "eager"
    assert refreshed.lookup("torch", BLOG, 8192, phase="train").impl == "compile"


def test_training_points_off_while_deriving():
    """Within `training_points_off` (what `bench --backward --derive-auto` times its `auto` rows
    under) no training point sends `auto` to a baseline, and the fronts' cached plans see a new
    generation on the way in and out."""
    section = {"cases": [_backward_case(BLOG, 8192, "hf-blog-geglu", torch_auto=0.722,
                                        torch_compile=0.588)]}  # fmt: skip
    table = derive(measurements_from_bench_backward(section), gpu="G", source="s", phase="train")
    take_any = lambda impl: True  # noqa: E731
    assert training_baseline(table, "torch", BLOG, 8192, take_any)[0] == "compile"
    before = generation()
    with training_points_off():
        assert training_baseline(table, "torch", BLOG, 8192, take_any) is None
        inside = generation()
    assert before < inside < generation()
    assert training_baseline(table, "torch", BLOG, 8192, take_any)[0] == "compile"
