"""Tier 2: training through the MODEL, CLIP and VAE ComfyUI loaded (nodes/backend.py), against the library's own
diffusers backend on the tiny world (Load Tiny World's objects), in a ComfyUI subprocess.

Each piece of the model seam equals the library's (text conditioning, the noise prediction through apply_model, the
differentiable decode and its gradient); one training iteration gives the same loss, the same LoRA gradients and the
same updated LoRAs (a seed initialises the same set on both backends); a short training session through the
ComfyUI backend writes a LoRA set close to the library's for the same seed, and leaves the MODEL exactly as it was
(values, dtype, device, no adapter layer, trainable flags and modes), so a cached MODEL trains twice in a row.
"""

from __future__ import annotations

import json
import math

import pytest

from comfy_harness import comfyui_or_skip
from comfy_process import run_in_comfyui, script_result

pytestmark = pytest.mark.comfyui

SCRIPT = r'''
import dataclasses
import json
from pathlib import Path

import comfy.sd1_clip
from safetensors.torch import load_file

from shortft_pack.shortft_core import (TrainingSession, TrainRequest, attach_shortcut, load_tiny_model, tiny_config,
                                      tiny_shortcut_path)
from shortft_pack.shortft_core.lifecycle import ModelState
from shortft_pack.shortft_core.prompts import PromptSource
from shortft_pack.shortft_core.testing.parity import set_lora_tensors
from shortft_pack.shortft_core.tiny_world import load_tiny_rewards
from shortft_pack.shortft_core.trainer import Trainer

out_dir = Path(ARGS[0])
tiny, backend = pack_module("tiny_world"), pack_module("backend")
res = {}


def rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def snapshot(patcher, clip, vae):
    """What a caller can observe of the objects: tensors (values, dtype, device), module classes, flags, modes."""
    parts = {"unet": patcher.model, "vae": vae.first_stage_model, "clip": clip.cond_stage_model}
    return {k: ({n: (t.detach().clone(), t.dtype, t.device) for n, t in m.state_dict().items()},
                [(n, type(s).__name__, s.training) for n, s in m.named_modules()],
                {n: p.requires_grad for n, p in m.named_parameters()}) for k, m in parts.items()}


def same(a, b):
    for k in a:
        (ta, ma, ga), (tb, mb, gb) = a[k], b[k]
        if ma != mb or ga != gb or ta.keys() != tb.keys():
            return f"{k}: modules, flags or keys differ"
        for n in ta:
            if ta[n][1:] != tb[n][1:] or not torch.equal(ta[n][0], tb[n][0]):
                return f"{k}: {n} differs"
    return None


with torch.inference_mode():  # as ComfyUI's nodes make them
    model, clip, vae = tiny.load_tiny_world()
    before = snapshot(model, clip, vae)

cm = backend.ComfyModel(model, clip, vae)
ref = load_tiny_model()
res["family"], res["prediction"] = cm.family, cm.schedule.prediction_type
res["abar"] = rel(cm.schedule.alphas_cumprod, ref.schedule.alphas_cumprod)
cm.prepare(["a red circle on a white background", "", "a red circle on a white background"])
res["encoded_by_prepare"] = sorted(k[0] for k in cm._conds)
res["values_kept_by_prepare"] = same(before, snapshot(model, clip, vae)) is None


class OnMeta(backend.ComfyModel):
    """The seam as if its network lay on another device than the host (meta: shapes only, nothing computed)."""
    device = property(lambda self: torch.device("meta"))


elsewhere = OnMeta(model, clip, vae)
batch = elsewhere.encode_prompts(["a red circle on a white background", ""])
res["cache_devices"] = sorted({str(t.device) for e in elsewhere._conds.values() for t in e.values()})
res["batch_device"] = str(batch.hidden.device)
elsewhere.release()
res["cached_after_release"] = len(elsewhere._conds)


class VaeElsewhere(torch.nn.Module):
    """A VAE whose weights lie on another device than the network (meta here; --cpu-vae keeps ComfyUI's on the CPU
    beside a GPU MODEL): it records what it is given."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, device="meta", dtype=torch.float16))
        self.given = None

    def decode(self, z):
        self.given = [str(z.device), str(z.dtype)]
        return torch.zeros(z.shape[0], 3, z.shape[2] * 4, z.shape[3] * 4, dtype=torch.float16)


decoding = backend.ComfyModel(model, clip, vae)
decoding.vae = VaeElsewhere()
image = decoding.decode(torch.zeros(1, 4, 8, 8))
res["decode_devices"] = decoding.vae.given + [str(image.device), str(image.dtype)]

# a prompt over 75 tokens (two chunks of ComfyUI's CLIP) batched with a short one, and with the empty prompt for CFG
# in a training iteration: each sample's noise prediction is what it is alone
long_prompt = ", ".join(["a small red circle on the left on a white background"] * 8)
pair = ["a big blue square on a white background", long_prompt]
mixed = cm.encode_prompts(pair)
res["mixed_tokens"] = [int(cm.encode_prompts([p]).hidden.shape[1]) for p in pair] + [int(mixed.hidden.shape[1])]
with torch.no_grad():
    xs = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    alone = torch.cat([cm.eps(xs[i:i + 1], 500, cm.encode_prompts([p])) for i, p in enumerate(pair)])
    res["mixed_eps"] = rel(cm.eps(xs, 500, mixed), alone)
state = ModelState.capture(cm)
preset = attach_shortcut(cm, tiny_shortcut_path())
long_cfg = tiny_config(iterations=1, batch_size=2, eval_count=0, rank=2, guidance=3.0)
jumps = long_cfg.method_entry.jump_guidance(long_cfg, preset.guidance)
long_cfg = dataclasses.replace(long_cfg, shortcut_guidance=jumps)
res["long_cfg_loss"] = Trainer(cm, load_tiny_rewards()[0], long_cfg, PromptSource(pair),
                               shortcut_preset=preset).train_step()["loss"]
state.restore()

# ComfyUI's prompt syntax: the CLIP reads the weights, a reward reads the words (in training, evaluation and the grid)
res["syntax_tiny"] = list(backend.prompt_syntax(clip))
with_folder = type("Clip", (), {"tokenizer": comfy.sd1_clip.SD1Tokenizer(embedding_directory=str(out_dir))})()
res["syntax_embeddings_folder"] = list(backend.prompt_syntax(with_folder))
cases = ["(red hair:1.3), ((sky)), [moon]", "a photo \\(1990\\) of (a (tall:0.8) tree)", "a (b c",
         "embedding:EasyNegative, a cat", "a cat embedding:style[x] at night", "a cat, (embedding:style:1.2), night", "user:embedding:x", "a plain prompt"]
res["plain"] = {c: [backend.plain_prompt(c), backend.plain_prompt(c, weights=False, embeddings=False)] for c in cases}
written = ["a ((red circle)) left of a (blue square:1.3) on a white background",
           "a big \\(blue\\) square on a (white background:0.9)"]
tiny_alignment = load_tiny_rewards()[0]
seen = []


def recording(images, prompts):
    seen.append(list(prompts))
    return tiny_alignment(images, prompts)


res["reward_prompts"] = cm.reward_prompts(written)
with torch.no_grad():
    weighted, plain = (cm.encode_prompts([p]).hidden for p in (written[0], res["reward_prompts"][0]))
res["weights_encoded"] = rel(weighted, plain)
request = TrainRequest(out=out_dir / "syntax", model=cm, reward=recording, prompts=written[:1],
                       eval_prompts=written[1:],
                       config={"iterations": 1, "batch_size": 2, "rank": 2}, preset="tiny", grid_prompts=2)
with TrainingSession(request) as session:
    session.check()
    res["syntax_status"] = session.run().status
res["reward_saw"] = sorted({p for batch in seen for p in batch})
res["reward_calls"] = len(seen)
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 4, 8, 8, generator=g)
prompts = ["a red circle left of a blue square on a white background", ""]
c_cm, c_ref = cm.encode_prompts(prompts), ref.encode_prompts(prompts)
res["cond"] = rel(c_cm.hidden, c_ref.hidden)
with torch.no_grad():
    for t in (999, 500, 21, 1):
        res[f"eps_{t}"] = rel(cm.eps(x, t, c_cm), ref.eps(x, t, c_ref))
    res["eps_per_sample"] = rel(cm.eps(x, torch.tensor([981, 41]), c_cm), ref.eps(x, torch.tensor([981, 41]), c_ref))
zs = [x.clone().requires_grad_(True) for _ in range(2)]
images = [m.decode(z) for m, z in zip((cm, ref), zs)]
for im in images:
    (im * torch.linspace(-1, 1, im.numel()).view_as(im)).sum().backward()
res["decode"], res["decode_grad"] = rel(images[0], images[1]), rel(zs[0].grad, zs[1].grad)

# one training iteration on each backend: the same seed, the same shortcut, the same prompts
cfg = tiny_config(iterations=1, batch_size=2, eval_count=0, rank=4, checkpoint_every=10)
reward = load_tiny_rewards()[0]
steps = {}

for label, m in (("comfy", cm), ("lib", ref)):
    state = ModelState.capture(m)
    preset = attach_shortcut(m, tiny_shortcut_path())
    run_cfg = dataclasses.replace(cfg, shortcut_guidance=cfg.method_entry.jump_guidance(cfg, preset.guidance))
    tr = Trainer(m, reward, run_cfg, PromptSource(prompts[:1] + ["a big blue square on a white background"]),
                 shortcut_preset=preset)
    init = set_lora_tensors(m, "weight")
    metrics = tr.train_step()
    steps[label] = (metrics["loss"], set_lora_tensors(m, "grad"), set_lora_tensors(m, "weight"), init)
    state.restore()
(lc, gc, wc, ic), (lr_, gr, wr, ir) = steps["comfy"], steps["lib"]
res["init_equal"] = ic.keys() == ir.keys() and all(torch.equal(ic[k], ir[k]) for k in ir)
res["loss"] = abs(lc - lr_) / abs(lr_)
res["grads_keys"] = sorted(gc) == sorted(gr) and len(gr) > 0
res["grads"] = max(rel(gc[k], gr[k]) for k in gr if gr[k].abs().max() > 0)
res["grad_norm"] = rel(torch.cat([v.flatten() for v in gc.values()]), torch.cat([gr[k].flatten() for k in gc]))
flat = lambda d: torch.cat([d[k].flatten().float() for k in sorted(wr)])  # noqa: E731
res["updated"] = float((flat(wc) - flat(wr)).norm() / flat(wr).norm())
res["updated_a"] = max(rel(wc[k], wr[k]) for k in wr if ".lora_A." in k)
res["left_as_it_was_after_trainer"] = same(before, snapshot(model, clip, vae))

# a short session through each backend, and the MODEL afterwards (twice: a cached MODEL trains again)
for label, m in (("comfy", cm), ("comfy_again", cm), ("lib", load_tiny_model())):
    request = TrainRequest(out=out_dir / label, model=m, config={"iterations": 4, "batch_size": 2, "rank": 4,
                                                                 "eval_count": 2}, preset="tiny", grid_prompts=2)
    with TrainingSession(request) as session:
        session.check()
        run = session.run()
    res[f"status_{label}"] = run.status
    res[f"after_{label}"] = run.after
res["left_as_it_was_after_sessions"] = same(before, snapshot(model, clip, vae))
sets = {k: {f.name: load_file(str(f)) for f in sorted((out_dir / k / "lora").glob("segment_*.safetensors"))}
        for k in ("comfy", "comfy_again", "lib")}
res["set_files"] = [sorted(sets[k]) for k in sets]
res["set_vs_lib"] = max(rel(sets["comfy"][f][k], sets["lib"][f][k]) for f in sets["lib"] for k in sets["lib"][f]
                        if sets["lib"][f][k].float().abs().max() > 0)
res["set_again_equal"] = all(torch.equal(sets["comfy"][f][k], sets["comfy_again"][f][k]) for f in sets["comfy"]
                             for k in sets["comfy"][f])
res["family_in_set"] = json.loads((out_dir / "comfy" / "lora" / "set.json").read_text()).get("family")
print("RESULT " + json.dumps(res))
'''


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    comfy = comfyui_or_skip()
    tmp = tmp_path_factory.mktemp("backend")
    out = run_in_comfyui(comfy, SCRIPT, tmp / "backend_side.py", tmp / "runs", timeout=1200)
    return script_result(out)


