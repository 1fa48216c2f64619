"""Build the shipped workflows and their API twins with ComfyUI's own frontend.

    python tests/make_workflows.py            # regenerate workflows/api/*.json from workflows/*.json
    python tests/make_workflows.py --build    # rebuild workflows/*.json from the graphs below, then the twins

The UI files (workflows/*.json) are the source: edit them in the graph editor and save them over the file, or edit
the graphs below and ``--build``. Either way the API twins are regenerated from the UI files by the frontend's own
conversion (``app.graphToPrompt()``), never by hand; ``tests/test_browser.py`` regenerates them and fails when a
twin differs from its UI file. Both need a ComfyUI checkout (``$COMFYUI_PATH``, ``../shared/comfyui`` or
``~/comfy/ComfyUI``) and Chromium with pip playwright (tests/browser_tools.py). The server is a throw-away one on
a temporary base directory with empty placeholder files of the model names the workflows use.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from browser_tools import (WORKFLOWS, Editor, browser_skip_reason, launch, placeholder_models,  # noqa: E402
                           twin_path, ui_workflows)

NOTE_COLOR, NOTE_BG = "#432", "#653"
# ShortFTTrain's size: room below its widgets and live chart for the image ComfyUI shows on the node (the latest
# training preview, then the before/after grid)
TRAIN_SIZE = (440, 1304)


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[float, float]
    widgets: dict[str, Any] = field(default_factory=dict)
    title: str | None = None
    size: tuple[float, float] | None = None  # at least this; the node's own minimum size wins when larger
    below: int | None = None  # placed 60 px below this (earlier) node, at its x, instead of at pos
    color: str | None = None
    bgcolor: str | None = None


@dataclass
class Graph:
    nodes: list[Node]
    links: list[tuple[int, str, int, str]]  # (from node, output name, to node, input name)


def note(id: int, pos, text: str, size=(460, 420)) -> Node:
    return Node(id, "MarkdownNote", pos, {"text": text.strip() + "\n"}, title="Read me", size=size, color=NOTE_COLOR,
                bgcolor=NOTE_BG)


TINY_SAMPLE_PROMPT = "a yellow circle left of a blue circle on a white background"
SD15_SAMPLE_PROMPT = "a cat sitting on a windowsill at sunset"
SD15_PROMPTS = ("a photo of a red fox in a snowy forest at sunrise\n"
                "a cozy reading nook with a big window, rain outside, warm lamp light\n"
                "an astronaut riding a horse on the moon, digital art\n"
                "a bowl of ramen on a wooden table, studio lighting\n"
                "a watercolor painting of a lighthouse on a cliff during a storm\n"
                "a portrait of an old fisherman with a grey beard, dramatic lighting\n"
                "a futuristic city skyline at night with flying cars, neon lights\n"
                "a cute corgi wearing sunglasses on a beach")
SD15_EVAL_PROMPTS = ("a cat sitting on a windowsill at sunset\n"
                     "a mountain lake with reflections of pine trees\n"
                     "a steampunk airship above a victorian city\n"
                     "a plate of colorful macarons on a marble counter")


def train_widgets(**overrides) -> dict[str, Any]:
    """ShortFTTrain's widgets: the tiny preset's defaults, with ``overrides``."""
    w = {"prompt_source": "tiny-world captions", "prompts": "", "method": "shortft", "iterations": 320,
         "time_budget_s": 0.0, "batch_size": 4, "lr": 0.0005, "rank": 8, "guidance": 1.0, "seed": 0,
         "stage_fractions": "", "checkpoint_every": 100, "run_name": "shortft_tiny", "resume": True,
         "prompt_file": "", "eval_prompts": "", "eval_every": 80, "preview_every": 20, "preview_chain": "shortcut",
         "image_size": 0, "gradient_checkpointing": "auto"}
    w.update(overrides)
    return w


def sampler_widgets(steps: int, cfg: float) -> dict[str, Any]:
    """The stock KSampler on the timesteps a LoRA set was trained on: DDIM on SD's uniform grid."""
    return {"seed": 0, "control_after_generate": "fixed", "steps": steps, "cfg": cfg, "sampler_name": "ddim",
            "scheduler": "ddim_uniform", "denoise": 1.0}


