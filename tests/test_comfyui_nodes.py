"""Tier 2: the pack's nodes in a real ComfyUI server, driven through its HTTP and websocket API like any client.

The tiny world trains, samples and scores headless; its LoRA set lands in models/loras; a re-queued graph (cached,
or after the cache is freed) does not train again; bad inputs come back as node errors and the server serves the
next prompt; /interrupt stops training within an iteration, keeps a checkpoint, and queueing the graph again ends
with the LoRA set of an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from safetensors.torch import load_file

from comfy_harness import PromptRefused, execution_error, train_and_sample

pytestmark = pytest.mark.comfyui

NODES = ["ShortFT_LoadShortcutModel", "ShortFT_RewardModel", "ShortFT_Train", "ShortFT_Sample",
         "ShortFT_ScoreImages", "ShortFT_LoadLoRASet", "ShortFT_ApplyAlignedLoRA", "ShortFT_LoadTinyWorld"]
HELD_OUT = "a small red circle on the left on a white background\na big green triangle on the right on a white background"


PROMPT = "a small red circle on the left on a white background"


def graph(run_name: str, iterations: int = 3, **train) -> dict:
    """Load Tiny World -> LoadShortcutModel + RewardModel -> ShortFTTrain -> ApplyAlignedLoRA -> the stock KSampler ->
    VAE Decode -> ScoreImages, on the tiny world."""
    inputs = {"prompt_source": "tiny-world captions", "prompts": "", "method": "shortft", "iterations": iterations,
              "time_budget_s": 0.0, "batch_size": 1, "lr": 0.005, "rank": 2, "guidance": 1.0, "seed": 0,
              "stage_fractions": "", "checkpoint_every": 100, "run_name": run_name, "resume": True,
              "prompt_file": "", "eval_prompts": HELD_OUT, "eval_every": 0, "preview_every": 2,
              "preview_chain": "shortcut", **train}
    return {
        "1": {"class_type": "ShortFT_LoadTinyWorld", "inputs": {"dtype": "fp32"}},
        "2": {"class_type": "ShortFT_RewardModel", "inputs": {"reward": "tiny_alignment", "spec": "", "device": "cpu"}},
        **train_and_sample("1", inputs, "2", PROMPT, size=32, batch=2, steps=10),
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["decode", 0]}},
    }


def progress(events: list[dict], kind: str | None = None) -> list[dict]:
    return [e["data"] for e in events if e["type"] == "shortft.progress" and (kind is None or e["data"]["kind"] == kind)]


def options(spec: list) -> list:
    """A combo input's options in /object_info: V3 nodes send ["COMBO", {"options": [...]}], V1 nodes [[...], {}]."""
    return spec[1]["options"] if spec[0] == "COMBO" else spec[0]


def set_files(server, run_name: str) -> dict[str, dict[str, torch.Tensor]]:
    folder = server.models / "loras" / "shortft" / run_name
    return {p.name: load_file(str(p)) for p in sorted(folder.glob("*.safetensors"))}


def test_object_info_lists_every_node_with_tooltips(comfy_server):
    info = comfy_server.object_info()
    missing = [n for n in NODES if n not in info]
    assert missing == [], f"not registered: {missing}; log tail:\n{comfy_server.log_tail()}"
    for name in NODES:
        node = info[name]
        assert node["category"] == "ShortFT" and node["display_name"]
        for section in ("required", "optional"):
            for key, spec in node["input"].get(section, {}).items():
                assert spec[1].get("tooltip") if len(spec) > 1 else False, f"{name}.{key} has no tooltip"
    train = info["ShortFT_Train"]
    assert train["output_node"] is True
    assert train["output"] == ["SHORTFT_LORA_SET", "LOSS_MAP", "IMAGE", "IMAGE"]
    shortcut = info["ShortFT_LoadShortcutModel"]["input"]["required"]
    assert [shortcut[k][0] for k in ("model", "clip", "vae")] == ["MODEL", "CLIP", "VAE"]
    assert "tiny" in options(shortcut["shortcut"])
    assert info["ShortFT_Sample"]["deprecated"] is True
    assert "tiny_alignment" in options(info["ShortFT_RewardModel"]["input"]["required"]["reward"])


