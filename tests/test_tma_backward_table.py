"""The torch Hopper backward's tuned tiles: bench/sweep_tma_backward.py writes the table that
torch_impl/tma/backward.step_config reads, kinds named as the Mosaic GPU sibling names them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fusedmlp.common.config import TileConfig
from fusedmlp.common.tiling import GROUPED_KIND, step_gemm_kind
from fusedmlp.common.tuning import triton_config
from fusedmlp.torch_impl import backward as portable
from fusedmlp.torch_impl.tma import backward as hopper

ROOT = Path(__file__).resolve().parents[1]
TILES = TileConfig(128, 64, 64, group_m=8, num_warps=4, num_stages=5)


@pytest.fixture
def table(tmp_path, monkeypatch):
    """A committed-table stand-in with one weight-gradient entry, read as on a GPU."""
    path = tmp_path / "tuned_hopper_backward.json"
    entry = {"m": 3072, "n": 768, "k": 8192, "config": TILES.to_dict(), "us": 1.0}
    path.write_text(json.dumps({"configs": {"linear_act.x_kmajor": [entry]}}))
    monkeypatch.setattr(hopper, "TUNED_FILE", path)
    monkeypatch.setattr(hopper, "INTERPRET", False)
    hopper.tuned_table.cache_clear()
    yield path
    hopper.tuned_table.cache_clear()


def test_step_config_takes_the_tables_tiles(table) -> None:
    kind = step_gemm_kind("linear_act", x_kmajor=True)
    assert kind == "linear_act.x_kmajor"
    got = hopper.step_config(kind, "linear_act", 3072, 768, 8192, "bfloat16", "ieee")
    assert got == TILES
    # M's bucket: the nearest measured M serves a neighbour; float16 shares bfloat16's tiles
    assert hopper.step_config(kind, "linear_act", 2500, 768, 8192, "float16", "ieee") == TILES


def test_each_gpu_reads_its_own_entry_first(tmp_path, monkeypatch) -> None:
    """Two GPUs' entries for one shape: the GPU torch sees takes its own, another GPU (or none)
    the table's first (common.tiling.measured_here_first, as the Mosaic GPU tables read)."""
    other = TileConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=4)
    entries = [
        {"m": 3072, "n": 768, "k": 8192, "config": TILES.to_dict(), "gpu": "NVIDIA H200"},
        {"m": 3072, "n": 768, "k": 8192, "config": other.to_dict(), "gpu": "NVIDIA H100"},
    ]
    path = tmp_path / "tuned_hopper_backward.json"
    path.write_text(json.dumps({"configs": {"linear_act.x_kmajor": entries}}))
    monkeypatch.setattr(hopper, "TUNED_FILE", path)
    monkeypatch.setattr(hopper, "INTERPRET", False)
    hopper.tuned_table.cache_clear()
    try:
        wants = {"NVIDIA H100": other, "NVIDIA H200": TILES, "X": TILES, None: TILES}
        for gpu, want in wants.items():
            monkeypatch.setattr(hopper.torch.cuda, "is_available", lambda gpu=gpu: gpu is not None)
            monkeypatch.setattr(hopper.torch.cuda, "get_device_name", lambda *a, gpu=gpu: gpu)
            got = hopper.tuned_config("linear_act.x_kmajor", 3072, 768, 8192, "bfloat16")
            assert got == want, gpu
    finally:
        hopper.tuned_table.cache_clear()


def test_step_config_falls_back_to_the_heuristic(table) -> None:
    heuristic = portable._heuristic("linear_act", 3072, 768, 8192, "float32", "ieee", False, True)
    kind = "linear_act.x_kmajor"
    # float32 (the sweep timed 16-bit tiles), another shape, another kind: the heuristic's
    assert hopper.step_config(kind, "linear_act", 3072, 768, 8192, "float32", "ieee") == heuristic
    other = hopper.step_config(kind, "linear_act", 3072, 512, 8192, "bfloat16", "ieee")
    assert other == portable._heuristic(
        "linear_act", 3072, 512, 8192, "bfloat16", "ieee", False, True
    )
    dgrad = hopper.step_config(
        "linear_act.w_kmajor", "linear_act", 3072, 768, 8192, "bfloat16", "ieee"
    )
    assert dgrad != TILES


