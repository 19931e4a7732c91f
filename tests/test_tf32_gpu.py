"""float32 "tf32" products on the GPU (`-m gpu`): each stack's portable and Hopper paths against
the float64 reference, the framework's own tf32 baseline (torch eager, XLA) as the 2× rule's.

The interpreters compute a tf32 product exactly unless the kernel rounds its operands itself, so
only a GPU shows how the tensor cores take 32-bit operands. Found on an H100 (2026-12-07,
docs/performance.md, forty-first session): torch's `triton` and `triton_tma` at ~4.5× eager's
error at K ≥ 768, failing the 2× rule, while jax's `pallas_triton` matched XLA — as if wgmma
truncated operands to tf32 where cuBLAS rounds them. The kernels now round every tf32 operand to
nearest themselves (torch_impl/tf32.py, jax_impl/tf32.py); these cases check that on the GPU, at
hf-blog-geglu's shape (768→3072→768): through the front (the TMA kernels' operands rounded in
memory: the weights once, x a call, the hidden layer at its store) and through the TMA launcher
with operands it must round in registers. First run on an H100 at 2d92464
(bench/results/2026-12-07-h100-2d92464-tf32/): the front's cases and `pallas_triton` passed.
"""

from __future__ import annotations

import pytest

from fusedmlp.common import MLPSpec, reference
from fusedmlp.common.params import init_params, make_input
from fusedmlp.common.tolerance import assert_close
from helpers import to_numpy, to_torch

SPEC = MLPSpec.preset("hf-blog-geglu").replace(dtype="float32", fp32_precision="tf32")
M = 512


def _problem():
    x, params = make_input(SPEC, M, seed=4101), init_params(SPEC, seed=4102)
    return x, params, reference.forward(SPEC, x, params)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "triton_tma"])
def test_torch_tf32_as_accurate_as_cublas(impl: str) -> None:
    from fusedmlp.torch_impl import mlp

    x, params, ref = _problem()
    xt = to_torch(x, "cuda")
    pt = {k: to_torch(v, "cuda") for k, v in params.items()}
    baseline = to_numpy(mlp(xt, pt, SPEC, impl="eager"))
    assert_close(to_numpy(mlp(xt, pt, SPEC, impl=impl)), ref, SPEC, baseline=baseline, what=impl)


@pytest.mark.gpu
def test_tma_launcher_rounds_an_unrounded_weight() -> None:
    # tf32_operands_exact off (the default): the kernel rounds x and W in registers (slower)
    import torch

    from fusedmlp.torch_impl import mlp
    from fusedmlp.torch_impl.tma.linear_act import linear_act

    _, params, _ = _problem()
    spec = MLPSpec(SPEC.widths[1:], "relu", SPEC.bias, "float32", "tf32")  # the down projection
    plain = {f"{k[0]}0": to_torch(v, "cuda") for k, v in params.items() if k in ("w1", "b1")}
    h = torch.randn(M, spec.d_in, device="cuda", generator=torch.Generator("cuda").manual_seed(5))
    ref = reference.forward(spec, to_numpy(h), {k: to_numpy(v) for k, v in plain.items()})
    baseline = to_numpy(mlp(h, plain, spec, impl="eager"))
    got = linear_act(h, plain["w0"], plain.get("b0"), fp32_precision="tf32")  # last layer: no act
    assert_close(to_numpy(got), ref, spec, baseline=baseline, what="tma linear_act, W unrounded")


@pytest.mark.gpu
def test_jax_tf32_as_accurate_as_xla() -> None:
    import jax.numpy as jnp

    from fusedmlp.jax_impl import mlp

    x, params, ref = _problem()
    xj = jnp.asarray(x)
    pj = {k: jnp.asarray(v) for k, v in params.items()}
    baseline = to_numpy(mlp(xj, pj, SPEC, impl="xla"))
    y = to_numpy(mlp(xj, pj, SPEC, impl="pallas_triton"))
    assert_close(y, ref, SPEC, baseline=baseline, what="pallas_triton")
