"""Mixed-precision training in JAX under the one policy of `fusedmlp.common.precision`.

    step(master, opt_state, scale_state, batch):       # one jitted function
        loss, grads = value_and_grad(scale · loss_fn(cast_to_compute(master), batch))
        grads = grads / scale                          # fp32, the master params' dtype
        finite = every grad finite
        master, opt_state = optax update, kept only where finite   (fp16; else always applied)
        scale_state = next_loss_scale(scale_state, finite)          (fp16)

    loop(master, opt_state, scale_state, batches, lr_scales):       # one jitted call, K steps
        lax.scan of the same step over the K batches and learning-rate factors

The policy's cast rules, written out (JAX has no autocast): the float32 master tree is cast to the
compute dtype at the top of the loss (`cast_to_compute`; the cast's transpose brings the grads
back to float32), the model feeds `jax_impl.mlp` / `jnp.dot` compute-dtype arrays and casts to
float32 for the loss, norms and residual stream (rule 3). Dynamic loss scaling is
`common.precision.next_loss_scale` under `jnp.where` (the same machine as torch's GradScaler, same
constants), its state a `LossScaleState` pytree; a skipped step leaves params AND optimizer state
as they were, as GradScaler skips `optimizer.step()`.

Twin: torch_impl/training.py (`train_step` with torch.autocast and torch.amp.GradScaler; the
twin-diff of the public names is listed there). twin-diff: `make_train_loop` (JAX only) is what
torch's `GraphedTrainStep` is to its eager step, the host's per-step work removed: the jitted step
still costs one dispatch a step, the scanned loop one per K steps (docs/porting.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fusedmlp.common import MLPSpec, TileConfig
from fusedmlp.common.precision import Policy, get_policy, next_loss_scale

_JNP_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def jnp_dtype(name: str) -> Any:
    return _JNP_DTYPES[name]


class LossScaleState(NamedTuple):
    """Dynamic loss scaling's state: the scale (float32) and finite steps in a row (int32)."""

    scale: jax.Array
    good_steps: jax.Array


def init_loss_scale(policy: Policy | str) -> LossScaleState:
    """The policy's initial scale (1.0 and never changing when the policy does not scale)."""
    cfg = get_policy(policy).loss_scale
    scale = cfg.init_scale if cfg is not None else 1.0
    return LossScaleState(jnp.asarray(scale, jnp.float32), jnp.asarray(0, jnp.int32))


def update_loss_scale(
    state: LossScaleState, finite: jax.Array, policy: Policy | str
) -> LossScaleState:
    """One transition of the policy's loss scaling (identity when it does not scale)."""
    cfg = get_policy(policy).loss_scale
    if cfg is None:
        return state
    scale, good = next_loss_scale(state.scale, state.good_steps, finite, cfg, where=jnp.where)
    return LossScaleState(scale.astype(jnp.float32), good.astype(jnp.int32))


def cast_to_compute(tree: Any, policy: Policy | str, keep: tuple[str, ...] = ()) -> Any:
    """Every floating leaf of `tree` in the policy's compute dtype (rule 1), except the entries
    of the dict `tree` named in `keep`: params that feed no GEMM (an embedding table read by a
    lookup), which stay in the master dtype as torch.autocast leaves nn.Embedding's weight."""
    dtype = jnp_dtype(get_policy(policy).compute_dtype)

    def cast(a: Any) -> Any:
        return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a

    if keep:
        return {k: v if k in keep else jax.tree.map(cast, v) for k, v in tree.items()}
    return jax.tree.map(cast, tree)


def policy_mlp(
    x: jax.Array,
    params: Any,
    spec: MLPSpec,
    policy: Policy | str,
    *,
    impl: str = "auto",
    config: TileConfig | None = None,
) -> jax.Array:
    """`jax_impl.mlp` under the policy, from float32 master params: x and params cast to the
    compute dtype (rules 1, 2), the spec of that dtype; the output keeps it. What torch.autocast
    does for FusedMLP without user code; differentiable (grads land in float32)."""
    from . import front

    policy = get_policy(policy)
    dtype = jnp_dtype(policy.compute_dtype)
    cspec = spec.replace(dtype=policy.compute_dtype, fp32_precision=_precision(spec, policy))
    p = cast_to_compute(params, policy)
    return front.mlp(x.astype(dtype), p, cspec, impl=impl, config=config)


def _precision(spec: MLPSpec, policy: Policy) -> str:
    # tf32 describes float32 products only; a 16-bit spec has IEEE products, fp32 accumulation.
    return spec.fp32_precision if policy.compute_dtype == "float32" else "ieee"


