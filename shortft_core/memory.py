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
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F

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


def _on(self: torch.nn.Module, x: torch.Tensor) -> bool:
    devices = self._shortft_lean
    return torch.is_grad_enabled() and x.requires_grad and (devices is None or x.device.type in devices)


def _lean_forward(self: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    frozen = not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)
    if frozen and _on(self, x):
        return _FrozenConv2d.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
    return type(self).forward(self, x)


DEFAULT_DEVICES: tuple[str, ...] = ("cuda",)  # where memory is the limit; on CPU autograd's own conv backward
#                                               is faster (BENCHMARKS.md: a VAE decode 1.75x slower lean)


def lean_frozen_convs(module: torch.nn.Module, devices: tuple[str, ...] | None = DEFAULT_DEVICES) -> int:
    """Let every ``Conv2d`` in ``module`` skip saving its input while its weight is frozen; returns how many.

    Decided per call, so a convolution whose weight (or a LoRA on it) is trained keeps the normal path, and so is
    the device: only inputs on ``devices`` (None: any) take the lean path. Only zero-padded, non-string-padded
    convolutions are switched (diffusers' and peft's are).
    """
    n = 0
    for m in module.modules():
        if type(m) is not torch.nn.Conv2d or hasattr(m, "_shortft_lean"):
            continue
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            continue
        m.forward = types.MethodType(_lean_forward, m)
        m._shortft_lean = devices
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


def lean_geglu(module: torch.nn.Module, devices: tuple[str, ...] | None = DEFAULT_DEVICES) -> int:
    """Let every diffusers ``GEGLU`` in ``module`` recompute its GELU in backward instead of keeping it (on
    ``devices``; None: any); returns how many (a third of each feed-forward's kept activations)."""
    from diffusers.models.activations import GEGLU

    n = 0
    for m in module.modules():
        if type(m) is GEGLU and not hasattr(m, "_shortft_lean"):
            m.forward = types.MethodType(_lean_geglu_forward, m)
            m._shortft_lean = devices
            n += 1
    return n


def lean_saved_activations(*modules: torch.nn.Module, devices: tuple[str, ...] | None = DEFAULT_DEVICES) -> int:
    """Both of the above on each module (the trainer's UNet and VAE); returns how many layers were switched."""
    return sum(lean_frozen_convs(m, devices) + lean_geglu(m, devices) for m in modules)
