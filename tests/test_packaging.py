"""Registry packaging: ``comfy node validate`` is clean, ``comfy node pack`` builds an archive that holds the pack
(library, tiny-world weights and configs, nodes, web extension, workflows) and not the tests, benchmarks, CI or
local folders, and (tier 2) that archive unpacked into a fresh ComfyUI's custom_nodes loads, lists its nodes,
serves its web files, routes and workflows, and trains the tiny world.

comfy-cli packs the git-tracked files of the folder it runs in. The tests run it on a copy of this checkout's files
as they would be committed (tracked ones plus untracked ones git does not ignore), in a fresh git repository, so
they neither write into the checkout nor depend on what is committed yet. They need comfy-cli with its
dependencies (``pip install comfy-cli``) and git, and skip naming what is missing; they carry the ``comfyui``
marker because CI installs comfy-cli with tier 2's ComfyUI requirements (.ci/run).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

import comfy_harness

ROOT = Path(__file__).resolve().parents[1]
NODES = ["ShortFT_LoadShortcutModel", "ShortFT_RewardModel", "ShortFT_Train", "ShortFT_Sample",
         "ShortFT_ScoreImages", "ShortFT_LoadLoRASet", "ShortFT_ApplyAlignedLoRA", "ShortFT_LoadTinyWorld"]


def comfy_cli_skip_reason() -> str | None:
    if shutil.which("git") is None:
        return "git not found: comfy node pack lists the files to pack with git"
    out = subprocess.run([sys.executable, "-m", "comfy_cli", "--help"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "DO_NOT_TRACK": "1"}, check=False)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        return f"comfy-cli does not run in {sys.executable} ({last}); install it with its dependencies: pip install comfy-cli"
    return None


def checkout_files() -> list[str]:
    """This checkout's files as they would be committed: tracked, plus untracked ones git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True)
    return sorted({f for f in out.stdout.decode().split("\0") if f and (ROOT / f).is_file()})


