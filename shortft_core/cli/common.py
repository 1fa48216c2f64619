"""What the commands share: argparse types and flags (one flag per config setting, the run-folder flags),
threads, devices, prompts, the progress bar and the Ctrl-C stop request. The dispatcher (:mod:`shortft_core.cli`)
and every command module import from here; nothing here imports a command."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
import types
import typing
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..loop import Callback

log = logging.getLogger("shortft_core")


def number(kind: type = int, at_least: float | None = None, at_most: float | None = None) -> Callable[[str], float]:
    """An argparse ``type`` that parses ``kind`` and refuses values outside [at_least, at_most] with a usage error
    naming the flag, before the command loads anything."""
    from ..settings import outside

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
    from ..models import resolve_device

    return resolve_device(name)


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def read_prompts(prompts: Sequence[str] | None, prompts_file: str | None, held_out: int | None,
                 seed: int = 0) -> list[str]:
    """Prompts from the command line, a text file (one per line, ``#`` comments) or the tiny world's held-out set."""
    out = list(prompts or [])
    if prompts_file:
        from ..prompts import prompt_lines

        path = Path(prompts_file)
        if not path.is_file():
            raise SystemExit(f"--prompts-file {path}: no such file")
        out += prompt_lines(path.read_text(encoding="utf-8"))
    if held_out:
        from ..tiny_world import held_out_prompts

        out += held_out_prompts(held_out, seed=seed)
    if not out:
        raise SystemExit("no prompts: give --prompts, --prompts-file or --held-out N")
    return out


def add_config_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One flag per dataclass field (bools get --x/--no-x, tuples take several values, a setting with choices
    refuses others as a usage error); a setting renamed since (``cls.RENAMED``) also answers to its old flag."""
    hints = typing.get_type_hints(cls)
    old_names = {new: old for old, new in getattr(cls, "RENAMED", {}).items()}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flags = ["--" + f.name.replace("_", "-")]
        if f.name in old_names:
            flags.append("--" + old_names[f.name].replace("_", "-"))
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if args and typing.get_origin(hint) in (typing.Union, types.UnionType) else hint
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        shown = "none" if shown in (None, "") else shown  # as typed on the command line
        text = f"{f.metadata['help']} (default {shown})" if "help" in f.metadata else f"default {shown}"
        if base is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif typing.get_origin(base) is tuple:
            inner = typing.get_args(base)[0]
            parser.add_argument(*flags, nargs="+", type=inner, default=None, help=text)
        else:
            conv = base if base in (int, float, str) else str
            if optional:
                def conv(v, _b=conv):  # noqa: E306 - "none" clears an optional setting
                    return None if v.lower() == "none" else _b(v)
            parser.add_argument(*flags, type=conv, default=None, help=text, choices=f.metadata.get("choices"))


def given_settings(cls, args: argparse.Namespace) -> dict:
    """The settings of the config dataclass ``cls`` that were given as flags (the library completes and validates
    them: a bad value's ValueError names the flag, and ``cli.main`` prints it)."""
    values = {}
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = tuple(v) if isinstance(v, list) else v
    return values


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """The run-folder and machine flags that ``train`` and ``distill`` share."""
    parser.add_argument("--out", required=True, help="run folder")
    parser.add_argument("--resume", action="store_true",
                        help="say that the run in --out is to be continued (the same command continues a stopped run "
                             "with the same settings anyway, and returns a finished one)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an --out that holds another run (its checkpoints are deleted)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    add_threads_flag(parser)
    parser.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")


def resume_or_overwrite(args: argparse.Namespace) -> None:
    """Refuse ``--resume`` with ``--overwrite``. A run folder's own rule (:mod:`shortft_core.runs`) decides the rest:
    the same settings continue or return a run, other settings need ``--overwrite``; ``--resume`` only says that
    continuing is expected."""
    if args.resume and args.overwrite:
        raise SystemExit("--resume continues the run in --out and --overwrite starts it over: pass one of them")


class ProgressBar(Callback):
    """A tqdm bar over a loop's iterations (training or distillation) with the metrics named in ``show``, and the
    sampling phases (evaluation, before/after) as they go; held-out evaluations are logged. Without a bar, a log
    line every ``log_every`` iterations."""

    def __init__(self, enabled: bool = True, unit: str = "it", show: Sequence[str] = (), log_every: int = 20) -> None:
        self.enabled, self.unit, self.show, self.log_every = enabled, unit, tuple(show), log_every
        self.bar = None

    def on_start(self, loop) -> None:
        if self.enabled and loop.acc.is_main_process:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=loop.total, initial=loop.iteration, unit=self.unit, dynamic_ncols=True,
                            file=sys.stderr)

    def _shown(self, m: dict) -> dict:
        return {k: (f"{m[k]:.4f}" if isinstance(m[k], float) else m[k]) for k in self.show if k in m}

    def on_step(self, loop, m: dict) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(self._shown(m), refresh=False)
        elif loop.iteration % self.log_every == 0:
            shown = " ".join(f"{k} {v}" for k, v in self._shown(m).items())
            log.info("%s %d %s (%.1fs)", "iteration" if self.unit == "it" else self.unit, loop.iteration, shown,
                     loop.elapsed)

    def on_progress(self, loop, event: dict) -> None:
        if self.bar is not None and event["phase"] != "train" and (event["call"] % 10 == 0
                                                                   or event["call"] == event["calls"]):
            self.bar.set_postfix(sampling=f"{event['phase']} {event['call']}/{event['calls']}")

    def on_eval(self, loop, result: dict) -> None:
        log.info("eval at iteration %d: %s", result["iteration"],
                 ", ".join(f"{k} {v:.4f}" for k, v in result.items() if k not in ("iteration", "seconds")))

    def on_end(self, loop) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
