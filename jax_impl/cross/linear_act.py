"""linear_act from JAX: torch_impl/linear_act.py's Triton kernel on jax arrays (impl `jax_triton`).

    out[m, n] = act(Σ_k x[m, k]·W[k, n] + b[n]) + r[m, n]       (fp32 epilogue, one rounding)

Grid, tiles, masks: exactly the native launcher's (`fusedmlp.torch_impl.linear_act.linear_act_fwd`):
a 1-D grid of cdiv(M, BLOCK_M)·cdiv(N, BLOCK_N) programs in grouped order, the same constexprs and
the same TileConfig, so the two calls can be compared bit for bit and timed against each other
(bench/cross_overhead.py). GPU only: jax_triton compiles for the device; there is no interpreter.

How the call is made (`jax_triton.triton_call`, the route JAX recommends for Triton now that the
Pallas Triton backend is deprecated):
- jax_triton passes the output pointers *after* every input argument (arrays and scalars, in the
  order given). The native kernel takes `o_ptr` fifth, before M, N, K and the strides, so it
  is called through `_linear_act_fwd_jt`, a Triton function whose runtime parameters are in
  jax_triton's order and whose body is one call of the native kernel by keyword. Triton inlines
  the call: compiled for sm_90 on a CPU, the adapter and the native kernel give the same PTX
  instruction mix (tests/test_cross_stack_gpu.py). Should the native kernel ever take its output
  last, `kernel_for_jax_triton` calls it directly.
- jax_triton drops `None` arguments (they flatten to nothing), so an absent bias or residual gets a
  placeholder pointer (x), never read: HAS_BIAS / HAS_RESIDUAL are False.
- jax arrays are dense and row-major: the strides are (K, 1), (N, 1), (N, 1). Shapes are static
  per trace, so M, N, K and the strides go to jax_triton as *compile-time constants* (its
  metaparams), not as runtime scalars: jax_triton gives scalars no divisibility-by-16
  specialisation, and the kernel it compiled from runtime shapes had neither 16-byte vector loads
  nor a pipelined K loop — 31.9 ms against 5.4 ms for the same kernel launched from torch
  (llama3-8b, M=8192, H200; issue 23). With constants Triton knows every stride and alignment
  and makes the torch launch's loads (tests/test_cross_launch.py compares the PTX). The cost: one
  Triton compile per distinct shape, which jax.jit already implies. Only the pointers remain
  runtime arguments, and they lead the native kernel's parameter list with the output last, as
  jax_triton passes them, so the native kernel is called directly; the adapter below is the
  route for a kernel whose pointers are not in that order (runtime scalars, as before).
- `launch_plan` is the pure function that derives grid, positional arguments and constexprs; the
  CPU tests check it against what the native launcher passes to its kernel.

Imports: this module needs `triton` (the adapter is a Triton function) at import. It imports
`jax_triton` and the native kernel lazily, on the first call: the native kernel lives in
`fusedmlp.torch_impl`, whose import imports torch (runtime.py decides TRITON_INTERPRET) — the one
documented place where jax_impl reaches torch, because calling the *same* kernel is the point.
A missing package raises ImportError naming it and the wheel to carry (bench/fetch_wheels.sh).

Twin: torch_impl/cross/linear_act.py (the Mosaic GPU kernel called from torch), the other direction.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from fusedmlp.common.config import TileConfig

FAMILY = "linear_act"
IMPL = "jax_triton"
JAX_TRITON_VERSION = "0.3.1"  # checked against jax 0.11.2, triton 3.6.0 (docs/porting.md, part 3)
NATIVE_MODULE = "fusedmlp.torch_impl.linear_act"
NATIVE_KERNEL = "_linear_act_fwd_kernel"

# Bound on the first call (`native_kernel`): the adapter below resolves this global when Triton
# compiles it, which happens after the binding. Importing the native module here would import torch.
_linear_act_fwd_kernel: Any = None


# ==== forward kernel ==============================================================================
@triton.jit
def _linear_act_fwd_jt(
    x_ptr, w_ptr, b_ptr, r_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_rm, stride_rn, stride_om, stride_on,
    o_ptr,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # jax_triton's argument order (outputs last) -> the native kernel's, by name; inlined by Triton.
    _linear_act_fwd_kernel(
        x_ptr=x_ptr, w_ptr=w_ptr, b_ptr=b_ptr, r_ptr=r_ptr, o_ptr=o_ptr, M=M, N=N, K=K,
        stride_xm=stride_xm, stride_xk=stride_xk, stride_wk=stride_wk, stride_wn=stride_wn,
        stride_rm=stride_rm, stride_rn=stride_rn, stride_om=stride_om, stride_on=stride_on,
        ACTIVATION=ACTIVATION, HAS_BIAS=HAS_BIAS, HAS_RESIDUAL=HAS_RESIDUAL,
        INPUT_PRECISION=INPUT_PRECISION, INTERPRET=INTERPRET,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M,
    )  # fmt: skip


# ==== lazy imports ================================================================================
def import_jax_triton() -> ModuleType:
    """`jax_triton`, imported without its side effect on Triton's cache.

    jax_triton 0.3.1 sets TRITON_CACHE_DIR="" at import; Triton 3.6 then raises "Could not create
    or locate cache dir" on every later `triton.compile` in the process — torch's own Triton kernels
    and Triton's CUDA launcher stub included. jax_triton compiles without that cache (it calls the
    backend stages itself), so the variable is put back as it was.
    """
    before = os.environ.get("TRITON_CACHE_DIR")
    try:
        module = importlib.import_module("jax_triton")
    except ImportError as err:
        raise ImportError(
            f"impl {IMPL!r} needs the jax_triton package (jax-triton=={JAX_TRITON_VERSION}), which "
            f"failed to import: {err}. The GPU image lacks it: carry the wheel from "
            'bench/fetch_wheels.sh (`carry: [".wheels"]`) and `pip install --no-deps '
            ".wheels/jax_triton-*.whl`; it also needs jax with the CUDA plugin (a GPU)."
        ) from err
    finally:
        if before is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = before
    return module


def import_native(module_name: str, kernel_name: str, *, require_compiled: bool = True) -> Any:
    """The native Triton kernel from torch_impl (imports torch), checked to be compilable
    (`require_compiled=False` accepts the interpreter's function: the CPU tests run the adapter)."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(
            f"impl {IMPL!r} calls the Triton kernels of {module_name}, whose import needs torch "
            f"(fusedmlp.torch_impl imports it): {err}"
        ) from err
    kernel = getattr(module, kernel_name)
    if require_compiled and not isinstance(kernel, triton.runtime.JITFunction):
        raise RuntimeError(
            f"impl {IMPL!r}: {module_name}.{kernel_name} is a {type(kernel).__name__}, not a "
            "compilable triton JITFunction: TRITON_INTERPRET=1 was set when it was defined (torch "
            "found no CUDA GPU, or the environment set it); unset it on the GPU machine"
        )
    return kernel


