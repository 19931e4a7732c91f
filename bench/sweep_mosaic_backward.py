"""One-call H200 sweep of the Mosaic GPU training step's GEMMs (jax_impl/mosaic/backward.py).

For every GEMM of a training step (saved="preact") of llama3-8b and hf-blog-geglu at M = 8192
(bf16) — the saving forward of a layer that keeps its pre-activation, each layer's weight
gradient hᵀ·dZ (h read transposed) and input gradient dZ·Wᵀ (W read transposed, the previous
layer's act' step in the epilogue) — it times, within a time budget:

- `xla`: the same product as XLA computes it (a dot_general of the operands as they lie, the
  act' step or the gating as its elementwise ops), for scale;
- `fitted`: the tiles `backward.fitted_config` gives now (the committed table's, else the
  forward's made cooperative and fitted to the staging);
- a grid of cooperative and ping-pong tiles (`grid`): per tile shape, the deepest K pipeline
  that fits with two staging slots and, where the staging is wide, with one.

Why: on the H200 (05b43a3) the JAX step ran 0.99× XLA at llama3-8b and 0.84× at hf-blog, whose
GEMMs have a short K (768: 12 K steps a tile) or few output tiles (the weight gradients: 768 ×
6144 outputs, 144 tiles of 128×256 on 132 SMs), where the cooperative kernel's epilogue (a saved
[z|g] tile read, two tiles written) stalls the tensor cores and the last wave runs half empty.

Each kernel's result is checked against the fitted tiles' (relative Frobenius error; the fitted
kernel is the one the GPU tests check against the float64 reference). Timing as
bench/sweep_mosaic.py's: a jitted function over rotating input sets (together more than twice the
L2), dispatched back to back, the host clock around the last result, median of 5 samples.

    python3 bench/sweep_mosaic_backward.py OUT.json --tuned-out TUNED.json [--budget-s 380]
        [--presets hf-blog-geglu,llama3-8b] [--roles "layer 1 input"] [--merge-into TABLE]

TUNED.json has the format of jax_impl/mosaic/tuned_hopper_backward.json (the best tiles per
(kind, M, N, K), each entry with the GPU and commit it was measured at; copy it there to make
`fitted_config` take them; `--merge-into` the committed table to keep its entries of the GEMMs
not swept). On a CPU, `--dry-run` lowers
every planned kernel for CUDA without timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusedmlp.bench.sweep_mosaic import (
    L2_BYTES,
    MAX_SETS,
    REL_ERR_LIMIT,
    _config_dict,
    _config_str,
    measure,
    rel_err,
)

PRESETS = ("hf-blog-geglu", "llama3-8b")  # the larger gap first
M = 8192


# ==== what is swept ===============================================================================
@dataclass(frozen=True)
class StepGemm:
    """One GEMM of the training step as mosaic/backward.py launches it."""

    preset: str
    role: str  # "layer 0 saving forward", "layer 1 weight gradient", ...
    family: str  # "gated" or "linear_act"
    m: int
    n: int  # the accumulator's output columns (gated: the layer's width)
    k: int
    x_kmajor: bool = False
    w_kmajor: bool = False
    epilogue: str = "none"  # "dact", "dact_gated" (the input gradient's act' step)
    preact: bool = False  # the saving forward's stored pre-activation
    activation: str = "identity"  # the forward's (preact) or the act' step's activation
    bias: bool = False

    @property
    def operands(self) -> Any:
        from fusedmlp.jax_impl.mosaic.pipeline import Operands

        return Operands(x_kmajor=self.x_kmajor, w_kmajor=self.w_kmajor)

    @property
    def outputs(self) -> Any:
        from fusedmlp.jax_impl.mosaic.pipeline import Outputs

        return Outputs(scale=2 if self.epilogue == "dact_gated" else 1, preact=self.preact)

    @property
    def kind(self) -> str:
        """Its name in either stack's tuned table (mosaic/backward.gemm_kind's rule)."""
        from fusedmlp.common.tiling import step_gemm_kind

        return step_gemm_kind(
            self.family, preact=self.preact, x_kmajor=self.x_kmajor, w_kmajor=self.w_kmajor,
            epilogue=self.epilogue,
        )  # fmt: skip

    @property
    def op_n(self) -> int:
        from fusedmlp.common.packing import packed_width

        return packed_width(self.n) if self.family == "gated" else self.n

    @property
    def name(self) -> str:
        return f"{self.preset} {self.role}"

    def flops(self) -> int:
        return 2 * self.m * self.op_n * self.k

    def fields(self) -> dict[str, Any]:
        """The GEMM's shape as a row of the sweep names it."""
        return {"m": self.m, "n": self.n, "k": self.k}


