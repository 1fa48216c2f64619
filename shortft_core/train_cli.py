"""``python -m shortft_core train``: align a model to a reward with ShortFT (or a baseline) from the command line.

    python -m shortft_core train --preset tiny --out runs/tiny
    accelerate launch --num_processes 2 -m shortft_core train --preset tiny --out runs/tiny-ddp

Every :class:`~shortft_core.trainer.TrainConfig` field is a flag (``--rank 16``, ``--method draft``,
``--no-progressive`` ...). The run folder receives the LoRA set, a reward curve, a before/after grid on the same
seeds, ``history.json`` and checkpoints; ``--resume`` continues an interrupted run exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import types
import typing
from pathlib import Path

import torch

from .cli import MODEL_HELP, StopOnCtrlC, add_threads_flag
from .trainer import Callback, PromptSource, TrainConfig, Trainer

log = logging.getLogger(__name__)

# The tiny preset trains the alignment reward with unguided tuned steps (CFG 1; the shortcut still runs guided, as
# it was distilled): with CFG 3 the base already sits where a small LoRA can take the alignment in minutes, while
# without CFG there is a direction every prompt shares (follow the caption more strongly) that the reward teaches
# (3 seeds, BENCHMARKS.md "Tiny world: which reward trains"). The tuned steps also cost one UNet batch, not two.
TINY_PRESET = dict(iterations=320, batch_size=4, lr=5e-4, rank=8, guidance=1.0, real_grad_steps=1, eval_prompts=32)
TINY_REWARD = "tiny_alignment"  # the reward of the tiny model when --reward is not given


def add_config_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One flag per dataclass field (bools get --x/--no-x, tuples take several values, a setting with choices
    refuses others as a usage error)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if args and typing.get_origin(hint) in (typing.Union, types.UnionType) else hint
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        shown = "none" if shown in (None, "") else shown  # as typed on the command line
        text = f"{f.metadata['help']} (default {shown})" if "help" in f.metadata else f"default {shown}"
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif typing.get_origin(base) is tuple:
            inner = typing.get_args(base)[0]
            parser.add_argument(flag, nargs="+", type=inner, default=None, help=text)
        else:
            conv = base if base in (int, float, str) else str
            if optional:
                def conv(v, _b=conv):  # noqa: E306 - "none" clears an optional setting
                    return None if v.lower() == "none" else _b(v)
            parser.add_argument(flag, type=conv, default=None, help=text, choices=f.metadata.get("choices"))


def config_from_args(cls, args: argparse.Namespace, base: dict | None = None):
    """The config dataclass ``cls`` from ``base`` and the flags given, validated before any model is loaded (a bad
    value's ValueError names the flag; ``cli.main`` prints it)."""
    values = dict(base or {})
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = tuple(v) if isinstance(v, list) else v
    cfg = cls(**values)
    cfg.validate()
    return cfg


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """The run-folder and machine flags that ``train`` and ``distill`` share."""
    parser.add_argument("--out", required=True, help="run folder")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an --out that holds an earlier run (its checkpoints are deleted)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    add_threads_flag(parser)
    parser.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")


def prepare_run_folder(out: Path, resume: bool, overwrite: bool, outputs: typing.Sequence[str]) -> None:
    """Check ``--out`` before any model loads: an earlier run there (checkpoints, or any of ``outputs``) must be
    continued (--resume) or replaced (--overwrite, which deletes its checkpoints now; the outputs are replaced
    when the new run writes them), so no finished run is overwritten by accident."""
    if resume and overwrite:
        raise SystemExit("--resume continues the run in --out and --overwrite starts it over: pass one of them")
    ckpt = out / "checkpoints"
    found = [p.name for p in (ckpt, *(out / o for o in outputs))
             if p.is_file() or (p.is_dir() and any(p.iterdir()))]
    if found and not (resume or overwrite):
        raise SystemExit(f"--out {out} holds an earlier run ({', '.join(found)}); pass --resume to continue it or "
                         "--overwrite to start over")
    if overwrite and ckpt.is_dir():
        for f in ckpt.iterdir():
            if f.is_file():
                f.unlink(missing_ok=True)  # every DDP rank runs this


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="align a model to a reward (ShortFT or a baseline)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["tiny"], default=None,
                   help="tiny: the embedded tiny world's settings (with --model tiny, its shortcut and its "
                        "aesthetic reward; the alignment reward is evaluated alongside)")
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


