"""The JAX Hopper backward (issue 24): jax_impl/mosaic/backward.py and the Mosaic GPU kernels' forms
it adds — the saving forward's stored pre-activations (`store_preact`), the input gradient's act'
epilogues ("dact", "dact_gated": a doubled output, `pipeline.Outputs`) and the operands read
transposed in place.

Under the Mosaic GPU interpreter (jax ≥ 0.11: 0.10's cannot read an operand transposed, so the
main job of .ci/run skips these and its jax 0.11.2 job runs them): gradients of every layer kind
— plain with a kept z, relu read off its output, gated (packed, padded width) before a plain or a
gated layer — against the float64 reference with the gradient tolerance and the baseline rule
against `jax.grad` of the `xla` baseline; both saved policies bit for bit; the saving forward's
output is the inference kernels' bit for bit and it keeps backward.py's residuals (same slots,
shapes, dtypes); a NaN row propagates as the reference's. On both jax versions: the whole
step lowers for CUDA at the large tiles; the shared-memory model counts what Mosaic counts with
the wider staging; the tiles fitted for the backward fit and are cooperative; bad forms are refused
with ValueErrors naming the argument. `-m gpu`: the step on the H200 against the reference and
the portable backward, twice, bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusedmlp import jax_impl
from fusedmlp.common import MLPSpec, TileConfig, init_params, make_input, reference, tolerance
from fusedmlp.common.config import SAVED_POLICIES
from fusedmlp.common.packing import packed_names, packed_width, unpack_gated, unpack_params
from fusedmlp.common.tiling import GroupedTiles
from fusedmlp.common.tolerance import assert_grads_close
from fusedmlp.jax_impl import backward as portable
from fusedmlp.jax_impl import compat
from fusedmlp.jax_impl.mosaic import backward as hopper
from fusedmlp.jax_impl.mosaic import gated as gated_mod
from fusedmlp.jax_impl.mosaic import linear_act as linear_mod
from fusedmlp.jax_impl.mosaic import pipeline
from fusedmlp.jax_impl.packing import pack_params
from helpers import layer_ref, layer_spec, lower_for_cuda

F32 = jnp.float32

needs_transposes = pytest.mark.skipif(
    not compat.mosaic_interpreter_transposes(),
    reason="jax 0.10's Mosaic GPU interpreter has no rule for transposed ref views (the jax 0.11.2 "
    "job of .ci/run runs this; lowering for CUDA is tested on both)",
)


def _ws(bm: int, bn: int, stages: int, subtile: int = 1, pingpong: bool = False) -> TileConfig:
    return TileConfig(
        bm, bn, 64, group_m=8, num_warps=4, num_stages=stages, warp_specialize=True,
        epilogue_subtile=subtile, programs_per_sm=2 if pingpong else 1,
    )  # fmt: skip


def _f64(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a).astype(F32), dtype=np.float64)


def _inputs(spec: MLPSpec, m: int, seed: int):
    params = init_params(spec, seed)
    x = make_input(spec, (m,), seed + 1)
    rng = np.random.default_rng(seed + 2)
    dy = jnp.asarray(rng.standard_normal((m, spec.d_out)), F32).astype(spec.dtype)
    return x, params, dy


def _hopper_step(
    spec: MLPSpec, x, params, dy, *, saved: str = "preact", interpret: bool = True, grouped=None
):
    """(y, gradients in the contract's names) from mosaic/backward.py, as the front's custom_vjp
    calls it (`grouped`: tiles for the weight gradients' grouped launch)."""
    packed = pack_params(spec, {k: jnp.asarray(v) for k, v in params.items()})
    x2d = jnp.asarray(x)
    y, kept = hopper.forward_saving(x2d, packed, spec, saved="preact", interpret=interpret)
    if saved == "inputs":
        kept = (x2d,)
    grads = hopper.mlp_backward(
        dy, kept, packed, spec, saved=saved, interpret=interpret, grouped=grouped
    )
    dx = grads.pop("x")
    return y, {"x": dx, **unpack_params(spec, grads)}


def _baseline(spec: MLPSpec, x, params, dy) -> dict[str, np.ndarray]:
    def loss(x, params):
        y = jax_impl.mlp(x, params, spec, impl="xla")
        return jnp.sum(y.astype(F32) * dy.astype(F32))

    jp = {k: jnp.asarray(v) for k, v in params.items()}
    dx, dp = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jp)
    return {k: _f64(v) for k, v in {"x": dx, **dp}.items()}


# ---- gradients under the interpreter ---------------------------------------------------------
CASES = [  # (widths, activation, bias, dtype, M): every act' form once; widths multiples of 16
    ((32, 80, 48), "swiglu", True, "bfloat16", 48),  # gated (80: packed padding) -> plain
    ((48, 64, 32, 16), "relu", True, "float16", 32),  # relu' read off the outputs, twice
    ((32, 48, 32), "gelu", False, "bfloat16", 64),  # plain with a kept z: "dact"
    ((32, 80, 48, 32), "geglu_tanh", False, "float16", 32),  # "dact_gated" twice
]


def _case_id(case) -> str:
    widths, activation, bias, dtype, m = case
    return f"{'x'.join(map(str, widths))}-{activation}-{'bias' if bias else 'nobias'}-{dtype}-{m}"


@needs_transposes
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_hopper_gradients_match_the_reference(case) -> None:
    widths, activation, bias, dtype, m = case
    spec = MLPSpec(widths, activation, bias, dtype)
    assert hopper.unsupported_reason(spec, m) is None
    x, params, dy = _inputs(spec, m, zlib.crc32(_case_id(case).encode()) % 1000)
    y, grads = _hopper_step(spec, x, params, dy)
    ref = reference.backward(spec, x, params, _f64(dy), round_hidden=True)
    got = {k: _f64(v) for k, v in grads.items()}
    assert_grads_close(got, ref, spec, baselines=_baseline(spec, x, params, dy), what=str(spec))
    for name, g in grads.items():
        want = x if name == "x" else params[name]
        assert g.shape == want.shape and g.dtype == jnp.dtype(dtype), (name, g.shape, g.dtype)
    # the saving forward's output is the inference kernels' (the same products and epilogue)
    jp = {k: jnp.asarray(v) for k, v in params.items()}
    y_inference = jax_impl.mlp(jnp.asarray(x), jp, spec, impl="pallas_mosaic")
    assert np.asarray(y).tobytes() == np.asarray(y_inference).tobytes()
    # "inputs" recomputes the same saving forward: the same gradients, bit for bit (the gated
    # cases: the recompute path is one for every spec, a step a case under the interpreter)
    if spec.gated:
        _, again = _hopper_step(spec, x, params, dy, saved="inputs")
        for name in grads:
            assert np.asarray(again[name]).tobytes() == np.asarray(grads[name]).tobytes(), name


@needs_transposes
def test_saving_forward_keeps_what_the_portable_one_keeps() -> None:
    """The same residual slots (None where no z is kept), shapes and dtypes as backward.py's, so
    either backward reads either forward's; each kept pre-activation (packed for gated) and each
    kept hidden within the tolerance policy of the float64 layer on the kept input before it."""
    spec = MLPSpec((32, 80, 48, 32, 16), "geglu", True, "bfloat16")  # gated, gated, gated, plain
    spec_relu = MLPSpec((32, 48, 32, 16), "relu", True, "bfloat16")
    for s in (spec, spec_relu):
        x, params, _ = _inputs(s, 48, 7)
        packed = pack_params(s, {k: jnp.asarray(v) for k, v in params.items()})
        for saved in SAVED_POLICIES:
            _, mine = hopper.forward_saving(jnp.asarray(x), packed, s, saved=saved, interpret=True)
            _, theirs = portable.forward_saving(jnp.asarray(x), packed, s, saved=saved)
            assert len(mine) == len(theirs), saved
            for a, b in zip(mine, theirs, strict=True):
                assert (a is None) == (b is None)
                if a is not None:
                    assert a.shape == b.shape and a.dtype == b.dtype
            if saved == "preact":
                _check_kept(s, params, packed, mine)


def _check_kept(spec: MLPSpec, params, packed, kept) -> None:
    """Layer by layer: z_i against h_i·W_i + b_i (the packed product for gated), h_{i+1} against
    the float64 layer of h_i, both by the tolerance policy."""
    judge = layer_spec(spec.dtype)
    for layer in spec.layers():
        i, h = layer.index, _f64(kept[2 * layer.index])
        z = kept[2 * i + 1]
        if z is not None:
            w, b = (packed[f"wv{i}"], packed.get(f"bc{i}")) if layer.gated else (
                packed[f"w{i}"], packed.get(f"b{i}"))  # fmt: skip
            want = h @ _f64(w) + (_f64(b) if b is not None else 0.0)
            tolerance.assert_close(_f64(z), want, judge, what=f"{spec} z{i}")
        if 2 * i + 2 < len(kept):
            v, c = (params[f"v{i}"], params.get(f"c{i}")) if layer.gated else (None, None)
            want = layer_ref(h, params[f"w{i}"], params.get(f"b{i}"), layer.activation, v=v, c=c)
            tolerance.assert_close(_f64(kept[2 * i + 2]), want, judge, what=f"{spec} h{i + 1}")


@needs_transposes
@pytest.mark.parametrize("grouped", [False, True], ids=["apart", "grouped"])
def test_nan_propagates(grouped: bool) -> None:
    """A NaN in one row of x: the reference's NaNs (that row of dx, every weight gradient that
    sums over it) and nothing else, with the weight gradients apart or in one grouped launch."""
    spec = MLPSpec((32, 80, 48), "swiglu", True, "bfloat16")
    x, params, dy = _inputs(spec, 32, 41)
    x[5, 3] = np.nan
    cfg = dataclasses.replace(PINGPONG, epilogue_subtile=1) if grouped else None
    _, grads = _hopper_step(spec, x, params, dy, grouped=cfg)
    ref = reference.backward(spec, x, params, _f64(dy), round_hidden=True)
    assert np.isnan(ref["x"][5]).all() and np.isfinite(np.delete(ref["x"], 5, axis=0)).all()
    assert_grads_close({k: _f64(v) for k, v in grads.items()}, ref, spec, what="NaN row")


@needs_transposes
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_dact_gated_writes_packed_zeros_past_n(activation: str) -> None:
    """The doubled output of the gated act' step: the packed [dz|dg] with exact zeros in the
    padded columns (n = 80 of Np = 128), whatever dh is there — and the product's values."""
    rng = np.random.default_rng(3)
    m, n, nc = 48, 80, 96
    dt = jnp.bfloat16
    dz = jnp.asarray(rng.standard_normal((m, nc)), dt)
    w = jnp.asarray(rng.standard_normal((n, nc)) * nc**-0.5, dt)
    zg = np.asarray(rng.standard_normal((m, packed_width(n))), np.float32)
    zg.reshape(m, 2, 2, 64)[:, 1, :, n - 64 :] = 0.0  # the packed padding, as the forward keeps
    zg = jnp.asarray(zg, dt)
    out = linear_mod.linear_act_fwd(
        dz, w, None, None, activation="identity", config=pipeline.INTERPRET_CONFIG,
        interpret=True, w_kmajor=True, epilogue="dact_gated", z=zg, dact_activation=activation,
    )  # fmt: skip
    assert out.shape == (m, packed_width(n)) and out.dtype == dt
    blocks = _f64(out).reshape(m, 2, 2, 64)
    assert (blocks[:, 1, :, n - 64 :] == 0).all()
    want = _dact_gated_ref(_f64(dz) @ _f64(w).T, _f64(zg), n, activation)
    tolerance.assert_close(_f64(out), want, layer_spec("bfloat16"), what=f"dact_gated {activation}")


# 128 output rows split between the compute warpgroups, 16-deep K slabs, epilogue tiles 64 wide:
# two epilogue tiles a warpgroup, so the double-buffered staging (and its waits) is exercised
TWO_TILES = TileConfig(
    128, 128, 16, group_m=2, num_warps=4, num_stages=2, warp_specialize=True, epilogue_subtile=2
)
# ping-pong: each compute warpgroup a whole 128 × 64 tile (two 64-row epilogue tiles), the two
# taking turns at the K loop (pipeline.grouped_matmul); gated: a 128-wide packed operand tile
PINGPONG = TileConfig(
    128, 64, 16, group_m=2, num_warps=4, num_stages=2, warp_specialize=True, programs_per_sm=2
)
KERNELS = {"cooperative": TWO_TILES, "pingpong": PINGPONG}


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("family", ["linear_act", "gated"])
@pytest.mark.jax_matrix
def test_stored_preact_at_one_and_two_staging_slots(family: str, kernel: str) -> None:
    """The saving forward's second output at two epilogue tiles a warpgroup, on the cooperative
    and the ping-pong kernel: one or two staging slots give the same bits, the output is the
    inference kernel's bit for bit, and z is the fp32 pre-activation rounded once (within a
    rounding of the float64 product). jax 0.10's interpreter hangs on the gated one with a bias
    (warp-specialised, as both kernels are): there it is refused with the reason."""
    rng = np.random.default_rng(11)
    m, k, n = 80, 48, 112
    dt = jnp.bfloat16
    x = jnp.asarray(rng.standard_normal((m, k)), dt)
    width = packed_width(n) if family == "gated" else n
    w = jnp.asarray(rng.standard_normal((k, width)) * k**-0.5, dt)
    b = jnp.asarray(rng.standard_normal(width) * 0.1, dt)
    if family == "gated":
        w = w.reshape(k, -1, 2, 64).at[:, -1, :, n % 64 :].set(0).reshape(k, width)  # packing
        b = b.reshape(-1, 2, 64).at[-1, :, n % 64 :].set(0).reshape(width)

    def run(**kw):
        cfg = KERNELS[kernel]
        if family == "gated":  # 128 rows a warpgroup: two 64-row tiles
            cfg = dataclasses.replace(cfg, epilogue_subtile=1)
            return gated_mod.gated_fwd(
                x, w, b, n=n, activation="gelu", config=cfg, interpret=True, **kw
            )
        return linear_mod.linear_act_fwd(
            x, w, b, None, activation="gelu", config=cfg, interpret=True, **kw
        )

    plain = run()
    if family == "gated" and not compat.mosaic_interpreter_stores_gated_preact():
        with pytest.raises(NotImplementedError, match=r"store_preact: jax .* hangs on the"):
            run(store_preact=True)  # refused, not hung (jax 0.10's interpreter)
        return
    (y2, z2), (y1, z1) = (run(store_preact=True, staging_slots=s) for s in (2, 1))
    assert np.asarray(y2).tobytes() == np.asarray(plain).tobytes()
    assert np.asarray(y1).tobytes() == np.asarray(y2).tobytes()
    assert np.asarray(z1).tobytes() == np.asarray(z2).tobytes()
    assert z2.shape == (m, width) and z2.dtype == dt
    want = _f64(x) @ _f64(w) + _f64(b)
    tolerance.assert_close(_f64(z2), want, layer_spec("bfloat16"), what=f"{family} preact")
    ref = (
        layer_ref(_f64(x), _f64(w), _f64(b), "gelu")
        if family == "linear_act"
        else _gated_ref(x, w, b, n)
    )
    tolerance.assert_close(_f64(y2), ref, layer_spec("bfloat16"), what=f"{family} output")


def _act_step_case(seed: int, m: int, n: int, nc: int, epilogue: str) -> tuple[jax.Array, ...]:
    """dZ [m, nc], W stored [n, nc] (read transposed) and the saved z [m, n] (gated: the packed
    [z|g]) of an input gradient with the act' step `epilogue` in its epilogue, bf16."""
    rng = np.random.default_rng(seed)
    dt = jnp.bfloat16
    dz = jnp.asarray(rng.standard_normal((m, nc)), dt)
    w = jnp.asarray(rng.standard_normal((n, nc)) * nc**-0.5, dt)
    width = packed_width(n) if epilogue == "dact_gated" else n
    return dz, w, jnp.asarray(rng.standard_normal((m, width)), dt)


def _act_step(dz, w, z, epilogue: str, config: TileConfig, activation: str, slots: int):
    return linear_mod.linear_act_fwd(
        dz, w, None, None, activation="identity", config=config, interpret=True, w_kmajor=True,
        epilogue=epilogue, z=z, dact_activation=activation, staging_slots=slots,
    )  # fmt: skip


def _assert_act_step_close(out, dz, w, z, epilogue: str, activation: str) -> None:
    """`out` within the policy of the float64 act' step."""
    dh = _f64(dz) @ _f64(w).T
    if epilogue == "dact_gated":
        want = _dact_gated_ref(dh, _f64(z), w.shape[0], activation)
    else:
        want = dh * reference.activation_grad(activation, _f64(z))
    tolerance.assert_close(_f64(out), want, layer_spec("bfloat16"), what=epilogue)


@needs_transposes
@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("epilogue", ["dact", "dact_gated"])
def test_act_steps_at_one_and_two_staging_slots(epilogue: str, kernel: str) -> None:
    """The input gradient's act' epilogues (W read transposed) at two epilogue tiles a
    warpgroup, on the cooperative and the ping-pong kernel: one or two staging slots (one: the
    first tile's residual prefetched before the K loop, the second loaded in the epilogue; two:
    both prefetched), the same bits, within the policy of the float64 act' step."""
    dz, w, z = _act_step_case(12, 80, 128, 96, epilogue)
    outs = [_act_step(dz, w, z, epilogue, KERNELS[kernel], "silu", slots) for slots in (2, 1)]
    assert outs[0].shape == z.shape
    assert np.asarray(outs[0]).tobytes() == np.asarray(outs[1]).tobytes()
    _assert_act_step_close(outs[0], dz, w, z, epilogue, "silu")


# four epilogue tiles a warpgroup (2 × 2 of 64 × 64), as the committed act' steps have: the
# ping-pong 128 × 128 tile (hf-blog-geglu's, `tuned_hopper_backward.json`) and a cooperative one
FOUR_TILES = {
    "pingpong": dataclasses.replace(PINGPONG, block_n=128, epilogue_subtile=2),
    "cooperative": dataclasses.replace(TWO_TILES, block_m=256),
}


@needs_transposes
@pytest.mark.parametrize(
    ("epilogue", "kernel"), [("dact_gated", "pingpong"), ("dact", "cooperative")]
)
def test_act_steps_request_residuals_slots_ahead(epilogue: str, kernel: str) -> None:
    """Four epilogue tiles a warpgroup at 1-4 staging slots: the first `slots` residual tiles
    prefetched before the K loop, each later one requested as its slot's previous store has
    read the slot (`pipeline.store_tile`), over ragged tiles (M = 200, N = 320) and several
    tiles a warpgroup (the next tile's prefetch after the requests ahead): the same bits at
    every count, within the policy of the float64 act' step."""
    dz, w, z = _act_step_case(14, 200, 320, 48, epilogue)
    config = FOUR_TILES[kernel]
    assert math.prod(pipeline.plan_tiles(config, "linear_act").epi_tiles) == 4
    outs = {
        slots: _act_step(dz, w, z, epilogue, config, "gelu_tanh", slots)
        for slots in pipeline.STAGING_SLOTS
    }
    assert outs[2].shape == z.shape
    bits = {k: np.asarray(o).tobytes() for k, o in outs.items()}
    differ = [k for k, b in bits.items() if b != bits[2]]
    assert not differ, f"staging slots {differ} give other bits than 2"
    _assert_act_step_close(outs[4], dz, w, z, epilogue, "gelu_tanh")


@needs_transposes
@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("epilogue", ["dact", "dact_gated"])
def test_act_step_over_z_is_the_same_bits_and_leaves_z(epilogue: str, kernel: str) -> None:
    """`overwrite_z` (the result in z's buffer, each tile stored where its z tile was read, on
    the cooperative and the ping-pong kernel): the bits of the separate output, called eagerly,
    jitted, and jitted with z donated; the caller's z unchanged wherever it was not donated."""
    rng = np.random.default_rng(13)
    m, n, nc = 96, 128, 80  # two tiles for the ping-pong kernel, one per block; one cooperative
    dt = jnp.bfloat16
    dz = jnp.asarray(rng.standard_normal((m, nc)), dt)
    w = jnp.asarray(rng.standard_normal((n, nc)) * nc**-0.5, dt)
    width = packed_width(n) if epilogue == "dact_gated" else n
    z = jnp.asarray(rng.standard_normal((m, width)), dt)
    z_bytes = np.asarray(z).tobytes()

    def run(z: jax.Array, overwrite: bool) -> jax.Array:
        return linear_mod.linear_act_fwd(
            dz, w, None, None, activation="identity", config=KERNELS[kernel], interpret=True,
            w_kmajor=True, epilogue=epilogue, z=z, dact_activation="gelu",
            overwrite_z=overwrite,
        )  # fmt: skip

    want = np.asarray(run(z, False)).tobytes()
    assert np.asarray(run(z, True)).tobytes() == want
    assert np.asarray(jax.jit(run, static_argnums=1)(z, True)).tobytes() == want
    assert np.asarray(z).tobytes() == z_bytes
    donated = jnp.array(z, copy=True)
    over = jax.jit(run, static_argnums=1, donate_argnums=0)(donated, True)
    assert np.asarray(over).tobytes() == want


@needs_transposes
def test_step_under_vmap_is_each_slice_alone() -> None:
    """jax.vmap of the step (the front's custom_vjp under vmap runs it batched): the act' step's
    z goes into the kernel as a jax Ref (`overwrite_z`), batched with x or left unbatched while
    dy is — each slice's gradients are the step alone on it, bit for bit."""
    spec = MLPSpec((32, 80, 48), "swiglu", True, "bfloat16")
    packed = pack_params(spec, {k: jnp.asarray(v) for k, v in init_params(spec, 3).items()})
    rng = np.random.default_rng(14)
    xs = jnp.asarray(rng.standard_normal((2, 48, 32)), jnp.bfloat16)
    dys = jnp.asarray(rng.standard_normal((2, 48, 48)), jnp.bfloat16)

    def step(x, dy):
        _, kept = hopper.forward_saving(x, packed, spec, saved="preact", interpret=True)
        return hopper.mlp_backward(dy, kept, packed, spec, saved="preact", interpret=True)

    both = jax.vmap(step)(xs, dys)
    dy_only = jax.vmap(step, in_axes=(None, 0))(xs[0], dys)
    alone = {(j, i): step(xs[j], dys[i]) for j, i in ((0, 0), (1, 1), (0, 1))}
    for i in (0, 1):
        for batched, j in ((both, i), (dy_only, 0)):
            for k, v in alone[j, i].items():
                assert np.asarray(batched[k][i]).tobytes() == np.asarray(v).tobytes(), (i, k)


# The act' steps whose result takes z's buffer in a lowered step: each "dact"/"dact_gated" GEMM
# whose z dies with it, so all of them but relu's h_i that a grouped launch still reads.
OVER_Z_CASES = [  # (spec, grouped, act' steps writing over z)
    (MLPSpec((1024, 2048, 1024), "swiglu", False, "bfloat16"), False, 1),
    (MLPSpec((1024, 2048, 1024), "swiglu", False, "bfloat16"), True, 1),
    (MLPSpec((512, 1024, 768, 512), "geglu_tanh", True, "float16"), False, 2),
    (MLPSpec((512, 1024, 1024, 512), "relu", True, "bfloat16"), False, 2),
    (MLPSpec((512, 1024, 1024, 512), "relu", True, "bfloat16"), True, 0),
]


@pytest.mark.parametrize(
    "spec, grouped, over_z", OVER_Z_CASES,
    ids=[f"{s.activation}-{'grouped' if g else 'apart'}" for s, g, _ in OVER_Z_CASES],
)  # fmt: skip
@pytest.mark.jax_matrix
def test_act_steps_take_z_buffer_where_it_dies(spec: MLPSpec, grouped: bool, over_z: int) -> None:
    """The step lowered for CUDA: each act' GEMM whose z dies with it aliases its output to z
    (the custom call's output_operand_aliases, which lets XLA give the result z's buffer: the
    saved packed [z|g], 448 MiB at llama3-8b), relu's h_i not while the grouped launch still
    reads it; none on jax 0.10 (`compat.mosaic_kernel_aliases_refs`)."""
    m = 1024
    dt = jnp.dtype(spec.dtype)
    S = jax.ShapeDtypeStruct
    packed = pack_params(spec, init_params(spec, 0))
    shapes = {k: S(v.shape, dt) for k, v in packed.items()}
    tiles = _ws(128, 128, 4, 2) if grouped else None

    def step(x, params, dy):
        _, kept = hopper.forward_saving(x, params, spec, saved="preact", interpret=False)
        return hopper.mlp_backward(
            dy, kept, params, spec, saved="preact", interpret=False, grouped=tiles
        )

    text = lower_for_cuda(step, S((m, spec.d_in), dt), shapes, S((m, spec.d_out), dt))
    want = over_z if compat.mosaic_kernel_aliases_refs() else 0
    assert text.count("output_operand_aliases") == want


@needs_transposes
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_weight_gradient_reads_h_transposed(kernel: str) -> None:
    """hᵀ·dZ with h read transposed in place (x_kmajor), on both kernels: within the policy of
    the float64 product."""
    rng = np.random.default_rng(13)
    m, k, n = 96, 80, 112  # the product's M (h's columns) and K (the batch rows)
    dt = jnp.bfloat16
    h = jnp.asarray(rng.standard_normal((k, m)), dt)
    dz = jnp.asarray(rng.standard_normal((k, n)), dt)
    got = linear_mod.linear_act_fwd(
        h, dz, None, None, activation="identity", config=KERNELS[kernel], interpret=True,
        x_kmajor=True,
    )  # fmt: skip
    assert got.shape == (m, n) and got.dtype == dt
    want = _f64(h).T @ _f64(dz)
    tolerance.assert_close(_f64(got), want, layer_spec("bfloat16"), what=f"hᵀ·dZ {kernel}")


# the grouped launch's tiles: cooperative split along M (128 × 64 tiles) and along N (a 256-wide
# tile, 64 rows), ping-pong (each warpgroup a whole 128 × 64 tile)
GROUPED = {
    "cooperative-split-m": TWO_TILES,
    "cooperative-split-n": TileConfig(
        64,
        256,
        16,
        group_m=2,
        num_warps=4,
        num_stages=3,
        warp_specialize=True,
        epilogue_subtile=2,
    ),
    "pingpong": PINGPONG,
}


# Every kernel in bfloat16, float16 on one (the element type changes no path of the grouped
# driver; 10-17 s a case under the interpreter); x read transposed (as the step reads hᵀ) on the
# kernel test_step_with_grouped_weight_gradients does not group (it groups split-m and ping-pong
# with x transposed, bit for bit against the products apart)
GROUPED_CASES = [(kernel, "bfloat16", False) for kernel in GROUPED] + [
    ("cooperative-split-m", "float16", False),
    pytest.param("cooperative-split-n", "bfloat16", True, marks=needs_transposes),
]


@pytest.mark.parametrize("kernel, dtype, x_kmajor", GROUPED_CASES)
@pytest.mark.jax_matrix
def test_grouped_products_are_the_separate_ones(kernel: str, x_kmajor: bool, dtype: str) -> None:
    """`linear_grouped`: three products of different (ragged) M and N sharing K in one launch,
    each within the policy of its float64 product and bit for bit the product `linear_act_fwd`
    computes alone on the same tiles (the same K steps into the same fp32 accumulator); an
    empty product comes back as zeros without a launch."""
    rng = np.random.default_rng(17)
    k, dt = 80, jnp.dtype(dtype)
    dims = [(96, 112), (48, 64), (144, 256)]  # (M, N): 3 tile lists of different lengths
    xs = [jnp.asarray(rng.standard_normal((k, m) if x_kmajor else (m, k)), dt) for m, _ in dims]
    ws = [jnp.asarray(rng.standard_normal((k, n)) * k**-0.5, dt) for _, n in dims]
    cfg = GROUPED[kernel]
    outs = linear_mod.linear_grouped(xs, ws, config=cfg, interpret=True, x_kmajor=x_kmajor)
    for (m, n), x, w, y in zip(dims, xs, ws, outs, strict=True):
        assert y.shape == (m, n) and y.dtype == dt
        alone = linear_mod.linear_act_fwd(
            x, w, None, None, activation="identity", config=cfg, interpret=True, x_kmajor=x_kmajor
        )
        assert np.asarray(y).tobytes() == np.asarray(alone).tobytes(), (m, n)
        want = (_f64(x).T if x_kmajor else _f64(x)) @ _f64(w)
        tolerance.assert_close(_f64(y), want, layer_spec(dtype), what=f"{kernel} {(m, n)}")
    empty = jnp.zeros((k, 0) if x_kmajor else (0, k), dt)
    got = linear_mod.linear_grouped(
        [empty, xs[1]], [ws[0], ws[1]], config=cfg, interpret=True, x_kmajor=x_kmajor
    )
    assert got[0].shape == (0, 112)
    assert np.asarray(got[1]).tobytes() == np.asarray(outs[1]).tobytes()


# (config, each product's width): split along M at two widths; ping-pong at two widths; the
# 256-wide tile split along N beside 192-wide ones split along M (hf-blog-geglu's plan, at 16-deep K
# slabs). Three products, the middle one of the other width, so each block's list changes width
# twice; K = 32 is two K steps a tile, fewer than the three-slot ring of the first.
MIXED_WIDTHS = {
    "split-m": (dataclasses.replace(TWO_TILES, block_n=64, epilogue_subtile=1, num_stages=3),
                (64, 128, 64)),
    "pingpong": (PINGPONG, (64, 128, 64)),
    "split-n-beside-split-m": (
        TileConfig(128, 256, 16, group_m=2, num_warps=4, num_stages=2, warp_specialize=True,
                   epilogue_subtile=2), (256, 192, 256)),
}  # fmt: skip


# every plan in bfloat16, x as stored and read transposed; float16 on one (the element type
# changes no path of the driver)
MIXED_CASES = [
    (plan, "bfloat16", x_kmajor)
    for plan in MIXED_WIDTHS
    for x_kmajor in (False, pytest.param(True, marks=needs_transposes))
] + [("split-n-beside-split-m", "float16", False)]


@pytest.mark.parametrize("plan, dtype, x_kmajor", MIXED_CASES)
@pytest.mark.jax_matrix
def test_grouped_products_of_different_widths(plan: str, dtype: str, x_kmajor: bool) -> None:
    """`linear_grouped` with `widths`: each product on its own block_n in one launch — bit for bit
    the product `linear_act_fwd` computes alone at that width (the same K steps into the same fp32
    accumulator), within the policy of its float64 product. Each block's tiles change width (and
    weight ring) twice, and with K = 32 a ring's slot uses span tiles, so the memory warpgroup's
    wait for every earlier release before a new ring (`pipeline.grouped_matmul`) is exercised
    where its count of awaited releases matters (a wrong count hangs or races)."""
    rng = np.random.default_rng(29)
    cfg, widths = MIXED_WIDTHS[plan]
    k, dt = 32, jnp.dtype(dtype)
    dims = [(96, 112), (144, 256), (48, 64)]  # (M, N), ragged
    xs = [jnp.asarray(rng.standard_normal((k, m) if x_kmajor else (m, k)), dt) for m, _ in dims]
    ws = [jnp.asarray(rng.standard_normal((k, n)) * k**-0.5, dt) for _, n in dims]
    outs = linear_mod.linear_grouped(
        xs, ws, config=cfg, widths=widths, interpret=True, x_kmajor=x_kmajor
    )
    for (m, n), x, w, y, width in zip(dims, xs, ws, outs, widths, strict=True):
        assert y.shape == (m, n) and y.dtype == dt
        alone = linear_mod.linear_act_fwd(
            x, w, None, None, activation="identity", interpret=True, x_kmajor=x_kmajor,
            config=dataclasses.replace(cfg, block_n=width, epilogue_subtile=1),
        )  # fmt: skip
        assert np.asarray(y).tobytes() == np.asarray(alone).tobytes(), (plan, m, n)
        want = (_f64(x).T if x_kmajor else _f64(x)) @ _f64(w)
        tolerance.assert_close(_f64(y), want, layer_spec(dtype), what=f"{plan} {(m, n)}")


def test_grouped_widths_refused_by_name() -> None:
    """Widths the grouped launch cannot take: not one a product; a warpgroup's columns that are
    not whole epilogue tiles; a ring that does not fit in shared memory — each a ValueError
    naming `widths`."""
    dt = jnp.bfloat16
    a, w = jnp.zeros((64, 32), dt), jnp.zeros((32, 64), dt)
    run = functools.partial(linear_mod.linear_grouped, interpret=True)
    with pytest.raises(ValueError, match=r"widths: expected one a product \(2\), got \[64\]"):
        run([a, a], [w, w], config=TWO_TILES, widths=[64])
    wide_epilogue = dataclasses.replace(TWO_TILES, epilogue_subtile=1)  # 128-column epilogue tiles
    with pytest.raises(ValueError, match=r"widths: block_n=192 leaves .* 192 output columns"):
        run([a, a], [w, w], config=wide_epilogue, widths=[128, 192])
    deep = _ws(128, 128, 6, subtile=2)  # 192 KiB of ring at 128 wide: 288 at 256
    with pytest.raises(ValueError, match=r"widths: block_n=256 needs \d+ bytes of shared memory"):
        run([a, a], [w, w], config=deep, widths=[128, 256])


@needs_transposes
@pytest.mark.parametrize(  # each kernel and each spec once (a step under the interpreter: ~15 s)
    "case, kernel",
    [(CASES[0], "pingpong"), (CASES[1], "cooperative-split-m")],
    ids=lambda v: v if isinstance(v, str) else _case_id(v),
)
def test_step_with_grouped_weight_gradients(monkeypatch, case, kernel: str) -> None:
    """The step with its weight gradients in one grouped launch at the end: every gradient bit
    for bit the step's with them apart on the same tiles (the tuned table pins every GEMM of the
    step to them) — on one width, and with every product but the first on tiles twice as wide
    (`GroupedTiles.widths`) — within the policy of the float64 reference; `mlp_backward` asks
    `grouped_config` for the products in the order it reaches them."""
    widths, activation, bias, dtype, m = case
    spec = MLPSpec(widths, activation, bias, dtype)
    cfg = dataclasses.replace(GROUPED[kernel], epilogue_subtile=1)
    monkeypatch.setattr(hopper, "tuned_config", lambda *a, **kw: (cfg, 2))
    asked = []

    def grouped_config(products, k, *, interpret):
        asked.append((products, k))
        return None

    monkeypatch.setattr(hopper, "grouped_config", grouped_config)
    x, params, dy = _inputs(spec, m, 23)
    _, apart = _hopper_step(spec, x, params, dy)
    layers = spec.layers()[::-1]
    widths_out = [packed_width(la.d_out) if la.gated else la.d_out for la in layers]
    assert asked == [([(la.d_in, w) for la, w in zip(layers, widths_out, strict=True)], m)]
    two_widths = (cfg.block_n,) + (2 * cfg.block_n,) * (len(layers) - 1)
    plans = [cfg, GroupedTiles(cfg, two_widths)]
    for plan in plans:
        _, grouped = _hopper_step(spec, x, params, dy, grouped=plan)
        for name in apart:
            assert np.asarray(grouped[name]).tobytes() == np.asarray(apart[name]).tobytes(), name
    ref = reference.backward(spec, x, params, _f64(dy), round_hidden=True)
    got = {k: _f64(v) for k, v in grouped.items()}
    assert_grads_close(got, ref, spec, baselines=_baseline(spec, x, params, dy), what=str(spec))


def test_grouped_config_takes_only_what_was_measured_faster(monkeypatch) -> None:
    """The grouped launch is taken where the committed sweep measured it faster than the
    weight gradients apart, for these products (in order) at the nearest K bucket; never under
    the interpreter."""
    coop = _ws(128, 256, 4, subtile=2).to_dict()
    pp = _ws(128, 128, 6, subtile=2, pingpong=True).to_dict()
    products = [[3072, 768], [768, 6144]]
    table = {
        hopper.GROUPED_KIND: [
            {"products": products, "k": 8192, "config": coop, "us": 160.0, "apart_us": 215.0},
            {"products": products, "k": 1024, "config": pp, "us": 30.0, "apart_us": 29.0},
        ]
    }
    monkeypatch.setattr(hopper, "tuned_table", lambda: table)
    got = hopper.grouped_config([(3072, 768), (768, 6144)], 8000, interpret=False)
    assert got == GroupedTiles(TileConfig.from_dict(coop))
    assert hopper.grouped_config([(3072, 768), (768, 6144)], 1024, interpret=False) is None
    assert hopper.grouped_config([(768, 6144), (3072, 768)], 8192, interpret=False) is None
    assert hopper.grouped_config([(3072, 768), (768, 6144)], 8192, interpret=True) is None
    # an entry with each product's width
    table[hopper.GROUPED_KIND][0]["widths"] = [256, 192]
    got = hopper.grouped_config([(3072, 768), (768, 6144)], 8192, interpret=False)
    assert got == GroupedTiles(TileConfig.from_dict(coop), (256, 192))


def test_grouped_config_reads_this_gpus_entry_first(monkeypatch) -> None:
    """Where two GPUs measured the grouped launch of the same products, each reads its own entry
    (common.tiling.measured_here_first): the H100 its two widths, the H200 its one width; a GPU
    with none of its own reads the table's."""
    coop = _ws(128, 256, 4, subtile=2).to_dict()
    products = [[3072, 768], [768, 6144]]
    entry = {"products": products, "k": 8192, "config": coop, "apart_us": 220.0}
    table = {
        hopper.GROUPED_KIND: [
            {**entry, "us": 183.2, "gpu": "NVIDIA H200"},
            {**entry, "us": 164.0, "gpu": "NVIDIA H100 80GB HBM3", "widths": [256, 192]},
        ]
    }
    monkeypatch.setattr(hopper, "tuned_table", lambda: table)
    ask = functools.partial(hopper.grouped_config, [(3072, 768), (768, 6144)], 8192,
                            interpret=False)  # fmt: skip
    cfg = TileConfig.from_dict(coop)
    monkeypatch.setattr(compat, "gpu_name", lambda: "NVIDIA H100 80GB HBM3")
    assert ask() == GroupedTiles(cfg, (256, 192))
    monkeypatch.setattr(compat, "gpu_name", lambda: "NVIDIA H200")
    assert ask() == GroupedTiles(cfg)
    monkeypatch.setattr(compat, "gpu_name", lambda: "NVIDIA B200")
    assert ask() == GroupedTiles(cfg)  # the first of the table's: no entry of its own


def test_sweep_plans_widths_that_fill_the_waves() -> None:
    """The busiest block's work of a grouped launch (common.tiling.grouped_makespan) on 132 SMs,
    and the sweep's width plans from it: hf-blog-geglu's weight gradients run 2 tiles a block on
    one 128×256 width (216 tiles, 1.64 tiles of work a block) and 1.75 on 256 beside 192; the
    sweep plans that (and 192 beside 128, the same 1.75) for the cooperative 128×256, nothing
    that does not beat one width, and nothing the launch refuses."""
    from fusedmlp.bench import sweep_mosaic_backward as sweep
    from fusedmlp.common.tiling import grouped_makespan

    products = [(3072, 768), (768, 6144)]
    assert grouped_makespan(products, 128, [256, 256]) == 2.0
    assert grouped_makespan(products, 128, [256, 192]) == 1.75
    assert grouped_makespan(products, 128, [192, 256]) == 2.0
    assert grouped_makespan([(64, 64)], 128, [64], unit=64) == 1.0  # fewer tiles than SMs
    wg = sweep.weight_gradients("hf-blog-geglu")
    assert sweep.width_plans(wg, _ws(128, 256, 4, subtile=2)) == [(256, 192), (192, 128)]
    assert sweep.width_plans(wg, _ws(128, 128, 6, subtile=2, pingpong=True)) == []
    for cfg, _, widths in sweep.grouped_grid(wg):
        if widths is not None:
            pipeline.plan_widths(cfg, widths, "linear_act", "bfloat16")


def test_grouped_launch_lowers_for_cuda() -> None:
    """hf-blog-geglu's two weight gradients at M = 8192 as one grouped launch, on the
    cooperative 128×256 (split along N) and the ping-pong 128×128 tiles, and on 128×256 beside
    128×192 (split along M; the weight rings in one RefUnion), lower for CUDA."""
    m = 8192
    S, dt = jax.ShapeDtypeStruct, jnp.bfloat16
    shapes = [S((m, 3072), dt), S((m, 768), dt), S((m, 768), dt), S((m, 6144), dt)]
    plans = [
        (_ws(128, 256, 4, subtile=2), None),
        (_ws(128, 128, 6, subtile=2, pingpong=True), None),
        (_ws(128, 256, 4, subtile=2), (256, 192)),  # the committed plan: 1.75 tiles a block
    ]
    for cfg, widths in plans:

        def dws(h, dy, x, dz, cfg=cfg, widths=widths):
            return linear_mod.linear_grouped(
                [h, x], [dy, dz], config=cfg, widths=widths, interpret=False, x_kmajor=True
            )

        assert "linear_grouped" in lower_for_cuda(dws, *shapes)


def test_grouped_bad_forms_are_refused_by_name() -> None:
    dt = jnp.bfloat16
    a, b = jnp.zeros((64, 32), dt), jnp.zeros((48, 32), dt)
    w = jnp.zeros((32, 64), dt)
    run = functools.partial(linear_mod.linear_grouped, config=TWO_TILES, interpret=True)
    with pytest.raises(ValueError, match=r"xs, ws: expected as many .* got 2 and 1"):
        run([a, b], [w])
    with pytest.raises(ValueError, match=r"xs, ws: expected one K and one dtype"):
        run([a, jnp.zeros((64, 48), dt)], [w, jnp.zeros((48, 64), dt)])
    with pytest.raises(ValueError, match=r"xs, ws: expected one K and one dtype.*float16"):
        run([a, b.astype(jnp.float16)], [w, w])
    f32 = jnp.zeros((64, 32), jnp.float32)
    with pytest.raises(NotImplementedError, match=r"linear_grouped: .*float32 is not supported"):
        run([f32], [jnp.zeros((32, 64), jnp.float32)])
    with pytest.raises(NotImplementedError, match=r"linear_grouped: .*N=40 is not a multiple"):
        run([a], [jnp.zeros((32, 40), dt)])
    plain = dataclasses.replace(TWO_TILES, warp_specialize=False)
    with pytest.raises(ValueError, match=r"config.warp_specialize: .* expected True"):
        linear_mod.linear_grouped([a], [w], config=plain, interpret=True)


@needs_transposes
@pytest.mark.parametrize("case", [CASES[3]], ids=_case_id)  # both act' steps "dact_gated", 4 layers
def test_step_on_tuned_pingpong_tiles(monkeypatch, case) -> None:
    """The whole step with every GEMM on ping-pong tiles, as a tuned table may pick them
    (`tuned_config`): gradients within the policy of the float64 reference, and every GEMM of the
    step did take the table's tiles (its kinds named by `gemm_kind`)."""
    widths, activation, bias, dtype, m = case
    spec = MLPSpec(widths, activation, bias, dtype)
    asked = []

    def tuned(kind, m, n, k, *, interpret):
        asked.append(kind)
        return dataclasses.replace(PINGPONG, epilogue_subtile=1), 1 + len(asked) % 2

    monkeypatch.setattr(hopper, "tuned_config", tuned)
    x, params, dy = _inputs(spec, m, 21)
    _, grads = _hopper_step(spec, x, params, dy)
    ref = reference.backward(spec, x, params, _f64(dy), round_hidden=True)
    got = {k: _f64(v) for k, v in grads.items()}
    assert_grads_close(got, ref, spec, baselines=_baseline(spec, x, params, dy), what=str(spec))
    gated_kinds = {"gated.preact", "linear_act.x_kmajor", "linear_act.w_kmajor"}
    assert gated_kinds | {"linear_act.w_kmajor.dact_gated"} >= set(asked) >= gated_kinds, asked


def test_tuned_config_takes_the_nearest_measured_m(monkeypatch) -> None:
    """The backward's table: an entry per (kind, N, K, M); the nearest M bucket is taken, no
    entry under the interpreter, and a shape without one gets the fitted tiles."""
    pp = dataclasses.replace(PINGPONG, block_k=64, num_stages=4).to_dict()
    coop = _ws(128, 256, 4, subtile=2).to_dict()
    table = {
        "linear_act.x_kmajor": [
            {"m": 512, "n": 768, "k": 8192, "config": pp, "slots": 2},
            {"m": 8192, "n": 768, "k": 8192, "config": coop, "slots": 1},
        ]
    }
    monkeypatch.setattr(hopper, "tuned_table", lambda: table)
    kind = hopper.gemm_kind("linear_act", pipeline.PLAIN_OUTPUT, pipeline.Operands(x_kmajor=True))
    assert kind == "linear_act.x_kmajor"
    cfg, slots = hopper.tuned_config(kind, 6000, 768, 8192, interpret=False)
    assert (cfg.to_dict(), slots) == (coop, 1)
    cfg, slots = hopper.tuned_config(kind, 700, 768, 8192, interpret=False)
    assert (cfg.to_dict(), slots) == (pp, 2)
    assert hopper.tuned_config(kind, 8192, 768, 8192, interpret=True) is None
    assert hopper.tuned_config(kind, 8192, 1024, 8192, interpret=False) is None
    got, outs = hopper.fitted_config(
        "linear_act", 8192, 768, 8192, "bfloat16", interpret=False,
        operands=pipeline.Operands(x_kmajor=True),
    )  # fmt: skip
    assert got.to_dict() == coop and outs.slots == 1


def test_each_gpu_reads_its_own_entry_first(monkeypatch) -> None:
    """Two GPUs' entries for one shape (the committed saving forward at hf-blog has the H200's and
    the H100's): each GPU takes its own, another GPU (or none: lowering on a CPU) the table's
    first; a shape measured on one GPU only serves every GPU."""
    pp = dataclasses.replace(PINGPONG, block_k=64, num_stages=5).to_dict()
    coop = _ws(256, 64, 3).to_dict()
    h100, h200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"
    table = {
        "gated.preact": [
            {"m": 8192, "n": 3072, "k": 768, "config": coop, "slots": 1, "gpu": h200},
            {"m": 8192, "n": 3072, "k": 768, "config": pp, "slots": 2, "gpu": h100},
            {"m": 8192, "n": 14336, "k": 4096, "config": coop, "slots": 1, "gpu": h100},
        ]
    }
    monkeypatch.setattr(hopper, "tuned_table", lambda: table)
    for gpu, want in (
        (h100, (pp, 2)),
        (h200, (coop, 1)),
        ("NVIDIA H800", (coop, 1)),
        (None, (coop, 1)),
    ):
        monkeypatch.setattr(compat, "gpu_name", lambda gpu=gpu: gpu)
        cfg, slots = hopper.tuned_config("gated.preact", 8192, 3072, 768, interpret=False)
        assert (cfg.to_dict(), slots) == want, gpu
        cfg, _ = hopper.tuned_config("gated.preact", 8192, 14336, 4096, interpret=False)
        assert cfg.to_dict() == coop, gpu
    committed = hopper.TUNED_FILE.read_text()
    assert f'"gpu": "{h100}"' in committed and f'"gpu": "{h200}"' in committed


def test_committed_backward_table_fits() -> None:
    """Every entry of the committed H200 table (tuned_h200_backward.json) names a kind of the
    step and fits the kernel's shared memory in both 16-bit dtypes with its outputs."""
    table = hopper.tuned_table()
    assert table, f"{hopper.TUNED_FILE} is missing or empty"
    for kind, entries in table.items():
        if kind == hopper.GROUPED_KIND:  # the weight gradients' grouped launch (no staging)
            for e in entries:
                assert len(e["products"]) > 1 and e["us"] > 0 and e["apart_us"] > 0, e
                for dtype in ("bfloat16", "float16"):
                    pipeline.check_config(TileConfig.from_dict(e["config"]), dtype, 1, False)
            continue
        family, *extras = kind.split(".")
        outputs = pipeline.Outputs(
            scale=2 if "dact_gated" in extras else 1, preact="preact" in extras
        )
        operands = pipeline.Operands("x_kmajor" in extras, "w_kmajor" in extras)
        epilogue = next((e for e in extras if e.startswith("dact")), "none")
        assert hopper.gemm_kind(family, outputs, operands, epilogue) == kind
        for e in entries:
            cfg = TileConfig.from_dict(e["config"])
            for dtype in ("bfloat16", "float16"):
                pipeline.check_config(
                    cfg, dtype, 2 if family == "gated" else 1, residual=False,
                    outputs=dataclasses.replace(outputs, slots=e["slots"]),
                )  # fmt: skip


@pytest.mark.parametrize("preset", ["hf-blog-geglu", "llama3-8b"])
def test_sweep_plans_the_steps_gemms_and_the_step_lowers(monkeypatch, preset: str) -> None:
    """bench/sweep_mosaic_backward.py times the GEMMs the step runs through `fitted_config`:
    its plan (`step_gemms`) is what the step asks for, kind and shape, in order — the weight
    gradients apart where the committed table has no grouped entry for them, else one grouped
    launch of the products `weight_gradients` plans (`grouped_config`); and the step at M = 8192
    lowers for CUDA on the tiles it then takes (the committed table's)."""
    from fusedmlp.bench import sweep_mosaic_backward as sweep
    from fusedmlp.common import get_preset

    spec = get_preset(preset).spec
    m = 8192
    asked = []
    fitted = hopper.fitted_config

    def recording(family, m, n, k, dtype, outputs=pipeline.PLAIN_OUTPUT, **kw):
        kind = hopper.gemm_kind(
            family, outputs, kw.get("operands", pipeline.AS_STORED), kw.get("epilogue", "none")
        )
        asked.append((kind, m, n, k))
        return fitted(family, m, n, k, dtype, outputs, **kw)

    monkeypatch.setattr(hopper, "fitted_config", recording)
    dt = jnp.dtype(spec.dtype)
    S = jax.ShapeDtypeStruct
    shapes = {k: S(v, dt) for k, v in packed_names(spec).items()}

    def step(x, params, dy):
        _, kept = hopper.forward_saving(x, params, spec, saved="preact", interpret=False)
        return hopper.mlp_backward(dy, kept, params, spec, saved="preact", interpret=False)

    text = lower_for_cuda(step, S((m, spec.d_in), dt), shapes, S((m, spec.d_out), dt))
    assert "linear_act_dact_gated" in text
    grouped = sweep.weight_gradients(preset, m)
    group = hopper.grouped_config([tuple(p) for p in grouped.products], m, interpret=False)
    planned = [g for g in sweep.step_gemms(preset, m) if group is None or g not in grouped.gemms]
    assert asked == [(g.kind, g.m, g.n, g.k) for g in planned]
    assert ("linear_grouped" in text) == (group is not None)


def _gated_ref(x, wv, bc, n: int) -> np.ndarray:
    """gelu(x·w + b) ⊙ (x·v + c) in float64 from the packed operands, [M, n]."""
    w, v = unpack_gated(np.asarray(_f64(wv)), n)
    b, c = unpack_gated(np.asarray(_f64(bc)), n)
    return layer_ref(_f64(x), w, b, "gelu", v=v, c=c)


def _dact_gated_ref(dh: np.ndarray, zg: np.ndarray, n: int, activation: str) -> np.ndarray:
    m = dh.shape[0]
    half = packed_width(n) // 2
    pairs = zg.reshape(m, half // 64, 2, 64)
    z, g = pairs[:, :, 0].reshape(m, half)[:, :n], pairs[:, :, 1].reshape(m, half)[:, :n]
    dz = dh * g * reference.activation_grad(activation, z)
    dg = dh * reference.activation(activation, z)
    out = np.zeros((m, half // 64, 2, 64))
    out[:, :, 0] = np.pad(dz, ((0, 0), (0, half - n))).reshape(m, half // 64, 64)
    out[:, :, 1] = np.pad(dg, ((0, 0), (0, half - n))).reshape(m, half // 64, 64)
    return out.reshape(m, 2 * half)


@pytest.fixture
def as_on_hopper(monkeypatch):
    """The front as on a Hopper GPU for its training choice, the kernels still interpreted:
    `_train_kernels` sees Hopper, `applies` keeps its impl and support rules (not its hardware
    check), and mosaic/backward.py's entry points run under the interpreter."""
    from fusedmlp.jax_impl import front

    monkeypatch.setattr(compat, "on_hopper", lambda: True)
    monkeypatch.setattr(
        hopper, "applies",
        lambda impl, spec, m: impl in hopper.IMPLS and hopper.unsupported_reason(spec, m) is None,
    )  # fmt: skip
    for name in ("forward_saving", "mlp_backward"):
        monkeypatch.setattr(hopper, name, functools.partial(getattr(hopper, name), interpret=True))
    front._PREPARED.clear()
    yield front
    front._PREPARED.clear()
    front._saving_forward.cache_clear()
    front._backward_pass.cache_clear()


@needs_transposes
def test_front_trains_pallas_mosaic_through_the_hopper_backward(monkeypatch, as_on_hopper) -> None:
    """jax.grad through `jax_impl.mlp(impl="pallas_mosaic")` on Hopper runs this module (the
    front's custom_vjp, `_train_kernels`): the same bits as calling it directly, in the caller's
    names, for both saved policies, eagerly and jitted; the act' steps are asked to write over
    the saved z only inside the enclosing jit (eagerly the saved tensors are arguments of the
    backward's own jit, which XLA would copy first); an explicit pallas_triton keeps the
    portable backward; the training plan says which."""
    front = as_on_hopper
    spec = MLPSpec((48, 80, 32), "swiglu", True, "bfloat16")
    m = 32
    x, params, dy = _inputs(spec, m, 23)
    _, want = _hopper_step(spec, x, params, dy)
    jp = {k: jnp.asarray(v) for k, v in params.items()}
    asked: list[bool] = []
    run = hopper.mlp_backward

    def recording(*args, overwrite_z: bool = True, **kw):
        asked.append(overwrite_z)
        return run(*args, overwrite_z=overwrite_z, **kw)

    monkeypatch.setattr(hopper, "mlp_backward", recording)
    for saved, jitted in (("preact", False), ("inputs", False), ("preact", True)):

        def loss(x, p, saved=saved):
            y = jax_impl.mlp(x, p, spec, impl="pallas_mosaic", saved=saved)
            return jnp.sum(y.astype(F32) * dy.astype(F32))

        grad = jax.grad(loss, argnums=(0, 1))
        dx, dp = (jax.jit(grad) if jitted else grad)(jnp.asarray(x), jp)
        for name, g in {"x": dx, **dp}.items():
            assert np.asarray(g).tobytes() == np.asarray(want[name]).tobytes(), (saved, name)
    assert asked == [False, False, True]
    assert front._train_kernels("pallas_mosaic", "pallas_mosaic", spec, m) == "hopper"
    assert front._train_kernels("pallas_triton", "pallas_triton", spec, m) == "portable"
    assert front._train_kernels("pallas_mosaic", "pallas_mosaic", spec, 40) == "portable"
    note = jax_impl.plan(spec, (m, 48), impl="pallas_mosaic", saved="preact").reason
    assert "Mosaic GPU kernels (jax_impl/mosaic/backward.py" in note, note


# ---- on both jax versions: lowering, shared memory, tiles, refusals ------------------------------
LOWER_SPECS = [
    MLPSpec((1024, 2048, 1024), "swiglu", False, "bfloat16"),  # llama's layer kinds, small
    MLPSpec((512, 1024, 768, 512), "geglu_tanh", True, "float16"),  # "dact_gated"
    MLPSpec((512, 1536, 512), "gelu_tanh", True, "bfloat16"),  # "dact"
    MLPSpec((512, 1024, 1024, 512), "relu", True, "bfloat16"),  # relu' off the outputs
]


@pytest.mark.parametrize("spec", LOWER_SPECS, ids=lambda s: f"{s.activation}-{len(s.widths)}")
def test_training_step_lowers_for_cuda(spec: MLPSpec) -> None:
    """The saving forward and the backward, jitted together at the GPU's tiles (the fitted
    configs: 128-wide and 256-wide tiles, 3-4 slots, ping-pong where the committed table has
    these shapes), lower for CUDA on this CPU — layout inference, the doubled and second staging
    tiles and Mosaic's shared-memory total."""
    m = 1024
    dt = jnp.dtype(spec.dtype)
    S = jax.ShapeDtypeStruct
    packed = pack_params(spec, init_params(spec, 0))
    shapes = {k: S(v.shape, dt) for k, v in packed.items()}

    def step(x, params, dy):
        _, kept = hopper.forward_saving(x, params, spec, saved="preact", interpret=False)
        return hopper.mlp_backward(dy, kept, params, spec, saved="preact", interpret=False)

    text = lower_for_cuda(step, S((m, spec.d_in), dt), shapes, S((m, spec.d_out), dt))
    # the saving forward's kernels, the weight and input gradients (with their act' epilogues)
    names = set(re.findall(r"linear_act_\w+|gated_fwd", text))
    assert "linear_act_fwd" in names, names
    if spec.gated and len(spec.widths) > 3:
        assert "linear_act_dact_gated" in names, names
    if spec.activation == "gelu_tanh":
        assert "linear_act_dact" in names, names


SMEM_CASES = [
    # (family, config, outputs, bias)
    ("linear_act", _ws(128, 128, 4, 2), pipeline.Outputs(scale=2), False),  # dact_gated
    ("linear_act", _ws(128, 256, 3, 2), pipeline.Outputs(scale=2), False),
    ("linear_act", _ws(128, 256, 3, 2), pipeline.Outputs(preact=True), True),
    ("gated", _ws(128, 128, 2), pipeline.Outputs(preact=True), True),
    ("gated", _ws(128, 64, 5), pipeline.Outputs(preact=True), True),
    ("gated", _ws(128, 128, 3), pipeline.Outputs(preact=True), True),  # does not fit
    ("gated", _ws(256, 64, 3), pipeline.Outputs(preact=True, slots=1), True),  # one staging slot
    ("linear_act", _ws(128, 256, 4, 2), pipeline.Outputs(scale=2, slots=1), False),
]


@pytest.mark.parametrize("family, config, outputs, bias", SMEM_CASES)
def test_smem_model_counts_the_wider_staging(monkeypatch, family, config, outputs, bias) -> None:
    """`Tiles.smem_bytes(..., outputs=)` counts what Mosaic GPU totals at lowering (within its
    barriers), so `fitted_config` keeps exactly the configs that fit."""
    from jax.experimental.mosaic.gpu import core as mgpu_core

    m, n, k = 1024, 1024, 1024
    dt = jnp.dtype("bfloat16")
    S = jax.ShapeDtypeStruct
    if family == "gated":
        fn = lambda x, w, b: gated_mod.gated_fwd(  # noqa: E731
            x, w, b, n=n, activation="silu", config=config, interpret=False, store_preact=True,
            staging_slots=outputs.slots,
        )  # fmt: skip
        args = (S((m, k), dt), S((k, packed_width(n)), dt), S((packed_width(n),), dt))
    elif outputs.preact:
        fn = lambda x, w, b: linear_mod.linear_act_fwd(  # noqa: E731
            x, w, b, None, activation="gelu", config=config, interpret=False, store_preact=True,
            staging_slots=outputs.slots,
        )  # fmt: skip
        args = (S((m, k), dt), S((k, n), dt), S((n,), dt))
    else:
        fn = lambda d, w, z: linear_mod.linear_act_fwd(  # noqa: E731
            d, w, None, None, activation="identity", config=config, interpret=False,
            w_kmajor=True, epilogue="dact_gated", z=z, dact_activation="silu",
            staging_slots=outputs.slots,
        )  # fmt: skip
        args = (S((m, k), dt), S((n, k), dt), S((m, packed_width(n)), dt))
    tiles = pipeline.plan_tiles(config, family)
    model = tiles.smem_bytes(2, has_bias=bias, outputs=outputs)
    monkeypatch.setattr(mgpu_core, "_SMEM_SIZE_BOUND", 1)  # every kernel "exceeds": read the total
    with pytest.raises(ValueError, match="exceeds available shared memory") as err:
        lower_for_cuda(fn, *args)
    got = int(re.search(r"smem_bytes=(\d+)", str(err.value)).group(1))
    assert model <= got <= model + 2048, (model, got)
    assert (got <= pipeline.SMEM_BYTES) == (model <= pipeline.SMEM_BYTES), (model, got)


@pytest.mark.parametrize(
    "family, mnk, outputs",
    [
        ("gated", (8192, 14336, 4096), pipeline.Outputs(preact=True)),  # llama3-8b gate/up
        ("linear_act", (8192, 14336, 4096), pipeline.Outputs(scale=2)),  # its input gradient
        ("linear_act", (4096, 28672, 8192), pipeline.PLAIN_OUTPUT),  # its weight gradient
        ("gated", (8192, 3072, 768), pipeline.Outputs(preact=True)),  # hf-blog
        ("linear_act", (8192, 3072, 768), pipeline.Outputs(scale=2)),
        ("linear_act", (8192, 768, 3072), pipeline.PLAIN_OUTPUT),
        ("linear_act", (8192, 768, 3072), pipeline.PLAIN_OUTPUT),  # hf-blog down: tuned ping-pong
    ],
)
def test_fitted_configs_fit_and_are_cooperative(monkeypatch, family, mnk, outputs) -> None:
    """The fitting rule for a shape the committed table does not hold (`tuned_table` emptied)."""
    monkeypatch.setattr(hopper, "tuned_table", dict)
    m, n, k = mnk
    cfg, fitted = hopper.fitted_config(family, m, n, k, "bfloat16", outputs, interpret=False)
    assert cfg.programs_per_sm == 1 and cfg.num_stages >= 3  # every one of these fits 3 K slots
    assert dataclasses.replace(fitted, slots=2) == dataclasses.replace(outputs, slots=2)
    tiles = pipeline.check_config(cfg, "bfloat16", 2 if family == "gated" else 1, False, fitted)
    assert tiles.smem_bytes(2, has_bias=True, outputs=fitted) <= pipeline.SMEM_BYTES
    default = pipeline.default_config(family, m, n, k, "bfloat16")
    if outputs == pipeline.PLAIN_OUTPUT:
        assert fitted.slots == 2
        if default.programs_per_sm == 1:
            assert cfg == default  # nothing to fit: the forward's tiles
    if (family, mnk) == ("gated", (8192, 14336, 4096)):
        # llama3-8b's tuned 256×64 gate/up tile: 2 staging slots would leave it 2 K slots
        assert (cfg.block_m, cfg.block_n, cfg.num_stages, fitted.slots) == (256, 64, 3, 1)


def test_bad_forms_are_refused_by_name() -> None:
    rng = np.random.default_rng(0)
    dt = jnp.bfloat16
    x = jnp.asarray(rng.standard_normal((64, 64)), dt)
    w = jnp.asarray(rng.standard_normal((64, 128)), dt)
    b = jnp.zeros((128,), dt)
    z = jnp.zeros((64, 64), dt)
    cfg = pipeline.INTERPRET_CONFIG
    run = linear_mod.linear_act_fwd
    with pytest.raises(ValueError, match=r"epilogue: expected one of .*got 'dgrad'"):
        run(x, w, None, None, activation="identity", config=cfg, interpret=True, epilogue="dgrad")
    with pytest.raises(ValueError, match=r"epilogue 'dact': expected the saved z and no bias"):
        run(x, w, b, None, activation="identity", config=cfg, interpret=True, epilogue="dact", z=z)
    with pytest.raises(ValueError, match=r"epilogue 'dact': expected the saved z .* z=None"):
        run(x, w, None, None, activation="identity", config=cfg, interpret=True, epilogue="dact")
    with pytest.raises(ValueError, match=r"overwrite_z: .* expected epilogue .*, got 'none'"):
        run(x, w, None, None, activation="identity", config=cfg, interpret=True, overwrite_z=True)
    narrow_epi = dataclasses.replace(_ws(128, 128, 2), epilogue_subtile=4)  # 32-column tiles
    with pytest.raises(ValueError, match=r"outputs.slots: expected one of \(1, 2, 3, 4\) .*got 5"):
        run(
            x, w, b, None, activation="relu", config=cfg, interpret=True, store_preact=True,
            staging_slots=5,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"config.epilogue_subtile: a doubled .* got 32 columns"):
        run(
            x, w.T, None, None, activation="identity", config=narrow_epi, interpret=True,
            w_kmajor=True, epilogue="dact_gated", z=jnp.zeros((64, 128), dt),
        )  # fmt: skip


def test_unsupported_reason_and_applies() -> None:
    spec = MLPSpec((64, 128, 64), "swiglu", True, "bfloat16")
    assert hopper.unsupported_reason(spec, 8192) is None
    why = hopper.unsupported_reason(spec, 40)  # the weight gradients contract over M
    assert why is not None and "layer 0 weight gradient (its contraction M = 40)" in why, why
    why = hopper.unsupported_reason(MLPSpec((64, 128, 64), "swiglu", True, "float32"), 64)
    assert why is not None and "float32 is not supported" in why, why
    why = hopper.unsupported_reason(MLPSpec((40, 128, 64), "gelu", True, "float16"), 64)
    assert why is not None and "layer 0 forward" in why and "K=40" in why, why
    # never under the interpreter, never for an explicit portable impl
    assert not hopper.applies("auto", spec, 8192) or compat.on_hopper()
    assert not hopper.applies("pallas_triton", spec, 8192)


# ---- on the GPU ----------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize(
    "spec",
    [
        MLPSpec((1024, 2816, 1024), "swiglu", False, "bfloat16"),
        MLPSpec((768, 3072, 768), "geglu_tanh", True, "bfloat16"),
        MLPSpec((512, 1536, 1024, 512), "gelu", True, "float16"),
        MLPSpec((512, 1024, 1024, 512), "relu", True, "bfloat16"),
    ],
    ids=lambda s: f"{s.activation}-{len(s.widths)}",
)
def test_gpu_step_matches_the_reference_and_repeats(spec: MLPSpec) -> None:
    """On the H200: the Mosaic GPU step's gradients within the policy of the float64 reference
    (baseline rule: XLA's autodiff), twice bit for bit (no atomics), and the front's jax.grad of
    `pallas_mosaic` runs this backward (`_train_kernels`): the kernels' gradients (x, weights)
    the same bits; the bias gradients, XLA column sums whose reduction order XLA picks per
    compiled graph (the H200 gave b2 of gelu-4 one ulp apart, 05b43a3), within the policy."""
    if not compat.on_hopper():
        pytest.skip("needs a Hopper GPU (sm_90: TMA, wgmma)")
    m = 2048
    assert hopper.applies("pallas_mosaic", spec, m)
    x, params, dy = _inputs(spec, m, 5)
    step = jax.jit(lambda x, dy: _hopper_step(spec, x, params, dy, interpret=False))
    _, grads = step(jnp.asarray(x), dy)
    _, again = step(jnp.asarray(x), dy)
    for name in grads:
        assert np.asarray(again[name]).tobytes() == np.asarray(grads[name]).tobytes(), name
    ref = reference.backward(spec, x, params, _f64(dy), round_hidden=True)
    got = {k: _f64(v) for k, v in grads.items()}
    assert_grads_close(got, ref, spec, baselines=_baseline(spec, x, params, dy), what=str(spec))

    def loss(x, p):
        y = jax_impl.mlp(x, p, spec, impl="pallas_mosaic")
        return jnp.sum(y.astype(F32) * dy.astype(F32))

    jp = {k: jnp.asarray(v) for k, v in params.items()}
    dx, dp = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x), jp)
    front = {"x": dx, **dp}
    for name, g in front.items():
        if name.startswith("b"):  # b{i}, bc{i}: the column sums
            continue
        assert np.asarray(g).tobytes() == np.asarray(grads[name]).tobytes(), name
    front64 = {k: _f64(v) for k, v in front.items()}
    assert_grads_close(front64, ref, spec, baselines=_baseline(spec, x, params, dy), what="front")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["cooperative", "pingpong", "two-widths"])
def test_gpu_grouped_weight_gradients(kernel: str) -> None:
    """On the H200: hf-blog-geglu's two weight gradients (a quarter of its batch) as one grouped
    launch on the tiles the sweep tries first (cooperative 128×256, ping-pong 128×128) and on
    128×256 beside 128×192 (`widths`: two weight rings in one RefUnion, the memory warpgroup
    waiting out the old ring before the new): each within the policy of its float64 product and
    bit for bit the product alone on the same tiles at its width (`linear_act_fwd`, whose
    cooperative kernel is jax's pipeline, the grouped one hand-rolled)."""
    if not compat.on_hopper():
        pytest.skip("needs a Hopper GPU (sm_90: TMA, wgmma)")
    cfg, widths = {
        "cooperative": (_ws(128, 256, 4, subtile=2), None),
        "pingpong": (_ws(128, 128, 6, subtile=2, pingpong=True), None),
        "two-widths": (_ws(128, 256, 4, subtile=2), (256, 192)),
    }[kernel]
    rng = np.random.default_rng(29)
    k, dt = 2048, jnp.bfloat16
    dims = [(3072, 768), (768, 6144)]  # (d_in, width) of layers 1 and 0
    hs = [jnp.asarray(rng.standard_normal((k, m)), dt) for m, _ in dims]
    dzs = [jnp.asarray(rng.standard_normal((k, n)) * k**-0.5, dt) for _, n in dims]
    outs = jax.jit(
        lambda hs, dzs: linear_mod.linear_grouped(
            hs, dzs, config=cfg, widths=widths, interpret=False, x_kmajor=True
        )
    )(hs, dzs)
    for g, (h, dz, y) in enumerate(zip(hs, dzs, outs, strict=True)):
        alone_cfg = cfg if widths is None else _ws(128, widths[g], 3)  # (bits: any depth)
        alone = linear_mod.linear_act_fwd(
            h, dz, None, None, activation="identity", config=alone_cfg, interpret=False,
            x_kmajor=True,
        )  # fmt: skip
        want = _f64(h).T @ _f64(dz)
        tolerance.assert_close(_f64(y), want, layer_spec("bfloat16"), what=f"{kernel} {y.shape}")
        assert np.asarray(y).tobytes() == np.asarray(alone).tobytes(), y.shape