def test_the_seam_pieces_equal_the_librarys(measured):
    assert (measured["family"], measured["prediction"]) == ("tiny", "epsilon")
    assert measured["abar"] < 1e-6 and measured["values_kept_by_prepare"]
    assert measured["encoded_by_prepare"] == ["", "a red circle on a white background"]  # each prompt once
    # encoded prompts wait in host memory (thousands would hold gigabytes of a GPU); a batch is moved where the
    # network computes; they go when training ends
    assert measured["cache_devices"] == ["cpu"] and measured["batch_device"] == "meta"
    assert measured["cached_after_release"] == 0
    # a VAE on another device: the latents go to it in its dtype, the images come back where the latents are
    assert measured["decode_devices"] == ["meta", "torch.float16", "cpu", "torch.float32"]
    # a prompt over 75 tokens batches with a short one: each noise prediction as alone, CFG training runs
    assert measured["mixed_tokens"] == [77, 154, 154]
    assert measured["mixed_eps"] < 1e-5
    assert math.isfinite(measured["long_cfg_loss"])
    assert measured["cond"] < 1e-5
    for key in ("eps_999", "eps_500", "eps_21", "eps_1", "eps_per_sample"):
        assert measured[key] < 1e-5, key
    assert measured["decode"] < 1e-5 and measured["decode_grad"] < 1e-4


