"""pallas_mosaic: the Mosaic GPU siblings (jax_impl/mosaic/) against the float64 reference.

On a CPU machine every kernel runs under the Mosaic GPU interpreter (TMA copies, barriers and wgmma
are simulated; 0.5-1.5 s a launch at the interpreter tiles, 64×64×16, 2 stages), and the compiled
variant is lowered for CUDA without running. The MLP is chained per layer through the public
functions: `gated` for gated hidden layers, `linear_act` otherwise. `-m gpu` runs the compiled
kernels at the default (large) tiles on an H100.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusedmlp.common import golden, reference, tolerance
from fusedmlp.common.config import TileConfig
from fusedmlp.common.params import init_params, make_input
from fusedmlp.common.spec import MLPSpec
from fusedmlp.jax_impl import compat
from fusedmlp.jax_impl import mosaic as mosaic_pkg
from fusedmlp.jax_impl.mosaic import gated as gated_mod
from fusedmlp.jax_impl.mosaic import linear_act as linear_act_mod
from fusedmlp.jax_impl.mosaic import pipeline
from fusedmlp.jax_impl.mosaic.gated import gated
from fusedmlp.jax_impl.mosaic.linear_act import linear_act

pytest.importorskip("absl")  # jax.experimental.pallas.mosaic_gpu needs it on CPU machines

SIXTEEN_BIT = ("float16", "bfloat16")
GOLDEN = [n for n in golden.case_names() if golden.load(n).spec.dtype in SIXTEEN_BIT]


@pytest.fixture(autouse=True)
def _reset_interpreter():
    """An exception inside an interpreted kernel leaves the interpreter's state dirty (jax docs)."""
    yield
    if not compat.on_gpu():
        from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

        interpret_pallas_call.reset_gpu_interpret_mode_state()


def mlp_per_layer(x, params, spec: MLPSpec, *, residual=None, config=None):
    """The spec's MLP, one public-function call per layer (the dispatcher's per-layer plan)."""
    h = jnp.asarray(x)
    last = spec.num_layers - 1
    for layer in spec.layers():
        i = layer.index
        p = {k: jnp.asarray(v) for k, v in params.items()}
        if layer.gated:
            h = gated(h, p[f"w{i}"], p[f"v{i}"], p.get(f"b{i}"), p.get(f"c{i}"),
                      activation=layer.activation, config=config)
        else:
            h = linear_act(h, p[f"w{i}"], p.get(f"b{i}"), activation=layer.activation,
                           residual=residual if i == last else None, config=config)
    return h


# ---- golden parity -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", GOLDEN)
def test_golden(name: str) -> None:
    case = golden.load(name)
    out = mlp_per_layer(case.x, case.params, case.spec)
    assert out.shape == case.y.shape
    assert out.dtype == jnp.dtype(case.spec.dtype)
    tolerance.assert_close(out, case.y, case.spec, what=name)


def test_golden_inside_jit() -> None:
    case = golden.load("swiglu-bfloat16-bias")
    params = {k: jnp.asarray(v) for k, v in case.params.items()}
    fn = jax.jit(lambda x, p: mlp_per_layer(x, p, case.spec))
    out = fn(jnp.asarray(case.x), params)
    tolerance.assert_close(out, case.y, case.spec, what="jit")


# ---- fresh inputs: several M tiles, ring depths, residual, 3-D, M=1, M=0 -------------------------
@pytest.mark.parametrize(
    ("activation", "dtype", "bias", "m", "stages", "seed"),
    [
        ("gelu_tanh", "float16", True, 131, 1, 1),  # 3 M tiles; a one-slot ring (no overlap)
        ("geglu", "bfloat16", False, 70, 3, 2),  # 2 M tiles; 3 slots, fewer K steps than slots
        ("silu", "bfloat16", True, 1, 2, 3),
    ],
)
def test_fresh_inputs(activation, dtype, bias, m, stages, seed) -> None:
    spec = MLPSpec((45, 83, 29), activation, bias, dtype)
    params = init_params(spec, seed=seed)
    x = make_input(spec, m, seed=seed + 100)
    config = TileConfig(64, 64, 16, group_m=2, num_stages=stages)
    out = mlp_per_layer(x, params, spec, config=config)
    tolerance.assert_close(out, reference.forward(spec, x, params), spec)


