"""The implementation names of the `impl` argument, one set for fronts, tests, harness."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Implementation:
    name: str
    stacks: tuple[str, ...]  # "torch", "jax" or both
    description: str
    baseline: bool = False
    gpu_only: bool = False  # True: needs a GPU (no interpreter can run it)


IMPLEMENTATIONS: tuple[Implementation, ...] = (
    Implementation(
        "triton", ("torch",), "portable Triton kernels (linear_act, gated): pointers and masks"
    ),
    Implementation(
        "triton_tma", ("torch",), "Hopper Triton: tensor descriptors, persistent grouped grid"
    ),
    Implementation(
        "pallas_triton", ("jax",), "Pallas on the Triton backend: the line-for-line twin of triton"
    ),
    Implementation("pallas_mosaic", ("jax",), "Pallas Mosaic GPU: TMA, wgmma, warpgroup pipeline"),
    Implementation(
        "fused_small", ("torch", "jax"), "the whole narrow MLP (widths <= 128) in one kernel"
    ),
    Implementation(
        "fused_decode", ("torch", "jax"), "the whole 2-layer MLP for small M in one launch"
    ),
    Implementation(
        "mosaic",
        ("torch",),
        "the pallas_mosaic kernels called on torch tensors (plgpu.as_torch_kernel)",
        gpu_only=True,
    ),
    Implementation(
        "jax_triton",
        ("jax",),
        "the triton kernels called on jax arrays (jax_triton.triton_call)",
        gpu_only=True,
    ),
    Implementation(
        "eager", ("torch",), "baseline: plain torch ops in the spec dtype", baseline=True
    ),
    Implementation(
        "compile", ("torch",), "baseline: torch.compile of the eager path", baseline=True
    ),
    Implementation("xla", ("jax",), "baseline: jax.jit of plain jax.numpy", baseline=True),
)

AUTO = "auto"
_BY_NAME = {impl.name: impl for impl in IMPLEMENTATIONS}


def get_implementation(name: str) -> Implementation:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"impl: expected one of {impl_names()} or 'auto', got {name!r}") from None


def impl_names(stack: str | None = None, *, baselines: bool = True) -> tuple[str, ...]:
    """Names for one stack ("torch" or "jax") or all, optionally without the baselines."""
    if stack not in (None, "torch", "jax"):
        raise ValueError(f"stack: expected 'torch', 'jax' or None, got {stack!r}")
    return tuple(
        impl.name
        for impl in IMPLEMENTATIONS
        if (stack is None or stack in impl.stacks) and (baselines or not impl.baseline)
    )


def check_impl(name: str, stack: str) -> str:
    """Validate an `impl` argument for one stack; returns it unchanged."""
    allowed = (*impl_names(stack), AUTO)
    if name not in allowed:
        raise ValueError(f"impl: expected one of {allowed} for the {stack} front, got {name!r}")
    return name
