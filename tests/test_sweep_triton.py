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
    best = min((r for r in rows if not r.get("kmajor")), key=lambda r: r["ms"])
    want = TileConfig.from_dict(best["config"])
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
