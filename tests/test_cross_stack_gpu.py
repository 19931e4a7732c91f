"""Cross-stack calls on the GPU (`-m gpu`): the same kernel, from both frameworks, same bits.

- `jax_triton` (JAX front): torch_impl's Triton kernels on jax arrays through jax_triton — the same
  bits as the native torch launch with the same TileConfig;
- `mosaic` (torch front): jax_impl/mosaic's Mosaic GPU kernels on torch tensors through
  `plgpu.as_torch_kernel` — the same bits as the native JAX launch;
on inputs shared through DLPack, and within tolerance of the float64 reference. A few
representative cases per path (every dtype and both bias settings once per family, odd shapes
spanning several tiles, M = 1 and M = 0) instead of the shape × dtype × bias matrix, which compiled
~100 kernels (170 s on the H200): `pytest -m gpu` must stay within 120 s (issue 20). The jax_triton
tests skip, with the reason, when its wheel is absent (bench/fetch_wheels.sh, carried as .wheels/).

What the CPU can check (launch plans, interpreted adapters, lowering, padding) is in
test_cross_stack_cpu.py, whose helpers this file imports.
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import os
import re

import numpy as np
import pytest
from test_cross_stack_cpu import _problem, _reference, _torch

from fusedmlp.common import MLPSpec, golden
from fusedmlp.common.dtypes import numpy_dtype
from fusedmlp.common.tolerance import assert_close
from helpers import layer_spec, to_numpy

# torch and JAX share the GPU in these tests: JAX must not grab 75% of its memory up front (set
# before JAX's backend starts; the `fusedmlp` CLI does the same).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

HAVE_JAX_TRITON = importlib.util.find_spec("jax_triton") is not None
needs_jax_triton = pytest.mark.skipif(
    not HAVE_JAX_TRITON,
    reason="jax_triton is not installed: run bench/fetch_wheels.sh and carry .wheels/ "
    "(bench/gpu_check.sh installs it onto PYTHONPATH)",
)
# (family, dtype, M, K, N, bias)
JAX_TRITON_CASES = [
    ("linear_act", "bfloat16", 300, 257, 129, True),
    ("linear_act", "float32", 37, 53, 45, False),
    ("linear_act", "float16", 0, 64, 64, True),
    ("gated", "float16", 300, 257, 129, False),
    ("gated", "bfloat16", 1, 29, 70, True),
    ("gated", "float32", 37, 53, 45, True),
]
# Mosaic takes 16-bit operands with K and N in multiples of 16 (its swizzle atoms); M is free (odd
# M >= 8 is padded to a multiple of 8 by the launcher, mirrored on the torch side).
MOSAIC_CASES = [
    ("linear_act", "bfloat16", 300, 256, 144, True),
    ("linear_act", "float16", 1, 32, 80, False),
    ("gated", "float16", 37, 64, 48, True),
    ("gated", "bfloat16", 256, 256, 384, False),
    ("gated", "bfloat16", 0, 64, 64, True),
]


def _jax_from_torch(t):
    """The same GPU buffer as a jax array (DLPack, zero-copy); an empty tensor is made anew (there
    is no buffer to share)."""
    import jax
    import jax.numpy as jnp

    if t is None:
        return None
    if t.numel() == 0:
        return jnp.zeros(tuple(t.shape), numpy_dtype(str(t.dtype).removeprefix("torch.")))
    return jax.dlpack.from_dlpack(t)


def _bits_equal(a, b) -> bool:
    import torch

    a = a if isinstance(a, torch.Tensor) else torch.from_dlpack(a)
    b = b if isinstance(b, torch.Tensor) else torch.from_dlpack(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    ints = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return bool(torch.equal(a.contiguous().view(ints), b.contiguous().view(ints)))


def _gpu_operands(family: str, dtype: str, m: int, k: int, n: int, bias: bool):
    """One layer's operands on the GPU in both frameworks (the same buffers, shared through
    DLPack), with the activation (and, for linear_act with a bias, the residual) each family is
    checked with: (activation, NumPy ops, torch ops, jax ops)."""
    activation = "gelu_tanh" if family == "linear_act" else "silu"
    residual = family == "linear_act" and bias
    ops = _problem(family, m, k, n, dtype, bias, residual)
    t = {name: _torch(a, "cuda") for name, a in ops.items()}
    j = {name: _jax_from_torch(v) for name, v in t.items()}
    return activation, ops, t, j


def _launch(family: str, mod, ops: dict, *, n: int, **kw):
    """`mod`'s launcher of `family` on `ops`: gated_fwd(x, wv, bc, n=n) or
    linear_act_fwd(x, w, b, residual), with the keyword arguments `kw`."""
    if family == "gated":
        return mod.gated_fwd(ops["x"], ops["wv"], ops["bc"], n=n, **kw)
    return mod.linear_act_fwd(ops["x"], ops["w"], ops["b"], ops["residual"], **kw)


def _same_bits_and_close(
    what: str, family: str, dtype: str, shape, bias, activation, out, other, ops
):
    """`out` has `other`'s bits and is within tolerance of the float64 reference."""
    assert _bits_equal(out, other), f"{family} {dtype} {shape} bias={bias}"
    ref = _reference(family, ops, activation)
    assert_close(to_numpy(out), ref, layer_spec(dtype), what=f"{what} {family} {dtype}")


