"""ComfyUI reads our kohya exports: its stock LoRA key logic loads every key (no "lora key not loaded"), and its
patched SD1.5 UNet computes what our peft adapter computes.

ComfyUI is not a dependency of the project: these tests need a checkout (comfy_harness.find_comfyui: $COMFYUI_PATH,
else ../shared/comfyui beside the repository, else ~/comfy/ComfyUI) and an interpreter with ComfyUI's requirements
($SHORTFT_COMFY_PYTHON, else this interpreter when it holds them). The ComfyUI side runs in a subprocess that writes
nothing into the checkout; tensors go through safetensors files in a temporary folder. Nothing from ComfyUI is
copied into the project.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_harness import find_comfyui, requirements_skip_reason
from shortft_core import ldm_keys, lora_io
from shortft_core.families import bundled_config

pytestmark = pytest.mark.comfyui

# Runs inside ComfyUI's interpreter: argv = comfy_root, mode, args...
COMFY_SIDE = textwrap.dedent(r'''
    import json, logging, sys
    comfy_root, mode, *args = sys.argv[1:]
    sys.path.insert(0, comfy_root)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logging.getLogger().addHandler(Collect())
    logging.getLogger().setLevel(logging.INFO)
    try:
        import torch
        torch.set_num_threads(1)
        from safetensors.torch import load_file, save_file
        import comfy.lora, comfy.lora_convert, comfy.model_detection, comfy.utils, comfy.sd
    except Exception as e:  # this interpreter cannot run ComfyUI: let the test skip, naming why
        print(f"IMPORT_FAILED: {type(e).__name__}: {e}")
        sys.exit(3)

    if mode == "keys":  # ComfyUI's own key map for a UNet detected from ldm key shapes (meta tensors: no weights)
        results = {}
        for job in args[:-1]:
            shapes_file, lora_file = job.split(",")
            shapes = json.load(open(shapes_file))
            sd = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
            unet_config = comfy.model_detection.detect_unet_config(sd, "model.diffusion_model.")

            class StandIn(torch.nn.Module):  # what model_lora_keys_unet reads: state_dict() and model_config
                def __init__(self):
                    super().__init__()
                    self.model_config = type("Cfg", (), {"unet_config": unet_config})()

                def state_dict(self, *a, **k):
                    return {"diffusion_model." + k[len("model.diffusion_model."):]: v for k, v in sd.items()}

            messages.clear()
            key_map = comfy.lora.model_lora_keys_unet(StandIn(), {})
            lora = comfy.lora_convert.convert_lora(comfy.utils.load_torch_file(lora_file, safe_load=True))
            patches = comfy.lora.load_lora(lora, key_map)
            results[job] = {"messages": list(messages), "patched": sorted(patches)}
        json.dump(results, open(args[-1], "w"))
    else:  # full load: CheckpointLoaderSimple's loader + LoraLoader's load_lora_for_models, then one UNet call
        import comfy.model_management
        ckpt, lora_file, tensors, out = args
        model = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=False, output_clip=False)[0]
        patched, _ = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(lora_file, safe_load=True), 1.0, 0.0)
        inp = load_file(tensors)
        comfy.model_management.load_models_gpu([patched], force_full_load=True)
        unet = patched.model.diffusion_model
        dtype = next(unet.parameters()).dtype
        with torch.no_grad():
            y = unet(inp["x"].to(dtype), timesteps=inp["t"], context=inp["c"].to(dtype))
        save_file({"y": y.float().contiguous()}, out)
        json.dump({"messages": messages, "dtype": str(dtype), "patches": len(patched.patches)}, open(out + ".json", "w"))
''')


def comfy_setup() -> tuple[str, str]:
    """(ComfyUI checkout, interpreter), or a pytest skip naming what is missing."""
    root, where = find_comfyui()
    if root is None:
        pytest.skip(where)
    python = os.environ.get("SHORTFT_COMFY_PYTHON")
    if not python:
        reason = requirements_skip_reason(root)
        if reason is not None:
            pytest.skip(f"{reason} (or set SHORTFT_COMFY_PYTHON to a Python that holds them)")
        python = sys.executable
    return str(root), python


def run_comfy(tmp_path: Path, *args: str) -> None:
    root, python = comfy_setup()
    script = tmp_path / "comfy_side.py"
    script.write_text(COMFY_SIDE)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONDONTWRITEBYTECODE": "1"}
    r = subprocess.run([python, str(script), root, *args], capture_output=True, text=True, timeout=900, cwd=root,
                       env=env)
    if r.returncode == 3 and "IMPORT_FAILED" in r.stdout:
        pytest.skip(f"{python} cannot import ComfyUI from {root} ({r.stdout.strip()}); set SHORTFT_COMFY_PYTHON to a "
                    "Python with ComfyUI's requirements")
    assert r.returncode == 0, f"ComfyUI side failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


def not_loaded(messages: list[str]) -> list[str]:
    return [m for m in messages if "lora key not loaded" in m or "NOT LOADED" in m]


def all_layers_adapter(unet, name: str = "align", seed: int = 0, hetero: bool = True) -> dict:
    """A random adapter on every Linear/Conv2d of the UNet (so every kind of module name is exported)."""
    from peft import LoraConfig

    names = sorted(lora_io._base_layers(unet))
    cfg = LoraConfig(r=4, lora_alpha=4.0, target_modules=names, init_lora_weights=False,
                     alpha_pattern={"attn1.to_q": 2.0, "conv2": 8.0} if hetero else {},
                     rank_pattern={"ff.net.2": 2} if hetero else {})
    torch.manual_seed(seed)
    unet.add_adapter(cfg, adapter_name=name)
    return lora_io.adapter_modules(unet, name)


@pytest.fixture(scope="module")
def comfy_key_maps(tmp_path_factory):
    """ComfyUI's key-map verdict on our kohya export of an all-layers LoRA, for full-size SD1.5 and SDXL."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    comfy_setup()
    tmp = tmp_path_factory.mktemp("comfy_keys")
    jobs, want = [], {}
    for family in ("sd15", "sdxl"):
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(bundled_config(family, "unet"))
        ldm = ldm_keys.unet_state_dict_to_ldm(unet.state_dict(), unet.config)
        (tmp / f"{family}.json").write_text(json.dumps({ldm_keys.UNET_PREFIX + k: list(v.shape) for k, v in ldm.items()}))
        modules = {}
        g = torch.Generator().manual_seed(0)
        for name, layer in sorted(lora_io._base_layers(unet).items()):
            down, up = lora_io._expected_shapes(layer, 1)
            modules[name] = lora_io.LoraModule(torch.randn(down, generator=g), torch.randn(up, generator=g), 1.0)
        save_file(lora_io.kohya_state_dict(modules), str(tmp / f"{family}.safetensors"))
        jobs.append(f"{tmp / family}.json,{tmp / family}.safetensors")
        want[family] = (jobs[-1], {"diffusion_model." + ldm_keys.unet_name_to_ldm(n, unet.config) + ".weight"
                                   for n in modules})
    run_comfy(tmp, "keys", *jobs, str(tmp / "keys.json"))
    results = json.loads((tmp / "keys.json").read_text())
    return {family: (results[job], expected) for family, (job, expected) in want.items()}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_comfyui_key_map_takes_every_key_of_our_export(comfy_key_maps, family):
    """Full-size key maps (no weights): ComfyUI's model_lora_keys_unet + load_lora take every key of our kohya
    export of a LoRA on every Linear/Conv2d, each on the weight ComfyUI names it by."""
    result, expected = comfy_key_maps[family]
    assert not_loaded(result["messages"]) == []
    assert set(result["patched"]) == expected


