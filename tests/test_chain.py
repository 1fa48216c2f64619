"""The differentiable sampler: gradient paths, checkpointing and agreement with plain sampling."""

from dataclasses import replace

import pytest
import torch

from shortft_core.adapters import SHORTCUT_ADAPTER, AdapterSwitch, LoraSetSpec, adapter_parameters, add_lora
from shortft_core.chain import run_plan
from shortft_core.models import Conditioning, DiffusionModel, tiled_tokens
from shortft_core.plans import base_chain, draft_plan, full_bptt_plan, original_chain, shortft_plan
from shortft_core.sampling import initial_noise, sample
from shortft_core.schedule import FINAL, NoiseSchedule, leading_grid

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


def test_block_checkpointing_gives_identical_gradients(adapted, monkeypatch):
    """Block-wise recomputation (a checkpointed call's recomputation keeps each ResNet and transformer block's input,
    and each block runs again as backward reaches it, after the chain has switched to other adapters) recomputes
    each block with the adapters its forward used: gradients equal the non-checkpointed ones, and the wrappers go
    with the session's state."""
    import shortft_core.chain as chain
    import shortft_core.memory as memory
    from shortft_core.lifecycle import ModelState
    from shortft_core.testing.profiling import LivePeak

    model, switch = adapted
    plan = shortft_plan(1, SPEC, 3.0, real_grad_steps=2, checkpoint=True)
    assert len({s.adapters for s in plan.steps if s.grad and s.checkpoint}) > 1  # recomputed under other adapters
    a = _grads(model, shortft_plan(1, SPEC, 3.0, real_grad_steps=2, checkpoint=False), switch, SPEC.names)
    with LivePeak() as whole:
        _grads(model, plan, switch, SPEC.names)
    state = ModelState.capture(model)
    try:
        blocks = model.network_blocks()
        assert model.enable_block_checkpointing() == len(blocks) > 10
        wrapped, calls = [], []
        real, real_call = memory.checkpoint, chain._checkpoint
        monkeypatch.setattr(memory, "checkpoint", lambda fn, *a, **k: wrapped.append(fn) or real(fn, *a, **k))
        monkeypatch.setattr(chain, "_checkpoint", lambda fn, *a, **k: calls.append(fn) or real_call(fn, *a, **k))
        with LivePeak() as blockwise:
            b = _grads(model, plan, switch, SPEC.names)
        # each checkpointed call ran twice (forward, recomputation), its blocks checkpointed in both
        assert len(calls) == sum(s.grad and s.checkpoint for s in plan.steps) > 1
        assert len(wrapped) == 2 * len(blocks) * len(calls)
    finally:
        state.restore()
    for n in SPEC.names:
        assert a[n].abs().sum() > 0
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-7)
    assert not any("forward" in m.__dict__ for m in blocks)  # the session's end removed the wrappers
    # a recomputed call holds its blocks' inputs and one block's activations, not all of the call's
    assert blockwise.peak < 0.6 * whole.peak, (blockwise.peak, whole.peak)


def test_checkpoint_blocks_checkpoints_the_calls_it_recomputes_by_block():
    """``checkpoint_blocks`` alone checkpoints the network calls with gradient (it is how they are recomputed)."""
    from shortft_core.config import TrainConfig

    for method in ("shortft", "draft"):
        plans = {}
        for name, flags in (("off", {}), ("unet", {"checkpoint_unet": True}), ("blocks", {"checkpoint_blocks": True})):
            cfg = TrainConfig(method=method, **flags)
            plan = cfg.method_entry.build(cfg, cfg.lora, 1, torch.Generator().manual_seed(0))
            plans[name] = [s.checkpoint for s in plan.steps if s.grad]
        assert plans["blocks"] == plans["unet"] and any(plans["unet"]) and not any(plans["off"]), (method, plans)


def test_checkpointed_block_that_changes_its_input_in_place():
    """A block that adds to its input in place: recomputed from that changed input its gradient would be wrong, so
    backward refuses; with ``fresh_inputs`` it runs on a copy and the gradient is the plain one, computed with the
    options the call saw although the host changed them after."""
    from shortft_core.memory import checkpoint_blocks

    class AddsInPlace(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x, opts):
            opts["seen"] = opts.get("seen", 0) + 1
            x += torch.tanh(self.lin(x * 0.5) * opts["scale"])  # x * 0.5 keeps no x for backward
            return x

    def grads(fresh=None):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(4, 4), AddsInPlace())
        if fresh is not None:
            checkpoint_blocks([net[1]], fresh_inputs=fresh)
        opts = {"scale": 2.0}
        y = net[1](net[0](torch.ones(3, 4)), opts=opts)
        opts["scale"] = -1.0  # the host changes its options after the call: the recomputation sees the old ones
        y.square().sum().backward()
        assert opts == {"scale": -1.0, "seen": 1}
        return torch.cat([p.grad.flatten() for p in net.parameters()])

    plain = grads()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        grads(fresh=False)
    torch.testing.assert_close(grads(fresh=True), plain)


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


