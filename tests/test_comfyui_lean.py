"""Tier 2: the library's lean layers on ComfyUI's own classes, in a ComfyUI subprocess on the tiny world.

Training through a ComfyUI MODEL gives ComfyUI's frozen convolutions, GEGLU feed-forwards and GroupNorm+SiLU pairs
the forwards that keep less for backward (on CUDA; forced on here on the CPU): the peak of a training step drops,
the losses and trained LoRAs stay those of a run without them, ComfyUI's interrupt is still checked at every layer
call, a layer that ComfyUI computes with a cast or patched copy of its weight keeps ComfyUI's own forward, and when
training ends every layer is ComfyUI's again.
"""

from __future__ import annotations

import pytest

from comfy_process import script_in_comfyui

pytestmark = pytest.mark.comfyui

SCRIPT = r'''
import dataclasses
import json

import comfy.ops
from comfy.ldm.modules.attention import GEGLU

from shortft_pack.shortft_core import attach_shortcut, tiny_config, tiny_shortcut_path
from shortft_pack.shortft_core.lifecycle import ModelState
from shortft_pack.shortft_core.prompts import PromptSource
from shortft_pack.shortft_core.testing.parity import set_lora_tensors
from shortft_pack.shortft_core.testing.profiling import LivePeak
from shortft_pack.shortft_core.tiny_world import load_tiny_rewards
from shortft_pack.shortft_core.trainer import Trainer

tiny, backend = pack_module("tiny_world"), pack_module("backend")
res = {}
with torch.inference_mode():  # as ComfyUI's nodes make them
    model, clip, vae = tiny.load_tiny_world()
cm = backend.ComfyModel(model, clip, vae)
cm.prepare()
nets = {"unet": cm.unet, "vae": cm.vae}
CONVS = (torch.nn.Conv2d, comfy.ops.disable_weight_init.Conv2d)


def marked():
    """Modules of the network and the VAE that carry a lean mark or an instance forward."""
    return sorted(f"{k}.{n}" for k, net in nets.items() for n, m in net.named_modules()
                  if "_shortft_lean" in m.__dict__ or "forward" in m.__dict__)


checks = []
comfy_check = comfy.ops.run_every_op


def counted_check():
    checks.append(1)
    comfy_check()


comfy.ops.run_every_op = counted_check  # what ComfyUI's layers call first on every call


def decode():
    """A decode with gradients: ComfyUI's interrupt checks made during it, the image, the latent's gradient."""
    z = torch.randn((1, *cm.latent_shape()), generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    checks.clear()
    image = cm.decode(z)
    made = len(checks)
    image.square().mean().backward()
    return made, image.detach(), z.grad


res["vae_trainable_before"] = sum(p.requires_grad for p in cm.vae.parameters())
reward = load_tiny_rewards()[0]
prompts = ["a red circle left of a blue square on a white background", "a big blue square on a white background"]
runs, decoded = {}, {}
for name, lean, recompute in (("plain", False, False), ("lean", True, False), ("lean_recomputed", True, True)):
    state = ModelState.capture(cm)
    preset = attach_shortcut(cm, tiny_shortcut_path())
    if lean:
        res[f"switched_{name}"] = cm.enable_lean_activations(devices=None)
        if name == "lean":
            found = {k: [n for n, m in net.named_modules() if type(m) in CONVS] for k, net in nets.items()}
            res["convs"] = sum(map(len, found.values()))
            res["convs_switched"] = sum("_shortft_lean" in net.get_submodule(n).__dict__
                                        for k, net in nets.items() for n in found[k])
            res["geglus"] = [n for n, m in cm.unet.named_modules() if type(m) is GEGLU]
            res["geglus_switched"] = sum("_shortft_lean" in cm.unet.get_submodule(n).__dict__
                                         for n in res["geglus"])
            norms = [(f"{k}.{n}", m) for k, net in nets.items() for n, m in net.named_modules()
                     if isinstance(m, torch.nn.GroupNorm)]
            res["norms_switched"] = sum("_shortft_lean" in m.__dict__ for _, m in norms)
            res["norms_left"] = sorted(n for n, m in norms if "_shortft_lean" not in m.__dict__)
    cfg = tiny_config(iterations=2, batch_size=2, eval_count=0, rank=4, checkpoint_unet=recompute,
                      checkpoint_vae=recompute)
    cfg = dataclasses.replace(cfg, shortcut_guidance=cfg.method_entry.jump_guidance(cfg, preset.guidance))
    tr = Trainer(cm, reward, cfg, PromptSource(prompts), shortcut_preset=preset)
    if name == "lean":  # a layer ComfyUI computes with a cast copy, or a function, of its weight goes ComfyUI's way
        conv = cm.vae.decoder.conv_in
        x = torch.randn(1, conv.in_channels, 4, 4, requires_grad=True)
        paths = [type(conv(x).grad_fn).__name__]
        conv.comfy_cast_weights = True
        paths.append(type(conv(x).grad_fn).__name__)
        del conv.comfy_cast_weights
        conv.weight_function = [lambda w: w]
        paths.append(type(conv(x).grad_fn).__name__)
        del conv.weight_function
        paths.append(type(conv(x).grad_fn).__name__)
        res["conv_paths"] = paths
    with LivePeak() as mem:
        losses = [tr.train_step()["loss"] for _ in range(cfg.iterations)]
    runs[name] = (losses, set_lora_tensors(cm, "weight"))
    res[f"vae_trainable_{name}"] = sum(p.requires_grad for p in cm.vae.parameters())
    res[f"vae_grads_{name}"] = sum(p.grad is not None for p in cm.vae.parameters())
    res[f"peak_{name}"] = mem.peak
    res[f"checks_{name}"], *decoded[name] = decode()
    state.restore()
    res[f"left_{name}"] = marked()
    res[f"vae_trainable_left_{name}"] = sum(p.requires_grad for p in cm.vae.parameters())
res["checks_after"], *decoded["after"] = decode()

for name in ("lean", "lean_recomputed"):
    losses, weights = runs[name]
    ref_losses, ref = runs["plain"]
    res[f"losses_{name}"] = [abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)]
    a = torch.cat([ref[k].flatten().float() for k in sorted(ref)])
    b = torch.cat([weights[k].flatten().float() for k in sorted(ref)])
    res[f"weights_{name}"] = float((a - b).norm() / a.norm())
    res[f"weights_keys_{name}"] = sorted(weights) == sorted(ref) and len(ref) > 0
for name in ("lean", "after"):
    image, grad = decoded[name]
    res[f"image_equal_{name}"] = torch.equal(image, decoded["plain"][0])
    res[f"grad_{name}"] = float((grad - decoded["plain"][1]).norm() / decoded["plain"][1].norm())
print("RESULT " + json.dumps(res))
'''


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    return script_in_comfyui(tmp_path_factory, "lean", SCRIPT)


