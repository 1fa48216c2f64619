"""The shipped workflows: UI files the editor loads (workflows/*.json, listed by ComfyUI's template browser) and
their API twins (workflows/api/*.json) for headless runs.

Tier 1 (everywhere): each UI file has a twin and the twin holds the UI file's nodes and widget values; each names
its files in a note and in the browser tier's placeholder list. Tier 2 (``comfyui``): every twin fits the
server's /object_info (node types, required inputs, link types), and the tiny-world twins run headless with their
iterations turned down. The faithful UI -> API sync check (the frontend's own conversion) is in test_browser.py.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from browser_tools import API_TWINS, WORKFLOW_FILES, WORKFLOWS, twin_path, ui_workflows

MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft", ".onnx", ".gguf")
VIRTUAL = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}  # frontend-only nodes: absent from the API format
EXPECTED = {"tiny_alignment", "sd15_hyper_hps_v2", "sd15_combined_reward", "sd15_apply_set_ksampler",
            "tiny_shortft_vs_draft_lv"}


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def named_files(twin: dict) -> set[str]:
    """Model files and LoRA sets an API graph names in its literal inputs."""
    out = set()
    for node in twin.values():
        for key, value in node["inputs"].items():
            if isinstance(value, str) and (value.lower().endswith(MODEL_SUFFIXES) or (key == "set_name" and value != "none")):
                out.add(value)
    return out


def notes(ui: dict) -> str:
    return "\n".join(str(v) for n in ui["nodes"] if n["type"] in ("Note", "MarkdownNote")
                     for v in n.get("widgets_values") or [])


def test_the_shipped_workflows_and_their_twins_pair_up():
    assert {p.stem for p in ui_workflows()} == EXPECTED
    assert sorted(p.name for p in API_TWINS.glob("*.json")) == sorted(p.name for p in ui_workflows())
    assert not list(WORKFLOWS.glob("*.api.json")), "API twins live in workflows/api/, not beside the UI files"
    readme = (WORKFLOWS / "README.md").read_text(encoding="utf-8")
    assert "workflows/api/" in readme or "`api/`" in readme


@pytest.mark.parametrize("ui_file", ui_workflows(), ids=lambda p: p.stem)
def test_twin_holds_the_ui_nodes_and_widget_values(ui_file):
    ui, twin = load(ui_file), load(twin_path(ui_file))
    real = {str(n["id"]): n for n in ui["nodes"] if n["type"] not in VIRTUAL and n.get("mode", 0) == 0}
    assert set(twin) == set(real), f"{ui_file.name}: twin nodes {sorted(twin)} != UI nodes {sorted(real)}"
    for node_id, node in real.items():
        assert twin[node_id]["class_type"] == node["type"]
        named = node.get("widgets_values_named") or {}
        for key, value in twin[node_id]["inputs"].items():
            if isinstance(value, list):  # a link: [source node id, output index]
                source = value[0]
                assert source in real, f"{ui_file.name}: node {node_id}.{key} links to {source}, not in the graph"
            elif key in named:
                assert named[key] == value or (isinstance(value, float) and math.isclose(named[key], value)), \
                    f"{ui_file.name}: node {node_id}.{key}: UI {named[key]!r}, twin {value!r}"


@pytest.mark.parametrize("ui_file", ui_workflows(), ids=lambda p: p.stem)
def test_a_note_names_every_file_the_workflow_needs(ui_file):
    ui, twin = load(ui_file), load(twin_path(ui_file))
    text = notes(ui)
    assert text, f"{ui_file.name} has no Note/MarkdownNote"
    assert "download" in text.lower(), f"{ui_file.name}'s note does not say that nothing is downloaded"
    placeholders = {name.rsplit("/set.json", 1)[0] for _, name in WORKFLOW_FILES}
    for name in named_files(twin):
        assert name.rsplit("/", 1)[-1] in text, f"{ui_file.name}: its note does not name {name}"
        assert name in placeholders, f"{ui_file.name} names {name}: add it to browser_tools.WORKFLOW_FILES"
    for node in twin.values():  # every reward weight file a workflow needs is named too
        spec = (node["inputs"].get("spec") or node["inputs"].get("reward")) if node["class_type"] == "ShortFT_RewardModel" else ""
        for reward, file in (("hps_v2", "HPS_v2_compressed.pt"), ("pickscore", "PickScore_v1"),
                             ("aesthetic", "sac+logos+ava1-l14-linearMSE.pth")):
            if reward in (spec or ""):
                assert file in text, f"{ui_file.name}: uses {reward} but its note does not name {file}"


# ----- tier 2 ------------------------------------------------------------------------------------------------------

def input_types(spec: dict) -> dict[str, tuple[str, bool]]:
    """input name -> (type, required) from a node's /object_info entry."""
    out = {}
    for section, required in (("required", True), ("optional", False)):
        for name, value in (spec["input"].get(section) or {}).items():
            kind = value[0]
            out[name] = ("COMBO" if isinstance(kind, list) else kind, required)
    return out


