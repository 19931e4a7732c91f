"""Converters between FusedMLP and the MLP blocks users already have: Hugging Face modules and
`nn.Linear` stacks.

The contract's weights are `[in, out]` (`x @ W`); `nn.Linear` stores `[out, in]` (`x @ weightᵀ`), so
every nn.Linear weight is transposed; Hugging Face's GPT-2 `Conv1D` already stores `[in, out]`.

    LlamaMLP (and any gate/up/down MLP: Mistral, Qwen2, Gemma, ...):
        down(act(gate(x)) ⊙ up(x))     gate_proj -> w0, b0 (the activation branch)
                                        up_proj   -> v0, c0 (the linear branch)
                                        down_proj -> w1, b1
        act silu -> swiglu, erf-gelu -> geglu, tanh-gelu -> geglu_tanh (Gemma)
    GPT2MLP:
        c_proj(act(c_fc(x)))            c_fc -> w0, b0; c_proj -> w1, b1;  gelu_new -> gelu_tanh
    from_linears(l0, l1, ..., activation=...):
        l_last(act(... act(l0(x))))     l_i -> w_i, b_i (plain activations)

The activation is read from the module's activation object (its class, and `approximate` for
nn.GELU), not from a config string, so a model whose config was edited after construction converts
to what it computes. Supported: silu/swish (nn.SiLU, SiLUActivation), relu, erf-gelu (nn.GELU,
GELUActivation, gelu_python), tanh-gelu (nn.GELU(approximate="tanh"), GELUTanh/PytorchGELUTanh =
"gelu_pytorch_tanh", NewGELUActivation = "gelu_new", FastGELUActivation = "gelu_fast",
AccurateGELUActivation = "gelu_accurate": all the same formula, 0.5·z·(1 + tanh(√(2/π)(z +
0.044715 z³)))). Anything else (quick_gelu, gelu_10, relu2, mish, ...) is a ValueError naming what
was found and what is supported.

What the converted module returns: the original's output, same shape and dtype, for the same x —
in inference: GPT2MLP's dropout is the identity in eval() and FusedMLP has none. The params are a
copy (contiguous [in, out] tensors on the original's device, in its dtype); the original can go.
Twin: none (JAX has no module classes to convert from).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fusedmlp.common import GATED_ACTIVATIONS, PLAIN_ACTIVATIONS, MLPSpec, TileConfig
from fusedmlp.common.registry import AUTO

from .module import FusedMLP, dtype_name

# Class name of an activation module -> the spec's plain activation. Names, not imports: the
# classes move between transformers releases (PytorchGELUTanh became GELUTanh in 4.5x), and the
# converter must not need transformers to convert plain nn modules.
_ACTIVATION_CLASSES: dict[str, str] = {
    "SiLU": "silu",
    "SiLUActivation": "silu",
    "ReLU": "relu",
    "GELUActivation": "gelu",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
    "AccurateGELUActivation": "gelu_tanh",
}
# Plain activation -> the gated activation whose activation branch applies it.
_GATED_OF = {base: gated for gated, base in GATED_ACTIVATIONS.items()}
_SUPPORTED_HF = (
    "silu/swish",
    "relu",
    "gelu (erf)",
    "gelu_python",
    "gelu_pytorch_tanh",
    "gelu_new",
    "gelu_fast",
    "gelu_accurate",
)


# ---- nn.Linear <-> the contract's (w, b) ---------------------------------------------------------
def linear_to_param(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(w [in, out], b [out] or None) of an nn.Linear: a detached contiguous copy."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear: expected a torch.nn.Linear, got {type(linear).__name__}")
    w = linear.weight.detach().t().contiguous()
    b = linear.bias.detach().clone() if linear.bias is not None else None
    return w, b


def param_to_linear(w: torch.Tensor, b: torch.Tensor | None = None) -> nn.Linear:
    """An nn.Linear computing x @ w + b from the contract's w [in, out] and b [out] (copies)."""
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        got = list(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"w: expected a 2-D tensor [in, out], got {got}")
    d_in, d_out = w.shape
    if b is not None and (not isinstance(b, torch.Tensor) or tuple(b.shape) != (d_out,)):
        got = list(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
        raise ValueError(f"b: expected shape [{d_out}] (w's out dim), got {got}")
    linear = nn.Linear(d_in, d_out, bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        linear.weight.copy_(w.detach().t())
        if b is not None:
            linear.bias.copy_(b.detach())
    return linear


def to_linears(module: FusedMLP) -> list[nn.Linear]:
    """The nn.Linear layers of a plain-activation FusedMLP (gated specs: ValueError)."""
    spec = module.spec
    if spec.gated:
        raise ValueError(
            f"module: to_linears needs a plain activation {PLAIN_ACTIVATIONS}, got "
            f"{spec.activation!r} (a gated layer is two linears and a product, not one linear)"
        )
    p = module.params()
    return [param_to_linear(p[f"w{i}"], p.get(f"b{i}")) for i in range(spec.num_layers)]


# ---- activation modules --------------------------------------------------------------------------
def activation_of(act: object) -> str:
    """The spec's plain activation for an activation module, or ValueError naming the supported."""
    name = type(act).__name__
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    if name in _ACTIVATION_CLASSES:
        return _ACTIVATION_CLASSES[name]
    raise ValueError(
        f"activation: {name} ({act!r}) is not supported; supported: Hugging Face ACT2FN keys "
        f"{_SUPPORTED_HF}, torch.nn.SiLU, torch.nn.ReLU, torch.nn.GELU (approximate 'none' or "
        f"'tanh')"
    )


# ---- Hugging Face modules ------------------------------------------------------------------------
def _common_dtype(owner: str, tensors: dict[str, torch.Tensor]) -> str:
    dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors.values()}
    devices = {str(t.device) for t in tensors.values()}
    if len(dtypes) != 1:
        raise ValueError(f"{owner}: expected one dtype for every weight, got {sorted(dtypes)}")
    if len(devices) != 1:
        raise ValueError(f"{owner}: expected one device for every weight, got {sorted(devices)}")
    return dtype_name(dtypes.pop())


def _bias(owner: str, names: tuple[str, ...], biases: list[torch.Tensor | None]) -> bool:
    have = [b is not None for b in biases]
    if any(have) and not all(have):
        # The spec has one bias flag; a zero bias would be exact, but no HF MLP mixes them.
        with_bias = [n for n, h in zip(names, have, strict=True) if h]
        raise ValueError(
            f"{owner}: expected a bias on all of {list(names)} or on none, got one on {with_bias}"
        )
    return all(have)


def _from_gate_up_down(module: nn.Module, impl: str, config: TileConfig | None) -> FusedMLP:
    owner = type(module).__name__
    gate, up, down = module.gate_proj, module.up_proj, module.down_proj
    for name, lin in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"{owner}.{name}: expected a torch.nn.Linear, got {type(lin).__name__}")
    base = activation_of(module.act_fn)
    if base not in _GATED_OF:
        raise ValueError(
            f"{owner}.act_fn: {type(module.act_fn).__name__} ({base}) has no gated form here; "
            f"gated MLPs support {sorted(_GATED_OF)} -> {sorted(GATED_ACTIVATIONS)}"
        )
    (w0, b0), (v0, c0), (w1, b1) = map(linear_to_param, (gate, up, down))
    if w1.shape[0] != w0.shape[1] or v0.shape != w0.shape:
        raise ValueError(
            f"{owner}: expected gate_proj and up_proj [hidden -> intermediate] and down_proj "
            f"[intermediate -> *], got weights (in, out) {tuple(w0.shape)}, {tuple(v0.shape)}, "
            f"{tuple(w1.shape)}"
        )
    bias = _bias(owner, ("gate_proj", "up_proj", "down_proj"), [b0, c0, b1])
    params = {"w0": w0, "v0": v0, "w1": w1}
    if bias:
        params |= {"b0": b0, "c0": c0, "b1": b1}
    dtype = _common_dtype(owner, params)
    spec = MLPSpec((w0.shape[0], w0.shape[1], w1.shape[1]), _GATED_OF[base], bias, dtype)
    return FusedMLP.from_params(params, spec, impl=impl, config=config, device=w0.device)


