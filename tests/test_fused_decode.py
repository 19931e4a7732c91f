"""fused_decode (both stacks) against the float64 reference, params in the packed layout.

Every activation x dtype x bias at the golden odd widths; M in {0, 1, 37, 64}; odd widths whose
hidden is not a multiple of 64 (the packed gated blocks end in zero padding); pinned configs (no
split, a split capped by the hidden, 16-wide hidden blocks, a TileConfig); NaN propagation;
bit-identical repeats and twins; the default tiles' arithmetic; an sm_90 compile of the default
configs (shared memory, registers, 16-byte cp.async, wgmma at M = 64) on this CPU.
"""

from __future__ import annotations

import json
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest

from fusedmlp.common import get_preset, reference
from fusedmlp.common.config import TileConfig
from fusedmlp.common.packing import pack_params
from fusedmlp.common.params import init_params, make_input
from fusedmlp.common.spec import MLPSpec
from fusedmlp.common.tiling import (
    NUM_SMS,
    SMEM_PER_SM,
    DecodeConfig,
    decode_config_for,
    decode_smem_bytes,
    decode_splits,
    fused_decode_config,
)
from fusedmlp.common.tolerance import assert_close
from helpers import (
    WholeMLPTests,
    WholeStack,
    lower_whole_mlp,
    needs_jax_0_10_lowering,
    run_script,
    to_numpy,
    whole_stack_fixture,
    widths_id,
)

# Interpreter config (common/tiling.py): BLOCK_H=32, BLOCK_K=16, BLOCK_N=32, BLOCK_K2=16, split 2
# -> hidden 75 is 3 up programs (the third in the second packed block), d_in 19 is 2 K chunks,
# d_out 33 is 2 down tiles (one ragged), the hidden's 5 chunks split 3 + 2.
ODD_WIDTHS = (19, 75, 33)
# REDUCE_BLOCK_N is not among the shared constants: the reduce launch's column tile was measured
# per stack (test_reduce_tiles_per_stack; the twins' bits do not depend on it)
PUBLIC_NAMES = ("supports", "fused_decode_fwd", "fused_decode", "MAX_M", "REDUCE_BLOCK_M")
LLAMA = MLPSpec((4096, 14336, 4096), "swiglu", False, "bfloat16")


stack = whole_stack_fixture("fused_decode")


class TestShared(WholeMLPTests):
    # the golden shapes (the base's): hidden 67 is 3 up programs, d_in 33 is 3 K chunks
    family = "fused_decode"
    public_names = PUBLIC_NAMES
    odd_widths = ODD_WIDTHS
    nan_case = ("float32", 5, 2, 7)
    twin_m = 11
    twin_cases = tuple(
        (ODD_WIDTHS, activation, dtype)
        for activation, dtype in (
            ("relu", "float32"),
            ("relu", "float16"),
            ("relu", "bfloat16"),
            ("swiglu", "float16"),
            ("geglu_tanh", "bfloat16"),
        )
    )


@pytest.mark.parametrize("m", [0, 1, 37, 64])
def test_rows(stack, m):
    stack.check(MLPSpec(ODD_WIDTHS, "swiglu", True, "bfloat16"), m, seed=m)


@pytest.mark.parametrize(
    "widths, activation, dtype",
    [
        ((64, 128, 32), "gelu", "float16"),
        ((16, 16, 16), "relu", "float32"),
        ((128, 96, 7), "geglu_tanh", "bfloat16"),
        ((40, 200, 70), "swiglu", "float16"),
    ],
    ids=widths_id,
)
def test_widths(stack, widths, activation, dtype):
    stack.check(MLPSpec(widths, activation, True, dtype), 3, seed=widths[1])


def test_3d_input(stack):
    stack.check(MLPSpec(ODD_WIDTHS, "silu", True, "float32"), (2, 3), seed=9)


