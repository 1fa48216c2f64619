"""The trainer: one loop for every method (ShortFT and the baselines differ only in their chain plans).

    python -m shortft_core train --preset tiny --out runs/tiny                 # one process (CPU or one GPU)
    accelerate launch --num_processes 2 -m shortft_core train --preset tiny --out runs/tiny2   # DDP

One iteration: prompts -> frozen text encoder -> plan executed from x_T (fine-tuned steps with their adapter
set, frozen shortcut jumps) -> readout latents -> VAE decode -> reward -> loss = -reward (+ optional DRaFT+-style
penalty) -> backward into the trainable LoRA parameters -> AdamW step -> callbacks (progress, preview, metrics,
interrupt check) -> periodic atomic checkpoint. Under DDP the whole chain runs inside one wrapped module
(:class:`ChainObjective`), so every UNet call of the chain is part of the DDP forward and gradients are averaged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .adapters import SHORTCUT, AdapterSwitch, LoraSetSpec, adapter_parameters, adapter_state
from .segments import Segments
from .adapters import freeze_all_but, load_adapter_state
from .chain import run_plan
from .checkpoint import (CheckpointManager, all_finite, capture_rng, changed_settings, check_bounds, clip_gradients,
                         restore_rng, setting)
from .memory import lean_saved_activations
from .models import PRECISION, Conditioning, T2IModel
from .plans import (ChainPlan, alignprop_plan, draft_lv_plan, draft_plan, drtune_plan, full_bptt_plan,
                    original_chain, refl_plan, shortcut_model_plan, shortft_plan)
from .chain import guided_eps
from .sampling import initial_noise, sample
from .schedule import leading_grid
from .segments import check_edges

log = logging.getLogger(__name__)

METHODS = ("shortft", "draft", "draft-lv", "alignprop", "refl", "full-bptt", "drtune", "shortcut-model")


@dataclass
class TrainConfig:
    """Everything a run needs; saved in checkpoints and in the LoRA metadata."""

    method: str = setting("shortft", "training method: shortft | draft | draft-lv | alignprop | refl | full-bptt | "
                                     "drtune | shortcut-model (ablation: fine-tune on the shortcut's few-step chain)",
                          choices=METHODS)
    # ShortFT
    segments: tuple[int, ...] = setting((761, 501, 261, 0), "lower ends of the k trajectory segments on the "
                                        "50-step chain, descending, the last 0; one LoRA per segment")
    progressive: bool = setting(True, "train the segments in k stages, earliest first (ShortFT); --no-progressive "
                                      "keeps stage 1's plan throughout")
    stage_fractions: tuple[float, ...] | None = setting(None, "share of the iterations (or time budget) per stage, "
                                                              "k values summing to 1 (none: equal split)")
    real_grad_steps: int | None = setting(1, "steps with gradient inside the stage's own segment, counted from its "
                                             "end (none: all of them)", at_least=1)
    shortcut_net: str = setting("shortcut", "what jumps over the later segments: shortcut (the frozen few-step "
                                            "LoRA) | base (naive one-step DDIM jumps, ablation) | tuned (ablation)",
                                choices=("shortcut", "base", "tuned"))
    shortcut_guidance: float = setting(1.0, "CFG scale of the shortcut jumps (1: none, as Hyper-SD's 4-step LoRAs "
                                            "are made for); the train command takes the shortcut's own (its preset "
                                            "or metadata) unless given", at_least=1)
    shortcut_edges: tuple[int, ...] = setting((999, 749, 499, 249), "the shortcut's few-step grid (method "
                                                                    "shortcut-model only)")
    reset_optimizer_per_stage: bool = setting(False, "start each stage with a fresh optimizer state")
    last_anchor: str = setting("end", "where the last segment's fine-tuned step sits before stage k: end (1 -> x0, "
                                      "the paper's) | start (241 -> 221, no stage 2-3 dip); see BENCHMARKS.md",
                               choices=("end", "start"))
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
                                           "always use it)")
    checkpoint_vae: bool = setting(False, "block-wise checkpointing of the VAE decoder (its full-resolution backward)")
    offload_text_encoders: bool = setting(False, "keep the text encoders in host memory, lent to the GPU only to "
                                                 "encode a prompt not cached (SDXL: 1.5 GiB less on the GPU)")
    # sampling
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
                                         "fp32); bf16 on a GPU", choices=tuple(PRECISION))
    kl_weight: float = setting(0.0, "DRaFT+-style penalty: weight of the mean squared distance between tuned and "
                                    "base eps on the steps with gradient", at_least=0)
    seed: int = setting(0, "seed of prompts, noise and the LoRAs' initialisation")
    # bookkeeping
    checkpoint_every: int = setting(100, "iterations between checkpoints (atomic; --resume continues exactly)",
                                    at_least=1)
    keep_checkpoints: int = setting(2, "checkpoints kept on disk (older ones are deleted)", at_least=1)
    eval_prompts: int = setting(32, "held-out prompts the reward is evaluated on", at_least=0)
    eval_every: int = setting(0, "iterations between evaluations (0: before and after only)", at_least=0)
    preview_every: int = setting(0, "iterations between preview images (0: none)", at_least=0)

    def validate(self) -> None:
        """Raise on settings out of range or inconsistent, before any heavy work."""
        check_bounds(self)
        Segments(tuple(self.segments))
        if self.stage_fractions is not None:
            if len(self.stage_fractions) != len(self.segments) or abs(sum(self.stage_fractions) - 1) > 1e-6:
                raise ValueError(f"stage_fractions needs {len(self.segments)} shares summing to 1; got {self.stage_fractions}")
        check_edges(self.shortcut_edges, "shortcut_edges")

    @property
    def lora(self) -> LoraSetSpec:
        aware = self.timestep_aware and self.method == "shortft"
        return LoraSetSpec(rank=self.rank, alpha=self.alpha, timestep_aware=aware,
                           segments=Segments(tuple(self.segments)))

    @property
    def num_stages(self) -> int:
        return len(self.segments) if (self.method == "shortft" and self.progressive) else 1

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


# ----- plans per method ------------------------------------------------------------------------------------------
def method_plan(cfg: TrainConfig, stage: int, gen: torch.Generator) -> ChainPlan:
    """The chain plan of ``cfg.method`` for one iteration (random choices drawn from ``gen``)."""
    lora, g = cfg.lora, cfg.guidance
    grid = leading_grid(cfg.sample_steps)
    if cfg.method == "shortft":
        return shortft_plan(stage, lora, g, grid, cfg.real_grad_steps, cfg.shortcut_guidance, cfg.checkpoint_unet,
                            cfg.shortcut_net, cfg.last_anchor)
    if cfg.method == "draft":
        return draft_plan(cfg.draft_k, lora, g, grid, cfg.checkpoint_unet)
    if cfg.method == "draft-lv":
        return draft_lv_plan(cfg.lv_n, lora, g, grid)
    if cfg.method == "alignprop":
        return alignprop_plan(gen, lora, g, grid, cfg.alignprop_k_mean)
    if cfg.method == "refl":
        return refl_plan(gen, lora, g, cfg.refl_total)
    if cfg.method == "full-bptt":
        return full_bptt_plan(lora, g, grid, checkpoint=True)
    if cfg.method == "drtune":
        return drtune_plan(gen, lora, g, grid, cfg.drtune_trained)
    if cfg.method == "shortcut-model":
        return shortcut_model_plan(lora, cfg.shortcut_edges, grad=True, guidance=cfg.shortcut_guidance)
    raise ValueError(cfg.method)


def inference_plan(cfg: TrainConfig) -> ChainPlan:
    """How the aligned model samples: the full chain with the adapter set of each timestep's segment (or, for the
    "shortcut-model" ablation, the few-step shortcut chain it was trained on)."""
    if cfg.method == "shortcut-model":
        return shortcut_model_plan(cfg.lora, cfg.shortcut_edges, grad=False, guidance=cfg.shortcut_guidance)
    return original_chain(cfg.lora, cfg.guidance, leading_grid(cfg.sample_steps))


def stage_at(cfg: TrainConfig, progress: float) -> int:
    """Progressive stage (1-based) for a training progress in [0, 1]."""
    k = cfg.num_stages
    if k == 1:
        return 1
    shares = cfg.stage_fractions or tuple(1.0 / k for _ in range(k))
    edge = 0.0
    for i, share in enumerate(shares, start=1):
        edge += share
        if progress < edge - 1e-9:
            return i
    return k


# ----- prompts -----------------------------------------------------------------------------------------------------
class PromptSource:
    """Training prompts: a fixed list drawn with replacement from a seeded generator (same on every rank)."""

    def __init__(self, prompts: Sequence[str], exclude: Sequence[str] = ()) -> None:
        drop = set(exclude)
        self.prompts = [p for p in prompts if p not in drop]
        if not self.prompts:
            raise ValueError("no training prompts left (after removing the evaluation prompts)")

    def draw(self, n: int, gen: torch.Generator) -> list[str]:
        idx = torch.randint(0, len(self.prompts), (n,), generator=gen).tolist()
        return [self.prompts[i] for i in idx]

    @classmethod
    def tiny(cls, n: int = 4000, seed: int = 0, exclude: Sequence[str] = ()) -> "PromptSource":
        """Tiny-world captions from every composition (held-out pairs included), minus the evaluation prompts."""
        from .tiny_world import scenes

        caps = sorted({scenes.sample_scene(seed + 9000, i, "any").caption for i in range(n)})
        return cls(caps, exclude)

    @classmethod
    def from_file(cls, path: str | os.PathLike, exclude: Sequence[str] = ()) -> "PromptSource":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"prompt file {p} not found")
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
        return cls([ln for ln in lines if ln and not ln.startswith("#")], exclude)


# ----- the objective (one DDP forward = one whole chain) ---------------------------------------------------------
class ChainObjective(torch.nn.Module):
    """Runs a plan, decodes its readouts and scores them: ``forward -> (loss, metrics)``.

    Wrapping this module in DDP puts every UNet call of the chain inside one DDP forward; the UNet is a submodule,
    so its trainable LoRA parameters are the ones DDP averages.
    """

    def __init__(self, model: T2IModel, reward: Callable, kl_weight: float = 0.0) -> None:
        super().__init__()
        self.unet = model.unet
        self.model = model
        self.reward_fn = reward
        self.kl_weight = kl_weight
        self.switch = AdapterSwitch(model.unet)

    def forward(self, plan: ChainPlan, x: torch.Tensor, cond: Conditioning, uncond: Conditioning | None,
                prompts: list[str], generator: torch.Generator | None = None):
        penalties: list[torch.Tensor] = []
        on_eps = None
        if self.kl_weight > 0:
            def on_eps(step, x_in, eps):  # DRaFT+-style: keep tuned eps near the frozen base on gradient steps
                if step.grad and step.net == "tuned":
                    with torch.no_grad(), self.switch.using(()):
                        base = guided_eps(self.model, x_in, step.t, cond, uncond if step.guidance != 1 else None,
                                          step.guidance)
                    penalties.append((eps - base).float().pow(2).mean())
        readouts = run_plan(self.model, plan, x, cond, uncond, self.switch, unet=self.unet, generator=generator,
                            on_eps=on_eps)
        rewards = [self.reward_fn(self.model.decode(z), prompts) for z in readouts]
        reward = torch.stack(rewards).mean(0)  # (B,), averaged over readouts (DRaFT-LV has several)
        loss = -reward.mean()
        metrics = {"reward": reward.detach()}
        if penalties:
            kl = torch.stack(penalties).mean()
            loss = loss + self.kl_weight * kl
            metrics["kl"] = kl.detach()
        return loss, metrics


# ----- callbacks ---------------------------------------------------------------------------------------------------
class Callback:
    """Hooks the trainer calls; the ComfyUI node and the CLI implement them (progress, previews, interrupt)."""

    def on_start(self, trainer: "Trainer") -> None: ...
    def on_step(self, trainer: "Trainer", metrics: dict) -> None: ...
    def on_eval(self, trainer: "Trainer", result: dict) -> None: ...
    def on_preview(self, trainer: "Trainer", images: torch.Tensor, prompts: list[str]) -> None: ...
    def should_stop(self, trainer: "Trainer") -> bool:
        return False
    def on_end(self, trainer: "Trainer") -> None: ...


@dataclass
class History:
    iterations: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    reward: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    stage: list[int] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)


# ----- the trainer -------------------------------------------------------------------------------------------------
class Trainer:
    """Owns adapters, optimizer, schedule, accelerator and the loop."""

    def __init__(self, model: T2IModel, reward: Callable, cfg: TrainConfig, prompts: PromptSource,
                 eval_prompts: Sequence[str] = (), out: str | os.PathLike | None = None,
                 callbacks: Sequence[Callback] = (), accelerator=None, eval_reward: dict[str, Callable] | None = None,
                 shortcut_preset=None) -> None:
        cfg.validate()
        if shortcut_preset is not None:  # every planned jump must stay inside a segment the shortcut was trained for
            for stage in range(1, cfg.num_stages + 1):
                for st in method_plan(cfg, stage, torch.Generator().manual_seed(0)).steps:
                    if st.net == "shortcut":
                        shortcut_preset.check_jump(st.t, st.s)
        from accelerate import Accelerator

        self.cfg, self.model, self.reward, self.prompts = cfg, model, reward, prompts
        self.eval_prompts = list(eval_prompts)
        self.eval_rewards = eval_reward or {"reward": reward}
        self.out = Path(out) if out is not None else None
        self.callbacks = list(callbacks)
        self.acc = accelerator or Accelerator(cpu=model.device.type == "cpu")
        self.lora = cfg.lora
        unet = model.unet
        needs_shortcut = cfg.method == "shortcut-model" or (cfg.method == "shortft" and cfg.shortcut_net == "shortcut")
        if needs_shortcut and SHORTCUT not in getattr(unet, "peft_config", {}):
            raise ValueError("ShortFT needs the frozen shortcut adapter on the UNet: load one "
                             "(shortft_core.lora_io / --shortcut), or use --shortcut-net base for naive DDIM jumps")
        existing = set(getattr(unet, "peft_config", {}))
        clash = existing & set(self.lora.names)
        if clash:
            raise ValueError(f"the UNet already carries adapters {sorted(clash)}; start from a fresh model")
        self.lora.add_to(unet, seed=cfg.seed)
        self.all_params = {n: adapter_parameters(unet, n) for n in self.lora.names}  # fp32 (add_lora)
        if cfg.checkpoint_vae:  # the decoder's up blocks are recomputed in backward, one at a time
            model.vae.enable_gradient_checkpointing()
        if cfg.offload_text_encoders:
            model.offload_text_encoders()
        # on CUDA, frozen convolutions keep only their weight and GEGLUs recompute their GELU in backward: same
        # gradients, less activation memory (BENCHMARKS.md, "Frozen convolutions keep only their weight")
        lean_saved_activations(unet, model.vae)
        self.objective = ChainObjective(model, reward, cfg.kl_weight)
        self.switch = self.objective.switch
        self.switch.refresh()
        params = [p for ps in self.all_params.values() for p in ps]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.iteration = 0
        self.stage = 0
        self.elapsed = 0.0
        self.skipped = 0
        self.history = History()
        self.wrapped: torch.nn.Module | None = None
        self.last_plan: ChainPlan | None = None
        self.ckpt = CheckpointManager(self.out / "checkpoints", cfg.keep_checkpoints) if self.out else None
        self.empty = model.encode_prompts([""])

    # ---- schedule ----
    def _lr_factor(self, step: int) -> float:
        cfg = self.cfg
        warm = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup > 0 else 1.0
        if cfg.lr_schedule == "cosine":
            return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, cfg.iterations)))))
        return warm

    def progress(self) -> float:
        cfg = self.cfg
        if cfg.time_budget_s:
            return min(1.0, self.elapsed / cfg.time_budget_s)
        return self.iteration / cfg.iterations

    def finished(self) -> bool:
        """Iterations done, or the time budget spent on any rank (called by every rank at the same point)."""
        cfg = self.cfg
        if cfg.time_budget_s:
            return self._on_any_rank(self.elapsed >= cfg.time_budget_s)
        return self.iteration >= cfg.iterations

    def _on_any_rank(self, flag: bool) -> bool:
        """``flag`` or'ed over the processes: a time budget or a stop request (Ctrl-C reaches each rank at its own
        moment) must end every rank at the same iteration, or the others wait forever in the next all-reduce."""
        if self.acc.num_processes == 1:
            return flag
        votes = self.acc.gather(torch.tensor([1.0 if flag else 0.0], device=self.acc.device))
        return bool(votes.max() > 0)

    def _enter_stage(self, stage: int) -> None:
        """Freeze everything but the stage's trainable adapters and (re)wrap the objective for DDP."""
        trainable = self.lora.trainable_in_stage(stage) if self.cfg.method == "shortft" else self.lora.names
        freeze_all_but(self.model.unet, trainable)
        if self.cfg.reset_optimizer_per_stage and self.stage:
            self.opt.state.clear()
        self.wrapped = self.acc.prepare_model(self.objective) if self.acc.num_processes > 1 else self.objective
        self.stage = stage
        log.info("stage %d: training %s", stage, ", ".join(trainable))

    # ---- one iteration ----
    def _batch(self) -> tuple[list[str], torch.Tensor]:
        """This rank's share of the global batch; drawn from the shared generator so every rank agrees."""
        cfg, acc = self.cfg, self.acc
        n = cfg.batch_size * acc.num_processes
        prompts = self.prompts.draw(n, self.gen)
        seeds = torch.randint(0, 2**31 - 1, (n,), generator=self.gen).tolist()
        lo, hi = acc.process_index * cfg.batch_size, (acc.process_index + 1) * cfg.batch_size
        m = self.model
        return prompts[lo:hi], initial_noise(seeds[lo:hi], m.latent_shape(), m.device, m.dtype)

    def train_step(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        stage = stage_at(cfg, self.progress())
        if stage != self.stage:
            self._enter_stage(stage)
        self.model.unet.train()
        self.opt.zero_grad(set_to_none=True)
        rewards, losses, plan = [], [], None
        for micro in range(cfg.grad_accum):
            plan = method_plan(cfg, stage, self.gen)
            prompts, x = self._batch()
            cond = self.model.encode_prompts(prompts)
            uncond = self.empty.repeat(len(prompts)) if plan.needs_uncond else None  # not only cfg.guidance
            ctx = self.acc.no_sync(self.wrapped) if (micro < cfg.grad_accum - 1 and self.acc.num_processes > 1) \
                else _null()
            with ctx:
                loss, metrics = self.wrapped(plan, x, cond, uncond, prompts, self.gen)
                (loss / cfg.grad_accum).backward()
            rewards.append(metrics["reward"].float().mean())
            losses.append(loss.detach().float())
        self.last_plan = plan
        params = [p for p in self.opt.param_groups[0]["params"] if p.requires_grad]
        grads = [p.grad for p in params]
        finite = bool(torch.isfinite(torch.stack(losses)).all()) and all_finite(grads)
        grad_norm = float("nan")
        if finite:
            grad_norm = clip_gradients(params, cfg.grad_clip)
            self.opt.step()
        else:
            self.skipped += 1
            log.warning("iteration %d: non-finite loss or gradient; update skipped (%d so far)", self.iteration, self.skipped)
            if self.skipped > 20:
                raise FloatingPointError("more than 20 non-finite iterations: lower the learning rate; "
                                         "the last checkpoint is intact")
        self.sched.step()
        self.iteration += 1
        self.elapsed += time.perf_counter() - t0
        reward = float(torch.stack(rewards).mean())
        metrics = {"iteration": self.iteration, "stage": stage, "reward": reward, "loss": float(torch.stack(losses).mean()),
                   "grad_norm": grad_norm, "lr": self.sched.get_last_lr()[0], "seconds": self.elapsed,
                   "plan": plan.method if plan else ""}
        h = self.history
        h.iterations.append(self.iteration)
        h.seconds.append(self.elapsed)
        h.reward.append(reward)
        h.loss.append(metrics["loss"])
        h.stage.append(stage)
        return metrics

    # ---- evaluation ----
    @torch.no_grad()
    def evaluate(self, prompts: Sequence[str] | None = None, seed: int = 12345) -> dict:
        """Mean of every evaluation reward on the 50-step inference chain (adapters switched per timestep)."""
        prompts = list(prompts if prompts is not None else self.eval_prompts)
        if not prompts:
            return {}
        images = self.sample(prompts, seed=seed)
        out = {}
        for name, fn in self.eval_rewards.items():
            r = fn(images.to(self.model.device), prompts).float()
            out[name] = float(r.mean())
            out[name + "_std"] = float(r.std()) if len(prompts) > 1 else 0.0
        return out

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seed: int = 0, use_adapters: bool = True) -> torch.Tensor:
        """Images of the aligned model (or of the base when ``use_adapters`` is False) on the inference chain."""
        self.model.unet.eval()
        plan = inference_plan(self.cfg) if use_adapters else None
        self.switch.activate(())
        return sample(self.model, prompts, seed=seed, steps=self.cfg.sample_steps, guidance=self.cfg.guidance,
                      batch_size=32, plan=plan, switch=self.switch).float()

    def save_lora_set(self, folder: str | os.PathLike, overwrite: bool = False) -> list[Path]:
        """Export the alignment set (segment LoRAs, merged LoRA, set.json); see :mod:`shortft_core.lora_set`."""
        from .lora_set import export_lora_set

        meta = {"train_config": self.cfg.to_dict(), "base": self.model.source, "iterations": self.iteration,
                "plan_stage1": method_plan(self.cfg, 1, torch.Generator().manual_seed(0)).to_dict(),
                "guidance": self.cfg.guidance}
        return export_lora_set(self.model.unet, self.lora, folder, family=self.model.family, metadata=meta,
                               overwrite=overwrite)

    # ---- checkpoints ----
    def state(self) -> dict:
        return {"adapters": {n: adapter_state(self.model.unet, n) for n in self.lora.names},
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "rng": capture_rng({"train": self.gen}), "iteration": self.iteration, "stage": self.stage,
                "elapsed": self.elapsed, "skipped": self.skipped, "config": json.dumps(self.cfg.to_dict()),
                "history": json.dumps(dataclasses.asdict(self.history))}

    def save_checkpoint(self) -> Path | None:
        if self.ckpt is None or not self.acc.is_main_process:
            return None
        for ps in self.all_params.values():
            if not all_finite(ps):
                raise FloatingPointError("adapter weights are not finite; refusing to overwrite the last checkpoint")
        return self.ckpt.save(self.iteration, self.state())

    def resume(self) -> bool:
        """Continue from the newest checkpoint in ``out`` (if any) exactly where it stopped."""
        if self.ckpt is None:
            return False
        path = self.ckpt.latest()
        if path is None:
            return False
        st = CheckpointManager.load(path)
        diff = changed_settings(st["config"], self.cfg, ("iterations", "checkpoint_every", "keep_checkpoints",
                                                         "eval_every", "preview_every", "time_budget_s"))
        if diff:
            raise ValueError(f"cannot resume from {path}: settings differ in {diff}; use the same settings or a new --out")
        for n in self.lora.names:
            load_adapter_state(self.model.unet, n, st["adapters"][n])
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        restore_rng(st["rng"], {"train": self.gen})
        self.iteration, self.elapsed, self.skipped = st["iteration"], st["elapsed"], st["skipped"]
        self.history = History(**json.loads(st["history"]))
        if st["stage"]:
            self._enter_stage(st["stage"])
        log.info("resumed from %s at iteration %d (stage %d)", path, self.iteration, self.stage)
        return True

    # ---- the loop ----
    def fit(self) -> History:
        cfg = self.cfg
        for cb in self.callbacks:
            cb.on_start(self)
        if self.eval_prompts and not self.history.evals:
            self._eval_and_record()
        while not self.finished():
            if self._on_any_rank(any([cb.should_stop(self) for cb in self.callbacks])):
                log.info("stopped on request at iteration %d", self.iteration)
                break
            metrics = self.train_step()
            for cb in self.callbacks:
                cb.on_step(self, metrics)
            if cfg.preview_every and self.iteration % cfg.preview_every == 0:
                prompts = self.eval_prompts[:4] or self.prompts.prompts[:4]
                images = self.sample(prompts, seed=0)
                for cb in self.callbacks:
                    cb.on_preview(self, images, prompts)
            if cfg.eval_every and self.iteration % cfg.eval_every == 0 and self.eval_prompts:
                self._eval_and_record()
            if self.ckpt is not None and self.iteration % cfg.checkpoint_every == 0:
                self.save_checkpoint()
        if self.eval_prompts and (not self.history.evals or self.history.evals[-1]["iteration"] != self.iteration):
            self._eval_and_record()
        if self.ckpt is not None and self.iteration % cfg.checkpoint_every != 0:
            self.save_checkpoint()
        for cb in self.callbacks:
            cb.on_end(self)
        return self.history

    def _eval_and_record(self) -> None:
        result = {"iteration": self.iteration, "seconds": self.elapsed, **self.evaluate()}
        self.history.evals.append(result)
        for cb in self.callbacks:
            cb.on_eval(self, result)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
