"""Apply a ShortFT LoRA set to a MODEL for the stock KSampler: segment j's LoRA at segment j's timesteps
(timestep-aware), or the set's merged LoRA at every step (merged, what the stock LoraLoader does with it).

Timestep-aware mode clones the ModelPatcher and adds, per LoRA'd weight, a weight function that adds the current
segment's delta (ComfyUI's own ``comfy.lora`` key map and LoRA maths, so every key lands where the stock loader
puts it), plus an APPLY_MODEL wrapper that reads the integer timestep of each UNet call
(``model_sampling.timestep(sigma)``, the value the UNet receives) and selects its segment. The switch happens
inside every model call, so it is exact for every sampler and scheduler; nothing is re-patched between steps.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import comfy.lora
import comfy.lora_convert
import comfy.patcher_extension
import comfy.sd
import comfy.supported_models
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..shortft_core import LoraSet, Segments, find_lora_sets, lora_set_folder
from .common import CATEGORY, LORA_SET
from .tiny_world import is_tiny_world

log = logging.getLogger(__name__)

NONE = "none"
TIMESTEP_AWARE, MERGED = "timestep-aware", "merged"
WRAPPER_KEY = "shortft_lora_set"
_UNLINKED = object()  # validate_inputs' default for the optional socket: absent means not connected


def lora_roots() -> list[str]:
    return list(folder_paths.get_folder_paths("loras"))


def set_names() -> list[str]:
    """Every LoRA set folder under ComfyUI's LoRA folders, relative to its folder (the combos' options)."""
    names: list[str] = []
    for root in lora_roots():
        names += [n for n in find_lora_sets(root) if n not in names]
    return sorted(names)


def open_set(name: str) -> LoraSet:
    """The set ``name`` from ComfyUI's LoRA folders, opened and checked file by file (errors name the fix)."""
    return LoraSet.open(lora_set_folder(lora_roots(), name))


def _check_set(name: str) -> bool | str:
    try:
        open_set(name)
    except (OSError, ValueError) as e:
        return str(e)
    return True


def _files_fingerprint(name: str) -> Any:
    """Size and mtime of every file of the set, so a set re-trained into the same folder is read again."""
    try:
        folder = lora_set_folder(lora_roots(), name)
    except (OSError, ValueError):
        return name
    return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir() if p.is_file()))


def model_family(model: Any) -> str:
    """The ShortFT family name of a ComfyUI MODEL (tiny, sd15, sdxl), else ComfyUI's model class name."""
    if is_tiny_world(model):
        return "tiny"
    config = model.model.model_config
    if isinstance(config, comfy.supported_models.SDXL):
        return "sdxl"
    if isinstance(config, comfy.supported_models.SD15):
        return "sd15"
    return type(config).__name__


def check_family(lset: LoraSet, model: Any) -> None:
    """Refuse a set trained for another base than the MODEL's (its manifest names the family)."""
    family = model_family(model)
    if lset.family is not None and lset.family != family:
        raise ValueError(f"LoRA set {lset.folder} was trained for {lset.family} but the MODEL is {family}: load a "
                         f"{lset.family} checkpoint, or choose a set trained for {family}")


# a key of these kinds is loaded by comfy.lora.load_lora when its prefix maps to a model weight
_PLAIN_SUFFIXES = (".alpha", ".dora_scale", ".w_norm", ".b_norm", ".diff", ".diff_b", ".set_weight")


def lora_patches(lora: dict[str, torch.Tensor], file: Path, model: Any, key_map: dict[str, str]) -> dict[str, Any]:
    """ComfyUI's patches (model weight key -> weight adapter) for the LoRA read from ``file``, or a ValueError naming
    the file when any of its keys would not be loaded ("lora key not loaded") or does not fit its weight."""
    sd = comfy.lora_convert.convert_lora(dict(lora))  # a copy: some conversions rename keys in place
    patches = comfy.lora.load_lora(sd, key_map, log_missing=False)
    used = set().union(*(getattr(p, "loaded_keys", ()) for p in patches.values()))
    unloaded = sorted(k for k in sd if k not in used
                      and not (k.endswith(_PLAIN_SUFFIXES) and k.rsplit(".", 1)[0] in key_map))
    if unloaded:
        raise ValueError(f"{len(unloaded)} of {len(sd)} keys of {file} match no weight of this "
                         f"{model_family(model)} MODEL (e.g. {', '.join(unloaded[:3])}): the LoRA was made for "
                         "another architecture; use a set trained for this base")
    shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items()}
    bad = [k for k, p in patches.items() if not _fits(p, shapes.get(k))]
    if bad:
        raise ValueError(f"{len(bad)} LoRA weights of {file} do not fit this {model_family(model)} MODEL's shapes "
                         f"(e.g. {', '.join(bad[:3])}): the LoRA was made for another architecture")
    return patches


