"""Cross-stack calls at native speed (issue 23 item 3).

`jax_triton`: torch_impl's Triton kernels on jax arrays must compile to what the torch launch
compiles to. Passed M, N, K and the strides as runtime scalars, jax_triton gave them no
divisibility-by-16 specialisation and the kernel lost its 16-byte asynchronous copies and its
pipelined K loop (5.9× slower on the H200). Here the PTX of jax_triton's own compile path (on a
CPU: lowered for CUDA with the CUDA plugin's Triton runtime replaced by a recorder; on a GPU: the
real compile, dumped) is compared with `triton.compile` of the native kernel specialised as the
torch launcher specialises it.

`torch:mosaic`: the compiled callable is cached per shape and the launch skips what is current
(CPU: the plumbing with a stand-in kernel; the Hopper run is in `pytest -m gpu`).
"""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

import numpy as np
import pytest

from helpers import needs_jax_triton_wheel, run_script, torch_like_ptx

_PTX_SCRIPT = textwrap.dedent(
    """
    import collections, json, os, re, sys
    os.environ["TRITON_INTERPRET"] = "0"  # real Triton functions: compile PTX, launch nothing
    sys.path.insert(0, sys.argv[1])  # the jax_triton wheel, imported from the zip
    sys.path.insert(1, "tests")  # helpers
    import jax, jax.numpy as jnp
    from helpers import record_jax_triton_calls, torch_like_ptx

    calls = record_jax_triton_calls()  # the CUDA plugin's Triton runtime (no GPU here)

    from fusedmlp.common import TileConfig
    from fusedmlp.common.packing import packed_width
    from fusedmlp.jax_impl.cross import gated as jg, linear_act as jl

    def mix(ptx):
        ops = collections.Counter()
        for line in ptx.splitlines():
            line = line.strip()
            hit = re.match(r"(cp\\.async\\.\\w+)\\.shared\\.global.*,\\s*(0x[0-9a-f]+|\\d+)", line)
            if hit:
                ops[f"{hit.group(1)} {int(hit.group(2), 0)}B"] += 1
            hit = re.match(r"(wgmma\\.mma_async\\S*|ld\\.global\\S*)", line)
            if hit:
                ops[hit.group(1)] += 1
        return dict(ops)

    cfg = TileConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=3)
    m, k, n = 256, 512, 384
    out = {}
    s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    cases = {
        "linear_act": (jl, lambda x, w, b: jl.linear_act_fwd(
            x, w, b, None, activation="silu", config=cfg), (s(m, k), s(k, n), s(n)),
            jl.launch_plan(m, n, k, activation="silu", has_bias=True, has_residual=False,
                           config=cfg)),
        "gated": (jg, lambda x, wv, bc: jg.gated_fwd(
            x, wv, bc, n=n, activation="silu", config=cfg),
            (s(m, k), s(k, packed_width(n)), s(packed_width(n))),
            jg.launch_plan(m, n, k, activation="silu", has_bias=True, config=cfg)),
    }
    for name, (mod, fn, structs, plan) in cases.items():
        calls.clear()
        jax.jit(fn).trace(*structs).lower(lowering_platforms=("cuda",))
        [call] = calls
        out[name] = dict(kernel=call["kernel"], params=[p[0] for p in call["params"]],
                         jax_triton=mix(call["ptx"]),
                         torch=mix(torch_like_ptx(mod.native_kernel(), plan, "*bf16",
                                                  cfg.num_warps, cfg.num_stages)))
    print("RESULT" + json.dumps(out))
    """
)


def _async_16(ops: dict[str, int]) -> int:
    return sum(v for op, v in ops.items() if op.startswith("cp.async") and op.endswith(" 16B"))


def test_jax_triton_compiles_the_torch_launch_ptx() -> None:
    """On a CPU, through jax_triton 0.3.1's own compile path: only pointers are runtime arguments,
    the native kernel is called, and its PTX has the torch launch's 16-byte asynchronous copies
    (the runtime-scalar call had none: no vectorised, pipelined loads) and its wgmma."""
    result = run_script(_PTX_SCRIPT, needs_jax_triton_wheel(), cache="unset")
    for family in ("linear_act", "gated"):
        got, kernel = result[family], f"_{family}_fwd_kernel"
        assert got["kernel"] == kernel, got["kernel"]
        assert set(got["params"]) == {"array"}, got["params"]  # shapes and strides are constants
        jt, native = got["jax_triton"], got["torch"]
        assert _async_16(native) > 0, native
        assert _async_16(jt) == _async_16(native), (jt, native)
        wgmma = {op: v for op, v in native.items() if op.startswith("wgmma")}
        assert wgmma and {op: jt.get(op, 0) for op in wgmma} == wgmma, (jt, native)


