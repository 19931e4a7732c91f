"""What do the Mosaic GPU epilogue's bias and activation cost at gpt-mlp's GEMMs, and does a wider
tile pay for the up GEMM? (issue 21: gpt-mlp M = 8192 sits at 1.00-1.02× of the baselines.)

The runner at a0f1da6 on an H100 (bench/results/2026-12-07-h100-a0f1da6/) timed gpt-mlp's down
GEMM (8192×4096×16384, bias) under pallas_mosaic at 1578-1618 µs, where llama3-8b's bias-free down
GEMM (K = 14336) at the same tile scales to ~1478; triton_tma showed no such gap. Its up GEMM
(8192×16384×4096, gelu_tanh, bias) ran 1680 µs at the table's ping-pong 128×128 tile, against
~1555 for llama3-8b's gated GEMM scaled to the same FLOPs. If both epilogues cost what the GEMM
alone does not, closing them is worth ~7 % of the whole MLP.

Per GEMM, in one process, every variant timed in each of ROUNDS interleaved rounds (the rounds'
order rotated; the machine's clocks drift ~10 % in seconds on these cards, so only same-round
differences count): XLA's layer (`sweep_mosaic.xla_op`) and its bare matmul; jax's Hopper matmul
example (the GEMM alone, the DSL's ceiling); pallas_mosaic at the committed tile as the layer
runs it, without its bias, and without bias or activation; and for the up GEMM the 128×256
cooperative tile beside the table's ping-pong one. Timing is sweep_mosaic's (a jitted loop over
rotating input sets, host clock around it, median of 5 samples): a ratio between variants, not
the harness's device time.

    python3 bench/mosaic_epilogue_probe.py OUT.json            (GPU, ~2-3 min)
    python3 bench/mosaic_epilogue_probe.py OUT.json --smoke    (CPU: tiny shapes, interpreter)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fusedmlp.bench import sweep_mosaic
from fusedmlp.bench.sweep_mosaic import Gemm

ROUNDS = 3
M = 8192
PROBED = ("gpt.up", "gpt.down", "llama.down")


def mosaic_variants(g: Gemm, m: int, *, smoke: bool) -> dict[str, tuple[Gemm, Any]]:
    """The pallas_mosaic kernels timed for one GEMM, by name: (the layer, its TileConfig)."""
    from fusedmlp.jax_impl.mosaic import pipeline

    table = pipeline.default_config(g.family, m, g.n, g.k, "bfloat16")
    kernels = {f"mosaic {table}": (g, table)}
    plain = dataclasses.replace(g, bias=False)
    if g.bias:
        kernels["mosaic, no bias"] = (plain, table)
    if g.activation != "identity":
        kernels["mosaic, no bias, identity"] = (
            dataclasses.replace(plain, activation="identity"),
            table,
        )
    if g.name == "gpt.up":  # the cooperative 128×256 tile beside the table's ping-pong one
        wide = (
            sweep_mosaic._cfg(128, 128, 32, 2)
            if smoke
            else sweep_mosaic._cfg(128, 256, 64, 4, sub=2)
        )
        if wide != table:
            kernels[f"mosaic {wide}"] = (g, wide)
    return kernels


def variants(g: Gemm, m: int, *, smoke: bool) -> dict[str, Callable[[dict[str, Any]], Any]]:
    """The ops timed for one GEMM, by name."""
    import jax.numpy as jnp

    ops: dict[str, Callable[[dict[str, Any]], Any]] = {
        "xla layer": sweep_mosaic.xla_op(g),
        "xla matmul": lambda s: jnp.matmul(s["x"], s["w"]),
    }
    if not smoke:  # the example has no interpreter path of its own worth timing
        cfg = sweep_mosaic.example_configs(first=True)[0]
        ops["example GEMM"] = sweep_mosaic.example_op(g, cfg)
    for name, (layer, config) in mosaic_variants(g, m, smoke=smoke).items():
        ops[name] = sweep_mosaic.mosaic_op(layer, config, interpret=smoke)
    return ops


def probe(gemm_names: tuple[str, ...], m: int, *, smoke: bool) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp

    rows = []
    for name in gemm_names:
        g = sweep_mosaic.GEMMS[name]
        if smoke:
            g = dataclasses.replace(g, n=min(g.n, 128), k=min(g.k, 64))
        count = sweep_mosaic.set_count(g, m, 2, smoke)
        sets = sweep_mosaic.make_sets(g, m, jnp.bfloat16, count)
        ops = variants(g, m, smoke=smoke)
        batches = {k: jax.jit(lambda ss, op=op: [op(s) for s in ss]) for k, op in ops.items()}
        # each variant checked against the fp32 layer it computes: the bare GEMM for XLA's
        # matmul and the example, the variant's own layer for each pallas_mosaic kernel
        bare = dataclasses.replace(g, bias=False, activation="identity")
        layers = {"xla layer": g, "xla matmul": bare, "example GEMM": bare}
        layers.update({k: layer for k, (layer, _) in mosaic_variants(g, m, smoke=smoke).items()})
        refs = {layer: sweep_mosaic.reference_fp32(layer, sets[0]) for layer in layers.values()}
        times: dict[str, list[float]] = {k: [] for k in ops}
        errors: dict[str, float] = {}
        for key, batch in batches.items():  # compile, and check each variant's first output
            errors[key] = sweep_mosaic.rel_err(batch(sets)[0], refs[layers[key]])
        keys = list(batches)
        for r in range(ROUNDS if not smoke else 1):
            order = keys[r % len(keys) :] + keys[: r % len(keys)]
            for key in order:
                times[key].append(sweep_mosaic._measure(batches[key], sets)["ms"])
        for key in keys:
            ms = statistics.median(times[key])
            rows.append(
                {
                    "gemm": name,
                    "m": m,
                    "n": g.n,
                    "k": g.k,
                    "variant": key,
                    "ms": ms,
                    "ms_rounds": times[key],
                    "tflops": g.flops(m) / (ms * 1e-3) / 1e12,
                    "rel_err": errors[key],
                }
            )
            print(f"{name:10s} {key:70s} {ms:8.4f} ms  rounds {times[key]}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, the interpreter (CPU)")
    parser.add_argument("--gemms", default=",".join(PROBED))
    args = parser.parse_args(argv)
    from fusedmlp.bench.env import environment

    start = time.perf_counter()
    rows = probe(tuple(args.gemms.split(",")), 24 if args.smoke else M, smoke=args.smoke)
    limit = sweep_mosaic.REL_ERR_LIMIT
    bad = [r for r in rows if r["rel_err"] > limit]
    data = {
        "what": "bench/mosaic_epilogue_probe.py",
        "smoke": args.smoke,
        "rounds": ROUNDS,
        "elapsed_s": round(time.perf_counter() - start, 1),
        "env": environment(),
        "rows": rows,
        "wrong": [f"{r['gemm']} {r['variant']}: {r['rel_err']:.2e}" for r in bad],
    }
    args.out.write_text(json.dumps(data, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
