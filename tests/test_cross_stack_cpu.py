"""Cross-stack calls: the same kernel from both frameworks (issue 17) — what the CPU can check.

- `jax_triton` (JAX front): torch_impl's Triton kernels on jax arrays through jax_triton;
- `mosaic` (torch front): jax_impl/mosaic's Mosaic GPU kernels on torch tensors through
  `plgpu.as_torch_kernel`.

Without a GPU:
- the fronts refuse both impls with a ValueError naming the impl; the modules import; the
  overhead decomposition's attribution (cross minus native, column by column) and bit check;
- the jax_triton launch plan (grid, argument order, strides, constexprs) equals what the native
  torch launcher passes to its kernel, and the adapter kernels, run by Triton's interpreter with
  that plan, give the native launcher's bits;
- compiled for sm_90 here (no GPU needed to make PTX), the adapters have the native kernels'
  instruction mix, i.e. Triton inlines the native kernel unchanged;
- with the real jax_triton wheel (`.wheels/`, from bench/fetch_wheels.sh) and a recorder in place of
  the CUDA plugin's Triton runtime, both launchers lower under jax.jit for CUDA: one custom call,
  the planned grid, arguments in jax_triton's order;
- the Mosaic plan (padded extents, grid) equals the JAX launcher's; padding and slicing in torch
  around the kernel (run by the Mosaic GPU interpreter) give the JAX launcher's bits; and the
  function handed to as_torch_kernel lowers for CUDA to the single Mosaic GPU call it accepts;
- jax_triton's import no longer breaks Triton's cache; bench/fetch_wheels.sh's compatibility check.

The same bits on a GPU: tests/test_cross_stack_gpu.py (its shared helpers are imported from here).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fusedmlp.common import TileConfig, golden
from fusedmlp.common.dtypes import DTYPES, numpy_dtype
from fusedmlp.common.packing import pack_gated
from fusedmlp.common.tolerance import assert_close
from helpers import (
    ROOT,
    direct_launch_plan,
    layer_ref,
    layer_spec,
    mosaic_gpu_call,
    needs_jax_triton_wheel,
    rand,
    run_script,
    to_numpy,
    to_torch,
)

# torch and JAX share the GPU in these tests: JAX must not grab 75% of its memory up front (set
# before JAX's backend starts; the `fusedmlp` CLI does the same).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

SMALL = TileConfig(block_m=16, block_n=16, block_k=16, group_m=2, num_warps=4, num_stages=1)
# The packed gated kernels' output tiles are whole 64-column packed blocks.
SMALL_GATED = TileConfig(block_m=16, block_n=64, block_k=16, group_m=2, num_warps=4, num_stages=1)
MOSAIC_DTYPES = ("float16", "bfloat16")
# (M, K, N): odd sizes spanning several tiles, M = 1, and aligned sizes (no padding on Mosaic).
ODD = [(37, 53, 45), (1, 29, 70), (130, 96, 200)]
# Mosaic GPU takes K and N in multiples of 16 (its swizzle atoms: jax_impl/mosaic/pipeline.py); M
# is free (odd M >= 8 is padded to a multiple of 8 by the launcher, and the torch side mirrors it).
MOSAIC_SHAPES = [(37, 64, 80), (1, 32, 48), (130, 96, 208)]


# ---- shared helpers ------------------------------------------------------------------------------
def _rng(*key: object) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _problem(family: str, m: int, k: int, n: int, dtype: str, bias: bool, residual: bool = False):
    """NumPy operands of one layer, scaled like a layer (1/sqrt(K)), fresh per shape and dtype."""
    rng = _rng(family, m, k, n, dtype, bias, residual)
    ops = {"x": rand(rng, (m, k), dtype), "w": rand(rng, (k, n), dtype, k**-0.5)}
    ops["b"] = rand(rng, (n,), dtype, 0.1) if bias else None
    if family == "gated":
        ops["v"] = rand(rng, (k, n), dtype, k**-0.5)
        ops["c"] = rand(rng, (n,), dtype, 0.1) if bias else None
        # The gated kernels take W|V and b|c packed (common/packing.py).
        ops["wv"] = pack_gated(ops["w"], ops["v"])
        ops["bc"] = pack_gated(ops["b"], ops["c"]) if bias else None
    else:
        ops["residual"] = rand(rng, (m, n), dtype) if residual else None
    return ops


def _torch(a: np.ndarray | None, device: str = "cpu"):
    return None if a is None else to_torch(a, device)


def _reference(family: str, ops: dict[str, Any], activation: str) -> np.ndarray:
    if family == "gated":
        return layer_ref(ops["x"], ops["w"], ops["b"], activation, ops["v"], ops["c"])
    return layer_ref(ops["x"], ops["w"], ops["b"], activation, residual=ops["residual"])


# ==== CPU: the fronts refuse, the modules import ==================================================
def test_torch_front_refuses_mosaic_on_cpu() -> None:
    import torch

    from fusedmlp.torch_impl import front

    case = golden.load(golden.case_names()[0])
    params = {k: _torch(v) for k, v in case.params.items()}
    with pytest.raises(ValueError, match=r"impl 'mosaic' cannot run on device cpu"):
        front.mlp(_torch(case.x), params, case.spec, impl="mosaic")
    assert front.unavailable_reason("mosaic", "cpu") is not None
    assert isinstance(params["w0"], torch.Tensor)


def test_jax_front_refuses_jax_triton_on_cpu() -> None:
    import jax.numpy as jnp

    from fusedmlp.jax_impl import front

    case = golden.load(golden.case_names()[0])
    params = {k: jnp.asarray(v) for k, v in case.params.items()}
    with pytest.raises(ValueError, match=r"impl 'jax_triton' cannot run on device cpu"):
        front.mlp(jnp.asarray(case.x), params, case.spec, impl="jax_triton")
    assert front.unavailable_reason("jax_triton", "cpu") is not None


def test_modules_import_without_gpu_and_decompose_says_why() -> None:
    from fusedmlp.bench import cross_overhead
    from fusedmlp.jax_impl.cross import gated as jg
    from fusedmlp.jax_impl.cross import linear_act as jl
    from fusedmlp.torch_impl.cross import gated as tg
    from fusedmlp.torch_impl.cross import linear_act as tl_

    for module, name in (
        (jl, "linear_act_fwd"),
        (jg, "gated_fwd"),
        (tl_, "linear_act_fwd"),
        (tg, "gated_fwd"),
    ):
        assert callable(getattr(module, name))
    rows, reason = cross_overhead.decompose()
    assert rows == []
    assert reason is not None and "GPU" in reason


def test_decomposition_attribution_and_bit_check() -> None:
    import jax.numpy as jnp
    import torch

    from fusedmlp.bench import cross_overhead

    def row(
        kernel: str, framework: str, device: float, k: int, issue: float, sync: float, first: float
    ) -> dict:
        return dict(
            kernel=kernel,
            framework=framework,
            device_us=device,
            kernels_per_call=k,
            span_us=device + 1,
            throughput_us=max(device, issue),
            host_issue_us=issue,
            host_sync_us=sync,
            first_call_ms=first,
        )

    rows = [
        row("triton.gated", "torch", 10.0, 1, 12.0, 30.0, 900.0),
        row("triton.gated", "jax", 10.5, 1, 7.0, 25.0, 1100.0),
        row("mosaic.gated", "jax", 8.0, 1, 6.0, 20.0, 700.0),
        # From torch the Mosaic call pads its operands first: two more kernels, on the device.
        row("mosaic.gated", "torch", 9.25, 3, 31.0, 45.0, 650.0),
        # A cross side not measured (no jax_triton on that machine): no delta for the pair.
        row("triton.linear_act", "torch", 5.0, 1, 9.0, 20.0, 800.0),
        {**row("triton.linear_act", "jax", float("nan"), 0, 0.0, 0.0, 0.0), "note": "no jax"},
    ]
    got = {r["kernel"]: r for r in cross_overhead.attribute(rows)}
    assert set(got) == {"triton.gated", "mosaic.gated"}
    assert got["triton.gated"]["native"] == "torch" and got["triton.gated"]["cross"] == "jax"
    assert got["triton.gated"]["host_issue_us_delta"] == pytest.approx(-5.0)
    assert got["triton.gated"]["host_sync_us_delta"] == pytest.approx(-5.0)
    assert got["triton.gated"]["kernels_delta"] == 0
    assert got["mosaic.gated"]["native"] == "jax"
    assert got["mosaic.gated"]["device_us_delta"] == pytest.approx(1.25)
    assert got["mosaic.gated"]["kernels_delta"] == 2
    assert got["mosaic.gated"]["throughput_us_delta"] == pytest.approx(31.0 - 8.0)
    assert got["mosaic.gated"]["first_call_ms_delta"] == pytest.approx(-50.0)
    same = torch.tensor([0.0, 1.5], dtype=torch.bfloat16)
    assert cross_overhead._same_bits(same, same.clone())
    assert not cross_overhead._same_bits(same, torch.tensor([-0.0, 1.5], dtype=torch.bfloat16))
    assert cross_overhead._same_bits(torch.tensor([1.0, 2.0]), jnp.asarray([1.0, 2.0]))


def test_torch_cross_refuses_jax_before_the_launch_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """as_torch_kernel passed wrong pointers before jax 0.11.1 (jax-ml/jax PR #39640)."""
    import jax
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from fusedmlp.torch_impl.cross import linear_act as tl_

    for version, ok in (
        ("0.10.2", False),
        ("0.11.0", False),
        ("0.11.1", True),
        ("0.11.2", True),
        ("0.12.0.dev20261101", True),
    ):
        tl_.as_torch_kernel.cache_clear()
        monkeypatch.setattr(jax, "__version__", version)
        if ok:
            assert tl_.as_torch_kernel() is plgpu.as_torch_kernel
        else:
            with pytest.raises(ImportError, match=r"too old for as_torch_kernel.*0\.11\.1"):
                tl_.as_torch_kernel()
    tl_.as_torch_kernel.cache_clear()


def test_torch_cross_refuses_what_mosaic_cannot_take() -> None:
    import torch

    from fusedmlp.torch_impl.cross import linear_act as tl_

    x = torch.zeros((3, 5), dtype=torch.float32)
    w = torch.zeros((5, 7), dtype=torch.float32)
    cfg = TileConfig(64, 128, 64)
    with pytest.raises(NotImplementedError, match=r"got float32; fallback: impl 'triton'"):
        tl_.linear_act_fwd(x, w, None, None, activation="relu", config=cfg)
    with pytest.raises(ValueError, match=r"x: impl 'mosaic' expected a CUDA tensor, got device"):
        tl_.linear_act_fwd(x.bfloat16(), w.bfloat16(), None, None, activation="relu", config=cfg)
    out = tl_.linear_act_fwd(
        x[:0].bfloat16(), w.bfloat16(), None, None, activation="relu", config=cfg
    )
    assert tuple(out.shape) == (0, 7)


# ==== CPU: jax_triton plumbing ====================================================================
class _Recorder:
    """Stands in for a native @triton.jit kernel: records `kernel[grid](*args, **kwargs)`."""

    def __init__(self, real: Any) -> None:
        self.real, self.calls = real, []

    def __getitem__(self, grid: tuple[int, ...]):
        def launch(*args: Any, **kwargs: Any) -> None:
            self.calls.append((tuple(grid), args, kwargs))

        return launch


@pytest.mark.parametrize("family", ["linear_act", "gated"])
@pytest.mark.parametrize("m,k,n", ODD)
@pytest.mark.parametrize("bias", [True, False])
def test_triton_launch_plan_matches_native_launcher(
    monkeypatch: pytest.MonkeyPatch, family: str, m: int, k: int, n: int, bias: bool
) -> None:
    import importlib

    from fusedmlp.jax_impl.cross import linear_act as jl
    from fusedmlp.torch_impl.runtime import INTERPRET

    native_mod = importlib.import_module(f"fusedmlp.torch_impl.{family}")
    cross_mod = importlib.import_module(f"fusedmlp.jax_impl.cross.{family}")
    kname = f"_{family}_fwd_kernel"
    rec = _Recorder(getattr(native_mod, kname))
    monkeypatch.setattr(native_mod, kname, rec)
    residual = family == "linear_act" and bias  # exercise the residual with the bias
    ops = _problem(family, m, k, n, "float16", bias, residual)
    t = {name: _torch(a) for name, a in ops.items()}
    if family == "gated":
        native_mod.gated_fwd(t["x"], t["wv"], t["bc"], n=n, activation="silu", config=SMALL_GATED)
        plan = cross_mod.launch_plan(
            m, n, k, activation="silu", has_bias=bias, config=SMALL_GATED, interpret=INTERPRET
        )
    else:
        native_mod.linear_act_fwd(
            t["x"], t["w"], t["b"], t["residual"], activation="silu", config=SMALL
        )
        plan = cross_mod.launch_plan(
            m,
            n,
            k,
            activation="silu",
            has_bias=bias,
            has_residual=residual,
            config=SMALL,
            interpret=INTERPRET,
        )
    [(grid, args, kwargs)] = rec.calls
    names = jl.runtime_params(rec.real)
    assert grid == plan.grid
    by_name = dict(zip(names, args, strict=True))
    for pname, value in by_name.items():
        if pname in plan.scalars:
            assert int(value) == plan.scalars[pname], pname
        elif pname in plan.outputs:
            assert tuple(value.shape) == (m, n)
        elif value is None:  # absent operand: native passes None, the plan a placeholder
            assert plan.arrays[pname] == "x" and pname != "x_ptr", pname
        else:  # the native launcher's tensor is the operand the plan names
            assert value is t[plan.arrays[pname]], pname
    expected = dict(plan.constexprs, num_warps=plan.num_warps, num_stages=plan.num_stages)
    assert kwargs == expected


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", ODD[:2])
@pytest.mark.parametrize("bias", [True, False])
def test_adapters_interpreted_give_native_bits(
    dtype: str, m: int, k: int, n: int, bias: bool
) -> None:
    """The adapter kernels (jax_triton's argument order) run by Triton's interpreter on the plan's
    arguments: the native launcher's bits, and within tolerance of the float64 reference."""
    import torch

    from fusedmlp.jax_impl.cross import gated as jg
    from fusedmlp.jax_impl.cross import linear_act as jl
    from fusedmlp.torch_impl import gated as tg
    from fusedmlp.torch_impl import linear_act as tla
    from fusedmlp.torch_impl.runtime import INTERPRET

    if not INTERPRET:
        pytest.skip("runs the adapters under Triton's interpreter (CPU)")
    jl.native_kernel(require_compiled=False)
    jg.native_kernel(require_compiled=False)
    for family, activation in (("linear_act", "gelu_tanh"), ("gated", "silu")):
        residual = family == "linear_act" and not bias
        ops = _problem(family, m, k, n, dtype, bias, residual)
        t = {name: _torch(a) for name, a in ops.items()}
        if family == "gated":
            native = tg.gated_fwd(
                t["x"], t["wv"], t["bc"], n=n, activation=activation, config=SMALL_GATED
            )
            plan = jg.launch_plan(
                m, n, k, activation=activation, has_bias=bias, config=SMALL_GATED, interpret=True
            )
            adapter = jg._gated_fwd_jt
        else:
            native = tla.linear_act_fwd(
                t["x"], t["w"], t["b"], t["residual"], activation=activation, config=SMALL
            )
            plan = jl.launch_plan(
                m,
                n,
                k,
                activation=activation,
                has_bias=bias,
                has_residual=residual,
                config=SMALL,
                interpret=True,
            )
            adapter = jl._linear_act_fwd_jt
        out = torch.full((m, n), float("nan"), dtype=native.dtype)
        args = plan.positional(jl.runtime_params(adapter), t)
        adapter[plan.grid](
            *args, out, num_warps=plan.num_warps, num_stages=plan.num_stages, **plan.constexprs
        )
        assert torch.equal(
            out.view(torch.int16 if dtype != "float32" else torch.int32),
            native.view(torch.int16 if dtype != "float32" else torch.int32),
        ), family
        assert_close(
            to_numpy(out),
            _reference(family, ops, activation),
            layer_spec(dtype),
            what=f"adapter {family} {dtype}",
        )


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import collections, json, os, re, sys
    os.environ["TRITON_INTERPRET"] = "0"  # real Triton functions: compile PTX, launch nothing
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fusedmlp.common import TileConfig
    from fusedmlp.jax_impl.cross import gated as jg, linear_act as jl

    DTYPE = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}

    def mix(fn, dtype, scalars, const):
        sig, attrs, constexprs = {}, {}, dict(const)
        for i, p in enumerate(fn.params):
            if p.is_constexpr:
                sig[p.name] = "constexpr"
            elif p.name.endswith("_ptr"):
                sig[p.name] = DTYPE[dtype]
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif scalars[p.name] == 1:  # Triton and jax_triton both make 1 a constexpr
                sig[p.name] = "constexpr"
                constexprs[p.name] = 1
            else:
                sig[p.name] = "i32"
        k = triton.compile(ASTSource(fn, sig, constexprs=constexprs, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=4, num_stages=3))
        ops = collections.Counter()
        for line in k.asm["ptx"].splitlines():
            hit = re.match(r"\\s*([a-z][a-z0-9._]*)", line)
            if hit and not hit.group(1).startswith(("loc", "file")):
                ops[hit.group(1)] += 1
        return dict(ops), k.metadata.shared

    result = {}
    config = TileConfig(64, 64, 32, group_m=8, num_warps=4, num_stages=3)
    for family, activation, dtype in json.loads(sys.argv[1]):
        mod = jl if family == "linear_act" else jg
        native = mod.native_kernel()
        adapter = jl._linear_act_fwd_jt if family == "linear_act" else jg._gated_fwd_jt
        extra = {"has_residual": True} if family == "linear_act" else {}
        plan = mod.launch_plan(37, 45, 53, activation=activation, has_bias=True, config=config,
                               **extra)
        try:
            result[f"{family}-{activation}-{dtype}"] = [
                mix(fn, dtype, plan.scalars, plan.constexprs) for fn in (native, adapter)
            ]
        except Exception as exc:  # one case's compiler error, reported by its own test
            # CompilationErrors chain (cause, then context) down to the real error, e.g. NameError.
            root = exc
            while (root.__cause__ or root.__context__) is not None:
                root = root.__cause__ or root.__context__
            cause = f"{type(root).__name__}: {str(root).strip().splitlines()[0][:200]}"
            where = [ln.strip() for ln in str(exc).splitlines() if ln.strip()][-2:]
            result[f"{family}-{activation}-{dtype}"] = {"error": f"{cause} at {where}"}
    print("RESULT" + json.dumps(result))
    """
)
COMPILE_CASES = [
    ("linear_act", act, "bfloat16") for act in ("identity", "relu", "gelu", "gelu_tanh", "silu")
]
COMPILE_CASES += [("gated", "silu", "float16"), ("gated", "gelu_tanh", "float32")]


@functools.cache
def _compiled_mixes() -> dict[str, Any]:
    return run_script(_COMPILE_SCRIPT, json.dumps(COMPILE_CASES))


@pytest.mark.parametrize("family,activation,dtype", COMPILE_CASES)
def test_adapter_compiles_to_the_native_instruction_mix(
    family: str, activation: str, dtype: str
) -> None:
    """Compiled for sm_90 on this CPU (Triton makes PTX without a GPU): the adapter that puts the
    output last for jax_triton has the native kernel's PTX instruction counts and shared memory —
    Triton inlined the native kernel, nothing else changed."""
    result = _compiled_mixes()[f"{family}-{activation}-{dtype}"]
    if isinstance(result, dict):
        raise AssertionError(f"Triton could not compile the kernel for sm_90: {result['error']}")
    (native_ops, native_smem), (adapter_ops, adapter_smem) = result
    diff = {
        op: (native_ops.get(op, 0), adapter_ops.get(op, 0))
        for op in set(native_ops) | set(adapter_ops)
        if native_ops.get(op, 0) != adapter_ops.get(op, 0)
    }
    assert diff == {}, f"PTX instruction counts (native, adapter) differ: {diff}"
    assert adapter_smem == native_smem
    assert sum(native_ops.values()) > 100


_LOWER_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TRITON_INTERPRET"] = "0"  # jax_triton compiles: it needs real Triton functions
    sys.path.insert(0, sys.argv[1])  # the jax_triton wheel, imported from the zip
    sys.path.insert(1, "tests")  # helpers
    import jax, jax.numpy as jnp
    from helpers import record_jax_triton_calls

    # A stand-in for the CUDA plugin's Triton runtime (absent on a CPU): records what jax_triton
    # hands it, so the whole compile path (TTIR -> PTX with triton 3.6) runs without a GPU.
    calls = record_jax_triton_calls()

    from fusedmlp.common import TileConfig
    from fusedmlp.jax_impl.cross import gated as jg, linear_act as jl

    cfg = TileConfig(64, 32, 32, group_m=8, num_warps=4, num_stages=3)
    cfg_gated = TileConfig(64, 64, 32, group_m=8, num_warps=4, num_stages=3)  # packed: 64 wide
    out = {}
    for dtype in ("float32", "bfloat16"):
        def s(*shape):
            return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
        m, k, n = 37, 53, 45
        cases = {
            "linear_act": (lambda x, w, b, r: jl.linear_act_fwd(
                x, w, b, r, activation="silu", config=cfg), (s(m, k), s(k, n), s(n), s(m, n))),
            "linear_act-nobias": (lambda x, w: jl.linear_act_fwd(
                x, w, None, None, activation="relu", config=cfg), (s(m, k), s(k, n))),
            "gated": (lambda x, wv, bc: jg.gated_fwd(
                x, wv, bc, n=n, activation="silu", config=cfg_gated),
                (s(m, k), s(k, 128), s(128))),
        }
        for name, (fn, structs) in cases.items():
            calls.clear()
            text = jax.jit(fn).trace(*structs).lower(lowering_platforms=("cuda",)).as_text()
            [call] = calls
            call["ptx_lines"] = len(call.pop("ptx").splitlines())
            call["custom_calls"] = text.count("stablehlo.custom_call @triton_kernel_call")
            call["cache_dir"] = os.environ.get("TRITON_CACHE_DIR", "<unset>")
            out[f"{name}-{dtype}"] = call
    print("RESULT" + json.dumps(out))
    """
)


