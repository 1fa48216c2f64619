"""RewardModel: a reward (or a weighted spec of several) from models/reward_models, and ScoreImages: its scores of
IMAGEs, for before/after comparisons inside a graph."""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io, ui

from ..shortft_core import (build_reward_spec, check_reward_spec, outside_inference_mode, prompt_lines,
                            resolve_device, reward_descriptions)
from .common import CATEGORY, SHORTFT_REWARD, device_options, from_comfy, reward_folders, reward_weights_dir

log = logging.getLogger(__name__)


def _spec(reward: str, spec: str) -> str:
    return spec.strip() or reward


class RewardModel(io.ComfyNode):
    """A differentiable reward by name or weighted spec; its weight files come from models/reward_models."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        names = reward_descriptions()
        return io.Schema(
            node_id="ShortFT_RewardModel",
            display_name="RewardModel",
            category=CATEGORY,
            description="A reward to align with (HPS v2, PickScore, ImageReward, aesthetic, CLIP score, symmetry, "
                        "compressibility, the tiny world's), or a weighted spec of several. Weight files are looked "
                        "up by their published names in models/reward_models; nothing is downloaded.",
            inputs=[
                io.Combo.Input("reward", options=list(names), default="tiny_alignment",
                               tooltip="The reward to maximise:\n" + "\n".join(f"{k}: {v}" for k, v in names.items())),
                io.String.Input("spec", default="", multiline=False,
                                tooltip="A weighted spec that replaces the choice above when not empty, e.g. "
                                        "10*pickscore+2*hps_v2+0.05*aesthetic (the paper's combined reward)."),
                io.Combo.Input("device", options=device_options(), default="auto",
                               tooltip="Where the reward runs ('auto': the GPU when there is one); it may differ "
                                       "from the model's device."),
            ],
            outputs=[SHORTFT_REWARD.Output(display_name="reward")],
        )

    @classmethod
    def validate_inputs(cls, reward: str, spec: str) -> bool | str:
        try:
            check_reward_spec(_spec(reward, spec or ""), weights_dir=reward_weights_dir(), files=True)
        except (OSError, ValueError) as e:
            return f"{e} (searched {', '.join(reward_folders()) or 'models/reward_models'})"
        return True

    @classmethod
    @outside_inference_mode
    def execute(cls, reward: str, spec: str, device: str) -> io.NodeOutput:
        text = _spec(reward, spec)
        built = build_reward_spec(text, weights_dir=reward_weights_dir(), device=resolve_device(device))
        built.spec = text  # the label a training run records for it
        return io.NodeOutput(built)


class ScoreImages(io.ComfyNode):
    """Scores of IMAGEs under a reward: the mean as FLOAT and one line per image as text."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ShortFT_ScoreImages",
            display_name="ScoreImages",
            category=CATEGORY,
            is_output_node=True,
            description="Score images with a reward (e.g. before and after alignment, from the same seeds).",
            inputs=[
                io.Image.Input("images", tooltip="The images to score."),
                io.String.Input("prompts", multiline=True, default="a small red circle on the left on a white background",
                                tooltip="One prompt per image, one per line, in the images' order; a single line "
                                        "is used for every image."),
                SHORTFT_REWARD.Input("reward", tooltip="The reward from RewardModel."),
            ],
            outputs=[io.Float.Output(display_name="mean", tooltip="Mean score over the images."),
                     io.String.Output(display_name="scores", tooltip="One line per image: index, score, prompt.")],
        )

    @classmethod
    def validate_inputs(cls, prompts: str | None) -> bool | str:
        if prompts is None:  # linked (e.g. from the text node that also feeds CLIP Text Encode): checked when it runs
            return True
        if not prompt_lines(prompts):
            return "prompts: give at least one prompt (one per line)"
        return True

    @classmethod
    @outside_inference_mode
    def execute(cls, images: torch.Tensor, prompts: str, reward) -> io.NodeOutput:
        lines = prompt_lines(prompts)
        n = images.shape[0]
        if len(lines) == 1:
            lines = lines * n
        if len(lines) != n:
            raise ValueError(f"ScoreImages: {n} images but {len(lines)} prompts; give one prompt per image or a "
                             "single prompt for all")
        with torch.no_grad():
            scores = reward(from_comfy(images), lines).float().cpu()
        mean = float(scores.mean())
        name = getattr(reward, "spec", None) or getattr(reward, "name", "reward")
        text = "\n".join([f"{name}: mean {mean:.4f} over {n} images"] +
                         [f"{i}: {float(s):.4f}  {p}" for i, (s, p) in enumerate(zip(scores, lines))])
        log.info("ShortFT score %s", text.replace("\n", "; "))
        return io.NodeOutput(mean, text, ui=ui.PreviewText(text))


NODES = [RewardModel, ScoreImages]
