"""Equal-compute comparison of ShortFT, its ablations and every baseline on the tiny world (CPU).

    python bench/bench_methods.py --budget 120 --seeds 0 1 2 --jobs 2 --out runs/bench-methods
    python bench/bench_methods.py --reward alignment --guidance 1 --lr 5e-4 --budget 240 --out runs/bench-align
    python bench/bench_methods.py --reward symmetry --guidance 3 --budget 120 --seeds 0 1 2 3 4 --eval-prompts 128 \
        --eval-at 0.5 --stage-chains-at 0.5 --out runs/bench-symmetry

Each (variant, seed) runs in a fresh subprocess (one torch thread; ``--jobs`` of them at once, so every run sees
the same load) with the same wall-clock training budget, aligning the tiny pipeline to one of its rewards
(``--reward``: aesthetic, the main job's, by default; alignment; symmetry, i.e. the pixel symmetry reward plus
``--reg-weight`` times the alignment, a property decided at high noise); evaluation time is not counted. At the
start, at the ``--eval-at`` shares of the budget and at the end, every reward is measured on ``--eval-prompts``
held-out prompts with the 50-step inference chain, on the same noise for every run (paired; the base's evaluation
is computed once per folder). ``--stage-chains-at`` also evaluates ShortFT part-way with the stage chains
(:func:`shortft_core.plans.stage_chain`: the set only where training has run it so far). Reported per variant:
final held-out rewards (mean +- std over seeds), the difference to the best baseline with its Welch t, the share of
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

TAIL_BASE_SHARES = (1 / 3, 1 / 3, 1 / 3, 0.0)
VARIANTS: dict[str, dict] = {
    "shortft": {},
    "shortft-single-lora": {"timestep_aware": False},
    "shortft-no-progressive": {"progressive": False},
    "shortft-naive-jumps": {"shortcut_net": "base"},
    "shortft-seg1-grad-2": {"real_grad_steps": 2},
    "shortft-seg1-grad-all": {"real_grad_steps": None},
    "shortft-grad-4": {"real_grad_steps": 4},
    "shortft-stages-40-20-20-20": {"stage_fractions": (0.4, 0.2, 0.2, 0.2)},
    "shortft-stages-20-20-20-40": {"stage_fractions": (0.2, 0.2, 0.2, 0.4)},
    "shortft-reset-optimizer": {"reset_optimizer_per_stage": True},
    "shortft-damped-unrun": {"unrun_lr_scale": 0.3},
    "shortft-damped-unrun-0.1": {"unrun_lr_scale": 0.1},
    "shortft-lr-3e-4": {"lr": 3e-4},  # a hyperparameter the baselines keep at --lr: read as a sensitivity check
    "shortft-anchor-start": {"last_anchor": "start"},  # open choice: the last segment's tuned step at its start
    "shortft-anchor-start-damped": {"last_anchor": "start", "unrun_lr_scale": 0.3},
    "shortft-damped-grad-4": {"unrun_lr_scale": 0.3, "real_grad_steps": 4},
    "shortft-shortcut-cfg1": {"shortcut_guidance": 1.0},  # jumps unguided while the tuned steps use --guidance
    # the last segment left to the base, approximated on a 4-LoRA set: three stages share the budget and the run is
    # evaluated on the stage-3 chain without anchors (the set on segments 1-3, the bare base below t 261)
    "shortft-tail-base": {"stage_fractions": TAIL_BASE_SHARES},
    "shortft-tail-base-damped-grad-4": {"stage_fractions": TAIL_BASE_SHARES, "unrun_lr_scale": 0.3,
                                        "real_grad_steps": 4},
    "shortft-last-segment-base": {"last_segment": "base"},  # the same as a setting: three LoRAs, three stages
    "shortft-last-segment-base-cfg1": {"last_segment": "base", "shortcut_guidance": 1.0},
    "shortft-tune-shortcut-model": {"method": "shortcut-model"},
    "draft-1": {"method": "draft", "draft_k": 1},
    "draft-lv": {"method": "draft-lv", "lv_n": 2},
    "alignprop": {"method": "alignprop"},
    "refl": {"method": "refl"},
    "full-bptt": {"method": "full-bptt"},
    "drtune": {"method": "drtune"},
}
# the row that runs the tiny preset's ShortFT settings, by the runs' CFG, drawn bold: the tiny shortcut is made for
# CFG 3, so the preset's jumps run at min(3, --guidance)
DEFAULT_ROW = {1.0: "shortft-last-segment-base-cfg1", 3.0: "shortft-last-segment-base"}
# variants evaluated on a stage chain instead of the inference chain: (stage, anchors) of plans.stage_chain
EVAL_STAGE_CHAIN = {name: (3, False) for name in VARIANTS if name.startswith("shortft-tail-base")}
BASELINES = ("draft-1", "draft-lv", "alignprop", "refl", "full-bptt", "drtune")
# lr: BENCHMARKS, "which reward trains"; last_segment: a LoRA on every segment (the paper's reading) unless a variant
# says otherwise; the tiny preset's set is the shortft-last-segment-base rows
COMMON = dict(batch_size=4, lr=1e-3, rank=8, guidance=3.0, eval_count=32, last_segment="tuned")
REWARDS = ("aesthetic", "alignment", "symmetry")


def trained_reward(reward: str, rewards: dict, reg_weight: float):
    """The reward a run trains: one tiny reward, or symmetry plus ``reg_weight`` times the alignment as a
    regulariser (the paper mixes HPS and PickScore into its symmetry reward)."""
    if reward != "symmetry":
        return rewards[reward]
    from shortft_core.rewards.combine import WeightedReward

    return WeightedReward([("symmetry", 1.0, rewards["symmetry"]), ("alignment", reg_weight, rewards["alignment"])])


# ----- worker ------------------------------------------------------------------------------------------------
def worker(variant: str, seed: int, budget: float, out: Path, threads: int, reward: str,
           overrides: dict | None = None, eval_at: tuple[float, ...] = (0.25, 0.5, 0.75), reg_weight: float = 0.2,
           stage_chains_at: tuple[float, ...] = ()) -> None:
    import torch

    torch.set_num_threads(threads)
    from shortft_core.adapters import SHORTCUT_ADAPTER
    from shortft_core.files import atomic_write_json
    from shortft_core.testing.profiling import ideal_seconds, pass_costs
    from shortft_core.loading import load_model
    from shortft_core.shortcut import load_shortcut
    from shortft_core.tiny_world import held_out_prompts, load_tiny_rewards, tiny_shortcut_path
    from shortft_core.loop import Callback
    from shortft_core.prompts import PromptSource
    from shortft_core.trainer import Trainer
    from shortft_core.config import TrainConfig
    from shortft_core.methods import stage_at
    from shortft_core.plans import stage_chain
    from shortft_core.rewards.pixel import SymmetryReward
    from shortft_core.schedule import leading_grid

    model = load_model("tiny")
    _, preset = load_shortcut(model.unet, tiny_shortcut_path(), adapter_name=SHORTCUT_ADAPTER)
    cfg = TrainConfig(**{**COMMON, **(overrides or {}), "shortcut_guidance": preset.guidance, **VARIANTS[variant],
                         "seed": seed,
                         "time_budget_s": budget, "iterations": 10**6})
    alignment, aesthetic = load_tiny_rewards()
    rewards = {"alignment": alignment, "aesthetic": aesthetic, "symmetry": SymmetryReward()}
    ev = held_out_prompts(cfg.eval_count, seed=1)

    class EvalEvery(Callback):
        """Held-out evaluation at the given shares of the budget (the end is evaluated by fit); for ShortFT also
        the stage chains (the set only where training has run it) at ``stage_chains_at``."""

        def __init__(self):
            self.todo = sorted(eval_at)
            self.chains = sorted(stage_chains_at)

        def on_step(self, tr, m):
            if self.chains and tr.elapsed >= self.chains[0] * budget and tr.elapsed < budget:
                self.chains.pop(0)
                stage = stage_at(cfg, tr.progress())
                row = {"iteration": tr.iteration, "seconds": tr.elapsed, "stage": stage}
                if cfg.method == "shortft" and cfg.timestep_aware and stage < cfg.num_stages:
                    for anchors in (True, False):
                        plan = stage_chain(stage, tr.lora, cfg.guidance, leading_grid(cfg.sample_steps), anchors)
                        # Trainer.evaluate's fixed seed: the same noise as every other evaluation (paired)
                        row.update({f"{plan.method}/{k}": v for k, v in tr.evaluate(ev, plan=plan).items()})
                    stage_rows.append(row)
            if self.todo and tr.elapsed >= self.todo[0] * budget and tr.elapsed < budget:
                self.todo.pop(0)
                tr.record_evaluation()

    stage_rows: list[dict] = []
    plans = []

    class Plans(Callback):
        def on_step(self, tr, m):
            plans.append(tr.last_plan)

    eval_plan = None
    if variant in EVAL_STAGE_CHAIN:  # every evaluation of this run (part-way and final) on that chain
        chain_stage, chain_anchors = EVAL_STAGE_CHAIN[variant]
        eval_plan = stage_chain(chain_stage, cfg.lora, cfg.guidance, leading_grid(cfg.sample_steps), chain_anchors)
    tr = Trainer(model, trained_reward(reward, rewards, reg_weight), cfg, PromptSource.tiny(exclude=ev), ev,
                 callbacks=[EvalEvery(), Plans()], eval_reward=rewards, shortcut_preset=preset, eval_plan=eval_plan)
    # the base model's evaluation is the same for every run (same prompts, noise and settings): computed once
    base_file = out.parent / f"base_eval.cfg{cfg.guidance:g}.n{cfg.eval_count}.json"
    if base_file.is_file():
        tr.history.evals.append(json.loads(base_file.read_text()))
    rss_setup = _rss_mib()
    h = tr.fit()
    if not base_file.is_file():
        atomic_write_json(base_file, h.evals[0])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    iter_times = [b - a for a, b in zip([0.0] + h.seconds[:-1], h.seconds)]
    skip = min(2, len(iter_times) - 1)  # first iterations include one-off set-up
    costs = pass_costs(tr, cfg.batch_size, plans[skip:])
    ideal = sum(ideal_seconds(p, costs) for p in plans[skip:])
    result = {
        "variant": variant, "seed": seed, "reward": reward, "budget_s": budget, "iterations": len(h.iterations),
        "guidance": cfg.guidance, "lr": cfg.lr, "eval_prompts": cfg.eval_count, "reg_weight": reg_weight,
        "stage_chain_evals": stage_rows, "eval_chain": EVAL_STAGE_CHAIN.get(variant),
        "evals": h.evals, "train_reward": h.reward, "seconds": h.seconds, "stages": h.stage,
        "efficiency_ratio": sum(iter_times[skip:]) / ideal if ideal > 0 else None,
        "sec_per_iteration": statistics.median(iter_times[skip:]) if iter_times else None,
        "peak_rss_mib": peak, "rss_after_setup_mib": rss_setup, "pass_costs": costs,
        "first_plan": plans[0].describe() if plans else "",
    }
    atomic_write_json(out, result)  # the driver takes an existing file as a finished run


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ----- driver ------------------------------------------------------------------------------------------------
def trained_key(reward: str) -> str:
    """The evaluation reward a table ranks by: the trained one (for symmetry, its mix with the regulariser)."""
    return "objective" if reward == "symmetry" else reward


def _add_objective(results: list[dict]) -> None:
    """Held-out value of the symmetry runs' trained mix, symmetry + reg_weight * alignment, at every evaluation."""
    for r in results:
        if r.get("reward") == "symmetry":
            for e in r["evals"]:
                e["objective"] = e["symmetry"] + r["reg_weight"] * e["alignment"]
            for row in r.get("stage_chain_evals") or []:
                for c in ("stage-chain", "stage-chain-no-anchors"):
                    row[f"{c}/objective"] = row[f"{c}/symmetry"] + r["reg_weight"] * row[f"{c}/alignment"]


