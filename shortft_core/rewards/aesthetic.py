"""Aesthetic-style rewards: a small MLP head on L2-normalised CLIP image embeddings.

The head has the layout of the LAION aesthetic predictor v2 (``layers.{0,2,4,6,7}``: input -> 1024 -> 128 ->
64 -> 16 -> 1, dropout between the first layers), so the published ``sac+logos+ava1-l14-linearMSE.pth`` and
the tiny world's head load into the same module.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from .base import Reward


class AestheticMLP(torch.nn.Module):
    """LAION aesthetic v2 head on an ``input_size`` embedding."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds).squeeze(-1)


def load_aesthetic_head(path: str | os.PathLike, input_size: int | None = None) -> AestheticMLP:
    """Load a head from safetensors or a plain state-dict ``.pth`` (``weights_only``; no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"aesthetic head {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    size = int(state["layers.0.weight"].shape[1]) if "layers.0.weight" in state else input_size
    head = AestheticMLP(size or 768)
    missing, unexpected = head.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} is not an aesthetic-MLP checkpoint: missing keys {missing}, unexpected {unexpected}")
    return head.eval()


class AestheticReward(Reward):
    """Aesthetic score = MLP head on the L2-normalised image embedding of a CLIP reward's image tower."""

    def __init__(self, clip_reward, head: AestheticMLP, name: str = "aesthetic") -> None:
        super().__init__()
        self.clip = clip_reward
        self.head = head
        self.name = name
        self.freeze()

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        emb = self.clip.image_embeds(images)
        return self.head(emb.to(next(self.head.parameters()).dtype)).float()
