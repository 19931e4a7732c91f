"""bench/sweep_triton.py (the forward Triton kernels' GPU sweep) end to end under the interpreter:
one GEMM (`--only`), its grid timed and checked, the tuned table written in common/tuning.py's
format and merged into a committed one (`--merge-into`: the entries it did not measure kept)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fusedmlp.common.config import TileConfig
from fusedmlp.common.tuning import FORMAT_VERSION

ROOT = Path(__file__).resolve().parents[1]


def test_sweep_smoke_only_one_gemm_merged_into_a_committed_table(tmp_path) -> None:
    committed = {
        "format": FORMAT_VERSION,
        "note": "a committed table",
        "entries": {"NVIDIA H200|triton_tma|gated|m=8192|n=3072|k=768|bfloat16|ieee": {"kept": 1}},
    }
    table = tmp_path / "committed.json"
    table.write_text(json.dumps(committed))
    out, tuned = tmp_path / "sweep.json", tmp_path / "tuned.json"
    cmd = [sys.executable, str(ROOT / "bench" / "sweep_triton.py"), str(out), "--smoke",
           "--only", "no such GEMM,llama3-8b down", "--merge-into", str(table),
           "--tuned-out", str(tuned)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [g["name"] for g in result["gemms"]] == ["llama3-8b down"]
    assert result["mlps"] == []  # the MLP's up projection was not swept
    rows = [r for r in result["rows"] if r["impl"] == "triton_tma"]
    assert rows and all("ms" in r and not r.get("bad") for r in rows), rows
    entries = json.loads(tuned.read_text())["entries"]
    assert entries[next(iter(committed["entries"]))] == {"kept": 1}
    new = [e for key, e in entries.items() if key.startswith("CPU")]
    assert {e["key"]["dtype"] for e in new} == {"bfloat16", "float16"}
    # the table holds the confirmed winner: the lowest median of the interleaved rounds, or the
    # heuristic where it is within the margin of it
    (summary,) = result["gemms"]
    finalists = summary["confirmation"]
    assert len(finalists) >= 2 and all(len(f["rounds_ms"]) == 3 for f in finalists)
    (chosen,) = [f for f in finalists if f["chosen"]]
    fastest = min(f["median_ms"] for f in finalists)
    heuristic = [f for f in finalists if f["config"] == summary["heuristic"]]
    assert chosen["median_ms"] == fastest or (
        heuristic == [chosen] and chosen["median_ms"] <= fastest * 1.02
    )
    assert summary["best"]["config"] == chosen["config"]
    assert summary["best"]["ms"] == chosen["median_ms"] and "first_pass_ms" in summary["best"]
    want = TileConfig.from_dict(chosen["config"])
    assert all(TileConfig.from_dict(e["config"]) == want for e in new)


def test_sweep_refuses_a_filter_that_matches_nothing_and_a_missing_table(tmp_path) -> None:
    """Both checked before anything is timed: a typo must not write an empty or unmerged table
    over a committed one."""
    script = [sys.executable, str(ROOT / "bench" / "sweep_triton.py"), str(tmp_path / "o.json")]
    for extra, message in (
        (["--only", "no such GEMM"], "no GEMM's label contains"),
        (["--merge-into", str(tmp_path / "missing.json")], "no table at"),
    ):
        proc = subprocess.run(
            [*script, "--smoke", *extra], capture_output=True, text=True, timeout=300, cwd=ROOT
        )
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-1000:]
        assert not (tmp_path / "o.json").exists()


def test_sweep_times_the_tf32_tma_kernel_as_the_front_runs_it(monkeypatch) -> None:
    """Under "tf32" the sweep's TMA rows launch what a plan launches (torch_impl/front.py): W
    (gated: the packed [W|V]) K-major and rounded to tf32 once, x rounded by one pass a call, both
    read as they lie — not the launchers' register-rounding form, whose pipeline differs (a tile
    chosen on it would be committed for the wrong kernel)."""
    import torch

    from fusedmlp.bench import sweep_triton as sweep
    from fusedmlp.torch_impl.tf32 import round_to_tf32

    seen: list[dict] = []

    def recorder(name):
        def launch(x, w, *args, **kwargs):
            seen.append(dict(name=name, x=x.clone(), w=w, **kwargs))
            return x

        return launch

    monkeypatch.setattr(sweep.tma_gated, "gated_fwd", recorder("gated"))
    monkeypatch.setattr(sweep.tma_linear, "linear_act_fwd", recorder("linear_act"))
    cfg = TileConfig(16, 64, 16, num_warps=4, num_stages=1)
    for family, bias in (("gated", False), ("linear_act", True)):
        g = sweep.Gemm("t", family, 40, 72, 32, "silu", bias, "float32", "tf32")
        ops = sweep.make_operands(g, "cpu")
        call = sweep.kernel_call(g, ops, "triton_tma", cfg)
        call(), call()
        first, second = seen[-2:]
        assert first["name"] == second["name"] == family
        assert first["tf32_operands_exact"] and first["fp32_precision"] == "tf32"
        assert first["w"] is second["w"]  # rounded once, outside the timed calls
        w = ops.wv if family == "gated" else ops.w
        assert first["w"].stride() == (1, w.shape[0])  # K-major: a [K, N] view of an [N, K] copy
        assert torch.equal(first["w"], round_to_tf32(w))
        assert torch.equal(first["x"], round_to_tf32(ops.x))  # a fresh rounded x every call
    # 16-bit and "ieee" rows keep the launchers' plain call
    g = sweep.Gemm("t", "linear_act", 40, 72, 32, "silu", True, "float32", "ieee")
    sweep.kernel_call(g, sweep.make_operands(g, "cpu"), "triton_tma", cfg)()
    assert "tf32_operands_exact" not in seen[-1]


def test_confirm_best_re_times_the_shortlist_and_keeps_the_heuristic_within_the_margin(
    monkeypatch,
) -> None:
    """One pass only shortlists (its three fastest and the heuristic); the interleaved rounds'
    medians decide, and a winner within 2 % of the heuristic leaves the heuristic in place."""
    from fusedmlp.bench import sweep_triton as sweep

    configs = [TileConfig(64, 64, 64, num_warps=4, num_stages=s) for s in range(1, 6)]
    heuristic = configs[4]
    g = sweep.Gemm("t", "linear_act", 64, 64, 64, "identity", False)
    sw = sweep.Sweep(True, float("inf"), "fake")
    first_pass = [1.0, 1.1, 1.2, 1.3, 1.5]  # configs[0] looks fastest once
    good = [dict(config=c.to_dict(), ms=ms) for c, ms in zip(configs, first_pass, strict=True)]

    def run(confirmed: dict[TileConfig, float]) -> tuple[dict, list[dict]]:
        timed: list[TileConfig] = []
        monkeypatch.setattr(sweep, "kernel_call", lambda g, ops, impl, cfg: cfg)
        monkeypatch.setattr(
            sweep, "bench_ms", lambda cfg, smoke: timed.append(cfg) or confirmed[cfg]
        )
        best, record = sweep.confirm_best(sw, g, None, good, heuristic)
        finalists = {TileConfig.from_dict(f["config"]) for f in record}
        assert finalists == {*configs[:3], heuristic} and len(timed) == 3 * 4
        assert timed[:4] != timed[4:8]  # each round's order rotated
        return best, record

    # the heuristic is 1.5 % behind the re-timed winner: it stays
    best, _ = run({configs[0]: 1.40, configs[1]: 1.39, configs[2]: 1.45, heuristic: 1.41})
    assert best["config"] == heuristic.to_dict() and best["ms"] == 1.41
    assert best["first_pass_ms"] == 1.5
    # a finalist clearly ahead of everything (not the first pass's fastest) wins
    best, record = run({configs[0]: 1.40, configs[1]: 1.20, configs[2]: 1.45, heuristic: 1.41})
    assert best["config"] == configs[1].to_dict() and best["ms"] == 1.20
    assert [f["chosen"] for f in record].count(True) == 1
