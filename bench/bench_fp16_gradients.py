"""How close one ShortFT iteration's LoRA gradients in fp16 / bf16 come to fp32's, with and without loss scaling.

The tiny preset (batch 2, rank 4, no clipping) on the tiny world's diffusers UNet, the alignment reward multiplied by
each weight w (a reward's per-element gradients shrink with the image's size and its weight in a mix), the gradients
divided by w and compared with fp32's at the same w: relative L2, cosine, and the share of entries that are 0 where
fp32's are not. Runs on a CPU (its fp16 arithmetic stands in for a GPU's) or on CUDA. Results in BENCHMARKS.md
("fp16 networks: dynamic loss scaling").

    python bench/bench_fp16_gradients.py
    python bench/bench_fp16_gradients.py --weights 1 0.00390625 --device cuda
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from shortft_core import load_tiny_model  # noqa: E402
from shortft_core.testing.parity import tiny_iteration_grads  # noqa: E402
from shortft_core.tiny_world import load_tiny_rewards  # noqa: E402

# (column, the UNet's dtype, loss scaling: None = the trainer's own choice by dtype, False = off)
VARIANTS = (("bf16", torch.bfloat16, None), ("fp16 unscaled", torch.float16, False), ("fp16 scaled", torch.float16, None))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=float, nargs="+", default=[1.0, 2.0**-8, 2.0**-10, 2.0**-13],
                    help="reward weights to compare at")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if any(w <= 0 for w in args.weights):
        ap.error("--weights must be positive")
    torch.set_num_threads(args.threads)
    reward = load_tiny_rewards(args.device)[0]

    def lora_grads(dtype: torch.dtype, weight: float, scaling: bool | None) -> torch.Tensor:
        return tiny_iteration_grads(load_tiny_model(device=args.device, dtype=dtype), reward, weight, scaling)[0]

    print(f"| w | {' | '.join(name for name, _, _ in VARIANTS)} |")
    print("|---|" + "---|" * len(VARIANTS))
    for w in args.weights:
        ref = lora_grads(torch.float32, w, None)
        cells = []
        for _, dtype, scaling in VARIANTS:
            g = lora_grads(dtype, w, scaling)
            rel = float((g - ref).norm() / ref.norm())
            cos = float(torch.nn.functional.cosine_similarity(g, ref, dim=0))
            zeroed = float(((g == 0) & (ref != 0)).float().mean())
            cells.append(f"{rel:.4f} (cos {cos:.4f}, {zeroed:.1%} zeroed)")
        print(f"| {w:g} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
