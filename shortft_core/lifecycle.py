"""Leave a caller's model exactly as it was, and run library code outside a host's inference mode.

Training changes the model it is given: LoRA adapters are added (peft wraps the layers they adapt), parameters
are frozen or unfrozen, layers get memory-saving ``forward`` overrides, the VAE may checkpoint, the text
encoders may be offloaded, modules switch to training mode and adapters are switched per step. A host such as
ComfyUI keeps its models cached between runs, so every one of these must be undone when a training session ends,
whether it ended normally, by an exception or by a stop request. :class:`ModelState` records what can change and
puts it back.

ComfyUI runs node code inside ``torch.inference_mode()``; tensors made there cannot take part in autograd.
:func:`outside_inference_mode` runs a function with inference mode off (gradient mode is left to the callee), so
weights loaded and adapters built by a host's worker thread are ordinary, trainable tensors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])

# Per-module instance attributes that training may set or override (peft's active adapters and input casting,
# the memory module's forward overrides and block checkpointing, diffusers' gradient checkpointing, train/eval mode).
_ATTRS = ("forward", "_shortft_lean", "_shortft_checkpointed", "cast_input_dtype_enabled", "_active_adapter",
          "gradient_checkpointing", "_gradient_checkpointing_func", "training", "merged_adapters")
_MISSING = object()


def outside_inference_mode(fn: F) -> F:
    """Decorate ``fn`` to run with ``torch.inference_mode`` off, whatever the calling thread's mode."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False):
            return fn(*args, **kwargs)
    return wrapper  # type: ignore[return-value]


@dataclass
class ModelState:
    """What training may change on a :class:`~shortft_core.models.DiffusionModel`, recorded so it can be restored."""

    model: Any
    adapters: tuple[str, ...] = ()
    requires_grad: dict[tuple[int, str], bool] = field(default_factory=dict)
    attrs: dict[tuple[int, str], dict[str, Any]] = field(default_factory=dict)
    peft_attrs: dict[str, Any] = field(default_factory=dict)
    offloaded: bool = False
    offload_cache_size: int = 0
    info: dict = field(default_factory=dict)

    @classmethod
    def capture(cls, model: Any) -> "ModelState":
        """Record the model's adapters, trainable flags, per-module attributes and text-encoder offload."""
        unet = model.unet
        state = cls(model, tuple(getattr(unet, "peft_config", {}) or {}))
        for i, part in enumerate(_parts(model)):
            for n, p in part.named_parameters():
                state.requires_grad[(i, n)] = p.requires_grad
            for n, m in part.named_modules():
                state.attrs[(i, n)] = {a: m.__dict__.get(a, _MISSING) for a in _ATTRS}
        config = getattr(unet, "peft_config", _MISSING)
        state.peft_attrs = {"peft_config": dict(config) if isinstance(config, dict) else config,
                            "_hf_peft_config_loaded": unet.__dict__.get("_hf_peft_config_loaded", _MISSING)}
        state.info = dict(model.info)
        state.offloaded = model.text_offload is not None
        state.offload_cache_size = model.text_offload.cache_size if state.offloaded else 0
        return state

    def restore(self) -> None:
        """Remove the adapters added since :meth:`capture` (unwrapping the layers peft wrapped for them) and put back
        every recorded flag, attribute and the text encoders' placement."""
        from .adapters import remove_adapters

        model, unet = self.model, self.model.unet
        remove_adapters(unet, [n for n in (getattr(unet, "peft_config", {}) or {}) if n not in self.adapters])
        for key, value in self.peft_attrs.items():
            if value is _MISSING:
                unet.__dict__.pop(key, None)
            else:
                setattr(unet, key, value)
        model.info.clear()
        model.info.update(self.info)
        if model.text_offload is not None and not self.offloaded:
            model.onload_text_encoders()
        elif model.text_offload is None and self.offloaded:
            model.offload_text_encoders(self.offload_cache_size)
        for i, part in enumerate(_parts(model)):
            for n, p in part.named_parameters():
                flag = self.requires_grad.get((i, n))
                if flag is not None and p.requires_grad != flag:  # (a host's inference tensors refuse the call)
                    p.requires_grad_(flag)
            for n, m in part.named_modules():
                before = self.attrs.get((i, n))
                if before is None:
                    continue
                for a, v in before.items():
                    if v is _MISSING:
                        m.__dict__.pop(a, None)
                    else:
                        m.__dict__[a] = v


def _parts(model: Any) -> list[torch.nn.Module]:
    return model.parts()
