"""Where does the act' step's time go? (hf-blog-geglu's layer-1 input gradient on Mosaic GPU.)

The GEMM dh = dZ·W2ᵀ [8192 × 3072, K = 768] with the gated act' step in its epilogue (the saved
packed [z|g] read, the packed [dz|dg] written over it) ran 128 µs on the H100 where its bytes
(~214 MB) and its product (38.7 GFLOP) would overlap in ~70, at every tile the sweeps tried.
This probe times the kernel at its committed tiles with the epilogue varied, each variant in its
own process (the epilogue's helpers are read when the kernel is traced):

- `committed`: the kernel as the repository builds it now;
- `separate`: act(z) and act'(z) computed apart, act' with IEEE divisions (the kernel before
  `activations.activation_and_grad`);
- `exact`: act(z) and act'(z) from one tanh, with IEEE divisions (no approximate reciprocal);
- `light`: the same bytes and wgmma, act(z) = act'(z) = z (no transcendental work): what the
  epilogue's arithmetic costs;
- `plain`: no act' step (dh stored as it is, [8192, 3072]; no [z|g] read): the GEMM and half the
  stores.

`--tile BMxBNxSTAGES[pp|coop]subS/slotsN` times the committed epilogue at other tiles.
`--ncu` runs one variant twice without timing (the target of `ncu -k regex:dact_gated`); with
`--role` another GEMM of the step (e.g. "layer 0 saving forward", `ncu -k regex:gated_fwd`).

    python3 bench/dact_probe.py OUT.json [--variants committed,separate,exact,light,plain]
        [--tiles 128x128x5pp2/2,...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

ROLE = "layer 1 input gradient"
PRESET = "hf-blog-geglu"
VARIANTS = ("committed", "separate", "exact", "light", "plain")


def _gemm(role: str = ROLE) -> Any:
    from fusedmlp.bench.sweep_mosaic_backward import step_gemms

    return next(g for g in step_gemms(PRESET) if g.role == role)


def _patch(variant: str) -> None:
    """Replace the act' step's helper in mosaic/linear_act.py for this process."""
    from fusedmlp.jax_impl import activations
    from fusedmlp.jax_impl.mosaic import linear_act, pipeline

    if variant == "separate":
        linear_act.activation_and_grad = lambda z, a, fast=False: (
            activations.apply_activation(z, a, fast=pipeline.APPROX_MATH),
            activations.apply_activation_grad(z, a),
        )
    elif variant == "exact":
        linear_act.activation_and_grad = lambda z, a, fast=False: activations.activation_and_grad(
            z, a, False
        )
    elif variant == "light":
        linear_act.activation_and_grad = lambda z, a, fast=False: (z, z)


def _tile(text: str, g: Any) -> tuple[Any, Any]:
    """'128x128x5pp2/2' -> (128×128 tiles, 5 K slots, ping-pong, subtile 2), 2 staging slots."""
    import dataclasses

    from fusedmlp.common.config import TileConfig

    shape, slots = text.split("/")
    kind = "pp" if "pp" in shape else "coop"
    dims, sub = shape.split(kind)
    bm, bn, stages = (int(v) for v in dims.split("x"))
    cfg = TileConfig(
        bm, bn, 64, group_m=8, num_warps=4, num_stages=stages, warp_specialize=True,
        epilogue_subtile=int(sub), programs_per_sm=2 if kind == "pp" else 1,
    )  # fmt: skip
    return cfg, dataclasses.replace(g.outputs, slots=int(slots))


def run_one(variant: str, tile: str | None, ncu: bool, role: str = ROLE) -> dict[str, Any]:
    """Time (or, ncu, just run twice) one variant in this process."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from fusedmlp.bench.sweep_mosaic import measure, rel_err
    from fusedmlp.bench.sweep_mosaic_backward import make_sets, mosaic_op, set_count
    from fusedmlp.jax_impl.mosaic import backward as hopper

    _patch(variant)
    g = _gemm(role)
    if variant == "plain":
        g = dataclasses.replace(g, epilogue="none", activation="identity")
    if tile:
        cfg, outs = _tile(tile, g)
    else:
        cfg, outs = hopper.fitted_config(g.family, g.m, g.n, g.k, "bfloat16", g.outputs,
                                         interpret=False, operands=g.operands,
                                         epilogue=g.epilogue)  # fmt: skip
    op = mosaic_op(g, cfg, outs, interpret=False)
    sets = make_sets(g, 1 if ncu else set_count(g))
    if ncu:
        f = jax.jit(op)
        for _ in range(2):
            out = jax.block_until_ready(f(sets[0]))
        first = out[0] if isinstance(out, tuple) else out  # the saving forward: (h, z)
        return {"variant": variant, "checksum": float(jnp.abs(first.astype(jnp.float32)).mean())}
    res = measure(op, sets)
    first = res.pop("first")
    row = {"variant": variant, "tile": tile or "fitted", "config": cfg.to_dict(),
           "slots": outs.slots, **res}  # fmt: skip
    row["us"] = res["ms"] * 1e3
    row["tflops"] = g.flops() / (res["ms"] * 1e-3) / 1e12
    if variant != "plain" and g.epilogue != "none":  # XLA's act' step in fp32
        ref = jax.jit(_reference(g))(sets[0])
        row["rel_err_vs_fp32"] = rel_err(first, ref)
    return row


def _reference(g: Any) -> Any:
    """The act' step in fp32 from XLA (for the sanity check of each variant's output)."""
    import jax.numpy as jnp

    from fusedmlp.common.packing import PACK_BLOCK
    from fusedmlp.jax_impl.activations import apply_activation, apply_activation_grad

    def ref(s: dict[str, Any]) -> Any:
        dh = jnp.dot(s["a"].astype(jnp.float32), s["w"].astype(jnp.float32).T)
        zg = s["z"].astype(jnp.float32).reshape(g.m, -1, 2, PACK_BLOCK)
        z, gg = zg[:, :, 0], zg[:, :, 1]
        d = dh.reshape(g.m, -1, PACK_BLOCK)
        dz = d * gg * apply_activation_grad(z, g.activation)
        dg = d * apply_activation(z, g.activation)
        return jnp.stack([dz, dg], axis=2).reshape(g.m, -1)

    return ref


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", nargs="?")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--tiles", default="", help="extra tiles for the committed epilogue")
    p.add_argument("--one", help="(internal) run this variant in this process")
    p.add_argument("--tile", help="(internal) its tile")
    p.add_argument("--ncu", action="store_true", help="run --one twice, untimed")
    p.add_argument("--role", default=ROLE, help="(with --one) another GEMM of the step, by role")
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(run_one(a.one, a.tile, a.ncu, a.role)))
        return 0
    jobs = [(v, None) for v in a.variants.split(",") if v]
    jobs += [("committed", t) for t in a.tiles.split(",") if t]
    rows = []
    for variant, tile in jobs:
        cmd = [sys.executable, __file__, "--one", variant] + (["--tile", tile] if tile else [])
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        if done.returncode:
            rows.append({"variant": variant, "tile": tile, "error": done.stderr[-2000:]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{variant:10s} {tile or 'fitted':18s} "
              + (f"{r['us']:7.1f} us {r['tflops']:6.1f} TF/s err {r.get('rel_err_vs_fp32', 0):.2e}"
                 if "us" in r else "ERROR " + r["error"][-300:]), flush=True)  # fmt: skip
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"gemm": f"{PRESET} {ROLE}", "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
