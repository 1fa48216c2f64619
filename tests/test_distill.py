"""Shortcut distillation: it learns to jump, its file round-trips everywhere, and resume is exact."""

import dataclasses
import json

import pytest
import torch

from shortft_core.adapters import SHORTCUT_ADAPTER, AdapterSwitch, adapter_state
from shortft_core.distillation import DistillConfig, Distiller, draw_starts, few_step_plan, jump_errors
from shortft_core.lora_io import export_lora, read_lora
from shortft_core.loop import Callback
from shortft_core.tiny_world import held_out_prompts
from shortft_core.loading import load_tiny_model

class StopAt(Callback):
    """Asks the loop to stop once it has done ``step`` steps; records every step's metrics."""

    def __init__(self, step: int | None = None) -> None:
        self.step, self.seen = step, []

    def on_step(self, loop, metrics: dict) -> None:
        self.seen.append(metrics)

    def should_stop(self, loop) -> bool:
        return self.step is not None and loop.iteration >= self.step


# the full-teacher target learns fastest from a zero LoRA (BENCHMARKS.md, shortcut distillation): 100 steps suffice
SMALL = DistillConfig(
    steps=100, batch_size=16, lr=2e-3, rank=16, warmup=10, target="teacher", pool_size=32, pool_reuse=16, checkpoint_every=50
)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    out = tmp_path_factory.mktemp("distill")
    model = load_tiny_model()
    d = Distiller(model, SMALL, out)
    d.iterate()
    path = export_lora(model.unet, SHORTCUT_ADAPTER, out / "shortcut.safetensors", metadata=d.metadata())
    return model, d, path


def test_shortcut_beats_naive_jumps_on_fresh_seeds(distilled):
    model, _, _ = distilled
    errs = jump_errors(model, held_out_prompts(8, seed=3), seeds=range(900, 908), guidance=3.0, shortcut_guidance=3.0)
    # the student starts as the naive guided DDIM jump (zero LoRA); 100 small steps already make every jump better
    for jump, e in errs.items():
        assert e["shortcut"]["mean"] < 0.95 * e["naive"]["mean"], (jump, e)
    assert sum(e["ratio"] for e in errs.values()) / len(errs) < 0.85, errs


def test_naive_multi_step_yardstick(distilled):
    model, _, _ = distilled
    errs = jump_errors(model, held_out_prompts(4, seed=3), seeds=range(900, 904), guidance=3.0, shortcut_guidance=3.0,
                       jumps=((741, 501), (241, 1)), naive_steps=(1, 2, 4, 12))
    for jump, e in errs.items():
        assert e["naive1"]["mean"] == pytest.approx(e["naive"]["mean"], rel=1e-6)
        assert e["naive1"]["mean"] > e["naive2"]["mean"] > e["naive4"]["mean"] > 1e-3, (jump, e)
        # 12 steps of 20 timesteps are the teacher's own 50-step grid: the same computation, zero error
        assert e["naive12"]["mean"] < 1e-5, (jump, e)
    with pytest.raises(ValueError, match="naive_steps"):
        jump_errors(model, held_out_prompts(1), seeds=[0], guidance=3.0, jumps=((261, 241),), naive_steps=(21,))


def test_shortcut_file_round_trips_into_our_loader_and_diffusers(distilled):
    from diffusers import StableDiffusionPipeline

    from shortft_core.tiny_world import tiny_world_dir
    from shortft_core.sampling import initial_noise, sample
    from shortft_core.shortcut import load_shortcut

    model, d, path = distilled
    sd, meta = read_lora(path)
    info = json.loads(meta["shortft"])
    assert info["edges"] == [999, 749, 499, 249] and info["kind"] == "shortcut" and info["guidance"] == 3.0
    assert all(k.startswith("lora_unet_") for k in sd) and any(k.endswith(".alpha") for k in sd)

    fresh = load_tiny_model()
    _, preset = load_shortcut(fresh.unet, path)
    assert preset is not None and preset.covers(741, 501) and not preset.covers(741, 481) and preset.guidance == 3.0
    plan = few_step_plan(guidance=3.0)
    prompts = held_out_prompts(2)
    ours = sample(fresh, prompts, seed=4, plan=plan, switch=AdapterSwitch(fresh.unet))

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_world_dir() / "pipeline"), torch_dtype=torch.float32,
                                                   local_files_only=True)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)  # a file path needs diffusers >= 0.40 offline
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", steps_offset=0)
    latents = initial_noise([4, 5], fresh.latent_shape())
    ref = pipe(prompts, num_inference_steps=4, guidance_scale=3.0, latents=latents, output_type="pt").images
    torch.testing.assert_close(ours, ref.float(), atol=3e-3, rtol=0)


