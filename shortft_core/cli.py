"""Command line: ``python -m shortft_core <command>`` (also installed as ``shortft``).

Commands: ``sample`` (generate images and a captioned grid), ``train`` (reward fine-tuning: ShortFT and the
baselines), ``distill`` (a shortcut LoRA for any eps base), ``export`` (LoRA layout conversion) and ``score``
(evaluate images with any reward).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Sequence

import torch

log = logging.getLogger("shortft_core")


def number(kind: type = int, at_least: float | None = None, at_most: float | None = None) -> Callable[[str], float]:
    """An argparse ``type`` that parses ``kind`` and refuses values outside [at_least, at_most] with a usage error
    naming the flag, before the command loads anything."""
    from .checkpoint import outside

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if outside(value, at_least=at_least, at_most=at_most):
            span = (f"in {at_least:g}..{at_most:g}" if at_least is not None and at_most is not None
                    else f">= {at_least:g}" if at_least is not None else f"<= {at_most:g}")
            raise argparse.ArgumentTypeError(f"must be {span}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


MODEL_HELP = ("'tiny' (the embedded tiny world), a local SD1.5/SDXL diffusers folder, or a single-file SD1.5/SDXL "
              "checkpoint (.safetensors, e.g. from ComfyUI's models/checkpoints)")


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's CPU threads for a command that runs a model (on a busy CPU box fewer can be faster)."""
    parser.add_argument("--threads", type=number(int, at_least=1), default=None,
                        help="CPU threads for torch (default: torch's choice)")


def set_threads(threads: int | None) -> None:
    """Apply ``--threads`` (None keeps torch's default)."""
    if threads:
        torch.set_num_threads(threads)


