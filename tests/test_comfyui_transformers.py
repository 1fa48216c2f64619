"""Tier 2: transformer MODELs trained through the ComfyUI backend, in a ComfyUI subprocess per family: SD3 / SD3.5
(ComfyUI's MMDiT, rectified flow on 1000 levels) and FLUX.1 dev (rectified flow on 10000 levels, the guidance
embedding), both on 16-channel latents.

Each MODEL is a small network with random weights that ComfyUI's own loader detects as its family, the CLIP is the
tiny world's (its width is the network's text and pooled input), the VAE a small 16-channel one. The chain samples
what ComfyUI's euler samples; a training step reaches every LoRA on the network's attention and MLP layers; the set's
files load by ComfyUI's key map and ApplyAlignedLoRA samples what the chain samples with the set; a diffusers-layout
LoRA (separate q, k, v on a fused layer) loads as one adapter with ComfyUI's own patch's output; ShortFTTrain trains
the MODEL, and refuses what does not fit it.
"""

from __future__ import annotations

import pytest

from comfy_process import SAMPLING_HELPERS, TRANSFORMER_WORLD, script_in_comfyui

pytestmark = pytest.mark.comfyui

SCRIPT = SAMPLING_HELPERS + TRANSFORMER_WORLD + r'''
import json
import tempfile
from pathlib import Path

import folder_paths
from safetensors.torch import load_file, save_file

from shortft_pack.shortft_core import LoraSet, tiny_shortcut_path
from shortft_pack.shortft_core.adapters import remove_adapters
from shortft_pack.shortft_core.chain import run_plan
from shortft_pack.shortft_core.config import TrainConfig
from shortft_pack.shortft_core.lifecycle import ModelState
from shortft_pack.shortft_core.plans import base_chain
from shortft_pack.shortft_core.prompts import PromptSource
from shortft_pack.shortft_core.tiny_world import load_tiny_rewards
from shortft_pack.shortft_core.trainer import Trainer

tiny, backend, apply, model_node, family, common = (pack_module(n) for n in ("tiny_world", "backend", "apply",
                                                                               "model", "family", "common"))
res = {}
SIZE = 32
with torch.inference_mode():
    _, clip, _ = tiny.load_tiny_world()
model, vae = transformer_world(FAMILY, clip)
res["family"] = [type(model.model).__name__, family.model_family(model), family.trainable_family(model)]

cm = backend.ComfyModel(model, clip, vae)
sampling = cm.sampling
res["seam"] = [cm.schedule.prediction_type, cm.native_size, cm.lora_names is None, list(cm.lora_targets),
               int(sampling.sigmas.shape[0]), float(cm.schedule.abar(999)), cm.distilled_guidance]
# the chain's levels on the table: each its own level for ApplyAlignedLoRA, the top one pure noise
levels = common.chain_levels(sampling)
res["levels"] = [bool(torch.equal(common.level_index(sampling, sampling.sigmas[levels]).long(), torch.arange(1000))),
                 float(sampling.sigmas[levels[-1]])]
cm.prepare(size=(SIZE, SIZE))
table = common.chain_sigmas(sampling).double()

prompt, guidance, grid = "a red circle left of a blue square on a white background", 3.0, [999, 749, 499, 249]
noise = torch.randn((1, *cm.latent_shape(SIZE, SIZE)), generator=torch.Generator().manual_seed(3))
cond, uncond = cm.encode_prompts([prompt], size=(SIZE, SIZE)), cm.encode_prompts([""], size=(SIZE, SIZE))


def comfy_euler(patcher):
    """ComfyUI's euler sampler over the chain's levels, then to 0, from the same noise (a LATENT)."""
    return euler_on(patcher, clip, noise, [float(table[t]) for t in grid] + [0.0], guidance, prompt)


with torch.no_grad():
    ours = run_plan(cm, base_chain(grid, guidance), noise, cond, uncond, None)[-1]
res["base_vs_euler"] = rel(cm.base.process_latent_out(ours), comfy_euler(model))
cm.prepare(size=(SIZE, SIZE))

# one training step: the set's LoRAs on the network's layers, every one reached by the reward's gradient
state = ModelState.capture(cm)
cfg = TrainConfig(iterations=1, batch_size=2, rank=4, eval_count=0, shortcut_net="base", guidance=guidance,
                  image_size=SIZE)
tr = Trainer(cm, load_tiny_rewards()[0], cfg, PromptSource([prompt, "a big blue square on a white background"]))
adapted = sorted({n.split(".lora_A.")[0] for n, _ in cm.unet.named_parameters() if ".lora_A." in n})
res["adapted"] = sorted({p.split(".", 2)[2] for p in adapted})  # block kind and index dropped
metrics = tr.train_step()
res["loss_finite"] = bool(torch.isfinite(torch.tensor(metrics["loss"])))
res["grads"] = [sorted({a for s in tr.last_plan.steps if s.grad for a in s.adapters}), lora_b_grads(cm.unet)]
aligned, folder = sampled_and_saved_set(tr, state, guidance, grid, noise, cond, uncond)
del tr
res["restored_adapters"] = sum(".lora_" in n for n, _ in cm.unet.named_parameters())

# block checkpointing: a checkpointed call's recomputation keeps each joint / double / single block's input, and the
# block runs again as backward reaches it (on copies of its input streams, which it adds to in place), with the
# adapters and ComfyUI's training switch of its forward
import dataclasses
import shortft_pack.shortft_core.chain as chain_module
from shortft_pack.shortft_core.adapters import AdapterSwitch, LoraSetSpec
from shortft_pack.shortft_core.plans import original_chain
from shortft_pack.shortft_core.testing.profiling import LivePeak

state = ModelState.capture(cm)
spec = LoraSetSpec(rank=4, targets=tuple(cm.lora_targets))
cm.unet.requires_grad_(False)
cm.enable_lean_activations()  # as the trainer does: FLUX's norms keep their output, not the stream added to after
spec.add_to(cm.unet, seed=0, order=cm.adapter_order)
with torch.no_grad():
    for n, p in cm.unet.named_parameters():
        if ".lora_" in n:
            p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(n)))
switch = AdapterSwitch(cm.unet)
every_step = original_chain(spec, guidance, grid)


def chain_grads(checkpoint):
    cm.unet.zero_grad(set_to_none=True)
    plan = dataclasses.replace(every_step, steps=tuple(dataclasses.replace(s, grad=True, checkpoint=checkpoint)
                                                       for s in every_step.steps))
    run_plan(cm, plan, noise, cond, uncond, switch)[-1].square().mean().backward()
    return torch.cat([p.grad.flatten() for n, p in sorted(cm.unet.named_parameters()) if ".lora_" in n])


whole_calls = []
real_checkpoint = chain_module._checkpoint
chain_module._checkpoint = lambda *a, **k: whole_calls.append(1) or real_checkpoint(*a, **k)
plain = chain_grads(False)
with LivePeak() as peak_whole:
    whole = chain_grads(True)
whole_calls.clear()
blocks = cm.network_blocks()
wrapped = cm.enable_block_checkpointing()
with LivePeak() as peak_blocks:
    blockwise = chain_grads(True)
checkpointed_calls = len(whole_calls)
try:
    cm.blocks_change_inputs = False  # the same blocks on their own inputs
    state.restore()
    state = ModelState.capture(cm)
    cm.enable_lean_activations()
    spec.add_to(cm.unet, seed=0, order=cm.adapter_order)
    switch = AdapterSwitch(cm.unet)
    cm.enable_block_checkpointing()
    chain_grads(True)
    res["without_copies"] = None
except RuntimeError as e:
    res["without_copies"] = str(e)[:120]
del cm.blocks_change_inputs
chain_module._checkpoint = real_checkpoint
state.restore()
res["block_checkpointing"] = [wrapped, sorted({type(b).__name__ for b in blocks}), checkpointed_calls,
                              len(every_step.steps), rel(blockwise, plain), float(plain.abs().sum()),
                              sum("_shortft_checkpointed" in b.__dict__ or "forward" in b.__dict__ for b in blocks),
                              rel(whole, plain), peak_blocks.peak / peak_whole.peak]
lset = LoraSet.open(folder)
keys = sorted(load_file(str(lset.merged_file)))
res["set_file"] = [lset.family, len(keys), sorted({k.split("_blocks_")[0] for k in keys}),
                   json.loads((folder / "set.json").read_text())["lora"]["targets"]]
with torch.inference_mode():
    applied = apply.timestep_aware(model, lset, 1.0)
comfy_aligned = comfy_euler(applied)
res["set_vs_euler"] = rel(cm.base.process_latent_out(aligned), comfy_aligned)
res["set_effect"] = rel(comfy_aligned, comfy_euler(model))

# a diffusers-layout LoRA: q and v of the first block's image stream (k left out), its text stream's q, and a whole
# layer; ComfyUI patches parts of the fused layers, the backend loads one adapter on each
parts = {"sd3": (("transformer_blocks.0.attn.to_q", 128), ("transformer_blocks.0.attn.to_v", 128),
                 ("transformer_blocks.0.attn.add_q_proj", 128), ("transformer_blocks.0.attn.to_out.0", 128)),
         "flux": (("transformer_blocks.0.attn.to_q", 128), ("transformer_blocks.0.attn.to_v", 128),
                  ("transformer_blocks.0.attn.add_q_proj", 128), ("single_transformer_blocks.0.attn.to_q", 128),
                  ("single_transformer_blocks.0.proj_mlp", 512), ("transformer_blocks.0.attn.to_out.0", 128))}[FAMILY]
g = torch.Generator().manual_seed(5)
lora = {}
for name, rows in parts:
    lora[f"transformer.{name}.lora_A.weight"] = torch.randn(3, 128, generator=g) * 0.5
    lora[f"transformer.{name}.lora_B.weight"] = torch.randn(rows, 3, generator=g) * 0.5
lora_file = Path(tempfile.mkdtemp()) / "diffusers.safetensors"
save_file(lora, str(lora_file))
x, t = torch.randn(noise.shape, generator=g), torch.tensor([600])
with torch.inference_mode():
    patched = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(str(lora_file)), 1.0, 0)[0]
comfy_patched = backend.ComfyModel(patched, clip, vae)
comfy_patched.prepare(size=(SIZE, SIZE))
with torch.no_grad():
    want = comfy_patched.eps(x, t, cond)
cm.prepare(size=(SIZE, SIZE))
loaded = cm.load_lora(lora_file, "probe")
with torch.no_grad():
    got = cm.eps(x, t, cond)
    remove_adapters(cm.unet, ["probe"])
    plain = cm.eps(x, t, cond)
res["diffusers_lora"] = [{name: list(m.down.shape) + list(m.up.shape) for name, m in loaded.modules.items()},
                         rel(got, want), rel(plain, want)]

# the nodes: LoadShortcutModel (the MODEL's own jumps) and a short ShortFTTrain run; the tiny shortcut refused
node, tiny_reward, widgets = tiny_train_node(Path(tempfile.mkdtemp()))
widgets.update(prompt_source="prompts below", prompts=prompt + "\na big blue square on a white background",
               image_size=SIZE)
with torch.inference_mode():
    shortcut_model = model_node.LoadShortcutModel.execute(model, clip, vae, shortcut="none", preset="auto").result[0]
    output = node.execute(shortcut_model, tiny_reward, run_name=FAMILY, **widgets)
run = json.loads((Path(folder_paths.get_output_directory()) / "shortft" / FAMILY / "run.json").read_text())
res["node_run"] = [len(output.result[0].schedule), output.result[0].family, run.get("status"),
                   bool(torch.isfinite(torch.tensor(output.result[1]["loss"])).all())]
try:
    with torch.inference_mode():
        node.execute(shortcut_model, tiny_reward, run_name=FAMILY + "_cfg", **{**widgets, "guidance": 3.0})
    res["cfg"] = None
except ValueError as e:
    res["cfg"] = str(e)
try:
    model_node.check_shortcut(model, "tiny", Path(tiny_shortcut_path()), "auto")
    res["tiny_shortcut"] = None
except ValueError as e:
    res["tiny_shortcut"] = str(e)
print("RESULT " + json.dumps(res))
'''

