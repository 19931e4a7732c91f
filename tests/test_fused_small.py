"""fused_small (both stacks) against the float64 reference, params in the packed layout.

Every activation x dtype x bias at the golden odd widths; odd and standard widths, depths 1..8
(gated widths over 64 cross a packed block); M in {0, 1, 37, 300} over the interpreter's 3
persistent programs (several row tiles each, a ragged one, tiles past M); both weight paths
(hoisted before the row loop, streamed per tile through the runtime layer loop); NaN propagation;
identical bits over repeats and across the twins; the default tiles; an sm_90 compile of default
configs (time, shared memory, spills) on this CPU.

One test body per property, run on both stacks through the `stack` fixture (tokamax's shared test
base)."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

from fusedmlp.common import reference
from fusedmlp.common.config import TileConfig
from fusedmlp.common.params import init_params, make_input
from fusedmlp.common.spec import MLPSpec
from fusedmlp.common.tiling import (
    REGISTERS_PER_SM,
    SMALL_KERNELS,
    SMEM_PER_SM,
    SmallConfig,
    fused_small_config,
    fused_small_programs,
    small_config_for,
    small_smem_bytes,
)
from fusedmlp.common.tolerance import assert_close
from helpers import (
    STACKS,
    WholeMLPTests,
    WholeStack,
    lower_whole_mlp,
    needs_jax_0_10_lowering,
    run_script,
    to_torch,
    whole_stack_fixture,
    widths_id,
)

ODD_WIDTHS = (19, 45, 33, 7)
PUBLIC_NAMES = (
    "supports",
    "fused_small_fwd",
    "fused_small",
    "layer_params",
    "dot_precision",
    "WIDTHS_SUPPORTED",
    "MAX_LAYERS",
)
COMPILE_LIMIT_S = 10.0  # issue 22: every default config compiles for sm_90 within this


stack = whole_stack_fixture("fused_small")


class TestShared(WholeMLPTests):
    family = "fused_small"
    public_names = PUBLIC_NAMES
    odd_widths = ODD_WIDTHS
    nan_case = ("float16", 40, 33, 3)
    twin_m = 90
    twin_cases = (
        (ODD_WIDTHS, "relu", "float32"),
        (ODD_WIDTHS, "relu", "float16"),
        ((19, 100, 33, 7), "relu", "bfloat16"),
        ((19, 100, 33, 7), "swiglu", "float16"),
        (ODD_WIDTHS, "geglu_tanh", "bfloat16"),
    )


@pytest.mark.parametrize(
    "widths, activation, dtype",
    [
        ((16, 16), "relu", "float32"),  # depth 1: a single linear layer
        (ODD_WIDTHS, "geglu", "float32"),
        ((32, 64, 16), "swiglu", "bfloat16"),
        ((16, 32, 64, 128), "gelu", "float16"),
        ((128, 64, 32, 16, 64, 128), "geglu_tanh", "float32"),
        ((24, 16, 32, 64, 128, 128, 64, 32, 9), "silu", "bfloat16"),  # depth 8
        ((128, 100, 128, 128, 128, 128, 128, 128, 128), "geglu", "float16"),  # depth 8, width 128
    ],
    ids=widths_id,
)
def test_widths_and_depths(stack, widths, activation, dtype):
    stack.check(MLPSpec(widths, activation, True, dtype), 37, seed=len(widths))


@pytest.mark.parametrize("m", [0, 1, 37, 300])
def test_rows(stack, m):
    spec = MLPSpec(ODD_WIDTHS, "swiglu", True, "bfloat16")
    stack.check(spec, m, seed=m)


def test_3d_input(stack):
    stack.check(MLPSpec(ODD_WIDTHS, "gelu_tanh", False, "float16"), (3, 5), seed=11)


@pytest.mark.parametrize(
    "config",
    [
        # 16-row tiles: 300 rows are 19 tiles over 3 programs, 7 + 6 + 6 (two past M)
        TileConfig(block_m=16, block_n=16, block_k=16, group_m=1, num_warps=4, num_stages=1),
        # the streamed path for 16-bit weights: every tile reads them again, per layer
        SmallConfig(block_m=64, num_warps=4, num_stages=1, programs_per_sm=1, hoist=False),
        # the hoisted path for float32
        SmallConfig(block_m=32, num_warps=4, num_stages=1, programs_per_sm=2, hoist=True),
    ],
    ids=["tileconfig", "streamed", "hoisted"],
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pinned_config(stack, config, dtype):
    stack.check(MLPSpec(ODD_WIDTHS, "geglu", True, dtype), 300, seed=5, config=config)


@pytest.mark.parametrize(
    "widths, activation, dtype",
    [
        ((45, 128, 100, 17), "swiglu", "bfloat16"),  # hidden widths below WIDTH: zero padding
        ((19, 30, 24, 7), "geglu", "float16"),  # gated WIDTH 32 < the 64-column pack block
        (ODD_WIDTHS, "gelu_tanh", "float16"),
    ],
    ids=widths_id,
)
def test_streamed_twins_bitwise(widths, activation, dtype):
    """The streamed layer loop (weights read again every tile): the torch twin selects each hidden
    layer's pointer, the Pallas twin indexes the hidden layers stacked and zero-padded by its
    launcher — the same products, the same bits. 16-bit: in float32 the interpreters' products
    (NumPy's and XLA's) add in other orders before and after this change alike (silu with bias,
    1-2 ulp); test_pinned_config's streamed case checks float32 against the reference."""
    spec = MLPSpec(widths, activation, True, dtype)
    config = SmallConfig(block_m=32, num_warps=4, num_stages=1, programs_per_sm=1, hoist=False)
    params, x = init_params(spec, seed=21), make_input(spec, 70, seed=22)
    outs = [WholeStack(name, "fused_small").run(x, params, spec, config=config) for name in STACKS]
    assert outs[0].tobytes() == outs[1].tobytes()


