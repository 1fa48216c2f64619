"""CLIP-family rewards (HPS v2, PickScore, CLIP score, LAION aesthetic) on tiny random models in the published
layouts: parity with the reference PIL pipelines, gradients, strict loading, error messages."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from shortft_core.rewards import RewardKeyMismatch, RewardWeightsNotFound, build_reward
from shortft_core.rewards.preprocess import CLIP_MEAN, CLIP_STD, Preprocess

TINY_ARCH = "shortft-test-tiny-clip"
TINY_CFG = {"embed_dim": 32,
            "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32, "head_width": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
PROMPTS = ["a photo of a red cat", "an oil painting of a lighthouse at dusk", "two dogs", "a bowl of fruit"]
SIZES = [(224, 224), (224, 224), (512, 512), (384, 512)]
# PIL rounds its resampled pixels to uint8 and filters in fixed point; our resampling stays in float so that
# gradients exist. Measured |ours - PIL| over 7 shapes: max 1.2 uint8 levels (0.0172 normalised), mean 0.27 level
# (uniform rounding alone gives 0.25).
PIXEL_TOL = 1.5 / 255 / min(CLIP_STD)
PIXEL_MEAN_TOL = 0.35 / 255 / min(CLIP_STD)


def make_images(sizes=SIZES, seed: int = 0) -> list[torch.Tensor]:
    """Smooth colour fields plus noise, quantised to uint8 levels (so PIL sees exactly the same pixels)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for h, w in sizes:
        smooth = torch.nn.functional.interpolate(torch.rand(1, 3, max(2, h // 16), max(2, w // 16), generator=gen),
                                                 size=(h, w), mode="bilinear")
        out.append(((0.7 * smooth + 0.3 * torch.rand(1, 3, h, w, generator=gen)) * 255).round() / 255)
    return out


def to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray((x[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def hps_reference_transform(img: Image.Image) -> torch.Tensor:
    """HPS v2's evaluation transform as its open_clip fork writes it (``ResizeMaxSize`` + ToTensor + Normalize),
    re-stated with torchvision because the ``hpsv2`` package cannot be installed (shared/ENVIRONMENT.md)."""
    w, h = img.size
    scale = 224 / max(h, w)
    nh, nw = (round(h * scale), round(w * scale)) if scale != 1 else (h, w)
    if scale != 1:
        img = TF.resize(img, [nh, nw], InterpolationMode.BICUBIC)
        ph, pw = 224 - nh, 224 - nw
        img = TF.pad(img, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=0)
    return TF.normalize(TF.to_tensor(img.convert("RGB")), CLIP_MEAN, CLIP_STD)


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory):
    import open_clip

    d = tmp_path_factory.mktemp("open_clip_cfg")
    (d / f"{TINY_ARCH}.json").write_text(json.dumps(TINY_CFG), encoding="utf-8")
    open_clip.add_model_config(d / f"{TINY_ARCH}.json")
    return TINY_ARCH


@pytest.fixture(scope="module")
def open_clip_model(tiny_arch):
    import open_clip

    torch.manual_seed(0)
    return open_clip.create_model(tiny_arch, pretrained=None).eval()


@pytest.fixture(scope="module")
def hps_file(tmp_path_factory, open_clip_model):
    path = tmp_path_factory.mktemp("hps") / "HPS_v2_compressed.pt"
    torch.save({"state_dict": open_clip_model.state_dict(), "epoch": 1}, path)  # the published checkpoint layout
    return path


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A transformers CLIP folder like PickScore_v1 (weights, tokenizer) + a laion-style preprocessor config."""
    from transformers import CLIPConfig, CLIPModel

    from shortft_core.tokenizer import write_clip_tokenizer

    d = tmp_path_factory.mktemp("PickScore_v1")
    torch.manual_seed(1)
    cfg = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu"),
                     vision_config=dict(image_size=224, patch_size=32, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=2, hidden_act="gelu"),
                     projection_dim=32)
    CLIPModel(cfg).eval().save_pretrained(d)
    write_clip_tokenizer(d)
    (d / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
        "resample": 3, "size": 224}), encoding="utf-8")
    return d


# ----- preprocessing ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(512, 512), (512, 768), (300, 200), (160, 160), (225, 301)])
def test_preprocess_matches_reference_pil_pipelines(shape):
    import open_clip
    from transformers import CLIPImageProcessor
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    except ImportError:  # transformers before 5.x: CLIPImageProcessor is the PIL one
        CLIPImageProcessorPil = CLIPImageProcessor

    x = make_images([shape], seed=shape[0])[0]
    img = to_pil(x)
    cases = {
        "open_clip": (Preprocess(), open_clip.image_transform(224, is_train=False)(img)),
        "hps_v2": (Preprocess(resize_mode="longest"), hps_reference_transform(img)),
        "CLIPImageProcessorPil": (Preprocess(crop_offset="floor"),
                                  CLIPImageProcessorPil()(images=img, return_tensors="pt").pixel_values[0]),
        "CLIPImageProcessor": (Preprocess(crop_offset="floor"),
                               CLIPImageProcessor()(images=img, return_tensors="pt").pixel_values[0]),
    }
    for name, (prep, ref) in cases.items():
        ours = prep(x)[0]
        assert ours.shape == ref.shape, name
        diff = (ours - ref).abs()
        assert diff.max() < PIXEL_TOL, (name, diff.max())
        assert diff.mean() < PIXEL_MEAN_TOL, (name, diff.mean())


def test_preprocess_read_from_configs(clip_folder, open_clip_model):
    assert Preprocess.from_processor_config(clip_folder) == Preprocess(crop_size=224, crop_offset="floor")
    new_style = {"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}, "resample": 3,
                 "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    p = Preprocess.from_processor_config(new_style)
    assert (p.size, p.output_size, p.mean) == (256, 224, (0.5, 0.5, 0.5))
    assert p(torch.rand(1, 3, 300, 400)).shape == (1, 3, 224, 224)
    assert Preprocess.from_open_clip(open_clip_model) == Preprocess()


def test_preprocess_is_differentiable_and_pads_for_longest():
    x = torch.rand(1, 3, 100, 200, requires_grad=True)
    y = Preprocess(resize_mode="longest")(x)
    assert y.shape == (1, 3, 224, 224)
    black = (torch.zeros(3) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(y[0, :, 0, 0], black)  # padded rows are black pixels, normalised
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ----- HPS v2 (open_clip) ------------------------------------------------------------------------------------------
def _open_clip_reference(model, tokenizer, images, prompts, transform):
    with torch.no_grad():
        pix = torch.stack([transform(to_pil(x)) for x in images])
        img = torch.nn.functional.normalize(model.encode_image(pix), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
    return (img * txt).sum(-1)


@pytest.fixture(scope="module")
def hps_reward(tiny_arch, hps_file):
    return build_reward("hps_v2", weights_dir=hps_file.parent, arch=tiny_arch, device="cpu")


def test_hps_matches_reference(hps_reward, tiny_arch, open_clip_model):
    import open_clip

    assert hps_reward.report_scale == 100.0 and hps_reward.name == "hps_v2"
    images = make_images()
    with torch.no_grad():
        ours = torch.cat([hps_reward(x, [p]) for x, p in zip(images, PROMPTS)])
    ref = _open_clip_reference(open_clip_model, open_clip.get_tokenizer(tiny_arch), images, PROMPTS,
                               hps_reference_transform)
    assert (ours[:2] - ref[:2]).abs().max() < 1e-5  # 224 px: no resampling, the model path alone
    assert (ours[2:] - ref[2:]).abs().max() < 5e-4  # resampled: PIL's uint8 rounding (measured 4e-5)


def test_hps_v21_is_the_same_architecture(hps_reward, hps_file, tiny_arch, tmp_path):
    (tmp_path / "HPS_v2.1_compressed.pt").write_bytes(hps_file.read_bytes())
    v21 = build_reward("hps_v2.1", weights_dir=tmp_path, arch=tiny_arch, device="cpu")
    x = make_images([(224, 224)], seed=4)[0]
    assert v21.name == "hps_v2.1"
    torch.testing.assert_close(v21(x, PROMPTS[:1]), hps_reward(x, PROMPTS[:1]))


def test_hps_gradients_and_checkpointing(hps_reward, tiny_arch, hps_file):
    ckpt = build_reward("hps_v2", path=hps_file, arch=tiny_arch, device="cpu", grad_checkpointing=True)
    grads = []
    for reward in (hps_reward, ckpt):
        x = make_images([(256, 256)], seed=5)[0].requires_grad_(True)
        reward(x, PROMPTS[:1]).sum().backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        assert not any(p.requires_grad for p in reward.parameters())
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-8)


def test_hps_bf16_runs_close_to_fp32(hps_reward, tiny_arch, hps_file):
    x = make_images([(256, 256)] * 2, seed=6)
    x = torch.cat(x).requires_grad_(True)
    fp32 = hps_reward(x, PROMPTS[:2]).detach()
    r16 = build_reward("hps_v2", path=hps_file, arch=tiny_arch, device="cpu", dtype=torch.bfloat16)
    assert r16.dtype == torch.bfloat16
    out = r16(x, PROMPTS[:2])
    assert out.dtype == torch.float32 and (out - fp32).abs().max() < 0.05
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_hps_refuses_wrong_files(tiny_arch, hps_file, tmp_path):
    state = torch.load(hps_file, weights_only=True)["state_dict"]
    bad = {k: v for k, v in state.items() if k != "visual.proj"}
    bad["visual.extra_head.weight"] = torch.zeros(2)
    torch.save({"state_dict": bad}, tmp_path / "HPS_v2_compressed.pt")
    with pytest.raises(RewardKeyMismatch) as e:
        build_reward("hps_v2", path=tmp_path / "HPS_v2_compressed.pt", arch=tiny_arch, device="cpu")
    assert "visual.proj" in str(e.value) and "visual.extra_head.weight" in str(e.value)

    shapes = dict(state, **{"visual.proj": torch.zeros(64, 16)})
    torch.save({"state_dict": shapes}, tmp_path / "HPS_v2_compressed.pt")
    with pytest.raises(RewardKeyMismatch, match="wrong shape"):
        build_reward("hps_v2", path=tmp_path / "HPS_v2_compressed.pt", arch=tiny_arch, device="cpu")

    torch.save(torch.nn.Linear(2, 2), tmp_path / "HPS_v2_compressed.pt")
    with pytest.raises(ValueError, match="pickled code"):
        build_reward("hps_v2", path=tmp_path / "HPS_v2_compressed.pt", arch=tiny_arch, device="cpu")


def test_missing_files_name_file_place_and_source(tmp_path):
    for name, file, source in [("hps_v2", "HPS_v2_compressed.pt", "xswu/HPSv2"),
                               ("hps_v2.1", "HPS_v2.1_compressed.pt", "xswu/HPSv2"),
                               ("pickscore", "PickScore_v1", "yuvalkirstain/PickScore_v1"),
                               ("aesthetic", "sac+logos+ava1-l14-linearMSE.pth", "improved-aesthetic-predictor")]:
        with pytest.raises(RewardWeightsNotFound) as e:
            build_reward(name, weights_dir=tmp_path, device="cpu")
        assert file in str(e.value) and source in str(e.value) and str(tmp_path) in str(e.value)


# ----- PickScore / CLIP score (transformers folder) ---------------------------------------------------------------
@pytest.mark.parametrize("processor_kind", ["pil", "default"])
def test_pickscore_matches_clip_processor(clip_folder, processor_kind):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    except ImportError:  # transformers before 5.x: CLIPImageProcessor is the PIL one
        CLIPImageProcessorPil = CLIPImageProcessor

    from shortft_core.rewards.clip import clip_features

    reward = build_reward("pickscore", path=clip_folder, device="cpu")
    images = make_images()
    with torch.no_grad():
        ours = torch.cat([reward(x, [p]) for x, p in zip(images, PROMPTS)])
        # PickScore's published scoring code, with the processor loaded from the same local folder
        model = CLIPModel.from_pretrained(clip_folder, local_files_only=True).eval()
        proc_cls = CLIPImageProcessorPil if processor_kind == "pil" else CLIPImageProcessor
        image_proc = proc_cls.from_pretrained(clip_folder, local_files_only=True)
        tok = CLIPTokenizer.from_pretrained(clip_folder, local_files_only=True)
        pix = torch.cat([image_proc(images=to_pil(x), return_tensors="pt").pixel_values for x in images])
        txt = tok(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        img_e = torch.nn.functional.normalize(clip_features(model.get_image_features(pixel_values=pix)), dim=-1)
        txt_e = torch.nn.functional.normalize(clip_features(model.get_text_features(**txt)), dim=-1)
        ref = model.logit_scale.exp() * (img_e * txt_e).sum(-1)
    assert (ours[:2] - ref[:2]).abs().max() < 1e-4  # 224 px (measured 2e-6; PickScore is logit_scale * cos)
    assert (ours[2:] - ref[2:]).abs().max() < 0.02  # resampled: PIL's uint8 rounding (measured 2.5e-3)


def test_clip_score_folder_and_gradient(clip_folder):
    reward = build_reward("clip_score", path=clip_folder, device="cpu")
    pick = build_reward("pickscore", path=clip_folder, device="cpu")
    x = torch.cat(make_images([(256, 256)] * 2, seed=8)).requires_grad_(True)
    s = reward(x, PROMPTS[:2])
    torch.testing.assert_close(s * pick.model.logit_scale.exp(), pick(x, PROMPTS[:2]), rtol=1e-5, atol=1e-5)
    assert s.abs().max() <= 1.0
    s.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    ckpt = build_reward("clip_score", path=clip_folder, device="cpu", grad_checkpointing=True)
    x2 = x.detach().clone().requires_grad_(True)
    ckpt(x2, PROMPTS[:2]).sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-8)


def test_clip_score_open_clip_matches_reference(tiny_arch, open_clip_model, hps_file):
    import open_clip

    reward = build_reward("clip_score", path=hps_file, arch=tiny_arch, device="cpu")
    images = make_images()
    with torch.no_grad():
        ours = torch.cat([reward(x, [p]) for x, p in zip(images, PROMPTS)])
    ref = _open_clip_reference(open_clip_model, open_clip.get_tokenizer(tiny_arch), images, PROMPTS,
                               open_clip.image_transform(224, is_train=False))
    assert (ours[:2] - ref[:2]).abs().max() < 1e-5
    assert (ours[2:] - ref[2:]).abs().max() < 5e-4  # measured 8e-5


# ----- LAION aesthetic -------------------------------------------------------------------------------------------
def _write_head(path, dim: int, seed: int = 0):
    from shortft_core.rewards.aesthetic import AestheticMLP

    torch.manual_seed(seed)
    head = AestheticMLP(dim)
    torch.save(head.state_dict(), path)  # the published .pth is a plain state dict
    return head.eval()


def test_aesthetic_open_clip_matches_reference(tiny_arch, open_clip_model, hps_file, tmp_path):
    import open_clip

    head = _write_head(tmp_path / "sac+logos+ava1-l14-linearMSE.pth", 32)
    reward = build_reward("aesthetic", path=tmp_path / "sac+logos+ava1-l14-linearMSE.pth",
                          paths={"clip": hps_file}, arch=tiny_arch, device="cpu")
    images = make_images()
    transform = open_clip.image_transform(224, is_train=False)
    with torch.no_grad():
        ours = torch.cat([reward(x, [""]) for x in images])
        emb = torch.nn.functional.normalize(
            open_clip_model.encode_image(torch.stack([transform(to_pil(x)) for x in images])), dim=-1)
        ref = head(emb)
    assert (ours[:2] - ref[:2]).abs().max() < 1e-5
    assert (ours[2:] - ref[2:]).abs().max() < 2e-3
    x = images[2].clone().requires_grad_(True)
    reward(x, [""]).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_aesthetic_transformers_clip_and_dimension_check(clip_folder, tmp_path):
    _write_head(tmp_path / "sac+logos+ava1-l14-linearMSE.pth", 32)
    reward = build_reward("aesthetic", weights_dir=tmp_path, paths={"clip": clip_folder}, device="cpu")
    assert reward(torch.rand(2, 3, 224, 224), ["", ""]).shape == (2,)
    _write_head(tmp_path / "sac+logos+ava1-l14-linearMSE.pth", 768)
    with pytest.raises(ValueError, match="768-d"):
        build_reward("aesthetic", weights_dir=tmp_path, paths={"clip": clip_folder}, device="cpu")
    torch.save({"layers.0.weight": torch.zeros(1024, 32)}, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    with pytest.raises(RewardKeyMismatch, match="missing"):
        build_reward("aesthetic", weights_dir=tmp_path, paths={"clip": clip_folder}, device="cpu")


def test_aesthetic_reward_takes_any_embedding_function():
    from shortft_core.rewards.aesthetic import AestheticMLP, AestheticReward

    def embed(images: torch.Tensor) -> torch.Tensor:  # any differentiable (B, D) L2-normalised embedding
        return torch.nn.functional.normalize(torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1)[:, :32],
                                             dim=-1)

    torch.manual_seed(0)
    reward = AestheticReward(embed, AestheticMLP(32), name="pooled")
    x = torch.rand(3, 3, 64, 64, requires_grad=True)
    out = reward(x, ["", "", ""])
    torch.testing.assert_close(out, reward.head(embed(x)))
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(TypeError, match="image_embeds"):
        AestheticReward(42, AestheticMLP(32))
