"""The tiling of the per-layer kernels: the shared-memory model (common/tiling.py `smem_bytes`)
against the sm_90 compiler on this CPU, the heuristics, the search space, the committed tables.

Triton compiles for sm_90 without a GPU (`triton.compile(ASTSource(...), target=GPUTarget("cuda",
90, 32))`): the compiled kernel's `metadata.shared` is the shared memory a block asks for, and ptxas
(shipped with Triton) reports registers and spills. One subprocess (TRITON_INTERPRET=0) compiles
the project's own kernels, specialised as the launchers specialise them (unit strides constexpr,
absent pointers None), for

- MODEL_CASES: configs that fit in 227 KB and configs that do not (the compiler's count passes the
  limit; a launch would raise OutOfResources), both kernel kinds (persistent TMA and portable
  pointer kernels), both families, 16-bit, tf32 and FMA float32, a residual, warp specialisation;
  the model must never undercount, must overcount the wgmma path by at most 1 KB, and must give the
  compiler's verdict on fitting;
- DEFAULT_CASES: the default config of every path the dispatcher takes on an H200 (large M,
  M = 512, decode-sized M, float32 ieee and tf32; the rules here, the committed table on a GPU
  that has one): it fits, ptxas reports no spills, and the PTX has TMA copies (persistent
  kernels) and wgmma (16-bit and tf32 tiles of 64 rows or more).

About 30 s on one core; it runs in CI (a GPU compile error or a config that cannot launch must not
wait for the GPU). The rest needs no compiler: the heuristics' tile choices, the search space
(pruned by the model, with the Hopper knobs), and the committed tuned table (common/tuned/: exact
key, nearest M bucket, a GPU variant's name, the off switch, heuristic_config's preference on a
registered GPU).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import pytest

from fusedmlp.common import TileConfig, tuning
from fusedmlp.common.tiling import (
    INTERPRET_CONFIG_GATED,
    SMEM_LIMIT,
    fits,
    gated_config,
    heuristic_config,
    search_space,
    smem_bytes,
    uses_wgmma,
    warp_specialize_applies,
)
from helpers import run_script

WGMMA_SLACK = 1024  # bytes the model may overcount on the wgmma path


def _cfg(bm, bn, bk, w, s, sub=1, ws=False) -> TileConfig:
    return TileConfig(
        bm, bn, bk, group_m=8, num_warps=w, num_stages=s, epilogue_subtile=sub, warp_specialize=ws
    )


LIN, GATED = "linear_act", "gated"
BF16, F16, F32 = "bfloat16", "float16", "float32"


def _case(name, family, dtype, cfg, precision="ieee", res=False) -> tuple:
    """One compile case, (name, family, persistent, dtype, fp32_precision, residual, config): a
    persistent TMA kernel where the name starts with "tma-", else the portable one; `res`: with
    a residual."""
    return name, family, name.startswith("tma-"), dtype, precision, res, cfg


MODEL_CASES = [
    _case("tma-linear-128x256-s4-sub2", LIN, BF16, _cfg(128, 256, 64, 8, 4, 2)),
    # 257 KB: does not fit
    _case("tma-linear-128x256-s4-whole-epilogue", LIN, BF16, _cfg(128, 256, 64, 8, 4, 1)),
    _case("tma-linear-128x256-s3-sub2-residual", LIN, F16, _cfg(128, 256, 64, 8, 3, 2), res=True),
    # the residual's slice pushes it past 227 KB
    _case("tma-linear-128x256-s4-sub2-residual", LIN, BF16, _cfg(128, 256, 64, 8, 4, 2), res=True),
    _case("tma-linear-128x128-s4-ws", LIN, BF16, _cfg(128, 128, 64, 4, 4, 1, ws=True)),
    _case("tma-gated-128x128-s4-sub2", GATED, BF16, _cfg(128, 128, 64, 8, 4, 2)),
    _case("tma-gated-128x128-s4-whole-epilogue", GATED, F16, _cfg(128, 128, 64, 8, 4, 1)),
    # 257 KB: does not fit
    _case("tma-gated-256x128-s3", GATED, BF16, _cfg(256, 128, 64, 8, 3, 1)),
    # tf32: the TMA kernels' operands rounded in memory (the front's path); the pointer kernels'
    # in registers (torch_impl/tf32.py), one A buffer fewer
    _case("tma-linear-tf32-128x128x32-s3", LIN, F32, _cfg(128, 128, 32, 8, 3, 1), precision="tf32"),
    _case("tma-gated-tf32-64x64x32-s4", GATED, F32, _cfg(64, 64, 32, 4, 4, 1), precision="tf32"),
    _case("portable-linear-tf32-128x128-s3", LIN, F32, _cfg(128, 128, 32, 8, 3), precision="tf32"),
    _case("portable-gated-tf32-64x64x32-s4", GATED, F32, _cfg(64, 64, 32, 4, 4), precision="tf32"),
    # mma.sync, not wgmma: an upper bound
    _case("tma-gated-decode-16x64x128-s4", GATED, BF16, _cfg(16, 64, 128, 4, 4, 1)),
    _case("portable-linear-128x256-s4", LIN, BF16, _cfg(128, 256, 64, 8, 4)),
    _case("portable-gated-128x128-s4", GATED, F16, _cfg(128, 128, 64, 8, 4)),
    # 256 KB: does not fit
    _case("portable-gated-256x128-s4", GATED, BF16, _cfg(256, 128, 64, 8, 4)),
    # FMA: num_stages - 1 buffers
    _case("portable-linear-fp32-ieee-128x128x32-s3", LIN, F32, _cfg(128, 128, 32, 8, 3)),
]

# The heuristic's choices for the paths the dispatcher takes on an H200:
# (name, family, persistent, m, n, k, dtype, fp32_precision)
DEFAULT_SHAPES = [
    ("llama3-8b gate/up", "gated", 8192, 14336, 4096, "bfloat16", "ieee"),
    ("llama3-8b down", "linear_act", 8192, 4096, 14336, "bfloat16", "ieee"),
    ("hf-blog gate/up", "gated", 8192, 3072, 768, "float16", "ieee"),
    ("hf-blog down", "linear_act", 8192, 768, 3072, "bfloat16", "ieee"),
    ("M=512 gate/up", "gated", 512, 14336, 4096, "bfloat16", "ieee"),
    ("decode gate/up", "gated", 16, 14336, 4096, "bfloat16", "ieee"),
    ("fp32 tf32 gated", "gated", 2048, 4096, 1024, "float32", "tf32"),
    ("fp32 ieee linear", "linear_act", 2048, 4096, 1024, "float32", "ieee"),
]
DEFAULT_CASES = [
    (
        f"{'tma' if persistent else 'portable'} {name}",
        family,
        persistent,
        dtype,
        precision,
        False,
        heuristic_config(family, m, n, k, dtype, persistent=persistent, fp32_precision=precision),
    )
    for name, family, m, n, k, dtype, precision in DEFAULT_SHAPES
    for persistent in (True, False)
    if persistent or name.startswith(("llama", "fp32"))
]

_SCRIPT = r"""
import json, os, re, subprocess, sys, tempfile
os.environ["TRITON_INTERPRET"] = "0"  # real Triton functions: compile for sm_90, launch nothing
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fusedmlp.common import TileConfig
from fusedmlp.common.tiling import warp_specialize_applies
from fusedmlp.torch_impl import gated as pg, linear_act as pl
from fusedmlp.torch_impl.tma import gated as tg, linear_act as tl_

