"""GPU probe (issues 22 and 24): fused_small's whole-MLP backward with every layer's dW on chip
against kernels A and B (dZ in memory), both stacks, over tile variants of the on-chip kernel.

    python bench/small_backward_probe.py OUT.json [--preset nerf-64x5 | --spec 32x9,relu,0,float16]
        [--m M] [--stacks torch,jax] [--variants ab,on_chip,...] [--smoke]

For each stack and variant, the backward alone (`fused_small_backward.mlp_backward` on the residuals
of one saving forward, saved="preact": what a training step runs after its forward) or the saving
forward: device time by the project's method (bench/timing.time_device: kernel durations from the
stack's profiler, each call after the L2 flush), with each kernel's median time. Variants:
`saving_forward` (always first: the default tiles), `ab` (kernels A and B: on_chip=False, the
default tiles), `on_chip` (the default SMALL_WGRAD_ON_CHIP_CONFIG),
`on_chip:BMxWARPSxSTAGES[xPROGRAMS][h]` pinned SmallConfigs (programs an SM 1 unless given; `h`:
weights hoisted) and `saving:BMxWARPSxSTAGES[xPROGRAMS][h]`, the saving forward at pinned tiles.
Parity, before timing: each backward variant's gradients against the `ab` row of its stack in
float32, relative Frobenius error per gradient (kept; > 1e-2 flags the row `FAIL` and it is not
timed); a saving variant's y must equal the default's bit for bit (row tiles are independent). A
variant that does not launch (shared memory) is a row with its error. `--smoke`: a tiny spec under
the interpreters (checks the script on a CPU; nothing is timed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fusedmlp.common import get_preset, init_params, make_grad_output, make_input
from fusedmlp.common.packing import pack_params
from fusedmlp.common.presets import preset_batch_sizes
from fusedmlp.common.spec import MLPSpec
from fusedmlp.common.tiling import SmallConfig

VARIANTS = (
    "ab",
    "on_chip",
    "on_chip:64x8x3",
    "on_chip:64x8x2h",
    "on_chip:128x8x2",
    "on_chip:64x4x2",
)
CALLS = 20


def _config(variant: str) -> SmallConfig | None:
    """The pinned SmallConfig of an `on_chip:BMxWARPSxSTAGES[xPROGRAMS][h]` variant (programs an
    SM: 1 unless given; None: the default)."""
    if ":" not in variant:
        return None
    tiles = variant.split(":", 1)[1]
    hoist = tiles.endswith("h")
    block_m, warps, stages, *programs = (int(v) for v in tiles.rstrip("h").split("x"))
    return SmallConfig(block_m, warps, stages, programs_per_sm=(programs or [1])[0], hoist=hoist)


def _rel_errors(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> dict[str, float]:
    errs = {}
    for k, w in want.items():
        w64 = np.asarray(w, dtype=np.float64)
        g64 = np.asarray(got[k], dtype=np.float64)
        errs[k] = float(np.linalg.norm(g64 - w64) / max(np.linalg.norm(w64), 1e-30))
    return errs


def _stack_rows(stack: str, spec: MLPSpec, m: int, device: str, variants) -> list[dict[str, Any]]:
    from fusedmlp.bench import timing

    plain = init_params(spec, seed=1)
    packed_np = pack_params(spec, plain)
    x_np, dy_np = make_input(spec, m, seed=2), make_grad_output(spec, m, seed=3)
    if stack == "torch":
        import torch

        from fusedmlp.torch_impl import fused_small_backward as mod

        dev = "cuda" if device == "cuda" else "cpu"
        dtype = getattr(torch, spec.dtype)
        arr = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(dev, dtype)  # noqa: E731
        to_np = lambda t: t.float().cpu().numpy()  # noqa: E731
        wait = lambda out: torch.cuda.synchronize() if dev == "cuda" else None  # noqa: E731
    else:
        import jax
        import jax.numpy as jnp

        from fusedmlp.jax_impl import fused_small_backward as mod

        arr = lambda a: jnp.asarray(a, dtype=spec.dtype)  # noqa: E731
        to_np = lambda a: np.asarray(a.astype(jnp.float32))  # noqa: E731
        wait = jax.block_until_ready
    params = {k: arr(v) for k, v in packed_np.items()}
    x, dy = arr(x_np), arr(dy_np)
    _, kept = mod.forward_saving(x, params, spec)

    def backward(variant: str):
        on_chip = variant != "ab"
        res = list(kept) if stack == "torch" else tuple(kept)
        return mod.mlp_backward(
            dy, res, params, spec, saved="preact", config=_config(variant), on_chip=on_chip
        )

    rows, want = [], None
    y_default = to_np(mod.forward_saving(x, params, spec)[0])
    for variant in ("saving_forward", *variants):
        row: dict[str, Any] = {"stack": stack, "variant": variant}
        try:
            if variant.startswith("saving"):
                # the saving forward at the default tiles or pinned ones (`saving:BMx...`)
                cfg = _config(variant)
                fn = lambda i, c=cfg: mod.forward_saving(x, params, spec, config=c)  # noqa: E731
                y = to_np(fn(0)[0])
                row["same_y_as_default"] = bool(np.array_equal(y, y_default))
                if not row["same_y_as_default"]:
                    row["parity"] = "FAIL"
            else:
                fn = lambda i, v=variant: backward(v)  # noqa: E731
                got = {k: to_np(v) for k, v in backward(variant).items() if v is not None}
                if variant == "ab":
                    want = got
                row["rel_err_vs_ab"] = _rel_errors(got, want)
                if max(row["rel_err_vs_ab"].values()) > 1e-2:
                    row["parity"] = "FAIL"
        except Exception as exc:  # a variant past the GPU's resources: the row says so
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        if "error" in row or "parity" in row:
            rows.append(row)
            print(json.dumps(row), flush=True)
            continue
        if device == "cuda":
            wait(fn(0))
            dev_t = timing.time_device(stack, fn, CALLS, wait)
            row["device_us"] = dev_t.device.median * 1e6
            row["kernels"] = [
                (name, round(t * 1e6, 1))
                for name, t in zip(dev_t.kernel_names, dev_t.kernel_times, strict=False)
            ]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", default="nerf-64x5")
    parser.add_argument("--m", type=int)
    parser.add_argument("--stacks", default="torch,jax")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--spec",
        help="WIDTHxCOUNT,ACTIVATION,BIAS(0/1),DTYPE in place of the preset (e.g. 32x9,relu,0,"
        "float16: 8 layers 32 wide), 1,048,576 rows unless --m",
    )
    parser.add_argument("--smoke", action="store_true", help="a tiny spec, interpreted")
    args = parser.parse_args(argv)
    preset = get_preset(args.preset)
    spec, m = preset.spec, args.m or preset_batch_sizes(args.preset)[0]
    device = "cuda"
    if args.spec:
        shape, act, bias, dtype = args.spec.split(",")
        width, count = (int(v) for v in shape.split("x"))
        spec, m = MLPSpec((width,) * count, act, bias == "1", dtype), args.m or 1 << 20
    if args.smoke:
        spec, m, device = MLPSpec((24, 40, 40, 17), "relu", False, "float16"), 70, "cpu"
    variants = tuple(args.variants.split(","))
    if variants[0] != "ab":
        variants = ("ab", *variants)
    from fusedmlp.bench.env import environment

    result: dict[str, Any] = {"spec": str(spec), "m": m, "env": environment(), "rows": []}
    for stack in args.stacks.split(","):
        result["rows"] += _stack_rows(stack, spec, m, device, variants)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
