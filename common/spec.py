"""MLPSpec: the one description of a fused MLP that both stacks, the reference and the harness read.

`widths = (d_in, hidden..., d_out)`; layer i maps widths[i] -> widths[i+1]; every layer but the last
applies the activation. Gated activations make each hidden layer `act(x·W + b) ⊙ (x·V + c)` (the GLU
paper's W and V): silu for swiglu (Llama), erf-gelu for geglu, tanh-gelu for geglu_tanh (Gemma and
Liger).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from typing import Any

from .dtypes import DTYPES, FP32_PRECISIONS

# Plain activations, applied elementwise after the bias.
PLAIN_ACTIVATIONS: tuple[str, ...] = ("relu", "gelu", "gelu_tanh", "silu")
# Gated activation -> the activation applied to the x·W + b branch (the x·V + c branch is linear).
GATED_ACTIVATIONS: dict[str, str] = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh"}
ACTIVATIONS: tuple[str, ...] = PLAIN_ACTIVATIONS + tuple(GATED_ACTIVATIONS)
# Keys the kernels' activation helpers accept: the plain ones and the identity of the last layer.
KERNEL_ACTIVATIONS: tuple[str, ...] = ("identity", *PLAIN_ACTIVATIONS)


@dataclass(frozen=True)
class Layer:
    """One layer of a spec, as the kernels see it."""

    index: int
    d_in: int
    d_out: int
    activation: str  # a KERNEL_ACTIVATIONS key; "identity" for the last layer
    gated: bool  # True: act(x·W + b) ⊙ (x·V + c)
    bias: bool


@dataclass(frozen=True)
class MLPSpec:
    widths: tuple[int, ...]
    activation: str
    bias: bool
    dtype: str
    fp32_precision: str = "ieee"

    def __post_init__(self) -> None:
        widths = self.widths
        if isinstance(widths, (str, bytes)) or not hasattr(widths, "__iter__"):
            raise ValueError(
                f"widths: expected a sequence of at least 2 positive ints, got {widths!r}"
            )
        widths = tuple(widths)
        if len(widths) < 2:
            raise ValueError(
                f"widths: expected at least 2 positive ints (d_in, d_out), got {widths}"
            )
        for i, w in enumerate(widths):
            if isinstance(w, bool) or not isinstance(w, int) or w <= 0:
                raise ValueError(f"widths[{i}]: expected a positive int, got {w!r}")
        object.__setattr__(self, "widths", widths)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {self.activation!r}")
        if not isinstance(self.bias, bool):
            raise ValueError(f"bias: expected a bool, got {self.bias!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {DTYPES}, got {self.dtype!r}")
        if self.fp32_precision not in FP32_PRECISIONS:
            raise ValueError(
                f"fp32_precision: expected one of {FP32_PRECISIONS}, got {self.fp32_precision!r}"
            )
        if self.fp32_precision == "tf32" and self.dtype != "float32":
            raise ValueError(
                f"fp32_precision: 'tf32' applies to dtype 'float32' only, got dtype {self.dtype!r}"
            )

    # ---- derived facts ---------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.widths[0]

    @property
    def d_out(self) -> int:
        return self.widths[-1]

    @property
    def num_layers(self) -> int:
        return len(self.widths) - 1

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    @property
    def base_activation(self) -> str:
        """The elementwise activation: silu for swiglu, gelu for geglu, gelu_tanh for geglu_tanh."""
        return GATED_ACTIVATIONS.get(self.activation, self.activation)

    def layers(self) -> tuple[Layer, ...]:
        # Cached per spec (both are frozen): every launch path walks the layers on every call.
        return _layers(self)

    def replace(self, **changes: Any) -> MLPSpec:
        return dataclasses.replace(self, **changes)

    # ---- JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "widths": list(self.widths),
            "activation": self.activation,
            "bias": self.bias,
            "dtype": self.dtype,
            "fp32_precision": self.fp32_precision,
        }

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MLPSpec:
        if not isinstance(data, dict):
            raise ValueError(f"spec: expected a JSON object, got {type(data).__name__}")
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(
                f"spec: unknown fields {unknown}; allowed fields are {sorted(allowed)}"
            )
        missing = sorted({"widths", "activation", "bias", "dtype"} - set(data))
        if missing:
            raise ValueError(f"spec: missing fields {missing}")
        widths = data["widths"]
        if isinstance(widths, list):
            widths = tuple(widths)
        return cls(**{**data, "widths": widths})

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike[str]) -> MLPSpec:
        """Parse a JSON string, or read a JSON file when given a path."""
        text = str(text_or_path)
        if isinstance(text_or_path, os.PathLike) or not text.lstrip().startswith("{"):
            with open(text_or_path) as f:
                text = f.read()
        return cls.from_dict(json.loads(text))

    @classmethod
    def preset(cls, name: str) -> MLPSpec:
        """A named preset (see `fusedmlp.common.presets.PRESETS`)."""
        from .presets import get_preset

        return get_preset(name).spec

    def __str__(self) -> str:
        arrow = "→".join(str(w) for w in self.widths)
        bias = "bias" if self.bias else "no bias"
        precision = f", {self.fp32_precision}" if self.dtype == "float32" else ""
        return f"{arrow} {self.activation}, {bias}, {self.dtype}{precision}"


@functools.lru_cache(maxsize=1024)
def _layers(spec: MLPSpec) -> tuple[Layer, ...]:
    last = spec.num_layers - 1
    return tuple(
        Layer(
            index=i,
            d_in=spec.widths[i],
            d_out=spec.widths[i + 1],
            activation="identity" if i == last else spec.base_activation,
            gated=spec.gated and i != last,
            bias=spec.bias,
        )
        for i in range(spec.num_layers)
    )
