"""pallas_mosaic: the Mosaic GPU siblings (jax_impl/mosaic/) against the float64 reference.

On a CPU machine every kernel runs under the Mosaic GPU interpreter, the warp-specialised pipeline
included (three warpgroups, TMA copies, barriers and wgmma are simulated; 1-2 s a launch under jax
0.11.2, 3-7 s under 0.10.2 at 64-128-row tiles), and the compiled variant is lowered for CUDA
without running — a lowering that runs Mosaic GPU's own checks (layouts, swizzles, TMA tiling,
shared memory). The MLP is chained per layer through the public functions: `gated` (on the packed
[W|V] operand) for gated hidden layers, `linear_act` otherwise. `-m gpu` runs the compiled kernels.

Shapes: M, N and K are ragged against every tile (TMA zero-fills and clips; nothing is padded under
jax 0.11) but K and N are multiples of 16 (Mosaic GPU's swizzled TMA tiles need it; other widths
fall back to pallas_triton: the golden cases, of widths 13..97, are refused by name in
tests/test_parity_golden.py's one golden body).
"""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusedmlp.common import reference, tolerance
from fusedmlp.common.config import TileConfig
from fusedmlp.common.packing import packed_width
from fusedmlp.common.params import init_params, make_input
from fusedmlp.common.spec import MLPSpec
from fusedmlp.jax_impl import compat, packing
from fusedmlp.jax_impl import mosaic as mosaic_pkg
from fusedmlp.jax_impl.activations import ACTIVATION_KEYS, apply_activation
from fusedmlp.jax_impl.mosaic import gated as gated_mod
from fusedmlp.jax_impl.mosaic import linear_act as linear_act_mod
from fusedmlp.jax_impl.mosaic import pipeline
from fusedmlp.jax_impl.mosaic.gated import gated
from fusedmlp.jax_impl.mosaic.linear_act import linear_act
from helpers import layer_ref, layer_spec, lower_for_cuda

pytest.importorskip("absl")  # jax.experimental.pallas.mosaic_gpu needs it on CPU machines

SIXTEEN_BIT = ("float16", "bfloat16")
WS = pipeline.INTERPRET_CONFIG  # 128×64×16, two slots, warp-specialised
ONE_WG = TileConfig(64, 64, 16, group_m=2, num_stages=3)  # one warpgroup, three slots
ONE_SLOT = TileConfig(64, 64, 32, group_m=1, num_stages=1)  # one warpgroup, no overlap
SPLIT_N = TileConfig(64, 128, 16, group_m=2, num_stages=2, warp_specialize=True)  # gated: N split


def _ws(
    block_m: int, block_n: int, stages: int, subtile: int = 1, *, pingpong: bool = False
) -> TileConfig:
    """A warp-specialised 64-deep config (the GPU variant's large tiles)."""
    return TileConfig(
        block_m,
        block_n,
        64,
        num_stages=stages,
        warp_specialize=True,
        epilogue_subtile=subtile,
        programs_per_sm=2 if pingpong else 1,
    )


SUBTILED = TileConfig(
    128, 128, 16, group_m=2, num_stages=2, warp_specialize=True, epilogue_subtile=2
)  # linear_act: two 64-column epilogue tiles per warpgroup
# ping-pong: each compute warpgroup a whole 128×64 tile (gated: one gate/up pair) and a ring of
# two slots of its own, the two taking turns at the K loop (pipeline.pingpong_matmul)
PINGPONG = dataclasses.replace(WS, programs_per_sm=2)


@pytest.fixture(autouse=True)
def _reset_interpreter():
    """An exception inside an interpreted kernel leaves the interpreter's state dirty (jax docs)."""
    yield
    if not compat.on_gpu():
        from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

        interpret_pallas_call.reset_gpu_interpret_mode_state()


def mlp_per_layer(x, params, spec: MLPSpec, *, residual=None, config=None, gated_config=None):
    """The spec's MLP, one public-function call per layer (the dispatcher's per-layer plan), gated
    layers on their packed weights (packed here once, as `pack_params` does)."""
    h = jnp.asarray(x)
    p = packing.pack_params(spec, {k: jnp.asarray(v) for k, v in params.items()})
    last = spec.num_layers - 1
    for layer in spec.layers():
        i = layer.index
        if layer.gated:
            h = gated(
                h,
                p[f"wv{i}"],
                p.get(f"bc{i}"),
                n=layer.d_out,
                activation=layer.activation,
                config=gated_config or config,
            )
        else:
            h = linear_act(
                h,
                p[f"w{i}"],
                p.get(f"b{i}"),
                activation=layer.activation,
                residual=residual if i == last else None,
                config=config,
            )
    return h


