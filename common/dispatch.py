"""What `impl="auto"` runs, decided by committed measurements per GPU, not by guesswork.

A dispatch table is one JSON file per GPU model in `common/dispatch/` (`nvidia-h200.json`), written
by `fusedmlp bench --derive-auto` from a benchmark run on that GPU and committed with the results it
came from. It holds measured POINTS: for one stack, dtype (float32: and its products, IEEE or TF32,
`spec.fp32_precision`) and shape class, at one batch size M and one problem size (the weight bytes
of the spec, `cost.param_bytes`), the implementations timed there ranked by speed — a kernel of
ours first, or the framework's own baseline where none of ours won (then `auto` runs the baseline
and `plan()` says so: `auto` never loses to the unfused code).

Shape class: what decides which kernels can run at all:
  - `narrow`: every width <= 128 (the whole MLP fits on chip: `fused_small`'s domain);
  - `mlp2`: two layers, some width > 128 (one hidden: `fused_decode`'s domain at small M);
  - `deep`: anything else;
with `-gated` appended for gated activations (their hidden layer is one packed GEMM).

Size: within a class, which kernel wins depends on M AND on how big the layers are. The first table
(format 1) knew `mlp2` only from gpt-mlp (4096→16384, 268 MB of weights) at M=8192 and extended
that choice to every M and width of the class, so GPT-2's MLP (768→3072, 9.4 MB) at 1-512 tokens ran
a kernel built for 8192-row GEMMs and lost to the Hugging Face module (29.6 µs against 12.8, H200,
874ab79). The weight bytes stand for the size: at small M they set the time (the weights are
streamed once; the floor is bytes / bandwidth, and below a few MB the launches' latency dominates)
and at large M the work is M x the weights.

Derivation (`derive`): rows are grouped by (stack, dtype, fp32 precision, class, M); inside a
group, presets whose weight bytes are within SIZE_MERGE (2x) of the group's smallest one still
unassigned form one point (its size the geometric mean of theirs). Each point ranks the
implementations by their worst ratio to the best time over the cases measured there (several
presets can share a point) — minimax, so one preset's win cannot hide another's loss.

Lookup (`Table.lookup`): among the points of the call's stack, dtype (and precision) and class,
the NEAREST in the plane (log2 M, log2 weight bytes) — Euclidean, ties to the smaller M (then the
smaller size), so with one size per class the M axis splits at the geometric midpoints of the
measured M, as format 1 did. Calls outside every measured M or size take the nearest point
(extrapolation, named as such). At that point the first implementation of its ranking that can
take the call (`accept`, the front's check: fused_decode stops at M=64, an implementation may be
unavailable) is chosen; the returned evidence names the point used, its measured times and, when
it is not the call's own (M, size), the call's, so `plan().reason` says which measurement decided.
None where the table says nothing (another GPU, a stack, dtype, precision or class not measured,
no ranked implementation can take the call): the front's static order applies then, and its plan
says so.

Training (`phase: "train"` points, from `fusedmlp bench --backward --derive-auto`): `auto` picks
the forward's kernels by the forward points, and training inherits that choice — our saving
forward and backward kernels — unless a training point says a baseline trains faster there (then
`auto` differentiates through the baseline's own ops, torch autograd or jax autodiff, and the plan
says so). A training point ranks `kernels` (what `auto` trains with without the point) against
the baselines, from one forward + backward step each. Unlike forward points, training points do
not extrapolate: a call uses one only within TRAIN_REACH (one octave in the (log2 M, log2 bytes)
plane). The H200's first three training points (llama3-8b and hf-blog at M=8192, nerf-64x5) would
otherwise send the byte LM's 1024→4096 SwiGLU at 4,096 rows to the hf-blog point's XLA, where JAX
`auto` measured 1.70× faster than XLA.

Format: `"format": 2` with `points`. A format-1 file (`entries`: M ranges per class, no size, no
`format` key) still loads and is looked up by its M ranges for any size, as before; `fusedmlp
derive-auto RESULTS.json` rewrites it as format 2 from the results it came from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cost import param_bytes
from .spec import MLPSpec

TABLE_DIR = Path(__file__).parent / "dispatch"
NARROW_MAX_WIDTH = 128
FORMAT = 2
# Presets at one M whose weight bytes differ by at most this factor are one point (minimax over
# them): llama3-8b (352 MB) and a Gemma-2b MLP (201 MB) would share one, GPT-2 (9.4 MB) and
# gpt-mlp (268 MB) do not.
SIZE_MERGE = 2.0
PHASES = ("forward", "train")
# What `auto` runs for float32 on a GPU whose table has no float32 point of the call's precision:
# the stack's own baseline, per the only float32 measurement of our GEMM kernels there is: the H200
# release run (1845c27), llama3-8b's up projection at M = 2048 at 83 % ("ieee") and 25 % ("tf32")
# of cuBLAS's speed. The tf32 kernels read K-major weights since (torch_impl/front.py `KMAJOR`);
# `bench/fp32_check.sh` measures both, and its points then decide as any other.
FLOAT32_BASELINE = {"torch": "eager", "jax": "xla"}
FLOAT32_UNMEASURED = (
    "float32 on a GPU whose dispatch table has no float32 point for this precision: the "
    "baseline (the one float32 measurement of our GEMMs, the H200 release run at 1845c27, had "
    "them at 83 % of cuBLAS's speed for 'ieee' and 25 % for 'tf32'; bench/fp32_check.sh "
    "measures the points that would decide)"
)
# A training point decides only calls within this distance of it (see the module docstring).
TRAIN_REACH = 1.0
# The name a training point gives our own training path (what `auto` trains with without it).
KERNELS = "kernels"


def shape_class(spec: MLPSpec) -> str:
    """`narrow`, `mlp2` or `deep`, with `-gated` for gated activations (module docstring)."""
    if max(spec.widths) <= NARROW_MAX_WIDTH:
        kind = "narrow"
    elif spec.num_layers == 2:
        kind = "mlp2"
    else:
        kind = "deep"
    return f"{kind}-gated" if spec.gated else kind


def weight_bytes(spec: MLPSpec) -> int:
    """The size axis of the table: the spec's parameter bytes (packed gated operands included)."""
    return param_bytes(spec)


