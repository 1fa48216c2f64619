"""Tier 2: ShortFT_LoadTinyWorld gives the tiny world as genuine ComfyUI MODEL, CLIP and VAE objects. Stock
CLIPTextEncode -> EmptyLatentImage (32x32) -> KSampler -> VAEDecode runs it headless in a real server and samples what
the library samples; ApplyAlignedLoRA applies a tiny LoRA set to it as the library does; and each piece, built in a
ComfyUI subprocess, computes what the diffusers/transformers pipeline of ``shortft_core.loading.load_tiny_model``
computes.

The KSampler <-> library correspondence (noise from the seed, start scaling, ``ddim_uniform`` = the leading grid,
the last step read out as x0, guidance) is the one test_comfyui_apply.py's docstring derives for SD1.5; the tiny
world has SD1.5's schedule, and its LATENT is the model-space latent / the tiny VAE's scaling factor (0.6565).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from comfy_harness import ComfyServer, comfyui_or_skip, execution_error
from comfy_process import run_in_comfyui
from shortft_core.adapters import AdapterSwitch, LoraSetSpec, remove_adapters
from shortft_core.chain import run_plan
from shortft_core.loading import load_tiny_model
from shortft_core.lora_io import load_lora_adapter
from shortft_core.lora_set import export_lora_set, load_lora_set, set_inference_plan
from shortft_core.models import Conditioning
from shortft_core.plans import ChainPlan, adapter_chain, base_chain
from shortft_core.sampling import initial_noise
from shortft_core.testing.random_models import randomise_lora_b_
from shortft_core.tiny_world import weights_dir

pytestmark = pytest.mark.comfyui

LOAD, APPLY = "ShortFT_LoadTinyWorld", "ShortFT_ApplyAlignedLoRA"
PROMPT, NEGATIVE = "a red circle left of a blue square", ""
SEED, CFG, SIZE = 11, 3.0, 32
SET, SD15_NAMED_SET = "tiny/aligned_set", "tiny/sd15_named_set"
MERGED = "tiny_merged"  # the library-side adapter of the set's merged file
# a tiny-world LATENT is the model-space latent / the VAE's scaling factor
LATENT_SCALE = json.loads((weights_dir() / "pipeline" / "vae" / "config.json").read_text())["scaling_factor"]
DDIM50 = list(range(981, 0, -20))  # KSampler ddim + ddim_uniform at 50 steps
SIMPLE4 = [999, 749, 499, 249]  # KSampler euler + simple at 4 steps: one step in each of the set's 4 segments
# parity tolerances, fp32 on a CPU: max |ComfyUI - library| / max |library| (measured values in the tests' output)
TOL_PIECE = 1e-5  # one UNet call, the text encoder, the VAE
TOL_CHAIN = 2e-5  # a whole sampling chain in latent space
TOL_PNG = 2 / 255  # SaveImage truncates to 8 bits (up to 1/255) on top of the sampling difference


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope="module")
def lib():
    """The library's tiny model (diffusers/transformers, fp32) and the conds of the test's prompts."""
    model = load_tiny_model()
    return SimpleNamespace(model=model, cond=model.encode_prompts([PROMPT]), uncond=model.encode_prompts([NEGATIVE]))


# ----- each piece in a ComfyUI subprocess -------------------------------------------------------------------------
# Run by comfy_process.run_in_comfyui (ComfyUI's globals stay out of the pytest process); ARGS = inputs.safetensors,
# outputs.safetensors.
COMFY_SIDE = r'''
    import json, time
    from safetensors.torch import load_file, save_file
    inputs, outputs = ARGS
    tiny = pack_module("tiny_world")

    inp = load_file(inputs)
    prompts = json.loads(open(inputs + ".json").read())["prompts"]
    info, out = {}, {}
    with torch.inference_mode():  # as nodes run in ComfyUI
        builds = []
        for _ in range(2):
            start = time.perf_counter()
            model, clip, vae = tiny.load_tiny_world()
            builds.append(time.perf_counter() - start)
        first = tiny.load_tiny_world()[0]
        info["build_s"] = builds
        info["shares_weights"] = any(a.data_ptr() == b.data_ptr() for a, b in
                                     zip(first.model.state_dict().values(), model.model.state_dict().values()))
        info["is_tiny"] = [tiny.is_tiny_world(model), tiny.is_tiny_world(model.clone()),
                           tiny.is_tiny_world(model.model), tiny.is_tiny_world(clip.patcher)]
        info["config_matches_class"] = {k: v for k, v in model.model.model_config.unet_config.items()
                                        if k in tiny.TinyWorld.unet_config and tiny.TinyWorld.unet_config[k] != v}
        info["group_norms"] = sorted({m.num_groups for m in model.model.modules() if isinstance(m, torch.nn.GroupNorm)}
                                     | {m.num_groups for m in vae.first_stage_model.modules()
                                        if isinstance(m, torch.nn.GroupNorm)})
        info["latent"] = [model.model.latent_format.scale_factor, model.model.latent_format.spacial_downscale_ratio,
                          vae.spacial_compression_decode()]
        ms = model.model.model_sampling
        out["alphas_cumprod"] = (1 / (1 + ms.sigmas.double() ** 2)).float().contiguous()  # sigma^2 = (1 - abar) / abar
        unet = model.model.diffusion_model
        for t in inp["timesteps"].tolist():
            tt = torch.full((inp["x"].shape[0],), float(t))
            out[f"eps_{t}"] = unet(inp["x"], timesteps=tt, context=inp["context"]).contiguous()
        for i, p in enumerate(prompts):
            tokens = clip.tokenize(p)
            out[f"tokens_{i}"] = torch.tensor([tok for tok, _ in tokens["l"][0]])
            out[f"cond_{i}"] = clip.encode_from_tokens(tokens).contiguous()
        out["decoded"] = vae.decode(inp["latents"] / model.model.latent_format.scale_factor).contiguous()
        out["encoded"] = (vae.encode(inp["images"]) * model.model.latent_format.scale_factor).contiguous()
        low = tiny.load_tiny_world(dtype=torch.bfloat16)[0]  # per-layer casting: a CPU computes bf16 weights in fp32
        t = int(inp["timesteps"][0])
        out["eps_bf16"] = low.model.diffusion_model(inp["x"], timesteps=torch.full((inp["x"].shape[0],), float(t)),
                                                    context=inp["context"]).float().contiguous()
        info["bf16_manual_cast"] = str(low.model.manual_cast_dtype)
        info["ops"] = [model.model.model_config.custom_operations.__name__,
                       low.model.model_config.custom_operations.__name__]
    save_file(out, outputs)
    json.dump(info, open(outputs + ".json", "w"))
'''


@pytest.fixture(scope="module")
def pieces(tmp_path_factory, lib) -> SimpleNamespace:
    """Inputs made by the library, the ComfyUI side's outputs for them and what it reports."""
    comfy = comfyui_or_skip()
    tmp = tmp_path_factory.mktemp("tiny_pieces")
    g = torch.Generator().manual_seed(1)
    m = lib.model
    latents = torch.randn((2, 4, SIZE // 4, SIZE // 4), generator=g)
    with torch.no_grad():
        images = m.decode(latents)  # natural images of the tiny world for the encoder
    inputs = {"x": torch.randn((2, 4, SIZE // 4, SIZE // 4), generator=g),
              "context": torch.cat([lib.cond.hidden, lib.uncond.hidden]),
              "timesteps": torch.tensor([999, 500, 1]), "latents": latents,
              "images": images.permute(0, 2, 3, 1).contiguous()}
    save_file(inputs, tmp / "inputs.safetensors")
    prompts = [PROMPT, NEGATIVE, "A Blue SQUARE, above a green triangle & a yellow star!"]
    (tmp / "inputs.safetensors.json").write_text(json.dumps({"prompts": prompts}))
    run_in_comfyui(comfy, COMFY_SIDE, tmp / "comfy_side.py", tmp / "inputs.safetensors", tmp / "outputs.safetensors")
    out = load_file(tmp / "outputs.safetensors")
    info = json.loads((tmp / "outputs.safetensors.json").read_text())
    return SimpleNamespace(inputs=inputs, prompts=prompts, out=out, info=info)


def test_the_objects_are_the_tiny_world_built_afresh_each_time(pieces):
    """Two loads give separate weights, built well under a second; is_tiny_world recognises the MODEL and its clones
    (not the CLIP); the UNet and VAE GroupNorms use 16 groups; the latent is 4x with the VAE's scale; the instance
    config of the shipped world equals TinyWorld.unet_config."""
    info = pieces.info
    print(f"build times {', '.join(f'{s:.3f}' for s in info['build_s'])} s")
    assert min(info["build_s"]) < 1.0
    assert not info["shares_weights"]
    assert info["is_tiny"] == [True, True, True, False]
    assert info["config_matches_class"] == {}
    assert info["group_norms"] == [16]
    assert info["latent"] == [LATENT_SCALE, 4, 4]


def test_schedule_is_the_librarys(pieces, lib):
    """ComfyUI's discrete schedule of the MODEL is the library's SD1.5 scaled-linear schedule."""
    ours = lib.model.schedule.alphas_cumprod.float()
    err = (pieces.out["alphas_cumprod"] - ours).abs().max().item()
    print(f"alphas_cumprod max |diff| {err:.1e}")
    assert err < 1e-6


def test_unet_eps_equals_diffusers(pieces, lib):
    """The ComfyUI UNet's eps at t = 999, 500, 1 equals the diffusers UNet's for the same x and context."""
    errs = {}
    for t in pieces.inputs["timesteps"].tolist():
        with torch.no_grad():
            ref = lib.model.eps(pieces.inputs["x"], t, Conditioning(pieces.inputs["context"]))
        errs[t] = rel(pieces.out[f"eps_{t}"], ref)
    print("UNet eps relative error per timestep: " + ", ".join(f"{t}: {e:.1e}" for t, e in errs.items()))
    assert max(errs.values()) <= TOL_PIECE


def test_unet_in_bf16_casts_per_layer(pieces, lib):
    """dtype bf16 builds with ComfyUI's manual-cast ops on a CPU (the tiny GroupNorm extends them) and stays close."""
    t = int(pieces.inputs["timesteps"][0])
    with torch.no_grad():
        ref = lib.model.eps(pieces.inputs["x"], t, Conditioning(pieces.inputs["context"]))
    err = rel(pieces.out["eps_bf16"], ref)
    print(f"bf16 UNet eps relative error {err:.1e} (manual cast {pieces.info['bf16_manual_cast']})")
    assert pieces.info["ops"] == ["disable_weight_init_groups16", "manual_cast_groups16"]
    assert err < 0.05


def test_clip_tokens_and_cond_equal_transformers(pieces, lib):
    """ComfyUI's tokenizer gives the tiny pipeline's token ids and its CLIP the text encoder's last hidden state,
    shape (1, 77, 64), for each prompt (the empty one, and one with capitals and punctuation)."""
    m = lib.model
    tok = m.tokenizers[0]
    errs = []
    for i, p in enumerate(pieces.prompts):
        ids = tok([p], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids[0]
        assert torch.equal(pieces.out[f"tokens_{i}"], ids), p
        cond = pieces.out[f"cond_{i}"]
        assert cond.shape == (1, 77, 64)
        errs.append(rel(cond, m.encode_prompts([p]).hidden))
    print("CLIP cond relative error per prompt: " + ", ".join(f"{e:.1e}" for e in errs))
    assert max(errs) <= TOL_PIECE


def test_vae_decode_and_encode_equal_diffusers(pieces, lib):
    """VAE.decode of a LATENT (model-space latent / 0.6565) gives the diffusers VAE's image, BHWC in [0, 1]; VAE.encode
    gives its posterior mean."""
    with torch.no_grad():
        ref = lib.model.decode(pieces.inputs["latents"]).permute(0, 2, 3, 1)
        enc = lib.model.encode_images(pieces.inputs["images"].permute(0, 3, 1, 2))
    dec_err = (pieces.out["decoded"] - ref).abs().max().item()
    enc_err = rel(pieces.out["encoded"], enc)
    print(f"VAE decode max |diff| {dec_err:.1e} (pixels in [0, 1]); encode relative error {enc_err:.1e}")
    assert pieces.out["decoded"].shape == (2, SIZE, SIZE, 3)
    assert dec_err <= TOL_PIECE and enc_err <= TOL_PIECE


# ----- the stock graph in a real server -----------------------------------------------------------------------------
def tiny_graph(steps: int, sampler: str, scheduler: str, model: list | None = None, decode: bool = False,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """LoadTinyWorld -> CLIPTextEncode (positive, negative) -> EmptyLatentImage 32x32 -> KSampler -> SaveLatent, and
    VAEDecode -> SaveImage when ``decode``; ``model`` replaces the KSampler's MODEL (e.g. an ``extra`` node's)."""
    graph = {
        "1": {"class_type": LOAD, "inputs": {}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": model or ["1", 0], "seed": SEED, "steps": steps, "cfg": CFG, "sampler_name": sampler,
            "scheduler": scheduler, "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "latents/tiny"}},
        **(extra or {}),
    }
    if decode:
        graph["7"] = {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}}
        graph["8"] = {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "tiny/image"}}
    return graph


def with_set(steps: int, sampler: str, scheduler: str, set_name: str = SET, mode: str = "timestep-aware"
             ) -> dict[str, Any]:
    """:func:`tiny_graph` sampling the tiny MODEL through ApplyAlignedLoRA with ``set_name`` at strength 1."""
    return tiny_graph(steps, sampler, scheduler, model=["10", 0], extra={"10": {"class_type": APPLY, "inputs": {
        "model": ["1", 0], "set_name": set_name, "strength": 1.0, "mode": mode}}})


def run(server: ComfyServer, graph: dict[str, Any]) -> tuple[torch.Tensor, np.ndarray | None]:
    """Run a graph: (its saved LATENT times the tiny scale: the model-space latent, its PNG in [0, 1] HWC or None)."""
    prompt_id, events = server.run(graph, timeout=600)
    assert execution_error(events) is None, execution_error(events)
    outputs = server.history(prompt_id)["outputs"]
    saved = outputs["6"]["latents"][0]
    latent = load_file(server.base / "output" / saved["subfolder"] / saved["filename"])["latent_tensor"]
    image = None
    if "8" in outputs:
        png = outputs["8"]["images"][0]
        image = np.asarray(Image.open(server.base / "output" / png["subfolder"] / png["filename"]), dtype=np.float32)
        image = image / 255.0
    return latent * LATENT_SCALE, image


def core_x0(lib: SimpleNamespace, plan: ChainPlan, switch: AdapterSwitch | None = None) -> torch.Tensor:
    """The library's chain ``plan`` (DDIM with CFG over its grid) from the seed's noise, its last step read out as x0
    (test_comfyui_apply.py's docstring: KSampler starts at x_T = noise when the grid starts at 999, else at
    sqrt(1 - abar) * noise, and ends on the last step's denoised prediction)."""
    m = lib.model
    steps = list(plan.steps)
    steps[-1] = dataclasses.replace(steps[-1], readout="x0")
    plan = dataclasses.replace(plan, steps=tuple(steps))
    t0 = steps[0].t
    noise = initial_noise([SEED], m.latent_shape())
    x_t = noise if t0 == m.schedule.num_train_timesteps - 1 else noise * (1 - m.schedule.abar(t0, noise)).sqrt()
    with torch.no_grad():
        (x0,) = run_plan(m, plan, x_t, lib.cond, lib.uncond, switch)
    return x0


def test_object_info_lists_the_node(comfy_server: ComfyServer):
    """The server lists Load Tiny World under ShortFT with a description, no required input (an optional dtype
    combo, fp32 by default) and the outputs MODEL, CLIP, VAE, all with tooltips."""
    info = comfy_server.object_info(LOAD)[LOAD]
    assert info["display_name"] == "Load Tiny World" and info["category"] == "ShortFT" and info["description"]
    assert info["output"] == ["MODEL", "CLIP", "VAE"]
    assert all(info["output_tooltips"])
    assert not info["input"].get("required")
    dtype = info["input"]["optional"]["dtype"]
    assert dtype[1]["default"] == "fp32" and dtype[1]["tooltip"]


def test_stock_graph_samples_what_the_library_samples(comfy_server: ComfyServer, lib):
    """Stock CLIPTextEncode / EmptyLatentImage 32x32 / KSampler ddim + ddim_uniform 50 steps CFG 3 / VAEDecode /
    SaveImage on the tiny world: the latent equals the library's DDIM chain over 981, 961, ..., 1 (x0 of t = 1) and
    the saved PNG the library's decode of it (to the 8-bit truncation)."""
    latent, image = run(comfy_server, tiny_graph(50, "ddim", "ddim_uniform", decode=True))
    core = core_x0(lib, base_chain(DDIM50, CFG))
    with torch.no_grad():
        ref = lib.model.decode(core)[0].permute(1, 2, 0).numpy()
    err, png_err = rel(latent, core), float(np.abs(image - ref).max())
    print(f"ddim50 tiny world: latent relative error {err:.1e} (max |core| {core.abs().max():.2f}); PNG max |diff| "
          f"{png_err * 255:.2f}/255")
    assert latent.shape == (1, 4, SIZE // 4, SIZE // 4) and image.shape == (SIZE, SIZE, 3)
    assert err <= TOL_CHAIN
    assert png_err <= TOL_PNG


@pytest.fixture(scope="module")
def lora_world(comfy_server: ComfyServer, lib):
    """A random rank-4 LoRA set of the tiny model (family tiny) in the server's models/loras, the same set with
    family sd15, and the library's model with the set's segment files and its merged file loaded back as adapters
    (the fp16 values ComfyUI reads)."""
    unet = lib.model.unet
    loras = comfy_server.models / "loras"
    spec = LoraSetSpec(rank=4)
    spec.add_to(unet, seed=3)
    randomise_lora_b_(unet, seed=5, std=0.3)
    export_lora_set(unet, spec, loras / SET, family="tiny")
    remove_adapters(unet, list(spec.names))
    shutil.copytree(loras / SET, loras / SD15_NAMED_SET)
    info = json.loads((loras / SD15_NAMED_SET / "set.json").read_text())
    (loras / SD15_NAMED_SET / "set.json").write_text(json.dumps({**info, "family": "sd15"}))
    names, segments = load_lora_set(unet, loras / SET)
    load_lora_adapter(unet, loras / SET / "merged.safetensors", MERGED, trainable=False)
    yield SimpleNamespace(names=names, segments=segments, switch=AdapterSwitch(unet))
    remove_adapters(unet, [n for n in names if n is not None] + [MERGED])


@pytest.mark.parametrize("steps, sampler, scheduler, grid", [(50, "ddim", "ddim_uniform", DDIM50),
                                                             (4, "euler", "simple", SIMPLE4)])
def test_aligned_lora_set_on_the_tiny_model_equals_the_library(comfy_server, lib, lora_world, steps, sampler,
                                                              scheduler, grid):
    """ApplyAlignedLoRA (timestep-aware) with a tiny LoRA set in the stock KSampler samples the library's set plan
    (segment j's LoRA at segment j's timesteps) from the same noise, and differs from the tiny world without it."""
    ws = lora_world
    if grid == SIMPLE4:
        assert [ws.segments.segment_of(t) for t in grid] == [1, 2, 3, 4]

    got, _ = run(comfy_server, with_set(steps, sampler, scheduler))
    core = core_x0(lib, set_inference_plan(ws.names, ws.segments, CFG, grid=grid), ws.switch)
    plain = core_x0(lib, base_chain(grid, CFG), ws.switch)
    err, effect = rel(got, core), rel(plain, core)
    print(f"{sampler}/{scheduler} {steps} steps with the set: relative error {err:.1e}; the set's effect {effect:.1e}")
    assert err <= TOL_CHAIN
    assert effect > 100 * TOL_CHAIN


def test_merged_mode_on_the_tiny_model_equals_the_library(comfy_server, lib, lora_world):
    """ApplyAlignedLoRA (merged) samples, in KSampler euler / simple at 4 steps, what the library samples with the
    set's merged LoRA at every step (ComfyUI's own LoRA loading maps every key of a tiny-world LoRA)."""
    got, _ = run(comfy_server, with_set(4, "euler", "simple", mode="merged"))
    core = core_x0(lib, adapter_chain((MERGED,), CFG, SIMPLE4), lora_world.switch)
    print(f"euler/simple 4 steps, merged: relative error {rel(got, core):.1e}")
    assert rel(got, core) <= TOL_CHAIN


def test_a_set_for_another_family_is_refused_on_the_tiny_model(comfy_server, lora_world):
    """A set whose set.json names family sd15 fails in ApplyAlignedLoRA on the tiny MODEL, naming both families."""
    _, events = comfy_server.run(with_set(1, "euler", "simple", set_name=SD15_NAMED_SET), timeout=300)
    error = execution_error(events)
    assert error is not None and error["node_type"] == APPLY, events[-1]
    assert "was trained for sd15 but the MODEL is tiny" in error["exception_message"]
