"""GPU probe (issues 22 and 24): fused_small's tensor-descriptor (TMA) paths against its pointer
loads, torch, on the H200.

    python bench/tma_probe.py OUT.json [--smoke]

Two kernels take TMA where TMA's 16-byte rule holds: the on-chip backward (`fused_small_backward
._tma_loads`: dy and every layer input) and the inference forward at the padded widths of
`common.tiling.SMALL_TMA_IO_WIDTHS` (`fused_small._tma_io`: x in, y out). For each case the probe
times the kernel both ways — the pointer row with the rule function patched to False and every
launch record dropped — by the project's method (bench/timing.time_device: kernel durations from
torch.profiler, each call after the L2 flush, median of 20), twice in alternation, and checks that
both ways give the same bits (the same products in the same order: only the loads differ).
`--smoke`: tiny specs under the interpreter (checks the script on a CPU; nothing is timed).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fusedmlp.common import MLPSpec, get_preset, init_params, make_grad_output, make_input
from fusedmlp.common.packing import pack_params

CALLS = 20


def _cases(smoke: bool) -> list[tuple[str, MLPSpec, int]]:
    """(kernel, spec, rows): the step's backward and the narrow forwards the rules were set on."""
    if smoke:
        return [
            ("backward", MLPSpec((24, 40, 40, 16), "relu", False, "float16"), 301),
            ("forward", MLPSpec((64, 64, 32), "relu", False, "float16"), 130),
        ]
    nerf = get_preset("nerf-64x5").spec
    return [
        ("backward", nerf, 1 << 21),
        ("backward", MLPSpec((32,) * 6, "relu", False, "float16"), 1 << 20),
        ("backward", MLPSpec((64,) * 4, "gelu_tanh", True, "float16"), 1 << 20),
        ("forward", nerf, 1 << 21),
        ("forward", MLPSpec((32,) * 9, "relu", False, "float16"), 1 << 20),
    ]


def _bits(t: Any) -> Any:
    """A torch tensor's bit pattern as integers (NaN-safe equality)."""
    import torch

    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _call(kernel: str, spec: MLPSpec, m: int, device: str) -> Callable[[], Any]:
    """The timed call: the on-chip backward on one saving forward's residuals, or the forward."""
    import torch

    from fusedmlp.torch_impl import fused_small as fs
    from fusedmlp.torch_impl import fused_small_backward as fb

    dtype = getattr(torch, spec.dtype)

    def arr(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(device, dtype)

    params = {k: arr(v) for k, v in pack_params(spec, init_params(spec, seed=1)).items()}
    x = arr(make_input(spec, m, seed=2))
    if kernel == "forward":
        return lambda: {"y": fs.fused_small(x, params, spec)}
    dy = arr(make_grad_output(spec, m, seed=3))
    _, kept = fb.forward_saving(x, params, spec)
    return lambda: fb.mlp_backward(dy, list(kept), params, spec, saved="preact", on_chip=True)


def _rows(kernel: str, spec: MLPSpec, m: int, device: str) -> list[dict[str, Any]]:
    import torch

    from fusedmlp.bench import timing
    from fusedmlp.torch_impl import fused_small as fs
    from fusedmlp.torch_impl import fused_small_backward as fb
    from fusedmlp.torch_impl.launch import clear_all

    module, rule = (fs, "_tma_io") if kernel == "forward" else (fb, "_tma_loads")
    original = getattr(module, rule)
    call = _call(kernel, spec, m, device)

    def wait(_: Any) -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    rows, bits = [], {}
    try:
        for tma in (False, True, False, True):
            setattr(module, rule, original if tma else (lambda *a: False))
            clear_all()
            out = call()
            wait(out)
            bits.setdefault(tma, {k: v.cpu().clone() for k, v in out.items() if v is not None})
            row: dict[str, Any] = {"kernel": kernel, "spec": str(spec), "m": m, "tma": tma}
            if device == "cuda":
                t = timing.time_device("torch", lambda i: call(), CALLS, wait)
                row["device_us"] = round(t.device.median * 1e6, 1)
                row["kernels"] = [
                    (name, round(s * 1e6, 1))
                    for name, s in zip(t.kernel_names, t.kernel_times, strict=False)
                ]
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        setattr(module, rule, original)
        clear_all()
    # bit patterns, not values: torch.equal says NaN != NaN (an overflowing spec's NaN gradients
    # read as "different bits" that way: the seventeenth session's gated 16-wide case)
    same = all(_bits(bits[False][k]).equal(_bits(bits[True][k])) for k in bits[False])
    rows.append({"kernel": kernel, "spec": str(spec), "m": m, "bitwise_same": same})
    print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny specs, interpreted")
    args = parser.parse_args(argv)
    import fusedmlp.torch_impl  # noqa: F401  (before triton: sets TRITON_INTERPRET without a GPU)
    from fusedmlp.bench.env import environment

    device = "cpu" if args.smoke else "cuda"
    result: dict[str, Any] = {"env": environment(), "rows": []}
    for kernel, spec, m in _cases(args.smoke):
        result["rows"] += _rows(kernel, spec, m, device)
    args.out.write_text(json.dumps(result, indent=1))
    return 0 if all(r.get("bitwise_same", True) for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
