"""Tier 2: the two ways ApplyAlignedLoRA puts a segment's LoRA on a layer (nodes/apply.py) compute the same sampling,
in a ComfyUI subprocess on a random full-size SD1.5 checkpoint: the bypass (base output + the low-rank product, what
a CPU layer runs while it costs less than a patch) and the patched weight (base + delta, what a GPU layer runs), for
one set and for two sets stacked. Bypass patches nothing; afterwards the MODEL's weights and modules are as loaded.
The switch counts the calls a segment has left from the run's schedule, and patches a CPU layer once the bypass's
cost over those calls (known after one bypassed call at the size) exceeds that layer's patch, layer by layer. A MODEL
whose weights DynamicVRAM streams bypasses every layer (a patched tensor would go unseen), with the same result.
"""

from __future__ import annotations

import json

import pytest

from comfy_harness import comfyui_or_skip
from comfy_process import run_in_comfyui

pytestmark = pytest.mark.comfyui

SCRIPT = r'''
import json

import comfy.lora
import comfy.sample
import comfy.sd

from shortft_pack.shortft_core import LoraSet

apply = pack_module("apply")
ckpt, set_a, set_b, out = ARGS
calls = {"patch": 0}
calculate_weight = comfy.lora.calculate_weight


def counting(*args, **kwargs):
    calls["patch"] += 1
    return calculate_weight(*args, **kwargs)


comfy.lora.calculate_weight = counting


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


res = {}
with torch.inference_mode():
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=False, output_clip=True,
                                                              embedding_directory=None)
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a red circle left of a blue square"))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))

    def sample(m, steps=4, size=8):
        z = torch.zeros(1, 4, size, size)
        return comfy.sample.sample(m, comfy.sample.prepare_noise(z, 7), steps, 3.0, "euler", "simple", positive,
                                   negative, z, disable_pbar=True, seed=7)

    unet = model.model.diffusion_model
    plain = sample(model)
    loaded = {n: t.clone() for n, t in model.model.state_dict().items()}
    one = apply.timestep_aware(model, LoraSet.open(set_a), 1.0)
    two = apply.timestep_aware(one, LoraSet.open(set_b), 0.7)
    weights = one.wrappers["apply_model"][apply.WRAPPER_KEY][0].weights
    patched_keys, bypassed_keys = weights.split(model.model, 1)
    res["split_cpu"] = [len(patched_keys), len(bypassed_keys)]

    measured_cost, apply.BYPASS_COST = apply.BYPASS_COST, 0.0  # every CPU layer bypasses, whatever its positions
    calls["patch"] = 0
    bypass = {"one": sample(one), "two": sample(two)}
    res["patches_bypass"] = calls["patch"]
    res["forwards_left"] = sum("forward" in m.__dict__ for m in unet.modules())

    apply.BYPASS_DEVICES = frozenset()
    res["split_patching"] = [len(k) for k in weights.split(model.model, 1)]
    patched = {"one": sample(one), "two": sample(two)}
    res["patches_patching"] = calls["patch"]

    res["one"] = rel(bypass["one"], patched["one"])
    res["two"] = rel(bypass["two"], patched["two"])
    res["effect_one"] = rel(patched["one"], plain)
    res["effect_two"] = rel(patched["two"], patched["one"])
    res["unchanged"] = all(torch.equal(t, loaded[n]) for n, t in model.model.state_dict().items())
    res["plain_again"] = rel(sample(model), plain)
    res["forwards_left"] += sum("forward" in m.__dict__ for m in unet.modules())

    # the calls each segment has left, as the switch counts them from the run's schedule
    apply.BYPASS_DEVICES, apply.BYPASS_COST = frozenset({"cpu"}), measured_cost
    seen, applied = [], apply.SegmentWeights.applied

    def recording(self, base_model, j, shape=(), calls_left=1):
        seen.append([j, calls_left])
        return applied(self, base_model, j, shape, calls_left)

    apply.SegmentWeights.applied = recording
    sample(one, steps=8)
    apply.SegmentWeights.applied = applied
    res["calls_left"] = seen

    # a bypass dearer than any patch: at a size not seen yet the first call bypasses (and counts its positions),
    # the three later segments patch; the result is the same
    apply.BYPASS_COST = 1e9
    calls["patch"] = 0
    costly = sample(one, size=16)
    res["patches_costly"] = calls["patch"]
    apply.BYPASS_DEVICES = frozenset()
    all_patched = {4: sample(one, size=16), 8: sample(one, steps=8, size=16)}
    res["costly"] = rel(costly, all_patched[4])

    # layer by layer at the measured cost, 128 px (positions counted above): a segment patches its
    # high-resolution layers and bypasses the low-resolution ones; each patched layer is patched once per segment
    apply.BYPASS_DEVICES, apply.BYPASS_COST = frozenset({"cpu"}), measured_cost
    shape = next(s for s in weights.positions if s[-2:] == (16, 16))
    res["shape"] = list(shape)
    top = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    low = "diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight"
    split = {n: weights.split(model.model, 1, shape, n) for n in (1, 2, 8)}
    res["split_layers"] = {n: [len(p), len(b)] for n, (p, b) in split.items()}
    res["grows"] = set(split[1][0]) <= set(split[2][0]) <= set(split[8][0])
    res["top_low"] = [top in split[1][0], low in split[8][1]]
    expected = sum(len(weights.split(model.model, j, shape, 2)[0]) for j in range(1, 5))
    calls["patch"] = 0
    mixed = sample(one, steps=8, size=16)
    res["patches_mixed"] = [calls["patch"], expected]
    res["mixed"] = rel(mixed, all_patched[8])

    # a MODEL whose weights DynamicVRAM streams (a patcher reporting it, as ModelPatcherDynamic does on a GPU): every
    # layer bypasses, also where the static MODEL patches (a bypass dearer than any patch), with the same result
    import comfy.model_patcher

    class Streamed(comfy.model_patcher.ModelPatcher):
        def is_dynamic(self):
            return True

    streamed_model = Streamed(model.model, model.load_device, model.offload_device)
    streamed = apply.timestep_aware(streamed_model, LoraSet.open(set_a), 1.0)
    apply.BYPASS_COST = 1e9
    calls["patch"] = 0
    res["streamed"] = rel(sample(streamed, size=16), all_patched[4])
    res["patches_streamed"] = calls["patch"]
    streamed_weights = streamed.wrappers["apply_model"][apply.WRAPPER_KEY][0].weights
    res["streamed_split"] = [len(k) for k in streamed_weights.split(model.model, 1, shape, 8)]
    bypassable, apply._bypassable = apply._bypassable, lambda patch, module: False  # a key no bypass can run
    try:
        apply.timestep_aware(streamed_model, LoraSet.open(set_a), 1.0)
        res["streamed_refused"] = None
    except ValueError as e:
        res["streamed_refused"] = str(e)
    res["static_takes_it"] = apply.timestep_aware(model, LoraSet.open(set_a), 1.0) is not None
    apply._bypassable = bypassable
open(out, "w").write(json.dumps(res))
'''


