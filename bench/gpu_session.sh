#!/usr/bin/env bash
# Everything the open issues still need from a GPU, as one device call (TOTAL seconds, default 560: a command may
# run 600 s and a session has 15 device minutes, start-up included). Each stage has a time limit, so one that runs
# long cannot starve the next, and each writes its files before the next starts:
#   1. issue 5 (S1 s): the batch-2 rows without checkpointing, now with every lean switch of memory.py (the
#      <= 24 GB target), then the ShortFT / full-BPTT timing pair (the >= 4x target), 5 timed iterations each;
#   2. issue 3 (S2 s): the tiny shortcut distilled on CUDA (bench/distill_tiny_gpu.sh, EVAL=0; batch 128 or 512,
#      whichever its probe finds faster per sample), copied to OUT; score it afterwards on any machine, as the
#      shipped one was scored:
#      python bench/bench_shortcut.py --shortcut OUT/shortcut.safetensors --groups 4
#   3. issue 5 (whatever is left, if over a minute): SDXL rows, ShortFT first (the CPU predictions to confirm:
#      40.5 GiB with UNet checkpointing at rank 128; 18.1 GiB for README's 24 GB-card setting, --guidance 1 and
#      rank 32; 23.3 GiB with CFG on the tuned steps, 21.8 with the text encoders offloaded (':te', lent to the GPU
#      every iteration: its time cost with no cache hits)), then the baselines. At 1024 px a full-BPTT iteration
#      takes about a minute, so the SDXL grid
#      needs a session of its own (S1=0 S2=0).
# OUT receives at most 8 files, none deeper than OUT/stage/file (the device tool's limits).
#
#   bash bench/gpu_session.sh "$OUT"                                               # on the device machine
#   DEVICE=cpu SMALL=1 TOTAL=400 S1=60 S2=120 BATCH=8 bash bench/gpu_session.sh /tmp/gs  # same path on CPU
set -uo pipefail
out=${1:?usage: bash bench/gpu_session.sh OUTDIR}
cd "$(dirname "$0")/.."
mkdir -p "$out/pair" "$out/sdxl"
t0=$(date +%s)
total=${TOTAL:-560}; s1=${S1:-210}; s2=${S2:-290}

device=${DEVICE:-cuda}
small=(); [ -n "${SMALL:-}" ] && small=(--small --device "$device")
left() { echo $(( total - ( $(date +%s) - t0 ) )); }

# 1. (bench_gpu stops starting rows after --budget-s; timeout guards a row that runs long)
if [ "$s1" -gt 0 ]; then
  timeout $((s1 + 30)) python bench/bench_gpu.py "${small[@]}" --families sd15 --iters 5 --budget-s "$s1" \
    --out "$out/pair" --only sd15:shortft-cfg1:none:2 sd15:shortft:none:2 sd15:shortft:unet:1 \
    sd15:full-bptt:unet:1 sd15:shortft:none:1 sd15:shortft:none:4 > "$out/pair.log" 2>&1
  echo "stage 1 (sd15 rows): rc=$? at $(( $(date +%s) - t0 )) s"
fi

# 2. (distill_tiny_gpu.sh sizes its run by two 64-step probes; ~60 s go to loading, the probes and the export)
if [ "$s2" -gt 0 ]; then
  minutes=$(python -c "print(max(0.5, ($s2 - 60) / 60))")
  DEVICE=$device MINUTES=$minutes EVAL=0 timeout $((s2 + 20)) bash bench/distill_tiny_gpu.sh "$out/dist" \
    > "$out/distill.log" 2>&1
  echo "stage 2 (distillation): rc=$? at $(( $(date +%s) - t0 )) s"
  cp "$out/dist/run/shortcut.safetensors" "$out/shortcut.safetensors" 2>/dev/null || echo "stage 2: no shortcut"
  rm -rf "$out/dist"  # checkpoints and trajectory pools: too large and too deep to come back
fi

# 3.
rest=$(left)
if [ "$rest" -gt 60 ]; then
  timeout "$rest" python bench/bench_gpu.py "${small[@]}" --families sdxl --iters 1 --budget-s $((rest - 50)) \
    --out "$out/sdxl" --only sdxl:shortft:unet:1 sdxl:shortft-cfg1:all:1:r32 sdxl:shortft:all:1:r32 \
    sdxl:shortft:all:1:r32:te sdxl:draft-1:none:1 sdxl:refl:none:1 sdxl:alignprop:unet:1 sdxl:full-bptt:unet:1 \
    sdxl:shortft:none:1 > "$out/sdxl.log" 2>&1
  echo "stage 3 (sdxl rows): rc=$? at $(( $(date +%s) - t0 )) s"
else
  echo "stage 3 skipped: ${rest} s left"
fi
cat "$out/pair/table.md" "$out/sdxl/table.md" 2>/dev/null