# ---- fresh inputs: every activation, both dtypes, bias or not, ragged tiles, both pipelines ----
@pytest.mark.parametrize(
    ("activation", "dtype", "bias", "m", "config", "gated_config"),
    [
        ("swiglu", "bfloat16", True, 136, WS, None),  # 2 M tiles (one ragged), 2 blocks
        ("geglu", "float16", False, 70, ONE_WG, None),  # one warpgroup, 3 slots
        ("geglu_tanh", "bfloat16", True, 1, WS, SPLIT_N),  # M=1; gated split along N
        ("gelu", "float16", True, 131, ONE_SLOT, None),  # odd M: rows padded to 136
        ("gelu_tanh", "bfloat16", False, 200, SUBTILED, None),  # 2 epilogue tiles a warpgroup
        ("relu", "float16", True, 64, WS, None),
        ("silu", "bfloat16", False, 9, ONE_WG, None),
        # ping-pong: 3 M tiles (5 tiles a layer over 2 blocks: 3 and 2, so each warpgroup's
        # count and the odd one out are both walked), biases, a ragged last tile
        ("swiglu", "float16", True, 300, PINGPONG, None),
        ("gelu_tanh", "bfloat16", False, 136, PINGPONG, None),
    ],
)
@pytest.mark.jax_matrix
def test_fresh_inputs(activation, dtype, bias, m, config, gated_config) -> None:
    spec = MLPSpec((48, 80, 32), activation, bias, dtype)  # N=80: a ragged 64-column tile
    params = init_params(spec, seed=m)
    x = make_input(spec, m, seed=m + 100)
    out = mlp_per_layer(x, params, spec, config=config, gated_config=gated_config)
    assert out.shape == (m, 32) and out.dtype == jnp.dtype(dtype)
    tolerance.assert_close(out, reference.forward(spec, x, params), spec, what=activation)


# 192 columns: whole 64-column swizzle atoms, not a power of two (common/config.py): the tile that
# fills the waves of hf-blog-geglu's N = 768 GEMMs (bench/sweep_mosaic.py)
WIDE = TileConfig(128, 192, 32, group_m=2, num_stages=2, warp_specialize=True)


@pytest.mark.parametrize("dtype", SIXTEEN_BIT)
def test_a_192_wide_tile(dtype: str) -> None:
    # N = 448: two whole 192-column tiles and a ragged third; M = 200: a ragged second row tile
    spec = MLPSpec((96, 448), "relu", True, dtype)
    params = init_params(spec, seed=3)
    x = make_input(spec, 200, seed=4)
    out = mlp_per_layer(x, params, spec, config=WIDE)
    tolerance.assert_close(out, reference.forward(spec, x, params), spec, what="192-wide tile")


def test_bilinear_gate_and_k_ragged_against_the_slab() -> None:
    # identity gate (the bilinear GLU); K=48 against 32-wide slabs (the second one half past the
    # end of X and WV: zero-filled), N=48 < one 64-column gate/up pair
    spec = MLPSpec((48, 48), "relu", True, "float16")  # only for the tolerance's dtype bounds
    rng = np.random.default_rng(5)
    x = rng.standard_normal((152, 48)).astype(np.float16)
    w, v = (rng.standard_normal((48, 48)).astype(np.float16) / 7 for _ in range(2))
    b, c = (rng.standard_normal(48).astype(np.float16) for _ in range(2))
    wv, bc = packing.pack_gated(jnp.asarray(w), jnp.asarray(v)), packing.pack_gated(b, c)
    config = TileConfig(128, 64, 32, group_m=2, num_stages=2, warp_specialize=True)
    out = gated(jnp.asarray(x), wv, jnp.asarray(bc), n=48, activation="identity", config=config)
    f64 = [a.astype(np.float64) for a in (x, w, v, b, c)]
    ref = (f64[0] @ f64[1] + f64[3]) * (f64[0] @ f64[2] + f64[4])
    tolerance.assert_close(out, ref, spec, what="identity gate")


@pytest.mark.parametrize("config", [ONE_WG, WS], ids=["one_warpgroup", "warp_specialized"])
def test_one_k_step_fewer_than_the_slots(config: TileConfig) -> None:
    spec = MLPSpec((16, 64), "relu", True, "bfloat16")  # one layer, K=16: a single K step
    params = init_params(spec, seed=31)
    x = make_input(spec, 72, seed=32)
    out = mlp_per_layer(x, params, spec, config=config)
    tolerance.assert_close(out, reference.forward(spec, x, params), spec)


def test_residual_and_3d_input() -> None:
    spec = MLPSpec((32, 48), "relu", True, "float16")  # one layer: identity + residual
    params = init_params(spec, seed=7)
    x = make_input(spec, (3, 5), seed=8)  # M=15: rows padded to 16
    r = np.random.default_rng(9).standard_normal((3, 5, 48)).astype(np.float16)
    out = mlp_per_layer(x, params, spec, residual=jnp.asarray(r), config=SUBTILED)
    assert out.shape == (3, 5, 48)
    ref = reference.forward(spec, x, params) + r.astype(np.float64)
    tolerance.assert_close(out, ref, spec)


def test_inside_jit() -> None:
    spec = MLPSpec((32, 64, 16), "swiglu", True, "bfloat16")
    params = init_params(spec, seed=3)
    x = make_input(spec, 24, seed=4)
    fn = jax.jit(lambda x, p: mlp_per_layer(x, p, spec))
    out = fn(jnp.asarray(x), {k: jnp.asarray(v) for k, v in params.items()})
    tolerance.assert_close(out, reference.forward(spec, x, params), spec, what="jit")


@pytest.mark.parametrize("fn", ["linear_act", "gated"])
def test_m0_returns_empty(fn: str) -> None:
    x = jnp.zeros((2, 0, 32), jnp.bfloat16)
    w = jnp.ones((32, 80), jnp.bfloat16)
    wv = jnp.ones((32, packed_width(80)), jnp.bfloat16)
    out = linear_act(x, w) if fn == "linear_act" else gated(x, wv, n=80)
    assert out.shape == (2, 0, 80)
    assert out.dtype == jnp.bfloat16