def test_resume_continues_exactly(tmp_path):
    cfg = DistillConfig(steps=6, batch_size=4, rank=4, checkpoint_every=3, pool_size=4, pool_reuse=4)
    a = Distiller(load_tiny_model(), cfg, tmp_path / "a")
    a.iterate()
    b = Distiller(load_tiny_model(), cfg, tmp_path / "b", callbacks=[StopAt(3)])
    b.iterate()
    assert b.step == 3
    # the text encoders' placement may change on a resume (memory, not values)
    c = Distiller(load_tiny_model(), dataclasses.replace(cfg, offload_text_encoders=True), tmp_path / "b")
    assert c.resume() and c.step == 3
    c.iterate()
    sa, sc = adapter_state(a.unet, SHORTCUT_ADAPTER), adapter_state(c.unet, SHORTCUT_ADAPTER)
    assert all(torch.equal(sa[k], sc[k]) for k in sa)


def test_ema_consistency_run_with_l2_resumes_exactly(tmp_path):
    """The EMA target network is checkpointed with the student: an interrupted run continues bit for bit."""
    cfg = DistillConfig(steps=4, batch_size=4, rank=4, checkpoint_every=2, pool_size=4, pool_reuse=4,
                        target="consistency", ema_decay=0.9, loss="l2")
    a = Distiller(load_tiny_model(), cfg, tmp_path / "a")
    a.iterate()
    b = Distiller(load_tiny_model(), cfg, tmp_path / "b", callbacks=[StopAt(2)])
    b.iterate()
    c = Distiller(load_tiny_model(), cfg, tmp_path / "b")
    assert c.resume() and c.step == 2
    c.iterate()
    sa, sc = adapter_state(a.unet, SHORTCUT_ADAPTER), adapter_state(c.unet, SHORTCUT_ADAPTER)
    assert all(torch.equal(sa[k], sc[k]) for k in sa)
    assert all(torch.equal(e, f) for e, f in zip(a.ema, c.ema))
    # the EMA trails the student: it moved from the start, but not all the way
    assert any(not torch.equal(e, p.detach()) for e, p in zip(a.ema, a.params))


def test_a_resumed_run_reports_its_own_speed(tmp_path, monkeypatch):
    """s/step after a resume is this run's time over this run's steps (it was divided by every step since 0)."""
    import shortft_core.distillation as distill

    cfg = DistillConfig(steps=4, batch_size=2, rank=4, checkpoint_every=2, pool_size=2, pool_reuse=4)
    a = Distiller(load_tiny_model(), cfg, tmp_path, callbacks=[StopAt(2)])
    a.iterate()
    ticks = iter(range(1000))  # a clock that advances 1 s each time it is read: one read per step, one at the start
    monkeypatch.setattr(distill.time, "perf_counter", lambda: float(next(ticks)))
    steps = StopAt()
    b = Distiller(load_tiny_model(), cfg, tmp_path, callbacks=[steps])
    assert b.resume() and b.step == 2
    last = b.iterate()
    assert b.step == 4 and [m["sec_per_step"] for m in steps.seen] == [1.0, 1.0] and last["sec_per_step"] == 1.0


def test_bad_inputs_are_refused_before_work(tmp_path):
    with pytest.raises(ValueError, match="strictly decreasing"):
        DistillConfig(edges=(249, 499, 749, 999)).validate()
    with pytest.raises(ValueError, match="teacher_guidance"):
        DistillConfig(teacher_guidance=(3.0, 2.0)).validate()
    model = load_tiny_model()
    model.schedule = dataclasses.replace(model.schedule, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="eps-prediction"):
        Distiller(model, DistillConfig(steps=1, pool_size=2), tmp_path)
    with pytest.raises(ValueError, match="settings differ"):
        a = Distiller(load_tiny_model(), DistillConfig(steps=2, batch_size=2, pool_size=2, checkpoint_every=1),
                      tmp_path / "r")
        a.iterate()
        Distiller(load_tiny_model(), DistillConfig(steps=2, batch_size=2, pool_size=2, rank=4), tmp_path / "r").resume()
    with pytest.raises(ValueError, match="needs prompts"):
        m = load_tiny_model()
        m.family = "sd15"
        DistillConfig().validate(m)


