"""The float64 reference: the third twin, against which every kernel is judged.

`forward` computes `y` in float64 on the dtype-rounded inputs (the arrays as stored), with no
intermediate rounding. Kernels round at these points, which the tolerance policy accounts for:

1. products are accumulated in float32 (tf32 operands when `fp32_precision="tf32"`);
2. bias, activation and gate product are computed in float32 from the accumulator (the epilogue);
3. each hidden layer is rounded to the spec dtype when it is stored (per-layer kernels), or kept in
   registers and rounded to the dtype before the next layer's dot (fused kernels);
4. the output is rounded to the spec dtype once, at the store.

`forward(..., round_hidden=True)` applies rounding points 3 and 4 in float64, to separate the error
a
kernel must have (dtype storage) from the error it adds (accumulation, activation formulas).

`backward` gives the gradients of `sum(y * dy)` with respect to x and every param.
Activation formulas (each kernel helper computes the same expressions):
    relu(z)      = max(z, 0)            (NaN propagates)
    gelu(z)      = z/2 · (1 + erf(z/√2))
    gelu_tanh(z) = z/2 · (1 + tanh(√(2/π) · (z + 0.044715 z³)))
    silu(z)      = z · sigmoid(z)
and their derivatives in `activation_grad`; relu'(z) = 1 where z > 0, NaN where z is NaN, else 0.
The kernels' training keeps no z for relu and reads relu' off the stored output h = relu(z)
instead (1 where h > 0, NaN where h is NaN, 0 elsewhere; torch's ReLU backward does the same):
that differs from relu'(z) here only where 0 < z and the rounded output is 0 (fp16 below ~3e-8),
where the stored z the kernels read before rounded to 0 as well.

Reproducible mode (`with reproducible():`, what the golden files are computed and checked in):
the same bits on every x86-64 machine with FMA (every AVX2 and AVX-512 CPU) and glibc. NumPy's `@`
calls the BLAS, whose kernel (blocking, SIMD width, hence the order of additions) is chosen for
the CPU at run time, and NumPy's exp and tanh have SIMD versions per CPU (AVX2, AVX-512): the
golden files made on an AVX-512 machine did not regenerate on an AVX2 one (57 of 61 differed,
relu's among them). In the mode, products are summed over K in order with one rounding per
multiply and per add (`matmul`: NumPy's elementwise ops, exact per element whatever the SIMD
width), and exp and tanh come from the C library element by element (erf always does). glibc
picks its FMA versions on CPUs with FMA: on an x86-64 CPU without FMA, exp and tanh can differ
in the last bit. The cube in gelu_tanh is `z * z * z` in both modes (no library call). About K
times slower than BLAS: for the golden files' small arrays, not the harness's.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence

import numpy as np

from .dtypes import round_to
from .params import param_shapes
from .spec import MLPSpec

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_TANH_COEFF = 0.044715
_erf = np.frompyfunc(math.erf, 1, 1)


def erf(z: np.ndarray) -> np.ndarray:
    return _erf(z).astype(np.float64)


# ---- reproducible mode (see the module docstring) ------------------------------------------------
_REPRODUCIBLE: contextvars.ContextVar[bool] = contextvars.ContextVar("reproducible", default=False)


@contextlib.contextmanager
def reproducible() -> Iterator[None]:
    """Within (this thread or task): every product, exp and tanh of this module the same bits on
    every x86-64 CPU with FMA."""
    token = _REPRODUCIBLE.set(True)
    try:
        yield
    finally:
        _REPRODUCIBLE.reset(token)


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b for 2-D float64 arrays; in reproducible mode summed over K in order."""
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"matmul: expected 2-D arrays, got shapes {a.shape} and {b.shape}")
    if not _REPRODUCIBLE.get():
        return a @ b
    out = np.zeros((a.shape[0], b.shape[1]))
    for k in range(a.shape[1]):
        out += a[:, k, None] * b[None, k, :]
    return out


def _libm_exp(v: float) -> float:
    try:
        return math.exp(v)
    except OverflowError:  # math.exp raises where np.exp gives inf
        return math.inf


_LIBM = {"exp": np.frompyfunc(_libm_exp, 1, 1), "tanh": np.frompyfunc(math.tanh, 1, 1)}


def _exp(z: np.ndarray) -> np.ndarray:
    return _LIBM["exp"](z).astype(np.float64) if _REPRODUCIBLE.get() else np.exp(z)


def _tanh(z: np.ndarray) -> np.ndarray:
    return _LIBM["tanh"](z).astype(np.float64) if _REPRODUCIBLE.get() else np.tanh(z)


