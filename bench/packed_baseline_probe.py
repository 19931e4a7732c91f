"""GPU probe (issue 24): what a training step through XLA costs on the packed gated layout.

    python bench/packed_baseline_probe.py OUT.json [--preset hf-blog-geglu,llama3-8b] [--m 8192]

`auto` trains through XLA where a training point of the dispatch table says XLA is faster than our
kernels (jax_impl/front.py `_differentiated_by`). FusedMLP and the harness hold the packed [W|V]
layout (common/packing.py); until 19150d8 `auto` differentiated `baselines.xla_packed` on it — one
product of width 2N split by a reshape — where the XLA baseline differentiates `xla` on w and v
apart, and in the H200 run at 7869e5b the two differed by 12 % at hf-blog-geglu (649.1 against
579.9 µs a step). Since then `auto` unpacks inside the step (`front._on_plain_params`), what the
third variant below measures. This probe times one jitted `value_and_grad` step (loss Σ y·dy,
gradients of x and every param) of:

- `xla`: the baseline on plain params (what `bench --backward` calls jax:xla);
- `xla_packed`: the same ops on the packed params (what `auto` differentiated before 19150d8);
- `xla_unpacked_in_step`: the packed params unpacked inside the step, then `xla` (a copy of the
  weights a step each way, which XLA may fold into the products' operands).

Device time by the project's method (bench/timing.time_device, each step after the L2 flush),
with each kernel's median time, per preset and variant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

CALLS = 20


def _step(variant: str, spec: Any) -> Any:
    import jax
    import jax.numpy as jnp

    from fusedmlp.common.packing import unpack_params
    from fusedmlp.jax_impl import baselines

    def forward(x, params):
        if variant == "xla":
            return baselines.xla(x, params, spec)
        if variant == "xla_packed":
            return baselines.xla_packed(x, params, spec)
        return baselines.xla(x, unpack_params(spec, params), spec)

    def loss(x, params, dy):
        y = forward(x, params)
        return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", default="hf-blog-geglu,llama3-8b")
    parser.add_argument("--m", type=int, default=8192)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from fusedmlp.bench import timing
    from fusedmlp.common import get_preset, init_params, make_grad_output, make_input
    from fusedmlp.common.packing import pack_params

    def wait(out: Any) -> None:
        jax.block_until_ready(out)

    rows = []
    for name in args.preset.split(","):
        spec = get_preset(name).spec
        plain = {k: jnp.asarray(v) for k, v in init_params(spec).items()}
        packed = {k: jnp.asarray(v) for k, v in pack_params(spec, init_params(spec)).items()}
        x = jnp.asarray(make_input(spec, args.m))
        dy = jnp.asarray(make_grad_output(spec, args.m))
        for variant in ("xla", "xla_packed", "xla_unpacked_in_step"):
            step = _step(variant, spec)
            params = plain if variant == "xla" else packed

            def fn(i: int, step: Any = step, params: Any = params, x: Any = x, dy: Any = dy) -> Any:
                return step(x, params, dy)

            wait(fn(0))
            dev_t = timing.time_device("jax", fn, CALLS, wait)
            row = {
                "preset": name,
                "m": args.m,
                "variant": variant,
                "device_us": round(dev_t.device.median * 1e6, 1),
                "kernels": [
                    (k, round(t * 1e6, 1))
                    for k, t in zip(dev_t.kernel_names, dev_t.kernel_times, strict=False)
                ],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    commit = os.environ.get("FUSEDMLP_COMMIT", "")
    args.out.write_text(json.dumps({"commit": commit, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
