"""Host or device: where the JAX image-fit training step's time goes (the twin of step_profile.py).

    python bench/jax_step_probe.py [--size 256] [--steps 300] [--impl auto,baseline] [--no-donate]

For each implementation, the jitted step of `fusedmlp train image` (bf16, GPU defaults) is run
`--steps` times back to back three ways — the learning-rate factor passed as a NumPy scalar (a
host-to-device copy a step, as `bench/train.py` passed it until this probe), as a device scalar
(what it passes now), and as a Python float — and timed twice: `issue` (host seconds to enqueue
the steps, no wait) and `wall` (the same steps and one wait at the end). wall ≈ issue means the
host sets the pace, wall > issue the GPU.
Then one profiled run gives the step's device time and its largest kernels (jax.profiler, CUPTI).

Measured on the H200 at 87c88fd (bench/results/2026-12-01-h200-87c88fd/probe/): `auto`
(fused_small) 121 µs of kernels a step but 352-582 µs of host dispatch without donation, 167 µs
with it (device lr); the XLA baseline 223 µs of kernels, 487-530 µs of host: both runs of the
image fit were host-bound, which is why make_train_step now donates the params and optimizer state.
"""

from __future__ import annotations

import argparse
import collections
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fusedmlp.bench import timing
from fusedmlp.bench import train as tr
from fusedmlp.common import tiling
from fusedmlp.common.precision import get_policy
from fusedmlp.jax_impl import training as jt


def probe(impl: str, size: int, steps: int, donate: bool) -> None:
    cfg = tr.task_config("image", "cuda", size=size)
    data = tr.image_data(cfg)
    policy = get_policy("bf16")
    x, rgb = jnp.asarray(data["x"]), jnp.asarray(data["rgb"])
    params = tr._jax_mlp_params(cfg.spec, tr.image_init(cfg), impl)
    apply = tr._jax_apply_mlp(cfg.spec, impl, policy, None)

    def loss_fn(p, batch):
        return jnp.mean((apply(batch[0], p).astype(jnp.float32) - batch[1]) ** 2)

    opt = optax.adam(cfg.lr)
    step = jt.make_train_step(loss_fn, opt, policy, donate=donate)
    state = [params, opt.init(params), jt.init_loss_scale(policy)]

    def once(lr):
        *new, loss = step(*state, (x, rgb), lr)
        state[:] = new
        return loss

    factors = (("numpy lr", np.float32(0.5)), ("device lr", jnp.float32(0.5)), ("python lr", 1.0))
    for _, lr in factors:  # compile each argument kind once
        once(lr)
    jax.block_until_ready(state)
    for name, lr in factors:
        t0 = time.perf_counter()
        for _ in range(steps):
            once(lr)
        t1 = time.perf_counter()
        jax.block_until_ready(state)
        t2 = time.perf_counter()
        issue, wall = (t1 - t0) / steps * 1e6, (t2 - t0) / steps * 1e6
        print(f"{impl:9s} {name:10s} issue {issue:7.1f} µs/step, wall {wall:7.1f} µs/step")
    calls = 20
    kernels = timing.jax_trace(lambda: once(factors[1][1]), calls, jax.block_until_ready)
    per: dict[str, float] = collections.defaultdict(float)
    count: collections.Counter[str] = collections.Counter()
    for k in kernels:
        per[k.name] += k.duration_ns / calls / 1e3
        count[k.name] += 1
    print(
        f"{impl}: device {sum(per.values()):.1f} µs/step in "
        f"{sum(count.values()) / calls:.0f} activities a step"
    )
    for name, us in sorted(per.items(), key=lambda t: -t[1])[:12]:
        print(f"   {us:8.1f} µs ×{count[name] / calls:.0f} {name[:100]}")


def _fresh_traces() -> None:
    """Drop every cached trace, so that the next step traces the kernels afresh after a tiling
    choice was changed: the front's functools caches of jitted passes, and JAX's own caches of
    jitted functions keyed by their static arguments (a spec and config=None trace the same key
    whatever tiles the heuristic would now give: without this the variants re-ran the old
    kernels — the first two runs of this option, 8259aab and 4922964, measured nothing)."""
    from fusedmlp.jax_impl import front

    for value in vars(front).values():
        if hasattr(value, "cache_clear"):
            value.cache_clear()
    jax.clear_caches()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image side (a divisor of 512)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--impl", default="auto,baseline", help="comma-separated")
    parser.add_argument("--no-donate", action="store_true", help="keep the inputs (no donation)")
    parser.add_argument(
        "--wgrad-waves",
        default="",
        help="comma-separated WGRAD_WAVES values (common/tiling.py) to time `auto` under: how "
        "many waves of programs kernel B's split over the rows may fill",
    )
    parser.add_argument(
        "--small-configs",
        default="",
        help="semicolon-separated block_m,num_warps,num_stages,programs_per_sm tiles to time "
        "`auto` under: every whole-MLP training kernel (saving forward, kernels A and B) takes "
        "them in place of the heuristic's",
    )
    args = parser.parse_args(argv)
    for impl in args.impl.split(","):
        probe(impl.strip(), args.size, args.steps, donate=not args.no_donate)
    for waves in filter(None, args.wgrad_waves.split(",")):
        tiling.WGRAD_WAVES = int(waves)  # read by wgrad_splits at trace time
        _fresh_traces()
        print(f"== WGRAD_WAVES={waves}")
        probe("auto", args.size, args.steps, donate=not args.no_donate)
    heuristic = tiling.fused_small_config
    for text in filter(None, args.small_configs.split(";")):
        tiles = tuple(int(v) for v in text.split(","))

        def pinned(spec, m, *, interpret=False, kernel="saving", tiles=tiles):
            if interpret:
                return heuristic(spec, m, interpret=interpret, kernel=kernel)
            return tiling.SmallConfig(*tiles, tiling.small_hoist(spec))

        tiling.fused_small_config = pinned  # small_config_for reads it at trace time
        _fresh_traces()
        print(f"== small config {text}")
        probe("auto", args.size, args.steps, donate=not args.no_donate)
        tiling.fused_small_config = heuristic
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
