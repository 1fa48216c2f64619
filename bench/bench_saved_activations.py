"""What autograd keeps for backward in one reward-gradient call, and what the call costs, with and without the
lean switches of ``shortft_core/memory.py`` (frozen convolutions, then GEGLU feed-forwards, then fused
GroupNorm+SiLU pairs).

    python bench/bench_saved_activations.py --family sd15 --latent 32          # CPU, full-size SD1.5 architecture
    python bench/bench_saved_activations.py --family tiny --batch 8 --time 15  # the tiny world, with timings

Random-weight full-size architecture (fp32 here; bf16 halves every figure alike) or the tiny world, with the
adapters of bench/bench_gpu.py: a trainable rank-128 alignment LoRA on attention+FF and a frozen rank-64 shortcut
LoRA on every ResNet/attention layer. Three calls as ShortFT makes them: a tuned UNet step (alignment LoRA
trained), a frozen shortcut jump (gradient to its input only), the VAE decode. Memory: bytes of every distinct
storage autograd saves, weights excluded (``profiling.kept_for_backward``). ``--time N``: median of N forward +
backward passes per call and column (``profiling.timed``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shortft_core.adapters import SHORTCUT_ADAPTER, SHORTCUT_TARGETS, AdapterSwitch, adapter_parameters, add_lora  # noqa: E402
from shortft_core.memory import lean_frozen_convs, lean_geglu, lean_norm_act  # noqa: E402
from shortft_core.testing.profiling import kept_for_backward, timed  # noqa: E402
from shortft_core.testing.random_models import random_model  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="sd15", choices=["sd15", "sdxl", "tiny"])
    p.add_argument("--latent", type=int, default=None, help="latent side (64 = 512 px for SD1.5; default: the "
                                                            "tiny world's own, 32 for the others)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--time", type=int, default=0, metavar="N", help="also time N forward+backward passes")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.family == "tiny":
        from shortft_core.loading import load_tiny_model

        model = load_tiny_model()
    else:
        model = random_model(args.family)
    latent = args.latent or (model.latent_shape()[-1] if args.family == "tiny" else 32)
    add_lora(model.unet, "align_1", 128, seed=1)
    add_lora(model.unet, SHORTCUT_ADAPTER, 64, targets=SHORTCUT_TARGETS, seed=2)
    with torch.no_grad():
        for p_ in adapter_parameters(model.unet, SHORTCUT_ADAPTER):
            p_.add_(0.01 * torch.randn_like(p_))
            p_.requires_grad_(False)
    switch = AdapterSwitch(model.unet)
    cond = model.encode_prompts(["a photograph of an astronaut riding a horse"] * args.batch)
    shape = (args.batch, model.unet.config.in_channels, latent, latent)
    t = torch.tensor([741] * args.batch)

    def x():
        return torch.randn(shape, generator=torch.Generator().manual_seed(0)).requires_grad_(True)

    calls = {
        "tuned UNet step (alignment LoRA trained)": lambda: (switch.activate(["align_1"]), model.eps(x(), t, cond))[1],
        "frozen shortcut jump (input gradient only)": lambda: (switch.activate([SHORTCUT_ADAPTER]), model.eps(x(), t, cond))[1],
        "VAE decode": lambda: model.decode(x()),
    }
    weights = [w for net in (model.unet, model.vae) for w in [*net.parameters(), *net.buffers()]]

    def measure() -> dict[str, tuple[int, float]]:
        out = {}
        for name, fn in calls.items():
            kept = kept_for_backward(fn, weights)[1]
            sec = timed(lambda: fn().float().square().mean().backward(), reps=args.time) if args.time else 0.0
            out[name] = (kept, sec)
        return out

    columns = {"before": measure()}
    n = lean_frozen_convs(model.unet, devices=None) + lean_frozen_convs(model.vae, devices=None)
    columns["lean convolutions"] = measure()
    g = lean_geglu(model.unet, devices=None)
    columns["+ lean GEGLU"] = measure()
    gn = lean_norm_act(model.unet, devices=None) + lean_norm_act(model.vae, devices=None)
    columns["+ fused GroupNorm+SiLU"] = measure()
    print(f"\n{args.family}, {latent * 8} px, batch {args.batch}, fp32, {torch.get_num_threads()} threads; "
          f"{n} convolutions, {g} GEGLUs, {gn} GroupNorm+SiLU pairs switched\n")
    print("| call | " + " | ".join(f"kept {c} (GiB)" for c in columns) + " | after / before |")
    print("|---|" + "---|" * (len(columns) + 1))
    for name in calls:
        kept = [columns[c][name][0] for c in columns]
        print(f"| {name} | " + " | ".join(f"{k / 2**30:.3f}" for k in kept) + f" | {kept[-1] / kept[0]:.2f} |")
    if args.time:
        print(f"\nforward + backward, median of {args.time} (ms)\n")
        print("| call | " + " | ".join(columns) + " | after / before |")
        print("|---|" + "---|" * (len(columns) + 1))
        for name in calls:
            sec = [columns[c][name][1] for c in columns]
            print(f"| {name} | " + " | ".join(f"{s * 1e3:.1f}" for s in sec) + f" | {sec[-1] / sec[0]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