PTR = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}
PTXAS = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "ptxas")

def compile_one(family, persistent, dtype, precision, residual, cfg):
    const = dict(ACTIVATION="silu", HAS_BIAS=True, INPUT_PRECISION=precision, INTERPRET=False,
                 BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                 GROUP_M=cfg.group_m)
    if persistent:
        ws = warp_specialize_applies(family, cfg)
        const.update(SUBTILE=cfg.epilogue_subtile, FLATTEN=not ws, WARP_SPECIALIZE=ws)
        fn = tg._gated_fwd_kernel if family == "gated" else tl_._linear_act_fwd_kernel
        if family == "gated":
            const.update(STORE_PREACT=False, Z_SUBTILE=1, z_ptr=None, WV_KMAJOR=False,
                         OPERANDS_TF32_EXACT=precision == "tf32", OUT_TF32=False)
    else:  # the launch specialises unit strides to constexpr 1
        fn = pg._gated_fwd_kernel if family == "gated" else pl._linear_act_fwd_kernel
        const.update(stride_xk=1, stride_on=1)
        const.update(stride_wvn=1) if family == "gated" else const.update(stride_wn=1)
    if family == "linear_act":
        const["HAS_RESIDUAL"] = residual
        if residual and not persistent:
            const["stride_rn"] = 1
        if not residual:
            const["r_ptr"] = None
        if persistent:
            const["W_KMAJOR"] = const["X_KMAJOR"] = False
            const["OPERANDS_TF32_EXACT"] = precision == "tf32"  # the front's rounded operands
            const["OUT_TF32"] = False
            const.update(EPILOGUE="none", DACT_ACTIVATION="identity", z_ptr=None)
    sig, attrs = {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr or p.name in const:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name], attrs[(i,)] = PTR[dtype], [["tt.divisibility", 16]]
        else:
            sig[p.name], attrs[(i,)] = "i32", [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn, sig, constexprs=const, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    ptx = k.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    info = subprocess.run([PTXAS, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                          capture_output=True, text=True)
    os.unlink(f.name)
    log = info.stdout + info.stderr
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill stores", log)]
    regs = [int(v) for v in re.findall(r"Used (\d+) registers", log)]
    return dict(shared=k.metadata.shared, warps=k.metadata.num_warps, spills=spills, regs=regs,
                wgmma="wgmma" in ptx, tma="cp.async.bulk.tensor" in ptx,
                ptxas_ok=not info.returncode)

out = {}
for name, family, persistent, dtype, precision, residual, cfg in json.loads(sys.argv[1]):
    try:
        out[name] = compile_one(family, persistent, dtype, precision, residual,
                                TileConfig.from_dict(cfg))
    except Exception as exc:  # reported by the case's own test
        out[name] = {"error": f"{type(exc).__name__}: {str(exc).strip()[:300]}"}
print("RESULT" + json.dumps(out))
"""


@functools.cache
def compiled() -> dict[str, Any]:
    cases = [
        (n, f, p, d, pr, r, c.to_dict()) for n, f, p, d, pr, r, c in MODEL_CASES + DEFAULT_CASES
    ]
    return run_script(_SCRIPT, json.dumps(cases), timeout=900)


def _result(name: str) -> dict[str, Any]:
    got = compiled()[name]
    if "error" in got:
        raise AssertionError(f"{name}: Triton could not compile it for sm_90: {got['error']}")
    return got


@pytest.mark.parametrize(
    "name,family,persistent,dtype,precision,residual,config",
    MODEL_CASES,
    ids=[c[0] for c in MODEL_CASES],
)
def test_model_matches_the_compiler(name, family, persistent, dtype, precision, residual, config):
    got = _result(name)["shared"]
    model = smem_bytes(
        family, config, dtype, persistent=persistent, fp32_precision=precision, residual=residual
    )
    assert model >= got, f"{name}: the model undercounts: {model} < {got} bytes"
    if uses_wgmma(config, dtype, precision):
        assert model - got <= WGMMA_SLACK, f"{name}: model {model}, compiler {got} bytes"
    assert (model <= SMEM_LIMIT) == (got <= SMEM_LIMIT), (
        f"{name}: model {model} and compiler {got} disagree on the {SMEM_LIMIT}-byte limit"
    )


def test_model_cases_include_configs_that_do_not_fit():
    over = [name for name, *_ in MODEL_CASES if _result(name)["shared"] > SMEM_LIMIT]
    assert len(over) >= 3, over


@pytest.mark.parametrize(
    "name,family,persistent,dtype,precision,residual,config",
    DEFAULT_CASES,
    ids=[c[0] for c in DEFAULT_CASES],
)
def test_default_configs_compile_for_hopper(
    name, family, persistent, dtype, precision, residual, config
):
    got = _result(name)
    assert got["ptxas_ok"], f"{name}: ptxas failed on the PTX"
    assert got["shared"] <= SMEM_LIMIT, f"{name} {config}: {got['shared']} bytes of shared memory"
    assert got["spills"] and max(got["spills"]) == 0, f"{name} {config}: spills {got['spills']}"
    assert got["wgmma"] == uses_wgmma(config, dtype, precision), f"{name} {config}: wgmma"
    if persistent:
        assert got["tma"], f"{name} {config}: no TMA copy (cp.async.bulk.tensor) in the PTX"


# ---- the heuristics, the search space, the committed tuned table (no compiler needed) -----------
def test_heuristic_tiles_follow_wave_quantisation():
    """128×256 where the last wave of 132 programs stays full; 128×128 where 128×256 would leave
    it mostly empty (hf-blog's down projection: 192 tiles = 1.45 waves vs 384 = 2.9)."""

    def hc(family, m, n, k, dtype="bfloat16", **kw):
        cfg = heuristic_config(family, m, n, k, dtype, persistent=True, **kw)
        return cfg.block_m, cfg.block_n, cfg.num_stages, cfg.epilogue_subtile

    assert hc("linear_act", 8192, 4096, 14336) == (128, 256, 4, 2)
    assert hc("gated", 8192, 14336, 4096) == (128, 128, 4, 2)
    assert hc("linear_act", 8192, 768, 3072) == (128, 128, 4, 2)
    assert hc("gated", 8192, 3072, 768) == (128, 128, 4, 2)
    assert hc("gated", 16, 14336, 4096)[:2] == (16, 64)
    assert hc("gated", 2048, 4096, 1024, "float32")[:2] == (128, 64)
    for family, m, n, k in (
        ("linear_act", 8192, 4096, 14336),
        ("gated", 8192, 14336, 4096),
        ("linear_act", 777, 1096, 520),
        ("gated", 4099, 1096, 520),
    ):
        for dtype in ("bfloat16", "float16", "float32"):
            for persistent in (True, False):
                cfg = heuristic_config(family, m, n, k, dtype, persistent=persistent)
                assert fits(family, cfg, dtype, persistent=persistent), (family, dtype, cfg)
                assert family == "linear_act" or cfg.block_n % 64 == 0


@pytest.mark.parametrize("persistent", [True, False])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("family", ["linear_act", "gated"])
def test_search_space_fits_and_has_the_hopper_knobs(family, dtype, persistent):
    for m in (16, 8192):
        space = search_space(family, m, dtype, persistent=persistent)
        assert space and len(space) == len(set(space))
        assert all(fits(family, c, dtype, persistent=persistent) for c in space)
        if family == "gated":
            assert all(c.block_n % 64 == 0 and not c.warp_specialize for c in space)
    big = search_space(family, 8192, dtype, persistent=persistent)
    if persistent:
        assert any(c.epilogue_subtile > 1 for c in big)
        assert any(c.warp_specialize for c in big) == (family == "linear_act")
        assert all(not c.warp_specialize or warp_specialize_applies(family, c) for c in big)
    else:
        assert all(c.epilogue_subtile == 1 and not c.warp_specialize for c in big)
    if family == "gated" and dtype == "bfloat16" and persistent:
        # The winner the old count pruned: the packed 128×(2·128)×64 tile at 4 stages.
        assert TileConfig(128, 128, 64, num_warps=8, num_stages=4, epilogue_subtile=2) in big


def test_warp_specialisation_applies_only_where_the_pass_takes_it():
    """`warp_specialize_applies`: the flag is honoured on a linear_act tile loop the triton 3.6
    pass takes (4 warps, a whole-tile epilogue, at most 4 stages, one program an SM) and ignored
    everywhere else, each condition on its own."""
    base = TileConfig(128, 128, 64, num_warps=4, num_stages=4, warp_specialize=True)
    assert warp_specialize_applies("linear_act", base)
    assert not warp_specialize_applies("gated", base)
    for change in (
        dict(warp_specialize=False),
        dict(epilogue_subtile=2),
        dict(num_warps=8),
        dict(block_m=32),
        dict(num_stages=5),
        dict(programs_per_sm=2),
    ):
        changed = dataclasses.replace(base, **change)
        assert not warp_specialize_applies("linear_act", changed), change


def test_gated_config_reads_narrow_block_n_as_one_pair():
    assert gated_config(TileConfig(16, 16, 16)).block_n == 64
    wide = TileConfig(128, 128, 64, num_warps=8, num_stages=4, epilogue_subtile=2)
    assert gated_config(wide) is wide


@pytest.fixture
def tuned_dir(tmp_path, monkeypatch):
    """A committed-table folder with one H200 table, and no GPU registered by the test process."""
    monkeypatch.setattr(tuning, "TUNED_DIR", tmp_path)
    monkeypatch.delenv(tuning.NO_TUNED_ENV, raising=False)
    tuning._committed_entries.cache_clear()
    tuning._committed_config.cache_clear()
    previous = tuning.registered_device()
    cfg = TileConfig(128, 128, 64, num_warps=8, num_stages=3, epilogue_subtile=2)
    key = tuning.make_key("NVIDIA H200", "triton_tma", "gated", 8192, 14336, 4096, "bfloat16")
    table = {"format": 1, "entries": {str(key): tuning.TuningRecord(cfg, 1.5).to_dict(key)}}
    (tmp_path / "nvidia-h200.json").write_text(json.dumps(table))
    yield cfg
    tuning.register_device(previous)
    tuning._committed_entries.cache_clear()
    tuning._committed_config.cache_clear()


def test_committed_table_lookup(tuned_dir, monkeypatch):
    cfg = tuned_dir
    look = functools.partial(
        tuning.committed_config,
        impl="triton_tma",
        family="gated",
        n=14336,
        k=4096,
        dtype="bfloat16",
    )
    assert look("NVIDIA H200", m=8192) == cfg
    assert look("NVIDIA H200", m=3000) == cfg  # the nearest measured bucket (8192 for 4096)
    assert look("NVIDIA H200 NVL", m=8192) == cfg  # a variant's name finds the family's file
    assert look("NVIDIA H100 80GB HBM3", m=8192) is None  # no table for that GPU
    assert (
        tuning.committed_config("NVIDIA H200", "triton_tma", "gated", 8192, 4096, 4096, "bfloat16")
        is None
    )  # another layer shape
    assert (
        tuning.committed_config("NVIDIA H200", "triton", "gated", 8192, 14336, 4096, "bfloat16")
        is None
    )  # another impl
    monkeypatch.setenv(tuning.NO_TUNED_ENV, "1")
    assert look("NVIDIA H200", m=8192) is None


def test_heuristic_config_prefers_the_committed_config_on_a_registered_gpu(tuned_dir):
    cfg = tuned_dir
    args = ("gated", 8192, 14336, 4096, "bfloat16")
    rules = heuristic_config(*args, persistent=True)
    assert rules != cfg
    tuning.register_device("NVIDIA H200")
    assert heuristic_config(*args, persistent=True) == cfg
    assert heuristic_config(*args, persistent=False) == heuristic_config(
        *args, persistent=False, device="none"
    )  # the portable kernel has no table entry
    assert heuristic_config(*args, interpret=True) == INTERPRET_CONFIG_GATED  # CPU: never


def test_committed_h200_table_parses():
    """The table in the repo (empty until the H200 sweep fills it) is readable, and every entry a
    config that fits."""
    path = tuning.TUNED_DIR / "nvidia-h200.json"
    data = json.loads(path.read_text())
    assert data["format"] == tuning.FORMAT_VERSION and isinstance(data["entries"], dict)
    for entry in data["entries"].values():
        key, cfg = entry["key"], TileConfig.from_dict(entry["config"])
        assert fits(
            key["family"],
            cfg,
            key["dtype"],
            persistent=key["impl"] == "triton_tma",
            fp32_precision=key["fp32_precision"],
        )


def test_cached_backward_configs_follow_the_tables_state(tuned_dir, monkeypatch):
    # backward._heuristic caches a config per launch shape; what the committed tables answer
    # depends on FUSEDMLP_NO_TUNED and their folder too, so that state is in the cache's key.
    from fusedmlp.torch_impl import backward

    tuned, rules = tuned_dir, TileConfig(64, 64, 32)

    def heuristic(*args, **kwargs):  # stands in for the tables (the interpreter never reads them)
        return rules if tuning.tables_state()[0] else tuned

    monkeypatch.setattr(backward, "heuristic_config", heuristic)
    backward._heuristic_of.cache_clear()
    args = ("gated", 8192, 14336, 4096, "bfloat16", "ieee", False, True)
    assert backward._heuristic(*args) == tuned
    monkeypatch.setenv(tuning.NO_TUNED_ENV, "1")
    assert backward._heuristic(*args) == rules
    monkeypatch.delenv(tuning.NO_TUNED_ENV)
    assert backward._heuristic(*args) == tuned
    backward._heuristic_of.cache_clear()


def test_two_programs_per_sm_must_fit_one_sm_together():
    """`programs_per_sm` = 2 fits only where two blocks share an SM's 228 KB (1 KB each reserved);
    the persistent 16-bit search space offers those, SHORT_K_CONFIG among them."""
    import dataclasses

    from fusedmlp.common import tiling

    short = tiling.SHORT_K_CONFIG
    assert tiling.fits("linear_act", short, "bfloat16", persistent=True)
    four = dataclasses.replace(short, num_stages=4)  # 177 KB: one block fits, two do not
    assert tiling.fits("linear_act", dataclasses.replace(four, programs_per_sm=1), "bfloat16",
                       persistent=True)  # fmt: skip
    assert not tiling.fits("linear_act", four, "bfloat16", persistent=True)
    space = tiling.search_space("linear_act", 8192, "bfloat16", persistent=True)
    assert short in space
    two = [c for c in space if c.programs_per_sm == 2]
    assert two and all(
        2 * (tiling.smem_bytes("linear_act", c, "bfloat16", persistent=True) + 1024)
        <= tiling.SMEM_PER_SM
        for c in two
    )
    assert all(c.programs_per_sm == 1 for c in tiling.search_space("gated", 8192, "bfloat16",
                                                                     persistent=True))  # fmt: skip