def test_rewards_read_the_words_of_a_prompt_written_in_comfyuis_syntax(measured):
    # the tiny CLIP reads weights and has no embeddings folder; Load Checkpoint's CLIP has both
    assert measured["syntax_tiny"] == [True, False]
    assert measured["syntax_embeddings_folder"] == [True, True]
    plain = measured["plain"]
    assert plain["(red hair:1.3), ((sky)), [moon]"] == ["red hair, sky, [moon]",  # "[...]" is no syntax of ComfyUI's
                                                       "(red hair:1.3), ((sky)), [moon]"]  # weights not read: as written
    assert plain["a photo \\(1990\\) of (a (tall:0.8) tree)"][0] == "a photo (1990) of a tall tree"
    assert plain["a photo \\(1990\\) of (a (tall:0.8) tree)"][1] == "a photo (1990) of (a (tall:0.8) tree)"
    assert plain["a (b c"] == ["a (b c"] * 2  # unbalanced: ComfyUI reads it as text
    assert plain["embedding:EasyNegative, a cat"] == ["a cat", "embedding:EasyNegative, a cat"]
    assert plain["a cat embedding:style[x] at night"] == ["a cat [x] at night", "a cat embedding:style[x] at night"]
    assert plain["a cat, (embedding:style:1.2), night"] == ["a cat, night", "a cat, (embedding:style:1.2), night"]
    assert plain["user:embedding:x"] == ["user:embedding:x"] * 2  # not a word of its own: text
    assert plain["a plain prompt"] == ["a plain prompt"] * 2
    words = ["a red circle left of a blue square on a white background", "a big (blue) square on a white background"]
    assert measured["reward_prompts"] == words
    assert measured["weights_encoded"] > 1e-3, "the CLIP no longer reads the weights"
    # the run's rewards (its training step, held-out evaluations and the before/after grid) saw only the words
    assert measured["syntax_status"] == "finished"
    assert measured["reward_saw"] == sorted(words) and measured["reward_calls"] >= 4


