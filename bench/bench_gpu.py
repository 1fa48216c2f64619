"""GPU cost of one training iteration per method on full-size SD1.5 (512 px) and SDXL (1024 px) shapes, bf16.

    python bench/bench_gpu.py --out runs/bench-gpu                  # CUDA, about 4-8 minutes on one H100/H200
    python bench/bench_gpu.py --small --device cpu --out runs/g     # the same code path on tiny shapes (CPU check)

Random-weight models of the real architectures (no weights exist offline), a rank-64 random frozen shortcut on
every ResNet/attention layer (like Hyper-SD's LoRA), a rank-128 alignment set on attention+FF (the paper's), a
reward with a random CLIP ViT-L/14 image tower at 224 px + an MLP head. Per (family, method, checkpointing,
batch): median iteration time of timed iterations after one warm-up, peak CUDA memory
(``torch.cuda.max_memory_allocated``), and the efficiency ratio = iteration time / sum of the iteration's passes
timed alone. Configurations run in priority order until ``--budget-s`` is spent; results are written after each
one (results.json) and the table is printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shortft_core.adapters import SHORTCUT_ADAPTER, SHORTCUT_TARGETS, add_lora, adapter_parameters  # noqa: E402
from shortft_core.adapters import lora_compute_in_input_dtype  # noqa: E402
from shortft_core.testing.profiling import ideal_seconds, pass_costs  # noqa: E402
from shortft_core.rewards.base import Reward  # noqa: E402
from shortft_core.rewards.preprocess import Preprocess  # noqa: E402
from shortft_core.prompts import PromptSource  # noqa: E402
from shortft_core.trainer import Trainer  # noqa: E402
from shortft_core.config import TrainConfig  # noqa: E402

# (family, method, checkpointing, batch) in priority order: what is still unmeasured or unsettled first
# (BENCHMARKS.md, "SD1.5 on an H100"), then the rows already recorded; --families sdxl for the SDXL rows.
# Checkpointing: "none", "unet" (UNet calls with gradient), "vae" (the VAE decoder's blocks only), "all" (both),
# "blocks" (both, the UNet calls recomputed block by block).
PLAN = [
    # the ShortFT / full-BPTT timing pair (the >= 4x target; run it with --iters 5), then the rows not yet measured
    ("sd15", "shortft", "unet", 1), ("sd15", "full-bptt", "unet", 1),
    # lean frozen convolutions (memory.py): the <= 24 GB-at-batch-2-without-checkpointing rows, re-measured
    ("sd15", "shortft-cfg1", "none", 2), ("sd15", "shortft", "none", 2), ("sd15", "shortft", "none", 4),
    ("sd15", "alignprop", "unet", 4), ("sd15", "draft-1", "unet", 1), ("sd15", "draft-1", "none", 1),
    ("sd15", "refl", "none", 1), ("sd15", "alignprop", "unet", 2), ("sd15", "shortft-cfg1", "vae", 2),
    ("sd15", "shortft", "vae", 2), ("sd15", "shortft", "all", 1),
    ("sd15", "shortft", "unet", 2), ("sd15", "full-bptt", "unet", 2), ("sd15", "draft-1", "none", 2),
    ("sd15", "refl", "none", 2), ("sd15", "shortft", "unet", 4), ("sd15", "draft-1", "none", 4),
    ("sd15", "refl", "none", 4), ("sd15", "alignprop", "unet", 1), ("sd15", "shortft", "none", 1),
    ("sdxl", "shortft", "all", 1), ("sdxl", "shortft", "vae", 1), ("sdxl", "full-bptt", "unet", 1),
    ("sdxl", "draft-1", "none", 1), ("sdxl", "refl", "none", 1), ("sdxl", "alignprop", "unet", 1),
    ("sdxl", "shortft", "none", 1), ("sdxl", "shortft", "unet", 1), ("sdxl", "shortft", "unet", 2),
]
RANK = 128  # the alignment set's rank (the paper's)
CKPT = {"none": (False, False, False), "unet": (True, False, False), "vae": (False, False, True),
        "all": (True, False, True), "blocks": (True, True, True)}
METHOD = {"shortft": {"method": "shortft"}, "draft-1": {"method": "draft", "draft_k": 1},
          "alignprop": {"method": "alignprop"}, "refl": {"method": "refl"}, "full-bptt": {"method": "full-bptt"},
          # the paper's open choice: no classifier-free guidance on the fine-tuned steps (half their batch)
          "shortft-cfg1": {"method": "shortft", "guidance": 1.0}}


class RandomClipReward(Reward):
    """A reward with the cost of a real one: CLIP ViT-L/14 image tower (random weights) + MLP head."""

    name = "random_clip_l14"

    def __init__(self, small: bool, device, dtype) -> None:
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        cfg = (CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=8, projection_dim=16) if small else
               CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                image_size=224, patch_size=14, projection_dim=768))
        self.tower = CLIPVisionModelWithProjection(cfg).to(device, dtype)
        self.head = torch.nn.Linear(cfg.projection_dim, 1).to(device, dtype)
        self.prep = Preprocess(size=cfg.image_size)
        self.freeze()

    def score(self, images, prompts):
        emb = self.tower(pixel_values=self.prep(images).to(self.head.weight.dtype)).image_embeds
        return self.head(torch.nn.functional.normalize(emb, dim=-1)).squeeze(-1).float()


def build(family: str, small: bool, device, dtype):
    from shortft_core.testing.random_models import random_model, write_small_configs

    cfg_dir = None
    if small:
        cfg_dir = write_small_configs(family, Path(os.environ.get("TMPDIR", "/tmp")) / f"small-{family}")
    model = random_model(family, dtype=dtype, config_dir=cfg_dir).to(device)
    add_lora(model.unet, SHORTCUT_ADAPTER, 8 if small else 64, targets=SHORTCUT_TARGETS, seed=1)
    for p in adapter_parameters(model.unet, SHORTCUT_ADAPTER):  # frozen, in the base's dtype: as a loaded Hyper-SD file is
        p.requires_grad_(False)
        p.data = p.data.to(dtype)
    return model, RandomClipReward(small, device, dtype)


class Row(NamedTuple):
    """One configuration: a PLAN entry, or an ``--only`` spec with its options (peft's casting, another rank, text
    encoders offloaded)."""

    family: str
    method: str
    ckpt: str
    batch: int
    peft: bool = False
    rank: int | None = None  # the alignment set's rank; None: RANK (8 with --small)
    te_offload: bool = False  # text encoders in host memory, lent to the device per new prompt

    def spec(self) -> str:
        """The row as ``--only`` takes it."""
        return ":".join([self.family, self.method, self.ckpt, str(self.batch)] + ["peft"] * self.peft
                        + ([f"r{self.rank}"] if self.rank else []) + ["te"] * self.te_offload)

    def label(self) -> str:
        """The method column of the table: the method and every option that changes it."""
        return self.method + (" (peft fp32 LoRA inputs)" if self.peft else "") \
            + (f" (rank {self.rank})" if self.rank else "") + (" (text encoders offloaded)" if self.te_offload else "")


ROW_FORMAT = "FAMILY:METHOD:CKPT:BATCH[:peft][:rRANK][:te]"


def parse_row(spec: str) -> Row:
    """``FAMILY:METHOD:CKPT:BATCH[:peft][:rRANK][:te]`` (as ``--only`` takes it) -> a Row; ValueError naming the fix."""
    parts = spec.split(":")
    extras = parts[4:]
    ranks = [e for e in extras if len(e) > 1 and e[0] == "r" and e[1:].isdigit() and int(e[1:]) > 0]
    ok = len(parts) >= 4 and parts[0] in ("sd15", "sdxl") and parts[1] in METHOD and parts[2] in CKPT \
        and parts[3].isdigit() and int(parts[3]) > 0 and extras.count("peft") <= 1 and len(ranks) <= 1 \
        and extras.count("te") <= 1 and len(extras) == extras.count("peft") + len(ranks) + extras.count("te")
    if not ok:
        raise ValueError(f"--only {spec!r}: expected {ROW_FORMAT} with FAMILY sd15 or sdxl, METHOD in "
                         f"{sorted(METHOD)}, CKPT in {sorted(CKPT)}, BATCH a positive integer, RANK the alignment "
                         "set's rank (e.g. r32) and te for text encoders offloaded")
    return Row(parts[0], parts[1], parts[2], int(parts[3]), "peft" in extras, int(ranks[0][1:]) if ranks else None,
               "te" in extras)


@contextlib.contextmanager
def configured(model, reward, row: Row, small: bool, rank: int | None = None):
    """A Trainer for one configuration on the shared model; its adapters and switches are removed afterwards.
    ``row.peft`` runs the LoRAs as peft does (fp32 copies of their inputs), for comparison; the alignment set's rank
    is ``rank``, else ``row.rank``, else 128 (the paper's; 8 with ``small``); ``row.te_offload`` keeps the text
    encoders in host memory."""
    ck_unet, ck_blocks, ck_vae = CKPT[row.ckpt]
    cfg = TrainConfig(**{"guidance": 7.5, **METHOD[row.method]}, checkpoint_unet=ck_unet,
                      checkpoint_blocks=ck_blocks, checkpoint_vae=ck_vae,
                      batch_size=row.batch, rank=rank or row.rank or (8 if small else RANK), eval_count=0,
                      iterations=10**6, lr=1e-5, offload_text_encoders=row.te_offload,
                      mixed_precision="bf16" if model.dtype == torch.bfloat16 else "no")
    tr = Trainer(model, reward, cfg, PromptSource(["a photograph of an astronaut riding a horse"]))
    if row.te_offload:  # no cache: every iteration lends the encoders, as with a prompt list far larger than it
        model.offload_text_encoders(cache_size=0)
    lora_compute_in_input_dtype(model.unet, enable=not row.peft)
    try:
        yield tr
    finally:
        model.unet.delete_adapters(list(tr.lora.names))
        lora_compute_in_input_dtype(model.unet)
        model.unet.zero_grad(set_to_none=True)
        model.vae.disable_gradient_checkpointing()
        model.onload_text_encoders()
        del tr
        if model.device.type == "cuda":
            torch.cuda.empty_cache()


def run_config(model, reward, row: Row, small: bool, iters: int) -> dict:
    """Time one configuration and take its peak memory (CUDA) and efficiency ratio."""
    cuda = model.device.type == "cuda"
    with configured(model, reward, row, small) as tr:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        tr.train_step()  # warm-up (and stage set-up)
        times, plans = [], []
        for _ in range(iters):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            tr.train_step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            plans.append(tr.last_plan)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        costs = pass_costs(tr, row.batch, plans, reps=2)
        ideal = statistics.mean(ideal_seconds(p, costs) for p in plans)
        return {"sec_per_iter": statistics.median(times), "peak_gib": peak, "efficiency_ratio":
                statistics.median(times) / ideal, "network_calls": plans[0].network_calls,
                "grad_calls": plans[0].grad_calls, "iters": iters}


def table(results: list[dict], device_name: str) -> str:
    lines = [f"device: {device_name}", "",
             "| family | method | ckpt | batch | s/iter | peak GiB | efficiency ratio | UNet calls (grad) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['family']} | {r['method']} | {r['ckpt']} | {r['batch']} | {r['error']} | | | |")
            continue
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        method = Row(r["family"], r["method"], r["ckpt"], r["batch"], bool(r.get("peft_cast")), r.get("rank"),
                     bool(r.get("te_offload"))).label()
        lines.append(f"| {r['family']} | {method} | {r['ckpt']} | {r['batch']} | {r['sec_per_iter']:.2f} | {peak} | "
                     f"{r['efficiency_ratio']:.2f} | {r['network_calls']} ({r['grad_calls']}) |")
    by = {(r["family"], r["method"], r["ckpt"], r["batch"]): r for r in results
          if "error" not in r and not r.get("peft_cast") and not r.get("rank") and not r.get("te_offload")}
    for fam in ("sd15", "sdxl"):
        a, b = by.get((fam, "shortft", "unet", 1)), by.get((fam, "full-bptt", "unet", 1))
        if a and b:
            lines.append(f"\n{fam}: full BPTT / ShortFT per iteration (checkpointing, batch 1) = "
                         f"{b['sec_per_iter'] / a['sec_per_iter']:.1f}x")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="reduced configs (CPU check of the script)")
    p.add_argument("--families", nargs="+", default=["sd15", "sdxl"])
    p.add_argument("--budget-s", type=float, default=300.0, help="stop starting new configurations after this")
    p.add_argument("--iters", type=int, default=2, help="timed iterations per configuration")
    p.add_argument("--out", default="runs/bench-gpu")
    p.add_argument("--only", nargs="+", default=None, metavar=ROW_FORMAT,
                   help="run these configurations, in this order, instead of the plan (':peft' = peft's LoRA "
                        f"casting, ':r32' = an alignment set of rank 32 instead of {RANK}, ':te' = text encoders "
                        "offloaded to host memory)")
    args = p.parse_args()
    plan = [Row(*c) for c in PLAN]
    if args.only:
        try:
            plan = [parse_row(spec) for spec in args.only]
        except ValueError as e:
            p.error(str(e))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    t_start = time.perf_counter()
    results: list[dict] = []
    for family in args.families:
        todo = [c for c in plan if c[0] == family]
        if not todo:
            continue
        if time.perf_counter() - t_start > args.budget_s:
            break
        t0 = time.perf_counter()
        model, reward = build(family, args.small, device, dtype)
        print(f"built {family} in {time.perf_counter() - t0:.0f}s", flush=True)
        for c in todo:
            if time.perf_counter() - t_start > args.budget_s:
                print(f"budget spent: skipping {c.spec()}", flush=True)
                continue
            row = {"family": c.family, "method": c.method, "ckpt": c.ckpt, "batch": c.batch, "peft_cast": c.peft,
                   "rank": c.rank, "te_offload": c.te_offload}
            try:
                row.update(run_config(model, reward, c, args.small, args.iters))
            except torch.cuda.OutOfMemoryError:
                row["error"] = "OOM"
            except Exception as e:  # record and go on: one failure must not lose the other rows
                row["error"] = f"{type(e).__name__}: {str(e)[:80]}"
                traceback.print_exc()
            results.append(row)
            print(json.dumps(row), flush=True)
            (out / "results.json").write_text(json.dumps({"device": name, "results": results}, indent=1))
        del model, reward
        if device.type == "cuda":
            torch.cuda.empty_cache()
    text = table(results, name)
    (out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