def compare(first: int, x: float, y: float, loader: tuple[int, str, str, str], reward: int, after_set: int, prompt: str,
            guidance: float, size: int, batch: int, steps: int = 50, before_set: int | None = None,
            before_title: str = "Before (the MODEL alone)", after_title: str = "After (the trained set)"
            ) -> tuple[list[Node], list[tuple[int, str, int, str]]]:
    """The same prompt and seeds sampled by two stock KSamplers, the MODEL alone (or with ``before_set``) and with
    the trained set through ApplyAlignedLoRA, decoded, scored and shown side by side. ``loader``: (node, its MODEL,
    CLIP and VAE output names); ``reward``: the RewardModel node the scores use."""
    src, model_out, clip_out, vae_out = loader
    (text, pos, neg, latent, apply_a, apply_b, ks_a, ks_b, dec_a, dec_b, score_a, score_b, stitch,
     view) = range(first, first + 14)
    pair = f"{before_title.split(' (')[0]} (top) | {after_title.split(' (')[0]} (bottom)"
    nodes = [
        Node(text, "PrimitiveStringMultiline", (x, y), {"value": prompt}, title="Prompt (sampled and scored)",
             size=(400, 120)),
        Node(pos, "CLIPTextEncode", (x, y + 170), title="Positive", size=(400, 0)),
        Node(neg, "CLIPTextEncode", (x, y + 270), {"text": ""}, title="Negative", size=(400, 100)),
        Node(latent, "EmptyLatentImage", (x, y + 420), {"width": size, "height": size, "batch_size": batch},
             size=(400, 0)),
        Node(apply_b, "ShortFT_ApplyAlignedLoRA", (x + 440, y + 330), {"set_name": "none", "strength": 1.0,
                                                                       "mode": "timestep-aware"},
             title="ApplyAlignedLoRA: " + after_title.split(" (")[0], size=(360, 0)),
        Node(ks_a, "KSampler", (x + 840, y), sampler_widgets(steps, guidance), title="KSampler: " + before_title,
             size=(320, 0)),
        Node(ks_b, "KSampler", (x + 840, y + 330), sampler_widgets(steps, guidance), title="KSampler: " + after_title,
             size=(320, 0)),
        Node(dec_a, "VAEDecode", (x + 1200, y), size=(200, 0)),
        Node(dec_b, "VAEDecode", (x + 1200, y + 330), size=(200, 0)),
        Node(score_a, "ShortFT_ScoreImages", (x + 1440, y), {}, title="Score: " + before_title, size=(400, 300)),
        Node(score_b, "ShortFT_ScoreImages", (x + 1440, y + 330), {}, title="Score: " + after_title,
             size=(400, 300)),
        Node(stitch, "ImageStitch", (x + 1200, y + 660), {"direction": "down", "match_image_size": True,
                                                          "spacing_width": 4, "spacing_color": "white"}, title=pair),
        Node(view, "PreviewImage", (x + 1440, y + 660), title=pair, size=(400, 420)),
    ]
    links = [(text, "STRING", pos, "text"), (text, "STRING", score_a, "prompts"), (text, "STRING", score_b, "prompts"),
             (src, clip_out, pos, "clip"), (src, clip_out, neg, "clip"),
             (src, model_out, apply_b, "model"), (after_set, "lora_set", apply_b, "lora_set"),
             (apply_b, "model", ks_b, "model")]
    if before_set is None:
        links.append((src, model_out, ks_a, "model"))
    else:
        nodes.append(Node(apply_a, "ShortFT_ApplyAlignedLoRA", (x + 440, y), {"set_name": "none", "strength": 1.0,
                                                                              "mode": "timestep-aware"},
                          title="ApplyAlignedLoRA: " + before_title.split(" (")[0], size=(360, 0)))
        links += [(src, model_out, apply_a, "model"), (before_set, "lora_set", apply_a, "lora_set"),
                  (apply_a, "model", ks_a, "model")]
    for ks, dec, score in ((ks_a, dec_a, score_a), (ks_b, dec_b, score_b)):
        links += [(pos, "CONDITIONING", ks, "positive"), (neg, "CONDITIONING", ks, "negative"),
                  (latent, "LATENT", ks, "latent_image"), (ks, "LATENT", dec, "samples"), (src, vae_out, dec, "vae"),
                  (dec, "IMAGE", score, "images"), (reward, "reward", score, "reward")]
    links += [(dec_a, "IMAGE", stitch, "image1"), (dec_b, "IMAGE", stitch, "image2"), (stitch, "IMAGE", view, "images")]
    return nodes, links


