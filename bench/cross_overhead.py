"""The overhead decomposition: one compiled kernel, called from both frameworks, timed three ways.

Holding the kernel fixed makes every difference the framework's. For each kernel — the Triton
kernels of torch_impl (native from torch, `jax_triton` from JAX) and the Mosaic GPU kernels of
jax_impl/mosaic (native from JAX; from torch, torch_impl/cross: compiled as `as_torch_kernel`
compiles them, launched directly by torch_impl/cross/launcher.py), families linear_act and
gated — and each framework, `decompose` measures, with the definitions of the bench
(timing.measure):

- device_us: the sum of the call's kernel durations, from the framework's own profiler (each call
  after the L2 flush), with kernels_per_call (K) and span_us. The same kernel gives the same device
  time from both sides; a difference is extra device work on one side (a pad, a copy), and shows as
  a larger K too.
- throughput_us: per call, N calls issued back to back and one wait.
- host_issue_us: host time to issue one call without waiting: torch's launcher (Triton's Python
  launch path, or the Mosaic GPU route's: the compiled-kernel lookup, outputs, pointers, the
  plugin's launch function) vs JAX's jitted dispatch (pytree
  flattening, executable lookup, the custom call's launch); host_sync_us: one call and its wait.
- first_call_ms: the first call, synchronised: trace + lowering + compile + launch. Triton's disk
  cache is pointed at a fresh directory for the run so torch's first call compiles; jax_triton and
  as_torch_kernel keep in-memory caches only, so their first call is only a first call in a process
  that has not run the kernel before (run this first, or in its own process).

`attribute` subtracts the native call from the cross call, column by column: the framework is
charged only what these same-definition columns of the same kernel show.

Shapes are tile-aligned by default (M, N, K multiples of 128), so neither launcher pads and the
device time is the kernel's alone. Inputs are created once in torch on the GPU and shared with JAX
through DLPack (zero-copy): both frameworks read the same buffers, and `same_bits` says whether the
two outputs are bitwise equal. GPU only: on any other machine `decompose` returns no rows and the
reason. The method and what to expect are written up in docs/porting.md, part 3.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from fusedmlp.common.config import TileConfig

FAMILIES = ("linear_act", "gated")
# The measured columns, each with the same definition for every route (attribute() subtracts them).
MEASURED = (
    "device_us",
    "span_us",
    "throughput_us",
    "host_issue_us",
    "host_sync_us",
    "first_call_ms",
)
# kernel -> (native framework, cross framework)
KERNELS = {"triton": ("torch", "jax"), "mosaic": ("jax", "torch")}
ROUTE = {
    ("triton", "torch"): "torch_impl (native Triton launch)",
    ("triton", "jax"): "jax_impl.cross via jax_triton.triton_call",
    ("mosaic", "jax"): "jax_impl.mosaic (native, jax.jit)",
    ("mosaic", "torch"): "torch_impl.cross (as_torch_kernel's compile, launcher.py's launch)",
}


# ---- availability --------------------------------------------------------------------------------
def unavailable_reason() -> str | None:
    """None where both frameworks see a Hopper GPU; else why the decomposition cannot run here."""
    try:
        import torch
    except ImportError as exc:
        return f"torch does not import: {exc}"
    if not torch.cuda.is_available():
        return "no CUDA GPU: the decomposition times compiled kernels on a GPU (none interpreted)"
    if torch.cuda.get_device_capability()[0] != 9:
        return "the Mosaic GPU kernels need a Hopper GPU (sm_90: TMA, wgmma)"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 is set: Triton kernels would run interpreted"
    try:
        import jax
    except ImportError as exc:
        return f"jax does not import: {exc}"
    if not any(d.platform == "gpu" for d in jax.devices()):
        return "jax sees no GPU (the CUDA plugin is missing or JAX_PLATFORMS excludes it)"
    return None


# ---- one measured call site ----------------------------------------------------------------------
@dataclass(frozen=True)
class CallSite:
    kernel: str  # "triton.linear_act", "mosaic.gated", ...
    framework: str  # "torch" or "jax"
    route: str
    config: TileConfig
    fn: Callable[[int], Any]  # fn(i) runs one call and returns the output (not waited for)


def _operands(family: str, m: int, n: int, k: int, dtype: str, seed: int) -> dict[str, Any]:
    """torch CUDA tensors of the problem, random normal scaled like a layer (1/sqrt(K))."""
    from fusedmlp.common.dtypes import numpy_dtype
    from fusedmlp.torch_impl.module import to_torch

    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(k)

    def arr(*shape: int, s: float = 1.0) -> Any:
        return to_torch((rng.standard_normal(shape) * s).astype(numpy_dtype(dtype)), "cuda")

    ops = {"x": arr(m, k), "w": arr(k, n, s=scale), "b": arr(n, s=0.1)}
    if family == "gated":  # the gated kernels take W|V and b|c packed once (common/packing.py)
        from fusedmlp.torch_impl.packing import pack_gated

        v, c = arr(k, n, s=scale), arr(n, s=0.1)
        ops = {"x": ops["x"], "wv": pack_gated(ops["w"], v), "bc": pack_gated(ops["b"], c)}
    return ops


def _call_sites(
    family: str, m: int, n: int, k: int, dtype: str, activation: str, seed: int
) -> list[CallSite]:
    import jax

    from fusedmlp.common.tiling import heuristic_config
    from fusedmlp.jax_impl import mosaic as jax_mosaic

    from .cases import torch_to_jax

    t_ops = _operands(family, m, n, k, dtype, seed)
    j_ops = {name: torch_to_jax(t) for name, t in t_ops.items()}
    tri_cfg = heuristic_config(family, m, n, k, dtype, interpret=False)
    mos_cfg = jax_mosaic.default_config(family, m, n, k, dtype, interpret=False)

    def mod(path: str) -> Any:
        import importlib

        return importlib.import_module(f"{path}.{family}")

    def torch_call(launcher: Callable, cfg: TileConfig) -> Callable[[int], Any]:
        o = t_ops
        if family == "gated":
            return lambda i: launcher(
                o["x"], o["wv"], o["bc"], n=n, activation=activation, config=cfg
            )
        return lambda i: launcher(o["x"], o["w"], o["b"], None, activation=activation, config=cfg)

    def jax_call(launcher: Callable, cfg: TileConfig, name: str, **extra: Any) -> Callable:
        if family == "gated":

            def body(x: Any, wv: Any, bc: Any) -> Any:
                return launcher(x, wv, bc, n=n, activation=activation, config=cfg, **extra)

            args = (j_ops["x"], j_ops["wv"], j_ops["bc"])
        else:

            def body(x: Any, w: Any, b: Any) -> Any:
                return launcher(x, w, b, None, activation=activation, config=cfg, **extra)

            args = (j_ops["x"], j_ops["w"], j_ops["b"])
        body.__name__ = f"fusedmlp_{name}_{family}"  # profiler module name: jit_fusedmlp_*
        jitted = jax.jit(body)
        return lambda i: jitted(*args)

    fwd = f"{family}_fwd"
    return [
        CallSite(
            f"triton.{family}",
            "torch",
            ROUTE["triton", "torch"],
            tri_cfg,
            torch_call(getattr(mod("fusedmlp.torch_impl"), fwd), tri_cfg),
        ),
        CallSite(
            f"triton.{family}",
            "jax",
            ROUTE["triton", "jax"],
            tri_cfg,
            jax_call(getattr(mod("fusedmlp.jax_impl.cross"), fwd), tri_cfg, "jax_triton"),
        ),
        CallSite(
            f"mosaic.{family}",
            "jax",
            ROUTE["mosaic", "jax"],
            mos_cfg,
            jax_call(
                getattr(mod("fusedmlp.jax_impl.mosaic"), fwd),
                mos_cfg,
                "pallas_mosaic",
                interpret=False,
            ),
        ),
        CallSite(
            f"mosaic.{family}",
            "torch",
            ROUTE["mosaic", "torch"],
            mos_cfg,
            torch_call(getattr(mod("fusedmlp.torch_impl.cross"), fwd), mos_cfg),
        ),
    ]


@contextlib.contextmanager
def _fresh_triton_cache() -> Iterator[None]:
    """Point Triton's disk cache at an empty directory, so torch's first call really compiles."""
    before = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="fusedmlp-triton-cache-") as tmp:
        os.environ["TRITON_CACHE_DIR"] = tmp
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = before


def _measure(site: CallSite) -> tuple[dict[str, Any], Any]:
    from .providers import sync
    from .timing import measure

    def wait(out: Any) -> None:
        sync(site.framework, out)

    t0 = time.perf_counter()
    out = site.fn(0)
    wait(out)
    first_s = time.perf_counter() - t0
    m = measure(site.framework, "cuda", site.fn, wait, target_s=0.1)
    if "device_error" in m:
        raise RuntimeError(f"device time: {m['device_error']}")
    row = {
        "kernel": site.kernel,
        "framework": site.framework,
        "device_us": m["time"]["median"] * 1e6,
        "kernels_per_call": m["kernels_per_call"],
        "span_us": m["span"]["median"] * 1e6,
        "throughput_us": m["throughput"]["median"] * 1e6,
        "host_issue_us": m["host_issue"]["median"] * 1e6,
        "host_sync_us": m["host_sync"]["median"] * 1e6,
        "first_call_ms": first_s * 1e3,
        "route": site.route,
        "config": str(site.config),
        "device_method": m["time"]["method"],
        "device_us_min": m["time"]["min"] * 1e6,
        "device_us_max": m["time"]["max"] * 1e6,
        "kernel_names": m["kernel_names"],
        "note": "",
    }
    return row, out


def _same_bits(a: Any, b: Any) -> bool:
    import torch

    def bits(t: Any) -> Any:  # compare bit patterns: torch.equal would call -0.0 == 0.0
        t = t if isinstance(t, torch.Tensor) else torch.from_dlpack(t)
        return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])

    a, b = bits(a), bits(b)
    return a.shape == b.shape and bool(torch.equal(a, b))


# ---- public --------------------------------------------------------------------------------------
def decompose(
    *,
    m: int = 1024,
    n: int = 1024,
    k: int = 1024,
    dtype: str = "bfloat16",
    activation: str = "gelu_tanh",
    families: tuple[str, ...] = FAMILIES,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], str | None]:
    """Rows (kernel, framework, device_us, kernels_per_call, span_us, throughput_us, host_issue_us,
    host_sync_us, first_call_ms, route, config, device_method, same_bits, note, ...) for each kernel
    family from both frameworks, and None;
    or no rows and the reason where this machine cannot run it. A call site that fails gets a row
    with NaN times and the error in `note`, so one missing wheel does not hide the rest.

    dtype is float16 or bfloat16 (the Mosaic GPU kernels' dtypes). Both frameworks share the GPU:
    the caller sets XLA_PYTHON_CLIENT_PREALLOCATE=false before JAX starts (the CLI does).
    """
    reason = unavailable_reason()
    if reason is not None:
        return [], reason
    if dtype not in ("float16", "bfloat16"):
        raise ValueError(f"dtype: expected 'float16' or 'bfloat16', got {dtype!r}")
    for family in families:
        if family not in FAMILIES:
            raise ValueError(f"families: expected names from {FAMILIES}, got {family!r}")
    rows: list[dict[str, Any]] = []
    with _fresh_triton_cache():
        for family in families:
            outs: dict[tuple[str, str], Any] = {}
            for site in _call_sites(family, m, n, k, dtype, activation, seed):
                try:
                    row, out = _measure(site)
                    outs[site.kernel, site.framework] = out
                except Exception as exc:  # a missing wheel or a failing route: say so, go on
                    row = {
                        "kernel": site.kernel,
                        "framework": site.framework,
                        **{col: float("nan") for col in MEASURED},
                        "kernels_per_call": None,
                        "route": site.route,
                        "config": str(site.config),
                        "device_method": "",
                        "note": f"{type(exc).__name__}: {exc}",
                    }
                row.update(m=m, n=n, k=k, dtype=dtype, activation=activation)
                rows.append(row)
            for row in rows[-4:]:
                pair = [outs.get((row["kernel"], fw)) for fw in ("torch", "jax")]
                row["same_bits"] = None if None in pair else _same_bits(*pair)
    return rows, None


def attribute(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per kernel: cross call minus native call for each measured column — the framework's share,
    since the kernel is the same. Positive: the cross route costs more. `kernels_delta` counts the
    extra kernels per call (a pad or a copy on one side is device work of that framework). A
    pair with a side not measured (its row's note says why: no jax_triton, say) is left out."""
    out = []
    by_key = {(r["kernel"], r["framework"]): r for r in rows}
    for (kernel, fw), row in by_key.items():
        native_fw, cross_fw = KERNELS[kernel.split(".")[0]]
        if fw != native_fw or (kernel, cross_fw) not in by_key:
            continue
        cross = by_key[kernel, cross_fw]
        if row.get("note") or cross.get("note"):
            continue
        out.append(
            {
                "kernel": kernel,
                "native": native_fw,
                "cross": cross_fw,
                **{f"{col}_delta": cross[col] - row[col] for col in MEASURED},
                "kernels_delta": (
                    cross["kernels_per_call"] - row["kernels_per_call"]
                    if cross.get("kernels_per_call") is not None
                    and row.get("kernels_per_call") is not None
                    else None
                ),
            }
        )
    return out


# The columns every row has, in display order (for the CLI's table).
COLUMNS = (
    "kernel",
    "framework",
    "device_us",
    "kernels_per_call",
    "span_us",
    "throughput_us",
    "host_issue_us",
    "host_sync_us",
    "first_call_ms",
    "same_bits",
    "route",
    "config",
    "device_method",
    "note",
)