TARGETS = {"sd3": ["attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj", "mlp.fc1", "mlp.fc2"],
           "flux": ["img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2", "txt_attn.qkv", "txt_attn.proj",
                    "txt_mlp.0", "txt_mlp.2", "linear1", "linear2"]}


@pytest.fixture(scope="module", params=["sd3", "flux"])
def measured(request, tmp_path_factory) -> dict:
    res = script_in_comfyui(tmp_path_factory, request.param, f"FAMILY = {request.param!r}\n" + SCRIPT)
    res["name"] = request.param
    return res


def test_comfyuis_model_is_its_trainable_family(measured):
    name = measured["name"]
    assert measured["family"] == [{"sd3": "SD3", "flux": "Flux"}[name], name, name]
    kind, size, native_names, targets, table, top, distilled = measured["seam"]
    assert kind == "flow" and size == 1024 and native_names and targets == TARGETS[name], measured["seam"]
    assert table == {"sd3": 1000, "flux": 10000}[name] and top == 0.0  # the chain starts at pure noise
    assert distilled == {"sd3": None, "flux": 3.5}[name]  # FLUX.1 dev's guidance embedding, ComfyUI's default
    assert measured["levels"] == [True, 1.0]


def test_the_chain_samples_what_comfyuis_euler_samples(measured):
    assert measured["base_vs_euler"] < 1e-5, measured["base_vs_euler"]


