"""The mixed-precision policy of training, written once for both stacks.

    master params (fp32) --cast--> compute dtype --MLP/GEMMs--> fp32 --> loss (fp32)
    grads: compute-dtype cotangents --cast's backward--> fp32 grads of the master params
    fp16:  loss × scale before the backward; grads ÷ scale; a non-finite grad skips the step and
           lowers the scale; `growth_interval` finite steps in a row raise it (dynamic scaling)

Policies (`PRECISIONS`, the `--precision` of `fusedmlp train`):

| name | params (master) | compute (GEMMs, MLP in/out) | loss, norms, optimizer | loss scaling |
| --- | --- | --- | --- | --- |
| fp32 | float32 | float32 | float32 | no |
| bf16 | float32 | bfloat16 | float32 | no (bf16 has fp32's exponent range) |
| fp16 | float32 | float16 | float32 | dynamic (`LossScaleConfig`) |

Cast rules (what both stacks do, so that their curves agree):
1. Params stay float32 in the optimizer; each step casts them to the compute dtype at the point of
   use (torch: `torch.autocast` casts a Linear's / FusedMLP's weight on each call; JAX:
   `jax_impl.training.cast_to_compute` of the param tree inside the jitted step). The gradient of
   a cast is the cast back: grads land in float32, in the master params.
2. The inputs of an MLP / Linear are cast to the compute dtype, its output keeps it.
3. Everything that reduces over many terms or exponentiates runs in float32: the loss (MSE,
   cross-entropy with its log-softmax), normalisations (RMSNorm), the residual stream of the LM
   (what torch.autocast does: its fp32 ops list has mse_loss, log_softmax, norms; a fp32 + 16-bit
   add promotes to fp32). JAX: the model casts to float32 before these, explicitly.
4. fp16 only: the loss is multiplied by the scale before the backward, the fp32 grads are divided
   by it, and the step is applied only if every grad is finite (torch: `torch.amp.GradScaler`
   built from `LossScaleConfig`; JAX: `next_loss_scale` below under `jnp.where`).

Dynamic loss scaling, the state machine (torch.amp.GradScaler's, the same constants):
    state (scale, good_steps);  after each backward, finite = all grads finite
    finite and good_steps + 1 == growth_interval: scale × growth_factor, good_steps = 0
    finite otherwise:                              scale unchanged,        good_steps + 1
    not finite (the step is SKIPPED):              scale × backoff_factor, good_steps = 0
`next_loss_scale` is that machine written once with a `where(cond, a, b)` argument, so plain
Python runs it (tests, and the check against GradScaler) and JAX runs it traced with `jnp.where`
inside `jit`; nothing here imports NumPy, torch or jax.

Comparing training curves (tests/test_training.py: our kernels against the baseline from the
same init and data order, a few steps under the interpreters): the loss curve L(t) of a 16-bit run
is compared as one array with `common.tolerance.compare`, the reference being the baseline's curve
under the fp32 policy (its own error, ~1e-7 relative, is far below the 16-bit bounds: one
precision up serves as the reference, as float64 does for a float32 kernel) and the baseline's
curve under the same 16-bit policy as the `baseline` (the 2× rule). Why the forward's bounds of
the compute dtype hold for a loss curve: at step 0, L = mean((y − t)²) and
δL/L ≤ 2‖δy‖/‖y − t‖, the output's rel_fro error times 2‖y‖/‖y − t‖ (≈ 1–2 at the start of a
fit, where the output is small against the target); each later step adds the previous update's
error, lr·δg, a product of the same rounding errors, ≪ u over a few steps. Measured (CPU,
interpreted, 3 steps): bf16 image fit rel_fro 2.1e-3 against the bound 3.1e-2 (8u), fp16
2.7e-4 against 3.9e-3, bf16 LM 2.0e-4 with the baseline at 3.3e-4. No new bound was needed; over
hundreds of steps the curves separate as any two roundings of a chaotic optimisation do (Adam's
loss spikes), which is why end points, not curves, are compared on the GPU runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
DEFAULT_PRECISION = "bf16"

T = TypeVar("T")


@dataclass(frozen=True)
class LossScaleConfig:
    """Dynamic loss scaling's constants: torch.amp.GradScaler's defaults, used by both stacks."""

    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000


@dataclass(frozen=True)
class Policy:
    """One precision policy (see the module docstring): dtype names of the contract."""

    name: str
    param_dtype: str  # the master params and the optimizer state
    compute_dtype: str  # the GEMMs, the MLP's input and output
    loss_dtype: str  # the loss, norms, softmax, residual stream
    loss_scale: LossScaleConfig | None  # dynamic loss scaling (fp16 only)

    @property
    def mixed(self) -> bool:
        """True when compute runs in a 16-bit dtype (torch: autocast is on)."""
        return self.compute_dtype != self.param_dtype


_POLICIES = {
    "fp32": Policy("fp32", "float32", "float32", "float32", None),
    "bf16": Policy("bf16", "float32", "bfloat16", "float32", None),
    "fp16": Policy("fp16", "float32", "float16", "float32", LossScaleConfig()),
}


def get_policy(precision: str | Policy, loss_scale: LossScaleConfig | None = None) -> Policy:
    """The policy named `precision` ("fp32", "bf16", "fp16"); `loss_scale` replaces fp16's
    constants (tests start from a huge scale to force an overflow)."""
    if isinstance(precision, Policy):
        policy = precision
    elif precision in _POLICIES:
        policy = _POLICIES[precision]
    else:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if loss_scale is not None:
        if policy.loss_scale is None:
            raise ValueError(
                f"loss_scale: only the fp16 policy scales its loss, got precision {policy.name!r}"
            )
        policy = Policy(
            policy.name, policy.param_dtype, policy.compute_dtype, policy.loss_dtype, loss_scale
        )
    return policy


def _python_where(cond: Any, a: T, b: T) -> T:
    return a if cond else b


def next_loss_scale(
    scale: T,
    good_steps: Any,
    finite: Any,
    config: LossScaleConfig,
    where: Callable[[Any, Any, Any], Any] = _python_where,
) -> tuple[T, Any]:
    """One transition of dynamic loss scaling: (scale, good_steps) after a backward whose grads
    were all finite (`finite`) or not. `where` is `jnp.where` under jit, a Python select here."""
    grown = good_steps + 1 >= config.growth_interval
    new_scale = where(
        finite,
        where(grown, scale * config.growth_factor, scale),
        scale * config.backoff_factor,
    )
    new_good = where(finite, where(grown, good_steps * 0, good_steps + 1), good_steps * 0)
    return new_scale, new_good
