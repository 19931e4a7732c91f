"""The tuning machinery: the framework-neutral cache (common/tuning.py) and the torch sweep
(torch_impl/tuning.py) for both per-layer impls (`triton`, `triton_tma`).

On the CPU: keys, the readable JSON file (path from the argument, $FUSEDMLP_TUNING_CACHE or the
default), merging writers, a broken file; the sweep with a stand-in launcher and timer (winner, a
skipped config with its reason, reuse without re-timing); under the interpreter the heuristic config
untimed, and the tuned launchers' results against the float64 reference. On a GPU (`-m gpu`): a real
sweep with `do_bench`, each config timed or skipped with its reason as the hardware decides.
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import pytest
import torch
from triton.runtime.errors import OutOfResources

import helpers
from fusedmlp.common import MLPSpec, TileConfig, init_params, make_input, reference
from fusedmlp.common.tiling import INTERPRET_CONFIG_GATED, search_space, shape_bucket
from fusedmlp.common.tolerance import assert_close
from fusedmlp.common.tuning import (
    CACHE_ENV,
    TuningCache,
    TuningRecord,
    cache_path,
    candidate_skipped,
    candidate_timing,
    make_key,
)
from fusedmlp.torch_impl import gated as portable_gated
from fusedmlp.torch_impl import linear_act as portable_linear
from fusedmlp.torch_impl import tuning
from fusedmlp.torch_impl.packing import pack_gated
from fusedmlp.torch_impl.runtime import INTERPRET
from fusedmlp.torch_impl.tma import gated as tma_gated
from fusedmlp.torch_impl.tma import linear_act as tma_linear
from helpers import to_numpy

# Triton 3.6's interpreter turns a runtime loop bound into a Python int via a 1-element array,
# which NumPy 2.3 deprecates (and 2.4 rejects: TOOLCHAIN.md); the warning is the interpreter's own.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning"
)

DEVICE = "cpu" if INTERPRET else "cuda"
CFG_A = TileConfig(64, 64, 64, group_m=8, num_warps=4, num_stages=3)
CFG_B = TileConfig(128, 64, 64, group_m=8, num_warps=4, num_stages=3)
# 640 KB of shared memory as a 5-stage TMA ring in bf16; 128 KB in the portable kernel (one buffer)
CFG_BIG = TileConfig(256, 256, 128, group_m=8, num_warps=8, num_stages=5)


to_torch = functools.partial(helpers.to_torch, device=DEVICE)


# ---- common/tuning.py: keys, the file ------------------------------------------------------------
def test_key_buckets_m_and_names_every_field():
    key = make_key("NVIDIA H100 80GB HBM3", "triton_tma", "gated", 3000, 14336, 4096, "bfloat16")
    assert key.m_bucket == "4096" == shape_bucket(3000) == shape_bucket(2049)
    assert make_key("g", "triton", "gated", 2049, 1, 2, "float16") == make_key(
        "g", "triton", "gated", 4096, 1, 2, "float16"
    )
    assert make_key("g", "triton", "gated", 4097, 1, 2, "float16").m_bucket == "8192"
    assert str(key) == "NVIDIA H100 80GB HBM3|triton_tma|gated|m=4096|n=14336|k=4096|bfloat16|ieee"
    assert make_key("g", "triton", "linear_act", 0, 8, 8, "float32", "tf32").m_bucket == "0"
    with pytest.raises(ValueError, match="family: expected one of"):
        make_key("g", "triton", "mlp", 1, 1, 1, "float16")
    with pytest.raises(ValueError, match="dtype: expected one of"):
        make_key("g", "triton", "gated", 1, 1, 1, "float64")
    with pytest.raises(ValueError, match="fp32_precision: expected one of"):
        make_key("g", "triton", "gated", 1, 1, 1, "float32", "tf16")


def test_cache_path_argument_env_default(tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert cache_path() == cache_path("~/.cache/fusedmlp/tuning.json")
    assert str(cache_path()).endswith(os.path.join(".cache", "fusedmlp", "tuning.json"))
    assert "~" not in str(cache_path())
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env.json"))
    assert cache_path() == tmp_path / "env.json"
    assert cache_path(tmp_path / "arg.json") == tmp_path / "arg.json"


def test_put_get_round_trip_in_a_readable_file(tmp_path):
    path = tmp_path / "sub" / "tuning.json"  # the folder does not exist yet
    cache = TuningCache(path)
    key = make_key("Fake GPU", "triton", "linear_act", 100, 72, 40, "float16")
    assert cache.get(key) is None
    candidates = [
        candidate_timing(CFG_A, 0.5),
        candidate_timing(CFG_B, 0.25),
        candidate_skipped(CFG_BIG, "OutOfResources: shared memory"),
    ]
    record = TuningRecord(CFG_B, 0.25, candidates, {"triton": "3.6.0"})
    cache.put(key, record)
    assert cache.get(key) == CFG_B
    assert TuningCache(path).get(key) == CFG_B  # a fresh reader
    data = json.loads(path.read_text())
    entry = data["entries"][str(key)]
    assert data["format"] == 1
    assert entry["key"]["m_bucket"] == "128" and entry["key"]["n"] == 72
    assert entry["config"] == CFG_B.to_dict() and entry["median_ms"] == 0.25
    assert [c.get("median_ms") for c in entry["candidates"]] == [0.5, 0.25, None]
    assert entry["candidates"][2]["skipped"].startswith("OutOfResources")
    assert entry["tuned_at"].endswith("+00:00")
    assert path.read_text().count("\n") > 20  # indented: a person can read and edit it


def test_writers_merge_and_a_broken_file_is_replaced(tmp_path):
    path = tmp_path / "tuning.json"
    one, two = TuningCache(path), TuningCache(path)
    k1 = make_key("Fake GPU", "triton", "gated", 64, 72, 40, "bfloat16")
    k2 = make_key("Fake GPU", "triton_tma", "gated", 64, 72, 40, "bfloat16")
    one.put(k1, TuningRecord(CFG_A, 1.0))
    two.put(k2, TuningRecord(CFG_B, 2.0))  # re-reads the file: k1 survives
    assert TuningCache(path).get(k1) == CFG_A and TuningCache(path).get(k2) == CFG_B
    assert sorted(os.listdir(tmp_path)) == ["tuning.json"]  # no temp files left behind

    path.write_text("{ not json")
    broken = TuningCache(path)
    with pytest.warns(UserWarning, match="unreadable"):
        assert broken.get(k1) is None
    broken.put(k1, TuningRecord(CFG_B, 1.5))
    assert TuningCache(path).get(k1) == CFG_B

    data = json.loads(path.read_text())
    data["entries"][str(k1)]["config"]["block_m"] = 48  # a hand edit that is no TileConfig
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="bad entry"):
        assert TuningCache(path).get(k1) is None
    data["entries"][str(k1)]["config"]["block_m"] = 64
    data["entries"][str(k1)]["config"]["block_n"] = 192  # a TileConfig, but Mosaic GPU's width
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"bad entry .*block_n=192 is not a power of two"):
        assert TuningCache(path).get(k1) is None


# ---- torch_impl/tuning.py: the sweep, with a stand-in launcher and timer -------------------------
def _fake_launcher(calls: list[TileConfig]):
    """Returns a 'time' per config instead of an output; CFG_BIG runs out of shared memory."""

    def fake_fwd(x, w, b, residual, *, activation, config, fp32_precision="ieee"):
        calls.append(config)
        if config == CFG_BIG:
            raise OutOfResources(640 * 1024, 232448, "shared memory")
        return {CFG_A: 0.8, CFG_B: 0.3}.get(config, 1.0 + config.num_stages / 10)

    return fake_fwd


def _run_bench(fn):
    return fn()  # the stand-in launcher returns its own time


def test_sweep_picks_fastest_records_skips_and_reuses(tmp_path):
    calls: list[TileConfig] = []
    fake = _fake_launcher(calls)
    x = torch.zeros((100, 40), dtype=torch.float16)
    w = torch.zeros((40, 72), dtype=torch.float16)
    args = (x, w, None, None)
    options = dict(
        activation="relu",
        cache_file=str(tmp_path / "t.json"),
        interpret=False,
        device_name="Fake GPU",
        bench=_run_bench,
    )
    got = tuning.tuned_config("linear_act", fake, args, configs=[CFG_A, CFG_BIG, CFG_B], **options)
    assert got == CFG_B
    assert calls == [CFG_A, CFG_BIG, CFG_B]
    entry = json.loads((tmp_path / "t.json").read_text())["entries"][
        "Fake GPU|triton|linear_act|m=128|n=72|k=40|float16|ieee"
    ]
    assert entry["median_ms"] == 0.3
    skipped = [c for c in entry["candidates"] if "skipped" in c]
    assert len(skipped) == 1 and skipped[0]["config"] == CFG_BIG.to_dict()
    assert "OutOfResources" in skipped[0]["skipped"] and "shared memory" in skipped[0]["skipped"]
    # Same bucket (M=100 and M=120 -> 128): the cached winner, nothing timed again.
    x120 = torch.zeros((120, 40), dtype=torch.float16)
    assert tuning.tuned_config("linear_act", fake, (x120, w, None, None), **options) == CFG_B
    assert len(calls) == 3
    # Another M bucket sweeps again, over the default candidates: the heuristic and search_space.
    x300 = torch.zeros((300, 40), dtype=torch.float16)
    tuning.tuned_config("linear_act", fake, (x300, w, None, None), **options)
    space = search_space("linear_act", 300, "float16")
    assert len(calls) == 3 + len(
        set(space) | {tuning.heuristic_config("linear_act", 300, 72, 40, "float16")}
    )


def test_tuned_launcher_times_the_launch_the_caller_makes(tmp_path):
    """The front's tf32 TMA launches pass `tf32_operands_exact` / `tf32_output` (operands rounded in
    memory): every timed candidate and the final launch get them, the gated `n` too — a sweep of
    the launcher's register-rounding form would pick a tile for a kernel no plan runs."""
    seen: list[dict] = []

    def fake_fwd(x, w, b, *, activation, config, fp32_precision="ieee", **options):
        seen.append(dict(options, config=config, fp32_precision=fp32_precision))
        return {CFG_A: 0.8, CFG_B: 0.3}.get(config, 1.0)

    x = torch.zeros((100, 40), dtype=torch.float32)
    wv = torch.zeros((40, 128), dtype=torch.float32)
    launch = tuning.tuned(
        "gated", fake_fwd, configs=[CFG_A, CFG_B], cache_file=str(tmp_path / "t.json"),
        interpret=False, device_name="Fake GPU", bench=_run_bench,
    )  # fmt: skip
    flags = dict(tf32_operands_exact=True, tf32_output=True)
    launch(x, wv, None, n=64, activation="silu", fp32_precision="tf32", **flags)
    assert [s["config"] for s in seen] == [CFG_A, CFG_B, CFG_B]  # two timed, then the launch
    for call in seen:
        assert call == dict(flags, n=64, config=call["config"], fp32_precision="tf32")


