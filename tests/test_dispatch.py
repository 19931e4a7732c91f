"""The measured dispatch table (common/dispatch.py): derivation, ranges, minimax, lookup."""

from __future__ import annotations

import pytest

from fusedmlp.common import MLPSpec
from fusedmlp.common.dispatch import (
    Measurement,
    Table,
    derive,
    gpu_slug,
    load_table,
    measurements_from_bench,
    shape_class,
)

LLAMA = MLPSpec((4096, 14336, 4096), "swiglu", bias=False, dtype="bfloat16")
BLOG = MLPSpec((768, 3072, 768), "geglu_tanh", bias=False, dtype="bfloat16")
NERF = MLPSpec((64,) * 6, "relu", bias=False, dtype="float16")


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
    assert [(e.m_min, e.m_max, e.impl) for e in table.entries] == [
        (1, 362, "fused_decode"),  # floor(sqrt(16 * 8192)) = 362
        (363, 2**62 - 1, "triton_tma"),
    ]
    assert "fused_decode 85.0 µs vs eager 111.0 µs" in table.entries[0].evidence
    assert table.lookup("torch", LLAMA, 1).impl == "fused_decode"
    assert table.lookup("torch", LLAMA, 363).impl == "triton_tma"
    assert table.lookup("jax", LLAMA, 16) is None  # the other stack was not measured
    assert table.lookup("torch", LLAMA.replace(dtype="float16"), 16) is None


def test_derive_is_minimax_over_presets_of_one_class():
    # triton_tma wins llama by a little and loses the blog case by a lot: eager is the safe pick.
    data = rows(LLAMA, 8192, "llama3-8b", triton_tma=3800, eager=3950) + rows(
        BLOG, 8192, "hf-blog-geglu", triton_tma=400, eager=240
    )
    (entry,) = derive(data, gpu="g", source="s").entries
    assert entry.impl == "eager"
    assert "hf-blog-geglu" in entry.evidence and "llama3-8b" in entry.evidence


def test_derive_merges_neighbouring_ranges_with_the_same_choice():
    data = [r for m in (1, 4, 16, 64) for r in rows(LLAMA, m, "l", fused_decode=80, eager=110)]
    (entry,) = derive(data, gpu="g", source="s").entries
    assert (entry.m_min, entry.m_max, entry.impl) == (1, 2**62 - 1, "fused_decode")
    assert entry.evidence.count("M=") == 4


def test_table_json_round_trip_and_missing_file(tmp_path):
    table = derive(rows(NERF, 2_097_152, "nerf", fused_small=140, eager=1680), gpu="G", source="x")
    again = Table.from_json(table.to_json())
    assert again == table
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


def test_fronts_take_the_measured_choice(monkeypatch, tmp_path):
    """With a table for "this GPU", both fronts' `auto` run its choice and quote the evidence;
    a choice that cannot take the problem (fused_small on wide layers) is passed over."""
    import torch

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
    table = derive(data, gpu="Test GPU", source="test")
    monkeypatch.setattr(dispatch, "load_table", lambda name: table if name == "Test GPU" else None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tfront, "_gpu_name", lambda: "Test GPU")
    monkeypatch.setattr(jfront, "_gpu_name", lambda: "Test GPU")
    monkeypatch.setattr(jfront.compat, "on_gpu", lambda: True)

    tplan = tfront.plan(spec, (64, 96), device="cuda")
    assert tplan.impl == "eager"
    assert "measured on Test GPU" in tplan.reason and "eager 50.0 µs" in tplan.reason
    jplan = jfront.plan(spec, (64, 96), device="gpu")
    assert jplan.impl == "xla" and "measured on Test GPU" in jplan.reason

    # A measured choice that cannot take the problem falls through to the static order.
    bad = Table(
        "Test GPU",
        "test",
        (dispatch.Entry("torch", "float32", "mlp2-gated", 1, 10**9, "fused_small", "made up"),),
    )
    monkeypatch.setattr(dispatch, "load_table", lambda name: bad)
    monkeypatch.setattr(tfront, "_is_hopper", lambda: False)
    assert tfront.plan(spec, (64, 96), device="cuda").impl != "fused_small"


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