# ----- the shipped graphs ----------------------------------------------------------------------------------------

TINY_NOTE = """
## ShortFT on the tiny world (CPU, about 5 minutes)

Needs no download: the **tiny world** (a small SD1.5-shaped text-to-image model, its rewards and its distilled
4-step shortcut) ships inside the pack. *Load Tiny World* gives it as a MODEL, CLIP and VAE, like *Load
Checkpoint* gives a real model: put *Load Checkpoint* in its place to align your own SD1.5 / SDXL / SD2 checkpoint.

1. **Run** the graph. *LoadShortcutModel* attaches the frozen few-step shortcut to the MODEL; *ShortFTTrain*
   aligns the MODEL itself (in place, no copy) to `tiny_alignment` with ShortFT: 320 iterations, about 5 minutes
   on 2 CPU cores. Its node draws the reward and the loss live, marks the progressive stages and adds a held-out
   evaluation every `eval_every` iterations.
2. Two stock *KSampler*s draw the prompt from the same seeds, from the MODEL alone and through *ApplyAlignedLoRA*
   with the trained set, at CFG 1 (the scale the set was trained for); *ScoreImages* scores both.

Writes `output/shortft/tiny_alignment/` (checkpoints, history, pictures) and `models/loras/shortft/tiny_alignment/`
(the LoRA set; the stock Load LoRA node lists its `merged.safetensors`). Running the graph again returns the
finished run without training: raise `iterations` to continue it, or turn `resume` off to start over.
"""

SD15_FILES = """
| file | put it in | get it from (Hugging Face) |
|---|---|---|
| `v1-5-pruned-emaonly.safetensors` | `models/checkpoints` | stable-diffusion-v1-5/stable-diffusion-v1-5 |
| `Hyper-SD15-4steps-lora.safetensors` | `models/loras` | ByteDance/Hyper-SD |
"""

SD15_HPS_NOTE = """
## ShortFT on Stable Diffusion 1.5 with HPS v2 (the paper's setting)

A GPU is needed: about 14 GiB at batch 1 (bf16 base, rank-128 LoRA set, CFG 7.5 on the fine-tuned steps).
The pack downloads nothing; put these files in ComfyUI's folders, then refresh the page:
""" + SD15_FILES + """| `HPS_v2_compressed.pt` | `models/reward_models` | xswu/HPSv2 |

Settings from the paper: the Hyper-SD 4-step LoRA as the shortcut (it runs at its own CFG 1), 4 progressive
stages, timestep-aware LoRAs of rank 128, CFG 7.5 on the fine-tuned steps. The paper gives no learning rate:
1e-4 here. Put your own prompts (e.g. HPDv2's) in a text file in `input/` and choose `prompt file`.

The LoRA set lands in `models/loras/shortft/sd15_hps_v2/`: *sd15_apply_set_ksampler* samples it with the stock
KSampler.
"""

