"""A Mosaic GPU kernel launched from torch directly: the one Mosaic GPU call of a traced JAX
function, compiled once by the CUDA plugin, launched per call on the caller's current stream with
the operands' pointers.

Why: `plgpu.as_torch_kernel`'s compiled callable re-checks the arguments' tree, shapes and dtypes
(through `jnp.dtype`), rebuilds its argument environment, allocates its outputs on
`torch.device("cuda")` and asks torch for that device's default stream — each through torch's
device-availability checks — at every call: about a third of an eager hf-blog-geglu training
step's host time on an H100 (five launches; bench/results/2026-12-06-h100-8e0353e, call 5), and
the reason the forward of gpt2-mlp at M = 4096 issued at 126 µs a call against 62 µs of kernels.
What is left per call here: one `torch.empty` per output, the pointers into a ctypes array and
the plugin's launch function (which builds the kernel's TMA descriptors).

What it takes (`plan_of`): a module whose main function is the Mosaic GPU call alone, each of
its operands one of the function's arguments and each returned value one of its results (an
output may alias an operand: it is that operand). as_torch_kernel also evaluates allocations and
constants per call; none of our traced functions has one, and a module that does is not planned
— the caller keeps as_torch_kernel's own callable (`cross/linear_act._compile`).

The same C entry points as_torch_kernel uses (`MosaicGpuCompile`, `MosaicGpuUnload` of the CUDA
plugin; jax's `mosaic/gpu/core._compile_as_torch_gpu_kernel`), called with the stream the caller
gives: the current stream, so no fence against it is needed (as_torch_kernel launches on the
default stream), and a CUDA graph capture records the launch — the kernel's TMA descriptors,
built on the host at each launch, travel by value among its parameters (jax's
`launch_context.Scratch`). GPU only to run; the module check runs on a CPU on a module lowered
for CUDA (tests/test_cross_stack_cpu.py, tests/test_cross_backward.py), the launch's pointer
order with a stand-in (tests/test_cross_launch.py).
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

CALL_TARGET = "mosaic_gpu_v2"
# backend_config flags that ask XLA for more than the buffers (a barrier it provides, collective
# metadata): a launch with the buffers alone would not give them, so such a module is not planned
UNPLANNED_FLAGS = ("use_custom_barrier", "uses_xla_collective_metadata")
_TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class Output:
    """One result of the kernel: its shape and dtype, and the function argument it is (an
    aliased output) or None (a fresh tensor)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    alias: int | None = None


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """What a launch needs from the lowered module: the Mosaic GPU module's bytes (the plugin
    compiles them), which function argument each kernel operand is (`operand_order`), the kernel's
    results (`outputs`, in its order) and which of them the function returns, in its order
    (`returned`)."""

    module_asm: bytes
    operand_order: tuple[int, ...]
    outputs: tuple[Output, ...]
    returned: tuple[int, ...]
    single: bool  # the function returns one array (not a tuple)


def lowered_module(fn: Any, structs: Sequence[Any], *, platforms: tuple[str, ...] | None = None):
    """`fn` traced on `structs` (ShapeDtypeStructs), lowered (for `platforms`: ("cuda",) lowers
    on a CPU) and inlined — jax.jit outlines its bodies; the Mosaic GPU call must be in main.
    Returns (module, single): `single` when fn returns one array."""
    import jax
    import jax.experimental.mosaic.gpu as mgpu
    from jax._src.lib.mlir import passmanager

    traced = jax.jit(fn).trace(*structs)
    lowered = traced.lower(lowering_platforms=platforms) if platforms else traced.lower()
    module = lowered.compiler_ir()
    with module.context:
        mgpu.dialect.register_inliner_extensions(module.context)
        passmanager.PassManager.parse("builtin.module(inline{default-pipeline=})").run(
            module.operation
        )
    return module, not isinstance(traced.out_info, (tuple, list))


