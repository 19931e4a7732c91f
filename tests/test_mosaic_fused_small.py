"""fused_small on Mosaic GPU (jax_impl/mosaic/fused_small.py) against the float64 reference.

On a CPU machine the kernel runs under the Mosaic GPU interpreter (several warpgroup chains, the
TMA ring, barriers and wgmma simulated; 1.5-3 s a launch here under jax 0.10.2), the hidden
through shared memory (the interpreter reads wgmma operands from shared memory only). Outputs
start poisoned: the interpreter fills every allocation, the output included, with NaN, so a row
the kernel skips fails the tolerance policy's NaN check. The GPU variant (the hidden as wgmma's
register A operand, with and without Pallas' automatic barriers) is lowered for CUDA on the CPU,
which runs Mosaic GPU's own checks (layouts, swizzles, TMA tiling) and its shared-memory total,
against which the module's model is checked. `-m gpu` runs the compiled kernel against the
Pallas-Triton fused_small; bench/mosaic_small_probe.py times both on the H200.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusedmlp.common import get_preset, reference, tolerance
from fusedmlp.common.config import TileConfig
from fusedmlp.common.packing import packed_names
from fusedmlp.common.params import init_params, make_input
from fusedmlp.common.spec import MLPSpec
from fusedmlp.common.tiling import SmallConfig
from fusedmlp.jax_impl import compat
from helpers import lower_for_cuda

pytest.importorskip("absl")  # jax.experimental.pallas.mosaic_gpu needs it on CPU machines

from fusedmlp.jax_impl.mosaic import fused_small as mfs

Config = mfs.MosaicSmallConfig


def _interpreter_missing() -> str | None:
    """Why the Mosaic GPU interpreter cannot run here (None: it can)."""
    if compat.on_gpu():
        return None
    try:
        compat.mosaic_interpret_params()
    except (ImportError, AttributeError) as err:
        return f"the Mosaic GPU interpreter is not in jax {jax.__version__}: {err}"
    return None


needs_interpreter = pytest.mark.skipif(
    _interpreter_missing() is not None, reason=str(_interpreter_missing())
)
interpreted_only = pytest.mark.skipif(
    compat.on_gpu() or _interpreter_missing() is not None,
    reason=str(_interpreter_missing() or "checks the interpreter's own state; a GPU is present"),
)


@pytest.fixture(autouse=True)
def _reset_interpreter():
    """An exception inside an interpreted kernel leaves the interpreter's state dirty (jax docs)."""
    yield
    if not compat.on_gpu() and _interpreter_missing() is None:
        from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

        interpret_pallas_call.reset_gpu_interpret_mode_state()


def _inputs(spec: MLPSpec, m: int, seed: int) -> tuple[np.ndarray, dict, dict]:
    params = init_params(spec, seed=seed)
    x = make_input(spec, m, seed=seed + 100)
    return x, params, {k: jnp.asarray(v) for k, v in params.items()}


# ---- fresh inputs, poisoned outputs: depths, dtypes, activations, bias, odd M -------------------
@pytest.mark.parametrize(
    ("widths", "activation", "dtype", "bias", "m"),
    [
        # nerf-64x5's shape: 5 layers; 301 rows are 5 tiles over 4 chains (2 blocks of 2
        # warpgroups), the last tile ragged, chain 0's one x slot refilled once
        ((64,) * 6, "relu", "float16", False, 301),
        ((64,) * 6, "relu", "bfloat16", True, 70),
        ((64, 64, 64), "gelu_tanh", "bfloat16", True, 301),  # 2 layers
        ((64, 64, 64), "silu", "float16", False, 1),  # M = 1
        # hidden 48 padded to WIDTH 64 (zero weight rows and columns), d_in 32 and d_out 16 read
        # and written unpadded: one 32-byte swizzle for every tile
        ((32, 48, 48, 16), "gelu", "float16", True, 70),
        # 128 wide: the weights through the ring (5 tiles over 4 chains: the step past a chain's
        # last tile recomputes one and stores nothing)
        ((128,) * 5, "relu", "float16", False, 301),
        ((128,) * 3, "gelu_tanh", "bfloat16", True, 70),
    ],
)
@needs_interpreter
@pytest.mark.jax_matrix
def test_against_reference(widths, activation, dtype, bias, m) -> None:
    spec = MLPSpec(widths, activation, bias, dtype)
    x, params, p = _inputs(spec, m, seed=m + len(widths))
    out = mfs.fused_small(jnp.asarray(x), p, spec)
    assert out.shape == (m, spec.d_out) and out.dtype == jnp.dtype(dtype)
    ref = reference.forward(spec, x, params, round_hidden=True)
    tolerance.assert_close(out, ref, spec, what=f"{activation} {dtype}")