def native_kernel(*, require_compiled: bool = True) -> Any:
    """torch_impl's `_linear_act_fwd_kernel`, bound for the adapter on the first call."""
    global _linear_act_fwd_kernel
    if _linear_act_fwd_kernel is None:
        _linear_act_fwd_kernel = import_native(
            NATIVE_MODULE, NATIVE_KERNEL, require_compiled=require_compiled
        )
    return _linear_act_fwd_kernel


def runtime_params(kernel: Any) -> tuple[str, ...]:
    """Names of a Triton function's runtime (non-constexpr) parameters, in order. Read from the
    Python signature, so it works for the compiled and the interpreted function alike (annotations
    may be strings under `from __future__ import annotations`)."""
    fn = getattr(kernel, "fn", kernel)
    params = inspect.signature(fn).parameters.values()
    return tuple(p.name for p in params if "constexpr" not in str(p.annotation))


def param_names(kernel: Any) -> tuple[str, ...]:
    """Names of all of a Triton function's parameters, in order (constexprs included)."""
    return tuple(inspect.signature(getattr(kernel, "fn", kernel)).parameters)


def takes_constant_shapes(kernel: Any, constants: Any, outputs: tuple[str, ...]) -> bool:
    """True where jax_triton can call `kernel` with `constants` as compile-time constants: its
    other runtime parameters lead its parameter list (jax_triton names positional arguments by
    position) and end with the outputs (jax_triton passes them last)."""
    runtime = tuple(p for p in runtime_params(kernel) if p not in constants)
    return runtime == param_names(kernel)[: len(runtime)] and runtime[-len(outputs) :] == outputs


def kernel_for_jax_triton(
    native: Any, adapter: Any, outputs: tuple[str, ...], constants: Any = ()
) -> Any:
    """`native` if jax_triton can call it: with `constants` passed as compile-time constants
    (`takes_constant_shapes`), or with its runtime parameters already ending with `outputs`;
    else `adapter` (jax_triton's order: outputs after every runtime scalar)."""
    if constants and takes_constant_shapes(native, constants, outputs):
        return native
    names = runtime_params(native)
    return native if names[-len(outputs) :] == outputs else adapter


# ==== launch plan (pure) ==========================================================================
@dataclasses.dataclass(frozen=True)
class TritonLaunch:
    """One kernel launch: grid, runtime arguments by parameter name, constexprs, warps and stages.

    `arrays` maps each pointer parameter to the name of the operand it reads ("x", "w", ...), so
    the plan stays free of arrays and can be compared with any launcher's choice.
    """

    grid: tuple[int, ...]
    arrays: dict[str, str]
    scalars: dict[str, int]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    outputs: tuple[str, ...] = ("o_ptr",)

    def positional(self, params: tuple[str, ...], operands: dict[str, Any]) -> list[Any]:
        """Runtime arguments in the order of `params`, outputs left out (jax_triton adds them)."""
        out = []
        for name in params:
            if name in self.outputs:
                continue
            out.append(operands[self.arrays[name]] if name in self.arrays else self.scalars[name])
        return out


