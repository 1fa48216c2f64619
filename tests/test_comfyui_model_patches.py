"""Tier 2: what other nodes attached to the MODEL, as training sees it, in a ComfyUI subprocess on the tiny world.

- ModelSamplingDiscrete's object patch (v-prediction, zero-terminal SNR) is the MODEL's noise schedule and prediction
  type, whichever clone of the shared network was loaded last; sampling types ShortFT cannot train (lcm, x0) are
  refused by name.
- What only ComfyUI's sampler runs (block patches such as FreeU's, attention replacements, CFG functions, wrappers
  such as ApplyAlignedLoRA's timestep-aware set) would not shape training: such a MODEL is refused, naming what it
  carries and where to connect instead; a set applied merged (weight patches) trains on top.
- A MODEL ComfyUI places only in part (``--novram``, emulated here by ComfyUI's own NO_VRAM load on the CPU) is
  refused instead of training silently where its weights happen to lie.
- How a node set the CLIP to encode (CLIP Set Last Layer, tokenizer options) is part of the model's identity, so a run
  folder is not continued or reused under other conditioning; hooks on the CLIP (Set CLIP Hooks) are refused.
"""

from __future__ import annotations

import math

import pytest

from comfy_process import script_in_comfyui

pytestmark = pytest.mark.comfyui

