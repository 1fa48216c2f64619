"""What the parity checks between two backends compare: the alignment set's LoRA tensors by diffusers name."""

from __future__ import annotations

from typing import Any

import torch


def set_lora_tensors(model: Any, what: str = "weight") -> dict[str, torch.Tensor]:
    """Copies of the alignment set's LoRA weights (``what="weight"``) or their gradients (``"grad"``), keyed
    ``<diffusers module>.lora_<A|B>.<adapter>.weight`` so both backends' layers line up; the frozen shortcut is left
    out."""
    out = {}
    for name, p in model.unet.named_parameters():
        if ".lora_" not in name or ".shortcut." in name:
            continue
        module, _, rest = name.partition(".lora_")
        module = (model.lora_names or {}).get(module, module)
        out[module + ".lora_" + rest] = (p.grad if what == "grad" else p).detach().clone()
    return out