def gpu_slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200': the table's file name for a device name."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _fmt_bytes(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.1f} kB"


def _fmt_us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} µs" if seconds < 1e-3 else f"{seconds * 1e3:.3f} ms"


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
class Point:
    """One measured point: the implementations timed at (M, size) ranked best first, each with
    its worst ratio to the best time over the point's cases (None: not timed in every case)."""

    stack: str
    dtype: str
    shape_class: str
    m: int
    weight_bytes: int
    ranking: tuple[tuple[str, float | None], ...]
    evidence: str
    phase: str = "forward"  # PHASES: a forward call's point, or a training step's
    # float32's products (spec.fp32_precision): "tf32" points rank other kernels than "ieee" ones
    # (cuBLAS's TF32 GEMMs ran 6x its IEEE ones in the H200 release run), so none is shared
    fp32_precision: str = "ieee"

    @property
    def impl(self) -> str:
        return self.ranking[0][0]

    def where(self) -> str:
        # a float32 point names its precision: a "tf32" choice is no evidence for an "ieee" call
        products = f", float32 products {self.fp32_precision}" if self.dtype == "float32" else ""
        return f"M={self.m}, {_fmt_bytes(self.weight_bytes)} of weights{products}"

    def distance(self, m: int, size: int) -> float:
        """Euclidean distance in (log2 M, log2 weight bytes)."""
        return math.hypot(math.log2(m / self.m), math.log2(size / self.weight_bytes))

    def to_dict(self) -> dict[str, Any]:
        phase = {} if self.phase == "forward" else {"phase": self.phase}
        precision = {} if self.fp32_precision == "ieee" else {"fp32_precision": self.fp32_precision}
        return {
            **phase,
            "stack": self.stack,
            "dtype": self.dtype,
            **precision,
            "shape_class": self.shape_class,
            "m": self.m,
            "weight_bytes": self.weight_bytes,
            "ranking": [[impl, ratio] for impl, ratio in self.ranking],
            "evidence": self.evidence,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Point:
        ranking = tuple(
            (str(impl), None if ratio is None else float(ratio)) for impl, ratio in data["ranking"]
        )
        if not ranking:
            raise ValueError(f"dispatch point: an empty ranking in {dict(data)!r}")
        phase = data.get("phase", "forward")
        if phase not in PHASES:
            raise ValueError(f"dispatch point: phase must be one of {PHASES}, got {phase!r}")
        return cls(
            data["stack"],
            data["dtype"],
            data["shape_class"],
            int(data["m"]),
            int(data["weight_bytes"]),
            ranking,
            data.get("evidence", ""),
            phase,
            data.get("fp32_precision", "ieee"),
        )


@dataclass(frozen=True)
class Entry:
    """A format-1 row: one choice over an M range of a class, for every size (still loaded)."""

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
class Choice:
    """What `Table.lookup` returns: the implementation, and the evidence the plan quotes."""

    impl: str
    evidence: str
    point: Point | Entry


@dataclass(frozen=True)
class Table:
    gpu: str
    source: str
    points: tuple[Point, ...] = ()
    legacy: tuple[Entry, ...] = ()  # a format-1 file's entries (M ranges, any size)
    train_source: str = ""  # where the training points came from (`source`: the forward's)

    def lookup(
        self,
        stack: str,
        spec: MLPSpec,
        m: int,
        accept: Callable[[str], bool] | None = None,
        phase: str = "forward",
    ) -> Choice | None:
        """The measured choice for this call (module docstring), or None. `accept(impl)`: whether
        an implementation can take the call (None: every one can). `phase="train"`: the training
        points, and only one within TRAIN_REACH of the call."""
        klass = shape_class(spec)
        ok = accept or (lambda impl: True)
        key = (stack, spec.dtype, spec.fp32_precision, klass, phase)
        here = [
            p
            for p in self.points
            if (p.stack, p.dtype, p.fp32_precision, p.shape_class, p.phase) == key
        ]
        if phase != "forward":
            size = weight_bytes(spec)
            here = [p for p in here if p.distance(m, size) <= TRAIN_REACH]
            if not here:
                return None
        if here:
            size = weight_bytes(spec)
            point = min(here, key=lambda p: (round(p.distance(m, size), 9), p.m, p.weight_bytes))
            usable = [i for i, (impl, _) in enumerate(point.ranking) if ok(impl)]
            if not usable:
                return None
            impl, ratio = point.ranking[usable[0]]
            skipped = [name for name, _ in point.ranking[: usable[0]]]
            if (point.m, point.weight_bytes) == (m, size):
                text = f"measured at {point.where()}: {point.evidence}"
            else:
                text = (
                    f"nearest measured point {point.where()} (this call: M={m}, "
                    f"{_fmt_bytes(size)}): {point.evidence}"
                )
            if skipped:
                behind = "untimed in some case" if ratio is None else f"{ratio:.3f}x the best"
                text += (
                    f"; {', '.join(skipped)} cannot take this call, so {impl}, the next in that "
                    f"point's ranking ({behind})"
                )
            return Choice(impl, text, point)
        for entry in self.legacy if phase == "forward" and spec.fp32_precision == "ieee" else ():
            if entry.covers(stack, spec.dtype, klass, m):
                if not ok(entry.impl):
                    return None
                return Choice(entry.impl, f"{entry.evidence} (format-1 table: M only)", entry)
        return None

    def to_json(self) -> str:
        body: dict[str, Any] = {"format": FORMAT, "gpu": self.gpu, "source": self.source}
        if self.train_source:
            body["train_source"] = self.train_source
        body["points"] = [p.to_dict() for p in self.points]
        if self.legacy:
            body["entries"] = [entry.__dict__ for entry in self.legacy]
        text = json.dumps(body, indent=1)
        # one line per ranked implementation: ["mosaic", 1.0], not four
        return re.sub(r"\[\s+(\"[^\"]*\"),\s+([^\s\]]+)\s+\]", r"[\1, \2]", text) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Table:
        data = json.loads(text)
        version = data.get("format", 1)
        if version not in (1, FORMAT):
            raise ValueError(
                f"dispatch table: format must be 1 or {FORMAT}, got {version!r} (a newer fusedmlp?)"
            )
        points = tuple(Point.from_dict(p) for p in data.get("points", ()))
        legacy = tuple(Entry(**e) for e in data.get("entries", ()))
        return cls(
            data["gpu"], data.get("source", ""), points, legacy, data.get("train_source", "")
        )


def _rank(rows: list[Measurement]) -> tuple[tuple[tuple[str, float | None], ...], str]:
    """The implementations ranked by their worst ratio to the best time over `rows`' cases
    (best first; ties by name), and the evidence: each case's time of the first beside the best
    baseline's."""
    by_case: dict[str, dict[str, Measurement]] = {}
    for row in rows:
        case = row.label or str(row.spec)
        by_case.setdefault(case, {})[row.impl] = row

    def worst_ratio(impl: str) -> float:
        ratios = []
        for case in by_case.values():
            best = min(r.seconds for r in case.values())
            ratios.append(case[impl].seconds / best if impl in case else math.inf)
        return max(ratios)

    impls = sorted({row.impl for row in rows}, key=lambda name: (worst_ratio(name), name))
    ranking = tuple(
        (name, None if math.isinf(r := worst_ratio(name)) else round(r, 4)) for name in impls
    )
    impl = impls[0]
    parts = []
    for case_name, case in sorted(by_case.items()):
        baselines = [r for r in case.values() if r.baseline]
        best_base = min(baselines, key=lambda r: r.seconds) if baselines else None
        mine = case.get(impl)
        text = f"{case_name}: {impl} {_fmt_us(mine.seconds)}" if mine else f"{case_name}: -"
        ours = [r for r in case.values() if not r.baseline]
        if best_base is not None and best_base.impl != impl:
            text += f" vs {best_base.impl} {_fmt_us(best_base.seconds)}"
        elif mine is not None and mine.baseline and ours:  # a baseline won: by how much
            best_ours = min(ours, key=lambda r: r.seconds)
            text += f" vs {best_ours.impl} {_fmt_us(best_ours.seconds)}"
        parts.append(text)
    return ranking, "; ".join(parts)


def _size_groups(rows: list[Measurement]) -> list[list[Measurement]]:
    """`rows` (one M) split into points by weight bytes: each group starts at the smallest size
    left and takes every size up to SIZE_MERGE times it."""
    sizes = sorted({weight_bytes(r.spec) for r in rows})
    groups: list[list[int]] = []
    for size in sizes:
        if groups and size <= SIZE_MERGE * groups[-1][0]:
            groups[-1].append(size)
        else:
            groups.append([size])
    return [[r for r in rows if weight_bytes(r.spec) in group] for group in groups]


def with_phase(table: Table | None, derived: Table, phase: str) -> Table:
    """`derived`'s points of `phase` (and its source) in place of `table`'s, the other phase's
    points kept: a training derivation lands in the file that holds the forward points, and the
    reverse. `table` None: `derived` alone."""
    if table is None:
        return derived
    kept = tuple(p for p in table.points if p.phase != phase)
    points = kept + tuple(p for p in derived.points if p.phase == phase)
    if phase == "train":
        return dataclasses.replace(table, points=points, train_source=derived.train_source)
    return dataclasses.replace(table, points=points, source=derived.source, legacy=derived.legacy)


def derive(rows: Iterable[Measurement], *, gpu: str, source: str, phase: str = "forward") -> Table:
    """The dispatch table from one benchmark run's timed rows (see the module docstring); `phase`
    "train" for the rows of `bench --backward` (`measurements_from_bench_backward`)."""
    groups: dict[tuple[str, str, str, str, int], list[Measurement]] = {}
    for row in rows:
        spec = row.spec
        key = (row.stack, spec.dtype, spec.fp32_precision, shape_class(spec), row.m)
        groups.setdefault(key, []).append(row)
    points = []
    for (stack, dtype, precision, klass, m), at_m in sorted(groups.items()):
        for group in _size_groups(at_m):
            sizes = sorted({weight_bytes(r.spec) for r in group})
            size = round(math.exp(sum(math.log(s) for s in sizes) / len(sizes)))
            ranking, evidence = _rank(group)
            points.append(Point(stack, dtype, klass, m, size, ranking, evidence, phase, precision))
    if phase == "train":
        return Table(gpu, "", tuple(points), train_source=source)
    return Table(gpu, source, tuple(points))


def training_baseline(
    table: Table | None, stack: str, spec: MLPSpec, m: int, can_take: Callable[[str], bool]
) -> tuple[str, str] | None:
    """(baseline, evidence) where a training point of `table` within TRAIN_REACH ranks a
    baseline that `can_take` the call before our kernels: `auto` then trains through it (both
    fronts' `training_choice`); None where `auto` trains with our kernels."""
    if table is None or _TRAINING_POINTS_OFF[0]:
        return None
    found = table.lookup(
        stack, spec, m, phase="train", accept=lambda impl: impl == KERNELS or can_take(impl)
    )
    if found is None or found.impl == KERNELS:
        return None
    evidence = f"auto trains through {found.impl}: measured on {table.gpu}: {found.evidence}"
    return found.impl, evidence


_TABLES: dict[str, Table | None] = {}
_GENERATION = [0]
_TRAINING_POINTS_OFF = [False]


@contextlib.contextmanager
def training_points_off() -> Iterator[None]:
    """Within: `auto` trains with our kernels wherever it would train through a baseline.
    `fusedmlp bench --backward --derive-auto` times its `auto` rows so: a training point ranks
    our training path against the baselines, and an `auto` row that had followed the previous
    table's point to a baseline would have timed that baseline again under our name."""
    _TRAINING_POINTS_OFF[0] = True
    _GENERATION[0] += 1  # the fronts' cached `auto` plans are keyed on it
    try:
        yield
    finally:
        _TRAINING_POINTS_OFF[0] = False
        _GENERATION[0] += 1


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


def newest_cases(sections: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The cases of several bench sections (oldest first), a later run's case replacing an earlier
    run's of the same spec and M: a partial rerun updates the points it measured and leaves the
    rest to the run before it (`fusedmlp derive-auto OLD.json NEW.json`)."""
    by_key: dict[tuple[str, int], dict[str, Any]] = {}
    for section in sections:
        for case in section["cases"]:
            key = (json.dumps(case["spec"], sort_keys=True), int(case["m"]))
            by_key.pop(key, None)  # re-inserted last: the newest run's order wins
            by_key[key] = case
    return list(by_key.values())


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


def measurements_from_bench_backward(section: Mapping[str, Any]) -> list[Measurement]:
    """Timed, gated rows of a `fusedmlp bench --backward` result (its `bench_backward` section):
    the baselines, and each stack's `auto` row as KERNELS (the training path `auto` takes without
    a training point). Explicit kernel rows are left out: a training point chooses between our
    path and a baseline, not among our kernels. A stack whose `auto` row was not timed in a case
    gives no rows for it (its baselines alone would rank a baseline first by default)."""
    out = []
    for case in section["cases"]:
        spec = MLPSpec.from_dict(case["spec"])
        timed = [r for r in case["rows"] if r.get("status") == "timed"]
        with_auto = {r["stack"] for r in timed if r["impl"] == "auto"}
        for row in timed:
            if row["stack"] not in with_auto or not (row.get("baseline") or row["impl"] == "auto"):
                continue
            seconds = row.get("time", {}).get("median")
            if not seconds:
                continue
            impl = KERNELS if row["impl"] == "auto" else row["impl"]
            label = case.get("preset", "") or case.get("spec_text", "")
            out.append(
                Measurement(
                    row["stack"],
                    impl,
                    bool(row.get("baseline")),
                    spec,
                    int(case["m"]),
                    float(seconds),
                    label,
                )
            )
    return out
