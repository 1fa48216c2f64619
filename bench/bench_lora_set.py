"""What does merging a timestep-aware LoRA set into one LoRA cost? (tiny world, CPU)

    python bench/bench_lora_set.py --lora-set runs/tiny/lora [--prompts 64] [--threads 2]

Samples the same held-out prompts and seeds (50-step DDIM, CFG 3) with the base, with the set as trained
(segment j's LoRA at segment j's timesteps, as in ComfyUI with the set's per-segment LoRAs and a timestep
switch) and with the set's merged LoRA at every timestep (what a tool without timestep switching applies),
and reports both tiny rewards and the pixel distance of each to the set's images. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shortft_core.adapters import AdapterSwitch  # noqa: E402
from shortft_core.lora_io import load_lora_adapter  # noqa: E402
from shortft_core.lora_set import load_lora_set, set_inference_plan  # noqa: E402
from shortft_core.plans import adapter_chain, base_chain  # noqa: E402
from shortft_core.sampling import sample  # noqa: E402
from shortft_core.schedule import leading_grid  # noqa: E402
from shortft_core.tiny_world import DEFAULT_GUIDANCE, held_out_prompts, load_tiny_rewards  # noqa: E402
from shortft_core.loading import load_tiny_model  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lora-set", required=True, help="a run's lora/ folder (set.json, segment_j, merged)")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(args.lora_set)
    model = load_tiny_model()
    names, segments = load_lora_set(model.unet, folder)
    load_lora_adapter(model.unet, folder / "merged.safetensors", adapter_name="merged", trainable=False)
    switch = AdapterSwitch(model.unet)
    g = DEFAULT_GUIDANCE
    grid = leading_grid(50, model.schedule.num_train_timesteps)
    plans = {
        "base": base_chain(grid, g),
        "set (per segment)": set_inference_plan(names, segments, g, grid),
        "merged LoRA": adapter_chain(("merged",), g, grid, method="merged"),
    }
    prompts = held_out_prompts(args.prompts, seed=1)
    alignment, aesthetic = load_tiny_rewards()
    images = {k: sample(model, prompts, seed=args.seed, plan=plan, switch=switch) for k, plan in plans.items()}
    ref = images["set (per segment)"]
    print(f"| sampler ({args.prompts} held-out prompts, 50-step DDIM, CFG {g:g}) | alignment | aesthetic | "
          "mean abs pixel diff to the set |")
    print("|---|---|---|---|")
    with torch.no_grad():
        for k, x in images.items():
            a, q = alignment(x, prompts), aesthetic(x, prompts)
            d = (x - ref).abs().mean(dim=(1, 2, 3))
            print(f"| {k} | {a.mean():.4f} +- {a.std():.4f} | {q.mean():.2f} +- {q.std():.2f} | "
                  f"{statistics.mean(d.tolist()):.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