@dataclass(frozen=True)
class WeightGradients:
    """The step's weight gradients hᵢᵀ·dZᵢ as ONE grouped launch (either stack's
    `linear_grouped`, kind common.tiling.GROUPED_KIND), timed beside the same products apart on
    the tiles the step gives them ("apart": what the step runs where the table has no grouped
    entry; here `fitted_config`'s, in sweep_tma_backward.py `step_config`'s)."""

    preset: str
    gemms: tuple[StepGemm, ...]  # the weight gradients, in the order the backward reaches them
    role: str = "weight gradients grouped"

    @property
    def kind(self) -> str:
        from fusedmlp.common.tiling import GROUPED_KIND

        return GROUPED_KIND

    @property
    def name(self) -> str:
        return f"{self.preset} {self.role}"

    @property
    def products(self) -> list[list[int]]:
        return [[g.m, g.op_n] for g in self.gemms]

    def flops(self) -> int:
        return sum(g.flops() for g in self.gemms)

    def fields(self) -> dict[str, Any]:
        return {"products": self.products, "k": self.gemms[0].k}


def weight_gradients(
    preset: str, m: int = M, rules: Any = None, spec: Any = None
) -> WeightGradients:
    """The grouped launch of the preset's (or `spec`'s) weight gradients at M = m, in
    `step_gemms`' order (`rules`, `spec`: as there)."""
    gemms = step_gemms(preset, m, rules=rules, spec=spec)
    return WeightGradients(preset, tuple(g for g in gemms if g.role.endswith("weight gradient")))


def step_gemms(preset: str, m: int = M, rules: Any = None, spec: Any = None) -> list[StepGemm]:
    """The GEMMs mosaic/backward.py's saving forward and backward run through `fitted_config`
    for this preset at M = m (saved="preact"), in the order they run; the layers that keep no
    pre-activation run the inference forward's tiles and are not here. `rules`: the portable
    backward module whose `_stores_preact` / `_dact_from_output` decide (jax_impl/backward.py
    by default; its twin torch_impl/backward.py for bench/sweep_tma_backward.py). `spec`: an
    MLPSpec to use instead of the preset's (`preset` then only names the rows)."""
    from fusedmlp.common import get_preset
    from fusedmlp.common.packing import packed_width

    if rules is None:
        from fusedmlp.jax_impl import backward as rules
    portable = rules

    spec = spec if spec is not None else get_preset(preset).spec
    layers = spec.layers()
    gemms = []
    for layer in layers:
        if portable._stores_preact(layer):
            family = "gated" if layer.gated else "linear_act"
            gemms.append(StepGemm(preset, f"layer {layer.index} saving forward", family, m,
                                  layer.d_out, layer.d_in, preact=True,
                                  activation=layer.activation, bias=layer.bias))  # fmt: skip
    for layer in reversed(layers):
        i = layer.index
        width = packed_width(layer.d_out) if layer.gated else layer.d_out
        gemms.append(StepGemm(preset, f"layer {i} weight gradient", "linear_act", layer.d_in,
                              width, m, x_kmajor=True))  # fmt: skip
        prev = layers[i - 1] if i > 0 else None
        epilogue, activation = "none", "identity"
        if prev is not None and (portable._stores_preact(prev) or portable._dact_from_output(prev)):
            epilogue = "dact_gated" if prev.gated else "dact"
            activation = prev.activation
        gemms.append(StepGemm(preset, f"layer {i} input gradient", "linear_act", m, layer.d_in,
                              width, w_kmajor=True, epilogue=epilogue,
                              activation=activation))  # fmt: skip
    return gemms


