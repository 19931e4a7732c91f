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
`init_loss_scale`, `update_loss_scale`, `all_finite` (what those do, written out) and `policy_mlp`
(jax_impl.mlp from float32 masters: what autocast does for FusedMLP here); `train_step` (one eager
step) ↔ `make_train_step` (builds one jitted step); `check_master` in both. Torch only:
`GraphedTrainStep` with `graph_capturable_optimizer` and `scale_tensor` (the step captured as a CUDA
graph and replayed: the host out of the step), where the JAX twin has `make_train_step(donate=)`
(the jitted step reuses the buffers of the params and optimizer state it is given) and
`make_train_loop` (K steps in one jitted call through `lax.scan`: its way of taking the host out).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from fusedmlp.common.precision import Policy, get_policy

from .front import graph_safe

_TORCH_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def torch_dtype(name: str) -> torch.dtype:
    return _TORCH_DTYPES[name]


@contextlib.contextmanager
def autocast(
    policy: Policy | str, device: torch.device | str, *, cache: bool = True
) -> Iterator[None]:
    """torch.autocast in the policy's compute dtype (none for fp32). `cache=False` inside a CUDA
    graph capture: autocast's cache of cast weights would outlive the capture (torch's advice)."""
    policy = get_policy(policy)
    device_type = torch.device(device).type
    if not policy.mixed:
        yield
        return
    with torch.autocast(device_type, dtype=torch_dtype(policy.compute_dtype), cache_enabled=cache):
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


def scale_tensor(scaler: torch.amp.GradScaler) -> torch.Tensor | None:
    """The loss scale as a device tensor (None when the scaler is disabled), without the host
    synchronisation of `scaler.get_scale()`, which would serialise every step's host and device
    work when a run records the scale per step."""
    if not scaler.is_enabled():
        return None
    # _get_scale_async is GradScaler's own sync-free accessor (what step() uses).
    return scaler._get_scale_async()


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
    optimizer.zero_grad(set_to_none=True)
    return _step_body(model, loss_fn, batch, optimizer, scaler, policy)


def _step_body(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    batch: Any,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    policy: Policy,
    *,
    cache: bool = True,
) -> torch.Tensor:
    device = next(model.parameters()).device
    with autocast(policy, device, cache=cache):
        loss = loss_fn(model, batch)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach().float()


