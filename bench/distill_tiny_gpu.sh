#!/usr/bin/env bash
# Tiny-world shortcut distillation on a CUDA GPU, with many more samples than a CPU hour holds (issue 3's target:
# shortcut jump error <= 1/3 of the naive jump's; on CPU the error falls only slowly with more distinct samples,
# BENCHMARKS.md "Shortcut distillation on the tiny world"). The error falls per sample, whatever the batch (batch
# 128 for 150 steps = batch 32 for 600 steps, measured), so a 64-step probe of each batch size in BATCHES picks the
# one with the most samples per second, the run is sized to MINUTES, then bench_shortcut.py scores the file
# exactly as the shipped one was scored (4 seed groups).
#
#   bash bench/distill_tiny_gpu.sh runs/distill-tiny-gpu                       # CUDA; MINUTES=6 BATCHES="128 512"
#   DEVICE=cpu MINUTES=1 BATCH=8 THREADS=2 bash bench/distill_tiny_gpu.sh /tmp/t  # the same path on CPU
#   EVAL=0 ...                                                                 # distill only
set -euo pipefail
out=${1:-runs/distill-tiny-gpu}
device=${DEVICE:-cuda}
minutes=${MINUTES:-6}
batches=${BATCH:-${BATCHES:-128 512}}
lr=${LR:-1e-3}
cd "$(dirname "$0")/.."
rm -rf "$out/probe" "$out/run" "$out/bench"  # only what this script writes there
mkdir -p "$out"
args() {  # the run's settings at batch $1
  echo distill --model tiny --device "$device" --batch-size "$1" --lr "$lr" --rank 32 --target teacher \
    --student-guidance 3 --pool-size $((2 * $1)) --pool-reuse 32 --no-progress
}
best=-1; batch=0; probe=0  # -1: a rate that rounds to 0 samples/s still picks its batch
for b in $batches; do
  rm -rf "$out/probe"
  sec=$(python -m shortft_core $(args "$b") --out "$out/probe" --steps 64 | grep -o '[0-9.]* s/step' | cut -d' ' -f1)
  rate=$(python -c "print(round($b / $sec))")
  echo "probe: batch $b, $sec s/step, $rate samples/s"
  if [ "$rate" -gt "$best" ]; then best=$rate; batch=$b; probe=$sec; fi
done
steps=$(python -c "print(max(200, int($minutes * 60 / $probe) // 100 * 100))")
echo "batch $batch -> $steps steps ($((steps * batch)) samples) for $minutes min"
t0=$(date +%s)
python -m shortft_core $(args "$batch") --out "$out/run" --steps "$steps" --checkpoint-every $((steps / 4))
echo "distilled $steps steps in $(( $(date +%s) - t0 )) s"
[ "${EVAL:-1}" = 0 ] && exit 0  # EVAL=0: score it elsewhere (bench_shortcut.py runs on CPU)
python bench/bench_shortcut.py --shortcut "$out/run/shortcut.safetensors" --out "$out/bench" --groups 4 \
  --threads "${THREADS:-8}"
