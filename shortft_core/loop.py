"""The loop skeleton that reward fine-tuning (:class:`~shortft_core.trainer.Trainer`) and shortcut distillation
(:class:`~shortft_core.distillation.Distiller`) share: the learning-rate schedule, the optimizer update with its
non-finite guard, gradient clipping and (for fp16 networks) dynamic loss scaling, callbacks, stop requests, and exact
checkpoint/resume.

A subclass provides ``train_step()`` (one optimizer step: forward, backward, :meth:`Loop.apply_gradients`),
``extra_state()`` / ``load_extra_state()`` (what else a checkpoint must hold) and, if it has them, ``after_step()``
(evaluations, previews). A stop request is polled before every iteration and, where the subclass calls
:meth:`Loop.poll_stop` (the trainer does after every network call of its chain, forward and backward), inside
one: the unfinished iteration is discarded, the RNG states are rewound to its start and a checkpoint is written,
so a resume repeats that iteration exactly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

import torch

from .checkpoint import CheckpointManager, capture_rng, restore_rng
from .settings import changed_settings

log = logging.getLogger(__name__)

MAX_SKIPPED = 20  # non-finite iterations tolerated before a run gives up


class StopRequested(Exception):
    """Raised inside an iteration (from a network call's hook) when a stop was asked; the loop catches it."""


def lr_factor(step: int, warmup: int, total: int, schedule: str = "constant") -> float:
    """Learning-rate multiplier at optimizer step ``step``: linear warm-up over ``warmup`` steps, then constant or
    cosine down to 0.1 at ``total``."""
    warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if schedule == "cosine":
        return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total)))))
    if schedule != "constant":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}: use constant or cosine")
    return warm


def clip_gradients(params, max_norm: float) -> float:
    """Clip the parameters' global gradient norm to ``max_norm`` (0 or less: no clipping) and return the norm
    before clipping; torch's own clip with 0 would zero every gradient, which no user setting 0 means."""
    limit = max_norm if max_norm > 0 else float("inf")
    return float(torch.nn.utils.clip_grad_norm_(params, limit))


def all_finite(tensors) -> bool:
    """True when every tensor (e.g. every gradient) is free of NaN and inf."""
    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None)


class LossScale:
    """Dynamic loss scaling for backward passes through float16 arithmetic, whose smallest normal number (6e-5) is
    above many of a reward's per-element gradients at full image sizes: the loss is multiplied by a power of two
    before backward and the gradients divided by it after (both exact), so small gradients keep their precision
    instead of flushing to zero. An overflow (a non-finite gradient with a finite loss) halves the scale and skips
    that update; ``growth_interval`` clean updates in a row double it. Disabled, it is the identity."""

    INITIAL, FLOOR, GROWTH_INTERVAL = 2.0**16, 1.0, 2000

    def __init__(self, enabled: bool, growth_interval: int = GROWTH_INTERVAL) -> None:
        self.enabled = enabled
        self.value = self.INITIAL if enabled else 1.0
        self.growth_interval = growth_interval
        self.clean = 0  # clean updates since the scale last changed

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call backward on."""
        return loss * self.value if self.enabled else loss

    def unscale_(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Divide the accumulated gradients by the scale, in place."""
        if self.enabled:
            for p in params:
                if p.grad is not None:
                    p.grad.div_(self.value)

    def absorbs_overflow(self) -> bool:
        """Called when an update's loss is finite but a gradient is not: halve the scale and say whether that was
        an overflow of the scaled gradients (True) rather than a gradient that is not finite at scale 1 (False)."""
        if not self.enabled or self.value <= self.FLOOR:
            return False
        self.value = max(self.FLOOR, self.value / 2)
        self.clean = 0
        return True

    def updated(self) -> None:
        """Called after each clean update: grow the scale after ``growth_interval`` of them in a row."""
        if self.enabled:
            self.clean += 1
            if self.clean >= self.growth_interval:
                self.value *= 2
                self.clean = 0

    def state_dict(self) -> dict:
        return {"value": self.value, "clean": self.clean}

    def load_state_dict(self, state: dict) -> None:
        if self.enabled and state:
            self.value, self.clean = float(state["value"]), int(state["clean"])


class Callback:
    """Hooks a loop calls; hosts implement them (progress bars, previews, metrics, stop requests)."""

    def on_start(self, loop: "Loop") -> None: ...
    def on_step(self, loop: "Loop", metrics: dict) -> None: ...
    def on_eval(self, loop: "Loop", result: dict) -> None: ...
    def on_preview(self, loop: "Loop", images: torch.Tensor, prompts: list[str]) -> None: ...
    def on_progress(self, loop: "Loop", event: dict) -> None:
        """Within an iteration or a sampling pass: ``event`` has ``phase`` (train, eval, preview, ...), ``call`` and
        ``calls`` (network calls done and planned) and ``iteration``."""
    def should_stop(self, loop: "Loop") -> bool:
        return False
    def on_end(self, loop: "Loop") -> None: ...


