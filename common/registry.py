"""The implementations of the `impl` argument: ONE table that the fronts, the tests and the harness
read. Adding an implementation is one entry here plus its kernel files.

An entry says everything a front needs to plan and launch it:

- `runner`: how the front drives it —
  `"per_layer"`: one kernel per layer; `launcher` is a package whose `linear_act` and `gated`
  modules hold `linear_act_fwd(x2d, w, b, residual, *, activation, config, fp32_precision)` and
  `gated_fwd(x2d, wv, bc, *, n, activation, config, fp32_precision)` (gated layers always on the
  packed operand, so a per-layer entry's layout is "packed");
  `"whole"`: the whole MLP in one launch; `launcher` is a module with `<name>_fwd(x2d, params,
  spec, *, config)`;
  `"baseline"`: a framework's own ops; `launcher` is `"module:function"` taking
  `(x2d, params, spec, residual2d)`.
- `launcher`, `config`, `supports`: module paths, where `{stack}` stands for "torch" or "jax" (an
  implementation on both stacks has a twin module in each). `config` is `"module:function"`
  choosing a launch's TileConfig: per layer `(family, m, n, k, dtype, *, interpret, **options)`,
  whole-MLP `(spec, m, *, interpret)`. `supports` is `"module:function"` returning None or the
  reason this implementation cannot take the problem: per layer `(m, n, k, dtype)`, whole-MLP
  `(spec, m)`.
- `on_unsupported`: `"refuse"` — the front raises NotImplementedError with the reason (an explicit
  `impl` never falls back silently); `"fallback"` — that layer runs the stack's FALLBACK kernels
  and the plan says why (triton_tma's 16-byte rule).
- `layout`: the params layout the kernels take: `"packed"` (`wv{i}`, `bc{i}` of gated layers:
  common/packing.py; every kernel of this project), or `"any"`, the caller's layout as it comes,
  plain (`w{i}`, `v{i}`, `b{i}`, `c{i}`) or packed (the baselines: the same ops on either, a
  gated layer's packed [W|V] as one product split by a view). The fronts accept either layout
  from the caller and pack plain params once (cached) for a "packed" entry; an "any" entry gets
  the params as given, so a FusedMLP (packed) that `auto` sends to a baseline holds no plain
  copy of its weights.
- `capturable`: False where the launches cannot be recorded in a torch CUDA graph; `auto` passes
  over such an implementation while a graph is being captured or prepared (torch_impl/front.py
  `graph_safe`). Every implementation records today: torch's `mosaic` since its kernels are
  launched on the current stream (torch_impl/cross/launcher.py; as_torch_kernel's own launch went
  to the default stream, and `mosaic` was False until 2026-12-06).
- `gpu_only` (no interpreter can run it), `hopper` (on a GPU it needs sm_90: TMA, wgmma),
  `tunable` (`mlp(tune=True)` sweeps its configs on a GPU), `kernel_prefix` (how plans print its
  kernels: "tma.gated", "torch.eager").
- `power_of_two_tiles`: False where a TileConfig's block_n may be any multiple of 64 (the Mosaic
  GPU implementations: whole swizzle atoms, e.g. 192); the Triton and Pallas-Triton kernels'
  tiles are `tl.arange` ranges (`validate.check_config` refuses the others for them by name).

Nothing here imports torch or jax: the entries are strings, imported by the fronts on first use.
"""

from __future__ import annotations

from dataclasses import dataclass

STACKS: tuple[str, ...] = ("torch", "jax")
AUTO = "auto"
RUNNERS: tuple[str, ...] = ("per_layer", "whole", "baseline")
LAYOUTS: tuple[str, ...] = ("packed", "any")
# The portable per-layer kernels of each stack: what `auto` takes when nothing better applies, and
# where a whole-MLP or Hopper implementation that cannot take a problem points the caller.
FALLBACK: dict[str, str] = {"torch": "triton", "jax": "pallas_triton"}


@dataclass(frozen=True)
class Implementation:
    name: str
    stacks: tuple[str, ...]  # "torch", "jax" or both
    description: str
    runner: str  # "per_layer", "whole" or "baseline" (see the module docstring)
    launcher: str  # module (per-layer: package) path; "{stack}" is replaced by the stack
    config: str = ""  # "module:function" choosing a TileConfig ("" for baselines)
    config_options: tuple[tuple[str, object], ...] = ()  # extra keywords for `config`
    supports: str = ""  # "module:function" -> None or why not ("" : takes every problem)
    on_unsupported: str = "refuse"  # "refuse" (NotImplementedError) or "fallback" (per layer)
    layout: str = "packed"  # the params layout its kernels take: "packed" or "any"
    gpu_only: bool = False  # True: needs a GPU (no interpreter can run it)
    hopper: bool = False  # True: on a GPU it needs Hopper (sm_90)
    tunable: bool = False  # True: `tune=True` sweeps its configs on a GPU (torch_impl/tuning.py)
    kernel_prefix: str = ""  # plans print its kernels as prefix + family
    capturable: bool = True  # False: a torch CUDA graph cannot record its launches
    # False: a TileConfig's block_n may be any multiple of 64 (Mosaic GPU), not only a power of two
    power_of_two_tiles: bool = True

    @property
    def baseline(self) -> bool:
        return self.runner == "baseline"

    def module(self, stack: str) -> str:
        """The launcher module (or package) of this implementation on `stack`."""
        return self.launcher.split(":")[0].format(stack=stack)

    def function(self, field: str, stack: str) -> tuple[str, str] | None:
        """("module", "function") of the `config` or `supports` field on `stack` (None: empty)."""
        value = getattr(self, field).format(stack=stack)
        if not value:
            return None
        module, _, function = value.partition(":")
        return module, function