def _fits(patch: Any, shape: tuple[int, ...] | None) -> bool:
    """Whether a plain LoRA patch (up, down) gives a delta of the weight's shape; other patch kinds pass."""
    if shape is None:
        return False
    weights = getattr(patch, "weights", None)
    if getattr(patch, "name", None) != "lora" or not weights or weights[3] is not None or weights[5] is not None:
        return True
    up, down = weights[0], weights[1]
    return up.shape[0] == shape[0] and up.shape[1] == down.shape[0] and down[0].numel() == math.prod(shape[1:])


class SegmentState:
    """The segment the UNet call in progress runs in: set by :class:`SegmentSwitch`, read by the weight functions."""

    def __init__(self, segments: Segments) -> None:
        self.segments = segments
        self.segment: int | None = None


class SegmentSwitch:
    """APPLY_MODEL wrapper: selects the segment of the call's integer timestep for the duration of the call."""

    def __init__(self, state: SegmentState, name: str) -> None:
        self.state, self.name = state, name

    def __call__(self, executor: Any, x: torch.Tensor, t: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        timesteps = executor.class_obj.model_sampling.timestep(t).flatten().tolist()
        top = self.state.segments.top
        if any(not 0 <= v <= top for v in timesteps):
            raise ValueError(f"LoRA set {self.name}: the model's timesteps {timesteps} lie outside 0..{top}; the set's "
                             "segments are defined on the SD discrete schedule (do not patch model sampling)")
        segments = {self.state.segments.segment_of(int(round(v))) for v in timesteps}
        if len(segments) != 1:
            raise ValueError(f"LoRA set {self.name}: one model call mixes timesteps {timesteps} of segments "
                             f"{sorted(segments)}; a timestep-aware set needs one noise level per call")
        previous, self.state.segment = self.state.segment, segments.pop()
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            self.state.segment = previous


class SegmentDelta:
    """Weight function of one UNet weight: adds the current segment's LoRA delta at ``strength``, with ComfyUI's
    own LoRA maths (as the stock loader bakes it); segments whose LoRA lacks this weight leave it unchanged."""

    def __init__(self, key: str, patches: list[Any | None], strength: float, state: SegmentState, name: str) -> None:
        self.key, self.patches, self.strength, self.state, self.name = key, patches, strength, state, name

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        j = self.state.segment
        if j is None:
            raise RuntimeError(f"LoRA set {self.name}: weight {self.key} was used outside a sampling step, where no "
                               "timestep selects a segment; use mode 'merged' for such uses")
        patch = self.patches[j - 1]
        if patch is None:
            return weight
        return comfy.lora.calculate_weight([(self.strength, patch, 1.0, None, None)], weight, self.key)


def timestep_aware(model: Any, lset: LoraSet, strength: float) -> Any:
    """A clone of ``model`` that samples with segment j's LoRA at every timestep of segment j."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    per_segment = [{} if entry.file is None  # a segment the set leaves to the base
                   else lora_patches(comfy.utils.load_torch_file(str(entry.file), safe_load=True), entry.file, model,
                                     key_map) for entry in lset.schedule]
    state = SegmentState(lset.segments)
    patched = model.clone()
    for key in sorted(set().union(*per_segment)):
        patched.add_weight_wrapper(key, SegmentDelta(key, [p.get(key) for p in per_segment], strength, state,
                                                     str(lset.folder)))
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                                 SegmentSwitch(state, str(lset.folder)))
    log.info("LoRA set %s: %d segments, %d weights switched per timestep", lset.folder, lset.segments.k,
             len(patched.weight_wrapper_patches))
    return patched


def merged(model: Any, lset: LoraSet, strength: float) -> Any:
    """``model`` with the set's merged LoRA, exactly as the stock LoraLoader applies that file."""
    if lset.merged_file is None:
        raise ValueError(f"LoRA set {lset.folder} has no merged file in its set.json; use mode '{TIMESTEP_AWARE}'")
    lora, metadata = comfy.utils.load_torch_file(str(lset.merged_file), safe_load=True, return_metadata=True)
    lora_patches(lora, lset.merged_file, model, comfy.lora.model_lora_keys_unet(model.model, {}))  # refuse, never skip
    return comfy.sd.load_lora_for_models(model, None, lora, strength, 0, lora_metadata=metadata)[0]


class LoadLoRASet(io.ComfyNode):
    """Pick a ShortFT LoRA set folder from models/loras."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ShortFT_LoadLoRASet",
            display_name="LoadLoRASet",
            category=CATEGORY,
            description="Loads a timestep-aware LoRA set (a folder with set.json, one LoRA per trajectory segment "
                        "and a merged LoRA) from models/loras, for ApplyAlignedLoRA.",
            inputs=[
                io.Combo.Input("lora_set", options=set_names(),
                               tooltip="A LoRA set folder under models/loras (a ShortFT run's lora/ folder, copied "
                                       "whole)."),
            ],
            outputs=[LORA_SET.Output(display_name="lora_set", tooltip="The set: its segments, files and base.")],
        )

    @classmethod
    def validate_inputs(cls, lora_set: str) -> bool | str:
        return _check_set(lora_set)

    @classmethod
    def fingerprint_inputs(cls, lora_set: str) -> Any:
        return _files_fingerprint(lora_set)

    @classmethod
    def execute(cls, lora_set: str) -> io.NodeOutput:
        return io.NodeOutput(open_set(lora_set))


class ApplyAlignedLoRA(io.ComfyNode):
    """Apply a ShortFT LoRA set to a MODEL for the stock KSampler."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ShortFT_ApplyAlignedLoRA",
            display_name="ApplyAlignedLoRA",
            category=CATEGORY,
            description="Applies an aligned LoRA set to the model: timestep-aware uses segment j's LoRA at segment "
                        "j's timesteps in any sampler and scheduler; merged applies the merged LoRA everywhere, "
                        "like Load LoRA.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model the LoRA set is applied to (its base must be "
                                                "the one the set was trained on)."),
                LORA_SET.Input("lora_set", optional=True,
                               tooltip="A set from LoadLoRASet; when connected, set_name is ignored."),
                io.Combo.Input("set_name", options=[NONE, *set_names()], default=NONE,
                               tooltip="A LoRA set folder under models/loras, used when lora_set is not connected."),
                io.Float.Input("strength", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="How strongly the LoRAs modify the model (1.0 = as trained; may be negative)."),
                io.Combo.Input("mode", options=[TIMESTEP_AWARE, MERGED], default=TIMESTEP_AWARE,
                               tooltip="timestep-aware: each segment's LoRA at its own timesteps, as trained. "
                                       "merged: the set's merged LoRA at every step (what Load LoRA gives)."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with the LoRA set applied.")],
        )

    @classmethod
    def validate_inputs(cls, set_name: str = NONE, lora_set: Any = _UNLINKED) -> bool | str:
        if lora_set is not _UNLINKED:  # connected: LoadLoRASet checks its set
            return True
        if set_name == NONE:
            return "choose a LoRA set in set_name or connect LoadLoRASet to lora_set"
        return _check_set(set_name)

    @classmethod
    def fingerprint_inputs(cls, set_name: str = NONE, **_: Any) -> Any:
        return None if set_name == NONE else _files_fingerprint(set_name)

    @classmethod
    def execute(cls, model: Any, set_name: str = NONE, strength: float = 1.0, mode: str = TIMESTEP_AWARE,
                lora_set: LoraSet | None = None) -> io.NodeOutput:
        lset = lora_set if lora_set is not None else open_set(set_name)
        check_family(lset, model)
        if strength == 0:
            return io.NodeOutput(model)
        if mode == MERGED:
            return io.NodeOutput(merged(model, lset, strength))
        return io.NodeOutput(timestep_aware(model, lset, strength))


NODES: list[type[io.ComfyNode]] = [LoadLoRASet, ApplyAlignedLoRA]
