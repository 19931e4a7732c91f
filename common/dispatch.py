"""What `impl="auto"` runs, decided by committed measurements per GPU, not by guesswork.

A dispatch table is one JSON file per GPU model in `common/dispatch/` (`nvidia-h200.json`), written
by `fusedmlp bench --derive-auto` from a benchmark run on that GPU and committed with the results it
came from. Each entry says, for one stack, dtype and shape class, over a range of M, which
implementation was fastest — a kernel of ours, or the framework's own baseline where none of ours
won (then `auto` runs the baseline and `plan()` says so: `auto` never loses to the unfused code).

Shape class: what decides which kernels can run and which wins —
  - `narrow`: every width <= 128 (the whole MLP fits on chip: `fused_small`'s domain);
  - `mlp2`: two layers, some width > 128 (one hidden: `fused_decode`'s domain at small M);
  - `deep`: anything else;
with `-gated` appended for gated activations (their hidden layer is one packed GEMM).

Derivation: the measured M values of a class split the M axis at their geometric midpoints; each
measured point picks the implementation whose worst ratio to the best time over the cases measured
there (several presets can share a class) is smallest — minimax, so one preset's win cannot hide
another's loss; neighbouring ranges with the same choice merge. Lookup returns None where the table
says nothing (another GPU, a class or dtype not measured): the front's static order applies then,
and its plan says so.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .spec import MLPSpec

TABLE_DIR = Path(__file__).parent / "dispatch"
NARROW_MAX_WIDTH = 128


def shape_class(spec: MLPSpec) -> str:
    """`narrow`, `mlp2` or `deep`, with `-gated` for gated activations (module docstring)."""
    if max(spec.widths) <= NARROW_MAX_WIDTH:
        kind = "narrow"
    elif spec.num_layers == 2:
        kind = "mlp2"
    else:
        kind = "deep"
    return f"{kind}-gated" if spec.gated else kind


def gpu_slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200': the table's file name for a device name."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@dataclass(frozen=True)
class Measurement:
    """One timed row of a benchmark: what `derive` reads."""

    stack: str
    impl: str
    baseline: bool
    spec: MLPSpec
    m: int
    seconds: float
    label: str = ""


@dataclass(frozen=True)
class Entry:
    stack: str
    dtype: str
    shape_class: str
    m_min: int
    m_max: int
    impl: str
    evidence: str

    def covers(self, stack: str, dtype: str, klass: str, m: int) -> bool:
        return (
            self.stack == stack
            and self.dtype == dtype
            and self.shape_class == klass
            and self.m_min <= m <= self.m_max
        )


@dataclass(frozen=True)
class Table:
    gpu: str
    source: str
    entries: tuple[Entry, ...]

    def lookup(self, stack: str, spec: MLPSpec, m: int) -> Entry | None:
        klass = shape_class(spec)
        for entry in self.entries:
            if entry.covers(stack, spec.dtype, klass, m):
                return entry
        return None

    def to_json(self) -> str:
        body = {
            "gpu": self.gpu,
            "source": self.source,
            "entries": [entry.__dict__ for entry in self.entries],
        }
        return json.dumps(body, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Table:
        data = json.loads(text)
        entries = tuple(Entry(**e) for e in data["entries"])
        return cls(data["gpu"], data.get("source", ""), entries)


def _fmt_us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} µs" if seconds < 1e-3 else f"{seconds * 1e3:.3f} ms"


def _choose(rows: list[Measurement]) -> tuple[str, str]:
    """The implementation with the smallest worst ratio to the best time over `rows`' cases."""
    by_case: dict[str, dict[str, Measurement]] = {}
    for row in rows:
        case = row.label or str(row.spec)
        by_case.setdefault(case, {})[row.impl] = row
    impls = set.intersection(*(set(c) for c in by_case.values()))
    if not impls:  # no implementation timed in every case: judge each on the cases it has
        impls = {row.impl for row in rows}

    def worst_ratio(impl: str) -> float:
        ratios = []
        for case in by_case.values():
            best = min(r.seconds for r in case.values())
            ratios.append(case[impl].seconds / best if impl in case else math.inf)
        return max(ratios)

    impl = min(sorted(impls), key=lambda name: (worst_ratio(name), name))
    parts = []
    for case_name, case in sorted(by_case.items()):
        baselines = [r for r in case.values() if r.baseline]
        best_base = min(baselines, key=lambda r: r.seconds) if baselines else None
        mine = case.get(impl)
        text = f"{case_name}: {impl} {_fmt_us(mine.seconds)}" if mine else f"{case_name}: -"
        if best_base is not None and best_base.impl != impl:
            text += f" vs {best_base.impl} {_fmt_us(best_base.seconds)}"
        parts.append(text)
    return impl, "; ".join(parts)