def _flow_levels(shift: float = 3.0) -> torch.Tensor:
    """Flow levels f of a 1000-step table with a shift, as SD3-style samplers make them (the top one is 1: noise)."""
    u = torch.arange(1, 1001, dtype=torch.float64) / 1000
    return shift * u / (1 + (shift - 1) * u)


class _FlowModel(DiffusionModel):
    """A flow-matching model on a shifted flow table whose network returns ``velocity(x_flow, f)``; it gives its
    clean sample x_flow - f v at the level of pure noise, as a flow model's seam does (unless ``give_x0`` is off)."""

    def __init__(self, velocity, give_x0: bool = True):
        f = _flow_levels()
        self.f = f
        self.schedule = NoiseSchedule.from_flow_levels(f)
        self.velocity, self.give_x0 = velocity, give_x0
        self.unet = torch.nn.Linear(1, 1)

    def flow_latent(self, x, t):
        f = self.f[t].float()
        return x * ((1 - f) ** 2 + f**2).sqrt(), f

    def predict(self, x, t, cond, unet=None):
        x_flow, f = self.flow_latent(x, t)
        v = self.velocity(x_flow, f)
        top = self.give_x0 and float(self.schedule.abar(t)) == 0.0
        return self.schedule.eps_from(v, x, t), (x_flow - f * v if top else None)

    def eps(self, x, t, cond, unet=None):
        return self.predict(x, t, cond)[0]

    def latent_shape(self, height=None, width=None):
        return (4, 8, 8)

    def encode_prompts(self, prompts, *, size=None):
        return Conditioning(torch.zeros(len(prompts), 1, 1))

    def decode(self, latents):
        return latents

    def load_lora(self, source, adapter_name, trainable=False, activate=True):
        raise NotImplementedError


def test_a_flow_models_chain_is_the_euler_flow_from_pure_noise():
    """A flow model's levels on the chain: a DDIM step there is an Euler step of the flow (any velocity, from the
    top level of pure noise too, where the model's x0 is taken), and an exact velocity lands on its clean sample."""
    g = torch.Generator().manual_seed(0)
    target, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    w = torch.randn(4, 4, generator=g) * 0.3
    model = _FlowModel(lambda x, f: torch.einsum("ij,bjhw->bihw", w, x) * (1 + f))  # an arbitrary velocity field
    sched = model.schedule
    assert float(sched.abar(999)) == 0.0 and float(sched.abar(FINAL)) == 1.0
    for t, s in ((999, 749), (749, 249), (249, FINAL)):
        x = torch.randn(2, 4, 8, 8, generator=g)
        eps, x0 = model.predict(x, t, None)
        x_flow, f = model.flow_latent(x, t)
        f_s = model.f[s].float() if s != FINAL else torch.tensor(0.0)
        euler = x_flow + (f_s - f) * model.velocity(x_flow, f)
        stepped = sched.step(x, eps, t, s, x0=x0)
        assert torch.allclose(stepped * ((1 - f_s) ** 2 + f_s**2).sqrt(), euler, atol=1e-5), (t, s)
    exact = _FlowModel(lambda x, f: (x - target) / f)  # the velocity toward the target from wherever x is
    states = []
    out = run_plan(exact, base_chain([999, 749, 499, 249], 1.0), noise, exact.encode_prompts(["", ""]), None, None,
                   hook=lambda i, step, x: states.append(x))[-1]
    assert torch.allclose(out, target, atol=1e-5)
    abar = sched.abar(749)  # on the way: the level's mix of the target and the starting noise
    assert torch.allclose(states[0], abar.sqrt().float() * target + (1 - abar).sqrt().float() * noise, atol=1e-5)
    blind = _FlowModel(exact.velocity, give_x0=False)  # eps alone says nothing of x0 at pure noise
    out = run_plan(blind, base_chain([999, 749, 499, 249], 1.0), noise, blind.encode_prompts(["", ""]), None, None)
    assert not torch.isfinite(out[-1]).all()
