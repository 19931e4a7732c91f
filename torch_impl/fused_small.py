"""fused_small: the whole narrow MLP (every width <= 128) in one Triton kernel.

    h_0 = x;   h_{l+1} = round(act(h_l·W_l + b_l) [⊙ (h_l·V_l + c_l)])   (l < L-1)
    y = h_{L-1}·W_{L-1} + b_{L-1}

Neural fields, small policies and per-pixel MLPs run 16..128-wide MLPs over millions of rows; as
separate GEMMs they are bound by the traffic of their hidden activations. Here each program takes
BLOCK_M rows, reads its x tile once, carries the hidden through every layer in registers (one
`tl.dot` per layer, two for a gated layer, both fed by the same register input) and writes only y.

Widths are compile-time constants from the closed set 16/32/64/128 (tiny-cuda-nn's fully fused MLP):
every layer is padded to one WIDTH, the smallest member of the set >= max(widths). Odd widths work
by zero padding: padded rows/columns of W, V, b, c are 0, so padded lanes of every hidden are
act(0)·0 = 0 (relu, gelu, gelu_tanh, silu all map 0 to 0) and contribute nothing to the next layer;
x's padded lanes are masked to 0 at the load and y's at the store.

Grid: (cdiv(M, BLOCK_M),); program i owns rows [i·BLOCK_M, (i+1)·BLOCK_M). TileConfig mapping:
`block_m` = BLOCK_M, `num_warps`, `num_stages`; `block_n`/`block_k` are unused (the tile's N and K
are WIDTH).

Params are packed by the launcher into one [L, WIDTH, WIDTH] weight tensor (and one for V when
gated) and one [L, WIDTH] float32 bias tensor (and c), zero-padded, so the kernel walks the layers
with `tl.static_range(NUM_LAYERS)` on a single pointer. Packing runs once per call (params are tiny:
<= 8·128·128 elements, L+1 small copies); a caller that reuses params (a module) can pack once with
`pack_params` and pass `packed=` to the launcher.

Rounding points (common/reference.py): fp32 accumulation; bias, activation and gate in fp32; the
hidden is rounded to the spec dtype before the next layer's dot (what a per-layer kernel's store
would do, so the two paths agree and tensor-core operands stay 16-bit); y rounded once at the store.

Twin: jax_impl/fused_small.py (Pallas-Triton, same names and sections).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedmlp.common.config import TileConfig
from fusedmlp.common.params import param_shapes
from fusedmlp.common.spec import MLPSpec

from .activations import apply_activation
from .runtime import INTERPRET, kernel_device_ok

WIDTHS_SUPPORTED = (16, 32, 64, 128)  # the closed set of compile-time widths
MAX_LAYERS = 8
FALLBACK = "triton"  # the per-layer kernels

# Under the interpreter: few programs (each program iteration costs milliseconds), yet M = 37 and
# 300 still span several ragged row blocks.
INTERPRET_CONFIG = TileConfig(block_m=32, block_n=16, block_k=16, group_m=1, num_warps=4,
                              num_stages=1)

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---- helpers shared by the whole-MLP kernels -----------------------------------------------------
@triton.jit
def round_to_dtype(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """Round an fp32 tile to DTYPE. On the GPU: the dtype itself. Interpreting: the rounded value
    held in fp32, because the interpreter's bf16 arithmetic is broken and its fp32 -> bf16 cast
    truncates (523 of 1000 randn values off by one ulp); bf16 is rounded to nearest even through
    the bits.
    """
    if INTERPRET:
        if DTYPE == tl.bfloat16:  # noqa: SIM300 (DTYPE is the constexpr)
            bits = x.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
        elif DTYPE == tl.float16:  # noqa: SIM300
            x = x.to(tl.float16).to(tl.float32)
    else:
        x = x.to(DTYPE)
    return x


def dot_precision(spec: MLPSpec) -> str:
    """tl.dot's input_precision: 'tf32' only where the spec asks for it (float32 only)."""
    return "tf32" if spec.fp32_precision == "tf32" else "ieee"


def padded_width(width: int) -> int:
    """The smallest member of the closed set 16/32/64/128 that holds `width`."""
    return next(w for w in WIDTHS_SUPPORTED if w >= width)


