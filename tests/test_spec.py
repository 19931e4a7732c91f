"""MLPSpec, presets, TileConfig and the implementation registry: every field, every error path."""

from __future__ import annotations

import json

import pytest

from fusedmlp.common import (
    ACTIVATIONS,
    DTYPES,
    IMPLEMENTATIONS,
    PRESETS,
    MLPSpec,
    TileConfig,
    get_implementation,
    impl_names,
    param_shapes,
    preset_batch_sizes,
)
from fusedmlp.common.registry import check_impl
from fusedmlp.common.tiling import (
    INTERPRET_CONFIG,
    INTERPRET_CONFIG_GATED,
    SMEM_LIMIT,
    heuristic_config,
    search_space,
    smem_bytes,
)


def test_valid_spec_and_derived_facts():
    spec = MLPSpec((8, 16, 32, 4), "swiglu", True, "bfloat16")
    assert spec.d_in == 8 and spec.d_out == 4 and spec.num_layers == 3
    assert spec.gated and spec.base_activation == "silu"
    layers = spec.layers()
    assert [(l.d_in, l.d_out, l.activation, l.gated) for l in layers] == [
        (8, 16, "silu", True),
        (16, 32, "silu", True),
        (32, 4, "identity", False),
    ]
    assert list(param_shapes(spec)) == ["w0", "b0", "v0", "c0", "w1", "b1", "v1", "c1", "w2", "b2"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"widths": (8,)}, "widths: expected at least 2"),
        ({"widths": ()}, "widths: expected at least 2"),
        ({"widths": (8, 0)}, "widths[1]: expected a positive int, got 0"),
        ({"widths": (8, -3)}, "widths[1]: expected a positive int, got -3"),
        ({"widths": (8, 2.5)}, "widths[1]: expected a positive int, got 2.5"),
        ({"widths": (True, 4)}, "widths[0]: expected a positive int, got True"),
        ({"widths": "84"}, "widths: expected a sequence"),
        ({"widths": 8}, "widths: expected a sequence"),
        ({"activation": "tanh"}, "activation: expected one of"),
        ({"bias": 1}, "bias: expected a bool, got 1"),
        (
            {"dtype": "float64"},
            "dtype: expected one of ('float32', 'float16', 'bfloat16'), got 'float64'",
        ),
        (
            {"fp32_precision": "fast"},
            "fp32_precision: expected one of ('ieee', 'tf32'), got 'fast'",
        ),
        ({"dtype": "float16", "fp32_precision": "tf32"}, "'tf32' applies to dtype 'float32' only"),
    ],
)
def test_invalid_spec_names_field_value_and_allowed(kwargs, message):
    base = {"widths": (8, 16, 4), "activation": "relu", "bias": True, "dtype": "float32"}
    with pytest.raises(ValueError) as info:
        MLPSpec(**{**base, **kwargs})
    assert message in str(info.value)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_json_round_trip(tmp_path, activation, dtype):
    spec = MLPSpec((5, 7, 3), activation, False, dtype)
    assert MLPSpec.from_json(spec.to_json()) == spec
    path = tmp_path / "spec.json"
    spec.to_json(path)
    assert MLPSpec.from_json(path) == spec
    assert MLPSpec.from_json(str(path)) == spec


def test_from_json_rejects_unknown_and_missing_fields():
    with pytest.raises(ValueError, match=r"unknown fields \['depth'\]"):
        MLPSpec.from_dict(
            {"widths": [4, 4], "activation": "relu", "bias": True, "dtype": "float32", "depth": 3}
        )
    with pytest.raises(ValueError, match=r"missing fields \['dtype'\]"):
        MLPSpec.from_json(json.dumps({"widths": [4, 4], "activation": "relu", "bias": True}))


def test_presets_match_the_issue():
    llama = MLPSpec.preset("llama3-8b")
    assert llama == MLPSpec((4096, 14336, 4096), "swiglu", False, "bfloat16")
    assert preset_batch_sizes("llama3-8b") == (16, 64, 512, 8192)
    assert MLPSpec.preset("gpt-mlp") == MLPSpec((4096, 16384, 4096), "gelu_tanh", True, "bfloat16")
    assert MLPSpec.preset("hf-blog-geglu") == MLPSpec(
        (768, 3072, 768), "geglu_tanh", False, "bfloat16"
    )
    assert preset_batch_sizes("hf-blog-geglu") == (1, 16, 64, 8192)  # issue 22's decode sizes
    assert preset_batch_sizes("gpt-mlp") == (1, 16, 64, 8192)
    assert MLPSpec.preset("gpt2-mlp") == MLPSpec((768, 3072, 768), "gelu_tanh", True, "bfloat16")
    assert preset_batch_sizes("gpt2-mlp") == (1, 16, 512, 4096)
    assert MLPSpec.preset("nerf-64x5") == MLPSpec((64,) * 6, "relu", False, "float16")
    assert preset_batch_sizes("nerf-64x5") == (2_097_152,)
    assert MLPSpec.preset("cpu-small") == MLPSpec((96, 256, 96), "swiglu", True, "float32")
    for preset in PRESETS.values():
        assert preset.batch_sizes


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError) as info:
        MLPSpec.preset("llama4")
    assert "'llama4'" in str(info.value)
    for name in PRESETS:
        assert name in str(info.value)


