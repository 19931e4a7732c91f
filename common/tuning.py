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
entries. No torch or jax here: each stack's tuning module times configs and calls this one.

Committed tuned configs: `common/tuned/<device slug>.json` (e.g. `nvidia-h200.json` for
"NVIDIA H200"), in the same format, written by bench/sweep_triton.py on that GPU and committed with
the repo. `committed_config` reads it (once per process): the entry for the exact key, else the
same impl / family / n / k / dtype / precision at the nearest M bucket, else None.
`tiling.heuristic_config` consults it first on a GPU — the device is passed in, or the one a stack
registered at import (`register_device`, called by torch_impl when CUDA is there) — so `auto`
launches measured configs without tuning at the first call. `FUSEDMLP_NO_TUNED=1` turns the
committed tables off (to measure the rules themselves).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .config import TileConfig, is_power_of_two_tile
from .dtypes import DTYPES, FP32_PRECISIONS
from .tiling import FAMILIES, shape_bucket

CACHE_ENV = "FUSEDMLP_TUNING_CACHE"
NO_TUNED_ENV = "FUSEDMLP_NO_TUNED"
TUNED_DIR = Path(__file__).resolve().parent / "tuned"
DEFAULT_CACHE = "~/.cache/fusedmlp/tuning.json"
FORMAT_VERSION = 1


def cache_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The cache file: `path` if given, else $FUSEDMLP_TUNING_CACHE, else ~/.cache/fusedmlp/."""
    chosen = path if path is not None else os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    return Path(chosen).expanduser()


def triton_config(data: dict[str, Any]) -> TileConfig:
    """A stored Triton config (these tables and caches hold the Triton kernels' winners); a
    ValueError for one the Triton kernels cannot take — a TileConfig may be a Mosaic GPU width
    (block_n a multiple of 64, common/config.py), which no Triton sweep writes."""
    config = TileConfig.from_dict(data)
    if not is_power_of_two_tile(config):
        raise ValueError(f"block_n={config.block_n} is not a power of two (Triton's tiles)")
    return config


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
        return "|".join(
            (
                self.device,
                self.impl,
                self.family,
                f"m={self.m_bucket}",
                f"n={self.n}",
                f"k={self.k}",
                self.dtype,
                self.fp32_precision,
            )
        )


def make_key(
    device: str,
    impl: str,
    family: str,
    m: int,
    n: int,
    k: int,
    dtype: str,
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
                warnings.warn(
                    f"tuning cache {self.path}: unreadable ({err}); ignoring it", stacklevel=3
                )
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
            return triton_config(entry["config"])
        except (KeyError, TypeError, ValueError) as err:
            warnings.warn(
                f"tuning cache {self.path}: bad entry {key} ({err}); ignoring it", stacklevel=2
            )
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


# ---- committed tuned configs (common/tuned/) -----------------------------------------------------
_REGISTERED_DEVICE: str | None = None


def register_device(name: str | None) -> None:
    """The GPU this process launches on, for `tiling.heuristic_config`'s committed-config lookup
    (a stack calls it at import when it has a GPU; None forgets it)."""
    global _REGISTERED_DEVICE
    _REGISTERED_DEVICE = name


def registered_device() -> str | None:
    return _REGISTERED_DEVICE


def device_slug(device: str) -> str:
    """ "NVIDIA H200" -> "nvidia-h200": the committed file's name for a GPU."""
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")


def tuned_path(device: str) -> Path | None:
    """The committed table for `device`: its slug, or the longest prefix of it that has a file
    ("NVIDIA H200 NVL" uses nvidia-h200.json when there is no nvidia-h200-nvl.json)."""
    parts = device_slug(device).split("-")
    for end in range(len(parts), 0, -1):
        path = TUNED_DIR / f"{'-'.join(parts[:end])}.json"
        if path.is_file():
            return path
    return None


@functools.cache
def _committed_entries(path: str) -> dict[str, dict[str, Any]]:
    return TuningCache(path).entries


def tables_state() -> tuple[bool, Path]:
    """What, besides a launch's own fields, decides `committed_config`'s answer: whether the
    tables are switched off (FUSEDMLP_NO_TUNED=1) and the folder they are read from. A cache of
    configs derived from the tables keys on it, so toggling either takes effect at the next call."""
    return os.environ.get(NO_TUNED_ENV) == "1", TUNED_DIR


def committed_config(
    device: str,
    impl: str,
    family: str,
    m: int,
    n: int,
    k: int,
    dtype: str,
    fp32_precision: str = "ieee",
) -> TileConfig | None:
    """The committed tuned config for this launch on `device`, or None (see the module docstring).

    Entries are matched on every key field but the device (one file is one GPU) and M, which goes
    to the nearest power-of-two bucket that was measured for the same layer shape. The answer is
    cached per launch shape: the committed tables are read once per process
    (`_committed_entries`), and this lookup ran on every kernel launch of the training path —
    ~0.2 ms each on the H200 host (a file stat and a scan of the table), 1.1 ms of a 1.8 ms step.
    """
    if os.environ.get(NO_TUNED_ENV) == "1":
        return None
    return _committed_config(str(TUNED_DIR), device, impl, family, m, n, k, dtype, fp32_precision)


@functools.lru_cache(maxsize=4096)
def _committed_config(
    folder: str,  # a key only: the tables' folder (a test points TUNED_DIR elsewhere)
    device: str,
    impl: str,
    family: str,
    m: int,
    n: int,
    k: int,
    dtype: str,
    fp32_precision: str,
) -> TileConfig | None:
    path = tuned_path(device)
    if path is None:
        return None
    want = make_key(device, impl, family, m, n, k, dtype, fp32_precision)
    best: tuple[float, dict[str, Any]] | None = None
    for entry in _committed_entries(str(path)).values():
        key = entry.get("key", {})
        same = all(
            key.get(f) == getattr(want, f)
            for f in ("impl", "family", "n", "k", "dtype", "fp32_precision")
        )
        if not same:
            continue
        distance = abs(
            math.log2(max(int(key["m_bucket"]), 1)) - math.log2(max(int(want.m_bucket), 1))
        )
        if best is None or distance < best[0]:
            best = (distance, entry)
    if best is None:
        return None
    try:
        return triton_config(best[1]["config"])
    except (KeyError, TypeError, ValueError) as err:
        warnings.warn(
            f"tuned table {path}: bad entry for {want} ({err}); ignoring it", stacklevel=3
        )
        return None