def test_tiny_graph_trains_samples_scores_and_never_trains_twice(comfy_server):
    run = "tier2_tiny"
    prompt_id, events = comfy_server.run(graph(run))
    assert execution_error(events) is None, execution_error(events)
    assert events[-1]["type"] == "execution_success"
    steps = progress(events, "step")
    assert [s["iteration"] for s in steps] == [1, 2, 3] and all(math.isfinite(s["reward"]) for s in steps)
    assert len(progress(events, "eval")) == 2  # before and after
    assert any(e["type"] == "progress" and e["data"]["node"] == "train" for e in events)  # the node's bar moved
    outputs = comfy_server.history(prompt_id)["outputs"]
    scores = outputs["score"]["text"][0]
    assert "tiny_alignment: mean" in scores and len(scores.splitlines()) == 3
    assert outputs["train"]["images"]  # the before/after grid shown on the node
    # the set is in models/loras (the stock Load LoRA node lists merged.safetensors), the run in output/
    files = set_files(comfy_server, run)
    assert sorted(files) == ["merged.safetensors"] + [f"segment_{j}.safetensors" for j in range(1, 4)]  # 4: the base
    loras = options(comfy_server.object_info("LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"])
    assert f"shortft/{run}/merged.safetensors" in loras
    sets = comfy_server.object_info("ShortFT_LoadLoRASet")["ShortFT_LoadLoRASet"]["input"]["required"]
    assert f"shortft/{run}" in options(next(iter(sets.values())))
    out = comfy_server.base / "output" / "shortft" / run
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert (out / "before_after.png").is_file() and (out / "reward_curve.png").is_file()
    # queued again: ComfyUI's cache answers; after the cache is freed the node runs and finds the finished run
    _, again = comfy_server.run(graph(run))
    assert again[-1]["type"] == "execution_success" and progress(again, "step") == []
    comfy_server._request("POST", "/free", {"free_memory": True})
    time.sleep(2)  # the worker applies the flag between prompts
    _, third = comfy_server.run(graph(run))
    assert third[-1]["type"] == "execution_success"
    assert any(e["type"] == "executing" and (e["data"] or {}).get("node") == "train" for e in third)  # it ran
    assert progress(third, "step") == []  # and did not train
    assert set_files(comfy_server, run).keys() == files.keys()
    assert all(torch.equal(files[f][k], v) for f, sd in set_files(comfy_server, run).items() for k, v in sd.items())


@pytest.mark.parametrize("node, change, message", [
    ("sc", {"shortcut": "no_such_lora.safetensors"}, "no_such_lora"),
    ("sc", {"preset": "no_such_preset"}, "no_such_preset"),
    ("train", {"iterations": -5}, "iterations"),
    ("train", {"lr": float("nan")}, "lr"),
    ("train", {"prompt_source": "prompts below", "prompts": "  \n "}, "prompts: empty"),
    ("2", {"spec": "10*no_such_reward"}, "no_such_reward"),
    ("train", {"run_name": "../escape"}, "run_name"),
    ("train", {"stage_fractions": "0.5,0.5"}, "stage_fractions"),  # fits neither three stages nor four
])
def test_bad_inputs_are_node_errors_and_the_server_serves_on(comfy_server, node, change, message):
    g = graph("tier2_bad")
    g[node]["inputs"].update(change)
    with pytest.raises(PromptRefused) as refused:
        comfy_server.queue(g)
    assert any(message in d for d in refused.value.details()), str(refused.value)
    assert comfy_server.get("/system_stats")["system"]  # still serving