# ---- what pallas_mosaic does not take ------------------------------------------------------------
def test_float32_not_implemented_names_fallback() -> None:
    x = jnp.ones((4, 16), jnp.float32)
    w = jnp.ones((16, 16), jnp.float32)
    reason = mosaic_pkg.unsupported_reason(4, 16, 16, "float32")
    assert reason is not None and "pallas_triton" in reason and "float32" in reason
    with pytest.raises(NotImplementedError, match="falls back to impl 'pallas_triton'"):
        linear_act(x, w)
    with pytest.raises(NotImplementedError, match="dtype float32 is not supported"):
        gated(x, jnp.ones((16, packed_width(16)), jnp.float32), n=16)
    assert mosaic_pkg.unsupported_reason(4, 16, 16, "bfloat16") is None


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda x, w, wv: linear_act(x, w[:8]), r"w: expected shape \[16, 32\], got \[8, 32\]"),
        (lambda x, w, wv: linear_act(x, w.astype(jnp.bfloat16)), "w: expected dtype float16"),
        (
            lambda x, w, wv: linear_act(x, w, jnp.ones((9,), jnp.float16)),
            r"b: expected shape \[32\], got \[9\]",
        ),
        (
            lambda x, w, wv: linear_act(x, w, residual=jnp.ones((4, 9), jnp.float16)),
            r"residual: expected shape \[4, 32\], got \[4, 9\]",
        ),
        (lambda x, w, wv: linear_act(x, w, activation="swish"), "activation: expected one of"),
        (lambda x, w, wv: linear_act(x, None), r"w: expected a jax\.Array, got NoneType"),
        (lambda x, w, wv: gated(x, None, n=32), r"wv: expected a jax\.Array, got NoneType"),
        (lambda x, w, wv: linear_act(x.astype(jnp.int32), w), "x: expected dtype one of"),
        (lambda x, w, wv: gated(x, w, n=32), r"wv: expected shape \[16, 128\], got \[16, 32\]"),
        (lambda x, w, wv: gated(x, wv, n=0), "n: expected a positive int"),
        (
            lambda x, w, wv: gated(x, wv, jnp.ones((128,), jnp.bfloat16), n=32),
            "bc: expected dtype float16",
        ),
        (
            lambda x, w, wv: linear_act(x, w, config=TileConfig(32, 64, 16)),
            "config.block_m: expected 64, 128 or 256",
        ),
        (
            lambda x, w, wv: linear_act(x, w, config=TileConfig(64, 32, 16)),
            "config.block_n: expected at least 64",
        ),
        (
            lambda x, w, wv: gated(x, wv, n=32, config=TileConfig(128, 128, 64)),
            "a compute warpgroup's fp32 accumulator would be 128 × 256",
        ),
        (
            lambda x, w, wv: gated(x, wv, n=32, config=TileConfig(64, 32, 64)),
            "config.block_n: expected a multiple of 64 for gated",
        ),
        (
            lambda x, w, wv: linear_act(x, w, config=TileConfig(64, 64, 16, warp_specialize=True)),
            "expected at least 128 with warp_specialize",
        ),
        (
            lambda x, w, wv: gated(
                x,
                wv,
                n=32,
                config=TileConfig(128, 64, 16, warp_specialize=True, epilogue_subtile=2),
            ),
            "must be a multiple of 64",
        ),
        (
            lambda x, w, wv: linear_act(x, w, config=_ws(128, 256, 5)),
            "bytes of shared memory",
        ),
        (
            lambda x, w, wv: linear_act(x, w, config=TileConfig(128, 64, 16, programs_per_sm=2)),
            r"config.programs_per_sm: expected 1, or 2 with warp_specialize .* got 2 "
            r"\(warp_specialize=False\)",
        ),
        (
            lambda x, w, wv: linear_act(x, w, config=dataclasses.replace(WS, programs_per_sm=3)),
            r"config.programs_per_sm: expected 1, or 2 .* got 3",
        ),
        (
            lambda x, w, wv: linear_act(x, w, config=_ws(128, 64, 1, pingpong=True)),
            "config.num_stages: ping-pong needs at least 2 pipeline slots, got 1",
        ),
        (
            lambda x, w, wv: gated(x, wv, n=32, config=_ws(128, 128, 2, pingpong=True)),
            "a compute warpgroup's fp32 accumulator would be 128 × 256",
        ),
        (  # a TileConfig (whole atoms), but halved between the compute warpgroups it is not
            lambda x, w, wv: linear_act(x, w, config=_ws(128, 320, 2)),
            r"config.block_n: a compute warpgroup's operand tile would be 160 columns "
            r"\(block_n=320, family linear_act\); expected a power of two or a multiple of 64",
        ),
        (  # 192 holds one and a half gate/up pairs a warpgroup
            lambda x, w, wv: gated(x, wv, n=32, config=_ws(64, 192, 2)),
            "gated epilogue tiles hold whole gate/up blocks",
        ),
        (
            lambda x, w, wv: linear_act(x, w, fp32_precision="high"),
            "fp32_precision: expected one of",
        ),
        (lambda x, w, wv: linear_act(x[:, :8], w[:8]), "K=8 is not a multiple of 16"),
        (lambda x, w, wv: linear_act(x, w[:, :24]), "N=24 is not a multiple of 16"),
    ],
)
def test_validation_messages(call, match) -> None:
    x = jnp.ones((4, 16), jnp.float16)
    w = jnp.ones((16, 32), jnp.float16)
    wv = jnp.ones((16, packed_width(32)), jnp.float16)
    with pytest.raises((ValueError, TypeError, NotImplementedError), match=match):
        call(x, w, wv)


