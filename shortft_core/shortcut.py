"""Published few-step "shortcut" LoRAs (Hyper-SD, PCM, TCD) as frozen peft adapters, with their schedules.

A shortcut is only trustworthy inside the range it was distilled for: Hyper-SD's N-step LoRAs were trained on
the trailing N-step grid (4 steps: 999 -> 749 -> 499 -> 249 -> end) with trajectory-segmented consistency, so
one call may jump anywhere *inside* one segment, not across segments; TCD and the unified 1-step Hyper-SD LoRAs
were trained for any jump; PCM's N-phase LoRAs are segmented like Hyper-SD. The presets below carry those
facts (grid, segments, guidance the LoRA was trained with, sampler and eta) as data, so the chain planner can
check that every shortcut jump stays inside a trained segment. Values come from the model cards of
ByteDance/Hyper-SD, wangfuyun/PCM_Weights and h1t/TCD-SD15-LoRA / h1t/TCD-SDXL-LoRA.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from .lora_io import LoadedLora, LoraFormatError, load_lora_adapter, lora_base_family, lora_file
from .adapters import SHORTCUT_ADAPTER, remove_adapters
from .schedule import trailing_grid
from .lifecycle import outside_inference_mode
from .segments import Segments

log = logging.getLogger(__name__)

def tcd_grid(num_steps: int, original_steps: int = 50, num_train_timesteps: int = 1000) -> list[int]:
    """TCDScheduler's timesteps (strength 1): ``num_steps`` picks from the LCM-style 50-step skipping grid."""
    if not 1 <= num_steps <= original_steps:
        raise ValueError(f"num_steps must be in 1..{original_steps}, got {num_steps}")
    c = num_train_timesteps // original_steps
    origin = [(i + 1) * c - 1 for i in range(original_steps)][::-1]
    return [origin[int(i * original_steps / num_steps)] for i in range(num_steps)]


@dataclass(frozen=True)
class ShortcutPreset:
    """How a published shortcut LoRA is meant to be sampled, and where its jumps are valid."""

    name: str  # e.g. "hyper-sd15-4step"
    method: str  # "hyper-sd" | "pcm" | "tcd"
    base: str  # "sd15" | "sdxl"
    steps: int  # the step count it was distilled / recommended for
    timesteps: tuple[int, ...]  # that grid, from noisy to clean
    segmented: bool  # True: one call may only jump inside one segment of ``timesteps``
    guidance: float  # classifier-free guidance it was trained for (1.0 = no CFG)
    guidance_range: tuple[float, float]  # what the model card allows
    sampler: str  # "ddim" (eta = 0, trailing) | "tcd" (gamma = eta)
    eta: float
    lora_scale: float = 1.0  # strength the model card uses
    filenames: tuple[str, ...] = ()  # published file names (case-insensitive regex)
    source: str = ""

    @property
    def segment_map(self) -> Segments:
        """The trained segments of ``timesteps`` (one segment over the whole axis when not segmented)."""
        return Segments.from_edges(self.timesteps) if self.segmented else Segments.whole()

    def segments(self) -> list[tuple[int, int]]:
        """``(upper, lower)`` timestep pairs of the trained segments; ``lower = FINAL (-1)`` is the clean end."""
        return self.segment_map.edge_pairs()

    def covers(self, t_from: int, t_to: int) -> bool:
        """True when one shortcut call from ``t_from`` to ``t_to`` (``FINAL`` = the end) stays in one segment."""
        return self.segment_map.covers(t_from, t_to)

    def check_jump(self, t_from: int, t_to: int) -> None:
        """Raise when a planned shortcut jump leaves the range the LoRA was trained for."""
        if not self.covers(t_from, t_to):
            raise ValueError(f"shortcut jump {t_from} -> {t_to} leaves the trained segments of {self.name} "
                             f"{self.segments()}; plan jumps inside one segment")