def aggregate(results: list[dict], out: Path) -> str:
    import numpy as np

    from shortft_core.files import atomic_write_text

    _add_objective(results)
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["variant"], []).append(r)

    def finals(rs, key):
        return np.array([r["evals"][-1][key] for r in rs])

    def final(rs, key):
        v = finals(rs, key)
        return float(np.mean(v)), float(np.std(v))

    def curve(rs, key):
        """Mean over seeds of the held-out reward at each evaluation point (time fraction)."""
        n = min(len(r["evals"]) for r in rs)
        t = np.mean([[e["seconds"] for e in r["evals"][:n]] for r in rs], axis=0)
        v = np.mean([[e[key] for e in r["evals"][:n]] for r in rs], axis=0)
        return t, v

    key = trained_key(results[0].get("reward", "alignment"))
    others = [k for k in ("symmetry", "alignment", "aesthetic") if k != key and k in results[0]["evals"][-1]]
    base0 = float(np.mean([r["evals"][0][key] for r in results]))
    best_baseline = max((b for b in BASELINES if b in by), key=lambda b: final(by[b], key)[0], default=None)
    target = final(by[best_baseline], key)[0] if best_baseline else None
    cols = [f"held-out {'symmetry + ' + format(results[0]['reg_weight'], 'g') + ' x alignment' if key == 'objective' else key} (trained)"] + [f"held-out {k}" for k in others]
    lines = [f"| variant | {' | '.join(cols)} | vs best baseline (Welch t) | time to best baseline | "
             "iterations | s/iter | efficiency ratio | peak RSS MiB |",
             "|---|" + "---|" * (len(cols) + 7)]
    for name in VARIANTS:
        if name not in by:
            continue
        rs = by[name]
        cells = [f"{m:.4f} +- {sd:.4f}" for m, sd in (final(rs, k) for k in [key] + others)]
        reach, versus = "-", "-"
        if target is not None:
            t, v = curve(rs, key)
            hit = np.nonzero(v >= target)[0]
            budget = rs[0]["budget_s"]
            reach = f"{t[hit[0]] / budget:.0%}" if len(hit) else "not reached"
            a, b = finals(rs, key), finals(by[best_baseline], key)
            if name != best_baseline and len(a) > 1 and len(b) > 1:
                se = float(np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)))
                versus = f"{a.mean() - b.mean():+.4f} ({(a.mean() - b.mean()) / se:+.1f})" if se > 0 else "-"
        eff = np.mean([r["efficiency_ratio"] for r in rs if r["efficiency_ratio"]])
        lines.append(f"| {name} | {' | '.join(cells)} | {versus} | {reach} | "
                     f"{np.mean([r['iterations'] for r in rs]):.0f} | {np.mean([r['sec_per_iteration'] for r in rs]):.2f} | "
                     f"{eff:.2f} | {max(r['peak_rss_mib'] for r in rs):.0f} |")
    seeds = len(by[next(iter(by))])
    head = (f"base model held-out {key} {base0:.4f}; best baseline: {best_baseline} ({target:.4f}); budget "
            f"{results[0]['budget_s']:.0f} s of training per run; {seeds} seeds; "
            f"{results[0].get('eval_prompts', 32)} held-out prompts\n\n" if target is not None else "")
    curves = ["", f"Seed means of the held-out {key} at each evaluation (seconds of training: value):", "",
              "| variant | curve |", "|---|---|"]
    for name in VARIANTS:
        if name in by:
            t, v = curve(by[name], key)
            curves.append(f"| {name} | " + " / ".join(f"{a:.0f}s: {b:.4f}" for a, b in zip(t, v)) + " |")
    stage_lines = _stage_chain_table(by, [key] + others)
    table = head + "\n".join(lines + curves + stage_lines)
    atomic_write_text(out / "table.md", table + "\n")
    _plot(by, out / "reward_vs_time.png", curve, key)
    return table


