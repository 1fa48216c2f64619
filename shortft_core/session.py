"""The sessions every host uses: the command line, the ComfyUI nodes and Python users make the same calls.

    from shortft_core import TrainRequest, tiny_config, train

    result = train(TrainRequest(out="runs/api", config=tiny_config()))   # the tiny world: model, shortcut, reward
    result.lora          # the LoRA set written (shortft_core.lora_set.LoraSet): segment files, merged, set.json
    result.before, result.after   # held-out evaluation rewards before and after training

A training session checks every input it can before loading anything (settings, prompts, the shortcut file and its
preset, the reward spec and its weight files, the run folder), resolves the settings against the model (a preset's
tiny-world-only settings, the held-out prompt count, the base's precision), loads what it was given as a spec, runs
the shortcut at the CFG scale it was made for (ShortFT: at most the tuned steps' scale) unless told otherwise,
trains with evaluation before and after, and writes the run: the LoRA set, ``history.json``, ``reward_curve.png``,
``before_after.png`` and ``run.json``. A distillation session (:func:`distill`) does the same for a shortcut LoRA.

Run folders follow one rule (:mod:`shortft_core.runs`): a finished run with the same settings is returned without
training, a partial one (checkpoints) resumes exactly, and different settings are refused naming them
(``overwrite=True`` starts over).

Hosts differ only in their own concerns: the command line adds argparse and a progress bar, the nodes add
sockets, ComfyUI's progress bar and its interrupt. A session is a context manager: on exit, however it ends, the
caller's model is left exactly as it was (adapters removed, layers unwrapped, flags and patches undone), and
everything runs outside ``torch.inference_mode`` so a host's worker thread can call it. A stop request (a
callback's ``should_stop`` or the ``stop`` callable) is honoured between iterations, and in training within one
network call; the run is then checkpointed and its outputs written, and the same request continues it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .config import TINY_EVAL_REWARDS, TINY_REWARD, TrainConfig, resolve_config
from .distillation import DistillConfig, Distiller
from .files import atomic_write_json, check_safetensors
from .lifecycle import ModelState, outside_inference_mode
from .loop import Callback
from .methods import method_plan
from .models import PRECISION, TINY, DiffusionModel, resolve_device
from .prompts import PromptSource, read_prompt_file
from .runs import FINISHED, PARTIAL, REUSED, STOPPED, RunFolder
from .trainer import History, Trainer

log = logging.getLogger(__name__)


@dataclass
class TrainRequest:
    """Everything one training run needs; every field but ``out`` has a default that suits the tiny world.

    ``config`` is either a whole :class:`TrainConfig`, used as given, or the settings the user set (a mapping of
    TrainConfig fields, or None), which the session completes from ``preset`` and the model: the preset's values
    under the user's, its tiny-world-only settings only for the tiny model, the held-out count from the prompts
    given and the precision from a loaded model's dtype (:func:`~shortft_core.config.resolve_config`)."""

    out: str | os.PathLike  # run folder: checkpoints, history.json, pictures, run.json (and lora/ by default)
    model: str | os.PathLike | DiffusionModel = TINY  # a model spec (see loading) or a loaded model, left as it was
    reward: str | Callable | None = None  # a spec like "10*pickscore+2*hps_v2", or a reward callable
    config: TrainConfig | Mapping[str, Any] | None = None  # None: TrainConfig's defaults (with the preset's)
    preset: str | None = None  # "tiny": the tiny world's settings under the user's (config given as settings only)
    prompts: Sequence[str] | str | os.PathLike | None = None  # a list, a prompt file, or None: tiny-world captions
    eval_prompts: Sequence[str] | str | os.PathLike | None = None  # None: config.eval_count tiny held-out prompts
    shortcut: str | os.PathLike | None = None  # "tiny", a LoRA file, or None: the model's own / the tiny one
    shortcut_preset: str | None = None  # schedule preset name (default: from the file name or its metadata)
    shortcut_guidance: float | None = None  # CFG of the shortcut jumps (None: Method.jump_guidance)
    eval_rewards: Sequence[str] = ()  # extra reward specs measured on the held-out prompts
    reward_paths: Mapping[str, Any] = field(default_factory=dict)  # {"hps_v2": "/models/HPS_v2_compressed.pt"}
    reward_weights_dir: str | os.PathLike | None = None  # folder searched for reward weight files
    lora_dir: str | os.PathLike | None = None  # where the LoRA set is written (default: out/lora)
    device: str | torch.device = "auto"  # auto: cuda when available (a loaded model stays where it is)
    cache_dir: str | os.PathLike | None = None  # tokenizer cache for single-file checkpoints (default: user cache)
    overwrite: bool = False  # start over in a run folder holding another run
    grid_prompts: int = 8  # prompts in before_after.png


