"""The shipped tiny pipeline: loads offline as a standard diffusers folder and samples like diffusers does."""

import json

import pytest
import torch

from shortft_core.files import sha256_file
from shortft_core.loading import load_model
from shortft_core.tiny_world import tiny_world_dir
from shortft_core.sampling import initial_noise, sample
from shortft_core.tiny_world import held_out_prompts


def test_manifest_hashes_match_the_shipped_files_and_budget():
    root = tiny_world_dir()
    manifest = json.loads((root / "MANIFEST.json").read_text())
    assert manifest["sha256"], "empty manifest"
    for rel, digest in manifest["sha256"].items():
        assert sha256_file(root / rel) == digest, rel
    weights = sum(p.stat().st_size for p in root.rglob("*.safetensors"))
    assert weights <= 30 * 2**20, f"shipped weights {weights / 2**20:.1f} MiB exceed the 30 MiB budget"


def test_the_text_encoder_file_loads_in_every_supported_transformers():
    """Every key of the shipped text encoder carries the ``text_model.`` prefix: transformers before 5.6 match only
    that form (without it they build a random text encoder and say nothing that stops a run)."""
    from safetensors import safe_open

    with safe_open(str(tiny_world_dir() / "pipeline" / "text_encoder" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("text_model.") for k in keys)


def test_load_model_tiny(tiny_model):
    m = tiny_model
    assert m.family == "tiny"
    assert m.tokenizers[0].vocab_size == 49408
    assert m.schedule.num_train_timesteps == 1000 and m.schedule.prediction_type == "epsilon"
    assert m.latent_shape() == (4, 8, 8) and m.default_size == 32
    assert not any(p.requires_grad for p in m.unet.parameters())


def test_diffusers_pipeline_loads_offline_and_matches_our_sampler(tiny_model):
    """StableDiffusionPipeline.from_pretrained(dir) works with no network, and our DDIM+CFG equals its output."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_world_dir() / "pipeline"), torch_dtype=torch.float32,
                                                   local_files_only=True)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    prompts = held_out_prompts(2)
    latents = initial_noise([5, 6], tiny_model.latent_shape())
    ref = pipe(prompts, num_inference_steps=50, guidance_scale=3.0, latents=latents.clone(), output_type="pt").images
    ours = sample(tiny_model, prompts, seed=5, steps=50, guidance=3.0)
    assert ours.shape == ref.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours, ref.float(), atol=2e-4, rtol=0)


def test_sampling_is_deterministic_and_per_image_seeded(tiny_model):
    prompts = held_out_prompts(3)
    a = sample(tiny_model, prompts, seed=10, steps=8, guidance=2.0)
    b = sample(tiny_model, prompts[1:], seed=11, steps=8, guidance=2.0)
    assert a.shape == (3, 3, 32, 32) and 0 <= a.min() and a.max() <= 1
    torch.testing.assert_close(a[1:], b)
    c = sample(tiny_model, prompts, seed=11, steps=8, guidance=2.0)
    assert not torch.allclose(a, c)


def test_bad_sampling_inputs(tiny_model):
    with pytest.raises(ValueError, match="prompts is empty"):
        sample(tiny_model, [], steps=2)
    with pytest.raises(ValueError, match="guidance"):
        sample(tiny_model, ["a"], steps=2, guidance=0.5)
    with pytest.raises(ValueError, match="multiple of the VAE factor"):
        sample(tiny_model, ["a"], steps=2, height=30, width=30)


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="supported: StableDiffusionPipeline"):
        load_model(tmp_path)