# ---- configs: heuristic, tuned table, shared-memory model ---------------------------------------
def test_default_configs_fit() -> None:
    # The heuristic tiles fit a compute warpgroup's registers and the H200's shared memory.
    for family, weights in (("linear_act", 1), ("gated", 2)):
        for m in (1, 64, 512, 8192):
            for dtype in SIXTEEN_BIT:
                cfg = pipeline.default_config(family, m, 4096, 4096, dtype)
                assert cfg.warp_specialize
                pipeline.check_config(cfg, dtype, num_weights=weights, residual=True)
    assert pipeline.default_config("gated", 19, 67, 33, "float16", interpret=True) == WS
    assert linear_act_mod.FAMILY == "linear_act" and gated_mod.FAMILY == "gated"


def test_tuned_table_is_read(tmp_path, monkeypatch) -> None:
    best = TileConfig(
        256, 128, 64, group_m=4, num_stages=4, warp_specialize=True, epilogue_subtile=2
    )
    entry = {"m": 8192, "n": 4096, "k": 14336, "dtype": "bfloat16", "config": best.to_dict()}
    # another GPU's measurement of the same shape: read on that GPU only (measured_here_first)
    theirs = dataclasses.replace(best, block_m=128, num_stages=5)
    other = {**entry, "config": theirs.to_dict(), "gpu": "NVIDIA H100 80GB HBM3"}
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"gpu": "test", "configs": {"linear_act": [entry, other]}}))
    monkeypatch.setattr(pipeline, "TUNED_FILE", path)
    pipeline.tuned_table.cache_clear()
    try:
        assert pipeline.default_config("linear_act", 8192, 4096, 14336, "float16") == best
        assert pipeline.default_config("linear_act", 6000, 4096, 14336, "bfloat16") == best
        assert pipeline.default_config("linear_act", 8192, 4096, 4096, "bfloat16") != best
        assert pipeline.default_config("gated", 8192, 4096, 14336, "bfloat16") != best
        monkeypatch.setattr(compat, "gpu_name", lambda: "NVIDIA H100 80GB HBM3")
        assert pipeline.default_config("linear_act", 8192, 4096, 14336, "bfloat16") == theirs
        monkeypatch.setattr(compat, "gpu_name", lambda: "NVIDIA H200")
        assert pipeline.default_config("linear_act", 8192, 4096, 14336, "bfloat16") == best
    finally:
        # the committed file back BEFORE the cache is cleared: the cached table is read again
        # below, and a later test in this worker must not inherit the temporary one
        monkeypatch.undo()
        pipeline.tuned_table.cache_clear()
    # The committed table parses and every entry it holds is a legal config.
    for family, entries in pipeline.tuned_table().items():
        for e in entries:
            pipeline.check_config(
                TileConfig.from_dict(e["config"]),
                "bfloat16",
                num_weights=2 if family == "gated" else 1,
                residual=False,
            )


def test_sweep_grid_is_legal() -> None:
    """Every config bench/sweep_mosaic.py will time passes check_config (its --dry-run also lowers
    them for CUDA, ~40 s: not run here)."""
    from fusedmlp.bench import sweep_mosaic

    for g in sweep_mosaic.GEMMS.values():
        for m in (512, 2048, 8192):
            for first in (True, False):
                for cfg in sweep_mosaic.grid(g.family, m, first=first):
                    pipeline.check_config(
                        cfg, "bfloat16", residual=False, num_weights=2 if g.family == "gated" else 1
                    )
        # --pingpong's grid: ping-pong tiles only, each within the shared memory the model counts
        for cfg in sweep_mosaic.pingpong_grid(g.family):
            tiles = pipeline.check_config(
                cfg, "bfloat16", residual=False, num_weights=2 if g.family == "gated" else 1
            )
            assert tiles.pingpong and tiles.wg_m * tiles.wg_op_n <= pipeline.MAX_ACC_ELEMS


def test_epilogue_probe_times_each_epilogue_piece_apart() -> None:
    """bench/mosaic_epilogue_probe.py: per gpt-mlp GEMM the layer at its table tile, the same
    kernel without its bias, and without bias or activation (the up GEMM also at the 128×256
    tile); every kernel it times is legal (check_config)."""
    from fusedmlp.bench import mosaic_epilogue_probe as probe
    from fusedmlp.bench import sweep_mosaic

    up = probe.mosaic_variants(sweep_mosaic.GEMMS["gpt.up"], 8192, smoke=False)
    down = probe.mosaic_variants(sweep_mosaic.GEMMS["gpt.down"], 8192, smoke=False)
    assert [(g.bias, g.activation) for g, _ in up.values()] == [
        (True, "gelu_tanh"),
        (False, "gelu_tanh"),
        (False, "identity"),
        (True, "gelu_tanh"),
    ]
    assert [(g.bias, g.activation) for g, _ in down.values()] == [
        (True, "identity"),
        (False, "identity"),
    ]
    assert list(up.values())[-1][1].block_n == 256
    for _, config in [*up.values(), *down.values()]:
        pipeline.check_config(config, "bfloat16", residual=False, num_weights=1)


