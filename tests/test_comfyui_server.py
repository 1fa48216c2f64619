"""Tier 2: a real ComfyUI server starts with this pack linked into its custom_nodes and imports it cleanly."""

import pytest

from comfy_harness import PACK_NAME, find_comfyui, missing_requirements

pytestmark = pytest.mark.comfyui


def test_server_imports_the_pack(comfy_server):
    """ComfyUI's "Import times for custom nodes" lists the pack as imported, and nothing logs IMPORT FAILED for
    it (a broken entry point or node module would)."""
    log = comfy_server.log_text()
    times = comfy_server.import_times()
    ours = [path for path in times if path.endswith(PACK_NAME)]
    assert ours, f"{PACK_NAME} missing from the import times {times}; log tail:\n{comfy_server.log_tail()}"
    assert all(times[p] for p in ours), f"{PACK_NAME} failed to import; log tail:\n{comfy_server.log_tail()}"
    assert not [line for line in log.splitlines() if "IMPORT FAILED" in line and PACK_NAME in line]
    assert f"Cannot import {comfy_server.base}" not in log


def test_object_info_answers(comfy_server):
    info = comfy_server.object_info()
    assert {"CheckpointLoaderSimple", "KSampler", "LoraLoaderModelOnly"} <= set(info)
    assert info["KSampler"]["output"] == ["LATENT"]


def test_server_writes_nothing_into_the_checkout(comfy_server):
    """Everything the server writes (user, temp, output, database, byte code) lands in its base directory."""
    comfy_server.object_info()  # the server has answered requests, not just started
    assert comfy_server.tree_changes() == []
    assert (comfy_server.base / "user").is_dir()


def test_find_comfyui_names_every_place_looked(monkeypatch, tmp_path):
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "nowhere"))
    path, reason = find_comfyui()
    assert path is None and str(tmp_path / "nowhere") in reason and "COMFYUI_PATH" in reason


def test_missing_requirements_reads_versions(tmp_path):
    (tmp_path / "requirements.txt").write_text(
        "# comment\npytest>=1\nno-such-package-shortft==1.0\npytest<1\n#non essential dependencies:\n"
        "another-missing-package-shortft\n")
    missing = missing_requirements(tmp_path)
    assert missing[0] == "no-such-package-shortft==1.0"
    assert missing[1].startswith("pytest<1 (found ")
    assert len(missing) == 2  # the optional one below "#non essential" may be absent