def test_one_training_iteration_equals_the_librarys(measured):
    assert measured["init_equal"], "a seed must initialise the same LoRA set on both backends"
    assert measured["grads_keys"]
    assert measured["loss"] < 1e-5
    assert measured["grads"] < 1e-3 and measured["grad_norm"] < 1e-4
    # Adam's first step is about lr * sign(g): an element whose gradient is near zero can move differently, so the
    # updated set is compared as a whole (relative L2), and the A matrices (moved from their equal start) elementwise
    assert measured["updated"] < 1e-4 and measured["updated_a"] < 1e-4
    assert measured["left_as_it_was_after_trainer"] is None, measured["left_as_it_was_after_trainer"]


def test_a_session_through_comfyui_writes_the_librarys_set_and_leaves_the_model(measured):
    assert measured["status_comfy"] == measured["status_lib"] == "finished"
    for key in ("tiny_alignment", "tiny_aesthetic"):
        assert abs(measured["after_comfy"][key] - measured["after_lib"][key]) < 1e-3 * abs(measured["after_lib"][key])
    assert measured["status_comfy_again"] == "finished"
    assert measured["set_files"][0] == measured["set_files"][2] == ["segment_1.safetensors", "segment_2.safetensors",
                                                                     "segment_3.safetensors"]
    assert measured["set_vs_lib"] < 1e-2, measured["set_vs_lib"]  # fp16 files after 4 iterations
    assert measured["set_again_equal"]
    assert measured["family_in_set"] == "tiny"
    assert measured["left_as_it_was_after_sessions"] is None, measured["left_as_it_was_after_sessions"]


# ----- a full-size SD1.5 checkpoint ----------------------------------------------------------------------------------
SD15_SCRIPT = r'''
import dataclasses
import json

from shortft_pack.shortft_core import TrainConfig, attach_shortcut, load_model
from shortft_pack.shortft_core.lifecycle import ModelState
from shortft_pack.shortft_core.prompts import PromptSource
from shortft_pack.shortft_core.rewards.pixel import SymmetryReward
from shortft_pack.shortft_core.testing.parity import set_lora_tensors
from shortft_pack.shortft_core.trainer import Trainer
import comfy.sd

ckpt, shortcut = ARGS
backend = pack_module("backend")
torch.set_num_threads(2)
res = {}


def rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


with torch.inference_mode():  # as CheckpointLoaderSimple makes them
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=True)[:3]
cm = backend.ComfyModel(model, clip, vae)
cm.prepare()
ref = load_model(ckpt, dtype=torch.float32)
res["family"], res["dtypes"] = cm.family, [str(cm.dtype), str(ref.dtype)]
cfg = TrainConfig(iterations=1, batch_size=1, rank=4, guidance=1.0, sample_steps=10, eval_count=0, lr=1e-3,
                  shortcut_guidance=1.0, image_size=64)
prompts = PromptSource(["a red circle left of a blue square"])
steps = {}
for label, m in (("comfy", cm), ("lib", ref)):
    state = ModelState.capture(m)
    preset = attach_shortcut(m, shortcut)
    tr = Trainer(m, SymmetryReward(), cfg, prompts, shortcut_preset=preset)
    init = set_lora_tensors(m, "weight")
    metrics = tr.train_step()
    steps[label] = (metrics["loss"], set_lora_tensors(m, "grad"), set_lora_tensors(m, "weight"), init,
                    tr.last_plan.describe())
    state.restore()
(lc, gc, wc, ic, plan), (lr_, gr, wr, ir, _) = steps["comfy"], steps["lib"]
res["plan"] = plan
res["modules"] = len(gr)
res["init_equal"] = ic.keys() == ir.keys() and all(torch.equal(ic[k], ir[k]) for k in ir)
res["loss"] = abs(lc - lr_) / abs(lr_)
flat = lambda d, keys: torch.cat([d[k].flatten().float() for k in keys])  # noqa: E731
keys = sorted(gr)
res["grad_l2"] = float((flat(gc, keys) - flat(gr, keys)).norm() / flat(gr, keys).norm())
res["grad_max"] = max(rel(gc[k], gr[k]) for k in keys if gr[k].abs().max() > 0)
res["updated_l2"] = float((flat(wc, keys) - flat(wr, keys)).norm() / flat(wr, keys).norm())
res["adapters_left"] = sorted(getattr(cm.unet, "peft_config", {}) or {})
print("RESULT " + json.dumps(res))
'''