def test_residual_and_3d_input() -> None:
    spec = MLPSpec((37, 22), "relu", True, "float16")  # one layer: identity + residual
    params = init_params(spec, seed=7)
    x = make_input(spec, (3, 5), seed=8)
    r = np.random.default_rng(9).standard_normal((3, 5, 22)).astype(np.float16)
    out = mlp_per_layer(x, params, spec, residual=jnp.asarray(r))
    assert out.shape == (3, 5, 22)
    ref = reference.forward(spec, x, params) + r.astype(np.float64)
    tolerance.assert_close(out, ref, spec)


@pytest.mark.parametrize("fn", ["linear_act", "gated"])
def test_m0_returns_empty(fn: str) -> None:
    x = jnp.zeros((2, 0, 33), jnp.bfloat16)
    w = jnp.ones((33, 67), jnp.bfloat16)
    out = linear_act(x, w) if fn == "linear_act" else gated(x, w, w)
    assert out.shape == (2, 0, 67)
    assert out.dtype == jnp.bfloat16


# ---- what pallas_mosaic does not take ------------------------------------------------------------
def test_float32_not_implemented_names_fallback() -> None:
    x = jnp.ones((4, 16), jnp.float32)
    w = jnp.ones((16, 8), jnp.float32)
    reason = mosaic_pkg.unsupported_reason(4, 8, 16, "float32")
    assert reason is not None and "pallas_triton" in reason and "float32" in reason
    with pytest.raises(NotImplementedError, match="falls back to impl 'pallas_triton'"):
        linear_act(x, w)
    with pytest.raises(NotImplementedError, match="dtype float32 is not supported"):
        gated(x, w, w)
    assert mosaic_pkg.unsupported_reason(4, 8, 16, "bfloat16") is None


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda x, w: linear_act(x, w[:8]), r"w: expected shape \(16, 8\), got \(8, 8\)"),
        (lambda x, w: linear_act(x, w.astype(jnp.bfloat16)), "w: expected dtype float16"),
        (lambda x, w: linear_act(x, w, jnp.ones((9,), jnp.float16)),
         r"b: expected shape \(8,\), got \(9,\)"),
        (lambda x, w: linear_act(x, w, residual=jnp.ones((4, 9), jnp.float16)),
         r"residual: expected shape \(4, 8\), got \(4, 9\)"),
        (lambda x, w: linear_act(x, w, activation="swish"), "activation: expected one of"),
        (lambda x, w: linear_act(x, None), "w: expected a 2-D jax.Array, got None"),
        (lambda x, w: gated(x, w, None), r"v: expected a jax.Array of shape \(16, 8\), got None"),
        (lambda x, w: linear_act(x.astype(jnp.int32), w), "x: expected a floating dtype"),
        (lambda x, w: gated(x, w, w[:, :4]), r"v: expected shape \(16, 8\), got \(16, 4\)"),
        (lambda x, w: gated(x, w, w, c=jnp.ones((8,), jnp.bfloat16)), "c: expected dtype float16"),
        (lambda x, w: linear_act(x, w, config=TileConfig(32, 64, 16)),
         "config.block_m: expected a multiple of 64"),
        (lambda x, w: linear_act(x, w, config=TileConfig(64, 32, 16)),
         "config.block_n: expected a multiple of 64 for float16"),
        (lambda x, w: gated(x, w, w, config=TileConfig(128, 128, 64)),
         "2 × block_m × block_n"),
        (lambda x, w: linear_act(x, w, config=TileConfig(64, 256, 128, num_stages=4)),
         "bytes of shared memory"),
        (lambda x, w: linear_act(x, w, fp32_precision="high"), "fp32_precision: expected one of"),
    ],
)
def test_validation_messages(call, match) -> None:
    x = jnp.ones((4, 16), jnp.float16)
    w = jnp.ones((16, 8), jnp.float16)
    with pytest.raises((ValueError, TypeError), match=match):
        call(x, w)


def test_config_mapping() -> None:
    # The heuristic tiles fit one warpgroup and the H100's shared memory, with a residual tile too.
    for family, weights in (("linear_act", 1), ("gated", 2)):
        for m in (1, 64, 4096):
            for dtype in SIXTEEN_BIT:
                cfg = pipeline.default_config(family, m, 4096, 4096, dtype)
                pipeline.check_config(cfg, dtype, num_weights=weights, residual=True)
    assert pipeline.default_config("gated", 19, 67, 33, "float16", interpret=True) == (
        pipeline.INTERPRET_CONFIG)
    assert linear_act_mod.FAMILY == "linear_act" and gated_mod.FAMILY == "gated"