def test_act_step_fallback_takes_whole_tiles_one_program_an_sm(table, monkeypatch) -> None:
    # The heuristic's slices and programs an SM were measured for the forward's plain epilogue:
    # an act' step without a table entry takes its tiles whole, one program an SM; a plain GEMM
    # keeps them as the heuristic gives them.
    forward = TileConfig(128, 256, 64, num_warps=8, num_stages=3, epilogue_subtile=2,
                         programs_per_sm=2)  # fmt: skip
    monkeypatch.setattr(portable, "_heuristic", lambda *args: forward)
    for kind in ("linear_act.w_kmajor.dact", "linear_act.w_kmajor.dact_gated"):
        act = hopper.step_config(kind, "linear_act", 8192, 3072, 768, "bfloat16", "ieee")
        assert act == TileConfig(128, 256, 64, num_warps=8, num_stages=3), kind
    plain = hopper.step_config("linear_act.w_kmajor", "linear_act", 8192, 768, 6144, "bfloat16",
                               "ieee")  # fmt: skip
    assert plain == forward


def test_interpreter_never_takes_the_table(table, monkeypatch) -> None:
    monkeypatch.setattr(hopper, "INTERPRET", True)
    kind = "linear_act.x_kmajor"
    assert hopper.tuned_config(kind, 3072, 768, 8192, "bfloat16") is None


def test_committed_table_is_well_formed() -> None:
    """Every committed entry names a kind the step asks for and tiles the Triton kernels take
    (a power-of-two block_n: a TileConfig may also hold a Mosaic GPU width)."""
    hopper.tuned_table.cache_clear()
    kinds = {
        step_gemm_kind("gated", preact=True),
        step_gemm_kind("linear_act", x_kmajor=True),
        *(step_gemm_kind("linear_act", w_kmajor=True, epilogue=e)
          for e in ("none", "dact", "dact_gated")),
        GROUPED_KIND,
    }  # fmt: skip
    for kind, entries in hopper.tuned_table().items():
        assert kind in kinds, kind
        for e in entries:
            triton_config(e["config"])
            shape = {"products", "k", "apart_us"} if kind == GROUPED_KIND else {"m", "n", "k"}
            assert shape | {"us", "gpu", "commit"} <= set(e), e


def test_sweep_smoke_writes_a_table_step_config_reads(tmp_path, monkeypatch) -> None:
    """The sweep end to end under the interpreter (tiny gated MLP): every GEMM timed at the
    fitted tiles and the grid's, each checked against the fitted one, the weight gradients
    grouped beside them apart, and its table read back (`step_config`, `grouped_config`)."""
    out, tuned = tmp_path / "sweep.json", tmp_path / "tuned.json"
    cmd = [sys.executable, str(ROOT / "bench" / "sweep_tma_backward.py"), str(out),
           "--tuned-out", str(tuned), "--smoke", "--presets", "smoke"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    roles = {r["role"] for r in rows}
    assert roles == {
        "layer 0 saving forward", "layer 1 weight gradient", "layer 1 input gradient",
        "layer 0 weight gradient", "layer 0 input gradient", "weight gradients grouped",
    }  # fmt: skip
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    assert {r["impl"] for r in rows} == {"fitted", "grid", "apart"}
    grouped = [r for r in rows if r["role"] == "weight gradients grouped"]
    rows = [r for r in rows if r not in grouped]
    assert {r["kind"] for r in grouped} == {GROUPED_KIND}
    assert grouped[0]["products"] == [[96, 64], [64, 256]]  # layer 1's, then layer 0's (packed)
    kinds = {r["role"]: r["kind"] for r in rows}
    assert kinds["layer 1 input gradient"] == "linear_act.w_kmajor.dact_gated"
    assert kinds["layer 0 input gradient"] == "linear_act.w_kmajor"
    monkeypatch.setattr(hopper, "TUNED_FILE", tuned)
    monkeypatch.setattr(hopper, "INTERPRET", False)
    hopper.tuned_table.cache_clear()
    try:
        for r in rows:
            best = min((q for q in rows if q["role"] == r["role"]), key=lambda q: q["ms"])
            family = "gated" if "forward" in r["role"] else "linear_act"
            got = hopper.step_config(r["kind"], family, r["m"], r["n"], r["k"], "bfloat16", "ieee")
            assert got == TileConfig.from_dict(best["config"])
        apart, fastest = grouped[0], min(grouped[1:], key=lambda q: q["ms"])
        want = TileConfig.from_dict(fastest["config"]) if fastest["ms"] < apart["ms"] else None
        products = [tuple(p) for p in apart["products"]]
        assert hopper.grouped_config(products, apart["k"], "bfloat16") == want
    finally:
        hopper.tuned_table.cache_clear()
