"""Differentiable rewards: ``reward(images in [0, 1] (B, 3, H, W), prompts) -> (B,)``, higher is better."""

from .base import Reward

__all__ = ["Reward"]
