"""Tier 2: ShortFT_LoadLoRASet and ShortFT_ApplyAlignedLoRA in a real ComfyUI server. The stock KSampler with a
timestep-aware LoRA set computes what the core sampler computes with the same set, merged mode is the stock
LoraLoader with the set's merged file, and bad sets come back as node errors while the server keeps serving.

How ComfyUI's KSampler corresponds to the core sampler (``shortft_core.chain.run_plan``) for an eps-prediction SD1.5
model; ComfyUI works in x_ve = x / sqrt(abar) with sigma = sqrt((1 - abar) / abar):

- noise: ``comfy.sample.prepare_noise(latent, seed)`` is ``torch.randn(latent.shape)`` after
  ``torch.manual_seed(seed)``: the core's ``initial_noise([seed], shape)`` for a batch of one.
- start: ``noise_scaling`` sets x_ve = noise * sqrt(1 + sigma_0^2) when the first sigma is the schedule's largest
  ("max denoise"), i.e. x_T = noise in DDIM space; otherwise x_ve = noise * sigma_0, i.e. x_T = sqrt(1 - abar_t0) *
  noise. ``ddim_uniform`` at 50 steps starts at t = 981 (< 999): the second case; ``simple`` at 4 steps starts at
  999: the first.
- steps: the ``ddim`` and ``euler`` samplers take Euler steps x_ve += eps * (sigma_next - sigma): the DDIM (eta 0)
  update between the same two timesteps. The UNet receives x_ve / sqrt(1 + sigma^2) = x and the integer timestep
  ``model_sampling.timestep(sigma)``; ``ddim_uniform`` at 50 steps visits 981, 961, ..., 1 (the core's leading
  grid), ``simple`` at 4 steps 999, 749, 499, 249.
- end: the last step goes to sigma = 0, which lands on the denoised prediction of the last timestep: the core plan's
  last step read out as "x0" (not its DDIM step to abar_0).
- guidance: ComfyUI mixes denoised predictions, uncond + cfg * (cond - uncond), linear in eps: the core's guided eps.
- latent: a ComfyUI LATENT is the model-space latent / 0.18215 (``process_latent_out``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from shortft_core.testing.random_models import randomise_lora_b_

from comfy_harness import ComfyServer, PromptRefused, execution_error

pytestmark = pytest.mark.comfyui

CKPT = "sd15_random.safetensors"
SET, SDXL_SET, UNNAMED_SET, BROKEN_SET = "aligned/sd15_set", "sdxl_set", "unnamed_set", "broken_set"
TAIL_SET = "aligned/sd15_tail_base"  # the same set with segment 4 left to the base
PROMPT, NEGATIVE = "a red circle left of a blue square", ""
SEED, CFG, LATENT = 7, 3.0, 8  # an 8x8 latent (64 px), the smallest SD1.5's three downsamplings take whole
SD15_SCALE = 0.18215
APPLY, LOAD = "ShortFT_ApplyAlignedLoRA", "ShortFT_LoadLoRASet"
TOL = 2e-4  # parity: max |ComfyUI - core| / max |core| in model space (both fp32)


@pytest.fixture(scope="module")
def world(comfy_server: ComfyServer, sd15_checkpoint):
    """The checkpoint in the server's models/checkpoints, a random rank-4 LoRA set in its models/loras, and the core
    model with that set loaded back from the files (the fp16 values ComfyUI reads)."""
    from shortft_core.adapters import AdapterSwitch, LoraSetSpec
    from shortft_core.lora_set import export_lora_set, load_lora_set
    from shortft_core.loading import load_model

    (comfy_server.models / "checkpoints" / CKPT).symlink_to(sd15_checkpoint)
    folder = comfy_server.models / "loras" / SET
    model = load_model(sd15_checkpoint, dtype=torch.float32)
    spec = LoraSetSpec(rank=4)
    spec.add_to(model.unet, seed=3)
    randomise_lora_b_(model.unet, seed=5, std=0.3)
    export_lora_set(model.unet, spec, folder, family="sd15")
    model.unet.delete_adapters(list(spec.names))
    names, segments = load_lora_set(model.unet, folder)
    return SimpleNamespace(model=model, names=names, segments=segments, switch=AdapterSwitch(model.unet),
                           cond=model.encode_prompts([PROMPT]), uncond=model.encode_prompts([NEGATIVE]))


@pytest.fixture(scope="module")
def foreign_sets(comfy_server: ComfyServer) -> None:
    """Sets the SD1.5 model must refuse: one exported from a (reduced) SDXL UNet with family sdxl, the same files
    with no family in set.json (only the keys can tell), and a copy missing a segment file."""
    from shortft_core.adapters import LoraSetSpec
    from shortft_core.families import bundled_config
    from shortft_core.lora_set import export_lora_set
    from shortft_core.testing.random_models import SMALL_CONFIGS, random_unet

    loras = comfy_server.models / "loras"
    unet = random_unet({**bundled_config("sdxl", "unet"), **SMALL_CONFIGS["sdxl"]["unet"]}, seed=1)
    spec = LoraSetSpec(rank=2)
    spec.add_to(unet, seed=1)
    randomise_lora_b_(unet, seed=2, std=0.1)
    export_lora_set(unet, spec, loras / SDXL_SET, family="sdxl")
    shutil.copytree(loras / SDXL_SET, loras / UNNAMED_SET)
    info = json.loads((loras / UNNAMED_SET / "set.json").read_text())
    info.pop("family")
    (loras / UNNAMED_SET / "set.json").write_text(json.dumps(info))
    shutil.copytree(loras / SDXL_SET, loras / BROKEN_SET)
    (loras / BROKEN_SET / "segment_2.safetensors").unlink()


# ----- graphs ---------------------------------------------------------------------------------------------------
def sampler_graph(model: list, steps: int, sampler: str, scheduler: str, seed: int = SEED,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """CheckpointLoaderSimple -> (``model`` ref) -> KSampler -> SaveLatent, with ``extra`` nodes (ids 10+)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 8 * LATENT, "height": 8 * LATENT, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": model, "seed": seed, "steps": steps, "cfg": CFG, "sampler_name": sampler, "scheduler": scheduler,
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "latents/shortft"}},
        **(extra or {}),
    }