def comfy(args: list[str], cwd: Path, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DO_NOT_TRACK": "1", "COMFY_NO_TELEMETRY": "1", "HOME": str(home), "NO_COLOR": "1",
           "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "comfy_cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    reason = comfy_cli_skip_reason()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("pack")
    src, home = base / "src", base / "home"
    home.mkdir()
    for name in checkout_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    subprocess.run(["git", "init", "-q"], cwd=src, check=True)
    subprocess.run(["git", "add", "-A"], cwd=src, check=True)
    validate = comfy(["node", "validate"], src, home)
    pack = comfy(["node", "pack"], src, home)
    archive = src / "node.zip"
    names = zipfile.ZipFile(archive).namelist() if archive.is_file() else []
    return SimpleNamespace(src=src, base=base, validate=validate, pack=pack, archive=archive, names=names)


def test_tool_comfy_is_complete():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    tool = data["tool"]["comfy"]
    assert tool["PublisherId"] and tool["DisplayName"]
    assert isinstance(tool["Icon"], str) and isinstance(tool["includes"], list)
    assert tool["web"] == "web" and (ROOT / "web" / "shortft.js").is_file()
    assert tool["requires-comfyui"].startswith(">=0.33")
    assert data["project"]["name"] == "comfyui-shortft" and data["project"]["version"].count(".") == 2
    assert "browser" in " ".join(data["tool"]["pytest"]["ini_options"]["markers"])


@pytest.mark.comfyui
def test_comfy_node_validate_is_clean(packed):
    out = packed.validate.stdout + packed.validate.stderr
    assert packed.validate.returncode == 0, out
    assert "All validation checks passed" in out, out
    assert "Warning" not in out and "Security warnings" not in out, out


@pytest.mark.comfyui
def test_pack_archive_holds_the_pack_and_nothing_else(packed):
    assert packed.pack.returncode == 0 and packed.archive.is_file(), packed.pack.stdout + packed.pack.stderr
    names = set(packed.names)
    tracked = set(checkout_files())
    weights = {f for f in tracked if f.startswith("shortft_core/tiny_world/weights/")}
    configs = {f for f in tracked if f.startswith("shortft_core/configs/")}
    assert weights and weights <= names, f"tiny-world weights missing: {sorted(weights - names)}"
    assert configs and configs <= names, f"model configs missing: {sorted(configs - names)}"
    for f in tracked:
        if f.startswith(("nodes/", "web/", "workflows/", "shortft_core/")) and f.endswith((".py", ".js", ".json")):
            assert f in names, f"{f} is not in the archive"
    for f in ("__init__.py", "pyproject.toml", "requirements.txt", "README.md", "web/shortft.js",
              "web/shortft/chart.js", "workflows/tiny_alignment.json", "workflows/api/tiny_alignment.json"):
        assert f in names, f"{f} is not in the archive"
    leaked = sorted(n for n in names if n.split("/")[0] in ("tests", "bench", ".ci", ".venv", "runs", ".git")
                    or "__pycache__" in n or ".egg-info" in n or n.endswith(".pyc"))
    assert leaked == [], f"the archive holds files users do not need: {leaked[:10]}"


@pytest.mark.comfyui
def test_unpacked_archive_loads_in_a_fresh_comfyui_and_trains(packed):
    from comfy_harness import PACK_NAME, comfyui_or_skip, execution_error

    comfy = comfyui_or_skip()
    pack = packed.base / "unpacked" / PACK_NAME
    zipfile.ZipFile(packed.archive).extractall(pack)
    with comfy_harness.ComfyServer(comfy, pack=pack) as server:
        linked = server.base / "custom_nodes" / PACK_NAME
        assert linked.resolve() == pack.resolve()
        times = server.import_times()
        ours = [p for p in times if p.endswith(PACK_NAME)]
        assert ours and all(times[p] for p in ours), f"import failed; log tail:\n{server.log_tail()}"
        info = server.object_info()
        assert [n for n in NODES if n not in info] == []
        extensions = server.get("/extensions")
        assert f"/extensions/{PACK_NAME}/shortft.js" in extensions
        assert f"/extensions/{PACK_NAME}/shortft/chart.js" in extensions
        assert server.get("/api/shortft/live") == {"nodes": {}}
        templates = server.get("/workflow_templates")
        assert sorted(templates[PACK_NAME]) == sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))
        graph = {  # the tiny world from the archive's own weights: one iteration
            "0": {"class_type": "ShortFT_LoadTinyWorld", "inputs": {"dtype": "fp32"}},
            "1": {"class_type": "ShortFT_LoadShortcutModel",
                  "inputs": {"model": ["0", 0], "clip": ["0", 1], "vae": ["0", 2], "shortcut": "tiny",
                             "preset": "auto"}},
            "2": {"class_type": "ShortFT_RewardModel", "inputs": {"reward": "tiny_alignment", "spec": "",
                                                                  "device": "cpu"}},
            "3": {"class_type": "ShortFT_Train", "inputs": {
                "model": ["1", 0], "reward": ["2", 0], "prompt_source": "tiny-world captions", "prompts": "",
                "method": "shortft", "iterations": 1, "time_budget_s": 0.0, "batch_size": 1, "lr": 0.0005,
                "rank": 2, "guidance": 1.0, "seed": 0, "stage_fractions": "", "checkpoint_every": 100,
                "run_name": "from_archive", "resume": True, "prompt_file": "",
                "eval_prompts": "a yellow circle left of a blue circle on a white background", "eval_every": 0,
                "preview_every": 0, "preview_chain": "shortcut"}},
        }
        _, events = server.run(graph, timeout=600)
        assert execution_error(events) is None, execution_error(events)
        live = server.get("/api/shortft/live")["nodes"]["3"]
        assert live["status"] == "finished" and [p["iteration"] for p in live["points"]] == [1]
        assert (server.models / "loras" / "shortft" / "from_archive" / "merged.safetensors").is_file()