IMPLEMENTATIONS: tuple[Implementation, ...] = (
    Implementation(
        "triton",
        ("torch",),
        "portable Triton kernels (linear_act, gated): pointers and masks",
        runner="per_layer",
        layout="packed",
        launcher="fusedmlp.torch_impl",
        config="fusedmlp.common.tiling:heuristic_config",
        tunable=True,
    ),
    Implementation(
        "triton_tma",
        ("torch",),
        "Hopper Triton: tensor descriptors, persistent grouped grid",
        runner="per_layer",
        layout="packed",
        launcher="fusedmlp.torch_impl.tma",
        config="fusedmlp.common.tiling:heuristic_config",
        config_options=(("persistent", True),),
        supports="fusedmlp.torch_impl.tma.support:tma_unsupported_reason",
        on_unsupported="fallback",
        tunable=True,
        kernel_prefix="tma.",
    ),
    Implementation(
        "pallas_triton",
        ("jax",),
        "Pallas on the Triton backend: the line-for-line twin of triton",
        runner="per_layer",
        layout="packed",
        launcher="fusedmlp.jax_impl",
        config="fusedmlp.common.tiling:heuristic_config",
    ),
    Implementation(
        "pallas_mosaic",
        ("jax",),
        "Pallas Mosaic GPU: TMA, wgmma, warpgroup pipeline",
        runner="per_layer",
        layout="packed",
        launcher="fusedmlp.jax_impl.mosaic",
        config="fusedmlp.jax_impl.mosaic.pipeline:default_config",
        supports="fusedmlp.jax_impl.mosaic.pipeline:unsupported_reason",
        hopper=True,
        kernel_prefix="mosaic.",
        power_of_two_tiles=False,
    ),
    Implementation(
        "fused_small",
        ("torch", "jax"),
        "the whole narrow MLP (widths <= 128) in one kernel",
        runner="whole",
        layout="packed",
        launcher="fusedmlp.{stack}_impl.fused_small",
        config="fusedmlp.common.tiling:fused_small_config",
        supports="fusedmlp.{stack}_impl.fused_small:supports",
    ),
    Implementation(
        "fused_decode",
        ("torch", "jax"),
        "the whole 2-layer MLP for small M in one launch",
        runner="whole",
        layout="packed",
        launcher="fusedmlp.{stack}_impl.fused_decode",
        config="fusedmlp.common.tiling:fused_decode_config",
        supports="fusedmlp.{stack}_impl.fused_decode:supports",
    ),
    Implementation(
        "mosaic",
        ("torch",),
        "the pallas_mosaic kernels called on torch tensors (compiled as plgpu.as_torch_kernel "
        "compiles them, launched on the current stream)",
        runner="per_layer",
        layout="packed",
        launcher="fusedmlp.torch_impl.cross",
        config="fusedmlp.jax_impl.mosaic.pipeline:default_config",
        supports="fusedmlp.torch_impl.cross.linear_act:unsupported_reason",
        gpu_only=True,
        hopper=True,
        kernel_prefix="mosaic.",
        power_of_two_tiles=False,
    ),
    Implementation(
        "jax_triton",
        ("jax",),
        "the triton kernels called on jax arrays (jax_triton.triton_call)",
        runner="per_layer",
        layout="packed",
        launcher="fusedmlp.jax_impl.cross",
        config="fusedmlp.common.tiling:heuristic_config",
        gpu_only=True,
        kernel_prefix="triton.",
    ),
    Implementation(
        "eager",
        ("torch",),
        "baseline: plain torch ops in the spec dtype",
        runner="baseline",
        layout="any",
        launcher="fusedmlp.torch_impl.baselines:run_eager",
        kernel_prefix="torch.",
    ),
    Implementation(
        "compile",
        ("torch",),
        "baseline: torch.compile of the eager path",
        runner="baseline",
        layout="any",
        launcher="fusedmlp.torch_impl.baselines:run_compile",
        kernel_prefix="torch.",
    ),
    Implementation(
        "xla",
        ("jax",),
        "baseline: jax.jit of plain jax.numpy",
        runner="baseline",
        layout="any",
        launcher="fusedmlp.jax_impl.baselines:xla",
        kernel_prefix="jax.",
    ),
)

_BY_NAME = {impl.name: impl for impl in IMPLEMENTATIONS}


def get_implementation(name: str) -> Implementation:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"impl: expected one of {impl_names()} or 'auto', got {name!r}") from None


def impl_names(stack: str | None = None, *, baselines: bool = True) -> tuple[str, ...]:
    """Names for one stack ("torch" or "jax") or all, optionally without the baselines."""
    if stack not in (None, *STACKS):
        raise ValueError(f"stack: expected 'torch', 'jax' or None, got {stack!r}")
    return tuple(
        impl.name
        for impl in IMPLEMENTATIONS
        if (stack is None or stack in impl.stacks) and (baselines or not impl.baseline)
    )


_ALLOWED = {stack: (*impl_names(stack), AUTO) for stack in STACKS}


def check_impl(name: str, stack: str) -> str:
    """Validate an `impl` argument for one stack; returns it unchanged."""
    allowed = _ALLOWED[stack]
    if name not in allowed:
        raise ValueError(f"impl: expected one of {allowed} for the {stack} front, got {name!r}")
    return name


def fallback(stack: str) -> str:
    """The implementation a caller is pointed to when another cannot take a problem."""
    return FALLBACK[stack]
