"""Symmetry and compressibility: our own differentiable definitions, tested for the behaviour they promise."""

from __future__ import annotations

import io

import pytest
import torch

from shortft_core.rewards import build_reward
from shortft_core.rewards.pixel import CompressibilityReward, SymmetryReward


def smooth_noise(b: int, h: int, w: int, cells: int = 8, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.rand(b, 3, cells, cells, generator=gen), size=(h, w),
                                           mode="bicubic", align_corners=False).clamp(0, 1)


def _ranks(values: list[float]) -> torch.Tensor:
    order = torch.tensor(values).argsort()
    ranks = torch.empty(len(values))
    ranks[order] = torch.arange(len(values), dtype=torch.float32)
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def test_symmetry_prefers_mirror_images():
    reward = SymmetryReward()
    x = smooth_noise(3, 64, 96, seed=1)
    mirrored = (x + x.flip(-1)) / 2
    s_x, s_m = reward(x, [""] * 3), reward(mirrored, [""] * 3)
    assert torch.allclose(s_m, torch.zeros(3), atol=1e-7)
    assert (s_m > s_x).all()
    noise = torch.rand(4, 3, 64, 64)
    assert (reward(noise, [""] * 4) + 1 / 3).abs().max() < 0.02  # E|U1 - U2| = 1/3 for independent uniforms


def test_symmetry_gradient_step_increases_symmetry():
    reward = SymmetryReward()
    x = smooth_noise(2, 32, 32, seed=2).requires_grad_(True)
    before = reward(x, ["", ""])
    before.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    after = reward((x + 0.05 * x.grad.sign()).detach(), ["", ""])
    assert (after > before.detach()).all()


def test_compressibility_orders_flat_smooth_noise():
    reward = CompressibilityReward()
    flat = torch.full((1, 3, 64, 64), 0.8)
    smooth = smooth_noise(1, 64, 64, seed=3)
    noise = torch.rand(1, 3, 64, 64)
    s = [reward(x, [""]).item() for x in (flat, smooth, noise)]
    assert s[0] > s[1] > s[2]
    assert s[0] > -0.1  # a flat image costs almost nothing, whatever its colour
    assert abs(reward(torch.full((1, 3, 64, 64), 0.1), [""]).item() - s[0]) < 0.02


def test_compressibility_tracks_real_jpeg_size():
    from PIL import Image

    reward = CompressibilityReward(quality=50)
    images, sizes = [], []
    for seed in range(3):
        base = smooth_noise(1, 96, 96, cells=4 + 6 * seed, seed=seed)
        for sigma in (0.0, 0.03, 0.08, 0.2):
            x = (base + sigma * torch.randn(base.shape, generator=torch.Generator().manual_seed(seed))).clamp(0, 1)
            x = (x * 255).round() / 255
            buf = io.BytesIO()
            Image.fromarray((x[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=50)
            images.append(x)
            sizes.append(len(buf.getvalue()))
    scores = reward(torch.cat(images), [""] * len(images)).tolist()
    assert spearman(scores, [-s for s in sizes]) > 0.9


def test_compressibility_gradient_and_options():
    reward = CompressibilityReward()
    x = torch.rand(2, 3, 37, 45, requires_grad=True)  # not a multiple of 8: cropped to 32 x 40
    s = reward(x, ["", ""])
    s.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[..., :32, :40].abs().sum() > 0
    assert x.grad[..., 32:, :].abs().sum() == 0
    after = reward((x + 0.02 * x.grad.sign()).detach(), ["", ""])
    assert (after > s.detach()).all()
    fine = build_reward("compressibility", quality=90, device="cpu")
    assert (fine(x.detach(), ["", ""]) < s.detach()).all()  # finer quantisation -> more bits
    with pytest.raises(ValueError, match="at least 8x8"):
        reward(torch.rand(1, 3, 4, 4), [""])
    with pytest.raises(ValueError, match="quality"):
        CompressibilityReward(quality=0)
