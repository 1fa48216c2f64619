"""The trainer: exact resume, a CI-sized run that improves the held-out reward, and input checks."""

import json

import pytest
import torch

from shortft_core.adapters import adapter_parameters, adapter_state
from shortft_core.tiny_world import held_out_prompts
from shortft_core.loop import Callback
from shortft_core.prompts import PromptSource
from shortft_core.trainer import Trainer
from shortft_core.config import TrainConfig, tiny_config
from shortft_core.methods import stage_at


class StopAt(Callback):
    def __init__(self, n):
        self.n = n

    def should_stop(self, trainer):
        return trainer.iteration >= self.n


def test_kill_and_resume_is_bit_identical(tmp_path, tiny_rewards, fresh_tiny):
    alignment, _ = tiny_rewards
    cfg = TrainConfig(iterations=6, batch_size=2, checkpoint_every=3, rank=4, eval_count=0, real_grad_steps=1,
                      last_segment="tuned")
    prompts = PromptSource.tiny(300)

    straight = Trainer(fresh_tiny(), alignment, cfg, prompts, out=tmp_path / "a")
    straight.fit()

    first = Trainer(fresh_tiny(), alignment, cfg, prompts, out=tmp_path / "b", callbacks=[StopAt(3)])
    first.fit()  # "killed" after iteration 3 (its checkpoint is the only state that survives)
    assert json.loads((tmp_path / "b" / "checkpoints" / "latest.json").read_text())["step"] == 3
    resumed = Trainer(fresh_tiny(), alignment, cfg, prompts, out=tmp_path / "b")
    assert resumed.resume() and resumed.iteration == 3 and resumed.stage == 2
    resumed.fit()
    for name in cfg.lora.names:
        a, b = adapter_state(straight.model.unet, name), adapter_state(resumed.model.unet, name)
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    assert straight.history.reward == resumed.history.reward


def test_ci_sized_run_raises_the_held_out_reward(tiny_rewards, fresh_tiny):
    """40 iterations on the aesthetic reward (the main job's) raise it on held-out prompts and seeds.

    (The alignment reward does not rise in so short a run: BENCHMARKS.md, "Tiny world: which reward trains".)"""
    alignment, aesthetic = tiny_rewards
    ev = held_out_prompts(16, seed=1)
    cfg = TrainConfig(iterations=40, batch_size=4, rank=8, lr=1e-3, shortcut_net="base", eval_count=16)
    t = Trainer(fresh_tiny(with_shortcut=False), aesthetic, cfg, PromptSource.tiny(2000, exclude=ev), ev,
                eval_reward={"alignment": alignment, "aesthetic": aesthetic})
    h = t.fit()
    before, after = h.evals[0]["aesthetic"], h.evals[-1]["aesthetic"]
    assert after > before + 0.1, (before, after)


def test_unguided_tuned_steps_under_a_guided_shortcut_train(tiny_rewards, fresh_tiny):
    """Tuned steps without CFG (guidance 1) and a shortcut run guided, as it was distilled: the unconditional
    embedding is built for the guided jumps, and a step moves the adapters."""
    alignment, _ = tiny_rewards
    cfg = TrainConfig(iterations=1, batch_size=2, rank=4, eval_count=0, guidance=1.0, shortcut_guidance=3.0)
    t = Trainer(fresh_tiny(), alignment, cfg, PromptSource.tiny(50))
    before = {k: v.clone() for k, v in adapter_state(t.model.unet, cfg.lora.names[0]).items()}
    t.fit()
    assert [s.guidance for s in t.last_plan.steps if s.net == "shortcut"] == [3.0] * 3
    assert {s.guidance for s in t.last_plan.steps if s.calls_network and s.net != "shortcut"} == {1.0}
    after = adapter_state(t.model.unet, cfg.lora.names[0])
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_unguided_jumps_in_training_but_the_shortcut_preview_at_its_own_cfg(tiny_rewards):
    """Training jumps at the configured scale (here 1, what a session gives an unguided set), while the shortcut
    preview (the shortcut as the sampler) runs at the scale the shortcut was made for (the tiny one: CFG 3)."""
    from shortft_core.loading import load_tiny_model
    from shortft_core.methods import method_plan
    from shortft_core.shortcut import attach_shortcut
    from shortft_core.tiny_world import tiny_shortcut_path

    model = load_tiny_model()
    preset = attach_shortcut(model, tiny_shortcut_path())
    assert preset.guidance == 3.0
    cfg = TrainConfig(iterations=1, rank=4, eval_count=0, guidance=1.0, shortcut_guidance=1.0,
                      preview_chain="shortcut")
    t = Trainer(model, tiny_rewards[0], cfg, PromptSource(["a small red circle on the left"]), shortcut_preset=preset)
    jumps = [s for s in method_plan(cfg, 1, torch.Generator()).steps if s.net == "shortcut"]
    assert jumps and {s.guidance for s in jumps} == {1.0}
    assert {s.guidance for s in t.preview_plan().steps} == {3.0}