def _stage_chain_table(by: dict, keys: list[str]) -> list[str]:
    """ShortFT runs evaluated part-way with three chains: the full inference chain, the stage chain (set on the
    segments trained for real plus the later anchors) and the stage chain without those anchors; one row per
    evaluation reward, so a chain's trade-off between them shows."""
    import numpy as np

    rows = []
    for name, rs in by.items():
        pts = [r.get("stage_chain_evals") or [] for r in rs]
        if not all(pts) or not pts[0]:
            continue
        for i in range(min(len(p) for p in pts)):
            for key in keys:
                full = []
                for r, p in zip(rs, pts):  # the full chain's evaluation at the same iteration
                    e = [e for e in r["evals"] if e["iteration"] == p[i]["iteration"]]
                    full.append(e[0][key] if e else float("nan"))
                cells = [np.nanmean(full)] + [np.mean([p[i][f"{c}/{key}"] for p in pts])
                                              for c in ("stage-chain", "stage-chain-no-anchors")]
                sds = [np.nanstd(full)] + [np.std([p[i][f"{c}/{key}"] for p in pts])
                                           for c in ("stage-chain", "stage-chain-no-anchors")]
                rows.append(f"| {name} | {np.mean([p[i]['seconds'] for p in pts]):.0f} s, stage {pts[0][i]['stage']} "
                            f"| {key} | " + " | ".join(f"{m:.4f} +- {sd:.4f}" for m, sd in zip(cells, sds)) + " |")
    if not rows:
        return []
    return ["", ("Part-way held-out rewards by chain (the set everywhere / the stage chain / the stage chain "
                 "without the later anchors):"), "", "| variant | point | reward | full chain | stage chain | no later anchors |",
            "|---|---|---|---|---|---|", *rows]


