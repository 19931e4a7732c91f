"""fused_small: the whole narrow MLP (every width <= 128) in one Pallas-Triton kernel.

    h_0 = x;   h_{l+1} = round(act(h_l·W_l + b_l) [⊙ (h_l·V_l + c_l)])   (l < L-1)
    y = h_{L-1}·W_{L-1} + b_{L-1}

Neural fields, small policies and per-pixel MLPs run 16..128-wide MLPs over millions of rows; as
separate GEMMs they are bound by the traffic of their hidden activations. Here each program takes
BLOCK_M rows, reads its x tile once, carries the hidden through every layer in registers (one `dot`
per layer, two for a gated layer, both fed by the same register input) and writes only y.

Widths are compile-time constants from the closed set 16/32/64/128 (tiny-cuda-nn's fully fused MLP):
every layer is padded to one WIDTH, the smallest member of the set >= max(widths). Odd widths work
by zero padding: padded rows/columns of W, V, b, c are 0, so padded lanes of every hidden are
act(0)·0 = 0 (relu, gelu, gelu_tanh, silu all map 0 to 0) and contribute nothing to the next layer;
x's padded lanes are masked to 0 at the load and y's at the store.

Grid: (cdiv(M, BLOCK_M),); program i owns rows [i·BLOCK_M, (i+1)·BLOCK_M). TileConfig mapping:
`block_m` = BLOCK_M, `num_warps`, `num_stages`; `block_n`/`block_k` are unused (the tile's N and K
are WIDTH). Refs are whole arrays addressed with `pl.ds` and masks, as the twin's pointers are: on
the GPU the Pallas-Triton lowering does not mask blocks that overhang an array, and in interpret
mode a masked `pl.ds` load pads instead of shifting the window.

Params are packed by the launcher into one [L, WIDTH, WIDTH] weight array (and one for V when gated)
and one [L, WIDTH] float32 bias array (and c), zero-padded, so the kernel walks the layers with a
static Python loop over one ref. Packing is traced with the call (under `jax.jit` XLA fuses it into
one small op; params are <= 8·128·128 elements); `pack_params` and `packed=` let a caller pack once.

Rounding points (common/reference.py): fp32 accumulation; bias, activation and gate in fp32; the
hidden is rounded to the spec dtype before the next layer's dot (what a per-layer kernel's store
would do, so the two paths agree and tensor-core operands stay 16-bit); y rounded once at the store.

Twin: torch_impl/fused_small.py (Triton, same names and sections).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from fusedmlp.common.config import TileConfig
from fusedmlp.common.params import param_shapes
from fusedmlp.common.spec import MLPSpec

from .activations import apply_activation
from .compat import interpret_mode, quiet_pallas_triton

WIDTHS_SUPPORTED = (16, 32, 64, 128)  # the closed set of compile-time widths
MAX_LAYERS = 8
FALLBACK = "pallas_triton"  # the per-layer kernels

# Under the interpreter: few programs, yet M = 37 and 300 still span several ragged row blocks.
INTERPRET_CONFIG = TileConfig(block_m=32, block_n=16, block_k=16, group_m=1, num_warps=4,
                              num_stages=1)


# ---- helpers shared by the whole-MLP kernels -----------------------------------------------------
def round_to_dtype(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Round an fp32 tile to dtype (jnp's cast rounds to nearest even in both modes)."""
    # twin-diff: the Triton twin keeps fp32 tiles under its interpreter (broken bf16 there); the
    # Pallas interpreter computes bf16 correctly, so one path serves both modes.
    return x.astype(dtype)


def dot_precision(spec: MLPSpec) -> jax.lax.Precision:
    """The dot precision: HIGH is tf32 in the Pallas-Triton lowering, HIGHEST is ieee (DEFAULT would
    be tf32 for float32 operands)."""
    return jax.lax.Precision.HIGH if spec.fp32_precision == "tf32" else jax.lax.Precision.HIGHEST


def padded_width(width: int) -> int:
    """The smallest member of the closed set 16/32/64/128 that holds `width`."""
    return next(w for w in WIDTHS_SUPPORTED if w >= width)