def _conv1d_to_param(owner: str, name: str, conv: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    # transformers' Conv1D: y = x @ weight + bias, weight [nx = in, nf = out]: already [in, out].
    weight, bias = getattr(conv, "weight", None), getattr(conv, "bias", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"{owner}.{name}: expected a Conv1D with a 2-D weight [in, out]")
    if bias is None or tuple(bias.shape) != (weight.shape[1],):
        raise ValueError(
            f"{owner}.{name}: expected a bias of shape [{weight.shape[1]}], got "
            f"{None if bias is None else list(bias.shape)}"
        )
    return weight.detach().contiguous().clone(), bias.detach().clone()


def _from_fc_proj(module: nn.Module, impl: str, config: TileConfig | None) -> FusedMLP:
    owner = type(module).__name__
    w0, b0 = _conv1d_to_param(owner, "c_fc", module.c_fc)
    w1, b1 = _conv1d_to_param(owner, "c_proj", module.c_proj)
    if w1.shape[0] != w0.shape[1]:
        raise ValueError(
            f"{owner}.c_proj: expected in-features {w0.shape[1]} (c_fc's out), got {w1.shape[0]}"
        )
    activation = activation_of(module.act)
    params = {"w0": w0, "b0": b0, "w1": w1, "b1": b1}
    spec = MLPSpec(
        (w0.shape[0], w0.shape[1], w1.shape[1]), activation, True, _common_dtype(owner, params)
    )
    return FusedMLP.from_params(params, spec, impl=impl, config=config, device=w0.device)


# Attribute signature -> converter: the structure decides, so Llama look-alikes (Mistral, Qwen2,
# Gemma, Phi3's split variants) convert without a class list.
_HF_CONVERTERS: tuple[tuple[tuple[str, ...], Callable[..., FusedMLP]], ...] = (
    (("gate_proj", "up_proj", "down_proj", "act_fn"), _from_gate_up_down),
    (("c_fc", "c_proj", "act"), _from_fc_proj),
)


def from_hf(module: nn.Module, *, impl: str = AUTO, config: TileConfig | None = None) -> FusedMLP:
    """A FusedMLP computing what the Hugging Face MLP block `module` computes.

    Supported: LlamaMLP-style blocks (gate_proj, up_proj, down_proj, act_fn; with or without bias)
    -> swiglu / geglu / geglu_tanh (GemmaMLP: gelu_pytorch_tanh -> geglu_tanh); GPT2MLP (Conv1D
    c_fc, c_proj, act) -> a plain 2-layer MLP (gelu_new -> gelu_tanh). The parameters are copied;
    the dtype and device are the module's.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    for attributes, convert in _HF_CONVERTERS:
        if all(hasattr(module, a) for a in attributes):
            return convert(module, impl, config)
    raise ValueError(
        f"module: {type(module).__name__} is not a supported MLP block; expected a LlamaMLP-style "
        f"module (gate_proj, up_proj, down_proj, act_fn: LlamaMLP, GemmaMLP, MistralMLP, ...) or "
        f"a GPT2MLP (c_fc, c_proj, act)"
    )


# ---- nn.Linear stacks ----------------------------------------------------------------------------
def from_linears(
    *linears: nn.Linear,
    activation: str,
    impl: str = AUTO,
    config: TileConfig | None = None,
) -> FusedMLP:
    """A FusedMLP computing linears[-1](act(... act(linears[0](x)))): `activation` after every
    linear but the last, one of PLAIN_ACTIVATIONS. Where some linears have a bias and others not,
    the missing ones become zero biases (exact: x·W + 0 rounds as x·W does)."""
    if activation not in PLAIN_ACTIVATIONS:
        hint = (
            " (a gated layer pairs two linears, act(x·W) ⊙ (x·V): convert such blocks with "
            "from_hf, or build the params and use FusedMLP.from_params)"
            if activation in GATED_ACTIVATIONS
            else ""
        )
        raise ValueError(
            f"activation: expected one of {PLAIN_ACTIVATIONS}, got {activation!r}{hint}"
        )
    if not linears:
        raise ValueError("linears: expected at least one torch.nn.Linear, got none")
    pairs = []
    for i, lin in enumerate(linears):
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"linears[{i}]: expected a torch.nn.Linear, got {type(lin).__name__}")
        if i and lin.in_features != linears[i - 1].out_features:
            raise ValueError(
                f"linears[{i}]: expected in_features {linears[i - 1].out_features} "
                f"(linears[{i - 1}].out_features), got {lin.in_features}"
            )
        pairs.append(linear_to_param(lin))
    bias = any(b is not None for _, b in pairs)
    params: dict[str, torch.Tensor] = {}
    for i, (w, b) in enumerate(pairs):
        params[f"w{i}"] = w
        if bias:
            params[f"b{i}"] = b if b is not None else w.new_zeros(w.shape[1])
    widths = (linears[0].in_features, *(lin.out_features for lin in linears))
    spec = MLPSpec(widths, activation, bias, _common_dtype("linears", params))
    return FusedMLP.from_params(params, spec, impl=impl, config=config, device=pairs[0][0].device)
