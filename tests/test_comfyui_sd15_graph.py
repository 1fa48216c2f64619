"""Tier 2: the graph a ComfyUI user builds on a real checkpoint, run headless through the HTTP API:

    Load Checkpoint -> LoadShortcutModel -> ShortFTTrain -> ApplyAlignedLoRA -> KSampler -> VAE Decode

on a random full-size SD1.5 checkpoint (fp32 on the CPU, 64 px images) with a random shortcut LoRA on every layer a
Hyper-SD LoRA adapts, saved under the published Hyper-SD file name (so its preset is found from the name). The set
is written for SD1.5, the KSampler samples through it, and a shortcut made for another family is a node error
before anything trains.
"""

from __future__ import annotations

import json
import shutil

import pytest

from comfy_harness import execution_error, train_and_sample

pytestmark = [pytest.mark.comfyui, pytest.mark.timeout(3600)]

SHORTCUT = "Hyper-SD15-4steps-lora.safetensors"
CHECKPOINT = "random_sd15.safetensors"
PROMPT = "a red circle left of a blue square"
HELD_OUT = "a green triangle above a yellow circle"


@pytest.fixture(scope="module")
def sd15_files(comfy_server, sd15_checkpoint, tmp_path_factory) -> dict:
    """The random checkpoint in models/checkpoints and a random SD1.5 shortcut in models/loras."""
    from shortft_core.testing.random_models import write_random_shortcut
    from shortft_core.tiny_world import tiny_shortcut_path

    checkpoints = comfy_server.models / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    (checkpoints / CHECKPOINT).unlink(missing_ok=True)
    (checkpoints / CHECKPOINT).symlink_to(sd15_checkpoint)
    loras = comfy_server.models / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    write_random_shortcut(sd15_checkpoint, loras / SHORTCUT)
    shutil.copyfile(tiny_shortcut_path(), loras / "tiny_world_shortcut.safetensors")
    return {"checkpoint": CHECKPOINT, "shortcut": SHORTCUT}


def graph(run_name: str, shortcut: str = SHORTCUT) -> dict:
    train = {"prompt_source": "prompts below", "prompts": PROMPT, "method": "shortft", "iterations": 1,
             "time_budget_s": 0.0, "batch_size": 1, "lr": 0.001, "rank": 2, "guidance": 1.0, "seed": 0,
             "stage_fractions": "", "checkpoint_every": 100, "run_name": run_name, "resume": True, "prompt_file": "",
             "eval_prompts": HELD_OUT, "eval_every": 0, "preview_every": 0, "preview_chain": "shortcut",
             "image_size": 64}
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
         "3": {"class_type": "ShortFT_RewardModel", "inputs": {"reward": "symmetry", "spec": "", "device": "cpu"}},
         **train_and_sample("1", train, "3", PROMPT, size=64, batch=1, steps=4)}
    g["sc"]["inputs"]["shortcut"] = shortcut
    return g


def test_the_stock_graph_trains_a_full_size_sd15_checkpoint(comfy_server, sd15_files):
    prompt_id, events = comfy_server.run(graph("sd15_graph"), timeout=3000)
    assert execution_error(events) is None, execution_error(events)
    assert events[-1]["type"] == "execution_success"
    steps = [e["data"] for e in events if e["type"] == "shortft.progress" and e["data"]["kind"] == "step"]
    assert [s["iteration"] for s in steps] == [1]
    folder = comfy_server.models / "loras" / "shortft" / "sd15_graph"
    manifest = json.loads((folder / "set.json").read_text())
    assert manifest["family"] == "sd15"
    assert sorted(p.name for p in folder.glob("segment_*.safetensors")) == [f"segment_{j}.safetensors"
                                                                           for j in range(1, 5)]
    run = json.loads((comfy_server.base / "output" / "shortft" / "sd15_graph" / "run.json").read_text())
    assert run["status"] == "finished" and run["settings"]["model"].startswith("ComfyUI MODEL (sd15, ")
    assert run["settings"]["shortcut"]["file"].endswith(SHORTCUT)
    assert run["settings"]["config"]["image_size"] == 64
    text = comfy_server.history(prompt_id)["outputs"]["score"]["text"][0]
    assert text.startswith("symmetry: mean") and "over 1 images" in text


@pytest.mark.parametrize("shortcut, message", [
    ("tiny", "the tiny world's own"),
    ("tiny_world_shortcut.safetensors", "do not fit this sd15 MODEL"),
])
def test_a_shortcut_for_another_family_is_a_node_error_before_training(comfy_server, sd15_files, shortcut, message):
    _, events = comfy_server.run(graph("sd15_wrong_shortcut", shortcut=shortcut), timeout=600)
    error = execution_error(events)
    assert error is not None and error["node_id"] == "sc" and message in error["exception_message"], error
    assert not (comfy_server.base / "output" / "shortft" / "sd15_wrong_shortcut").exists()
