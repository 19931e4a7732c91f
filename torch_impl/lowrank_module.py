"""FactorisedMLP: a low-rank compressed MLP as an `nn.Module`, and its registered operator.

    y = FactorisedMLP(x),   layer i: act((h·U_i)·Vt_i + b_i)   (or act(h·W_i + b_i) where dense;
                            gated: act((h·U_i)·Vt_i + b_i) ⊙ ((h·Uv_i)·Vtv_i + c_i))

Built by `FusedMLP.from_hf(module, rank=… | energy=…, calibration=…)` (or `from_hf` here, or
`FactorisedMLP.from_params(params, lspec)`): the HF block's dense weights are factorised in float64
(common/lowrank.py: plain SVD, or activation-aware SVD on the block's real inputs), each layer's
rank decides how it runs (common/lowrank_spec.py: the fused `lowrank_linear_act`, two GEMMs past
rank 256, or dense where factorising saves nothing), and the factors are held as parameters
`u{i}` [in, r], `vt{i}` [r, out] (a dense layer `w{i}`), `b{i}` (a gated layer adds the up pair
`uv{i}`, `vtv{i}` and `c{i}`; dense, packed `wv{i}`, `bc{i}`), in the module's dtype.

Why a class of its own and not a mode of FusedMLP: the params have other names and shapes (FusedMLP
packs gated layers and holds `w{i}` per layer, and its load/state-dict/params() code is built on
that), there is no backward (FusedMLP trains), and the spec carries ranks (FusedMLP's op takes an
MLPSpec string). A mode would put `if factorised` into each of those; a class keeps FusedMLP as it
is. What the two share is the pattern: forward follows FusedMLP's (autocast, the eager shortcut,
one registered op under tracing).

Inference only: the parameters are created with requires_grad=False; where a gradient would be
built (a param or x requiring grad, grad mode on) forward raises NotImplementedError (no
factorised backward kernel exists yet).

torch.compile(fullgraph=True): forward calls the op `torch.ops.fusedmlp.lowrank_mlp(x, params,
spec_json, config_json)` — registered with `torch.library.custom_op` and a fake, as custom_op.py
registers the dense op, so the whole MLP is one opaque node — with strings built when the module
is built or changed (no dataclass enters the trace: torch 2.11's Dynamo cannot make constants of
them, custom_op.py says more). Eager calls with no trace skip the op's dispatch and run the
launches directly (lowrank_front's per-signature steps: the checks and configs on the first call
of a signature, then the launchers' records), as FusedMLP does.

Autocast: as FusedMLP (and nn.Linear): x and the params are cast to the autocast dtype, the spec of
that dtype runs, the output has it.

Twin: none (the JAX stack is functional: jax_impl/lowrank_front.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fusedmlp.common import DTYPES
from fusedmlp.common import lowrank_spec as ls
from fusedmlp.common.lowrank import DEFAULT_DAMP, LowRankConfig
from fusedmlp.common.validate import fmt_shape

from . import lowrank_front
from .module import _autocast, _dispatch_modes, dtype_name, to_torch

_TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}
CONFIG_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(LowRankConfig))


# ---- spec and config as strings ------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def parse_spec(spec_json: str) -> ls.LowRankSpec:
    return ls.LowRankSpec.from_json(spec_json)


@functools.lru_cache(maxsize=256)
def parse_config(config_json: str | None) -> LowRankConfig | None:
    return None if config_json is None else LowRankConfig(**json.loads(config_json))


def spec_to_json(lspec: ls.LowRankSpec) -> str:
    return json.dumps(lspec.to_dict(), separators=(",", ":"))


def config_to_json(config: LowRankConfig | None) -> str | None:
    if config is None:
        return None
    return json.dumps(dataclasses.asdict(config), separators=(",", ":"))


@functools.lru_cache(maxsize=256)
def _names(spec_json: str) -> tuple[str, ...]:
    return tuple(ls.param_shapes(parse_spec(spec_json)))


# ---- the operator --------------------------------------------------------------------------------
@torch.library.custom_op("fusedmlp::lowrank_mlp", mutates_args=())
def _lowrank_mlp_op(
    x: torch.Tensor, params: list[torch.Tensor], spec_json: str, config_json: str | None
) -> torch.Tensor:
    """The registered forward: lowrank_front.lowrank_mlp with the spec and config unpacked."""
    named = dict(zip(_names(spec_json), params, strict=True))
    return lowrank_front.lowrank_mlp(
        x, named, parse_spec(spec_json), config=parse_config(config_json)
    )


@_lowrank_mlp_op.register_fake
def _lowrank_mlp_fake(x, params, spec_json, config_json):
    lspec = parse_spec(spec_json)
    names = _names(spec_json)
    if len(params) != len(names):
        raise ValueError(f"params: expected {len(names)} tensors {list(names)}, got {len(params)}")
    lowrank_front.check_call(x, dict(zip(names, params, strict=True)), lspec)
    return x.new_empty((*x.shape[:-1], lspec.spec.d_out))


LOWRANK_MLP_OP = torch.ops.fusedmlp.lowrank_mlp.default


# ---- the module ----------------------------------------------------------------------------------
class FactorisedMLP(nn.Module):
    """The factorised MLP of `lspec` (a LowRankSpec: MLPSpec + ranks), parameters uninitialised
    until `load_params` (what `from_params` and the converters do).

    Args:
        lspec: the spec and each layer's rank (its dtype is the parameters' unless `dtype`).
        config: one LowRankConfig for every fused factorised layer (None: the heuristic); a plain
            layer that runs two GEMMs at the call's M (`lowrank_spec.layer_run`) ignores it.
        device, dtype: where and in what dtype the parameters live.
    """

    def __init__(
        self,
        lspec: ls.LowRankSpec,
        *,
        config: LowRankConfig | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> None:
        super().__init__()
        lspec = lowrank_front.check_lspec(lspec)
        if dtype is not None:
            lspec = lspec.with_dtype(dtype_name(dtype))
        self._lspec = lspec
        # Built here, never in forward: the op's strings, one per dtype the params or autocast
        # may have (torch.compile then traces no dataclass).
        self._lspecs = {_TORCH_DTYPES[d]: lspec.with_dtype(d) for d in DTYPES}
        self._spec_json = {t: spec_to_json(s) for t, s in self._lspecs.items()}
        self._spec_json_default = self._spec_json[_TORCH_DTYPES[lspec.dtype]]
        self.config = config
        shapes = ls.param_shapes(lspec)
        self._names = tuple(shapes)
        for name, shape in shapes.items():
            empty = torch.empty(shape, device=device, dtype=getattr(torch, lspec.dtype))
            self.register_parameter(name, nn.Parameter(empty, requires_grad=False))

    @property
    def config(self) -> LowRankConfig | None:
        return self._config

    @config.setter
    def config(self, config: LowRankConfig | None) -> None:
        if config is not None and not isinstance(config, LowRankConfig):
            raise TypeError(
                f"config: expected a fusedmlp.common.lowrank.LowRankConfig or None, "
                f"got {type(config).__name__}"
            )
        self._config = config
        self._config_json = config_to_json(config)

    @property
    def lspec(self) -> ls.LowRankSpec:
        """The spec and ranks of the current parameters (the dtype follows `.to(dtype)`)."""
        name = str(self._parameters[self._names[0]].dtype).removeprefix("torch.")
        return self._lspec.with_dtype(name) if name in DTYPES else self._lspec

    @property
    def spec(self):
        return self.lspec.spec

    @property
    def ranks(self) -> tuple[int, ...]:
        return self._lspec.ranks

    def params(self) -> dict[str, torch.Tensor]:
        return {name: self._parameters[name] for name in self._names}

    def plan(self, x_shape: Sequence[int]) -> ls.LowRankPlan:
        """Per layer: rank, how it runs and why, params, FLOPs and bytes vs dense."""
        return lowrank_front.plan(self.lspec, x_shape, config=self._config)

    @torch.no_grad()
    def load_params(self, params: Mapping[str, torch.Tensor | np.ndarray]) -> FactorisedMLP:
        """Copy `params` (names and shapes of `lowrank_spec.param_shapes`) into the parameters."""
        ls.check_params(self._lspec, params)
        dtype = self._parameters[self._names[0]].dtype
        device = self._parameters[self._names[0]].device
        for name in self._names:
            value = params[name]
            if isinstance(value, np.ndarray):
                value = to_torch(value)
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"params[{name!r}]: expected a torch.Tensor or np.ndarray, "
                    f"got {type(value).__name__}"
                )
            self._parameters[name].copy_(value.to(device=device, dtype=dtype))
        return self

    @classmethod
    def from_params(
        cls,
        params: Mapping[str, torch.Tensor | np.ndarray],
        lspec: ls.LowRankSpec,
        *,
        config: LowRankConfig | None = None,
        device: torch.device | str | None = None,
    ) -> FactorisedMLP:
        """A FactorisedMLP holding a copy of `params` (dtype lspec's; device `device`, else the
        first param's)."""
        if device is None:
            first = next(iter(params.values()), None)
            device = first.device if isinstance(first, torch.Tensor) else None
        return cls(lspec, config=config, device=device).load_params(params)

    def extra_repr(self) -> str:
        config = f", config={self.config}" if self.config is not None else ""
        return f"spec={self.lspec}{config}"

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y of shape [..., d_out] for x [..., d_in]."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        params = [self._parameters[name] for name in self._names]
        dtype = params[0].dtype
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            x = _autocast(x, dtype)
            params = [_autocast(p, dtype) for p in params]
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
            raise NotImplementedError(
                "FactorisedMLP: inference only (no factorised backward kernel yet); got a call "
                "that would build a gradient: run it under torch.no_grad(), or leave x and the "
                "parameters with requires_grad=False"
            )
        if (
            not torch.compiler.is_compiling()
            and type(x) is torch.Tensor
            and not torch.jit.is_tracing()
            and _dispatch_modes() == 0
        ):
            # No trace to keep it one node: the launches directly, without the op's dispatch.
            # Checked and planned once per call signature (lowrank_front._forward).
            lspec = self._lspecs.get(dtype, self._lspec)
            named = dict(zip(self._names, params, strict=True))
            return lowrank_front._forward(x, named, lspec, self._config)
        spec_json = self._spec_json.get(dtype, self._spec_json_default)
        return LOWRANK_MLP_OP(x, params, spec_json, self._config_json)


# ---- converters ----------------------------------------------------------------------------------
def from_hf(
    module: nn.Module,
    *,
    rank: int | Sequence[int] | None = None,
    energy: float | Sequence[float] | None = None,
    calibration: torch.Tensor | np.ndarray | None = None,
    damp: float = DEFAULT_DAMP,
    config: LowRankConfig | None = None,
) -> FactorisedMLP:
    """A FactorisedMLP approximating the Hugging Face MLP block `module`: plain (GPT2MLP-style)
    or gated (LlamaMLP / GemmaMLP: gate and up factorised at the layer's rank, one whitening for
    both; common/lowrank_spec.py).

    `rank` or `energy` (exactly one; one value or one per layer); `calibration`: a tensor of the
    block's real inputs [..., d_in] → activation-aware SVD (plain SVD without it)."""
    from .convert import from_hf as dense_from_hf

    dense = dense_from_hf(module)
    if isinstance(calibration, torch.Tensor) and (
        calibration.dim() < 1 or calibration.shape[-1] != dense.spec.d_in
    ):
        raise ValueError(
            f"calibration: expected shape [..., {dense.spec.d_in}] (the block's inputs), got "
            f"{fmt_shape(calibration.shape)}"
        )
    lspec, params = lowrank_front.factorise(
        dense.params(), dense.spec, rank=rank, energy=energy, calibration=calibration, damp=damp
    )
    device = next(iter(dense.parameters())).device
    return FactorisedMLP.from_params(params, lspec, config=config, device=device)