def test_sweep_with_no_runnable_config_names_every_reason(tmp_path):
    fake = _fake_launcher([])
    args = (
        torch.zeros((8, 40), dtype=torch.float16),
        torch.zeros((40, 72), dtype=torch.float16),
        None,
        None,
    )
    with pytest.raises(RuntimeError, match=r"linear_act: no config ran .*OutOfResources"):
        tuning.tuned_config(
            "linear_act",
            fake,
            args,
            activation="relu",
            configs=[CFG_BIG],
            cache_file=str(tmp_path / "t.json"),
            interpret=False,
            device_name="Fake GPU",
            bench=_run_bench,
        )
    assert not (tmp_path / "t.json").exists()


def test_impl_names_from_launchers():
    assert tuning.impl_of(portable_linear.linear_act_fwd) == "triton"
    assert tuning.impl_of(portable_gated.gated_fwd) == "triton"
    assert tuning.impl_of(tma_linear.linear_act_fwd) == "triton_tma"
    assert tuning.impl_of(tma_gated.gated_fwd) == "triton_tma"
    with pytest.raises(ValueError, match="family: expected one of"):
        tuning.tuned_config(
            "mlp",
            tma_linear.linear_act_fwd,
            (torch.zeros(1, 8), torch.zeros(8, 8)),
            activation="relu",
        )


