"""The tiny-world build command: complete output, exact determinism, no silent overwrite."""

import json

import pytest
import torch

from shortft_core.tiny_world import build as B
from shortft_core.tiny_world import load_tiny_rewards
from shortft_core.loading import load_tiny_model

QUICK = B.BuildConfig(vae_steps=3, unet_steps=3, reward_steps=3, unet_images=128, vae_batch=8, unet_batch=8,
                      reward_batch=8)


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    return a, B.build(a, QUICK, progress=False), b, B.build(b, QUICK, progress=False)


def test_build_is_bit_identical_for_a_seed(two_builds):
    _, ma, _, mb = two_builds
    assert ma["sha256"] == mb["sha256"]
    assert any(k.endswith("diffusion_pytorch_model.safetensors") for k in ma["sha256"])


def test_build_output_loads(two_builds):
    root = two_builds[0]
    manifest = json.loads((root / "MANIFEST.json").read_text())
    assert manifest["config"]["unet_steps"] == 3
    from safetensors import safe_open

    with safe_open(str(root / "pipeline" / "text_encoder" / "model.safetensors"), "pt") as f:
        assert all(k.startswith("text_model.") for k in f.keys())  # readable by every supported transformers
    model = load_tiny_model(root=root)
    assert model.unet.dtype == torch.float32 and model.vae.config.scaling_factor > 0
    alignment, aesthetic = load_tiny_rewards(root=root)
    x = torch.rand(2, 3, 32, 32)
    assert alignment(x, ["a", "b"]).shape == aesthetic(x, ["a", "b"]).shape == (2,)


def test_another_seed_gives_other_weights(tmp_path, two_builds):
    from dataclasses import replace

    m = B.build(tmp_path, replace(QUICK, seed=1), progress=False)
    key = "pipeline/unet/diffusion_pytorch_model.safetensors"
    assert m["sha256"][key] != two_builds[1]["sha256"][key]


def test_build_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="--overwrite"):
        B.build(tmp_path, QUICK, progress=False)
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_interrupted_build_resumes_after_its_finished_phases(tmp_path, monkeypatch, two_builds):
    calls = []
    real = B.train_unet

    def boom(*a, **k):
        calls.append("unet")
        raise KeyboardInterrupt

    monkeypatch.setattr(B, "train_unet", boom)
    with pytest.raises(KeyboardInterrupt):
        B.build(tmp_path, QUICK, progress=False)
    assert (tmp_path / ".phases" / "reward.pt").is_file() and (tmp_path / ".phases" / "vae.pt").is_file()
    with pytest.raises(FileExistsError, match="--resume"):
        B.build(tmp_path, QUICK, progress=False)
    monkeypatch.setattr(B, "train_unet", real)
    monkeypatch.setattr(B, "train_reward", lambda *a, **k: pytest.fail("finished phase retrained"))
    m = B.build(tmp_path, QUICK, progress=False, resume=True)
    assert m["sha256"] == two_builds[1]["sha256"]  # identical to an uninterrupted build
    assert not (tmp_path / ".phases").exists()


def test_add_shortcut_copies_a_distilled_shortcut_and_rehashes(tmp_path, two_builds):
    import shutil

    from shortft_core.adapters import SHORTCUT_ADAPTER, add_lora
    from shortft_core.files import sha256_file
    from shortft_core.lora_io import export_lora

    root = tmp_path / "world"
    shutil.copytree(two_builds[0], root)
    model = load_tiny_model(root=root)
    add_lora(model.unet, SHORTCUT_ADAPTER, 2, seed=1)
    plain = export_lora(model.unet, SHORTCUT_ADAPTER, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not a ShortFT-distilled shortcut"):
        B.add_shortcut(root, plain)
    assert not (root / "shortcut.safetensors").exists()
    sc = export_lora(model.unet, SHORTCUT_ADAPTER, tmp_path / "sc.safetensors",
                     metadata={"kind": "shortcut", "edges": [999, 749, 499, 249], "guidance": 3.0})
    m = B.main(["--out", str(root), "--add-shortcut", str(sc)])
    manifest = json.loads((root / "MANIFEST.json").read_text())
    assert m == 0 and manifest["shortcut"] == {"edges": [999, 749, 499, 249], "guidance": 3.0}
    assert manifest["sha256"]["shortcut.safetensors"] == sha256_file(root / "shortcut.safetensors") == sha256_file(sc)
    assert manifest["sha256"]["pipeline/model_index.json"] == two_builds[1]["sha256"]["pipeline/model_index.json"]


def test_two_thread_build_is_deterministic_and_restores_the_callers_threads(tmp_path):
    """--threads 2 (the <= 60 min setting on two cores) repeats bit for bit; the caller's settings come back."""
    from dataclasses import replace

    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    cfg = replace(QUICK, threads=2)
    a = B.build(tmp_path / "a", cfg, progress=False)
    b = B.build(tmp_path / "b", cfg, progress=False)
    assert a["sha256"] == b["sha256"] and a["config"]["threads"] == 2
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before