def test_jax_triton_lowering_with_the_real_wheel() -> None:
    """jax_triton 0.3.1's own compile path, on this CPU: the cross launchers lowered for CUDA under
    jax.jit (the CUDA plugin's Triton runtime replaced by a recorder). One custom call each, the
    native kernel, the plan's grid, and only pointers as runtime arguments (inputs, then the
    output): M, N, K and the strides are compile-time constants (issue 23; the PTX is compared
    with the torch launch's in tests/test_cross_launch.py)."""
    result = run_script(_LOWER_SCRIPT, needs_jax_triton_wheel(), cache="unset")
    m, n = 37, 45
    grid = [-(-m // 64) * -(-n // 32), 1, 1]
    for dtype in ("float32", "bfloat16"):
        la = result[f"linear_act-{dtype}"]
        assert la["kernel"] == "_linear_act_fwd_kernel" and la["custom_calls"] == 1
        assert la["grid"] == grid
        kinds = [p[0] for p in la["params"]]
        assert kinds == ["array"] * 4 + ["array"]  # x, w, b, r, then the output
        nb = result[f"linear_act-nobias-{dtype}"]
        assert [p[0] for p in nb["params"]] == kinds  # placeholders keep the positions
        g = result[f"gated-{dtype}"]
        assert g["kernel"] == "_gated_fwd_kernel"
        assert g["grid"] == [-(-m // 64) * -(-n // 64), 1, 1]  # packed: 64 output columns a tile
        assert [p[0] for p in g["params"]] == ["array"] * 3 + ["array"]  # x, wv, bc, the output
        assert la["ptx_lines"] > 100 and g["ptx_lines"] > 100
        assert la["cache_dir"] == "<unset>"  # the import's TRITON_CACHE_DIR="" was undone


def test_import_jax_triton_keeps_the_triton_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """jax_triton 0.3.1 sets TRITON_CACHE_DIR="" at import, which makes every later Triton compile
    fail; the lazy import puts the variable back. A stand-in module with the same side effect."""
    from fusedmlp.jax_impl.cross import linear_act as jl

    (tmp_path / "jax_triton.py").write_text(
        "import os\nos.environ['TRITON_CACHE_DIR'] = ''\nVALUE = 17\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "jax_triton", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    module = jl.import_jax_triton()
    assert module.VALUE == 17
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "cache")
    monkeypatch.delitem(sys.modules, "jax_triton")
    monkeypatch.delenv("TRITON_CACHE_DIR")
    jl.import_jax_triton()
    assert "TRITON_CACHE_DIR" not in os.environ


def test_missing_jax_triton_names_the_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    from fusedmlp.jax_impl.cross import linear_act as jl

    monkeypatch.setitem(sys.modules, "jax_triton", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r"jax-triton==0\.3\.1.*bench/fetch_wheels\.sh"):
        jl.import_jax_triton()


# ==== CPU: Mosaic GPU from torch plumbing =========================================================
def _packed_jax(ops: dict) -> tuple:
    """(wv, bc) of a gated problem's w, v, b, c, packed as the fronts pack them (jax arrays)."""
    import jax.numpy as jnp

    from fusedmlp.jax_impl.packing import pack_gated

    wv = pack_gated(jnp.asarray(ops["w"]), jnp.asarray(ops["v"]))
    bc = (
        pack_gated(jnp.asarray(ops["b"]), jnp.asarray(ops["c"]))
        if ops.get("b") is not None
        else None
    )
    return wv, bc


@pytest.mark.parametrize("family", ["linear_act", "gated"])
@pytest.mark.parametrize("m,k,n", MOSAIC_SHAPES)
def test_mosaic_padding_matches_jax_launcher(
    monkeypatch: pytest.MonkeyPatch, family: str, m: int, k: int, n: int
) -> None:
    """The torch side pads to the extents and expects the persistent grid the JAX launcher uses."""
    import importlib

    import jax
    import jax.numpy as jnp
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from fusedmlp.common.packing import packed_width
    from fusedmlp.jax_impl.mosaic import default_config
    from fusedmlp.torch_impl.cross import linear_act as tl_

    seen = []

    def fake_kernel(body, *, out_type, grid, **kwargs):
        def launch(*operands):
            seen.append((out_type.shape, tuple(grid), [tuple(o.shape) for o in operands]))
            return jnp.zeros(out_type.shape, out_type.dtype)

        return launch

    monkeypatch.setattr(plgpu, "kernel", fake_kernel)
    cfg = default_config(family, m, n, k, "bfloat16", interpret=False)
    mod = importlib.import_module(f"fusedmlp.jax_impl.mosaic.{family}")
    ops = {
        name: (jnp.asarray(a) if a is not None else None)
        for name, a in _problem(family, m, k, n, "bfloat16", True).items()
    }
    plan = tl_.padded_shapes(m, n, k, cfg, family)
    if family == "gated":
        wv, bc = _packed_jax(ops)
        y = mod.gated_fwd(ops["x"], wv, bc, n=n, activation="silu", config=cfg, interpret=False)
        operand_shapes = [(plan.mp, plan.kp), (plan.kp, packed_width(n)), (packed_width(n),)]
    else:
        y = mod.linear_act_fwd(
            ops["x"], ops["w"], ops["b"], None, activation="silu", config=cfg, interpret=False
        )
        operand_shapes = [(plan.mp, plan.kp), (plan.kp, plan.np_), (plan.np_,)]
    [(out_shape, grid, shapes)] = seen
    assert out_shape == (plan.mp, plan.np_)
    assert (plan.np_, plan.kp) == (n, k)  # TMA clips N and zero-fills K: no padding there
    assert plan.mp == (m if m <= 8 else -(-m // 8) * 8)
    assert grid == plan.grid
    assert shapes == operand_shapes
    assert tuple(y.shape) == (m, n)
    assert isinstance(y, jax.Array)


def _torch_to_jax(t):
    import jax.numpy as jnp
    import torch

    if t.dtype == torch.bfloat16:
        return jnp.asarray(t.view(torch.uint16).numpy().view(numpy_dtype("bfloat16")))
    return jnp.asarray(t.numpy())


# Pairwise rather than the full product (each case interprets a Mosaic kernel: ~6 s): every
# family meets every dtype and every shape once.
@pytest.mark.parametrize(
    "family,dtype,m,k,n,bias",
    [
        ("linear_act", "float16", 37, 64, 80, True),
        ("linear_act", "bfloat16", 1, 32, 48, False),
        ("gated", "bfloat16", 37, 64, 80, True),
        ("gated", "float16", 1, 32, 48, False),
    ],
)
def test_mosaic_torch_padding_gives_the_jax_launchers_bits(
    family: str, dtype: str, m: int, k: int, n: int, bias: bool
) -> None:
    """What the torch side does around as_torch_kernel — pad in torch, run the JAX launcher on the
    operands it need not pad, slice in torch (`run`) — gives the JAX launcher's own bits. The
    kernel runs under the Mosaic GPU interpreter here, standing in for the compiled one."""
    import importlib

    import torch

    from fusedmlp.jax_impl.mosaic import INTERPRET_CONFIG as cfg
    from fusedmlp.torch_impl.cross import linear_act as tl_
    from fusedmlp.torch_impl.packing import pack_gated as torch_pack

    mod = importlib.import_module(f"fusedmlp.jax_impl.mosaic.{family}")
    activation = "gelu_tanh" if family == "linear_act" else "silu"
    residual = family == "linear_act" and bias
    ops = _problem(family, m, k, n, dtype, bias, residual)
    t = {name: _torch(a) for name, a in ops.items()}
    j = {name: (_torch_to_jax(v) if v is not None else None) for name, v in t.items()}
    plan = tl_.padded_shapes(m, n, k, cfg, family)
    if family == "gated":
        wv, bc = _packed_jax(j)
        native = mod.gated_fwd(
            j["x"], wv, bc, n=n, activation=activation, config=cfg, interpret=True
        )
        operands = [tl_.pad2d(t["x"], plan.mp, plan.kp), torch_pack(t["w"], t["v"])]
        operands += [torch_pack(t["b"], t["c"])] if bias else []
    else:
        native = mod.linear_act_fwd(
            j["x"], j["w"], j["b"], j["residual"], activation=activation, config=cfg, interpret=True
        )
        operands = [tl_.pad2d(t["x"], plan.mp, plan.kp), tl_.pad2d(t["w"], plan.kp, plan.np_)]
        operands += [tl_.pad1d(t["b"], plan.np_)] if bias else []
        operands += [tl_.pad2d(t["residual"], plan.mp, plan.np_)] if residual else []

    def interpreted(*aligned):  # the JAX launcher on the operands as as_torch_kernel passes them
        args = [_torch_to_jax(a) for a in aligned]
        if family == "gated":
            x, wv_, *rest = args
            y = mod.gated_fwd(
                x,
                wv_,
                rest[0] if bias else None,
                n=n,
                activation=activation,
                config=cfg,
                interpret=True,
            )
        else:
            x, w, *rest = args
            b = rest.pop(0) if bias else None
            r = rest.pop(0) if residual else None
            y = mod.linear_act_fwd(x, w, b, r, activation=activation, config=cfg, interpret=True)
        return _torch(np.asarray(y))

    assert all(o.is_contiguous() for o in operands)
    out = tl_.run(interpreted, operands, plan)
    assert tuple(out.shape) == (m, n) and out.is_contiguous()
    # Both widened exactly to float32, compared as bits.
    got = np.asarray(to_numpy(out), np.float32).view(np.uint32)
    want = np.asarray(native, np.float32).view(np.uint32)
    assert np.array_equal(got, want), f"{family} {dtype}: {np.sum(got != want)} elements differ"
    assert isinstance(out, torch.Tensor)


@pytest.mark.parametrize(
    "family,bias,residual",
    [
        ("linear_act", True, True),
        ("linear_act", False, False),
        ("gated", True, False),
        ("gated", False, False),
    ],
)
def test_mosaic_function_is_one_kernel_call(family: str, bias: bool, residual: bool) -> None:
    """Lowered for CUDA on this CPU, the function handed to as_torch_kernel passes as_torch_kernel's
    own module check (jax's private `_find_mgpu_call_in_module`, the same in 0.10.2 and 0.11.2):
    one Mosaic GPU call and nothing else — at an odd M, where the torch side pads the rows the
    launcher would pad; without that padding the launcher's own pad would be refused. torch's
    direct launcher (torch_impl/cross/launcher.py) plans the first and refuses the second."""
    import jax
    import jax.numpy as jnp
    import torch

    from fusedmlp.common.packing import packed_width
    from fusedmlp.jax_impl.mosaic import default_config
    from fusedmlp.torch_impl.cross import gated as tg
    from fusedmlp.torch_impl.cross import linear_act as tl_
    from fusedmlp.torch_impl.cross.launcher import Output

    m, k, n = 37, 64, 80
    cfg = default_config(family, m, n, k, "bfloat16", interpret=False)
    plan = tl_.padded_shapes(m, n, k, cfg, family)

    def s(*shape: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, jnp.bfloat16)

    if family == "gated":
        fn = tg.mosaic_function("gelu_tanh", bias, n, cfg)
        structs = [s(plan.mp, plan.kp), s(plan.kp, packed_width(n))]
        structs += [s(packed_width(n))] if bias else []
    else:
        fn = tl_.mosaic_function("gelu_tanh", bias, residual, cfg)
        structs = [s(plan.mp, plan.kp), s(plan.kp, plan.np_)]
        structs += [s(plan.np_)] if bias else []
        structs += [s(plan.mp, plan.np_)] if residual else []
    call = mosaic_gpu_call(fn, structs)
    assert len(list(call.operands)) == len(structs)
    assert [tuple(r.type.shape) for r in call.results] == [(plan.mp, plan.np_)]
    # torch's direct launcher plans the same call (one fresh bf16 output, the operands in order)
    direct = direct_launch_plan(fn, structs)
    assert direct is not None and direct.single and direct.returned == (0,)
    assert direct.operand_order == tuple(range(len(structs)))
    assert direct.outputs == (Output((plan.mp, plan.np_), torch.bfloat16),)
    assert plan.mp != m  # the odd M really was padded on the torch side
    unpadded = [s(m, k), structs[1]]
    if family == "linear_act":
        fn = tl_.mosaic_function("gelu_tanh", False, False, cfg)
    else:
        fn = tg.mosaic_function("gelu_tanh", False, n, cfg)
    with pytest.raises(ValueError, match="Unsupported operation"):
        mosaic_gpu_call(fn, unpadded)
    assert direct_launch_plan(fn, unpadded) is None  # the launcher's pad: not the bare call


# ==== CPU: fused_small's Mosaic GPU sibling from torch ============================================


def _deep(layers: int = 8, **changes: Any):
    from fusedmlp.common import MLPSpec

    spec = MLPSpec((128,) * (layers + 1), "relu", False, "float16")
    return spec.replace(**changes) if changes else spec


@pytest.fixture
def as_hopper(monkeypatch: pytest.MonkeyPatch):
    """This CPU as an H200 to torch's fused_small rule: compiled kernels, capability 9.0, jax usable
    from torch. The rule's per-(spec, device) cache is cleared before and after."""
    import torch

    from fusedmlp.torch_impl import front
    from fusedmlp.torch_impl import fused_small as tfs
    from fusedmlp.torch_impl.cross import fused_small as cfs

    monkeypatch.setattr(tfs, "INTERPRET", False)
    monkeypatch.setattr(front, "_has_cuda", lambda: False)  # no capture to ask this CPU about
    monkeypatch.setattr(front, "_table", lambda device: None)  # no dispatch table: the heuristic
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(cfs, "unavailable_reason", lambda: None)
    tfs._sibling_takes.cache_clear()
    yield monkeypatch
    tfs._sibling_takes.cache_clear()


def test_torch_fused_small_takes_the_sibling_at_128_wide(as_hopper) -> None:
    """torch's fused_small runs the Mosaic GPU sibling from JAX on Hopper, 16-bit, every width 128,
    default tiles, jax usable, no CUDA graph in the making; else its own Triton kernel."""
    import torch

    from fusedmlp.common import MLPSpec, get_preset
    from fusedmlp.common.tiling import SmallConfig
    from fusedmlp.jax_impl.mosaic import fused_small as mfs
    from fusedmlp.torch_impl import front
    from fusedmlp.torch_impl import fused_small as tfs
    from fusedmlp.torch_impl.cross import fused_small as cfs

    def rule(spec: MLPSpec, m: int = 1 << 20) -> bool:
        return tfs._sibling_applies(spec, "cuda", m)

    deep = _deep()
    assert rule(deep) and rule(_deep(2, activation="gelu_tanh", bias=True, dtype="bfloat16"))
    assert not rule(deep.replace(dtype="float32"))
    assert not rule(get_preset("nerf-64x5").spec)  # 64 wide: this kernel's own TMA I/O
    assert not rule(MLPSpec((128, 96, 128), "relu", False, "float16"))  # the ring: all 128
    assert not rule(_deep(2, activation="swiglu"))  # gated: the sibling has none yet
    assert not tfs._sibling_applies(deep, "cpu", 1 << 20)
    # from 2^19 rows x layers (below it the Triton kernel: one compile for every M)
    assert rule(deep, 1 << 16) and not rule(deep, (1 << 16) - 8)
    assert rule(_deep(2), 1 << 18) and not rule(_deep(2), 1 << 17)
    assert not rule(deep, (1 << 20) + 3)  # x would be copied to whole 8-row TMA atoms
    assert rule(deep, (1 << 20) + 8)
    assert tfs._sibling_applies(deep, "cuda:1", 1 << 20)  # x's device decides, not the current
    with as_hopper.context() as m:
        m.setattr(
            torch.cuda, "get_device_capability", lambda index=None: (9, 0) if not index else (8, 0)
        )
        tfs._sibling_takes.cache_clear()
        assert not tfs._sibling_applies(deep, "cuda:1", 1 << 20)
        assert tfs._sibling_applies(deep, "cuda:0", 1 << 20)
    tfs._sibling_takes.cache_clear()
    with front.graph_safe():  # a CUDA graph records the sibling's launch (cross/launcher.py)
        assert rule(deep)
    x = torch.zeros(3, 128, dtype=torch.float16)
    assert not tfs._takes_mosaic_sibling(deep, SmallConfig(64, 4, 3), x)  # pinned: Triton
    assert tfs._takes_mosaic_sibling(deep, mfs.RING_CONFIG, x)  # the sibling's own tiles
    assert not tfs._takes_mosaic_sibling(deep, None, x)  # default tiles: the tensor's device
    assert cfs.is_sibling_config(mfs.RING_CONFIG) and not cfs.is_sibling_config(None)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        assert not tfs._takes_mosaic_sibling(deep, None, fake)  # a trace: the Triton kernel
        with pytest.raises(RuntimeError, match="cannot run inside a trace"):
            tfs._takes_mosaic_sibling(deep, mfs.RING_CONFIG, fake)
    for why, patch in (
        ("not Hopper", (torch.cuda, "get_device_capability", lambda index=None: (8, 0))),
        ("no jax for torch", (cfs, "unavailable_reason", lambda: "jax too old")),
        ("interpreted", (tfs, "INTERPRET", True)),
        ("switched off", (tfs, "_SIBLING_ENABLED", False)),
        ("no CUDA", (torch.cuda, "is_available", lambda: False)),
    ):
        with as_hopper.context() as m:
            m.setattr(*patch)
            tfs._sibling_takes.cache_clear()
            assert not rule(deep), why
    tfs._sibling_takes.cache_clear()
    with as_hopper.context() as m:  # default tiles past shared memory: Triton, not a raise
        m.setattr(mfs, "default_config", lambda spec, m_, **kw: mfs.MosaicSmallConfig(num_stages=9))
        assert not rule(deep)


def test_torch_plan_names_the_sibling_in_and_out_of_a_graph(as_hopper) -> None:
    """The plan records the sibling's tiles (they pin the route at the launch) and says so, while a
    CUDA graph is prepared too (its launch records: cross/launcher.py); the call cache keys
    fused_small's plans without graph_safe (only `auto`'s can differ there)."""
    import torch

    from fusedmlp.common.tiling import SmallConfig
    from fusedmlp.jax_impl.mosaic import fused_small as mfs
    from fusedmlp.torch_impl import front

    deep = _deep()
    m = 1 << 20
    assert "sibling" not in front.plan(deep, (4099, 128), impl="fused_small", device="cuda").reason
    for impl in ("auto", "fused_small"):
        the_plan = front.plan(deep, (m, 128), impl=impl, device="cuda")
        assert the_plan.impl == "fused_small", the_plan
        assert "Mosaic GPU sibling runs here on these tensors" in the_plan.reason
        assert the_plan.launches[0].config == mfs.RING_CONFIG
        assert front.graph_capturable(the_plan)
        with front.graph_safe():
            captured = front.plan(deep, (m, 128), impl=impl, device="cuda")
        assert captured.launches[0].config == mfs.RING_CONFIG
        assert "sibling runs here" in captured.reason and front.graph_capturable(captured)
    # training with saved="preact": the saving forward is fused_small's Triton kernel, and the
    # plan says so; saved="inputs" runs the inference route (the sibling) forward
    trains = front.plan(deep, (m, 128), impl="fused_small", device="cuda", saved="preact")
    assert isinstance(trains.launches[0].config, SmallConfig) and "sibling" not in trains.reason
    assert "saving forward runs the fused_small kernel" in trains.reason
    inputs = front.plan(deep, (m, 128), impl="fused_small", device="cuda", saved="inputs")
    assert inputs.launches[0].config == mfs.RING_CONFIG and "sibling runs here" in inputs.reason
    # torch's mosaic records (launched on the current stream: torch_impl/cross/launcher.py)
    assert front.graph_capturable(front.plan(deep, (64, 128), impl="mosaic", device="cuda"))
    assert front.graph_capturable(front.plan(deep, (64, 128), impl="triton", device="cuda"))
    # the prepared-call cache: fused_small's plan is one inside and outside graph_safe (a CPU
    # tensor, with the rule asked as on a GPU)
    as_hopper.setattr(front, "_sibling_runs", lambda spec, device, m: True)
    x = torch.zeros(5, 128, dtype=torch.float16)
    params = {f"w{i}": torch.zeros(128, 128, dtype=torch.float16) for i in range(8)}
    eager = front.prepare(x, params, deep, "fused_small")
    with front.graph_safe():
        graphed = front.prepare(x, params, deep, "fused_small")
    assert graphed is eager and eager.plan.launches[0].config == mfs.RING_CONFIG


@pytest.mark.parametrize("m", [37, 1, 1024])
def test_torch_sibling_operands_are_padded_like_the_jax_launcher(m: int) -> None:
    """x's rows to whole 8-row TMA atoms (as the JAX launcher's `padded_rows`), bias rows to the
    kernel's length; no copy of what already has the shape."""
    import torch

    from fusedmlp.common import MLPSpec
    from fusedmlp.jax_impl.mosaic import fused_small as mfs
    from fusedmlp.torch_impl.cross import fused_small as cfs

    spec = MLPSpec((16, 64, 16), "gelu_tanh", True, "float16")  # 16-wide rows: bias rows padded
    cfg = mfs.DEFAULT_CONFIG
    x = torch.randn(m, 16).half()
    params = {
        "w0": torch.randn(16, 64).half(),
        "w1": torch.randn(64, 16).half(),
        "b0": torch.randn(64).half(),
        "b1": torch.randn(16).half(),
    }
    ops, plan = cfs.operands(x, params, spec, cfg)
    mp = mfs.padded_rows(m, cfg.block_m, interpret=False)
    assert plan.mp == mp == (m if m <= 8 else -(-m // 8) * 8) and (plan.m, plan.n) == (m, 16)
    assert [tuple(o.shape) for o in ops] == [(mp, 16), (16, 64), (64, 16), (64,), (64,)]
    assert all(o.is_contiguous() for o in ops)
    assert (ops[0].data_ptr() == x.data_ptr()) is (mp == m)
    assert ops[1].data_ptr() == params["w0"].data_ptr()
    assert ops[3].data_ptr() == params["b0"].data_ptr()  # 64 elements: a whole TMA copy already
    assert torch.equal(ops[4][:16], params["b1"]) and not ops[4][16:].any()
    assert torch.equal(ops[0][:m], x) and not ops[0][m:].any()
    # views at an odd offset: copied to 16-byte aligned buffers (TMA's descriptors need it; the
    # Mosaic GPU runtime aborts the process on a misaligned base address)
    buf = torch.randn(2048 + m * 16).half()
    skewed = {**params, "w0": buf[5 : 5 + 16 * 64].view(16, 64), "b0": buf[1:65]}
    ops, _ = cfs.operands(buf[3 : 3 + m * 16].view(m, 16), skewed, spec, cfg)
    assert all(o.data_ptr() % 16 == 0 and o.is_contiguous() for o in ops)
    assert torch.equal(ops[1], skewed["w0"]) and torch.equal(ops[3], skewed["b0"])


@pytest.mark.parametrize(
    ("layers", "activation", "bias", "dtype", "m"),
    [(2, "relu", True, "float16", 37), (3, "gelu_tanh", False, "bfloat16", 1)],
)
def test_torch_fused_small_through_the_sibling_gives_the_jax_launchers_bits(
    monkeypatch: pytest.MonkeyPatch, layers: int, activation: str, bias: bool, dtype: str, m: int
) -> None:
    """torch's fused_small_fwd at the sibling's tiles goes through the cross launcher — pad in
    torch, the JAX launcher on operands it need not pad, slice in torch — and gives the JAX
    launcher's own bits. The compiled kernel is stood in for by the same launcher under the Mosaic
    GPU interpreter (as_torch_kernel needs a GPU)."""
    import jax.numpy as jnp
    import torch

    from fusedmlp.common import init_params, make_input, reference
    from fusedmlp.jax_impl.mosaic import fused_small as mfs
    from fusedmlp.torch_impl import fused_small as tfs
    from fusedmlp.torch_impl.cross import fused_small as cfs

    spec = _deep(layers, activation=activation, bias=bias, dtype=dtype)
    cfg = mfs.INTERPRET_RING_CONFIG
    params, x = init_params(spec, seed=layers), make_input(spec, m, seed=layers + 7)
    made = []

    def compiled_kernel(key, make, ops):
        made.append((key, make()))

        def interpreted(*aligned):
            x_, *rest = (_torch_to_jax(a) for a in aligned)
            p = {f"w{i}": w for i, w in enumerate(rest[: spec.num_layers])}
            p |= {f"b{i}": b for i, b in enumerate(rest[spec.num_layers :])}
            return _torch(np.asarray(mfs.fused_small_fwd(x_, p, spec, config=cfg, interpret=True)))

        return interpreted

    monkeypatch.setattr(cfs, "compiled_kernel", compiled_kernel)
    t = {k: _torch(v) for k, v in params.items()}
    out = tfs.fused_small_fwd(_torch(x), t, spec, config=cfg)
    [(key, fn)] = made
    assert key == ("fused_small", spec, cfg) and callable(fn)
    assert tuple(out.shape) == (m, spec.d_out) and out.is_contiguous()
    native = mfs.fused_small(
        jnp.asarray(x), {k: jnp.asarray(v) for k, v in params.items()}, spec, config=cfg
    )
    got = np.asarray(to_numpy(out), np.float32).view(np.uint32)
    want = np.asarray(native, np.float32).view(np.uint32)
    assert np.array_equal(got, want), f"{np.sum(got != want)} elements differ"
    assert_close(to_numpy(out), reference.forward(spec, x, params), spec, what=str(spec))
    assert isinstance(out, torch.Tensor)


@pytest.mark.parametrize(
    ("layers", "activation", "bias", "dtype"),
    [(8, "relu", False, "float16"), (3, "gelu_tanh", True, "bfloat16")],
)
def test_torch_sibling_function_is_one_kernel_call(
    layers: int, activation: str, bias: bool, dtype: str
) -> None:
    """Lowered for CUDA on this CPU, the function torch hands to as_torch_kernel for fused_small is
    the one Mosaic GPU call as_torch_kernel accepts, at an odd M whose rows torch padded; without
    that padding the launcher's own pad would be refused."""
    import jax
    import jax.numpy as jnp

    from fusedmlp.jax_impl.mosaic import fused_small as mfs
    from fusedmlp.torch_impl.cross import fused_small as cfs

    spec = _deep(layers, activation=activation, bias=bias, dtype=dtype)
    cfg = mfs.RING_CONFIG
    m = 4099
    plan, weights, bias_len = cfs.launch_plan(m, spec, cfg)
    dt = jnp.dtype(dtype)
    structs = [jax.ShapeDtypeStruct((plan.mp, 128), dt)]
    structs += [jax.ShapeDtypeStruct(shape, dt) for shape in weights]
    structs += [jax.ShapeDtypeStruct((bias_len,), dt)] * (layers if bias else 0)

    fn = cfs.mosaic_function(spec, cfg)
    call = mosaic_gpu_call(fn, structs)
    assert len(list(call.operands)) == len(structs)
    assert [tuple(r.type.shape) for r in call.results] == [(plan.mp, 128)]
    assert plan.mp == 4104 != m
    with pytest.raises(ValueError, match="Unsupported operation"):
        mosaic_gpu_call(fn, [jax.ShapeDtypeStruct((m, 128), dt), *structs[1:]])


def test_sibling_route_probe_smoke(tmp_path: Path) -> None:
    """bench/sibling_route_probe.py's CPU mode: the Triton route interpreted, host times only."""
    from fusedmlp.bench import sibling_route_probe

    out = tmp_path / "route.json"
    assert sibling_route_probe.main([str(out), "--smoke", "--cases", "w128x2", "--m", "64"]) == 0
    [row] = json.loads(out.read_text())["rows"]
    assert (row["case"], row["m"], row["route"]) == ("w128x2", 64, "triton")
    assert row["idle_issue_us"] > 0 and "time_us" not in row


# ==== CPU: bench/fetch_wheels.sh's compatibility check ============================================
def _wheel(
    path: Path,
    *,
    requires: list[str],
    python: str = ">=3.11",
    tag: str = "py3-none-any",
    source: str = "",
) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        meta = [
            "Metadata-Version: 2.4",
            "Name: jax-triton",
            "Version: 9.9.9",
            f"Requires-Python: {python}",
            *[f"Requires-Dist: {r}" for r in requires],
        ]
        zf.writestr("jax_triton-9.9.9.dist-info/METADATA", "\n".join(meta) + "\n")
        zf.writestr("jax_triton-9.9.9.dist-info/WHEEL", f"Wheel-Version: 1.0\nTag: {tag}\n")
        zf.writestr("jax_triton/__init__.py", source)
    return path


def _check(*wheels: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(
        ["bash", str(ROOT / "bench" / "fetch_wheels.sh"), "--check", *map(str, wheels)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_fetch_wheels_check(tmp_path: Path) -> None:
    good = _wheel(
        tmp_path / "good.whl",
        requires=["absl-py>=1.4.0", "jax>=0.8.2", "triton>=3.6", 'pytest; extra == "tests"'],
        source="from jax._src.lib import gpu_triton\ngpu_triton.get_compute_capability\n",
    )
    proc = _check(good)
    assert proc.returncode == 0, proc.stderr
    assert "ok: jax-triton 9.9.9" in proc.stdout
    bad = {
        "new_jax.whl": dict(requires=["jax>=0.12"]),
        "new_python.whl": dict(requires=[], python=">=3.13"),
        "cp311.whl": dict(requires=[], tag="cp311-cp311-manylinux_2_17_x86_64"),
        "unknown_dep.whl": dict(requires=["not-on-the-image>=1"]),
        "api.whl": dict(requires=[], source="gpu_triton.TritonKernelCallV9\n"),
    }
    expected = [
        "the image has jax 0.11.2",
        "excludes the image's 3.12.3",
        "do not install",
        "not on the image: carry it too",
        "gpu_triton.['TritonKernelCallV9']",
    ]
    for (name, kwargs), message in zip(bad.items(), expected, strict=True):
        proc = _check(_wheel(tmp_path / name, **kwargs))
        assert proc.returncode == 1, name
        assert message in proc.stderr, (name, proc.stderr)
