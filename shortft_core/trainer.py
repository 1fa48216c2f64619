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

import contextlib
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .adapters import AdapterSwitch, adapter_parameters, adapter_state, freeze_all_but, load_adapter_state
from .chain import guided_eps, run_plan
from .checkpoint import CheckpointManager
from .config import TrainConfig
from .loop import Callback, Loop, StopRequested, all_finite, processes
from .methods import inference_plan, method_plan, stage_at
from .models import Conditioning, DiffusionModel
from .plans import ChainPlan
from .prompts import PromptSource
from .sampling import initial_noise, sample

log = logging.getLogger(__name__)

__all__ = ["ChainObjective", "History", "Trainer"]


# ----- the objective (one DDP forward = one whole chain) ---------------------------------------------------------
class ChainObjective(torch.nn.Module):
    """Runs a plan, decodes its readouts and scores them: ``forward -> (loss, metrics)``.

    Wrapping this module in DDP puts every UNet call of the chain inside one DDP forward; the UNet is a submodule,
    so its trainable LoRA parameters are the ones DDP averages.
    """

    def __init__(self, model: DiffusionModel, reward: Callable, kl_weight: float = 0.0) -> None:
        super().__init__()
        self.unet = model.unet
        self.model = model
        self.reward_fn = reward
        self.kl_weight = kl_weight
        self.switch = AdapterSwitch(model.unet)

    def forward(self, plan: ChainPlan, x: torch.Tensor, cond: Conditioning, uncond: Conditioning | None,
                prompts: list[str], generator: torch.Generator | None = None, hook=None):
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
                            on_eps=on_eps, hook=hook)
        texts = self.model.reward_prompts(prompts)
        rewards = [self.reward_fn(self.model.decode(z), texts) for z in readouts]
        reward = torch.stack(rewards).mean(0)  # (B,), averaged over readouts (DRaFT-LV has several)
        loss = -reward.mean()
        metrics = {"reward": reward.detach()}
        if penalties:
            kl = torch.stack(penalties).mean()
            loss = loss + self.kl_weight * kl
            metrics["kl"] = kl.detach()
        return loss, metrics


@dataclass
class History:
    """Per iteration: its number, seconds of training so far, batch reward, loss and stage; ``evals`` holds the
    held-out evaluations (iteration, seconds and the mean and std of every evaluation reward)."""

    iterations: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    reward: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    stage: list[int] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)




