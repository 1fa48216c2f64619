"""``python -m shortft_core distill``: distill a shortcut LoRA from a base model (see :mod:`shortft_core.distill`).

    python -m shortft_core distill --model tiny --out runs/shortcut                # the tiny world (CPU)
    python -m shortft_core distill --model /models/my-sd15.safetensors --prompts-file p.txt --out runs/sc

Writes ``shortcut.safetensors`` (kohya LoRA with ``.alpha``, loadable by diffusers, ComfyUI and ShortFT) and
periodic atomic checkpoints; ``--resume`` continues an interrupted run exactly.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from .distill import DistillConfig, Distiller
from .cli_common import (MODEL_HELP, StopOnCtrlC, add_config_flags, add_run_flags, config_from_args, device,
                         prepare_run_folder, read_prompts, set_threads)

log = logging.getLogger(__name__)


def add_distill_parser(sub) -> None:
    p = sub.add_parser("distill", help="distill a shortcut (few-step) LoRA from a base model", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help=MODEL_HELP)
    p.add_argument("--prompts-file", default=None,
                   help="prompts for data-free distillation (--data trajectories; default for the tiny world: its "
                        "captions)")
    add_run_flags(p)
    add_config_flags(p, DistillConfig, skip=("prompts",))
    p.set_defaults(func=run_distill)


def run_distill(args: argparse.Namespace) -> int:
    from .lora_io import export_lora
    from .loading import load_model
    from .models import PRECISION

    prompts = tuple(read_prompts(None, args.prompts_file, None)) if args.prompts_file else ()
    cfg = config_from_args(DistillConfig, args, {"prompts": prompts})
    out = Path(args.out)
    target = out / "shortcut.safetensors"
    prepare_run_folder(out, args.resume, args.overwrite, outputs=(target.name,))
    cfg.check_data(tiny=args.model == "tiny")
    set_threads(args.threads)
    model = load_model(args.model, device(args.device), PRECISION[cfg.mixed_precision])
    d = Distiller(model, cfg, out)
    if args.resume and not d.resume():
        log.info("no checkpoint in %s: starting from scratch", out)
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=d.step, unit="step", dynamic_ncols=True, file=sys.stderr)

    def on_step(step: int, m: dict) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)
        elif step % 100 == 0:
            log.info("step %d loss %.5f (%.2fs/step)", step, m["loss"], m["sec_per_step"])

    with StopOnCtrlC() as ctrl_c:
        metrics = d.run(on_step=on_step, should_stop=ctrl_c)
    if bar is not None:
        bar.close()
    if metrics:  # what a user sizing a run on their own card needs: speed and the memory it took
        peak = (f", peak CUDA memory {torch.cuda.max_memory_allocated(model.device) / 2**30:.1f} GiB"
                if model.device.type == "cuda" else "")
        print(f"step {d.step}: loss {metrics['loss']:.5f}, {metrics['sec_per_step']:.2f} s/step{peak}")
    export_lora(model.unet, "shortcut", target, layout="kohya", metadata=d.metadata(), overwrite=True)
    print(f"wrote {target}")
    if ctrl_c.requested:
        print(f"interrupted at step {d.step}; {target.name} is that state, and the same command with --resume "
              "continues the run")
        return 130  # the shell's status for a run ended by Ctrl-C
    return 0
