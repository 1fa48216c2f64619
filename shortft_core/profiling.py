"""Timing helpers for benchmarks: what each kind of network pass costs alone, and what a plan should cost.

The efficiency ratio of a method is its measured iteration time divided by the sum of the network passes its plan
makes, each timed alone exactly as the plan makes it (the same adapter set, guidance, gradient and checkpointing;
VAE decode + reward): 1.0 means the sampler and trainer add no overhead.
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


def _signatures(plan) -> list[tuple]:
    """Per network call of ``plan``: (adapters, guidance, grad, checkpoint, input carries gradient)."""
    out, carries = [], False
    for st in plan.steps:
        if st.kind != "ddim":
            continue
        out.append((tuple(st.adapters), float(st.guidance), bool(st.grad), bool(st.checkpoint),
                    carries and not st.detach_input))
        carries = carries or st.grad
    return out


def _key(sig: tuple) -> str:
    adapters, g, grad, ck, xin = sig
    return f"{'+'.join(adapters) or 'base'}|g{g:g}|{'fwdbwd' if grad else 'fwd'}{'|ckpt' if ck else ''}{'|xgrad' if xin else ''}"


def pass_costs(trainer, batch: int, plans=(), reps: int = 3) -> dict[str, float]:
    """Seconds of every distinct network pass the ``plans`` make, each timed alone at ``batch`` with the trainer's
    model, adapter sets and reward: a UNet call with its own adapters active and guidance, forward only or forward
    + backward (a checkpointed call pays its recomputation; the input gradient only where the chain carries one),
    plus VAE decode + reward forward and backward (``decode_reward``)."""
    from torch.utils.checkpoint import checkpoint

    from .chain import guided_eps
    from .sampling import initial_noise

    m, sw = trainer.model, trainer.switch
    x = initial_noise(range(batch), m.latent_shape(), m.device, m.dtype)
    prompts = (trainer.prompts.prompts * batch)[:batch]
    cond = m.encode_prompts(prompts)
    uncond = m.encode_prompts([""]).repeat(batch)
    costs: dict[str, float] = {}
    for sig in sorted({s for p in plans for s in _signatures(p)}):
        adapters, g, grad, ck, xin = sig
        u = uncond if g != 1.0 else None

        def call(inp, adapters=adapters, g=g, u=u):
            sw.activate(adapters)
            return guided_eps(m, inp, 500, cond, u, g)

        if not grad:
            def run(call=call):
                with torch.no_grad():
                    call(x)
        else:
            def run(call=call, ck=ck, xin=xin):
                inp = x.detach().clone().requires_grad_(xin)
                eps = checkpoint(call, inp, use_reentrant=False) if ck else call(inp)
                if eps.requires_grad:
                    eps.float().square().mean().backward()
        costs[_key(sig)] = timed(run, reps)

    def decode_reward():
        z = x.detach().clone().requires_grad_(True)
        trainer.reward(m.decode(z), prompts).float().sum().backward()

    costs["decode_reward"] = timed(decode_reward, reps)
    m.unet.zero_grad(set_to_none=True)
    return costs


def ideal_seconds(plan, costs: dict[str, float]) -> float:
    """Sum of the plan's passes timed alone (``costs`` from :func:`pass_costs` over plans including this one)."""
    readouts = sum(st.readout is not None for st in plan.steps if st.kind == "ddim")
    return sum(costs[_key(s)] for s in _signatures(plan)) + readouts * costs["decode_reward"]
