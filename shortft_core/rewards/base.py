"""The reward interface: ``reward(images, prompts) -> (B,)``, higher is better, differentiable w.r.t. pixels.

Images are float tensors in [0, 1] of shape (B, 3, H, W); every reward resizes and normalises them itself
(in torch, so gradients flow), because a preprocessing mismatch silently optimises something else.
Reward weights are frozen: ``requires_grad`` is off and the module stays in eval mode.
A reward may live on another device than the images (e.g. the reward on ``cuda:1``, the UNet on ``cuda:0``):
``forward`` moves the images to the reward and the scores back, so gradients cross devices.
"""

from __future__ import annotations

from typing import Sequence

import torch


class Reward(torch.nn.Module):
    """Base class of all rewards. Subclasses implement :meth:`score`.

    ``report_scale`` is the factor papers print the score with (HPS v2 is reported x100); the reward itself
    always returns the raw value, so combination weights keep their published meaning.
    """

    name: str = "reward"
    report_scale: float = 1.0

    def freeze(self) -> "Reward":
        self.requires_grad_(False)
        self.eval()
        return self

    def train(self, mode: bool = True) -> "Reward":  # rewards never leave eval mode (dropout off)
        return super().train(False)

    @property
    def device(self) -> torch.device | None:
        """Device of the reward's weights; ``None`` for weightless rewards (they run where the images are)."""
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return None

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_images(images, self.name)
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: {images.shape[0]} images but {len(prompts)} prompts; give one prompt per image")
        device = self.device
        x = images if device is None or device == images.device else images.to(device)
        return self.score(x, list(prompts)).float().to(images.device)


def check_images(images: torch.Tensor, who: str = "reward") -> None:
    """Refuse anything that is not a (B, 3, H, W) floating tensor (values are expected in [0, 1])."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{who}: images must be a (B, 3, H, W) tensor in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"{who}: images must be floating point in [0, 1], got {images.dtype}; divide uint8 by 255")