def _torch_and_jax(family, dtype, m, k, n, bias, config_fn, torch_mods, jax_mods, **jax_kw):
    """One case through a torch launcher and a jax one (under jax.jit), both with `config_fn`'s
    config; the modules are (gated, linear_act) pairs. (activation, ops, torch out, jax out)."""
    import jax

    activation, ops, t, j = _gpu_operands(family, dtype, m, k, n, bias)
    cfg = config_fn(family, max(m, 1), n, k, dtype, interpret=False)
    launch = functools.partial(_launch, family, n=n, activation=activation, config=cfg)
    pick = 0 if family == "gated" else 1
    out_torch = launch(torch_mods[pick], t)
    out_jax = jax.jit(functools.partial(launch, jax_mods[pick], **jax_kw))(j)
    out_jax.block_until_ready()
    return activation, ops, out_torch, out_jax


@pytest.mark.gpu
@needs_jax_triton
@pytest.mark.parametrize(("family", "dtype", "m", "k", "n", "bias"), JAX_TRITON_CASES)
def test_jax_triton_same_bits_as_torch_triton(
    family: str, dtype: str, m: int, k: int, n: int, bias: bool
) -> None:
    from fusedmlp.common.tiling import heuristic_config
    from fusedmlp.jax_impl.cross import gated as jg
    from fusedmlp.jax_impl.cross import linear_act as jl
    from fusedmlp.torch_impl import gated as tg
    from fusedmlp.torch_impl import linear_act as tla

    activation, ops, native, cross = _torch_and_jax(
        family, dtype, m, k, n, bias, heuristic_config, (tg, tla), (jg, jl)
    )
    if m == 0:
        assert tuple(cross.shape) == tuple(native.shape) == (0, n)
        return
    what = ("jax_triton", family, dtype, (m, k, n), bias, activation)
    _same_bits_and_close(*what, cross, native, ops)


