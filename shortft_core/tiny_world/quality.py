"""How good is the tiny world? The measurements recorded in BENCHMARKS.md.

    python -m shortft_core.tiny_world.quality --out runs/tiny-quality [--root DIR] [--grid docs/tiny_world_samples.png]

* caption picking: for held-out generator images, does the alignment reward rank the true caption above every
  caption that differs in one attribute (colour, shape, position/relation, background)?
* reward levels: mean alignment reward of the base pipeline's samples (50-step DDIM, several CFG scales) on
  held-out and training prompts, between the ceiling (generator images of the same prompts) and the floor
  (generator images scored against another prompt's caption).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from ..files import atomic_write_json
from . import scenes

log = logging.getLogger(__name__)

ATTRIBUTES = ("colour", "shape", "position", "background")
EVAL_SEED = 777  # generator seed of evaluation images; training used seeds 0..3000+ on the train split only


@torch.no_grad()
def caption_accuracy(reward, n: int = 400, seed: int = EVAL_SEED, split: scenes.Split = "held_out") -> dict:
    """Fraction of images whose true caption beats every one-attribute variant, per attribute."""
    images, sc = scenes.scene_batch(seed, range(n), split)
    img = reward.image_embeds(scenes.to_float(images))
    out: dict[str, float] = {}
    for attr in ATTRIBUTES:
        hits = 0
        for i, s in enumerate(sc):
            cands = [s.caption] + [v.caption for v in scenes.variants(s, attr)]
            scores = reward.text_embeds(cands) @ img[i]
            hits += int(scores.argmax()) == 0
        out[attr] = hits / n
    return out


@torch.no_grad()
def real_images(prompts: Sequence[str], seed: int = EVAL_SEED) -> torch.Tensor:
    """Generator renderings of tiny-world prompts (the ceiling a perfect pipeline would reach)."""
    arr = [scenes.render(scenes.parse_caption(p), seed=scenes.hash_seed(seed, i)) for i, p in enumerate(prompts)]
    return scenes.to_float(arr)


@torch.no_grad()
def reward_levels(model, alignment, aesthetic, prompts: Sequence[str], guidances: Sequence[float],
                  steps: int = 50, seed: int = 0) -> dict:
    """Alignment/aesthetic means of base samples per guidance scale, and the real-image ceiling and floor."""
    from ..sampling import sample

    prompts = list(prompts)
    real = real_images(prompts)
    mismatched = prompts[1:] + prompts[:1]

    def stats(x: torch.Tensor) -> dict:
        return {"mean": float(x.mean()), "std": float(x.std())}

    result = {
        "ceiling": stats(alignment(real, prompts)),
        "floor": stats(alignment(real, mismatched)),
        "real_aesthetic": stats(aesthetic(real, prompts)),
        "base": {},
    }
    for g in guidances:
        imgs = sample(model, prompts, seed=seed, steps=steps, guidance=g, batch_size=64)
        result["base"][str(g)] = {"alignment": stats(alignment(imgs, prompts)),
                                  "aesthetic": stats(aesthetic(imgs, prompts))}
    return result


def _table(levels: dict, title: str) -> str:
    lines = [f"{title}", "", "| images | alignment (mean +- std) | aesthetic |", "|---|---|---|"]
    lines.append(f"| generator images, true captions (ceiling) | {levels['ceiling']['mean']:.4f} +- "
                 f"{levels['ceiling']['std']:.4f} | {levels['real_aesthetic']['mean']:.2f} |")
    for g, v in levels["base"].items():
        lines.append(f"| base pipeline, CFG {g} | {v['alignment']['mean']:.4f} +- {v['alignment']['std']:.4f} | "
                     f"{v['aesthetic']['mean']:.2f} |")
    lines.append(f"| generator images, mismatched captions (floor) | {levels['floor']['mean']:.4f} +- "
                 f"{levels['floor']['std']:.4f} | - |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ..images import captioned_grid, save_png
    from ..sampling import sample
    from ..loading import load_tiny_model
    from . import DEFAULT_GUIDANCE, load_tiny_rewards

    p = argparse.ArgumentParser(prog="python -m shortft_core.tiny_world.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=None, help="tiny-world weights folder (default: the shipped one)")
    p.add_argument("--out", required=True, help="folder for quality.json")
    p.add_argument("--prompts", type=int, default=128, help="held-out and training prompts each (default 128)")
    p.add_argument("--images", type=int, default=400, help="images for caption picking (default 400)")
    p.add_argument("--guidances", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0, 7.5])
    p.add_argument("--grid", default=None, help="also write a captioned sample grid PNG here")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = load_tiny_model(root=args.root)
    alignment, aesthetic = load_tiny_rewards(root=args.root)
    result = {
        "caption_accuracy_held_out": caption_accuracy(alignment, args.images, split="held_out"),
        "caption_accuracy_train_split": caption_accuracy(alignment, args.images, split="train"),
        "held_out": reward_levels(model, alignment, aesthetic, scenes.held_out_prompts(args.prompts, seed=1),
                                  args.guidances),
        "train": reward_levels(model, alignment, aesthetic, scenes.train_prompts(args.prompts, seed=1),
                               args.guidances),
    }
    result["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    atomic_write_json(out / "quality.json", result)
    acc = result["caption_accuracy_held_out"]
    print("caption picking on held-out images: " + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()))
    print(_table(result["held_out"], "held-out prompts"))
    print(_table(result["train"], "training-split prompts"))
    if args.grid:
        prompts = scenes.held_out_prompts(8, seed=1) + scenes.train_prompts(8, seed=1)
        base = sample(model, prompts, seed=0, guidance=DEFAULT_GUIDANCE)
        real = real_images(prompts)
        rows = [real[:8], base[:8], real[8:], base[8:]]
        caps = prompts[:8] * 2 + prompts[8:] * 2
        grid = captioned_grid([im for r in rows for im in r], caps, columns=8, cell=96, font_size=9,
                              row_labels=["real", "base", "real", "base"])
        save_png(grid, args.grid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
