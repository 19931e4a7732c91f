"""Forward+backward probe of the JAX stack on one GPU (issue 24): a thin front of `fusedmlp bench
--backward` (bench/bench_backward.py: one jitted `jax.vjp` step per row, its timing, parity gate,
floor and XLA memory analysis) over both `saved=` policies, at llama3-8b and hf-blog-geglu, M=8192.

    python3 bench/backward_probe_jax.py OUT.json [--cases llama3-8b,hf-blog-geglu] [--m 8192]
                                                 [--device cpu]

Rows: `xla` (jax's own autodiff of the plain function: the target's reference, "JAX auto ≥ 1.05×
XLA"), `pallas_triton` (the portable saving forward and backward), `pallas_mosaic` (with "inputs":
the Mosaic GPU forward, then the portable recompute and backward) and `auto`. The forward alone is
`fusedmlp bench`. OUT.json is a fusedmlp results file (`fusedmlp report OUT.json` renders it).
`--device cpu` runs the same code under the Pallas interpreters (the kernel rows are gated, not
timed; nothing it prints is a measurement of a kernel).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fusedmlp.bench import bench_backward, cli, providers
from fusedmlp.bench import report as rep
from fusedmlp.common import get_preset
from fusedmlp.common.presets import DEFAULT_CPU_PRESET

IMPLS = "jax:xla,jax:pallas_triton,jax:pallas_mosaic,jax:auto"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="JSON results path")
    parser.add_argument("--cases", help="default llama3-8b,hf-blog-geglu (a CPU: cpu-small)")
    parser.add_argument("--m", type=int, help="default 8192 (a CPU: 8)")
    parser.add_argument("--device", default=None, help="cpu: a smoke run (interpreters)")
    args = parser.parse_args(argv)
    device = cli.resolve_device(args.device)
    names = args.cases or (DEFAULT_CPU_PRESET if device == "cpu" else "llama3-8b,hf-blog-geglu")
    m = args.m or (8 if device == "cpu" else 8192)
    items = [(name, get_preset(name).spec, m) for name in names.split(",")]
    result = bench_backward.run_policies(
        items, providers.select(IMPLS), device, quick=device == "cpu"
    )
    rep.write_json(cli._results("bench_backward", result), args.out)
    rep.print_tables(cli._console(), rep.bench_backward_tables(result))
    return 1 if any(cli._failed(r) for c in result["cases"] for r in c["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
