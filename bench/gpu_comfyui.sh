#!/usr/bin/env bash
# What the ComfyUI backend and ApplyAlignedLoRA still need from a GPU, as one device call (TOTAL seconds, default
# 560: a command may run 600 s and a session has 15 device minutes, start-up included; the library's own GPU rows
# are bench/gpu_session.sh). Each stage has a time limit, so one that runs long cannot starve the next, and each
# writes its files before the next starts:
#   0. (S0 s, first) LoRA gradients of fp16 / bf16 networks against fp32's in CUDA arithmetic, with and without the
#      dynamic loss scaling (bench/bench_fp16_gradients.py on the tiny world).
#   1. (S1 s) ApplyAlignedLoRA in the stock KSampler on the GPU against a stock LoRA, at 512 and 1024 px, 4 and 8
#      steps, two passes: the default (a GPU layer's weights patched per segment) and every layer bypassed, to
#      confirm the GPU default meets <= 1.1x or to choose the bypass there too (bench/bench_apply_set.py);
#   2. (S2 s) training with more prompts than the prompt cache on a GPU ComfyUI believes full, with the network and
#      the VAE held in place while a prompt encodes mid-run and without (bench/bench_comfy_train.py prompts --gpu);
#   3. (S3 s) the memory of training the MODEL ComfyUI loaded, one copy against two, as allocated VRAM
#      (bench/bench_comfy_train.py memory --gpu, a random full-size SD1.5 at 512 px);
#   5. (S5 s, before 4) training that MODEL under DynamicVRAM, which ComfyUI's main.py turns on by default on NVIDIA
#      GPUs (its loaders then give a ModelPatcherDynamic), against the legacy patcher: does it train, to the same
#      LoRA set, leaving the MODEL as it was (bench/bench_comfy_train.py dynamic --gpu);
#   4. (the rest) ShortFTTrain's gradient_checkpointing choices through that MODEL in ComfyUI's fp16 at 512 px,
#      with the lean layers off and on: allocated peak and iteration time of each (bench/bench_comfy_train.py
#      checkpointing --gpu).
# STAGES (default "0 1 2 3 4 5") picks stages: with the default limits stages 5 and 4 find no time left in the first
# call, so a session with device time for a second call runs STAGES="5 4" with TOTAL set to what it has left.
# OUT receives at most 8 files (8 here), none deeper than OUT/file (the device tool's limits).
# The device image has torch, transformers and peft but no ComfyUI nor its other requirements, and ../shared does not
# travel: run bench/stage_device.sh here first and carry .devwhl (ComfyUI's source and the small wheels, unpacked
# and installed under /tmp below); bench/device_shims stands in for PyAV and comfy-kitchen where they are missing.
#
#   bash bench/stage_device.sh                   # here, once
#   bash bench/gpu_comfyui.sh "$OUT"             # on the device machine, carry=['.devwhl']
#   PY=3.11 bash bench/stage_device.sh && COMFY_STAGE_ONLY=1 bash bench/gpu_comfyui.sh /tmp/x   # the staging, here
set -uo pipefail
out=${1:?usage: bash bench/gpu_comfyui.sh OUTDIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
t0=$(date +%s)
total=${TOTAL:-560}; s0=${S0:-60}; s1=${S1:-260}; s2=${S2:-120}; s3=${S3:-120}; s5=${S5:-150}; py=${PYTHON:-python3}  # the device image: python3 in /opt/torch/.venv
export HF_HUB_OFFLINE=1
left() { echo $(( total - ( $(date +%s) - t0 ) )); }
want() { case " ${STAGES:-0 1 2 3 4 5} " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

stage=${STAGE_DIR:-/tmp/shortft_stage}
if [ -f .devwhl/comfyui.tar.xz ] && [ -z "${COMFYUI_PATH:-}" ]; then
  mkdir -p "$stage/comfyui" && tar -C "$stage/comfyui" -xJf .devwhl/comfyui.tar.xz && export COMFYUI_PATH="$stage/comfyui"
fi
if compgen -G ".devwhl/*.whl" > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$stage/site" \
    .devwhl/*.whl && export PYTHONPATH="$stage/site${PYTHONPATH:+:$PYTHONPATH}"
fi
for m in av comfy_kitchen; do  # a stand-in only where the package itself does not import
  if ! "$py" -c "import $m" 2> /dev/null; then
    mkdir -p "$stage/shims" && cp -r "bench/device_shims/$m" "$stage/shims/" && echo "stand-in for $m"
    case ":${PYTHONPATH:-}:" in *":$stage/shims:"*) ;; *) export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$stage/shims" ;; esac
  fi