def apply_node(set_name: str = SET, strength: float = 1.0, mode: str = "timestep-aware",
               lora_set: list | None = None) -> dict[str, Any]:
    inputs = {"model": ["1", 0], "set_name": set_name, "strength": strength, "mode": mode}
    if lora_set is not None:
        inputs["lora_set"] = lora_set
    return {"class_type": APPLY, "inputs": inputs}


def with_set(steps: int, sampler: str, scheduler: str, **apply: Any) -> dict[str, Any]:
    return sampler_graph(["10", 0], steps, sampler, scheduler, extra={"10": apply_node(**apply)})


def run_latent(server: ComfyServer, graph: dict[str, Any]) -> torch.Tensor:
    """Run a graph and read the LATENT its SaveLatent wrote (model-space latent / 0.18215)."""
    prompt_id, events = server.run(graph, timeout=900)
    assert execution_error(events) is None, execution_error(events)
    saved = server.history(prompt_id)["outputs"]["6"]["latents"][0]
    return load_file(server.base / "output" / saved["subfolder"] / saved["filename"])["latent_tensor"]


def core_x0(world: SimpleNamespace, grid: list[int], lora_set: bool, max_denoise: bool) -> torch.Tensor:
    """The core sampler's result for the graphs above (see the module docstring): DDIM over ``grid`` with CFG from
    the same seed's noise, segment j's LoRA at segment j's timesteps when ``lora_set``, read out as the last x0."""
    from shortft_core.chain import run_plan
    from shortft_core.lora_set import set_inference_plan
    from shortft_core.plans import base_chain
    from shortft_core.sampling import initial_noise

    m = world.model
    plan = set_inference_plan(world.names, world.segments, CFG, grid=grid) if lora_set else base_chain(grid, CFG)
    steps = list(plan.steps)
    steps[-1] = dataclasses.replace(steps[-1], readout="x0")
    plan = dataclasses.replace(plan, steps=tuple(steps))
    noise = initial_noise([SEED], (4, LATENT, LATENT))
    x_t = noise if max_denoise else noise * (1 - m.schedule.abar(grid[0], noise)).sqrt()
    with torch.no_grad():
        (x0,) = run_plan(m, plan, x_t, world.cond, world.uncond, world.switch)
    return x0


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max()).item()


