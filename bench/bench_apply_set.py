"""What does sampling with ApplyAlignedLoRA cost beside a stock LoRA? (ComfyUI in-process, full-size SD1.5, CPU/GPU)

    python bench/bench_apply_set.py --sizes 64 256 512 --steps 4 12 --repeats 3 --threads 1

A random-weight full-size SD1.5 checkpoint (shortft_core.testing.random_models) and a random rank-``--rank`` LoRA
set of four segments are built once. ComfyUI's own loaders and KSampler (euler / simple, CFG 3, batch 1) then sample
with MODELs of the same checkpoint: the checkpoint alone; the set's merged LoRA through the stock LoraLoader (baked
into the weights) and through the stock LoraLoaderBypass (``W x + B(A x)`` in every call); the set through
ApplyAlignedLoRA (timestep-aware: segment j's LoRA at segment j's timesteps) as it chooses per layer (bypass for
weights on the CPU, patched weights elsewhere), with every layer patched, and, when named in ``--only``, with every
layer bypassed (to compare the two on a GPU). Each (size, steps, variant) is timed ``--repeats`` times after one
warm-up run, in each of ``--passes`` passes over the variants (every other pass in reverse order, so a slow drift of
the machine does not favour the variants timed first); the median per run and its ratio to the stock LoRA are printed as a markdown table, with the per-step
cost of each variant from the two step counts (the slope: what one more step costs, which a segment switch must not
grow).

ComfyUI is found as the tests find it ($COMFYUI_PATH, else ../shared/comfyui, else ~/comfy/ComfyUI) and runs in this
process with --cpu unless --gpu; its requirements must be installed in this interpreter.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def find_comfyui() -> Path:
    for candidate in (os.environ.get("COMFYUI_PATH"), REPO.parent / "shared" / "comfyui",
                      Path.home() / "comfy" / "ComfyUI"):
        if candidate and (Path(candidate) / "comfy" / "model_patcher.py").is_file():
            return Path(candidate)
    raise SystemExit("no ComfyUI checkout: set COMFYUI_PATH to a ComfyUI source tree")


def import_pack_module(name: str, pack_dir: Path = REPO):
    """A module of the pack's nodes/ as ComfyUI would import it (the package without its server routes)."""
    if "shortft_pack" not in sys.modules:
        spec = importlib.util.spec_from_file_location("shortft_pack", pack_dir / "__init__.py",
                                                      submodule_search_locations=[str(pack_dir)])
        pack = importlib.util.module_from_spec(spec)
        sys.modules["shortft_pack"] = pack
        spec.loader.exec_module(pack)
        nodes = types.ModuleType("shortft_pack.nodes")
        nodes.__path__ = [str(pack_dir / "nodes")]
        sys.modules["shortft_pack.nodes"] = nodes
    return importlib.import_module(f"shortft_pack.nodes.{name}")


DEFAULT_VARIANTS = ("checkpoint", "stock LoRA (merged file)", "stock LoRA, bypass (merged file)", "ApplyAlignedLoRA",
                    "ApplyAlignedLoRA, every layer patched")
VARIANTS = (*DEFAULT_VARIANTS, "ApplyAlignedLoRA, every layer bypassed")


class EveryDevice(frozenset):
    """A set of device types that holds every device type (every layer bypassed, on a GPU too)."""

    def __contains__(self, item: object) -> bool:
        return True


def build_world(folder: Path, rank: int, seed: int) -> tuple[Path, Path]:
    """A full-size random SD1.5 checkpoint and a random four-segment LoRA set of ``rank`` (every segment differs)."""
    import torch

    from shortft_core.adapters import LoraSetSpec
    from shortft_core.lora_set import export_lora_set
    from shortft_core.testing import random_models

    model = random_models.random_model("sd15", dtype=torch.float32, seed=seed)
    ckpt = random_models.write_ldm_checkpoint(model, folder / "sd15_random.safetensors", dtype=torch.float16)
    spec = LoraSetSpec(rank=rank)
    spec.add_to(model.unet, seed=seed + 1)
    random_models.randomise_lora_b_(model.unet, seed=seed + 2, std=0.02)
    lora_dir = folder / "loras" / "bench_set"
    export_lora_set(model.unet, spec, lora_dir, family="sd15")
    return ckpt, lora_dir


