#!/usr/bin/env bash
# Packs what a lent GPU machine lacks for bench/gpu_comfyui.sh into .devwhl/ (ignored by git), here, where pip and
# ../shared/comfyui are: ComfyUI's source (its Python packages and the tokenizer files an SD checkpoint needs, as
# comfyui.tar.xz), and the wheels of the requirements that image does not carry and that fit a device call
# (diffusers and importlib_metadata for the library; torchsde, trampoline and comfy-aimdo for ComfyUI). PyAV and
# comfy-kitchen do not fit (35 + 58 MB beside the repository's ~30 MB of a call's 64 MiB): bench/device_shims stands
# in for them. The device run then names .devwhl in `carry`:
#
#   bash bench/stage_device.sh                              # here, once
#   run(command='bash bench/gpu_comfyui.sh $OUT', carry=['.devwhl'])
#
# PY (default 3.12, the device image's Python) selects the wheels' interpreter; PY=3.11 stages for this machine (to
# try the path here: COMFY_STAGE_ONLY=1 bash bench/gpu_comfyui.sh /tmp/x unpacks and checks the imports).
set -euo pipefail
cd "$(dirname "$0")/.."
comfy="${COMFYUI_PATH:-../shared/comfyui}"
[ -f "$comfy/comfy/model_patcher.py" ] || { echo "no ComfyUI source tree at $comfy: set COMFYUI_PATH" >&2; exit 2; }
py=${PY:-3.12}
dest=.devwhl
rm -rf "$dest.new" && mkdir -p "$dest.new"
# ComfyUI's own modules and data files, without its tests, web assets, API nodes, examples and git history
tar -C "$comfy" -cJf "$dest.new/comfyui.tar.xz" --exclude='__pycache__' --exclude='*.pyc' \
  $(cd "$comfy" && ls -d comfy comfy_api comfy_execution comfy_extras comfy_config app api_server utils middleware \
      alembic_db alembic.ini blueprints *.py 2>/dev/null)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 --platform any -d "$dest.new" \
  "diffusers>=0.39" importlib_metadata torchsde trampoline "comfy-aimdo==0.4.13" 2>&1 | grep -v "^WARNING: Location" || true
rm -rf "$dest" && mv "$dest.new" "$dest"
tracked=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
staged=$(du -cb "$dest"/* | tail -1 | cut -f1)
total=$(( tracked + staged ))
ls -la "$dest"
echo "a device call carries $(( total / 1048576 )) MiB (repository $(( tracked / 1048576 )), $dest $(( staged / 1048576 )); limit 64)"
[ "$total" -lt $(( 64 * 1048576 )) ] || { echo "over the 64 MiB a device call carries" >&2; exit 1; }
