"""Noise schedule, timestep grids and the DDIM update, written as pure functions.

Everything here is differentiable and stateless: no scheduler object with a step counter ever sits inside a
training graph. A schedule is the seam between the chain and a model's noise levels: it says what each timestep of a
plan means (alpha_t, sigma_t with x_t = alpha_t x0 + sigma_t eps), turns the network's output into eps whatever the
model predicts (``prediction_type``: epsilon, or v = alpha_t eps - sigma_t x0), and takes the deterministic step
between two levels. The maths (Song et al., DDIM, eta = 0), for the variance-preserving discrete schedules of the
SD family (alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)):

    x0_hat = (x_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t)
    x_s    = sqrt(abar_s) * x0_hat + sqrt(1 - abar_s) * eps

A target timestep ``s < 0`` means "the end of the chain" and uses ``final_alpha_cumprod`` (diffusers:
``set_alpha_to_one``; SD1.5 ships ``False``, i.e. ``abar[0]``).

Flow-matching models (rectified flow: x = (1 - f) x0 + f eps at flow level f, the network predicting the velocity
eps - x0) step on the same chain: a level f has the signal-to-noise ratio of abar = (1 - f)^2 / ((1 - f)^2 + f^2),
and the chain's latent is the flow latent divided by sqrt((1 - f)^2 + f^2), so a DDIM step here is an Euler step of
the flow. Their top level f = 1 is pure noise (abar 0), where eps says nothing of x0: a model gives x0 itself there
(``DiffusionModel.predict``) and the step takes it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .segments import FINAL  # noqa: F401 - the sentinel target timestep of the clean end, re-exported


PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")  # what a network may predict (diffusers' names; flow: velocity)


@dataclass(frozen=True)
class NoiseSchedule:
    """Cumulative alphas of a discrete diffusion schedule (float64 on CPU; cast at use) and what the network
    predicts on it."""

    alphas_cumprod: torch.Tensor
    final_alpha_cumprod: float
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}: use one of "
                             f"{', '.join(PREDICTION_TYPES)}")

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "NoiseSchedule":
        """Build from a diffusers scheduler config (DDIM/PNDM/Euler... all share these keys)."""
        n = int(config.get("num_train_timesteps", 1000))
        kind = config.get("beta_schedule", "linear")
        b0, b1 = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
        if config.get("trained_betas") is not None:
            betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
        elif kind == "scaled_linear":
            betas = torch.linspace(b0**0.5, b1**0.5, n, dtype=torch.float64) ** 2
        elif kind == "linear":
            betas = torch.linspace(b0, b1, n, dtype=torch.float64)
        else:
            raise ValueError(f"unsupported beta_schedule {kind!r}: use 'scaled_linear' (SD1.5/SDXL) or 'linear'")
        if config.get("rescale_betas_zero_snr", False):
            raise ValueError("zero-terminal-SNR schedules (rescale_betas_zero_snr) are not supported")
        # diffusers builds betas in float32 (cumprod too); we keep float64 for the product: equal within 1e-6
        betas = betas.to(torch.float32).to(torch.float64)
        abar = torch.cumprod(1.0 - betas, dim=0)
        final = 1.0 if config.get("set_alpha_to_one", False) else float(abar[0])
        return cls(abar, final, str(config.get("prediction_type", "epsilon")))

    @classmethod
    def from_flow_levels(cls, levels: torch.Tensor) -> "NoiseSchedule":
        """A flow model's schedule from its table of flow levels f (noisiest last): each level's abar of the same
        signal-to-noise ratio (see the module docstring), ending at the clean sample."""
        f = torch.as_tensor(levels, dtype=torch.float64).cpu()
        return cls((1.0 - f) ** 2 / ((1.0 - f) ** 2 + f**2), 1.0, "flow")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "NoiseSchedule":
        with open(path, encoding="utf-8") as f:
            return cls.from_config(json.load(f))

    def abar(self, t: int | torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        """abar at integer timestep(s) ``t``; ``t < 0`` gives the final value. Returned in ``like``'s dtype."""
        t = torch.as_tensor(t)
        table = torch.cat([self.alphas_cumprod, torch.tensor([self.final_alpha_cumprod], dtype=torch.float64)])
        idx = torch.where(t < 0, torch.full_like(t, table.shape[0] - 1), t).long().cpu()
        out = table[idx]
        if like is not None:
            out = out.to(device=like.device, dtype=like.dtype)
        return out

    def levels(self, t: int | torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) at timestep(s) ``t`` in ``like``'s dtype, shaped to broadcast against it."""
        abar = _bcast(self.abar(t, like), like)
        return abar.sqrt(), (1.0 - abar).sqrt()

    def eps_from(self, output: torch.Tensor, x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """The noise prediction a network's ``output`` at ``x``, timestep(s) ``t`` stands for (eps models: itself;
        v models: sigma_t x + alpha_t v; flow models, whose network saw the flow latent x / (alpha_t + sigma_t):
        (x + alpha_t v) / (alpha_t + sigma_t))."""
        if self.prediction_type == "epsilon":
            return output
        alpha, sigma = self.levels(t, x)
        if self.prediction_type == "flow":
            return (x + alpha * output) / (alpha + sigma)
        return sigma * x + alpha * output

    def x0(self, x: torch.Tensor, eps: torch.Tensor, t: int | torch.Tensor,
           x0: torch.Tensor | None = None) -> torch.Tensor:
        """The clean sample predicted at ``x``, timestep(s) ``t`` by ``eps`` (``x0``: the model's own, where it gave
        one)."""
        return x0 if x0 is not None else ddim_x0(x, eps, self.abar(t, x))

    def step(self, x: torch.Tensor, eps: torch.Tensor, t: int | torch.Tensor, s: int | torch.Tensor,
             x0: torch.Tensor | None = None) -> torch.Tensor:
        """One deterministic DDIM jump with ``eps`` from timestep(s) ``t`` to ``s`` (any distance; s < 0: the end);
        ``x0``: the model's clean sample where it gave one (a level of pure noise, from which eps recovers none)."""
        if x0 is None:
            return ddim_step(x, eps, self.abar(t, x), self.abar(s, x))
        abar_s = _bcast(self.abar(s, x), x)
        return abar_s.sqrt() * x0 + (1.0 - abar_s).sqrt() * eps

    def renoise(self, x: torch.Tensor, t: int, s: int, noise: torch.Tensor) -> torch.Tensor:
        """Forward-diffuse ``x`` from timestep ``t`` (t < 0: the clean end) to the noisier ``s``
        (q(x_s | x_t))."""
        ratio = self.abar(s, x) / self.abar(t, x)
        return ratio.sqrt() * x + (1 - ratio).sqrt() * noise


SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "thresholding": False,
    "rescale_betas_zero_snr": False,
}


