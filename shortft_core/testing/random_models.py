"""Random-weight models of the real SD1.5 / SDXL architectures, for interop tests and GPU benchmarks.

No real weights exist on the project's machines; the shapes, names and layouts are what matters for loading,
LoRA key maps and ComfyUI parity, and for timing. Weights are drawn N(0, 1/fan_in) (norms around 1), so
activations stay finite through the full-size networks. Construction skips the default initialisers (which
take minutes for SDXL on a CPU) by allocating empty tensors directly in the target dtype.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from ..families import FAMILIES, bundled_config
from ..loading import SDXL_PAD_TOKEN, clip_tokenizer
from ..schedule import NoiseSchedule


def fill_random_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter with seeded random values (deterministic in ``seed`` and parameter order)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                std = 1.0 / math.sqrt(max(1, p[0].numel()))
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name.endswith("weight"):  # norm scales
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return module


def _empty(factory, dtype: torch.dtype) -> torch.nn.Module:
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        module = factory()
    buffers = {n: b.clone() for n, b in module.named_buffers() if b.device.type != "meta"}
    torch.nn.Module.to(module, dtype)  # (diffusers' .to() warns about fp32 modules; none matter for random weights)
    module = module.to_empty(device="cpu")
    with torch.no_grad():  # to_empty also blanks real buffers (e.g. CLIP's position_ids): put them back
        for n, b in module.named_buffers():
            if n in buffers:
                b.copy_(buffers[n])
    return module


def random_unet(config: str | Mapping[str, Any] = "sd15", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A UNet2DConditionModel of the bundled ``family`` config (or a config dict) with random weights."""
    from diffusers import UNet2DConditionModel

    cfg = bundled_config(config, "unet") if isinstance(config, str) else dict(config)
    return fill_random_(_empty(lambda: UNet2DConditionModel.from_config(cfg), dtype), seed).eval()


def random_model(family: str = "sd15", dtype: torch.dtype = torch.float32, seed: int = 0,
                 config_dir: str | os.PathLike | None = None):
    """A complete random-weight :class:`T2IModel` (UNet, VAE, text encoder(s), tokenizers) of ``family``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ..models import T2IModel

    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: random models exist for {FAMILIES}")
    cfg = {p: bundled_config(family, p, config_dir) for p in ("unet", "vae", "scheduler", "text_encoder")}
    unet = fill_random_(_empty(lambda: UNet2DConditionModel.from_config(cfg["unet"]), dtype), seed)
    vae = fill_random_(_empty(lambda: AutoencoderKL.from_config(cfg["vae"]), dtype), seed + 1)
    te = [fill_random_(_empty(lambda: CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])), dtype), seed + 2)]
    tokenizers = [clip_tokenizer()]
    if family == "sdxl":
        te2_cfg = CLIPTextConfig(**bundled_config(family, "text_encoder_2", config_dir))
        te.append(fill_random_(_empty(lambda: CLIPTextModelWithProjection(te2_cfg), dtype), seed + 3))
        tokenizers.append(clip_tokenizer(SDXL_PAD_TOKEN))
    for m in [unet, vae, *te]:
        m.eval().requires_grad_(False)
    return T2IModel(family, tokenizers, te, unet, vae, NoiseSchedule.from_config(cfg["scheduler"]), cfg["scheduler"],
                    source=f"random:{family}:{seed}", info={"format": "random"})


def write_ldm_checkpoint(model, path: str | os.PathLike, dtype: torch.dtype | None = torch.float16) -> Path:
    """Save a :class:`T2IModel` as a single-file ldm checkpoint (what A1111 / ComfyUI load), atomically."""
    from safetensors.torch import save_file

    from ..files import atomic_save
    from ..ldm_keys import ldm_checkpoint

    sd = ldm_checkpoint(model.family, model.unet, model.vae, model.text_encoders)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    path = Path(path)
    atomic_save(path, lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
    return path


#: Reduced architectures of each family (same block structure, conditioning and key layout, tiny widths), for
#: fast tests of loading, key maps and conditioning. The CLIP width stays 768 where SD1.x detection relies on it.
SMALL_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "sd15": {
        "unet": {"block_out_channels": [32, 64, 64, 64], "attention_head_dim": 8, "norm_num_groups": 16,
                 "layers_per_block": 1},
        "vae": {"block_out_channels": [16, 32], "down_block_types": ["DownEncoderBlock2D"] * 2,
                "up_block_types": ["UpDecoderBlock2D"] * 2, "norm_num_groups": 8, "layers_per_block": 1,
                "sample_size": 64},
        "text_encoder": {"num_hidden_layers": 2, "intermediate_size": 64, "num_attention_heads": 4},
    },
    "sdxl": {
        "unet": {"block_out_channels": [32, 64, 64], "attention_head_dim": [2, 4, 8], "norm_num_groups": 16,
                 "layers_per_block": 1, "transformer_layers_per_block": [1, 2, 2], "cross_attention_dim": 768 + 64,
                 "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 8 * 6 + 64},
        "vae": {"block_out_channels": [16, 32], "down_block_types": ["DownEncoderBlock2D"] * 2,
                "up_block_types": ["UpDecoderBlock2D"] * 2, "norm_num_groups": 8, "layers_per_block": 1,
                "sample_size": 64},
        "text_encoder": {"num_hidden_layers": 2, "intermediate_size": 64, "num_attention_heads": 4},
        "text_encoder_2": {"hidden_size": 64, "projection_dim": 64, "num_hidden_layers": 2, "intermediate_size": 128,
                           "num_attention_heads": 4},
    },
}


def write_small_configs(family: str, folder: str | os.PathLike) -> Path:
    """Write the bundled configs of ``family`` with :data:`SMALL_CONFIGS` applied into ``folder``; returns it."""
    import json

    from ..files import atomic_write_json
    from ..families import configs_dir

    folder = Path(folder)
    for src in configs_dir(family).glob("*.json"):
        cfg = json.loads(src.read_text(encoding="utf-8"))
        cfg.update(SMALL_CONFIGS[family].get(src.stem, {}))
        atomic_write_json(folder / src.name, cfg)
    return folder


def randomise_lora_b_(net: torch.nn.Module, seed: int, std: float, adapter: str | None = None) -> None:
    """Seeded random values for the B matrices of the LoRA adapters of ``net`` (only ``adapter``'s if given): peft
    starts them at zero, where every adapter would leave the network unchanged."""
    marker = ".lora_B." + (f"{adapter}." if adapter else "")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if marker in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def write_random_shortcut(checkpoint: str | os.PathLike, path: str | os.PathLike, family: str = "sd15",
                          rank: int = 4) -> Path:
    """A random shortcut LoRA file for ``checkpoint``: a rank-``rank`` adapter on every layer a Hyper-SD LoRA adapts,
    B seeded non-zero, exported in the kohya layout published shortcuts use (name it as a published file to get its
    preset from the name)."""
    from ..adapters import SHORTCUT_TARGETS, add_lora
    from ..loading import load_model
    from ..lora_io import export_lora

    model = load_model(checkpoint, dtype=torch.float32)
    add_lora(model.unet, "shortcut", rank, targets=SHORTCUT_TARGETS, seed=5)
    randomise_lora_b_(model.unet, seed=6, std=0.02, adapter="shortcut")
    return Path(export_lora(model.unet, "shortcut", path, family=family))
