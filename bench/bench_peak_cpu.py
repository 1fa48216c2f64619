"""Peak GPU memory of bench_gpu.py configurations, predicted on CPU (no GPU needed).

    python bench/bench_peak_cpu.py --only sd15:shortft:none:2 sd15:shortft-cfg1:none:2   # ~4 min a row, 2 cores
    python bench/bench_peak_cpu.py --small --only sd15:shortft:none:1 --sizes 32 64 --size 128  # quick check
    python bench/bench_peak_cpu.py --only sdxl:shortft:all:1 --ranks 4 8   # SDXL: ~13 min a row, 2 cores, 14-22 GB RAM

Each configuration runs as bench_gpu.py runs it on CUDA (bf16 weights, the same adapters, reward and Trainer, the
lean activation switches on as the trainer sets them on CUDA, AdamW's foreach path), warm-up plus one iteration,
at two reduced image sizes, under ``profiling.LivePeak``, which records the live tensor bytes after every op. The
two runs make the same ops in the same order, so each moment's memory is known at two sizes; carried to the full
size on the straight line in pixel count (activations grow with the pixels, attention memory too with
flash-style kernels; weights and optimizer state do not), the largest moment is the prediction. (Extrapolating only
the two peaks would miss a moment that is small at low resolution and dominates at full size.) SDXL's rank-128
alignment set with its gradients and AdamW state (~21 GB) does not fit a 24 GB machine beside the model, so
``--ranks`` measures it at two small ranks and carries every moment on to rank 128 as well: at a fixed size memory
is affine in the rank (adapter weights, gradients, optimizer state, the adapters' rank-wide activations), which
reproduces a direct measurement to the byte (tests/test_bench_args.py checks the arithmetic).
Against ``torch.cuda.max_memory_allocated`` on an H100 it read 2-11 % low in 8 of 8 configurations (median 4 %; it
leaves out the allocator's rounding and cuDNN's workspaces): BENCHMARKS.md, "Peak memory predicted on CPU".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_gpu import RANK, ROW_FORMAT, Row, build, configured, parse_row  # noqa: E402

from shortft_core.memory import lean_saved_activations  # noqa: E402
from shortft_core.testing.profiling import LivePeak, carry_trace, extrapolate_peak  # noqa: E402

DEFAULT_ROWS = ["sd15:shortft:none:2", "sd15:shortft-cfg1:none:2", "sd15:shortft:unet:1"]  # the memory targets


def weight_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the distinct storages of the modules' parameters and buffers."""
    seen: dict[int, int] = {}
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
    return sum(seen.values())


