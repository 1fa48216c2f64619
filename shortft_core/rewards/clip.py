"""Text-image alignment scored by a CLIP dual encoder: HPS v2/v2.1, PickScore, CLIP score, the tiny world's reward.

score = scale * cos(image embedding, text embedding), where ``scale`` is 1 (HPS v2, CLIP score) or
``logit_scale.exp()`` (PickScore's convention). One reward class serves both CLIP implementations the published
checkpoints come in: transformers ``CLIPModel`` folders (PickScore, OpenAI CLIP, the tiny world) and open_clip
models (HPS v2 is an open_clip ViT-H-14 fine-tune).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..compat import transformers_dtype
from ..files import check_safetensors
from ..memory import checkpoint_blocks
from .base import Reward
from .preprocess import Preprocess
from .weights import load_state_dict, load_strict

log = logging.getLogger(__name__)


def clip_features(out) -> torch.Tensor:
    """transformers 5 may return an output object from get_*_features; unwrap to the projected tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        v = getattr(out, name, None)
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(f"cannot find the embedding in {type(out).__name__}")


def is_open_clip(model) -> bool:
    """True for open_clip models (``encode_image``), False for transformers ``CLIPModel`` (``get_image_features``)."""
    return hasattr(model, "encode_image") and not hasattr(model, "get_image_features")