SD15_COMBINED_NOTE = """
## ShortFT on Stable Diffusion 1.5 with the paper's combined reward

`10*pickscore + 2*hps_v2 + 0.05*aesthetic` (the paper's Figure 1, raw scales). A GPU is needed: roughly 20 GiB
(an estimate, not measured: two ViT-H reward models and a CLIP ViT-L beside the SD1.5 run's 14 GiB). The pack downloads nothing; put these files in ComfyUI's folders, then
refresh the page:
""" + SD15_FILES + """| `HPS_v2_compressed.pt` | `models/reward_models` | xswu/HPSv2 |
| `PickScore_v1/` (the whole folder) | `models/reward_models` | yuvalkirstain/PickScore_v1 |
| `CLIP-ViT-H-14-laion2B-s32B-b79K/` (optional: PickScore's image processor) | `models/reward_models` | laion/CLIP-ViT-H-14-laion2B-s32B-b79K |
| `sac+logos+ava1-l14-linearMSE.pth` | `models/reward_models` | GitHub: christophschuhmann/improved-aesthetic-predictor |
| `clip-vit-large-patch14/` (the whole folder) | `models/reward_models` | openai/clip-vit-large-patch14 |

Same training settings as *sd15_hyper_hps_v2*; the set lands in `models/loras/shortft/sd15_combined/`.
"""

SD15_APPLY_NOTE = """
## A trained LoRA set in the stock KSampler (SD1.5)

*ApplyAlignedLoRA* patches the MODEL so that KSampler runs segment j's LoRA at segment j's timesteps, with any
sampler and scheduler. `ddim` + `ddim_uniform` at 50 steps visits exactly the timesteps the set was trained on
(981, 961, ..., 1); CFG 7.5 is the scale it was trained at. The left image is the checkpoint alone, the right one
the same seed with the set.

Files (the pack downloads nothing):

| file | put it in | get it from |
|---|---|---|
| `v1-5-pruned-emaonly.safetensors` | `models/checkpoints` | Hugging Face: stable-diffusion-v1-5/stable-diffusion-v1-5 |
| a ShortFT LoRA set folder (holding `set.json`) | `models/loras/...` | a run of *sd15_hyper_hps_v2* writes `models/loras/shortft/sd15_hps_v2/`; the command line writes `<run>/lora/` (copy the folder) |

Pick the set in `set_name` (refresh the page after copying one). `mode: merged` applies the set's merged LoRA at
every step instead, as the stock Load LoRA node would.
"""

VS_NOTE = """
## ShortFT against DRaFT-LV at equal budgets (tiny world, CPU)

Two *ShortFTTrain* nodes train the same model on the same reward, prompts and seed, with the same time budget
(`time_budget_s`: 150 s each, about 6 minutes in all with the evaluations on 2 CPU cores): one with
`method: shortft` (shortcut jumps, progressive stages, timestep-aware LoRAs), one with `method: draft-lv`
(gradient through the last step only, re-noised and averaged). Each draws its reward chart live; the held-out
`tiny_alignment` before and after is in each chart's legend, and the stock KSamplers on the right sample both sets
(same prompt, same seeds, CFG 1) for *ScoreImages*.

Nothing to download (the tiny world ships with the pack). For the paper's comparison, load SD1.5 with Hyper-SD
and HPS v2 as in *sd15_hyper_hps_v2* and give both runs the same `time_budget_s`.
"""


TINY = (2, "MODEL", "CLIP", "VAE")  # Load Tiny World's outputs
CHECKPOINT = (2, "MODEL", "CLIP", "VAE")  # Load Checkpoint's


def loader_links(loader: tuple[int, str, str, str], shortcut_node: int) -> list[tuple[int, str, int, str]]:
    src, model_out, clip_out, vae_out = loader
    return [(src, model_out, shortcut_node, "model"), (src, clip_out, shortcut_node, "clip"),
            (src, vae_out, shortcut_node, "vae")]


