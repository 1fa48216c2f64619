"""Frozen convolutions keep only their weight for backward: same outputs and gradients, less activation memory."""

import pytest
import torch

from shortft_core.adapters import SHORTCUT_TARGETS, AdapterSwitch, adapter_parameters, add_lora
from shortft_core.memory import (layer_norm_saving_output, lean_frozen_convs, lean_geglu, lean_norm_act,
                                 lean_saved_activations)
from shortft_core.testing.profiling import kept_for_backward
from shortft_core.loading import load_tiny_model


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


def _resnet(**kw):
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=8, out_channels=16, temb_channels=12, groups=4, **kw)
    with torch.no_grad():  # GroupNorm starts at weight 1, bias 0: make its affine part matter to the gradient
        for norm in (block.norm1, block.norm2):
            norm.weight.add_(0.3 * torch.randn_like(norm.weight))
            norm.bias.add_(0.3 * torch.randn_like(norm.bias))
    return block


def _block_step(block, x, temb, train_norms=False):
    block.requires_grad_(False)
    for norm in (block.norm1, block.norm2):
        norm.requires_grad_(train_norms)
        norm.weight.grad = norm.bias.grad = None
    xi, ti = x.clone().requires_grad_(True), temb.clone().requires_grad_(True)
    out, kept = _kept(lambda: block(xi, ti), block)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    norms = [g.clone() for n in (block.norm1, block.norm2) for g in (n.weight.grad, n.bias.grad) if g is not None]
    return out.detach(), xi.grad, ti.grad, norms, kept


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_a_layer_norm_saving_its_output_lets_the_stream_change_in_place(dtype, tol):
    """x += f(norm(x)), as FLUX's blocks update their residual stream: with layer_norm autograd refuses backward (x
    changed since it was saved); the norm that keeps its output gives the same values and the reference gradient."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 5, 16, generator=g, dtype=dtype) * 3 + 1
    w = torch.randn(16, 16, generator=g, dtype=dtype)

    def run(norm):
        x0 = base.clone().requires_grad_(True)
        x = x0 * 1.0  # a non-leaf stream, as between blocks
        x += torch.tanh(norm(x) @ w)
        x += torch.tanh(norm(x) @ w.T)
        x.square().sum().backward()
        return x.detach(), x0.grad

    shape = (16,)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        run(lambda x: torch.nn.functional.layer_norm(x, shape, eps=1e-6))
    out, grad = run(lambda x: layer_norm_saving_output(x, shape, 1e-6))

    def reference(x0):  # the same function without the in-place updates
        x = x0 + torch.tanh(torch.nn.functional.layer_norm(x0, shape, eps=1e-6) @ w)
        return x + torch.tanh(torch.nn.functional.layer_norm(x, shape, eps=1e-6) @ w.T)

    x0 = base.clone().requires_grad_(True)
    want = reference(x0)
    want.square().sum().backward()
    assert torch.equal(out, want.detach())  # the forward is layer_norm's own kernel
    assert torch.allclose(grad, x0.grad, rtol=tol, atol=tol), float((grad - x0.grad).abs().max())


def test_groupnorm_silu_pairs_keep_only_the_norm_input_with_identical_gradients():
    block = _resnet()
    x, temb = torch.randn(2, 8, 9, 7), torch.randn(2, 12)
    ref = _block_step(block, x, temb, train_norms=True)
    before = _block_step(block, x, temb)
    assert lean_norm_act(block, devices=None) == 2 and lean_norm_act(block, devices=None) == 0  # idempotent
    after = _block_step(block, x, temb)
    out0, gx0, gt0, _, kept0 = before
    out1, gx1, gt1, _, kept1 = after
    assert torch.equal(out0, out1) and torch.equal(gx0, gx1) and torch.equal(gt0, gt1)
    # norm1 keeps x, norm2 keeps conv1's output; unfused each SiLU kept a second tensor of the same size
    assert kept1 < 0.75 * kept0, (kept1, kept0)
    # a trained norm gets the same weight and bias gradients through the recomputation
    lean = _block_step(block, x, temb, train_norms=True)
    assert torch.equal(lean[1], ref[1]) and len(lean[3]) == 4
    for a, b in zip(lean[3], ref[3]):
        assert torch.equal(a, b) and a.abs().sum() > 0
    with torch.no_grad():  # no graph: the ordinary path, same output
        assert torch.equal(block(x, temb), out0)


def test_groupnorm_silu_fusion_leaves_a_scale_shift_norm_alone_and_follows_autocast(monkeypatch):
    block = _resnet(time_embedding_norm="scale_shift")
    x, temb = torch.randn(2, 8, 6, 6), torch.randn(2, 12)
    before = _block_step(block, x, temb)
    assert lean_norm_act(block, devices=None) == 1  # norm2 has a scale/shift before the SiLU: not a pair
    after = _block_step(block, x, temb)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    # backward recomputes the pair under the autocast state of the forward (on CUDA autocast runs group_norm in
    # fp32; CPU autocast leaves it alone, so the state itself is what is checked here)
    seen = []
    group_norm = torch.nn.functional.group_norm

    def spy(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return group_norm(*args, **kwargs)

    plain = _resnet()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _block_step(plain, x, temb)
        lean_norm_act(plain, devices=None)
        xi = x.clone().requires_grad_(True)
        monkeypatch.setattr(torch.nn.functional, "group_norm", spy)
        out = plain(xi, temb)
    assert seen == [True, True]  # the two fused norms' forwards
    out.float().mul(torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()  # outside autocast
    assert seen == [True] * 4, seen  # their recomputations in backward, under the forward's autocast
    assert ref[0].dtype == torch.bfloat16 and torch.equal(ref[0], out.detach())
    assert torch.equal(ref[1], xi.grad)


def test_an_activation_outside_a_fused_pair_still_applies():
    """The block's SiLU also activates the time embedding, which no norm produced."""
    block = _resnet()
    lean_norm_act(block, devices=None)
    t = torch.randn(3, 12, requires_grad=True)
    assert torch.equal(block.nonlinearity(t), torch.nn.functional.silu(t))
    x = torch.randn(1, 8, 4, 4, requires_grad=True)
    once = block.norm1(x)  # the fused pair's output, consumed by the activation that follows it
    assert torch.equal(block.nonlinearity(once), torch.nn.functional.silu(torch.nn.functional.group_norm(
        x, 4, block.norm1.weight, block.norm1.bias, block.norm1.eps)))
    assert torch.equal(block.nonlinearity(once), torch.nn.functional.silu(once))  # not skipped a second time


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
    from shortft_core.prompts import PromptSource
    from shortft_core.trainer import Trainer
    from shortft_core.config import TrainConfig

    model = fresh_tiny()
    from diffusers.models.activations import GEGLU

    from shortft_core.memory import _pairs

    convs = [m for net in (model.unet, model.vae) for m in net.modules() if type(m) in (torch.nn.Conv2d, GEGLU)]
    convs += [norm for net in (model.unet, model.vae) for norm, _ in _pairs(net)]
    Trainer(model, tiny_rewards[0], TrainConfig(iterations=1, batch_size=1, rank=4, eval_count=0),
            PromptSource(held_out_prompts(2)), out=tmp_path)
    assert convs and all(m._shortft_lean.devices == ("cuda",) for m in convs)  # the lean path on CUDA