def test_tile_config_validation_and_round_trip():
    cfg = TileConfig(64, 128, 32, group_m=4, num_warps=8, num_stages=2)
    assert TileConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="block_m: expected a power of two >= 16, got 48"):
        TileConfig(48, 64, 32)
    with pytest.raises(ValueError, match="block_k: expected a power of two >= 16, got 8"):
        TileConfig(64, 64, 8)
    # block_n: a power of two, or whole 64-column swizzle atoms (Mosaic GPU's 192); not block_m/k
    assert TileConfig(128, 192, 64).block_n == 192
    with pytest.raises(ValueError, match="block_n: expected a power of two >= 16 or a multiple of "
                       "64, got 96"):  # fmt: skip
        TileConfig(64, 96, 32)
    with pytest.raises(ValueError, match="block_m: expected a power of two >= 16, got 192"):
        TileConfig(192, 64, 32)
    with pytest.raises(ValueError, match="num_warps"):
        TileConfig(64, 64, 32, num_warps=3)
    two = TileConfig(64, 256, 64, programs_per_sm=2)
    assert TileConfig.from_dict(two.to_dict()) == two
    old_json = {
        k: v for k, v in cfg.to_dict().items() if k != "programs_per_sm"
    }  # before the field
    assert TileConfig.from_dict(old_json) == cfg
    with pytest.raises(ValueError, match=r"programs_per_sm: expected one of \(1, 2, 3, 4\), got 0"):
        TileConfig(64, 64, 32, programs_per_sm=0)
    with pytest.raises(ValueError, match="group_m"):
        TileConfig(64, 64, 32, group_m=0)
    with pytest.raises(ValueError, match="num_stages"):
        TileConfig(64, 64, 32, num_stages=0)


def test_registry_lists_the_design_names():
    assert set(impl_names()) == {
        "triton",
        "triton_tma",
        "pallas_triton",
        "pallas_mosaic",
        "fused_small",
        "fused_decode",
        "eager",
        "compile",
        "xla",
        "mosaic",
        "jax_triton",
    }
    assert impl_names("torch") == (
        "triton",
        "triton_tma",
        "fused_small",
        "fused_decode",
        "mosaic",
        "eager",
        "compile",
    )
    assert impl_names("jax") == (
        "pallas_triton",
        "pallas_mosaic",
        "fused_small",
        "fused_decode",
        "jax_triton",
        "xla",
    )
    assert impl_names("jax", baselines=False) == (
        "pallas_triton",
        "pallas_mosaic",
        "fused_small",
        "fused_decode",
        "jax_triton",
    )
    assert all(impl.description for impl in IMPLEMENTATIONS)
    assert get_implementation("xla").baseline
    with pytest.raises(ValueError, match="impl: expected one of"):
        get_implementation("cuda")
    with pytest.raises(ValueError, match="for the torch front, got 'xla'"):
        check_impl("xla", "torch")
    assert check_impl("auto", "jax") == "auto"


def test_heuristic_configs_follow_the_sm90_compiles():
    # triton.compile for sm_90 (no GPU needed; tests/test_smem_model.py): the persistent TMA linear
    # kernel at 128x256x64 fits 4 stages with its epilogue stored in 2 slices (225 KiB of 227), the
    # packed gated 128x(2*128)x64 likewise (209 KiB).
    big = dict(m=8192, n=4096, k=4096, dtype="bfloat16")
    assert heuristic_config("linear_act", **big).num_stages == 3
    tma = heuristic_config("linear_act", **big, persistent=True)
    assert (tma.block_m, tma.block_n, tma.block_k, tma.num_stages) == (128, 256, 64, 4)
    assert tma.epilogue_subtile == 2
    gated = heuristic_config("gated", **big, persistent=True)
    assert (gated.block_n, gated.num_stages) == (128, 4)
    assert heuristic_config("gated", 16, 64, 64, "float16", interpret=True) == (
        INTERPRET_CONFIG_GATED
    )
    assert heuristic_config("linear_act", 16, 64, 64, "float16", interpret=True) == (
        INTERPRET_CONFIG
    )


@pytest.mark.parametrize("family", ["linear_act", "gated"])
def test_search_space_is_pruned_to_shared_memory(family):
    for m, dtype in ((16, "bfloat16"), (8192, "bfloat16"), (8192, "float32")):
        for persistent in (False, True):
            space = search_space(family, m, dtype, persistent=persistent)
            assert space, (family, m, dtype)
            for c in space:  # the compiler-checked count (common/tiling.py smem_bytes)
                assert smem_bytes(family, c, dtype, persistent=persistent) <= SMEM_LIMIT, c