def test_a_runtime_error_is_a_node_error_and_the_server_serves_on(comfy_server):
    """A prompt file with no usable line passes the static checks (it exists) and is refused by the session when the
    node runs: an execution error on the train node, and the next prompt runs."""
    g = graph("tier2_runtime")
    g["train"]["inputs"]["prompt_source"] = "prompt file"
    g["train"]["inputs"]["prompt_file"] = "no_such_prompts.txt"
    with pytest.raises(PromptRefused) as refused:  # caught before running: the file is checked statically
        comfy_server.queue(g)
    assert any("no_such_prompts.txt" in d for d in refused.value.details())
    (comfy_server.base / "input" / "empty_prompts.txt").write_text("# nothing here\n")
    g["train"]["inputs"]["prompt_file"] = "empty_prompts.txt"
    _, events = comfy_server.run(g)
    error = execution_error(events)
    assert error is not None and error["node_id"] == "train" and "no usable line" in error["exception_message"]
    _, ok = comfy_server.run(graph("tier2_after_error", iterations=1))
    assert ok[-1]["type"] == "execution_success"


def test_a_graph_reads_only_the_servers_own_folders(comfy_server):
    """A prompt file outside ComfyUI's input/output/temp folders (an absolute path, or ../ out of the input folder)
    and a shortcut outside models/loras are node errors that say where files go, even where the file exists; a prompt file in the input folder, named as ComfyUI names inputs, passes."""
    outside = comfy_server.base / "elsewhere"
    (outside / "pipe").mkdir(parents=True, exist_ok=True)
    (outside / "pipe" / "model_index.json").write_text("{}")
    (outside / "prompts.txt").write_text("a small red circle on the left on a white background\n")
    for name in (str(outside / "prompts.txt"), "../elsewhere/prompts.txt"):
        g = graph("tier2_outside")
        g["train"]["inputs"].update(prompt_source="prompt file", prompt_file=name)
        with pytest.raises(PromptRefused) as refused:
            comfy_server.queue(g)
        assert any("outside ComfyUI's input" in d and "put the file in the input folder" in d
                   for d in refused.value.details()), str(refused.value)
    (outside / "short.safetensors").write_bytes(b"not a LoRA")
    for name in (str(outside / "short.safetensors"), "../../elsewhere/short.safetensors"):
        g = graph("tier2_outside")
        g["sc"]["inputs"]["shortcut"] = name
        with pytest.raises(PromptRefused) as refused:
            comfy_server.queue(g)
        assert any("is not in ComfyUI's LoRA folders" in d for d in refused.value.details()), str(refused.value)
    (comfy_server.base / "input" / "mine.txt").write_text("a small red circle on the left on a white background\n")
    for name in ("mine.txt", "mine.txt [input]"):
        g = graph("tier2_inside_" + name.split()[-1].strip("[]"), iterations=1, preview_every=0, eval_prompts="")
        g["train"]["inputs"].update(prompt_source="prompt file", prompt_file=name)
        _, events = comfy_server.run(g)
        assert events[-1]["type"] == "execution_success", execution_error(events)


def test_stage_fractions_follow_the_models_stages(comfy_server):
    """The node cannot know the model when it validates, so four shares (a real model's four stages) pass; on the
    tiny model, whose preset leaves the last segment to the base (three stages), the train node refuses them when it
    runs, naming the setting and the count."""
    _, events = comfy_server.run(graph("tier2_fractions", iterations=1, stage_fractions="0.4,0.2,0.2,0.2"))
    error = execution_error(events)
    assert error is not None and error["node_id"] == "train"
    assert "stage_fractions needs 3 shares" in error["exception_message"]


