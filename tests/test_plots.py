"""The run's pictures: the reward curve and the before/after grid, written, re-read and checked for content."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from shortft_core.images import captioned_grid, save_png
from shortft_core.plots import (HELD_OUT_COLOUR, before_after_grid, eval_names, plot_reward_curve,
                                reward_curve_figure)
from shortft_core.tiny_world import held_out_prompts, is_held_out, train_prompts


def history(iterations: int = 24, stages: int = 4, eval_every: int | None = 8) -> dict:
    """A history as ``dataclasses.asdict(History)``: rising alignment, falling aesthetic, ``stages`` stages."""
    g = torch.Generator().manual_seed(0)
    its = list(range(1, iterations + 1))
    per = max(1, iterations // stages)
    evals = []
    if eval_every:
        for i in range(0, iterations + 1, eval_every):
            evals.append({"iteration": i, "seconds": 0.5 * i, "tiny_alignment": 0.80 + 0.001 * i,
                          "tiny_alignment_std": 0.05, "tiny_aesthetic": 9.4 - 0.01 * i, "tiny_aesthetic_std": 0.3})
    return {"iterations": its, "seconds": [0.5 * i for i in its],
            "reward": (0.8 + 0.001 * torch.arange(iterations) + 0.02 * torch.randn(iterations, generator=g)).tolist(),
            "loss": [0.0] * iterations, "stage": [min(stages, (i - 1) // per + 1) for i in its], "evals": evals}


def read_png(path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def test_reward_curve_plots_every_evaluation_both_axes_and_labelled_stages(tmp_path):
    h = history()
    fig = reward_curve_figure(h, method="shortft", reward_name="tiny_alignment", untrained_name="tiny_aesthetic")
    left, right = fig.axes
    held = [ln for ln in left.get_lines() if ln.get_label().startswith("held-out tiny_alignment")]
    assert len(held) == 1 and list(held[0].get_xdata()) == [0, 8, 16, 24]  # every evaluation, not two
    assert list(held[0].get_ydata()) == pytest.approx([0.80, 0.808, 0.816, 0.824])
    (untrained,) = right.get_lines()
    assert list(untrained.get_ydata()) == pytest.approx([9.4, 9.32, 9.24, 9.16])
    assert right.get_ylabel().startswith("tiny_aesthetic")
    labels = sorted(t.get_text().strip() for t in left.texts if "stage" in t.get_text())
    assert labels == ["stage 1", "stage 2", "stage 3", "stage 4"]
    dotted = [ln for ln in left.get_lines() if ln.get_linestyle() == ":"]
    assert sorted(ln.get_xdata()[0] for ln in dotted) == [7, 13, 19]  # where stages 2, 3, 4 begin
    assert "shortft" in left.get_title() and "tiny_alignment" in left.get_title()
    path = plot_reward_curve(h, tmp_path / "run" / "reward_curve.png", method="shortft",
                             reward_name="tiny_alignment", untrained_name="tiny_aesthetic")
    arr = read_png(path)
    assert arr.shape == (528, 825, 3) and arr.std() > 20  # drawn, not blank
    assert [p.name for p in path.parent.iterdir()] == ["reward_curve.png"]  # no temporary file left


@pytest.mark.parametrize("kwargs", [dict(eval_every=None), dict(stages=1), dict(iterations=0, eval_every=None)],
                         ids=["no-evals", "one-stage", "empty"])
def test_reward_curve_draws_whatever_history_there_is(tmp_path, kwargs):
    h = history(**kwargs)
    fig = reward_curve_figure(h, method="alignprop", reward_name="hps_v2", untrained_name="aesthetic")
    assert len(fig.axes) == 1  # no evaluation of the untrained reward: no right axis
    stages = len(set(h["stage"]))
    marked = [t for t in fig.axes[0].texts if "stage" in t.get_text()]
    assert len(marked) == (stages if stages > 1 else 0)  # one stage: nothing to mark
    arr = read_png(plot_reward_curve(h, tmp_path / "c.png", method="alignprop", reward_name="hps_v2",
                                     untrained_name="aesthetic"))
    assert arr.std() > 5
    assert eval_names(h) == ([] if not h["evals"] else ["tiny_alignment", "tiny_aesthetic"])
    fields = {k: dataclasses.field(default_factory=list) for k in h}
    History = dataclasses.make_dataclass("History", [(k, list, f) for k, f in fields.items()])
    figs = [reward_curve_figure(x, method="a", reward_name="r") for x in (h, History(**h))]  # dict or dataclass
    a, b = ([list(ln.get_ydata()) for ln in f.axes[0].get_lines()] for f in figs)
    assert a == b and len(a) >= (1 if h["reward"] else 0)


def solid(colours) -> torch.Tensor:
    return torch.stack([torch.tensor(c, dtype=torch.float32)[:, None, None].expand(3, 16, 16) for c in colours])


def test_before_after_grid_tiles_rewards_and_held_out_frames(tmp_path):
    prompts = held_out_prompts(2, seed=0) + train_prompts(1, seed=0)
    marks = [is_held_out(p) for p in prompts]
    assert marks == [True, True, False]
    before = solid([(1, 0, 0), (0, 1, 0), (0, 0, 1)])
    after = solid([(1, 1, 0), (0, 1, 1), (1, 0, 1)])
    cell = 64
    grid = before_after_grid(before, after, prompts, rewards_before=[0.8, 0.7, 0.9], rewards_after=[0.85, 0.6, 0.9],
                             held_out=marks, reward_name="tiny_alignment", cell=cell)
    save_png(grid, tmp_path / "before_after.png")
    arr = read_png(tmp_path / "before_after.png")
    assert arr.shape[:2] == (grid.height, grid.width)
    # find each tile by its colour: one tile of each of the six colours, in two rows of three columns
    centres = {}
    for colour in [*before, *after]:
        rgb = (colour[:, 0, 0] * 255).round().to(torch.uint8).numpy()
        ys, xs = np.nonzero((arr == rgb).all(-1))
        assert len(ys) == cell * cell, rgb  # exactly one whole tile of that colour
        centres[tuple(rgb)] = (ys.mean(), xs.mean())
    rows = sorted({round(y) for y, _ in centres.values()})
    cols = sorted({round(x) for _, x in centres.values()})
    assert len(rows) == 2 and len(cols) == 3
    assert all(centres[tuple((c[:, 0, 0] * 255).byte().numpy())][0] < rows[1] for c in before)  # before on top
    frame = (arr == np.array(HELD_OUT_COLOUR, dtype=np.uint8)).all(-1)
    for j, x in enumerate(cols):  # the held-out columns are framed, the training prompt's is not
        y = int(rows[0])
        band = frame[y - cell // 2 - 3: y - cell // 2, int(x) - 5: int(x) + 5]
        assert band.any() == marks[j], j
    plain = before_after_grid(before, after, prompts, cell=cell)  # no rewards, no marks: smaller, still a grid
    assert plain.width == grid.width and plain.height < grid.height
    with pytest.raises(ValueError, match="2 rewards_after for 3 prompts"):
        before_after_grid(before, after, prompts, rewards_after=[0.1, 0.2])


def test_is_held_out_reads_tiny_captions_only():
    assert is_held_out("a small blue circle on the left on a white background")  # ("blue", "circle") is held out
    assert not is_held_out("a small red circle on the left on a white background")
    assert is_held_out("a red circle left of an orange diamond on a black background")
    assert not is_held_out("a photo of a blue circle")  # outside the grammar: names no pair


def test_a_one_image_grid_is_one_cell_wide():
    one = captioned_grid(solid([(1, 0, 0)]), ["a red square"], columns=4, cell=128)
    assert one.width == 128
    three = captioned_grid(solid([(1, 0, 0)] * 3), ["a", "b", "c"], columns=4, cell=128)
    assert three.width == 3 * 128
    five = captioned_grid(solid([(1, 0, 0)] * 5), list("abcde"), columns=4, cell=128)
    assert five.width == 4 * 128 and five.height > three.height
