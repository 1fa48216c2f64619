"""Code run inside ComfyUI's Python world, in a subprocess of the test interpreter: ComfyUI's source on ``sys.path``
(as ``main.py --cpu`` would parse its arguments), this pack imported as the package ``shortft_pack`` without its
server routes, one torch thread. ComfyUI's module globals (model management, folder paths) so stay out of the pytest
process, and a test reads what the script wrote.

A script is a body of Python run after :data:`PREAMBLE`; it finds its own arguments in ``ARGS``, imports the pack's
node modules with ``pack_module("tiny_world")`` and the library as the pack holds it (``from shortft_pack.shortft_core
import ...``: the nodes' own copy, so classes and module state are the ones the nodes see, as in a ComfyUI server).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from comfy_harness import REPO, comfyui_or_skip

PREAMBLE = textwrap.dedent(r'''
    import importlib, importlib.util, sys, types
    comfy_root, repo, *ARGS = sys.argv[1:]
    sys.path.insert(0, comfy_root)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import torch
    torch.set_num_threads(1)

    spec = importlib.util.spec_from_file_location("shortft_pack", repo + "/__init__.py",
                                                  submodule_search_locations=[repo])
    _pack = importlib.util.module_from_spec(spec)
    sys.modules["shortft_pack"] = _pack
    spec.loader.exec_module(_pack)
    _nodes = types.ModuleType("shortft_pack.nodes")
    _nodes.__path__ = [repo + "/nodes"]
    sys.modules["shortft_pack.nodes"] = _nodes

    def pack_module(name):
        """A module of the pack's nodes/ (imported as ComfyUI imports the pack)."""
        return importlib.import_module("shortft_pack.nodes." + name)

    def tiny_train_node(out_dir, **widgets):
        """ShortFTTrain as ComfyUI runs it, with its files (its run, its LoRA set, the preview ComfyUI saves for its
        image) under ``out_dir``: the node, the tiny world's alignment reward, and its widgets for a short tiny run
        (``widgets`` override them)."""
        import folder_paths
        folder_paths.set_output_directory(str(out_dir / "output"))
        folder_paths.set_temp_directory(str(out_dir / "temp"))
        folder_paths.add_model_folder_path("loras", str(out_dir / "loras"), is_default=True)
        with torch.inference_mode():
            reward = pack_module("reward").RewardModel.execute(reward="tiny_alignment", spec="", device="cpu").result[0]
        defaults = dict(prompt_source="tiny-world captions", prompts="", method="shortft", iterations=1,
                        time_budget_s=0.0, batch_size=1, lr=0.005, rank=2, guidance=1.0, seed=0, stage_fractions="",
                        checkpoint_every=1, resume=True, eval_every=0, preview_every=0,
                        eval_prompts="a small red circle on the left on a white background")
        return pack_module("train").ShortFTTrain.PREPARE_CLASS_CLONE(None), reward, {**defaults, **widgets}
''')


def run_in_comfyui(comfy: Path, body: str, script: Path, *args: str, timeout: float = 600) -> str:
    """Run :data:`PREAMBLE` + ``body`` (written to ``script``) with ``args``; returns its stdout, or fails the test
    with the end of its output."""
    import pytest

    script.write_text(PREAMBLE + "\n" + textwrap.dedent(body))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONDONTWRITEBYTECODE": "1"}
    r = subprocess.run([sys.executable, str(script), str(comfy), str(REPO), *map(str, args)], check=False,
                       capture_output=True, text=True, timeout=timeout, cwd=comfy, env=env)
    if r.returncode != 0:
        pytest.fail(f"the ComfyUI-side script {script.name} failed (exit status {r.returncode}):\n{r.stdout[-3000:]}\n"
                    f"{r.stderr[-4000:]}")
    return r.stdout


def script_result(out: str) -> dict:
    """The JSON object a script printed on its ``RESULT`` line (also printed indented, for the test's log)."""
    import pytest

    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        pytest.fail(f"the ComfyUI-side script printed no RESULT line:\n{out[-3000:]}")
    res = json.loads(line[len("RESULT "):])
    print(json.dumps(res, indent=1))
    return res


def script_in_comfyui(tmp_path_factory, name: str, body: str, timeout: float = 900) -> dict:
    """Run ``body`` in ComfyUI's Python world (skipped, saying so, without a ComfyUI checkout) in a folder of its own
    and return what it printed on its ``RESULT`` line: the body of a module fixture of a tier-2 test."""
    comfy = comfyui_or_skip()
    tmp = tmp_path_factory.mktemp(name)
    return script_result(run_in_comfyui(comfy, body, tmp / f"{name}_side.py", timeout=timeout))
