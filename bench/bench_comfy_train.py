"""Training inside ComfyUI against the command line's training (ComfyUI in-process, CPU).

    python bench/bench_comfy_train.py speed --iterations 20 --repeats 3 --threads 2
    python bench/bench_comfy_train.py memory --image-size 64 --threads 2
    python bench/bench_comfy_train.py memory --image-size 512 --gpu
    python bench/bench_comfy_train.py prompts --image-size 512 --gpu --iterations 6
    python bench/bench_comfy_train.py checkpointing --image-size 256 --threads 2

``speed``: the tiny world's preset for ``--iterations`` iterations through one library session, on the model the
command line trains (``load_tiny_model()``, diffusers modules) and on the MODEL/CLIP/VAE of Load Tiny World
(``nodes/backend.py``'s ComfyModel, what ShortFTTrain trains), alternated ``--repeats`` times; the training seconds
per iteration (the session's own clock, without evaluations and pictures) are printed with their medians and the
ratio, and whether the two LoRA sets agree.

``prompts``: training with more prompts than the prompt cache holds, on a device ComfyUI believes full, in one
process per variant: a random full-size SD1.5 checkpoint at ``--image-size`` px, a cache of 2 prompts, 6 training
prompts, ``--iterations`` iterations (most draw a prompt the cache has dropped, so the text encoder is loaded
mid-run). After the first iteration ComfyUI's reserved memory is set to what the device has free, so every load
of the text encoder must free memory by unloading other models. ``held`` is the pack (the network and the VAE kept
out of ComfyUI's unloading while a prompt encodes); ``unheld`` is the same run without that. Printed per variant:
iterations done, mid-run encodes, how much of the network and the VAE ComfyUI unloaded during them, the error if
one stopped the run, and the network's and VAE's parameters left off the device.

``memory``: one ShortFT iteration at ``--image-size`` px on a random full-size SD1.5 checkpoint, each variant in a
fresh process whose peak resident memory (VmHWM) is read at the end: ``one-copy`` loads the checkpoint with ComfyUI's
loader and trains that MODEL in place (the pack now); ``two-copies`` loads it with ComfyUI's loader and trains the
library's own copy of the same file beside it (what a graph held when LoadShortcutModel loaded its own base). With
``--gpu`` ComfyUI runs on the GPU in its own dtype, its MODEL is placed there first (as after a KSampler ran), the
library's copy takes the same device and dtype, and the peak is ``torch.cuda.max_memory_allocated``.

``checkpointing``: what ShortFTTrain's ``gradient_checkpointing`` choices cost and save, on a random full-size SD1.5
checkpoint loaded by ComfyUI's loader and trained in place at ``--image-size`` px (batch 1, rank 8, no CFG on the
tuned steps, the library's default chain), each choice in a fresh process: warm-up plus one iteration. The peak is
what the iterations allocate beyond the loaded weights: on a CPU the live tensor bytes of every op
(``profiling.LivePeak``, which predicted an H100's allocated peak 2-11 % low for the library's own models), with
``--gpu`` ``torch.cuda.max_memory_allocated`` less what was allocated before. Printed per choice: that peak, the
measured iteration's seconds, and its loss (equal across choices: checkpointing changes memory, not values). The
rows ``..., lean layers`` add the lean layers the trainer gives ComfyUI's layers on CUDA (frozen convolutions, GEGLUs,
GroupNorm+SiLU pairs keeping less for backward), forced on here on every device; the other rows have them off on
every device.

``dynamic``: training the MODEL of ComfyUI's checkpoint loader under DynamicVRAM, which ``main.py`` turns on by default
on an NVIDIA GPU (the loaders then give a ``ModelPatcherDynamic``: weights stay in host memory and stream to the GPU
per layer call; the pack trains the static copies ComfyUI loads for such a MODEL and VAE), against the legacy model
patcher, each in a fresh process on a random full-size SD1.5 at
``--image-size`` px (3 iterations, UNet and VAE recomputed, as ``auto`` on a GPU). Printed per variant: the patchers
the loader gave, the iterations done and their losses, the LoRA set's difference from the legacy run's, how much
ComfyUI's own prediction of the MODEL changed from before training to after it, how far the set sampled through
ApplyAlignedLoRA on the loader's MODEL lies from the same on the MODEL trained (stock sampler, euler / simple, 4
steps; streamed, the former bypasses every layer) next to the set's own effect, the peak, the GPU memory freed when
the copies are dropped (as ShortFTTrain drops them when training ends; nothing to drop in the legacy run), and the
error that stopped it (with its traceback). On a CPU, ComfyUI's loaders give the legacy patcher either way.

ComfyUI is found as the tests find it ($COMFYUI_PATH, else ../shared/comfyui, else ~/comfy/ComfyUI); its requirements
must be installed in this interpreter.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_apply_set import REPO, find_comfyui, import_pack_module

sys.path.insert(0, str(REPO))


def start_comfyui(threads: int, gpu: bool = False, dynamic_vram: bool = False) -> str:
    """ComfyUI's source importable, its arguments parsed as ``main.py`` (``--cpu`` unless ``gpu``). With
    ``dynamic_vram``, DynamicVRAM started as ``main.py`` starts it on an NVIDIA GPU (comfy-aimdo before torch, then its
    devices, then the dynamic model patcher as the loaders' default); returns why not where it cannot start."""
    sys.path.insert(0, str(find_comfyui()))
    sys.argv = [sys.argv[0]] + ([] if gpu else ["--cpu"])
    import comfy.options

    comfy.options.enable_args_parsing()
    started = "off"
    if dynamic_vram:
        import comfy_aimdo.control

        started = "comfy-aimdo did not load" if not comfy_aimdo.control.init() else "on"
    import torch

    torch.set_num_threads(threads)
    if started == "on":
        import comfy.memory_management
        import comfy.model_management
        import comfy.model_patcher

        devices = [d.index for d in comfy.model_management.get_all_torch_devices() if d.type == "cuda"]
        if not devices or not comfy_aimdo.control.init_devices(devices):
            return "no device comfy-aimdo could take (it needs an NVIDIA or AMD GPU)"
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True
    return started


def speed(args: argparse.Namespace) -> None:
    import torch
    from safetensors.torch import load_file

    start_comfyui(args.threads)
    tiny, backend = import_pack_module("tiny_world"), import_pack_module("backend")
    from shortft_pack.shortft_core import TrainingSession, TrainRequest, load_tiny_model

    def model(variant: str):
        if variant == "cli":
            return load_tiny_model()
        with torch.inference_mode():  # as ComfyUI's nodes make them
            made = tiny.load_tiny_world()
        m = backend.ComfyModel(*made)
        m.prepare()
        return m

    per_iteration: dict[str, list[float]] = {"cli": [], "comfyui": []}
    sets = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for variant in ("cli", "comfyui"):
                out = Path(tmp) / f"{variant}_{rep}"
                request = TrainRequest(out=out, model=model(variant), preset="tiny", grid_prompts=1,
                                       config={"iterations": args.iterations, "eval_count": 0, "preview_every": 0})
                with TrainingSession(request) as session:
                    session.check()
                    result = session.run()
                seconds = result.history.seconds[-1] / args.iterations
                per_iteration[variant].append(seconds)
                sets[variant] = {f.name: load_file(str(f)) for f in sorted((out / "lora").glob("segment_*"))}
                print(f"repeat {rep + 1} {variant}: {seconds:.3f} s/iteration", flush=True)
    diff = max(float((sets["comfyui"][f][k].float() - v.float()).abs().max() / v.float().abs().max())
               for f, sd in sets["cli"].items() for k, v in sd.items() if v.float().abs().max() > 0)
    med = {k: statistics.median(v) for k, v in per_iteration.items()}
    print(f"\n| path | s/iteration ({args.repeats} runs) | median |\n|---|---|---|")
    for k, v in per_iteration.items():
        print(f"| {k} | {' / '.join(f'{s:.3f}' for s in v)} | {med[k]:.3f} |")
    print(f"\nratio comfyui / cli: {med['comfyui'] / med['cli']:.3f}; LoRA sets after {args.iterations} iterations: "
          f"max relative difference {diff:.2e}")


# What every side script starts with: its arguments (variant, checkpoint, shortcut, image size, threads, cpu / gpu,
# this folder, then the mode's own in ``extra``), ComfyUI started, the pack's backend and the library as it holds it.
SIDE_PREAMBLE = r'''
import contextlib, json, sys, time
variant, ckpt, shortcut, size, threads, gpu, here, *extra = sys.argv[1:]
gpu = gpu == "gpu"
sys.path.insert(0, here)
from bench_comfy_train import start_comfyui
dynamic_vram = start_comfyui(int(threads), gpu, dynamic_vram=variant == "dynamic")
import torch
from bench_apply_set import import_pack_module
import comfy.model_management as mm
import comfy.sd
backend = import_pack_module("backend")
from shortft_pack.shortft_core import TrainConfig, attach_shortcut, load_model
from shortft_pack.shortft_core.prompts import PromptSource
from shortft_pack.shortft_core.rewards.pixel import SymmetryReward
from shortft_pack.shortft_core.trainer import Trainer
'''

MEMORY_SCRIPT = r'''

def hwm():
    """Peak memory so far in GiB: the GPU's allocated peak with --gpu, else the process's resident peak."""
    if gpu:
        return torch.cuda.max_memory_allocated() / 2**30
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024 / 1024

with torch.inference_mode():
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=True)[:3]
    if gpu:  # as after a KSampler ran: ComfyUI's MODEL in VRAM
        comfy.model_management.load_models_gpu([model])
loaded = hwm()
if variant == "one-copy":
    m = backend.ComfyModel(model, clip, vae)
    m.prepare()
else:
    m = load_model(ckpt, device=comfy.model_management.get_torch_device() if gpu else "cpu",
                   dtype=model.model.get_dtype() if gpu else torch.float32)
cfg = TrainConfig(iterations=1, batch_size=1, rank=4, guidance=1.0, sample_steps=10, eval_count=0, lr=1e-3,
                  shortcut_guidance=1.0, image_size=int(size))
preset = attach_shortcut(m, shortcut)
t0 = time.perf_counter()
Trainer(m, SymmetryReward(), cfg, PromptSource(["a red circle left of a blue square"]), shortcut_preset=preset).train_step()
print("RESULT " + json.dumps({"variant": variant, "loaded_gib": loaded, "peak_gib": hwm(),
                              "seconds": time.perf_counter() - t0}))
'''


def in_processes(script_text: str, variants: tuple[str, ...], args: argparse.Namespace, *extra: str) -> list[dict]:
    """Run :data:`SIDE_PREAMBLE` + ``script_text`` once per variant, each in a fresh process, on one random
    full-size SD1.5 checkpoint and a random shortcut LoRA for it; its arguments: variant, checkpoint, shortcut, image
    size, threads, cpu / gpu, this folder, then ``extra``. Returns the JSON each printed after ``RESULT``."""
    from shortft_core.testing import random_models

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = random_models.write_ldm_checkpoint(random_models.random_model("sd15"), tmp / "sd15.safetensors")
        shortcut = random_models.write_random_shortcut(ckpt, tmp / "Hyper-SD15-4steps-lora.safetensors")
        script = tmp / "side.py"
        script.write_text(SIDE_PREAMBLE + script_text)
        rows = []
        for variant in variants:
            r = subprocess.run([sys.executable, str(script), variant, str(ckpt), str(shortcut), str(args.image_size),
                                str(args.threads), "gpu" if args.gpu else "cpu", str(REPO / "bench"), *extra],
                               capture_output=True, text=True, cwd=find_comfyui(), check=False)
            if r.returncode != 0:
                raise SystemExit(f"the {variant} process failed ({r.returncode}):\n{r.stdout[-2000:]}\n"
                                 f"{r.stderr[-4000:]}")
            rows.append(json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))[7:]))
            print(rows[-1], flush=True)
    return rows


