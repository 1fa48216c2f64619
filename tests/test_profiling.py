"""The efficiency ratio's denominator: every network call of a plan is priced as the plan makes it."""

import torch

from shortft_core.profiling import _key, _signatures, ideal_seconds
from shortft_core.trainer import TrainConfig, method_plan


def test_signatures_follow_the_plan():
    cfg = TrainConfig(shortcut_guidance=3.0)
    plan = method_plan(cfg, 1, torch.Generator().manual_seed(0))
    sigs = _signatures(plan, cfg.lora)
    assert len(sigs) == plan.network_calls
    grad = [s for s in sigs if s[2]]
    assert len(grad) == plan.grad_calls
    # the first gradient call starts the graph (no input gradient); every later call receives one
    first = next(i for i, s in enumerate(sigs) if s[2])
    assert not any(s[4] for s in sigs[: first + 1]) and all(s[4] for s in sigs[first + 1:])
    # tuned calls carry their stacked adapters, jumps the shortcut
    adapters = {s[0] for s in sigs}
    assert ("shortcut",) in adapters and cfg.lora.names[:2] in adapters
    # stage 1 trains every adapter a gradient call uses; stage 4 only align_4; jumps train nothing
    assert all(s[5] == s[0] for s in grad if s[0] != ("shortcut",))
    assert all(s[5] == () for s in sigs if s[0] == ("shortcut",) or not s[2])
    last = _signatures(method_plan(cfg, 4, torch.Generator().manual_seed(0)), cfg.lora)
    assert [s[5] for s in last if s[2]] == [("align_4",)]


def test_ideal_seconds_prices_each_call_by_its_own_signature():
    cfg = TrainConfig(shortcut_guidance=3.0)
    plan = method_plan(cfg, 2, torch.Generator().manual_seed(0))
    sigs = _signatures(plan, cfg.lora)
    costs = {_key(s): 0.0 for s in sigs}
    costs["decode_reward"] = 0.5
    shortcut_calls = [s for s in sigs if s[0] == ("shortcut",)]
    for s in shortcut_calls:
        costs[_key(s)] = 2.0
    expected = 0.5 + 2.0 * len(shortcut_calls)
    assert ideal_seconds(plan, costs, cfg.lora) == expected and len(shortcut_calls) == 2
    costs["decode_reward"] = 1.0
    assert ideal_seconds(plan, costs, cfg.lora) == expected + 0.5


def test_pass_costs_times_every_signature_of_a_real_trainer(tiny_rewards, fresh_tiny):
    from shortft_core.adapters import adapter_parameters
    from shortft_core.profiling import pass_costs
    from shortft_core.trainer import PromptSource, Trainer

    model = fresh_tiny()
    cfg = TrainConfig(batch_size=1, rank=2, eval_prompts=0)
    tr = Trainer(model, tiny_rewards[0], cfg, PromptSource.tiny(50))
    tr._enter_stage(4)
    plans = [method_plan(cfg, s, torch.Generator().manual_seed(0)) for s in (1, 4)]
    costs = pass_costs(tr, 1, plans, reps=1)
    assert set(costs) == {_key(s) for p in plans for s in _signatures(p, cfg.lora)} | {"decode_reward"}
    assert all(v > 0 for v in costs.values())
    assert all(ideal_seconds(p, costs, cfg.lora) > costs["decode_reward"] for p in plans)
    assert all(p.grad is None for p in model.unet.parameters())  # timing leaves no gradients behind
    # the trainer's stage-4 state (only align_4 trainable) is what timing found and what it leaves
    assert [n for n in cfg.lora.names if any(p.requires_grad for p in adapter_parameters(model.unet, n))] == ["align_4"]
