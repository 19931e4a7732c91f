"""Real models end to end (issue 23 item 4): every MLP of small Llama, Gemma and GPT-2 models from
transformers swapped for FusedMLP; logits within the tolerance policy of a float64 copy of the
original (the original's own logits as the 2× rule's baseline), eager and compiled with
fullgraph=True, in bfloat16 and under autocast. bench/models.py does the work; on a CPU at tiny
sizes under the interpreter (compiled with aot_eager), on the GPU at the issue's sizes with
inductor (`pytest -m gpu`; the timings are `fusedmlp models`' job)."""

from __future__ import annotations

import pytest

from fusedmlp.bench import models


@pytest.mark.parametrize("family", models.FAMILIES)
def test_swapped_model_logits_cpu(family):
    import torch

    torch._dynamo.reset()
    result = models.run_family(family, "cpu", (1,), models.Budget(60.0), "aot_eager")
    assert set(result["checks"]) == {
        "bf16 eager",
        "bf16 compiled",
        "autocast eager",
        "autocast compiled",
    }
    for name, check in result["checks"].items():
        assert check["passed"], f"{family} {name}: {check['report']}"


def test_cli_models_writes_json(tmp_path, capsys):
    import json

    from fusedmlp.bench import cli

    out = tmp_path / "models.json"
    code = cli.main(["models", "--device", "cpu", "--models", "gpt2", "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["passed"] and data["families"][0]["family"] == "gpt2"
    assert "logits bf16 compiled" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.parametrize("family", models.FAMILIES)
def test_swapped_model_logits_gpu(family):
    # The sizes, inductor, one token count for the MLP row: correctness here, the full
    # timing table is `fusedmlp models --json PATH` (bench/models.py).
    import torch

    torch._dynamo.reset()
    size = models.SIZES["cuda"][family]
    size = models.ModelSize(**{**size.__dict__, "batch": 2, "seq": 128})  # 256 tokens
    result = models.run_family(
        family, "cuda", (16,), models.Budget(0.0), None, size=size, timed=False
    )
    for name, check in result["checks"].items():
        assert check["passed"], f"{family} {name}: {check['report']}"


def test_top_kernels_rank_by_total_time():
    """Each timed cell lists where its time goes: kernels by name, calls per call and total µs,
    longest first (a repeated kernel adds up), at most TOP_KERNELS rows."""
    from fusedmlp.bench.timing import DeviceTiming, Stats

    names = ("mm", "norm", "mm", "flash_attn", "norm", "add")
    times = (40e-6, 2e-6, 30e-6, 60e-6, 3e-6, 1e-6)
    timing = DeviceTiming(Stats.of([sum(times)], "test"), Stats.of([sum(times)], "test"),
                          len(names), names, kernel_times=times)  # fmt: skip
    assert models.top_kernels(timing) == [
        ["mm", 2, 70.0],
        ["flash_attn", 1, 60.0],
        ["norm", 2, 5.0],
        ["add", 1, 1.0],
    ]
    assert models.top_kernels(timing, count=1) == [["mm", 2, 70.0]]


ROUTES = [("triton", "opaque op"), ("compile", "baseline ops traced")]


@pytest.mark.parametrize("impl, route", ROUTES)
def test_compiled_route_is_read_off_the_graph(impl, route):
    """The bench names the route each compiled FusedMLP took, from the graph Dynamo handed the
    backend: on the CPU our kernels keep the op (no trace records an interpreted launch), a
    pinned "compile" traces the baseline's ops."""
    import torch

    from fusedmlp.common import MLPSpec
    from fusedmlp.torch_impl import FusedMLP

    torch._dynamo.reset()
    module = FusedMLP(MLPSpec((24, 40, 16), "swiglu", True, "bfloat16"), impl=impl)
    x = torch.randn(3, 24, dtype=torch.bfloat16)
    targets: set[str] = set()
    backend = models._recording("aot_eager", targets)
    with torch.no_grad():
        torch.compile(module, fullgraph=True, backend=backend, dynamic=False)(x)
    assert models._route(targets) == route, targets
    assert models._route({"fusedmlp.mlp_launches.default"}) == "launches in the graph"