def comfy_runs(server: ComfyServer, graphs: dict[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Each graph's saved LATENT in model space, run in the order given."""
    return {name: run_latent(server, graph) * SD15_SCALE for name, graph in graphs.items()}


@pytest.fixture(scope="module")
def ddim50(comfy_server: ComfyServer, world: SimpleNamespace) -> dict[str, torch.Tensor]:
    """KSampler ddim / ddim_uniform, 50 steps, CFG 3: the set (timestep-aware), then no set, then merged mode."""
    return comfy_runs(comfy_server, {"set": with_set(50, "ddim", "ddim_uniform"),
                                     "plain": sampler_graph(["1", 0], 50, "ddim", "ddim_uniform"),
                                     "merged": with_set(50, "ddim", "ddim_uniform", mode="merged")})


@pytest.fixture(scope="module")
def euler4(comfy_server: ComfyServer, world: SimpleNamespace) -> dict[str, torch.Tensor]:
    """KSampler euler / simple, 4 steps, CFG 3: the set (timestep-aware), then no set."""
    return comfy_runs(comfy_server, {"set": with_set(4, "euler", "simple"),
                                     "plain": sampler_graph(["1", 0], 4, "euler", "simple")})


# ----- the nodes as a client sees them --------------------------------------------------------------------------
def test_object_info_lists_the_nodes_with_tooltips_and_fresh_set_lists(comfy_server: ComfyServer):
    loras = comfy_server.models / "loras"
    (loras / "listing" / "first").mkdir(parents=True)
    (loras / "listing" / "first" / "set.json").write_text("{}")
    info = comfy_server.object_info()
    for node, display in ((LOAD, "LoadLoRASet"), (APPLY, "ApplyAlignedLoRA")):
        assert info[node]["display_name"] == display and info[node]["category"] == "ShortFT"
        inputs = {**info[node]["input"]["required"], **info[node]["input"].get("optional", {})}
        assert all(spec[1].get("tooltip") for spec in inputs.values()), node
    load, apply = info[LOAD], info[APPLY]
    assert load["output"] == ["SHORTFT_LORA_SET"]
    assert "listing/first" in load["input"]["required"]["lora_set"][1]["options"]
    assert apply["output"] == ["MODEL"]
    assert apply["input_order"] == {"required": ["model", "set_name", "strength", "mode"], "optional": ["lora_set"]}
    assert apply["input"]["optional"]["lora_set"][0] == "SHORTFT_LORA_SET"
    combo = apply["input"]["required"]["set_name"][1]
    assert combo["options"][0] == "none" and combo["default"] == "none" and "listing/first" in combo["options"]
    assert apply["input"]["required"]["mode"][1]["options"] == ["timestep-aware", "merged"]
    assert apply["input"]["required"]["strength"][1]["default"] == 1.0
    (loras / "listing" / "second").mkdir()
    (loras / "listing" / "second" / "set.json").write_text("{}")
    again = comfy_server.object_info(APPLY)[APPLY]["input"]["required"]["set_name"][1]["options"]
    assert "listing/second" in again  # the lists are read per request


# ----- parity -----------------------------------------------------------------------------------------------------
@pytest.mark.timeout(2400)  # with the session's checkpoint and four 50-step samplings (about 400 UNet calls)
def test_timestep_aware_set_in_ksampler_equals_core_sampler(world, ddim50):
    """KSampler ddim / ddim_uniform, 50 steps, CFG 3, through ApplyAlignedLoRA (timestep-aware) equals the core's
    50-step set plan from the same noise (x_T = sqrt(1 - abar_981) * noise, x0 read out at t = 1), and differs
    from the same graph without the set and in merged mode by far more than that."""
    grid = list(range(981, 0, -20))
    core = core_x0(world, grid, lora_set=True, max_denoise=False)
    err = rel(ddim50["set"], core)
    vs_plain, vs_merged = rel(ddim50["plain"], core), rel(ddim50["merged"], core)
    print(f"ddim50: max |ComfyUI - core| = {(ddim50['set'] - core).abs().max():.2e} (max |core| "
          f"{core.abs().max():.2f}, relative {err:.2e}); relative to no set {vs_plain:.2e}, to merged {vs_merged:.2e}")
    assert err <= TOL
    assert vs_plain > 100 * TOL and vs_merged > 100 * TOL


def test_every_step_in_another_segment_euler_simple(world, euler4):
    """KSampler euler / simple, 4 steps (999, 749, 499, 249: one step in each of the 4 segments, starting from max
    denoise, x_T = noise) equals the core's plan over that grid; the same graph without the set, run afterwards,
    equals the core without adapters (the set's clone leaves the checkpoint's model untouched)."""
    grid = [999, 749, 499, 249]
    assert [world.segments.segment_of(t) for t in grid] == [1, 2, 3, 4]
    with_lora, plain = euler4["set"], euler4["plain"]
    core_set = core_x0(world, grid, lora_set=True, max_denoise=True)
    core_plain = core_x0(world, grid, lora_set=False, max_denoise=True)
    print(f"euler4: max |ComfyUI - core| with the set {(with_lora - core_set).abs().max():.2e}, without "
          f"{(plain - core_plain).abs().max():.2e} (max |core| {core_set.abs().max():.2f}); relative: "
          f"{rel(with_lora, core_set):.2e}, {rel(plain, core_plain):.2e}; set effect {rel(core_plain, core_set):.2e}")
    assert rel(with_lora, core_set) <= TOL and rel(plain, core_plain) <= TOL
    assert rel(core_plain, core_set) > 100 * TOL


def test_load_lora_set_socket_gives_the_set_name_result(comfy_server, euler4):
    """LoadLoRASet -> ApplyAlignedLoRA (set_name left at none) samples exactly what set_name does."""
    linked = sampler_graph(["10", 0], 4, "euler", "simple", extra={
        "10": apply_node(set_name="none", lora_set=["11", 0]),
        "11": {"class_type": LOAD, "inputs": {"lora_set": SET}}})
    assert torch.equal(run_latent(comfy_server, linked) * SD15_SCALE, euler4["set"])


def test_a_segment_left_to_the_base_runs_the_checkpoints_model(comfy_server, world, euler4):
    """A set whose set.json names no file for segment 4 (null: the base there, as last_segment 'base' writes it)
    samples in KSampler euler / simple (4 steps, the last in segment 4) what the core does with the base on that
    step, and differs from the whole set there."""
    loras = comfy_server.models / "loras"
    shutil.copytree(loras / SET, loras / TAIL_SET)
    info = json.loads((loras / TAIL_SET / "set.json").read_text())
    info["segment_files"][3] = None
    (loras / TAIL_SET / "set.json").write_text(json.dumps(info))
    (loras / TAIL_SET / "segment_4.safetensors").unlink()
    got = run_latent(comfy_server, with_set(4, "euler", "simple", set_name=TAIL_SET)) * SD15_SCALE
    grid = [999, 749, 499, 249]
    core = core_x0(SimpleNamespace(**{**vars(world), "names": world.names[:3] + [None]}), grid, lora_set=True,
                   max_denoise=True)
    print(f"euler4, segment 4 base: relative |ComfyUI - core| {rel(got, core):.2e}; vs the whole set "
          f"{rel(euler4['set'], core):.2e}")
    assert rel(got, core) <= TOL
    assert rel(euler4["set"], core) > 10 * TOL  # the set differs on one step of four, the last


def test_merged_mode_is_the_stock_lora_loader(comfy_server, euler4):
    """mode merged at strength 0.7 samples bit for bit what LoraLoaderModelOnly gives with the set's
    merged.safetensors at 0.7 (4 euler steps), which differs from no set."""
    ours = run_latent(comfy_server, with_set(4, "euler", "simple", strength=0.7, mode="merged"))
    stock = run_latent(comfy_server, sampler_graph(["12", 0], 4, "euler", "simple", extra={
        "12": {"class_type": "LoraLoaderModelOnly",
               "inputs": {"model": ["1", 0], "lora_name": f"{SET}/merged.safetensors", "strength_model": 0.7}}}))
    assert torch.equal(ours, stock)
    assert rel(ours * SD15_SCALE, euler4["plain"]) > 100 * TOL


# ----- bad input --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("set_name, mode, message", [
    (SDXL_SET, "timestep-aware", "was trained for sdxl but the MODEL is sd15"),
    (SDXL_SET, "merged", "was trained for sdxl but the MODEL is sd15"),
    (UNNAMED_SET, "timestep-aware", "match no weight of this sd15 MODEL"),
    (UNNAMED_SET, "merged", "match no weight of this sd15 MODEL"),
])
def test_a_set_for_another_base_is_a_node_error(comfy_server, world, foreign_sets, set_name, mode, message):
    """An SDXL set on the SD1.5 model fails in ApplyAlignedLoRA, named by its manifest's family or, without one, by
    the keys ComfyUI cannot map (never skipped silently); the server then runs the next prompt."""
    _, events = comfy_server.run(with_set(1, "euler", "simple", set_name=set_name, mode=mode), timeout=600)
    error = execution_error(events)
    assert error is not None and error["node_type"] == APPLY, events[-1]
    assert message in error["exception_message"]
    _serves_next_prompt(comfy_server)