def test_cpu_pool_sized_for_the_interpreter_before_any_backend() -> None:
    """`compat.widen_cpu_pool`: importing the package sets PJRT_NPROC (XLA's CPU pool) to
    CPU_POOL_THREADS on a machine of fewer cores, before any JAX backend has started, and keeps
    a value the user set. With a pool of one, the 128-wide weight-ring case above (widths5:
    warpgroups that wait on each other's barriers) deadlocked every time; on 2 cores about one
    run in 20-30 (py-spy: the grid loop's thread in its callback, a warpgroup's at a barrier,
    the warpgroup to release it waiting for a pool thread)."""
    import os
    import subprocess
    import sys

    script = (
        "import os, fusedmlp.jax_impl\n"
        "from jax._src import xla_bridge\n"
        "print(os.environ.get('PJRT_NPROC'), xla_bridge.backends_are_initialized())"
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    for preset, want in ((None, str(compat.CPU_POOL_THREADS)), ("3", "3")):
        env = {k: v for k, v in os.environ.items() if k != "PJRT_NPROC"}
        if preset is not None:
            env["PJRT_NPROC"] = preset
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
        ).stdout.split()
        if preset is None and (cores or 1) >= compat.CPU_POOL_THREADS:
            want = "None"  # a machine that big keeps XLA's own size
        assert out == [want, "False"], out


@interpreted_only
def test_poisoned_output_and_nan_row() -> None:
    """The interpreter's allocations start as NaN (so skipped rows would show), and a NaN in x
    makes exactly its row of y NaN (relu propagates NaN)."""
    assert compat.mosaic_interpret_params().uninitialized_memory == "nan"
    spec = MLPSpec((16, 32, 32, 16), "relu", True, "float16")  # WIDTH 32: a 64-byte swizzle
    x, params, p = _inputs(spec, 130, seed=3)
    x[67, 5] = np.nan
    out = np.asarray(mfs.fused_small(jnp.asarray(x), p, spec), np.float64)
    assert np.isnan(out[67]).all() and not np.isnan(np.delete(out, 67, axis=0)).any()
    tolerance.assert_close(out, reference.forward(spec, x, params), spec)


@needs_interpreter
def test_matches_the_pallas_triton_kernel(record_property) -> None:
    """The same values as jax_impl/fused_small.py (Pallas-Triton, interpreted) within tolerance;
    the count of equal bits is reported, not asserted: the interpreters sum the products in
    their own orders (NumPy's matmul here, XLA's dot there): 19264 of 19264 elements equal on
    earlier sessions' CPUs, 19200 on an AMD EPYC with AVX2 and no AVX-512 (2026-12-07)."""
    from fusedmlp.jax_impl import fused_small as portable

    spec = MLPSpec((64,) * 6, "relu", False, "float16")
    x, params, p = _inputs(spec, 301, seed=11)
    ours = np.asarray(mfs.fused_small(jnp.asarray(x), p, spec))
    theirs = np.asarray(portable.fused_small(jnp.asarray(x), p, spec))
    equal = int(np.sum(ours.view(np.uint16) == theirs.view(np.uint16)))
    record_property("bitwise_equal", f"{equal} of {ours.size}")
    print(f"bitwise equal to the Pallas-Triton fused_small: {equal} of {ours.size}")
    tolerance.assert_close(ours, theirs.astype(np.float64), spec, what="against Pallas-Triton")
    tolerance.assert_close(ours, reference.forward(spec, x, params), spec)


