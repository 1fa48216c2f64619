"""The README's Python API example runs as written (shortened: fewer iterations and held-out prompts, a temporary
run folder), and the set it saves, applied to a fresh base, reproduces the held-out reward training measured."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_api_example_runs(tmp_path, monkeypatch):
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- python-api -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its <!-- python-api --> block"
    code = match.group(1)
    for long, short in (("iterations=320", "iterations=2"), ("eval_count=32", "eval_count=4")):
        assert long in code, long
        code = code.replace(long, short)
    monkeypatch.chdir(tmp_path)  # the example writes runs/api relative to where it runs
    ns: dict = {}
    exec(compile(code, str(README), "exec"), ns)  # noqa: S102 - the project's own README
    result = ns["result"]
    assert result.status == "finished" and (tmp_path / "runs" / "api" / "lora" / "set.json").is_file()
    assert len(result.history.reward) == 2 and ns["images"].shape == (1, 3, 32, 32)
    assert result.lora.guidance == 1.0  # the tiny preset tunes unguided; sample_aligned used that scale

    from shortft_core.lora_set import sample_aligned
    from shortft_core.loading import load_model
    from shortft_core.tiny_world import held_out_prompts, load_tiny_rewards

    prompts = held_out_prompts(4, seed=1)  # the session's held-out set and evaluation seed
    images = sample_aligned(load_model("tiny"), prompts, lora_set=result.lora, seed=12345)
    again = float(load_tiny_rewards()[0](images, prompts).mean())
    assert again == pytest.approx(result.after["tiny_alignment"], abs=2e-3)  # the files are fp16
