"""Tier 2: MODELs whose weights ComfyUI stores in fp8 (Load Diffusion Model's ``weight_dtype`` fp8_e4m3fn, or
``--fp8_e4m3fn-unet``): ComfyUI computes them in a wider dtype (fp32 on a CPU, fp16 or bf16 on a GPU), and so do
training and ApplyAlignedLoRA. The tiny world built in fp8, in a ComfyUI subprocess."""

from __future__ import annotations

import pytest

from comfy_harness import comfyui_or_skip
from comfy_process import run_in_comfyui, script_result

pytestmark = pytest.mark.comfyui

SCRIPT = r'''
import json

import comfy.cli_args
import comfy.model_management
import comfy.ops
import comfy.sample
import comfy.utils
from shortft_pack.shortft_core import LoraSet, tiny_shortcut_path
from shortft_pack.shortft_core.adapters import remove_adapters
from shortft_pack.shortft_core.testing.parity import tiny_iteration_grads
from shortft_pack.shortft_core.tiny_world import load_tiny_rewards

tiny, backend, apply = pack_module("tiny_world"), pack_module("backend"), pack_module("apply")
set_folder = ARGS[0]
res = {}


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


with torch.inference_mode():
    fp8 = tiny.load_tiny_world(dtype=torch.float8_e4m3fn)
    same = tiny.load_tiny_world()  # fp32, holding the fp8 network's and text encoder's values
    for a, b in ((fp8[0].model.diffusion_model, same[0].model.diffusion_model),
                 (fp8[1].cond_stage_model, same[1].cond_stage_model)):
        held = a.state_dict()
        for name, t in b.state_dict().items():
            t.copy_(held[name].float())
    values = fp8[0].model.diffusion_model.state_dict()
unet = fp8[0].model.diffusion_model
res["weight_dtypes"] = sorted({str(p.dtype) for p in unet.parameters()})

# training: one iteration on the fp8 MODEL equals one on the fp32 MODEL of the same values
m8, m32 = backend.ComfyModel(*fp8), backend.ComfyModel(*same)
res["dtype"] = str(m8.dtype)
m8.prepare()
m32.prepare()
alignment = load_tiny_rewards()[0]
g8, res["scaled"] = tiny_iteration_grads(m8, alignment)
g32, _ = tiny_iteration_grads(m32, alignment)
res["grads"] = rel(g8, g32)
res["grads_nonzero"] = float(g8.abs().max())
m8.load_lora(tiny_shortcut_path(), "probe")
res["shortcut_dtypes"] = sorted({str(p.dtype) for n, p in unet.named_parameters() if ".probe." in n})
remove_adapters(unet, ["probe"])
res["weights_kept"] = all(torch.equal(t.float(), values[n].float()) and t.dtype == values[n].dtype
                          for n, t in unet.state_dict().items())

# ApplyAlignedLoRA: a patched fp8 weight is what ComfyUI's own patcher makes of the same patch
with torch.inference_mode():
    model, clip = fp8[0], fp8[1]
    lset = LoraSet.open(set_folder)
    one = apply.timestep_aware(model, lset, 1.0)
    weights = one.wrappers["apply_model"][apply.WRAPPER_KEY][0].weights
    keys = sorted(weights.patches[0])[:6]
    exact = []
    for key in keys:
        stock = model.clone()
        stock.add_patches({key: weights.patches[0][key]}, 1.0)
        ours = weights._patch(key, comfy.utils.get_attr(model.model, key), weights.patches[0][key])
        theirs = stock.patch_weight_to_device(key, return_weight=True)
        exact.append(ours.dtype == theirs.dtype == torch.float8_e4m3fn and torch.equal(ours.float(), theirs.float()))
    res["patch_as_comfyui"] = exact

    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a red circle left of a blue square"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))

    def sample(m):
        z = torch.zeros(1, 4, 8, 8)
        return comfy.sample.sample(m, comfy.sample.prepare_noise(z, 7), 4, 3.0, "euler", "simple", pos, neg, z,
                                   disable_pbar=True, seed=7)

    plain = sample(model)
    measured_cost = apply.BYPASS_COST
    apply.BYPASS_COST = 0.0  # every layer bypassed: the base's fp8 values plus the exact low-rank product
    bypassed = sample(one)
    apply.BYPASS_DEVICES = frozenset()  # every layer patched, as on a GPU
    patched = sample(one)
    res["effect"], res["patched_vs_bypassed"] = rel(bypassed, plain), rel(patched, bypassed)
    res["plain_again"] = rel(sample(model), plain)

# fp8 weights on a GPU that computes in fp8 (Load Diffusion Model's fp8_e4m3fn_fast, or --fast): ComfyUI's fp8 matmul
# layers, emulated on the CPU by ComfyUI's own choice of them (the CPU runs torch._scaled_mm); training computes them
# by the cast path, so one iteration equals the fp8 MODEL's above; sampling keeps the fp8 path
fast, fp8_compute = comfy.cli_args.args.fast, comfy.model_management.supports_fp8_compute
comfy.cli_args.args.fast = {comfy.cli_args.PerformanceFeature.Fp8MatrixMultiplication}
comfy.model_management.supports_fp8_compute = lambda device=None: True
try:
    with torch.inference_mode():
        quick = tiny.load_tiny_world(dtype=torch.float8_e4m3fn)
finally:
    comfy.cli_args.args.fast, comfy.model_management.supports_fp8_compute = fast, fp8_compute
layers = [m for m in quick[0].model.diffusion_model.modules() if isinstance(m, comfy.ops.fp8_ops.Linear)]
res["fp8_matmul_layers"] = len(layers)
fp8_calls = []
fp8_linear = comfy.ops.fp8_linear


def counted(*args, **kwargs):
    fp8_calls.append(1)
    return fp8_linear(*args, **kwargs)


comfy.ops.fp8_linear = counted
mq = backend.ComfyModel(*quick)
mq.prepare()
gq, _ = tiny_iteration_grads(mq, alignment)
res["fast_grads"] = rel(gq, g8)
res["fast_calls_in_training"] = len(fp8_calls)
res["fast_overrides_left"] = sum("forward" in vars(m) for m in layers)
with torch.inference_mode():
    sample(quick[0])
res["fast_calls_in_sampling"] = len(fp8_calls)
comfy.ops.fp8_linear = fp8_linear
print("RESULT " + json.dumps(res))
'''