def test_sweep_narrow_grid_lowers(capsys) -> None:
    """bench/sweep_mosaic.py --narrow (x·U, N = 64/128/256, K = 4096): per (N, M) at most 10
    configs, the default first, the tiles the mode is for among them (64 rows, block_n = N,
    128-deep K slabs, ≥ 5 slots), and every one lowers for CUDA (its --dry-run --narrow, ~6 s)."""
    from fusedmlp.bench import sweep_mosaic

    count = 0
    for g in sweep_mosaic.NARROW_GEMMS.values():
        for m in sweep_mosaic.NARROW_MS:
            head = sweep_mosaic.narrow_grid(g, m, first=True)
            configs = head + sweep_mosaic.narrow_grid(g, m, first=False)
            count += len(configs)
            assert head[0] == pipeline.default_config("linear_act", m, g.n, g.k, "bfloat16")
            assert len(set(configs)) == len(configs) <= 10, configs
            assert any(c.block_m == 64 and c.block_n == g.n for c in configs), configs
            assert any(c.block_k == 128 for c in configs), configs
            assert any(c.num_stages >= 5 for c in configs), configs
    assert sweep_mosaic.dry_run(narrow=True) == 0
    assert f"{count} kernels lowered for CUDA, 0 failed" in capsys.readouterr().out


# ---- operands read transposed in place (the backward's hᵀ and Wᵀ) -------------------------------
LAYOUTS = [(True, False), (False, True), (True, True)]


def _layout_operands(dtype: str, m: int, k: int, n: int):
    rng = np.random.default_rng(m + k + n)
    dt = jnp.dtype(dtype)
    x = jnp.asarray(rng.standard_normal((m, k)) * 0.5, dt)
    w = jnp.asarray(rng.standard_normal((k, n)) * k**-0.5, dt)
    b = jnp.asarray(rng.standard_normal(n) * 0.1, dt)
    return x, w, b


@pytest.mark.skipif(
    not compat.mosaic_interpreter_transposes(),
    reason="jax 0.10's Mosaic GPU interpreter has no rule for transposed ref views (the jax 0.11.2 "
    "job of .ci/run runs this; lowering for CUDA is tested on both)",
)
@pytest.mark.parametrize(
    "x_kmajor, w_kmajor, m", [(*layout, 80) for layout in LAYOUTS] + [(False, True, 37)]
)
@pytest.mark.parametrize(
    ("config", "dtype"), [(WS, "bfloat16"), (ONE_WG, "float16")], ids=["warp_specialized", "one_wg"]
)
def test_transposed_operands_give_the_same_bits(x_kmajor, w_kmajor, m, config, dtype) -> None:
    """x given as its transpose [K, M] and/or w as [N, K], read in place through a transposed view:
    the same output, bit for bit, as the operands stored [M, K] and [K, N] (the same products in
    the same order), and within the policy of the float64 reference; M = 80 and N = 144 leave
    ragged tiles, K = 96 several K steps; with only W transposed an odd M = 37 (its rows padded
    as any odd M's; a transposed X needs M a multiple of 16)."""
    k, n = 96, 144
    x, w, b = _layout_operands(dtype, m, k, n)

    def run(xk: bool, wk: bool) -> jax.Array:
        return linear_act_mod.linear_act_fwd(
            x.T if xk else x, w.T if wk else w, b, None, activation="gelu_tanh", config=config,
            interpret=True, x_kmajor=xk, w_kmajor=wk,
        )  # fmt: skip

    got, want = run(x_kmajor, w_kmajor), run(False, False)
    assert got.shape == (m, n) and got.dtype == jnp.dtype(dtype)
    assert np.asarray(got).tobytes() == np.asarray(want).tobytes()
    ref = layer_ref(np.asarray(x), np.asarray(w), np.asarray(b), "gelu_tanh")
    what = f"transposed {x_kmajor, w_kmajor}"
    tolerance.assert_close(np.asarray(got), ref, layer_spec(dtype), what=what)


@pytest.mark.parametrize("x_kmajor, w_kmajor", LAYOUTS)
@pytest.mark.parametrize(
    "config",
    [
        _ws(128, 256, 4, 2),
        TileConfig(128, 128, 64, num_stages=4),
        _ws(128, 128, 5, 2, pingpong=True),
    ],
    ids=["warp_specialized", "one_wg", "pingpong"],
)
def test_transposed_operands_lower_for_cuda(x_kmajor, w_kmajor, config) -> None:
    """The transposed reads lower for CUDA at the large tiles (wgmma's and TMA's constraints on
    MN-major operands, which no interpreter checks), on both jax versions."""
    m, n, k = 1024, 768, 512
    dt = jnp.dtype("bfloat16")
    S = jax.ShapeDtypeStruct
    fn = lambda x, w: linear_act_mod.linear_act_fwd(  # noqa: E731
        x, w, None, None, activation="silu", config=config, interpret=False,
        x_kmajor=x_kmajor, w_kmajor=w_kmajor,
    )  # fmt: skip
    x = S((k, m), dt) if x_kmajor else S((m, k), dt)
    w = S((n, k), dt) if w_kmajor else S((k, n), dt)
    assert "mosaic_gpu" in lower_for_cuda(fn, x, w)


