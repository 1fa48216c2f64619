"""ShortFTTrain: reward fine-tuning inside ComfyUI, through the same library session as the command line.

The node turns its widgets into a :class:`~shortft_core.session.TrainRequest` for the MODEL that LoadShortcutModel
passes on (trained in place through :class:`~.backend.ComfyModel`, placed by ComfyUI's model management, and left
as it was when the session ends) and adds only ComfyUI's concerns: progress goes to the node's bar (with preview
images) and, at every iteration, metrics go to the queueing client over the websocket (``shortft.progress``) for
the live chart; the stop request is ComfyUI's interrupt, honoured within one network call, after which the run is
checkpointed, its partial LoRA set written, and the same graph queued again continues it. A finished run with the
same settings is returned without training, so a re-queued graph or a cache eviction never trains twice.

Files: the run (checkpoints, history.json, reward_curve.png, before_after.png, run.json) in
``output/shortft/<run_name>/``; the LoRA set in ``models/loras/shortft/<run_name>/``, where the stock Load LoRA node
lists its ``merged.safetensors`` and LoadLoRASet / ApplyAlignedLoRA list the set.
"""

from __future__ import annotations

import gc
import io as _io
import logging
import time
from pathlib import Path
from typing import Any

import comfy.model_management as mm
import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from ..shortft_core import (METHODS, TRAIN_PRESETS, Callback, StopRequested, TrainingSession, TrainRequest,
                            check_settings, prompt_lines, reward_label)
from . import live
from .common import AUTO, CATEGORY, LORA_SET, SHORTFT_MODEL, SHORTFT_REWARD, pil_image, png_image, run_folders

log = logging.getLogger(__name__)

TEXT, FILE, TINY_CAPTIONS = "prompts below", "prompt file", "tiny-world captions"
PRESET = "tiny"  # the widgets' defaults and the settings the node has no widget for (resolved by the library)
BAR = 1000  # resolution of the node's progress bar
ENCODING = "encoding prompts"  # the phase shown while the prompts are encoded before training


