"""ShortFTTrain: reward fine-tuning inside ComfyUI, through the same library session as the command line.

The node turns its widgets into a :class:`~shortft_core.session.TrainRequest` and adds only ComfyUI's concerns:
ComfyUI's own models are freed first, progress goes to the node's bar (with preview images) and, at every
iteration, metrics go to the queueing client over the websocket (``shortft.progress``) for the live chart; the
stop request is ComfyUI's interrupt, honoured within one network call, after which the run is checkpointed, its
partial LoRA set written, and the same graph queued again continues it. A finished run with the same settings is
returned without training, so a re-queued graph or a cache eviction never trains twice.

Files: the run (checkpoints, history.json, reward_curve.png, before_after.png, run.json) in
``output/shortft/<run_name>/``; the LoRA set in ``models/loras/shortft/<run_name>/``, where the stock Load LoRA node
lists its ``merged.safetensors`` and LoadLoRASet / ApplyAlignedLoRA list the set.
"""

from __future__ import annotations

import gc
import io as _io
import logging
import threading
import time
from typing import Any

import comfy.model_management as mm
import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from ..shortft_core.config import TINY_PRESET, TrainConfig
from ..shortft_core.loop import Callback
from ..shortft_core.methods import METHODS
from ..shortft_core.models import PRECISION
from ..shortft_core.trainer import prompt_lines
from .common import CATEGORY, LORA_SET, SHORTFT_MODEL, SHORTFT_REWARD, pil_image, png_image, run_folders

log = logging.getLogger(__name__)

TEXT, FILE, TINY_CAPTIONS = "prompts below", "prompt file", "tiny-world captions"
BAR = 1000  # resolution of the node's progress bar
PROGRESS_EVENT = "shortft.progress"

# The latest metrics of every training node of this server, so a reloaded page rebuilds its chart (served by
# nodes/live.py), and the latest preview image of each (JPEG bytes).
LIVE: dict[str, dict[str, Any]] = {}
PREVIEWS: dict[str, bytes] = {}
_LIVE_LOCK = threading.Lock()


def _copy(entry: dict[str, Any]) -> dict[str, Any]:
    return {**entry, "points": list(entry.get("points", [])), "evals": [dict(e) for e in entry.get("evals", [])]}


def live_state(node_id: str | None = None) -> dict[str, Any]:
    """A copy of the live metrics (of one node, or of all), safe to serialise while training goes on."""
    with _LIVE_LOCK:
        if node_id is not None:
            return _copy(LIVE[node_id]) if node_id in LIVE else {}
        return {k: _copy(v) for k, v in LIVE.items()}


def live_preview(node_id: str) -> bytes | None:
    """The latest preview image of a training node as JPEG bytes, or None."""
    with _LIVE_LOCK:
        return PREVIEWS.get(node_id)


def _prompt_id() -> str | None:
    """The id of the prompt being executed (None outside a ComfyUI server)."""
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
    except ImportError:
        return None
    context = get_executing_context()
    if context is not None:
        return context.prompt_id
    server = getattr(PromptServer, "instance", None)
    return getattr(server, "last_prompt_id", None)


