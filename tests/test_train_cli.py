"""The train CLI end to end on the tiny world: files written and re-read, the printed report, refusals, resume."""

import json

import pytest
from PIL import Image

from shortft_core.cli import main
from shortft_core.lora_io import read_lora

QUICK = ["train", "--preset", "tiny", "--iterations", "4", "--batch-size", "2", "--eval-count", "4",
         "--checkpoint-every", "2", "--no-progress", "--threads", "1"]


def test_train_cli_writes_the_lora_set_report_and_history(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(QUICK + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    # the preset trains the alignment reward (printed first) and reports the aesthetic it does not train
    assert 0 <= printed.index("held-out tiny_alignment reward (4 prompts): before") \
        < printed.index("held-out tiny_aesthetic reward (4 prompts): before")

    info = json.loads((out / "lora" / "set.json").read_text())
    # unguided tuned steps, so unguided jumps too, although the shortcut was distilled at CFG 3 (its file says so)
    assert info["guidance"] == 1.0 and info["train_config"]["shortcut_guidance"] == 1.0
    assert len(info["segments"]) == 4 and info["train_config"]["last_segment"] == "base"
    assert info["segment_files"][3] is None and not (out / "lora" / "segment_4.safetensors").exists()
    for j in range(1, 4):
        sd, meta = read_lora(out / "lora" / f"segment_{j}.safetensors")
        assert sd and all(k.startswith("lora_unet_") for k in sd)
    merged, _ = read_lora(out / "lora" / "merged.safetensors")
    assert merged
    history = json.loads((out / "history.json").read_text())
    assert history["iterations"] == [1, 2, 3, 4] and len(history["evals"]) == 2
    assert sorted(set(history["stage"])) == [1, 2, 3]  # one stage per LoRA
    for name in ("before_after.png", "reward_curve.png"):
        with Image.open(out / name) as im:
            assert im.width > 100


def test_train_cli_without_held_out_prompts_trains_and_shows_training_prompts(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(QUICK + ["--eval-prompts", "0", "--iterations", "2", "--out", str(out)]) == 0  # its old name; last flag wins
    assert "held-out" not in capsys.readouterr().out
    assert json.loads((out / "history.json").read_text())["evals"] == []
    assert (out / "lora" / "segment_1.safetensors").is_file()
    with Image.open(out / "before_after.png") as im:
        assert im.width > 100


def test_train_cli_returns_a_finished_run_refuses_other_settings_and_continues_with_more(tmp_path, capsys,
                                                                                          monkeypatch):
    """The same command in the same folder returns the finished run without loading a model; other settings are
    refused naming them; more iterations continue it from its last checkpoint."""
    import shortft_core.loading as models

    out = tmp_path / "run"
    assert main(QUICK + ["--out", str(out)]) == 0
    first = (out / "lora" / "segment_3.safetensors").read_bytes()
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(models, "load_model", lambda *a, **k: pytest.fail("trained a finished run again"))
        assert main(QUICK + ["--out", str(out)]) == 0
    assert "holds this finished run (4 iterations)" in capsys.readouterr().out
    assert (out / "lora" / "segment_3.safetensors").read_bytes() == first
    with pytest.raises(SystemExit, match=r"other settings \(rank\)"):  # a message, not a traceback
        main(QUICK + ["--rank", "4", "--out", str(out)])
    assert main(QUICK[:3] + ["--iterations", "6"] + QUICK[5:] + ["--out", str(out)]) == 0
    assert json.loads((out / "history.json").read_text())["iterations"][-1] == 6
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_run_folder_guard_sees_finished_outputs_before_any_model_loads(tmp_path, monkeypatch):
    """A folder whose LoRA set survives without its checkpoints is still an earlier run; the refusal comes before
    the model loads (load_model is made to fail, so reaching it would raise something else)."""
    import shortft_core.loading as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model before checking --out"))
    out = tmp_path / "run"
    (out / "lora").mkdir(parents=True)
    (out / "lora" / "merged.safetensors").write_bytes(b"a user's file")
    with pytest.raises(SystemExit, match=r"hold an earlier run's files but .*run.json is missing"):
        main(QUICK + ["--out", str(out)])
    with pytest.raises(SystemExit, match="pass one of them"):
        main(QUICK + ["--out", str(out), "--resume", "--overwrite"])
    assert (out / "lora" / "merged.safetensors").read_bytes() == b"a user's file"
    with pytest.raises(SystemExit) as e:  # argparse: a usage error naming the flag
        main(QUICK + ["--threads", "0", "--out", str(out)])
    assert e.value.code == 2

@pytest.mark.parametrize("extra, message", [
    (["--shortcut", "/nowhere/hyper.safetensors"], "LoRA file /nowhere/hyper.safetensors not found"),
    (["--shortcut-preset", "hyper-sd15-3step"], "unknown shortcut preset 'hyper-sd15-3step'"),
    (["--reward", "hps_v2"], "expected the file 'HPS_v2_compressed.pt'"),
    (["--prompts-file", "/nowhere/prompts.txt"], "prompt file /nowhere/prompts.txt not found"),
])
def test_train_cli_checks_its_inputs_before_the_model_loads(tmp_path, monkeypatch, extra, message):
    """A missing shortcut, reward weight or prompt file, or an unknown preset, ends the command before the base
    model loads (a minute for SDXL): load_model is made to fail, so reaching it would raise something else."""
    import shortft_core.loading as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded the model before the inputs"))
    with pytest.raises(SystemExit, match=message):
        main(QUICK + extra + ["--out", str(tmp_path / "run")])

def test_train_cli_needs_a_reward_for_a_real_model(tmp_path):
    with pytest.raises(SystemExit, match=r"reward is required for a real model \(--reward\)"):
        main(["train", "--model", str(tmp_path), "--out", str(tmp_path / "o")])


def test_ctrl_c_stops_after_the_step_saves_everything_and_resume_continues(tmp_path, monkeypatch, capsys):
    """The first Ctrl-C (a real SIGINT to this process) ends the run after the current iteration: checkpoint, LoRA
    set and history are written, the status is 130, the previous SIGINT handler is back, and the same command goes
    on."""
    import os
    import signal

    from shortft_core.trainer import Trainer

    real_step = Trainer.train_step

    def step_then_ctrl_c(self):
        metrics = real_step(self)
        if self.iteration == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return metrics

    monkeypatch.setattr(Trainer, "train_step", step_then_ctrl_c)
    handler = signal.getsignal(signal.SIGINT)
    out = tmp_path / "run"
    args = QUICK[:3] + ["--iterations", "6", "--checkpoint-every", "100"] + QUICK[5:9] + QUICK[11:] + ["--out", str(out)]
    assert main(args) == 130
    assert signal.getsignal(signal.SIGINT) is handler
    assert "interrupted at iteration 2" in capsys.readouterr().out
    assert json.loads((out / "history.json").read_text())["iterations"] == [1, 2]
    assert (out / "checkpoints" / "step-0000002.pt").is_file() and (out / "lora" / "set.json").is_file()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert main(args) == 0  # the same command continues it
    assert json.loads((out / "history.json").read_text())["iterations"] == [1, 2, 3, 4, 5, 6]
