"""Timestep-aware LoRA sets as files: one standard LoRA per segment, a merged LoRA, and a manifest.

A set is a *folder*, not one file with custom keys, so that every file in it loads in stock
tools:

* ``segment_<j>.safetensors`` - the exact network of segment j as ONE ordinary LoRA: the stacked adapters
  align_1 .. align_j concatenated along the rank axis (their scales folded into ``up``, ``alpha`` = total rank).
  ComfyUI's stock LoraLoader, diffusers and A1111 load each of them; ComfyUI hook keyframes (or our apply node)
  switch between them at the segment boundaries, which reproduces the core sampler exactly.
* ``merged.safetensors`` - one LoRA for tools that cannot switch per timestep: the time-weighted average of the
  segment networks, sum_j w_j * dW_j with w_j = the share of the 50 sampling steps spent in segment j. It is
  also exact as a LoRA (adapter i appears with weight sum_{j >= i} w_j). The cost of not switching is measured
  in BENCHMARKS.md.
* ``set.json`` - segment -> timestep ranges, files, base family, rank, the training config and plan. The same
  information is in every file's ``shortft`` metadata field, so a single file is self-describing.

A segment the set leaves to the base (``last_segment='base'``) has no file: its ``segment_files`` entry is null,
and a sampler runs the bare base model there.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .adapters import LoraSetSpec
from .segments import Segments
from .files import atomic_write_json, check_safetensors, refuse_overwrite
from .lifecycle import outside_inference_mode
from .schedule import leading_grid

log = logging.getLogger(__name__)

SET_MANIFEST = "set.json"


def stack_modules(parts: Sequence[tuple[Mapping[str, Any], float]]):
    """Sum of weighted LoRAs as one LoRA: ranks concatenated, each part's scale x weight folded into ``up``."""
    from .lora_io import LoraModule

    names = sorted(set().union(*[set(p.keys()) for p, _ in parts]))
    out = {}
    for name in names:
        downs, ups = [], []
        for modules, weight in parts:
            m = modules.get(name)
            if m is None or weight == 0:
                continue
            downs.append(m.down.float())
            ups.append(m.up.float() * (m.scale * weight))
        if not downs:
            continue
        down, up = torch.cat(downs, 0), torch.cat(ups, 1)
        out[name] = LoraModule(down, up, float(down.shape[0]))  # alpha = rank: scale 1
    return out


def segment_weights(segments: Segments, steps: int = 50) -> list[float]:
    """Share of the sampling steps (SD1.5 leading grid) that fall in each segment."""
    grid = leading_grid(steps, segments.num_train_timesteps)
    counts = [0] * segments.k
    for t in grid:
        counts[segments.segment_of(t) - 1] += 1
    return [c / len(grid) for c in counts]


def export_lora_set(unet: torch.nn.Module, spec: LoraSetSpec, folder: str | os.PathLike, family: str | None = None,
                    metadata: Mapping[str, Any] | None = None, overwrite: bool = False,
                    dtype: torch.dtype = torch.float16, names: Mapping[str, str] | None = None) -> list[Path]:
    """Write ``segment_<j>.safetensors``, ``merged.safetensors`` and ``set.json`` for the alignment set on ``unet``;
    ``names`` maps the network's module paths to the diffusers names the files use (a model's ``lora_names``)."""
    from .lora_io import adapter_modules, write_lora_modules

    folder = Path(folder)
    files = [folder / f"segment_{j}.safetensors" for j in range(1, spec.segments.k + 1)]
    files += [folder / "merged.safetensors", folder / SET_MANIFEST]
    for f in files:
        refuse_overwrite(f, overwrite, "LoRA set file")
    segs = range(1, spec.segments.k + 1)
    tuned = [j for j in segs if spec.active_in_segment(j)]
    per_adapter = {n: renamed_modules(adapter_modules(unet, n), names) for n in spec.names}
    ranges = [list(spec.segments.range_of(j)) for j in segs]
    weights = segment_weights(spec.segments)
    info = {"kind": "timestep_aware_set" if spec.timestep_aware else "single", "segments": ranges,
            "segment_files": [files[j - 1].name if j in tuned else None for j in segs],
            "merged_file": "merged.safetensors", "merged_weights": weights, "lora": spec.to_dict(),
            **(dict(metadata) if metadata else {})}
    written = []
    for j in segs:
        if j not in tuned:  # left to the base: no file (one from a set written here before is removed)
            files[j - 1].unlink(missing_ok=True)
            continue
        mods = stack_modules([(per_adapter[n], 1.0) for n in spec.active_in_segment(j)])
        written.append(write_lora_modules(mods, files[j - 1], family=family, overwrite=overwrite, dtype=dtype,
                                          metadata={**info, "segment": j, "timesteps": ranges[j - 1]},
                                          adapter_name=f"segment_{j}"))
    merged_parts = []
    for i, n in enumerate(spec.names, start=1):
        w = sum(weights[j - 1] for j in range(1, spec.segments.k + 1) if n in spec.active_in_segment(j))
        merged_parts.append((per_adapter[n], w))
    written.append(write_lora_modules(stack_modules(merged_parts), files[-2], family=family, overwrite=overwrite,
                                      dtype=dtype, metadata={**info, "segment": None}, adapter_name="merged"))
    atomic_write_json(files[-1], {**info, "family": family})
    written.append(files[-1])
    log.info("wrote LoRA set (%d segments) to %s", spec.segments.k, folder)
    return written


