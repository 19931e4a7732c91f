"""FusedMLP: the fused MLP as an `nn.Module`, a drop-in for a Llama-, Gemma- or GPT-style MLP block.

    y = MLP(x) (+ residual),   hidden layer i: act(h·W_i + b_i) [⊙ (h·V_i + c_i) when gated]

Parameters are held packed (common/packing.py), packed once when the module is built or loaded:
each gated layer's gate and up weights as one `wv{i}` [in, 2·Np] and biases as `bc{i}`, the other
layers as `w{i}` [in, out] and `b{i}` (weights `[in, out]`, so `x @ w`). They are initialised
deterministically from `fusedmlp.common.init_params(spec, seed)`, the same numbers the JAX stack
and the golden files use; `params()` gives them back in the contract's names. `load_params` and
`load_state_dict` take either layout (a state dict saved with `w0`, `v0`, ... is packed on load).
`forward` calls the registered op `torch.ops.fusedmlp.mlp` (custom_op.py), which runs
`fusedmlp.torch_impl.front.mlp`: the front validates and plans once per call signature (`impl`,
"auto" by default) and launches the kernels. torch.compile(fullgraph=True) sees one node — except
where the call's plan is "compile" (`auto` measured it fastest at this M, or it is pinned; in
training, a baseline; 16-bit dtypes, static shapes): there the compiled forward traces its ops on
the packed params (baselines.eager_packed), and Inductor fuses them into the caller's graph as it
fused the module this one replaced (`_traced_baseline`) — and where an inference call of static
shapes runs `fused_decode` or the portable kernels (not under Triton's interpreter): there it
calls `torch.ops.fusedmlp.mlp_launches` (graph_op.py), whose launches are nodes of the caller's
graph, so that Inductor launches the kernels itself and no op, front or Triton launch path runs
per call. Where nothing needs the op — an eager call with no gradient to build (no_grad,
inference_mode, or frozen params), no trace, no export — forward calls the front directly: the
same kernels, without the op's dispatch cost.

dtype: the module computes in its parameters' dtype, as `nn.Linear` does: `FusedMLP(spec)` holds
params in `spec.dtype`; `dtype=` or a later `.to(torch.bfloat16)` changes both, and `.spec` follows.
The input must then have that dtype (the front's ValueError names both otherwise).

Mixed precision: under `torch.autocast` (cuda: float16/bfloat16; cpu: bfloat16) the module casts x,
the params and the residual to the autocast dtype and runs the spec of that dtype, as nn.Linear's
autocast rule does; the output has the autocast dtype and matches the reference of that dtype.
Like nn.Linear's, the cast reads every float32 weight and writes a 16-bit copy on each call, three
times the weight bytes the kernels then read: for inference, `.to(torch.bfloat16)` the module.

Training: `loss.backward()` works (issue 24). Where a gradient is to be built, forward calls the
training op `torch.ops.fusedmlp.mlp_train` (custom_op.py `train_call`: the op under a trace, the
same forward and backward as one autograd.Function in eager mode, without the op's dispatch) with
the module's `saved` policy ("preact", the default, or "inputs": common.config.SAVED_POLICIES);
its backward runs the portable
backward kernels (backward.py) and the gradients land in the parameters in their dtype and packed
layout (a gated layer's `wv{i}` gets the packed gradient directly). Under autocast the cast to the
autocast dtype is an ordinary differentiable op outside the custom op, so float32 parameters get
float32 gradients. A baseline impl ("eager", "compile") differentiates through torch autograd.

Converters from Hugging Face modules and `nn.Linear` stacks: convert.py (`FusedMLP.from_hf`,
`FusedMLP.from_linears`). Twin: none (the JAX stack is functional: jax_impl.front.mlp).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import has_static_value

from fusedmlp.common import DTYPES, MLPSpec, TileConfig, dispatch, init_params, param_shapes
from fusedmlp.common import packing as common_packing
from fusedmlp.common.config import DEFAULT_SAVED
from fusedmlp.common.packing import is_packed, packed_names
from fusedmlp.common.registry import AUTO, check_impl, get_implementation
from fusedmlp.common.validate import check_config, check_saved, check_spec, fmt_shape

from . import front, graph_op
from .baselines import eager_packed, packed_recipe
from .custom_op import MLP_OP, config_to_json, exporting, parse_spec, spec_to_json, train_call
from .packing import pack_params, unpack_params

_TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}


def dtype_name(dtype: torch.dtype | str) -> str:
    """The contract name ("float32", "float16", "bfloat16") of a torch dtype, or ValueError."""
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype: expected one of {DTYPES}, got {dtype}")
    return name


def to_torch(array: np.ndarray, device: str | torch.device | None = None) -> torch.Tensor:
    """A NumPy array (bfloat16 from ml_dtypes included) as a torch tensor, bit for bit, on `device`
    (None: the CPU). The one NumPy -> torch conversion of the project (tests and bench use it);
    the tensor owns its memory (a copy: the array may be read-only, as golden files' are)."""
    array = np.ascontiguousarray(array)
    if array.dtype.name == "bfloat16":
        # torch.from_numpy knows no ml_dtypes bfloat16: move the raw bits and reinterpret them.
        t = torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    else:
        t = torch.from_numpy(array.copy())
    return t if device is None else t.to(device)


def _with_dtype(spec: MLPSpec, dtype: str) -> MLPSpec:
    if dtype == spec.dtype:
        return spec
    # tf32 describes float32 products only; a 16-bit spec has IEEE products with fp32 accumulation.
    precision = spec.fp32_precision if dtype == "float32" else "ieee"
    return spec.replace(dtype=dtype, fp32_precision=precision)


class FusedMLP(nn.Module):
    """The fused MLP of `spec` with registered parameters (see the module docstring).

    Args:
        spec: widths, activation, bias, dtype (the parameters' dtype unless `dtype` is given).
        impl: the front's implementation name ("auto", "triton", "triton_tma", "fused_small",
            "fused_decode", "eager", ...): `fusedmlp.common.impl_names("torch")`.
        config: one TileConfig for every kernel launch (None: the heuristic per layer).
        device, dtype: where and in what dtype the parameters live (`dtype` overrides spec.dtype).
        seed: the seed of `init_params` (deterministic initialisation); None leaves the
            parameters uninitialised, for `load_params` to fill (what the converters do).
        saved: what a training forward keeps for the backward, "preact" (default) or "inputs"
            (common.config.SAVED_POLICIES; `front.plan(..., saved=)` gives the bytes).
    """

    def __init__(
        self,
        spec: MLPSpec,
        *,
        impl: str = AUTO,
        config: TileConfig | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        seed: int | None = 0,
        saved: str = DEFAULT_SAVED,
    ) -> None:
        super().__init__()
        self.saved = check_saved(saved)
        spec = check_spec(spec)
        if dtype is not None:
            spec = _with_dtype(spec, dtype_name(dtype))
        self._spec = spec  # widths, activation, bias, precision; the dtype follows the params
        # The op's string arguments, built here and when impl/config change, never in forward:
        # torch.compile then traces no dataclass (torch 2.11's Dynamo cannot make constants of
        # frozen dataclass instances). One spec string per dtype the params or autocast may have.
        self._specs = {_TORCH_DTYPES[d]: _with_dtype(spec, d) for d in DTYPES}
        self._spec_json = {t: spec_to_json(s) for t, s in self._specs.items()}
        self._spec_json_default = self._spec_json[_TORCH_DTYPES[spec.dtype]]
        self.impl = impl
        self.config = config
        self._names = tuple(packed_names(spec))  # the parameters, in the op's list order
        # What a compiled call that runs a baseline traces (`_traced_baseline`): primitives only.
        self._recipe = packed_recipe(spec)
        self._d_in, self._d_out = spec.d_in, spec.d_out
        for name, shape in packed_names(spec).items():
            empty = torch.empty(shape, device=device, dtype=getattr(torch, spec.dtype))
            self.register_parameter(name, nn.Parameter(empty))
        if seed is not None:
            self.reset_parameters(seed)

    # ---- parameters ------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Refill every parameter with `init_params(spec, seed)`, packed (in place; device, dtype
        kept)."""
        plain = init_params(self.spec, seed)
        for name, value in common_packing.pack_params(self.spec, plain).items():
            param = self._parameters[name]
            param.copy_(to_torch(value).to(param.device))

    def packed_params(self) -> dict[str, torch.Tensor]:
        """The parameters as held, in the packed names (`packed_names(spec)` order)."""
        return {name: self._parameters[name] for name in self._names}

    def params(self) -> dict[str, torch.Tensor]:
        """The parameters in the contract's names (`param_shapes(spec)` order): copies of the
        packed gated weights, the other parameters themselves."""
        return unpack_params(self._spec, self.packed_params())

    @torch.no_grad()
    def load_params(self, params: Mapping[str, torch.Tensor | np.ndarray]) -> FusedMLP:
        """Copy `params` into the parameters: the contract's names and [in, out] shapes (packed
        here, once) or the packed names of `pack_params`."""
        packed = is_packed(params)
        expected = packed_names(self._spec) if packed else param_shapes(self._spec)
        missing = [n for n in expected if n not in params]
        extra = sorted(n for n in params if n not in expected)
        if missing or extra:
            layout = " (packed)" if packed else ""
            raise ValueError(
                f"params: missing {missing}, unexpected {extra}; the spec {self.spec} needs"
                f"{layout} {list(expected)}"
            )
        tensors = {}
        for name, shape in expected.items():
            value = params[name]
            value = to_torch(value) if isinstance(value, np.ndarray) else value
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"params[{name!r}]: expected a torch.Tensor or np.ndarray, "
                    f"got {type(value).__name__}"
                )
            if tuple(value.shape) != shape:
                raise ValueError(
                    f"params[{name!r}]: expected shape {fmt_shape(shape)}, got "
                    f"{fmt_shape(value.shape)}"
                )
            tensors[name] = value
        dtype = self._parameters[self._names[0]].dtype
        device = self._parameters[self._names[0]].device
        tensors = {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}
        for name, value in pack_params(self._spec, tensors).items():
            self._parameters[name].copy_(value)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A state dict in the contract's names (saved before the params were packed, or written
        # by hand): pack its gated layers here, so load_state_dict takes either layout.
        names = {k[len(prefix) :] for k in state_dict if k.startswith(prefix)}
        plain = set(param_shapes(self._spec)) - set(self._names)
        if plain and plain <= names:
            ours = {n: state_dict.pop(prefix + n) for n in param_shapes(self._spec)}
            for name, value in pack_params(self._spec, ours).items():
                state_dict[prefix + name] = value
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_params(
        cls,
        params: Mapping[str, torch.Tensor | np.ndarray],
        spec: MLPSpec,
        *,
        impl: str = AUTO,
        config: TileConfig | None = None,
        device: torch.device | str | None = None,
    ) -> FusedMLP:
        """A FusedMLP holding a copy of `params` (dtype: spec.dtype; device: `device`, else the
        first param's)."""
        spec = check_spec(spec)
        if device is None:
            first = next(iter(params.values()), None)
            device = first.device if isinstance(first, torch.Tensor) else None
        module = cls(spec, impl=impl, config=config, device=device, seed=None)
        return module.load_params(params)

    # ---- impl and config: validated, their op strings precomputed -------------------------------
    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, impl: str) -> None:
        self._impl = check_impl(impl, front.STACK)
        self._baseline = impl != AUTO and get_implementation(impl).baseline

    @property
    def saved(self) -> str:
        return self._saved

    @saved.setter
    def saved(self, saved: str) -> None:
        self._saved = check_saved(saved)

    @property
    def config(self) -> TileConfig | None:
        return self._config

    @config.setter
    def config(self, config: TileConfig | None) -> None:
        self._config = check_config(config)
        self._config_json = config_to_json(config)

    # ---- the spec the parameters have now ------------------------------------------------------
    @property
    def spec(self) -> MLPSpec:
        """The spec of the current parameters (its dtype follows `.to(dtype)`)."""
        return _spec_for(self._spec, self._parameters[self._names[0]].dtype)

    def extra_repr(self) -> str:
        config = f", config={self.config}" if self.config is not None else ""
        saved = f", saved={self.saved!r}" if self.saved != DEFAULT_SAVED else ""
        return f"spec={self.spec}, impl={self.impl!r}{config}{saved}"

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """y = MLP(x) (+ residual), x of shape [..., d_in] -> [..., d_out]."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        params = [self._parameters[name] for name in self._names]
        dtype = params[0].dtype
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # nn.Linear's autocast rule: floating inputs (not float64) are cast to the autocast
            # dtype, the product runs there, the output keeps it. A cast is a no-op when equal.
            dtype = torch.get_autocast_dtype(device_type)
            if dtype not in (torch.float16, torch.bfloat16, torch.float32):
                raise ValueError(
                    f"autocast: expected dtype float16 or bfloat16 (or float32), got {dtype} "
                    f"(device type {device_type})"
                )
            x = _autocast(x, dtype)
            params = [_autocast(p, dtype) for p in params]
            residual = _autocast(residual, dtype) if residual is not None else None
        compiling = torch.compiler.is_compiling()
        if compiling and dtype in _TRACED_BASELINE_DTYPES:
            traced = self._traced_baseline(x, params, dtype, residual)
            if traced is not None:
                return traced
        if not compiling and _eager_without_autograd(x, params, residual):
            # Nothing needs the registered op here (no trace to keep it one node, no gradient to
            # refuse): call the front directly and skip the op's dispatch, about 29 µs a call on
            # the 2-core CPU machine (FusedMLP 70 µs vs the front's 35 µs with eager ops, f32).
            # No gradient to build: front.mlp's route would be its `forward`, called here.
            spec = self._specs.get(dtype, self._spec)
            named = dict(zip(self._names, params, strict=True))
            config = self._config
            return front.forward(x, named, spec, impl=self._impl, config=config, residual=residual)
        # A dtype outside the contract (float64 params, say) keeps the spec: the front names it.
        spec_json = self._spec_json.get(dtype, self._spec_json_default)
        # torch.export keeps the one inference op (it differentiates too, as saved="inputs").
        if _builds_grad(x, params, residual) and not exporting():
            baseline = self._impl if self._baseline else self._trained_by(x, dtype)
            if baseline is not None:  # torch's own autograd through the baseline's ops
                spec = self._specs.get(dtype, self._spec)
                named = dict(zip(self._names, params, strict=True))
                return front.forward(
                    x, named, spec, impl=baseline, config=self._config, residual=residual
                )
            impl, config_json = self._impl, self._config_json
            return train_call(x, params, spec_json, impl, config_json, residual, self._saved)
        if compiling and graph_op.takes_call(x, spec_json, self._impl, self._config_json, residual):
            # our kernels as nodes of the caller's graph, launched by Inductor (graph_op.py)
            op = graph_op.MLP_LAUNCHES_OP
            return op(x, params, spec_json, self._impl, self._config_json, residual)
        return MLP_OP(x, params, spec_json, self._impl, self._config_json, residual)

    def _traced_baseline(
        self,
        x: torch.Tensor,
        params: list[torch.Tensor],
        dtype: torch.dtype,
        residual: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """Under torch.compile, where this call's plan is "compile" (`auto`'s measured choice at
        this M, or pinned; where a gradient is to be built, a baseline: a training point of the
        table, or pinned — `_traces_baseline`), the baseline's ops on the packed params
        (baselines.eager_packed), traced into the caller's graph: Inductor fuses them as it
        fuses the module this one replaced, and the call pays no opaque op, no front and no
        nested compiled function (on the H200 host that path cost ~400 µs a call more than the
        HF module compiled). None where the op runs: our kernels, an "eager" plan (ATen's
        kernels, measured faster there than Inductor's), a symbolic M (dynamic shapes), export,
        or a call the front must refuse (the op's fake raises its ValueError at trace time).
        Float32 keeps the op: the spec's fp32_precision is a runtime flag
        (baselines.fp32_matmul_precision), not traced."""
        if exporting() or x.ndim == 0:  # export keeps the one inference op
            return None
        lead = x.shape[:-1]
        m = math.prod(lead)
        # has_static_value, not isinstance: Dynamo folds isinstance(a SymInt, int) to True.
        if not has_static_value(m) or x.dtype != dtype or x.shape[-1] != self._d_in:
            return None
        if x.device != params[0].device:
            return None
        if residual is not None and (
            tuple(residual.shape) != (*lead, self._d_out)
            or residual.dtype != dtype
            or residual.device != x.device
        ):
            return None
        spec_json = self._spec_json.get(dtype, self._spec_json_default)
        training = _builds_grad(x, params, residual)
        device = x.device.type
        has_residual = residual is not None
        # Reading the table's generation here makes Dynamo guard on it (a table installed after
        # the trace, dispatch.install, retraces the call, which decides again); it is passed on
        # so that the decision names everything it depends on.
        generation = dispatch.generation()
        if not _traces_baseline(
            spec_json, self._impl, self._config_json, m, device, has_residual, training, generation
        ):
            return None
        named = dict(zip(self._names, params, strict=True))
        residual2d = residual.reshape(m, self._d_out) if residual is not None else None
        y = eager_packed(x.reshape(m, self._d_in), named, self._recipe, residual2d)
        return y.reshape(*lead, self._d_out)

    def _trained_by(self, x: torch.Tensor, dtype: torch.dtype) -> str | None:
        """The baseline `auto` trains through at this call (a training point of the dispatch
        table: front.training_choice), or None for our kernels. Not under torch.compile: there
        `_traced_baseline` asks the same table at trace time (16-bit dtypes; a compiled float32
        call trains through the training op)."""
        if self._impl != AUTO or self._config is not None or torch.compiler.is_compiling():
            return None
        spec = self._specs.get(dtype, self._spec)
        trained = front.training_choice(spec, math.prod(x.shape[:-1]), x.device.type)
        return trained[0] if trained is not None else None

    # ---- converters (convert.py) -----------------------------------------------------------------
    @classmethod
    def from_hf(
        cls,
        module: nn.Module,
        *,
        impl: str = AUTO,
        config: TileConfig | None = None,
        rank: int | tuple[int, ...] | None = None,
        energy: float | tuple[float, ...] | None = None,
        calibration: torch.Tensor | None = None,
    ) -> FusedMLP:
        """A FusedMLP computing what a Hugging Face LlamaMLP / GemmaMLP / GPT2MLP computes.

        With `rank=` or `energy=` (and optionally `calibration=`, the block's real inputs
        [..., d_in]: activation-aware SVD): a low-rank compressed FactorisedMLP instead
        (lowrank_module.py; `config` then a LowRankConfig or None, `impl` "auto")."""
        if rank is not None or energy is not None or calibration is not None:
            from .lowrank_front import check_impl as lowrank_impl
            from .lowrank_module import from_hf as lowrank_from_hf

            lowrank_impl(impl)
            return lowrank_from_hf(  # type: ignore[return-value]
                module, rank=rank, energy=energy, calibration=calibration, config=config
            )
        from .convert import from_hf

        return from_hf(module, impl=impl, config=config)

    @classmethod
    def from_linears(
        cls,
        *linears: nn.Linear,
        activation: str,
        impl: str = AUTO,
        config: TileConfig | None = None,
    ) -> FusedMLP:
        """A FusedMLP computing linears[-1](act(... act(linears[0](x)))) (plain activations)."""
        from .convert import from_linears

        return from_linears(*linears, activation=activation, impl=impl, config=config)


def _eager_without_autograd(
    x: torch.Tensor, params: list[torch.Tensor], residual: torch.Tensor | None
) -> bool:
    """True where calling the front directly is the op's call exactly: plain tensors (no fake,
    functional or proxy tensor of a trace or an export), no dispatch mode, no jit trace, and no
    gradient to build (the training op's backward is what computes it)."""
    if type(x) is not torch.Tensor or torch.jit.is_tracing() or _dispatch_modes() > 0:
        return False
    if not torch.is_grad_enabled():
        return True
    return not (
        x.requires_grad
        or any(p.requires_grad for p in params)
        or (residual is not None and residual.requires_grad)
    )


def _builds_grad(
    x: torch.Tensor, params: list[torch.Tensor], residual: torch.Tensor | None
) -> bool:
    return torch.is_grad_enabled() and (
        x.requires_grad
        or any(p.requires_grad for p in params)
        or (residual is not None and residual.requires_grad)
    )


# A compiled call traces a baseline's ops in these dtypes only (`FusedMLP._traced_baseline`).
_TRACED_BASELINE_DTYPES = (torch.float16, torch.bfloat16)


@torch.compiler.assume_constant_result
def _traces_baseline(
    spec_json: str,
    impl: str,
    config_json: str | None,
    m: int,
    device: str,
    has_residual: bool,
    training: bool,
    generation: int,
) -> bool:
    """Whether a compiled call of this signature traces a baseline's ops instead of calling the
    op. Inference: where its plan is "compile" (pinned, or what `auto` resolves to with the table
    of `generation`): Inductor's graph of those ops is what was measured. An "eager" plan keeps
    the op, whose ATen kernels `auto` measured faster than Inductor's there (GPT-2's MLP at 4096
    tokens: ATen's gelu 29.2 µs for the model's two MLP calls, Inductor's 31.8 and 43.8 µs in
    two compiles of one graph).
    Training: where a baseline is pinned or `auto`'s training point names one (its ops then
    differentiate in the caller's graph). Evaluated once, when torch.compile traces the call (its
    arguments are primitives: see custom_op.py). The graph guards on M as static shapes do
    (another M traces and decides again; under automatic dynamic shapes the second M makes M
    symbolic, and the op runs from then on), and on the table's generation."""
    del generation  # a guard, not an input: front.plan reads the installed table itself
    if impl != AUTO:
        return get_implementation(impl).baseline if training else impl == "compile"
    if config_json is not None:  # a pinned config is for our kernels
        return False
    spec = parse_spec(spec_json)
    if training:
        return front.training_choice(spec, m, device) is not None
    chosen = front.plan(spec, (m, spec.d_in), impl=impl, device=device, residual=has_residual)
    return chosen.impl == "compile"


def _dispatch_modes() -> int:
    return torch._C._len_torch_dispatch_stack()


def _autocast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if t.is_floating_point() and t.dtype != torch.float64:
        return t.to(dtype)
    return t


def _spec_for(spec: MLPSpec, dtype: torch.dtype) -> MLPSpec:
    # A dtype outside the contract (float64 params, say) keeps the spec: the front then names it.
    name = str(dtype).removeprefix("torch.")
    return _with_dtype(spec, name) if name in DTYPES else spec
