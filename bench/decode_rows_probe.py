"""Decode at M = 64 in row blocks: does fused_decode stream llama3-8b's weights faster as two
32-row (or four 16-row) blocks than as one 64-row block?

At M ≤ 16 fused_decode streams the 352 MB at the read rate (86.8–89.3 µs on the H200), at M = 32
in ~92.5 µs, but at M = 64 in 100–103 µs: its 64-row tile runs wgmma with 2 pipeline buffers of
48 KiB (two programs per SM), fewer bytes in flight than the small-M paths' 3 buffers of 36 KiB.
With a pinned block_m below M the launches run row blocks as the fastest index of their grids
(torch_impl/fused_decode.py), so the programs that stream one weight tile run side by side and
the tile should come from HBM once and from L2 for its neighbour. Predicted: block_m = 32 at M = 64
~93–95 µs (the M = 32 path's rate, the weights read once from HBM), block_m = 16 ~90–96 µs (more
programs, four L2 reads of each tile), against the default's ~100–103.

Rows (bf16, llama3-8b's MLP 4096 → 14336 → 4096 SwiGLU, device time as the harness defines it:
bench/timing.py, read flush): torch eager; fused_decode with the default config at M = 64; with
the M = 32 and M = 16 defaults' tiles pinned at M = 64 (2 and 4 row blocks); and the same two at
their own M (the rate each path reaches alone). Every variant is checked against eager first.

    python3 bench/decode_rows_probe.py OUT.json        (GPU, ~40 s)
    python3 bench/decode_rows_probe.py OUT.json --smoke  (CPU: a 64→128→64 MLP interpreted,
                                                          parity only, nothing timed)
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

CALLS = 50
SPEC_WIDTHS = (4096, 14336, 4096)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    smoke = "--smoke" in argv
    argv = [a for a in argv if a != "--smoke"]
    out_path = argv[0] if argv else "decode_rows_probe.json"
    if smoke:  # before fusedmlp.torch_impl is imported: the interpreter decides at import
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from fusedmlp.bench.env import environment
    from fusedmlp.bench.timing import time_device
    from fusedmlp.common.params import init_params
    from fusedmlp.common.spec import MLPSpec
    from fusedmlp.common.tiling import fused_decode_config
    from fusedmlp.torch_impl import baselines
    from fusedmlp.torch_impl.fused_decode import fused_decode
    from fusedmlp.torch_impl.packing import pack_params

    if not torch.cuda.is_available() and not smoke:
        print("decode_rows_probe: needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    dev = "cpu" if smoke else "cuda"
    spec = MLPSpec((64, 128, 64) if smoke else SPEC_WIDTHS, "swiglu", False, "bfloat16")
    plain = {
        k: torch.from_numpy(v.astype("float32")).to(dev, torch.bfloat16)
        for k, v in init_params(spec, seed=0).items()
    }
    packed = pack_params(spec, plain)
    x64 = torch.randn(64, spec.d_in, device=dev, dtype=torch.bfloat16)
    sync = torch.cuda.synchronize if not smoke else lambda: None

    def cfg_rows(m_tiles: int) -> Any:
        # the tiles fused_decode picks at M = m_tiles, pinned at a larger M: row blocks
        return fused_decode_config(spec, m_tiles)

    cases: list[tuple[str, int, Any]] = [
        ("eager", 64, None),
        ("fused_decode default", 64, "default"),
        ("fused_decode block_m=32 (2 row blocks)", 64, cfg_rows(32)),
        ("fused_decode block_m=16 (4 row blocks)", 64, cfg_rows(16)),
        ("fused_decode default at M=32", 32, "default"),
        ("fused_decode default at M=16", 16, "default"),
    ]
    rows: list[dict[str, Any]] = []
    for name, m, config in cases:
        x = x64[:m].contiguous()
        if config is None:
            fn = lambda x=x: baselines.eager(x, plain, spec)  # noqa: E731
        else:
            pinned = None if config == "default" else config
            fn = lambda x=x, c=pinned: fused_decode(x, packed, spec, config=c)  # noqa: E731
        row: dict[str, Any] = {"variant": name, "m": m}
        if config not in (None, "default"):
            row["config"] = str(config)
        try:
            ref = baselines.eager(x, plain, spec).float()
            row["rel_err_vs_eager"] = float((fn().float() - ref).norm() / ref.norm())
            if smoke:
                rows.append(row)
                continue
            fn()
            sync()
            timing = time_device("torch", lambda i, fn=fn: fn(), CALLS, lambda _: sync())
            us = timing.device.median * 1e6
            row.update(us=round(us, 2), kernels=list(timing.kernel_names))
            row["weights_tbps"] = round(352_321_536 / us / 1e6, 3)
        except Exception as exc:  # a config the compiler refuses: the row says why
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "probe": "decode_rows_probe",
        "spec": str(spec),
        "rows": rows,
        "seconds": round(time.perf_counter() - start, 1),
        "environment": environment(),
    }
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
