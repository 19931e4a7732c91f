#!/usr/bin/env bash
# The real training runs of issue 25 on one GPU: bash bench/train_gpu.sh OUTDIR [all|backward|train]
#
# Installs the project offline (the GPU image has torch, jax, optax, scikit-image), then runs
#   fusedmlp bench --backward: one training step (forward + backward) per path, both stacks, at
#     llama3-8b and hf-blog-geglu M=8192 (bf16) and nerf-64x5 (fp16, its 2M rows): the rows that
#     run distinct kernels (with saved=preact every torch impl but auto/triton_tma/fused_small
#     runs the portable saving forward and backward: triton stands for them; auto the Hopper TMA
#     backward; fused_small its whole-MLP backward; in JAX pallas_triton the portable kernels,
#     pallas_mosaic the Mosaic GPU saving forward and GEMMs, jax_impl/mosaic/backward.py, which
#     auto takes where the training points say so); --quick (20 timed steps); most of the time
#     is compiling (inductor's forward+backward graphs, the Pallas backward)
#   fusedmlp train image: astronaut 256², 2,000 steps, bf16 and fp16 (loss scaling)
#   fusedmlp train lm:    pydoc byte LM, d 1024, SwiGLU 4096, 4 blocks, batch 4096, 300 steps, bf16
#   (torch runs eager and as one CUDA graph replayed a step: --graph both)
# both stacks, `auto` against the baseline of each stack from the same init and data order, each
# under its own time limit, and writes into OUTDIR: train-image.json, train-lm.json (curves, step
# times, end points, what `auto` chose), train-image.png, train-lm.png (the curves), the original
# photograph, every run's reconstruction and image-compare.png, bench_backward.json/.md,
# bench_backward_nerf.json/.md, log.txt. Budget: about 10 minutes in all; PART `backward` (the
# bench, ~3 min) and `train` (the two tasks, ~7 min) split it into two calls of the lent H200's
# 10-minute limit.
# FUSEDMLP_TRAIN_ARGS replaces "--device cuda" (a CPU smoke run: "--device cpu --steps 4").
set -uo pipefail
out=${1:?usage: bash bench/train_gpu.sh OUTDIR [all|backward|train]}
part=${2:-all}
case "$part" in all | backward | train) ;; *) echo "train_gpu: PART: expected all, backward or train, got $part" >&2; exit 2 ;; esac
# shellcheck source=bench/gpu_steps.sh
source "$(dirname "$0")/gpu_steps.sh"  # $out absolute, the log, the install, `run`
extra=${FUSEDMLP_TRAIN_ARGS:---device cuda}
if [ "$extra" = "--device cuda" ] && [ "$part" != train ]; then
  run 140 "$py" -m fusedmlp.bench.cli bench --backward --quick --preset llama3-8b,hf-blog-geglu \
    --m 8192 --impl triton,pallas_triton,pallas_mosaic,auto,baselines --json "$out/bench_backward.json" \
    --markdown "$out/bench_backward.md"
  run 80 "$py" -m fusedmlp.bench.cli bench --backward --quick --preset nerf-64x5 \
    --impl triton,fused_small,pallas_triton,auto,baselines --json "$out/bench_backward_nerf.json" \
    --markdown "$out/bench_backward_nerf.md"
fi
# --graph both: every run twice — torch eager and with its step replayed from one CUDA graph, JAX
# one jitted call a step and SCAN_STEPS steps a call (lax.scan) — so the tables show the kernels'
# speed and the host's apart (the scanned runs compile each chunk length once: more time).
if [ "$part" = backward ]; then ls -la "$out"; exit $status; fi
graph=()
[ "$extra" = "--device cuda" ] && graph=(--graph both)
# shellcheck disable=SC2086  # $extra is a list of options
run 260 "$py" -m fusedmlp.bench.cli train image $extra ${graph[@]+"${graph[@]}"} \
  --precision bf16,fp16 --out "$out"
# shellcheck disable=SC2086
run 150 "$py" -m fusedmlp.bench.cli train lm $extra ${graph[@]+"${graph[@]}"} --precision bf16 \
  --out "$out"
ls -la "$out"
exit $status