def test_interrupt_stops_within_an_iteration_and_queueing_again_ends_like_an_uninterrupted_run(comfy_server):
    kw = dict(iterations=30, preview_every=0, eval_prompts="")
    _, whole = comfy_server.run(graph("tier2_whole", **kw))
    assert whole[-1]["type"] == "execution_success"
    prompt_id = comfy_server.queue(graph("tier2_cut", **kw))
    listener = comfy_server._listener(comfy_server.client_id)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        steps = [e for e in listener.events if e["type"] == "shortft.progress"
                 and e["data"].get("prompt_id") == prompt_id and e["data"]["kind"] == "step"]
        if len(steps) >= 3:
            break
        time.sleep(0.05)
    seen = len(steps)
    comfy_server.interrupt()
    cut = comfy_server.wait(prompt_id)
    assert cut[-1]["type"] == "execution_interrupted"
    done = progress(cut, "step")
    assert len(done) - seen <= 1, "more than one iteration ran after the interrupt"
    out = comfy_server.base / "output" / "shortft" / "tier2_cut"
    state = json.loads((out / "run.json").read_text())
    assert state["status"] == "stopped" and state["iteration"] == len(done) < 30
    assert (out / "checkpoints" / f"step-{len(done):07d}.pt").is_file()
    _, resumed = comfy_server.run(graph("tier2_cut", **kw))
    assert resumed[-1]["type"] == "execution_success"
    assert [s["iteration"] for s in progress(resumed, "step")] == list(range(len(done) + 1, 31))
    a, b = set_files(comfy_server, "tier2_whole"), set_files(comfy_server, "tier2_cut")
    assert a.keys() == b.keys() and all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f])


def test_old_workflows_are_node_errors_that_name_the_replacement(comfy_server):
    """A graph made for the LoadShortcutModel that loaded its own base (widgets base/device/dtype, no MODEL), or one
    holding the replaced ShortFTSample, is refused before it runs, with a message naming what replaces it."""
    g = graph("tier2_old")
    g["sc"]["inputs"] = {"base": "tiny", "shortcut": "tiny", "preset": "auto", "device": "cpu", "dtype": "auto"}
    with pytest.raises(PromptRefused) as refused:
        comfy_server.queue(g)
    assert any("no longer loads a base itself" in d and "Load Checkpoint" in d for d in refused.value.details()), \
        str(refused.value)
    g = graph("tier2_old")
    g["sc"]["inputs"] = {"shortcut": "tiny", "preset": "auto"}  # a UI workflow of that version: its sockets unlinked
    with pytest.raises(PromptRefused) as refused:
        comfy_server.queue(g)
    assert any("model: not connected" in d and "Load Tiny World" in d for d in refused.value.details())
    g = {"13": {"class_type": "ShortFT_Sample", "inputs": {"prompts": PROMPT, "seed": 0, "steps": 10,
                                                           "guidance": 0.0}},
         "15": {"class_type": "PreviewImage", "inputs": {"images": ["13", 0]}}}
    with pytest.raises(PromptRefused) as refused:
        comfy_server.queue(g)
    assert any("replaced by the stock nodes" in d and "KSampler" in d for d in refused.value.details())


def test_a_model_carrying_other_loras_trains_on_top_as_another_run(comfy_server):
    """A MODEL with a LoRA already applied (the stock LoraLoaderModelOnly) trains, on top of that LoRA, as a run of
    its own: the run's settings name another model than the plain MODEL's, so the same run name is refused as a
    folder holding another run, and a new run name trains."""
    plain = "tier2_plain"
    _, events = comfy_server.run(graph(plain, iterations=1, preview_every=0, eval_prompts=""))
    assert events[-1]["type"] == "execution_success", execution_error(events)
    lora = f"shortft/{plain}/merged.safetensors"
    g = graph(plain, iterations=1, preview_every=0, eval_prompts="")
    g["14"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": lora,
                                                              "strength_model": 1.0}}
    g["sc"]["inputs"]["model"] = ["14", 0]
    _, events = comfy_server.run(g)
    error = execution_error(events)
    assert error is not None and error["node_id"] == "train" and "other settings" in error["exception_message"], error
    g["train"]["inputs"]["run_name"] = "tier2_on_top"
    _, events = comfy_server.run(g)
    assert events[-1]["type"] == "execution_success", execution_error(events)
    models = [json.loads((comfy_server.base / "output" / "shortft" / r / "run.json").read_text())["settings"]["model"]
              for r in (plain, "tier2_on_top")]
    assert models[0] != models[1] and all(m.startswith("ComfyUI MODEL (tiny, ") for m in models), models