def input_precision(fp32_precision: str) -> str:
    """tl.dot's input_precision for the contract's fp32_precision (as the native launcher)."""
    return "tf32" if fp32_precision == "tf32" else "ieee"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def launch_plan(
    m: int,
    n: int,
    k: int,
    *,
    activation: str,
    has_bias: bool,
    has_residual: bool,
    config: TileConfig,
    fp32_precision: str = "ieee",
    interpret: bool = False,
) -> TritonLaunch:
    """The native launcher's launch of `_linear_act_fwd_kernel` for dense row-major operands.

    `interpret` is the kernels' interpreter flag (False on a GPU; the CPU tests run the adapter
    interpreted with True). Absent bias/residual read the placeholder "x" (never loaded).
    """
    # The residual strides are the output's when there is none (the native placeholder).
    return tile_launch(
        m,
        n,
        k,
        config,
        arrays={
            "x_ptr": "x",
            "w_ptr": "w",
            "b_ptr": "b" if has_bias else "x",
            "r_ptr": "residual" if has_residual else "x",
        },
        strides=dict(
            stride_xm=k,
            stride_xk=1,
            stride_wk=n,
            stride_wn=1,
            stride_rm=n,
            stride_rn=1,
            stride_om=n,
            stride_on=1,
        ),
        flags=dict(ACTIVATION=activation, HAS_BIAS=has_bias, HAS_RESIDUAL=has_residual),
        fp32_precision=fp32_precision,
        interpret=interpret,
    )


def tile_launch(
    m: int,
    n: int,
    k: int,
    config: TileConfig,
    *,
    arrays: dict[str, str],
    strides: dict[str, int],
    flags: dict[str, Any],
    fp32_precision: str,
    interpret: bool,
) -> TritonLaunch:
    """What the portable launchers (linear_act, gated) share: one program per BLOCK_M × BLOCK_N
    tile of the [m, n] output, the scalars M, N, K then `strides`, the constexprs `flags` (the
    activation and HAS_* switches, in the kernel's order) then precision, interpreter and tiles."""
    return TritonLaunch(
        grid=(cdiv(m, config.block_m) * cdiv(n, config.block_n),),
        arrays=arrays,
        scalars=dict(M=m, N=n, K=k, **strides),
        constexprs=dict(
            **flags,
            INPUT_PRECISION=input_precision(fp32_precision),
            INTERPRET=interpret,
            BLOCK_M=config.block_m,
            BLOCK_N=config.block_n,
            BLOCK_K=config.block_k,
            GROUP_M=config.group_m,
        ),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def call(
    plan: TritonLaunch,
    kernel: Any,
    operands: dict[str, jax.Array],
    out: jax.ShapeDtypeStruct,
    *,
    name: str,
) -> jax.Array:
    """`jax_triton.triton_call` of `kernel` with `plan` (traceable: works inside jax.jit).

    Shapes and strides are compile-time constants wherever the kernel's parameter order allows
    (`takes_constant_shapes`: the module docstring says why); otherwise runtime scalars."""
    jt = import_jax_triton()
    if takes_constant_shapes(kernel, plan.scalars, plan.outputs):
        runtime = [p for p in runtime_params(kernel) if p not in plan.scalars]
        args = [operands[plan.arrays[p]] for p in runtime if p not in plan.outputs]
        constants = {**plan.scalars, **plan.constexprs}
    else:
        args = plan.positional(runtime_params(kernel), operands)
        constants = dict(plan.constexprs)
    return jt.triton_call(
        *args,
        kernel=kernel,
        out_shape=out,
        grid=plan.grid,
        name=name,
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
        **constants,
    )


# ==== launcher ====================================================================================
def linear_act_fwd(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None,
    residual: jax.Array | None,
    *,
    activation: str,
    config: TileConfig,
    fp32_precision: str = "ieee",
) -> jax.Array:
    """act(x @ w + b) (+ residual) for 2-D x [M, K], w [K, N]; returns [M, N] in x.dtype.

    The native Triton kernel through jax_triton (GPU only). Trusts its inputs (the front checked).
    """
    m, k = x.shape
    n = w.shape[1]
    if m == 0 or n == 0:
        return jnp.zeros((m, n), x.dtype)
    plan = launch_plan(
        m,
        n,
        k,
        activation=activation,
        has_bias=b is not None,
        has_residual=residual is not None,
        config=config,
        fp32_precision=fp32_precision,
    )
    kernel = kernel_for_jax_triton(native_kernel(), _linear_act_fwd_jt, ("o_ptr",), plan.scalars)
    operands = {"x": x, "w": w, "b": b, "residual": residual}
    out = jax.ShapeDtypeStruct((m, n), x.dtype)
    return call(plan, kernel, operands, out, name="linear_act_fwd")