def memory(args: argparse.Namespace) -> None:
    rows = in_processes(MEMORY_SCRIPT, ("one-copy", "two-copies"), args)
    what = "GPU memory allocated" if args.gpu else "resident memory"
    print(f"\n| variant | {what} after ComfyUI's loader (GiB) | peak (GiB) | iteration (s) |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['loaded_gib']:.2f} | {row['peak_gib']:.2f} | {row['seconds']:.1f} |")


PROMPTS_SCRIPT = r'''
(iterations,) = extra

with torch.inference_mode():
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=True)[:3]
m = backend.ComfyModel(model, clip, vae, cache_size=2)
if variant == "unheld":
    m._kept_in_place = contextlib.nullcontext
prompts = [f"a red circle left of a blue square, picture {i}" for i in range(6)]
m.prepare(["", *prompts], (int(size),) * 2)
device = mm.get_torch_device()
unloaded, encode = [], clip.encode_from_tokens


def on_device():
    """Bytes of the network's and the VAE's weights ComfyUI counts as loaded on the device."""
    return m.patcher.loaded_size() + vae.patcher.loaded_size()


def counted(*args, **kwargs):
    before = on_device()
    out = encode(*args, **kwargs)
    unloaded.append(max(0, before - on_device()))
    return out


clip.encode_from_tokens = counted
cfg = TrainConfig(iterations=int(iterations), batch_size=1, rank=4, guidance=1.0, sample_steps=10, eval_count=0,
                  lr=1e-3, shortcut_guidance=1.0, image_size=int(size))
preset = attach_shortcut(m, shortcut)
trainer = Trainer(m, SymmetryReward(), cfg, PromptSource(prompts), shortcut_preset=preset)
done, error, t0 = 0, None, time.perf_counter()
try:
    for i in range(int(iterations)):
        trainer.train_step()
        done += 1
        if i == 0:  # from now on ComfyUI sees a full device: each load must unload other models first
            mm.EXTRA_RESERVED_VRAM = int(mm.get_free_memory(device))
except Exception as e:  # what the run stops with is the result
    error = f"{type(e).__name__}: {str(e)[:200]}"
off = sum(p.device != device for net in (m.unet, m.vae) for p in net.parameters())
print("RESULT " + json.dumps({"variant": variant, "iterations": done, "encodes": len(unloaded),
                              "mib_unloaded_by_encodes": sum(unloaded) / 2**20, "parameters_off_device": off,
                              "error": error, "seconds": time.perf_counter() - t0}))
'''