@pytest.mark.gpu
@pytest.mark.parametrize(("family", "dtype", "m", "k", "n", "bias"), MOSAIC_CASES)
def test_mosaic_from_torch_same_bits_as_pallas_mosaic(
    family: str, dtype: str, m: int, k: int, n: int, bias: bool
) -> None:
    from fusedmlp.jax_impl.mosaic import default_config
    from fusedmlp.jax_impl.mosaic import gated as mg
    from fusedmlp.jax_impl.mosaic import linear_act as ml
    from fusedmlp.torch_impl.cross import gated as tg
    from fusedmlp.torch_impl.cross import linear_act as tl_

    activation, ops, cross, native = _torch_and_jax(
        family, dtype, m, k, n, bias, default_config, (tg, tl_), (mg, ml), interpret=False
    )
    assert tuple(cross.shape) == (m, n) and cross.is_contiguous()
    if m == 0:
        assert tuple(native.shape) == (0, n)
        return
    what = ("mosaic-from-torch", family, dtype, (m, k, n), bias, activation)
    _same_bits_and_close(*what, cross, native, ops)


@pytest.mark.gpu
def test_mosaic_from_torch_on_a_side_stream() -> None:
    """On a side stream the kernel runs after that stream's earlier work (the direct launch goes to
    the current stream; as_torch_kernel's own, where it runs, is fenced against it)."""
    import torch

    from fusedmlp.jax_impl.mosaic import default_config
    from fusedmlp.torch_impl.cross import linear_act as tl_

    m, k, n = 300, 256, 144  # K and N in multiples of 16: what Mosaic GPU takes
    ops = _problem("linear_act", m, k, n, "bfloat16", True)
    t = {name: _torch(a, "cuda") for name, a in ops.items()}
    cfg = default_config("linear_act", m, n, k, "bfloat16", interpret=False)
    expected = tl_.linear_act_fwd(t["x"], t["w"], t["b"], None, activation="relu", config=cfg)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        x = t["x"] * 1  # produced on the side stream just before the call
        torch.cuda._sleep(10_000_000)  # keep the side stream busy: an unfenced call would race
        x2 = x.clone()
        got = tl_.linear_act_fwd(x2, t["w"], t["b"], None, activation="relu", config=cfg)
        got = got.clone()
    torch.cuda.synchronize()
    assert _bits_equal(got, expected)


@pytest.mark.gpu
def test_mosaic_from_torch_in_a_cuda_graph() -> None:
    """The direct launch (torch_impl/cross/launcher.py) goes to the current stream, so a CUDA
    graph records it: captured after a first (compiling) call and replayed on a new x copied into
    the captured one, it gives the eager call's bits on that x. A shape not compiled before the
    capture is refused before anything is recorded (the CPU test checks the message)."""
    import torch

    from fusedmlp.jax_impl.mosaic import default_config
    from fusedmlp.torch_impl.cross import linear_act as tl_

    m, k, n = 304, 256, 144
    ops = _problem("linear_act", m, k, n, "bfloat16", True)
    t = {name: _torch(a, "cuda") for name, a in ops.items()}
    cfg = default_config("linear_act", m, n, k, "bfloat16", interpret=False)
    x = t["x"].clone()
    tl_.linear_act_fwd(x, t["w"], t["b"], None, activation="gelu_tanh", config=cfg)  # compiles
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    # thread_local: JAX's threads in this process make no unsafe call the capture would refuse
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        y = tl_.linear_act_fwd(x, t["w"], t["b"], None, activation="gelu_tanh", config=cfg)
    new_x = torch.randn_like(x)
    x.copy_(new_x)
    y.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    want = tl_.linear_act_fwd(new_x, t["w"], t["b"], None, activation="gelu_tanh", config=cfg)
    assert _bits_equal(y, want)


# One golden case of each kind (gated with bias in float16; plain without bias in bfloat16): whole
# MLPs through the fronts, several layers and kernels each.
FRONT_CASES = ["geglu-float16-bias", "gelu_tanh-bfloat16-nobias"]


def _on_gpu(x, params):
    """x and params on the GPU in both frameworks, the same buffers: (tx, tp, jx, jp)."""
    tx, tp = _torch(x, "cuda"), {k: _torch(v, "cuda") for k, v in params.items()}
    return tx, tp, _jax_from_torch(tx), {k: _jax_from_torch(v) for k, v in tp.items()}


