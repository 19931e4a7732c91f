"""The contract both stacks share: spec, params, tiling, implementation names, reference, tolerance.

Nothing here imports torch or jax.
"""

from . import cost, reference, tolerance, validate
from .config import TileConfig
from .dtypes import DTYPES, FP32_PRECISIONS, numpy_dtype
from .params import init_params, make_grad_output, make_input, param_shapes
from .plan import KernelLaunch, Plan
from .presets import PRESETS, Preset, get_preset, preset_batch_sizes
from .registry import (
    AUTO,
    FALLBACK,
    IMPLEMENTATIONS,
    Implementation,
    get_implementation,
    impl_names,
)
from .spec import ACTIVATIONS, GATED_ACTIVATIONS, KERNEL_ACTIVATIONS, PLAIN_ACTIVATIONS, MLPSpec
from .tiling import heuristic_config

__all__ = [
    "ACTIVATIONS",
    "AUTO",
    "DTYPES",
    "FALLBACK",
    "FP32_PRECISIONS",
    "GATED_ACTIVATIONS",
    "IMPLEMENTATIONS",
    "KERNEL_ACTIVATIONS",
    "PLAIN_ACTIVATIONS",
    "PRESETS",
    "Implementation",
    "KernelLaunch",
    "MLPSpec",
    "Plan",
    "Preset",
    "TileConfig",
    "cost",
    "get_implementation",
    "get_preset",
    "heuristic_config",
    "impl_names",
    "init_params",
    "make_grad_output",
    "make_input",
    "numpy_dtype",
    "param_shapes",
    "preset_batch_sizes",
    "reference",
    "tolerance",
    "validate",
]
