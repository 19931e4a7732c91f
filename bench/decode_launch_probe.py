"""Where fused_decode's time goes: each launch's device time (up, down, reduce), both stacks.

The runner times a call as the sum of its kernels; this probe keeps them apart, so a gap between
two cases (llama3-8b at M = 64 against M = 16, JAX against torch at M = 64, gpt-mlp's plain first
layer against llama3-8b's gated one) can be put on the launch that makes it. Each launch's weight
bytes give its stream rate: launch 1 reads the first layer's weights (and x from L2 once a
program), launch 2 the second's, launch 3 only the fp32 partials (L2).

Rows: preset x M x stack, the default tiles (common/tiling.py `fused_decode_config`), each checked
against eager / XLA first; device time as the harness defines it (bench/timing.py, read flush).
A `PRESET:weights` row per preset times the fastest one-kernel moves of the same weight bytes (a
sum over them, a device copy of them): at a few MB their ramp and tail, not the 1 GiB copy rate,
are the floor no decode kernel beats (hf-blog-geglu: 14 MB, 3.3 µs at the copy rate).

    python3 bench/decode_launch_probe.py OUT.json [--cases llama3-8b:16,llama3-8b:64,gpt-mlp:64]
    python3 bench/decode_launch_probe.py OUT.json --smoke   (CPU: tiny MLPs interpreted, parity
                                                             only, nothing timed)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from typing import Any

CALLS = 50
DEFAULT_CASES = "llama3-8b:16,llama3-8b:64,gpt-mlp:16,gpt-mlp:64"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="path of the JSON results")
    parser.add_argument("--cases", default=DEFAULT_CASES, help="comma list of PRESET:M")
    parser.add_argument("--smoke", action="store_true", help="tiny MLPs, interpreted, untimed")
    args = parser.parse_args(argv)
    if args.smoke:  # before fusedmlp.torch_impl is imported: the interpreter decides at import
        os.environ["TRITON_INTERPRET"] = "1"
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from fusedmlp.bench.env import environment
    from fusedmlp.bench.timing import time_device
    from fusedmlp.common import get_preset
    from fusedmlp.common.params import init_params, make_input
    from fusedmlp.common.tiling import fused_decode_config
    from fusedmlp.jax_impl import baselines as jax_baselines
    from fusedmlp.jax_impl import fused_decode as jax_decode
    from fusedmlp.jax_impl.packing import pack_params as jax_pack
    from fusedmlp.torch_impl import baselines as torch_baselines
    from fusedmlp.torch_impl import fused_decode as torch_decode
    from fusedmlp.torch_impl.packing import pack_params as torch_pack

    if not torch.cuda.is_available() and not args.smoke:
        print("decode_launch_probe: needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    dev = "cpu" if args.smoke else "cuda"
    sync = torch.cuda.synchronize if not args.smoke else lambda: None
    rows: list[dict[str, Any]] = []
    streamed: set[str] = set()  # presets whose weight bytes were read and copied alone
    for case in (c for c in args.cases.split(",") if c):
        preset, m = case.split(":")
        m = int(m)
        spec = get_preset(preset).spec
        if args.smoke:  # the preset's activation, gating and dtype at interpreter sizes
            spec = spec.replace(widths=(64, 96, 48))
        params = init_params(spec, seed=m)
        x = make_input(spec, m, seed=m + 1)
        cfg = fused_decode_config(spec, m, interpret=args.smoke)
        to_t = {
            k: torch.from_numpy(v.astype(np.float32)).to(dev, getattr(torch, spec.dtype))
            for k, v in params.items()
        }
        xt = torch.from_numpy(x.astype(np.float32)).to(dev, getattr(torch, spec.dtype))
        packed_t = torch_pack(spec, to_t)
        to_j = {k: jnp.asarray(v) for k, v in params.items()}
        xj = jnp.asarray(x)
        packed_j = jax_pack(spec, to_j)
        for stack in ("torch", "jax"):
            if stack == "torch":
                fn = functools.partial(torch_decode.fused_decode, xt, packed_t, spec)
                ref = torch_baselines.eager(xt, to_t, spec).float().cpu().numpy()
                wait = lambda _: sync()  # noqa: E731
            else:
                fn = functools.partial(jax_decode.fused_decode, xj, packed_j, spec)
                ref = np.asarray(jax_baselines.xla(xj, to_j, spec), np.float32)
                wait = jax.block_until_ready
            row: dict[str, Any] = {"case": case, "stack": stack, "config": str(cfg)}
            try:
                out = fn()
                got = out.float().cpu().numpy() if stack == "torch" else np.asarray(out, np.float32)
                row["rel_err_vs_baseline"] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
                if not args.smoke:
                    wait(fn())
                    timing = time_device(stack, lambda i, fn=fn: fn(), CALLS, wait)
                    us = timing.device.median * 1e6
                    launches = [round(t * 1e6, 2) for t in timing.kernel_times]
                    layer_bytes = _layer_weight_bytes(spec)
                    row.update(
                        us=round(us, 2),
                        kernels=list(timing.kernel_names),
                        launch_us=launches,
                        # the weight stream of launches 1 and 2 (TB/s)
                        launch_tbps=[
                            round(b / t / 1e6, 3)
                            for b, t in zip(layer_bytes, launches, strict=False)
                        ],
                    )
            except Exception as exc:  # the row says why; the other rows still run
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
        if not args.smoke and preset not in streamed:
            streamed.add(preset)
            row = _same_bytes_row(preset, spec, torch, time_device, sync, "cuda")
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "probe": "decode_launch_probe",
        "rows": rows,
        "seconds": round(time.perf_counter() - start, 1),
        "environment": environment(),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0 if all("error" not in r for r in rows) else 1


def _layer_weight_bytes(spec: Any) -> list[int]:
    """Each layer's weight bytes (a gated layer's gate and up both), the stream of its launch."""
    size = 4 if spec.dtype == "float32" else 2
    return [size * layer.d_in * layer.d_out * (2 if layer.gated else 1) for layer in spec.layers()]


def _same_bytes_row(
    preset: str, spec: Any, torch: Any, time_device: Any, sync: Any, device: str
) -> dict[str, Any]:
    """torch's own moves of the preset's weight bytes: a sum over them (read; the kernels it took
    are recorded) and a device copy of them (read + write, the copy ceiling's own operation at
    this size). At a few MB a kernel's ramp and tail are a large part of its time, so this, not
    the 1 GiB copy rate, is what no decode kernel of these weights can beat."""
    weight_bytes = sum(_layer_weight_bytes(spec))
    src = torch.ones(weight_bytes // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    row: dict[str, Any] = {"case": f"{preset}:weights", "stack": "torch", "bytes": weight_bytes}
    for what, fn, copies in (
        ("read", lambda i: src.sum(), False),
        ("copy", lambda i: dst.copy_(src), True),
    ):
        fn(0)
        sync()
        timing = time_device("torch", fn, CALLS, lambda _: sync(), count_copies=copies)
        us = timing.device.median * 1e6
        row[f"{what}_us"] = round(us, 2)
        row[f"{what}_kernels"] = list(timing.kernel_names)  # a sum may be two kernels
        # the copy's rate counts read + write bytes, as the copy ceiling does
        moved = weight_bytes * (2 if what == "copy" else 1)
        row[f"{what}_tbps"] = round(moved / us / 1e6, 3)
    return row


if __name__ == "__main__":
    sys.exit(main())
