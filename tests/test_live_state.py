"""The live state and progress events of the training nodes (nodes/live.py) are valid JSON whatever the numbers: a
diverging run's NaN loss or an infinite reward reaches the browser as null (which the chart skips), not as the
``NaN`` token Python's json writes and JSON.parse rejects. Needs ComfyUI's requirements (aiohttp), as tier 2 does."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import pytest

from comfy_harness import REPO

pytestmark = pytest.mark.comfyui


@pytest.fixture()
def live():
    pytest.importorskip("aiohttp", reason="nodes/live.py serves over aiohttp, one of ComfyUI's requirements")
    spec = importlib.util.spec_from_file_location("shortft_live_under_test", REPO / "nodes" / "live.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_non_finite_numbers_are_sent_and_kept_as_null(live, monkeypatch):
    sent = []

    class Server:
        client_id = "client"

        def send_sync(self, event, data, sid):
            sent.append((event, json.dumps(data, allow_nan=False), sid))

    monkeypatch.setitem(sys.modules, "server", types.SimpleNamespace(PromptServer=types.SimpleNamespace(
        instance=Server())))
    live.begin("7", {"run": "r", "iterations": 3, "best": float("inf")})
    point = {"iteration": 1, "reward": float("nan"), "loss": float("-inf"), "stage": 1, "seconds": 0.5}
    live.append("7", "points", point)
    live.append("7", "evals", {"iteration": 1, "alignment": 0.5, "alignment_std": float("nan")})
    live.update("7", status="running", last_loss=float("nan"))
    live.send({"node": "7", "kind": "step", **point, "nested": [1.0, float("nan"), {"x": float("inf")}]})
    state = json.loads(json.dumps(live.live_state("7"), allow_nan=False))  # raises on NaN / inf
    assert state["points"] == [{"iteration": 1, "reward": None, "loss": None, "stage": 1, "seconds": 0.5}]
    assert state["evals"] == [{"iteration": 1, "alignment": 0.5, "alignment_std": None}]
    assert state["best"] is None and state["last_loss"] is None and state["status"] == "running"
    event, data, sid = sent[0]
    message = json.loads(data)
    assert event == live.PROGRESS_EVENT and sid == "client"
    assert (message["reward"], message["loss"], message["iteration"]) == (None, None, 1)
    assert message["nested"] == [1.0, None, {"x": None}]
    assert point["reward"] != point["reward"]  # the caller's dict is not modified
