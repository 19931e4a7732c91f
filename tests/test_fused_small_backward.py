"""fused_small's training (fused_small_backward.py, both stacks): the saving forward and the
whole-MLP backward — kernel A with every layer's dW on chip and the sum of its programs' partials
(where common.tiling.small_wgrad_on_chip holds, and forced on any spec), else kernel A (every
layer's dZ and dx) and kernel B (every layer's dW and db in one launch, split-M partials summed in
a fixed order).

Gradients against `reference.backward(..., round_hidden=True)` under the gradient tolerance
(`common.tolerance.assert_grads_close`) at odd M and odd widths (padded to WIDTH 64 and 128),
plain and gated, 2-5 layers, the three dtypes, bias and none, relu/silu/gelu_tanh/swiglu/geglu;
the residuals and gradients bitwise equal to the per-layer path (backward.py) where the
accumulation order is the same (a pinned config whose tiles span the padded width); the twins
bitwise under the interpreters; a NaN row; `loss.backward()` through FusedMLP and `jax.grad`
through the JAX front take this path (impl fused_small and auto). Outputs are poisoned: torch's
empty tensors are NaN-filled (conftest.py), Pallas' interpreter fills outputs with NaN.

Interpreted kernels are slow on 2 cores: few cases, each covering several axes; M = 300 only where
the weight gradients must split (S > 1: the sum kernel runs).
"""

from __future__ import annotations

import functools
import json
import textwrap

import numpy as np
import pytest

from fusedmlp.common import (
    MLPSpec,
    TileConfig,
    init_params,
    make_grad_output,
    make_input,
    reference,
)
from fusedmlp.common.packing import pack_params, unpack_params
from fusedmlp.common.tiling import REGISTERS_PER_SM, SMEM_PER_SM
from fusedmlp.common.tolerance import assert_grads_close
from helpers import STACKS, run_script, to_numpy, to_torch

# (widths, activation, bias, dtype, M)
CASES = [
    ((24, 40, 17), "relu", True, "float32", 37),  # padded to WIDTH 64, S = 1
    ((24, 40, 17), "silu", False, "float16", 1),
    ((24, 100, 33, 17), "swiglu", True, "bfloat16", 300),  # 3 layers gated, WIDTH 128, S > 1
    ((19, 64, 64, 64, 64, 3), "gelu_tanh", True, "float16", 37),  # nerf-like, 5 layers
    ((24, 30, 17), "geglu", False, "float32", 40),  # gated WIDTH 32: a partly filled block pair
]


def _id(case) -> str:
    widths, act, bias, dtype, m = case
    return f"{'x'.join(map(str, widths))}-{act}-{'b' if bias else 'nob'}-{dtype}-M{m}"


def _spec(case) -> MLPSpec:
    widths, act, bias, dtype, _ = case
    return MLPSpec(widths, act, bias, dtype)


class Stack:
    """One stack's fused_small_backward behind one interface: NumPy in, NumPy out."""

    def __init__(self, name: str):
        import importlib

        self.name = name
        self.mod = importlib.import_module(f"fusedmlp.{name}_impl.fused_small_backward")

    def array(self, a: np.ndarray):
        if self.name == "torch":
            return to_torch(a)
        import jax.numpy as jnp

        return jnp.asarray(a)

    def run(self, spec, x, packed, dy, config=None, residuals=None, dz_budget=None, on_chip=None):
        """(y, residuals, grads) as NumPy; `residuals` replaces the saving forward's;
        `dz_budget`, `on_chip`: mlp_backward's (row chunks where the dZs pass it; the dWs on
        chip, None: the rule's choice)."""
        p = {k: self.array(v) for k, v in packed.items()}
        y, kept = self.mod.forward_saving(self.array(x), p, spec, config=config)
        if residuals is not None:
            kept = tuple(self.array(r) if r is not None else None for r in residuals)
            if self.name == "torch":
                kept = tuple(
                    k if k is not None else next(iter(p.values())).new_empty((x.shape[0], 0))
                    for k in kept
                )
        grads = self.mod.mlp_backward(
            self.array(dy), kept, p, spec, saved="preact", config=config, dz_budget=dz_budget,
            on_chip=on_chip,
        )  # fmt: skip
        as_np = lambda a: None if a is None or a.shape[-1] == 0 else to_numpy(a)  # noqa: E731
        return to_numpy(y), [as_np(k) for k in kept], {k: to_numpy(v) for k, v in grads.items()}


@functools.cache
def _stack(name: str) -> Stack:
    return Stack(name)


@functools.cache
def _inputs(case):
    spec = _spec(case)
    plain = init_params(spec, seed=11)
    x = make_input(spec, case[-1], seed=12)
    dy = make_grad_output(spec, case[-1], seed=13)
    return spec, plain, pack_params(spec, plain), x, dy


@functools.cache
def _run(name: str, case):
    spec, _, packed, x, dy = _inputs(case)
    return _stack(name).run(spec, x, packed, dy)


# ---- gradients vs the float64 reference, and the twins bit for bit -------------------------------
@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("name", STACKS)
def test_gradients_match_reference(name, case):
    spec, plain, _, x, dy = _inputs(case)
    grads = dict(_run(name, case)[2])  # a copy: the cached result is shared
    got = {"x": grads.pop("x"), **unpack_params(spec, grads)}
    want = reference.backward(spec, x, plain, dy, round_hidden=True)
    assert_grads_close(got, want, spec, what=f"{name} {spec}")


