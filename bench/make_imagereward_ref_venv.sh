#!/usr/bin/env bash
# Build the ISOLATED venv that holds the stock `image-reward` package (PyPI 1.5) and its old pinned stack.
# It is only a reference: tests/test_rewards_imagereward.py runs it in a subprocess to check that our port
# (shortft_core.rewards.image_reward) gives the same scores. Never install these pins into the project venv.
#
#   bash bench/make_imagereward_ref_venv.sh     # into $SHORTFT_IR_VENV, default ${SHORTFT_CI_CACHE:-~/.cache/shortft-ci}/ir_venv
#
# The tests look in the same place (SHORTFT_IR_VENV, else the default above), so nothing else needs setting.
# Idempotent: a venv finished by this script (its stamp file names the pins) is reused as it is; one left half
# built, or built with other pins, is removed and built again. A folder there that is not a venv is left alone
# and refused. .ci/run calls this before the test run.
#
# torch/torchvision are pinned together in the same pip command (see shared/ENVIRONMENT.md); the stock
# package also needs transformers<=4.55 (helpers removed later), timm 0.6.13, setuptools<81 (pkg_resources)
# and the undeclared `clip` module (clip-anytorch). No weights are downloaded: the test writes a random
# checkpoint in the official layout and a local BERT vocabulary.
set -euo pipefail
VENV="${SHORTFT_IR_VENV:-${SHORTFT_CI_CACHE:-${HOME:-/tmp}/.cache/shortft-ci}/ir_venv}"
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3.11
  command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
fi
PINS=("torch==2.14.1" "torchvision==0.29.1" "transformers==4.55.4" "diffusers==0.39.0" "timm==0.6.13"
      "setuptools<81" "clip-anytorch==2.6.0" "image-reward==1.5")
STAMP="$VENV/.shortft-ir-ready"  # written last: its presence means the build finished
want="$("$PYTHON" --version 2>&1) ${PINS[*]}"

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"  # one build at a time on this machine
flock 9 2>/dev/null || true
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] \
   && "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('ImageReward') is None)"; then
  echo "image-reward reference venv: reusing $VENV"
  exit 0
fi
if [ -e "$VENV" ]; then
  if [ ! -f "$VENV/pyvenv.cfg" ]; then
    echo "image-reward reference venv: $VENV exists and is not a venv; remove it or set SHORTFT_IR_VENV" >&2
    exit 2
  fi
  echo "image-reward reference venv: $VENV is unfinished or has other pins; building it again"
  rm -rf "$VENV"
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet "${PINS[@]}"
HF_HUB_OFFLINE=1 "$VENV/bin/python" -c "import ImageReward, transformers, timm; print('image-reward reference venv ready:', transformers.__version__, timm.__version__)"
echo "$want" > "$STAMP"