@pytest.fixture(scope="module")
def sd15_measured(tmp_path_factory, sd15_checkpoint) -> dict:
    """One ShortFT iteration (10-step grid, 64 px, no CFG, a random rank-4 shortcut on every layer a Hyper-SD LoRA
    adapts) on the same random full-size SD1.5 checkpoint through CheckpointLoaderSimple's MODEL and the library."""
    from shortft_core.testing.random_models import write_random_shortcut

    comfy = comfyui_or_skip()
    tmp = tmp_path_factory.mktemp("backend_sd15")
    shortcut = write_random_shortcut(sd15_checkpoint, tmp / "shortcut_sd15.safetensors")
    out = run_in_comfyui(comfy, SD15_SCRIPT, tmp / "sd15_side.py", sd15_checkpoint, shortcut, timeout=1800)
    return script_result(out)


@pytest.mark.timeout(2400)
def test_one_sd15_iteration_through_checkpoint_loader_equals_the_librarys(sd15_measured):
    """fp32 on a CPU: the same loss, LoRA gradients and updated LoRAs from the MODEL ComfyUI loaded as from the
    library's own copy of the same checkpoint (the seam, the key maps and the shortcut file's layers included)."""
    m = sd15_measured
    assert m["family"] == "sd15" and m["dtypes"] == ["torch.float32", "torch.float32"]
    assert m["init_equal"] and m["modules"] > 100
    assert m["loss"] < 1e-4
    assert m["grad_l2"] < 1e-3 and m["updated_l2"] < 1e-4
    assert m["adapters_left"] == []


# ----- a full-size SD2 v-prediction network -------------------------------------------------------------------------
SD2_UNET = {  # SD 2.1's UNet (768 px, v-prediction): linear projections, 1024-wide text, heads of 64 channels
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 96,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True, "upcast_attention": True,
}
SD2_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                 "num_train_timesteps": 1000, "prediction_type": "v_prediction"}
# the layer ComfyUI reads to tell SD2's v models from its eps ones (supported_models.SD20.model_type)
V_MARKER = "up_blocks.3.attentions.2.transformer_blocks.0.norm1.bias"

SD2_SCRIPT = r'''
import json

from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from shortft_pack.shortft_core import Conditioning, NoiseSchedule
import comfy.sd
import comfy.utils

unet_file, config_file, scheduler_file = ARGS
backend, tiny = pack_module("backend"), pack_module("tiny_world")
torch.set_num_threads(2)
res = {}


def rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


with torch.inference_mode():  # as ComfyUI's diffusion-model loader makes it (a diffusers-format UNet file)
    model = comfy.sd.load_diffusion_model_state_dict(comfy.utils.load_torch_file(unet_file, safe_load=True))
    _, clip, vae = tiny.load_tiny_world()  # the text encoder and VAE play no part in the network's prediction
cm = backend.ComfyModel(model, clip, vae)
cm.prepare()
res["family"], res["prediction"], res["native"] = cm.family, cm.schedule.prediction_type, cm.native_size
res["source"] = cm.source
ref = UNet2DConditionModel.from_config(json.load(open(config_file)))
ref.load_state_dict(load_file(unet_file))
ref.eval()
schedule = NoiseSchedule.from_config(json.load(open(scheduler_file)))
res["abar"] = rel(cm.schedule.alphas_cumprod, schedule.alphas_cumprod)
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 4, 8, 8, generator=g)
hidden = 0.5 * torch.randn(2, 77, 1024, generator=g)
cond = Conditioning(hidden, None)


def reference(x, t):
    """diffusers' network predicts v; the library's schedule turns it into the noise prediction."""
    tt = torch.as_tensor(t).expand(x.shape[0]) if torch.as_tensor(t).ndim == 0 else torch.as_tensor(t)
    return schedule.eps_from(ref(x, tt, encoder_hidden_states=hidden).sample, x, tt)


with torch.no_grad():
    for t in (999, 500, 21, 1):
        res[f"eps_{t}"] = rel(cm.eps(x, t, cond), reference(x, t))
    res["eps_per_sample"] = rel(cm.eps(x, torch.tensor([981, 41]), cond), reference(x, torch.tensor([981, 41])))
w = torch.linspace(-1, 1, x.numel()).view_as(x)
xs = [x.clone().requires_grad_(True) for _ in range(2)]
(cm.eps(xs[0], 500, cond) * w).sum().backward()
(reference(xs[1], 500) * w).sum().backward()
res["grad_x"] = rel(xs[0].grad, xs[1].grad)
print("RESULT " + json.dumps(res))
'''


