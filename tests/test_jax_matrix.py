"""The `jax_matrix` trim (tests/conftest.py): on jax < 0.11 a marked test keeps the first case of
what -k / -m selected; on jax >= 0.11 (CI's second job) every case runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]
MATRIX = "tests/test_pallas_mosaic.py::test_fresh_inputs"  # a jax_matrix test of 9 cases


def _collected(*args: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return [line for line in proc.stdout.splitlines() if line.startswith(MATRIX)]


def test_the_trim_keeps_the_first_selected_case_on_jax_before_0_11() -> None:
    major, minor = re.match(r"(\d+)\.(\d+)", jax.__version__).groups()
    every = _collected(MATRIX)
    float16 = _collected(MATRIX, "-k", "float16")
    if (int(major), int(minor)) < (0, 11):
        assert len(every) == 1 and "[swiglu-bfloat16-True-136" in every[0], every
        assert len(float16) == 1 and "float16" in float16[0], float16  # trimmed after -k
    else:
        assert len(every) == 9, every
        assert float16 == [case for case in every if "float16" in case] and len(float16) > 1