# ----- the trainer -------------------------------------------------------------------------------------------------
class Trainer(Loop):
    """Reward fine-tuning of one model by any method: owns the alignment adapters, the optimizer and the loop.

    It changes the model it is given (adds the adapters, freezes and patches layers) and leaves it so; the
    training session (:mod:`shortft_core.session`) records the model's state first and restores it afterwards.
    """

    # what a continued run may change: its length and reporting, and how memory is spent (checkpointing and the text
    # encoders' placement give the same values, so a run that ran out of memory continues with them on)
    resume_may_change = ("iterations", "checkpoint_every", "keep_checkpoints", "eval_every", "preview_every",
                         "preview_chain", "time_budget_s", "checkpoint_unet", "checkpoint_blocks", "checkpoint_vae",
                         "offload_text_encoders")

    def __init__(self, model: DiffusionModel, reward: Callable, cfg: TrainConfig, prompts: PromptSource,
                 eval_prompts: Sequence[str] = (), out: str | os.PathLike | None = None,
                 callbacks: Sequence[Callback] = (), accelerator=None, eval_reward: dict[str, Callable] | None = None,
                 shortcut_preset=None, eval_plan: ChainPlan | None = None) -> None:
        cfg.validate()
        if shortcut_preset is not None:  # every planned jump must stay inside a segment the shortcut was trained for
            for stage in range(1, cfg.num_stages + 1):
                for st in method_plan(cfg, stage, torch.Generator().manual_seed(0)).steps:
                    if st.net == "shortcut":
                        shortcut_preset.check_jump(st.t, st.s)
        from .adapters import SHORTCUT_ADAPTER

        unet = model.unet
        if cfg.needs_shortcut and SHORTCUT_ADAPTER not in getattr(unet, "peft_config", {}):
            raise ValueError(f"method {cfg.method} needs the frozen shortcut adapter on the UNet: load one "
                             "(shortft_core.shortcut.load_shortcut / --shortcut), or use --shortcut-net base for "
                             "naive DDIM jumps")
        self.lora = cfg.lora
        if model.lora_targets is not None:  # a network with other layer names than the UNet's (a transformer)
            self.lora = dataclasses.replace(self.lora, targets=tuple(model.lora_targets))
        clash = set(getattr(unet, "peft_config", {})) & set(self.lora.names)
        if clash:
            raise ValueError(f"the UNet already carries adapters {sorted(clash)}; start from a fresh model")
        self.cfg, self.model, self.reward, self.prompts = cfg, model, reward, prompts
        self.eval_prompts = list(eval_prompts)
        self.eval_rewards = eval_reward or {"reward": reward}
        self.out = Path(out) if out is not None else None
        self.lora.add_to(unet, seed=cfg.seed, order=model.adapter_order)
        # the gradient passes through the VAE's decoder but trains none of its weights: a host's VAE may come with
        # trainable parameters (ComfyUI's does), whose weight gradients would cost backward time, the inputs kept
        # for them, and a .grad per weight (the session's ModelState gives the flags back)
        model.vae.requires_grad_(False)
        self.all_params = {n: adapter_parameters(unet, n) for n in self.lora.names}  # fp32 (add_lora)
        if cfg.checkpoint_vae:  # the decoder's up blocks are recomputed in backward, one at a time
            model.enable_decoder_checkpointing()
        if cfg.checkpoint_blocks:  # a checkpointed call's recomputation keeps its blocks' inputs only
            log.info("ShortFT: %d blocks of the network recomputed in backward", model.enable_block_checkpointing())
        if cfg.offload_text_encoders:
            model.offload_text_encoders()
        # on CUDA, frozen convolutions keep only their weight, GEGLUs recompute their GELU and GroupNorm+SiLU pairs
        # their output in backward: same gradients, less activation memory (BENCHMARKS.md, "Frozen convolutions
        # keep only their weight")
        model.enable_lean_activations()
        self.objective = ChainObjective(model, reward, cfg.kl_weight)
        self.switch = self.objective.switch
        self.switch.refresh()
        # one optimizer group per adapter when stages damp the LoRAs of segments not yet run for real (one group
        # otherwise, so checkpoints of either kind keep loading)
        self._damped = cfg.unrun_lr_scale != 1.0 and cfg.num_stages > 1 and self.lora.timestep_aware
        params = ([{"params": ps, "adapter": n} for n, ps in self.all_params.items()] if self._damped
                  else [p for ps in self.all_params.values() for p in ps])
        super().__init__(params, lr=cfg.lr,
                         weight_decay=cfg.weight_decay, warmup=cfg.warmup, total=cfg.iterations,
                         schedule=cfg.lr_schedule, grad_clip=cfg.grad_clip, seed=cfg.seed, config=cfg,
                         checkpoints=CheckpointManager(self.out / "checkpoints", cfg.keep_checkpoints)
                         if self.out else None, callbacks=callbacks, procs=processes(model.device, accelerator),
                         loss_scaling=model.fp16_backward)
        self.stage = 0
        self.history = History()
        self.wrapped: torch.nn.Module | None = None
        self.last_plan: ChainPlan | None = None
        self.eval_plan = eval_plan  # the chain every evaluation samples (None: the inference chain)
        self.size = (cfg.image_size, cfg.image_size) if cfg.image_size else None  # (h, w); None: native
        self.latent_shape = model.latent_shape(*self.size) if self.size else model.latent_shape()  # checks the size
        self.empty = model.encode_prompts([""], size=self.size)

    # ---- schedule ----
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

    def _enter_stage(self, stage: int) -> None:
        """Freeze everything but what the stage's plan trains and (re)wrap the objective for DDP."""
        trainable = sorted(method_plan(self.cfg, stage, torch.Generator().manual_seed(0)).trainable_adapters())
        freeze_all_but(self.model.unet, trainable)
        if self.cfg.reset_optimizer_per_stage and self.stage:
            self.opt.state.clear()
        if self._damped:  # segment j's LoRA (align_j) is run for real from stage j on
            later = set(self.lora.names[stage:])
            for i, g in enumerate(self.opt.param_groups):
                self.sched.base_lrs[i] = self.cfg.lr * (self.cfg.unrun_lr_scale if g["adapter"] in later else 1.0)
                g["lr"] = self.sched.base_lrs[i] * self.sched.lr_lambdas[i](self.sched.last_epoch)
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
        return prompts[lo:hi], initial_noise(seeds[lo:hi], self.latent_shape, m.device, m.latent_dtype)

    def _chain_hook(self, plan: ChainPlan, micro: int):
        """After every network call of the chain: a progress event and a stop poll; the latent it returns also
        polls in backward, so a stop is honoured within one network call either way."""
        calls = plan.network_calls * self.cfg.grad_accum
        done = micro * plan.network_calls

        def poll(grad: torch.Tensor) -> torch.Tensor:
            self.poll_stop()
            return grad

        def hook(i: int, step, x: torch.Tensor) -> None:
            if step.calls_network:
                self.progress_event({"phase": "train", "call": done + sum(s.calls_network for s in plan.steps[:i + 1]),
                                     "calls": calls, "iteration": self.iteration})
            self.poll_stop()
            if x.requires_grad:
                x.register_hook(poll)
        return hook

    def train_step(self) -> dict:
        cfg = self.cfg
        stage = stage_at(cfg, self.progress())
        if stage != self.stage:
            self._enter_stage(stage)
        self.model.unet.train()
        self.opt.zero_grad(set_to_none=True)
        rewards, losses, plan = [], [], None
        for micro in range(cfg.grad_accum):
            plan = method_plan(cfg, stage, self.gen)
            prompts, x = self._batch()
            cond = self.model.encode_prompts(prompts, size=self.size)
            uncond = self.empty.repeat(len(prompts)) if plan.needs_uncond else None  # not only cfg.guidance
            ctx = self.acc.no_sync(self.wrapped) if (micro < cfg.grad_accum - 1 and self.acc.num_processes > 1) \
                else contextlib.nullcontext()
            with ctx:
                loss, metrics = self.wrapped(plan, x, cond, uncond, prompts, self.gen, self._chain_hook(plan, micro))
                self.loss_scale.scale(loss / cfg.grad_accum).backward()
            rewards.append(metrics["reward"].float().mean())
            losses.append(loss.detach().float())
        self.last_plan = plan
        grad_norm = self.apply_gradients(bool(torch.isfinite(torch.stack(losses)).all()))
        reward = float(torch.stack(rewards).mean())
        metrics = {"iteration": self.iteration, "stage": stage, "reward": reward,
                   "loss": float(torch.stack(losses).mean()), "grad_norm": grad_norm,
                   "lr": self.sched.get_last_lr()[0], "plan": plan.method if plan else ""}
        return metrics

    def after_step(self, metrics: dict) -> None:
        cfg, h = self.cfg, self.history
        h.iterations.append(self.iteration)
        h.seconds.append(self.elapsed)
        h.reward.append(metrics["reward"])
        h.loss.append(metrics["loss"])
        h.stage.append(metrics["stage"])
        if cfg.preview_every and self.iteration % cfg.preview_every == 0:
            self.preview()
        if cfg.eval_every and self.iteration % cfg.eval_every == 0 and self.eval_prompts:
            self.record_evaluation()

    # ---- evaluation ----
    @torch.no_grad()
    def evaluate(self, prompts: Sequence[str] | None = None, seed: int = 12345, phase: str = "eval",
                 plan: ChainPlan | None = None) -> dict:
        """Mean and std of every evaluation reward on the inference chain (adapters switched per timestep), or on
        ``plan``, else the trainer's ``eval_plan`` (e.g. a partial run's stage chain)."""
        prompts = list(prompts if prompts is not None else self.eval_prompts)
        if not prompts:
            return {}
        images = self.sample(prompts, seed=seed, phase=phase, plan=plan if plan is not None else self.eval_plan)
        out, texts = {}, self.model.reward_prompts(prompts)
        for name, fn in self.eval_rewards.items():
            r = fn(images.to(self.model.device), texts).float()
            out[name] = float(r.mean())
            out[name + "_std"] = float(r.std()) if len(prompts) > 1 else 0.0
        return out

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seed: int = 0, use_adapters: bool = True, phase: str = "sample",
               plan: ChainPlan | None = None) -> torch.Tensor:
        """Images of the aligned model (or of the base when ``use_adapters`` is False) on the inference chain, or
        on ``plan``; reports progress per network call and honours a stop request within one."""
        self.model.unet.eval()
        if plan is None and use_adapters:
            plan = inference_plan(self.cfg)
        self.switch.activate(())
        batch = 32
        chunks = -(-len(prompts) // batch)
        per_chunk = plan.network_calls if plan is not None else self.cfg.sample_steps
        calls, done = per_chunk * chunks, [0]

        def hook(i: int, step, x: torch.Tensor) -> None:
            if step.calls_network:
                done[0] += 1
                self.progress_event({"phase": phase, "call": done[0], "calls": calls, "iteration": self.iteration})
            self.poll_stop()

        height, width = self.size or (None, None)
        return sample(self.model, prompts, seed=seed, steps=self.cfg.sample_steps, guidance=self.cfg.guidance,
                      height=height, width=width, batch_size=batch, plan=plan, switch=self.switch,
                      callback=hook).float()

    def preview_plan(self) -> ChainPlan | None:
        """The preview chain: the inference chain (None), or with ``preview_chain='shortcut'`` and a shortcut on the
        UNet, its few jumps with the aligned set stacked (:func:`~shortft_core.plans.shortcut_preview_plan`)."""
        from .adapters import SHORTCUT_ADAPTER
        from .plans import shortcut_preview_plan

        if self.cfg.preview_chain != "shortcut" or SHORTCUT_ADAPTER not in (getattr(self.model.unet, "peft_config", {}) or {}):
            return None
        preset = self.model.info.get("shortcut_preset")
        edges = preset.timesteps if preset is not None and preset.segmented else self.cfg.shortcut_edges
        guidance = preset.guidance if preset is not None else self.cfg.shortcut_guidance  # the scale it was made for
        return shortcut_preview_plan(self.lora, edges, guidance)

    def preview(self, prompts: Sequence[str] | None = None) -> torch.Tensor:
        """Preview images of the model as it is now for the callbacks (see :meth:`preview_plan`)."""
        prompts = list(prompts or self.eval_prompts[:4] or self.prompts.prompts[:4])
        images = self.sample(prompts, seed=0, phase="preview", plan=self.preview_plan())
        for cb in self.callbacks:
            cb.on_preview(self, images, prompts)
        return images

    def save_lora_set(self, folder: str | os.PathLike, overwrite: bool = False) -> list[Path]:
        """Export the alignment set (segment LoRAs, merged LoRA, set.json); see :mod:`shortft_core.lora_set`."""
        from .lora_set import export_lora_set

        meta = {"train_config": self.cfg.to_dict(), "base": self.model.source, "iterations": self.iteration,
                "plan_stage1": method_plan(self.cfg, 1, torch.Generator().manual_seed(0)).to_dict(),
                "guidance": self.cfg.guidance}
        return export_lora_set(self.model.unet, self.lora, folder, family=self.model.family, metadata=meta,
                               overwrite=overwrite, names=self.model.lora_names)

    # ---- checkpoints ----
    def extra_state(self) -> dict:
        return {"adapters": {n: adapter_state(self.model.unet, n) for n in self.lora.names}, "stage": self.stage,
                "history": json.dumps(dataclasses.asdict(self.history))}

    def save_checkpoint(self) -> Path | None:
        for ps in self.all_params.values():
            if not all_finite(ps):
                raise FloatingPointError("adapter weights are not finite; refusing to overwrite the last checkpoint")
        return super().save_checkpoint()

    def load_extra_state(self, st: dict) -> None:
        for n in self.lora.names:
            load_adapter_state(self.model.unet, n, st["adapters"][n])
        self.history = History(**json.loads(st["history"]))
        if st["stage"]:
            self._enter_stage(int(st["stage"]))

    # ---- the loop ----
    def fit(self) -> History:
        """Evaluate (once, before training), train to the end or a stop request, evaluate the result; returns the
        history. After a stop, ``self.stopped`` is True and a checkpoint holds the state to resume from."""
        if self.eval_prompts and not self.history.evals:
            try:
                self.record_evaluation()
            except StopRequested:
                self.stopped = True
                return self.history
        try:
            self.iterate()
        except StopRequested:  # asked during an evaluation or preview after a finished iteration
            self.stopped = True
            if self._saved_at != self.iteration:
                self.save_checkpoint()
        if not self.stopped and self.eval_prompts and self.history.evals[-1]["iteration"] != self.iteration:
            try:
                self.record_evaluation()
            except StopRequested:
                self.stopped = True
        for cb in self.callbacks:
            cb.on_end(self)
        return self.history

    def record_evaluation(self) -> dict:
        """Evaluate now (:meth:`evaluate`), add the result to the history and tell the callbacks; returns it."""
        result = {"iteration": self.iteration, "seconds": self.elapsed, **self.evaluate()}
        self.history.evals.append(result)
        for cb in self.callbacks:
            cb.on_eval(self, result)
        return result