# ---- under the interpreter: the heuristic config, untimed; tuned launchers are right -----------
@pytest.mark.skipif(not INTERPRET, reason="interpreter behaviour")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_interpreter_uses_heuristic_untimed_and_tuned_launchers_are_right(
    dtype, tmp_path, monkeypatch
):
    cache_file = tmp_path / "never.json"
    monkeypatch.setenv("FUSEDMLP_TUNING_CACHE", str(cache_file))
    k, n = (20, 36) if dtype == "float32" else (40, 72)
    spec = MLPSpec((k, n, 8), "geglu", True, dtype)
    p = init_params(spec, seed=31)
    x = make_input(spec, 37, seed=32)
    xt, wt, vt = to_torch(x), to_torch(p["w0"]), to_torch(p["v0"])
    bt, ct = to_torch(p["b0"]), to_torch(p["c0"])

    def timer(fn):  # pragma: no cover - must not be called
        raise AssertionError("the interpreter must not time configs")

    wvt, bct = pack_gated(wt, vt), pack_gated(bt, ct)  # the gated kernels take W|V packed
    for launcher in (portable_gated.gated_fwd, tma_gated.gated_fwd):
        cfg = tuning.tuned_config(
            "gated", launcher, (xt, wvt, bct), activation="gelu", bench=timer, n=n
        )
        assert cfg == INTERPRET_CONFIG_GATED
        y = tuning.tuned("gated", launcher, bench=timer)(xt, wvt, bct, n=n, activation="gelu")
        z = np.asarray(x, np.float64) @ np.asarray(p["w0"], np.float64) + np.asarray(
            p["b0"], np.float64
        )
        g = np.asarray(x, np.float64) @ np.asarray(p["v0"], np.float64) + np.asarray(
            p["c0"], np.float64
        )
        assert_close(
            to_numpy(y),
            reference.activation("gelu", z) * g,
            spec,
            what=f"tuned {launcher.__module__}",
        )
    for launcher in (portable_linear.linear_act_fwd, tma_linear.linear_act_fwd):
        y = tuning.tuned("linear_act", launcher)(xt, wt, bt, None, activation="silu")
        assert_close(
            to_numpy(y), reference.activation("silu", z), spec, what=f"tuned {launcher.__module__}"
        )
    assert not cache_file.exists()


