"""The tuning cache: winners of GPU config sweeps in a readable JSON file, shared by both stacks.

A sweep times every candidate TileConfig of `tiling.search_space` on the real inputs once; the
winner is stored under a key naming everything that changes which config wins:

    GPU name | impl | family | M bucket (tiling.shape_bucket) | N | K | dtype | fp32 precision

M is bucketed by powers of two (a config chosen for M=3000 serves M=2049..4096); N and K are exact
(layers of a model have a handful of widths, and the best tile depends on them). The file
(default `~/.cache/fusedmlp/tuning.json`, or `$FUSEDMLP_TUNING_CACHE`) looks like:

    {"format": 1,
     "entries": {"NVIDIA H100 80GB HBM3|triton|gated|m=8192|n=14336|k=4096|bfloat16|ieee": {
         "key": {...the fields above...}, "config": {"block_m": 128, ...}, "median_ms": 1.93,
         "candidates": [{"config": {...}, "median_ms": 1.93}, {"config": {...}, "skipped": "..."}],
         "versions": {"triton": "3.6.0", ...}, "tuned_at": "2026-11-23T12:00:00+00:00"}}}

Writes re-read the file and replace it atomically, so sweeps in several processes merge their
entries.
No torch or jax here: each stack's tuning module times configs and calls this one.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .config import TileConfig
from .dtypes import DTYPES, FP32_PRECISIONS
from .tiling import FAMILIES, shape_bucket

CACHE_ENV = "FUSEDMLP_TUNING_CACHE"
DEFAULT_CACHE = "~/.cache/fusedmlp/tuning.json"
FORMAT_VERSION = 1


def cache_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The cache file: `path` if given, else $FUSEDMLP_TUNING_CACHE, else ~/.cache/fusedmlp/."""
    chosen = path if path is not None else os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    return Path(chosen).expanduser()


@dataclass(frozen=True)
class TuningKey:
    device: str  # the GPU's name as the framework reports it, e.g. "NVIDIA H100 80GB HBM3"
    impl: str  # "triton", "triton_tma", "pallas_triton", ...: each kernel has its own winners
    family: str  # "linear_act" or "gated"
    m_bucket: str  # tiling.shape_bucket(M)
    n: int
    k: int
    dtype: str
    fp32_precision: str = "ieee"

    def __str__(self) -> str:
        return "|".join((self.device, self.impl, self.family, f"m={self.m_bucket}", f"n={self.n}",
                         f"k={self.k}", self.dtype, self.fp32_precision))


def make_key(
    device: str, impl: str, family: str, m: int, n: int, k: int, dtype: str,
    fp32_precision: str = "ieee",
) -> TuningKey:
    """The cache key of one launch shape; M goes into its power-of-two bucket."""
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {DTYPES}, got {dtype!r}")
    if fp32_precision not in FP32_PRECISIONS:
        raise ValueError(
            f"fp32_precision: expected one of {FP32_PRECISIONS}, got {fp32_precision!r}"
        )
    if "|" in device or "|" in impl:
        raise ValueError(f"device, impl: expected names without '|', got {device!r}, {impl!r}")
    return TuningKey(device, impl, family, shape_bucket(m), int(n), int(k), dtype, fp32_precision)


@dataclass
class TuningRecord:
    """One sweep's outcome: the winner, its median time, and what every candidate did."""

    config: TileConfig
    median_ms: float
    candidates: list[dict[str, Any]] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    tuned_at: str = ""

    def to_dict(self, key: TuningKey) -> dict[str, Any]:
        return {
            "key": asdict(key),
            "config": self.config.to_dict(),
            "median_ms": self.median_ms,
            "candidates": self.candidates,
            "versions": self.versions,
            "tuned_at": self.tuned_at or datetime.now(UTC).isoformat(timespec="seconds"),
        }


def candidate_timing(config: TileConfig, median_ms: float) -> dict[str, Any]:
    return {"config": config.to_dict(), "median_ms": median_ms}


def candidate_skipped(config: TileConfig, reason: str) -> dict[str, Any]:
    return {"config": config.to_dict(), "skipped": reason}


class TuningCache:
    """The winners in one JSON file; loaded once, re-read and merged before every write."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = cache_path(path)
        self._entries: dict[str, dict[str, Any]] | None = None

    def _read(self, *, warn: bool = True) -> dict[str, dict[str, Any]]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT_VERSION or not isinstance(data.get("entries"), dict):
                raise ValueError(f"expected format {FORMAT_VERSION} with an 'entries' object")
        except (ValueError, AttributeError) as err:
            # A cache is an optimisation: a broken one is replaced by the next sweep, not fatal.
            if warn:
                warnings.warn(f"tuning cache {self.path}: unreadable ({err}); ignoring it",
                              stacklevel=3)
            return {}
        return data["entries"]

    @property
    def entries(self) -> dict[str, dict[str, Any]]:
        if self._entries is None:
            self._entries = self._read()
        return self._entries

    def get(self, key: TuningKey) -> TileConfig | None:
        """The cached winner for `key`, or None (also for an entry whose config does not parse)."""
        entry = self.entries.get(str(key))
        if entry is None:
            return None
        try:
            return TileConfig.from_dict(entry["config"])
        except (KeyError, TypeError, ValueError) as err:
            warnings.warn(f"tuning cache {self.path}: bad entry {key} ({err}); ignoring it",
                          stacklevel=2)
            return None

    def put(self, key: TuningKey, record: TuningRecord) -> None:
        """Store `record` under `key`, merging with what other processes wrote meanwhile."""
        entries = self._read(warn=False)  # a broken file was reported when it was read
        entries[str(key)] = record.to_dict(key)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"format": FORMAT_VERSION, "entries": entries}, indent=2, sort_keys=True)
        # Write a sibling temp file and rename it over the cache: readers never see half a file.
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text + "\n")
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._entries = entries
