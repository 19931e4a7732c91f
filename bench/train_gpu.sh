#!/usr/bin/env bash
# The real training runs of issue 25 on one GPU: bash bench/train_gpu.sh OUTDIR
#
# Installs the project offline (the GPU image has torch, jax, optax, scikit-image), then runs
#   fusedmlp train image: astronaut 256², 2,000 steps, bf16 and fp16 (loss scaling)
#   fusedmlp train lm:    pydoc byte LM, d 1024, SwiGLU 4096, 4 blocks, batch 4096, 300 steps, bf16
# both stacks, `auto` against the baseline of each stack from the same init and data order, each
# under its own time limit, and writes into OUTDIR: train-image.json, train-lm.json (curves, step
# times, end points, what `auto` chose), train-image.png, train-lm.png (the curves), the original
# photograph, every run's reconstruction and image-compare.png, log.txt. Budget: 4 minutes.
# FUSEDMLP_TRAIN_ARGS replaces "--device cuda" (a CPU smoke run: "--device cpu --steps 4").
set -uo pipefail
out=${1:?usage: bash bench/train_gpu.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
exec > >(tee -a "$out/log.txt") 2>&1
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false COLUMNS=200
"$py" -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1 || true
extra=${FUSEDMLP_TRAIN_ARGS:---device cuda}
status=0
run() {
  local t0=$SECONDS
  echo "== $*"
  timeout -k 10 "$@"
  local rc=$?
  echo "== exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -ne 0 ] && status=1
}
# shellcheck disable=SC2086  # $extra is a list of options
run 150 "$py" -m fusedmlp.bench.cli train image $extra --precision bf16,fp16 --out "$out"
# shellcheck disable=SC2086
run 80 "$py" -m fusedmlp.bench.cli train lm $extra --precision bf16 --out "$out"
ls -la "$out"
exit $status