def _with_stages(cfg: Any, g: StepGemm, slots: int, most: int = 6) -> tuple[Any, Any] | None:
    """`cfg` at the deepest K pipeline (≤ most slots) that fits with `slots` staging slots."""
    from fusedmlp.jax_impl.mosaic import pipeline

    outs = dataclasses.replace(g.outputs, slots=slots)
    for stages in range(most, 2, -1):
        c = dataclasses.replace(cfg, num_stages=stages)
        try:
            pipeline.check_config(c, "bfloat16", 2 if g.family == "gated" else 1, False, outs)
        except ValueError:
            continue
        return c, outs
    return None


def _tile(bm: int, bn: int, sub: int, *, pingpong: bool) -> Any:
    from fusedmlp.common.config import TileConfig

    return TileConfig(bm, bn, 64, group_m=8, num_warps=4, num_stages=4, warp_specialize=True,
                      epilogue_subtile=sub, programs_per_sm=2 if pingpong else 1)  # fmt: skip


# (block_m, block_n, epilogue_subtile, ping-pong): ping-pong first (each compute warpgroup a
# whole tile of at most 128×128 fp32, its epilogue under the other's K loop), then cooperative
GATED_TILES = ((128, 64, 1, True), (64, 128, 1, True), (128, 128, 1, False), (256, 64, 1, False))
# Ping-pong 128×128 whole-width (sub 1): two epilogue tiles a warpgroup, so two staging slots
# hold every residual of an act' step in flight before the K loop (`prefetch_residual`); the
# H200 timed the act' step at 127-131 µs with half of them loaded inside the epilogue (sub 2).
LINEAR_TILES = (
    (128, 128, 2, True),
    (128, 128, 1, True),
    (64, 256, 2, True),
    (128, 64, 1, True),
    (128, 256, 2, False),
    (256, 128, 1, False),
    (128, 128, 1, False),
    (128, 192, 1, False),  # N = 768 in 4 column tiles (common/config.py: not a power of two)
    # llama3-8b's act' step runs 256×128 with one 64 × 256 staging slot a warpgroup (its doubled
    # output): half-wide epilogue tiles fit two slots — two residual tiles in flight, the others
    # requested a tile ahead (`pipeline.store_tile`) — or, at one slot, a fourth K slot
    (256, 128, 2, False),
)


def grouped_grid(wg: WeightGradients) -> list[tuple[Any, Any, Any]]:
    """(config, outputs, widths) to time for the grouped launch: per tile shape of LINEAR_TILES
    the deepest K pipeline that fits (the products store plainly: two staging slots), on one
    width (widths None) and on the mixed widths that `width_plans` finds fill the waves better."""
    found = [_with_stages(_tile(bm, bn, sub, pingpong=pp), wg.gemms[0], 2)
             for bm, bn, sub, pp in LINEAR_TILES]  # fmt: skip
    return [(cfg, outs, widths) for cfg, outs in filter(None, found)
            for widths in (None, *width_plans(wg, cfg))]  # fmt: skip


