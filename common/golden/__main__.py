"""`python -m fusedmlp.common.golden [--check]`: regenerate (or verify) the golden files."""

from __future__ import annotations

import argparse
import sys

from . import GOLDEN_DIR, check, regenerate


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedmlp.common.golden", description=__doc__)
    parser.add_argument("--check", action="store_true", help="verify the files instead of writing")
    args = parser.parse_args()
    if args.check:
        problems = check()
        for p in problems:
            print(p)
        print(
            "golden files reproduce bit for bit" if not problems else f"{len(problems)} problem(s)"
        )
        return 1 if problems else 0
    manifest = regenerate()
    size = sum(p.stat().st_size for p in GOLDEN_DIR.glob("*.npz"))
    count = len(manifest["cases"]) + len(manifest["lowrank_cases"])
    grads = len(manifest["grad_cases"])
    print(f"wrote {count} cases and {grads} gradient files, {size / 1e6:.2f} MB, to {GOLDEN_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
