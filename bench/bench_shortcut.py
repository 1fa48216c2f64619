"""How good is a distilled shortcut? Jump errors against the teacher and few-step sampling quality (tiny world).

    python bench/bench_shortcut.py --out runs/bench-shortcut [--shortcut FILE] [--grid docs/tiny_shortcut_grid.png]

* Relative L2 error ||x_hat_s - x_s|| / ||x_s|| of one-call jumps 741 -> 501, 481 -> 261, 241 -> 1 against the
  teacher's 50-step DDIM (CFG 3), for the shortcut and for a naive one-step DDIM jump of the base, on held-out
  prompts over several seed groups (mean +- std over groups); also the base crossing each jump in k equal DDIM
  steps (``--naive-steps``), and from those how many base steps one shortcut call is worth.
* 4-step sampling with the shortcut alone (trailing grid 999/749/499/249, with the CFG it was distilled for) vs
  the 50-step base (CFG 3)
  vs 4 naive base steps, scored by the tiny alignment and aesthetic rewards; a side-by-side grid.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shortft_core.adapters import AdapterSwitch  # noqa: E402
from shortft_core.distillation import few_step_plan, jump_errors  # noqa: E402
from shortft_core.images import captioned_grid, save_png  # noqa: E402
from shortft_core.sampling import sample  # noqa: E402
from shortft_core.shortcut import load_shortcut  # noqa: E402
from shortft_core.loading import load_tiny_model  # noqa: E402
from shortft_core.tiny_world import (DEFAULT_GUIDANCE, held_out_prompts, load_tiny_rewards,  # noqa: E402
                                     tiny_shortcut_path)


def equivalent_steps(error: float, naive: dict[int, float]) -> float | None:
    """How many equal naive DDIM steps of the base reach ``error``: log-linear between the measured step counts
    (None outside their range: the shortcut is worse than one step or better than the most measured)."""
    ks = sorted(naive)
    for a, b in zip(ks, ks[1:]):
        ea, eb = naive[a], naive[b]
        if eb <= error <= ea:
            return a + (b - a) * (math.log(ea) - math.log(error)) / (math.log(ea) - math.log(eb))
    return float(ks[0]) if ks and error == naive[ks[0]] else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shortcut", default=None, help="shortcut LoRA (default: the shipped tiny shortcut)")
    p.add_argument("--out", default="runs/bench-shortcut")
    p.add_argument("--groups", type=int, default=4, help="seed groups (each: 16 held-out prompts)")
    p.add_argument("--grid", default=None, help="write the side-by-side grid here")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--naive-steps", type=int, nargs="*", default=[2, 3, 4],
                   help="also jump with the base in k equal DDIM steps (yardstick: how many base calls one shortcut "
                        "call is worth)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_tiny_model()
    _, preset = load_shortcut(model.unet, args.shortcut or tiny_shortcut_path())
    sg = preset.guidance if preset is not None else 1.0
    switch = AdapterSwitch(model.unet)
    alignment, aesthetic = load_tiny_rewards()
    g = DEFAULT_GUIDANCE
    prompts = held_out_prompts(16 * args.groups, seed=3)

    groups = [jump_errors(model, prompts[16 * i:16 * (i + 1)], range(1000 + 16 * i, 1000 + 16 * (i + 1)), g,
                          shortcut_guidance=sg, naive_steps=args.naive_steps) for i in range(args.groups)]
    errors = {}
    for jump in groups[0]:
        row = {}
        for kind in ("shortcut", "naive", *(f"naive{k}" for k in args.naive_steps)):
            vals = [gr[jump][kind]["mean"] for gr in groups]
            row[kind] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
        row["ratio"] = row["shortcut"][0] / row["naive"][0]
        row["equivalent_steps"] = equivalent_steps(row["shortcut"][0], {1: row["naive"][0], **{
            k: row[f"naive{k}"][0] for k in args.naive_steps}})
        errors[jump] = row

    switch.activate(())
    variants = {
        "base 50-step DDIM, CFG 3": sample(model, prompts, seed=0, steps=50, guidance=g),
        f"shortcut alone, 4 steps, CFG {sg:g}": sample(model, prompts, seed=0, plan=few_step_plan(guidance=sg),
                                                       switch=switch),
        "base, 4 naive DDIM steps, CFG 3": sample(model, prompts, seed=0, plan=few_step_plan(net="base", guidance=g),
                                                  switch=switch),
    }
    scores = {}
    with torch.no_grad():
        for name, imgs in variants.items():
            a, q = alignment(imgs, prompts), aesthetic(imgs, prompts)
            scores[name] = {"alignment": (float(a.mean()), float(a.std())), "aesthetic": (float(q.mean()), float(q.std()))}

    ks = [k for k in args.naive_steps if k > 1]
    lines = ["| jump | shortcut rel. L2 | naive one-step DDIM rel. L2 | shortcut / naive |"
             + "".join(f" naive {k} steps / naive |" for k in ks) + " shortcut worth (base steps) |",
             "|---|---|---|---|" + "---|" * (len(ks) + 1)]
    for jump, r in errors.items():
        worth = r["equivalent_steps"]
        lines.append(f"| {jump} | {r['shortcut'][0]:.4f} +- {r['shortcut'][1]:.4f} | {r['naive'][0]:.4f} +- "
                     f"{r['naive'][1]:.4f} | {r['ratio']:.2f} |"
                     + "".join(f" {r[f'naive{k}'][0] / r['naive'][0]:.2f} |" for k in ks)
                     + (f" {worth:.1f} |" if worth is not None else " - |"))
    lines += ["", "| sampler (64 held-out prompts) | alignment | aesthetic |", "|---|---|---|"]
    for name, s in scores.items():
        lines.append(f"| {name} | {s['alignment'][0]:.4f} +- {s['alignment'][1]:.4f} | "
                     f"{s['aesthetic'][0]:.2f} +- {s['aesthetic'][1]:.2f} |")
    table = "\n".join(lines)
    (out / "results.json").write_text(json.dumps({"errors": errors, "scores": scores}, indent=1))
    (out / "table.md").write_text(table + "\n")
    print(table)
    if args.grid:
        n = 8
        imgs = [im for v in variants.values() for im in v[:n]]
        grid = captioned_grid(imgs, prompts[:n] * len(variants), columns=n, cell=96, font_size=9,
                              row_labels=["50-step", "shortcut 4", "naive 4"])
        save_png(grid, args.grid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
