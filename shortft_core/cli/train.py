"""``python -m shortft_core train``: align a model to a reward with ShortFT (or a baseline) from the command line.

    python -m shortft_core train --preset tiny --out runs/tiny
    accelerate launch --num_processes 2 -m shortft_core train --preset tiny --out runs/tiny-ddp

Every :class:`~shortft_core.config.TrainConfig` field is a flag (``--rank 16``, ``--method draft``,
``--no-progressive`` ...). The command is argparse around one :func:`shortft_core.session` call, the same the
ComfyUI nodes and Python users make: the run folder receives the LoRA set, a reward curve, a before/after grid on
the same seeds, ``history.json``, ``run.json`` and checkpoints. The same command in the same folder returns a
finished run without training and continues an interrupted one exactly; other settings there are refused
(``--overwrite`` starts over).
"""

from __future__ import annotations

import argparse
import logging
import typing

from ..config import TRAIN_PRESETS, TINY_PRESET, TINY_REWARD, TrainConfig
from .common import (MODEL_HELP, ProgressBar, StopOnCtrlC, add_config_flags, add_run_flags, given_settings,
                     resume_or_overwrite, set_threads)

log = logging.getLogger(__name__)


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="align a model to a reward (ShortFT or a baseline)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(TRAIN_PRESETS), default=None,
                   help="tiny: the embedded tiny world's settings (" + ", ".join(f"{k} {v}" for k, v in
                                                                    TINY_PRESET.items()) + "; with --model tiny its "
                        "shortcut and its alignment reward, the aesthetic reward measured alongside)")
    p.add_argument("--model", default="tiny", help=MODEL_HELP)
    p.add_argument("--shortcut", default=None,
                   help="shortcut LoRA file ('tiny' = the shipped tiny shortcut; 'none' with --shortcut-net base)")
    p.add_argument("--shortcut-preset", default=None,
                   help="schedule preset of the shortcut (e.g. hyper-sd15-4step); default: from its file name/metadata")
    p.add_argument("--reward", default=None,
                   help="reward to maximise: a name or a weighted spec such as '10*pickscore+2*hps_v2+0.05*aesthetic' "
                        "(all names: `shortft score --help`); default for the tiny model: " + TINY_REWARD)
    p.add_argument("--reward-path", action="append", metavar="NAME=FILE",
                   help="weight file of a reward (repeatable), e.g. hps_v2=/models/HPS_v2_compressed.pt")
    p.add_argument("--reward-weights-dir", default=None, help="folder searched for reward weight files")
    p.add_argument("--eval-reward", action="append", metavar="SPEC",
                   help="extra reward measured on the held-out prompts (repeatable), e.g. aesthetic")
    p.add_argument("--prompts-file", default=None, help="training prompts, one per line (default: tiny-world captions)")
    p.add_argument("--eval-prompts-file", default=None, help="held-out evaluation prompts (default: tiny held-out set)")
    add_run_flags(p)
    add_config_flags(p, TrainConfig)
    p.set_defaults(func=run_train)


def _reward_paths(items: typing.Sequence[str] | None) -> dict[str, str]:
    """``--reward-path NAME=FILE`` values as a mapping."""
    paths = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--reward-path {item!r}: write NAME=FILE (e.g. hps_v2=/models/HPS_v2_compressed.pt)")
        k, v = item.split("=", 1)
        paths[k.strip()] = v.strip()
    return paths


def run_train(args: argparse.Namespace) -> int:
    """argparse -> :class:`~shortft_core.session.TrainRequest` -> a training session, then the report."""
    from ..session import TrainingSession, TrainRequest

    resume_or_overwrite(args)
    set_threads(args.threads)
    request = TrainRequest(
        out=args.out, model=args.model, reward=args.reward, config=given_settings(TrainConfig, args),
        preset=args.preset, prompts=args.prompts_file, eval_prompts=args.eval_prompts_file, shortcut=args.shortcut,
        shortcut_preset=args.shortcut_preset, shortcut_guidance=args.shortcut_guidance,
        eval_rewards=tuple(args.eval_reward or ()), reward_paths=_reward_paths(args.reward_path),
        reward_weights_dir=args.reward_weights_dir, device=args.device, overwrite=args.overwrite)
    ctrl_c = StopOnCtrlC()
    bar = ProgressBar(enabled=not args.no_progress, unit="it", show=("stage", "reward"), log_every=20)
    with TrainingSession(request, callbacks=[bar], stop=ctrl_c) as session:
        session.check()  # every input, before any model loads
        if args.resume and session.previous is None:
            log.info("nothing to continue in %s: starting from scratch", args.out)
        with ctrl_c:
            result = session.run()
    if result.lora is None:  # another DDP rank: the main process reports
        return 0
    if result.status == "reused":
        print(f"{args.out} holds this finished run ({result.iteration} iterations): nothing to train "
              "(--overwrite starts it over; more --iterations continue it)")
    if result.before and result.after:
        n = len(session.eval_prompts)
        for key in session.eval_specs:
            print(f"held-out {key} reward ({n} prompts): before {result.before[key]:.4f} -> after "
                  f"{result.after[key]:.4f}")
    elif not session.eval_prompts and not session.tiny:
        print("no held-out evaluation: give --eval-prompts-file to measure the reward before and after")
    print("wrote " + ", ".join(str(p) for p in result.files.values()))
    if result.status == "stopped":
        print(f"interrupted at iteration {result.iteration}; the checkpoint and files above are that state, and the "
              "same command continues the run")
        return 130  # the shell's status for a run ended by Ctrl-C
    return 0
