"""The reward interface: ``reward(images, prompts) -> (B,)``, higher is better, differentiable w.r.t. pixels.

Images are float tensors in [0, 1] of shape (B, 3, H, W); every reward resizes and normalises them itself
(in torch, so gradients flow), because a preprocessing mismatch silently optimises something else.
Reward weights are frozen: ``requires_grad`` is off and the module stays in eval mode.
"""

from __future__ import annotations

from typing import Sequence

import torch


class Reward(torch.nn.Module):
    """Base class of all rewards. Subclasses implement :meth:`score`."""

    name: str = "reward"

    def freeze(self) -> "Reward":
        self.requires_grad_(False)
        self.eval()
        return self

    def train(self, mode: bool = True) -> "Reward":  # rewards never leave eval mode (dropout off)
        return super().train(False)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_images(images, self.name)
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: {images.shape[0]} images but {len(prompts)} prompts; give one prompt per image")
        return self.score(images, list(prompts))


def check_images(images: torch.Tensor, who: str = "reward") -> None:
    """Refuse anything that is not a (B, 3, H, W) floating tensor (values are expected in [0, 1])."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{who}: images must be a (B, 3, H, W) tensor in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"{who}: images must be floating point in [0, 1], got {images.dtype}; divide uint8 by 255")
