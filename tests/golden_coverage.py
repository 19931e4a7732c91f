"""Count what the golden tests exercise: (golden case × implementation × dtype) triples, unique
and with repeats, per test file. A script, not a test (issue 27's before/after counts):

    python tests/golden_coverage.py            # this tree's suite

It collects the suite (no test runs), maps each golden-parametrised test id to the implementation
it runs, and counts a pair as exercised where the implementation can take the case on this machine
(the front's plan raises no NotImplementedError and the implementation is available). A case has
one dtype, so a (case, implementation) pair is one triple. Gradient tests
(tests/test_golden_grad.py, against the manifest's `grad_cases`) are counted apart, as (case ×
implementation × `saved` policy) training calls (a test per (stack, case) runs that case's
calls: `test_golden_grad._calls`), planned with `saved=`; their twin comparisons reuse those
calls and are not counted. Which cases the gradient files must span is
tests/test_golden.py's `test_coverage_of_grad_cases`.
"""

from __future__ import annotations

import collections
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = (
    "tests/test_parity_golden.py",
    "tests/test_kernels_portable.py",
    "tests/test_fused_small.py",
    "tests/test_fused_decode.py",
    "tests/test_triton_tma.py",
    "tests/test_pallas_mosaic.py",
    "tests/test_module.py",
    "tests/test_lowrank_front.py",
    "tests/test_golden_grad.py",
)
# test id pattern -> (stack, impl) of each parametrisation; `case` is the golden name.
STACK_IMPL = {"triton": ("torch", "triton"), "pallas_triton": ("jax", "pallas_triton")}


def _grad_calls(stack: str, case: str) -> list[tuple[str, str]]:
    """(impl, saved) of the training calls tests/test_golden_grad.py makes on `case`."""
    sys.path.insert(0, str(ROOT / "tests"))
    import test_golden_grad

    return test_golden_grad._calls(stack, case)


def _pairs(node: str, names: set[str]) -> list[tuple[str, str, str, str, str | None]]:
    """(file, stack, impl, case, saved) of what one collected golden test id runs (saved: the
    policy of a gradient test's training call, else None); empty for other tests."""
    file, _, rest = node.partition("::")
    hit = re.match(r"(\w+)(?:::(\w+))?\[(.*)\]$", rest)
    if not hit or "golden" not in (hit.group(2) or hit.group(1)):
        return []
    params = hit.group(3)
    case = next((n for n in sorted(names, key=len, reverse=True) if params.endswith(n)), None)
    if case is None:
        return []
    head = params[: -len(case)].rstrip("-")
    name = Path(file).stem
    if name == "test_golden_grad":  # one test per (stack, case): its training calls
        return [(file, head, impl, case, saved) for impl, saved in _grad_calls(head, case)]
    if name == "test_parity_golden":
        stack, _, impl = head.partition("-")
    elif name == "test_kernels_portable":
        stack, impl = STACK_IMPL[head]
    elif name in ("test_fused_small", "test_fused_decode"):
        stack, impl = head, name.removeprefix("test_")
    elif name == "test_triton_tma":
        stack, impl = "torch", "triton_tma"
    elif name == "test_pallas_mosaic":
        stack, impl = "jax", "pallas_mosaic"
    elif name == "test_module":
        stack, impl = "torch", "auto"
    elif name == "test_lowrank_front":  # factorised cases (the manifest's lowrank_cases)
        stack, impl = head, "lowrank"
    else:
        return []
    return [(file, stack, impl, case, None)]


def _exercised(stack: str, impl: str, case_name: str, saved: str | None) -> tuple[bool, str]:
    import importlib

    from fusedmlp.common import golden

    front = importlib.import_module(f"fusedmlp.{stack}_impl")
    if impl == "lowrank":  # every stack runs every factorised case (no GPU-only path)
        return True, impl
    case = golden.load(case_name)
    if front.unavailable_reason(impl, "cpu") is not None:
        return False, impl
    try:
        the_plan = front.plan(case.spec, case.x.shape, impl=impl, saved=saved)
    except NotImplementedError:
        return False, impl
    return True, the_plan.impl


def _count(per_file, unique, unique_grad, file, stack, impl, case, saved) -> None:
    ok, ran = _exercised(stack, impl, case, saved)
    per_file[file]["collected"] += 1
    if ok:
        per_file[file]["exercised"] += 1
        if saved is None:
            unique.add((stack, ran, case))
        else:
            unique_grad.add((stack, ran, case, saved))


def main() -> int:
    from fusedmlp.common import golden

    names = set(golden.case_names()) | set(golden.lowrank_case_names())
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         *FILES], capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    per_file: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    unique: set[tuple[str, str, str]] = set()
    unique_grad: set[tuple[str, str, str, str]] = set()
    for line in proc.stdout.splitlines():
        for file, stack, impl, case, saved in _pairs(line.strip(), names):
            _count(per_file, unique, unique_grad, file, stack, impl, case, saved)
    grad_file = "tests/test_golden_grad.py"
    total = sum(c["exercised"] for f, c in per_file.items() if f != grad_file)
    for file, c in sorted(per_file.items()):
        print(f"{file:36s} collected {c['collected']:4d}  exercised {c['exercised']:4d}")
    print(f"(case x implementation x dtype) exercised: {total} runs, {len(unique)} unique")
    grad_total = per_file[grad_file]["exercised"] if grad_file in per_file else 0
    print(
        f"gradients, (case x implementation x saved) exercised: {grad_total} runs, "
        f"{len(unique_grad)} unique, over {len(golden.grad_case_names())} gradient files"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
