import json
import subprocess
import sys

import pytest
from PIL import Image

from shortft_core.cli import main


def test_sample_cli_writes_pngs_grid_and_metadata(tmp_path):
    out = tmp_path / "s"
    rc = main(["sample", "--model", "tiny", "--prompts", "a small red circle on the left on a white background",
               "--held-out", "2", "--steps", "6", "--seed", "3", "--out", str(out)])
    assert rc == 0
    meta = json.loads((out / "samples.json").read_text())
    assert [im["seed"] for im in meta["images"]] == [3, 4, 5]
    for im in meta["images"]:
        with Image.open(out / im["file"]) as pil:
            assert pil.size == (32, 32)
    with Image.open(out / "grid.png") as grid:
        assert grid.width > 3 * 32
    assert meta["guidance"] == 3.0 and meta["steps"] == 6


def test_sample_cli_offloaded_text_encoders_give_the_same_images(tmp_path):
    common = ["sample", "--prompts", "a large blue square in the center on a gray background", "", "--steps", "3"]
    assert main(common + ["--out", str(tmp_path / "a")]) == 0
    assert main(common + ["--offload-text-encoders", "--out", str(tmp_path / "b")]) == 0
    for name in ("0000.png", "0001.png"):
        with Image.open(tmp_path / "a" / name) as a, Image.open(tmp_path / "b" / name) as b:
            assert a.tobytes() == b.tobytes()


def test_sample_cli_refuses_to_overwrite(tmp_path):
    args = ["sample", "--prompts", "a large blue square in the center on a gray background", "--steps", "2",
            "--out", str(tmp_path)]
    assert main(args) == 0
    before = (tmp_path / "0000.png").read_bytes()
    with pytest.raises(SystemExit, match="--overwrite"):
        main(args + ["--seed", "9"])
    assert (tmp_path / "0000.png").read_bytes() == before
    assert main(args + ["--seed", "9", "--overwrite"]) == 0


def test_every_model_command_takes_threads(tmp_path, monkeypatch):
    """--threads reaches torch for sample (run here) and parses for every command that runs a model."""
    import torch

    from shortft_core.cli import build_parser

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    assert main(["sample", "--prompts", "a red circle", "--steps", "2", "--threads", "3", "--out", str(tmp_path)]) == 0
    assert calls == [3]
    parser = build_parser()
    for argv in (["train", "--out", "o"], ["distill", "--out", "o"], ["score", "--reward", "x", "--images", "i"]):
        assert parser.parse_args(argv + ["--threads", "2"]).threads == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["sample", "--out", "o", "--threads", "0"])

def test_sample_cli_input_errors(tmp_path):
    with pytest.raises(SystemExit, match="no prompts"):
        main(["sample", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="no such file"):
        main(["sample", "--prompts-file", str(tmp_path / "missing.txt"), "--out", str(tmp_path)])


def test_config_flags_carry_their_help(capsys):
    for command in ("train", "distill"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--offload-text-encoders" in text and "encode a prompt not cached" in text
        assert "bf16 on a GPU (default no)" in text
        assert "(default False)" in text
    # tuple and None defaults are shown as they are typed on the command line
    assert "(default 999 749 499 249)" in text and "(default none)" in text and "(999," not in text


@pytest.mark.parametrize("argv, message", [
    (["train", "--checkpoint-every", "0"], r"checkpoint_every \(--checkpoint-every\) must be >= 1; got 0"),
    (["train", "--lr", "0"], r"lr \(--lr\) must be > 0"),
    (["train", "--sample-steps", "2000"], r"--sample-steps\) must be >= 1 and <= 1000; got 2000"),
    (["train", "--alpha", "0"], r"--alpha\) must be > 0"),
    (["train", "--lr", "nan"], r"lr \(--lr\) must be > 0; got nan"),
    (["train", "--method", "refl", "--refl-total", "20"], r"--refl-total\) must be >= 40"),
    (["train", "--shortcut-edges", "249", "499"], "shortcut_edges must be strictly decreasing"),
    (["distill", "--pool-reuse", "0"], r"--pool-reuse\) must be >= 1"),
    (["distill", "--teacher-guidance", "3"], "teacher_guidance is a range of two scales"),
    (["distill", "--focus-share", "1.5", "--focus", "741"], r"--focus-share\) must be >= 0 and <= 1"),
])
def test_out_of_range_settings_end_the_command_before_any_work(tmp_path, argv, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=message):
        main(argv + ["--out", str(out)])
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["distill", "--data", "prompts"], "argument --data: invalid choice: 'prompts'"),
    (["train", "--lr-schedule", "linear"], "argument --lr-schedule: invalid choice: 'linear'"),
    (["sample", "--prompts", "a", "--steps", "0"], "argument --steps: must be in 1..1000, got 0"),
    (["sample", "--prompts", "a", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["sample", "--prompts", "a", "--columns", "two"], "argument --columns: expected an integer, got 'two'"),
    (["sample", "--prompts", "a", "--guidance", "0.5"], "argument --guidance: must be >= 1, got 0.5"),
    (["sample", "--prompts", "a", "--guidance", "nan"], "argument --guidance: must be >= 1, got nan"),
    (["score", "--reward", "aesthetic", "--images", ".", "--batch-size", "0"], "argument --batch-size: must be >= 1"),
])
def test_bad_numbers_are_usage_errors_naming_the_flag(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_missing_inputs_end_with_their_message_and_v_shows_the_traceback(tmp_path):
    argv = ["sample", "--prompts", "a", "--lora-set", str(tmp_path), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match=r"error: .*set.json not found.*\n\(shortft -v sample"):
        main(argv)
    with pytest.raises(FileNotFoundError, match="set.json not found"):
        main(["-v"] + argv)
    import shortft_core.loading as models

    with pytest.MonkeyPatch.context() as mp:  # a missing --lora is found before the model loads
        mp.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded the model before checking --lora"))
        with pytest.raises(SystemExit, match="LoRA file .*missing.safetensors not found"):
            main(["sample", "--prompts", "a", "--lora", str(tmp_path / "missing.safetensors"), "--out",
                  str(tmp_path / "o")])
    r = subprocess.run([sys.executable, "-m", "shortft_core", "sample", "--prompts", "a", "--model",
                        str(tmp_path / "no_model"), "--out", str(tmp_path / "o")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "error: model" in r.stderr


def test_optional_settings_accept_none_and_keep_their_bounds():
    from shortft_core.config import TrainConfig
    TrainConfig(alpha=None, time_budget_s=None, real_grad_steps=None).validate()
    TrainConfig(alpha=4.0, time_budget_s=60.0, real_grad_steps=3).validate()
    with pytest.raises(ValueError, match="time_budget_s"):
        TrainConfig(time_budget_s=0.0).validate()


def test_every_config_setting_has_help():
    import dataclasses

    from shortft_core.distillation import DistillConfig
    from shortft_core.config import TrainConfig
    for cls, skipped in ((TrainConfig, ()), (DistillConfig, ("prompts",))):  # prompts: --prompts-file instead
        bare = [f.name for f in dataclasses.fields(cls) if f.name not in skipped and not f.metadata.get("help")]
        assert bare == [], f"{cls.__name__} settings without help text: {bare}"


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "shortft_core", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "sample" in r.stdout
