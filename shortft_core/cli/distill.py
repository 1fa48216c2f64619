"""``python -m shortft_core distill``: distill a shortcut LoRA from a base model (see :mod:`shortft_core.distillation`).

    python -m shortft_core distill --model tiny --out runs/shortcut                # the tiny world (CPU)
    python -m shortft_core distill --model /models/my-sd15.safetensors --prompts-file p.txt --out runs/sc

Writes ``shortcut.safetensors`` (kohya LoRA with ``.alpha``, loadable by diffusers, ComfyUI and ShortFT), periodic
atomic checkpoints and ``run.json``. The same command in the same folder returns a finished run without training
and continues an interrupted one exactly (more ``--steps`` continue a finished one); other settings there are
refused (``--overwrite`` starts over).
"""

from __future__ import annotations

import argparse
import logging

from ..distillation import DistillConfig
from .common import (MODEL_HELP, ProgressBar, StopOnCtrlC, add_config_flags, add_run_flags, given_settings,
                     read_prompts, resume_or_overwrite, set_threads)

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
    """argparse -> :class:`~shortft_core.session.DistillRequest` -> a distillation session, then the report."""
    from ..session import DistillRequest, DistillSession

    resume_or_overwrite(args)
    prompts = tuple(read_prompts(None, args.prompts_file, None)) if args.prompts_file else None
    cfg = DistillConfig(**given_settings(DistillConfig, args))
    set_threads(args.threads)
    request = DistillRequest(out=args.out, model=args.model, config=cfg, prompts=prompts, device=args.device,
                             overwrite=args.overwrite)
    ctrl_c = StopOnCtrlC()
    bar = ProgressBar(enabled=not args.no_progress, unit="step", show=("loss",), log_every=100)
    with DistillSession(request, callbacks=[bar], stop=ctrl_c) as session:
        session.check()  # the settings, the data source and the run folder, before the model loads
        if args.resume and session.previous is None:
            log.info("nothing to continue in %s: starting from scratch", args.out)
        with ctrl_c:
            try:
                result = session.run()
            finally:
                bar.close()
    m = result.metrics
    if result.status == "reused":
        print(f"{args.out} holds this finished distillation ({result.step} steps): nothing to train (--overwrite "
              "starts it over; more --steps continue it)")
    elif m:  # what a user sizing a run on their own card needs: speed and the memory it took
        peak = f", peak CUDA memory {m['peak_cuda_gib']:.1f} GiB" if "peak_cuda_gib" in m else ""
        print(f"step {result.step}: loss {m['loss']:.5f}, {m['sec_per_step']:.2f} s/step{peak}")
    print(f"wrote {result.shortcut}")
    if result.status == "stopped":
        print(f"interrupted at step {result.step}; {result.shortcut.name} is that state, and the same command "
              "continues the run")
        return 130  # the shell's status for a run ended by Ctrl-C
    return 0
