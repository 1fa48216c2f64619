"""Dynamic loss scaling for fp16 networks (shortft_core.loop.LossScale): float16's smallest normal number (6e-5) is
above many per-element gradients of a reward at full image sizes, so without it an fp16 network's LoRA gradients
lose their small entries; with it they match fp32's. Overflows lower the scale and skip that update without counting
as non-finite iterations; the scale survives checkpoint and resume."""

from __future__ import annotations

import pytest
import torch

from shortft_core import load_tiny_model, tiny_config
from shortft_core.checkpoint import CheckpointManager
from shortft_core.loop import MAX_SKIPPED, Loop, LossScale
from shortft_core.testing.parity import tiny_iteration_grads
from shortft_core.tiny_world import load_tiny_rewards


class Toy(Loop):
    """One fp32 parameter used in float16 arithmetic: loss = k * sum(x * w) computed in fp16, so the fp16
    gradient reaching w is k * scale per element."""

    def __init__(self, k: float, loss_scaling: bool, folder=None, growth_interval: int = LossScale.GROWTH_INTERVAL):
        self.w = torch.nn.Parameter(torch.ones(8))
        self.k = k
        super().__init__([self.w], lr=0.01, weight_decay=0.0, warmup=0, total=20, schedule="constant", grad_clip=0.0,
                         seed=0, config=tiny_config(), checkpoints=CheckpointManager(folder) if folder else None,
                         loss_scaling=loss_scaling)
        self.loss_scale.growth_interval = growth_interval

    def train_step(self) -> dict:
        self.opt.zero_grad(set_to_none=True)
        loss = (torch.ones(8, dtype=torch.float16) * self.w.half()).sum().float() * self.k
        self.loss_scale.scale(loss).backward()
        self.apply_gradients(bool(torch.isfinite(loss)))
        return {"loss": float(loss.detach())}


def test_a_gradient_below_float16s_range_survives_only_with_loss_scaling():
    """A gradient of 1e-9 per element flushes to zero in fp16: unscaled, the update does not move the weight;
    scaled, the gradient arrives (unscaled, to fp16's precision) and AdamW's first step moves the weight."""
    for scaling in (True, False):
        toy = Toy(k=1e-9, loss_scaling=scaling)
        toy.train_step()
        if scaling:
            assert toy.w.grad is not None and torch.allclose(toy.w.grad, torch.full((8,), 1e-9), rtol=1e-3)
            assert float(toy.w.detach().max()) < 1 - 1e-4
        else:
            assert float(toy.w.grad.abs().max()) == 0.0
            assert torch.equal(toy.w.detach(), torch.ones(8))
        assert toy.updated and toy.skipped == 0


def test_an_overflow_halves_the_scale_and_skips_only_that_update():
    """A gradient of 4 overflows fp16 at scales 2^16, 2^15 and 2^14: those three updates are skipped (weights
    untouched, not counted as non-finite iterations), the next two at 2^13 apply; two clean updates in a row grow
    the scale to 2^14, where the sixth overflows again."""
    toy = Toy(k=4.0, loss_scaling=True, growth_interval=2)
    scales, moved = [], []
    for _ in range(6):
        before = toy.w.detach().clone()
        toy.train_step()
        scales.append(toy.loss_scale.value)
        moved.append(not torch.equal(before, toy.w.detach()))
    assert scales == [2.0**15, 2.0**14, 2.0**13, 2.0**13, 2.0**14, 2.0**13]
    assert moved == [False, False, False, True, True, False]
    assert toy.skipped == 0 and toy.iteration == 6
    toy.train_step()
    assert toy.updated and torch.allclose(toy.w.grad, torch.full((8,), 4.0))  # unscaled


def test_non_finite_losses_and_gradients_at_scale_one_still_count():
    """A NaN loss is no overflow: it counts (and ends the run after MAX_SKIPPED); without loss scaling an inf
    gradient counts too, and the scale stays 1."""
    toy = Toy(k=float("nan"), loss_scaling=True)
    toy.train_step()
    assert toy.skipped == 1 and toy.loss_scale.value == 2.0**16 and not toy.updated
    plain = Toy(k=1e5, loss_scaling=False)  # 1e5 > fp16's largest 65504
    plain.train_step()
    assert plain.skipped == 1 and plain.loss_scale.value == 1.0
    for _ in range(MAX_SKIPPED - 1):
        plain.train_step()
    with pytest.raises(FloatingPointError, match="non-finite"):
        plain.train_step()


def test_the_scale_is_checkpointed_and_resumed(tmp_path):
    toy = Toy(k=4.0, loss_scaling=True, folder=tmp_path, growth_interval=50)
    for _ in range(5):
        toy.train_step()
    toy.save_checkpoint()
    assert (toy.loss_scale.value, toy.loss_scale.clean) == (2.0**13, 2)
    again = Toy(k=4.0, loss_scaling=True, folder=tmp_path, growth_interval=50)
    assert again.resume()
    assert (again.loss_scale.value, again.loss_scale.clean, again.iteration) == (2.0**13, 2, 5)


def test_fp16_tiny_world_lora_gradients_match_fp32_with_a_down_weighted_reward():
    """The trainer on the tiny world's UNet in fp16 (CPU fp16 arithmetic, as a GPU's), its reward weighted 2^-10 so
    the per-element gradients are as small as a full-size image's: one iteration's LoRA gradients equal fp32's to
    about 1 % with loss scaling, and lose a large share of their entries without it."""
    alignment = load_tiny_rewards()[0]
    small = 2.0**-10
    ref, ref_scaled = tiny_iteration_grads(load_tiny_model(), alignment, small)
    half, half_scaled = tiny_iteration_grads(load_tiny_model(dtype=torch.float16), alignment, small)
    unscaled, _ = tiny_iteration_grads(load_tiny_model(dtype=torch.float16), alignment, small, scaling=False)
    assert not ref_scaled and half_scaled  # on by the network's dtype alone
    err = float((half - ref).norm() / ref.norm())
    err_unscaled = float((unscaled - ref).norm() / ref.norm())
    lost = float(((unscaled == 0) & (ref != 0)).float().mean())
    print(f"fp16 LoRA gradients vs fp32: {err:.4f} scaled, {err_unscaled:.4f} unscaled ({lost:.1%} entries zeroed)")
    assert err < 0.03, err
    assert err_unscaled > 0.2 and lost > 0.1, (err_unscaled, lost)
