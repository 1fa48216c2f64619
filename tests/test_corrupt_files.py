"""Damaged safetensors files (a random 100-byte file, a valid file cut in half) end every entry point with one
message naming the file and saying it is not a valid safetensors file, before any model or adapter is loaded."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shortft_core.cli import main
from shortft_core.files import SafetensorsFileError, check_safetensors
from shortft_core.segments import Segments
from shortft_core.tiny_world import tiny_shortcut_path, weights_dir

NOT_VALID = "is not a valid safetensors file"
DAMAGES = ["random100", "half"]


def damage(good: Path, bad: Path, how: str) -> Path:
    """Write ``bad``: 100 random bytes, or the first half of ``good``."""
    data = good.read_bytes()
    bad.write_bytes(random.Random(7).randbytes(100) if how == "random100" else data[: len(data) // 2])
    return bad


def write_set(folder: Path, broken: int | None = None, how: str = "half") -> Path:
    """A two-segment LoRA set folder (copies of the tiny shortcut); segment ``broken`` damaged."""
    folder.mkdir(parents=True)
    seg = Segments((500, 0))
    names = ["segment_1.safetensors", "segment_2.safetensors"]
    for j, name in enumerate(names, start=1):
        if j == broken:
            damage(tiny_shortcut_path(), folder / name, how)
        else:
            shutil.copyfile(tiny_shortcut_path(), folder / name)
    shutil.copyfile(tiny_shortcut_path(), folder / "merged.safetensors")
    (folder / "set.json").write_text(json.dumps({
        "segments": [list(seg.range_of(j)) for j in (1, 2)], "segment_files": names,
        "merged_file": "merged.safetensors", "family": "tiny", "guidance": 1.0}), encoding="utf-8")
    return folder


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a base model or a UNet is built."""
    import diffusers

    import shortft_core.loading as loading
    import shortft_core.loading as models

    def boom(*a, **k):
        pytest.fail("a model was loaded before the damaged file was reported")

    monkeypatch.setattr(models, "load_model", boom)
    monkeypatch.setattr(loading, "load_single_file", boom)
    monkeypatch.setattr(diffusers, "UNet2DConditionModel", type("Boom", (), {"from_config": staticmethod(boom)}))


def tiny_meta_unet():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    config = json.loads((weights_dir() / "pipeline" / "unet" / "config.json").read_text(encoding="utf-8"))
    with init_empty_weights():
        return UNet2DConditionModel.from_config(config)


