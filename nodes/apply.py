"""Apply a ShortFT LoRA set to a MODEL for the stock KSampler: segment j's LoRA at segment j's timesteps
(timestep-aware), or the set's merged LoRA at every step (merged, what the stock LoraLoader does with it).

Timestep-aware mode clones the ModelPatcher and adds an APPLY_MODEL wrapper that reads the integer timestep of each
UNet call (the level of the model sampling's table, ``common.level_index``: a discrete model's timestep, the value
its UNet receives) and selects its segment, so the switch is exact for every sampler and scheduler. For the duration
of the call every layer the segment's LoRA adapts computes its base output plus that LoRA's, with ComfyUI's own
``comfy.lora`` key map and LoRA maths (every key lands where the stock loader puts it, with the value it bakes), in
one of two ways:

- patched: the segment's patched weight (base + delta) is computed when sampling enters the segment and kept until
  it leaves it; a call then costs what a stock LoRA's call costs, and a switch one patch of the set's weights
  (a few milliseconds of matmuls on a GPU, seconds on a CPU), however many steps a segment has. Every layer whose
  weight is on a GPU runs so.
- bypass, as ComfyUI's LoraLoaderBypass does: ``W x + B (A x)``, nothing patched or kept; a call pays the low-rank
  product, which grows with the positions the layer runs on. A layer whose weight is on the CPU (``--cpu``, or a
  layer ComfyUI offloaded) runs so unless the segment's calls left in this run (counted from the sampler's
  schedule) would spend more on that layer than its patch costs: the first call at a latent size bypasses and
  counts each layer's output positions, later calls compare, layer by layer, (input + output channels) x positions
  x calls left against the weight's elements, scaled by ``BYPASS_COST`` (measured with bench/bench_apply_set.py
  --per-call). In a UNet the high-resolution levels patch from a segment's first call or two, the text-context
  projections bypass while it has a call or two left, the low-resolution levels unless it has many.

A MODEL whose weights ComfyUI's DynamicVRAM streams (its default on NVIDIA GPUs) bypasses every layer: such a layer
computes with the copy of its weight ComfyUI staged on the GPU (or pinned in host memory), never with a tensor put in
its place, so a patched weight would go unseen.

An OUTER_SAMPLE wrapper drops the patched weights when the sampling run ends. The base model's own parameters and
modules are never written: patched tensors and bypass forwards stand in for them inside the call, and the originals
are put back after it.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any, Iterator, Mapping

import comfy.float
import comfy.lora
import comfy.lora_convert
import comfy.model_management
import comfy.patcher_extension
import comfy.sd
import comfy.utils
import comfy.weight_adapter
import comfy.weight_adapter.bypass
import folder_paths
import torch
from comfy_api.latest import io

from ..shortft_core import LoraSet, Segments, find_lora_sets, lora_set_folder
from .common import CATEGORY, LORA_SET, UNLINKED, is_dynamic, level_index
from .family import model_family

log = logging.getLogger(__name__)

NONE = "none"
TIMESTEP_AWARE, MERGED = "timestep-aware", "merged"
WRAPPER_KEY = "shortft_lora_set"
# device types of the weights whose layers may run a segment's LoRA as a bypass instead of a patched weight
BYPASS_DEVICES = frozenset({"cpu"})
# what bypassing costs per (input + output channel) x position against what patching costs per weight element
# (measured on a CPU with bench/bench_apply_set.py --per-call): a layer's weight is patched for its segment when the
# segment's calls left would spend more on bypassing that layer than its patch costs
BYPASS_COST = 1.3


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
    bad = [k for k, p in patches.items() if not _fits(p, patched_shape(k, shapes))]
    if bad:
        raise ValueError(f"{len(bad)} LoRA weights of {file} do not fit this {model_family(model)} MODEL's shapes "
                         f"(e.g. {', '.join(bad[:3])}): the LoRA was made for another architecture")
    return patches


def patched_shape(key: Any, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    """The shape a patch of ComfyUI's ``key`` changes (None for no weight): the weight's, or for a key naming a part
    of a fused weight, ``(weight key, (dim, offset, size), ...)`` (ComfyUI maps diffusers' separate q, k and v LoRAs
    onto MMDiT's fused qkv so), that part's."""
    if isinstance(key, str):
        return shapes.get(key)
    shape = shapes.get(key[0])
    if shape is None:
        return None
    dim, _, size = key[1][:3]
    return shape[:dim] + (size,) + shape[dim + 1:]


def _fits(patch: Any, shape: tuple[int, ...] | None) -> bool:
    """Whether a plain LoRA patch (up, down) gives a delta of the weight's shape; other patch kinds pass."""
    if shape is None:
        return False
    weights = getattr(patch, "weights", None)
    if getattr(patch, "name", None) != "lora" or not weights or weights[3] is not None or weights[5] is not None:
        return True
    up, down = weights[0], weights[1]
    return up.shape[0] == shape[0] and up.shape[1] == down.shape[0] and down[0].numel() == math.prod(shape[1:])


class SegmentWeights:
    """The set's LoRA for one segment at a time on the layers it adapts: a layer whose weight is on the CPU runs as a
    bypass (base output + the low-rank product) while that costs less than patching it, any other gets a patched
    weight (base weight + the segment's delta at ``strength``), computed from the base model's current weight
    (which may carry other patches, e.g. a stock LoRA applied before) the first time a call of the segment patches
    that layer, and kept while calls stay in the segment."""

    def __init__(self, patches: list[dict[str, Any]], strength: float, streamed: bool = False) -> None:
        self.patches, self.strength = patches, strength
        self.streamed = streamed  # DynamicVRAM stages the weights itself: every layer bypasses
        self.segment: int | None = None
        self.sources: dict[str, tuple[Any, ...]] = {}  # key -> what identifies the base tensor it was patched from
        self.patched: dict[str, torch.nn.Parameter] = {}
        self.positions: dict[tuple[int, ...], dict[str, int]] = {}  # a call's input shape -> key -> output positions
        self.sigmas: list[float] = []  # the running sampling's schedule, for the calls a segment has left

    def _current(self, base_model: Any, j: int, keys: list[str]) -> dict[str, torch.Tensor]:
        """The base weights of ``keys``, each with segment j's patched weight made beside it unless one made from
        that very base tensor is kept (entering another segment frees the previous one's)."""
        params = {key: comfy.utils.get_attr(base_model, key) for key in keys}
        if self.segment != j:
            self.drop()
            self.segment = j
        with torch.no_grad():
            for key, weight in params.items():
                if self.sources.get(key) != _identity(weight):
                    self.patched[key] = torch.nn.Parameter(self._patch(key, weight, self.patches[j - 1][key]),
                                                           requires_grad=False)
                    self.sources[key] = _identity(weight)
        return params

    def _patch(self, key: str, weight: torch.Tensor, patch: Any) -> torch.Tensor:
        """``weight`` with ``patch`` at the set's strength, made as ComfyUI's own patcher makes a patched weight (in
        its LoRA compute dtype, rounded back stochastically, seeded by the key), so fp8 weights take the LoRA as a
        stock LoRA does: added in their own dtype, the delta would be lost (ComfyUI logs the error and keeps the
        weight)."""
        work = weight.to(comfy.model_management.lora_compute_dtype(weight.device), copy=True)
        new = comfy.lora.calculate_weight([(self.strength, patch, 1.0, None, None)], work, key)
        return comfy.float.stochastic_rounding(new, weight.dtype, seed=comfy.utils.string_to_seed(key))

    def split(self, base_model: Any, j: int, shape: tuple[int, ...] = (), calls_left: int = 1
              ) -> tuple[list[str], list[str]]:
        """Segment j's keys as (patched, bypassed) for a call on an input of ``shape`` with ``calls_left`` calls of
        the segment to come (this one included): a plain LoRA on the weight of a layer that lives on the CPU is
        bypassed unless patching that layer costs less over those calls; everything else (GPU weights, other
        adapter kinds, biases) is patched."""
        patched, bypassed = [], []
        counted = self.positions.get(shape, {})
        for key, patch in self.patches[j - 1].items():
            path, _, name = key.rpartition(".")
            module = comfy.utils.get_attr(base_model, path)
            weight = getattr(module, name)
            cpu = name == "weight" and weight.device.type in BYPASS_DEVICES and _bypassable(patch, module)
            if self.streamed or (cpu and not self._patch_pays(j, key, weight, counted.get(key), calls_left)):
                bypassed.append(key)
            else:
                patched.append(key)
        return patched, bypassed

    def _patch_pays(self, j: int, key: str, weight: torch.Tensor, positions: int | None, calls_left: int) -> bool:
        """Whether patching one layer's weight costs less than bypassing it for the calls left: both scale with the
        rank, a patch with the weight's elements (nothing when this segment's patch of this very weight is kept),
        the bypass with (input + output channels) x the output positions a call runs it on, known once a bypassed
        call at this input shape has counted them (until then the layer bypasses). A UNet's layers differ by
        orders of magnitude in positions (its resolution levels, the text context), so the choice is per layer."""
        paid = self.segment == j and self.sources.get(key) == _identity(weight)
        if positions is None:
            return paid
        patch = 0 if paid else weight.numel()
        bypass = (weight.numel() // weight.shape[0] + weight.shape[0]) * positions
        return calls_left * bypass * BYPASS_COST > patch

    @contextlib.contextmanager
    def applied(self, base_model: Any, j: int, shape: tuple[int, ...] = (), calls_left: int = 1) -> Iterator[None]:
        """Segment j's LoRA on every layer it adapts, for the duration of the block (a call on an input of
        ``shape``, with ``calls_left`` calls of the segment to come)."""
        patched, bypassed = self.split(base_model, j, shape, calls_left)
        originals = self._current(base_model, j, patched)
        swapped: dict[str, tuple[torch.nn.Module, str]] = {}
        forwards: list[tuple[torch.nn.Module, Any]] = []
        counted = self.positions.setdefault(shape, {})
        try:
            for key in originals:
                path, _, name = key.rpartition(".")
                module = comfy.utils.get_attr(base_model, path)
                swapped[key] = (module, name)
                module._parameters[name] = self.patched[key]
            for key in bypassed:
                module = comfy.utils.get_attr(base_model, key.rpartition(".")[0])
                forwards.append((module, module.__dict__.get("forward")))
                module.forward = _bypass_forward(module, self.patches[j - 1][key], self.strength, counted, key)
            yield
        finally:
            for module, previous in reversed(forwards):
                if previous is None:
                    del module.forward
                else:
                    module.forward = previous
            for key, (module, name) in swapped.items():
                module._parameters[name] = originals[key]

    def drop(self) -> None:
        """Free the patched weights (the next call recomputes its segment's)."""
        self.segment = None
        self.sources.clear()
        self.patched.clear()


def _bypassable(patch: Any, module: torch.nn.Module) -> bool:
    """Whether ComfyUI's LoRA bypass computes exactly what patching the weight gives: a plain LoRA (no DoRA scale,
    no reshape) on a linear or convolution layer."""
    if not isinstance(patch, comfy.weight_adapter.LoRAAdapter):
        return False
    weights = patch.weights
    if weights[4] is not None or weights[5] is not None:
        return False
    if isinstance(module, torch.nn.Linear):
        return weights[0].ndim == 2 and weights[1].ndim == 2
    return comfy.weight_adapter.bypass.get_module_type_info(module)["is_conv"]


def _bypass_forward(module: torch.nn.Module, adapter: Any, strength: float, positions: dict[str, int],
                    key: str) -> Any:
    """The layer's current forward plus the adapter's low-rank output (ComfyUI's ``h``) at ``strength``; the number
    of output positions it ran on goes to ``positions[key]``."""
    info = comfy.weight_adapter.bypass.get_module_type_info(module)  # what ComfyUI's bypass hook tells h
    adapter.multiplier = strength
    for name in ("is_conv", "conv_dim", "kernel_size", "in_channels", "out_channels"):
        setattr(adapter, name, info[name])
    adapter.kw_dict = {k: info[k] for k in ("stride", "padding", "dilation", "groups")} if info["is_conv"] else {}
    base = module.forward

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = base(x, *args, **kwargs)
        up = adapter.weights[0]
        if up.device != x.device or up.dtype != x.dtype:  # once: h would cast in every call (an offloaded layer
            adapter.weights = tuple(  # computes on the GPU; a file's fp16 LoRA meets fp32 activations on a CPU)
                w.to(x.device, x.dtype) if isinstance(w, torch.Tensor) else w for w in adapter.weights)
        positions[key] = out.numel() // out.shape[1 if adapter.is_conv else -1]
        return out + adapter.h(x, out)

    return forward


def _identity(weight: torch.Tensor) -> tuple[Any, ...]:
    """What changes when ComfyUI re-patches, moves or replaces a base weight: the patched copy is then remade
    (weights loaded in inference mode have no version counter; their storage and identity tell)."""
    version = -1 if weight.is_inference() else weight._version
    return id(weight), version, weight.data_ptr(), weight.device, weight.dtype


class SegmentSwitch:
    """APPLY_MODEL wrapper: runs each UNet call with the patched weights of its timestep's segment."""

    def __init__(self, segments: Segments, weights: SegmentWeights, name: str) -> None:
        self.segments, self.weights, self.name = segments, weights, name

    def segment_of(self, executor: Any, t: torch.Tensor) -> int:
        """The one segment of the call's integer timesteps (a ValueError when they lie off the schedule or in two)."""
        timesteps = level_index(executor.class_obj.model_sampling, t).flatten().tolist()
        top = self.segments.top
        if any(not 0 <= v <= top for v in timesteps):
            raise ValueError(f"LoRA set {self.name}: the model's timesteps {timesteps} lie outside 0..{top}; the set's "
                             "segments are defined on the levels of a 1000-level table (do not patch model sampling "
                             "to another table)")
        segments = {self.segments.segment_of(int(round(v))) for v in timesteps}
        if len(segments) != 1:
            raise ValueError(f"LoRA set {self.name}: one model call mixes timesteps {timesteps} of segments "
                             f"{sorted(segments)}; a timestep-aware set needs one noise level per call")
        return segments.pop()

    def calls_left(self, executor: Any, j: int, t: torch.Tensor) -> int:
        """How many steps of the running schedule, from this call's noise level on, lie in segment j (at least 1)."""
        sampling = executor.class_obj.model_sampling
        now = float(t.max()) * (1 + 1e-6)
        levels = [s for s in self.weights.sigmas[:-1] if 0 < s <= now]
        timesteps = level_index(sampling, torch.tensor(levels)).tolist() if levels else []
        return max(1, sum(self.segments.segment_of(int(round(v))) == j for v in timesteps
                          if 0 <= v <= self.segments.top))

    def __call__(self, executor: Any, x: torch.Tensor, t: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        j = self.segment_of(executor, t)
        with self.weights.applied(executor.class_obj, j, tuple(x.shape), self.calls_left(executor, j, t)):
            return executor(x, t, *args, **kwargs)


class ReleaseAfterSampling:
    """OUTER_SAMPLE wrapper: tells the switch the run's schedule, and frees the patched weights when the run ends,
    however it ends."""

    def __init__(self, weights: SegmentWeights) -> None:
        self.weights = weights

    def __call__(self, executor: Any, noise: Any, latent_image: Any, sampler: Any, sigmas: torch.Tensor, *args: Any,
                 **kwargs: Any) -> Any:
        self.weights.sigmas = [float(s) for s in sigmas.flatten()]
        try:
            return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            self.weights.sigmas = []
            self.weights.drop()


def timestep_aware(model: Any, lset: LoraSet, strength: float) -> Any:
    """A clone of ``model`` that samples with segment j's LoRA at every timestep of segment j."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    per_segment = [{} if entry.file is None  # a segment the set leaves to the base
                   else lora_patches(comfy.utils.load_torch_file(str(entry.file), safe_load=True), entry.file, model,
                                     key_map) for entry in lset.schedule]
    split = [k for patches in per_segment for k in patches if not isinstance(k, str)]
    if split:  # the per-segment weights patch whole weights (the sets ShortFT writes adapt whole layers)
        raise ValueError(f"LoRA set {lset.folder}: {len(split)} of its LoRAs adapt a part of a fused weight (e.g. "
                         f"{split[0][0]}, as diffusers' separate q, k and v LoRAs do MMDiT's fused qkv); "
                         f"timestep-aware sampling patches whole weights: use mode '{MERGED}', or a set written by "
                         "ShortFT")
    streamed = is_dynamic(model)
    if streamed:  # only a bypass reaches a streamed layer: refuse what cannot run as one before sampling
        for key in sorted(set().union(*per_segment)):
            path, _, name = key.rpartition(".")
            patch = next(p[key] for p in per_segment if key in p)
            if name != "weight" or not _bypassable(patch, comfy.utils.get_attr(model.model, path)):
                raise ValueError(f"LoRA set {lset.folder}: {key} is no plain LoRA on a linear or convolution weight, "
                                 "which a MODEL whose weights ComfyUI's DynamicVRAM streams takes only as a bypass: "
                                 f"use mode '{MERGED}', or start ComfyUI with --disable-dynamic-vram")
    weights = SegmentWeights(per_segment, strength, streamed)
    patched = model.clone()
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                                 SegmentSwitch(lset.segments, weights, str(lset.folder)))
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY,
                                 ReleaseAfterSampling(weights))
    log.info("LoRA set %s: %d segments, %d weights switched per segment", lset.folder, lset.segments.k,
             len(set().union(*per_segment)))
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
    def validate_inputs(cls, set_name: str = NONE, lora_set: Any = UNLINKED) -> bool | str:
        if lora_set is not UNLINKED:  # connected: LoadLoRASet checks its set
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
