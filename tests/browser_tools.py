"""Browser tier helpers: ComfyUI's real frontend in headless Chromium (pip ``playwright`` driving Debian's
``chromium``; never ``playwright install``), against a real ComfyUI server started by ``comfy_harness``.

``browser_skip_reason`` says what is missing (playwright, Chromium), ``placeholder_models`` writes the files the
shipped workflows name into a server's models folder, and :class:`Editor` is one page of the graph editor: it waits
for the app, loads workflows, converts them to the API format with the frontend's own ``app.graphToPrompt``, and
collects console messages, page errors and what the error overlay shows. ``tests/make_workflows.py`` uses the same
helpers to build the workflow files and their API twins.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
API_TWINS = WORKFLOWS / "api"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1600, "height": 1000}
READY = ("() => !!(window.app && app.canvas && app.rootGraph && window.LiteGraph && LiteGraph.registered_node_types"
         " && Object.keys(LiteGraph.registered_node_types).length > 100)")

# Files the shipped workflows name in combo widgets (folder under models/, name as ComfyUI lists it). A server on
# which they exist (as placeholders) loads every workflow without a missing-model error; a workflow naming a file
# not listed here fails the browser tests with that file's name.
WORKFLOW_FILES = [
    ("checkpoints", "v1-5-pruned-emaonly.safetensors"),
    ("loras", "Hyper-SD15-4steps-lora.safetensors"),
    ("loras", "shortft/sd15_hps_v2/set.json"),  # the set sd15_hyper_hps_v2.json trains (a folder holding set.json)
]

# Console messages every fresh offline server gives at start-up (no user.css, no user data folders yet, the
# default graph's missing models and their blocked metadata look-ups, the frontend's deprecation notices).
STARTUP_NOISE = [
    re.compile(r"Failed to load resource: the server responded with a status of 404 \(Not Found\)"),
    re.compile(r"ComfyApp graph accessed before initialization"),
    re.compile(r"violates the following Content Security Policy directive"),
    re.compile(r"Fetch API cannot load https://huggingface\.co/"),
    re.compile(r"^\[ComfyUI\] The legacy queue/history menu is deprecated"),
    re.compile(r"^\[MaskEditor\] ComfyApp\.open_maskeditor is deprecated"),
]


def find_chromium() -> str | None:
    """``$SHORTFT_CHROMIUM``, else ``chromium`` on the PATH, else /usr/bin/chromium (Debian's package)."""
    for candidate in (os.environ.get("SHORTFT_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def browser_skip_reason() -> str | None:
    """Why the browser tier cannot run here (naming what is missing and how to get it), or None."""
    try:
        from playwright.sync_api import sync_playwright  # noqa: F401  (needs greenlet too)
    except ImportError as e:
        return f"pip playwright is not importable ({e}); install it with: pip install 'playwright>=1.65,<2'"
    if find_chromium() is None:
        return ("no Chromium (looked at $SHORTFT_CHROMIUM, chromium on the PATH, /usr/bin/chromium); on Debian: "
                "apt-get install -y chromium")
    return None


def launch(playwright) -> Any:
    """Headless Chromium (Debian's build; playwright's own download is never used)."""
    return playwright.chromium.launch(executable_path=find_chromium(), args=CHROMIUM_ARGS)


def placeholder_models(models: Path) -> list[Path]:
    """Empty files under ``models`` (a ComfyUI server's models folder) named as the shipped workflows name them, so
    their combos hold values in the lists. Loading checks names only; queueing such a workflow fails in the nodes
    that read the files, naming them."""
    made = []
    for folder, name in WORKFLOW_FILES:
        path = models / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_text("{}\n" if path.name == "set.json" else "")
            made.append(path)
    return made


def artifacts_dir() -> Path:
    """Where the browser tier keeps its screenshots: ``$SHORTFT_ARTIFACTS/browser`` when set, else
    ``<temp dir>/shortft-artifacts/browser`` (kept after the run, whatever pytest does with its own tmp folders)."""
    root = Path(os.environ.get("SHORTFT_ARTIFACTS") or Path(tempfile.gettempdir()) / "shortft-artifacts")
    out = root / "browser"
    out.mkdir(parents=True, exist_ok=True)
    return out


def ui_workflows() -> list[Path]:
    """The shipped UI-format workflows (what the template browser lists)."""
    return sorted(WORKFLOWS.glob("*.json"))


def twin_path(ui_file: Path) -> Path:
    return API_TWINS / ui_file.name


class Editor:
    """One tab of ComfyUI's graph editor in headless Chromium.

    The first load of a new server would open the full-screen template browser: GET /api/settings is answered with
    ``Comfy.TutorialCompleted: true`` (and the minimap hidden) added to what the server says. Console messages and page errors are kept in
    ``messages`` as (type, text, url); :meth:`mark` and :meth:`problems` give the ones since a point in time that
    are not start-up noise.
    """

    def __init__(self, browser, url: str, artifacts: Path | None = None, viewport: dict | None = None) -> None:
        self.url = url.rstrip("/")
        self.artifacts = artifacts
        self.context = browser.new_context(viewport=viewport or VIEWPORT)
        self.page = self.context.new_page()
        self.messages: list[tuple[str, str, str]] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.messages.append(("pageerror", str(e), "")))
        self.page.route("**/api/settings", self._settings)

    # ----- life cycle ---------------------------------------------------------------------------------------------
    def _console(self, message) -> None:
        location = message.location or {}
        self.messages.append((message.type, message.text, location.get("url", "")))

    @staticmethod
    def _settings(route) -> None:
        if route.request.method != "GET":
            route.continue_()
            return
        response = route.fetch()
        data = response.json() if response.ok else {}
        data["Comfy.TutorialCompleted"] = True
        data["Comfy.Minimap.Visible"] = False  # it would cover part of every screenshot
        route.fulfill(response=response, json=data)

    def open(self, timeout: float = 90) -> Editor:
        self.page.goto(self.url + "/")
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 90) -> None:
        self.page.wait_for_function(READY, timeout=timeout * 1000)
        self.page.wait_for_timeout(500)  # extensions' setup() runs right after the app object exists

    def reload(self, timeout: float = 90) -> None:
        self.page.reload()
        self.wait_ready(timeout)

    def close(self) -> None:
        self.context.close()

    # ----- messages -----------------------------------------------------------------------------------------------
    def mark(self) -> int:
        return len(self.messages)

    def problems(self, since: int = 0, kinds: tuple[str, ...] = ("error", "warning", "pageerror")) -> list[str]:
        """Errors, warnings and page errors since ``since`` that are not start-up noise, as 'type: text (url)'."""
        out = []
        for kind, text, url in self.messages[since:]:
            if kind in kinds and not any(p.search(text) for p in STARTUP_NOISE):
                out.append(f"{kind}: {text}" + (f" ({url})" if url else ""))
        return out

    # ----- graph --------------------------------------------------------------------------------------------------
    def evaluate(self, script: str, arg: Any = None) -> Any:
        return self.page.evaluate(script, arg)

    def load(self, workflow: dict | Path, name: str | None = None) -> None:
        """Load a UI-format workflow as a drop or the template browser would (``app.loadGraphData``)."""
        if isinstance(workflow, Path):
            name = name or workflow.name
            workflow = json.loads(workflow.read_text(encoding="utf-8"))
        self.evaluate("async ([wf, name]) => { await app.loadGraphData(wf, true, true, name); }", [workflow, name])
        self.page.wait_for_timeout(300)

    def graph_to_api(self) -> dict:
        """The API-format prompt of the loaded graph, by the frontend's own conversion."""
        return self.evaluate("async () => (await app.graphToPrompt()).output")

    def serialize(self) -> dict:
        """The loaded graph in the UI format (what Save writes)."""
        return self.evaluate("() => app.rootGraph.serialize()")

    def set_widget(self, node_id: int | str, name: str, value: Any) -> None:
        """Set a widget's value through the graph's API (as an extension would; no range check applies)."""
        ok = self.evaluate("""([id, name, value]) => {
            const node = app.rootGraph.getNodeById(id);
            const widget = node?.widgets?.find((w) => w.name === name);
            if (!widget) return false;
            widget.value = value;
            app.rootGraph.setDirtyCanvas(true, true);
            // record the edit as the editor does after a user's change (the open workflow is kept across reloads)
            app.extensionManager?.workflow?.activeWorkflow?.changeTracker?.captureCanvasState?.();
            return true;
        }""", [node_id, name, value])
        if not ok:
            raise KeyError(f"node {node_id} has no widget {name!r}")
        self.page.wait_for_timeout(100)

    def nodes_of_type(self, node_type: str) -> list[int]:
        return self.evaluate("(t) => app.rootGraph.nodes.filter((n) => n.type === t).map((n) => n.id)", node_type)

    def focus_node(self, node_id: int | str, scale: float | None = None) -> None:
        """Centre the canvas on a node at ``scale`` (default: the whole node in view, at most 1:1)."""
        self.evaluate("""([id, scale]) => {
            const node = app.rootGraph.getNodeById(id);
            const ds = app.canvas.ds;
            const title = LiteGraph.NODE_TITLE_HEIGHT;
            scale ??= Math.min(1, 0.9 * (app.canvas.canvas.clientHeight - 60) / (node.size[1] + title));
            ds.scale = scale;
            const [w, h] = [app.canvas.canvas.clientWidth, app.canvas.canvas.clientHeight];
            ds.offset[0] = w / (2 * scale) - (node.pos[0] + node.size[0] / 2);
            ds.offset[1] = h / (2 * scale) - (node.pos[1] + node.size[1] / 2);
            app.canvas.setDirty(true, true);
        }""", [node_id, scale])
        self.page.wait_for_timeout(400)

    def focus_widget(self, node_id: int | str, widget: str, scale: float = 1.25) -> None:
        """Centre the canvas on one widget of a node at ``scale`` (close-ups of the chart)."""
        self.evaluate("""([id, name, scale]) => {
            const node = app.rootGraph.getNodeById(id);
            const w = node.widgets.find((w) => w.name === name);
            const h = w.computedHeight ?? w.computeLayoutSize?.(node)?.minHeight ?? 200;
            const ds = app.canvas.ds;
            ds.scale = scale;
            const [cw, ch] = [app.canvas.canvas.clientWidth, app.canvas.canvas.clientHeight];
            ds.offset[0] = cw / (2 * scale) - (node.pos[0] + node.size[0] / 2);
            ds.offset[1] = ch / (2 * scale) - (node.pos[1] + (w.y ?? 0) + h / 2);
            app.canvas.setDirty(true, true);
        }""", [node_id, widget, scale])
        self.page.wait_for_timeout(400)

    def fit_view(self, zoom: float = 0.9, nodes: list[int] | None = None) -> None:
        """Show the whole graph (or the nodes ``nodes``), titles included, below the editor's tab bar."""
        self.evaluate("""([zoom, ids]) => {
            const title = LiteGraph.NODE_TITLE_HEIGHT;
            let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
            for (const n of app.rootGraph.nodes.filter((n) => !ids || ids.map(String).includes(String(n.id)))) {
                x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - title);
                x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
            }
            const ds = app.canvas.ds;
            ds.fitToBounds([x0, y0, x1 - x0, y1 - y0], {zoom});
            ds.offset[0] += 30 / ds.scale;  // the side bar and the tab bar cover the canvas' left and top edges
            ds.offset[1] += 20 / ds.scale;
            app.canvas.setDirty(true, true);
        }""", [zoom, nodes])
        self.page.wait_for_timeout(400)

    # ----- what the user sees -------------------------------------------------------------------------------------
    def error_overlay(self) -> str | None:
        """The text of the error overlay (missing nodes or models, node errors), or None when it is not shown."""
        overlay = self.page.locator("[data-testid=error-overlay]")
        if overlay.count() == 0 or not overlay.first.is_visible():
            return None
        return overlay.first.inner_text()

    def dialogs(self) -> list[str]:
        """Texts of the open dialogs (e.g. 'Loading aborted', execution errors)."""
        return [d.inner_text() for d in self.page.locator("[role=dialog]").all() if d.is_visible()]

    def screenshot(self, name: str) -> Path | None:
        if self.artifacts is None:
            return None
        path = self.artifacts / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    def screenshot_of(self, selector: str, name: str) -> Path | None:
        """A close-up of the first element matching ``selector``."""
        if self.artifacts is None:
            return None
        path = self.artifacts / f"{name}.png"
        self.page.locator(selector).first.screenshot(path=str(path))
        return path

    def wait_for(self, script: str, arg: Any = None, timeout: float = 60) -> Any:
        """Poll ``script`` (a JS function of ``arg``) until it returns something truthy; returns that."""
        handle = self.page.wait_for_function(script, arg=arg, timeout=timeout * 1000, polling=200)
        return handle.json_value()


def wait_until(predicate, timeout: float, interval: float = 0.2, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:.0f} s")
        time.sleep(interval)