def tiny_alignment() -> Graph:
    nodes = [
        note(1, (20, 20), TINY_NOTE, size=(460, 520)),
        Node(2, "ShortFT_LoadTinyWorld", (20, 580), {"dtype": "fp32"}, size=(460, 0)),
        Node(3, "ShortFT_LoadShortcutModel", (20, 0), {"shortcut": "tiny", "preset": "auto"}, size=(460, 0),
             below=2),
        Node(4, "ShortFT_RewardModel", (20, 0), {"reward": "tiny_alignment", "spec": "", "device": "auto"},
             size=(460, 0), below=3),
        Node(5, "ShortFT_Train", (520, 20), train_widgets(run_name="tiny_alignment"), size=TRAIN_SIZE),
        Node(6, "PreviewImage", (520, 0), title="Reward curve", size=(440, 380), below=5),
    ]
    links = loader_links(TINY, 3) + [(3, "model", 5, "model"), (4, "reward", 5, "reward"),
                                     (5, "reward_curve", 6, "images")]
    more, more_links = compare(7, 1000, 20, TINY, reward=4, after_set=5, prompt=TINY_SAMPLE_PROMPT, guidance=1.0,
                               size=32, batch=4)
    return Graph(nodes + more, links + more_links)


def sd15_graph(reward: dict[str, Any], run_name: str, text: str) -> Graph:
    train = train_widgets(prompt_source="prompts below", prompts=SD15_PROMPTS, iterations=2000, batch_size=1,
                          lr=0.0001, rank=128, guidance=7.5, checkpoint_every=100, run_name=run_name,
                          eval_prompts=SD15_EVAL_PROMPTS, eval_every=100, preview_every=50)
    nodes = [
        note(1, (20, 20), text, size=(460, 600)),
        Node(2, "CheckpointLoaderSimple", (20, 660), {"ckpt_name": "v1-5-pruned-emaonly.safetensors"},
             size=(460, 0)),
        Node(3, "ShortFT_LoadShortcutModel", (20, 0), {"shortcut": "Hyper-SD15-4steps-lora.safetensors",
                                                       "preset": "auto"}, size=(460, 0), below=2),
        Node(4, "ShortFT_RewardModel", (20, 0), reward, size=(460, 0), below=3),
        Node(5, "ShortFT_Train", (520, 20), train, size=TRAIN_SIZE),
        Node(6, "PreviewImage", (520, 0), title="Reward curve", size=(440, 380), below=5),
    ]
    links = loader_links(CHECKPOINT, 3) + [(3, "model", 5, "model"), (4, "reward", 5, "reward"),
                                           (5, "reward_curve", 6, "images")]
    more, more_links = compare(7, 1000, 20, CHECKPOINT, reward=4, after_set=5, prompt=SD15_SAMPLE_PROMPT,
                               guidance=7.5, size=512, batch=1)
    return Graph(nodes + more, links + more_links)


def sd15_hyper_hps_v2() -> Graph:
    return sd15_graph({"reward": "hps_v2", "spec": "", "device": "auto"}, "sd15_hps_v2", SD15_HPS_NOTE)


def sd15_combined_reward() -> Graph:
    return sd15_graph({"reward": "hps_v2", "spec": "10*pickscore+2*hps_v2+0.05*aesthetic", "device": "auto"},
                      "sd15_combined", SD15_COMBINED_NOTE)


