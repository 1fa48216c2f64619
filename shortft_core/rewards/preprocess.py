"""Image preprocessing for reward models, in torch so that gradients reach the pixels.

Each reward model was trained behind a PIL pipeline; a differentiable reward must compute the same function or
it optimises something else. The reference pipelines are:

- OpenAI CLIP, open_clip, ImageReward (torchvision on PIL): ``Resize(size, BICUBIC)`` of the shorter side, the
  longer side ``int(size * long / short)``, then ``CenterCrop(size)`` with offsets ``int(round(d / 2))``;
- transformers ``CLIPImageProcessor`` (PickScore): the same resize, centre-crop offsets ``d // 2``;
- HPS v2 (its open_clip fork, ``ResizeMaxSize``): the *longer* side to ``size`` (``round``), zero padding split
  ``d // 2`` before / rest after, so nothing is cropped.

PIL's bicubic filter is Keys' cubic with a = -0.5, widened by the scale when shrinking (antialiasing); torch's
``interpolate(mode="bicubic", antialias=True)`` implements the same kernel (also when enlarging, where its
non-antialiased path would use a = -0.75). PIL then rounds to uint8 and clips to [0, 255]; we clip to [0, 1]
but cannot round (no gradient), which is the residual the parity tests bound.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

RESIZE_MODES = ("shortest", "longest", "squash")
# PIL resample codes used in processor configs
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic", 1: "lanczos", 4: "box", 5: "hamming"}


@dataclass(frozen=True)
class Preprocess:
    """Resize (antialiased), crop or pad to ``size`` x ``size``, normalise with ``mean``/``std``.

    ``resize_mode``: ``shortest`` (shorter side to ``size`` then centre crop ``crop_size``), ``longest`` (longer
    side to ``size`` then pad with ``fill``), ``squash`` (straight to ``size`` x ``size``). ``crop=False`` is
    the older spelling of ``squash``. ``crop_offset``: ``round`` (torchvision) or ``floor`` (transformers).
    """

    size: int = 224
    interpolation: str = "bicubic"
    crop: bool = True
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resize_mode: str = "shortest"
    crop_size: int | None = None
    crop_offset: str = "round"
    fill: float = 0.0
    clamp: bool = True

    def __post_init__(self) -> None:
        if not self.crop:
            object.__setattr__(self, "resize_mode", "squash")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"Preprocess: resize_mode {self.resize_mode!r} is not one of {RESIZE_MODES}")
        if self.crop_offset not in ("round", "floor"):
            raise ValueError(f"Preprocess: crop_offset must be 'round' or 'floor', got {self.crop_offset!r}")
        if self.interpolation not in ("bicubic", "bilinear", "nearest", "area"):
            raise ValueError(f"Preprocess: interpolation {self.interpolation!r} has no torch equivalent here; "
                             "use bicubic, bilinear, nearest or area")

    @property
    def output_size(self) -> int:
        return self.crop_size if (self.resize_mode == "shortest" and self.crop_size) else self.size

    def _resize(self, x: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
        if (nh, nw) == tuple(x.shape[-2:]):
            return x
        if self.interpolation in ("nearest", "area"):
            return F.interpolate(x, size=(nh, nw), mode=self.interpolation)
        return F.interpolate(x, size=(nh, nw), mode=self.interpolation, antialias=True, align_corners=False)

    def _offset(self, d: int) -> int:
        return int(round(d / 2.0)) if self.crop_offset == "round" else d // 2

    def geometry(self, images: torch.Tensor) -> torch.Tensor:
        """Resize and crop/pad only (pixels stay in [0, 1]): the part of the pipeline PIL does."""
        x = images.float()
        h, w = x.shape[-2:]
        if self.resize_mode == "squash":
            x = self._resize(x, self.size, self.size)
        elif self.resize_mode == "shortest":
            if h <= w:
                nh, nw = self.size, int(self.size * w / h)
            else:
                nh, nw = int(self.size * h / w), self.size
            x = self._resize(x, nh, nw)
            c = self.output_size
            if (nh, nw) != (c, c):
                if nh < c or nw < c:
                    raise ValueError(f"Preprocess: crop {c} is larger than the resized image {nh}x{nw}")
                top, left = self._offset(nh - c), self._offset(nw - c)
                x = x[..., top : top + c, left : left + c]
        else:  # longest: HPS v2's ResizeMaxSize
            scale = self.size / max(h, w)
            nh, nw = (round(h * scale), round(w * scale)) if scale != 1.0 else (h, w)
            x = self._resize(x, nh, nw)
            ph, pw = self.size - nh, self.size - nw
            if ph or pw:
                x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=self.fill)
        if self.clamp and self.interpolation == "bicubic":
            x = x.clamp(0.0, 1.0)  # PIL clips the cubic's overshoot to [0, 255]
        return x

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = self.geometry(images)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    @classmethod
    def from_open_clip(cls, model) -> "Preprocess":
        """The evaluation transform open_clip would build for ``model`` (``image_transform_v2``)."""
        from open_clip import get_model_preprocess_cfg

        cfg = get_model_preprocess_cfg(model)
        size = cfg.get("size", 224)
        if isinstance(size, (tuple, list)):
            if size[0] != size[1]:
                raise ValueError(f"open_clip model with non-square input {size} is not supported")
            size = size[0]
        mode = cfg.get("resize_mode", "shortest")
        if mode not in RESIZE_MODES:
            raise ValueError(f"open_clip resize_mode {mode!r} is not supported")
        return cls(size=int(size), interpolation=cfg.get("interpolation", "bicubic"), resize_mode=mode,
                   mean=tuple(cfg.get("mean", CLIP_MEAN)), std=tuple(cfg.get("std", CLIP_STD)),
                   fill=float(cfg.get("fill_color", 0)) / 255.0)

    @classmethod
    def from_processor_config(cls, config: Mapping[str, Any] | str | os.PathLike) -> "Preprocess":
        """The transform a transformers ``CLIPImageProcessor`` config describes (dict, json file or folder)."""
        if not isinstance(config, Mapping):
            path = Path(config)
            if path.is_dir():
                path = path / "preprocessor_config.json"
            if not path.is_file():
                raise FileNotFoundError(f"no image-processor config at {path}: pass the folder holding "
                                        "preprocessor_config.json")
            config = json.loads(path.read_text(encoding="utf-8"))
            config = config.get("image_processor", config)  # processor_config.json nests it
        size = config.get("size", {"shortest_edge": 224})
        crop = config.get("crop_size", size)
        do_crop = config.get("do_center_crop", True)
        if isinstance(crop, Mapping):
            crop = crop.get("height", crop.get("shortest_edge"))
        if isinstance(size, Mapping) and "shortest_edge" in size:
            size, mode = int(size["shortest_edge"]), "shortest"
        elif isinstance(size, Mapping):
            if size.get("height") != size.get("width"):
                raise ValueError(f"image-processor size {size} is not square; not supported")
            size, mode = int(size["height"]), "squash"
        else:
            size, mode = int(size), "shortest"
        if not config.get("do_resize", True) or not config.get("do_rescale", True) \
                or not config.get("do_normalize", True):
            raise ValueError("image-processor configs without resize/rescale/normalize are not supported")
        if mode == "shortest" and not do_crop:
            raise ValueError("image-processor config resizes the shorter side without a centre crop; not supported")
        resample = config.get("resample", 3)
        interpolation = _PIL_RESAMPLE.get(resample, resample) if isinstance(resample, int) else str(resample)
        return cls(size=size, interpolation=interpolation, resize_mode=mode,
                   crop_size=int(crop) if mode == "shortest" else None, crop_offset="floor",
                   mean=tuple(config.get("image_mean", CLIP_MEAN)), std=tuple(config.get("image_std", CLIP_STD)))
