"""Tier 2: a rectified-flow MODEL (ModelSamplingSD3, as SD1.5 and SDXL flow fine-tunes are sampled in ComfyUI) on the
chain, in a ComfyUI subprocess on the tiny world.

The chain steps a flow model on the variance-preserving levels of the same signal-to-noise ratio, where a DDIM step
is the flow's Euler step; at the top level (f = 1, pure noise) the MODEL's own x0 is taken. So the library's chain
samples what ComfyUI's euler sampler samples on the same levels, a training step's gradient flows from the first
level on, and ApplyAlignedLoRA finds each level's segment on the flow table (whose network timestep is not the level).
"""

from __future__ import annotations

import pytest

from comfy_process import SAMPLING_HELPERS, script_in_comfyui

pytestmark = pytest.mark.comfyui

SCRIPT = SAMPLING_HELPERS + r'''
import dataclasses
import json
import tempfile
from pathlib import Path

import comfy.model_sampling
import folder_paths
from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow, ModelSamplingFlux, ModelSamplingSD3

from shortft_pack.shortft_core import SHORTCUT_PRESETS, LoraSet, tiny_shortcut_path
from shortft_pack.shortft_core.chain import run_plan
from shortft_pack.shortft_core.config import TrainConfig
from shortft_pack.shortft_core.lifecycle import ModelState
from shortft_pack.shortft_core.plans import TUNED, ChainPlan, Step, base_chain
from shortft_pack.shortft_core.schedule import FINAL
from shortft_pack.shortft_core.prompts import PromptSource
from shortft_pack.shortft_core.tiny_world import load_tiny_rewards
from shortft_pack.shortft_core.trainer import Trainer

tiny, backend, apply, model_node, common = (pack_module(n) for n in ("tiny_world", "backend", "apply", "model",
                                                                       "common"))
res = {}


with torch.inference_mode():  # as ComfyUI's nodes make them
    model, clip, vae = tiny.load_tiny_world()
    flow = ModelSamplingSD3().patch(model, 3.0)[0]
cm = backend.ComfyModel(flow, clip, vae)
plain = backend.ComfyModel(model, clip, vae)
sched, table = cm.schedule, cm.sampling.sigmas.double()
res["prediction"] = sched.prediction_type
res["ends"] = [float(sched.abar(999)), float(sched.abar(-1)), float(table[-1])]
res["source_differs"] = cm.source != plain.source and "flow sampling" in cm.source
res["level_index"] = [bool(torch.equal(common.level_index(s, s.sigmas).long(), torch.arange(1000)))
                      for s in (cm.sampling, plain.sampling)]
cm.prepare()

prompt, guidance, grid = "a red circle left of a blue square on a white background", 3.0, [999, 749, 499, 249]
noise = torch.randn((1, *cm.latent_shape()), generator=torch.Generator().manual_seed(3))
cond, uncond = cm.encode_prompts([prompt]), cm.encode_prompts([""])


def comfy_euler(patcher):
    """ComfyUI's euler sampler over the chain's levels, then to 0, from the same noise (a LATENT, as
    process_latent_out gives it)."""
    return euler_on(patcher, clip, noise, [float(table[t]) for t in grid] + [0.0], guidance, prompt)


with torch.no_grad():
    ours = run_plan(cm, base_chain(grid, guidance), noise, cond, uncond, None)[-1]
res["base_vs_euler"] = rel(cm.base.process_latent_out(ours), comfy_euler(flow))
# ModelSamplingAuraFlow: the same table shape, the network's timestep the level itself (multiplier 1)
with torch.inference_mode():
    aura = ModelSamplingAuraFlow().patch_aura(model, 1.73)[0]
aura_cm = backend.ComfyModel(aura, clip, vae)
aura_cm.prepare()
table = aura_cm.sampling.sigmas.double()
with torch.no_grad():
    ours = run_plan(aura_cm, base_chain(grid, guidance), noise, cond, uncond, None)[-1]
res["aura"] = [aura_cm.schedule.prediction_type, rel(aura_cm.base.process_latent_out(ours), comfy_euler(aura)),
               bool(torch.equal(common.level_index(aura_cm.sampling, aura_cm.sampling.sigmas).long(),
                                torch.arange(1000)))]
cm.prepare()  # the shift-3 MODEL loaded again for what follows
table = cm.sampling.sigmas.double()

# one training step from the first level (x0 taken there), then the trained set sampled both ways
state = ModelState.capture(cm)
cfg = TrainConfig(iterations=1, batch_size=2, rank=4, eval_count=0, shortcut_net="base", guidance=guidance)
tr = Trainer(cm, load_tiny_rewards()[0], cfg, PromptSource([prompt, "a big blue square on a white background"]))
metrics = tr.train_step()
res["first_step"] = [tr.last_plan.steps[0].t, sorted({a for s in tr.last_plan.steps if s.grad for a in s.adapters})]
res["loss_finite"] = bool(torch.isfinite(torch.tensor(metrics["loss"])))
res["grads"] = lora_b_grads(cm.unet)
# one jump from the level of pure noise to the end with the first LoRA on: the result is the MODEL's x0 there, and
# so is all the gradient
cm.unet.zero_grad(set_to_none=True)
jump = ChainPlan("jump", (Step(999, FINAL, TUNED, (tr.lora.names[0],), 1.0, grad=True, readout="x"),))
run_plan(cm, jump, noise, cond, None, tr.switch)[-1].square().mean().backward()
top = [p.grad for n, p in cm.unet.named_parameters() if ".lora_B." + tr.lora.names[0] + "." in n]
res["top_grads"] = [len(top), sum(g is not None and bool(torch.isfinite(g).all()) and float(g.abs().sum()) > 0
                                  for g in top)]
aligned, folder = sampled_and_saved_set(tr, state, guidance, grid, noise, cond, uncond)
del tr
with torch.inference_mode():
    applied = apply.timestep_aware(flow, LoraSet.open(folder), 1.0)
comfy_aligned = comfy_euler(applied)
res["set_vs_euler"] = rel(cm.base.process_latent_out(aligned), comfy_aligned)
res["set_effect"] = rel(comfy_aligned, comfy_euler(flow))

# a published shortcut preset was distilled on the eps model's trajectory: refused for a flow MODEL
found = dataclasses.replace(SHORTCUT_PRESETS["hyper-sd15-4step"], base="tiny")
known, model_node.find_shortcut_preset = model_node.find_shortcut_preset, lambda path, name: found
try:
    model_node.check_shortcut(flow, "tiny", Path(tiny_shortcut_path()), "auto")
    res["preset_on_flow"] = None
except ValueError as e:
    res["preset_on_flow"] = str(e)
res["preset_on_eps"] = model_node.check_shortcut(model, "tiny", Path(tiny_shortcut_path()), "auto")
model_node.find_shortcut_preset = known
# the nodes: LoadShortcutModel and a short ShortFTTrain run on the flow MODEL
node, tiny_reward, widgets = tiny_train_node(Path(tempfile.mkdtemp()))
with torch.inference_mode():
    shortcut_model = model_node.LoadShortcutModel.execute(flow, clip, vae, shortcut="tiny", preset="auto").result[0]
    output = node.execute(shortcut_model, tiny_reward, run_name="flow", **widgets)
lora_set, loss = output.result[0], output.result[1]
res["node_run"] = [len(lora_set.schedule), len(loss["loss"]), bool(torch.isfinite(torch.tensor(loss["loss"])).all()),
                   lora_set.family]
# shortcut 'none': ShortFT jumps with the MODEL's own DDIM steps
with torch.inference_mode():
    no_shortcut = model_node.LoadShortcutModel.execute(flow, clip, vae, shortcut="none", preset="auto").result[0]
    output = node.execute(no_shortcut, tiny_reward, run_name="flow_none", **widgets)
run = json.loads((Path(folder_paths.get_output_directory()) / "shortft" / "flow_none" / "run.json").read_text())
res["node_none"] = [len(output.result[0].schedule), run.get("status"),
                    run.get("settings", {}).get("config", {}).get("shortcut_net"), run.get("settings", {}).get("shortcut")]

# FLUX's flow sampling has a table of 10000 levels: the chain steps on every tenth, its top level the table's
with torch.inference_mode():
    flux_sampled = ModelSamplingFlux().patch(model, 1.15, 0.5, 32, 32)[0]
flux_cm = backend.ComfyModel(flux_sampled, clip, vae)
flux_cm.prepare()
table = common.chain_sigmas(flux_cm.sampling).double()
with torch.no_grad():
    ours = run_plan(flux_cm, base_chain(grid, guidance), noise, cond, uncond, None)[-1]
res["flux_sampling"] = [flux_cm.schedule.prediction_type, int(flux_cm.sampling.sigmas.shape[0]), float(table[-1]),
                        rel(flux_cm.base.process_latent_out(ours), comfy_euler(flux_sampled)),
                        bool(torch.equal(common.level_index(flux_cm.sampling, flux_cm.sampling.sigmas[9::10]).long(),
                                         torch.arange(1000)))]
# a flow table whose size is no whole multiple of the chain's 1000 levels
with torch.inference_mode():
    odd = ModelSamplingFlux().patch(model, 1.15, 0.5, 32, 32)[0]
    odd_sampling = odd.get_model_object("model_sampling")
    odd_sampling.set_parameters(shift=odd_sampling.shift, timesteps=1500)
try:
    backend.ComfyModel(odd, clip, vae)
    res["odd_table"] = None
except ValueError as e:
    res["odd_table"] = str(e)
# a flow sampling that is not plain rectified flow (ComfyUI's img-to-img flow returns the output as x0)
class ImageFlow(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.IMG_TO_IMG_FLOW):
    pass


with torch.inference_mode():
    image_flow = model.clone()
    image_flow.add_object_patch("model_sampling", ImageFlow(model.model.model_config))
try:
    backend.ComfyModel(image_flow, clip, vae)
    res["image_flow_sampling"] = None
except ValueError as e:
    res["image_flow_sampling"] = str(e)
print("RESULT " + json.dumps(res))
'''


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    return script_in_comfyui(tmp_path_factory, "flow", SCRIPT)