@pytest.mark.parametrize("graph, node, message", [
    (with_set(1, "euler", "simple", set_name="no/such_set"), "10", "no LoRA set 'no/such_set'"),
    (with_set(1, "euler", "simple", set_name="none"), "10", "choose a LoRA set in set_name or connect LoadLoRASet"),
    (with_set(1, "euler", "simple", set_name=BROKEN_SET), "10", "lacks them"),
    (sampler_graph(["10", 0], 1, "euler", "simple", extra={
        "10": apply_node(set_name="none", lora_set=["11", 0]),
        "11": {"class_type": LOAD, "inputs": {"lora_set": "no/such_set"}}}), "11", "no LoRA set 'no/such_set'"),
])
def test_a_missing_or_broken_set_is_refused_before_running(comfy_server, foreign_sets, graph, node, message):
    """Validation refuses the prompt (HTTP 400) with the node's error naming the set and the fix."""
    with pytest.raises(PromptRefused) as refused:
        comfy_server.queue(graph)
    details = [e["details"] for e in refused.value.node_errors[node]["errors"]]
    assert any(message in d for d in details), refused.value
    _serves_next_prompt(comfy_server)


_fresh = itertools.count(1)


def _serves_next_prompt(server: ComfyServer) -> None:
    """A cheap prompt that must execute (inputs not used before, so nothing is cached) and succeed."""
    graph = {"4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
             "5": {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["4", 0], "upscale_method": "nearest-exact",
                                                                "scale_by": 1.0 + next(_fresh) / 100}},
             "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "latents/next"}}}
    _, events = server.run(graph, timeout=120)
    assert events[-1]["type"] == "execution_success", events[-3:]
    assert any(e["type"] == "executed" for e in events)