class ComfyProgress(Callback):
    """The session's callbacks in ComfyUI: the node's progress bar with previews, websocket metrics, and the
    interrupt as the stop request (a bar update that raises ComfyUI's interrupt is turned into one).

    Every callback also updates the node's live state (:mod:`.live`), which the web chart reads after a page
    reload; ``reward_name`` is the key of the trained reward in the eval results, so the
    chart draws those held-out points on its reward axis."""

    def __init__(self, node_id: str | None, run_name: str, iterations: int, reward_name: str | None = None,
                 method: str | None = None) -> None:
        self.node_id, self.run_name, self.iterations = node_id, run_name, iterations
        self.reward_name, self.method = reward_name, method
        self.bar = comfy.utils.ProgressBar(BAR, node_id=node_id)
        self.interrupted = False
        self.phase = ""
        self.started = time.time()
        self.key = str(node_id)
        live.begin(self.key, {"node": node_id, "run": run_name, "iterations": iterations, "status": "running",
                              "phase": "", "started": self.started, "prompt_id": live.prompt_id(),
                              "reward_name": reward_name, "method": method})

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

    def _phase(self, phase: str, iteration: int) -> None:
        if phase != self.phase:
            self.phase = phase
            live.update(self.key, phase=phase)
            live.send({"node": self.node_id, "run": self.run_name, "kind": "phase", "phase": phase,
                       "iteration": iteration, "iterations": self.iterations, "reward_name": self.reward_name,
                       "method": self.method})

    def encoding(self, done: int, total: int) -> None:
        """Prompts encoded before training (``done`` of ``total``): the phase and the bar (ComfyUI's bar throttles
        what it sends), so thousands of prompts on a slow GPU show progress; ComfyUI's cancel stops the encoding."""
        self._phase(ENCODING, 0)
        self._bar(BAR * done / max(1, total))
        if self.interrupted or mm.processing_interrupted():
            raise StopRequested

    def on_progress(self, loop, event: dict) -> None:
        if event["phase"] == "train":
            within = event["call"] / max(1, event["calls"]) / max(1, self.iterations)
            self._bar(BAR * min(1.0, self._fraction(loop) + within))
        else:
            self._bar(BAR * event["call"] / max(1, event["calls"]))
        self._phase(event["phase"], loop.iteration)

    def on_step(self, loop, metrics: dict) -> None:
        point = {"iteration": metrics["iteration"], "reward": metrics["reward"], "loss": metrics["loss"],
                 "stage": metrics["stage"], "seconds": metrics.get("seconds", 0.0)}
        live.append(self.key, "points", point)
        live.send({"node": self.node_id, "run": self.run_name, "kind": "step", "iterations": self.iterations, **point})
        self._bar(BAR * self._fraction(loop))

    def on_eval(self, loop, result: dict) -> None:
        live.append(self.key, "evals", result)
        live.send({"node": self.node_id, "run": self.run_name, "kind": "eval", "iterations": self.iterations,
               "eval": dict(result)})

    def on_preview(self, loop, images, prompts) -> None:
        picture = pil_image(images[0])
        buffer = _io.BytesIO()
        picture.convert("RGB").save(buffer, format="JPEG", quality=90)
        live.set_preview(self.key, buffer.getvalue(), loop.iteration)
        self._bar(BAR * self._fraction(loop), ("JPEG", picture, 512))

    def finish(self, status: str) -> None:
        live.update(self.key, status=status)
        live.send({"node": self.node_id, "run": self.run_name, "kind": "end", "status": status,
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


# gradient_checkpointing's choices: what is recomputed in backward instead of kept (the network's calls, each as a
# whole or block by block, and the VAE decoder's blocks), as the library's settings
CHECKPOINTING = {"off": (False, False, False), "unet": (True, False, False), "unet + vae": (True, False, True),
                 "unet blocks + vae": (True, True, True)}
STRONGEST = "unet blocks + vae"
# families whose network calls hold far more than their blocks' inputs (transformers of many wide blocks): a whole
# call's activations are what a GPU runs out of (a FLUX-shaped network of 6 blocks: 0.29x the peak of whole calls)
BLOCKWISE_FAMILIES = ("sd3", "flux")


def checkpoint_settings(choice: str, gpu: bool, family: str = "") -> dict[str, bool]:
    """gradient_checkpointing's choice as the library's settings. auto on a GPU, where memory is what limits a real
    model (without it one SDXL image at 1024 px needs more than 88 GiB, one SD1.5 image at 512 px ~20): the
    network's calls and the VAE decoder recomputed, the calls block by block for the transformer families; nothing
    on a CPU or for the tiny world, where it would only cost time."""
    if choice == AUTO:
        choice = ("off" if not gpu or family == "tiny" else STRONGEST if family in BLOCKWISE_FAMILIES
                  else "unet + vae")
    if choice not in CHECKPOINTING:
        raise ValueError(f"gradient_checkpointing {choice!r}: choose one of {AUTO}, {', '.join(CHECKPOINTING)}")
    unet, blocks, vae = CHECKPOINTING[choice]
    return {"checkpoint_unet": unet, "checkpoint_blocks": blocks, "checkpoint_vae": vae}


def widget_settings(method: str, iterations: int, time_budget_s: float, batch_size: int, lr: float, rank: int,
                    guidance: float, seed: int, stage_fractions: str, checkpoint_every: int, eval_every: int = 0,
                    preview_every: int = 0, preview_chain: str = "shortcut", image_size: int = 0,
                    checkpointing: dict[str, bool] | None = None) -> dict[str, Any]:
    """The training settings the node's widgets set (the library completes them from the preset and the model);
    ``checkpointing``: :func:`checkpoint_settings`'s (none: the library's default, nothing recomputed)."""
    return {"method": method, "iterations": iterations, "time_budget_s": time_budget_s if time_budget_s > 0 else None,
            "batch_size": batch_size, "lr": lr, "rank": rank, "guidance": guidance, "seed": seed,
            "stage_fractions": parse_fractions(stage_fractions), "checkpoint_every": checkpoint_every,
            "eval_every": eval_every, "preview_every": preview_every, "preview_chain": preview_chain,
            "image_size": image_size if image_size > 0 else None, **(checkpointing or {})}


def out_of_memory_message(error: BaseException, choice: str, checkpointing: dict[str, bool], trainer: Any) -> str:
    """What to change after the GPU ran out of memory, and what queueing again does (the checkpointing choice may
    change on a continued run: it gives the same values)."""
    done = (trainer.saved_at or 0) if trainer is not None else 0
    at = f" with {trainer.iteration} iterations done" if trainer is not None else ""
    unet = "the UNet's blocks" if checkpointing.get("checkpoint_blocks") else "the UNet"
    used = [n for n, on in ((unet, checkpointing["checkpoint_unet"]),
                            ("the VAE", checkpointing["checkpoint_vae"])) if on]
    fixes = [] if all(checkpointing.values()) else [f"set gradient_checkpointing to '{STRONGEST}'"]
    fixes += ["lower batch_size, image_size or rank", "set guidance to 1 (no CFG on the tuned steps: half the "
              "batch of every tuned step)"]
    resume = (f"queue the graph again with resume on: the run continues from its checkpoint at iteration {done}"
              if done else "queue the graph again: the run starts over")
    return (f"ShortFTTrain ran out of GPU memory{at} (gradient_checkpointing {choice}: "
            f"{' and '.join(used) + ' recomputed' if used else 'nothing recomputed'}). To fit: {'; '.join(fixes)}. "
            f"Then {resume}. ({error})")


class ShortFTTrain(io.ComfyNode):
    """Align the model to the reward with ShortFT (or a baseline) and write its timestep-aware LoRA set."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        tiny = TRAIN_PRESETS[PRESET]
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
                SHORTFT_MODEL.Input("model", tooltip="The MODEL and its shortcut, from LoadShortcutModel (trained in "
                                                     "place; it is left as it was when training ends)."),
                SHORTFT_REWARD.Input("reward", tooltip="The reward to maximise, from RewardModel."),
                io.Combo.Input("prompt_source", options=[TEXT, FILE, TINY_CAPTIONS], default=TEXT,
                               tooltip="Where the training prompts come from: the text below (one per line), a "
                                       "prompt file (prompt_file: a file name in ComfyUI's input folder), or the tiny "
                                       "world's captions (tiny model only)."),
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
                                       "was made for, at most this one. 1 for a guidance-distilled MODEL (FLUX.1 "
                                       "dev), which takes its guidance as an input."),
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
                                tooltip="With prompt_source 'prompt file': a text file, one prompt per line, in "
                                        "ComfyUI's input folder (its name there; 'name [output]' for the output "
                                        "folder)."),
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
                io.Int.Input("image_size", default=0, min=0, max=8192, step=8, optional=True,
                             tooltip="Image size in pixels (square) of training, evaluation and previews; 0: the "
                                     "MODEL's native size (512 for SD1.5, 1024 for SDXL, 32 for the tiny world)."),
                io.Combo.Input("gradient_checkpointing", options=[AUTO, *CHECKPOINTING], default=AUTO, optional=True,
                               tooltip="Recompute activations in backward instead of keeping them: less GPU memory, "
                                       "more time, the same results. unet: the network calls with gradient (half "
                                       "the peak or less, 1.3-1.8x the time); unet + vae: the VAE decoder's blocks "
                                       "too; unet blocks + vae: each call recomputed block by block, one block's "
                                       "activations at a time (the least memory, one more network pass per call). "
                                       "auto on a GPU: unet blocks + vae for SD3 / SD3.5 and FLUX, unet + vae "
                                       "otherwise; off on a CPU and for the tiny world. A stopped run may continue "
                                       "with another choice."),
            ],
            outputs=[
                LORA_SET.Output(display_name="lora_set", tooltip="The trained LoRA set (for ApplyAlignedLoRA, "
                                                                 "then the stock KSampler)."),
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
                        preview_every: int = 0, image_size: int = 0) -> bool | str:
        try:
            check_settings(widget_settings(method, iterations, time_budget_s, batch_size, lr, rank, guidance, 0,
                                           stage_fractions, checkpoint_every, eval_every, preview_every,
                                           image_size=image_size), PRESET)
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
                preview_chain: str = "shortcut", image_size: int = 0,
                gradient_checkpointing: str = AUTO) -> io.NodeOutput:
        out, lora_dir = run_folders(run_name)
        if prompt_source == TINY_CAPTIONS and model.family != "tiny":
            raise ValueError(f"prompt_source {TINY_CAPTIONS!r} is the tiny world's; this {model.family} MODEL needs "
                             f"its own prompts ({TEXT!r} or {FILE!r})")
        distilled = model.model.distilled_guidance
        if distilled is not None and guidance != 1.0:
            raise ValueError(f"this {model.family} MODEL is guidance-distilled: it takes the guidance scale as an input "
                             f"(trained at {distilled}, FluxGuidance's default) and samples without CFG; set guidance "
                             "to 1")
        held_out = prompt_lines(eval_prompts or "")
        gpu = mm.get_torch_device().type != "cpu"
        checkpointing = checkpoint_settings(gradient_checkpointing, gpu, model.family)
        settings = widget_settings(method, iterations, time_budget_s, batch_size, lr, rank, guidance, seed,
                                   stage_fractions, checkpoint_every, eval_every, preview_every, preview_chain,
                                   image_size, checkpointing)
        if model.shortcut is None and method == "shortft":
            settings["shortcut_net"] = "base"  # shortcut 'none': ShortFT jumps with the MODEL's own DDIM steps
        source = None if prompt_source == TINY_CAPTIONS else (
            str(_prompt_file(prompt_file)) if prompt_source == FILE else prompt_lines(prompts))
        request = TrainRequest(out=out, model=model.model, reward=reward, config=settings, preset=PRESET,
                               prompts=source, eval_prompts=held_out or None, lora_dir=lora_dir,
                               overwrite=not resume, shortcut=str(model.shortcut) if model.shortcut else "none",
                               shortcut_preset=model.preset)
        progress = ComfyProgress(cls.hidden.unique_id, run_name, iterations,
                                 reward_name=reward_label(reward), method=method)
        status = "failed"
        try:
            with TrainingSession(request, callbacks=[progress]) as session:
                session.check()
                # on a GPU the prompts are encoded before training, so the text encoder is not loaded again and again
                # mid-run (on a CPU nothing is loaded, and nothing is encoded twice); prepare() also loads again the
                # static copies of a streamed MODEL or VAE that a previous run dropped. A finished run queued again is
                # returned as it is, with nothing loaded, encoded or placed
                if not session.reuses:
                    prompts = ["", *session.prompts.prompts, *session.eval_prompts] if gpu else ()
                    size = (session.config.image_size,) * 2 if session.config.image_size else None
                    model.model.prepare(prompts, size, progress=progress.encoding)
                try:
                    result = session.run()
                except Exception as e:
                    if not mm.is_oom(e):
                        raise
                    # ComfyUI's own handling of an out-of-memory error (unloading every model) still applies
                    raise mm.OOM_EXCEPTION(out_of_memory_message(e, gradient_checkpointing, checkpointing,
                                                                 session.trainer)) from e
            status = result.status
        except StopRequested:
            # ComfyUI's cancel, met by the MODEL's layers outside the training loop (prompts encoded before it, the
            # before/after grid drawn after the set is saved): ComfyUI's cancel, not an error
            status = "stopped"
            log.info("ShortFT: cancelled outside the training loop (setting up, or drawing the before/after grid "
                     "once the set was saved); queue the same graph to continue")
            raise mm.InterruptProcessingException() from None
        finally:
            progress.finish(status)
            model.model.release()  # the encoded prompts and those copies: not kept while ComfyUI caches the graph
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


def _prompt_file(name: str) -> Path:
    """A prompt file named as ComfyUI names a graph's files: a name in its input folder, or one annotated
    ``[input]``, ``[output]`` or ``[temp]``. A path outside those folders is refused, so a graph queued on a shared
    server reads only what its users put there."""
    if not (name or "").strip():
        raise ValueError("prompt_file: empty; give the name of a text file (one prompt per line) in ComfyUI's input "
                         "folder")
    where = folder_paths.get_input_directory()
    try:
        path = Path(folder_paths.get_annotated_filepath(name.strip()))
    except ValueError:
        raise ValueError(f"prompt_file {name!r} lies outside ComfyUI's input, output and temp folders; put the file "
                         f"in the input folder ({where}) and give its name there") from None
    if not path.is_file():
        raise FileNotFoundError(f"prompt_file {name!r}: no such file (looked for {path}); put it in ComfyUI's input "
                                f"folder ({where})")
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