TWIN_CASES = [CASES[0], ((24, 100, 17), "relu", False, "bfloat16", 300)]  # WIDTH 64; 128, S > 1


@pytest.mark.parametrize("case", TWIN_CASES, ids=_id)
def test_twins_bitwise(case):
    # relu only: the backward's fp32 act' of the exp-built activations (silu, gelu, gelu_tanh and
    # the gated ones) differs by an ulp between the interpreters' exp (docs/cross_stack_cpu.md),
    # which a 16-bit rounding of dZ does not always hide (swiglu bf16: 15 of 76,800 dZ elements).
    (y_t, kept_t, g_t), (y_j, kept_j, g_j) = (_run(name, case) for name in STACKS)
    assert y_t.tobytes() == y_j.tobytes()
    for a, b in zip(kept_t, kept_j, strict=True):
        assert (a is None and b is None) or a.tobytes() == b.tobytes()
    for k in g_t:
        assert g_t[k].tobytes() == g_j[k].tobytes(), (k, np.sum(g_t[k] != g_j[k]))


def test_twin_contract():
    """Both twins define the same public names (the Triton saving kernel is the twin-diff)."""
    names = (
        "applies", "forward_saving", "dgrad_fwd", "dgrad_wgrad_fwd", "wgrad_fwd", "mlp_backward",
        "launch_count",
    )  # fmt: skip
    for name in (*names, "WGRAD_ROWS"):
        assert all(hasattr(_stack(stack).mod, name) for stack in STACKS), name
    assert _stack("torch").mod.WGRAD_ROWS == _stack("jax").mod.WGRAD_ROWS


def test_weight_gradients_split_over_m():
    # M = 300 over 32-row steps: kernel B runs in S > 1 runs and the sum kernel adds them.
    from fusedmlp.common.tiling import wgrad_splits

    spec = _spec(CASES[2])
    assert wgrad_splits(2 * spec.num_layers, 300, 32)[0] > 1
    for name in STACKS:
        assert _stack(name).mod.launch_count(spec, 300) == 4
    assert _stack("torch").mod.launch_count(_spec(CASES[0]), 37) == 3


def test_offset_width_follows_the_arrays():
    # Triton saving forward and kernel A: int32 row offsets unless rows · stride can pass 2^31
    # (host only: the launch records' choice).
    from fusedmlp.torch_impl import fused_small_backward as fsb

    nerf = MLPSpec((64,) * 6, "relu", False, "float16")
    x_shape, dense = (2_097_152, 64), (64, 1)
    assert not fsb._SAVING.build(x_shape, dense, nerf, None)[0].meta["INT64_ROWS"]
    assert not fsb._DGRAD.build(x_shape, dense, nerf, None, True)[0].meta["INT64_ROWS"]
    big = (1 << 25, 64)  # 2^25 rows of 64: offsets reach 2^31
    assert fsb._SAVING.build(big, dense, nerf, None)[0].meta["INT64_ROWS"]
    assert fsb._DGRAD.build(big, dense, nerf, None, True)[0].meta["INT64_ROWS"]
    # column strides count (dy a transposed view of a [64, 2^25] array), and x's row stride
    assert not fsb._DGRAD.build(x_shape, (1, x_shape[0]), nerf, None, True)[0].meta["INT64_ROWS"]
    assert fsb._DGRAD.build(x_shape, (1, 1 << 25), nerf, None, True)[0].meta["INT64_ROWS"]
    assert fsb._SAVING.build(x_shape, (1024, 1), nerf, None)[0].meta["INT64_ROWS"]


@pytest.mark.parametrize("case", [CASES[0], CASES[4]], ids=_id)  # plain; gated (packed z, dZ)
def test_int64_offsets_same_bits(case, monkeypatch):
    # The offsets' width changes addresses only: forced int64, the same bits as int32.
    from fusedmlp.torch_impl import fused_small_backward as fsb
    from fusedmlp.torch_impl import launch

    spec, _, packed, x, dy = _inputs(case)
    narrow = _run("torch", case)
    launch.clear_all()
    monkeypatch.setattr(fsb, "_int64_offsets", lambda *a: True)
    try:
        wide = _stack("torch").run(spec, x, packed, dy)
        key = ((case[-1], spec.d_out), (spec.d_out, 1), spec, None, True)
        assert key in fsb._DGRAD._records  # built by the run above, not by this check
        assert fsb._DGRAD.get(key)[0].meta["INT64_ROWS"]
    finally:
        launch.clear_all()
    assert narrow[0].tobytes() == wide[0].tobytes()
    for a, b in zip(narrow[1], wide[1], strict=True):
        assert (a is None and b is None) or a.tobytes() == b.tobytes()
    for k in narrow[2]:
        assert narrow[2][k].tobytes() == wide[2][k].tobytes(), k


# ---- the backward in row chunks (common.tiling.backward_chunks) ----------------------------------
def _dz_row_bytes(spec: MLPSpec) -> int:
    # every hidden layer's dZ row (gated: the packed [dz|dg]), the rule's measure
    from fusedmlp.common.packing import packed_width

    itemsize = 4 if spec.dtype == "float32" else 2
    hidden = spec.layers()[:-1]
    return itemsize * sum(packed_width(lay.d_out) if lay.gated else lay.d_out for lay in hidden)