# ---- GPU: a real sweep ---------------------------------------------------------------------------
def _fits(launcher, args, config: TileConfig) -> bool:
    """Whether the hardware takes `config`: launch it once (Triton raises OutOfResources when the
    compiled kernel needs more shared memory than the GPU has)."""
    try:
        launcher(*args, activation="gelu", config=config)
        torch.cuda.synchronize()
    except OutOfResources:
        return False
    return True


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "triton_tma"])
def test_gpu_sweep_times_configs_and_skips_what_does_not_fit(impl, tmp_path):
    """The sweep times what fits and skips, with the reason, what does not — the verdict per config
    taken from the hardware, not assumed: CFG_BIG (256x256x128, 5 stages) needs 640 KB of shared
    memory as the TMA kernel's 5-stage ring, but only one 128 KB buffer in the portable pointer
    kernel (compiled for sm_90: `metadata.shared` = 131072), which fits in 227 KB and runs."""
    launcher = tma_linear.linear_act_fwd if impl == "triton_tma" else portable_linear.linear_act_fwd
    spec = MLPSpec((520, 1096), "relu", True, "bfloat16")
    p = init_params(spec, seed=41)
    x = make_input(spec, 777, seed=42)
    args = (to_torch(x), to_torch(p["w0"]), to_torch(p["b0"]), None)
    configs = [
        CFG_A,
        CFG_B,
        CFG_BIG,
        TileConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=3),
    ]
    cache_file = str(tmp_path / "gpu.json")
    best = tuning.tuned_config(
        "linear_act", launcher, args, activation="gelu", configs=configs, cache_file=cache_file
    )
    data = json.loads((tmp_path / "gpu.json").read_text())
    ((key, entry),) = data["entries"].items()
    assert key.startswith(torch.cuda.get_device_name()) and f"|{impl}|linear_act|m=1024|" in key
    timed = [c for c in entry["candidates"] if "median_ms" in c]
    skipped = [c for c in entry["candidates"] if "skipped" in c]
    fits = {cfg: _fits(launcher, args, cfg) for cfg in configs}
    assert [c["config"] for c in timed] == [c.to_dict() for c in configs if fits[c]]
    assert [c["config"] for c in skipped] == [c.to_dict() for c in configs if not fits[c]]
    assert all(c["median_ms"] > 0 for c in timed)
    assert all("OutOfResources" in c["skipped"] for c in skipped)
    if impl == "triton_tma":
        assert not fits[CFG_BIG]  # the skip path is exercised on the GPU at least here
    assert entry["median_ms"] == min(c["median_ms"] for c in timed)
    assert best.to_dict() == entry["config"]
    y = tuning.tuned("linear_act", launcher, cache_file=cache_file)(*args, activation="gelu")
    torch.cuda.synchronize()
    z = np.asarray(x, np.float64) @ np.asarray(p["w0"], np.float64) + np.asarray(
        p["b0"], np.float64
    )
    assert_close(to_numpy(y), reference.activation("gelu", z), spec, what=f"tuned {impl}")
