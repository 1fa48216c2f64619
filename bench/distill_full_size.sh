#!/usr/bin/env bash
# Shortcut distillation through the CLI on a full-size random-weight base (CUDA, bf16): a run of STEPS steps with a
# checkpoint half way, a resume to 1.5x STEPS, the exported shortcut re-loaded; prints speed and peak memory.
#
#   bash bench/distill_full_size.sh sd15 runs/distill-sd15          # on a CUDA machine, about 2 minutes on an H100
#   DEVICE=cpu PRECISION=no bash bench/distill_full_size.sh tiny /tmp/d  # the same steps on the tiny world (CPU)
#
# Random weights (no real checkpoint exists offline): the figures are cost, not quality.
set -euo pipefail
family=${1:-sd15}
out=${2:-runs/distill-$family}
steps=${STEPS:-20}
device=${DEVICE:-cuda}
precision=${PRECISION:-bf16}
mkdir -p "$out"
cd "$(dirname "$0")/.."

if [ "$family" = tiny ]; then
  model=tiny
  prompt_args=()
else
  model="$out/random-$family.safetensors"
  [ -f "$model" ] || python - "$family" "$model" <<'EOF'
import sys, time
from shortft_core.testing.random_models import random_model, write_ldm_checkpoint
t = time.perf_counter()
write_ldm_checkpoint(random_model(sys.argv[1]), sys.argv[2])
print(f"wrote a random {sys.argv[1]} checkpoint in {time.perf_counter() - t:.0f}s", flush=True)
EOF
  printf '%s\n' "a photograph of an astronaut riding a horse" "a watercolor painting of a fox in a forest" \
    "a red sports car on a mountain road at sunset" "a bowl of ramen, studio lighting" > "$out/prompts.txt"
  prompt_args=(--prompts-file "$out/prompts.txt")
fi

rm -rf "$out/run"
common=(distill --model "$model" "${prompt_args[@]}" --out "$out/run" --device "$device" --mixed-precision "$precision"
        --batch-size "${BATCH:-8}" --pool-size 16 --pool-reuse 10 --checkpoint-every $((steps / 2)) --no-progress)
t0=$(date +%s)
python -m shortft_core "${common[@]}" --steps "$steps"
t1=$(date +%s)
python -m shortft_core "${common[@]}" --steps $((steps * 3 / 2)) --resume
t2=$(date +%s)
echo "first run ${steps} steps: $((t1 - t0))s wall (model load and teacher pools included); resume: $((t2 - t1))s"
python - "$model" "$out/run/shortcut.safetensors" "$device" "$precision" <<'EOF'
import sys, json
from shortft_core.lora_io import read_lora
from shortft_core.shortcut import load_shortcut
from shortft_core.loading import load_model
from shortft_core.models import PRECISION
model = load_model(sys.argv[1], sys.argv[3], PRECISION[sys.argv[4]])
_, preset = load_shortcut(model.unet, sys.argv[2], family=model.family)
meta = json.loads(read_lora(sys.argv[2])[1]["shortft"])
print(f"shortcut re-loaded into a fresh {model.family} base: preset {preset}, steps_done {meta['steps_done']}")
EOF
