"""`auto` against its stack's baselines in interleaved rounds: ratios a drifting clock cannot fake.

A bench row is timed in one stretch (`timing.measure`), one row after another. On the H100s lent
here the same kernel's device time moved 9 % and torch eager's 12 % between two rounds 10 s apart
(bench/results/2026-12-07-h100-40f0116-sweep/) — more than the 5 % the large-M targets ask for — so
a ratio of two rows carries whatever the clocks did between them. `fusedmlp bench --paired ROUNDS`
adds, per case and stack, rounds in which `auto` and each of the stack's timed baselines run
`calls` calls each, back to back. A round is a palindrome — A B C C B A, its start rotated round
by round — and a contender's time in it is the mean of its two samples, so a clock that drifts
linearly through the round cancels out of every ratio, and no contender always follows the same
one; an unrecorded round comes first (`WARM_ROUNDS`). Each ratio (baseline ÷ `auto`: above 1,
`auto` is faster; "best" takes the round's fastest baseline) is taken inside one round; the rounds
give its median, range, and the median's distribution-free 95 % interval (order statistics).

What 7 one-way rounds (A B C, 06f19d6) showed on an H100
(bench/results/2026-12-07-h100-06f19d6-paired/): at hf-blog M = 8192 (~170 µs a call) the rounds
after the first agreed to ±0.2 % (the first rounds read 2-10 % off: hence the warm round); at
gpt-mlp and llama3-8b (3-4 ms a call) single rounds spread ±5-10 %, and one XLA executable timed
twice (JAX `auto` → XLA at gpt-mlp) read 0.905-1.059 round by round (medians 1.006 and 0.972) —
drift inside a round, which the palindrome is for. Palindromic rounds of 80-call samples (the
default since 8b97aa1's run) read that pair 0.999 (0.989-1.006), in one pass.

The measure is the row's own: device time (`timing.time_device`: CUPTI, an L2 flush before every
call; the median over the round's calls) on a GPU, the host clock around each synchronised call on
a CPU. `interleave` and `ratios` are pure (tested with fakes); `pair_stack` times.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# Calls a sample: about as many as a row times at the 3-4 ms cases (53-85 there). On an H100,
# 20-call samples (~65 ms of GEMMs at gpt-mlp) read our Mosaic GPU kernels 2-4 % better against
# eager than 80-call ones and the rows did, and one executable timed twice read 0.973 and 1.003
# in two passes at 20 calls, 0.999 (interval 0.989-1.006) in one pass at 80
# (bench/results/2026-12-07-h100-8b97aa1-paired80/; the likely cause, a clock that boosts for a
# short stretch of GEMMs, is not measured).
DEFAULT_CALLS = 80
# Unrecorded rounds first: round 0 came after the rows (or the other stack's pairing) and read
# `auto`, sampled first, 2-10 % off the later rounds in every pass of 06f19d6 and c15e568.
WARM_ROUNDS = 1
BEST = "best"  # the ratio against the round's fastest baseline


def round_order(names: Sequence[str], r: int) -> list[str]:
    """Round r's sampling order: the names rotated by r, then the same backwards (a palindrome)."""
    shift = r % len(names)
    there = list(names[shift:]) + list(names[:shift])
    return there + there[::-1]


def interleave(
    samplers: Mapping[str, Callable[[], float]], rounds: int, *, warm_rounds: int = WARM_ROUNDS
) -> dict[str, list[float]]:
    """`rounds` palindromic rounds (`round_order`) after `warm_rounds` unrecorded ones; a
    contender's value in a round is the mean of its two samples there, in which a linear drift
    through the round is the same for everyone."""
    if rounds < 1:
        raise ValueError(f"rounds: expected >= 1, got {rounds}")
    names = list(samplers)
    for r in range(warm_rounds):
        for name in round_order(names, r):
            samplers[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        taken: dict[str, list[float]] = {name: [] for name in names}
        for name in round_order(names, r):
            taken[name].append(samplers[name]())
        for name in names:
            samples[name].append(statistics.fmean(taken[name]))
    return samples


def median_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median: the k-th smallest and k-th largest value,
    k the largest rank whose binomial tail P(Bin(n, 1/2) < k) stays within (1 - level) / 2 (the
    whole range when n is too small for any narrower one: up to 8 values at 95 %). Its coverage is
    at least `level` (98.8 % at 11 values) for independent values; rounds of a GPU's clock are not
    quite that (bench/results/2026-12-07-h100-c15e568-paired/)."""
    ordered = sorted(values)
    n = len(ordered)
    tail, k, below = (1 - level) / 2, 1, 0.0
    while k < n:
        below += math.comb(n, k - 1) / 2**n  # P(Bin(n, 1/2) <= k - 1)
        if below > tail:
            break
        k += 1
    k = max(1, k - 1)
    return ordered[k - 1], ordered[n - k]


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max, the median's 95 % interval (`median_interval`) and the values."""
    low, high = median_interval(values)
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "ci95": [low, high],
        "per_round": list(values),
    }


def fastest(samples: Mapping[str, Sequence[float]], baselines: Sequence[str]) -> list[float]:
    """Each round's fastest baseline time (what BEST divides)."""
    return [min(samples[b][r] for b in baselines) for r in range(len(samples[baselines[0]]))]


def ratios(
    samples: Mapping[str, Sequence[float]], ours: str, baselines: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Per baseline (and BEST, the fastest baseline of each round, where there are several):
    baseline ÷ ours per round, its median, interval and range."""
    if not baselines:
        raise ValueError("baselines: expected at least one, got none")
    mine = samples[ours]
    out = {
        b: spread([theirs / own for theirs, own in zip(samples[b], mine, strict=True)])
        for b in baselines
    }
    if len(baselines) > 1:
        best = fastest(samples, baselines)
        out[BEST] = spread([f / own for f, own in zip(best, mine, strict=True)])
    return out


def sampler(
    stack: str,
    device: str,
    fn: Callable[[int], Any],
    wait: Callable[[Any], None],
    calls: int,
    methods: list[str] | None = None,
) -> Callable[[], float]:
    """One round's measure of `fn`: the median per-call time of `calls` warm calls — the rows'
    own measures, `timing.time_device` on a GPU, `timing.time_host` (3 untimed calls first) on a
    CPU; each sample names its method in `methods`."""
    from .timing import time_device, time_host

    def sample() -> float:
        if device == "cuda":
            stats = time_device(stack, fn, calls, wait).device
        else:
            stats = time_host(fn, wait, min_reps=calls, max_reps=calls, warmup_s=0.0)
        if methods is not None:
            methods.append(stats.method)
        return stats.median

    return sample


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
    methods: list[str] = []
    samplers = {n: sampler(stack, device, f, wait, calls, methods) for n, f in fns.items()}
    samples = interleave(samplers, rounds)
    times = {n: spread(s) for n, s in samples.items()}
    if len(baselines) > 1:
        times[BEST] = spread(fastest(samples, list(baselines)))
    return {
        "stack": stack,
        "ours": name,
        "chosen": chosen,
        "baselines": list(baselines),
        "rounds": rounds,
        "calls": calls,
        "warm_rounds": WARM_ROUNDS,
        "method": methods[-1],
        "time": times,
        "ratio": ratios(samples, name, list(baselines)),
    }
