"""The efficiency ratio's denominator: every network call of a plan is priced as the plan makes it."""

import torch

from shortft_core.testing.profiling import _key, _signatures, ideal_seconds
from shortft_core.config import TrainConfig
from shortft_core.methods import method_plan


def test_signatures_follow_the_plan():
    cfg = TrainConfig(shortcut_guidance=3.0, last_segment="tuned")
    plan = method_plan(cfg, 1, torch.Generator().manual_seed(0))
    sigs = _signatures(plan)
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
    last = _signatures(method_plan(cfg, 4, torch.Generator().manual_seed(0)))
    assert [s[5] for s in last if s[2]] == [("align_4",)]


def test_ideal_seconds_prices_each_call_by_its_own_signature():
    cfg = TrainConfig(shortcut_guidance=3.0)
    plan = method_plan(cfg, 2, torch.Generator().manual_seed(0))
    sigs = _signatures(plan)
    costs = {_key(s): 0.0 for s in sigs}
    costs["decode_reward"] = 0.5
    shortcut_calls = [s for s in sigs if s[0] == ("shortcut",)]
    for s in shortcut_calls:
        costs[_key(s)] = 2.0
    expected = 0.5 + 2.0 * len(shortcut_calls)
    assert ideal_seconds(plan, costs) == expected and len(shortcut_calls) == 2
    costs["decode_reward"] = 1.0
    assert ideal_seconds(plan, costs) == expected + 0.5


def test_pass_costs_times_every_signature_of_a_real_trainer(tiny_rewards, fresh_tiny):
    from shortft_core.adapters import adapter_parameters
    from shortft_core.testing.profiling import pass_costs
    from shortft_core.prompts import PromptSource
    from shortft_core.trainer import Trainer

    model = fresh_tiny()
    cfg = TrainConfig(batch_size=1, rank=2, eval_count=0, last_segment="tuned")
    tr = Trainer(model, tiny_rewards[0], cfg, PromptSource.tiny(50))
    tr._enter_stage(4)
    plans = [method_plan(cfg, s, torch.Generator().manual_seed(0)) for s in (1, 4)]
    costs = pass_costs(tr, 1, plans, reps=1)
    assert set(costs) == {_key(s) for p in plans for s in _signatures(p)} | {"decode_reward"}
    assert all(v > 0 for v in costs.values())
    assert all(ideal_seconds(p, costs) > costs["decode_reward"] for p in plans)
    assert all(p.grad is None for p in model.unet.parameters())  # timing leaves no gradients behind
    # the trainer's stage-4 state (only align_4 trainable) is what timing found and what it leaves
    assert [n for n in cfg.lora.names if any(p.requires_grad for p in adapter_parameters(model.unet, n))] == ["align_4"]


def test_live_peak_counts_new_storages_until_they_are_freed():
    import gc

    from shortft_core.testing.profiling import LivePeak

    before = torch.ones(1000)  # made outside: not counted, nor are its views or in-place updates
    with LivePeak() as mem:
        a = torch.empty(1000)  # 4,000 bytes
        b = torch.empty(2000, dtype=torch.float64)  # 16,000
        before.view(10, 100).add_(1)
        a.view(-1)[:10].mul_(2)
        assert mem.live == 20_000
        del a
        gc.collect()
        c = torch.empty(500, dtype=torch.bfloat16)  # 1,000
        assert (mem.live, mem.peak) == (17_000, 20_000)
        mem.reset_peak()
        assert mem.peak == 17_000
        del b, c
        gc.collect()
        assert mem.live == 0


def test_live_peak_follows_a_backward_pass():
    import gc

    from shortft_core.testing.profiling import LivePeak

    n = 10_000
    x = torch.randn(n, requires_grad=True)
    with LivePeak() as mem:
        loss = x.exp().sum()  # exp's output (4n bytes) is kept for backward
        assert 4 * n <= mem.live <= 4 * n + 64
        loss.backward()  # its gradient (4n) is made while the output is still kept, then becomes x.grad
        del loss
        gc.collect()
        assert 8 * n <= mem.peak <= 8 * n + 64
        assert mem.live == 4 * n and x.grad.untyped_storage().nbytes() == 4 * n


def test_extrapolated_peak_finds_the_moment_that_grows_fastest():
    from shortft_core.testing.profiling import align_traces, extrapolate_peak

    # moment 1 is the peak at both measured sizes, moment 3 grows faster and is the peak at x = 16
    ops = ["conv", "reward", "mm", "silu_backward"]
    at1, at4 = [1, 10, 2, 4], [4, 13, 8, 12]
    total, i = extrapolate_peak(at1, ops, 1, at4, ops, 4, 16, base_a=100, base_b=100)
    assert (total, i) == (100 + 4 + (12 - 4) * 5, 3)  # the line through the two peaks would give 100 + 25
    # an op one size makes and the other not (a resize) is skipped; the moments around it stay paired
    ops4 = ["conv", "resize", "reward", "mm", "silu_backward"]
    assert align_traces(ops, ops4) == [(0, 0), (1, 2), (2, 3), (3, 4)]
    total, i = extrapolate_peak(at1, ops, 1, [4, 99, 13, 8, 12], ops4, 4, 16)
    assert (total, i) == (4 + 8 * 5, 3)
    # runs that do not meet again fall back to the two peaks' line
    assert extrapolate_peak([1, 2], ["a", "b"], 1, [2, 5], ["c", "d"], 2, 3) == (8, None)


def test_a_trace_carried_in_pixels_then_in_rank_is_exact_for_bilinear_memory():
    """Activations grow with pixels, adapter state with rank, a LoRA's hidden activations with both: every moment
    of M(p, r) = a + b p + c r + d p r is recovered at (p, r) from four runs by carrying twice."""
    from shortft_core.testing.profiling import carry_trace

    coef = [(5, 1, 0, 0), (1, 0, 3, 0), (0, 1, 1, 2), (9, 2, 0, 1)]  # one moment each: (a, b, c, d)
    ops = ["w", "x", "y", "z"]

    def run(p, r):
        return [a + b * p + c * r + d * p * r for a, b, c, d in coef]

    lo = carry_trace(run(1, 2), ops, 1, run(3, 2), ops, 3, 10)
    hi = carry_trace(run(1, 4), ops, 1, run(3, 4), ops, 3, 10)
    values, names, index = carry_trace(lo[0], lo[1], 2, hi[0], hi[1], 4, 16)
    assert values == run(10, 16) and names == ops and index == [0, 1, 2, 3]
    assert carry_trace([1], ["a"], 1, [2], ["b"], 2, 3) is None