# ---- GPU: the compiled kernels at their default tiles --------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["gelu", "swiglu", "geglu_tanh", "relu"])
@pytest.mark.parametrize("dtype", SIXTEEN_BIT)
def test_gpu_default_tiles(activation: str, dtype: str) -> None:
    spec = MLPSpec((520, 1000, 264), activation, True, dtype)
    params = init_params(spec, seed=11)
    x = make_input(spec, 300, seed=12)
    out = jax.jit(lambda x, p: mlp_per_layer(x, p, spec))(
        jnp.asarray(x), {k: jnp.asarray(v) for k, v in params.items()})
    tolerance.assert_close(out, reference.forward(spec, x, params), spec)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "name", ["geglu-float16-bias", "silu-bfloat16-nobias", "m1-swiglu-bfloat16"]
)
def test_gpu_golden_interpreter_tiles(name: str) -> None:
    # The tiles the interpreter checks are legal on the GPU too: the same code path, compiled.
    case = golden.load(name)
    out = mlp_per_layer(case.x, case.params, case.spec, config=pipeline.INTERPRET_CONFIG)
    tolerance.assert_close(out, case.y, case.spec, what=name)


# ---- the GPU variant, lowered for CUDA on the CPU ------------------------------------------------
@pytest.mark.parametrize(
    ("family", "dtype", "activation", "bias", "config"),
    [
        ("linear_act", "float16", "gelu", True, None),
        ("linear_act", "bfloat16", "identity", False, None),
        ("gated", "bfloat16", "gelu_tanh", True, None),
        ("gated", "float16", "silu", False, None),
        ("linear_act", "bfloat16", "relu", True, pipeline.INTERPRET_CONFIG),
        ("gated", "float16", "gelu", True, pipeline.INTERPRET_CONFIG),
        ("linear_act", "float16", "silu", True, TileConfig(128, 128, 64, num_stages=1)),
    ],
)
def test_gpu_variant_lowers_for_cuda(family, dtype, activation, bias, config) -> None:
    """The interpreter runs the `interpret=True` variant and checks none of wgmma's, TMA's or the
    register layouts' constraints; lowering the GPU variant to a Mosaic GPU module for CUDA (no GPU
    needed) does. It stops short of ptxas and of running."""
    m, k, n = 300, 520, 1000
    dt = jnp.dtype(dtype)
    cfg = config or pipeline.default_config(family, m, n, k, dtype)
    x = jax.ShapeDtypeStruct((m, k), dt)
    w = jax.ShapeDtypeStruct((k, n), dt)
    b = jax.ShapeDtypeStruct((n,), dt) if bias else None
    if family == "linear_act":
        r = jax.ShapeDtypeStruct((m, n), dt) if bias else None
        fn = lambda x, w, b, r: linear_act_mod.linear_act_fwd(  # noqa: E731
            x, w, b, r, activation=activation, config=cfg, interpret=False)
        args = (x, w, b, r)
    else:
        fn = lambda x, w, b: gated_mod.gated_fwd(  # noqa: E731
            x, w, b, w, b, activation=activation, config=cfg, interpret=False)
        args = (x, w, b)
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


# ---- the interpreter's race detector over the TMA ring -------------------------------------------
@pytest.mark.parametrize("stages", [2, 3])
def test_no_races_in_ring(monkeypatch, stages: int) -> None:
    """With detect_races the interpreter keeps vector clocks for the TMA unit and the warpgroup and
    flags an smem access not ordered by a barrier (and raises when a barrier completes twice
    unseen, as when a barrier_wait is left out). It does not model wgmma as asynchronous, so a
    refill of a slot that an in-flight wgmma still reads would go unseen: that rests on
    wgmma_wait."""
    import dataclasses

    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    params = dataclasses.replace(compat.mosaic_interpret_params(), detect_races=True)
    monkeypatch.setattr(pipeline, "interpret_param", lambda interpret: params)
    spec = MLPSpec((45, 83, 29), "swiglu", True, "float16")
    p = init_params(spec, seed=21)
    x = make_input(spec, 70, seed=22)
    r = np.random.default_rng(23).standard_normal((70, 29)).astype(np.float16)
    config = TileConfig(64, 64, 16, group_m=2, num_stages=stages)
    out = mlp_per_layer(x, p, spec, residual=jnp.asarray(r), config=config)
    assert not interpret_pallas_call.get_races().races_found
    tolerance.assert_close(out, reference.forward(spec, x, p) + r.astype(np.float64), spec)