def prompts(args: argparse.Namespace) -> None:
    rows = in_processes(PROMPTS_SCRIPT, ("held", "unheld"), args, str(args.iterations))
    print("\n| variant | iterations done | mid-run encodes | network + VAE unloaded by them (MiB) | "
          "parameters off the device | stopped by |\n|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['iterations']} of {args.iterations} | {row['encodes']} | "
              f"{row['mib_unloaded_by_encodes']:.0f} | {row['parameters_off_device']} | {row['error'] or '-'} |")


CHECKPOINTING_SCRIPT = r'''
from shortft_pack.shortft_core.testing.profiling import LivePeak

with torch.inference_mode():
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=True)[:3]
m = backend.ComfyModel(model, clip, vae)
m.prepare(["a red circle left of a blue square", ""], (int(size),) * 2)
choice, lean = variant.split(",")[0], "lean layers" in variant
unet, blocks, vae_ = {"off": (False, False, False), "unet": (True, False, False), "vae": (False, False, True),
                      "unet + vae": (True, False, True), "unet blocks + vae": (True, True, True)}[choice]
cfg = TrainConfig(iterations=2, batch_size=1, rank=8, guidance=1.0, eval_count=0, lr=1e-3, shortcut_guidance=1.0,
                  image_size=int(size), checkpoint_unet=unet, checkpoint_blocks=blocks, checkpoint_vae=vae_)
preset = attach_shortcut(m, shortcut)
# the lean layers switched beforehand (the shortcut's included), on every device or on none; the trainer's own
# switch (CUDA only) then finds them switched, so each row means the same on a CPU and a GPU
switched = m.enable_lean_activations(devices=None if lean else ())
trainer = Trainer(m, SymmetryReward(), cfg, PromptSource(["a red circle left of a blue square"]),
                  shortcut_preset=preset)
seconds, losses = [], []
if gpu:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
with contextlib.nullcontext() if gpu else LivePeak() as mem:
    for _ in range(2):
        t0 = time.perf_counter()
        losses.append(trainer.train_step()["loss"])
        if gpu:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
peak = torch.cuda.max_memory_allocated() - before if gpu else mem.peak
print("RESULT " + json.dumps({"variant": variant, "peak_gib": peak / 2**30, "seconds": seconds[-1], "loss": losses,
                              "dtype": str(m.dtype), "lean_layers": switched if lean else 0}))
'''