@pytest.fixture(scope="module")
def sd2_measured(tmp_path_factory) -> dict:
    """A random full-size SD 2.1-shaped UNet saved as a diffusers-format file (its v marker layer made wide, as a
    trained v model's is), through ComfyUI's diffusion-model loader and through diffusers."""
    import torch
    from safetensors.torch import save_file

    from shortft_core.testing.random_models import random_unet

    comfy = comfyui_or_skip()
    tmp = tmp_path_factory.mktemp("backend_sd2")
    unet = random_unet(SD2_UNET, seed=3)
    sd = {k: v.contiguous() for k, v in unet.state_dict().items()}
    sd[V_MARKER] = 0.5 * torch.randn(sd[V_MARKER].shape, generator=torch.Generator().manual_seed(4))
    del unet
    save_file(sd, str(tmp / "unet.safetensors"))
    del sd
    (tmp / "unet.json").write_text(json.dumps(SD2_UNET))
    (tmp / "scheduler.json").write_text(json.dumps(SD2_SCHEDULER))
    out = run_in_comfyui(comfy, SD2_SCRIPT, tmp / "sd2_side.py", tmp / "unet.safetensors", tmp / "unet.json",
                         tmp / "scheduler.json", timeout=1800)
    return script_result(out)


@pytest.mark.timeout(2400)
def test_an_sd2_v_prediction_network_through_comfyui_equals_diffusers(sd2_measured):
    """fp32 on a CPU: ComfyUI's own loader takes the file for an SD2 v-prediction model, and the seam's noise
    prediction through its apply_model (which returns the denoised latent) equals diffusers' v prediction turned
    into noise by the library's schedule, at every noise level and per sample, gradient included."""
    m = sd2_measured
    assert (m["family"], m["prediction"], m["native"]) == ("sd2", "v_prediction", 768)
    assert m["source"].startswith("ComfyUI MODEL (sd2, ")
    assert m["abar"] < 1e-6
    for key in ("eps_999", "eps_500", "eps_21", "eps_1", "eps_per_sample"):
        assert m[key] < 1e-4, (key, m[key])
    assert m["grad_x"] < 1e-4


# ----- families ------------------------------------------------------------------------------------------------------
FAMILY_SCRIPT = r'''
import json
from types import SimpleNamespace

import comfy.supported_models as sm

family = pack_module("family")
res = {}
for name in ("SD15", "SDXL", "SD20", "SD3", "Flux", "SSD1B", "SD21UnclipH", "FluxSchnell", "AuraFlow"):
    model = SimpleNamespace(model=SimpleNamespace(model_config=object.__new__(getattr(sm, name))))
    res[name] = family.model_family(model)
    try:
        family.trainable_family(model)
        res[name + "_refused"] = None
    except ValueError as e:
        res[name + "_refused"] = str(e)
print("RESULT " + json.dumps(res))
'''


def test_the_family_of_a_model_is_comfyuis_exact_class_and_others_are_refused_by_name(tmp_path):
    """SD1.5, SDXL, SD2, SD3 and FLUX.1 dev by ComfyUI's exact model-config class (variants built on them, such as
    SSD-1B, unCLIP or FLUX.1 schnell, are not taken for their base); every other family is refused naming it and
    what is supported."""
    comfy = comfyui_or_skip()
    out = run_in_comfyui(comfy, FAMILY_SCRIPT, tmp_path / "family_side.py", timeout=300)
    res = script_result(out)
    assert [res[k] for k in ("SD15", "SDXL", "SD20", "SD3", "Flux")] == ["sd15", "sdxl", "sd2", "sd3", "flux"]
    assert [res[k + "_refused"] for k in ("SD15", "SDXL", "SD20", "SD3", "Flux")] == [None] * 5
    for name in ("SSD1B", "SD21UnclipH", "FluxSchnell", "AuraFlow"):
        assert res[name] == name
        assert name in res[name + "_refused"] and "SD1.5, SDXL and SD2.x" in res[name + "_refused"]
        assert "SD3 / SD3.5 and FLUX.1 dev" in res[name + "_refused"]


