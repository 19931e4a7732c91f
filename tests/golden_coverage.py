"""Count what the golden tests exercise: (golden case × implementation × dtype) triples, unique
and with repeats, per test file. A script, not a test (issue 27's before/after counts):

    python tests/golden_coverage.py            # this tree's suite

It collects the suite (no test runs), maps each golden-parametrised test id to the implementation
it runs, and counts a pair as exercised where the implementation can take the case on this machine
(the front's plan raises no NotImplementedError and the implementation is available). A case has
one dtype, so a (case, implementation) pair is one triple.
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
)
# test id pattern -> (stack, impl) of each parametrisation; `case` is the golden name.
STACK_IMPL = {"triton": ("torch", "triton"), "pallas_triton": ("jax", "pallas_triton")}


def _pairs(node: str, names: set[str]) -> tuple[str, str, str, str] | None:
    """(file, stack, impl, case) of one collected golden test id, or None."""
    file, _, rest = node.partition("::")
    hit = re.match(r"(\w+)(?:::(\w+))?\[(.*)\]$", rest)
    if not hit or "golden" not in (hit.group(2) or hit.group(1)):
        return None
    params = hit.group(3)
    case = next((n for n in sorted(names, key=len, reverse=True) if params.endswith(n)), None)
    if case is None:
        return None
    head = params[: -len(case)].rstrip("-")
    name = Path(file).stem
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
        return None
    return file, stack, impl, case


def _exercised(stack: str, impl: str, case_name: str) -> tuple[bool, str]:
    import importlib

    from fusedmlp.common import golden

    front = importlib.import_module(f"fusedmlp.{stack}_impl")
    if impl == "lowrank":  # every stack runs every factorised case (no GPU-only path)
        return True, impl
    case = golden.load(case_name)
    if front.unavailable_reason(impl, "cpu") is not None:
        return False, impl
    try:
        the_plan = front.plan(case.spec, case.x.shape, impl=impl)
    except NotImplementedError:
        return False, impl
    return True, the_plan.impl


def main() -> int:
    from fusedmlp.common import golden

    names = set(golden.case_names()) | set(golden.lowrank_case_names())
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         *FILES], capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    per_file: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    unique: set[tuple[str, str, str]] = set()
    for line in proc.stdout.splitlines():
        got = _pairs(line.strip(), names)
        if got is None:
            continue
        file, stack, impl, case = got
        ok, ran = _exercised(stack, impl, case)
        per_file[file]["collected"] += 1
        if ok:
            per_file[file]["exercised"] += 1
            unique.add((stack, ran, case))
    total = sum(c["exercised"] for c in per_file.values())
    for file, c in sorted(per_file.items()):
        print(f"{file:36s} collected {c['collected']:4d}  exercised {c['exercised']:4d}")
    print(f"(case x implementation x dtype) exercised: {total} runs, {len(unique)} unique")
    return 0


if __name__ == "__main__":
    sys.exit(main())