def test_deterministic(stack):
    spec = MLPSpec(ODD_WIDTHS, "swiglu", True, "float32")
    params = init_params(spec, seed=21)
    x = make_input(spec, 100, seed=22)
    outs = [stack.run(x, params, spec).tobytes() for _ in range(2)]
    assert outs[0] == outs[1]


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_int64_offsets_same_bits(activation, monkeypatch):
    """The inference kernel's offset width (INT64_ROWS, chosen by the launcher where rows ·
    stride can pass 2^31) changes addresses only: forced int64, the same bits as int32."""
    import torch

    from fusedmlp.torch_impl import fused_small as fs
    from fusedmlp.torch_impl import launch
    from fusedmlp.torch_impl.packing import pack_params

    spec = MLPSpec(ODD_WIDTHS, activation, True, "float16")
    params = {k: torch.from_numpy(v) for k, v in init_params(spec, 7).items()}
    packed = {k: v.contiguous() for k, v in pack_params(spec, params).items()}
    x = torch.from_numpy(make_input(spec, 90, seed=8))
    launch.clear_all()
    narrow = fs.fused_small_fwd(x, packed, spec)
    key = (x.shape, x.stride(), spec, None, False)  # no TMA: ODD_WIDTHS pad to 128
    assert not fs._LAUNCHES.get(key)[0].meta["INT64_ROWS"]  # 90 rows: int32
    rule = fs._int64_offsets
    launch.clear_all()
    monkeypatch.setattr(fs, "_int64_offsets", lambda *a: True)
    try:
        wide = fs.fused_small_fwd(x, packed, spec)
        assert key in fs._LAUNCHES._records and fs._LAUNCHES.get(key)[0].meta["INT64_ROWS"]
    finally:
        launch.clear_all()
    assert narrow.numpy().tobytes() == wide.numpy().tobytes()
    # the launcher's rule: int64 once the last row's offset (plus a packed tile's columns) can
    # reach 2^31
    assert not rule(2**31 // 64 - 3, [(64, 1)], 64)
    assert rule(2**31 // 64, [(64, 1)], 64)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_tma_io_same_bits(dtype, monkeypatch):
    """The inference kernel's x and y through tensor descriptors (TMA_IO, `_tma_io`: 64 wide
    16-bit, TMA's 16-byte rule met) load and store the same tiles as its masked pointers: the same
    bits, 300 rows (a partial last tile: zero-filled rows in, clipped rows out). And the rule."""
    import torch

    from fusedmlp.torch_impl import fused_small as fs
    from fusedmlp.torch_impl import launch
    from fusedmlp.torch_impl.packing import pack_params

    spec = MLPSpec((64, 48, 64, 40), "gelu_tanh", True, dtype)  # padded to 64
    params = {k: to_torch(v) for k, v in init_params(spec, 7).items()}
    packed = {k: v.contiguous() for k, v in pack_params(spec, params).items()}
    x = to_torch(make_input(spec, 300, seed=8))
    assert fs._tma_io(spec, x)
    launch.clear_all()
    via_tma = fs.fused_small_fwd(x, packed, spec)
    assert fs._LAUNCHES.get((x.shape, x.stride(), spec, None, True))[0].meta["TMA_IO"]
    monkeypatch.setattr(fs, "_tma_io", lambda *a: False)
    try:
        via_pointers = fs.fused_small_fwd(x, packed, spec)
    finally:
        launch.clear_all()
    assert via_tma.view(torch.int16).numpy().tobytes() == (
        via_pointers.view(torch.int16).numpy().tobytes()
    )
    # the rule: the measured width, 16-bit, x on the 16-byte grid, y's rows in 16-byte units
    monkeypatch.undo()
    off_grid = torch.empty(x.numel() + 1, dtype=x.dtype)[1:].view(x.shape)
    assert not fs._tma_io(spec, off_grid)
    assert not fs._tma_io(spec, torch.empty(300, 68, dtype=x.dtype)[:, :64])  # rows of 136 B
    assert not fs._tma_io(MLPSpec((64, 64, 36), "relu", False, dtype), x)  # y rows 72 B
    assert not fs._tma_io(MLPSpec((32, 32), "relu", False, dtype), x[:, :32])
    assert not fs._tma_io(MLPSpec((64, 64), "relu", False, "float32"), x.float())


def test_unsupported(stack):
    fallback = "'triton'" if stack.name == "torch" else "'pallas_triton'"
    wide = MLPSpec((32, 256, 16), "relu", True, "float32")
    reason = stack.mod.supports(wide)
    assert reason is not None and "got 256 at widths[1]" in reason and fallback in reason
    params = init_params(wide, seed=0)
    with pytest.raises(NotImplementedError, match=r"<= 128, got 256 at widths\[1\]"):
        stack.run(make_input(wide, 4, seed=1), params, wide)
    deep = MLPSpec((16,) * 10, "relu", False, "float32")  # 9 layers
    assert "at most 8 layers, got 9" in stack.mod.supports(deep)
    assert stack.mod.supports(MLPSpec(ODD_WIDTHS, "relu", True, "float32"), 10**7) is None


def test_validation(stack):
    spec = MLPSpec(ODD_WIDTHS, "swiglu", True, "float16")
    params = init_params(spec, seed=0)
    x = make_input(spec, 5, seed=1)
    with pytest.raises(ValueError, match=r"x: expected shape \[\.\.\., 19\], got \[5, 18\]"):
        stack.run(x[:, :18], params, spec)
    with pytest.raises(ValueError, match="x: expected dtype float16 \\(the spec's\\), got float32"):
        stack.run(x.astype(np.float32), params, spec)
    packed = stack.packed(spec, params)
    with pytest.raises(ValueError, match=r"params: missing \['bc1'\]"):
        stack.mod.fused_small(stack.array(x), {k: v for k, v in packed.items() if k != "bc1"}, spec)
    bad = dict(packed, w2=packed["w2"][:, :5])
    with pytest.raises(ValueError, match=r"params\['w2'\]: expected shape \[33, 7\], got"):
        stack.mod.fused_small(stack.array(x), bad, spec)
    plain = {k: stack.array(v) for k, v in params.items()}
    with pytest.raises(ValueError, match=r"missing \['wv0', 'bc0', 'wv1', 'bc1'\].*pack_params"):
        stack.mod.fused_small(stack.array(x), plain, spec)


def test_default_tiles():
    """The heuristic (common/tiling.py): programs per SM within shared memory, the persistent
    grid, pinned TileConfigs keep their rows, warps and stages."""
    for width in (16, 32, 64, 128):
        for depth in (2, 4, 8):
            for activation, dtype in (
                ("relu", "float16"),
                ("swiglu", "bfloat16"),
                ("geglu", "float32"),
            ):
                spec = MLPSpec((width,) * (depth + 1), activation, True, dtype)
                for kernel in SMALL_KERNELS:
                    cfg = fused_small_config(spec, 1 << 20, kernel=kernel)
                    smem = small_smem_bytes(spec, cfg)
                    assert cfg.programs_per_sm * (smem + 2048) <= SMEM_PER_SM, (spec, cfg, smem)
    nerf = MLPSpec((64,) * 6, "relu", False, "float16")
    cfg = fused_small_config(nerf, 2_097_152, kernel="saving")  # the training forward's tiles
    assert cfg.hoist and cfg.programs_per_sm == 2 and cfg.block_m == 128
    assert fused_small_programs(2_097_152, cfg) == 264
    # the forward kernel alone: three programs of 64-row tiles an SM (measured faster)
    cfg = fused_small_config(nerf, 2_097_152, kernel="forward")
    assert cfg.hoist and cfg.programs_per_sm == 3 and cfg.block_m == 64
    assert fused_small_programs(2_097_152, cfg) == 396
    # 16 / 32 wide: many programs an SM; weights past the hoisting threshold that fit one program
    # (128 wide, depth 4: 128 KiB): hoisted at one program an SM (all three measured faster)
    for width, tiles in (
        (16, SmallConfig(128, 4, 3, 8, True)),
        (32, SmallConfig(64, 4, 3, 6, True)),
    ):
        spec = MLPSpec((width,) * 9, "relu", False, "float16")
        assert fused_small_config(spec, 1 << 20) == tiles
        assert fused_small_config(spec, 1 << 20, kernel="saving").programs_per_sm == 2
    # fewer where each program needs more registers: a deep gated MLP with biases keeps them all
    gated = MLPSpec((16,) * 9, "swiglu", True, "float16")
    assert fused_small_config(gated, 1 << 20) == SmallConfig(128, 4, 3, 2, True)
    wide = MLPSpec((128,) * 5, "relu", False, "float16")
    assert fused_small_config(wide, 1 << 20) == SmallConfig(64, 4, 3, 1, True)
    assert not fused_small_config(wide, 1 << 20, kernel="saving").hoist
    deeper = MLPSpec((128,) * 9, "relu", False, "float16")  # 256 KiB: streamed by two programs
    assert fused_small_config(deeper, 1 << 20) == SmallConfig(64, 4, 3, 2, False)
    # kernel A: 64-row tiles at two stages (measured faster); kernel B keeps the training tiles
    assert fused_small_config(nerf, 65_536, kernel="dgrad") == SmallConfig(64, 4, 2, 2, True)
    assert fused_small_config(nerf, 65_536, kernel="wgrad") == fused_small_config(
        nerf, 65_536, kernel="saving"
    )
    # the default is the forward kernel's: what plan() shows for fused_small
    assert fused_small_config(nerf, 2_097_152) == fused_small_config(
        nerf, 2_097_152, kernel="forward"
    )
    with pytest.raises(ValueError, match=r"kernel: expected one of .*'forward'.*got 'fwd'"):
        fused_small_config(nerf, 100, kernel="fwd")
    assert fused_small_programs(300, SmallConfig(block_m=32, programs_per_sm=1), 3) == 3
    pinned = small_config_for(TileConfig(32, 16, 16, num_warps=8, num_stages=2), nerf, 100)
    assert (pinned.block_m, pinned.num_warps, pinned.num_stages) == (32, 8, 2)


_COMPILE = textwrap.dedent(
    """
    import json, os, re, resource, subprocess, sys, tempfile, time
    os.environ["TRITON_INTERPRET"] = "0"  # real Triton functions: compile for sm_90, launch nothing
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fusedmlp.common import MLPSpec
    from fusedmlp.common.packing import PACK_BLOCK, packed_names
    from fusedmlp.common.tiling import SMALL_TMA_IO_WIDTHS, fused_small_config, padded_width
    from fusedmlp.torch_impl import fused_small as fs

    DT = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}


    def _children_cpu():
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime


    PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    out = []
    for widths, activation, bias, dtype in json.loads(sys.argv[1]):
        spec = MLPSpec(tuple(widths), activation, bias, dtype)
        cfg = fused_small_config(spec, 1 << 20, kernel="forward")
        shapes = packed_names(spec)
        w_cols = tuple(shapes[("wv" if l.gated else "w") + str(l.index)][1]
                       for l in spec.layers())
        layers = spec.num_layers
        types = dict(x_ptr=DT[dtype], w_ptrs=(DT[dtype],) * layers, b_ptrs=(DT[dtype],) * layers,
                     y_ptr=DT[dtype], M="i32", stride_xm="i32", stride_ym="i32",
                     TILES_PER_PROGRAM="i32")
        sig, attrs = {}, {}
        for i, p in enumerate(fs._fused_small_fwd_kernel.params):
            if p.is_constexpr:
                sig[p.name] = "constexpr"
                continue
            sig[p.name] = types[p.name]
            if isinstance(types[p.name], tuple):
                for j in range(layers):
                    attrs[(i, j)] = [["tt.divisibility", 16]]
            elif types[p.name].startswith("*") or p.name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        constexprs = dict(WIDTHS=spec.widths, W_COLS=w_cols, NUM_LAYERS=layers,
                          WIDTH=padded_width(max(widths)), BLOCK_M=cfg.block_m,
                          ACTIVATION=spec.base_activation, GATED=spec.gated, HAS_BIAS=bias,
                          PACK=PACK_BLOCK, HOIST=cfg.hoist, DOT_PRECISION="ieee",
                          INTERPRET=False, INT64_ROWS=False,
                          TMA_IO=padded_width(max(widths)) in SMALL_TMA_IO_WIDTHS)
        # CPU seconds (this process and its ptxas children), not wall time: a loaded machine
        # (2 cores shared by several pytest workers) stretches the wall clock, not the work.
        start = time.process_time() + _children_cpu()
        k = triton.compile(ASTSource(fs._fused_small_fwd_kernel, sig, constexprs=constexprs,
                                     attrs=attrs), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        seconds = time.process_time() + _children_cpu() - start
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.ptx")
            with open(path, "w") as f:
                f.write(k.asm["ptx"])
            info = subprocess.run([PTXAS, "-arch=sm_90a", "-v", path, "-o", path + ".o"],
                                  capture_output=True, text=True).stderr
        spill = re.search(r"(\\d+) bytes spill stores", info)
        registers = re.search(r"Used (\\d+) registers", info)
        out.append(dict(widths=widths, dtype=dtype, seconds=seconds, shared=k.metadata.shared,
                        programs_per_sm=cfg.programs_per_sm, num_warps=cfg.num_warps,
                        registers=int(registers.group(1)),
                        spill=int(spill.group(1)) if spill else None,
                        wgmma="wgmma.mma_async" in k.asm["ptx"]))
    print("RESULT" + json.dumps(out))
    """
)


def test_sm90_compile_default_configs():
    """Default configs compile for the H200 here within COMPILE_LIMIT_S CPU seconds each (ptxas
    included; the old kernel took 43 s at float32 width 128), fit their programs per SM in shared
    memory and in registers (every program of the persistent grid resident at once: one that
    waited for another to finish would add its whole row loop to the kernel's time); 16-bit ones
    use wgmma and do not spill."""
    cases = [
        ((16,) * 9, "swiglu", True, "bfloat16"),  # eight programs an SM: <= 64 registers
        ((32,) * 9, "swiglu", True, "bfloat16"),  # four (six without the gate)
        ((32,) * 3, "relu", False, "float16"),  # six
        ((64,) * 6, "relu", False, "float16"),  # nerf-64x5: relu after the rounding, on f16x2
        ((64,) * 4, "relu", False, "bfloat16"),  # relu before it (Triton's bf16 max is fp32)
        ((64, 128, 64), "swiglu", True, "float16"),  # one hidden layer, too wide to stream
        ((128,) * 9, "swiglu", True, "bfloat16"),  # the streamed path, gated, depth 8
        ((128,) * 9, "geglu", True, "float32"),
    ]  # the worst float32 case: FMA products
    # a cold Triton cache: real compile times
    # The one default known to spill: a single gated 128-wide hidden layer held on chip (132 B,
    # common/tiling.fused_small_config says why: the alternatives did not fit or lost wgmma).
    spills = {(64, 128, 64): 132}
    for info in run_script(_COMPILE, json.dumps(cases), timeout=900, cache="cold"):
        assert info["seconds"] <= COMPILE_LIMIT_S, info
        assert info["programs_per_sm"] * (info["shared"] + 1024) <= SMEM_PER_SM, info
        threads = info["programs_per_sm"] * info["num_warps"] * 32
        assert threads * info["registers"] <= REGISTERS_PER_SM, info
        if info["dtype"] != "float32":
            assert info["wgmma"], info
            assert info["spill"] == spills.get(tuple(info["widths"]), 0), info


def test_sm90_default_programs_are_resident():
    """common/tiling.small_registers against ptxas over a grid of 16-bit specs (widths 16-64 at
    depths 2 and 8, 128 at depths 2 and 4 where the weights can be hoisted, with and without bias,
    plain and gated, relu and a tanh activation): every default's programs an SM fit its 64 K
    registers at once and its shared memory, and none spills but the lone gated 128-wide hidden
    layer held on chip (common/tiling.fused_small_config says why)."""
    shapes = [(w, d) for w in (16, 32, 64) for d in (2, 8)] + [(128, 2), (128, 4)]
    cases = [
        ((width,) * (depth + 1), activation, bias, dtype)
        for width, depth in shapes
        for activation, bias, dtype in (  # each dtype, bias or none, plain and gated
            ("relu", False, "float16"),
            ("gelu_tanh", True, "bfloat16"),
            ("swiglu", True, "float16"),
        )
    ]
    spills = {((128,) * 3, "swiglu", True, "float16"): 132}  # the lone hidden layer
    infos = run_script(_COMPILE, json.dumps(cases), timeout=900, cache="cold")
    for case, info in zip(cases, infos, strict=True):
        threads = info["programs_per_sm"] * info["num_warps"] * 32
        assert threads * info["registers"] <= REGISTERS_PER_SM, (case, info)
        assert info["programs_per_sm"] * (info["shared"] + 1024) <= SMEM_PER_SM, (case, info)
        assert info["spill"] == spills.get(case, 0), (case, info)


@pytest.mark.parametrize("hoist", [True, False], ids=["hoisted", "streamed"])
@pytest.mark.parametrize("activation, dtype", [("swiglu", "bfloat16"), ("relu", "float32")])
def test_pallas_lowers_for_cuda(activation, dtype, hoist):
    """Both weight paths of the Pallas twin (the streamed one through its stacked hidden layers)
    lower for CUDA on this CPU (jax 0.10.2; jax 0.11 asks for a GPU description,
    tests/test_gpu_lowering.py)."""
    from fusedmlp.jax_impl import fused_small as mod

    needs_jax_0_10_lowering()
    spec = MLPSpec((45, 128, 100, 17), activation, True, dtype)
    config = SmallConfig(block_m=64, num_warps=4, num_stages=3, hoist=hoist)
    assert "fused_small_fwd" in lower_whole_mlp(mod.fused_small_fwd, spec, 300, config=config)


def test_pallas_float16_relu_lowers_to_the_nan_propagating_max():
    """On the GPU the Pallas twin's float16 relu is inline PTX `max.NaN.f16x2` after the rounding
    (jnp.maximum lowers to a max that drops NaN; the interpreter takes the select): lowering for
    CUDA on this CPU shows it, and only for float16."""
    from fusedmlp.jax_impl import fused_small as mod

    needs_jax_0_10_lowering()
    config = SmallConfig(block_m=64, num_warps=4, num_stages=3, hoist=True)
    for dtype, emits in (("float16", True), ("bfloat16", False)):
        spec = MLPSpec((64,) * 4, "relu", False, dtype)
        lowered = lower_whole_mlp(mod.fused_small_fwd, spec, 300, config=config)
        # the kernel is MLIR bytecode: its string table holds the instruction once, however many
        # layers carry it
        assert ("max.NaN.f16x2" in lowered) == emits, dtype


@pytest.mark.gpu
def test_gpu_float16_relu_propagates_nan(stack):
    """The float16 relu after the rounding (torch: tl.maximum with NaN propagated; JAX: inline
    max.NaN.f16x2) on the GPU, where the interpreters' NumPy max cannot stand in: a NaN row of x
    is a NaN row of y, every other row within the tolerance of the float64 reference."""
    spec = MLPSpec((64,) * 6, "relu", False, "float16")  # nerf-64x5
    params = init_params(spec, seed=41)
    x = make_input(spec, 4099, seed=42)
    x[7, 3] = np.nan
    out = stack.run(x, params, spec)
    assert np.isnan(out[7]).all() and not np.isnan(np.delete(out, 7, axis=0)).any()
    assert_close(out, reference.forward(spec, x, params), spec)


@pytest.mark.gpu
# Each dtype and width class once, not the product: `pytest -m gpu` stays within 120 s (issue 20).
@pytest.mark.parametrize(("width", "dtype"), [(16, "float16"), (64, "bfloat16"), (128, "float32")])
def test_gpu_default_config(stack, width, dtype):
    spec = MLPSpec((width, width, width, width, 3), "swiglu", True, dtype)
    stack.check(spec, 100_003, seed=width)
