"""The method registry: ShortFT and every baseline as one entry each, so nothing else tests method names.

An entry knows how to build its chain plan for a training stage, how many progressive stages it has, whether it
needs the frozen shortcut adapter, whether its LoRA set is timestep-aware, how the aligned model samples (its
inference plan) and which settings are its own. The trainer, the session, the command line and the profiler ask
the entry; adding a method is one entry here plus its plan builder in :mod:`shortft_core.plans` and tests.

Entries read a training config (:class:`shortft_core.config.TrainConfig`) by attribute; this module does not
import it, so the config can list the registry's names as its choices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .adapters import LoraSetSpec
from .plans import (ChainPlan, alignprop_plan, draft_lv_plan, draft_plan, drtune_plan, full_bptt_plan,
                    original_chain, refl_plan, shortcut_model_plan, shortft_plan)
from .schedule import leading_grid
from .segments import Segments

PlanBuilder = Callable[[Any, LoraSetSpec, int, torch.Generator], ChainPlan]


@dataclass(frozen=True)
class Method:
    """One training method: its plan per stage, its stages, its shortcut needs, its inference plan, its options."""

    name: str
    summary: str
    build: PlanBuilder  # (cfg, lora, stage, generator) -> the plan of one iteration
    options: tuple[str, ...] = ()  # the config settings only this method reads
    progressive: bool = False  # k stages (one per segment) when the config's ``progressive`` is on
    timestep_aware: bool = False  # one LoRA per segment when the config's ``timestep_aware`` is on
    shortcut: Callable[[Any], bool] = lambda cfg: False  # whether a run with ``cfg`` needs the shortcut adapter
    sampling: Callable[[Any, LoraSetSpec], ChainPlan] | None = None  # inference plan (None: the full chain)
    jumps_stand_in: bool = False  # its shortcut jumps stand in for the tuned chain (not the sampler themselves)

    def stages(self, cfg: Any) -> int:
        """Number of progressive stages of a run."""
        return self.lora(cfg).tuned_segments if (self.progressive and cfg.progressive) else 1

    def needs_shortcut(self, cfg: Any) -> bool:
        return bool(self.shortcut(cfg))

    def jump_guidance(self, cfg: Any, made_for: float) -> float:
        """The CFG of the shortcut's jumps when none is given, for a shortcut made for ``made_for``: that scale, but
        where the jumps stand in for the tuned chain never above the tuned steps' CFG, so a set meant to be sampled
        unguided trains through unguided jumps, on the ODE it will sample (BENCHMARKS.md, "The CFG-1 main job with
        a CFG-consistent shortcut")."""
        return min(made_for, cfg.guidance) if self.jumps_stand_in else made_for

    def lora(self, cfg: Any) -> LoraSetSpec:
        """The alignment LoRA set a run trains: timestep-aware (one per segment) or a single LoRA."""
        return LoraSetSpec(rank=cfg.rank, alpha=cfg.alpha, timestep_aware=self.timestep_aware and cfg.timestep_aware,
                           segments=Segments(tuple(cfg.segments)),
                           last_segment=cfg.last_segment if "last_segment" in self.options else "tuned")

    def plan(self, cfg: Any, stage: int, gen: torch.Generator) -> ChainPlan:
        """The chain plan of one iteration in ``stage`` (random choices drawn from ``gen``)."""
        return self.build(cfg, self.lora(cfg), stage, gen)

    def inference_plan(self, cfg: Any) -> ChainPlan:
        """How the aligned model samples."""
        lora = self.lora(cfg)
        if self.sampling is not None:
            return self.sampling(cfg, lora)
        return original_chain(lora, cfg.guidance, leading_grid(cfg.sample_steps))


def _grid(cfg: Any) -> list[int]:
    return leading_grid(cfg.sample_steps)


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("shortft", "ShortFT: the fine-tuned chain with frozen shortcut jumps over later segments, trained in "
                      "progressive stages with timestep-aware LoRAs",
           lambda cfg, lora, stage, gen: shortft_plan(stage, lora, cfg.guidance, _grid(cfg), cfg.real_grad_steps,
                                                      cfg.shortcut_guidance, cfg.checkpoint_calls, cfg.shortcut_net,
                                                      cfg.last_anchor),
           options=("segments", "progressive", "stage_fractions", "real_grad_steps", "shortcut_net",
                    "shortcut_guidance", "reset_optimizer_per_stage", "unrun_lr_scale", "last_anchor",
                    "timestep_aware", "last_segment"),
           progressive=True, timestep_aware=True, shortcut=lambda cfg: cfg.shortcut_net == "shortcut",
           jumps_stand_in=True),
    Method("draft", "DRaFT-K: gradient through the last K sampling steps",
           lambda cfg, lora, stage, gen: draft_plan(cfg.draft_k, lora, cfg.guidance, _grid(cfg), cfg.checkpoint_calls),
           options=("draft_k",)),
    Method("draft-lv", "DRaFT-LV: the last step re-noised and taken n times with gradient, averaged",
           lambda cfg, lora, stage, gen: draft_lv_plan(cfg.lv_n, lora, cfg.guidance, _grid(cfg)),
           options=("lv_n",)),
    Method("alignprop", "AlignProp: every step checkpointed, gradient through the last K steps (K drawn per batch)",
           lambda cfg, lora, stage, gen: alignprop_plan(gen, lora, cfg.guidance, _grid(cfg), cfg.alignprop_k_mean),
           options=("alignprop_k_mean",)),
    Method("refl", "ReFL: one gradient step at a random late step, reward on its predicted x0",
           lambda cfg, lora, stage, gen: refl_plan(gen, lora, cfg.guidance, cfg.refl_total),
           options=("refl_total",)),
    Method("full-bptt", "full backpropagation through every sampling step (checkpointed): the expensive reference",
           lambda cfg, lora, stage, gen: full_bptt_plan(lora, cfg.guidance, _grid(cfg), checkpoint=True)),
    Method("drtune", "DRTune: stop-gradient denoiser inputs, a few evenly spaced trained steps, early exit",
           lambda cfg, lora, stage, gen: drtune_plan(gen, lora, cfg.guidance, _grid(cfg), cfg.drtune_trained),
           options=("drtune_trained",)),
    Method("shortcut-model", "ablation: fine-tune on the shortcut's own few-step chain instead of the base's",
           lambda cfg, lora, stage, gen: shortcut_model_plan(lora, cfg.shortcut_edges, grad=True,
                                                             guidance=cfg.shortcut_guidance),
           options=("shortcut_edges", "shortcut_guidance"), shortcut=lambda cfg: True,
           sampling=lambda cfg, lora: shortcut_model_plan(lora, cfg.shortcut_edges, grad=False,
                                                          guidance=cfg.shortcut_guidance)),
]}


def get_method(name: str) -> Method:
    """A registry entry by name; the ValueError lists the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r} (--method); known: {', '.join(METHODS)}") from None


def method_plan(cfg: Any, stage: int, gen: torch.Generator) -> ChainPlan:
    """The chain plan of ``cfg.method`` for one iteration of ``stage``."""
    return get_method(cfg.method).plan(cfg, stage, gen)


def inference_plan(cfg: Any) -> ChainPlan:
    """How the model aligned by ``cfg`` samples."""
    return get_method(cfg.method).inference_plan(cfg)


def stage_at(cfg: Any, progress: float) -> int:
    """Progressive stage (1-based) for a training progress in [0, 1]."""
    k = get_method(cfg.method).stages(cfg)
    if k == 1:
        return 1
    shares = cfg.stage_fractions or tuple(1.0 / k for _ in range(k))
    edge = 0.0
    for i, share in enumerate(shares, start=1):
        edge += share
        if progress < edge - 1e-9:
            return i
    return k
