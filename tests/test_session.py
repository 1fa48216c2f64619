"""The one training session every host uses: lifecycle (the caller's model left exactly as it was), a host's
inference mode in a worker thread, stops within one network call with exact resume, idempotent run folders, and
no process globals."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from shortft_core.adapters import SHORTCUT_ADAPTER
from shortft_core.config import TINY_PRESET, TrainConfig
from shortft_core.loop import Callback, SingleProcess
from shortft_core.session import TrainingSession, TrainRequest, train
from shortft_core.trainer import Trainer

PROMPTS = ["a small red circle on the left on a white background", "a big blue square on a white background"]


def small(**kw) -> TrainConfig:
    """A few seconds of ShortFT on the tiny world: 10-step chain, batch 1, rank 2, no held-out evaluation."""
    base = dict(iterations=2, batch_size=1, rank=2, guidance=1.0, lr=5e-3, sample_steps=10, eval_count=0,
                checkpoint_every=100)
    return TrainConfig(**{**base, **kw})


def request(out, model="tiny", **kw) -> TrainRequest:
    return TrainRequest(**{"out": out, "model": model, "prompts": PROMPTS, "device": "cpu", "grid_prompts": 2,
                           "config": small(), **kw})


def snapshot(model) -> dict:
    """Everything a caller could observe of a model: tensors by name, trainable flags, module types and modes,
    instance-level forward overrides, the adapters, and one forward output."""
    unet = model.unet
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 8, 8, generator=g)
    cond = model.encode_prompts(PROMPTS[:1])
    with torch.no_grad():
        out = model.eps(x, 500, cond)
    parts = [unet, model.vae, *model.text_encoders]
    return {
        "tensors": [{k: v.clone() for k, v in p.state_dict().items()} for p in parts],
        "grad": [{n: q.requires_grad for n, q in p.named_parameters()} for p in parts],
        "modules": [[(n, type(m).__name__, m.training, "forward" in m.__dict__) for n, m in p.named_modules()]
                    for p in parts],
        "adapters": sorted(getattr(unet, "peft_config", {}) or {}),
        "offloaded": model.text_offload is not None,
        "eps": out,
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["adapters"] == b["adapters"] and a["offloaded"] == b["offloaded"]
    assert a["modules"] == b["modules"] and a["grad"] == b["grad"]
    for pa, pb in zip(a["tensors"], b["tensors"]):
        assert pa.keys() == pb.keys()
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert torch.equal(a["eps"], b["eps"])


class StopAfter(Callback):
    """Asks to stop once ``n`` stop polls have been made (polls come after every network call, forward and
    backward); counts the network calls that still ran after the request."""

    def __init__(self, n: int) -> None:
        self.n, self.polls, self.calls_after = n, 0, 0

    def should_stop(self, loop) -> bool:
        self.polls += 1
        return self.polls >= self.n

    def on_progress(self, loop, event) -> None:
        if self.polls >= self.n:
            self.calls_after += 1


# ----- lifecycle ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ending", ["normal", "exception", "stop"])
def test_the_callers_model_is_left_exactly_as_it_was(tmp_path, fresh_tiny, monkeypatch, ending):
    """Normal end, an exception in the middle of fit, a stop request: adapters (the shortcut the session loaded and
    the alignment set), wrapped layers, trainable flags, patches, offload and outputs are all back as they were."""
    model = fresh_tiny(with_shortcut=False)
    before = snapshot(model)
    cfg = small(iterations=3, checkpoint_vae=True, offload_text_encoders=True)
    callbacks = []
    if ending == "exception":
        real = Trainer.train_step

        def failing(self):
            if self.iteration == 1:
                raise RuntimeError("boom in the middle of fit")
            return real(self)
        monkeypatch.setattr(Trainer, "train_step", failing)
    if ending == "stop":
        callbacks = [StopAfter(5)]
    with TrainingSession(request(tmp_path / "run", model=model, config=cfg), callbacks=callbacks) as session:
        if ending == "exception":
            with pytest.raises(RuntimeError, match="boom"):
                session.run()
        else:
            result = session.run()
            assert result.status == ("stopped" if ending == "stop" else "finished")
            assert SHORTCUT_ADAPTER in model.unet.peft_config and "align_1" in model.unet.peft_config  # trained on it
    assert_same(before, snapshot(model))


def test_a_shortcut_the_caller_loaded_stays_and_training_twice_on_one_model_works(tmp_path, fresh_tiny):
    """The ComfyUI case: a cached model that already carries the shortcut trains twice in a row; after each run it
    holds the shortcut and nothing else."""
    model = fresh_tiny(with_shortcut=True)
    before = snapshot(model)
    first = train(request(tmp_path / "a", model=model))
    assert_same(before, snapshot(model))
    second = train(request(tmp_path / "b", model=model, config=small(seed=1)))
    assert_same(before, snapshot(model))
    assert first.status == second.status == "finished"
    assert first.lora.folder != second.lora.folder


def test_load_unload_load_of_a_shortcut_and_a_lora_set_on_one_model(tmp_path, fresh_tiny):
    from shortft_core.adapters import remove_adapters
    from shortft_core.lora_set import load_lora_set
    from shortft_core.shortcut import load_shortcut
    from shortft_core.tiny_world import tiny_shortcut_path

    model = fresh_tiny(with_shortcut=False)
    base = snapshot(model)
    set_dir = train(request(tmp_path / "run", model=model)).lora.folder
    assert_same(base, snapshot(model))
    for _ in range(2):
        load_shortcut(model.unet, tiny_shortcut_path())
        names, _ = load_lora_set(model.unet, set_dir)
        assert sorted(model.unet.peft_config) == sorted([SHORTCUT_ADAPTER, *names])
        remove_adapters(model.unet, [*names, SHORTCUT_ADAPTER])
        assert_same(base, snapshot(model))


# ----- a host's worker thread inside inference mode -------------------------------------------------------------
def test_loading_training_and_sampling_from_inference_mode_in_a_worker_thread(tmp_path):
    """As ComfyUI calls nodes: a non-main thread inside torch.inference_mode() loads the model and the shortcut,
    trains (gradients flow: the LoRA moves off its zero init) and samples."""
    from shortft_core.lora_io import read_lora
    from shortft_core.loading import load_model
    from shortft_core.shortcut import load_shortcut
    from shortft_core.tiny_world import tiny_shortcut_path

    results: dict = {}

    def worker() -> None:
        try:
            with torch.inference_mode():
                model = load_model("tiny")
                load_shortcut(model.unet, tiny_shortcut_path())
                results["inference_params"] = any(p.is_inference() for p in model.unet.parameters())
                results["result"] = train(request(tmp_path / "run", model=model))
                from shortft_core.sampling import sample

                results["images"] = sample(model, PROMPTS[:1], steps=4, guidance=1.0)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            results["error"] = e

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    if "error" in results:
        raise results["error"]
    assert results["inference_params"] is False
    result = results["result"]
    assert result.status == "finished" and result.iteration == 2
    sd, _ = read_lora(result.lora.folder / "segment_4.safetensors")
    ups = [v for k, v in sd.items() if k.endswith("lora_up.weight")]
    assert ups and any(float(v.abs().max()) > 0 for v in ups)  # B starts at zero: it moved, so gradients flowed
    assert results["images"].shape == (1, 3, 32, 32)


# ----- stops inside an iteration and exact resume ---------------------------------------------------------------
def _adapters(folder) -> dict:
    from shortft_core.lora_io import read_lora

    return {j: read_lora(folder / f"segment_{j}.safetensors")[0] for j in range(1, 5)}


@pytest.mark.parametrize("polls", [3, 16], ids=["forward", "backward"])
def test_a_stop_is_honoured_within_one_network_call_and_resume_is_exact(tmp_path, polls):
    """Stop requests in the middle of the second iteration's forward chain, or of its backward pass (the tiny
    ShortFT stage-1 chain has 14 network calls, so poll 16 falls in iteration 1's backward): no more than one
    network call runs after the request, the unfinished iteration is discarded, and continuing gives bit for bit
    the LoRA set of an uninterrupted run, also when it continues with the UNet and the VAE recomputed in backward
    (memory settings a continued run may change: a run that ran out of memory goes on with them)."""
    cfg = small(iterations=3)
    whole = train(request(tmp_path / "whole", config=cfg))
    stopper = StopAfter(polls)
    stopped = train(request(tmp_path / "cut", config=cfg), callbacks=[stopper])
    assert stopped.status == "stopped" and stopped.iteration < 3
    assert stopper.calls_after <= 1
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["status"] == "stopped"
    assert (tmp_path / "cut" / "lora" / "set.json").is_file()  # the partial set is written
    resumed = train(request(tmp_path / "cut", config=small(iterations=3, checkpoint_unet=True, checkpoint_vae=True)))
    assert resumed.status == "finished" and resumed.iteration == 3
    a, b = _adapters(whole.lora.folder), _adapters(resumed.lora.folder)
    assert all(torch.equal(a[j][k], b[j][k]) for j in a for k in a[j])
    assert resumed.history.reward == whole.history.reward


class OutOfMemoryAt(Callback):
    """Raises CUDA's out-of-memory error at the ``n``-th stop poll of iteration ``at`` (one follows every network
    call, forward and backward), as a GPU raises it in the middle of an iteration."""

    def __init__(self, at: int, n: int) -> None:
        self.at, self.n, self.polls = at, n, 0

    def should_stop(self, loop) -> bool:
        if loop.iteration == self.at:
            self.polls += 1
            if self.polls == self.n:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return False


def test_running_out_of_memory_in_an_iteration_keeps_the_iterations_before_it(tmp_path, monkeypatch):
    """An out-of-memory error in the middle of iteration 3's chain (no periodic checkpoint yet) is raised after a
    checkpoint of the 2 iterations done, made with the generator as iteration 3 found it: continuing the run (here
    with the UNet and the VAE recomputed) gives bit for bit the uninterrupted run's LoRA set. One raised while the
    update is being applied leaves no checkpoint (the weights may be half-updated)."""
    import shortft_core.loop as loop_module
    from shortft_core.checkpoint import CheckpointManager

    cfg = small(iterations=4)
    whole = train(request(tmp_path / "whole", config=cfg))
    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate"):
        train(request(tmp_path / "cut", config=cfg), callbacks=[OutOfMemoryAt(2, 6)])
    kept = CheckpointManager(tmp_path / "cut" / "checkpoints").latest()
    assert kept is not None and CheckpointManager.load(kept)["step"] == 2
    resumed = train(request(tmp_path / "cut", config=small(iterations=4, checkpoint_unet=True, checkpoint_vae=True)))
    assert resumed.status == "finished" and resumed.iteration == 4
    a, b = _adapters(whole.lora.folder), _adapters(resumed.lora.folder)
    assert all(torch.equal(a[j][k], b[j][k]) for j in a for k in a[j])
    assert resumed.history.reward == whole.history.reward

    calls = []

    def clip_then_fail(params, max_norm):
        calls.append(1)
        if len(calls) == 3:  # inside iteration 3's update
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 MiB")
        return clip(params, max_norm)

    clip = loop_module.clip_gradients
    monkeypatch.setattr(loop_module, "clip_gradients", clip_then_fail)
    with pytest.raises(torch.OutOfMemoryError):
        train(request(tmp_path / "in_update", config=cfg))
    assert len(calls) == 3 and CheckpointManager(tmp_path / "in_update" / "checkpoints").latest() is None


# ----- idempotent run folders ---------------------------------------------------------------------------------
def test_run_folders_are_idempotent(tmp_path, monkeypatch):
    import shortft_core.loading as models

    out = tmp_path / "run"
    first = train(request(out))
    files = {p.name: p.read_bytes() for p in (out / "lora").iterdir()}
    with monkeypatch.context() as m:
        m.setattr(models, "load_model", lambda *a, **k: pytest.fail("a finished run was trained again"))
        again = train(request(out))
    assert again.status == "reused" and again.iteration == first.iteration == 2
    assert {p.name: p.read_bytes() for p in (out / "lora").iterdir()} == files
    # a host asks after check() whether the session will return the finished run (it then prepares no model)
    for req, reuses in ((request(out), True), (request(out, overwrite=True), False)):
        with TrainingSession(req) as session:
            session.check()
            assert session.reuses is reuses
    assert again.history.reward == first.history.reward
    # written before settings existed: each counts at its default (last_segment's is 'tuned', the set every earlier
    # run trained, not the tiny preset's)
    run_file = out / "run.json"
    saved = json.loads(run_file.read_text())
    del saved["settings"]["config"]["unrun_lr_scale"], saved["settings"]["config"]["last_segment"]
    # and a setting renamed since (eval_count was eval_prompts) is read under its new name
    saved["settings"]["config"]["eval_prompts"] = saved["settings"]["config"].pop("eval_count")
    run_file.write_text(json.dumps(saved))
    with monkeypatch.context() as m:
        m.setattr(models, "load_model", lambda *a, **k: pytest.fail("a finished run was trained again"))
        assert train(request(out)).status == "reused"
    with monkeypatch.context() as m:  # how memory is spent is no other run
        m.setattr(models, "load_model", lambda *a, **k: pytest.fail("a finished run was trained again"))
        memory = small(checkpoint_unet=True, checkpoint_vae=True, offload_text_encoders=True)
        assert train(request(out, config=memory)).status == "reused"
    with pytest.raises(ValueError, match=r"other settings \(lr, rank\)"):
        train(request(out, config=small(rank=4, lr=1e-3)))
    with pytest.raises(ValueError, match=r"other settings \(prompts\)"):
        train(request(out, prompts=PROMPTS[:1]))
    with pytest.raises(ValueError, match=r"other settings \(last_segment\)"):
        train(request(out, config=small(last_segment="base")))
    fresh = train(request(out, config=small(rank=4), overwrite=True))
    assert fresh.status == "finished" and json.loads((out / "lora" / "set.json").read_text())["lora"]["rank"] == 4


def test_bad_inputs_are_refused_before_any_model_loads(tmp_path, monkeypatch):
    import shortft_core.loading as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model before checking"))
    cases = [
        (dict(prompts=["", "   "]), "no usable prompt"),
        (dict(config=small(lr=float("nan"))), r"lr \(--lr\) must be > 0"),
        (dict(reward="no_such_reward"), "no_such_reward"),
        (dict(shortcut=str(tmp_path / "missing.safetensors")), "missing.safetensors not found"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError if "not found" not in message else FileNotFoundError, match=message):
            train(request(tmp_path / "run", **kw))
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="has no usable line"):
        train(request(tmp_path / "run", prompts=str(tmp_path / "empty.txt")))


def test_a_shortcut_whose_jumps_would_leave_its_cfg_range_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    """A CFG-distilled Hyper-SD LoRA (made for CFG 5 to 8, by its published name) under guidance 3 would jump at
    CFG 3: refused by check(), naming the preset, the range and the fix; at guidance 7.5 its jumps run at its own
    CFG 5 and pass the check; an explicit shortcut_guidance is the caller's choice and is not second-guessed."""
    import shutil

    import shortft_core.loading as models
    from shortft_core.tiny_world import tiny_shortcut_path

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model before checking"))
    cfg_lora = tmp_path / "Hyper-SD15-8steps-CFG-lora.safetensors"
    shutil.copyfile(tiny_shortcut_path(), cfg_lora)
    with pytest.raises(ValueError, match=r"hyper-sd15-8step-cfg is made for CFG 5 to 8, but with guidance 3 .* jumps "
                                         r"would run at CFG 3: raise guidance to at least 5"):
        TrainingSession(request(tmp_path / "run", shortcut=str(cfg_lora), config=small(guidance=3.0))).check()
    for kw in (dict(config=small(guidance=7.5)), dict(config=small(guidance=3.0), shortcut_guidance=3.0)):
        session = TrainingSession(request(tmp_path / "run", shortcut=str(cfg_lora), **kw))
        session.check()
        assert session.shortcut_file == cfg_lora


