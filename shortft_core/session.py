"""One training session for every host: the command line, the ComfyUI nodes and Python users make the same call.

    from shortft_core.config import tiny_config
    from shortft_core.session import TrainRequest, train

    result = train(TrainRequest(out="runs/api", config=tiny_config()))   # the tiny world: model, shortcut, reward
    result.lora          # the LoRA set written (shortft_core.lora_set.LoraSet): segment files, merged, set.json
    result.before, result.after   # held-out evaluation rewards before and after training

A session checks every input it can before loading anything (settings, prompts, the shortcut file and its
preset, the reward spec and its weight files, the run folder), loads what it was given as a spec, runs the
shortcut at the CFG scale it was made for (ShortFT: at most the tuned steps' scale) unless told otherwise, trains
with evaluation before and after, and writes the run: the LoRA set, ``history.json``, ``reward_curve.png``,
``before_after.png`` and ``run.json``.

Run folders are idempotent: a finished run with the same settings is returned without training, a partial one
(checkpoints) resumes exactly, and different settings are refused naming them (``overwrite=True`` starts over).

Hosts differ only in their own concerns: the command line adds argparse and a progress bar, the nodes add
sockets, ComfyUI's progress bar and its interrupt. A session is a context manager: on exit, however it ends, the
caller's model is left exactly as it was (adapters removed, layers unwrapped, flags and patches undone), and
everything runs outside ``torch.inference_mode`` so a host's worker thread can call it. A stop request (a
callback's ``should_stop`` or the ``stop`` callable) is honoured within one network call; the run is then
checkpointed and its partial LoRA set written, and the same request continues it.
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

from .checkpoint import changed_config
from .config import TINY_EVAL_REWARDS, TINY_REWARD, TrainConfig
from .io import atomic_write_json
from .lifecycle import ModelState, outside_inference_mode
from .loop import Callback
from .methods import method_plan
from .models import PRECISION, TINY, T2IModel, resolve_device
from .trainer import History, PromptSource, Trainer, read_prompt_file

log = logging.getLogger(__name__)

RUN_FILE = "run.json"


@dataclass
class TrainRequest:
    """Everything one training run needs; every field but ``out`` has a default that suits the tiny world."""

    out: str | os.PathLike  # run folder: checkpoints, history.json, pictures, run.json (and lora/ by default)
    model: str | os.PathLike | T2IModel = TINY  # a model spec (see loading) or a loaded model, left as it was
    reward: str | Callable | None = None  # a spec like "10*pickscore+2*hps_v2", or a reward callable
    config: TrainConfig = field(default_factory=TrainConfig)
    prompts: Sequence[str] | str | os.PathLike | None = None  # a list, a prompt file, or None: tiny-world captions
    eval_prompts: Sequence[str] | str | os.PathLike | None = None  # None: config.eval_prompts tiny held-out prompts
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
    """What a session produced. ``status``: finished, stopped (checkpointed; the same request continues) or reused
    (a finished run with the same settings was found and returned without training)."""

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
        return self.status in ("finished", "reused")


class _StopWhen(Callback):
    def __init__(self, asked: Callable[[], bool]) -> None:
        self.asked = asked

    def should_stop(self, loop) -> bool:
        return bool(self.asked())


def _digest(items: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(items).encode("utf-8")).hexdigest()[:16]


class TrainingSession:
    """One training run of a :class:`TrainRequest`: ``check()`` (cheap, before any model loads), ``run()``, and on
    exit the caller's model restored. Use it as a context manager; :func:`train` does all three."""

    def __init__(self, request: TrainRequest, callbacks: Sequence[Callback] = (),
                 stop: Callable[[], bool] | None = None, accelerator: Any = None) -> None:
        self.request = request
        self.callbacks = list(callbacks) + ([_StopWhen(stop)] if stop is not None else [])
        self.accelerator = accelerator
        self.out = Path(request.out).expanduser()
        self.lora_dir = Path(request.lora_dir).expanduser() if request.lora_dir else self.out / "lora"
        self.checked = False
        self._state: ModelState | None = None
        self.model: T2IModel | None = None
        self.trainer = None

    # ----- before any heavy work -------------------------------------------------------------------------------
    def check(self) -> None:
        """Validate every input that can be checked without loading a model; raises ValueError /
        FileNotFoundError naming the input and the fix."""
        req, cfg = self.request, self.request.config
        cfg.validate()
        self.tiny = isinstance(req.model, str) and req.model == TINY or (
            isinstance(req.model, T2IModel) and req.model.family == "tiny")
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
        # prompts
        if req.eval_prompts is None:
            from .tiny_world import held_out_prompts

            self.eval_prompts = held_out_prompts(cfg.eval_prompts, seed=1) if self.tiny or cfg.eval_prompts == 0 \
                else None
            if self.eval_prompts is None:
                raise ValueError("evaluation prompts are required for a real model (--eval-prompts-file), or set "
                                 "eval_prompts to 0 to skip the held-out evaluation")
        elif isinstance(req.eval_prompts, (str, os.PathLike)):
            self.eval_prompts = read_prompt_file(req.eval_prompts)
        else:
            self.eval_prompts = [p.strip() for p in req.eval_prompts if p and p.strip()]
        if req.prompts is None:
            if not self.tiny:
                raise ValueError("training prompts are required for a real model (--prompts-file)")
            self.prompts = PromptSource.tiny(exclude=self.eval_prompts)
        elif isinstance(req.prompts, (str, os.PathLike)):
            self.prompts = PromptSource.from_file(req.prompts, exclude=self.eval_prompts)
        else:
            self.prompts = PromptSource(list(req.prompts), exclude=self.eval_prompts)
        # the shortcut
        self.shortcut_file: Path | None = None
        if cfg.needs_shortcut:
            self.shortcut_file = self._shortcut_file()
        if req.shortcut_preset:
            from .shortcut import get_preset

            get_preset(req.shortcut_preset)
        if not isinstance(req.model, T2IModel) and str(req.model).endswith(".safetensors"):
            from .io import check_safetensors

            check_safetensors(Path(req.model).expanduser(), "model")  # a damaged checkpoint, before it loads
        self.device = req.model.device if isinstance(req.model, T2IModel) else resolve_device(req.device)
        self.settings = self._settings()
        self.previous = self._previous_run()
        self.checked = True

    def _shortcut_file(self) -> Path | None:
        """The shortcut LoRA file to load, or None when the given model already carries one."""
        from .adapters import SHORTCUT
        from .lora_io import lora_file

        req = self.request
        if isinstance(req.model, T2IModel) and SHORTCUT in (getattr(req.model.unet, "peft_config", {}) or {}):
            if req.shortcut not in (None, "none"):
                raise ValueError("the model already carries a shortcut adapter; pass shortcut=None to use it, or a "
                                 "model without one")
            return None
        name = req.shortcut if req.shortcut is not None else ("tiny" if self.tiny else None)
        if name in (None, "none"):
            raise ValueError(f"method {req.config.method} needs a shortcut: give a Hyper-SD / PCM / TCD or distilled "
                             "LoRA file (--shortcut FILE), or use shortcut_net 'base' for naive DDIM jumps")
        if name == "tiny":
            from .tiny_world import tiny_shortcut_path

            return tiny_shortcut_path()
        return lora_file(name)

    def _settings(self) -> dict:
        """What identifies the run: a run folder with other settings is a different run."""
        req = self.request
        model = req.model.source if isinstance(req.model, T2IModel) else str(req.model)
        reward = self.reward_spec if isinstance(self.reward_spec, str) else reward_label(self.reward_spec)
        shortcut = None
        if self.shortcut_file is not None:
            shortcut = {"file": str(self.shortcut_file), "preset": req.shortcut_preset,
                        "guidance": req.shortcut_guidance}
        elif req.config.needs_shortcut and isinstance(req.model, T2IModel):  # the shortcut the model carries
            shortcut = {**req.model.info.get("shortcut", {"file": "(loaded by the caller)"}),
                        "guidance_override": req.shortcut_guidance}
        return {"config": req.config.to_dict(), "model": model, "reward": reward, "eval_rewards": self.eval_specs,
                "shortcut": shortcut, "prompts": _digest(self.prompts.prompts),
                "eval_prompts": _digest(self.eval_prompts)}

    def _previous_run(self) -> dict | None:
        """The run already in the folder (its run.json), checked against this one; None for an empty folder."""
        run_file = self.out / RUN_FILE
        if not run_file.is_file():
            ckpt = self.out / "checkpoints"
            found = [str(p) for p in (ckpt, self.lora_dir) if p.is_dir() and any(p.iterdir())]
            if found and not self.request.overwrite:
                raise ValueError(f"{' and '.join(found)} hold an earlier run's files but {run_file} is missing; pass "
                                 "overwrite=True (--overwrite) to start over, or choose another folder")
            return None
        previous = json.loads(run_file.read_text(encoding="utf-8"))
        diff = differing_settings(previous.get("settings", {}), self.settings)
        if diff and not self.request.overwrite:
            raise ValueError(f"run folder {self.out} holds a run with other settings ({', '.join(diff)}); use the same "
                             "settings to continue or reuse it, pass overwrite=True (--overwrite) to start over, "
                             "or choose another folder")
        return None if diff else previous

    # ----- the run -------------------------------------------------------------------------------------------------
    def __enter__(self) -> "TrainingSession":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def close(self) -> None:
        """Leave the caller's model as it was (a model the session loaded itself is simply released)."""
        if self._state is not None:
            with torch.inference_mode(False):
                self._state.restore()
            self._state = None
        self.trainer = None
        self.model = None

    @outside_inference_mode
    def run(self) -> TrainResult:
        """Train (or reuse, or continue) the run; see the module docstring."""
        if not self.checked:
            self.check()
        with torch.enable_grad():
            return self._run()

    def _run(self) -> TrainResult:
        req, cfg = self.request, self.request.config
        previous = self.previous
        if (previous is not None and previous.get("status") == "finished" and not req.overwrite
                and not self._wants_more(previous)):
            log.info("run folder %s holds this finished run: returning it without training", self.out)
            return self._reused(previous)
        if req.overwrite:
            self._clear_run_folder()
        self.out.mkdir(parents=True, exist_ok=True)
        model = self._load_model()
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
        self._write_run_file("partial")
        log.info("training plan (stage %d):\n%s", max(1, trainer.stage),
                 method_plan(cfg, max(1, trainer.stage), torch.Generator().manual_seed(0)).describe())
        if resumed:
            log.info("continuing the run in %s at iteration %d", self.out, trainer.iteration)
        history: History = trainer.fit()
        if not trainer.acc.is_main_process:
            return self._result("finished" if not trainer.stopped else "stopped", None, {})
        files = self._write_outputs(trainer, history, final=not trainer.stopped)
        status = "stopped" if trainer.stopped else "finished"
        self._write_run_file(status, trainer.iteration)
        from .lora_set import LoraSet

        return self._result(status, LoraSet.open(self.lora_dir), files)

    def _wants_more(self, previous: dict) -> bool:
        """A finished run is continued when the request asks for more iterations than it did."""
        cfg = self.request.config
        return cfg.time_budget_s is None and int(previous.get("iteration", 0)) < cfg.iterations

    def _load_model(self) -> T2IModel:
        req = self.request
        if isinstance(req.model, T2IModel):
            self._state = ModelState.capture(req.model)
            self.model = req.model
        else:
            from .loading import load_model

            kw = {"cache_dir": req.cache_dir} if req.cache_dir is not None else {}
            self.model = load_model(req.model, self.device, PRECISION[req.config.mixed_precision], **kw)
        return self.model

    def _load_shortcut(self, model: T2IModel):
        """Load the shortcut file (when the model has none) and return its preset, or None."""
        req = self.request
        if not req.config.needs_shortcut:
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

    def _clear_run_folder(self) -> None:
        """overwrite=True: the earlier run's checkpoints, run file and LoRA set go before the new run starts."""
        ckpt = self.out / "checkpoints"
        if ckpt.is_dir():
            for f in ckpt.iterdir():
                if f.is_file():
                    f.unlink(missing_ok=True)
        (self.out / RUN_FILE).unlink(missing_ok=True)
        if (self.lora_dir / "set.json").is_file():
            shutil.rmtree(self.lora_dir, ignore_errors=True)

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
                scores = [trainer.reward(images.to(device), grid_prompts).float().cpu().tolist()
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
        atomic_write_json(self.out / RUN_FILE, {"status": status, "iteration": iteration, "settings": self.settings,
                                                "lora": str(self.lora_dir)})

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
        return TrainResult("reused", self.out, LoraSet.open(lora_dir), history, int(previous.get("iteration", 0)),
                           evals[0] if evals else None, evals[-1] if len(evals) > 1 else None, files)


def reward_label(reward: Any) -> str:
    """What names a reward in a run's settings and pictures: its spec, else its name, else its type."""
    if isinstance(reward, str):
        return reward
    return getattr(reward, "spec", None) or getattr(reward, "name", None) or type(reward).__name__


def differing_settings(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Names of the settings that differ between two runs' ``settings`` (config fields by their own names, a field
    added after a run was written at its default: :func:`~shortft_core.checkpoint.changed_config`)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if key == "config":
            out += changed_config(a or {}, b or {}, TrainConfig().to_dict(), Trainer.resume_may_change)
        elif json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            out.append(key)
    return out


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
