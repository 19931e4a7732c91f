"""Providers: every implementation the harness runs, registered once, tritonbench style.

A `Provider` is one (stack, impl) pair with a `baseline` flag, an `enabled(device)` condition that
returns the reason it cannot run (None when it can), and `make(case)`, which returns a thunk `fn(i)
-> output` reading input set i of the case (see cases.py for the rotation). Nothing runs at import:
the fronts are imported when a provider is first asked about.

The thunks call the fronts (`fusedmlp.torch_impl.mlp`, `fusedmlp.jax_impl.mlp`) with `impl=` pinned,
so the harness measures what users call, validation included. JAX thunks are `jax.jit`-wrapped once
per (impl, spec) (the front is jit-compatible; parity and bench in one process share it), so a timed
call is one XLA executable.

Each stack's `auto` is a provider too (`torch:auto`, `jax:auto`): what users call. Its rows name the
implementation the front's `plan()` chose (`Provider.chosen`), and are judged, floored and labelled
as that implementation.

`FAULTS` is a test hook (`fusedmlp parity --inject-fault IMPL`): the named provider's outputs are
perturbed by one part in a hundred, which the parity matrix must catch.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from fusedmlp.common import MLPSpec, impl_names
from fusedmlp.common.registry import AUTO, get_implementation

from .cases import Case

STACKS = ("torch", "jax")
FRONT_MODULES = {"torch": "fusedmlp.torch_impl", "jax": "fusedmlp.jax_impl"}
# Provider names ("torch:triton") or impl names ("triton") whose outputs are deliberately perturbed.
FAULTS: set[str] = set()
# `fusedmlp bench --tune`: the torch front's per-layer Triton kernels use tuned configs on a GPU
# (torch_impl/tuning.py; the first call of each shape sweeps, later ones read the cache).
TUNING: dict[str, bool] = {"torch": False}
# Implementations that need a module the GPU image may lack: the row is skipped with the reason.
OPTIONAL_MODULES = {
    "jax_triton": (
        "jax_triton",
        "the jax_triton wheel is not installed: run bench/fetch_wheels.sh "
        "and carry .wheels/ (bench/gpu_check.sh installs it)",
    ),
}
# Twins compared across stacks on the same inputs (torch impl, jax impl).
TWINS: tuple[tuple[str, str], ...] = (
    ("triton", "pallas_triton"),
    ("triton_tma", "pallas_mosaic"),
    ("triton", "jax_triton"),  # the same Triton kernels launched from each stack
    ("mosaic", "pallas_mosaic"),  # the same Mosaic GPU kernels launched from each stack
    ("fused_small", "fused_small"),
    ("fused_decode", "fused_decode"),
    ("eager", "xla"),
    ("compile", "xla"),
)


def front(stack: str) -> ModuleType:
    """The stack's front module (imported on first use)."""
    return importlib.import_module(FRONT_MODULES[stack])