def test_a_flow_model_has_flow_levels_and_is_another_model(measured):
    assert measured["prediction"] == "flow"
    assert measured["ends"] == [0.0, 1.0, 1.0]  # pure noise at the top, the clean sample at the end
    assert measured["source_differs"]  # another run than the same checkpoint sampled by eps
    assert measured["level_index"] == [True, True]  # every level of either table is its own timestep


def test_the_chain_samples_what_comfyuis_euler_samples(measured):
    assert measured["base_vs_euler"] < 1e-5, measured["base_vs_euler"]
    kind, error, levels = measured["aura"]  # ModelSamplingAuraFlow too
    assert kind == "flow" and error < 1e-5 and levels, measured["aura"]


def test_a_training_step_reaches_every_lora_and_a_jump_from_pure_noise_trains_through_x0(measured):
    first, trained = measured["first_step"]
    assert measured["loss_finite"] and trained, measured["first_step"]
    for adapter in trained:
        total, ok = measured["grads"][adapter]
        assert total > 0 and ok == total, (adapter, total, ok)
    # from the level of pure noise eps is the latent itself: the jump's gradient comes through the MODEL's x0 alone
    total, ok = measured["top_grads"]
    assert total > 0 and ok == total, measured["top_grads"]


def test_apply_aligned_lora_finds_the_segments_on_the_flow_table(measured):
    assert measured["set_effect"] > 1e-3  # the set changes the sample
    assert measured["set_vs_euler"] < 1e-5, measured["set_vs_euler"]