@pytest.mark.gpu
def test_jax_triton_real_compile_ptx_and_bits(tmp_path: Path, monkeypatch) -> None:
    """On the H200: the real jax_triton compile (its PTX dumped) has the 16-byte asynchronous
    copies of the native kernel specialised as the torch launch specialises it, and the two
    launches give the same bits."""
    if importlib.util.find_spec("jax_triton") is None:
        pytest.skip("jax_triton wheel not installed (.wheels/)")
    from fusedmlp.jax_impl.cross.linear_act import import_jax_triton

    jt = import_jax_triton()  # puts back the TRITON_CACHE_DIR its import clears
    import jax.numpy as jnp
    import torch

    from fusedmlp.common import TileConfig
    from fusedmlp.jax_impl.cross import linear_act as jl
    from fusedmlp.torch_impl import linear_act as tla

    monkeypatch.setattr(jt.triton_lib, "_JAX_TRITON_DUMP_DIR", str(tmp_path))
    cfg = TileConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=3)
    m, k, n = 512, 1024, 768
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    tx, tw = (torch.from_numpy(a).to("cuda", torch.bfloat16) for a in (x, w))
    jx, jw = (jnp.asarray(t.float().cpu().numpy(), jnp.bfloat16) for t in (tx, tw))
    y_jax = jl.linear_act_fwd(jx, jw, None, None, activation="silu", config=cfg)
    y_torch = tla.linear_act_fwd(tx, tw, None, None, activation="silu", config=cfg)
    torch.cuda.synchronize()
    assert np.array_equal(np.asarray(y_jax.astype(jnp.float32)), y_torch.float().cpu().numpy())
    [ptx_file] = list(tmp_path.glob("*/*.ptx"))
    jt_async = ptx_file.read_text().count("cp.async.cg.shared.global")
    plan = jl.launch_plan(
        m, n, k, activation="silu", has_bias=False, has_residual=False, config=cfg
    )
    ptx = torch_like_ptx(jl.native_kernel(), plan, "*bf16", cfg.num_warps, cfg.num_stages)
    torch_async = ptx.count("cp.async.cg.shared.global")
    assert jt_async > 0 and jt_async == torch_async, (jt_async, torch_async)


# ---- torch:mosaic plumbing (CPU: a stand-in kernel) ----------------------------------------------
def test_mosaic_compiled_callable_is_cached_per_shape(monkeypatch) -> None:
    import torch

    from fusedmlp.common import TileConfig
    from fusedmlp.torch_impl.cross import linear_act as tl_

    compiled = []

    def fake_compile(fn, operands):
        compiled.append(tuple(tuple(t.shape) for t in operands))
        return lambda *ops: ops[0][:, : ops[1].shape[1]] * 0 + 1

    monkeypatch.setattr(tl_, "_compile", fake_compile)
    monkeypatch.setattr(tl_, "_COMPILED", {})
    cfg = TileConfig(64, 64, 64, group_m=8, num_warps=4, num_stages=2)
    key = ("linear_act", "silu", False, False, cfg)
    x, w = torch.zeros(70, 64), torch.zeros(64, 64)
    for _ in range(3):
        kernel = tl_.compiled_kernel(key, lambda: None, [x, w])
    assert len(compiled) == 1 and kernel is tl_.compiled_kernel(key, lambda: None, [x, w])
    tl_.compiled_kernel(key, lambda: None, [torch.zeros(71, 64), w])
    assert len(compiled) == 2  # a new shape compiles once more
    # inside a CUDA graph capture a new shape is refused before anything compiles (a compile and
    # a module load cannot be recorded); a compiled one is looked up as ever
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match=r"not yet compiled .*\(72, 64\).*once before the"):
        tl_.compiled_kernel(key, lambda: None, [torch.zeros(72, 64), w])
    assert len(compiled) == 2
    assert tl_.compiled_kernel(key, lambda: None, [x, w]) is kernel


def test_direct_kernel_passes_pointers_in_the_kernels_order() -> None:
    """torch's direct launch (torch_impl/cross/launcher.py) hands the plugin's launch function the
    kernel operands' pointers in the kernel's order (the grouped launch interleaves its products'),
    then its outputs' — fresh tensors of the plan's shapes and dtypes on the operands' device, or
    the operand an output aliases — on the stream it is given, and returns what the traced
    function returns, in the function's order."""
    import torch

    from fusedmlp.torch_impl.cross.launcher import DirectKernel, KernelPlan, Output

    calls = []
    plan = KernelPlan(
        module_asm=b"",
        operand_order=(0, 2, 1, 3),
        outputs=(Output((5, 3), torch.bfloat16), Output((2, 2), torch.float32, alias=3)),
        returned=(1, 0),
        single=False,
    )
    kernel = DirectKernel(plan, "function", lambda *args: calls.append(args))
    ops = [torch.zeros(2, 4), torch.ones(3), torch.zeros(7, dtype=torch.float16), torch.zeros(2, 2)]
    first, second = kernel(*ops, stream=1234)
    assert first is ops[3]  # the aliased output, returned first as the function does
    assert second.shape == (5, 3) and second.dtype == torch.bfloat16
    [(function, stream, pointers)] = calls
    assert (function, stream) == ("function", 1234)
    want = [ops[i].data_ptr() for i in (0, 2, 1, 3)] + [second.data_ptr(), ops[3].data_ptr()]
    assert list(pointers) == want
    plan_one = KernelPlan(b"", (0,), (Output((4,), torch.float16),), (0,), single=True)
    out = DirectKernel(plan_one, "f", lambda *args: None)(torch.zeros(4), stream=0)
    assert isinstance(out, torch.Tensor) and out.shape == (4,) and out.dtype == torch.float16
