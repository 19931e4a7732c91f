#!/usr/bin/env bash
# Fetch the wheels the GPU image lacks into .wheels/ (gitignored), verify them, print the carry list.
#
#   bench/fetch_wheels.sh            download (pinned version + sha256), verify, check, print `carry`
#   bench/fetch_wheels.sh --check W  only the compatibility check of wheel file(s) W (offline; tests)
#
# Why: impl `jax_triton` (our Triton kernels called from JAX, issue 17) needs jax_triton, which the
# GPU image (Python 3.12, jax/jaxlib 0.11.2 + CUDA 13 plugin, triton 3.6.0, absl-py) does not hold,
# and the device machine has no network. The wheel travels in the device tool's `carry` and is
# installed there with the line printed at the end (into /tmp/site, never into the image's venv).
#
# The compatibility check reads each wheel's own metadata (no install): its tag must install on the
# image (py3-none-any, or cp312 manylinux x86_64), Requires-Python must admit 3.12, and every
# Requires-Dist without an extra must be met by the image's versions below. For jax_triton it also
# checks that every `gpu_triton.<name>` the source uses is exported by jaxlib 0.11.2's gpu_triton
# (jaxlib/gpu_triton.py at 0.11.x): that module is the API jax_triton most often breaks on.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.wheels"
PY="${PYTHON:-python3}"  # any Python with pip (packaging is read from pip if absent)

# name==version and the sha256 of its wheel on PyPI (checked 2026-11-23; pip verifies it too).
PINNED=(
  "jax-triton==0.3.1 c25277cb5bd454fd6a524265447f3533cf902cb1ab2b97d91c24f530c4e71024"
)

check_wheels() {
  "$PY" - "$@" <<'PYEOF'
import re
import sys
import zipfile

try:
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version
except ImportError:  # pip always vendors it
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet
    from pip._vendor.packaging.version import Version

# The GPU image (TOOLCHAIN.md, device KINDS.md pip list 2026-11). None: present, version unread.
IMAGE_PYTHON = "3.12.3"
IMAGE = {"jax": "0.11.2", "jaxlib": "0.11.2", "triton": "3.6.0", "numpy": "2.5.2",
         "torch": "2.11.0", "ml-dtypes": None, "absl-py": None}
# Every package the image holds (device KINDS.md, "Python packages already there", 2026-11-17).
PRESENT = """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
    botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
    coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
    diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
    frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
    hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
    jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-
    operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-
    dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
    networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-
    nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-
    cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-
    nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-
    headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas
    pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf
    psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
    pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-
    lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
    scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
    simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-
    server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
    torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton
    typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt
    xarray xxhash yarl zipp
""".split()
for _name in PRESENT:
    IMAGE.setdefault(_name, None)
# What jaxlib 0.11.x's gpu_triton exports (jaxlib/gpu_triton.py, CUDA branch).
GPU_TRITON_API = {
    "TritonKernelCall", "TritonAutotunedKernelCall", "TritonKernel", "create_array_parameter",
    "create_scalar_parameter", "get_compute_capability", "get_arch_details", "get_custom_call",
    "get_serialized_metadata",
}
MARKER_ENV = {"python_version": "3.12", "python_full_version": IMAGE_PYTHON,
              "sys_platform": "linux", "platform_machine": "x86_64", "extra": ""}


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def check(path):
    problems = []
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        meta_name = next((n for n in names if n.endswith(".dist-info/METADATA")), None)
        wheel_name = next((n for n in names if n.endswith(".dist-info/WHEEL")), None)
        if meta_name is None or wheel_name is None:
            return [f"{path}: not a wheel (no .dist-info/METADATA or WHEEL)"]
        meta = zf.read(meta_name).decode()
        tags = [ln.split(":", 1)[1].strip() for ln in zf.read(wheel_name).decode().splitlines()
                if ln.startswith("Tag:")]
        sources = {n: zf.read(n).decode(errors="replace") for n in names if n.endswith(".py")}
    fields = [ln.split(":", 1) for ln in meta.splitlines() if ":" in ln and not ln.startswith(" ")]
    name = next((v.strip() for k, v in fields if k == "Name"), "?")
    version = next((v.strip() for k, v in fields if k == "Version"), "?")
    ok_tag = any(t == "py3-none-any" or (t.startswith("cp312-") and "x86_64" in t) for t in tags)
    if not ok_tag:
        problems.append(f"tags {tags} do not install on CPython 3.12 x86_64")
    for k, v in fields:
        if k == "Requires-Python" and Version(IMAGE_PYTHON) not in SpecifierSet(v.strip()):
            problems.append(f"Requires-Python {v.strip()} excludes the image's {IMAGE_PYTHON}")
        if k != "Requires-Dist":
            continue
        req = Requirement(v.strip())
        if req.marker is not None and not req.marker.evaluate(MARKER_ENV):
            continue  # an extra, or another platform
        have = IMAGE.get(norm(req.name), "missing")
        if have == "missing":
            problems.append(f"requires {req} — not on the image: carry it too")
        elif have is not None and not req.specifier.contains(have, prereleases=True):
            problems.append(f"requires {req}, the image has {req.name} {have}")
    if norm(name) == "jax-triton":
        used = set()
        for text in sources.values():
            used |= set(re.findall(r"(?:gpu_triton|triton_kernel_call_lib)\.(\w+)", text))
        missing = sorted(used - GPU_TRITON_API)
        if missing:
            problems.append(f"uses gpu_triton.{missing} which jaxlib 0.11.2 does not export")
    label = f"{name} {version} ({path})"
    if problems:
        return [f"{label}: {p}" for p in problems]
    print(f"ok: {label} installs on the GPU image (Python {IMAGE_PYTHON}, jax {IMAGE['jax']}, "
          f"triton {IMAGE['triton']})")
    return []


failures = [p for path in sys.argv[1:] for p in check(path)]
for p in failures:
    print(f"INCOMPATIBLE: {p}", file=sys.stderr)
sys.exit(1 if failures else 0)
PYEOF
}

if [[ "${1:-}" == "--check" ]]; then
  shift
  [[ $# -gt 0 ]] || { echo "usage: $0 --check WHEEL..." >&2; exit 2; }
  check_wheels "$@"
  exit $?
fi

mkdir -p "$DEST"
reqs="$(mktemp)"
trap 'rm -f "$reqs"' EXIT
for entry in "${PINNED[@]}"; do
  read -r spec sha <<<"$entry"
  echo "$spec --hash=sha256:$sha" >>"$reqs"
done
# --require-hashes: pip refuses a file whose digest differs; py3-none-any needs no --platform.
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --require-hashes -r "$reqs" -d "$DEST"

wheels=()
for entry in "${PINNED[@]}"; do
  read -r spec sha <<<"$entry"
  name="${spec%%==*}"
  version="${spec##*==}"
  file="$(ls "$DEST"/"${name//-/_}"-"$version"-*.whl 2>/dev/null | head -n1 || true)"
  [[ -n "$file" ]] || { echo "missing wheel for $spec in $DEST" >&2; exit 1; }
  got="$(sha256sum "$file" | cut -d' ' -f1)"
  if [[ "$got" != "$sha" ]]; then
    echo "sha256 mismatch for $file: expected $sha, got $got" >&2
    exit 1
  fi
  echo "sha256 ok: $(basename "$file")"
  wheels+=("$file")
done
check_wheels "${wheels[@]}"

echo
echo 'carry: [".wheels"]'
echo "install on the device, first in the command:"
echo "  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade" \
  "--target /tmp/site .wheels/*.whl && export PYTHONPATH=/tmp/site || exit;"
