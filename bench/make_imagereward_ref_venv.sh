#!/usr/bin/env bash
# Build the ISOLATED venv that holds the stock `image-reward` package (PyPI 1.5) and its old pinned stack.
# It is only a reference: tests/test_rewards_imagereward.py runs it in a subprocess to check that our port
# (shortft_core.rewards.image_reward) gives the same scores. Never install these pins into the project venv.
#
#   bash bench/make_imagereward_ref_venv.sh            # creates /work/ir_venv
#   SHORTFT_IR_VENV=/some/dir bash bench/make_imagereward_ref_venv.sh
#
# torch/torchvision are pinned together in the same pip command (see shared/ENVIRONMENT.md); the stock
# package also needs transformers<=4.55 (helpers removed later), timm 0.6.13, setuptools<81 (pkg_resources)
# and the undeclared `clip` module (clip-anytorch). No weights are downloaded: the test writes a random
# checkpoint in the official layout and a local BERT vocabulary.
set -euo pipefail
VENV="${SHORTFT_IR_VENV:-/work/ir_venv}"
PYTHON="${PYTHON:-python3.11}"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet \
    "torch==2.14.1" "torchvision==0.29.1" "transformers==4.55.4" "diffusers==0.39.0" "timm==0.6.13" \
    "setuptools<81" "clip-anytorch==2.6.0" "image-reward==1.5"
HF_HUB_OFFLINE=1 "$VENV/bin/python" -c "import ImageReward, transformers, timm; print('image-reward reference venv ready:', transformers.__version__, timm.__version__)"