def sd15_apply_set_ksampler() -> Graph:
    sampler = sampler_widgets(50, 7.5)
    nodes = [
        note(1, (20, 20), SD15_APPLY_NOTE, size=(460, 560)),
        Node(2, "CheckpointLoaderSimple", (20, 620), {"ckpt_name": "v1-5-pruned-emaonly.safetensors"},
             size=(460, 0)),
        Node(3, "ShortFT_ApplyAlignedLoRA", (520, 20), {"set_name": "shortft/sd15_hps_v2", "strength": 1.0,
                                                        "mode": "timestep-aware"}, size=(400, 0)),
        Node(4, "CLIPTextEncode", (520, 220), {"text": "a cat sitting on a windowsill at sunset, detailed, "
                                                       "soft light"}, title="Positive", size=(400, 160)),
        Node(5, "CLIPTextEncode", (520, 420), {"text": "blurry, low quality"}, title="Negative", size=(400, 130)),
        Node(6, "EmptyLatentImage", (520, 590), {"width": 512, "height": 512, "batch_size": 1}, size=(400, 0)),
        Node(7, "KSampler", (960, 20), sampler, title="KSampler: checkpoint alone", size=(320, 0)),
        Node(8, "KSampler", (960, 340), sampler, title="KSampler: with the LoRA set", size=(320, 0)),
        Node(9, "VAEDecode", (1320, 20), size=(200, 0)),
        Node(10, "VAEDecode", (1320, 340), size=(200, 0)),
        Node(11, "ImageStitch", (1320, 500), {"direction": "right", "match_image_size": True, "spacing_width": 8,
                                              "spacing_color": "white"},
             title="Without (left) | with the set (right)"),
        Node(12, "PreviewImage", (1560, 20), title="Without (left) | with the set (right)", size=(560, 360)),
    ]
    links = [(2, "MODEL", 3, "model"), (2, "CLIP", 4, "clip"), (2, "CLIP", 5, "clip"),
             (2, "MODEL", 7, "model"), (4, "CONDITIONING", 7, "positive"), (5, "CONDITIONING", 7, "negative"),
             (6, "LATENT", 7, "latent_image"),
             (3, "model", 8, "model"), (4, "CONDITIONING", 8, "positive"), (5, "CONDITIONING", 8, "negative"),
             (6, "LATENT", 8, "latent_image"),
             (7, "LATENT", 9, "samples"), (2, "VAE", 9, "vae"), (8, "LATENT", 10, "samples"), (2, "VAE", 10, "vae"),
             (9, "IMAGE", 11, "image1"), (10, "IMAGE", 11, "image2"), (11, "IMAGE", 12, "images")]
    return Graph(nodes, links)


def tiny_shortft_vs_draft_lv() -> Graph:
    common = dict(iterations=320, time_budget_s=150.0, eval_every=0)
    nodes = [
        note(1, (20, 20), VS_NOTE, size=(460, 480)),
        Node(2, "ShortFT_LoadTinyWorld", (20, 540), {"dtype": "fp32"}, size=(460, 0)),
        Node(3, "ShortFT_LoadShortcutModel", (20, 0), {"shortcut": "tiny", "preset": "auto"}, size=(460, 0),
             below=2),
        Node(4, "ShortFT_RewardModel", (20, 0), {"reward": "tiny_alignment", "spec": "", "device": "auto"},
             size=(460, 0), below=3),
        Node(5, "ShortFT_Train", (520, 20), train_widgets(method="shortft", run_name="tiny_vs_shortft", **common),
             title="ShortFTTrain: ShortFT", size=TRAIN_SIZE),
        Node(6, "ShortFT_Train", (1000, 20), train_widgets(method="draft-lv", run_name="tiny_vs_draft_lv", **common),
             title="ShortFTTrain: DRaFT-LV", size=TRAIN_SIZE),
    ]
    links = loader_links(TINY, 3) + [(3, "model", 5, "model"), (4, "reward", 5, "reward"), (3, "model", 6, "model"),
                                     (4, "reward", 6, "reward")]
    more, more_links = compare(7, 1480, 20, TINY, reward=4, after_set=5, prompt=TINY_SAMPLE_PROMPT, guidance=1.0,
                               size=32, batch=4, before_set=6, before_title="DRaFT-LV set",
                               after_title="ShortFT set")
    return Graph(nodes + more, links + more_links)


GRAPHS = {
    "tiny_alignment": tiny_alignment,
    "sd15_hyper_hps_v2": sd15_hyper_hps_v2,
    "sd15_combined_reward": sd15_combined_reward,
    "sd15_apply_set_ksampler": sd15_apply_set_ksampler,
    "tiny_shortft_vs_draft_lv": tiny_shortft_vs_draft_lv,
}

