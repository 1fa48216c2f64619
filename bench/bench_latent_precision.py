"""How far the chain's first jump (t = 999 -> 749, one DDIM step) moves when its latents are rounded to fp16, bf16 or
fp32, on SD's scaled-linear schedule and on the same schedule rescaled to zero terminal SNR (ComfyUI's
ModelSamplingDiscrete zsnr; v-prediction checkpoints made with it). The network's output is exact here (a v prediction
in float64); eps is formed from it and the rounded latents, then rounded to the latents' dtype as a chain in that
dtype holds it, and the jump runs in that dtype. Printed: the jump's relative L2 error against the same jump in float64
from the rounded latents (median of ``--repeats`` draws).

    python bench/bench_latent_precision.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shortft_core.schedule import SD15_SCHEDULER_CONFIG, NoiseSchedule, ddim_step  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def scaled_linear(zero_terminal_snr: bool) -> torch.Tensor:
    """SD's alphas_cumprod, or the same rescaled so the last level has (almost) no signal, as ComfyUI rescales its
    sigmas (sqrt(abar) shifted to end at zero and scaled to keep the first level, the last clamped off zero)."""
    abar = NoiseSchedule.from_config(SD15_SCHEDULER_CONFIG).alphas_cumprod
    if zero_terminal_snr:
        root = abar.sqrt()
        first, last = root[0].clone(), root[-1].clone()
        abar = ((root - last) * first / (first - last)) ** 2
        abar[-1] = 4.8973451890853435e-08
    return abar


def jump_error(abar: torch.Tensor, dtype: torch.dtype, seed: int, t: int = 999, s: int = 749) -> float:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 64, 64, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(1, 4, 64, 64, generator=gen, dtype=torch.float64)
    alpha, sigma = abar[t].sqrt(), (1 - abar[t]).sqrt()
    eps = sigma * x.double() + alpha * v
    exact = ddim_step(x.double(), eps, abar[t], abar[s])
    got = ddim_step(x, eps.to(dtype), abar[t], abar[s]).double()
    return float((got - exact).norm() / exact.norm())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print("| schedule | abar at t=999 | fp16 latents | bf16 latents | fp32 latents |\n|---|---|---|---|---|")
    for zsnr in (False, True):
        abar = scaled_linear(zsnr)
        cells = [statistics.median(jump_error(abar, dtype, seed) for seed in range(args.repeats))
                 for dtype in DTYPES.values()]
        name = "zero terminal SNR" if zsnr else "SD scaled linear"
        print(f"| {name} | {float(abar[-1]):.2e} | " + " | ".join(f"{c:.2e}" for c in cells) + " |")


if __name__ == "__main__":
    main()