def measure(model, reward, row: Row, size: int, small: bool, steps: int, rank: int | None = None) -> dict:
    """Weights (bytes) and the live-bytes trace of ``steps`` iterations of ``row`` at ``size`` px (alignment set
    of rank ``rank``; None: the row's)."""
    model.unet.register_to_config(sample_size=size // model.vae_scale)
    with configured(model, reward, row, small, rank) as tr:
        for group in tr.opt.param_groups:  # CUDA's default AdamW path (whole-list temporaries)
            group["foreach"] = True
        # offloaded text encoders live in host memory; on CUDA they are lent to the GPU only while a new prompt is
        # encoded, at the start of an iteration, far below the backward's peak
        resident = [] if row.te_offload else model.text_encoders
        weights = weight_bytes(model.unet, model.vae, *resident, reward)
        t0 = time.perf_counter()
        with LivePeak(trace=True) as mem:
            for _ in range(steps):
                tr.train_step()
        return {"size": size, "rank": rank, "weights": weights, "peak": mem.peak,
                "seconds": time.perf_counter() - t0, "trace": mem.trace, "ops": mem.ops}


def predict(a: dict, b: dict, size: int) -> tuple[float, str]:
    """Total bytes at ``size`` px (weights plus the largest moment) from the measurements ``a`` and ``b``, and the
    op at that moment."""
    total, i = extrapolate_peak(a["trace"], a["ops"], a["size"] ** 2, b["trace"], b["ops"], b["size"] ** 2,
                                size ** 2, a["weights"], b["weights"])
    return total, "(peaks only: the runs' ops differ)" if i is None else f"{a['ops'][i]} at {i / len(a['ops']):.0%}"


def predict_rank(lo: tuple[dict, dict], hi: tuple[dict, dict], size: int, rank: int) -> tuple[float, str]:
    """As :func:`predict`, for an alignment set of rank ``rank`` from runs at two lower ranks (``lo``, ``hi``: each
    the two sizes' measurements): every moment is carried to ``size`` px at each rank, then to ``rank`` (at a fixed
    size memory is affine in the rank: adapter weights, gradients, optimizer state and the adapters' rank-wide
    activations; for a model whose full-rank optimizer state does not fit this machine's memory)."""
    r_lo, r_hi = lo[0]["rank"], hi[0]["rank"]
    carried, weights = [], []
    for a, b in (lo, hi):
        c = carry_trace(a["trace"], a["ops"], a["size"] ** 2, b["trace"], b["ops"], b["size"] ** 2, size ** 2)
        if c is None:
            raise RuntimeError(f"the runs at {a['size']} and {b['size']} px make different ops; use other --sizes")
        carried.append(c)
        weights.append(a["weights"])
    total, k = extrapolate_peak(carried[0][0], carried[0][1], r_lo, carried[1][0], carried[1][1], r_hi, rank,
                                weights[0], weights[1])
    if k is None:
        raise RuntimeError(f"the runs at ranks {r_lo} and {r_hi} make different ops")
    return total, f"{carried[0][1][k]} at {carried[0][2][k] / len(lo[0]['ops']):.0%}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", default=DEFAULT_ROWS, metavar=ROW_FORMAT,
                   help="configurations, as bench_gpu.py --only takes them (default: the memory-target rows)")
    p.add_argument("--sizes", nargs=2, type=int, default=None, metavar=("A", "B"),
                   help="the two measured image sizes (default 128 256 for sd15, 256 384 for sdxl)")
    p.add_argument("--size", type=int, default=None, help="predicted image size (default: the family's native)")
    p.add_argument("--small", action="store_true", help="reduced model configs (a quick check of the script)")
    p.add_argument("--no-lean", action="store_true", help="leave the lean activation switches off (the code "
                                                           "before memory.py; for comparison with older GPU rows)")
    p.add_argument("--ranks", nargs=2, type=int, default=None, metavar=("R1", "R2"),
                   help="measure the alignment set at these two ranks and predict rank --rank from them (SDXL: its "
                        "rank-128 set with AdamW state does not fit a 24 GB machine)")
    p.add_argument("--rank", type=int, nargs="+", default=None,
                   help=f"predicted rank(s) with --ranks (default: the row's, else {RANK})")
    p.add_argument("--steps", type=int, default=2, help="iterations measured (the first one is the warm-up)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args()
    try:
        rows = [parse_row(s) for s in args.only]
    except ValueError as e:
        p.error(str(e))
    if args.sizes and (min(args.sizes) <= 0 or args.sizes[0] == args.sizes[1] or any(s % 8 for s in args.sizes)):
        p.error(f"--sizes {args.sizes}: two different positive multiples of 8")
    if args.ranks and (min(args.ranks) <= 0 or args.ranks[0] == args.ranks[1]):
        p.error(f"--ranks {args.ranks}: two different positive ranks")
    if args.rank is not None and not args.ranks:
        p.error("--rank needs --ranks (without it the row runs at its own rank)")
    if args.steps < 2:
        p.error("--steps must be >= 2: the optimizer's state exists from the second iteration on")
    torch.set_num_threads(args.threads)
    results = []
    for family in dict.fromkeys(r[0] for r in rows):
        model, reward = build(family, args.small, torch.device("cpu"), torch.bfloat16)
        native = model.default_size
        if not args.no_lean:  # as the trainer switches them on CUDA
            lean_saved_activations(model.unet, model.vae, devices=None)
        sizes = args.sizes or ([128, 256] if family == "sd15" else [256, 384])
        target = args.size or native
        for row in (r for r in rows if r[0] == family):
            own = row.rank or (8 if args.small else RANK)  # the rank the row runs at without --ranks
            runs = [[measure(model, reward, row, s, args.small, args.steps, r) for s in sizes]
                    for r in (args.ranks or [None])]
            if args.ranks:
                predicted = {r: predict_rank(runs[0], runs[1], target, r) for r in (args.rank or [own])}
            else:
                predicted = {own: predict(*runs[0], target)}
            measured = [m for pair in runs for m in pair]
            for m in measured:
                del m["trace"], m["ops"]
            for rank, (total, where) in predicted.items():
                res = {"row": row.spec(), "lean": not args.no_lean, "measured": measured,
                       "size": target, "rank": rank, "predicted_gib": total / 2**30, "peak_at": where}
                results.append(res)
                print(json.dumps(res), flush=True)
        model.unet.register_to_config(sample_size=native // model.vae_scale)
        del model, reward
    if args.out:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(args.out)
    lines = ["| configuration | lean | measured GiB (at px[, rank]) | predicted GiB | at px | rank | predicted peak at "
             "(op, share of the run) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        seen = ", ".join(f"{(m['weights'] + m['peak']) / 2**30:.2f} ({m['size']}"
                         + (f", r{m['rank']})" if m["rank"] else ")") for m in r["measured"])
        lines.append(f"| {r['row']} | {'yes' if r['lean'] else 'no'} | {seen} | {r['predicted_gib']:.1f} | "
                     f"{r['size']} | {r['rank']} | {r['peak_at']} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
