"""DDIM sampling with classifier-free guidance, as plain functions of (model, x, timesteps).

Initial noise is drawn per image from ``seed + i``, so an image depends only on its own seed and prompt,
never on the batch it was generated in: before/after comparisons use exactly the same starting noise.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from .adapters import AdapterSwitch
from .chain import StepHook, run_plan
from .models import DiffusionModel
from .plans import ChainPlan, base_chain
from .schedule import leading_grid, trailing_grid

log = logging.getLogger(__name__)

def initial_noise(seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise, one image per seed, drawn on the CPU so it is identical on every device."""
    out = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(out).to(device=device, dtype=dtype)


def timestep_grid(steps: int, spacing: str, num_train_timesteps: int = 1000) -> list[int]:
    """The sampling grid by name: ``leading`` (SD1.5 default, offset 1) or ``trailing``."""
    if spacing == "leading":
        return leading_grid(steps, num_train_timesteps)
    if spacing == "trailing":
        return trailing_grid(steps, num_train_timesteps)
    raise ValueError(f"unknown timestep spacing {spacing!r}: use 'leading' or 'trailing'")


@torch.no_grad()
def sample(model: DiffusionModel, prompts: Sequence[str], seed: int = 0, steps: int = 50, guidance: float = 7.5,
           negative_prompt: str = "", spacing: str = "leading", height: int | None = None,
           width: int | None = None, batch_size: int = 16, plan: ChainPlan | None = None,
           switch: AdapterSwitch | None = None, callback: StepHook | None = None) -> torch.Tensor:
    """Generate images in [0, 1] (N, 3, H, W); image ``i`` starts from noise seeded ``seed + i``.

    By default the bare base samples with DDIM on the named grid; pass ``plan`` (and the ``switch`` of its
    adapters) to sample any chain, e.g. an aligned model's timestep-aware inference chain.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    if guidance < 1.0:
        raise ValueError(f"guidance must be >= 1 (1 disables classifier-free guidance), got {guidance}")
    shape = model.latent_shape(height, width)
    if plan is None:
        plan = base_chain(timestep_grid(steps, spacing, model.schedule.num_train_timesteps), guidance)
    needs_uncond = plan.needs_uncond
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        x = initial_noise([seed + start + i for i in range(len(chunk))], shape, model.device, model.latent_dtype)
        size = (height, width) if height or width else None
        cond = model.encode_prompts(chunk, size=size)
        uncond = model.encode_prompts([negative_prompt], size=size).repeat(len(chunk)) if needs_uncond else None
        z = run_plan(model, plan, x, cond, uncond, switch, hook=callback)[-1]
        out.append(model.decode(z).cpu())
    return torch.cat(out)