def test_comfyuis_layers_are_switched(measured):
    assert measured["convs"] > 40 and measured["convs_switched"] == measured["convs"]
    assert measured["geglus"] and measured["geglus_switched"] == len(measured["geglus"])
    assert measured["norms_switched"] > 20
    # left: the norms whose output goes into attention (the transformers' and the VAE's attention blocks) and the
    # VAE's output heads (a SiLU function, not a module, follows them)
    assert measured["norms_left"] and all(n.endswith((".norm", ".norm_out")) for n in measured["norms_left"]), \
        measured["norms_left"]
    assert measured["switched_lean_recomputed"] == measured["switched_lean"] > 60


def test_lean_layers_lower_the_peak_and_change_no_value(measured):
    for name in ("lean", "lean_recomputed"):
        assert measured[f"weights_keys_{name}"]
        assert max(measured[f"losses_{name}"]) < 1e-5, (name, measured[f"losses_{name}"])
        assert measured[f"weights_{name}"] < 1e-3, (name, measured[f"weights_{name}"])
    assert measured["peak_lean"] < 0.85 * measured["peak_plain"], (measured["peak_lean"], measured["peak_plain"])
    assert measured["peak_lean_recomputed"] < measured["peak_lean"]
    assert measured["image_equal_lean"] and measured["grad_lean"] < 1e-5, measured["grad_lean"]


def test_comfyuis_interrupt_is_checked_and_its_cast_path_kept(measured):
    # a lean layer makes ComfyUI's interrupt check, as ComfyUI's own forward does: as many checks per decode
    assert measured["checks_plain"] > 40
    assert measured["checks_lean"] == measured["checks_plain"] == measured["checks_after"]
    lean, comfy_way = "_FrozenConv2dBackward", "ConvolutionBackward0"
    assert measured["conv_paths"] == [lean, comfy_way, comfy_way, lean]


def test_training_computes_no_gradient_for_the_vaes_weights(measured):
    """ComfyUI's VAE comes with trainable parameters: training passes the gradient through it without computing
    theirs (no weight-gradient work, no .grad left on the caller's VAE) and gives the flags back afterwards."""
    assert measured["vae_trainable_before"] > 50
    for name in ("plain", "lean", "lean_recomputed"):
        assert measured[f"vae_trainable_{name}"] == 0 and measured[f"vae_grads_{name}"] == 0, name
        assert measured[f"vae_trainable_left_{name}"] == measured["vae_trainable_before"], name


def test_every_layer_is_comfyuis_again_after_training(measured):
    for name in ("plain", "lean", "lean_recomputed"):
        assert measured[f"left_{name}"] == [], name
    assert measured["image_equal_after"] and measured["grad_after"] == 0.0
