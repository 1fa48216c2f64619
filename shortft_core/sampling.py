"""DDIM sampling with classifier-free guidance, as plain functions of (model, x, timesteps).

Initial noise is drawn per image from ``seed + i``, so an image depends only on its own seed and prompt,
never on the batch it was generated in: before/after comparisons use exactly the same starting noise.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

from .models import Conditioning, T2IModel
from .schedule import FINAL, ddim_step, ddim_x0, leading_grid, trailing_grid

log = logging.getLogger(__name__)

StepCallback = Callable[[dict], None]


def initial_noise(seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise, one image per seed, drawn on the CPU so it is identical on every device."""
    out = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(out).to(device=device, dtype=dtype)


def guided_eps(model: T2IModel, x: torch.Tensor, t: int | torch.Tensor, cond: Conditioning,
               uncond: Conditioning | None, guidance: float, unet: torch.nn.Module | None = None) -> torch.Tensor:
    """eps with classifier-free guidance, evaluating the conditional and unconditional halves in one batch."""
    if uncond is None or guidance == 1.0:
        return model.eps(x, t, cond, unet=unet)
    both = model.eps(torch.cat([x, x]), t, uncond.cat(cond), unet=unet)
    e_u, e_c = both.chunk(2)
    return e_u + guidance * (e_c - e_u)


def timestep_grid(steps: int, spacing: str, num_train_timesteps: int = 1000) -> list[int]:
    """The sampling grid by name: ``leading`` (SD1.5 default, offset 1) or ``trailing``."""
    if spacing == "leading":
        return leading_grid(steps, num_train_timesteps)
    if spacing == "trailing":
        return trailing_grid(steps, num_train_timesteps)
    raise ValueError(f"unknown timestep spacing {spacing!r}: use 'leading' or 'trailing'")


def ddim_sample(model: T2IModel, x: torch.Tensor, timesteps: Sequence[int], cond: Conditioning,
                uncond: Conditioning | None = None, guidance: float = 1.0,
                callback: StepCallback | None = None) -> torch.Tensor:
    """Run deterministic DDIM over ``timesteps`` (descending) from ``x``; returns the clean latent."""
    ts = list(timesteps)
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else FINAL
        eps = guided_eps(model, x, t, cond, uncond, guidance)
        abar_t, abar_s = model.schedule.abar(t, x), model.schedule.abar(s, x)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": ddim_x0(x, eps, abar_t)})
        x = ddim_step(x, eps, abar_t, abar_s)
    return x


@torch.no_grad()
def sample(model: T2IModel, prompts: Sequence[str], seed: int = 0, steps: int = 50, guidance: float = 7.5,
           negative_prompt: str = "", spacing: str = "leading", height: int | None = None,
           width: int | None = None, batch_size: int = 16,
           callback: StepCallback | None = None) -> torch.Tensor:
    """Generate images in [0, 1] (N, 3, H, W) for ``prompts``; image ``i`` starts from noise seeded ``seed + i``."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    if guidance < 1.0:
        raise ValueError(f"guidance must be >= 1 (1 disables classifier-free guidance), got {guidance}")
    shape = model.latent_shape(height, width)
    grid = timestep_grid(steps, spacing, model.schedule.num_train_timesteps)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        x = initial_noise([seed + start + i for i in range(len(chunk))], shape, model.device, model.dtype)
        cond = model.encode_prompts(chunk)
        uncond = model.encode_prompts([negative_prompt]).repeat(len(chunk)) if guidance != 1.0 else None
        z = ddim_sample(model, x, grid, cond, uncond, guidance, callback)
        out.append(model.decode(z).cpu())
    return torch.cat(out)
