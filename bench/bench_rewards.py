"""Time and memory of each reward's forward + backward w.r.t. the pixels, on full-size random-weight models.

Input: 512 x 512 images in [0, 1] (the reward resizes them to 224 itself, as in training), batch 1 and 4.
Each reward runs in its own subprocess so that peak memory is its own. Results in BENCHMARKS.md
("## Rewards (issue 6)").

    python bench/bench_rewards.py                              # CPU, fp32, all rewards
    python bench/bench_rewards.py --device cuda --dtype bf16   # GPU
    python bench/bench_rewards.py --rewards hps_v2 image_reward --runs 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

ALL = ["hps_v2", "hps_v2_ckpt", "pickscore", "image_reward", "aesthetic", "clip_score_b32", "symmetry",
       "compressibility"]
ARCH = {"hps_v2": "open_clip ViT-H-14", "hps_v2_ckpt": "open_clip ViT-H-14, grad checkpointing",
        "pickscore": "transformers CLIP ViT-H/14", "image_reward": "BLIP ViT-L/16 + BERT-base x-attn",
        "aesthetic": "open_clip ViT-L-14 + MLP", "clip_score_b32": "open_clip ViT-B-32", "symmetry": "-",
        "compressibility": "-"}


def build(name: str, dtype: torch.dtype, device: str = "cpu"):
    """A full-size reward with random weights (no files needed), initialised on ``device``."""
    from shortft_core.rewards.clip import CLIPAlignmentReward, hps_preprocess
    from shortft_core.rewards.preprocess import Preprocess

    if name.startswith("hps_v2"):
        import open_clip

        model = open_clip.create_model("ViT-H-14", pretrained=None, device=device).to(dtype)
        r = CLIPAlignmentReward(model, open_clip.get_tokenizer("ViT-H-14"), hps_preprocess(), name="hps_v2")
        return r.enable_gradient_checkpointing() if name.endswith("ckpt") else r
    if name == "clip_score_b32":
        import open_clip

        model = open_clip.create_model("ViT-B-32", pretrained=None, device=device).to(dtype)
        return CLIPAlignmentReward(model, open_clip.get_tokenizer("ViT-B-32"), Preprocess.from_open_clip(model))
    if name == "aesthetic":
        import open_clip

        from shortft_core.rewards.aesthetic import AestheticMLP, AestheticReward

        model = open_clip.create_model("ViT-L-14-quickgelu", pretrained=None, device=device).to(dtype)
        clip = CLIPAlignmentReward(model, None, Preprocess.from_open_clip(model))
        return AestheticReward(clip, AestheticMLP(768))
    if name == "pickscore":
        from transformers import CLIPConfig, CLIPModel

        from shortft_core.tokenizer import load_clip_tokenizer, write_clip_tokenizer

        cfg = CLIPConfig(text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                          num_attention_heads=16, hidden_act="gelu"),
                         vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                            num_attention_heads=16, patch_size=14, image_size=224, hidden_act="gelu"),
                         projection_dim=1024)
        with tempfile.TemporaryDirectory() as tmp:
            tok = load_clip_tokenizer(write_clip_tokenizer(tmp))
        return CLIPAlignmentReward(CLIPModel(cfg).to(dtype), tok, Preprocess(crop_offset="floor"),
                                   use_logit_scale=True, name="pickscore")
    if name == "image_reward":
        from shortft_core.rewards.image_reward import ImageRewardModel, TextConfig, VisionConfig, load_bert_tokenizer
        from shortft_core.rewards.registry import _packaged_bert_vocab

        vocab = _packaged_bert_vocab()
        tmp = None
        if vocab is None:  # any 30,522-line vocabulary gives the same cost
            tmp = tempfile.TemporaryDirectory()
            vocab = Path(tmp.name) / "vocab.txt"
            vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] +
                                       [f"w{i}" for i in range(30522 - 5)]) + "\n", encoding="utf-8")
        model = ImageRewardModel(VisionConfig(), TextConfig(), load_bert_tokenizer(vocab, 30522))
        model.vision.to(dtype)
        model.text.to(dtype)
        return model
    if name == "symmetry":
        from shortft_core.rewards.pixel import SymmetryReward

        return SymmetryReward()
    if name == "compressibility":
        from shortft_core.rewards.pixel import CompressibilityReward

        return CompressibilityReward()
    raise SystemExit(f"unknown reward {name}; choose from {ALL}")


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def measure(name: str, device: str, dtype: torch.dtype, batches: list[int], runs: int) -> list[dict]:
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    t0 = time.perf_counter()
    with dev:  # random init on the target device (fast on GPU)
        reward = build(name, dtype, device).to(dev)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in reward.parameters())
    model_mem = torch.cuda.memory_allocated(dev) / 2**30 if cuda else _rss_gb()
    prompts = ["a photograph of an astronaut riding a horse on the moon, detailed, 4k"] * max(batches)
    rows = []
    for b in batches:
        times = []
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        for i in range(runs + 1):  # first run is warm-up
            x = torch.rand(b, 3, 512, 512, device=dev, requires_grad=True)
            if cuda:
                torch.cuda.synchronize(dev)
            start = time.perf_counter()
            reward(x, prompts[:b]).sum().backward()
            if cuda:
                torch.cuda.synchronize(dev)
            if i:
                times.append(time.perf_counter() - start)
            assert x.grad is not None and torch.isfinite(x.grad).all()
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else _rss_gb()
        rows.append({"reward": name, "arch": ARCH[name], "params_M": round(params / 1e6, 1), "batch": b,
                     "median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4), "runs": runs,
                     "model_GiB": round(model_mem, 2), "peak_GiB": round(peak, 2), "build_s": round(build_s, 1),
                     "device": device, "dtype": str(dtype).replace("torch.", "")})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rewards", nargs="+", default=ALL, choices=ALL)
    p.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    p.add_argument("--runs", type=int, default=3, help="timed runs per batch size (after one warm-up)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one reward in this process
    args = p.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.one:
        print("ROWS " + json.dumps(measure(args.one, args.device, dtype, args.batch, args.runs)), flush=True)
        return 0
    rows = []
    for name in args.rewards:
        cmd = [sys.executable, __file__, "--one", name, "--device", args.device, "--dtype", args.dtype,
               "--runs", str(args.runs), "--batch", *map(str, args.batch)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROWS ")), None)
        if proc.returncode or line is None:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows += json.loads(line[5:])
        print(f"done {name}", file=sys.stderr, flush=True)
    mem = "peak GPU GiB (model)" if args.device.startswith("cuda") else "peak RSS GiB (after build)"
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    print(f"\n| reward | architecture | params (M) | dtype | batch | fwd+bwd median s (min) | {mem} |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['reward']} | {r['arch']} | {r['params_M']} | {r['dtype']} | {r['batch']} | "
              f"{r['median_s']:.3f} ({r['min_s']:.3f}) | {r['peak_GiB']:.2f} ({r['model_GiB']:.2f}) |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