done
"$py" - > "$out/stage.txt" 2>&1 <<'PY'
import os, sys
import torch
sys.path.insert(0, os.environ.get("COMFYUI_PATH", "../shared/comfyui"))
sys.argv = [sys.argv[0]] + ([] if torch.cuda.is_available() else ["--cpu"])  # --cpu: trying the staging here
import comfy.options
comfy.options.enable_args_parsing()
import diffusers, torchsde
import comfy.ldm.modules.attention, comfy.sd, comfy.samplers
from comfy_api.latest import io
print("staged: torch", torch.__version__, "cuda", torch.cuda.is_available(), "diffusers", diffusers.__version__,
      "ComfyUI", os.environ.get("COMFYUI_PATH"))
PY
rc=$?; cat "$out/stage.txt" | tail -3
[ "$rc" = 0 ] || { echo "ComfyUI does not import: see $out/stage.txt"; exit 1; }
[ -n "${COMFY_STAGE_ONLY:-}" ] && exit 0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$out/stage.txt" 2>&1

# 0.
if want 0; then
  timeout "$s0" "$py" bench/bench_fp16_gradients.py --device cuda --weights 1 0.0009765625 > "$out/fp16.log" 2>&1
  echo "stage 0 (fp16 gradients): rc=$? at $(( $(date +%s) - t0 )) s"
fi

# 1.
if want 1; then
  timeout "$s1" "$py" bench/bench_apply_set.py --gpu --sizes 512 1024 --steps 4 8 --repeats 2 --passes 2 \
    --threads 8 --json "$out/apply.json" --only "checkpoint" "stock LoRA (merged file)" \
    "stock LoRA, bypass (merged file)" "ApplyAlignedLoRA" "ApplyAlignedLoRA, every layer patched" \
    "ApplyAlignedLoRA, every layer bypassed" > "$out/apply.log" 2>&1
  echo "stage 1 (ApplyAlignedLoRA): rc=$? at $(( $(date +%s) - t0 )) s"
fi

# 2.
if want 2; then
  timeout "$s2" "$py" bench/bench_comfy_train.py prompts --gpu --image-size 512 --iterations 6 --threads 8 \
    > "$out/prompts.log" 2>&1
  echo "stage 2 (prompts beyond the cache on a full GPU): rc=$? at $(( $(date +%s) - t0 )) s"
fi

# 3., 5. and 4.
for n in 3 5 4; do
  want "$n" || continue
  rest=$(left)
  cap=$(case "$n" in 3) echo "$s3" ;; 5) echo "$s5" ;; *) echo "$rest" ;; esac)
  if [ "$rest" -gt "$cap" ]; then rest=$cap; fi
  if [ "$rest" -gt 60 ]; then
    what=$(case "$n" in 3) echo memory ;; 5) echo dynamic ;; *) echo checkpointing ;; esac)
    timeout "$rest" "$py" bench/bench_comfy_train.py "$what" --gpu --image-size 512 --threads 8 > "$out/$what.log" 2>&1
    echo "stage $n ($what): rc=$? at $(( $(date +%s) - t0 )) s"
  else
    echo "stage $n skipped: ${rest} s left (run it again with STAGES=$n)"
  fi
done
for f in fp16 apply prompts memory dynamic checkpointing; do
  if [ -f "$out/$f.log" ]; then echo "== $f"; grep "^|" "$out/$f.log" | tail -12; fi
done