def test_focus_draws_the_chain_jump_starts_more_often_and_bad_focus_is_refused(tmp_path):
    starts = list(range(10))
    gen = torch.Generator().manual_seed(0)
    plain = draw_starts(starts, 4000, gen)
    focused = draw_starts(starts, 4000, gen, focus=(3, 7), share=0.5)
    for draws, share in ((plain, 0.2), (focused, 0.5 + 0.5 * 0.2)):  # expected share of 3 and 7 together
        got = sum(t in (3, 7) for t in draws) / len(draws)
        assert abs(got - share) < 0.03, (got, share)
    assert set(focused) == set(starts)  # the rest of every segment is still trained
    # a focused run draws exactly the focus points when share is 1
    d = Distiller(load_tiny_model(), DistillConfig(steps=1, batch_size=64, rank=4, pool_size=4, focus=(741, 481, 241),
                                                   focus_share=1.0), tmp_path / "f")
    assert set(d.draw(d.gen).t1.tolist()) == {741, 481, 241}
    with pytest.raises(ValueError, match="not start points"):
        DistillConfig(focus=(740,), focus_share=0.5).validate()
    with pytest.raises(ValueError, match="needs focus timesteps"):
        DistillConfig(focus_share=0.5).validate()
    with pytest.raises(ValueError, match="focus_share"):
        DistillConfig(focus=(741,), focus_share=1.5).validate()


def test_image_data_and_consistency_target_paths(tmp_path):
    """The other data source and target run and produce finite losses (their quality is in BENCHMARKS.md)."""
    for data, target in (("images", "teacher"), ("images", "consistency"), ("trajectories", "consistency")):
        d = Distiller(load_tiny_model(), DistillConfig(steps=2, batch_size=4, rank=4, data=data, target=target,
                                                       train_images=32, pool_size=4), tmp_path / f"{data}-{target}")
        m = d.iterate()
        assert m["loss"] > 0 and torch.isfinite(torch.tensor(m["loss"]))


def test_shipped_shortcut_beats_naive_jumps_clearly():
    """The shipped 3,000-step shortcut roughly halves the naive jump's error (BENCHMARKS.md: 0.45-0.57)."""
    from shortft_core.shortcut import load_shortcut
    from shortft_core.tiny_world import tiny_shortcut_path

    model = load_tiny_model()
    _, preset = load_shortcut(model.unet, tiny_shortcut_path())
    assert preset is not None and preset.guidance == 3.0 and preset.timesteps == (999, 749, 499, 249)
    errs = jump_errors(model, held_out_prompts(8, seed=5), seeds=range(950, 958), guidance=3.0,
                       shortcut_guidance=preset.guidance)
    for jump, e in errs.items():
        assert e["ratio"] < 0.7, (jump, e)