SCRIPT = r'''
import copy
import dataclasses
import json
import tempfile
import types

from pathlib import Path

import comfy.hooks
import comfy.model_management
import comfy.supported_models
from comfy_extras.nodes_freelunch import FreeU_V2
from comfy_extras.nodes_hooks import SetClipHooks
from nodes import CLIPSetLastLayer
from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

from shortft_pack.shortft_core import LoraSet, attach_shortcut, tiny_config, tiny_shortcut_path, tiny_weights_dir
from shortft_pack.shortft_core.adapters import LoraSetSpec, remove_adapters
from shortft_pack.shortft_core.lora_set import export_lora_set
from shortft_pack.shortft_core.prompts import PromptSource
from shortft_pack.shortft_core.sampling import initial_noise
from shortft_pack.shortft_core.testing.random_models import random_unet
from shortft_pack.shortft_core.tiny_world import load_tiny_rewards
from shortft_pack.shortft_core.trainer import Trainer

tiny, backend, model_node, apply, family = (pack_module(n) for n in ("tiny_world", "backend", "model", "apply",
                                                                     "family"))
res = {}


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def abar_of(patcher):
    sigmas = patcher.get_model_object("model_sampling").sigmas.double()
    return 1.0 / (1.0 + sigmas**2)


def error(call):
    try:
        call()
        return None
    except ValueError as e:
        return str(e)


with torch.inference_mode():  # as ComfyUI's nodes make them
    model, clip, vae = tiny.load_tiny_world()
    v_zsnr = ModelSamplingDiscrete().patch(model, "v_prediction", True)[0]

# a patched clone, before anything loaded it: the schedule and prediction are the patch's
cm = backend.ComfyModel(v_zsnr, clip, vae)
res["patched_prediction"] = cm.schedule.prediction_type
res["patched_abar"] = rel(cm.schedule.alphas_cumprod, abar_of(v_zsnr))
res["abar_last"] = [float(cm.schedule.alphas_cumprod[-1]), float(abar_of(model)[-1])]

# the noise prediction of the loaded patched clone, against the library's v -> eps conversion of the network's raw
# output (the UNet called directly at the variance-preserving latent and the integer timestep)
cm.prepare()
cond = cm.encode_prompts(["a red circle left of a blue square on a white background"])
x = torch.randn(1, *cm.latent_shape(), generator=torch.Generator().manual_seed(3))
errors = []
with torch.no_grad():
    for t in (999, 600, 50):
        eps = cm.eps(x, t, cond)
        v = cm.unet(x, timesteps=torch.tensor([float(t)]), context=cond.hidden)
        errors.append(rel(eps, cm.schedule.eps_from(v, x, t)))
res["eps_errors"] = errors

# the network computing in bf16 (as a GPU may; a compute-dtype patch forces it on the CPU) under zero terminal SNR:
# the chain's latents stay fp32, so the first jump keeps what the network predicted
with torch.inference_mode():
    low = ModelSamplingDiscrete().patch(model, "v_prediction", True)[0]
    low.set_model_compute_dtype(torch.bfloat16)
lm = backend.ComfyModel(low, clip, vae)
res["low_dtypes"] = [str(lm.dtype), str(lm.latent_dtype)]
lm.prepare()
low_cond = lm.encode_prompts(["a red circle left of a blue square on a white background"])
jump = {}
with torch.no_grad():
    for name, dtype in (("trained", lm.latent_dtype), ("bf16", torch.bfloat16)):
        x = initial_noise([5], lm.latent_shape(), lm.device, dtype)
        x_s = lm.schedule.step(x, lm.eps(x, 999, low_cond), 999, 749)
        # the same network output carried to the jump in float64: ComfyUI's x0 at the same input
        sigma = lm.sampling.sigmas[[999]].float()
        x_ve = x.float() * (1.0 + sigma**2).sqrt()
        x0 = lm.base.apply_model(x_ve, sigma, c_crossattn=low_cond.hidden).double()
        eps = (x_ve.double() - x0) / sigma.double()
        abar = lm.schedule.alphas_cumprod[749].item()
        jump[name] = rel(x_s.double(), abar**0.5 * x0 + (1 - abar) ** 0.5 * eps)
res["jump_errors"] = jump
# a training step through it: the batch's latents are fp32, the loss finite
preset = attach_shortcut(lm, tiny_shortcut_path())
cfg = tiny_config(iterations=1, batch_size=1, eval_count=0, rank=2)
cfg = dataclasses.replace(cfg, shortcut_guidance=cfg.method_entry.jump_guidance(cfg, preset.guidance))
tr = Trainer(lm, load_tiny_rewards()[0], cfg, PromptSource(["a red circle"]), shortcut_preset=preset)
res["batch_dtype"] = str(tr._batch()[1].dtype)
res["low_loss"] = tr.train_step()["loss"]
remove_adapters(lm.unet, list(lm.unet.peft_config))  # the network is the plain MODEL's too
del tr

# the plain MODEL while the patched clone is the one loaded (it shares the network): the plain schedule
plain = backend.ComfyModel(model, clip, vae)
res["plain_prediction"] = plain.schedule.prediction_type
res["plain_abar"] = rel(plain.schedule.alphas_cumprod, abar_of(model))
res["plain_abar_last"] = float(plain.schedule.alphas_cumprod[-1])
res["sources"] = [cm.source, plain.source]

with torch.inference_mode():
    for sampling in ("lcm", "x0"):
        patched = ModelSamplingDiscrete().patch(model, sampling, False)[0]
        res[f"error_{sampling}"] = error(lambda: model_node.LoadShortcutModel.execute(
            patched, clip, vae, shortcut="tiny", preset="auto"))

# what only the sampler runs is refused by name; weight patches are not
with tempfile.TemporaryDirectory() as folder:
    config = json.loads((tiny_weights_dir() / "pipeline" / "unet" / "config.json").read_text())
    unet = random_unet(config, seed=1)
    spec = LoraSetSpec(rank=2)
    spec.add_to(unet, seed=2)
    export_lora_set(unet, spec, folder, family="tiny")
    lset = LoraSet.open(folder)
    with torch.inference_mode():
        freeu = FreeU_V2.execute(model, b1=1.3, b2=1.4, s1=0.9, s2=0.2).result[0]
        cfg_function = model.clone()
        cfg_function.set_model_sampler_cfg_function(lambda args: args["cond"])
        aware = apply.ApplyAlignedLoRA.execute(model, lora_set=lset, mode="timestep-aware").result[0]
        merged = apply.ApplyAlignedLoRA.execute(model, lora_set=lset, mode="merged").result[0]
        for name, m in (("freeu", freeu), ("cfg_function", cfg_function), ("timestep_aware", aware)):
            res[f"error_{name}"] = error(lambda: model_node.LoadShortcutModel.execute(m, clip, vae, shortcut="tiny",
                                                                                      preset="auto"))
        res["merged_patches"] = len(merged.patches)
        res["merged_trains"] = error(lambda: model_node.LoadShortcutModel.execute(merged, clip, vae, shortcut="tiny",
                                                                                  preset="auto"))

# ComfyUI's NO_VRAM load (what --novram gives on a GPU) places the network in part: refused, nothing trains
comfy.model_management.unload_all_models()
is_cpu, state = comfy.model_management.is_device_cpu, comfy.model_management.vram_state
comfy.model_management.is_device_cpu = lambda device: False
comfy.model_management.vram_state = comfy.model_management.VRAMState.NO_VRAM
try:
    partial = backend.ComfyModel(model, clip, vae)
    res["error_novram"] = error(partial.prepare)
    res["novram_lowvram"] = bool(partial.base.model_lowvram)
finally:
    comfy.model_management.is_device_cpu, comfy.model_management.vram_state = is_cpu, state
comfy.model_management.unload_all_models()
full = backend.ComfyModel(model, clip, vae)
full.prepare()
res["full_lowvram"] = bool(full.base.model_lowvram)

# how a node set the CLIP to encode: another last layer is other conditioning, so another model for a run's identity
# (a run folder trained with one is not continued or reused with the other); hooks on the CLIP are refused
with torch.inference_mode():
    skip = CLIPSetLastLayer().set_last_layer(clip, -2)[0]
    padded = clip.clone()
    padded.set_tokenizer_option("clip_l_min_length", 77)
    hooked = SetClipHooks().apply_hooks(clip, schedule_clip=False, apply_to_conds=True,
                                        hooks=comfy.hooks.create_hook_lora({}, 1.0, 1.0))[0]
prompt = "a red circle left of a blue square on a white background"
skipped = backend.ComfyModel(model, skip, vae)
res["clip_sources"] = [full.source, skipped.source, backend.ComfyModel(model, padded, vae).source]
res["skip_cond_change"] = rel(skipped.encode_prompts([prompt]).hidden, full.encode_prompts([prompt]).hidden)
res["error_clip_hooks"] = error(lambda: model_node.LoadShortcutModel.execute(model, hooked, vae, shortcut="tiny",
                                                                             preset="auto"))
with tempfile.TemporaryDirectory() as folder:
    node, tiny_reward, widgets = tiny_train_node(Path(folder))
    with torch.inference_mode():
        for name, c in (("plain", clip), ("skip", skip)):
            loaded = model_node.LoadShortcutModel.execute(model, c, vae, shortcut="tiny", preset="auto").result[0]
            res[f"requeue_{name}"] = error(lambda: node.execute(loaded, tiny_reward, run_name="clip", **widgets))

# an inpainting checkpoint loads as its base family's config with 9 input channels: refused by name before anything
# loads (the same config with 4 channels is the trainable family)
def sd15_config(channels):
    """A MODEL as far as the family check reads it: SD1.5's model config with ``channels`` input channels."""
    config = comfy.supported_models.SD15({**comfy.supported_models.SD15.unet_config, "in_channels": channels})
    return types.SimpleNamespace(model=types.SimpleNamespace(model_config=config))


for channels in (4, 9):
    res[f"family_{channels}"] = error(lambda: family.trainable_family(sd15_config(channels))) or \
        family.trainable_family(sd15_config(channels))
res["node_9"] = error(lambda: model_node.LoadShortcutModel.execute(sd15_config(9), clip, vae, shortcut="none",
                                                                   preset="auto"))

# a VAE of another family (FLUX's 16 latent channels) or a video VAE: refused before anything loads
for name, changes in (("flux", {"latent_channels": 16}), ("video", {"latent_dim": 3})):
    other = copy.copy(vae)
    vars(other).update(changes)
    res[f"error_vae_{name}"] = error(lambda: model_node.LoadShortcutModel.execute(model, clip, other, shortcut="tiny",
                                                                                  preset="auto"))
print("RESULT " + json.dumps(res))
'''


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    return script_in_comfyui(tmp_path_factory, "model_patches", SCRIPT)