def write_set(folder, seed: int, rank: int) -> None:
    """A random four-segment SD1.5 LoRA set (every segment differs) in ``folder``."""
    from shortft_core.adapters import LoraSetSpec
    from shortft_core.lora_set import export_lora_set
    from shortft_core.testing.random_models import random_unet, randomise_lora_b_

    unet = random_unet("sd15", seed=seed)
    spec = LoraSetSpec(rank=rank)
    spec.add_to(unet, seed=seed + 1)
    randomise_lora_b_(unet, seed=seed + 2, std=0.3)
    export_lora_set(unet, spec, folder, family="sd15")


@pytest.mark.timeout(1200)
def test_bypass_and_patched_weights_sample_the_same(tmp_path, sd15_checkpoint):
    """One set and two stacked sets, euler / simple 4 steps (one step per segment), 64 px: the bypass every CPU
    layer runs equals the patched weights to float rounding, computes no patch, and leaves no forward behind; the
    sets change the result by far more than that."""
    comfy = comfyui_or_skip()
    write_set(tmp_path / "set_a", seed=3, rank=4)
    write_set(tmp_path / "set_b", seed=11, rank=8)
    out = tmp_path / "res.json"
    run_in_comfyui(comfy, SCRIPT, tmp_path / "switch_side.py", str(sd15_checkpoint), str(tmp_path / "set_a"),
                   str(tmp_path / "set_b"), str(out), timeout=1100)
    res = json.loads(out.read_text())
    print(res)
    patched, bypassed = res["split_cpu"]
    assert patched == 0 and bypassed > 100  # every adapted SD1.5 layer is a linear or convolution
    assert res["split_patching"] == [bypassed, 0]
    assert res["patches_bypass"] == 0
    assert res["patches_patching"] > 4 * bypassed  # four segments of set a, four of set b on top
    assert res["one"] < 1e-5 and res["two"] < 1e-5
    assert res["effect_one"] > 1e-2 and res["effect_two"] > 1e-2
    assert res["unchanged"] and res["plain_again"] == 0.0
    assert res["forwards_left"] == 0
    # euler / simple 8 steps: 999, 874 | 749, 624 | 499, 374 | 249, 124, two calls in each segment
    assert res["calls_left"] == [[1, 2], [1, 1], [2, 2], [2, 1], [3, 2], [3, 1], [4, 2], [4, 1]]
    assert res["patches_costly"] == 3 * bypassed and res["costly"] < 1e-5
    # per layer: patched and bypassed layers in one call, more layers patched the more calls a segment has left
    assert res["shape"] == [2, 4, 16, 16]  # cond and uncond in one call
    layers = res["split_layers"]
    assert all(p > 0 and b > 0 and p + b == bypassed for p, b in layers.values())
    assert res["grows"] and layers["1"][0] < layers["8"][0]
    assert res["top_low"] == [True, True]
    assert res["patches_mixed"][0] == res["patches_mixed"][1] > 0
    assert res["mixed"] < 1e-5
    # streamed weights (DynamicVRAM): a patched tensor would go unseen, so every layer bypasses, whatever it costs
    assert res["patches_streamed"] == 0 and res["streamed_split"] == [0, bypassed]
    assert res["streamed"] < 1e-5
    message = res["streamed_refused"]
    assert message is not None and "no plain LoRA" in message and "'merged'" in message, message
    assert "--disable-dynamic-vram" in message and res["static_takes_it"]