def derive(rows: Iterable[Measurement], *, gpu: str, source: str) -> Table:
    """The dispatch table from one benchmark run's timed rows (see the module docstring)."""
    groups: dict[tuple[str, str, str], dict[int, list[Measurement]]] = {}
    for row in rows:
        key = (row.stack, row.spec.dtype, shape_class(row.spec))
        groups.setdefault(key, {}).setdefault(row.m, []).append(row)
    entries: list[Entry] = []
    for (stack, dtype, klass), by_m in sorted(groups.items()):
        ms = sorted(by_m)
        picks = [_choose(by_m[m]) for m in ms]
        bounds = [1]
        for lo, hi in itertools.pairwise(ms):
            bounds.append(math.isqrt(lo * hi) + 1)
        bounds.append(2**62)
        for i, (impl, evidence) in enumerate(picks):
            m_min, m_max = bounds[i], bounds[i + 1] - 1
            last = entries[-1] if entries else None
            if (
                last is not None
                and (last.stack, last.dtype, last.shape_class, last.impl)
                == (stack, dtype, klass, impl)
                and last.m_max + 1 == m_min
            ):
                merged = f"{last.evidence} | M={ms[i]}: {evidence}"
                entries[-1] = Entry(stack, dtype, klass, last.m_min, m_max, impl, merged)
            else:
                entries.append(
                    Entry(stack, dtype, klass, m_min, m_max, impl, f"M={ms[i]}: {evidence}")
                )
    return Table(gpu, source, tuple(entries))


_TABLES: dict[str, Table | None] = {}
_GENERATION = [0]


def load_table(gpu_name: str, directory: Path | None = None) -> Table | None:
    """The committed table for a GPU model, or None where none is committed (cached)."""
    path = (directory or TABLE_DIR) / f"{gpu_slug(gpu_name)}.json"
    key = str(path)
    if key not in _TABLES:
        _TABLES[key] = Table.from_json(path.read_text()) if path.is_file() else None
    return _TABLES[key]


def install(table: Table) -> None:
    """Make `table` the one `auto` reads for its GPU in this process (`fusedmlp bench
    --derive-auto` re-times the `auto` rows with the table it has just derived)."""
    _TABLES[str(TABLE_DIR / f"{gpu_slug(table.gpu)}.json")] = table
    _GENERATION[0] += 1


def generation() -> int:
    """Changes whenever a table is installed: the fronts key their cached `auto` plans on it."""
    return _GENERATION[0]


def measurements_from_bench(bench: Mapping[str, Any]) -> list[Measurement]:
    """Timed, valid rows of a `fusedmlp bench --json` result (its `cases` list), as Measurements.

    `auto` rows are left out (they measure this table's previous choice, not an implementation).
    """
    out = []
    for case in bench["cases"]:
        spec = MLPSpec.from_dict(case["spec"])
        for row in case["rows"]:
            if row.get("status") != "timed" or row.get("impl") == "auto":
                continue
            seconds = row.get("device_s") or row.get("time", {}).get("median")
            if not seconds:
                continue
            out.append(
                Measurement(
                    row["stack"],
                    row["impl"],
                    bool(row.get("baseline")),
                    spec,
                    int(case["m"]),
                    float(seconds),
                    case.get("preset", ""),
                )
            )
    return out
