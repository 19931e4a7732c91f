"""The twin contract: torch_impl/X.py and jax_impl/X.py are line-for-line twins.

For every twin name present in both folders (and the required ones in each): the same public names
(non-underscore functions, classes and constants defined in the module — imports excluded), the same
kernel names (`_*_kernel`), and for the portable kernel files the same kernel sections in the same
order. The activation helpers of both stacks accept the same ACTIVATION_KEYS (the contract's).

Across every kernel module (twins, Hopper and Mosaic GPU siblings, cross-stack launchers): one
rounding helper and one interpreter flag name, the same 16-bit upcasts in both twins, `interpret=`
on every JAX public function and launcher, one gated signature (the packed operand), and the
fallback implementation imported from the registry, never defined.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from fusedmlp.common.spec import KERNEL_ACTIVATIONS

ROOT = Path(__file__).resolve().parents[1]
TORCH_DIR, JAX_DIR = ROOT / "torch_impl", ROOT / "jax_impl"
REQUIRED = ("activations", "linear_act", "gated", "backward")
CANDIDATES = (*REQUIRED, "fused_small", "fused_decode", "lowrank")
# kernel files with the `# 1.` ... `# 4.` sections
SECTIONED = ("linear_act", "gated", "backward", "lowrank")
SECTIONS = ("# 1. program -> tile", "# 2. load", "# 3. compute", "# 4. store")


def twin_names() -> list[str]:
    return [
        n for n in CANDIDATES if (TORCH_DIR / f"{n}.py").exists() and (JAX_DIR / f"{n}.py").exists()
    ]


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
        return [
            s
            for line in path.read_text().splitlines()
            for s in SECTIONS
            if line.strip().startswith(s)
        ]

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
        missing = [
            n for n in public(defined_names(folder / f"{name}.py")) if not hasattr(module, n)
        ]
        assert not missing, f"{package}/{name}.py: {missing}"


# ---- what the twins share beyond names (issue 27) ------------------------------------------------
# Every kernel module of both stacks: the portable twins, their Hopper and Mosaic GPU siblings, the
# cross-stack launchers.
KERNEL_MODULES = (
    "torch_impl/linear_act.py",
    "torch_impl/gated.py",
    "torch_impl/fused_small.py",
    "torch_impl/fused_decode.py",
    "torch_impl/tma/linear_act.py",
    "torch_impl/tma/gated.py",
    "torch_impl/cross/linear_act.py",
    "torch_impl/cross/gated.py",
    "jax_impl/linear_act.py",
    "jax_impl/gated.py",
    "jax_impl/fused_small.py",
    "jax_impl/fused_decode.py",
    "jax_impl/mosaic/linear_act.py",
    "jax_impl/mosaic/gated.py",
    "jax_impl/mosaic/pipeline.py",
    "jax_impl/cross/linear_act.py",
    "jax_impl/cross/gated.py",
)
# The modules whose kernels round an fp32 tile to the output dtype (tma/gated.py stores through
# tma/linear_act.py's `_store_tile`).
ROUNDING_MODULES = tuple(
    m for m in KERNEL_MODULES if not any(s in m for s in ("cross", "pipeline", "tma/gated"))
)
ROUNDING = "round_to_dtype"  # the one name (activations.py of each stack defines it)


def _tree(rel: str) -> ast.Module:
    return ast.parse((ROOT / rel).read_text())


def _names(tree: ast.AST) -> set[str]:
    """Every identifier a module uses: names, attributes, arguments, keywords, definitions."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            out.add(node.id)
        elif isinstance(node, ast.Attribute):
            out.add(node.attr)
        elif isinstance(node, (ast.arg, ast.keyword)) and node.arg:
            out.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out.add(node.name)
    return out


def test_one_name_for_the_interpreter_rounding():
    """One rounding helper, `round_to_dtype(x, DTYPE, INTERPRET)`, defined once per stack (in the
    epilogue helpers, activations.py) and called by every kernel module that rounds; one name for
    the interpreter flag (INTERPRET, never UPCAST); no second helper (`_cast_out`)."""
    for stack in ("torch_impl", "jax_impl"):
        defs = [
            node
            for node in _tree(f"{stack}/activations.py").body
            if isinstance(node, ast.FunctionDef) and node.name == ROUNDING
        ]
        assert len(defs) == 1, f"{stack}/activations.py: no {ROUNDING}"
        params = [a.arg for a in defs[0].args.args]
        assert params == ["x", "DTYPE", "INTERPRET"], (stack, params)
    for rel in KERNEL_MODULES:
        used = _names(_tree(rel))
        assert not used & {"UPCAST", "upcast", "_cast_out"}, (rel, used & {"UPCAST", "_cast_out"})
        assert ROUNDING not in defined_names(ROOT / rel), f"{rel}: defines its own {ROUNDING}"
    for rel in ROUNDING_MODULES:
        assert ROUNDING in _names(_tree(rel)), f"{rel}: rounds without {ROUNDING}"