@pytest.mark.slow
def test_comfyui_lora_loader_output_equals_ours(tmp_path, sd15_checkpoint):
    """Parity (c): a random SD1.5 ldm checkpoint + our kohya export in ComfyUI's stock loaders give the UNet
    output our peft adapter gives. Tolerance: max |diff| <= 1e-4 x max |output| (both fp32; measured ~1e-6)."""
    from shortft_core.loading import load_model

    comfy_setup()  # skip before loading anything when ComfyUI cannot run
    ckpt = sd15_checkpoint
    ours = load_model(ckpt, dtype=torch.float32)
    all_layers_adapter(ours.unet)
    lora_file = lora_io.export_lora(ours.unet, "align", tmp_path / "align.safetensors", family="sd15")
    ours.unet.delete_adapters("align")
    lora_io.load_lora_adapter(ours.unet, lora_file, "align")  # the fp16 values ComfyUI reads
    g = torch.Generator().manual_seed(1)
    inputs = {"x": torch.randn(1, 4, 8, 8, generator=g), "t": torch.tensor([500.0]),
              "c": torch.randn(1, 77, 768, generator=g)}
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    with torch.no_grad(), torch.inference_mode(False):
        prev = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            y_ours = ours.unet(inputs["x"], inputs["t"], encoder_hidden_states=inputs["c"]).sample
            ours.unet.disable_adapters()
            y_base = ours.unet(inputs["x"], inputs["t"], encoder_hidden_states=inputs["c"]).sample
        finally:
            torch.set_num_threads(prev)
    del ours
    run_comfy(tmp_path, "full", str(ckpt), str(lora_file), str(tmp_path / "inputs.safetensors"),
              str(tmp_path / "comfy_out.safetensors"))
    info = json.loads((tmp_path / "comfy_out.safetensors.json").read_text())
    assert not_loaded(info["messages"]) == [], info["messages"][:5]
    assert info["dtype"] == "torch.float32"
    y_comfy = load_file(str(tmp_path / "comfy_out.safetensors"))["y"]
    scale = y_ours.abs().max()
    err = ((y_comfy - y_ours).abs().max() / scale).item()
    print(f"ComfyUI vs ours: max |diff| / max |y| = {err:.2e}; LoRA effect {((y_ours - y_base).abs().max() / scale).item():.2e}")
    assert err <= 1e-4
    assert ((y_ours - y_base).abs().max() / scale).item() > 1e-2  # the LoRA changes the output