def checkpointing(args: argparse.Namespace) -> None:
    variants = tuple(args.only or ("off", "unet", "vae", "unet + vae", "unet blocks + vae", "off, lean layers",
                                   "unet + vae, lean layers"))
    rows = in_processes(CHECKPOINTING_SCRIPT, variants, args)
    base = rows[0]
    where = "GPU, allocated" if args.gpu else "CPU, live tensor bytes"
    print(f"\n| gradient_checkpointing | peak beyond the weights ({where}; GiB) | vs off | iteration (s) | vs off | "
          f"losses |\n|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['peak_gib']:.2f} | {row['peak_gib'] / base['peak_gib']:.2f} | "
              f"{row['seconds']:.1f} | {row['seconds'] / base['seconds']:.2f} | "
              f"{' / '.join(f'{v:.6f}' for v in row['loss'])} |")


DYNAMIC_SCRIPT = r'''
import traceback
from safetensors.torch import save_file
from shortft_pack.shortft_core.lifecycle import ModelState
from shortft_pack.shortft_core.testing.parity import set_lora_tensors

out_dir = extra[0]
res = {"variant": variant, "dynamic_vram": dynamic_vram, "iterations": 0, "loss": [], "error": None}
t0 = time.perf_counter()
try:
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=True)[:3]
    res["patcher"] = type(model).__name__
    res["vae_patcher"] = type(vae.patcher).__name__
    device = mm.get_torch_device()
    c, h, w = 4, int(size) // 8, int(size) // 8
    x = torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(0)).to(device)
    sigma = torch.tensor([2.0], device=device)
    cond = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1)).to(device)

    def denoised():
        """ComfyUI's own prediction of the MODEL as it is (loaded as a sampler loads it)."""
        with torch.inference_mode():
            mm.load_models_gpu([model])
            return model.model.apply_model(x, sigma, c_crossattn=cond).float().cpu()

    before = denoised()
    m = backend.ComfyModel(model, clip, vae)
    state = ModelState.capture(m)
    m.prepare(["a red circle left of a blue square", ""], (int(size),) * 2)
    cfg = TrainConfig(iterations=3, batch_size=1, rank=8, guidance=1.0, eval_count=0, lr=1e-3, shortcut_guidance=1.0,
                      image_size=int(size), checkpoint_unet=True, checkpoint_vae=True)
    preset = attach_shortcut(m, shortcut)
    trainer = Trainer(m, SymmetryReward(), cfg, PromptSource(["a red circle left of a blue square"]),
                      shortcut_preset=preset)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(cfg.iterations):
        res["loss"].append(trainer.train_step()["loss"])
        res["iterations"] += 1
    res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if gpu else None
    save_file({k: v.float().cpu().contiguous() for k, v in set_lora_tensors(m, "weight").items()},
              f"{out_dir}/{variant}.safetensors")
    folder = f"{out_dir}/{variant}_set"
    trainer.save_lora_set(folder)
    state.restore()
    after = denoised()
    res["model_unchanged"] = float((after - before).abs().max())

    # the set through ApplyAlignedLoRA on the loader's MODEL (streamed under DynamicVRAM: every layer bypasses) and
    # on the MODEL trained (the static copy there; the same object in the legacy run), stock sampling, 4 segments
    import comfy.sample
    from shortft_pack.shortft_core import LoraSet

    apply = import_pack_module("apply")
    lset = LoraSet.open(folder)
    with torch.inference_mode():
        positive = clip.encode_from_tokens_scheduled(clip.tokenize("a red circle left of a blue square"))
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        z = torch.zeros(1, 4, h, w)

        def draw(patcher):
            return comfy.sample.sample(patcher, comfy.sample.prepare_noise(z, 7), 4, 1.0, "euler", "simple", positive,
                                       negative, z, disable_pbar=True, seed=7).float().cpu()

        plain = draw(model)
        applied = {name: draw(apply.timestep_aware(p, lset, 1.0)) for name, p in (("loaded", model),
                                                                                    ("trained", m.patcher))}
    res["set_effect"] = float((applied["trained"] - plain).norm() / plain.norm())
    res["applied_loaded_vs_trained"] = float((applied["loaded"] - applied["trained"]).norm()
                                             / applied["trained"].norm())
    # what ShortFTTrain does when training ends: the static copies (none in the legacy run) are dropped
    del trainer, applied
    import gc

    held = torch.cuda.memory_allocated() if gpu else 0
    m.release()
    gc.collect()
    res["released_gib"] = (held - torch.cuda.memory_allocated()) / 2**30 if gpu else None
except Exception as e:  # what stops a variant is its result
    res["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    res["traceback"] = traceback.format_exc()[-1500:]
res["seconds"] = time.perf_counter() - t0
print("RESULT " + json.dumps(res))
'''


