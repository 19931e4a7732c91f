"""Test set-up shared by every test file.

- TRITON_INTERPRET=1 is set before anything imports triton when there is no CUDA GPU, so every
  Triton kernel runs under the interpreter on CPU machines (`fusedmlp.torch_impl.runtime` does the
  same for users; it is repeated here because a test module may import triton first).
- Outputs are poisoned: torch fills every `torch.empty` with NaN (deterministic mode), so a kernel
  that skips an element fails the NaN check of the tolerance policy; Pallas' interpreters fill
  outputs and out-of-bounds reads with NaN themselves.
- `-m gpu` selects the GPU tests; they are skipped, with the reason, on a machine without one.
- A `jax_matrix` test runs its first case only on jax < 0.11; .ci/run's jax 0.11.2 job runs it
  whole (`_jax_matrix_cases_past_the_first` says why).
- One float32 tile product for both interpreters (`_one_product_for_both_interpreters`).
- XLA's CPU thread pool sized for the Mosaic GPU interpreter before any backend starts (the
  package's `jax_impl.compat.widen_cpu_pool`, imported here first: a pool of the CI's 2 cores
  could deadlock it).
- Without a GPU, XLA compiles at backend optimization level 0 (`_compile_fast_on_the_cpu`).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys

import pytest


def _has_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _compile_fast_on_the_cpu() -> None:
    """The interpreters' tests spend most of their time in XLA CPU's compiler: every interpreted
    Pallas kernel is a new XLA program of nested loops, run once or twice. At LLVM optimization
    level 0 they compile faster (tests/test_parity_golden.py with test_golden_grad.py: 123 s ->
    90 s on 2 cores, 2026-12-07). Bits, compared between the two levels on every golden case
    (jax 0.10.2, 2026-12-07): pallas_triton's, fused_small's and fused_decode's outputs the same;
    what XLA compiles around or instead of the kernels not always — 2 of pallas_triton's gradient
    arrays (swiglu-float32-nobias dx, dw0: 5e-8 rel_fro) and 21 of the 94 arrays of the `xla`
    baseline (float32: <= 8e-8; two float16 cases' gradients, their bias sums most: <= 1.7e-3,
    3.4 u of float16). Either level's result is XLA's, within the bounds; the 2x rule's baseline
    moves by that much, and the twins' bitwise tests compare runs at one level. Set before any
    backend starts; a level the user set is kept."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()


if not _has_cuda():
    _compile_fast_on_the_cpu()
# Keep JAX off any accelerator-less warnings and on float32 defaults (x64 stays off, as for users).
os.environ.setdefault("JAX_PLATFORMS", "" if _has_cuda() else "cpu")
if importlib.util.find_spec("jax") is not None:
    # XLA's CPU pool sized for the Mosaic GPU interpreter before any test starts a backend (the
    # package does it on import: `fusedmlp.jax_impl.compat.widen_cpu_pool` says why)
    from fusedmlp.jax_impl import compat as _jax_compat  # noqa: F401


def _one_product_for_both_interpreters() -> None:
    """Triton's interpreter computes a float32 `tl.dot` with NumPy's matmul — the BLAS, whose
    kernel, and with it the order of the additions, is chosen for the CPU at run time; Pallas'
    interpreter runs XLA CPU's dot, a fused multiply-add per K step in order. On AVX-512
    machines the two gave the same bits; on an AVX2 one (an AMD EPYC, 2026-12-02) they did not,
    and neither did the BLAS on two tile shapes of the same rows. The twin tests assert that our
    kernels perform the same operations in the same order, not that two BLAS libraries agree:
    here Triton's interpreter takes XLA's product too (float32 tiles; anything else keeps
    NumPy's), so both interpreters multiply tiles alike on every CPU and a row's product does not
    depend on the tile it is in. The kernels' accuracy is judged against the float64 reference
    either way; `fusedmlp parity` outside the tests reports the twins as the machine has them."""
    if os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("jax") is None:
        return
    if importlib.util.find_spec("triton") is None:
        return
    import jax
    import numpy as np
    from triton.runtime import interpreter

    xla_product = jax.jit(
        lambda a, b: jax.lax.dot(
            a, b, precision=jax.lax.Precision.HIGHEST, preferred_element_type=np.float32
        )
    )
    numpy_dot = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        tiles = (a.data, b.data, d.data)
        if any(t.dtype != np.float32 or t.ndim != 2 for t in tiles):
            return numpy_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        product = np.asarray(xla_product(a.data, b.data))
        return interpreter.TensorHandle(product + d.data, d.dtype.scalar)

    interpreter.InterpreterBuilder.create_dot = create_dot


