"""Prompts: the lines of a text (one prompt per line, blank lines and ``#`` comments skipped), prompt files, and the
training prompts a run draws its batches from."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch


class PromptSource:
    """Training prompts: a fixed list drawn with replacement from a seeded generator (same on every rank).

    Empty and whitespace-only prompts are dropped; nothing left is a ValueError naming ``what`` the prompts were
    (e.g. the file), raised before any model loads."""

    def __init__(self, prompts: Sequence[str], exclude: Sequence[str] = (), what: str = "the training prompts") -> None:
        if isinstance(prompts, str):
            raise TypeError("PromptSource takes a list of prompts, not a single string")
        drop = set(exclude)
        usable = [p.strip() for p in prompts if p and p.strip()]
        if not usable:
            raise ValueError(f"{what}: no usable prompt (empty or whitespace only); give at least one prompt")
        self.prompts = [p for p in usable if p not in drop]
        if not self.prompts:
            raise ValueError(f"{what}: no training prompt left after removing the {len(drop)} evaluation prompts; "
                             "give training prompts that are not also evaluation prompts")

    def draw(self, n: int, gen: torch.Generator) -> list[str]:
        idx = torch.randint(0, len(self.prompts), (n,), generator=gen).tolist()
        return [self.prompts[i] for i in idx]

    @classmethod
    def tiny(cls, n: int = 4000, seed: int = 0, exclude: Sequence[str] = ()) -> "PromptSource":
        """Tiny-world captions from every composition (held-out pairs included), minus the evaluation prompts."""
        from .tiny_world import scenes

        caps = sorted({scenes.sample_scene(seed + 9000, i, "any").caption for i in range(n)})
        return cls(caps, exclude, what="the tiny-world captions")

    @classmethod
    def from_file(cls, path: str | os.PathLike, exclude: Sequence[str] = ()) -> "PromptSource":
        """Prompts of a text file, one per line; blank lines and ``#`` comments are skipped."""
        return cls(read_prompt_file(path), exclude, what=f"prompt file {path}")


def prompt_lines(text: str) -> list[str]:
    """Prompts of a text, one per line; blank lines and ``#`` comments are skipped."""
    lines = [ln.strip() for ln in text.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """The usable lines of a prompt file (:func:`prompt_lines`); a missing file or one with no usable line is an
    error naming it."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"prompt file {p} not found (looked for that exact file)")
    usable = prompt_lines(p.read_text(encoding="utf-8"))
    if not usable:
        raise ValueError(f"prompt file {p} has no usable line (only blank lines or # comments)")
    return usable