def per_call(apply, model, aligned, lset, positive, args) -> None:
    """One UNet call (CFG batch of 2) of segment j without the set, with the set bypassed and with its patched
    weights, the three interleaved call by call (each round starting at the next), and the patch of the segment's
    weights alone: the break-even is how many calls a segment must have for its patch to cost less than bypassing."""
    import comfy.model_management
    import comfy.utils
    import torch

    comfy.model_management.load_models_gpu([model])
    base = model.model
    weights = aligned.wrappers["apply_model"][apply.WRAPPER_KEY][0].weights
    devices, cost = apply.BYPASS_DEVICES, apply.BYPASS_COST  # the node's own choice, for the segments below
    j = lset.segments.segment_of(500)
    device = comfy.model_management.get_torch_device()
    cond = positive[0][0].repeat(2, 1, 1).to(device)
    sigma = base.model_sampling.sigma(torch.tensor([500.0, 500.0])).to(device)
    keys = list(weights.patches[j - 1])

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # how segment j's layers are run: the node's choice, every layer bypassed, every layer patched (entered afresh:
    # the segment's patch timed with its calls), the stock LoRA's cost (the patched weights made beforehand: only
    # the calls), and without the set
    policies = {"choice": (devices, cost), "bypass": (EveryDevice(), 0.0), "patched": (frozenset(), cost),
                "stock": (frozenset(), cost), "base": (devices, cost)}

    def segment(policy: str, n: int, x: torch.Tensor) -> float:
        """n UNet calls of segment j under ``policy``, timed together (a bypassed call counts the positions)."""
        apply.BYPASS_DEVICES, apply.BYPASS_COST = policies[policy]
        if policy == "stock":
            weights._current(base, j, keys)
        elif policy != "base":
            weights.drop()
        sync()
        start = time.perf_counter()
        for left in range(n, 0, -1):
            if policy == "base":
                base.apply_model(x, sigma, c_crossattn=cond)
            else:
                with weights.applied(base, j, tuple(x.shape), left):
                    base.apply_model(x, sigma, c_crossattn=cond)
        sync()
        return time.perf_counter() - start

    modes = {"base": "base", "bypass": "bypass", "patched": "stock"}  # a call's column -> its policy
    results: list[tuple] = []
    print(f"\n| size | call, no set (s) | call, bypass (s) | call, patched (s) | bypass / patched | patch of a segment "
          f"({len(keys)} weights, s) | break-even calls per segment | bypass (in + out) x positions per call | "
          "patch: weight elements | BYPASS_COST implied |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        x = torch.randn(2, 4, size // 8, size // 8, device=device)
        times: dict[str, list[float]] = {m: [] for m in modes}
        weights.drop()  # a patch left from another size would stand in for the bypass's first, counting call
        for mode, policy in modes.items():
            segment(policy, 1, x)  # warm-up; the bypassed one counts the positions
        order = list(modes)
        for n in range(args.per_call):
            for mode in order[n % 3:] + order[:n % 3]:
                times[mode].append(segment(modes[mode], 1, x))
        patch = []
        for _ in range(3):
            weights.drop()
            sync()
            start = time.perf_counter()
            weights._current(base, j, keys)
            sync()
            patch.append(time.perf_counter() - start)
        med = {m: statistics.median(t) for m, t in times.items()}
        extra, patch_s = med["bypass"] - med["patched"], statistics.median(patch)
        even = f"{patch_s / extra:.1f}" if extra > 0 else "never (bypass not slower)"
        # the cost model's two sides (nodes/apply.py, SegmentWeights._patch_pays) and the BYPASS_COST they imply
        counted = weights.positions[tuple(x.shape)]
        tensors = [comfy.utils.get_attr(base, k) for k in keys]
        patch_elems = sum(w.numel() for w in tensors)
        bypass_elems = sum((w.numel() // w.shape[0] + w.shape[0]) * counted[k] for k, w in zip(keys, tensors))
        implied = (extra / bypass_elems) / (patch_s / patch_elems)
        print(f"| {size} px | {med['base']:.3f} | {med['bypass']:.3f} | {med['patched']:.3f} | "
              f"{med['bypass'] / med['patched']:.3f} | {patch_s:.3f} | {even} | {bypass_elems / 1e6:.1f} M | "
              f"{patch_elems / 1e6:.1f} M | {implied:.2f} |", flush=True)
        for n in args.segment_calls:  # a segment of n calls: the node's per-layer choice against the two ways
            order = ["choice", "bypass", "patched", "stock"]
            seg: dict[str, list[float]] = {m: [] for m in order}
            for r in range(args.per_call):  # interleaved, each round starting at the next
                for policy in order[r % 4:] + order[:r % 4]:
                    seg[policy].append(segment(policy, n, x))
            weights.drop()
            apply.BYPASS_DEVICES, apply.BYPASS_COST = policies["choice"]
            patched, _ = weights.split(base, j, tuple(x.shape), n)  # what the first call of a fresh segment patches
            results.append((size, n, {m: statistics.median(t) for m, t in seg.items()}, len(patched), len(keys)))
        weights.drop()
    if args.segment_calls:
        print("\n| size | calls in the segment | node's choice (s) | every layer bypassed (s) | every layer patched, "
              "patch included (s) | stock LoRA (patch kept, s) | choice / bypassed / patched vs stock | layers "
              "patched |")
        print("|---|---|---|---|---|---|---|---|")
        for size, n, med, layers, total in results:
            ratios = " / ".join(f"{med[m] / med['stock']:.3f}" for m in ("choice", "bypass", "patched"))
            print(f"| {size} px | {n} | {med['choice']:.3f} | {med['bypass']:.3f} | {med['patched']:.3f} | "
                  f"{med['stock']:.3f} | {ratios} | {layers} of {total} |", flush=True)
    weights.drop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 512], help="image sizes in pixels")
    p.add_argument("--steps", type=int, nargs=2, default=[4, 12], help="two step counts (the per-step slope)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant and pass, after a warm-up")
    p.add_argument("--passes", type=int, default=1,
                   help="passes over the variants, every other one in reverse order (medians over all passes)")
    p.add_argument("--rank", type=int, default=64, help="rank of each segment's LoRA")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--gpu", action="store_true", help="let ComfyUI use the GPU (default: --cpu)")
    p.add_argument("--only", nargs="*", default=None,
                   help="time only these variants (names as printed; 'ApplyAlignedLoRA, every layer bypassed' is "
                        "timed only when named; default: the others)")
    p.add_argument("--per-call", type=int, default=0, metavar="N",
                   help="instead of sampling: N rounds of single UNet calls without the set, bypassed and patched, "
                        "interleaved, and the patch of one segment (--steps and the variants are ignored)")
    p.add_argument("--segment-calls", type=int, nargs="*", default=[1, 2, 4], metavar="N",
                   help="with --per-call: also time segments of N calls entered afresh as the node chooses per layer, "
                        "every layer bypassed and every layer patched, against the stock LoRA's N calls")
    p.add_argument("--json", default=None, help="also write the timings here")
    p.add_argument("--pack", default=str(REPO), help="the pack whose nodes/apply.py is timed (e.g. a git worktree of "
                                                      "an earlier commit, to compare implementations in one run)")
    args = p.parse_args()
    unknown = [name for name in args.only or () if name not in VARIANTS]
    if unknown or (args.only is not None and "stock LoRA (merged file)" not in args.only):
        p.error(f"--only: {', '.join(map(repr, unknown)) or 'the stock LoRA is missing'}; name variants among "
                f"{', '.join(map(repr, VARIANTS))}, the stock LoRA included (the ratios are to it)")
    with tempfile.TemporaryDirectory(prefix="bench_apply_") as work:  # the checkpoint and the set: 2.7 GB
        return bench(args, Path(work))


def bench(args: argparse.Namespace, work: Path) -> int:
    """Build the checkpoint and the set in ``work``, then time what ``args`` asks (see the module docstring)."""
    comfy = find_comfyui()
    sys.path.insert(0, str(comfy))
    sys.argv = [sys.argv[0]] + ([] if args.gpu else ["--cpu"])
    import comfy.options

    comfy.options.enable_args_parsing()
    import torch

    torch.set_num_threads(args.threads)
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    import comfy.utils

    sys.path.insert(0, str(REPO))
    apply = import_pack_module("apply", Path(args.pack))
    from shortft_core.lora_set import LoraSet

    t0 = time.perf_counter()
    ckpt, lora_dir = build_world(work, args.rank, seed=0)
    print(f"built the checkpoint and a rank-{args.rank} set in {time.perf_counter() - t0:.0f} s", flush=True)
    lset = LoraSet.open(lora_dir)
    with torch.inference_mode():
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=False, output_clip=True,
                                                                   embedding_directory=None)
        lora = comfy.utils.load_torch_file(str(lset.merged_file), safe_load=True)
        stock = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)[0]
        bypass = comfy.sd.load_bypass_lora_for_models(model, None, lora, 1.0, 0)[0]
        aligned = apply.timestep_aware(model, lset, 1.0)
        default = apply.BYPASS_DEVICES, apply.BYPASS_COST
        # (MODEL, the device types whose layers ApplyAlignedLoRA may bypass, what bypassing costs against a patch)
        variants = {"checkpoint": (model, *default), "stock LoRA (merged file)": (stock, *default),
                    "stock LoRA, bypass (merged file)": (bypass, *default),
                    "ApplyAlignedLoRA": (aligned, *default),
                    "ApplyAlignedLoRA, every layer patched": (aligned, frozenset(), 0.0),
                    "ApplyAlignedLoRA, every layer bypassed": (aligned, EveryDevice(), 0.0)}
        variants = {k: v for k, v in variants.items() if k in (args.only or DEFAULT_VARIANTS)}
        tokens = clip.tokenize("a red circle left of a blue square")
        positive = clip.encode_from_tokens_scheduled(tokens)
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))

        if args.per_call:
            per_call(apply, model, aligned, lset, positive, args)
            return 0

        def run(m, size: int, steps: int) -> float:
            latent = torch.zeros(1, 4, size // 8, size // 8)
            noise = comfy.sample.prepare_noise(latent, 7)
            start = time.perf_counter()
            comfy.sample.sample(m, noise, steps, 3.0, "euler", "simple", positive, negative, latent,
                                disable_pbar=True, seed=7)
            return time.perf_counter() - start

        results = []
        for size in args.sizes:
            for steps in args.steps:
                times: dict[str, list[float]] = {name: [] for name in variants}
                for n in range(args.passes):  # every other pass in reverse order: a drift of the box hits all alike
                    for name in (list(variants) if n % 2 == 0 else list(variants)[::-1]):
                        m, apply.BYPASS_DEVICES, apply.BYPASS_COST = variants[name]
                        run(m, size, steps)  # warm-up: loading, the first segment's patch, allocator
                        times[name] += [run(m, size, steps) for _ in range(args.repeats)]
                for name, ts in times.items():
                    results.append({"size": size, "steps": steps, "variant": name, "times": ts,
                                    "median": statistics.median(ts)})
                    print(f"{size} px {steps} steps {name}: {statistics.median(ts):.3f} s "
                          f"({', '.join(f'{t:.3f}' for t in ts)})", flush=True)
    lo, hi = args.steps
    print(f"\n| size | variant | run, {lo} steps (s) | run, {hi} steps (s) | per step (s) | vs stock LoRA, {lo} / "
          f"{hi} steps | per step vs stock |")
    print("|---|---|---|---|---|---|---|")
    med = {(r["size"], r["steps"], r["variant"]): r["median"] for r in results}
    stock_name = "stock LoRA (merged file)"
    for size in args.sizes:
        stock_slope = (med[(size, hi, stock_name)] - med[(size, lo, stock_name)]) / (hi - lo)
        for name in variants:
            a, b = med[(size, lo, name)], med[(size, hi, name)]
            slope = (b - a) / (hi - lo)
            print(f"| {size} px | {name} | {a:.3f} | {b:.3f} | {slope:.3f} | {a / med[(size, lo, stock_name)]:.2f} / "
                  f"{b / med[(size, hi, stock_name)]:.2f} | {slope / stock_slope:.2f} |")
    device = comfy.model_management.get_torch_device()
    print(f"\ndevice {device}, torch threads {torch.get_num_threads()}, rank {args.rank}, median of "
          f"{args.repeats * args.passes} ({args.passes} passes), "
          f"ApplyAlignedLoRA of {args.pack}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "rank": args.rank, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
