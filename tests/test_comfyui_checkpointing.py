"""Tier 2: how training through a ComfyUI MODEL spends memory, in a ComfyUI subprocess on the tiny world.

The UNet's calls (whole, or block by block: ComfyUI's ``ResBlock`` and ``SpatialTransformer`` one at a time) and the
VAE decoder's blocks (ComfyUI's own ``Decoder``) recompute their activations in backward when asked: the peak of a
training step drops and the losses and trained LoRAs stay those of a run that keeps them; when training ends the
blocks are their own again, and a second session checkpoints them again.

ShortFTTrain's ``gradient_checkpointing`` widget reaches the run's settings, and an out-of-memory error during
training (raised here where a GPU would raise it) comes back as ComfyUI's out-of-memory error with a message that
names the widget and the iteration the run continues from; queueing the graph again with the UNet and the VAE
recomputed continues the run from that checkpoint and ends with the LoRA set of an uninterrupted run.
"""

from __future__ import annotations

import pytest

from comfy_harness import comfyui_or_skip, tree_state
from comfy_process import run_in_comfyui, script_result

pytestmark = pytest.mark.comfyui

SCRIPT = r'''
import dataclasses
import json
from pathlib import Path

from safetensors.torch import load_file

from shortft_pack.shortft_core import attach_shortcut, tiny_config, tiny_shortcut_path
from shortft_pack.shortft_core.lifecycle import ModelState
from shortft_pack.shortft_core.prompts import PromptSource
from shortft_pack.shortft_core.testing.parity import set_lora_tensors
from shortft_pack.shortft_core.testing.profiling import LivePeak
from shortft_pack.shortft_core.tiny_world import load_tiny_rewards
from shortft_pack.shortft_core.trainer import Trainer
import comfy.model_management as mm

out_dir = Path(ARGS[0])
tiny, backend = pack_module("tiny_world"), pack_module("backend")
train, shortcut_node = pack_module("train"), pack_module("model")
res = {}

with torch.inference_mode():  # as ComfyUI's nodes make them
    model, clip, vae = tiny.load_tiny_world()
cm = backend.ComfyModel(model, clip, vae)
cm.prepare()
decoder = cm.vae.decoder
keys_before = sorted(cm.unet.state_dict())


def overridden():
    """The decoder's and the network's modules that carry an instance forward or the checkpointing mark."""
    return sorted(f"{part}.{n}" for part, net in (("vae", decoder), ("unet", cm.unet)) for n, m in net.named_modules()
                  if "forward" in m.__dict__ or "_shortft_checkpointed" in m.__dict__)


def recomputed(net):
    """How many of the modules of ``net`` carry the checkpointing mark (the lean layers' forwards are others)."""
    return sum(bool(m.__dict__.get("_shortft_checkpointed")) for m in net.modules())


reward = load_tiny_rewards()[0]
prompts = ["a red circle left of a blue square on a white background", "a big blue square on a white background"]
runs = {}
for name, unet, vae_ in (("off", False, False), ("unet", True, False), ("vae", False, True), ("both", True, True),
                         ("both_again", True, True), ("blocks", "blocks", True)):
    state = ModelState.capture(cm)
    preset = attach_shortcut(cm, tiny_shortcut_path())
    cfg = tiny_config(iterations=2, batch_size=2, eval_count=0, rank=4, checkpoint_unet=bool(unet),
                      checkpoint_blocks=unet == "blocks", checkpoint_vae=vae_)
    cfg = dataclasses.replace(cfg, shortcut_guidance=cfg.method_entry.jump_guidance(cfg, preset.guidance))
    tr = Trainer(cm, reward, cfg, PromptSource(prompts), shortcut_preset=preset)
    res[f"recomputed_{name}"] = recomputed(decoder)
    res[f"blocks_{name}"] = [recomputed(cm.unet), len(cm.network_blocks())]
    with LivePeak() as mem:
        losses = [tr.train_step()["loss"] for _ in range(cfg.iterations)]
    runs[name] = (losses, set_lora_tensors(cm, "weight"))
    res[f"peak_{name}"] = mem.peak
    state.restore()
    res[f"left_{name}"] = overridden()
res["keys_kept"] = sorted(cm.unet.state_dict()) == keys_before
res["loss_off"] = runs["off"][0]
for name in ("unet", "vae", "both", "blocks"):
    losses, weights = runs[name]
    res[f"loss_{name}"] = losses
    ref = runs["off"][1]
    a = torch.cat([ref[k].flatten().float() for k in sorted(ref)])
    b = torch.cat([weights[k].flatten().float() for k in sorted(ref)])
    res[f"weights_{name}"] = float((a - b).norm() / a.norm())
    res[f"weights_keys_{name}"] = sorted(weights) == sorted(ref) and len(ref) > 0

# the node: its widget, and an out-of-memory error during training (its files under the test's folder)
node, tiny_reward, widgets = tiny_train_node(out_dir, iterations=5, checkpoint_every=2)
res["settings"] = {choice: [train.checkpoint_settings(choice, gpu, family) for gpu, family in
                            ((False, "sd15"), (True, "sd15"), (True, "tiny"))]
                   for choice in ("auto", "off", "unet", "unet + vae", "unet blocks + vae")}
res["settings_transformers"] = [train.checkpoint_settings("auto", True, family) for family in ("sd3", "flux", "sdxl")]
try:
    train.checkpoint_settings("everything", True, "sd15")
except ValueError as e:
    res["bad_choice"] = str(e)
with torch.inference_mode():
    shortcut_model = shortcut_node.LoadShortcutModel.execute(model, clip, vae, shortcut="tiny", preset="auto").result[0]
original_step = Trainer.train_step


def step_out_of_memory_at_four(self):
    if self.iteration == 3:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return original_step(self)


Trainer.train_step = step_out_of_memory_at_four
try:
    with torch.inference_mode():
        node.execute(shortcut_model, tiny_reward, run_name="oom", gradient_checkpointing="off", **widgets)
    res["oom"] = None
except Exception as e:
    res["oom"], res["oom_type"], res["oom_is_oom"] = str(e), type(e).__name__, mm.is_oom(e)
Trainer.train_step = original_step
res["overridden_after_oom"] = overridden()
res["adapters_after_oom"] = sorted(getattr(cm.unet, "peft_config", {}) or {})
run_file = out_dir / "output" / "shortft" / "oom" / "run.json"
res["after_oom"] = json.loads(run_file.read_text())["status"]
with torch.inference_mode():
    node.execute(shortcut_model, tiny_reward, run_name="oom", gradient_checkpointing="unet + vae", **widgets)
    node.execute(shortcut_model, tiny_reward, run_name="straight", gradient_checkpointing="off", **widgets)
for name in ("oom", "straight"):
    done = json.loads((out_dir / "output" / "shortft" / name / "run.json").read_text())
    res[f"run_{name}"] = [done["status"], done["iteration"], done["settings"]["config"]["checkpoint_unet"],
                          done["settings"]["config"]["checkpoint_vae"]]
sets = {name: {f.name: load_file(str(f)) for f in sorted((out_dir / "loras" / "shortft" / name).glob("segment_*"))}
        for name in ("oom", "straight")}
res["set_files"] = sorted(sets["oom"])
res["set_equal"] = sorted(sets["oom"]) == sorted(sets["straight"]) and all(
    torch.equal(sets["oom"][f][k], sets["straight"][f][k]) for f in sets["straight"] for k in sets["straight"][f])
print("RESULT " + json.dumps(res))
'''


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    comfy = comfyui_or_skip()
    tmp = tmp_path_factory.mktemp("checkpointing")
    before = tree_state(comfy)
    out = run_in_comfyui(comfy, SCRIPT, tmp / "checkpointing_side.py", tmp / "work", timeout=1200)
    after = tree_state(comfy)
    res = script_result(out)
    res["written_into_comfyui"] = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    res["preview_saved"] = sorted(p.name for p in (tmp / "work" / "temp").glob("*.png"))
    return res


