"""Tier 2: training through ComfyUI's MODEL whatever attention ComfyUI was started with, in a ComfyUI subprocess.

ComfyUI computes attention with the function its flags choose. Two of them have no backward: SageAttention
(``--use-sage-attention``) is a kernel outside autograd, so q, k and v would silently get no gradient through it,
and FlashAttention (``--use-flash-attention``) is a custom op without an autograd formula, so backward fails.
Neither kernel runs on a CPU; each is emulated here by a function with the same property put where ComfyUI puts its
choice. Training's network calls compute such attention with PyTorch's SDPA instead: the LoRA gradients of one
iteration equal those under ComfyUI's CPU attention.
"""

from __future__ import annotations

import pytest

from comfy_process import script_in_comfyui

pytestmark = pytest.mark.comfyui

SCRIPT = r'''
import json

import comfy.ldm.modules.attention as attention

from shortft_pack.shortft_core.testing.parity import tiny_iteration_grads
from shortft_pack.shortft_core.tiny_world import load_tiny_rewards

tiny, backend = pack_module("tiny_world"), pack_module("backend")
res = {}


calls = {"sage": 0, "flash": 0}


@attention.wrap_attn
def attention_sage(q, k, v, heads, mask=None, **kwargs):
    """SageAttention's property: the result is computed outside autograd."""
    calls["sage"] += 1
    with torch.no_grad():
        return attention.attention_pytorch.__wrapped__(q, k, v, heads, mask=mask, **kwargs)


@torch.library.custom_op("shortft_test::opaque_attention", mutates_args=())
def opaque(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


@opaque.register_fake
def _(q, k, v):
    return torch.empty_like(q)


@attention.wrap_attn
def attention_flash(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
    """FlashAttention's property in ComfyUI: a custom op with no autograd formula (the UNet's layout only)."""
    calls["flash"] += 1
    assert mask is None and not skip_reshape and not skip_output_reshape
    b, n, inner = q.shape
    split = lambda t: t.view(b, -1, heads, inner // heads).transpose(1, 2)  # noqa: E731
    return opaque(split(q), split(k), split(v)).transpose(1, 2).reshape(b, n, inner)


with torch.inference_mode():
    model, clip, vae = tiny.load_tiny_world()
cm = backend.ComfyModel(model, clip, vae)
cm.prepare()
reward = load_tiny_rewards()[0]
res["comfy_choice"] = attention.optimized_attention.__name__
chosen = attention.optimized_attention, attention.optimized_attention_masked
grads = {"default": tiny_iteration_grads(cm, reward)[0]}
for name, function in (("sage", attention_sage), ("flash", attention_flash)):
    attention.optimized_attention = attention.optimized_attention_masked = function
    try:
        grads[name] = tiny_iteration_grads(cm, reward)[0]
        res[f"error_{name}"] = None
    except RuntimeError as e:  # backward refused
        res[f"error_{name}"] = str(e)[:300]
    except AttributeError as e:  # a LoRA that no gradient reached (its grad None)
        res[f"error_{name}"] = f"no gradient: {e}"
    finally:
        attention.optimized_attention, attention.optimized_attention_masked = chosen
    res[f"{name}_calls_in_training"] = calls[name]
    # ComfyUI's sampler keeps its choice: the network called without training's override runs the function
    with torch.no_grad():
        cond = cm.encode_prompts(["a red circle"])
        x_ve = torch.randn(1, *cm.latent_shape()) * (1.0 + cm.sampling.sigmas[500] ** 2).sqrt()
        attention.optimized_attention = attention.optimized_attention_masked = function
        try:
            cm.base.apply_model(x_ve, cm.sampling.sigmas[[500]], c_crossattn=cond.hidden)
        finally:
            attention.optimized_attention, attention.optimized_attention_masked = chosen
    res[f"{name}_calls_in_sampling"] = calls[name]
# ComfyUI's other attentions with a backward (--use-split-cross-attention, PyTorch's SDPA, the plain one) train as
# they are: they pass through the override
for name in ("attention_split", "attention_pytorch", "attention_basic"):
    attention.optimized_attention = attention.optimized_attention_masked = getattr(attention, name)
    try:
        grads[name] = tiny_iteration_grads(cm, reward)[0]
    finally:
        attention.optimized_attention, attention.optimized_attention_masked = chosen
ref = grads["default"]
res["norm"] = float(ref.norm())
res["rel"] = {name: float((g - ref).norm() / ref.norm()) for name, g in grads.items() if name != "default"}
print("RESULT " + json.dumps(res))
'''


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    return script_in_comfyui(tmp_path_factory, "attention", SCRIPT)


def test_attention_without_a_backward_trains_as_comfyuis_cpu_attention(measured):
    assert measured["norm"] > 0
    assert measured["error_sage"] is None and measured["error_flash"] is None, measured
    assert measured["rel"]["sage"] < 1e-4, measured["rel"]
    assert measured["rel"]["flash"] < 1e-4, measured["rel"]
    for name in ("attention_split", "attention_pytorch", "attention_basic"):
        assert measured["rel"][name] < 1e-4, measured["rel"]


def test_sampling_keeps_the_attention_comfyui_chose(measured):
    for name in ("sage", "flash"):
        assert measured[f"{name}_calls_in_training"] == 0
        assert measured[f"{name}_calls_in_sampling"] > 0
