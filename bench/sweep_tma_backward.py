"""One-call H200 sweep of the torch Hopper training step's GEMMs (torch_impl/tma/backward.py).

The twin of bench/sweep_mosaic_backward.py for the Triton TMA kernels, over the same GEMMs of a
training step (saved="preact", `step_gemms` with torch_impl/backward.py's rules) of hf-blog-geglu
and llama3-8b at M = 8192 (bf16): the gated saving forward (its packed pre-activation stored),
each layer's weight gradient hᵀ·dZ (h read M-major in place) and input gradient dZ·Wᵀ (W read
K-major in place, the previous layer's act' step in the epilogue). Per GEMM, within a time budget:

- `cublas`: torch.matmul of the same operands as they lie, the product alone (for scale: the
  epilogue is not in it);
- `fitted`: the tiles `tma/backward.step_config` gives now (the committed table's, else the
  forward heuristic's, as the step has run them until this sweep);
- a grid of Triton TMA tiles (`grid`): tile shape, K stages, epilogue slices, warp
  specialisation (GATED_GRID, LINEAR_GRID, DACT_GRID). The act' epilogue's launcher caps its
  tile at 128 columns (tma/linear_act.py): its grid varies what that leaves free (its epilogue in
  column halves, two or three programs an SM, or whole and warp-specialised, column by column).

Then the step's weight gradients as ONE grouped launch (tma/linear_act.py `linear_grouped`,
GROUPED_GRID), beside the same products apart on the tiles `step_config` gives them ("apart", timed
in the same run): the table's grouped entry records both, and `tma/backward.grouped_config` takes
it only where the grouped launch was faster.

Why: the torch step ran 0.95× torch.compile at llama3-8b and 0.82× at hf-blog (H200, 3009ab9)
on tiles nobody measured for these GEMMs — the forward heuristic's, keyed by a forward's shapes.

Timing: `triton.testing.do_bench` (a 256 MB write clears L2 before every repetition, CUDA
events), median. Each grid kernel is checked against the fitted kernel's output (relative
Frobenius error over every output; the fitted kernel is the one the GPU tests check against the
float64 reference); above REL_ERR_LIMIT it is marked WRONG and never tabled. A config that fails
to compile or launch is recorded with its error.

    python3 bench/sweep_tma_backward.py OUT.json --tuned-out TUNED.json [--budget-s 400]
        [--presets hf-blog-geglu,llama3-8b] [--roles "layer 1 input"] [--merge-into TABLE]

TUNED.json has the format of torch_impl/tma/tuned_hopper_backward.json (the best tiles per
(kind, M, N, K), each entry naming the GPU and commit it was measured at; copy it there to make
`step_config` take them; `--merge-into` the committed table keeps its entries of GEMMs not swept).
`--smoke`: tiny shapes under Triton's interpreter on a CPU, two tiles each and wall-clock timing,
to run this script end to end without a GPU (the numbers mean nothing).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

if "--smoke" in sys.argv:  # before triton is imported: the interpreter on a CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

from fusedmlp.bench.sweep_mosaic_backward import (
    StepGemm,
    Sweep,
    WeightGradients,
    step_gemms,
    step_sweep_arguments,
    weight_gradients,
)
from fusedmlp.common.config import TileConfig
from fusedmlp.common.packing import packed_width
from fusedmlp.common.spec import MLPSpec
from fusedmlp.torch_impl import backward as portable
from fusedmlp.torch_impl.tma import backward as hopper
from fusedmlp.torch_impl.tma import gated as tma_gated
from fusedmlp.torch_impl.tma import linear_act as tma_linear

M = 8192
# --smoke: a gated MLP small enough for the interpreter, at a ragged M
SMOKE_SPEC = MLPSpec((64, 96, 64), "geglu_tanh", bias=False, dtype="bfloat16")
SMOKE_M = 72


def _c(
    bm: int, bn: int, w: int = 8, s: int = 4, sub: int = 1, ws: bool = False, g: int = 8, p: int = 1
) -> TileConfig:
    return TileConfig(bm, bn, 64, group_m=g, num_warps=w, num_stages=s, epilogue_subtile=sub,
                      warp_specialize=ws, programs_per_sm=p)  # fmt: skip


# The grids, after the fitted tiles. Gated: block_n is h's width (the accumulator is twice it);
# the stored pre-activation is staged in slices as h is. Linear: bench/sweep_triton.py's forward
# grid and the shapes a K of 8192 with few output tiles (the weight gradients) may want.
GATED_GRID = [
    _c(128, 128, s=4, sub=2),
    _c(128, 128, s=3, sub=2),
    _c(128, 128, s=3),
    _c(128, 64, s=4),
    _c(128, 64, w=4, s=5),
    _c(128, 128, s=4, sub=4),
]
LINEAR_GRID = [
    _c(128, 256, s=4, sub=2),
    _c(128, 256, s=3, sub=2),
    _c(128, 256, s=4, sub=4),
    _c(128, 128, s=4, sub=2),
    _c(128, 128, w=4, s=4, ws=True),
    _c(128, 256, w=4, s=3, ws=True),
    _c(256, 128, s=3, sub=2),
]
DACT_GRID = [
    _c(128, 128, s=4),
    _c(128, 128, s=3),
    _c(128, 128, s=5),
    _c(128, 128, w=4, s=4),
    _c(64, 128, w=4, s=5),
    _c(128, 64, w=4, s=5),
    _c(256, 128, s=3),
    _c(128, 128, s=4, g=16),
    # the act' step in column halves (sub 2): compiled for sm_90 on a CPU, 128×128 at 8 warps
    # then holds 187-191 registers and spills nothing (whole: 255 and a spill); 64×128 at 4
    # warps, 178 registers and ≤ 107 KB of shared memory, lets two programs share an SM, one's
    # epilogue under the other's K loop
    _c(128, 128, s=5, sub=2),
    _c(128, 128, s=4, sub=2),
    _c(128, 128, s=3, sub=2),
    _c(64, 128, w=4, s=3, sub=2, p=2),
    _c(64, 128, w=4, s=4, sub=2, p=2),
    _c(64, 128, w=4, s=2, sub=2, p=3),
    # 128 rows × 64 columns (one packed pair) two an SM: 255 registers and an 8-byte spill at 4
    # stages, 104 KiB (sm_90 on a CPU); 128×128 at 4 warps, Mosaic GPU's hf-blog winner, spills
    # ~800 bytes a thread here (the act' epilogue beside the accumulator) and is left out
    _c(128, 64, w=4, s=4, p=2),
    # whole tiles warp-specialised (`_dact_by_columns`: the packed z and g addressed column by
    # column, no reshape for the pass to stop at): compiled for sm_90 on a CPU, a producer and
    # two consumer warpgroups, 168 registers, no spill, 147 / 115 / 115 KB of shared memory
    # (256×128 spills 12 KB: left out); the next tile's loads under the epilogue
    _c(128, 128, w=4, s=4, ws=True),
    _c(128, 128, w=4, s=3, ws=True),
    _c(128, 64, w=4, s=4, ws=True),
]
# The grouped weight gradients: plain tile loops only (`linear_grouped` warp-specialises no launch
# of two products or more: each loop would get buffers of its own, past the SM's shared memory).
GROUPED_GRID = [
    _c(128, 256, s=4, sub=2),
    _c(128, 256, s=3, sub=2),
    _c(128, 256, s=4, sub=4),
    _c(128, 128, s=4, sub=2),
    _c(128, 128, w=4, s=4),
    _c(256, 128, s=3, sub=2),
]
SMOKE_GRID = [TileConfig(32, 64, 32, num_warps=4, num_stages=2)]


def torch_gemms(preset: str, m: int = M, spec: MLPSpec | None = None) -> list[StepGemm]:
    """The GEMMs tma/backward.py runs through `step_config` for this preset (or `spec`) at
    M = m: the saving forward of a gated layer (a plain layer that keeps z saves it on the
    portable kernel, backward.forward_saving), every weight and input gradient."""
    gemms = step_gemms(preset, m, rules=portable, spec=spec)
    return [g for g in gemms if not (g.preact and g.family != "gated")]


def grid(g: StepGemm, smoke: bool) -> list[TileConfig]:
    """The fitted tiles first, then the family's grid (less any equal to them)."""
    fitted = hopper.step_config(g.kind, g.family, g.m, g.n, g.k, "bfloat16", "ieee")
    if smoke:
        return [fitted, *SMOKE_GRID]
    if g.family == "gated":
        tiles = GATED_GRID
    else:
        tiles = DACT_GRID if g.epilogue != "none" else LINEAR_GRID
    return [fitted, *[c for c in tiles if c != fitted]]


