"""Mixed-precision training in PyTorch under the one policy of `fusedmlp.common.precision`.

    with autocast(policy, device):            # bf16 / fp16: params cast at each use
        loss = loss_fn(model, batch)          # the model casts to fp32 for its loss (rule 3)
    scaler.scale(loss).backward()             # fp16: loss × scale; others: a no-op scaler
    scaler.step(optimizer); scaler.update()   # fp16: skipped on a non-finite grad, scale lowered

The policy's cast rules are torch's own: `torch.autocast` casts the inputs and weights of
nn.Linear and of `FusedMLP` (module.py casts its params under autocast, a differentiable cast
outside the custom op) and runs the loss, softmax and norms in float32; `torch.amp.GradScaler`,
built from the policy's `LossScaleConfig`, is the dynamic loss scaling state machine
(`common.precision.next_loss_scale` is the same machine; tests/test_training.py checks they agree).
Master params stay float32: the model is built in float32 and only autocast's casts are 16-bit.

Twin: jax_impl/training.py (the same step under the same policy, with optax and the loss scaler
written out). twin-diff: the public names differ where the frameworks do — here `autocast` and
`make_scaler` (torch's own casting and GradScaler); there `cast_to_compute`, `LossScaleState`,
`init_loss_scale`, `update_loss_scale`, `all_finite` (what those do, written out) and
`policy_mlp` (jax_impl.mlp from float32 masters: what autocast does for FusedMLP here); `train_step`
(one eager step) ↔ `make_train_step` (builds one jitted step); `check_master` in both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from fusedmlp.common.precision import Policy, get_policy

_TORCH_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def torch_dtype(name: str) -> torch.dtype:
    return _TORCH_DTYPES[name]


@contextlib.contextmanager
def autocast(policy: Policy | str, device: torch.device | str) -> Iterator[None]:
    """torch.autocast in the policy's compute dtype (none for fp32)."""
    policy = get_policy(policy)
    device_type = torch.device(device).type
    if not policy.mixed:
        yield
        return
    with torch.autocast(device_type, dtype=torch_dtype(policy.compute_dtype)):
        yield


def make_scaler(policy: Policy | str, device: torch.device | str) -> torch.amp.GradScaler:
    """A GradScaler with the policy's constants; disabled (a pass-through) unless fp16."""
    policy = get_policy(policy)
    device_type = torch.device(device).type
    cfg = policy.loss_scale
    if cfg is None:
        return torch.amp.GradScaler(device_type, enabled=False)
    return torch.amp.GradScaler(
        device_type,
        init_scale=cfg.init_scale,
        growth_factor=cfg.growth_factor,
        backoff_factor=cfg.backoff_factor,
        growth_interval=cfg.growth_interval,
    )


def check_master(model: torch.nn.Module, policy: Policy | str) -> None:
    """ValueError unless every floating param of `model` has the policy's master dtype."""
    want = torch_dtype(get_policy(policy).param_dtype)
    bad = [(n, p.dtype) for n, p in model.named_parameters() if p.dtype != want]
    if bad:
        raise ValueError(f"model: expected master params in {want}, got {bad[:4]}")


def train_step(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    batch: Any,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    policy: Policy | str,
) -> torch.Tensor:
    """One optimizer step of `loss_fn(model, batch)` under `policy`; returns the loss (float32,
    detached, unscaled). With fp16 the step is skipped when a gradient is not finite and the
    scaler's scale goes down (`scaler.get_scale()`)."""
    policy = get_policy(policy)
    device = next(model.parameters()).device
    optimizer.zero_grad(set_to_none=True)
    with autocast(policy, device):
        loss = loss_fn(model, batch)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach().float()