def all_finite(tree: Any) -> jax.Array:
    """True where every element of every leaf is finite (a scalar bool array)."""
    leaves = [jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def check_master(params: Any, policy: Policy | str) -> None:
    """ValueError unless every leaf of `params` has the policy's master dtype."""
    want = jnp_dtype(get_policy(policy).param_dtype)
    bad = [
        (jax.tree_util.keystr(k), a.dtype)
        for k, a in jax.tree_util.tree_leaves_with_path(params)
        if a.dtype != want
    ]
    if bad:
        raise ValueError(f"params: expected master params in {jnp.dtype(want)}, got {bad[:4]}")


def make_train_step(
    loss_fn: Callable[[Any, Any], jax.Array],
    optimizer: optax.GradientTransformation,
    policy: Policy | str,
    *,
    jit: bool = True,
    keep: tuple[str, ...] = (),
    donate: bool = True,
) -> Callable[..., tuple[Any, Any, LossScaleState, jax.Array]]:
    """`step(params, opt_state, scale_state, batch) -> (params, opt_state, scale_state, loss)`:
    one optimizer step of `loss_fn(compute_params, batch)` (a float32 scalar) under `policy`.
    `params` are the float32 master params; the loss returned is unscaled. `lr_scale` (a float32
    scalar, default 1) multiplies the optimizer's update: a learning-rate schedule evaluated by
    the caller on the global step, as torch's LambdaLR multiplies the learning rate. `keep`: the
    params' top-level entries left in the master dtype (`cast_to_compute`): an embedding table's
    gradient is a scatter-add, and in bfloat16 XLA runs it as compare-and-swap loops contending
    on every row (measured on the H200: the byte LM's step took 290-380 ms with its table cast,
    against ~2 ms of GEMMs). `donate` (jitted): the params and optimizer state passed in are
    consumed — XLA writes the new ones into their buffers — so a caller keeps only what the step
    returns (copy first to keep an old state). A step that allocates and frees every param and
    moment is host time: the image fit's jitted step (120 µs of kernels) took 363 µs of host
    dispatch a step without donation and 167 µs with it (H200, 87c88fd)."""
    step = _step(loss_fn, optimizer, get_policy(policy), keep)
    if not jit:
        return step
    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def make_train_loop(
    loss_fn: Callable[[Any, Any], jax.Array],
    optimizer: optax.GradientTransformation,
    policy: Policy | str,
    *,
    keep: tuple[str, ...] = (),
    donate: bool = True,
) -> Callable[..., tuple[Any, Any, LossScaleState, jax.Array, jax.Array]]:
    """`loop(params, opt_state, scale_state, batches, lr_scales) -> (params, opt_state,
    scale_state, losses, scales)`: K optimizer steps in ONE jitted call, `jax.lax.scan` of the
    step `make_train_step` builds (the same function, arguments as there). `lr_scales`: float32
    [K], step k's `lr_scale`; `batches`: a pytree whose leaves have a leading axis K (step k gets
    the k-th slice of each), or None (every step gets batch None: a loss that closes over its
    data). `losses` [K] float32, unscaled; `scales` [K] float32, the loss scale after each step.
    Jitted with `make_train_step`'s donation. The results are those of K calls of the jitted step
    (tests/test_training.py checks them bit for bit on the CPU).

    What the scan removes is the host's share of a step: the jitted step costs one dispatch a
    step (167-580 µs for the image fit's 120 µs of kernels on the H200), the loop one per K
    steps, as replaying a CUDA graph does for the torch step (torch_impl/training.py
    `GraphedTrainStep`). What it costs: one executable per K (scan's length is static), the
    losses and scales come back per call, not per step, and a K-step call cannot stop between
    its steps (an evaluation falls between calls)."""
    step = _step(loss_fn, optimizer, get_policy(policy), keep)

    def loop(params, opt_state, scale_state, batches, lr_scales):
        lr_scales = jnp.asarray(lr_scales)
        if lr_scales.ndim != 1 or lr_scales.dtype != jnp.float32:
            raise ValueError(
                f"lr_scales: expected float32 [K], got {lr_scales.dtype} {lr_scales.shape}"
            )
        k = lr_scales.shape[0]
        bad = [
            (jax.tree_util.keystr(path), a.shape)
            for path, a in jax.tree_util.tree_leaves_with_path(batches)
            if a.ndim == 0 or a.shape[0] != k
        ]
        if bad:
            raise ValueError(
                f"batches: expected a leading axis of {k} (the length of lr_scales) on every "
                f"leaf, got {bad[:4]}"
            )

        def body(carry, xs):
            batch, lr_scale = xs
            params, opt_state, scale_state, loss = step(*carry, batch, lr_scale)
            return (params, opt_state, scale_state), (loss, scale_state.scale)

        carry = (params, opt_state, scale_state)
        carry, (losses, scales) = jax.lax.scan(body, carry, (batches, lr_scales))
        return (*carry, losses, scales)

    return jax.jit(loop, donate_argnums=(0, 1) if donate else ())


def _step(
    loss_fn: Callable[[Any, Any], jax.Array],
    optimizer: optax.GradientTransformation,
    policy: Policy,
    keep: tuple[str, ...],
) -> Callable[..., tuple[Any, Any, LossScaleState, jax.Array]]:
    """The one step, unjitted: what `make_train_step` jits and `make_train_loop` scans."""

    def scaled_loss(params: Any, batch: Any, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
        loss = loss_fn(cast_to_compute(params, policy, keep), batch).astype(jnp.float32)
        return loss * scale, loss

    def step(params, opt_state, scale_state, batch, lr_scale=1.0):
        grads, loss = jax.grad(scaled_loss, has_aux=True)(params, batch, scale_state.scale)
        # The cast's transpose gave float32 grads; unscale in float32 (1/scale is a power of 2).
        grads = jax.tree.map(lambda g: g / scale_state.scale, grads)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        updates = jax.tree.map(lambda u: u * lr_scale, updates)
        new_params = optax.apply_updates(params, updates)
        if policy.loss_scale is not None:
            finite = all_finite(grads)
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
            new_params = keep(new_params, params)
            new_opt_state = keep(new_opt_state, opt_state)
            scale_state = update_loss_scale(scale_state, finite, policy)
        return new_params, new_opt_state, scale_state, loss

    return step