# Mosaic GPU takes widths in multiples of 16 (the golden files' odd widths fall back by name), so
# its whole-MLP cases are their own: gated with bias in float16, plain without in bfloat16, odd M.
MOSAIC_FRONT_SPECS = [
    MLPSpec((64, 96, 48), "geglu", True, "float16"),
    MLPSpec((48, 160, 64, 32), "gelu_tanh", False, "bfloat16"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("spec", MOSAIC_FRONT_SPECS, ids=str)
def test_fronts_mosaic_matches_pallas_mosaic(spec: MLPSpec) -> None:
    """Whole MLPs through the fronts: torch `mosaic` = JAX `pallas_mosaic`, bit for bit, on the
    same inputs shared through DLPack, and both within tolerance of the float64 reference."""
    from fusedmlp.common import init_params, make_input, reference
    from fusedmlp.jax_impl import front as jfront
    from fusedmlp.torch_impl import front as tfront

    params, x = init_params(spec, seed=31), make_input(spec, 37, seed=32)
    tx, tp, jx, jp = _on_gpu(x, params)
    y_mosaic = tfront.mlp(tx, tp, spec, impl="mosaic")
    y_pallas = jfront.mlp(jx, jp, spec, impl="pallas_mosaic")
    assert _bits_equal(y_mosaic, y_pallas), str(spec)
    assert_close(to_numpy(y_mosaic), reference.forward(spec, x, params), spec, what=str(spec))


@pytest.mark.gpu
@needs_jax_triton
@pytest.mark.parametrize("name", FRONT_CASES)
def test_fronts_jax_triton_matches_triton(name: str) -> None:
    """Whole MLPs through the fronts: JAX `jax_triton` = torch `triton`, bit for bit."""
    from fusedmlp.jax_impl import front as jfront
    from fusedmlp.torch_impl import front as tfront

    case = golden.load(name)
    tx, tp, jx, jp = _on_gpu(case.x, case.params)
    y_jt = jfront.mlp(jx, jp, case.spec, impl="jax_triton")
    y_triton = tfront.mlp(tx, tp, case.spec, impl="triton")
    assert _bits_equal(y_jt, y_triton), name
    assert_close(to_numpy(y_jt), case.y, case.spec, what=name)


@pytest.mark.gpu
def test_decompose_on_the_gpu() -> None:
    """Both kernels from both frameworks, measured with the bench's definitions: the same kernel
    gives the same bits, one kernel per call natively, and every measured column. Without the
    jax_triton wheel its two rows say so (ImportError) and the other six are checked."""
    import torch

    from fusedmlp.bench import cross_overhead

    # The suite NaN-fills every torch.empty (conftest): one fill kernel more per torch call, which
    # a user's process does not run. Measure as a user runs.
    torch.utils.deterministic.fill_uninitialized_memory = False
    rows, reason = cross_overhead.decompose(m=256, n=256, k=256)
    assert reason is None
    assert len(rows) == 8
    counts = collections.Counter((r["kernel"].split(".")[0], r["framework"]) for r in rows)
    assert set(counts.values()) == {2}
    assert all(re.match(r"(triton|mosaic)\.(linear_act|gated)$", r["kernel"]) for r in rows)
    measured = [
        r for r in rows if HAVE_JAX_TRITON or r["route"] != cross_overhead.ROUTE["triton", "jax"]
    ]
    assert len(measured) == (8 if HAVE_JAX_TRITON else 6)
    for row in rows:
        if row not in measured:
            assert "jax_triton" in row["note"], row
    for row in measured:
        assert row["note"] == "", row
        for col in cross_overhead.MEASURED:
            assert row[col] > 0, (col, row)
        assert row["device_us"] <= row["span_us"] * 1.001
        assert row["kernels_per_call"] >= 1
        assert row["same_bits"] is (
            True if HAVE_JAX_TRITON or row["kernel"].startswith("mosaic") else None
        ), row
    natives = [
        r
        for r in measured
        if (r["kernel"].split(".")[0], r["framework"]) in (("triton", "torch"), ("mosaic", "jax"))
    ]
    assert all(r["kernels_per_call"] == 1 for r in natives), natives
    assert len(cross_overhead.attribute(rows)) == (4 if HAVE_JAX_TRITON else 2)


@pytest.mark.gpu
def test_torch_fused_small_runs_the_sibling_at_128_wide() -> None:
    """torch's fused_small at a 128-wide MLP of 2^21 rows x layers plans its Mosaic GPU sibling
    (from JAX, on these tensors) and gives the JAX front's bits, which runs the same kernel, within
    tolerance of the float64 reference (on the first rows), a NaN row propagated; pinned at an odd
    M (rows padded in torch) too. A CUDA graph captured after those eager calls records the
    sibling's launch (cross/launcher.py) and replays the eager call's bits on a new x copied into
    the captured one, under graph_safe too. The bound: the sibling from 2^19 rows x layers, the
    Triton kernel below."""
    import torch

    from fusedmlp.common import init_params, make_input, reference
    from fusedmlp.jax_impl import front as jfront
    from fusedmlp.jax_impl.mosaic import fused_small as mfs
    from fusedmlp.torch_impl import front as tfront
    from fusedmlp.torch_impl import fused_small as tfs

    spec = MLPSpec((128,) * 5, "relu", True, "float16")
    m, rows = 1 << 19, 4099  # 4 layers: 2^21 rows x layers; the reference's rows, an odd M
    params, x = init_params(spec, seed=41), make_input(spec, m, seed=42)
    x[7, 3] = np.nan  # a NaN row of x is a NaN row of y
    ref = reference.forward(spec, x[:rows], params)
    tx, tp, jx, jp = _on_gpu(x, params)
    the_plan = tfront.plan(spec, tuple(tx.shape), impl="fused_small", device="cuda")
    assert "Mosaic GPU sibling runs here" in the_plan.reason, the_plan
    fewer = tfront.plan(spec, (rows, 128), impl="fused_small", device="cuda")
    assert "sibling" not in fewer.reason, fewer
    at_bound = tfront.plan(spec, (1 << 17, 128), impl="fused_small", device="cuda")  # 2^19
    assert "sibling runs here" in at_bound.reason, at_bound
    below = tfront.plan(spec, ((1 << 17) - 8, 128), impl="fused_small", device="cuda")
    assert "sibling" not in below.reason, below
    y = tfront.mlp(tx, tp, spec, impl="fused_small")
    assert _bits_equal(y, jfront.mlp(jx, jp, spec, impl="fused_small"))
    assert_close(to_numpy(y[:rows]), ref, spec, what="torch fused_small via the sibling")
    assert np.isnan(to_numpy(y)[7]).all()
    odd = tfs.fused_small_fwd(tx[:rows], tp, spec, config=mfs.RING_CONFIG)
    assert _bits_equal(odd, jfront.mlp(jx[:rows], jp, spec, impl="fused_small"))
    with tfront.graph_safe():
        captured = tfront.plan(spec, tuple(tx.shape), impl="fused_small", device="cuda")
        assert "sibling runs here" in captured.reason and tfront.graph_capturable(captured)
    graph = torch.cuda.CUDAGraph()
    # thread_local: JAX's threads in this process make no unsafe call the capture would refuse
    with tfront.graph_safe(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
        y_graph = tfront.mlp(tx, tp, spec, impl="fused_small")
    new_x = torch.flip(tx, dims=(0,))
    tx.copy_(new_x)
    y_graph.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert _bits_equal(y_graph, tfront.mlp(new_x, tp, spec, impl="fused_small"))
    assert np.isnan(to_numpy(y_graph)[m - 1 - 7]).all()  # the NaN row, flipped