# ==== the ops =====================================================================================
def make_operands(g: StepGemm, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """One input set of the GEMM as tma/backward.py hands it over (bf16), `a` and `w` as they
    lie in memory: h [batch, d_in] for a weight gradient (read transposed), W [d_in, width] for
    an input gradient (read transposed)."""
    gen = torch.Generator(device="cpu").manual_seed(1000 + seed)

    def normal(shape: tuple[int, ...], scale: float = 1.0) -> torch.Tensor:
        t = torch.randn(shape, generator=gen, dtype=torch.float32) * scale
        return t.to(device=device, dtype=torch.bfloat16)

    s = {
        "a": normal((g.k, g.m) if g.x_kmajor else (g.m, g.k)),
        "w": normal((g.op_n, g.k) if g.w_kmajor else (g.k, g.op_n), g.k**-0.5),
    }
    if g.bias:
        s["b"] = normal((g.op_n,), 0.1)
    if g.epilogue != "none":
        s["z"] = normal((g.m, packed_width(g.n) if g.epilogue == "dact_gated" else g.n))
    return s


def _views(g: StepGemm, s: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return (s["a"].t() if g.x_kmajor else s["a"]), (s["w"].t() if g.w_kmajor else s["w"])


def kernel_op(g: StepGemm, cfg: TileConfig, s: dict[str, torch.Tensor]) -> Callable[[], Any]:
    """The Triton TMA launch the step makes for `g`, on `cfg`."""
    a, w = _views(g, s)
    if g.family == "gated":
        return lambda: tma_gated.gated_fwd(
            a, w, s.get("b"), n=g.n, activation=g.activation, config=cfg, store_preact=True
        )
    return lambda: tma_linear.linear_act_fwd(
        a, w, None, None, activation="identity", config=cfg, epilogue=g.epilogue,
        z=s.get("z"), dact_activation=g.activation,
    )  # fmt: skip


def apart_op(wg: WeightGradients, sets: list[dict[str, torch.Tensor]]) -> Callable[[], Any]:
    """The weight gradients one launch each, on the tiles the step gives them."""
    ops = [
        kernel_op(g, hopper.step_config(g.kind, g.family, g.m, g.n, g.k, "bfloat16", "ieee"), s)
        for g, s in zip(wg.gemms, sets, strict=True)
    ]
    return lambda: tuple(op() for op in ops)


def grouped_op(
    wg: WeightGradients, cfg: TileConfig, sets: list[dict[str, torch.Tensor]]
) -> Callable[[], Any]:
    """The weight gradients in ONE launch (`linear_grouped`), on `cfg`."""
    views = [_views(g, s) for g, s in zip(wg.gemms, sets, strict=True)]
    xs, ws = [a for a, _ in views], [w for _, w in views]
    return lambda: tma_linear.linear_grouped(xs, ws, config=cfg)


def cublas_op(g: StepGemm, s: dict[str, torch.Tensor]) -> Callable[[], Any]:
    a, w = _views(g, s)
    return lambda: torch.matmul(a, w)


def bench_ms(fn: Callable[[], Any], smoke: bool) -> float:
    if smoke:
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))


