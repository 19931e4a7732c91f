"""The environment block every result file carries: machine, versions, commit.

A number without the machine, the library versions and the commit it came from cannot be compared
with anything, so `environment()` is written into every JSON the harness produces. GPU facts come
from `nvidia-smi` (name, driver, clocks, memory) when it exists, and from torch (SM count, L2 size);
the CPU model from /proc/cpuinfo. Nothing here fails: a missing tool gives `None` for its fields.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "triton", "jax", "jaxlib", "numpy", "ml_dtypes")
_SMI_FIELDS = (
    "name",
    "driver_version",
    "memory.total",
    "clocks.sm",
    "clocks.mem",
    "clocks.max.sm",
    "clocks.max.mem",
    "power.limit",
)


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


# The device tool copies the working tree to the GPU machine with a git directory that may be an
# older snapshot (seen 2026-12-01: `git rev-parse HEAD` there named the checkout's first commit), so
# a GPU run is told its commit: FUSEDMLP_COMMIT set by whoever sends the tree wins over git.
COMMIT_ENV = "FUSEDMLP_COMMIT"


def git_info() -> dict[str, Any]:
    given = os.environ.get(COMMIT_ENV)
    if given:
        return {"commit": given, "dirty": False, "source": COMMIT_ENV}
    commit = _run(["git", "rev-parse", "HEAD"], REPO_ROOT)
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], REPO_ROOT)
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_info() -> list[dict[str, Any]]:
    """One dict per GPU from nvidia-smi (empty list without it), plus torch's SM count and L2."""
    text = _run(["nvidia-smi", f"--query-gpu={','.join(_SMI_FIELDS)}", "--format=csv,noheader"])
    gpus: list[dict[str, Any]] = []
    if text:
        for row in text.splitlines():
            values = [v.strip() for v in row.split(",")]
            gpus.append(dict(zip(_SMI_FIELDS, values, strict=False)))
    if "torch" in sys.modules or gpus:
        try:
            import torch

            for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
                props = torch.cuda.get_device_properties(i)
                entry = gpus[i] if i < len(gpus) else {"name": props.name}
                if i >= len(gpus):
                    gpus.append(entry)
                entry["sm_count"] = props.multi_processor_count
                entry["l2_bytes"] = getattr(props, "L2_cache_size", None)
                entry["capability"] = f"{props.major}.{props.minor}"
        except Exception:  # the environment block must never fail a run
            pass
    return gpus


# Environment variables that change what a run computes or how it is timed.
RECORDED_ENV = ("TRITON_INTERPRET", "JAX_PLATFORMS", "FUSEDMLP_FLUSH", "PJRT_NPROC")


def environment() -> dict[str, Any]:
    """The block recorded with every result."""
    return {
        "time_utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpus": gpu_info(),
        "versions": versions(),
        "git": git_info(),
        "env": {k: os.environ[k] for k in RECORDED_ENV if k in os.environ},
    }


def describe(env: dict[str, Any]) -> str:
    """One line for the top of a table: machine, versions, commit."""
    gpus = env.get("gpus") or []
    machine = (
        f"{gpus[0].get('name')} (driver {gpus[0].get('driver_version', '?')})"
        if gpus
        else f"CPU: {env.get('cpu')} x{env.get('cpu_count')}"
    )
    v = env.get("versions", {})
    git = env.get("git", {})
    commit = (git.get("commit") or "unknown")[:10] + ("+dirty" if git.get("dirty") else "")
    libs = ", ".join(
        f"{k} {v[k]}" for k in ("python", "torch", "triton", "jax", "numpy") if v.get(k)
    )
    return f"{machine} · {libs} · commit {commit}"
