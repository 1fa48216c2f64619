"""Browser tier: ComfyUI's real frontend (comfyui-frontend-package) in headless Chromium against a real ComfyUI
server with this pack, as a user sees it.

Every shipped workflow loads with no missing-node or missing-model error and no console warning; its API twin is
exactly what the frontend's own conversion makes of it; the tiny workflow, run with the Run button, draws its live
chart (points, stages, held-out evaluations, previews), which a page reload in the middle of the run rebuilds from
the server; a bad widget value comes back as the node's error in the editor.

The server is this module's own (not the tier-2 one): it holds empty placeholder files named as the workflows name
their models (browser_tools.WORKFLOW_FILES), so loading checks the names the editor lists and nothing else.
Screenshots go to ``$SHORTFT_ARTIFACTS/browser`` (default ``<temp dir>/shortft-artifacts/browser``); with
``SHORTFT_UPDATE_DOCS=1`` the run's mid-run view of the graph also replaces the README's picture (docs/).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from types import SimpleNamespace

import pytest

from browser_tools import (
    WORKFLOWS,
    Editor,
    artifacts_dir,
    browser_skip_reason,
    launch,
    placeholder_models,
    twin_path,
    ui_workflows,
    wait_until,
)

pytestmark = pytest.mark.browser

TINY = WORKFLOWS / "tiny_alignment.json"
TRAIN = 5  # the ShortFTTrain node of tiny_alignment.json
# the README's screenshot: the loaders, the train node with its chart and the before/after samplers of tiny_alignment
README_NODES = [1, 2, 3, 4, 5, 7, 8, 9, 10, 12]
README_VIEW = {"width": 1760, "height": 1160}
DOCS_SHOT = WORKFLOWS.parent / "docs" / "comfyui_tiny_alignment_mid_run.png"
HELD_OUT = "a yellow circle left of a blue circle on a white background"
WIDGET = "shortft_live_chart"  # the chart's DOM widget on ShortFTTrain (web/shortft.js)
CHART = "() => { const el = document.querySelector('.shortft-live'); return el ? {...el.dataset} : null; }"


@pytest.fixture(scope="module")
def env():
    reason = browser_skip_reason()
    if reason:
        pytest.skip(reason)
    from comfy_harness import ComfyServer, comfyui_or_skip

    comfy = comfyui_or_skip()
    from playwright.sync_api import sync_playwright

    artifacts = artifacts_dir()
    for old in artifacts.glob("*.png"):
        old.unlink()
    # one torch thread in the server, as conftest.py sets for the tests: on a busy 2-core machine two are far slower
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", os.environ.get("SHORTFT_TEST_THREADS", "1"))
        server = ComfyServer(comfy)
        server.start()
    try:
        placeholder_models(server.models)
        with sync_playwright() as pw:
            browser = launch(pw)
            try:
                yield SimpleNamespace(server=server, browser=browser, artifacts=artifacts)
            finally:
                browser.close()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def loader(env):
    """One editor page that loads the workflows one after another; a large window, so a whole workflow fits at a
    zoom where the editor still draws text (below about 0.6 it draws blank boxes)."""
    editor = Editor(env.browser, env.server.url, env.artifacts, viewport={"width": 2400, "height": 1700}).open()
    yield editor
    editor.close()


@pytest.fixture
def editor(env):
    editor = Editor(env.browser, env.server.url, env.artifacts).open()
    yield editor
    editor.close()
    idle(env.server)


def idle(server, timeout: float = 120) -> None:
    """Clear the server's queue and stop what runs (a refused graph's valid part may have been queued)."""
    server._request("POST", "/queue", {"clear": True})
    server.interrupt()
    wait_until(lambda: not any(server.get("/queue").values()), timeout, what="an empty queue")


def node_summary(editor: Editor) -> list[dict]:
    return editor.evaluate("""() => app.rootGraph.nodes.map((n) => ({id: n.id, type: n.type,
        registered: !!LiteGraph.registered_node_types[n.type], errors: !!n.has_errors}))""")


# ----- loading ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ui_file", ui_workflows(), ids=lambda p: p.stem)
def test_workflow_loads_without_errors_or_warnings(loader, ui_file):
    mark = loader.mark()
    loader.load(ui_file)
    loader.fit_view()
    shot = loader.screenshot(f"load_{ui_file.stem}")
    assert loader.error_overlay() is None, f"{ui_file.name}: error overlay: {loader.error_overlay()} (see {shot})"
    assert loader.dialogs() == [], f"{ui_file.name}: dialogs {loader.dialogs()} (see {shot})"
    assert loader.problems(mark) == [], f"{ui_file.name}: console: {loader.problems(mark)}"
    nodes = node_summary(loader)
    assert len(nodes) == len(json.loads(ui_file.read_text())["nodes"])
    assert [n for n in nodes if not n["registered"] or n["errors"]] == []
    api = loader.graph_to_api()
    assert api and all(node["class_type"] for node in api.values())
    charts = loader.evaluate("() => document.querySelectorAll('.shortft-live').length")
    assert charts == sum(n["type"] == "ShortFT_Train" for n in nodes)


def test_missing_files_and_nodes_are_reported_on_load(loader):
    """The checks above can fail: a checkpoint the server lacks and a node type nobody registered both show the
    error overlay."""
    workflow = json.loads((WORKFLOWS / "sd15_hyper_hps_v2.json").read_text())
    for node in workflow["nodes"]:
        if node["type"] == "CheckpointLoaderSimple":
            node["widgets_values"][0] = "no_such_checkpoint.safetensors"
    loader.load(workflow, "missing_model.json")
    overlay = wait_until(loader.error_overlay, 20, what="the error overlay")
    loader.screenshot("load_missing_model")
    assert "no_such_checkpoint.safetensors is missing" in overlay, overlay
    workflow = json.loads(TINY.read_text())
    workflow["nodes"][1]["type"] = "ShortFT_NoSuchNode"
    loader.load(workflow, "missing_node.json")
    overlay = wait_until(loader.error_overlay, 20, what="the error overlay")
    loader.screenshot("load_missing_node")
    assert "ShortFT_NoSuchNode" in overlay or "missing" in overlay.lower(), overlay


def test_api_twins_are_the_frontends_conversion_of_the_ui_files(loader):
    stale = []
    for ui_file in ui_workflows():
        loader.load(ui_file)
        made = loader.graph_to_api()
        if made != json.loads(twin_path(ui_file).read_text()):
            stale.append(ui_file.name)
    assert stale == [], (f"API twins differ from their UI files: {stale}; regenerate them with "
                         "python tests/make_workflows.py")


# ----- a run in the editor ---------------------------------------------------------------------------------------

def chart(editor: Editor) -> dict:
    return editor.evaluate(CHART) or {}


def close_up(editor: Editor, name: str) -> None:
    """A screenshot of the chart alone, zoomed in, then the whole node in view again."""
    editor.focus_widget(TRAIN, WIDGET)
    editor.screenshot_of(".shortft-live", name)
    editor.focus_node(TRAIN)


def canvas_image(editor: Editor) -> str:
    return editor.evaluate("() => document.querySelector('.shortft-live canvas').toDataURL()")


def test_tiny_workflow_runs_with_a_live_chart_that_a_reload_rebuilds(env, editor):
    run = f"browser_live_{int(time.time())}"
    editor.load(TINY)
    settings = dict(iterations=12, batch_size=1, eval_every=6, preview_every=2, eval_prompts=HELD_OUT, run_name=run)
    for name, value in settings.items():
        editor.set_widget(TRAIN, name, value)
    samplers = editor.nodes_of_type("KSampler")
    assert len(samplers) == 2
    for node in samplers:
        editor.set_widget(node, "steps", 5)
    editor.page.wait_for_timeout(300)  # the edits are saved with the open workflow (a reload restores them)
    editor.focus_node(TRAIN)
    assert chart(editor)["status"] == "idle"
    editor.page.locator("[data-testid=queue-button]").click()

    # mid-run: the chart moves, the stock preview and the chart's own preview show the latest image
    mid = editor.wait_for(f"() => {{ const d = ({CHART})(); return d && d.status === 'running' && +d.points >= 3 && d }}",
                          timeout=300)
    mid_canvas = canvas_image(editor)
    editor.wait_for("() => { const img = document.querySelector('.shortft-live .shortft-preview');"
                    " return img && img.complete && img.naturalWidth > 0 }", timeout=120)
    editor.screenshot("live_1_mid_run")
    close_up(editor, "live_1_mid_run_chart")
    view = editor.page.viewport_size
    editor.page.set_viewport_size(README_VIEW)
    editor.fit_view(zoom=0.95, nodes=README_NODES)
    shot = editor.screenshot("live_1_mid_run_graph")
    if os.environ.get("SHORTFT_UPDATE_DOCS") and shot is not None:  # the README's picture of the editor mid-run
        shutil.copyfile(shot, DOCS_SHOT)
    editor.page.set_viewport_size(view)
    editor.focus_node(TRAIN)
    assert mid["run"] == run and int(mid["drawnPoints"]) == int(mid["points"]) >= 3
    assert int(mid["points"]) < settings["iterations"], "the run ended before the page could see it in progress"
    assert editor.evaluate(f"() => (app.rootGraph.getNodeById({TRAIN}).imgs || []).length") >= 1, \
        "the node shows no preview from its progress bar"

    # reload in the middle of the run: the chart comes back with every point so far (from /shortft/live)
    editor.reload()
    after = editor.wait_for(f"""() => {{ const d = ({CHART})();
        return d && d.run === {json.dumps(run)} && +d.points >= {int(mid['points'])} && d }}""", timeout=30)
    editor.focus_node(TRAIN)
    editor.screenshot("live_2_after_reload")
    close_up(editor, "live_2_after_reload_chart")
    assert int(after["drawnPoints"]) == int(after["points"]) and after.get("preview")
    assert after["firstIteration"] == "1", "after the reload the chart lacks the points trained before it"

    # the end: every iteration, held-out evaluations before, at 6 and after, two stage changes, a changed chart
    end = editor.wait_for(f"() => {{ const d = ({CHART})(); return d && d.status === 'finished' && d }}", timeout=600)
    editor.page.wait_for_timeout(300)
    end = chart(editor)
    editor.screenshot("live_3_end")
    close_up(editor, "live_3_end_chart")
    assert int(end["points"]) == int(end["drawnPoints"]) == settings["iterations"]
    assert int(end["evals"]) == int(end["drawnEvals"]) == 3
    assert int(end["drawnStages"]) == 2 and end["stage"] == "3"  # three stages: the last segment is the base's
    assert canvas_image(editor) != mid_canvas
    legend = editor.evaluate("() => document.querySelector('.shortft-live .shortft-legend').innerText")
    assert "tiny_alignment" in legend and "held-out at iteration 12" in legend

    # the whole graph ran: both samplers, both scores, the previews
    server = env.server
    wait_until(lambda: not any(server.get("/queue").values()), 600, what="the graph to finish")
    history = server.get("/history")
    entry = next(h for h in history.values()
                 if any(n["inputs"].get("run_name") == run for n in h["prompt"][2].values()))
    assert entry["status"]["status_str"] == "success", entry["status"]
    graph = entry["prompt"][2]
    for node_id, node in graph.items():
        if node["class_type"] == "ShortFT_ScoreImages":
            assert "tiny_alignment: mean" in entry["outputs"][node_id]["text"][0]
        if node["class_type"] == "PreviewImage":
            assert entry["outputs"][node_id]["images"]

    # another browser opening the workflow sees the finished run; with /shortft/live blocked it sees nothing,
    # so what the reload showed came from the server's live state
    workflow = json.loads(TINY.read_text())
    train = next(n for n in workflow["nodes"] if n["id"] == TRAIN)
    train["widgets_values_named"]["run_name"] = run
    train["widgets_values"][list(train["widgets_values_named"]).index("run_name")] = run
    for blocked in (False, True):
        other = Editor(env.browser, server.url, env.artifacts)
        if blocked:
            other.page.route("**/shortft/live*", lambda route: route.abort())
        other.open()
        other.load(workflow, "tiny_alignment.json")
        other.page.wait_for_timeout(800)
        seen = chart(other)
        other.close()
        if blocked:
            assert seen["status"] == "idle" and seen["points"] == "0", seen
        else:
            assert seen["status"] == "finished" and int(seen["points"]) == settings["iterations"], seen


# ----- errors ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, value, message", [
    ("iterations", -5, "iterations (--iterations) must be >= 1; got -5"),
    ("lr", math.nan, "lr"),  # JSON has no NaN: the prompt carries null, which the server cannot read as a FLOAT
], ids=["iterations=-5", "lr=NaN"])
def test_a_bad_widget_value_shows_the_node_error(editor, name, value, message):
    editor.load(TINY)
    editor.set_widget(TRAIN, name, value)
    editor.focus_node(TRAIN)
    editor.page.locator("[data-testid=queue-button]").click()
    overlay = wait_until(editor.error_overlay, 30, what="the error overlay")
    assert "invalid input" in overlay.lower() or "error" in overlay.lower(), overlay
    errors = editor.evaluate(f"() => app.extensionManager.lastNodeErrors?.['{TRAIN}']?.errors ?? []")
    assert any(message in (e["details"] + " " + e["message"]) for e in errors), errors
    assert editor.evaluate(f"() => !!app.rootGraph.getNodeById({TRAIN}).has_errors")
    editor.screenshot(f"error_{name}_overlay")
    editor.page.locator("[data-testid=error-overlay-see-errors]").first.click()
    panel = editor.page.get_by_text(f"ShortFTTrain - {name}").first
    panel.wait_for(timeout=10_000)
    editor.screenshot(f"error_{name}_details")
    assert chart(editor)["status"] == "idle"  # the node never started