def test_transposed_operands_refused_where_unsupported() -> None:
    x, w, b = _layout_operands("bfloat16", 48, 64, 64)
    with pytest.raises(ValueError, match=r"x_kmajor: M .* multiple of 16, got 40"):
        linear_act_mod.linear_act_fwd(
            x[:40].T, w, b, None, activation="relu", config=WS, interpret=True, x_kmajor=True
        )


def test_padded_extents() -> None:
    tiles = pipeline.plan_tiles(WS, "linear_act")
    if compat.mosaic_interpreter_models_tma_edges():
        assert pipeline.padded_extents(8192, 4096, 14336, tiles, interpret=True) == (
            8192,
            4096,
            14336,
        )
        assert pipeline.padded_extents(131, 80, 48, tiles, interpret=True) == (136, 80, 48)
    assert pipeline.padded_extents(131, 80, 48, tiles, interpret=False) == (136, 80, 48)
    assert pipeline.padded_extents(7, 80, 48, tiles, interpret=False) == (7, 80, 48)
    assert pipeline.padded_extents(8191, 14336, 4096, tiles, interpret=False) == (8192, 14336, 4096)


def _lower_family(family, m, n, k, dtype, activation, bias, config, residual=False) -> str:
    dt = jnp.dtype(dtype)
    S = jax.ShapeDtypeStruct
    x = S((m, k), dt)
    if family == "linear_act":
        b = S((n,), dt) if bias else None
        r = S((m, n), dt) if residual else None
        fn = lambda x, w, b, r: linear_act_mod.linear_act_fwd(  # noqa: E731
            x, w, b, r, activation=activation, config=config, interpret=False
        )
        return lower_for_cuda(fn, x, S((k, n), dt), b, r)
    width = packed_width(n)
    bc = S((width,), dt) if bias else None
    fn = lambda x, wv, bc: gated_mod.gated_fwd(  # noqa: E731
        x, wv, bc, n=n, activation=activation, config=config, interpret=False
    )
    return lower_for_cuda(fn, x, S((k, width), dt), bc)


@pytest.mark.parametrize(
    ("family", "config", "expected"),
    [
        (
            "linear_act",
            _ws(128, 256, 4, 2),
            None,
        ),
        (
            "linear_act",
            _ws(256, 128, 4, 2),
            None,
        ),
        (
            "linear_act",
            _ws(256, 128, 4, 1),
            "exceeds",
        ),  # 128-wide staging slots
        ("gated", _ws(128, 128, 4), None),
        (
            "linear_act",
            _ws(128, 256, 5, 2),
            "exceeds",
        ),
        ("gated", TileConfig(64, 128, 128, num_stages=2), None),
        ("gated", _ws(128, 64, 6, pingpong=True), None),  # 6 slots of 32 KiB, 2 × 2 staging
        ("linear_act", _ws(128, 128, 6, pingpong=True), "exceeds"),  # 128-wide staging
        ("linear_act", _ws(128, 192, 5), "exceeds"),  # 254032 B on the GPU; 4 slots fit
    ],
)
def test_smem_model_matches_mosaic(monkeypatch, family, config, expected) -> None:
    """Mosaic GPU totals the kernel's shared memory at lowering time and refuses more than 227 KiB
    ("exceeds available shared memory"). The model (`Tiles.smem_bytes`, check_config) must count
    what Mosaic counts, within its barriers and alignment, so the sweep prunes exactly."""
    from jax.experimental.mosaic.gpu import core as mgpu_core

    tiles = pipeline.plan_tiles(config, family)
    model = tiles.smem_bytes(2, has_bias=True)
    monkeypatch.setattr(mgpu_core, "_SMEM_SIZE_BOUND", 1)  # every kernel "exceeds": read the total
    with pytest.raises(ValueError, match="exceeds available shared memory") as err:
        _lower_family(family, 1024, 4096, 4096, "bfloat16", "silu", True, config)
    got = int(re.search(r"smem_bytes=(\d+)", str(err.value)).group(1))
    assert model <= got <= model + 2048, (model, got)
    fits = got <= pipeline.SMEM_BYTES
    assert fits == (expected is None), (got, config)
    assert fits == (model <= pipeline.SMEM_BYTES)


