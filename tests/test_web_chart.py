"""The web extension's chart maths (web/shortft/chart.js) under Node: stage boundaries, smoothing, which held-out
reward goes on the reward axis, and what a draw puts on the canvas. The browser tier (test_browser.py) checks the
widget in ComfyUI's real frontend; this runs wherever Node.js is installed."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NODE = shutil.which("node") or shutil.which("nodejs")

pytestmark = pytest.mark.skipif(NODE is None, reason="Node.js not found (node/nodejs on the PATH): the chart's JS "
                                                     "unit checks need it; apt-get install -y nodejs")

SCRIPT = r"""
import * as chart from "./chart.mjs";
const calls = [];
const ctx = new Proxy({}, {
  get(target, name) {
    if (name in target) return target[name];
    return (...args) => calls.push([name, ...args.filter((a) => typeof a !== "object")]);
  },
  set(target, name, value) { target[name] = value; return true; },
});
const state = JSON.parse(process.argv[2]);
const drawn = chart.drawChart(ctx, 400, 200, state);
const out = {
  stages: chart.stageStarts(state.points),
  smooth: chart.movingAverage([1, 2, 3, 4], 2),
  evalNames: chart.evalNames(state),
  summary: { points: drawn.points.length, evals: drawn.evals, xmax: drawn.xmax, evalName: drawn.evalName,
             rewardRange: drawn.rewardRange },
  arcs: calls.filter((c) => c[0] === "arc").length,
  texts: calls.filter((c) => c[0] === "fillText").map((c) => c[1]),
  lines: calls.filter((c) => c[0] === "lineTo").length,
};
console.log(JSON.stringify(out));
"""


def run_chart(tmp_path: Path, state: dict) -> dict:
    shutil.copy(ROOT / "web" / "shortft" / "chart.js", tmp_path / "chart.mjs")
    (tmp_path / "check.mjs").write_text(SCRIPT)
    out = subprocess.run([NODE, "check.mjs", json.dumps(state)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def run_state(points: int = 8, stages: int = 4) -> dict:
    pts = [{"iteration": i, "reward": 0.5 + 0.01 * i, "loss": -0.5 - 0.01 * i,
            "stage": 1 + (i - 1) * stages // points, "seconds": 0.3 * i} for i in range(1, points + 1)]
    evals = [{"iteration": 0, "seconds": 0.0, "tiny_alignment": 0.79, "tiny_alignment_std": 0.01,
              "tiny_aesthetic": 9.2, "tiny_aesthetic_std": 0.3},
             {"iteration": points, "seconds": 9.0, "tiny_alignment": 0.82, "tiny_alignment_std": 0.02,
              "tiny_aesthetic": 9.1, "tiny_aesthetic_std": 0.3}]
    return {"run": "r", "reward_name": "tiny_alignment", "iterations": 10, "points": pts, "evals": evals}


def test_chart_marks_each_stage_change_and_draws_every_point(tmp_path):
    out = run_chart(tmp_path, run_state())
    assert out["stages"] == [{"iteration": 3, "stage": 2}, {"iteration": 5, "stage": 3}, {"iteration": 7, "stage": 4}]
    assert [t for t in out["texts"] if t.startswith("stage ")] == ["stage 2", "stage 3", "stage 4"]
    assert out["summary"]["points"] == 8 and out["summary"]["xmax"] == 10
    assert out["smooth"] == [1, 1.5, 2.5, 3.5]
    # raw reward, smoothed reward and loss: 7 segments each; one per stage line, per eval error bar (2) and per
    # panel's middle grid line (2)
    assert out["lines"] == 3 * 7 + 3 + 2 + 2


def test_held_out_points_are_the_trained_reward_on_the_reward_axis(tmp_path):
    state = run_state()
    out = run_chart(tmp_path, state)
    assert out["evalNames"] == ["tiny_alignment", "tiny_aesthetic"]
    assert out["summary"]["evalName"] == "tiny_alignment"
    assert [(e["iteration"], e["mean"]) for e in out["summary"]["evals"]] == [(0, 0.79), (8, 0.82)]
    assert out["arcs"] == 2
    lo, hi = out["summary"]["rewardRange"]
    assert lo < 0.51 and hi > 0.84  # the range holds the rewards and the evaluations with their std
    state["reward_name"] = "tiny_aesthetic"  # another trained reward: its evaluations go on the axis instead
    out = run_chart(tmp_path, state)
    assert out["summary"]["evalName"] == "tiny_aesthetic" and out["evalNames"][0] == "tiny_aesthetic"


def test_an_empty_run_draws_the_placeholder_text(tmp_path):
    out = run_chart(tmp_path, {"iterations": 320, "points": [], "evals": []})
    assert out["summary"]["points"] == 0 and out["arcs"] == 0
    assert any("appears here" in t for t in out["texts"])
    out = run_chart(tmp_path, run_state(points=6, stages=1))  # one stage (a baseline): no stage line
    assert out["stages"] == [] and not [t for t in out["texts"] if t.startswith("stage ")]


def test_the_extension_parses_as_an_es_module(tmp_path):
    for name in ("shortft.js", "shortft/chart.js"):
        copy = tmp_path / (name.replace("/", "_") + ".mjs")
        shutil.copy(ROOT / "web" / name, copy)
        out = subprocess.run([NODE, "--check", str(copy)], capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, f"web/{name}: {out.stderr}"