def test_a_published_shortcut_preset_is_refused_for_a_flow_model(measured):
    message = measured["preset_on_flow"]
    assert message is not None and "rectified flow" in message and "shortcut 'none'" in message, message
    assert "jumps with the MODEL's own DDIM steps" in message, message
    assert measured["preset_on_eps"] == "hyper-sd15-4step"


def test_fluxs_flow_sampling_steps_on_every_tenth_of_its_levels(measured):
    kind, size, top, error, levels = measured["flux_sampling"]
    assert kind == "flow" and size == 10000 and top == 1.0 and levels, measured["flux_sampling"]
    assert error < 1e-5, error  # the chain against ComfyUI's euler on the same levels


def test_shortfttrain_trains_a_flow_model(measured):
    segments, losses, finite, family = measured["node_run"]
    assert segments > 0 and losses == 1 and finite and family == "tiny", measured["node_run"]


def test_shortcut_none_trains_shortft_with_the_models_own_jumps(measured):
    segments, status, shortcut_net, shortcut = measured["node_none"]
    assert segments > 0 and status == "finished", measured["node_none"]
    assert shortcut_net == "base" and shortcut is None, measured["node_none"]


def test_a_flow_table_off_the_chains_levels_is_refused(measured):
    message = measured["odd_table"]
    assert message is not None and "has 1500 levels" in message and "1000 levels" in message, message


def test_a_flow_sampling_other_than_plain_rectified_flow_is_refused(measured):
    message = measured["image_flow_sampling"]
    assert message is not None and "not plain rectified flow" in message, message
    assert "ModelSamplingDiscreteFlow" in message and "ModelSamplingFlux" in message, message
