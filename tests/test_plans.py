"""Chain plans: structure (property-based), gradient placement, and the exact expansion of shortcut jumps."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shortft_core.adapters import LoraSetSpec
from shortft_core.segments import Segments
from shortft_core.plans import (BASE, SHORTCUT_NET, TUNED, alignprop_plan, draft_lv_plan, draft_plan,
                                drtune_plan, full_bptt_plan, original_chain, refl_plan,
                                shortft_plan, stage_chain)
from shortft_core.schedule import FINAL, leading_grid

SPEC = LoraSetSpec()


def _ddim(plan):
    return [s for s in plan.steps if s.kind == "ddim"]


def expand_shortcuts(plan, lora, guidance, grid):
    """Every shortcut jump t -> s replaced by the original chain's own steps between t and s (what the shortcut
    stands in for); the jump must span whole grid steps."""
    original = original_chain(lora, guidance, grid).steps
    out = []
    for step in plan.steps:
        if step.net != SHORTCUT_NET:
            out.append(step)
            continue
        inner = [o for o in original if step.s < o.t <= step.t]
        assert inner and inner[-1].s == step.s, f"jump {step.t} -> {step.s} does not span whole grid steps"
        out += inner
    return out


def _contiguous(plan):
    steps = _ddim(plan)
    return all(a.s == b.t for a, b in zip(steps, steps[1:]))


@st.composite
def segmentations(draw):
    n_steps = draw(st.integers(8, 60))
    grid = leading_grid(n_steps)
    k = draw(st.integers(1, min(5, n_steps // 2)))
    # lower ends: pick k-1 distinct grid points (not the first) as anchors, descending, then 0
    inner = sorted(draw(st.sets(st.sampled_from(grid[1:-1]), min_size=k - 1, max_size=k - 1)), reverse=True)
    return grid, tuple(inner) + (0,)


@settings(max_examples=60, deadline=None)
@given(segmentations(), st.data())
def test_shortft_plans_cover_the_chain(seg, data):
    grid, lowers = seg
    spec = LoraSetSpec(segments=Segments(lowers))
    stage = data.draw(st.integers(1, spec.segments.k))
    real = data.draw(st.one_of(st.none(), st.integers(1, 3)))
    plan = shortft_plan(stage, spec, 3.0, grid, real_grad_steps=real)
    steps = _ddim(plan)
    assert steps[0].t == grid[0] and steps[-1].s == FINAL and _contiguous(plan)
    assert all(a.t > a.s for a in steps)
    assert plan.steps[-1].readout == "x"
    for s in steps:  # segments before the stage: no gradient; segments after: shortcut + anchor step with gradient
        if s.segment < stage:
            assert not s.grad and s.net == TUNED
        if s.segment > stage:
            assert s.grad
        if s.net == TUNED:
            assert s.adapters == spec.active_in_segment(s.segment)
    real_steps = [s for s in steps if s.segment == stage]
    assert all(s.net == TUNED for s in real_steps)
    n_grad = sum(s.grad for s in real_steps)
    assert n_grad == (len(real_steps) if real is None else min(real, len(real_steps)))
    # replacing every shortcut jump by the tuned model's own steps gives back the original chain exactly
    expanded = expand_shortcuts(plan, spec, 3.0, grid)
    original = original_chain(spec, 3.0, grid)
    assert [(s.t, s.s, s.adapters, s.guidance) for s in expanded if s.kind == "ddim"] == \
           [(s.t, s.s, s.adapters, s.guidance) for s in _ddim(original)]


def test_stage_chain_runs_the_set_where_training_ran_it():
    grid = leading_grid(50)
    for stage in (1, 2, 3):
        for anchors in (True, False):
            plan = stage_chain(stage, SPEC, 3.0, grid, anchors=anchors)
            steps = _ddim(plan)
            assert [(s.t, s.s) for s in steps] == [(s.t, s.s) for s in _ddim(original_chain(SPEC, 3.0, grid))]
            assert plan.grad_calls == 0 and plan.trainable_adapters() == set() and plan.steps[-1].readout == "x"
            # the tuned model (with its segment's stacked set) exactly where the stage-`stage` training plan runs it
            train_tuned = {s.t for s in shortft_plan(stage, SPEC, 3.0, grid).steps if s.net == TUNED}
            tuned = {s.t for s in steps if s.net == TUNED}
            later_anchors = {t for t in train_tuned if SPEC.segments.segment_of(t) > stage}
            assert tuned == (train_tuned if anchors else train_tuned - later_anchors)
            assert all(s.adapters == SPEC.active_in_segment(s.segment) for s in steps if s.net == TUNED)
            assert all(s.net == BASE and s.adapters == () for s in steps if s.t not in tuned)
    assert len(later_anchors) == 1 and 1 in later_anchors  # stage 3: segment 4's 1 -> x0 step
    full = stage_chain(4, SPEC, 3.0, grid)
    assert [(s.t, s.adapters) for s in full.steps] == [(s.t, s.adapters) for s in original_chain(SPEC, 3.0, grid).steps]
    with pytest.raises(ValueError, match="stage must be in 1..4"):
        stage_chain(5, SPEC, 3.0, grid)


def test_a_set_that_leaves_the_last_segment_to_the_base():
    """last_segment 'base': three adapters, three stages, the base (not the tuned model) on segment 4 in training
    (its anchor after the jump, gradient passing through) and at inference, where the last stage's stage chain is
    the inference chain."""
    spec = LoraSetSpec(last_segment="base")
    grid = leading_grid(50)
    assert spec.names == ("align_1", "align_2", "align_3") and spec.tuned_segments == 3
    assert [spec.active_in_segment(j) for j in (1, 2, 3, 4)] == [("align_1",), ("align_1", "align_2"),
                                                                ("align_1", "align_2", "align_3"), ()]
    assert spec.trainable_in_stage(3) == ("align_3",)
    for stage in (1, 2, 3):
        plan = shortft_plan(stage, spec, 3.0, grid)
        tail = [s for s in _ddim(plan) if s.segment == 4]
        assert [(s.t, s.s, s.net, s.grad) for s in tail] == [(241, 1, SHORTCUT_NET, True), (1, FINAL, BASE, True)]
        assert plan.trainable_adapters() == set(spec.names[stage - 1:]) and _contiguous(plan)
    with pytest.raises(ValueError, match="stage must be in 1..3"):
        shortft_plan(4, spec, 3.0, grid)
    inference = original_chain(spec, 3.0, grid)
    assert [(s.t, s.net) for s in inference.steps if s.segment == 4] == [(t, BASE) for t in range(241, 0, -20)]
    assert [(s.t, s.net, s.adapters) for s in inference.steps if s.segment < 4] == \
           [(s.t, s.net, s.adapters) for s in original_chain(SPEC, 3.0, grid).steps if s.segment < 4]
    assert [(s.t, s.net, s.adapters) for s in stage_chain(3, spec, 3.0, grid).steps] == \
           [(s.t, s.net, s.adapters) for s in inference.steps]
    single = LoraSetSpec(timestep_aware=False, last_segment="base")
    assert single.names == ("align_1",) and single.active_in_segment(4) == () and single.active_in_segment(3) == ("align_1",)
    with pytest.raises(ValueError, match="at least two segments"):
        LoraSetSpec(segments=Segments((0,)), last_segment="base")
    with pytest.raises(ValueError, match="last_segment must be one of tuned, base"):
        LoraSetSpec(last_segment="none")


def test_shortft_default_stage1_is_the_papers_chain():
    plan = shortft_plan(1, SPEC, 3.0)
    jumps = [(s.t, s.s) for s in plan.steps if s.net == SHORTCUT_NET]
    assert jumps == [(741, 501), (481, 261), (241, 1)]
    anchors = [(s.t, s.s, s.adapters) for s in plan.steps if s.net == TUNED and s.grad]
    assert anchors == [(761, 741, ("align_1",)), (501, 481, ("align_1", "align_2")),
                       (261, 241, ("align_1", "align_2", "align_3")),
                       (1, FINAL, ("align_1", "align_2", "align_3", "align_4"))]
    assert plan.network_calls == 18 and plan.grad_calls == 7
    assert all(s.guidance == 1.0 for s in plan.steps if s.net == SHORTCUT_NET)
    stage4 = shortft_plan(4, SPEC, 3.0)
    assert stage4.network_calls == 50 and not any(s.net == SHORTCUT_NET for s in stage4.steps)
    naive = shortft_plan(1, SPEC, 3.0, shortcut_net="base")
    assert [s.net for s in naive.steps if (s.t, s.s) == (741, 501)] == [BASE]


def test_last_anchor_start_moves_the_last_tuned_step_before_the_final_jump():
    for stage in (1, 2, 3):
        end, start = shortft_plan(stage, SPEC, 3.0), shortft_plan(stage, SPEC, 3.0, last_anchor="start")
        assert end.steps[:-2] == start.steps[:-2] and start.network_calls == end.network_calls
        tuned, jump = start.steps[-2:]
        assert (tuned.t, tuned.s, tuned.net, tuned.grad) == (241, 221, TUNED, True)
        assert tuned.adapters == ("align_1", "align_2", "align_3", "align_4")
        assert (jump.t, jump.s, jump.net, jump.grad, jump.readout) == (221, FINAL, SHORTCUT_NET, True, "x")
    assert shortft_plan(4, SPEC, 3.0, last_anchor="start").steps == shortft_plan(4, SPEC, 3.0).steps
    with pytest.raises(ValueError, match="last_anchor"):
        shortft_plan(1, SPEC, 3.0, last_anchor="middle")


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 50), st.integers(0, 2**31 - 1))
def test_baselines_put_gradient_exactly_where_intended(k, seed):
    g = torch.Generator().manual_seed(seed)
    single = LoraSetSpec(timestep_aware=False)
    d = draft_plan(k, single, 3.0)
    assert [s.grad for s in d.steps] == [False] * (50 - k) + [True] * k and _contiguous(d)
    assert all(s.adapters == ("align_1",) for s in d.steps)
    a = alignprop_plan(g, single, 3.0)
    kk = a.info["k"]
    assert [s.grad for s in a.steps] == [False] * (50 - kk) + [True] * kk
    assert all(s.checkpoint == s.grad for s in a.steps)
    r = refl_plan(g, single, 3.0)
    assert r.grad_calls == 1 and r.steps[-1].grad and r.steps[-1].readout == "x0"
    assert 30 <= r.info["step"] <= 39 and len(r.steps) == r.info["step"] + 1
    dt = drtune_plan(g, single, 3.0)
    assert all(s.detach_input for s in dt.steps) and dt.steps[-1].readout == "x0"
    assert [i for i, s in enumerate(dt.steps) if s.grad] == dt.info["trained"]
    f = full_bptt_plan(single, 3.0)
    assert all(s.grad and s.checkpoint for s in f.steps)


def test_draft_lv_renoises_and_reads_out_n_times():
    p = draft_lv_plan(3, LoraSetSpec(timestep_aware=False), 3.0)
    assert sum(s.kind == "renoise" for s in p.steps) == 3
    assert sum(s.readout == "x" for s in p.steps) == 3 and p.grad_calls == 3


def test_plans_serialise_and_print():
    import json

    p = shortft_plan(2, SPEC, 3.0)
    d = json.loads(json.dumps(p.to_dict()))  # what run metadata stores
    assert d["stage"] == 2 and d["trains"] == list(p.trains) and len(d["steps"]) == len(p.steps)
    assert [(st["t"], st["s"], st["net"], tuple(st["adapters"])) for st in d["steps"]] == \
           [(st.t, st.s, st.net, st.adapters) for st in p.steps]
    text = p.describe()
    assert "stage 2" in text and "shortcut" in text and "readout" in text


def test_bad_plan_inputs():
    import pytest

    with pytest.raises(ValueError, match="stage"):
        shortft_plan(5, SPEC, 3.0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        shortft_plan(1, SPEC, 3.0, grid=[1, 21, 41])
    with pytest.raises(ValueError, match="strictly descending"):
        Segments((261, 501, 761, 0))
    with pytest.raises(ValueError, match="K must be"):
        draft_plan(0, SPEC, 3.0)


def test_shortcut_model_ablation_runs_the_shortcut_at_its_own_cfg():
    """The tuned-shortcut-model ablation trains and samples at the CFG the shortcut was made for (3 on the tiny
    world); run unguided, the tiny shortcut gives broken images (aesthetic 5.8 instead of 9.2)."""
    from shortft_core.config import TrainConfig
    from shortft_core.methods import inference_plan, method_plan

    cfg = TrainConfig(method="shortcut-model", shortcut_guidance=3.0)
    for plan in (method_plan(cfg, 1, torch.Generator()), inference_plan(cfg)):
        assert [s.t for s in plan.steps] == [999, 749, 499, 249]
        assert all(s.net == SHORTCUT_NET and s.guidance == 3.0 for s in plan.steps)
    assert all(s.grad for s in method_plan(cfg, 1, torch.Generator()).steps)
    assert not any(s.grad for s in inference_plan(cfg).steps)


def test_shortft_jumps_run_at_most_at_the_tuned_steps_cfg():
    """The jumps' CFG when none is given: the shortcut's own scale, for ShortFT capped at the tuned steps' (an
    unguided set trains through unguided jumps); the shortcut-model ablation samples with the shortcut itself."""
    from shortft_core.config import TrainConfig
    from shortft_core.methods import get_method

    shortft, ablation = get_method("shortft"), get_method("shortcut-model")
    assert shortft.jump_guidance(TrainConfig(guidance=1.0), 3.0) == 1.0
    assert shortft.jump_guidance(TrainConfig(guidance=7.5), 3.0) == 3.0
    assert shortft.jump_guidance(TrainConfig(guidance=7.5), 1.0) == 1.0  # Hyper-SD's LoRAs: made unguided
    assert ablation.jump_guidance(TrainConfig(method="shortcut-model", guidance=1.0), 3.0) == 3.0


def test_baseline_settings_reach_their_plans():
    from shortft_core.config import TrainConfig
    from shortft_core.methods import method_plan

    g = torch.Generator().manual_seed(0)
    refl = method_plan(TrainConfig(method="refl", refl_total=60), 1, g)
    assert refl.info["total"] == 60 and [s.t for s in refl.steps] == leading_grid(60)[:len(refl.steps)]
    dt = method_plan(TrainConfig(method="drtune", drtune_trained=3), 1, g)
    assert len(dt.info["trained"]) == 3
    lv = method_plan(TrainConfig(method="draft-lv", lv_n=4), 1, g)
    assert sum(s.kind == "renoise" for s in lv.steps) == 4
    ks = [method_plan(TrainConfig(method="alignprop", alignprop_k_mean=20.0), 1, g).info["k"] for _ in range(200)]
    assert 19 < sum(ks) / len(ks) < 21
    d = method_plan(TrainConfig(method="draft", draft_k=5), 1, g)
    assert sum(s.grad for s in d.steps) == 5