_one_product_for_both_interpreters()


def _jax_before_0_11() -> bool:
    if importlib.util.find_spec("jax") is None:
        return False
    import jax

    major, minor = re.match(r"(\d+)\.(\d+)", jax.__version__).groups()
    return (int(major), int(minor)) < (0, 11)


def _jax_matrix_cases_past_the_first(items: list[pytest.Item]) -> list[pytest.Item]:
    """The cases a `jax_matrix` test leaves to jax >= 0.11 (all but the first of each test).

    Such a matrix runs the Mosaic GPU or JAX backward kernels under jax's interpreters, case by
    case, in seconds each; .ci/run's second job runs it whole on the GPU image's jax (0.11.2), the
    one these kernels run on. On an older jax (the CPU version set's 0.10.2: the README's test
    command) its first case runs, and every variant it leaves out is still traced and lowered
    for CUDA there by the tests that do that (test_gpu_variant_lowers_for_cuda and the like).
    A `jax_matrix` test must run in that job (no torch there) and keep its first case runnable
    on jax 0.10 (a case skipped there goes last)."""
    seen: set[str] = set()
    left = []
    for item in items:
        if item.get_closest_marker("jax_matrix") is None:
            continue
        test = item.nodeid.split("[")[0]
        if test in seen:
            left.append(item)
        seen.add(test)
    return left


@pytest.hookimpl(trylast=True)  # after -k / -m have chosen: trim what they left
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _jax_before_0_11():
        left = {id(item) for item in _jax_matrix_cases_past_the_first(items)}
        if left:
            config.hook.pytest_deselected(items=[i for i in items if id(i) in left])
            items[:] = [i for i in items if id(i) not in left]
    if _has_cuda():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU: run `pytest -m gpu` on the GPU image")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _keep_triton_cache_dir():
    """jax_triton 0.3.1 clears TRITON_CACHE_DIR at import, after which every Triton compile in the
    process fails ("Could not create or locate cache dir": 11 GPU tests of one xdist worker on the
    H200, 2026-12-01). The package imports it through a helper that puts the variable back; this
    keeps any other import from leaking into the next test."""
    before = os.environ.get("TRITON_CACHE_DIR")
    yield
    if before is None:
        os.environ.pop("TRITON_CACHE_DIR", None)
    else:
        os.environ["TRITON_CACHE_DIR"] = before


@pytest.fixture(autouse=True)
def _no_launch_records_across_tests():
    """Launch records (torch_impl/launch.py) keep the kernel object a launcher read when it built
    them: a test that monkeypatches a kernel (a recorder, a broken kernel) would leave its stand-in
    in a record that the next test with the same launch key calls. Each test ends with none."""
    yield
    launch = sys.modules.get("fusedmlp.torch_impl.launch")
    if launch is not None:
        launch.clear_all()


@pytest.fixture(autouse=True)
def _poison_torch_outputs():
    """NaN-fill every uninitialised torch allocation for the duration of each test."""
    if importlib.util.find_spec("torch") is None:
        yield
        return
    import torch

    previous = torch.are_deterministic_algorithms_enabled()
    previous_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.utils.deterministic.fill_uninitialized_memory = previous_fill


# ---- the harness CLI's tests (test_harness.py, test_bench_backward.py) ---------------------------
@pytest.fixture
def no_cli_faults():
    """No injected fault leaks between tests, and the CLI's CPU-thread pinning is undone."""
    import torch

    from fusedmlp.bench import providers

    threads = torch.get_num_threads()  # the CLI pins CPU threads; give other tests theirs back
    providers.FAULTS.clear()
    yield
    providers.FAULTS.clear()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory: pytest.TempPathFactory):
    """The CLI tests' tiny swiglu spec (helpers.CLI_TINY_SPEC) as a spec file."""
    from fusedmlp.common import MLPSpec
    from helpers import CLI_TINY_SPEC

    path = tmp_path_factory.mktemp("specs") / "tiny.json"
    MLPSpec(**CLI_TINY_SPEC).to_json(path)
    return path


@pytest.fixture
def torch_table(monkeypatch):
    """`torch_table(table)` installs a dispatch table for the torch front (a CPU has none: the
    front's `_table` is what `auto`'s lookups read), its cached plans and training choices
    dropped before and after."""
    from fusedmlp.torch_impl import front

    def use(table) -> None:
        monkeypatch.setattr(front, "_table", lambda device: table)
        front._training_choice_of.cache_clear()
        front._PREPARED.clear()

    yield use
    front._training_choice_of.cache_clear()
    front._PREPARED.clear()