class SingleProcess:
    """What the loops need of an accelerate ``Accelerator`` when the run is not distributed: no global state."""

    num_processes = 1
    process_index = 0
    is_main_process = True

    def __init__(self, device: torch.device) -> None:
        self.device = device


def processes(device: torch.device, accelerator: Any = None) -> Any:
    """The accelerator given, an ``Accelerator`` when this process was started as one of several (accelerate /
    torchrun set WORLD_SIZE), else a :class:`SingleProcess`."""
    if accelerator is not None:
        return accelerator
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import Accelerator

        return Accelerator(cpu=device.type == "cpu")
    return SingleProcess(device)


class Loop:
    """Optimizer, LR schedule, step counter, callbacks, stop handling and checkpoints of one training run."""

    rng_name = "train"  # name of ``self.gen``'s state in checkpoints
    resume_may_change: tuple[str, ...] = ()  # settings a resume may change (e.g. the number of steps)

    def __init__(self, params: Sequence[torch.nn.Parameter] | Sequence[dict], *, lr: float, weight_decay: float,
                 warmup: int, total: int, schedule: str, grad_clip: float, seed: int, config: Any,
                 checkpoints: CheckpointManager | None, callbacks: Sequence[Callback] = (),
                 procs: Any = None, loss_scaling: bool = False) -> None:
        self.config = config
        self.total, self.grad_clip = total, grad_clip
        self.opt = torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, warmup, total, schedule))
        self.gen = torch.Generator().manual_seed(seed)
        self.ckpt = checkpoints
        self.callbacks = list(callbacks)
        self.acc = procs if procs is not None else SingleProcess(torch.device("cpu"))
        self.iteration = 0
        self.skipped = 0
        self.updated = False  # the last apply_gradients() changed the weights
        self.loss_scale = LossScale(loss_scaling)
        self.elapsed = 0.0
        self.stopped = False  # the last iterate() ended on a stop request
        self._saved_at: int | None = None
        self._updating = False  # this iteration's update began: the trained state may be half-updated until it ends

    # ---- what a subclass provides ----
    def train_step(self) -> dict:
        raise NotImplementedError

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None: ...

    def after_step(self, metrics: dict) -> None: ...

    def finished(self) -> bool:
        return self.iteration >= self.total

    @property
    def saved_at(self) -> int | None:
        """The iteration of the newest checkpoint this loop wrote or resumed from (None: none yet), where a run
        that fails now would continue."""
        return self._saved_at

    # ---- the update ----
    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for g in self.opt.param_groups for p in g["params"] if p.requires_grad]

    def apply_gradients(self, losses_finite: bool) -> float:
        """Unscale (:class:`LossScale`), clip and apply the accumulated gradients of the trainable parameters, or
        skip the update when the loss or a gradient is not finite: an overflow of loss-scaled gradients lowers the
        scale, anything else counts as a non-finite iteration (more than ``MAX_SKIPPED`` of them end the run); steps
        the LR schedule and the counter. Returns the gradient norm before clipping (NaN when skipped)."""
        params = self.trainable
        grad_norm = float("nan")
        self._updating = True
        self.loss_scale.unscale_(params)
        self.updated = losses_finite and all_finite([p.grad for p in params])
        if self.updated:
            grad_norm = clip_gradients(params, self.grad_clip)
            self.opt.step()
            self.loss_scale.updated()
        elif losses_finite and self.loss_scale.absorbs_overflow():
            log.info("iteration %d: the fp16 gradients overflowed at loss scale %g; update skipped, scale now %g",
                     self.iteration, self.loss_scale.value * 2, self.loss_scale.value)
        else:
            self.skipped += 1
            log.warning("iteration %d: non-finite loss or gradient; update skipped (%d so far)", self.iteration,
                        self.skipped)
            if self.skipped > MAX_SKIPPED:
                raise FloatingPointError(f"more than {MAX_SKIPPED} non-finite iterations: lower the learning rate; "
                                         "the last checkpoint is intact")
        self.sched.step()
        self.iteration += 1
        return grad_norm

    # ---- stop requests ----
    def stop_asked(self) -> bool:
        return any([cb.should_stop(self) for cb in self.callbacks])

    def poll_stop(self) -> None:
        """Raise :class:`StopRequested` when a stop was asked (single-process runs: under DDP the ranks must agree,
        which they do once per iteration)."""
        if self.acc.num_processes == 1 and self.stop_asked():
            raise StopRequested

    def progress_event(self, event: dict) -> None:
        for cb in self.callbacks:
            cb.on_progress(self, event)

    def _on_any_rank(self, flag: bool) -> bool:
        """``flag`` or'ed over the processes: a time budget or a stop request must end every rank at the same
        iteration, or the others wait forever in the next all-reduce."""
        if self.acc.num_processes == 1:
            return flag
        votes = self.acc.gather(torch.tensor([1.0 if flag else 0.0], device=self.acc.device))
        return bool(votes.max() > 0)

    # ---- checkpoints ----
    def state(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "rng": capture_rng({self.rng_name: self.gen}), "iteration": self.iteration, "skipped": self.skipped,
                "loss_scale": self.loss_scale.state_dict(), "elapsed": self.elapsed, "config": json.dumps(self.config.to_dict()), **self.extra_state()}

    def save_checkpoint(self) -> Path | None:
        if self.ckpt is None or not self.acc.is_main_process:
            return None
        if not all_finite([p.detach() for g in self.opt.param_groups for p in g["params"]]):
            raise FloatingPointError("trained weights are not finite; refusing to overwrite the last checkpoint")
        path = self.ckpt.save(self.iteration, self.state())
        self._saved_at = self.iteration
        return path

    def resume(self) -> bool:
        """Continue from the newest checkpoint (if any) exactly where it stopped; refuses changed settings."""
        if self.ckpt is None:
            return False
        path = self.ckpt.latest()
        if path is None:
            return False
        st = CheckpointManager.load(path)
        diff = changed_settings(st["config"], self.config, self.resume_may_change)
        if diff:
            raise ValueError(f"cannot resume from {path}: settings differ from the checkpoint in {diff}; use the same "
                             "settings or another run folder")
        self.load_extra_state(st)
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        restore_rng(st["rng"], {self.rng_name: self.gen})
        self.iteration, self.skipped = int(st["step"]), int(st["skipped"])
        self.loss_scale.load_state_dict(st.get("loss_scale", {}))
        self.elapsed = float(st.get("elapsed", 0.0))
        self._saved_at = self.iteration
        log.info("resumed from %s at iteration %d", path, self.iteration)
        return True

    def _discard_iteration(self, rng: dict) -> None:
        """Drop an unfinished iteration before its update: the generator as the iteration found it (so a resume
        repeats it exactly) and no partial gradients."""
        restore_rng(rng, {self.rng_name: self.gen})
        self.opt.zero_grad(set_to_none=True)

    def _keep_done_iterations(self, error: BaseException, rng: dict) -> None:
        """After running out of memory inside an iteration, before its update: free what the failed iteration held
        and checkpoint the iterations done, with the generator as the iteration found it, so a run continued (with
        less memory in use) repeats that iteration exactly and loses none before it."""
        self._discard_iteration(rng)
        traceback.clear_frames(error.__traceback__)  # the failed iteration's activations, held by its frames
        if self._saved_at != self.iteration and self.iteration > 0:
            path = self.save_checkpoint()
            if path is not None:
                log.warning("out of memory in iteration %d: the %d done are checkpointed in %s", self.iteration + 1,
                            self.iteration, path)

    # ---- the loop ----
    def iterate(self) -> dict:
        """Iterate until :meth:`finished` or a stop request; checkpoints every ``checkpoint_every`` iterations and
        where it ends, also where an iteration runs out of memory before its update (the error is raised after).
        Returns the last iteration's metrics."""
        every = getattr(self.config, "checkpoint_every", 0)
        self.stopped = False
        metrics: dict = {}
        for cb in self.callbacks:
            cb.on_start(self)
        while not self.finished():
            if self._on_any_rank(self.stop_asked()):
                self.stopped = True
                break
            rng = capture_rng({self.rng_name: self.gen})
            t0 = time.perf_counter()
            self._updating = False
            try:
                metrics = self.train_step()
            except StopRequested:
                self._discard_iteration(rng)
                self.stopped = True
                break
            except torch.OutOfMemoryError as error:
                if self._updating or self.acc.num_processes > 1:
                    raise  # a half-made update (or EMA), or other ranks mid-iteration: the last checkpoint stands
                self._keep_done_iterations(error, rng)
                raise
            self.elapsed += time.perf_counter() - t0
            metrics.setdefault("seconds", self.elapsed)
            for cb in self.callbacks:
                cb.on_step(self, metrics)
            self.after_step(metrics)
            if every and self.iteration % every == 0:
                self.save_checkpoint()
        if self.stopped:
            log.info("stopped on request at iteration %d", self.iteration)
        if self._saved_at != self.iteration and self.iteration > 0:
            self.save_checkpoint()
        return metrics