@pytest.mark.comfyui
@pytest.mark.parametrize("ui_file", ui_workflows(), ids=lambda p: p.stem)
def test_twin_fits_the_servers_node_definitions(comfy_server, ui_file):
    info = comfy_server.object_info()
    twin = load(twin_path(ui_file))
    for node_id, node in twin.items():
        assert node["class_type"] in info, f"{ui_file.name}: node {node_id} is of unknown type {node['class_type']}"
        spec = info[node["class_type"]]
        inputs = input_types(spec)
        missing = [k for k, (_, required) in inputs.items() if required and k not in node["inputs"]]
        assert not missing, f"{ui_file.name}: node {node_id} lacks required inputs {missing}"
        unknown = [k for k in node["inputs"] if k not in inputs]
        assert not unknown, f"{ui_file.name}: node {node_id} has inputs its type does not know: {unknown}"
        for key, value in node["inputs"].items():
            if isinstance(value, list):
                source = twin[value[0]]
                out_type = info[source["class_type"]]["output"][value[1]]
                assert out_type == inputs[key][0], \
                    f"{ui_file.name}: node {node_id}.{key} ({inputs[key][0]}) fed by {value} ({out_type})"


HELD_OUT = "a yellow circle left of a blue circle on a white background"


def quick(twin: dict) -> dict:
    """A tiny-world twin turned down to seconds: 2 iterations at batch 1, one held-out prompt, 5 KSampler steps."""
    for node in twin.values():
        inputs = node["inputs"]
        if node["class_type"] == "ShortFT_Train":
            inputs.update(iterations=2, time_budget_s=0.0, batch_size=1, eval_every=0, preview_every=1,
                          eval_prompts=HELD_OUT, resume=False, run_name="twin_" + inputs["run_name"])
        elif node["class_type"] == "KSampler":
            inputs.update(steps=5)
        elif node["class_type"] == "ShortFT_RewardModel":
            inputs.update(device="cpu")
    return twin


@pytest.mark.comfyui
@pytest.mark.parametrize("name", ["tiny_alignment", "tiny_shortft_vs_draft_lv"])
def test_tiny_twin_runs_headless(comfy_server, name):
    from comfy_harness import execution_error

    twin = quick(load(API_TWINS / f"{name}.json"))
    prompt_id, events = comfy_server.run(twin, timeout=900)
    assert execution_error(events) is None, execution_error(events)
    assert events[-1]["type"] == "execution_success"
    outputs = comfy_server.history(prompt_id)["outputs"]
    trains = [k for k, v in twin.items() if v["class_type"] == "ShortFT_Train"]
    scores = [k for k, v in twin.items() if v["class_type"] == "ShortFT_ScoreImages"]
    steps = [e["data"] for e in events if e["type"] == "shortft.progress" and e["data"]["kind"] == "step"]
    assert sorted((s["node"], s["iteration"]) for s in steps) == sorted((t, i) for t in trains for i in (1, 2))
    for k in scores:
        assert "mean" in outputs[k]["text"][0], outputs[k]
    previews = [k for k, v in twin.items() if v["class_type"] == "PreviewImage"]
    assert previews and all(outputs[k]["images"] for k in previews)
    # what a reloaded page rebuilds its charts from (nodes/live.py)
    live = comfy_server.get("/api/shortft/live")["nodes"]
    for k in trains:
        state = live[k]
        assert state["status"] == "finished" and state["prompt_id"] == prompt_id
        assert state["run"] == twin[k]["inputs"]["run_name"] and state["method"] == twin[k]["inputs"]["method"]
        assert state["reward_name"] == "tiny_alignment" and [p["iteration"] for p in state["points"]] == [1, 2]
        assert [e["iteration"] for e in state["evals"]] == [0, 2] and "tiny_alignment" in state["evals"][0]
        assert state["previews"] == 2 and comfy_server.get(f"/api/shortft/live?node={k}")["nodes"] == {k: state}
        with urllib.request.urlopen(f"{comfy_server.url}/api/shortft/live/preview?node={k}") as r:
            assert r.headers["Content-Type"] == "image/jpeg" and r.read(2) == b"\xff\xd8"
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"{comfy_server.url}/api/shortft/live/preview?node=no_such_node")
    assert missing.value.code == 404
    assert comfy_server.get("/api/shortft/live?node=no_such_node") == {"nodes": {}}
