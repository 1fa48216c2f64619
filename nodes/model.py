"""LoadShortcutModel: the MODEL, CLIP and VAE a stock loader gave, with the frozen shortcut ShortFT jumps with
(Hyper-SD, PCM, TCD, the tiny world's own), checked against each other before anything trains. ShortFTSample, the
pack's own sampler of earlier versions, is kept only to tell old workflows what replaces it.

Nothing here copies or changes the MODEL: the output names what ShortFTTrain trains (the MODEL itself, in place,
with the shortcut attached as a frozen adapter for the duration of the training and removed after it), so a KSampler
on the same MODEL elsewhere in the graph samples the model as loaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import comfy.lora
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..shortft_core import SHORTCUT_PRESETS, find_shortcut_preset, lora_file, tiny_shortcut_path
from .apply import lora_patches
from .backend import ComfyModel, model_sampling
from .common import AUTO, CATEGORY, SHORTFT_MODEL, TINY, UNLINKED, is_flow
from .family import trainable_family

log = logging.getLogger(__name__)

NONE = "none"
# the widgets LoadShortcutModel had when it loaded its own copy of a base (workflows made before it took a MODEL)
LEGACY_WIDGETS = ("base", "device", "dtype")
REPLACEMENT = ("connect the MODEL, CLIP and VAE of a stock loader (Load Checkpoint; Load Tiny World for the tiny "
               "world) to LoadShortcutModel")


def shortcut_options() -> list[str]:
    return [TINY, NONE, *folder_paths.get_filename_list("loras")]


@dataclass
class ShortcutModel:
    """What ShortFTTrain trains: the MODEL (through the library's model seam), and the shortcut file and preset
    the training session attaches to it (None: no shortcut, for baselines and naive jumps)."""

    model: ComfyModel
    shortcut: Path | None
    preset: str | None

    @property
    def family(self) -> str:
        return self.model.family


def shortcut_path(shortcut: str) -> Path | None:
    """The shortcut file a combo value names (None for 'none')."""
    if shortcut == NONE:
        return None
    if shortcut == TINY:
        return Path(tiny_shortcut_path())
    return Path(folder_paths.get_full_path_or_raise("loras", shortcut))


def check_shortcut(model: Any, shortcut: str, path: Path | None, preset: str) -> str | None:
    """Refuse a shortcut made for another family than the MODEL's (by its preset, and by every key and shape of the
    file against the MODEL's weights) before any training; returns the preset name to train with (None: from the
    file's metadata, or none known)."""
    family = trainable_family(model)  # an unsupported family is refused first, by name
    if path is None:
        return None
    if shortcut == TINY and family != "tiny":
        needs = ("shortcut 'none' (ShortFT then jumps with the MODEL's own steps) or a few-step LoRA distilled from "
                 "this flow model" if is_flow(model_sampling(model)) else
                 f"a few-step LoRA made for {family} (Hyper-SD, PCM or TCD) in models/loras")
        raise ValueError(f"shortcut 'tiny' is the tiny world's own; this {family} MODEL needs {needs}")
    found = find_shortcut_preset(path, None if preset == AUTO else preset)
    if found is not None and found.base != family:
        raise ValueError(f"shortcut preset {found.name} is for {found.base}, but the MODEL is {family}: choose the "
                         f"{family} version of the shortcut (and its preset), or load a {found.base} checkpoint")
    if found is not None and is_flow(model_sampling(model)):
        raise ValueError(f"shortcut preset {found.name} was distilled on the trajectory of the eps {found.base} model, "
                         "and this MODEL samples by rectified flow (ModelSamplingSD3), whose trajectory it would jump "
                         "off: choose shortcut 'none' (ShortFT then jumps with the MODEL's own DDIM steps; the "
                         "baselines need no shortcut), or a shortcut distilled from this flow model")
    lora_patches(comfy.utils.load_torch_file(str(path), safe_load=True), path, model,
                 comfy.lora.model_lora_keys_unet(model.model, {}))
    return found.name if found is not None else None


class LoadShortcutModel(io.ComfyNode):
    """The MODEL/CLIP/VAE a stock loader gave, with the shortcut ShortFT jumps with (see the module docstring)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ShortFT_LoadShortcutModel",
            display_name="LoadShortcutModel",
            category=CATEGORY,
            description="Takes the MODEL, CLIP and VAE of a stock loader (Load Checkpoint, or Load Tiny World) and "
                        "the frozen few-step shortcut LoRA ShortFT jumps with, checks that they fit each other, and "
                        "gives ShortFTTrain what it trains: the MODEL itself, in place (no second copy), with the "
                        "shortcut attached only while it trains.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to align (SD1.5, SDXL, SD2.x, SD3 / SD3.5, "
                                                "FLUX.1 dev or the tiny world), from Load Checkpoint (or Load "
                                                "Diffusion Model) or Load Tiny World. Other LoRAs already "
                                                "applied to it stay applied: the set is trained on top of them, and "
                                                "is meant to be applied on top of them."),
                io.Clip.Input("clip", tooltip="The text encoder of the same checkpoint."),
                io.Vae.Input("vae", tooltip="The VAE of the same checkpoint (the reward sees its decoded images)."),
                io.Combo.Input("shortcut", options=shortcut_options(), default=TINY,
                               tooltip="The frozen few-step model ShortFT jumps with: a Hyper-SD / PCM / TCD LoRA "
                                       "from models/loras made for the MODEL's family, 'tiny' (the tiny world's "
                                       "distilled shortcut), or 'none' (baselines, or naive DDIM jumps)."),
                io.Combo.Input("preset", options=[AUTO, *sorted(SHORTCUT_PRESETS)], default=AUTO,
                               tooltip="How the shortcut was made (its grid, segments and CFG). 'auto' reads it from "
                                       "the file's metadata (our own shortcuts) or its published file name."),
            ],
            outputs=[SHORTFT_MODEL.Output(display_name="model", tooltip="The MODEL and its shortcut, for "
                                                                        "ShortFTTrain.")],
            accept_all_inputs=True,  # so a workflow made for the old widgets gets a message naming what replaced them
        )

    @classmethod
    def validate_inputs(cls, shortcut: str, preset: str, model: Any = UNLINKED, **others: Any) -> bool | str:
        legacy = [k for k in LEGACY_WIDGETS if k in others]
        if legacy:
            return (f"this LoadShortcutModel comes from a workflow made for an older version (widgets "
                    f"{', '.join(legacy)}): it no longer loads a base itself; {REPLACEMENT}")
        if model is UNLINKED:
            return f"model: not connected; {REPLACEMENT}"
        if shortcut not in shortcut_options():
            roots = ", ".join(folder_paths.get_folder_paths("loras"))
            return (f"shortcut {shortcut!r} is not in ComfyUI's LoRA folders ({roots}); put the shortcut LoRA file "
                    "there and choose it by its name (or 'tiny', or 'none')")
        if preset != AUTO and preset not in SHORTCUT_PRESETS:
            return f"preset {preset!r} is unknown; choose one of: auto, {', '.join(sorted(SHORTCUT_PRESETS))}"
        try:
            path = shortcut_path(shortcut)
            if path is not None:
                lora_file(path, "shortcut")
        except (OSError, ValueError) as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, model: Any, clip: Any, vae: Any, shortcut: str, preset: str, **_: Any) -> io.NodeOutput:
        path = shortcut_path(shortcut)
        found = check_shortcut(model, shortcut, path, preset)
        wrapped = ComfyModel(model, clip, vae)
        if model.patches:
            log.warning("ShortFT: the MODEL carries %d patched weights (LoRAs or merges applied before): the set is "
                        "trained on top of them and is meant to be applied on top of them", len(model.patches))
        log.info("ShortFT: %s with shortcut %s (preset %s)", wrapped.source, path or NONE, found or preset)
        return io.NodeOutput(ShortcutModel(wrapped, path, found))


class ShortFTSample(io.ComfyNode):
    """Replaced by the stock sampling nodes; kept so that an old workflow names what to use instead."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ShortFT_Sample",
            display_name="ShortFTSample (replaced)",
            category=CATEGORY,
            description="Replaced: sample with the stock nodes instead (ApplyAlignedLoRA on the MODEL with the "
                        "trained set -> KSampler with sampler ddim, scheduler ddim_uniform -> VAE Decode).",
            is_deprecated=True,
            inputs=[SHORTFT_MODEL.Input("model", optional=True, tooltip="Not used: see the node's description.")],
            outputs=[io.Image.Output(display_name="images")],
            accept_all_inputs=True,
        )

    @classmethod
    def validate_inputs(cls, **_: Any) -> bool | str:
        return ("ShortFTSample is replaced by the stock nodes: ApplyAlignedLoRA (the MODEL and the trained "
                "lora_set) -> KSampler (sampler ddim, scheduler ddim_uniform, the set's CFG) -> VAE Decode; without "
                "a set, KSampler on the MODEL alone")

    @classmethod
    def execute(cls, **_: Any) -> io.NodeOutput:
        raise ValueError(cls.validate_inputs())


NODES = [LoadShortcutModel, ShortFTSample]
