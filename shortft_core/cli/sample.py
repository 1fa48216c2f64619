"""``python -m shortft_core sample``: images of a model, bare or with an aligned LoRA set (segment j's LoRA at
segment j's timesteps) or one LoRA, by deterministic DDIM; PNGs, a captioned grid and ``samples.json``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from .common import DTYPES, MODEL_HELP, add_threads_flag, device, number, read_prompts, set_threads

log = logging.getLogger(__name__)


def add_sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="generate images with DDIM and write PNGs plus a captioned grid",
                       description="Generate images with deterministic DDIM (SD1.5's leading grid) and "
                                   "classifier-free guidance; image i uses noise seeded seed+i.")
    p.add_argument("--model", default="tiny", help=MODEL_HELP)
    p.add_argument("--prompts", nargs="+", help="one or more prompts")
    p.add_argument("--prompts-file", help="text file with one prompt per line")
    p.add_argument("--held-out", type=number(int, 0), metavar="N", help="add N held-out tiny-world prompts")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the first image (default 0)")
    p.add_argument("--steps", type=number(int, 1, 1000), default=50, help="DDIM steps (default 50)")
    p.add_argument("--spacing", choices=["leading", "trailing"], default="leading", help="timestep spacing")
    p.add_argument("--guidance", type=number(float, 1), default=None,
                   help="classifier-free guidance scale; 1 disables (default: the scale a ShortFT --lora-set or "
                        "--lora was trained for, else 3.0 tiny, 7.5 otherwise)")
    p.add_argument("--negative-prompt", default="", help="prompt for the unconditional branch")
    lora = p.add_mutually_exclusive_group()
    lora.add_argument("--lora-set", default=None, metavar="DIR",
                      help="apply an aligned LoRA set (a run's lora/ folder): segment j's LoRA at segment j's timesteps")
    lora.add_argument("--lora", default=None, metavar="FILE", help="apply one LoRA file at every timestep")
    p.add_argument("--batch-size", type=number(int, 1), default=16, help="prompts sampled together (default 16)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default fp32 on CPU, fp16 on CUDA")
    add_threads_flag(p)
    p.add_argument("--offload-text-encoders", action="store_true",
                   help="keep the text encoders in host memory, lent to the GPU per batch (SDXL: 1.5 GiB less)")
    p.add_argument("--columns", type=number(int, 1), default=4, help="columns of the grid image")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace files from an earlier run in --out")
    p.set_defaults(func=run_sample)


def run_sample(args: argparse.Namespace) -> int:
    from ..images import captioned_grid, save_png
    from ..files import atomic_write_json
    from ..lora_io import lora_file
    from ..lora_set import LoraSet, default_guidance, sample_aligned, trained_guidance
    from ..loading import load_model

    prompts = read_prompts(args.prompts, args.prompts_file, args.held_out, args.seed)
    out = Path(args.out)
    targets = [out / f"{i:04d}.png" for i in range(len(prompts))] + [out / "grid.png", out / "samples.json"]
    clash = [str(p) for p in targets if p.exists()]
    if clash and not args.overwrite:
        raise SystemExit(f"--out {out} already holds {clash[0]} (and {len(clash) - 1} more); "
                         "choose another folder or pass --overwrite")
    set_threads(args.threads)
    dev = device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if dev.type == "cuda" else torch.float32)
    # a missing or damaged LoRA file (its safetensors header) ends the command before the model loads
    if args.lora:
        lora_file(args.lora)
    lora_set = LoraSet.open(args.lora_set) if args.lora_set else None  # the manifest and every file it lists
    model = load_model(args.model, dev, dtype)
    if args.offload_text_encoders:
        model.offload_text_encoders()
    guidance = args.guidance if args.guidance is not None else default_guidance(model, lora_set or args.lora)
    if args.guidance is None and (lora_set or args.lora) and trained_guidance(args.lora_set or args.lora) is not None:
        log.info("guidance %.2f: the scale the LoRA was trained for (--guidance overrides)", guidance)
    images = sample_aligned(model, prompts, lora_set=lora_set, lora=args.lora, seed=args.seed, steps=args.steps,
                            spacing=args.spacing, guidance=guidance, negative_prompt=args.negative_prompt,
                            batch_size=args.batch_size)
    for i, img in enumerate(images):
        save_png(img, targets[i])
    save_png(captioned_grid(list(images), prompts, columns=args.columns), out / "grid.png")
    atomic_write_json(out / "samples.json", {
        "model": str(args.model), "steps": args.steps, "spacing": args.spacing, "guidance": guidance,
        "negative_prompt": args.negative_prompt, "dtype": str(dtype), "device": str(dev),
        "lora_set": args.lora_set, "lora": args.lora,
        "images": [{"file": targets[i].name, "prompt": p, "seed": args.seed + i} for i, p in enumerate(prompts)],
    })
    log.info("wrote %d images and grid.png to %s", len(prompts), out)
    return 0