# ---- forward kernel ------------------------------------------------------------------------------
@triton.jit
def _fused_small_fwd_kernel(
    x_ptr, w_ptr, v_ptr, b_ptr, c_ptr, y_ptr,
    M, D_IN, D_OUT, stride_xm, stride_ym,
    NUM_LAYERS: tl.constexpr, WIDTH: tl.constexpr, BLOCK_M: tl.constexpr,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    # 1. program -> tile: BLOCK_M rows, every lane of the padded width
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    lanes = tl.arange(0, WIDTH)
    row_ok = rows < M
    w_offs = lanes[:, None] * WIDTH + lanes[None, :]  # one packed [WIDTH, WIDTH] layer, row-major
    dtype = y_ptr.dtype.element_ty

    # 2. load: x once; padded lanes and rows past M read as 0
    # int64 row offsets: rows · stride passes 2^31 from 2^31 / 128 ≈ 16.8M rows at width 128.
    # twin-diff: the Pallas lowering widens offsets itself for arrays over 2^32 bytes.
    row_offs = rows.to(tl.int64)[:, None]
    h = tl.load(x_ptr + row_offs * stride_xm + lanes[None, :],
                mask=row_ok[:, None] & (lanes[None, :] < D_IN), other=0.0)
    if INTERPRET:
        h = h.to(tl.float32)  # interpreter bf16 arithmetic is broken: compute on fp32 tiles

    # 3. compute: every layer from registers; the hidden never leaves the program
    for layer in tl.static_range(NUM_LAYERS):
        w = tl.load(w_ptr + layer * WIDTH * WIDTH + w_offs)
        if INTERPRET:
            w = w.to(tl.float32)
        z = tl.dot(h, w, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            z += tl.load(b_ptr + layer * WIDTH + lanes)[None, :]
        if layer < NUM_LAYERS - 1:
            z = apply_activation(z, ACTIVATION)
            if GATED:
                v = tl.load(v_ptr + layer * WIDTH * WIDTH + w_offs)
                if INTERPRET:
                    v = v.to(tl.float32)
                g = tl.dot(h, v, input_precision=DOT_PRECISION)
                if HAS_BIAS:
                    g += tl.load(c_ptr + layer * WIDTH + lanes)[None, :]
                z = z * g
            # round the hidden as a per-layer kernel's store would, then feed the next dot
            h = round_to_dtype(z, dtype, INTERPRET)

    # 4. store: only y leaves the program (z is the last layer's, after the unrolled loop)
    y = round_to_dtype(z, dtype, INTERPRET)
    tl.store(y_ptr + row_offs * stride_ym + lanes[None, :], y.to(dtype),
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


def fused_small_config(spec: MLPSpec, m: int, *, interpret: bool = INTERPRET) -> TileConfig:
    """The default config. GPU: 128 rows per program up to width 64; at width 128 the fp32 hidden
    tile (and the gate's) is 64 KiB of registers at BLOCK_M=128, so 64 rows with 4 warps. float32
    holds twice the registers: at 64 rows and width 128 ptxas spilled 13 KB a thread (and took
    minutes on a gated MLP); at 128 rows and width 32 it spilled 560 B (triton.compile for sm_90),
    so float32 takes 32 rows at width 128 and 64 below."""
    del m
    if interpret:
        return INTERPRET_CONFIG
    width = padded_width(max(spec.widths))
    if spec.dtype == "float32":
        block_m = 32 if width == 128 else 64
    else:
        block_m = 64 if width == 128 else 128
    return TileConfig(block_m=block_m, block_n=width, block_k=width, group_m=1, num_warps=4,
                      num_stages=1)


def pack_params(params: dict[str, torch.Tensor], spec: MLPSpec) -> dict[str, torch.Tensor]:
    """Zero-padded packs: "w" [L, WIDTH, WIDTH] (and "v") in the dtype, "b" [L, WIDTH] (and "c") in
    float32 (exact; saves the kernel an upcast). Missing packs are absent from the dict."""
    layers = spec.layers()
    width = padded_width(max(spec.widths))
    ref = params["w0"]
    packed = {"w": torch.zeros(len(layers), width, width, dtype=ref.dtype, device=ref.device)}
    if spec.gated:
        packed["v"] = torch.zeros_like(packed["w"])
    if spec.bias:
        packed["b"] = torch.zeros(len(layers), width, dtype=torch.float32, device=ref.device)
        if spec.gated:
            packed["c"] = torch.zeros_like(packed["b"])
    for layer in layers:
        i, d_in, d_out = layer.index, layer.d_in, layer.d_out
        packed["w"][i, :d_in, :d_out] = params[f"w{i}"]
        if layer.bias:
            packed["b"][i, :d_out] = params[f"b{i}"]
        if layer.gated:
            packed["v"][i, :d_in, :d_out] = params[f"v{i}"]
            if layer.bias:
                packed["c"][i, :d_out] = params[f"c{i}"]
    return packed


def fused_small_fwd(
    x2d: torch.Tensor,
    params: dict[str, torch.Tensor],
    spec: MLPSpec,
    *,
    config: TileConfig | None = None,
    packed: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Launch on a contiguous [M, d_in] input with M >= 1; returns [M, d_out]. Trusts its inputs."""
    m = x2d.shape[0]
    config = config or fused_small_config(spec, m)
    packed = packed if packed is not None else pack_params(params, spec)
    y = torch.empty(m, spec.d_out, dtype=x2d.dtype, device=x2d.device)
    w = packed["w"]
    # absent packs: any pointer will do, the constexpr flags keep the kernel from reading them
    v = packed.get("v", w)
    b = packed.get("b", w)
    c = packed.get("c", b)
    grid = (triton.cdiv(m, config.block_m),)
    _fused_small_fwd_kernel[grid](
        x2d, w, v, b, c, y,
        m, spec.d_in, spec.d_out, x2d.stride(0), y.stride(0),
        NUM_LAYERS=spec.num_layers, WIDTH=w.shape[-1], BLOCK_M=config.block_m,
        ACTIVATION=spec.base_activation, GATED=spec.gated, HAS_BIAS=spec.bias,
        DOT_PRECISION=dot_precision(spec), INTERPRET=INTERPRET,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y


# ---- public function -----------------------------------------------------------------------------
def validate(x: torch.Tensor, params: dict[str, torch.Tensor], spec: MLPSpec) -> None:
    """The front-door checks shared by fused_small and fused_decode (names the argument)."""
    if not isinstance(spec, MLPSpec):
        raise TypeError(f"spec: expected an MLPSpec, got {type(spec).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    dtype = _TORCH_DTYPES[spec.dtype]
    if x.dim() < 1 or x.shape[-1] != spec.d_in:
        raise ValueError(f"x: expected shape [..., {spec.d_in}], got {list(x.shape)}")
    if x.dtype != dtype:
        raise TypeError(f"x: expected dtype {dtype}, got {x.dtype}")
    if not kernel_device_ok(x):
        where = "a CPU tensor (Triton interpreter)" if INTERPRET else "a CUDA tensor"
        raise ValueError(f"x: expected {where}, got device {x.device}")
    if not isinstance(params, dict):
        raise TypeError(f"params: expected a dict of tensors, got {type(params).__name__}")
    expected = param_shapes(spec)
    if set(params) != set(expected):
        missing, extra = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
        raise ValueError(f"params: missing {missing}, unexpected {extra}")
    for name, shape in expected.items():
        p = params[name]
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{name!r}]: expected a torch.Tensor, got {type(p).__name__}")
        if tuple(p.shape) != shape:
            raise ValueError(f"params[{name!r}]: expected shape {shape}, got {tuple(p.shape)}")
        if p.dtype != dtype:
            raise TypeError(f"params[{name!r}]: expected dtype {dtype}, got {p.dtype}")
        if p.device != x.device:
            raise ValueError(f"params[{name!r}]: expected device {x.device}, got {p.device}")


def fused_small(
    x: torch.Tensor,
    params: dict[str, torch.Tensor],
    spec: MLPSpec,
    *,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """y = MLP(x) for x of shape [..., d_in] in one kernel; raises NotImplementedError (with the
    reason and the fallback) for specs fused_small cannot take."""
    validate(x, params, spec)
    reason = supports(spec)
    if reason is not None:
        raise NotImplementedError(reason)
    if config is not None and not isinstance(config, TileConfig):
        raise TypeError(f"config: expected a TileConfig or None, got {type(config).__name__}")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, spec.d_in).contiguous()
    if x2d.shape[0] == 0:
        return x.new_empty(*lead, spec.d_out)
    params = {k: p.contiguous() for k, p in params.items()}
    return fused_small_fwd(x2d, params, spec, config=config).reshape(*lead, spec.d_out)
