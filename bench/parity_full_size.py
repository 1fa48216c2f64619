"""One ShortFT training iteration through the MODEL ComfyUI loaded against the library's own model, on the same random
full-size checkpoint, with each side in its own process (one model copy in memory at a time, so a full-size SDXL in
fp32 fits a 24 GB CPU box).

    python bench/parity_full_size.py --family sdxl --work /tmp/parity_sdxl

Steps, each a subprocess of this script: ``build`` writes a random-weight checkpoint of ``--family``'s full
architecture (fp16 file) and a random rank-4 shortcut LoRA on every layer a Hyper-SD LoRA adapts; ``comfy`` loads
the checkpoint with ComfyUI's CheckpointLoaderSimple code and trains one iteration through nodes/backend.py's
ComfyModel; ``lib`` loads it with shortft_core.loading and trains the same iteration (same config, seed and prompt).
Each writes its loss, LoRA gradients and updated LoRAs (shortft_core.testing.parity), its peak resident
memory and its time; the parent prints the relative differences. A step whose output exists is not run again.

ComfyUI is found as the tests find it ($COMFYUI_PATH, else ../shared/comfyui, else ~/comfy/ComfyUI); its
requirements must be installed in this interpreter.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a red circle left of a blue square"


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def build(work: Path, family: str) -> None:
    import torch

    from shortft_core.testing import random_models

    model = random_models.random_model(family, dtype=torch.bfloat16, seed=21)
    ckpt = random_models.write_ldm_checkpoint(model, work / f"{family}_random.safetensors", dtype=torch.float16)
    del model
    random_models.write_random_shortcut(ckpt, work / f"shortcut_{family}.safetensors", family=family)


def train_one(work: Path, family: str, side: str, size: int, threads: int) -> None:
    """One iteration on ``side`` ("comfy" or "lib"); writes ``<side>.safetensors`` and ``<side>.json``."""
    ckpt, shortcut = work / f"{family}_random.safetensors", work / f"shortcut_{family}.safetensors"
    sys.path.insert(0, str(REPO / "bench"))
    from bench_apply_set import find_comfyui, import_pack_module

    if side == "comfy":
        sys.path.insert(0, str(find_comfyui()))
        sys.argv = [sys.argv[0], "--cpu"]
        import comfy.options

        comfy.options.enable_args_parsing()
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(threads)
    sys.path.insert(0, str(REPO))
    if side == "comfy":  # the library as the pack holds it, so its classes are the ones the backend uses
        backend = import_pack_module("backend")
    core = "shortft_pack.shortft_core" if side == "comfy" else "shortft_core"
    lib = importlib.import_module(core)
    PromptSource = importlib.import_module(core + ".prompts").PromptSource
    SymmetryReward = importlib.import_module(core + ".rewards.pixel").SymmetryReward
    Trainer = importlib.import_module(core + ".trainer").Trainer
    set_lora_tensors = importlib.import_module(core + ".testing.parity").set_lora_tensors

    t0 = time.perf_counter()
    if side == "comfy":
        import comfy.sd

        with torch.inference_mode():  # as CheckpointLoaderSimple makes them
            model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=True, output_clip=True)[:3]
        m = backend.ComfyModel(model, clip, vae)
        m.prepare()
    else:
        m = lib.load_model(ckpt, dtype=torch.float32)
    loaded = time.perf_counter() - t0
    cfg = lib.TrainConfig(iterations=1, batch_size=1, rank=4, guidance=1.0, sample_steps=10, eval_count=0,
                          lr=1e-3, shortcut_guidance=1.0, image_size=size)
    preset = lib.attach_shortcut(m, shortcut)
    trainer = Trainer(m, SymmetryReward(), cfg, PromptSource([PROMPT]), shortcut_preset=preset)
    tensors = {f"init/{k}": v for k, v in set_lora_tensors(m, "weight").items()}
    t0 = time.perf_counter()
    metrics = trainer.train_step()
    step = time.perf_counter() - t0
    tensors |= {f"grad/{k}": v for k, v in set_lora_tensors(m, "grad").items()}
    tensors |= {f"updated/{k}": v for k, v in set_lora_tensors(m, "weight").items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(work / f"{side}.safetensors"))
    info = {"family": getattr(m, "family", family), "dtype": str(m.dtype), "loss": metrics["loss"],
            "plan": trainer.last_plan.describe(), "load_s": loaded, "iteration_s": step, "peak_rss_gib": peak_rss_gib(),
            "threads": threads, "torch": torch.__version__}
    (work / f"{side}.json").write_text(json.dumps(info, indent=1))


def compare(work: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    c, r = load_file(str(work / "comfy.safetensors")), load_file(str(work / "lib.safetensors"))
    ci, ri = (json.loads((work / f"{s}.json").read_text()) for s in ("comfy", "lib"))

    def part(d: dict, kind: str) -> dict:
        return {k.split("/", 1)[1]: v for k, v in d.items() if k.startswith(kind + "/")}

    def flat(d: dict, keys: list) -> torch.Tensor:
        return torch.cat([d[k].flatten().float() for k in keys])

    gc, gr = part(c, "grad"), part(r, "grad")
    keys = sorted(gr)
    if sorted(gc) != keys:
        raise SystemExit(f"the two sides trained different LoRA layers: {sorted(set(gc) ^ set(keys))[:5]}")
    ic, ir = part(c, "init"), part(r, "init")
    wc, wr = part(c, "updated"), part(r, "updated")
    return {
        "modules": len(keys),
        "init_equal": all(torch.equal(ic[k], ir[k]) for k in keys),
        "loss": [ci["loss"], ri["loss"], abs(ci["loss"] - ri["loss"]) / abs(ri["loss"])],
        "grad_rel_l2": float((flat(gc, keys) - flat(gr, keys)).norm() / flat(gr, keys).norm()),
        "grad_rel_max": max(float((gc[k] - gr[k]).abs().max() / gr[k].abs().max()) for k in keys
                            if gr[k].abs().max() > 0),
        "updated_rel_l2": float((flat(wc, keys) - flat(wr, keys)).norm() / flat(wr, keys).norm()),
        "comfy": ci, "lib": ri,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="sdxl", choices=["sd15", "sdxl"])
    p.add_argument("--work", required=True, help="folder for the checkpoint, shortcut and results (kept)")
    p.add_argument("--size", type=int, default=64, help="training image size in pixels")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--side", choices=["build", "comfy", "lib"], help=argparse.SUPPRESS)
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.side == "build":
        build(work, args.family)
        return 0
    if args.side:
        train_one(work, args.family, args.side, args.size, args.threads)
        return 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    for side, done in (("build", f"shortcut_{args.family}.safetensors"), ("comfy", "comfy.json"),
                       ("lib", "lib.json")):
        if (work / done).exists():
            continue
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--side", side, "--family", args.family, "--work", str(work),
                        "--size", str(args.size), "--threads", str(args.threads)], check=True, env=env)
        print(f"{side}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(json.dumps(compare(work), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
