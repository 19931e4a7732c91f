"""One-call H200 sweep of the pallas_mosaic kernels against XLA and jax's own Mosaic GPU matmul.

For every GEMM of llama3-8b, gpt-mlp and hf-blog-geglu (bf16; gated layers as ONE GEMM over the
packed [W|V] operand) it times, in priority order and within a time budget:

1. M=8192: XLA (the `xla` baseline's ops for the layer), jax's Hopper matmul example
   (`hopper_matmul_mgpu`, a plain GEMM of the same operands, no epilogue: the DSL's ceiling), and
   pallas_mosaic over a small grid of TileConfigs (tiles, stages, warp specialisation, epilogue
   subtiles, group_m), each checked against XLA's fp32 result (relative Frobenius error);
2. the whole MLPs at M=8192: XLA vs the pallas_mosaic layers chained with the best configs of 1;
3. M=512, 2048 and the odd M=8191 for a few GEMMs, and one float16 row;
4. what is left of the grid and the example's second config, if the budget allows.

`--pingpong` times, for every GEMM at M=8192, the committed tuned config (or the heuristic)
against the ping-pong configs (`pingpong_grid`: programs_per_sm=2 — each compute warpgroup a tile
of its own, the two taking turns at the K loop, so one's epilogue overlaps the other's K loop;
`pipeline.pingpong_matmul`), XLA beside them, then the whole MLPs with each layer's best.

`--short-k` sweeps the second product of a low-rank layer, act(t·V + b) (linear_act, silu, bias,
N = 14336, K = r = 64 / 128 / 256, M = 8192 and 512): XLA, the config `default_config` takes, the
heuristic's and the ping-pong grid — a tile's K loop is 1-4 slabs, so its epilogue and stores are
most of its time.

`--narrow` sweeps instead the first product of a low-rank layer, t = x·U (linear_act, identity, no
bias, K = 4096, N = r = 64 / 128 / 256, M = 512 and 8192, bf16): XLA's `x @ u` and a grid of tiles
for a narrow output over a long K (read-bound: M·K·2 bytes of x): the current default, 64-row
tiles, block_n = r, 64- and 128-deep K slabs, as many pipeline slots (≤ 8) as fit shared memory;
6-8 configs per (N, M), those that leave the busiest SM the fewest bytes to read first
(`narrow_grid`). The first pass times XLA and 4 configs of every (N, M), the second the rest
(48 measurements, ~100 s).

Timing: a jitted function runs the op on R rotating input sets (weights included; together more
than twice the 60 MB L2) back to back; it is dispatched `reps` times and timed by the host clock
around the last result — the median of 5 samples of ~50 ms, divided by reps·R. Compile time is
recorded apart. Results are written after every row (partial runs keep what they measured).

Usage on the GPU (after `python3 -m pip install --no-deps --no-build-isolation -e .`):
    python3 bench/sweep_mosaic.py OUT.json --tuned-out TUNED.json [--budget-s 150] [--full]
    python3 bench/sweep_mosaic.py OUT.json --narrow --tuned-out TUNED.json      (x·U, ~100 s)
    python3 bench/sweep_mosaic.py OUT.json --pingpong --tuned-out TUNED.json    (~150 s)
    python3 bench/sweep_mosaic.py OUT.json --short-k --tuned-out TUNED.json     (t·V, ~110 s)
TUNED.json has the format of jax_impl/mosaic/tuned_h200.json (copy it there to make
`default_config` use the measured tiles; the narrow mode's holds only x·U entries: merge its
`configs` lists into the committed file instead). On a CPU: `--dry-run` lowers every planned
kernel for CUDA (Mosaic's checks, shared memory included) without timing; `--smoke` runs the
whole script on tiny shapes under the Mosaic GPU interpreter (nothing it prints is a
measurement). With `--narrow` both do the narrow mode's kernels.
"""

from __future__ import annotations

import argparse
import faulthandler
import functools
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

L2_BYTES = 60 * 2**20  # H200
MAX_SETS = 8
SAMPLES = 5
SAMPLE_S = 0.05
REL_ERR_LIMIT = 2e-2  # bf16 GEMM vs fp32: ~2e-3 expected; above this a kernel is wrong
# A measurement (compile included) that takes longer than this is a hang: the process dumps its
# stacks and exits, and the JSON written so far names the variant in flight ("in_flight").
WATCHDOG_S = 90


# ==== what is swept ===============================================================================
@dataclass(frozen=True)
class Gemm:
    """One layer of a preset as one GEMM: family, output width n, K, activation, bias."""

    name: str
    family: str  # "gated" (packed [W|V], 2n operand columns) or "linear_act"
    n: int
    k: int
    activation: str  # the kernel activation ("silu", "gelu_tanh", "identity", ...)
    bias: bool

    @property
    def op_n(self) -> int:
        from fusedmlp.common.packing import packed_width

        return packed_width(self.n) if self.family == "gated" else self.n

    def flops(self, m: int) -> int:
        return 2 * m * self.op_n * self.k


GEMMS = {
    "llama.gate_up": Gemm("llama.gate_up", "gated", 14336, 4096, "silu", False),
    "llama.down": Gemm("llama.down", "linear_act", 4096, 14336, "identity", False),
    "gpt.up": Gemm("gpt.up", "linear_act", 16384, 4096, "gelu_tanh", True),
    "gpt.down": Gemm("gpt.down", "linear_act", 4096, 16384, "identity", True),
    "hf.gate_up": Gemm("hf.gate_up", "gated", 3072, 768, "gelu_tanh", False),
    "hf.down": Gemm("hf.down", "linear_act", 768, 3072, "identity", False),
}
MLPS = {
    "llama3-8b": ("llama.gate_up", "llama.down"),
    "gpt-mlp": ("gpt.up", "gpt.down"),
    "hf-blog-geglu": ("hf.gate_up", "hf.down"),
}


