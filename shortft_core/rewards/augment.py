"""Differentiable view jitter for reward scores: the reward is averaged over randomly shifted copies of each image.

A reward's pixel gradient at one exact framing is partly adversarial: directions that raise the score of this
crop but mean nothing to a human (or to the same reward one pixel to the left). Averaging the score over a few
sub-pixel translations keeps the gradient directions that survive a change of framing, the ones that change what
is drawn. It costs one extra reward pass per view and nothing in the diffusion chain.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def jitter(images: torch.Tensor, shift: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Translate each image by a random offset of up to ``shift`` x its size in x and y (bilinear, edge padding).

    Differentiable w.r.t. ``images``; the offsets come from ``generator`` (CPU), so a seeded run repeats exactly.
    """
    if shift < 0 or shift >= 0.5:
        raise ValueError(f"jitter shift must be in [0, 0.5) of the image size, got {shift}")
    b = images.shape[0]
    offsets = (torch.rand(b, 2, generator=generator) * 2 - 1) * shift * 2  # grid units: the image spans [-1, 1]
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = 1
    theta[:, 1, 1] = 1
    theta[:, :, 2] = offsets
    grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def jittered_score(reward: Callable[[torch.Tensor, Sequence[str]], torch.Tensor], images: torch.Tensor,
                   prompts: Sequence[str], views: int, shift: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean of ``reward`` over ``views`` jittered copies of the images (``views`` <= 1 and ``shift`` 0: plain)."""
    if views < 1:
        raise ValueError(f"reward views must be >= 1, got {views}")
    if shift == 0:
        return reward(images, prompts)
    scores = [reward(jitter(images, shift, generator), prompts) for _ in range(views)]
    return torch.stack(scores).mean(0)