class StopWhen(Callback):
    """Asks the trainer to stop when ``asked()`` turns true (the CLI's Ctrl-C)."""

    def __init__(self, asked: typing.Callable[[], bool]) -> None:
        self.asked = asked

    def should_stop(self, trainer) -> bool:
        return self.asked()


class ProgressBar(Callback):
    """tqdm bar with the current reward and stage; the held-out evaluations are logged."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.enabled, self.bar = total, enabled, None

    def on_start(self, trainer) -> None:
        if self.enabled and trainer.acc.is_main_process:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=trainer.iteration, unit="it", dynamic_ncols=True, file=sys.stderr)

    def on_step(self, trainer, m: dict) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(stage=m["stage"], reward=f"{m['reward']:.4f}", refresh=False)
        elif m["iteration"] % 20 == 0:
            log.info("iteration %d stage %d reward %.4f (%.1fs)", m["iteration"], m["stage"], m["reward"], m["seconds"])

    def on_eval(self, trainer, result: dict) -> None:
        log.info("eval at iteration %d: %s", result["iteration"],
                 ", ".join(f"{k} {v:.4f}" for k, v in result.items() if k not in ("iteration", "seconds")))

    def on_end(self, trainer) -> None:
        if self.bar is not None:
            self.bar.close()


def _rewards(args: argparse.Namespace, device) -> tuple:
    """The training reward (a weighted spec) and the evaluation rewards (the spec itself plus any --eval-reward;
    on the tiny world also its aesthetic reward, which training never sees)."""
    from .rewards.registry import build_reward_spec

    paths = {}
    for item in args.reward_path or []:
        if "=" not in item:
            raise SystemExit(f"--reward-path {item!r}: write NAME=FILE (e.g. hps_v2=/models/HPS_v2_compressed.pt)")
        k, v = item.split("=", 1)
        paths[k.strip()] = v.strip()
    build = lambda spec: build_reward_spec(spec, paths, weights_dir=args.reward_weights_dir, device=device)  # noqa: E731
    reward = build(args.reward)
    evals = {args.reward: reward}
    extra = list(args.eval_reward or [])
    if args.model == "tiny":
        extra += [s for s in ("tiny_alignment", "tiny_aesthetic") if s != args.reward]
    for spec in extra:
        evals[spec] = build(spec)
    return reward, evals


def run_train(args: argparse.Namespace) -> int:
    from .cli import _device, set_threads
    from .images import captioned_grid, save_png
    from .io import atomic_write_json
    from .models import PRECISION, load_model
    from .lora_io import lora_file
    from .shortcut import get_preset, load_shortcut
    from .tiny_world import held_out_prompts, tiny_shortcut_path

    if args.reward is None:
        if args.model != "tiny":
            raise SystemExit("--reward is required for a real model, e.g. --reward hps_v2 --reward-path "
                             "hps_v2=/models/HPS_v2_compressed.pt (all names: `shortft score --help`)")
        args.reward = TINY_REWARD
    base = dict(TINY_PRESET) if args.preset == "tiny" else {}
    cfg = config_from_args(TrainConfig, args, base)
    out = Path(args.out)
    prepare_run_folder(out, args.resume, args.overwrite, outputs=("lora",))
    set_threads(args.threads)
    device = _device(args.device)
    dtype = PRECISION[cfg.mixed_precision]
    # what a user can get wrong is checked before the model loads (a minute for SDXL): prompts, shortcut, rewards
    eval_prompts = (PromptSource.from_file(args.eval_prompts_file).prompts if args.eval_prompts_file
                    else held_out_prompts(cfg.eval_prompts, seed=1))
    prompts = (PromptSource.from_file(args.prompts_file, exclude=eval_prompts) if args.prompts_file
               else PromptSource.tiny(exclude=eval_prompts))
    shortcut = args.shortcut if args.shortcut is not None else ("tiny" if args.model == "tiny" else None)
    needs_shortcut = cfg.method == "shortcut-model" or (cfg.method == "shortft" and cfg.shortcut_net == "shortcut")
    if needs_shortcut:
        if shortcut in (None, "none"):
            raise SystemExit("ShortFT needs --shortcut FILE (a Hyper-SD/PCM/TCD or distilled LoRA), "
                             "or --shortcut-net base for naive DDIM jumps")
        shortcut_file = lora_file(tiny_shortcut_path() if shortcut == "tiny" else shortcut)
        if args.shortcut_preset:
            get_preset(args.shortcut_preset)
    reward, eval_rewards = _rewards(args, device)
    model = load_model(args.model, device, dtype)
    preset = None
    if needs_shortcut:
        _, preset = load_shortcut(model.unet, shortcut_file, preset=args.shortcut_preset, family=model.family)
        if preset is not None and args.shortcut_guidance is None:  # run the shortcut the way it was trained
            cfg = dataclasses.replace(cfg, shortcut_guidance=preset.guidance)
    bar = ProgressBar(cfg.iterations, enabled=not args.no_progress)
    ctrl_c = StopOnCtrlC()
    trainer = Trainer(model, reward, cfg, prompts, eval_prompts, out=out, callbacks=[bar, StopWhen(ctrl_c)],
                      eval_reward=eval_rewards, shortcut_preset=preset)
    if args.resume and not trainer.resume():
        log.info("no checkpoint in %s: starting from scratch", out)
    log.info("%s\n%s", "training plan (first iteration):",
             __import__("shortft_core.trainer", fromlist=["method_plan"]).method_plan(cfg, 1, torch.Generator()).describe())
    grid_prompts = (eval_prompts or prompts.prompts)[:8]  # --eval-prompts 0: the grid shows training prompts
    before = trainer.sample(grid_prompts, seed=0, use_adapters=False)
    with ctrl_c:
        history = trainer.fit()
    if not trainer.acc.is_main_process:
        return 0
    after = trainer.sample(grid_prompts, seed=0)
    paths = trainer.save_lora_set(out / "lora", overwrite=args.overwrite or args.resume)
    save_png(captioned_grid(list(before) + list(after), grid_prompts * 2, columns=len(grid_prompts), cell=96,
                            font_size=9, row_labels=["before", "after"]), out / "before_after.png")
    _plot_curve(history, out / "reward_curve.png", args.reward)
    atomic_write_json(out / "history.json", dataclasses.asdict(history))
    if history.evals:  # none with --eval-prompts 0
        first, last = history.evals[0], history.evals[-1]
        for key in eval_rewards:
            print(f"held-out {key} reward ({len(eval_prompts)} prompts): before {first[key]:.4f} -> after {last[key]:.4f}")
    print(f"wrote {', '.join(str(p) for p in paths)}, {out / 'reward_curve.png'}, {out / 'before_after.png'}")
    if ctrl_c.requested:
        print(f"interrupted at iteration {trainer.iteration}; the files above are that state, and the same command "
              "with --resume continues the run")
        return 130  # the shell's status for a run ended by Ctrl-C
    return 0


def _plot_curve(history, path: Path, reward_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_path

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    if history.reward:
        w = max(1, len(history.reward) // 25)
        smooth = torch.tensor(history.reward).unfold(0, w, 1).mean(1).tolist() if len(history.reward) >= w else history.reward
        ax.plot(history.iterations, history.reward, color="0.8", lw=0.8, label="training batch")
        ax.plot(history.iterations[w - 1:], smooth, color="C0", lw=1.5, label=f"moving mean ({w})")
    if history.evals:
        key = next(k for k in history.evals[0] if k not in ("iteration", "seconds") and not k.endswith("_std"))
        ax.plot([e["iteration"] for e in history.evals], [e[key] for e in history.evals], "o-", color="C3",
                label=f"held-out {key}")
    for i in range(1, len(history.stage)):
        if history.stage[i] != history.stage[i - 1]:
            ax.axvline(history.iterations[i], color="0.6", ls=":", lw=0.8)
    ax.set_xlabel("iteration")
    ax.set_ylabel(reward_name)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