def graph_capturable_optimizer(
    params: Any, lr: float, device: torch.device | str
) -> torch.optim.Optimizer:
    """Adam as a CUDA graph can replay it: fused (one launch for every param, its step counters on
    the device) with the learning rate held in a device tensor, which a schedule (LambdaLR) then
    writes in place — a float lr would be baked into the captured launch."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device: a CUDA graph needs a CUDA device, got {device}")
    lr_t = torch.tensor(lr, dtype=torch.float32, device=device)
    return torch.optim.Adam(params, lr=lr_t, fused=True, capturable=True)


class GraphedTrainStep:
    """`train_step` captured once as a CUDA graph and replayed: what `jax.jit` makes of the JAX
    step (jax_impl/training.py `make_train_step`), the host's Python, autograd and launches paid
    once at capture instead of every step. twin-diff: the JAX step is compiled; this one records
    the launches of the eager step and replays them, so its arithmetic is the eager step's, bit
    for bit (tests/test_training.py, `pytest -m gpu`).

        step = GraphedTrainStep(model, loss_fn, batch, optimizer, scaler, policy)
        for ...:
            loss = step(new_batch)   # copied into the captured batch, then one replay

    The graph reads a copy of `batch` made here (`step.batch`; the caller's tensors are never
    written): a call copies a new batch into it (same nesting, shapes and dtypes) or, without
    one, trains on it as it is. The first `warmup` calls run the eager step on a side stream
    (Triton compiles, the optimizer's state and the scaler's scale are created outside the
    capture); the next call captures and replays, later calls replay. Every call is one real
    training step (a timing loop that skips its first W steps passes warmup=W - 1, so that the
    capture falls among them). The optimizer must be capturable (`graph_capturable_optimizer`),
    and under fp16 loss scaling fused: GradScaler's other path reads the found-inf flag on the
    host; the fused one keeps the skip and the scale update on the device."""

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
        batch: Any,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        policy: Policy | str,
        *,
        warmup: int = 3,
    ) -> None:
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"model: a CUDA graph needs a model on a CUDA device, got {device}")
        for i, group in enumerate(optimizer.param_groups):
            lr = group["lr"]
            if not group.get("capturable") or not isinstance(lr, torch.Tensor):
                raise ValueError(
                    f"optimizer: expected capturable=True and a tensor lr (see "
                    f"graph_capturable_optimizer), got param group {i} with capturable="
                    f"{group.get('capturable')}, lr {type(lr).__name__}"
                )
            if lr.device != device:
                raise ValueError(
                    f"optimizer: expected the lr tensor on the model's device {device}, got "
                    f"{lr.device} (param group {i})"
                )
        if scaler.is_enabled() and not getattr(optimizer, "_step_supports_amp_scaling", False):
            raise ValueError(
                f"optimizer: expected a fused optimizer under fp16 loss scaling (its skip stays "
                f"on the device), got {type(optimizer).__name__} without fused=True"
            )
        if warmup < 1:
            raise ValueError(f"warmup: expected >= 1 eager step before the capture, got {warmup}")
        self.model, self.loss_fn, self.optimizer, self.scaler = model, loss_fn, optimizer, scaler
        self.policy = get_policy(policy)
        self.device = device
        self.batch = _clone(batch)
        self.warmup = warmup
        self.eager_steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self._loss: torch.Tensor | None = None

    def __call__(self, batch: Any = None) -> torch.Tensor:
        """One training step; returns its loss (float32, detached, unscaled, a fresh tensor)."""
        with torch.cuda.device(self.device):  # streams and capture on the model's device
            if batch is not None:
                _copy_into(self.batch, batch)
            if self.graph is None and self.eager_steps < self.warmup:
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side), graph_safe():
                    loss = train_step(
                        self.model, self.loss_fn, self.batch, self.optimizer, self.scaler,
                        self.policy,
                    )  # fmt: skip
                torch.cuda.current_stream().wait_stream(side)
                self.eager_steps += 1
                return loss
            if self.graph is None:
                graph = torch.cuda.CUDAGraph()
                self.optimizer.zero_grad(set_to_none=True)  # the capture allocates the .grads
                # thread_local: another thread's CUDA calls (JAX's runtime in `fusedmlp train`)
                # do not invalidate the capture
                with torch.cuda.graph(graph, capture_error_mode="thread_local"), graph_safe():
                    loss = _step_body(
                        self.model, self.loss_fn, self.batch, self.optimizer, self.scaler,
                        self.policy, cache=False,
                    )  # fmt: skip
                self.graph, self._loss = graph, loss  # only a capture that finished is replayed
            self.graph.replay()
            assert self._loss is not None
            return self._loss.clone()


def _clone(batch: Any) -> Any:
    """A copy of a batch's tensors, same nesting (the graph's input buffers)."""
    if isinstance(batch, torch.Tensor):
        return batch.clone()
    if isinstance(batch, dict):
        return {key: _clone(value) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_clone(value) for value in batch)
    raise TypeError(
        f"batch: expected tensors in tuples, lists or dicts, got {type(batch).__name__}"
    )


def _copy_into(static: Any, new: Any) -> None:
    """Copy the tensors of `new` into those of `static` (the same nesting of tuples, lists and
    dicts); ValueError naming the first shape or dtype that differs."""
    if isinstance(static, torch.Tensor):
        if not isinstance(new, torch.Tensor):
            raise TypeError(f"batch: expected a tensor, got {type(new).__name__}")
        if new.shape != static.shape or new.dtype != static.dtype:
            raise ValueError(
                f"batch: expected {tuple(static.shape)} {static.dtype} (the captured batch), "
                f"got {tuple(new.shape)} {new.dtype}"
            )
        static.copy_(new)
    elif isinstance(static, dict):
        if not isinstance(new, dict) or set(new) != set(static):
            got = sorted(new) if isinstance(new, dict) else type(new).__name__
            raise ValueError(f"batch: expected a dict with keys {sorted(static)}, got {got}")
        for key in static:
            _copy_into(static[key], new[key])
    elif isinstance(static, (tuple, list)):
        if not isinstance(new, (tuple, list)):
            raise TypeError(f"batch: expected a tuple or list, got {type(new).__name__}")
        if len(new) != len(static):
            raise ValueError(f"batch: expected {len(static)} items, got {len(new)}")
        for a, b in zip(static, new, strict=True):
            _copy_into(a, b)
    else:
        raise TypeError(f"batch: expected tensors in tuples, lists or dicts, got {type(static)}")
