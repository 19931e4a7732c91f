"""Helpers the test files share: stack-neutral arrays (the one NumPy -> torch conversion), random
layer operands and their float64 reference, golden case selection, the golden test body
(`GoldenParity`), the whole-MLP kernels' shared test body (`WholeMLPTests`), subprocess scripts
(sm_90 compiles, lowering for CUDA), and torch 2.11's Dynamo on any torch."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fusedmlp.bench.cases import to_numpy  # the one torch/jax -> NumPy conversion
from fusedmlp.common import golden, reference
from fusedmlp.common.dtypes import DTYPES, numpy_dtype
from fusedmlp.common.packing import pack_params
from fusedmlp.common.params import init_params, make_input
from fusedmlp.common.registry import get_implementation, impl_names
from fusedmlp.common.spec import ACTIVATIONS, MLPSpec
from fusedmlp.common.tolerance import assert_close

ROOT = Path(__file__).resolve().parents[1]
STACKS = ("torch", "jax")


def rand(rng: np.random.Generator, shape: tuple[int, ...], dtype: str, scale: float = 1.0):
    """Standard normal values times `scale`, in the contract dtype `dtype` (NumPy)."""
    return (scale * rng.standard_normal(shape)).astype(numpy_dtype(dtype))


def layer_spec(dtype: str, fp32_precision: str = "ieee") -> MLPSpec:
    """A spec to judge one layer's output by: only the dtype and precision matter to the
    tolerance bounds."""
    return MLPSpec((2, 2), "relu", True, dtype, fp32_precision)


def layer_ref(x, w, b, activation: str, v=None, c=None, residual=None) -> np.ndarray:
    """One layer in float64, from the reference's activation formulas: act(x·w + b), times
    (x·v + c) for a gated layer, plus the residual."""
    f64 = functools.partial(np.asarray, dtype=np.float64)
    z = f64(x) @ f64(w) + (f64(b) if b is not None else 0.0)
    out = reference.activation(activation, z)
    if v is not None:
        out = out * (f64(x) @ f64(v) + (f64(c) if c is not None else 0.0))
    if residual is not None:
        out = out + f64(residual)
    return out


GOLDEN_NAMES = golden.case_names()


@functools.cache
def load_case(name: str) -> golden.GoldenCase:
    """A golden case, read from its file once per process."""
    return golden.load(name)


def golden_names(*, gated: bool | None = None, dtypes: tuple[str, ...] | None = None) -> list[str]:
    """Golden case names, optionally filtered by gated-ness and dtype."""
    out = []
    for name in GOLDEN_NAMES:
        case = load_case(name)
        if gated is not None and case.spec.gated != gated:
            continue
        if dtypes is not None and case.spec.dtype not in dtypes:
            continue
        out.append(name)
    return out


def to_torch(a: np.ndarray, device: Any = None) -> Any:
    """A NumPy array (ml_dtypes bfloat16 included) as a torch tensor on `device` (None: the CPU),
    bit for bit: the one NumPy -> torch conversion (fusedmlp.torch_impl.module.to_torch;
    torch.from_numpy knows no bfloat16). Imported lazily: the JAX-only CI job has no torch."""
    from fusedmlp.torch_impl.module import to_torch as convert

    return convert(a, device)


# ---- torch 2.11's Dynamo, on any torch (the compile guard) ---------------------------------------
@contextlib.contextmanager
def dynamo_as_torch_2_11(*, strict: bool = True) -> Iterator[None]:
    """Trace as torch 2.11's Dynamo does where it fails FusedMLP (the H200 image's torch; CI has
    2.13 and no 2.11 CPU wheel exists: PyPI's 2.11 needs the CUDA libraries to import).

    1. `assume_constant_result` arguments: 2.11 converts each non-tensor with
       `as_python_constant`, which raises "currently can't reconstruct arbitrary frozen dataclass
       instances" for a frozen dataclass (2.13 passes the object through). The 2.11 conversion is
       put in place of 2.13's.
    2. `strict`: no fusedmlp dataclass may enter the trace at all — FusedMLP.forward builds the
       op's arguments from precomputed strings, so a dataclass that starts to reach a traced call
       fails here before it fails on the GPU image. (The functional `custom_op.mlp(x, p, spec)`
       takes a spec by design: it passes only the spec's fields on, which point 1 checks.)
    3. `torch.compiler.is_exporting()` traced by 2.11's Dynamo is True under any torch.compile
       (2.13 reads the export flag): FusedMLP's compiled routes took export's on the GPU image.
    """
    import torch
    import torch._dynamo.variables.builder as builder
    import torch._dynamo.variables.functions as functions

    def convert_as_2_11(tx, fn, name, args, kwargs):
        def convert(x):
            if x.is_tensor():
                return x.get_real_value()
            return x.as_python_constant()  # torch 2.11: no pass-through of user objects

        res = fn(*[convert(a) for a in args], **{k: convert(v) for k, v in kwargs.items()})
        return tx.output.register_attr_or_module(res, name, source=functions.ConstantSource(name))

    original = builder.is_frozen_dataclass

    def refuse_ours(value: object) -> bool:
        cls = value if isinstance(value, type) else type(value)
        if cls.__module__.startswith("fusedmlp.") and dataclasses.is_dataclass(cls):
            raise AssertionError(
                f"a fusedmlp dataclass ({cls.__name__}) entered a torch.compile trace: torch "
                "2.11's Dynamo cannot make constants of frozen dataclass instances"
            )
        return original(value)

    # 3. torch.compiler.is_exporting() is True under every Dynamo trace on 2.11 (2.13 reads the
    #    export flag): a function Dynamo inlines, True in the code it traces, the real one
    #    elsewhere (is_dynamo_compiling, not is_compiling: torch's own compile code, untraced,
    #    runs with is_compiling() True and must keep the real answer).
    #    Dynamo's own tables of torch functions are built first, from the real function (they
    #    are cached on first use: built from the stand-in, they would keep it after this context
    #    and treat the real is_exporting as an op in every later trace of the process).
    import torch._dynamo.trace_rules as trace_rules
    import torch._dynamo.variables.torch as torch_variables

    trace_rules.get_torch_obj_rule_map()
    torch_variables.tracing_state_functions()
    real_is_exporting = torch.compiler.is_exporting

    def is_exporting_as_2_11() -> bool:
        return torch.compiler.is_dynamo_compiling() or real_is_exporting()

    saved = functions.invoke_and_store_as_constant
    functions.invoke_and_store_as_constant = convert_as_2_11
    torch.compiler.is_exporting = is_exporting_as_2_11
    if strict:
        builder.is_frozen_dataclass = refuse_ours
    try:
        yield
    finally:
        functions.invoke_and_store_as_constant = saved
        builder.is_frozen_dataclass = original
        torch.compiler.is_exporting = real_is_exporting


# ---- the golden test body ------------------------------------------------------------------------
BASELINE = {"torch": "eager", "jax": "xla"}


def _has_gpu(stack: str) -> bool:
    if stack == "torch":
        import torch

        return torch.cuda.is_available()
    from fusedmlp.jax_impl import compat

    return compat.on_gpu()


@functools.cache
def _golden_output(stack: str, impl: str, name: str) -> np.ndarray:
    case = load_case(name)
    x, params = GoldenParity.wrap(stack, case)
    return to_numpy(GoldenParity.front(stack).mlp(x, params, case.spec, impl=impl))


class GoldenParity:
    """The golden test body (tokamax's shared test base): a subclass binds `stack` (and may narrow
    `impls`); pytest then collects `test_golden` once per (implementation, golden case). The
    framework's own result, the 2× rule's baseline, is computed once per (stack, case)."""

    stack: str = ""
    # None: every implementation of the stack but `compile` (one inductor compile per spec costs
    # seconds on a CPU and computes what `eager` computes: test_front.py covers it on a few cases)
    # and, without a GPU, the GPU-only ones (refused by name: test_parity_golden.py).
    impls: tuple[str, ...] | None = None

    @classmethod
    def implementations(cls) -> tuple[str, ...]:
        if cls.impls is not None:
            return cls.impls
        gpu = _has_gpu(cls.stack)
        return tuple(
            name for name in impl_names(cls.stack)
            if name != "compile" and (gpu or not get_implementation(name).gpu_only)
        )  # fmt: skip

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if metafunc.function.__name__ == "test_golden":
            impls = self.implementations()
            metafunc.parametrize("impl", impls, ids=[f"{self.stack}-{i}" for i in impls])
            metafunc.parametrize("name", GOLDEN_NAMES)

    @staticmethod
    def front(stack: str) -> Any:
        return importlib.import_module(f"fusedmlp.{stack}_impl")

    @staticmethod
    def wrap(stack: str, case: golden.GoldenCase) -> tuple[Any, dict[str, Any]]:
        if stack == "torch":
            device = "cuda" if _has_gpu("torch") else "cpu"
            conv = functools.partial(to_torch, device=device)
        else:
            import jax.numpy as jnp

            conv = jnp.asarray
        return conv(case.x), {k: conv(v) for k, v in case.params.items()}

    def test_golden(self, impl: str, name: str) -> None:
        case = load_case(name)
        front = self.front(self.stack)
        device = ("cuda" if self.stack == "torch" else "gpu") if _has_gpu(self.stack) else "cpu"
        try:
            front.plan(case.spec, case.x.shape, impl=impl, device=device)
        except NotImplementedError as err:
            assert impl in str(err), f"NotImplementedError must name the implementation: {err}"
            x, params = self.wrap(self.stack, case)
            with pytest.raises(NotImplementedError):
                front.mlp(x, params, case.spec, impl=impl)
            return
        out = _golden_output(self.stack, impl, name)
        base = BASELINE[self.stack]
        baseline = _golden_output(self.stack, base, name) if impl != base else None
        assert_close(out, case.y, case.spec, baseline=baseline, what=f"{self.stack}/{impl}/{name}")


# ---- the whole-MLP kernels' shared test body -----------------------------------------------------
class WholeStack:
    """One stack's whole-MLP module (`fused_small` or `fused_decode`) behind one interface: NumPy
    in, NumPy out, params packed here once (as a caller would)."""

    def __init__(self, name: str, family: str):
        self.name = name
        self.mod = importlib.import_module(f"fusedmlp.{name}_impl.{family}")
        self.fn = getattr(self.mod, family)

    def array(self, a: np.ndarray) -> Any:
        if self.name == "torch":
            import torch

            return to_torch(a, "cuda" if torch.cuda.is_available() else None)
        import jax.numpy as jnp

        return jnp.asarray(a)

    def packed(self, spec: MLPSpec, params: dict[str, np.ndarray]) -> dict[str, Any]:
        return {k: self.array(v) for k, v in pack_params(spec, params).items()}

    def call(self, x: np.ndarray, params: dict[str, np.ndarray], spec: MLPSpec, **kw) -> Any:
        return self.fn(self.array(x), self.packed(spec, params), spec, **kw)

    def run(self, x: np.ndarray, params: dict[str, np.ndarray], spec: MLPSpec, **kw) -> np.ndarray:
        return to_numpy(self.call(x, params, spec, **kw))

    def check(self, spec: MLPSpec, lead: Any, seed: int, **kw) -> None:
        """Fresh params and input (seeds `seed`, `seed + 1`) against the float64 reference."""
        params = init_params(spec, seed=seed)
        x = make_input(spec, lead, seed=seed + 1)
        out = self.run(x, params, spec, **kw)
        assert_close(out, reference.forward(spec, x, params), spec, what=f"{self.name} {spec}")


def whole_stack_fixture(family: str) -> Any:
    """A module's `stack` fixture: `family` in each stack in turn (`stack = whole_stack_fixture(
    "fused_small")` at the top of a test file)."""

    @pytest.fixture(params=STACKS, scope="module")
    def stack(request: pytest.FixtureRequest) -> WholeStack:
        return WholeStack(request.param, family)

    return stack


def widths_id(value: Any) -> Any:
    """Test ids for widths tuples: (19, 45, 7) -> "19-45-7"."""
    return "-".join(map(str, value)) if isinstance(value, tuple) else value


class WholeMLPTests:
    """The tests fused_small and fused_decode share (tokamax's shared test base): a subclass in
    each file binds `family`, the module's `PUBLIC_NAMES`, its odd widths, and the cases below;
    the file's `stack` fixture (`whole_stack_fixture`) runs each on both stacks."""

    family: str = ""
    public_names: tuple[str, ...] = ()
    # Fresh random inputs at the golden files' odd shapes: the golden tests' jitted Pallas kernels
    # are reused (Pallas interpret compiles dominate these files' run time).
    golden_widths: tuple[int, ...] = golden.ODD_WIDTHS
    golden_m: int = golden.ODD_M
    odd_widths: tuple[int, ...] = ()
    nan_case: tuple[str, int, int, int] = ("float32", 5, 0, 0)  # dtype, M, NaN row and column
    twin_m: int = 1
    twin_cases: tuple[tuple[tuple[int, ...], str, str], ...] = ()  # (widths, activation, dtype)

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if metafunc.function.__name__ == "test_twins_bitwise":
            ids = ["-".join(map(str, (widths_id(w), a, d))) for w, a, d in self.twin_cases]
            metafunc.parametrize("widths, activation, dtype", self.twin_cases, ids=ids)

    @pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("activation", ACTIVATIONS)
    def test_activation_dtype_bias(self, stack, activation, dtype, bias):
        """Every activation x dtype x bias at the golden files' odd shapes (fresh inputs)."""
        seed = 7 * ACTIVATIONS.index(activation) + 3 * DTYPES.index(dtype) + bias
        stack.check(MLPSpec(self.golden_widths, activation, bias, dtype), self.golden_m, seed)

    def test_nan_propagates(self, stack):
        """A NaN in one row of x makes that row of y NaN (relu propagates NaN) and no other."""
        dtype, m, row, col = self.nan_case
        spec = MLPSpec(self.odd_widths, "relu", True, dtype)
        params = init_params(spec, seed=13)
        x = make_input(spec, m, seed=14)
        x[row, col] = np.nan
        out = stack.run(x, params, spec)
        assert np.isnan(out[row]).all() and not np.isnan(np.delete(out, row, axis=0)).any()
        assert_close(out, reference.forward(spec, x, params), spec)

    def test_twins_bitwise(self, widths, activation, dtype):
        """The same algorithm in both stacks: identical bits under the interpreters (fp32
        activations built on exp are the exception: each interpreter has its own exp,
        docs/cross_stack_cpu.md)."""
        spec = MLPSpec(widths, activation, True, dtype)
        params = init_params(spec, seed=31)
        x = make_input(spec, self.twin_m, seed=32)
        out_t, out_j = (WholeStack(name, self.family).run(x, params, spec) for name in STACKS)
        assert out_t.tobytes() == out_j.tobytes(), np.sum(out_t != out_j)

    def test_twin_contract(self):
        """The public names of both twins, the constants with the same values."""
        torch_mod, jax_mod = (
            importlib.import_module(f"fusedmlp.{name}_impl.{self.family}") for name in STACKS
        )
        for name in self.public_names:
            assert hasattr(torch_mod, name) and hasattr(jax_mod, name), name
            if name.isupper():
                assert getattr(torch_mod, name) == getattr(jax_mod, name), name


# ---- subprocess scripts: sm_90 compiles, lowering for CUDA ---------------------------------------
def run_script(script: str, *args: object, timeout: float = 600, cache: str = "inherit") -> Any:
    """Runs `script` in a fresh Python from the repository root, with real Triton functions
    (TRITON_INTERPRET=0: compile for sm_90, launch nothing) and JAX on the CPU, `args` as its
    argv; returns the JSON it prints after "RESULT". `cache`: Triton's cache dir as this process
    has it ("inherit"), unset ("unset": what a fresh shell has, as jax_triton's import tests
    want), or a new empty one ("cold": real compile times). A script that prints no result
    fails with the end of its stderr (the compiler's message)."""
    env = dict(os.environ, TRITON_INTERPRET="0", JAX_PLATFORMS="cpu")
    if cache != "inherit":
        env.pop("TRITON_CACHE_DIR", None)
    with tempfile.TemporaryDirectory() as cold:
        if cache == "cold":
            env["TRITON_CACHE_DIR"] = cold
        proc = subprocess.run(
            [sys.executable, "-c", script, *map(str, args)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            cwd=ROOT,
        )
    if "RESULT" not in proc.stdout:
        raise AssertionError(f"the script failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.split("RESULT", 1)[1])


def needs_jax_triton_wheel() -> Path:
    """The jax_triton wheel bench/fetch_wheels.sh puts in .wheels/; skips the calling test where
    it was not fetched."""
    wheels = sorted((ROOT / ".wheels").glob("jax_triton-*.whl"))
    if not wheels:
        pytest.skip("no jax_triton wheel in .wheels/: run bench/fetch_wheels.sh (needs network)")
    return wheels[-1]


def record_jax_triton_calls() -> list[dict[str, Any]]:
    """Puts a recorder in place of the CUDA plugin's Triton runtime (absent on a CPU) and returns
    the list it fills, one dict per kernel call jax_triton lowers (kernel name, PTX, grid,
    parameters): jax_triton's whole compile path (TTIR -> PTX with triton 3.6) runs without a
    GPU. For the subprocess scripts (`sys.path.insert(1, "tests")`), before the first lowering."""
    from jax._src.lib import gpu_triton

    calls: list[dict[str, Any]] = []

    class Kernel:
        def __init__(self, name, num_warps, num_ctas, smem, ptx, ttir, cc):
            self.name, self.ptx = name, ptx

    class KernelCall:
        def __init__(self, kernel, g0, g1, g2, params):
            calls.append(dict(kernel=kernel.name, ptx=kernel.ptx, grid=[g0, g1, g2], params=params))

        def to_proto(self, name, metadata):
            return b"stub"

    stub = dict(
        TritonKernel=Kernel,
        TritonKernelCall=KernelCall,
        TritonAutotunedKernelCall=None,
        create_array_parameter=lambda zeroed, align: ["array", align],
        create_scalar_parameter=lambda value, dtype: ["scalar", value, dtype],
        get_compute_capability=lambda device: 90,
        get_arch_details=lambda device: "sm_90",
        get_serialized_metadata=lambda b: b,
        get_custom_call=lambda: None,
    )
    for key, value in stub.items():
        setattr(gpu_triton, key, value)
    return calls


def torch_like_ptx(native: Any, plan: Any, dtype: str, num_warps: int, num_stages: int) -> str:
    """sm_90 PTX of a native Triton kernel specialised as the torch launcher specialises it for
    `plan` (a jax_impl.cross TritonLaunch): 16-byte aligned pointers of type `dtype` ("*bf16"),
    ints divisible by 16 marked so, 1 a constant."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs, constexprs = {}, {}, dict(plan.constexprs)
    for i, p in enumerate(native.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name], attrs[(i,)] = dtype, [["tt.divisibility", 16]]
        elif plan.scalars[p.name] == 1:
            sig[p.name], constexprs[p.name] = "constexpr", 1
        else:
            sig[p.name] = "i32"
            if plan.scalars[p.name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(
        ASTSource(native, sig, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=num_warps, num_stages=num_stages),
    )
    return compiled.asm["ptx"]


def lower_for_cuda(fn: Callable, *args: Any) -> str:
    """`jax.jit(fn)` traced on `args` (ShapeDtypeStructs) and lowered for CUDA on this CPU: the
    real lowering rules, stopped before any GPU compiler runs. Its StableHLO text."""
    import jax

    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def mosaic_gpu_call(fn: Callable, structs: list) -> Any:
    """`fn` traced on `structs`, lowered for CUDA on this CPU and inlined: the one Mosaic GPU call
    that as_torch_kernel's own module check (jax's private `_find_mgpu_call_in_module`, the same in
    0.10.2 and 0.11.2) finds in it, or its ValueError."""
    from jax._src.pallas.mosaic_gpu import torch as mgpu_torch

    from fusedmlp.torch_impl.cross import launcher

    module, _ = launcher.lowered_module(fn, structs, platforms=("cuda",))
    with module.context:
        return mgpu_torch._find_mgpu_call_in_module(module)[0]


def direct_launch_plan(fn: Callable, structs: list) -> Any:
    """`fn` traced on `structs`, lowered for CUDA on this CPU: torch's direct launcher's plan of
    it (`torch_impl.cross.launcher.plan_of`), None where the module is more than the bare call."""
    from fusedmlp.torch_impl.cross import launcher

    module, single = launcher.lowered_module(fn, structs, platforms=("cuda",))
    with module.context:
        return launcher.plan_of(module, single=single)


def needs_jax_0_10_lowering() -> None:
    """Skips the calling test unless jax is 0.10: lowering Pallas-Triton for CUDA without a GPU
    needs it (jax 0.11 asks for a GPU device description)."""
    import jax

    if not jax.__version__.startswith("0.10."):
        pytest.skip(
            f"lowering Pallas-Triton for CUDA without a GPU needs jax 0.10, got {jax.__version__}"
        )


def lower_whole_mlp(fwd: Callable, spec: MLPSpec, m: int, **kw) -> str:
    """A JAX whole-MLP launcher (`fused_small_fwd`, `fused_decode_fwd`) lowered for CUDA on the
    packed params' shapes and an [m, d_in] input, `interpret=False`."""
    import jax
    import jax.numpy as jnp

    from fusedmlp.common.packing import packed_names

    dt = jnp.dtype(spec.dtype)
    shapes = {k: jax.ShapeDtypeStruct(v, dt) for k, v in packed_names(spec).items()}
    x = jax.ShapeDtypeStruct((m, spec.d_in), dt)
    return lower_for_cuda(functools.partial(fwd, spec=spec, interpret=False, **kw), x, shapes)


# The CLI tests' tiny spec (test_harness.py, test_bench_backward.py, conftest's spec_file):
# odd widths and M keep the interpreted kernels honest and fast.
CLI_TINY_SPEC = {"widths": (13, 24, 11), "activation": "swiglu", "bias": True, "dtype": "float32"}


def one_point_table(spec: MLPSpec, ranking: tuple[str, str], m: int, phase: str = "forward") -> Any:
    """A torch dispatch table of one measured point at M: `ranking[0]` 1.25× faster than
    `ranking[1]` (training points name our path KERNELS). Install it with the `torch_table`
    fixture (conftest.py)."""
    from fusedmlp.common.dispatch import Point, Table, shape_class, weight_bytes

    ranked = ((ranking[0], 1.0), (ranking[1], 1.25))
    fields = (spec.dtype, shape_class(spec), m, weight_bytes(spec), ranked, "test point")
    if phase == "train":
        point = Point("torch", *fields, phase="train")
        return Table("Test GPU", "", (point,), train_source="test table")
    return Table("Test GPU", "", (Point("torch", *fields),))