@interpreted_only
def test_no_races_in_the_ring(monkeypatch) -> None:
    """The interpreter's happens-before race detector over the x ring, the y staging and the
    hidden tile, with the two-slot ring turning (700 rows: chains of 3, 3, 3 and 2 tiles) and a
    single y slot (each store waited on). A left-out `barrier_wait` of the ring raises here
    ("Barrier arrival was completed again before previous completion was observed")."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    cls = type(compat.mosaic_interpret_params())
    monkeypatch.setattr(compat, "mosaic_interpret_params", lambda: cls(detect_races=True))
    spec = MLPSpec((64, 64, 64, 64), "relu", True, "float16")
    x, params, p = _inputs(spec, 700, seed=5)
    cfg = Config(warpgroups=2, num_stages=2, out_slots=1, hidden_in_registers=False)
    out = mfs.fused_small(jnp.asarray(x), p, spec, config=cfg)
    assert not interpret_pallas_call.get_races().races_found
    tolerance.assert_close(out, reference.forward(spec, x, params), spec)


@needs_interpreter
def test_no_races_in_the_weight_ring(monkeypatch) -> None:
    """128 wide, the weights streamed through a ring of two slots that two chains share in step
    (460 rows: 8 tiles, 4 chains of 2 steps; 3 layers = 6 weight tiles a chain, so each slot is
    refilled twice), under the race detector: a slot refilled before every chain's wgmma has read
    it, or a missing wait on the ring's barriers, raises or is reported here."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    cls = type(compat.mosaic_interpret_params())
    monkeypatch.setattr(compat, "mosaic_interpret_params", lambda: cls(detect_races=True))
    spec = MLPSpec((128,) * 4, "relu", True, "float16")
    x, params, p = _inputs(spec, 460, seed=6)
    out = mfs.fused_small(jnp.asarray(x), p, spec, config=mfs.INTERPRET_RING_CONFIG)
    assert not interpret_pallas_call.get_races().races_found
    tolerance.assert_close(out, reference.forward(spec, x, params), spec)


@needs_interpreter
def test_jit_3d_input_and_empty() -> None:
    spec = MLPSpec((32, 32, 32), "relu", True, "bfloat16")
    x, params, p = _inputs(spec, 15, seed=7)
    fn = jax.jit(lambda x, p: mfs.fused_small(x, p, spec))
    out = fn(jnp.asarray(x).reshape(3, 5, 32), p)
    assert out.shape == (3, 5, 32)
    tolerance.assert_close(out.reshape(15, 32), reference.forward(spec, x, params), spec)
    empty = mfs.fused_small(jnp.zeros((0, 32), jnp.bfloat16), p, spec)
    assert empty.shape == (0, 32) and empty.dtype == jnp.bfloat16


# ---- what it does not take -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (MLPSpec((64, 64), "relu", False, "float32"), "dtype float32 is not supported"),
        (MLPSpec((64, 64, 64), "swiglu", True, "float16"), "gated activation 'swiglu'"),
        (MLPSpec((64, 256, 64), "relu", False, "float16"), "got 256 at widths\\[1\\]"),
        # 128 wide: the weight ring's square slots
        (MLPSpec((64, 128, 64), "relu", False, "float16"), "at 128 wide every width must be 128"),
        (MLPSpec((64,) * 10, "relu", False, "float16"), "at most 8 layers, got 9"),
        (MLPSpec((63, 64, 64), "relu", False, "float16"), "d_in=63 is not a multiple of 16"),
        (MLPSpec((64, 64, 4), "relu", False, "bfloat16"), "d_out=4 is not a multiple of 16"),
    ],
)
def test_unsupported_reasons(spec: MLPSpec, match: str) -> None:
    reason = mfs.unsupported_reason(spec, 1000)
    assert reason is not None and re.search(match, reason), reason
    assert "falls back to fused_small (Pallas-Triton" in reason
    x = jnp.zeros((4, spec.d_in), spec.dtype)
    params = {k: jnp.zeros(v, spec.dtype) for k, v in packed_names(spec).items()}
    with pytest.raises(NotImplementedError, match=match):
        mfs.fused_small(x, params, spec)


