"""The Pallas-Triton kernels lower for CUDA on a CPU machine, for every activation and dtype.

The interpreters evaluate jax primitives through XLA on the CPU, so they accept what a GPU lowering
rejects: `erf` has no Pallas-Triton lowering rule (and no Mosaic GPU layout rule in jax 0.11), which
no interpreted test could see. `jit(...).trace(...).lower(lowering_platforms=("cuda",))` runs the
real Pallas-Triton lowering without a GPU (it stops before Triton compiles), so these tests catch
such kernels on every CI run (under jax 0.10.2: jax 0.11 asks for a GPU device description for
this lowering). The Mosaic GPU kernels have the same check, under both versions, in
test_pallas_mosaic.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from fusedmlp.common import DTYPES, KERNEL_ACTIVATIONS, MLPSpec, TileConfig
from fusedmlp.common.packing import packed_names, packed_width
from fusedmlp.common.tiling import heuristic_config
from fusedmlp.jax_impl import fused_decode, fused_small, gated, linear_act

S = jax.ShapeDtypeStruct
M, K, N = 300, 200, 136  # ragged against every block; large enough for the GPU default tiles


def _lower(fn, *shapes) -> str:
    return jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", KERNEL_ACTIVATIONS)
def test_per_layer_kernels_lower_for_cuda(activation, dtype):
    dt = jnp.dtype(dtype)
    precision = "tf32" if dtype == "float32" else "ieee"
    cfg = heuristic_config("linear_act", M, N, K, dtype)
    text = _lower(
        functools.partial(
            linear_act.linear_act_fwd,
            activation=activation,
            config=cfg,
            fp32_precision=precision,
            interpret=False,
        ),
        S((M, K), dt),
        S((K, N), dt),
        S((N,), dt),
        S((M, N), dt),
    )
    assert "triton" in text.lower()
    if activation == "identity":
        return
    cfg = heuristic_config("gated", M, N, K, dtype)
    width = packed_width(N)  # the packed W|V operand (N = 136: three 64-column block pairs)
    _lower(
        functools.partial(
            gated.gated_fwd,
            n=N,
            activation=activation,
            config=cfg,
            fp32_precision=precision,
            interpret=False,
        ),
        S((M, K), dt),
        S((K, width), dt),
        S((width,), dt),
    )
    # The packed tile at the other output widths: 64 (one block pair) and 128 (two).
    for block_n in (64, 128):
        narrow = TileConfig(64, block_n, 32, group_m=8, num_warps=4, num_stages=2)
        _lower(
            functools.partial(
                gated.gated_fwd,
                n=N,
                activation=activation,
                config=narrow,
                fp32_precision=precision,
                interpret=False,
            ),
            S((M, K), dt),
            S((K, width), dt),
            None,
        )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu"])
def test_whole_mlp_kernels_lower_for_cuda(activation, dtype):
    dt = jnp.dtype(dtype)
    for module, name, spec, m in (
        (fused_small, "fused_small_fwd", MLPSpec((45, 64, 33, 17), activation, True, dtype), 300),
        (fused_decode, "fused_decode_fwd", MLPSpec((200, 300, 136), activation, True, dtype), 16),
    ):
        shapes = {k: S(v, dt) for k, v in packed_names(spec).items()}  # the packed layout
        fn = functools.partial(getattr(module, name), spec=spec, interpret=False)
        _lower(lambda x, p, fn=fn: fn(x, p), S((m, spec.d_in), dt), shapes)
