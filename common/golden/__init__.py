"""Golden files: reference inputs and float64 outputs that both stacks' tests read.

Each case is one `.npz` (written with fixed zip timestamps and no compression, so regeneration is
bit-identical) holding the inputs in the spec dtype (bfloat16 as raw uint16 bits), the float64
reference output `y`, the output with the kernels' storage rounding `y_rounded`, and float64
gradients `grad_x`, `grad_<param>` of `sum(y * dy)` at the exact forward (the math's gradient).
`MANIFEST.json` lists every case with its spec and the SHA-256 of its file.

Gradient cases (issue 24) are listed apart, under the manifest's `grad_cases` (`grad_case_names`,
`load_grad`): for a subset of the dense cases (`GRAD_CASES`: each axis of the training matrix at
least once), `grad-<case>.npz` holds the upstream gradient `dy` (the case's own, spec dtype) and
the float64 gradients of `sum(y * dy)` that the gradient tolerance judges by:
`reference.backward(..., round_hidden=True)`, at the forward AS THE KERNELS STORE IT (hidden
layers rounded to the dtype; common/tolerance.py says why relu needs it), keyed "x" and by the
PACKED param names the stacks train (`wv{i}`, `bc{i}` of gated layers, zero in the padded
columns: common/packing.py). x and the params are the dense case's file. Each entry names its
case, the shapes of dy and of every gradient, the dtypes, dy's seed and the file's SHA-256.

Factorised (low-rank) cases (issue 26) are listed apart, under the manifest's `lowrank_cases`
(`lowrank_case_names`, `load_lowrank`), so every dense golden test keeps its case list: the spec is
a `LowRankSpec` (an MLPSpec and each layer's rank), params `u{i}`, `vt{i}` (`w{i}` for a layer that
runs dense) and `b{i}` (a gated case adds `uv{i}`, `vtv{i}`, `c{i}`), and the outputs `y` (exact
float64) and `y_rounded` (the kernels' rounding points: t = x·U and each hidden layer rounded to
the dtype). No gradients (no factorised backward).
Their factors are DRAWN (seeded, like `init_params`), not computed by an SVD: LAPACK's SVD is not
bit-reproducible across builds (signs, last bits) and the files must regenerate bit for bit; the
factorisation has its own tests (tests/test_lowrank.py: Eckart–Young, the whitened tail).
For the same reason the outputs are the reference's reproducible mode (`reference.reproducible`:
no BLAS, the C library's exp and tanh), which gives the same bits on every x86-64 CPU with FMA
(AVX2, AVX-512); the files before it came from an AVX-512 machine's BLAS and did not regenerate
on an AVX2 one.

Regenerate with `python -m fusedmlp.common.golden` (add `--check` to verify instead of writing).
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import lowrank_spec, reference
from ..dtypes import DTYPES, cast, numpy_dtype
from ..lowrank_spec import LowRankSpec
from ..packing import pack_gated, pack_params, packed_names, unpack_params
from ..params import init_params, make_grad_output, make_input
from ..spec import ACTIVATIONS, MLPSpec

GOLDEN_DIR = Path(__file__).resolve().parent
MANIFEST = "MANIFEST.json"
FORMAT_VERSION = 1

# Odd sizes, multiples of neither 8 nor 16, so every kernel needs masks on every edge.
ODD_WIDTHS = (33, 67, 21)
ODD_M = 19
DY_SEED_OFFSET = 20_000  # a case's dy is drawn with seed + this (x: seed + 10_000)


@dataclass(frozen=True)
class CaseDef:
    name: str
    spec: MLPSpec
    lead_shape: tuple[int, ...]  # x is [*lead_shape, d_in]
    seed: int
    nan_at: tuple[int, ...] | None = None  # an x element set to NaN


@dataclass
class GoldenCase:
    name: str
    spec: MLPSpec
    x: np.ndarray
    params: dict[str, np.ndarray]
    dy: np.ndarray
    y: np.ndarray
    y_rounded: np.ndarray
    grads: dict[str, np.ndarray]

    @property
    def tags(self) -> tuple[str, ...]:
        return tuple(self.name.split("-"))


def case_defs() -> list[CaseDef]:
    """Every activation × dtype × bias at odd sizes, plus multi-layer, 3-D, M=1 and NaN cases."""
    defs = []
    seed = 100
    for activation in ACTIVATIONS:
        for dtype in DTYPES:
            for bias in (True, False):
                spec = MLPSpec(ODD_WIDTHS, activation, bias, dtype)
                name = f"{activation}-{dtype}-{'bias' if bias else 'nobias'}"
                defs.append(CaseDef(name, spec, (ODD_M,), seed))
                seed += 1
    defs += [
        CaseDef(
            "deep-gelu_tanh-float16",
            MLPSpec((29, 72, 40, 56, 13), "gelu_tanh", True, "float16"),
            (23,),
            200,
        ),
        CaseDef(
            "deep-swiglu-bfloat16",
            MLPSpec((24, 40, 56, 24), "swiglu", False, "bfloat16"),
            (37,),
            201,
        ),
        CaseDef("batch3d-silu-float32", MLPSpec(ODD_WIDTHS, "silu", True, "float32"), (3, 5), 202),
        CaseDef("m1-swiglu-bfloat16", MLPSpec(ODD_WIDTHS, "swiglu", True, "bfloat16"), (1,), 203),
        CaseDef(
            "tf32-gelu-float32", MLPSpec(ODD_WIDTHS, "gelu", True, "float32", "tf32"), (ODD_M,), 204
        ),
        CaseDef(
            "nan-relu-float32",
            MLPSpec(ODD_WIDTHS, "relu", True, "float32"),
            (ODD_M,),
            205,
            nan_at=(4, 7),
        ),
    ]
    return defs


def build_case(d: CaseDef) -> GoldenCase:
    params = init_params(d.spec, seed=d.seed)
    x = make_input(d.spec, d.lead_shape, seed=d.seed + 10_000)
    if d.nan_at is not None:
        x[d.nan_at] = np.nan
    dy = make_grad_output(d.spec, d.lead_shape, seed=d.seed + DY_SEED_OFFSET)
    y = reference.forward(d.spec, x, params)
    y_rounded = reference.forward(d.spec, x, params, round_hidden=True)
    grads = reference.backward(d.spec, x, params, dy)
    return GoldenCase(d.name, d.spec, x, params, dy, y, y_rounded, grads)


# ---- gradient cases (issue 24) -------------------------------------------------------------------
# Dense cases that also get a gradient file: plain and gated (swiglu, geglu), 2 to 4 layers, the
# three dtypes, bias and none, a 3-D input, M = 1 (fused_decode's regime), a NaN row, relu (whose
# gradient depends on the linearisation point), erf (geglu), exp (silu, swiglu) and tanh
# (gelu_tanh) derivatives; every width <= 128, so fused_small takes each. Kept small: each case
# is trained by both stacks under the interpreters (tests/test_golden_grad.py), ~5 s a case in JAX.
GRAD_CASES: tuple[str, ...] = (
    "relu-bfloat16-nobias",
    "swiglu-float32-nobias",
    "geglu-float16-bias",
    "deep-gelu_tanh-float16",
    "deep-swiglu-bfloat16",
    "batch3d-silu-float32",
    "m1-swiglu-bfloat16",
    "nan-relu-float32",
)
GRAD_PREFIX = "grad-"


@dataclass
class GoldenGrad:
    name: str  # the dense case's name: x and the params are in its file
    spec: MLPSpec
    dy: np.ndarray  # the upstream gradient, spec dtype (the dense case's dy)
    grads: dict[str, np.ndarray]  # float64; "x" and the packed param names

    def contract_grads(self) -> dict[str, np.ndarray]:
        """The gradients in the contract's names (`reference.backward`'s keys): the packed gated
        ones unpacked, by slicing, bit for bit."""
        params = {k: v for k, v in self.grads.items() if k != "x"}
        return {"x": self.grads["x"], **unpack_params(self.spec, params)}


def build_grad(case: GoldenCase) -> GoldenGrad:
    """The gradients the tolerance judges by: at the rounded forward, params packed."""
    grads = reference.backward(case.spec, case.x, case.params, case.dy, round_hidden=True)
    dx = grads.pop("x")
    return GoldenGrad(case.name, case.spec, case.dy, {"x": dx, **pack_params(case.spec, grads)})


def _grad_arrays(grad: GoldenGrad) -> dict[str, np.ndarray]:
    return {"dy": grad.dy, **{f"grad_{k}": v for k, v in grad.grads.items()}}


# ---- factorised (low-rank) cases -----------------------------------------------------------------
@dataclass(frozen=True)
class LowRankCaseDef:
    name: str
    lspec: LowRankSpec
    lead_shape: tuple[int, ...]
    seed: int


@dataclass
class LowRankGoldenCase:
    name: str
    lspec: LowRankSpec
    x: np.ndarray
    params: dict[str, np.ndarray]
    y: np.ndarray
    y_rounded: np.ndarray

    @property
    def spec(self) -> MLPSpec:
        return self.lspec.spec


def lowrank_case_defs() -> list[LowRankCaseDef]:
    """A 2-layer plain MLP at the odd widths, both layers factorised, in each dtype; and one whose
    last layer runs dense (rank = min(K, N)), without bias, relu (the twins agree bit for bit on
    it), 3-D input; and a gated one (SwiGLU, both layers factorised: the hidden layer runs
    `lowrank_gated_linear_act`). New cases go at the end: the draws of the others stay put."""
    defs = []
    seed = 300
    for dtype in DTYPES:
        lspec = LowRankSpec(MLPSpec(ODD_WIDTHS, "gelu", True, dtype), (9, 5))
        defs.append(LowRankCaseDef(f"lowrank-gelu-{dtype}", lspec, (ODD_M,), seed))
        seed += 1
    lspec = LowRankSpec(MLPSpec(ODD_WIDTHS, "relu", False, "float16"), (17, 21))
    defs.append(LowRankCaseDef("lowrank-dense1-relu-float16-nobias", lspec, (3, 5), seed))
    seed += 1
    lspec = LowRankSpec(MLPSpec(ODD_WIDTHS, "swiglu", True, "float16"), (9, 5))
    defs.append(LowRankCaseDef("lowrank-swiglu-float16", lspec, (ODD_M,), seed))
    return defs


def lowrank_params(lspec: LowRankSpec, seed: int) -> dict[str, np.ndarray]:
    """Drawn factors in the dtype: U ~ N(0, 1/K), Vt ~ N(0, 1/r) (U·Vt ~ N(0, 1/K), as a dense
    init_params weight), W and b ~ N(0, 1/K) (gated: Uv, Vtv, V and c alike; a dense gated
    layer's packed `wv`/`bc` from drawn W and V, b and c, zero padding)."""
    rng = np.random.default_rng(seed)
    params = {}
    widths = lspec.spec.widths
    for name, shape in lowrank_spec.param_shapes(lspec).items():
        if name.startswith(("wv", "bc")):
            i = int(name[2:])
            half = (widths[i], widths[i + 1]) if name.startswith("wv") else (widths[i + 1],)
            w, v = (rng.standard_normal(half) / np.sqrt(widths[i]) for _ in range(2))
            params[name] = cast(pack_gated(w, v), lspec.dtype)
            continue
        bias = name[0] in "bc" and name[1:].isdigit()
        fan_in = widths[int(name[1:])] if bias else shape[0]
        params[name] = cast(rng.standard_normal(shape) / np.sqrt(fan_in), lspec.dtype)
    return params


def build_lowrank_case(d: LowRankCaseDef) -> LowRankGoldenCase:
    params = lowrank_params(d.lspec, d.seed)
    x = make_input(d.lspec.spec, d.lead_shape, seed=d.seed + 10_000)
    y = lowrank_spec.reference(d.lspec, x, params)
    y_rounded = lowrank_spec.reference(
        d.lspec, x, params, round_intermediate=True, round_hidden=True
    )
    return LowRankGoldenCase(d.name, d.lspec, x, params, y, y_rounded)


def _lowrank_arrays(case: LowRankGoldenCase) -> dict[str, np.ndarray]:
    arrays = {"x": case.x, "y": case.y, "y_rounded": case.y_rounded}
    arrays.update({f"param_{k}": v for k, v in case.params.items()})
    return arrays


# ---- file format ---------------------------------------------------------------------------------
def _to_storable(a: np.ndarray) -> np.ndarray:
    if a.dtype == numpy_dtype("bfloat16"):
        return a.view(np.uint16)  # .npy has no bfloat16; keep the raw bits
    return a


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(arrays):
            item = io.BytesIO()
            np.lib.format.write_array(
                item, np.ascontiguousarray(_to_storable(arrays[key])), allow_pickle=False
            )
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            zf.writestr(info, item.getvalue())
    return buf.getvalue()


def _case_arrays(case: GoldenCase) -> dict[str, np.ndarray]:
    arrays = {"x": case.x, "dy": case.dy, "y": case.y, "y_rounded": case.y_rounded}
    arrays.update({f"param_{k}": v for k, v in case.params.items()})
    arrays.update({f"grad_{k}": v for k, v in case.grads.items()})
    return arrays


def render() -> tuple[dict[str, bytes], dict]:
    """Every case's file contents and the manifest, computed from the reference in its
    reproducible mode (the same bits on every machine: reference.reproducible)."""
    with reference.reproducible():
        return _render()


def _render() -> tuple[dict[str, bytes], dict]:
    files, entries, grad_entries = {}, {}, {}
    for d in case_defs():
        case = build_case(d)
        data = _npz_bytes(_case_arrays(case))
        fname = f"{d.name}.npz"
        files[fname] = data
        entries[d.name] = {
            "file": fname,
            "sha256": hashlib.sha256(data).hexdigest(),
            "spec": d.spec.to_dict(),
            "x_shape": list(case.x.shape),
            "seed": d.seed,
            "nan_at": list(d.nan_at) if d.nan_at else None,
        }
        if d.name not in GRAD_CASES:
            continue
        grad = build_grad(case)
        data = _npz_bytes(_grad_arrays(grad))
        fname = f"{GRAD_PREFIX}{d.name}.npz"
        files[fname] = data
        grad_entries[d.name] = {
            "file": fname,
            "sha256": hashlib.sha256(data).hexdigest(),
            "case": d.name,
            "case_file": entries[d.name]["file"],
            "spec": d.spec.to_dict(),
            "x_shape": list(case.x.shape),
            "dy_shape": list(grad.dy.shape),
            "dy_dtype": d.spec.dtype,
            "dy_seed": d.seed + DY_SEED_OFFSET,
            "grad_dtype": "float64",
            "grad_shapes": {k: list(v.shape) for k, v in grad.grads.items()},
            "linearisation": "round_hidden",
        }
    missing = sorted(set(GRAD_CASES) - set(grad_entries))
    if missing:
        raise ValueError(f"GRAD_CASES: expected names of dense cases, got unknown {missing}")
    lowrank_entries = {}
    for d in lowrank_case_defs():
        case = build_lowrank_case(d)
        data = _npz_bytes(_lowrank_arrays(case))
        fname = f"{d.name}.npz"
        files[fname] = data
        lowrank_entries[d.name] = {
            "file": fname,
            "sha256": hashlib.sha256(data).hexdigest(),
            "spec": d.lspec.to_dict(),
            "x_shape": list(case.x.shape),
            "seed": d.seed,
        }
    manifest = {
        "format": FORMAT_VERSION,
        "numpy": np.__version__,
        "cases": entries,
        "lowrank_cases": lowrank_entries,
        "grad_cases": grad_entries,
    }
    return files, manifest


def _manifest_text(manifest: dict) -> str:
    # The numpy version is informative only; it is left out of the bytes compared by --check.
    return json.dumps(manifest, indent=1, sort_keys=True) + "\n"


def regenerate(directory: Path = GOLDEN_DIR) -> dict:
    files, manifest = render()
    for old in directory.glob("*.npz"):
        old.unlink()
    for fname, data in files.items():
        (directory / fname).write_bytes(data)
    (directory / MANIFEST).write_text(_manifest_text(manifest))
    return manifest


def check(directory: Path = GOLDEN_DIR) -> list[str]:
    """Regenerate in memory; list the differences from the files on disk (empty: identical)."""
    _, manifest = render()
    problems = []
    stored = load_manifest(directory)
    sections = ("cases", "lowrank_cases", "grad_cases")
    for section in sections:
        stored_names, names = set(stored.get(section, {})), set(manifest[section])
        if stored_names != names:
            problems.append(f"{section} names differ: {sorted(stored_names ^ names)}")
    for section in sections:
        listed_section = stored.get(section, {})
        for name, entry in manifest[section].items():
            where = name if section == "cases" else f"{section}[{name!r}]"
            path = directory / entry["file"]
            if not path.exists():
                problems.append(f"{where}: missing file {path.name}")
                continue
            on_disk = hashlib.sha256(path.read_bytes()).hexdigest()
            if on_disk != entry["sha256"]:
                problems.append(f"{where}: regenerated sha256 {entry['sha256']} != file {on_disk}")
            listed = listed_section.get(name, {})
            if listed.get("sha256") != on_disk:
                problems.append(f"{where}: manifest sha256 does not match the file")
            elif listed != json.loads(json.dumps(entry)):  # tuples read back as lists
                problems.append(f"{where}: manifest entry differs from the regenerated one")
    stray = {p.name for p in directory.glob("*.npz")} - {
        e["file"] for section in sections for e in manifest[section].values()
    }
    if stray:
        problems.append(f"files listed in no manifest section: {sorted(stray)}")
    return problems


# ---- loading -------------------------------------------------------------------------------------
def load_manifest(directory: Path = GOLDEN_DIR) -> dict:
    return json.loads((directory / MANIFEST).read_text())


def case_names(directory: Path = GOLDEN_DIR) -> list[str]:
    return list(load_manifest(directory)["cases"])


def load(name: str, directory: Path = GOLDEN_DIR) -> GoldenCase:
    manifest = load_manifest(directory)
    try:
        entry = manifest["cases"][name]
    except KeyError:
        raise ValueError(
            f"golden case: unknown name {name!r}; known: {sorted(manifest['cases'])}"
        ) from None
    spec = MLPSpec.from_dict(entry["spec"])
    dtype = numpy_dtype(spec.dtype)
    with np.load(directory / entry["file"], allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}

    def inp(a: np.ndarray) -> np.ndarray:
        return a.view(dtype) if a.dtype == np.uint16 else a

    params = {k.removeprefix("param_"): inp(v) for k, v in arrays.items() if k.startswith("param_")}
    grads = {k.removeprefix("grad_"): v for k, v in arrays.items() if k.startswith("grad_")}
    return GoldenCase(
        name,
        spec,
        inp(arrays["x"]),
        params,
        inp(arrays["dy"]),
        arrays["y"],
        arrays["y_rounded"],
        grads,
    )


def load_all(directory: Path = GOLDEN_DIR) -> list[GoldenCase]:
    return [load(n, directory) for n in case_names(directory)]


def lowrank_case_names(directory: Path = GOLDEN_DIR) -> list[str]:
    return list(load_manifest(directory).get("lowrank_cases", {}))


def load_lowrank(name: str, directory: Path = GOLDEN_DIR) -> LowRankGoldenCase:
    cases = load_manifest(directory).get("lowrank_cases", {})
    if name not in cases:
        raise ValueError(f"golden lowrank case: unknown name {name!r}; known: {sorted(cases)}")
    entry = cases[name]
    lspec = LowRankSpec.from_dict(entry["spec"])
    dtype = numpy_dtype(lspec.dtype)
    with np.load(directory / entry["file"], allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}

    def inp(a: np.ndarray) -> np.ndarray:
        return a.view(dtype) if a.dtype == np.uint16 else a

    params = {k.removeprefix("param_"): inp(v) for k, v in arrays.items() if k.startswith("param_")}
    return LowRankGoldenCase(
        name, lspec, inp(arrays["x"]), params, arrays["y"], arrays["y_rounded"]
    )


def grad_case_names(directory: Path = GOLDEN_DIR) -> list[str]:
    """The dense cases that have a gradient file (the manifest's `grad_cases`)."""
    return list(load_manifest(directory).get("grad_cases", {}))


def load_grad(name: str, directory: Path = GOLDEN_DIR) -> GoldenGrad:
    """The gradient file of dense case `name` (its x and params: `load(name)`)."""
    cases = load_manifest(directory).get("grad_cases", {})
    if name not in cases:
        raise ValueError(f"golden grad case: unknown name {name!r}; known: {sorted(cases)}")
    entry = cases[name]
    spec = MLPSpec.from_dict(entry["spec"])
    with np.load(directory / entry["file"], allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    dy = arrays.pop("dy")
    dy = dy.view(numpy_dtype(spec.dtype)) if dy.dtype == np.uint16 else dy
    grads = {k.removeprefix("grad_"): v for k, v in arrays.items()}
    # The file's keys are sorted: put them back in the contract's order, "x" then the params'.
    return GoldenGrad(name, spec, dy, {k: grads[k] for k in ("x", *packed_names(spec))})
