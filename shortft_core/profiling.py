"""Timing helpers for benchmarks: what each kind of network pass costs alone, and what a plan should cost.

The efficiency ratio of a method is its measured iteration time divided by the sum of the network passes its plan
makes, each timed alone (UNet calls by kind, VAE decode + reward): 1.0 means the sampler adds no overhead.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def timed(fn: Callable[[], object], reps: int = 3, warmup: int = 1) -> float:
    """Median seconds of ``fn`` (CUDA-synchronised when a GPU is in use)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def pass_costs(trainer, batch: int, reps: int = 3) -> dict[str, float]:
    """Seconds of each pass kind at ``batch``: UNet forward / forward+backward with and without CFG, and VAE decode
    + reward forward+backward. Measured with the trainer's model, adapters and reward."""
    from .chain import guided_eps
    from .sampling import initial_noise

    m, sw = trainer.model, trainer.switch
    x = initial_noise(range(batch), m.latent_shape(), m.device, m.dtype)
    prompts = (trainer.prompts.prompts * batch)[:batch]
    cond = m.encode_prompts(prompts)
    uncond = m.encode_prompts([""]).repeat(batch)
    names = trainer.lora.names
    costs: dict[str, float] = {}
    for g in sorted({1.0, float(trainer.cfg.guidance)}):
        u = uncond if g != 1.0 else None

        def fwd():
            with torch.no_grad():
                sw.activate(names[:1])
                guided_eps(m, x, 500, cond, u, g)

        def fwd_bwd():
            sw.activate(names[:1])
            xi = x.detach().clone().requires_grad_(True)
            guided_eps(m, xi, 500, cond, u, g).float().square().mean().backward()

        costs[f"fwd_g{g}"] = timed(fwd, reps)
        costs[f"fwdbwd_g{g}"] = timed(fwd_bwd, reps)

    def decode_reward():
        z = x.detach().clone().requires_grad_(True)
        trainer.reward(m.decode(z), prompts).float().sum().backward()

    costs["decode_reward"] = timed(decode_reward, reps)
    m.unet.zero_grad(set_to_none=True)
    return costs


def ideal_seconds(plan, costs: dict[str, float]) -> float:
    """Sum of the plan's passes timed alone (a checkpointed step pays one extra forward)."""
    total, readouts = 0.0, 0
    for st in plan.steps:
        if st.kind != "ddim":
            continue
        g = float(st.guidance)
        if st.grad:
            total += costs[f"fwdbwd_g{g}"] + (costs[f"fwd_g{g}"] if st.checkpoint else 0.0)
        else:
            total += costs[f"fwd_g{g}"]
        readouts += st.readout is not None
    return total + readouts * costs["decode_reward"]