# ---- the GPU variant, lowered for CUDA on the CPU ------------------------------------------------
LOWER_CASES = [
    # family, dtype, activation, bias, config (None: the default), (m, n, k)
    ("linear_act", "float16", "gelu", True, None, (8192, 4096, 14336)),
    ("linear_act", "bfloat16", "identity", False, None, (300, 1008, 528)),  # odd M, 32B swizzle
    (
        "linear_act",
        "bfloat16",
        "gelu_tanh",
        True,
        _ws(256, 128, 4, 2),
        (2048, 768, 3072),
    ),
    ("linear_act", "float16", "relu", True, ONE_WG, (264, 80, 48)),
    ("linear_act", "bfloat16", "silu", True, SUBTILED, (7, 4096, 4096)),
    ("gated", "bfloat16", "silu", True, None, (8192, 14336, 4096)),
    ("gated", "float16", "gelu", False, None, (264, 960, 576)),
    (
        "gated",
        "bfloat16",
        "gelu_tanh",
        True,
        _ws(64, 256, 2, 2),
        (512, 3072, 768),
    ),
    ("gated", "float16", "identity", True, WS, (136, 80, 48)),
    ("gated", "bfloat16", "relu", True, ONE_SLOT, (1, 80, 48)),
    ("gated", "float16", "silu", True, SPLIT_N, (136, 144, 48)),
    # ping-pong at the swept tiles (bench/sweep_mosaic.py --pingpong): two rings of 3 slots
    ("gated", "bfloat16", "gelu_tanh", False, _ws(128, 64, 6, pingpong=True), (8192, 3072, 768)),
    (
        "linear_act",
        "bfloat16",
        "identity",
        True,
        _ws(128, 128, 6, 2, pingpong=True),
        (8192, 768, 3072),
    ),
    ("gated", "float16", "silu", True, PINGPONG, (136, 80, 48)),
    # hf-blog-geglu's down projection at the committed 192-wide tile, and the interpreter's 192
    ("linear_act", "bfloat16", "identity", False, _ws(128, 192, 4), (8192, 768, 3072)),
    ("linear_act", "float16", "relu", True, WIDE, (200, 448, 96)),
]


@pytest.mark.parametrize(("family", "dtype", "activation", "bias", "config", "mnk"), LOWER_CASES)
def test_gpu_variant_lowers_for_cuda(family, dtype, activation, bias, config, mnk) -> None:
    """The interpreter checks none of wgmma's, TMA's or the register layouts' constraints;
    lowering the GPU variant to a Mosaic GPU module for CUDA (no GPU needed) does — and counts the
    shared memory. It stops short of ptxas and of running."""
    m, n, k = mnk
    cfg = config or pipeline.default_config(family, m, n, k, dtype)
    text = _lower_family(
        family, m, n, k, dtype, activation, bias, cfg, residual=family == "linear_act" and bias
    )
    assert "mosaic_gpu" in text


# ---- approximate math (the default; FUSEDMLP_MOSAIC_APPROX_MATH=0 switches it off) -------------
def test_fast_activations_agree_with_the_exact_ones() -> None:
    # The reciprocals as rsqrt(d)² (d ≥ 1) against IEEE divisions, exact rsqrt on the CPU: a few
    # ulp of the output's scale; ±inf, ±0 and NaN as the divisions give them.
    grid = np.linspace(-100.0, 100.0, 40001)
    special = [-np.inf, np.inf, np.nan, 0.0, -0.0, 1e-30, -1e-30, 88.7, -88.7, 44.0, -44.0]
    x = jnp.asarray(np.concatenate([grid, special]), jnp.float32)
    for activation in ACTIVATION_KEYS:
        exact = np.asarray(apply_activation(x, activation), np.float64)
        fast = np.asarray(apply_activation(x, activation, fast=True), np.float64)
        assert np.array_equal(np.isnan(fast), np.isnan(exact)), activation
        both = ~np.isnan(exact)
        np.testing.assert_array_equal(np.isinf(fast[both]), np.isinf(exact[both]), activation)
        finite = both & np.isfinite(exact)
        scale = np.abs(np.asarray(x, np.float64)[finite]) + 1.0
        err = np.abs(fast[finite] - exact[finite]) / scale
        assert err.max() <= 4e-7, (activation, err.max())


@pytest.mark.parametrize(
    ("activation", "dtype", "config"),
    [("swiglu", "bfloat16", WS), ("gelu_tanh", "float16", ONE_WG), ("gelu", "bfloat16", WS)],
)
@pytest.mark.jax_matrix
def test_approx_math_against_the_reference(activation, dtype, config) -> None:
    assert pipeline.APPROX_MATH  # the default (FUSEDMLP_MOSAIC_APPROX_MATH unset)
    spec = MLPSpec((48, 80, 32), activation, True, dtype)
    params = init_params(spec, seed=41)
    x = make_input(spec, 67, seed=42)
    out = mlp_per_layer(x, params, spec, config=config)
    tolerance.assert_close(out, reference.forward(spec, x, params), spec, what=activation)
    # the kernel for CUDA: rsqrt in the module, no IEEE division
    text = _lower_family("gated", 64, 80, 48, dtype, "silu", True, WS)
    assert "rsqrt" in text and "divf" not in text


def test_exact_math_when_switched_off(monkeypatch) -> None:
    # FUSEDMLP_MOSAIC_APPROX_MATH=0: the IEEE division again, no rsqrt
    monkeypatch.setattr(pipeline, "APPROX_MATH", False)
    jax.clear_caches()
    try:
        text = _lower_family("gated", 64, 80, 48, "bfloat16", "silu", True, WS)
        assert "divf" in text and "rsqrt" not in text
    finally:
        monkeypatch.setattr(pipeline, "APPROX_MATH", True)
        jax.clear_caches()


