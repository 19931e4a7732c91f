"""Named specs, each with the batch sizes M it is benchmarked at."""

from __future__ import annotations

from dataclasses import dataclass

from .spec import MLPSpec


@dataclass(frozen=True)
class Preset:
    name: str
    spec: MLPSpec
    batch_sizes: tuple[int, ...]
    note: str


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "llama3-8b",
            MLPSpec((4096, 14336, 4096), "swiglu", bias=False, dtype="bfloat16"),
            (16, 64, 512, 8192),
            "Llama 3 8B MLP (gate/up/down); M=16 and 64 are decode, M=8192 prefill, M=512 a "
            "short prefill (auto's nearest measured point for Gemma-2b's MLP at 512 tokens)",
        ),
        Preset(
            "gpt-mlp",
            MLPSpec((4096, 16384, 4096), "gelu_tanh", bias=True, dtype="bfloat16"),
            (1, 16, 64, 8192),
            "GPT-style 4x MLP with biases and tanh-GELU; M = 1, 16, 64 are decode (issue 22's "
            "targets, and auto's measured points for a plain MLP of 268 MB of weights)",
        ),
        Preset(
            "gpt2-mlp",
            MLPSpec((768, 3072, 768), "gelu_tanh", bias=True, dtype="bfloat16"),
            (1, 16, 512, 4096),
            "GPT-2 small's MLP (c_fc/c_proj, 9.4 MB of weights), at the token counts of the "
            "drop-in check (bench/models.py): launch-bound at 1-512, where gpt-mlp's choice lost",
        ),
        Preset(
            "hf-blog-geglu",
            MLPSpec((768, 3072, 768), "geglu_tanh", bias=False, dtype="bfloat16"),
            (1, 16, 64, 8192),
            "batch 64 x seq 128 (M = 8192), the case profiled in the Hugging Face article "
            "'Profiling in PyTorch (Part 2): From nn.Linear to a Fused MLP'; M = 1, 16, 64 "
            "decode (auto's measured points for a small gated MLP)",
        ),
        Preset(
            "nerf-64x5",
            MLPSpec((64,) * 6, "relu", bias=False, dtype="float16"),
            (2_097_152,),
            "NeRF-style narrow MLP: 5 layers of width 64 over 2M rows",
        ),
        Preset(
            "cpu-small",
            MLPSpec((96, 256, 96), "swiglu", bias=True, dtype="float32"),
            (64,),
            "the embedded default on a CPU: small enough for the kernel interpreters",
        ),
    )
}

DEFAULT_CPU_PRESET = "cpu-small"
DEFAULT_GPU_PRESETS: tuple[str, ...] = (
    "llama3-8b",
    "gpt-mlp",
    "gpt2-mlp",
    "hf-blog-geglu",
    "nerf-64x5",
)


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"preset: unknown name {name!r}; known presets are {sorted(PRESETS)}"
        ) from None


def preset_batch_sizes(name: str) -> tuple[int, ...]:
    return get_preset(name).batch_sizes