HOLD_SCRIPT = r'''
import json
import comfy.model_management as mm

tiny, backend = pack_module("tiny_world"), pack_module("backend")
res = {}
with torch.inference_mode():
    model, clip, vae = tiny.load_tiny_world()
cm = backend.ComfyModel(model, clip, vae, cache_size=2)
device = mm.get_torch_device()


def ours():
    return sorted(type(e.model.model).__name__ for e in mm.current_loaded_models
                  if e.model is not None and (e.model.model is cm.base or e.model.model is cm.vae))


def names(entries):
    return sorted(type(e.model.model).__name__ for e in entries if e.model is not None)


encode, during = clip.encode_from_tokens, []


def encode_under_pressure(*args, **kwargs):
    """ComfyUI's own encode, then what its model management does on a device short of memory: every loaded model
    not kept is unloaded, the least used first."""
    out = encode(*args, **kwargs)
    during.append({"ours": ours(), "freed": names(mm.free_memory(1e30, device))})
    if len(during) == 4:
        raise RuntimeError("the text encoder failed")
    return out


clip.encode_from_tokens = encode_under_pressure
cm.prepare(["a red circle", "a blue square", "a green triangle"])  # three prompts, a cache of two
res["pre_encoded"] = sorted(k[0] for k in cm._conds)
res["before_placement"] = list(during)
res["placed"] = ours()
res["order_before"] = [id(e) for e in mm.current_loaded_models if e.model is not None and e.model.model is cm.base]
weights = {n: (p.device, p.data_ptr()) for n, p in cm.unet.named_parameters()}
cm.encode_prompts(["a green triangle"])  # beyond the cache: encoded mid-run
res["mid_run"] = during[-1]
res["after"] = ours()
res["kept_weights"] = weights == {n: (p.device, p.data_ptr()) for n, p in cm.unet.named_parameters()}
try:
    cm.encode_prompts(["a yellow star"])
except RuntimeError as e:
    res["error"] = str(e)
res["after_error"] = ours()
res["same_entry"] = [id(e) for e in mm.current_loaded_models
                     if e.model is not None and e.model.model is cm.base] == res["order_before"]
res["unheld_freed"] = names(mm.free_memory(1e30, device))  # the same call outside an encode reaches them
print("RESULT " + json.dumps(res))
'''


def test_a_prompt_encoded_mid_run_cannot_unload_the_network_being_trained(tmp_path):
    """Beyond the prompt cache, a prompt is encoded during training, and loading the text encoder lets ComfyUI free
    device memory by unloading other models: after prepare() placed them, the network being trained and the VAE are
    held out of that (the rest, the text encoder itself included, can still go) and are back in ComfyUI's list of
    loaded models afterwards, also when the encode fails. The stand-in for a full GPU is ComfyUI's own free_memory
    asked for more than the device has, called inside the encode."""
    comfy = comfyui_or_skip()
    out = run_in_comfyui(comfy, HOLD_SCRIPT, tmp_path / "hold_side.py", timeout=300)
    res = script_result(out)
    assert res["pre_encoded"] == ["a blue square", "a red circle"]
    assert len(res["before_placement"]) == 2  # nothing to hold before placement: ComfyUI may unload what it likes
    placed = sorted(["BaseModel", "AutoencoderKL"])
    assert res["placed"] == placed
    assert res["mid_run"]["ours"] == []  # held out while the text encoder loads
    assert "BaseModel" not in res["mid_run"]["freed"] and "AutoencoderKL" not in res["mid_run"]["freed"]
    assert res["mid_run"]["freed"], "nothing else was freed: the stand-in for a full device did not run"
    assert res["after"] == placed and res["kept_weights"]
    assert res["error"] == "the text encoder failed" and res["after_error"] == placed and res["same_entry"]
    assert "BaseModel" in res["unheld_freed"], "outside an encode the same call must reach the network"


