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
import dataclasses
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from shortft_core import attach_shortcut, load_tiny_model, tiny_config, tiny_shortcut_path  # noqa: E402
from shortft_core.loop import LossScale  # noqa: E402
from shortft_core.prompts import PromptSource  # noqa: E402
from shortft_core.rewards.combine import WeightedReward  # noqa: E402
from shortft_core.testing.parity import set_lora_tensors  # noqa: E402
from shortft_core.tiny_world import load_tiny_rewards  # noqa: E402
from shortft_core.trainer import Trainer  # noqa: E402

PROMPTS = ["a red circle left of a blue square on a white background", "a big blue square on a white background"]
VARIANTS = (("bf16", torch.bfloat16, True), ("fp16 unscaled", torch.float16, False), ("fp16 scaled", torch.float16, True))


def lora_grads(dtype: torch.dtype, weight: float, scaling: bool, device: str) -> torch.Tensor:
    """One iteration's LoRA gradients (fp32, divided by ``weight``), every backend setting left at its default
    except loss scaling, which is turned off where ``scaling`` is False."""
    reward = WeightedReward([("alignment", weight, load_tiny_rewards(device)[0])])
    cfg = tiny_config(iterations=1, batch_size=2, eval_count=0, rank=4, grad_clip=0.0)
    model = load_tiny_model(device=device, dtype=dtype)
    preset = attach_shortcut(model, tiny_shortcut_path())
    cfg = dataclasses.replace(cfg, shortcut_guidance=cfg.method_entry.jump_guidance(cfg, preset.guidance))
    trainer = Trainer(model, reward, cfg, PromptSource(PROMPTS), shortcut_preset=preset)
    if not scaling:
        trainer.loss_scale = LossScale(False)
    trainer.train_step()
    grads = set_lora_tensors(model, "grad")
    return torch.cat([grads[k].float().flatten().cpu() for k in sorted(grads)]) / weight


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
    print(f"| w | {' | '.join(name for name, _, _ in VARIANTS)} |")
    print("|---|" + "---|" * len(VARIANTS))
    for w in args.weights:
        ref = lora_grads(torch.float32, w, False, args.device)
        cells = []
        for _, dtype, scaling in VARIANTS:
            g = lora_grads(dtype, w, scaling, args.device)
            rel = float((g - ref).norm() / ref.norm())
            cos = float(torch.nn.functional.cosine_similarity(g, ref, dim=0))
            zeroed = float(((g == 0) & (ref != 0)).float().mean())
            cells.append(f"{rel:.4f} (cos {cos:.4f}, {zeroed:.1%} zeroed)")
        print(f"| {w:g} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
