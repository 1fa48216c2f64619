"""What the pack's nodes share: the custom socket types, ComfyUI's folders for our files, and image conversions.

ComfyUI runs nodes inside ``torch.inference_mode()``: tensors that cross into the library are cloned outside it,
so training and rewards never meet an inference tensor.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import comfy.model_sampling
import folder_paths
import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image

# Custom sockets: the MODEL with its shortcut (what ShortFTTrain trains), a reward, a LoRA set.
SHORTFT_MODEL = io.Custom("SHORTFT_MODEL")
SHORTFT_REWARD = io.Custom("SHORTFT_REWARD")
LORA_SET = io.Custom("SHORTFT_LORA_SET")

CATEGORY = "ShortFT"
TINY = "tiny"
AUTO = "auto"  # a combo choice the node resolves itself (a shortcut's preset, the checkpointing)
REWARD_FOLDER = "reward_models"
REWARD_EXTENSIONS = {".pt", ".pth", ".bin", ".safetensors", ".json", ".txt"}
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# validate_inputs' default for a socket: ComfyUI passes a linked input (as None) and leaves an unlinked one out
UNLINKED = object()


def is_dynamic(patcher: object) -> bool:
    """Whether ComfyUI's DynamicVRAM streams this patcher's weights (its default on NVIDIA GPUs): they stay in host
    memory and are staged on the GPU per layer call, from its own staged or pinned copies of them."""
    return bool(getattr(patcher, "is_dynamic", lambda: False)())


# the chain's levels: plans address timesteps 0 .. CHAIN_LEVELS - 1
CHAIN_LEVELS = 1000


def is_flow(sampling: Any) -> bool:
    """Whether ComfyUI's model ``sampling`` is rectified flow on a discrete table (x = (1 - f) x0 + f noise): SD3's
    (ModelSamplingDiscreteFlow, 1000 levels) or FLUX's (ModelSamplingFlux, 10000)."""
    return isinstance(sampling, (comfy.model_sampling.ModelSamplingDiscreteFlow,
                                 comfy.model_sampling.ModelSamplingFlux)) and \
        isinstance(sampling, comfy.model_sampling.CONST)


def chain_levels(sampling: Any) -> torch.Tensor:
    """The indices of ComfyUI's table of model ``sampling`` that are the chain's levels 0 .. 999: the table itself
    where it has 1000 levels, every k-th level of a table k times as fine (FLUX's 10000: 9, 19, ..., 9999), so the
    chain's top level is the table's (pure noise for a flow model); a ValueError for another size."""
    size = int(sampling.sigmas.shape[0])
    if size % CHAIN_LEVELS:
        raise ValueError(f"the MODEL's model sampling ({type(sampling).__name__}) has {size} levels; ShortFT's chain "
                         f"steps on {CHAIN_LEVELS} levels or a table a whole multiple as fine")
    stride = size // CHAIN_LEVELS
    return torch.arange(stride - 1, size, stride)


def chain_sigmas(sampling: Any) -> torch.Tensor:
    """The sigma (a flow model's level f) of ComfyUI's model ``sampling`` at each of the chain's 1000 levels
    (:func:`chain_levels`; a discrete model's table is the chain's)."""
    return sampling.sigmas[chain_levels(sampling)] if is_flow(sampling) else sampling.sigmas


def level_index(sampling: Any, sigma: torch.Tensor) -> torch.Tensor:
    """The level of the chain each ``sigma`` of ComfyUI's model ``sampling`` is, the timestep a LoRA set's segments
    are defined on: a discrete model's own timestep (the index of its table), for a flow model (whose network
    timestep is the level times a multiplier) the nearest of the chain's levels on its table."""
    if is_flow(sampling):
        table = chain_sigmas(sampling).to(sigma.device, torch.float32)
        return (sigma.reshape(-1, 1).float() - table).abs().argmin(dim=1).float()
    return sampling.timestep(sigma)


def register_folders() -> None:
    """``models/reward_models`` as a ComfyUI model folder (extra_model_paths.yaml may add more)."""
    path = os.path.join(folder_paths.models_dir, REWARD_FOLDER)
    if REWARD_FOLDER in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(REWARD_FOLDER, path, is_default=True)
    else:
        folder_paths.folder_names_and_paths[REWARD_FOLDER] = ([path], set(REWARD_EXTENSIONS))


def reward_folders() -> list[str]:
    return folder_paths.get_folder_paths(REWARD_FOLDER) if REWARD_FOLDER in folder_paths.folder_names_and_paths \
        else []


def reward_weights_dir() -> str | None:
    """The reward weights folder searched by name (the first registered one that exists)."""
    return next((p for p in reward_folders() if os.path.isdir(p)), None)


def run_folders(run_name: str) -> tuple[Path, Path]:
    """(run folder under ComfyUI's output directory, LoRA-set folder under the first LoRA folder) of a run."""
    if not RUN_NAME.match(run_name or ""):
        raise ValueError(f"run_name {run_name!r}: use letters, digits, '_', '-' and '.', starting with a letter or "
                         "digit (it names the folders output/shortft/<run_name> and models/loras/shortft/<run_name>)")
    out = Path(folder_paths.get_output_directory()) / "shortft" / run_name
    lora = Path(folder_paths.get_folder_paths("loras")[0]) / "shortft" / run_name
    return out, lora


def device_options() -> list[str]:
    out = ["auto", "cpu"]
    if torch.cuda.is_available():
        out += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return out


def from_comfy(images: torch.Tensor) -> torch.Tensor:
    """A ComfyUI IMAGE (B, H, W, C in [0, 1]) as the library's (B, 3, H, W), an ordinary tensor (not an
    inference tensor), alpha dropped."""
    with torch.inference_mode(False):
        return images[..., :3].movedim(-1, 1).float().clone()


def to_comfy(images: torch.Tensor) -> torch.Tensor:
    """Library images (B, 3, H, W in [0, 1]) as a ComfyUI IMAGE (B, H, W, 3) on the CPU."""
    return images.detach().float().clamp(0, 1).movedim(1, -1).cpu().contiguous()


def png_image(path: str | os.PathLike) -> torch.Tensor:
    """A PNG file as a one-image ComfyUI IMAGE."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]


def pil_image(image: torch.Tensor) -> Image.Image:
    """One library image (3, H, W in [0, 1]) as a PIL image (for previews)."""
    arr = (image.detach().float().clamp(0, 1).movedim(0, -1).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr)
