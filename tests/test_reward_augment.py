"""Reward view jitter: shifts by the drawn offsets, keeps gradients, repeats for a seed, refuses bad settings."""

import pytest
import torch

from shortft_core.rewards.augment import jitter, jittered_score
from shortft_core.trainer import TrainConfig


def _ramp(b: int = 3, size: int = 32) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32).view(1, 1, 1, size).expand(b, 3, size, size)
    y = torch.arange(size, dtype=torch.float32).view(1, 1, size, 1).expand(b, 3, size, size)
    return torch.cat([x[:, :1], y[:, :1], x[:, :1] * 0], 1).contiguous()  # channel 0 = column, 1 = row


def test_jitter_translates_by_the_drawn_offsets():
    size, shift = 32, 0.1
    img = _ramp(4, size)
    out = jitter(img, shift, torch.Generator().manual_seed(3))
    offsets = (torch.rand(4, 2, generator=torch.Generator().manual_seed(3)) * 2 - 1) * shift * 2
    px = offsets * size / 2  # grid units -> pixels
    c = size // 2
    for i in range(4):
        # sampling at x + dx: the ramp's value at the centre moves by dx pixels (no border there)
        assert out[i, 0, c, c].item() == pytest.approx(c + px[i, 0].item(), abs=1e-4)
        assert out[i, 1, c, c].item() == pytest.approx(c + px[i, 1].item(), abs=1e-4)
    assert px.abs().max() <= shift * size + 1e-6 and px.abs().max() > 0.5


def test_jitter_zero_shift_is_identity_and_seeded_jitter_repeats():
    img = torch.rand(2, 3, 16, 16)
    assert torch.allclose(jitter(img, 0.0, torch.Generator().manual_seed(0)), img, atol=1e-6)
    a = jitter(img, 0.1, torch.Generator().manual_seed(7))
    b = jitter(img, 0.1, torch.Generator().manual_seed(7))
    c = jitter(img, 0.1, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_jittered_score_averages_views_and_passes_gradients():
    img = torch.rand(2, 3, 16, 16, requires_grad=True)
    weights = torch.linspace(0, 1, 16).view(1, 1, 1, 16)
    calls = []

    def reward(images, prompts):  # prefers brightness on the right: shift-sensitive
        calls.append(images.shape[0])
        return (images * weights).mean(dim=(1, 2, 3))

    plain = jittered_score(reward, img, ["a", "b"], 1, 0.0)
    assert calls == [2]
    score = jittered_score(reward, img, ["a", "b"], 4, 0.1, torch.Generator().manual_seed(0))
    assert len(calls) == 5 and score.shape == (2,)
    assert not torch.allclose(score, plain)
    score.sum().backward()
    assert img.grad is not None and torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0


def test_bad_jitter_settings_are_refused():
    with pytest.raises(ValueError, match="shift"):
        jitter(torch.rand(1, 3, 8, 8), 0.5)
    with pytest.raises(ValueError, match="views"):
        jittered_score(lambda i, p: i.mean((1, 2, 3)), torch.rand(1, 3, 8, 8), ["a"], 0, 0.1)
    with pytest.raises(ValueError, match="reward_jitter"):
        TrainConfig(reward_jitter=0.7).validate()
    with pytest.raises(ValueError, match="reward_views"):
        TrainConfig(reward_views=0).validate()
