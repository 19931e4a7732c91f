"""The interpreter switch: on without CUDA, and a clear error when it comes too late."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="the switch only acts without CUDA")
def test_interpreter_is_switched_on_without_cuda_and_late_triton_is_an_import_error():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    ok = subprocess.run(
        [
            sys.executable,
            "-c",
            "import fusedmlp.torch_impl as t; import os;"
            "print(t.runtime.INTERPRET, os.environ['TRITON_INTERPRET'])",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert ok.stdout.split() == ["True", "1"]
    late = subprocess.run(
        [sys.executable, "-c", "import triton.language; import fusedmlp.torch_impl"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert late.returncode != 0
    assert "ImportError" in late.stderr and "Set TRITON_INTERPRET=1" in late.stderr