def test_the_lean_path_is_taken_only_on_its_devices():
    conv = torch.nn.Conv2d(2, 2, 3, padding=1).requires_grad_(False)
    lean_frozen_convs(conv)  # default: CUDA only
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    assert type(conv(x).grad_fn).__name__ == "ConvolutionBackward0"  # autograd's own path on CPU
    conv2 = torch.nn.Conv2d(2, 2, 3, padding=1).requires_grad_(False)
    lean_frozen_convs(conv2, devices=("cpu",))
    assert "FrozenConv2d" in type(conv2(x).grad_fn).__name__


def test_a_host_names_its_layer_classes_and_gates_each_call():
    """A host's own Conv2d subclass is switched only when named in ``kinds``; its ``gate`` is asked on each call
    that could go lean (not under no_grad) and, answering False, sends the call to the layer's own forward."""

    class HostConv(torch.nn.Conv2d):
        pass

    calls = []

    def gate(layer):
        calls.append(layer)
        return layer.allow

    conv = HostConv(2, 2, 3, padding=1).requires_grad_(False)
    assert lean_frozen_convs(conv, devices=None) == 0  # not a plain Conv2d: left to the host
    assert lean_frozen_convs(conv, devices=None, kinds=(HostConv,), gate=gate) == 1
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    conv.allow = True
    assert "FrozenConv2d" in type(conv(x).grad_fn).__name__ and calls == [conv]
    conv.allow = False
    assert type(conv(x).grad_fn).__name__ == "ConvolutionBackward0" and len(calls) == 2
    with torch.no_grad():
        conv(x)
    assert len(calls) == 2

    norm, act = torch.nn.GroupNorm(2, 4), torch.nn.SiLU()
    y = torch.randn(1, 4, 3, 3, requires_grad=True)
    ref = act(norm(y))
    assert lean_norm_act(torch.nn.Sequential(norm, act), devices=None, pairs=lambda m: [(m[0], m[1])],
                         gate=gate) == 1
    norm.allow = True
    out = act(norm(y))
    assert "GroupNormSiLU" in type(out.grad_fn).__name__ and torch.equal(out, ref)
    norm.allow = False
    out = act(norm(y))
    assert type(out.grad_fn).__name__ == "SiluBackward0" and torch.equal(out, ref)  # the pair unfused, as before
    assert calls[-2:] == [norm, norm]


