"""What autograd keeps for backward in one reward-gradient call, with and without lean frozen convolutions.

    python bench/bench_saved_activations.py --family sd15 --latent 32      # CPU, full-size architecture

Random-weight full-size architecture (fp32 here; bf16 halves every figure alike), the adapters of
bench/bench_gpu.py: a trainable rank-128 alignment LoRA on attention+FF and a frozen rank-64 shortcut LoRA on
every ResNet/attention layer. Lean frozen convolutions, then lean GEGLU feed-forwards (``shortft_core/memory.py``). Three calls as ShortFT
makes them: a tuned UNet step (alignment LoRA trained), a
frozen shortcut jump (gradient to its input only), the VAE decode. Counts the bytes of every distinct storage
autograd saves (``saved_tensors_hooks``), weights excluded — the activation memory a training step holds until backward.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shortft_core.adapters import SHORTCUT, SHORTCUT_TARGETS, AdapterSwitch, adapter_parameters, add_lora  # noqa: E402
from shortft_core.memory import lean_frozen_convs, lean_geglu  # noqa: E402
from shortft_core.random_models import random_model  # noqa: E402


def kept_bytes(fn, weights: set[int]) -> int:
    """Bytes of the distinct activation storages autograd saves in fn() (weights, which exist anyway, excluded)."""
    kept: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(kept.values())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="sd15", choices=["sd15", "sdxl"])
    p.add_argument("--latent", type=int, default=32, help="latent side (64 = 512 px for SD1.5)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = random_model(args.family)
    add_lora(model.unet, "align_1", 128, seed=1)
    add_lora(model.unet, SHORTCUT, 64, targets=SHORTCUT_TARGETS, seed=2)
    with torch.no_grad():
        for p_ in adapter_parameters(model.unet, SHORTCUT):
            p_.add_(0.01 * torch.randn_like(p_))
            p_.requires_grad_(False)
    switch = AdapterSwitch(model.unet)
    cond = model.encode_prompts(["a photograph of an astronaut riding a horse"] * args.batch)
    shape = (args.batch, model.unet.config.in_channels, args.latent, args.latent)

    def x():
        return torch.randn(shape, generator=torch.Generator().manual_seed(0)).requires_grad_(True)

    calls = {
        "tuned UNet step (alignment LoRA trained)": lambda: (switch.activate(["align_1"]),
                                                            model.eps(x(), torch.tensor([741] * args.batch), cond))[1],
        "frozen shortcut jump (input gradient only)": lambda: (switch.activate([SHORTCUT]),
                                                               model.eps(x(), torch.tensor([741] * args.batch), cond))[1],
        "VAE decode": lambda: model.decode(x()),
    }
    weights = {t.untyped_storage().data_ptr() for net in (model.unet, model.vae)
               for t in [*net.parameters(), *net.buffers()]}
    before = {name: kept_bytes(fn, weights) for name, fn in calls.items()}
    n = lean_frozen_convs(model.unet, devices=None) + lean_frozen_convs(model.vae, devices=None)
    convs = {name: kept_bytes(fn, weights) for name, fn in calls.items()}
    g = lean_geglu(model.unet, devices=None)
    after = {name: kept_bytes(fn, weights) for name, fn in calls.items()}
    px = args.latent * 8
    print(f"\n{args.family}, {px} px, batch {args.batch}, fp32; {n} convolutions, {g} GEGLUs switched\n")
    print("| call | kept before (GiB) | lean convolutions | + lean GEGLU | after / before |")
    print("|---|---|---|---|---|")
    for name in calls:
        print(f"| {name} | {before[name] / 2**30:.3f} | {convs[name] / 2**30:.3f} | {after[name] / 2**30:.3f} "
              f"| {after[name] / before[name]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