# M = 301 in chunks of 96 rows (3 whole tiles of the interpreters' 32 rows): 96, 96, 96, 13
CHUNK_ROWS = 96
CHUNKED = [
    ((24, 40, 17), "relu", True, "float16", 301),
    ((19, 40, 33, 5), "relu", False, "float32", 301),  # 3 layers: two dZs a chunk
    ((24, 30, 17), "swiglu", True, "bfloat16", 301),  # gated: packed z and dZ, WIDTH 32
]


@functools.cache
def _run_chunked(name: str, case):
    spec, _, packed, x, dy = _inputs(case)
    budget = CHUNK_ROWS * _dz_row_bytes(spec)
    return _stack(name).run(spec, x, packed, dy, dz_budget=budget, on_chip=False)


def test_chunk_rule():
    from fusedmlp.common.presets import get_preset
    from fusedmlp.common.tiling import SMALL_DZ_BUDGET, backward_chunks

    nerf = get_preset("nerf-64x5").spec  # 4 dZs of 64 fp16: 512 bytes a row
    assert SMALL_DZ_BUDGET == 128 << 20
    assert backward_chunks(nerf, 2_097_152, 128) == (8, 262_144)  # 1 GiB of dZ -> 128 MiB
    assert backward_chunks(nerf, 65_536, 128) == (1, 65_536)  # the image fit: one chunk
    assert backward_chunks(nerf, 262_145, 128) == (2, 262_144)
    # boundaries on whole tiles, at least one; the budget read at call time
    assert backward_chunks(nerf, 1000, 96, budget=100 * 512) == (11, 96)
    assert backward_chunks(nerf, 1000, 128, budget=100 * 512) == (8, 128)
    assert backward_chunks(nerf, 0, 128, budget=1) == (1, 0)
    for name in STACKS:
        mod = _stack(name).mod
        assert mod.launch_count(nerf, 2_097_152) == 3  # the dWs on chip: no dZ, no chunks
        assert mod.launch_count(nerf, 2_097_152, on_chip=False) == 2 + 2 * 8
        spec = _spec(CHUNKED[0])
        budget = CHUNK_ROWS * _dz_row_bytes(spec)
        spans = mod._chunk_spans(spec, 301, None, budget)
        assert spans == ((0, 96), (96, 192), (192, 288), (288, 301)), spans
        assert mod.launch_count(spec, 301, dz_budget=budget, on_chip=False) == 2 + 2 * 4


@pytest.mark.parametrize("case", CHUNKED, ids=_id)
@pytest.mark.parametrize("name", STACKS)
def test_chunked_gradients_match_reference(name, case):
    # Outputs poisoned (NaN): every chunk writes its rows of the one dx and its runs' partials.
    spec, plain, _, x, dy = _inputs(case)
    grads = dict(_run_chunked(name, case)[2])
    got = {"x": grads.pop("x"), **unpack_params(spec, grads)}
    want = reference.backward(spec, x, plain, dy, round_hidden=True)
    assert_grads_close(got, want, spec, what=f"{name} {spec} chunked")


@pytest.mark.parametrize("case", CHUNKED[:2], ids=_id)  # relu: see test_twins_bitwise
def test_chunked_twins_bitwise(case):
    (_, _, g_t), (_, _, g_j) = (_run_chunked(name, case) for name in STACKS)
    for k in g_t:
        assert g_t[k].tobytes() == g_j[k].tobytes(), (k, np.sum(g_t[k] != g_j[k]))


@pytest.mark.parametrize("name", STACKS)
def test_one_chunk_within_budget_same_bits(name):
    # dZs exactly at the budget: C = 1, today's launches and bits.
    case = CASES[0]
    spec, _, packed, x, dy = _inputs(case)
    budget = case[-1] * _dz_row_bytes(spec)
    mod = _stack(name).mod
    assert mod._chunk_spans(spec, case[-1], None, budget) == ((0, case[-1]),)
    assert mod._chunk_spans(spec, case[-1], None, budget - 1) == ((0, 32), (32, 37))
    assert mod.launch_count(spec, case[-1], dz_budget=budget) == 3
    _, _, got = _stack(name).run(spec, x, packed, dy, dz_budget=budget)
    _, _, want = _run(name, case)
    for k in want:
        assert got[k].tobytes() == want[k].tobytes(), k


# ---- every layer's dW on chip (kernel A's DW_ON_CHIP, common.tiling.small_wgrad_on_chip) ---------
ON_CHIP = [
    ((24, 40, 17), "relu", True, "float32", 37),  # forced: the rule never takes float32
    ((24, 40, 17), "silu", False, "float16", 1),  # M = 1: one program, one row
    ((19, 64, 64, 64, 64, 3), "relu", False, "bfloat16", 100),  # nerf-like: the rule's
    ((24, 30, 17), "geglu", True, "bfloat16", 100),  # gated with bias: packed dW | dV, db | dc
    ((24, 100, 17), "gelu_tanh", True, "float16", 70),  # forced: WIDTH 128
    # TMA's 16-byte rule met (every width a multiple of 8): torch loads dy and the layer inputs
    # through tensor descriptors (TMA_LOADS); 301 rows, a partial last tile
    ((24, 40, 40, 16), "relu", False, "float16", 301),
]
TMA_CASE = ON_CHIP[-1]


@functools.cache
def _run_on_chip(name: str, case):
    spec, _, packed, x, dy = _inputs(case)
    return _stack(name).run(spec, x, packed, dy, on_chip=True)


