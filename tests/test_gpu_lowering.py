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
from fusedmlp.common.packing import packed_width
from fusedmlp.common.tiling import heuristic_config
from fusedmlp.jax_impl import fused_decode, fused_small, gated, linear_act
from helpers import lower_for_cuda, lower_whole_mlp

S = jax.ShapeDtypeStruct
M, K, N = 300, 200, 136  # ragged against every block; large enough for the GPU default tiles


def _lower_gated(activation: str, dt, precision: str, config: TileConfig, bias: bool) -> str:
    """The packed gated launcher (N = 136: three 64-column block pairs in W|V) lowered for CUDA."""
    width = packed_width(N)
    fwd = functools.partial(
        gated.gated_fwd,
        n=N,
        activation=activation,
        config=config,
        fp32_precision=precision,
        interpret=False,
    )
    bc = S((width,), dt) if bias else None
    return lower_for_cuda(fwd, S((M, K), dt), S((K, width), dt), bc)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", KERNEL_ACTIVATIONS)
def test_per_layer_kernels_lower_for_cuda(activation, dtype):
    dt = jnp.dtype(dtype)
    precision = "tf32" if dtype == "float32" else "ieee"
    fwd = functools.partial(
        linear_act.linear_act_fwd,
        activation=activation,
        config=heuristic_config("linear_act", M, N, K, dtype),
        fp32_precision=precision,
        interpret=False,
    )
    text = lower_for_cuda(fwd, S((M, K), dt), S((K, N), dt), S((N,), dt), S((M, N), dt))
    assert "triton" in text.lower()
    if activation == "identity":
        return
    _lower_gated(activation, dt, precision, heuristic_config("gated", M, N, K, dtype), True)
    # The packed tile at the other output widths: 64 (one block pair) and 128 (two).
    for block_n in (64, 128):
        narrow = TileConfig(64, block_n, 32, group_m=8, num_warps=4, num_stages=2)
        _lower_gated(activation, dt, precision, narrow, False)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu"])
def test_whole_mlp_kernels_lower_for_cuda(activation, dtype):
    lower_whole_mlp(
        fused_small.fused_small_fwd, MLPSpec((45, 64, 33, 17), activation, True, dtype), 300
    )
    lower_whole_mlp(
        fused_decode.fused_decode_fwd, MLPSpec((200, 300, 136), activation, True, dtype), 16
    )
