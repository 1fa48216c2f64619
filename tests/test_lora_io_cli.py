"""``python -m shortft_core export``: layout conversion of a single LoRA file, checked against the base UNet."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from shortft_core import lora_io
from shortft_core.cli import main
from shortft_core.families import bundled_config

from test_lora_io import meta_unet, write_layout  # noqa: E402  (tests/ is on sys.path)


def test_export_cli_converts_kohya_sgm_to_diffusers_and_back(tmp_path):
    unet = meta_unet(bundled_config("sdxl", "unet"))
    names = {n for n in lora_io._base_layers(unet) if ".attentions.0.transformer_blocks.0." in n or "resnets.0" in n}
    g = torch.Generator().manual_seed(0)
    modules = {}
    for n in sorted(names):
        down, up = lora_io._expected_shapes(lora_io._base_layers(unet)[n], 2)
        modules[n] = lora_io.LoraModule(torch.randn(down, generator=g).half(), torch.randn(up, generator=g).half(), 1.5)
    sd, _ = write_layout(modules, "kohya_sgm", unet.config)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "in.safetensors"))
    assert main(["export", "--lora", str(tmp_path / "in.safetensors"), "--out", str(tmp_path / "d.safetensors"),
                 "--layout", "diffusers", "--base", "sdxl"]) == 0
    d = load_file(str(tmp_path / "d.safetensors"))
    assert set(d) == {f"unet.{n}.lora_{ab}.weight" for n in modules for ab in "AB"}
    # back to kohya (diffusers names, .alpha everywhere); the family now comes from the file's metadata
    assert main(["export", "--lora", str(tmp_path / "d.safetensors"), "--out", str(tmp_path / "k.safetensors")]) == 0
    k = load_file(str(tmp_path / "k.safetensors"))
    for n, m in modules.items():
        stem = "lora_unet_" + n.replace(".", "_")
        assert torch.equal(k[stem + ".lora_down.weight"], m.down) and torch.equal(k[stem + ".lora_up.weight"], m.up)
        assert k[stem + ".alpha"].item() == 1.5
    with pytest.raises(SystemExit, match="exists"):
        main(["export", "--lora", str(tmp_path / "d.safetensors"), "--out", str(tmp_path / "k.safetensors")])
    with pytest.raises(SystemExit, match="LoRA for SDXL but the model is SD1"):
        main(["export", "--lora", str(tmp_path / "d.safetensors"), "--out", str(tmp_path / "x.safetensors"),
              "--base", "sd15"])
    with pytest.raises(SystemExit, match="--base is required"):
        main(["export", "--lora", str(tmp_path / "in.safetensors"), "--out", str(tmp_path / "y.safetensors")])
