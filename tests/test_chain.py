"""The differentiable sampler: gradient paths, checkpointing and agreement with plain sampling."""

from dataclasses import replace

import pytest
import torch

from shortft_core.adapters import SHORTCUT_ADAPTER, AdapterSwitch, LoraSetSpec, adapter_parameters, add_lora
from shortft_core.chain import run_plan
from shortft_core.models import Conditioning, tiled_tokens
from shortft_core.plans import base_chain, draft_plan, full_bptt_plan, original_chain, shortft_plan
from shortft_core.sampling import initial_noise, sample
from shortft_core.schedule import leading_grid

SPEC = LoraSetSpec(rank=4)


@pytest.fixture()
def adapted(tiny_model):
    """The tiny model with a random frozen 'shortcut' and a random (non-zero) alignment set; removed afterwards."""
    unet = tiny_model.unet
    add_lora(unet, SHORTCUT_ADAPTER, 4, seed=1)
    for p in adapter_parameters(unet, SHORTCUT_ADAPTER):
        p.requires_grad_(False)
    SPEC.add_to(unet, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in (SHORTCUT_ADAPTER, *SPEC.names):
            for p in adapter_parameters(unet, n):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    yield tiny_model, AdapterSwitch(unet)
    unet.delete_adapters([SHORTCUT_ADAPTER, *SPEC.names])
    unet.requires_grad_(False)


def _inputs(model, n=2):
    x = initial_noise(range(n), model.latent_shape())
    cond = model.encode_prompts(["a small red circle on the left on a white background"] * n)
    return x, cond, model.encode_prompts([""]).repeat(n)


def _grads(model, plan, switch, names, x=None):
    model.unet.zero_grad(set_to_none=True)
    xin, cond, uncond = _inputs(model)
    x = xin if x is None else x
    out = run_plan(model, plan, x, cond, uncond, switch)[-1]
    out.square().mean().backward()
    return {n: torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                          for p in adapter_parameters(model.unet, n)]) for n in names}


def test_gradient_reaches_lora1_through_the_shortcut_jumps(adapted):
    model, switch = adapted
    plan = shortft_plan(1, SPEC, 3.0)
    # keep gradient on the segment-1 step and the shortcut jumps only: align_1 can learn only through the jumps
    only_jumps = replace(plan, steps=tuple(
        s if (s.segment == 1 or s.net == "shortcut") else replace(s, grad=False) for s in plan.steps))
    g = _grads(model, only_jumps, switch, SPEC.names)
    assert torch.isfinite(g["align_1"]).all() and g["align_1"].abs().sum() > 0
    # cutting the shortcut's Jacobian (no gradient through the jump network) changes that gradient
    no_jac = replace(only_jumps, steps=tuple(
        replace(s, grad=False) if s.net == "shortcut" else s for s in only_jumps.steps))
    g2 = _grads(model, no_jac, switch, SPEC.names)
    assert not torch.allclose(g["align_1"], g2["align_1"])
    for p in adapter_parameters(model.unet, SHORTCUT_ADAPTER):
        assert p.grad is None  # the shortcut stays frozen


def test_draft_k_truncates_the_gradient(adapted):
    """DRaFT-K: states before the last K steps carry no graph, and the adapter gradient equals that of a chain
    explicitly cut (detached) at the window; full BPTT's gradient differs from it."""
    model, switch = adapted
    single = LoraSetSpec(rank=4, timestep_aware=False)
    x, cond, uncond = _inputs(model)
    seen = []
    plan = draft_plan(3, single, 3.0, grid=leading_grid(10))
    out = run_plan(model, plan, x, cond, uncond, switch, hook=lambda i, st, xa: seen.append(xa.requires_grad))[-1]
    assert seen == [False] * 7 + [True] * 3  # the graph starts at the first step of the window (index 7)
    out.square().mean().backward()
    g_draft = torch.cat([p.grad.flatten() for p in adapter_parameters(model.unet, "align_1")])
    model.unet.zero_grad(set_to_none=True)
    with torch.no_grad():
        head = run_plan(model, replace(plan, steps=plan.steps[:7][:-1] + (replace(plan.steps[6], readout="x"),)),
                        x, cond, uncond, switch)[-1]
    tail = replace(plan, steps=plan.steps[7:])
    run_plan(model, tail, head.detach(), cond, uncond, switch)[-1].square().mean().backward()
    g_cut = torch.cat([p.grad.flatten() for p in adapter_parameters(model.unet, "align_1")])
    torch.testing.assert_close(g_draft, g_cut)
    assert g_draft.abs().sum() > 0
    model.unet.zero_grad(set_to_none=True)
    run_plan(model, full_bptt_plan(single, 3.0, grid=leading_grid(10), checkpoint=False), x, cond, uncond,
             switch)[-1].square().mean().backward()
    g_full = torch.cat([p.grad.flatten() for p in adapter_parameters(model.unet, "align_1")])
    assert not torch.allclose(g_full, g_draft)


