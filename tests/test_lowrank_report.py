"""bench/lowrank_report.py: the README's low-rank table and plot from a probe JSON."""

from __future__ import annotations

import json

from fusedmlp.bench import lowrank_report


def _probe() -> dict:
    rows, jax_rows = [], []
    for r in (64, 256):
        for m in (16, 512, 8192):
            rows.append(dict(r=r, m=m, variant="eager", us=100.0, floor_us=10.0))
            ours_t, ours_j = lowrank_report.front_variants(m, 4096, r)
            rows.append(dict(r=r, m=m, variant=ours_t, us=50.0, floor_us=10.0))
            rows.append(dict(r=r, m=m, variant="one-pass", us=1.0, floor_us=10.0))  # not a route
            jax_rows.append(dict(r=r, m=m, variant="xla", device_us=80.0))
            jax_rows.append(dict(r=r, m=m, variant=ours_j, device_us=100.0))
    return dict(
        shape=dict(K=4096, N=14336),
        rows=rows,
        jax=dict(rows=jax_rows),
        ceilings={},
        environment=dict(git=dict(commit="abc1234")),
    )


def test_routes_follow_the_fronts_rule() -> None:
    assert lowrank_report.front_variants(16, 4096, 256) == ("two-pass", "pallas")
    assert lowrank_report.front_variants(512, 4096, 64) == ("fused", "pallas")  # x·U split
    assert lowrank_report.front_variants(512, 4096, 128) == ("2gemm:triton_tma", "2gemm:mosaic")
    assert lowrank_report.front_variants(512, 1000, 64)[0] == "2gemm:triton_tma"  # short K
    assert lowrank_report.front_variants(8192, 4096, 64)[1] == "2gemm:mosaic"


def test_table_and_plot(tmp_path) -> None:
    path = tmp_path / "probe.json"
    path.write_text(json.dumps(_probe()))
    md, png = tmp_path / "t.md", tmp_path / "t.png"
    assert lowrank_report.main([str(path), "--markdown", str(md), "--plot", str(png)]) == 0
    table = lowrank_report.rows(json.loads(path.read_text()))
    assert [(row["r"], row["m"]) for row in table] == [
        (r, m) for r in (64, 256) for m in (16, 512, 8192)
    ]
    for row in table:  # the front's route, not the fastest row
        assert row["torch_speedup"] == 2.0 and row["jax_speedup"] == 0.8
        assert row["torch_roofline"] == 0.2 and row["jax_roofline"] == 0.1
    text = md.read_text()
    assert "at abc1234" in text and "| 64 | 16 | 10.0 | 100.0 | 50.0: **2.00×** (20 %)" in text
    assert "| 80.0 | 100.0: 0.80× (10 %) |" in text
    assert png.stat().st_size > 0