def dynamic(args: argparse.Namespace) -> None:
    import torch
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        rows = in_processes(DYNAMIC_SCRIPT, ("legacy", "dynamic"), args, tmp)
        sets = {row["variant"]: load_file(f"{tmp}/{row['variant']}.safetensors") for row in rows
                if Path(f"{tmp}/{row['variant']}.safetensors").is_file()}
    ref = sets.get("legacy")
    print("\n| variant | DynamicVRAM | MODEL / VAE patcher | iterations | losses | LoRA set vs legacy (rel. L2) | "
          "MODEL after, max abs change | set applied: loader's MODEL vs the trained one (its effect) | peak (GiB) | "
          "freed by releasing the copies (GiB) | s | stopped by |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        mine = sets.get(row["variant"])
        diff = "-"
        if ref is not None and mine is not None and ref.keys() == mine.keys():
            a = [ref[k].flatten() for k in sorted(ref)]
            b = [mine[k].flatten() for k in sorted(ref)]
            diff = f"{float((torch.cat(a) - torch.cat(b)).norm() / torch.cat(a).norm()):.2e}"
        peak = "-" if row.get("peak_gib") is None else f"{row['peak_gib']:.2f}"
        applied = (f"{row['applied_loaded_vs_trained']:.2e} ({row['set_effect']:.2e})" if "set_effect" in row
                   else "-")
        patchers = f"{row.get('patcher', '-')} / {row.get('vae_patcher', '-')}"
        released = "-" if row.get("released_gib") is None else f"{row['released_gib']:.2f}"
        print(f"| {row['variant']} | {row['dynamic_vram']} | {patchers} | "
              f"{row['iterations']} | {' / '.join(f'{v:.6f}' for v in row['loss'])} | {diff} | "
              f"{row.get('model_unchanged', '-')} | {applied} | {peak} | {released} | {row['seconds']:.0f} | "
              f"{row['error'] or '-'} |")
    for row in rows:
        if row.get("traceback"):
            print(f"\n{row['variant']}:\n{row['traceback']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["speed", "memory", "prompts", "checkpointing", "dynamic"])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--only", action="append",
                        help="checkpointing: measure only this variant (repeatable), e.g. 'unet blocks + vae'")
    parser.add_argument("--gpu", action="store_true",
                        help="memory, checkpointing: ComfyUI on the GPU (its own dtype), the peak allocated VRAM "
                             "instead of RSS / live tensor bytes")
    args = parser.parse_args(argv)
    started = time.time()
    {"speed": speed, "memory": memory, "prompts": prompts, "checkpointing": checkpointing,
     "dynamic": dynamic}[args.what](args)
    print(f"\n({time.time() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