def test_stage_schedule():
    cfg = TrainConfig(last_segment="tuned")  # four LoRAs, four stages
    assert [stage_at(cfg, p) for p in (0, 0.24, 0.25, 0.5, 0.99, 1.0)] == [1, 1, 2, 3, 4, 4]
    uneven = TrainConfig(stage_fractions=(0.1, 0.2, 0.3, 0.4), last_segment="tuned")
    assert [stage_at(uneven, p) for p in (0.05, 0.15, 0.45, 0.65)] == [1, 2, 3, 4]
    assert stage_at(TrainConfig(progressive=False), 0.9) == 1
    assert TrainConfig().last_segment == "tuned" and tiny_config().last_segment == "base"  # the main job's
    tail = TrainConfig(last_segment="base")  # one stage per tuned segment: three
    assert tail.num_stages == 3 and [stage_at(tail, p) for p in (0, 0.33, 0.34, 0.67, 0.99, 1.0)] == [1, 1, 2, 3, 3, 3]
    assert TrainConfig(method="draft", last_segment="base").lora.names == ("align_1",)  # a ShortFT-only setting


def test_learning_rate_warms_up_then_follows_its_schedule(tiny_rewards, fresh_tiny):
    import math
    model = fresh_tiny()
    cosine = Trainer(model, tiny_rewards[0], TrainConfig(warmup=4, lr_schedule="cosine", iterations=10, eval_count=0),
                     PromptSource(["a"]))
    f = [cosine.sched.lr_lambdas[0](s) for s in range(11)]
    assert f[0] == pytest.approx(0.25) and f[10] == pytest.approx(0.1)  # warm-up start, cosine floor at a tenth
    assert f[5] == pytest.approx(0.55)  # half-way: halfway between the peak and the floor
    assert f[0] < f[1] < f[2] < f[3] and all(a > b for a, b in zip(f[3:], f[4:]))  # rises, then falls
    assert f[3] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.3)))  # warm-up done at step 3
    const = Trainer(fresh_tiny(), tiny_rewards[0], TrainConfig(warmup=2, eval_count=0), PromptSource(["a"]))
    assert [const.sched.lr_lambdas[0](s) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


def test_a_time_budget_ends_the_run_and_drives_the_stages(tiny_rewards, fresh_tiny):
    cfg = TrainConfig(iterations=10**6, time_budget_s=1e-3, batch_size=1, rank=4, eval_count=0)
    t = Trainer(fresh_tiny(), tiny_rewards[0], cfg, PromptSource(["a small red circle on the left on a white background"]))
    t.fit()  # one iteration outlasts a millisecond
    assert t.iteration == 1 and t.progress() == 1.0 and stage_at(cfg, t.progress()) == 4


def test_kl_penalty_is_zero_at_the_base_and_adds_to_the_loss(tiny_rewards, fresh_tiny):
    from shortft_core.methods import method_plan
    prompts = ["a small red circle on the left on a white background"]
    cfg = TrainConfig(kl_weight=0.5, batch_size=1, rank=4, eval_count=0, guidance=1.0)
    t = Trainer(fresh_tiny(), tiny_rewards[0], cfg, PromptSource(prompts))
    t._enter_stage(1)

    def run():
        gen = torch.Generator().manual_seed(0)
        plan = method_plan(cfg, 1, gen)
        p, x = t._batch()
        return t.objective(plan, x, t.model.encode_prompts(p), None, p, gen)

    loss, metrics = run()  # LoRA up-weights start at zero: the tuned model is the base
    assert float(metrics["kl"]) == 0.0 and float(loss.detach()) == pytest.approx(-float(metrics["reward"].mean()))
    with torch.no_grad():
        for p in adapter_parameters(t.model.unet, "align_1"):
            p.normal_(0, 0.05)
    loss, metrics = run()
    assert float(metrics["kl"]) > 0
    assert float(loss.detach()) == pytest.approx(-float(metrics["reward"].mean()) + 0.5 * float(metrics["kl"]), rel=1e-5)


def test_gradient_accumulation_equals_the_larger_batch(tiny_rewards, fresh_tiny):
    """Two micro-batches of one accumulate to the gradient of one batch of both (the UNet, VAE and reward treat
    samples independently), so --grad-accum trades memory for time without changing the update."""
    from shortft_core.sampling import initial_noise
    prompts = ["a small red circle on the left on a white background", "a large blue square in the center"]
    model = fresh_tiny()
    x = initial_noise([11, 12], model.latent_shape(), model.device, model.dtype)
    grads = []
    for accum, batch in ((1, 2), (2, 1)):
        cfg = TrainConfig(grad_accum=accum, batch_size=batch, grad_clip=0.0, rank=4, eval_count=0, guidance=1.0)
        t = Trainer(fresh_tiny(), tiny_rewards[0], cfg, PromptSource(prompts))
        with torch.no_grad():  # non-zero up-weights, so every LoRA parameter gets a gradient
            for p in adapter_parameters(t.model.unet, "align_1"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
        micro = iter([(prompts, x)] if batch == 2 else [(prompts[:1], x[:1]), (prompts[1:], x[1:])])
        t._batch = lambda: next(micro)
        t.train_step()
        grads.append([p.grad.clone() for p in adapter_parameters(t.model.unet, "align_1")])
    assert any(float(g.abs().max()) > 0 for g in grads[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_eval_preview_and_checkpoint_intervals(tmp_path, tiny_rewards, fresh_tiny):
    class Seen(Callback):
        def __init__(self):
            self.previews, self.evals = [], []

        def on_preview(self, trainer, images, prompts):
            self.previews.append((trainer.iteration, images.shape[0], len(prompts)))

        def on_eval(self, trainer, result):
            self.evals.append(result["iteration"])

    seen = Seen()
    cfg = TrainConfig(iterations=4, batch_size=1, rank=4, eval_every=2, preview_every=3, checkpoint_every=1,
                      keep_checkpoints=1, eval_count=2)
    t = Trainer(fresh_tiny(), tiny_rewards[0], cfg, PromptSource(["a small red circle on the left on a white background"]),
                held_out_prompts(2, seed=1), out=tmp_path, callbacks=[seen])
    h = t.fit()
    assert [e["iteration"] for e in h.evals] == [0, 2, 4] == seen.evals
    assert seen.previews == [(3, 2, 2)]  # held-out prompts (at most four) at iteration 3
    assert sorted(f.name for f in (tmp_path / "checkpoints").iterdir()) == ["latest.json", "step-0000004.pt"]


def test_reset_optimizer_per_stage_starts_each_stage_afresh(tiny_rewards, fresh_tiny):
    steps = {}
    for reset in (False, True):
        cfg = TrainConfig(iterations=4, batch_size=1, rank=4, eval_count=0, reset_optimizer_per_stage=reset,
                          last_segment="tuned")
        t = Trainer(fresh_tiny(), tiny_rewards[0], cfg, PromptSource(["a small red circle on the left"]),
                    callbacks=[StopAt(2)])
        t.fit()  # iteration 1 in stage 1 (align_1..4 train), iteration 2 in stage 2 (align_2..4)
        assert t.stage == 2
        p = next(iter(adapter_parameters(t.model.unet, "align_2")))
        steps[reset] = int(t.opt.state[p]["step"])
    assert steps == {False: 2, True: 1}


def test_a_run_that_leaves_the_last_segment_to_the_base_trains_three_stages(tiny_rewards, fresh_tiny):
    """last_segment 'base': no adapter for segment 4 on the UNet, three stages, and segment 4 samples exactly as the
    bare base does from the same input (the inference chain runs no adapter there)."""
    cfg = TrainConfig(iterations=3, batch_size=1, rank=4, eval_count=0, last_segment="base")
    t = Trainer(fresh_tiny(), tiny_rewards[0], cfg, PromptSource(["a small red circle on the left"]))
    before = {n: adapter_state(t.model.unet, n) for n in t.lora.names}
    h = t.fit()
    assert h.stage == [1, 2, 3] and t.lora.names == ("align_1", "align_2", "align_3")
    assert "align_4" not in t.model.unet.peft_config
    after = {n: adapter_state(t.model.unet, n) for n in t.lora.names}
    assert all(any(not torch.equal(before[n][k], after[n][k]) for k in before[n]) for n in t.lora.names)
    plan = t.last_plan
    assert plan.stage == 3 and [s.net for s in plan.steps if s.segment == 4] == ["shortcut", "base"]


def test_unrun_lr_scale_damps_the_loras_of_segments_not_yet_run(tmp_path, tiny_rewards, fresh_tiny):
    """Stage s updates align_s+1..align_k at lr x unrun_lr_scale: Adam's first update moves every weight by about
    the lr, so their first-step changes are that factor smaller; from stage j on align_j runs at the full lr; a
    stopped run resumes to the same weights as a straight one."""
    cfg = TrainConfig(iterations=4, batch_size=1, rank=4, eval_count=0, lr=1e-3, unrun_lr_scale=0.1,
                      checkpoint_every=1, last_segment="tuned")
    prompts = PromptSource(["a small red circle on the left"])
    t = Trainer(fresh_tiny(), tiny_rewards[0], cfg, prompts, out=tmp_path / "a", callbacks=[StopAt(1)])
    names = cfg.lora.names
    before = {n: [p.detach().clone() for p in adapter_parameters(t.model.unet, n)] for n in names}
    t.fit()  # one iteration of stage 1
    assert t.stage == 1
    assert [g["lr"] for g in t.opt.param_groups] == pytest.approx([1e-3, 1e-4, 1e-4, 1e-4])
    moved = {n: max(float((p.detach() - b).abs().max()) for p, b in zip(adapter_parameters(t.model.unet, n),
                                                                         before[n])) for n in names}
    assert moved["align_1"] == pytest.approx(1e-3, rel=0.05)
    for n in names[1:]:
        assert moved[n] == pytest.approx(1e-4, rel=0.05), (n, moved)
    t._enter_stage(3)
    assert [g["lr"] for g in t.opt.param_groups] == pytest.approx([1e-3, 1e-3, 1e-3, 1e-4])
    straight = Trainer(fresh_tiny(), tiny_rewards[0], cfg, prompts)
    straight.fit()
    resumed = Trainer(fresh_tiny(), tiny_rewards[0], cfg, prompts, out=tmp_path / "a")
    assert resumed.resume() and resumed.iteration == 1
    resumed.fit()
    for n in names:
        for a, b in zip(adapter_parameters(straight.model.unet, n), adapter_parameters(resumed.model.unet, n)):
            assert torch.equal(a, b), n
    # a single LoRA, or a method without stages, keeps one optimizer group at the full lr
    for other in (TrainConfig(unrun_lr_scale=0.1, timestep_aware=False, iterations=1, eval_count=0),
                  TrainConfig(unrun_lr_scale=0.1, method="draft", iterations=1, eval_count=0)):
        o = Trainer(fresh_tiny(), tiny_rewards[0], other, prompts)
        assert len(o.opt.param_groups) == 1 and o.opt.param_groups[0]["lr"] == other.lr
    with pytest.raises(ValueError, match="unrun_lr_scale"):
        TrainConfig(unrun_lr_scale=0).validate()


def test_evaluate_scores_a_given_plan(tiny_rewards, fresh_tiny):
    """evaluate(plan=...) scores that chain on the same noise: the stage chain after the last stage is the
    inference chain (equal values); the stage chain of stage 1 without anchors runs trained LoRAs on fewer steps
    (other values)."""
    from shortft_core.plans import stage_chain
    from shortft_core.schedule import leading_grid

    cfg = TrainConfig(iterations=2, batch_size=1, rank=4, lr=1e-2, eval_count=0)
    t = Trainer(fresh_tiny(), tiny_rewards[0], cfg, PromptSource(["a small red circle on the left"]))
    t.fit()
    ev = held_out_prompts(2, seed=1)
    grid = leading_grid(cfg.sample_steps)
    full = t.evaluate(ev)
    assert t.evaluate(ev, plan=stage_chain(cfg.num_stages, t.lora, cfg.guidance, grid)) == pytest.approx(full)
    partial = t.evaluate(ev, plan=stage_chain(1, t.lora, cfg.guidance, grid, anchors=False))
    assert set(partial) == set(full) and partial != pytest.approx(full)


def test_rewards_score_the_prompts_the_model_gives_them(tiny_rewards, fresh_tiny):
    """Training's and evaluation's rewards read the model's reward_prompts (a host drops its prompt syntax there),
    while the text encoder still reads the prompts as written."""
    model = fresh_tiny()
    model.reward_prompts = lambda prompts: [p.replace("((", "").replace("))", "") for p in prompts]
    encoded, seen = [], []
    encode = model.encode_prompts

    def encode_recording(prompts, **kw):
        encoded.extend(prompts)
        return encode(prompts, **kw)

    def reward(images, prompts):
        seen.append(list(prompts))
        return tiny_rewards[0](images, prompts)

    model.encode_prompts = encode_recording
    cfg = TrainConfig(iterations=1, batch_size=2, rank=4, eval_count=0)
    t = Trainer(model, reward, cfg, PromptSource(["a ((red)) circle on the left"]))
    t.train_step()
    t.evaluate(["a ((blue)) square"])
    assert seen == [["a red circle on the left"] * 2, ["a blue square"]]
    assert {"a ((red)) circle on the left", "a ((blue)) square"} <= set(encoded)


def test_the_set_adapts_the_layers_the_model_names(tmp_path, tiny_rewards, fresh_tiny):
    """A network that is no UNet names its own LoRA targets (lora_targets): the set adapts those layers alone, trains
    them, and the set's manifest records them."""
    model = fresh_tiny()
    model.lora_targets = ("to_q", "ff.net.2")
    cfg = TrainConfig(iterations=1, batch_size=1, rank=2, eval_count=0)
    t = Trainer(model, tiny_rewards[0], cfg, PromptSource(["a red circle on the left"]))
    layers = [name for name, m in model.unet.named_modules() if "align_1" in getattr(m, "lora_A", {})]
    assert layers and all(name.endswith(("to_q", "ff.net.2")) for name in layers), layers
    assert any(n.endswith("to_q") for n in layers) and any(n.endswith("ff.net.2") for n in layers), layers
    t.train_step()
    trained = [p for n, p in model.unet.named_parameters() if ".lora_B.align_1." in n]
    assert trained and all(p.grad is not None for p in trained)
    t.save_lora_set(tmp_path / "set")
    manifest = json.loads((tmp_path / "set" / "set.json").read_text())
    assert manifest["lora"]["targets"] == ["to_q", "ff.net.2"]


def test_gradient_clipping_zero_means_off():
    from shortft_core.loop import clip_gradients
    for limit, norm_after in ((1.0, 1.0), (0.0, 5.0), (-1.0, 5.0), (10.0, 5.0)):
        a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
        a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
        assert clip_gradients([a, b], limit) == pytest.approx(5.0)  # the norm before clipping
        after = torch.cat([a.grad, b.grad]).norm().item()
        assert after == pytest.approx(norm_after, rel=1e-5), limit


def test_bad_configs_are_refused_before_work(tiny_rewards, fresh_tiny):
    with pytest.raises(ValueError, match=r"method \(--method\) must be one of shortft, draft, .*; got 'ppo'"):
        TrainConfig(method="ppo").validate()
    with pytest.raises(ValueError, match=r"shortcut_net \(--shortcut-net\) must be one of shortcut, base, tuned"):
        TrainConfig(shortcut_net="teacher").validate()  # was refused only when the first plan was built
    with pytest.raises(ValueError, match="stage_fractions"):
        TrainConfig(stage_fractions=(0.5, 0.5)).validate()
    with pytest.raises(ValueError, match=r"stage_fractions needs 3 shares .*the last one left to the base"):
        TrainConfig(last_segment="base", stage_fractions=(0.25, 0.25, 0.25, 0.25)).validate()
    TrainConfig(last_segment="base", stage_fractions=(0.5, 0.25, 0.25)).validate()
    with pytest.raises(ValueError, match=r"last_segment \(--last-segment\) must be one of tuned, base"):
        TrainConfig(last_segment="shortcut").validate()
    with pytest.raises(ValueError, match="shortcut adapter"):
        Trainer(fresh_tiny(with_shortcut=False), tiny_rewards[0], TrainConfig(), PromptSource(["a"]))


def test_resume_accepts_a_checkpoint_older_than_a_setting_but_refuses_a_changed_one(tmp_path, tiny_rewards, fresh_tiny):
    """A checkpoint written before a config field existed resumes when the field is at its default (for
    last_segment 'tuned', the set every earlier run trained)."""
    from dataclasses import replace

    from shortft_core.checkpoint import CheckpointManager

    cfg = TrainConfig(iterations=1, batch_size=1, checkpoint_every=1, rank=2, eval_count=0, last_segment="tuned")
    Trainer(fresh_tiny(), tiny_rewards[0], cfg, PromptSource.tiny(50), out=tmp_path).fit()
    path = CheckpointManager(tmp_path / "checkpoints").latest()
    st = CheckpointManager.load(path)
    old = json.loads(st["config"])
    del old["checkpoint_vae"], old["last_anchor"], old["last_segment"]  # as written before these settings existed
    st["config"] = json.dumps(old)
    torch.save(st, path)
    assert Trainer(fresh_tiny(), tiny_rewards[0], replace(cfg, iterations=2), PromptSource.tiny(50),
                   out=tmp_path).resume()
    with pytest.raises(ValueError, match="last_anchor"):
        Trainer(fresh_tiny(), tiny_rewards[0], replace(cfg, last_anchor="start"), PromptSource.tiny(50),
                out=tmp_path).resume()
    with pytest.raises(ValueError, match="last_segment"):  # the tiny preset's setting is another run
        Trainer(fresh_tiny(), tiny_rewards[0], replace(cfg, last_segment="base"), PromptSource.tiny(50),
                out=tmp_path).resume()


def test_image_size_sets_the_training_and_evaluation_resolution(tiny_rewards, fresh_tiny):
    """image_size trains and evaluates at that size (the tiny VAE's factor is 4: 16 px is a 4x4 latent); a size the
    VAE cannot take is refused when the trainer is built, before any iteration."""
    seen = []

    class Shapes(Callback):
        def on_preview(self, loop, images, prompts):
            seen.append(tuple(images.shape))

    cfg = TrainConfig(iterations=1, batch_size=1, rank=2, eval_count=0, guidance=1.0, image_size=16, preview_every=1,
                      preview_chain="full", sample_steps=10)
    tr = Trainer(fresh_tiny(), tiny_rewards[0], cfg, PromptSource(["a red circle"]), callbacks=[Shapes()])
    assert tr.latent_shape == (4, 4, 4) and tr._batch()[1].shape == (1, 4, 4, 4)
    tr.fit()
    assert seen == [(1, 3, 16, 16)]
    assert tuple(tr.evaluate(["a blue square"]).keys()) == ("reward", "reward_std")
    with pytest.raises(ValueError, match="multiple of the VAE factor 4"):
        Trainer(fresh_tiny(), tiny_rewards[0], TrainConfig(image_size=18), PromptSource(["a"]))
