"""Where "tf32" products lose accuracy against cuBLAS's (a GPU probe; one call, ~1 minute).

`python bench/tf32_rounding_probe.py OUT.json [--preset gpt2-mlp --m 4096]`

The float32 run of 2026-12-07 (H100, 2bc8c63) found torch's `triton` and `triton_tma` under
fp32_precision="tf32" at 4.5x the error of torch eager / XLA under the same precision (rel_fro
2.35e-3 against 5.2e-4 at llama3-8b M = 2048), failing the tolerance policy's 2x-baseline rule,
while jax's `pallas_triton` matched XLA. Hypothesis: Hopper's wgmma reads 32-bit operands from
shared memory as tf32 by dropping their low 13 mantissa bits (truncation, an error biased
towards zero), where cuBLAS, and jaxlib's Triton in registers, round to nearest. The kernels
now round their operands themselves (torch_impl/tf32.py). This probe runs them on the operands as
given and on x and W rounded to nearest tf32 beforehand, against the float64 reference of the
unrounded inputs: with the kernels rounding, both rows must match eager's error (without it, the
rounded rows took the excess away where the hypothesis held). On the CPU (`--device cpu`,
interpreted, the baseline's products rounded as well: baselines.emulates_tf32) it checks the
same in a few seconds.
"""

from __future__ import annotations

import argparse
import json

import torch

from fusedmlp.common import reference, tolerance
from fusedmlp.common.params import init_params, make_input
from fusedmlp.common.spec import MLPSpec
from fusedmlp.torch_impl import mlp
from fusedmlp.torch_impl.tf32 import round_to_tf32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--preset", default="gpt2-mlp")
    parser.add_argument("--m", type=int, default=4096)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    spec = MLPSpec.preset(args.preset).replace(dtype="float32", fp32_precision="tf32")
    x_np, p_np = make_input(spec, args.m), init_params(spec)
    ref = reference.forward(spec, x_np, p_np)
    x = torch.from_numpy(x_np).to(args.device)
    params = {k: torch.from_numpy(v).to(args.device) for k, v in p_np.items()}
    # the products' operands: x and the weights (w*, v*), not the biases
    rounded_x = round_to_tf32(x)
    rounded_params = {k: round_to_tf32(v) if v.ndim == 2 else v for k, v in params.items()}
    baseline = mlp(x, params, spec, impl="eager").cpu().numpy()
    rows = []
    for impl in ("eager", "triton", "triton_tma"):
        for operands, (xx, pp) in (
            ("as given", (x, params)),
            ("x, W rounded to tf32", (rounded_x, rounded_params)),
        ):
            y = mlp(xx, pp, spec, impl=impl).cpu().numpy()
            c = tolerance.compare(y, ref, spec, baseline=baseline)
            rows.append(
                {"impl": impl, "operands": operands, "rel_fro": c.rel_fro, "passed": c.passed}
            )
            print(json.dumps(rows[-1]))
    with open(args.out, "w") as f:
        json.dump({"spec": str(spec), "m": args.m, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
