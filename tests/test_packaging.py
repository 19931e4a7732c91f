"""pyproject.toml ships the whole package: every folder of Python code and every data file.

Why a test: CI installs editable (`pip install -e`), whose finder maps the top-level folders and
then finds any subfolder by path, so a package missing from `[tool.setuptools] packages` works in
CI and is absent from a wheel (`pip install .`): torch_impl/cross and jax_impl/cross were, and
`auto` routes to them on a Hopper GPU.
"""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_SUFFIXES = {".json", ".npz", ".sh"}  # files the code reads at run time


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _package_folders() -> dict[str, Path]:
    """Every package the tree has: a folder of .py files under a mapped root (results excluded)."""
    found: dict[str, Path] = {}
    for name, folder in _setuptools()["package-dir"].items():
        base = ROOT / folder
        for py in base.rglob("*.py"):
            rel = py.parent.relative_to(base)
            if "__pycache__" in rel.parts or rel.parts[:1] == ("results",):
                continue
            found[".".join((name, *rel.parts))] = py.parent
    return found


def _glob_matches(parts: tuple[str, ...], pattern: str) -> bool:
    """setuptools' package-data glob: its `*` stays within one folder."""
    pieces = pattern.split("/")
    return len(pieces) == len(parts) and all(map(fnmatch.fnmatch, parts, pieces))


def test_every_code_folder_is_a_listed_package():
    listed = set(_setuptools()["packages"])
    folders = _package_folders()
    missing = sorted(set(folders) - listed)
    assert not missing, f"pyproject.toml [tool.setuptools] packages lacks {missing}"
    stale = sorted(listed - set(folders))
    assert not stale, f"pyproject.toml lists packages with no code: {stale}"


def test_every_data_file_is_package_data():
    globs = _setuptools()["package-data"]
    folders = _package_folders()
    unshipped = []
    for name, folder in folders.items():
        for path in folder.rglob("*"):
            if path.suffix not in DATA_SUFFIXES or "__pycache__" in path.parts:
                continue
            owner = next(  # the deepest package holding the file
                p for p in sorted(folders, key=len, reverse=True) if path.is_relative_to(folders[p])
            )
            if owner != name:
                continue
            rel = path.relative_to(folder)
            if rel.parts[0] == "results":  # measurements, read by people, not by the code
                continue
            if not any(_glob_matches(rel.parts, g) for g in globs.get(name, [])):
                unshipped.append(f"{name}: {rel.as_posix()}")
    assert not unshipped, f"data files outside pyproject.toml package-data: {unshipped}"