# ---- forward kernel ------------------------------------------------------------------------------
def _fused_small_fwd_kernel(
    x_ref, w_ref, v_ref, b_ref, c_ref, y_ref,
    *, M, D_IN, D_OUT,
    NUM_LAYERS, WIDTH, BLOCK_M, ACTIVATION, GATED, HAS_BIAS, DOT_PRECISION,
):
    # 1. program -> tile: BLOCK_M rows, every lane of the padded width
    pid = pl.program_id(0)
    rows = pid * BLOCK_M + jnp.arange(BLOCK_M)
    lanes = jnp.arange(WIDTH)
    row_ok = rows < M
    dtype = y_ref.dtype

    # 2. load: x once; padded lanes and rows past M read as 0
    h = plgpu.load(x_ref.at[pl.ds(pid * BLOCK_M, BLOCK_M), pl.ds(0, WIDTH)],
                   mask=row_ok[:, None] & (lanes[None, :] < D_IN), other=0.0)
    # twin-diff: no fp32 upcast when interpreting; the Pallas interpreter's bf16 is right

    # 3. compute: every layer from registers; the hidden never leaves the program
    for layer in range(NUM_LAYERS):
        w = w_ref[layer]
        z = plgpu.dot(h, w, precision=DOT_PRECISION)
        if HAS_BIAS:
            z += b_ref[layer][None, :]
        if layer < NUM_LAYERS - 1:
            z = apply_activation(z, ACTIVATION)
            if GATED:
                v = v_ref[layer]
                g = plgpu.dot(h, v, precision=DOT_PRECISION)
                if HAS_BIAS:
                    g += c_ref[layer][None, :]
                z = z * g
            # round the hidden as a per-layer kernel's store would, then feed the next dot
            h = round_to_dtype(z, dtype)

    # 4. store: only y leaves the program (z is the last layer's, after the unrolled loop)
    y = round_to_dtype(z, dtype)
    plgpu.store(y_ref.at[pl.ds(pid * BLOCK_M, BLOCK_M), pl.ds(0, WIDTH)], y.astype(dtype),
                mask=row_ok[:, None] & (lanes[None, :] < D_OUT))


# ---- launcher ------------------------------------------------------------------------------------
def supports(spec: MLPSpec, m: int | None = None) -> str | None:
    """None when fused_small can run `spec`, else the reason: constraint, value and fallback."""
    del m  # any number of rows
    fallback = f"falls back to the per-layer kernels (impl {FALLBACK!r})"
    for i, width in enumerate(spec.widths):
        if width > WIDTHS_SUPPORTED[-1]:
            return (f"fused_small: every width must be <= {WIDTHS_SUPPORTED[-1]}, got {width} at "
                    f"widths[{i}]; {fallback}")
    if spec.num_layers > MAX_LAYERS:
        return (f"fused_small: at most {MAX_LAYERS} layers, got {spec.num_layers} "
                f"(widths {spec.widths}); {fallback}")
    return None


def fused_small_config(spec: MLPSpec, m: int, *, interpret: bool | None = None) -> TileConfig:
    """The default config. GPU: 128 rows per program up to width 64; at width 128 the fp32 hidden
    tile (and the gate's) is 64 KiB of registers at BLOCK_M=128, so 64 rows with 4 warps. float32
    holds twice the registers: at 64 rows and width 128 ptxas spilled 13 KB a thread (and took
    minutes on a gated MLP); at 128 rows and width 32 it spilled 560 B (triton.compile for sm_90),
    so float32 takes 32 rows at width 128 and 64 below."""
    del m
    if interpret if interpret is not None else interpret_mode():
        return INTERPRET_CONFIG
    width = padded_width(max(spec.widths))
    if spec.dtype == "float32":
        block_m = 32 if width == 128 else 64
    else:
        block_m = 64 if width == 128 else 128
    return TileConfig(block_m=block_m, block_n=width, block_k=width, group_m=1, num_warps=4,
                      num_stages=1)


def pack_params(params: dict[str, jax.Array], spec: MLPSpec) -> dict[str, jax.Array]:
    """Zero-padded packs: "w" [L, WIDTH, WIDTH] (and "v") in the dtype, "b" [L, WIDTH] (and "c") in
    float32 (exact; saves the kernel an upcast). Missing packs are absent from the dict."""
    layers = spec.layers()
    width = padded_width(max(spec.widths))
    dtype = params["w0"].dtype
    packed = {"w": jnp.zeros((len(layers), width, width), dtype)}
    if spec.gated:
        packed["v"] = jnp.zeros_like(packed["w"])
    if spec.bias:
        packed["b"] = jnp.zeros((len(layers), width), jnp.float32)
        if spec.gated:
            packed["c"] = jnp.zeros_like(packed["b"])
    for layer in layers:
        i, d_in, d_out = layer.index, layer.d_in, layer.d_out
        packed["w"] = packed["w"].at[i, :d_in, :d_out].set(params[f"w{i}"])
        if layer.bias:
            packed["b"] = packed["b"].at[i, :d_out].set(params[f"b{i}"].astype(jnp.float32))
        if layer.gated:
            packed["v"] = packed["v"].at[i, :d_in, :d_out].set(params[f"v{i}"])
            if layer.bias:
                packed["c"] = packed["c"].at[i, :d_out].set(params[f"c{i}"].astype(jnp.float32))
    return packed


