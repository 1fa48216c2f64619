"""Image preprocessing for reward models, in torch so that gradients reach the pixels.

Mirrors the reference PIL pipelines of CLIP-family models: resize the shorter side (antialiased), centre
crop, normalise with the model's mean and std.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Preprocess:
    """Resize shorter side to ``size`` (``interpolation``, antialiased), centre crop, normalise."""

    size: int = 224
    interpolation: str = "bicubic"
    crop: bool = True
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        h, w = x.shape[-2:]
        if self.crop:
            scale = self.size / min(h, w)
            nh, nw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        else:
            nh = nw = self.size
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode=self.interpolation, antialias=True,
                              align_corners=False if self.interpolation != "nearest" else None)
        if self.crop and (nh, nw) != (self.size, self.size):
            top, left = (nh - self.size) // 2, (nw - self.size) // 2
            x = x[..., top : top + self.size, left : left + self.size]
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std
