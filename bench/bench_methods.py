"""Equal-compute comparison of ShortFT, its ablations and every baseline on the tiny world (CPU).

    python bench/bench_methods.py --budget 120 --seeds 0 1 2 --jobs 2 --out runs/bench-methods
    python bench/bench_methods.py --reward alignment --guidance 1 --lr 5e-4 --budget 240 --out runs/bench-align

Each (variant, seed) runs in a fresh subprocess (one torch thread; ``--jobs`` of them at once, so every run sees
the same load) with the same wall-clock training budget, aligning the tiny pipeline to one of its rewards
(``--reward``: aesthetic, the main job's, by default; alignment); evaluation time is not counted. At 0, 25, 50,
75 and 100% of the budget both rewards are measured on 32 held-out prompts with the 50-step inference chain
(the one not trained on exposes reward hacking). Reported per variant: final held-out rewards (mean +- std over seeds), the share of
the budget needed to reach the best baseline's final reward, peak RSS, iterations, and the efficiency ratio =
measured iteration time / sum of the iteration's network passes, each timed alone as the plan makes it (its
adapter set, guidance, gradient into the adapters its stage trains, checkpointing), plus VAE decode and reward. Results: per-run JSON, table.md, reward_vs_time.png.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS: dict[str, dict] = {
    "shortft": {},
    "shortft-single-lora": {"timestep_aware": False},
    "shortft-no-progressive": {"progressive": False},
    "shortft-naive-jumps": {"shortcut_net": "base"},
    "shortft-seg1-grad-2": {"real_grad_steps": 2},
    "shortft-seg1-grad-all": {"real_grad_steps": None},
    "shortft-anchor-start": {"last_anchor": "start"},  # open choice: the last segment's tuned step at its start
    "shortft-tune-shortcut-model": {"method": "shortcut-model"},
    "draft-1": {"method": "draft", "draft_k": 1},
    "draft-lv": {"method": "draft-lv", "lv_n": 2},
    "alignprop": {"method": "alignprop"},
    "refl": {"method": "refl"},
    "full-bptt": {"method": "full-bptt"},
    "drtune": {"method": "drtune"},
}
BASELINES = ("draft-1", "draft-lv", "alignprop", "refl", "full-bptt", "drtune")
COMMON = dict(batch_size=4, lr=1e-3, rank=8, guidance=3.0, eval_prompts=32)  # lr: BENCHMARKS, "which reward trains"


# ----- worker ------------------------------------------------------------------------------------------------
def worker(variant: str, seed: int, budget: float, out: Path, threads: int, reward: str,
           overrides: dict | None = None) -> None:
    import torch

    torch.set_num_threads(threads)
    from shortft_core.adapters import SHORTCUT
    from shortft_core.profiling import ideal_seconds, pass_costs
    from shortft_core.loading import load_model
    from shortft_core.shortcut import load_shortcut
    from shortft_core.tiny_world import held_out_prompts, load_tiny_rewards, tiny_shortcut_path
    from shortft_core.loop import Callback
    from shortft_core.trainer import PromptSource, Trainer
    from shortft_core.config import TrainConfig

    model = load_model("tiny")
    _, preset = load_shortcut(model.unet, tiny_shortcut_path(), adapter_name=SHORTCUT)
    cfg = TrainConfig(**{**COMMON, **(overrides or {}), "shortcut_guidance": preset.guidance, **VARIANTS[variant],
                         "seed": seed,
                         "time_budget_s": budget, "iterations": 10**6})
    alignment, aesthetic = load_tiny_rewards()
    ev = held_out_prompts(cfg.eval_prompts, seed=1)

    class EvalEvery(Callback):
        def __init__(self):
            self.next = 0.25

        def on_step(self, tr, m):
            if tr.elapsed >= self.next * budget and tr.elapsed < budget:
                tr._eval_and_record()
                self.next += 0.25

    plans = []

    class Plans(Callback):
        def on_step(self, tr, m):
            plans.append(tr.last_plan)

    trained = {"alignment": alignment, "aesthetic": aesthetic}[reward]
    tr = Trainer(model, trained, cfg, PromptSource.tiny(exclude=ev), ev, callbacks=[EvalEvery(), Plans()],
                 eval_reward={"alignment": alignment, "aesthetic": aesthetic}, shortcut_preset=preset)
    rss_setup = _rss_mib()
    h = tr.fit()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    iter_times = [b - a for a, b in zip([0.0] + h.seconds[:-1], h.seconds)]
    skip = min(2, len(iter_times) - 1)  # first iterations include one-off set-up
    costs = pass_costs(tr, cfg.batch_size, plans[skip:])
    ideal = sum(ideal_seconds(p, costs) for p in plans[skip:])
    result = {
        "variant": variant, "seed": seed, "reward": reward, "budget_s": budget, "iterations": len(h.iterations),
        "guidance": cfg.guidance, "lr": cfg.lr,
        "evals": h.evals, "train_reward": h.reward, "seconds": h.seconds, "stages": h.stage,
        "efficiency_ratio": sum(iter_times[skip:]) / ideal if ideal > 0 else None,
        "sec_per_iteration": statistics.median(iter_times[skip:]) if iter_times else None,
        "peak_rss_mib": peak, "rss_after_setup_mib": rss_setup, "pass_costs": costs,
        "first_plan": plans[0].describe() if plans else "",
    }
    out.write_text(json.dumps(result, indent=1))


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ----- driver ------------------------------------------------------------------------------------------------
def aggregate(results: list[dict], out: Path) -> str:
    import numpy as np

    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["variant"], []).append(r)

    def final(rs, key):
        v = [r["evals"][-1][key] for r in rs]
        return float(np.mean(v)), float(np.std(v))

    def curve(rs, key):
        """Mean over seeds of the held-out reward at each evaluation point (time fraction)."""
        n = min(len(r["evals"]) for r in rs)
        t = np.mean([[e["seconds"] for e in r["evals"][:n]] for r in rs], axis=0)
        v = np.mean([[e[key] for e in r["evals"][:n]] for r in rs], axis=0)
        return t, v

    key = results[0].get("reward", "alignment")
    other = "aesthetic" if key == "alignment" else "alignment"
    base0 = float(np.mean([r["evals"][0][key] for r in results]))
    best_baseline = max((b for b in BASELINES if b in by), key=lambda b: final(by[b], key)[0], default=None)
    target = final(by[best_baseline], key)[0] if best_baseline else None
    lines = [f"| variant | held-out {key} (trained) | held-out {other} (not trained) | time to best baseline | "
             "iterations | s/iter | efficiency ratio | peak RSS MiB |", "|---|---|---|---|---|---|---|---|"]
    for name in VARIANTS:
        if name not in by:
            continue
        rs = by[name]
        a, a_sd = final(rs, key)
        q, q_sd = final(rs, other)
        reach = "-"
        if target is not None:
            t, v = curve(rs, key)
            hit = np.nonzero(v >= target)[0]
            budget = rs[0]["budget_s"]
            reach = f"{t[hit[0]] / budget:.0%}" if len(hit) else "not reached"
        eff = np.mean([r["efficiency_ratio"] for r in rs if r["efficiency_ratio"]])
        lines.append(f"| {name} | {a:.4f} +- {a_sd:.4f} | {q:.4f} +- {q_sd:.4f} | {reach} | "
                     f"{np.mean([r['iterations'] for r in rs]):.0f} | {np.mean([r['sec_per_iteration'] for r in rs]):.2f} | "
                     f"{eff:.2f} | {max(r['peak_rss_mib'] for r in rs):.0f} |")
    head = (f"base model held-out {key} {base0:.4f}; best baseline: {best_baseline} "
            f"({target:.4f}); budget {results[0]['budget_s']:.0f} s of training per run, "
            f"{len(by[next(iter(by))])} seeds\n\n" if target is not None else "")
    table = head + "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    _plot(by, out / "reward_vs_time.png", curve, key)
    return table


def _plot(by, path: Path, curve, key: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for i, (name, rs) in enumerate(by.items()):
        t, v = curve(rs, key)
        style = "-" if name.startswith("shortft") else "--"
        ax.plot(t, v, style, marker="o", ms=3, lw=2.2 if name == "shortft" else 1.1, label=name, color=f"C{i % 10}")
    ax.set_xlabel("training seconds (2 CPU cores)")
    ax.set_ylabel(f"held-out {key} reward")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=90.0, help="training seconds per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default="runs/bench-methods")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (every run sees the same load: keep it fixed)")
    p.add_argument("--reward", choices=["aesthetic", "alignment"], default="aesthetic", help="reward to train")
    p.add_argument("--guidance", type=float, default=COMMON["guidance"],
                   help="CFG of the tuned steps and of evaluation (the shortcut keeps its own)")
    p.add_argument("--lr", type=float, default=COMMON["lr"])
    p.add_argument("--worker", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    p.add_argument("--aggregate-only", action="store_true", help="rebuild the table from existing results")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        v, s = args.worker
        worker(v, int(s), args.budget, out / f"{v}.seed{s}.json", args.threads, args.reward,
               {"guidance": args.guidance, "lr": args.lr})
        return 0
    if not args.aggregate_only:
        todo = [(v, seed) for seed in args.seeds for v in args.variants if not (out / f"{v}.seed{seed}.json").exists()]
        running: list[tuple[subprocess.Popen, str, int, float]] = []
        while todo or running:
            while todo and len(running) < args.jobs:
                v, seed = todo.pop(0)
                cmd = [sys.executable, __file__, "--worker", v, str(seed), "--budget", str(args.budget), "--out",
                       str(out), "--threads", str(args.threads), "--reward", args.reward,
                       "--guidance", str(args.guidance), "--lr", str(args.lr)]
                running.append((subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}), v, seed, time.time()))
            time.sleep(1)
            for item in list(running):
                proc, v, seed, t0 = item
                if proc.poll() is not None:
                    running.remove(item)
                    status = "ok" if proc.returncode == 0 else f"FAILED ({proc.returncode})"
                    print(f"{v} seed {seed}: {status} in {time.time() - t0:.0f}s", flush=True)
    results = [json.loads(f.read_text()) for f in sorted(out.glob("*.seed*.json"))]
    print(aggregate(results, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
