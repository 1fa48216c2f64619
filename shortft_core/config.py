"""Training settings: :class:`TrainConfig` (every setting of a run, saved in checkpoints and LoRA metadata) and the
tiny world's preset.

Each field is a :func:`~shortft_core.checkpoint.setting` carrying its help text and its range or choices, so the
command line (one flag per field), the ComfyUI nodes and Python users share one validation.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from .adapters import LAST_SEGMENT_CHOICES, LoraSetSpec
from .settings import check_bounds, setting
from .methods import METHODS, Method, get_method
from .models import PRECISION
from .segments import Segments, check_edges


@dataclass
class TrainConfig:
    """Everything a run needs; saved in checkpoints and in the LoRA metadata."""

    RENAMED: ClassVar[dict[str, str]] = {"eval_prompts": "eval_count"}  # old name -> new, for runs saved before

    method: str = setting("shortft", "training method: " + " | ".join(METHODS) + " (shortcut-model: ablation, "
                                     "fine-tune on the shortcut's few-step chain)", choices=tuple(METHODS))
    # ShortFT
    segments: tuple[int, ...] = setting((761, 501, 261, 0), "lower ends of the k trajectory segments on the "
                                        "50-step chain, descending, the last 0; one LoRA per segment (but the "
                                        "last with --last-segment base)")
    progressive: bool = setting(True, "train the segments in stages (one per LoRA), earliest first (ShortFT); "
                                      "--no-progressive keeps stage 1's plan throughout")
    stage_fractions: tuple[float, ...] | None = setting(None, "share of the iterations (or time budget) per stage, "
                                                              "one per stage summing to 1 (k, or k-1 with "
                                                              "last_segment base; none: equal split)")
    real_grad_steps: int | None = setting(1, "steps with gradient inside the stage's own segment, counted from its "
                                             "end (none: all of them)", at_least=1)
    shortcut_net: str = setting("shortcut", "what jumps over the later segments: shortcut (the frozen few-step "
                                            "LoRA) | base (naive one-step DDIM jumps, ablation) | tuned (ablation)",
                                choices=("shortcut", "base", "tuned"))
    shortcut_guidance: float = setting(1.0, "CFG scale of the shortcut jumps (1: none, as Hyper-SD's 4-step LoRAs "
                                            "are made for); unless given, training takes the shortcut's own (its "
                                            "preset or metadata), for ShortFT at most --guidance so an unguided set "
                                            "trains through unguided jumps", at_least=1)
    shortcut_edges: tuple[int, ...] = setting((999, 749, 499, 249), "the shortcut's few-step grid (method "
                                                                    "shortcut-model only)")
    reset_optimizer_per_stage: bool = setting(False, "start each stage with a fresh optimizer state")
    unrun_lr_scale: float = setting(1.0, "learning-rate factor of the LoRAs whose segment the current stage has not "
                                         "yet run for real (stage s: align_s+1..align_k, trained only through their "
                                         "anchor step); 1: no damping", above=0, at_most=1)
    last_anchor: str = setting("end", "where the last segment's fine-tuned step sits before stage k: end (1 -> x0, "
                                      "the paper's) | start (241 -> 221, no stage 2-3 dip); see BENCHMARKS.md",
                               choices=("end", "start"))
    last_segment: str = setting("tuned", "what samples the last (lowest-noise) segment, 241..1 on the 50-step chain: "
                                         "tuned (its own LoRA on the stacked set, trained in a last stage: the "
                                         "paper's reading; a reward decided at low noise, detail or cleanliness, "
                                         "needs it) | base (the bare base: no LoRA there, one stage less, the set "
                                         "acts only where training runs it for real; the tiny preset's, best on "
                                         "its symmetry and alignment rewards; BENCHMARKS.md)",
                                choices=LAST_SEGMENT_CHOICES)
    # baselines
    draft_k: int = setting(1, "DRaFT-K: sampling steps with gradient, counted from the end", at_least=1)
    lv_n: int = setting(2, "DRaFT-LV: re-noised readouts of the last step, averaged", at_least=1)
    alignprop_k_mean: float = setting(8.0, "AlignProp: mean number of steps with gradient (drawn per batch)",
                                      at_least=1)
    refl_total: int = setting(40, "ReFL: length of its sampling chain (it exits at a random step of 30-39)",
                              at_least=40)
    drtune_trained: int = setting(5, "DRTune: evenly spaced steps that carry gradient through the network", at_least=1)
    checkpoint_unet: bool = setting(False, "gradient checkpointing of the UNet calls with gradient: half the "
                                           "peak memory or less, at 1.3-1.8x the time (full BPTT and AlignProp "
                                           "always use it; may change on --resume)")
    checkpoint_blocks: bool = setting(False, "with the UNet calls checkpointed (implies --checkpoint-unet), their "
                                             "recomputation keeps only each block's input and recomputes the "
                                             "blocks one at a time as backward reaches them: one block's "
                                             "activations instead of a whole call's (a FLUX-shaped network of 6 "
                                             "blocks: 0.29x the peak of whole calls, a full one ~0.08x), one more "
                                             "network forward per call (may change on --resume)")
    checkpoint_vae: bool = setting(False, "block-wise checkpointing of the VAE decoder (its full-resolution "
                                          "backward; may change on --resume)")
    offload_text_encoders: bool = setting(False, "keep the text encoders in host memory, lent to the GPU only to "
                                                 "encode a prompt not cached (SDXL: 1.5 GiB less on the GPU; may "
                                                 "change on --resume)")
    # sampling
    image_size: int | None = setting(None, "image size in pixels of training, evaluation and previews, square "
                                           "(none: the model's native size, e.g. 512 for SD1.5, 1024 for SDXL)",
                                     at_least=8)
    sample_steps: int = setting(50, "DDIM steps of the sampling chain being fine-tuned (and of evaluation)",
                                at_least=1, at_most=1000)
    guidance: float = setting(3.0, "CFG scale on the fine-tuned steps (1: none, one UNet pass per step, less "
                                   "memory)", at_least=1)
    # LoRA
    timestep_aware: bool = setting(True, "one LoRA per segment (ShortFT); --no-timestep-aware trains a single one")
    rank: int = setting(8, "LoRA rank of each alignment adapter", at_least=1)
    alpha: float | None = setting(None, "LoRA alpha (none: the rank, i.e. scale 1)", above=0)
    # optimisation
    lr: float = setting(1e-3, "peak learning rate (AdamW)", above=0)
    weight_decay: float = setting(0.0, "AdamW weight decay", at_least=0)
    warmup: int = setting(0, "linear warm-up iterations", at_least=0)
    lr_schedule: str = setting("constant", "learning-rate schedule after warm-up: constant | cosine",
                               choices=("constant", "cosine"))
    grad_clip: float = setting(1.0, "clip the gradient's global norm to this (0: no clipping)")
    grad_accum: int = setting(1, "batches whose gradients are summed per optimizer step", at_least=1)
    batch_size: int = setting(4, "prompts per batch", at_least=1)
    iterations: int = setting(200, "optimizer steps of the run (may be raised on --resume)", at_least=1)
    time_budget_s: float | None = setting(None, "stop, and schedule the stages, by wall-clock seconds instead of "
                                                "iterations", above=0)
    mixed_precision: str = setting("no", "no | bf16 | fp16: dtype of the frozen base weights (the LoRAs train in "
                                         "fp32; fp16 scales the loss dynamically); bf16 on a GPU",
                                   choices=tuple(PRECISION))
    kl_weight: float = setting(0.0, "DRaFT+-style penalty: weight of the mean squared distance between tuned and "
                                    "base eps on the steps with gradient", at_least=0)
    seed: int = setting(0, "seed of prompts, noise and the LoRAs' initialisation")
    # bookkeeping
    checkpoint_every: int = setting(100, "iterations between checkpoints (atomic; --resume continues exactly)",
                                    at_least=1)
    keep_checkpoints: int = setting(2, "checkpoints kept on disk (older ones are deleted)", at_least=1)
    eval_count: int = setting(32, "held-out prompts of the tiny world evaluated before, during and after training "
                                  "when no evaluation prompts are given (given ones set it to their number); 0: no "
                                  "held-out evaluation", at_least=0)
    eval_every: int = setting(0, "iterations between evaluations (0: before and after only)", at_least=0)
    preview_every: int = setting(0, "iterations between preview images (0: none)", at_least=0)
    preview_chain: str = setting("full", "chain of the preview images: full (the inference chain) | shortcut (the "
                                         "shortcut's few jumps with the aligned LoRAs: a cheap approximation)",
                                 choices=("full", "shortcut"))

    def validate(self) -> None:
        """Raise on settings out of range or inconsistent, before any heavy work."""
        check_bounds(self)
        Segments(tuple(self.segments))
        lora = self.lora  # checks last_segment against the segments
        if self.stage_fractions is not None:
            k = lora.tuned_segments
            if len(self.stage_fractions) != k or abs(sum(self.stage_fractions) - 1) > 1e-6:
                raise ValueError(f"stage_fractions needs {k} shares summing to 1 (one per segment"
                                 + (", the last one left to the base" if k < len(self.segments) else "")
                                 + f"); got {self.stage_fractions}")
        check_edges(self.shortcut_edges, "shortcut_edges")

    @property
    def method_entry(self) -> Method:
        """The registry entry of ``method``."""
        return get_method(self.method)

    @property
    def lora(self) -> LoraSetSpec:
        """The alignment LoRA set this run trains."""
        return self.method_entry.lora(self)

    @property
    def num_stages(self) -> int:
        return self.method_entry.stages(self)

    @property
    def checkpoint_calls(self) -> bool:
        """Whether the network calls with gradient are checkpointed (asked by either checkpointing setting)."""
        return self.checkpoint_unet or self.checkpoint_blocks

    @property
    def needs_shortcut(self) -> bool:
        """Whether the run needs the frozen shortcut adapter on the UNet."""
        return self.method_entry.needs_shortcut(self)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


# The tiny preset trains the alignment reward with unguided tuned steps (CFG 1, and so unguided jumps of its CFG-3
# shortcut): with CFG 3 the base already sits where a small LoRA can take the alignment in minutes, while without
# CFG there is a direction every prompt shares (follow the caption more strongly) that the reward teaches (3 seeds,
# BENCHMARKS.md "Tiny world: which reward trains"). Every step then costs one UNet batch, not two. It leaves the
# last segment to the base, which measured best for its alignment reward and for a symmetry reward (5 seeds,
# BENCHMARKS.md "The last segment left to the base"); a reward decided at low noise needs last_segment "tuned".
TINY_PRESET = dict(iterations=320, batch_size=4, lr=5e-4, rank=8, guidance=1.0, real_grad_steps=1, eval_count=32,
                   last_segment="base")
TINY_REWARD = "tiny_alignment"  # the reward of the tiny model when none is given
TINY_EVAL_REWARDS = ("tiny_alignment", "tiny_aesthetic")  # measured on held-out prompts of every tiny-world run


TRAIN_PRESETS: dict[str, dict[str, Any]] = {"tiny": TINY_PRESET}
# Preset settings chosen by measurement on the tiny world that hold only there: on another model the library's own
# default stands (a reward decided at low noise, as HPS / PickScore / LAION aesthetic partly are, needs the last
# segment's LoRA; BENCHMARKS.md, "The last segment left to the base").
TINY_WORLD_ONLY = ("last_segment",)


def resolve_config(settings: Mapping[str, Any] | None = None, preset: str | None = None, *,
                   tiny: bool = True) -> TrainConfig:
    """A run's settings: TrainConfig's defaults, then ``preset``'s (its tiny-world-only ones only when the model is
    the tiny world), then ``settings``, what the user set; validated. Raises ValueError naming a bad setting."""
    base: dict[str, Any] = {}
    if preset is not None:
        if preset not in TRAIN_PRESETS:
            raise ValueError(f"unknown preset {preset!r} (--preset); known: {', '.join(TRAIN_PRESETS)}")
        base = {k: v for k, v in TRAIN_PRESETS[preset].items() if tiny or k not in TINY_WORLD_ONLY}
    values = {**base, **dict(settings or {})}
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ValueError(f"unknown training setting(s) {', '.join(unknown)}; see TrainConfig (train --help)")
    cfg = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    cfg.validate()
    return cfg


def check_settings(settings: Mapping[str, Any] | None = None, preset: str | None = None) -> None:
    """Validate settings before the model is known: they must suit the tiny world or another model (stage shares,
    for one, depend on the model's number of stages). Raises the tiny world's ValueError when neither fits."""
    try:
        resolve_config(settings, preset, tiny=True)
    except ValueError as tiny_error:
        try:
            resolve_config(settings, preset, tiny=False)
        except ValueError:
            raise tiny_error from None


def tiny_config(**overrides) -> TrainConfig:
    """The tiny preset's settings with ``overrides`` applied (validated)."""
    cfg = TrainConfig(**{**TINY_PRESET, **overrides})
    cfg.validate()
    return cfg