def test_checkpointing_gives_identical_gradients(adapted):
    """Recomputed steps must re-select their own adapter set: gradients equal the non-checkpointed ones."""
    model, switch = adapted
    a = _grads(model, shortft_plan(1, SPEC, 3.0, real_grad_steps=2, checkpoint=False), switch, SPEC.names)
    b = _grads(model, shortft_plan(1, SPEC, 3.0, real_grad_steps=2, checkpoint=True), switch, SPEC.names)
    for n in SPEC.names:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-7)


def test_plain_sampling_is_the_base_plan(adapted):
    model, switch = adapted
    prompts = ["a large blue square in the center on a gray background"]
    switch.activate(())
    ref = sample(model, prompts, seed=3, steps=10, guidance=2.0)
    via_plan = sample(model, prompts, seed=3, guidance=2.0, plan=base_chain(leading_grid(10), 2.0), switch=switch)
    torch.testing.assert_close(ref, via_plan)
    aligned = sample(model, prompts, seed=3, guidance=2.0, plan=original_chain(SPEC, 2.0, leading_grid(10)), switch=switch)
    assert not torch.allclose(ref, aligned)  # the (random) alignment set changes the picture


def test_vae_checkpointing_gives_identical_gradients(adapted):
    """Block-wise recomputation of the VAE decoder (``checkpoint_vae``) changes memory, not gradients."""
    model, switch = adapted
    plan = shortft_plan(1, SPEC, 3.0)
    xin, cond, uncond = _inputs(model)

    def grads():
        model.unet.zero_grad(set_to_none=True)
        z = run_plan(model, plan, xin, cond, uncond, switch)[-1]
        model.decode(z).mean(dim=(1, 2, 3)).square().sum().backward()
        return torch.cat([p.grad.flatten() for p in adapter_parameters(model.unet, "align_1")])

    plain = grads()
    model.vae.enable_gradient_checkpointing()
    try:
        assert model.vae.decoder.gradient_checkpointing
        ckpt = grads()
    finally:
        model.vae.disable_gradient_checkpointing()
    assert plain.abs().sum() > 0
    torch.testing.assert_close(plain, ckpt, rtol=1e-5, atol=1e-8)


def test_conditioning_of_different_token_counts_batches_exactly(tiny_model):
    """A prompt over 75 tokens comes from ComfyUI's CLIP in several 77-token chunks; batched with a shorter one (or
    with the empty prompt for CFG), each is repeated along its tokens to their least common multiple, which leaves
    every sample's noise prediction as it is alone."""
    m = tiny_model
    x = initial_noise([0], m.latent_shape())
    cond = m.encode_prompts(["a small red circle on the left on a white background"])
    other = m.encode_prompts(["a big green triangle on the right on a white background"])
    longer = Conditioning(torch.cat([other.hidden, cond.hidden.flip(1)], dim=1))  # two chunks: 154 tokens
    both = cond.cat(longer)
    assert both.hidden.shape == (2, 154, cond.hidden.shape[2])
    assert torch.equal(both.hidden[0], cond.hidden[0].repeat(2, 1)) and torch.equal(both.hidden[1], longer.hidden[0])
    with torch.no_grad():
        together = m.eps(torch.cat([x, x]), 500, both)
        alone = [m.eps(x, 500, c) for c in (cond, longer)]
    for got, want in zip(together, alone):
        assert float((got - want[0]).norm() / want.norm()) < 1e-5
    three = cond.hidden.repeat(1, 3, 1)  # 231 tokens: with 154, both become 462
    assert [t.shape[1] for t in tiled_tokens([three, longer.hidden, cond.hidden])] == [462, 462, 462]
    same = tiled_tokens([cond.hidden, other.hidden])  # one count: the tensors as they are
    assert same[0] is cond.hidden and same[1] is other.hidden
