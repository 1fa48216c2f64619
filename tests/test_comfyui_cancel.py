"""Tier 2: ComfyUI's cancel met outside ShortFTTrain's training loop, in a ComfyUI subprocess on the tiny world.

The loop turns a cancel into a checkpoint and a clean stop. Before the loop (prompts encoded, the run set up) and
after it (the before/after grid sampled once the set is saved) the cancel reaches ShortFTTrain from the MODEL's own
layers: it ends the node as ComfyUI's cancel (not as an error), leaves the caller's MODEL as it was, and queueing the
graph again finishes the run with the set of a run never cancelled. Prompts encoded before training (on a GPU)
show their progress as a phase of the node and stop on a cancel. A finished run queued again is returned as it is,
without preparing the MODEL for training.
"""

from __future__ import annotations

import pytest

from comfy_harness import comfyui_or_skip
from comfy_process import run_in_comfyui, script_result

pytestmark = pytest.mark.comfyui

SCRIPT = r'''
import json
from pathlib import Path

import comfy.model_management as mm
import comfy.utils
from safetensors.torch import load_file

from shortft_pack.shortft_core import StopRequested

tiny, model_node, train = (pack_module(n) for n in ("tiny_world", "model", "train"))
live = pack_module("live")
out_dir = Path(ARGS[0])
res = {}

with torch.inference_mode():
    model, clip, vae = tiny.load_tiny_world()
    loaded = model_node.LoadShortcutModel.execute(model, clip, vae, shortcut="tiny", preset="auto").result[0]
node, reward, widgets = tiny_train_node(out_dir, iterations=2, eval_prompts="")
before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}


def queue(run_name):
    """ShortFTTrain as ComfyUI runs it: what ended it (None: it returned), the run file's status, the live status."""
    try:
        with torch.inference_mode():
            node.execute(loaded, reward, run_name=run_name, **widgets)
        ended = None
    except BaseException as e:  # ComfyUI's interrupt is no Exception
        ended = f"{type(e).__module__}.{type(e).__name__}"
    finally:
        mm.interrupt_current_processing(False)
    run_file = out_dir / "output" / "shortft" / run_name / "run.json"
    status = json.loads(run_file.read_text())["status"] if run_file.is_file() else None
    return ended, status, live.live_state("None").get("status")


def caller_kept():
    state = model.model.diffusion_model.state_dict()
    return state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in before)


# cancelled before the loop: the flag is up when the node starts, the first network call meets it
mm.interrupt_current_processing(True)
res["early"] = queue("early")
res["early_kept"] = caller_kept()
res["early_again"] = queue("early")

# cancelled after the loop, while the before/after grid is sampled (the set is saved by then)
on_end = train.ComfyProgress.on_end


def cancel_at_end(self, loop):
    on_end(self, loop)
    mm.interrupt_current_processing(True)


train.ComfyProgress.on_end = cancel_at_end
res["late"] = queue("late")
train.ComfyProgress.on_end = on_end
res["late_kept"] = caller_kept()
res["late_grid_before"] = (out_dir / "output" / "shortft" / "late" / "before_after.png").is_file()
res["late_again"] = queue("late")
res["late_grid"] = (out_dir / "output" / "shortft" / "late" / "before_after.png").is_file()
res["straight"] = queue("straight")
# a finished run queued again (ComfyUI's cache freed) is returned as it is: nothing encoded or placed for it
prepared = []
prepare = type(loaded.model).prepare
type(loaded.model).prepare = lambda self, *a, **k: (prepared.append(1), prepare(self, *a, **k))[1]
res["straight_again"] = queue("straight")
type(loaded.model).prepare = prepare
res["prepared_for_reuse"] = len(prepared)
sets = {name: {f.name: load_file(str(f)) for f in sorted((out_dir / "loras" / "shortft" / name).glob("segment_*"))}
        for name in ("early", "late", "straight")}
res["set_files"] = {name: sorted(s) for name, s in sets.items()}
res["sets_equal"] = {name: sorted(sets[name]) == sorted(sets["straight"]) and all(
    torch.equal(sets[name][f][k], sets["straight"][f][k]) for f in sets["straight"] for k in sets["straight"][f])
    for name in ("early", "late")}

# prompts encoded before training (as on a GPU): progress after each distinct prompt, the phase and the bar shown,
# and ComfyUI's cancel, which its progress hook raises (and clears), stops the encoding as a stop request
seen = []
loaded.model.prepare(["a red circle", "a blue square", "a red circle", ""], progress=lambda d, t: seen.append([d, t]))
res["encoded_progress"] = seen
shown = []


def server_hook(value, total, preview, node_id=None):
    """What ComfyUI's server does on a bar update: send it, and raise its interrupt when one was asked."""
    shown.append([value, total])
    mm.throw_exception_if_processing_interrupted()


comfy.utils.set_progress_bar_global_hook(server_hook)
bar = train.ComfyProgress("encode", "encode", 2)
bar.encoding(1, 3)
res["encoding_phase"] = live.live_state("encode")["phase"]
mm.interrupt_current_processing(True)
try:
    bar.encoding(3, 3)
    res["encoding_cancel"] = None
except StopRequested:
    res["encoding_cancel"] = "stop"
res["encoding_bar"] = shown
res["flag_after"] = mm.processing_interrupted()
comfy.utils.set_progress_bar_global_hook(None)
print("RESULT " + json.dumps(res))
'''


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    comfy = comfyui_or_skip()
    tmp = tmp_path_factory.mktemp("cancel")
    return script_result(run_in_comfyui(comfy, SCRIPT, tmp / "cancel_side.py", tmp / "out"))


INTERRUPT = "comfy.model_management.InterruptProcessingException"


def test_a_cancel_before_the_loop_is_comfyuis_cancel_and_the_run_finishes_when_queued_again(measured):
    ended, status, shown = measured["early"]
    assert ended == INTERRUPT, ended  # not an error ComfyUI would report with a traceback
    assert status != "finished" and shown == "stopped"
    assert measured["early_kept"]
    assert measured["early_again"] == [None, "finished", "finished"]


def test_a_cancel_while_the_grid_is_drawn_keeps_the_set_and_the_run_finishes_when_queued_again(measured):
    ended, status, shown = measured["late"]
    assert ended == INTERRUPT, ended
    assert status != "finished" and shown == "stopped" and not measured["late_grid_before"]
    assert measured["late_kept"]
    assert measured["late_again"] == [None, "finished", "finished"] and measured["late_grid"]


def test_queued_again_a_cancelled_run_ends_with_the_set_of_a_run_never_cancelled(measured):
    assert measured["straight"] == [None, "finished", "finished"]
    assert measured["set_files"]["straight"], "the run wrote no set"
    assert measured["sets_equal"] == {"early": True, "late": True}


def test_prompts_encoded_before_training_show_progress_and_stop_on_cancel(measured):
    assert measured["encoded_progress"] == [[1, 3], [2, 3], [3, 3]]  # each distinct prompt once
    assert measured["encoding_phase"] == "encoding prompts"
    assert measured["encoding_bar"][0] == [333, 1000]
    assert measured["encoding_cancel"] == "stop" and not measured["flag_after"]


def test_a_finished_run_queued_again_is_returned_without_preparing_the_model(measured):
    assert measured["straight_again"] == [None, "finished", "reused"]
    assert measured["prepared_for_reuse"] == 0
