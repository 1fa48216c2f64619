"""The tiny world: a procedural text-to-image domain with a trained SD-shaped pipeline and rewards.

It exercises exactly SD1.5's code path (CLIP BPE tokenizer -> CLIPTextModel -> UNet2DConditionModel with SD1.5's
noise schedule -> AutoencoderKL -> reward) at toy size, so the whole product runs and is tested on a CPU with no
download. See ``scenes`` (the generator), ``build`` (how the weights were trained) and ``quality`` (how good
they are).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .scenes import IMAGE_SIZE, held_out_prompts, is_held_out, train_prompts

# Classifier-free guidance used for the tiny world unless told otherwise (chosen in BENCHMARKS.md).
DEFAULT_GUIDANCE = 3.0

__all__ = ["DEFAULT_GUIDANCE", "IMAGE_SIZE", "held_out_prompts", "is_held_out", "train_prompts", "load_tiny_rewards", "tiny_shortcut_path", "tiny_world_dir", "weights_dir"]


def tiny_world_dir() -> Path:
    """Folder of the tiny-world weights: ``$SHORTFT_TINY_WEIGHTS`` if set (a world you built), else the shipped one."""
    env = os.environ.get("SHORTFT_TINY_WEIGHTS")
    return Path(env) if env else Path(__file__).resolve().parent / "weights"


def weights_dir(root: str | os.PathLike | None = None) -> Path:
    """The tiny-world weights folder: ``root`` if given, else the shipped one."""
    path = Path(root) if root is not None else tiny_world_dir()
    if not (path / "pipeline" / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no tiny-world weights in {path} (pipeline/model_index.json missing); they ship with the package, "
            "or rebuild them with `python -m shortft_core.tiny_world.build --out DIR`"
        )
    return path


def load_tiny_rewards(device: str | torch.device = "cpu", root: str | os.PathLike | None = None):
    """``(alignment, aesthetic)`` rewards of the tiny world, both ``reward(images, prompts) -> (B,)``.

    alignment: cosine between the tiny CLIP's image and caption embeddings (stand-in for HPS / PickScore);
    aesthetic: render cleanliness 0..10 from an MLP on the same image embedding (stand-in for LAION aesthetic).
    """
    from ..rewards.aesthetic import AestheticReward, load_aesthetic_head
    from ..rewards.clip import CLIPAlignmentReward
    from ..rewards.preprocess import Preprocess
    from ..tokenizer import load_clip_tokenizer

    from transformers import CLIPModel

    from ..compat import transformers_dtype

    root = weights_dir(root)
    clip = CLIPModel.from_pretrained(str(root / "reward"), **transformers_dtype(torch.float32), local_files_only=True,
                                     use_safetensors=True)
    tokenizer = load_clip_tokenizer(root / "pipeline" / "tokenizer")
    prep = Preprocess(size=IMAGE_SIZE, interpolation="bilinear", crop=False)
    alignment = CLIPAlignmentReward(clip, tokenizer, prep, name="tiny_alignment").to(device)
    head = load_aesthetic_head(root / "aesthetic_head.safetensors")
    aesthetic = AestheticReward(alignment, head, name="tiny_aesthetic").to(device)
    return alignment, aesthetic


def tiny_shortcut_path(root: str | os.PathLike | None = None) -> Path:
    """The tiny world's distilled 4-segment shortcut LoRA (kohya layout)."""
    path = weights_dir(root) / "shortcut.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"the tiny shortcut {path} is missing; distill it with "
                                "`python -m shortft_core distill --model tiny --out DIR` and copy DIR/shortcut.safetensors there")
    return path
