"""Pictures of a training run: the reward curve (``reward_curve.png``) and the before/after grid
(``before_after.png``).

Both take plain data, so every host draws the same pictures: the curve takes a run's history as the dict that
``dataclasses.asdict(History)`` gives (the ``history.json`` of a run folder), the grid takes image tensors and the
rewards the host measured. Neither loads a model.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from PIL import Image, ImageDraw

from .images import _font, to_pil
from .files import atomic_path

log = logging.getLogger(__name__)

_NOT_REWARDS = ("iteration", "seconds")
TRAINED_COLOUR, UNTRAINED_COLOUR, BATCH_COLOUR, MEAN_COLOUR = "#1f77b4", "#2ca02c", "#c8c8c8", "#555555"
HELD_OUT_COLOUR = (230, 120, 20)  # the frame of a held-out composition in the grid
BETTER, WORSE = (20, 130, 40), (190, 30, 30)
_LABEL_BOX = {"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8}


# ----- the reward curve ----------------------------------------------------------------------------------------
def eval_names(history: Mapping[str, Any]) -> list[str]:
    """The rewards the held-out evaluations of ``history`` measured, in their order (``*_std`` entries aside)."""
    names: list[str] = []
    for e in history.get("evals") or ():
        names += [k for k in e if k not in _NOT_REWARDS and not k.endswith("_std") and k not in names]
    return names


def _series(history: Mapping[str, Any], name: str) -> tuple[list[float], list[float], list[float]]:
    """Iterations, means and standard deviations of evaluation reward ``name`` (every evaluation that has it)."""
    evals = [e for e in history.get("evals") or () if name in e]
    return ([float(e["iteration"]) for e in evals], [float(e[name]) for e in evals],
            [float(e.get(name + "_std", 0.0)) for e in evals])


def _moving_mean(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over ``window`` values (shorter at the start, so it spans every iteration)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _stage_starts(history: Mapping[str, Any]) -> list[tuple[float, int]]:
    """``(iteration, stage)`` where each stage begins (the first one included)."""
    iterations, stages = list(history.get("iterations") or ()), list(history.get("stage") or ())
    starts = []
    for i, (it, st) in enumerate(zip(iterations, stages)):
        if i == 0 or st != stages[i - 1]:
            starts.append((float(it), int(st)))
    return starts


def reward_curve_figure(history: Mapping[str, Any], *, method: str, reward_name: str,
                        untrained_name: str | None = None):
    """The matplotlib figure :func:`plot_reward_curve` writes (for hosts that show it without a file). It is a
    plain ``Figure``, not a pyplot one: no global state, so a host may draw from a worker thread.

    Left axis: the reward of every training batch (light grey), its moving mean (dark grey), and the held-out
    mean of ``reward_name`` at every evaluation (blue, markers). Right axis: the held-out mean of
    ``untrained_name``, a reward training never sees, so what a gain costs is visible. Dotted lines mark where each
    progressive stage begins, labelled with its number above the plot. The first and last held-out means are
    written beside their markers; each held-out axis spans at least one std across prompts around the first
    mean (so evaluation noise does not look like a trend); the legend sits under the plot.
    """
    from matplotlib.figure import Figure
    from matplotlib.transforms import blended_transform_factory

    if dataclasses.is_dataclass(history):  # the trainer's History itself
        history = dataclasses.asdict(history)
    iterations = [float(i) for i in history.get("iterations") or ()]
    rewards = [float(r) for r in history.get("reward") or ()]
    fig = Figure(figsize=(7.5, 4.8), dpi=110)
    ax = fig.subplots()
    lines = []
    if rewards:
        window = max(1, len(rewards) // 25)
        lines += ax.plot(iterations, rewards, color=BATCH_COLOUR, lw=0.8, label=f"training batch {reward_name}")
        if window > 1:
            lines += ax.plot(iterations, _moving_mean(rewards, window), color=MEAN_COLOUR, lw=1.2,
                             label=f"training batch, mean of {window}")
    names = eval_names(history)
    trained = reward_name if reward_name in names else next((n for n in names if n != untrained_name), None)
    if trained is not None:
        xs, ys, sd = _series(history, trained)
        lines += ax.plot(xs, ys, "o-", color=TRAINED_COLOUR, lw=2, ms=5, label=f"held-out {trained} (mean)")
        _annotate_ends(ax, xs, ys, TRAINED_COLOUR)
        _span_spread(ax, ys, sd)
    ax.set_xlabel("iteration")
    ax.set_ylabel(reward_name, color=TRAINED_COLOUR)
    if untrained_name is not None and untrained_name in names:
        right = ax.twinx()
        xs, ys, sd = _series(history, untrained_name)
        lines += right.plot(xs, ys, "s--", color=UNTRAINED_COLOUR, lw=1.5, ms=4,
                            label=f"held-out {untrained_name} (right axis; not trained)")
        _annotate_ends(right, xs, ys, UNTRAINED_COLOUR)
        _span_spread(right, ys, sd)
        right.set_ylabel(f"{untrained_name} (not trained)", color=UNTRAINED_COLOUR)
        right.tick_params(axis="y", colors=UNTRAINED_COLOUR)
    starts = _stage_starts(history)
    if len(starts) > 1:
        top = blended_transform_factory(ax.transData, ax.transAxes)
        for x, stage in starts:
            if x > starts[0][0]:
                ax.axvline(x, color="0.45", ls=":", lw=1)
            ax.text(x, 1.01, f"stage {stage}", transform=top, va="bottom", ha="left", fontsize=8, color="0.3")
    if not lines:
        ax.text(0.5, 0.5, "no iterations recorded", transform=ax.transAxes, ha="center", va="center", color="0.4")
    last = int(iterations[-1]) if iterations else 0
    ax.set_title(f"{method} on {reward_name}: {last} iterations", fontsize=11, pad=16 if len(starts) > 1 else 6)
    if lines:
        ax.legend(lines, [ln.get_label() for ln in lines], fontsize=7.5, loc="upper center", ncol=2,
                  bbox_to_anchor=(0.5, -0.13), frameon=False)
    ax.grid(alpha=0.25)
    fig.tight_layout()
    return fig


def _span_spread(ax, ys: Sequence[float], sd: Sequence[float]) -> None:
    """Widen ``ax``'s y range to at least the first evaluation's mean +- half its std across prompts: an axis fitted
    to a few means alone draws a change far smaller than the spread between prompts as a steep trend."""
    if not ys:
        return
    lo, hi = ax.get_ylim()
    ax.set_ylim(min(lo, ys[0] - sd[0] / 2), max(hi, ys[0] + sd[0] / 2))


def _annotate_ends(ax, xs: Sequence[float], ys: Sequence[float], colour: str) -> None:
    """Write the first and last values beside their markers (the numbers the run prints)."""
    if not xs:
        return
    ax.annotate(f"{ys[0]:.3f}", (xs[0], ys[0]), textcoords="offset points", xytext=(6, -3), va="top",
                fontsize=7.5, color=colour, fontweight="bold", bbox=_LABEL_BOX)
    if len(xs) > 1:
        ax.annotate(f"{ys[-1]:.3f}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(-6, -3), ha="right",
                    va="top", fontsize=7.5, color=colour, fontweight="bold", bbox=_LABEL_BOX)


def plot_reward_curve(history: Mapping[str, Any], path: str | os.PathLike, *, method: str, reward_name: str,
                      untrained_name: str | None = None) -> Path:
    """Write the reward curve of a run (see :func:`reward_curve_figure`) as a PNG, atomically; returns the path.

    ``history`` is ``dataclasses.asdict(trainer.History)`` (keys ``iterations``, ``seconds``, ``reward``, ``loss``,
    ``stage``, ``evals``; each evaluation a dict with ``iteration``, ``seconds``, one mean per reward and its
    ``<name>_std``), or the History itself. A history without evaluations or with one stage draws what there is.
    """
    fig = reward_curve_figure(history, method=method, reward_name=reward_name, untrained_name=untrained_name)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    log.info("wrote %s", path)
    return path


# ----- the before/after grid -----------------------------------------------------------------------------------
def before_after_grid(before: Sequence[torch.Tensor] | torch.Tensor, after: Sequence[torch.Tensor] | torch.Tensor,
                      prompts: Sequence[str], *, rewards_before: Sequence[float] | None = None,
                      rewards_after: Sequence[float] | None = None, held_out: Sequence[bool] | None = None,
                      reward_name: str = "reward", cell: int = 128, font_size: int = 11) -> Image.Image:
    """A two-row grid, one column per prompt: the image before training above the image after it (same seed),
    each tile's reward printed under it (after: with its change, green when it rose), each column's prompt on
    top, held-out compositions framed and tagged, and the row means in the left margin. Returns a PIL image
    for :func:`~shortft_core.images.save_png`.

    ``before``/``after`` are (N, 3, H, W) tensors in [0, 1] (or sequences of (3, H, W) tensors or PIL images);
    ``held_out`` has one boolean per prompt (the tiny world decides it with
    :func:`shortft_core.tiny_world.is_held_out`).
    """
    n = len(prompts)
    if n == 0:
        raise ValueError("before_after_grid needs at least one prompt")
    for label, seq in (("before", before), ("after", after), ("rewards_before", rewards_before),
                       ("rewards_after", rewards_after), ("held_out", held_out)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"before_after_grid: {len(seq)} {label} for {n} prompts; give one per prompt")
    font, small = _font(font_size), _font(max(8, font_size - 1))
    line = font_size + 3
    chars = max(8, int(cell / (font_size * 0.55)))
    captions = [textwrap.wrap(p, chars)[:4] or [""] for p in prompts]
    header = max(len(c) for c in captions) * line + (line if held_out is not None and any(held_out) else 0) + 6
    reward_row = line + 4 if rewards_before is not None or rewards_after is not None else 2
    row_h = cell + reward_row
    margin = 12 + int(font_size * 0.62) * max(len("before"), len(f"mean {0.0:.3f}"))
    notes = []
    if rewards_before is not None or rewards_after is not None:
        notes.append(f"under each image: {reward_name}")
    if held_out is not None and any(held_out):
        notes.append("framed: held-out compositions (colour-shape pairs never seen in training)")
    pad = 12  # between columns: room for the held-out frames
    width = margin + n * (cell + pad) + pad
    note_lines = textwrap.wrap("; ".join(notes), max(20, int((width - 12) / (font_size * 0.55))))
    footer = len(note_lines) * line + 6 if notes else 4
    grid = Image.new("RGB", (width, header + 2 * row_h + footer), "white")
    draw = ImageDraw.Draw(grid)
    for j, lines in enumerate(captions):
        x = margin + pad + j * (cell + pad)
        y = 3
        if held_out is not None and held_out[j]:
            draw.text((x, y), "held-out", fill=HELD_OUT_COLOUR, font=font)
            y += line
        for k, text in enumerate(lines):
            draw.text((x, y + k * line), text, fill="black", font=small)
    rows = (("before", before, rewards_before), ("after", after, rewards_after))
    for r, (label, images, rewards) in enumerate(rows):
        y = header + r * row_h
        draw.text((6, y + cell // 2 - line), label, fill="black", font=font)
        if rewards is not None:
            draw.text((6, y + cell // 2 + 2), f"mean {sum(rewards) / n:.3f}", fill=(60, 60, 60), font=small)
        for j in range(n):
            x = margin + pad + j * (cell + pad)
            img = images[j]
            pil = to_pil(img) if isinstance(img, torch.Tensor) else img.convert("RGB")
            resample = Image.NEAREST if pil.width * 2 <= cell else Image.LANCZOS
            grid.paste(pil.resize((cell, cell), resample), (x, y))
            if held_out is not None and held_out[j]:
                draw.rectangle((x - 3, y - 3, x + cell + 2, y + cell + 2), outline=HELD_OUT_COLOUR, width=3)
            if rewards is not None:
                text, colour = f"{rewards[j]:.3f}", (0, 0, 0)
                if r == 1 and rewards_before is not None:
                    delta = rewards[j] - rewards_before[j]
                    text += f" ({delta:+.3f})"
                    colour = BETTER if delta > 0 else WORSE if delta < 0 else (0, 0, 0)
                draw.text((x + 2, y + cell + 4), text, fill=colour, font=small)
    for k, text in enumerate(note_lines):
        draw.text((6, header + 2 * row_h + 3 + k * line), text, fill=(60, 60, 60), font=small)
    return grid