def one_error_line(exc: pytest.ExceptionInfo, path: Path) -> str:
    """The command's message: exit status 1 (a string code), exactly one ``error:`` line naming ``path``."""
    message = exc.value.code
    assert isinstance(message, str), "a string SystemExit code is exit status 1"
    errors = [line for line in message.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(path) in errors[0] and NOT_VALID in errors[0], message
    assert "Traceback" not in message
    return errors[0]


# ----- the check itself ----------------------------------------------------------------------------------------
def test_check_reads_the_header_of_a_whole_file(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.zeros(0, 4), "c": torch.arange(7), "d": torch.ones(2).bfloat16()}
    save_file(tensors, str(tmp_path / "ok.safetensors"), metadata={"k": "v"})
    header = check_safetensors(tmp_path / "ok.safetensors", "test file")
    assert header.metadata == {"k": "v"}
    assert {n: (t["dtype"], t["shape"]) for n, t in header.tensors.items()} == {
        "a": ("F32", [3, 5]), "b": ("F32", [0, 4]), "c": ("I64", [7]), "d": ("BF16", [2])}
    with pytest.raises(FileNotFoundError, match="test file .*nothing.safetensors not found"):
        check_safetensors(tmp_path / "nothing.safetensors", "test file")


@pytest.mark.parametrize("how", DAMAGES)
def test_check_names_the_file_and_what_it_is(tmp_path, how):
    bad = damage(tiny_shortcut_path(), tmp_path / "bad.safetensors", how)
    with pytest.raises(SafetensorsFileError, match=f"shortcut {bad} {NOT_VALID}") as exc:
        check_safetensors(bad, "shortcut")
    assert isinstance(exc.value, ValueError)  # the command line prints ValueErrors as one line


def test_check_agrees_with_the_safetensors_library(tmp_path):
    """Truncations, byte flips, trailing bytes and random files: the check refuses exactly what the library
    cannot open (bytes inside the tensor data are not the header's business and open either way)."""
    save_file({"a": torch.randn(3, 5), "c": torch.arange(7), "e": torch.ones(3, dtype=torch.bool)},
              str(tmp_path / "ok.safetensors"), metadata={"x": "y"})
    good = (tmp_path / "ok.safetensors").read_bytes()
    rng = random.Random(0)
    refused = 0
    for i in range(400):
        data = bytearray(good)
        kind = i % 4
        if kind == 0:
            data = data[: rng.randrange(len(data))]
        elif kind == 1:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 2:
            data += bytes(rng.randrange(1, 9))
        else:
            data = bytearray(rng.randbytes(rng.randrange(120)))
        f = tmp_path / "f.safetensors"
        f.write_bytes(bytes(data))
        try:
            load_file(str(f))
            opens = True
        except Exception:  # noqa: BLE001 - the library raises its own error types
            opens = False
        try:
            check_safetensors(f)
            passes = True
        except SafetensorsFileError:
            passes = False
        assert passes == opens, (kind, bytes(data[:120]))
        refused += not passes
    assert refused > 250  # most damages are caught at all


# ----- the Python entry points ---------------------------------------------------------------------------------
@pytest.mark.parametrize("how", DAMAGES)
def test_lora_readers_refuse_a_damaged_file(tmp_path, how):
    from shortft_core.lora_io import load_lora_adapter, lora_file, lora_metadata, read_lora, _adapter_names
    from shortft_core.lora_set import trained_guidance
    from shortft_core.shortcut import load_shortcut

    bad = damage(tiny_shortcut_path(), tmp_path / "bad.safetensors", how)
    for call in (lambda: lora_file(bad), lambda: lora_metadata(bad), lambda: read_lora(bad),
                 lambda: trained_guidance(bad)):
        with pytest.raises(SafetensorsFileError, match=f"LoRA file {bad} {NOT_VALID}"):
            call()
    unet = tiny_meta_unet()
    with pytest.raises(SafetensorsFileError, match=f"LoRA file {bad} {NOT_VALID}"):
        load_lora_adapter(unet, bad, "x")
    with pytest.raises(SafetensorsFileError, match=f"shortcut {bad} {NOT_VALID}"):
        load_shortcut(unet, bad)
    assert _adapter_names(unet) == []


@pytest.mark.parametrize("how", DAMAGES)
def test_lora_set_functions_refuse_a_damaged_segment_before_loading_any(tmp_path, how):
    from shortft_core.lora_io import _adapter_names
    from shortft_core.lora_set import LoraSet, convert_lora_set, load_lora_set

    folder = write_set(tmp_path / "set", broken=2, how=how)
    bad = folder / "segment_2.safetensors"
    with pytest.raises(SafetensorsFileError, match=f"LoRA set file {bad} {NOT_VALID}"):
        LoraSet.open(folder)
    unet = tiny_meta_unet()
    with pytest.raises(SafetensorsFileError, match=f"{bad} {NOT_VALID}"):
        load_lora_set(unet, folder)
    assert _adapter_names(unet) == []  # segment 1 (whole) was not loaded either
    with pytest.raises(SafetensorsFileError, match=f"{bad} {NOT_VALID}"):
        convert_lora_set(folder, tmp_path / "out", unet)
    assert not (tmp_path / "out").exists()
    assert LoraSet.open(write_set(tmp_path / "whole")).guidance == 1.0  # the same set undamaged opens


def test_a_damaged_set_manifest_names_itself(tmp_path):
    from shortft_core.lora_set import LoraSet

    folder = write_set(tmp_path / "set")
    (folder / "set.json").write_text('{"segments": [[500, 9', encoding="utf-8")
    with pytest.raises(ValueError, match=f"{folder / 'set.json'} is not valid JSON"):
        LoraSet.open(folder)


@pytest.mark.parametrize("how", DAMAGES)
def test_reward_and_checkpoint_loaders_refuse_a_damaged_file_before_building(tmp_path, how, monkeypatch):
    import open_clip

    import shortft_core.rewards.clip as clip
    from shortft_core.loading import read_checkpoint
    from shortft_core.rewards import build_reward
    from shortft_core.rewards.aesthetic import load_aesthetic_head
    from shortft_core.rewards.weights import load_state_dict

    good = weights_dir() / "aesthetic_head.safetensors"
    bad = damage(good, tmp_path / "head.safetensors", how)
    for call in (lambda: load_state_dict(bad), lambda: load_aesthetic_head(bad)):
        with pytest.raises(SafetensorsFileError, match=f"reward weights {bad} {NOT_VALID}"):
            call()
    with pytest.raises(SafetensorsFileError, match=f"checkpoint {bad} {NOT_VALID}"):
        read_checkpoint(bad)

    def boom(*a, **k):
        pytest.fail("a reward model was built before the damaged file was reported")

    monkeypatch.setattr(open_clip, "create_model", boom)
    monkeypatch.setattr(clip, "build_clip_folder_reward", boom)
    with pytest.raises(SafetensorsFileError, match=f"clip_score weights {bad} {NOT_VALID}"):
        build_reward("clip_score", path=bad, device="cpu")
    with pytest.raises(SafetensorsFileError, match=f"{bad} {NOT_VALID}"):
        clip.load_open_clip("ViT-B-32", bad)
    folder = tmp_path / "PickScore_v1"  # a transformers folder whose weights file is damaged
    folder.mkdir()
    (folder / "config.json").write_text("{}", encoding="utf-8")
    damage(good, folder / "model.safetensors", how)
    with pytest.raises(SafetensorsFileError, match=f"pickscore weights {folder / 'model.safetensors'} {NOT_VALID}"):
        build_reward("pickscore", path=folder, device="cpu")


# ----- the command line ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", DAMAGES)
def test_sample_lora_refuses_a_damaged_file_before_the_model(tmp_path, how, no_model):
    bad = damage(tiny_shortcut_path(), tmp_path / "bad.safetensors", how)
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--prompts", "a", "--lora", str(bad), "--out", str(tmp_path / "o")])
    one_error_line(exc, bad)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("how", DAMAGES)
def test_sample_lora_set_refuses_a_damaged_segment_before_the_model(tmp_path, how, no_model):
    folder = write_set(tmp_path / "set", broken=2, how=how)
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--prompts", "a", "--lora-set", str(folder), "--out", str(tmp_path / "o")])
    one_error_line(exc, folder / "segment_2.safetensors")


@pytest.mark.parametrize("how", DAMAGES)
def test_export_refuses_a_damaged_file_or_set_before_the_unet(tmp_path, how, no_model):
    bad = damage(tiny_shortcut_path(), tmp_path / "bad.safetensors", how)
    for base in ([], ["--base", "tiny"]):  # with --base the file's metadata is not needed, and still checked
        with pytest.raises(SystemExit) as exc:
            main(["export", "--lora", str(bad), "--out", str(tmp_path / "o.safetensors"), *base])
        assert one_error_line(exc, bad).startswith(f"error: --lora {bad}")
    folder = write_set(tmp_path / "set", broken=1, how=how)
    with pytest.raises(SystemExit) as exc:
        main(["export", "--lora", str(folder), "--out", str(tmp_path / "o"), "--base", "tiny"])
    one_error_line(exc, folder / "segment_1.safetensors")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.safetensors").exists()


def test_sample_lora_exit_status_and_stderr_of_the_real_command(tmp_path):
    bad = damage(tiny_shortcut_path(), tmp_path / "bad.safetensors", "half")
    r = subprocess.run([sys.executable, "-m", "shortft_core", "sample", "--prompts", "a", "--lora", str(bad),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(bad) in errors[0] and NOT_VALID in errors[0], r.stderr
    assert "loaded" not in r.stderr.lower() and not (tmp_path / "o").exists()
