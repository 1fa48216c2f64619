"""Slow tier: the full-size published architectures with random weights, written in the published file layouts,
loaded through the registry (strict keys) and run once. Minutes and several GB of RAM; run with -m slow."""

from __future__ import annotations

import gc
import json

import pytest
import torch

from shortft_core.rewards import build_reward
from shortft_core.rewards.preprocess import CLIP_MEAN, CLIP_STD

pytestmark = pytest.mark.slow

PROMPT = ["a photograph of an astronaut riding a horse"]


def _one_forward_backward(reward, size: int = 512) -> torch.Tensor:
    x = torch.rand(1, 3, size, size, requires_grad=True)
    out = reward(x, PROMPT)
    assert out.shape == (1,) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    return out


def test_hps_v2_vit_h_14(tmp_path):
    import open_clip

    model = open_clip.create_model("ViT-H-14", pretrained=None)
    state = {k: v.half() for k, v in model.state_dict().items()}  # the published file holds fp16 tensors
    n_keys = len(state)
    torch.save({"state_dict": state}, tmp_path / "HPS_v2_compressed.pt")
    del model, state
    gc.collect()
    reward = build_reward("hps_v2", weights_dir=tmp_path, device="cpu")
    assert n_keys == len(reward.model.state_dict()) == 686  # the count the real checkpoint has (ENVIRONMENT.md)
    assert reward.model.visual.output_dim == 1024 and reward.model.visual.image_size == (224, 224)
    _one_forward_backward(reward.enable_gradient_checkpointing())


def test_pickscore_vit_h_14_folder(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                      num_attention_heads=16, hidden_act="gelu"),
                     vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                        num_attention_heads=16, patch_size=14, image_size=224, hidden_act="gelu"),
                     projection_dim=1024)
    folder = tmp_path / "PickScore_v1"
    CLIPModel(cfg).half().save_pretrained(folder)  # no tokenizer files: the loader builds CLIP's BPE offline
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True, "resample": 3,
        "size": 224, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}), encoding="utf-8")
    gc.collect()
    reward = build_reward("pickscore", weights_dir=tmp_path, device="cpu")
    assert reward.model.config.projection_dim == 1024 and reward.tokenizer.vocab_size == 49408
    _one_forward_backward(reward)


def _full_vocab(tmp_path):
    from shortft_core.rewards.registry import _packaged_bert_vocab

    vocab = _packaged_bert_vocab()
    if vocab is None:  # any 30,522-line vocabulary has the published shapes
        vocab = tmp_path / "vocab.txt"
        vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] +
                                   [f"w{i}" for i in range(30522 - 5)]) + "\n", encoding="utf-8")
    return vocab


PUBLISHED_MED_CONFIG = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524, "encoder_width": 768,
    "add_cross_attention": True}


def test_image_reward_blip_large(tmp_path):
    from shortft_core.rewards.image_reward import (ImageRewardModel, TextConfig, VisionConfig,
                                                   to_official_state_dict)

    torch.manual_seed(0)
    text = TextConfig.from_med_config(PUBLISHED_MED_CONFIG, encoder_width=1024)
    model = ImageRewardModel(VisionConfig(), text)
    torch.save(to_official_state_dict(model, dtype=torch.float16), tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps(PUBLISHED_MED_CONFIG), encoding="utf-8")
    vocab = _full_vocab(tmp_path)
    del model
    gc.collect()
    reward = build_reward("image_reward", weights_dir=tmp_path, paths={"vocab": vocab}, device="cpu")
    cfg = reward.vision.cfg
    assert (cfg.width, cfg.depth, cfg.heads, cfg.patch_size, cfg.image_size) == (1024, 24, 16, 16, 224)
    assert len(reward.text.encoder.layer) == 12 and reward.text.cfg.encoder_width == 1024
    _one_forward_backward(reward.enable_gradient_checkpointing())


def test_image_reward_blip_large_matches_stock_package(tmp_path):
    """The full ViT-L of the stock package (no size patch) against ours, on a random official-layout file."""
    from test_rewards_imagereward import IR_MISSING, IR_READY, _run_reference

    if not IR_READY:
        pytest.skip(IR_MISSING)
    from PIL import Image

    from shortft_core.rewards.image_reward import (ImageRewardModel, TextConfig, VisionConfig,
                                                   to_official_state_dict)

    torch.manual_seed(1)
    model = ImageRewardModel(VisionConfig(), TextConfig.from_med_config(PUBLISHED_MED_CONFIG, encoder_width=1024))
    with torch.no_grad():  # a small-magnitude head keeps the normalised reward O(1)
        for p in model.head.parameters():
            p.mul_(0.1)
    torch.save(to_official_state_dict(model, dtype=torch.float16), tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps(PUBLISHED_MED_CONFIG), encoding="utf-8")
    vocab = _full_vocab(tmp_path)
    del model
    gc.collect()
    gen = torch.Generator().manual_seed(2)
    images, files = [], []
    for i in range(2):
        u8 = (torch.rand(3, 224, 224, generator=gen) * 255).round().to(torch.uint8)
        Image.fromarray(u8.permute(1, 2, 0).numpy()).save(tmp_path / f"{i}.png")
        files.append(str(tmp_path / f"{i}.png"))
        images.append(u8.float()[None] / 255)
    prompts = ["a red cat on a sofa", "an astronaut riding a horse on the moon"]
    reward = build_reward("image_reward", weights_dir=tmp_path, paths={"vocab": vocab}, device="cpu")
    with torch.no_grad():
        ours = torch.cat([reward(x, [p]) for x, p in zip(images, prompts)])
    del reward  # the reference process needs the memory
    gc.collect()
    ref = _run_reference(tmp_path, {"checkpoint": str(tmp_path / "ImageReward.pt"),
                                    "med_config": str(tmp_path / "med_config.json"), "vocab_dir": str(vocab.parent),
                                    "vit": None, "prompts": prompts, "images": files})
    assert ref["missing"] == [] and ref["unexpected"] == []
    assert (ours - torch.tensor(ref["scores"])).abs().max() < 1e-4


def test_aesthetic_vit_l_14(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    from shortft_core.rewards.aesthetic import AestheticMLP

    model = open_clip.create_model("ViT-L-14-quickgelu", pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    torch.save(AestheticMLP(768).state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    del model
    gc.collect()
    reward = build_reward("aesthetic", weights_dir=tmp_path, device="cpu")
    assert reward.head.input_size == 768
    _one_forward_backward(reward)