@pytest.mark.parametrize(
    "config",
    [
        # one hidden run: launch 2 adds b2 and stores y itself (no launch 3)
        DecodeConfig(
            block_m=32,
            block_h=16,
            block_k=32,
            block_n=32,
            block_k2=32,
            split_k=1,
            num_warps=4,
            num_stages=1,
        ),
        # more runs asked for than the hidden has chunks: capped at 5 one-chunk runs
        DecodeConfig(
            block_m=32,
            block_h=64,
            block_k=16,
            block_n=64,
            block_k2=16,
            split_k=9,
            num_warps=4,
            num_stages=1,
        ),
        # a pinned TileConfig: 32-wide blocks in both launches, the heuristic's split
        TileConfig(block_m=32, block_n=32, block_k=16, group_m=1, num_warps=4, num_stages=1),
    ],
    ids=["split1-h16", "split9-h64", "tileconfig"],
)
def test_pinned_config(stack, config):
    stack.check(MLPSpec(ODD_WIDTHS, "geglu", True, "float16"), 20, seed=4, config=config)


# A pinned block_m below M: row blocks, the fastest index of each launch's grid (the programs that
# stream one weight tile run side by side). At M = 37 three 16-row blocks, the last ragged.
ROW_BLOCKS = DecodeConfig(
    block_m=16, block_h=32, block_k=16, block_n=32, block_k2=16, split_k=2, num_warps=4,
    num_stages=1,
)  # fmt: skip


@pytest.mark.parametrize("split_k", [1, 2], ids=["y-in-launch-2", "reduce"])
def test_row_blocks(stack, split_k):
    config = DecodeConfig(**{**ROW_BLOCKS.__dict__, "split_k": split_k})
    stack.check(MLPSpec(ODD_WIDTHS, "swiglu", True, "bfloat16"), 37, seed=5, config=config)
    stack.check(MLPSpec(ODD_WIDTHS, "relu", False, "float32"), 17, seed=6, config=config)
    # a pinned TileConfig's block_m below M too (refused until row blocks existed)
    small = TileConfig(block_m=16, block_n=32, block_k=16)
    stack.check(MLPSpec(ODD_WIDTHS, "relu", True, "float32"), 17, seed=7, config=small)


def test_row_blocks_twins_bitwise():
    """Row blocks are the same algorithm in both stacks: identical bits under the interpreters."""
    spec = MLPSpec(ODD_WIDTHS, "relu", True, "float16")
    params = init_params(spec, seed=33)
    x = make_input(spec, 37, seed=34)
    outs = [WholeStack(name, "fused_decode").run(x, params, spec, config=ROW_BLOCKS)
            for name in ("torch", "jax")]  # fmt: skip
    assert outs[0].tobytes() == outs[1].tobytes()
    # a row's bits do not depend on the block it was computed in: each 16-row block alone
    for lo in (0, 16, 32):
        alone = WholeStack("torch", "fused_decode").run(x[lo : lo + 16], params, spec,
                                                        config=ROW_BLOCKS)  # fmt: skip
        assert outs[0][lo : lo + 16].tobytes() == alone.tobytes(), lo


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_deterministic(stack, dtype):
    """Every sum in a fixed order, no atomics: three runs give the same bits."""
    spec = MLPSpec(ODD_WIDTHS, "swiglu", True, dtype)
    params = init_params(spec, seed=21)
    x = make_input(spec, 7, seed=22)
    outs = [to_numpy(stack.call(x, params, spec)).tobytes() for _ in range(3)]
    assert outs[0] == outs[1] == outs[2]


def test_unsupported(stack):
    fallback = "'triton'" if stack.name == "torch" else "'pallas_triton'"
    spec = MLPSpec(ODD_WIDTHS, "relu", True, "float32")
    params = init_params(spec, seed=0)
    assert stack.mod.supports(spec, 64) is None
    with pytest.raises(NotImplementedError, match="M must be <= 64, got 65") as err:
        stack.run(make_input(spec, 65, seed=1), params, spec)
    assert fallback in str(err.value)
    deep = MLPSpec((16, 32, 32, 16), "relu", True, "float32")
    with pytest.raises(NotImplementedError, match=r"exactly 2 layers .* got 3"):
        stack.run(make_input(deep, 2, seed=1), init_params(deep, seed=0), deep)
    gated = MLPSpec(ODD_WIDTHS, "swiglu", True, "float32")
    wide = DecodeConfig(block_h=128)
    with pytest.raises(ValueError, match="block_h must divide the packed block 64, got 128"):
        stack.run(make_input(gated, 2, seed=1), init_params(gated, seed=0), gated, config=wide)


