"""The GPU sweep of the Triton per-layer kernels (issue 21): one call on the H200, under 3 minutes.

    python3 bench/sweep_triton.py OUT.json [--budget-s 150] [--tuned-out PATH]

For every GEMM of llama3-8b, gpt-mlp and hf-blog-geglu at M = 8192 (and a few at M = 512, 2048):
cuBLAS on the same shape (torch.matmul, for gated the one [K, 2·Np] product the packed kernel
does), the `triton_tma` kernels over a small grid of (tile, stages, epilogue_subtile,
warp_specialize, and a K-major W for the down projections), the portable `triton` kernel at its
heuristic; float32 "ieee" and "tf32" for two GEMMs against cuBLAS under the same precision. Every
variant is checked against torch in float32 on the same inputs (the relative Frobenius error is
printed; a variant above 2e-2 in bf16 is marked bad and never chosen). Then the whole MLPs:
`triton_tma` with the best per-layer configs (packed once, launchers called directly: no front,
no per-call packing) against torch eager.

Timing: `triton.testing.do_bench` (it clears L2 with a 256 MB write before every repetition and
times each call with CUDA events), median of the repetitions; TFLOP/s count 2·M·N·K per GEMM
(gated: N = 2·n). A variant that fails to compile or launch (shared memory, registers) is recorded
with its error. A time budget (default 150 s, compiles included) stops the variant grid early; what
was measured is still written. The grid's pass only shortlists: its three fastest and the heuristic
are timed again, interleaved over three rounds, and the lowest median wins unless the heuristic is
within 2 % of it (`confirm_best`: one pass could not tell configs apart on an H100).

Output: OUT.json (environment, every row, the best config per GEMM, whole-MLP times) and the tuned
table for common/tuned/ — in common/tuning.py's format, keyed by the GPU's name — both inside
OUT.json ("tuned_table") and as a file (`--tuned-out`, default `<OUT dir>/<gpu slug>.json`, e.g.
nvidia-h200.json) that can be committed as it is. The table maps each measured (family, M bucket,
n, K) to its fastest correct config, for bfloat16 and, with the same config, float16 (same kernel,
same instruction mix; marked "measured_dtype"). The K-major variants are reported, not tabled: a
K-major W is a storage choice of the caller (packed once at load), not a TileConfig.

`--smoke`: tiny shapes under Triton's interpreter on a CPU, two variants each and wall-clock
timing, to check this script end to end without a GPU (the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import sys
import time
import traceback
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if "--smoke" in sys.argv:  # before triton is imported: the interpreter on a CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn.functional as F

from fusedmlp.common import TileConfig
from fusedmlp.common.packing import PACK_BLOCK
from fusedmlp.common.tiling import SMEM_LIMIT, fits, heuristic_config, smem_bytes
from fusedmlp.common.tuning import FORMAT_VERSION, NO_TUNED_ENV, device_slug, make_key
from fusedmlp.torch_impl import gated as portable_gated
from fusedmlp.torch_impl import linear_act as portable_linear
from fusedmlp.torch_impl.packing import pack_gated
from fusedmlp.torch_impl.runtime import INTERPRET
from fusedmlp.torch_impl.tf32 import rounded_k_major, tf32_copy
from fusedmlp.torch_impl.tma import gated as tma_gated
from fusedmlp.torch_impl.tma import linear_act as tma_linear

BAD_ERROR = {"bfloat16": 2e-2, "float16": 5e-3, "float32": 1e-4, "tf32": 5e-3}
ACT = {
    "identity": lambda z: z,
    "silu": F.silu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
}


@dataclass(frozen=True)
class Gemm:
    name: str
    family: str  # "gated" or "linear_act"
    m: int
    n: int  # output width
    k: int
    activation: str
    bias: bool
    dtype: str = "bfloat16"
    precision: str = "ieee"
    kmajor: bool = False  # also time W stored K-major (the down projections)

    def fields(self) -> dict[str, Any]:
        """What names this GEMM in a result row (every row and summary starts with these)."""
        names = ("name", "family", "m", "n", "k", "dtype", "precision")
        return {"gemm": self.label, **{f: getattr(self, f) for f in names}}

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.k * (2 * self.n if self.family == "gated" else self.n)

    @property
    def label(self) -> str:
        extra = "" if self.dtype == "bfloat16" else f" {self.dtype}"
        extra += f" {self.precision}" if self.dtype == "float32" else ""
        return f"{self.name} {self.m}x{self.n}x{self.k}{extra}"


def _c(bm, bn, bk, w=8, s=4, sub=1, ws=False, g=8, p=1) -> TileConfig:
    return TileConfig(
        bm, bn, bk, group_m=g, num_warps=w, num_stages=s, epilogue_subtile=sub, warp_specialize=ws,
        programs_per_sm=p,
    )  # fmt: skip


# The grids: the heuristic's choice first (added per shape), then what the probes and the shared
# memory model say is worth a measurement. ~5 compiled variants per family and layout.
GATED_GRID = [
    _c(128, 128, 64, s=4, sub=2),
    _c(128, 128, 64, s=4, sub=1),
    _c(128, 128, 64, s=3),
    _c(128, 64, 64, s=4),
    _c(128, 128, 64, s=4, sub=2, g=16),
    # two programs an SM at 4 warps (at most 255 registers a thread either way), one's epilogue
    # under the other's K loop: what won the short-K act' step (bench/sweep_tma_backward.py) and
    # Mosaic GPU's hf-blog GEMMs (jax_impl/mosaic/tuned_h200.json); the gated tile's accumulator
    # is twice block_n wide
    _c(128, 64, 64, w=4, s=3, p=2),
    _c(64, 64, 64, w=4, s=4, p=2),
    _c(64, 128, 64, w=4, s=2, sub=2, p=2),
]
LINEAR_GRID = [
    _c(128, 256, 64, s=4, sub=2),
    _c(128, 256, 64, s=4, sub=4),
    _c(128, 256, 64, s=3, sub=2),
    _c(128, 128, 64, s=4, sub=2),
    _c(128, 128, 64, w=4, s=4, ws=True),
    _c(128, 256, 64, w=4, s=3, ws=True),
    # two programs an SM (as GATED_GRID's)
    _c(128, 128, 64, w=4, s=3, sub=2, p=2),
    _c(64, 128, 64, w=4, s=4, sub=2, p=2),
    _c(64, 256, 64, w=4, s=2, sub=2, p=2),
    _c(128, 64, 64, w=4, s=4, p=2),
]
KMAJOR_GRID = [_c(128, 256, 64, s=4, sub=2), _c(128, 128, 64, s=4, sub=2)]
FP32_GRID = {
    "ieee": [_c(128, 128, 32, s=3), _c(64, 128, 32, w=4, s=3)],
    "tf32": [_c(128, 128, 32, s=3), _c(128, 256, 32, s=3, sub=2)],
}


def gemms(smoke: bool, only: str = "") -> list[Gemm]:
    """The GEMMs to sweep (`only`: those whose label contains one of its comma-separated parts,
    e.g. "hf-blog" or "hf-blog up 8192,hf-blog down 8192")."""
    parts = [part.strip() for part in only.split(",") if part.strip()]
    return [g for g in _all_gemms(smoke) if not parts or any(part in g.label for part in parts)]


def _all_gemms(smoke: bool) -> list[Gemm]:
    if smoke:
        return [
            Gemm("llama3-8b up", "gated", 256, 136, 64, "silu", False),
            Gemm("llama3-8b down", "linear_act", 256, 80, 136, "identity", False, kmajor=True),
            Gemm("up", "gated", 40, 72, 32, "gelu_tanh", True, "float32", "tf32"),
        ]
    out = []
    for m in (8192, 2048, 512):
        full = m == 8192
        out += [
            Gemm("llama3-8b up", "gated", m, 14336, 4096, "silu", False),
            Gemm("llama3-8b down", "linear_act", m, 4096, 14336, "identity", False, kmajor=full),
        ]
        if full:
            out += [
                Gemm("gpt-mlp up", "linear_act", m, 16384, 4096, "gelu_tanh", True),
                Gemm("gpt-mlp down", "linear_act", m, 4096, 16384, "identity", True, kmajor=True),
            ]
        if m >= 2048:
            out += [
                Gemm("hf-blog up", "gated", m, 3072, 768, "gelu_tanh", False),
                Gemm("hf-blog down", "linear_act", m, 768, 3072, "identity", False),
            ]
    out += [
        Gemm("llama3-8b up", "gated", 2048, 14336, 4096, "silu", False, "float32", p)
        for p in ("ieee", "tf32")
    ]
    out += [
        Gemm("llama3-8b down", "linear_act", 2048, 4096, 14336, "identity", False, "float32", p)
        for p in ("ieee", "tf32")
    ]
    return out


# ---- timing --------------------------------------------------------------------------------------
def bench_ms(fn: Callable[[], Any], smoke: bool) -> float:
    if smoke:
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))


@contextlib.contextmanager
def fp32_precision(precision: str) -> Iterator[None]:
    """cuBLAS float32 products as IEEE or TF32, restored afterwards (torch >= 2.9 spells it
    `fp32_precision`, older ones `allow_tf32`)."""
    matmul = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    previous = getattr(matmul, name)
    setattr(matmul, name, precision if name == "fp32_precision" else precision == "tf32")
    try:
        yield
    finally:
        setattr(matmul, name, previous)


# ---- one GEMM: operands, reference, cuBLAS, variants ---------------------------------------------
@dataclass
class Operands:
    x: torch.Tensor
    w: torch.Tensor  # gated: W (gate); linear: W
    v: torch.Tensor | None  # gated: V (up)
    b: torch.Tensor | None
    c: torch.Tensor | None
    wv: torch.Tensor | None = None  # packed once, outside every timed call
    bc: torch.Tensor | None = None
    w_kmajor: torch.Tensor | None = None  # [K, N] view of an [N, K] copy, made once
    w_tf32: torch.Tensor | None = None  # tf32: W (gated: [W|V]) K-major and rounded, made once
    ref: torch.Tensor | None = None  # float32, from torch


def make_operands(g: Gemm, device: str) -> Operands:
    gen = torch.Generator(device="cpu").manual_seed(zlib.crc32(g.label.encode()))
    dt = getattr(torch, g.dtype)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dt).to(device)

    s = g.k**-0.5
    x, w = rnd(g.m, g.k), rnd(g.k, g.n, scale=s)
    v = rnd(g.k, g.n, scale=s) if g.family == "gated" else None
    b = rnd(g.n, scale=0.1) if g.bias else None
    c = rnd(g.n, scale=0.1) if g.bias and g.family == "gated" else None
    ops = Operands(x, w, v, b, c)
    if g.family == "gated":
        ops.wv = pack_gated(w, v)
        ops.bc = pack_gated(b, c) if b is not None else None
    if g.kmajor:
        ops.w_kmajor = w.t().contiguous().t()
    with fp32_precision("ieee"):  # the reference in IEEE float32, whatever the variant's precision
        xf = x.float()
        z = xf @ w.float() + (b.float() if b is not None else 0.0)
        ref = ACT[g.activation](z)
        if v is not None:
            ref = ref * (xf @ v.float() + (c.float() if c is not None else 0.0))
    ops.ref = ref
    return ops


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def cublas_call(g: Gemm, ops: Operands) -> Callable[[], Any]:
    # The same GEMM in cuBLAS: for gated the one packed product (what the fused kernel computes
    # before its epilogue); bias and activation left out (they are the kernels' epilogue).
    w = ops.wv if g.family == "gated" else ops.w
    return lambda: ops.x @ w


def kernel_call(
    g: Gemm, ops: Operands, impl: str, cfg: TileConfig, kmajor: bool = False
) -> Callable[[], torch.Tensor]:
    kw = dict(activation=g.activation, config=cfg, fp32_precision=g.precision)
    if impl == "triton_tma" and g.precision == "tf32":
        return _tf32_front_call(g, ops, cfg)
    if g.family == "gated":
        mod = tma_gated if impl == "triton_tma" else portable_gated
        return lambda: mod.gated_fwd(ops.x, ops.wv, ops.bc, n=g.n, **kw)
    mod = tma_linear if impl == "triton_tma" else portable_linear
    w = ops.w_kmajor if kmajor else ops.w
    return lambda: mod.linear_act_fwd(ops.x, w, ops.b, None, **kw)


def _tf32_front_call(g: Gemm, ops: Operands, cfg: TileConfig) -> Callable[[], torch.Tensor]:
    """The TMA kernel under "tf32" as the front runs it (torch_impl/front.py's `_layer_steps`): W
    (gated: the packed [W|V]) K-major and rounded to tf32 once, x rounded by one pass a call (timed
    with the GEMM), every operand read as it lies (`tf32_operands_exact`). The launcher's other
    form, operands rounded in registers, serialises wgmma (bench/results/2026-12-07-h100-2d92464-
    tf32: +31-44 %) and no plan runs it, so a tile chosen on it would be chosen for the wrong
    kernel."""
    w = ops.wv if g.family == "gated" else ops.w
    if ops.w_tf32 is None:
        ops.w_tf32 = rounded_k_major(w)  # the front's copy (front._derive), made once
    kw = dict(activation=g.activation, config=cfg, fp32_precision="tf32", tf32_operands_exact=True)
    if g.family == "gated":
        return lambda: tma_gated.gated_fwd(tf32_copy(ops.x), ops.w_tf32, ops.bc, n=g.n, **kw)
    return lambda: tma_linear.linear_act_fwd(tf32_copy(ops.x), ops.w_tf32, ops.b, None, **kw)


@dataclass
class Sweep:
    smoke: bool
    deadline: float
    device_name: str
    rows: list[dict[str, Any]] = field(default_factory=list)

    def over_budget(self) -> bool:
        return time.perf_counter() > self.deadline

    def measure(
        self, g: Gemm, ops: Operands, impl: str, cfg: TileConfig | None, kmajor: bool = False
    ) -> dict[str, Any]:
        row: dict[str, Any] = dict(
            **g.fields(),
            impl=impl,
            config=cfg.to_dict() if cfg else None,
            kmajor=kmajor,
        )
        if cfg is not None:
            row["smem_model"] = smem_bytes(
                g.family, cfg, g.dtype, persistent=impl == "triton_tma", fp32_precision=g.precision
            )
        if impl != "cublas" and self.over_budget():
            row["skipped"] = "time budget"
            self.rows.append(row)
            return row
        fn = cublas_call(g, ops) if impl == "cublas" else kernel_call(g, ops, impl, cfg, kmajor)
        start = time.perf_counter()
        try:
            with fp32_precision(g.precision):
                out = fn()
                if not self.smoke:
                    torch.cuda.synchronize()
                if impl != "cublas":
                    row["rel_err"] = rel_error(out, ops.ref)
                    bound = BAD_ERROR["tf32" if g.precision == "tf32" else g.dtype]
                    row["bad"] = not row["rel_err"] <= bound
                row["compile_s"] = round(time.perf_counter() - start, 2)
                row["ms"] = bench_ms(fn, self.smoke)
        except Exception as err:  # one variant's failure (OutOfResources, a compile error) is data
            row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"
            if not self.smoke:
                torch.cuda.synchronize()
        if "ms" in row:
            row["tflops"] = g.flops / row["ms"] / 1e9
        self.rows.append(row)
        return row


# The first pass times each config once; on an H100 here the same config's time moved by up to
# 9 % within 20 s (bench/results/2026-12-07-h100-40f0116-sweep: power and clocks, not the config),
# and two sweeps minutes apart named different winners for 3 of 6 GEMMs. So the first pass only
# shortlists: its CONFIRM_TOP fastest and the heuristic are timed again, interleaved, in
# CONFIRM_ROUNDS rounds (each round's order rotated, so drift falls on every finalist alike); the
# lowest median wins, and a winner within CONFIRM_MARGIN of the heuristic's median leaves the
# heuristic in place (a committed entry must beat the rule by what the sweep can resolve).
CONFIRM_TOP = 3
CONFIRM_ROUNDS = 3
CONFIRM_MARGIN = 0.02


def confirm_best(
    sw: Sweep, g: Gemm, ops: Operands, good: list[dict[str, Any]], heuristic: TileConfig
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The GEMM's winner among the first pass's correct rows `good`, re-timed as the comment
    above says: (its row with `ms` the confirmed median and `first_pass_ms`, the finalists'
    rounds). Past the time budget, or with one finalist, the first pass's fastest as it is."""
    if not good:
        return None, []
    row_of = {TileConfig.from_dict(r["config"]): r for r in sorted(good, key=lambda r: -r["ms"])}
    finalists = sorted(row_of, key=lambda c: row_of[c]["ms"])[:CONFIRM_TOP]
    if heuristic in row_of and heuristic not in finalists:
        finalists.append(heuristic)
    if len(finalists) == 1 or sw.over_budget():
        return row_of[finalists[0]], []
    calls = {c: kernel_call(g, ops, "triton_tma", c) for c in finalists}
    rounds: dict[TileConfig, list[float]] = {c: [] for c in finalists}
    for i in range(CONFIRM_ROUNDS):
        shift = i % len(finalists)
        for c in finalists[shift:] + finalists[:shift]:
            with fp32_precision(g.precision):
                rounds[c].append(bench_ms(calls[c], sw.smoke))
    median = {c: statistics.median(t) for c, t in rounds.items()}
    chosen = min(finalists, key=median.__getitem__)
    if heuristic in median and median[heuristic] <= median[chosen] * (1 + CONFIRM_MARGIN):
        chosen = heuristic
    best = dict(row_of[chosen], ms=median[chosen], first_pass_ms=row_of[chosen]["ms"])
    best["tflops"] = g.flops / best["ms"] / 1e9
    record = [
        dict(config=c.to_dict(), rounds_ms=rounds[c], median_ms=median[c], chosen=c == chosen)
        for c in finalists
    ]
    return best, record


def sweep_gemm(sw: Sweep, g: Gemm, device: str) -> dict[str, Any]:
    ops = make_operands(g, device)
    cublas = sw.measure(g, ops, "cublas", None)
    heur = heuristic_config(
        g.family, g.m, g.n, g.k, g.dtype, persistent=True, fp32_precision=g.precision
    )
    if g.dtype == "float32":
        grid = FP32_GRID[g.precision]
    else:
        grid = GATED_GRID if g.family == "gated" else LINEAR_GRID
    if g.m < 8192:  # fewer variants at the smaller M: the heuristic and the two usual winners
        grid = grid[:2]
    if sw.smoke:
        grid = [_c(16, 64, 32, w=4, s=1, sub=2), _c(32, 64, 16, w=4, s=2, ws=True)]
        heur = _c(16, 64, 16, w=4, s=1)
    variants = list(dict.fromkeys([heur, *grid]))
    rows = [
        sw.measure(g, ops, "triton_tma", cfg)
        for cfg in variants
        if fits(g.family, cfg, g.dtype, persistent=True, fp32_precision=g.precision)
    ]
    if g.kmajor:
        kgrid = [_c(16, 64, 32, w=4, s=1)] if sw.smoke else KMAJOR_GRID
        rows += [sw.measure(g, ops, "triton_tma", cfg, kmajor=True) for cfg in kgrid]
    portable_cfg = (
        _c(16, 64, 16, w=4, s=1)
        if sw.smoke
        else heuristic_config(
            g.family, g.m, g.n, g.k, g.dtype, persistent=False, fp32_precision=g.precision
        )
    )
    portable = sw.measure(g, ops, "triton", portable_cfg)
    good = [r for r in rows if "ms" in r and not r.get("bad") and not r["kmajor"]]
    best, confirmation = confirm_best(sw, g, ops, good, heur)
    best_k = min(
        (r for r in rows if "ms" in r and not r.get("bad") and r["kmajor"]),
        key=lambda r: r["ms"],
        default=None,
    )
    del ops
    if not sw.smoke:
        torch.cuda.empty_cache()
    return dict(
        **g.fields(),
        flops=g.flops,
        cublas_ms=cublas.get("ms"),
        heuristic=heur.to_dict(),
        best=best,
        confirmation=confirmation,
        best_kmajor=best_k,
        portable_ms=portable.get("ms"),
    )


# ---- whole MLPs ----------------------------------------------------------------------------------
MLPS = {  # preset: (GEMM name prefix, widths, activation, gated, bias), as common/presets.py
    "llama3-8b": ("llama3-8b", (4096, 14336, 4096), "silu", True, False),
    "gpt-mlp": ("gpt-mlp", (4096, 16384, 4096), "gelu_tanh", False, True),
    "hf-blog-geglu": ("hf-blog", (768, 3072, 768), "gelu_tanh", True, False),
}


def sweep_mlp(
    sw: Sweep,
    name: str,
    m: int,
    best: dict[tuple[str, str], TileConfig],
    best_kmajor: dict[tuple[str, str], tuple[TileConfig, float, float]],
    device: str,
) -> dict[str, Any]:
    prefix, (d_in, hidden, d_out), act, gated, bias = MLPS[name]
    if sw.smoke:
        d_in, hidden, d_out = 64, 136, 80
    up = Gemm(f"{prefix} up", "gated" if gated else "linear_act", m, hidden, d_in, act, bias)
    down = Gemm(f"{prefix} down", "linear_act", m, d_out, hidden, "identity", bias, kmajor=True)
    ops_up, ops_dn = make_operands(up, device), make_operands(down, device)

    def eager() -> torch.Tensor:
        z = ops_up.x @ ops_up.w + (ops_up.b if bias else 0)
        h = ACT[act](z)
        if gated:
            h = h * (ops_up.x @ ops_up.v + (ops_up.c if bias else 0))
        return h @ ops_dn.w + (ops_dn.b if bias else 0)

    def ours(cfg_up: TileConfig, cfg_dn: TileConfig, kmajor: bool = False) -> Callable:
        up_fn = kernel_call(up, ops_up, "triton_tma", cfg_up)
        w2 = ops_dn.w_kmajor if kmajor else ops_dn.w

        def run() -> torch.Tensor:
            h = up_fn()
            return tma_linear.linear_act_fwd(
                h, w2, ops_dn.b, None, activation="identity", config=cfg_dn
            )

        return run

    heur = (
        heuristic_config(up.family, m, hidden, d_in, "bfloat16", persistent=True),
        heuristic_config("linear_act", m, d_out, hidden, "bfloat16", persistent=True),
    )
    if sw.smoke:
        heur = (_c(16, 64, 16, w=4, s=1), _c(16, 32, 16, w=4, s=1))
    tuned = (best.get((up.name, str(m)), heur[0]), best.get((down.name, str(m)), heur[1]))
    result: dict[str, Any] = dict(
        mlp=name, m=m, heuristic=[c.to_dict() for c in heur], tuned=[c.to_dict() for c in tuned]
    )
    variants = [
        ("eager", eager),
        ("triton_tma heuristic", ours(*heur)),
        ("triton_tma tuned", ours(*tuned)),
    ]
    k_best = best_kmajor.get((down.name, str(m)))
    if k_best is not None and (k_best[1] < k_best[2] or sw.smoke):  # K-major W2 won
        result["tuned_kmajor_down"] = k_best[0].to_dict()
        variants.append(("triton_tma tuned, K-major W2", ours(tuned[0], k_best[0], True)))
    for label, fn in variants:
        try:
            out = fn()
            ref = eager() if label != "eager" else out
            result[f"{label} rel_err"] = rel_error(out, ref.float())
            result[f"{label} ms"] = bench_ms(fn, sw.smoke)
        except Exception as err:
            result[f"{label} error"] = f"{type(err).__name__}: {str(err)[:300]}"
    ours_ms = [
        v for k, v in result.items() if k.startswith("triton_tma tuned") and k.endswith(" ms")
    ]
    if ours_ms and result.get("eager ms"):
        result["speedup_vs_eager"] = result["eager ms"] / min(ours_ms)
    return result


# ---- the tuned table -----------------------------------------------------------------------------
def tuned_table(
    device_name: str, summaries: list[dict[str, Any]], versions: dict[str, str]
) -> dict[str, Any]:
    entries: dict[str, Any] = {}
    now = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    for s in summaries:
        best = s["best"]
        if best is None:
            continue
        dtypes = ("bfloat16", "float16") if s["dtype"] == "bfloat16" else (s["dtype"],)
        for dtype in dtypes:
            key = make_key(
                device_name,
                "triton_tma",
                s["family"],
                s["m"],
                s["n"],
                s["k"],
                dtype,
                s["precision"],
            )
            entries[str(key)] = {
                "key": {f: getattr(key, f) for f in key.__dataclass_fields__},
                "config": best["config"],
                "median_ms": best["ms"],
                "measured_dtype": s["dtype"],
                "cublas_ms": s["cublas_ms"],
                "candidates": [],
                "versions": versions,
                "tuned_at": now,
            }
    return {
        "format": FORMAT_VERSION,
        "note": "bench/sweep_triton.py on this GPU; read by common/tuning.committed_config",
        "entries": entries,
    }


# ---- report --------------------------------------------------------------------------------------
def _fmt_cfg(c: dict[str, Any] | None) -> str:
    return str(TileConfig.from_dict(c)) if c else "-"


def print_table(summaries: list[dict[str, Any]], mlps: list[dict[str, Any]]) -> None:
    print()
    print(
        f"{'GEMM':<44} {'cuBLAS':>8} {'best tma':>9} {'%cuBLAS':>8} {'TF/s':>6} "
        f"{'portable':>9} {'kmajor':>8}  best config"
    )
    for s in summaries:
        best = s["best"] or {}
        ms, cb = best.get("ms"), s["cublas_ms"]
        pct = f"{100 * cb / ms:.0f}%" if ms and cb else "-"
        tf = f"{s['flops'] / ms / 1e9:.0f}" if ms else "-"
        km = s["best_kmajor"]["ms"] if s.get("best_kmajor") else None

        def f(v: float | None) -> str:
            return f"{v:.3f}" if v else "-"

        print(
            f"{s['gemm']:<44} {f(cb):>8} {f(ms):>9} {pct:>8} {tf:>6} {f(s['portable_ms']):>9} "
            f"{f(km):>8}  {_fmt_cfg(best.get('config'))}"
        )
    print()
    for r in mlps:
        e, h, t = r.get("eager ms"), r.get("triton_tma heuristic ms"), r.get("triton_tma tuned ms")
        k = r.get("triton_tma tuned, K-major W2 ms")
        sp = f"{r['speedup_vs_eager']:.2f}x" if r.get("speedup_vs_eager") else "-"
        nan = float("nan")
        print(
            f"MLP {r['mlp']:<14} M={r['m']:<5} eager {e or nan:.3f} ms  "
            f"tma heuristic {h or nan:.3f} ms  tma tuned {t or nan:.3f} ms  "
            f"K-major W2 {k or nan:.3f} ms  best vs eager {sp}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="JSON file to write")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=150.0,
        help="stop timing new variants after this many seconds (compiles included)",
    )
    ap.add_argument(
        "--tuned-out",
        type=Path,
        default=None,
        help="the tuned table's file (default: <out dir>/<gpu slug>.json)",
    )
    ap.add_argument(
        "--only",
        default="",
        help="sweep only the GEMMs whose label contains one of these comma-separated parts",
    )
    ap.add_argument(
        "--merge-into",
        type=Path,
        default=None,
        help="a committed table (common/tuned/*.json) whose entries the tuned table keeps where "
        "this run measured nothing",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny shapes under the interpreter (CPU)")
    args = ap.parse_args(argv)
    # The heuristic's own rules, not a committed table: this script is what writes the table.
    os.environ[NO_TUNED_ENV] = "1"
    start = time.perf_counter()
    if args.smoke:
        device, device_name = "cpu", "CPU (interpreter smoke run)"
    else:
        if not torch.cuda.is_available() or INTERPRET:
            print("sweep_triton: needs a CUDA GPU (or --smoke on a CPU)", file=sys.stderr)
            return 2
        device, device_name = "cuda", torch.cuda.get_device_name()
    committed: dict[str, Any] = {}  # --merge-into's entries, checked before anything is timed
    if args.merge_into is not None:
        if not args.merge_into.is_file():
            ap.error(f"--merge-into: no table at {args.merge_into}")
        data = json.loads(args.merge_into.read_text())
        if data.get("format") != FORMAT_VERSION or not isinstance(data.get("entries"), dict):
            ap.error(f"--merge-into {args.merge_into}: not a format-{FORMAT_VERSION} table")
        committed = data["entries"]
    if not gemms(args.smoke, args.only):
        ap.error(f"--only {args.only!r}: no GEMM's label contains any of its parts")
    sw = Sweep(args.smoke, start + args.budget_s, device_name)
    summaries: list[dict[str, Any]] = []
    for g in gemms(args.smoke, args.only):
        try:
            summaries.append(sweep_gemm(sw, g, device))
        except Exception:  # an operand or reference failure: say so, keep the rest
            traceback.print_exc()
            summaries.append(dict(gemm=g.label, error=traceback.format_exc()[-500:]))
        s = summaries[-1]
        best = s.get("best") or {}
        print(
            f"[{time.perf_counter() - start:6.1f} s] {g.label}: cuBLAS {s.get('cublas_ms')} ms, "
            f"best {best.get('ms')} ms {_fmt_cfg(best.get('config'))}",
            flush=True,
        )
    ok = [s for s in summaries if "error" not in s]
    best_cfg = {
        (s["name"], str(s["m"])): TileConfig.from_dict(s["best"]["config"])
        for s in ok
        if s["best"] and s["dtype"] == "bfloat16"
    }
    best_k = {
        (s["name"], str(s["m"])): (
            TileConfig.from_dict(s["best_kmajor"]["config"]),
            s["best_kmajor"]["ms"],
            s["best"]["ms"],
        )
        for s in ok
        if s["best"] and s.get("best_kmajor") and s["dtype"] == "bfloat16"
    }
    mlps = []
    mlp_m = 256 if args.smoke else 8192
    for name, (prefix, *_) in MLPS.items():
        if args.only and not {(f"{prefix} {p}", str(mlp_m)) for p in ("up", "down")} <= {
            (s["name"], str(s["m"])) for s in ok
        }:
            continue  # `--only` left out one of this MLP's GEMMs at the MLP's M
        try:
            mlps.append(sweep_mlp(sw, name, mlp_m, best_cfg, best_k, device))
        except Exception:
            traceback.print_exc()
            mlps.append(dict(mlp=name, error=traceback.format_exc()[-500:]))
    try:
        from fusedmlp.bench.env import environment

        env = environment()
    except Exception as err:  # the environment block is a courtesy, never a reason to lose data
        env = {"error": repr(err)}
    import triton

    versions = {"triton": triton.__version__, "torch": torch.__version__}
    table = tuned_table(device_name, ok, versions)
    # the committed entries of GEMMs this run did not measure stay as they are
    table["entries"] = {**committed, **table["entries"]}
    result = dict(
        device=device_name,
        env=env,
        smem_limit=SMEM_LIMIT,
        pack_block=PACK_BLOCK,
        elapsed_s=time.perf_counter() - start,
        gemms=summaries,
        mlps=mlps,
        rows=sw.rows,
        tuned_table=table,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    tuned_out = args.tuned_out or args.out.parent / f"{device_slug(device_name)}.json"
    tuned_out.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    print_table(ok, [r for r in mlps if "error" not in r])
    print(
        f"\nwrote {args.out} and {tuned_out} in {time.perf_counter() - start:.0f} s "
        f"({sum('ms' in r for r in sw.rows)} timed rows, "
        f"{sum('error' in r for r in sw.rows)} errors, "
        f"{sum(bool(r.get('bad')) for r in sw.rows)} wrong)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
