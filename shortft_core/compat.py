"""Differences between the dependency versions the library supports (pyproject.toml: the lower bounds are tested),
kept in one place so the rest of the code is written once."""

from __future__ import annotations

from typing import Any

import torch


def transformers_dtype(dtype: torch.dtype) -> dict[str, Any]:
    """The ``from_pretrained`` keyword that sets a transformers model's dtype: ``dtype`` from transformers 4.56 on,
    ``torch_dtype`` before (ComfyUI environments may hold 4.50 or later)."""
    import transformers
    from packaging.version import Version

    return {"dtype": dtype} if Version(transformers.__version__) >= Version("4.56") else {"torch_dtype": dtype}


def prefixed_keys(path: str, prefix: str) -> None:
    """Rewrite a safetensors file with ``prefix`` before every key that lacks it (same tensors and metadata).
    transformers 5 saves a ``CLIPTextModel`` without its ``text_model.`` prefix, which transformers before 5.6
    cannot match (it would build a random text encoder): files written with the prefix load in every version."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from .files import atomic_save

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
        tensors = {(k if k.startswith(prefix) else prefix + k): f.get_tensor(k) for k in f.keys()}
    atomic_save(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