def test_validation(stack):
    spec = MLPSpec(ODD_WIDTHS, "geglu", False, "bfloat16")
    params = init_params(spec, seed=0)
    x = make_input(spec, 3, seed=1)
    packed = stack.packed(spec, params)
    with pytest.raises(ValueError, match=r"params\['wv0'\]: expected dtype"):
        bad = dict(pack_params(spec, params))
        bad["wv0"] = bad["wv0"].astype(np.float32)
        stack.mod.fused_decode(stack.array(x), {k: stack.array(v) for k, v in bad.items()}, spec)
    with pytest.raises(ValueError, match=r"params: unexpected \['b0'\]"):
        extra = dict(packed, b0=stack.array(np.zeros(75, params["w0"].dtype)))
        stack.mod.fused_decode(stack.array(x), extra, spec)
    # the contract's names (w0, v0) are not what this kernel reads: the message says how to pack
    plain = {k: stack.array(v) for k, v in params.items()}
    with pytest.raises(ValueError, match=r"missing \['wv0'\].*pack_params\(spec, params\)"):
        stack.mod.fused_decode(stack.array(x), plain, spec)


def test_reduce_tiles_per_stack():
    """Launch 3 sums each element's partials in the fixed order s = 0, 1, ... whatever its tile,
    so the stacks may take different column tiles (the H200's best: 64 in Triton, 32 in
    Pallas-Triton) and still agree bit for bit (TestShared.test_twins_bitwise runs both at their
    own tiles); each tile divides the 128-column blocks of launch 2."""
    from fusedmlp.jax_impl import fused_decode as jax_decode
    from fusedmlp.torch_impl import fused_decode as torch_decode

    assert (torch_decode.REDUCE_BLOCK_N, jax_decode.REDUCE_BLOCK_N) == (64, 32)
    assert all(128 % mod.REDUCE_BLOCK_N == 0 for mod in (torch_decode, jax_decode))