@dataclass
class TrainResult:
    """What a training session produced. ``status``: finished, stopped (checkpointed; the same request continues)
    or reused (a finished run with the same settings was found and returned without training)."""

    status: str
    out: Path
    lora: Any  # shortft_core.lora_set.LoraSet
    history: Any  # shortft_core.trainer.History
    iteration: int
    before: dict | None
    after: dict | None
    files: dict[str, Path]

    @property
    def finished(self) -> bool:
        return self.status in (FINISHED, REUSED)


class _StopWhen(Callback):
    def __init__(self, asked: Callable[[], bool]) -> None:
        self.asked = asked

    def should_stop(self, loop) -> bool:
        return bool(self.asked())


def _digest(items: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(items).encode("utf-8")).hexdigest()[:16]


def _is_tiny(model: Any) -> bool:
    return (isinstance(model, str) and model == TINY) or (isinstance(model, DiffusionModel) and model.family == TINY)


def _precision_of(model: DiffusionModel) -> str:
    """The mixed_precision setting that names a loaded model's dtype."""
    return next((k for k, v in PRECISION.items() if v == model.dtype), "no")


class _Session:
    """What every session shares: the host's callbacks and stop request, the run folder, and on exit the caller's
    model restored (:meth:`close`). ``check()`` validates before anything loads; ``run()`` works outside inference
    mode with gradients on, whatever the calling thread's mode."""

    def __init__(self, out: str | os.PathLike, callbacks: Sequence[Callback], stop: Callable[[], bool] | None) -> None:
        self.callbacks = list(callbacks) + ([_StopWhen(stop)] if stop is not None else [])
        self.out = Path(out).expanduser()
        self.checked = False
        self._state: ModelState | None = None
        self.model: DiffusionModel | None = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def check(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Leave the caller's model as it was (a model the session loaded itself is simply released)."""
        if self._state is not None:
            with torch.inference_mode(False):
                self._state.restore()
            self._state = None
        self.model = None

    @outside_inference_mode
    def run(self):
        """Run (or reuse, or continue) the run in the folder; see the module docstring."""
        if not self.checked:
            self.check()
        with torch.enable_grad():
            return self._run()

    def _run(self):
        raise NotImplementedError

    def _model(self, spec: str | os.PathLike | DiffusionModel, device: torch.device, precision: str,
               cache_dir: str | os.PathLike | None = None) -> DiffusionModel:
        """The model to work on: a loaded one (its state recorded, to restore on close) or one loaded from a spec."""
        if isinstance(spec, DiffusionModel):
            self._state = ModelState.capture(spec)
            self.model = spec
        else:
            from .loading import load_model

            kw = {"cache_dir": cache_dir} if cache_dir is not None else {}
            self.model = load_model(spec, device, PRECISION[precision], **kw)
        return self.model


class TrainingSession(_Session):
    """One training run of a :class:`TrainRequest`: ``check()`` (cheap, before any model loads), ``run()``, and on
    exit the caller's model restored. Use it as a context manager; :func:`train` does all three."""

    def __init__(self, request: TrainRequest, callbacks: Sequence[Callback] = (),
                 stop: Callable[[], bool] | None = None, accelerator: Any = None) -> None:
        super().__init__(request.out, callbacks, stop)
        self.request = request
        self.accelerator = accelerator
        self.lora_dir = Path(request.lora_dir).expanduser() if request.lora_dir else self.out / "lora"
        self.folder = RunFolder(self.out, TrainConfig, Trainer.resume_may_change, (self.lora_dir,))
        self.trainer: Trainer | None = None

    # ----- before any heavy work -------------------------------------------------------------------------------
    def check(self) -> None:
        """Validate every input that can be checked without loading a model and resolve the settings
        (``self.config``); raises ValueError / FileNotFoundError naming the input and the fix."""
        req = self.request
        self.tiny = _is_tiny(req.model)
        self.config = self._resolve_config()
        cfg = self.config
        if req.reward is None and not self.tiny:
            raise ValueError("a reward is required for a real model (--reward), e.g. hps_v2 with its weight file: "
                             "--reward hps_v2 --reward-path hps_v2=/models/HPS_v2_compressed.pt")
        self.reward_spec = req.reward if req.reward is not None else TINY_REWARD
        self.eval_specs: list[str] = []
        if isinstance(self.reward_spec, str):
            self.eval_specs.append(self.reward_spec)
        self.eval_specs += [s for s in req.eval_rewards if s not in self.eval_specs]
        if self.tiny:
            self.eval_specs += [s for s in TINY_EVAL_REWARDS if s not in self.eval_specs]
        from .rewards.registry import check_reward_spec

        for spec in self.eval_specs:
            check_reward_spec(spec, req.reward_paths, weights_dir=req.reward_weights_dir, files=True)
        if req.prompts is None:
            if not self.tiny:
                raise ValueError("training prompts are required for a real model (--prompts-file)")
            self.prompts = PromptSource.tiny(exclude=self.eval_prompts)
        elif isinstance(req.prompts, (str, os.PathLike)):
            self.prompts = PromptSource.from_file(req.prompts, exclude=self.eval_prompts)
        else:
            self.prompts = PromptSource(list(req.prompts), exclude=self.eval_prompts)
        self.shortcut_file: Path | None = None
        if cfg.needs_shortcut:
            self.shortcut_file = self._shortcut_file()
        if req.shortcut_preset:
            from .shortcut import get_preset

            get_preset(req.shortcut_preset)
        if self.shortcut_file is not None and req.shortcut_guidance is None:
            self._check_jump_guidance()
        if not isinstance(req.model, DiffusionModel) and str(req.model).endswith(".safetensors"):
            check_safetensors(Path(req.model).expanduser(), "model")  # a damaged checkpoint, before it loads
        self.device = req.model.device if isinstance(req.model, DiffusionModel) else resolve_device(req.device)
        self.settings = self._settings()
        self.previous = self.folder.previous(self.settings, req.overwrite)
        self.checked = True

    def _resolve_config(self) -> TrainConfig:
        """The run's TrainConfig (see :class:`TrainRequest`); also reads the held-out prompts (``eval_prompts``)."""
        req = self.request
        if isinstance(req.config, TrainConfig):
            if req.preset is not None:
                raise ValueError("give the settings the user set with a preset, or a whole TrainConfig without one: "
                                 f"got a TrainConfig and preset {req.preset!r}")
            req.config.validate()
            cfg = req.config
        else:
            user = dict(req.config or {})
            cfg = resolve_config(user, req.preset, tiny=self.tiny)
            if isinstance(req.model, DiffusionModel) and "mixed_precision" not in user:
                cfg = dataclasses.replace(cfg, mixed_precision=_precision_of(req.model))
        if req.eval_prompts is None:
            if self.tiny:
                from .tiny_world import held_out_prompts

                self.eval_prompts = held_out_prompts(cfg.eval_count, seed=1)
            else:
                self.eval_prompts = []
                log.warning("no evaluation prompts were given for a real model: no held-out evaluation (give "
                            "eval_prompts / --eval-prompts-file to measure the reward before and after)")
        elif isinstance(req.eval_prompts, (str, os.PathLike)):
            self.eval_prompts = read_prompt_file(req.eval_prompts)
        else:
            self.eval_prompts = [p.strip() for p in req.eval_prompts if p and p.strip()]
        if len(self.eval_prompts) != cfg.eval_count and not isinstance(req.config, TrainConfig):
            cfg = dataclasses.replace(cfg, eval_count=len(self.eval_prompts))
        return cfg

    def _shortcut_file(self) -> Path | None:
        """The shortcut LoRA file to load, or None when the given model already carries one."""
        from .adapters import SHORTCUT_ADAPTER
        from .lora_io import lora_file

        req = self.request
        carried = getattr(req.model.unet, "peft_config", {}) if isinstance(req.model, DiffusionModel) else {}
        if SHORTCUT_ADAPTER in (carried or {}):
            if req.shortcut not in (None, "none"):
                raise ValueError("the model already carries a shortcut adapter; pass shortcut=None to use it, or a "
                                 "model without one")
            return None
        name = req.shortcut if req.shortcut is not None else ("tiny" if self.tiny else None)
        if name in (None, "none"):
            raise ValueError(f"method {self.config.method} needs a shortcut: give a Hyper-SD / PCM / TCD or distilled "
                             "LoRA file (--shortcut FILE), or use shortcut_net 'base' for naive DDIM jumps")
        if name == "tiny":
            from .tiny_world import tiny_shortcut_path

            return tiny_shortcut_path()
        return lora_file(name)

    def _check_jump_guidance(self) -> None:
        """Refuse a published shortcut whose jumps would run at a CFG scale outside the range its model card gives
        (e.g. a CFG-distilled Hyper-SD LoRA under an unguided run): its jumps would leave the trajectory it keeps."""
        from .shortcut import find_preset

        req, cfg = self.request, self.config
        preset = find_preset(self.shortcut_file, req.shortcut_preset)
        if preset is None:
            return
        jumps = cfg.method_entry.jump_guidance(cfg, preset.guidance)
        low, high = preset.guidance_range
        if not low <= jumps <= high:
            raise ValueError(f"shortcut {preset.name} is made for CFG {low:g} to {high:g}, but with guidance "
                             f"{cfg.guidance:g} (--guidance) its jumps would run at CFG {jumps:g}: raise guidance to at "
                             f"least {low:g}, or use a shortcut made for CFG {jumps:g} (e.g. a Hyper-SD or PCM "
                             "LoRA without CFG in its name)")

    @property
    def reuses(self) -> bool:
        """Whether the run folder holds this run finished, which :meth:`run` returns without training (known after
        :meth:`check`; a host need not prepare the model for it)."""
        cfg = self.config
        wanted = cfg.iterations if cfg.time_budget_s is None else None
        return not self.request.overwrite and RunFolder.done(self.previous, wanted)

    def _settings(self) -> dict:
        """What identifies the run: a run folder with other settings is a different run."""
        req = self.request
        model = req.model.source if isinstance(req.model, DiffusionModel) else str(req.model)
        reward = self.reward_spec if isinstance(self.reward_spec, str) else reward_label(self.reward_spec)
        shortcut = None
        if self.shortcut_file is not None:
            shortcut = {"file": str(self.shortcut_file), "preset": req.shortcut_preset,
                        "guidance": req.shortcut_guidance}
        elif self.config.needs_shortcut and isinstance(req.model, DiffusionModel):  # the shortcut the model carries
            shortcut = {**req.model.info.get("shortcut", {"file": "(loaded by the caller)"}),
                        "guidance_override": req.shortcut_guidance}
        return {"config": self.config.to_dict(), "model": model, "reward": reward, "eval_rewards": self.eval_specs,
                "shortcut": shortcut, "prompts": _digest(self.prompts.prompts),
                "eval_prompts": _digest(self.eval_prompts)}

    # ----- the run -------------------------------------------------------------------------------------------------
    def close(self) -> None:
        super().close()
        self.trainer = None

    def _run(self) -> TrainResult:
        req, cfg = self.request, self.config
        if self.reuses:
            log.info("run folder %s holds this finished run: returning it without training", self.out)
            return self._reused(self.previous)
        if req.overwrite:
            self.folder.start_over()
            if (self.lora_dir / "set.json").is_file():
                shutil.rmtree(self.lora_dir, ignore_errors=True)
        self.out.mkdir(parents=True, exist_ok=True)
        model = self._model(req.model, self.device, cfg.mixed_precision, req.cache_dir)
        preset = self._load_shortcut(model)
        if preset is not None and req.shortcut_guidance is None:
            cfg = dataclasses.replace(cfg, shortcut_guidance=cfg.method_entry.jump_guidance(cfg, preset.guidance))
        elif req.shortcut_guidance is not None:
            cfg = dataclasses.replace(cfg, shortcut_guidance=req.shortcut_guidance)
        reward, eval_rewards = self._build_rewards()
        self.trainer = trainer = Trainer(model, reward, cfg, self.prompts, self.eval_prompts, out=self.out,
                                         callbacks=self.callbacks, accelerator=self.accelerator,
                                         eval_reward=eval_rewards, shortcut_preset=preset)
        resumed = trainer.resume()
        self._write_run_file(PARTIAL)
        log.info("training plan (stage %d):\n%s", max(1, trainer.stage),
                 method_plan(cfg, max(1, trainer.stage), torch.Generator().manual_seed(0)).describe())
        if resumed:
            log.info("continuing the run in %s at iteration %d", self.out, trainer.iteration)
        history: History = trainer.fit()
        status = STOPPED if trainer.stopped else FINISHED
        if not trainer.acc.is_main_process:
            return self._result(status, None, {})
        files = self._write_outputs(trainer, history, final=not trainer.stopped)
        self._write_run_file(status, trainer.iteration)
        from .lora_set import LoraSet

        return self._result(status, LoraSet.open(self.lora_dir), files)

    def _load_shortcut(self, model: DiffusionModel):
        """Load the shortcut file (when the model has none) and return its preset, or None."""
        req = self.request
        if not self.config.needs_shortcut:
            return None
        from .shortcut import attach_shortcut, get_preset

        if self.shortcut_file is None:  # the model brought its own (and its preset, when it was attached here)
            return get_preset(req.shortcut_preset) if req.shortcut_preset else model.info.get("shortcut_preset")
        return attach_shortcut(model, self.shortcut_file, preset=req.shortcut_preset)

    def _build_rewards(self) -> tuple[Callable, dict[str, Callable]]:
        """The training reward and every evaluation reward by its label (a reward given built is used as is)."""
        from .rewards.registry import build_reward_spec

        req = self.request
        label = reward_label(self.reward_spec)
        built: dict[str, Callable] = {} if isinstance(self.reward_spec, str) else {label: self.reward_spec}
        for spec in self.eval_specs:
            if spec not in built:
                built[spec] = build_reward_spec(spec, req.reward_paths, weights_dir=req.reward_weights_dir,
                                                device=self.model.device)
        return built[label], built

    def _write_outputs(self, trainer, history, final: bool) -> dict[str, Path]:
        """The LoRA set, history and reward curve (always), and the before/after grid (a finished run)."""
        from .images import save_png

        cfg = trainer.cfg
        files = {"lora": self.lora_dir, "history": self.out / "history.json",
                 "reward_curve": self.out / "reward_curve.png"}
        trainer.save_lora_set(self.lora_dir, overwrite=True)
        atomic_write_json(files["history"], dataclasses.asdict(history))
        _plot_reward_curve(history, files["reward_curve"], cfg, self.eval_specs, self.reward_spec)
        if final:
            from .plots import before_after_grid

            grid_prompts = (self.eval_prompts or self.prompts.prompts)[: self.request.grid_prompts]
            before = trainer.sample(grid_prompts, seed=0, use_adapters=False, phase="before")
            after = trainer.sample(grid_prompts, seed=0, phase="after")
            with torch.no_grad():
                device = trainer.model.device
                texts = trainer.model.reward_prompts(grid_prompts)
                scores = [trainer.reward(images.to(device), texts).float().cpu().tolist()
                          for images in (before, after)]
            held_out = None
            if self.tiny:
                from .tiny_world import is_held_out

                held_out = [is_held_out(p) for p in grid_prompts]
            files["before_after"] = self.out / "before_after.png"
            save_png(before_after_grid(before, after, grid_prompts, rewards_before=scores[0], rewards_after=scores[1],
                                       held_out=held_out, reward_name=reward_label(self.reward_spec)),
                     files["before_after"])
        return files

    def _write_run_file(self, status: str, iteration: int = 0) -> None:
        self.folder.write(status, iteration, self.settings, lora=str(self.lora_dir))

    def _result(self, status: str, lora: Any, files: dict[str, Path]) -> TrainResult:
        history = self.trainer.history
        evals = history.evals
        return TrainResult(status, self.out, lora, history, self.trainer.iteration,
                           evals[0] if evals else None, evals[-1] if len(evals) > 1 else None, files)

    def _reused(self, previous: dict) -> TrainResult:
        from .lora_set import LoraSet

        history = History(**json.loads((self.out / "history.json").read_text(encoding="utf-8")))
        files = {k: self.out / f for k, f in (("history", "history.json"), ("reward_curve", "reward_curve.png"),
                                               ("before_after", "before_after.png")) if (self.out / f).is_file()}
        lora_dir = Path(previous.get("lora") or self.lora_dir)
        files["lora"] = lora_dir
        evals = history.evals
        return TrainResult(REUSED, self.out, LoraSet.open(lora_dir), history, int(previous.get("iteration", 0)),
                           evals[0] if evals else None, evals[-1] if len(evals) > 1 else None, files)


def reward_label(reward: Any) -> str:
    """What names a reward in a run's settings and pictures: its spec, else its name, else its type."""
    if isinstance(reward, str):
        return reward
    return getattr(reward, "spec", None) or getattr(reward, "name", None) or type(reward).__name__


def _plot_reward_curve(history, path: Path, cfg: TrainConfig, eval_specs: Sequence[str], reward_spec: Any) -> None:
    """reward_curve.png of the run: training batches, every held-out evaluation, stages, the untrained reward."""
    from .plots import plot_reward_curve

    name = reward_label(reward_spec)
    untrained = next((s for s in eval_specs if s != name), None)
    plot_reward_curve(dataclasses.asdict(history), path, method=cfg.method, reward_name=name,
                      untrained_name=untrained)


def train(request: TrainRequest, callbacks: Sequence[Callback] = (), stop: Callable[[], bool] | None = None,
          accelerator: Any = None) -> TrainResult:
    """Check, run and close one :class:`TrainingSession`."""
    with TrainingSession(request, callbacks, stop, accelerator) as session:
        session.check()
        return session.run()


# ----- distillation ------------------------------------------------------------------------------------------------
SHORTCUT_FILE = "shortcut.safetensors"


@dataclass
class DistillRequest:
    """One shortcut distillation run (:mod:`shortft_core.distillation`): the run folder receives
    ``shortcut.safetensors``, checkpoints and ``run.json``."""

    out: str | os.PathLike
    model: str | os.PathLike | DiffusionModel = TINY  # a model spec (see loading) or a loaded model, left as it was
    config: DistillConfig = field(default_factory=DistillConfig)
    prompts: Sequence[str] | str | os.PathLike | None = None  # data-free prompts (None: config's, else the tiny's)
    device: str | torch.device = "auto"
    cache_dir: str | os.PathLike | None = None
    overwrite: bool = False


@dataclass
class DistillResult:
    """What a distillation session produced: ``status`` as :class:`TrainResult`'s, the shortcut file, the steps
    done and the last step's metrics (loss, seconds per step of this run, peak CUDA memory when on a GPU)."""

    status: str
    out: Path
    shortcut: Path
    step: int
    metrics: dict

    @property
    def finished(self) -> bool:
        return self.status in (FINISHED, REUSED)


class DistillSession(_Session):
    """One distillation run of a :class:`DistillRequest`, with :class:`TrainingSession`'s pattern: ``check()``,
    ``run()``, the caller's model restored on exit; :func:`distill` does all three."""

    def __init__(self, request: DistillRequest, callbacks: Sequence[Callback] = (),
                 stop: Callable[[], bool] | None = None) -> None:
        super().__init__(request.out, callbacks, stop)
        self.request = request
        self.target = self.out / SHORTCUT_FILE
        self.folder = RunFolder(self.out, DistillConfig, Distiller.resume_may_change, (self.target,))

    def check(self) -> None:
        """Validate the settings and the data source for the model, and the run folder, before anything loads."""
        req = self.request
        cfg = req.config
        if req.prompts is not None:
            prompts = read_prompt_file(req.prompts) if isinstance(req.prompts, (str, os.PathLike)) \
                else [p.strip() for p in req.prompts if p and p.strip()]
            cfg = dataclasses.replace(cfg, prompts=tuple(prompts))
        cfg.validate()
        cfg.check_data(tiny=_is_tiny(req.model))
        if isinstance(req.model, DiffusionModel):
            cfg.validate(req.model)
        self.config = cfg
        self.device = req.model.device if isinstance(req.model, DiffusionModel) else resolve_device(req.device)
        model = req.model.source if isinstance(req.model, DiffusionModel) else str(req.model)
        self.settings = {"config": cfg.to_dict(), "model": model}
        self.previous = self.folder.previous(self.settings, req.overwrite)
        self.checked = True

    def _run(self) -> DistillResult:
        from .adapters import SHORTCUT_ADAPTER
        from .lora_io import export_lora

        req, cfg = self.request, self.config
        if not req.overwrite and RunFolder.done(self.previous, cfg.steps):
            log.info("run folder %s holds this finished distillation: returning it without training", self.out)
            return DistillResult(REUSED, self.out, self.target, int(self.previous.get("iteration", 0)), {})
        if req.overwrite:
            self.folder.start_over()
        self.out.mkdir(parents=True, exist_ok=True)
        model = self._model(req.model, self.device, cfg.mixed_precision, req.cache_dir)
        distiller = Distiller(model, cfg, self.out, callbacks=self.callbacks)
        if distiller.resume():
            log.info("continuing the distillation in %s at step %d", self.out, distiller.step)
        self.folder.write(PARTIAL, distiller.step, self.settings)
        metrics = dict(distiller.iterate())
        if metrics and model.device.type == "cuda":
            metrics["peak_cuda_gib"] = torch.cuda.max_memory_allocated(model.device) / 2**30
        export_lora(model.unet, SHORTCUT_ADAPTER, self.target, layout="kohya", metadata=distiller.metadata(),
                    overwrite=True)
        status = STOPPED if distiller.stopped else FINISHED
        self.folder.write(status, distiller.step, self.settings)
        return DistillResult(status, self.out, self.target, distiller.step, metrics)


def distill(request: DistillRequest, callbacks: Sequence[Callback] = (),
            stop: Callable[[], bool] | None = None) -> DistillResult:
    """Check, run and close one :class:`DistillSession`."""
    with DistillSession(request, callbacks, stop) as session:
        session.check()
        return session.run()