@pytest.mark.parametrize("case", ON_CHIP, ids=_id)
@pytest.mark.parametrize("name", STACKS)
def test_on_chip_gradients_match_reference(name, case):
    # Outputs and partials poisoned (NaN): every program writes its whole partial.
    spec, plain, _, x, dy = _inputs(case)
    grads = dict(_run_on_chip(name, case)[2])
    got = {"x": grads.pop("x"), **unpack_params(spec, grads)}
    want = reference.backward(spec, x, plain, dy, round_hidden=True)
    assert_grads_close(got, want, spec, what=f"{name} {spec} on chip")


# 16-bit: the float32 case's bias gradient differs in its last bits between the interpreters (an
# fp32 column sum of a tile XLA fuses with the act' product that forms it, NumPy sums the stored
# tile); its other gradients and every 16-bit one are the same bits.
@pytest.mark.parametrize("case", [*ON_CHIP[1:4], TMA_CASE], ids=_id)
def test_on_chip_twins_bitwise(case):
    (_, _, g_t), (_, _, g_j) = (_run_on_chip(name, case) for name in STACKS)
    for k in g_t:
        assert g_t[k].tobytes() == g_j[k].tobytes(), (k, np.sum(g_t[k] != g_j[k]))


@pytest.mark.parametrize(
    "case",
    [
        TMA_CASE,
        ((16, 32, 24), "swiglu", True, "bfloat16", 130),  # gated with bias: packed dW | dV
        ((24, 40, 16), "gelu_tanh", True, "float32", 77),  # forced: the rule never takes float32
    ],
    ids=_id,
)
def test_on_chip_tma_loads_same_bits(case):
    """Kernel A's tile loads through tensor descriptors (TMA_LOADS, where `_tma_loads` finds
    TMA's 16-byte rule met) read the same tiles as its masked pointer loads: with dy column-
    strided and x off the 16-byte grid (pointer loads), the same bits. And the rule."""
    import torch

    from fusedmlp.torch_impl import fused_small_backward as mod
    from fusedmlp.torch_impl import launch

    spec, _, packed, x, dy = _inputs(case)
    p = {k: to_torch(v) for k, v in packed.items()}
    _, kept = mod.forward_saving(to_torch(x), p, spec)
    dy_t = to_torch(dy)
    assert mod._tma_loads(dy_t, list(kept[0::2]))
    launch.clear_all()
    via_tma = mod.mlp_backward(dy_t, list(kept), p, spec, saved="preact", on_chip=True)
    assert any(rec[0].meta["TMA_LOADS"] for rec in mod._DGRAD._records.values())
    dy_cols = dy_t.t().contiguous().t()  # column stride M: no descriptor
    x_off = torch.empty(kept[0].numel() + 1, dtype=kept[0].dtype)[1:].view(kept[0].shape)
    x_off.copy_(kept[0])  # 2 bytes off the 16-byte grid: no descriptor
    assert not mod._tma_loads(dy_cols, [kept[0]]) and not mod._tma_loads(dy_t, [x_off])
    launch.clear_all()
    via_pointers = mod.mlp_backward(
        dy_cols, [x_off, *kept[1:]], p, spec, saved="preact", on_chip=True
    )
    assert not any(rec[0].meta["TMA_LOADS"] for rec in mod._DGRAD._records.values())
    for k, want in via_tma.items():
        assert to_numpy(via_pointers[k]).tobytes() == to_numpy(want).tobytes(), k
    # rows of 17 halves (34 B) break the rule
    assert not mod._tma_loads(dy_t, [torch.empty(5, 17, dtype=kept[0].dtype)])


def test_tma_probe_smoke(tmp_path):
    """bench/tma_probe.py (the GPU A/B of the TMA paths against pointer loads) runs its tiny specs
    under the interpreter, both ways, and finds the same bits."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "tma_probe.py"
    module_spec = importlib.util.spec_from_file_location("tma_probe", path)
    probe = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(probe)
    out = tmp_path / "tma.json"
    assert probe.main([str(out), "--smoke"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["kernel"] for r in rows if "bitwise_same" in r] == ["backward", "forward"]
    assert all(r["bitwise_same"] for r in rows if "bitwise_same" in r)
    assert sum("tma" in r for r in rows) == 8


def _bits(t):
    """A tensor's bit pattern (NaN-safe equality: torch.equal says NaN != NaN)."""
    import torch

    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _on_chip_runs(case, m: int, device: str) -> tuple[dict, dict]:
    """Torch's on-chip backward of `case` over m rows on `device`, on one saving forward's
    residuals: run twice through tensor descriptors and once with pointer loads, all three bit
    for bit alike. Returns the first run's gradients as NumPy (unpacked, with "x") and the float64
    reference's at the kernel's own stored forward (`reference.backward(hidden=...)`: at 1e5 rows
    of relu the last bits of the stored hiddens flip some relu' — common/tolerance.py)."""
    from unittest import mock

    from fusedmlp.torch_impl import fused_small_backward as mod

    spec = MLPSpec(*case)
    plain = init_params(spec, seed=5)
    x, dy = make_input(spec, m, seed=6), make_grad_output(spec, m, seed=7)
    p = {k: to_torch(v, device) for k, v in pack_params(spec, plain).items()}
    _, kept = mod.forward_saving(to_torch(x, device), p, spec)
    dy_t = to_torch(dy, device)
    assert mod._tma_loads(dy_t, list(kept[0::2]))

    def run():
        return mod.mlp_backward(dy_t, list(kept), p, spec, saved="preact", on_chip=True)

    runs = [run(), run()]
    with mock.patch.object(mod, "_tma_loads", return_value=False):
        runs.append(run())
    for k, first in runs[0].items():
        for other, what in zip(runs[1:], ("run again", "pointer loads"), strict=True):
            assert _bits(first).equal(_bits(other[k])), f"d{k}: {what}"  # no atomics, one order
    grads = {k: to_numpy(v) for k, v in runs[0].items()}
    got = {"x": grads.pop("x"), **unpack_params(spec, grads)}
    hidden = [to_numpy(h) for h in kept[2::2]]
    return got, reference.backward(spec, x, plain, dy, hidden=hidden)