def test_recomputing_the_unet_and_the_vae_lowers_the_peak_and_changes_no_value(measured):
    for name in ("unet", "vae", "both", "blocks"):
        assert measured[f"weights_keys_{name}"]
        assert measured[f"loss_{name}"] == pytest.approx(measured["loss_off"], rel=1e-5), name
        assert measured[f"weights_{name}"] < 1e-5, (name, measured[f"weights_{name}"])
    off, unet, vae, both = (measured[f"peak_{k}"] for k in ("off", "unet", "vae", "both"))
    assert unet < 0.8 * off and vae < off and both < vae and both <= unet, (off, unet, vae, both)
    # the tiny world's peak is a forward's (its calls with gradient hold little): blocks cannot lower it further
    assert measured["peak_blocks"] < 0.8 * off, (measured["peak_blocks"], off)


def test_the_decoders_blocks_are_its_own_again_after_training_and_checkpoint_again(measured):
    assert measured["recomputed_off"] == measured["recomputed_unet"] == 0
    # the network's ResNet and transformer blocks, wrapped only while a session recomputes them block by block
    blocks = measured["blocks_blocks"][1]
    assert blocks > 5 and measured["blocks_blocks"] == [blocks, blocks], measured["blocks_blocks"]
    for name in ("off", "unet", "vae", "both", "both_again"):
        assert measured[f"blocks_{name}"] == [0, blocks], (name, measured[f"blocks_{name}"])
    assert measured["recomputed_blocks"] == measured["recomputed_vae"]
    # the tiny decoder: middle (two ResNet blocks, attention), two levels of ResNet blocks, one upsample
    assert measured["recomputed_vae"] > 5 and measured["recomputed_both"] == measured["recomputed_vae"]
    assert measured["recomputed_both_again"] == measured["recomputed_both"]  # a second session checkpoints again
    for name in ("off", "unet", "vae", "both", "both_again", "blocks"):
        assert measured[f"left_{name}"] == [], name
    assert measured["keys_kept"]


