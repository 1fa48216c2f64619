"""ImageReward (Xu et al. 2023) as a differentiable reward, on our own small modules.

The published model is BLIP's ViT-L/16 image encoder, a BERT-base text encoder whose every layer also
cross-attends to the image tokens (BLIP's "MED" in multimodal mode), and an MLP on the text [CLS] state:

    reward = (mlp(text_encoder(ids, image=vit(pixels))[:, 0]) - 0.16717362830052426) / 1.0333394966054072

Text: BERT WordPiece (bert-base-uncased vocabulary plus BLIP's ``[DEC]``/``[ENC]`` tokens), padded to 35.
Image: bicubic resize of the shorter side to 224, centre crop, OpenAI CLIP normalisation.

The stock ``image-reward`` package cannot run on a current stack (see shared/ENVIRONMENT.md), so the modules
below re-implement exactly that computation; module names follow the official checkpoint's, so its keys map by
prefix only (``blip.visual_encoder.`` -> ``vision.``, ``blip.text_encoder.`` -> ``text.``, ``mlp.`` -> ``head.``).
Parity with the stock package is tested in tests/test_rewards_imagereward.py.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..memory import checkpoint_blocks
from .aesthetic import AestheticMLP
from .base import Reward
from .preprocess import Preprocess
from .weights import RewardKeyMismatch, check_keys, check_shapes, load_state_dict

log = logging.getLogger(__name__)

REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_LENGTH = 35
BLIP_EXTRA_TOKENS = ("[DEC]", "[ENC]")  # added by BLIP's init_tokenizer after the BERT vocabulary

# official checkpoint prefix -> our module prefix
KEY_PREFIXES = {"blip.visual_encoder.": "vision.", "blip.text_encoder.": "text.", "mlp.": "head."}
# in the official checkpoint but unused for scoring (BLIP's contrastive projections) or derived (position ids)
UNUSED_KEYS = ("blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight", "blip.text_proj.bias")
POSITION_IDS_KEY = "blip.text_encoder.embeddings.position_ids"


# ----- BLIP ViT (timm-style pre-norm blocks, LayerNorm eps 1e-6, exact GELU) ----------------------------------------
@dataclass(frozen=True)
class VisionConfig:
    """BLIP ViT geometry; ImageReward uses the 'large' one (1024 wide, 24 blocks, 16 heads, 16 px patches)."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0