def sync(stack: str, out: Any = None) -> None:
    """Wait for the device: block on a JAX output, synchronise CUDA for torch."""
    if stack == "jax":
        if out is not None:
            out.block_until_ready()
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Provider:
    stack: str
    impl: str
    baseline: bool

    @property
    def name(self) -> str:
        return f"{self.stack}:{self.impl}"

    def enabled(self, device: str) -> str | None:
        """None if this provider can run on `device` here (interpreted or not), else why not."""
        try:
            fr = front(self.stack)
        except Exception as exc:  # a stack that does not import is reported, not fatal
            return f"{FRONT_MODULES[self.stack]} does not import: {type(exc).__name__}: {exc}"
        try:
            reason = fr.unavailable_reason(self.impl, device)
        except Exception as exc:
            return f"unavailable_reason failed: {type(exc).__name__}: {exc}"
        if reason is None and self.impl in OPTIONAL_MODULES:
            module, why = OPTIONAL_MODULES[self.impl]
            if importlib.util.find_spec(module) is None:
                return why
        return reason

    def chosen(self, case: Case | None = None) -> str:
        """The implementation that runs: `impl`, or for `auto` what the front's plan picks for the
        case (`auto` itself where the plan cannot be made)."""
        if self.impl != AUTO or case is None:
            return self.impl
        try:
            return self.plan(case).impl
        except Exception:
            return self.impl

    def interpreted(self, device: str, case: Case | None = None) -> bool:
        try:
            return bool(front(self.stack).is_interpreted(self.chosen(case), device))
        except Exception:
            return False

    def plan(self, case: Case) -> Any:
        """The front's Plan (raises NotImplementedError where the impl cannot take the spec)."""
        return front(self.stack).plan(
            case.spec, (case.m, case.spec.d_in), impl=self.impl, device=case.device
        )

    def capturable(self, plan: Any) -> bool:
        """Whether a torch CUDA graph records this provider's planned launches (the timing's
        cross-check captures them; JAX rows have none): torch front's `graph_capturable`."""
        return self.stack != "torch" or bool(front(self.stack).graph_capturable(plan))

    def layouts(self, case: Case) -> frozenset[str]:
        """The params layouts this provider's launches read ("packed", "any")."""
        return frozenset(
            get_implementation(launch.impl).layout for launch in self.plan(case).launches
        )

    def make(self, case: Case) -> Callable[[int], Any]:
        """A thunk `fn(i)` running this provider on input set i (mod the number of sets)."""
        fr = front(self.stack)
        spec, impl = case.spec, self.impl
        faulty = self.name in FAULTS or self.impl in FAULTS
        if self.stack == "torch":
            import torch  # after the front: fusedmlp.torch_impl sets up Triton before Dynamo

            # `compile` is one graph per (spec, M) of one function (torch_impl/baselines.py,
            # dynamic=False): past Dynamo's recompile limit (8) it would run eager without a word,
            # and the default GPU presets are 11 cases (models.py, sweep_decode.py do the same).
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            sets = case.torch_sets()

            tune = TUNING["torch"] and impl in ("triton", "triton_tma")

            def run(i: int) -> Any:
                x, params = sets[i % len(sets)]
                y = fr.mlp(x, params, spec, impl=impl, **({"tune": True} if tune else {}))
                return y * 1.01 if faulty else y

            return run

        sets = case.jax_sets()
        if "packed" in self.layouts(case):
            # Packed once here, as a user packs once outside the jitted step: inside the trace
            # the packing would copy every gated weight on every call (measured on the H200 at
            # llama3-8b M=16: 375 µs for fused_decode with in-trace packing, ~100 µs without).
            from fusedmlp.jax_impl.packing import pack_params

            sets = [(x, pack_params(spec, params)) for x, params in sets]
        # `auto` resolves at trace time: a newly installed dispatch table needs a new trace.
        from fusedmlp.common import dispatch

        jitted = _jax_jitted(impl, spec, faulty, dispatch.generation() if impl == "auto" else 0)

        def run(i: int) -> Any:
            x, params = sets[i % len(sets)]
            return jitted(x, params)

        return run


@functools.cache
def _jax_jitted(impl: str, spec: MLPSpec, faulty: bool, generation: int = 0) -> Callable[..., Any]:
    """One jitted function per (impl, spec): parity and bench in one process share its compiled
    executables (jit caches them per input shape), so the second use does not recompile.
    `generation`: the dispatch table's (common/dispatch.py), for `auto` only."""
    import jax

    del generation  # part of the cache key only

    fr = front("jax")

    def call(x: Any, params: Any) -> Any:
        y = fr.mlp(x, params, spec, impl=impl)
        return y * 1.01 if faulty else y

    call.__name__ = f"fusedmlp_{impl}"  # the executable's name in profiler traces: jit_fusedmlp_*
    return jax.jit(call)


def all_providers(stacks: tuple[str, ...] = STACKS) -> list[Provider]:
    """Every registered provider, torch first, in registry order (kernels before baselines), each
    stack's `auto` last."""
    out = []
    for stack in stacks:
        out += [
            Provider(stack, name, get_implementation(name).baseline) for name in impl_names(stack)
        ]
        out.append(Provider(stack, AUTO, False))
    return out


def select(spec: str | None, stacks: tuple[str, ...] = STACKS) -> list[Provider]:
    """Providers named by a comma list: `triton`, `fused_small` (every stack that has it),
    `torch:eager`, `jax` (a whole stack), `kernels`, `baselines`; None or 'all' gives all."""
    providers = all_providers(stacks)
    if not spec or spec == "all":
        return providers
    chosen: list[Provider] = []
    for token in (t.strip() for t in spec.split(",") if t.strip()):
        if token in STACKS:
            match = [p for p in providers if p.stack == token]
        elif token in ("kernels", "baselines"):
            match = [p for p in providers if p.baseline == (token == "baselines")]
        elif ":" in token:
            match = [p for p in providers if p.name == token]
        else:
            match = [p for p in providers if p.impl == token]
        if not match:
            known = ", ".join(p.name for p in providers)
            raise ValueError(f"--impl: unknown implementation {token!r}; known: {known}")
        chosen += [p for p in match if p not in chosen]
    return chosen
