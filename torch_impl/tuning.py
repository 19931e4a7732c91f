"""Autotuned launchers for GPUs: time each candidate config once on the real inputs, cache the best.

The raw launchers (`torch_impl.linear_act.linear_act_fwd`, `torch_impl.gated.gated_fwd` and their
`torch_impl.tma` siblings) stay un-autotuned: they take a config. `tuned_config` picks one:

1. under the interpreter, the heuristic config, untimed (Triton's interpreter runs one config; a
   sweep there would measure Python, not the kernel);
2. else the cached winner for (GPU name, impl, family, M bucket, N, K, dtype, fp32 precision) in the
   JSON file of `common.tuning` (`$FUSEDMLP_TUNING_CACHE`, default ~/.cache/fusedmlp/tuning.json);
3. else the config committed for this GPU (common/tuned/, `common.tuning.committed_config`);
4. else a sweep: every config of `common.tiling.search_space` (and the heuristic one) is launched on
   the caller's tensors and timed with `triton.testing.do_bench`, median of the repetitions (it
   warms up first, so compilation stays out of the number, and clears L2 before each repetition).
   A config that cannot compile or launch (shared memory, registers) is skipped and its reason is
   recorded next to the timings; the fastest is cached.

`tuned(family, launcher)` wraps a launcher so that `config=None` means "tuned". The impl name that
keys the cache comes from the launcher's module (`torch_impl.tma.*` -> "triton_tma", else "triton").
N is the layer's output width: `w.shape[1]` for linear_act, the launcher's `n=` for the packed
gated layer. The JAX side reuses `common.tuning` for the same file and keys.

On import with a CUDA GPU, this module registers the GPU's name with `common.tuning`, so that
`tiling.heuristic_config` finds the committed configs (torch_impl's kernel modules import it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
import triton

from fusedmlp.common.config import TileConfig
from fusedmlp.common.tiling import FAMILIES, heuristic_config, search_space
from fusedmlp.common.tuning import (
    TuningCache,
    TuningKey,
    TuningRecord,
    cache_path,
    candidate_skipped,
    candidate_timing,
    committed_config,
    make_key,
    register_device,
)

from .runtime import INTERPRET

Launcher = Callable[..., torch.Tensor]
# bench(fn) -> median milliseconds of fn(); injectable so the sweep logic is testable off a GPU.
Bench = Callable[[Callable[[], Any]], float]

_CACHES: dict[str, TuningCache] = {}

if torch.cuda.is_available() and not INTERPRET:
    register_device(torch.cuda.get_device_name())


def _cache(path: str | None) -> TuningCache:
    """One TuningCache per file in this process, so a winner is read from disk once."""
    resolved = str(cache_path(path))
    if resolved not in _CACHES:
        _CACHES[resolved] = TuningCache(resolved)
    return _CACHES[resolved]


def impl_of(launcher: Launcher) -> str:
    """The impl name a launcher belongs to: "triton_tma" for torch_impl.tma, else "triton"."""
    module = getattr(launcher, "__module__", "") or ""
    return "triton_tma" if ".tma." in f"{module}." else "triton"


def _median_ms(fn: Callable[[], Any]) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _candidates(
    family: str,
    m: int,
    n: int,
    k: int,
    dtype: str,
    impl: str,
    fp32_precision: str,
    configs: Iterable[TileConfig] | None,
) -> list[TileConfig]:
    # The heuristic first: a sweep can then never pick worse than the untuned default.
    persistent = impl == "triton_tma"
    chosen = (
        list(configs)
        if configs is not None
        else [
            heuristic_config(
                family,
                m,
                n,
                k,
                dtype,
                persistent=persistent,
                impl=impl,
                fp32_precision=fp32_precision,
            ),
            *search_space(family, m, dtype, persistent=persistent, fp32_precision=fp32_precision),
        ]
    )
    return list(dict.fromkeys(chosen))  # TileConfig is frozen (hashable): drop repeats, keep order


def sweep(
    family: str,
    launcher: Launcher,
    args: tuple[Any, ...],
    configs: Iterable[TileConfig],
    *,
    activation: str,
    fp32_precision: str = "ieee",
    bench: Bench | None = None,
    **launch_kw: Any,
) -> TuningRecord:
    """Time `launcher(*args, activation=..., config=c, fp32_precision=..., **launch_kw)` for every
    config c (`launch_kw`: the gated launcher's `n`).

    Raises RuntimeError, with every reason, when no config runs.
    """
    bench = bench or _median_ms
    timings: list[tuple[float, TileConfig]] = []
    candidates: list[dict[str, Any]] = []
    for config in configs:

        def run(config: TileConfig = config) -> torch.Tensor:
            return launcher(
                *args,
                activation=activation,
                config=config,
                fp32_precision=fp32_precision,
                **launch_kw,
            )

        try:
            ms = bench(run)
        except Exception as err:  # any failure of one candidate is a skip reason, not an abort
            # OutOfResources (shared memory, registers) is the expected one; a compile error or
            # a launch failure in one candidate must not stop the sweep either.
            candidates.append(candidate_skipped(config, f"{type(err).__name__}: {err}"[:500]))
            continue
        timings.append((ms, config))
        candidates.append(candidate_timing(config, ms))
    if not timings:
        reasons = "; ".join(f"{c['config']}: {c['skipped']}" for c in candidates)
        raise RuntimeError(f"{family}: no config ran ({reasons})")
    best_ms, best = min(timings, key=lambda t: t[0])
    versions = {"triton": triton.__version__, "torch": torch.__version__}
    return TuningRecord(best, best_ms, candidates, versions)


def tuned_config(
    family: str,
    launcher: Launcher,
    args: tuple[Any, ...],
    *,
    activation: str,
    fp32_precision: str = "ieee",
    configs: Iterable[TileConfig] | None = None,
    cache_file: str | None = None,
    interpret: bool | None = None,
    device_name: str | None = None,
    bench: Bench | None = None,
    use_committed: bool = True,
    n: int | None = None,
    launch_options: dict[str, Any] | None = None,
) -> TileConfig:
    """The config for `launcher` on `args` (x [M, K], w [K, N] or wv [K, 2·Np], ...): cached,
    committed, swept, or heuristic. `n`: the gated layer's output width (its launcher's `n=`).
    `launch_options`: the launcher's other keywords, passed to every timed launch, so the sweep
    times the kernel the caller runs — the front's tf32 TMA launches read operands rounded in
    memory (`tf32_operands_exact`, `tf32_output`), whose pipeline differs from the register-rounding
    form the launcher runs without them (bench/results/2026-12-07-h100-2d92464-tf32: +31-44 %).

    `interpret`, `device_name` and `bench` default to this process's interpreter flag, the GPU of x
    and `do_bench`'s median; tests pass their own to exercise the sweep without a GPU.
    """
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    x, w = args[0], args[1]
    m, k = x.shape
    if n is None:
        if family == "gated":
            raise ValueError("n: expected the gated layer's output width, got None")
        n = w.shape[1]
    dtype = str(x.dtype).removeprefix("torch.")
    launch_kw = {**(launch_options or {}), **({"n": n} if family == "gated" else {})}
    if INTERPRET if interpret is None else interpret:
        return heuristic_config(family, m, n, k, dtype, interpret=True)
    if device_name is None:
        device_name = torch.cuda.get_device_name(x.device)
    impl = impl_of(launcher)
    key: TuningKey = make_key(device_name, impl, family, m, n, k, dtype, fp32_precision)
    cache = _cache(cache_file)
    cached = cache.get(key)
    if cached is not None:
        return cached
    if use_committed and configs is None:
        committed = committed_config(device_name, impl, family, m, n, k, dtype, fp32_precision)
        if committed is not None:
            return committed
    record = sweep(
        family,
        launcher,
        args,
        _candidates(family, m, n, k, dtype, impl, fp32_precision, configs),
        activation=activation,
        fp32_precision=fp32_precision,
        bench=bench,
        **launch_kw,
    )
    cache.put(key, record)
    return record.config


def tuned(family: str, launcher: Launcher, **tune_options: Any) -> Launcher:
    """`launcher` with `config=None` meaning: the tuned config for these inputs.

    Same signature as the launcher (`*args, activation, config, fp32_precision`, and the gated
    launcher's `n`); `tune_options` go to `tuned_config` (configs, cache_file, ...).
    """

    @functools.wraps(launcher)
    def run(
        *args: Any,
        activation: str,
        config: TileConfig | None = None,
        fp32_precision: str = "ieee",
        **launch_kw: Any,
    ) -> torch.Tensor:
        if config is None:
            config = tuned_config(
                family,
                launcher,
                args,
                activation=activation,
                fp32_precision=fp32_precision,
                n=launch_kw.get("n"),
                launch_options={k: v for k, v in launch_kw.items() if k != "n"},
                **tune_options,
            )
        return launcher(
            *args, activation=activation, config=config, fp32_precision=fp32_precision, **launch_kw
        )

    return run