def plan_of(module: Any, *, single: bool) -> KernelPlan | None:
    """The launch plan of a lowered, inlined module, or None where it is more than the bare
    Mosaic GPU call of the function's arguments (see the module docstring)."""
    from jax._src.lib.mlir.dialects import hlo

    mains = [
        op
        for op in module.body.operations
        if op.operation.name == "func.func" and op.attributes["sym_name"].value == "main"
    ]
    if len(mains) != 1:
        return None
    block = mains[0].regions[0].blocks[0]
    ops = list(block.operations)
    if [op.operation.name for op in ops] != ["stablehlo.custom_call", "func.return"]:
        return None
    call, ret = ops
    if call.call_target_name.value != CALL_TARGET:
        return None
    # each kernel operand a function argument (the grouped launch interleaves its products'),
    # each returned value a kernel result
    order = _positions(list(call.operands), list(block.arguments))
    results = list(call.results)
    returned = _positions(list(ret.operands), results)
    if order is None or returned is None:
        return None
    config = call.attributes["mhlo.backend_config"]
    if any(name in config and bool(config[name].value) for name in UNPLANNED_FLAGS):
        return None
    aliases: dict[int, int] = {}
    for attr in call.output_operand_aliases or []:
        alias = hlo.OutputOperandAlias(attr)
        if alias.operand_tuple_indices or len(alias.output_tuple_indices) > 1:
            return None
        [index] = alias.output_tuple_indices or (0,)
        aliases[index] = order[alias.operand_index]
    outputs = []
    for i, result in enumerate(results):
        dtype = _TORCH_DTYPES.get(str(result.type.element_type))
        if dtype is None:
            return None
        outputs.append(Output(tuple(result.type.shape), dtype, aliases.get(i)))
    return KernelPlan(config["module"].value_bytes, order, tuple(outputs), returned, single)


def _positions(values: list[Any], among: list[Any]) -> tuple[int, ...] | None:
    """The index in `among` of each of `values` (MLIR values compare by identity), or None where
    one is not there."""
    found = []
    for value in values:
        hits = [i for i, other in enumerate(among) if other == value]
        if not hits:
            return None
        found.append(hits[0])
    return tuple(found)


def _plugin_library() -> ctypes.CDLL:
    """The CUDA plugin's shared library, where jax's Mosaic GPU compiler lives (the process
    itself where jaxlib links it in)."""
    for name in ("jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12"):
        try:
            plugin = importlib.import_module(name)
        except ImportError:
            continue
        return ctypes.CDLL(plugin._get_library_path())
    return ctypes.CDLL(None)


# launch(function, stream, pointers): the plugin's host function that launches a compiled kernel
_LAUNCH_FN = ctypes.CFUNCTYPE(
    None, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)
)


class DirectKernel:
    """A compiled Mosaic GPU kernel; `kernel(*operands, stream=handle)` launches it on the raw
    CUDA stream `handle` and returns what the traced function returns (one tensor, or a tuple).
    Operands must be dense and on the device whose context was current when it was compiled;
    shapes and dtypes are the plan's (cross/linear_act.compiled_kernel keys its cache on them).
    `function` and `launch`: the plugin's compiled kernel and its host launch function, called
    as launch(function, stream, pointers) with the kernel operands' then the outputs' pointers."""

    def __init__(self, plan: KernelPlan, function: Any, launch: Callable[..., None]) -> None:
        self._plan, self._function, self._launch = plan, function, launch
        self._pointers = ctypes.c_void_p * (len(plan.operand_order) + len(plan.outputs))

    def __call__(self, *operands: torch.Tensor, stream: int) -> Any:
        plan, device = self._plan, operands[0].device
        outs = [
            operands[o.alias]
            if o.alias is not None
            else torch.empty(o.shape, dtype=o.dtype, device=device)
            for o in plan.outputs
        ]
        pointers = self._pointers(
            *[operands[i].data_ptr() for i in plan.operand_order], *[t.data_ptr() for t in outs]
        )
        self._launch(self._function, stream, pointers)
        if plan.single:
            return outs[plan.returned[0]]
        return tuple(outs[i] for i in plan.returned)


def compile_direct(fn: Any, structs: Sequence[Any]) -> DirectKernel | None:
    """`fn` on `structs` as a DirectKernel — its module compiled by the CUDA plugin and loaded
    into torch's (primary) context, unloaded when the kernel is dropped — or None where the
    module is not plannable."""
    module, single = lowered_module(fn, structs)
    with module.context:
        plan = plan_of(module, single=single)
    if plan is None:
        return None
    torch.cuda.init()
    library = _plugin_library()
    compile_module = library.MosaicGpuCompile
    compile_module.argtypes = [ctypes.c_char_p, ctypes.c_int]
    compile_module.restype = ctypes.POINTER(ctypes.c_void_p)
    unload = library.MosaicGpuUnload
    unload.argtypes = [compile_module.restype]
    unload.restype = None
    compiled = compile_module(plan.module_asm, len(plan.module_asm))
    if not compiled:
        raise RuntimeError("the CUDA plugin's MosaicGpuCompile failed on the kernel's module")
    kernel = DirectKernel(plan, compiled[0], _LAUNCH_FN(compiled[1]))
    # unloaded when dropped (the route's cache starts afresh past its bound), not at exit: the
    # CUDA context may be gone by then
    weakref.finalize(kernel, unload, compiled).atexit = False
    return kernel
