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
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

_PTX_SCRIPT = textwrap.dedent(
    """
    import collections, json, os, re, sys
    os.environ["TRITON_INTERPRET"] = "0"  # real Triton functions: compile PTX, launch nothing
    sys.path.insert(0, sys.argv[1])  # the jax_triton wheel, imported from the zip
    import jax, jax.numpy as jnp
    from jax._src.lib import gpu_triton
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    calls = []

    class Kernel:  # the CUDA plugin's Triton runtime, replaced by a recorder (no GPU here)
        def __init__(self, name, num_warps, num_ctas, smem, ptx, ttir, cc):
            self.name, self.ptx = name, ptx

    class KernelCall:
        def __init__(self, kernel, g0, g1, g2, params):
            calls.append(dict(kernel=kernel.name, ptx=kernel.ptx, params=[p[0] for p in params]))

        def to_proto(self, name, metadata):
            return b"stub"

    stub = dict(TritonKernel=Kernel, TritonKernelCall=KernelCall, TritonAutotunedKernelCall=None,
                create_array_parameter=lambda zeroed, align: ["array", align],
                create_scalar_parameter=lambda value, dtype: ["scalar", value, dtype],
                get_compute_capability=lambda device: 90, get_arch_details=lambda d: "sm_90",
                get_serialized_metadata=lambda b: b, get_custom_call=lambda: None)
    for key, value in stub.items():
        setattr(gpu_triton, key, value)

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

    def torch_like(mod, plan, dtype, num_warps, num_stages):
        # The torch launcher's specialisation: 16-byte aligned pointers, ints divisible by 16
        # marked so, 1 a constant.
        native = mod.native_kernel()
        sig, attrs, constexprs = {}, {}, dict(plan.constexprs)
        for i, p in enumerate(native.params):
            if p.is_constexpr:
                sig[p.name] = "constexpr"
            elif p.name.endswith("_ptr"):
                sig[p.name], attrs[(i,)] = dtype, [["tt.divisibility", 16]]
            elif plan.scalars[p.name] == 1:
                sig[p.name], constexprs[p.name] = "constexpr", 1
            else:
                sig[p.name] = "i32"
                if plan.scalars[p.name] % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        k = triton.compile(ASTSource(native, sig, constexprs=constexprs, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=num_warps, num_stages=num_stages))
        return mix(k.asm["ptx"])

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
        out[name] = dict(kernel=call["kernel"], params=call["params"], jax_triton=mix(call["ptx"]),
                         torch=torch_like(mod, plan, "*bf16", cfg.num_warps, cfg.num_stages))
    print("RESULT" + json.dumps(out))
    """
)


def _jax_triton_wheel() -> Path | None:
    wheels = sorted((ROOT / ".wheels").glob("jax_triton-*.whl"))
    return wheels[-1] if wheels else None


def _async_16(ops: dict[str, int]) -> int:
    return sum(v for op, v in ops.items() if op.startswith("cp.async") and op.endswith(" 16B"))


def test_jax_triton_compiles_the_torch_launch_ptx() -> None:
    """On a CPU, through jax_triton 0.3.1's own compile path: only pointers are runtime arguments,
    the native kernel is called, and its PTX has the torch launch's 16-byte asynchronous copies
    (the runtime-scalar call had none: no vectorised, pipelined loads) and its wgmma."""
    wheel = _jax_triton_wheel()
    if wheel is None:
        pytest.skip("no jax_triton wheel in .wheels/: run bench/fetch_wheels.sh (needs network)")
    env = dict(os.environ, TRITON_INTERPRET="0", JAX_PLATFORMS="cpu")
    env.pop("TRITON_CACHE_DIR", None)
    proc = subprocess.run(
        [sys.executable, "-c", _PTX_SCRIPT, str(wheel)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=ROOT,
    )
    assert "RESULT" in proc.stdout, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
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
    torch_async = _torch_like_ptx(jl, m, n, k, cfg).count("cp.async.cg.shared.global")
    assert jt_async > 0 and jt_async == torch_async, (jt_async, torch_async)


def _torch_like_ptx(jl, m: int, n: int, k: int, cfg) -> str:
    """PTX of the native linear_act kernel specialised as the torch launcher specialises it
    (16-byte aligned pointers, ints divisible by 16 marked so, 1 a constant), for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    native = jl.native_kernel()
    plan = jl.launch_plan(
        m, n, k, activation="silu", has_bias=False, has_residual=False, config=cfg
    )
    sig, attrs, constexprs = {}, {}, dict(plan.constexprs)
    for i, p in enumerate(native.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name], attrs[(i,)] = "*bf16", [["tt.divisibility", 16]]
        elif plan.scalars[p.name] == 1:
            sig[p.name], constexprs[p.name] = "constexpr", 1
        else:
            sig[p.name] = "i32"
            if plan.scalars[p.name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(
        ASTSource(native, sig, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )
    return compiled.asm["ptx"]


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