# ---- the interpreter's race detector over the pipelines ------------------------------------------
@pytest.mark.parametrize(
    "config", [WS, ONE_WG, PINGPONG], ids=["warp_specialized", "one_warpgroup", "pingpong"]
)
@pytest.mark.jax_matrix
def test_no_races(monkeypatch, config: TileConfig) -> None:
    """With detect_races the interpreter keeps vector clocks for the TMA unit and the warpgroups
    and flags a shared-memory access not ordered by a barrier (and raises when a barrier completes
    twice unseen, as when a barrier_wait is left out). It does not model wgmma or TMA stores as
    asynchronous: a slot refilled while a wgmma still reads it, or restaged while a store still
    reads it, would go unseen; those rest on wgmma_wait and wait_smem_to_gmem."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    params = dataclasses.replace(compat.mosaic_interpret_params(), detect_races=True)
    monkeypatch.setattr(pipeline, "interpret_param", lambda interpret: params)
    spec = MLPSpec((48, 80, 32), "swiglu", True, "float16")
    p = init_params(spec, seed=21)
    x = make_input(spec, 136, seed=22)
    r = np.random.default_rng(23).standard_normal((136, 32)).astype(np.float16)
    out = mlp_per_layer(x, p, spec, residual=jnp.asarray(r), config=config)
    assert not interpret_pallas_call.get_races().races_found
    tolerance.assert_close(out, reference.forward(spec, x, p) + r.astype(np.float64), spec)


# ---- GPU: the compiled kernels at their default tiles --------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["gelu", "swiglu", "geglu_tanh", "relu"])
@pytest.mark.parametrize("dtype", SIXTEEN_BIT)
def test_gpu_default_tiles(activation: str, dtype: str) -> None:
    spec = MLPSpec((512, 1008, 272), activation, True, dtype)
    params = init_params(spec, seed=11)
    x = make_input(spec, 300, seed=12)
    out = jax.jit(lambda x, p: mlp_per_layer(x, p, spec))(
        jnp.asarray(x), {k: jnp.asarray(v) for k, v in params.items()}
    )
    tolerance.assert_close(out, reference.forward(spec, x, params), spec)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("config", "gated_config"),
    [(WS, WS), (ONE_WG, ONE_WG), (ONE_SLOT, ONE_SLOT), (SUBTILED, SPLIT_N), (PINGPONG, PINGPONG)],
    ids=["ws", "one_wg", "one_slot", "subtiled_split_n", "pingpong"],
)
def test_gpu_interpreter_tiles(config: TileConfig, gated_config: TileConfig) -> None:
    # The tiles the interpreter checks are legal on the GPU too: the same code path, compiled.
    spec = MLPSpec((48, 80, 32), "geglu", True, "bfloat16")
    params = init_params(spec, seed=13)
    x = make_input(spec, 131, seed=14)
    out = mlp_per_layer(x, params, spec, config=config, gated_config=gated_config)
    tolerance.assert_close(out, reference.forward(spec, x, params), spec)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", SIXTEEN_BIT)
def test_gpu_hf_blog_at_the_committed_tiles(dtype: str) -> None:
    """hf-blog-geglu (768 → 3072 → 768) at the tuned table's tiles, odd M: the down projection
    runs 128×192 (not a power of two, common/config.py), compiled."""
    spec = dataclasses.replace(MLPSpec.preset("hf-blog-geglu"), dtype=dtype)
    assert pipeline.default_config("linear_act", 1001, 768, 3072, dtype).block_n == 192
    params = init_params(spec, seed=18)
    x = make_input(spec, 1001, seed=19)
    out = jax.jit(lambda x, p: mlp_per_layer(x, p, spec))(
        jnp.asarray(x), {k: jnp.asarray(v) for k, v in params.items()}
    )
    tolerance.assert_close(out, reference.forward(spec, x, params), spec)


@pytest.mark.gpu
def test_gpu_narrow_layers_at_many_rows() -> None:
    """nerf-64x5's shape (64-wide fp16 layers) over many rows at the default tiles: it failed
    parity on the H200 (2026-12-01) with a 256-wide tile, one warpgroup's half wholly past N."""
    spec = MLPSpec((64, 64, 64, 64), "relu", False, "float16")
    params = init_params(spec, seed=15)
    x = make_input(spec, 262_147, seed=16)
    out = jax.jit(lambda x, p: mlp_per_layer(x, p, spec))(
        jnp.asarray(x), {k: jnp.asarray(v) for k, v in params.items()}
    )
    rows = np.random.default_rng(17).choice(x.shape[0], 512, replace=False)
    tolerance.assert_close(np.asarray(out)[rows], reference.forward(spec, x[rows], params), spec)


def test_narrow_outputs_take_narrow_tiles() -> None:
    # The heuristic never gives a tile whose warpgroup half lies wholly past N (see above).
    for family in ("linear_act", "gated"):
        for n in (16, 48, 64):
            cfg = pipeline.default_config(family, 2_097_152, n, 64, "float16")
            assert cfg.block_n == 64, (family, n, cfg)
    assert pipeline.default_config("linear_act", 8192, 128, 4096, "bfloat16").block_n == 128
    # Every heuristic config is a legal launch geometry, small M and narrow N included.
    for family in ("linear_act", "gated"):
        for m in (1, 64, 65, 8192):
            for n in (16, 64, 96, 128, 200, 4096):
                pipeline.plan_tiles(pipeline.default_config(family, m, n, 64, "bfloat16"), family)