# 16 wide swiglu with biases stays within float16's range at 4 layers over these seeds (at 5
# its output passes 2.6e5: inf, and NaN gradients)
@pytest.mark.gpu
@pytest.mark.parametrize(
    "case",
    [((64,) * 6, "relu", False, "float16"), ((16,) * 5, "swiglu", True, "float16")],
    ids=["nerf-64x5", "16x4-swiglu-bias"],
)
def test_gpu_on_chip_backward(case):
    """On the GPU, where the on-chip kernel loads its tiles through tensor descriptors (TMA's rule
    met): gradients within the tolerance of the float64 reference over 100,003 rows (every program
    walks many tiles, the last one partial), the same bits when run again and with pointer loads."""
    got, want = _on_chip_runs(case, 100_003, "cuda")
    assert_grads_close(got, want, MLPSpec(*case), what=f"{case} on chip, GPU")


_COMPILE_SAVING = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TRITON_INTERPRET"] = "0"  # real Triton functions: compile for sm_90, launch nothing
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fusedmlp.common import MLPSpec
    from fusedmlp.common.tiling import fused_small_config
    from fusedmlp.torch_impl import fused_small_backward as fb
    from fusedmlp.torch_impl.fused_small import _small_statics

    out = []
    for widths, activation, bias, dtype in json.loads(sys.argv[1]):
        spec = MLPSpec(tuple(widths), activation, bias, dtype)
        cfg = fused_small_config(spec, 1 << 20, kernel="saving")
        L, t = spec.num_layers, {"float16": "*fp16", "bfloat16": "*bf16"}[dtype]
        types = dict(x_ptr=t, w_ptrs=(t,) * L, b_ptrs=(t,) * L, y_ptr=t, h_ptrs=(t,) * (L - 1),
                     z_ptrs=(t,) * (L - 1), M="i32", stride_xm="i32", stride_ym="i32",
                     TILES_PER_PROGRAM="i32")
        sig, attrs = {}, {}
        for i, p in enumerate(fb._fused_small_saving_kernel.params):
            if p.is_constexpr:
                sig[p.name] = "constexpr"
                continue
            sig[p.name] = types[p.name]
            if isinstance(types[p.name], tuple):
                for j in range(len(types[p.name])):
                    attrs[(i, j)] = [["tt.divisibility", 16]]
            elif types[p.name].startswith("*") or p.name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        constexprs = dict(BLOCK_M=cfg.block_m, ACTIVATION=spec.base_activation, HAS_BIAS=bias,
                          HOIST=cfg.hoist, STORES_Z=fb._stores_z(spec), INT64_ROWS=False,
                          **{k: v for k, v in _small_statics(spec).items() if k != "INTERPRET"},
                          INTERPRET=False)
        k = triton.compile(ASTSource(fb._fused_small_saving_kernel, sig, constexprs=constexprs,
                                     attrs=attrs), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        out.append(dict(shared=k.metadata.shared, programs_per_sm=cfg.programs_per_sm,
                        num_stages=cfg.num_stages))
    print("RESULT" + json.dumps(out))
    """
)


def test_unhoisted_unrolled_kernels_take_one_stage():
    """The saving forward and kernel A unroll their layers, so unhoisted weights would be
    buffered once per layer and stage: their configs take one stage there (sm_90, 128 wide relu,
    8 layers, at 3 stages: the saving forward 843,776 B of shared memory, kernel A 1,032,192 B —
    past the H200's 232,448, neither launched; 49,152 at one), and each kernel then fits its
    programs an SM by the compiler's own count."""
    from fusedmlp.common.tiling import fused_small_config, small_hoist

    cases = [((128,) * 9, "relu", False, "float16"), ((64,) * 9, "swiglu", True, "bfloat16")]
    for case in cases:
        spec = MLPSpec(*case)
        assert not small_hoist(spec)
        for kernel in ("saving", "dgrad"):
            assert fused_small_config(spec, 1 << 20, kernel=kernel).num_stages == 1
        assert fused_small_config(spec, 1 << 20, kernel="forward").num_stages == 3
    infos = run_script(_COMPILE_SAVING, json.dumps(cases))
    infos += run_script(_COMPILE_ON_CHIP, json.dumps(cases), "dgrad", timeout=900)
    for case, info in zip(cases * 2, infos, strict=True):
        assert info["programs_per_sm"] * (info["shared"] + 1024) <= SMEM_PER_SM, (case, info)
    nerf = MLPSpec((64,) * 6, "relu", False, "float16")  # hoisted: the pipeline stays
    assert fused_small_config(nerf, 1 << 20, kernel="saving").num_stages == 3


def test_on_chip_rule():
    from fusedmlp.common.presets import get_preset
    from fusedmlp.common.tiling import small_wgrad_kind, small_wgrad_on_chip

    nerf = get_preset("nerf-64x5").spec
    assert small_wgrad_kind(nerf) == "relu" and small_wgrad_on_chip(nerf)
    rule = {
        ((64,) * 6, "relu", False, "bfloat16"): True,
        ((64,) * 7, "relu", False, "float16"): False,  # 6 layers: past the measured depth
        ((64,) * 4, "relu", True, "float16"): True,  # bias: "plain", 3 layers
        ((64,) * 5, "gelu_tanh", False, "float16"): False,
        ((16,) * 9, "relu", False, "float16"): False,  # 16 wide relu: kernels A and B win
        ((16,) * 6, "swiglu", True, "bfloat16"): True,  # 16 wide gated, 5 layers
        ((32,) * 9, "relu", False, "bfloat16"): True,  # 8 layers
        ((32,) * 4, "swiglu", True, "bfloat16"): True,  # gated 32 wide: 3 layers
        ((32,) * 6, "swiglu", True, "bfloat16"): False,  # 5 won, past the spill guard
        ((24, 30, 17), "swiglu", True, "bfloat16"): True,  # WIDTH 32, 2 layers
        ((64, 64, 17), "swiglu", False, "bfloat16"): False,  # gated 64: pointer loads lose
        ((24, 100, 17), "relu", False, "float16"): False,  # WIDTH 128
        ((24, 40, 17), "relu", False, "float32"): False,
    }
    # where the tiles load through tensor descriptors (torch, TMA's rule met): more specs win
    descriptor_rule = {
        ((64, 64, 17), "swiglu", False, "bfloat16"): True,  # gated 64 wide: 2 layers
        ((64,) * 4, "swiglu", True, "float16"): False,  # 3: does not launch
        ((16,) * 9, "swiglu", True, "float16"): False,  # won by 2 %, past the spill guard
        ((32,) * 6, "gelu_tanh", True, "float16"): True,  # plain 32 wide: 5 layers (a tie)
        ((32,) * 7, "gelu_tanh", True, "float16"): False,
        ((16,) * 9, "relu", False, "float16"): False,
    }
    for (widths, act, bias, dtype), expected in rule.items():
        spec = MLPSpec(widths, act, bias, dtype)
        assert small_wgrad_on_chip(spec) == expected, widths
        assert small_wgrad_on_chip(spec, descriptor_loads=True) == descriptor_rule.get(
            (widths, act, bias, dtype), expected
        ), widths
    for (widths, act, bias, dtype), expected in descriptor_rule.items():
        spec = MLPSpec(widths, act, bias, dtype)
        assert small_wgrad_on_chip(spec, descriptor_loads=True) == expected, widths


@pytest.mark.parametrize("name", STACKS)
def test_on_chip_is_the_default_where_the_rule_holds(name, monkeypatch):
    # mlp_backward takes the on-chip path by the rule (CASES[1]: WIDTH 64, 2 layers, float16)
    # and kernels A and B elsewhere (CASES[0]: float32), with the same results as forced.
    mod = _stack(name).mod
    calls = []
    on_chip = mod.dgrad_wgrad_fwd
    monkeypatch.setattr(mod, "dgrad_wgrad_fwd", lambda *a, **k: calls.append(1) or on_chip(*a, **k))
    spec, _, packed, x, dy = _inputs(CASES[1])
    _, _, got = _stack(name).run(spec, x, packed, dy)
    assert calls == [1] and mod.launch_count(spec, 1) == 3
    _, _, forced = _run_on_chip(name, ON_CHIP[1])
    for k in forced:
        assert got[k].tobytes() == forced[k].tobytes(), k
    calls.clear()  # the forced run above took the path too
    spec, _, packed, x, dy = _inputs(CASES[0])
    _stack(name).run(spec, x, packed, dy)
    assert calls == []


_COMPILE_ON_CHIP = textwrap.dedent(
    """
    import json, os, re, subprocess, sys, tempfile
    os.environ["TRITON_INTERPRET"] = "0"  # real Triton functions: compile for sm_90, launch nothing
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fusedmlp.common import MLPSpec
    from fusedmlp.common.packing import PACK_BLOCK, packed_names
    from fusedmlp.common.tiling import fused_small_config, padded_width
    from fusedmlp.torch_impl import fused_small_backward as fb

    PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    out = []
    kernel = sys.argv[2]  # "dgrad_wgrad" (on chip) or "dgrad": kernel A alone
    on_chip = kernel == "dgrad_wgrad"
    tma = on_chip and (len(sys.argv) < 4 or sys.argv[3] == "1")  # the on-chip loads: TMA or not
    for widths, activation, bias, dtype in json.loads(sys.argv[1]):
        spec = MLPSpec(tuple(widths), activation, bias, dtype)
        cfg = fused_small_config(spec, 1 << 20, kernel=kernel)
        shapes = packed_names(spec)
        w_cols = tuple(shapes[("wv" if l.gated else "w") + str(l.index)][1]
                       for l in spec.layers())
        L = spec.num_layers
        t = {"float16": "*fp16", "bfloat16": "*bf16"}[dtype]
        types = dict(dy_ptr=t, w_ptrs=(t,) * L, z_ptrs=(t,) * max(1, L - 1),
                     dz_ptrs=(t,) * max(1, L - 1), dx_ptr=t, h_ptrs=(t,) * L,
                     dw_ptrs=("*fp32",) * L, db_ptrs=("*fp32",) * L, M="i32", stride_dym="i32",
                     stride_dyn="i32", stride_xm="i32", TILES_PER_PROGRAM="i32")
        sig, attrs = {}, {}
        for i, p in enumerate(fb._fused_small_dgrad_kernel.params):
            if p.is_constexpr:
                sig[p.name] = "constexpr"
                continue
            sig[p.name] = types[p.name]
            if isinstance(types[p.name], tuple):
                for j in range(len(types[p.name])):
                    attrs[(i, j)] = [["tt.divisibility", 16]]
            elif types[p.name].startswith("*") or p.name in ("stride_dym", "stride_xm"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        constexprs = dict(
            WIDTHS=spec.widths, W_COLS=w_cols, NUM_LAYERS=L, WIDTH=padded_width(max(widths)),
            BLOCK_M=cfg.block_m, ACTIVATION=spec.base_activation, GATED=spec.gated,
            DACT=fb._stores_z(spec) or fb._dact_from_output(spec), NEED_DX=True,
            PACK=PACK_BLOCK, HOIST=cfg.hoist, DOT_PRECISION="ieee", INTERPRET=False,
            INT64_ROWS=False, DW_ON_CHIP=on_chip, HAS_BIAS=bias,
            RELU_FROM_OUTPUT=fb._dact_from_output(spec), TMA_LOADS=tma)
        k = triton.compile(ASTSource(fb._fused_small_dgrad_kernel, sig, constexprs=constexprs,
                                     attrs=attrs), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.ptx")
            with open(path, "w") as f:
                f.write(k.asm["ptx"])
            info = subprocess.run([PTXAS, "-arch=sm_90a", "-v", path, "-o", path + ".o"],
                                  capture_output=True, text=True).stderr
        spill = re.search(r"(\\d+) bytes spill stores", info)
        out.append(dict(registers=int(re.search(r"Used (\\d+) registers", info).group(1)),
                        spill=int(spill.group(1)) if spill else 0, shared=k.metadata.shared,
                        num_warps=cfg.num_warps, programs_per_sm=cfg.programs_per_sm,
                        wgmma="wgmma" in k.asm["ptx"]))
    print("RESULT" + json.dumps(out))
    """
)


def test_on_chip_depths_compile_resident():
    """Each on-chip table entry's deepest case (bf16; "plain" as gelu_tanh with a bias, "gated" as
    swiglu with a bias) compiles for sm_90 with its loads — SMALL_WGRAD_ON_CHIP_LAYERS's pointer
    loads, SMALL_WGRAD_ON_CHIP_LAYERS_TMA's tensor descriptors (where the two tables differ) — its
    config resident (registers and shared memory of one program an SM) and at most
    SMALL_WGRAD_MAX_SPILL bytes of spill a thread, by ptxas' own count."""
    from fusedmlp.common.tiling import (
        SMALL_WGRAD_MAX_SPILL,
        SMALL_WGRAD_ON_CHIP_LAYERS,
        SMALL_WGRAD_ON_CHIP_LAYERS_TMA,
        small_wgrad_on_chip,
    )

    kinds = {"relu": ("relu", False), "plain": ("gelu_tanh", True), "gated": ("swiglu", True)}
    cases: dict[str, list] = {"pointers": [], "descriptors": []}
    for width, depths in SMALL_WGRAD_ON_CHIP_LAYERS_TMA.items():
        for kind, layers in depths.items():
            act, bias = kinds[kind]
            pointer_layers = SMALL_WGRAD_ON_CHIP_LAYERS[width][kind]
            if pointer_layers:
                case = ((width,) * (pointer_layers + 1), act, bias, "bfloat16")
                assert small_wgrad_on_chip(MLPSpec(*case)), case
                cases["pointers"].append(case)
            if layers and layers != pointer_layers:
                case = ((width,) * (layers + 1), act, bias, "bfloat16")
                assert small_wgrad_on_chip(MLPSpec(*case), descriptor_loads=True), case
                cases["descriptors"].append(case)
    infos = run_script(_COMPILE_ON_CHIP, json.dumps(cases["pointers"]), "dgrad_wgrad", 0,
                       timeout=900)  # fmt: skip
    infos += run_script(_COMPILE_ON_CHIP, json.dumps(cases["descriptors"]), "dgrad_wgrad", 1,
                        timeout=900)  # fmt: skip
    for case, info in zip(cases["pointers"] + cases["descriptors"], infos, strict=True):
        assert info["num_warps"] * 32 * info["registers"] <= REGISTERS_PER_SM, (case, info)
        assert info["shared"] + 1024 <= SMEM_PER_SM, (case, info)
        assert info["spill"] <= SMALL_WGRAD_MAX_SPILL and info["wgmma"], (case, info)


# ---- against the per-layer path (backward.py) ----------------------------------------------------
# Tiles spanning the padded width (64): the per-layer kernels add in the fused kernels' order.
SPAN = TileConfig(block_m=64, block_n=64, block_k=64, group_m=1, num_warps=4, num_stages=1)


@pytest.mark.parametrize(
    "case",
    [
        ((24, 40, 17), "relu", True, "float32", 100),
        ((24, 40, 33, 17), "swiglu", True, "float32", 70),
    ],
    ids=_id,
)
def test_bitwise_equal_to_per_layer_path(case):
    import torch

    from fusedmlp.torch_impl import backward

    spec, _, packed, x, dy = _inputs(case)
    p = {k: to_torch(v) for k, v in packed.items()}
    y, kept, grads = _stack("torch").run(spec, x, packed, dy, config=SPAN)
    y_l, kept_l = backward.forward_saving(to_torch(x), p, spec, saved="preact", config=SPAN)
    assert y.tobytes() == to_numpy(y_l).tobytes()
    for a, b in zip(kept, kept_l, strict=True):
        assert (a is None and b.shape[-1] == 0) or a.tobytes() == to_numpy(b).tobytes()
    per_layer = backward.mlp_backward(to_torch(dy), kept_l, p, spec, saved="preact", config=SPAN)
    for k, v in per_layer.items():
        assert torch.equal(torch.from_numpy(np.ascontiguousarray(grads[k])), v), k
    # and the per-layer backward on this module's residuals (either backward takes either forward's)
    _, _, crossed = _stack("torch").run(spec, x, packed, dy, config=SPAN, residuals=kept)
    for k in grads:
        assert grads[k].tobytes() == crossed[k].tobytes(), k


def test_default_tiles_against_per_layer_path_within_tolerance():
    # Default tiles (another order of additions): the two backwards agree within the policy.
    from fusedmlp.torch_impl import backward

    case = CASES[3]
    spec, plain, packed, x, dy = _inputs(case)
    p = {k: to_torch(v) for k, v in packed.items()}
    _, kept_l = backward.forward_saving(to_torch(x), p, spec, saved="preact")
    g = backward.mlp_backward(to_torch(dy), kept_l, p, spec, saved="preact")
    per_layer = {
        "x": to_numpy(g.pop("x")),
        **unpack_params(spec, {k: to_numpy(v) for k, v in g.items()}),
    }
    _, _, grads = _run("torch", case)
    fused = {"x": grads["x"], **unpack_params(spec, {k: v for k, v in grads.items() if k != "x"})}
    want = reference.backward(spec, x, plain, dy, round_hidden=True)
    assert_grads_close(fused, want, spec, baselines=per_layer)


@pytest.mark.parametrize("name", STACKS)
def test_nan_row_stays_in_its_row(name):
    # A NaN in row 3 of x: dx's row 3 is NaN (relu' of NaN is NaN), every other row finite.
    spec = MLPSpec((24, 40, 17), "relu", True, "float16")
    plain = init_params(spec, seed=21)
    x = make_input(spec, 9, seed=22)
    x[3, 5] = np.nan
    dy = make_grad_output(spec, 9, seed=23)
    _, _, grads = _stack(name).run(spec, x, pack_params(spec, plain), dy)
    dx = grads["x"].astype(np.float32)
    assert np.isnan(dx[3]).all() and not np.isnan(np.delete(dx, 3, axis=0)).any()


# ---- through the fronts --------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["fused_small", "auto"])
def test_torch_module_backward_takes_the_whole_mlp_path(impl, monkeypatch):
    from fusedmlp.torch_impl import FusedMLP, backward, fused_small_backward

    calls = []
    whole = fused_small_backward.mlp_backward
    monkeypatch.setattr(
        fused_small_backward, "mlp_backward", lambda *a, **k: calls.append(1) or whole(*a, **k)
    )
    monkeypatch.setattr(backward, "mlp_backward", lambda *a, **k: pytest.fail("per-layer path"))
    spec = _spec(CASES[1])
    module = FusedMLP(spec, impl=impl, seed=31)
    x = to_torch(make_input(spec, 5, seed=32)).requires_grad_()
    dy = to_torch(make_grad_output(spec, 5, seed=33))
    (module(x).float() * dy.float()).sum().backward()
    assert calls == [1]
    packed = {k: to_numpy(v.grad) for k, v in module.packed_params().items()}
    got = {"x": to_numpy(x.grad), **unpack_params(spec, packed)}
    plain = {k: to_numpy(v) for k, v in module.params().items()}
    want = reference.backward(spec, to_numpy(x.detach()), plain, to_numpy(dy), round_hidden=True)
    assert_grads_close(got, want, spec)


def test_jax_grad_through_the_front():
    import jax
    import jax.numpy as jnp

    from fusedmlp import jax_impl

    spec, plain, _, x, dy = _inputs(CASES[3])
    params = {k: jnp.asarray(v) for k, v in plain.items()}
    plan = jax_impl.plan(spec, x.shape, impl="fused_small", saved="preact")
    assert "fused_small_backward" in plan.reason

    def loss(x, p):
        y = jax_impl.mlp(x, p, spec, impl="fused_small")
        return jnp.sum(y.astype(jnp.float32) * jnp.asarray(dy).astype(jnp.float32))

    gx, gp = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), params)
    got = {"x": np.asarray(gx), **{k: np.asarray(v) for k, v in gp.items()}}
    want = reference.backward(spec, x, plain, dy, round_hidden=True)
    assert_grads_close(got, want, spec)
    # the same kernels as the module's direct call: the bits of `_run`
    _, _, direct = _run("jax", CASES[3])
    assert got["x"].tobytes() == direct["x"].tobytes()
