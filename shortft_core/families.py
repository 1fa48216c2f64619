"""The model families the library loads by itself (SD1.5, SDXL): their bundled architecture configs, and which of
them a diffusers UNet is."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FAMILIES = ("sd15", "sdxl")


def configs_dir(family: str) -> Path:
    """Folder of the bundled architecture configs of ``family`` ('sd15' or 'sdxl')."""
    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: bundled configs exist for {FAMILIES}")
    return Path(__file__).resolve().parent / "configs" / family


def bundled_config(family: str, part: str, config_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """One bundled config (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``, ``scheduler``)."""
    path = Path(config_dir or configs_dir(family)) / f"{part}.json"
    if not path.is_file():
        raise FileNotFoundError(f"bundled config {path} is missing; reinstall shortft_core")
    return json.loads(path.read_text(encoding="utf-8"))


def unet_family(unet_or_config: Any) -> str:
    """'sd15' or 'sdxl' when a UNet has that architecture, else 'custom' (e.g. the tiny world)."""
    cfg = getattr(unet_or_config, "config", unet_or_config)
    get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
    for family in FAMILIES:
        ref = bundled_config(family, "unet")
        keys = ("block_out_channels", "cross_attention_dim", "down_block_types", "layers_per_block", "in_channels")
        if all(_same(get(k), ref.get(k)) for k in keys + ("addition_embed_type",)):
            return family
    return "custom"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def diffusers_module_order(unet_config: dict[str, Any]) -> list[str]:
    """The module paths of the diffusers UNet2DConditionModel of ``unet_config`` in the order it registers them
    (built on the meta device: no weight is allocated)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
    return [name for name, _ in unet.named_modules() if name]
