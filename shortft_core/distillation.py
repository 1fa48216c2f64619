"""Shortcut distillation: trajectory-segmented consistency distillation of a few-step LoRA for any eps base.

ShortFT needs a frozen model that jumps a long stretch of the base's own sampling trajectory in one call. For
SD1.5 users download one (Hyper-SD, PCM, TCD); for the tiny world, or a base fine-tuned by a user, we distill it
here, following the ideas of Hyper-SD (trajectory-segmented consistency distillation, arXiv 2404.13686) and PCM
(phased consistency models, arXiv 2405.18407):

* The timestep axis is cut into k segments by ``edges`` (default 999 / 749 / 499 / 249, Hyper-SD's 4-step
  trailing grid). Segment j holds the timesteps ``edges[j+1] < t <= edges[j]`` (the last one down to the clean
  end), and its *target* is its lower edge.
* Teacher: the frozen base solving the probability-flow ODE with DDIM on a fine grid (``teacher_steps``, 50 by
  default: solver steps of 20 timesteps), optionally with classifier-free guidance drawn from a range.
* Student: the base plus a LoRA (the shortcut adapter), eps-prediction. One DDIM jump with the student's eps from
  any x_t inside a segment should land where the teacher's trajectory crosses the segment's lower edge; because
  the jump is DDIM with the student's eps, it can stop anywhere on the way (741 -> 501 inside (499, 749]).
* Consistency target (phased): from x_{t'} the teacher takes one solver step to x_{t''} (t'' = t' - 20, clipped
  at the edge); the target is the stop-gradient (optionally EMA) student's DDIM jump from x_{t''} to the edge, or
  x_{t''} itself when t'' is the edge (the boundary condition that anchors each segment).
* Loss: pseudo-Huber on the latent difference, sqrt(|d|^2 + c^2) - c with c = 0.001 * sqrt(dim) (robust to the
  occasional large teacher error, as in improved consistency training); ``l2`` is available.

Data: prompts only (data-free, the default): guided teacher trajectories from noise on the fine grid, so the
student learns from exactly the states ShortFT's jumps start from (the guided trajectory is not the data
marginal; in a 300-step pilot on the tiny world, trajectories gave about 10% lower jump errors than noised
images); or, for the tiny world, image-caption pairs noised with q(x_t|x_0).

Target: ``teacher`` (default): regress the jump directly onto the teacher's own state at the segment edge, which
the trajectory data provides for free; or ``consistency``, as in the papers (BENCHMARKS.md compares them).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .adapters import SHORTCUT_ADAPTER, SHORTCUT_TARGETS, AdapterSwitch, adapter_parameters, adapter_state, add_lora
from .adapters import load_adapter_state
from .loop import Callback, Loop
from .checkpoint import CheckpointManager
from .settings import check_bounds, setting
from .models import PRECISION, Conditioning, DiffusionModel
from .chain import guided_eps, run_plan
from .plans import base_chain
from .sampling import initial_noise
from .schedule import FINAL, add_noise, ddim_step, leading_grid
from .segments import Segments, check_edges

log = logging.getLogger(__name__)


@dataclass
class DistillConfig:
    """Settings of a shortcut distillation run (all of them recorded in the LoRA's metadata)."""

    edges: tuple[int, ...] = setting((999, 749, 499, 249), "segment upper edges, descending (Hyper-SD's 4-step "
                                                          "trailing grid); the last segment ends at the clean sample")
    teacher_steps: int = setting(50, "fine DDIM grid of the teacher: one solver step = 1000 // teacher_steps "
                                     "timesteps", at_least=1, at_most=1000)
    teacher_guidance: tuple[float, float] = setting((3.0, 3.0), "the teacher's CFG range, lo hi, one scale drawn "
                                                                "per batch (1 1: no guidance)")
    student_guidance: float | None = setting(None, "CFG the shortcut is made to be used with: 1 none (as Hyper-SD); "
                                                   "> 1 as PCM's normal-CFG LoRAs, which start from the naive guided "
                                                   "jump and learn only the correction (3x faster on the tiny "
                                                   "world); none: the teacher's upper scale", at_least=1)
    rank: int = setting(16, "rank of the shortcut LoRA", at_least=1)
    alpha: float | None = setting(None, "LoRA alpha (none: the rank, i.e. scale 1)", above=0)
    targets: tuple[str, ...] = setting(SHORTCUT_TARGETS, "UNet module names the shortcut LoRA adapts (peft "
                                                         "target_modules)")
    steps: int = setting(3000, "optimizer steps (may be raised on --resume)", at_least=1)
    batch_size: int = setting(32, "start states per step", at_least=1)
    lr: float = setting(5e-4, "peak learning rate (AdamW; cosine decay to a tenth after warm-up)", above=0)
    warmup: int = setting(100, "linear warm-up steps", at_least=0)
    weight_decay: float = setting(0.0, "AdamW weight decay", at_least=0)
    grad_clip: float = setting(1.0, "clip the gradient's global norm to this (0: no clipping)")
    loss: str = setting("huber", "huber (pseudo-Huber: every sample's error weighs alike, like the jump-error "
                                 "metric) | l2 (squared error)", choices=("huber", "l2"))
    target: str = setting("teacher", "teacher (the full teacher solve to the segment's edge) | consistency (the "
                                     "target network one teacher step on, PCM/Hyper-SD style); teacher learns "
                                     "faster here, see BENCHMARKS.md", choices=("teacher", "consistency"))
    ema_decay: float = setting(0.0, "consistency target: EMA decay of the target network (0: the stop-gradient "
                                    "student itself)")
    data: str = setting("trajectories", "trajectories (data-free: guided teacher trajectories from prompts) | "
                                        "images (tiny-world image-caption pairs noised with q(x_t | x_0))",
                        choices=("trajectories", "images"))
    prompts: tuple[str, ...] = ()  # trajectories: the prompts (default for the tiny world: its captions)
    pool_size: int = setting(128, "teacher trajectories solved per pool", at_least=1)
    pool_reuse: int = setting(32, "training steps each pool of trajectories serves before the next is solved",
                              at_least=1)
    focus: tuple[int, ...] = setting((), "start timesteps drawn more often: those the chain jumps from (ShortFT's "
                                         "741 481 241 on SD1.5's grid); on the teacher grid or an inner edge")
    focus_share: float = setting(0.0, "share of each batch drawn from --focus (the rest: uniform over every start)",
                                 at_least=0, at_most=1)
    train_images: int = setting(20000, "--data images: size of the encoded image pool", at_least=1)
    seed: int = setting(0, "seed of the LoRA's initialisation, the prompts, the noise and the training images")
    mixed_precision: str = setting("no", "no | bf16 | fp16: dtype of the frozen base weights (the shortcut LoRA "
                                         "trains in fp32); bf16 on a GPU", choices=tuple(PRECISION))
    offload_text_encoders: bool = setting(False, "keep the text encoders in host memory, lent to the GPU only to "
                                                 "encode a prompt not cached (SDXL: 1.5 GiB less on the GPU; may "
                                                 "change on --resume)")
    checkpoint_every: int = setting(500, "steps between checkpoints (atomic; --resume continues exactly)", at_least=1)
    keep_checkpoints: int = setting(2, "checkpoints kept on disk (older ones are deleted)", at_least=1)

    def validate(self, model: DiffusionModel | None = None) -> None:
        """Raise on settings out of range or inconsistent, before any heavy work."""
        check_bounds(self)
        e = self.edges
        n = model.schedule.num_train_timesteps if model is not None else 1000
        check_edges(e, "edges", n)
        if len(self.teacher_guidance) != 2:
            raise ValueError(f"teacher_guidance is a range of two scales, lo hi (e.g. 3 3 or 2 8); got "
                             f"{list(self.teacher_guidance)}")
        lo, hi = self.teacher_guidance
        if not 1.0 <= lo <= hi:
            raise ValueError(f"teacher_guidance must be a range lo <= hi with lo >= 1; got {self.teacher_guidance}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not self.targets:
            raise ValueError("targets is empty: name the UNet modules the shortcut LoRA adapts (default: "
                             f"{' '.join(SHORTCUT_TARGETS)})")
        if self.focus_share > 0 and not self.focus:
            raise ValueError("focus_share > 0 needs focus timesteps (e.g. --focus 741 481 241)")
        if self.focus:
            starts = set(start_points(leading_grid(self.teacher_steps, n), self.edges))
            bad = [t for t in self.focus if t not in starts]
            if bad:
                raise ValueError(f"focus timesteps {bad} are not start points: use timesteps of the teacher's "
                                 f"{self.teacher_steps}-step leading grid at or below {e[0]}, or inner edges {list(e[1:])}")
        if model is not None:
            if model.dtype != PRECISION[self.mixed_precision]:
                raise ValueError(f"the base is loaded in {model.dtype} but mixed_precision={self.mixed_precision!r}; "
                                 "load it in the matching dtype (the CLI does) or change the setting")
            if model.schedule.prediction_type != "epsilon":
                raise ValueError(f"the base is {model.schedule.prediction_type}-prediction; distillation needs an "
                                 "eps-prediction base (SD1.5 / SDXL family)")
            if n % self.teacher_steps:
                raise ValueError(f"teacher_steps must divide {n}; got {self.teacher_steps}")
            self.check_data(tiny=model.family == "tiny")

    def check_data(self, tiny: bool) -> None:
        """Refuse a data source the base cannot use (the CLI calls this before the model loads)."""
        if self.data == "trajectories" and not self.prompts and not tiny:
            raise ValueError("data-free distillation needs prompts: pass --prompts-file (one per line)")
        if self.data == "images" and not tiny:
            raise ValueError("data='images' (--data images) uses the tiny world's generator; use --data "
                             "trajectories with --prompts-file")

    def to_dict(self) -> dict:
        """The settings as JSON values (tuples as lists), as checkpoints and run files store them."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def start_points(grid: Sequence[int], edges: Sequence[int]) -> list[int]:
    """Where a training jump can start: every teacher grid timestep inside the segments and the inner edges."""
    return [t for t in grid if t <= edges[0]] + list(edges[1:])


def draw_starts(starts: Sequence[int], size: int, gen: torch.Generator, focus: Sequence[int] = (),
                share: float = 0.0) -> list[int]:
    """``size`` start timesteps: uniform over ``starts``, a ``share`` of them drawn from ``focus`` instead."""
    t = [starts[i] for i in torch.randint(0, len(starts), (size,), generator=gen).tolist()]
    if focus and share > 0:
        use = (torch.rand(size, generator=gen) < share).tolist()
        pick = torch.randint(0, len(focus), (size,), generator=gen).tolist()
        t = [focus[p] if u else x for x, u, p in zip(t, use, pick)]
    return t


def pseudo_huber(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = (a - b).flatten(1).float()
    c = 0.001 * math.sqrt(d.shape[1])
    return (torch.sqrt(d.pow(2).sum(1) + c * c) - c).mean()


# ----- data ------------------------------------------------------------------------------------------------------
@dataclass
class Pairs:
    """One training batch: start states x1 at t1, the teacher's next state x2 at t2 (one solver step, clipped at
    the segment's lower edge ``lower``), optionally the teacher's state at the edge itself, and conditioning."""

    x1: torch.Tensor
    t1: torch.Tensor
    x2: torch.Tensor
    t2: torch.Tensor
    lower: torch.Tensor
    edge: torch.Tensor | None
    prompts: list[str]
    guidance: torch.Tensor


class TinyPairs:
    """Encoded tiny-world training images and their captions (deterministic for a seed)."""

    def __init__(self, model: DiffusionModel, n: int, seed: int) -> None:
        from .tiny_world import scenes

        lat, caps = [], []
        with torch.no_grad():
            for start in range(0, n, 256):
                arr, sc = scenes.scene_batch(seed + 5000, range(start, min(n, start + 256)), "train")
                lat.append(model.encode_images(scenes.to_float(arr).to(model.device, model.dtype)))
                caps += [s.caption for s in sc]
        self.latents, self.captions = torch.cat(lat), caps

    def batch(self, size: int, gen: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        idx = torch.randint(0, len(self.captions), (size,), generator=gen)
        return self.latents[idx.to(self.latents.device)], [self.captions[i] for i in idx.tolist()]


class TeacherTrajectories:
    """Data-free source: guided teacher trajectories from noise on the fine grid, the states ShortFT's jumps start
    from. Each pool records every grid state and the exact state at every segment edge (a partial DDIM step with
    the eps of the grid point above the edge); training pairs are drawn from it for ``reuse`` steps."""

    def __init__(self, model: DiffusionModel, prompts: Sequence[str], edges: Sequence[int], guidance: tuple[float, float],
                 teacher_steps: int, pool_size: int, reuse: int, teacher_eps: Callable,
                 focus: Sequence[int] = (), focus_share: float = 0.0) -> None:
        self.model, self.prompts, self.edges = model, list(prompts), list(edges)
        self.teacher_eps = teacher_eps  # (x, t, cond, uncond, guidance) -> guided eps of the bare base
        self.guidance, self.pool_size, self.reuse = guidance, pool_size, reuse
        self.grid = leading_grid(teacher_steps, model.schedule.num_train_timesteps)
        self.pool: dict | None = None
        self.uses = 0
        self.starts = start_points(self.grid, edges)
        self.focus, self.focus_share = list(focus), focus_share

    @torch.no_grad()
    def _refresh(self, gen: torch.Generator) -> None:
        m, n = self.model, self.pool_size
        idx = torch.randint(0, len(self.prompts), (n,), generator=gen).tolist()
        prompts = [self.prompts[i] for i in idx]
        seeds = torch.randint(0, 2**31 - 1, (n,), generator=gen).tolist()
        lo, hi = self.guidance
        g = lo + (hi - lo) * torch.rand(n, generator=gen)
        x = initial_noise(seeds, m.latent_shape(), m.device, m.latent_dtype)
        cond = m.encode_prompts(prompts)
        uncond = m.encode_prompts([""]).repeat(n) if hi > 1.0 else None
        gd = g.to(x.device, x.dtype)
        states, edge_states = {}, {}
        sch = m.schedule
        for i, t in enumerate(self.grid):
            states[t] = x
            eps = self.teacher_eps(x, torch.full((n,), t, device=x.device), cond, uncond, gd)
            s = self.grid[i + 1] if i + 1 < len(self.grid) else FINAL
            for e in self.edges[1:]:
                if t > e > s:  # an edge between two grid points: a partial DDIM step with the upper point's eps
                    edge_states[e] = ddim_step(x, eps, sch.abar(t, x), sch.abar(e, x))
            x = ddim_step(x, eps, sch.abar(t, x), sch.abar(s, x))
        states[FINAL] = x
        for e in self.edges[1:]:
            if e in states:
                edge_states[e] = states[e]
        edge_states[FINAL] = x
        self.pool = {"states": states, "edges": edge_states, "prompts": prompts, "g": g}
        self.uses = 0

    def batch(self, size: int, gen: torch.Generator) -> Pairs:
        if self.pool is None or self.uses >= self.reuse:
            self._refresh(gen)
        self.uses += 1
        pool = self.pool
        traj = torch.randint(0, self.pool_size, (size,), generator=gen)
        t1 = draw_starts(self.starts, size, gen, self.focus, self.focus_share)
        lowers, t2s = [], []
        for t in t1:
            lower = Segments.from_edges(self.edges).jump_target(t)
            nxt = next((g for g in self.grid if g < t), FINAL)
            t2s.append(max(nxt, lower) if lower != FINAL else nxt)
            lowers.append(lower)
        x1 = torch.stack([self._state(t, int(n)) for t, n in zip(t1, traj)])
        x2 = torch.stack([self._state(t, int(n)) for t, n in zip(t2s, traj)])
        edge = torch.stack([pool["edges"][lo][int(n)] for lo, n in zip(lowers, traj)])
        return Pairs(x1, torch.tensor(t1), x2, torch.tensor(t2s), torch.tensor(lowers), edge,
                     [pool["prompts"][int(n)] for n in traj], pool["g"][traj])

    def _state(self, t: int, n: int) -> torch.Tensor:
        pool = self.pool
        return pool["states"][t][n] if t in pool["states"] else pool["edges"][t][n]

    def state_dict(self) -> dict:
        if self.pool is None:
            return {}
        return {"states": {str(k): v for k, v in self.pool["states"].items()},
                "edges": {str(k): v for k, v in self.pool["edges"].items()},
                "prompts": self.pool["prompts"], "g": self.pool["g"], "uses": self.uses}

    def load_state_dict(self, st: dict) -> None:
        if not st:
            self.pool = None
            return
        self.pool = {"states": {int(k): v for k, v in st["states"].items()},
                     "edges": {int(k): v for k, v in st["edges"].items()}, "prompts": st["prompts"], "g": st["g"]}
        self.uses = st["uses"]


# ----- the distiller ---------------------------------------------------------------------------------------------
class Distiller(Loop):
    """Owns the student adapter and its training loop (:class:`~shortft_core.loop.Loop`: the schedule, updates,
    stop requests and exact checkpoint/resume shared with the trainer); ``iterate`` trains. Hosts use it through
    :class:`~shortft_core.session.DistillSession`."""

    rng_name = "data"
    resume_may_change = ("steps", "checkpoint_every", "keep_checkpoints", "offload_text_encoders")

    def __init__(self, model: DiffusionModel, cfg: DistillConfig, out: str | Path,
                 callbacks: Sequence[Callback] = ()) -> None:
        cfg.validate(model)
        self.model, self.cfg, self.out = model, cfg, Path(out)
        self.unet = model.unet
        if SHORTCUT_ADAPTER not in getattr(self.unet, "peft_config", {}):
            add_lora(self.unet, SHORTCUT_ADAPTER, cfg.rank, cfg.alpha, cfg.targets, seed=cfg.seed)
        self.params = adapter_parameters(self.unet, SHORTCUT_ADAPTER)
        for p in self.params:
            p.requires_grad_(True)
        self.switch = AdapterSwitch(self.unet)
        self.ema = [p.detach().clone() for p in self.params] if cfg.ema_decay > 0 else None
        # warm-up of at least one step and a cosine down to 0.1 of the peak over the run
        super().__init__(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup=max(1, cfg.warmup),
                         total=cfg.steps, schedule="cosine", grad_clip=cfg.grad_clip, seed=cfg.seed, config=cfg,
                         checkpoints=CheckpointManager(self.out / "checkpoints", keep=cfg.keep_checkpoints),
                         callbacks=callbacks, loss_scaling=model.fp16_backward)
        self.solver = model.schedule.num_train_timesteps // cfg.teacher_steps
        self.skipped = 0
        if cfg.data == "images":
            self.data = TinyPairs(model, cfg.train_images, cfg.seed)
        else:
            prompts = list(cfg.prompts)
            if not prompts:  # the tiny world: its captions, every composition
                from .tiny_world import scenes

                prompts = sorted({scenes.sample_scene(cfg.seed + 7000, i, "any").caption for i in range(4000)})
            self.data = TeacherTrajectories(model, prompts, cfg.edges, cfg.teacher_guidance, cfg.teacher_steps,
                                            cfg.pool_size, cfg.pool_reuse,
                                            lambda x, t, c, u, g: self._eps((), x, t, c, u, g),
                                            cfg.focus, cfg.focus_share)
        if cfg.offload_text_encoders:
            model.offload_text_encoders()
        self.empty = model.encode_prompts([""])

    # ---- one step ----
    def _eps(self, adapters: Sequence[str], x: torch.Tensor, t: torch.Tensor, cond: Conditioning,
             uncond: Conditioning | None = None, guidance: torch.Tensor | float = 1.0) -> torch.Tensor:
        self.switch.activate(adapters)
        return guided_eps(self.model, x, t, cond, uncond, guidance)

    def _swap_ema(self) -> None:
        if self.ema is not None:
            for p, e in zip(self.params, self.ema):
                tmp = p.detach().clone()
                p.data.copy_(e)
                e.copy_(tmp)

    @property
    def student_guidance(self) -> float:
        g = self.cfg.student_guidance
        return float(self.cfg.teacher_guidance[1] if g is None else g)

    def _student_eps(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        g = self.student_guidance
        return self._eps((SHORTCUT_ADAPTER,), x, t, cond, self.empty.repeat(x.shape[0]) if g != 1.0 else None, g)

    def draw(self, gen: torch.Generator) -> Pairs:
        """A training batch: from trajectories directly, or image latents noised with q(x_t | x_0) plus one teacher
        step (and, for the teacher target, the teacher's whole solve down to the edge)."""
        cfg, m = self.cfg, self.model
        if isinstance(self.data, TeacherTrajectories):
            return self.data.batch(cfg.batch_size, gen)
        x0, prompts = self.data.batch(cfg.batch_size, gen)
        b, sch, dev = x0.shape[0], m.schedule, x0.device
        t1 = torch.tensor(draw_starts(range(1, cfg.edges[0] + 1), b, gen, cfg.focus, cfg.focus_share))
        segs = Segments.from_edges(cfg.edges)
        lower = torch.tensor([segs.jump_target(int(t)) for t in t1])
        t2 = torch.maximum(t1 - self.solver, lower)
        lo_g, hi_g = cfg.teacher_guidance
        g = lo_g + (hi_g - lo_g) * torch.rand(b, generator=gen)
        x1 = add_noise(x0, torch.randn(x0.shape, generator=gen).to(x0), sch.abar(t1, x0))
        cond = m.encode_prompts(prompts)
        uncond = self.empty.repeat(b) if hi_g > 1.0 else None
        with torch.no_grad():
            e_teacher = self._eps((), x1, t1.to(dev), cond, uncond, g.to(dev))
            x2 = ddim_step(x1, e_teacher, sch.abar(t1, x0), sch.abar(t2, x0))
            edge = self._teacher_solve(x1, t1, lower, cond, uncond, g.to(dev)) if cfg.target == "teacher" else None
        return Pairs(x1, t1, x2, t2, lower, edge, prompts, g)

    def loss_on(self, p: Pairs) -> torch.Tensor:
        """Student's one-call jump from x1 to the segment edge against the consistency (or teacher) target."""
        cfg, m = self.cfg, self.model
        sch, dev = m.schedule, p.x1.device
        a1, a2, alow = sch.abar(p.t1, p.x1), sch.abar(p.t2, p.x1), sch.abar(p.lower, p.x1)
        cond = m.encode_prompts(p.prompts)
        with torch.no_grad():
            if cfg.target == "teacher":
                if p.edge is None:
                    raise ValueError("the teacher target needs the teacher's edge states")
                target = p.edge
            else:
                self._swap_ema()
                e_target = self._student_eps(p.x2, p.t2.clamp_min(0).to(dev), cond)
                self._swap_ema()
                at_edge = (p.t2 == p.lower).to(dev).view(-1, 1, 1, 1)
                target = torch.where(at_edge, p.x2, ddim_step(p.x2, e_target, a2, alow))
        pred = ddim_step(p.x1, self._student_eps(p.x1, p.t1.to(dev), cond), a1, alow)
        return pseudo_huber(pred, target) if cfg.loss == "huber" else (pred - target).float().pow(2).mean()

    def _teacher_solve(self, x: torch.Tensor, t: torch.Tensor, lower: torch.Tensor, cond: Conditioning,
                       uncond: Conditioning | None, g: torch.Tensor) -> torch.Tensor:
        """The teacher's DDIM solve from x_t down to each sample's lower edge, on the fine grid (no gradient)."""
        sch = self.model.schedule
        cur, tc = x, t.clone()
        while bool((tc > lower).any()):
            tn = torch.maximum(tc - self.solver, lower)
            e = self._eps((), cur, tc.clamp_min(0).to(x.device), cond, uncond, g)
            step = ddim_step(cur, e, sch.abar(tc, x), sch.abar(tn, x))
            done = (tc <= lower).to(x.device).view(-1, 1, 1, 1)
            cur = torch.where(done, cur, step)
            tc = torch.where(tc > lower, tn, tc)
        return cur

    @property
    def step(self) -> int:
        """Distillation steps done."""
        return self.iteration

    # ---- checkpoints ----
    def extra_state(self) -> dict:
        return {"adapter": adapter_state(self.unet, SHORTCUT_ADAPTER), "ema": self.ema,
                "pool": self.data.state_dict() if isinstance(self.data, TeacherTrajectories) else {}}

    def load_extra_state(self, st: dict) -> None:
        load_adapter_state(self.unet, SHORTCUT_ADAPTER, st["adapter"])
        self.ema = st["ema"]
        if isinstance(self.data, TeacherTrajectories):
            self.data.load_state_dict(st["pool"])

    # ---- the loop ----
    def train_step(self) -> dict:
        t0 = time.perf_counter()
        loss = self.loss_on(self.draw(self.gen))
        self.opt.zero_grad(set_to_none=True)
        self.loss_scale.scale(loss).backward()
        self.apply_gradients(bool(torch.isfinite(loss)))
        if self.ema is not None and self.updated:
            with torch.no_grad():
                for e, p in zip(self.ema, self.params):
                    e.lerp_(p.detach(), 1 - self.cfg.ema_decay)
        self._times.append(time.perf_counter() - t0)
        return {"loss": float(loss.detach()), "lr": self.sched.get_last_lr()[0],
                "sec_per_step": sum(self._times) / len(self._times)}

    def iterate(self) -> dict:
        """Train until ``cfg.steps`` or a callback's stop request (:meth:`Loop.iterate`), the UNet in training mode
        meanwhile; returns the last metrics, whose ``sec_per_step`` is this call's speed (not averaged over the
        steps of an earlier, resumed run)."""
        self._times: list[float] = []
        self.unet.train()
        try:
            return super().iterate()
        finally:
            self.unet.eval()

    def metadata(self) -> dict:
        """What the shortcut file records about itself (stored as its "shortft" metadata field)."""
        cfg = self.cfg
        segments = [[(cfg.edges[j + 1] if j + 1 < len(cfg.edges) else 0), cfg.edges[j]] for j in range(len(cfg.edges))]
        return {"kind": "shortcut", "edges": list(cfg.edges), "spacing": "trailing", "segments": segments,
                "guidance": self.student_guidance,
                "teacher_steps": cfg.teacher_steps, "teacher_guidance": list(cfg.teacher_guidance),
                "distill_config": cfg.to_dict(), "base": self.model.source, "steps_done": self.step}


# ----- evaluation ------------------------------------------------------------------------------------------------
SHORTFT_JUMPS: tuple[tuple[int, int], ...] = ((741, 501), (481, 261), (241, 1))


@torch.no_grad()
def jump_errors(model: DiffusionModel, prompts: Sequence[str], seeds: Sequence[int], guidance: float,
                jumps: Sequence[tuple[int, int]] = SHORTFT_JUMPS, shortcut_guidance: float = 1.0,
                naive_steps: Sequence[int] = ()) -> dict:
    """Relative L2 error ||x_hat_s - x_s|| / ||x_s|| of one-call jumps against the teacher's 50-step DDIM.

    The teacher (base, CFG ``guidance``) samples from x_T on SD1.5's 50-step grid; from its state at each jump's
    start the shortcut (with the CFG it is used with, ``shortcut_guidance``) and the base itself (naive one-step
    DDIM, guided) jump to the end, and are compared with the teacher's state there. Each k in ``naive_steps`` adds
    ``naive{k}``: the base crossing the same jump in k equal guided DDIM steps, a yardstick for how many base calls
    one shortcut call is worth (the one-step ``naive`` is k = 1).
    """
    from .chain import guided_eps

    bad = [(k, t, s) for t, s in jumps for k in naive_steps if not 1 <= k <= t - s]
    if bad:
        k, t, s = bad[0]
        raise ValueError(f"naive_steps must be in 1..{t - s} for the jump {t} -> {s}; got {k}")
    m = model
    switch = AdapterSwitch(m.unet)
    grid = leading_grid(50, m.schedule.num_train_timesteps)
    x = initial_noise(list(seeds), m.latent_shape(), m.device, m.latent_dtype)
    cond = m.encode_prompts(list(prompts))
    uncond = m.encode_prompts([""]).repeat(len(prompts))
    states: dict[int, torch.Tensor] = {grid[0]: x}
    switch.activate(())
    run_plan(m, base_chain(grid, guidance), x, cond, uncond, switch,
             hook=lambda i, st, xa: states.__setitem__(st.s, xa))
    out: dict[str, dict] = {}
    for t, s in jumps:
        if t not in states or s not in states:
            raise ValueError(f"jump {t} -> {s} is not on the 50-step grid")
        xt, ref = states[t], states[s]
        a_t, a_s = m.schedule.abar(t, xt), m.schedule.abar(s, xt)
        switch.activate((SHORTCUT_ADAPTER,))
        e_short = guided_eps(m, xt, t, cond, uncond if shortcut_guidance != 1 else None, shortcut_guidance)
        switch.activate(())
        e_naive = guided_eps(m, xt, t, cond, uncond, guidance)
        norm = ref.flatten(1).norm(dim=1)
        errs = {name: ((ddim_step(xt, e, a_t, a_s) - ref).flatten(1).norm(dim=1) / norm)
                for name, e in (("shortcut", e_short), ("naive", e_naive))}
        for k in naive_steps:
            ts = [round(t - (t - s) * i / k) for i in range(k + 1)]
            xa = xt
            for a, b in zip(ts, ts[1:]):
                e = guided_eps(m, xa, a, cond, uncond, guidance)
                xa = ddim_step(xa, e, m.schedule.abar(a, xa), m.schedule.abar(b, xa))
            errs[f"naive{k}"] = (xa - ref).flatten(1).norm(dim=1) / norm
        out[f"{t}->{s}"] = {k: {"mean": float(v.mean()), "std": float(v.std())} for k, v in errs.items()}
        out[f"{t}->{s}"]["ratio"] = out[f"{t}->{s}"]["shortcut"]["mean"] / out[f"{t}->{s}"]["naive"]["mean"]
    return out


def few_step_plan(edges: Sequence[int] = (999, 749, 499, 249), net: str = "shortcut", guidance: float = 1.0):
    """A sampling plan that uses only jumps at the segment edges: the shortcut alone (or the base, naive)."""
    from .plans import BASE, SHORTCUT_NET, ChainPlan, Step

    pairs = [(t, edges[i + 1] if i + 1 < len(edges) else FINAL) for i, t in enumerate(edges)]
    kind, adapters = (SHORTCUT_NET, (SHORTCUT_ADAPTER,)) if net == "shortcut" else (BASE, ())
    steps = [Step(t, s, kind, adapters, guidance, readout="x" if s == FINAL else None) for t, s in pairs]
    return ChainPlan(f"{net}-{len(edges)}step", tuple(steps))