# ----- a MODEL that computes in fp16, as ComfyUI runs SD1.5 / SDXL on a GPU ----------------------------------------
FP16_SCRIPT = r'''
import json
import math
from pathlib import Path

import comfy.model_management
from shortft_pack.shortft_core import TrainingSession, TrainRequest
from shortft_pack.shortft_core.checkpoint import CheckpointManager
from shortft_pack.shortft_core.testing.parity import TWO_PROMPTS, tiny_iteration_grads
from shortft_pack.shortft_core.tiny_world import load_tiny_rewards

tiny, backend = pack_module("tiny_world"), pack_module("backend")
res = {}
with torch.inference_mode():
    fp32 = tiny.load_tiny_world()
    cast = tiny.load_tiny_world(dtype=torch.float16)  # on a CPU ComfyUI computes fp16 weights in fp32
    manual_cast = comfy.model_management.unet_manual_cast
    comfy.model_management.unet_manual_cast = lambda *a, **k: None  # what a GPU picks for SD1.5 / SDXL in fp16
    try:
        half = tiny.load_tiny_world(dtype=torch.float16)
    finally:
        comfy.model_management.unet_manual_cast = manual_cast
res["manual_cast"] = [str(w[0].model.manual_cast_dtype) for w in (cast, half)]
alignment = load_tiny_rewards()[0]
prompts = list(TWO_PROMPTS)


def grads(world, weight, scaling=None):
    """One iteration's LoRA gradients with the reward times ``weight``, divided by it; whether the loss was scaled;
    whether the backend reports an fp16 backward."""
    m = backend.ComfyModel(*world)
    m.prepare(prompts + [""])
    return (*tiny_iteration_grads(m, alignment, weight, scaling), m.fp16_backward)


def err(a, b):
    return float((a - b).norm() / b.norm())


# weight 2^-10: per-element gradients about as small as a full-size image's
small = 2.0**-10
ref, res["scaled_fp32"], res["fp16_backward_fp32"] = grads(fp32, small)
res["fp16_backward_cast"] = grads(cast, small)[2]
half_g, res["scaled_half"], res["fp16_backward_half"] = grads(half, small)
unscaled = grads(half, small, scaling=False)[0]
res["err"], res["err_unscaled"] = err(half_g, ref), err(unscaled, ref)
res["err_weight_1"] = err(grads(half, 1.0)[0], grads(fp32, 1.0)[0])  # fp16 arithmetic's own error
res["zeroed_unscaled"] = float(((unscaled == 0) & (ref != 0)).float().mean())
# the noise prediction at a small and a large sigma: the fp16 network against the fp32 one
cm32, cm16 = backend.ComfyModel(*fp32), backend.ComfyModel(*half)
cond = cm32.encode_prompts(prompts)
x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    for t in (999, 1):
        res[f"eps_{t}"] = err(cm16.eps(x.half(), t, cond).float(), cm32.eps(x, t, cond))

# a whole session on the fp16 MODEL (two iterations, evaluations, the set written), which leaves the MODEL as it was
weights = {n: t.detach().clone() for n, t in half[0].model.state_dict().items()}
request = TrainRequest(out=Path(ARGS[0]) / "fp16_run", model=backend.ComfyModel(*half),
                       config={"iterations": 2, "batch_size": 2, "rank": 4, "eval_count": 2}, preset="tiny",
                       grid_prompts=2)
with TrainingSession(request) as session:
    session.check()
    run = session.run()
res["session"] = [run.status, session.config.mixed_precision] + [math.isfinite(v) for v in run.after.values()]
ckpt = CheckpointManager.load(sorted((Path(ARGS[0]) / "fp16_run" / "checkpoints").glob("*.pt"))[-1])
res["checkpoint_scale"] = ckpt["loss_scale"]["value"]
after = half[0].model.state_dict()
res["model_kept"] = after.keys() == weights.keys() and all(
    torch.equal(after[n], w) and after[n].dtype == w.dtype for n, w in weights.items())
print("RESULT " + json.dumps(res))
'''


def test_a_model_computing_in_fp16_trains_with_loss_scaling(tmp_path):
    """The tiny world's UNet built as ComfyUI builds SD1.5 on a GPU (fp16 weights, no manual cast: fp16
    arithmetic), its reward weighted down to a full-size image's per-element gradients: the backend reports the
    fp16 backward, the trainer scales the loss, and one iteration's LoRA gradients are as close to the fp32 MODEL's
    as at full weight (fp16 arithmetic's own error); unscaled, a large share of them is lost. fp16 weights that
    ComfyUI computes in fp32 are not scaled. The noise prediction's conversions run in fp32: at sigma 0.03 the
    fp16 network's eps stays as close to fp32's as at the largest sigma. A whole session trains that MODEL and
    leaves it as it was."""
    comfy = comfyui_or_skip()
    out = run_in_comfyui(comfy, FP16_SCRIPT, tmp_path / "fp16_side.py", tmp_path, timeout=900)
    res = script_result(out)
    assert res["manual_cast"] == ["torch.float32", "None"]
    assert (res["fp16_backward_fp32"], res["fp16_backward_cast"], res["fp16_backward_half"]) == (False, False, True)
    assert not res["scaled_fp32"] and res["scaled_half"]
    assert res["err_weight_1"] < 0.08, res
    assert res["err"] < 1.25 * res["err_weight_1"] + 0.005, res
    assert res["err_unscaled"] > 0.2 and res["zeroed_unscaled"] > 0.1, res
    assert res["eps_999"] < 2e-3 and res["eps_1"] < 2 * res["eps_999"], res
    # a session on it: finished, fp16 recorded, finite held-out rewards, the scale in its checkpoint, MODEL kept
    assert res["session"][:2] == ["finished", "fp16"] and all(res["session"][2:]), res["session"]
    assert res["checkpoint_scale"] >= 1.0 and res["model_kept"]