def renamed_modules(modules: Mapping[str, Any], names: Mapping[str, str] | None) -> dict[str, Any]:
    """LoRA modules keyed by the diffusers names of their module paths (``names``: path -> name; None: the same);
    a path without a name is an error naming it."""
    if names is None:
        return dict(modules)
    missing = sorted(m for m in modules if m not in names)
    if missing:
        raise ValueError(f"{len(missing)} adapted modules have no diffusers name to write them under (e.g. "
                         f"{missing[:3]}); the model's lora_names must cover every module a LoRA adapts")
    return {names[m]: v for m, v in modules.items()}


def read_set_manifest(folder: str | os.PathLike) -> dict:
    """A LoRA set folder's ``set.json``; a missing or unreadable one raises an error naming it."""
    path = Path(folder).expanduser() / SET_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a ShortFT LoRA set folder (expected set.json + segment files)")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); it is damaged: copy the whole set folder again") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path} is not a LoRA set manifest (a JSON object); copy the whole set folder again")
    return info


def set_files(folder: str | os.PathLike, info: Mapping[str, Any] | None = None) -> list[Path]:
    """Every LoRA file a set folder's manifest lists (segment files, then the merged file), each checked to exist
    and to be a whole safetensors file from its header alone, so a damaged segment is reported before any model
    or adapter is loaded. ``info`` is the manifest when already read."""
    folder = Path(folder).expanduser()
    info = read_set_manifest(folder) if info is None else info
    names = [n for n in info.get("segment_files", ()) if n is not None]  # null: a segment left to the base
    names += [info["merged_file"]] if info.get("merged_file") else []
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"LoRA set {folder} lists {', '.join(missing)} in {SET_MANIFEST} but the folder lacks "
                                "them; copy the whole set folder")
    for name in names:
        check_safetensors(folder / name, "LoRA set file")
    return [folder / n for n in names]


def trained_guidance(path: str | os.PathLike) -> float | None:
    """The CFG scale a ShortFT LoRA set folder or LoRA file was trained (or distilled) for, from its manifest or
    metadata; None for files from other tools. Sampling defaults to it: a set tuned unguided is meant for CFG 1."""
    path = Path(path).expanduser()
    if path.is_dir():
        value = read_set_manifest(path).get("guidance")
    elif path.suffix == ".safetensors" and path.is_file():
        from .lora_io import lora_metadata

        info = lora_metadata(path).get("shortft")  # the header only; the tensors are read when loading
        value = json.loads(info).get("guidance") if info else None
    else:
        value = None
    return float(value) if value is not None else None


def convert_lora_set(src: str | os.PathLike, dst: str | os.PathLike, unet: torch.nn.Module, layout: str = "kohya",
                     overwrite: bool = False, dtype: torch.dtype | None = None) -> list[Path]:
    """Re-write every file of a LoRA set folder (segments and merged) in ``layout`` into ``dst`` with its manifest,
    so a set trained here loads as a set in diffusers-layout tools too; nothing is written unless all files can be."""
    from .lora_io import convert_lora_file

    src, dst = Path(src), Path(dst)
    info = read_set_manifest(src)
    if dst.resolve() == src.resolve():
        raise ValueError(f"--out {dst} is the set's own folder; choose another folder for the converted set")
    names = [f.name for f in set_files(src, info)]
    for name in names + [SET_MANIFEST]:
        refuse_overwrite(dst / name, overwrite, "LoRA set file")
    written = [convert_lora_file(src / n, dst / n, unet, layout=layout, overwrite=overwrite, dtype=dtype)
               for n in names]
    atomic_write_json(dst / SET_MANIFEST, {**info, "layout": layout})
    written.append(dst / SET_MANIFEST)
    log.info("wrote LoRA set (%d files, %s layout) to %s", len(names), layout, dst)
    return written