def _hyper(base: str, steps: int, cfg: bool = False) -> ShortcutPreset:
    tag = "SD15" if base == "sd15" else "SDXL"
    unified = steps == 1
    return ShortcutPreset(
        name=f"hyper-{base}-{steps}step" + ("-cfg" if cfg else ""), method="hyper-sd", base=base, steps=steps,
        timesteps=tuple(tcd_grid(1) if unified else trailing_grid(steps)), segmented=not unified,
        guidance=5.0 if cfg else 1.0, guidance_range=(5.0, 8.0) if cfg else (1.0, 1.0),
        sampler="tcd" if unified else "ddim", eta=1.0 if unified else 0.0,
        filenames=(rf"hyper-{tag}-{steps}steps?" + (r"-cfg" if cfg else r"(?!-cfg)") + r"-lora",),
        source="https://huggingface.co/ByteDance/Hyper-SD",
    )


def _pcm(base: str, steps: int, cfg: str) -> ShortcutPreset:
    return ShortcutPreset(
        name=f"pcm-{base}-{cfg}cfg-{steps}step", method="pcm", base=base, steps=steps,
        timesteps=tuple(trailing_grid(steps)), segmented=True,
        guidance=1.0 if cfg == "small" else 5.0, guidance_range=(1.0, 2.0) if cfg == "small" else (5.0, 8.0),
        sampler="ddim", eta=0.0, filenames=(rf"pcm_{base}_{cfg}cfg_{steps}step",),
        source="https://huggingface.co/wangfuyun/PCM_Weights",
    )


def _tcd(base: str) -> ShortcutPreset:
    return ShortcutPreset(
        name=f"tcd-{base}", method="tcd", base=base, steps=4, timesteps=tuple(tcd_grid(4)), segmented=False,
        guidance=1.0, guidance_range=(1.0, 1.0), sampler="tcd", eta=0.3,
        filenames=(rf"tcd[-_]{'sd15' if base == 'sd15' else 'sdxl'}",),
        source=f"https://huggingface.co/h1t/TCD-{'SD15' if base == 'sd15' else 'SDXL'}-LoRA",
    )


PRESETS: dict[str, ShortcutPreset] = {p.name: p for p in [
    *(_hyper(b, n) for b in ("sd15", "sdxl") for n in (1, 2, 4, 8)),
    *(_hyper(b, n, cfg=True) for b in ("sd15", "sdxl") for n in (8, 12)),
    *(_pcm(b, n, "small") for b in ("sd15", "sdxl") for n in (1, 2, 4, 8, 16)),
    *(_pcm(b, n, "normal") for b in ("sd15", "sdxl") for n in (8, 16)),
    _tcd("sd15"), _tcd("sdxl"),
]}
#: The paper's shortcut (Hyper-SD 4-step on SD1.5).
DEFAULT_PRESET = "hyper-sd15-4step"


