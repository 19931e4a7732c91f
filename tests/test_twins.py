"""The twin contract: torch_impl/X.py and jax_impl/X.py are line-for-line twins.

For every twin name present in both folders (and the required ones in each): the same public names
(non-underscore functions, classes and constants defined in the module — imports excluded), the same
kernel names (`_*_kernel`), and for the portable kernel files the same kernel sections in the same
order. The activation helpers of both stacks accept the same ACTIVATION_KEYS (the contract's).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from fusedmlp.common.spec import KERNEL_ACTIVATIONS

ROOT = Path(__file__).resolve().parents[1]
TORCH_DIR, JAX_DIR = ROOT / "torch_impl", ROOT / "jax_impl"
REQUIRED = ("activations", "linear_act", "gated")
CANDIDATES = (*REQUIRED, "fused_small", "fused_decode")
SECTIONED = ("linear_act", "gated")  # kernel files with the `# 1.` ... `# 4.` sections
SECTIONS = ("# 1. program -> tile", "# 2. load", "# 3. compute", "# 4. store")


def twin_names() -> list[str]:
    return [n for n in CANDIDATES if (TORCH_DIR / f"{n}.py").exists()
            and (JAX_DIR / f"{n}.py").exists()]


def defined_names(path: Path) -> set[str]:
    """Names a module defines at top level (functions, classes, assigned names); no imports."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def public(names: set[str]) -> set[str]:
    return {n for n in names if not n.startswith("_")}


def kernels(names: set[str]) -> set[str]:
    return {n for n in names if n.startswith("_") and n.endswith("_kernel")}


def test_required_twins_exist() -> None:
    for name in REQUIRED:
        assert (TORCH_DIR / f"{name}.py").exists(), f"torch_impl/{name}.py: missing"
        assert (JAX_DIR / f"{name}.py").exists(), f"jax_impl/{name}.py: missing"
    assert set(REQUIRED) <= set(twin_names())


@pytest.mark.parametrize("name", twin_names())
def test_same_public_names(name: str) -> None:
    torch_names = defined_names(TORCH_DIR / f"{name}.py")
    jax_names = defined_names(JAX_DIR / f"{name}.py")
    assert public(torch_names) == public(jax_names), (
        f"{name}: only in torch_impl {sorted(public(torch_names) - public(jax_names))}, "
        f"only in jax_impl {sorted(public(jax_names) - public(torch_names))}"
    )
    assert kernels(torch_names) == kernels(jax_names), (
        f"{name}: kernels {sorted(kernels(torch_names))} vs {sorted(kernels(jax_names))}"
    )


@pytest.mark.parametrize("name", [n for n in SECTIONED if n in twin_names()])
def test_same_kernel_sections(name: str) -> None:
    def order(path: Path) -> list[str]:
        return [s for line in path.read_text().splitlines() for s in SECTIONS
                if line.strip().startswith(s)]

    torch_order, jax_order = order(TORCH_DIR / f"{name}.py"), order(JAX_DIR / f"{name}.py")
    assert torch_order == jax_order, f"{name}: {torch_order} vs {jax_order}"
    assert set(torch_order) == set(SECTIONS), f"{name}: sections {torch_order}"


def test_activation_keys() -> None:
    torch_act = importlib.import_module("fusedmlp.torch_impl.activations")
    jax_act = importlib.import_module("fusedmlp.jax_impl.activations")
    assert tuple(torch_act.ACTIVATION_KEYS) == tuple(jax_act.ACTIVATION_KEYS)
    assert tuple(torch_act.ACTIVATION_KEYS) == KERNEL_ACTIVATIONS


@pytest.mark.parametrize("name", twin_names())
def test_modules_import_and_export(name: str) -> None:
    # The public names the source defines are really there after import, in both stacks.
    for package, folder in (("torch_impl", TORCH_DIR), ("jax_impl", JAX_DIR)):
        module = importlib.import_module(f"fusedmlp.{package}.{name}")
        missing = [n for n in public(defined_names(folder / f"{name}.py"))
                   if not hasattr(module, n)]
        assert not missing, f"{package}/{name}.py: {missing}"