def _cfg(
    bm: int,
    bn: int,
    bk: int,
    stages: int,
    ws: bool = True,
    sub: int = 1,
    group_m: int = 8,
    pingpong: bool = False,
) -> Any:
    from fusedmlp.common.config import TileConfig

    return TileConfig(
        bm,
        bn,
        bk,
        group_m=group_m,
        num_warps=4,
        num_stages=stages,
        warp_specialize=ws,
        epilogue_subtile=sub,
        programs_per_sm=2 if pingpong else 1,
    )


def pingpong_grid(family: str) -> list[Any]:
    """Ping-pong configs (a compute warpgroup's whole tile ≤ 128×128 fp32 of accumulator; the
    ring's slots and both warpgroups' staging within 227 KiB): 128×128 operand tiles at 6 and 5
    slots, the 64-row tile with a 256-wide operand, and a wider snaking band."""
    if family == "gated":  # block_n = output columns: the operand tile is 2·block_n
        return [
            _cfg(128, 64, 64, 6, pingpong=True),
            _cfg(128, 64, 64, 5, pingpong=True),
            _cfg(64, 128, 64, 4, pingpong=True),
            _cfg(128, 64, 64, 6, group_m=16, pingpong=True),
        ]
    return [
        _cfg(128, 128, 64, 6, sub=2, pingpong=True),
        _cfg(128, 128, 64, 5, pingpong=True),
        _cfg(64, 256, 64, 4, sub=2, pingpong=True),
        _cfg(128, 128, 64, 6, sub=2, group_m=16, pingpong=True),
    ]


def grid(family: str, m: int, *, first: bool) -> list[Any]:
    """Our configs for one GEMM: `first` the few of phase 1 (the heuristic first), else the rest.
    Every one fits 227 KiB of shared memory (pipeline.check_config; --dry-run lowers them)."""
    from fusedmlp.jax_impl.mosaic import pipeline

    default = pipeline._heuristic(family, m, 4096)  # every GEMM swept here is > 128 wide
    if family == "gated":  # block_n = output columns; the operand tile is 2·block_n
        head = [default, _cfg(256, 64, 64, 4), _cfg(128, 64, 64, 5)]
        tail = [
            _cfg(128, 128, 64, 3),
            _cfg(128, 128, 64, 4, group_m=16),
            _cfg(128, 64, 64, 4, ws=False),
            _cfg(64, 128, 64, 4),
            _cfg(256, 64, 64, 3),
        ]
    else:
        head = [default, _cfg(256, 128, 64, 4, sub=2), _cfg(128, 128, 64, 5)]
        tail = [
            _cfg(128, 256, 64, 3),
            _cfg(128, 256, 64, 4, sub=2, group_m=16),
            _cfg(128, 128, 64, 4, ws=False),
            _cfg(64, 256, 64, 4, sub=2),
            _cfg(128, 256, 128, 2, sub=2),
            # whole swizzle atoms, not a power of two: N = 768 in 4 column tiles (1.94 waves of
            # 132 SMs at M = 8192, where 128×256 leaves 1.45); 5 slots exceed shared memory
            _cfg(128, 192, 64, 4),
        ]
    if m <= 2048:  # fewer tiles than 2 waves of 132 SMs at 128×256: smaller tiles matter
        head = [
            default,
            _cfg(
                64,
                256 if family == "linear_act" else 128,
                64,
                4,
                sub=2 if family == "linear_act" else 1,
            ),
        ]
        tail = [_cfg(128, 128, 64, 5) if family == "linear_act" else _cfg(128, 64, 64, 5)]
    seen: list[Any] = []
    for c in head if first else tail:
        if c not in seen and (first or c not in grid(family, m, first=True)):
            seen.append(c)
    return seen


def example_configs(*, first: bool) -> list[Any]:
    """jax's example at the tiles its own sweep favours (128×128 per warpgroup, 64-wide K, 4
    steps, 64×64 epilogue tiles): the compute warpgroups side by side along N, then along M."""
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm

    mk = functools.partial(
        hm.TuningConfig,
        tile_m=128,
        tile_n=128,
        tile_k=64,
        max_concurrent_steps=4,
        epi_tile_n=64,
        epi_tile_m=64,
        grid_minor_dim=hm.MatmulDimension.N,
        grid_tile_width=8,
    )
    if first:
        return [mk(wg_dimension=hm.MatmulDimension.N)]
    return [
        mk(wg_dimension=hm.MatmulDimension.M),
        mk(wg_dimension=hm.MatmulDimension.N, grid_tile_width=16),
    ]


# ==== narrow mode: x·U, the first product of a low-rank layer =====================================
# t = x·U of a factorised layer: K = 4096 (llama3-8b's d_model), r output columns, no bias, no
# activation. It is read-bound (M·K·2 bytes of x against 2·M·K·r FLOPs), and Mosaic has no split
# K, so a block's whole K loop is serial: what counts is how many blocks share the reads and how
# many bytes each keeps in flight. The heuristic's 128-row tile gives 4 blocks at M = 512 and 64
# at M = 8192 on 132 SMs; 64-row tiles double that, narrower column tiles multiply it again.
NARROW_K = 4096
NARROW_RANKS = (64, 128, 256)
NARROW_MS = (512, 8192)
NARROW_HEAD = 4  # configs per (N, M) in the first pass: the default and the 3 best-ranked
NARROW_GEMMS = {
    f"xU.r{r}": Gemm(f"xU.r{r}", "linear_act", r, NARROW_K, "identity", False) for r in NARROW_RANKS
}
# The second product of a low-rank layer, act(t·V + b): llama3-8b's up width over K = r (the
# --short-k mode). 1-4 K slabs a tile: the epilogue (silu: two MUFU operations an element) and the
# stores are most of a tile's time, which is what ping-pong overlaps with the other tile's K loop.
SHORT_K_N = 14336
SHORT_K_MS = (8192, 512)
SHORT_K_GEMMS = {
    f"tV.r{r}": Gemm(f"tV.r{r}", "linear_act", SHORT_K_N, r, "silu", True) for r in NARROW_RANKS
}
# The same GEMM without the activation, at M = 8192 only: what silu's MUFU work costs. Not a layer
# of any preset: never a tuned entry (it would share tV.r64's key).
SHORT_K_GEMMS["tV.r64.identity"] = Gemm(
    "tV.r64.identity", "linear_act", SHORT_K_N, 64, "identity", True
)
NOT_TUNED = {"tV.r64.identity"}


