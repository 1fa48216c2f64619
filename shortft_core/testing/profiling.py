"""Benchmark helpers: what each kind of network pass costs alone, what a plan should cost, what backward keeps,
and the peak of the tensor memory a piece of work allocates (on any device, so on CPU before a GPU is rented).

The efficiency ratio of a method is its measured iteration time divided by the sum of the network passes its plan
makes, each timed alone exactly as the plan makes it (the same adapter set, guidance, gradient and checkpointing;
VAE decode + reward): 1.0 means the sampler and trainer add no overhead.
"""

from __future__ import annotations

import statistics
import time
import weakref
from typing import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


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


class LivePeak(TorchDispatchMode):
    """While active, the bytes of the tensor storages allocated by torch ops and still alive (``live``) and their
    maximum (``peak``): on a GPU, what ``torch.cuda.max_memory_allocated`` adds to what existed before (weights),
    without the allocator's rounding and library workspaces. Works on any device, so a CUDA configuration's peak can
    be measured on CPU. Outputs that share a storage with an input (views, in-place ops) are not new memory.
    ``trace=True`` also records ``live`` after every op (``trace``) and the op's name (``ops``): two runs of the same
    code at different sizes then give every moment's memory as a function of size, not only the maximum."""

    def __init__(self, trace: bool = False) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self.trace: list[int] | None = [] if trace else None
        self.ops: list[str] | None = [] if trace else None

    def reset_peak(self) -> None:
        """Start a new peak from what is alive now."""
        self.peak = self.live

    def _freed(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key = _storage_key(t)
            if key is None or key in inputs or key in self._sizes:
                continue
            storage = t.untyped_storage()
            self._sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            # the storage's Python object lives exactly as long as the storage (torch preserves it), so this fires
            # when the memory is released
            weakref.finalize(storage, self._freed, key)
        if self.trace is not None:
            self.trace.append(self.live)
            self.ops.append(str(func))
        return out


def align_traces(a: list[str], b: list[str], look: int = 16) -> list[tuple[int, int]] | None:
    """Index pairs of the ops two runs of the same code share, in order (op names from ``LivePeak.ops``). An op
    only one run makes (a resize one image size needs and the other not) is skipped when the sequences meet again
    within ``look`` ops; None when they do not."""
    pairs, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if a[i] == b[j]:
            pairs.append((i, j))
            i, j = i + 1, j + 1
            continue
        step = next(((di, dj) for d in range(1, look + 1) for di, dj in ((0, d), (d, 0))
                     if i + di < len(a) and j + dj < len(b) and a[i + di] == b[j + dj]), None)
        if step is None:
            return None
        i, j = i + step[0], j + step[1]
    return pairs


def carry_trace(trace_a: list[float], ops_a: list[str], x_a: float, trace_b: list[float], ops_b: list[str],
                x_b: float, x: float) -> tuple[list[float], list[str], list[int]] | None:
    """Every moment two traced runs share, carried to ``x`` on the line through its values at ``x_a`` and ``x_b``
    (any measure memory is affine in: pixel count, LoRA rank): the carried trace, its ops and each moment's index
    in run a; None when the runs' ops cannot be aligned. A carried trace can be carried again along another
    measure (pixels, then rank)."""
    pairs = align_traces(ops_a, ops_b)
    if not pairs:
        return None
    f = (x - x_a) / (x_b - x_a)
    return ([trace_a[i] + (trace_b[j] - trace_a[i]) * f for i, j in pairs], [ops_a[i] for i, _ in pairs],
            [i for i, _ in pairs])


def extrapolate_peak(trace_a: list[int], ops_a: list[str], x_a: float, trace_b: list[int], ops_b: list[str],
                     x_b: float, x: float, base_a: int = 0, base_b: int = 0) -> tuple[float, int | None]:
    """Peak memory at size ``x`` from two traced runs at sizes ``x_a`` and ``x_b`` (any measure memory grows
    linearly with, e.g. pixel count): every shared moment is carried to ``x`` on the line through its two values
    and the largest is returned with its index in run a, plus the bases (weights) on their own line. Runs whose ops
    cannot be aligned give the line through the two peaks and index None."""
    f = (x - x_a) / (x_b - x_a)
    base = base_a + (base_b - base_a) * f
    carried = carry_trace(trace_a, ops_a, x_a, trace_b, ops_b, x_b, x)
    if carried is None:
        pa, pb = max(trace_a, default=0), max(trace_b, default=0)
        return base + pa + (pb - pa) * f, None
    values, _, index = carried
    k = max(range(len(values)), key=values.__getitem__)
    return base + values[k], index[k]


def _storage_key(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less tensors
        return None


def _signatures(plan) -> list[tuple]:
    """Per network call of ``plan``: (adapters, guidance, grad, checkpoint, input carries gradient, trainable
    adapters among them, as the plan says)."""
    train = plan.trainable_adapters()
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

    from ..adapters import adapter_parameters
    from ..chain import guided_eps
    from ..sampling import initial_noise

    m, sw, lora = trainer.model, trainer.switch, trainer.lora
    x = initial_noise(range(batch), m.latent_shape(), m.device, m.dtype)
    prompts = (trainer.prompts.prompts * batch)[:batch]
    cond = m.encode_prompts(prompts)
    uncond = m.encode_prompts([""]).repeat(batch)
    params = {n: adapter_parameters(m.unet, n) for n in lora.names}
    saved = {n: [p.requires_grad for p in ps] for n, ps in params.items()}
    costs: dict[str, float] = {}
    try:
        for sig in sorted({s for p in plans for s in _signatures(p)}):
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
        trainer.reward(m.decode(z), m.reward_prompts(prompts)).float().sum().backward()

    costs["decode_reward"] = timed(decode_reward, reps)
    m.unet.zero_grad(set_to_none=True)
    return costs


def ideal_seconds(plan, costs: dict[str, float]) -> float:
    """Sum of the plan's passes timed alone (``costs`` from :func:`pass_costs` over plans including this one)."""
    readouts = sum(st.readout is not None for st in plan.steps if st.kind == "ddim")
    return sum(costs[_key(s)] for s in _signatures(plan)) + readouts * costs["decode_reward"]
