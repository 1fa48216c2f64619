"""Tier 2, headless: the shipped tiny workflow queued the ways a pipeline engineer queues it — the README's Python
client (API twin, websocket progress, outputs fetched) and comfy-cli's ``comfy run --workflow <UI file> --wait``."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfyui

ROOT = Path(__file__).resolve().parents[1]
UI = ROOT / "workflows" / "tiny_alignment.json"
API = ROOT / "workflows" / "api" / "tiny_alignment.json"
TRAIN = "ShortFT_Train"


def widget_names(comfy_server, node_type: str) -> list[str]:
    """The node's widget inputs in the order a UI workflow's ``widgets_values`` stores them (sockets excluded)."""
    info = comfy_server.object_info(node_type)[node_type]
    order = info.get("input_order") or {s: list(v) for s, v in info["input"].items()}
    names = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = info["input"][section][name]
            kind = spec[0]
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                names.append(name)
    return names


def test_readme_client_queues_the_api_twin_follows_progress_and_fetches_outputs(comfy_server, tmp_path,
                                                                                 monkeypatch, capsys):
    pytest.importorskip("websocket", reason="the README client needs websocket-client (pip install websocket-client)")
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- comfy-client -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its <!-- comfy-client --> block"
    code = match.group(1)
    for old, new in (('SERVER = "127.0.0.1:8188"', f'SERVER = "127.0.0.1:{comfy_server.port}"'),
                     ('"workflows/api/tiny_alignment.json"', repr(str(API))),
                     ('["iterations"] = 320', '["iterations"] = 3; prompt[train]["inputs"]["run_name"] = "tier2_client"')):
        assert old in code, old
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)  # the example writes the fetched images where it runs
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the project's own README
    printed = capsys.readouterr().out
    assert [int(m) for m in re.findall(r"^iteration (\d+)/3 ", printed, re.M)] == [1, 2, 3]
    assert "tiny_alignment: mean" in printed  # ScoreImages' text output
    assert list(tmp_path.glob("*.png")), "no image fetched from /view"
    assert (comfy_server.models / "loras" / "shortft" / "tier2_client" / "set.json").is_file()


def test_comfy_cli_runs_the_shipped_ui_workflow(comfy_server, tmp_path):
    comfy = shutil.which("comfy") or str(Path(sys.executable).with_name("comfy"))
    if not Path(comfy).is_file():
        pytest.skip("comfy-cli is not installed in this interpreter (pip install comfy-cli)")
    workflow = json.loads(UI.read_text(encoding="utf-8"))
    names = widget_names(comfy_server, TRAIN)
    trains = [n for n in workflow["nodes"] if n["type"] == TRAIN]
    assert trains, f"{UI.name} has no {TRAIN} node"
    for node in trains:
        node["widgets_values"][names.index("iterations")] = 3
        node["widgets_values"][names.index("run_name")] = "tier2_comfy_cli"
    path = tmp_path / UI.name
    path.write_text(json.dumps(workflow), encoding="utf-8")
    run = subprocess.run([comfy, "--skip-prompt", "run", "--workflow", str(path), "--wait", "--where", "local",
                          "--host", "127.0.0.1", "--port", str(comfy_server.port), "--timeout", "300"],
                         capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert run.returncode == 0, f"comfy run failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert (comfy_server.models / "loras" / "shortft" / "tier2_comfy_cli" / "set.json").is_file()