def _send(event: dict[str, Any]) -> None:
    """One message, with its prompt id, to the client that queued the prompt (thread-safe; nothing when no server
    runs)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return
    server.send_sync(PROGRESS_EVENT, {"prompt_id": _prompt_id(), **event}, server.client_id)


class ComfyProgress(Callback):
    """The session's callbacks in ComfyUI: the node's progress bar with previews, websocket metrics, and the
    interrupt as the stop request (a bar update that raises ComfyUI's interrupt is turned into one).

    Every callback also updates the node's entry in ``LIVE`` (and its preview in ``PREVIEWS``), which the web
    chart reads after a page reload; ``reward_name`` is the key of the trained reward in the eval results, so the
    chart draws those held-out points on its reward axis."""

    def __init__(self, node_id: str | None, run_name: str, iterations: int, reward_name: str | None = None,
                 method: str | None = None) -> None:
        self.node_id, self.run_name, self.iterations = node_id, run_name, iterations
        self.reward_name, self.method = reward_name, method
        self.bar = comfy.utils.ProgressBar(BAR, node_id=node_id)
        self.interrupted = False
        self.phase = ""
        self.started = time.time()
        self.previews = 0
        with _LIVE_LOCK:
            LIVE[str(node_id)] = {"node": node_id, "run": run_name, "iterations": iterations, "points": [],
                                  "evals": [], "status": "running", "phase": "", "started": self.started,
                                  "prompt_id": _prompt_id(), "reward_name": reward_name, "method": method,
                                  "previews": 0}
            PREVIEWS.pop(str(node_id), None)

    def _bar(self, value: float, preview: Any = None) -> None:
        if self.interrupted:
            return
        try:
            self.bar.update_absolute(max(0, min(BAR, int(value))), BAR, preview)
        except mm.InterruptProcessingException:  # ComfyUI's hook raised it (and cleared the flag): stop cleanly
            self.interrupted = True

    def _fraction(self, loop) -> float:
        progress = getattr(loop, "progress", None)
        return float(progress()) if progress is not None else loop.iteration / max(1, self.iterations)

    def should_stop(self, loop) -> bool:
        return self.interrupted or mm.processing_interrupted()

    def on_progress(self, loop, event: dict) -> None:
        if event["phase"] == "train":
            within = event["call"] / max(1, event["calls"]) / max(1, self.iterations)
            self._bar(BAR * min(1.0, self._fraction(loop) + within))
        else:
            self._bar(BAR * event["call"] / max(1, event["calls"]))
        if event["phase"] != self.phase:
            self.phase = event["phase"]
            with _LIVE_LOCK:
                LIVE[str(self.node_id)]["phase"] = self.phase
            _send({"node": self.node_id, "run": self.run_name, "kind": "phase", "phase": self.phase,
                   "iteration": loop.iteration, "iterations": self.iterations, "reward_name": self.reward_name,
                   "method": self.method})

    def on_step(self, loop, metrics: dict) -> None:
        point = {"iteration": metrics["iteration"], "reward": metrics["reward"], "loss": metrics["loss"],
                 "stage": metrics["stage"], "seconds": metrics.get("seconds", 0.0)}
        with _LIVE_LOCK:
            LIVE[str(self.node_id)]["points"].append(point)
        _send({"node": self.node_id, "run": self.run_name, "kind": "step", "iterations": self.iterations, **point})
        self._bar(BAR * self._fraction(loop))

    def on_eval(self, loop, result: dict) -> None:
        with _LIVE_LOCK:
            LIVE[str(self.node_id)]["evals"].append(dict(result))
        _send({"node": self.node_id, "run": self.run_name, "kind": "eval", "iterations": self.iterations,
               "eval": dict(result)})

    def on_preview(self, loop, images, prompts) -> None:
        picture = pil_image(images[0])
        buffer = _io.BytesIO()
        picture.convert("RGB").save(buffer, format="JPEG", quality=90)
        self.previews += 1
        with _LIVE_LOCK:
            PREVIEWS[str(self.node_id)] = buffer.getvalue()
            LIVE[str(self.node_id)]["previews"] = self.previews
            LIVE[str(self.node_id)]["preview_iteration"] = loop.iteration
        self._bar(BAR * self._fraction(loop), ("JPEG", picture, 512))

    def finish(self, status: str) -> None:
        with _LIVE_LOCK:
            LIVE[str(self.node_id)]["status"] = status
        _send({"node": self.node_id, "run": self.run_name, "kind": "end", "status": status,
               "iterations": self.iterations})


def parse_fractions(text: str) -> tuple[float, ...] | None:
    """"0.4, 0.2, 0.2, 0.2" -> a tuple; "" or "equal" -> None (an equal split)."""
    text = (text or "").strip()
    if text in ("", "equal"):
        return None
    try:
        return tuple(float(v) for v in text.replace(";", ",").split(","))
    except ValueError:
        raise ValueError(f"stage_fractions {text!r}: write one share per stage, e.g. 0.4,0.3,0.3 (or leave it "
                         "empty for an equal split)") from None


def build_config(method: str, iterations: int, time_budget_s: float, batch_size: int, lr: float, rank: int,
                 guidance: float, seed: int, stage_fractions: str, checkpoint_every: int, eval_every: int = 0,
                 preview_every: int = 0, preview_chain: str = "shortcut", eval_prompts: int = 32,
                 mixed_precision: str = "no", tiny: bool = True) -> TrainConfig:
    """The node's widgets as a validated :class:`TrainConfig` (the tiny preset's settings for the rest; for a real
    model the library's own last_segment, the paper's, since the preset's was chosen on the tiny world)."""
    preset = {k: v for k, v in TINY_PRESET.items() if tiny or k != "last_segment"}
    cfg = TrainConfig(**{**preset, "method": method, "iterations": iterations,
                         "time_budget_s": time_budget_s if time_budget_s > 0 else None, "batch_size": batch_size,
                         "lr": lr, "rank": rank, "guidance": guidance, "seed": seed,
                         "stage_fractions": parse_fractions(stage_fractions), "checkpoint_every": checkpoint_every,
                         "eval_every": eval_every, "preview_every": preview_every, "preview_chain": preview_chain,
                         "eval_prompts": eval_prompts, "mixed_precision": mixed_precision})
    cfg.validate()
    return cfg


class ShortFTTrain(io.ComfyNode):
    """Align the model to the reward with ShortFT (or a baseline) and write its timestep-aware LoRA set."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        tiny = TINY_PRESET
        return io.Schema(
            node_id="ShortFT_Train",
            display_name="ShortFTTrain",
            category=CATEGORY,
            is_output_node=True,
            description="Reward fine-tuning with ShortFT: trains a timestep-aware LoRA set (one LoRA per trajectory "
                        "segment) through a short chain with frozen shortcut jumps. Cancel stops within one network "
                        "call and keeps a checkpoint; queueing the same graph again continues (or returns a finished "
                        "run without training).",
            inputs=[
                SHORTFT_MODEL.Input("model", tooltip="The base model and shortcut from LoadShortcutModel."),
                SHORTFT_REWARD.Input("reward", tooltip="The reward to maximise, from RewardModel."),
                io.Combo.Input("prompt_source", options=[TEXT, FILE, TINY_CAPTIONS], default=TEXT,
                               tooltip="Where the training prompts come from: the text below (one per line), a "
                                       "prompt file (prompt_file: a path, or a file name in ComfyUI's input folder), "
                                       "or the tiny world's captions (tiny model only)."),
                io.String.Input("prompts", multiline=True,
                                default="a small red circle on the left on a white background\n"
                                        "a big blue square on the right on a white background",
                                tooltip="Training prompts, one per line (blank lines and # comments skipped); drawn "
                                        "with replacement."),
                io.Combo.Input("method", options=list(METHODS), default="shortft",
                               tooltip="shortft, or a baseline trained by the same loop: " + "; ".join(
                                   f"{m.name}: {m.summary}" for m in METHODS.values())),
                io.Int.Input("iterations", default=tiny["iterations"], min=1, max=10**7,
                             tooltip="Optimizer steps (the tiny world's preset: 320, about 5-8 minutes on 2 CPU "
                                     "cores). More iterations continue a finished run."),
                io.Float.Input("time_budget_s", default=0.0, min=0.0, max=10**7, step=1.0,
                               tooltip="Train for this many seconds instead of a number of iterations (0: use "
                                       "iterations); the progressive stages are scheduled over the budget."),
                io.Int.Input("batch_size", default=tiny["batch_size"], min=1, max=1024, tooltip="Prompts per batch."),
                io.Float.Input("lr", default=tiny["lr"], min=0.0000001, max=1.0, step=0.0000001, round=0.0000001,
                               tooltip="Peak learning rate (AdamW)."),
                io.Int.Input("rank", default=tiny["rank"], min=1, max=1024,
                             tooltip="LoRA rank of each segment's adapter (the paper: 128 on SD1.5)."),
                io.Float.Input("guidance", default=tiny["guidance"], min=1.0, max=30.0, step=0.1,
                               tooltip="CFG scale on the fine-tuned steps (1: none, half the cost); the set is meant "
                                       "to be sampled at this scale. The shortcut jumps run at the scale the shortcut "
                                       "was made for, at most this one."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of prompts, noise and the LoRAs' initialisation. It stays fixed after a run "
                                     "(no randomize control): a new seed is a new run, and the same seed lets a "
                                     "re-queued graph find its finished run instead of training again."),
                io.String.Input("stage_fractions", default="",
                                tooltip="Share of the run per progressive stage, e.g. 0.4,0.3,0.3 on the tiny world "
                                        "(three stages: its preset leaves the lowest-noise segment to the base "
                                        "model), 0.4,0.2,0.2,0.2 on a real model (four); empty: equal shares."),
                io.Int.Input("checkpoint_every", default=100, min=1, max=10**7,
                             tooltip="Iterations between checkpoints (a cancel also writes one)."),
                io.String.Input("run_name", default="shortft_tiny",
                                tooltip="Names the run: output/shortft/<run_name> (checkpoints, pictures) and "
                                        "models/loras/shortft/<run_name> (the LoRA set)."),
                io.Boolean.Input("resume", default=True,
                                 tooltip="On: a stopped run with the same settings continues from its checkpoint. "
                                         "Off: the run folder starts over (its checkpoints and LoRA set are "
                                         "replaced)."),
                io.String.Input("prompt_file", default="", optional=True,
                                tooltip="With prompt_source 'prompt file': a text file, one prompt per line (a path, "
                                        "or a name in ComfyUI's input folder)."),
                io.String.Input("eval_prompts", multiline=True, default="", optional=True,
                                tooltip="Held-out prompts, one per line, scored before and after (and every "
                                        "eval_every iterations). Empty: the tiny world's held-out set on the tiny "
                                        "model; no held-out evaluation on a real model."),
                io.Int.Input("eval_every", default=0, min=0, max=10**7, optional=True,
                             tooltip="Iterations between held-out evaluations (0: before and after only); each "
                                     "adds a point to the chart."),
                io.Int.Input("preview_every", default=20, min=0, max=10**7, optional=True,
                             tooltip="Iterations between preview images on the node (0: none)."),
                io.Combo.Input("preview_chain", options=["shortcut", "full"], default="shortcut", optional=True,
                               tooltip="shortcut: previews from the shortcut's few jumps with the aligned LoRAs "
                                       "(cheap, approximate); full: the 50-step inference chain."),
            ],
            outputs=[
                LORA_SET.Output(display_name="lora_set", tooltip="The trained LoRA set (for ApplyAlignedLoRA or "
                                                                 "ShortFTSample)."),
                io.LossMap.Output(display_name="loss", tooltip="Loss per iteration (the stock Plot Loss Graph "
                                                               "reads it)."),
                io.Image.Output(display_name="reward_curve", tooltip="Reward per iteration, held-out evaluations "
                                                                     "and stages."),
                io.Image.Output(display_name="before_after", tooltip="The same prompts and seeds before and after "
                                                                     "training."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, prompt_source: str, prompts: str, method: str, iterations: int, time_budget_s: float,
                        batch_size: int, lr: float, rank: int, guidance: float, stage_fractions: str,
                        checkpoint_every: int, run_name: str, prompt_file: str = "", eval_every: int = 0,
                        preview_every: int = 0) -> bool | str:
        try:
            try:  # the model is not known here: stage_fractions may fit the tiny world's stages or a real model's
                build_config(method, iterations, time_budget_s, batch_size, lr, rank, guidance, 0, stage_fractions,
                             checkpoint_every, eval_every, preview_every)
            except ValueError:
                build_config(method, iterations, time_budget_s, batch_size, lr, rank, guidance, 0, stage_fractions,
                             checkpoint_every, eval_every, preview_every, tiny=False)
            run_folders(run_name)
            if prompt_source == TEXT and not prompt_lines(prompts or ""):
                return "prompts: empty; give at least one training prompt (one per line), or choose another " \
                       "prompt_source"
            if prompt_source == FILE:
                _prompt_file(prompt_file)
            if prompt_source not in (TEXT, FILE, TINY_CAPTIONS):
                return f"prompt_source {prompt_source!r}: choose one of {TEXT}, {FILE}, {TINY_CAPTIONS}"
        except (OSError, ValueError) as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, model, reward, prompt_source: str, prompts: str, method: str, iterations: int,
                time_budget_s: float, batch_size: int, lr: float, rank: int, guidance: float, seed: int,
                stage_fractions: str, checkpoint_every: int, run_name: str, resume: bool, prompt_file: str = "",
                eval_prompts: str = "", eval_every: int = 0, preview_every: int = 20,
                preview_chain: str = "shortcut") -> io.NodeOutput:
        from ..shortft_core.session import TrainingSession, TrainRequest, reward_label

        out, lora_dir = run_folders(run_name)
        held_out = prompt_lines(eval_prompts or "")
        tiny = model.family == "tiny"
        precision = next((k for k, v in PRECISION.items() if v == model.dtype), "no")
        cfg = build_config(method, iterations, time_budget_s, batch_size, lr, rank, guidance, seed, stage_fractions,
                           checkpoint_every, eval_every, preview_every, preview_chain,
                           eval_prompts=len(held_out) if held_out else (TINY_PRESET["eval_prompts"] if tiny else 0),
                           mixed_precision=precision, tiny=tiny)
        source = None if prompt_source == TINY_CAPTIONS else (
            str(_prompt_file(prompt_file)) if prompt_source == FILE else prompt_lines(prompts))
        if source is None and not tiny:
            raise ValueError("prompt_source 'tiny-world captions' needs the tiny model; give prompts for a real one")
        request = TrainRequest(out=out, model=model, reward=reward, config=cfg, prompts=source,
                               eval_prompts=held_out or None, lora_dir=lora_dir, overwrite=not resume)
        progress = ComfyProgress(cls.hidden.unique_id, run_name, iterations,
                                 reward_name=reward_label(reward), method=method)
        mm.unload_all_models()  # our modules are invisible to ComfyUI's memory management: make room first
        mm.soft_empty_cache()
        status = "failed"
        try:
            with TrainingSession(request, callbacks=[progress]) as session:
                session.check()
                result = session.run()
            status = result.status
        finally:
            progress.finish(status)
            gc.collect()
            mm.soft_empty_cache()
        log.info("ShortFT run %s (%s, iteration %d): %s", run_name, result.status, result.iteration,
                 ", ".join(f"{k} {v}" for k, v in result.files.items()))
        if result.status == "stopped":
            log.info("ShortFT: cancelled at iteration %d; checkpoint and partial LoRA set kept in %s and %s; queue "
                     "the same graph to continue", result.iteration, out, lora_dir)
            raise mm.InterruptProcessingException()
        log.info("ShortFT: LoRA set in %s; the stock Load LoRA node lists its merged file as %s", lora_dir,
                 _lora_name(lora_dir / "merged.safetensors"))
        curve = png_image(result.files["reward_curve"])
        before_after = png_image(result.files["before_after"])
        return io.NodeOutput(result.lora, {"loss": list(result.history.loss)}, curve, before_after,
                             ui=ui.PreviewImage(before_after, cls=cls))


def _prompt_file(name: str):
    """A prompt file given as a path or as a name in ComfyUI's input folder."""
    from pathlib import Path

    if not (name or "").strip():
        raise ValueError("prompt_file: empty; give a text file with one prompt per line")
    path = Path(name).expanduser()
    if not path.is_absolute():
        path = Path(folder_paths.get_input_directory()) / name
    if not path.is_file():
        raise FileNotFoundError(f"prompt_file {name!r}: no such file (looked for {path})")
    return path


def _lora_name(path) -> str:
    """How ComfyUI's LoRA lists name a file under its LoRA folders."""
    for root in folder_paths.get_folder_paths("loras"):
        try:
            return str(path.relative_to(root))
        except ValueError:
            continue
    return str(path)


NODES = [ShortFTTrain]
