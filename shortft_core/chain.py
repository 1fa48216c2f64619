"""The one differentiable sampler: executes any :class:`~shortft_core.plans.ChainPlan` from x_T.

A pure function of (model, plan, x_T, conditioning): the model's noise predictions (with its clean sample where eps
cannot give one) are stepped between the levels its schedule gives each timestep
(:class:`~shortft_core.schedule.NoiseSchedule`), adapters are switched per step, classifier-free guidance batches
the conditional and unconditional halves, steps without gradient run under
``no_grad``, checkpointed steps are recomputed in backward (block by block where the model has enabled block
checkpointing, else as a whole call; either way the recomputation re-selects the adapters the forward used, so it
runs the same network), and DRTune-style steps see a detached input.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from .adapters import AdapterSwitch
from .models import Conditioning, DiffusionModel
from .plans import ChainPlan, Step

StepHook = Callable[[int, Step, torch.Tensor], None]
EpsHook = Callable[[Step, torch.Tensor, torch.Tensor], None]


def guided_prediction(model: DiffusionModel, x: torch.Tensor, t: int | torch.Tensor, cond: Conditioning,
                      uncond: Conditioning | None, guidance: float | torch.Tensor,
                      unet: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """eps, and x0 where the model gives one (:meth:`DiffusionModel.predict`), with classifier-free guidance,
    evaluating the conditional and unconditional halves in one batch (guidance is linear: x0 is guided as eps is).

    ``t`` is one timestep or one per sample; ``guidance`` one scale or one per sample (distillation draws them)."""
    if uncond is None or (not torch.is_tensor(guidance) and guidance == 1.0):
        return model.predict(x, t, cond, unet=unet)
    tt = torch.cat([t, t]) if torch.is_tensor(t) and t.ndim > 0 else t
    eps, x0 = model.predict(torch.cat([x, x]), tt, uncond.cat(cond), unet=unet)
    g = torch.as_tensor(guidance, device=x.device, dtype=x.dtype)
    if g.ndim > 0:
        g = g.reshape(-1, *([1] * (x.ndim - 1)))
    return _guided(eps, g), (None if x0 is None else _guided(x0, g))


def _guided(both: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The guided prediction from an (unconditional, conditional) batch."""
    e_u, e_c = both.chunk(2)
    return e_u + g * (e_c - e_u)


def guided_eps(model: DiffusionModel, x: torch.Tensor, t: int | torch.Tensor, cond: Conditioning,
               uncond: Conditioning | None, guidance: float | torch.Tensor,
               unet: torch.nn.Module | None = None) -> torch.Tensor:
    """eps with classifier-free guidance (see :func:`guided_prediction`)."""
    return guided_prediction(model, x, t, cond, uncond, guidance, unet=unet)[0]


def run_plan(model: DiffusionModel, plan: ChainPlan, x: torch.Tensor, cond: Conditioning, uncond: Conditioning | None,
             switch: AdapterSwitch | None, unet: torch.nn.Module | None = None,
             generator: torch.Generator | None = None, hook: StepHook | None = None,
             on_eps: EpsHook | None = None) -> list[torch.Tensor]:
    """Run ``plan`` from ``x`` and return its readouts (latents), in order.

    ``unet`` overrides the module called (e.g. the DDP-wrapped UNet); ``generator`` drives re-noising steps;
    ``hook(i, step, x_after)`` sees every step's result (progress, previews, tests); ``on_eps(step, x_in, eps)``
    sees every network output (e.g. a regulariser toward the base).
    """
    sched = model.schedule
    readouts: list[torch.Tensor] = []
    for i, step in enumerate(plan.steps):
        if step.kind == "renoise":
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            x = sched.renoise(x, step.t, step.s, noise)
        else:
            eps, x0 = _network(model, step, x, cond, uncond, switch, unet)
            if on_eps is not None:
                on_eps(step, x, eps)
            if step.readout == "x0":
                readouts.append(sched.x0(x, eps, step.t, x0=x0))
            x = sched.step(x, eps, step.t, step.s, x0=x0)
            if step.readout == "x":
                readouts.append(x)
        if hook is not None:
            hook(i, step, x)
    return readouts


def _network(model: DiffusionModel, step: Step, x: torch.Tensor, cond: Conditioning, uncond: Conditioning | None,
             switch: AdapterSwitch | None, unet: torch.nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    use_uncond = uncond if step.guidance != 1.0 else None
    if step.guidance != 1.0 and uncond is None:
        raise ValueError(f"step {step.t}->{step.s} uses guidance {step.guidance} but no unconditional embedding was given")

    def call(inp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if switch is not None:
            switch.activate(step.adapters)
        elif step.adapters:
            raise ValueError(f"step {step.t}->{step.s} needs adapters {step.adapters} but no AdapterSwitch was given")
        return guided_prediction(model, inp, step.t, cond, use_uncond, step.guidance, unet=unet)

    inp = x.detach() if step.detach_input else x
    if not step.grad:
        with torch.no_grad():
            return call(inp)
    if step.checkpoint:
        def recomputed(inp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            # where the model has enabled block checkpointing, the call's recomputation keeps only its blocks'
            # inputs, and each block is recomputed in turn as backward reaches it
            with model.block_checkpointing():
                return call(inp)

        return _checkpoint(recomputed, inp, use_reentrant=False)
    return call(inp)