def test_distill_cli_bf16_writes_resumes_and_refuses(tmp_path, capsys):
    """The CLI loads the base in the dtype asked for, reports speed, writes the shortcut and run.json, and follows
    the run-folder rule training follows: the same command returns a finished run, more steps continue it, other
    settings are refused by name, --overwrite starts over."""
    from shortft_core.cli import main

    out = tmp_path / "run"
    common = ["distill", "--model", "tiny", "--out", str(out), "--device", "cpu", "--no-progress", "--batch-size", "2",
              "--pool-size", "2", "--rank", "4", "--checkpoint-every", "1"]
    bf16 = common + ["--mixed-precision", "bf16"]
    assert main(bf16 + ["--steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "step 2: loss" in printed and "s/step" in printed
    tensors, metadata = read_lora(out / "shortcut.safetensors")
    meta = json.loads(metadata["shortft"])
    assert meta["distill_config"]["mixed_precision"] == "bf16" and meta["steps_done"] == 2
    assert {v.dtype for k, v in tensors.items() if k.endswith("weight")} == {torch.float16}  # as published files
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["iteration"] == 2
    stamp = (out / "shortcut.safetensors").stat().st_mtime_ns
    assert main(bf16 + ["--steps", "2"]) == 0  # the same command: the finished run, untouched
    assert "holds this finished distillation (2 steps)" in capsys.readouterr().out
    assert (out / "shortcut.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit, match=r"other settings \(mixed_precision\)"):  # fp32 cannot continue bf16
        main(common + ["--steps", "3", "--resume"])
    assert main(bf16 + ["--steps", "3"]) == 0  # more steps continue it
    assert json.loads(read_lora(out / "shortcut.safetensors")[1]["shortft"])["steps_done"] == 3
    with pytest.raises(SystemExit, match="pass one of them"):
        main(bf16 + ["--steps", "1", "--resume", "--overwrite"])
    # --overwrite starts a finished run over: its checkpoints go, the new run's file replaces the old one
    assert main(bf16 + ["--steps", "1", "--overwrite"]) == 0
    assert json.loads(read_lora(out / "shortcut.safetensors")[1]["shortft"])["steps_done"] == 1
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["step-0000001.pt"]


def test_distill_session_leaves_a_given_model_as_it_was(tmp_path):
    """Distillation through the library session on a model the caller loaded: the shortcut file is written and the
    model carries no adapter afterwards (as a training session leaves it)."""
    from shortft_core.session import DistillRequest, distill

    model = load_tiny_model()
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    cfg = DistillConfig(steps=2, batch_size=2, rank=4, pool_size=2, pool_reuse=2)
    result = distill(DistillRequest(out=tmp_path, model=model, config=cfg))
    assert result.status == "finished" and result.step == 2 and result.shortcut.is_file()
    assert not getattr(model.unet, "peft_config", None)
    after = model.unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    again = distill(DistillRequest(out=tmp_path, model=model, config=cfg))
    assert again.status == "reused" and again.step == 2


def test_mixed_precision_must_match_the_base(tmp_path):
    with pytest.raises(ValueError, match=r"mixed_precision \(--mixed-precision\) must be one of no, bf16, fp16"):
        DistillConfig(mixed_precision="fp8").validate()
    with pytest.raises(ValueError, match="loaded in torch.float32"):
        Distiller(load_tiny_model(), DistillConfig(steps=1, pool_size=2, mixed_precision="bf16"), tmp_path)


def test_resume_accepts_a_checkpoint_older_than_mixed_precision(tmp_path):
    """A checkpoint written before the setting existed resumes at its default, and is refused for another value."""
    from shortft_core.checkpoint import CheckpointManager

    cfg = DistillConfig(steps=1, batch_size=2, rank=4, pool_size=2, checkpoint_every=1)
    Distiller(load_tiny_model(), cfg, tmp_path).iterate()
    path = CheckpointManager(tmp_path / "checkpoints").latest()
    st = CheckpointManager.load(path)
    old = json.loads(st["config"])
    del old["mixed_precision"]
    st["config"] = json.dumps(old)
    torch.save(st, path)
    assert Distiller(load_tiny_model(), dataclasses.replace(cfg, steps=2), tmp_path).resume()
    with pytest.raises(ValueError, match="mixed_precision"):
        Distiller(load_tiny_model(dtype=torch.bfloat16), dataclasses.replace(cfg, mixed_precision="bf16"),
                  tmp_path).resume()


@pytest.mark.parametrize("extra, message", [
    ([], "data-free distillation needs prompts: pass --prompts-file"),
    (["--data", "images"], "--data images.*uses the tiny world's generator"),
])
def test_distill_cli_refuses_data_a_real_base_cannot_use_before_loading_it(tmp_path, monkeypatch, extra, message):
    import shortft_core.loading as models
    from shortft_core.cli import main

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded the model before checking --data"))
    with pytest.raises(SystemExit, match=message):
        main(["distill", "--model", str(tmp_path / "sd15.safetensors"), "--out", str(tmp_path / "run")] + extra)
    assert not (tmp_path / "run").exists()


def test_distill_cli_ctrl_c_saves_the_step_it_stopped_at(tmp_path, monkeypatch, capsys):
    """A real SIGINT during distillation ends it after the step: checkpoint and shortcut file hold that step,
    the status is 130, and the same command continues to the planned steps."""
    import os
    import signal

    from shortft_core.cli import main

    real_loss = Distiller.loss_on
    calls = []

    def loss_then_ctrl_c(self, batch):
        calls.append(self.step)
        if self.step == 1:  # during step 2
            os.kill(os.getpid(), signal.SIGINT)
        return real_loss(self, batch)

    monkeypatch.setattr(Distiller, "loss_on", loss_then_ctrl_c)
    out = tmp_path / "run"
    args = ["distill", "--model", "tiny", "--out", str(out), "--no-progress", "--batch-size", "2", "--pool-size", "2",
            "--rank", "4", "--steps", "5", "--checkpoint-every", "100"]
    assert main(args) == 130
    assert "interrupted at step 2" in capsys.readouterr().out
    assert json.loads(read_lora(out / "shortcut.safetensors")[1]["shortft"])["steps_done"] == 2
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["step-0000002.pt"]
    monkeypatch.setattr(Distiller, "loss_on", real_loss)
    assert main(args) == 0  # the same command continues it
    assert json.loads(read_lora(out / "shortcut.safetensors")[1]["shortft"])["steps_done"] == 5
