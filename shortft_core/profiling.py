"""Benchmark helpers: what each kind of network pass costs alone, what a plan should cost, what backward keeps.

The efficiency ratio of a method is its measured iteration time divided by the sum of the network passes its plan
makes, each timed alone exactly as the plan makes it (the same adapter set, guidance, gradient and checkpointing;
VAE decode + reward): 1.0 means the sampler and trainer add no overhead.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Iterable

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


def kept_for_backward(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> tuple[object, int]:
    """Run ``fn`` and count the bytes of the distinct storages autograd saves for backward, except those of
    ``exclude`` (weights, which exist anyway); returns (fn's result, bytes) — the activation memory it holds."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(kept.values())


def _trainable(plan, lora) -> frozenset[str]:
    """Adapters that are trainable while ``plan`` runs (ShortFT stage i: align_i..align_k; otherwise all)."""
    if plan.method == "shortft" and plan.stage:
        return frozenset(lora.trainable_in_stage(plan.stage))
    return frozenset(lora.names)


def _signatures(plan, lora) -> list[tuple]:
    """Per network call of ``plan``: (adapters, guidance, grad, checkpoint, input carries gradient, trainable
    adapters among them). ``lora`` (the run's LoraSetSpec) says which adapters the plan's stage trains."""
    train = _trainable(plan, lora)
    out, carries = [], False
    for st in plan.steps:
        if st.kind != "ddim":
            continue
        trained = tuple(a for a in st.adapters if a in train) if st.grad and st.net == "tuned" else ()
        out.append((tuple(st.adapters), float(st.guidance), bool(st.grad), bool(st.checkpoint),
                    carries and not st.detach_input, trained))
        carries = carries or st.grad
    return out


def _key(sig: tuple) -> str:
    adapters, g, grad, ck, xin, trained = sig
    return (f"{'+'.join(adapters) or 'base'}|g{g:g}|{'fwdbwd' if grad else 'fwd'}{'|ckpt' if ck else ''}"
            f"{'|xgrad' if xin else ''}{'|train:' + '+'.join(trained) if trained else ''}")


def pass_costs(trainer, batch: int, plans=(), reps: int = 3) -> dict[str, float]:
    """Seconds of every distinct network pass the ``plans`` make, each timed alone at ``batch`` with the trainer's
    model, adapter sets and reward: a UNet call with its own adapters active and guidance, forward only or forward
    + backward into the adapters its stage trains (a checkpointed call pays its recomputation; the input gradient
    only where the chain carries one), plus VAE decode + reward forward and backward (``decode_reward``)."""
    from torch.utils.checkpoint import checkpoint

    from .adapters import adapter_parameters
    from .chain import guided_eps
    from .sampling import initial_noise

    m, sw, lora = trainer.model, trainer.switch, trainer.lora
    x = initial_noise(range(batch), m.latent_shape(), m.device, m.dtype)
    prompts = (trainer.prompts.prompts * batch)[:batch]
    cond = m.encode_prompts(prompts)
    uncond = m.encode_prompts([""]).repeat(batch)
    params = {n: adapter_parameters(m.unet, n) for n in lora.names}
    saved = {n: [p.requires_grad for p in ps] for n, ps in params.items()}
    costs: dict[str, float] = {}
    try:
        for sig in sorted({s for p in plans for s in _signatures(p, lora)}):
            adapters, g, grad, ck, xin, trained = sig
            u = uncond if g != 1.0 else None
            for n, ps in params.items():
                for p in ps:
                    p.requires_grad_(n in trained)

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
    finally:
        for n, ps in params.items():
            for p, flag in zip(ps, saved[n]):
                p.requires_grad_(flag)

    def decode_reward():
        z = x.detach().clone().requires_grad_(True)
        trainer.reward(m.decode(z), prompts).float().sum().backward()

    costs["decode_reward"] = timed(decode_reward, reps)
    m.unet.zero_grad(set_to_none=True)
    return costs


def ideal_seconds(plan, costs: dict[str, float], lora) -> float:
    """Sum of the plan's passes timed alone (``costs`` from :func:`pass_costs` over plans including this one;
    ``lora``: the run's LoraSetSpec, as given to the trainer)."""
    readouts = sum(st.readout is not None for st in plan.steps if st.kind == "ddim")
    return sum(costs[_key(s)] for s in _signatures(plan, lora)) + readouts * costs["decode_reward"]