def test_the_set_adapts_the_attention_and_mlp_layers_and_a_step_reaches_them(measured):
    name = measured["name"]
    expected = {"sd3": ["context_block.attn.proj", "context_block.attn.qkv", "context_block.mlp.fc1",
                        "context_block.mlp.fc2", "x_block.attn.proj", "x_block.attn.qkv", "x_block.attn2.proj",
                        "x_block.attn2.qkv", "x_block.mlp.fc1", "x_block.mlp.fc2"],
                "flux": ["img_attn.proj", "img_attn.qkv", "img_mlp.0", "img_mlp.2", "linear1", "linear2",
                         "txt_attn.proj", "txt_attn.qkv", "txt_mlp.0", "txt_mlp.2"]}[name]
    assert measured["adapted"] == expected
    assert measured["loss_finite"]
    trained, grads = measured["grads"]
    assert trained, grads
    for adapter in trained:
        total, ok = grads[adapter]
        assert total > 0 and ok == total, (adapter, total, ok)
    assert measured["restored_adapters"] == 0  # the session took its adapters off the caller's MODEL


def test_the_sets_files_use_the_networks_module_names_and_apply_aligned_lora_samples_the_chain(measured):
    name = measured["name"]
    family, keys, prefixes, targets = measured["set_file"]
    assert family == name and keys > 0 and targets == TARGETS[name], measured["set_file"]
    assert prefixes == {"sd3": ["lora_unet_joint"], "flux": ["lora_unet_double", "lora_unet_single"]}[name], prefixes
    assert measured["set_effect"] > 1e-3
    assert measured["set_vs_euler"] < 1e-5, measured["set_vs_euler"]