def test_supported_specs() -> None:
    nerf = get_preset("nerf-64x5").spec
    for spec in (
        nerf,
        MLPSpec((32,) * 9, "relu", False, "float16"),
        MLPSpec((16, 40, 16), "gelu_tanh", True, "bfloat16"),
        MLPSpec((128,) * 9, "relu", False, "float16"),
    ):
        assert mfs.unsupported_reason(spec, 1 << 20) is None, spec


def test_config_validation_and_mapping() -> None:
    with pytest.raises(ValueError, match="block_m: expected 64 or 128"):
        Config(block_m=32)
    with pytest.raises(ValueError, match="warpgroups: expected at most 8"):
        Config(warpgroups=9)
    with pytest.raises(ValueError, match="num_stages: expected an int >= 1"):
        Config(num_stages=0)
    spec = get_preset("nerf-64x5").spec
    # the portable kernel's configs: rows, stages and programs an SM as chains a block
    cfg = mfs.config_for(SmallConfig(128, 4, 4, 2), spec, 1 << 21, interpret=False)
    assert (cfg.block_m, cfg.num_stages, cfg.warpgroups) == (128, 4, 2)
    cfg = mfs.config_for(TileConfig(32, 64, 64, num_stages=2), spec, 100, interpret=False)
    assert (cfg.block_m, cfg.num_stages) == (64, 2)
    # the interpreter takes the hidden through shared memory whatever was asked
    assert not mfs.config_for(Config(), spec, 100, interpret=True).hidden_in_registers
    with pytest.raises(ValueError, match="bytes of shared memory a block"):
        mfs.check_config(mfs.geometry(spec, Config(warpgroups=8, num_stages=4)))
    mfs.check_config(mfs.geometry(spec, mfs.DEFAULT_CONFIG))
    # the weight ring: its knob, the square layers it takes, its tiles at 128 wide
    with pytest.raises(ValueError, match="weight_slots: expected an int >= 0"):
        Config(weight_slots=-1)
    with pytest.raises(ValueError, match=r"weight_slots: the ring streams square \[WIDTH, WIDTH\]"):
        mfs.check_config(mfs.geometry(spec.replace(widths=(32, 64, 64)), Config(weight_slots=2)))
    wide = MLPSpec((128,) * 9, "relu", False, "float16")
    assert mfs.default_config(wide, 1 << 20) == mfs.RING_CONFIG
    assert mfs.default_config(wide, 1 << 20, interpret=True) == mfs.INTERPRET_RING_CONFIG
    mfs.check_config(mfs.geometry(wide, mfs.RING_CONFIG))  # 192 KiB
    with pytest.raises(ValueError, match="bytes of shared memory a block"):  # every layer resident
        mfs.check_config(mfs.geometry(wide, dataclasses.replace(mfs.RING_CONFIG, weight_slots=0)))
    assert str(mfs.RING_CONFIG).endswith(" ring2")


def test_padded_rows() -> None:
    assert mfs.padded_rows(2_097_152, 64, interpret=False) == 2_097_152
    assert mfs.padded_rows(301, 64, interpret=False) == 304  # 8-row TMA atoms
    assert mfs.padded_rows(7, 64, interpret=False) == 7
    if not compat.mosaic_interpreter_models_tma_edges():
        assert mfs.padded_rows(301, 64, interpret=True) == 320  # whole tiles under jax 0.10


# ---- the GPU variant, lowered for CUDA on the CPU ------------------------------------------------
def _lower(spec: MLPSpec, m: int, config: Config) -> str:
    dt = jnp.dtype(spec.dtype)
    shapes = {k: jax.ShapeDtypeStruct(v, dt) for k, v in packed_names(spec).items()}
    x = jax.ShapeDtypeStruct((m, spec.d_in), dt)
    fn = lambda x, p: mfs.fused_small_fwd(x, p, spec, config=config, interpret=False)  # noqa: E731
    return lower_for_cuda(fn, x, shapes)