def measure_torch(smoke: bool) -> Callable[[Callable[[], Any], Any], dict[str, Any]]:
    """`Sweep.run`'s measurement for torch ops: the first result (compile included) and the
    median time; `sets` is unused (do_bench clears L2 itself)."""

    def measure(op: Callable[[], Any], sets: Any) -> dict[str, Any]:
        del sets
        start = time.perf_counter()
        first = op()
        if not smoke:
            torch.cuda.synchronize()
        compile_s = time.perf_counter() - start
        return {"first": first, "ms": bench_ms(op, smoke), "compile_s": compile_s}

    return measure


def rel_err(out: Any, ref: Any) -> float:
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    errs = []
    for o, r in zip(outs, refs, strict=True):
        o, r = o.float(), r.float()
        errs.append(float(torch.linalg.norm(o - r) / torch.linalg.norm(r).clamp_min(1e-30)))
    return max(errs)


# ==== the sweep ===================================================================================
def sweep(sw: Sweep, presets: list[str], roles: list[str] | None, smoke: bool) -> None:
    device = "cpu" if smoke else "cuda"
    for preset in presets:
        gemms = torch_gemms(preset, SMOKE_M, SMOKE_SPEC) if smoke else torch_gemms(preset)
        for g in gemms:
            if roles and not any(role in g.role for role in roles):
                continue
            if not sw.left():
                sw.skipped.append(f"{g.name} (all)")
                continue
            s = make_operands(g, device)
            if not smoke:
                sw.run(g, "cublas", cublas_op(g, s), None, None)
            plan = grid(g, smoke)
            first = sw.run(g, "fitted", kernel_op(g, plan[0], s), None, None, plan[0])
            ref = first["_out"] if first and first["status"] == "ok" else None
            for cfg in plan[1:]:
                sw.run(g, "grid", kernel_op(g, cfg, s), None, ref, cfg)
            del s, first, ref
        spec = SMOKE_SPEC if smoke else None
        wg = weight_gradients(preset, SMOKE_M if smoke else M, rules=portable, spec=spec)
        if len(wg.gemms) < 2 or (roles and not any(role in wg.role for role in roles)):
            continue
        if not sw.left():
            sw.skipped.append(f"{wg.name} (all)")
            continue
        sets = [make_operands(g, device, seed=i) for i, g in enumerate(wg.gemms)]
        first = sw.run(wg, "apart", apart_op(wg, sets), None, None)
        ref = first["_out"] if first and first["status"] == "ok" else None
        for cfg in SMOKE_GRID if smoke else GROUPED_GRID:
            sw.run(wg, "grid", grouped_op(wg, cfg, sets), None, ref, cfg)
        del sets, first, ref


def main(argv: list[str] | None = None) -> int:
    ap = step_sweep_arguments(__doc__, 400.0, out_required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes under the interpreter")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA GPU: use --smoke on a CPU", file=sys.stderr)
        return 2
    from fusedmlp.bench.env import environment

    sw = Sweep(args.out, args.tuned_out, args.budget_s, stack="torch")
    sw.measure = measure_torch(args.smoke)
    sw.rel_err = rel_err
    sw.env = environment()
    if args.merge_into is not None:
        sw.base = json.loads(args.merge_into.read_text())
    sweep(sw, args.presets.split(","), args.roles.split(",") if args.roles else None, args.smoke)
    sw.write()
    for preset, t in sw.totals().items():
        print(f"{preset}: GEMMs fitted {t['fitted_ms']:.3f} ms, best {t['best_ms']:.3f} ms, "
              f"cuBLAS's products {t['cublas_ms']:.3f} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
