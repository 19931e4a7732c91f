"""GPU probe: the Mosaic GPU fused_small (jax_impl/mosaic/fused_small.py) against the Pallas-Triton
fused_small (jax_impl/fused_small.py) on the H200, over a sweep of the Mosaic kernel's knobs.

    python3 bench/mosaic_small_probe.py [--out OUT.json] [--cases nerf,w32x8] [--sweep]
        [--config block_m=64,num_stages=3,warpgroups=3 ...]
        [--block-m 64,128] [--stages 2,3,4] [--warpgroups 2,3,4] [--blocks-per-sm 1,2]
        [--out-slots 1,2] [--hidden regs,smem] [--barriers auto,none]
        [--calls 30] [--budget-s 540] [--smoke]

Cases: `nerf` (nerf-64x5: 5 layers 64 wide, relu, no bias, fp16, 2,097,152 rows; floor 127 µs at
4.24 TB/s, Pallas-Triton 152 µs, torch with TMA x/y 145 µs), `w32x8` (8 layers 32 wide, relu, fp16,
1,048,576 rows), `w64gelu` (3 layers 64 wide, gelu_tanh with biases, bf16) and `w64x8` (8 layers 64
wide, relu, bf16), both at 1,048,576 rows, and at 128 wide, 1,048,576 rows: `w128x8` (8 layers,
relu, fp16: the weights through the chains' shared ring), `w128x2` (2 layers, relu, fp16) and
`w128gelu` (4 layers, gelu_tanh with biases, bf16: the ring). Configs: the case's default
(`default_config`: `DEFAULT_CONFIG`, `RING_CONFIG` at 128 wide; the interpreter's with `--smoke`),
then those of `--config` (knob=value pairs, bools as 0/1), the cartesian product of the grid flags
(knobs left out keep the default's value) and, with `--sweep`, a built-in list around the default. A
config that does not fit shared memory is skipped; one that fails to compile or run is printed as
FAIL and the sweep goes on. Per line: device µs (median of `--calls` calls by
bench/timing.time_device: kernel durations, L2 flushed before each call), the Pallas-Triton kernel's
(pinned to its default tiles), bits equal to it, its max |diff|, and the tolerance policy's verdicts
against it and against the float64 reference on the first 4096 rows. `--smoke`: tiny cases under
the interpreter (checks the script on a CPU; nothing is timed).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fusedmlp.common import MLPSpec, get_preset, init_params, make_input, reference, tolerance
from fusedmlp.common.tiling import fused_small_config

COPY_BYTES_PER_S = 4.24e12  # the H200's measured copy rate (read + write)
REF_ROWS = 4096


def _cases(names: list[str], smoke: bool) -> list[tuple[str, MLPSpec, int]]:
    table = {
        "nerf": (get_preset("nerf-64x5").spec, 1 << 21),
        "w32x8": (MLPSpec((32,) * 9, "relu", False, "float16"), 1 << 20),
        # the rule's other 64-wide specs: a smooth activation with biases, bfloat16, deeper
        "w64gelu": (MLPSpec((64,) * 4, "gelu_tanh", True, "bfloat16"), 1 << 20),
        "w64x8": (MLPSpec((64,) * 9, "relu", False, "bfloat16"), 1 << 20),
        # 128 wide: the weights through the ring the chains share (the narrow sweep's 128x8 cell;
        # Pallas-Triton 677 µs, torch 676 µs at 289aa0a, compute floor 362 µs)
        "w128x8": (MLPSpec((128,) * 9, "relu", False, "float16"), 1 << 20),
        # 128 wide, two layers (the narrow sweep's 128x2 cell: Pallas-Triton 167.7 µs at 289aa0a,
        # 75 % of the floor; its sweep adds the weights resident); a smooth activation with biases
        "w128x2": (MLPSpec((128,) * 3, "relu", False, "float16"), 1 << 20),
        "w128gelu": (MLPSpec((128,) * 5, "gelu_tanh", True, "bfloat16"), 1 << 20),
    }
    if smoke:
        table = {
            "nerf": (MLPSpec((64,) * 6, "relu", False, "float16"), 301),
            "w32x8": (MLPSpec((32,) * 4, "relu", False, "float16"), 130),
            "w128x8": (MLPSpec((128,) * 4, "relu", False, "float16"), 200),
            "w128x2": (MLPSpec((128,) * 3, "relu", False, "float16"), 200),
            "w128gelu": (MLPSpec((128,) * 4, "gelu_tanh", True, "bfloat16"), 200),
        }
    return [(name, *table[name]) for name in names]


# ---- configs -------------------------------------------------------------------------------------
def _parse_value(text: str) -> int | bool:
    low = text.strip().lower()
    if low in ("true", "false", "regs", "smem", "auto", "none"):
        return low in ("true", "regs", "auto")
    return int(low)


def _parse_config(text: str, default: Any) -> Any:
    """`block_m=64,num_stages=3,...` -> a config (unnamed knobs keep the default's values)."""
    fields = {f.name for f in dataclasses.fields(default)}
    changes = {}
    for pair in filter(None, text.split(",")):
        key, _, value = pair.partition("=")
        if key.strip() not in fields:
            raise SystemExit(f"--config: unknown knob {key!r}; knobs: {sorted(fields)}")
        changes[key.strip()] = _parse_value(value)
    return dataclasses.replace(default, **changes)


GRID_FLAGS = {  # flag -> config field
    "block_m": "block_m",
    "stages": "num_stages",
    "warpgroups": "warpgroups",
    "blocks_per_sm": "blocks_per_sm",
    "out_slots": "out_slots",
    "hidden": "hidden_in_registers",
    "barriers": "auto_barriers",
}


def _grid(args: argparse.Namespace, default: Any) -> list[Any]:
    axes = {
        GRID_FLAGS[flag]: [_parse_value(v) for v in getattr(args, flag).split(",")]
        for flag in GRID_FLAGS
        if getattr(args, flag)
    }
    if not axes:
        return []
    keys = list(axes)
    return [
        dataclasses.replace(default, **dict(zip(keys, values, strict=True)))
        for values in itertools.product(*axes.values())
    ]


def _sweep(default: Any) -> list[Any]:
    """Around the dataclass's defaults (64-row chains, 3 slots, 3 warpgroups, hidden in
    registers): the barriers, the hidden path, chains a block, slots, 128-row chains, several
    blocks an SM (17 configs, ~12 s each with compile and timing on the H200: the sweep of
    bench/results/2026-12-04-h200-0bbeb43-mosaic). The 128-wide ring's (two chains, two x and y
    slots each): chains, slots, ring slots and the weights resident, within shared memory
    (192-224 KiB each; a config past it is skipped)."""
    r = functools.partial(dataclasses.replace, default)
    if default.weight_slots:  # the ring (bench/results/2026-12-04-h200-5ec3c30: wg2 o2 350.6 µs)
        return [
            r(auto_barriers=False),
            r(num_stages=3, out_slots=1),
            r(warpgroups=3, out_slots=1),
            r(out_slots=1, weight_slots=3),
            r(weight_slots=3),
            r(block_m=128, warpgroups=1),
            r(weight_slots=0),  # every layer resident: two layers at most (others skipped)
        ]
    c = type(default)
    return [
        c(auto_barriers=False),
        c(hidden_in_registers=False),
        c(hidden_in_registers=False, auto_barriers=False),
        c(warpgroups=2),
        c(warpgroups=4),
        c(warpgroups=4, auto_barriers=False),
        c(warpgroups=4, num_stages=2),
        c(warpgroups=6, num_stages=2),  # 32 wide only (64 wide: past shared memory, skipped)
        c(warpgroups=8, num_stages=2),  # 32 wide only
        c(num_stages=2),
        c(num_stages=4),
        c(num_stages=4, auto_barriers=False),
        c(out_slots=1),
        c(block_m=128, warpgroups=2, num_stages=2),
        c(block_m=128, warpgroups=2, num_stages=3),
        c(warpgroups=2, blocks_per_sm=2, num_stages=2),
        c(warpgroups=1, blocks_per_sm=3, num_stages=2),
    ]


def _configs(args: argparse.Namespace, default: Any) -> list[Any]:
    """The default config first, then --config's, the grid's and (--sweep) the built-in list."""
    configs = [default]
    configs += [_parse_config(text, default) for text in args.config]
    configs += _grid(args, default)
    if args.sweep:
        configs += _sweep(default)
    seen, unique = set(), []
    for cfg in configs:
        if cfg not in seen:
            seen.add(cfg)
            unique.append(cfg)
    return unique


# ---- one case ------------------------------------------------------------------------------------
def _timer(calls: int, smoke: bool) -> Callable[[Callable[[int], Any]], float | None]:
    import jax

    from fusedmlp.bench import timing

    def time_us(fn: Callable[[int], Any]) -> float | None:
        if smoke:
            return None
        timing.warmup(fn, jax.block_until_ready)
        t = timing.time_device("jax", fn, calls, jax.block_until_ready)
        return round(t.device.median * 1e6, 1)

    return time_us


def _compare(out: np.ndarray, base: np.ndarray, x: np.ndarray, params: dict, spec: MLPSpec):
    bits = out.view(np.uint16) == base.view(np.uint16)
    diff = np.abs(out.astype(np.float32) - base.astype(np.float32))
    ref = reference.forward(spec, x[:REF_ROWS], params)
    verdict = tolerance.compare(out[:REF_ROWS], ref, spec)
    # the policy's verdict against the Pallas-Triton kernel as well: on the GPU the two give the
    # same bits; under the CPU interpreters they sum products in their own orders (NumPy's matmul,
    # XLA's dot), equal or not by the CPU's instruction set
    twin = tolerance.compare(out, base.astype(np.float64), spec)
    return {
        "bitwise_equal": int(bits.sum()),
        "elements": int(out.size),
        "twin_pass": bool(twin.passed),
        "max_abs_diff": float(np.nanmax(diff)) if diff.size else 0.0,
        "nan": int(np.isnan(out.astype(np.float32)).sum()),
        "ref_pass": bool(verdict.passed),
        "ref_rel_fro": float(verdict.rel_fro),
    }


def run_case(name: str, spec: MLPSpec, m: int, configs: list[Any], args: argparse.Namespace):
    import jax
    import jax.numpy as jnp

    from fusedmlp.jax_impl import fused_small as portable
    from fusedmlp.jax_impl.mosaic import fused_small as mfs

    time_us = _timer(args.calls, args.smoke)
    params = init_params(spec, seed=1)
    x_np = make_input(spec, m, seed=2)
    x = jnp.asarray(x_np)
    p = {k: jnp.asarray(v) for k, v in params.items()}
    floor_us = (m * (spec.d_in + spec.d_out) * 2) / COPY_BYTES_PER_S * 1e6
    # the Pallas-Triton kernel at its default tiles, pinned: unpinned, fused_small takes this
    # sibling at 64 wide on Hopper (jax_impl/fused_small._takes_mosaic_sibling)
    tiles = fused_small_config(spec, m, interpret=args.smoke)
    triton = jax.jit(lambda x, p: portable.fused_small(x, p, spec, config=tiles))
    base = np.asarray(jax.block_until_ready(triton(x, p)))
    triton_us = time_us(lambda i: triton(x, p))
    head = {"case": name, "spec": str(spec), "m": m, "floor_us": round(floor_us, 1)}
    print(f"== {name}: {spec} M={m} floor {floor_us:.1f} us, pallas_triton {triton_us} us",
          flush=True)  # fmt: skip
    rows = [{**head, "impl": "pallas_triton", "device_us": triton_us}]
    for cfg in configs:
        if time.monotonic() > args.deadline:
            print(f"   SKIP {cfg}: past --budget-s", flush=True)
            continue
        row = {**head, "impl": "mosaic", "config": dataclasses.asdict(cfg), "label": str(cfg)}
        try:
            # as the launcher will run it (the interpreter takes the hidden through shared memory)
            mfs.check_config(mfs.geometry(spec, mfs.config_for(cfg, spec, m, interpret=args.smoke)))
        except ValueError as err:
            print(f"   SKIP {cfg}: {err}", flush=True)
            continue
        try:
            fn = jax.jit(lambda x, p, cfg=cfg: mfs.fused_small(x, p, spec, config=cfg))
            t0 = time.monotonic()
            out = np.asarray(jax.block_until_ready(fn(x, p)))
            row["compile_s"] = round(time.monotonic() - t0, 1)
            row.update(_compare(out, base, x_np, params, spec))
            row["device_us"] = time_us(lambda i, fn=fn: fn(x, p))
            print(
                f"   {cfg!s:38} {row['device_us']} us (pallas_triton {triton_us}) "
                f"bits {row['bitwise_equal']}/{row['elements']} max|d| {row['max_abs_diff']:.3g} "
                f"twin {'PASS' if row['twin_pass'] else 'FAIL'} "
                f"nan {row['nan']} ref {'PASS' if row['ref_pass'] else 'FAIL'} "
                f"compile {row['compile_s']} s",
                flush=True,
            )
        except Exception as err:  # a config that fails to compile or run: report, keep sweeping
            row["error"] = f"{type(err).__name__}: {err}"[:2000]
            print(f"   FAIL {cfg}: {row['error'][:600]}", flush=True)
            traceback.print_exc(limit=3, file=sys.stderr)
            _reset_interpreter(args.smoke)
        rows.append(row)
    return rows


def _reset_interpreter(smoke: bool) -> None:
    if smoke:
        from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

        interpret_pallas_call.reset_gpu_interpret_mode_state()


def _summary(rows: list[dict[str, Any]]) -> None:
    """Per case: the fastest config that matched the reference, against Pallas-Triton."""
    for case in dict.fromkeys(r["case"] for r in rows):
        mine = [r for r in rows if r["case"] == case]
        base = next((r["device_us"] for r in mine if r["impl"] == "pallas_triton"), None)
        good = [r for r in mine if r["impl"] == "mosaic" and r.get("ref_pass") and r["device_us"]]
        if not good:
            print(f"best {case}: none timed and passing (pallas_triton {base} us)", flush=True)
            continue
        best = min(good, key=lambda r: r["device_us"])
        print(
            f"best {case}: {best['label']} {best['device_us']} us, pallas_triton {base} us, "
            f"floor {best['floor_us']} us",
            flush=True,
        )


# ---- main ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write every row as JSON here")
    parser.add_argument(
        "--cases",
        default="nerf,w32x8",
        help="comma list of: nerf, w32x8, w64gelu, w64x8, w128x8, w128x2, w128gelu",
    )
    parser.add_argument("--sweep", action="store_true", help="add the built-in configs")
    parser.add_argument("--config", action="append", default=[], help="knob=value,... (repeat)")
    for flag in GRID_FLAGS:
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag, default="")
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--budget-s", type=float, default=540.0)
    parser.add_argument("--smoke", action="store_true", help="tiny cases, interpreted, untimed")
    args = parser.parse_args(argv)
    args.deadline = time.monotonic() + args.budget_s

    import jax

    from fusedmlp.jax_impl.mosaic import fused_small as mfs

    if not args.smoke and jax.default_backend() != "gpu":
        raise SystemExit("no GPU: pass --smoke to check the script under the interpreter")
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}", flush=True)
    rows = []
    for name, spec, m in _cases(args.cases.split(","), args.smoke):
        # the case's default tiles first (a weight ring's at 128 wide)
        configs = _configs(args, mfs.default_config(spec, m, interpret=args.smoke))
        rows += run_case(name, spec, m, configs, args)
    _summary(rows)
    if args.out:
        args.out.write_text(json.dumps({"jax": jax.__version__, "rows": rows}, indent=1))
    failed = [r for r in rows if "error" in r or r.get("ref_pass") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
