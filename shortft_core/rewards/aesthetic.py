"""Aesthetic-style rewards: a small MLP head on L2-normalised image embeddings.

The head has the layout of the LAION aesthetic predictor v2 (``layers.{0,2,4,6,7}``: input -> 1024 -> 128 ->
64 -> 16 -> 1, dropout between the first layers), so the published ``sac+logos+ava1-l14-linearMSE.pth`` (on
OpenAI CLIP ViT-L/14 embeddings), the tiny world's head and ImageReward's scoring head load into one module.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from .base import Reward
from .weights import check_keys, load_state_dict

HEAD_KEYS = tuple(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))


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
    """Load a head from safetensors or a plain state-dict ``.pth`` (``weights_only``; no pickled code runs).

    The input size is read from the file; ``input_size``, when given, must agree (e.g. 768 for ViT-L/14).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"aesthetic head {path} not found")
    state = load_state_dict(path)
    check_keys("aesthetic head", path, HEAD_KEYS, state.keys())
    size = int(state["layers.0.weight"].shape[1])
    if input_size is not None and input_size != size:
        raise ValueError(f"aesthetic head {path} expects {size}-d embeddings, but the image encoder gives "
                         f"{input_size}-d; pair the head with the CLIP it was trained on (ViT-L/14: 768)")
    head = AestheticMLP(size)
    head.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return head.eval()


class AestheticReward(Reward):
    """Aesthetic score = MLP head on the L2-normalised image embedding of any image encoder.

    ``embedder`` is an object with ``image_embeds(images) -> (B, D)`` (e.g. a :class:`CLIPAlignmentReward`) or
    a plain callable doing the same; its output must already be L2-normalised, as the LAION head expects.
    """

    def __init__(self, embedder, head: AestheticMLP, name: str = "aesthetic") -> None:
        super().__init__()
        if isinstance(embedder, torch.nn.Module):
            self.clip = embedder  # registered, so .to(device) moves it too
        embed_fn: Callable[[torch.Tensor], torch.Tensor] | None = getattr(embedder, "image_embeds", None)
        if embed_fn is None and callable(embedder):
            embed_fn = embedder
        if embed_fn is None:
            raise TypeError(f"{name}: embedder must have image_embeds(images) or be callable, got {type(embedder).__name__}")
        self._embed = embed_fn
        self.head = head
        self.name = name
        self.freeze()

    @property
    def device(self) -> torch.device:
        return next(self.head.parameters()).device

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        emb = self._embed(images)
        head_param = next(self.head.parameters())
        return self.head(emb.to(device=head_param.device, dtype=head_param.dtype)).float()