def get_preset(name: str) -> ShortcutPreset:
    """A preset by name; the error (a ValueError, so the command line prints it) lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown shortcut preset {name!r} (--shortcut-preset); known: "
                         f"{', '.join(sorted(PRESETS))}") from None


def preset_for_file(path: str | os.PathLike) -> ShortcutPreset | None:
    """The preset whose published file name matches ``path`` (None if the name says nothing)."""
    stem = Path(path).name.lower()
    hits = [p for p in PRESETS.values() if any(re.search(f.lower(), stem) for f in p.filenames)]
    return hits[0] if len(hits) == 1 else None


def preset_from_metadata(loaded: LoadedLora) -> ShortcutPreset | None:
    """The preset a shortcut distilled by ShortFT describes in its own metadata (None for other files)."""
    info = loaded.shortft
    if not info or info.get("kind") != "shortcut":
        return None
    edges = tuple(int(e) for e in info["edges"])
    g = tuple(float(x) for x in info.get("teacher_guidance", (1.0, 1.0)))
    sg = float(info.get("guidance", 1.0))
    return ShortcutPreset(name=f"distilled-{len(edges)}step", method="shortft-distill",
                          base=loaded.family or "custom", steps=len(edges), timesteps=edges, segmented=True,
                          guidance=sg, guidance_range=(sg, sg), sampler="ddim", eta=0.0,
                          source=f"distilled by ShortFT (teacher CFG {g[0]:g}..{g[1]:g})")


def find_preset(path: str | os.PathLike | Mapping[str, torch.Tensor], preset: str | ShortcutPreset | None = None
                ) -> ShortcutPreset | None:
    """The preset given (or named), else the one the shortcut file's published name matches (None when it says
    nothing, e.g. our own distilled shortcuts, whose metadata tells once the file is loaded)."""
    if isinstance(preset, str):
        preset = get_preset(preset)
    if preset is None and not isinstance(path, Mapping):
        preset = preset_for_file(path)
        if preset is not None:
            log.info("shortcut %s: using preset %s (from the file name)", path, preset.name)
    return preset


def _preset_before_loading(path: str | os.PathLike | Mapping[str, torch.Tensor], preset: str | ShortcutPreset | None,
                           family: str | None) -> ShortcutPreset | None:
    """The preset given, else the one the file name matches; refused when it is for another base family."""
    preset = find_preset(path, preset)
    if preset is not None and family is not None and family in ("sd15", "sdxl") and preset.base != family:
        raise LoraFormatError(f"shortcut preset {preset.name} is for {preset.base} but the model is {family}")
    return preset


def _preset_after_loading(loaded: LoadedLora, preset: ShortcutPreset | None) -> ShortcutPreset | None:
    """The preset of a loaded shortcut: the one found before (checked against the LoRA's own family), else the one
    its metadata describes (our distilled shortcuts); None, with a warning, when nothing tells."""
    lora_family = lora_base_family(loaded.modules)
    if preset is not None and lora_family in ("sd15", "sdxl") and lora_family != preset.base:
        raise LoraFormatError(f"{loaded.source} is a {lora_family} LoRA but preset {preset.name} is for {preset.base}")
    if preset is None:
        preset = preset_from_metadata(loaded)
    if preset is None:
        log.warning("shortcut %s: no preset given or recognised; pass preset= (one of %s) so jumps can be checked",
                    loaded.source, ", ".join(sorted(PRESETS)))
    return preset


@outside_inference_mode
def load_shortcut(unet: torch.nn.Module, path: str | os.PathLike | Mapping[str, torch.Tensor],
                  preset: str | ShortcutPreset | None = None, adapter_name: str = SHORTCUT_ADAPTER,
                  family: str | None = None, activate: bool = False) -> tuple[LoadedLora, ShortcutPreset | None]:
    """Load a published shortcut LoRA into a diffusers ``unet`` as a frozen adapter; returns it with its preset.

    ``preset`` defaults to the one the file name matches; ``family`` (sd15 / sdxl) is the base model's, checked
    against the preset and the LoRA's shapes before anything is injected. Every key must be used.
    """
    if not isinstance(path, Mapping):
        path = lora_file(path, "shortcut")  # missing or damaged: refused from the header, before anything loads
    preset = _preset_before_loading(path, preset, family)
    loaded = load_lora_adapter(unet, path, adapter_name, trainable=False, activate=activate)
    try:
        return loaded, _preset_after_loading(loaded, preset)
    except LoraFormatError:
        remove_adapters(unet, [adapter_name])
        raise


@outside_inference_mode
def attach_shortcut(model, path: str | os.PathLike, preset: str | ShortcutPreset | None = None
                    ) -> ShortcutPreset | None:
    """Load a shortcut file onto a :class:`~shortft_core.models.DiffusionModel` as a frozen, inactive adapter (the
    model's own LoRA loader reads it) and record where it came from in ``model.info`` (``shortcut``: file, preset
    and CFG scale; ``shortcut_preset``: the preset), so a training session on this model knows which shortcut it
    trains through. Returns the preset (None when none is known)."""
    path = lora_file(path, "shortcut")
    preset = _preset_before_loading(path, preset, model.family)
    loaded = model.load_lora(path, SHORTCUT_ADAPTER, trainable=False, activate=False)
    try:
        found = _preset_after_loading(loaded, preset)
    except LoraFormatError:
        remove_adapters(model.unet, [SHORTCUT_ADAPTER])
        raise
    model.info["shortcut"] = {"file": str(Path(path).expanduser()), "preset": found.name if found else None,
                              "guidance": found.guidance if found else None}
    model.info["shortcut_preset"] = found
    return found
