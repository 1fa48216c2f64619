"""The visual property scored by the tiny world's aesthetic-style reward: *render cleanliness*.

A clean render (flat colours, crisp edges, no grain) scores 10. Three degradations lower it, each with a
strength u in [0, 1]:

* grain     - additive Gaussian pixel noise, std 0.12 * u (pixels in [0, 1]);
* blur      - Gaussian blur, sigma 1.6 * u output pixels;
* washout   - saturation pulled towards grey by 0.6 * u.

    cleanliness = 10 * (1 - 0.45 * u_grain - 0.35 * u_blur - 0.20 * u_washout)      (range 0..10)

This is the stand-in for LAION's aesthetic predictor: a reward *not* trained on during alignment, which drops
when alignment hacks the alignment reward with grain, smear or washed-out colours.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WEIGHTS = {"grain": 0.45, "blur": 0.35, "washout": 0.20}
MAX_NOISE_STD = 0.12
MAX_BLUR_SIGMA = 1.6
MAX_WASHOUT = 0.6


def cleanliness(strengths: torch.Tensor) -> torch.Tensor:
    """Target score (N,) from strengths (N, 3) ordered grain, blur, washout."""
    w = torch.tensor(list(WEIGHTS.values()), dtype=strengths.dtype, device=strengths.device)
    return 10.0 * (1.0 - (strengths * w).sum(-1))


def random_strengths(n: int, generator: torch.Generator, clean_fraction: float = 0.4) -> torch.Tensor:
    """Strengths for ``n`` images: a ``clean_fraction`` untouched, the rest with each degradation on at 50%."""
    u = torch.rand(n, 3, generator=generator)
    on = torch.rand(n, 3, generator=generator) < 0.5
    clean = torch.rand(n, 1, generator=generator) < clean_fraction
    return torch.where(on & ~clean, u, torch.zeros_like(u))


def _blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image separable Gaussian blur (radius 4) via a grouped convolution."""
    n, c, h, w = images.shape
    r = 4
    x = torch.arange(-r, r + 1, dtype=images.dtype, device=images.device)
    s = sigma.clamp_min(1e-3).to(images.dtype)[:, None]
    k = torch.exp(-0.5 * (x[None] / s) ** 2)
    k = k / k.sum(-1, keepdim=True)  # (n, 2r+1); sigma ~ 0 gives a delta
    k = k.repeat_interleave(c, 0)  # (n*c, 2r+1)
    flat = images.reshape(1, n * c, h, w)
    flat = F.conv2d(F.pad(flat, (r, r, 0, 0), mode="replicate"), k[:, None, None, :], groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, r, r), mode="replicate"), k[:, None, :, None], groups=n * c)
    return flat.reshape(n, c, h, w)


def degrade(images: torch.Tensor, strengths: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Apply the three degradations to images in [0, 1] (N, 3, H, W) with strengths (N, 3)."""
    grain, blur, washout = strengths.unbind(-1)
    x = _blur(images, blur * MAX_BLUR_SIGMA)
    grey = x.mean(1, keepdim=True)
    x = x + (grey - x) * (washout * MAX_WASHOUT).view(-1, 1, 1, 1)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    x = x + noise.to(x.device) * (grain * MAX_NOISE_STD).view(-1, 1, 1, 1)
    return x.clamp(0, 1)
