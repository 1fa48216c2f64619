"""What one network call with gradient keeps for backward on a FLUX-shaped MODEL, by how it is recomputed.

    python bench/bench_block_checkpointing.py --image-size 128 --threads 2

A FLUX.1 dev-shaped network at full width (3072 wide, 24 heads, its guidance embedding; ComfyUI's own ``Flux``
class, loaded by ComfyUI's loader) but with few blocks (``--depths``: double,single pairs), the tiny world's CLIP and
a small 16-channel VAE that halves the image (so ``--image-size`` 128 gives 32x32 latent patches: 1024 image tokens,
FLUX.1 dev's count at 512 px; 77 text tokens). The pack's backend trains it with a rank-8 LoRA set on the layers it
adapts; one chain step with gradient runs forward and backward, in each mode:

- ``off``: every activation kept;
- ``whole calls``: the chain's checkpointing of a network call (what ShortFTTrain's ``unet`` did before blocks);
- ``blocks``: the call's recomputation keeps only each block's input, and each block is recomputed as backward
  reaches it (``DiffusionModel.enable_block_checkpointing``).

The peak is the largest live tensor bytes beyond what existed before the step (``profiling.LivePeak``, CPU, fp32; a
GPU in bf16 holds half). Two depths give the cost per block, from which a full network's (19 double and 38 single
blocks) follows. The gradients of the three modes are compared (relative difference to ``off``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_apply_set import REPO, find_comfyui


# Run in a process of its own: ComfyUI started, the tier-2 tests' FLUX and VAE builders (``TRANSFORMER_WORLD``), then
# the measurement; its arguments: double and single block counts, image size, threads, this folder. Prints one JSON
# row per mode after ``ROW``.
START = r'''
import sys
args = sys.argv[1:]  # start_comfyui replaces sys.argv with ComfyUI's own
sys.path.insert(0, args[4])
from bench_comfy_train import start_comfyui
start_comfyui(int(args[3]))
import torch
'''

MEASURE_SCRIPT = r'''
import dataclasses, json, time
depth, single, size = map(int, args[:3])
from bench_apply_set import import_pack_module
tiny, backend = import_pack_module("tiny_world"), import_pack_module("backend")
from shortft_pack.shortft_core.adapters import AdapterSwitch, LoraSetSpec
from shortft_pack.shortft_core.chain import run_plan
from shortft_pack.shortft_core.lifecycle import ModelState
from shortft_pack.shortft_core.plans import original_chain
from shortft_pack.shortft_core.testing.profiling import LivePeak

with torch.inference_mode():
    _, clip, _ = tiny.load_tiny_world()
model, vae = transformer_world("flux", clip, hidden_size=3072, num_heads=24, depth=depth, depth_single_blocks=single)
cm = backend.ComfyModel(model, clip, vae)
cm.prepare(size=(size, size))
cond = cm.encode_prompts(["a red circle left of a blue square on a white background"], size=(size, size))
noise = torch.randn((1, *cm.latent_shape(size, size)), generator=torch.Generator().manual_seed(0))
spec = LoraSetSpec(rank=8, targets=tuple(cm.lora_targets))
step = original_chain(spec, 1.0, [749, 499])
reference = None
for mode in ("off", "whole calls", "blocks"):
    state = ModelState.capture(cm)
    cm.unet.requires_grad_(False)
    cm.enable_lean_activations(devices=())  # the training-only norms FLUX's in-place residuals need
    spec.add_to(cm.unet, seed=0, order=cm.adapter_order)
    with torch.no_grad():
        for n, p in cm.unet.named_parameters():
            if ".lora_B." in n:
                p.normal_(0.0, 0.01, generator=torch.Generator().manual_seed(1))
    switch = AdapterSwitch(cm.unet)
    if mode == "blocks":
        cm.enable_block_checkpointing()
    plan = dataclasses.replace(step, steps=tuple(dataclasses.replace(s, grad=True, checkpoint=mode != "off")
                                                 for s in step.steps))
    t0 = time.perf_counter()
    with LivePeak() as mem:
        run_plan(cm, plan, noise, cond, None, switch)[-1].square().mean().backward()
    seconds = time.perf_counter() - t0
    grads = torch.cat([p.grad.flatten() for n, p in sorted(cm.unet.named_parameters())
                       if ".lora_" in n and p.grad is not None])
    reference = grads if reference is None else reference
    print("ROW " + json.dumps({"depth": [depth, single], "mode": mode, "peak_gib": mem.peak / 2**30,
                               "seconds": seconds,
                               "grad_vs_off": float((grads - reference).norm() / reference.norm())}), flush=True)
    state.restore()
'''


def measure(depth: int, single: int, size: int, threads: int) -> list[dict]:
    """The three modes on a network of ``depth`` double and ``single`` single blocks, in a fresh process."""
    sys.path.insert(0, str(REPO / "tests"))
    from comfy_process import TRANSFORMER_WORLD

    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "measure.py"
        script.write_text(START + TRANSFORMER_WORLD + MEASURE_SCRIPT)
        r = subprocess.run([sys.executable, str(script), str(depth), str(single), str(size), str(threads),
                            str(REPO / "bench")], capture_output=True, text=True, cwd=find_comfyui(), check=False)
    if r.returncode != 0:
        raise SystemExit(f"the measurement failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    rows = [json.loads(line[4:]) for line in r.stdout.splitlines() if line.startswith("ROW ")]
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--depths", nargs="+", default=["1,2", "2,4"], help="double,single block counts")
    args = parser.parse_args(argv)
    rows = []
    for pair in args.depths:
        depth, single = (int(v) for v in pair.split(","))
        rows += measure(depth, single, args.image_size, args.threads)
    print("\n| blocks (double + single) | mode | peak beyond the weights (GiB) | vs off | seconds | "
          "gradient vs off |\n|---|---|---|---|---|---|")
    for row in rows:
        off = next(r for r in rows if r["depth"] == row["depth"] and r["mode"] == "off")
        print(f"| {row['depth'][0]} + {row['depth'][1]} | {row['mode']} | {row['peak_gib']:.3f} | "
              f"{row['peak_gib'] / off['peak_gib']:.2f} | {row['seconds']:.1f} | {row['grad_vs_off']:.1e} |")


if __name__ == "__main__":
    main()