@dataclass(frozen=True)
class SegmentEntry:
    """One segment of a LoRA set: its timesteps and its file."""

    segment: int
    timesteps: tuple[int, int]  # inclusive (low, high)
    file: Path | None  # None: the set leaves this segment to the base model


def schedule_of(folder: Path, info: Mapping[str, Any]) -> list[SegmentEntry]:
    """The schedule of the set in ``folder`` from its manifest ``info`` alone (no tensor loaded): per segment its
    timestep range and its file."""
    segments = set_segments(info)
    files = list(info.get("segment_files", ()))
    if len(files) != segments.k:
        raise ValueError(f"{folder / SET_MANIFEST}: {len(files)} segment files for {segments.k} segments")
    return [SegmentEntry(j, segments.range_of(j), None if files[j - 1] is None else folder / files[j - 1])
            for j in range(1, segments.k + 1)]


@dataclass(frozen=True)
class LoraSet:
    """A saved LoRA set folder, opened from its manifest and checked file by file (no tensor loaded): what the
    ComfyUI nodes pass between each other and what samplers apply."""

    folder: Path
    info: dict

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "LoraSet":
        folder = Path(folder).expanduser()
        info = read_set_manifest(folder)
        lset = cls(folder, info)
        schedule_of(folder, info)  # the manifest's segments must tile the timestep axis
        set_files(folder, info)
        return lset

    @property
    def schedule(self) -> list[SegmentEntry]:
        return schedule_of(self.folder, self.info)

    @property
    def segments(self) -> Segments:
        return set_segments(self.info)

    @property
    def family(self) -> str | None:
        return self.info.get("family")

    @property
    def guidance(self) -> float | None:
        g = self.info.get("guidance")
        return None if g is None else float(g)

    @property
    def merged_file(self) -> Path | None:
        name = self.info.get("merged_file")
        return self.folder / name if name else None


def set_segments(info: Mapping[str, Any]) -> Segments:
    """The :class:`Segments` of a set manifest (``set.json``), checked: the ranges must tile 0..T-1."""
    ranges = [tuple(int(v) for v in r) for r in info.get("segments", ())]
    segments = Segments(tuple(r[0] for r in ranges))
    if [segments.range_of(j) for j in range(1, segments.k + 1)] != ranges:
        raise ValueError(f"set manifest segments {ranges} do not tile the timestep axis 0..{segments.top}")
    return segments


@outside_inference_mode
def load_lora_set(unet: torch.nn.Module, folder: str | os.PathLike,
                  prefix: str = "segment_") -> tuple[list[str | None], Segments]:
    """Load every segment file of a set as a frozen adapter (``segment_1`` ...); returns their names (None for a
    segment left to the base) and the segment map, so a sampler activates ``names[segment_of(t) - 1]`` at t."""
    from .lora_io import load_lora_adapter

    folder = Path(folder).expanduser()
    info = read_set_manifest(folder)
    segments = set_segments(info)
    set_files(folder, info)  # a damaged segment file fails here, before any adapter is added to the UNet
    names = []
    for j, fname in enumerate(info["segment_files"], start=1):
        if fname is None:
            names.append(None)
            continue
        name = f"{prefix}{j}"
        load_lora_adapter(unet, folder / fname, adapter_name=name, trainable=False)
        names.append(name)
    return names, segments


def set_inference_plan(names: Sequence[str | None], segments: Segments, guidance: float,
                       grid: Sequence[int] | None = None):
    """The 50-step (or ``grid``) DDIM chain that uses segment j's LoRA ``names[j-1]`` at every timestep of segment j
    (the bare base where it is None)."""
    from .plans import BASE, TUNED, ChainPlan, Step, _chain, _mark_last_readout

    if len(names) != segments.k:
        raise ValueError(f"{len(names)} segment adapters for {segments.k} segments")
    steps = []
    for t, s in _chain(grid or leading_grid(50, segments.num_train_timesteps)):
        j = segments.segment_of(t)
        name = names[j - 1]
        steps.append(Step(t, s, BASE, (), guidance, segment=j) if name is None
                     else Step(t, s, TUNED, (name,), guidance, segment=j))
    return ChainPlan("lora-set", tuple(_mark_last_readout(steps)))


