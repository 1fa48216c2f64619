"""Offline loading of SD1.5 / SDXL: single-file ldm checkpoints with bundled configs, SDXL diffusers folders,
SDXL conditioning equal to diffusers' pipeline, and refusal of layouts ShortFT does not support.

Tier 1 uses reduced architectures (shortft_core.testing.random_models.SMALL_CONFIGS) through exactly the loader's code
path; the slow tier loads full-size random-weight SD1.5 checkpoints with the bundled configs.
"""

from __future__ import annotations

import gc
import os
import pickle

import pytest
import torch

from shortft_core import ldm_keys, loading
from shortft_core.testing import random_models
from shortft_core.families import bundled_config
from shortft_core.loading import UnsupportedModelError
from shortft_core.loading import load_model

PROMPTS = ["a red cube on a table", "two cats"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Reduced SD1.5 and SDXL models, their configs and single-file checkpoints (fp32, exact)."""
    root = tmp_path_factory.mktemp("small")
    out = {}
    for family in ("sd15", "sdxl"):
        cdir = random_models.write_small_configs(family, root / f"{family}_configs")
        model = random_models.random_model(family, config_dir=cdir, seed=4)
        ckpt = random_models.write_ldm_checkpoint(model, root / f"{family}.safetensors", dtype=None)
        out[family] = (model, cdir, ckpt)
    return out


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_single_file_checkpoint_loads_every_weight(small, family):
    model, cdir, ckpt = small[family]
    loaded = loading.load_single_file(ckpt, config_dir=cdir)
    assert loaded.family == family and loaded.info["format"] == "single_file"
    for a, b in [(model.unet, loaded.unet), (model.vae, loaded.vae), *zip(model.text_encoders, loaded.text_encoders)]:
        assert same_weights(a, b), type(a).__name__
    assert not any(p.requires_grad for p in loaded.unet.parameters())
    x = torch.randn(2, *loaded.latent_shape())
    with torch.no_grad():
        assert torch.equal(loaded.eps(x, 500, loaded.encode_prompts(PROMPTS)), model.eps(x, 500, model.encode_prompts(PROMPTS)))


def test_single_file_dtype_and_ckpt_pickle(small, tmp_path):
    model, cdir, ckpt = small["sd15"]
    half = loading.load_single_file(ckpt, config_dir=cdir, dtype=torch.bfloat16)
    assert {p.dtype for p in half.unet.parameters()} == {torch.bfloat16}
    sd = loading.read_checkpoint(ckpt)
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": sd, "global_step": torch.tensor(1)}, legacy)
    assert same_weights(loading.load_single_file(legacy, config_dir=cdir).unet, model.unet)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": sd, "x": Evil()}, f)
    with pytest.raises(ValueError, match="weights_only"):
        loading.read_checkpoint(evil)


def test_sdxl_conditioning_equals_diffusers_pipeline(small):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    model, _, _ = small["sdxl"]
    pipe = StableDiffusionXLPipeline(vae=model.vae, text_encoder=model.text_encoders[0],
                                     text_encoder_2=model.text_encoders[1], tokenizer=model.tokenizers[0],
                                     tokenizer_2=model.tokenizers[1], unet=model.unet,
                                     scheduler=EulerDiscreteScheduler.from_config(model.scheduler_config))
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    cond = model.encode_prompts(PROMPTS, size=(192, 256), original_size=(512, 384), crop_top_left=(8, 0))
    assert torch.equal(cond.hidden, embeds) and torch.equal(cond.added["text_embeds"], pooled)
    want = pipe._get_add_time_ids((512, 384), (8, 0), (192, 256), dtype=embeds.dtype,
                                  text_encoder_projection_dim=model.text_encoders[1].config.projection_dim)
    assert torch.equal(cond.added["time_ids"], want.expand(2, -1))
    default = model.encode_prompts(PROMPTS)
    assert default.added["time_ids"][0].tolist() == [model.default_size] * 2 + [0, 0] + [model.default_size] * 2
    assert model.tokenizers[1].pad_token == "!" and model.tokenizers[0].pad_token == "<|endoftext|>"


def test_sdxl_diffusers_folder(small, tmp_path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    model, _, _ = small["sdxl"]
    pipe = StableDiffusionXLPipeline(vae=model.vae, text_encoder=model.text_encoders[0],
                                     text_encoder_2=model.text_encoders[1], tokenizer=model.tokenizers[0],
                                     tokenizer_2=model.tokenizers[1], unet=model.unet,
                                     scheduler=EulerDiscreteScheduler.from_config(model.scheduler_config))
    pipe.save_pretrained(tmp_path / "xl")
    loaded = load_model(tmp_path / "xl")
    assert loaded.family == "sdxl" and len(loaded.text_encoders) == 2
    x = torch.randn(1, *loaded.latent_shape())
    with torch.no_grad():  # same weights; from_pretrained's tensor layouts change the float summation order
        got, want = loaded.eps(x, 300, loaded.encode_prompts(PROMPTS[:1])), model.eps(x, 300, model.encode_prompts(PROMPTS[:1]))
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    for f in (tmp_path / "xl" / "text_encoder_2").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="text_encoder_2.*incomplete"):
        load_model(tmp_path / "xl")


def _fake(**shapes) -> dict[str, torch.Tensor]:
    return {k.replace("__", "."): torch.zeros(s) for k, s in shapes.items()}


SD15_CORE = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
             "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
             "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768)}
XL_CORE = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
           "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
           "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
           "conditioner.embedders.1.model.positional_embedding": (77, 1280)}


@pytest.mark.parametrize("keys,match", [
    ({**SD15_CORE, "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}, "9-channel UNet"),
    ({**SD15_CORE, "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
      "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)}, "SD2"),
    ({**SD15_CORE, "v_pred": ()}, "v-prediction"),
    ({**XL_CORE, "edm_mean": (1, 4, 1, 1)}, "v-prediction / EDM"),
    ({"conditioner.embedders.0.model.text_projection": (1280, 1280),
      "model.diffusion_model.input_blocks.0.0.weight": (384, 4, 3, 3)}, "refiner"),
    ({"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,)}, "SD3"),
    ({"double_blocks.0.img_attn.norm.key_norm.scale": (128,), "img_in.weight": (3072, 64)}, "a Flux model"),
    ({"down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)}, "diffusers-layout UNet"),
    ({k: v for k, v in XL_CORE.items() if "label_emb" not in k}, "incomplete SDXL"),
    ({k: v for k, v in SD15_CORE.items() if "cond_stage" not in k}, "not a full SD1.x"),
])
def test_unsupported_checkpoints_are_refused_before_loading(keys, match):
    sd = {k: torch.zeros(s) for k, s in keys.items()}
    with pytest.raises(UnsupportedModelError, match=match) as err:
        loading.detect_checkpoint_family(sd, "ckpt")
    assert "SD1.x/SD1.5 and SDXL base 1.0" in str(err.value)


def test_supported_checkpoints_detected():
    assert loading.detect_checkpoint_family({k: torch.zeros(s) for k, s in SD15_CORE.items()}) == "sd15"
    assert loading.detect_checkpoint_family({k: torch.zeros(s) for k, s in XL_CORE.items()}) == "sdxl"


def test_missing_and_refused_inputs_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        loading.read_checkpoint(tmp_path / "none.safetensors")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "none.safetensors")
    (tmp_path / "sd2" / "unet").mkdir(parents=True)
    (tmp_path / "sd2" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (tmp_path / "sd2" / "unet" / "config.json").write_text('{"cross_attention_dim": 1024, "in_channels": 4}')
    with pytest.raises(UnsupportedModelError, match="SD2"):
        load_model(tmp_path / "sd2")
    (tmp_path / "flux").mkdir()
    (tmp_path / "flux" / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(ValueError, match="FluxPipeline.*StableDiffusionXLPipeline"):
        load_model(tmp_path / "flux")


def test_a_diffusers_folder_with_pickled_weights_only_is_refused_unread(tmp_path, monkeypatch):
    """A pipeline folder whose UNet holds only a pickled .bin (no safetensors) is refused naming the file, and no
    pickle is opened: diffusers' and transformers' loaders never fall back to it."""
    import shutil

    from shortft_core.tiny_world import weights_dir

    folder = tmp_path / "pipe"
    shutil.copytree(weights_dir() / "pipeline", folder)
    unet = folder / "unet"
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"conv_in.weight": torch.zeros(1)}, unet / "diffusion_pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was opened"))
    with pytest.raises(FileNotFoundError, match=r"no weights \(\*.safetensors\) in .*unet.*diffusion_pytorch_model.bin"
                                                r" are pickle files, which are never loaded"):
        load_model(folder)


def test_ldm_key_maps_invert_diffusers_converters():
    """Our diffusers -> ldm names are exactly what diffusers' ldm -> diffusers converters undo (full-size configs)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    for family in ("sd15", "sdxl"):
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(bundled_config(family, "unet"))
            vae = AutoencoderKL.from_config(bundled_config(family, "vae"))
        sd = unet.state_dict()
        ldm = {ldm_keys.UNET_PREFIX + k: v for k, v in ldm_keys.unet_state_dict_to_ldm(sd, unet.config).items()}
        back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
        assert set(back) == set(sd) and all(back[k] is sd[k] for k in sd)
        vsd = vae.state_dict()
        vldm = {ldm_keys.VAE_PREFIX + k: v for k, v in ldm_keys.vae_state_dict_to_ldm(vsd, vae.config).items()}
        vback = convert_ldm_vae_checkpoint(vldm, dict(vae.config))
        assert set(vback) == set(vsd) and all(vback[k].shape == vsd[k].shape for k in vsd)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_full_size_checkpoint_layout_matches_bundled_configs(family):
    """Every tensor of a full-size ldm checkpoint (meta tensors: shapes only) fits the bundled configs strictly."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = lambda part: bundled_config(family, part)  # noqa: E731
    with init_empty_weights():
        unet, vae = UNet2DConditionModel.from_config(cfg("unet")), AutoencoderKL.from_config(cfg("vae"))
        tes = [CLIPTextModel(CLIPTextConfig(**cfg("text_encoder")))]
        if family == "sdxl":
            tes.append(CLIPTextModelWithProjection(CLIPTextConfig(**cfg("text_encoder_2"))))
    sd = ldm_keys.ldm_checkpoint(family, unet, vae, tes)
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(320, 4, 3, 3)  # detection reads a few shapes
    n = len(sd)
    model = loading.model_from_checkpoint(sd, "meta-checkpoint", device="meta", dtype=torch.float16)
    assert model.family == family and model.default_size == (512 if family == "sd15" else 1024)
    counts = [sum(p.numel() for p in m.parameters()) for m in (model.unet, model.vae, *model.text_encoders)]
    want = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, *tes)]
    assert counts == want and n > 1000
    assert model.unet.dtype == torch.float16 and (model.vae.dtype == torch.float32) == (family == "sdxl")


# ----- full size (slow) ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_full_size_sd15_single_file_with_bundled_configs(tmp_path):
    """A random SD1.5 in the original ldm layout (fp16 file, as distributed) loads with the bundled configs."""
    model = random_models.random_model("sd15", dtype=torch.float16, seed=11)
    ckpt = random_models.write_ldm_checkpoint(model, tmp_path / "sd15.safetensors", dtype=None)
    want = {k: v.clone() for k, v in model.unet.state_dict().items()}
    cond_want = model.encode_prompts(PROMPTS[:1])
    del model
    gc.collect()
    loaded = load_model(ckpt, dtype=torch.float16)
    assert loaded.family == "sd15" and loaded.default_size == 512
    got = loaded.unet.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    cond = loaded.encode_prompts(PROMPTS[:1])
    assert cond.hidden.shape == (1, 77, 768) and torch.equal(cond.hidden, cond_want.hidden)
    loaded.to(dtype=torch.float32)
    with torch.no_grad():
        eps = loaded.eps(torch.randn(1, 4, 8, 8), 500, cond.to("cpu", torch.float32))
    assert eps.shape == (1, 4, 8, 8) and torch.isfinite(eps).all()