NERF = MLPSpec((64,) * 6, "relu", False, "float16")
# the 128-wide ring's tiles with every layer resident instead (measured: two layers 138.3 µs
# against the ring's 136.8, so not a default; it still lowers)
RESIDENT = {"warpgroups": 2, "num_stages": 2, "out_slots": 2}
LOWER_CASES = [
    (NERF, 1 << 21, mfs.DEFAULT_CONFIG),
    (NERF, 1 << 21, Config(auto_barriers=False)),
    (NERF, 1 << 21, Config(hidden_in_registers=False, num_stages=4)),
    (NERF, 1 << 21, Config(block_m=128, warpgroups=2, num_stages=2)),
    (NERF, 1 << 21, Config(warpgroups=1, blocks_per_sm=3, num_stages=2)),
    (MLPSpec((32,) * 9, "relu", False, "float16"), 1 << 20, Config(warpgroups=4, num_stages=4)),
    (MLPSpec((16, 48, 48, 16), "gelu", True, "bfloat16"), 301, Config(auto_barriers=False)),
    # 128 wide: the weight ring (its default tiles; with biases, a 3-slot ring over 2 chains)
    (MLPSpec((128,) * 9, "relu", False, "float16"), 1 << 20, mfs.RING_CONFIG),
    (
        MLPSpec((128,) * 5, "gelu_tanh", True, "bfloat16"),
        70_001,
        Config(warpgroups=2, num_stages=2, out_slots=2, weight_slots=3),
    ),
    (MLPSpec((128,) * 3, "gelu_tanh", True, "bfloat16"), 70_001, Config(**RESIDENT)),
]


LOWER_IDS = [
    "nerf", "nerf-nobar", "nerf-smemA-s4", "nerf-m128", "nerf-3blocks", "w32x8", "gelu-16",
    "w128x8-ring", "w128x4-gelu-ring3", "w128x2-gelu-resident",
]  # fmt: skip


@pytest.mark.parametrize(("spec", "m", "config"), LOWER_CASES, ids=LOWER_IDS)
def test_gpu_variant_lowers_for_cuda(monkeypatch, spec, m, config) -> None:
    """Mosaic GPU's lowering (no GPU needed) accepts the compiled variant, and its shared-memory
    total is the module's model to the byte (each allocation in whole KiB, 8 bytes a barrier)."""
    assert "mosaic_gpu" in _lower(spec, m, config)
    from jax.experimental.mosaic.gpu import core as mgpu_core

    monkeypatch.setattr(mgpu_core, "_SMEM_SIZE_BOUND", 1)  # every kernel "exceeds": read the total
    with pytest.raises(ValueError, match="exceeds available shared memory") as err:
        _lower(spec, m, config)
    got = int(re.search(r"smem_bytes=(\d+)", str(err.value)).group(1))
    assert got == mfs.geometry(spec, config).smem_bytes()


def test_the_rule_of_the_sibling(monkeypatch) -> None:
    """jax_impl/fused_small takes the sibling on Hopper, unpinned, 16-bit, at padded width 64 or
    128 and where the sibling takes the spec; `plan()` then names it and its tiles."""
    from fusedmlp.jax_impl import front
    from fusedmlp.jax_impl import fused_small as portable

    monkeypatch.setattr(portable, "on_hopper", lambda: True)
    rule = functools.partial(portable._takes_mosaic_sibling, config=None, interpret=False)
    nerf = get_preset("nerf-64x5").spec
    assert rule(nerf)
    assert rule(MLPSpec((48, 64, 40, 16), "gelu_tanh", True, "bfloat16"))  # pads to 64
    assert not rule(MLPSpec((32,) * 9, "relu", False, "float16"))  # 32 wide: lost there
    assert not rule(nerf.replace(dtype="float32"))
    assert not rule(MLPSpec((64, 64, 64), "swiglu", True, "float16"))  # gated: not yet
    assert not rule(MLPSpec((60, 64, 64), "relu", False, "float16"))  # d_in: not whole atoms
    # 128 wide: the weight ring, every width 128
    assert rule(MLPSpec((128,) * 9, "relu", False, "float16"))
    assert rule(MLPSpec((128,) * 3, "gelu_tanh", True, "bfloat16"))
    assert not rule(MLPSpec((128, 96, 128), "relu", False, "float16"))  # 128 wide: all 128
    assert not rule(MLPSpec((128,) * 9, "relu", False, "float32"))
    assert mfs.default_config(MLPSpec((128,) * 3, "relu", False, "float16"), 1) == mfs.RING_CONFIG
    # default tiles past shared memory: the Pallas-Triton kernel runs, not a launch that raises
    with monkeypatch.context() as patch:
        patch.setattr(mfs, "default_config", lambda spec, m, **kw: Config(num_stages=16))
        assert not rule(nerf)
    assert not portable._takes_mosaic_sibling(nerf, SmallConfig(64, 4, 3), False)  # pinned
    assert not portable._takes_mosaic_sibling(nerf, None, True)  # interpreted
    # the sibling's own tiles pin the sibling, interpreted too: they are what a plan records
    assert portable._takes_mosaic_sibling(nerf, mfs.DEFAULT_CONFIG, False)
    assert portable._takes_mosaic_sibling(nerf, Config(warpgroups=2), True)
    monkeypatch.setattr(front, "_sibling_runs", lambda *args: True)
    the_plan = front.plan(nerf, (4099, 64), impl="fused_small")
    assert (
        "Mosaic GPU sibling" in the_plan.reason and "64 wide, weights resident" in the_plan.reason
    )
    assert the_plan.launches[0].config == mfs.default_config(nerf, 4099, interpret=True)
    deep = MLPSpec((128,) * 9, "relu", False, "float16")
    the_plan = front.plan(deep, (4099, 128), impl="fused_small")
    assert "128 wide, a weight ring" in the_plan.reason
    assert the_plan.launches[0].config == mfs.INTERPRET_RING_CONFIG


