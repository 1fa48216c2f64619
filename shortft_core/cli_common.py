"""What the commands share: argparse types and flags (one flag per config setting, the run-folder flags),
threads, devices, prompts, and the Ctrl-C stop request. The dispatcher (:mod:`shortft_core.cli`) and every
command module import from here; nothing here imports a command."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import threading
import types
import typing
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


def device(name: str) -> torch.device:
    """``--device``: auto (cuda when available), cpu, cuda, cuda:1 ..."""
    from .models import resolve_device

    return resolve_device(name)


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def read_prompts(prompts: Sequence[str] | None, prompts_file: str | None, held_out: int | None,
                 seed: int = 0) -> list[str]:
    """Prompts from the command line, a text file (one per line, ``#`` comments) or the tiny world's held-out set."""
    out = list(prompts or [])
    if prompts_file:
        from .trainer import prompt_lines

        path = Path(prompts_file)
        if not path.is_file():
            raise SystemExit(f"--prompts-file {path}: no such file")
        out += prompt_lines(path.read_text(encoding="utf-8"))
    if held_out:
        from .tiny_world import held_out_prompts

        out += held_out_prompts(held_out, seed=seed)
    if not out:
        raise SystemExit("no prompts: give --prompts, --prompts-file or --held-out N")
    return out


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
