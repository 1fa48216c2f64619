"""What the parity checks between two backends compare: the alignment set's LoRA tensors by diffusers name."""

from __future__ import annotations

from typing import Any

import torch


def set_lora_tensors(model: Any, what: str = "weight") -> dict[str, torch.Tensor]:
    """Copies of the alignment set's LoRA weights (``what="weight"``) or their gradients (``"grad"``), keyed
    ``<diffusers module>.lora_<A|B>.<adapter>.weight`` so both backends' layers line up; the frozen shortcut is left
    out."""
    out = {}
    for name, p in model.unet.named_parameters():
        if ".lora_" not in name or ".shortcut." in name:
            continue
        module, _, rest = name.partition(".lora_")
        module = (model.lora_names or {}).get(module, module)
        out[module + ".lora_" + rest] = (p.grad if what == "grad" else p).detach().clone()
    return out


TWO_PROMPTS = ("a red circle left of a blue square on a white background", "a big blue square on a white background")


def tiny_iteration_grads(model: Any, reward: Any, weight: float = 1.0, scaling: bool | None = None,
                         prompts: tuple[str, ...] = TWO_PROMPTS) -> tuple[torch.Tensor, bool]:
    """One ShortFT iteration of the tiny preset (batch 2, rank 4, no clipping) on ``model`` (either backend) through
    the tiny shortcut, the reward times ``weight``: the alignment set's LoRA gradients, flattened in name order and
    divided by ``weight``, and whether the trainer scaled the loss (``scaling`` False turns that off). The model is
    left as it was."""
    import dataclasses

    from ..config import tiny_config
    from ..lifecycle import ModelState
    from ..loop import LossScale
    from ..prompts import PromptSource
    from ..rewards.combine import WeightedReward
    from ..shortcut import attach_shortcut
    from ..tiny_world import tiny_shortcut_path
    from ..trainer import Trainer

    cfg = tiny_config(iterations=1, batch_size=2, eval_count=0, rank=4, grad_clip=0.0)
    state = ModelState.capture(model)
    try:
        preset = attach_shortcut(model, tiny_shortcut_path())
        cfg = dataclasses.replace(cfg, shortcut_guidance=cfg.method_entry.jump_guidance(cfg, preset.guidance))
        trainer = Trainer(model, WeightedReward([("reward", weight, reward)]), cfg, PromptSource(list(prompts)),
                          shortcut_preset=preset)
        scaled = trainer.loss_scale.enabled
        if scaling is False:
            trainer.loss_scale = LossScale(False)
            scaled = False
        trainer.train_step()
        grads = set_lora_tensors(model, "grad")
        return torch.cat([grads[k].float().flatten().cpu() for k in sorted(grads)]) / weight, scaled
    finally:
        state.restore()
