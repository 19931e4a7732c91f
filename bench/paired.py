"""`auto` against its stack's baselines in interleaved rounds: ratios a drifting clock cannot fake.

A bench row is timed in one stretch (`timing.measure`), one row after another. On the H100s lent
here the same kernel's device time moved 9 % and torch eager's 12 % between two rounds 10 s apart
(bench/results/2026-12-07-h100-40f0116-sweep/) — more than the 5 % the large-M targets ask for — so
a ratio of two rows carries whatever the clocks did between them. `fusedmlp bench --paired ROUNDS`
adds, per case and stack, rounds in which `auto` and each of the stack's timed baselines run
`calls` calls each, back to back, in an order that rotates every round. Each ratio (baseline ÷
`auto`: above 1, `auto` is faster; "best" takes the round's fastest baseline) is taken inside one
round, and the rounds give its median and range: drift between rounds cancels, drift inside a
round (a fraction of a second) is what is left.

The measure is the row's own: device time (`timing.time_device`: CUPTI, an L2 flush before every
call; the median over the round's calls) on a GPU, the host clock around each synchronised call on
a CPU. `interleave` and `ratios` are pure (tested with fakes); `pair_stack` times.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

DEFAULT_CALLS = 20
BEST = "best"  # the ratio against the round's fastest baseline


def interleave(samplers: Mapping[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each sampler once a round, `rounds` rounds; round r starts at the r-th sampler (rotated),
    so no contender always runs first after another's heat or a clock change."""
    if rounds < 1:
        raise ValueError(f"rounds: expected >= 1, got {rounds}")
    names = list(samplers)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(samplers[name]())
    return samples


def _spread(values: Sequence[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "per_round": list(values),
    }


def ratios(
    samples: Mapping[str, Sequence[float]], ours: str, baselines: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Per baseline (and BEST, the fastest baseline of each round): baseline ÷ ours per round, its
    median and range."""
    if not baselines:
        raise ValueError("baselines: expected at least one, got none")
    mine = samples[ours]
    out = {
        b: _spread([theirs / own for theirs, own in zip(samples[b], mine, strict=True)])
        for b in baselines
    }
    if len(baselines) > 1:
        fastest = [min(samples[b][r] for b in baselines) for r in range(len(mine))]
        out[BEST] = _spread([f / own for f, own in zip(fastest, mine, strict=True)])
    return out


def sampler(
    stack: str,
    device: str,
    fn: Callable[[int], Any],
    wait: Callable[[Any], None],
    calls: int,
) -> Callable[[], float]:
    """One round's measure of `fn`: the median per-call time of `calls` warm calls (device time
    on a GPU, host sync clock on a CPU)."""
    from .timing import time_device

    def on_gpu() -> float:
        return time_device(stack, fn, calls, wait).device.median

    def on_cpu() -> float:
        times = []
        for i in range(calls):
            t0 = time.perf_counter()
            wait(fn(i))
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return on_gpu if device == "cuda" else on_cpu


def pair_stack(
    stack: str,
    device: str,
    ours: tuple[str, str, Callable[[int], Any]],
    baselines: Mapping[str, Callable[[int], Any]],
    wait: Callable[[Any], None],
    *,
    rounds: int,
    calls: int = DEFAULT_CALLS,
) -> dict[str, Any]:
    """`ours` = (provider name, the implementation it runs, its callable); `baselines` by provider
    name. Every callable must be warm (the rows were timed before)."""
    name, chosen, fn = ours
    fns = {name: fn, **baselines}
    samplers = {n: sampler(stack, device, f, wait, calls) for n, f in fns.items()}
    samples = interleave(samplers, rounds)
    return {
        "stack": stack,
        "ours": name,
        "chosen": chosen,
        "baselines": list(baselines),
        "rounds": rounds,
        "calls": calls,
        "method": "device time (CUPTI), L2 flush before every call"
        if device == "cuda"
        else "host clock, synchronised",
        "time": {n: _spread(s) for n, s in samples.items()},
        "ratio": ratios(samples, name, list(baselines)),
    }