def test_block_checkpointing_recomputes_each_block_with_its_forwards_adapters(measured):
    wrapped, kinds, whole_calls, steps, error, size, left, whole_error, peaks = measured["block_checkpointing"]
    expected = {"sd3": ["JointBlock"], "flux": ["DoubleStreamBlock", "SingleStreamBlock"]}[measured["name"]]
    assert kinds == expected and wrapped > 1, measured["block_checkpointing"]
    assert steps > 1 and whole_calls == steps  # every step with gradient, its recomputation block by block
    assert size > 0 and error < 1e-6 and whole_error < 1e-6, (error, whole_error)  # those of keeping everything
    assert peaks < 0.9, peaks  # below recomputing whole calls, even with two blocks
    assert left == 0  # the session's end gave the blocks their own forwards back
    if measured["name"] == "flux":  # its blocks add to their input in place: without copies backward refuses
        refused = measured["without_copies"] or ""
        assert "inplace" in refused or "Recomputed values" in refused, refused


def test_a_diffusers_layout_lora_on_fused_layers_loads_as_comfyui_patches_it(measured):
    modules, error, without = measured["diffusers_lora"]
    # [down rank, in, up out, up rank]: q and v (rank 3 each) stacked into one rank-6 LoRA over the fused rows
    expected = {"sd3": {"joint_blocks.0.x_block.attn.qkv": [6, 128, 384, 6],
                        "joint_blocks.0.context_block.attn.qkv": [3, 128, 384, 3],
                        "joint_blocks.0.x_block.attn.proj": [3, 128, 128, 3]},
                "flux": {"double_blocks.0.img_attn.qkv": [6, 128, 384, 6],
                         "double_blocks.0.txt_attn.qkv": [3, 128, 384, 3],
                         "double_blocks.0.img_attn.proj": [3, 128, 128, 3],
                         # q, k, v and the MLP's input: 3 x 128 + 512 rows
                         "single_blocks.0.linear1": [6, 128, 896, 6]}}[measured["name"]]
    assert modules == expected, modules
    assert without > 1e-3  # the LoRA changes the output ...
    assert error < 1e-5, error  # ... exactly as ComfyUI's patches do


def test_shortfttrain_trains_the_model_and_refuses_what_does_not_fit_it(measured):
    name = measured["name"]
    segments, family, status, finite = measured["node_run"]
    assert segments > 0 and family == name and status == "finished" and finite, measured["node_run"]
    message = measured["tiny_shortcut"]
    assert message is not None and f"{name} MODEL needs shortcut 'none'" in message, message
    message = measured["cfg"]
    if name == "flux":  # guidance-distilled: CFG on top of the embedded guidance is refused before training
        assert message is not None and "guidance" in message and "FluxGuidance" in message, message
    else:
        assert message is None, message