BUILD = """async ({nodes, links}) => {
    const graph = app.rootGraph;
    graph.clear();
    const byId = {};
    for (const n of nodes) {
        const node = LiteGraph.createNode(n.type);
        if (!node) throw new Error(`unknown node type ${n.type}`);
        node.id = n.id;
        if (n.title) node.title = n.title;
        graph.add(node);
        node.pos = [...n.pos];
        for (const [name, value] of Object.entries(n.widgets)) {
            const widget = node.widgets?.find((w) => w.name === name);
            if (!widget) throw new Error(`${n.type} ${n.id} has no widget ${name} (${node.widgets?.map((w) => w.name)})`);
            widget.value = value;
        }
        if (n.color) node.color = n.color;
        if (n.bgcolor) node.bgcolor = n.bgcolor;
        const min = node.computeSize();
        node.setSize([Math.max(min[0], n.size?.[0] ?? 0), Math.max(min[1], n.size?.[1] ?? 0)]);
        if (n.below != null) {
            const above = byId[n.below];
            node.pos = [above.pos[0], above.pos[1] + above.size[1] + 60];
        }
        byId[n.id] = node;
    }
    for (const [a, out, b, inp] of links) {
        const src = byId[a], dst = byId[b];
        const o = src.outputs.findIndex((s) => s.name === out);
        const i = dst.inputs.findIndex((s) => s.name === inp);
        if (o < 0 || i < 0) throw new Error(`link ${a}.${out} -> ${b}.${inp}: no such slot ` +
            `(${src.outputs.map((s) => s.name)} / ${dst.inputs.map((s) => s.name)})`);
        if (!src.connect(o, dst, i)) throw new Error(`link ${a}.${out} -> ${b}.${inp} refused`);
    }
    graph.setDirtyCanvas(true, true);
    return graph.serialize();
}"""


def build_ui(editor: Editor, name: str) -> dict:
    """The UI-format workflow of ``GRAPHS[name]``, made by the frontend (its widgets, sizes and links)."""
    graph = GRAPHS[name]()
    spec = {"nodes": [{"id": n.id, "type": n.type, "pos": list(n.pos), "widgets": n.widgets, "title": n.title,
                       "size": list(n.size) if n.size else None, "color": n.color, "bgcolor": n.bgcolor,
                       "below": n.below}
                      for n in graph.nodes],
            "links": [list(link) for link in graph.links]}
    editor.evaluate(BUILD, spec)
    editor.fit_view()  # the view a dropped file opens with (the template browser fits the view itself)
    workflow = editor.serialize()
    workflow["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-shortft/workflows/{name}"))  # stable, one per file
    return workflow


def api_twin(editor: Editor, ui_file: Path) -> dict:
    """The API twin of a UI file: the file loaded into the editor, converted by ``app.graphToPrompt``."""
    editor.load(ui_file)
    return editor.graph_to_api()


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", action="store_true", help="rebuild the UI files from the graphs in this script")
    parser.add_argument("--only", nargs="*", help="workflow names (default: all)")
    args = parser.parse_args(argv)
    reason = browser_skip_reason()
    if reason:
        print(f"make_workflows: {reason}", file=sys.stderr)
        return 2
    from comfy_harness import ComfyServer, find_comfyui, requirements_skip_reason
    from playwright.sync_api import sync_playwright

    comfy, where = find_comfyui()
    if comfy is None or requirements_skip_reason(comfy):
        print(f"make_workflows: {where if comfy is None else requirements_skip_reason(comfy)}", file=sys.stderr)
        return 2
    names = args.only or (list(GRAPHS) if args.build else [p.stem for p in ui_workflows()])
    with ComfyServer(comfy) as server, sync_playwright() as pw:
        placeholder_models(server.models)
        browser = launch(pw)
        editor = Editor(browser, server.url).open()
        for name in names:
            ui_file = WORKFLOWS / f"{name}.json"
            if args.build:
                write_json(ui_file, build_ui(editor, name))
                print(f"wrote {ui_file.relative_to(WORKFLOWS.parent)}")
            write_json(twin_path(ui_file), api_twin(editor, ui_file))
            print(f"wrote {twin_path(ui_file).relative_to(WORKFLOWS.parent)}")
        problems = editor.problems()
        browser.close()
    if problems:
        print("make_workflows: the editor reported:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