def _deepest(bm: int, bn: int, bk: int, *, ws: bool, sub: int = 1, most: int = 8) -> Any:
    """The tile with the most pipeline slots (at most `most`) that fits shared memory: a
    read-bound K loop wants as many bytes in flight as the block can hold."""
    from fusedmlp.jax_impl.mosaic import pipeline

    for stages in range(most, 1, -1):
        cfg = _cfg(bm, bn, bk, stages, ws=ws, sub=sub)
        try:
            pipeline.check_config(cfg, "bfloat16", num_weights=1, residual=False)
        except ValueError:
            continue
        return cfg
    raise ValueError(f"no num_stages in [2, {most}] makes {_cfg(bm, bn, bk, 2, ws, sub)} legal")


def _narrow_ranked(n: int) -> list[Any]:
    """x·U tiles for an output n ≤ 256 wide, most promising first (before the M-dependent sort).
    Legal at 64 rows (pipeline.plan_tiles): one warpgroup (ws=False) below a 256-wide tile, since
    warp specialisation there splits the rows between two compute warpgroups (block_m ≥ 128);
    at 256 columns also warp-specialised, the two compute warpgroups splitting the columns."""
    if n <= 64:
        return [
            _deepest(64, 64, 128, ws=False),  # the TMA kernel's x·U tile for r ≤ 64: 6 slots
            _deepest(64, 64, 64, ws=False),  # 8 slots of 64-deep slabs
            _deepest(128, 64, 128, ws=True),  # the heuristic's rows, 128-deep slabs
            _deepest(128, 64, 64, ws=True),
            _cfg(64, 64, 128, 4, ws=False),  # fewer slots: does depth matter at all?
        ]
    if n <= 128:
        return [
            _deepest(64, 128, 128, ws=False),  # the TMA kernel's tile for r ≤ 128: 4 slots
            _deepest(64, 128, 64, ws=False),
            _deepest(64, 64, 128, ws=False),  # two column tiles: twice the blocks
            _deepest(64, 64, 64, ws=False),
            _deepest(128, 128, 64, ws=True, sub=2),  # the heuristic's tile, 6 slots
            _deepest(128, 128, 128, ws=True, sub=2),
        ]
    return [
        _deepest(64, n, 64, ws=True, sub=2),  # block_n = width at 64 rows, split along N
        _deepest(128, 128, 64, ws=True, sub=2),  # the TMA kernel's tile for r ≤ 256
        _deepest(64, 128, 128, ws=False),
        _deepest(64, 64, 128, ws=False),  # four column tiles: the most blocks
        _deepest(64, n, 128, ws=True, sub=2),  # 128-deep slabs: 2 slots fit
        _deepest(64, 128, 64, ws=False),
        _deepest(64, n, 64, ws=False, sub=4),  # one warpgroup holding the 64×256 accumulator
    ]


def _busiest_sm_bytes(cfg: Any, m: int, n: int, k: int) -> int:
    """Bytes the busiest SM reads (the X and weight slabs of its tiles, one tile after another,
    one block per SM): the read-bound model that orders the narrow grid."""
    from fusedmlp.jax_impl.mosaic import pipeline

    tiles = math.ceil(m / cfg.block_m) * math.ceil(n / cfg.block_n)
    return math.ceil(tiles / pipeline.DEFAULT_NUM_SMS) * (cfg.block_m + cfg.block_n) * k * 2


def narrow_grid(g: Gemm, m: int, *, first: bool) -> list[Any]:
    """The x·U configs for GEMM g at M = m: `first` the default (what runs now: the tuned entry or
    the heuristic, pipeline.default_config) and the best-ranked, else the rest; ≤ 10 in all.
    Ranked by the bytes the busiest SM must read (fewest first), ties in _narrow_ranked's order.
    Every one fits 227 KiB of shared memory (pipeline.check_config; --dry-run --narrow lowers
    them)."""
    from fusedmlp.jax_impl.mosaic import pipeline

    n = g.n
    default = pipeline.default_config("linear_act", m, n, g.k, "bfloat16")
    ranked = sorted(_narrow_ranked(n), key=lambda c: _busiest_sm_bytes(c, m, n, g.k))
    ordered = list(dict.fromkeys([default, pipeline._heuristic("linear_act", m, n), *ranked]))
    return ordered[:NARROW_HEAD] if first else ordered[NARROW_HEAD:]