class StopOnCtrlC:
    """While active, the first Ctrl-C asks a training loop to stop after its current step, so it checkpoints and
    writes its files (``--resume`` continues); a second Ctrl-C interrupts at once. Only in the main thread (the
    ComfyUI nodes stop through their own interrupt); elsewhere it never asks. Call it to read the request."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "StopOnCtrlC":
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, self._ask)
            self._previous = previous if previous is not None else signal.default_int_handler  # None: set from C
        return self

    def _ask(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)  # the second Ctrl-C does what it did before
        log.warning("Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again aborts at once)")

    def __exit__(self, *exc) -> bool:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        return False

    def __call__(self) -> bool:
        return self.requested


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return dev


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def read_prompts(prompts: Sequence[str] | None, prompts_file: str | None, held_out: int | None,
                 seed: int = 0) -> list[str]:
    """Prompts from the command line, a text file (one per line, ``#`` comments) or the tiny world's held-out set."""
    out = list(prompts or [])
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise SystemExit(f"--prompts-file {path}: no such file")
        out += [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    if held_out:
        from .tiny_world import held_out_prompts

        out += held_out_prompts(held_out, seed=seed)
    if not out:
        raise SystemExit("no prompts: give --prompts, --prompts-file or --held-out N")
    return out


# ----- sample ------------------------------------------------------------------------------------------------
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
    p.add_argument("--dtype", choices=list(_DTYPES), default=None, help="default fp32 on CPU, fp16 on CUDA")
    add_threads_flag(p)
    p.add_argument("--offload-text-encoders", action="store_true",
                   help="keep the text encoders in host memory, lent to the GPU per batch (SDXL: 1.5 GiB less)")
    p.add_argument("--columns", type=number(int, 1), default=4, help="columns of the grid image")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace files from an earlier run in --out")
    p.set_defaults(func=run_sample)


def run_sample(args: argparse.Namespace) -> int:
    from .images import captioned_grid, save_png
    from .io import atomic_write_json
    from .lora_io import lora_file
    from .lora_set import LoraSet, trained_guidance
    from .models import TINY, load_model
    from .sampling import sample
    from .tiny_world import DEFAULT_GUIDANCE

    prompts = read_prompts(args.prompts, args.prompts_file, args.held_out, args.seed)
    out = Path(args.out)
    targets = [out / f"{i:04d}.png" for i in range(len(prompts))] + [out / "grid.png", out / "samples.json"]
    clash = [str(p) for p in targets if p.exists()]
    if clash and not args.overwrite:
        raise SystemExit(f"--out {out} already holds {clash[0]} (and {len(clash) - 1} more); "
                         "choose another folder or pass --overwrite")
    set_threads(args.threads)
    device = _device(args.device)
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    # a missing or damaged LoRA file (its safetensors header) ends the command before the model loads
    if args.lora:
        lora_file(args.lora)
    if args.lora_set:
        LoraSet.open(args.lora_set)  # the manifest and every file it lists
    trained = trained_guidance(args.lora_set or args.lora) if (args.lora_set or args.lora) else None
    guidance = args.guidance if args.guidance is not None else (
        trained if trained is not None else DEFAULT_GUIDANCE if args.model == TINY else 7.5)
    if args.guidance is None and trained is not None:
        log.info("guidance %.2f: the scale the LoRA was trained for (--guidance overrides)", trained)
    model = load_model(args.model, device, dtype)
    if args.offload_text_encoders:
        model.offload_text_encoders()
    plan, switch = None, None
    if args.lora_set or args.lora:
        from .adapters import AdapterSwitch
        from .lora_io import load_lora_adapter
        from .lora_set import load_lora_set, set_inference_plan
        from .plans import adapter_chain
        from .sampling import timestep_grid

        grid = timestep_grid(args.steps, args.spacing, model.schedule.num_train_timesteps)
        if args.lora_set:
            names, segments = load_lora_set(model.unet, args.lora_set)
            plan = set_inference_plan(names, segments, guidance, grid)
        else:
            load_lora_adapter(model.unet, args.lora, "lora", trainable=False)
            plan = adapter_chain(("lora",), guidance, grid)
        switch = AdapterSwitch(model.unet)
    log.info("sampling %d prompts, %d steps, guidance %.2f, seed %d", len(prompts), args.steps, guidance, args.seed)
    images = sample(model, prompts, seed=args.seed, steps=args.steps, guidance=guidance,
                    negative_prompt=args.negative_prompt, spacing=args.spacing, batch_size=args.batch_size,
                    plan=plan, switch=switch)
    for i, img in enumerate(images):
        save_png(img, targets[i])
    save_png(captioned_grid(list(images), prompts, columns=args.columns), out / "grid.png")
    atomic_write_json(out / "samples.json", {
        "model": str(args.model), "steps": args.steps, "spacing": args.spacing, "guidance": guidance,
        "negative_prompt": args.negative_prompt, "dtype": str(dtype), "device": str(device),
        "lora_set": args.lora_set, "lora": args.lora,
        "images": [{"file": targets[i].name, "prompt": p, "seed": args.seed + i} for i, p in enumerate(prompts)],
    })
    log.info("wrote %d images and grid.png to %s", len(prompts), out)
    return 0


# ----- entry ---------------------------------------------------------------------------------------------------
def _commands() -> list[Callable]:
    from .distill_cli import add_distill_parser
    from .export_cli import add_export_parser
    from .rewards.cli import add_score_parser
    from .train_cli import add_train_parser

    return [add_sample_parser, add_train_parser, add_distill_parser, add_export_parser, add_score_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shortft", description="ShortFT: shortcut-based reward fine-tuning "
                                     "of text-to-image diffusion models (arXiv 2507.22604).")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and the traceback of an error instead of its one-line message")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _commands():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. A missing file, a file it would overwrite, or a bad value (FileNotFoundError /
    FileExistsError / ValueError, whose messages name the input and the fix) ends it with that message and exit
    status 1; ``-v`` shows the traceback instead."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        if args.verbose:
            raise
        raise SystemExit(f"error: {e}\n(shortft -v {args.command} ... shows the traceback)") from None


if __name__ == "__main__":
    sys.exit(main())
