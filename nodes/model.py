"""LoadShortcutModel: the base model the library trains (its own diffusers-backed copy), with its frozen shortcut
(Hyper-SD, PCM, TCD, our own), and ShortFTSample: images of such a model, with or without a LoRA set. The same bases
also sample as ComfyUI MODELs in the stock KSampler with ApplyAlignedLoRA (the tiny world through Load Tiny
World)."""

from __future__ import annotations

import logging

import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..shortft_core import (SHORTCUT_PRESETS, attach_shortcut, load_model, lora_file, outside_inference_mode,
                            prompt_lines, resolve_device, sample_aligned, tiny_shortcut_path)
from .common import CATEGORY, LORA_SET, SHORTFT_MODEL, TINY, base_options, base_path, device_options, to_comfy

log = logging.getLogger(__name__)

NONE = "none"
AUTO = "auto"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def shortcut_options() -> list[str]:
    return [TINY, NONE, *folder_paths.get_filename_list("loras")]


class LoadShortcutModel(io.ComfyNode):
    """A base model and its shortcut, loaded by the library (diffusers modules, outside ComfyUI's model cache)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ShortFT_LoadShortcutModel",
            display_name="LoadShortcutModel",
            category=CATEGORY,
            description="Load a base model (the embedded tiny world, an SD1.5/SDXL checkpoint or diffusers folder) "
                        "with its frozen few-step shortcut LoRA, for ShortFT training and sampling.",
            inputs=[
                io.Combo.Input("base", options=base_options(), default=TINY,
                               tooltip="The model to align: 'tiny' (the embedded tiny world, runs on a CPU), a "
                                       "single-file SD1.5/SDXL checkpoint from models/checkpoints, or a diffusers "
                                       "folder from models/diffusers."),
                io.Combo.Input("shortcut", options=shortcut_options(), default=TINY,
                               tooltip="The frozen few-step model ShortFT jumps with: 'tiny' (the tiny world's "
                                       "distilled shortcut), a Hyper-SD / PCM / TCD LoRA from models/loras, or "
                                       "'none' (baselines, or naive DDIM jumps)."),
                io.Combo.Input("preset", options=[AUTO, *sorted(SHORTCUT_PRESETS)], default=AUTO,
                               tooltip="How the shortcut was made (its grid, segments and CFG). 'auto' reads it from "
                                       "the file's metadata (our own shortcuts) or its published file name."),
                io.Combo.Input("device", options=device_options(), default=AUTO,
                               tooltip="Where the model runs: 'auto' is the GPU when there is one."),
                io.Combo.Input("dtype", options=[AUTO, *DTYPES], default=AUTO,
                               tooltip="Precision of the frozen base weights ('auto': bf16 on a GPU, fp32 on a "
                                       "CPU). Trained LoRAs are always kept in fp32."),
            ],
            outputs=[SHORTFT_MODEL.Output(display_name="model")],
        )

    @classmethod
    def validate_inputs(cls, base: str, shortcut: str, preset: str) -> bool | str:
        try:
            base_path(base)
            if shortcut not in (TINY, NONE):
                lora_file(folder_paths.get_full_path_or_raise("loras", shortcut), "shortcut")
            if preset != AUTO and preset not in SHORTCUT_PRESETS:
                return f"preset {preset!r} is unknown; choose one of: auto, {', '.join(sorted(SHORTCUT_PRESETS))}"
        except (OSError, ValueError) as e:
            return str(e)
        return True

    @classmethod
    @outside_inference_mode
    def execute(cls, base: str, shortcut: str, preset: str, device: str, dtype: str) -> io.NodeOutput:
        dev = resolve_device(device)
        dt = DTYPES[dtype] if dtype != AUTO else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
        model = load_model(base_path(base), dev, dt)
        if shortcut != NONE:
            path = tiny_shortcut_path() if shortcut == TINY else folder_paths.get_full_path_or_raise("loras", shortcut)
            found = attach_shortcut(model, path, preset=None if preset == AUTO else preset)
            log.info("ShortFT: %s loaded with shortcut %s (preset %s)", base, path, found.name if found else "none")
        return io.NodeOutput(model)


class ShortFTSample(io.ComfyNode):
    """Deterministic DDIM images of a SHORTFT_MODEL, optionally with a LoRA set switched per timestep."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ShortFT_Sample",
            display_name="ShortFTSample",
            category=CATEGORY,
            description="Sample a ShortFT model with deterministic DDIM (image i from noise seeded seed+i), with an "
                        "aligned LoRA set (segment j's LoRA at segment j's timesteps) or without one.",
            inputs=[
                SHORTFT_MODEL.Input("model", tooltip="The model from LoadShortcutModel (its shortcut is not used "
                                                     "for sampling)."),
                io.String.Input("prompts", multiline=True, default="a small red circle on the left on a white background",
                                tooltip="One prompt per line (blank lines and lines starting with # are skipped)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True,
                             tooltip="Noise seed of the first image; image i uses seed + i, so the same seed gives "
                                     "the same picture whatever the batch (before/after pairs match)."),
                io.Int.Input("steps", default=50, min=1, max=1000,
                             tooltip="DDIM steps on SD1.5's leading grid (50: 981, 961, ..., 1, as trained)."),
                io.Float.Input("guidance", default=0.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Classifier-free guidance scale; 0 uses the scale the LoRA set was trained "
                                       "for (else 3 on the tiny world, 7.5 on a real model); 1 disables CFG."),
                LORA_SET.Input("lora_set", optional=True,
                               tooltip="An aligned LoRA set (from ShortFTTrain or LoadLoRASet); without one the "
                                       "base model samples."),
            ],
            outputs=[io.Image.Output(display_name="images")],
        )

    @classmethod
    def validate_inputs(cls, prompts: str, guidance: float) -> bool | str:
        if not prompt_lines(prompts or ""):
            return "prompts: give at least one prompt (one per line)"
        if guidance != 0 and guidance < 1:
            return f"guidance {guidance}: use 0 (the set's own scale) or a scale >= 1 (1 disables CFG)"
        return True

    @classmethod
    @outside_inference_mode
    def execute(cls, model, prompts: str, seed: int, steps: int, guidance: float, lora_set=None) -> io.NodeOutput:
        lines = prompt_lines(prompts)
        bar = comfy.utils.ProgressBar(len(lines) * steps)
        done = [0]

        def tick(i, step, x) -> None:
            if step.calls_network:
                done[0] += 1
                bar.update_absolute(done[0])

        images = sample_aligned(model, lines, lora_set=lora_set, seed=seed, steps=steps,
                                guidance=guidance if guidance > 0 else None, callback=tick)
        return io.NodeOutput(to_comfy(images))


NODES = [LoadShortcutModel, ShortFTSample]
