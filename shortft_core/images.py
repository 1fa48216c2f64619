"""Image files: PNGs written atomically, and captioned grids for before/after comparisons."""

from __future__ import annotations

import io
import os
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .files import atomic_write_bytes


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] -> RGB PIL image."""
    arr = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def save_png(image: Image.Image | torch.Tensor, path: str | os.PathLike) -> Path:
    """Write a PNG atomically; returns the path."""
    pil = to_pil(image) if isinstance(image, torch.Tensor) else image
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has a fixed-size bitmap font only
        return ImageFont.load_default()


def captioned_grid(images: Sequence[torch.Tensor] | torch.Tensor, captions: Sequence[str], columns: int = 4,
                   cell: int = 128, font_size: int = 11, row_labels: Sequence[str] | None = None) -> Image.Image:
    """Tile images (each upscaled to ``cell`` px, nearest for small images) with a wrapped caption under each.

    ``row_labels`` (e.g. "before" / "after") are written in a left margin, one per row. Fewer images than
    ``columns`` take only the columns they fill (one image is one cell wide, not a row of blank cells).
    """
    n = len(images)
    if n == 0:
        raise ValueError("captioned_grid needs at least one image")
    if len(captions) != n:
        raise ValueError(f"{n} images but {len(captions)} captions")
    columns = max(1, min(columns, n))
    font = _font(font_size)
    chars = max(8, int(cell / (font_size * 0.55)))
    wrapped = [textwrap.wrap(c, chars)[:4] for c in captions]
    text_h = (max(len(w) for w in wrapped) or 1) * (font_size + 2) + 6
    rows = (n + columns - 1) // columns
    margin = 0 if not row_labels else max(len(label) for label in row_labels) * int(font_size * 0.65) + 10
    grid = Image.new("RGB", (margin + columns * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, lines) in enumerate(zip(images, wrapped)):
        pil = to_pil(img) if isinstance(img, torch.Tensor) else img
        resample = Image.NEAREST if pil.width * 2 <= cell else Image.LANCZOS
        r, c = divmod(i, columns)
        x, y = margin + c * cell, r * (cell + text_h)
        grid.paste(pil.resize((cell, cell), resample), (x, y))
        for j, line in enumerate(lines):
            draw.text((x + 3, y + cell + 3 + j * (font_size + 2)), line, fill="black", font=font)
    for r, label in enumerate(row_labels or []):
        draw.text((4, r * (cell + text_h) + cell // 2), label, fill="black", font=font)
    return grid
