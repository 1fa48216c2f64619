"""Text-image alignment scored by a transformers CLIP dual encoder (CLIP score, PickScore, the tiny world's reward).

score = scale * cos(image embedding, text embedding), where ``scale`` is 1 (cosine, e.g. HPS-style and CLIP
score) or ``logit_scale.exp()`` (PickScore's convention).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .base import Reward
from .preprocess import Preprocess

log = logging.getLogger(__name__)


def clip_features(out) -> torch.Tensor:
    """transformers 5 may return an output object from get_*_features; unwrap to the projected tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        v = getattr(out, name, None)
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(f"cannot find the embedding in {type(out).__name__}")


def load_clip_folder(folder: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Load a local transformers CLIPModel folder and its tokenizer; both offline and checked."""
    from transformers import CLIPModel

    from ..tokenizer import load_clip_tokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no CLIP model at {folder} (config.json missing): pass a local transformers CLIP folder")
    model = CLIPModel.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    tok_dir = folder / "tokenizer" if (folder / "tokenizer" / "vocab.json").is_file() else folder
    return model, load_clip_tokenizer(tok_dir)


class CLIPAlignmentReward(Reward):
    """Cosine (optionally scaled by ``logit_scale.exp()``) between CLIP image and text embeddings."""

    def __init__(self, model, tokenizer, preprocess: Preprocess, use_logit_scale: bool = False,
                 name: str = "clip_score") -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.use_logit_scale = use_logit_scale
        self.name = name
        self.freeze()

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (differentiable)."""
        pixels = self.preprocess(images.to(self.device)).to(self.model.dtype)
        return F.normalize(clip_features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings (the text side never needs a gradient)."""
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").to(self.device)
        out = self.model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
        return F.normalize(clip_features(out).float(), dim=-1)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        cos = (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)
        if self.use_logit_scale:
            cos = cos * self.model.logit_scale.exp().float()
        return cos