def _plot(by, path: Path, curve, key: str) -> None:
    """Held-out reward against training time (ShortFT's stage-chain evaluations as open markers); for the symmetry
    mix a second panel with every run's final symmetry against its alignment (the trade-off the mix sets). One
    colour per variant (up to 20), squares for baselines, one legend under both panels."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mix = key == "objective"
    palette = plt.get_cmap("tab20").colors
    looks = {name: (palette[i % len(palette)], "o" if name.startswith("shortft") else "s")
             for i, name in enumerate(by)}
    rows = -(-(len(by) + 2) // 4)  # legend rows at four entries a row
    fig, axes = plt.subplots(1, 2 if mix else 1, figsize=(13 if mix else 8, 4.6 + 0.22 * rows), dpi=110,
                             squeeze=False)
    ax = axes[0][0]
    for name, rs in by.items():
        t, v = curve(rs, key)
        colour, marker = looks[name]
        style = "-" if name.startswith("shortft") else "--"
        default = name == DEFAULT_ROW.get(rs[0].get("guidance"))
        ax.plot(t, v, style, marker=marker, ms=3.5, lw=2.4 if default else 1.2,
                label=f"{name} (the tiny preset's)" if default else name, color=colour)
        pts = [r.get("stage_chain_evals") or [] for r in rs]
        if all(pts) and pts and f"stage-chain/{key}" in pts[0][0]:
            n = min(len(p) for p in pts)
            ts = np.mean([[p[j]["seconds"] for j in range(n)] for p in pts], axis=0)
            vs = np.mean([[p[j][f"stage-chain/{key}"] for j in range(n)] for p in pts], axis=0)
            ax.plot(ts, vs, "o", mfc="none", ms=9, mew=1.8, color=colour, label=f"{name}: stage chain")
    ax.set_xlabel("training seconds (2 CPU cores, two runs at a time)")
    ax.set_ylabel(f"held-out {'symmetry + w x alignment' if mix else key} (seed mean)")
    if mix:
        ax2 = axes[0][1]
        for name, rs in by.items():
            colour, marker = looks[name]
            ax2.plot([r["evals"][-1]["alignment"] for r in rs], [r["evals"][-1]["symmetry"] for r in rs], marker,
                     color=colour, ms=5)
        base = next(iter(by.values()))[0]["evals"][0]
        ax2.plot([base["alignment"]], [base["symmetry"]], "k*", ms=12, label="base")
        ax2.set_xlabel("held-out alignment (end of run, one point per seed)")
        ax2.set_ylabel("held-out symmetry (end of run; 0 = mirror-symmetric)")
    handles = [h for a in fig.axes for h in a.get_legend_handles_labels()[0]]
    labels = [lab for a in fig.axes for lab in a.get_legend_handles_labels()[1]]
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7.5, frameon=False)
    fig.tight_layout(rect=(0, 0.02 + 0.035 * rows, 1, 1))
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
    p.add_argument("--reward", choices=REWARDS, default="aesthetic",
                   help="reward to train (symmetry: symmetry + --reg-weight x alignment)")
    p.add_argument("--reg-weight", type=float, default=0.2, help="weight of the alignment regulariser of symmetry")
    p.add_argument("--eval-prompts", type=int, default=COMMON["eval_count"], help="held-out evaluation prompts")
    p.add_argument("--eval-at", type=float, nargs="*", default=[0.25, 0.5, 0.75],
                   help="shares of the budget evaluated besides the start and the end")
    p.add_argument("--stage-chains-at", type=float, nargs="*", default=[],
                   help="shares of the budget where ShortFT runs are also evaluated with the stage chains")
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
               {"guidance": args.guidance, "lr": args.lr, "eval_count": args.eval_prompts}, tuple(args.eval_at),
               args.reg_weight, tuple(args.stage_chains_at))
        return 0
    if not args.aggregate_only:
        # variant by variant (a stopped comparison leaves whole variants), two jobs at a time throughout
        todo = [(v, seed) for v in args.variants for seed in args.seeds if not (out / f"{v}.seed{seed}.json").exists()]
        running: list[tuple[subprocess.Popen, str, int, float]] = []
        while todo or running:
            while todo and len(running) < args.jobs:
                v, seed = todo.pop(0)
                cmd = [sys.executable, __file__, "--worker", v, str(seed), "--budget", str(args.budget), "--out",
                       str(out), "--threads", str(args.threads), "--reward", args.reward,
                       "--guidance", str(args.guidance), "--lr", str(args.lr), "--reg-weight", str(args.reg_weight),
                       "--eval-prompts", str(args.eval_prompts), "--eval-at", *map(str, args.eval_at),
                       "--stage-chains-at", *map(str, args.stage_chains_at)]
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
