"""Command line: ``python -m shortft_core <command>`` (also installed as ``shortft``): a host beside the library,
like the ComfyUI nodes; each command is argparse around library calls.

Commands: ``sample`` (generate images and a captioned grid), ``train`` (reward fine-tuning: ShortFT and the
baselines), ``distill`` (a shortcut LoRA for any eps base), ``export`` (LoRA layout conversion) and ``score``
(evaluate images with any reward).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence


def _commands() -> list[Callable]:
    from .distill import add_distill_parser
    from .export import add_export_parser
    from .sample import add_sample_parser
    from .score import add_score_parser
    from .train import add_train_parser

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
