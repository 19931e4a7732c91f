#!/usr/bin/env bash
# float32 on one GPU: bash bench/fp32_check.sh OUTDIR [probe|bench|all]
#
# The large-M issue's float32 targets (auto >= 1.0x eager / XLA under the same precision, "ieee"
# and "tf32") in one call of the device tool (~6-8 minutes):
#   probe  bench/tf32_probe.py: per GEMM, cuBLAS under each precision against our TMA and
#          portable linear_act with W row-major and K-major (tf32_probe.json)
#   bench  fusedmlp bench of one case a shape class at float32, each precision
#          (bench_fp32_<preset>.json, .md): llama3-8b at M = 2048 and hf-blog-geglu at M = 8192
#          (mlp2-gated), gpt2-mlp at M = 4096 (mlp2), every implementation of both stacks beside
#          eager, compile and XLA
# Then, here: `fusedmlp derive-auto <the runner's results.json> OUTDIR/bench_fp32_*.json` gives
# the GPU's dispatch table its float32 points (one per stack, precision, class and M; the runner's
# forward points kept): bench/GPU_RUN.md §5.
set -uo pipefail
out=${1:?usage: bash bench/fp32_check.sh OUTDIR [probe|bench|all]}
part=${2:-all}
case "$part" in all | probe | bench) ;; *) echo "fp32_check: PART: expected all, probe or bench, got $part" >&2; exit 2 ;; esac
# shellcheck source=bench/gpu_steps.sh
source "$(dirname "$0")/gpu_steps.sh"  # $out absolute, the log, the install, `run`
if [ "$part" != bench ]; then
  run 200 "$py" bench/tf32_probe.py "$out/tf32_probe.json" --gemms llama-up,hf-up,llama-down
fi
if [ "$part" != probe ]; then
  for item in llama3-8b:2048 hf-blog-geglu:8192 gpt2-mlp:4096; do
    preset=${item%%:*}
    run 110 "$py" -m fusedmlp.bench.cli bench --quick --preset "$preset" --m "${item##*:}" \
      --dtype float32 --fp32-precision ieee,tf32 --json "$out/bench_fp32_$preset.json" \
      --markdown "$out/bench_fp32_$preset.md"
  done
fi
ls -la "$out"
exit $status
