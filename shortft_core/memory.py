"""Activation memory of the networks in a reward-gradient chain: what autograd keeps that backward never needs.

Reward fine-tuning backpropagates through networks whose weights never change: the frozen shortcut jumps, the
base UNet's convolutions under an attention-only LoRA, the whole VAE decoder. Autograd's convolution keeps its
input for the weight gradient even when the weight is frozen (a frozen ``Linear`` keeps only its weight), so
every frozen convolution stores one activation that backward never reads. :func:`lean_frozen_convs` makes each
frozen ``Conv2d`` keep only its weight and compute the input gradient from the input's shape; outputs and
gradients are the same computation, so results do not change (``tests/test_memory.py``).

:func:`lean_geglu` does the same for the transformer blocks' GEGLU feed-forward (``h * gelu(gate)``): autograd
keeps both halves of the projection and ``gelu(gate)``; the lean version keeps only the projection and
recomputes the GELU (an elementwise op) in backward, with the same kernels, so gradients are bit-identical.

:func:`lean_norm_act` fuses the ResNet blocks' ``GroupNorm -> SiLU`` pairs (and the output heads' of the UNet and
the VAE decoder): autograd keeps the norm's input and the SiLU's input, two tensors of one size; the fused pair
keeps only the norm's input and recomputes both (cheap, memory-bound ops) in backward. Half of a VAE decode's
activations are these pairs.

Each switch finds diffusers' layers by default; a host whose layers compute the same way (ComfyUI's) names its
classes (``kinds``, ``pairs``) and a ``gate`` asked on each call, which keeps the host's own forward where the
layer computes from a cast or patched copy of its weight.

:func:`checkpoint_blocks` trades time for memory instead: whole blocks (a reward model's transformer layers, the
blocks of a VAE decoder that has no checkpointing switch of its own) keep only their input and run again in
backward.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import types
from typing import Any, Callable, ContextManager, Iterable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)


class _FrozenConv2d(torch.autograd.Function):
    """conv2d whose backward needs only the weight: the gradient w.r.t. the input, none for weight or bias."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):  # noqa: D102
        ctx.save_for_backward(weight)  # a parameter: saving it costs no memory
        ctx.conf = (x.shape, stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conf
        grad_x = torch.nn.grad.conv2d_input(shape, weight, grad, stride, padding, dilation, groups)
        return grad_x, None, None, None, None, None, None


Gate = Callable[[torch.nn.Module], bool]
"""A host's say, per call, on whether a layer may take its lean path: False where the host's own forward must run
(ComfyUI: a layer that computes with a cast or patched copy of its weight). It may raise to stop the computation
(ComfyUI's interrupt, which the host's forward would have checked)."""


class LeanPath(NamedTuple):
    """Where a switched layer takes its lean path: inputs on ``devices`` (None: any), and where ``gate`` allows."""

    devices: tuple[str, ...] | None
    gate: Gate | None = None


def _on(self: torch.nn.Module, x: torch.Tensor) -> bool:
    devices, gate = self._shortft_lean
    return (torch.is_grad_enabled() and x.requires_grad and (devices is None or x.device.type in devices)
            and (gate is None or gate(self)))


def _lean_forward(self: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    frozen = not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)
    if frozen and _on(self, x):
        return _FrozenConv2d.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
    return type(self).forward(self, x)


DEFAULT_DEVICES: tuple[str, ...] = ("cuda",)  # where memory is the limit; on CPU autograd's own conv backward
#                                               is faster (BENCHMARKS.md: a VAE decode 1.75x slower lean)


def lean_frozen_convs(module: torch.nn.Module, devices: tuple[str, ...] | None = DEFAULT_DEVICES, *,
                      kinds: tuple[type, ...] = (torch.nn.Conv2d,), gate: Gate | None = None) -> int:
    """Let every ``Conv2d`` in ``module`` skip saving its input while its weight is frozen; returns how many.

    Decided per call, so a convolution whose weight (or a LoRA on it) is trained keeps the normal path, and so is
    the device: only inputs on ``devices`` (None: any) take the lean path, and only where ``gate`` allows. Switched
    are layers whose exact type is one of ``kinds`` (``Conv2d`` subclasses whose forward computes ``conv2d`` with
    the layer's own weight when the gate allows; diffusers' and peft's are plain ``Conv2d``), zero-padded and not
    string-padded.
    """
    n = 0
    for m in module.modules():
        if type(m) not in kinds or hasattr(m, "_shortft_lean"):
            continue
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            continue
        m.forward = types.MethodType(_lean_forward, m)
        m._shortft_lean = LeanPath(devices, gate)
        n += 1
    log.debug("lean frozen convolutions: %d switched", n)
    return n


class _GeluGate(torch.autograd.Function):
    """h * gelu(gate) keeping only h and gate (two views of one projection output) for backward."""

    @staticmethod
    def forward(ctx, h, gate):  # noqa: D102
        ctx.save_for_backward(h, gate)
        return h * F.gelu(gate)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        h, gate = ctx.saved_tensors
        grad_h = grad * F.gelu(gate) if ctx.needs_input_grad[0] else None
        grad_gate = torch.ops.aten.gelu_backward(grad * h, gate) if ctx.needs_input_grad[1] else None
        return grad_h, grad_gate


def _lean_geglu_forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    proj = self.proj(hidden_states)
    h, gate = proj.chunk(2, dim=-1)
    if _on(self, proj):
        return _GeluGate.apply(h, gate)
    return h * F.gelu(gate)


def lean_geglu(module: torch.nn.Module, devices: tuple[str, ...] | None = DEFAULT_DEVICES, *,
               kinds: tuple[type, ...] | None = None) -> int:
    """Let every GEGLU in ``module`` recompute its GELU in backward instead of keeping it (on ``devices``; None:
    any); returns how many (a third of each feed-forward's kept activations). ``kinds``: the exact GEGLU classes,
    each computing ``h * gelu(gate)`` from the two halves of its ``proj`` (default: diffusers')."""
    if kinds is None:
        from diffusers.models.activations import GEGLU

        kinds = (GEGLU,)
    n = 0
    for m in module.modules():
        if type(m) in kinds and not hasattr(m, "_shortft_lean"):
            m.forward = types.MethodType(_lean_geglu_forward, m)
            m._shortft_lean = LeanPath(devices)
            n += 1
    return n


class _GroupNormSiLU(torch.autograd.Function):
    """silu(group_norm(x)) keeping only ``x`` for backward, where the pair is recomputed with the same kernels (and
    the caller's autocast state), so gradients are those of the unfused pair."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps):  # noqa: D102
        ctx.save_for_backward(x, weight, bias)
        ctx.conf = (groups, eps)
        dev = x.device.type
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        return F.silu(F.group_norm(x, groups, weight, bias, eps))

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x, weight, bias = ctx.saved_tensors
        groups, eps = ctx.conf
        dev, enabled, dtype = ctx.autocast
        need = ctx.needs_input_grad[:3]
        inputs = [None if t is None else t.detach().requires_grad_(n) for t, n in zip((x, weight, bias), need)]
        with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
            y = F.silu(F.group_norm(inputs[0], groups, inputs[1], inputs[2], eps))
        wanted = [t for t, n in zip(inputs, need) if n and t is not None]
        grads = iter(torch.autograd.grad(y, wanted, grad) if wanted else ())
        out = [next(grads) if n and t is not None else None for t, n in zip(inputs, need)]
        return (*out, None, None)


class _OutputSavingLayerNorm(torch.autograd.Function):
    """layer_norm without weight and bias whose backward reads its output (the normalised input) and the inverse
    standard deviation, not its input: the same values, and the input may change in place after the call."""

    @staticmethod
    def forward(ctx, x, shape, eps):  # noqa: D102
        out, _, rstd = torch.native_layer_norm(x, shape, None, None, eps)
        ctx.save_for_backward(out, rstd)
        ctx.dims = tuple(range(-len(shape), 0))
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        out, rstd = ctx.saved_tensors
        dtype = torch.promote_types(grad.dtype, torch.float32)  # fp32 at least, as layer_norm's own backward
        g, y = grad.to(dtype), out.to(dtype)
        dx = rstd.to(dtype) * (g - g.mean(ctx.dims, keepdim=True) - y * (g * y).mean(ctx.dims, keepdim=True))
        return dx.to(grad.dtype), None, None


def layer_norm_saving_output(x: torch.Tensor, shape: Sequence[int], eps: float) -> torch.Tensor:
    """``layer_norm(x, shape, eps)`` without weight and bias, whose backward keeps its output instead of ``x``: a
    residual stream normalised and then updated in place (``x += f(norm(x))``, as FLUX's transformer blocks do)
    trains through it, where autograd would find ``x`` changed since it was saved."""
    return _OutputSavingLayerNorm.apply(x, tuple(shape), eps)


_ACTIVATED = "_shortft_activated"  # set on a fused pair's output: the SiLU after it has been applied already


def _fused_norm_forward(self: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    if _on(self, x):
        out = _GroupNormSiLU.apply(x, self.weight, self.bias, self.num_groups, self.eps)
        setattr(out, _ACTIVATED, True)
        return out
    return type(self).forward(self, x)


def _fused_act_forward(self: torch.nn.SiLU, x: torch.Tensor) -> torch.Tensor:
    if getattr(x, _ACTIVATED, False):
        delattr(x, _ACTIVATED)  # consumed: the tensor goes on as an ordinary activation
        return x
    return type(self).forward(self, x)


def _pairs(module: torch.nn.Module) -> list[tuple[torch.nn.GroupNorm, torch.nn.SiLU]]:
    """(norm, activation) pairs whose norm output goes straight into the activation, by the code of diffusers'
    ``ResnetBlock2D`` (norm1 -> act; norm2 -> act unless a scale/shift comes between) and the output heads of
    ``UNet2DConditionModel`` and the VAE ``Decoder`` (conv_norm_out -> conv_act)."""
    from diffusers.models.autoencoders.vae import Decoder
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    out = []
    for m in module.modules():
        if type(m) is ResnetBlock2D:
            act = m.nonlinearity
            out.append((m.norm1, act))
            if m.time_embedding_norm != "scale_shift":
                out.append((m.norm2, act))
        elif type(m) in (UNet2DConditionModel, Decoder) and getattr(m, "conv_norm_out", None) is not None:
            out.append((m.conv_norm_out, m.conv_act))
    return [(n, a) for n, a in out if type(n) is torch.nn.GroupNorm and type(a) is torch.nn.SiLU]


def lean_norm_act(module: torch.nn.Module, devices: tuple[str, ...] | None = DEFAULT_DEVICES, *,
                  pairs: Callable[[torch.nn.Module], list[tuple[torch.nn.GroupNorm, torch.nn.SiLU]]] = _pairs,
                  gate: Gate | None = None) -> int:
    """Fuse every ``GroupNorm -> SiLU`` pair in ``module`` so that backward keeps only the norm's input (on
    ``devices``, None: any, and where ``gate`` allows); returns how many norms were switched. ``pairs`` finds the
    pairs whose norm output goes only into the activation, and whose norm computes ``group_norm`` with its own
    weight when the gate allows (default: those of diffusers' ResNet blocks and output heads)."""
    n = 0
    for norm, act in pairs(module):
        if hasattr(norm, "_shortft_lean"):
            continue
        if not hasattr(act, "_shortft_lean"):
            act.forward = types.MethodType(_fused_act_forward, act)
            act._shortft_lean = LeanPath(devices)
        norm.forward = types.MethodType(_fused_norm_forward, norm)
        norm._shortft_lean = LeanPath(devices, gate)
        n += 1
    log.debug("lean GroupNorm+SiLU pairs: %d switched", n)
    return n


def lean_saved_activations(*modules: torch.nn.Module, devices: tuple[str, ...] | None = DEFAULT_DEVICES) -> int:
    """All of the above on each module (the trainer's UNet and VAE); returns how many layers were switched."""
    return sum(lean_frozen_convs(m, devices) + lean_geglu(m, devices) + lean_norm_act(m, devices) for m in modules)


Replay = Callable[[torch.nn.Module], Callable[[], ContextManager]]
"""Called with a block at each checkpointed call; returns a factory of the context that reinstates, around the
block's recomputation in backward, the state the call ran with (which adapters were active, a host's switches)."""


def _fresh(x: Any) -> Any:
    return x.clone() if isinstance(x, torch.Tensor) else x


def checkpoint_blocks(blocks: Iterable[torch.nn.Module], *, when: Callable[[], bool] | None = None,
                      fresh_inputs: bool = False, replay: Replay | None = None) -> int:
    """Recompute each block's activations during backward instead of storing them (a ViT-H's activation memory
    drops from one copy per block to one per model). Works in eval mode, unlike transformers' own switch; parameter
    names and outputs are unchanged. The override is an instance ``forward`` and a ``_shortft_checkpointed`` mark,
    both of which :class:`~shortft_core.lifecycle.ModelState` records and removes. Returns the number of blocks
    wrapped.

    A recomputation must see what the first call saw. ``when`` is asked at each call with gradient (None: always)
    whether to checkpoint it. ``fresh_inputs`` runs the block on copies of its tensor arguments, for blocks that add to
    their input in place (the copy is made inside the recomputed function, so what is kept is the unchanged input).
    ``replay`` reinstates other state (see :data:`Replay`). The contents of dict arguments (a host's per-call
    options, which it mutates between blocks) are put back as they were for the recomputation. A kept input changed
    in place is an error in backward (autograd's or the checkpoint's), not a silently wrong gradient."""
    n = 0
    for block in blocks:
        if getattr(block, "_shortft_checkpointed", False):
            continue
        block.forward = functools.partial(_checkpointed_forward, block.forward, block, when, fresh_inputs, replay)
        block._shortft_checkpointed = True
        n += 1
    return n


def _checkpointed_forward(inner: Callable, block: torch.nn.Module, when: Callable[[], bool] | None,
                          fresh_inputs: bool, replay: Replay | None, *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled() or (when is not None and not when()):
        return inner(*args, **kwargs)
    dicts = [(d, dict(d)) for d in (*args, *kwargs.values()) if isinstance(d, dict)]
    reinstate = replay(block) if replay is not None else contextlib.nullcontext
    calls = 0

    def run(*a: Any, **kw: Any) -> Any:
        nonlocal calls
        calls += 1
        if fresh_inputs:
            a = tuple(_fresh(x) for x in a)
            kw = {k: _fresh(x) for k, x in kw.items()}
        if calls == 1:
            return inner(*a, **kw)
        now = [(d, dict(d)) for d, _ in dicts]
        for d, then in dicts:
            d.clear()
            d.update(then)
        try:
            with reinstate():
                return inner(*a, **kw)
        finally:
            for d, current in now:
                d.clear()
                d.update(current)

    return checkpoint(run, *args, use_reentrant=False, **kwargs)