def leading_grid(num_steps: int, num_train_timesteps: int = 1000, steps_offset: int = 1) -> list[int]:
    """diffusers' "leading" spacing: 50 steps on SD1.5 gives 981, 961, ..., 21, 1."""
    _check_steps(num_steps, num_train_timesteps)
    ratio = num_train_timesteps // num_steps
    return [i * ratio + steps_offset for i in range(num_steps - 1, -1, -1)]


def trailing_grid(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """diffusers' "trailing" spacing: 4 steps gives 999, 749, 499, 249 (Hyper-SD / TCD / PCM)."""
    _check_steps(num_steps, num_train_timesteps)
    ratio = num_train_timesteps / num_steps
    return [int(round(num_train_timesteps - i * ratio)) - 1 for i in range(num_steps)]


def _check_steps(num_steps: int, num_train_timesteps: int) -> None:
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in 1..{num_train_timesteps}, got {num_steps}")


def ddim_x0(x_t: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """Predicted clean sample from an eps prediction."""
    abar_t = _bcast(abar_t, x_t)
    return (x_t - (1.0 - abar_t).sqrt() * eps) / abar_t.sqrt()


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor, abar_s: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM jump from noise level ``abar_t`` to ``abar_s`` (any distance)."""
    x0 = ddim_x0(x_t, eps, abar_t)
    abar_s = _bcast(abar_s, x_t)
    return abar_s.sqrt() * x0 + (1.0 - abar_s).sqrt() * eps


def add_noise(x0: torch.Tensor, noise: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """Forward diffusion q(x_t | x_0)."""
    abar_t = _bcast(abar_t, x0)
    return abar_t.sqrt() * x0 + (1.0 - abar_t).sqrt() * noise


def _bcast(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    a = torch.as_tensor(a, device=like.device, dtype=like.dtype)
    return a.reshape(a.shape + (1,) * (like.ndim - a.ndim)) if a.ndim else a
