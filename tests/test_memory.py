"""Frozen convolutions keep only their weight for backward: same outputs and gradients, less activation memory."""

import torch

from shortft_core.adapters import SHORTCUT_TARGETS, AdapterSwitch, adapter_parameters, add_lora
from shortft_core.memory import lean_frozen_convs, lean_geglu, lean_saved_activations
from shortft_core.profiling import kept_for_backward
from shortft_core.tiny_world import load_tiny_model


def _kept(fn, module=None):
    """(fn's result, bytes autograd keeps for backward), ``module``'s weights excluded (they exist anyway)."""
    return kept_for_backward(fn, module.parameters() if module is not None else ())


def test_frozen_conv_gradients_are_unchanged_for_strides_groups_and_padding():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(),
                              torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2), torch.nn.SiLU(),
                              torch.nn.Conv2d(8, 6, 1), torch.nn.SiLU(), torch.nn.Conv2d(6, 3, 3, stride=2))
    net.requires_grad_(False)
    x = torch.randn(2, 4, 13, 11)  # odd sizes: a stride-2 input shape is not recoverable from the output

    def run():
        xi = x.clone().requires_grad_(True)
        out, kept = _kept(lambda: net(xi))
        out.square().sum().backward()
        return out.detach(), xi.grad, kept

    out0, grad0, kept0 = run()
    assert lean_frozen_convs(net, devices=None) == 4 and lean_frozen_convs(net, devices=None) == 0  # idempotent
    out1, grad1, kept1 = run()
    assert torch.equal(out0, out1)
    assert torch.allclose(grad0, grad1, rtol=1e-6, atol=1e-7), (grad0 - grad1).abs().max()
    assert kept1 < 0.7 * kept0, (kept1, kept0)  # only the SiLUs' inputs remain


def test_a_trained_conv_keeps_its_input_and_gets_its_gradient():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    ref = torch.nn.Conv2d(4, 4, 3, padding=1)
    ref.load_state_dict(conv.state_dict())
    lean_frozen_convs(conv, devices=None)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    conv(x).sum().backward()
    ref(x.detach().requires_grad_(True)).sum().backward()
    assert torch.allclose(conv.weight.grad, ref.weight.grad) and conv.weight.grad.abs().sum() > 0


def test_geglu_recomputes_its_gelu_with_identical_gradients():
    from diffusers.models.activations import GEGLU

    torch.manual_seed(0)
    ff = GEGLU(16, 32)
    x = torch.randn(2, 5, 16)

    def run():
        xi = x.clone().requires_grad_(True)
        ff.zero_grad()
        out, kept = _kept(lambda: ff(xi))
        (out * torch.linspace(-1, 1, 32)).sum().backward()
        return out.detach(), xi.grad, ff.proj.weight.grad.clone(), kept

    out0, gx0, gw0, kept0 = run()
    assert lean_geglu(ff, devices=None) == 1 and lean_geglu(ff, devices=None) == 0
    out1, gx1, gw1, kept1 = run()
    assert torch.equal(out0, out1) and torch.equal(gx0, gx1) and torch.equal(gw0, gw1)
    assert kept1 < kept0  # gelu(gate), a third of what the feed-forward kept, is no longer stored
    with torch.no_grad():
        assert torch.equal(ff(x), out0)


def _unet_step(model, names):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *model.latent_shape(), generator=g).requires_grad_(True)
    cond = model.encode_prompts(["a red circle left of a blue square", "a green triangle"])
    params = [p for n in names for p in adapter_parameters(model.unet, n)]
    for p in params:
        p.grad = None
    both = torch.nn.ModuleList([model.unet, model.vae])
    out, kept = _kept(lambda: model.decode(model.eps(x, torch.tensor([741, 241]), cond)), both)
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in params], x.grad.clone(), kept


def test_tiny_unet_and_vae_keep_less_and_train_the_same():
    """An attention LoRA (trained, like ShortFT's set) stacked with a conv-and-attention LoRA (frozen, like the
    shortcut), decoded by the VAE: LoRA and input gradients equal, less kept for backward."""
    model = load_tiny_model()
    add_lora(model.unet, "align", 4, seed=1)
    add_lora(model.unet, "short", 4, targets=SHORTCUT_TARGETS, seed=2)
    with torch.no_grad():  # B starts at zero: give both an effect
        for p in adapter_parameters(model.unet, "align") + adapter_parameters(model.unet, "short"):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    for p in adapter_parameters(model.unet, "short"):
        p.requires_grad_(False)
    AdapterSwitch(model.unet).activate(["align", "short"])
    out0, grads0, xg0, kept0 = _unet_step(model, ["align"])
    n = lean_saved_activations(model.unet, model.vae, devices=None)
    assert n > 20
    out1, grads1, xg1, kept1 = _unet_step(model, ["align"])
    assert torch.equal(out0, out1)
    for a, b in zip(grads0, grads1):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-8), (a - b).abs().max()
    assert torch.allclose(xg0, xg1, rtol=1e-4, atol=1e-8)
    assert kept1 < 0.8 * kept0, (kept1, kept0)  # 0.69 measured (activations, UNet + VAE); SD1.5: BENCHMARKS.md
    # the shortcut's conv LoRAs made trainable again (as the distiller does): they get the same gradients as
    # without the switch, because a trained convolution keeps the normal path
    for p in adapter_parameters(model.unet, "short"):
        p.requires_grad_(True)
    lean = _unet_step(model, ["short"])[1]
    fresh = load_tiny_model()
    add_lora(fresh.unet, "align", 4, seed=1)
    add_lora(fresh.unet, "short", 4, targets=SHORTCUT_TARGETS, seed=2)
    fresh.unet.load_state_dict(model.unet.state_dict())
    AdapterSwitch(fresh.unet).activate(["align", "short"])
    plain = _unet_step(fresh, ["short"])[1]
    assert any(g.abs().sum() > 0 for g in plain)
    for a, b in zip(lean, plain):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-8), (a - b).abs().max()


def test_the_trainer_switches_the_frozen_convolutions_and_geglus(tmp_path, tiny_rewards, fresh_tiny):
    from shortft_core.tiny_world import held_out_prompts
    from shortft_core.trainer import PromptSource, TrainConfig, Trainer

    model = fresh_tiny()
    from diffusers.models.activations import GEGLU

    convs = [m for net in (model.unet, model.vae) for m in net.modules() if type(m) in (torch.nn.Conv2d, GEGLU)]
    Trainer(model, tiny_rewards[0], TrainConfig(iterations=1, batch_size=1, rank=4, eval_prompts=0),
            PromptSource(held_out_prompts(2)), out=tmp_path)
    assert convs and all(getattr(m, "_shortft_lean", None) == ("cuda",) for m in convs)  # the lean path on CUDA


def test_the_lean_path_is_taken_only_on_its_devices():
    conv = torch.nn.Conv2d(2, 2, 3, padding=1).requires_grad_(False)
    lean_frozen_convs(conv)  # default: CUDA only
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    assert type(conv(x).grad_fn).__name__ == "ConvolutionBackward0"  # autograd's own path on CPU
    conv2 = torch.nn.Conv2d(2, 2, 3, padding=1).requires_grad_(False)
    lean_frozen_convs(conv2, devices=("cpu",))
    assert "FrozenConv2d" in type(conv2(x).grad_fn).__name__
