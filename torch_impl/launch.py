"""Launch records, built once per launch signature: a repeated call only allocates and launches.

A launcher's work before `kernel[grid](...)` — the config it reads (a gated block_n, a fused_small
SmallConfig), the grid, the scalar arguments (sizes, strides, split counts) and the constexpr and
launch options — depends only on the shapes and strides of its tensors, the config and a few
flags. `LaunchCache(build)` keeps, per such key, the record `build(*key)` returns (a `Launch`, or a
tuple of them with the shapes of the buffers to allocate), so a repeated call computes none of it:
it builds the key, allocates its outputs and calls the record with the tensors.

The key IS the build's argument list: a record is a function of its key and of nothing else
(module constants aside), so whatever changes a launch — a pinned config, a tuned or heuristic
config (resolved before the launcher: the key holds the concrete TileConfig), a dispatch table
(it changes the plan, hence the config or the launcher), a stride, a shape, a flag — is a
different key. dtype and device are not in the portable launchers' keys: their records hold
neither (outputs are allocated from the call's tensors); the Hopper launchers' (torch_impl/tma/)
hold both, as their configs and persistent grids depend on them. Each cache is bounded: cleared
when it reaches `maxsize` records.

Measured on the 2-core CPU with the Triton launches stubbed (bench/host_cost.py): the portable
linear_act launcher took ~6 µs of our Python per launch (8 stride calls, two cdivs, a 13-entry
keyword dict); a hit costs the key (~0.5 µs), the lookup and the call.

Under TRITON_INTERPRET=1 the records are the same (the interpreter takes the same arguments), so
the kernels the tests run are launched through them too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_CACHES: list[LaunchCache] = []


class Launch:
    """One kernel launch with everything but its tensors decided: `launch(*tensors)` runs
    `kernel[grid](*tensors, *scalars, **meta)` (the launchers pass tensors first, then scalars)."""

    __slots__ = ("grid", "kernel", "meta", "scalars")

    def __init__(
        self, kernel: Any, grid: tuple[int, ...], scalars: tuple[Any, ...], meta: dict[str, Any]
    ) -> None:
        self.kernel, self.grid, self.scalars, self.meta = kernel, grid, scalars, meta

    def __call__(self, *tensors: Any) -> None:
        self.kernel[self.grid](*tensors, *self.scalars, **self.meta)

    def __repr__(self) -> str:
        name = getattr(self.kernel, "__name__", None) or getattr(self.kernel, "fn", self.kernel)
        return f"Launch({name}, grid={self.grid}, scalars={self.scalars}, meta={self.meta})"


class LaunchCache:
    """key -> `build(*key)`, built on the first call of a key; at most `maxsize` records."""

    def __init__(self, build: Callable[..., Any], maxsize: int = 1024) -> None:
        self.build = build
        self.maxsize = maxsize
        self.builds = 0  # records built since creation (tests count them)
        self._records: dict[tuple, Any] = {}
        _CACHES.append(self)

    def get(self, key: tuple) -> Any:
        record = self._records.get(key)
        if record is None:
            record = self.build(*key)
            if len(self._records) >= self.maxsize:
                self._records.clear()
            self._records[key] = record
            self.builds += 1
        return record

    def clear(self) -> None:
        self._records.clear()

    def __len__(self) -> int:
        return len(self._records)


def clear_all() -> None:
    """Drop every launch record of the process (tests that patch a module constant a build reads,
    such as common.tiling.WGRAD_MIN_STEPS, call this first)."""
    for cache in _CACHES:
        cache.clear()