def find_lora_sets(root: str | os.PathLike) -> list[str]:
    """The LoRA set folders (holding ``set.json``) below ``root``, as sorted '/'-separated paths relative to it: the
    sets a LoRA folder such as ComfyUI's ``models/loras`` holds. Links are followed (a link back up the tree is
    not), hidden folders skipped, and a set's own subfolders are not searched."""
    root = Path(root).expanduser()
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        rel = Path(dirpath).relative_to(root)
        above = [root.joinpath(*rel.parts[:i]) for i in range(len(rel.parts))]
        if os.path.realpath(dirpath) in {os.path.realpath(p) for p in above}:  # a link back up the tree
            dirnames[:] = []
            continue
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if SET_MANIFEST in filenames and rel.parts:
            found.append(rel.as_posix())
            dirnames[:] = []
    return sorted(found)


def lora_set_folder(roots: Sequence[str | os.PathLike], name: str) -> Path:
    """The folder of the set ``name`` (a path as :func:`find_lora_sets` lists it) in the first of ``roots`` holding
    it. A name that is absolute, climbs out with '..' or is in none of the roots raises an error naming the roots."""
    rel = Path(name)
    if not name or rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"LoRA set name {name!r} must be a folder path relative to a LoRA folder, without '..'")
    for root in roots:
        folder = Path(root).expanduser() / rel
        if (folder / SET_MANIFEST).is_file():
            return folder
    raise FileNotFoundError(f"no LoRA set {name!r} (a folder holding {SET_MANIFEST}) in "
                            f"{', '.join(str(r) for r in roots) or 'no LoRA folder'}; copy the whole set folder there")


def default_guidance(model, lora: str | os.PathLike | LoraSet | None = None) -> float:
    """The CFG scale to sample with when none is given: the one a ShortFT set or LoRA was trained for, else the
    tiny world's default (3) or 7.5 for a real model."""
    if lora is not None:
        trained = trained_guidance(lora.folder if isinstance(lora, LoraSet) else lora)
        if trained is not None:
            return trained
    from .tiny_world import DEFAULT_GUIDANCE

    return DEFAULT_GUIDANCE if model.family == "tiny" else 7.5


@outside_inference_mode
def sample_aligned(model, prompts: Sequence[str], *, lora_set: str | os.PathLike | LoraSet | None = None,
                   lora: str | os.PathLike | None = None, seed: int = 0, steps: int = 50, spacing: str = "leading",
                   guidance: float | None = None, negative_prompt: str = "", batch_size: int = 16,
                   callback=None) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] of ``model`` with a LoRA set (segment j's LoRA at segment j's timesteps) or one
    LoRA file at every step, or of the bare model; the adapters are removed again afterwards, so the model is left
    as it was. ``guidance`` defaults to :func:`default_guidance`."""
    from .adapters import AdapterSwitch, remove_adapters
    from .lora_io import load_lora_adapter
    from .plans import adapter_chain
    from .sampling import sample, timestep_grid

    if lora_set is not None and lora is not None:
        raise ValueError("give a LoRA set or one LoRA file, not both")
    source = lora_set if lora_set is not None else lora
    g = guidance if guidance is not None else default_guidance(model, source)
    plan, switch, names = None, None, []
    try:
        if source is not None:
            grid = timestep_grid(steps, spacing, model.schedule.num_train_timesteps)
            if lora_set is not None:
                folder = lora_set.folder if isinstance(lora_set, LoraSet) else lora_set
                names, segments = load_lora_set(model.unet, folder, prefix="sample_segment_")
                plan = set_inference_plan(names, segments, g, grid)
            else:
                load_lora_adapter(model.unet, lora, "sample_lora", trainable=False)
                names = ["sample_lora"]
                plan = adapter_chain(tuple(names), g, grid)
            switch = AdapterSwitch(model.unet)
        log.info("sampling %d prompts, %d steps, guidance %.2f, seed %d", len(prompts), steps, g, seed)
        return sample(model, prompts, seed=seed, steps=steps, guidance=g, negative_prompt=negative_prompt,
                      spacing=spacing, batch_size=batch_size, plan=plan, switch=switch, callback=callback)
    finally:
        if names:
            remove_adapters(model.unet, [n for n in names if n is not None])