def test_the_widget_sets_the_runs_checkpointing(measured):
    def settings(unet, blocks, vae):
        return {"checkpoint_unet": unet, "checkpoint_blocks": blocks, "checkpoint_vae": vae}

    none, unet, both = settings(False, False, False), settings(True, False, False), settings(True, False, True)
    blocks = settings(True, True, True)
    assert measured["settings"] == {"auto": [none, both, none], "off": [none] * 3, "unet": [unet] * 3,
                                    "unet + vae": [both] * 3, "unet blocks + vae": [blocks] * 3}
    assert measured["settings_transformers"] == [blocks, blocks, both]  # sd3, flux block by block; sdxl not
    assert "everything" in measured["bad_choice"] and "unet blocks + vae" in measured["bad_choice"]


def test_out_of_memory_names_the_fix_and_the_run_continues_to_the_uninterrupted_set(measured):
    message = measured["oom"]
    assert message is not None, "the out-of-memory error was swallowed"
    assert measured["oom_is_oom"] and measured["oom_type"] == "OutOfMemoryError"  # ComfyUI's own handling applies
    assert "ran out of GPU memory with 3 iterations done" in message, message
    assert "gradient_checkpointing off" in message and "'unet blocks + vae'" in message, message
    # checkpoint_every is 2: the iterations done up to the failure were checkpointed when it happened
    assert "checkpoint at iteration 3" in message and "Tried to allocate 2.00 GiB" in message, message
    assert measured["overridden_after_oom"] == [] and measured["adapters_after_oom"] == []  # the MODEL as it was
    assert measured["after_oom"] == "partial"
    assert measured["run_oom"] == ["finished", 5, True, True]
    assert measured["run_straight"] == ["finished", 5, False, False]
    assert measured["set_files"] == ["segment_1.safetensors", "segment_2.safetensors", "segment_3.safetensors"]
    assert measured["set_equal"], "continuing with checkpointing on must give the uninterrupted run's set"
    # the node's preview of each finished run went to the temp folder set here, nothing into ComfyUI's checkout
    assert len(measured["preview_saved"]) == 2 and measured["written_into_comfyui"] == [], measured
