"""Converters: Hugging Face LlamaMLP (with and without mlp_bias), GemmaMLP and GPT2MLP, and plain
nn.Linear stacks, to FusedMLP. The converted module returns what the original returns: same shape
and dtype, within the tolerance policy of the float64 reference of the converted params, and within
2x the original module's own error (the baseline rule of common/tolerance.py)."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from torch import nn
from transformers import GemmaConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.activations import ACT2FN
from transformers.models.gemma.modeling_gemma import GemmaMLP
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
from transformers.models.llama.modeling_llama import LlamaMLP

from fusedmlp.common import reference
from fusedmlp.common.tolerance import assert_close
from fusedmlp.torch_impl import (
    FusedMLP,
    from_linears,
    linear_to_param,
    param_to_linear,
    plan,
    to_linears,
)
from fusedmlp.torch_impl.convert import activation_of
from helpers import to_numpy

DTYPES = ("float32", "float16", "bfloat16")
# Tiny configs, odd where the class allows: Llama/Gemma need hidden % heads == 0 and an even head
# dim (RoPE), so hidden 42 with 3 heads; the intermediate size is free (73), GPT-2's width too (45).
HIDDEN, INTERMEDIATE, GPT2_HIDDEN = 42, 73, 45
TINY = dict(
    hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_attention_heads=3, num_key_value_heads=3
)  # Llama's and Gemma's


def _llama(bias: bool, act: str = "silu") -> nn.Module:
    config = LlamaConfig(**TINY, mlp_bias=bias, hidden_act=act)
    return LlamaMLP(config)


def _gemma() -> nn.Module:
    config = GemmaConfig(**TINY, head_dim=14)
    return GemmaMLP(config)


def _gpt2(act: str = "gelu_new") -> nn.Module:
    return GPT2MLP(INTERMEDIATE, GPT2Config(n_embd=GPT2_HIDDEN, n_head=5, activation_function=act))


MODELS = {
    "llama": lambda: _llama(False),
    "llama_bias": lambda: _llama(True),
    "gemma": _gemma,
    "gpt2": _gpt2,
}
EXPECTED = {
    "llama": ("swiglu", False),
    "llama_bias": ("swiglu", True),
    "gemma": ("geglu_tanh", False),
    "gpt2": ("gelu_tanh", True),
}


@torch.no_grad()
def _randomise(module: nn.Module, seed: int) -> nn.Module:
    # HF init leaves GPT-2's biases at zero and weights at std 0.02: refill every parameter,
    # biases included, so that every term of the conversion is exercised.
    gen = torch.Generator().manual_seed(seed)
    for param in module.parameters():
        fan_in = param.shape[0] if param.dim() == 2 and type(module) is GPT2MLP else param.shape[-1]
        param.copy_(torch.randn(param.shape, generator=gen) / fan_in**0.5)
    return module.eval()


def _x(d_in: int, dtype: str, lead=(2, 5), seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*lead, d_in, generator=gen).to(getattr(torch, dtype))


def _check(fused: FusedMLP, original: nn.Module, x: torch.Tensor, what: str) -> None:
    with torch.no_grad():
        ours, theirs = fused(x), original(x)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, what
    params = {k: to_numpy(v) for k, v in fused.params().items()}
    ref = reference.forward(fused.spec, to_numpy(x), params)
    assert_close(to_numpy(ours), ref, fused.spec, baseline=to_numpy(theirs), what=what)


# ---- Hugging Face --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", list(MODELS))
def test_from_hf_matches_original(model, dtype):
    original = _randomise(MODELS[model](), seed=len(model)).to(getattr(torch, dtype))
    fused = FusedMLP.from_hf(original, impl="triton")
    activation, bias = EXPECTED[model]
    assert (fused.spec.activation, fused.spec.bias, fused.spec.dtype) == (activation, bias, dtype)
    assert fused.impl == "triton"
    _check(fused, original, _x(fused.spec.d_in, dtype, seed=len(dtype)), f"{model} {dtype}")


@pytest.mark.parametrize("model", list(MODELS))
def test_from_hf_auto_impl_decode_rows(model):
    # impl auto at M = 1: fused_small (every width <= 128) for these tiny models.
    original = _randomise(MODELS[model](), seed=7).to(torch.bfloat16)
    fused = FusedMLP.from_hf(original)
    assert fused.impl == "auto" and plan(fused.spec, (1, fused.spec.d_in)).impl == "fused_small"
    _check(fused, original, _x(fused.spec.d_in, "bfloat16", lead=(1,), seed=3), model)


def test_from_hf_maps_the_weights():
    original = _randomise(_llama(True), seed=1)
    p = FusedMLP.from_hf(original).params()
    assert torch.equal(p["w0"], original.gate_proj.weight.T)  # activation branch
    assert torch.equal(p["v0"], original.up_proj.weight.T)  # linear branch
    assert torch.equal(p["w1"], original.down_proj.weight.T)
    assert torch.equal(p["b0"], original.gate_proj.bias)
    assert torch.equal(p["c0"], original.up_proj.bias)
    gpt2 = _randomise(_gpt2(), seed=2)
    q = FusedMLP.from_hf(gpt2).params()
    assert torch.equal(q["w0"], gpt2.c_fc.weight)  # Conv1D is already [in, out]
    assert torch.equal(q["b1"], gpt2.c_proj.bias)
    # a copy: changing the original does not change the converted module
    with torch.no_grad():
        gpt2.c_fc.weight.zero_()
    assert q["w0"].abs().sum() > 0


@pytest.mark.parametrize(
    "make,act,expected",
    [
        (_llama, "gelu", "geglu"),
        (_llama, "gelu_new", "geglu_tanh"),
        (_llama, "swish", "swiglu"),
        (_gpt2, "relu", "relu"),
        (_gpt2, "gelu", "gelu"),
        (_gpt2, "gelu_pytorch_tanh", "gelu_tanh"),
        (_gpt2, "gelu_fast", "gelu_tanh"),
    ],
)
def test_from_hf_activation_variants(make, act, expected):
    original = (_llama(False, act) if make is _llama else _gpt2(act)).to(torch.float32)
    original = _randomise(original, seed=5)
    fused = FusedMLP.from_hf(original, impl="triton")
    assert fused.spec.activation == expected
    _check(fused, original, _x(fused.spec.d_in, "float32", lead=(3,), seed=9), act)


def test_activation_table():
    expected = {
        "silu": "silu",
        "swish": "silu",
        "relu": "relu",
        "gelu": "gelu",
        "gelu_python": "gelu",
        "gelu_pytorch_tanh": "gelu_tanh",
        "gelu_python_tanh": "gelu_tanh",
        "gelu_new": "gelu_tanh",
        "gelu_fast": "gelu_tanh",
        "gelu_accurate": "gelu_tanh",
    }
    for key, name in expected.items():
        assert activation_of(ACT2FN[key]) == name, key
    assert activation_of(nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert activation_of(nn.GELU()) == "gelu"


@pytest.mark.parametrize("act", ["quick_gelu", "gelu_10", "relu2", "mish", "sigmoid"])
def test_unsupported_activation_names_found_and_supported(act):
    with pytest.raises(ValueError, match=r"is not supported; supported: .*gelu_new") as info:
        FusedMLP.from_hf(_gpt2(act))
    assert type(ACT2FN[act]).__name__ in str(info.value)


def test_gated_needs_a_gated_activation():
    with pytest.raises(ValueError, match=r"LlamaMLP.act_fn: ReLU \(relu\) has no gated form"):
        FusedMLP.from_hf(_llama(False, "relu"))


def test_unsupported_module():
    with pytest.raises(ValueError, match="module: Linear is not a supported MLP block"):
        FusedMLP.from_hf(nn.Linear(3, 4))
    with pytest.raises(TypeError, match=r"module: expected a torch.nn.Module, got dict"):
        FusedMLP.from_hf({})


def test_converted_module_compiles():
    torch._dynamo.reset()
    original = _randomise(_gemma(), seed=4).to(torch.bfloat16)
    compiled = torch.compile(
        FusedMLP.from_hf(original, impl="triton"), fullgraph=True, backend="aot_eager"
    )
    x = _x(HIDDEN, "bfloat16", lead=(2, 3), seed=6)
    with torch.no_grad():
        ours, theirs = compiled(x), original(x)
    fused_spec = compiled.spec
    params = {k: to_numpy(v) for k, v in compiled.params().items()}
    ref = reference.forward(fused_spec, to_numpy(x), params)
    assert_close(to_numpy(ours), ref, fused_spec, baseline=to_numpy(theirs))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_swap_into_a_whole_model(family, dtype):
    # What a user does: replace every MLP block of a model with its FusedMLP. The reference is the
    # same model (same rounded weights) in float64; the baseline, the unswapped model in `dtype`.
    torch.manual_seed(3)
    if family == "llama":
        config = LlamaConfig(**TINY, num_hidden_layers=2, vocab_size=97)
        model = LlamaForCausalLM(config)
        blocks = model.model.layers
    else:
        config = GPT2Config(n_embd=GPT2_HIDDEN, n_head=5, n_layer=2, vocab_size=97)
        model = GPT2LMHeadModel(config)
        blocks = model.transformer.h
    model = model.eval().to(getattr(torch, dtype))
    for block in blocks:
        _randomise(block.mlp, seed=11)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(ids).logits
        baseline = model(ids).logits
        for block in blocks:
            block.mlp = FusedMLP.from_hf(block.mlp, impl="triton")
        ours = model(ids).logits
    assert ours.dtype == baseline.dtype and ours.shape == baseline.shape
    spec = blocks[0].mlp.spec
    assert_close(to_numpy(ours), to_numpy(ref), spec, baseline=to_numpy(baseline))


# ---- nn.Linear -----------------------------------------------------------------------------------
def _linears(widths, bias, dtype, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(a, b, bias=bias[i]) for i, (a, b) in enumerate(itertools.pairwise(widths))]
    return [lin.to(getattr(torch, dtype)) for lin in layers]


_TORCH_ACT = {
    "relu": nn.ReLU(),
    "gelu": nn.GELU(),
    "gelu_tanh": nn.GELU(approximate="tanh"),
    "silu": nn.SiLU(),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", list(_TORCH_ACT))
def test_from_linears_matches_sequential(activation, dtype):
    widths = (29, 67, 131, 17)
    bias = (True, False, True) if activation != "relu" else (False, False, False)
    linears = _linears(widths, bias, dtype, seed=len(activation))
    act = _TORCH_ACT[activation]
    sequential = nn.Sequential(linears[0], act, linears[1], act, linears[2])
    fused = FusedMLP.from_linears(*linears, activation=activation, impl="triton")
    assert fused.spec.widths == widths and fused.spec.bias == any(bias)
    if any(bias):  # the missing bias became an exact zero
        assert not fused.b1.any()
    _check(fused, sequential, _x(widths[0], dtype, lead=(7,), seed=2), f"{activation} {dtype}")


def test_from_linears_errors():
    linears = _linears((8, 16, 4), (True, True), "float32")
    with pytest.raises(ValueError, match="a gated layer pairs two linears"):
        from_linears(*linears, activation="swiglu")
    with pytest.raises(ValueError, match=r"activation: expected one of .*got 'tanh'"):
        from_linears(*linears, activation="tanh")
    with pytest.raises(ValueError, match=r"linears\[1\]: expected in_features 16 .*got 5"):
        from_linears(linears[0], nn.Linear(5, 4), activation="relu")
    with pytest.raises(TypeError, match=r"linears\[0\]: expected a torch.nn.Linear, got ReLU"):
        from_linears(nn.ReLU(), activation="relu")
    with pytest.raises(ValueError, match="linears: expected one dtype for every weight"):
        from_linears(linears[0], linears[1].to(torch.bfloat16), activation="relu")


def test_linear_round_trip():
    (lin,) = _linears((13, 7), (True,), "bfloat16", seed=3)
    w, b = linear_to_param(lin)
    assert w.shape == (13, 7) and w.is_contiguous() and torch.equal(w, lin.weight.T)
    back = param_to_linear(w, b)
    assert torch.equal(back.weight, lin.weight) and torch.equal(back.bias, lin.bias)
    x = _x(13, "bfloat16", lead=(4,), seed=1)
    with torch.no_grad():
        np.testing.assert_array_equal(to_numpy(back(x)), to_numpy(lin(x)))
    with pytest.raises(ValueError, match=r"b: expected shape \[7\] \(w's out dim\), got \[6\]"):
        param_to_linear(w, b[:-1])


def test_to_linears_round_trip():
    linears = _linears((11, 19, 5), (True, True), "float32", seed=4)
    fused = from_linears(*linears, activation="gelu", impl="triton")
    for original, back in zip(linears, to_linears(fused), strict=True):
        assert torch.equal(original.weight, back.weight) and torch.equal(original.bias, back.bias)
    with pytest.raises(ValueError, match="to_linears needs a plain activation"):
        to_linears(FusedMLP.from_hf(_llama(False)))


# ---- GPU (`pytest -m gpu`; not run on the CPU machines) ------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("model", list(MODELS))
def test_gpu_from_hf(model):
    original = _randomise(MODELS[model](), seed=8).to("cuda", torch.bfloat16)
    fused = FusedMLP.from_hf(original)
    assert fused.w1.is_cuda
    _check(fused, original, _x(fused.spec.d_in, "bfloat16", lead=(3, 7), seed=4).cuda(), model)
