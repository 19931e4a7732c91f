"""The torch Hopper backward's grouped weight gradients: `tma.linear_act.linear_grouped` (several
products sharing K in one persistent launch) and the rule that sends a training step to it
(`tma.backward.grouped_config`) — the twins of jax_impl/mosaic/linear_act.py's `linear_grouped`
and mosaic/backward.py's `grouped_config` (tests/test_mosaic_backward.py).

On the CPU the kernel runs under Triton's interpreter with 3 persistent programs, so each walks
tiles of several products. Every product must come out bit for bit as `linear_act_fwd` computes it
alone on the same tiles (the same K steps into the same fp32 accumulator) and within the tolerance
policy of its float64 product. Outputs are poisoned (conftest.py: NaN-filled allocations).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusedmlp.common.config import TileConfig
from fusedmlp.common.tiling import GROUPED_KIND
from fusedmlp.common.tolerance import assert_close
from fusedmlp.torch_impl.runtime import INTERPRET
from fusedmlp.torch_impl.tma import backward as hopper
from fusedmlp.torch_impl.tma import linear_act as tma_linear
from helpers import layer_spec, to_numpy

DEVICE = "cpu" if INTERPRET else "cuda"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Tiny tiles: the products below have 6, 6 and 20 tiles, 32 in all over 3 programs.
TILES = TileConfig(16, 32, 16, group_m=2, num_warps=4, num_stages=2)
K = 72  # 4.5 K steps: the ragged tail zero-filled by TMA
DIMS = [(40, 56), (24, 88), (72, 128)]  # (M, N) of each product: rows of 16-bit M-major x align

pytestmark = pytest.mark.filterwarnings(
    "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning"
)


def _operands(dtype: str, x_mmajor: bool, w_kmajor: bool, seed: int = 0):
    """Each product's x [M, K] and w [K, N], as views of transposed buffers where asked (the
    backward's hᵀ: h stored [K, M]; a K-major w: stored [N, K])."""
    gen = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    xs, ws = [], []
    for m, n in DIMS:
        x = torch.randn((K, m) if x_mmajor else (m, K), generator=gen).to(DEVICE, dt)
        w = (torch.randn((n, K) if w_kmajor else (K, n), generator=gen) * K**-0.5).to(DEVICE, dt)
        xs.append(x.t() if x_mmajor else x)
        ws.append(w.t() if w_kmajor else w)
    return xs, ws


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("x_mmajor,w_kmajor", [(True, False), (False, True)], ids=["hT", "wT"])
def test_grouped_products_are_the_separate_ones(dtype: str, x_mmajor: bool, w_kmajor: bool):
    xs, ws = _operands(dtype, x_mmajor, w_kmajor)
    outs = tma_linear.linear_grouped(xs, ws, config=TILES)
    for (m, n), x, w, y in zip(DIMS, xs, ws, outs, strict=True):
        assert y.shape == (m, n) and y.dtype == x.dtype
        alone = tma_linear.linear_act_fwd(x, w, None, None, activation="identity", config=TILES)
        assert torch.equal(y, alone), (m, n)
        want = to_numpy(x).astype(np.float64) @ to_numpy(w).astype(np.float64)
        assert_close(to_numpy(y), want, layer_spec(dtype), what=f"{dtype} product {(m, n)}")


def test_mixed_layouts_and_empty_products():
    # one M-major x beside a row-major one (each product's layout is its own constexpr), an
    # empty product (M = 0) and one of N = 0 between them: zeros without tiles, the rest as alone
    xs, ws = _operands("bfloat16", True, False, seed=1)
    xs[1] = xs[1].contiguous()
    empty_x = torch.empty((0, K), dtype=torch.bfloat16, device=DEVICE)
    no_cols = torch.empty((K, 0), dtype=torch.bfloat16, device=DEVICE)
    outs = tma_linear.linear_grouped(
        [xs[0], empty_x, xs[1], xs[2], xs[2]], [ws[0], ws[0], ws[1], no_cols, ws[2]], config=TILES
    )
    assert outs[1].shape == (0, DIMS[0][1]) and outs[3].shape == (DIMS[2][0], 0)
    for y, x, w in ((outs[0], xs[0], ws[0]), (outs[2], xs[1], ws[1]), (outs[4], xs[2], ws[2])):
        alone = tma_linear.linear_act_fwd(x, w, None, None, activation="identity", config=TILES)
        assert torch.equal(y, alone)
    # an empty contraction: every product is zeros (the poisoned outputs are overwritten)
    zs = tma_linear.linear_grouped([x[:, :0] for x in xs], [w[:0] for w in ws], config=TILES)
    for z, (m, n) in zip(zs, DIMS, strict=True):
        assert z.shape == (m, n) and bool((z == 0).all())