def activation(name: str, z: np.ndarray) -> np.ndarray:
    """Elementwise activation in float64."""
    if name == "identity":
        return z
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "gelu":
        return 0.5 * z * (1.0 + erf(z / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * z * (1.0 + _tanh(SQRT_2_OVER_PI * (z + GELU_TANH_COEFF * (z * z * z))))
    if name == "silu":
        with np.errstate(over="ignore"):
            return z / (1.0 + _exp(-z))
    raise ValueError(f"activation: unknown kernel activation {name!r}")


def activation_grad(name: str, z: np.ndarray) -> np.ndarray:
    """d act(z) / dz in float64."""
    if name == "identity":
        return np.ones_like(z)
    if name == "relu":
        return np.where(np.isnan(z), np.nan, (z > 0).astype(np.float64))
    if name == "gelu":
        cdf = 0.5 * (1.0 + erf(z / math.sqrt(2.0)))
        pdf = _exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        return cdf + z * pdf
    if name == "gelu_tanh":
        u = SQRT_2_OVER_PI * (z + GELU_TANH_COEFF * (z * z * z))
        t = _tanh(u)
        du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_COEFF * z * z)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du
    if name == "silu":
        with np.errstate(over="ignore"):
            s = 1.0 / (1.0 + _exp(-z))
        return s * (1.0 + z * (1.0 - s))
    raise ValueError(f"activation: unknown kernel activation {name!r}")


def _check(spec: MLPSpec, x: np.ndarray, params: dict[str, np.ndarray]) -> None:
    if x.ndim < 1 or x.shape[-1] != spec.d_in:
        raise ValueError(f"x: expected shape [..., {spec.d_in}], got {list(x.shape)}")
    expected = param_shapes(spec)
    if set(params) != set(expected):
        missing, extra = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
        raise ValueError(f"params: missing {missing}, unexpected {extra}")
    for name, shape in expected.items():
        if tuple(params[name].shape) != shape:
            raise ValueError(f"params[{name!r}]: expected shape {shape}, got {params[name].shape}")


def _layers_forward(
    spec: MLPSpec,
    x2d: np.ndarray,
    p: dict[str, np.ndarray],
    round_hidden: bool,
    hidden: Sequence[np.ndarray] | None = None,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Per layer: (input, pre-activation z = x·W + b, gate g = x·V + c or None); last: output.
    `hidden`: hidden layer l's output is hidden[l] (float64 of the given values), not computed."""
    saved = []
    h = x2d
    for layer in spec.layers():
        i = layer.index
        z = matmul(h, p[f"w{i}"]) + (p[f"b{i}"] if layer.bias else 0.0)
        gate = matmul(h, p[f"v{i}"]) + (p[f"c{i}"] if layer.bias else 0.0) if layer.gated else None
        saved.append((h, z, gate))
        out = activation(layer.activation, z)
        if gate is not None:
            out = out * gate
        h = round_to(out, spec.dtype) if round_hidden else out
        if hidden is not None and i < spec.num_layers - 1:
            h = np.asarray(hidden[i], dtype=np.float64).reshape(h.shape)
    saved.append((h, h, None))
    return saved


def _as_float64(spec: MLPSpec, x: np.ndarray, params: dict[str, np.ndarray]):
    _check(spec, x, params)
    x2d = np.asarray(x, dtype=np.float64).reshape(-1, spec.d_in)
    return x2d, {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}


def forward(
    spec: MLPSpec, x: np.ndarray, params: dict[str, np.ndarray], *, round_hidden: bool = False
) -> np.ndarray:
    """y in float64, shape `[..., d_out]`. `round_hidden`: hidden and y rounded to the dtype."""
    x2d, p = _as_float64(spec, x, params)
    y = _layers_forward(spec, x2d, p, round_hidden)[-1][0]
    return y.reshape(*np.shape(x)[:-1], spec.d_out)


def backward(
    spec: MLPSpec,
    x: np.ndarray,
    params: dict[str, np.ndarray],
    dy: np.ndarray,
    *,
    round_hidden: bool = False,
    hidden: Sequence[np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Gradients of `sum(y * dy)` in float64: key "x" and every param, in its input's shape.
    `round_hidden`: at the forward with hidden layers rounded to the dtype, as the kernels store
    them (the linearisation point the gradient tolerance uses: common/tolerance.py). `hidden`: at
    a kernel's own stored forward instead — hidden layers 0 … L-2's outputs as it saved them (each
    [M, width]; every z and gate recomputed in float64 from them), for relu at many rows, where
    the last bits of a kernel's hiddens (its fp32 sums rounded) move some pre-activations near 0
    across it (common/tolerance.py).

    For a gated layer h = act(z) ⊙ g with z = x·W + b and g = x·V + c:
    dz = dh ⊙ g ⊙ act'(z), dg = dh ⊙ act(z), dW = xᵀ·dz, db = Σ dz, dV = xᵀ·dg, dc = Σ dg,
    dx = dz·Wᵀ + dg·Vᵀ. Plain layers drop the g terms (g ≡ 1).
    """
    x2d, p = _as_float64(spec, x, params)
    if np.shape(dy) != (*np.shape(x)[:-1], spec.d_out):
        raise ValueError(
            f"dy: expected shape {[*np.shape(x)[:-1], spec.d_out]}, got {list(np.shape(dy))}"
        )
    if hidden is not None and len(hidden) != spec.num_layers - 1:
        raise ValueError(
            f"hidden: expected {spec.num_layers - 1} hidden layers' outputs, got {len(hidden)}"
        )
    saved = _layers_forward(spec, x2d, p, round_hidden, hidden)
    grads: dict[str, np.ndarray] = {}
    dh = np.asarray(dy, dtype=np.float64).reshape(-1, spec.d_out)
    for layer in reversed(spec.layers()):
        i = layer.index
        h_in, z, gate = saved[i]
        dz = dh * activation_grad(layer.activation, z)
        if gate is not None:
            dz = dz * gate
            dg = dh * activation(layer.activation, z)
            grads[f"v{i}"] = matmul(h_in.T, dg)
            if layer.bias:
                grads[f"c{i}"] = dg.sum(axis=0)
        grads[f"w{i}"] = matmul(h_in.T, dz)
        if layer.bias:
            grads[f"b{i}"] = dz.sum(axis=0)
        dh = matmul(dz, p[f"w{i}"].T)
        if gate is not None:
            dh = dh + matmul(dg, p[f"v{i}"].T)
    grads["x"] = dh.reshape(np.shape(x))
    return {k: grads[k] for k in ("x", *param_shapes(spec))}