def test_default_tiles():
    """The heuristic's arithmetic (common/tiling.py) on the presets it is meant for."""
    for m in (1, 2, 4, 8, 16, 32, 64):
        cfg = fused_decode_config(LLAMA, m)
        assert cfg.block_m == max(16, 1 << (m - 1).bit_length())
        assert 64 % cfg.block_h == 0  # a gated hidden block sits in one packed pair
        assert 14336 // cfg.block_h >= NUM_SMS  # launch 1 fills the GPU
        splits, _ = decode_splits(14336, cfg.block_k2, cfg.split_k)
        # and so does launch 2: about one program an SM up to M = 16, two past it
        per_sm = 1 if m <= 16 else 2
        assert abs(4096 // cfg.block_n * splits - per_sm * NUM_SMS) <= 8 * per_sm
        # two programs per SM fit in shared memory
        assert 2 * max(decode_smem_bytes(cfg, True, 2)) <= SMEM_PER_SM - 4096
        assert cfg.num_stages >= 2
    gpt = MLPSpec((4096, 16384, 4096), "gelu_tanh", True, "bfloat16")
    assert fused_decode_config(gpt, 1).block_h == 64  # 256 programs, 128-byte rows
    # after a plain first layer, launch 2 keeps one program an SM past M = 16 too (measured)
    assert [fused_decode_config(gpt, m).split_k for m in (16, 32, 64)] == [4, 4, 4]
    assert [fused_decode_config(LLAMA, m).split_k for m in (16, 32, 64)] == [4, 8, 8]
    assert decode_splits(75, 16, 2) == (2, 3)
    assert decode_splits(75, 16, 9) == (5, 1)
    pinned = decode_config_for(TileConfig(32, 128, 32), LLAMA, 20)
    assert (pinned.block_h, pinned.block_n, pinned.block_m) == (64, 128, 32)


_COMPILE = textwrap.dedent(
    """
    import json, os, re, sys
    os.environ["TRITON_INTERPRET"] = "0"  # real Triton functions: compile for sm_90, launch nothing
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fusedmlp.common import MLPSpec
    from fusedmlp.common.packing import PACK_BLOCK
    from fusedmlp.common.tiling import decode_splits, fused_decode_config
    from fusedmlp.torch_impl import fused_decode as fd

    def compile_one(fn, types, constexprs, cfg):
        sig, attrs = {}, {}
        for i, p in enumerate(fn.params):
            if p.is_constexpr:
                sig[p.name] = "constexpr"
            else:
                sig[p.name] = types[p.name]
                if types[p.name].startswith("*") or p.name in ("D_IN", "HIDDEN", "W_COLS",
                                                               "D_OUT"):
                    attrs[(i,)] = [["tt.divisibility", 16]]
        k = triton.compile(ASTSource(fn, sig, constexprs=constexprs, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        ptx = k.asm["ptx"]
        return dict(shared=k.metadata.shared,
                    cp_async_16=len(re.findall(r"cp\\.async\\.cg\\.shared\\.global.*0x10", ptx)),
                    wgmma=len(re.findall(r"wgmma\\.mma_async", ptx)),
                    local=len(re.findall(r"\\b(ld|st)\\.local", ptx)))

    spec = MLPSpec((4096, 14336, 4096), "swiglu", False, "bfloat16")
    out = {}
    for m in json.loads(sys.argv[1]):
        cfg = fused_decode_config(spec, m)
        splits, k_iters = decode_splits(14336, cfg.block_k2, cfg.split_k)
        up = compile_one(
            fd._fused_decode_up_kernel,
            dict(x_ptr="*bf16", w_ptr="*bf16", b_ptr="*bf16", h_ptr="*bf16", M="i32", D_IN="i32",
                 HIDDEN="i32", W_COLS="i32"),
            dict(ACTIVATION="silu", GATED=True, HAS_BIAS=False, PACK=PACK_BLOCK,
                 BLOCK_M=cfg.block_m, M_BLOCKS=1, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k,
                 DOT_PRECISION="ieee", USE_PDL=True, INTERPRET=False), cfg)
        down = compile_one(
            fd._fused_decode_down_kernel,
            dict(h_ptr="*bf16", w_ptr="*bf16", b_ptr="*bf16", out_ptr="*fp32", M="i32",
                 HIDDEN="i32", D_OUT="i32"),
            dict(HAS_BIAS=False, BLOCK_M=cfg.block_m, M_BLOCKS=1, BLOCK_N=cfg.block_n,
                 BLOCK_K=cfg.block_k2,
                 K_ITERS=k_iters, SPLIT_K=splits, DOT_PRECISION="ieee", USE_PDL=True,
                 INTERPRET=False), cfg)
        out[m] = dict(up=up, down=down)
    print("RESULT" + json.dumps(out))
    """
)


def test_sm90_compile_default_configs():
    """llama3-8b's default tiles compile for the H200 here: two programs' shared memory per SM,
    no local-memory spills, 16-byte cp.async weight loads, wgmma where M = 64."""
    ms = [1, 32, 64]
    result = run_script(_COMPILE, json.dumps(ms), cache="cold")  # really compiled here
    for m in ms:
        for launch, info in result[str(m)].items():
            assert 2 * (info["shared"] + 1024) <= SMEM_PER_SM, (m, launch, info)
            assert info["local"] == 0, (m, launch, info)
            assert info["cp_async_16"] > 0, (m, launch, info)
            assert (info["wgmma"] > 0) == (m == 64), (m, launch, info)


@pytest.mark.parametrize("split_k", [1, 4])
@pytest.mark.parametrize("activation, dtype", [("swiglu", "bfloat16"), ("gelu_tanh", "float32")])
def test_pallas_lowers_for_cuda(activation, dtype, split_k):
    """The Pallas twin's launches (with and without the reduce launch) lower for CUDA on this CPU
    (jax 0.10.2; jax 0.11 asks for a GPU description, tests/test_gpu_lowering.py)."""
    from fusedmlp.jax_impl import fused_decode as mod

    needs_jax_0_10_lowering()
    spec = MLPSpec((200, 300, 136), activation, True, dtype)
    config = DecodeConfig(**{**fused_decode_config(spec, 16).__dict__, "split_k": split_k})
    text = lower_whole_mlp(mod.fused_decode_fwd, spec, 16, config=config)
    assert "fused_decode_up" in text and "fused_decode_down" in text
    assert ("fused_decode_reduce" in text) == (split_k > 1)


@pytest.mark.gpu
# Each dtype once and M's extremes, not the product: `pytest -m gpu` stays within 120 s (issue 20).
@pytest.mark.parametrize(("m", "dtype"), [(1, "bfloat16"), (16, "float16"), (64, "float32")])
def test_gpu_default_config(stack, m, dtype):
    spec = MLPSpec((1024, 2816, 1000), "swiglu", True, dtype)
    stack.check(spec, m, seed=m)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_deterministic(stack, dtype):
    """On the GPU programs finish in a different order each run; the bits must not change."""
    spec = MLPSpec((2048, 5632, 2048), "swiglu", True, dtype)
    params = init_params(spec, seed=31)
    x = make_input(spec, 64, seed=32)
    outs = [to_numpy(stack.call(x, params, spec)).tobytes() for _ in range(3)]
    assert outs[0] == outs[1] == outs[2]
    out = np.frombuffer(outs[0], np.float32).reshape(64, spec.d_out)
    assert_close(out, reference.forward(spec, x, params), spec)


@pytest.mark.gpu
def test_gpu_pdl():
    """torch only: the programmatic-dependent-launch variant gives the same bits."""
    stack = WholeStack("torch", "fused_decode")
    spec = MLPSpec((2048, 5632, 2048), "swiglu", False, "bfloat16")
    params = init_params(spec, seed=41)
    x = make_input(spec, 16, seed=42)
    base = fused_decode_config(spec, 16)
    pdl = DecodeConfig(**{**base.__dict__, "pdl": True})
    a = to_numpy(stack.call(x, params, spec, config=base))
    b = to_numpy(stack.call(x, params, spec, config=pdl))
    assert a.tobytes() == b.tobytes()


@pytest.mark.gpu
def test_gpu_row_blocks(stack):
    """M = 64 as two 32-row blocks (the M = 32 tiles pinned: bench/decode_rows_probe.py's variant)
    on the GPU's compiled kernels: within the policy of the float64 reference, and each output
    row's bits those of the single-block run of its own 32 rows (a row's dot products are the
    same operations in either: the block only decides which program computes it)."""
    spec = MLPSpec((2048, 5632, 2048), "swiglu", True, "bfloat16")
    params = init_params(spec, seed=51)
    x = make_input(spec, 64, seed=52)
    halves = fused_decode_config(spec, 32)
    rows = to_numpy(stack.call(x, params, spec, config=halves))
    assert_close(rows, reference.forward(spec, x, params), spec)
    for lo in (0, 32):
        alone = to_numpy(stack.call(x[lo : lo + 32], params, spec, config=halves))
        assert rows[lo : lo + 32].tobytes() == alone.tobytes(), lo


def test_sweep_script_dry_run(tmp_path):
    """bench/sweep_decode.py (the lead's one H200 call) runs end to end on this CPU: tiny shapes,
    kernels interpreted, every row checked against the reference, JSON written."""
    from fusedmlp.bench import sweep_decode

    out = tmp_path / "sweep.json"
    assert sweep_decode.main([str(out), "--dry-run", "--sections", "llama,nerf"]) == 0
    data = json.loads(out.read_text())
    providers = {r["provider"] for r in data["rows"]}
    assert providers == {
        "torch:fused_decode",
        "torch:eager",
        "jax:fused_decode",
        "jax:xla",
        "torch:fused_small",
        "jax:fused_small",
    }
    assert all(r["check"]["passed"] for r in data["rows"]), [r.get("error") for r in data["rows"]]
    assert data["dry_run"] and data["ceilings"]["copy_TBps"] > 0


def test_sweep_small_variants_dry_run(tmp_path):
    """The small-variants section on a named cell, each config through both stacks: the default
    row first, every row checked against the reference; an unknown cell is refused by name."""
    from fusedmlp.bench import sweep_decode

    out = tmp_path / "variants.json"
    cells = "16x2,16x3:swiglu:bias:bfloat16"
    argv = [str(out), "--dry-run", "--sections", "small-variants", "--small-cells", cells]
    assert sweep_decode.main([*argv, "--jax-variants", "--variants", "default,previous"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["variant"], r["provider"]) for r in rows[:4]] == [
        ("default", "torch:fused_small"),
        ("default", "jax:fused_small"),
        ("previous", "torch:fused_small"),
        ("previous", "jax:fused_small"),
    ]
    assert len(rows) == 8 and "swiglu" in rows[4]["case"]
    assert all(r["check"]["passed"] for r in rows), [r.get("error") for r in rows]
    with pytest.raises(SystemExit):
        sweep_decode.main([str(out), "--dry-run", "--small-cells", "16by2"])
    with pytest.raises(ValueError, match="bias or nobias"):
        sweep_decode.narrow_cell("16x2:relu:yes:float16")


def test_rows_probe_smoke(tmp_path):
    """bench/decode_rows_probe.py --smoke: every variant, row blocks at M = 64 included, runs on
    this CPU (interpreted) and meets torch eager within the policy's bf16 relative bound (the
    kernels' own checks against float64 are the tests above)."""
    from fusedmlp.bench import decode_rows_probe
    from fusedmlp.common.tolerance import bounds

    out = tmp_path / "rows.json"
    assert decode_rows_probe.main([str(out), "--smoke"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["m"] for r in rows] == [64, 64, 64, 64, 32, 16]
    assert "m32 " in rows[2]["config"] and "m16 " in rows[3]["config"]
    limit = bounds(MLPSpec((64, 128, 64), "swiglu", False, "bfloat16")).rel_fro
    for row in rows:
        assert "error" not in row and row["rel_err_vs_eager"] <= limit, row


def test_launch_probe_smoke(tmp_path):
    """bench/decode_launch_probe.py --smoke: both stacks' fused_decode at the presets' activation,
    gating and dtype (interpreter sizes) run on this CPU and meet eager / XLA within the policy's
    relative bound (the kernels' own checks against float64 are the tests above)."""
    from fusedmlp.bench import decode_launch_probe
    from fusedmlp.common.tolerance import bounds

    out = tmp_path / "launches.json"
    cases = "llama3-8b:16,gpt-mlp:64"
    assert decode_launch_probe.main([str(out), "--smoke", "--cases", cases]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["case"], r["stack"]) for r in rows] == [
        ("llama3-8b:16", "torch"), ("llama3-8b:16", "jax"),
        ("gpt-mlp:64", "torch"), ("gpt-mlp:64", "jax"),
    ]  # fmt: skip
    limit = bounds(MLPSpec((64, 96, 48), "swiglu", False, "bfloat16")).rel_fro
    for row in rows:
        assert "error" not in row and row["rel_err_vs_baseline"] <= limit, row


def test_launch_probe_same_bytes_row():
    """The probe's `PRESET:weights` row (GPU only in the probe) on this CPU with a stand-in
    timer: hf-blog-geglu's weight bytes (gate|up 768 x 2·3072 and down 3072 x 768, bf16), each
    move timed once, its rate over the bytes it moves (the copy both ways)."""
    import torch

    from fusedmlp.bench import decode_launch_probe
    from fusedmlp.bench.timing import Stats

    calls = []

    def timer(stack, fn, n, wait, count_copies=False):
        calls.append(count_copies)
        fn(0)
        stats = Stats.of([8e-6] * 3, "stand-in")
        return SimpleNamespace(device=stats, kernel_names=("k",))

    spec = get_preset("hf-blog-geglu").spec
    row = decode_launch_probe._same_bytes_row("hf", spec, torch, timer, lambda: None, "cpu")
    assert row["bytes"] == 2 * (768 * 2 * 3072 + 3072 * 768) == 14_155_776
    assert calls == [False, True]
    assert row["read_us"] == row["copy_us"] == 8.0
    assert row["read_tbps"] == pytest.approx(14_155_776 / 8e-6 / 1e12, abs=1e-3)
    assert row["copy_tbps"] == pytest.approx(2 * 14_155_776 / 8e-6 / 1e12, abs=1e-3)
    assert row["read_kernels"] == ["k"]
