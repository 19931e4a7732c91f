"""`fusedmlp bench --backward` (bench/bench_backward.py) on the CPU, and the training step's floor
(common/cost.py's `backward_*`).

What is proved: the floor's FLOPs and bytes match a hand count; the command runs one training
step per provider in both stacks — the baselines timed on the host clock (labelled so, with their
peak memory and the floor), the interpreted kernels gated on their gradients and listed as not
timed — and writes rows that `fusedmlp report` re-renders; a path whose gradients are wrong is
flagged, never timed, by the float64 reference at small M and by agreement with the framework's
gradients above it; a GPU time below the step's floor is an invalid measurement.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fusedmlp.bench import bench_backward, cli, providers
from fusedmlp.bench.cases import Case
from fusedmlp.bench.metrics import Ceilings
from fusedmlp.common import MLPSpec, cost

# Odd widths and M, as tests/test_harness.py: the interpreted kernels stay honest and fast.
from helpers import CLI_TINY_SPEC

TINY = MLPSpec(**CLI_TINY_SPEC)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("no_cli_faults")


def _rows(path: Path) -> tuple[dict, dict[str, dict]]:
    data = json.loads(path.read_text())
    assert data["kind"] == "fusedmlp-results" and data["environment"]["versions"]["torch"]
    (case,) = data["bench_backward"]["cases"]
    return case, {r["provider"]: r for r in case["rows"]}


# ---- the floor -----------------------------------------------------------------------------------
def test_backward_floor_counts_by_hand() -> None:
    m = 5
    # relu 8 -> 16 -> 4: act' read off the kept output, so no pre-activation is counted.
    relu = MLPSpec((8, 16, 4), "relu", bias=True, dtype="float32")
    params = 4 * (8 * 16 + 16 + 16 * 4 + 4)
    # x read once, dy read once, dx written once; per layer: forward N (+Z) written, backward Z +
    # K read; Z = 0 for relu and the identity (a whole-MLP forward reads no hidden, a whole-MLP
    # backward keeps every dZ on chip: the bound holds for fused_small's with the dWs on chip)
    layers = 4 * m * (8 + 4 + 8 + (16 + 8) + (4 + 16))
    assert cost.backward_bytes(relu, m) == 3 * params + layers
    assert cost.backward_flops(relu, m) == 3 * cost.flops(relu, m)
    # "inputs": the forward again (its FLOPs) and a forward at its cheapest (x, params, y)
    assert cost.backward_flops(relu, m, "inputs") == 4 * cost.flops(relu, m)
    assert cost.backward_bytes(relu, m, "inputs") == cost.backward_bytes(relu, m) + cost.min_bytes(
        relu, m, whole=True
    )
    # gated bf16 13 -> 24 -> 11: the hidden layer keeps z and g (2N) for the backward
    gated = TINY.replace(dtype="bfloat16")
    z = 2 * 24
    layers = 2 * m * (13 + 11 + 13 + (24 + z) + (z + 13) + 11 + 24)
    assert cost.backward_bytes(gated, m) == 3 * cost.param_bytes(gated) + layers
    # a gelu layer keeps z (N): its derivative needs it
    gelu = relu.replace(activation="gelu")
    assert cost.backward_bytes(gelu, m) == cost.backward_bytes(relu, m) + 4 * m * 2 * 16
    f = cost.backward_floor(gated, 4096, flops_per_s=1e12, bytes_per_s=1e9)
    assert f.flops == 3 * cost.flops(gated, 4096) and f.bound == "memory"
    assert f.seconds == f.bytes / 1e9
    with pytest.raises(ValueError, match="saved: expected one of"):
        cost.backward_flops(gated, m, "nothing")


# ---- the command ---------------------------------------------------------------------------------
def test_bench_backward_runs_both_stacks_on_the_cpu(spec_file: Path, tmp_path: Path) -> None:
    out, md = tmp_path / "bwd.json", tmp_path / "bwd.md"
    args = ["bench", "--backward", "--quick", "--device", "cpu", "--spec", str(spec_file)]
    impl = "triton,pallas_triton,auto,eager,xla"
    code = cli.main([*args, "--m", "7", "--impl", impl, "--json", str(out)])
    assert code == 0
    case, rows = _rows(out)
    assert set(rows) == {
        "torch:triton", "jax:pallas_triton", "torch:auto", "jax:auto", "torch:eager", "jax:xla",
    }  # fmt: skip
    assert case["saved"] == "preact" and case["gate"] == "float64 reference"
    assert 0 < case["floor"]["preact_s"] < case["floor"]["inputs_s"]
    for name in ("torch:eager", "jax:xla"):
        row = rows[name]
        t = row["time"]
        assert row["status"] == "timed" and row["parity"] == "pass", row
        assert t["n"] >= 20 and 0 < t["min"] <= t["median"] <= t["max"]
        assert t["method"] == "host clock, synchronised"  # a CPU: no device time
        assert row["throughput"]["median"] > 0 and row["host_issue"]["median"] > 0
        # the floor of the step, and the metrics derived from it
        assert row["floor_s"] == case["floor"]["preact_s"]
        assert row["pct_roofline"] == pytest.approx(100 * row["floor_s"] / t["median"])
        assert row["tflops"] > 0 and row["vs_best_baseline"] == 1.0
        # y and every gradient are allocated by the step: at least their bytes
        grads = 4 * (7 * 13 + 7 * 11) + cost.param_bytes(TINY)
        assert row["peak_bytes"] >= grads and row["memory_method"]
    for name in ("torch:triton", "jax:pallas_triton", "torch:auto", "jax:auto"):
        row = rows[name]
        assert row["status"] == "interpreted — not timed" and row["parity"] == "pass", row
        assert row["saved"] == "preact" and "time" not in row
        assert row["peak_bytes"] is None and row["memory_method"].startswith("not measured")
        assert set(row["grads"]) == {"dx", "dw0", "db0", "dv0", "dc0", "dw1", "db1"}
    assert rows["jax:auto"]["chosen"] == "fused_small"
    # `fusedmlp report` re-renders the saved run
    assert cli.main(["report", str(out), "--markdown", str(md), "--plot-dir", str(tmp_path)]) == 0
    text = md.read_text()
    assert "Bench --backward (forward + backward)" in text and "peak memory" in text
    assert "not device time" in text
    assert (tmp_path / "bench_backward.png").read_bytes().startswith(PNG_MAGIC)


def test_bench_backward_never_times_a_wrong_gradient(spec_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "bad.json"
    common = ["bench", "--backward", "--quick", "--device", "cpu", "--spec", str(spec_file)]
    code = cli.main(
        [*common, "--m", "7", "--impl", "torch:triton,eager,xla", "--saved", "inputs",
         "--inject-fault", "torch:triton", "--json", str(out)]
    )  # fmt: skip
    assert code == 1
    _, rows = _rows(out)
    bad = rows["torch:triton"]
    assert bad["status"] == "FAIL parity — not timed" and "time" not in bad
    assert bad["rel_fro"] > 1e-3 and bad["saved"] == "inputs"
    assert rows["torch:eager"]["status"] == "timed"


def test_above_the_reference_the_gate_is_agreement(
    spec_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # M above the float64 reference's reach (lowered here): each path against its stack's
    # framework gradients, the two frameworks against each other.
    monkeypatch.setattr(bench_backward, "REFERENCE_MAX_M", 0)
    out = tmp_path / "big.json"
    common = ["bench", "--backward", "--quick", "--device", "cpu", "--spec", str(spec_file)]
    code = cli.main(
        [*common, "--m", "7", "--impl", "jax:pallas_triton,eager,xla",
         "--inject-fault", "jax:pallas_triton", "--json", str(out)]
    )  # fmt: skip
    assert code == 1
    case, rows = _rows(out)
    assert case["gate"] == "agreement with the framework's gradients"
    bad = rows["jax:pallas_triton"]
    assert bad["status"] == "FAIL parity — not timed" and bad["rel_fro"] > 1e-3
    assert "agreement" in bad["parity_method"]
    for name in ("torch:eager", "jax:xla"):  # held to each other, and timed
        assert rows[name]["parity"] == "pass" and rows[name]["status"] == "timed"
        assert rows[name]["rel_fro"] <= rows[name]["bound_rel_fro"]


def test_without_a_yardstick_ours_are_not_timed(
    spec_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Above the reference's reach, a framework step that fails (out of memory, say) leaves
    # nothing to hold our rows to: they are flagged, not timed ungated.
    monkeypatch.setattr(bench_backward, "REFERENCE_MAX_M", 0)
    real_step = bench_backward.torch_step

    def torch_step(sets, spec, impl, dy, **kw):
        if impl == "eager":
            raise RuntimeError("out of memory (simulated)")
        return real_step(sets, spec, impl, dy, **kw)

    monkeypatch.setattr(bench_backward, "torch_step", torch_step)
    out = tmp_path / "noyard.json"
    common = ["bench", "--backward", "--quick", "--device", "cpu", "--spec", str(spec_file)]
    code = cli.main([*common, "--m", "7", "--impl", "torch:triton,eager", "--json", str(out)])
    assert code == 1
    _, rows = _rows(out)
    ours = rows["torch:triton"]
    assert ours["status"] == "FAIL parity — not timed" and "time" not in ours
    assert "not gated" in ours["parity_method"]


def test_a_gpu_time_below_the_steps_floor_is_invalid(monkeypatch: pytest.MonkeyPatch) -> None:
    """The floor check of the forward bench, with the step's floor (no GPU needed: the
    measurement is faked at half the floor)."""
    spec = MLPSpec((64, 256, 64), "gelu", bias=True, dtype="bfloat16")
    ceil = Ceilings({"bfloat16": 1e12}, 1e9, "cuda", {}, read=1e9)
    floor = cost.backward_floor(spec, 512, flops_per_s=1e12, bytes_per_s=1e9).seconds
    fake = {"median": floor / 2, "min": floor / 2, "max": floor, "n": 20, "method": "fake"}

    def measure(*args: object, **kwargs: object) -> dict:
        return {"time": fake, "throughput": {**fake, "median": floor}}

    monkeypatch.setattr(bench_backward, "measure", measure)
    p = providers.Provider("torch", "eager", True)
    row = bench_backward.time_step(p, Case(spec, 512, "cuda"), lambda i: None, ceil, {}, "preact")
    assert row["status"] == "invalid measurement", row
    assert row["floor_check_s"] == pytest.approx(floor) and "tflops" not in row
    assert "below the memory-bound floor" in row["message"]


def test_packed_baseline_probe_steps_agree() -> None:
    """bench/packed_baseline_probe.py's three XLA training steps give the float64 reference's
    gradients under the tolerance policy, and unpacked in the step exactly the plain step's
    gradients, packed."""
    import importlib.util

    import jax.numpy as jnp
    import numpy as np

    from fusedmlp.common import init_params, make_grad_output, make_input, reference
    from fusedmlp.common.packing import pack_params, unpack_params
    from fusedmlp.common.tolerance import assert_grads_close

    path = Path(__file__).resolve().parent.parent / "bench" / "packed_baseline_probe.py"
    module_spec = importlib.util.spec_from_file_location("packed_baseline_probe", path)
    probe = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(probe)
    spec = MLPSpec((48, 80, 40), "geglu_tanh", bias=True, dtype="float32")
    params_np, x_np, dy_np = init_params(spec), make_input(spec, 33), make_grad_output(spec, 33)
    ref = reference.backward(spec, x_np, params_np, dy_np, round_hidden=True)
    plain = {k: jnp.asarray(v) for k, v in params_np.items()}
    packed = pack_params(spec, plain)
    x, dy = jnp.asarray(x_np), jnp.asarray(dy_np)
    _, (dx, grads) = probe._step("xla", spec)(x, plain, dy)
    assert_grads_close({"x": dx, **grads}, ref, spec, what="xla")
    want = pack_params(spec, {k: np.asarray(v) for k, v in grads.items()})
    for variant in ("xla_packed", "xla_unpacked_in_step"):
        _, (dx_v, grads_v) = probe._step(variant, spec)(x, packed, dy)
        assert set(grads_v) == set(want)
        assert_grads_close({"x": dx_v, **unpack_params(spec, grads_v)}, ref, spec, what=variant)
        if variant == "xla_unpacked_in_step":
            for name, value in want.items():
                assert np.array_equal(np.asarray(grads_v[name]), value), name
