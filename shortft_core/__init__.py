"""ShortFT core library: shortcut-based reward fine-tuning of text-to-image diffusion models.

The names below are the public surface that hosts (the command line, the ComfyUI nodes) and Python users import:

    from shortft_core import TrainRequest, tiny_config, train

    result = train(TrainRequest(out="runs/api", config=tiny_config()))

They load on first use, so ``import shortft_core`` itself stays cheap (no torch, diffusers or transformers import).
This package never imports ComfyUI; the ComfyUI nodes in ``nodes/`` are thin wrappers around it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    # sessions: what every host calls
    "TrainRequest": "session", "TrainResult": "session", "TrainingSession": "session", "train": "session",
    "DistillRequest": "session", "DistillResult": "session", "DistillSession": "session", "distill": "session",
    "reward_label": "session",
    "Callback": "loop", "StopRequested": "loop",
    # settings
    "TrainConfig": "config", "tiny_config": "config", "resolve_config": "config", "check_settings": "config",
    "TRAIN_PRESETS": "config", "TINY_PRESET": "config",
    "DistillConfig": "distillation",
    "METHODS": "methods",
    # models and shortcuts
    "DiffusionModel": "models", "Conditioning": "models", "T2IModel": "models", "PRECISION": "models",
    "tiled_tokens": "models",
    "resolve_device": "models", "NoiseSchedule": "schedule",
    "load_model": "loading", "load_tiny_model": "loading",
    "bundled_config": "families", "diffusers_module_order": "families",
    "SHORTCUT_PRESETS": "shortcut", "attach_shortcut": "shortcut", "find_shortcut_preset": "shortcut",
    "tiny_shortcut_path": "tiny_world", "tiny_weights_dir": "tiny_world",
    # LoRA sets and files
    "LoraSet": "lora_set", "sample_aligned": "lora_set", "find_lora_sets": "lora_set", "lora_set_folder": "lora_set",
    "Segments": "segments",
    "lora_file": "lora_io", "lora_metadata": "lora_io", "LoadedLora": "lora_io", "LoraModule": "lora_io",
    "load_lora_modules": "lora_io", "lora_base_family": "lora_io",
    # rewards
    "build_reward_spec": "rewards.registry", "check_reward_spec": "rewards.registry",
    "reward_descriptions": "rewards.registry",
    # prompts, and running library code from a host's worker thread
    "prompt_lines": "prompts", "read_prompt_file": "prompts", "PromptSource": "prompts",
    "outside_inference_mode": "lifecycle",
    # memory: blocks recomputed in backward instead of keeping their activations, layers that keep less for it
    "checkpoint_blocks": "memory", "lean_frozen_convs": "memory", "lean_geglu": "memory", "lean_norm_act": "memory",
    "layer_norm_saving_output": "memory", "LEAN_DEVICES": "memory",
}
# names a module defines under another name
_RENAMED = {"SHORTCUT_PRESETS": "PRESETS", "tiny_weights_dir": "weights_dir", "find_shortcut_preset": "find_preset",
            "LEAN_DEVICES": "DEFAULT_DEVICES"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'shortft_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), _RENAMED.get(name, name))
    globals()[name] = value  # the next lookup is a plain one
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