class _PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = _Attention(cfg.width, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.mlp = _Mlp(cfg.width, int(cfg.width * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BlipVisionEncoder(nn.Module):
    """Patch embedding + class token + learned positions -> pre-norm blocks -> final LayerNorm; all tokens out."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embed = _PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, cfg.width))
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed[:, : x.shape[1] + 1]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# ----- BLIP's MED text encoder in multimodal mode (BERT + cross-attention in every layer) -------------------------
@dataclass(frozen=True)
class TextConfig:
    """The fields of ImageReward's ``med_config.json`` that shape the text encoder."""

    vocab_size: int = 30524
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    encoder_width: int = 1024  # BLIP overrides the file's value with the ViT width

    @classmethod
    def from_med_config(cls, config: Mapping[str, Any], encoder_width: int) -> "TextConfig":
        if config.get("hidden_act", "gelu") != "gelu" or config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("med_config: only hidden_act 'gelu' and absolute position embeddings are supported "
                             "(ImageReward's published config uses both)")
        if not config.get("add_cross_attention", False):
            raise ValueError("med_config: add_cross_attention must be true for ImageReward's text encoder")
        fields = {k: config[k] for k in cls.__dataclass_fields__ if k in config and k != "encoder_width"}
        return cls(**fields, encoder_width=encoder_width)


class _BertSelfAttention(nn.Module):
    def __init__(self, cfg: TextConfig, kv_width: int) -> None:
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, t.shape[1], self.heads, c // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(context)),
                                             split(self.value(context)), attn_mask=mask)
        return out.transpose(1, 2).reshape(b, n, c)


class _BertResidualOut(nn.Module):
    """``dense`` then LayerNorm of (output + residual): BERT's ``*Output`` / ``attention.output`` modules."""

    def __init__(self, in_width: int, cfg: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(in_width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _BertAttention(nn.Module):
    def __init__(self, cfg: TextConfig, kv_width: int) -> None:
        super().__init__()
        self.self = _BertSelfAttention(cfg, kv_width)
        self.output = _BertResidualOut(cfg.hidden_size, cfg)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, context, mask), x)


class _BertIntermediate(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class _BertLayer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.attention = _BertAttention(cfg, cfg.hidden_size)
        self.crossattention = _BertAttention(cfg, cfg.encoder_width)
        self.intermediate = _BertIntermediate(cfg)
        self.output = _BertResidualOut(cfg.intermediate_size, cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, x, mask)
        x = self.crossattention(x, image, None)  # every image token is attended (BLIP passes an all-ones mask)
        return self.output(self.intermediate(x), x)


class _BertEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(pos)[None])


class _BertLayers(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_BertLayer(cfg) for _ in range(cfg.num_hidden_layers))


class MultimodalTextEncoder(nn.Module):
    """BERT whose layers cross-attend to image tokens; returns the last hidden states."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = _BertEmbeddings(cfg)
        self.encoder = _BertLayers(cfg)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(ids)
        # BLIP adds -10000 to the scores of padding keys; a boolean mask is the same after the softmax
        mask = attention_mask[:, None, None, :].bool()
        for layer in self.encoder.layer:
            x = layer(x, mask, image)
        return x


# ----- tokenizer ---------------------------------------------------------------------------------------------------
def load_bert_tokenizer(vocab: str | os.PathLike, expected_vocab_size: int | None = None):
    """bert-base-uncased's WordPiece tokenizer from a local ``vocab.txt`` (or a folder holding it), plus BLIP's
    ``[DEC]`` and ``[ENC]`` tokens, exactly as ImageReward builds it (but never from the hub).

    Only ``vocab.txt`` is used (copied to a private folder), so another model's tokenizer settings shipped beside
    it cannot change the tokenisation. ``expected_vocab_size`` is the BERT vocabulary size the checkpoint needs.
    """
    from transformers import BertTokenizer

    vocab = Path(vocab)
    vocab_file = vocab / "vocab.txt" if vocab.is_dir() else vocab
    if not vocab_file.is_file():
        raise FileNotFoundError(f"image_reward: no BERT vocabulary at {vocab_file}; pass bert-base-uncased's vocab.txt "
                                "(or the folder holding it)")
    with tempfile.TemporaryDirectory(prefix="shortft_bert_vocab_") as tmp:
        shutil.copyfile(vocab_file, Path(tmp) / "vocab.txt")
        tok = BertTokenizer.from_pretrained(tmp, do_lower_case=True, local_files_only=True)
    size = tok.vocab_size
    lines = sum(1 for line in vocab_file.read_text(encoding="utf-8").splitlines() if line)
    if size != lines or (expected_vocab_size is not None and size != expected_vocab_size):
        raise RuntimeError(
            f"image_reward: the tokenizer from {vocab_file} has {size} tokens (file: {lines} lines), the model needs "
            f"{expected_vocab_size}; use bert-base-uncased's 30,522-token vocab.txt"
        )
    tok.add_special_tokens({"bos_token": BLIP_EXTRA_TOKENS[0]})
    try:
        tok.add_special_tokens({"additional_special_tokens": [BLIP_EXTRA_TOKENS[1]]})
    except (KeyError, ValueError, TypeError):  # newer transformers spell it differently
        tok.add_tokens([BLIP_EXTRA_TOKENS[1]], special_tokens=True)
    ids = tok.convert_tokens_to_ids(list(BLIP_EXTRA_TOKENS))
    if ids != [size, size + 1]:
        raise RuntimeError(f"image_reward: BLIP's extra tokens got ids {ids}, expected {[size, size + 1]}")
    return tok


# ----- the reward -------------------------------------------------------------------------------------------------
def image_reward_preprocess() -> Preprocess:
    """ImageReward's ``_transform(224)``: Resize(224, BICUBIC), CenterCrop(224), OpenAI CLIP mean/std."""
    return Preprocess(size=224, interpolation="bicubic", resize_mode="shortest", crop_offset="round")


class ImageRewardModel(Reward):
    """ImageReward v1.0: ``(B, 3, H, W)`` images in [0, 1] and prompts -> normalised reward (B,)."""

    def __init__(self, vision: VisionConfig, text: TextConfig, tokenizer=None, name: str = "image_reward") -> None:
        super().__init__()
        if text.encoder_width != vision.width:
            raise ValueError(f"text encoder_width {text.encoder_width} must equal the ViT width {vision.width}")
        self.vision = BlipVisionEncoder(vision)
        self.text = MultimodalTextEncoder(text)
        self.head = AestheticMLP(text.hidden_size)  # same MLP layout as the LAION head (layers.{0,2,4,6,7})
        self.tokenizer = tokenizer
        self.preprocess = image_reward_preprocess()
        self.name = name
        self.freeze()

    @property
    def dtype(self) -> torch.dtype:
        return self.vision.cls_token.dtype

    def enable_gradient_checkpointing(self) -> "ImageRewardModel":
        """Recompute ViT blocks during backward (the text layers see the image too, so they are wrapped as well)."""
        checkpoint_blocks(self.vision.blocks)
        checkpoint_blocks(self.text.encoder.layer)
        return self

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, padded/truncated to 35 like ImageReward."""
        if self.tokenizer is None:
            raise RuntimeError(f"{self.name}: built without a tokenizer; pass one or call reward_from_tokens")
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH,
                             return_tensors="pt")
        return tok.input_ids, tok.attention_mask

    def reward_from_tokens(self, ids: torch.Tensor, mask: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """The stock ``score_gard``: already-normalised 224 px pixels and token ids -> normalised reward (B,)."""
        image = self.vision(pixels.to(self.dtype))
        text = self.text(ids.to(image.device), mask.to(image.device), image)
        return (self.head(text[:, 0].float()) - REWARD_MEAN) / REWARD_STD

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        ids, mask = self.tokenize(prompts)
        return self.reward_from_tokens(ids, mask, self.preprocess(images))


def to_official_state_dict(model: ImageRewardModel, embed_dim: int = 256,
                           dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Our weights in the published ``ImageReward.pt`` layout (with BLIP's unused projections, randomised), for
    writing test checkpoints that the stock package loads strictly. Tensors share the model's storage unless
    ``dtype`` converts them."""
    inverse = {ours: theirs for theirs, ours in KEY_PREFIXES.items()}
    out = {}
    for k, v in model.state_dict().items():
        prefix = next(p for p in inverse if k.startswith(p))
        out[inverse[prefix] + k[len(prefix):]] = v if dtype is None else v.to(dtype)
    vw, tw = model.vision.cfg.width, model.text.cfg.hidden_size
    out[POSITION_IDS_KEY] = torch.arange(model.text.cfg.max_position_embeddings).expand(1, -1).clone()
    out["blip.vision_proj.weight"], out["blip.vision_proj.bias"] = torch.randn(embed_dim, vw) * 0.02, torch.zeros(embed_dim)
    out["blip.text_proj.weight"], out["blip.text_proj.bias"] = torch.randn(embed_dim, tw) * 0.02, torch.zeros(embed_dim)
    return out


def _map_official_keys(path: Path, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    mapped, unknown = {}, []
    for k, v in state.items():
        if k in UNUSED_KEYS:
            continue
        if k == POSITION_IDS_KEY:
            if not torch.equal(v.flatten(), torch.arange(v.numel(), dtype=v.dtype)):
                raise RewardKeyMismatch(f"image_reward: {path} has non-standard {k}; the text positions must be 0..N-1")
            continue
        prefix = next((p for p in KEY_PREFIXES if k.startswith(p)), None)
        if prefix is None:
            unknown.append(k)
        else:
            mapped[KEY_PREFIXES[prefix] + k[len(prefix):]] = v
    if unknown:
        check_keys("image_reward", path, [], unknown)  # raises, listing them as unexpected
    return mapped


def infer_vision_config(state: Mapping[str, torch.Tensor], path: Path) -> VisionConfig:
    """The ViT geometry stored in an official-layout checkpoint (heads are 64-wide, as in BLIP's ViTs)."""
    try:
        w = state["blip.visual_encoder.patch_embed.proj.weight"]
        n_tokens = state["blip.visual_encoder.pos_embed"].shape[1]
        fc1 = state["blip.visual_encoder.blocks.0.mlp.fc1.weight"]
    except KeyError as e:
        raise RewardKeyMismatch(f"image_reward: {path} has no {e.args[0]}: it is not an ImageReward checkpoint "
                                "(expected keys under blip.visual_encoder., blip.text_encoder. and mlp.)") from None
    width, patch = int(w.shape[0]), int(w.shape[-1])
    side = int(round((n_tokens - 1) ** 0.5))
    depth = len({k.split(".")[3] for k in state if k.startswith("blip.visual_encoder.blocks.")})
    return VisionConfig(image_size=side * patch, patch_size=patch, width=width, depth=depth,
                        heads=max(1, width // 64), mlp_ratio=fc1.shape[0] / width)


def build_image_reward(checkpoint: str | os.PathLike, med_config: str | os.PathLike, vocab: str | os.PathLike,
                       dtype: torch.dtype = torch.float32, vision_heads: int | None = None,
                       name: str = "image_reward") -> ImageRewardModel:
    """Load the published ``ImageReward.pt`` (+ ``med_config.json`` + bert-base-uncased ``vocab.txt``) strictly."""
    checkpoint, med_config = Path(checkpoint), Path(med_config)
    state = load_state_dict(checkpoint)
    config = json.loads(med_config.read_text(encoding="utf-8"))
    vision = infer_vision_config(state, checkpoint)
    if vision_heads is not None:
        vision = VisionConfig(**{**vision.__dict__, "heads": vision_heads})
    text = TextConfig.from_med_config(config, encoder_width=vision.width)
    tokenizer = load_bert_tokenizer(vocab, expected_vocab_size=text.vocab_size - len(BLIP_EXTRA_TOKENS))
    model = ImageRewardModel(vision, text, tokenizer, name=name)
    mapped = _map_official_keys(checkpoint, state)
    own = model.state_dict()
    check_keys(name, checkpoint, own.keys(), mapped.keys())
    check_shapes(name, checkpoint, own, mapped)
    model.load_state_dict(mapped, strict=True)
    model.head.float()
    model.vision.to(dtype)
    model.text.to(dtype)
    log.info("%s: loaded %s (ViT %dx%d, text %d layers)", name, checkpoint, vision.depth, vision.width,
             text.num_hidden_layers)
    return model