@needs_interpreter
def test_the_front_runs_the_sibling_at_the_plans_tiles(monkeypatch) -> None:
    """Where the plan names the sibling, the front's launch hands the sibling's tiles to
    jax_impl/fused_small, which must run the sibling with them (the H200 at 1f0f4a2: the
    Pallas-Triton launcher read them as its own tiles and raised AttributeError)."""
    from fusedmlp.jax_impl import front

    monkeypatch.setattr(front, "_sibling_runs", lambda *args: True)
    spec = get_preset("nerf-64x5").spec
    x, params, p = _inputs(spec, 70, seed=23)
    via_front = np.asarray(front.mlp(jnp.asarray(x), p, spec, impl="fused_small"))
    direct = np.asarray(mfs.fused_small(jnp.asarray(x), p, spec))  # the interpreter's tiles
    np.testing.assert_array_equal(via_front.view(np.uint16), direct.view(np.uint16))
    tolerance.assert_close(via_front, reference.forward(spec, x, params), spec)


def test_probe_smoke(tmp_path) -> None:
    """bench/mosaic_small_probe.py under the interpreter: both cases run at the interpreter's
    config, pass the reference and agree with the (pinned) Pallas-Triton kernel under the tolerance
    policy, the equal bits counted. Not asserted bit for bit here, as in
    test_matches_the_pallas_triton_kernel: the two interpreters sum products in their own orders
    (NumPy's matmul, XLA's dot): every element equal at nerf on earlier sessions' CPUs, 19187 of
    19264 on an AMD EPYC with AVX2 and no AVX-512 (2026-12-07). On the GPU
    test_gpu_nerf_against_pallas_triton asserts the bits."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "mosaic_small_probe.py"
    module_spec = importlib.util.spec_from_file_location("mosaic_small_probe", path)
    probe = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(probe)
    out = tmp_path / "probe.json"
    assert probe.main(["--smoke", "--out", str(out)]) == 0
    rows = [r for r in json.loads(out.read_text())["rows"] if r["impl"] == "mosaic"]
    assert [r["case"] for r in rows] == ["nerf", "w32x8"]
    assert all(r["ref_pass"] and r["twin_pass"] for r in rows), rows
    assert all(0 < r["bitwise_equal"] <= r["elements"] for r in rows), rows


# ---- on the GPU ----------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("config", [mfs.DEFAULT_CONFIG, Config(hidden_in_registers=False)], ids=str)
def test_gpu_nerf_against_pallas_triton(config: Config) -> None:
    # the Pallas-Triton kernel pinned to its default tiles (unpinned, fused_small takes this
    # sibling here): the same bits at nerf-64x5 (H200, 0bbeb43: 134,217,728 of 134,217,728)
    from fusedmlp.common.tiling import fused_small_config
    from fusedmlp.jax_impl import fused_small as portable

    spec = get_preset("nerf-64x5").spec
    m = 100_003
    x, params, p = _inputs(spec, m, seed=21)
    ours = np.asarray(mfs.fused_small(jnp.asarray(x), p, spec, config=config))
    tiles = fused_small_config(spec, m)
    theirs = np.asarray(portable.fused_small(jnp.asarray(x), p, spec, config=tiles))
    np.testing.assert_array_equal(ours.view(np.uint16), theirs.view(np.uint16))
    tolerance.assert_close(ours, reference.forward(spec, x, params), spec)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "spec",
    [
        MLPSpec((128,) * 9, "relu", False, "float16"),
        MLPSpec((128,) * 3, "gelu", True, "bfloat16"),
    ],
    ids=["w128x8", "w128x2-gelu"],
)
def test_gpu_128_wide_through_the_front(spec: MLPSpec) -> None:
    # jax_impl/fused_small takes the sibling at 128 wide (the weight ring): the
    # front's call is the sibling's, within the policy of the reference and, relu, the same bits
    # as the pinned Pallas-Triton kernel (H200, 5ec3c30: 134,217,728 of 134,217,728 at 128x8)
    from fusedmlp import jax_impl
    from fusedmlp.common.tiling import fused_small_config
    from fusedmlp.jax_impl import fused_small as portable

    m = 70_001
    x, params, p = _inputs(spec, m, seed=24)
    assert portable._takes_mosaic_sibling(spec, None, False)
    assert "128 wide, a weight ring" in jax_impl.plan(spec, x.shape, impl="fused_small").reason
    y = np.asarray(jax_impl.mlp(jnp.asarray(x), p, spec, impl="fused_small"))
    direct = np.asarray(mfs.fused_small(jnp.asarray(x), p, spec))
    np.testing.assert_array_equal(y.view(np.uint16), direct.view(np.uint16))
    tolerance.assert_close(y, reference.forward(spec, x, params), spec)
    if spec.activation == "relu":
        tiles = fused_small_config(spec, m)
        theirs = np.asarray(portable.fused_small(jnp.asarray(x), p, spec, config=tiles))
        np.testing.assert_array_equal(y.view(np.uint16), theirs.view(np.uint16))


@pytest.mark.gpu
def test_gpu_fused_small_takes_the_sibling_at_64_wide() -> None:
    # jax_impl/fused_small on Hopper: the sibling at padded width 64 (and 128) at the default
    # tiles only
    from fusedmlp.jax_impl import fused_small as portable

    nerf = get_preset("nerf-64x5").spec
    assert portable._takes_mosaic_sibling(nerf, None, False)
    assert not portable._takes_mosaic_sibling(nerf, SmallConfig(64, 4, 3), False)  # pinned tiles
    assert not portable._takes_mosaic_sibling(nerf, None, True)  # interpreted
    narrower = MLPSpec((32,) * 9, "relu", False, "float16")  # 32 wide: the sibling lost there
    assert not portable._takes_mosaic_sibling(narrower, None, False)
    x, _, p = _inputs(nerf, 4099, seed=22)
    via_front = np.asarray(portable.fused_small(jnp.asarray(x), p, nerf))
    direct = np.asarray(mfs.fused_small(jnp.asarray(x), p, nerf))
    np.testing.assert_array_equal(via_front.view(np.uint16), direct.view(np.uint16))
    # and through the JAX front, by name and by auto (the plan's launch carries the sibling's
    # tiles; 1f0f4a2's bench found that path raising AttributeError)
    from fusedmlp import jax_impl

    assert "Mosaic GPU sibling" in jax_impl.plan(nerf, x.shape, impl="fused_small").reason
    y = np.asarray(jax_impl.mlp(jnp.asarray(x), p, nerf, impl="fused_small"))
    np.testing.assert_array_equal(y.view(np.uint16), direct.view(np.uint16))
    # auto at the preset's size (its dispatch point) resolves to the same route
    auto_plan = jax_impl.plan(nerf, (2_097_152, 64), impl="auto")
    assert auto_plan.impl == "fused_small" and "Mosaic GPU sibling" in auto_plan.reason