@functools.partial(jax.jit, static_argnames=("spec", "config", "interpret"))
def fused_small_fwd(
    x2d: jax.Array,
    params: dict[str, jax.Array],
    spec: MLPSpec,
    *,
    config: TileConfig | None = None,
    interpret: bool | None = None,
    packed: dict[str, jax.Array] | None = None,
) -> jax.Array:
    """Launch on an [M, d_in] input with M >= 1; returns [M, d_out]. Trusts its inputs.

    Jitted (spec, config and interpret static): an eager `pallas_call` is traced and lowered again
    on every call (0.35-1.2 s a call interpreted here), a jitted one once per shape."""
    interpret = interpret_mode() if interpret is None else interpret
    m = x2d.shape[0]
    config = config or fused_small_config(spec, m, interpret=interpret)
    packed = packed if packed is not None else pack_params(params, spec)
    w = packed["w"]
    # absent packs: any array will do, the static flags keep the kernel from reading them
    v = packed.get("v", w)
    b = packed.get("b", w)
    c = packed.get("c", b)
    kernel = functools.partial(
        _fused_small_fwd_kernel, M=m, D_IN=spec.d_in, D_OUT=spec.d_out,
        NUM_LAYERS=spec.num_layers, WIDTH=w.shape[-1], BLOCK_M=config.block_m,
        ACTIVATION=spec.base_activation, GATED=spec.gated, HAS_BIAS=spec.bias,
        DOT_PRECISION=dot_precision(spec),
    )
    with quiet_pallas_triton():
        return pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((m, spec.d_out), x2d.dtype),
            grid=(pl.cdiv(m, config.block_m),),
            compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                                 num_stages=config.num_stages),
            interpret=interpret,
            name="fused_small_fwd",
        )(x2d, w, v, b, c)


# ---- public function -----------------------------------------------------------------------------
def validate(x: jax.Array, params: dict[str, jax.Array], spec: MLPSpec) -> None:
    """The front-door checks shared by fused_small and fused_decode (names the argument)."""
    if not isinstance(spec, MLPSpec):
        raise TypeError(f"spec: expected an MLPSpec, got {type(spec).__name__}")
    if not isinstance(x, jax.Array):
        raise TypeError(f"x: expected a jax.Array, got {type(x).__name__}")
    dtype = jnp.dtype(spec.dtype)
    if x.ndim < 1 or x.shape[-1] != spec.d_in:
        raise ValueError(f"x: expected shape [..., {spec.d_in}], got {list(x.shape)}")
    if x.dtype != dtype:
        raise TypeError(f"x: expected dtype {dtype}, got {x.dtype}")
    if not isinstance(params, dict):
        raise TypeError(f"params: expected a dict of arrays, got {type(params).__name__}")
    expected = param_shapes(spec)
    if set(params) != set(expected):
        missing, extra = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
        raise ValueError(f"params: missing {missing}, unexpected {extra}")
    for name, shape in expected.items():
        p = params[name]
        if not isinstance(p, jax.Array):
            raise TypeError(f"params[{name!r}]: expected a jax.Array, got {type(p).__name__}")
        if tuple(p.shape) != shape:
            raise ValueError(f"params[{name!r}]: expected shape {shape}, got {tuple(p.shape)}")
        if p.dtype != dtype:
            raise TypeError(f"params[{name!r}]: expected dtype {dtype}, got {p.dtype}")


def fused_small(
    x: jax.Array,
    params: dict[str, jax.Array],
    spec: MLPSpec,
    *,
    config: TileConfig | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """y = MLP(x) for x of shape [..., d_in] in one kernel; raises NotImplementedError (with the
    reason and the fallback) for specs fused_small cannot take."""
    validate(x, params, spec)
    reason = supports(spec)
    if reason is not None:
        raise NotImplementedError(reason)
    if config is not None and not isinstance(config, TileConfig):
        raise TypeError(f"config: expected a TileConfig or None, got {type(config).__name__}")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, spec.d_in)
    if x2d.shape[0] == 0:
        return jnp.zeros((*lead, spec.d_out), x.dtype)
    y = fused_small_fwd(x2d, params, spec, config=config, interpret=interpret)
    return y.reshape(*lead, spec.d_out)