def write_tiny_set(folder) -> None:
    """A random four-segment LoRA set of the tiny UNet (every segment differs)."""
    from shortft_core import load_tiny_model
    from shortft_core.adapters import LoraSetSpec
    from shortft_core.lora_set import export_lora_set
    from shortft_core.testing.random_models import randomise_lora_b_

    model = load_tiny_model()
    spec = LoraSetSpec(rank=4)
    spec.add_to(model.unet, seed=1)
    randomise_lora_b_(model.unet, seed=2, std=0.3)
    export_lora_set(model.unet, spec, folder, family="tiny")


@pytest.fixture(scope="module")
def res(tmp_path_factory) -> dict:
    comfy = comfyui_or_skip()
    tmp = tmp_path_factory.mktemp("fp8")
    write_tiny_set(tmp / "set")
    return script_result(run_in_comfyui(comfy, SCRIPT, tmp / "fp8_side.py", tmp / "set", timeout=900))


def test_an_fp8_model_trains_and_takes_the_set_as_comfyui_computes_it(res):
    """Weights in fp8, computed in fp32 on a CPU: the seam's dtype (the chain's latents, the shortcut's adapter) is
    fp32; one training iteration's LoRA gradients equal an fp32 MODEL's holding the same values, and the MODEL
    keeps its fp8 weights. ApplyAlignedLoRA's patched fp8 weights are bit for bit what ComfyUI's own patcher makes
    (computed wider, rounded back stochastically: added in fp8 the delta was lost), and sampling with them is close
    to the exact bypass, while the set changes the result by far more."""
    assert "torch.float8_e4m3fn" in res["weight_dtypes"]
    assert res["dtype"] == "torch.float32" and not res["scaled"]
    assert res["grads"] < 1e-4 and res["grads_nonzero"] > 0
    assert res["shortcut_dtypes"] == ["torch.float32"]
    assert res["weights_kept"]
    assert res["patch_as_comfyui"] == [True] * 6
    assert res["effect"] > 0.1 and res["patched_vs_bypassed"] < 0.2 * res["effect"], res
    assert res["plain_again"] == 0.0


def test_fp8_matmul_layers_train_by_comfyuis_cast_path_and_sample_in_fp8(res):
    """ComfyUI's fp8 matmul layers (fp8 weights on a GPU computing in fp8: emulated on the CPU, which runs
    torch._scaled_mm) clamp their input in place and have no backward, so training failed at its first backward:
    training computes them by ComfyUI's cast path (one iteration's gradients equal the fp8 MODEL's computed by manual
    cast) and gives them back their fp8 path, which sampling then takes."""
    assert res["fp8_matmul_layers"] > 50
    assert res["fast_grads"] < 1e-6, res["fast_grads"]
    assert res["fast_calls_in_training"] == 0 and res["fast_overrides_left"] == 0
    assert res["fast_calls_in_sampling"] > 0
