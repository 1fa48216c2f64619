"""Tier 2: a MODEL or VAE whose weights ComfyUI's DynamicVRAM streams, in a ComfyUI subprocess on the tiny world.

DynamicVRAM (ComfyUI's default on NVIDIA GPUs) gives the stock loaders' objects a patcher that keeps the weights in
host memory and stages them on the GPU per layer call. Training trains the static copy ComfyUI loads for such a
patcher (its ``clone(disable_dynamic=True)``) and leaves the streamed one to sampling; a loader that cannot give a
copy is a clear error before training. The copy is dropped when training ends (ShortFTTrain drops it), and loaded
again for the next training. The CPU has no DynamicVRAM, so a patcher reports itself streamed here (as
``ModelPatcherDynamic`` does) and registers the loader ComfyUI reloads from (as the core loaders do); the GPU run is
``bench/bench_comfy_train.py dynamic``.
"""

from __future__ import annotations

import pytest

from comfy_harness import comfyui_or_skip
from comfy_process import run_in_comfyui, script_result

pytestmark = pytest.mark.comfyui

SCRIPT = r'''
import copy
import dataclasses
import gc
import json
import weakref
from pathlib import Path

import comfy.model_management
import comfy.model_patcher

from shortft_pack.shortft_core import attach_shortcut, tiny_config, tiny_shortcut_path, tiny_weights_dir
from shortft_pack.shortft_core.prompts import PromptSource
from shortft_pack.shortft_core.testing.parity import set_lora_tensors
from shortft_pack.shortft_core.tiny_world import load_tiny_rewards
from shortft_pack.shortft_core.trainer import Trainer

tiny, backend, model_node = pack_module("tiny_world"), pack_module("backend"), pack_module("model")
out_dir = Path(ARGS[0])
pipeline = tiny_weights_dir() / "pipeline"
res = {}


class Streamed(comfy.model_patcher.ModelPatcher):
    """A patcher that reports DynamicVRAM's streaming, as ModelPatcherDynamic does on a GPU."""

    def is_dynamic(self):
        return True


with torch.inference_mode():  # as ComfyUI's nodes make them
    model, clip, vae = tiny.load_tiny_world()
    # the tiny world's own VAE loader under DynamicVRAM (the stock VAE class then builds a streaming patcher)
    core = comfy.model_patcher.CoreModelPatcher
    comfy.model_patcher.CoreModelPatcher = Streamed
    try:
        res["tiny_vae_patcher"] = type(tiny.load_vae(pipeline).patcher).__name__
    finally:
        comfy.model_patcher.CoreModelPatcher = core

    reloads = []  # what ComfyUI read again from the files, for the static copies

    def reload(what, load):
        def init(disable_dynamic=False):
            reloads.append(what)
            return load()
        return init

    def streamed_model(reloadable=True):
        m = Streamed(model.model, model.load_device, model.offload_device)
        if reloadable:  # what the core loaders register: ComfyUI reloads the file through it
            m.cached_patcher_init = (reload("MODEL", lambda: tiny.load_unet(pipeline, torch.float32)), ())
        return m

    def streamed_vae(reloadable=True):
        v = copy.copy(vae)
        v.patcher = Streamed(vae.first_stage_model, vae.patcher.load_device, vae.patcher.offload_device)
        if reloadable:
            v.patcher.cached_patcher_init = (reload("VAE", lambda: tiny.load_vae(pipeline).patcher), ())
        return v

    s_model, s_vae = streamed_model(), streamed_vae()
before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
vae_before = {k: v.clone() for k, v in vae.first_stage_model.state_dict().items()}

reward = load_tiny_rewards()[0]
prompts = ["a red circle left of a blue square on a white background", "a big blue square on a white background"]
sets = {}
for name, (m, v) in (("static", (model, vae)), ("streamed", (s_model, s_vae))):
    cm = backend.ComfyModel(m, clip, v)
    if name == "streamed":
        res["trained_patcher"] = type(cm.patcher).__name__
        res["trained_vae_patcher"] = type(cm.comfy_vae.patcher).__name__
        res["copy_of_model"] = cm.patcher is not m and cm.base is not m.model
        res["copy_of_vae"] = cm.comfy_vae is not v and cm.vae is not v.first_stage_model
        res["same_weights"] = all(torch.equal(a, before[k]) for k, a in cm.unet.state_dict().items())
        res["same_source"] = cm.source == sets["static_source"]
    cm.prepare()
    preset = attach_shortcut(cm, tiny_shortcut_path())
    cfg = tiny_config(iterations=2, batch_size=2, eval_count=0, rank=4)
    cfg = dataclasses.replace(cfg, shortcut_guidance=cfg.method_entry.jump_guidance(cfg, preset.guidance))
    tr = Trainer(cm, reward, cfg, PromptSource(prompts), shortcut_preset=preset)
    losses = [tr.train_step()["loss"] for _ in range(cfg.iterations)]
    sets[name] = set_lora_tensors(cm, "weight")
    sets[f"{name}_source"] = cm.source
    res[f"losses_{name}"] = losses
    if name == "streamed":  # the copies are dropped after training, and loaded again for the next
        copy_ref, copy_patcher = weakref.ref(cm.base), cm.patcher
        res["copies"] = sorted(cm.copies)
        del tr
        cm.release()
        unlisted = not any(e.model is copy_patcher for e in comfy.model_management.current_loaded_models)
        del copy_patcher
        gc.collect()
        res["released"] = [cm.patcher is None, cm.unet is None, copy_ref() is None, unlisted]
        cm.prepare()
        res["bound_again"] = [type(cm.patcher).__name__, cm.unet is not None,
                              sorted(n for n, _ in cm.unet.named_parameters() if "lora_" in n)]
        preset = attach_shortcut(cm, tiny_shortcut_path())
        tr = Trainer(cm, reward, cfg, PromptSource(prompts), shortcut_preset=preset)
        res["losses_streamed_again"] = [tr.train_step()["loss"] for _ in range(cfg.iterations)]
        del tr
        cm.release()
    if name == "static":  # the static world is trained in place: give it back for the streamed run's copy
        from shortft_pack.shortft_core.adapters import remove_adapters
        remove_adapters(cm.unet, list(cm.unet.peft_config))
        before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}

a, b = sets["static"], sets["streamed"]
res["set_keys"] = sorted(a) == sorted(b) and len(a) > 0
res["set_equal"] = all(torch.equal(a[k], b[k]) for k in a)
# the streamed (caller's) objects: no adapter, the weights as they were
res["caller_adapters"] = sorted(n for n, _ in s_model.model.diffusion_model.named_parameters() if "lora_" in n)
res["caller_weights_kept"] = all(torch.equal(v, before[k]) for k, v in s_model.model.diffusion_model.state_dict().items())
res["caller_vae_kept"] = all(torch.equal(v, vae_before[k]) for k, v in s_vae.first_stage_model.state_dict().items())

# the node gives the copy to ShortFTTrain; a loader that registered no reload is an error naming the fix
with torch.inference_mode():
    shortcut_model = model_node.LoadShortcutModel.execute(streamed_model(), clip, streamed_vae(), shortcut="tiny",
                                                          preset="auto").result[0]
res["node_trains_copy"] = type(shortcut_model.model.patcher).__name__
# ShortFTTrain trains the copy and drops it when done; queued again, it trains a copy loaded again
node, tiny_reward, widgets = tiny_train_node(out_dir)
node_copy = weakref.ref(shortcut_model.model.base)
res["node_runs"], res["node_reloads"] = [], []
for run in ("first", "second", "second"):  # the last: a finished run queued again (ComfyUI's cache freed)
    del reloads[:]
    with torch.inference_mode():
        output = node.execute(shortcut_model, tiny_reward, run_name=run, **widgets)
    gc.collect()
    res["node_runs"].append([len(output.result[0].schedule), shortcut_model.model.patcher is None,
                             node_copy() is None])
    res["node_reloads"].append(sorted(reloads))
for what, args in (("model", (streamed_model(False), clip, streamed_vae())),
                   ("vae", (streamed_model(), clip, streamed_vae(False)))):
    try:
        with torch.inference_mode():
            model_node.LoadShortcutModel.execute(*args, shortcut="tiny", preset="auto")
        res[f"error_{what}"] = None
    except ValueError as e:
        res[f"error_{what}"] = str(e)
print("RESULT " + json.dumps(res))
'''


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    comfy = comfyui_or_skip()
    tmp = tmp_path_factory.mktemp("dynamic_vram")
    return script_result(run_in_comfyui(comfy, SCRIPT, tmp / "dynamic_vram_side.py", str(tmp), timeout=900))


