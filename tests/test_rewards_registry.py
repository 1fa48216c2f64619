"""Reward registry, spec strings, weighted combinations, the tiny world's rewards by name, and the score CLI."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from shortft_core.rewards import PRESETS, WeightedReward, build_reward, build_reward_spec, parse_reward_spec
from shortft_core.rewards.pixel import CompressibilityReward, SymmetryReward

from test_rewards_clip import clip_folder, hps_file, open_clip_model, tiny_arch  # noqa: F401  (fixtures; hps_file needs open_clip_model)


# ----- spec strings -------------------------------------------------------------------------------------------------
def test_parse_spec_weights_presets_and_aliases():
    assert parse_reward_spec("10*pickscore + 2*hps_v2 + 0.05*aesthetic") == [
        (10.0, "pickscore"), (2.0, "hps_v2"), (0.05, "aesthetic")]
    assert parse_reward_spec("paper_combined") == parse_reward_spec(PRESETS["paper_combined"])
    reg = dict((n, w) for w, n in parse_reward_spec("symmetry + 0.1*paper_regulariser"))
    assert reg == {"symmetry": 1.0, "hps_v2": pytest.approx(0.1), "pickscore": pytest.approx(1.0)}  # 1 : 10
    assert parse_reward_spec("2*HPSv2 + hps_v2 + 1e-1*ImageReward") == [(3.0, "hps_v2"), (0.1, "image_reward")]
    assert parse_reward_spec("hps_v2.1") == [(1.0, "hps_v2.1")]
    with pytest.raises(ValueError, match="unknown reward"):
        parse_reward_spec("2*hpsv3")
    with pytest.raises(ValueError, match="cannot read term"):
        parse_reward_spec("2**symmetry")


@pytest.mark.parametrize("spec, message", [
    ("pickscore=10 hps_v2=2", "write '10*pickscore + 2*hps_v2'"),  # the score command's former form
    ("HPSv2=2 + hps_v2", "write '2*HPSv2 + hps_v2'"),
    ("aesthetic symmetry", "write 'aesthetic + symmetry'"),
    ("2**symmetry", "write [weight*]name terms joined by '+', e.g. '10*pickscore + 2*hps_v2 + 0.05*aesthetic'"),
    ("  ", "is empty"),
    ("0*symmetry", "the weights of symmetry add up to 0"),
    ("symmetry + -1*symmetry", "the weights of symmetry add up to 0"),
    ("1e999*symmetry", "weight 1e999 of symmetry is not a finite number"),
    ("2*hpsv3", "unknown reward 'hpsv3'; choose one of hps_v2, hps_v2.1, pickscore"),
])
def test_one_spec_syntax_other_forms_are_refused_with_the_right_one(spec, message):
    from shortft_core.rewards import check_reward_spec

    for parse in (parse_reward_spec, check_reward_spec):
        with pytest.raises(ValueError, match=re.escape(message)):
            parse(spec)


def test_check_reward_spec_loads_nothing_and_finds_files_on_request(tmp_path, monkeypatch):
    from shortft_core.files import SafetensorsFileError
    from shortft_core.rewards import REWARDS, RewardWeightsNotFound, check_reward_spec, format_reward_spec

    for name, entry in REWARDS.items():  # any build would fail the test
        monkeypatch.setitem(REWARDS, name, dataclasses.replace(entry, build=lambda *a, **k: pytest.fail("built")))
    spec = "10*pickscore + 2*hps_v2 + 0.05*aesthetic"
    assert check_reward_spec(spec) == [(10.0, "pickscore"), (2.0, "hps_v2"), (0.05, "aesthetic")]
    assert check_reward_spec("paper_combined") == check_reward_spec(spec)
    assert format_reward_spec(check_reward_spec("hps + 0.5*Pick_Score + hps")) == "2*hps_v2 + 0.5*pickscore"
    with pytest.raises(RewardWeightsNotFound, match="HPS_v2_compressed.pt.*xswu/HPSv2"):
        check_reward_spec("2*hps_v2", weights_dir=tmp_path, files=True)
    (tmp_path / "HPS_v2_compressed.pt").write_bytes(b"not read: only located")
    (tmp_path / "PickScore_v1").mkdir()
    (tmp_path / "PickScore_v1" / "config.json").write_text("{}", encoding="utf-8")
    assert check_reward_spec("10*pickscore + 2*hps_v2", weights_dir=tmp_path, files=True) == [
        (10.0, "pickscore"), (2.0, "hps_v2")]
    (tmp_path / "PickScore_v1" / "model.safetensors").write_bytes(b"\x00" * 100)  # a damaged download
    with pytest.raises(SafetensorsFileError, match="pickscore weights .*model.safetensors is not a valid"):
        check_reward_spec("10*pickscore", weights_dir=tmp_path, files=True)
    with pytest.raises(ValueError, match="unknown weight slots"):
        check_reward_spec("hps_v2", paths={"hps_v2": {"clip": tmp_path}}, files=True)


def test_reward_descriptions_one_line_each_and_every_name_is_a_spec():
    from shortft_core.rewards import list_rewards, reward_descriptions

    described = reward_descriptions()
    assert list(described) == [*list_rewards(), *PRESETS]
    for name, text in described.items():
        assert text.strip() and "\n" not in text
        assert parse_reward_spec(name)  # a drop-down entry alone is a valid spec
    assert described["paper_combined"] == f"preset: {PRESETS['paper_combined']}"
    assert described["hps_v2"].startswith("HPS v2")


def test_build_errors_name_the_fix():
    with pytest.raises(ValueError, match="accepts"):
        build_reward("symmetry", quality=3, device="cpu")
    with pytest.raises(ValueError, match="weight slots"):
        build_reward("hps_v2", paths={"clip": "x"}, device="cpu")


# ----- combinations -------------------------------------------------------------------------------------------------
def test_weighted_combination_logs_each_term_and_is_differentiable():
    combo = build_reward_spec("2*symmetry + 0.5*compressibility", device="cpu")
    assert isinstance(combo, WeightedReward) and combo.labels == ["symmetry", "compressibility"]
    x = torch.rand(3, 3, 32, 40, requires_grad=True)
    total = combo(x, [""] * 3)
    sym, comp = SymmetryReward()(x, [""] * 3), CompressibilityReward()(x, [""] * 3)
    torch.testing.assert_close(total, 2 * sym + 0.5 * comp)
    torch.testing.assert_close(combo.last_terms["symmetry"], sym.detach())
    torch.testing.assert_close(combo.last_terms["compressibility"], comp.detach())
    assert not combo.last_terms["symmetry"].requires_grad
    terms = combo.term_scores(x, [""] * 3)
    assert terms["symmetry"].requires_grad
    total.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    single = build_reward_spec("symmetry", device="cpu")  # one term: still a WeightedReward, so logging is uniform
    assert isinstance(single, WeightedReward) and isinstance(single.rewards[0], SymmetryReward)
    single(x.detach(), [""] * 3)
    assert set(single.last_terms) == {"symmetry"}


def test_paper_regulariser_with_tiny_models(tiny_arch, hps_file, clip_folder):  # noqa: F811
    reward = build_reward_spec("symmetry + 0.1*paper_regulariser",
                               paths={"hps_v2": hps_file, "pickscore": clip_folder},
                               options={"hps_v2": {"arch": tiny_arch}}, device="cpu")
    assert reward.labels == ["symmetry", "hps_v2", "pickscore"]
    assert reward.weights == pytest.approx([1.0, 0.1, 1.0])
    x = torch.rand(2, 3, 224, 224, requires_grad=True)
    prompts = ["a red cat", "a blue dog"]
    total = reward(x, prompts)
    t = reward.last_terms
    torch.testing.assert_close(total.detach(), t["symmetry"] + 0.1 * t["hps_v2"] + t["pickscore"])
    torch.testing.assert_close(t["pickscore"], reward.rewards[2](x, prompts).detach())
    total.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ----- the tiny world's rewards, by name ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_world_root(tmp_path_factory):
    """The shipped tiny world when present; otherwise an untrained one written by the build's own save_world
    (same files and loaders, random weights, ~2 s instead of a training run)."""
    from shortft_core.tiny_world import tiny_world_dir

    shipped = tiny_world_dir()
    if (shipped / "pipeline" / "model_index.json").is_file():
        return None
    from transformers import CLIPTextModel

    from shortft_core.rewards.aesthetic import AestheticMLP
    from shortft_core.tiny_world import build

    out = tmp_path_factory.mktemp("tiny_world")
    torch.manual_seed(0)
    build.save_world(out, build.BuildConfig(), build.make_vae(), build.make_unet(),
                     CLIPTextModel(build.text_encoder_config()), build.make_reward_model(),
                     AestheticMLP(build.TEXT_DIM), {})
    return out


def test_tiny_rewards_by_name(tiny_world_root):
    from shortft_core.tiny_world import IMAGE_SIZE, load_tiny_rewards

    paths = {} if tiny_world_root is None else {"tiny_alignment": tiny_world_root, "tiny_aesthetic": tiny_world_root}
    combo = build_reward_spec("tiny_alignment + 0.1*tiny_aesthetic", paths=paths, device="cpu")
    align, aes = load_tiny_rewards(root=tiny_world_root)
    x = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, requires_grad=True)
    prompts = ["a red circle", "a blue square"]
    total = combo(x, prompts)
    torch.testing.assert_close(combo.last_terms["tiny_alignment"], align(x, prompts).detach())
    torch.testing.assert_close(combo.last_terms["tiny_aesthetic"], aes(x, prompts).detach())
    total.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ----- CLI ----------------------------------------------------------------------------------------------------------
def _write_images(folder: Path, n: int = 3) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        arr = (torch.rand(48, 64, 3) * 255).to(torch.uint8).numpy()
        if i == 0:
            arr[:] = 128  # flat and symmetric
        Image.fromarray(arr).save(folder / f"{i:04d}.png")
        names.append(f"{i:04d}.png")
    return names


def test_score_cli_writes_terms_and_means(tmp_path, caplog):
    import logging

    from shortft_core.cli import main

    caplog.set_level(logging.INFO, logger="shortft_core")
    names = _write_images(tmp_path / "imgs")
    (tmp_path / "prompts.txt").write_text("a cat\n# comment\na dog\nthe sea\n", encoding="utf-8")
    out = tmp_path / "scores.json"
    assert main(["score", "--reward", "2*symmetry", "+", "compressibility", "--images", str(tmp_path / "imgs"),
                 "--prompts", str(tmp_path / "prompts.txt"), "--out", str(out), "--batch-size", "2",
                 "--device", "cpu"]) == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    assert [Path(e["file"]).name for e in data["images"]] == names
    assert [e["prompt"] for e in data["images"]] == ["a cat", "a dog", "the sea"]
    sym = [e["scores"]["symmetry"] for e in data["images"]]
    assert sym[0] == pytest.approx(0.0, abs=1e-6) and sym[0] > max(sym[1:])
    for e in data["images"]:
        assert e["combined"] == pytest.approx(2 * e["scores"]["symmetry"] + e["scores"]["compressibility"], abs=1e-5)
    assert data["rewards"]["symmetry"]["weight"] == 2.0
    lines = {r.getMessage().split()[0]: r.getMessage() for r in caplog.records if r.name == "shortft_core.score"}
    assert "weight 2" in lines["symmetry"] and "weight 1" in lines["compressibility"]  # each term's own weight
    assert data["rewards"]["compressibility"]["mean"] == pytest.approx(
        sum(e["scores"]["compressibility"] for e in data["images"]) / 3, abs=1e-6)
    with pytest.raises(SystemExit, match="already exists"):
        main(["score", "--reward", "symmetry", "--images", str(tmp_path / "imgs"), "--out", str(out)])


def test_score_and_train_take_the_one_spec_and_refuse_others_like_every_command(tmp_path, monkeypatch):
    import shortft_core.loading as models
    from shortft_core.cli import build_parser, main

    _write_images(tmp_path / "imgs", 2)
    for reward in (["2*symmetry+compressibility"], ["2*symmetry", "+", "compressibility"]):  # quoted or not
        out = tmp_path / f"{len(reward)}.json"
        assert main(["score", "--reward", *reward, "--images", str(tmp_path / "imgs"), "--out", str(out),
                     "--device", "cpu"]) == 0
        assert {k: v["weight"] for k, v in json.loads(out.read_text())["rewards"].items()} == {
            "symmetry": 2.0, "compressibility": 1.0}
    cases = [(["hpsv3"], "unknown reward 'hpsv3'; choose one of hps_v2"),
             (["pickscore=10", "hps_v2=2"], "write '10*pickscore + 2*hps_v2'")]
    for reward, message in cases:
        argv = ["score", "--reward", *reward, "--images", str(tmp_path / "imgs")]
        with pytest.raises(SystemExit) as exc:
            main(argv)
        first, hint = str(exc.value.code).splitlines()
        assert first.startswith("error: --reward: ") and message in first
        assert hint == "(shortft -v score ... shows the traceback)"
        with pytest.raises(ValueError, match=re.escape(message)):
            main(["-v", *argv])
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded the model before the spec"))
    with pytest.raises(SystemExit, match=r"error: .*write '10\*pickscore \+ 2\*hps_v2'.*\n\(shortft -v train"):
        main(["train", "--reward", "pickscore=10 hps_v2=2", "--out", str(tmp_path / "run"), "--no-progress"])
    assert "traceback" in build_parser().format_help()  # what -v does


def test_score_cli_reads_samples_json_and_checks_counts(tmp_path):
    from shortft_core.cli import main

    names = _write_images(tmp_path / "imgs", 2)
    (tmp_path / "imgs" / "samples.json").write_text(json.dumps(
        {"images": [{"file": n, "prompt": f"p{i}", "seed": i} for i, n in enumerate(names)]}), encoding="utf-8")
    out = tmp_path / "s.json"
    assert main(["score", "--reward", "symmetry", "--images", str(tmp_path / "imgs"), "--out", str(out),
                 "--device", "cpu"]) == 0
    assert [e["prompt"] for e in json.loads(out.read_text(encoding="utf-8"))["images"]] == ["p0", "p1"]
    (tmp_path / "two.txt").write_text("only one prompt\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="1 prompts but"):
        main(["score", "--reward", "symmetry", "--images", str(tmp_path / "imgs"), "--prompts",
              str(tmp_path / "two.txt")])
    with pytest.raises(SystemExit, match="HPS_v2_compressed.pt"):
        main(["score", "--reward", "hps_v2", "--images", str(tmp_path / "imgs"), "--weights-dir", str(tmp_path),
              "--device", "cpu"])


def test_score_help_lists_every_reward(capsys):
    from shortft_core.cli import main
    from shortft_core.rewards import list_rewards

    with pytest.raises(SystemExit):
        main(["score", "--help"])
    text = capsys.readouterr().out
    for name in [*list_rewards(), *PRESETS]:
        assert name in text
