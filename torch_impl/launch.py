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

Launches inside a trace (graph_op.py): where `torch.compile` traces `fusedmlp::mlp_launches`, the
launchers run on fake or functional tensors, and a record launches through `wrap_triton` instead:
the launch becomes a `triton_kernel_wrapper` node of the caller's graph (same kernel, grid,
scalars and constexprs), which Inductor compiles and launches from its own wrapper. Programmatic
dependent launch is left out there (`launch_pdl`, and the kernels' USE_PDL): Inductor takes
num_warps / num_stages as launch options but would pass any other keyword to the kernel as an
argument; each launch then waits for the one before, as stream order has it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .runtime import INTERPRET

_CACHES: list[LaunchCache] = []


class Launch:
    """One kernel launch with everything but its tensors decided: `launch(*tensors)` runs
    `kernel[grid](*tensors, *scalars, **meta)` (the launchers pass tensors first, then scalars)."""

    __slots__ = ("_traced_meta", "grid", "kernel", "meta", "scalars")

    def __init__(
        self, kernel: Any, grid: tuple[int, ...], scalars: tuple[Any, ...], meta: dict[str, Any]
    ) -> None:
        self.kernel, self.grid, self.scalars, self.meta = kernel, grid, scalars, meta
        self._traced_meta: dict[str, Any] | None = None

    def __call__(self, *tensors: Any) -> None:
        if INTERPRET or type(tensors[0]) is torch.Tensor or not is_traced(tensors[0]):
            self.kernel[self.grid](*tensors, *self.scalars, **self.meta)  # a real launch
            return
        if self._traced_meta is None:  # see the module docstring
            meta = {k: v for k, v in self.meta.items() if k != "launch_pdl"}
            if "USE_PDL" in meta:
                meta["USE_PDL"] = False
            self._traced_meta = meta
        # wrap_triton on each traced launch (trace time only): its wrapper holds the kernel's
        # index in torch's kernel table, which torch.compiler.reset() empties.
        from torch.library import wrap_triton

        wrap_triton(self.kernel)[self.grid](*tensors, *self.scalars, **self._traced_meta)

    def __repr__(self) -> str:
        name = getattr(self.kernel, "__name__", None) or getattr(self.kernel, "fn", self.kernel)
        return f"Launch({name}, grid={self.grid}, scalars={self.scalars}, meta={self.meta})"


def is_traced(t: Any) -> bool:
    """Whether `t` is a trace's stand-in (a fake or functional tensor: torch.compile, make_fx),
    whose launches must be recorded through `wrap_triton`, not run."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return isinstance(t, (FakeTensor, FunctionalTensor))


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