def load_clip_folder(folder: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Load a local transformers CLIPModel folder and its tokenizer; both offline and checked.

    A folder without tokenizer files (``vocab.json`` + ``merges.txt``, or a ``tokenizer/`` subfolder) gets the
    standard CLIP BPE tokenizer built from open_clip's merge table, which is the one every CLIP checkpoint here
    (OpenAI, LAION, PickScore) was trained with.
    """
    from transformers import CLIPModel

    from ..tokenizer import load_clip_tokenizer, write_clip_tokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no CLIP model at {folder} (config.json missing): pass a local transformers CLIP folder")
    model = CLIPModel.from_pretrained(str(folder), **transformers_dtype(dtype), local_files_only=True,
                                      use_safetensors=True)
    for tok_dir in (folder / "tokenizer", folder):
        if (tok_dir / "vocab.json").is_file() and (tok_dir / "merges.txt").is_file():
            return model, load_clip_tokenizer(tok_dir)
    log.info("%s has no tokenizer files; using the CLIP BPE tokenizer built from open_clip's merges", folder)
    with tempfile.TemporaryDirectory(prefix="shortft_clip_tok_") as tmp:
        return model, load_clip_tokenizer(write_clip_tokenizer(tmp))


def load_open_clip(arch: str, checkpoint: str | os.PathLike, what: str = "open_clip model",
                   dtype: torch.dtype = torch.float32):
    """Build open_clip architecture ``arch`` with random weights and load ``checkpoint`` strictly.

    ``checkpoint`` is a state dict (safetensors, or ``torch.save`` of a dict, optionally under ``'state_dict'``,
    as HPS v2 ships it), never a pickled module or TorchScript archive. Returns ``(model, tokenizer)``.
    """
    import open_clip

    if ":" in arch:
        raise ValueError(f"{what}: arch {arch!r} names a hub or remote config; give a built-in open_clip "
                         "architecture name such as 'ViT-H-14' or 'ViT-L-14-quickgelu' (see open_clip.list_models())")
    if arch not in open_clip.list_models():
        raise ValueError(f"{what}: unknown open_clip architecture {arch!r}; choose one of open_clip.list_models()")
    if Path(checkpoint).suffix == ".safetensors":
        check_safetensors(checkpoint, what)  # a damaged file is refused before the architecture is built
    model = open_clip.create_model(arch, pretrained=None, device="cpu")
    state = load_state_dict(checkpoint)
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
        state = {k[len("module."):]: v for k, v in state.items()}
    load_strict(what, model, checkpoint, state)
    return model.to(dtype).eval(), open_clip.get_tokenizer(arch)


class CLIPAlignmentReward(Reward):
    """Cosine (optionally scaled by ``logit_scale.exp()``) between CLIP image and text embeddings.

    ``model`` is a transformers ``CLIPModel`` with its ``CLIPTokenizer``, or an open_clip model with its
    tokenizer (a callable returning token ids). The tokenizer may be ``None`` when only :meth:`image_embeds` is
    used (the aesthetic head).
    """

    def __init__(self, model, tokenizer, preprocess: Preprocess, use_logit_scale: bool = False,
                 name: str = "clip_score", report_scale: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.use_logit_scale = use_logit_scale
        self.name = name
        self.report_scale = report_scale
        self.open_clip = is_open_clip(model)
        self.freeze()

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.logit_scale.dtype

    def enable_gradient_checkpointing(self) -> "CLIPAlignmentReward":
        """Recompute the vision tower's blocks during backward (the text tower never needs a gradient)."""
        if self.open_clip:
            self.model.visual.set_grad_checkpointing(True)
        else:
            checkpoint_blocks(self.model.vision_model.encoder.layers)
        return self

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (differentiable)."""
        pixels = self.preprocess(images.to(self.device)).to(self.dtype)
        if self.open_clip:
            feats = self.model.encode_image(pixels)
        else:
            feats = clip_features(self.model.get_image_features(pixel_values=pixels))
        return F.normalize(feats.float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings (the text side never needs a gradient)."""
        if self.tokenizer is None:
            raise RuntimeError(f"{self.name}: built without a tokenizer, so it cannot embed text")
        if self.open_clip:
            feats = self.model.encode_text(self.tokenizer(list(prompts)).to(self.device))
        else:
            tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").to(self.device)
            feats = clip_features(self.model.get_text_features(input_ids=tok.input_ids,
                                                               attention_mask=tok.attention_mask))
        return F.normalize(feats.float(), dim=-1)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        cos = (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)
        if self.use_logit_scale:
            cos = cos * self.model.logit_scale.exp().float()
        return cos


# ----- builders of the published CLIP-family rewards (paths already resolved; see registry) ----------------------
def hps_preprocess(size: int = 224) -> Preprocess:
    """HPS v2's evaluation transform: longer side to 224 (bicubic), zero padding, OpenAI CLIP normalisation."""
    return Preprocess(size=size, interpolation="bicubic", resize_mode="longest", fill=0.0)


def build_hps(checkpoint: str | os.PathLike, name: str = "hps_v2", arch: str = "ViT-H-14",
              dtype: torch.dtype = torch.float32) -> CLIPAlignmentReward:
    """HPS v2 / v2.1: open_clip ViT-H-14 with the HPS checkpoint; score = cosine (papers print it x100)."""
    model, tokenizer = load_open_clip(arch, checkpoint, what=name, dtype=dtype)
    return CLIPAlignmentReward(model, tokenizer, hps_preprocess(model.visual.image_size[0]), name=name,
                               report_scale=100.0)


def build_clip_folder_reward(folder: str | os.PathLike, processor: str | os.PathLike | None = None,
                             use_logit_scale: bool = False, name: str = "clip_score",
                             dtype: torch.dtype = torch.float32) -> CLIPAlignmentReward:
    """A transformers CLIP folder (PickScore_v1, openai/clip-vit-*) scored like its ``CLIPProcessor`` does.

    The image transform comes from ``preprocessor_config.json`` in ``processor`` (or the model folder); without
    one, the standard CLIP processor settings (shorter side 224, bicubic, centre crop, OpenAI mean/std) apply.
    """
    model, tokenizer = load_clip_folder(folder, dtype)
    proc_dir = Path(processor) if processor is not None else Path(folder)
    if (proc_dir / "preprocessor_config.json").is_file() or proc_dir.is_file():
        prep = Preprocess.from_processor_config(proc_dir)
    elif processor is not None:
        raise FileNotFoundError(f"{name}: no preprocessor_config.json in {proc_dir}")
    else:
        size = int(model.config.vision_config.image_size)
        log.info("%s: %s has no preprocessor_config.json; using the standard CLIP processor at %d px", name, folder, size)
        prep = Preprocess(size=size, crop_offset="floor")
    return CLIPAlignmentReward(model, tokenizer, prep, use_logit_scale=use_logit_scale, name=name,
                               report_scale=1.0 if use_logit_scale else 100.0)


def build_open_clip_reward(checkpoint: str | os.PathLike, arch: str, use_logit_scale: bool = False,
                           name: str = "clip_score", dtype: torch.dtype = torch.float32) -> CLIPAlignmentReward:
    """An open_clip checkpoint scored with open_clip's own evaluation transform."""
    model, tokenizer = load_open_clip(arch, checkpoint, what=name, dtype=dtype)
    return CLIPAlignmentReward(model, tokenizer, Preprocess.from_open_clip(model), use_logit_scale=use_logit_scale,
                               name=name, report_scale=1.0 if use_logit_scale else 100.0)
