"""The README's Python API example runs as written (shortened: fewer iterations and held-out prompts, a temporary
run folder), and the set it saves reproduces the trainer's own pictures when applied to a fresh base."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_api_example_runs(tmp_path, monkeypatch):
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- python-api -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its <!-- python-api --> block"
    code = match.group(1)
    for long, short in (("iterations=320", "iterations=2"), ("eval_prompts=32", "eval_prompts=4")):
        assert long in code, long
        code = code.replace(long, short)
    monkeypatch.chdir(tmp_path)  # the example writes runs/api relative to where it runs
    ns: dict = {}
    exec(compile(code, str(README), "exec"), ns)  # noqa: S102 - the project's own README
    assert (tmp_path / "runs" / "api" / "lora" / "set.json").is_file()
    assert len(ns["history"].reward) == 2 and ns["images"].shape == (4, 3, 32, 32)
    assert ns["cfg"].shortcut_guidance == ns["preset"].guidance  # the shipped shortcut's own CFG
    torch.testing.assert_close(ns["again"], ns["images"], atol=3e-3, rtol=0)  # the files are fp16