def test_model_sampling_patches_are_the_schedule_training_uses(measured):
    assert measured["patched_prediction"] == "v_prediction"
    assert measured["patched_abar"] < 1e-12
    zsnr_last, plain_last = measured["abar_last"]
    assert zsnr_last < 1e-6 and plain_last > 1e-3  # zero terminal SNR: the last level is (almost) pure noise
    assert max(measured["eps_errors"]) < 1e-4, measured["eps_errors"]
    patched, plain = measured["sources"]  # another schedule: another run (its checkpoints are not resumed)
    assert "v_prediction sampling" in patched and "sampling" not in plain
    assert patched.split(", v_prediction")[0] == plain.removesuffix(")")


def test_the_chains_latents_stay_fp32_under_a_low_precision_network(measured):
    """bf16 network, zero terminal SNR: the first jump through fp32 latents lies within float rounding of the same
    network output carried in float64; bf16 latents would move it by far more (the error this guards against)."""
    assert measured["low_dtypes"] == ["torch.bfloat16", "torch.float32"]
    assert measured["batch_dtype"] == "torch.float32"
    assert math.isfinite(measured["low_loss"])
    assert measured["jump_errors"]["trained"] < 1e-3, measured["jump_errors"]  # fp32 rounding, magnified 4500x
    assert measured["jump_errors"]["bf16"] > 1e-2, measured["jump_errors"]


