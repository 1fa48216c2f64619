"""The tiny world's rewards: differentiable w.r.t. pixels, and they prefer what they should."""

import torch

from shortft_core.tiny_world import quality_property as qp
from shortft_core.tiny_world import scenes as S


def _held_out(n=64, seed=4242):
    imgs, sc = S.scene_batch(seed, range(n), "held_out")
    return S.to_float(imgs), [s.caption for s in sc]


def test_gradients_reach_pixels(tiny_rewards):
    x, caps = _held_out(4)
    for reward in tiny_rewards:
        img = x.clone().requires_grad_(True)
        r = reward(img, caps)
        assert r.shape == (4,) and torch.isfinite(r).all()
        r.sum().backward()
        assert torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0
        assert not any(p.requires_grad for p in reward.parameters())


def test_alignment_ranks_true_captions_above_mismatched_on_held_out_images(tiny_rewards):
    alignment, _ = tiny_rewards
    x, caps = _held_out(64)
    with torch.no_grad():
        true = alignment(x, caps)
        wrong = alignment(x, caps[1:] + caps[:1])
        one_off = alignment(x, [S.variants(S.parse_caption(c), "colour")[0].caption for c in caps])
    assert (true > wrong).float().mean() >= 0.95
    assert (true > one_off).float().mean() >= 0.85


def test_aesthetic_prefers_clean_renders(tiny_rewards):
    _, aesthetic = tiny_rewards
    x, caps = _held_out(32)
    g = torch.Generator().manual_seed(0)
    heavy = qp.degrade(x, torch.full((32, 3), 0.9), g)
    with torch.no_grad():
        clean, dirty = aesthetic(x, caps), aesthetic(heavy, caps)
    assert clean.mean() > dirty.mean() + 2.0
    assert (clean > dirty).float().mean() >= 0.9


def test_reward_input_checks(tiny_rewards):
    import pytest

    alignment, _ = tiny_rewards
    with pytest.raises(ValueError, match="one prompt per image"):
        alignment(torch.rand(2, 3, 32, 32), ["a"])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        alignment(torch.rand(3, 32, 32), ["a"])
    with pytest.raises(ValueError, match="floating point"):
        alignment(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), ["a"])