def test_a_streamed_model_and_vae_train_as_static_copies_to_the_same_set(measured):
    assert measured["trained_patcher"] == measured["trained_vae_patcher"] == "ModelPatcher"
    assert measured["copy_of_model"] and measured["copy_of_vae"]
    assert measured["same_weights"] and measured["same_source"]  # the same model: the same run
    assert measured["losses_streamed"] == measured["losses_static"]
    assert measured["set_keys"] and measured["set_equal"]


def test_the_copies_are_dropped_after_training_and_loaded_again_for_the_next(measured):
    assert measured["copies"] == ["MODEL", "VAE"]
    assert measured["released"] == [True, True, True, True], "the copy outlived its training"
    assert measured["bound_again"] == ["ModelPatcher", True, []]  # a fresh copy, no adapter left from the last run
    assert measured["losses_streamed_again"] == measured["losses_streamed"]


def test_the_node_drops_the_copy_it_trained(measured):
    # each run gives its set, and leaves no copy behind (the first run's copy came from LoadShortcutModel)
    assert [r[1:] for r in measured["node_runs"]] == [[True, True]] * 3
    assert all(r[0] > 0 for r in measured["node_runs"])


def test_a_finished_run_queued_again_loads_no_copy(measured):
    # the first run trains the copy LoadShortcutModel loaded, the second loads its own; the finished second run queued
    # again is returned as it is, without reading the files again
    assert measured["node_reloads"] == [[], ["MODEL", "VAE"], []]


def test_the_streamed_objects_are_left_to_sampling_untouched(measured):
    assert measured["caller_adapters"] == []
    assert measured["caller_weights_kept"] and measured["caller_vae_kept"]


def test_the_node_trains_the_copy_and_names_the_fix_where_none_can_be_made(measured):
    assert measured["node_trains_copy"] == "ModelPatcher"
    for what, name in (("model", "MODEL"), ("vae", "VAE")):
        message = measured[f"error_{what}"]
        assert message is not None, f"a streamed {name} without a reloadable loader was trained"
        assert f"the {name} streams its weights" in message and "--disable-dynamic-vram" in message, message
        assert "Load Checkpoint" in message, message


def test_the_tiny_worlds_vae_keeps_a_static_patcher_under_dynamic_vram(measured):
    assert measured["tiny_vae_patcher"] == "ModelPatcher"