def width_plans(wg: WeightGradients, cfg: Any, most: int = 2) -> list[tuple[int, ...]]:
    """Up to `most` choices of each product's block_n (from cfg's, 3/4 and 1/2 of it) that the
    Mosaic GPU grouped launch takes (`pipeline.plan_widths`) and whose busiest block does less
    work than on cfg's width alone (common.tiling.grouped_makespan), least work first."""
    import itertools

    from fusedmlp.common.tiling import grouped_makespan
    from fusedmlp.jax_impl.mosaic import pipeline

    products = [(g.m, g.op_n) for g in wg.gemms]
    bn = cfg.block_n
    choices = sorted({bn, bn * 3 // 4, bn // 2}, reverse=True)

    def work(widths: tuple[int, ...]) -> float:
        return grouped_makespan(products, cfg.block_m, list(widths), unit=bn)

    uniform = work((bn,) * len(products))
    plans = []
    for widths in itertools.product(choices, repeat=len(products)):
        if len(set(widths)) == 1 or work(widths) >= uniform:
            continue
        try:
            pipeline.plan_widths(cfg, widths, "linear_act", "bfloat16")
        except ValueError:
            continue
        plans.append(widths)
    return sorted(plans, key=work)[:most]


def grid(g: StepGemm) -> list[tuple[Any, Any]]:
    """(config, outputs) to time for `g`: the fitted tiles first, then per tile shape the
    deepest pipeline with two staging slots and, where the staging is wide, with one — and for
    an act' step with three (three residual tiles prefetched under the K loop, at a ring one
    slot shallower)."""
    from fusedmlp.jax_impl.mosaic import backward as hopper
    from fusedmlp.jax_impl.mosaic.pipeline import PLAIN_OUTPUT

    fitted = hopper.fitted_config(g.family, g.m, g.n, g.k, "bfloat16", g.outputs,
                                  interpret=False, operands=g.operands,
                                  epilogue=g.epilogue)  # fmt: skip
    out = [fitted]
    for bm, bn, sub, pingpong in GATED_TILES if g.family == "gated" else LINEAR_TILES:
        staging = (2, 1, 3) if g.epilogue != "none" else (2, 1)
        for slots in (2,) if g.outputs == PLAIN_OUTPUT else staging:
            try:
                found = _with_stages(_tile(bm, bn, sub, pingpong=pingpong), g, slots)
            except ValueError:  # a tile the family cannot take
                found = None
            if found is not None and found not in out:
                out.append(found)
    return out


# ==== the ops =====================================================================================
def make_sets(g: StepGemm, count: int) -> list[dict[str, Any]]:
    """`count` input sets of the GEMM as mosaic/backward.py hands them over (bf16)."""
    import jax
    import jax.numpy as jnp

    from fusedmlp.common.packing import packed_width

    dt = jnp.bfloat16
    sets = []
    for i in range(count):
        keys = jax.random.split(jax.random.key(1000 + i), 4)

        def normal(key: Any, shape: tuple[int, ...], scale: float = 1.0) -> Any:
            return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dt)

        a_shape = (g.k, g.m) if g.x_kmajor else (g.m, g.k)
        w_shape = (g.op_n, g.k) if g.w_kmajor else (g.k, g.op_n)
        s = {"a": normal(keys[0], a_shape), "w": normal(keys[1], w_shape, g.k**-0.5)}
        if g.bias:
            s["b"] = normal(keys[2], (g.op_n,), 0.1)
        if g.epilogue != "none":
            width = packed_width(g.n) if g.epilogue == "dact_gated" else g.n
            s["z"] = normal(keys[3], (g.m, width))
        sets.append(s)
    return sets


def grouped_sets(wg: WeightGradients, count: int) -> list[dict[str, Any]]:
    """Input sets of the grouped launch: product i's operands as "a{i}", "w{i}"."""
    per = [make_sets(g, count) for g in wg.gemms]
    return [
        {f"{key}{i}": s[key] for i, sets in enumerate(per) for key in ("a", "w") for s in [sets[c]]}
        for c in range(count)
    ]


def grouped_set_count(wg: WeightGradients) -> int:
    set_bytes = sum(2 * (g.m * g.k + g.k * g.op_n + g.m * g.op_n) for g in wg.gemms)
    return max(2, min(MAX_SETS, -(-2 * L2_BYTES // set_bytes)))


def apart_op(wg: WeightGradients) -> Callable[[dict], Any]:
    """The weight gradients one launch each, on the tiles the step gives them."""
    from fusedmlp.jax_impl.mosaic import backward as hopper

    ops = []
    for g in wg.gemms:
        cfg, outs = hopper.fitted_config(g.family, g.m, g.n, g.k, "bfloat16", g.outputs,
                                         interpret=False, operands=g.operands)  # fmt: skip
        ops.append(mosaic_op(g, cfg, outs, False))
    return lambda s: tuple(op({"a": s[f"a{i}"], "w": s[f"w{i}"]}) for i, op in enumerate(ops))


def grouped_op(wg: WeightGradients, cfg: Any, widths: Any = None) -> Callable[[dict], Any]:
    from fusedmlp.jax_impl.mosaic import linear_act

    count = len(wg.gemms)
    return lambda s: linear_act.linear_grouped(
        [s[f"a{i}"] for i in range(count)], [s[f"w{i}"] for i in range(count)], config=cfg,
        widths=widths, interpret=False, x_kmajor=True,
    )  # fmt: skip


def set_count(g: StepGemm) -> int:
    set_bytes = 2 * (g.m * g.k + g.k * g.op_n + 2 * g.m * g.op_n)
    return max(2, min(MAX_SETS, -(-2 * L2_BYTES // set_bytes)))


def mosaic_op(g: StepGemm, cfg: Any, outs: Any, interpret: bool) -> Callable[[dict], Any]:
    from fusedmlp.jax_impl.mosaic import gated, linear_act

    if g.family == "gated":
        return lambda s: gated.gated_fwd(
            s["a"], s["w"], s.get("b"), n=g.n, activation=g.activation, config=cfg,
            interpret=interpret, store_preact=True, staging_slots=outs.slots,
        )  # fmt: skip
    return lambda s: linear_act.linear_act_fwd(
        s["a"], s["w"], s.get("b"), None, activation=g.activation if g.preact else "identity",
        config=cfg, interpret=interpret, x_kmajor=g.x_kmajor, w_kmajor=g.w_kmajor,
        epilogue=g.epilogue, z=s.get("z"), dact_activation=g.activation,
        store_preact=g.preact, staging_slots=outs.slots,
    )  # fmt: skip


def xla_op(g: StepGemm) -> Callable[[dict], Any]:
    """The same product by XLA (operands as they lie) with the epilogue as elementwise ops: the
    scale the kernel is measured against (XLA's own step fuses differently)."""
    import jax.numpy as jnp

    from fusedmlp.common.packing import PACK_BLOCK
    from fusedmlp.jax_impl.activations import apply_activation, apply_activation_grad

    f32 = jnp.float32

    def op(s: dict) -> Any:
        a = s["a"].T if g.x_kmajor else s["a"]
        w = s["w"].T if g.w_kmajor else s["w"]
        acc = jnp.matmul(a, w, preferred_element_type=f32)
        if g.preact:
            z = acc + (s["b"].astype(f32) if g.bias else 0.0)
            if g.family == "gated":  # the packed [z|g] blocks: act(z)·g
                pairs = z.reshape(g.m, -1, 2, PACK_BLOCK)
                h = apply_activation(pairs[:, :, 0], g.activation) * pairs[:, :, 1]
                return h.reshape(g.m, -1).astype(a.dtype), z.astype(a.dtype)
            return apply_activation(z, g.activation).astype(a.dtype), z.astype(a.dtype)
        if g.epilogue == "dact":
            return (acc * apply_activation_grad(s["z"].astype(f32), g.activation)).astype(a.dtype)
        if g.epilogue == "dact_gated":  # the packed [dz|dg] from the saved [z|g]
            zg = s["z"].astype(f32).reshape(g.m, -1, 2, PACK_BLOCK)
            z, gate = zg[:, :, 0], zg[:, :, 1]
            dh = acc.reshape(g.m, -1, PACK_BLOCK)
            dz = dh * gate * apply_activation_grad(z, g.activation)
            dg = dh * apply_activation(z, g.activation)
            return jnp.stack([dz, dg], axis=2).reshape(g.m, -1).astype(a.dtype)
        return acc.astype(a.dtype)

    return op


# ==== the sweep ===================================================================================
@dataclass
class Sweep:
    """The rows of one sweep run and their files, for either stack: `stack` "jax" (this
    script: jitted JAX ops over rotating input sets, baseline rows "xla") or "torch"
    (bench/sweep_tma_backward.py, which sets its own `measure` and `rel_err`; baseline rows
    "cublas")."""

    out_path: Path
    tuned_path: Path | None
    budget_s: float
    stack: str = "jax"
    measure: Callable[[Callable, Any], dict[str, Any]] = measure
    rel_err: Callable[[Any, Any], float] | None = None  # None: `_rel_err_all` (JAX arrays)
    start: float = field(default_factory=time.perf_counter)
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    env: dict[str, Any] = field(default_factory=dict)
    in_flight: str | None = None
    base: dict[str, Any] | None = None  # a committed table the new entries are merged into

    def left(self) -> bool:
        return time.perf_counter() - self.start < self.budget_s

    def write(self) -> None:
        what = {
            "jax": "Mosaic GPU training-step GEMM sweep (bench/sweep_mosaic_backward.py)",
            "torch": "Triton TMA training-step GEMM sweep (bench/sweep_tma_backward.py)",
        }
        data = {
            "what": what[self.stack],
            "budget_s": self.budget_s,
            "elapsed_s": round(time.perf_counter() - self.start, 1),
            "env": self.env,
            "in_flight": self.in_flight,
            "rows": self.rows,
            "skipped": self.skipped,
            "steps": self.totals(),
        }
        self.out_path.write_text(json.dumps(data, indent=1, default=str))
        if self.tuned_path is not None:
            table = tuned_file(self.rows, self.env, self.base, self.stack)
            self.tuned_path.write_text(json.dumps(table, indent=1))

    def totals(self) -> dict[str, dict[str, float]]:
        return step_totals(self.rows, BASELINE[self.stack])

    def run(self, g: StepGemm | WeightGradients, impl: str, op: Callable, sets: list, ref: Any,
            cfg: Any = None, outs: Any = None,
            extra: dict[str, Any] | None = None) -> dict[str, Any] | None:  # fmt: skip
        label = f"{g.name} {impl} {cfg if cfg is not None else ''}"
        if not self.left():
            self.skipped.append(label)
            return None
        row: dict[str, Any] = {
            "preset": g.preset, "role": g.role, "kind": g.kind, **g.fields(),
            "impl": impl, "config": _config_dict(cfg), "slots": outs.slots if outs else None,
            **(extra or {}),
        }  # fmt: skip
        self.in_flight = label
        self.write()
        try:
            res = self.measure(op, sets)
            first = res.pop("first")
            row.update(res)
            err = self.rel_err or _rel_err_all
            row["rel_err"] = err(first, ref) if ref is not None else 0.0
            row["tflops"] = g.flops() / (res["ms"] * 1e-3) / 1e12
            row["status"] = "ok" if row["rel_err"] <= REL_ERR_LIMIT else "WRONG"
            row["_out"] = first
        except Exception as exc:  # a config that does not compile or run is a result too
            row["status"] = "error"
            row["error"] = f"{type(exc).__name__}: {exc}"[:600]
            row["traceback"] = traceback.format_exc()[-1500:]
        self.in_flight = None
        out = row.pop("_out", None)
        self.rows.append(row)
        print(_row_line(row), flush=True)
        self.write()
        return {**row, "_out": out}


def _rel_err_all(out: Any, ref: Any) -> float:
    """The largest relative error over the outputs (a tuple: the stored pre-activation beside
    the output, or the products of a grouped launch)."""
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    return max(rel_err(o, r) for o, r in zip(outs, refs, strict=True))


def _row_line(r: dict[str, Any]) -> str:
    head = f"{r['preset']:<14} {r['role']:<26} {r['impl']:<7} {_config_str(r.get('config')):<30}"
    head += f" slots {r['slots']}" if r.get("slots") else "        "
    head += f" widths {r['widths']}" if r.get("widths") else ""
    if r["status"] == "error":
        return f"{head} ERROR {r['error'][:140]}"
    return (
        f"{head} {r['ms'] * 1e3:9.1f} µs {r['tflops']:6.1f} TF/s err {r['rel_err']:.1e} "
        f"compile {r['compile_s']:.1f}s {'' if r['status'] == 'ok' else r['status']}"
    )


BASELINE = {"jax": "xla", "torch": "cublas"}  # each stack's rows of the same product, for scale


def best_rows(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per (preset, role): the fastest correct kernel row (fitted or grid)."""
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["status"] != "ok" or r["impl"] in ("xla", "cublas", "apart"):
            continue
        key = f"{r['preset']}|{r['role']}"
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    return best


def step_totals(rows: list[dict[str, Any]], baseline: str = "xla") -> dict[str, dict[str, float]]:
    """Per preset, summed over the GEMMs measured: fitted, best and the baseline's products
    (ms; `baseline` the rows' impl, "xla" or "cublas")."""
    totals: dict[str, dict[str, float]] = {}
    best = best_rows(rows)
    for r in rows:
        if r["status"] != "ok" or "products" in r:  # the grouped launch: its GEMMs are counted
            continue
        zero = {"fitted_ms": 0.0, "best_ms": 0.0, f"{baseline}_ms": 0.0}
        t = totals.setdefault(r["preset"], zero)
        if r["impl"] in ("fitted", baseline):
            t[f"{r['impl']}_ms"] += r["ms"]
        if best.get(f"{r['preset']}|{r['role']}") is r:
            t["best_ms"] += r["ms"]
    return totals


def _shape_key(entry: dict[str, Any]) -> str:
    """What a table entry is for: its (M, N, K), or a grouped launch's products and K."""
    if "products" in entry:
        return json.dumps([entry["products"], entry["k"]])
    return json.dumps([entry["m"], entry["n"], entry["k"]])


def tuned_file(
    rows: list[dict[str, Any]],
    env: dict[str, Any],
    base: dict[str, Any] | None = None,
    stack: str = "jax",
) -> dict[str, Any]:
    """The best tiles per (kind, m, n, k), in tuned_hopper_backward.json's format (either
    stack's: jax_impl/mosaic/ or torch_impl/tma/); with `base` (a committed table), its
    entries of the shapes not measured here, and of other GPUs, are kept."""
    gpus = env.get("gpus") or [{}]
    commit = (env.get("git") or {}).get("commit")
    configs: dict[str, list[dict[str, Any]]] = {
        kind: list(entries) for kind, entries in ((base or {}).get("configs") or {}).items()
    }
    apart = {r["preset"]: r for r in rows if r["impl"] == "apart" and r["status"] == "ok"}
    for r in best_rows(rows).values():
        if "products" in r:  # the grouped launch, with what it replaces (timed in this run)
            if r["preset"] not in apart:
                continue
            entry = {"products": r["products"], "k": r["k"], "config": r["config"]}
            if r.get("widths"):  # each product's block_n (Mosaic GPU's linear_grouped)
                entry["widths"] = r["widths"]
            entry["apart_us"] = round(apart[r["preset"]]["ms"] * 1e3, 1)
        else:
            entry = {"m": r["m"], "n": r["n"], "k": r["k"], "config": r["config"]}
            if r["slots"] is not None:  # Mosaic GPU's staging slots (Triton has none)
                entry["slots"] = r["slots"]
        entry.update(us=round(r["ms"] * 1e3, 1), tflops=round(r["tflops"], 1))
        entry.update(gemm=f"{r['preset']} {r['role']}", gpu=gpus[0].get("name"), commit=commit)
        # this GPU's earlier entry for the shape goes; another GPU's stays (each GPU reads its own
        # first: mosaic/pipeline.measured_here_first)
        kept = [e for e in configs.get(r["kind"], [])
                if (_shape_key(e), e.get("gpu")) != (_shape_key(entry), entry["gpu"])]  # fmt: skip
        configs[r["kind"]] = [*kept, entry]
    about = {
        "jax": "Best Mosaic GPU tiles per GEMM kind of the training step and (M, N, K), read by "
        "jax_impl/mosaic/backward.fitted_config. Written by bench/sweep_mosaic_backward.py.",
        "torch": "Best Triton TMA tiles per GEMM kind of the training step and (M, N, K), read "
        "by torch_impl/tma/backward.step_config. Written by bench/sweep_tma_backward.py.",
    }
    version = "jax" if stack == "jax" else "triton"
    return {
        "about": about[stack],
        "gpu": gpus[0].get("name"),
        "commit": (env.get("git") or {}).get("commit"),
        version: (env.get("versions") or {}).get(version),
        "configs": configs,
    }


def _wanted(sw: Sweep, item: StepGemm | WeightGradients, roles: list[str] | None) -> bool:
    """Whether to time `item`: its role asked for (all without `roles`) and budget left (else
    it is listed as skipped)."""
    if roles and not any(role in item.role for role in roles):
        return False
    if not sw.left():
        sw.skipped.append(f"{item.name} (all)")
        return False
    return True


def sweep(sw: Sweep, presets: list[str], roles: list[str] | None = None) -> None:
    for preset in presets:
        for g in step_gemms(preset):
            if not _wanted(sw, g, roles):
                continue
            sets = make_sets(g, set_count(g))
            sw.run(g, "xla", xla_op(g), sets, None)
            plan = grid(g)
            first = sw.run(g, "fitted", mosaic_op(g, *plan[0], False), sets, None, *plan[0])
            ref = first["_out"] if first and first["status"] == "ok" else None
            for cfg, outs in plan[1:]:
                sw.run(g, "grid", mosaic_op(g, cfg, outs, False), sets, ref, cfg, outs)
            del sets
        wg = weight_gradients(preset)
        if not _wanted(sw, wg, roles):
            continue
        sets = grouped_sets(wg, grouped_set_count(wg))
        first = sw.run(wg, "apart", apart_op(wg), sets, None)
        ref = first["_out"] if first and first["status"] == "ok" else None
        for cfg, outs, widths in grouped_grid(wg):
            sw.run(wg, "grid", grouped_op(wg, cfg, widths), sets, ref, cfg, outs,
                   extra={"widths": list(widths)} if widths else None)  # fmt: skip
        del sets


def dry_run(presets: list[str]) -> int:
    """Lower every planned kernel for CUDA (no GPU): the plan, the layouts, shared memory."""
    import jax

    failures = count = 0
    for preset in presets:
        for g in step_gemms(preset):
            shapes = jax.eval_shape(functools.partial(make_sets, g, 1))[0]
            for cfg, outs in grid(g):
                count += 1
                try:
                    jax.jit(mosaic_op(g, cfg, outs, False)).trace(shapes).lower(
                        lowering_platforms=("cuda",)
                    )
                    print(f"ok    {g.name:<40} {cfg} slots {outs.slots}")
                except Exception as exc:
                    failures += 1
                    print(f"FAIL  {g.name:<40} {cfg}: {type(exc).__name__}: {exc}"[:300])
        wg = weight_gradients(preset)
        shapes = jax.eval_shape(functools.partial(grouped_sets, wg, 1))[0]
        for cfg, _, widths in grouped_grid(wg):
            count += 1
            try:
                op = grouped_op(wg, cfg, widths)
                jax.jit(op).trace(shapes).lower(lowering_platforms=("cuda",))
                print(f"ok    {wg.name:<40} {cfg} widths {widths}")
            except Exception as exc:
                failures += 1
                print(
                    f"FAIL  {wg.name:<40} {cfg} widths {widths}: {type(exc).__name__}: {exc}"[:300]
                )
    print(f"{count} kernels lowered for CUDA, {failures} failed")
    return 1 if failures else 0


def step_sweep_arguments(doc: str, budget_s: float, out_required: bool) -> argparse.ArgumentParser:
    """The command line both stacks' step sweeps share (this script, sweep_tma_backward.py)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("out", type=Path, nargs=None if out_required else "?", help="JSON to write")
    ap.add_argument("--tuned-out", type=Path, help="the best tiles (tuned_hopper_backward format)")
    ap.add_argument("--budget-s", type=float, default=budget_s, help="no new measurement after")
    ap.add_argument("--presets", default=",".join(PRESETS), help="comma-separated presets")
    ap.add_argument(
        "--roles", help="comma-separated parts of GEMM roles to sweep (e.g. 'layer 1 input')"
    )
    ap.add_argument(
        "--merge-into", type=Path, help="a committed table: --tuned-out keeps its other entries"
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = step_sweep_arguments(__doc__, 380.0, out_required=False)
    ap.add_argument("--dry-run", action="store_true", help="lower every kernel for CUDA; no GPU")
    args = ap.parse_args(argv)
    presets = args.presets.split(",")
    if args.dry_run:
        return dry_run(presets)
    if args.out is None:
        ap.error("the output JSON path is required")
    import jax

    if not any(d.platform == "gpu" for d in jax.devices()):
        print("no GPU visible to jax: use --dry-run on a CPU", file=sys.stderr)
        return 2
    from fusedmlp.bench.env import environment

    sw = Sweep(args.out, args.tuned_out, args.budget_s)
    sw.env = environment()
    if args.merge_into is not None:
        sw.base = json.loads(args.merge_into.read_text())
    sweep(sw, presets, args.roles.split(",") if args.roles else None)
    sw.write()
    for preset, t in sw.totals().items():
        print(f"{preset}: GEMMs fitted {t['fitted_ms']:.3f} ms, best {t['best_ms']:.3f} ms, "
              f"XLA's products {t['xla_ms']:.3f} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    sys.exit(main())