def test_the_plain_model_keeps_its_schedule_while_a_patched_clone_is_loaded(measured):
    assert measured["plain_prediction"] == "epsilon"
    assert measured["plain_abar"] < 1e-12
    assert measured["plain_abar_last"] == pytest.approx(measured["abar_last"][1])  # not zero terminal SNR


def test_sampling_types_shortft_cannot_train_are_refused_by_name(measured):
    for sampling in ("lcm", "x0"):
        message = measured[f"error_{sampling}"]
        assert message is not None and "neither eps nor v" in message and "ModelSamplingDiscrete" in message, message


def test_what_only_the_sampler_runs_is_refused_naming_it_and_the_fix(measured):
    expected = {"freeu": "output_block_patch (e.g. FreeU)", "cfg_function": "a CFG function",
                "timestep_aware": "ApplyAlignedLoRA's timestep-aware set"}
    for name, named in expected.items():
        message = measured[f"error_{name}"]
        assert message is not None, f"a MODEL with {named} was taken for training"
        assert named in message and "before the nodes that add them" in message, message
    assert "'merged'" in measured["error_timestep_aware"]


def test_a_set_applied_merged_trains_on_top(measured):
    assert measured["merged_patches"] > 0
    assert measured["merged_trains"] is None


def test_a_model_placed_in_part_is_refused(measured):
    assert measured["novram_lowvram"], "the emulated NO_VRAM load placed the whole network"
    message = measured["error_novram"]
    assert message is not None and "only part of the MODEL" in message and "--novram" in message, message
    assert not measured["full_lowvram"]


def test_how_the_clip_encodes_is_part_of_the_models_identity(measured):
    plain, skipped, padded = measured["clip_sources"]
    assert "clip layer" not in plain and "tokenizer" not in plain  # a plain CLIP keeps the identity runs have
    assert skipped == plain.removesuffix(")") + ", clip layer -2)"
    assert padded.startswith(plain.removesuffix(")") + ", tokenizer ") and "clip_l_min_length" in padded
    assert measured["skip_cond_change"] > 1e-3  # the layer is the conditioning training sees
    assert measured["requeue_plain"] is None
    message = measured["requeue_skip"]  # the same run folder, another last layer: not the old run continued
    assert message is not None and "other settings (model" in message, message


def test_hooks_on_the_clip_are_refused(measured):
    message = measured["error_clip_hooks"]
    assert message is not None and "Set CLIP Hooks" in message and "Load LoRA" in message, message


def test_an_inpainting_model_is_refused_by_name(measured):
    message = measured["family_9"]
    assert "sd15 inpainting model" in message and "9 input channels" in message, message
    assert measured["node_9"] == message  # LoadShortcutModel refuses it first, before anything loads
    assert measured["family_4"] == "sd15"


def test_a_vae_of_other_latents_is_refused_by_name(measured):
    assert "16-channel image latents, the tiny MODEL makes 4-channel" in measured["error_vae_flux"], \
        measured["error_vae_flux"]
    assert "4-channel video latents" in measured["error_vae_video"], measured["error_vae_video"]
    assert "VAE of the same checkpoint" in measured["error_vae_flux"]