def test_training_with_every_switch_matches_training_without(tmp_path, tiny_rewards, fresh_tiny):
    """End to end through the trainer (ShortFT, UNet block and VAE checkpointing, CFG, stacked adapters): the switches
    the trainer makes on CUDA, forced on here on CPU, change neither the losses nor the trained LoRAs."""
    from shortft_core.adapters import adapter_state
    from shortft_core.tiny_world import held_out_prompts
    from shortft_core.prompts import PromptSource
    from shortft_core.trainer import Trainer
    from shortft_core.config import TrainConfig

    cfg = TrainConfig(iterations=4, batch_size=2, rank=4, eval_count=0, lr=1e-3, checkpoint_unet=True,
                      checkpoint_blocks=True, checkpoint_vae=True, guidance=3.0)
    runs = []
    for lean in (False, True):
        model = fresh_tiny()
        if lean:
            assert lean_saved_activations(model.unet, model.vae, devices=None) > 20
        tr = Trainer(model, tiny_rewards[0], cfg, PromptSource(held_out_prompts(4)), out=tmp_path / str(lean))
        losses = [tr.train_step()["loss"] for _ in range(cfg.iterations)]
        runs.append((losses, {n: adapter_state(model.unet, n) for n in tr.lora.names}))
    (l0, s0), (l1, s1) = runs
    assert l0 == pytest.approx(l1, rel=1e-4, abs=1e-6)
    a = torch.cat([s0[n][k].flatten() for n in s0 for k in s0[n]])
    b = torch.cat([s1[n][k].flatten() for n in s0 for k in s0[n]])
    assert int((a != 0).sum()) > 0.5 * a.numel()  # trained
    # Adam's first steps move each weight by about +-lr whatever the gradient's size, so a gradient entry that is
    # zero up to rounding may take either sign; everything else must agree
    off = ~torch.isclose(a, b, rtol=1e-3, atol=1e-6)
    assert off.float().mean() < 1e-3, float(off.float().mean())


def test_each_memory_switch_lowers_the_peak_of_a_training_step(tmp_path, tiny_rewards, fresh_tiny):
    """The peak of what a ShortFT iteration allocates (warm-up plus one step, ``profiling.LivePeak``) drops with each
    switch the README recommends for small cards: UNet checkpointing, VAE checkpointing, both, the lean
    activations the trainer makes on CUDA (forced on here)."""
    from shortft_core.testing.profiling import LivePeak
    from shortft_core.tiny_world import held_out_prompts
    from shortft_core.prompts import PromptSource
    from shortft_core.trainer import Trainer
    from shortft_core.config import TrainConfig

    peaks = {}
    for name, unet, vae, lean in [("none", False, False, False), ("unet", True, False, False),
                                  ("vae", False, True, False), ("all", True, True, False), ("lean", False, False, True)]:
        model = fresh_tiny()
        if lean:
            lean_saved_activations(model.unet, model.vae, devices=None)
        cfg = TrainConfig(iterations=2, batch_size=2, rank=4, eval_count=0, checkpoint_unet=unet,
                          checkpoint_vae=vae, guidance=3.0)
        tr = Trainer(model, tiny_rewards[0], cfg, PromptSource(held_out_prompts(4)), out=tmp_path / name)
        with LivePeak() as mem:
            for _ in range(2):
                tr.train_step()
        peaks[name] = mem.peak
    assert peaks["unet"] < 0.8 * peaks["none"], peaks
    # in the tiny world a checkpointed step peaks outside the decode, so VAE checkpointing adds nothing on top
    assert peaks["vae"] < peaks["none"] and peaks["all"] <= peaks["unet"] and peaks["all"] < peaks["vae"], peaks
    assert peaks["lean"] < 0.9 * peaks["none"], peaks
