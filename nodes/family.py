"""Which family a ComfyUI MODEL is, in the library's names: one answer for every node (the LoRA set's family check,
the training backend, the shortcut check)."""

from __future__ import annotations

from typing import Any

import comfy.supported_models

from .tiny_world import is_tiny_world

# ComfyUI's model config classes the library has a name for; exact classes, so variants built on them
# (instruct-pix2pix, unCLIP, SSD-1B) are not taken for their base (inpainting ones share the class: see below).
# ComfyUI's SD3 config is SD3 medium's and SD3.5 large's and medium's (MMDiT, rectified flow, 16-channel latents);
# its Flux config FLUX.1 dev's and its fine-tunes' (guidance-distilled; FLUX.1 schnell has a class of its own).
_NAMED = ((comfy.supported_models.SD15, "sd15"), (comfy.supported_models.SDXL, "sdxl"),
          (comfy.supported_models.SD20, "sd2"), (comfy.supported_models.SD3, "sd3"),
          (comfy.supported_models.Flux, "flux"))
TRAINABLE = ("tiny", "sd15", "sdxl", "sd2", "sd3", "flux")
SUPPORTED = ("the tiny world, SD1.5, SDXL and SD2.x (eps, v-prediction, or rectified flow through ModelSamplingSD3), "
             "SD3 / SD3.5 and FLUX.1 dev (rectified flow)")


def model_family(model: Any) -> str:
    """``tiny``, ``sd15``, ``sdxl``, ``sd2``, ``sd3`` or ``flux`` for a MODEL (a ModelPatcher or its BaseModel) of
    those families, else ComfyUI's name of its model config class (e.g. ``FluxSchnell``)."""
    if is_tiny_world(model):
        return "tiny"
    config = getattr(model, "model", model).model_config
    return next((name for cls, name in _NAMED if type(config) is cls), type(config).__name__)


def trainable_family(model: Any) -> str:
    """The family of a MODEL ShortFT trains, or a ValueError naming the MODEL's family and the supported ones."""
    family = model_family(model)
    if family not in TRAINABLE:
        raise ValueError(f"the MODEL is a {family} model; ShortFT trains {SUPPORTED} (other families are not "
                         "supported yet)")
    # an inpainting checkpoint loads as its base family's config with a wider input (latent, mask, masked image)
    config = getattr(model, "model", model).model_config
    latent = int(config.latent_format.latent_channels)
    channels = getattr(config, "unet_config", {}).get("in_channels", latent)
    if family != "tiny" and channels > latent:
        raise ValueError(f"the MODEL is a {family} inpainting model (its network takes {channels} input channels: "
                         "the latent, a mask and the masked image); ShortFT trains text-to-image models: load the "
                         f"{family} text-to-image checkpoint instead")
    return family
