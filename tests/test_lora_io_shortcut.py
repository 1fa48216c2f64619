"""Shortcut presets (Hyper-SD / PCM / TCD) and loading a published shortcut file as the frozen adapter."""

from __future__ import annotations

import pytest

from shortft_core import lora_io, shortcut
from shortft_core.lora_io import LoraFormatError
from shortft_core.testing.random_models import random_unet
from shortft_core.schedule import FINAL, SD15_SCHEDULER_CONFIG

from test_lora_io import random_lora, small_unet_config, write_layout  # noqa: E402  (tests/ is on sys.path)


def test_preset_grids_match_the_diffusers_schedulers_the_model_cards_use():
    from diffusers import DDIMScheduler, TCDScheduler

    ddim = DDIMScheduler.from_config({**SD15_SCHEDULER_CONFIG, "timestep_spacing": "trailing"})
    tcd = TCDScheduler.from_config(SD15_SCHEDULER_CONFIG)
    for preset in shortcut.PRESETS.values():
        sched = tcd if preset.sampler == "tcd" else ddim
        sched.set_timesteps(len(preset.timesteps))
        assert list(preset.timesteps) == sched.timesteps.tolist(), preset.name


def test_paper_jumps_lie_inside_hyper_sd_segments():
    p = shortcut.get_preset(shortcut.DEFAULT_PRESET)
    assert p.timesteps == (999, 749, 499, 249) and p.guidance == 1.0 and p.sampler == "ddim"
    assert p.segments() == [(999, 749), (749, 499), (499, 249), (249, FINAL)]
    for jump in [(741, 501), (481, 261), (241, FINAL), (999, 749)]:
        assert p.covers(*jump)
        p.check_jump(*jump)
    for jump in [(761, 501), (999, 249), (501, 741), (249, 249)]:
        assert not p.covers(*jump)
    with pytest.raises(ValueError, match="leaves the trained segments"):
        p.check_jump(761, 501)
    assert shortcut.get_preset("tcd-sd15").covers(999, FINAL)  # TCD: any jump
    with pytest.raises(ValueError, match="hyper-sd15-4step"):
        shortcut.get_preset("hyper-sd15-5step")


@pytest.mark.parametrize("filename,name", [
    ("Hyper-SD15-4steps-lora.safetensors", "hyper-sd15-4step"),
    ("Hyper-SD15-1step-lora.safetensors", "hyper-sd15-1step"),
    ("Hyper-SDXL-8steps-CFG-lora.safetensors", "hyper-sdxl-8step-cfg"),
    ("Hyper-SDXL-8steps-lora.safetensors", "hyper-sdxl-8step"),
    ("Hyper-SD15-12steps-CFG-lora.safetensors", "hyper-sd15-12step-cfg"),
    ("pcm_sd15_smallcfg_4step_converted.safetensors", "pcm-sd15-smallcfg-4step"),
    ("pcm_sdxl_normalcfg_16step_converted.safetensors", "pcm-sdxl-normalcfg-16step"),
    ("TCD-SDXL-LoRA.safetensors", "tcd-sdxl"),
    ("pytorch_lora_weights.safetensors", None),
])
def test_preset_from_published_file_names(filename, name):
    found = shortcut.preset_for_file(filename)
    assert (found.name if found else None) == name


def test_load_shortcut_frozen_with_preset_from_file_name(tmp_path):
    from safetensors.torch import save_file

    unet = random_unet(small_unet_config("sd15"), seed=2)
    sd, _ = write_layout(random_lora(unet, seed=7), "kohya", unet.config)
    path = tmp_path / "Hyper-SD15-4steps-lora.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    loaded, preset = shortcut.load_shortcut(unet, path, family="sd15")
    assert preset.name == "hyper-sd15-4step" and loaded.adapter_name == "shortcut"
    assert loaded.modules and not any(p.requires_grad for n, p in unet.named_parameters() if ".shortcut." in n)
    assert lora_io._active(unet) == []  # loaded inactive: the chain switches it on for shortcut jumps
    unet.delete_adapters("shortcut")
    with pytest.raises(LoraFormatError, match="is for sdxl but the model is sd15"):
        shortcut.load_shortcut(unet, path, preset="hyper-sdxl-4step", family="sd15")
    assert "shortcut" not in lora_io._adapter_names(unet)