def _upcasts(rel: str) -> list[str]:
    """The variables upcast to fp32 under `if INTERPRET:` (the 16-bit upcast after a load, and
    the rounded hidden fed to the next dot), in source order."""
    out = []
    for node in ast.walk(_tree(rel)):
        if not (
            isinstance(node, ast.If)
            and isinstance(node.test, ast.Name)
            and node.test.id == "INTERPRET"
        ):
            continue
        for stmt in node.body:
            if (
                isinstance(stmt, ast.Assign)
                and isinstance(stmt.value, ast.Call)
                and isinstance(stmt.value.func, ast.Attribute)
                and stmt.value.func.attr in ("to", "astype")
                and "float32" in ast.unparse(stmt.value.args[0])
            ):
                out.append(ast.unparse(stmt.targets[0]))
    return sorted(out)


@pytest.mark.parametrize("name", twin_names())
def test_twins_upcast_alike(name: str) -> None:
    """The 16-bit upcast under the interpreter is the same statement set in both twins (not kept
    in one and dropped in the other)."""
    if name == "activations":
        return
    torch_up = _upcasts(f"torch_impl/{name}.py")
    jax_up = _upcasts(f"jax_impl/{name}.py")
    # counted, not named: a Pallas closure may not rebind its enclosing kernel's local
    # (fused_small's w_out is w_last inside the row loop's body function)
    assert len(torch_up) == len(jax_up), f"{name}: torch upcasts {torch_up}, jax {jax_up}"
    assert torch_up, f"{name}: no `if INTERPRET:` upcast found"


JAX_PUBLIC = {
    "fusedmlp.jax_impl.linear_act": ("linear_act", "linear_act_fwd"),
    "fusedmlp.jax_impl.gated": ("gated", "gated_fwd"),
    "fusedmlp.jax_impl.fused_small": ("fused_small", "fused_small_fwd"),
    "fusedmlp.jax_impl.fused_decode": ("fused_decode", "fused_decode_fwd"),
    "fusedmlp.jax_impl.mosaic.linear_act": ("linear_act", "linear_act_fwd"),
    "fusedmlp.jax_impl.mosaic.gated": ("gated", "gated_fwd"),
}


@pytest.mark.parametrize("module", sorted(JAX_PUBLIC))
def test_jax_functions_take_interpret(module: str) -> None:
    """Every JAX kernel's public function and launcher take `interpret=` (keyword-only, None:
    interpret where there is no GPU, `compat.interpret_mode()`)."""
    import inspect

    mod = importlib.import_module(module)
    for fn_name in JAX_PUBLIC[module]:
        fn = getattr(mod, fn_name)
        param = inspect.signature(fn).parameters.get("interpret")
        assert param is not None, f"{module}.{fn_name}: no interpret="
        assert param.kind is inspect.Parameter.KEYWORD_ONLY and param.default is None, (
            f"{module}.{fn_name}: interpret must be keyword-only with default None"
        )
    assert "interpret_mode" in _names(
        _tree(module.removeprefix("fusedmlp.").replace(".", "/") + ".py")
    )


GATED_MODULES = (
    "fusedmlp.torch_impl.gated",
    "fusedmlp.torch_impl.tma.gated",
    "fusedmlp.torch_impl.cross.gated",
    "fusedmlp.jax_impl.gated",
    "fusedmlp.jax_impl.mosaic.gated",
    "fusedmlp.jax_impl.cross.gated",
)


@pytest.mark.parametrize("module", GATED_MODULES)
def test_gated_signature(module: str) -> None:
    """One argument order for gated layers everywhere: `gated_fwd(x, wv, bc, *, n, activation,
    config, fp32_precision, ...)` and `gated(x, wv, bc=None, *, n, ...)` — the packed operand,
    never the old (w, v, b, c) forms."""
    import inspect

    mod = importlib.import_module(module)
    positional = [inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD]
    for fn_name in ("gated_fwd", "gated"):
        if not hasattr(mod, fn_name):  # the cross-stack routes have launchers only
            assert fn_name == "gated" and ".cross." in module, (module, fn_name)
            continue
        params = inspect.signature(getattr(mod, fn_name)).parameters.values()
        pos = [p.name for p in params if p.kind in positional]
        kw = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
        assert pos == ["x", "wv", "bc"], (module, fn_name, pos)
        assert kw[:4] == ["n", "activation", "config", "fp32_precision"], (module, fn_name, kw)
    for rel in KERNEL_MODULES:  # no public function keeps the old separate W and V
        for node in _tree(rel).body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                args = {a.arg for a in node.args.args + node.args.kwonlyargs}
                assert not {"w", "v"} <= args, f"{rel}: {node.name} takes w and v apart"


def test_fallback_comes_from_the_registry():
    """The fallback implementation is named in one place, `common.registry.FALLBACK`: kernel
    modules import it and define no FALLBACK of their own."""
    for rel in (*KERNEL_MODULES, "torch_impl/tma/support.py"):
        tree = _tree(rel)
        assert "FALLBACK" not in defined_names(ROOT / rel), f"{rel}: defines FALLBACK"
        if "FALLBACK" in _names(tree):
            imported = [
                n
                for node in tree.body
                if isinstance(node, ast.ImportFrom)
                and (node.module or "").endswith("common.registry")
                for n in node.names
                if n.name == "FALLBACK"
            ]
            assert imported, f"{rel}: uses FALLBACK without importing common.registry's"
