"""Low-level rewards computed from the pixels alone: symmetry and compressibility (prompts are ignored).

The paper uses both but does not publish their definitions, so these are ours. Like every reward here they are
higher-is-better; the paper's tables print Symmetry as an error ("lower is better"), which is ``-symmetry``
(see :meth:`SymmetryReward.error`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .base import Reward

# ITU-T T.81 Annex K quantisation tables (luminance, chrominance) at quality 50
_JPEG_LUMA = (
    (16, 11, 10, 16, 24, 40, 51, 61), (12, 12, 14, 19, 26, 58, 60, 55), (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62), (18, 22, 37, 56, 68, 109, 103, 77), (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101), (72, 92, 95, 98, 112, 100, 103, 99),
)
_JPEG_CHROMA = (
    (17, 18, 24, 47, 99, 99, 99, 99), (18, 21, 26, 66, 99, 99, 99, 99), (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99), *((99,) * 8,) * 4,
)


class SymmetryReward(Reward):
    """Left-right mirror symmetry: ``-mean |x - flip_w(x)|`` over pixels and channels, in [0, 1] units.

    0 for a perfectly mirror-symmetric image, about -1/3 for independent uniform noise, -1 at worst (black/white
    halves). The gradient pushes each pixel towards its mirror twin. The paper's "Symmetry (lower is better)" is
    an error of this kind: minus this reward.
    """

    name = "symmetry"

    def __init__(self, name: str = "symmetry") -> None:
        super().__init__()
        self.name = name

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        x = images.float()
        return -(x - x.flip(-1)).abs().mean(dim=(1, 2, 3))


def _dct_matrix(n: int = 8) -> torch.Tensor:
    """Orthonormal DCT-II basis (rows are frequencies), the transform JPEG applies to each 8x8 block."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    m = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m.float()


class CompressibilityReward(Reward):
    """A differentiable stand-in for "small JPEG file": minus the estimated bits per 8x8 DCT coefficient.

    JPEG converts to YCbCr, takes the DCT of 8x8 blocks, divides by a quantisation table and entropy-codes the
    rounded coefficients; a coefficient of magnitude m costs about log2(1 + m) bits plus a run-length symbol.
    We compute the same transform (quality-50 tables, ``quality`` rescales them like libjpeg) and score
    ``-mean log2(1 + sqrt(c^2 + eps))`` over all quantised coefficients c (DC as block-to-block differences),
    skipping the rounding so that the gradient exists. A flat image scores near 0, noise far below; the score tracks real JPEG sizes
    (tests/test_rewards_pixel.py checks the rank correlation). DDPO's compressibility is the non-differentiable
    ``-JPEG kB``; this is its smooth surrogate. Images are cropped to a multiple of 8 (top-left), as JPEG's
    padding would add constant blocks.
    """

    name = "compressibility"

    def __init__(self, quality: int = 50, name: str = "compressibility", eps: float = 1e-3) -> None:
        super().__init__()
        if not 1 <= quality <= 100:
            raise ValueError(f"compressibility: quality must be in 1..100, got {quality}")
        scale = 5000 / quality if quality < 50 else 200 - 2 * quality  # libjpeg's quality scaling
        tables = torch.tensor([_JPEG_LUMA, _JPEG_CHROMA, _JPEG_CHROMA], dtype=torch.float32)
        tables = ((tables * scale + 50) // 100).clamp(min=1)
        self.name = name
        self.eps = eps
        self.quality = quality
        self._tables = tables  # plain tensors (not buffers): the reward stays weightless and runs on the images' device
        self._dct = _dct_matrix(8)

    def coefficients(self, images: torch.Tensor) -> torch.Tensor:
        """Quantised (unrounded) DCT coefficients, shape (B, 3, H/8, W/8, 8, 8), in JPEG's 0..255 level units."""
        x = images.float() * 255.0
        h, w = (x.shape[-2] // 8) * 8, (x.shape[-1] // 8) * 8
        if h == 0 or w == 0:
            raise ValueError(f"{self.name}: images must be at least 8x8, got {tuple(images.shape[-2:])}")
        x = x[..., :h, :w]
        r, g, b = x[:, 0], x[:, 1], x[:, 2]
        ycc = torch.stack([0.299 * r + 0.587 * g + 0.114 * b - 128.0,
                           -0.168736 * r - 0.331264 * g + 0.5 * b,
                           0.5 * r - 0.418688 * g - 0.081312 * b], dim=1)
        blocks = ycc.unflatten(2, (h // 8, 8)).unflatten(4, (w // 8, 8)).permute(0, 1, 2, 4, 3, 5)
        d = self._dct.to(x.device)
        coef = d @ blocks @ d.T
        return coef / self._tables.to(x.device)[None, :, None, None]

    def bits(self, images: torch.Tensor) -> torch.Tensor:
        """Estimated bits per coefficient, (B,). DC terms are coded as differences from the previous block in
        raster order, as JPEG does, so a flat image of any colour is cheap."""
        c = self.coefficients(images)
        dc = c[..., 0, 0].flatten(2)
        dc = torch.diff(dc, dim=-1, prepend=torch.zeros_like(dc[..., :1]))
        ac = c.flatten(-2)[..., 1:]

        def cost(t: torch.Tensor) -> torch.Tensor:
            return torch.log2(1.0 + torch.sqrt(t * t + self.eps))

        total = cost(dc).sum(dim=(1, 2)) + cost(ac).sum(dim=(1, 2, 3, 4))
        return total / (dc.shape[1] * dc.shape[2] * 64)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return -self.bits(images)