# ==== inputs ======================================================================================
def make_sets(g: Gemm, m: int, dtype: Any, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """`count` independent input sets of one GEMM (x, w/v or the packed wv, biases)."""
    import jax
    import jax.numpy as jnp

    from fusedmlp.jax_impl.packing import pack_gated

    sets = []
    for i in range(count):
        keys = jax.random.split(jax.random.key(seed * 100 + i), 5)
        x = jax.random.normal(keys[0], (m, g.k), jnp.float32).astype(dtype)
        scale = g.k**-0.5
        w = (jax.random.normal(keys[1], (g.k, g.n), jnp.float32) * scale).astype(dtype)
        s: dict[str, Any] = {"x": x, "w": w}
        if g.bias:
            s["b"] = (jax.random.normal(keys[2], (g.n,), jnp.float32) * 0.1).astype(dtype)
        if g.family == "gated":
            s["v"] = (jax.random.normal(keys[3], (g.k, g.n), jnp.float32) * scale).astype(dtype)
            if g.bias:
                s["c"] = (jax.random.normal(keys[4], (g.n,), jnp.float32) * 0.1).astype(dtype)
            s["wv"] = pack_gated(s["w"], s["v"])
            s["bc"] = pack_gated(s["b"], s["c"]) if g.bias else None
        sets.append(s)
    return sets


def set_count(g: Gemm, m: int, itemsize: int, smoke: bool) -> int:
    if smoke:
        return 2
    set_bytes = itemsize * (m * g.k + g.k * g.op_n + m * g.n)
    return max(2, min(MAX_SETS, math.ceil(2 * L2_BYTES / set_bytes)))


# ==== the ops =====================================================================================
def xla_op(g: Gemm) -> Callable[[dict[str, Any]], Any]:
    """The layer as the `xla` baseline computes it (jax_impl/baselines.py): jnp.matmul in the
    dtype, jax.nn activations; a gated layer as two matmuls."""
    import jax.numpy as jnp

    from fusedmlp.jax_impl.baselines import _ACTIVATIONS

    act = _ACTIVATIONS[g.activation]

    def op(s: dict[str, Any]) -> Any:
        z = jnp.matmul(s["x"], s["w"])
        if g.bias:
            z = z + s["b"]
        if g.family != "gated":
            return act(z)
        u = jnp.matmul(s["x"], s["v"])
        if g.bias:
            u = u + s["c"]
        return act(z) * u

    return op


def reference_fp32(g: Gemm, s: dict[str, Any]) -> Any:
    """The layer in fp32 by XLA (HIGHEST precision products of the 16-bit inputs)."""
    import jax
    import jax.numpy as jnp

    from fusedmlp.jax_impl.activations import apply_activation

    f = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
    x, w = s["x"].astype(jnp.float32), s["w"].astype(jnp.float32)
    z = f(x, w) + (s["b"].astype(jnp.float32) if g.bias else 0.0)
    if g.family != "gated":
        return apply_activation(z, g.activation)
    u = f(x, s["v"].astype(jnp.float32)) + (s["c"].astype(jnp.float32) if g.bias else 0.0)
    return apply_activation(z, g.activation) * u


def mosaic_op(g: Gemm, config: Any, interpret: bool) -> Callable[[dict[str, Any]], Any]:
    from fusedmlp.jax_impl.mosaic import gated, linear_act

    if g.family == "gated":
        return lambda s: gated.gated_fwd(
            s["x"],
            s["wv"],
            s["bc"] if g.bias else None,  # the layer's own bias, whatever the set holds
            n=g.n,
            activation=g.activation,
            config=config,
            interpret=interpret,
        )
    return lambda s: linear_act.linear_act_fwd(
        s["x"],
        s["w"],
        s["b"] if g.bias else None,
        None,
        activation=g.activation,
        config=config,
        interpret=interpret,
    )


def example_op(g: Gemm, config: Any) -> Callable[[dict[str, Any]], Any]:
    """jax's Hopper matmul example on the same operands (x @ wv for gated): GEMM only."""
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm

    key = "wv" if g.family == "gated" else "w"
    return lambda s: hm.matmul(s["x"], s[key], c=None, config=config)


# ==== measurement =================================================================================
def rel_err(out: Any, ref: Any) -> float:
    import jax.numpy as jnp

    out = jnp.asarray(out, jnp.float32)
    num = float(jnp.linalg.norm((out - ref).ravel()))
    den = float(jnp.linalg.norm(ref.ravel()))
    return num / den if den else num


def measure(op: Callable[[dict[str, Any]], Any], sets: list[dict[str, Any]]) -> dict[str, Any]:
    """Compile, then the median per-op time of back-to-back jitted runs over the rotating sets."""
    import jax

    batch = jax.jit(lambda ss: [op(s) for s in ss])
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    try:
        return _measure(batch, sets)
    finally:
        faulthandler.cancel_dump_traceback_later()


def _measure(batch: Callable[..., Any], sets: list[dict[str, Any]]) -> dict[str, Any]:
    import jax

    t0 = time.perf_counter()
    outs = batch(sets)
    jax.block_until_ready(outs)
    compile_s = time.perf_counter() - t0
    first = outs[0]
    t0 = time.perf_counter()
    jax.block_until_ready(batch(sets))
    once = time.perf_counter() - t0
    reps = max(1, int(SAMPLE_S / max(once, 1e-6)))
    samples = []
    for _ in range(SAMPLES):
        t0 = time.perf_counter()
        for _ in range(reps):
            outs = batch(sets)
        jax.block_until_ready(outs)
        samples.append((time.perf_counter() - t0) / (reps * len(sets)))
    ms = statistics.median(samples) * 1e3
    return {
        "ms": ms,
        "ms_min": min(samples) * 1e3,
        "ms_max": max(samples) * 1e3,
        "compile_s": compile_s,
        "reps": reps,
        "sets": len(sets),
        "first": first,
    }


@dataclass
class Sweep:
    out_path: Path
    tuned_path: Path | None
    budget_s: float
    smoke: bool
    narrow: bool = False
    start: float = field(default_factory=time.perf_counter)
    rows: list[dict[str, Any]] = field(default_factory=list)
    mlps: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    env: dict[str, Any] = field(default_factory=dict)
    in_flight: str | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> bool:
        return self.elapsed() < self.budget_s

    def write(self) -> None:
        data = {
            "what": "pallas_mosaic sweep (bench/sweep_mosaic.py)",
            "smoke": self.smoke,
            "narrow": self.narrow,
            "budget_s": self.budget_s,
            "elapsed_s": round(self.elapsed(), 1),
            "env": self.env,
            "in_flight": self.in_flight,
            "rows": self.rows,
            "mlps": self.mlps,
            "skipped": self.skipped,
            "best": best_rows(self.rows),
        }
        self.out_path.write_text(json.dumps(data, indent=1, default=str))
        if self.tuned_path is not None:
            self.tuned_path.write_text(json.dumps(tuned_file(self.rows, self.env), indent=1))

    def run(
        self,
        g: Gemm,
        m: int,
        impl: str,
        op: Callable,
        sets: list[dict[str, Any]],
        ref: Any,
        config: Any,
        dtype: str = "bfloat16",
    ) -> dict[str, Any] | None:
        label = f"{g.name} M={m} {impl} {config if config is not None else ''}"
        if not self.left():
            self.skipped.append(label)
            return None
        row: dict[str, Any] = {
            "gemm": g.name,
            "family": g.family,
            "m": m,
            "n": g.n,
            "k": g.k,
            "op_n": g.op_n,
            "dtype": dtype,
            "impl": impl,
            "config": _config_dict(config),
        }
        self.in_flight = label
        self.write()
        try:
            res = measure(op, sets)
            row.update({k: v for k, v in res.items() if k != "first"})
            row["rel_err"] = rel_err(res["first"], ref)
            row["tflops"] = g.flops(m) / (res["ms"] * 1e-3) / 1e12
            row["status"] = "ok" if row["rel_err"] <= REL_ERR_LIMIT else "WRONG"
        except Exception as exc:  # a config that does not compile or run is a result too
            row["status"] = "error"
            row["error"] = f"{type(exc).__name__}: {exc}"[:600]
            if "exceeds available shared memory" not in str(exc):
                row["traceback"] = traceback.format_exc()[-1500:]
        self.in_flight = None
        self.rows.append(row)
        print(_row_line(row), flush=True)
        self.write()
        return row


def _config_dict(config: Any) -> Any:
    if config is None:
        return None
    if hasattr(config, "to_dict"):
        return config.to_dict()
    d = {k: getattr(config, k) for k in config.__dataclass_fields__}
    return {
        k: (str(v) if not isinstance(v, (int, float, bool, type(None))) else v)
        for k, v in d.items()
    }


def _config_str(cfg: Any) -> str:
    if isinstance(cfg, dict) and "block_m" in cfg:
        return (
            f"{cfg['block_m']}x{cfg['block_n']}x{cfg['block_k']} s{cfg['num_stages']} "
            f"{'ws' if cfg['warp_specialize'] else '1wg'} sub{cfg['epilogue_subtile']} "
            f"g{cfg['group_m']}" + (" pingpong" if cfg.get("programs_per_sm") == 2 else "")
        )
    if isinstance(cfg, dict):
        return f"wg{cfg.get('wg_dimension')} gw{cfg.get('grid_tile_width')}"
    return ""


def _row_line(r: dict[str, Any]) -> str:
    dt = {"bfloat16": "bf16", "float16": "fp16"}.get(r["dtype"], r["dtype"])
    head = f"{r['gemm']:<14} M={r['m']:<5} {dt} {r['impl']:<14} {_config_str(r.get('config')):<32}"
    if r["status"] == "error":
        return f"{head} ERROR {r['error'][:120]}"
    return (
        f"{head} {r['ms']:8.4f} ms {r['tflops']:6.1f} TF/s err {r['rel_err']:.1e} "
        f"compile {r['compile_s']:.1f}s {r['status'] if r['status'] != 'ok' else ''}"
    )


def best_rows(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per (gemm, m, dtype, impl): the fastest correct row."""
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["status"] != "ok":
            continue
        key = f"{r['gemm']}|{r['m']}|{r['dtype']}|{r['impl']}"
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    return best


def tuned_file(rows: list[dict[str, Any]], env: dict[str, Any]) -> dict[str, Any]:
    """The best pallas_mosaic config per (family, m, n, k), in tuned_h200.json's format."""
    configs: dict[str, list[dict[str, Any]]] = {}
    for _key, r in sorted(best_rows(rows).items()):
        if r["impl"] != "pallas_mosaic" or r["dtype"] != "bfloat16" or r["m"] & (r["m"] - 1):
            continue  # odd M rows measure the row padding, not a tile choice
        if r["gemm"] in NOT_TUNED:
            continue
        configs.setdefault(r["family"], []).append(
            {
                "m": r["m"],
                "n": r["n"],
                "k": r["k"],
                "dtype": r["dtype"],
                "config": r["config"],
                "ms": round(r["ms"], 5),
                "tflops": round(r["tflops"], 1),
                "gemm": r["gemm"],
            }
        )
    gpus = env.get("gpus") or [{}]
    return {
        "about": "Best pallas_mosaic TileConfigs per (family, N, K, M), read by "
        "jax_impl/mosaic/pipeline.default_config. Written by bench/sweep_mosaic.py.",
        "gpu": gpus[0].get("name"),
        "commit": (env.get("git") or {}).get("commit"),
        "jax": (env.get("versions") or {}).get("jax"),
        "configs": configs,
    }


# ==== phases ======================================================================================
def sweep_gemm(
    sw: Sweep,
    g: Gemm,
    m: int,
    *,
    ours: list[Any],
    examples: list[Any],
    xla: bool,
    dtype_name: str = "bfloat16",
    interpret: bool = False,
) -> None:
    import jax.numpy as jnp

    if not sw.left():
        sw.skipped.append(f"{g.name} M={m} (all)")
        return
    dtype = jnp.dtype(dtype_name)
    sets = make_sets(g, m, dtype, set_count(g, m, dtype.itemsize, sw.smoke))
    ref = reference_fp32(g, sets[0])
    if xla:
        sw.run(g, m, "xla", xla_op(g), sets, ref, None, dtype_name)
    for cfg in examples:
        sw.run(g, m, "mgpu_example", example_op(g, cfg), sets, ref, cfg, dtype_name)
    for cfg in ours:
        sw.run(g, m, "pallas_mosaic", mosaic_op(g, cfg, interpret), sets, ref, cfg, dtype_name)
    del sets, ref


def sweep_pingpong(sw: Sweep, m: int, interpret: bool) -> None:
    """Every GEMM: XLA, the config `default_config` takes now, the ping-pong grid; then the MLPs
    with each layer's best (the smoke: the interpreter's tiles, ping-pong and not)."""
    from fusedmlp.jax_impl.mosaic import pipeline

    for g in GEMMS.values():
        if sw.smoke:
            ws = pipeline.INTERPRET_CONFIG
            ours = [ws, dataclass_replace(ws, programs_per_sm=2)]
        else:
            now = pipeline.default_config(g.family, m, g.n, g.k, "bfloat16")
            ours = [now, *(c for c in pingpong_grid(g.family) if c != now)]
        sweep_gemm(sw, g, m, ours=ours, examples=[], xla=True, interpret=interpret)
    for preset in MLPS:
        sweep_mlp(sw, preset, m, interpret)


def best_config(sw: Sweep, gemm: str, m: int) -> Any:
    from fusedmlp.common.config import TileConfig

    r = best_rows(sw.rows).get(f"{gemm}|{m}|bfloat16|pallas_mosaic")
    return TileConfig.from_dict(r["config"]) if r else None


def sweep_mlp(sw: Sweep, preset: str, m: int, interpret: bool) -> None:
    """XLA's whole MLP vs the pallas_mosaic layers with their best configs, packed once."""
    import jax
    import jax.numpy as jnp

    from fusedmlp.common.params import init_params
    from fusedmlp.common.presets import get_preset
    from fusedmlp.jax_impl import baselines
    from fusedmlp.jax_impl.packing import pack_params

    if not sw.left():
        sw.skipped.append(f"mlp {preset} M={m}")
        return
    spec = get_preset(preset).spec
    if sw.smoke:
        spec = SMOKE_SPECS[preset]
    names = MLPS[preset]
    configs = [best_config(sw, name, m) for name in names]
    if any(c is None for c in configs):
        sw.skipped.append(f"mlp {preset} M={m} (a layer has no measured config)")
        return
    dtype = jnp.dtype(spec.dtype)
    layer_bytes = sum(
        spec.widths[i] * spec.widths[i + 1] * (2 if spec.gated else 1)
        for i in range(spec.num_layers)
    )
    count = (
        2
        if sw.smoke
        else max(
            2,
            min(
                MAX_SETS,
                math.ceil(2 * L2_BYTES / (dtype.itemsize * (layer_bytes + m * sum(spec.widths)))),
            ),
        )
    )
    sets = []
    for i in range(count):
        params = {k: jnp.asarray(v) for k, v in init_params(spec, seed=i).items()}
        x = jax.random.normal(jax.random.key(1000 + i), (m, spec.d_in), jnp.float32).astype(dtype)
        sets.append({"x": x, "p": params, "packed": pack_params(spec, params)})

    def ours(s: dict[str, Any]) -> Any:
        h = s["x"]
        for layer, cfg in zip(spec.layers(), configs, strict=True):
            g = GEMMS[names[layer.index]]
            i = layer.index
            if layer.gated:
                h = mosaic_op(dataclass_replace(g, n=layer.d_out, k=layer.d_in), cfg, interpret)(
                    {"x": h, "wv": s["packed"][f"wv{i}"], "bc": s["packed"].get(f"bc{i}")}
                )
            else:
                h = mosaic_op(dataclass_replace(g, n=layer.d_out, k=layer.d_in), cfg, interpret)(
                    {"x": h, "w": s["packed"][f"w{i}"], "b": s["packed"].get(f"b{i}")}
                )
        return h

    def xla(s: dict[str, Any]) -> Any:
        return baselines.xla(s["x"], s["p"], spec)

    flops = sum(
        2 * m * spec.widths[i] * spec.widths[i + 1] * (2 if layer.gated else 1)
        for i, layer in enumerate(spec.layers())
    )
    ref = None
    for impl, op in (("xla", xla), ("pallas_mosaic", ours)):
        row: dict[str, Any] = {
            "mlp": preset,
            "m": m,
            "impl": impl,
            "configs": [_config_dict(c) for c in configs] if impl != "xla" else None,
        }
        sw.in_flight = f"mlp {preset} M={m} {impl}"
        sw.write()
        try:
            res = measure(op, sets)
            out = jnp.asarray(res.pop("first"), jnp.float32)
            ref = out if ref is None else ref
            row.update(res)
            row["tflops"] = flops / (res["ms"] * 1e-3) / 1e12
            row["rel_err_vs_xla"] = rel_err(out, ref)
            row["status"] = "ok"
        except Exception as exc:
            row["status"] = "error"
            row["error"] = f"{type(exc).__name__}: {exc}"[:600]
            row["traceback"] = traceback.format_exc()[-1500:]
        sw.in_flight = None
        sw.mlps.append(row)
        print(
            f"MLP {preset:<14} M={m:<5} {impl:<14} "
            + (
                f"{row['ms']:8.4f} ms {row['tflops']:6.1f} TF/s err vs xla "
                f"{row['rel_err_vs_xla']:.1e}"
                if row["status"] == "ok"
                else row["error"][:200]
            ),
            flush=True,
        )
        sw.write()


def dataclass_replace(g: Any, **kw: Any) -> Any:
    import dataclasses

    return dataclasses.replace(g, **kw)


def sweep_short_k(sw: Sweep, interpret: bool) -> None:
    """The short-K mode: t·V at every rank and M (8192 first), XLA's silu(t @ v + b), the config
    `default_config` takes now, the heuristic's (where a tuned entry replaced it) and the
    ping-pong grid."""
    from fusedmlp.jax_impl.mosaic import pipeline

    for m in (128,) if sw.smoke else SHORT_K_MS:
        for g in SHORT_K_GEMMS.values():
            if g.name in NOT_TUNED and m != SHORT_K_MS[0]:
                continue
            if sw.smoke:
                ws = pipeline.INTERPRET_CONFIG
                ours = [ws, dataclass_replace(ws, programs_per_sm=2)]
            else:
                now = pipeline.default_config(g.family, m, g.n, g.k, "bfloat16")
                heuristic = pipeline._heuristic(g.family, m, g.n)
                ours = list(dict.fromkeys([now, heuristic, *pingpong_grid(g.family)]))
            sweep_gemm(sw, g, m, ours=ours, examples=[], xla=True, interpret=interpret)


def sweep_narrow(sw: Sweep, interpret: bool) -> None:
    """The narrow mode: x·U at every (N, M), XLA's `x @ u` and the first configs of each, then
    the rest of each grid. M = 512 before 8192 (JAX's two GEMMs lose to XLA at 512)."""
    ms = (64, 128) if sw.smoke else NARROW_MS
    for first in (True, False):
        for m in ms:
            for g in NARROW_GEMMS.values():
                ours = narrow_grid(g, m, first=first)
                sweep_gemm(sw, g, m, ours=ours, examples=[], xla=first, interpret=interpret)


# ==== smoke mode: tiny shapes under the interpreter ===============================================
def _smoke_specs() -> dict[str, Any]:
    from fusedmlp.common.spec import MLPSpec

    return {
        "llama3-8b": MLPSpec((64, 128, 64), "swiglu", bias=False, dtype="bfloat16"),
        "gpt-mlp": MLPSpec((64, 128, 64), "gelu_tanh", bias=True, dtype="bfloat16"),
        "hf-blog-geglu": MLPSpec((64, 128, 64), "geglu_tanh", bias=False, dtype="bfloat16"),
    }


SMOKE_SPECS: dict[str, Any] = {}


def smoke_setup() -> None:
    """Shrink every GEMM to a few tiles and the grid to interpreter-friendly configs."""
    from fusedmlp.jax_impl.mosaic import pipeline

    # x·U keeps its widths and the real narrow grid over two 128-deep K slabs, less the
    # warp-specialised tiles: 1.5-3 s a call under the interpreter, seven calls a measurement
    # (the dense smoke runs INTERPRET_CONFIG's warp-specialised path; --dry-run --narrow lowers
    # them all).
    for name, g in list(NARROW_GEMMS.items()):
        NARROW_GEMMS[name] = dataclass_replace(g, k=256)
    full_narrow_grid = narrow_grid

    def smoke_narrow_grid(g: Gemm, m: int, *, first: bool) -> list[Any]:
        return [c for c in full_narrow_grid(g, m, first=first) if not c.warp_specialize]

    globals()["narrow_grid"] = smoke_narrow_grid

    SMOKE_SPECS.update(_smoke_specs())
    for name, g in list(GEMMS.items()):
        GEMMS[name] = dataclass_replace(g, n=128 if g.family == "gated" else 64, k=64)
    GEMMS["gpt.up"] = dataclass_replace(GEMMS["gpt.up"], n=128)
    GEMMS["llama.gate_up"] = dataclass_replace(GEMMS["llama.gate_up"], n=128)
    ws = pipeline.INTERPRET_CONFIG

    def smoke_grid(family: str, m: int, *, first: bool) -> list[Any]:
        del m
        if not first:
            return []
        return [ws, _cfg(64, 64, 32, 2, ws=False)]

    globals()["grid"] = smoke_grid


# ==== main ========================================================================================
def table(sw: Sweep) -> str:
    best = best_rows(sw.rows)
    lines = [
        f"{'gemm':<18} {'M':>5} {'xla ms':>9} {'xla TF':>7} {'example TF':>10} "
        f"{'ours ms':>9} {'ours TF':>7} {'vs xla':>6} {'vs ex':>6}  best config"
    ]
    order = list(GEMMS) + list(NARROW_GEMMS)
    keys = sorted(
        {(r["gemm"], r["m"], r["dtype"]) for r in sw.rows},
        key=lambda t: (order.index(t[0]) if t[0] in order else 99, -t[1], t[2]),
    )
    for gemm, m, dtype in keys:
        x, e, o = (
            best.get(f"{gemm}|{m}|{dtype}|{impl}")
            for impl in ("xla", "mgpu_example", "pallas_mosaic")
        )
        name = gemm if dtype == "bfloat16" else f"{gemm} fp16"
        lines.append(
            f"{name:<18} {m:>5} "
            f"{x['ms'] if x else float('nan'):9.4f} {x['tflops'] if x else float('nan'):7.1f} "
            f"{e['tflops'] if e else float('nan'):10.1f} "
            f"{o['ms'] if o else float('nan'):9.4f} {o['tflops'] if o else float('nan'):7.1f} "
            f"{(x['ms'] / o['ms']) if x and o else float('nan'):6.3f} "
            f"{(o['tflops'] / e['tflops']) if e and o else float('nan'):6.3f}  "
            f"{_config_str(o['config']) if o else ''}"
        )
    for preset in MLPS:
        rows = {r["impl"]: r for r in sw.mlps if r["mlp"] == preset and r["status"] == "ok"}
        if "xla" in rows and "pallas_mosaic" in rows:
            x, o = rows["xla"], rows["pallas_mosaic"]
            lines.append(
                f"MLP {preset:<14} M={x['m']}: xla {x['ms']:.4f} ms, pallas_mosaic "
                f"{o['ms']:.4f} ms -> {x['ms'] / o['ms']:.3f}x xla"
            )
    if sw.skipped:
        lines.append(f"skipped for the budget: {len(sw.skipped)} (see JSON 'skipped')")
    return "\n".join(lines)


def dry_run(narrow: bool = False) -> int:
    """Lower every planned pallas_mosaic kernel for CUDA (no GPU): configs, layouts, smem.
    `narrow`: the kernels of the narrow mode instead (x·U, every (N, M) and config)."""
    import jax
    import jax.numpy as jnp

    from fusedmlp.jax_impl.mosaic import pipeline

    failures = 0
    if narrow:
        plan = [
            (g, m, narrow_grid(g, m, first=f))
            for g in NARROW_GEMMS.values()
            for m in NARROW_MS
            for f in (True, False)
        ]
    else:
        plan = [
            (g, m, grid(g.family, m, first=f))
            for g in GEMMS.values()
            for m in (8192,)
            for f in (True, False)
        ]
        plan += [
            (GEMMS[n], m, grid(GEMMS[n].family, m, first=True))
            for n in ("llama.gate_up", "llama.down", "hf.gate_up")
            for m in (512, 2048, 8191)
        ]
    count = 0
    for g, m, configs in plan:
        for cfg in configs:
            count += 1
            pipeline.check_config(
                cfg, "bfloat16", num_weights=2 if g.family == "gated" else 1, residual=False
            )
            dt = jnp.bfloat16
            s = {"x": jax.ShapeDtypeStruct((m, g.k), dt)}
            if g.family == "gated":
                s["wv"] = jax.ShapeDtypeStruct((g.k, g.op_n), dt)
                s["bc"] = jax.ShapeDtypeStruct((g.op_n,), dt) if g.bias else None
            else:
                s["w"] = jax.ShapeDtypeStruct((g.k, g.n), dt)
                if g.bias:
                    s["b"] = jax.ShapeDtypeStruct((g.n,), dt)
            op = mosaic_op(g, cfg, interpret=False)
            try:
                jax.jit(op).trace(s).lower(lowering_platforms=("cuda",))
                print(f"ok    {g.name:<14} M={m:<5} {cfg}")
            except Exception as exc:
                failures += 1
                print(f"FAIL  {g.name:<14} M={m:<5} {cfg}: {type(exc).__name__}: {exc}"[:300])
    print(f"{count} kernels lowered for CUDA, {failures} failed")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, nargs="?", help="JSON file to write")
    ap.add_argument(
        "--tuned-out",
        type=Path,
        default=None,
        help="write the best configs here (tuned_h200.json format)",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=150.0,
        help="stop starting new measurements after this many seconds",
    )
    ap.add_argument(
        "--full",
        action="store_true",
        help="a 560 s budget (the whole grid; a second call of its own)",
    )
    ap.add_argument("--dry-run", action="store_true", help="lower every kernel for CUDA; no GPU")
    ap.add_argument(
        "--narrow",
        action="store_true",
        help="x·U of a low-rank layer instead (N = 64/128/256, K = 4096, M = 512/8192)",
    )
    ap.add_argument(
        "--pingpong",
        action="store_true",
        help="the tuned configs against the ping-pong ones at M=8192, then the whole MLPs",
    )
    ap.add_argument(
        "--short-k",
        action="store_true",
        help="t·V of a low-rank layer instead (N = 14336, K = r = 64/128/256, M = 8192/512)",
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes under the interpreter (CPU; checks the script, not speed)",
    )
    args = ap.parse_args(argv)
    if args.dry_run:
        return dry_run(narrow=args.narrow)
    if args.out is None:
        ap.error("the output JSON path is required")
    import jax

    on_gpu = any(d.platform == "gpu" for d in jax.devices())
    if not on_gpu and not args.smoke:
        print("no GPU visible to jax: use --dry-run or --smoke on a CPU", file=sys.stderr)
        return 2
    if args.smoke:
        smoke_setup()
    from fusedmlp.bench.env import environment

    sw = Sweep(
        args.out, args.tuned_out, 560.0 if args.full else args.budget_s, args.smoke, args.narrow
    )
    sw.env = environment()
    interpret = not on_gpu
    if args.narrow:
        sweep_narrow(sw, interpret)
        return finish(sw, args)
    big = 128 if args.smoke else 8192
    if args.short_k:
        if sw.smoke:
            for name, g in list(SHORT_K_GEMMS.items()):
                SHORT_K_GEMMS[name] = dataclass_replace(g, n=128)
        sweep_short_k(sw, interpret)
        return finish(sw, args)
    if args.pingpong:
        sweep_pingpong(sw, big, interpret)
        return finish(sw, args)

    def every_gemm(first: bool) -> None:
        # at M=8192: the first configs with XLA beside them (step 1), or the rest (step 4)
        examples = [] if args.smoke else example_configs(first=first)
        for g in GEMMS.values():
            ours = grid(g.family, big, first=first)
            sweep_gemm(sw, g, big, ours=ours, examples=examples, xla=first, interpret=interpret)

    # 1. every GEMM at M=8192
    every_gemm(first=True)
    # 2. whole MLPs with the best per-layer configs
    for preset in MLPS:
        sweep_mlp(sw, preset, big, interpret)
    # 3. smaller and odd M, and float16
    for m in [64] if args.smoke else [512, 2048, 8191]:
        for name in ("llama.gate_up", "llama.down", "hf.gate_up"):
            g = GEMMS[name]
            ours = grid(g.family, m, first=True)
            if m == 8191:  # the odd M: the best M=8192 config and the heuristic
                ours = [
                    c
                    for c in (best_config(sw, name, big), grid(g.family, m, first=True)[0])
                    if c is not None
                ][:2]
                ours = list(dict.fromkeys(ours))
            sweep_gemm(sw, g, m, ours=ours, examples=[], xla=True, interpret=interpret)
    g = GEMMS["llama.gate_up"]
    sweep_gemm(
        sw,
        g,
        big,
        ours=[best_config(sw, g.name, big) or grid(g.family, big, first=True)[0]],
        examples=[],
        xla=True,
        dtype_name="float16",
        interpret=interpret,
    )
    # 4. the rest of the grid, the example's other configs
    every_gemm(first=False)
    return finish(sw, args)


def finish(sw: Sweep, args: argparse.Namespace) -> int:
    """The last write, the summary table, where the files are."""
    sw.write()
    print()
    print(table(sw))
    print(
        f"elapsed {sw.elapsed():.0f} s; JSON: {args.out}"
        + (f"; tuned configs: {args.tuned_out}" if args.tuned_out else "")
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    sys.exit(main())
