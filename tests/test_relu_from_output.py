"""relu layers keep no pre-activation in training (issue 24): act' is read off the layer's output.

relu'(z) is a function of h = relu(z), which the saving forward keeps anyway as the next layer's
input: 1 where h > 0, NaN where h is NaN, 0 elsewhere (torch's ReLU backward reads its result the
same way). So the per-layer saving forward (both stacks, and its Hopper variant), fused_small's
saving forward and the custom op's residual shapes keep [M, 0] / None for a relu layer's z, and
`cost.saved_bytes` counts none. Checked here on every training path under the interpreters:

- the residual list, its bytes against `saved_bytes` and the op's fake shapes, the plans' MiB;
- gradients bit for bit against the float64 reference and torch autograd of the eager baseline on
  integer-valued inputs (every product exact in fp32, so any mask difference shows) that make
  some pre-activations exactly 0 (output 0, derivative 0 in all three), and with a NaN input (NaN
  through relu' like the reference; torch's threshold_backward gives 0 there, so it is left out);
- the dgrad "dact" epilogues (portable, TMA, Pallas twin) given the output give the bits they give
  with the stored z, on fp16 values including exact zeros, -0, NaN and positives that underflow.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from fusedmlp.bench.train import ImageConfig
from fusedmlp.common import MLPSpec, cost, reference
from fusedmlp.common.dtypes import numpy_dtype
from fusedmlp.common.packing import pack_params, unpack_params
from fusedmlp.common.params import param_shapes
from fusedmlp.common.presets import get_preset
from fusedmlp.common.tiling import INTERPRET_CONFIG
from fusedmlp.jax_impl import backward as jax_backward
from fusedmlp.jax_impl import front as jax_front
from fusedmlp.jax_impl import fused_small_backward as jax_small
from fusedmlp.torch_impl import backward, custom_op, front, fused_small_backward
from fusedmlp.torch_impl.baselines import eager
from fusedmlp.torch_impl.tma import backward as tma_backward
from fusedmlp.torch_impl.tma.linear_act import linear_act_fwd as tma_linear_act_fwd
from helpers import to_numpy, to_torch

# (stack, path): every training path that keeps residuals for a relu MLP
PATHS = [
    ("torch", "per_layer"),
    ("jax", "per_layer"),
    ("torch", "fused_small"),
    ("jax", "fused_small"),
    ("torch", "hopper"),
]
SPEC = MLPSpec((19, 37, 29, 23), "relu", True, "float32")  # odd widths; fused_small's WIDTH 64
HOPPER = MLPSpec((24, 64, 40, 16), "relu", True, "float32")  # TMA's 16-byte rule
M = 21  # a multiple of 4 for TMA (fp32 rows of M elements): 24 there


def _path_id(path) -> str:
    return "-".join(path)


def _case(path):
    return (HOPPER, 24) if path[1] == "hopper" else (SPEC, M)


def _exact_inputs(spec: MLPSpec, m: int, nan: bool):
    """Values in {-1, 0, 1} (every product and sum exact in fp32): params, x, dy; `nan` puts one
    NaN in x."""
    rng = np.random.default_rng(24)
    dt = numpy_dtype(spec.dtype)

    def ints(shape):
        return rng.integers(-1, 2, size=shape).astype(dt)

    plain = {name: ints(shape) for name, shape in param_shapes(spec).items()}
    x, dy = ints((m, spec.d_in)), ints((m, spec.d_out))
    if nan:
        x[3, 2] = np.nan
    return plain, x, dy


def _run(path, spec: MLPSpec, plain, x, dy):
    """(residuals as NumPy with None for an unkept z, gradients in the contract's names)."""
    stack, kind = path
    packed = pack_params(spec, plain)
    if stack == "torch":
        p = {k: to_torch(v) for k, v in packed.items()}
        xs, dys = to_torch(x), to_torch(dy)
        if kind == "fused_small":
            _, kept = fused_small_backward.forward_saving(xs, p, spec)
            run = fused_small_backward.mlp_backward
        else:
            _, kept = backward.forward_saving(xs, p, spec, saved="preact", hopper=kind == "hopper")
            run = tma_backward.mlp_backward if kind == "hopper" else backward.mlp_backward
        grads = run(dys, list(kept), p, spec, saved="preact")
    else:
        p = {k: jnp.asarray(v) for k, v in packed.items()}
        xs, dys = jnp.asarray(x), jnp.asarray(dy)
        if kind == "fused_small":
            _, kept = jax_small.forward_saving(xs, p, spec)
            run = jax_small.mlp_backward
        else:
            _, kept = jax_backward.forward_saving(xs, p, spec, saved="preact")
            run = jax_backward.mlp_backward
        grads = run(dys, kept, p, spec, saved="preact")
    kept_np = [None if k is None or k.shape[-1] == 0 else to_numpy(k) for k in kept]
    grads = {k: to_numpy(v) for k, v in grads.items()}
    return kept_np, {"x": grads.pop("x"), **unpack_params(spec, grads)}


# ---- what is kept --------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS, ids=_path_id)
def test_relu_layers_keep_no_preactivation(path):
    spec, m = _case(path)
    plain, x, dy = _exact_inputs(spec, m, nan=False)
    kept, _ = _run(path, spec, plain, x, dy)
    # h_0, z_0, h_1, z_1, …, z_{L-1}: every z unkept (relu hidden layers, identity output layer)
    assert len(kept) == 2 * spec.num_layers
    assert all(z is None for z in kept[1::2])
    for layer, h in zip(spec.layers(), kept[0::2], strict=True):
        assert h.shape == (m, layer.d_in)
    kept_bytes = sum(h.nbytes for h in kept[0::2])
    assert kept_bytes == cost.saved_bytes(spec, m, "preact")
    # the op's fake residuals (without x) are the real ones' shapes
    shapes = [(m, 0) if r is None else r.shape for r in kept[1:]]
    assert [tuple(s) for s in custom_op._preact_shapes(spec, m)] == shapes


def test_saved_bytes_and_plans_count_no_relu_preactivation():
    # The image fit (bench/train.py at 256 px: 65,536 rows, fp32) and nerf-64x5 (2,097,152 rows,
    # fp16): every layer's input only, where the old count added each relu layer's z.
    image = ImageConfig(size=256).spec
    nerf = get_preset("nerf-64x5").spec
    for spec, m, mib, before in ((image, 256 * 256, 72, 136), (nerf, 2_097_152, 1280, 2304)):
        itemsize = numpy_dtype(spec.dtype).itemsize
        assert cost.saved_bytes(spec, m, "preact") == itemsize * m * sum(spec.widths[:-1])
        assert cost.saved_bytes(spec, m, "preact") == mib * 2**20
        z_bytes = itemsize * m * sum(lay.d_out for lay in spec.layers()[:-1])
        assert cost.saved_bytes(spec, m, "preact") + z_bytes == before * 2**20
    # a relu MLP's saved bytes match what backward_bytes assumes (`_preact_width`: none)
    gelu = nerf.replace(activation="gelu")
    assert cost.saved_bytes(gelu, 8, "preact") > cost.saved_bytes(nerf, 8, "preact")
    shape = (2_097_152, 64)
    for plan in (
        front.plan(nerf, shape, impl="triton", saved="preact"),
        jax_front.plan(nerf, shape, impl="pallas_triton", saved="preact"),
    ):
        assert "saved='preact' keeps 1280.0 MiB" in plan.reason, plan.reason


# ---- gradients: exact zeros in z, and NaN ------------------------------------------------------
@pytest.mark.parametrize("nan", [False, True], ids=["zeros", "nan"])
@pytest.mark.parametrize("path", PATHS, ids=_path_id)
def test_relu_gradients_bitwise(path, nan):
    spec, m = _case(path)
    plain, x, dy = _exact_inputs(spec, m, nan)
    if not nan:  # the case has pre-activations exactly 0 in every hidden layer (and both signs)
        h = x.astype(np.float64)
        for layer in spec.layers()[:-1]:
            z = h @ plain[f"w{layer.index}"] + plain[f"b{layer.index}"]
            assert (z == 0).any() and (z > 0).any() and (z < 0).any()
            h = np.maximum(z, 0.0)
    _, got = _run(path, spec, plain, x, dy)
    want = reference.backward(spec, x, plain, dy, round_hidden=True)
    for name, g in got.items():
        assert g.dtype == np.float32
        np.testing.assert_array_equal(g, want[name].astype(np.float32), err_msg=name)
    # NaN in x's row 3 goes through every relu' of that row: dx's row 3, and only it, is NaN
    assert np.isnan(got["x"]).any(axis=1).tolist() == [nan and r == 3 for r in range(m)]
    if path[0] == "torch" and not nan:  # torch autograd's ReLU mask (threshold_backward)
        xs = to_torch(x).requires_grad_()
        ps = {k: to_torch(v).requires_grad_() for k, v in plain.items()}
        eager(xs, ps, spec).backward(to_torch(dy))
        auto = {"x": xs.grad, **{k: v.grad for k, v in ps.items()}}
        for name, g in got.items():
            np.testing.assert_array_equal(g, to_numpy(auto[name]), err_msg=name)


# ---- the dact epilogues: the output gives the stored z's bits ------------------------------------
def test_dact_epilogues_read_the_output_as_they_read_z():
    rng = np.random.default_rng(25)
    m, ko, kc = 24, 40, 24  # TMA's 16-byte rule in fp16
    z32 = rng.standard_normal((m, ko)).astype(np.float32)
    z32[0, :8] = [0.0, -0.0, np.nan, 1e-8, 2e-8, -1e-8, 6e-8, 1.0]  # 1e-8, 2e-8: fp16 0 (> 0 here)
    z32[5] = 0.0
    h32 = np.where(z32 < 0, np.float32(0), z32)  # relu as the kernels compute it (NaN kept)
    z16, h16 = z32.astype(np.float16), h32.astype(np.float16)
    assert z16[0, 3] == 0 and h16[0, 3] == 0 and np.isnan(h16[0, 2])
    a = rng.standard_normal((m, kc)).astype(np.float16)
    w = rng.standard_normal((ko, kc)).astype(np.float16)
    outs = {}
    for name, sv in (("z", z16), ("h", h16)):
        at, wt, st = to_torch(a), to_torch(w), to_torch(sv)
        kw = dict(epilogue="dact", activation="relu", config=INTERPRET_CONFIG)
        outs[f"portable-{name}"] = backward.dgrad_fwd(at, wt, st, **kw)
        outs[f"tma-{name}"] = tma_linear_act_fwd(
            at, wt.t(), None, None, activation="identity", config=INTERPRET_CONFIG,
            epilogue="dact", z=st, dact_activation="relu",
        )  # fmt: skip
        outs[f"jax-{name}"] = jax_backward.dgrad_fwd(
            jnp.asarray(a), jnp.asarray(w), jnp.asarray(sv), **kw
        )
        dy = to_torch(a[:, :1].repeat(ko, axis=1))
        outs[f"last-{name}"] = backward.dact_fwd(
            dy, st, activation="relu", gated=False, config=INTERPRET_CONFIG
        )
    arrays = {k: to_numpy(v) for k, v in outs.items()}
    for kind in ("portable", "tma", "jax", "last"):
        got, want = arrays[f"{kind}-h"], arrays[f"{kind}-z"]
        np.testing.assert_array_equal(got, want, err_msg=kind)
        assert np.isnan(got[0, 2]) and got[0, 3] == 0 and got[0, 0] == 0 and (got[5] == 0).all()
    np.testing.assert_array_equal(arrays["jax-h"], arrays["portable-h"])  # twins, bit for bit