def test_nan_stays_in_its_product():
    # A NaN in one x row: that row of its product is NaN and no other element of any product
    xs, ws = _operands("bfloat16", True, False, seed=2)
    h = xs[1].t().clone()
    h[5, 3] = float("nan")  # x row 3 of product 1 (h stored [K, M])
    xs[1] = h.t()
    outs = tma_linear.linear_grouped(xs, ws, config=TILES)
    bad = torch.isnan(outs[1].float())
    assert bad[3].all() and not bad[torch.arange(DIMS[1][0]) != 3].any()
    assert not any(torch.isnan(y.float()).any() for y in (outs[0], outs[2]))


@pytest.mark.parametrize(
    "xs_shapes,ws_shapes,dtypes,match",
    [
        ([(8, 16)], [(24, 8)], ["bfloat16"] * 2, "one K and one dtype"),
        ([(8, 16), (8, 24)], [(16, 8), (24, 8)], ["bfloat16"] * 4, "one K and one dtype"),
        ([(8, 16)], [(16, 8)], ["bfloat16", "float16"], "one K and one dtype"),
        ([], [], [], "at least one"),
        ([(8, 16)], [(16, 8), (16, 8)], ["bfloat16"] * 3, "at least one"),
    ],
)
def test_grouped_refuses_what_it_cannot_group(xs_shapes, ws_shapes, dtypes, match):
    shapes = [*xs_shapes, *ws_shapes]
    tensors = [torch.zeros(s, dtype=DTYPES[d]) for s, d in zip(shapes, dtypes, strict=False)]
    xs, ws = tensors[: len(xs_shapes)], tensors[len(xs_shapes) :]
    with pytest.raises(ValueError, match=match):
        tma_linear.linear_grouped(xs, ws, config=TILES)


def test_grouped_config_takes_only_what_was_measured_faster(monkeypatch):
    """Taken where the committed sweep measured the grouped launch faster than the products
    apart, for these products in this order at the nearest K bucket; never for float32 or under
    the interpreter."""
    fast = TileConfig(128, 256, 64, group_m=8, num_warps=8, num_stages=4, epilogue_subtile=2)
    slow = TileConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=4, epilogue_subtile=2)
    products = [[3072, 768], [768, 6144]]
    entries = [(8192, fast, 160.0, 215.0), (1024, slow, 30.0, 29.0)]  # (K, tiles, us, apart)
    table = {
        GROUPED_KIND: [
            {"products": products, "k": k, "config": c.to_dict(), "us": us, "apart_us": apart}
            for k, c, us, apart in entries
        ]
    }
    monkeypatch.setattr(hopper, "tuned_table", lambda: table)
    monkeypatch.setattr(hopper, "INTERPRET", False)
    got = hopper.grouped_config([(3072, 768), (768, 6144)], 8000, "bfloat16")
    assert got == fast
    assert hopper.grouped_config([(3072, 768), (768, 6144)], 8000, "float16") == fast
    assert hopper.grouped_config([(3072, 768), (768, 6144)], 1024, "bfloat16") is None
    assert hopper.grouped_config([(768, 6144), (3072, 768)], 8192, "bfloat16") is None
    assert hopper.grouped_config([(3072, 768), (768, 6144)], 8192, "float32") is None
    monkeypatch.setattr(hopper, "INTERPRET", True)
    assert hopper.grouped_config([(3072, 768), (768, 6144)], 8192, "bfloat16") is None


@pytest.mark.gpu
@pytest.mark.parametrize(
    "tiles",
    [
        TileConfig(128, 256, 64, group_m=8, num_warps=8, num_stages=4, epilogue_subtile=2),
        TileConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=4, epilogue_subtile=2),
    ],
    ids=["128x256", "128x128"],
)
def test_gpu_grouped_products_are_the_separate_ones(tiles):
    # hf-blog-geglu's weight gradients at a shorter batch (K), on the GPU's own tiles
    gen = torch.Generator().manual_seed(7)
    k, dims = 2056, [(3072, 768), (768, 6144), (8, 264)]
    hs = [torch.randn((k, m), generator=gen).to("cuda", torch.bfloat16) for m, _ in dims]
    dzs = [torch.randn((k, n), generator=gen).to("cuda", torch.bfloat16) for _, n in dims]
    outs = tma_linear.linear_grouped([h.t() for h in hs], dzs, config=tiles)
    for h, dz, y in zip(hs, dzs, outs, strict=True):
        alone = tma_linear.linear_act_fwd(
            h.t(), dz, None, None, activation="identity", config=tiles
        )
        assert torch.equal(y, alone)
        want = (h.double().t() @ dz.double()).cpu().numpy()
        assert_close(to_numpy(y), want, layer_spec("bfloat16"), what=f"{tuple(y.shape)}")