# ----- settings resolved once, in the library ---------------------------------------------------------------------
def test_a_preset_and_the_users_settings_are_resolved_against_the_model(tmp_path, fresh_tiny, tiny_rewards):
    """Hosts pass what the user set and a preset; the session completes it: the preset under the user's values, its
    tiny-world-only settings only on the tiny model, the held-out count from the prompts given (none on a real model
    without eval prompts) and the precision from a loaded model's dtype."""
    from shortft_core import check_settings, resolve_config
    from shortft_core.session import TrainingSession

    assert resolve_config({"iterations": 5}, "tiny", tiny=True).last_segment == "base"
    assert resolve_config({"iterations": 5}, "tiny", tiny=False).last_segment == "tuned"
    assert resolve_config({"last_segment": "tuned", "lr": 1e-4}, "tiny").lr == 1e-4
    assert resolve_config({}, None).iterations == TrainConfig().iterations
    check_settings({"stage_fractions": (0.4, 0.3, 0.3)}, "tiny")  # three stages: the tiny world's
    check_settings({"stage_fractions": (0.4, 0.2, 0.2, 0.2)}, "tiny")  # four: a real model's
    with pytest.raises(ValueError, match="stage_fractions needs 3 shares"):
        check_settings({"stage_fractions": (0.5, 0.5)}, "tiny")
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        resolve_config({}, "huge")
    with pytest.raises(ValueError, match="unknown training setting.*rnak"):
        resolve_config({"rnak": 4})

    session = TrainingSession(TrainRequest(out=tmp_path / "a", model=fresh_tiny(), config={"iterations": 2},
                                           preset="tiny", prompts=PROMPTS, eval_prompts=PROMPTS[:1]))
    session.check()
    cfg = session.config
    assert (cfg.iterations, cfg.last_segment, cfg.eval_count, cfg.mixed_precision) == (2, "base", 1, "no")
    assert cfg.lr == TINY_PRESET["lr"]

    real = fresh_tiny().to(dtype=torch.bfloat16)
    real.family = "sd15"  # a real model as far as the session can tell
    session = TrainingSession(TrainRequest(out=tmp_path / "b", model=real, reward=tiny_rewards[0], preset="tiny",
                                           config={"iterations": 2}, prompts=PROMPTS))
    session.check()
    cfg = session.config
    assert (cfg.last_segment, cfg.eval_count, cfg.mixed_precision) == ("tuned", 0, "bf16")
    assert session.eval_prompts == []
    with pytest.raises(ValueError, match="a whole TrainConfig without one"):
        TrainingSession(TrainRequest(out=tmp_path / "c", config=small(), preset="tiny")).check()


# ----- no process globals ---------------------------------------------------------------------------------------
def test_two_sessions_in_a_row_in_other_dtypes_create_no_accelerator(tmp_path):
    from accelerate.state import PartialState

    seen = []

    class Record(Callback):
        def on_start(self, loop) -> None:
            seen.append((type(loop.acc), loop.model.dtype))

    a = train(request(tmp_path / "fp32"), callbacks=[Record()])
    b = train(request(tmp_path / "bf16", config=small(mixed_precision="bf16")), callbacks=[Record()])
    assert a.status == b.status == "finished"
    assert seen == [(SingleProcess, torch.float32), (SingleProcess, torch.bfloat16)]
    assert PartialState._shared_state == {}  # nothing initialised accelerate's process-global state
